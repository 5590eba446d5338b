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
    // Killed in the middle of the writes, once enough were acknowledged (polled: how many
    // commits a second the machine does is not this test's business).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() <= 150 {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} registrations acknowledged in 30 s",
            acked.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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

/// Opens the namespace's event stream resuming after `last_id`; returns its epoch header
/// and the body.
async fn events(server: &Server, ns: &str, last_id: u64) -> (u64, hyper::body::Incoming) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::builder()
        .uri(format!("{}/v1/namespaces/{ns}/events", server.url()))
        .header("last-event-id", last_id.to_string())
        .body(Default::default())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let epoch = resp.headers()["membrane-event-epoch"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    (epoch, resp.into_body())
}

/// The next SSE frame of `body` (text up to a blank line), within 5 s.
async fn next_frame(body: &mut hyper::body::Incoming, buf: &mut String) -> String {
    use http_body_util::BodyExt;
    loop {
        if let Some(i) = buf.find("\n\n") {
            let frame = buf[..i].to_string();
            buf.drain(..i + 2);
            if !frame.starts_with(':') {
                return frame;
            }
            continue;
        }
        let f = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("no event within 5 s")
            .expect("stream ended")
            .unwrap();
        if let Ok(data) = f.into_data() {
            buf.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
}

/// Registers `id` in `ns`; returns the list's (epoch, revision) after it.
async fn register_and_list(http: &Http, ns: &str, id: &str) -> (u64, u64) {
    let body = r#"{"addresses":["10.0.0.1"],"services":[{"name":"svc","port":7100}]}"#;
    let (s, _) = http
        .call(
            "PUT",
            &format!("/v1/namespaces/{ns}/membranes/{id}"),
            Some(body),
        )
        .await
        .unwrap();
    assert!(s == 200 || s == 201, "{s}");
    let (s, v) = http
        .call("GET", &format!("/v1/namespaces/{ns}/membranes"), None)
        .await
        .unwrap();
    assert_eq!(s, 200);
    (
        v["epoch"].as_u64().unwrap(),
        v["revision"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn event_streams_resume_across_a_clean_restart_and_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let http = Http::new(server.url());
    let (s, _) = http
        .call("POST", "/v1/namespaces", Some(r#"{"name":"fleet"}"#))
        .await
        .unwrap();
    assert_eq!(s, 201);
    register_and_list(&http, "fleet", "a").await;
    let (epoch, rev) = register_and_list(&http, "fleet", "b").await;
    assert!(server.terminate().success());

    // Clean restart: the same epoch; an agent at `rev` resumes with nothing to replay
    // (no resync), and its next event is the next change.
    let server = Server::start(dir.path(), &[]);
    let http = Http::new(server.url());
    let (e, mut body) = events(&server, "fleet", rev).await;
    assert_eq!(e, epoch, "a clean restart keeps the event epoch");
    let (e2, rev2) = register_and_list(&http, "fleet", "c").await;
    assert_eq!(e2, epoch);
    let mut buf = String::new();
    let frame = next_frame(&mut body, &mut buf).await;
    assert!(
        frame.contains("event: registered") && frame.contains("\"id\":\"c\""),
        "expected the new registration first, got {frame:?}"
    );
    assert!(rev2 > rev, "numbering continues after the kept position");
    // An agent that missed the last event of the previous process gets it replayed.
    let (_, mut behind) = events(&server, "fleet", rev - 1).await;
    let frame = next_frame(&mut behind, &mut String::new()).await;
    assert!(
        frame.starts_with(&format!("id: {rev}\n")) && frame.contains("\"id\":\"b\""),
        "{frame:?}"
    );
    drop((body, behind));

    // A crash right after a change: that change was committed with its event, so an agent
    // at `rev2` resumes (same epoch, no resync) and one that missed `d` gets it.
    let (_, rev3) = register_and_list(&http, "fleet", "d").await;
    server.kill9();
    let server = Server::start(dir.path(), &[]);
    let (e3, mut body) = events(&server, "fleet", rev3).await;
    assert_eq!(e3, epoch, "a crash keeps the event epoch too");
    let (_, mut behind) = events(&server, "fleet", rev2).await;
    let frame = next_frame(&mut behind, &mut String::new()).await;
    assert!(
        frame.starts_with(&format!("id: {rev3}\n")) && frame.contains("\"id\":\"d\""),
        "{frame:?}"
    );
    let http = Http::new(server.url());
    register_and_list(&http, "fleet", "e").await;
    let frame = next_frame(&mut body, &mut String::new()).await;
    assert!(
        frame.contains("event: registered") && frame.contains("\"id\":\"e\""),
        "expected the next registration, not a resync: {frame:?}"
    );
}
