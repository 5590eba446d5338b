//! The records of one namespace zone, built from a snapshot: the single source of truth for
//! both the pre-rendered wire answers and the exported master file.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use shared::Registration;
use shared::model::Proto;

use crate::snapshot::{Instance, NamespaceSnapshot};

/// Record type codes used here.
pub(crate) mod rtype {
    pub const A: u16 = 1;
    pub const NS: u16 = 2;
    pub const SOA: u16 = 6;
    pub const PTR: u16 = 12;
    pub const TXT: u16 = 16;
    pub const AAAA: u16 = 28;
    pub const SRV: u16 = 33;
    pub const OPT: u16 = 41;
    pub const IXFR: u16 = 251;
    pub const AXFR: u16 = 252;
    pub const MAILB: u16 = 253;
    pub const MAILA: u16 = 254;
    pub const ANY: u16 = 255;
}

/// SOA timers (seconds). Nothing transfers these zones, but the values must be sane for
/// `named-checkzone` and secondaries fed from an export.
pub(crate) const SOA_REFRESH: u32 = 3600;
pub(crate) const SOA_RETRY: u32 = 900;
pub(crate) const SOA_EXPIRE: u32 = 604_800;

/// A domain name in lowercase wire format (length-prefixed labels, final zero byte).
pub(crate) type WireName = Vec<u8>;

/// Wire form of `labels` followed by the wire name `suffix` (which ends with the root byte).
pub(crate) fn name_with(labels: &[&str], suffix: &[u8]) -> WireName {
    let mut out =
        Vec::with_capacity(suffix.len() + labels.iter().map(|l| l.len() + 1).sum::<usize>());
    for l in labels {
        debug_assert!(!l.is_empty() && l.len() <= 63);
        out.push(l.len() as u8);
        out.extend(l.bytes().map(|b| b.to_ascii_lowercase()));
    }
    out.extend_from_slice(suffix);
    out
}

/// Parses a textual absolute or relative name (`svc.example`, `ns1.example.`) into wire form.
/// Labels are letters, digits, `-` and `_`, 1-63 bytes; the whole name at most 255 bytes.
pub(crate) fn parse_text_name(text: &str) -> Result<WireName, String> {
    let t = text.strip_suffix('.').unwrap_or(text);
    if t.is_empty() {
        return Ok(vec![0]);
    }
    let mut labels = Vec::new();
    for l in t.split('.') {
        if l.is_empty() || l.len() > 63 {
            return Err(format!("{text:?}: labels must be 1-63 characters"));
        }
        if !l
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "{text:?}: only letters, digits, '-' and '_' are allowed in labels"
            ));
        }
        labels.push(l);
    }
    let w = name_with(&labels, &[0]);
    if w.len() > 255 {
        return Err(format!("{text:?} is longer than 255 bytes"));
    }
    Ok(w)
}

/// Offsets of each label in a wire name (the root byte excluded).
pub(crate) fn label_offsets(name: &[u8]) -> Vec<usize> {
    let mut v = Vec::new();
    let mut i = 0;
    while i < name.len() && name[i] != 0 {
        v.push(i);
        i += 1 + name[i] as usize;
    }
    v
}

/// Whether `name` equals `zone` or lies below it.
pub(crate) fn is_within(name: &[u8], zone: &[u8]) -> bool {
    name.len() >= zone.len()
        && name.ends_with(zone)
        && label_offsets(name)
            .into_iter()
            .any(|o| o == name.len() - zone.len())
        || name == zone
}

/// The parent of a wire name (None for the root).
pub(crate) fn parent(name: &[u8]) -> Option<&[u8]> {
    if name.first().copied().unwrap_or(0) == 0 {
        None
    } else {
        Some(&name[1 + name[0] as usize..])
    }
}

/// Text form of a wire name, absolute (trailing dot), with RFC 1035 escapes.
pub(crate) fn name_to_text(name: &[u8]) -> String {
    let mut s = String::new();
    let mut i = 0;
    while i < name.len() && name[i] != 0 {
        let len = name[i] as usize;
        for &b in &name[i + 1..i + 1 + len] {
            match b {
                b'.' | b'\\' | b'"' | b'(' | b')' | b';' | b'@' | b'$' => {
                    s.push('\\');
                    s.push(b as char);
                }
                0x21..=0x7e => s.push(b as char),
                _ => s.push_str(&format!("\\{b:03}")),
            }
        }
        s.push('.');
        i += 1 + len;
    }
    if s.is_empty() {
        s.push('.');
    }
    s
}

