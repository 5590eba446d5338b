//! Frames over Unix and TCP sockets: the receiving side ([`Inbox`] and its listeners, with
//! group commit into the membrane's Maildir before any ACK) and the sending side
//! ([`FrameConn`]: one connection, pipelined batches).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use shared::envelope::{self, DecodeError, Frame, MessageId, Refusal};
use shared::name::{MembraneId, NamespaceName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::inlog::{self, InboxLog};
use super::maildir::{Maildir, Stored};
use crate::activity::Activity;

/// Largest batch handed to one group commit.
const MAX_COMMIT: usize = 4096;

/// A group commit takes no more requests once it holds this many bytes of messages.
const MAX_COMMIT_BYTES: usize = 16 * 1024 * 1024;

/// Bytes of received messages an inbox holds between its connections and its disk (handed
/// to the committer and not yet committed, over every connection): past it, connections
/// wait before handing more, so they stop reading and their senders wait (TCP flow
/// control) instead of a slow disk filling the agent's memory.
pub const INBOX_BYTES: usize = 64 * 1024 * 1024;

// A message of the largest body fits in the budget (else its connection would wait for
// ever), and the budget in a semaphore's permits.
const _: () = assert!(super::MAX_BODY_LIMIT + envelope::HEADER_ROOM <= INBOX_BYTES);
const _: () = assert!(INBOX_BYTES <= u32::MAX as usize);

/// How far in the future a message's `sent_at` may be (clock skew between hosts).
pub const MAX_CLOCK_SKEW_MS: u64 = 3_600_000;

/// Bounds on the connections of a listener: a peer can hold neither file descriptors nor
/// buffers for long.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most connections served at once. When full, a new connection takes the slot of the
    /// one idle the longest; when every one is reading a frame, the new one is accepted and
    /// closed at once (it does not wait in the kernel's backlog, and holds no descriptor).
    pub max_connections: usize,
    /// A connection with no frame in progress is closed after this long without a byte.
    pub idle_timeout: Duration,
    /// The idle timeout from three quarters of `max_connections` on; when the listener is
    /// full, the connection idle the longest is closed to admit a new one
    /// ([`super::conns`]).
    pub pressure_idle_timeout: Duration,
    /// A frame must be read whole within this long of its first byte (slow senders).
    pub frame_deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            idle_timeout: Duration::from_secs(60),
            pressure_idle_timeout: Duration::from_secs(5),
            frame_deadline: Duration::from_secs(30),
        }
    }
}

impl Limits {
    /// The default limits, with at most a quarter of the `nofile` soft limit (and at most
    /// 1,024: a sender agent holds one connection per destination) in relay connections (the rest stays for the registry client, the control socket and files).
    pub fn for_fd_limit(nofile: u64) -> Limits {
        Limits {
            max_connections: (nofile / 4).clamp(16, 1024) as usize,
            ..Limits::default()
        }
    }
}

/// A checked message on its way to the inbox, with what [`Inbox::check`] read of its
/// header (so the committer does not parse it again).
struct Incoming {
    id: MessageId,
    sent_at: u64,
    expires_at: Option<u64>,
    bytes: Vec<u8>,
}

struct CommitReq {
    msgs: Vec<Incoming>,
    /// Bytes of `msgs`.
    bytes: usize,
    reply: oneshot::Sender<Result<Vec<Stored>, String>>,
    /// Their share of [`INBOX_BYTES`], given back when the request is dropped (committed).
    _held: tokio::sync::OwnedSemaphorePermit,
}

/// The receiving side: validates messages, stores them in the membrane's Maildir as group
/// commits, logs them and wakes `agent recv --follow`.
pub struct Inbox {
    /// The membrane's Maildir.
    pub maildir: Maildir,
    /// With a log (ipc, tcp): messages past their expiry are refused, as their ids are
    /// forgotten then.
    expiring: bool,
    id: MembraneId,
    namespace: NamespaceName,
    max_body: usize,
    commits: mpsc::Sender<CommitReq>,
    /// Bytes of messages that may be handed to the committer and not yet committed: the
    /// size of `budget`.
    budget_bytes: usize,
    budget: Arc<tokio::sync::Semaphore>,
    /// Bumped after each stored batch.
    pub arrivals: watch::Sender<u64>,
    /// Set on a TCP inbox: messages must carry their sender's signature, checked against
    /// its registered public key ([`super::senders`]).
    keys: std::sync::OnceLock<Arc<super::senders::SenderKeys>>,
    /// Messages refused as `unauthenticated`.
    unauthenticated: std::sync::atomic::AtomicU64,
}

impl Inbox {
    /// An inbox for membrane `id`, and the committer task to spawn. With `log`, messages
    /// go into it (ipc, tcp); else into the Maildir.
    pub fn new(
        maildir: Maildir,
        log: Option<InboxLog>,
        id: MembraneId,
        namespace: NamespaceName,
        max_body: usize,
        activity: Arc<Activity>,
    ) -> (
        Arc<Inbox>,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        Inbox::with_budget(maildir, log, id, namespace, max_body, activity, INBOX_BYTES)
    }

    /// [`Inbox::new`] holding at most `budget_bytes` of messages on their way to the disk
    /// (at least one largest message).
    fn with_budget(
        maildir: Maildir,
        log: Option<InboxLog>,
        id: MembraneId,
        namespace: NamespaceName,
        max_body: usize,
        activity: Arc<Activity>,
        budget_bytes: usize,
    ) -> (
        Arc<Inbox>,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let budget_bytes = budget_bytes
            .min(INBOX_BYTES)
            .max(max_body + envelope::HEADER_ROOM);
        let (tx, rx) = mpsc::channel(1024);
        let (arrivals, _) = watch::channel(0);
        let inbox = Arc::new(Inbox {
            maildir,
            expiring: log.is_some(),
            id,
            namespace,
            max_body,
            commits: tx,
            budget_bytes,
            budget: Arc::new(tokio::sync::Semaphore::new(budget_bytes)),
            arrivals,
            keys: std::sync::OnceLock::new(),
            unauthenticated: std::sync::atomic::AtomicU64::new(0),
        });
        let store = match log {
            Some(l) => Store::Log(Box::new(l)),
            None => Store::Maildir(inbox.maildir.clone()),
        };
        let task = committer(store, rx, inbox.arrivals.clone(), activity);
        (inbox, task)
    }

