//! What the DNS side needs of one namespace: a consistent, immutable snapshot of its
//! settings and of its *passing* membranes, produced by the registry on every change.

use std::sync::Arc;

use shared::{MembraneId, NamespaceName, NamespaceSettings, Registration};

/// One passing membrane.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Membrane id (`id.ns.`).
    pub id: MembraneId,
    /// Its registration (services, addresses, capabilities, tags, metadata, endpoint).
    pub registration: Arc<Registration>,
}

/// A namespace as DNS serves it.
#[derive(Debug, Clone)]
pub struct NamespaceSnapshot {
    /// Zone name (before `--domain-suffix`).
    pub name: NamespaceName,
    /// TTLs: `record_ttl` for records, `negative_ttl` as SOA minimum.
    pub settings: NamespaceSettings,
    /// Passing membranes only, sorted by id. Shared with the registry: building a snapshot
    /// copies pointers, not registrations.
    pub instances: Vec<Arc<Instance>>,
    /// Bumped on every change of this namespace: usable as the SOA serial.
    pub serial: u32,
}
