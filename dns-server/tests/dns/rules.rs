//! The protocol rules: AA, NXDOMAIN/NODATA with SOA, REFUSED, FORMERR/NOTIMP, EDNS0, TC
//! and TCP, ANY, case, SRV order, TTLs, the suffix, and live updates.

use dns_server::dns::{DnsConfig, NsHost};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};

use crate::common::*;

fn soa_minimum(m: &Message) -> (u32, u32) {
    match &m.authorities[..] {
        [r] => match &r.data {
            RData::SOA(s) => (r.ttl, s.minimum),
            other => panic!("authority is {other:?}"),
        },
        other => panic!("authority is {other:?}"),
    }
}

#[tokio::test]
async fn nxdomain_and_nodata_carry_the_soa() {
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    for q in ["nope.cog.", "x.web-1.cog.", "_nope._tcp.cog.", "a.b.c.cog."] {
        let m = udp(srv.addr, q, RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{q}");
        assert!(m.metadata.authoritative);
        assert!(m.answers.is_empty());
        assert_eq!(m.authorities[0].name.to_ascii(), "cog.");
        // RFC 2308: TTL of the SOA = min(TTL, minimum) = the namespace negative TTL (7).
        assert_eq!(soa_minimum(&m), (7, 7), "{q}");
    }
    // Known names, other type; empty non-terminals are NODATA too (RFC 8020).
    for (q, t) in [
        ("web-1.cog.", RecordType::MX),
        ("cog.", RecordType::A),
        ("_visual._tcp.cog.", RecordType::A),
        ("_sub._visual._tcp.cog.", RecordType::PTR),
        ("_tcp.cog.", RecordType::SRV),
        ("_dns-sd._udp.cog.", RecordType::PTR),
    ] {
        let m = udp(srv.addr, q, t).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{q}");
        assert!(m.metadata.authoritative);
        assert!(m.answers.is_empty(), "{q}");
        assert_eq!(soa_minimum(&m), (7, 7), "{q}");
    }
    srv.stop().await;
}

#[tokio::test]
async fn refused_outside_zones_and_flags() {
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    for q in ["example.com.", "other.", "."] {
        let m = udp(srv.addr, q, RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{q}");
        assert!(!m.metadata.authoritative);
        assert!(m.answers.is_empty() && m.authorities.is_empty());
    }
    // RD set: answered like any other, RD echoed, RA clear; RD clear stays clear.
    let m = udp_opts(srv.addr, "web-1.cog.", RecordType::A, None, true).await;
    assert!(m.metadata.recursion_desired && !m.metadata.recursion_available);
    assert!(m.metadata.authoritative);
    assert_eq!(m.answers.len(), 1);
    let m = udp_opts(srv.addr, "web-1.cog.", RecordType::A, None, false).await;
    assert!(!m.metadata.recursion_desired && !m.metadata.recursion_available);
    // Not class IN.
    let (_, mut q) = query_bytes("web-1.cog.", RecordType::A, None, true);
    let n = q.len();
    q[n - 1] = 3; // CHAOS
    let m = Message::from_vec(&udp_raw(srv.addr, &q).await.unwrap()).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    srv.stop().await;
}

#[tokio::test]
async fn malformed_and_unsupported() {
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    let (_, good) = query_bytes("web-1.cog.", RecordType::A, None, true);
    // Too short to echo: nothing.
    assert!(udp_raw(srv.addr, &good[..5]).await.is_none());
    // A response (QR set): never answered.
    let mut resp = good.clone();
    resp[2] |= 0x80;
    assert!(udp_raw(srv.addr, &resp).await.is_none());
    // Question cut short: FORMERR with the id echoed.
    let raw = udp_raw(srv.addr, &good[..good.len() - 3]).await.unwrap();
    let m = Message::from_vec(&raw).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(&raw[..2], &good[..2]);
    // Two questions: FORMERR.
    let mut two = good.clone();
    two[5] = 2;
    two.extend_from_slice(&good[12..]);
    let m = Message::from_vec(&udp_raw(srv.addr, &two).await.unwrap()).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // A question name that points at itself (a loop): FORMERR, no hang.
    let mut lp = good[..12].to_vec();
    lp.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
    let raw = udp_raw(srv.addr, &lp).await.unwrap();
    assert_eq!(raw[3] & 0xF, 1);
    // Opcodes other than QUERY: NOTIMP, question echoed.
    for opcode in [2u8, 4, 5] {
        let mut o = good.clone();
        o[2] = (o[2] & 0x87) | (opcode << 3);
        let m = Message::from_vec(&udp_raw(srv.addr, &o).await.unwrap()).unwrap();
        assert_eq!(
            m.metadata.response_code,
            ResponseCode::NotImp,
            "opcode {opcode}"
        );
        assert_eq!(m.queries.len(), 1);
    }
    // AXFR over UDP: NOTIMP (TCP only); over TCP without TSIG or the allow-list: REFUSED.
    let m = udp(srv.addr, "cog.", RecordType::AXFR).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
    let m = tcp(srv.addr, "cog.", RecordType::AXFR).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(m.answers.is_empty());
    // Two OPT records: FORMERR (RFC 6891).
    let (_, e) = query_bytes("web-1.cog.", RecordType::A, Some(1232), true);
    let mut e2 = e.clone();
    e2[11] = 2;
    e2.extend_from_slice(&e[e.len() - 11..]);
    let raw = udp_raw(srv.addr, &e2).await.unwrap();
    assert_eq!(raw[3] & 0xF, 1);
    srv.stop().await;
}

#[tokio::test]
async fn edns_echoed_and_versioned() {
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    let m = udp_opts(srv.addr, "web-1.cog.", RecordType::A, Some(4096), true).await;
    let e = m.edns.as_ref().expect("OPT echoed");
    assert_eq!(e.max_payload(), 1232);
    assert_eq!(e.version(), 0);
    let m = udp_opts(srv.addr, "web-1.cog.", RecordType::A, None, true).await;
    assert!(m.edns.is_none());
    // EDNS version 1: BADVERS (extended rcode 16), OPT with version 0.
    let (_, mut q) = query_bytes("web-1.cog.", RecordType::A, Some(1232), true);
    let n = q.len();
    q[n - 5] = 1; // version byte of the OPT TTL
    let raw = udp_raw(srv.addr, &q).await.unwrap();
    let m = Message::from_vec(&raw).unwrap();
    assert_eq!(u16::from(m.metadata.response_code), 16);
    assert!(m.answers.is_empty());
    assert_eq!(m.edns.unwrap().version(), 0);
    srv.stop().await;
}

#[tokio::test]
async fn truncation_then_tcp_with_300_instances() {
    let srv = Server::start(DnsConfig::default(), &[many("big", "api", 300)]).await;
    for edns in [None, Some(1232), Some(4096)] {
        let m = udp_opts(srv.addr, "_api._tcp.big.", RecordType::SRV, edns, true).await;
        assert!(m.metadata.truncation, "{edns:?}");
        assert!(m.answers.is_empty());
        assert_eq!(m.queries.len(), 1);
    }
    let (_, q) = query_bytes("_api._tcp.big.", RecordType::SRV, Some(4096), true);
    assert!(udp_raw(srv.addr, &q).await.unwrap().len() <= 1232);
    let m = tcp(srv.addr, "_api._tcp.big.", RecordType::SRV).await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 300);
    assert_eq!(m.additionals.len(), 300);
    let mut targets: Vec<String> = m
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::SRV(s) => s.target.to_ascii(),
            _ => panic!(),
        })
        .collect();
    targets.sort();
    targets.dedup();
    assert_eq!(targets.len(), 300);
    assert!(srv.catalog.stats().truncated >= 3);
    srv.stop().await;
}

