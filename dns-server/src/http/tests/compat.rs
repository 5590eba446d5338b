//! The seed systems' own clients, as captured running unmodified against this server
//! (`tests/fixtures/seed-clients.json`, see its README): every request is replayed as sent
//! and must get the status and the fields that client reads; every write must show in the
//! `/v1` API and in the DNS zone of the same registry.

use std::collections::HashMap;
use std::time::Duration;

use super::*;
use crate::dns::{DnsConfig, export_zone};
use shared::NamespaceName;

const FIXTURE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/seed-clients.json"
));

/// `ptr` in `v`; `ptr#len` is the length of the array at `ptr`.
fn pointer(v: &Value, ptr: &str) -> Option<Value> {
    match ptr.strip_suffix("#len") {
        Some(p) => v.pointer(p)?.as_array().map(|a| json!(a.len())),
        None => v.pointer(ptr).cloned(),
    }
}

fn zone(h: &Harness, ns: &str) -> String {
    let snap = h
        .registry
        .snapshot(&NamespaceName::new(ns).unwrap())
        .unwrap_or_else(|| panic!("no namespace {ns}"));
    export_zone(&snap, &DnsConfig::default())
}

/// The records of `name` in a master file, one per line.
fn records<'a>(zone: &'a str, name: &str) -> Vec<&'a str> {
    zone.lines()
        .filter(|l| l.split_whitespace().next() == Some(name))
        .collect()
}

