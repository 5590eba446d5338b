//! The seed systems' routes, served as aliases so their own clients work unmodified, on the
//! same registry as `/v1` (and so in DNS):
//!
//! - P-System `NamespaceClient` (`namespace-client.py`): `POST /register`, `/deregister`,
//!   `/heartbeat`, `GET /discover/{id}`, `GET /list?parent=&communication_mode=`.
//! - P-System `RegistryClient` (registry `install.sh`) and the membrane `install.sh` curl
//!   calls: `POST /api/namespaces`, `GET /api/namespaces`, `POST /api/membranes/register`,
//!   `POST /api/membranes/{id}/heartbeat`, `GET /api/membranes/discover?namespace_id=&type=`,
//!   `GET /api/membranes`, `GET /api/stats`.
//! - Modularity CLI and Python SDK: `POST /api/register`, `GET /api/services[?status=]`,
//!   `GET|DELETE /api/services/{id}`, `DELETE /api/unregister/{id}`,
//!   `POST /api/heartbeat/{id}`, `GET /api/capabilities`, `GET /api/capabilities/{cap}`,
//!   `POST /api/discover`, `GET /api/stats`.
//!
//! They map onto the same registry operations and the same auth rules as `/v1`. Writes
//! without a namespace go to the namespace `default`; reads and writes by id alone find the
//! one namespace holding that id (`default` among several; else 409). The mode and URL a client registered
//! are kept in the metadata keys `mode` and `location` (so they show in `/v1` and in DNS TXT)
//! and answered back as registered.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};
use shared::{
    CreateNamespace, Endpoint, HealthState, MembraneId, MembraneView, NamespaceName, Registration,
    ServiceSpec, Tag,
};

use super::AppState;
use super::error::ApiError;
use super::extract::{self, JsonBody, P, Q};
use crate::registry::{Caller, ListFilter};

const DEFAULT_NAMESPACE: &str = "default";

/// Modes the seed clients register with: P-System's `communication_mode` and Modularity's
/// `mode`, besides this project's own endpoint modes.
const MODES: &[&str] = &[
    "shared-volume",
    "shared_volume",
    "ipc",
    "tcp",
    "network",
    "http",
    "embedded",
    "standalone",
];

fn namespace_or_default(ns: Option<&str>) -> Result<NamespaceName, ApiError> {
    extract::ns(ns.unwrap_or(DEFAULT_NAMESPACE))
}

/// Body of `POST /register`, `POST /api/register` and `POST /api/membranes/register`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyRegister {
    #[serde(alias = "membrane_id")]
    id: String,
    #[serde(default, alias = "namespace_id", alias = "namespace_name")]
    namespace: Option<String>,
    #[serde(default, alias = "parent_membrane")]
    parent: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    metadata: Option<LegacyMetadata>,
    #[serde(default, alias = "communication_mode")]
    mode: Option<String>,
    #[serde(default, alias = "location")]
    endpoint: Option<String>,
    #[serde(default, alias = "address")]
    host: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    services: Vec<ServiceSpec>,
    #[serde(default)]
    ttl_seconds: Option<u32>,
    #[serde(default)]
    health_check_url: Option<String>,
    /// P-System's `MembraneInfo` carries the client's clock; the registry keeps its own.
    #[serde(default, rename = "registered_at")]
    _registered_at: Option<IgnoredAny>,
    /// As `registered_at`.
    #[serde(default, rename = "last_heartbeat")]
    _last_heartbeat: Option<IgnoredAny>,
}

/// The `metadata` of a legacy registration: any JSON values (non-strings are kept as their
/// JSON text), keyed by string. A key given twice is refused (422, as by `/v1`'s
/// [`shared::model::Metadata`]) rather than silently keeping the last.
struct LegacyMetadata(BTreeMap<String, Value>);

impl<'de> Deserialize<'de> for LegacyMetadata {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = LegacyMetadata;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                a: A,
            ) -> Result<LegacyMetadata, A::Error> {
                let entries = shared::model::metadata_entries::<A, Value>(a)?;
                Ok(LegacyMetadata(entries.into_iter().collect()))
            }
        }
        d.deserialize_map(V)
    }
}

fn field_err(field: &str, e: impl ToString) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
        format!("{field}: {}", e.to_string()),
    )
}