#[tokio::test]
async fn additional_filled_as_far_as_it_fits() {
    // 30 SRV records fit in 1232 bytes, their 30 A records do not all: those that fit are
    // sent (not all-or-nothing), without TC (RFC 2181 9).
    let srv = Server::start(DnsConfig::default(), &[many("mid", "api", 30)]).await;
    let (_, q) = query_bytes("_api._tcp.mid.", RecordType::SRV, Some(1232), true);
    let raw = udp_raw(srv.addr, &q).await.unwrap();
    assert!(raw.len() <= 1232, "{}", raw.len());
    let m = Message::from_vec(&raw).unwrap();
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 30);
    let targets: Vec<String> = m
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::SRV(s) => s.target.to_ascii(),
            other => panic!("{other:?}"),
        })
        .collect();
    let glue: Vec<_> = m
        .additionals
        .iter()
        .filter(|r| r.record_type() == RecordType::A)
        .collect();
    assert!(
        (1..30).contains(&glue.len()),
        "some but not all addresses fit: {}",
        glue.len()
    );
    // The addresses of the first answer records (the ones a client tries first), in order.
    let glue_names: Vec<String> = glue.iter().map(|r| r.name.to_ascii()).collect();
    assert_eq!(glue_names, targets[..glue.len()], "{targets:?}");
    // The room left is less than one more A record (16 bytes with a compressed owner).
    assert!(raw.len() + 30 > 1232, "{}", raw.len());
    let m = tcp(srv.addr, "_api._tcp.mid.", RecordType::SRV).await;
    assert_eq!(m.additionals.len(), 30);
    srv.stop().await;
}

