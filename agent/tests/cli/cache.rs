//! The namespace cache: kept current by the event stream, answering `discover` and `list`
//! marked as cached when the registry is down, also after the agent restarts.

use std::time::Duration;

use crate::support::*;

fn cache_count(agent: &Agent) -> Option<u64> {
    let s = agent.status()?;
    (s["cache"]["live"] == true).then(|| s["cache"]["membranes"].as_u64().unwrap())
}

#[test]
fn events_keep_the_cache_current_and_it_answers_when_the_registry_is_down() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), 0, &[]);
    let a = Agent::start(
        &quick("alpha", "cog", &server.url()),
        &tmp.path().join("a"),
        &[],
    );
    a.wait_registered();
    wait_for(
        "cache of alpha live with 1",
        Duration::from_secs(10),
        || (cache_count(&a)? == 1).then_some(()),
    );
    // A second membrane arrives through the event stream (no polling: the agent only learns
    // it from the stream, since it lists the namespace once per connection).
    let mut bargs = quick("beta", "cog", &server.url());
    bargs.extend(["--service", "motor:udp:7200", "--parent", "alpha"].map(String::from));
    let b = Agent::start(&bargs, &tmp.path().join("b"), &[]);
    b.wait_registered();
    wait_for("beta in alpha's cache", Duration::from_secs(5), || {
        (cache_count(&a)? == 2).then_some(())
    });
    let c = Agent::start(
        &quick("gamma", "cog", &server.url()),
        &tmp.path().join("c"),
        &[],
    );
    c.wait_registered();
    wait_for("gamma in alpha's cache", Duration::from_secs(5), || {
        (cache_count(&a)? == 3).then_some(())
    });
    let (code, _) = c.terminate(Duration::from_secs(10));
    assert_eq!(code, Some(0));
    wait_for(
        "gamma gone from alpha's cache",
        Duration::from_secs(5),
        || (cache_count(&a)? == 2).then_some(()),
    );
    let log = String::from_utf8_lossy(&a.cli(&["log"]).stdout).to_string();
    assert_eq!(
        log.matches("\"cache_synced\"").count(),
        1,
        "one full list, then events: {log}"
    );

    // Registry down: the running agent answers from its cache, marked as such.
    server.stop();
    let out = a.cli(&["discover", "beta"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["cached"], true);
    assert!(
        v["cache_reason"].as_str().unwrap().contains("cannot reach"),
        "{v}"
    );
    assert_eq!(v["membrane"]["parent_membrane"], "alpha");
    let out = a.cli(&["list", "--service", "motor"]);
    let v = json(&out);
    assert_eq!(v["cached"], true);
    assert_eq!(v["membranes"].as_array().unwrap().len(), 1);
    assert_eq!(v["membranes"][0]["membrane_id"], "beta");
    let s = wait_for(
        "alpha notices the registry is down",
        Duration::from_secs(5),
        || {
            let s = a.status()?;
            (s["registration"]["server_reachable"] == false).then_some(s)
        },
    );
    assert_eq!(s["cache"]["live"], false);
    assert!(s["cache"]["age_seconds"].is_u64(), "{s}");

    // The agent stops (cannot deregister: the registry is down) and is restarted: its cache
    // survives on disk, with and without the agent running.
    let (code, took) = a.terminate(Duration::from_secs(15));
    assert_eq!(code, Some(0));
    assert!(
        took < Duration::from_secs(7),
        "shutdown grace respected: {took:?}"
    );
    let dir = tmp.path().join("a");
    let out = run_agent(&["list", "--state-dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["cached"], true);
    assert_eq!(v["membranes"].as_array().unwrap().len(), 2);
    let restarted = Agent::start(&quick("alpha", "cog", "http://127.0.0.1:1"), &dir, &[]);
    let out = wait_for("restarted agent answers", Duration::from_secs(10), || {
        let out = restarted.cli(&["discover", "beta"]);
        out.status.success().then_some(out)
    });
    let v = json(&out);
    assert_eq!(v["cached"], true);
    assert_eq!(v["membrane"]["membrane_id"], "beta");
    let s = wait_for(
        "restarted agent tried the registry",
        Duration::from_secs(5),
        || {
            let s = restarted.status()?;
            (s["registration"]["server_reachable"] == false).then_some(s)
        },
    );
    assert_eq!(s["registration"]["registered"], false);
    drop(b);
}

#[test]
fn without_an_agent_discover_asks_the_registry_directly() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), 0, &[]);
    let a = Agent::start(
        &quick("alpha", "cog", &server.url()),
        &tmp.path().join("a"),
        &[],
    );
    a.wait_registered();
    let empty = tmp.path().join("nobody");
    let out = run_agent(&[
        "discover",
        "alpha",
        "--state-dir",
        empty.to_str().unwrap(),
        "--namespace",
        "cog",
        "--registry-url",
        &server.url(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["cached"], false);
    assert_eq!(json(&out)["membrane"]["membrane_id"], "alpha");
    // Unreachable registry and no cache: a clear failure.
    let out = run_agent(&[
        "list",
        "--state-dir",
        empty.to_str().unwrap(),
        "--namespace",
        "cog",
        "--registry-url",
        "http://127.0.0.1:1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(
        e.contains("cannot reach the registry") && e.contains("no cache"),
        "{e}"
    );
}
