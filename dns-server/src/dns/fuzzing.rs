//! Fuzz target bodies (used by `dns-server/fuzz` and replayed over its seed corpus by
//! `cargo test`): request bytes through the whole query path (parse, lookup, response
//! assembly) of catalogs serving a few zones, and registration bodies through validation
//! into a zone and its answers. Not an API: hidden from the docs, may change at any time.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use hickory_proto::op::{Message, MessageType};
use shared::model::{Endpoint, Proto, Registration, ServiceSpec};
use shared::{MembraneId, NamespaceName, NamespaceSettings, ServiceName, Tag};

use super::query::{EDNS_PAYLOAD, Rng, Scratch, TCP_MAX};
use super::records::{name_with, rtype, service_types};
use super::stats::Shard;
use super::{Catalog, DnsConfig};
use crate::snapshot::{Instance, NamespaceSnapshot};

/// The client's address: loopback, which response rate limiting never limits (so every
/// input is answered in full).
const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// One request, as a UDP and as a TCP query, to a catalog without a suffix and to one with
/// `--domain-suffix svc.example --ns-host ns1.example.net`: nothing panics, and every
/// response
/// - is a response to it (same id, QR set) within the transport's size limit (512 bytes
///   over UDP without EDNS, 1232 with);
/// - parses back (hickory-proto), echoes the question hickory reads in the request, and
///   has only records owned by the question name in its answer section;
///
/// and nothing but a request too short for a header or a response is left unanswered.
pub fn dns_query(data: &[u8]) {
    let catalogs = CATALOGS.get_or_init(catalogs);
    let request = Message::from_vec(data).ok();
    let mut out = Vec::new();
    for catalog in catalogs {
        for tcp in [false, true] {
            let mut scratch = Scratch::new(16);
            scratch.rng = Rng::seeded(data.len() as u64);
            let answered =
                catalog.respond(data, tcp, PEER, &mut out, &mut scratch, &Shard::default());
            if answered.is_none() {
                assert!(
                    data.len() < 12 || data[2] & 0x80 != 0,
                    "no answer to a query: {data:?}"
                );
                continue;
            }
            check(data, request.as_ref(), &out, tcp);
        }
    }
}

/// A registration body (`PUT …/membranes/{id}`) that parses and validates, registered as
/// a 63-character id in a 63-character namespace under the longest `--domain-suffix` the
/// configuration accepts: every name it owns answers every type with a response that
/// parses back (as [`dns_query`] checks), and the zone exports as a master file.
pub fn registration_zone(data: &[u8]) {
    let Ok(reg) = crate::http::extract::parse_json::<Registration>(data) else {
        return;
    };
    if reg.validate().is_err() {
        return;
    }
    let config = LONGEST_SUFFIX.get_or_init(longest_suffix).clone();
    let catalog = Catalog::new(config.clone()).unwrap();
    let long = "z".repeat(63);
    let snap = snapshot(
        &long,
        vec![Instance {
            id: MembraneId::new(&long).unwrap(),
            registration: Arc::new(reg),
        }],
    );
    catalog.update(&snap);
    let reg = &snap.instances[0].registration;
    let apex = catalog.naming.apex(&long);
    let host = name_with(&[&long], &apex);
    let mut names = vec![
        apex.clone(),
        host.clone(),
        name_with(&["_services", "_dns-sd", "_udp"], &apex),
    ];
    for st in service_types(&apex, reg) {
        names.push(name_with(&[&long], &st.name));
        for label in reg.capabilities.iter().chain(&reg.tags) {
            names.push(name_with(&[&format!("_{label}"), "_sub"], &st.name));
        }
        names.push(st.name);
    }
    let mut out = Vec::new();
    let mut scratch = Scratch::new(0);
    for name in &names {
        assert!(name.len() <= 255, "a {} byte name", name.len());
        for t in [
            rtype::A,
            rtype::AAAA,
            rtype::TXT,
            rtype::SRV,
            rtype::PTR,
            rtype::ANY,
        ] {
            let mut req = vec![0x42, 0x42, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1];
            req.extend_from_slice(name);
            req.extend_from_slice(&t.to_be_bytes());
            req.extend_from_slice(&[0, 1, 0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 0]);
            for tcp in [false, true] {
                let answered =
                    catalog.respond(&req, tcp, PEER, &mut out, &mut scratch, &Shard::default());
                assert!(answered.is_some(), "no answer for {name:?}");
                check(&req, Message::from_vec(&req).ok().as_ref(), &out, tcp);
            }
        }
    }
    let _ = super::export_zone(&snap, &config);
}

static LONGEST_SUFFIX: OnceLock<DnsConfig> = OnceLock::new();

/// The configuration with the longest domain suffix (labels `s`) that validates.
fn longest_suffix() -> DnsConfig {
    (1..=128)
        .rev()
        .map(|n| DnsConfig {
            domain_suffix: Some(vec!["s"; n].join(".")),
            ..Default::default()
        })
        .find(|c| c.validate().is_ok())
        .unwrap()
}

