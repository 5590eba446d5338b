//! Message relay between two real agents (`send`, `recv`, `log`) in each mode, usage errors,
//! direct delivery without a daemon, and the crash test: SIGKILL of the receiving and of the
//! sending agent in the middle of a stream of 10,000 messages, every message received once.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shared::envelope::MessageId;

use crate::support::*;

#[derive(Clone, Copy, Debug)]
pub(crate) enum Mode {
    Shared,
    Ipc,
    Tcp,
}

const MODES: [Mode; 3] = [Mode::Shared, Mode::Ipc, Mode::Tcp];

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `agent run` flags of membrane `id` in `mode`.
pub(crate) fn flags(
    id: &str,
    parent: Option<&str>,
    mode: Mode,
    url: &str,
    dir: &Path,
) -> Vec<String> {
    let mut f = quick(id, "relay", url);
    if let Some(p) = parent {
        f.extend(["--parent".into(), p.into()]);
    }
    match mode {
        Mode::Shared => f.extend([
            "--mode".into(),
            "shared-volume".into(),
            "--shared-dir".into(),
            dir.join("shared").to_string_lossy().into(),
        ]),
        Mode::Ipc => f.extend(["--mode".into(), "ipc".into()]),
        Mode::Tcp => f.extend([
            "--mode".into(),
            "tcp".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", free_port()),
        ]),
    }
    f.extend(["--retry-max-backoff".into(), "500ms".into()]);
    f
}

