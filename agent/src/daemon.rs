//! `agent run`: wires the lifecycle, the cache synchronisation, the control socket, systemd
//! notifications and signal handling together.
//!
//! One [`CancellationToken`] is cancelled by SIGTERM/SIGINT (or a fatal registration error);
//! the lifecycle then deregisters within the grace time, the other tasks (in a [`JoinSet`])
//! stop, and the control socket file is removed. The agent runs on a current-thread runtime
//! and wakes only for heartbeats, stream events and keep-alives, control requests and (when
//! asked for) systemd watchdog pings.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use shared::model::ErrorDetail;
use shared::name::{MembraneId, NamespaceName};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::AgentError;
use crate::activity::Activity;
use crate::cache::{Cache, CacheData};
use crate::client::{ClientError, HttpRegistry, ListFilter};
use crate::config::RunConfig;
use crate::control::{self, Handler, Request, Response};
use crate::lifecycle::{Command, Lifecycle, Status};
use crate::output::{self, Source};
use crate::{state, sync, systemd, util};

/// Runs the agent until SIGTERM/SIGINT; an error when the registry refuses the first
/// registration or the state directory is unusable.
pub async fn run(cfg: RunConfig) -> Result<(), AgentError> {
    state::prepare_private_dir(&cfg.state_dir).map_err(|e| {
        crate::config::ConfigError::Invalid {
            flag: "--state-dir",
            message: format!("cannot use {}: {e}", cfg.state_dir.display()),
        }
    })?;
    let nofile = crate::util::raise_fd_limit();
    tracing::debug!(nofile, "open file limit");
    let _lock = state::lock(&cfg.state_dir)
        .await
        .map_err(AgentError::runtime)?;
    state::check_secret(&cfg.state_dir, &cfg.namespace, &cfg.id).map_err(AgentError::runtime)?;
    crate::relay::auth::load(&cfg.state_dir);
    // The agent's relay key pair: its public key goes into the registration.
    let identity = crate::relay::auth::Identity::load_or_create(&cfg.state_dir).map_err(|e| {
        AgentError::runtime(format!(
            "cannot keep the relay key pair in {}: {e}",
            cfg.state_dir
                .join(crate::relay::auth::IDENTITY_FILE)
                .display()
        ))
    })?;
    crate::relay::auth::set_identity(Some(identity));
    let socket = state::control_socket(&cfg.state_dir);
    // With the lock held, a socket file left there is a dead agent's.
    let _ = std::fs::remove_file(&socket);
    let listener = control::bind(&socket).await.map_err(AgentError::runtime)?;
    let activity = Arc::new(Activity::new(cfg.state_dir.join(state::ACTIVITY_LOG)));
    let client = Arc::new(
        HttpRegistry::new(cfg.registry_urls.clone(), cfg.token.clone()).with_tls(cfg.tls.clone()),
    );
    let cache = Arc::new(Cache::open(&cfg.state_dir, cfg.namespace.clone()));
    let status = Arc::new(Mutex::new(Status::default()));
    let cancel = CancellationToken::new();
    let (cmd_tx, cmd_rx) = mpsc::channel(8);
    let (ready_tx, ready_rx) = oneshot::channel();

    tracing::info!(id = %cfg.id, namespace = %cfg.namespace, state_dir = %cfg.state_dir.display(), "agent starting");
    activity.record(
        "started",
        &format!("agent started for {} in {}", cfg.id, cfg.namespace),
        json!({
            "pid": std::process::id(),
            "registry": cfg.registry_urls.iter().map(ToString::to_string).collect::<Vec<_>>(),
        }),
    );

    let mut tasks = JoinSet::new();
    tasks.spawn(signals(cancel.clone(), activity.clone()));
    tasks.spawn(cache.clone().run_writer(cancel.clone()));
    let relay = match crate::relay::service::start(
        &cfg,
        cache.clone(),
        client.clone(),
        status.clone(),
        activity.clone(),
        cancel.clone(),
        &mut tasks,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            cancel.cancel();
            let _ = std::fs::remove_file(&socket);
            return Err(AgentError::runtime(format!("message relay: {e}")));
        }
    };
    let handler = Arc::new(DaemonHandler {
        commands: cmd_tx,
        status: status.clone(),
        cache: cache.clone(),
        client: client.clone(),
        namespace: cfg.namespace.clone(),
        id: cfg.id.clone(),
        state_dir: cfg.state_dir.clone(),
        started: SystemTime::now(),
        relay,
    });
    tasks.spawn(control::serve(listener, handler, cancel.clone()));
    let registered = CancellationToken::new();
    tasks.spawn(sync::run(
        client.clone(),
        cfg.namespace.clone(),
        cache.clone(),
        activity.clone(),
        sync::SyncConfig {
            max_backoff: cfg.max_backoff,
            ..Default::default()
        },
        registered.clone(),
        cancel.clone(),
    ));
    if let Some(period) = systemd::watchdog_period() {
        tasks.spawn(systemd::watchdog(period, cancel.clone()));
    }
    let ready_line = format!("registered {} in {}", cfg.id, cfg.namespace);
    tasks.spawn(async move {
        if ready_rx.await.is_ok() {
            systemd::ready(&ready_line);
            registered.cancel();
        }
    });

    let lifecycle = Lifecycle::new(
        client,
        cfg.lifecycle(),
        status,
        activity.clone(),
        Some(ready_tx),
    );
    let result = lifecycle.run(cmd_rx, cancel.clone()).await;
    cancel.cancel();
    if tokio::time::timeout(Duration::from_secs(2), async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tasks.abort_all();
    }
    // Whatever the stream applied since the last batched write.
    if let Err(e) = cache.flush() {
        tracing::warn!(error = %e, "cannot write the cache");
    }
    let _ = std::fs::remove_file(&socket);
    match result {
        Ok(()) => {
            activity.record("stopped", "agent stopped", Value::Null);
            tracing::info!("agent stopped");
            Ok(())
        }
        Err(e) => {
            activity.record("stopped", &format!("agent gave up: {e}"), Value::Null);
            Err(AgentError::runtime(e))
        }
    }
}

