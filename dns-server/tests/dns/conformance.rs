//! Protocol conformance on raw wire bytes: EDNS (RFC 6891, 3225), NSID (RFC 5001),
//! Extended DNS Errors (RFC 8914), cookies (RFC 7873), several NS hosts, the DNS-SD
//! additional records (RFC 6763 12.1), and RRsets larger than a message.

use dns_server::dns::{DnsConfig, NsHost};
use hickory_proto::op::Message;
use hickory_proto::rr::{RData, RecordType};
use shared::model::{Proto, Registration};

use crate::common::*;

/// Wire form of a textual absolute name.
fn wire_name(name: &str) -> Vec<u8> {
    let mut v = Vec::new();
    for l in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        v.push(l.len() as u8);
        v.extend_from_slice(l.as_bytes());
    }
    v.push(0);
    v
}

/// An OPT record (owner root) with payload 1232, DO as given, and raw option bytes.
fn opt_rr(dnssec_ok: bool, options: &[u8]) -> Vec<u8> {
    let mut v = vec![
        0,
        0,
        41,
        0x04,
        0xD0,
        0,
        0,
        if dnssec_ok { 0x80 } else { 0 },
        0,
    ];
    v.extend_from_slice(&(options.len() as u16).to_be_bytes());
    v.extend_from_slice(options);
    v
}

fn option(code: u16, data: &[u8]) -> Vec<u8> {
    let mut v = code.to_be_bytes().to_vec();
    v.extend_from_slice(&(data.len() as u16).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// A message: header with `opcode`, the questions, then `additional` records (raw).
fn message(opcode: u8, questions: &[(&str, u16)], additional: &[Vec<u8>]) -> Vec<u8> {
    let mut v = vec![0xAB, 0xCD, opcode << 3, 0];
    v.extend_from_slice(&(questions.len() as u16).to_be_bytes());
    v.extend_from_slice(&[0, 0, 0, 0]);
    v.extend_from_slice(&(additional.len() as u16).to_be_bytes());
    for (n, t) in questions {
        v.extend_from_slice(&wire_name(n));
        v.extend_from_slice(&t.to_be_bytes());
        v.extend_from_slice(&[0, 1]);
    }
    for a in additional {
        v.extend_from_slice(a);
    }
    v
}

fn skip_name(b: &[u8], mut i: usize) -> usize {
    loop {
        let l = b[i];
        if l == 0 {
            return i + 1;
        }
        if l & 0xC0 == 0xC0 {
            return i + 2;
        }
        i += 1 + l as usize;
    }
}

/// The reply's OPT record, read from raw bytes: (TTL field, options).
struct ReplyOpt {
    ttl: u32,
    options: Vec<(u16, Vec<u8>)>,
}

impl ReplyOpt {
    fn dnssec_ok(&self) -> bool {
        self.ttl & 0x8000 != 0
    }
    fn get(&self, code: u16) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, d)| d.as_slice())
    }
}

fn rcode(raw: &[u8]) -> u8 {
    raw[3] & 0xF
}

fn reply_opt(raw: &[u8]) -> Option<ReplyOpt> {
    let be = |i: usize| u16::from_be_bytes([raw[i], raw[i + 1]]);
    let (qd, an, ns, ar) = (be(4), be(6), be(8), be(10));
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(raw, i) + 4;
    }
    let mut found = None;
    for k in 0..(an + ns + ar) {
        let j = skip_name(raw, i);
        let len = be(j + 8) as usize;
        if k >= an + ns && be(j) == 41 {
            assert!(found.is_none(), "one OPT only");
            let ttl = u32::from_be_bytes([raw[j + 4], raw[j + 5], raw[j + 6], raw[j + 7]]);
            let data = &raw[j + 10..j + 10 + len];
            let mut options = Vec::new();
            let mut o = 0;
            while o < data.len() {
                let c = u16::from_be_bytes([data[o], data[o + 1]]);
                let l = u16::from_be_bytes([data[o + 2], data[o + 3]]) as usize;
                options.push((c, data[o + 4..o + 4 + l].to_vec()));
                o += 4 + l;
            }
            found = Some(ReplyOpt { ttl, options });
        }
        i = j + 10 + len;
    }
    assert_eq!(i, raw.len(), "nothing after the records");
    found
}

