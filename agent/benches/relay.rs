//! Relay benchmark: 1 KiB messages between two `agent run` processes on this machine, in
//! each mode (shared-volume, ipc, tcp), next to raw baselines (a bare Unix socket
//! ping-pong, a bare write-fsync-rename loop on the same disk).
//!
//! Run: `cargo bench -p agent --bench relay` (release build). A `dns-server` binary is taken
//! from `DNS_SERVER_BIN`, else the target directory (release, then debug), else built.
//! Knobs (environment): `BENCH_MESSAGES` (default 20000), `BENCH_CONCURRENCY` (`send`
//! requests in flight, default 128), `BENCH_PIPELINE` (of which pipelined on each control
//! connection, default 1: 128 connections with one request each; 32: 4 connections with
//! 32 each), `BENCH_LATENCY_MESSAGES` (default 300),
//! `BENCH_DIR` (where the Maildirs and spools go; default a temporary directory under
//! /var/tmp, i.e. the root disk, not tmpfs), `BENCH_COMPARE_BIN` (another `agent` binary,
//! e.g. one built from an older commit: each mode is then also run with it, right after the
//! current one, and printed on a line marked `old`, so both are measured under the same
//! machine load).
//!
//! Measured per mode:
//! - throughput: N messages sent by `BENCH_CONCURRENCY` concurrent `send` requests to the
//!   sending agent; messages/s from the first send to the last message printed by
//!   `agent recv --follow --json` on the receiving side; p50/p99 of send-to-receive latency
//!   under that load;
//! - unloaded latency: one message at a time (the next is sent once the previous was
//!   printed by `agent recv`): p50/p99 send-to-receive;
//! - shared-volume only: "after the rename": from the file's appearance in the receiver's
//!   `new/` (seen by this bench's own inotify watch) to `agent recv` printing it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::Value;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_agent"))
}

fn dns_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DNS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let dir = agent_bin().parent().unwrap().to_path_buf();
    let target = dir.parent().unwrap().to_path_buf();
    for c in [dir.join("dns-server"), target.join("debug/dns-server")] {
        if c.is_file() {
            return c;
        }
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let ok = Command::new(cargo)
        .args(["build", "--release", "-p", "dns-server"])
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "cannot build dns-server; set DNS_SERVER_BIN");
    dir.join("dns-server")
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(dir: &Path) -> (Proc, String) {
    let mut child = Command::new(dns_server_bin())
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--dns-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dns-server");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("listening http ")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(line[i + 15..].trim().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("dns-server address");
    (Proc(child), format!("http://{addr}"))
}

fn start_agent(bin: &Path, id: &str, mode: &str, url: &str, dir: &Path) -> (Proc, PathBuf) {
    let state = dir.join(id);
    std::fs::create_dir_all(&state).unwrap();
    let mut cmd = Command::new(bin);
    cmd.args([
        "run",
        "--id",
        id,
        "--namespace",
        "bench",
        "--registry-url",
        url,
    ])
    .arg("--state-dir")
    .arg(&state)
    .args(["--mode", mode]);
    match mode {
        "shared-volume" => {
            cmd.arg("--shared-dir").arg(dir.join("shared"));
        }
        "tcp" => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            cmd.args(["--listen", &format!("127.0.0.1:{port}")]);
        }
        _ => {}
    }
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("MEMBRANE_") {
            cmd.env_remove(k);
        }
    }
    let log = std::fs::File::create(dir.join(format!("{id}.log"))).unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn agent");
    let p = Proc(child);
    let t0 = Instant::now();
    loop {
        let out = Command::new(bin)
            .arg("status")
            .arg("--state-dir")
            .arg(&state)
            .output()
            .unwrap();
        if out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout)
                .is_ok_and(|v| v["registration"]["registered"] == true)
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{id} did not register"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (p, state)
}

/// `agent recv --follow --json` of the receiver; each printed message's sequence number and
/// the instant it was read.
fn start_recv(bin: &Path, state: &Path) -> (Proc, mpsc::Receiver<(usize, Instant)>) {
    let mut child = Command::new(bin)
        .args(["recv", "--follow", "--json", "--state-dir"])
        .arg(state)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn recv");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let now = Instant::now();
            // The harness stays light (it shares the CPU with the agents): only the
            // sequence number at the start of the body is read.
            let i = line.find("\"body\":\"").expect("body") + 8;
            let seq: usize = line[i..i + 8].parse().unwrap();
            if tx.send((seq, now)).is_err() {
                return;
            }
        }
    });
    (Proc(child), rx)
}

fn body(seq: usize) -> String {
    let mut s = format!("{seq:08}:");
    s.extend(std::iter::repeat_n('x', 1024 - s.len()));
    s
}

