//! `dig` against the real binary: what an operator would type.

use std::process::Command;

use super::harness::{Http, Server};

/// `dig` output lines for a query, or None (with a loud SKIP) when dig is not installed.
pub(super) fn dig(server: &Server, args: &[&str]) -> Option<String> {
    if Command::new("dig").arg("-v").output().is_err() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "dig is required on CI (tests/run.sh installs dnsutils)"
        );
        eprintln!("SKIP: dig not installed (apt-get install dnsutils); dig process test not run");
        return None;
    }
    let out = Command::new("dig")
        .arg(format!("@{}", server.dns.ip()))
        .args(["-p", &server.dns.port().to_string(), "+tries=1", "+time=2"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "dig failed: {:?}", out);
    Some(String::from_utf8(out.stdout).unwrap())
}

/// [`dig`] until `done` holds for its output or 2 s pass (then the last output): the zone
/// is rebuilt a few milliseconds after the API answers a write (TTL 5 s).
fn dig_until(server: &Server, args: &[&str], done: impl Fn(&str) -> bool) -> Option<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = dig(server, args)?;
        if done(&out) || std::time::Instant::now() > deadline {
            return Some(out);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_sees_registrations_and_deregistrations() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let http = Http::new(server.url());
    for (id, ip, port) in [
        ("visual-worker-1", "10.0.0.11", 7101),
        ("visual-worker-2", "10.0.0.12", 7102),
    ] {
        let body = format!(
            r#"{{"parent":"perception","addresses":["{ip}"],"services":[{{"name":"visual","port":{port}}}],"capabilities":["vision"]}}"#
        );
        let (s, v) = http
            .call(
                "PUT",
                &format!("/v1/namespaces/cognitive-system/membranes/{id}"),
                Some(&body),
            )
            .await
            .unwrap();
        assert_eq!(s, 201, "{v}");
    }
    let Some(out) = dig_until(
        &server,
        &["SRV", "_visual._tcp.cognitive-system", "+short"],
        |o| o.lines().count() == 2,
    ) else {
        return;
    };
    let mut lines: Vec<_> = out.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        vec![
            "0 10 7101 visual-worker-1.cognitive-system.",
            "0 10 7102 visual-worker-2.cognitive-system."
        ],
        "{out}"
    );
    let full = dig(&server, &["SRV", "_visual._tcp.cognitive-system"]).unwrap();
    assert!(
        full.contains("flags: qr aa rd;"),
        "authoritative, RD echoed, RA clear:\n{full}"
    );
    let normalized: Vec<String> = full
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert!(
        normalized.contains(&"visual-worker-1.cognitive-system. 5 IN A 10.0.0.11".to_string()),
        "target addresses in the additional section:\n{full}"
    );
    let a = dig(
        &server,
        &["A", "visual-worker-2.cognitive-system", "+short"],
    )
    .unwrap();
    assert_eq!(a.trim(), "10.0.0.12");
    let sub = dig(
        &server,
        &[
            "PTR",
            "_vision._sub._visual._tcp.cognitive-system",
            "+short",
        ],
    )
    .unwrap();
    assert_eq!(sub.lines().count(), 2, "{sub}");
    let nx = dig(&server, &["A", "nobody.cognitive-system"]).unwrap();
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    let refused = dig(&server, &["A", "example.com"]).unwrap();
    assert!(refused.contains("status: REFUSED"), "{refused}");
    let tcp = dig(
        &server,
        &["+tcp", "SRV", "_visual._tcp.cognitive-system", "+short"],
    )
    .unwrap();
    assert_eq!(tcp.lines().count(), 2, "{tcp}");

    // Deregistration leaves DNS (within the zone rebuild after the answer).
    let (s, _) = http
        .call(
            "DELETE",
            "/v1/namespaces/cognitive-system/membranes/visual-worker-1",
            None,
        )
        .await
        .unwrap();
    assert_eq!(s, 204);
    let out = dig_until(
        &server,
        &["SRV", "_visual._tcp.cognitive-system", "+short"],
        |o| o.lines().count() == 1,
    )
    .unwrap();
    assert_eq!(out.trim(), "0 10 7102 visual-worker-2.cognitive-system.");
    let gone = dig(&server, &["A", "visual-worker-1.cognitive-system"]).unwrap();
    assert!(gone.contains("status: NXDOMAIN"), "{gone}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_membrane_leaves_srv_answers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--sweep-interval", "50ms"]);
    let http = Http::new(server.url());
    let body = r#"{"addresses":["10.0.0.1"],"services":[{"name":"svc","port":1}],"ttl_seconds":3}"#;
    http.call("PUT", "/v1/namespaces/ns/membranes/short", Some(body))
        .await
        .unwrap();
    let long =
        r#"{"addresses":["10.0.0.2"],"services":[{"name":"svc","port":2}],"ttl_seconds":600}"#;
    http.call("PUT", "/v1/namespaces/ns/membranes/long", Some(long))
        .await
        .unwrap();
    // (The zone is rebuilt just after the API answers.)
    let Some(out) = dig_until(&server, &["SRV", "_svc._tcp.ns", "+short"], |o| {
        o.lines().count() == 2
    }) else {
        return;
    };
    assert_eq!(out.lines().count(), 2, "{out}");
    // Stale once its 3 s TTL ran out (polled: the sweep runs every 50 ms).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let (_, v) = http
            .call("GET", "/v1/namespaces/ns/membranes/short", None)
            .await
            .unwrap();
        if v["state"] == "stale" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never stale: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // DNS follows once the change is published and the zone rebuilt (milliseconds).
    let settled = |want: &'static str| {
        let server = &server;
        async move {
            let mut out = String::new();
            for _ in 0..100 {
                out = dig(server, &["SRV", "_svc._tcp.ns", "+short"]).unwrap();
                let done = if want.is_empty() {
                    out.lines().count() == 2
                } else {
                    out.trim() == want
                };
                if done {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            out
        }
    };
    let out = settled("0 10 2 long.ns.").await;
    assert_eq!(out.trim(), "0 10 2 long.ns.", "{out}");
    // A heartbeat brings it back.
    http.call("POST", "/v1/namespaces/ns/membranes/short/heartbeat", None)
        .await
        .unwrap();
    let out = settled("").await;
    assert_eq!(out.lines().count(), 2, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_zone_is_accepted_by_named_checkzone() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let http = Http::new(server.url());
    let body = r#"{"addresses":["10.0.0.1","fd00::1"],"services":[{"name":"svc","port":1}],"metadata":{"version":"1.2 \"beta\""}}"#;
    http.call(
        "PUT",
        "/v1/namespaces/cognitive-system/membranes/a",
        Some(body),
    )
    .await
    .unwrap();
    let out = Command::new(super::harness::bin())
        .args([
            "export",
            "--namespace",
            "cognitive-system",
            "--format",
            "zone",
        ])
        .args(["--url", &server.url()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let zone = String::from_utf8(out.stdout).unwrap();
    assert!(zone.contains("_svc._tcp"), "{zone}");
    let path = dir.path().join("zone");
    std::fs::write(&path, &zone).unwrap();
    match Command::new("named-checkzone")
        .args(["cognitive-system", path.to_str().unwrap()])
        .output()
    {
        Ok(o) => assert!(
            o.status.success(),
            "named-checkzone rejected:\n{}\n{zone}",
            String::from_utf8_lossy(&o.stdout)
        ),
        Err(_) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "named-checkzone required on CI"
            );
            eprintln!("SKIP: named-checkzone not installed (apt-get install bind9-utils)");
        }
    }
}

/// The EDNS features and several NS hosts as `dig` shows them, set by flags; and DNS (on
/// its own threads) stops cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_sees_nsid_cookies_ede_and_ns_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            "--nsid",
            "dns-a",
            "--ns-host",
            "ns1.cognitive-system=192.0.2.1,ns2.example.net",
        ],
    );
    let http = Http::new(server.url());
    let (s, _) = http
        .call(
            "PUT",
            "/v1/namespaces/cognitive-system/membranes/a",
            Some(r#"{"addresses":["10.0.0.1"],"services":[{"name":"svc","port":1}]}"#),
        )
        .await
        .unwrap();
    assert_eq!(s, 201);
    // (The zone appears just after the registration is answered.)
    let Some(out) = dig_until(
        &server,
        &["+nsid", "+cookie", "+dnssec", "SOA", "cognitive-system"],
        |o| o.contains("status: NOERROR"),
    ) else {
        return;
    };
    assert!(out.contains("(\"dns-a\")"), "NSID:\n{out}");
    assert!(out.contains("(good)"), "a server cookie for dig's:\n{out}");
    assert!(out.contains("flags: do;"), "DO copied:\n{out}");
    assert!(out.contains("SOA\tns1.cognitive-system."), "{out}");
    let ns = dig(&server, &["NS", "cognitive-system", "+short"]).unwrap();
    let mut ns: Vec<_> = ns.lines().collect();
    ns.sort();
    assert_eq!(ns, ["ns1.cognitive-system.", "ns2.example.net."]);
    let refused = dig(&server, &["A", "example.com"]).unwrap();
    assert!(refused.contains("status: REFUSED"), "{refused}");
    assert!(refused.contains("EDE: 20"), "{refused}");
    assert!(server.terminate().success());
}