fn recv_json(agent_dir: &Path) -> Vec<Value> {
    let out = run_agent(&[
        "recv",
        "--json",
        "--state-dir",
        &agent_dir.to_string_lossy(),
    ]);
    assert!(out.status.success(), "recv: {}", stderr(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub(crate) fn events(agent_dir: &Path, event: &str) -> usize {
    std::fs::read_to_string(agent_dir.join("activity.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&format!("\"event\":\"{event}\"")))
        .count()
}

#[test]
fn send_and_recv_between_two_agents_in_each_mode() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    for mode in MODES {
        let d = dir.path().join(format!("{mode:?}"));
        let a = Agent::start(
            &flags("a", None, mode, &server.url(), &d),
            &d.join("a"),
            &[],
        );
        let b = Agent::start(
            &flags("b", Some("a"), mode, &server.url(), &d),
            &d.join("b"),
            &[],
        );
        a.wait_registered();
        b.wait_registered();

        let out = a.cli(&["send", "b", &format!("hello {mode:?}"), "--wait", "--debug"]);
        assert!(out.status.success(), "{mode:?}: {}", stderr(&out));
        let v = json(&out);
        assert_eq!(v["status"], "delivered");
        assert_eq!(v["to"][0], "b");
        let err = stderr(&out);
        assert!(err.contains("route to b:"), "{err}");
        let ms = recv_json(&b.state_dir);
        assert_eq!(ms.len(), 1, "{mode:?}: {ms:?}");
        assert_eq!(ms[0]["body"], format!("hello {mode:?}"));
        assert_eq!(ms[0]["from"], "a");
        assert_eq!(ms[0]["id"], v["ids"][0]);
        assert!(
            recv_json(&b.state_dir).is_empty(),
            "taken messages are not printed again"
        );

        // parent, children, service targets.
        let out = b.cli(&["send", "parent", "to mum", "--wait"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let out = a.cli(&["send", "children", "to kids", "--wait"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let out = a.cli(&[
            "send",
            "_visual._tcp",
            "to a visual instance",
            "--wait",
            "--debug",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stderr(&out).contains("chose b"), "{}", stderr(&out));
        let got_a: Vec<String> = recv_json(&a.state_dir)
            .iter()
            .map(|m| m["body"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(got_a, ["to mum"]);
        let got_b: Vec<String> = recv_json(&b.state_dir)
            .iter()
            .map(|m| m["body"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(got_b, ["to kids", "to a visual instance"], "oldest first");

        // Text output of recv.
        let out = a.cli(&["send", "b", "line one", "--wait"]);
        assert!(out.status.success());
        let out = b.cli(&["recv"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with("--- ")
                && text.contains(" from a at ")
                && text.ends_with("line one\n"),
            "{text}"
        );

        // The activity log has every send and receive.
        assert!(events(&a.state_dir, "sent") >= 4);
        assert!(events(&a.state_dir, "delivered") >= 4);
        assert!(events(&b.state_dir, "received") >= 4, "{mode:?}");
        assert!(events(&b.state_dir, "taken") >= 4);
        let log = b.cli(&["log"]);
        assert!(String::from_utf8_lossy(&log.stdout).contains("\"event\":\"taken\""));
        a.terminate(Duration::from_secs(10));
        b.terminate(Duration::from_secs(10));
    }
}

#[test]
fn send_usage_errors_and_direct_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let d = dir.path();
    let b = Agent::start(
        &flags("b", None, Mode::Ipc, &server.url(), d),
        &d.join("b"),
        &[],
    );
    let a = Agent::start(
        &[
            flags("a", None, Mode::Shared, &server.url(), d),
            vec!["--max-message-size".into(), "1KiB".into()],
        ]
        .concat(),
        &d.join("a"),
        &[],
    );
    a.wait_registered();
    b.wait_registered();
    let code = |out: &std::process::Output| out.status.code();
    // Bad labels cannot name a path: usage error.
    for bad in ["../b", "b/../../x", "_x/y._tcp"] {
        let out = a.cli(&["send", bad, "x"]);
        assert_eq!(code(&out), Some(64), "{bad}: {}", stderr(&out));
    }
    let out = a.cli(&["send", "b", "x", "--all"]);
    assert_eq!(code(&out), Some(64), "{}", stderr(&out));
    // Too large for the agent's limit (1 KiB), and for an explicit limit.
    let big = "x".repeat(2000);
    let out = a.cli(&["send", "b", &big]);
    assert_eq!(code(&out), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("over the agent's limit of 1024 bytes"),
        "{}",
        stderr(&out)
    );
    let out = a.cli(&["send", "b", "12345", "--max-message-size", "4"]);
    assert_eq!(code(&out), Some(64));
    // Unknown target: failure.
    let out = a.cli(&["send", "nobody", "x"]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("not registered"), "{}", stderr(&out));

    // Without a running agent: direct delivery, loud failure.
    a.terminate(Duration::from_secs(10));
    let url = server.url();
    let adir = d.join("a").to_string_lossy().to_string();
    let out = run_agent(&[
        "send",
        "b",
        "direct",
        "--state-dir",
        &adir,
        "--registry-url",
        &url,
        "--debug",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["route"], "direct");
    assert!(stderr(&out).contains("direct delivery"), "{}", stderr(&out));
    let ms = recv_json(&b.state_dir);
    assert_eq!(ms.len(), 1);
    assert_eq!(ms[0]["body"], "direct");
    b.terminate(Duration::from_secs(10));
    let out = run_agent(&[
        "send",
        "b",
        "nobody home",
        "--state-dir",
        &adir,
        "--registry-url",
        &url,
    ]);
    assert_eq!(code(&out), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("delivery failed"), "{}", stderr(&out));
}

/// A control-socket client that sends `ids[i]` with body `m{i}`, retrying (same id) across
/// agent restarts until the agent confirms the message is spooled.
/// Sends `items` through the control socket, counting acknowledgements in `acked`; waits
/// while `acked` is at `gate` or above (so a crash test's kills happen at their marks, not
/// after a fast stream has already ended).
fn sender_thread(
    socket: PathBuf,
    items: Vec<(usize, MessageId)>,
    acked: Arc<AtomicUsize>,
    gate: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut conn: Option<(UnixStream, BufReader<UnixStream>)> = None;
        for (i, id) in items {
            loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                if acked.load(Ordering::Relaxed) >= gate.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                if conn.is_none() {
                    match UnixStream::connect(&socket) {
                        Ok(s) => {
                            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                            let r = BufReader::new(s.try_clone().unwrap());
                            conn = Some((s, r));
                        }
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                    }
                }
                let (w, r) = conn.as_mut().unwrap();
                let req = json!({"cmd": "send", "to": "b", "body": format!("m{i}"), "id": id.to_string()});
                let mut line = String::new();
                let ok = writeln!(w, "{req}").is_ok()
                    && r.read_line(&mut line).is_ok_and(|n| n > 0)
                    && serde_json::from_str::<Value>(&line).is_ok_and(|v| v["ok"] == true);
                if ok {
                    acked.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                conn = None;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    })
}

fn crash_test(mode: Mode) {
    const N: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), 0, &[]);
    let d = dir.path();
    let b_flags = flags("b", None, mode, &server.url(), d);
    let a_flags = flags("a", None, mode, &server.url(), d);
    let mut b = Agent::start(&b_flags, &d.join("b"), &[]);
    b.wait_registered();
    let mut a = Agent::start(&a_flags, &d.join("a"), &[]);
    a.wait_registered();

    let base = 1_700_000_000_000u64;
    let ids: Vec<MessageId> = (0..N)
        .map(|i| MessageId::from_parts(base + i as u64, 0xabc0_0000 + i as u128))
        .collect();
    let acked = Arc::new(AtomicUsize::new(0));
    // Senders pause at each kill's mark until the kill is under way.
    let gate = Arc::new(AtomicUsize::new(N * 3 / 10));
    let stop = Arc::new(AtomicBool::new(false));
    let threads = 24;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let items: Vec<(usize, MessageId)> = (0..N)
                .filter(|i| i % threads == t)
                .map(|i| (i, ids[i]))
                .collect();
            sender_thread(
                a.state_dir.join("control.sock"),
                items,
                acked.clone(),
                gate.clone(),
                stop.clone(),
            )
        })
        .collect();

    let mut received: Vec<String> = Vec::new();
    let take = |received: &mut Vec<String>| {
        for m in recv_json(&d.join("b")) {
            let i: usize = m["body"].as_str().unwrap()[1..].parse().unwrap();
            assert_eq!(m["id"], ids[i].to_string(), "body and id match");
            received.push(m["id"].as_str().unwrap().to_string());
        }
    };
    let t0 = Instant::now();
    let mut killed_b = false;
    let mut killed_a = false;
    while acked.load(Ordering::Relaxed) < N {
        assert!(
            t0.elapsed() < Duration::from_secs(240),
            "stream stalled at {}",
            acked.load(Ordering::Relaxed)
        );
        let n = acked.load(Ordering::Relaxed);
        if !killed_b && n >= N * 3 / 10 {
            gate.store(N * 6 / 10, Ordering::Relaxed);
            b.kill();
            take(&mut received); // the membrane reads while its agent is down
            std::thread::sleep(Duration::from_millis(300));
            b = Agent::start(&b_flags, &d.join("b"), &[]);
            killed_b = true;
        } else if !killed_a && n >= N * 6 / 10 {
            gate.store(usize::MAX, Ordering::Relaxed);
            a.kill();
            std::thread::sleep(Duration::from_millis(300));
            a = Agent::start(&a_flags, &d.join("a"), &[]);
            killed_a = true;
        } else {
            take(&mut received);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    for h in handles {
        h.join().unwrap();
    }
    assert!(killed_a && killed_b);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        take(&mut received);
        let distinct: BTreeSet<&String> = received.iter().collect();
        if distinct.len() >= N || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Let late retries land, then read once more: they must be dropped, not printed.
    std::thread::sleep(Duration::from_millis(1500));
    take(&mut received);
    let mut counts: HashMap<&String, usize> = HashMap::new();
    for r in &received {
        *counts.entry(r).or_default() += 1;
    }
    let dups: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).take(5).collect();
    assert!(
        dups.is_empty(),
        "{mode:?}: printed more than once: {dups:?}"
    );
    let expected: BTreeSet<String> = ids.iter().map(|i| i.to_string()).collect();
    let got: BTreeSet<String> = received.iter().cloned().collect();
    let missing: Vec<_> = expected.difference(&got).take(5).collect();
    if !missing.is_empty() {
        let tail = |s: String| {
            s.lines()
                .filter(|l| !l.contains("heartbeat ok"))
                .take(60)
                .collect::<Vec<_>>()
                .join("\n")
        };
        eprintln!(
            "--- status of a: {:?}\n--- a log (without heartbeats):\n{}\n--- b log:\n{}",
            a.status().map(|s| s["relay"].clone()),
            tail(a.log()),
            tail(b.log())
        );
    }
    assert!(
        missing.is_empty(),
        "{mode:?}: {} of {N} missing, e.g. {missing:?}",
        expected.len() - got.len()
    );
    assert_eq!(received.len(), N);
    eprintln!(
        "{mode:?}: {N} messages in {:?}; restarted sender: {:?}",
        t0.elapsed(),
        a.log().lines().find(|l| l.contains("re-queued")),
    );
    stop.store(true, Ordering::Relaxed);
    drop(a);
    drop(b);
}

#[test]
fn sigkill_receiver_and_sender_mid_stream_shared_volume() {
    crash_test(Mode::Shared);
}

#[test]
fn sigkill_receiver_and_sender_mid_stream_ipc() {
    crash_test(Mode::Ipc);
}

#[test]
fn sigkill_receiver_and_sender_mid_stream_tcp() {
    crash_test(Mode::Tcp);
}