/// Cancels on the first SIGTERM or SIGINT (after telling systemd we are stopping).
async fn signals(cancel: CancellationToken, activity: Arc<Activity>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    let name = tokio::select! {
        _ = cancel.cancelled() => return,
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!("{name} received: deregistering and stopping");
    activity.record(
        "signal",
        &format!("{name} received; shutting down"),
        Value::Null,
    );
    systemd::stopping();
    cancel.cancel();
}

/// Answers control requests for the running agent.
struct DaemonHandler {
    commands: mpsc::Sender<Command>,
    status: Arc<Mutex<Status>>,
    cache: Arc<Cache>,
    client: Arc<HttpRegistry>,
    namespace: NamespaceName,
    id: MembraneId,
    state_dir: PathBuf,
    started: SystemTime,
    relay: Arc<crate::relay::service::RelayService>,
}

impl DaemonHandler {
    async fn lifecycle(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<Value, String>>) -> Command,
    ) -> Response {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(make(tx)).await.is_err() {
            return Response::err("stopping", "the agent is shutting down");
        }
        match rx.await {
            Ok(Ok(v)) => Response::ok(v),
            Ok(Err(m)) => Response::err("failed", m),
            Err(_) => Response::err("stopping", "the agent is shutting down"),
        }
    }

    fn status_json(&self) -> Value {
        let now = SystemTime::now();
        let reg = self.status.lock().unwrap().to_json(now);
        let (data, live) = self.cache.snapshot();
        json!({
            "agent_running": true,
            "id": self.id,
            "namespace": self.namespace,
            "pid": std::process::id(),
            "state_dir": self.state_dir,
            "started_at": util::rfc3339(self.started),
            "uptime_seconds": now.duration_since(self.started).map(|d| d.as_secs()).unwrap_or(0),
            "registration": reg,
            "cache": cache_json(&data, live, now),
            "relay": self.relay.status_json(),
        })
    }
}