struct Ctl {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Ctl {
    fn open(state: &Path) -> Ctl {
        let w = UnixStream::connect(state.join("control.sock")).unwrap();
        let r = BufReader::new(w.try_clone().unwrap());
        Ctl { w, r }
    }
    fn send(&mut self, seq: usize) -> String {
        self.write(seq);
        self.read()
    }
    fn write(&mut self, seq: usize) {
        // The body is digits, ':' and 'x': no JSON escaping needed.
        writeln!(
            self.w,
            "{{\"cmd\":\"send\",\"to\":\"b\",\"body\":\"{}\"}}",
            body(seq)
        )
        .unwrap();
    }
    /// An answer under load: only checked to be a success.
    fn read_ok(&mut self) {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        assert!(line.starts_with("{\"ok\":true"), "{line}");
    }
    fn read(&mut self) -> String {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], true, "{v}");
        v["result"]["ids"][0].as_str().unwrap().to_string()
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

struct ModeResult {
    mode: &'static str,
    rate: f64,
    load_p50: Duration,
    load_p99: Duration,
    idle_p50: Duration,
    idle_p99: Duration,
    after_rename: Option<(Duration, Duration)>,
}

/// Watches `dir` with inotify; file name -> instant it appeared (moved in).
fn watch_dir(
    dir: &Path,
) -> (
    notify::RecommendedWatcher,
    Arc<Mutex<HashMap<String, Instant>>>,
) {
    use notify::{EventKind, RecursiveMode, Watcher};
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let s2 = seen.clone();
    let mut w = notify::recommended_watcher(move |r: notify::Result<notify::Event>| {
        let now = Instant::now();
        if let Ok(ev) = r
            && matches!(ev.kind, EventKind::Create(_) | EventKind::Modify(_))
        {
            let mut g = s2.lock().unwrap();
            for p in ev.paths {
                if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                    g.entry(n.to_string()).or_insert(now);
                }
            }
        }
    })
    .unwrap();
    w.watch(dir, RecursiveMode::NonRecursive).unwrap();
    (w, seen)
}

fn run_mode(
    bin: &Path,
    mode: &'static str,
    root: &Path,
    n: usize,
    (conc, pipeline): (usize, usize),
    n_lat: usize,
) -> ModeResult {
    static RUN: AtomicUsize = AtomicUsize::new(0);
    let dir = root.join(format!("{mode}-{}", RUN.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).unwrap();
    let (_server, url) = start_server(&dir);
    let (_b, b_state) = start_agent(bin, "b", mode, &url, &dir);
    let (_a, a_state) = start_agent(bin, "a", mode, &url, &dir);
    let (_recv, rx) = start_recv(bin, &b_state);

    // Warm-up: connections, caches.
    let mut ctl = Ctl::open(&a_state);
    for seq in 0..50 {
        ctl.send(seq);
    }
    for _ in 0..50 {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("warm-up message");
    }

    // Throughput under load.
    let base = 1_000_000;
    let next = Arc::new(AtomicUsize::new(0));
    let sent_at: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; n]));
    let t0 = Instant::now();
    // `conc` requests in flight: `conc / pipeline` connections, each with `pipeline`
    // requests sent ahead of their answers.
    let handles: Vec<_> = (0..conc.div_ceil(pipeline))
        .map(|_| {
            let next = next.clone();
            let sent_at = sent_at.clone();
            let a_state = a_state.clone();
            std::thread::spawn(move || {
                let mut ctl = Ctl::open(&a_state);
                let mut outstanding = 0;
                let mut done = false;
                loop {
                    while !done && outstanding < pipeline {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            done = true;
                            break;
                        }
                        sent_at.lock().unwrap()[i] = Some(Instant::now());
                        ctl.write(base + i);
                        outstanding += 1;
                    }
                    if outstanding == 0 {
                        return;
                    }
                    ctl.read_ok();
                    outstanding -= 1;
                }
            })
        })
        .collect();
    let mut got_at = vec![None; n];
    let mut got = 0;
    let mut last = t0;
    while got < n {
        let (seq, t) = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{mode}: only {got} of {n} messages received"));
        let i = seq - base;
        if got_at[i].is_none() {
            got_at[i] = Some(t);
            got += 1;
            last = t;
        }
    }
    for h in handles {
        h.join().unwrap();
    }
    let elapsed = last - t0;
    let sent_at = sent_at.lock().unwrap();
    let mut lat: Vec<Duration> = (0..n)
        .map(|i| got_at[i].unwrap() - sent_at[i].unwrap())
        .collect();
    let rate = n as f64 / elapsed.as_secs_f64();
    let (load_p50, load_p99) = (pct(&mut lat, 0.50), pct(&mut lat, 0.99));

    // Unloaded latency, one at a time.
    let watch = (mode == "shared-volume").then(|| watch_dir(&dir.join("shared/bench/b/new")));
    let mut idle = Vec::new();
    let mut after = Vec::new();
    let base2 = 2_000_000;
    for i in 0..n_lat {
        let t = Instant::now();
        let id = ctl.send(base2 + i);
        let (seq, r) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("latency message");
        assert_eq!(seq, base2 + i);
        idle.push(r - t);
        if let Some((_, seen)) = &watch
            && let Some(appeared) = seen.lock().unwrap().get(&id)
        {
            after.push(r.saturating_duration_since(*appeared));
        }
    }
    let after_rename = watch.map(|_| (pct(&mut after, 0.5), pct(&mut after, 0.99)));
    ModeResult {
        mode,
        rate,
        load_p50,
        load_p99,
        idle_p50: pct(&mut idle, 0.5),
        idle_p99: pct(&mut idle, 0.99),
        after_rename,
    }
}

