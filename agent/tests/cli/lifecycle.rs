//! Registration lifecycle against the real dns-server: visible after registration, SIGTERM
//! deregisters at once, SIGKILL leaves the membrane to go stale, a registry restarted with
//! an empty data directory gets the membrane back within a heartbeat, systemd notifications.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::support::*;

#[test]
fn registered_membrane_is_visible_with_its_registration() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), 0, &[]);
    let mut args = quick("visual-worker-1", "cognitive-system", &server.url());
    args.extend(
        [
            "--parent",
            "perception",
            "--tag",
            "gpu",
            "--meta",
            "version=1.2",
        ]
        .map(String::from),
    );
    let agent = Agent::start(&args, &tmp.path().join("a"), &[]);
    let status = agent.wait_registered();
    assert_eq!(status["registration"]["server_reachable"], true);
    assert_eq!(status["registration"]["ttl_seconds"], 3);

    let m = server
        .membrane("cognitive-system", "visual-worker-1")
        .expect("registered");
    assert_eq!(m["state"], "passing");
    assert_eq!(m["parent"], "perception");
    assert_eq!(m["services"][0]["port"], 7100);
    assert_eq!(m["capabilities"][0], "vision");
    assert_eq!(m["metadata"]["version"], "1.2");
    assert_eq!(m["ttl_seconds"], 3);
    // No --address: the route address to the registry (loopback here).
    assert_eq!(m["addresses"][0], "127.0.0.1");
    assert_eq!(m["endpoint"]["mode"], "shared-volume");

    let out = agent.cli(&["list", "--service", "visual"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["cached"], false);
    assert_eq!(v["membranes"][0]["membrane_id"], "visual-worker-1");
    assert_eq!(v["membranes"][0]["parent_membrane"], "perception");
    assert_eq!(v["membranes"][0]["status"], "passing");
    let out = agent.cli(&["list", "--capability", "nothing-has-this"]);
    assert_eq!(json(&out)["membranes"].as_array().unwrap().len(), 0);
    let out = agent.cli(&["discover", "visual-worker-1"]);
    assert_eq!(json(&out)["membrane"]["namespace_name"], "cognitive-system");
    let out = agent.cli(&["discover", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not registered"), "{}", stderr(&out));

    // Heartbeats keep it alive past the TTL.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        server
            .membrane("cognitive-system", "visual-worker-1")
            .unwrap()["state"],
        "passing"
    );
    let s = agent.status().unwrap();
    assert!(
        s["registration"]["heartbeats"].as_u64().unwrap() >= 3,
        "{s}"
    );
}

#[test]
fn sigterm_deregisters_at_once_and_notifies_systemd() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), 0, &[]);
    let sock_path = tmp.path().join("notify.sock");
    let notify = UnixDatagram::bind(&sock_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let agent = Agent::start(
        &quick("w1", "cog", &server.url()),
        &tmp.path().join("a"),
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let t0 = Instant::now();
    while !(seen.contains("READY=1") && seen.matches("WATCHDOG=1").count() >= 2) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "notifications so far: {seen:?}"
        );
        let n = notify.recv(&mut buf).expect("sd_notify datagram");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        server.membrane("cog", "w1").is_some(),
        "READY is sent after registration"
    );

    let (code, took) = agent.terminate(Duration::from_secs(10));
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(
        server.membrane("cog", "w1").is_none(),
        "deregistered before exiting"
    );
    let mut rest = String::new();
    notify
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    while let Ok(n) = notify.recv(&mut buf) {
        rest.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(rest.contains("STOPPING=1"), "{rest:?}");
    // The activity log tells the story.
    let out = run_agent(&["log", "--state-dir", tmp.path().join("a").to_str().unwrap()]);
    let log = String::from_utf8_lossy(&out.stdout).to_string();
    for ev in [
        "\"started\"",
        "\"registered\"",
        "\"signal\"",
        "\"deregistered\"",
        "\"stopped\"",
    ] {
        assert!(log.contains(ev), "{ev} missing from {log}");
    }
    for line in log.lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("JSON lines");
    }
}

#[test]
fn sigkill_leaves_the_membrane_to_go_stale_after_its_ttl() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), 0, &[]);
    let agent = Agent::start(
        &quick("w1", "cog", &server.url()),
        &tmp.path().join("a"),
        &[],
    );
    agent.wait_registered();
    let killed = Instant::now();
    agent.kill();
    assert_eq!(server.membrane("cog", "w1").unwrap()["state"], "passing");
    wait_for("stale", Duration::from_secs(8), || {
        (server.membrane("cog", "w1")?["state"] == "stale").then_some(())
    });
    let after = killed.elapsed();
    // TTL 3 s counted from the last heartbeat (at most ~1.1 s before the kill).
    assert!(
        after >= Duration::from_millis(1500),
        "stale after only {after:?}"
    );
}

