//! A registration through replica A is answered in DNS by replica B; one etcd member
//! killed: writes and reads continue; nothing acknowledged is lost.

use std::time::{Duration, Instant};

use super::cluster::{Cluster, Replica, body, dns_has_a, etcd_bin, eventually};

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// PUT with retries while the cluster elects a new leader; returns the retries needed.
async fn put_retrying(r: &Replica, path: &str, body: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut retries = 0;
    loop {
        // A retry may follow a write that committed but whose answer was lost: it is this
        // test's own registration, so it asks to replace rather than get 409.
        let uri = if retries == 0 {
            path.to_string()
        } else {
            format!("{path}?replace=true")
        };
        match r.http.call("PUT", &uri, Some(body)).await {
            Ok((c, _)) if (200..300).contains(&c) => return retries,
            other => {
                assert!(Instant::now() < deadline, "{path}: {other:?}");
                retries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_a_is_answered_by_b_and_survives_a_member_kill() {
    let _serial = crate::SERIAL.lock().await;
    let Some(bin) = etcd_bin() else { return };
    let mut cluster = Cluster::start(bin, 3).await;
    let a = Replica::start(&cluster.all(), &[]).await;
    let b = Replica::start(&cluster.all(), &[]).await;

    let n = 200;
    let mut from_ack = Vec::with_capacity(n);
    let mut from_send = Vec::with_capacity(n);
    let mut acked = Vec::new();
    for i in 0..n {
        let id = format!("m{i}");
        let sent = Instant::now();
        let (code, v) = a
            .http
            .call(
                "PUT",
                &format!("/v1/namespaces/prop/membranes/{id}"),
                Some(&body(i, 60, 60)),
            )
            .await
            .unwrap();
        assert!((200..300).contains(&code), "{code} {v}");
        let ack = Instant::now();
        // Read-your-writes on the replica that took the write.
        assert_eq!(a.state("prop", &id).await.as_deref(), Some("passing"));
        let name = format!("{id}.prop.");
        while !dns_has_a(b.dns(), &name).await {
            assert!(ack.elapsed() < Duration::from_secs(5), "{name} never on B");
        }
        let seen = Instant::now();
        from_ack.push(seen - ack);
        from_send.push(seen - sent);
        acked.push(id);
    }
    from_ack.sort();
    from_send.sort();
    println!(
        "propagation A->B DNS over {n} registrations: from A's ack p50 {:.2} ms p99 {:.2} ms; \
         from the request p50 {:.2} ms p99 {:.2} ms",
        pct(&from_ack, 0.5),
        pct(&from_ack, 0.99),
        pct(&from_send, 0.5),
        pct(&from_send, 0.99),
    );

    // One etcd member dies: writes through either replica and reads go on.
    cluster.kill(0);
    let mut retries = 0;
    for i in n..n + 40 {
        let id = format!("m{i}");
        let r = if i % 2 == 0 { &a } else { &b };
        retries += put_retrying(
            r,
            &format!("/v1/namespaces/prop/membranes/{id}"),
            &body(i, 60, 60),
        )
        .await;
        acked.push(id);
    }
    println!("40 writes after killing etcd member 0: {retries} retried requests");
    acked.sort();
    for r in [&a, &b] {
        let ids = acked.clone();
        eventually(
            "every acknowledged write on both replicas",
            Duration::from_secs(5),
            || {
                let ids = ids.clone();
                async move { r.ids("prop").await == ids }
            },
        )
        .await;
        for id in [&acked[0], acked.last().unwrap()] {
            assert!(dns_has_a(r.dns(), &format!("{id}.prop.")).await);
        }
    }
    // Nothing acknowledged is lost: every registration is in etcd itself.
    assert_eq!(cluster.keys("/membrane/m/prop/").await.len(), acked.len());
}
