//! Registration on etcd, side by side: the embedded store, a `dns-server` replica on etcd,
//! and raw etcd writes with one lease per key (what one membrane costs etcd at minimum),
//! all with the same concurrency on the same machine.
//!
//! Run: `cargo bench -p dns-server --features etcd --bench registration_etcd`
//! Needs `etcd` on PATH (Debian: etcd-server). Knobs (env): BENCH_CLIENTS (16),
//! BENCH_MEMBRANES (20000), BENCH_NAMESPACES (100), BENCH_ROUNDS (2).
//!
//! Every etcd phase gets a fresh etcd member (fresh data dir), so no phase inherits
//! another's keys, leases or db size; the raw and replica phases alternate over
//! BENCH_ROUNDS rounds (raw first in even rounds, replica first in odd ones) so that drift
//! of a noisy machine hits both alike. Rows printed:
//! - `embedded`: `PUT /v1/namespaces/{ns}/membranes/{id}` against the embedded store;
//! - `etcd replica`: the same requests against a replica on etcd (a lease per membrane,
//!   then a transaction putting the registration and the live key; answered once etcd
//!   committed it and the replica's own watch applied the commit);
//! - `raw grant+put`: per key, a lease grant then a put with that lease (the target
//!   baseline: the etcd round trips a registration needs, without HTTP or the registry);
//! - `raw put`: a put with a lease granted beforehand (puts alone, for reference; once).
//!
//! The last lines give replica / raw grant+put per round and over all rounds.

mod common;
#[allow(dead_code)] // etcd_bin_or_skip is for tests
#[path = "../src/store/etcd/member.rs"]
mod member;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    Phase, Proc, body, env, http_phase, membrane_path, rate, report, split, start_server,
};

/// One etcd member with default (durable) settings in `dir`; returns it and `HOST:PORT`.
fn start_etcd(bin: &Path, dir: &Path) -> (Proc, String) {
    let (child, endpoint) = member::spawn(bin, dir);
    (Proc(child), endpoint)
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

/// The value a registration stores in etcd, for a fair size.
fn value(i: usize) -> String {
    format!(
        r#"{{"registration":{},"secret_hash":"{:064x}","registered_at_ms":1}}"#,
        String::from_utf8_lossy(&body(i)),
        i
    )
}

/// A fresh etcd member and a client connected to it.
struct Member {
    proc: Proc,
    endpoint: String,
    client: etcd_client::Client,
    _dir: tempfile::TempDir,
}

fn fresh_etcd(rt: &tokio::runtime::Runtime, bin: &Path) -> Member {
    let dir = tempfile::tempdir().unwrap();
    let (proc, endpoint) = start_etcd(bin, dir.path());
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
    Member {
        proc,
        endpoint,
        client,
        _dir: dir,
    }
}

/// Per key, grant a lease and put with it (one shared client, as a replica has).
fn raw_grant_put(rt: &tokio::runtime::Runtime, m: &Member, clients: usize, n: usize) -> Phase {
    rt.block_on(common::run_phase(clients, |c| {
        let mut cl = m.client.clone();
        async move {
            let mut lat = Vec::new();
            for i in (c..n).step_by(clients) {
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
    }))
}

/// Puts alone, each key on its own lease granted beforehand.
fn raw_put(rt: &tokio::runtime::Runtime, m: &Member, clients: usize, n: usize) -> Phase {
    let leases: Vec<i64> = rt.block_on(async {
        let mut cl = m.client.clone();
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(cl.lease_grant(600, None).await.unwrap().id());
        }
        v
    });
    rt.block_on(common::run_phase(clients, |c| {
        let mut cl = m.client.clone();
        let leases = leases.clone();
        async move {
            let mut lat = Vec::new();
            for i in (c..n).step_by(clients) {
                let t = Instant::now();
                let opts = etcd_client::PutOptions::new().with_lease(leases[i]);
                cl.put(format!("/rawput/m/{i}"), value(i), Some(opts))
                    .await
                    .unwrap();
                lat.push(t.elapsed().as_micros() as u32);
            }
            lat
        }
    }))
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let Some(bin) = member::etcd_bin() else {
        println!("SKIP: etcd is not installed (apt-get install etcd-server); nothing measured");
        return;
    };
    let clients = env("BENCH_CLIENTS", 16);
    let membranes = env("BENCH_MEMBRANES", if quick { 500 } else { 20_000 });
    let namespaces = env("BENCH_NAMESPACES", 100).max(1);
    let rounds = env("BENCH_ROUNDS", if quick { 1 } else { 2 }).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "{clients} concurrent clients, {membranes} registrations in {namespaces} namespaces, \
         {rounds} rounds, a fresh etcd member (fsync on) per etcd phase, {} cores",
        std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1)
    );
    let requests = || {
        split(clients, membranes, |i| {
            (hyper::Method::PUT, membrane_path(i, namespaces), body(i))
        })
    };

    let embedded = {
        let dir = tempfile::tempdir().unwrap();
        let (_server, addr) = start_server(dir.path(), &[]);
        rt.block_on(http_phase(&addr, requests()))
    };
    report("embedded", &embedded);

    let mut raws: Vec<Phase> = Vec::new();
    let mut replicas: Vec<Phase> = Vec::new();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for replica in order {
            let m = fresh_etcd(&rt, &bin);
            let etcd_pid = m.proc.0.id();
            if replica {
                let dir = tempfile::tempdir().unwrap();
                let store = format!("etcd://{}", m.endpoint);
                let (server, addr) = start_server(dir.path(), &["--store", &store]);
                let (e0, s0) = (cpu_secs(etcd_pid), cpu_secs(server.0.id()));
                let p = rt.block_on(http_phase(&addr, requests()));
                let (e1, s1) = (cpu_secs(etcd_pid), cpu_secs(server.0.id()));
                report("etcd replica", &p);
                println!("  cpu: etcd {:.2} s, dns-server {:.2} s", e1 - e0, s1 - s0);
                replicas.push(p);
            } else {
                let e0 = cpu_secs(etcd_pid);
                let p = raw_grant_put(&rt, &m, clients, membranes);
                report("raw grant+put", &p);
                println!("  cpu: etcd {:.2} s", cpu_secs(etcd_pid) - e0);
                raws.push(p);
            }
        }
    }
    let raw_put = raw_put(&rt, &fresh_etcd(&rt, &bin), clients, membranes);
    report("raw put", &raw_put);

    let ratios: Vec<String> = raws
        .iter()
        .zip(&replicas)
        .map(|(r, p)| format!("{:.2}x", rate(p) / rate(r)))
        .collect();
    let mean = |v: &[Phase]| v.iter().map(rate).sum::<f64>() / v.len() as f64;
    let p99 = |v: &[Phase]| {
        v.iter()
            .map(|p| common::pct(&p.2, 0.99))
            .fold(0.0, f64::max)
    };
    println!(
        "mean over {rounds} rounds: embedded {:.0}/s; raw grant+put {:.0}/s (worst p99 {:.1} ms); \
         etcd replica {:.0}/s (worst p99 {:.1} ms)",
        rate(&embedded),
        mean(&raws),
        p99(&raws),
        mean(&replicas),
        p99(&replicas),
    );
    println!(
        "etcd replica / raw grant+put = {:.2}x (target >= 0.8x; per round {}); / raw put = {:.2}x; / embedded = {:.2}x",
        mean(&replicas) / mean(&raws),
        ratios.join(" "),
        mean(&replicas) / rate(&raw_put),
        mean(&replicas) / rate(&embedded),
    );
}
