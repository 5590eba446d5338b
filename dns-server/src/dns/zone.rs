//! Zones as the query path sees them (owner name -> pre-rendered answer per type), and the
//! incremental rebuild that keeps them current.
//!
//! A zone is made of parts: the apex (SOA, NS, NS host), one part per membrane (`id.` and
//! `id._svc._proto.`), one per service type (`_svc._proto.`, its subtypes) and the service
//! enumeration. On a snapshot only the parts whose inputs changed are rendered again: a
//! membrane whose registration is unchanged keeps its answers, a service type is rendered
//! again only when one of its members changed. The names those parts cover are then
//! replaced in the zone under a short write lock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use shared::Registration;

use super::records::{
    self, Naming, NodeData, NodeList, RData, ServiceType, WireName, rtype, service_types,
};
use super::wire::{Rendered, render_negative, render_rrset};
use crate::snapshot::{Instance, NamespaceSnapshot};

/// The pre-rendered answers of one name.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    /// One answer per record type present at the name (empty for an empty non-terminal).
    pub rrsets: Box<[(u16, Arc<Rendered>)]>,
}

impl Node {
    /// The answer for `qtype`, if the name has that type.
    #[inline]
    pub(crate) fn get(&self, qtype: u16) -> Option<&Rendered> {
        self.rrsets
            .iter()
            .find(|(t, _)| *t == qtype)
            .map(|(_, r)| &**r)
    }

    /// RFC 8482: the answer to ANY is one RRset of the name (the first one).
    #[inline]
    pub(crate) fn any(&self) -> Option<&Rendered> {
        self.rrsets.first().map(|(_, r)| &**r)
    }
}

/// One namespace zone as queries see it.
#[derive(Debug)]
pub(crate) struct Zone {
    /// Every owner name (lowercase wire form) of the zone, including empty non-terminals.
    pub nodes: HashMap<Box<[u8]>, Node>,
    /// NXDOMAIN with the SOA in authority.
    pub nxdomain: Rendered,
    /// NOERROR/NODATA with the SOA in authority.
    pub nodata: Rendered,
}

/// What to change in a zone: names to (re)place or remove, and the negative answers.
pub(crate) struct ZoneDelta {
    pub nodes: Vec<(WireName, Option<Node>)>,
    pub nxdomain: Rendered,
    pub nodata: Rendered,
}

impl ZoneDelta {
    /// A new zone made of the delta (for a namespace not served yet).
    pub(crate) fn into_zone(self) -> Zone {
        let mut nodes = HashMap::with_capacity(self.nodes.len());
        for (name, node) in self.nodes {
            if let Some(n) = node {
                nodes.insert(name.into_boxed_slice(), n);
            }
        }
        Zone {
            nodes,
            nxdomain: self.nxdomain,
            nodata: self.nodata,
        }
    }