#[test]
fn registry_restarted_empty_gets_the_membrane_back_within_a_heartbeat() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, 0, &[]);
    let port = server.port;
    // Retries at most 1 s apart while the registry is away (however long its restart
    // takes on a slow machine).
    let mut args = quick("w1", "cog", &server.url());
    let at = args.iter().position(|a| a == "--max-backoff").unwrap();
    args[at + 1] = "1s".into();
    let agent = Agent::start(&args, &tmp.path().join("a"), &[]);
    agent.wait_registered();
    server.stop();
    std::fs::remove_dir_all(&data).unwrap();
    let server = Server::start(&data, port, &[]);
    let up = Instant::now();
    assert!(
        server.membrane("cog", "w1").is_none(),
        "the new registry starts empty"
    );
    wait_for("re-registration", Duration::from_secs(5), || {
        server.membrane("cog", "w1")
    });
    let took = up.elapsed();
    // Heartbeat 1 s (+10 % jitter) and at most one 1 s retry while the registry was away.
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    let s = agent.wait_registered();
    assert!(
        s["registration"]["registrations"].as_u64().unwrap() >= 2,
        "{s}"
    );
    // The secret answered by the new registry works: a clean stop deregisters.
    let (code, _) = agent.terminate(Duration::from_secs(10));
    assert_eq!(code, Some(0));
    assert!(server.membrane("cog", "w1").is_none());
}

#[test]
fn agent_restart_keeps_its_membrane_through_the_persisted_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), 0, &["--admin-token", ADMIN_TOKEN]);
    let join = create_namespace(&server, "cog");
    let mut args = quick("w1", "cog", &server.url());
    args.extend(["--token".to_string(), join]);
    let dir = tmp.path().join("a");
    let agent = Agent::start(&args, &dir, &[]);
    agent.wait_registered();
    agent.kill();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.join("secret.json"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // Still registered (SIGKILL); the restarted agent proves ownership with the secret.
    let agent = Agent::start(&args, &dir, &[]);
    let s = agent.wait_registered();
    assert_eq!(s["registration"]["last_error"], serde_json::Value::Null);
    // Another agent without the secret cannot take the id over.
    let other = tmp.path().join("b");
    let intruder = Agent::start(&args, &other, &[]);
    let st = intruder.wait(Duration::from_secs(10));
    assert_eq!(st.code(), Some(1));
    let log = std::fs::read_to_string(other.with_extension("stderr.log")).unwrap();
    assert!(
        log.contains("403") && log.contains("X-Membrane-Secret"),
        "{log}"
    );
    assert!(log.contains("--state-dir"), "hint: {log}");
    // The owner is unaffected and deregisters cleanly.
    let (code, _) = agent.terminate(Duration::from_secs(10));
    assert_eq!(code, Some(0));
    assert!(server.membrane("cog", "w1").is_none());
}

#[test]
fn control_commands_deregister_register_and_heartbeat() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), 0, &[]);
    let agent = Agent::start(
        &quick("w1", "cog", &server.url()),
        &tmp.path().join("a"),
        &[],
    );
    agent.wait_registered();
    let out = agent.cli(&["deregister"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(server.membrane("cog", "w1").is_none());
    assert_eq!(
        agent.status().unwrap()["registration"]["phase"],
        "deregistered"
    );
    let out = agent.cli(&["heartbeat"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not registered"), "{}", stderr(&out));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(server.membrane("cog", "w1").is_none(), "stays deregistered");
    let out = agent.cli(&["register", "--parent", "root"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["membrane"]["parent_membrane"], "root");
    assert_eq!(server.membrane("cog", "w1").unwrap()["parent"], "root");
    let out = agent.cli(&["heartbeat"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["heartbeat"], "ok");
    let out = agent.cli(&["register", "--no-parent"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        server
            .membrane("cog", "w1")
            .unwrap()
            .get("parent")
            .is_none()
    );
}

#[test]
fn log_follow_prints_new_activity() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), 0, &[]);
    let agent = Agent::start(
        &quick("w1", "cog", &server.url()),
        &tmp.path().join("a"),
        &[],
    );
    agent.wait_registered();
    let mut follower = std::process::Command::new(agent_bin())
        .args(["log", "--follow", "-n", "1", "--state-dir"])
        .arg(&agent.state_dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("last line first");
    assert!(!first.contains("\"deregistered\""), "{first}");
    assert!(agent.cli(&["deregister"]).status.success());
    let t0 = Instant::now();
    let line = loop {
        let l = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("a new line while following");
        if l.contains("\"deregistered\"") {
            break l;
        }
        assert!(t0.elapsed() < Duration::from_secs(5));
    };
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["event"], "deregistered");
    let _ = follower.kill();
    let _ = follower.wait();
}

/// Open registry (no tokens): a second agent with the same id is refused instead of
/// silently taking the membrane (and its messages) over; `--replace` takes it over on
/// purpose; the real agent's restart (same state dir, same secret) is never refused.
#[test]
fn open_registry_refuses_a_second_agent_with_the_same_id_unless_replace() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, 0, &[]);
    let port = server.port;
    server.stop();
    let mut args = quick("w1", "cog", &format!("http://127.0.0.1:{port}"));
    let dir = tmp.path().join("a");
    let agent = Agent::start(&args, &dir, &[]);
    // The agent picks (and keeps) its instance secret before its first registration, so a
    // retry after a lost answer is the same instance; the registry adopts it.
    let secret = || -> Option<String> {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("secret.json")).ok()?).ok()?;
        v["secret"].as_str().map(String::from)
    };
    let picked = wait_for("secret picked", Duration::from_secs(5), secret);
    assert_eq!(picked.len(), 64, "{picked}");
    let server = Server::start(&data, port, &[]);
    agent.wait_registered();
    assert_eq!(secret().as_deref(), Some(picked.as_str()));
    let first = server.membrane("cog", "w1").unwrap()["registered_at"].clone();
    agent.kill();
    // Restarted with its state dir: the same instance, registered again without a fight.
    let agent = Agent::start(&args, &dir, &[]);
    let s = agent.wait_registered();
    assert_eq!(s["registration"]["last_error"], serde_json::Value::Null);

    // Another agent, another state dir: refused with 409 naming the id, exits 1.
    let other = tmp.path().join("b");
    args.extend(["--address".to_string(), "192.0.2.99".to_string()]);
    let intruder = Agent::start(&args, &other, &[]);
    let st = intruder.wait(Duration::from_secs(10));
    assert_eq!(st.code(), Some(1));
    let log = std::fs::read_to_string(other.with_extension("stderr.log")).unwrap();
    assert!(
        log.contains("409") && log.contains("w1") && log.contains("--replace"),
        "{log}"
    );
    let m = server.membrane("cog", "w1").unwrap();
    assert_eq!(m["addresses"][0], "127.0.0.1", "taken over: {m}");
    assert_eq!(m["registered_at"], first);

    // --replace: taken over on purpose.
    args.push("--replace".into());
    let replacer = Agent::start(&args, &other, &[]);
    replacer.wait_registered();
    wait_for("takeover", Duration::from_secs(5), || {
        (server.membrane("cog", "w1")?["addresses"][0] == "192.0.2.99").then_some(())
    });
    drop(agent);
    let (code, _) = replacer.terminate(Duration::from_secs(10));
    assert_eq!(code, Some(0));
    assert!(server.membrane("cog", "w1").is_none());
}

