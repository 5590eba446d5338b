//! Registration benchmark: drives `PUT /v1/namespaces/{ns}/membranes/{id}` against the
//! release `dns-server` binary on loopback over keep-alive connections, then heartbeats,
//! and reports throughput, latency percentiles and the server's RSS.
//!
//! Run: `cargo bench -p dns-server --bench registration`
//! Knobs (env): BENCH_CLIENTS (16), BENCH_MEMBRANES (100000), BENCH_NAMESPACES (100),
//! BENCH_HEARTBEATS (200000), BENCH_REREGISTER_ROUNDS (1; rounds of 50,000 updates),
//! BENCH_SERVER_BIN (another `dns-server` binary, for an A/B against an older build).

mod common;

use bytes::Bytes;
use common::{
    Req, body, env, http_phase, membrane_path, report, rss_kib, split, start_server, status_kib,
};

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
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = start_server(dir.path(), &[]);
    let pid = server.0.id();
    println!(
        "dns-server pid {pid} on {addr}; {clients} keep-alive clients, {membranes} membranes in {namespaces} namespaces"
    );
    println!("rss idle: {:.1} MiB", rss_kib(pid) as f64 / 1024.0);
    let path = |i: usize| membrane_path(i, namespaces);
    let split = |n: usize, f: &dyn Fn(usize) -> Req| split(clients, n, f);
    let reg = rt.block_on(http_phase(
        &addr,
        split(membranes, &|i| (hyper::Method::PUT, path(i), body(i))),
    ));
    report("register", &reg);
    println!(
        "rss with {membranes} membranes: {:.1} MiB {}",
        rss_kib(pid) as f64 / 1024.0,
        rss_split(pid)
    );
    let hb = rt.block_on(http_phase(
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
    // More rounds show whether memory settles under a steady stream of updates. The bench
    // holds no instance secrets, so it asks to replace (an open registry answers 409 else).
    let n = membranes.min(50_000);
    for round in 0..rounds {
        let upd = rt.block_on(http_phase(
            &addr,
            split(n, &|i| {
                (
                    hyper::Method::PUT,
                    format!("{}?replace=true", path(i)),
                    body(i + 1 + round),
                )
            }),
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