#[tokio::test]
async fn tcp_several_queries_per_connection() {
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    let qs: Vec<(u16, Vec<u8>)> = [
        ("web-1.cog.", RecordType::A),
        ("_visual._tcp.cog.", RecordType::SRV),
        ("nope.cog.", RecordType::A),
        ("example.com.", RecordType::A),
    ]
    .iter()
    .map(|(n, t)| query_bytes(n, *t, None, true))
    .collect();
    let answers = tcp_raw(
        srv.addr,
        &qs.iter().map(|q| q.1.clone()).collect::<Vec<_>>(),
    )
    .await;
    let codes: Vec<(u16, ResponseCode)> = answers
        .iter()
        .map(|a| {
            let m = Message::from_vec(a).unwrap();
            (m.metadata.id, m.metadata.response_code)
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            (qs[0].0, ResponseCode::NoError),
            (qs[1].0, ResponseCode::NoError),
            (qs[2].0, ResponseCode::NXDomain),
            (qs[3].0, ResponseCode::Refused),
        ]
    );
    assert!(srv.catalog.stats().queries_tcp >= 4);
    srv.stop().await;
}

#[tokio::test]
async fn any_gets_a_minimal_answer() {
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    for q in ["web-1.cog.", "cog.", "_visual._tcp.cog."] {
        let m = udp(srv.addr, q, RecordType::ANY).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(!m.answers.is_empty(), "{q}");
        let t = m.answers[0].record_type();
        assert!(
            m.answers.iter().all(|r| r.record_type() == t),
            "{q}: one RRset"
        );
    }
    let m = udp(srv.addr, "cog.", RecordType::ANY).await;
    assert_eq!(m.answers[0].record_type(), RecordType::SOA);
    let m = udp(srv.addr, "nope.cog.", RecordType::ANY).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    srv.stop().await;
}

