//! The relay inside `agent run`: the inbox (Maildir + listener or watcher by mode), the
//! outbox, and the control requests `send` and `recv_wait`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use shared::envelope::{self, MessageId};
use shared::model::Endpoint;
use shared::name::{MembraneId, NamespaceName};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::inlog::{self, InboxLog};
use super::maildir::Maildir;
use super::outbox::{Outbox, OutboxConfig, Routes};
use super::resolve::{Resolver, Target};
use super::wire::{self, Inbox};
use super::{Draft, RelayInfo};
use crate::activity::Activity;
use crate::cache::Cache;
use crate::client::HttpRegistry;
use crate::config::RunConfig;
use crate::control::Response;
use crate::lifecycle::Status;

/// Endpoints from the agent's cache, else the registry.
pub struct DaemonRoutes {
    cache: Arc<Cache>,
    client: Arc<HttpRegistry>,
    namespace: NamespaceName,
}

impl Routes for DaemonRoutes {
    async fn endpoint(&self, id: &MembraneId) -> Result<Endpoint, String> {
        let cached = self
            .cache
            .snapshot()
            .0
            .membranes
            .get(id.as_str())
            .and_then(|m| m.registration.endpoint.clone());
        if let Some(ep) = cached {
            return Ok(ep);
        }
        let m = self
            .client
            .get(&self.namespace, id)
            .await
            .map_err(|e| e.explain())?;
        m.registration
            .endpoint
            .ok_or_else(|| format!("{id} registered no message endpoint"))
    }
}

/// Public keys of senders: the agent's cache, else the registry ([`super::senders`]).
struct DaemonKeys {
    cache: Arc<Cache>,
    client: Arc<HttpRegistry>,
    namespace: NamespaceName,
}

impl super::senders::Directory for DaemonKeys {
    fn cached(&self, id: &MembraneId) -> Option<[u8; 32]> {
        self.cache
            .snapshot()
            .0
            .membranes
            .get(id.as_str())
            .and_then(|m| m.registration.relay_public_key.as_deref())
            .and_then(shared::relay_auth::from_hex)
    }

    fn fetch<'a>(
        &'a self,
        id: &'a MembraneId,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = super::senders::Fetched> + Send + 'a>>
    {
        Box::pin(async move {
            match self.client.get(&self.namespace, id).await {
                Ok(m) => Ok(m
                    .registration
                    .relay_public_key
                    .as_deref()
                    .and_then(shared::relay_auth::from_hex)),
                Err(crate::client::ClientError::Api { status: 404, .. }) => Ok(None),
                Err(e) => Err(e.explain()),
            }
        })
    }
}

/// The running relay.
pub struct RelayService {
    info: RelayInfo,
    outbox: Arc<Outbox<DaemonRoutes>>,
    arrivals: watch::Sender<u64>,
    maildir: Maildir,
    inbox: Arc<Inbox>,
    cache: Arc<Cache>,
    client: Arc<HttpRegistry>,
    status: Arc<Mutex<Status>>,
    config_parent: Option<MembraneId>,
    ttl: Duration,
}