const NSID: u16 = 3;
const COOKIE: u16 = 10;
const EDE: u16 = 15;

#[tokio::test]
async fn dnssec_ok_is_copied_into_the_reply_opt() {
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    for (do_bit, qname) in [
        (true, "web-1.cog."),
        (false, "web-1.cog."),
        (true, "nope.cog."),
    ] {
        let q = message(0, &[(qname, 1)], &[opt_rr(do_bit, &[])]);
        let raw = udp_raw(srv.addr, &q).await.unwrap();
        let opt = reply_opt(&raw).expect("an OPT");
        assert_eq!(opt.dnssec_ok(), do_bit, "{qname}");
        assert_eq!(opt.ttl & 0x7FFF, 0, "other flags clear, version 0");
    }
    srv.stop().await;
}

#[tokio::test]
async fn failed_parses_carry_an_opt_when_the_query_had_one() {
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    let tsig = {
        // key. TSIG ANY 0, RDATA that is no TSIG: FORMERR (RFC 8945 5.2).
        let mut v = wire_name("key.");
        v.extend_from_slice(&[0, 250, 0, 255, 0, 0, 0, 0, 0, 4, 1, 2, 3, 4]);
        v
    };
    let cases: Vec<(&str, Vec<u8>, u8, Option<u16>)> = vec![
        (
            "NOTIFY",
            message(4, &[("cog.", 6)], &[opt_rr(true, &[])]),
            4,
            Some(21),
        ),
        (
            "UPDATE",
            message(5, &[("cog.", 6)], &[opt_rr(false, &[])]),
            4,
            Some(21),
        ),
        (
            "two questions",
            message(0, &[("cog.", 6), ("cog.", 2)], &[opt_rr(true, &[])]),
            1,
            None,
        ),
        (
            "no question",
            message(0, &[], &[opt_rr(false, &[])]),
            1,
            None,
        ),
        (
            "TSIG",
            message(0, &[("cog.", 6)], &[opt_rr(true, &[]), tsig.clone()]),
            1,
            None,
        ),
    ];
    for (what, q, want_rcode, want_ede) in cases {
        let raw = udp_raw(srv.addr, &q).await.unwrap();
        assert_eq!(&raw[..2], &[0xAB, 0xCD], "{what}");
        assert_eq!(rcode(&raw), want_rcode, "{what}");
        let opt = reply_opt(&raw).unwrap_or_else(|| panic!("{what}: no OPT in the reply"));
        let wants_do = matches!(what, "NOTIFY" | "two questions" | "TSIG");
        assert_eq!(opt.dnssec_ok(), wants_do, "{what}");
        assert_eq!(
            opt.get(EDE).map(|d| u16::from_be_bytes([d[0], d[1]])),
            want_ede,
            "{what}"
        );
        // Without an OPT in the query, none in the reply.
        let plain = match what {
            "NOTIFY" => message(4, &[("cog.", 6)], &[]),
            "two questions" => message(0, &[("cog.", 6), ("cog.", 2)], &[]),
            _ => continue,
        };
        let raw = udp_raw(srv.addr, &plain).await.unwrap();
        assert!(reply_opt(&raw).is_none(), "{what}");
    }
    srv.stop().await;
}

#[tokio::test]
async fn an_option_running_past_the_opt_data_is_formerr() {
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    // An NSID option claiming 9 bytes with 2 present.
    let mut bad = option(NSID, b"");
    bad.extend_from_slice(&[0, 12, 0, 9, 1, 2]);
    for bytes in [bad, vec![0, 3, 0]] {
        let q = message(0, &[("web-1.cog.", 1)], &[opt_rr(false, &bytes)]);
        for raw in [
            udp_raw(srv.addr, &q).await.unwrap(),
            tcp_raw(srv.addr, std::slice::from_ref(&q)).await.remove(0),
        ] {
            assert_eq!(rcode(&raw), 1, "FORMERR");
            assert_eq!(u16::from_be_bytes([raw[6], raw[7]]), 0, "no answer");
            assert!(reply_opt(&raw).is_some());
        }
    }
    // The same query with well-formed options is answered.
    let q = message(
        0,
        &[("web-1.cog.", 1)],
        &[opt_rr(false, &option(12, &[0; 4]))],
    );
    let raw = udp_raw(srv.addr, &q).await.unwrap();
    assert_eq!(rcode(&raw), 0);
    assert_eq!(u16::from_be_bytes([raw[6], raw[7]]), 1);
    srv.stop().await;
}

