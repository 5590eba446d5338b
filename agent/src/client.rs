//! Plain-HTTP client of the registry's API (hyper 1 connections, one per request, so that
//! an idle agent holds no pooled connection and no pool timer).
//!
//! Several registry URLs may be given: a request starts at the URL that answered last and
//! moves on to the next one when a URL is unreachable, answers 502/503/504, or does not
//! answer like a registry (no JSON). API errors (4xx with the registry's JSON error body) are
//! returned as they are: another replica would answer the same.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use shared::model::{ErrorBody, MembraneView, RegisterResponse, Registration, SECRET_HEADER};
use shared::name::{MembraneId, NamespaceName};

use crate::url::RegistryUrl;

/// Largest response body the agent reads (a namespace list), bytes.
const MAX_BODY: usize = 32 * 1024 * 1024;

/// Why a registry request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// No TCP connection or no answer in time.
    #[error("cannot reach the registry at {url}: {reason}")]
    Unreachable {
        /// The URL tried.
        url: String,
        /// What went wrong.
        reason: String,
        /// The request may have reached a registry (no answer in time, a connection lost
        /// mid-request), so it may have been applied; `false`: never sent (no connection).
        sent: bool,
    },
    /// Something answered, but not like a membrane registry.
    #[error("{url} does not answer like a membrane registry: {reason}")]
    NotRegistry {
        /// The URL tried.
        url: String,
        /// What was wrong with the answer.
        reason: String,
    },
    /// The registry answered with an error.
    #[error("the registry at {url} answered {status} {code}: {message}")]
    Api {
        /// The URL that answered.
        url: String,
        /// HTTP status.
        status: u16,
        /// The registry's error code.
        code: String,
        /// The registry's message.
        message: String,
    },
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the request may have been applied despite this error: it was sent and no
    /// registry refused it clearly (no answer, a 5xx, an answer unlike the registry's).
    pub fn maybe_applied(&self) -> bool {
        match self {
            ClientError::Unreachable { sent, .. } => *sent,
            ClientError::Api { status, .. } => *status >= 500,
            ClientError::NotRegistry { .. } => true,
        }
    }

    /// True when no registry answered at all (keep running and retry with backoff).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. }) || matches!(self.status(), Some(502..=504))
    }

    /// A hint naming the flag to check, for errors a user can fix.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            ClientError::Api {
                status: 401 | 403,
                message,
                ..
            } if message.to_ascii_lowercase().contains("secret") => Some(
                "the registry holds this membrane under another instance secret: another agent \
                 owns this --id, or this agent's --state-dir was lost (wait for its eviction or \
                 remove it with the admin token)",
            ),
            ClientError::Api {
                status: 401 | 403, ..
            } => Some("check --token / MEMBRANE_TOKEN (the admin or the namespace's join token)"),
            ClientError::Api { code, .. } if code == "already_registered" => Some(
                "another agent holds this --id (or this agent's --state-dir, which keeps its \
                 instance secret, was lost): stop the other one and wait for its eviction, or \
                 pass --replace to take the membrane over",
            ),
            ClientError::Api { code, .. } if code == "namespace_not_found" => {
                Some("check --namespace, or create it first: dns-server namespace create NAME")
            }
            ClientError::Api { status: 422, .. } => {
                Some("check the registration flags (--service, --address, --meta, ...)")
            }
            ClientError::NotRegistry { .. } => Some("check --registry-url / MEMBRANE_REGISTRY_URL"),
            ClientError::Unreachable { .. } => {
                Some("check --registry-url / MEMBRANE_REGISTRY_URL and that dns-server runs")
            }
            _ => None,
        }
    }

    /// The message with its hint, for users.
    pub fn explain(&self) -> String {
        match self.hint() {
            Some(h) => format!("{self} ({h})"),
            None => self.to_string(),
        }
    }
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HeartbeatAnswer {
    /// `passing` (or `stale` if the registry says so).
    #[serde(default)]
    pub state: Option<String>,
    /// The TTL the registry applies.
    #[serde(default)]
    pub ttl_seconds: Option<u32>,
}

