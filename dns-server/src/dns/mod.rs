//! Authoritative DNS for every namespace, answered from registry snapshots.
//!
//! Each namespace `ns` is the zone `ns.` (or `ns.<suffix>.`). On every registry change
//! [`Catalog::update`] rebuilds that zone's answers in wire format, one per (name, type);
//! a UDP query is then answered by a minimal parse of its question, a hash lookup and a copy
//! of those bytes (patched with the id, flags, the question as sent and an OPT record), with
//! the SRV records copied in a fresh RFC 2782 weighted order. TCP (RFC 7766) uses the same
//! path with a 64 KiB limit. The names and types served are those of the spec's "DNS name
//! schema" table; [`export_zone`] writes the same records as a master file.

mod export;
mod query;
mod records;
mod server;
mod stats;
mod wire;
mod zone;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use shared::NamespaceName;

use crate::snapshot::NamespaceSnapshot;

pub use server::{bind_udp, serve};
pub use stats::DnsStats;

use records::{Naming, label_offsets, parse_text_name};
use zone::Zone;

/// DNS settings shared by every zone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsConfig {
    /// Suffix of every zone: namespace `ns` is served as `ns.<suffix>.` (None: `ns.`).
    pub domain_suffix: Option<String>,
    /// Host name of every zone's NS record (absolute; the trailing dot is optional).
    /// None: `ns.dns.<zone>.`.
    pub ns_host: Option<String>,
    /// Addresses served as A/AAAA of the NS host when it lies inside the zone (the default
    /// one always does); empty: that name answers NODATA.
    pub ns_addresses: Vec<IpAddr>,
}

impl DnsConfig {
    /// Checks the suffix and NS host (as [`Catalog::new`] does).
    pub fn validate(&self) -> Result<(), DnsError> {
        self.naming().map(|_| ())
    }

    fn naming(&self) -> Result<Naming, DnsError> {
        let suffix = match &self.domain_suffix {
            Some(s) => parse_text_name(s).map_err(DnsError::DomainSuffix)?,
            None => vec![0],
        };
        // The longest namespace label (63) plus its length byte must still fit in 255.
        if suffix.len() + 64 > 255 {
            return Err(DnsError::DomainSuffix(format!(
                "{:?} leaves no room for a 63-character namespace within 255 bytes",
                self.domain_suffix.as_deref().unwrap_or_default()
            )));
        }
        let ns_host = match &self.ns_host {
            Some(h) => {
                let w = parse_text_name(h).map_err(DnsError::NsHost)?;
                if w == [0] {
                    return Err(DnsError::NsHost("the root is not a host name".into()));
                }
                Some(w)
            }
            None => None,
        };
        Ok(Naming {
            suffix,
            ns_host,
            ns_addresses: self.ns_addresses.clone(),
        })
    }
}

/// Invalid DNS configuration.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// `--domain-suffix` is not a valid domain name.
    #[error("invalid domain suffix: {0}")]
    DomainSuffix(String),
    /// The NS host name is not a valid domain name.
    #[error("invalid NS host name: {0}")]
    NsHost(String),
}

/// Every served zone with its pre-rendered answers. Shared as `Arc<Catalog>` between the
/// registry (which calls [`Catalog::update`]) and the DNS server.
pub struct Catalog {
    naming: Naming,
    /// Labels in the suffix (0 without one).
    suffix_labels: usize,
    /// Namespace label -> zone.
    zones: RwLock<HashMap<Box<[u8]>, Arc<Zone>>>,
    stats: stats::Stats,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("naming", &self.naming)
            .field("zones", &self.zone_count())
            .finish()
    }
}

impl Catalog {
    /// An empty catalog (every query REFUSED until zones are added).
    pub fn new(config: DnsConfig) -> Result<Self, DnsError> {
        let naming = config.naming()?;
        Ok(Catalog {
            suffix_labels: label_offsets(&naming.suffix).len(),
            naming,
            zones: RwLock::new(HashMap::new()),
            stats: stats::Stats::default(),
        })
    }

    /// (Re)builds the zone of `snap.name` from the snapshot; visible to the next query.
    pub fn update(&self, snap: &NamespaceSnapshot) {
        let data = records::zone_data(snap, &self.naming);
        let zone = Arc::new(Zone::build(&data));
        let key: Box<[u8]> = snap.name.as_str().as_bytes().into();
        let old = self
            .zones
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, zone);
        // The old zone is freed here, outside the lock.
        drop(old);
    }

    /// Removes the zone of `ns`: its names are then REFUSED.
    pub fn remove(&self, ns: &NamespaceName) {
        let old = self
            .zones
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(ns.as_str().as_bytes());
        drop(old);
    }

    /// Number of zones served.
    pub fn zone_count(&self) -> usize {
        self.zones.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Query counters since start.
    pub fn stats(&self) -> DnsStats {
        self.stats.snapshot()
    }

    /// The zone name of namespace `ns` (`ns.` or `ns.<suffix>.`).
    pub fn zone_name(&self, ns: &NamespaceName) -> String {
        records::name_to_text(&self.naming.apex(ns.as_str()))
    }
}

/// The namespace as an RFC 1035 master file (absolute names, `$ORIGIN` and `$TTL` set),
/// with exactly the records the server answers. An invalid `config` (see [`Catalog::new`])
/// falls back to no suffix and the default NS host.
pub fn export_zone(snap: &NamespaceSnapshot, config: &DnsConfig) -> String {
    let naming = config.naming().unwrap_or_else(|_| Naming {
        suffix: vec![0],
        ns_host: None,
        ns_addresses: config.ns_addresses.clone(),
    });
    export::master_file(&records::zone_data(snap, &naming))
}
