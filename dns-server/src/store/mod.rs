//! Durable storage of namespaces, registrations and tokens.
//!
//! The registry never writes the store directly: it sends [`Op`]s, in the order it applied
//! them in memory, to one writer that commits them in batches (group commit) and acknowledges
//! each only once its batch is on disk. Heartbeat times are soft state and never stored.
//!
//! Membrane rows are append-only: every registration, update and removal writes a new row
//! with the next sequence number (a removal writes a tombstone), so a commit touches the last
//! page or two of the table instead of one random page per membrane. On load the newest row
//! of each membrane wins; superseded rows and tombstones are deleted later, in sequence order,
//! which keeps every intermediate state (and every crash) loading correctly.

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod sqlite;

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use shared::{MembraneId, NamespaceName, NamespaceSettings, Registration};

/// A stored namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredNamespace {
    /// Name.
    pub name: NamespaceName,
    /// Free text.
    pub description: String,
    /// Timing settings.
    pub settings: NamespaceSettings,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    /// SHA-256 of the join token, when one was issued.
    pub join_token_hash: Option<[u8; 32]>,
}

/// A stored registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMembrane {
    /// Row sequence number (assigned by the registry, increasing).
    pub seq: i64,
    /// Namespace.
    pub namespace: NamespaceName,
    /// Membrane id.
    pub id: MembraneId,
    /// The registration as accepted.
    pub registration: std::sync::Arc<Registration>,
    /// SHA-256 of the instance secret.
    pub secret_hash: [u8; 32],
    /// First registration time, milliseconds since the Unix epoch.
    pub registered_at_ms: i64,
}

/// One durable change.
#[derive(Debug, Clone)]
pub enum Op {
    /// Insert or replace a namespace.
    PutNamespace(StoredNamespace),
    /// Delete a namespace and every membrane in it.
    DeleteNamespace(NamespaceName),
    /// Append a registration; `supersedes` is the membrane's previous row, if any.
    PutMembrane {
        /// The new row.
        row: Box<StoredMembrane>,
        /// The row it replaces.
        supersedes: Option<i64>,
    },
    /// Append a tombstone for a membrane whose newest row is `supersedes`.
    DeleteMembrane {
        /// The tombstone's sequence number.
        seq: i64,
        /// Namespace.
        namespace: NamespaceName,
        /// Membrane id.
        id: MembraneId,
        /// The row it removes.
        supersedes: i64,
    },
}

/// Everything the store holds, read once at start-up.
#[derive(Debug, Default)]
pub struct Loaded {
    /// All namespaces.
    pub namespaces: Vec<StoredNamespace>,
    /// All live registrations (newest row of each membrane).
    pub membranes: Vec<StoredMembrane>,
    /// The next free row sequence number.
    pub next_seq: i64,
    /// Live registrations whose namespace is missing, by namespace name: kept on disk
    /// untouched (never deleted at start), not served, reported.
    pub orphaned: std::collections::BTreeMap<String, usize>,
    /// The event history kept with the data.
    pub events: EventLog,
}

/// The event history kept with the data, committed in the same transaction as the
/// changes it reports: what lets agents resume their event streams after a restart, a
/// crash included, instead of listing their namespace again (see
/// [`registry::events`](crate::registry::events)).
///
/// Every process numbers its events in a *segment* of its own: after a number above all
/// earlier ones (the wall clock in microseconds, or the last number + 1). A client's
/// `Last-Event-ID` can be resumed from only if it lies in a recorded segment, so after the
/// database went back in time (restored from a backup) the numbers issued since the backup
/// are unknown and their holders resync instead of getting another history's events.
#[derive(Debug, Default)]
pub struct EventLog {
    /// The numbering's identity, created with the database (the `Membrane-Event-Epoch`).
    pub epoch: u64,
    /// Earlier processes' segments `(start, last)`, oldest first: `start` is the number
    /// before the segment's first event, `last` its last event (or `start`).
    pub segments: Vec<(u64, u64)>,
    /// The number before this process's first event.
    pub start: u64,
    /// Per namespace, the number of its last event.
    pub namespace_last: Vec<(String, u64)>,
    /// The newest events (at most [`RING`](crate::registry::events::RING)), oldest first.
    pub recent: Vec<StoredEvent>,
    /// Membranes whose last announced state is `stale` (health is soft state: they start
    /// `passing`, and subscribers are told so).
    pub stale: Vec<(String, String)>,
    /// Namespaces whose registrations were kept but not served at the last start (the
    /// namespace was missing) and are served now: no event announced them, so their
    /// subscribers are sent `resync`.
    pub adopted: Vec<String>,
}

/// One event as kept: its number, namespace, SSE `event:` name and whole frame as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Sequence number.
    pub seq: u64,
    /// Namespace.
    pub namespace: String,
    /// SSE `event:` name.
    pub kind: String,
    /// The SSE frame.
    pub frame: Vec<u8>,
}

/// A store failure. Its message is logged, never sent to clients.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database engine failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored row could not be decoded.
    #[error("corrupt row in {table}: {message}")]
    Corrupt {
        /// Table.
        table: &'static str,
        /// What was wrong.
        message: String,
    },
    /// The database file exists but is not a usable registry database; it is left as it is.
    #[error(
        "database {path} is unusable ({reason}); refusing to start rather than start empty. \
         Restore it from a backup, or move it away to start with an empty registry"
    )]
    Unusable {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Another process holds the data directory.
    #[error(
        "data directory {dir} is in use by another dns-server{holder} (lock {lock} is held); \
         stop it first or use another --data-dir"
    )]
    Locked {
        /// The data directory.
        dir: String,
        /// The lock file.
        lock: String,
        /// ` (pid N)` when the holder wrote its pid.
        holder: String,
    },
    /// Creating the data directory failed.
    #[error("data directory {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// etcd refused or did not answer.
    #[error("etcd: {0}")]
    Etcd(String),
    /// The writer has stopped (shutdown or an earlier fatal error).
    #[error("store writer has stopped")]
    Closed,
}

/// An exclusive lock on a data directory, held until dropped (for the process lifetime).
///
/// `flock(2)` on `registry.lock` inside the directory: the kernel releases it when the
/// process exits, however it exits, so a crash never leaves a stale lock behind.
#[derive(Debug)]
pub struct DataDirLock {
    _file: nix::fcntl::Flock<std::fs::File>,
}

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "registry.lock";

/// Takes the exclusive lock on `dir` without waiting: a second server on the same
/// directory gets [`StoreError::Locked`] instead of a second, diverging view of the data.
pub fn lock_data_dir(dir: &Path) -> Result<DataDirLock, StoreError> {
    let path = dir.join(LOCK_FILE);
    let io = |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    let mut lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
    {
        Ok(lock) => lock,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let holder = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .map(|pid| format!(" (pid {pid})"))
                .unwrap_or_default();
            return Err(StoreError::Locked {
                dir: dir.display().to_string(),
                lock: path.display().to_string(),
                holder,
            });
        }
        Err((_, errno)) => return Err(io(errno.into())),
    };
    // Who holds it, for the next one's message; best effort.
    let _ = lock
        .set_len(0)
        .and_then(|()| write!(*lock, "{}", std::process::id()));
    Ok(DataDirLock { _file: lock })
}
