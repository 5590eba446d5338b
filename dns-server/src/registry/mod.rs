//! The registry: namespaces and membranes in memory, kept durable through the store.
//!
//! Nothing is visible before it is committed. Every change is validated and *staged* under
//! one lock and queued to the store writer in that same order; staged changes are what
//! later writers validate against (so concurrent writes to one membrane stay serialized and
//! group commit keeps batching them), but readers (the API, DNS snapshots, SSE events) see
//! only the committed state. Once a batch is on disk, its changes are published to that
//! state with their events and DNS updates, in commit order, before any of their callers is
//! answered: by the store writer when the state lock is free, else by the first caller to
//! wake (the writer never waits for the lock). When a commit fails, the staged changes are
//! dropped: no reader ever saw them, and every later write is refused until a restart.
//! Heartbeats and health states are soft state: they never touch the store.
//!
//! Health runs on tokio's monotonic clock: `passing` while heartbeats arrive within the
//! instance TTL, `stale` after it, removed once stale for the eviction delay. When a large
//! share of membranes falls silent at once, the sweep suspects the registry and holds
//! stale-marking and evictions (see [`preserve`]).

#[cfg(feature = "etcd")]
mod etcd;
pub mod events;
pub mod preserve;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use sha2::{Digest, Sha256};
use shared::model::InvalidField;
use shared::{
    CreateNamespace, Event, HealthState, MembraneId, MembraneView, NamespaceName,
    NamespaceSettings, NamespaceView, RegisterResponse, Registration,
};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::snapshot::{Instance, NamespaceSnapshot};
use crate::store::sqlite::{Submission, Writer};
use crate::store::{Loaded, Op, StoreError, StoredMembrane, StoredNamespace};
use events::EventHub;
use preserve::{Census, Preservation, PreservationConfig, PreservationStatus};

/// Why a registry operation was refused. Messages are safe to show to clients.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No such namespace.
    #[error("namespace {0} does not exist")]
    NamespaceNotFound(NamespaceName),
    /// No such membrane.
    #[error("membrane {1} is not registered in namespace {0}")]
    MembraneNotFound(NamespaceName, MembraneId),
    /// Namespace already exists.
    #[error("namespace {0} already exists")]
    NamespaceExists(NamespaceName),
    /// Open mode: the membrane is registered by another instance (the caller sent neither
    /// its instance secret nor asked to replace it).
    #[error(
        "membrane {1} is already registered in namespace {0} by another instance; send its \
         X-Membrane-Secret to update it, or register with ?replace=true to take it over"
    )]
    AlreadyRegistered(NamespaceName, MembraneId),
    /// Namespace still has membranes.
    #[error("namespace {0} still has {1} membranes; delete them first or pass ?force=true")]
    NamespaceNotEmpty(NamespaceName, usize),
    /// No credentials where some are needed.
    #[error("{0}")]
    Unauthorized(String),
    /// Credentials that do not grant this.
    #[error("{0}")]
    Forbidden(String),
    /// A field breaks a limit.
    #[error("invalid {0}")]
    Invalid(#[from] InvalidField),
    /// The store failed; writes are refused until a restart.
    #[error("the registry store is unavailable; writes are refused (see the server log)")]
    Unavailable,
    /// Creating this would take the registry past one of its [`Limits`].
    #[error("{0}")]
    Full(String),
    /// The shared store (etcd) cannot be reached or did not commit in time; this replica
    /// keeps serving reads and DNS from its copy.
    #[error("{0}")]
    StoreUnreachable(String),
}

/// Who is asking, as the HTTP layer established it.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The server runs without an admin token: no checks at all.
    pub open: bool,
    /// The caller presented the admin token.
    pub admin: bool,
    /// The bearer token presented, if any and not the admin token.
    pub bearer: Option<String>,
    /// The `X-Membrane-Secret` header, if any.
    pub secret: Option<String>,
    /// `?replace=true`: take over a registration held by another instance (open mode).
    pub replace: bool,
}

impl Caller {
    /// A caller with every right (tests, internal use).
    pub fn admin() -> Self {
        Caller {
            admin: true,
            ..Default::default()
        }
    }
    fn privileged(&self) -> bool {
        self.open || self.admin
    }
}

/// Where namespace snapshots go when they change (the DNS catalog).
pub trait ZoneSink: Send + Sync {
    /// The namespace changed: serve this snapshot.
    fn update(&self, snap: &NamespaceSnapshot);
    /// The namespace is gone.
    fn remove(&self, ns: &NamespaceName);
}

/// Filters of `GET /v1/namespaces/{ns}/membranes`.
#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    /// Offers this service.
    pub service: Option<String>,
    /// Has this capability.
    pub capability: Option<String>,
    /// Has this tag.
    pub tag: Option<String>,
    /// Has this parent.
    pub parent: Option<String>,
    /// Is in this state.
    pub state: Option<HealthState>,
}

/// One node of `GET /v1/namespaces/{ns}/tree`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TreeNode {
    /// Membrane id.
    pub id: MembraneId,
    /// Health state.
    pub state: HealthState,
    /// The registered parent is not (or no longer) registered, or part of a cycle.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub orphan: bool,
    /// This node is [`TREE_DEPTH`] levels deep: its children are not nested here but
    /// listed at the top level, each with [`continues`](Self::continues) naming it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cut: bool,
    /// A top-level entry that belongs under this (registered) parent, whose node was cut.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub continues: Option<MembraneId>,
    /// Children, sorted by id.
    pub children: Vec<TreeNode>,
}

/// Most levels of one tree in `GET /v1/namespaces/{ns}/tree`: deeper parent chains go on
/// in top-level entries, so that building, serializing and dropping a tree never recurse
/// deeper than this whatever chain registrations form.
pub const TREE_DEPTH: usize = 32;

/// Counts for `/status` and `/v1/stats`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Counts {
    /// Namespaces.
    pub namespaces: usize,
    /// Membranes.
    pub membranes: usize,
    /// Passing membranes.
    pub passing: usize,
    /// Stale membranes.
    pub stale: usize,
}

#[derive(Clone)]
struct Entry {
    /// Store row holding this registration (etcd: the registration key's mod revision).
    seq: i64,
    /// etcd: the lease of the membrane's liveness key, while that key exists.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    live: Option<i64>,
    /// When `state` last changed (etcd: eviction counts from the stale transition).
    state_since: Instant,
    /// Id and registration, shared with DNS snapshots.
    inst: Arc<Instance>,
    secret_hash: [u8; 32],
    registered_at: SystemTime,
    last_heartbeat_wall: SystemTime,
    last_heartbeat: Instant,
    state: HealthState,
}

impl Entry {
    /// A just-registered membrane: passing, heartbeat now.
    fn registered(
        seq: i64,
        id: &MembraneId,
        reg: &Arc<Registration>,
        secret: &str,
        registered_at: SystemTime,
    ) -> Entry {
        Entry {
            seq,
            live: None,
            state_since: Instant::now(),
            inst: Arc::new(Instance {
                id: id.clone(),
                registration: reg.clone(),
            }),
            secret_hash: hash_secret(secret),
            registered_at,
            last_heartbeat_wall: SystemTime::now(),
            last_heartbeat: Instant::now(),
            state: HealthState::Passing,
        }
    }
}

struct Ns {
    description: String,
    settings: NamespaceSettings,
    created_at: SystemTime,
    join_token_hash: Option<[u8; 32]>,
    membranes: BTreeMap<MembraneId, Entry>,
    serial: u32,
    /// etcd: the namespace key's mod revision (0 with the embedded store).
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    rev: i64,
}

impl Ns {
    /// Everything but the membranes (which stay empty).
    fn header(&self) -> Ns {
        Ns {
            description: self.description.clone(),
            settings: self.settings,
            created_at: self.created_at,
            join_token_hash: self.join_token_hash,
            membranes: BTreeMap::new(),
            serial: self.serial,
            rev: self.rev,
        }
    }

    fn stored(&self, name: &NamespaceName) -> StoredNamespace {
        StoredNamespace {
            name: name.clone(),
            description: self.description.clone(),
            settings: self.settings,
            created_at_ms: to_ms(self.created_at),
            join_token_hash: self.join_token_hash,
        }
    }
}

/// The instance TTL of a registration in a namespace.
fn ttl_of(settings: &NamespaceSettings, reg: &Registration) -> Duration {
    Duration::from_secs(u64::from(reg.ttl_seconds.unwrap_or(settings.instance_ttl)))
}

