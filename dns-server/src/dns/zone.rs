//! Zones as the query path sees them (owner name -> pre-rendered answer per type), and the
//! incremental rebuild that keeps them current.
//!
//! A zone is made of parts: the apex (SOA, NS, NS host), one per service type
//! (`_svc._proto.`, its subtypes) and the service enumeration. On a snapshot only the parts
//! whose inputs changed are rendered again: a service type is rendered again only when one
//! of its members changed. The names those parts cover are then replaced in the zone under a
//! short write lock.
//!
//! The names a membrane owns (`id.` and `id._svc._proto.`) are not pre-rendered: a zone keeps
//! the snapshot's sorted instance list (shared pointers) and renders those answers when they
//! are asked for, from the same record builder. Pre-rendering them cost about 900 bytes per
//! membrane, most of the server's memory with 100,000 membranes; rendering one costs a few
//! microseconds, and the answers clients ask for most (service types) stay pre-rendered.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// Passing membranes of a zone, sorted by id (pointers shared with the registry).
type Instances = Arc<[Arc<Instance>]>;

/// Source of zone generations: unique across zones, new at every change of a zone.
static GENERATION: AtomicU64 = AtomicU64::new(1);

fn next_generation() -> u64 {
    GENERATION.fetch_add(1, Ordering::Relaxed)
}

/// One namespace zone as queries see it.
#[derive(Debug)]
pub(crate) struct Zone {
    /// Every pre-rendered owner name (lowercase wire form) of the zone, including empty
    /// non-terminals; the membranes' own names are in `instances`.
    pub nodes: HashMap<Box<[u8]>, Node>,
    /// NXDOMAIN with the SOA in authority.
    pub nxdomain: Rendered,
    /// NOERROR/NODATA with the SOA in authority.
    pub nodata: Rendered,
    /// Zone apex (lowercase wire form).
    pub apex: WireName,
    /// TTL of every record.
    pub ttl: u32,
    /// Passing membranes, sorted by id: their names are answered from these.
    pub instances: Instances,
    /// Changes with every update of the zone (and differs between zones): answers rendered
    /// from a zone may be reused under the same generation.
    pub generation: u64,
}

/// What a membrane's own names hold for a query.
#[derive(Debug, Clone)]
pub(crate) enum InstanceAnswer {
    /// No membrane owns that name.
    NoName,
    /// The name exists, without records of the type asked for.
    NoData,
    /// The rendered RRset.
    Found(Arc<Rendered>),
}

impl Zone {
    /// Answers `qtype` (ANY: the first RRset) at `name` (lowercase wire form, inside the
    /// zone) from the membrane owning it: `id.<apex>` or `id._svc._proto.<apex>`.
    pub(crate) fn instance_answer(&self, name: &[u8], qtype: u16) -> InstanceAnswer {
        let Some(rel) = name.len().checked_sub(self.apex.len()) else {
            return InstanceAnswer::NoName;
        };
        if rel == 0 || name[rel..] != self.apex[..] {
            return InstanceAnswer::NoName;
        }
        let (mut labels, mut i) = (0, 0);
        while i < rel {
            labels += 1;
            i += 1 + name[i] as usize;
        }
        let id = &name[1..1 + name[0] as usize];
        if i != rel || !(labels == 1 || labels == 3) || id.first() == Some(&b'_') {
            return InstanceAnswer::NoName;
        }
        let Ok(id) = std::str::from_utf8(id) else {
            return InstanceAnswer::NoName;
        };
        let Ok(at) = self
            .instances
            .binary_search_by(|inst| inst.id.as_str().cmp(id))
        else {
            return InstanceAnswer::NoName;
        };
        let list = records::instance_group(&self.apex, &self.instances[at]);
        let Some((owner, data)) = list.iter().find(|(o, _)| o == name) else {
            return InstanceAnswer::NoName;
        };
        let set = if qtype == rtype::ANY {
            data.first()
        } else {
            data.iter().find(|(t, _)| *t == qtype)
        };
        match set {
            Some((t, set)) => InstanceAnswer::Found(Arc::new(render_rrset(
                owner,
                *t,
                set,
                self.ttl,
                &lookup_in(&list, None),
            ))),
            None => InstanceAnswer::NoData,
        }
    }
}

