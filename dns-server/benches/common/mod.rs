//! What the registration benches share: starting the release `dns-server`, the HTTP client
//! loop, running a phase over concurrent clients and printing its figures.
//!
//! Included by each bench with `mod common;`; a bench uses only part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// An environment knob, or `default`.
pub fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the release `dns-server` with its data in `dir` and `extra` args; returns it and
/// its HTTP address once it logged " ready" (its store is open). Its log is drained in the
/// background (a full pipe would block it); warnings and errors are shown.
/// `BENCH_SERVER_BIN` runs another `dns-server` binary instead (an A/B against an older build).
pub fn start_server(dir: &Path, extra: &[&str]) -> (Proc, String) {
    start_server_on(dir, "127.0.0.1:0", extra)
}

/// [`start_server`] with its HTTP API on `http` (a restart keeps its address).
pub fn start_server_on(dir: &Path, http: &str, extra: &[&str]) -> (Proc, String) {
    let (p, addrs) = start_server_full(dir, http, extra);
    (p, addrs.http)
}

/// [`start_server`], also returning the server's (first) DNS UDP address.
pub fn start_server_dns(dir: &Path, extra: &[&str]) -> (Proc, String, std::net::SocketAddr) {
    let (p, addrs) = start_server_full(dir, "127.0.0.1:0", extra);
    let dns = addrs.dns_udp.parse().expect("no 'listening dns udp' line");
    (p, addrs.http, dns)
}

/// The addresses a started server reported.
pub struct Addrs {
    /// HTTP.
    pub http: String,
    /// DNS over UDP.
    pub dns_udp: String,
    /// DNS over TCP.
    pub dns_tcp: String,
}

/// [`start_server`], with every address it listens on.
pub fn start_server_addrs(dir: &Path, extra: &[&str]) -> (Proc, Addrs) {
    start_server_full(dir, "127.0.0.1:0", extra)
}

fn start_server_full(dir: &Path, http: &str, extra: &[&str]) -> (Proc, Addrs) {
    let bin = std::env::var_os("BENCH_SERVER_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_dns-server").into());
    let mut child = Command::new(bin)
        .args(["--data-dir", dir.join("data").to_str().unwrap()])
        .args(["--http-listen", http, "--dns-listen", "127.0.0.1:0"])
        .args(extra)
        .env("MEMBRANE_LOG", "warn,dns_server=info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut http, mut dns_udp, mut dns_tcp) = (None, None, None);
    loop {
        let line = lines.next().expect("server exited").unwrap();
        let addr = |tag: &str| line.split(tag).nth(1).map(|a| a.trim().to_string());
        http = http.or_else(|| addr("listening http "));
        dns_udp = dns_udp.or_else(|| addr("listening dns udp "));
        dns_tcp = dns_tcp.or_else(|| addr("listening dns tcp "));
        if line.contains(" ready") {
            break;
        }
    }
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("WARN") || line.contains("ERROR") || line.contains("panicked") {
                eprintln!("server: {line}");
            }
        }
    });
    let addrs = Addrs {
        http: http.expect("no 'listening http' line"),
        dns_udp: dns_udp.unwrap_or_default(),
        dns_tcp: dns_tcp.unwrap_or_default(),
    };
    (Proc(child), addrs)
}

/// A field of `/proc/PID/status`, in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Resident set size of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// One request: method, path, JSON body.
pub type Req = (hyper::Method, String, Bytes);

/// One keep-alive connection sending `reqs` one after another; latencies (us). Panics on
/// an unsuccessful answer.
pub async fn http_client(addr: String, reqs: Vec<Req>) -> Vec<u32> {
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
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        lat.push(t.elapsed().as_micros() as u32);
        assert!(
            status.is_success(),
            "request failed: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    lat
}

/// Requests done, wall time, sorted latencies (us).
pub type Phase = (usize, Duration, Vec<u32>);

/// Runs one task per client (`f(client index)` returns its latencies) and gathers them.
pub async fn run_phase<F, Fut>(clients: usize, f: F) -> Phase
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Vec<u32>> + Send + 'static,
{
    let t = Instant::now();
    let tasks: Vec<_> = (0..clients).map(|c| tokio::spawn(f(c))).collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = t.elapsed();
    all.sort_unstable();
    (all.len(), elapsed, all)
}

/// `http_client` over `per_client` connections to `addr`.
pub async fn http_phase(addr: &str, per_client: Vec<Vec<Req>>) -> Phase {
    let n = per_client.len();
    let slots = std::sync::Mutex::new(per_client.into_iter().map(Some).collect::<Vec<_>>());
    run_phase(n, |c| {
        http_client(addr.to_string(), slots.lock().unwrap()[c].take().unwrap())
    })
    .await
}

/// The `p` quantile of sorted latencies, in ms.
pub fn pct(sorted: &[u32], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

/// Requests per second.
pub fn rate((n, elapsed, _): &Phase) -> f64 {
    *n as f64 / elapsed.as_secs_f64()
}

/// One line: count, time, rate, p50, p99, max.
pub fn report(name: &str, p: &Phase) {
    let (n, elapsed, lat) = p;
    println!(
        "{name:<16} {n:>7} in {:>6.2} s = {:>8.0} /s   p50 {:>7.3} ms   p99 {:>7.3} ms   max {:>8.3} ms",
        elapsed.as_secs_f64(),
        rate(p),
        pct(lat, 0.50),
        pct(lat, 0.99),
        pct(lat, 1.0),
    );
}

/// A registration body for membrane `i` (about 220 bytes of JSON).
pub fn body(i: usize) -> Bytes {
    Bytes::from(format!(
        r#"{{"addresses":["10.{}.{}.{}"],"services":[{{"name":"svc-{}","proto":"tcp","port":7100,"priority":0,"weight":10}}],"capabilities":["vision"],"metadata":{{"version":"1.2"}},"ttl_seconds":600}}"#,
        (i >> 16) & 255,
        (i >> 8) & 255,
        i & 255,
        i % 10
    ))
}

/// The path of membrane `i` spread over `namespaces` namespaces.
pub fn membrane_path(i: usize, namespaces: usize) -> String {
    format!("/v1/namespaces/ns-{}/membranes/m-{i}", i % namespaces)
}

/// Requests `0..n` dealt round-robin to `clients` clients.
pub fn split(clients: usize, n: usize, f: impl Fn(usize) -> Req) -> Vec<Vec<Req>> {
    let mut v: Vec<Vec<Req>> = (0..clients).map(|_| Vec::new()).collect();
    for i in 0..n {
        v[i % clients].push(f(i));
    }
    v
}