#[tokio::test]
async fn question_case_echoed() {
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    for q in ["WeB-1.CoG.", "_VISUAL._Tcp.cOg.", "NOPE.COG."] {
        let (_, bytes) = query_bytes(q, RecordType::SRV, None, true);
        let (_, bytes_a) = query_bytes(q, RecordType::A, None, true);
        for b in [bytes, bytes_a] {
            let raw = udp_raw(srv.addr, &b).await.unwrap();
            let qlen = b.len() - 12;
            assert_eq!(&raw[12..12 + qlen], &b[12..], "{q}: question bytes echoed");
            let m = Message::from_vec(&raw).unwrap();
            assert_ne!(m.metadata.response_code, ResponseCode::Refused);
            for r in &m.answers {
                assert_eq!(r.name.to_ascii(), q);
            }
        }
    }
    let m = udp(srv.addr, "WEB-1.COG.", RecordType::A).await;
    assert_eq!(m.answers.len(), 1);
    srv.stop().await;
}

#[tokio::test]
async fn srv_order_is_shuffled_by_weight_and_sorted_by_priority() {
    let inst = |id: &str, prio: u16, weight: u16| {
        instance(
            id,
            shared::model::Registration {
                services: vec![svc("w", shared::model::Proto::Tcp, 1000, prio, weight)],
                ..Default::default()
            },
        )
    };
    let snap = snapshot(
        "wt",
        1,
        vec![
            inst("a", 0, 10),
            inst("b", 0, 10),
            inst("c", 0, 80),
            inst("backup", 1, 50),
        ],
    );
    let srv = Server::start(DnsConfig::default(), &[snap]).await;
    let rounds = 1000;
    let mut first_c = 0;
    let mut firsts = std::collections::BTreeSet::new();
    for _ in 0..rounds {
        let m = udp(srv.addr, "_w._tcp.wt.", RecordType::SRV).await;
        let targets: Vec<String> = m
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(s) => s.target.to_ascii(),
                _ => panic!(),
            })
            .collect();
        assert_eq!(targets.len(), 4);
        assert_eq!(targets[3], "backup.wt.", "priority 1 comes last");
        if targets[0] == "c.wt." {
            first_c += 1;
        }
        firsts.insert(targets[0].clone());
    }
    // Weight 80 of 100: first about 80% of the time (binomial sd ~1.3%).
    let f = first_c as f64 / rounds as f64;
    assert!((0.72..0.88).contains(&f), "{f}");
    assert_eq!(firsts.len(), 3, "every weighted record gets to be first");
    srv.stop().await;
}

