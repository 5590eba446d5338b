//! `/v1/...` handlers, `/health`, `/status`, `/metrics`.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use shared::{CreateNamespace, HealthState, Registration};

use super::AppState;
use super::error::ApiError;
use super::extract::{self, JsonBody, P, Q};
use crate::registry::{Caller, ListFilter};

/// `GET /health`: liveness.
pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok", "service": "membrane-dns-server"}))
}

/// `GET /status`.
pub async fn status(State(s): State<AppState>) -> Json<Value> {
    let c = s.registry.counts();
    let failed = s.registry.store_failed();
    Json(json!({
        "status": if failed { "degraded" } else { "ok" },
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": s.started.elapsed().as_secs(),
        "store": {
            "kind": s.store_kind,
            "writable": !failed,
            "reachable": s.registry.store_reachable(),
            // Live registrations of namespaces that do not exist, kept on disk (see log).
            "orphaned_membranes": s.registry.orphaned(),
        },
        "auth": if s.admin_token_hash.is_some() { "token" } else { "open" },
        "namespaces": c.namespaces,
        "membranes": c.membranes,
        "passing": c.passing,
        "stale": c.stale,
        "self_preservation": s.registry.self_preservation(),
    }))
}

/// `GET /v1/stats`: totals and per-namespace counts.
pub async fn stats(State(s): State<AppState>) -> Json<Value> {
    let per: BTreeMap<String, _> = s
        .registry
        .counts_by_namespace()
        .into_iter()
        .map(|(n, c)| {
            (
                n.to_string(),
                json!({"membranes": c.membranes, "passing": c.passing, "stale": c.stale}),
            )
        })
        .collect();
    let m = &s.metrics;
    Json(json!({
        "totals": s.registry.counts(),
        "namespaces": per,
        "counters": {
            "registrations": m.registrations.get(),
            "deregistrations": m.deregistrations.get(),
            "heartbeats": m.heartbeats.get(),
            "evictions": m.evictions.get(),
        },
        "uptime_seconds": s.started.elapsed().as_secs(),
    }))
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(s): State<AppState>) -> Response {
    s.metrics
        .store_failed
        .set(i64::from(s.registry.store_failed()));
    s.registry.update_gauges();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

/// `GET /v1/namespaces`.
pub async fn list_namespaces(State(s): State<AppState>) -> Json<Value> {
    Json(json!({"namespaces": s.registry.list_namespaces()}))
}

/// `POST /v1/namespaces`.
pub async fn create_namespace(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<CreateNamespace>,
) -> Result<Response, ApiError> {
    let view = s.registry.create_namespace(&caller, req).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// `GET /v1/namespaces/{ns}`.
pub async fn get_namespace(
    State(s): State<AppState>,
    P(ns): P<String>,
) -> Result<Response, ApiError> {
    let ns = extract::ns(&ns)?;
    Ok(Json(s.registry.get_namespace(&ns)?).into_response())
}

/// Query of `DELETE /v1/namespaces/{ns}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

/// `DELETE /v1/namespaces/{ns}[?force=true]`.
pub async fn delete_namespace(
    State(s): State<AppState>,
    caller: Caller,
    P(ns): P<String>,
    Q(q): Q<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    let ns = extract::ns(&ns)?;
    s.registry.delete_namespace(&caller, &ns, q.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/namespaces/{ns}/join-token`: rotate.
pub async fn rotate_join_token(
    State(s): State<AppState>,
    caller: Caller,
    P(ns): P<String>,
) -> Result<Response, ApiError> {
    let ns = extract::ns(&ns)?;
    Ok(Json(s.registry.rotate_join_token(&caller, &ns).await?).into_response())
}

/// `PUT /v1/namespaces/{ns}/membranes/{id}`.
pub async fn register(
    State(s): State<AppState>,
    caller: Caller,
    P((ns, id)): P<(String, String)>,
    JsonBody(reg): JsonBody<Registration>,
) -> Result<Response, ApiError> {
    let (ns, id) = (extract::ns(&ns)?, extract::id(&id)?);
    let mut resp = s.registry.register(&caller, &ns, &id, reg).await?;
    // Only a caller admitted to register (join or admin token, or the instance secret)
    // gets here: it receives the namespace's relay key.
    resp.relay_key = s
        .admin_token_hash
        .map(|h| shared::relay_auth::to_hex(&shared::relay_auth::namespace_key(&h, ns.as_str())));
    let status = if resp.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(resp)).into_response())
}

/// `POST /v1/namespaces/{ns}/membranes/{id}/heartbeat`.
pub async fn heartbeat(
    State(s): State<AppState>,
    caller: Caller,
    P((ns, id)): P<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let (ns, id) = (extract::ns(&ns)?, extract::id(&id)?);
    let (state, ttl) = s.registry.heartbeat(&caller, &ns, &id).await?;
    Ok(Json(json!({"state": state, "ttl_seconds": ttl})))
}

/// `DELETE /v1/namespaces/{ns}/membranes/{id}`.
pub async fn deregister(
    State(s): State<AppState>,
    caller: Caller,
    P((ns, id)): P<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let (ns, id) = (extract::ns(&ns)?, extract::id(&id)?);
    s.registry.deregister(&caller, &ns, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/namespaces/{ns}/membranes/{id}`.
pub async fn get_membrane(
    State(s): State<AppState>,
    P((ns, id)): P<(String, String)>,
) -> Result<Response, ApiError> {
    let (ns, id) = (extract::ns(&ns)?, extract::id(&id)?);
    Ok(Json(s.registry.get(&ns, &id)?).into_response())
}

/// Query of `GET /v1/namespaces/{ns}/membranes`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    service: Option<String>,
    capability: Option<String>,
    tag: Option<String>,
    parent: Option<String>,
    state: Option<HealthState>,
}

impl From<ListQuery> for ListFilter {
    fn from(q: ListQuery) -> Self {
        let lower = |s: Option<String>| s.map(|s| s.to_ascii_lowercase());
        ListFilter {
            service: lower(q.service),
            capability: lower(q.capability),
            tag: lower(q.tag),
            parent: lower(q.parent),
            state: q.state,
        }
    }
}

/// `GET /v1/namespaces/{ns}/membranes?service=&capability=&tag=&parent=&state=`.
pub async fn list_membranes(
    State(s): State<AppState>,
    P(ns): P<String>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
    Q(q): Q<ListQuery>,
) -> Result<Response, ApiError> {
    let ns = extract::ns(&ns)?;
    let json =
        |body: bytes::Bytes| ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    // `revision`: the last event this list includes (resume the event stream after it);
    // `epoch`: the numbering it belongs to (see `http::sse`).
    let epoch = s.registry.events().epoch();
    let key = super::lists::ListKey {
        namespace: ns.as_str().to_string(),
        query: raw.unwrap_or_default(),
    };
    // The same list at the same revision, serialized less than a second ago (see
    // `http::lists`); the namespace is checked again (deleting an empty one publishes no
    // event).
    if let Some(body) = s.lists.get(&key, epoch, s.registry.events().revision()) {
        s.registry.check_namespace(&ns)?;
        s.metrics.list_cache_hits.inc();
        return Ok(json(body));
    }
    let (membranes, revision) = s.registry.list_shared(&ns, &q.into())?;
    // Serialized straight from the shared registrations: building a `serde_json::Value`
    // tree first cost more than the rest of a 20,000-membrane list (profiled under the
    // fleet bench).
    #[derive(serde::Serialize)]
    struct Answer {
        membranes: Vec<crate::registry::SharedView>,
        revision: u64,
        epoch: u64,
    }
    let body = serde_json::to_vec(&Answer {
        membranes,
        revision,
        epoch,
    })
    .map_err(|e| {
        tracing::error!(error = %e, "serializing a membrane list");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the list could not be serialized",
        )
    })?;
    let body = bytes::Bytes::from(body);
    // Health changes are visible at once but their events commit a moment later: answer
    // once they are durable (see `Registry::health_durable`).
    s.registry.health_durable().await;
    s.lists.put(key, epoch, revision, body.clone());
    Ok(json(body))
}

/// `GET /v1/namespaces/{ns}/tree`.
pub async fn tree(State(s): State<AppState>, P(ns): P<String>) -> Result<Json<Value>, ApiError> {
    let ns = extract::ns(&ns)?;
    let roots = s.registry.tree(&ns)?;
    Ok(Json(json!({"namespace": ns, "roots": roots})))
}