#[tokio::test]
async fn nsid_when_configured_and_asked() {
    let cfg = DnsConfig {
        nsid: Some("dns-a.example".into()),
        ..Default::default()
    };
    let srv = Server::start(cfg, &[cog()]).await;
    let asked = message(0, &[("cog.", 6)], &[opt_rr(false, &option(NSID, b""))]);
    let raw = udp_raw(srv.addr, &asked).await.unwrap();
    assert_eq!(
        reply_opt(&raw).unwrap().get(NSID),
        Some(&b"dns-a.example"[..])
    );
    // Also on an error answer.
    let refused = message(0, &[("other.", 6)], &[opt_rr(false, &option(NSID, b""))]);
    let raw = udp_raw(srv.addr, &refused).await.unwrap();
    assert_eq!(rcode(&raw), 5);
    assert_eq!(
        reply_opt(&raw).unwrap().get(NSID),
        Some(&b"dns-a.example"[..])
    );
    // Not asked: not sent.
    let raw = udp_raw(srv.addr, &message(0, &[("cog.", 6)], &[opt_rr(false, &[])]))
        .await
        .unwrap();
    assert!(reply_opt(&raw).unwrap().get(NSID).is_none());
    srv.stop().await;
    // Not configured (the default): not sent.
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    let raw = udp_raw(srv.addr, &asked).await.unwrap();
    assert!(reply_opt(&raw).unwrap().get(NSID).is_none());
    srv.stop().await;
}

#[tokio::test]
async fn extended_errors_on_refused_and_notimp() {
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    let ede = |raw: &[u8]| {
        reply_opt(raw)
            .unwrap()
            .get(EDE)
            .map(|d| u16::from_be_bytes([d[0], d[1]]))
    };
    // Out of our zones: REFUSED, Not Authoritative (20).
    let raw = udp_raw(
        srv.addr,
        &message(0, &[("example.com.", 1)], &[opt_rr(false, &[])]),
    )
    .await
    .unwrap();
    assert_eq!((rcode(&raw), ede(&raw)), (5, Some(20)));
    // Zone transfer: NOTIMP, Not Supported (21).
    let raw = udp_raw(
        srv.addr,
        &message(0, &[("cog.", 252)], &[opt_rr(false, &[])]),
    )
    .await
    .unwrap();
    assert_eq!((rcode(&raw), ede(&raw)), (4, Some(21)));
    // A positive answer carries none.
    let raw = udp_raw(srv.addr, &message(0, &[("cog.", 6)], &[opt_rr(false, &[])]))
        .await
        .unwrap();
    assert_eq!((rcode(&raw), ede(&raw)), (0, None));
    srv.stop().await;
}

#[tokio::test]
async fn client_cookies_get_a_server_cookie() {
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    let client = [9u8; 8];
    let q = message(
        0,
        &[("cog.", 6)],
        &[opt_rr(false, &option(COOKIE, &client))],
    );
    let raw = udp_raw(srv.addr, &q).await.unwrap();
    let c = reply_opt(&raw).unwrap().get(COOKIE).unwrap().to_vec();
    assert_eq!(c.len(), 24, "client cookie + RFC 9018 server cookie");
    assert_eq!(&c[..8], &client);
    assert_eq!(c[8], 1, "RFC 9018 version");
    // The pair sent back is answered normally, with a cookie for the same client cookie.
    let q = message(0, &[("cog.", 6)], &[opt_rr(false, &option(COOKIE, &c))]);
    let raw = tcp_raw(srv.addr, &[q]).await.remove(0);
    assert_eq!(rcode(&raw), 0);
    let c2 = reply_opt(&raw).unwrap().get(COOKIE).unwrap().to_vec();
    assert_eq!(&c2[..8], &client);
    // A malformed COOKIE (9 bytes) is FORMERR (RFC 7873 5.2.2).
    let q = message(
        0,
        &[("cog.", 6)],
        &[opt_rr(false, &option(COOKIE, &[1; 9]))],
    );
    let raw = udp_raw(srv.addr, &q).await.unwrap();
    assert_eq!(rcode(&raw), 1);
    srv.stop().await;
}

