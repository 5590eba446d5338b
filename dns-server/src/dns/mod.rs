//! Authoritative DNS for every namespace, answered from registry snapshots.
//!
//! Each namespace `ns` is the zone `ns.` (or `ns.<suffix>.`). On every registry change
//! [`Catalog::update`] rebuilds that zone's answers in wire format, one per (name, type);
//! a UDP query is then answered by a minimal parse of its question, a hash lookup and a copy
//! of those bytes (patched with the id, flags, the question as sent and an OPT record), with
//! the SRV records copied in a fresh RFC 2782 weighted order. TCP (RFC 7766) uses the same
//! path with a 64 KiB limit. The names and types served are those of the spec's "DNS name
//! schema" table; [`export_zone`] writes the same records as a master file.

mod edns;
mod export;
#[doc(hidden)]
pub mod fuzzing;
mod notify;
mod query;
mod records;
mod rrl;
mod runtime;
mod serial;
mod server;
mod stats;
mod tsig;
mod wire;
mod xfr;
mod zone;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, RwLock};

use shared::NamespaceName;

use crate::snapshot::NamespaceSnapshot;

pub use notify::run_notify;
pub use rrl::{DEFAULT_RATE, DEFAULT_SLIP, RateLimit};
pub use runtime::serve_on_own_threads;
pub use serial::SerialStore;
pub use server::{TcpLimits, bind_udp, serve, serve_with};
pub use stats::DnsStats;
pub use tsig::{Algorithm as TsigAlgorithm, TsigKey};
pub use xfr::{AllowNet, TransferConfig};

use records::{Naming, label_offsets, parse_text_name};
use zone::{NsState, Zone};

/// Longest name served before the suffix, in wire bytes: `_<tag>._sub._<service>._udp.<ns>`
/// with 62-character tag and service names (`shared::model::limits::MAX_PREFIXED_LABEL`) and
/// a 63-character namespace, each label with its length byte.
const LONGEST_IN_ZONE: usize = (1 + 63) + (1 + 4) + (1 + 63) + (1 + 4) + (1 + 63);

/// DNS settings shared by every zone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsConfig {
    /// Suffix of every zone: namespace `ns` is served as `ns.<suffix>.` (None: `ns.`).
    pub domain_suffix: Option<String>,
    /// Host names of every zone's NS RRset (absolute; the trailing dot is optional), the
    /// first one also the SOA's MNAME, each with the addresses served for it when it lies
    /// inside the zone (empty: `ns_addresses`). Empty: the one host `ns.dns.<zone>.`.
    pub ns_hosts: Vec<NsHost>,
    /// Addresses served as A/AAAA of the default NS host (the default one always lies in
    /// the zone) and of configured hosts without their own; empty: NODATA.
    pub ns_addresses: Vec<IpAddr>,
    /// NSID (RFC 5001) returned to queries asking for it; None: not returned.
    pub nsid: Option<String>,
    /// UDP response rate limiting.
    pub rate_limit: RateLimit,
}

