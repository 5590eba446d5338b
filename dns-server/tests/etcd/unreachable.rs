//! A replica cut off from etcd keeps answering DNS from its copy, flags it, refuses writes
//! with 503, and catches up when etcd returns (resuming its watch, or reloading everything
//! when the revisions it missed were compacted).

use std::io::{Read, Write};
use std::time::Duration;

use super::cluster::{Cluster, Replica, body, dns_has_a, etcd_bin, eventually};

fn metrics(r: &Replica) -> String {
    let mut s = std::net::TcpStream::connect(r.server.http).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Registers `id` through `r` until accepted. A 503 is allowed for a while: each time a
/// member stops or returns, etcd may hold an election (a member that was away can also
/// call one), and writes are refused until it has a leader again.
async fn accepted(r: &Replica, id: &str) {
    let path = format!("/v1/namespaces/cut/membranes/{id}");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (code, v) = r
            .http
            .call("PUT", &path, Some(&body(7, 60, 60)))
            .await
            .unwrap();
        // 200: an earlier attempt answered 503 but had committed (open mode: an update).
        if code == 201 || code == 200 {
            return;
        }
        assert_eq!(code, 503, "{id}: {v}");
        assert!(
            std::time::Instant::now() < deadline,
            "{id}: writes kept being refused: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_replica_serves_reads_refuses_writes_and_catches_up() {
    let _serial = crate::SERIAL.lock().await;
    let Some(bin) = etcd_bin() else { return };
    let mut cluster = Cluster::start(bin, 3).await;
    // A reaches etcd only through member 0; B through members 1 and 2.
    let a = Replica::start(&cluster.endpoints(&[0]), &[]).await;
    let b = Replica::start(&cluster.endpoints(&[1, 2]), &[]).await;
    let put = |r: &Replica, id: &str| {
        let (h, path) = (r.http.clone(), format!("/v1/namespaces/cut/membranes/{id}"));
        async move { h.call("PUT", &path, Some(&body(7, 60, 60))).await.unwrap() }
    };
    assert_eq!(put(&a, "before").await.0, 201);

    cluster.kill(0);
    a.wait_status(
        |s| s["store"]["reachable"] == false,
        Duration::from_secs(10),
    )
    .await;
    let status = a.status().await;
    assert_eq!(status["status"], "degraded");
    assert_eq!(status["store"]["writable"], false);
    assert!(
        metrics(&a)
            .lines()
            .any(|l| l.starts_with("membrane_store_failed ") && l.ends_with(" 1")),
        "store_failed gauge set"
    );
    let (code, v) = put(&a, "refused").await;
    assert_eq!(code, 503, "{v}");
    assert_eq!(v["error"]["code"], "store_unreachable");
    assert!(v["error"]["message"].as_str().unwrap().contains("etcd"));
    let (code, _) = a
        .http
        .call(
            "POST",
            "/v1/namespaces/cut/membranes/before/heartbeat",
            None,
        )
        .await
        .unwrap();
    assert_eq!(code, 503);
    assert!(dns_has_a(a.dns(), "before.cut.").await, "DNS from the copy");
    assert_eq!(a.ids("cut").await, ["before"]);

    // The rest of the cluster has quorum: B writes meanwhile.
    accepted(&b, "during").await;

    // Member 0 returns: A resumes its watch and catches up.
    cluster.restart(0).await;
    a.wait_status(|s| s["store"]["reachable"] == true, Duration::from_secs(15))
        .await;
    eventually("A caught up", Duration::from_secs(5), || async {
        a.ids("cut").await == ["before", "during"] && dns_has_a(a.dns(), "during.cut.").await
    })
    .await;
    accepted(&a, "after").await;

    // Cut off again; B changes things and the history is compacted: A must reload.
    cluster.kill(0);
    a.wait_status(
        |s| s["store"]["reachable"] == false,
        Duration::from_secs(10),
    )
    .await;
    accepted(&b, "during2").await;
    let (code, _) = b
        .http
        .call("DELETE", "/v1/namespaces/cut/membranes/during", None)
        .await
        .unwrap();
    assert_eq!(code, 204);
    let mut c = cluster.client().await;
    let rev = c.get("x", None).await.unwrap().header().unwrap().revision();
    c.compact(
        rev,
        Some(etcd_client::CompactionOptions::new().with_physical()),
    )
    .await
    .unwrap();
    cluster.restart(0).await;
    eventually(
        "A reloaded after compaction",
        Duration::from_secs(15),
        || async {
            a.ids("cut").await == ["after", "before", "during2"]
                && dns_has_a(a.dns(), "during2.cut.").await
                && !dns_has_a(a.dns(), "during.cut.").await
        },
    )
    .await;
    assert_eq!(a.status().await["store"]["reachable"], true);
}
