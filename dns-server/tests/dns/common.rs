//! Fixtures: snapshots, a running server, raw queries.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dns_server::dns::{Catalog, DnsConfig, TcpLimits, bind_udp, serve_with};
use dns_server::snapshot::{Instance, NamespaceSnapshot};
use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{Name, RecordType};
use shared::model::{Endpoint, Proto, Registration, ServiceSpec};
use shared::{MembraneId, NamespaceName, NamespaceSettings, ServiceName, Tag};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

pub fn svc(name: &str, proto: Proto, port: u16, priority: u16, weight: u16) -> ServiceSpec {
    ServiceSpec {
        name: ServiceName::new(name).unwrap(),
        proto,
        port,
        priority,
        weight,
    }
}

pub fn instance(id: &str, reg: Registration) -> Instance {
    Instance {
        id: MembraneId::new(id).unwrap(),
        registration: Arc::new(reg),
    }
}

pub fn snapshot(ns: &str, serial: u32, mut instances: Vec<Instance>) -> NamespaceSnapshot {
    instances.sort_by(|a, b| a.id.cmp(&b.id));
    NamespaceSnapshot {
        name: NamespaceName::new(ns).unwrap(),
        settings: NamespaceSettings {
            record_ttl: 42,
            negative_ttl: 7,
            ..Default::default()
        },
        instances: instances.into_iter().map(Arc::new).collect(),
        serial,
    }
}

/// The reference namespace `cog`: web-1 and web-2 offer `visual` over TCP, web-2 also
/// `audio` over UDP; perception has no service.
pub fn cog_instances() -> Vec<Instance> {
    let mut meta = BTreeMap::new();
    meta.insert("version".to_string(), "1.2".to_string());
    vec![
        instance(
            "web-1",
            Registration {
                parent: Some(MembraneId::new("perception").unwrap()),
                addresses: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
                services: vec![svc("visual", Proto::Tcp, 7100, 0, 10)],
                capabilities: vec![Tag::new("vision").unwrap()],
                tags: vec![Tag::new("gpu").unwrap()],
                metadata: meta.into(),
                endpoint: Some(Endpoint::SharedVolume {
                    path: "/var/lib/membrane/shared".into(),
                }),
                ..Default::default()
            },
        ),
        instance(
            "web-2",
            Registration {
                addresses: vec!["10.0.0.2".parse().unwrap()],
                services: vec![
                    svc("visual", Proto::Tcp, 7101, 0, 20),
                    svc("audio", Proto::Udp, 5000, 0, 10),
                ],
                capabilities: vec![Tag::new("hearing").unwrap()],
                ..Default::default()
            },
        ),
        instance(
            "perception",
            Registration {
                addresses: vec!["10.0.0.3".parse().unwrap()],
                ..Default::default()
            },
        ),
    ]
}

pub fn cog() -> NamespaceSnapshot {
    snapshot("cog", 17, cog_instances())
}

/// `n` instances of service `svc` over TCP, one IPv4 address each.
pub fn many(ns: &str, svc_name: &str, n: usize) -> NamespaceSnapshot {
    let instances = (0..n)
        .map(|i| {
            instance(
                &format!("i{i:04}"),
                Registration {
                    addresses: vec![IpAddr::from([10, 1, (i / 250) as u8, (i % 250) as u8 + 1])],
                    services: vec![svc(svc_name, Proto::Tcp, 8000, 0, 10)],
                    ..Default::default()
                },
            )
        })
        .collect();
    snapshot(ns, 1, instances)
}

pub struct Server {
    pub addr: SocketAddr,
    pub catalog: Arc<Catalog>,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    pub async fn start(config: DnsConfig, snaps: &[NamespaceSnapshot]) -> Server {
        Self::start_with(config, snaps, TcpLimits::default()).await
    }

    /// [`Server::start`] with explicit TCP limits.
    pub async fn start_with(
        config: DnsConfig,
        snaps: &[NamespaceSnapshot],
        limits: TcpLimits,
    ) -> Server {
        let catalog = Arc::new(Catalog::new(config).unwrap());
        for s in snaps {
            catalog.update(s);
        }
        // The UDP group picks a free port; TCP binds the same one (retry if it is taken).
        let (udp, tcp) = loop {
            let udp = bind_udp("127.0.0.1:0".parse().unwrap(), 2).unwrap();
            let port = udp[0].local_addr().unwrap().port();
            assert!(udp.iter().all(|s| s.local_addr().unwrap().port() == port));
            if let Ok(t) = TcpListener::bind(("127.0.0.1", port)).await {
                break (udp, t);
            }
        };
        let addr = udp[0].local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(serve_with(
            udp,
            vec![tcp],
            catalog.clone(),
            shutdown.clone(),
            limits,
        ));
        Server {
            addr,
            catalog,
            shutdown,
            handle,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.handle)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
            .unwrap();
    }
}

pub fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

/// A query message in wire form.
pub fn query_bytes(qname: &str, t: RecordType, edns: Option<u16>, rd: bool) -> (u16, Vec<u8>) {
    let mut m = Message::query();
    m.add_query(Query::query(name(qname), t));
    m.metadata.recursion_desired = rd;
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    (m.metadata.id, m.to_vec().unwrap())
}

/// Sends raw bytes over UDP; None when no answer within 500 ms.
pub async fn udp_raw(addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(bytes, addr).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    match tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// One UDP query, parsed answer (panics if none).
pub async fn udp(addr: SocketAddr, qname: &str, t: RecordType) -> Message {
    udp_opts(addr, qname, t, Some(1232), true).await
}

pub async fn udp_opts(
    addr: SocketAddr,
    qname: &str,
    t: RecordType,
    edns: Option<u16>,
    rd: bool,
) -> Message {
    let (id, q) = query_bytes(qname, t, edns, rd);
    let raw = udp_raw(addr, &q).await.expect("an answer");
    let m = Message::from_vec(&raw).unwrap();
    assert_eq!(m.metadata.id, id);
    m
}

/// Sends every message on one TCP connection at once (pipelined); returns the answers.
pub async fn tcp_raw(addr: SocketAddr, msgs: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut all = Vec::new();
    for m in msgs {
        all.extend_from_slice(&(m.len() as u16).to_be_bytes());
        all.extend_from_slice(m);
    }
    s.write_all(&all).await.unwrap();
    let mut out = Vec::new();
    for _ in msgs {
        let mut len = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut len))
            .await
            .unwrap()
            .unwrap();
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut buf).await.unwrap();
        out.push(buf);
    }
    out
}

pub async fn tcp(addr: SocketAddr, qname: &str, t: RecordType) -> Message {
    let (id, q) = query_bytes(qname, t, None, true);
    let raw = tcp_raw(addr, &[q]).await.remove(0);
    let m = Message::from_vec(&raw).unwrap();
    assert_eq!(m.metadata.id, id);
    m
}

/// Text of the records of a section, sorted: `name TTL TYPE rdata`.
pub fn texts(records: &[hickory_proto::rr::Record]) -> Vec<String> {
    let mut v: Vec<String> = records
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {}",
                r.name.to_ascii().to_lowercase(),
                r.ttl,
                r.record_type(),
                rdata_text(&r.data)
            )
        })
        .collect();
    v.sort();
    v
}

/// RData as text; TXT strings joined with `|` so their boundaries show.
pub fn rdata_text(d: &hickory_proto::rr::RData) -> String {
    match d {
        hickory_proto::rr::RData::TXT(t) => t
            .txt_data
            .iter()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect::<Vec<_>>()
            .join("|"),
        other => other.to_string(),
    }
}