    /// Applies the delta to `zone`; returns the replaced nodes (to be freed off the lock).
    pub(crate) fn apply(self, zone: &mut Zone) -> Vec<Node> {
        let mut old = Vec::new();
        for (name, node) in self.nodes {
            let prev = match node {
                Some(n) => zone.nodes.insert(name.into_boxed_slice(), n),
                None => zone.nodes.remove(name.as_slice()),
            };
            old.extend(prev);
        }
        zone.nxdomain = self.nxdomain;
        zone.nodata = self.nodata;
        old
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PartKey {
    Apex,
    Enumeration,
    Membrane(Box<str>),
    Service(WireName),
}

/// A rendered part: its names with their answers.
type Part = Vec<(WireName, Vec<(u16, Arc<Rendered>)>)>;

fn render_part(list: &NodeList, ttl: u32, members: Option<&HashMap<WireName, NodeData>>) -> Part {
    fn find(nd: &NodeData, t: u16) -> Option<&[RData]> {
        nd.iter()
            .find(|(ty, _)| *ty == t)
            .map(|(_, v)| v.as_slice())
    }
    let lookup = |name: &[u8], t: u16| -> Option<&[RData]> {
        list.iter()
            .find(|(o, _)| o == name)
            .and_then(|(_, nd)| find(nd, t))
            .or_else(|| members.and_then(|m| m.get(name)).and_then(|nd| find(nd, t)))
    };
    list.iter()
        .map(|(owner, data)| {
            let sets = data
                .iter()
                .map(|(t, set)| (*t, Arc::new(render_rrset(owner, *t, set, ttl, &lookup))))
                .collect();
            (owner.clone(), sets)
        })
        .collect()
}

/// The addresses of membranes, as the additional section of their service type needs them.
fn member_addresses(apex: &[u8], members: &[&Instance]) -> HashMap<WireName, NodeData> {
    members
        .iter()
        .map(|inst| {
            let host = records::name_with(&[inst.id.as_str()], apex);
            let mut nd: NodeData = Vec::new();
            let (mut a, mut aaaa) = (Vec::new(), Vec::new());
            let mut addrs = inst.registration.addresses.clone();
            addrs.sort();
            addrs.dedup();
            for ip in addrs {
                match ip {
                    std::net::IpAddr::V4(v4) => a.push(RData::A(v4)),
                    std::net::IpAddr::V6(v6) => aaaa.push(RData::Aaaa(v6)),
                }
            }
            if !a.is_empty() {
                nd.push((rtype::A, a));
            }
            if !aaaa.is_empty() {
                nd.push((rtype::AAAA, aaaa));
            }
            (host, nd)
        })
        .collect()
}

/// What the incremental rebuild remembers of one namespace.
#[derive(Default)]
pub(crate) struct NsState {
    apex: WireName,
    ttl: u32,
    negative_ttl: u32,
    /// Membrane id -> its registration and service types, as last rendered.
    membranes: HashMap<Box<str>, Arc<Registration>>,
    /// Service types with at least one member.
    types: BTreeMap<WireName, ServiceType>,
    parts: HashMap<PartKey, Part>,
}

/// Wire length of a relative name made of `labels`.
fn suffix_len(labels: &[&[u8]]) -> usize {
    labels.iter().map(|l| l.len() + 1).sum()
}

impl NsState {
    fn replace(&mut self, key: PartKey, new: Option<Part>, changed: &mut HashSet<WireName>) {
        if let Some(old) = self.parts.remove(&key) {
            changed.extend(old.into_iter().map(|(name, _)| name));
        }
        if let Some(part) = new {
            changed.extend(part.iter().map(|(name, _)| name.clone()));
            self.parts.insert(key, part);
        }
    }

    /// The parts that may have records at `name`, derived from its shape relative to the
    /// apex (no per-name index is kept): the apex part, the membrane `id` for `id.` and
    /// `id._svc._proto.`, the service type for `_svc._proto.` and below, every service type
    /// of that protocol for `_tcp.`/`_udp.`, the enumeration for `_udp.` and `_dns-sd._udp.`
    /// and below.
    fn candidates(&self, name: &[u8]) -> Vec<PartKey> {
        let mut keys = vec![PartKey::Apex];
        if name.len() <= self.apex.len() {
            return keys;
        }
        let rel = &name[..name.len() - self.apex.len()];
        let labels: Vec<&[u8]> = {
            let mut v = Vec::new();
            let mut i = 0;
            while i < rel.len() {
                let l = rel[i] as usize;
                v.push(&rel[i + 1..i + 1 + l]);
                i += 1 + l;
            }
            v
        };
        let under =
            |k: usize| name[name.len() - self.apex.len() - suffix_len(&labels[k..])..].to_vec();
        let n = labels.len();
        if labels[0].first() != Some(&b'_')
            && (n == 1 || n == 3)
            && let Ok(id) = std::str::from_utf8(labels[0])
        {
            keys.push(PartKey::Membrane(id.into()));
        }
        if n >= 2 && (labels[n - 1] == b"_tcp" || labels[n - 1] == b"_udp") {
            keys.push(PartKey::Service(under(n - 2)));
        }
        if n == 1 && (labels[0] == b"_tcp" || labels[0] == b"_udp") {
            keys.extend(
                self.types
                    .keys()
                    .filter(|t| t.ends_with(name))
                    .map(|t| PartKey::Service(t.clone())),
            );
        }
        if labels[n - 1] == b"_udp" {
            keys.push(PartKey::Enumeration);
        }
        keys
    }

    /// The node at `name` merged over every part that has it (None: the name is gone).
    /// Parts never share a type at a name, except when the configured NS host is also a
    /// membrane's host name: then the apex part (the configured addresses) wins.
    fn merged(&self, name: &[u8]) -> Option<Node> {
        let mut found = false;
        let mut sets: Vec<(u16, Arc<Rendered>)> = Vec::new();
        for k in self.candidates(name) {
            if let Some((_, s)) = self
                .parts
                .get(&k)
                .and_then(|p| p.iter().find(|(n, _)| n == name))
            {
                found = true;
                for (t, r) in s {
                    if !sets.iter().any(|(t2, _)| t2 == t) {
                        sets.push((*t, r.clone()));
                    }
                }
            }
        }
        found.then(|| Node {
            rrsets: sets.into_boxed_slice(),
        })
    }

    /// Brings the state up to `snap` and returns the changes to apply to the zone.
    pub(crate) fn update(&mut self, snap: &NamespaceSnapshot, naming: &Naming) -> ZoneDelta {
        let apex = naming.apex(snap.name.as_str());
        let (ttl, neg) = (snap.settings.record_ttl, snap.settings.negative_ttl);
        let mut changed: HashSet<WireName> = HashSet::new();
        if self.apex != apex || self.ttl != ttl || self.negative_ttl != neg {
            // Everything is rendered with these: start over (every old name is replaced).
            for part in self.parts.values() {
                changed.extend(part.iter().map(|(name, _)| name.clone()));
            }
            *self = NsState {
                apex: apex.clone(),
                ttl,
                negative_ttl: neg,
                ..Default::default()
            };
        }

        // Membranes: new, changed, gone.
        let mut dirty: BTreeMap<WireName, ServiceType> = BTreeMap::new();
        let mut present: HashSet<&str> = HashSet::with_capacity(snap.instances.len());
        for inst in &snap.instances {
            let id = inst.id.as_str();
            present.insert(id);
            let old_types = match self.membranes.get(id) {
                Some(reg)
                    if Arc::ptr_eq(reg, &inst.registration) || **reg == *inst.registration =>
                {
                    continue;
                }
                Some(reg) => service_types(&apex, reg),
                None => Vec::new(),
            };
            let types = service_types(&apex, &inst.registration);
            for t in old_types.into_iter().chain(types.iter().cloned()) {
                dirty.insert(t.name.clone(), t);
            }
            let part = render_part(&records::instance_group(&apex, inst), ttl, None);
            self.replace(PartKey::Membrane(id.into()), Some(part), &mut changed);
            self.membranes.insert(id.into(), inst.registration.clone());
        }
        let gone: Vec<Box<str>> = self
            .membranes
            .keys()
            .filter(|k| !present.contains(&***k))
            .cloned()
            .collect();
        for id in gone {
            if let Some(reg) = self.membranes.remove(&id) {
                for t in service_types(&apex, &reg) {
                    dirty.insert(t.name.clone(), t);
                }
            }
            self.replace(PartKey::Membrane(id), None, &mut changed);
        }

        // Service types with a changed member.
        if !dirty.is_empty() {
            let mut members: BTreeMap<&WireName, Vec<&Instance>> = BTreeMap::new();
            for inst in &snap.instances {
                for (k, st) in &dirty {
                    if inst.registration.services.iter().any(|s| st.offered_by(s)) {
                        members.entry(k).or_default().push(inst);
                    }
                }
            }
            for (name, st) in &dirty {
                let key = PartKey::Service(name.clone());
                match members.get(name) {
                    Some(m) => {
                        let addrs = member_addresses(&apex, m);
                        let list = records::service_group(&apex, st, m);
                        let part = render_part(&list, ttl, Some(&addrs));
                        self.replace(key, Some(part), &mut changed);
                        self.types.insert(name.clone(), st.clone());
                    }
                    None => {
                        self.replace(key, None, &mut changed);
                        self.types.remove(name);
                    }
                }
            }
            let list = records::enumeration_group(&apex, self.types.keys());
            let part = render_part(&list, ttl, None);
            self.replace(PartKey::Enumeration, Some(part), &mut changed);
        }

        // The apex: its SOA carries the serial, so it changes every time.
        let list = records::apex_group(snap, naming);
        let part = render_part(&list, ttl, None);
        self.replace(PartKey::Apex, Some(part), &mut changed);

        let soa = records::soa_of(snap, naming);
        ZoneDelta {
            nodes: changed
                .into_iter()
                .map(|name| {
                    let node = self.merged(&name);
                    (name, node)
                })
                .collect(),
            nxdomain: render_negative(&apex, &soa, ttl, 3),
            nodata: render_negative(&apex, &soa, ttl, 0),
        }
    }
}
