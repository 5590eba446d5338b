//! The registration lifecycle of `agent run`: register (with capped exponential backoff while
//! no registry answers), heartbeat every interval with jitter, re-register when a heartbeat
//! gets 404 (the registry lost or evicted the membrane), obey control commands (register,
//! deregister, heartbeat now), and deregister on shutdown within the grace timeout.
//!
//! The registry is behind [`RegistryApi`] so that the schedule is tested under
//! `tokio::time::pause()` against a scripted fake.

use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use shared::model::{Endpoint, MembraneView, RegisterResponse, Registration};
use shared::name::{MembraneId, NamespaceName};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::activity::Activity;
use crate::client::{ClientError, HeartbeatAnswer, HttpRegistry};
use crate::state;
use crate::util::{self, Backoff, Jitter};

/// The registry operations the lifecycle needs.
pub trait RegistryApi: Send + Sync + 'static {
    /// Registers (or updates) the membrane; `secret` proves ownership of an existing one,
    /// `replace` asks to take over a registration held by another instance.
    fn register(
        &self,
        ns: &NamespaceName,
        id: &MembraneId,
        reg: &Registration,
        secret: Option<&str>,
        replace: bool,
    ) -> impl Future<Output = Result<RegisterResponse, ClientError>> + Send;
    /// Heartbeats the membrane.
    fn heartbeat(
        &self,
        ns: &NamespaceName,
        id: &MembraneId,
        secret: &str,
    ) -> impl Future<Output = Result<HeartbeatAnswer, ClientError>> + Send;
    /// Removes the membrane.
    fn deregister(
        &self,
        ns: &NamespaceName,
        id: &MembraneId,
        secret: &str,
    ) -> impl Future<Output = Result<(), ClientError>> + Send;
    /// This host's address on its route to the registry.
    fn route_address(&self) -> impl Future<Output = Option<IpAddr>> + Send;
    /// The registry URL in use (for status and logs).
    fn url(&self) -> String;
}

impl RegistryApi for HttpRegistry {
    fn register(
        &self,
        ns: &NamespaceName,
        id: &MembraneId,
        reg: &Registration,
        secret: Option<&str>,
        replace: bool,
    ) -> impl Future<Output = Result<RegisterResponse, ClientError>> + Send {
        HttpRegistry::register(self, ns, id, reg, secret, replace)
    }
    fn heartbeat(
        &self,
        ns: &NamespaceName,
        id: &MembraneId,
        secret: &str,
    ) -> impl Future<Output = Result<HeartbeatAnswer, ClientError>> + Send {
        HttpRegistry::heartbeat(self, ns, id, secret)
    }
    fn deregister(
        &self,
        ns: &NamespaceName,
        id: &MembraneId,
        secret: &str,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        HttpRegistry::deregister(self, ns, id, secret)
    }
    fn route_address(&self) -> impl Future<Output = Option<IpAddr>> + Send {
        HttpRegistry::route_address(self)
    }
    fn url(&self) -> String {
        self.current_url().to_string()
    }
}

impl<T: RegistryApi> RegistryApi for Arc<T> {
    fn register(
        &self,
        ns: &NamespaceName,
        id: &MembraneId,
        reg: &Registration,
        secret: Option<&str>,
        replace: bool,
    ) -> impl Future<Output = Result<RegisterResponse, ClientError>> + Send {
        (**self).register(ns, id, reg, secret, replace)
    }
    fn heartbeat(
        &self,
        ns: &NamespaceName,
        id: &MembraneId,
        secret: &str,
    ) -> impl Future<Output = Result<HeartbeatAnswer, ClientError>> + Send {
        (**self).heartbeat(ns, id, secret)
    }
    fn deregister(
        &self,
        ns: &NamespaceName,
        id: &MembraneId,
        secret: &str,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        (**self).deregister(ns, id, secret)
    }
    fn route_address(&self) -> impl Future<Output = Option<IpAddr>> + Send {
        (**self).route_address()
    }
    fn url(&self) -> String {
        (**self).url()
    }
}