/// `host:port` of a URL (`http://localhost:3000/x` -> `localhost:3000`; the scheme's
/// default port when none is given), or the target itself when it is not a URL.
fn host_port(target: &str) -> String {
    let Some((scheme, rest)) = target.split_once("://") else {
        return target.to_string();
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let has_port = match authority.rfind(']') {
        Some(close) => authority[close..].contains(':'),
        None => authority.contains(':'),
    };
    match (has_port, scheme.to_ascii_lowercase().as_str()) {
        (false, "http") => format!("{authority}:80"),
        (false, "https") => format!("{authority}:443"),
        _ => authority.to_string(),
    }
}

impl LegacyRegister {
    fn into_parts(self) -> Result<(NamespaceName, MembraneId, Registration), ApiError> {
        let ns = namespace_or_default(self.namespace.as_deref())?;
        let id = MembraneId::new(&self.id).map_err(|e| field_err("id", e))?;
        let parent = self
            .parent
            .filter(|p| !p.is_empty())
            .map(|p| MembraneId::new(&p).map_err(|e| field_err("parent", e)))
            .transpose()?;
        let tags = |v: Vec<String>, field: &str| {
            v.iter()
                .map(|t| Tag::new(t).map_err(|e| field_err(field, e)))
                .collect::<Result<Vec<_>, _>>()
        };
        let mut metadata: BTreeMap<String, String> = self
            .metadata
            .map(|m| m.0)
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, v)
            })
            .collect();
        if let Some(n) = self.name {
            metadata.insert("name".into(), n);
        }
        if let Some(v) = self.version {
            metadata.insert("version".into(), v);
        }
        if let Some(u) = self.health_check_url {
            metadata.insert("health_check_url".into(), u);
        }
        let mut addresses = Vec::new();
        if let Some(h) = self.host {
            match h.parse() {
                Ok(ip) => addresses.push(ip),
                Err(_) => {
                    metadata.insert("host".into(), h);
                }
            }
        }
        if let Some(mode) = self.mode.as_deref()
            && !MODES.contains(&mode)
        {
            return Err(field_err(
                "mode",
                format!("{mode:?} is not one of {}", MODES.join(", ")),
            ));
        }
        let endpoint = match self.endpoint {
            None => None,
            Some(target) => {
                if target.contains("://") {
                    metadata.insert("location".into(), target.clone());
                }
                let ep = match self.mode.as_deref() {
                    Some("shared-volume") | Some("shared_volume") => {
                        Endpoint::SharedVolume { path: target }
                    }
                    Some("ipc") => Endpoint::Ipc { path: target },
                    None if target.starts_with('/') => Endpoint::SharedVolume { path: target },
                    _ => Endpoint::Tcp {
                        address: host_port(&target),
                    },
                };
                Some(ep)
            }
        };
        // The mode as the client named it, when it is not the endpoint's own name.
        if let Some(mode) = self.mode
            && endpoint.as_ref().map(Endpoint::mode) != Some(mode.as_str())
        {
            metadata.insert("mode".into(), mode);
        }
        let mut services = self.services;
        if services.is_empty()
            && let Some(port) = self.port
        {
            services.push(ServiceSpec {
                name: shared::ServiceName::new(id.as_str()).map_err(|e| field_err("id", e))?,
                proto: shared::Proto::Tcp,
                port,
                priority: 0,
                weight: 10,
            });
        }
        let reg = Registration {
            parent,
            addresses,
            services,
            capabilities: tags(self.capabilities.unwrap_or_default(), "capabilities")?,
            tags: tags(self.tags, "tags")?,
            metadata: metadata.into(),
            endpoint,
            ttl_seconds: self.ttl_seconds,
            eviction_seconds: None,
            relay_public_key: None,
        };
        Ok((ns, id, reg))
    }
}

/// Body of `POST /deregister` and `POST /heartbeat`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyRef {
    #[serde(alias = "membrane_id")]
    id: String,
    #[serde(default, alias = "namespace_id", alias = "namespace_name")]
    namespace: Option<String>,
}

/// Query naming a namespace, under any of the names the reference clients use.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NsQuery {
    #[serde(default, alias = "namespace_id", alias = "namespace_name")]
    namespace: Option<String>,
}

/// The mode a membrane was registered with: the client's own name for it, else the
/// endpoint's.
fn registered_mode(m: &MembraneView) -> Option<String> {
    let r = &m.registration;
    r.metadata
        .get("mode")
        .cloned()
        .or_else(|| r.endpoint.as_ref().map(|e| e.mode().to_string()))
}