/// The eviction delay of a registration in a namespace.
fn eviction_of(settings: &NamespaceSettings, reg: &Registration) -> Duration {
    Duration::from_secs(u64::from(
        reg.eviction_seconds.unwrap_or(settings.eviction_delay),
    ))
}

struct State {
    /// The committed state: the only one readers (API, DNS, events) ever see.
    namespaces: HashMap<NamespaceName, Ns>,
    /// Next store row sequence number.
    next_seq: i64,
    /// Changes queued to the store and not yet committed: what writers validate against.
    staged: Staged,
}

/// Staged (queued, uncommitted) changes, newest per key, tagged with their submission
/// ticket; a key's record goes when the change with that ticket is published.
#[derive(Default)]
struct Staged {
    next_ticket: u64,
    /// Newest staged version of a membrane (`None`: being removed).
    membranes: HashMap<NamespaceName, HashMap<MembraneId, (u64, Option<Entry>)>>,
    /// Newest staged version of a namespace's header (`None`: being deleted).
    namespaces: HashMap<NamespaceName, StagedNs>,
}

struct StagedNs {
    ticket: u64,
    /// The header (no membranes) once the staged changes commit; `None`: deleted.
    ns: Option<Ns>,
    /// A staged deletion hides the committed membranes of this name from writers.
    fresh: bool,
}

/// One change to the committed state, published once its commit is on disk.
enum Change {
    /// Put (`Some`) or remove (`None`) a membrane of an existing namespace.
    Membrane(NamespaceName, MembraneId, Option<Entry>),
    /// Create a namespace, or replace its header (membranes are kept).
    PutNs(NamespaceName, Ns),
    /// Delete a namespace with its membranes.
    DeleteNs(NamespaceName),
}

impl State {
    /// The namespace as writers see it: committed plus staged. Only its header fields
    /// are meaningful (a staged one has no membranes); see [`State::staged_membrane`].
    fn staged_ns(&self, name: &NamespaceName) -> Option<&Ns> {
        match self.staged.namespaces.get(name) {
            Some(s) => s.ns.as_ref(),
            None => self.namespaces.get(name),
        }
    }

    /// Whether the committed membranes of `name` are still the writers' view.
    fn committed_members_current(&self, name: &NamespaceName) -> bool {
        !self.staged.namespaces.get(name).is_some_and(|s| s.fresh)
    }

    /// A membrane as writers see it: committed plus staged.
    fn staged_membrane(&self, ns: &NamespaceName, id: &MembraneId) -> Option<&Entry> {
        if let Some((_, e)) = self.staged.membranes.get(ns).and_then(|m| m.get(id)) {
            return e.as_ref();
        }
        if !self.committed_members_current(ns) {
            return None;
        }
        self.namespaces.get(ns)?.membranes.get(id)
    }

    /// Ids of the membranes of `ns` as writers see them, sorted.
    fn staged_ids(&self, ns: &NamespaceName) -> Vec<MembraneId> {
        let mut ids: std::collections::BTreeSet<MembraneId> = BTreeSet::new();
        if self.committed_members_current(ns)
            && let Some(n) = self.namespaces.get(ns)
        {
            ids.extend(n.membranes.keys().cloned());
        }
        for (id, (_, e)) in self.staged.membranes.get(ns).into_iter().flatten() {
            if e.is_some() {
                ids.insert(id.clone());
            } else {
                ids.remove(id);
            }
        }
        ids.into_iter().collect()
    }

    /// Records `changes` under a new ticket: writers see them from now on, readers not.
    fn stage(&mut self, changes: &[Change]) -> u64 {
        let t = self.staged.next_ticket;
        self.staged.next_ticket += 1;
        for c in changes {
            match c {
                Change::Membrane(n, i, e) => {
                    self.staged
                        .membranes
                        .entry(n.clone())
                        .or_default()
                        .insert(i.clone(), (t, e.clone()));
                }
                Change::PutNs(n, ns) => {
                    let fresh = !self.committed_members_current(n);
                    self.staged.namespaces.insert(
                        n.clone(),
                        StagedNs {
                            ticket: t,
                            ns: Some(ns.header()),
                            fresh,
                        },
                    );
                }
                Change::DeleteNs(n) => {
                    self.staged.membranes.remove(n);
                    self.staged.namespaces.insert(
                        n.clone(),
                        StagedNs {
                            ticket: t,
                            ns: None,
                            fresh: true,
                        },
                    );
                }
            }
        }
        t
    }

    /// Applies the committed `changes` of ticket `t` to the visible state and drops their
    /// staged records (unless a newer staged change of the same key replaced them).
    fn publish(&mut self, t: u64, changes: Vec<Change>) {
        for c in changes {
            match c {
                Change::Membrane(n, i, e) => {
                    if let Some(m) = self.staged.membranes.get_mut(&n) {
                        if m.get(&i).is_some_and(|(x, _)| *x == t) {
                            m.remove(&i);
                        }
                        if m.is_empty() {
                            self.staged.membranes.remove(&n);
                        }
                    }
                    if let Some(ns) = self.namespaces.get_mut(&n) {
                        match e {
                            Some(e) => ns.membranes.insert(i, e),
                            None => ns.membranes.remove(&i),
                        };
                        ns.serial = ns.serial.wrapping_add(1);
                    }
                }
                Change::PutNs(n, header) => {
                    self.unstage_ns(t, &n);
                    match self.namespaces.get_mut(&n) {
                        Some(ns) => {
                            ns.description = header.description;
                            ns.settings = header.settings;
                            ns.join_token_hash = header.join_token_hash;
                        }
                        None => {
                            self.namespaces.insert(n, header);
                        }
                    }
                }
                Change::DeleteNs(n) => {
                    self.unstage_ns(t, &n);
                    self.namespaces.remove(&n);
                }
            }
        }
    }

    fn unstage_ns(&mut self, t: u64, n: &NamespaceName) {
        if self.staged.namespaces.get(n).is_some_and(|s| s.ticket == t) {
            self.staged.namespaces.remove(n);
        }
    }

    /// A commit failed: drop every staged change (the writer fails everything queued
    /// after it). Returns how many records were dropped.
    fn unstage_all(&mut self) -> usize {
        let n = self.staged.namespaces.len()
            + self
                .staged
                .membranes
                .values()
                .map(HashMap::len)
                .sum::<usize>();
        self.staged.namespaces.clear();
        self.staged.membranes.clear();
        n
    }
}

/// Publishes one committed write to the visible state; returns the namespaces whose DNS
/// snapshot must be rebuilt.
type Publication = Box<dyn FnOnce(&mut State) -> Vec<NamespaceName> + Send>;

/// Committed writes not yet published, in commit order, by submission ticket.
#[derive(Default)]
struct CommitQueue {
    queue: Mutex<Vec<(u64, Publication)>>,
    /// Every ticket below this is published (set under the state lock, after publishing).
    published: std::sync::atomic::AtomicU64,
}

/// What publishing committed writes needs (the store writer holds one).
struct Committed {
    state: Arc<Mutex<State>>,
    committed: Arc<CommitQueue>,
    dirty: Arc<Dirty>,
}

impl Committed {
    /// Whether the write with `ticket` is published.
    fn is_published(&self, ticket: u64) -> bool {
        self.committed.published.load(Ordering::Acquire) > ticket
    }

    /// Publishes, in commit order, every committed write not yet published.
    fn publish_committed(&self) {
        let mut st = self.state.lock().unwrap();
        self.publish_with(&mut st);
    }

    /// [`Committed::publish_committed`] if the state lock is free right now.
    fn try_publish_committed(&self) {
        if let Ok(mut st) = self.state.try_lock() {
            self.publish_with(&mut st);
        }
    }

    fn publish_with(&self, st: &mut std::sync::MutexGuard<'_, State>) {
        let dirty = self.publish_locked(st);
        if !dirty.is_empty() {
            self.dirty.mark(dirty);
        }
    }

    /// Publishes the queue with the state lock held (taken under it, so queue order is
    /// publication order).
    fn publish_locked(&self, st: &mut State) -> Vec<NamespaceName> {
        let queue = std::mem::take(&mut *self.committed.queue.lock().unwrap());
        let mut dirty = Vec::new();
        let mut last = None;
        for (ticket, publish) in queue {
            dirty.extend(publish(st));
            last = Some(ticket);
        }
        if let Some(t) = last {
            self.committed.published.store(t + 1, Ordering::Release);
        }
        dirty
    }
}

