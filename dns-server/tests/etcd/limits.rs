//! `--max-membranes` and `--max-namespaces` hold on a replica on etcd as on the embedded
//! store: one more is refused with 503 `registry_full` and nothing is written to etcd.

use super::cluster::{Cluster, Replica, body, etcd_bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_replica_refuses_new_membranes_and_namespaces() {
    let _serial = crate::SERIAL.lock().await;
    let Some(bin) = etcd_bin() else { return };
    let cluster = Cluster::start(bin, 1).await;
    let a = Replica::start(
        &cluster.all(),
        &["--max-membranes", "2", "--max-namespaces", "1"],
    )
    .await;
    let put = |id: &str, ns: &str| {
        let (h, path) = (
            a.http.clone(),
            format!("/v1/namespaces/{ns}/membranes/{id}"),
        );
        async move { h.call("PUT", &path, Some(&body(1, 60, 60))).await.unwrap() }
    };
    assert_eq!(put("m1", "full").await.0, 201);
    assert_eq!(put("m2", "full").await.0, 201);
    let (code, v) = put("m3", "full").await;
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (503, Some("registry_full")),
        "{v}"
    );
    // An update of a registered membrane is not a new one (open mode: a takeover).
    let (code, v) = a
        .http
        .call(
            "PUT",
            "/v1/namespaces/full/membranes/m1?replace=true",
            Some(&body(2, 60, 60)),
        )
        .await
        .unwrap();
    assert_eq!(code, 200, "{v}");
    let (code, v) = put("m1", "other").await;
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (503, Some("registry_full")),
        "{v}"
    );
    assert_eq!(a.ids("full").await, ["m1", "m2"]);
    let keys = cluster.keys("/").await;
    assert!(
        keys.iter()
            .all(|k| !k.contains("m3") && !k.contains("other")),
        "{keys:?}"
    );
}
