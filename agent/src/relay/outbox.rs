//! The sender's outbox: a durable spool (`<state-dir>/outbox/`, a [segment log](super::seglog)
//! of messages and "done" marks, group-committed) and one delivery worker per destination
//! membrane, which retries
//! with exponential backoff until the receiver acknowledges, or moves the message to
//! `<state-dir>/deadletter/` once it expired (default 1 h) or was refused for good.
//! Also the one-shot direct delivery used by `agent send` when no agent runs.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::json;
use shared::envelope::{Envelope, MessageId};
use shared::model::Endpoint;
use shared::name::MembraneId;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::maildir::{Maildir, Stored};
use super::seglog::{self, SegLog};
use super::wire::{Addr, FrameConn};
use crate::activity::Activity;
use crate::util::{self, Backoff};

/// Where messages to a membrane go.
pub trait Routes: Send + Sync + 'static {
    /// The current endpoint of membrane `id` (the cache first, the registry next).
    fn endpoint(&self, id: &MembraneId) -> impl Future<Output = Result<Endpoint, String>> + Send;
}

/// Outbox settings.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// First retry delay.
    pub min_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// How long to wait for a receiver's acks.
    pub ack_timeout: Duration,
    /// Most messages in one delivery batch.
    pub batch: usize,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            ack_timeout: Duration::from_secs(10),
            batch: 1024,
        }
    }
}

type Waiter = oneshot::Sender<Result<(), String>>;

/// Messages queued for one destination past which `submit` waits (backpressure), as long
/// as that destination takes messages (its last delivery attempt worked): a slow receiver
/// slows its senders down instead of letting their queue, and the latency, grow. While a
/// receiver is unreachable nothing waits: the spool holds the messages.
pub const MAX_QUEUED: usize = 512;

/// One destination's delivery worker.
struct Lane {
    tx: mpsc::UnboundedSender<Envelope>,
    queued: AtomicUsize,
    healthy: std::sync::atomic::AtomicBool,
    drained: tokio::sync::Notify,
}

impl Lane {
    fn dequeued(&self, n: usize) {
        if n > 0 {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            self.drained.notify_waiters();
        }
    }
}

struct SpoolReq {
    msgs: Vec<(MessageId, Vec<u8>)>,
    /// Activity records, written with the others of the group commit.
    events: Vec<(&'static str, String, serde_json::Value)>,
    reply: oneshot::Sender<Result<Vec<Stored>, String>>,
}

/// The outbox of a running agent.
pub struct Outbox<R: Routes> {
    dead: PathBuf,
    /// Ids delivered or dead-lettered, to be marked done in the spool.
    done: Mutex<Vec<MessageId>>,
    done_wake: tokio::sync::Notify,
    pending: Arc<AtomicUsize>,
    routes: Arc<R>,
    cfg: OutboxConfig,
    activity: Arc<Activity>,
    workers: Mutex<HashMap<MembraneId, Arc<Lane>>>,
    /// Who waits for each message's outcome (`send --wait`; several for a resubmitted id).
    waiters: Mutex<HashMap<MessageId, Vec<Waiter>>>,
    spool_tx: mpsc::Sender<SpoolReq>,
    cancel: CancellationToken,
    clock: (SystemTime, tokio::time::Instant),
}

impl<R: Routes> Outbox<R> {
    /// Opens (creating) the spool in `state_dir` and re-queues what it holds.
    pub fn open(
        state_dir: &std::path::Path,
        routes: Arc<R>,
        cfg: OutboxConfig,
        activity: Arc<Activity>,
        cancel: CancellationToken,
    ) -> std::io::Result<Arc<Self>> {
        let dir = state_dir.join("outbox");
        let (spool, recovered) = Spool::open(&dir, SEGMENT_BYTES)?;
        let pending = Arc::new(AtomicUsize::new(spool.live.len()));
        let (spool_tx, spool_rx) = mpsc::channel(1024);
        let ob = Arc::new(Outbox {
            dead: state_dir.join("deadletter"),
            done: Mutex::new(Vec::new()),
            done_wake: tokio::sync::Notify::new(),
            pending,
            routes,
            cfg,
            activity,
            workers: Mutex::new(HashMap::new()),
            waiters: Mutex::new(HashMap::new()),
            spool_tx,
            cancel,
            clock: (SystemTime::now(), tokio::time::Instant::now()),
        });
        tokio::spawn(spooler(spool, spool_rx, ob.clone()));
        let n = recovered.len();
        for e in recovered {
            ob.enqueue(e);
        }
        if n > 0 {
            tracing::info!(messages = n, "outbox: re-queued undelivered messages");
        }
        Ok(ob)
    }

