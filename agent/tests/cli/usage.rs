//! Bad input: usage and configuration errors exit 64 naming the flag; runtime failures
//! (refused registration, non-registry URL, no agent) exit 1 with the reason.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use crate::support::*;

#[test]
fn usage_errors_exit_64_and_name_the_flag() {
    for (args, needle) in [
        (
            vec!["run", "--namespace", "cog", "--registry-url", "http://r:1"],
            "--id",
        ),
        (
            vec!["run", "--id", "w", "--registry-url", "http://r:1"],
            "--namespace",
        ),
        (
            vec!["run", "--id", "w", "--namespace", "cog"],
            "--registry-url",
        ),
        (
            vec![
                "run",
                "--id",
                "bad_id",
                "--namespace",
                "cog",
                "--registry-url",
                "http://r:1",
            ],
            "--id",
        ),
        (
            vec![
                "run",
                "--id",
                "w",
                "--namespace",
                "c.o.g",
                "--registry-url",
                "http://r:1",
            ],
            "--namespace",
        ),
        (
            vec![
                "run",
                "--id",
                "w",
                "--namespace",
                "cog",
                "--registry-url",
                "http://r:1",
                "--service",
                "visual:tcp",
            ],
            "--service",
        ),
        (
            vec![
                "run",
                "--id",
                "w",
                "--namespace",
                "cog",
                "--registry-url",
                "http://r:1",
                "--service",
                "visual:tcp:99999",
            ],
            "--service",
        ),
        (
            vec![
                "run",
                "--id",
                "w",
                "--namespace",
                "cog",
                "--registry-url",
                "https://r:1",
            ],
            "--registry-ca",
        ),
        (
            vec![
                "run",
                "--id",
                "w",
                "--namespace",
                "cog",
                "--registry-url",
                "http://r:1",
                "--capability",
                "Not Valid",
            ],
            "--capability",
        ),
        (vec!["run", "--bogus-flag"], "--bogus-flag"),
        (
            vec!["list", "--service", "bad_service", "--state-dir", "/tmp"],
            "--service",
        ),
        (vec!["frobnicate"], "frobnicate"),
        (
            vec![
                "run",
                "--id",
                "w",
                "--namespace",
                "cog",
                "--registry-url",
                "http://r:1",
                "--state-dir",
                "/proc/no/such/dir",
            ],
            "--state-dir",
        ),
    ] {
        let mut a = args.clone();
        if a[0] == "run" && !a.contains(&"--state-dir") {
            a.extend(["--state-dir", "/tmp/agent-usage-test"]);
        }
        let out = run_agent(&a);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn environment_variables_configure_run() {
    let out = run_agent_env(
        &["run", "--state-dir", "/tmp/agent-usage-test"],
        &[
            ("MEMBRANE_ID", "w"),
            ("MEMBRANE_NAMESPACE", "cog"),
            ("MEMBRANE_REGISTRY_URL", "http://r:1,ftp://x"),
        ],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("--registry-url") && stderr(&out).contains("ftp://x"),
        "{}",
        stderr(&out)
    );
    let out = run_agent_env(
        &["run", "--state-dir", "/tmp/agent-usage-test"],
        &[
            ("MEMBRANE_ID", "w"),
            ("MEMBRANE_NAMESPACE", "cog"),
            ("MEMBRANE_REGISTRY_URL", "http://r:1"),
            ("MEMBRANE_SERVICES", "a:tcp:1,b:udp"),
        ],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("--service") && stderr(&out).contains("b:udp"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn help_explains_itself() {
    let out = run_agent(&["run", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let h = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "STATE_DIRECTORY",
        "XDG_RUNTIME_DIR",
        "MEMBRANE_REGISTRY_URL",
        "NAME:PROTO:PORT",
        "--heartbeat-interval",
        "route",
    ] {
        assert!(h.contains(needle), "{needle} missing from run --help");
    }
    let out = run_agent(&["--help"]);
    let h = String::from_utf8_lossy(&out.stdout);
    assert!(h.contains("Exit codes") && h.contains("discover"), "{h}");
    // --timeout takes a duration (a bare number is refused): the help says so.
    let out = run_agent(&["status", "--help"]);
    let h = String::from_utf8_lossy(&out.stdout);
    assert!(h.contains("e.g. 30s") && !h.contains("Seconds"), "{h}");
}

#[test]
fn wrong_token_is_refused_with_the_servers_message() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), 0, &["--admin-token", ADMIN_TOKEN]);
    let join = create_namespace(&server, "cog");
    let mut args = quick("w1", "cog", &server.url());
    args.extend(["--token", "not-the-token"].map(String::from));
    let agent = Agent::start(&args, &tmp.path().join("a"), &[]);
    let st = agent.wait(Duration::from_secs(10));
    assert_eq!(st.code(), Some(1));
    let log = std::fs::read_to_string(tmp.path().join("a.stderr.log")).unwrap();
    assert!(log.contains("join token"), "the server's message: {log}");
    assert!(log.contains("--token"), "names the flag: {log}");
    // The namespace's join token works.
    let mut args = quick("w1", "cog", &server.url());
    args.extend(["--token".to_string(), join]);
    let agent = Agent::start(&args, &tmp.path().join("b"), &[]);
    agent.wait_registered();
}

/// A state directory another user (not root) owns: `agent run` stops with exit 64 naming
/// it (that user could read its secret or swap its files).
#[test]
fn a_state_directory_of_another_user_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        // chown needs root (CI runs as root).
        assert!(std::env::var("CI").is_err(), "needs root on CI");
        eprintln!("SKIP a_state_directory_of_another_user_is_refused: needs root to chown");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("a");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(65_534), Some(65_534)).unwrap();
    let agent = Agent::start(&quick("w1", "cog", "http://127.0.0.1:9"), &state, &[]);
    let st = agent.wait(Duration::from_secs(10));
    assert_eq!(st.code(), Some(64));
    let log = std::fs::read_to_string(tmp.path().join("a.stderr.log")).unwrap();
    assert!(
        log.contains("--state-dir") && log.contains("uid 65534"),
        "{log}"
    );
}

/// A state directory whose secret file is unreadable JSON: the agent does not make a new
/// secret over it (the only proof of an existing registration) but stops, naming it.
#[test]
fn a_broken_secret_file_stops_the_agent_and_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("a");
    std::fs::create_dir_all(&state).unwrap();
    let secret = state.join("secret.json");
    std::fs::write(&secret, b"{\"namespace\":\"cog\",\"id\":").unwrap();
    let agent = Agent::start(&quick("w1", "cog", "http://127.0.0.1:9"), &state, &[]);
    let st = agent.wait(Duration::from_secs(10));
    assert_eq!(st.code(), Some(1));
    let log = std::fs::read_to_string(tmp.path().join("a.stderr.log")).unwrap();
    assert!(
        log.contains("secret.json") && log.contains("is not an instance secret"),
        "{log}"
    );
    assert_eq!(
        std::fs::read(&secret).unwrap(),
        b"{\"namespace\":\"cog\",\"id\":",
        "kept as it was"
    );
}

