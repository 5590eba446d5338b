//! Router tests: every route through `oneshot`, every kind of bad input with its status and
//! JSON error, and proof that a rejected request changes nothing.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;
use crate::registry::hash_secret;
use crate::store::sqlite;

const ADMIN: &str = "admin-token-0123456789";

/// Event stream subscribers the harness allows.
const SSE_MAX: usize = 8;

struct Harness {
    router: Router,
    /// The registry behind the router (the one DNS serves).
    registry: Arc<Registry>,
    state: AppState,
    _dir: tempfile::TempDir,
    _thread: sqlite::WriterThread,
}

fn harness(admin: Option<&str>) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let (loaded, writer, thread) = sqlite::open(&dir.path().join("db")).unwrap();
    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(Registry::new(loaded, writer, metrics.clone()));
    let state = AppState {
        registry: registry.clone(),
        metrics,
        admin_token_hash: admin.map(hash_secret),
        max_body: 4096,
        started: Instant::now(),
        store_kind: "sqlite",
        shutdown: CancellationToken::new(),
        zone_exporter: Some(Arc::new(|s| format!("zone {}", s.name))),
        sse_permits: Arc::new(tokio::sync::Semaphore::new(SSE_MAX)),
        sse_pacing: crate::http::sse::Pacing {
            cap: SSE_MAX,
            min_window: std::time::Duration::from_millis(20),
            writes_per_sec: 1_000,
        },
        lists: Default::default(),
    };
    Harness {
        router: router(state.clone()),
        registry,
        state,
        _dir: dir,
        _thread: thread,
    }
}

impl Harness {
    async fn call(
        &self,
        method: Method,
        uri: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(body.map(|b| Body::from(b.to_string())).unwrap_or_default())
            .unwrap();
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, v)
    }
    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.call(Method::GET, uri, None, &[]).await
    }
}

fn reg_body(port: u16) -> String {
    json!({"parent": "perception", "addresses": ["10.0.0.7"],
           "services": [{"name": "visual", "proto": "tcp", "port": port, "priority": 0, "weight": 10}],
           "capabilities": ["vision"], "tags": ["gpu"], "metadata": {"version": "1.2"},
           "endpoint": {"mode": "shared-volume", "path": "/var/lib/membrane/shared"},
           "ttl_seconds": 30})
    .to_string()
}

fn assert_error(resp: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(resp.0, status, "{}", resp.1);
    assert_eq!(resp.1["error"]["code"], code, "{}", resp.1);
    assert!(
        resp.1["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{}",
        resp.1
    );
}

const M: &str = "/v1/namespaces/cognitive-system/membranes/visual-worker-1";

#[tokio::test]
async fn register_get_list_heartbeat_deregister() {
    let h = harness(None);
    let (s, v) = h.call(Method::PUT, M, Some(&reg_body(7100)), &[]).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["created"], true);
    assert_eq!(v["membrane"]["state"], "passing");
    assert_eq!(v["membrane"]["namespace"], "cognitive-system");
    assert!(v["instance_secret"].as_str().unwrap().len() >= 32);
    assert!(v.get("relay_key").is_none(), "no admin token: no relay key");
    let secret = v["instance_secret"].as_str().unwrap().to_string();
    // Idempotent upsert (by the same instance).
    let (s, v) = h
        .call(
            Method::PUT,
            M,
            Some(&reg_body(7101)),
            &[("x-membrane-secret", &secret)],
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["created"], false);
    let (s, v) = h.get(M).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["services"][0]["port"], 7101);
    assert_eq!(v["metadata"]["version"], "1.2");

    let (s, v) = h
        .get("/v1/namespaces/cognitive-system/membranes?capability=vision&state=passing")
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["membranes"].as_array().unwrap().len(), 1);
    assert!(v["revision"].as_u64().is_some());
    let (_, v) = h
        .get("/v1/namespaces/cognitive-system/membranes?service=other")
        .await;
    assert!(v["membranes"].as_array().unwrap().is_empty());

    let (s, v) = h
        .call(Method::POST, &format!("{M}/heartbeat"), None, &[])
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v, json!({"state": "passing", "ttl_seconds": 30}));

    let (s, v) = h.get("/v1/namespaces/cognitive-system/tree").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["roots"][0]["id"], "visual-worker-1");
    assert_eq!(v["roots"][0]["orphan"], true);

    let (s, _) = h.call(Method::DELETE, M, None, &[]).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_error(&h.get(M).await, StatusCode::NOT_FOUND, "membrane_not_found");
    // Heartbeat for an unknown membrane: 404, so the agent re-registers.
    assert_error(
        &h.call(Method::POST, &format!("{M}/heartbeat"), None, &[])
            .await,
        StatusCode::NOT_FOUND,
        "membrane_not_found",
    );
}

