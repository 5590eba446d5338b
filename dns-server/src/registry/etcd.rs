//! The registry on etcd: several replicas share one registry.
//!
//! Writes are validated against this replica's copy, then committed in etcd by a
//! transaction that compares the mod revisions the validation read (so a concurrent change
//! through another replica makes it fail and be re-validated). A write is answered only
//! after etcd committed it *and* this replica's watch applied that revision, so a read
//! after a write on the same replica sees it.
//!
//! Memory is driven only by the watch (one code path for every replica): the same apply
//! function publishes events and marks namespaces for DNS rebuilds, in etcd's revision
//! order. Liveness: a membrane is `passing` while its `live` key exists (attached to its
//! own lease), `stale` once the lease expired and etcd deleted the key. Any replica evicts
//! a membrane stale for its eviction delay with a guarded delete (registration unchanged
//! and still no live key), so concurrent evictions are harmless.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use shared::{
    CreateNamespace, Event, HealthState, MembraneId, NamespaceName, NamespaceView,
    RegisterResponse, Registration,
};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    Backend, Entry, Ns, Registry, RegistryError, State, eviction_of, from_ms, hash_secret,
    membrane_view, new_token, ns_view, to_ms, ttl_of,
};
use crate::metrics::Metrics;
use crate::snapshot::Instance;
use crate::store::StoreError;
use crate::store::StoredMembrane;
use crate::store::etcd::{Batcher, Change, CondWrite, Etcd, Limits, Outcome};

/// How long a write waits for this replica's watch to apply its own commit before
/// answering anyway (it is committed in etcd; only this replica's copy lags).
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// Attempts of a write whose transaction lost a race with another replica.
const ATTEMPTS: usize = 5;

/// etcd state shared by the registry's tasks.
pub(crate) struct EtcdBackend {
    store: Etcd,
    /// The watch is connected (its copy is current).
    reachable: AtomicBool,
    /// Highest etcd revision whose changes under the prefix are applied in memory.
    applied: watch::Sender<i64>,
    /// Evictions in flight from this replica.
    evicting: Mutex<HashSet<(NamespaceName, MembraneId)>>,
    /// Leases granted ahead of registrations, by TTL (see [`EtcdBackend::lease`]).
    pool: Mutex<HashMap<Duration, LeasePool>>,
    /// Every conditional write goes through it (group commit).
    batch: Batcher,
}

/// Leases of one TTL granted ahead of registrations.
#[derive(Default)]
struct LeasePool {
    /// Granted and unused, oldest first, with the time of their grant.
    ready: Vec<(i64, Instant)>,
    /// How many to keep ready: doubles when a registration finds none, halves when some
    /// aged out unused (between [`POOL_MIN`] and [`POOL_MAX`]).
    want: usize,
    /// A refill is in flight.
    refilling: bool,
}

/// A pooled lease older than this is not handed out (its TTL started at its grant).
const POOL_MAX_AGE: Duration = Duration::from_millis(500);

/// Fewest leases kept ready per TTL once registrations with that TTL arrived.
const POOL_MIN: usize = 4;

/// Most leases kept ready per TTL.
const POOL_MAX: usize = 64;

impl EtcdBackend {
    /// A fresh lease of `ttl` for one membrane. Granting is a round trip through etcd's
    /// log; doing it inline doubles a registration's latency. So leases are granted ahead,
    /// in the background: when the pool falls to half of what registrations consume, one
    /// refill grants the missing ones at once (concurrent grants over the one gRPC channel
    /// go out and come back together, and etcd commits them in the same raft batches;
    /// etcd has no batch grant). A lease is handed out only when at most [`POOL_MAX_AGE`]
    /// old, so a membrane's first TTL is at most that much shorter; leases that aged out
    /// are revoked. Each lease still serves exactly one membrane.
    async fn lease(self: &Arc<Self>, ttl: Duration) -> Result<i64, StoreError> {
        let now = Instant::now();
        let (hit, expired, refill) = {
            let mut pools = self.pool.lock().unwrap();
            let p = pools.entry(ttl).or_default();
            let (fresh, old): (Vec<_>, Vec<_>) = p
                .ready
                .drain(..)
                .partition(|(_, at)| now.saturating_duration_since(*at) < POOL_MAX_AGE);
            p.ready = fresh;
            if !old.is_empty() {
                p.want = (p.want / 2).max(POOL_MIN);
            }
            let hit = (!p.ready.is_empty()).then(|| p.ready.remove(0));
            if hit.is_none() {
                p.want = (p.want * 2).clamp(POOL_MIN, POOL_MAX);
            }
            let refill = if !p.refilling && p.ready.len() * 2 <= p.want {
                p.refilling = true;
                p.want - p.ready.len()
            } else {
                0
            };
            (hit, old, refill)
        };
        if !expired.is_empty() {
            let store = self.store.clone();
            tokio::spawn(async move {
                for (l, _) in expired {
                    store.revoke(l).await;
                }
            });
        }
        if refill > 0 {
            let this = self.clone();
            tokio::spawn(async move { this.refill(ttl, refill).await });
        }
        match hit {
            Some((l, _)) => Ok(l),
            None => self.store.grant(ttl).await,
        }
    }

