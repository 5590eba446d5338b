//! The reference documents' routes, served as aliases so their clients keep working:
//! `POST /register`, `/deregister`, `/heartbeat`, `GET /discover/{id}`, `/list`,
//! `/api/membranes`, `/api/membranes/discover?namespace_id=`, `POST /api/register`,
//! `GET /api/services`, `/api/services/{id}`, `/api/capabilities/{cap}`,
//! `DELETE /api/services/{id}`.
//!
//! They map onto the same registry operations and the same auth rules as `/v1`. Writes
//! without a namespace go to the namespace `default`. Answers carry both the `/v1` fields and
//! the field names those clients read (`membrane_id`, `namespace_name`, `status`, ...).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use shared::{
    Endpoint, HealthState, MembraneId, MembraneView, NamespaceName, Registration, ServiceSpec, Tag,
};

use super::AppState;
use super::error::ApiError;
use super::extract::{self, JsonBody, P, Q};
use crate::registry::{Caller, ListFilter};

const DEFAULT_NAMESPACE: &str = "default";

fn namespace_or_default(ns: Option<&str>) -> Result<NamespaceName, ApiError> {
    extract::ns(ns.unwrap_or(DEFAULT_NAMESPACE))
}

/// Body of `POST /register` and `POST /api/register`.
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
    capabilities: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    metadata: BTreeMap<String, Value>,
    #[serde(default)]
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
}

fn field_err(field: &str, e: impl ToString) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
        format!("{field}: {}", e.to_string()),
    )
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
        let mut addresses = Vec::new();
        if let Some(h) = self.host {
            match h.parse() {
                Ok(ip) => addresses.push(ip),
                Err(_) => {
                    metadata.insert("host".into(), h);
                }
            }
        }
        let endpoint = match (self.mode.as_deref(), self.endpoint) {
            (_, None) => None,
            (mode, Some(target)) => {
                if target.contains("://") {
                    metadata.insert("location".into(), target.clone());
                }
                let bare = target
                    .split_once("://")
                    .map(|(_, rest)| rest.trim_end_matches('/').to_string())
                    .unwrap_or(target);
                Some(match mode {
                    Some("shared-volume") | Some("shared_volume") => {
                        Endpoint::SharedVolume { path: bare }
                    }
                    Some("ipc") => Endpoint::Ipc { path: bare },
                    None if bare.starts_with('/') => Endpoint::SharedVolume { path: bare },
                    _ => Endpoint::Tcp { address: bare },
                })
            }
        };
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
            capabilities: tags(self.capabilities, "capabilities")?,
            tags: tags(self.tags, "tags")?,
            metadata: metadata.into(),
            endpoint,
            ttl_seconds: self.ttl_seconds,
            eviction_seconds: None,
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

impl LegacyRef {
    fn parts(&self) -> Result<(NamespaceName, MembraneId), ApiError> {
        Ok((
            namespace_or_default(self.namespace.as_deref())?,
            extract::id(&self.id)?,
        ))
    }
}

/// Query naming a namespace, under any of the names the reference clients use.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NsQuery {
    #[serde(default, alias = "namespace_id", alias = "namespace_name")]
    namespace: Option<String>,
}

/// A membrane in the shape of the reference documents, plus the `/v1` fields.
fn legacy_view(m: &MembraneView) -> Value {
    let mut v = serde_json::to_value(m).unwrap_or_default();
    if let Value::Object(o) = &mut v {
        o.insert("membrane_id".into(), json!(m.id));
        o.insert("namespace_name".into(), json!(m.namespace));
        if let Some(p) = &m.registration.parent {
            o.insert("parent_membrane".into(), json!(p));
        }
        if let Some(a) = m.registration.addresses.first() {
            o.insert("host".into(), json!(a.to_string()));
        }
        let status = match m.state {
            HealthState::Passing => "active",
            HealthState::Stale => "stale",
        };
        o.insert("status".into(), json!(status));
    }
    v
}

