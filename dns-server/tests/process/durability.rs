//! Every acknowledged registration survives SIGKILL at any moment.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::harness::{Http, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_registrations_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let http = Http::new(server.url());
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    // 16 concurrent writers register as fast as they can; the server is killed mid-stream.
    let mut writers = Vec::new();
    for w in 0..16 {
        let (http, acked) = (http.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let id = format!("m-{w}-{i}");
                let body = format!(
                    r#"{{"addresses":["10.0.{w}.1"],"services":[{{"name":"svc","port":{}}}]}}"#,
                    1000 + i % 1000
                );
                match http
                    .call(
                        "PUT",
                        &format!("/v1/namespaces/crash/membranes/{id}"),
                        Some(&body),
                    )
                    .await
                {
                    Ok((200 | 201, _)) => {
                        acked.lock().unwrap().insert(id);
                    }
                    _ => break,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.kill9();
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "only {} registrations before the kill",
        acked.len()
    );

    let server = Server::start(dir.path(), &[]);
    let http = Http::new(server.url());
    let (status, v) = http
        .call("GET", "/v1/namespaces/crash/membranes", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let stored: BTreeSet<String> = v["membranes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    let missing: Vec<_> = acked.difference(&stored).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged registrations lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    // After a restart every membrane is passing with one fresh TTL.
    assert!(
        v["membranes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["state"] == "passing")
    );
    eprintln!(
        "{} acknowledged, {} stored after SIGKILL",
        acked.len(),
        stored.len()
    );
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let http = Http::new(server.url());
    let (s, _) = http
        .call(
            "POST",
            "/v1/namespaces",
            Some(r#"{"name":"kept","description":"d"}"#),
        )
        .await
        .unwrap();
    assert_eq!(s, 201);
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
    let server = Server::start(dir.path(), &[]);
    let (s, v) = Http::new(server.url())
        .call("GET", "/v1/namespaces/kept", None)
        .await
        .unwrap();
    assert_eq!((s, v["description"].as_str()), (200, Some("d")));
}
