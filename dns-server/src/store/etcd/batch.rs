//! Group commit of conditional writes.
//!
//! Each registry write is one conditional write: guards (a key's mod revision is what
//! validation read) and operations. Sent one by one, every write costs etcd a request, a
//! raft entry, an apply and a watch response of its own; under concurrency that per-request
//! cost, not the disk, bounds the rate. The [`Batcher`] queues the writes that arrive while
//! earlier ones are in flight and sends them as ONE etcd transaction: each write becomes a
//! nested transaction (its own guards, its own operations), so each write still gets its
//! own outcome (a failing guard fails that write only), and all of them commit at one
//! revision. A caller is answered only once etcd answered the transaction that carried its
//! write: nothing is acknowledged before it is committed.
//!
//! etcd evaluates every guard of a transaction, nested ones included, before applying any
//! operation. So that this equals applying the writes one after another, a batch only holds
//! writes whose written keys no other write in it reads or writes (guards on the same key,
//! e.g. many registrations checking one namespace, are fine). A write over a key range goes
//! alone. A batch holds at most [`Limits::max_writes`] writes (etcd's `--max-txn-ops`
//! default is 128) and about [`Limits::max_bytes`] (etcd's `--max-request-bytes` default is
//! 1.5 MiB).
//!
//! If etcd refuses a batch without applying it (invalid, too large, or naming a lease that
//! no longer exists, which fails the whole request), its writes are sent again one by one
//! so that each gets its own answer: only the faulty one fails. Any other failure (no
//! answer in time, connection lost) may or may not have committed: every write of the batch
//! gets that error, as it would have alone.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use etcd_client::{Compare, CompareOp, DeleteOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{Etcd, Failed, StoreError, refused, revision};

/// One conditional write: if every guard holds, every operation is applied.
#[derive(Debug, Default)]
pub struct CondWrite {
    when: Vec<Compare>,
    then: Vec<TxnOp>,
    /// Exact keys the guards read.
    read: Vec<String>,
    /// Exact keys the operations write.
    written: Vec<String>,
    /// Guards or operations over a key range: never batched with other writes.
    alone: bool,
    /// Approximate encoded size.
    bytes: usize,
}

/// Encoding overhead counted per guard or operation.
const OP_OVERHEAD: usize = 32;

impl CondWrite {
    /// A write with no guard and no operation yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Guard: `key`'s mod revision is `rev` (`rev` 0: the key does not exist).
    pub fn unchanged(mut self, key: String, rev: i64) -> Self {
        self.bytes += key.len() + OP_OVERHEAD;
        self.when.push(Etcd::unchanged(key.clone(), rev));
        self.read.push(key);
        self
    }

    /// Guard: no key starts with `prefix`.
    pub fn none_under(mut self, prefix: String) -> Self {
        self.bytes += prefix.len() + OP_OVERHEAD;
        self.when
            .push(Compare::version(prefix, CompareOp::Equal, 0).with_prefix());
        self.alone = true;
        self
    }

    /// Puts `value` at `key`, attached to `lease` when not 0.
    pub fn put(mut self, key: String, value: Vec<u8>, lease: i64) -> Self {
        self.bytes += key.len() + value.len() + OP_OVERHEAD;
        self.then.push(Etcd::put(key.clone(), value, lease));
        self.written.push(key);
        self
    }

    /// Deletes `key`.
    pub fn delete(mut self, key: String) -> Self {
        self.bytes += key.len() + OP_OVERHEAD;
        self.then.push(TxnOp::delete(key.clone(), None));
        self.written.push(key);
        self
    }

    /// Deletes every key starting with `prefix`.
    pub fn delete_under(mut self, prefix: String) -> Self {
        self.bytes += prefix.len() + OP_OVERHEAD;
        self.then.push(TxnOp::delete(
            prefix,
            Some(DeleteOptions::new().with_prefix()),
        ));
        self.alone = true;
        self
    }

    fn txn(self) -> Txn {
        Txn::new().when(self.when).and_then(self.then)
    }
}

/// What became of one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Its guards held and its operations are committed.
    pub succeeded: bool,
    /// The revision etcd answered at (the commit's revision when it succeeded).
    pub revision: i64,
}

/// Bounds of one batch and of the batches in flight.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most writes in one transaction.
    pub max_writes: usize,
    /// Most (approximate) bytes in one transaction.
    pub max_bytes: usize,
    /// Most transactions in flight at once; writes arriving meanwhile wait for a slot
    /// and go together.
    pub in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_writes: 128,
            max_bytes: 1 << 20,
            in_flight: 2,
        }
    }
}