/// What the lifecycle needs to know.
#[derive(Debug, Clone)]
pub struct LifecycleConfig {
    /// Namespace.
    pub namespace: NamespaceName,
    /// Membrane id.
    pub id: MembraneId,
    /// The registration to send; empty `addresses` means "the route address".
    pub registration: Registration,
    /// For a tcp endpoint listening on an unspecified address: advertise the route address
    /// with this port.
    pub tcp_port_on_route: Option<u16>,
    /// Heartbeat interval (before jitter).
    pub heartbeat_interval: Duration,
    /// Jitter fraction applied to every delay (0.1 = ±10 %).
    pub jitter: f64,
    /// First retry delay while no registry answers.
    pub min_backoff: Duration,
    /// Largest retry delay.
    pub max_backoff: Duration,
    /// Time allowed for deregistration on shutdown.
    pub shutdown_grace: Duration,
    /// Where the instance secret is persisted (none in tests).
    pub state_dir: Option<PathBuf>,
    /// Take over a registration another instance holds, on this process's first
    /// registration only (afterwards its own secret proves it; replacing again would make
    /// two agents with one id steal the membrane from each other forever).
    pub replace: bool,
}

/// Where the lifecycle stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Not registered yet, or trying again.
    #[default]
    Registering,
    /// Registered and heartbeating.
    Registered,
    /// Deregistered on request (`agent deregister`); waits for `agent register`.
    Deregistered,
    /// Shutting down.
    Stopping,
}

/// The lifecycle's state as `agent status` shows it.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// Phase.
    pub phase: Phase,
    /// The membrane as the registry last answered it.
    pub membrane: Option<MembraneView>,
    /// Last successful registration.
    pub registered_at: Option<SystemTime>,
    /// Last successful heartbeat.
    pub last_heartbeat: Option<SystemTime>,
    /// Whether the last request reached a registry (None before the first).
    pub server_reachable: Option<bool>,
    /// Registry URL in use.
    pub registry_url: Option<String>,
    /// Last error, cleared by a success.
    pub last_error: Option<String>,
    /// TTL the registry applies.
    pub ttl_seconds: Option<u32>,
    /// When the next heartbeat or registration attempt is due.
    pub next_attempt: Option<SystemTime>,
    /// Successful registrations.
    pub registrations: u64,
    /// Successful heartbeats.
    pub heartbeats: u64,
    /// Failed requests.
    pub failures: u64,
}

impl Status {
    /// JSON for `agent status`.
    pub fn to_json(&self, now: SystemTime) -> Value {
        let t = |x: Option<SystemTime>| x.map(util::rfc3339);
        let age = |x: Option<SystemTime>| {
            x.and_then(|x| now.duration_since(x).ok())
                .map(|d| d.as_secs())
        };
        json!({
            "phase": self.phase,
            "registered": self.phase == Phase::Registered,
            "registered_at": t(self.registered_at),
            "last_heartbeat": t(self.last_heartbeat),
            "last_heartbeat_age_seconds": age(self.last_heartbeat),
            "next_attempt": t(self.next_attempt),
            "server_reachable": self.server_reachable,
            "registry_url": self.registry_url,
            "last_error": self.last_error,
            "ttl_seconds": self.ttl_seconds,
            "registrations": self.registrations,
            "heartbeats": self.heartbeats,
            "failures": self.failures,
            "state": self.membrane.as_ref().map(|m| m.state.as_str()),
        })
    }
}

/// A request from the control socket.
#[derive(Debug)]
pub enum Command {
    /// Register now; `Some(parent)` changes the parent first (`Some(None)` clears it).
    Register {
        /// New parent, if changing.
        parent: Option<Option<MembraneId>>,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<Value, String>>,
    },
    /// Deregister now and stop heartbeating until the next `Register`.
    Deregister {
        /// Where the answer goes.
        reply: oneshot::Sender<Result<Value, String>>,
    },
    /// Heartbeat now.
    Heartbeat {
        /// Where the answer goes.
        reply: oneshot::Sender<Result<Value, String>>,
    },
}