    /// From now on, messages over TCP must carry their sender's signature, checked with
    /// `keys` (`agent run`; see [`super::auth`]), once the namespace authenticates senders.
    pub fn require_auth(&self, keys: Arc<super::senders::SenderKeys>) {
        let _ = self.keys.set(keys);
    }

    /// Messages refused because their sender was not authenticated.
    pub fn unauthenticated(&self) -> u64 {
        self.unauthenticated
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Largest frame accepted.
    pub fn max_frame(&self) -> usize {
        self.max_body + envelope::HEADER_ROOM
    }

    /// Checks one message's header: what it says, or the refusal to send back.
    fn check(&self, bytes: &[u8]) -> Result<envelope::Meta, Refusal> {
        let meta = envelope::peek(bytes).map_err(|e| Refusal {
            id: None,
            code: "bad_message".into(),
            message: e.to_string(),
        })?;
        let (id, to, ns, len) = (meta.id, &meta.to, &meta.namespace, meta.body_len);
        let refuse = |code: &str, message: String| Refusal {
            id: Some(id),
            code: code.into(),
            message,
        };
        if *to != self.id || *ns != self.namespace {
            return Err(refuse(
                "wrong_recipient",
                format!(
                    "this is {} in {}, not {to} in {ns}",
                    self.id, self.namespace
                ),
            ));
        }
        if len > self.max_body {
            return Err(refuse(
                "too_large",
                format!(
                    "body of {len} bytes is over the limit of {} bytes",
                    self.max_body
                ),
            ));
        }
        let now = crate::util::unix_millis(std::time::SystemTime::now());
        check_times(meta.sent_at, meta.expires_at, now)
            .map_err(|why| refuse("bad_message", why))?;
        if self.expiring && inlog::forget_at(meta.sent_at, meta.expires_at, 0) <= now {
            return Err(refuse(
                "expired",
                "the message expired before it arrived".to_string(),
            ));
        }
        Ok(meta)
    }
}

/// Checks a message's times against the clock (`now`, ms since the epoch): why it is
/// refused, if it is. The id of a stored message is remembered until it expires: a far
/// expiry (or sending time) would pin it, and the memory, for ever; such times are also
/// beyond what can be shown (RFC 3339 stops at the year 9999). Used for frames
/// ([`Inbox::check`]) and for the files of a shared-volume Maildir (`agent recv`).
pub fn check_times(sent_at: u64, expires_at: Option<u64>, now: u64) -> Result<(), String> {
    if sent_at > now.saturating_add(MAX_CLOCK_SKEW_MS) {
        return Err(format!(
            "sent_at is more than {} s in the future",
            MAX_CLOCK_SKEW_MS / 1000
        ));
    }
    if expires_at.is_some_and(|x| {
        x > now.saturating_add(super::MAX_MESSAGE_TTL.as_millis() as u64 + MAX_CLOCK_SKEW_MS)
    }) {
        return Err(format!(
            "expires_at is more than {} s in the future",
            super::MAX_MESSAGE_TTL.as_secs()
        ));
    }
    Ok(())
}

enum Store {
    Maildir(Maildir),
    Log(Box<InboxLog>),
}

impl Store {
    fn store(&mut self, msgs: &[&Incoming]) -> std::io::Result<Vec<Stored>> {
        match self {
            Store::Maildir(md) => {
                let msgs: Vec<(MessageId, &[u8])> =
                    msgs.iter().map(|m| (m.id, &m.bytes[..])).collect();
                md.store_batch(&msgs)
            }
            Store::Log(log) => {
                let msgs: Vec<(MessageId, &[u8], u64, Option<u64>)> = msgs
                    .iter()
                    .map(|m| (m.id, &m.bytes[..], m.sent_at, m.expires_at))
                    .collect();
                log.store(&msgs)
            }
        }
    }