#[tokio::test]
async fn domain_suffix() {
    let cfg = DnsConfig {
        domain_suffix: Some("Svc.Example.".into()),
        ..Default::default()
    };
    let srv = Server::start(cfg, &[cog()]).await;
    let m = udp(srv.addr, "_visual._tcp.cog.svc.example.", RecordType::SRV).await;
    assert_eq!(m.answers.len(), 2);
    assert!(texts(&m.answers)[0].ends_with("web-1.cog.svc.example."));
    let m = udp(srv.addr, "cog.svc.example.", RecordType::SOA).await;
    assert_eq!(
        texts(&m.answers),
        [
            "cog.svc.example. 42 SOA ns.dns.cog.svc.example. hostmaster.cog.svc.example. 17 3600 900 604800 7"
        ]
    );
    for q in [
        "_visual._tcp.cog.",
        "cog.",
        "svc.example.",
        "cog.other.example.",
    ] {
        let m = udp(srv.addr, q, RecordType::SRV).await;
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{q}");
    }
    let m = udp(srv.addr, "nope.cog.svc.example.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    srv.stop().await;
    assert!(
        dns_server::dns::Catalog::new(DnsConfig {
            domain_suffix: Some("bad suffix".into()),
            ..Default::default()
        })
        .is_err()
    );
}

#[tokio::test]
async fn changes_are_visible_at_once() {
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    let m = udp(srv.addr, "_visual._tcp.cog.", RecordType::SRV).await;
    assert_eq!(m.answers.len(), 2);

    // A new registration: visible to the very next query.
    let mut insts = cog_instances();
    insts.push(instance(
        "web-3",
        shared::model::Registration {
            addresses: vec!["10.0.0.9".parse().unwrap()],
            services: vec![svc("visual", shared::model::Proto::Tcp, 7102, 0, 10)],
            ..Default::default()
        },
    ));
    // (How long a rebuild takes is measured by `benches/dns_serve.rs`, not here.)
    srv.catalog.update(&snapshot("cog", 18, insts));
    let m = udp(srv.addr, "_visual._tcp.cog.", RecordType::SRV).await;
    assert_eq!(m.answers.len(), 3);
    let m = udp(srv.addr, "cog.", RecordType::SOA).await;
    assert!(texts(&m.answers)[0].contains(" 18 "));

    // Deregistration of web-2: gone from SRV, PTR, TXT, enumeration and its own name.
    let insts: Vec<_> = cog_instances()
        .into_iter()
        .filter(|i| i.id.as_str() != "web-2")
        .collect();
    srv.catalog.update(&snapshot("cog", 19, insts));
    let m = udp(srv.addr, "_visual._tcp.cog.", RecordType::SRV).await;
    assert_eq!(
        texts(&m.answers),
        ["_visual._tcp.cog. 42 SRV 0 10 7100 web-1.cog."]
    );
    let m = udp(srv.addr, "_visual._tcp.cog.", RecordType::PTR).await;
    assert_eq!(m.answers.len(), 1);
    let m = udp(srv.addr, "web-2.cog.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let m = udp(srv.addr, "_audio._udp.cog.", RecordType::SRV).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let m = udp(srv.addr, "_services._dns-sd._udp.cog.", RecordType::PTR).await;
    assert_eq!(
        texts(&m.answers),
        ["_services._dns-sd._udp.cog. 42 PTR _visual._tcp.cog."]
    );

    // Namespace deleted: REFUSED.
    srv.catalog
        .remove(&shared::NamespaceName::new("cog").unwrap());
    let m = udp(srv.addr, "web-1.cog.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    srv.stop().await;
}

#[tokio::test]
async fn stale_membrane_leaves_srv_answers() {
    // The registry builds snapshots of passing membranes only; when web-1 turns stale the
    // next snapshot lacks it and its SRV record must disappear while web-2's stays.
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    let passing: Vec<_> = cog_instances()
        .into_iter()
        .filter(|i| i.id.as_str() != "web-1")
        .collect();
    srv.catalog.update(&snapshot("cog", 18, passing));
    let m = udp(srv.addr, "_visual._tcp.cog.", RecordType::SRV).await;
    assert_eq!(
        texts(&m.answers),
        ["_visual._tcp.cog. 42 SRV 0 20 7101 web-2.cog."]
    );
    assert_eq!(texts(&m.additionals), ["web-2.cog. 42 A 10.0.0.2"]);
    let m = udp(srv.addr, "_vision._sub._visual._tcp.cog.", RecordType::PTR).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // And it comes back when passing again.
    srv.catalog.update(&snapshot("cog", 19, cog_instances()));
    let m = udp(srv.addr, "_visual._tcp.cog.", RecordType::SRV).await;
    assert_eq!(m.answers.len(), 2);
    srv.stop().await;
}

#[tokio::test]
async fn stats_count_rcodes_and_transports() {
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    udp(srv.addr, "web-1.cog.", RecordType::A).await;
    udp(srv.addr, "nope.cog.", RecordType::A).await;
    udp(srv.addr, "example.com.", RecordType::A).await;
    tcp(srv.addr, "web-1.cog.", RecordType::A).await;
    let s = srv.catalog.stats();
    assert_eq!(
        (
            s.queries_udp,
            s.queries_tcp,
            s.noerror,
            s.nxdomain,
            s.refused
        ),
        (3, 1, 2, 1, 1)
    );
    srv.stop().await;
}

/// The names a membrane owns are rendered when asked for: they exist exactly for the
/// membrane's own service types, answer NODATA for other types and ANY with their first
/// RRset, follow changes at once, and when the configured NS host is a membrane's host name
/// the configured addresses win while the membrane's other records stay.
#[tokio::test]
async fn membrane_names_are_answered_from_the_live_registration() {
    let cfg = DnsConfig {
        ns_hosts: vec![NsHost {
            name: "web-2.cog.".into(),
            addresses: vec![],
        }],
        ns_addresses: vec!["192.0.2.53".parse().unwrap()],
        ..Default::default()
    };
    let srv = Server::start(cfg, &[cog()]).await;
    // Instance-shaped names of a service type the membrane does not offer, or of no
    // membrane at all: NXDOMAIN.
    for q in [
        "web-1._audio._udp.cog.",
        "web-1._visual._udp.cog.",
        "nobody._visual._tcp.cog.",
        "nobody.cog.",
        "web-1.x.y.cog.",
    ] {
        let m = udp(srv.addr, q, RecordType::SRV).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{q}");
        assert_eq!(soa_minimum(&m), (7, 7), "{q}");
    }
    // Known names, other types: NODATA with the SOA.
    for (q, t) in [
        ("web-1._visual._tcp.cog.", RecordType::A),
        ("perception.cog.", RecordType::AAAA),
        ("web-2._audio._udp.cog.", RecordType::MX),
    ] {
        let m = udp(srv.addr, q, t).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{q}");
        assert!(m.answers.is_empty(), "{q}");
        assert_eq!(soa_minimum(&m), (7, 7), "{q}");
    }
    // ANY (RFC 8482): one RRset, the first of the name.
    let m = udp(srv.addr, "web-1.cog.", RecordType::ANY).await;
    assert_eq!(
        texts(&m.answers),
        ["web-1.cog. 42 A 10.0.0.1"],
        "ANY at a membrane host"
    );
    let m = udp(srv.addr, "web-2._audio._udp.cog.", RecordType::ANY).await;
    assert_eq!(
        texts(&m.answers),
        ["web-2._audio._udp.cog. 42 SRV 0 10 5000 web-2.cog."]
    );
    assert_eq!(texts(&m.additionals), ["web-2.cog. 42 A 10.0.0.2"]);
    // NS host = web-2's host name: the configured address wins, web-2's TXT is still there.
    let m = udp(srv.addr, "web-2.cog.", RecordType::A).await;
    assert_eq!(texts(&m.answers), ["web-2.cog. 42 A 192.0.2.53"]);
    let m = udp(srv.addr, "web-2.cog.", RecordType::TXT).await;
    assert_eq!(m.answers.len(), 1, "{:?}", texts(&m.answers));
    assert!(texts(&m.answers)[0].contains("state=passing"));
    // A change is answered at once (not from an answer rendered before it); a removed
    // membrane's names are gone.
    for _ in 0..3 {
        let m = udp(srv.addr, "web-1.cog.", RecordType::A).await;
        assert_eq!(texts(&m.answers), ["web-1.cog. 42 A 10.0.0.1"]);
        let m = udp(srv.addr, "perception.cog.", RecordType::A).await;
        assert_eq!(texts(&m.answers), ["perception.cog. 42 A 10.0.0.3"]);
    }
    let mut inst = cog_instances();
    inst[0].registration = std::sync::Arc::new(shared::Registration {
        addresses: vec!["10.9.9.9".parse().unwrap()],
        ..(*inst[0].registration).clone()
    });
    inst.retain(|i| i.id.as_str() != "perception");
    srv.catalog.update(&snapshot("cog", 18, inst));
    let m = udp(srv.addr, "web-1.cog.", RecordType::A).await;
    assert_eq!(texts(&m.answers), ["web-1.cog. 42 A 10.9.9.9"]);
    let m = udp(srv.addr, "perception.cog.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let m = tcp(srv.addr, "web-1.cog.", RecordType::A).await;
    assert_eq!(texts(&m.answers), ["web-1.cog. 42 A 10.9.9.9"]);
    srv.stop().await;
}
