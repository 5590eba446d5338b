//! The data directory: one server at a time, never start empty on a damaged database,
//! private files.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::harness::{Http, Server, bin};

/// Starts a server that must refuse to start; returns its exit code and stderr.
fn refused(data_dir: &Path) -> (i32, String) {
    let mut child = Command::new(bin())
        .args(["--data-dir", data_dir.to_str().unwrap()])
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--dns-listen",
            "127.0.0.1:0",
        ])
        .env("MEMBRANE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code().unwrap_or(-1), err)
}

async fn register(http: &Http, id: &str) {
    let (status, v) = http
        .call(
            "PUT",
            &format!("/v1/namespaces/store/membranes/{id}"),
            Some(r#"{"addresses":["10.0.0.1"],"services":[]}"#),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{v}");
}

#[tokio::test]
async fn a_second_server_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = Server::start(dir.path(), &[]);
    let http = Http::new(first.url());
    register(&http, "m1").await;
    let (code, err) = refused(dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("is in use by another dns-server")
            && err.contains(&format!("(pid {})", first.child.id())),
        "{err}"
    );
    // The first one is unaffected; its files are private.
    register(&http, "m2").await;
    for f in [
        "registry.sqlite3",
        "registry.sqlite3-wal",
        "registry.sqlite3-shm",
    ] {
        let mode = std::fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    // Once it is gone the directory can be used again (the kernel dropped the lock).
    first.kill9();
    let again = Server::start(dir.path(), &[]);
    let (_, v) = Http::new(again.url())
        .call("GET", "/v1/namespaces/store/membranes", None)
        .await
        .unwrap();
    assert_eq!(v["membranes"].as_array().map(Vec::len), Some(2), "{v}");
}

#[tokio::test]
async fn an_empty_or_corrupt_database_is_refused_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("registry.sqlite3");
    {
        let server = Server::start(dir.path(), &[]);
        register(&Http::new(server.url()), "m1").await;
        assert!(server.terminate().success());
    }
    let good = std::fs::read(&db).unwrap();

    // Header bytes overwritten.
    let mut bad = good.clone();
    bad[..16].copy_from_slice(b"not a database!!");
    std::fs::write(&db, &bad).unwrap();
    let (code, err) = refused(dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("unusable") && err.contains("refusing to start"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&db).unwrap(),
        bad,
        "the damaged file was changed"
    );

    // Truncated to 0 bytes.
    std::fs::write(&db, b"").unwrap();
    let (code, err) = refused(dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("empty (0 bytes)"), "{err}");
    assert_eq!(std::fs::metadata(&db).unwrap().len(), 0);

    // Restored: everything is back.
    std::fs::write(&db, &good).unwrap();
    let server = Server::start(dir.path(), &[]);
    let (_, v) = Http::new(server.url())
        .call("GET", "/v1/namespaces/store/membranes/m1", None)
        .await
        .unwrap();
    assert_eq!(v["id"], "m1", "{v}");
}

#[tokio::test]
async fn rows_of_a_missing_namespace_are_kept_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("registry.sqlite3");
    {
        let server = Server::start(dir.path(), &[]);
        let http = Http::new(server.url());
        register(&http, "m1").await;
        register(&http, "m2").await;
        assert!(server.terminate().success());
    }
    // The namespace row is lost (damage, a manual edit): its membranes have no namespace.
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute("DELETE FROM namespaces WHERE name = 'store'", [])
        .unwrap();
    {
        let server = Server::start(dir.path(), &[]);
        let http = Http::new(server.url());
        let (_, v) = http.call("GET", "/status", None).await.unwrap();
        assert_eq!(
            v["store"]["orphaned_membranes"],
            serde_json::json!({"store": 2})
        );
        let (status, _) = http
            .call("GET", "/v1/namespaces/store/membranes", None)
            .await
            .unwrap();
        assert_eq!(status, 404, "not served");
        // Give the writer's garbage collection time to run: nothing of them is deleted.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(server.terminate().success());
    }
    let rows: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM membranes WHERE namespace = 'store'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 2, "rows of the missing namespace were deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_answered_503_is_not_visible_in_the_api_or_dns() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let http = Http::new(server.url());
    let path = "/v1/namespaces/store/membranes/m1";
    let body = |ip: &str| format!(r#"{{"addresses":["{ip}"],"services":[]}}"#);
    let (status, v) = http
        .call("PUT", path, Some(&body("10.0.0.1")))
        .await
        .unwrap();
    assert_eq!(status, 201, "{v}");
    // The disk starts failing every write of m1 (a trigger added behind the server's back).
    let conn = rusqlite::Connection::open(dir.path().join("registry.sqlite3")).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER fail BEFORE INSERT ON membranes WHEN NEW.id = 'm1'
         BEGIN SELECT RAISE(ABORT, 'injected store failure'); END;",
    )
    .unwrap();
    // An update by its owner: answered 503...
    let secret = v["instance_secret"].as_str().unwrap();
    let req = http::Request::builder()
        .method("PUT")
        .uri(format!("{}{path}", server.url()))
        .header("x-membrane-secret", secret)
        .body(http_body_util::Full::new(bytes::Bytes::from(body(
            "10.0.0.9",
        ))))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    assert_eq!(client.request(req).await.unwrap().status(), 503);
    // ...and not visible anywhere: the API and DNS still show the committed address.
    let (_, v) = http.call("GET", path, None).await.unwrap();
    assert_eq!(v["addresses"][0], "10.0.0.1", "{v}");
    if let Some(out) = super::dig::dig(&server, &["+short", "m1.store.", "A"]) {
        assert_eq!(out.trim(), "10.0.0.1");
    }
    let (_, v) = http.call("GET", "/status", None).await.unwrap();
    assert_eq!(v["status"], "degraded", "{v}");
    // Later writes are refused up front.
    let (status, _) = http
        .call(
            "PUT",
            "/v1/namespaces/store/membranes/m2",
            Some(&body("10.0.0.2")),
        )
        .await
        .unwrap();
    assert_eq!(status, 503);
    let (status, _) = http
        .call("GET", "/v1/namespaces/store/membranes/m2", None)
        .await
        .unwrap();
    assert_eq!(status, 404);
}