/// Starts the inbox (by mode) and the outbox; their tasks go into `tasks`.
pub async fn start(
    cfg: &RunConfig,
    cache: Arc<Cache>,
    client: Arc<HttpRegistry>,
    status: Arc<Mutex<Status>>,
    activity: Arc<Activity>,
    cancel: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<Arc<RelayService>, String> {
    let endpoint = cfg
        .registration
        .endpoint
        .clone()
        .ok_or("no message endpoint configured")?;
    let maildir = match &endpoint {
        Endpoint::SharedVolume { path } => {
            Maildir::for_membrane(std::path::Path::new(path), &cfg.namespace, &cfg.id)
        }
        _ => Maildir::new(cfg.state_dir.join("inbox")),
    };
    maildir.create().map_err(|e| {
        format!(
            "cannot create the Maildir {}: {e}",
            maildir.root().display()
        )
    })?;
    let info = RelayInfo {
        id: cfg.id.clone(),
        namespace: cfg.namespace.clone(),
        mode: endpoint.mode().to_string(),
        maildir: maildir.root().to_path_buf(),
        after_recv: cfg.relay.after_recv,
        max_message_bytes: cfg.relay.max_body,
        message_ttl_ms: cfg.relay.message_ttl.as_millis() as u64,
        shared_dir: match &endpoint {
            Endpoint::SharedVolume { path } => Some(path.into()),
            _ => None,
        },
    };
    info.save(&cfg.state_dir)
        .map_err(|e| format!("cannot write {}: {e}", super::RELAY_FILE))?;
    let log = match &endpoint {
        Endpoint::SharedVolume { .. } => None,
        _ => Some(
            InboxLog::open(
                maildir.root(),
                cfg.relay.message_ttl.as_millis() as u64,
                cfg.relay.after_recv == super::AfterRecv::Delete,
                crate::util::unix_millis(std::time::SystemTime::now()),
            )
            .map_err(|e| {
                format!(
                    "cannot open the inbox log in {}: {e}",
                    maildir.root().display()
                )
            })?,
        ),
    };
    let (inbox, committer) = Inbox::new(
        maildir.clone(),
        log,
        cfg.id.clone(),
        cfg.namespace.clone(),
        cfg.relay.max_body,
        activity.clone(),
    );
    tasks.spawn(committer);
    // Tombstones of deleted messages are kept well past the longest sender retry.
    let tombstone_age = Duration::from_secs(24 * 3600).max(cfg.relay.message_ttl * 2);
    let limits = wire::Limits::for_fd_limit(crate::util::fd_limit());
    match &endpoint {
        Endpoint::SharedVolume { .. } => {
            tasks.spawn(super::watch_maildir(
                maildir.clone(),
                inbox.arrivals.clone(),
                activity.clone(),
                tombstone_age,
                cancel.clone(),
            ));
        }
        Endpoint::Ipc { path } => {
            let l = wire::bind_unix(std::path::Path::new(path))
                .await
                .map_err(|e| format!("cannot listen on {path}: {e}"))?;
            tracing::info!(path = %path, "relay listening (ipc)");
            tasks.spawn(wire::serve_unix(l, inbox.clone(), limits, cancel.clone()));
        }
        Endpoint::Tcp { address } => {
            let l = tokio::net::TcpListener::bind(address.as_str())
                .await
                .map_err(|e| format!("cannot listen on {address}: {e}"))?;
            tracing::info!(address = %address, "relay listening (tcp)");
            inbox.require_auth(Arc::new(super::senders::SenderKeys::new(DaemonKeys {
                cache: cache.clone(),
                client: client.clone(),
                namespace: cfg.namespace.clone(),
            })));
            tasks.spawn(wire::serve_tcp(l, inbox.clone(), limits, cancel.clone()));
        }
    }
    if !matches!(endpoint, Endpoint::SharedVolume { .. }) {
        let md = maildir.clone();
        let c = cancel.clone();
        tasks.spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tokio::select! {
                    _ = c.cancelled() => return,
                    _ = t.tick() => {
                        let m = md.clone();
                        let _ = tokio::task::spawn_blocking(move || m.prune(tombstone_age)).await;
                    }
                }
            }
        });
    }
    let routes = Arc::new(DaemonRoutes {
        cache: cache.clone(),
        client: client.clone(),
        namespace: cfg.namespace.clone(),
    });
    let outbox = Outbox::open(
        &cfg.state_dir,
        routes,
        OutboxConfig {
            max_backoff: cfg.relay.retry_max_backoff,
            ..Default::default()
        },
        activity,
        cancel,
    )
    .map_err(|e| format!("cannot open the outbox: {e}"))?;
    Ok(Arc::new(RelayService {
        info,
        outbox,
        arrivals: inbox.arrivals.clone(),
        maildir,
        inbox: inbox.clone(),
        cache,
        client,
        status,
        config_parent: cfg.registration.parent.clone(),
        ttl: cfg.relay.message_ttl,
    }))
}

/// The fields of a `send` request.
pub struct SendRequest {
    /// Target text.
    pub to: String,
    /// Text body.
    pub body: Option<String>,
    /// Binary body.
    pub body_base64: Option<String>,
    /// MIME type.
    pub content_type: Option<String>,
    /// All instances.
    pub all: bool,
    /// Wait for acks.
    pub wait: bool,
    /// Answered message.
    pub reply_to: Option<MessageId>,
    /// Caller-chosen id.
    pub id: Option<MessageId>,
}