/// The answer to `GET /v1/namespaces/{ns}/membranes`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MembraneList {
    /// The membranes.
    pub membranes: Vec<MembraneView>,
    /// The last event id included in this list, when the registry tells.
    #[serde(default)]
    pub revision: Option<u64>,
    /// The event numbering `revision` belongs to, when the registry tells.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// The response header naming the event stream's numbering (see [`MembraneList::epoch`]).
pub const EPOCH_HEADER: &str = "membrane-event-epoch";

/// Filters of a list request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only membranes offering this service.
    pub service: Option<String>,
    /// Only membranes with this capability.
    pub capability: Option<String>,
    /// Only children of this membrane.
    pub parent: Option<String>,
}

/// The registry client.
#[derive(Debug)]
pub struct HttpRegistry {
    urls: Vec<RegistryUrl>,
    current: AtomicUsize,
    token: Option<String>,
    connect_timeout: Duration,
    request_timeout: Duration,
    /// Per URL, the address the last connection went to: used when the resolver does not
    /// answer (a container network's DNS is unreliable exactly while containers stop,
    /// when the agent must deregister).
    last_addr: Mutex<Vec<Option<SocketAddr>>>,
    /// TLS for https URLs.
    tls: Option<Arc<rustls::ClientConfig>>,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

impl HttpRegistry {
    /// A client for these URLs (at least one), sending `token` as a bearer token if given.
    pub fn new(urls: Vec<RegistryUrl>, token: Option<String>) -> Self {
        assert!(!urls.is_empty(), "at least one registry URL");
        HttpRegistry {
            last_addr: Mutex::new(vec![None; urls.len()]),
            urls,
            current: AtomicUsize::new(0),
            token,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            tls: None,
        }
    }

    /// Speaks TLS with this configuration to https URLs.
    pub fn with_tls(mut self, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        self.tls = tls;
        self
    }

    /// Sets the connect and whole-request timeouts.
    pub fn with_timeouts(mut self, connect: Duration, request: Duration) -> Self {
        self.connect_timeout = connect;
        self.request_timeout = request;
        self
    }

    /// The URL that answered last (where the next request starts).
    pub fn current_url(&self) -> &RegistryUrl {
        &self.urls[self.current.load(Ordering::Relaxed) % self.urls.len()]
    }

    async fn connect(&self, url: &RegistryUrl) -> Result<Sender, ClientError> {
        let unreachable = |reason: String| ClientError::Unreachable {
            url: url.to_string(),
            reason,
            sent: false,
        };
        let slot = self.urls.iter().position(|u| std::ptr::eq(u, url));
        let known = slot.and_then(|i| self.last_addr.lock().unwrap_or_else(|e| e.into_inner())[i]);
        let stream = tokio::time::timeout(self.connect_timeout, async {
            let name = (url.host.as_str(), url.port);
            let Some(known) = known else {
                return tokio::net::TcpStream::connect(name).await;
            };
            // A fresh lookup first (the registry may have moved); when the resolver has
            // not answered within half the connect timeout, the address that worked last.
            let half = self.connect_timeout / 2;
            match tokio::time::timeout(half, tokio::net::lookup_host(name)).await {
                Ok(Ok(addrs)) => tokio::net::TcpStream::connect(&*addrs.collect::<Vec<_>>()).await,
                _ => {
                    tracing::debug!(%url, %known, "no name resolution: the last address");
                    tokio::net::TcpStream::connect(known).await
                }
            }
        })
        .await
        .map_err(|_| unreachable(format!("no connection within {:?}", self.connect_timeout)))?
        .map_err(|e| unreachable(e.to_string()))?;
        if let (Some(i), Ok(peer)) = (slot, stream.peer_addr()) {
            self.last_addr.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(peer);
        }
        let _ = stream.set_nodelay(true);
        if !url.tls {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            return Ok(sender);
        }
        let tls = self.tls.clone().ok_or_else(|| ClientError::NotRegistry {
            url: url.to_string(),
            reason: "https needs --registry-ca".into(),
        })?;
        let name = rustls_pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| unreachable(format!("bad TLS server name: {e}")))?;
        let stream = tokio::time::timeout(
            self.connect_timeout,
            tokio_rustls::TlsConnector::from(tls).connect(name, stream),
        )
        .await
        .map_err(|_| {
            unreachable(format!(
                "no TLS handshake within {:?}",
                self.connect_timeout
            ))
        })?
        .map_err(|e| ClientError::NotRegistry {
            url: url.to_string(),
            reason: format!("TLS: {e}"),
        })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn build(
        &self,
        url: &RegistryUrl,
        method: &Method,
        path: &str,
        secret: Option<&str>,
        body: &Option<Vec<u8>>,
        accept: &str,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        let mut b = Request::builder()
            .method(method.clone())
            .uri(url.path(path))
            .header("host", url.authority())
            .header(
                "user-agent",
                concat!("membrane-agent/", env!("CARGO_PKG_VERSION")),
            )
            .header("accept", accept);
        if let Some(t) = &self.token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        if let Some(s) = secret {
            b = b.header(SECRET_HEADER, s);
        }
        let body = match body {
            Some(bytes) => {
                b = b.header("content-type", "application/json");
                Full::new(Bytes::from(bytes.clone()))
            }
            None => Full::new(Bytes::new()),
        };
        b.body(body).map_err(|e| ClientError::NotRegistry {
            url: url.to_string(),
            reason: format!("cannot build the request: {e}"),
        })
    }

