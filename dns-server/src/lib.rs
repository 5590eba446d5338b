//! `dns-server`: the central membrane registry.
//!
//! Keeps namespaces and registered membranes on a durable embedded store, tracks their
//! heartbeats, answers DNS per namespace and serves the HTTP admin API.
//!
//! - [`config`]: command line and validated configuration;
//! - [`registry`]: namespaces, membranes, health, events (the core);
//! - [`store`]: durable storage (SQLite, group commit);
//! - [`dns`]: authoritative DNS from registry snapshots;
//! - [`http`]: the admin API, SSE, metrics and web page;
//! - [`client`]: the client subcommands.
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod dns;
pub mod export;
pub mod http;
pub mod metrics;
pub mod registry;
pub mod snapshot;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use config::{Config, StoreKind};
use metrics::Metrics;
use registry::Registry;

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Invalid configuration (exit 64).
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
    /// A socket failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    move |source| RunError::Io {
        context: context.into(),
        source,
    }
}

/// The server's bound sockets.
pub struct Listeners {
    /// HTTP admin API.
    pub http: TcpListener,
    /// DNS over UDP.
    pub dns_udp: Vec<UdpSocket>,
    /// DNS over TCP.
    pub dns_tcp: Vec<TcpListener>,
}

impl Listeners {
    /// The HTTP address actually bound.
    pub fn http_addr(&self) -> std::io::Result<SocketAddr> {
        self.http.local_addr()
    }
}

/// Pending connections the kernel queues for the HTTP listener until it accepts them
/// (capped by `net.core.somaxconn`, 4096 by default). Past it, a client's SYN is dropped and
/// retried after 1 s, 3 s, 7 s: 20,000 agents heartbeating every 10 s open 2,000
/// connections a second, and with tokio's default of 1,024 a 12,000-agent soak counted
/// 14,704 listen-queue overflows in a minute (none with 4,096).
const HTTP_BACKLOG: u32 = 4096;

/// A TCP listener on `addr` with [`HTTP_BACKLOG`].
fn listen_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(HTTP_BACKLOG)
}

/// Binds every configured address and logs each one (`listening http 127.0.0.1:8765`).
/// For a DNS address with port 0, UDP picks the port and TCP binds the same one.
pub async fn bind(config: &Config) -> Result<Listeners, RunError> {
    let http = listen_tcp(config.http_listen)
        .map_err(io_err(format!("binding http {}", config.http_listen)))?;
    tracing::info!(
        "listening http {}",
        http.local_addr().map_err(io_err("http"))?
    );
    if config.tls.is_some() {
        tracing::info!("the HTTP API is served over TLS (https)");
    }
    let mut dns_udp = Vec::new();
    let mut dns_tcp = Vec::new();
    for addr in &config.dns_listen {
        let hint = if addr.port() < 1024 {
            " (ports below 1024 need root or CAP_NET_BIND_SERVICE; try --dns-listen 127.0.0.1:5353)"
        } else {
            ""
        };
        let mut attempt = 0;
        let (udp, tcp) = loop {
            let udp = dns::bind_udp(*addr, udp_sockets())
                .map_err(io_err(format!("binding dns udp {addr}{hint}")))?;
            let port = udp[0].local_addr().map_err(io_err("dns udp"))?.port();
            match TcpListener::bind(SocketAddr::new(addr.ip(), port)).await {
                Ok(tcp) => break (udp, tcp),
                // Port 0: the UDP port may be taken on TCP; pick another.
                Err(e) if addr.port() == 0 && attempt < 10 => {
                    tracing::debug!(error = %e, "dns tcp port taken, retrying");
                    attempt += 1;
                }
                Err(e) => return Err(io_err(format!("binding dns tcp {addr}{hint}"))(e)),
            }
        };
        tracing::info!(
            "listening dns udp {}",
            udp[0].local_addr().map_err(io_err("dns"))?
        );
        tracing::info!(
            "listening dns tcp {}",
            tcp.local_addr().map_err(io_err("dns"))?
        );
        dns_udp.extend(udp);
        dns_tcp.push(tcp);
    }
    Ok(Listeners {
        http,
        dns_udp,
        dns_tcp,
    })
}

/// UDP sockets per DNS address (SO_REUSEPORT group): one per core.
fn udp_sockets() -> usize {
    std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .clamp(1, 8)
}

/// Creates the data directory if needed and locks it for this process; returns the
/// database path and the lock (hold it until the store is closed).
fn open_data_dir(config: &Config) -> Result<(std::path::PathBuf, store::DataDirLock), RunError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = &config.data_dir;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(format!("creating data dir {}", dir.display())))?;
    let lock = store::lock_data_dir(dir)?;
    Ok((dir.join("registry.sqlite3"), lock))
}