/// What to change in a zone: names to (re)place or remove, the negative answers, and the
/// current membranes.
pub(crate) struct ZoneDelta {
    pub nodes: Vec<(WireName, Option<Node>)>,
    pub nxdomain: Rendered,
    pub nodata: Rendered,
    apex: WireName,
    ttl: u32,
    instances: Instances,
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
            apex: self.apex,
            ttl: self.ttl,
            instances: self.instances,
            generation: next_generation(),
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
        zone.apex = self.apex;
        zone.ttl = self.ttl;
        zone.instances = self.instances;
        zone.generation = next_generation();
        old
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PartKey {
    Apex,
    Enumeration,
    Service(WireName),
}

/// A rendered part: its names with their answers.
type Part = Vec<(WireName, Vec<(u16, Arc<Rendered>)>)>;

/// Where the additional section of an answer in `list` finds addresses: in `list` itself,
/// then in `members`.
fn lookup_in<'a>(
    list: &'a NodeList,
    members: Option<&'a HashMap<WireName, NodeData>>,
) -> impl Fn(&[u8], u16) -> Option<&'a [RData]> + 'a {
    fn find(nd: &NodeData, t: u16) -> Option<&[RData]> {
        nd.iter()
            .find(|(ty, _)| *ty == t)
            .map(|(_, v)| v.as_slice())
    }
    move |name: &[u8], t: u16| -> Option<&'a [RData]> {
        list.iter()
            .find(|(o, _)| o == name)
            .and_then(|(_, nd)| find(nd, t))
            .or_else(|| members.and_then(|m| m.get(name)).and_then(|nd| find(nd, t)))
    }
}

fn render_part(list: &NodeList, ttl: u32, members: Option<&HashMap<WireName, NodeData>>) -> Part {
    let lookup = lookup_in(list, members);
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

/// The records membranes own (addresses, and SRV and TXT at their instance names), as the
/// additional section of their service type's answers needs them.
fn member_records(apex: &[u8], members: &[&Instance]) -> HashMap<WireName, NodeData> {
    members
        .iter()
        .flat_map(|inst| records::instance_group(apex, inst))
        .collect()
}

/// What the incremental rebuild remembers of one namespace.
#[derive(Default)]
pub(crate) struct NsState {
    apex: WireName,
    ttl: u32,
    negative_ttl: u32,
    /// The passing membranes as last rendered, sorted by id.
    instances: Instances,
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
    /// apex (no per-name index is kept): the apex part, the service type for `_svc._proto.`
    /// and below, every service type of that protocol for `_tcp.`/`_udp.`, the enumeration
    /// for `_udp.` and `_dns-sd._udp.` and below.
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
    /// Parts never share a type at a name. (When the configured NS host is also a
    /// membrane's host name, the apex part's node is found first at query time, so its
    /// configured addresses win over the membrane's.)
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

        // Membranes: new, changed, gone (a merge of the two id-sorted lists). Their own
        // names are answered from the list at query time; here only the service types they
        // belong to are marked for rendering again.
        let mut current: Vec<Arc<Instance>> = snap.instances.clone();
        if !current.is_sorted_by(|a, b| a.id <= b.id) {
            current.sort_by(|a, b| a.id.cmp(&b.id));
        }
        let current: Instances = current.into();
        let old = std::mem::replace(&mut self.instances, current.clone());
        let mut dirty: BTreeMap<WireName, ServiceType> = BTreeMap::new();
        let mut mark = |reg: &Registration| {
            for t in service_types(&apex, reg) {
                dirty.insert(t.name.clone(), t);
            }
        };
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < current.len() {
            let order = match (old.get(i), current.get(j)) {
                (Some(a), Some(b)) => a.id.cmp(&b.id),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match order {
                std::cmp::Ordering::Less => {
                    mark(&old[i].registration);
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    mark(&current[j].registration);
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    let (a, b) = (&old[i].registration, &current[j].registration);
                    if !Arc::ptr_eq(a, b) && **a != **b {
                        mark(a);
                        mark(b);
                    }
                    i += 1;
                    j += 1;
                }
            }
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
                        let addrs = member_records(&apex, m);
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
        let (nxdomain, nodata) = (
            render_negative(&apex, &soa, ttl, 3),
            render_negative(&apex, &soa, ttl, 0),
        );
        ZoneDelta {
            apex,
            ttl,
            instances: current,
            nodes: changed
                .into_iter()
                .map(|name| {
                    let node = self.merged(&name);
                    (name, node)
                })
                .collect(),
            nxdomain,
            nodata,
        }
    }
}
