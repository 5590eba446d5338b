//! Attack bench: the cheap attacks of the hardening issue against the release `dns-server`
//! on loopback, with the server's RSS before, during and after each, and whether it still
//! answers meanwhile.
//!
//! 1. `/metrics` labels: requests with a new HTTP method name each (250,000).
//! 2. SSE: 40 subscribers resuming from an old `Last-Event-ID` that never read, while the
//!    registry keeps changing (history of 16,000 registrations, then 16,000 updates).
//! 3. HTTP: 1,100 idle or half-sent connections.
//! 4. DNS over TCP: 1,100 idle connections.
//! 5. DNS over UDP: 500,000 fuzzed packets (mutations of a valid query).
//!
//! Run: `cargo bench -p dns-server --bench attacks` (`cargo test --benches` runs it small).
//! Knobs (env): BENCH_METHODS (250000), BENCH_SSE_SUBSCRIBERS (40), BENCH_SSE_EVENTS (16000),
//! BENCH_IDLE_CONNECTIONS (1100), BENCH_DNS_PACKETS (500000), BENCH_SERVER_BIN.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Req, body, env, http_phase, rss_kib, split, start_server_addrs};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One line per attack: RSS before, at the worst moment, after it ended.
fn report(name: &str, pid: u32, before: u64, during: u64, note: &str) {
    let after = rss_kib(pid);
    println!(
        "{name:<28} rss before {:>6.1} MiB  during {:>6.1} MiB (+{:>5.1})  after {:>6.1} MiB (+{:>5.1})  {note}",
        mib(before),
        mib(during),
        mib(during.saturating_sub(before)),
        mib(after),
        mib(after.saturating_sub(before)),
    );
}

/// One request on a fresh connection: status and body; None if no answer within 5 s.
async fn get(addr: &str, path: &str) -> Option<(u16, Bytes, Duration)> {
    let t = Instant::now();
    let fut = async {
        let stream = TcpStream::connect(addr).await.ok()?;
        let (mut send, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .uri(path)
            .header("host", addr)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = send.send_request(req).await.ok()?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, body))
    };
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()??;
    Some((status, body, t.elapsed()))
}

/// Whether `/health` answers on a new connection, and how fast.
async fn health(addr: &str) -> String {
    match get(addr, "/health").await {
        Some((status, _, t)) => format!("/health {status} in {:.1} ms", t.as_secs_f64() * 1e3),
        None => "/health NO ANSWER".into(),
    }
}

/// Attack 1: `n` requests, each with a method name never seen before, over `clients`
/// keep-alive connections (answers are 405/404: any status is fine).
async fn methods(addr: &str, n: usize, clients: usize) -> usize {
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let addr = addr.to_string();
            tokio::spawn(async move {
                let mut answered = 0;
                let mut i = c;
                'conn: while i < n {
                    let Ok(stream) = TcpStream::connect(&addr).await else {
                        return answered;
                    };
                    let Ok((mut send, conn)) = http1::handshake(TokioIo::new(stream)).await else {
                        return answered;
                    };
                    tokio::spawn(conn);
                    while i < n {
                        let method =
                            hyper::Method::from_bytes(format!("M{i:07}X").as_bytes()).unwrap();
                        let req = hyper::Request::builder()
                            .method(method)
                            .uri(format!("/v1/x{}", i % 7))
                            .header("host", &addr)
                            .body(Full::new(Bytes::new()))
                            .unwrap();
                        let Ok(resp) = send.send_request(req).await else {
                            continue 'conn; // the server closed it: reconnect
                        };
                        let _ = resp.into_body().collect().await;
                        answered += 1;
                        i += clients;
                    }
                }
                answered
            })
        })
        .collect();
    let mut answered = 0;
    for t in tasks {
        answered += t.await.unwrap();
    }
    answered
}

/// A connection that sent `head` and then never reads again; the status line, if any
/// arrived within 2 s.
async fn stalled(addr: &str, head: &str) -> Option<(TcpStream, String)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(head.as_bytes()).await.ok()?;
    let mut buf = [0u8; 12];
    let status = match tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf)).await {
        Ok(Ok(_)) => String::from_utf8_lossy(&buf[9..12]).into_owned(),
        _ => "none".into(),
    };
    Some((s, status))
}

/// A valid DNS query for `name` (type A), id `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// xorshift64: the fuzzer's randomness, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A mutation of a valid query: flipped bytes, truncation, junk appended, or random bytes.
fn fuzzed(rng: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut p = base.to_vec();
    match rng.below(4) {
        0 => {
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(p.len());
                p[i] = rng.next() as u8;
            }
        }
        1 => p.truncate(rng.below(p.len())),
        2 => {
            for _ in 0..rng.below(600) {
                p.push(rng.next() as u8);
            }
        }
        _ => {
            p = (0..rng.below(1200)).map(|_| rng.next() as u8).collect();
        }
    }
    p
}

/// Attack 5: `n` fuzzed packets in bursts, answers drained; (sent, answers received).
async fn dns_fuzz(addr: &str, n: usize) -> (usize, usize) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(addr).await.unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let base = query(7, "m-1.ns-1.");
    let (mut sent, mut answers) = (0, 0);
    let mut buf = vec![0u8; 65536];
    while sent < n {
        for _ in 0..64.min(n - sent) {
            let p = fuzzed(&mut rng, &base);
            if sock.send(&p).await.is_ok() {
                sent += 1;
            }
        }
        // Drain what came back; a short wait keeps the burst from only filling buffers.
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_micros(300), sock.recv(&mut buf)).await
        {
            answers += 1;
        }
    }
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(50), sock.recv(&mut buf)).await
    {
        answers += 1;
    }
    (sent, answers)
}