/// One write to submit (see [`Registry::submit`]).
#[derive(Default)]
struct Write {
    /// Store operations.
    ops: Vec<Op>,
    /// The changes they make to the visible state, staged until committed.
    changes: Vec<Change>,
    /// The events reporting them.
    events: Vec<(NamespaceName, Event)>,
    /// Namespaces whose DNS snapshot must be rebuilt.
    dirty: Vec<NamespaceName>,
}

/// A write queued to the store: see [`Registry::durable`].
struct Queued {
    ticket: u64,
    rx: oneshot::Receiver<Result<(), ()>>,
}

/// Namespaces whose DNS snapshot must be rebuilt.
#[derive(Default)]
struct Dirty {
    set: Mutex<HashSet<NamespaceName>>,
    notify: Notify,
}

impl Dirty {
    fn mark(&self, ns: impl IntoIterator<Item = NamespaceName>) {
        self.set.lock().unwrap().extend(ns);
        self.notify.notify_one();
    }
}

/// Where writes go.
enum Backend {
    /// The embedded store: memory first, then the writer thread commits.
    Sqlite(Writer),
    /// etcd: writes commit in etcd first; memory follows the watch.
    #[cfg(feature = "etcd")]
    Etcd(Arc<etcd::EtcdBackend>),
}

/// Caps on what writers can make the registry hold (memory, store, DNS): a join-token
/// holder, or anyone in open mode, could otherwise register without end. Checked against
/// the committed state when a write creates a namespace or membrane; writes in flight at
/// the same moment (and, with etcd, on other replicas) can pass it by their number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most namespaces.
    pub namespaces: usize,
    /// Most membranes, all namespaces together.
    pub membranes: usize,
}

/// Default of `--max-namespaces`.
pub const DEFAULT_MAX_NAMESPACES: usize = 10_000;
/// Default of `--max-membranes`: five times the fleet the server is benchmarked with.
pub const DEFAULT_MAX_MEMBRANES: usize = 100_000;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            namespaces: DEFAULT_MAX_NAMESPACES,
            membranes: DEFAULT_MAX_MEMBRANES,
        }
    }
}

impl Limits {
    /// Refuses a write that creates a namespace (`new_ns`) and/or a membrane
    /// (`new_membrane`) when `st` already holds the most allowed.
    fn check(&self, st: &State, new_ns: bool, new_membrane: bool) -> Result<(), RegistryError> {
        if new_ns && st.namespaces.len() >= self.namespaces {
            return Err(RegistryError::Full(format!(
                "the registry holds its maximum of {} namespaces (--max-namespaces); delete \
                 unused ones or raise the limit",
                self.namespaces
            )));
        }
        if new_membrane {
            let held: usize = st.namespaces.values().map(|n| n.membranes.len()).sum();
            if held >= self.membranes {
                return Err(RegistryError::Full(format!(
                    "the registry holds its maximum of {} membranes (--max-membranes); \
                     deregister unused ones or raise the limit",
                    self.membranes
                )));
            }
        }
        Ok(())
    }
}

/// The registry. Share it as `Arc<Registry>`.
pub struct Registry {
    state: Arc<Mutex<State>>,
    /// Committed writes waiting to be published, in commit order.
    committed: Arc<CommitQueue>,
    /// Live registrations of missing namespaces found at start (kept on disk, not served).
    orphaned: BTreeMap<String, usize>,
    backend: Backend,
    events: Arc<EventHub>,
    dirty: Arc<Dirty>,
    metrics: Arc<Metrics>,
    failed: Arc<AtomicBool>,
    /// Ticket + 1 of the last submission nobody awaits (a health change; 0: none).
    detached: std::sync::atomic::AtomicU64,
    /// Self-preservation state of the health sweep.
    preserve: Mutex<Preservation>,
    /// Caps on namespaces and membranes.
    limits: Mutex<Limits>,
}

fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// SHA-256 of a token or secret.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// A fresh random token: 32 bytes, hex.
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unix_serial() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(1)
}

impl Registry {
    /// Builds the registry from what the store loaded. Every membrane starts `passing` with
    /// one fresh TTL to heartbeat again.
    pub fn new(loaded: Loaded, writer: Writer, metrics: Arc<Metrics>) -> Self {
        let now = Instant::now();
        let wall = SystemTime::now();
        let serial = unix_serial();
        let next_seq = loaded.next_seq;
        let orphaned = loaded.orphaned;
        let mut namespaces: HashMap<NamespaceName, Ns> = loaded
            .namespaces
            .into_iter()
            .map(|n| {
                (
                    n.name,
                    Ns {
                        description: n.description,
                        settings: n.settings,
                        created_at: from_ms(n.created_at_ms),
                        join_token_hash: n.join_token_hash,
                        membranes: BTreeMap::new(),
                        serial,
                        rev: 0,
                    },
                )
            })
            .collect();
        for m in loaded.membranes {
            if let Some(ns) = namespaces.get_mut(&m.namespace) {
                ns.membranes.insert(
                    m.id.clone(),
                    Entry {
                        inst: Arc::new(Instance {
                            id: m.id,
                            registration: m.registration,
                        }),
                        seq: m.seq,
                        live: None,
                        state_since: now,
                        secret_hash: m.secret_hash,
                        registered_at: from_ms(m.registered_at_ms),
                        last_heartbeat_wall: wall,
                        last_heartbeat: now,
                        state: HealthState::Passing,
                    },
                );
            }
        }
        // Registrations served again with no event (see `EventLog::adopted`): their
        // namespace's subscribers list.
        let adopted = loaded.events.adopted.iter().filter_map(|ns| {
            let ns = NamespaceName::new(ns).ok()?;
            namespaces.contains_key(&ns).then(|| {
                let event = Event::Resync {
                    namespace: ns.clone(),
                };
                (ns, event)
            })
        });
        // Health is soft state: membranes last announced stale start passing again, and
        // subscribers resuming their streams are told so.
        let revived = loaded.events.stale.iter().filter_map(|(ns, id)| {
            let (ns, id) = (NamespaceName::new(ns).ok()?, MembraneId::new(id).ok()?);
            namespaces.get(&ns)?.membranes.contains_key(&id).then(|| {
                let event = Event::StateChanged {
                    namespace: ns.clone(),
                    id,
                    state: HealthState::Passing,
                };
                (ns, event)
            })
        });
        // The first events of this start.
        let first: Vec<(NamespaceName, Event)> = adopted.chain(revived).collect();
        let events = Arc::new(EventHub::from_log(&loaded.events));
        let dirty = Arc::new(Dirty::default());
        dirty.mark(namespaces.keys().cloned());
        let registry = Registry {
            state: Arc::new(Mutex::new(State {
                namespaces,
                next_seq,
                staged: Staged::default(),
            })),
            committed: Default::default(),
            orphaned,
            backend: Backend::Sqlite(writer),
            events,
            dirty,
            metrics,
            failed: Arc::new(AtomicBool::new(false)),
            detached: Default::default(),
            preserve: Mutex::new(Preservation::new(PreservationConfig::default())),
            limits: Mutex::new(Limits::default()),
        };
        if !first.is_empty() {
            let mut st = registry.state.lock().unwrap();
            registry.submit_detached(
                &mut st,
                Write {
                    events: first,
                    ..Default::default()
                },
            );
        }
        registry
    }

    /// Sets the self-preservation rule of the health sweep (see [`preserve`]).
    pub fn set_self_preservation(&self, cfg: PreservationConfig) {
        self.preserve.lock().unwrap().set_config(cfg);
    }

    /// Sets the caps on namespaces and membranes.
    pub fn set_limits(&self, limits: Limits) {
        *self.limits.lock().unwrap() = limits;
    }

    fn limits(&self) -> Limits {
        *self.limits.lock().unwrap()
    }

    /// Self-preservation as of the last sweep (for `/status`).
    pub fn self_preservation(&self) -> PreservationStatus {
        self.preserve.lock().unwrap().status(Instant::now())
    }

    /// The event hub (for SSE).
    pub fn events(&self) -> &EventHub {
        &self.events
    }