/// The cache part of `agent status`.
pub fn cache_json(data: &CacheData, live: bool, now: SystemTime) -> Value {
    json!({
        "membranes": data.membranes.len(),
        "revision": data.revision,
        "live": live,
        "updated_at": (data.updated_at_ms > 0).then(|| util::rfc3339(util::from_unix_millis(data.updated_at_ms))),
        "age_seconds": if live { Some(0) } else { data.age_seconds(now) },
    })
}

impl Handler for DaemonHandler {
    async fn handle(&self, req: Request) -> Response {
        match req {
            Request::Status => Response::ok(self.status_json()),
            Request::Register {
                parent,
                clear_parent,
            } => {
                let parent = if clear_parent {
                    Some(None)
                } else {
                    parent.map(Some)
                };
                self.lifecycle(|reply| Command::Register { parent, reply })
                    .await
            }
            Request::Deregister => self.lifecycle(|reply| Command::Deregister { reply }).await,
            Request::Heartbeat => self.lifecycle(|reply| Command::Heartbeat { reply }).await,
            Request::Discover { id } => {
                let cache = || Some(self.cache.snapshot().0);
                query(
                    Some(&self.client),
                    &self.namespace,
                    id.as_ref(),
                    &ListFilter::default(),
                    cache,
                )
                .await
            }
            Request::List {
                service,
                capability,
            } => {
                let filter = ListFilter {
                    service: service.map(|s| s.to_string()),
                    capability: capability.map(|c| c.to_string()),
                    parent: None,
                };
                let cache = || Some(self.cache.snapshot().0);
                query(Some(&self.client), &self.namespace, None, &filter, cache).await
            }
            Request::Send {
                to,
                body,
                body_base64,
                content_type,
                all,
                wait,
                reply_to,
                id,
            } => {
                self.relay
                    .send(crate::relay::service::SendRequest {
                        to,
                        body,
                        body_base64,
                        content_type,
                        all,
                        wait,
                        reply_to,
                        id,
                    })
                    .await
            }
            Request::RecvWait { timeout_ms } => self.relay.recv_wait(timeout_ms).await,
        }
    }
}

/// Answers `discover` / `list`: from the registry, else (no registry answered) from the
/// cache, marked as cached.
pub async fn query(
    client: Option<&HttpRegistry>,
    namespace: &NamespaceName,
    id: Option<&MembraneId>,
    filter: &ListFilter,
    cache: impl FnOnce() -> Option<std::sync::Arc<CacheData>>,
) -> Response {
    let fallback_reason = match client {
        None => "no registry to ask (no --registry-url)".to_string(),
        Some(client) => {
            let r: Result<Value, ClientError> = match id {
                Some(id) => client.get(namespace, id).await.map(|m| {
                    output::one_json(
                        &m,
                        &Source::Registry {
                            url: client.current_url().to_string(),
                        },
                    )
                }),
                None => client.list(namespace, filter).await.map(|l| {
                    output::list_json(
                        &l.membranes,
                        &Source::Registry {
                            url: client.current_url().to_string(),
                        },
                    )
                }),
            };
            match r {
                Ok(v) => return Response::ok(v),
                Err(e) if e.status() == Some(404) && id.is_some() => {
                    return Response::err(
                        "not_found",
                        format!(
                            "membrane {} is not registered in namespace {namespace}",
                            id.unwrap()
                        ),
                    );
                }
                Err(e) if e.is_unreachable() || matches!(e, ClientError::NotRegistry { .. }) => {
                    e.explain()
                }
                Err(e) => return Response::err("failed", e.explain()),
            }
        }
    };
    let Some(data) = cache().filter(|d| d.namespace == *namespace) else {
        return Response {
            ok: false,
            result: None,
            error: Some(ErrorDetail {
                code: "unavailable".into(),
                message: format!("{fallback_reason}; and no cache of namespace {namespace} yet"),
            }),
        };
    };
    let source = Source::cache(&data, fallback_reason);
    match id {
        Some(id) => match data.membranes.get(id.as_str()) {
            Some(m) => Response::ok(output::one_json(m, &source)),
            None => Response::err(
                "not_found",
                format!(
                    "membrane {id} is not in the cache of namespace {namespace} (registry unreachable)"
                ),
            ),
        },
        None => Response::ok(output::list_json(&data.select(filter), &source)),
    }
}