#[tokio::test]
async fn seed_clients_replayed_get_what_they_read_and_show_in_v1() {
    let h = harness(None);
    let exchanges: Vec<Value> = serde_json::from_str(FIXTURE).unwrap();
    assert!(exchanges.len() > 40);
    // id -> namespace, from the registrations replayed so far.
    let mut ns_of: HashMap<String, String> = HashMap::new();
    // Every call that does not answer as the client needs, reported together.
    let mut wrong: Vec<String> = Vec::new();
    for e in &exchanges {
        let (client, path) = (e["client"].as_str().unwrap(), e["path"].as_str().unwrap());
        let method: Method = e["method"].as_str().unwrap().parse().unwrap();
        let body = e["body"].as_str();
        let (status, v) = h.call(method.clone(), path, body, &[]).await;
        let what = format!("{client}: {method} {path} -> {status} {v}");
        if status.as_u16() != e["status"] {
            wrong.push(format!("status, not {}: {what}", e["status"]));
            continue;
        }
        for (ptr, want) in e["expect"].as_object().unwrap() {
            let got = pointer(&v, ptr);
            let ok = if want == "<timestamp>" {
                let t = got.as_ref().and_then(Value::as_str).unwrap_or("");
                t.len() >= 20 && t.contains('T')
            } else {
                got.as_ref() == Some(want)
            };
            if !ok {
                wrong.push(format!("{ptr} is {got:?}, not {want}: {what}"));
            }
        }
        if !status.is_success() {
            continue;
        }
        // The same registry through /v1.
        let req: Value = body
            .map(|b| serde_json::from_str(b).unwrap())
            .unwrap_or_default();
        let is_register = method == Method::POST
            && matches!(
                path,
                "/register" | "/api/register" | "/api/membranes/register"
            );
        let id = req["id"]
            .as_str()
            .or(req["membrane_id"].as_str())
            .map(str::to_string)
            .or_else(|| {
                let p = path.split('?').next().unwrap();
                let p = p.strip_suffix("/heartbeat").unwrap_or(p);
                (path.starts_with("/api/unregister/")
                    || path.starts_with("/api/heartbeat/")
                    || path.starts_with("/api/membranes/") && path.ends_with("/heartbeat"))
                .then(|| p.rsplit('/').next().unwrap().to_string())
            });
        let Some(id) = id else { continue };
        if is_register {
            let ns = req["namespace_id"].as_str().unwrap_or("default");
            ns_of.insert(id.clone(), ns.to_string());
        }
        let ns = &ns_of[&id];
        let (s, m) = h.get(&format!("/v1/namespaces/{ns}/membranes/{id}")).await;
        if path == "/deregister" || path.starts_with("/api/unregister/") {
            assert_eq!(s, StatusCode::NOT_FOUND, "gone from /v1 after {what}");
            continue;
        }
        assert_eq!(s, StatusCode::OK, "in /v1 after {what}: {m}");
        assert_eq!(m["state"], "passing", "{what}: {m}");
        if is_register {
            let parent = req.get("parent").or(req.get("parent_membrane"));
            assert_eq!(m.get("parent"), parent.filter(|p| !p.is_null()), "{m}");
            if let Some(caps) = req.get("capabilities") {
                assert_eq!(&m["capabilities"], caps, "{m}");
            }
            if let Some(target) = req.get("endpoint").or(req.get("location")) {
                let target = target.as_str().unwrap();
                let ep = &m["endpoint"];
                let t = ep["path"].as_str().or(ep["address"].as_str()).unwrap();
                assert!(target.contains(t), "{target} vs {m}");
            }
        }
    }

    assert!(
        wrong.is_empty(),
        "{} calls answered wrongly:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // The same registry in DNS: what is registered is served, what was removed is not.
    let default = zone(&h, "default");
    let txt = records(&default, "perception.default.").join("\n");
    assert!(txt.contains("\"endpoint=localhost:9730\""), "{default}");
    assert!(txt.contains("parent=cognitive-root"), "{default}");
    assert!(!records(&default, "cognitive-root.default.").is_empty());
    assert!(
        records(&default, "motor.default.").is_empty(),
        "deregistered"
    );
    assert!(
        records(&default, "hello-service.default.").is_empty(),
        "unregistered"
    );
    let cog = zone(&h, "cognitive-system");
    let vc = records(&cog, "visual-cortex.cognitive-system.").join("\n");
    assert!(vc.contains("10.0.0.21"), "{cog}");
    assert!(
        cog.lines()
            .any(|l| l.contains("SRV") && l.contains("7201 visual-cortex.cognitive-system.")),
        "{cog}"
    );
    let mc = records(&cog, "motor-cortex.cognitive-system.").join("\n");
    assert!(mc.contains("192.0.2.2"), "{cog}");
}

#[tokio::test(start_paused = true)]
async fn alias_heartbeats_keep_membranes_passing_in_v1_and_dns() {
    let h = harness(None);
    for (path, body) in [
        (
            "/register",
            r#"{"id":"a","endpoint":"/shared/a","communication_mode":"shared-volume"}"#,
        ),
        (
            "/api/membranes/register",
            r#"{"membrane_id":"b","host":"10.0.0.2","port":7000}"#,
        ),
        (
            "/api/register",
            r#"{"id":"c","name":"C","capabilities":["greet"],"location":"http://localhost:3100","mode":"http"}"#,
        ),
        (
            "/register",
            r#"{"id":"quiet","endpoint":"/shared/q","communication_mode":"shared-volume"}"#,
        ),
    ] {
        let (s, v) = h.call(Method::POST, path, Some(body), &[]).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    tokio::time::advance(Duration::from_secs(20)).await;
    for (path, body) in [
        ("/heartbeat", Some(r#"{"id":"a"}"#)),
        ("/api/membranes/b/heartbeat", None),
        ("/api/heartbeat/c", None),
    ] {
        let (s, v) = h.call(Method::POST, path, body, &[]).await;
        assert_eq!(s, StatusCode::OK, "{path}: {v}");
        assert_eq!(v["success"], true, "{v}");
    }
    tokio::time::advance(Duration::from_secs(20)).await;
    h.registry.sweep();
    for id in ["a", "b", "c"] {
        let (_, m) = h
            .get(&format!("/v1/namespaces/default/membranes/{id}"))
            .await;
        assert_eq!(m["state"], "passing", "{id} was heartbeated: {m}");
    }
    let (_, m) = h.get("/v1/namespaces/default/membranes/quiet").await;
    assert_eq!(m["state"], "stale", "no heartbeat: {m}");
    let z = zone(&h, "default");
    for id in ["a", "b", "c"] {
        assert!(!records(&z, &format!("{id}.default.")).is_empty(), "{z}");
    }
    assert!(records(&z, "quiet.default.").is_empty(), "{z}");
    let (_, v) = h.get("/api/services?status=inactive").await;
    assert_eq!(
        (v["count"].clone(), v["services"][0]["id"].clone()),
        (json!(1), json!("quiet"))
    );
}

#[tokio::test]
async fn bad_compat_input_is_refused_and_changes_nothing() {
    let h = harness(None);
    for (method, path, body, status, code) in [
        (
            Method::POST,
            "/register",
            Some(r#"{"id":"x","endpoint":"localhost:9000","communication_mode":"carrier-pigeon"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            Method::POST,
            "/register",
            Some(r#"{"id":"x","endpoint":"relative/path","communication_mode":"ipc"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            Method::POST,
            "/api/register",
            Some(
                r#"{"id":"x","capabilities":["Not A Label!"],"location":"http://localhost:1","mode":"http"}"#,
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            Method::POST,
            "/api/namespaces",
            Some(r#"{"name":"child","parent_namespace":"root"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            Method::POST,
            "/api/namespaces",
            Some(r#"{"name":"child","metadata":{"k":"v"}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            Method::GET,
            "/api/services?status=sleepy",
            None,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            Method::GET,
            "/list?colour=red",
            None,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            Method::POST,
            "/api/discover",
            Some(r#"{"capabilities":"greet"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            Method::POST,
            "/api/heartbeat/nobody",
            None,
            StatusCode::NOT_FOUND,
            "membrane_not_found",
        ),
        (
            Method::DELETE,
            "/api/unregister/nobody",
            None,
            StatusCode::NOT_FOUND,
            "membrane_not_found",
        ),
    ] {
        assert_error(&h.call(method, path, body, &[]).await, status, code);
    }
    assert_eq!(h.get("/list").await.1, json!([]));
    assert_eq!(h.get("/v1/namespaces").await.1["namespaces"], json!([]));
}

#[tokio::test]
async fn an_id_in_two_namespaces_is_ambiguous_without_a_namespace() {
    let h = harness(None);
    for ns in ["one", "two"] {
        let body = format!(r#"{{"membrane_id":"m","namespace_id":"{ns}","host":"10.0.0.1"}}"#);
        let (s, v) = h
            .call(Method::POST, "/api/membranes/register", Some(&body), &[])
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    assert_error(
        &h.call(Method::POST, "/api/membranes/m/heartbeat", None, &[])
            .await,
        StatusCode::CONFLICT,
        "ambiguous",
    );
    let (s, v) = h
        .call(
            Method::POST,
            "/api/membranes/m/heartbeat?namespace_id=two",
            None,
            &[],
        )
        .await;
    assert_eq!((s, v["namespace"].clone()), (StatusCode::OK, json!("two")));
    // Calls without a namespace mean `default` when it is one of them, as writes do.
    let (s, v) = h
        .call(Method::POST, "/register", Some(r#"{"id":"m"}"#), &[])
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = h
        .call(Method::POST, "/heartbeat", Some(r#"{"id":"m"}"#), &[])
        .await;
    assert_eq!(
        (s, v["namespace"].clone()),
        (StatusCode::OK, json!("default"))
    );
    assert_eq!(h.get("/discover/m").await.1["namespace"], "default");
}

#[tokio::test]
async fn legacy_register_refuses_a_metadata_key_given_twice() {
    let h = harness(None);
    for path in ["/register", "/api/register", "/api/membranes/register"] {
        let resp = h
            .call(
                Method::POST,
                path,
                Some(r#"{"id":"a","metadata":{"k":"1","k":"2"}}"#),
                &[],
            )
            .await;
        assert_error(&resp, StatusCode::UNPROCESSABLE_ENTITY, "invalid_field");
        assert!(
            resp.1["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("metadata key \"k\" given twice")),
            "{path}: {}",
            resp.1
        );
    }
    assert_eq!(h.get("/list").await.1, json!([]));
    assert_eq!(h.get("/v1/namespaces").await.1["namespaces"], json!([]));
    // Distinct keys, of any JSON type, still register.
    let (s, v) = h
        .call(
            Method::POST,
            "/api/register",
            Some(r#"{"id":"a","metadata":{"k":"1","n":2}}"#),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (_, v) = h.get("/api/services/a").await;
    assert_eq!(v["metadata"], json!({"k": "1", "n": "2"}), "{v}");
}