/// The seed systems' clients' captured calls (`tests/fixtures/seed-clients.json`) replayed
/// against the real binary: what they registered is what `dig` answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_clients_calls_show_in_dns() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let http = Http::new(server.url());
    let fixture: Vec<serde_json::Value> = serde_json::from_str(include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/seed-clients.json"
    )))
    .unwrap();
    for e in &fixture {
        let (method, path) = (e["method"].as_str().unwrap(), e["path"].as_str().unwrap());
        let (s, v) = http.call(method, path, e["body"].as_str()).await.unwrap();
        assert_eq!(s, e["status"], "{} {method} {path}: {v}", e["client"]);
    }
    // RegistryClient: host and port. (Each check waits for the zone rebuild that follows
    // the last answer.)
    let Some(srv) = dig_until(
        &server,
        &["SRV", "_visual-cortex._tcp.cognitive-system", "+short"],
        |o| o.trim() == "0 10 7201 visual-cortex.cognitive-system.",
    ) else {
        return;
    };
    assert_eq!(srv.trim(), "0 10 7201 visual-cortex.cognitive-system.");
    let a = dig_until(
        &server,
        &["A", "visual-cortex.cognitive-system", "+short"],
        |o| o.trim() == "10.0.0.21",
    )
    .unwrap();
    assert_eq!(a.trim(), "10.0.0.21");
    // The membrane install.sh curl registration.
    let a = dig_until(
        &server,
        &["A", "motor-cortex.cognitive-system", "+short"],
        |o| o.trim() == "192.0.2.2",
    )
    .unwrap();
    assert_eq!(a.trim(), "192.0.2.2");
    // NamespaceClient: parent and endpoint (a network URL served as host:port).
    let txt = dig_until(&server, &["TXT", "perception.default", "+short"], |o| {
        o.contains("\"parent=cognitive-root\"")
    })
    .unwrap();
    assert!(txt.contains("\"parent=cognitive-root\""), "{txt}");
    assert!(txt.contains("\"endpoint=localhost:9730\""), "{txt}");
    // Deregistered (NamespaceClient) and unregistered (modularity CLI): gone.
    for name in ["motor.default", "hello-service.default"] {
        let nx = dig_until(&server, &["TXT", name], |o| o.contains("status: NXDOMAIN")).unwrap();
        assert!(nx.contains("status: NXDOMAIN"), "{name}: {nx}");
    }
}