#[tokio::test]
async fn several_ns_hosts_with_their_addresses() {
    let cfg = DnsConfig {
        ns_hosts: vec![
            NsHost {
                name: "ns1.cog.".into(),
                addresses: vec!["192.0.2.1".parse().unwrap()],
            },
            NsHost {
                name: "ns2.cog".into(),
                addresses: vec!["2001:db8::2".parse().unwrap()],
            },
            NsHost {
                name: "ns1.cog.".into(),
                addresses: vec!["192.0.2.11".parse().unwrap()],
            },
            NsHost {
                name: "ns3.example.net.".into(),
                addresses: vec![],
            },
            NsHost {
                name: "ns4.cog.".into(),
                addresses: vec![],
            },
        ],
        ns_addresses: vec!["192.0.2.99".parse().unwrap()],
        ..Default::default()
    };
    let srv = Server::start(cfg, &[cog()]).await;
    let m = udp(srv.addr, "cog.", RecordType::NS).await;
    assert_eq!(
        texts(&m.answers),
        [
            "cog. 42 NS ns1.cog.",
            "cog. 42 NS ns2.cog.",
            "cog. 42 NS ns3.example.net.",
            "cog. 42 NS ns4.cog."
        ]
    );
    // In-zone hosts' addresses in additional (their own, else --ns-address); the
    // out-of-zone host's are not ours to give.
    assert_eq!(
        texts(&m.additionals),
        [
            "ns1.cog. 42 A 192.0.2.1",
            "ns1.cog. 42 A 192.0.2.11",
            "ns2.cog. 42 AAAA 2001:db8::2",
            "ns4.cog. 42 A 192.0.2.99"
        ]
    );
    let m = udp(srv.addr, "cog.", RecordType::SOA).await;
    assert!(texts(&m.answers)[0].starts_with("cog. 42 SOA ns1.cog. "));
    let m = udp(srv.addr, "ns2.cog.", RecordType::AAAA).await;
    assert_eq!(texts(&m.answers), ["ns2.cog. 42 AAAA 2001:db8::2"]);
    srv.stop().await;
}

#[tokio::test]
async fn dns_sd_ptr_answers_carry_srv_txt_and_addresses() {
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    let m = udp(srv.addr, "_visual._tcp.cog.", RecordType::PTR).await;
    assert_eq!(m.answers.len(), 2);
    assert_eq!(
        texts(&m.additionals),
        [
            "web-1._visual._tcp.cog. 42 SRV 0 10 7100 web-1.cog.",
            "web-1._visual._tcp.cog. 42 TXT id=web-1|version=1.2",
            "web-1.cog. 42 A 10.0.0.1",
            "web-1.cog. 42 AAAA fd00::1",
            "web-2._visual._tcp.cog. 42 SRV 0 20 7101 web-2.cog.",
            "web-2._visual._tcp.cog. 42 TXT id=web-2",
            "web-2.cog. 42 A 10.0.0.2",
        ]
    );
    // A subtype browse too.
    let m = udp(srv.addr, "_hearing._sub._audio._udp.cog.", RecordType::PTR).await;
    assert_eq!(
        texts(&m.additionals),
        [
            "web-2._audio._udp.cog. 42 SRV 0 10 5000 web-2.cog.",
            "web-2._audio._udp.cog. 42 TXT id=web-2",
            "web-2.cog. 42 A 10.0.0.2",
        ]
    );
    srv.stop().await;

    // 40 instances: over UDP the additional section takes what fits, whole RRsets only;
    // over TCP it takes everything.
    let srv = Server::start(DnsConfig::default(), &[many("big", "api", 40)]).await;
    let (_, q) = query_bytes("_api._tcp.big.", RecordType::PTR, Some(1232), true);
    let raw = udp_raw(srv.addr, &q).await.unwrap();
    assert!(raw.len() <= 1232);
    let m = Message::from_vec(&raw).unwrap();
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 40);
    let count = |m: &Message, t: RecordType| {
        m.additionals
            .iter()
            .filter(|r| r.record_type() == t)
            .count()
    };
    let srvs = count(&m, RecordType::SRV);
    assert!((1..40).contains(&srvs), "{srvs}");
    assert!(count(&m, RecordType::TXT) >= srvs - 1);
    let m = tcp(srv.addr, "_api._tcp.big.", RecordType::PTR).await;
    for t in [RecordType::SRV, RecordType::TXT, RecordType::A] {
        assert_eq!(count(&m, t), 40, "{t}");
    }
    srv.stop().await;
}

