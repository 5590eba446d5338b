//! In-process DNS benchmark server: builds `namespaces` x `services` x `instances` passing
//! membranes as snapshots, serves them with `dns::serve` on a loopback port and prints that
//! port, so dnsperf (and NSD fed the exported zone) can be run against it; see `dns.sh`.
//!
//! ```text
//! cargo bench -p dns-server --bench dns_serve -- [--namespaces 1] [--services 100]
//!     [--instances 10] [--listen 127.0.0.1:0] [--sockets 2] [--threads 2]
//!     [--zone-dir DIR] [--queries FILE] [--rss-only]
//! ```
//! Prints `port PORT`, `rss_kib ...` lines, then serves until killed (or exits after the
//! RSS report with `--rss-only`).
#![allow(missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;

use dns_server::dns::{Catalog, DnsConfig, bind_udp, export_zone, serve};
use dns_server::snapshot::{Instance, NamespaceSnapshot};
use shared::model::{Proto, Registration, ServiceSpec};
use shared::{MembraneId, NamespaceName, NamespaceSettings, ServiceName};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

struct Args {
    namespaces: usize,
    services: usize,
    instances: usize,
    listen: SocketAddr,
    sockets: usize,
    threads: usize,
    zone_dir: Option<String>,
    queries: Option<String>,
    rss_only: bool,
    /// `--bench` (cargo bench, dns.sh): serve; without it (cargo test) build and exit.
    serve: bool,
}

