//! The HTTP admin API (axum on hyper): routes, shared state, latency metrics, serving.

pub mod accept;
pub mod error;
pub mod extract;
pub mod legacy;
pub mod lists;
pub mod paced;
pub mod sse;
pub mod tls;
pub mod ui;
pub mod v1;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use tokio_util::sync::CancellationToken;

use crate::metrics::{HttpLabels, Metrics};
use crate::registry::Registry;
pub use accept::HttpLimits;
use error::ApiError;

/// Renders a namespace for `GET /v1/namespaces/{ns}/zone` (the DNS side's master file).
pub type ZoneExporter = Arc<dyn Fn(&crate::snapshot::NamespaceSnapshot) -> String + Send + Sync>;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The registry.
    pub registry: Arc<Registry>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// SHA-256 of the admin token; `None` runs open.
    pub admin_token_hash: Option<[u8; 32]>,
    /// Request body limit, bytes.
    pub max_body: usize,
    /// Process start.
    pub started: Instant,
    /// `"sqlite"`, ...
    pub store_kind: &'static str,
    /// Ends long-lived responses (SSE) at shutdown.
    pub shutdown: CancellationToken,
    /// Zone file rendering, when DNS is compiled in.
    pub zone_exporter: Option<ZoneExporter>,
    /// One permit per event stream subscriber (`--sse-max-subscribers`).
    pub sse_permits: Arc<tokio::sync::Semaphore>,
    /// How often each subscriber is written to (`--sse-batch-ms`, `--sse-max-writes`).
    pub sse_pacing: sse::Pacing,
    /// Membrane lists serialized once for many identical requests.
    pub lists: Arc<lists::ListCache>,
}

/// Default request body limit: 64 KiB is far above any valid registration.
pub const DEFAULT_MAX_BODY: usize = 64 * 1024;

/// The `method` label: one of the standard methods, else `other`, so that a client
/// inventing method names cannot add series to `/metrics`.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    const KNOWN: [Method; 9] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ];
    KNOWN
        .iter()
        .find(|m| *m == method)
        .map(|m| m.as_str())
        .unwrap_or("other")
}

async fn track(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = method_label(req.method()).to_string();
    // The route pattern (a closed set: the routes of `router`), never the raw path.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "none".into());
    let resp = next.run(req).await;
    s.metrics
        .http
        .get_or_create(&HttpLabels {
            method,
            route,
            status: resp.status().as_u16(),
        })
        .observe(start.elapsed().as_secs_f64());
    resp
}

async fn not_found(req: Request) -> ApiError {
    ApiError::no_route(req.uri().path())
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

async fn zone(
    State(s): State<AppState>,
    extract::P(ns): extract::P<String>,
) -> Result<Response, ApiError> {
    let ns = extract::ns(&ns)?;
    let snap = s
        .registry
        .snapshot(&ns)
        .ok_or(crate::registry::RegistryError::NamespaceNotFound(ns))?;
    let exporter = s.zone_exporter.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_implemented",
            "zone export is not available in this build",
        )
    })?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "text/dns; charset=utf-8")],
        exporter(&snap),
    )
        .into_response())
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/stats", get(v1::stats))
        .route(
            "/namespaces",
            get(v1::list_namespaces).post(v1::create_namespace),
        )
        .route(
            "/namespaces/{ns}",
            get(v1::get_namespace).delete(v1::delete_namespace),
        )
        .route("/namespaces/{ns}/join-token", post(v1::rotate_join_token))
        .route("/namespaces/{ns}/membranes", get(v1::list_membranes))
        .route(
            "/namespaces/{ns}/membranes/{id}",
            get(v1::get_membrane)
                .put(v1::register)
                .delete(v1::deregister),
        )
        .route(
            "/namespaces/{ns}/membranes/{id}/heartbeat",
            post(v1::heartbeat),
        )
        .route("/namespaces/{ns}/tree", get(v1::tree))
        .route("/namespaces/{ns}/events", get(sse::events))
        .route("/namespaces/{ns}/zone", get(zone));
    // The seed systems' routes (legacy.rs says which client uses which).
    let aliases = Router::new()
        .route("/register", post(legacy::register))
        .route("/deregister", post(legacy::deregister))
        .route("/heartbeat", post(legacy::heartbeat))
        .route("/discover/{id}", get(legacy::discover))
        .route("/list", get(legacy::list))
        .route(
            "/api/namespaces",
            get(legacy::namespaces).post(legacy::create_namespace),
        )
        .route("/api/membranes", get(legacy::membranes))
        .route("/api/membranes/discover", get(legacy::membranes))
        .route("/api/membranes/register", post(legacy::register))
        .route(
            "/api/membranes/{id}/heartbeat",
            post(legacy::heartbeat_path),
        )
        .route("/api/stats", get(legacy::stats))
        .route("/api/register", post(legacy::register))
        .route("/api/heartbeat/{id}", post(legacy::heartbeat_path))
        .route("/api/unregister/{id}", delete(legacy::delete_service))
        .route("/api/discover", post(legacy::discover_services))
        .route("/api/services", get(legacy::services))
        .route(
            "/api/services/{id}",
            get(legacy::service).delete(legacy::delete_service),
        )
        .route("/api/capabilities", get(legacy::capabilities))
        .route("/api/capabilities/{cap}", get(legacy::capability));
    Router::new()
        .route("/", get(ui::index))
        .route("/health", get(v1::health))
        .route("/status", get(v1::status))
        .route("/metrics", get(v1::metrics))
        .nest("/v1", v1)
        .merge(aliases)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(DefaultBodyLimit::max(state.max_body))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown`, then drains in-flight requests, with
/// the default [`HttpLimits`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    accept::serve(listener, router, shutdown, HttpLimits::default()).await
}

#[cfg(test)]
mod tests;