    fn collect(&mut self) {
        if let Store::Log(log) = self {
            let now = crate::util::unix_millis(std::time::SystemTime::now());
            if let Err(e) = log.collect(now) {
                tracing::warn!(error = %e, "inbox log housekeeping failed");
            }
        }
    }
}

async fn committer(
    mut store: Store,
    mut rx: mpsc::Receiver<CommitReq>,
    arrivals: watch::Sender<u64>,
    activity: Arc<Activity>,
) {
    // Housekeeping of the log (nothing to do for a Maildir: no timer wakes it up idle).
    let housekeeping = matches!(store, Store::Log(_));
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut last_collect = std::time::Instant::now();
    loop {
        let first = tokio::select! {
            r = rx.recv() => match r { Some(r) => r, None => return },
            _ = tick.tick(), if housekeeping => {
                let (s, ()) = tokio::task::spawn_blocking(move || { store.collect(); (store, ()) })
                    .await
                    .expect("collect task");
                store = s;
                last_collect = std::time::Instant::now();
                continue;
            }
        };
        let mut n = first.msgs.len();
        let mut bytes = first.bytes;
        let mut reqs = vec![first];
        while n < MAX_COMMIT && bytes < MAX_COMMIT_BYTES {
            match rx.try_recv() {
                Ok(r) => {
                    n += r.msgs.len();
                    bytes += r.bytes;
                    reqs.push(r);
                }
                Err(_) => break,
            }
        }
        let t0 = std::time::Instant::now();
        let collect_now = last_collect.elapsed() > Duration::from_secs(1);
        let (s, reqs, result) = tokio::task::spawn_blocking(move || {
            let all: Vec<&Incoming> = reqs.iter().flat_map(|r| &r.msgs).collect();
            let result = store.store(&all).map_err(|e| e.to_string());
            if collect_now {
                store.collect();
            }
            (store, reqs, result)
        })
        .await
        .expect("store task");
        store = s;
        if collect_now {
            last_collect = std::time::Instant::now();
        }
        tracing::debug!(
            messages = n,
            requests = reqs.len(),
            ms = t0.elapsed().as_millis() as u64,
            ok = result.is_ok(),
            "inbox commit"
        );
        match result {
            Ok(stored) => {
                let mut it = stored.into_iter();
                let mut events = Vec::new();
                let mut replies = Vec::with_capacity(reqs.len());
                for r in reqs {
                    let mine: Vec<Stored> = it.by_ref().take(r.msgs.len()).collect();
                    for (Incoming { id, .. }, s) in r.msgs.iter().zip(&mine) {
                        events.push(if *s == Stored::New {
                            (
                                "received",
                                "message stored in the inbox".to_string(),
                                json!({"id": id.to_string()}),
                            )
                        } else {
                            (
                                "duplicate",
                                "duplicate message dropped".to_string(),
                                json!({"id": id.to_string()}),
                            )
                        });
                    }
                    replies.push((r.reply, mine));
                }
                let any = events.iter().any(|e| e.0 == "received");
                activity.record_many(events);
                for (reply, mine) in replies {
                    let _ = reply.send(Ok(mine));
                }
                if any {
                    arrivals.send_modify(|v| *v += 1);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot store messages in the inbox");
                for r in reqs {
                    let _ = r.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Binds the ipc socket (mode 0600; a stale socket file is replaced).
pub async fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another agent listens on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves frames on a Unix socket until `cancel` (peers of another uid than ours or root
/// are refused).
pub async fn serve_unix(
    listener: UnixListener,
    inbox: Arc<Inbox>,
    limits: Limits,
    cancel: CancellationToken,
) {
    let table = super::conns::ConnTable::new(limits);
    loop {
        let s = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { tracing::warn!(error = %e, "ipc accept failed"); tokio::time::sleep(Duration::from_millis(100)).await; continue; }
            },
        };
        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
        let ok = getsockopt(&s, PeerCredentials)
            .map(|c| c.uid() == 0 || c.uid() == nix::unistd::geteuid().as_raw())
            .unwrap_or(false);
        if !ok {
            tracing::warn!("ipc connection from another user refused");
            continue;
        }
        let Some(slot) = admit(&table, &cancel, "ipc") else {
            continue;
        };
        let inbox = inbox.clone();
        tokio::spawn(connection(s, inbox, limits, false, slot));
    }
}

/// Serves frames over TCP until `cancel`.
pub async fn serve_tcp(
    listener: TcpListener,
    inbox: Arc<Inbox>,
    limits: Limits,
    cancel: CancellationToken,
) {
    let table = super::conns::ConnTable::new(limits);
    loop {
        let s = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { tracing::warn!(error = %e, "tcp accept failed"); tokio::time::sleep(Duration::from_millis(100)).await; continue; }
            },
        };
        let Some(slot) = admit(&table, &cancel, "tcp") else {
            continue;
        };
        let _ = s.set_nodelay(true);
        let inbox = inbox.clone();
        let auth = inbox.keys.get().is_some();
        tokio::spawn(connection(s, inbox, limits, auth, slot));
    }
}

/// A slot for a new connection (closing idle ones to make room), logging at powers of two
/// how many were closed to make room or refused.
fn admit(
    table: &Arc<super::conns::ConnTable>,
    cancel: &CancellationToken,
    kind: &str,
) -> Option<super::conns::Slot> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static EVICTED: AtomicU64 = AtomicU64::new(0);
    static REFUSED: AtomicU64 = AtomicU64::new(0);
    let (slot, closed) = table.admit(cancel);
    if closed > 0 {
        let before = EVICTED.fetch_add(closed as u64, Ordering::Relaxed);
        let after = before + closed as u64;
        if (before + 1..=after).any(u64::is_power_of_two) {
            tracing::warn!(
                kind,
                evicted = after,
                "too many relay connections; closing the longest-idle ones"
            );
        }
    }
    if slot.is_none() {
        let n = REFUSED.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(
                kind,
                refused = n,
                "too many relay connections, all reading a frame; closing new ones"
            );
        }
    }
    slot
}

/// Bytes of refusals a connection may have queued for its writer: a peer that sends tiny
/// bad frames (each answered by a NACK) and never reads cannot make the agent hold more.
const ANSWER_BYTES: usize = 1 << 20;

enum Answer {
    /// Encoded NACK frames, holding their share of [`ANSWER_BYTES`] until written.
    Now(Vec<u8>, tokio::sync::OwnedSemaphorePermit),
    Later(
        Vec<MessageId>,
        oneshot::Receiver<Result<Vec<Stored>, String>>,
    ),
}

/// Checks a message's signature against its sender's registered key (when `required`,
/// i.e. on TCP, and the namespace authenticates senders).
async fn authenticated(
    inbox: &Inbox,
    required: bool,
    meta: envelope::Meta,
    bytes: &[u8],
    sig: &Sig,
) -> Result<envelope::Meta, Refusal> {
    use super::auth::{self, KeyState};
    let keys = match inbox.keys.get() {
        Some(k) if required => k,
        _ => return Ok(meta),
    };
    let refuse = |code: &str, message: &str| Refusal {
        id: Some(meta.id),
        code: code.into(),
        message: message.into(),
    };
    let from = meta.from.clone();
    let r = match auth::current() {
        KeyState::Open => Ok(meta),
        KeyState::Unknown => Err(refuse(
            "unavailable",
            "the receiving agent has no relay key yet (not registered)",
        )),
        KeyState::Key(_) => match sig {
            Sig::Ed25519(sig) => keys
                .check(meta.id, &meta.from, bytes, sig)
                .await
                .map(|()| meta),
            Sig::Hmac(_) => Err(refuse(
                "unauthenticated",
                "this relay requires the sender's own signature (frame kind 5); \
                 the namespace key alone does not identify a sender",
            )),
            Sig::None => Err(refuse(
                "unauthenticated",
                "unsigned message: this relay requires the sender's signature",
            )),
        },
    };
    if let Err(refusal) = &r
        && refusal.code == "unauthenticated"
    {
        let n = inbox
            .unauthenticated
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if n.is_power_of_two() {
            tracing::warn!(from = %from, refused = n, reason = %refusal.message, "relay message refused: sender not authenticated");
        }
    }
    r
}

/// One connection: the reader validates frames and hands batches to the committer; the
/// writer sends ACK/NACK in order as commits finish. Reading goes on while a commit runs,
/// so the next commit gets a bigger batch. A peer that stops reading is closed once a write
/// makes no progress for `frame_deadline`; queued refusals are bounded by [`ANSWER_BYTES`],
/// messages on their way to the disk by the inbox's [`INBOX_BYTES`] (reading waits).
async fn connection<S>(
    stream: S,
    inbox: Arc<Inbox>,
    limits: Limits,
    authenticate: bool,
    slot: super::conns::Slot,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Answer>(256);
    let budget = Arc::new(tokio::sync::Semaphore::new(ANSWER_BYTES));
    let write_limit = limits.frame_deadline;
    let writer = tokio::spawn(async move {
        let mut out = Vec::new();
        while let Some(a) = rx.recv().await {
            out.clear();
            let mut _permit = None;
            match a {
                Answer::Now(bytes, permit) => {
                    out = bytes;
                    _permit = Some(permit);
                }
                Answer::Later(ids, done) => match done.await {
                    Ok(Ok(_)) => ids
                        .iter()
                        .for_each(|id| Frame::Ack(*id).encode_into(&mut out)),
                    other => {
                        let msg = match other {
                            Ok(Err(e)) => e,
                            _ => "inbox stopped".into(),
                        };
                        for id in ids {
                            Frame::Nack(Refusal {
                                id: Some(id),
                                code: "unavailable".into(),
                                message: msg.clone(),
                            })
                            .encode_into(&mut out);
                        }
                        // Storage failed: tell the sender, then close (it retries later).
                        let _ = tokio::time::timeout(write_limit, w.write_all(&out)).await;
                        return;
                    }
                },
            }
            if !matches!(
                tokio::time::timeout(write_limit, w.write_all(&out)).await,
                Ok(Ok(()))
            ) {
                tracing::debug!("relay peer does not read its answers; closing");
                return;
            }
        }
    });
    // Queues refusals for the writer within the byte budget; false: the connection ends.
    let refuse = |now: Vec<Frame>| {
        let (tx, budget, closed) = (tx.clone(), budget.clone(), slot.closed().clone());
        async move {
            let mut out = Vec::new();
            now.iter().for_each(|f| f.encode_into(&mut out));
            let cost = out.len().clamp(1, ANSWER_BYTES) as u32;
            let queued = async {
                let permit = budget.acquire_many_owned(cost).await.ok()?;
                tx.send(Answer::Now(out, permit)).await.ok()
            };
            tokio::select! {
                _ = closed.cancelled() => false,
                r = queued => r.is_some(),
            }
        }
    };
    let mut reader = FrameReader::new(inbox.max_frame(), inbox.max_body);
    let mut chunk = vec![0u8; 64 * 1024];
    // When the frame being read started (None: between frames).
    let mut frame_start: Option<tokio::time::Instant> = None;
    'outer: loop {
        let deadline = match frame_start {
            Some(t) => t + limits.frame_deadline,
            None => tokio::time::Instant::now() + slot.idle_timeout(),
        };
        let n = tokio::select! {
            _ = slot.closed().cancelled() => break,
            _ = tokio::time::sleep_until(deadline) => {
                tracing::debug!(in_frame = frame_start.is_some(), "relay connection timed out; closing it");
                break;
            }
            r = r.read(&mut chunk) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
        };
        if frame_start.is_none() {
            frame_start = Some(tokio::time::Instant::now());
            slot.set_busy(true);
        }
        reader.push(&chunk[..n]);
        let mut batch = Vec::new();
        let mut now = Vec::new();
        let mut completed = 0usize;
        while let Some(read) = reader.next() {
            completed += 1;
            match read {
                Read::Msg(bytes, sig) => match match inbox.check(&bytes) {
                    Ok(meta) => authenticated(&inbox, authenticate, meta, &bytes, &sig).await,
                    Err(r) => Err(r),
                } {
                    Ok(meta) => batch.push(Incoming {
                        id: meta.id,
                        sent_at: meta.sent_at,
                        expires_at: meta.expires_at,
                        bytes,
                    }),
                    Err(refusal) => now.push(Frame::Nack(refusal)),
                },
                Read::Refuse(refusal) => now.push(Frame::Nack(refusal)),
                Read::Fatal(refusal) => {
                    tracing::debug!(error = %refusal.message, "bad frame; closing the connection");
                    now.push(Frame::Nack(refusal));
                    refuse(now).await;
                    break 'outer;
                }
            }
        }
        if !now.is_empty() && !refuse(now).await {
            break;
        }
        // Handed to the committer in parts within the inbox's byte budget, each waiting for
        // its share (holding none while it waits, so connections cannot starve each other).
        let mut batch = batch.into_iter().peekable();
        while batch.peek().is_some() {
            let mut msgs = Vec::new();
            let mut bytes = 0;
            while let Some(m) =
                batch.next_if(|m| msgs.is_empty() || bytes + m.bytes.len() <= inbox.budget_bytes)
            {
                bytes += m.bytes.len();
                msgs.push(m);
            }
            let ids: Vec<MessageId> = msgs.iter().map(|m| m.id).collect();
            let (reply, done) = oneshot::channel();
            let handed = async {
                // A message is at most `max_frame` bytes, within the budget: this ends.
                let held = inbox
                    .budget
                    .clone()
                    .acquire_many_owned(bytes.clamp(1, inbox.budget_bytes) as u32)
                    .await
                    .ok()?;
                let req = CommitReq {
                    msgs,
                    bytes,
                    reply,
                    _held: held,
                };
                inbox.commits.send(req).await.ok()?;
                tx.send(Answer::Later(ids, done)).await.ok()
            };
            let handed = tokio::select! {
                _ = slot.closed().cancelled() => None,
                r = handed => r,
            };
            if handed.is_none() {
                break 'outer;
            }
        }
        if !reader.in_frame() {
            frame_start = None;
            slot.set_busy(false);
        } else if completed > 0 {
            // The deadline is per frame: the partial frame left over started now (and the
            // time spent waiting on our own backpressure above does not count).
            frame_start = Some(tokio::time::Instant::now());
        }
    }
    drop(tx);
    tracing::debug!("relay connection closed by the sender");
    let _ = writer.await;
}

/// What [`FrameReader::next`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Read {
    /// A MSG frame's payload (a message in the file format, not checked yet), with the
    /// sender's signature when it came in a signed frame.
    Msg(Vec<u8>, Sig),
    /// A NACK to send back (an oversized frame was skipped); the connection goes on.
    Refuse(Refusal),
    /// A NACK to send back, then close the connection (a frame that cannot be read).
    Fatal(Refusal),
}