/// The endpoint a membrane was registered with: the URL as sent, else the path or address.
fn registered_endpoint(m: &MembraneView) -> Option<String> {
    let r = &m.registration;
    r.metadata
        .get("location")
        .cloned()
        .or_else(|| r.endpoint.as_ref().map(|e| e.target().to_string()))
}

/// A membrane in the shape of P-System's `MembraneInfo` and its registry's membrane rows,
/// plus the `/v1` fields (`endpoint` is the string the client registered, not `/v1`'s
/// object).
fn legacy_view(m: &MembraneView) -> Value {
    let mut v = serde_json::to_value(m).unwrap_or_default();
    if let Value::Object(o) = &mut v {
        let r = &m.registration;
        o.insert("endpoint".into(), json!(registered_endpoint(m)));
        o.insert("communication_mode".into(), json!(registered_mode(m)));
        o.insert("parent".into(), json!(r.parent));
        o.insert(
            "health_check_url".into(),
            json!(r.metadata.get("health_check_url")),
        );
        o.insert("membrane_id".into(), json!(m.id));
        o.insert("namespace_id".into(), json!(m.namespace));
        o.insert("namespace_name".into(), json!(m.namespace));
        o.insert("parent_membrane".into(), json!(r.parent));
        let host = r
            .addresses
            .first()
            .map(ToString::to_string)
            .or_else(|| r.metadata.get("host").cloned());
        o.insert("host".into(), json!(host));
        o.insert("port".into(), json!(r.services.first().map(|s| s.port)));
        let status = match m.state {
            HealthState::Passing => "active",
            HealthState::Stale => "stale",
        };
        o.insert("status".into(), json!(status));
    }
    v
}

/// Modularity's service status for a health state.
fn service_status(state: HealthState) -> &'static str {
    match state {
        HealthState::Passing => "active",
        HealthState::Stale => "inactive",
    }
}

/// A membrane in the shape of Modularity's registry.
fn service_view(m: &MembraneView) -> Value {
    let r = &m.registration;
    json!({
        "id": m.id,
        "name": r.metadata.get("name").map(String::as_str).unwrap_or(m.id.as_str()),
        "version": r.metadata.get("version"),
        "namespace": m.namespace,
        "status": service_status(m.state),
        "capabilities": r.capabilities,
        "location": registered_endpoint(m),
        "mode": registered_mode(m),
        "registered_at": m.registered_at,
        "last_seen": m.last_heartbeat,
        "metadata": r.metadata,
    })
}

/// `POST /register`, `POST /api/register`, `POST /api/membranes/register`.
pub async fn register(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<LegacyRegister>,
) -> Result<Response, ApiError> {
    let (ns, id, reg) = body.into_parts()?;
    let resp = s.registry.register(&caller, &ns, &id, reg).await?;
    let status = if resp.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({
            "success": true,
            "status": "registered",
            "message": "Service registered successfully",
            "record_id": id,
            "membrane_id": id,
            "service_id": id,
            "namespace": ns,
            "instance_secret": resp.instance_secret,
            "membrane": legacy_view(&resp.membrane),
        })),
    )
        .into_response())
}

/// Finds `id` in the given namespace, or in the only namespace that has it.
fn locate(
    s: &AppState,
    id: &str,
    ns: Option<&str>,
) -> Result<(NamespaceName, MembraneId), ApiError> {
    let id = extract::id(id)?;
    let ns = match ns {
        Some(ns) => extract::ns(ns)?,
        None => {
            let found = s.registry.find_id(&id);
            match found.as_slice() {
                [] => {
                    return Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        "membrane_not_found",
                        format!("membrane {id} is not registered in any namespace"),
                    ));
                }
                [one] => one.clone(),
                // Writes without a namespace go to `default`, so calls without one find it.
                many if many.iter().any(|n| n.as_str() == DEFAULT_NAMESPACE) => {
                    extract::ns(DEFAULT_NAMESPACE)?
                }
                many => {
                    let names: Vec<_> = many.iter().map(|n| n.as_str()).collect();
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "ambiguous",
                        format!(
                            "membrane {id} is registered in several namespaces ({}); add ?namespace=",
                            names.join(", ")
                        ),
                    ));
                }
            }
        }
    };
    Ok((ns, id))
}