    /// Sends one request to one URL; returns the response head and streaming body.
    async fn send_to(
        &self,
        url: &RegistryUrl,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, ClientError> {
        let mut sender = self.connect(url).await?;
        tokio::time::timeout(self.request_timeout, sender.send_request(req))
            .await
            .map_err(|_| ClientError::Unreachable {
                url: url.to_string(),
                reason: format!("no answer within {:?}", self.request_timeout),
                sent: true,
            })?
            .map_err(|e| ClientError::Unreachable {
                url: url.to_string(),
                reason: e.to_string(),
                sent: true,
            })
    }

    /// One request with failover across URLs; the full body of a success (2xx).
    async fn call(
        &self,
        method: Method,
        path: &str,
        secret: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let n = self.urls.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut worst: Option<ClientError> = None;
        // Whether some URL may have applied the request (reported with the worst error).
        let mut applied = false;
        for k in 0..n {
            let idx = (start + k) % n;
            let url = &self.urls[idx];
            let req = self.build(url, &method, path, secret, &body, "application/json")?;
            let outcome = async {
                let resp = self.send_to(url, req).await?;
                let status = resp.status();
                let json = content_type_is(&resp, "application/json");
                let bytes = tokio::time::timeout(
                    self.request_timeout,
                    Limited::new(resp.into_body(), MAX_BODY).collect(),
                )
                .await
                .map_err(|_| ClientError::Unreachable {
                    url: url.to_string(),
                    reason: "the answer stalled".into(),
                    sent: true,
                })?
                .map_err(|e| ClientError::Unreachable {
                    url: url.to_string(),
                    reason: format!("reading the answer: {e}"),
                    sent: true,
                })?
                .to_bytes();
                classify(url, status, json, bytes)
            }
            .await;
            match outcome {
                Ok(v) => {
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) if failover(&e) => {
                    tracing::debug!(url = %url, error = %e, "registry URL failed; trying the next");
                    applied |= e.maybe_applied();
                    worst = Some(match worst {
                        Some(w) if severity(&w) > severity(&e) => w,
                        _ => e,
                    });
                }
                Err(e) => {
                    self.current.store(idx, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        let mut worst = worst.expect("at least one URL");
        if let ClientError::Unreachable { sent, .. } = &mut worst {
            *sent |= applied;
        }
        Err(worst)
    }

    fn membrane_path(ns: &NamespaceName, id: &MembraneId) -> String {
        format!("/v1/namespaces/{ns}/membranes/{id}")
    }

    /// `PUT .../membranes/{id}`; `replace` adds `?replace=true` (take over a registration
    /// another instance holds).
    pub async fn register(
        &self,
        ns: &NamespaceName,
        id: &MembraneId,
        reg: &Registration,
        secret: Option<&str>,
        replace: bool,
    ) -> Result<RegisterResponse, ClientError> {
        let body = serde_json::to_vec(reg).expect("registration serialises");
        let mut path = Self::membrane_path(ns, id);
        if replace {
            path.push_str("?replace=true");
        }
        let (_, bytes) = self.call(Method::PUT, &path, secret, Some(body)).await?;
        self.parse(&bytes)
    }

    /// `POST .../membranes/{id}/heartbeat`.
    pub async fn heartbeat(
        &self,
        ns: &NamespaceName,
        id: &MembraneId,
        secret: &str,
    ) -> Result<HeartbeatAnswer, ClientError> {
        let path = format!("{}/heartbeat", Self::membrane_path(ns, id));
        let (_, bytes) = self.call(Method::POST, &path, Some(secret), None).await?;
        if bytes.is_empty() {
            return Ok(HeartbeatAnswer::default());
        }
        self.parse(&bytes)
    }

    /// `DELETE .../membranes/{id}`.
    pub async fn deregister(
        &self,
        ns: &NamespaceName,
        id: &MembraneId,
        secret: &str,
    ) -> Result<(), ClientError> {
        self.call(
            Method::DELETE,
            &Self::membrane_path(ns, id),
            Some(secret),
            None,
        )
        .await
        .map(|_| ())
    }

    /// `GET .../membranes/{id}`.
    pub async fn get(
        &self,
        ns: &NamespaceName,
        id: &MembraneId,
    ) -> Result<MembraneView, ClientError> {
        let (_, bytes) = self
            .call(Method::GET, &Self::membrane_path(ns, id), None, None)
            .await?;
        self.parse(&bytes)
    }

    /// `GET /v1/namespaces/{ns}/membranes?...`.
    pub async fn list(
        &self,
        ns: &NamespaceName,
        filter: &ListFilter,
    ) -> Result<MembraneList, ClientError> {
        let mut path = format!("/v1/namespaces/{ns}/membranes");
        let mut sep = '?';
        for (k, v) in [
            ("service", &filter.service),
            ("capability", &filter.capability),
            ("parent", &filter.parent),
        ] {
            if let Some(v) = v {
                path.push(sep);
                path.push_str(k);
                path.push('=');
                path.push_str(&percent_encode(v));
                sep = '&';
            }
        }
        let (_, bytes) = self.call(Method::GET, &path, None, None).await?;
        self.parse(&bytes)
    }

    /// Opens `GET /v1/namespaces/{ns}/events` (Server-Sent Events), resuming after event
    /// `last_event_id` when given; the body streams.
    pub async fn open_events(
        &self,
        ns: &NamespaceName,
        last_event_id: Option<u64>,
    ) -> Result<Response<Incoming>, ClientError> {
        let n = self.urls.len();
        let start = self.current.load(Ordering::Relaxed);
        let path = format!("/v1/namespaces/{ns}/events");
        let mut last = None;
        for k in 0..n {
            let idx = (start + k) % n;
            let url = &self.urls[idx];
            let mut req = self.build(url, &Method::GET, &path, None, &None, "text/event-stream")?;
            if let Some(id) = last_event_id {
                req.headers_mut()
                    .insert("last-event-id", hyper::header::HeaderValue::from(id));
            }
            match self.send_to(url, req).await {
                Ok(resp)
                    if resp.status().is_success()
                        && content_type_is(&resp, "text/event-stream") =>
                {
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(resp);
                }
                Ok(resp) => {
                    let status = resp.status();
                    let json = content_type_is(&resp, "application/json");
                    let bytes = tokio::time::timeout(
                        self.request_timeout,
                        Limited::new(resp.into_body(), 64 * 1024).collect(),
                    )
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                    let e = match classify(url, status, json, bytes) {
                        Ok(_) => ClientError::NotRegistry {
                            url: url.to_string(),
                            reason: "the events route did not answer text/event-stream".into(),
                        },
                        Err(e) => e,
                    };
                    if !failover(&e) {
                        return Err(e);
                    }
                    last = Some(e);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one URL"))
    }

    /// The local address of this host's route to the current registry URL (what the
    /// registry sees as our source address), used when no `--address` is given.
    pub async fn route_address(&self) -> Option<IpAddr> {
        let url = self.current_url();
        let target = tokio::net::lookup_host((url.host.as_str(), url.port))
            .await
            .ok()?
            .next()?;
        let bind: std::net::SocketAddr = if target.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let sock = std::net::UdpSocket::bind(bind).ok()?;
        sock.connect(target).ok()?;
        let ip = sock.local_addr().ok()?.ip();
        (!ip.is_unspecified()).then_some(ip)
    }

    fn parse<T: serde::de::DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, ClientError> {
        serde_json::from_slice(bytes).map_err(|e| ClientError::NotRegistry {
            url: self.current_url().to_string(),
            reason: format!("unexpected JSON: {e}"),
        })
    }
}

fn content_type_is<B>(resp: &Response<B>, want: &str) -> bool {
    resp.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with(want))
}

fn failover(e: &ClientError) -> bool {
    match e {
        ClientError::Unreachable { .. } | ClientError::NotRegistry { .. } => true,
        ClientError::Api { status, .. } => matches!(status, 502..=504),
    }
}

fn severity(e: &ClientError) -> u8 {
    match e {
        ClientError::Unreachable { .. } => 0,
        ClientError::Api { .. } => 1,
        ClientError::NotRegistry { .. } => 2,
    }
}

/// Sorts an answer into success (2xx) or a [`ClientError`].
fn classify(
    url: &RegistryUrl,
    status: StatusCode,
    json: bool,
    bytes: Bytes,
) -> Result<(StatusCode, Bytes), ClientError> {
    if status.is_success() {
        if status == StatusCode::NO_CONTENT || bytes.is_empty() || json {
            return Ok((status, bytes));
        }
        return Err(ClientError::NotRegistry {
            url: url.to_string(),
            reason: format!("HTTP {} without a JSON body", status.as_u16()),
        });
    }
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(&bytes) {
        return Err(ClientError::Api {
            url: url.to_string(),
            status: status.as_u16(),
            code: e.error.code,
            message: e.error.message,
        });
    }
    if matches!(status.as_u16(), 502..=504) {
        return Err(ClientError::Unreachable {
            url: url.to_string(),
            reason: format!("HTTP {} from a proxy", status.as_u16()),
            sent: true,
        });
    }
    Err(ClientError::NotRegistry {
        url: url.to_string(),
        reason: format!(
            "HTTP {} without the registry's JSON error body",
            status.as_u16()
        ),
    })
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url() -> RegistryUrl {
        "http://r:1".parse().unwrap()
    }

    #[test]
    fn classify_sorts_answers() {
        let ok = classify(&url(), StatusCode::OK, true, Bytes::from_static(b"{}"));
        assert!(ok.is_ok());
        let html = classify(&url(), StatusCode::OK, false, Bytes::from_static(b"<html>"));
        assert!(matches!(html, Err(ClientError::NotRegistry { .. })));
        let api = classify(
            &url(),
            StatusCode::UNAUTHORIZED,
            true,
            Bytes::from_static(br#"{"error":{"code":"unauthorized","message":"bad token"}}"#),
        )
        .unwrap_err();
        assert_eq!(api.status(), Some(401));
        assert!(api.explain().contains("bad token"), "{}", api.explain());
        assert!(api.explain().contains("--token"), "{}", api.explain());
        let secret = ClientError::Api {
            url: "u".into(),
            status: 403,
            code: "forbidden".into(),
            message: "X-Membrane-Secret does not match".into(),
        };
        assert!(
            secret.explain().contains("--state-dir"),
            "{}",
            secret.explain()
        );
        let proxy = classify(&url(), StatusCode::BAD_GATEWAY, false, Bytes::new()).unwrap_err();
        assert!(proxy.is_unreachable());
        let nf = classify(
            &url(),
            StatusCode::NOT_FOUND,
            false,
            Bytes::from_static(b"nope"),
        )
        .unwrap_err();
        assert!(matches!(nf, ClientError::NotRegistry { .. }));
        assert!(failover(&nf) && !failover(&api));
    }

    #[test]
    fn encodes_query_values() {
        assert_eq!(percent_encode("a-b_c"), "a-b_c");
        assert_eq!(percent_encode("a b&"), "a%20b%26");
    }
}