    /// Grants `n` leases of `ttl` concurrently into the pool.
    async fn refill(&self, ttl: Duration, n: usize) {
        let granted = futures_util::future::join_all((0..n).map(|_| self.store.grant(ttl))).await;
        let at = Instant::now();
        let surplus: Vec<i64> = {
            let mut pools = self.pool.lock().unwrap();
            let p = pools.entry(ttl).or_default();
            p.refilling = false;
            let mut surplus = Vec::new();
            for l in granted.into_iter().flatten() {
                if p.ready.len() < POOL_MAX {
                    p.ready.push((l, at));
                } else {
                    surplus.push(l);
                }
            }
            surplus
        };
        for l in surplus {
            self.store.revoke(l).await;
        }
    }

    /// Forgets the pooled leases: one of them turned out not to exist any more (etcd lost
    /// or expired it), so the others are suspect too. They expire on their own if alive.
    fn forget_pooled_leases(&self) {
        self.pool.lock().unwrap().clear();
    }

    pub(crate) fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    fn set_reachable(&self, up: bool, why: &str) {
        let was = self.reachable.swap(up, Ordering::Relaxed);
        if was != up {
            if up {
                tracing::info!("etcd reachable again; writes accepted");
            } else {
                tracing::warn!(
                    reason = why,
                    "etcd unreachable: serving DNS and reads from this replica's copy, \
                     refusing writes"
                );
            }
        }
    }
}

fn unreachable_msg(detail: impl std::fmt::Display) -> RegistryError {
    RegistryError::StoreUnreachable(format!(
        "the shared registry store (etcd) cannot be reached from this replica ({detail}); \
         writes are refused until it returns, DNS and reads are served from this replica's \
         copy. Retry, or use another replica"
    ))
}

fn busy(what: &str) -> RegistryError {
    RegistryError::StoreUnreachable(format!(
        "{what} kept changing concurrently through other replicas; retry"
    ))
}

/// Ordering of a change's key within one revision.
type Key = (NamespaceName, MembraneId);

/// One attempt of a validated write (see [`Registry::write_loop`]).
enum Step<T, D> {
    /// Done without a write (a heartbeat that renewed its lease).
    Done(T),
    /// Commit `write`; once committed, `done()` gives the answer.
    Write {
        write: CondWrite,
        /// A lease granted for this attempt: revoked unless the write committed.
        lease: Option<i64>,
        done: D,
    },
}

/// The commit failed because a lease it attaches a key to does not exist (any more).
fn lease_gone(err: &StoreError) -> bool {
    err.to_string().contains("lease not found")
}

fn refuse_if_unreachable(e: &EtcdBackend) -> Result<(), RegistryError> {
    if e.reachable() {
        Ok(())
    } else {
        Err(unreachable_msg("watch disconnected"))
    }
}

fn commit_failed(err: StoreError) -> RegistryError {
    tracing::warn!(error = %err, "etcd transaction failed");
    unreachable_msg(err)
}

fn revoke_later(store: &Etcd, lease: i64) {
    let store = store.clone();
    tokio::spawn(async move { store.revoke(lease).await });
}

impl Registry {
    /// A registry on etcd. It is empty until [`Registry::etcd_load`] succeeds; run
    /// [`Registry::run_etcd_watch`] afterwards.
    pub fn new_etcd(store: Etcd, metrics: Arc<Metrics>) -> Self {
        let start_seq = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let (applied, _) = watch::channel(0);
        Registry {
            state: Arc::new(Mutex::new(State {
                namespaces: HashMap::new(),
                next_seq: 0,
                staged: Default::default(),
            })),
            committed: Default::default(),
            orphaned: Default::default(),
            backend: Backend::Etcd(Arc::new(EtcdBackend {
                batch: Batcher::start(store.clone(), Limits::default()),
                store,
                reachable: AtomicBool::new(false),
                applied,
                evicting: Mutex::new(HashSet::new()),
                pool: Mutex::new(HashMap::new()),
            })),
            events: Arc::new(super::EventHub::new(start_seq)),
            dirty: Arc::new(super::Dirty::default()),
            metrics,
            failed: Arc::new(AtomicBool::new(false)),
            detached: Default::default(),
            // Not applied with etcd: staleness comes from lease expiry in etcd.
            preserve: Mutex::new(super::Preservation::default()),
            limits: Mutex::new(super::Limits::default()),
        }
    }