fn find(s: &AppState, id: &str, ns: Option<&str>) -> Result<MembraneView, ApiError> {
    let (ns, id) = locate(s, id, ns)?;
    Ok(s.registry.get(&ns, &id)?)
}

async fn do_deregister(
    s: &AppState,
    caller: &Caller,
    id: &str,
    ns: Option<&str>,
) -> Result<Json<Value>, ApiError> {
    let (ns, id) = locate(s, id, ns)?;
    s.registry.deregister(caller, &ns, &id).await?;
    Ok(Json(json!({
        "success": true,
        "status": "unregistered",
        "message": "Service unregistered successfully",
        "membrane_id": id,
        "service_id": id,
        "namespace": ns,
    })))
}

async fn do_heartbeat(
    s: &AppState,
    caller: &Caller,
    id: &str,
    ns: Option<&str>,
) -> Result<Json<Value>, ApiError> {
    let (ns, id) = locate(s, id, ns)?;
    let (state, ttl) = s.registry.heartbeat(caller, &ns, &id).await?;
    Ok(Json(json!({
        "success": true,
        "status": "updated",
        "message": "Heartbeat received",
        "membrane_id": id,
        "namespace": ns,
        "state": state,
        "ttl_seconds": ttl,
    })))
}

/// `POST /deregister` (`{"id"}`).
pub async fn deregister(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<LegacyRef>,
) -> Result<Json<Value>, ApiError> {
    do_deregister(&s, &caller, &body.id, body.namespace.as_deref()).await
}

/// `POST /heartbeat` (`{"id"}`).
pub async fn heartbeat(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<LegacyRef>,
) -> Result<Json<Value>, ApiError> {
    do_heartbeat(&s, &caller, &body.id, body.namespace.as_deref()).await
}

/// `POST /api/membranes/{id}/heartbeat`, `POST /api/heartbeat/{id}` (no body).
pub async fn heartbeat_path(
    State(s): State<AppState>,
    caller: Caller,
    P(id): P<String>,
    Q(q): Q<NsQuery>,
) -> Result<Json<Value>, ApiError> {
    do_heartbeat(&s, &caller, &id, q.namespace.as_deref()).await
}

/// `DELETE /api/services/{id}`, `DELETE /api/unregister/{id}`.
pub async fn delete_service(
    State(s): State<AppState>,
    caller: Caller,
    P(id): P<String>,
    Q(q): Q<NsQuery>,
) -> Result<Json<Value>, ApiError> {
    do_deregister(&s, &caller, &id, q.namespace.as_deref()).await
}

/// `GET /discover/{id}[?namespace=]`.
pub async fn discover(
    State(s): State<AppState>,
    P(id): P<String>,
    Q(q): Q<NsQuery>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(legacy_view(&find(&s, &id, q.namespace.as_deref())?)))
}

fn all(s: &AppState, ns: Option<&str>, filter: &ListFilter) -> Result<Vec<MembraneView>, ApiError> {
    match ns {
        Some(ns) => Ok(s.registry.list(&extract::ns(ns)?, filter)?.0),
        None => Ok(s.registry.list_all(filter)),
    }
}

/// Query of `GET /list`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default, alias = "namespace_id", alias = "namespace_name")]
    namespace: Option<String>,
    #[serde(default)]
    parent: Option<String>,
    #[serde(default)]
    communication_mode: Option<String>,
}

/// `GET /list[?parent=&communication_mode=&namespace=]`: a bare list, as P-System's
/// `NamespaceClient.list_membranes` reads it.
pub async fn list(State(s): State<AppState>, Q(q): Q<ListQuery>) -> Result<Json<Value>, ApiError> {
    let filter = ListFilter {
        parent: q
            .parent
            .map(|p| extract::id(&p).map(|p| p.to_string()))
            .transpose()?,
        ..Default::default()
    };
    let v: Vec<Value> = all(&s, q.namespace.as_deref(), &filter)?
        .iter()
        .filter(|m| {
            q.communication_mode.is_none()
                || registered_mode(m).as_deref() == q.communication_mode.as_deref()
        })
        .map(legacy_view)
        .collect();
    Ok(Json(Value::Array(v)))
}

/// Query of `GET /api/membranes` and `GET /api/membranes/discover`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MembranesQuery {
    #[serde(default, alias = "namespace_id", alias = "namespace_name")]
    namespace: Option<String>,
    /// P-System's membrane type: matched against capabilities and tags.
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