/// The signature a message came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Sig {
    /// None (frame kind 1).
    None,
    /// An HMAC tag under the namespace key (kind 4): no longer accepted on its own.
    Hmac([u8; 32]),
    /// The sender's Ed25519 signature (kind 5).
    Ed25519([u8; 64]),
}

/// The reading side of a receiver's connection, without I/O: frames out of the bytes
/// received so far. Holds at most one frame of `max_frame` bytes (plus the last chunk
/// pushed); an oversized frame is skipped as it streams by, keeping only its first 4 KiB
/// to name its id in the refusal. ACK and NACK frames from a sender are read and ignored.
pub(crate) struct FrameReader {
    buf: Vec<u8>,
    /// Skipping an oversized frame: bytes left, its first bytes (to read the id), and the
    /// length of the signature before the message in them (signed kinds).
    skip: Option<(usize, Vec<u8>, usize)>,
    max_frame: usize,
    max_body: usize,
}

impl FrameReader {
    /// A reader of frames of at most `max_frame` bytes (`max_body`: for the refusal text).
    pub(crate) fn new(max_frame: usize, max_body: usize) -> Self {
        FrameReader {
            buf: Vec::with_capacity(64 * 1024),
            skip: None,
            max_frame,
            max_body,
        }
    }

    /// Appends received bytes.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Whether a frame is partly received (or being skipped).
    pub(crate) fn in_frame(&self) -> bool {
        !self.buf.is_empty() || self.skip.is_some()
    }

