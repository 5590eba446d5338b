//! Registration benchmark: drives `PUT /v1/namespaces/{ns}/membranes/{id}` against the
//! release `dns-server` binary on loopback over keep-alive connections, then heartbeats,
//! and reports throughput, latency percentiles and the server's RSS.
//!
//! Run: `cargo bench -p dns-server --bench registration`
//! Knobs (env): BENCH_CLIENTS (16), BENCH_MEMBRANES (100000), BENCH_NAMESPACES (100),
//! BENCH_HEARTBEATS (200000), BENCH_REREGISTER_ROUNDS (1; rounds of 50,000 updates).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Server {
    child: std::process::Child,
    http: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Server {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dns-server"))
        .args(["--data-dir", dir.path().to_str().unwrap()])
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--dns-listen",
            "127.0.0.1:0",
        ])
        .env("MEMBRANE_LOG", "warn,dns_server=info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let http = loop {
        let line = lines.next().expect("server exited").unwrap();
        if let Some(a) = line.split("listening http ").nth(1) {
            break a.trim().to_string();
        }
    };
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server {
        child,
        http,
        _dir: dir,
    }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// RSS split: anonymous (heap, stacks) / file-backed / shared memory (SQLite's WAL index).
fn rss_split(pid: u32) -> String {
    let mib = |f| status_kib(pid, f) as f64 / 1024.0;
    format!(
        "(anon {:.1}, file {:.1}, shmem {:.1} MiB)",
        mib("RssAnon"),
        mib("RssFile"),
        mib("RssShmem")
    )
}

/// One keep-alive connection sending requests one after another; returns latencies (us).
async fn client(addr: String, reqs: Vec<(hyper::Method, String, Bytes)>) -> Vec<u32> {
    let stream = TcpStream::connect(&addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut send, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut lat = Vec::with_capacity(reqs.len());
    for (method, path, body) in reqs {
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &addr)
            .header("content-type", "application/json")
            .body(Full::new(body))
            .unwrap();
        let t = Instant::now();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status();
        let _ = resp.into_body().collect().await.unwrap();
        lat.push(t.elapsed().as_micros() as u32);
        assert!(status.is_success(), "request failed: {status}");
    }
    lat
}

async fn phase(
    addr: &str,
    per_client: Vec<Vec<(hyper::Method, String, Bytes)>>,
) -> (usize, Duration, Vec<u32>) {
    let n: usize = per_client.iter().map(Vec::len).sum();
    let t = Instant::now();
    let tasks: Vec<_> = per_client
        .into_iter()
        .map(|reqs| tokio::spawn(client(addr.to_string(), reqs)))
        .collect();
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = t.elapsed();
    all.sort_unstable();
    (n, elapsed, all)
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

fn report(name: &str, (n, elapsed, lat): &(usize, Duration, Vec<u32>)) {
    println!(
        "{name:<14} {n:>7} requests in {:>6.2} s = {:>8.0} /s   p50 {:.3} ms   p99 {:.3} ms   max {:.3} ms",
        elapsed.as_secs_f64(),
        *n as f64 / elapsed.as_secs_f64(),
        pct(lat, 0.50),
        pct(lat, 0.99),
        pct(lat, 1.0),
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run small then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let clients = env("BENCH_CLIENTS", 16);
    let membranes = env("BENCH_MEMBRANES", if quick { 2_000 } else { 100_000 });
    let namespaces = env("BENCH_NAMESPACES", 100).max(1);
    let heartbeats = env("BENCH_HEARTBEATS", if quick { 2_000 } else { 200_000 });
    let rounds = env("BENCH_REREGISTER_ROUNDS", 1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = start();
    let pid = server.child.id();
    let addr = server.http.clone();
    println!(
        "dns-server pid {pid} on {addr}; {clients} keep-alive clients, {membranes} membranes in {namespaces} namespaces"
    );
    println!("rss idle: {:.1} MiB", rss_kib(pid) as f64 / 1024.0);
    let path = |i: usize| format!("/v1/namespaces/ns-{}/membranes/m-{i}", i % namespaces);
    let body = |i: usize| {
        Bytes::from(format!(
            r#"{{"addresses":["10.{}.{}.{}"],"services":[{{"name":"svc-{}","proto":"tcp","port":7100,"priority":0,"weight":10}}],"capabilities":["vision"],"metadata":{{"version":"1.2"}},"ttl_seconds":600}}"#,
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255,
            i % 10
        ))
    };
    let split = |n: usize, f: &dyn Fn(usize) -> (hyper::Method, String, Bytes)| {
        let mut v: Vec<Vec<_>> = (0..clients).map(|_| Vec::new()).collect();
        for i in 0..n {
            v[i % clients].push(f(i));
        }
        v
    };
    let reg = rt.block_on(phase(
        &addr,
        split(membranes, &|i| (hyper::Method::PUT, path(i), body(i))),
    ));
    report("register", &reg);
    println!(
        "rss with {membranes} membranes: {:.1} MiB {}",
        rss_kib(pid) as f64 / 1024.0,
        rss_split(pid)
    );
    let hb = rt.block_on(phase(
        &addr,
        split(heartbeats, &|i| {
            (
                hyper::Method::POST,
                format!("{}/heartbeat", path(i % membranes)),
                Bytes::new(),
            )
        }),
    ));
    report("heartbeat", &hb);
    // Re-registration (update of existing membranes): same durability path as new ones.
    // More rounds show whether memory settles under a steady stream of updates.
    let n = membranes.min(50_000);
    for round in 0..rounds {
        let upd = rt.block_on(phase(
            &addr,
            split(n, &|i| (hyper::Method::PUT, path(i), body(i + 1 + round))),
        ));
        report("re-register", &upd);
        println!(
            "rss after {} re-registrations: {:.1} MiB {}",
            n * (round + 1),
            rss_kib(pid) as f64 / 1024.0,
            rss_split(pid)
        );
    }
}