#[test]
fn restart_right_after_kill_9_starts_and_a_second_agent_on_the_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), 0, &[]);
    let dir = tmp.path().join("a");
    let args = quick("w1", "cog", &server.url());
    let mut agent = Agent::start(&args, &dir, &[]);
    agent.wait_registered();
    // A second agent on the same state directory: refused, the first one goes on.
    let mut second = Agent::start(&args, &dir, &[]);
    let st = wait_for("second agent exits", Duration::from_secs(10), || {
        second.exited()
    });
    assert!(!st.success());
    assert!(
        second.log().contains("another agent is already running"),
        "{}",
        second.log()
    );
    assert!(agent.status().is_some());
    // `kill -9` returns before the process is gone: the next agent starts anyway.
    for round in 0..8 {
        agent.kill_nowait();
        let mut next = Agent::start(&args, &dir, &[]);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            next.exited().is_none(),
            "round {round}: restart failed: {}",
            next.log()
        );
        next.wait_registered();
        drop(agent);
        agent = next;
    }
}

/// The agent run in a user, network and mount namespace whose only name server is routed
/// into the loopback and never answers: every name lookup hangs for 20 s (the container
/// case). `None` (after a loud message) when namespaces are not available here.
fn agent_with_a_silent_resolver(args: &[String], dir: &std::path::Path) -> Option<Agent> {
    let probe = std::process::Command::new("unshare")
        .args(["-rnm", "ip", "link", "set", "lo", "up"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var("CI").is_err(),
            "unshare -rnm and ip (util-linux, iproute2) are needed"
        );
        eprintln!("SKIP: no user/network namespaces here (unshare -rnm, ip)");
        return None;
    }
    std::fs::create_dir_all(dir).unwrap();
    let resolv = dir.with_extension("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 10.1.2.3\noptions timeout:10 attempts:1\n",
    )
    .unwrap();
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-rnm", "sh", "-c"]).arg(format!(
        "ip link set lo up && ip route add 10.1.2.3/32 dev lo && \
         mount --bind {} /etc/resolv.conf && exec \"$0\" \"$@\"",
        resolv.display()
    ));
    cmd.arg(agent_bin());
    Some(Agent::start_in(cmd, args, dir, &[]))
}

#[test]
fn sigterm_exits_at_once_while_a_name_lookup_hangs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let mut args = quick("w1", "cog", "http://registry.test:8080");
    args.extend(["--shutdown-grace".into(), "1s".into()]);
    let Some(agent) = agent_with_a_silent_resolver(&args, &dir) else {
        return;
    };
    wait_for(
        "the agent tries to register",
        Duration::from_secs(10),
        || agent.log().contains("agent starting").then_some(()),
    );
    std::thread::sleep(Duration::from_millis(500)); // the lookup is pending now
    let (_, took) = agent.terminate(Duration::from_secs(30));
    let log = std::fs::read_to_string(dir.with_extension("stderr.log")).unwrap();
    assert!(log.contains("agent stopped"), "{log}");
    assert!(
        took < Duration::from_secs(4),
        "exit took {took:?} after SIGTERM (grace 1 s): {log}"
    );
}