    /// Bytes held (received, not yet read or skipped).
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len() + self.skip.as_ref().map_or(0, |(_, head, _)| head.len())
    }

    /// The next thing read; None: more bytes are needed.
    pub(crate) fn next(&mut self) -> Option<Read> {
        loop {
            if let Some((left, head, sig)) = self.skip.as_mut() {
                let k = (*left).min(self.buf.len());
                let keep = 4096 + *sig;
                if head.len() < keep {
                    head.extend_from_slice(&self.buf[..k.min(keep - head.len())]);
                }
                self.buf.drain(..k);
                *left -= k;
                if *left > 0 {
                    return None;
                }
                let (head, sig) = (std::mem::take(head), *sig);
                self.skip = None;
                // The message starts after the signature of a signed frame.
                let id = head
                    .get(sig..)
                    .and_then(|h| h.strip_prefix(envelope::FILE_MAGIC))
                    .and_then(|h| h.strip_prefix(b"{\"id\":\""))
                    .and_then(|h| h.get(..32))
                    .and_then(|s| std::str::from_utf8(s).ok()?.parse().ok());
                return Some(Read::Refuse(Refusal {
                    id,
                    code: "too_large".into(),
                    message: format!("message over the limit of {} bytes", self.max_body),
                }));
            }
            return match Frame::take(&mut self.buf, self.max_frame) {
                Ok(None) => None,
                Ok(Some(Frame::Msg(bytes))) => Some(Read::Msg(bytes, Sig::None)),
                Ok(Some(Frame::Signed(tag, bytes))) => Some(Read::Msg(bytes, Sig::Hmac(tag))),
                Ok(Some(Frame::Ed25519(sig, bytes))) => Some(Read::Msg(bytes, Sig::Ed25519(sig))),
                Ok(Some(_)) => continue, // ACK/NACK from a sender: ignored
                Err(DecodeError::TooLarge(len)) if self.buf.len() >= 6 => {
                    let sig = match self.buf[5] {
                        k if k == envelope::FrameKind::SignedMsg as u8 => 32,
                        k if k == envelope::FrameKind::Ed25519Msg as u8 => 64,
                        _ => 0,
                    };
                    self.buf.drain(..6);
                    self.skip = Some((len - 2, Vec::new(), sig));
                    continue;
                }
                Err(DecodeError::TooLarge(_)) => None,
                Err(e) => Some(Read::Fatal(Refusal {
                    id: None,
                    code: "bad_frame".into(),
                    message: e.to_string(),
                })),
            };
        }
    }
}

/// Where a sender connects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Addr {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP `host:port`.
    Tcp(String),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A sender's connection to one receiving agent.
pub struct FrameConn {
    stream: Box<dyn Io>,
    buf: Vec<u8>,
    /// Where it goes.
    pub addr: Addr,
}

/// What a receiver said about one message.
pub type Outcome = Result<(), Refusal>;