/// Why the lifecycle gave up.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The registry refused the first registration (bad token, invalid registration, ...).
    #[error("registration refused: {}", .0.explain())]
    Refused(ClientError),
}

/// The lifecycle task.
pub struct Lifecycle<R> {
    registry: R,
    cfg: LifecycleConfig,
    status: Arc<Mutex<Status>>,
    activity: Arc<Activity>,
    secret: Option<String>,
    on_server: bool,
    /// A registration was sent whose outcome is unknown (no answer, or a 5xx: the registry
    /// may have committed it): shutdown deregisters then too (a 404 is fine).
    maybe_on_server: bool,
    ever_registered: bool,
    jitter: Jitter,
    backoff: Backoff,
    ready: Option<oneshot::Sender<()>>,
}

enum Due {
    Register,
    Heartbeat,
}

impl<R: RegistryApi> Lifecycle<R> {
    /// A lifecycle; `ready` fires after the first successful registration.
    pub fn new(
        registry: R,
        cfg: LifecycleConfig,
        status: Arc<Mutex<Status>>,
        activity: Arc<Activity>,
        ready: Option<oneshot::Sender<()>>,
    ) -> Self {
        let secret = cfg.state_dir.as_deref().and_then(|d| {
            state::load_secret(d, &cfg.namespace, &cfg.id).or_else(|| {
                // Chosen (and kept) before the first registration: retries are then the
                // same instance even when an answer was lost.
                let s = state::new_secret()
                    .inspect_err(|e| tracing::warn!(error = %e, "cannot make an instance secret"))
                    .ok()?;
                if let Err(e) = state::save_secret(d, &cfg.namespace, &cfg.id, &s) {
                    tracing::warn!(error = %e, "cannot persist the instance secret");
                }
                Some(s)
            })
        });
        let jitter = if cfg.jitter > 0.0 {
            Jitter::new(cfg.jitter)
        } else {
            Jitter::with_seed(0.0, 1)
        };
        let backoff = Backoff::new(cfg.min_backoff, cfg.max_backoff);
        Lifecycle {
            registry,
            cfg,
            status,
            activity,
            secret,
            on_server: false,
            maybe_on_server: false,
            ever_registered: false,
            jitter,
            backoff,
            ready,
        }
    }

    /// Uses a fixed jitter seed (tests).
    pub fn with_jitter_seed(mut self, seed: u64) -> Self {
        self.jitter = Jitter::with_seed(self.cfg.jitter, seed);
        self
    }