    /// Whether writes are refused: the store has failed, or etcd is unreachable.
    pub fn store_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed) || !self.store_reachable()
    }

    /// Whether the store can be reached: always for the embedded store; for etcd, whether
    /// this replica's watch is connected (its copy is current).
    pub fn store_reachable(&self) -> bool {
        match &self.backend {
            Backend::Sqlite(_) => true,
            #[cfg(feature = "etcd")]
            Backend::Etcd(e) => e.reachable(),
        }
    }

    /// Live registrations of namespaces that do not exist, found at start: kept on disk
    /// untouched, not served (see `/status`).
    pub fn orphaned(&self) -> &BTreeMap<String, usize> {
        &self.orphaned
    }

    /// Refreshes the count gauges; called when metrics are scraped, never on a write path
    /// (counting is O(membranes)).
    pub fn update_gauges(&self) {
        let c = self.counts();
        self.metrics.set_counts(c.namespaces, c.passing, c.stale);
    }

    /// Stages the write's `changes` and queues its `ops` (in lock order: `st` is the held
    /// state lock); returns a receiver that resolves once they are durable. Once committed, the
    /// changes are published to the visible state with their `events`, and `dirty`
    /// namespaces are marked for DNS, in commit order, before the caller is answered (see
    /// [`Registry::durable`]). If the commit fails, nothing of it is ever visible.
    ///
    /// The store writer never waits for the state lock on success: it queues the committed
    /// publication and wakes the caller, who publishes everything committed so far under
    /// one lock; only a submission nobody awaits (see [`Registry::submit_detached`]) is
    /// published by the writer itself.
    fn submit(&self, st: &mut State, write: Write) -> Queued {
        self.submit_with(st, write, true)
    }

    /// [`Registry::submit`] for a change nobody awaits (a sweep's stale marking, a
    /// heartbeat's revival): the store writer publishes it once committed.
    ///
    /// Known when submitting, not guessed from the receiver: the writer may commit before
    /// the submitter (still holding the state lock) has dropped the receiver, and a
    /// publication left to a receiver about to be dropped would never happen: no event,
    /// and DNS never rebuilt.
    fn submit_detached(&self, st: &mut State, write: Write) {
        let queued = self.submit_with(st, write, false);
        self.detached
            .fetch_max(queued.ticket + 1, Ordering::Relaxed);
    }

    fn submit_with(&self, st: &mut State, write: Write, awaited: bool) -> Queued {
        let Write {
            ops,
            changes,
            events,
            dirty,
        } = write;
        let (tx, rx) = oneshot::channel();
        let ticket = st.stage(&changes);
        let hub = self.events.clone();
        match &self.backend {
            Backend::Sqlite(writer) => {
                let shared = self.shared();
                let failed = self.failed.clone();
                let done: crate::store::sqlite::Done =
                    Box::new(move |r: Result<Vec<_>, &StoreError>| match r {
                        Ok(framed) => {
                            // Numbered, framed and committed by the writer.
                            let publish: Publication = Box::new(move |st: &mut State| {
                                st.publish(ticket, changes);
                                // Under the state lock: a list and the event revision it
                                // reports agree.
                                for (ns, item) in framed {
                                    hub.publish_sequenced(&ns, item);
                                }
                                dirty
                            });
                            shared
                                .committed
                                .queue
                                .lock()
                                .unwrap()
                                .push((ticket, publish));
                            // Publish here while that costs no waiting (the writer has
                            // time while the next fsync runs); else the caller does.
                            shared.try_publish_committed();
                            // An awaited write whose caller has gone is published by
                            // the caller's drop guard if the caller took the receiver
                            // past this send, else here.
                            let abandoned = !awaited || tx.send(Ok(())).is_err();
                            if abandoned && !shared.is_published(ticket) {
                                // Nobody waits to publish it.
                                shared.publish_committed();
                            }
                        }
                        Err(_) => {
                            // The writer fails everything queued after a failure; writes
                            // are refused until a restart reloads from disk.
                            let mut st = shared.state.lock().unwrap();
                            let dirty = shared.publish_locked(&mut st);
                            failed.store(true, Ordering::Relaxed);
                            let dropped = st.unstage_all();
                            drop(st);
                            shared.dirty.mark(dirty);
                            if dropped > 0 {
                                tracing::warn!(
                                    changes = dropped,
                                    "store failure: changes not committed were dropped \
                                     (never visible in the API, DNS or events)"
                                );
                            }
                            let _ = tx.send(Err(()));
                        }
                    });
                if writer.submit(Submission { ops, events, done }).is_err() {
                    self.failed.store(true, Ordering::Relaxed);
                    st.unstage_all();
                }
            }
            // Memory follows the etcd watch: nothing is ever queued here.
            #[cfg(feature = "etcd")]
            Backend::Etcd(_) => {
                debug_assert!(ops.is_empty(), "etcd mode never queues store ops");
                st.publish(ticket, changes);
                for (ns, ev) in events {
                    hub.publish(&ns, ev);
                }
                if !dirty.is_empty() {
                    self.dirty.mark(dirty);
                }
                let _ = tx.send(Ok(()));
            }
        }
        Queued { ticket, rx }
    }

    fn shared(&self) -> Committed {
        Committed {
            state: self.state.clone(),
            committed: self.committed.clone(),
            dirty: self.dirty.clone(),
        }
    }

    /// Waits until the write is durable, then (also if this future is dropped meanwhile)
    /// makes sure it is published: unless already done, publishes every committed write
    /// not yet published, this one included.
    async fn durable(&self, queued: Queued) -> Result<(), RegistryError> {
        struct PublishOnDrop(Committed, u64);
        impl Drop for PublishOnDrop {
            fn drop(&mut self) {
                if !self.0.is_published(self.1) {
                    self.0.publish_committed();
                }
            }
        }
        let _publish = PublishOnDrop(self.shared(), queued.ticket);
        match queued.rx.await {
            Ok(Ok(())) => Ok(()),
            _ => Err(RegistryError::Unavailable),
        }
    }

    /// Resolves once everything submitted before it has committed and its events are
    /// published (the writer commits in submission order).
    pub async fn flush(&self) {
        let queued = {
            let mut st = self.state.lock().unwrap();
            self.submit(&mut st, Write::default())
        };
        let _ = self.durable(queued).await;
    }

    /// Resolves once every health change made so far has its event committed and
    /// published. Health changes are visible at once (the sweep, a heartbeat's revival)
    /// while their events commit a moment later: a list answered before that could show
    /// an agent a state (say `stale`) that a crash would then forget to tell it has changed.
    /// Costs nothing when none is in flight.
    pub async fn health_durable(&self) {
        let last = self.detached.load(Ordering::Relaxed);
        if last > 0 && !self.shared().is_published(last - 1) {
            self.flush().await;
        }
    }

    fn check_writable(&self) -> Result<(), RegistryError> {
        if self.store_failed() {
            Err(RegistryError::Unavailable)
        } else {
            Ok(())
        }
    }

    fn require_admin(caller: &Caller) -> Result<(), RegistryError> {
        if caller.privileged() {
            Ok(())
        } else if caller.bearer.is_none() {
            Err(RegistryError::Unauthorized(
                "this needs the admin token: send Authorization: Bearer TOKEN".into(),
            ))
        } else {
            Err(RegistryError::Forbidden(
                "this needs the admin token; the token sent is not it".into(),
            ))
        }
    }

    fn new_ns(description: String, settings: NamespaceSettings) -> (Ns, String) {
        let token = new_token();
        let ns = Ns {
            description,
            settings,
            created_at: SystemTime::now(),
            join_token_hash: Some(hash_secret(&token)),
            membranes: BTreeMap::new(),
            serial: unix_serial(),
            rev: 0,
        };
        (ns, token)
    }

    /// Creates a namespace; the answer carries its join token.
    pub async fn create_namespace(
        &self,
        caller: &Caller,
        req: CreateNamespace,
    ) -> Result<NamespaceView, RegistryError> {
        Self::require_admin(caller)?;
        req.settings.validate()?;
        if req.description.len() > 1024 {
            return Err(InvalidField {
                field: "description".into(),
                message: "at most 1024 bytes".into(),
            }
            .into());
        }
        #[cfg(feature = "etcd")]
        if let Backend::Etcd(e) = &self.backend {
            return self.create_namespace_etcd(e, req).await;
        }
        let (rx, view) = {
            let mut st = self.state.lock().unwrap();
            self.check_writable()?;
            if st.staged_ns(&req.name).is_some() {
                return Err(RegistryError::NamespaceExists(req.name));
            }
            self.limits().check(&st, true, false)?;
            let (ns, token) = Self::new_ns(req.description, req.settings);
            let mut view = ns_view(&req.name, &ns);
            view.join_token = Some(token);
            let stored = ns.stored(&req.name);
            let rx = self.submit(
                &mut st,
                Write {
                    ops: vec![Op::PutNamespace(stored)],
                    changes: vec![Change::PutNs(req.name.clone(), ns)],
                    dirty: vec![req.name.clone()],
                    ..Default::default()
                },
            );
            (rx, view)
        };
        self.durable(rx).await?;
        Ok(view)
    }

    /// Replaces a namespace's join token; the old one stops working.
    pub async fn rotate_join_token(
        &self,
        caller: &Caller,
        name: &NamespaceName,
    ) -> Result<NamespaceView, RegistryError> {
        Self::require_admin(caller)?;
        #[cfg(feature = "etcd")]
        if let Backend::Etcd(e) = &self.backend {
            return self.rotate_join_token_etcd(e, name).await;
        }
        let (rx, view) = {
            let mut st = self.state.lock().unwrap();
            self.check_writable()?;
            let mut ns = st
                .staged_ns(name)
                .ok_or_else(|| RegistryError::NamespaceNotFound(name.clone()))?
                .header();
            let token = new_token();
            ns.join_token_hash = Some(hash_secret(&token));
            let mut view = match st.namespaces.get(name) {
                Some(committed) if st.committed_members_current(name) => ns_view(name, committed),
                _ => ns_view(name, &ns),
            };
            view.join_token = Some(token);
            let stored = ns.stored(name);
            let rx = self.submit(
                &mut st,
                Write {
                    ops: vec![Op::PutNamespace(stored)],
                    changes: vec![Change::PutNs(name.clone(), ns)],
                    ..Default::default()
                },
            );
            (rx, view)
        };
        self.durable(rx).await?;
        Ok(view)
    }

    /// Deletes a namespace; with membranes only when `force`.
    pub async fn delete_namespace(
        &self,
        caller: &Caller,
        name: &NamespaceName,
        force: bool,
    ) -> Result<(), RegistryError> {
        Self::require_admin(caller)?;
        #[cfg(feature = "etcd")]
        if let Backend::Etcd(e) = &self.backend {
            return self.delete_namespace_etcd(e, name, force).await;
        }
        let rx = {
            let mut st = self.state.lock().unwrap();
            self.check_writable()?;
            if st.staged_ns(name).is_none() {
                return Err(RegistryError::NamespaceNotFound(name.clone()));
            }
            let ids = st.staged_ids(name);
            if !ids.is_empty() && !force {
                return Err(RegistryError::NamespaceNotEmpty(name.clone(), ids.len()));
            }
            let events = ids
                .into_iter()
                .map(|id| {
                    (
                        name.clone(),
                        Event::Deregistered {
                            namespace: name.clone(),
                            id,
                            reason: "namespace_deleted".into(),
                        },
                    )
                })
                .collect();
            self.submit(
                &mut st,
                Write {
                    ops: vec![Op::DeleteNamespace(name.clone())],
                    changes: vec![Change::DeleteNs(name.clone())],
                    events,
                    dirty: vec![name.clone()],
                },
            )
        };
        self.durable(rx).await
    }

    /// Registers (or updates) a membrane: idempotent upsert keyed by (namespace, id).
    /// Logs the outcome: info once committed, debug when refused.
    pub async fn register(
        &self,
        caller: &Caller,
        ns_name: &NamespaceName,
        id: &MembraneId,
        reg: Registration,
    ) -> Result<RegisterResponse, RegistryError> {
        let addresses = reg.addresses.len();
        match self.register_inner(caller, ns_name, id, reg).await {
            Ok(resp) => {
                // Not created and not the caller's secret: someone else's registration.
                let takeover = !resp.created
                    && caller.secret.as_deref() != Some(resp.instance_secret.as_str());
                tracing::info!(
                    namespace = %ns_name,
                    id = %id,
                    created = resp.created,
                    takeover,
                    addresses,
                    "registered"
                );
                Ok(resp)
            }
            Err(e) => {
                tracing::debug!(namespace = %ns_name, id = %id, error = %e, "registration refused");
                Err(e)
            }
        }
    }

    async fn register_inner(
        &self,
        caller: &Caller,
        ns_name: &NamespaceName,
        id: &MembraneId,
        reg: Registration,
    ) -> Result<RegisterResponse, RegistryError> {
        reg.validate()?;
        let reg = Arc::new(reg);
        #[cfg(feature = "etcd")]
        if let Backend::Etcd(e) = &self.backend {
            return self.register_etcd(e, caller, ns_name, id, reg).await;
        }
        let (rx, resp) = {
            let mut st = self.state.lock().unwrap();
            self.check_writable()?;
            let mut ops = Vec::with_capacity(2);
            let mut changes = Vec::with_capacity(2);
            let new_ns = match st.staged_ns(ns_name) {
                Some(ns) => {
                    Self::check_join(caller, ns_name, ns)?;
                    false
                }
                None if caller.open => {
                    // Open mode: registering into an unknown namespace creates it.
                    let (ns, _token) = Self::new_ns(String::new(), NamespaceSettings::default());
                    ops.push(Op::PutNamespace(ns.stored(ns_name)));
                    changes.push(Change::PutNs(ns_name.clone(), ns));
                    true
                }
                None => return Err(RegistryError::NamespaceNotFound(ns_name.clone())),
            };
            let existing = st.staged_membrane(ns_name, id);
            let secret = Self::choose_secret(caller, ns_name, id, existing)?;
            self.limits().check(&st, new_ns, existing.is_none())?;
            let now = SystemTime::now();
            let created = existing.is_none();
            let registered_at = existing.map(|e| e.registered_at).unwrap_or(now);
            let was_passing = existing.map(|e| e.state == HealthState::Passing);
            let supersedes = existing.map(|e| e.seq);
            let seq = st.next_seq;
            st.next_seq += 1;
            let entry = Entry::registered(seq, id, &reg, &secret, registered_at);
            let view = membrane_view(ns_name, id, &entry);
            ops.push(Op::PutMembrane {
                row: Box::new(StoredMembrane {
                    seq,
                    namespace: ns_name.clone(),
                    id: id.clone(),
                    registration: reg,
                    secret_hash: entry.secret_hash,
                    registered_at_ms: to_ms(registered_at),
                }),
                supersedes,
            });
            changes.push(Change::Membrane(ns_name.clone(), id.clone(), Some(entry)));
            let mut events = vec![(
                ns_name.clone(),
                Event::Registered {
                    membrane: Box::new(view.clone()),
                },
            )];
            if was_passing == Some(false) {
                events.push((
                    ns_name.clone(),
                    Event::StateChanged {
                        namespace: ns_name.clone(),
                        id: id.clone(),
                        state: HealthState::Passing,
                    },
                ));
            }
            self.metrics.registrations.inc();
            let rx = self.submit(
                &mut st,
                Write {
                    ops,
                    changes,
                    events,
                    dirty: vec![ns_name.clone()],
                },
            );
            (
                rx,
                RegisterResponse {
                    membrane: view,
                    instance_secret: secret,
                    created,
                    relay_key: None,
                },
            )
        };
        self.durable(rx).await?;
        Ok(resp)
    }

    /// A registration in `ns` needs its join token (or the admin token).
    fn check_join(caller: &Caller, ns_name: &NamespaceName, ns: &Ns) -> Result<(), RegistryError> {
        if caller.privileged() {
            return Ok(());
        }
        match &caller.bearer {
            None => Err(RegistryError::Unauthorized(format!(
                "registering in {ns_name} needs its join token or the admin token: \
                 send Authorization: Bearer TOKEN"
            ))),
            Some(t) if ns.join_token_hash != Some(hash_secret(t)) => Err(RegistryError::Forbidden(
                format!("the token sent is not the join token of namespace {ns_name}"),
            )),
            Some(_) => Ok(()),
        }
    }

    /// The instance secret of a (re-)registration: the caller's when it matches the
    /// existing one (the same instance); for a new membrane or a takeover, the caller's own
    /// when it sent a strong one (an agent picks its secret before its first registration,
    /// so retrying a registration whose answer was lost is still the same instance), else
    /// a fresh one.
    ///
    /// A takeover (another instance's registration, no matching secret) needs the admin
    /// token, or in open mode an explicit `?replace=true`: without it, open mode answers
    /// 409 instead of silently handing the membrane (and its messages) to the newcomer.
    fn choose_secret(
        caller: &Caller,
        ns_name: &NamespaceName,
        id: &MembraneId,
        existing: Option<&Entry>,
    ) -> Result<String, RegistryError> {
        match (existing, &caller.secret) {
            (Some(e), Some(s)) if e.secret_hash == hash_secret(s) => Ok(s.clone()),
            (Some(_), _) if caller.admin || (caller.open && caller.replace) => {
                Ok(Self::own_secret(caller).unwrap_or_else(new_token))
            }
            (Some(_), _) if caller.open => Err(RegistryError::AlreadyRegistered(
                ns_name.clone(),
                id.clone(),
            )),
            (Some(_), _) => Err(RegistryError::Forbidden(format!(
                "membrane {id} is already registered in {ns_name} by another instance; \
                 send its X-Membrane-Secret to update it"
            ))),
            (None, _) => Ok(Self::own_secret(caller).unwrap_or_else(new_token)),
        }
    }

    /// The secret the caller sent, if strong enough to adopt: 32 to 256 visible ASCII
    /// characters (a fresh server-made one is 64 hex digits).
    fn own_secret(caller: &Caller) -> Option<String> {
        caller
            .secret
            .as_ref()
            .filter(|s| (32..=256).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic()))
            .cloned()
    }

    fn check_secret(
        caller: &Caller,
        ns: &NamespaceName,
        id: &MembraneId,
        e: &Entry,
    ) -> Result<(), RegistryError> {
        if caller.privileged() {
            return Ok(());
        }
        match &caller.secret {
            None => Err(RegistryError::Unauthorized(format!(
                "membrane {id} in {ns}: send the X-Membrane-Secret its registration answered"
            ))),
            Some(s) if hash_secret(s) != e.secret_hash => Err(RegistryError::Forbidden(format!(
                "membrane {id} in {ns}: X-Membrane-Secret does not match its registration"
            ))),
            Some(_) => Ok(()),
        }
    }

    /// Records a heartbeat. Returns the state and the TTL in seconds. With the embedded
    /// store this is soft state (nothing is written); with etcd it renews the membrane's
    /// lease (one round trip) and answers once etcd did. A refused heartbeat is logged at
    /// debug (an unknown membrane is the agent's cue to register again).
    pub async fn heartbeat(
        &self,
        caller: &Caller,
        ns_name: &NamespaceName,
        id: &MembraneId,
    ) -> Result<(HealthState, u64), RegistryError> {
        self.heartbeat_inner(caller, ns_name, id)
            .await
            .inspect_err(|e| {
                tracing::debug!(namespace = %ns_name, id = %id, error = %e, "heartbeat refused");
            })
    }

    async fn heartbeat_inner(
        &self,
        caller: &Caller,
        ns_name: &NamespaceName,
        id: &MembraneId,
    ) -> Result<(HealthState, u64), RegistryError> {
        #[cfg(feature = "etcd")]
        if let Backend::Etcd(e) = &self.backend {
            return self.heartbeat_etcd(e, caller, ns_name, id).await;
        }
        let mut st = self.state.lock().unwrap();
        // A removal in flight (deregistration, eviction, namespace deletion) wins: the
        // agent is told to register again.
        if st.staged_membrane(ns_name, id).is_none() {
            return Err(RegistryError::MembraneNotFound(ns_name.clone(), id.clone()));
        }
        let ns = st
            .namespaces
            .get_mut(ns_name)
            .ok_or_else(|| RegistryError::MembraneNotFound(ns_name.clone(), id.clone()))?;
        let e = ns
            .membranes
            .get(id)
            .ok_or_else(|| RegistryError::MembraneNotFound(ns_name.clone(), id.clone()))?;
        Self::check_secret(caller, ns_name, id, e)?;
        let ttl = ttl_of(&ns.settings, &e.inst.registration).as_secs();
        let e = ns.membranes.get_mut(id).expect("present");
        e.last_heartbeat = Instant::now();
        e.last_heartbeat_wall = SystemTime::now();
        self.metrics.heartbeats.inc();
        if e.state == HealthState::Stale {
            e.state = HealthState::Passing;
            e.state_since = Instant::now();
            ns.serial = ns.serial.wrapping_add(1);
            self.metrics.state_change(HealthState::Passing);
            tracing::info!(
                namespace = %ns_name,
                id = %id,
                state = HealthState::Passing.as_str(),
                "membrane passing again: heartbeat received"
            );
            // No ops: ordering through the writer only, so this event follows any pending
            // registration event of the same membrane.
            self.submit_detached(
                &mut st,
                Write {
                    events: vec![(
                        ns_name.clone(),
                        Event::StateChanged {
                            namespace: ns_name.clone(),
                            id: id.clone(),
                            state: HealthState::Passing,
                        },
                    )],
                    dirty: vec![ns_name.clone()],
                    ..Default::default()
                },
            );
        }
        Ok((HealthState::Passing, ttl))
    }

    /// Removes a membrane at once (graceful agent stop). Logs the outcome: info once
    /// committed, debug when refused.
    pub async fn deregister(
        &self,
        caller: &Caller,
        ns_name: &NamespaceName,
        id: &MembraneId,
    ) -> Result<(), RegistryError> {
        match self.deregister_inner(caller, ns_name, id).await {
            Ok(()) => {
                tracing::info!(namespace = %ns_name, id = %id, "deregistered");
                Ok(())
            }
            Err(e) => {
                tracing::debug!(namespace = %ns_name, id = %id, error = %e, "deregistration refused");
                Err(e)
            }
        }
    }

    async fn deregister_inner(
        &self,
        caller: &Caller,
        ns_name: &NamespaceName,
        id: &MembraneId,
    ) -> Result<(), RegistryError> {
        #[cfg(feature = "etcd")]
        if let Backend::Etcd(e) = &self.backend {
            return self.deregister_etcd(e, caller, ns_name, id).await;
        }
        let rx = {
            let mut st = self.state.lock().unwrap();
            self.check_writable()?;
            let not_found = || RegistryError::MembraneNotFound(ns_name.clone(), id.clone());
            let e = st.staged_membrane(ns_name, id).ok_or_else(not_found)?;
            Self::check_secret(caller, ns_name, id, e)?;
            let supersedes = e.seq;
            let seq = st.next_seq;
            st.next_seq += 1;
            self.metrics.deregistrations.inc();
            self.submit(
                &mut st,
                Write {
                    ops: vec![Op::DeleteMembrane {
                        seq,
                        namespace: ns_name.clone(),
                        id: id.clone(),
                        supersedes,
                    }],
                    changes: vec![Change::Membrane(ns_name.clone(), id.clone(), None)],
                    events: vec![(
                        ns_name.clone(),
                        Event::Deregistered {
                            namespace: ns_name.clone(),
                            id: id.clone(),
                            reason: "deregistered".into(),
                        },
                    )],
                    dirty: vec![ns_name.clone()],
                },
            )
        };
        self.durable(rx).await
    }

    /// Moves membranes past their TTL to `stale` and removes those stale for longer than
    /// their eviction delay. Called periodically by [`Registry::run_health`].
    pub fn sweep(&self) {
        if !matches!(self.backend, Backend::Sqlite(_)) {
            // etcd: stale comes from lease expiry (the watch); see `run_health`.
            return;
        }
        let now = Instant::now();
        let mut st = self.state.lock().unwrap();
        // After a store failure nothing can be removed durably: stale membranes stay stale
        // (out of DNS) until a restart instead of being evicted in memory only.
        let can_evict = !self.failed.load(Ordering::Relaxed);
        // Self-preservation: count first, then hold the namespaces (or the whole registry)
        // where too many membranes fell silent at once.
        let census: HashMap<NamespaceName, Census> = st
            .namespaces
            .iter()
            .map(|(name, ns)| {
                let mut c = Census::default();
                for e in ns.membranes.values() {
                    if e.state == HealthState::Passing {
                        c.passing += 1;
                        if now.saturating_duration_since(e.last_heartbeat)
                            >= ttl_of(&ns.settings, &e.inst.registration)
                        {
                            c.silent += 1;
                        }
                    }
                }
                (name.clone(), c)
            })
            .collect();
        let mut preserve = self.preserve.lock().unwrap();
        let hold = preserve.decide(now, &census);
        self.metrics
            .self_preservation
            .set(i64::from(preserve.active()));
        // Stale marks (events only) and evictions (store writes) go to the store as two
        // submissions: after a store failure a write is refused, events only are not, and
        // a mark is applied in memory already (its event must not be lost with a write).
        let mut marks = Vec::new();
        let mut marked_ns = Vec::new();
        let mut evictions = Write::default();
        let State {
            namespaces,
            next_seq,
            staged,
        } = &mut *st;
        for (ns_name, ns) in namespaces.iter_mut() {
            if hold.holds(ns_name) {
                continue;
            }
            let mut evict = Vec::new();
            let mut marked = 0;
            let released = preserve.released_at(ns_name);
            // A namespace change in flight (deletion) removes its membranes anyway.
            let ns_staged = staged.namespaces.contains_key(ns_name);
            let staged_ids = staged.membranes.get(ns_name);
            for (id, e) in ns.membranes.iter_mut() {
                let ttl = ttl_of(&ns.settings, &e.inst.registration);
                let eviction = eviction_of(&ns.settings, &e.inst.registration);
                let silent = now.saturating_duration_since(e.last_heartbeat);
                // Neither marked nor evicted while a write of it is in flight: that write
                // decides (a re-registration replaces the entry with a passing one, so a
                // `stale` queued behind it would contradict it; a removal removes it). The
                // next sweep looks again.
                let in_flight = ns_staged || staged_ids.is_some_and(|m| m.contains_key(id));
                if in_flight {
                    continue;
                }
                if e.state == HealthState::Stale {
                    if can_evict && now.saturating_duration_since(e.state_since) >= eviction {
                        evict.push(id.clone());
                    }
                } else if silent >= ttl {
                    // Stale since its TTL ran out, or since a self-preservation hold that
                    // kept it passing ended: its eviction delay counts from then.
                    e.state = HealthState::Stale;
                    let expired = e.last_heartbeat + ttl;
                    e.state_since = released.map_or(expired, |r| r.max(expired));
                    marked += 1;
                    self.metrics.state_change(HealthState::Stale);
                    tracing::info!(
                        namespace = %ns_name,
                        id = %id,
                        state = HealthState::Stale.as_str(),
                        silent_ms = silent.as_millis() as u64,
                        "membrane stale: no heartbeat within its TTL"
                    );
                    marks.push((
                        ns_name.clone(),
                        Event::StateChanged {
                            namespace: ns_name.clone(),
                            id: id.clone(),
                            state: HealthState::Stale,
                        },
                    ));
                }
            }
            preserve.record(now, ns_name, marked);
            let mut evicted = false;
            for id in evict {
                let Some(e) = ns.membranes.get(&id) else {
                    continue;
                };
                evicted = true;
                self.metrics.evictions.inc();
                tracing::info!(namespace = %ns_name, id = %id, "evicted after eviction delay");
                evictions.ops.push(Op::DeleteMembrane {
                    seq: *next_seq,
                    namespace: ns_name.clone(),
                    id: id.clone(),
                    supersedes: e.seq,
                });
                evictions
                    .changes
                    .push(Change::Membrane(ns_name.clone(), id.clone(), None));
                *next_seq += 1;
                evictions.events.push((
                    ns_name.clone(),
                    Event::Deregistered {
                        namespace: ns_name.clone(),
                        id,
                        reason: "evicted".into(),
                    },
                ));
            }
            if marked > 0 || evicted {
                ns.serial = ns.serial.wrapping_add(1);
            }
            if marked > 0 {
                marked_ns.push(ns_name.clone());
            }
            if evicted {
                evictions.dirty.push(ns_name.clone());
            }
        }
        drop(preserve);
        if !marks.is_empty() {
            let write = Write {
                events: marks,
                dirty: marked_ns,
                ..Default::default()
            };
            self.submit_detached(&mut st, write);
        }
        if !evictions.events.is_empty() {
            self.submit_detached(&mut st, evictions);
        }
    }

    /// Runs [`Registry::sweep`] every `interval` until `shutdown`.
    pub async fn run_health(
        self: Arc<Self>,
        interval: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    #[cfg(feature = "etcd")]
                    if let Backend::Etcd(e) = &self.backend {
                        self.evict_etcd(e);
                        continue;
                    }
                    self.sweep()
                }
            }
        }
    }

    /// Pushes a fresh snapshot of every changed namespace to `sink`, as changes commit,
    /// until `shutdown`.
    pub async fn run_zone_updates(
        self: Arc<Self>,
        sink: Arc<dyn ZoneSink>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let started = Instant::now();
            let batch: Vec<NamespaceName> = self.dirty.set.lock().unwrap().drain().collect();
            // Rendering large zones takes milliseconds: off the runtime's workers, so that
            // requests in flight (and etcd's client) are not held up meanwhile.
            let (this, to) = (self.clone(), sink.clone());
            let rebuild = tokio::task::spawn_blocking(move || {
                for ns in batch {
                    match this.snapshot(&ns) {
                        Some(snap) => to.update(&snap),
                        None => to.remove(&ns),
                    }
                }
            });
            if let Err(e) = rebuild.await {
                tracing::error!(error = %e, "DNS zone rebuild failed");
            }
            // A lone change is served at once. Under a storm of changes, rebuilding large
            // zones after every commit would starve the API: pace rebuilds so they use at
            // most about a quarter of one core; changes arriving meanwhile are coalesced.
            let spent = started.elapsed();
            if spent > Duration::from_micros(100) {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(spent * 3) => {}
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.dirty.notify.notified() => {}
            }
        }
    }

    /// The DNS view of a namespace: settings and passing membranes.
    pub fn snapshot(&self, name: &NamespaceName) -> Option<NamespaceSnapshot> {
        let st = self.state.lock().unwrap();
        let ns = st.namespaces.get(name)?;
        Some(NamespaceSnapshot {
            name: name.clone(),
            settings: ns.settings,
            serial: ns.serial,
            instances: ns
                .membranes
                .iter()
                .filter(|(_, e)| e.state == HealthState::Passing)
                .map(|(_, e)| e.inst.clone())
                .collect(),
        })
    }

    /// Names of all namespaces.
    pub fn namespace_names(&self) -> Vec<NamespaceName> {
        let st = self.state.lock().unwrap();
        let mut v: Vec<_> = st.namespaces.keys().cloned().collect();
        v.sort();
        v
    }

    /// All namespaces, sorted by name.
    pub fn list_namespaces(&self) -> Vec<NamespaceView> {
        let st = self.state.lock().unwrap();
        let mut v: Vec<_> = st.namespaces.iter().map(|(n, ns)| ns_view(n, ns)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Whether the namespace exists (without building its view, which counts its
    /// membranes).
    pub fn check_namespace(&self, name: &NamespaceName) -> Result<(), RegistryError> {
        if self.state.lock().unwrap().namespaces.contains_key(name) {
            Ok(())
        } else {
            Err(RegistryError::NamespaceNotFound(name.clone()))
        }
    }

    /// One namespace.
    pub fn get_namespace(&self, name: &NamespaceName) -> Result<NamespaceView, RegistryError> {
        let st = self.state.lock().unwrap();
        st.namespaces
            .get(name)
            .map(|ns| ns_view(name, ns))
            .ok_or_else(|| RegistryError::NamespaceNotFound(name.clone()))
    }

    /// One membrane.
    pub fn get(&self, ns: &NamespaceName, id: &MembraneId) -> Result<MembraneView, RegistryError> {
        let st = self.state.lock().unwrap();
        st.namespaces
            .get(ns)
            .and_then(|n| n.membranes.get(id))
            .map(|e| membrane_view(ns, id, e))
            .ok_or_else(|| RegistryError::MembraneNotFound(ns.clone(), id.clone()))
    }

    /// Membranes of a namespace matching `filter`, sorted by id, and the event revision
    /// they include.
    pub fn list(
        &self,
        ns_name: &NamespaceName,
        filter: &ListFilter,
    ) -> Result<(Vec<MembraneView>, u64), RegistryError> {
        let (v, revision) = self.list_shared(ns_name, filter)?;
        Ok((v.iter().map(SharedView::to_view).collect(), revision))
    }

    /// [`Registry::list`] for serializing large answers: each membrane's registration is
    /// shared (a reference count under the lock, not a deep copy) and the views serialize
    /// to exactly what [`MembraneView`] does.
    pub fn list_shared(
        &self,
        ns_name: &NamespaceName,
        filter: &ListFilter,
    ) -> Result<(Vec<SharedView>, u64), RegistryError> {
        let st = self.state.lock().unwrap();
        let revision = self.events.revision();
        let ns = st
            .namespaces
            .get(ns_name)
            .ok_or_else(|| RegistryError::NamespaceNotFound(ns_name.clone()))?;
        let name = Arc::new(ns_name.clone());
        let v = ns
            .membranes
            .values()
            .filter(|e| matches(e, filter))
            .map(|e| SharedView {
                namespace: name.clone(),
                inst: e.inst.clone(),
                state: e.state,
                registered_at: e.registered_at,
                last_heartbeat: e.last_heartbeat_wall,
            })
            .collect();
        Ok((v, revision))
    }

    /// Membranes of every namespace matching `filter` (for the alias routes).
    pub fn list_all(&self, filter: &ListFilter) -> Vec<MembraneView> {
        let st = self.state.lock().unwrap();
        let mut names: Vec<_> = st.namespaces.keys().collect();
        names.sort();
        names
            .into_iter()
            .flat_map(|n| {
                st.namespaces[n]
                    .membranes
                    .iter()
                    .filter(|(_, e)| matches(e, filter))
                    .map(move |(id, e)| membrane_view(n, id, e))
            })
            .collect()
    }

    /// Namespaces in which `id` is registered.
    pub fn find_id(&self, id: &MembraneId) -> Vec<NamespaceName> {
        let st = self.state.lock().unwrap();
        let mut v: Vec<_> = st
            .namespaces
            .iter()
            .filter(|(_, ns)| ns.membranes.contains_key(id))
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    /// The hierarchy of a namespace: roots are membranes without a registered parent.
    pub fn tree(&self, ns_name: &NamespaceName) -> Result<Vec<TreeNode>, RegistryError> {
        let st = self.state.lock().unwrap();
        let ns = st
            .namespaces
            .get(ns_name)
            .ok_or_else(|| RegistryError::NamespaceNotFound(ns_name.clone()))?;
        let mut children: BTreeMap<&MembraneId, Vec<&MembraneId>> = BTreeMap::new();
        let mut roots = Vec::new();
        for (id, e) in &ns.membranes {
            match &e.inst.registration.parent {
                Some(p) if p != id && ns.membranes.contains_key(p) => {
                    children.entry(p).or_default().push(id)
                }
                _ => roots.push((id, e.inst.registration.parent.is_some())),
            }
        }
        /// Builds the subtree of `id`, `depth` levels deep; the children of a node at the
        /// last level go to `cut` (to be listed at the top level).
        struct Walk<'a, 'b> {
            ns: &'a Ns,
            children: &'b BTreeMap<&'a MembraneId, Vec<&'a MembraneId>>,
            seen: HashSet<&'a MembraneId>,
            cut: VecDeque<&'a MembraneId>,
        }
        impl<'a> Walk<'a, '_> {
            fn build(&mut self, id: &'a MembraneId, orphan: bool, depth: usize) -> TreeNode {
                self.seen.insert(id);
                let mut node = TreeNode {
                    id: id.clone(),
                    state: self.ns.membranes[id].state,
                    orphan,
                    cut: false,
                    continues: None,
                    children: Vec::new(),
                };
                for k in self.children.get(id).into_iter().flatten() {
                    if self.seen.contains(*k) {
                        continue;
                    }
                    if depth + 1 >= TREE_DEPTH {
                        self.seen.insert(k);
                        self.cut.push_back(k);
                        node.cut = true;
                    } else {
                        let child = self.build(k, false, depth + 1);
                        node.children.push(child);
                    }
                }
                node
            }
            /// Lists the cut subtrees (and theirs) at the top level.
            fn drain_cut(&mut self, out: &mut Vec<TreeNode>) {
                while let Some(k) = self.cut.pop_front() {
                    let mut node = self.build(k, false, 0);
                    node.continues = self.ns.membranes[k].inst.registration.parent.clone();
                    out.push(node);
                }
            }
        }
        let mut walk = Walk {
            ns,
            children: &children,
            seen: HashSet::new(),
            cut: VecDeque::new(),
        };
        let mut out = Vec::new();
        for (id, orphan) in roots {
            out.push(walk.build(id, orphan, 0));
        }
        walk.drain_cut(&mut out);
        // Parent cycles have no root: show each cycle from its smallest id.
        for id in ns.membranes.keys() {
            if !walk.seen.contains(id) {
                out.push(walk.build(id, true, 0));
                walk.drain_cut(&mut out);
            }
        }
        Ok(out)
    }

    /// Totals.
    pub fn counts(&self) -> Counts {
        counts(&self.state.lock().unwrap())
    }

    /// Totals per namespace.
    pub fn counts_by_namespace(&self) -> BTreeMap<NamespaceName, Counts> {
        let st = self.state.lock().unwrap();
        st.namespaces
            .iter()
            .map(|(n, ns)| {
                let passing = ns
                    .membranes
                    .values()
                    .filter(|e| e.state == HealthState::Passing)
                    .count();
                (
                    n.clone(),
                    Counts {
                        namespaces: 1,
                        membranes: ns.membranes.len(),
                        passing,
                        stale: ns.membranes.len() - passing,
                    },
                )
            })
            .collect()
    }
}

fn counts(st: &State) -> Counts {
    let mut c = Counts {
        namespaces: st.namespaces.len(),
        ..Default::default()
    };
    for ns in st.namespaces.values() {
        c.membranes += ns.membranes.len();
        c.passing += ns
            .membranes
            .values()
            .filter(|e| e.state == HealthState::Passing)
            .count();
    }
    c.stale = c.membranes - c.passing;
    c
}

fn matches(e: &Entry, f: &ListFilter) -> bool {
    let r = &e.inst.registration;
    f.service
        .as_deref()
        .is_none_or(|s| r.services.iter().any(|x| x.name.as_str() == s))
        && f.capability
            .as_deref()
            .is_none_or(|c| r.capabilities.iter().any(|x| x.as_str() == c))
        && f.tag
            .as_deref()
            .is_none_or(|t| r.tags.iter().any(|x| x.as_str() == t))
        && f.parent
            .as_deref()
            .is_none_or(|p| r.parent.as_ref().is_some_and(|x| x.as_str() == p))
        && f.state.is_none_or(|s| s == e.state)
}

/// A membrane as [`MembraneView`] shows it, sharing the registration with the registry
/// (see [`Registry::list_shared`]).
#[derive(Debug, Clone)]
pub struct SharedView {
    namespace: Arc<NamespaceName>,
    inst: Arc<Instance>,
    state: HealthState,
    registered_at: SystemTime,
    last_heartbeat: SystemTime,
}

impl SharedView {
    /// The owned view (a copy of the registration).
    pub fn to_view(&self) -> MembraneView {
        MembraneView {
            id: self.inst.id.clone(),
            namespace: (*self.namespace).clone(),
            registration: (*self.inst.registration).clone(),
            state: self.state,
            registered_at: rfc3339(self.registered_at),
            last_heartbeat: rfc3339(self.last_heartbeat),
        }
    }
}

impl serde::Serialize for SharedView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        /// The same fields, in the same order, as [`MembraneView`].
        #[derive(serde::Serialize)]
        struct Out<'a> {
            id: &'a MembraneId,
            namespace: &'a NamespaceName,
            #[serde(flatten)]
            registration: &'a shared::Registration,
            state: HealthState,
            registered_at: String,
            last_heartbeat: String,
        }
        Out {
            id: &self.inst.id,
            namespace: &self.namespace,
            registration: &self.inst.registration,
            state: self.state,
            registered_at: rfc3339(self.registered_at),
            last_heartbeat: rfc3339(self.last_heartbeat),
        }
        .serialize(s)
    }
}

fn membrane_view(ns: &NamespaceName, id: &MembraneId, e: &Entry) -> MembraneView {
    MembraneView {
        id: id.clone(),
        namespace: ns.clone(),
        registration: (*e.inst.registration).clone(),
        state: e.state,
        registered_at: rfc3339(e.registered_at),
        last_heartbeat: rfc3339(e.last_heartbeat_wall),
    }
}

fn ns_view(name: &NamespaceName, ns: &Ns) -> NamespaceView {
    let passing = ns
        .membranes
        .values()
        .filter(|e| e.state == HealthState::Passing)
        .count();
    NamespaceView {
        name: name.clone(),
        description: ns.description.clone(),
        settings: ns.settings,
        created_at: rfc3339(ns.created_at),
        membranes: ns.membranes.len(),
        passing,
        join_token: None,
    }
}

#[cfg(test)]
mod tests;
