//! A registry restart with agents running: after a clean stop, and after a crash, the
//! agents' event streams resume from their caches (same event epoch) instead of listing
//! the namespace again.

use std::time::Duration;

use super::harness::{DnsServer, agent, wait_for};

fn activity(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("activity.log")).unwrap_or_default()
}

#[test]
fn agents_resume_their_event_stream_across_a_clean_registry_restart() {
    resume_across(|server| assert!(server.stop().success()));
}

#[test]
fn agents_resume_their_event_stream_across_a_registry_crash() {
    // Dropped: SIGKILL, nothing of the server's shutdown runs.
    resume_across(drop);
}

fn resume_across(restart: fn(DnsServer)) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = DnsServer::start(&data);
    let url = server.url();
    let http = server.http.to_string();
    let start = |id: &str, state: &std::path::Path| {
        let args = [
            "--id",
            id,
            "--namespace",
            "fleet",
            "--registry-url",
            &url,
            "--service",
            "svc:tcp:7000",
            "--address",
            "127.0.0.1",
        ];
        agent(state, &args)
    };
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let _a = start("a", &a_dir);
    let _b = start("b", &b_dir);
    for d in [&a_dir, &b_dir] {
        wait_for("cache synced", Duration::from_secs(20), || {
            activity(d).contains("\"cache_synced\"").then_some(())
        });
    }
    wait_for("both registered", Duration::from_secs(20), || {
        let (s, v) = server.get("/v1/namespaces/fleet/membranes?state=passing");
        (s == 200 && v["membranes"].as_array().map(Vec::len) == Some(2)).then_some(())
    });
    // Let the last events reach both caches.
    std::thread::sleep(Duration::from_millis(500));

    restart(server);
    let server = DnsServer::start_on(&data, &http);
    for d in [&a_dir, &b_dir] {
        wait_for("stream resumed", Duration::from_secs(30), || {
            activity(d).contains("\"cache_resumed\"").then_some(())
        });
    }
    // A `resync` on the resumed stream would be answered by a list within a random delay
    // of at most a second (two cached membranes): give it that long to show.
    std::thread::sleep(Duration::from_millis(1500));
    for d in [&a_dir, &b_dir] {
        let log = activity(d);
        assert_eq!(
            log.matches("\"cache_synced\"").count(),
            1,
            "listed again: {log}"
        );
        assert!(!log.contains("\"cache_resync\""), "listed again: {log}");
    }
    let (s, v) = server.get("/v1/namespaces/fleet/membranes");
    assert_eq!(s, 200);
    assert_eq!(v["membranes"].as_array().map(Vec::len), Some(2), "{v}");
}