/// Bare Unix socket ping-pong of 1 KiB messages: round trips/s, p50/p99 round trip.
fn baseline_socket(n: usize) -> (f64, Duration, Duration) {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1024];
        for _ in 0..n {
            b.read_exact(&mut buf).unwrap();
            b.write_all(&buf).unwrap();
        }
    });
    let msg = vec![7u8; 1024];
    let mut buf = vec![0u8; 1024];
    let mut lat = Vec::with_capacity(n);
    let t0 = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        a.write_all(&msg).unwrap();
        a.read_exact(&mut buf).unwrap();
        lat.push(t.elapsed());
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    echo.join().unwrap();
    (rate, pct(&mut lat, 0.5), pct(&mut lat, 0.99))
}

/// Bare write + fsync + rename + fsync(dir) of 1 KiB files, one at a time.
fn baseline_fsync(dir: &Path, n: usize) -> (f64, Duration, Duration) {
    let tmp = dir.join("tmp");
    let new = dir.join("new");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::create_dir_all(&new).unwrap();
    let msg = vec![7u8; 1024];
    let mut lat = Vec::with_capacity(n);
    let t0 = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let p = tmp.join(i.to_string());
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(&msg).unwrap();
        f.sync_all().unwrap();
        std::fs::rename(&p, new.join(i.to_string())).unwrap();
        std::fs::File::open(&new).unwrap().sync_all().unwrap();
        lat.push(t.elapsed());
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    (rate, pct(&mut lat, 0.5), pct(&mut lat, 0.99))
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects modes.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let n = env_usize("BENCH_MESSAGES", 20_000);
    let conc = env_usize("BENCH_CONCURRENCY", 128);
    let pipeline = env_usize("BENCH_PIPELINE", 1).clamp(1, conc);
    let n_lat = env_usize("BENCH_LATENCY_MESSAGES", 300);
    let root = match std::env::var_os("BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir_in("/var/tmp").unwrap(),
    };
    println!(
        "relay bench: {n} messages of 1 KiB, {conc} sends in flight ({} connections x {pipeline} pipelined); latency runs of {n_lat}; dir {}",
        conc.div_ceil(pipeline),
        root.path().display()
    );
    let (sr, s50, s99) = baseline_socket(20_000);
    println!(
        "baseline unix socket ping-pong (1 KiB):    {sr:>9.0} round trips/s   p50 {} ms  p99 {} ms",
        ms(s50),
        ms(s99)
    );
    let (fr, f50, f99) = baseline_fsync(&root.path().join("baseline"), 500);
    println!(
        "baseline write+fsync+rename+fsync(dir):    {fr:>9.0} files/s         p50 {} ms  p99 {} ms",
        ms(f50),
        ms(f99)
    );
    let compare = std::env::var_os("BENCH_COMPARE_BIN").map(PathBuf::from);
    let mut bins = vec![("", agent_bin())];
    if let Some(old) = compare {
        println!("old = {}", old.display());
        bins.push(("old ", old));
    }
    for mode in ["shared-volume", "ipc", "tcp"] {
        if !filter.is_empty() && !filter.iter().any(|f| mode.contains(f.as_str())) {
            continue;
        }
        for (label, bin) in &bins {
            let r = run_mode(bin, mode, root.path(), n, (conc, pipeline), n_lat);
            println!(
                "{label}{:<14} {:>8.0} msg/s  under load: p50 {} ms p99 {} ms  |  one at a time: p50 {} ms p99 {} ms{}",
                r.mode,
                r.rate,
                ms(r.load_p50),
                ms(r.load_p99),
                ms(r.idle_p50),
                ms(r.idle_p99),
                r.after_rename
                    .map(|(a, b)| format!(
                        "  |  after the rename: p50 {} ms p99 {} ms",
                        ms(a),
                        ms(b)
                    ))
                    .unwrap_or_default()
            );
        }
    }
}