/// `membrane_registrations_total` from `/metrics` (counted when a write is queued).
async fn registrations_counted(server: &Server) -> u64 {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let resp = client
        .get(format!("{}/metrics", server.url()).parse().unwrap())
        .await
        .unwrap();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| l.strip_prefix("membrane_registrations_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("membrane_registrations_total in /metrics")
}

/// A membrane marked stale is visible at once and its event commits a moment later: a list
/// showing it stale is answered only once that event is durable (held here by another
/// connection holding SQLite's write lock), so no agent holds a state that a crash would
/// forget to tell it has changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_waits_for_the_health_events_it_shows() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--sweep-interval", "100ms"]);
    let http = Http::new(server.url());
    let path = "/v1/namespaces/store/membranes";
    let body = r#"{"addresses":["10.0.0.1"],"services":[],"ttl_seconds":1}"#;
    let (status, v) = http
        .call("PUT", &format!("{path}/m1"), Some(body))
        .await
        .unwrap();
    assert_eq!(status, 201, "{v}");
    let gate = rusqlite::Connection::open(dir.path().join("registry.sqlite3")).unwrap();
    gate.execute_batch("BEGIN IMMEDIATE").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, v) = http.call("GET", &format!("{path}/m1"), None).await.unwrap();
        if v["state"] == "stale" {
            break;
        }
        assert!(Instant::now() < deadline, "never stale: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let http2 = Http::new(server.url());
    let list = tokio::spawn(async move { http2.call("GET", path, None).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !list.is_finished(),
        "a list showed a state whose event is not durable"
    );
    gate.execute_batch("ROLLBACK").unwrap();
    let (status, v) = list.await.unwrap().unwrap();
    assert_eq!(status, 200);
    assert_eq!(v["membranes"][0]["state"], "stale", "{v}");
}

/// While the store's commit is held (another connection holds SQLite's write lock, so the
/// server's writer waits in its busy timeout), a queued registration and a queued update
/// are in neither the API nor DNS; once the commit goes through, both are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_not_visible_before_it_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let http = Http::new(server.url());
    let path = "/v1/namespaces/store/membranes";
    let body = |ip: &str| format!(r#"{{"addresses":["{ip}"],"services":[]}}"#);
    let (status, v) = http
        .call("PUT", &format!("{path}/m1"), Some(&body("10.0.0.1")))
        .await
        .unwrap();
    assert_eq!(status, 201, "{v}");
    let secret = v["instance_secret"].as_str().unwrap().to_string();
    let counted = registrations_counted(&server).await;
    let dig = |name: &str| super::dig::dig(&server, &["+short", name, "A"]);
    let dns_serves = async |name: &str, ip: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while dig(name).unwrap().trim() != ip {
            assert!(Instant::now() < deadline, "DNS never served {name} {ip}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let has_dig = dig("m1.store.").is_some();
    if has_dig {
        dns_serves("m1.store.", "10.0.0.1").await;
    }

    // Hold the commit: the writer cannot take the write lock until it is released (the
    // server's busy timeout is 5 s; everything below takes milliseconds).
    let gate = rusqlite::Connection::open(dir.path().join("registry.sqlite3")).unwrap();
    gate.execute_batch("BEGIN IMMEDIATE").unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let update = http::Request::builder()
        .method("PUT")
        .uri(format!("{}{path}/m1", server.url()))
        .header("x-membrane-secret", &secret)
        .body(http_body_util::Full::new(bytes::Bytes::from(body(
            "10.0.0.9",
        ))))
        .unwrap();
    let update = tokio::spawn(client.request(update));
    let http2 = Http::new(server.url());
    let b2 = body("10.0.0.2");
    let fresh = tokio::spawn(async move {
        http2
            .call("PUT", "/v1/namespaces/store/membranes/m2", Some(&b2))
            .await
    });
    // Both are validated and queued to the store when the counter has moved.
    let deadline = Instant::now() + Duration::from_secs(3);
    while registrations_counted(&server).await < counted + 2 {
        assert!(Instant::now() < deadline, "the writes were never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !update.is_finished() && !fresh.is_finished(),
        "answered before the commit"
    );

    // Readers see the committed state only.
    let (status, v) = http.call("GET", &format!("{path}/m1"), None).await.unwrap();
    assert_eq!(
        (status, &v["addresses"][0]),
        (200, &"10.0.0.1".into()),
        "{v}"
    );
    let (status, _) = http.call("GET", &format!("{path}/m2"), None).await.unwrap();
    assert_eq!(status, 404, "a registration not yet committed is visible");
    let (_, v) = http.call("GET", path, None).await.unwrap();
    assert_eq!(v["membranes"].as_array().map(Vec::len), Some(1), "{v}");
    if has_dig {
        // (The zones of committed changes are rebuilt within milliseconds.)
        tokio::time::sleep(Duration::from_millis(100)).await;
        let out = dig("m1.store.").unwrap();
        assert_eq!(
            out.trim(),
            "10.0.0.1",
            "DNS serves an update not yet committed"
        );
        assert_eq!(
            dig("m2.store.").unwrap().trim(),
            "",
            "DNS serves m2 before its commit"
        );
    }

    // The commit goes through: both are answered and visible.
    gate.execute_batch("ROLLBACK").unwrap();
    assert_eq!(update.await.unwrap().unwrap().status(), 200);
    assert_eq!(fresh.await.unwrap().unwrap().0, 201);
    let (_, v) = http.call("GET", &format!("{path}/m1"), None).await.unwrap();
    assert_eq!(v["addresses"][0], "10.0.0.9", "{v}");
    let (status, _) = http.call("GET", &format!("{path}/m2"), None).await.unwrap();
    assert_eq!(status, 200);
    if has_dig {
        // DNS follows the commit.
        dns_serves("m1.store.", "10.0.0.9").await;
        dns_serves("m2.store.", "10.0.0.2").await;
    }
}