#[test]
fn a_url_that_is_not_a_registry_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { break };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let body = "<html>not here</html>";
            let _ = write!(
                s,
                "HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        &quick("w1", "cog", &format!("http://127.0.0.1:{port}")),
        &tmp.path().join("a"),
        &[],
    );
    let st = agent.wait(Duration::from_secs(10));
    assert_eq!(st.code(), Some(1));
    let log = std::fs::read_to_string(tmp.path().join("a.stderr.log")).unwrap();
    assert!(
        log.contains("does not answer like a membrane registry"),
        "{log}"
    );
    assert!(log.contains("--registry-url"), "{log}");
}

#[test]
fn unreachable_registry_keeps_the_agent_running_and_falls_over_to_the_next_url() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        &quick("w1", "cog", "http://127.0.0.1:1"),
        &tmp.path().join("a"),
        &[],
    );
    let s = wait_for("a failed attempt", Duration::from_secs(10), || {
        let s = agent.status()?;
        (s["registration"]["failures"].as_u64()? >= 2).then_some(s)
    });
    assert_eq!(s["registration"]["registered"], false);
    assert_eq!(s["registration"]["server_reachable"], false);
    assert!(
        s["registration"]["last_error"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1:1"),
        "{s}"
    );
    let (code, took) = agent.terminate(Duration::from_secs(10));
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(2), "{took:?}");

    // First URL dead, second a real registry: the agent registers through the second.
    let server = Server::start(&tmp.path().join("data"), 0, &[]);
    let urls = format!("http://127.0.0.1:1,{}", server.url());
    let agent = Agent::start(&quick("w1", "cog", &urls), &tmp.path().join("b"), &[]);
    let s = agent.wait_registered();
    assert_eq!(s["registration"]["registry_url"], server.url());
    assert!(server.membrane("cog", "w1").is_some());
}

#[test]
fn subcommands_without_an_agent_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    for cmd in ["status", "heartbeat", "deregister", "register"] {
        let out = run_agent(&[cmd, "--state-dir", dir]);
        assert_eq!(out.status.code(), Some(1), "{cmd}");
        assert!(
            stderr(&out).contains("no agent is running"),
            "{cmd}: {}",
            stderr(&out)
        );
    }
    let out = run_agent(&["status", "--state-dir", dir]);
    assert_eq!(json(&out)["agent_running"], false);
    let out = run_agent(&["discover", "--state-dir", dir]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--registry-url"), "{}", stderr(&out));
}

#[test]
fn log_reports_an_unreadable_log_and_shows_a_torn_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let path = tmp.path().join("activity.log");
    // A log that cannot be read (a directory in its place: root reads any file).
    std::fs::create_dir(&path).unwrap();
    let out = run_agent(&["log", "--state-dir", dir]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot read the activity log") && stderr(&out).contains(dir),
        "{}",
        stderr(&out)
    );
    // A torn write left bytes that are not UTF-8: the lines around them still show.
    std::fs::remove_dir(&path).unwrap();
    std::fs::write(
        &path,
        b"{\"event\":\"first\"}\n{\"event\":\"to\xe2\x82\n{\"event\":\"last\"}\n",
    )
    .unwrap();
    let out = run_agent(&["log", "--state-dir", dir]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("\"first\"") && text.contains("\"last\""),
        "{text}"
    );
    assert_eq!(text.lines().count(), 3, "{text}");
}

#[test]
fn control_socket_refuses_other_users() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "*** control_socket_refuses_other_users needs root to run a client as another uid; skipped ***"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let agent = Agent::start(&quick("w1", "cog", "http://127.0.0.1:1"), &dir, &[]);
    let sock = dir.join("control.sock");
    wait_for("control socket", Duration::from_secs(10), || {
        sock.exists().then_some(())
    });
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Open the file permissions so that only the SO_PEERCRED check stands in the way.
    for p in [tmp.path(), dir.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = std::process::Command::new(agent_bin())
        .args(["status", "--state-dir"])
        .arg(&dir)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not the agent's user"),
        "{}",
        stderr(&out)
    );
    // The agent's own user is still served.
    assert!(agent.status().is_some());
}
