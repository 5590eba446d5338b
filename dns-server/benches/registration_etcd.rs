//! Registration on etcd, side by side: the embedded store, a `dns-server` replica on etcd,
//! and raw etcd writes with one lease per key (what one membrane costs etcd at minimum),
//! all with the same concurrency on the same machine and the same etcd.
//!
//! Run: `cargo bench -p dns-server --features etcd --bench registration_etcd`
//! Needs `etcd` on PATH (Debian: etcd-server). Knobs (env): BENCH_CLIENTS (16),
//! BENCH_MEMBRANES (20000), BENCH_NAMESPACES (100).
//!
//! Rows printed:
//! - `embedded`: `PUT /v1/namespaces/{ns}/membranes/{id}` against the embedded store;
//! - `etcd replica`: the same requests against a replica on etcd (grant a lease, then one
//!   transaction putting the registration and the live key; answered once the replica's
//!   own watch applied the commit);
//! - `raw grant+put`: per key, a lease grant then a put with that lease (the target
//!   baseline: the same etcd round trips a registration needs, without HTTP or the registry);
//! - `raw put`: a put with a lease granted beforehand (puts alone, for reference).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
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

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn etcd_bin() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
    })
}

/// One etcd member with default (durable) settings in `dir`; returns it and `HOST:PORT`.
fn start_etcd(bin: &PathBuf, dir: &std::path::Path) -> (Proc, String) {
    let (client, peer) = (free_port(), free_port());
    let child = Command::new(bin)
        .args(["--name", "bench"])
        .args(["--data-dir", dir.join("etcd").to_str().unwrap()])
        .args([
            "--listen-client-urls",
            &format!("http://127.0.0.1:{client}"),
        ])
        .args([
            "--advertise-client-urls",
            &format!("http://127.0.0.1:{client}"),
        ])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
        ])
        .args([
            "--initial-cluster",
            &format!("bench=http://127.0.0.1:{peer}"),
        ])
        .args(["--logger", "zap", "--log-level", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn etcd");
    (Proc(child), format!("127.0.0.1:{client}"))
}

/// Starts the release `dns-server` with `extra` args; returns it and its HTTP address once
/// its store is open (the "ready" log line).
fn start_server(dir: &std::path::Path, extra: &[&str]) -> (Proc, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dns-server"))
        .args(["--data-dir", dir.join("data").to_str().unwrap()])
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--dns-listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .env("MEMBRANE_LOG", "warn,dns_server=info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut http = None;
    loop {
        let line = lines.next().expect("server exited").unwrap();
        if let Some(a) = line.split("listening http ").nth(1) {
            http = Some(a.trim().to_string());
        }
        if line.contains(" ready") {
            break;
        }
    }
    // Keep draining the log (a full pipe would block the server); show warnings.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("WARN") || line.contains("ERROR") || line.contains("panicked") {
                eprintln!("server: {line}");
            }
        }
    });
    (Proc(child), http.unwrap())
}