/// Record data of the types this server serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Ns(WireName),
    Soa {
        mname: WireName,
        rname: WireName,
        serial: u32,
        minimum: u32,
    },
    Ptr(WireName),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: WireName,
    },
    /// Character-strings, each at most 255 bytes.
    Txt(Vec<Vec<u8>>),
}

impl RData {
    pub(crate) fn rtype(&self) -> u16 {
        match self {
            RData::A(_) => rtype::A,
            RData::Aaaa(_) => rtype::AAAA,
            RData::Ns(_) => rtype::NS,
            RData::Soa { .. } => rtype::SOA,
            RData::Ptr(_) => rtype::PTR,
            RData::Srv { .. } => rtype::SRV,
            RData::Txt(_) => rtype::TXT,
        }
    }
}

/// The RRsets at one owner name, types in insertion order. Empty: an empty non-terminal or
/// a name that exists without data (the NS host without configured addresses).
pub(crate) type NodeData = Vec<(u16, Vec<RData>)>;

/// Every record of one zone.
#[derive(Debug, Clone)]
pub(crate) struct ZoneData {
    /// Apex, lowercase wire form.
    pub apex: WireName,
    /// TTL of every record.
    pub ttl: u32,
    /// The SOA record data (also in `nodes` at the apex).
    pub soa: RData,
    /// Owner name -> RRsets (includes empty non-terminals).
    pub nodes: BTreeMap<WireName, NodeData>,
}

impl ZoneData {
    /// The RRset of `t` at `owner`, if any.
    pub(crate) fn rrset(&self, owner: &[u8], t: u16) -> Option<&[RData]> {
        self.nodes
            .get(owner)?
            .iter()
            .find(|(ty, _)| *ty == t)
            .map(|(_, v)| v.as_slice())
    }
}

/// Splits `key=value` into character-strings of at most 255 bytes (at UTF-8 boundaries):
/// the first carries the key, further ones the rest of a long value.
fn txt_strings(out: &mut Vec<Vec<u8>>, s: &str) {
    let mut rest = s;
    while !rest.is_empty() {
        let mut cut = rest.len().min(255);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        out.push(rest.as_bytes()[..cut].to_vec());
        rest = &rest[cut..];
    }
}

/// Adds `key=a,b,c` strings, splitting the list over several strings (each repeating the
/// key) so that none exceeds 255 bytes.
fn txt_list(out: &mut Vec<Vec<u8>>, key: &str, items: &[&str]) {
    let mut cur = format!("{key}=");
    let mut n = 0;
    for it in items {
        if n > 0 && cur.len() + 1 + it.len() > 255 {
            out.push(std::mem::take(&mut cur).into_bytes());
            cur = format!("{key}=");
            n = 0;
        }
        if n > 0 {
            cur.push(',');
        }
        cur.push_str(it);
        n += 1;
    }
    out.push(cur.into_bytes());
}

/// Normalised DNS settings shared by every zone.
#[derive(Debug, Clone)]
pub(crate) struct Naming {
    /// Suffix appended to every namespace label (wire form; `[0]` for none).
    pub suffix: WireName,
    /// NS hosts of every zone with their addresses (served when the host lies inside the
    /// zone), in order: the first one is the SOA's MNAME. Empty: the one host
    /// `ns.dns.<zone>.` with `ns_addresses`.
    pub ns_hosts: Vec<(WireName, Vec<IpAddr>)>,
    /// Addresses of the default NS host.
    pub ns_addresses: Vec<IpAddr>,
}

impl Naming {
    pub(crate) fn apex(&self, ns: &str) -> WireName {
        name_with(&[ns], &self.suffix)
    }

    /// The NS hosts of the zone at `apex` with their addresses.
    pub(crate) fn ns_targets(&self, apex: &[u8]) -> Vec<(WireName, &[IpAddr])> {
        if self.ns_hosts.is_empty() {
            return vec![(name_with(&["ns", "dns"], apex), &self.ns_addresses)];
        }
        self.ns_hosts
            .iter()
            .map(|(h, a)| (h.clone(), a.as_slice()))
            .collect()
    }

    /// The primary NS host (the SOA's MNAME).
    pub(crate) fn primary_ns(&self, apex: &[u8]) -> WireName {
        match self.ns_hosts.first() {
            Some((h, _)) => h.clone(),
            None => name_with(&["ns", "dns"], apex),
        }
    }
}

