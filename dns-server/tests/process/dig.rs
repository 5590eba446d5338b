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
    let Some(out) = dig(&server, &["SRV", "_visual._tcp.cognitive-system", "+short"]) else {
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

    // Deregistration leaves DNS at once.
    let (s, _) = http
        .call(
            "DELETE",
            "/v1/namespaces/cognitive-system/membranes/visual-worker-1",
            None,
        )
        .await
        .unwrap();
    assert_eq!(s, 204);
    let out = dig(&server, &["SRV", "_visual._tcp.cognitive-system", "+short"]).unwrap();
    assert_eq!(out.trim(), "0 10 7102 visual-worker-2.cognitive-system.");
    let gone = dig(&server, &["A", "visual-worker-1.cognitive-system"]).unwrap();
    assert!(gone.contains("status: NXDOMAIN"), "{gone}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_membrane_leaves_srv_answers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--sweep-interval", "50ms"]);
    let http = Http::new(server.url());
    let body = r#"{"addresses":["10.0.0.1"],"services":[{"name":"svc","port":1}],"ttl_seconds":1}"#;
    http.call("PUT", "/v1/namespaces/ns/membranes/short", Some(body))
        .await
        .unwrap();
    let long =
        r#"{"addresses":["10.0.0.2"],"services":[{"name":"svc","port":2}],"ttl_seconds":600}"#;
    http.call("PUT", "/v1/namespaces/ns/membranes/long", Some(long))
        .await
        .unwrap();
    let Some(out) = dig(&server, &["SRV", "_svc._tcp.ns", "+short"]) else {
        return;
    };
    assert_eq!(out.lines().count(), 2, "{out}");
    tokio::time::sleep(std::time::Duration::from_millis(1400)).await;
    let (_, v) = http
        .call("GET", "/v1/namespaces/ns/membranes/short", None)
        .await
        .unwrap();
    assert_eq!(v["state"], "stale");
    let out = dig(&server, &["SRV", "_svc._tcp.ns", "+short"]).unwrap();
    assert_eq!(out.trim(), "0 10 2 long.ns.", "{out}");
    // A heartbeat brings it back.
    http.call("POST", "/v1/namespaces/ns/membranes/short/heartbeat", None)
        .await
        .unwrap();
    let out = dig(&server, &["SRV", "_svc._tcp.ns", "+short"]).unwrap();
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