fn check(req: &[u8], request: Option<&Message>, out: &[u8], tcp: bool) {
    assert!(out.len() >= 12 && out[..2] == req[..2], "id: {out:?}");
    let resp = match Message::from_vec(out) {
        Ok(m) => m,
        Err(e) => panic!("unparsable response {out:?} to {req:?}: {e}"),
    };
    assert_eq!(resp.metadata.message_type, MessageType::Response);
    let limit = match (tcp, &resp.edns) {
        (true, _) => TCP_MAX,
        (false, Some(_)) => usize::from(EDNS_PAYLOAD),
        (false, None) => 512,
    };
    assert!(out.len() <= limit, "{} bytes over {limit}", out.len());
    if let (Some(q), Some(req)) = (resp.queries.first(), request)
        && let [asked] = req.queries.as_slice()
    {
        assert_eq!(
            (q.name(), q.query_type(), q.query_class()),
            (asked.name(), asked.query_type(), asked.query_class()),
            "question not echoed"
        );
    }
    if let Some(q) = resp.queries.first() {
        for r in &resp.answers {
            assert_eq!(&r.name, q.name(), "answer owned by another name");
        }
    }
}

static CATALOGS: OnceLock<Vec<Catalog>> = OnceLock::new();

/// Zones with every kind of name: a namespace of 70 membranes (one SRV priority group over
/// 64 records, the large-group shuffle), subtypes, metadata up to the TXT limit, IPv4 and
/// IPv6, endpoints and parents; a second one with a 63-character namespace and ids.
fn catalogs() -> Vec<Catalog> {
    let plain = Catalog::new(DnsConfig {
        ns_addresses: vec![[192, 0, 2, 53].into(), "2001:db8::53".parse().unwrap()],
        ..Default::default()
    })
    .unwrap();
    let suffixed = Catalog::new(DnsConfig {
        domain_suffix: Some("svc.example".into()),
        ns_hosts: vec![super::NsHost {
            name: "ns1.example.net.".into(),
            addresses: vec![],
        }],
        ..Default::default()
    })
    .unwrap();
    let long = "l".repeat(63);
    let snaps = [
        snapshot(
            "ns",
            (0..70).map(|i| instance(&format!("m{i}"), i)).collect(),
        ),
        snapshot(
            &long,
            vec![
                instance(&long, 1),
                instance(&format!("{}x", &long[..62]), 2),
            ],
        ),
    ];
    for c in [&plain, &suffixed] {
        for s in &snaps {
            c.update(s);
        }
    }
    vec![plain, suffixed]
}

fn snapshot(ns: &str, mut instances: Vec<Instance>) -> NamespaceSnapshot {
    instances.sort_by(|a, b| a.id.cmp(&b.id));
    NamespaceSnapshot {
        name: NamespaceName::new(ns).unwrap(),
        settings: NamespaceSettings::default(),
        instances: instances.into_iter().map(Arc::new).collect(),
        serial: 7,
    }
}

fn instance(id: &str, i: u16) -> Instance {
    let svc = |name: &str, proto, port, priority, weight| ServiceSpec {
        name: ServiceName::new(name).unwrap(),
        proto,
        port,
        priority,
        weight,
    };
    let mut services = vec![
        svc("web", Proto::Tcp, 8000 + i, i % 3, i),
        svc("bulk", Proto::Tcp, 9000, 0, i % 5),
    ];
    if i.is_multiple_of(4) {
        services.push(svc("dns", Proto::Udp, 53, 0, 0));
    }
    let mut addresses: Vec<IpAddr> = vec![[10, 0, (i / 200) as u8, (i % 200) as u8].into()];
    if i.is_multiple_of(2) {
        addresses.push(format!("fd00::{i:x}").parse().unwrap());
    }
    let tag = |t: &str| Tag::new(t).unwrap();
    let mut metadata = BTreeMap::from([("version".to_string(), format!("1.{i}"))]);
    if i.is_multiple_of(7) {
        metadata.insert("k".into(), "v".repeat(253));
    }
    Instance {
        id: MembraneId::new(id).unwrap(),
        registration: Arc::new(Registration {
            parent: (i > 0).then(|| MembraneId::new("m0").unwrap()),
            addresses,
            services,
            capabilities: if i.is_multiple_of(3) {
                vec![tag("vision"), tag("gpu")]
            } else {
                vec![]
            },
            tags: vec![tag(if i.is_multiple_of(2) { "blue" } else { "green" })],
            metadata: metadata.into(),
            endpoint: i.is_multiple_of(5).then(|| Endpoint::SharedVolume {
                path: "/var/lib/membrane/shared".into(),
            }),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    /// `dns-server/fuzz/seeds/<target>` through the target body.
    fn replay(target: &str, f: fn(&[u8])) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        shared::fuzzing::replay_seeds(&dir.join(target), f);
    }

    #[test]
    fn dns_query_seeds() {
        replay("dns_query", super::dns_query);
    }

    #[test]
    fn registration_zone_seeds() {
        replay("registration_zone", super::registration_zone);
    }
}
