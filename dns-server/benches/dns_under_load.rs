//! DNS latency under HTTP load: the release `dns-server` with N registered membranes; UDP
//! query latency (p50/p99) measured idle, then while many keep-alive connections saturate
//! the HTTP API with heartbeats and membrane lists, side by side in one run, with the
//! loaded/idle ratio. Run once with DNS on its own threads (the default) and once with the
//! hidden `--dns-shared-runtime` switch (DNS on the HTTP runtime, as before), to show what
//! the own-threads design buys.
//!
//! Run: `cargo bench -p dns-server --bench dns_under_load`
//! Knobs (env): BENCH_MEMBRANES (10000), BENCH_NAMESPACES (100), BENCH_HTTP_CLIENTS (64),
//! BENCH_DNS_CLIENTS (4 UDP clients, one query at a time each), BENCH_SECONDS (10 per
//! phase), BENCH_MODES ("own,shared"), BENCH_SERVER_BIN (another `dns-server` binary).
//! Without `--bench` (`cargo test --benches`) it runs a small, short smoke version.
//!
//! The DNS clients run on a thread of their own (a current-thread runtime), apart from the
//! HTTP load generator's runtime, so the load generator does not delay the DNS probes in
//! this process; both still share the machine's cores with the server.
#![allow(missing_docs)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    Phase, Req, body, env, http_phase, membrane_path, pct, report, split, start_server_dns,
};

/// One UDP query for `name` of type `qtype` (id 0; set per send).
fn query(name: &str, qtype: u16) -> Vec<u8> {
    let mut m = vec![0, 0, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for l in name.trim_end_matches('.').split('.') {
        m.push(l.len() as u8);
        m.extend_from_slice(l.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    m
}

/// The DNS questions: every membrane's A record (first, in order), then the SRV of every
/// service type that exists (`common::body`: membrane `i` offers `svc-{i % 10}`).
fn questions(membranes: usize, namespaces: usize) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    let mut types = std::collections::BTreeSet::new();
    for i in 0..membranes {
        v.push(query(&format!("m-{i}.ns-{}.", i % namespaces), 1));
        types.insert((i % namespaces, i % 10));
    }
    for (ns, s) in types {
        v.push(query(&format!("_svc-{s}._tcp.ns-{ns}."), 33));
    }
    v
}

/// `clients` UDP clients, one query in flight each, for `duration`: latencies (us, sorted)
/// and the count of queries lost (no answer within a second) or answered with an error.
fn dns_phase(
    dns: SocketAddr,
    clients: usize,
    duration: Duration,
    qs: Arc<Vec<Vec<u8>>>,
) -> (Phase, usize) {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let t = Instant::now();
            let tasks: Vec<_> = (0..clients)
                .map(|c| {
                    let qs = qs.clone();
                    tokio::spawn(async move {
                        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
                        sock.connect(dns).await.unwrap();
                        let mut buf = vec![0u8; 65_535];
                        let (mut lat, mut bad) = (Vec::new(), 0usize);
                        let mut k = c;
                        let end = Instant::now() + duration;
                        while Instant::now() < end {
                            let mut q = qs[k % qs.len()].clone();
                            k += clients;
                            let id = (k as u16).wrapping_mul(7919);
                            q[0..2].copy_from_slice(&id.to_be_bytes());
                            let start = Instant::now();
                            sock.send(&q).await.unwrap();
                            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
                            let ok = loop {
                                match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                                    Ok(Ok(n)) if n >= 12 && buf[0..2] == id.to_be_bytes() => {
                                        break buf[3] & 0xF == 0;
                                    }
                                    Ok(_) => continue,
                                    Err(_) => break false,
                                }
                            };
                            if ok {
                                lat.push(start.elapsed().as_micros() as u32);
                            } else {
                                bad += 1;
                            }
                        }
                        (lat, bad)
                    })
                })
                .collect();
            let (mut all, mut bad) = (Vec::new(), 0);
            for t in tasks {
                let (l, b) = t.await.unwrap();
                all.extend(l);
                bad += b;
            }
            all.sort_unstable();
            ((all.len(), t.elapsed(), all), bad)
        })
    })
    .join()
    .unwrap()
}

/// Whether `q` gets a NOERROR answer (blocking, one try of a second).
fn answered_ok(dns: SocketAddr, q: &[u8]) -> bool {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    sock.send_to(q, dns).unwrap();
    let mut buf = vec![0u8; 65_535];
    matches!(sock.recv(&mut buf), Ok(n) if n >= 12 && buf[3] & 0xF == 0)
}

/// One keep-alive connection cycling through `reqs` until `stop`: how many were answered.
async fn http_loop(addr: String, reqs: Vec<Req>, stop: Arc<AtomicBool>) -> usize {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut done = 0;
    for (method, path, body) in reqs.iter().cycle() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let req = hyper::Request::builder()
            .method(method.clone())
            .uri(path)
            .header("host", &addr)
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))
            .unwrap();
        // The previous exchange may still be finishing on the connection task.
        send.ready().await.unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status();
        resp.into_body().collect().await.unwrap();
        assert!(status.is_success(), "HTTP load request failed: {status}");
        done += 1;
    }
    done
}

