//! An agent sidecar registers its membrane; any DNS client then finds it; stopping the
//! agent removes it.

use std::time::Duration;

use super::harness::{DnsServer, agent, wait_for};

#[test]
fn agents_appear_in_dns_and_leave_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let server = DnsServer::start(&dir.path().join("data"));
    let url = server.url();
    let mut agents = Vec::new();
    for (id, parent, port) in [
        ("perception", "cognitive-root", "7000"),
        ("visual-worker-1", "perception", "7101"),
        ("visual-worker-2", "perception", "7102"),
    ] {
        let svc = if id == "perception" {
            format!("perception:tcp:{port}")
        } else {
            format!("visual:tcp:{port}")
        };
        agents.push(agent(
            &dir.path().join(id),
            &[
                "--id",
                id,
                "--namespace",
                "cognitive-system",
                "--parent",
                parent,
                "--registry-url",
                &url,
                "--service",
                &svc,
                "--address",
                "127.0.0.1",
                "--capability",
                "vision",
                "--heartbeat-interval",
                "1s",
                "--ttl",
                "5s",
            ],
        ));
    }
    wait_for("three registrations", Duration::from_secs(20), || {
        let (s, v) = server.get("/v1/namespaces/cognitive-system/membranes?state=passing");
        (s == 200 && v["membranes"].as_array().map(Vec::len) == Some(3)).then_some(())
    });
    let (_, tree) = server.get("/v1/namespaces/cognitive-system/tree");
    assert_eq!(tree["roots"][0]["id"], "perception", "{tree}");
    assert_eq!(
        tree["roots"][0]["children"].as_array().unwrap().len(),
        2,
        "{tree}"
    );

    // (The zone is rebuilt just after the API answers.)
    let Some(srv) = server.dig("SRV", "_visual._tcp.cognitive-system") else {
        return;
    };
    let srv = if srv.len() == 2 {
        srv
    } else {
        wait_for("both workers in DNS", Duration::from_secs(10), || {
            let srv = server.dig("SRV", "_visual._tcp.cognitive-system").unwrap();
            (srv.len() == 2).then_some(srv)
        })
    };
    assert_eq!(
        srv,
        vec![
            "0 10 7101 visual-worker-1.cognitive-system.",
            "0 10 7102 visual-worker-2.cognitive-system."
        ]
    );
    assert_eq!(
        server.dig("A", "perception.cognitive-system").unwrap(),
        vec!["127.0.0.1"]
    );
    assert_eq!(
        server
            .dig("PTR", "_vision._sub._visual._tcp.cognitive-system")
            .unwrap()
            .len(),
        2
    );

    // A graceful stop deregisters at once: gone from DNS without waiting for the TTL.
    let status = agents[1].terminate();
    assert!(status.success(), "{status:?}");
    // (The zone is rebuilt milliseconds after the deregistration is answered.)
    wait_for(
        "visual-worker-1 out of DNS",
        Duration::from_secs(10),
        || {
            let srv = server.dig("SRV", "_visual._tcp.cognitive-system").unwrap();
            (srv == ["0 10 7102 visual-worker-2.cognitive-system."]).then_some(())
        },
    );

    // A killed agent leaves its membrane to go stale after the TTL: out of DNS, still listed.
    let _ = agents[2].child.kill();
    let _ = agents[2].child.wait();
    wait_for("visual-worker-2 stale", Duration::from_secs(15), || {
        let (_, v) = server.get("/v1/namespaces/cognitive-system/membranes/visual-worker-2");
        (v["state"] == "stale").then_some(())
    });
    // DNS follows once the stale marking is published and the zone rebuilt (milliseconds
    // after the API shows it).
    wait_for(
        "visual-worker-2 out of DNS",
        Duration::from_secs(10),
        || {
            server
                .dig("SRV", "_visual._tcp.cognitive-system")
                .unwrap()
                .is_empty()
                .then_some(())
        },
    );
}