/// Whether a TCP DNS query on a new connection is answered.
async fn dns_tcp_answers(addr: &str) -> String {
    let t = Instant::now();
    let fut = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let q = query(9, "m-1.ns-1.");
        let mut msg = (q.len() as u16).to_be_bytes().to_vec();
        msg.extend_from_slice(&q);
        s.write_all(&msg).await.ok()?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.ok()?;
        Some(())
    };
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Ok(Some(())) => format!(
            "new DNS TCP query answered in {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        ),
        _ => "new DNS TCP query NOT ANSWERED".into(),
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run small then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let n_methods = env("BENCH_METHODS", if quick { 2_000 } else { 250_000 });
    let n_subs = env("BENCH_SSE_SUBSCRIBERS", 40);
    let n_events = env("BENCH_SSE_EVENTS", if quick { 1_000 } else { 16_000 });
    let n_idle = env("BENCH_IDLE_CONNECTIONS", if quick { 300 } else { 1_100 });
    let n_packets = env("BENCH_DNS_PACKETS", if quick { 5_000 } else { 500_000 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut server, addrs) = start_server_addrs(dir.path(), &[]);
    let pid = server.0.id();
    let http = addrs.http.clone();
    println!(
        "dns-server pid {pid} on {http}; rss idle {:.1} MiB",
        mib(rss_kib(pid))
    );
    rt.block_on(async {
        // 1. A new method name per request.
        let before = rss_kib(pid);
        let answered = methods(&http, n_methods, 8).await;
        let (_, metrics, _) = get(&http, "/metrics").await.expect("/metrics answers");
        let metrics_bytes = metrics.len();
        report(
            &format!("{n_methods} new method names"),
            pid,
            before,
            rss_kib(pid),
            &format!("{answered} answered; /metrics {metrics_bytes} bytes"),
        );

        // 2. Stalled SSE subscribers far behind, while the registry keeps changing.
        let path = |i: usize| format!("/v1/namespaces/sse/membranes/m-{i}");
        let reg: Vec<Vec<Req>> = split(8, n_events, |i| {
            (hyper::Method::PUT, path(i + 1), body(i + 1))
        });
        http_phase(
            &http,
            split(1, 1, |_| (hyper::Method::PUT, path(0), body(0))),
        )
        .await;
        // Resume from just before all the registrations: `n_events` behind.
        let (_, list, _) = get(&http, "/v1/namespaces/sse/membranes").await.unwrap();
        let list: serde_json::Value = serde_json::from_slice(&list).unwrap();
        let old = list["revision"].as_u64().expect("a revision");
        http_phase(&http, reg).await;
        let before = rss_kib(pid);
        let head = format!(
            "GET /v1/namespaces/sse/events HTTP/1.1\r\nhost: x\r\nlast-event-id: {old}\r\n\r\n"
        );
        let mut subs = Vec::new();
        let mut statuses = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..n_subs {
            if let Some((s, status)) = stalled(&http, &head).await {
                *statuses.entry(status).or_default() += 1;
                subs.push(s);
            }
        }
        // The registry keeps changing: every subscriber is sent (or queued) every event.
        let upd = split(8, n_events, |i| {
            (
                hyper::Method::PUT,
                format!("{}?replace=true", path(i + 1)),
                body(i + 2),
            )
        });
        http_phase(&http, upd).await;
        let during = rss_kib(pid);
        let h = health(&http).await;
        drop(subs);
        tokio::time::sleep(Duration::from_millis(300)).await;
        report(
            &format!("{n_subs} stalled SSE subscribers"),
            pid,
            before,
            during,
            &format!("statuses {statuses:?}; {n_events} events behind + {n_events} live; {h}"),
        );

        // 3. Idle and half-sent HTTP connections.
        let before = rss_kib(pid);
        let mut conns = Vec::new();
        for i in 0..n_idle {
            if let Ok(mut s) = TcpStream::connect(&http).await {
                if i % 2 == 1 {
                    let _ = s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n").await;
                }
                conns.push(s);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let during = rss_kib(pid);
        let h = health(&http).await;
        let opened = conns.len();
        drop(conns);
        tokio::time::sleep(Duration::from_millis(300)).await;
        report(
            &format!("{n_idle} idle/half-sent HTTP"),
            pid,
            before,
            during,
            &format!("{opened} connected; meanwhile {h}"),
        );

        // 4. Idle DNS-over-TCP connections.
        let before = rss_kib(pid);
        let mut conns = Vec::new();
        for _ in 0..n_idle {
            if let Ok(s) = TcpStream::connect(&addrs.dns_tcp).await {
                conns.push(s);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let during = rss_kib(pid);
        let d = dns_tcp_answers(&addrs.dns_tcp).await;
        let opened = conns.len();
        drop(conns);
        tokio::time::sleep(Duration::from_millis(300)).await;
        report(
            &format!("{n_idle} idle DNS TCP"),
            pid,
            before,
            during,
            &format!("{opened} connected; meanwhile {d}"),
        );

        // 5. Fuzzed DNS packets.
        let before = rss_kib(pid);
        let t = Instant::now();
        let (sent, answers) = dns_fuzz(&addrs.dns_udp, n_packets).await;
        let during = rss_kib(pid);
        let h = health(&http).await;
        report(
            &format!("{n_packets} fuzzed DNS packets"),
            pid,
            before,
            during,
            &format!(
                "{sent} sent in {:.1} s, {answers} answers; still alive: {h}",
                t.elapsed().as_secs_f64()
            ),
        );
    });
    assert!(
        server.0.try_wait().unwrap().is_none(),
        "the server died under attack"
    );
}