fn args() -> Args {
    let mut a = Args {
        namespaces: 1,
        services: 100,
        instances: 10,
        listen: "127.0.0.1:0".parse().unwrap(),
        sockets: 2,
        threads: 2,
        zone_dir: None,
        queries: None,
        rss_only: false,
        serve: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--namespaces" => a.namespaces = v().parse().unwrap(),
            "--services" => a.services = v().parse().unwrap(),
            "--instances" => a.instances = v().parse().unwrap(),
            "--listen" => a.listen = v().parse().unwrap(),
            "--sockets" => a.sockets = v().parse().unwrap(),
            "--threads" => a.threads = v().parse().unwrap(),
            "--zone-dir" => a.zone_dir = Some(v()),
            "--queries" => a.queries = Some(v()),
            "--rss-only" => a.rss_only = true,
            "--bench" => a.serve = true, // passed by `cargo bench`
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// Namespace `ns`: `services` services `svcN` (TCP, port 7000+N), `instances` membranes
/// `svcN-iM` each, with one IPv4 address and one metadata entry.
fn snapshot(ns: &str, services: usize, instances: usize, ns_index: usize) -> NamespaceSnapshot {
    let mut list = Vec::with_capacity(services * instances);
    for s in 1..=services {
        for i in 1..=instances {
            let n = (s - 1) * instances + (i - 1);
            let mut metadata = std::collections::BTreeMap::new();
            metadata.insert("version".to_string(), "1.0".to_string());
            let reg = Registration {
                addresses: vec![std::net::IpAddr::from([
                    10,
                    (ns_index % 250) as u8,
                    (n / 250) as u8,
                    (n % 250) as u8 + 1,
                ])],
                services: vec![ServiceSpec {
                    name: ServiceName::new(&format!("svc{s}")).unwrap(),
                    proto: Proto::Tcp,
                    port: 7000 + s as u16,
                    priority: 0,
                    weight: 10,
                }],
                metadata: metadata.into(),
                ..Default::default()
            };
            list.push(Instance {
                id: MembraneId::new(&format!("svc{s}-i{i}")).unwrap(),
                registration: Arc::new(reg),
            });
        }
    }
    list.sort_by(|a, b| a.id.cmp(&b.id));
    NamespaceSnapshot {
        name: NamespaceName::new(ns).unwrap(),
        settings: NamespaceSettings::default(),
        instances: list.into_iter().map(Arc::new).collect(),
        serial: 1,
    }
}

fn main() {
    let a = args();
    let rss0 = rss_kib();
    let names: Vec<String> = if a.namespaces == 1 {
        vec!["bench".into()]
    } else {
        (0..a.namespaces).map(|i| format!("bench{i}")).collect()
    };
    let snaps: Vec<NamespaceSnapshot> = names
        .iter()
        .enumerate()
        .map(|(i, n)| snapshot(n, a.services, a.instances, i))
        .collect();
    let rss_snaps = rss_kib();
    // The NS host's address: where this server listens (the exported zone needs it).
    let config = DnsConfig {
        ns_addresses: vec![a.listen.ip()],
        ..Default::default()
    };
    let catalog = Arc::new(Catalog::new(config.clone()).unwrap());
    let t = std::time::Instant::now();
    for s in &snaps {
        catalog.update(s);
    }
    let build = t.elapsed();
    let rss_catalog = rss_kib();
    // What one registry change costs: one membrane of the first namespace changes its
    // registration (a new port), alternately, then the full rebuild when settings change.
    let mut changed = snaps[0].clone();
    let mut reg = (*changed.instances[0].registration).clone();
    reg.services[0].port += 1;
    changed.instances[0] = Arc::new(Instance {
        id: changed.instances[0].id.clone(),
        registration: Arc::new(reg),
    });
    changed.serial += 1;
    let reps = 200;
    let t = std::time::Instant::now();
    for r in 0..reps {
        catalog.update(if r % 2 == 0 { &changed } else { &snaps[0] });
    }
    let one_change = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
    let mut resettled = snaps[0].clone();
    let reps_full = 10;
    let t = std::time::Instant::now();
    for r in 0..reps_full {
        resettled.settings.record_ttl = 5 + (r % 2) as u32;
        catalog.update(&resettled);
    }
    let full = t.elapsed().as_secs_f64() * 1e6 / reps_full as f64;
    catalog.update(&snaps[0]);
    let membranes = a.namespaces * a.services * a.instances;
    println!(
        "membranes {membranes} ({} namespaces x {} services x {} instances); catalog built in {:?} ({:.1} us per namespace update)",
        a.namespaces,
        a.services,
        a.instances,
        build,
        build.as_secs_f64() * 1e6 / a.namespaces as f64
    );
    println!(
        "rss_kib start {rss0} with_snapshots {rss_snaps} with_catalog {rss_catalog} (catalog alone ~{} KiB, {:.0} B per membrane)",
        rss_catalog.saturating_sub(rss_snaps),
        (rss_catalog.saturating_sub(rss_snaps) * 1024) as f64 / membranes as f64
    );
    println!(
        "update after one membrane of a {}-membrane namespace changed: {one_change:.1} us (mean of {reps}); full rebuild of that namespace: {full:.0} us",
        a.services * a.instances
    );
    if let Some(dir) = &a.zone_dir {
        for s in &snaps {
            let p = format!("{dir}/{}.zone", s.name);
            std::fs::write(&p, export_zone(s, &config)).unwrap();
        }
    }
    if let Some(q) = &a.queries {
        let mut text = String::new();
        for n in &names {
            for s in 1..=a.services {
                text.push_str(&format!("_svc{s}._tcp.{n}. SRV\n"));
            }
        }
        std::fs::write(q, text).unwrap();
    }
    if !a.serve && !a.rss_only {
        println!("smoke run (no --bench): catalog built; not serving");
        return;
    }
    if a.rss_only {
        drop(snaps);
        println!("rss_kib catalog_without_snapshots {}", rss_kib());
        return;
    }
    drop(snaps);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.threads)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let udp = bind_udp(a.listen, a.sockets).unwrap();
        let addr = udp[0].local_addr().unwrap();
        let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
        println!("port {}", addr.port());
        println!("pid {}", std::process::id());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let s2 = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            s2.cancel();
        });
        serve(udp, vec![tcp], catalog.clone(), shutdown)
            .await
            .unwrap();
        eprintln!("stats {:?}", catalog.stats());
    });
}
