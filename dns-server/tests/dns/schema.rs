//! Every row of the spec's name table, over UDP, with the exact records expected.

use dns_server::dns::{DnsConfig, NsHost};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use crate::common::*;

fn config_with_ns() -> DnsConfig {
    DnsConfig {
        ns_addresses: vec![
            "192.0.2.53".parse().unwrap(),
            "2001:db8::53".parse().unwrap(),
        ],
        ..Default::default()
    }
}

#[tokio::test]
async fn apex_soa_and_ns() {
    let srv = Server::start(config_with_ns(), &[cog()]).await;
    let m = udp(srv.addr, "cog.", RecordType::SOA).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(
        texts(&m.answers),
        ["cog. 42 SOA ns.dns.cog. hostmaster.cog. 17 3600 900 604800 7"]
    );
    let m = udp(srv.addr, "cog.", RecordType::NS).await;
    assert_eq!(texts(&m.answers), ["cog. 42 NS ns.dns.cog."]);
    assert_eq!(
        texts(&m.additionals),
        [
            "ns.dns.cog. 42 A 192.0.2.53",
            "ns.dns.cog. 42 AAAA 2001:db8::53"
        ]
    );
    let m = udp(srv.addr, "ns.dns.cog.", RecordType::A).await;
    assert_eq!(texts(&m.answers), ["ns.dns.cog. 42 A 192.0.2.53"]);
    srv.stop().await;

    // Without addresses the NS host exists but has no data: NODATA.
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    let m = udp(srv.addr, "ns.dns.cog.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities.len(), 1);
    let m = udp(srv.addr, "cog.", RecordType::NS).await;
    assert!(m.additionals.is_empty());
    srv.stop().await;

    // A configured NS host outside the zone.
    let cfg = DnsConfig {
        ns_hosts: vec![NsHost {
            name: "dns1.example.net".into(),
            addresses: vec![],
        }],
        ..Default::default()
    };
    let srv = Server::start(cfg, &[cog()]).await;
    let m = udp(srv.addr, "cog.", RecordType::NS).await;
    assert_eq!(texts(&m.answers), ["cog. 42 NS dns1.example.net."]);
    let m = udp(srv.addr, "cog.", RecordType::SOA).await;
    assert!(texts(&m.answers)[0].contains("SOA dns1.example.net. hostmaster.cog. 17"));
    srv.stop().await;
}

#[tokio::test]
async fn service_type_srv_ptr_txt() {
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    let m = udp(srv.addr, "_visual._tcp.cog.", RecordType::SRV).await;
    assert!(m.metadata.authoritative);
    assert_eq!(
        texts(&m.answers),
        [
            "_visual._tcp.cog. 42 SRV 0 10 7100 web-1.cog.",
            "_visual._tcp.cog. 42 SRV 0 20 7101 web-2.cog.",
        ]
    );
    assert_eq!(
        texts(&m.additionals),
        [
            "web-1.cog. 42 A 10.0.0.1",
            "web-1.cog. 42 AAAA fd00::1",
            "web-2.cog. 42 A 10.0.0.2",
        ]
    );
    let m = udp(srv.addr, "_visual._tcp.cog.", RecordType::PTR).await;
    assert_eq!(
        texts(&m.answers),
        [
            "_visual._tcp.cog. 42 PTR web-1._visual._tcp.cog.",
            "_visual._tcp.cog. 42 PTR web-2._visual._tcp.cog.",
        ]
    );
    let m = udp(srv.addr, "_visual._tcp.cog.", RecordType::TXT).await;
    assert_eq!(
        texts(&m.answers),
        [
            "_visual._tcp.cog. 42 TXT id=web-1|version=1.2",
            "_visual._tcp.cog. 42 TXT id=web-2",
        ]
    );
    // A UDP service type.
    let m = udp(srv.addr, "_audio._udp.cog.", RecordType::SRV).await;
    assert_eq!(
        texts(&m.answers),
        ["_audio._udp.cog. 42 SRV 0 10 5000 web-2.cog."]
    );
    assert_eq!(texts(&m.additionals), ["web-2.cog. 42 A 10.0.0.2"]);
    srv.stop().await;
}

#[tokio::test]
async fn instance_srv_txt() {
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    let m = udp(srv.addr, "web-1._visual._tcp.cog.", RecordType::SRV).await;
    assert_eq!(
        texts(&m.answers),
        ["web-1._visual._tcp.cog. 42 SRV 0 10 7100 web-1.cog."]
    );
    assert_eq!(
        texts(&m.additionals),
        ["web-1.cog. 42 A 10.0.0.1", "web-1.cog. 42 AAAA fd00::1"]
    );
    let m = udp(srv.addr, "web-1._visual._tcp.cog.", RecordType::TXT).await;
    assert_eq!(
        texts(&m.answers),
        ["web-1._visual._tcp.cog. 42 TXT id=web-1|version=1.2"]
    );
    // web-2 does not offer audio over TCP.
    let m = udp(srv.addr, "web-2._audio._tcp.cog.", RecordType::SRV).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    srv.stop().await;
}

#[tokio::test]
async fn subtypes_from_capabilities_and_tags() {
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    for (q, want) in [
        (
            "_vision._sub._visual._tcp.cog.",
            vec!["_vision._sub._visual._tcp.cog. 42 PTR web-1._visual._tcp.cog."],
        ),
        (
            "_gpu._sub._visual._tcp.cog.",
            vec!["_gpu._sub._visual._tcp.cog. 42 PTR web-1._visual._tcp.cog."],
        ),
        (
            "_hearing._sub._visual._tcp.cog.",
            vec!["_hearing._sub._visual._tcp.cog. 42 PTR web-2._visual._tcp.cog."],
        ),
        (
            "_hearing._sub._audio._udp.cog.",
            vec!["_hearing._sub._audio._udp.cog. 42 PTR web-2._audio._udp.cog."],
        ),
    ] {
        let m = udp(srv.addr, q, RecordType::PTR).await;
        assert_eq!(texts(&m.answers), want, "{q}");
    }
    let m = udp(srv.addr, "_vision._sub._audio._udp.cog.", RecordType::PTR).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    srv.stop().await;
}

#[tokio::test]
async fn service_enumeration() {
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    let m = udp(srv.addr, "_services._dns-sd._udp.cog.", RecordType::PTR).await;
    assert_eq!(
        texts(&m.answers),
        [
            "_services._dns-sd._udp.cog. 42 PTR _audio._udp.cog.",
            "_services._dns-sd._udp.cog. 42 PTR _visual._tcp.cog.",
        ]
    );
    srv.stop().await;
}

#[tokio::test]
async fn membrane_host_a_aaaa_txt() {
    let srv = Server::start(DnsConfig::default(), &[cog()]).await;
    let m = udp(srv.addr, "web-1.cog.", RecordType::A).await;
    assert_eq!(texts(&m.answers), ["web-1.cog. 42 A 10.0.0.1"]);
    let m = udp(srv.addr, "web-1.cog.", RecordType::AAAA).await;
    assert_eq!(texts(&m.answers), ["web-1.cog. 42 AAAA fd00::1"]);
    let m = udp(srv.addr, "web-1.cog.", RecordType::TXT).await;
    assert_eq!(
        texts(&m.answers),
        [
            "web-1.cog. 42 TXT parent=perception|mode=shared-volume|endpoint=/var/lib/membrane/shared|capabilities=vision|tags=gpu|state=passing"
        ]
    );
    let m = udp(srv.addr, "perception.cog.", RecordType::TXT).await;
    assert_eq!(texts(&m.answers), ["perception.cog. 42 TXT state=passing"]);
    // web-2 has no IPv6 address: NODATA.
    let m = udp(srv.addr, "web-2.cog.", RecordType::AAAA).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    srv.stop().await;
}