    fn etcd_backend(&self) -> &Arc<EtcdBackend> {
        match &self.backend {
            Backend::Etcd(e) => e,
            Backend::Sqlite(_) => panic!("not an etcd registry"),
        }
    }

    /// Whether this registry runs on etcd.
    pub fn is_etcd(&self) -> bool {
        matches!(self.backend, Backend::Etcd(_))
    }

    /// Reads everything under the prefix into memory (start-up, and after the watch fell
    /// behind a compaction). Returns the revision read.
    pub async fn etcd_load(&self) -> Result<i64, StoreError> {
        let e = self.etcd_backend();
        let snap = e.store.load().await?;
        self.apply_changes(snap.changes, true);
        e.applied.send_modify(|a| *a = (*a).max(snap.revision));
        // etcd answered and the copy is current: accept writes (they wait for the watch,
        // which starts from this revision, to apply their commit).
        e.set_reachable(true, "");
        Ok(snap.revision)
    }

    /// Follows the prefix from the last applied revision, reconnecting with backoff and
    /// reloading everything when the revision was compacted, until `shutdown`.
    pub async fn run_etcd_watch(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let e = self.etcd_backend().clone();
        let mut backoff = Duration::from_millis(100);
        let mut reload = false;
        loop {
            if reload {
                match self.etcd_load().await {
                    Ok(rev) => {
                        tracing::info!(revision = rev, "reloaded the registry from etcd");
                        reload = false;
                    }
                    Err(err) => {
                        e.set_reachable(false, &err.to_string());
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
            let from = *e.applied.borrow() + 1;
            let mut stream = match e.store.watch(from).await {
                Ok(s) => s,
                Err(err) => {
                    e.set_reachable(false, &err.to_string());
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            // Asked after the watch exists: if history at `from - 1` is still there, the
            // watch sees every change after it.
            match e.store.compacted(from - 1).await {
                Ok(false) => {}
                Ok(true) => {
                    tracing::warn!(
                        wanted = from,
                        "revisions missed while disconnected were compacted; reloading everything"
                    );
                    reload = true;
                    continue;
                }
                Err(err) => {
                    e.set_reachable(false, &err.to_string());
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            }
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    m = stream.message() => m,
                };
                let resp = match msg {
                    Ok(Some(resp)) => resp,
                    Ok(None) => {
                        e.set_reachable(false, "watch stream closed");
                        break;
                    }
                    Err(err) => {
                        e.set_reachable(false, &err.to_string());
                        break;
                    }
                };
                tracing::debug!(
                    created = resp.created(),
                    canceled = resp.canceled(),
                    compact = resp.compact_revision(),
                    events = resp.events().len(),
                    header = resp.header().map(|h| h.revision()).unwrap_or(0),
                    from,
                    "watch response"
                );
                if resp.compact_revision() > 0 {
                    tracing::warn!(
                        compacted = resp.compact_revision(),
                        wanted = from,
                        "watch revision was compacted; reloading everything"
                    );
                    reload = true;
                    break;
                }
                if resp.canceled() {
                    e.set_reachable(false, resp.cancel_reason());
                    break;
                }
                if resp.created() {
                    // Caught up or catching up: the copy is being brought current.
                    e.set_reachable(true, "");
                    backoff = Duration::from_millis(100);
                }
                let (changes, top) = e.store.decode_events(resp.events());
                if !changes.is_empty() {
                    self.apply_changes(changes, false);
                }
                let rev = if resp.events().is_empty() && !resp.created() {
                    // Progress notification: everything up to the header is delivered.
                    resp.header().map(|h| h.revision()).unwrap_or(0)
                } else {
                    top
                };
                e.applied.send_if_modified(|a| {
                    let newer = rev > *a;
                    if newer {
                        *a = rev;
                    }
                    newer
                });
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Applies changes read from etcd to memory, then publishes their events and marks
    /// their namespaces for DNS. `full`: `changes` is everything under the prefix, so
    /// anything in memory it does not mention is gone.
    fn apply_changes(&self, mut changes: Vec<Change>, full: bool) {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut events: Vec<(NamespaceName, Event)> = Vec::new();
        let mut dirty: HashSet<NamespaceName> = HashSet::new();
        {
            let mut st = self.state.lock().unwrap();
            if full {
                let mut deletes = Vec::new();
                let mut ns_seen = HashSet::new();
                let mut m_seen = HashSet::new();
                let mut live_seen = HashSet::new();
                for c in &changes {
                    match c {
                        Change::PutNamespace(n, _) => {
                            ns_seen.insert(n.name.clone());
                        }
                        Change::PutMembrane(m) => {
                            m_seen.insert((m.namespace.clone(), m.id.clone()));
                        }
                        Change::PutLive(n, i, _) => {
                            live_seen.insert((n.clone(), i.clone()));
                        }
                        _ => {}
                    }
                }
                for (n, ns) in &st.namespaces {
                    if !ns_seen.contains(n) {
                        deletes.push(Change::DeleteNamespace(n.clone()));
                        continue;
                    }
                    for (i, e) in &ns.membranes {
                        let k = (n.clone(), i.clone());
                        if !m_seen.contains(&k) {
                            deletes.push(Change::DeleteMembrane(k.0.clone(), k.1.clone()));
                        } else if e.live.is_some() && !live_seen.contains(&k) {
                            deletes.push(Change::DeleteLive(k.0, k.1));
                        }
                    }
                }
                deletes.extend(changes);
                changes = deletes;
            }
            // State of each touched membrane before this batch (None: absent), in order.
            let mut before: Vec<(Key, Option<HealthState>)> = Vec::new();
            let mut touched: HashSet<Key> = HashSet::new();
            let mut written: HashSet<Key> = HashSet::new();
            let touch = |st: &State,
                         k: &Key,
                         touched: &mut HashSet<Key>,
                         before: &mut Vec<(Key, Option<HealthState>)>| {
                if touched.insert(k.clone()) {
                    let prev = st
                        .namespaces
                        .get(&k.0)
                        .and_then(|ns| ns.membranes.get(&k.1))
                        .map(|e| e.state);
                    before.push((k.clone(), prev));
                }
            };
            for c in changes {
                match c {
                    Change::PutNamespace(s, rev) => match st.namespaces.get_mut(&s.name) {
                        Some(ns) => {
                            if ns.rev == rev {
                                continue;
                            }
                            ns.description = s.description;
                            ns.settings = s.settings;
                            ns.created_at = from_ms(s.created_at_ms);
                            ns.join_token_hash = s.join_token_hash;
                            ns.rev = rev;
                            ns.serial = ns.serial.wrapping_add(1);
                            dirty.insert(s.name);
                        }
                        None => {
                            st.namespaces.insert(
                                s.name.clone(),
                                Ns {
                                    description: s.description,
                                    settings: s.settings,
                                    created_at: from_ms(s.created_at_ms),
                                    join_token_hash: s.join_token_hash,
                                    membranes: Default::default(),
                                    serial: super::unix_serial(),
                                    rev,
                                },
                            );
                            dirty.insert(s.name);
                        }
                    },
                    Change::DeleteNamespace(n) => {
                        if let Some(ns) = st.namespaces.remove(&n) {
                            for id in ns.membranes.keys() {
                                let k = (n.clone(), id.clone());
                                if touched.contains(&k) {
                                    // Announced below as deregistered.
                                    continue;
                                }
                                events.push((
                                    n.clone(),
                                    Event::Deregistered {
                                        namespace: n.clone(),
                                        id: id.clone(),
                                        reason: "namespace_deleted".into(),
                                    },
                                ));
                            }
                            dirty.insert(n);
                        }
                    }
                    Change::PutMembrane(row) => {
                        let k = (row.namespace.clone(), row.id.clone());
                        if !st.namespaces.contains_key(&k.0) {
                            tracing::debug!(namespace = %k.0, id = %k.1, "registration without namespace ignored");
                            continue;
                        }
                        touch(&st, &k, &mut touched, &mut before);
                        let ns = st.namespaces.get_mut(&k.0).expect("checked");
                        match ns.membranes.get_mut(&k.1) {
                            Some(e) if e.seq == row.seq => continue,
                            Some(e) => {
                                e.seq = row.seq;
                                e.inst = Arc::new(Instance {
                                    id: row.id,
                                    registration: row.registration,
                                });
                                e.secret_hash = row.secret_hash;
                                e.registered_at = from_ms(row.registered_at_ms);
                            }
                            None => {
                                ns.membranes.insert(
                                    k.1.clone(),
                                    Entry {
                                        seq: row.seq,
                                        live: None,
                                        state_since: now,
                                        inst: Arc::new(Instance {
                                            id: row.id,
                                            registration: row.registration,
                                        }),
                                        secret_hash: row.secret_hash,
                                        registered_at: from_ms(row.registered_at_ms),
                                        last_heartbeat_wall: wall,
                                        last_heartbeat: now,
                                        // Settled below from the live key.
                                        state: HealthState::Stale,
                                    },
                                );
                            }
                        }
                        written.insert(k);
                    }
                    Change::DeleteMembrane(n, i) => {
                        let k = (n, i);
                        touch(&st, &k, &mut touched, &mut before);
                        if let Some(ns) = st.namespaces.get_mut(&k.0) {
                            ns.membranes.remove(&k.1);
                        }
                    }
                    Change::PutLive(n, i, lease) => {
                        let k = (n, i);
                        touch(&st, &k, &mut touched, &mut before);
                        if let Some(e) = st
                            .namespaces
                            .get_mut(&k.0)
                            .and_then(|ns| ns.membranes.get_mut(&k.1))
                        {
                            e.live = Some(lease);
                            e.last_heartbeat_wall = wall;
                            e.last_heartbeat = now;
                        }
                    }
                    Change::DeleteLive(n, i) => {
                        let k = (n, i);
                        touch(&st, &k, &mut touched, &mut before);
                        if let Some(e) = st
                            .namespaces
                            .get_mut(&k.0)
                            .and_then(|ns| ns.membranes.get_mut(&k.1))
                        {
                            e.live = None;
                        }
                    }
                }
            }
            for ((n, i), prev) in before {
                let Some(ns) = st.namespaces.get_mut(&n) else {
                    continue;
                };
                match ns.membranes.get_mut(&i) {
                    Some(e) => {
                        let state = if e.live.is_some() {
                            HealthState::Passing
                        } else {
                            HealthState::Stale
                        };
                        let is_written = written.contains(&(n.clone(), i.clone()));
                        if e.state != state {
                            e.state = state;
                            e.state_since = now;
                        }
                        if is_written {
                            events.push((
                                n.clone(),
                                Event::Registered {
                                    membrane: Box::new(membrane_view(&n, &i, e)),
                                },
                            ));
                        }
                        if prev.is_some_and(|p| p != state) {
                            self.metrics.state_change(state);
                            tracing::info!(
                                namespace = %n,
                                id = %i,
                                state = state.as_str(),
                                "membrane state changed"
                            );
                            events.push((
                                n.clone(),
                                Event::StateChanged {
                                    namespace: n.clone(),
                                    id: i.clone(),
                                    state,
                                },
                            ));
                        }
                        if is_written || prev != Some(state) {
                            ns.serial = ns.serial.wrapping_add(1);
                            dirty.insert(n);
                        }
                    }
                    None => {
                        if let Some(prev) = prev {
                            // Other replicas cannot tell why a key went away: an eviction
                            // only ever removes a stale membrane.
                            let reason = if prev == HealthState::Stale {
                                "evicted"
                            } else {
                                "deregistered"
                            };
                            events.push((
                                n.clone(),
                                Event::Deregistered {
                                    namespace: n.clone(),
                                    id: i,
                                    reason: reason.into(),
                                },
                            ));
                            ns.serial = ns.serial.wrapping_add(1);
                            dirty.insert(n);
                        }
                    }
                }
            }
            // Publish while holding the lock so that events of consecutive batches keep
            // etcd's order even if a caller raced ahead.
            for (n, ev) in events {
                self.events.publish(&n, ev);
            }
        }
        if !dirty.is_empty() {
            self.dirty.mark(dirty);
        }
    }

    /// Refuses at once while the watch is down; otherwise commits `write`.
    async fn commit(&self, e: &EtcdBackend, write: CondWrite) -> Result<Outcome, RegistryError> {
        refuse_if_unreachable(e)?;
        e.batch.commit(write).await.map_err(commit_failed)
    }

    /// The validate-then-commit loop of every write: `attempt` validates against this
    /// replica's copy and says what to commit, guarded by the revisions it read; the
    /// write is answered once committed and applied by this replica's watch. When a guard
    /// fails (another replica changed a key meanwhile) the watch has applied that change
    /// by then, and the next attempt validates again, up to [`ATTEMPTS`] times. A lease
    /// that turns out gone (a pooled one etcd lost) is also retried, with a fresh one.
    async fn write_loop<T, D, F, Fut>(
        &self,
        e: &EtcdBackend,
        what: &str,
        mut attempt: F,
    ) -> Result<T, RegistryError>
    where
        D: FnOnce() -> T,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Step<T, D>, RegistryError>>,
    {
        for _ in 0..ATTEMPTS {
            let (write, lease, done) = match attempt().await? {
                Step::Done(v) => return Ok(v),
                Step::Write { write, lease, done } => (write, lease, done),
            };
            let result = match refuse_if_unreachable(e) {
                Ok(()) => e.batch.commit(write).await,
                Err(refused) => {
                    if let Some(l) = lease {
                        revoke_later(&e.store, l);
                    }
                    return Err(refused);
                }
            };
            if let Some(l) = lease
                && !matches!(&result, Ok(o) if o.succeeded)
            {
                revoke_later(&e.store, l);
            }
            let out = match result {
                Ok(out) => out,
                Err(err) if lease.is_some() && lease_gone(&err) => {
                    tracing::info!(error = %err, "a lease was gone; retrying with a fresh one");
                    e.forget_pooled_leases();
                    continue;
                }
                Err(err) => return Err(commit_failed(err)),
            };
            self.applied(e, out.revision).await;
            if out.succeeded {
                return Ok(done());
            }
        }
        Err(busy(what))
    }

    /// Waits until this replica's watch applied `rev`.
    async fn applied(&self, e: &EtcdBackend, rev: i64) {
        let mut rx = e.applied.subscribe();
        if tokio::time::timeout(APPLY_WAIT, rx.wait_for(|a| *a >= rev))
            .await
            .is_err()
        {
            tracing::warn!(
                revision = rev,
                "committed in etcd but not yet seen by this replica's watch"
            );
        }
    }

    pub(super) async fn create_namespace_etcd(
        &self,
        e: &EtcdBackend,
        req: CreateNamespace,
    ) -> Result<NamespaceView, RegistryError> {
        let (ns, token) = Self::new_ns(req.description, req.settings);
        {
            let st = self.state.lock().unwrap();
            if st.namespaces.contains_key(&req.name) {
                return Err(RegistryError::NamespaceExists(req.name));
            }
            self.limits().check(&st, true, false)?;
        }
        let key = e.store.ns_key(&req.name);
        let write = CondWrite::new().unchanged(key.clone(), 0).put(
            key,
            Etcd::encode_namespace(&ns.stored(&req.name)),
            0,
        );
        let out = self.commit(e, write).await?;
        if !out.succeeded {
            return Err(RegistryError::NamespaceExists(req.name));
        }
        self.applied(e, out.revision).await;
        let mut view = ns_view(&req.name, &ns);
        view.join_token = Some(token);
        Ok(view)
    }

    pub(super) async fn rotate_join_token_etcd(
        &self,
        e: &EtcdBackend,
        name: &NamespaceName,
    ) -> Result<NamespaceView, RegistryError> {
        self.write_loop(e, "the namespace", || async {
            let token = new_token();
            let (stored, rev, mut view) = {
                let mut st = self.state.lock().unwrap();
                let ns = st
                    .namespaces
                    .get_mut(name)
                    .ok_or_else(|| RegistryError::NamespaceNotFound(name.clone()))?;
                let mut stored = ns.stored(name);
                stored.join_token_hash = Some(hash_secret(&token));
                (stored, ns.rev, ns_view(name, ns))
            };
            let key = e.store.ns_key(name);
            let write = CondWrite::new().unchanged(key.clone(), rev).put(
                key,
                Etcd::encode_namespace(&stored),
                0,
            );
            Ok(Step::Write {
                write,
                lease: None,
                done: move || {
                    view.join_token = Some(token);
                    view
                },
            })
        })
        .await
    }

    pub(super) async fn delete_namespace_etcd(
        &self,
        e: &EtcdBackend,
        name: &NamespaceName,
        force: bool,
    ) -> Result<(), RegistryError> {
        self.write_loop(e, "the namespace", || async {
            let (rev, leases) = {
                let st = self.state.lock().unwrap();
                let ns = st
                    .namespaces
                    .get(name)
                    .ok_or_else(|| RegistryError::NamespaceNotFound(name.clone()))?;
                if !ns.membranes.is_empty() && !force {
                    return Err(RegistryError::NamespaceNotEmpty(
                        name.clone(),
                        ns.membranes.len(),
                    ));
                }
                let leases: Vec<i64> = ns.membranes.values().filter_map(|m| m.live).collect();
                (ns.rev, leases)
            };
            let key = e.store.ns_key(name);
            let mut write = CondWrite::new().unchanged(key.clone(), rev);
            if !force {
                // Still empty in etcd, not only in this copy.
                write = write.none_under(e.store.membranes_prefix(name));
            }
            let write = write
                .delete(key)
                .delete_under(e.store.membranes_prefix(name))
                .delete_under(e.store.live_prefix(name));
            Ok(Step::Write {
                write,
                lease: None,
                done: move || {
                    let store = e.store.clone();
                    tokio::spawn(async move {
                        for l in leases {
                            store.revoke(l).await;
                        }
                    });
                },
            })
        })
        .await
    }

    pub(super) async fn register_etcd(
        &self,
        e: &Arc<EtcdBackend>,
        caller: &super::Caller,
        ns_name: &NamespaceName,
        id: &MembraneId,
        reg: Arc<Registration>,
    ) -> Result<RegisterResponse, RegistryError> {
        self.write_loop(e, "this membrane", || async {
            let now = SystemTime::now();
            // Validate against this replica's copy; the transaction then checks that the
            // copy was current for the keys validation read.
            let (new_ns, ns_rev, ttl, prev, row, resp) = {
                let st = self.state.lock().unwrap();
                let (settings, ns_rev, existing, new_ns) = match st.namespaces.get(ns_name) {
                    Some(ns) => {
                        Self::check_join(caller, ns_name, ns)?;
                        (ns.settings, ns.rev, ns.membranes.get(id), None)
                    }
                    // Open mode: registering into an unknown namespace creates it.
                    None if caller.open => {
                        let (ns, _token) = Self::new_ns(String::new(), Default::default());
                        (ns.settings, 0, None, Some(ns.stored(ns_name)))
                    }
                    None => return Err(RegistryError::NamespaceNotFound(ns_name.clone())),
                };
                let secret = Self::choose_secret(caller, ns_name, id, existing)?;
                self.limits()
                    .check(&st, new_ns.is_some(), existing.is_none())?;
                let registered_at = existing.map(|x| x.registered_at).unwrap_or(now);
                let prev = existing.map(|x| (x.seq, x.live));
                let entry = Entry::registered(0, id, &reg, &secret, registered_at);
                let row = StoredMembrane {
                    seq: 0,
                    namespace: ns_name.clone(),
                    id: id.clone(),
                    registration: reg.clone(),
                    secret_hash: entry.secret_hash,
                    registered_at_ms: to_ms(registered_at),
                };
                let resp = RegisterResponse {
                    membrane: membrane_view(ns_name, id, &entry),
                    instance_secret: secret,
                    created: existing.is_none(),
                    relay_key: None,
                };
                (new_ns, ns_rev, ttl_of(&settings, &reg), prev, row, resp)
            };
            refuse_if_unreachable(e)?;
            // The membrane's own lease; its live key dies with it.
            let lease = e.lease(ttl).await.map_err(unreachable_msg)?;
            let ns_key = e.store.ns_key(ns_name);
            let m_key = e.store.membrane_key(ns_name, id);
            let mut write = CondWrite::new()
                .unchanged(ns_key.clone(), ns_rev)
                .unchanged(m_key.clone(), prev.map(|p| p.0).unwrap_or(0));
            if let Some(ns) = &new_ns {
                write = write.put(ns_key, Etcd::encode_namespace(ns), 0);
            }
            let write = write.put(m_key, Etcd::encode_membrane(&row), 0).put(
                e.store.live_key(ns_name, id),
                Vec::new(),
                lease,
            );
            let old_lease = prev.and_then(|p| p.1);
            Ok(Step::Write {
                write,
                lease: Some(lease),
                done: move || {
                    if let Some(l) = old_lease {
                        revoke_later(&e.store, l);
                    }
                    self.metrics.registrations.inc();
                    resp
                },
            })
        })
        .await
    }

    pub(super) async fn heartbeat_etcd(
        &self,
        e: &Arc<EtcdBackend>,
        caller: &super::Caller,
        ns_name: &NamespaceName,
        id: &MembraneId,
    ) -> Result<(HealthState, u64), RegistryError> {
        self.write_loop(e, "this membrane", || async {
            let (ttl, seq, lease) = {
                let st = self.state.lock().unwrap();
                let not_found = || RegistryError::MembraneNotFound(ns_name.clone(), id.clone());
                let ns = st.namespaces.get(ns_name).ok_or_else(not_found)?;
                let m = ns.membranes.get(id).ok_or_else(not_found)?;
                Self::check_secret(caller, ns_name, id, m)?;
                (ttl_of(&ns.settings, &m.inst.registration), m.seq, m.live)
            };
            refuse_if_unreachable(e)?;
            let passing = move || {
                self.metrics.heartbeats.inc();
                (HealthState::Passing, ttl.as_secs())
            };
            if let Some(lease) = lease
                && e.store.keep_alive(lease).await.map_err(unreachable_msg)?
            {
                let mut st = self.state.lock().unwrap();
                if let Some(m) = st
                    .namespaces
                    .get_mut(ns_name)
                    .and_then(|ns| ns.membranes.get_mut(id))
                {
                    m.last_heartbeat_wall = SystemTime::now();
                    m.last_heartbeat = Instant::now();
                }
                return Ok(Step::Done(passing()));
            }
            // Stale (the lease expired): a new lease and live key, provided the
            // registration is still the one checked.
            let lease = e.store.grant(ttl).await.map_err(unreachable_msg)?;
            let write = CondWrite::new()
                .unchanged(e.store.membrane_key(ns_name, id), seq)
                .put(e.store.live_key(ns_name, id), Vec::new(), lease);
            Ok(Step::Write {
                write,
                lease: Some(lease),
                done: passing,
            })
        })
        .await
    }

    pub(super) async fn deregister_etcd(
        &self,
        e: &Arc<EtcdBackend>,
        caller: &super::Caller,
        ns_name: &NamespaceName,
        id: &MembraneId,
    ) -> Result<(), RegistryError> {
        self.write_loop(e, "this membrane", || async {
            let (seq, lease) = {
                let st = self.state.lock().unwrap();
                let not_found = || RegistryError::MembraneNotFound(ns_name.clone(), id.clone());
                let ns = st.namespaces.get(ns_name).ok_or_else(not_found)?;
                let m = ns.membranes.get(id).ok_or_else(not_found)?;
                Self::check_secret(caller, ns_name, id, m)?;
                (m.seq, m.live)
            };
            let m_key = e.store.membrane_key(ns_name, id);
            let write = CondWrite::new()
                .unchanged(m_key.clone(), seq)
                .delete(m_key)
                .delete(e.store.live_key(ns_name, id));
            Ok(Step::Write {
                write,
                lease: None,
                done: move || {
                    if let Some(l) = lease {
                        revoke_later(&e.store, l);
                    }
                    self.metrics.deregistrations.inc();
                },
            })
        })
        .await
    }

    /// Removes membranes stale for longer than their eviction delay: a delete guarded by
    /// "registration unchanged and no live key", so replicas racing to evict the same
    /// membrane, or an agent coming back meanwhile, are harmless.
    pub(super) fn evict_etcd(self: &Arc<Self>, e: &Arc<EtcdBackend>) {
        if !e.reachable() {
            return;
        }
        let now = Instant::now();
        let due: Vec<(NamespaceName, MembraneId, i64)> = {
            let st = self.state.lock().unwrap();
            st.namespaces
                .iter()
                .flat_map(|(n, ns)| {
                    ns.membranes
                        .iter()
                        .filter(move |(_, m)| {
                            m.state == HealthState::Stale
                                && now.saturating_duration_since(m.state_since)
                                    >= eviction_of(&ns.settings, &m.inst.registration)
                        })
                        .map(move |(i, m)| (n.clone(), i.clone(), m.seq))
                })
                .collect()
        };
        for (n, i, seq) in due {
            if !e.evicting.lock().unwrap().insert((n.clone(), i.clone())) {
                continue;
            }
            let (this, e) = (self.clone(), e.clone());
            tokio::spawn(async move {
                let m_key = e.store.membrane_key(&n, &i);
                let write = CondWrite::new()
                    .unchanged(m_key.clone(), seq)
                    .unchanged(e.store.live_key(&n, &i), 0)
                    .delete(m_key);
                match e.batch.commit(write).await {
                    Ok(out) => {
                        if out.succeeded {
                            this.metrics.evictions.inc();
                            tracing::info!(namespace = %n, id = %i, "evicted after eviction delay");
                        }
                        this.applied(&e, out.revision).await;
                    }
                    Err(err) => {
                        tracing::warn!(namespace = %n, id = %i, error = %err, "eviction failed; retrying later")
                    }
                }
                e.evicting.lock().unwrap().remove(&(n, i));
            });
        }
    }
}