/// A membrane in the shape of the `/api/services` registry (reference 004).
fn service_view(m: &MembraneView) -> Value {
    let r = &m.registration;
    let location = r
        .metadata
        .get("location")
        .cloned()
        .or_else(|| r.endpoint.as_ref().map(|e| e.target().to_string()));
    json!({
        "id": m.id,
        "name": r.metadata.get("name").map(String::as_str).unwrap_or(m.id.as_str()),
        "namespace": m.namespace,
        "status": if m.state == HealthState::Passing { "healthy" } else { "stale" },
        "capabilities": r.capabilities,
        "location": location,
        "mode": r.endpoint.as_ref().map(Endpoint::mode),
        "version": r.metadata.get("version"),
    })
}

/// `POST /register` and `POST /api/register`.
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
            "status": "registered",
            "membrane_id": id,
            "service_id": id,
            "namespace": ns,
            "instance_secret": resp.instance_secret,
            "membrane": legacy_view(&resp.membrane),
        })),
    )
        .into_response())
}

/// `POST /deregister`.
pub async fn deregister(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<LegacyRef>,
) -> Result<Json<Value>, ApiError> {
    let (ns, id) = body.parts()?;
    s.registry.deregister(&caller, &ns, &id).await?;
    Ok(Json(json!({"status": "deregistered", "membrane_id": id})))
}

/// `POST /heartbeat`.
pub async fn heartbeat(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<LegacyRef>,
) -> Result<Json<Value>, ApiError> {
    let (ns, id) = body.parts()?;
    let (state, ttl) = s.registry.heartbeat(&caller, &ns, &id).await?;
    Ok(Json(
        json!({"status": "ok", "membrane_id": id, "state": state, "ttl_seconds": ttl}),
    ))
}

/// Finds `id` in the given namespace, or in the only namespace that has it.
fn find(s: &AppState, id: &str, ns: Option<&str>) -> Result<MembraneView, ApiError> {
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
    Ok(s.registry.get(&ns, &id)?)
}

/// `GET /discover/{id}[?namespace=]`.
pub async fn discover(
    State(s): State<AppState>,
    P(id): P<String>,
    Q(q): Q<NsQuery>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(legacy_view(&find(&s, &id, q.namespace.as_deref())?)))
}

fn all(s: &AppState, ns: Option<&str>) -> Result<Vec<MembraneView>, ApiError> {
    match ns {
        Some(ns) => Ok(s
            .registry
            .list(&extract::ns(ns)?, &ListFilter::default())?
            .0),
        None => Ok(s.registry.list_all(&ListFilter::default())),
    }
}

/// `GET /list`, `GET /api/membranes`, `GET /api/membranes/discover?namespace_id=`.
pub async fn list(State(s): State<AppState>, Q(q): Q<NsQuery>) -> Result<Json<Value>, ApiError> {
    let v: Vec<Value> = all(&s, q.namespace.as_deref())?
        .iter()
        .map(legacy_view)
        .collect();
    Ok(Json(json!({"membranes": v})))
}

/// `GET /api/services`.
pub async fn services(
    State(s): State<AppState>,
    Q(q): Q<NsQuery>,
) -> Result<Json<Value>, ApiError> {
    let v: Vec<Value> = all(&s, q.namespace.as_deref())?
        .iter()
        .map(service_view)
        .collect();
    Ok(Json(json!({"services": v})))
}

/// `GET /api/services/{id}`.
pub async fn service(
    State(s): State<AppState>,
    P(id): P<String>,
    Q(q): Q<NsQuery>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(service_view(&find(&s, &id, q.namespace.as_deref())?)))
}

/// `DELETE /api/services/{id}`.
pub async fn delete_service(
    State(s): State<AppState>,
    caller: Caller,
    P(id): P<String>,
    Q(q): Q<NsQuery>,
) -> Result<Json<Value>, ApiError> {
    let m = find(&s, &id, q.namespace.as_deref())?;
    s.registry.deregister(&caller, &m.namespace, &m.id).await?;
    Ok(Json(json!({"status": "unregistered", "service_id": m.id})))
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
    let found = match q.namespace.as_deref() {
        Some(ns) => s.registry.list(&extract::ns(ns)?, &filter)?.0,
        None => s.registry.list_all(&filter),
    };
    found.first().map(|m| Json(service_view(m))).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "capability_not_found",
            format!("no passing membrane has capability {cap}"),
        )
    })
}
