//! The same answers through a real stub resolver (hickory-resolver), UDP with TCP fallback.

use std::net::SocketAddr;

use dns_server::dns::DnsConfig;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};

use crate::common::*;

fn resolver(addr: SocketAddr) -> TokioResolver {
    let mut udp = ConnectionConfig::udp();
    udp.port = addr.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = addr.port();
    let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
    let mut b = Resolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    );
    b.options_mut().cache_size = 0;
    b.build().unwrap()
}

#[tokio::test]
async fn resolver_reads_every_row() {
    let srv = Server::start(
        DnsConfig {
            ns_addresses: vec!["192.0.2.53".parse().unwrap()],
            ..Default::default()
        },
        &[cog()],
    )
    .await;
    let r = resolver(srv.addr);
    let rows: &[(&str, RecordType, usize)] = &[
        ("cog.", RecordType::SOA, 1),
        ("cog.", RecordType::NS, 1),
        ("ns.dns.cog.", RecordType::A, 1),
        ("_visual._tcp.cog.", RecordType::SRV, 2),
        ("_visual._tcp.cog.", RecordType::PTR, 2),
        ("_visual._tcp.cog.", RecordType::TXT, 2),
        ("_audio._udp.cog.", RecordType::SRV, 1),
        ("web-1._visual._tcp.cog.", RecordType::SRV, 1),
        ("web-1._visual._tcp.cog.", RecordType::TXT, 1),
        ("_vision._sub._visual._tcp.cog.", RecordType::PTR, 1),
        ("_gpu._sub._visual._tcp.cog.", RecordType::PTR, 1),
        ("_services._dns-sd._udp.cog.", RecordType::PTR, 2),
        ("web-1.cog.", RecordType::A, 1),
        ("web-1.cog.", RecordType::AAAA, 1),
        ("web-1.cog.", RecordType::TXT, 1),
    ];
    for &(q, t, n) in rows {
        let l = r
            .lookup(q, t)
            .await
            .unwrap_or_else(|e| panic!("{q} {t}: {e}"));
        let of_type = l
            .answers()
            .iter()
            .filter(|rec| rec.record_type() == t)
            .count();
        assert_eq!(of_type, n, "{q} {t}");
    }
    let srv_l = r.srv_lookup("_visual._tcp.cog.").await.unwrap();
    let mut ports: Vec<u16> = srv_l
        .answers()
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::SRV(s) => Some(s.port),
            _ => None,
        })
        .collect();
    ports.sort();
    assert_eq!(ports, [7100, 7101]);
    // Negative answers are errors for the resolver.
    assert!(r.lookup("nope.cog.", RecordType::A).await.is_err());
    assert!(r.lookup("web-2.cog.", RecordType::AAAA).await.is_err());
    srv.stop().await;
}

#[tokio::test]
async fn resolver_retries_truncated_answers_over_tcp() {
    let srv = Server::start(DnsConfig::default(), &[many("big", "api", 300)]).await;
    let r = resolver(srv.addr);
    let l = r.srv_lookup("_api._tcp.big.").await.unwrap();
    let n = l
        .answers()
        .iter()
        .filter(|rec| rec.record_type() == RecordType::SRV)
        .count();
    assert_eq!(n, 300);
    let s = srv.catalog.stats();
    assert!(s.truncated >= 1 && s.queries_tcp >= 1, "{s:?}");
    srv.stop().await;
}