/// One keep-alive connection sending requests one after another; latencies (us).
async fn http_client(addr: String, reqs: Vec<(String, Bytes)>) -> Vec<u32> {
    let stream = TcpStream::connect(&addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut send, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut lat = Vec::with_capacity(reqs.len());
    for (path, body) in reqs {
        let req = hyper::Request::builder()
            .method(hyper::Method::PUT)
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

type Phase = (usize, Duration, Vec<u32>);

async fn run_phase<F, Fut>(clients: usize, f: F) -> Phase
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

/// CPU seconds (user + system) a process has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of stat (utime, stime), counted after the ")": indices 11 and 12.
    (ticks(11) + ticks(12)) / 100.0
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

fn rate((n, elapsed, _): &Phase) -> f64 {
    *n as f64 / elapsed.as_secs_f64()
}

fn report(name: &str, p: &Phase) {
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

fn body(i: usize) -> Bytes {
    Bytes::from(format!(
        r#"{{"addresses":["10.{}.{}.{}"],"services":[{{"name":"svc-{}","proto":"tcp","port":7100,"priority":0,"weight":10}}],"capabilities":["vision"],"metadata":{{"version":"1.2"}},"ttl_seconds":600}}"#,
        (i >> 16) & 255,
        (i >> 8) & 255,
        i & 255,
        i % 10
    ))
}

/// The value a registration stores in etcd, for a fair size.
fn value(i: usize) -> String {
    format!(
        r#"{{"registration":{},"secret_hash":"{:064x}","registered_at_ms":1}}"#,
        String::from_utf8_lossy(&body(i)),
        i
    )
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let Some(bin) = etcd_bin() else {
        println!("SKIP: etcd is not installed (apt-get install etcd-server); nothing measured");
        return;
    };
    let clients = env("BENCH_CLIENTS", 16);
    let membranes = env("BENCH_MEMBRANES", if quick { 500 } else { 20_000 });
    let namespaces = env("BENCH_NAMESPACES", 100).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "{clients} concurrent clients, {membranes} registrations in {namespaces} namespaces, one etcd member (fsync on), {} cores",
        std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1)
    );
    let path = move |i: usize| format!("/v1/namespaces/ns-{}/membranes/m-{i}", i % namespaces);
    let per_client = |c: usize| -> Vec<(String, Bytes)> {
        (c..membranes)
            .step_by(clients)
            .map(|i| (path(i), body(i)))
            .collect()
    };
    let http_phase = |addr: String| {
        rt.block_on(run_phase(clients, |c| {
            http_client(addr.clone(), per_client(c))
        }))
    };

    // Embedded store.
    let dir = tempfile::tempdir().unwrap();
    let embedded = {
        let (_server, addr) = start_server(dir.path(), &[]);
        http_phase(addr)
    };
    report("embedded", &embedded);

    let (_etcd, endpoint) = start_etcd(&bin, dir.path());
    let client = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) =
                etcd_client::Client::connect([format!("http://{endpoint}")], None).await
                && c.put("bench-probe", "", None).await.is_ok()
            {
                return c;
            }
            assert!(Instant::now() < deadline, "etcd did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // Raw etcd: per key, grant a lease and put with it (one shared client, as a replica).
    let etcd_pid = _etcd.0.id();
    let etcd_cpu = cpu_secs(etcd_pid);
    let raw = rt.block_on(run_phase(clients, |c| {
        let mut cl = client.clone();
        async move {
            let mut lat = Vec::new();
            for i in (c..membranes).step_by(clients) {
                let t = Instant::now();
                let lease = cl.lease_grant(600, None).await.unwrap().id();
                let opts = etcd_client::PutOptions::new().with_lease(lease);
                cl.put(format!("/raw/m/{i}"), value(i), Some(opts))
                    .await
                    .unwrap();
                lat.push(t.elapsed().as_micros() as u32);
            }
            lat
        }
    }));
    report("raw grant+put", &raw);
    println!("  cpu: etcd {:.2} s", cpu_secs(etcd_pid) - etcd_cpu);

    // Raw etcd puts alone, each key on its own lease granted beforehand.
    let leases: Vec<i64> = rt.block_on(async {
        let mut cl = client.clone();
        let mut v = Vec::with_capacity(membranes);
        for _ in 0..membranes {
            v.push(cl.lease_grant(600, None).await.unwrap().id());
        }
        v
    });
    let raw_put = rt.block_on(run_phase(clients, |c| {
        let mut cl = client.clone();
        let leases = leases.clone();
        async move {
            let mut lat = Vec::new();
            for i in (c..membranes).step_by(clients) {
                let t = Instant::now();
                let opts = etcd_client::PutOptions::new().with_lease(leases[i]);
                cl.put(format!("/rawput/m/{i}"), value(i), Some(opts))
                    .await
                    .unwrap();
                lat.push(t.elapsed().as_micros() as u32);
            }
            lat
        }
    }));
    report("raw put", &raw_put);

    // A replica on the same etcd.
    let replica = {
        let dir = tempfile::tempdir().unwrap();
        let store = format!("etcd://{endpoint}");
        let (server, addr) = start_server(dir.path(), &["--store", &store]);
        let (e0, s0) = (cpu_secs(etcd_pid), cpu_secs(server.0.id()));
        let p = http_phase(addr);
        let cpu = (cpu_secs(etcd_pid) - e0, cpu_secs(server.0.id()) - s0);
        (p, cpu)
    };
    let (replica, (etcd_cpu, server_cpu)) = replica;
    report("etcd replica", &replica);
    println!("  cpu: etcd {etcd_cpu:.2} s, dns-server {server_cpu:.2} s");
    println!(
        "etcd replica / raw grant+put = {:.2}x (target >= 0.8x); / raw put = {:.2}x; / embedded = {:.2}x",
        rate(&replica) / rate(&raw),
        rate(&replica) / rate(&raw_put),
        rate(&replica) / rate(&embedded),
    );
}