struct Figures {
    mode: &'static str,
    idle: Phase,
    loaded: Phase,
    lost: (usize, usize),
    http_rate: f64,
}

fn run_mode(mode: &'static str, quick: bool) -> Figures {
    let membranes = env("BENCH_MEMBRANES", if quick { 300 } else { 10_000 });
    let namespaces = env("BENCH_NAMESPACES", if quick { 3 } else { 100 }).max(1);
    let http_clients = env("BENCH_HTTP_CLIENTS", if quick { 4 } else { 64 });
    let dns_clients = env("BENCH_DNS_CLIENTS", 4);
    let secs = Duration::from_secs_f64(env("BENCH_SECONDS", 10) as f64);
    let secs = if quick {
        Duration::from_millis(300)
    } else {
        secs
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let extra: &[&str] = if mode == "shared" {
        &["--dns-shared-runtime"]
    } else {
        &[]
    };
    let (server, addr, dns) = start_server_dns(dir.path(), extra);
    let path = |i: usize| membrane_path(i, namespaces);
    let reg = rt.block_on(http_phase(
        &addr,
        split(16, membranes, |i| (hyper::Method::PUT, path(i), body(i))),
    ));
    report(&format!("{mode}: register"), &reg);
    let qs = Arc::new(questions(membranes, namespaces));
    // Zone updates are applied in the background: wait until DNS has every membrane.
    let waited = Instant::now();
    while !qs[..membranes].iter().all(|q| answered_ok(dns, q)) {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "DNS does not serve every registered membrane"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Warm-up, then idle.
    dns_phase(dns, dns_clients, secs / 10, qs.clone());
    let (idle, idle_lost) = dns_phase(dns, dns_clients, secs, qs.clone());
    // HTTP load: per connection 4 heartbeats to 1 list of a namespace (its membranes).
    let stop = Arc::new(AtomicBool::new(false));
    let t = Instant::now();
    let load: Vec<_> = (0..http_clients)
        .map(|c| {
            let reqs: Vec<Req> = (0..50)
                .map(|k| {
                    let i = (c * 50 + k) % membranes;
                    if k % 5 == 4 {
                        let ns = i % namespaces;
                        (
                            hyper::Method::GET,
                            format!("/v1/namespaces/ns-{ns}/membranes"),
                            Bytes::new(),
                        )
                    } else {
                        (
                            hyper::Method::POST,
                            format!("{}/heartbeat", path(i)),
                            Bytes::new(),
                        )
                    }
                })
                .collect();
            rt.spawn(http_loop(addr.clone(), reqs, stop.clone()))
        })
        .collect();
    // Let the load ramp up before measuring.
    std::thread::sleep(secs / 10);
    let (loaded, loaded_lost) = dns_phase(dns, dns_clients, secs, qs);
    stop.store(true, Ordering::Relaxed);
    let http_done: usize = rt.block_on(async {
        let mut n = 0;
        for h in load {
            n += h.await.unwrap();
        }
        n
    });
    let http_rate = http_done as f64 / t.elapsed().as_secs_f64();
    drop(server);
    Figures {
        mode,
        idle,
        loaded,
        lost: (idle_lost, loaded_lost),
        http_rate,
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run small then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let modes = std::env::var("BENCH_MODES").unwrap_or_else(|_| "own,shared".into());
    let mut all = Vec::new();
    for m in modes.split(',') {
        let mode = match m.trim() {
            "own" => "own",
            "shared" => "shared",
            other => panic!("BENCH_MODES: unknown mode {other:?} (own, shared)"),
        };
        all.push(run_mode(mode, quick));
    }
    println!();
    println!(
        "{:<8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>12}",
        "dns on",
        "idle q/s",
        "idle p50",
        "idle p99",
        "load q/s",
        "load p50",
        "load p99",
        "p99 x",
        "http req/s"
    );
    for f in &all {
        let (p50i, p99i) = (pct(&f.idle.2, 0.5), pct(&f.idle.2, 0.99));
        let (p50l, p99l) = (pct(&f.loaded.2, 0.5), pct(&f.loaded.2, 0.99));
        println!(
            "{:<8} {:>10.0} {:>8.3}ms {:>8.3}ms {:>10.0} {:>8.3}ms {:>8.3}ms {:>9.2} {:>12.0}",
            if f.mode == "own" { "own thr" } else { "shared" },
            common::rate(&f.idle),
            p50i,
            p99i,
            common::rate(&f.loaded),
            p50l,
            p99l,
            p99l / p99i,
            f.http_rate
        );
        if f.lost != (0, 0) {
            println!(
                "  {}: DNS queries lost or failed: idle {}, under load {}",
                f.mode, f.lost.0, f.lost.1
            );
        }
    }
}