/// One configured NS host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NsHost {
    /// Absolute host name (trailing dot optional).
    pub name: String,
    /// Its addresses (empty: [`DnsConfig::ns_addresses`]).
    pub addresses: Vec<IpAddr>,
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
        // The longest name a zone serves must still fit in 255 bytes.
        if suffix.len() + LONGEST_IN_ZONE > 255 {
            return Err(DnsError::DomainSuffix(format!(
                "{:?} is too long: names under it (up to {LONGEST_IN_ZONE} bytes before the \
                 suffix) must fit in 255 bytes, so it may have at most {} characters",
                self.domain_suffix.as_deref().unwrap_or_default(),
                255 - LONGEST_IN_ZONE - 2
            )));
        }
        let mut ns_hosts: Vec<(records::WireName, Vec<IpAddr>)> = Vec::new();
        for h in &self.ns_hosts {
            let w = parse_text_name(&h.name).map_err(DnsError::NsHost)?;
            if w == [0] {
                return Err(DnsError::NsHost("the root is not a host name".into()));
            }
            // The same host named twice: one NS record, the addresses merged.
            match ns_hosts.iter_mut().find(|(n, _)| *n == w) {
                Some((_, a)) => a.extend(&h.addresses),
                None => ns_hosts.push((w, h.addresses.clone())),
            }
        }
        for (_, a) in &mut ns_hosts {
            if a.is_empty() {
                a.clone_from(&self.ns_addresses);
            }
        }
        if let Some(n) = &self.nsid
            && (n.is_empty() || n.len() > edns::NSID_MAX)
        {
            return Err(DnsError::Nsid(format!(
                "must be 1 to {} bytes, got {}",
                edns::NSID_MAX,
                n.len()
            )));
        }
        Ok(Naming {
            suffix,
            ns_hosts,
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
    /// The NSID is empty or too long.
    #[error("invalid NSID: {0}")]
    Nsid(String),
}

/// Every served zone with its pre-rendered answers. Shared as `Arc<Catalog>` between the
/// registry (which calls [`Catalog::update`]) and the DNS server.
pub struct Catalog {
    naming: Naming,
    /// Labels in the suffix (0 without one).
    suffix_labels: usize,
    /// Namespace label -> zone, read by every query.
    zones: RwLock<HashMap<Box<[u8]>, Zone>>,
    /// Namespace label -> what the incremental rebuild remembers; also serialises updates.
    states: Mutex<HashMap<Box<[u8]>, NsState>>,
    stats: stats::Stats,
    /// The SOA serial each zone serves (persisted ceilings).
    serials: serial::Serials,
    /// Recent versions of each zone: AXFR and IXFR answers, NOTIFY serials.
    history: xfr::History,
    /// Who may transfer, and which secondaries are notified.
    transfer: xfr::TransferConfig,
    notify: notify::Queue,
    edns: edns::EdnsServer,
    rrl: rrl::Limiter,
    /// Clock of the rate limiter's seconds.
    started: tokio::time::Instant,
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
            states: Mutex::new(HashMap::new()),
            stats: stats::Stats::default(),
            serials: serial::Serials::default(),
            history: xfr::History::default(),
            transfer: xfr::TransferConfig::default(),
            notify: notify::Queue::default(),
            edns: edns::EdnsServer::new(config.nsid.as_deref()),
            rrl: rrl::Limiter::new(config.rate_limit),
            started: tokio::time::Instant::now(),
        })
    }

    /// Zone transfers and NOTIFY as configured (default: every transfer REFUSED, no
    /// NOTIFY).
    pub fn with_transfer(mut self, config: TransferConfig) -> Self {
        self.notify = notify::Queue::new(&config.notify);
        self.transfer = config;
        self
    }

    /// Keeps SOA serials increasing across restarts through `store` (see
    /// [`SerialStore`]); reads and raises the stored ceilings now.
    pub fn with_serial_store(
        mut self,
        store: std::sync::Arc<dyn SerialStore>,
    ) -> Result<Self, crate::store::StoreError> {
        self.serials = serial::Serials::with_store(store)?;
        Ok(self)
    }

    /// The SOA serial served for `ns` (None: not served yet).
    pub fn serial(&self, ns: &NamespaceName) -> Option<u32> {
        self.serials.current(ns.as_str())
    }

    /// Brings the zone of `snap.name` up to the snapshot; visible to the next query. Only
    /// the answers of membranes whose registration changed (and of their service types)
    /// are rendered again.
    pub fn update(&self, snap: &NamespaceSnapshot) {
        let key: Box<[u8]> = snap.name.as_str().as_bytes().into();
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        // Served with our own serial (increasing across restarts), under `states`' lock.
        let snap = &{
            let mut s = snap.clone();
            s.serial = self.serials.next(snap.name.as_str(), snap.serial);
            s
        };
        let delta = states
            .entry(key.clone())
            .or_default()
            .update(snap, &self.naming);
        // Zones are only added and removed with `states` held: no race with this check.
        let exists = self
            .zones
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&key);
        if exists {
            let old = {
                let mut zones = self.zones.write().unwrap_or_else(|e| e.into_inner());
                zones.get_mut(&key).map(|z| delta.apply(z))
            };
            // Replaced answers are freed here, outside the lock.
            drop(old);
        } else {
            let zone = delta.into_zone();
            self.zones
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, zone);
        }
        self.history.push(std::sync::Arc::new(snap.clone()));
        drop(states);
        self.notify.changed(snap.name.as_str());
    }

    /// Removes the zone of `ns`: its names are then REFUSED.
    pub fn remove(&self, ns: &NamespaceName) {
        let key = ns.as_str().as_bytes();
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let state = states.remove(key);
        self.history.remove(ns.as_str());
        let old = self
            .zones
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        drop(states);
        drop((state, old));
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
        ns_hosts: Vec::new(),
        ns_addresses: config.ns_addresses.clone(),
    });
    export::master_file(&records::zone_data(snap, &naming))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use shared::model::{Proto, Registration, ServiceSpec};
    use shared::{MembraneId, NamespaceSettings, ServiceName, Tag};

    use super::*;
    use crate::snapshot::Instance;

    /// Every name with, per type, the rendered body and counts, sorted.
    type Dump = Vec<(Vec<u8>, Vec<(u16, Vec<u8>, u16, u16)>)>;

    fn dump(c: &Catalog, ns: &str) -> Option<(Dump, Vec<u8>)> {
        let zones = c.zones.read().unwrap();
        let z = zones.get(ns.as_bytes())?;
        let mut d: Dump = z
            .nodes
            .iter()
            .map(|(k, n)| {
                let mut sets: Vec<_> = n
                    .rrsets
                    .iter()
                    .map(|(t, r)| (*t, r.body.to_vec(), r.ancount, r.arcount))
                    .collect();
                sets.sort();
                (k.to_vec(), sets)
            })
            .collect();
        d.sort();
        // The membranes' own names, rendered on demand: every type at each of them.
        for inst in z.instances.iter() {
            let host = records::name_with(&[inst.id.as_str()], &z.apex);
            let mut names = vec![host.clone()];
            for st in records::service_types(&z.apex, &inst.registration) {
                names.push(records::name_with(&[inst.id.as_str()], &st.name));
            }
            for name in names {
                let mut sets = Vec::new();
                for t in [1, 16, 28, 33, 255] {
                    if let zone::InstanceAnswer::Found(r) = z.instance_answer(&name, t) {
                        sets.push((t, r.body.to_vec(), r.ancount, r.arcount));
                    }
                }
                d.push((name, sets));
            }
        }
        Some((d, z.nxdomain.body.to_vec()))
    }

    fn inst(id: &str, svcs: &[(&str, u16)], caps: &[&str], addr: u8) -> Instance {
        Instance {
            id: MembraneId::new(id).unwrap(),
            registration: Arc::new(Registration {
                addresses: vec![std::net::IpAddr::from([10, 0, 0, addr])],
                services: svcs
                    .iter()
                    .map(|(n, port)| ServiceSpec {
                        name: ServiceName::new(n).unwrap(),
                        proto: if *port % 2 == 0 {
                            Proto::Tcp
                        } else {
                            Proto::Udp
                        },
                        port: *port,
                        priority: 0,
                        weight: 10,
                    })
                    .collect(),
                capabilities: caps.iter().map(|c| Tag::new(c).unwrap()).collect(),
                metadata: BTreeMap::from([("k".to_string(), id.to_string())]).into(),
                ..Default::default()
            }),
        }
    }

    fn snap(serial: u32, ttl: u32, mut instances: Vec<Instance>) -> NamespaceSnapshot {
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        NamespaceSnapshot {
            name: NamespaceName::new("ns").unwrap(),
            settings: NamespaceSettings {
                record_ttl: ttl,
                ..Default::default()
            },
            instances: instances.into_iter().map(Arc::new).collect(),
            serial,
        }
    }

    #[test]
    fn catalog_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Catalog>();
        check::<Arc<Catalog>>();
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let bad = |suffix: Option<&str>, ns: Option<&str>| {
            Catalog::new(DnsConfig {
                domain_suffix: suffix.map(String::from),
                ns_hosts: ns
                    .map(|n| NsHost {
                        name: n.into(),
                        addresses: vec![],
                    })
                    .into_iter()
                    .collect(),
                ..Default::default()
            })
            .is_err()
        };
        assert!(bad(Some("a..b"), None));
        assert!(bad(Some(&"a.".repeat(100)), None));
        // Found by fuzzing (registration_zone): a longer suffix let names such as
        // `_<tag>._sub._<svc>._udp.<ns>.<suffix>` and the SOA's `hostmaster.<ns>.<suffix>`
        // pass 255 bytes, which no response can carry.
        let longest = format!("{}.{}", "a".repeat(25), "b".repeat(25));
        assert!(!bad(Some(&longest), None));
        assert!(bad(Some(&format!("{longest}c")), None));
        assert!(bad(None, Some(".")));
        assert!(bad(None, Some("bad host")));
        assert!(!bad(Some("svc.example."), Some("ns1.example.net")));
        assert!(!bad(None, None));
    }

    #[test]
    fn incremental_updates_equal_a_fresh_build() {
        let config = DnsConfig {
            ns_addresses: vec!["192.0.2.1".parse().unwrap()],
            ..Default::default()
        };
        let live = Catalog::new(config.clone()).unwrap();
        // A pseudo-random walk of registrations, changes and removals.
        let mut state: Vec<Instance> = Vec::new();
        let mut x: u64 = 7;
        for step in 0..300u32 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = (x >> 33) as usize;
            let id = format!("m{}", r % 23);
            state.retain(|i| i.id.as_str() != id);
            match r % 5 {
                0 => {} // removed
                1 => state.push(inst(&id, &[], &[], (r % 200) as u8)),
                2 => state.push(inst(&id, &[("a", 80)], &["x"], (r % 200) as u8)),
                3 => state.push(inst(&id, &[("a", 80), ("b", 53)], &["y", "x"], 1)),
                _ => state.push(inst(&id, &[("b", 53), ("c", 100)], &[], (r % 7) as u8)),
            }
            // Sometimes the settings change, which renders everything again.
            let ttl = if step % 97 == 96 { 9 } else { 5 };
            let s = snap(step, ttl, state.clone());
            live.update(&s);
            if step % 10 == 0 || step > 290 {
                let fresh = Catalog::new(config.clone()).unwrap();
                fresh.update(&s);
                assert_eq!(dump(&live, "ns"), dump(&fresh, "ns"), "step {step}");
            }
        }
        live.remove(&NamespaceName::new("ns").unwrap());
        assert!(dump(&live, "ns").is_none());
        // Served again after removal: from scratch, the serial continuing where it was
        // (300 updates so far: serials 0-299).
        let s = snap(300, 5, state.clone());
        live.update(&s);
        let fresh = Catalog::new(config).unwrap();
        fresh.update(&s);
        assert_eq!(dump(&live, "ns"), dump(&fresh, "ns"));
    }
}
