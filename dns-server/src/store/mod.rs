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
