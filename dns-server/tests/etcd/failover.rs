//! Replica A killed: B keeps serving and a client listing both fails over to it; a
//! restarted replica rebuilds its state from etcd.

use std::time::Duration;

use super::cluster::{Cluster, Failover, Replica, body, dns_has_a, etcd_bin, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_serves_when_a_dies_and_a_restarted_replica_rebuilds_from_etcd() {
    let _serial = crate::SERIAL.lock().await;
    let Some(bin) = etcd_bin() else { return };
    let cluster = Cluster::start(bin, 3).await;
    let a = Replica::start(&cluster.all(), &[]).await;
    let b = Replica::start(&cluster.all(), &[]).await;
    let agents = Failover(vec![a.http.clone(), b.http.clone()]);

    for i in 0..20 {
        let (served_by, code, v) = agents
            .call(
                "PUT",
                &format!("/v1/namespaces/fo/membranes/m{i}"),
                Some(&body(i, 60, 60)),
            )
            .await;
        assert_eq!((served_by, code), (0, 201), "{v}");
    }
    let (_, _, before) = agents
        .call("GET", "/v1/namespaces/fo/membranes/m3", None)
        .await;
    eventually("B has all 20", Duration::from_secs(5), || async {
        b.ids("fo").await.len() == 20
    })
    .await;

    // (B's zone is rebuilt just after its copy has them.)
    eventually("B's DNS has all 20", Duration::from_secs(5), || async {
        for i in 0..20 {
            if !dns_has_a(b.dns(), &format!("m{i}.fo.")).await {
                return false;
            }
        }
        true
    })
    .await;
    a.server.kill9();
    // B keeps answering DNS and reads from its copy...
    for i in 0..20 {
        assert!(dns_has_a(b.dns(), &format!("m{i}.fo.")).await, "m{i}");
    }
    // ...and takes the writes the agents now send it.
    let (served_by, code, _) = agents
        .call("POST", "/v1/namespaces/fo/membranes/m3/heartbeat", None)
        .await;
    assert_eq!((served_by, code), (1, 200));
    for i in 20..25 {
        let (served_by, code, v) = agents
            .call(
                "PUT",
                &format!("/v1/namespaces/fo/membranes/m{i}"),
                Some(&body(i, 60, 60)),
            )
            .await;
        assert_eq!((served_by, code), (1, 201), "{v}");
    }
    let (served_by, code, _) = agents
        .call("DELETE", "/v1/namespaces/fo/membranes/m0", None)
        .await;
    assert_eq!((served_by, code), (1, 204));
    // DNS follows the registry asynchronously (rebuilds are paced under a burst of
    // changes): gone shortly after the answer, not necessarily at once.
    eventually("m0 gone from B's DNS", Duration::from_secs(10), || async {
        !dns_has_a(b.dns(), "m0.fo.").await
    })
    .await;

    // A replica started afresh (empty data dir) rebuilds everything from etcd.
    let a2 = Replica::start(&cluster.all(), &[]).await;
    let want: Vec<String> = b.ids("fo").await;
    assert_eq!(want.len(), 24);
    assert_eq!(a2.ids("fo").await, want);
    let (_, after) = a2
        .http
        .call("GET", "/v1/namespaces/fo/membranes/m3", None)
        .await
        .unwrap();
    assert_eq!(after["registered_at"], before["registered_at"]);
    assert_eq!(after["addresses"], before["addresses"]);
    eventually("A2 answers DNS", Duration::from_secs(10), || async {
        dns_has_a(a2.dns(), "m24.fo.").await
    })
    .await;
    assert!(!dns_has_a(a2.dns(), "m0.fo.").await);
}