/// The names of one part of a zone with their RRsets (empty: an empty non-terminal).
pub(crate) type NodeList = Vec<(WireName, NodeData)>;

fn push(nodes: &mut NodeList, owner: &[u8], rdata: RData) {
    let i = match nodes.iter().rposition(|(o, _)| o == owner) {
        Some(i) => i,
        None => {
            nodes.push((owner.to_vec(), Vec::new()));
            nodes.len() - 1
        }
    };
    let node = &mut nodes[i].1;
    let t = rdata.rtype();
    match node.iter_mut().find(|(ty, _)| *ty == t) {
        Some((_, set)) => set.push(rdata),
        None => node.push((t, vec![rdata])),
    }
}

fn touch(nodes: &mut NodeList, owner: &[u8]) {
    if !nodes.iter().any(|(o, _)| o == owner) {
        nodes.push((owner.to_vec(), Vec::new()));
    }
}

/// The records at the apex: SOA, NS, the NS hosts' addresses (and their empty ancestors).
pub(crate) fn apex_group(snap: &NamespaceSnapshot, naming: &Naming) -> NodeList {
    let apex = naming.apex(snap.name.as_str());
    let mut n = NodeList::new();
    push(&mut n, &apex, soa_of(snap, naming));
    let targets = naming.ns_targets(&apex);
    for (host, _) in &targets {
        push(&mut n, &apex, RData::Ns(host.clone()));
    }
    for (host, addrs) in targets {
        if !is_within(&host, &apex) || host == apex {
            continue;
        }
        touch(&mut n, &host);
        let addrs: BTreeSet<IpAddr> = addrs.iter().copied().collect();
        for a in addrs {
            push(&mut n, &host, addr_rdata(a));
        }
        let mut cur = parent(&host);
        while let Some(p) = cur {
            if p.len() <= apex.len() {
                break;
            }
            touch(&mut n, p);
            cur = parent(p);
        }
    }
    n
}

/// The SOA of a zone.
pub(crate) fn soa_of(snap: &NamespaceSnapshot, naming: &Naming) -> RData {
    let apex = naming.apex(snap.name.as_str());
    RData::Soa {
        mname: naming.primary_ns(&apex),
        rname: name_with(&["hostmaster"], &apex),
        serial: snap.serial,
        minimum: snap.settings.negative_ttl,
    }
}

/// A service type of a zone: `_svc._proto.<apex>`, with its two labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ServiceType {
    pub name: WireName,
    pub svc_label: String,
    pub proto_label: &'static str,
}

impl ServiceType {
    /// Whether `spec` is an offer of this service type.
    pub(crate) fn offered_by(&self, spec: &shared::model::ServiceSpec) -> bool {
        self.svc_label.get(1..) == Some(spec.name.as_str())
            && self.proto_label == proto_label(spec.proto)
    }
}

/// The distinct service types of a registration, in order.
pub(crate) fn service_types(apex: &[u8], reg: &Registration) -> Vec<ServiceType> {
    let mut v: Vec<ServiceType> = Vec::new();
    for s in &reg.services {
        let svc_label = format!("_{}", s.name.as_str());
        // Registrations stored before names were limited to 62 characters (validation
        // now refuses longer ones) are loaded unchecked: a 64-byte label is not a name.
        if svc_label.len() > 63 {
            continue;
        }
        let proto_label = proto_label(s.proto);
        if !v
            .iter()
            .any(|t| t.svc_label == svc_label && t.proto_label == proto_label)
        {
            v.push(ServiceType {
                name: name_with(&[&svc_label, proto_label], apex),
                svc_label,
                proto_label,
            });
        }
    }
    v
}

fn proto_label(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "_tcp",
        Proto::Udp => "_udp",
    }
}

/// DNS-SD TXT of an instance: `id=<id>` first, then key=value metadata.
fn sd_txt(id: &str, reg: &Registration) -> RData {
    let mut t = Vec::new();
    txt_strings(&mut t, &format!("id={id}"));
    for (k, v) in &reg.metadata {
        txt_strings(&mut t, &format!("{k}={v}"));
    }
    RData::Txt(t)
}