impl FrameConn {
    /// Connects (within `timeout`).
    pub async fn connect(addr: &Addr, timeout: Duration) -> std::io::Result<FrameConn> {
        let fut = async {
            Ok::<Box<dyn Io>, std::io::Error>(match addr {
                Addr::Unix(p) => Box::new(UnixStream::connect(p).await?),
                Addr::Tcp(a) => {
                    let s = TcpStream::connect(a.as_str()).await?;
                    s.set_nodelay(true)?;
                    Box::new(s)
                }
            })
        };
        let stream = tokio::time::timeout(timeout, fut).await.map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
        })??;
        Ok(FrameConn {
            stream,
            buf: Vec::new(),
            addr: addr.clone(),
        })
    }

    /// Sends messages (id, bytes in the file format) pipelined and waits up to `timeout`
    /// for every answer. An error means the connection is unusable (retry on a new one).
    pub async fn send_batch(
        &mut self,
        msgs: &[(MessageId, &[u8])],
        timeout: Duration,
    ) -> std::io::Result<HashMap<MessageId, Outcome>> {
        self.send_signed(msgs, None, timeout).await
    }

    /// [`FrameConn::send_batch`], each message signed with `key` (the agent's key pair)
    /// when given.
    pub async fn send_signed(
        &mut self,
        msgs: &[(MessageId, &[u8])],
        key: Option<&super::auth::Identity>,
        timeout: Duration,
    ) -> std::io::Result<HashMap<MessageId, Outcome>> {
        let mut out = Vec::with_capacity(msgs.iter().map(|m| m.1.len() + 70).sum());
        for (_, b) in msgs {
            match key {
                Some(k) => envelope::encode_ed25519_frame(&k.sign(b), b, &mut out),
                None => envelope::encode_frame(envelope::FrameKind::Msg, b, &mut out),
            }
        }
        let mut answers = HashMap::with_capacity(msgs.len());
        let distinct = msgs
            .iter()
            .map(|m| m.0)
            .collect::<std::collections::HashSet<_>>()
            .len();
        let work = async {
            self.stream.write_all(&out).await?;
            self.stream.flush().await?;
            let mut chunk = vec![0u8; 16 * 1024];
            let mut unknown_nacks = Vec::new();
            while answers.len() < distinct {
                while let Some(f) = Frame::take(&mut self.buf, 1 << 20)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?
                {
                    match f {
                        Frame::Ack(id) => {
                            answers.insert(id, Ok(()));
                        }
                        Frame::Nack(r) => match r.id {
                            Some(id) => {
                                answers.insert(id, Err(r));
                            }
                            None => unknown_nacks.push(r),
                        },
                        Frame::Msg(_) | Frame::Signed(..) | Frame::Ed25519(..) => {}
                    }
                }
                if answers.len() >= distinct {
                    break;
                }
                if let Some(r) = unknown_nacks.first() {
                    return Err(std::io::Error::other(format!(
                        "receiver refused a message: {}: {}",
                        r.code, r.message
                    )));
                }
                let n = self.stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "receiver closed the connection",
                    ));
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
            Ok(())
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no ack in time"))??;
        Ok(answers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::maildir::tests::envelope;

    async fn inbox(dir: &Path, max: usize) -> Arc<Inbox> {
        let md = Maildir::new(dir.join("inbox"));
        md.create().unwrap();
        let (inbox, task) = Inbox::new(
            md,
            None,
            "b".parse().unwrap(),
            "ns".parse().unwrap(),
            max,
            Arc::new(Activity::disabled()),
        );
        tokio::spawn(task);
        inbox
    }

    #[tokio::test]
    async fn unix_pipelined_batch_is_stored_then_acked() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = inbox(dir.path(), 100).await;
        let path = dir.path().join("m.sock");
        let l = bind_unix(&path).await.unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(serve_unix(
            l,
            inbox.clone(),
            Limits::default(),
            cancel.clone(),
        ));
        let mut conn = FrameConn::connect(&Addr::Unix(path.clone()), Duration::from_secs(5))
            .await
            .unwrap();
        let mut es: Vec<_> = (0..50).map(|n| envelope(n, "hello")).collect();
        es[3].to = "c".parse().unwrap(); // wrong recipient
        es[4].body = vec![b'x'; 101]; // too large for this inbox
        let bytes: Vec<Vec<u8>> = es.iter().map(|e| e.encode()).collect();
        let msgs: Vec<(MessageId, &[u8])> =
            es.iter().zip(&bytes).map(|(e, b)| (e.id, &b[..])).collect();
        let answers = conn
            .send_batch(&msgs, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(answers.len(), 50);
        assert_eq!(
            answers[&es[3].id].as_ref().unwrap_err().code,
            "wrong_recipient"
        );
        assert_eq!(answers[&es[4].id].as_ref().unwrap_err().code, "too_large");
        let stored = inbox.maildir.list_new().unwrap();
        assert_eq!(stored.len(), 48);
        for e in &es {
            assert_eq!(answers[&e.id].is_ok(), stored.contains(&e.id));
        }
        // The same id twice in one batch: answered once, the batch completes.
        let dup = [msgs[0], msgs[0], msgs[1]];
        let a = conn
            .send_batch(&dup, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(a.len(), 2);
        // Sending again on the same connection: duplicates acked, nothing new stored.
        let again = conn
            .send_batch(&msgs[..10], Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(again.values().filter(|a| a.is_ok()).count(), 8);
        assert_eq!(inbox.maildir.list_new().unwrap().len(), 48);
        cancel.cancel();
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_by_id_and_the_connection_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = inbox(dir.path(), 1000).await;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = Addr::Tcp(l.local_addr().unwrap().to_string());
        let cancel = CancellationToken::new();
        tokio::spawn(serve_tcp(
            l,
            inbox.clone(),
            Limits::default(),
            cancel.clone(),
        ));
        let mut conn = FrameConn::connect(&addr, Duration::from_secs(5))
            .await
            .unwrap();
        let mut big = envelope(1, "");
        big.body = vec![7; 100_000]; // far past max_frame: skipped, not buffered
        let small = envelope(2, "ok");
        let (bb, sb) = (big.encode(), small.encode());
        let answers = conn
            .send_batch(&[(big.id, &bb), (small.id, &sb)], Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(answers[&big.id].as_ref().unwrap_err().code, "too_large");
        assert!(answers[&small.id].is_ok());
        assert_eq!(inbox.maildir.list_new().unwrap(), vec![small.id]);
        cancel.cancel();
    }

    #[tokio::test]
    async fn log_inbox_refuses_expired_messages_and_drops_retries() {
        let dir = tempfile::tempdir().unwrap();
        let md = Maildir::new(dir.path().join("inbox"));
        md.create().unwrap();
        let now = crate::util::unix_millis(std::time::SystemTime::now());
        let log = InboxLog::open(md.root(), 3_600_000, true, now).unwrap();
        let (inbox, task) = Inbox::new(
            md.clone(),
            Some(log),
            "b".parse().unwrap(),
            "ns".parse().unwrap(),
            1000,
            Arc::new(Activity::disabled()),
        );
        tokio::spawn(task);
        let path = dir.path().join("m.sock");
        let cancel = CancellationToken::new();
        tokio::spawn(serve_unix(
            bind_unix(&path).await.unwrap(),
            inbox,
            Limits::default(),
            cancel.clone(),
        ));
        let mut conn = FrameConn::connect(&Addr::Unix(path), Duration::from_secs(5))
            .await
            .unwrap();
        let mut old = envelope(1, "late");
        old.expires_at = Some(now - 1);
        let mut ok = envelope(2, "fine");
        ok.expires_at = Some(now + 60_000);
        let (ob, kb) = (old.encode(), ok.encode());
        let msgs = [(old.id, &ob[..]), (ok.id, &kb[..])];
        let a = conn
            .send_batch(&msgs, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(a[&old.id].as_ref().unwrap_err().code, "expired");
        assert!(a[&ok.id].is_ok());
        // The retry of a stored message is acked, not stored twice.
        let a = conn
            .send_batch(&msgs[1..], Duration::from_secs(10))
            .await
            .unwrap();
        assert!(a[&ok.id].is_ok());
        assert_eq!(inlog::pending_count(md.root()), 1);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn idle_and_slow_connections_are_closed_on_time() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let inbox = inbox(dir.path(), 1000).await;
        let limits = Limits {
            max_connections: 4,
            idle_timeout: Duration::from_secs(60),
            pressure_idle_timeout: Duration::from_secs(5),
            frame_deadline: Duration::from_secs(30),
        };
        // Idle: closed after 60 s without a byte, not before.
        let t0 = tokio::time::Instant::now();
        let (mut client, h) = open_connection(&inbox, limits);
        let mut b = [0u8; 1];
        assert_eq!(client.read(&mut b).await.unwrap(), 0);
        h.await.unwrap();
        assert_eq!(t0.elapsed().as_secs(), 60);
        // Slow: a frame trickled a byte every 10 s is cut 30 s after its first byte.
        let (mut client, h) = open_connection(&inbox, limits);
        let e = envelope(1, "slow");
        let mut f = Vec::new();
        Frame::Msg(e.encode()).encode_into(&mut f);
        let t0 = tokio::time::Instant::now();
        for byte in &f[..10] {
            if client.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        assert_eq!(client.read(&mut b).await.unwrap(), 0);
        h.await.unwrap();
        assert!(
            t0.elapsed() <= Duration::from_secs(40),
            "{:?}",
            t0.elapsed()
        );
        assert!(inbox.maildir.list_new().unwrap().is_empty());
        // A complete frame resets the clock: a live sender is not cut.
        let (mut client, h) = open_connection(&inbox, limits);
        for n in 0..4u64 {
            let e = envelope(10 + n, "ok");
            let mut f = Vec::new();
            Frame::Msg(e.encode()).encode_into(&mut f);
            client.write_all(&f).await.unwrap();
            tokio::time::sleep(Duration::from_secs(50)).await;
        }
        assert!(!h.is_finished());
        drop(client);
        h.await.unwrap();
    }

    /// A peer that floods tiny bad frames (each answered by a NACK) and never reads: the
    /// refusals queued for it are bounded and, once the writer makes no progress for the
    /// frame deadline, the connection ends (before: the writer and the reader waited for
    /// ever, holding the slot and every queued refusal).
    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_reads_its_answers_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = inbox(dir.path(), 1000).await;
        let limits = Limits::default();
        let (client, h) = open_connection(&inbox, limits);
        let (_rd, mut wr) = tokio::io::split(client);
        let mut bad = Vec::new();
        Frame::Msg(Vec::new()).encode_into(&mut bad);
        let flood = bad.repeat(100_000);
        let _w = tokio::spawn(async move {
            let _ = wr.write_all(&flood).await;
            std::future::pending::<()>().await;
        });
        let t0 = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(600), h)
            .await
            .expect("the connection of a peer that never reads ends")
            .unwrap();
        assert!(
            t0.elapsed() <= limits.frame_deadline * 2,
            "{:?}",
            t0.elapsed()
        );
    }

    /// Frames sent back to back whose reads end mid-frame (so the buffer is never empty)
    /// are not cut by the frame deadline: it runs per frame.
    #[tokio::test(start_paused = true)]
    async fn frames_split_across_reads_are_not_cut_by_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = inbox(dir.path(), 1000).await;
        let limits = Limits::default();
        let (mut client, h) = open_connection(&inbox, limits);
        let mut all = Vec::new();
        for n in 0..6u64 {
            Frame::Msg(envelope(20 + n, "split").encode()).encode_into(&mut all);
        }
        // Six chunks of 1/6 of the bytes plus a bit, 20 s apart (100 s in all, past the
        // 30 s deadline): every chunk ends inside a frame and completes an earlier one.
        let step = all.len() / 6 + 7;
        for chunk in all.chunks(step) {
            client.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_secs(20)).await;
        }
        assert!(!h.is_finished(), "a live sender was cut");
        assert_eq!(inbox.maildir.list_new().unwrap().len(), 6);
        drop(client);
        h.await.unwrap();
    }

    /// An oversized signed frame is refused naming its message (the id is read after the
    /// signature), so the sender dead-letters it instead of retrying its batch for ever.
    #[test]
    fn an_oversized_signed_frame_is_refused_by_its_id() {
        let mut big = envelope(3, "");
        big.body = vec![7; 100_000];
        for (kind, sig) in [(4u8, 32usize), (5, 64)] {
            let mut f = Vec::new();
            match kind {
                4 => envelope::encode_signed_frame(&[9; 32], &big.encode(), &mut f),
                _ => envelope::encode_ed25519_frame(&[9; 64], &big.encode(), &mut f),
            }
            assert_eq!(f.len(), 6 + sig + big.encode().len());
            let mut reader = FrameReader::new(10_000, 5_000);
            reader.push(&f);
            match reader.next() {
                Some(Read::Refuse(r)) => {
                    assert_eq!(r.code, "too_large");
                    assert_eq!(r.id, Some(big.id), "kind {kind}");
                }
                other => panic!("kind {kind}: {other:?}"),
            }
        }
    }

    /// Connections streaming messages to an inbox whose disk does not keep up (here: its
    /// committer not started yet) wait once the inbox holds its byte budget, so their
    /// senders stop (before: every message read was queued for the committer, bounded only
    /// by a count of requests); once the disk goes on, every message is stored and acked.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_inbox_holds_its_byte_budget_and_senders_wait() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        const BUDGET: usize = 64 * 1024;
        const CONNS: u64 = 3;
        const PER_CONN: u64 = 1000;
        let dir = tempfile::tempdir().unwrap();
        let md = Maildir::new(dir.path().join("inbox"));
        md.create().unwrap();
        let (inbox, committer) = Inbox::with_budget(
            md.clone(),
            None,
            "b".parse().unwrap(),
            "ns".parse().unwrap(),
            2000,
            Arc::new(Activity::disabled()),
            BUDGET,
        );
        let written = Arc::new(AtomicUsize::new(0));
        let mut total = 0;
        let mut clients = Vec::new();
        for c in 0..CONNS {
            let (client, h) = open_connection(&inbox, Limits::default());
            let (mut rd, mut wr) = tokio::io::split(client);
            let frames: Vec<Vec<u8>> = (0..PER_CONN)
                .map(|n| {
                    let mut f = Vec::new();
                    Frame::Msg(envelope(c * PER_CONN + n, &"x".repeat(1000)).encode())
                        .encode_into(&mut f);
                    f
                })
                .collect();
            total += frames.iter().map(Vec::len).sum::<usize>();
            let w = written.clone();
            let writer = tokio::spawn(async move {
                for f in frames {
                    wr.write_all(&f).await.unwrap();
                    w.fetch_add(f.len(), Ordering::SeqCst);
                }
                wr
            });
            let reader = tokio::spawn(async move {
                let (mut buf, mut chunk, mut acks) = (Vec::new(), vec![0u8; 4096], 0);
                while acks < PER_CONN {
                    let n = rd.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "closed after {acks} acks");
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(f) = Frame::take(&mut buf, 1 << 20).unwrap() {
                        assert!(matches!(f, Frame::Ack(_)), "{f:?}");
                        acks += 1;
                    }
                }
            });
            clients.push((writer, reader, h));
        }
        // Everything that can move has moved (time only advances when all tasks wait).
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Taken in: the budget, plus per connection a batch read, the read buffer and the
        // stream's own buffer (64 KiB each).
        let taken = written.load(Ordering::SeqCst);
        let bound = BUDGET + CONNS as usize * 4 * 64 * 1024;
        assert!(taken <= bound, "{taken} bytes taken in of {total}");
        assert!(bound < total / 2);
        assert_eq!(inbox.budget.available_permits(), 0);
        tokio::spawn(committer);
        for (writer, reader, h) in clients {
            let wr = writer.await.unwrap();
            reader.await.unwrap();
            drop(wr);
            h.await.unwrap();
        }
        assert_eq!(md.list_new().unwrap().len(), (CONNS * PER_CONN) as usize);
        assert_eq!(inbox.budget.available_permits(), BUDGET);
    }

    /// A connection task (no sender authentication) on an in-memory stream: the client end
    /// and the task.
    fn open_connection(
        inbox: &Arc<Inbox>,
        limits: Limits,
    ) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let h = tokio::spawn(connection(
            server,
            inbox.clone(),
            limits,
            false,
            slot(limits),
        ));
        (client, h)
    }

    /// A slot in a table of its own.
    fn slot(limits: Limits) -> crate::relay::conns::Slot {
        crate::relay::conns::ConnTable::new(limits)
            .admit(&CancellationToken::new())
            .0
            .unwrap()
    }

    /// Whether the server closed `s` (within 5 s).
    async fn closed(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn at_the_cap_idle_connections_make_room_and_busy_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = inbox(dir.path(), 1000).await;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let limits = Limits {
            max_connections: 2,
            ..Limits::default()
        };
        let cancel = CancellationToken::new();
        tokio::spawn(serve_tcp(l, inbox.clone(), limits, cancel.clone()));
        // Two idle connections fill the listener; a sender still gets through, and the
        // first idle one (the longest idle) made room for it.
        let mut a = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut b = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut conn = FrameConn::connect(&Addr::Tcp(addr.to_string()), Duration::from_secs(5))
            .await
            .unwrap();
        let e = envelope(1, "through");
        let eb = e.encode();
        let answers = conn
            .send_batch(&[(e.id, &eb)], Duration::from_secs(5))
            .await
            .unwrap();
        assert!(answers[&e.id].is_ok());
        assert!(
            closed(&mut a).await,
            "the longest-idle connection is closed"
        );
        // Both held connections in the middle of a frame: a new one is closed at once.
        drop(conn);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut f = Vec::new();
        Frame::Msg(envelope(2, "half").encode()).encode_into(&mut f);
        b.write_all(&f[..8]).await.unwrap();
        c.write_all(&f[..8]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut d = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut d).await, "over the cap with every slot busy");
        cancel.cancel();
    }

    #[tokio::test]
    async fn far_expiry_and_future_sending_time_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = inbox(dir.path(), 1000).await;
        let now = crate::util::unix_millis(std::time::SystemTime::now());
        let mut e = envelope(1, "x");
        e.sent_at = now;
        e.expires_at = Some((1 << 63) - 1);
        assert_eq!(inbox.check(&e.encode()).unwrap_err().code, "bad_message");
        e.expires_at = Some(now + 3_600_000);
        assert!(inbox.check(&e.encode()).is_ok());
        e.sent_at = u64::MAX / 2;
        e.expires_at = None;
        assert_eq!(inbox.check(&e.encode()).unwrap_err().code, "bad_message");
    }
}