/// `GET /api/membranes`, `GET /api/membranes/discover[?namespace_id=&type=]`:
/// `{"membranes": [...]}`.
pub async fn membranes(
    State(s): State<AppState>,
    Q(q): Q<MembranesQuery>,
) -> Result<Json<Value>, ApiError> {
    let kind = q
        .kind
        .map(|k| Tag::new(&k).map_err(ApiError::invalid_name))
        .transpose()?;
    let v: Vec<Value> = all(&s, q.namespace.as_deref(), &ListFilter::default())?
        .iter()
        .filter(|m| {
            kind.as_ref().is_none_or(|k| {
                m.registration.capabilities.contains(k) || m.registration.tags.contains(k)
            })
        })
        .map(legacy_view)
        .collect();
    Ok(Json(json!({"membranes": v})))
}

/// Query of `GET /api/services`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ServicesQuery {
    #[serde(default, alias = "namespace_id", alias = "namespace_name")]
    namespace: Option<String>,
    /// `active` or `inactive`.
    #[serde(default)]
    status: Option<String>,
}

/// `GET /api/services[?status=active|inactive&namespace=]`: `{"services", "count"}`.
pub async fn services(
    State(s): State<AppState>,
    Q(q): Q<ServicesQuery>,
) -> Result<Json<Value>, ApiError> {
    let state = match q.status.as_deref() {
        None => None,
        Some("active") => Some(HealthState::Passing),
        Some("inactive") => Some(HealthState::Stale),
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("status {other:?} must be active or inactive"),
            ));
        }
    };
    let filter = ListFilter {
        state,
        ..Default::default()
    };
    let v: Vec<Value> = all(&s, q.namespace.as_deref(), &filter)?
        .iter()
        .map(service_view)
        .collect();
    Ok(Json(json!({"count": v.len(), "services": v})))
}

/// `GET /api/services/{id}`.
pub async fn service(
    State(s): State<AppState>,
    P(id): P<String>,
    Q(q): Q<NsQuery>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(service_view(&find(&s, &id, q.namespace.as_deref())?)))
}

/// `GET /api/capabilities/{cap}`: a passing membrane with that capability.
pub async fn capability(
    State(s): State<AppState>,
    P(cap): P<String>,
    Q(q): Q<NsQuery>,
) -> Result<Json<Value>, ApiError> {
    let cap = Tag::new(&cap).map_err(ApiError::invalid_name)?;
    let filter = ListFilter {
        capability: Some(cap.to_string()),
        state: Some(HealthState::Passing),
        ..Default::default()
    };
    all(&s, q.namespace.as_deref(), &filter)?
        .first()
        .map(|m| Json(service_view(m)))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "capability_not_found",
                format!("no passing membrane has capability {cap}"),
            )
        })
}

/// Capability -> ids of the passing membranes offering it.
fn providers(s: &AppState, ns: Option<&str>) -> Result<BTreeMap<String, Vec<String>>, ApiError> {
    let filter = ListFilter {
        state: Some(HealthState::Passing),
        ..Default::default()
    };
    let mut by_cap: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in all(s, ns, &filter)? {
        for c in &m.registration.capabilities {
            let ids = by_cap.entry(c.to_string()).or_default();
            if !ids.iter().any(|i| i == m.id.as_str()) {
                ids.push(m.id.to_string());
            }
        }
    }
    Ok(by_cap)
}

/// `GET /api/capabilities`: `{"capabilities": [{capability, providers, count}], "count"}`,
/// passing membranes only.
pub async fn capabilities(
    State(s): State<AppState>,
    Q(q): Q<NsQuery>,
) -> Result<Json<Value>, ApiError> {
    let caps: Vec<Value> = providers(&s, q.namespace.as_deref())?
        .into_iter()
        .map(|(c, ids)| json!({"capability": c, "count": ids.len(), "providers": ids}))
        .collect();
    Ok(Json(json!({"count": caps.len(), "capabilities": caps})))
}

/// Body of `POST /api/discover`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoverBody {
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default)]
    optional: Vec<String>,
    #[serde(default, alias = "namespace_id", alias = "namespace_name")]
    namespace: Option<String>,
}