    fn set_status(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().unwrap());
    }

    fn schedule(&self, at: Instant) {
        let wall = SystemTime::now() + at.saturating_duration_since(Instant::now());
        self.set_status(|s| s.next_attempt = Some(wall));
    }

    fn failed(&mut self, what: &str, e: &ClientError) {
        let reachable = !e.is_unreachable();
        let msg = e.explain();
        tracing::warn!(error = %msg, "{what} failed");
        self.activity.record(
            &format!("{what}_failed"),
            &msg,
            json!({"status": e.status(), "reachable": reachable}),
        );
        self.set_status(|s| {
            s.failures += 1;
            s.server_reachable = Some(reachable);
            s.last_error = Some(msg);
        });
    }

    async fn build_registration(&self) -> Registration {
        let mut reg = self.cfg.registration.clone();
        if let Some(id) = crate::relay::auth::identity() {
            reg.relay_public_key = Some(id.public_hex());
        }
        let needs_route = reg.addresses.is_empty() || self.cfg.tcp_port_on_route.is_some();
        let route = if needs_route {
            self.registry.route_address().await
        } else {
            None
        };
        if reg.addresses.is_empty()
            && let Some(ip) = route
        {
            reg.addresses.push(ip);
        }
        if let Some(port) = self.cfg.tcp_port_on_route {
            let ip = reg.addresses.first().copied().or(route);
            if let Some(ip) = ip {
                reg.endpoint = Some(Endpoint::Tcp {
                    address: std::net::SocketAddr::new(ip, port).to_string(),
                });
            }
        }
        reg
    }

    async fn register(&mut self) -> Result<RegisterResponse, ClientError> {
        let reg = self.build_registration().await;
        let r = self
            .registry
            .register(
                &self.cfg.namespace,
                &self.cfg.id,
                &reg,
                self.secret.as_deref(),
                self.cfg.replace && !self.ever_registered,
            )
            .await;
        match &r {
            Ok(resp) => {
                crate::relay::auth::learned(
                    self.cfg.state_dir.as_deref(),
                    resp.relay_key.as_deref(),
                );
                if self.secret.as_deref() != Some(resp.instance_secret.as_str()) {
                    self.secret = Some(resp.instance_secret.clone());
                    if let Some(dir) = &self.cfg.state_dir
                        && let Err(e) = state::save_secret(
                            dir,
                            &self.cfg.namespace,
                            &self.cfg.id,
                            &resp.instance_secret,
                        )
                    {
                        tracing::warn!(error = %e, "cannot persist the instance secret");
                    }
                }
                self.on_server = true;
                self.maybe_on_server = false;
                let url = self.registry.url();
                tracing::info!(id = %self.cfg.id, namespace = %self.cfg.namespace, %url, created = resp.created, "registered");
                self.activity.record(
                    "registered",
                    &format!(
                        "registered {} in {} at {url}",
                        self.cfg.id, self.cfg.namespace
                    ),
                    json!({"created": resp.created, "registry": url, "addresses": reg.addresses}),
                );
                let now = SystemTime::now();
                self.set_status(|s| {
                    s.phase = Phase::Registered;
                    s.membrane = Some(resp.membrane.clone());
                    s.registered_at = Some(now);
                    s.last_heartbeat = Some(now);
                    s.server_reachable = Some(true);
                    s.registry_url = Some(url);
                    s.last_error = None;
                    s.ttl_seconds = resp.membrane.registration.ttl_seconds.or(s.ttl_seconds);
                    s.registrations += 1;
                });
                if !self.ever_registered {
                    self.ever_registered = true;
                    if let Some(tx) = self.ready.take() {
                        let _ = tx.send(());
                    }
                }
            }
            Err(e) => {
                self.maybe_on_server |= e.maybe_applied();
                self.failed("register", e)
            }
        }
        r
    }

    async fn heartbeat(&mut self) -> Result<HeartbeatAnswer, ClientError> {
        let secret = self.secret.clone().unwrap_or_default();
        let r = self
            .registry
            .heartbeat(&self.cfg.namespace, &self.cfg.id, &secret)
            .await;
        match &r {
            Ok(a) => {
                tracing::debug!("heartbeat ok");
                let url = self.registry.url();
                self.set_status(|s| {
                    s.last_heartbeat = Some(SystemTime::now());
                    s.server_reachable = Some(true);
                    s.registry_url = Some(url);
                    s.last_error = None;
                    s.heartbeats += 1;
                    if a.ttl_seconds.is_some() {
                        s.ttl_seconds = a.ttl_seconds;
                    }
                    if let Some(m) = s.membrane.as_mut() {
                        m.state = shared::model::HealthState::Passing;
                    }
                });
            }
            Err(e) if e.status() == Some(404) => {
                self.on_server = false;
                tracing::warn!("the registry does not know this membrane any more; re-registering");
                self.activity.record(
                    "lost",
                    "heartbeat answered 404: the registry lost or evicted the membrane; re-registering",
                    Value::Null,
                );
                self.set_status(|s| s.phase = Phase::Registering);
            }
            Err(e) => self.failed("heartbeat", e),
        }
        r
    }

    async fn deregister(&mut self) -> Result<(), ClientError> {
        let secret = self.secret.clone().unwrap_or_default();
        let r = self
            .registry
            .deregister(&self.cfg.namespace, &self.cfg.id, &secret)
            .await;
        match &r {
            Ok(()) => {
                self.on_server = false;
                self.maybe_on_server = false;
                tracing::info!("deregistered");
                self.activity.record(
                    "deregistered",
                    &format!("deregistered {} from {}", self.cfg.id, self.cfg.namespace),
                    Value::Null,
                );
            }
            Err(e) if e.status() == Some(404) => {
                self.on_server = false;
                self.maybe_on_server = false;
            }
            Err(e) => self.failed("deregister", e),
        }
        match r {
            Err(e) if e.status() == Some(404) => Ok(()),
            r => r,
        }
    }

    fn next_heartbeat(&mut self) -> Instant {
        Instant::now() + self.jitter.apply(self.cfg.heartbeat_interval)
    }

    fn next_retry(&mut self) -> Instant {
        let d = self.backoff.next_delay();
        Instant::now() + self.jitter.apply(d)
    }

    /// Runs until `cancel`, then deregisters (within the grace timeout) if registered.
    /// Returns an error only when the registry refuses the very first registration.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        cancel: CancellationToken,
    ) -> Result<(), LifecycleError> {
        let mut due = Some((Instant::now(), Due::Register));
        let mut commands_open = true;
        let mut deadline = None;
        let grace = self.cfg.shutdown_grace;
        let result = loop {
            let sleep = async {
                match &due {
                    Some((at, _)) => tokio::time::sleep_until(*at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break Ok(()),
                cmd = commands.recv(), if commands_open => match cmd {
                    None => commands_open = false,
                    Some(cmd) => {
                        let command = self.command(cmd);
                        tokio::pin!(command);
                        let outcome = tokio::select! {
                            o = &mut command => o,
                            _ = cancel.cancelled() => {
                                // As for a step: a registration in flight must be known
                                // to be removed.
                                deadline = Some(Instant::now() + grace);
                                let _ = tokio::time::timeout(grace, &mut command).await;
                                break Ok(());
                            }
                        };
                        if let Some(next) = outcome {
                            due = next;
                        }
                    }
                },
                _ = sleep => {
                    let (_, what) = due.take().expect("sleeping on a due action");
                    let step = self.step(what);
                    tokio::pin!(step);
                    let next = tokio::select! {
                        n = &mut step => n,
                        _ = cancel.cancelled() => {
                            // Let the request in flight finish within the grace time: a
                            // registration the registry accepted must be known to be removed.
                            deadline = Some(Instant::now() + grace);
                            let _ = tokio::time::timeout(grace, &mut step).await;
                            break Ok(());
                        }
                    };
                    match next {
                        Ok(n) => due = Some(n),
                        Err(e) => break Err(e),
                    }
                }
            }
        };
        self.set_status(|s| s.phase = Phase::Stopping);
        let deadline = deadline.unwrap_or_else(|| Instant::now() + self.cfg.shutdown_grace);
        if result.is_ok() && (self.on_server || self.maybe_on_server) {
            match tokio::time::timeout_at(deadline, self.deregister()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e.explain(), "could not deregister on shutdown")
                }
                Err(_) => {
                    tracing::warn!(grace = ?self.cfg.shutdown_grace, "deregistration timed out");
                    self.activity.record(
                        "deregister_failed",
                        "deregistration did not finish within the shutdown grace time",
                        Value::Null,
                    );
                }
            }
        }
        result
    }

    /// Does the due action; returns the next one.
    async fn step(&mut self, what: Due) -> Result<(Instant, Due), LifecycleError> {
        match what {
            Due::Register => self.register_step().await,
            Due::Heartbeat => match self.heartbeat().await {
                Ok(_) => {
                    self.backoff.reset();
                    let at = self.next_heartbeat();
                    self.schedule(at);
                    Ok((at, Due::Heartbeat))
                }
                Err(e) if e.status() == Some(404) => {
                    // The registry forgot us: re-register at once.
                    self.backoff.reset();
                    self.register_step().await
                }
                Err(_) => {
                    let at = self.next_retry();
                    self.schedule(at);
                    Ok((at, Due::Heartbeat))
                }
            },
        }
    }

    async fn register_step(&mut self) -> Result<(Instant, Due), LifecycleError> {
        match self.register().await {
            Ok(_) => {
                self.backoff.reset();
                let at = self.next_heartbeat();
                self.schedule(at);
                Ok((at, Due::Heartbeat))
            }
            // A registry answered "no" to the very first registration: a configuration
            // problem (token, namespace, registration content, URL) the user must fix.
            Err(e) if !self.ever_registered && !e.is_unreachable() && e.status() != Some(503) => {
                Err(LifecycleError::Refused(e))
            }
            Err(_) => {
                let at = self.next_retry();
                self.schedule(at);
                Ok((at, Due::Register))
            }
        }
    }

    /// Handles a control command; returns a new schedule when it changes.
    async fn command(&mut self, cmd: Command) -> Option<Option<(Instant, Due)>> {
        match cmd {
            Command::Register { parent, reply } => {
                let before = self.cfg.registration.parent.clone();
                if let Some(p) = parent {
                    self.cfg.registration.parent = p;
                }
                match self.register().await {
                    Ok(resp) => {
                        self.backoff.reset();
                        let _ = reply.send(Ok(json!({
                            "registered": true,
                            "created": resp.created,
                            "membrane": crate::output::membrane_json(&resp.membrane),
                        })));
                        let at = self.next_heartbeat();
                        self.schedule(at);
                        Some(Some((at, Due::Heartbeat)))
                    }
                    // Still on the registry as registered before (a refused change, e.g.
                    // a rotated join token: heartbeats need only the instance secret):
                    // nothing changes, heartbeats go on; retrying the change would stop
                    // them and let the membrane expire.
                    Err(e) if self.on_server && !e.maybe_applied() && !e.is_unreachable() => {
                        self.cfg.registration.parent = before;
                        let _ = reply.send(Err(format!(
                            "{}; still registered as before, heartbeating",
                            e.explain()
                        )));
                        None
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.explain()));
                        self.set_status(|s| s.phase = Phase::Registering);
                        let at = self.next_retry();
                        self.schedule(at);
                        Some(Some((at, Due::Register)))
                    }
                }
            }
            Command::Deregister { reply } => {
                if !self.on_server {
                    self.set_status(|s| {
                        s.phase = Phase::Deregistered;
                        s.next_attempt = None;
                    });
                    let _ = reply.send(Ok(json!({"deregistered": true, "was_registered": false})));
                    return Some(None);
                }
                match self.deregister().await {
                    Ok(()) => {
                        self.set_status(|s| {
                            s.phase = Phase::Deregistered;
                            s.next_attempt = None;
                        });
                        let _ =
                            reply.send(Ok(json!({"deregistered": true, "was_registered": true})));
                        Some(None)
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.explain()));
                        None
                    }
                }
            }
            Command::Heartbeat { reply } => {
                let phase = self.status.lock().unwrap().phase;
                if phase != Phase::Registered {
                    let _ = reply.send(Err(format!(
                        "not registered (phase {phase:?}); no heartbeat sent"
                    )));
                    return None;
                }
                match self.heartbeat().await {
                    Ok(a) => {
                        self.backoff.reset();
                        let _ = reply.send(Ok(json!({"heartbeat": "ok", "state": a.state, "ttl_seconds": a.ttl_seconds})));
                        let at = self.next_heartbeat();
                        self.schedule(at);
                        Some(Some((at, Due::Heartbeat)))
                    }
                    Err(e) if e.status() == Some(404) => match self.register().await {
                        Ok(_) => {
                            self.backoff.reset();
                            let _ = reply.send(Ok(
                                json!({"heartbeat": "re-registered", "state": "passing"}),
                            ));
                            let at = self.next_heartbeat();
                            self.schedule(at);
                            Some(Some((at, Due::Heartbeat)))
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e.explain()));
                            let at = self.next_retry();
                            self.schedule(at);
                            Some(Some((at, Due::Register)))
                        }
                    },
                    Err(e) => {
                        let _ = reply.send(Err(e.explain()));
                        let at = self.next_retry();
                        self.schedule(at);
                        Some(Some((at, Due::Heartbeat)))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "lifecycle_tests.rs"]
mod tests;