/// Counters of what the batcher sent.
#[derive(Debug, Default)]
pub struct Stats {
    /// Transactions sent (batches, single writes and fallback writes).
    pub txns: AtomicU64,
    /// Writes that went in a batch of two or more.
    pub batched: AtomicU64,
    /// Batches refused by etcd and sent again one by one.
    pub fallbacks: AtomicU64,
}

struct Queued {
    write: CondWrite,
    reply: oneshot::Sender<Result<Outcome, StoreError>>,
}

/// Queues conditional writes and commits them in groups (see the module doc).
pub struct Batcher {
    tx: mpsc::UnboundedSender<Queued>,
    stats: Arc<Stats>,
}

fn stopped() -> StoreError {
    StoreError::Etcd("the etcd write queue stopped".into())
}

impl Batcher {
    /// Starts the batcher's task (on the current tokio runtime); it ends when the batcher
    /// is dropped and the queue is empty.
    pub fn start(store: Etcd, limits: Limits) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Stats::default());
        tokio::spawn(run(store, limits, rx, stats.clone()));
        Batcher { tx, stats }
    }

    /// Commits `write` (in a batch with whatever else is queued); answers once etcd
    /// answered the transaction that carried it.
    pub async fn commit(&self, write: CondWrite) -> Result<Outcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Queued { write, reply })
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// What was sent so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

async fn run(
    store: Etcd,
    limits: Limits,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    stats: Arc<Stats>,
) {
    let slots = Arc::new(Semaphore::new(limits.in_flight.max(1)));
    let mut queue: VecDeque<Queued> = VecDeque::new();
    loop {
        if queue.is_empty() {
            match rx.recv().await {
                Some(q) => queue.push_back(q),
                None => return,
            }
        }
        let slot = slots.clone().acquire_owned().await.expect("never closed");
        // Everything that arrived while waiting for the slot goes now.
        while let Ok(q) = rx.try_recv() {
            queue.push_back(q);
        }
        let batch = take_batch(&mut queue, &limits);
        let (store, stats) = (store.clone(), stats.clone());
        tokio::spawn(async move {
            send(&store, batch, &stats).await;
            drop(slot);
        });
    }
}

/// Takes from `queue`, in order, the writes that can go together; the others stay queued,
/// in order, for the next batch.
fn take_batch(queue: &mut VecDeque<Queued>, limits: &Limits) -> Vec<Queued> {
    let mut batch: Vec<Queued> = Vec::new();
    let mut rest = VecDeque::new();
    let mut read: HashSet<String> = HashSet::new();
    let mut written: HashSet<String> = HashSet::new();
    let mut bytes = 0;
    while let Some(q) = queue.pop_front() {
        let w = &q.write;
        let fits = batch.is_empty()
            || (batch.len() < limits.max_writes
                && !w.alone
                && !batch[0].write.alone
                && bytes + w.bytes <= limits.max_bytes
                && w.written
                    .iter()
                    .all(|k| !read.contains(k) && !written.contains(k))
                && w.read.iter().all(|k| !written.contains(k)));
        if fits {
            bytes += w.bytes;
            read.extend(w.read.iter().cloned());
            written.extend(w.written.iter().cloned());
            batch.push(q);
        } else {
            rest.push_back(q);
        }
    }
    *queue = rest;
    batch
}

/// Sends one write alone.
async fn one(store: &Etcd, txn: Txn, stats: &Stats) -> Result<Outcome, StoreError> {
    stats.txns.fetch_add(1, Ordering::Relaxed);
    let r = store.txn(txn).await?;
    Ok(Outcome {
        succeeded: r.succeeded(),
        revision: revision(&r),
    })
}

