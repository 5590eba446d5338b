//! Liveness through per-membrane leases: heartbeats through either replica keep a
//! membrane passing; when they stop it goes stale on both replicas, then is evicted once.

use std::time::{Duration, Instant};

use super::cluster::{Cluster, Replica, body, dns_has_a, etcd_bin, eventually};

async fn evictions(r: &Replica) -> u64 {
    let (_, v) = r.http.call("GET", "/v1/stats", None).await.unwrap();
    v["counters"]["evictions"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_membrane_goes_stale_on_both_replicas_then_is_evicted_once() {
    let _serial = crate::SERIAL.lock().await;
    let Some(bin) = etcd_bin() else { return };
    let cluster = Cluster::start(bin, 3).await;
    let a = Replica::start(&cluster.all(), &[]).await;
    let b = Replica::start(&cluster.all(), &[]).await;
    let path = "/v1/namespaces/live/membranes/hb";
    // TTL 2 s, eviction 3 s after going stale.
    let (code, _) = a
        .http
        .call("PUT", path, Some(&body(1, 2, 3)))
        .await
        .unwrap();
    assert_eq!(code, 201);
    // A answered once its own watch applied the write; B's follows.
    eventually("B has it", Duration::from_secs(10), || async {
        b.state("live", "hb").await.as_deref() == Some("passing")
    })
    .await;

    // Heartbeats through B (not the replica that registered it) keep it passing past
    // twice its TTL.
    let until = Instant::now() + Duration::from_secs(5);
    let mut last_heartbeat = Instant::now();
    while Instant::now() < until {
        let (code, v) = b
            .http
            .call("POST", &format!("{path}/heartbeat"), None)
            .await
            .unwrap();
        assert_eq!(code, 200, "{v}");
        last_heartbeat = Instant::now();
        for r in [&a, &b] {
            assert_eq!(r.state("live", "hb").await.as_deref(), Some("passing"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Silence: stale on both (lease expiry, seen by both watches), gone from DNS.
    let silent = last_heartbeat;
    for r in [&a, &b] {
        eventually("stale", Duration::from_secs(5), || async {
            r.state("live", "hb").await.as_deref() == Some("stale")
        })
        .await;
    }
    let stale_after = silent.elapsed();
    assert!(
        stale_after >= Duration::from_millis(1500),
        "{stale_after:?}"
    );
    for r in [&a, &b] {
        eventually("out of DNS", Duration::from_secs(10), || async {
            !dns_has_a(r.dns(), "hb.live.").await
        })
        .await;
    }
    println!("stale on both replicas {stale_after:?} after the last heartbeat (TTL 2 s)");

    // A heartbeat revives it (new lease) on both.
    let (code, _) = a
        .http
        .call("POST", &format!("{path}/heartbeat"), None)
        .await
        .unwrap();
    assert_eq!(code, 200);
    for r in [&a, &b] {
        eventually("passing again", Duration::from_secs(10), || async {
            r.state("live", "hb").await.as_deref() == Some("passing")
                && dns_has_a(r.dns(), "hb.live.").await
        })
        .await;
    }

    // Silent for good: stale, then evicted on both, by exactly one replica.
    for r in [&a, &b] {
        eventually("evicted", Duration::from_secs(12), || async {
            r.state("live", "hb").await.is_none()
        })
        .await;
    }
    assert_eq!(evictions(&a).await + evictions(&b).await, 1);
    let (code, _) = b
        .http
        .call("POST", &format!("{path}/heartbeat"), None)
        .await
        .unwrap();
    assert_eq!(code, 404, "an evicted membrane must re-register");
}