/// The records owned by one membrane: `id.<apex>` (A, AAAA, TXT) and, per service type,
/// `id._svc._proto.<apex>` (SRV, TXT).
pub(crate) fn instance_group(apex: &[u8], inst: &Instance) -> NodeList {
    let id = inst.id.as_str();
    let reg = &inst.registration;
    let host = name_with(&[id], apex);
    let mut n = NodeList::new();
    touch(&mut n, &host);
    let addrs: BTreeSet<IpAddr> = reg.addresses.iter().copied().collect();
    for a in addrs {
        push(&mut n, &host, addr_rdata(a));
    }
    let mut txt = Vec::new();
    if let Some(p) = &reg.parent {
        txt_strings(&mut txt, &format!("parent={p}"));
    }
    if let Some(ep) = &reg.endpoint {
        txt_strings(&mut txt, &format!("mode={}", ep.mode()));
        txt_strings(&mut txt, &format!("endpoint={}", ep.target()));
    }
    if !reg.capabilities.is_empty() {
        let caps: Vec<&str> = reg.capabilities.iter().map(|c| c.as_str()).collect();
        txt_list(&mut txt, "capabilities", &caps);
    }
    if !reg.tags.is_empty() {
        let tags: Vec<&str> = reg.tags.iter().map(|c| c.as_str()).collect();
        txt_list(&mut txt, "tags", &tags);
    }
    txt.push(b"state=passing".to_vec());
    push(&mut n, &host, RData::Txt(txt));
    for st in service_types(apex, reg) {
        let inst_name = name_with(&[id], &st.name);
        for s in &reg.services {
            if st.offered_by(s) {
                push(
                    &mut n,
                    &inst_name,
                    RData::Srv {
                        priority: s.priority,
                        weight: s.weight,
                        port: s.port,
                        target: host.clone(),
                    },
                );
            }
        }
        push(&mut n, &inst_name, sd_txt(id, reg));
    }
    n
}

/// The records of one service type, over its member instances (those offering it):
/// `_svc._proto` SRV/PTR/TXT, the subtype PTRs, and the empty `_sub` and `_proto` names.
pub(crate) fn service_group(apex: &[u8], st: &ServiceType, members: &[&Instance]) -> NodeList {
    let mut n = NodeList::new();
    touch(&mut n, &st.name);
    let mut subtypes: BTreeMap<String, Vec<WireName>> = BTreeMap::new();
    for inst in members {
        let id = inst.id.as_str();
        let reg = &inst.registration;
        let host = name_with(&[id], apex);
        let inst_name = name_with(&[id], &st.name);
        for s in &reg.services {
            if st.offered_by(s) {
                push(
                    &mut n,
                    &st.name,
                    RData::Srv {
                        priority: s.priority,
                        weight: s.weight,
                        port: s.port,
                        target: host.clone(),
                    },
                );
            }
        }
        push(&mut n, &st.name, RData::Ptr(inst_name.clone()));
        push(&mut n, &st.name, sd_txt(id, reg));
        let labels: BTreeSet<&str> = reg
            .capabilities
            .iter()
            .chain(reg.tags.iter())
            .map(|t| t.as_str())
            // `_<label>` must fit a DNS label (see `service_types`).
            .filter(|t| t.len() < 63)
            .collect();
        for l in labels {
            subtypes
                .entry(format!("_{l}"))
                .or_default()
                .push(inst_name.clone());
        }
    }
    if !subtypes.is_empty() {
        let sub = name_with(&["_sub"], &st.name);
        touch(&mut n, &sub);
        for (label, insts) in subtypes {
            let owner = name_with(&[&label], &sub);
            for i in insts {
                push(&mut n, &owner, RData::Ptr(i));
            }
        }
    }
    touch(&mut n, &name_with(&[st.proto_label], apex));
    n
}

/// `_services._dns-sd._udp.<apex>`: one PTR per service type (none: no names at all).
pub(crate) fn enumeration_group<'a>(
    apex: &[u8],
    types: impl Iterator<Item = &'a WireName>,
) -> NodeList {
    let mut n = NodeList::new();
    let owner = name_with(&["_services", "_dns-sd", "_udp"], apex);
    for t in types {
        push(&mut n, &owner, RData::Ptr(t.clone()));
    }
    if !n.is_empty() {
        touch(&mut n, &name_with(&["_dns-sd", "_udp"], apex));
        touch(&mut n, &name_with(&["_udp"], apex));
    }
    n
}