fn notify_systemd(state: sd_notify::NotifyState<'_>) {
    if std::env::var_os("NOTIFY_SOCKET").is_some()
        && let Err(e) = sd_notify::notify(&[state])
    {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// Runs the server on already-bound sockets until `shutdown` is cancelled, then drains
/// in-flight requests within the configured grace time and flushes the store.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new());
    let (registry, writer_thread, store_kind, _dir_lock) = match &config.store {
        StoreKind::Sqlite => {
            let (db, lock) = open_data_dir(&config)?;
            let (loaded, writer, writer_thread) = store::sqlite::open(&db)?;
            tracing::info!(
                path = %db.display(),
                namespaces = loaded.namespaces.len(),
                membranes = loaded.membranes.len(),
                "store opened"
            );
            for (namespace, membranes) in &loaded.orphaned {
                tracing::warn!(
                    namespace,
                    membranes,
                    "registrations of a namespace that does not exist: kept on disk, not \
                     served (create the namespace again and restart to serve them)"
                );
            }
            // Left by versions that kept the event position only across a clean stop;
            // the store keeps it now.
            let _ = std::fs::remove_file(config.data_dir.join("events-resume.json"));
            let registry = Registry::new(loaded, writer, metrics.clone());
            tracing::info!(
                epoch = registry.events().epoch(),
                revision = registry.events().revision(),
                "event history loaded: agents resume their streams without listing"
            );
            (
                Arc::new(registry),
                Some(writer_thread),
                "sqlite",
                Some(lock),
            )
        }
        #[cfg(feature = "etcd")]
        StoreKind::Etcd(endpoints) => {
            let registry =
                open_etcd(endpoints, &config.etcd_prefix, metrics.clone(), &shutdown).await?;
            (registry, None, "etcd", None)
        }
        #[cfg(not(feature = "etcd"))]
        StoreKind::Etcd(_) => {
            return Err(config::ConfigError::Invalid(
                "--store etcd://... needs a dns-server built with the `etcd` cargo feature \
                 (cargo build --features etcd); this build has only the embedded store (sqlite)"
                    .into(),
            )
            .into());
        }
    };
    registry.set_self_preservation(config.self_preservation);
    registry.set_limits(config.limits);
    let dns_config = config.dns.clone();
    let mut catalog = dns::Catalog::new(dns_config.clone())
        .map_err(|e| config::ConfigError::Invalid(e.to_string()))?
        .with_transfer(config.transfer.clone());
    // SOA serials kept increasing across restarts: in the embedded store, or with etcd in a
    // small SQLite file of this replica's data dir (each replica serves its own serials;
    // without a usable data dir they increase within the process only).
    // (The embedded store's data dir is locked above; with etcd it is locked here, so two
    // replicas never share one serial file.)
    let mut _serial_dir_lock = None;
    if store_kind == "sqlite" {
        let table = store::sqlite::SerialTable::open(&config.data_dir.join("registry.sqlite3"))?;
        catalog = catalog.with_serial_store(Arc::new(table))?;
    } else {
        let local = open_data_dir(&config)
            .map_err(|e| e.to_string())
            .and_then(|(db, lock)| {
                let path = db.with_file_name("zone-serials.sqlite3");
                let table = store::sqlite::SerialTable::open(&path).map_err(|e| e.to_string())?;
                Ok((table, lock))
            });
        match local {
            Ok((table, lock)) => {
                catalog = catalog.with_serial_store(Arc::new(table))?;
                _serial_dir_lock = Some(lock);
            }
            Err(e) => tracing::warn!(
                error = %e,
                "SOA serials are not stored (data dir unusable): they may go backwards after a restart"
            ),
        }
    }
    let catalog = Arc::new(catalog);
    metrics.register_collector(metrics::DnsCollector(catalog.clone()));
    let exporter_config = dns_config.clone();
    let (http_limits, dns_tcp) = fit_to_open_files(
        config.http_limits,
        config.dns_tcp,
        listeners.dns_tcp.len(),
        open_file_limit(),
    );
    let sse_max = sse_cap(config.sse_max_subscribers, http_limits.max_connections);
    let exporter_catalog = catalog.clone();
    let state = http::AppState {
        registry: registry.clone(),
        metrics: metrics.clone(),
        admin_token_hash: config.admin_token.as_deref().map(registry::hash_secret),
        max_body: config.max_body_bytes,
        started: Instant::now(),
        store_kind,
        shutdown: shutdown.clone(),
        zone_exporter: Some(Arc::new(move |snap| {
            // With the serial DNS serves (which the registry's snapshot does not carry).
            let mut snap = snap.clone();
            if let Some(serial) = exporter_catalog.serial(&snap.name) {
                snap.serial = serial;
            }
            dns::export_zone(&snap, &exporter_config)
        })),
        sse_permits: Arc::new(tokio::sync::Semaphore::new(sse_max)),
        sse_pacing: http::sse::Pacing {
            cap: sse_max,
            min_window: config.sse_batch,
            writes_per_sec: config.sse_max_writes,
        },
        lists: Default::default(),
    };
    if config.admin_token.is_none() {
        tracing::warn!("no admin token: the admin API is open (no checks at all)");
    }

    let mut tasks = JoinSet::new();
    #[cfg(feature = "etcd")]
    if registry.is_etcd() {
        tasks.spawn(registry.clone().run_etcd_watch(shutdown.clone()));
    }
    tasks.spawn(
        registry
            .clone()
            .run_health(config.sweep_interval, shutdown.clone()),
    );
    tasks.spawn(
        registry
            .clone()
            .run_zone_updates(catalog.clone(), shutdown.clone()),
    );
    tasks.spawn(dns::run_notify(catalog.clone(), shutdown.clone()));
    {
        let shutdown = shutdown.clone();
        let (udp, tcp) = (listeners.dns_udp, listeners.dns_tcp);
        // On threads of their own: HTTP load must not delay DNS answers. (The shared
        // runtime is a benchmark switch, for comparison.)
        let dns: std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> =
            if config.dns_shared_runtime {
                tracing::warn!("dns on the shared runtime (--dns-shared-runtime, benchmarks only)");
                Box::pin(dns::serve_with(
                    udp,
                    tcp,
                    catalog.clone(),
                    shutdown.clone(),
                    dns_tcp,
                ))
            } else {
                Box::pin(
                    dns::serve_on_own_threads(
                        udp,
                        tcp,
                        catalog.clone(),
                        shutdown.clone(),
                        dns_tcp,
                        udp_sockets(),
                    )
                    .map_err(io_err("starting the dns threads"))?,
                )
            };
        tasks.spawn(async move {
            if let Err(e) = dns.await {
                tracing::error!(error = %e, "dns server failed");
                shutdown.cancel();
            }
        });
    }
    {
        let shutdown = shutdown.clone();
        let router = http::router(state);
        let tls = config.tls.clone();
        tasks.spawn(async move {
            let served =
                http::accept::serve_tls(listeners.http, router, shutdown.clone(), http_limits, tls)
                    .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "http server failed");
                shutdown.cancel();
            }
        });
    }
    notify_systemd(sd_notify::NotifyState::Ready);
    tracing::info!("ready");

    shutdown.cancelled().await;
    notify_systemd(sd_notify::NotifyState::Stopping);
    tracing::info!("shutting down");
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("shutdown grace expired; aborting remaining tasks");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    // Last reference to the store's queue: the writer flushes and exits.
    drop(registry);
    drop(catalog);
    if let Some(writer_thread) = writer_thread {
        let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Descriptors kept for everything but client connections: the store, listeners, UDP
/// sockets, logs, etcd (about 30), over-cap clients being told 503
/// ([`http::accept::SHEDDING`]), and connections closed to make room for new ones whose
/// descriptor is not closed yet. (Running out only delays accepting, by up to
/// [`http::accept::ACCEPT_BACKOFF`], but an 18,500-agent soak did run out with 128.)
const FD_RESERVE: u64 = 384;

/// Raises the soft open-file limit to the hard one (a server holding thousands of
/// connections needs more than the usual 1024); returns the soft limit in force.
pub fn raise_open_file_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft >= hard {
        return Some(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => {
            tracing::debug!(from = soft, to = hard, "raised the open-file limit");
            Some(hard)
        }
        Err(e) => {
            tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
            Some(soft)
        }
    }
}

/// The soft open-file limit.
fn open_file_limit() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// Lowers the HTTP and DNS-over-TCP connection caps (in proportion) so that together they
/// fit the open-file limit with `FD_RESERVE` (384) to spare: connections past a cap are shed
/// politely, while connections past the file limit would fail every accept (and the store).
pub fn fit_to_open_files(
    http: http::HttpLimits,
    dns_tcp: dns::TcpLimits,
    dns_listeners: usize,
    nofile: Option<u64>,
) -> (http::HttpLimits, dns::TcpLimits) {
    let Some(nofile) = nofile else {
        return (http, dns_tcp);
    };
    let budget = nofile.saturating_sub(FD_RESERVE).max(2) as u128;
    let http_want = http.max_connections as u128;
    let dns_want = (dns_tcp.max_connections * dns_listeners) as u128;
    if http_want + dns_want <= budget {
        return (http, dns_tcp);
    }
    let total = http_want + dns_want;
    let http_max = ((http_want * budget / total) as usize).max(1);
    let dns_max = ((dns_want * budget / total) as usize)
        .checked_div(dns_listeners)
        .map_or(dns_tcp.max_connections, |n| n.max(1));
    tracing::warn!(
        open_files = nofile,
        http_max_connections = http_max,
        dns_tcp_max_connections = dns_max,
        "the open-file limit is too low for the configured connection caps; lowered them \
         (raise LimitNOFILE= / ulimit -n)"
    );
    (
        http::HttpLimits {
            max_connections: http_max,
            ..http
        },
        dns::TcpLimits {
            max_connections: dns_max,
            ..dns_tcp
        },
    )
}

/// Event streams hold their HTTP connection for good: a quarter of the HTTP connections,
/// up to 1,024 (plenty for short requests: 20,000 agents heartbeating every 10 s keep a few
/// dozen open), stays free of streams, so requests always find room.
pub fn sse_cap(configured: usize, http_max_connections: usize) -> usize {
    let room = (http_max_connections - (http_max_connections / 4).min(1024)).max(1);
    if configured > room {
        tracing::warn!(
            configured,
            lowered_to = room,
            "--sse-max-subscribers leaves too few HTTP connections for requests (a quarter of the cap, at most 1,024); lowered"
        );
    }
    configured.min(room)
}

/// How long start-up waits for etcd before giving up.
#[cfg(feature = "etcd")]
const ETCD_STARTUP_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Connects to etcd and loads the registry from it, retrying while etcd is not reachable
/// (for up to [`ETCD_STARTUP_WAIT`]): a replica without a copy has nothing to serve.
#[cfg(feature = "etcd")]
async fn open_etcd(
    endpoints: &[String],
    prefix: &str,
    metrics: Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Result<Arc<Registry>, RunError> {
    let store = store::etcd::Etcd::connect(endpoints, prefix).await?;
    let registry = Arc::new(Registry::new_etcd(store, metrics));
    let deadline = Instant::now() + ETCD_STARTUP_WAIT;
    loop {
        match registry.etcd_load().await {
            Ok(revision) => {
                let c = registry.counts();
                tracing::info!(
                    endpoints = endpoints.join(","),
                    prefix,
                    revision,
                    namespaces = c.namespaces,
                    membranes = c.membranes,
                    "store opened (etcd)"
                );
                return Ok(registry);
            }
            Err(e) if Instant::now() < deadline && !shutdown.is_cancelled() => {
                tracing::warn!(error = %e, "etcd not reachable yet; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Cancels `token` on SIGTERM or SIGINT.
pub fn cancel_on_signals(token: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
        token.cancel();
    });
    Ok(())
}

impl registry::ZoneSink for dns::Catalog {
    fn update(&self, snap: &snapshot::NamespaceSnapshot) {
        dns::Catalog::update(self, snap)
    }
    fn remove(&self, ns: &shared::NamespaceName) {
        dns::Catalog::remove(self, ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_caps_fit_the_open_file_limit() {
        let (http, dns) = (http::HttpLimits::default(), dns::TcpLimits::default());
        assert_eq!(
            fit_to_open_files(http, dns, 2, Some(1 << 20)),
            (http, dns),
            "room enough: unchanged"
        );
        let (h, d) = fit_to_open_files(http, dns, 2, Some(1024));
        assert!(h.max_connections + 2 * d.max_connections <= 1024 - FD_RESERVE as usize);
        assert!(h.max_connections > d.max_connections && d.max_connections >= 1);
        assert_eq!(h.idle_timeout, http.idle_timeout);
        let (h, d) = fit_to_open_files(http, dns, 1, Some(10));
        assert_eq!((h.max_connections, d.max_connections), (1, 1));
    }

    #[test]
    fn streams_leave_a_quarter_of_the_http_connections_to_requests() {
        assert_eq!(sse_cap(1024, 4096), 1024);
        assert_eq!(sse_cap(1024, 200), 150);
        assert_eq!(sse_cap(5, 1), 1);
        // Large caps keep 1,024 connections for requests, not a quarter.
        assert_eq!(sse_cap(30_000, 20_000), 18_976);
    }
}