/// `POST /api/discover`: passing membranes with every required capability, best match
/// (most optional ones) first: `{"matches": [{service, match_score, provides_required,
/// provides_optional}], "count"}`.
pub async fn discover_services(
    State(s): State<AppState>,
    JsonBody(body): JsonBody<DiscoverBody>,
) -> Result<Json<Value>, ApiError> {
    let tags = |v: &[String], field: &str| {
        v.iter()
            .map(|t| Tag::new(t).map_err(|e| field_err(field, e)))
            .collect::<Result<Vec<_>, _>>()
    };
    let required = tags(&body.capabilities, "capabilities")?;
    let optional = tags(&body.optional, "optional")?;
    let filter = ListFilter {
        state: Some(HealthState::Passing),
        ..Default::default()
    };
    let mut matches: Vec<(usize, Value)> = all(&s, body.namespace.as_deref(), &filter)?
        .iter()
        .filter(|m| {
            required
                .iter()
                .all(|c| m.registration.capabilities.contains(c))
        })
        .map(|m| {
            let opt: Vec<&Tag> = optional
                .iter()
                .filter(|c| m.registration.capabilities.contains(c))
                .collect();
            let score = required.len() + opt.len();
            (
                score,
                json!({
                    "service": service_view(m),
                    "match_score": score,
                    "provides_required": required,
                    "provides_optional": opt,
                }),
            )
        })
        .collect();
    matches.sort_by_key(|m| std::cmp::Reverse(m.0));
    let matches: Vec<Value> = matches.into_iter().map(|(_, v)| v).collect();
    Ok(Json(json!({"count": matches.len(), "matches": matches})))
}

/// `GET /api/stats`: P-System registry's and Modularity registry's figures in one answer.
pub async fn stats(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    let c = s.registry.counts();
    let everything = s.registry.list_all(&ListFilter::default());
    let mut by_runtime: BTreeMap<String, usize> = BTreeMap::new();
    for m in &everything {
        let runtime = m
            .registration
            .metadata
            .get("runtime")
            .map(String::as_str)
            .unwrap_or("unknown");
        *by_runtime.entry(runtime.to_string()).or_default() += 1;
    }
    let mut caps: Vec<&Tag> = everything
        .iter()
        .flat_map(|m| &m.registration.capabilities)
        .collect();
    caps.sort();
    caps.dedup();
    Ok(Json(json!({
        "namespaces": c.namespaces,
        "active_membranes": c.passing,
        "stale_membranes": c.stale,
        "total_services": c.membranes,
        "active_services": c.passing,
        "inactive_services": c.stale,
        "total_capabilities": caps.len(),
        "services_by_runtime": by_runtime,
        "timestamp": crate::registry::rfc3339(std::time::SystemTime::now()),
    })))
}

/// Body of `POST /api/namespaces` (P-System `RegistryClient.create_namespace`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyNamespace {
    name: String,
    #[serde(default)]
    description: Option<String>,
    /// Namespaces are flat here: only `null` is accepted.
    #[serde(default)]
    parent_namespace: Option<String>,
    /// Namespaces carry no metadata here: only `{}` is accepted.
    #[serde(default)]
    metadata: Option<BTreeMap<String, Value>>,
}

/// `POST /api/namespaces`: `201 {"namespace_id": NAME, "status": "created"}` (namespaces are
/// named, so the id is the name), plus the `/v1` namespace view.
pub async fn create_namespace(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<LegacyNamespace>,
) -> Result<Response, ApiError> {
    if body.parent_namespace.is_some() {
        return Err(field_err(
            "parent_namespace",
            "namespaces are not nested here; send null",
        ));
    }
    if body.metadata.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(field_err(
            "metadata",
            "namespaces carry no metadata here; send {}",
        ));
    }
    let req = CreateNamespace {
        name: NamespaceName::new(&body.name).map_err(|e| field_err("name", e))?,
        description: body.description.unwrap_or_default(),
        settings: Default::default(),
    };
    let view = s.registry.create_namespace(&caller, req).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "namespace_id": view.name,
            "status": "created",
            "namespace": view,
        })),
    )
        .into_response())
}

/// `GET /api/namespaces`: `{"namespaces": [...]}` with `id` (= name) beside the `/v1` fields.
pub async fn namespaces(State(s): State<AppState>) -> Json<Value> {
    let v: Vec<Value> = s
        .registry
        .list_namespaces()
        .into_iter()
        .map(|n| {
            let mut v = serde_json::to_value(&n).unwrap_or_default();
            if let Value::Object(o) = &mut v {
                o.insert("id".into(), json!(n.name));
            }
            v
        })
        .collect();
    Json(json!({"namespaces": v}))
}