/// Every part of a zone, merged: what [`export`](super::export) writes.
pub(crate) fn zone_data(snap: &NamespaceSnapshot, naming: &Naming) -> ZoneData {
    let apex = naming.apex(snap.name.as_str());
    let mut z = ZoneData {
        apex: apex.clone(),
        ttl: snap.settings.record_ttl,
        soa: soa_of(snap, naming),
        nodes: BTreeMap::new(),
    };
    let mut types: BTreeMap<ServiceType, Vec<&Instance>> = BTreeMap::new();
    let mut parts = vec![apex_group(snap, naming)];
    for inst in &snap.instances {
        parts.push(instance_group(&apex, inst));
        for st in service_types(&apex, &inst.registration) {
            types.entry(st).or_default().push(inst);
        }
    }
    for (st, members) in &types {
        parts.push(service_group(&apex, st, members));
    }
    parts.push(enumeration_group(&apex, types.keys().map(|t| &t.name)));
    for part in parts {
        for (owner, data) in part {
            let node = z.nodes.entry(owner).or_default();
            for (t, set) in data {
                match node.iter_mut().find(|(ty, _)| *ty == t) {
                    Some((_, s)) => s.extend(set),
                    None => node.push((t, set)),
                }
            }
        }
    }
    z
}

fn addr_rdata(a: IpAddr) -> RData {
    match a {
        IpAddr::V4(v4) => RData::A(v4),
        IpAddr::V6(v6) => RData::Aaaa(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let w = parse_text_name("Svc.Example.").unwrap();
        assert_eq!(w, b"\x03svc\x07example\x00");
        assert_eq!(name_to_text(&w), "svc.example.");
        assert_eq!(parse_text_name("").unwrap(), vec![0]);
        assert!(parse_text_name("a..b").is_err());
        assert!(parse_text_name("a b").is_err());
        assert!(parse_text_name(&"a".repeat(64)).is_err());
        let apex = name_with(&["ns"], &w);
        assert!(is_within(&name_with(&["x"], &apex), &apex));
        assert!(is_within(&apex, &apex));
        // "xns.svc.example." ends with the bytes of "ns.svc.example." only off a boundary.
        assert!(!is_within(
            &parse_text_name("ans.svc.example").unwrap(),
            &parse_text_name("s.svc.example").unwrap()
        ));
        assert_eq!(parent(&apex).unwrap(), &w[..]);
        assert_eq!(label_offsets(&apex), vec![0, 3, 7]);
    }

    /// A registration stored before service, capability and tag names were limited to 62
    /// characters is loaded without that check: its 63-character names get no records
    /// (a 64-byte `_<name>` label would be a malformed name on the wire).
    #[test]
    fn names_too_long_for_a_prefixed_label_are_left_out() {
        use shared::name::{ServiceName, Tag};
        let long = "a".repeat(63);
        let reg = Registration {
            services: [long.as_str(), "web"]
                .iter()
                .map(|n| shared::model::ServiceSpec {
                    name: ServiceName::new(n).unwrap(),
                    proto: Proto::Tcp,
                    port: 80,
                    priority: 0,
                    weight: 10,
                })
                .collect(),
            capabilities: vec![Tag::new(&long).unwrap(), Tag::new("gpu").unwrap()],
            ..Default::default()
        };
        let apex = name_with(&["ns"], &[0]);
        let types = service_types(&apex, &reg);
        assert_eq!(types.len(), 1);
        assert_eq!(types[0].svc_label, "_web");
        let inst = Instance {
            id: shared::MembraneId::new("m1").unwrap(),
            registration: std::sync::Arc::new(reg),
        };
        let nodes = service_group(&apex, &types[0], &[&inst]);
        assert!(nodes.len() > 3, "{nodes:?}");
        for (owner, _) in &nodes {
            assert!(
                label_offsets(owner).iter().all(|&o| owner[o] <= 63),
                "{owner:?}"
            );
        }
    }

    #[test]
    fn txt_splitting() {
        let mut out = Vec::new();
        txt_strings(&mut out, &format!("endpoint={}", "x".repeat(600)));
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|s| s.len() <= 255));
        assert_eq!(out.concat().len(), 609);
        let items: Vec<String> = (0..40).map(|i| format!("capability-{i:02}")).collect();
        let refs: Vec<&str> = items.iter().map(|s| s.as_str()).collect();
        let mut out = Vec::new();
        txt_list(&mut out, "capabilities", &refs);
        assert!(out.len() > 1);
        assert!(
            out.iter()
                .all(|s| s.len() <= 255 && s.starts_with(b"capabilities="))
        );
        let joined: Vec<String> = out
            .iter()
            .flat_map(|s| {
                String::from_utf8(s[13..].to_vec())
                    .unwrap()
                    .split(',')
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(joined, items);
    }
}