impl RelayService {
    /// For `agent status`.
    pub fn status_json(&self) -> Value {
        json!({
            "mode": self.info.mode,
            "maildir": self.info.maildir,
            "inbox_pending": self.maildir.list_new().map(|v| v.len() + inlog::pending_count(self.maildir.root())).ok(),
            "outbox_pending": self.outbox.pending(),
            "max_message_bytes": self.info.max_message_bytes,
            "unauthenticated": self.inbox.unauthenticated(),
        })
    }

    /// `{"cmd":"send",...}`.
    pub async fn send(&self, r: SendRequest) -> Response {
        let target = match Target::parse(&r.to) {
            Ok(t) => t,
            Err(m) => return Response::err("bad_target", m),
        };
        let body = match (r.body, r.body_base64) {
            (Some(t), None) => t.into_bytes(),
            (None, Some(b)) => match envelope::base64_decode(&b) {
                Some(b) => b,
                None => return Response::err("bad_request", "body_base64 is not base64"),
            },
            (None, None) => Vec::new(),
            (Some(_), Some(_)) => {
                return Response::err("bad_request", "give body or body_base64, not both");
            }
        };
        if body.len() > self.info.max_message_bytes {
            return Response::err(
                "too_large",
                format!(
                    "the message is {} bytes, over the agent's limit of {} bytes (--max-message-size)",
                    body.len(),
                    self.info.max_message_bytes
                ),
            );
        }
        let parent = self
            .status
            .lock()
            .unwrap()
            .membrane
            .as_ref()
            .map(|m| m.registration.parent.clone())
            .unwrap_or_else(|| self.config_parent.clone());
        let resolver = Resolver {
            namespace: &self.info.namespace,
            self_id: &self.info.id,
            self_parent: parent,
            cache: Some(self.cache.snapshot().0),
            client: Some(&self.client),
        };
        let r_unit = (super::next_id().as_u128() as u64 >> 11) as f64 / (1u64 << 53) as f64;
        let res = match resolver.resolve(&target, r.all, r_unit).await {
            Ok(res) => res,
            Err(e) => return Response::err("not_found", e.0),
        };
        let draft = Draft {
            from: self.info.id.clone(),
            namespace: self.info.namespace.clone(),
            content_type: r
                .content_type
                .unwrap_or_else(|| "text/plain; charset=utf-8".into()),
            body,
            reply_to: r.reply_to,
            ttl: self.ttl,
            id: r.id,
        };
        let to: Vec<MembraneId> = res.membranes.iter().map(|m| m.id.clone()).collect();
        let envs = match draft.envelopes(&to, self.outbox.now_ms()) {
            Ok(e) => e,
            Err(m) => return Response::err("bad_request", m),
        };
        let ids: Vec<String> = envs.iter().map(|e| e.id.to_string()).collect();
        let waits = match self.outbox.submit(envs, r.wait).await {
            Ok(w) => w,
            Err(e) => return Response::err("failed", e),
        };
        let mut failures = Vec::new();
        for w in waits {
            match w.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(e),
                Err(_) => failures.push("the agent is shutting down".into()),
            }
        }
        if !failures.is_empty() {
            return Response::err("failed", failures.join("; "));
        }
        Response::ok(json!({
            "ids": ids,
            "to": to,
            "status": if r.wait { "delivered" } else { "queued" },
            "route": "outbox",
            "debug": res.debug,
        }))
    }

    /// `{"cmd":"recv_wait","timeout_ms":N}`.
    pub async fn recv_wait(&self, timeout_ms: u64) -> Response {
        let mut rx = self.arrivals.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms.min(300_000));
        loop {
            rx.borrow_and_update();
            let mut n = self.maildir.list_new().map(|v| v.len()).unwrap_or(0);
            if n == 0 && inlog::has_pending(self.maildir.root()) {
                n = 1;
            }
            if n > 0 {
                return Response::ok(json!({"pending": n}));
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Response::ok(json!({"pending": 0})),
                r = rx.changed() => if r.is_err() { return Response::ok(json!({"pending": 0})); },
            }
        }
    }
}