#[tokio::test]
async fn bad_input_gets_its_own_error_and_changes_nothing() {
    let h = harness(None);
    let put = |uri: &'static str, body: String| {
        let h = &h;
        async move { h.call(Method::PUT, uri, Some(&body), &[]).await }
    };
    assert_error(
        &put("/v1/namespaces/Bad_NS/membranes/x", reg_body(1)).await,
        StatusCode::BAD_REQUEST,
        "invalid_name",
    );
    assert_error(
        &put("/v1/namespaces/ns/membranes/-x", reg_body(1)).await,
        StatusCode::BAD_REQUEST,
        "invalid_name",
    );
    assert_error(
        &put("/v1/namespaces/ns/membranes/x", "{not json".into()).await,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );
    assert_error(
        &put("/v1/namespaces/ns/membranes/x", String::new()).await,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );
    let unknown = put(
        "/v1/namespaces/ns/membranes/x",
        r#"{"services":[],"colour":"red"}"#.into(),
    )
    .await;
    assert_error(&unknown, StatusCode::UNPROCESSABLE_ENTITY, "invalid_field");
    assert!(
        unknown.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("colour")
    );
    assert_error(
        &put(
            "/v1/namespaces/ns/membranes/x",
            r#"{"services":[{"name":"a","port":"eighty"}]}"#.into(),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    let limit = put(
        "/v1/namespaces/ns/membranes/x",
        r#"{"services":[],"ttl_seconds":0}"#.into(),
    )
    .await;
    assert_error(&limit, StatusCode::UNPROCESSABLE_ENTITY, "invalid_field");
    assert!(
        limit.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ttl_seconds")
    );
    // Found by fuzzing (registration_zone): served as `_<name>`, a 63-character service
    // name made a 64-byte DNS label.
    let long_service = put(
        "/v1/namespaces/ns/membranes/x",
        format!(
            r#"{{"services":[{{"name":"{}","port":1}}]}}"#,
            "s".repeat(63)
        ),
    )
    .await;
    assert_error(
        &long_service,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    assert!(
        long_service.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("services[0].name")
    );
    let big = format!(
        r#"{{"services":[],"metadata":{{"k":"{}"}}}}"#,
        "x".repeat(5000)
    );
    assert_error(
        &put("/v1/namespaces/ns/membranes/x", big).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
    );
    assert_error(
        &h.get("/v1/namespaces/ns/membranes?bogus=1").await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    );
    assert_error(
        &h.get("/v1/namespaces/ns/membranes?state=dead").await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    );
    assert_error(
        &h.get("/nope").await,
        StatusCode::NOT_FOUND,
        "no_such_route",
    );
    assert_error(
        &h.call(Method::PATCH, M, None, &[]).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    // None of that created anything.
    let (_, v) = h.get("/v1/namespaces").await;
    assert_eq!(v, json!({"namespaces": []}));
}

#[tokio::test]
async fn namespaces_create_conflict_delete() {
    let h = harness(None);
    let body = r#"{"name":"cognitive-system","description":"AI cognitive architecture","settings":{"instance_ttl":10}}"#;
    let (s, v) = h
        .call(Method::POST, "/v1/namespaces", Some(body), &[])
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(v["join_token"].as_str().is_some());
    assert_eq!(v["settings"]["instance_ttl"], 10);
    assert_eq!(v["settings"]["record_ttl"], 5);
    assert_error(
        &h.call(Method::POST, "/v1/namespaces", Some(body), &[])
            .await,
        StatusCode::CONFLICT,
        "namespace_exists",
    );
    assert_error(
        &h.call(
            Method::POST,
            "/v1/namespaces",
            Some(r#"{"name":"x","settings":{"instance_ttl":0}}"#),
            &[],
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    let (s, v) = h.get("/v1/namespaces/cognitive-system").await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        v.get("join_token").is_none(),
        "token only shown at creation"
    );
    h.call(
        Method::PUT,
        "/v1/namespaces/cognitive-system/membranes/a",
        Some(&reg_body(1)),
        &[],
    )
    .await;
    assert_error(
        &h.call(Method::DELETE, "/v1/namespaces/cognitive-system", None, &[])
            .await,
        StatusCode::CONFLICT,
        "namespace_not_empty",
    );
    assert_eq!(
        h.get("/v1/namespaces/cognitive-system").await.1["membranes"],
        1
    );
    let (s, _) = h
        .call(
            Method::DELETE,
            "/v1/namespaces/cognitive-system?force=true",
            None,
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_error(
        &h.get("/v1/namespaces/cognitive-system").await,
        StatusCode::NOT_FOUND,
        "namespace_not_found",
    );
}

#[tokio::test]
async fn auth_with_admin_token_join_token_and_secret() {
    let h = harness(Some(ADMIN));
    let admin_auth = format!("Bearer {ADMIN}");
    let admin_hdr = [("authorization", admin_auth.as_str())];
    let create = r#"{"name":"secure"}"#;
    assert_error(
        &h.call(Method::POST, "/v1/namespaces", Some(create), &[])
            .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        &h.call(
            Method::POST,
            "/v1/namespaces",
            Some(create),
            &[("authorization", "Bearer wrong-token-xxxxxxxx")],
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &h.call(
            Method::POST,
            "/v1/namespaces",
            Some(create),
            &[("authorization", "Basic abc")],
        )
        .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let (s, v) = h
        .call(Method::POST, "/v1/namespaces", Some(create), &admin_hdr)
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let join = v["join_token"].as_str().unwrap().to_string();
    let join_hdr = format!("Bearer {join}");

    let uri = "/v1/namespaces/secure/membranes/a";
    // Register into an unknown namespace: 404, not auto-created.
    assert_error(
        &h.call(
            Method::PUT,
            "/v1/namespaces/other/membranes/a",
            Some(&reg_body(1)),
            &[("authorization", &join_hdr)],
        )
        .await,
        StatusCode::NOT_FOUND,
        "namespace_not_found",
    );
    assert_error(
        &h.call(Method::PUT, uri, Some(&reg_body(1)), &[]).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let (s, v) = h
        .call(
            Method::PUT,
            uri,
            Some(&reg_body(1)),
            &[("authorization", &join_hdr)],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let secret = v["instance_secret"].as_str().unwrap().to_string();
    // The namespace's relay key goes to the admitted caller: derived from the admin token,
    // one per namespace.
    let hash = hash_secret(ADMIN);
    assert_eq!(
        v["relay_key"],
        shared::relay_auth::to_hex(&shared::relay_auth::namespace_key(&hash, "secure"))
    );
    // Someone else with the join token cannot take the id over.
    assert_error(
        &h.call(
            Method::PUT,
            uri,
            Some(&reg_body(2)),
            &[("authorization", &join_hdr)],
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_eq!(h.get(uri).await.1["services"][0]["port"], 1);
    // Heartbeat / deregister need the secret.
    let hb = format!("{uri}/heartbeat");
    assert_error(
        &h.call(Method::POST, &hb, None, &[]).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        &h.call(Method::POST, &hb, None, &[("x-membrane-secret", "nope")])
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let (s, _) = h
        .call(Method::POST, &hb, None, &[("x-membrane-secret", &secret)])
        .await;
    assert_eq!(s, StatusCode::OK);
    // The registrant (with its secret) publishes its relay public key: shown in discovery
    // answers; a malformed one is refused and changes nothing.
    let key = "ab".repeat(32);
    let with_key = |k: &str| {
        let mut v: Value = serde_json::from_str(&reg_body(1)).unwrap();
        v["relay_public_key"] = json!(k);
        v.to_string()
    };
    assert_error(
        &h.call(
            Method::PUT,
            uri,
            Some(&with_key("not-a-key")),
            &[("x-membrane-secret", &secret), ("authorization", &join_hdr)],
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    assert!(h.get(uri).await.1.get("relay_public_key").is_none());
    let (s, v) = h
        .call(
            Method::PUT,
            uri,
            Some(&with_key(&key)),
            &[("x-membrane-secret", &secret), ("authorization", &join_hdr)],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(h.get(uri).await.1["relay_public_key"], key);
    let list = h.get("/v1/namespaces/secure/membranes").await.1;
    assert_eq!(list["membranes"][0]["relay_public_key"], key, "{list}");
    assert_error(
        &h.call(Method::DELETE, uri, None, &[("x-membrane-secret", "nope")])
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    // Reads are open.
    assert_eq!(h.get(uri).await.0, StatusCode::OK);
    // Rotate: the old join token stops working.
    let (s, v) = h
        .call(
            Method::POST,
            "/v1/namespaces/secure/join-token",
            None,
            &admin_hdr,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_ne!(v["join_token"].as_str().unwrap(), join);
    assert_error(
        &h.call(
            Method::PUT,
            "/v1/namespaces/secure/membranes/b",
            Some(&reg_body(1)),
            &[("authorization", &join_hdr)],
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    // Namespace deletion is admin-only.
    assert_error(
        &h.call(
            Method::DELETE,
            "/v1/namespaces/secure?force=true",
            None,
            &[("authorization", &join_hdr)],
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let (s, _) = h
        .call(Method::DELETE, uri, None, &[("x-membrane-secret", &secret)])
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn reference_alias_routes() {
    let h = harness(None);
    let (s, v) = h
        .call(
            Method::POST,
            "/register",
            Some(r#"{"membrane_id":"perception","namespace":"cognitive-system","parent_membrane":"cognitive-root","capabilities":["vision"],"mode":"shared-volume","endpoint":"/shared"}"#),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["status"], "registered");
    let (s, v) = h.get("/discover/perception").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["membrane_id"], "perception");
    assert_eq!(v["namespace_name"], "cognitive-system");
    assert_eq!(v["parent_membrane"], "cognitive-root");
    assert_eq!(v["status"], "active");
    assert_eq!(v["endpoint"], "/shared");
    assert_eq!(v["communication_mode"], "shared-volume");
    let (s, v) = h
        .call(
            Method::POST,
            "/heartbeat",
            Some(r#"{"membrane_id":"perception","namespace":"cognitive-system"}"#),
            &[],
        )
        .await;
    assert_eq!((s, v["state"].clone()), (StatusCode::OK, json!("passing")));
    assert_eq!(h.get("/list").await.1.as_array().unwrap().len(), 1);
    assert_eq!(
        h.get("/api/membranes/discover?namespace_id=cognitive-system")
            .await
            .1["membranes"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Reference 004's registry, into the default namespace.
    let (s, v) = h
        .call(
            Method::POST,
            "/api/register",
            Some(r#"{"id":"hello-service","name":"Hello Service","version":"1.0.0","capabilities":["greet","farewell"],"location":"http://localhost:3000","mode":"http"}"#),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["service_id"], "hello-service");
    let (_, v) = h.get("/api/capabilities/greet").await;
    assert_eq!(v["id"], "hello-service");
    assert_eq!(v["status"], "active");
    assert_eq!(v["mode"], "http");
    assert_eq!(v["location"], "http://localhost:3000");
    assert_eq!(v["name"], "Hello Service");
    assert_error(
        &h.get("/api/capabilities/fly").await,
        StatusCode::NOT_FOUND,
        "capability_not_found",
    );
    assert_eq!(
        h.get("/api/services").await.1["services"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        h.get("/api/services/hello-service").await.1["version"],
        "1.0.0"
    );
    let (s, _) = h
        .call(Method::DELETE, "/api/services/hello-service", None, &[])
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_error(
        &h.get("/api/services/hello-service").await,
        StatusCode::NOT_FOUND,
        "membrane_not_found",
    );
    let (s, _) = h
        .call(
            Method::POST,
            "/deregister",
            Some(r#"{"membrane_id":"perception","namespace":"cognitive-system"}"#),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_error(
        &h.call(
            Method::POST,
            "/register",
            Some(r#"{"membrane_id":"x","bogus":1}"#),
            &[],
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    assert_eq!(h.get("/list").await.1, json!([]));
}

#[tokio::test]
async fn health_status_stats_metrics_page_zone() {
    let h = harness(None);
    h.call(Method::PUT, M, Some(&reg_body(1)), &[]).await;
    assert_eq!(h.get("/health").await.1["status"], "ok");
    let (_, v) = h.get("/status").await;
    assert_eq!(
        (v["membranes"].clone(), v["auth"].clone()),
        (json!(1), json!("open"))
    );
    assert_eq!(v["self_preservation"]["active"], json!(false), "{v}");
    assert_eq!(v["self_preservation"]["threshold"], json!(0.15), "{v}");
    let (_, v) = h.get("/v1/stats").await;
    assert_eq!(v["counters"]["registrations"], 1);
    assert_eq!(v["namespaces"]["cognitive-system"]["passing"], 1);
    let (s, v) = h.get("/metrics").await;
    assert_eq!(s, StatusCode::OK);
    let text = v.as_str().unwrap();
    assert!(text.contains("membrane_registrations_total 1"), "{text}");
    assert!(text.contains("membrane_self_preservation 0"), "{text}");
    assert!(
        text.contains("route=\"/v1/namespaces/{ns}/membranes/{id}\""),
        "{text}"
    );
    let (s, v) = h.get("/").await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        v.as_str()
            .unwrap()
            .contains("<title>membrane registry</title>")
    );
    let (s, v) = h.get("/v1/namespaces/cognitive-system/zone").await;
    assert_eq!((s, v), (StatusCode::OK, json!("zone cognitive-system")));
    assert_error(
        &h.get("/v1/namespaces/none/zone").await,
        StatusCode::NOT_FOUND,
        "namespace_not_found",
    );
}

/// Opens the events stream of `cognitive-system` (optionally resuming) and returns its body.
async fn events(h: &Harness, last_id: Option<String>) -> Body {
    let mut req = Request::builder().uri("/v1/namespaces/cognitive-system/events");
    if let Some(id) = last_id {
        req = req.header("last-event-id", id);
    }
    let resp = h
        .router
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    resp.into_body()
}

/// The next chunk of an SSE body, as text.
async fn next_frame(body: &mut Body) -> String {
    let frame = body.frame().await.unwrap().unwrap();
    String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap()
}

#[tokio::test]
async fn events_stream_replays_after_last_event_id() {
    let h = harness(None);
    h.call(Method::PUT, M, Some(&reg_body(1)), &[]).await;
    assert_error(
        &h.get("/v1/namespaces/unknown/events").await,
        StatusCode::NOT_FOUND,
        "namespace_not_found",
    );
    // Subscribe live, then cause an event (a heartbeat of a passing membrane causes none).
    let mut body = events(&h, None).await;
    h.call(Method::POST, &format!("{M}/heartbeat"), None, &[])
        .await;
    h.call(Method::DELETE, M, None, &[]).await;
    let text = next_frame(&mut body).await;
    assert!(text.contains("event: deregistered"), "{text}");
    let id: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .unwrap()
        .parse()
        .unwrap();
    // Resume from before the deregistration: it is replayed.
    let text = next_frame(&mut events(&h, Some((id - 1).to_string())).await).await;
    assert!(text.contains(&format!("id: {id}")), "{text}");
    // A position from before this process: resync.
    let text = next_frame(&mut events(&h, Some("3".into())).await).await;
    assert!(text.contains("event: resync"), "{text}");
    // Positions that are not ours (not a number, past u64): resync, not a silent start.
    for bad in ["12a", "99999999999999999999", "-1"] {
        let text = next_frame(&mut events(&h, Some(bad.into())).await).await;
        assert!(text.contains("event: resync"), "{bad}: {text}");
    }
}

/// The list's `revision` is where the event stream resumes: a change committed between the
/// list and the subscription is replayed, not lost; and the epoch of the list matches the
/// stream's.
#[tokio::test]
async fn events_between_a_list_and_the_subscription_are_not_lost() {
    let h = harness(None);
    h.call(Method::PUT, M, Some(&reg_body(1)), &[]).await;
    let (s, list) = h.get("/v1/namespaces/cognitive-system/membranes").await;
    assert_eq!(s, StatusCode::OK);
    let revision = list["revision"].as_u64().unwrap();
    let epoch = list["epoch"].as_u64().unwrap();
    assert_eq!(list["membranes"].as_array().unwrap().len(), 1);
    // After the list, before the subscription: two changes.
    h.call(
        Method::PUT,
        "/v1/namespaces/cognitive-system/membranes/late",
        Some(&reg_body(2)),
        &[],
    )
    .await;
    h.call(Method::DELETE, M, None, &[]).await;
    let resp = h
        .router
        .clone()
        .oneshot(
            Request::builder()
                .uri("/v1/namespaces/cognitive-system/events")
                .header("last-event-id", revision.to_string())
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["membrane-event-epoch"].to_str().unwrap(),
        epoch.to_string()
    );
    let mut body = resp.into_body();
    let first = next_frame(&mut body).await;
    let second = next_frame(&mut body).await;
    assert!(
        first.contains("event: registered") && first.contains("\"id\":\"late\""),
        "{first}"
    );
    assert!(
        second.contains("event: deregistered") && second.contains("visual-worker-1"),
        "{second}"
    );
    assert!(first.contains(&format!("id: {}", revision + 1)), "{first}");
}

#[tokio::test]
async fn open_mode_refuses_a_takeover_unless_asked_to_replace() {
    let h = harness(None);
    let (s, first) = h.call(Method::PUT, M, Some(&reg_body(7100)), &[]).await;
    assert_eq!(s, StatusCode::CREATED, "{first}");
    let secret = first["instance_secret"].as_str().unwrap().to_string();
    // Another instance (no secret, or a wrong one): 409 naming the id; nothing changes.
    for headers in [&[][..], &[("x-membrane-secret", "not-it")][..]] {
        let resp = h.call(Method::PUT, M, Some(&reg_body(7200)), headers).await;
        assert_error(&resp, StatusCode::CONFLICT, "already_registered");
        let msg = resp.1["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("visual-worker-1") && msg.contains("replace=true"),
            "{msg}"
        );
    }
    // The legacy alias route follows the same rule.
    assert_error(
        &h.call(
            Method::POST,
            "/register",
            Some(r#"{"membrane_id":"visual-worker-1","namespace":"cognitive-system"}"#),
            &[],
        )
        .await,
        StatusCode::CONFLICT,
        "already_registered",
    );
    let (_, v) = h.get(M).await;
    assert_eq!(v["services"][0]["port"], 7100, "{v}");
    // The same instance (its secret) updates it and keeps the secret.
    let (s, v) = h
        .call(
            Method::PUT,
            M,
            Some(&reg_body(7300)),
            &[("x-membrane-secret", &secret)],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["instance_secret"], secret.as_str());
    // A bad flag is a clear 400.
    assert_error(
        &h.call(
            Method::PUT,
            &format!("{M}?replace=yes"),
            Some(&reg_body(7400)),
            &[],
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    );
    // Asking to replace takes it over with a new secret; the old one is then refused.
    let (s, v) = h
        .call(
            Method::PUT,
            &format!("{M}?replace=true"),
            Some(&reg_body(7500)),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_ne!(v["instance_secret"], secret.as_str());
    assert_eq!(v["membrane"]["services"][0]["port"], 7500);
    assert_error(
        &h.call(
            Method::PUT,
            M,
            Some(&reg_body(7600)),
            &[("x-membrane-secret", &secret)],
        )
        .await,
        StatusCode::CONFLICT,
        "already_registered",
    );
}

mod compat;

/// A client inventing method names (and paths) must not add series to `/metrics`: labels
/// come from a closed set (known methods + `other`, matched route or `none`).
#[tokio::test]
async fn metrics_labels_are_a_closed_set() {
    let h = harness(None);
    let metrics_len = |v: Value| v.as_str().unwrap().len();
    // One request of each kind first, so that every series that can exist does.
    h.call(
        Method::from_bytes(b"FIRST").unwrap(),
        "/nowhere-0",
        None,
        &[],
    )
    .await;
    h.call(Method::from_bytes(b"FIRST").unwrap(), "/health", None, &[])
        .await;
    h.get("/nowhere-1").await;
    h.get("/metrics").await;
    let before = metrics_len(h.get("/metrics").await.1);
    for i in 0..300 {
        let method = Method::from_bytes(format!("M{i}X{}", i * 7919).as_bytes()).unwrap();
        let (s, _) = h.call(method.clone(), "/health", None, &[]).await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
        h.call(method, &format!("/nowhere-{i}"), None, &[]).await;
        h.get(&format!("/random/path/{i}")).await;
    }
    let (_, v) = h.get("/metrics").await;
    let text = v.as_str().unwrap();
    assert!(!text.contains("M1X"), "a method name became a label");
    assert!(!text.contains("nowhere"), "a raw path became a label");
    assert!(text.contains("method=\"other\""), "{text}");
    assert!(text.contains("route=\"none\""), "{text}");
    // Counts and sums change length a little; new series would add kilobytes each.
    assert!(
        metrics_len(v.clone()) < before + 200,
        "/metrics grew from {before} to {} bytes",
        metrics_len(v)
    );
}

/// An event for membrane `m{i}` of `ns` (what the SSE tests publish).
pub(crate) fn gone(ns: &shared::NamespaceName, i: usize) -> shared::Event {
    shared::Event::Deregistered {
        namespace: ns.clone(),
        id: shared::MembraneId::new(&format!("m{i}")).unwrap(),
        reason: "deregistered".into(),
    }
}

/// Subscribers resuming from an old `Last-Event-ID` and never reading must not pin private
/// copies of the history: far behind they get `resync` (nothing replayed), near behind
/// they get references to the bytes published once, and a stalled live subscriber holds
/// only its position in the shared history (then `resync`).
#[tokio::test]
async fn sse_subscribers_share_event_bytes_and_have_bounded_queues() {
    use crate::registry::events::{REPLAY_MAX, RING};
    let h = harness(None);
    h.call(Method::PUT, M, Some(&reg_body(1)), &[]).await;
    let ns = shared::NamespaceName::new("cognitive-system").unwrap();
    let hub = h.state.registry.events();
    let first = hub.publish(&ns, gone(&ns, 0));
    for i in 1..3 * REPLAY_MAX {
        hub.publish(&ns, gone(&ns, i));
    }
    // Far behind (but within the history): a resync, not 3,000 replayed events each.
    let mut stalled = Vec::new();
    for _ in 0..SSE_MAX - 1 {
        let mut body = events(&h, Some(first.to_string())).await;
        let text = next_frame(&mut body).await;
        assert!(text.contains("event: resync"), "{text}");
        stalled.push(body);
    }
    // Near behind: replayed, each frame the very bytes the hub published.
    let rev = hub.revision();
    let mut body = events(&h, Some((rev - 10).to_string())).await;
    let published = hub.subscribe(&ns, Some(rev - 10));
    assert_eq!(published.replay.len(), 10);
    for (seq, p) in &published.replay {
        let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(frame.as_ptr(), p.frame().as_ptr(), "event {seq} was copied");
    }
    // A live subscriber that stops reading: more than the history later, its next frame
    // is a resync, not a queue of everything it missed.
    for i in 0..RING + 10 {
        hub.publish(&ns, gone(&ns, i));
    }
    let text = next_frame(&mut body).await;
    assert!(text.contains("event: resync"), "{text}");
}

/// Reads frames of `body` until `n` events have arrived; their text.
async fn read_events(body: &mut Body, n: usize) -> String {
    let mut text = String::new();
    while text.matches("\nevent: ").count() + usize::from(text.starts_with("event: ")) < n {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), next_frame(body))
            .await
            .expect("events missing");
        text.push_str(&chunk);
    }
    text
}

/// A live subscriber that does not read while thousands of events are published (more
/// than any per-subscriber queue would hold) gets every one of them when it reads again,
/// and no `resync` as long as they are in the shared history.
#[tokio::test]
async fn a_stalled_subscriber_catches_up_from_the_history() {
    let h = harness(None);
    h.call(Method::PUT, M, Some(&reg_body(1)), &[]).await;
    let ns = shared::NamespaceName::new("cognitive-system").unwrap();
    let hub = h.state.registry.events();
    let mut body = events(&h, None).await;
    let start = hub.revision();
    for i in 0..5_000 {
        hub.publish(&ns, gone(&ns, i));
    }
    let text = read_events(&mut body, 5_000).await;
    assert!(!text.contains("resync"));
    let ids: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(ids, (start + 1..=start + 5_000).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_full_registry_answers_503_registry_full() {
    let h = harness(None);
    h.registry.set_limits(crate::registry::Limits {
        namespaces: 1,
        membranes: 1,
    });
    let (s, _) = h.call(Method::PUT, M, Some(&reg_body(1)), &[]).await;
    assert_eq!(s, StatusCode::CREATED);
    let other = "/v1/namespaces/cognitive-system/membranes/visual-worker-2";
    let resp = h.call(Method::PUT, other, Some(&reg_body(2)), &[]).await;
    assert_error(&resp, StatusCode::SERVICE_UNAVAILABLE, "registry_full");
    let resp = h
        .call(
            Method::POST,
            "/v1/namespaces",
            Some(r#"{"name": "other"}"#),
            &[],
        )
        .await;
    assert_error(&resp, StatusCode::SERVICE_UNAVAILABLE, "registry_full");
    assert_eq!(h.registry.counts().membranes, 1);
    assert_eq!(h.registry.counts().namespaces, 1);
}

#[tokio::test]
async fn sse_subscribers_are_capped_with_a_clear_503() {
    let h = harness(None);
    h.call(Method::PUT, M, Some(&reg_body(1)), &[]).await;
    let mut open = Vec::new();
    for _ in 0..SSE_MAX {
        open.push(events(&h, None).await);
    }
    // (A stream would never end: the timeout turns that into a failure.)
    let resp = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        h.get("/v1/namespaces/cognitive-system/events"),
    )
    .await
    .expect("a ninth subscriber was accepted");
    assert_error(
        &resp,
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_subscribers",
    );
    // A subscriber leaving frees its place.
    drop(open.pop());
    open.push(events(&h, None).await);
}

/// Identical lists at the same revision are serialized once (a restart's list storm);
/// any change is a new revision and never answered from the shared copy, and a deleted
/// namespace is 404 even with a copy of its list.
#[tokio::test]
async fn identical_lists_are_serialized_once_and_never_hide_a_change() {
    let h = harness(None);
    let list = "/v1/namespaces/cognitive-system/membranes";
    let (s, _) = h.call(Method::PUT, M, Some(&reg_body(7100)), &[]).await;
    assert_eq!(s, StatusCode::CREATED);
    let hits = || h.state.metrics.list_cache_hits.get();
    let first = h.get(list).await;
    assert_eq!(first.0, StatusCode::OK);
    assert_eq!(hits(), 0);
    let second = h.get(list).await;
    assert_eq!(second, first);
    assert_eq!(hits(), 1, "the same list at the same revision is shared");
    // Another query is another answer.
    let (_, stale) = h.get(&format!("{list}?state=stale")).await;
    assert_eq!(stale["membranes"], json!([]));
    assert_eq!(hits(), 1);
    // A change: a new revision, listed afresh.
    let other = "/v1/namespaces/cognitive-system/membranes/visual-worker-2";
    let (s, _) = h.call(Method::PUT, other, Some(&reg_body(7101)), &[]).await;
    assert_eq!(s, StatusCode::CREATED);
    let (_, v) = h.get(list).await;
    assert_eq!(v["membranes"].as_array().unwrap().len(), 2, "{v}");
    assert!(v["revision"].as_u64() > first.1["revision"].as_u64());
    assert_eq!(hits(), 1);
    // An empty namespace deleted after its list was shared: 404, not the copy.
    let (s, _) = h
        .call(
            Method::POST,
            "/v1/namespaces",
            Some(r#"{"name":"empty"}"#),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let empty = "/v1/namespaces/empty/membranes";
    assert_eq!(h.get(empty).await.0, StatusCode::OK);
    let (s, _) = h
        .call(Method::DELETE, "/v1/namespaces/empty", None, &[])
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_error(
        &h.get(empty).await,
        StatusCode::NOT_FOUND,
        "namespace_not_found",
    );
}