/// Commits `batch` and answers each of its writes.
async fn send(store: &Etcd, batch: Vec<Queued>, stats: &Stats) {
    let (txns, replies): (Vec<Txn>, Vec<_>) =
        batch.into_iter().map(|q| (q.write.txn(), q.reply)).unzip();
    if txns.len() == 1 {
        let txn = txns.into_iter().next().expect("one");
        let result = one(store, txn, stats).await;
        if let Some(reply) = replies.into_iter().next() {
            let _ = reply.send(result);
        }
        return;
    }
    stats.txns.fetch_add(1, Ordering::Relaxed);
    stats
        .batched
        .fetch_add(txns.len() as u64, Ordering::Relaxed);
    let outer = Txn::new().and_then(txns.iter().cloned().map(TxnOp::txn).collect::<Vec<_>>());
    match store.try_txn(outer).await {
        Ok(resp) => {
            let rev = revision(&resp);
            let each = resp.op_responses();
            if each.len() != replies.len() {
                let msg = format!(
                    "etcd answered {} results for a batch of {} writes",
                    each.len(),
                    replies.len()
                );
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Etcd(msg.clone())));
                }
                return;
            }
            for (r, reply) in each.into_iter().zip(replies) {
                let succeeded = matches!(r, TxnOpResponse::Txn(t) if t.succeeded());
                let _ = reply.send(Ok(Outcome {
                    succeeded,
                    revision: rev,
                }));
            }
        }
        Err(Failed::Etcd(e)) if refused(&e) => {
            // Nothing of the batch was applied: each write on its own (their keys are
            // disjoint, so they may go concurrently).
            stats.fallbacks.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, writes = txns.len(), "etcd refused a batch; sending its writes one by one");
            let results =
                futures_util::future::join_all(txns.into_iter().map(|t| one(store, t, stats)))
                    .await;
            for (result, reply) in results.into_iter().zip(replies) {
                let _ = reply.send(result);
            }
        }
        Err(f) => {
            let msg = f.message();
            for reply in replies {
                let _ = reply.send(Err(StoreError::Etcd(msg.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Child, Command};
    use std::time::Duration;

    use super::*;

    fn queued(write: CondWrite) -> Queued {
        Queued {
            write,
            reply: oneshot::channel().0,
        }
    }

    fn sizes(queue: &mut VecDeque<Queued>, limits: &Limits) -> Vec<usize> {
        let mut out = Vec::new();
        while !queue.is_empty() {
            out.push(take_batch(queue, limits).len());
        }
        out
    }

    #[test]
    fn batches_hold_only_writes_on_disjoint_keys() {
        let reg = |ns: &str, id: &str| {
            CondWrite::new()
                .unchanged(format!("ns/{ns}"), 7)
                .unchanged(format!("m/{ns}/{id}"), 0)
                .put(format!("m/{ns}/{id}"), b"r".to_vec(), 0)
                .put(format!("live/{ns}/{id}"), Vec::new(), 1)
        };
        let limits = Limits::default();
        // Guards on one namespace key are shared: one batch.
        let mut q: VecDeque<_> = (0..5).map(|i| queued(reg("a", &i.to_string()))).collect();
        assert_eq!(sizes(&mut q, &limits), [5]);
        // The same membrane twice: the second waits for the next batch; others still join.
        let mut q: VecDeque<_> = [reg("a", "1"), reg("a", "1"), reg("a", "2")]
            .into_iter()
            .map(queued)
            .collect();
        let first = take_batch(&mut q, &limits);
        assert_eq!(first.len(), 2);
        assert_eq!(first[1].write.written[0], "m/a/2");
        assert_eq!(sizes(&mut q, &limits), [1]);
        // A write of a key another one guards (a new namespace) does not join it.
        let new_ns =
            CondWrite::new()
                .unchanged("ns/a".into(), 0)
                .put("ns/a".into(), b"n".to_vec(), 0);
        let mut q: VecDeque<_> = [reg("a", "1"), new_ns, reg("a", "2")]
            .into_iter()
            .map(queued)
            .collect();
        assert_eq!(sizes(&mut q, &limits), [2, 1]);
        // Range operations go alone; limits on count and size hold.
        let mut q: VecDeque<_> = [
            reg("a", "1"),
            CondWrite::new().delete_under("m/b/".into()),
            reg("a", "2"),
        ]
        .into_iter()
        .map(queued)
        .collect();
        assert_eq!(sizes(&mut q, &limits), [2, 1]);
        let small = Limits {
            max_writes: 3,
            ..limits
        };
        let mut q: VecDeque<_> = (0..7).map(|i| queued(reg("a", &i.to_string()))).collect();
        assert_eq!(sizes(&mut q, &small), [3, 3, 1]);
        let one_each = Limits {
            max_bytes: 10,
            ..limits
        };
        let mut q: VecDeque<_> = (0..3).map(|i| queued(reg("a", &i.to_string()))).collect();
        assert_eq!(sizes(&mut q, &one_each), [1, 1, 1]);
    }

    /// One etcd member on loopback, killed when dropped.
    struct Member {
        child: Child,
        endpoint: String,
        _dir: tempfile::TempDir,
    }

    impl Drop for Member {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Starts a member, or `None` (SKIP) when `etcd` is not installed and `CI` is not true.
    async fn member() -> Option<(Member, Etcd)> {
        let bin = super::super::member::etcd_bin_or_skip("the batcher's etcd tests")?;
        let dir = tempfile::tempdir().unwrap();
        let (child, endpoint) = super::super::member::spawn(&bin, dir.path());
        let m = Member {
            child,
            endpoint,
            _dir: dir,
        };
        let store = Etcd::connect(std::slice::from_ref(&m.endpoint), "/t/")
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while store.txn(Txn::new()).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "etcd did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some((m, store))
    }

    async fn get(store: &Etcd, key: &str) -> Option<Vec<u8>> {
        let mut kv = store.client.kv_client();
        let r = kv.get(key, None).await.unwrap();
        r.kvs().first().map(|kv| kv.value().to_vec())
    }

    fn count(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn mixed_guards_in_one_batch_each_get_their_own_outcome() {
        let Some((_m, store)) = member().await else {
            return;
        };
        let b = Batcher::start(store.clone(), Limits::default());
        let a = b
            .commit(CondWrite::new().put("a".into(), b"0".to_vec(), 0))
            .await
            .unwrap();
        let txns = count(&b.stats().txns);
        // Queued together (this test's runtime runs one task at a time): one batch.
        let (ok1, bad, ok2) = tokio::join!(
            b.commit(CondWrite::new().unchanged("a".into(), a.revision).put(
                "a".into(),
                b"1".to_vec(),
                0
            )),
            b.commit(CondWrite::new().unchanged("b".into(), 12345).put(
                "b".into(),
                b"x".to_vec(),
                0
            )),
            b.commit(
                CondWrite::new()
                    .unchanged("c".into(), 0)
                    .put("c".into(), b"3".to_vec(), 0)
            ),
        );
        let (ok1, bad, ok2) = (ok1.unwrap(), bad.unwrap(), ok2.unwrap());
        assert_eq!(count(&b.stats().txns), txns + 1, "one transaction");
        assert_eq!(count(&b.stats().batched), 3);
        assert_eq!(count(&b.stats().fallbacks), 0);
        assert!(ok1.succeeded && ok2.succeeded, "{ok1:?} {ok2:?}");
        assert!(!bad.succeeded, "its guard failed: {bad:?}");
        assert_eq!(ok1.revision, ok2.revision, "committed together");
        assert!(ok1.revision > a.revision);
        assert_eq!(get(&store, "a").await.as_deref(), Some(&b"1"[..]));
        assert_eq!(get(&store, "b").await, None);
        assert_eq!(get(&store, "c").await.as_deref(), Some(&b"3"[..]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_is_acknowledged_before_etcd_commits() {
        let Some((m, store)) = member().await else {
            return;
        };
        let b = Arc::new(Batcher::start(store.clone(), Limits::default()));
        let signal = |sig: &str| {
            let ok = Command::new("kill")
                .args([sig, &m.child.id().to_string()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "kill {sig}");
        };
        // etcd frozen: nothing can commit.
        signal("-STOP");
        let tasks: Vec<_> = (0..6)
            .map(|i| {
                let (b, store) = (b.clone(), store.clone());
                tokio::spawn(async move {
                    let key = format!("k{i}");
                    let out = b
                        .commit(CondWrite::new().unchanged(key.clone(), 0).put(
                            key.clone(),
                            b"v".to_vec(),
                            0,
                        ))
                        .await
                        .unwrap();
                    // Acknowledged: it is in etcd.
                    assert_eq!(get(&store, &key).await.as_deref(), Some(&b"v"[..]));
                    out
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(700)).await;
        let early = tasks.iter().filter(|t| t.is_finished()).count();
        signal("-CONT");
        assert_eq!(early, 0, "acknowledged while etcd could not commit");
        for t in tasks {
            assert!(t.await.unwrap().succeeded);
        }
        assert!(count(&b.stats().batched) >= 2, "some writes went together");
    }

    #[tokio::test]
    async fn a_refused_batch_falls_back_to_one_by_one() {
        let Some((_m, store)) = member().await else {
            return;
        };
        let b = Batcher::start(store.clone(), Limits::default());
        let live = store.grant(Duration::from_secs(60)).await.unwrap();
        let gone = store.grant(Duration::from_secs(60)).await.unwrap();
        store.revoke(gone).await;
        let txns = count(&b.stats().txns);
        // A put on a lease that no longer exists makes etcd refuse the whole request.
        let (ok, bad_lease, bad_guard) = tokio::join!(
            b.commit(CondWrite::new().put("x".into(), b"1".to_vec(), live)),
            b.commit(CondWrite::new().put("y".into(), b"2".to_vec(), gone)),
            b.commit(
                CondWrite::new()
                    .unchanged("z".into(), 999)
                    .put("z".into(), b"3".to_vec(), 0)
            ),
        );
        assert_eq!(count(&b.stats().fallbacks), 1, "the batch was refused");
        assert_eq!(count(&b.stats().txns), txns + 4, "the batch, then one each");
        assert!(ok.unwrap().succeeded);
        let err = bad_lease.unwrap_err().to_string();
        assert!(err.contains("lease not found"), "{err}");
        assert!(!bad_guard.unwrap().succeeded);
        assert_eq!(get(&store, "x").await.as_deref(), Some(&b"1"[..]));
        assert_eq!(get(&store, "y").await, None);
        assert_eq!(get(&store, "z").await, None);
    }
}