    /// Milliseconds since the Unix epoch, on tokio's clock (so paused-time tests work).
    pub fn now_ms(&self) -> u64 {
        util::unix_millis(self.clock.0 + self.clock.1.elapsed())
    }

    /// Number of messages not yet delivered.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Marks messages done (delivered or dead-lettered): their spool records can go.
    fn mark_done(&self, ids: &[MessageId]) {
        self.pending.fetch_sub(ids.len(), Ordering::Relaxed);
        self.done.lock().unwrap().extend_from_slice(ids);
        self.done_wake.notify_one();
    }

    /// Stores messages durably in the spool (one group commit) and queues them for
    /// delivery. With `wait`, also returns receivers that complete when each is
    /// acknowledged (or fails for good). They are registered before the spool answers: a
    /// resubmitted id already queued may be delivered, and its waiters told, before this
    /// task runs again.
    pub async fn submit(
        self: &Arc<Self>,
        envs: Vec<Envelope>,
        wait: bool,
    ) -> Result<Vec<oneshot::Receiver<Result<(), String>>>, String> {
        // Backpressure: wait while a destination that takes messages has a long queue.
        for to in envs
            .iter()
            .map(|e| &e.to)
            .collect::<std::collections::BTreeSet<_>>()
        {
            loop {
                let lane = self.workers.lock().unwrap().get(to).cloned();
                let Some(lane) = lane else { break };
                let drained = lane.drained.notified();
                if lane.queued.load(Ordering::Relaxed) < MAX_QUEUED
                    || !lane.healthy.load(Ordering::Relaxed)
                {
                    break;
                }
                tokio::select! {
                    _ = self.cancel.cancelled() => return Err("the agent is shutting down".into()),
                    _ = drained => {}
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
        let msgs = envs.iter().map(|e| (e.id, e.encode())).collect();
        let events = envs
            .iter()
            .map(|e| {
                (
                    "sent",
                    format!("message queued for {}", e.to),
                    json!({"id": e.id.to_string(), "to": e.to, "bytes": e.body.len()}),
                )
            })
            .collect();
        let mut rxs = Vec::new();
        if wait {
            let mut waiters = self.waiters.lock().unwrap();
            for e in &envs {
                let (tx, rx) = oneshot::channel();
                let list = waiters.entry(e.id).or_default();
                list.retain(|w| !w.is_closed());
                list.push(tx);
                rxs.push(rx);
            }
        }
        let spooled = async {
            let (reply, rx) = oneshot::channel();
            self.spool_tx
                .send(SpoolReq {
                    msgs,
                    events,
                    reply,
                })
                .await
                .map_err(|_| "the agent is shutting down".to_string())?;
            rx.await
                .map_err(|_| "the agent is shutting down".to_string())?
        };
        let stored = match spooled.await {
            Ok(s) => s,
            Err(e) => {
                drop(rxs);
                let mut waiters = self.waiters.lock().unwrap();
                for e in &envs {
                    if let Some(list) = waiters.get_mut(&e.id) {
                        list.retain(|w| !w.is_closed());
                        if list.is_empty() {
                            waiters.remove(&e.id);
                        }
                    }
                }
                return Err(e);
            }
        };
        for (e, st) in envs.into_iter().zip(stored) {
            // Already in the spool (a client's retry with the same id): already queued.
            if st == Stored::New {
                self.enqueue(e);
            }
        }
        Ok(rxs)
    }

    fn enqueue(self: &Arc<Self>, e: Envelope) {
        let mut w = self.workers.lock().unwrap();
        let lane = w.entry(e.to.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let lane = Arc::new(Lane {
                tx,
                queued: AtomicUsize::new(0),
                healthy: true.into(),
                drained: tokio::sync::Notify::new(),
            });
            tokio::spawn(self.clone().worker(e.to.clone(), rx, lane.clone()));
            lane
        });
        lane.queued.fetch_add(1, Ordering::Relaxed);
        let _ = lane.tx.send(e);
    }

    fn finish(&self, id: MessageId, r: Result<(), String>) {
        for w in self.waiters.lock().unwrap().remove(&id).unwrap_or_default() {
            let _ = w.send(r.clone());
        }
    }

    fn dead_letter(&self, e: &Envelope, why: &str) {
        let path = write_dead_letter(&self.dead, e);
        if path.is_ok() {
            self.mark_done(&[e.id]);
        }
        tracing::warn!(id = %e.id, to = %e.to, reason = why, "message moved to the dead-letter folder");
        self.activity.record(
            "dead_letter",
            &format!("message to {} not delivered: {why}", e.to),
            json!({"id": e.id.to_string(), "to": e.to, "path": path.ok()}),
        );
        self.finish(e.id, Err(format!("not delivered: {why}")));
    }

    async fn worker(
        self: Arc<Self>,
        to: MembraneId,
        mut rx: mpsc::UnboundedReceiver<Envelope>,
        lane: Arc<Lane>,
    ) {
        let mut queue: VecDeque<Envelope> = VecDeque::new();
        let mut queued: std::collections::HashSet<MessageId> = std::collections::HashSet::new();
        let mut conn: Option<FrameConn> = None;
        let mut backoff = Backoff::new(self.cfg.min_backoff, self.cfg.max_backoff);
        loop {
            if queue.is_empty() {
                tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    m = rx.recv() => match m {
                        Some(e) => if queued.insert(e.id) { queue.push_back(e) } else { lane.dequeued(1) },
                        None => return,
                    },
                }
            }
            while let Ok(e) = rx.try_recv() {
                if queued.insert(e.id) {
                    queue.push_back(e);
                } else {
                    lane.dequeued(1);
                }
            }
            let before = queue.len();
            let now = self.now_ms();
            queue.retain(|e| {
                let expired = e.expires_at.is_some_and(|t| t <= now);
                if expired {
                    self.dead_letter(e, "expired before the receiver acknowledged it");
                    queued.remove(&e.id);
                }
                !expired
            });
            lane.dequeued(before - queue.len());
            if queue.is_empty() {
                continue;
            }
            let result = match self.routes.endpoint(&to).await {
                Ok(ep) => {
                    let n = queue.len().min(self.cfg.batch);
                    let batch: Vec<&Envelope> = queue.iter().take(n).collect();
                    deliver(&ep, &batch, &mut conn, self.cfg.ack_timeout).await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(outcomes) => {
                    backoff.reset();
                    lane.healthy.store(true, Ordering::Relaxed);
                    let mut transient = None;
                    let mut done = std::collections::HashSet::new();
                    let mut delivered = Vec::new();
                    for e in queue.iter() {
                        match outcomes.get(&e.id) {
                            Some(Ok(())) => {
                                delivered.push(e.id);
                                done.insert(e.id);
                            }
                            Some(Err(refusal)) if refusal.code == "unavailable" => {
                                transient = Some(refusal.message.clone());
                            }
                            Some(Err(refusal)) => {
                                self.dead_letter(
                                    e,
                                    &format!("refused ({}): {}", refusal.code, refusal.message),
                                );
                                done.insert(e.id);
                            }
                            None => {}
                        }
                    }
                    if !delivered.is_empty() {
                        self.mark_done(&delivered);
                        for id in &delivered {
                            self.finish(*id, Ok(()));
                        }
                        self.activity.record_many(delivered.iter().map(|id| {
                            (
                                "delivered",
                                format!("message delivered to {to}"),
                                json!({"id": id.to_string(), "to": to}),
                            )
                        }));
                    }
                    queue.retain(|e| !done.contains(&e.id));
                    lane.dequeued(done.len());
                    for id in &done {
                        queued.remove(id);
                    }
                    if let Some(why) = transient {
                        lane.healthy.store(false, Ordering::Relaxed);
                        lane.drained.notify_waiters();
                        let delay = backoff.next_delay();
                        tracing::debug!(to = %to, error = %why, retry_in = ?delay, "receiver cannot store now");
                        tokio::select! {
                            _ = self.cancel.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
                Err(err) => {
                    conn = None;
                    lane.healthy.store(false, Ordering::Relaxed);
                    lane.drained.notify_waiters();
                    let delay = backoff.next_delay();
                    tracing::debug!(to = %to, error = %err, retry_in = ?delay, "delivery failed");
                    self.activity.record(
                        "retry",
                        &format!("delivery to {to} failed: {err}"),
                        json!({"to": to, "pending": queue.len(), "retry_in_ms": delay.as_millis() as u64}),
                    );
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

/// Segment size of the spool.
const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;

/// Kinds of spool records.
const MSG: u8 = 1;
const DONE: u8 = 2;

/// The spool: messages appended to a segment log, "done" marks once delivered (or
/// dead-lettered). Segments are removed oldest first once none of their messages is
/// pending; the oldest is rewritten (its pending messages copied forward) when more than
/// [`KEEP_SEGMENTS`] are retained, so one undeliverable message does not hold the others.
struct Spool {
    log: SegLog,
    /// Pending messages: the segment holding each.
    live: HashMap<MessageId, u64>,
    /// Pending messages per retained segment (the active one included).
    per_seg: BTreeMap<u64, usize>,
}

/// Retained older segments past which the oldest is compacted.
const KEEP_SEGMENTS: usize = 2;

impl Spool {
    /// Opens the spool in `dir`: it, and the pending messages, oldest first. Files of the
    /// previous spool format (a Maildir `new/`) are moved into the log.
    fn open(dir: &std::path::Path, segment: u64) -> std::io::Result<(Spool, Vec<Envelope>)> {
        let (log, records) = SegLog::open(dir, segment)?;
        let mut live: HashMap<MessageId, u64> = HashMap::new();
        let mut msgs: HashMap<MessageId, Envelope> = HashMap::new();
        let mut per_seg: BTreeMap<u64, usize> = seglog::list_segments(dir)?
            .into_iter()
            .map(|n| (n, 0))
            .collect();
        for r in records {
            match r.kind {
                MSG => match Envelope::decode(&r.payload) {
                    Ok(e) => {
                        live.insert(e.id, r.seg);
                        msgs.insert(e.id, e);
                    }
                    Err(err) => {
                        tracing::warn!(segment = r.seg, offset = r.off, error = %err, "unreadable outbox record skipped");
                    }
                },
                DONE => {
                    if let Ok(b) = <[u8; 16]>::try_from(&r.payload[..]) {
                        let id = MessageId::from_u128(u128::from_le_bytes(b));
                        live.remove(&id);
                        msgs.remove(&id);
                    }
                }
                _ => {}
            }
        }
        for seg in live.values() {
            *per_seg.entry(*seg).or_default() += 1;
        }
        let mut spool = Spool { log, live, per_seg };
        // The previous format: one file per message in new/.
        let old = Maildir::new(dir);
        if old.exists() {
            for id in old.list_new()? {
                if let Ok(e) =
                    old.read_new(id, super::MAX_BODY_LIMIT + shared::envelope::HEADER_ROOM)
                    && !spool.live.contains_key(&id)
                {
                    spool.append(&e.id, &e.encode());
                    msgs.insert(e.id, e);
                }
            }
            spool.log.commit()?;
            for id in old.list_new()? {
                old.remove_new(id)?;
            }
        }
        spool.collect()?;
        let mut pending: Vec<Envelope> = msgs.into_values().collect();
        pending.sort_by_key(|e| e.id);
        Ok((spool, pending))
    }

    fn append(&mut self, id: &MessageId, bytes: &[u8]) {
        let (seg, _) = self.log.append(MSG, bytes);
        self.live.insert(*id, seg);
        *self.per_seg.entry(seg).or_default() += 1;
    }

    /// Drops `id` from the pending messages; whether it was pending.
    fn forget(&mut self, id: &MessageId) -> bool {
        let Some(seg) = self.live.remove(id) else {
            return false;
        };
        if let Some(n) = self.per_seg.get_mut(&seg) {
            *n = n.saturating_sub(1);
        }
        true
    }

    fn done(&mut self, id: MessageId) {
        if self.forget(&id) {
            self.log.append(DONE, &id.as_u128().to_le_bytes());
        }
    }

    /// Stores messages (one group commit with the pending done marks); duplicates of
    /// pending ones are skipped.
    fn store(&mut self, msgs: &[(MessageId, &[u8])]) -> std::io::Result<Vec<Stored>> {
        let mut out = Vec::with_capacity(msgs.len());
        let mut added = Vec::new();
        for (id, b) in msgs {
            if self.live.contains_key(id) {
                out.push(Stored::Duplicate);
            } else {
                self.append(id, b);
                added.push(*id);
                out.push(Stored::New);
            }
        }
        if let Err(e) = self.log.commit() {
            for id in &added {
                self.forget(id);
            }
            return Err(e);
        }
        self.per_seg.entry(self.log.active()).or_default();
        Ok(out)
    }

    /// The spooler's group commit: marks `done` ids, stores `msgs` (see [`Spool::store`]),
    /// then collects segments. Once the messages are durable they are reported stored: a
    /// failure of the housekeeping after that is only logged (it is tried again next time).
    fn commit_batch(
        &mut self,
        done: Vec<MessageId>,
        msgs: &[(MessageId, &[u8])],
    ) -> std::io::Result<Vec<Stored>> {
        for id in done {
            self.done(id);
        }
        let stored = self.store(msgs)?;
        if let Err(e) = self.collect() {
            tracing::warn!(error = %e, "outbox housekeeping failed; will retry");
        }
        Ok(stored)
    }

    /// Removes the oldest segments without pending messages; compacts the oldest one when
    /// too many are retained. On error, every pending message is still in a retained
    /// segment: one copied forward by a compaction that failed stays pointed at (and
    /// counted in) the segment it came from, which is kept.
    fn collect(&mut self) -> std::io::Result<()> {
        let active = self.log.active();
        if self.per_seg.range(..active).count() > KEEP_SEGMENTS
            && let Some((&oldest, &n)) = self.per_seg.iter().next()
            && n > 0
        {
            let path = seglog::segment_path(self.log.dir(), oldest);
            let (records, _) = seglog::read_segment(&path, oldest)?;
            let mut moved = Vec::new();
            for r in records {
                if r.kind != MSG {
                    continue;
                }
                let Ok(shared::envelope::Meta { id, .. }) = shared::envelope::peek(&r.payload)
                else {
                    continue;
                };
                if self.live.get(&id) == Some(&oldest) {
                    self.append(&id, &r.payload);
                    moved.push(id);
                }
            }
            let to = self.log.active();
            if let Err(e) = self.log.commit() {
                // The copies were dropped: the messages are only in `oldest` still.
                for id in &moved {
                    self.live.insert(*id, oldest);
                }
                if let Some(n) = self.per_seg.get_mut(&to) {
                    *n = n.saturating_sub(moved.len());
                }
                return Err(e);
            }
            self.per_seg.insert(oldest, 0);
            self.per_seg.entry(self.log.active()).or_default();
            tracing::debug!(
                segment = oldest,
                messages = moved.len(),
                "outbox segment compacted"
            );
        }
        while let Some((&oldest, &n)) = self.per_seg.iter().next() {
            if n > 0 || oldest >= self.log.active() {
                break;
            }
            // Done marks of later segments may refer to this one's messages: only the
            // oldest segments go, so a mark is never kept longer than its message.
            self.log.remove(oldest)?;
            self.per_seg.remove(&oldest);
        }
        Ok(())
    }
}

/// Writes a message to the dead-letter folder, durably.
fn write_dead_letter(dir: &std::path::Path, e: &Envelope) -> std::io::Result<PathBuf> {
    crate::state::prepare_dir(dir)?;
    let dest = dir.join(e.id.to_string());
    // Durable once this returns: `write_atomic` syncs the file and then the folder.
    util::write_atomic(&dest, &e.encode(), 0o600)?;
    Ok(dest)
}

async fn spooler<R: Routes>(
    mut spool: Spool,
    mut rx: mpsc::Receiver<SpoolReq>,
    ob: Arc<Outbox<R>>,
) {
    loop {
        let mut reqs = Vec::new();
        tokio::select! {
            _ = ob.cancel.cancelled() => return,
            r = rx.recv() => match r {
                Some(r) => reqs.push(r),
                None => return,
            },
            _ = ob.done_wake.notified() => {}
        }
        while let Ok(r) = rx.try_recv() {
            reqs.push(r);
            if reqs.len() >= 4096 {
                break;
            }
        }
        let done = std::mem::take(&mut *ob.done.lock().unwrap());
        let (sp, reqs, r) = tokio::task::spawn_blocking(move || {
            let all: Vec<(MessageId, &[u8])> = reqs
                .iter()
                .flat_map(|r| r.msgs.iter().map(|(id, b)| (*id, &b[..])))
                .collect();
            let r = spool
                .commit_batch(done, &all)
                .map_err(|e| format!("outbox: {e}"));
            (spool, reqs, r)
        })
        .await
        .expect("spool task");
        spool = sp;
        match r {
            Ok(stored) => {
                let added = stored.iter().filter(|s| **s == Stored::New).count();
                ob.pending.fetch_add(added, Ordering::Relaxed);
                let mut reqs = reqs;
                ob.activity
                    .record_many(reqs.iter_mut().flat_map(|q| std::mem::take(&mut q.events)));
                let mut it = stored.into_iter();
                for q in reqs {
                    let mine = it.by_ref().take(q.msgs.len()).collect();
                    let _ = q.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot write the outbox");
                for q in reqs {
                    let _ = q.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Delivers one batch to `ep` (reusing `conn` when it goes to the same place): the outcome
/// per message id, or an error when nothing can be said (retry all).
pub async fn deliver(
    ep: &Endpoint,
    batch: &[&Envelope],
    conn: &mut Option<FrameConn>,
    ack_timeout: Duration,
) -> Result<HashMap<MessageId, super::wire::Outcome>, String> {
    let Some(first) = batch.first() else {
        return Ok(HashMap::new());
    };
    let addr = match ep {
        Endpoint::SharedVolume { path } => {
            let md = Maildir::for_membrane(std::path::Path::new(path), &first.namespace, &first.to);
            let owned: Vec<(MessageId, Vec<u8>)> =
                batch.iter().map(|e| (e.id, e.encode())).collect();
            return tokio::task::spawn_blocking(move || {
                match md.check() {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(format!(
                            "Maildir {} does not exist (has the receiving agent started?)",
                            md.root().display()
                        ));
                    }
                    Err(e) => return Err(format!("Maildir {}: {e}", md.root().display())),
                    Ok(()) => {}
                }
                let refs: Vec<(MessageId, &[u8])> =
                    owned.iter().map(|(i, b)| (*i, &b[..])).collect();
                md.store_batch(&refs)
                    .map_err(|e| format!("writing into {}: {e}", md.root().display()))?;
                Ok(owned.iter().map(|(id, _)| (*id, Ok(()))).collect())
            })
            .await
            .map_err(|e| e.to_string())?;
        }
        Endpoint::Ipc { path } => Addr::Unix(PathBuf::from(path)),
        Endpoint::Tcp { address } => Addr::Tcp(address.clone()),
    };
    if conn.as_ref().is_none_or(|c| c.addr != addr) {
        *conn = Some(
            FrameConn::connect(&addr, Duration::from_secs(5))
                .await
                .map_err(|e| format!("cannot connect to {addr:?}: {e}"))?,
        );
    }
    let bytes: Vec<Vec<u8>> = batch.iter().map(|e| e.encode()).collect();
    let msgs: Vec<(MessageId, &[u8])> = batch
        .iter()
        .zip(&bytes)
        .map(|(e, b)| (e.id, &b[..]))
        .collect();
    // Only TCP receivers check signatures (ipc peers are checked by uid).
    let key = matches!(addr, Addr::Tcp(_))
        .then(super::auth::signer)
        .flatten();
    let c = conn.as_mut().expect("connected");
    match c.send_signed(&msgs, key.as_deref(), ack_timeout).await {
        Ok(a) => Ok(a),
        Err(e) => {
            *conn = None;
            Err(format!("{addr:?}: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::maildir::tests::envelope;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Routes to a shared-volume root; counts lookups.
    struct Fixed(Endpoint, AtomicUsize);
    impl Routes for Fixed {
        async fn endpoint(&self, _id: &MembraneId) -> Result<Endpoint, String> {
            self.1.fetch_add(1, Ordering::SeqCst);
            Ok(self.0.clone())
        }
    }

    fn setup(
        dir: &std::path::Path,
        ttl_ms: Option<u64>,
    ) -> (Arc<Outbox<Fixed>>, Maildir, Vec<Envelope>) {
        let shared = dir.join("shared");
        let routes = Arc::new(Fixed(
            Endpoint::SharedVolume {
                path: shared.to_string_lossy().into(),
            },
            AtomicUsize::new(0),
        ));
        let ob = Outbox::open(
            &dir.join("state"),
            routes,
            OutboxConfig::default(),
            Arc::new(Activity::new(dir.join("activity.log"))),
            CancellationToken::new(),
        )
        .unwrap();
        let now = ob.now_ms();
        let es = (0..3)
            .map(|n| {
                let mut e = envelope(n, &format!("m{n}"));
                e.expires_at = ttl_ms.map(|t| now + t);
                e
            })
            .collect();
        let md = Maildir::for_membrane(&shared, &"ns".parse().unwrap(), &"b".parse().unwrap());
        (ob, md, es)
    }

    #[tokio::test(start_paused = true)]
    async fn retries_with_backoff_until_the_receiver_exists() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, md, es) = setup(dir.path(), Some(3_600_000));
        let waits = ob.submit(es.clone(), true).await.unwrap();
        assert_eq!(ob.pending(), 3);
        // No Maildir yet: attempts at 0, 0.1, 0.3, 0.7, 1.5, 3.1 s ... (doubling).
        tokio::time::sleep(Duration::from_millis(3_000)).await;
        let attempts = ob.routes.1.load(Ordering::SeqCst);
        assert_eq!(attempts, 5, "attempts within 3 s");
        md.create().unwrap();
        for w in waits {
            w.await.unwrap().unwrap();
        }
        assert_eq!(
            md.list_new().unwrap(),
            es.iter().map(|e| e.id).collect::<Vec<_>>()
        );
        assert_eq!(ob.pending(), 0);
        let log = std::fs::read_to_string(dir.path().join("activity.log")).unwrap();
        assert_eq!(log.matches("\"event\":\"delivered\"").count(), 3);
        assert!(log.contains("\"event\":\"retry\""));
    }

    #[tokio::test(start_paused = true)]
    async fn a_resubmitted_id_is_queued_once() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, md, es) = setup(dir.path(), None);
        ob.submit(es.clone(), false).await.unwrap();
        // A client retrying with the same ids (its first answer was lost).
        ob.submit(es.clone(), false).await.unwrap();
        md.create().unwrap();
        tokio::time::timeout(Duration::from_secs(60), async {
            while ob.pending() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(md.list_new().unwrap().len(), 3);
        let log = std::fs::read_to_string(dir.path().join("activity.log")).unwrap();
        assert_eq!(log.matches("\"event\":\"delivered\"").count(), 3, "{log}");
    }

    /// Two `send --wait` of the same id (a client retrying while the first still waits):
    /// both learn the outcome (before: the second waiter replaced the first, which
    /// reported a failure at once though the message was then delivered).
    #[tokio::test(start_paused = true)]
    async fn every_waiter_of_a_resubmitted_id_learns_the_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, md, es) = setup(dir.path(), None);
        let first = ob.submit(es[..1].to_vec(), true).await.unwrap();
        let second = ob.submit(es[..1].to_vec(), true).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        md.create().unwrap();
        for w in first.into_iter().chain(second) {
            tokio::time::timeout(Duration::from_secs(60), w)
                .await
                .expect("the waiter is told")
                .expect("the waiter is kept")
                .unwrap();
        }
        assert_eq!(md.list_new().unwrap(), vec![es[0].id]);
        assert!(ob.waiters.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn expired_messages_go_to_the_dead_letter_folder() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _md, es) = setup(dir.path(), Some(60_000));
        let waits = ob.submit(es.clone(), true).await.unwrap();
        let t0 = tokio::time::Instant::now();
        for w in waits {
            let e = w.await.unwrap().unwrap_err();
            assert!(e.contains("expired"), "{e}");
        }
        // Expired after the TTL (60 s), not before; within one backoff step (30 s max).
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_secs(60) && waited <= Duration::from_secs(91),
            "{waited:?}"
        );
        assert_eq!(ob.pending(), 0);
        let dead: Vec<_> = std::fs::read_dir(dir.path().join("state/deadletter"))
            .unwrap()
            .collect();
        assert_eq!(dead.len(), 3);
        let log = std::fs::read_to_string(dir.path().join("activity.log")).unwrap();
        assert_eq!(log.matches("\"event\":\"dead_letter\"").count(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_outbox_delivers_what_was_spooled() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, md, es) = setup(dir.path(), None);
        ob.submit(es.clone(), false).await.unwrap();
        ob.cancel.cancel();
        drop(ob);
        md.create().unwrap();
        let (ob2, _, _) = setup(dir.path(), None);
        tokio::time::timeout(Duration::from_secs(5), async {
            while md.list_new().unwrap().len() < 3 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        while ob2.pending() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            md.list_new().unwrap(),
            es.iter().map(|e| e.id).collect::<Vec<_>>()
        );
    }

    #[test]
    fn spool_segments_are_removed_and_a_stuck_message_is_compacted_forward() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("outbox");
        let (mut sp, pending) = Spool::open(&d, 4096).unwrap();
        assert!(pending.is_empty());
        let stuck = envelope(0, &"s".repeat(1000));
        sp.store(&[(stuck.id, &stuck.encode())]).unwrap();
        // 200 messages of ~1 KiB (about 50 segments), each delivered after its batch.
        for n in 1..=200 {
            let e = envelope(n, &"m".repeat(1000));
            assert_eq!(sp.store(&[(e.id, &e.encode())]).unwrap(), vec![Stored::New]);
            // A resubmitted pending id is a duplicate.
            assert_eq!(
                sp.store(&[(e.id, &e.encode())]).unwrap(),
                vec![Stored::Duplicate]
            );
            sp.done(e.id);
            sp.collect().unwrap();
            let segs = seglog::list_segments(&d).unwrap().len();
            assert!(segs <= KEEP_SEGMENTS + 2, "{segs} segments retained");
        }
        assert_eq!(sp.live.len(), 1);
        sp.store(&[]).unwrap(); // the last done mark (written with the next commit)
        drop(sp);
        // Reopened: only the stuck message is pending.
        let (sp, pending) = Spool::open(&d, 4096).unwrap();
        assert_eq!(
            pending.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![stuck.id]
        );
        assert_eq!(pending[0], stuck);
        assert_eq!(sp.live.len(), 1);
    }

    /// A compaction whose commit fails (ENOSPC, EIO) after the messages it copied were
    /// stored: the store is reported done (before: an error to every submitter of a
    /// durable batch), and the copied messages stay in the old segment, which is kept
    /// (before: they pointed at the dropped copies, the old segment was removed by the
    /// next collection, and they were lost at the next restart).
    #[test]
    fn a_failed_compaction_keeps_the_only_copy_and_does_not_fail_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("outbox");
        let (mut sp, _) = Spool::open(&d, 4096).unwrap();
        let stuck = envelope(0, &"s".repeat(1000));
        sp.store(&[(stuck.id, &stuck.encode())]).unwrap();
        let oldest = sp.live[&stuck.id];
        // Delivered messages fill segments until the oldest (holding `stuck`) is due to be
        // compacted by the next collection.
        let mut n = 1;
        while sp.per_seg.range(..sp.log.active()).count() <= KEEP_SEGMENTS {
            let e = envelope(n, &"m".repeat(1000));
            sp.store(&[(e.id, &e.encode())]).unwrap();
            sp.done(e.id);
            n += 1;
        }
        let e = envelope(n, "new");
        // The batch is made durable; the compaction's commit then fails.
        sp.log.faults.syncs.extend([false, true]);
        assert_eq!(
            sp.commit_batch(Vec::new(), &[(e.id, &e.encode())]).unwrap(),
            vec![Stored::New]
        );
        assert_eq!(sp.live[&stuck.id], oldest);
        assert!(seglog::segment_path(&d, oldest).exists());
        // The disk works again: the next collection copies it forward.
        sp.commit_batch(vec![e.id], &[]).unwrap();
        assert_ne!(sp.live[&stuck.id], oldest);
        assert!(!seglog::segment_path(&d, oldest).exists());
        sp.store(&[]).unwrap(); // the last done mark
        drop(sp);
        let (_, pending) = Spool::open(&d, 4096).unwrap();
        assert_eq!(pending, vec![stuck]);
    }

    #[test]
    fn spool_recovers_done_marks_and_imports_the_old_format() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("outbox");
        // The previous format: files in outbox/new/.
        let old = Maildir::new(&d);
        old.create().unwrap();
        let e0 = envelope(0, "old");
        old.store_batch(&[(e0.id, &e0.encode())]).unwrap();
        let (mut sp, pending) = Spool::open(&d, 1 << 20).unwrap();
        assert_eq!(pending, vec![e0.clone()]);
        assert!(old.list_new().unwrap().is_empty());
        let e1 = envelope(1, "new");
        sp.store(&[(e1.id, &e1.encode())]).unwrap();
        sp.done(e0.id);
        sp.store(&[]).unwrap(); // commits the done mark
        drop(sp);
        let (_, pending) = Spool::open(&d, 1 << 20).unwrap();
        assert_eq!(pending, vec![e1]);
    }

    #[tokio::test]
    async fn submit_waits_for_a_long_queue_only_while_the_receiver_takes_messages() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, md, _) = setup(dir.path(), None);
        let many = |from: u64, n: u64| -> Vec<Envelope> {
            (from..from + n).map(|i| envelope(i, "x")).collect()
        };
        // No receiver yet: nothing waits, however long the queue.
        ob.submit(many(0, 600), false).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        tokio::time::timeout(Duration::from_secs(5), ob.submit(many(600, 10), false))
            .await
            .expect("no backpressure while the receiver is unreachable")
            .unwrap();
        // The receiver appears: the queue drains; once it takes messages, a submit behind
        // a queue of MAX_QUEUED or more waits until the queue is shorter.
        md.create().unwrap();
        tokio::time::timeout(Duration::from_secs(30), async {
            while ob.pending() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        ob.submit(many(1000, MAX_QUEUED as u64 + 100), false)
            .await
            .unwrap();
        let lane = ob.workers.lock().unwrap().values().next().unwrap().clone();
        ob.submit(many(5000, 1), false).await.unwrap();
        assert!(lane.queued.load(Ordering::Relaxed) <= MAX_QUEUED + 1);
        assert!(md.list_new().unwrap().len() >= 610 + 100);
    }
}
