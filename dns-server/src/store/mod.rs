//! Durable storage of namespaces, registrations and tokens.
//!
//! The registry never writes the store directly: it sends [`Op`]s, in the order it applied
//! them in memory, to one writer that commits them in batches (group commit) and acknowledges
//! each only once its batch is on disk. Heartbeat times are soft state and never stored.

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
    /// Namespace.
    pub namespace: NamespaceName,
    /// Membrane id.
    pub id: MembraneId,
    /// The registration as accepted.
    pub registration: Registration,
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
    /// Insert or replace a registration.
    PutMembrane(Box<StoredMembrane>),
    /// Delete a registration.
    DeleteMembrane(NamespaceName, MembraneId),
}

/// Everything the store holds, read once at start-up.
#[derive(Debug, Default)]
pub struct Loaded {
    /// All namespaces.
    pub namespaces: Vec<StoredNamespace>,
    /// All registrations.
    pub membranes: Vec<StoredMembrane>,
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
    /// The writer has stopped (shutdown or an earlier fatal error).
    #[error("store writer has stopped")]
    Closed,
}