/// 3,000 instances of one service, half of weight 100 and half of weight 1: the SRV set
/// is far over 64 KB. Over TCP a weighted random subset that fits is answered; over UDP
/// TC as before.
#[tokio::test]
async fn rrsets_over_64k_get_a_weighted_subset_over_tcp() {
    let instances = (0..3000)
        .map(|i| {
            instance(
                &format!("i{i:04}"),
                Registration {
                    addresses: vec![std::net::IpAddr::from([
                        10,
                        2,
                        (i / 250) as u8,
                        (i % 250) as u8,
                    ])],
                    services: vec![svc(
                        "api",
                        Proto::Tcp,
                        8000,
                        0,
                        if i % 2 == 0 { 100 } else { 1 },
                    )],
                    ..Default::default()
                },
            )
        })
        .collect();
    let srv = Server::start(DnsConfig::default(), &[snapshot("huge", 1, instances)]).await;
    let (_, q) = query_bytes("_api._tcp.huge.", RecordType::SRV, None, true);
    let answers = tcp_raw(srv.addr, &[q.clone(), q]).await;
    let mut picks = Vec::new();
    for raw in &answers {
        assert!(raw.len() <= 65_535);
        let m = Message::from_vec(raw).unwrap();
        assert!(!m.metadata.truncation);
        let targets: Vec<(String, u16)> = m
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(s) => (s.target.to_ascii(), s.weight),
                other => panic!("{other:?}"),
            })
            .collect();
        let n = targets.len();
        assert!((1000..3000).contains(&n), "{n}");
        // About 30 bytes a record: the subset fills the message.
        assert!(raw.len() > 65_535 - 100, "{}", raw.len());
        let mut distinct = targets.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), n);
        // Weighted: the heavy half is (nearly) all in; uniform picking would take ~73%.
        let heavy = targets.iter().filter(|(_, w)| *w == 100).count();
        assert!(heavy >= 1450, "{heavy} of 1500 heavy in {n}");
        picks.push(distinct);
    }
    assert_ne!(picks[0], picks[1], "a random subset each time");
    // The PTR set (20 bytes a record) still fits whole, with what fits of the instances'
    // records in additional.
    let (_, q) = query_bytes("_api._tcp.huge.", RecordType::PTR, None, true);
    let raw = tcp_raw(srv.addr, &[q]).await.remove(0);
    let m = Message::from_vec(&raw).unwrap();
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 3000);
    assert!((1..3000).contains(&m.additionals.len()));
    // UDP: TC.
    let m = udp(srv.addr, "_api._tcp.huge.", RecordType::SRV).await;
    assert!(m.metadata.truncation && m.answers.is_empty());
    srv.stop().await;
}

/// A TXT RRset over 64 KB (400 instances padding their metadata): over TCP a random
/// subset that fits, each record whole and once.
#[tokio::test]
async fn txt_sets_over_64k_get_a_subset_over_tcp() {
    let instances = (0..400)
        .map(|i| {
            let meta = std::collections::BTreeMap::from([("pad".to_string(), "x".repeat(200))]);
            instance(
                &format!("t{i:03}"),
                Registration {
                    addresses: vec![std::net::IpAddr::from([
                        10,
                        3,
                        (i / 250) as u8,
                        (i % 250) as u8,
                    ])],
                    services: vec![svc("api", Proto::Tcp, 8000, 0, 10)],
                    metadata: meta.into(),
                    ..Default::default()
                },
            )
        })
        .collect();
    let srv = Server::start(DnsConfig::default(), &[snapshot("fat", 1, instances)]).await;
    let (_, q) = query_bytes("_api._tcp.fat.", RecordType::TXT, None, true);
    let raw = tcp_raw(srv.addr, &[q]).await.remove(0);
    assert!(raw.len() <= 65_535);
    let m = Message::from_vec(&raw).unwrap();
    assert!(!m.metadata.truncation);
    let mut ids: Vec<String> = m.answers.iter().map(|r| rdata_text(&r.data)).collect();
    let n = ids.len();
    assert!((200..400).contains(&n), "{n}");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n);
    assert!(ids.iter().all(|t| t.ends_with(&"x".repeat(200))));
    srv.stop().await;
}
