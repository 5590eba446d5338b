//! Command line (`Cli`, clap) and the validated server [`Config`] built from it.
//!
//! Every flag can also come from a `MEMBRANE_*` environment variable. [`Config`] is built by
//! `TryFrom<ServerArgs>`, so every rule here is unit-tested without starting a process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Default HTTP admin API address.
pub const DEFAULT_HTTP: &str = "127.0.0.1:8765";
/// Default DNS address (UDP and TCP).
pub const DEFAULT_DNS: &str = "0.0.0.0:53";

/// The membrane registry: durable store, heartbeats, authoritative DNS, HTTP admin API.
#[derive(Debug, Parser)]
#[command(
    name = "dns-server",
    version,
    about = "Membrane registry: keeps namespaces and membranes, answers DNS for them, serves the admin API",
    long_about = "Membrane registry: keeps namespaces and registered membranes on a durable \
embedded store, tracks their heartbeats, answers DNS per namespace \
(dig SRV _perception._tcp.cognitive-system) and serves the HTTP admin API and web page.\n\n\
With no subcommand it runs the server. The other subcommands are clients of a running \
server's HTTP API (--url).",
    after_help = "Examples:\n  dns-server --data-dir ./data --dns-listen 127.0.0.1:5353\n  \
dns-server namespace create cognitive-system \"AI cognitive architecture\"\n  \
dig @127.0.0.1 -p 5353 SRV _perception._tcp.cognitive-system"
)]
pub struct Cli {
    /// Client subcommand; without one, the server runs.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Server options.
    #[command(flatten)]
    pub server: ServerArgs,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of the server itself.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Directory of the embedded store [default: $STATE_DIRECTORY, else /var/lib/membrane]
    #[arg(long, env = "MEMBRANE_DATA_DIR", value_name = "DIR", global = true)]
    pub data_dir: Option<PathBuf>,

    /// DNS address, UDP and TCP; repeat or comma-separate for several. Port 0 picks a free port.
    #[arg(long, env = "MEMBRANE_DNS_LISTEN", value_name = "ADDR", value_delimiter = ',',
          default_value = DEFAULT_DNS)]
    pub dns_listen: Vec<SocketAddr>,

    /// HTTP admin API address. A non-loopback address needs an admin token (or --insecure).
    #[arg(long, env = "MEMBRANE_HTTP_LISTEN", value_name = "ADDR", default_value = DEFAULT_HTTP)]
    pub http_listen: SocketAddr,

    /// Admin token (Authorization: Bearer TOKEN). Without one the server runs open: no checks at all.
    #[arg(
        long,
        env = "MEMBRANE_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        conflicts_with = "admin_token_file"
    )]
    pub admin_token: Option<String>,

    /// Read the admin token from this file (first line), e.g. a systemd credential.
    #[arg(long, env = "MEMBRANE_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Allow an open (tokenless) admin API on a non-loopback address.
    #[arg(long, env = "MEMBRANE_INSECURE")]
    pub insecure: bool,

    /// Serve namespace NS as the zone NS.SUFFIX. instead of NS.
    #[arg(long, env = "MEMBRANE_DOMAIN_SUFFIX", value_name = "SUFFIX")]
    pub domain_suffix: Option<String>,

    /// NS hosts of every zone, the first one also the SOA's primary; repeat or
    /// comma-separate. NAME=IP gives a host its address (repeat the host for more);
    /// without, a host in the zone gets the --ns-address ones [default: ns.dns.<zone>.]
    #[arg(
        long,
        env = "MEMBRANE_NS_HOST",
        value_name = "NAME[=IP]",
        value_delimiter = ','
    )]
    pub ns_host: Vec<String>,

    /// NSID (RFC 5001) returned to DNS queries that ask for it, e.g. the host name
    /// [default: none]
    #[arg(long, env = "MEMBRANE_NSID", value_name = "ID")]
    pub nsid: Option<String>,

    /// UDP responses per second to one source /24 (IPv4) or /56 (IPv6); 0: no limit.
    /// TCP, loopback and queries with a valid DNS cookie are never limited.
    #[arg(long, env = "MEMBRANE_DNS_RATE_LIMIT", value_name = "N",
          default_value_t = crate::dns::DEFAULT_RATE)]
    pub dns_rate_limit: u32,

    /// Of the UDP responses over the rate limit, send every Nth truncated (TC=1, so real
    /// clients retry over TCP) and drop the rest; 0: drop them all.
    #[arg(long, env = "MEMBRANE_DNS_RATE_LIMIT_SLIP", value_name = "N",
          default_value_t = crate::dns::DEFAULT_SLIP)]
    pub dns_rate_limit_slip: u32,

    /// Address(es) served for the NS host [default: the specific --dns-listen addresses]
    #[arg(
        long,
        env = "MEMBRANE_NS_ADDRESS",
        value_name = "IP",
        value_delimiter = ','
    )]
    pub ns_address: Vec<std::net::IpAddr>,

    /// TSIG key for zone transfers and NOTIFY, NAME:ALGORITHM:BASE64SECRET (hmac-sha256 or
    /// hmac-sha512); repeatable. Prefer --tsig-key-file: arguments are visible in `ps`.
    #[arg(
        long,
        env = "MEMBRANE_TSIG_KEY",
        value_name = "NAME:ALG:SECRET",
        value_delimiter = ','
    )]
    pub tsig_key: Vec<String>,

    /// File of TSIG keys, one NAME:ALGORITHM:BASE64SECRET per line (# comments).
    #[arg(long, env = "MEMBRANE_TSIG_KEY_FILE", value_name = "PATH")]
    pub tsig_key_file: Option<PathBuf>,

    /// Address or network allowed to transfer zones (AXFR/IXFR) without TSIG, e.g.
    /// 192.0.2.7 or 10.0.0.0/8; repeatable. Default: none (transfers need a TSIG key).
    #[arg(
        long,
        env = "MEMBRANE_XFR_ALLOW",
        value_name = "IP[/PREFIX]",
        value_delimiter = ','
    )]
    pub xfr_allow: Vec<String>,

    /// Secondary sent a NOTIFY when a zone changes, IP:PORT; repeatable.
    #[arg(
        long,
        env = "MEMBRANE_NOTIFY",
        value_name = "IP:PORT",
        value_delimiter = ','
    )]
    pub notify: Vec<SocketAddr>,

    /// Registry store: `sqlite` (embedded, default) or etcd://HOST:PORT[,HOST:PORT...]
    #[arg(
        long,
        env = "MEMBRANE_STORE",
        value_name = "STORE",
        default_value = "sqlite"
    )]
    pub store: String,

    /// Key prefix of the registry in etcd (with `--store etcd://...`); replicas sharing a
    /// registry use the same prefix.
    #[arg(
        long,
        env = "MEMBRANE_ETCD_PREFIX",
        value_name = "PREFIX",
        default_value = "/membrane/"
    )]
    pub etcd_prefix: String,

    /// Log format.
    #[arg(
        long,
        env = "MEMBRANE_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    /// Largest accepted HTTP request body, in bytes (larger: 413).
    #[arg(long, env = "MEMBRANE_MAX_BODY_BYTES", value_name = "BYTES", default_value_t = crate::http::DEFAULT_MAX_BODY)]
    pub max_body_bytes: usize,

    /// How often membrane health (stale, eviction) is checked, e.g. 1s or 500ms.
    #[arg(long, env = "MEMBRANE_SWEEP_INTERVAL", value_name = "DURATION", default_value = "1s",
          value_parser = humantime::parse_duration)]
    pub sweep_interval: Duration,

    /// Self-preservation: when more than this share (0-1) of passing membranes miss their
    /// TTL within the window, blame the registry and hold stale-marking and evictions until
    /// heartbeats recover; 0 disables.
    #[arg(
        long,
        env = "MEMBRANE_SELF_PRESERVATION_THRESHOLD",
        value_name = "SHARE",
        default_value_t = 0.15
    )]
    pub self_preservation_threshold: f64,

    /// Self-preservation: fewer silent membranes than this never trigger it.
    #[arg(
        long,
        env = "MEMBRANE_SELF_PRESERVATION_MIN",
        value_name = "N",
        default_value_t = 10
    )]
    pub self_preservation_min: usize,

    /// Self-preservation: how long stale transitions count towards a mass silence.
    #[arg(long, env = "MEMBRANE_SELF_PRESERVATION_WINDOW", value_name = "DURATION",
          default_value = "10s", value_parser = humantime::parse_duration)]
    pub self_preservation_window: Duration,

    /// Self-preservation: longest hold of one namespace (or of the registry) without a
    /// break; then the silence is taken as real (stale-marking and evictions resume there)
    /// until it recovers once. 0 = no limit (as in Eureka).
    #[arg(long, env = "MEMBRANE_SELF_PRESERVATION_MAX_HOLD", value_name = "DURATION",
          default_value = "15m", value_parser = humantime::parse_duration)]
    pub self_preservation_max_hold: Duration,

    /// Most namespaces the registry holds; creating one more is answered 503
    /// `registry_full`.
    #[arg(long, env = "MEMBRANE_MAX_NAMESPACES", value_name = "N",
          default_value_t = crate::registry::DEFAULT_MAX_NAMESPACES)]
    pub max_namespaces: usize,

    /// Most membranes the registry holds, all namespaces together; registering one more is
    /// answered 503 `registry_full` (agents retry). Updates of registered ones always pass.
    #[arg(long, env = "MEMBRANE_MAX_MEMBRANES", value_name = "N",
          default_value_t = crate::registry::DEFAULT_MAX_MEMBRANES)]
    pub max_membranes: usize,

    /// Time allowed for in-flight requests at shutdown, e.g. 10s.
    #[arg(long, env = "MEMBRANE_SHUTDOWN_GRACE", value_name = "DURATION", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// HTTP connections served at once; more get 503 and are closed. Lowered at start to fit
    /// the open-file limit.
    #[arg(long, env = "MEMBRANE_HTTP_MAX_CONNECTIONS", value_name = "N",
          default_value_t = crate::http::accept::DEFAULT_MAX_CONNECTIONS)]
    pub http_max_connections: usize,

    /// Time allowed for a request's head from its first byte (and for its body once read).
    #[arg(long, env = "MEMBRANE_HTTP_HEADER_TIMEOUT", value_name = "DURATION", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub http_header_timeout: Duration,

    /// An HTTP connection without a request for this long is closed (keep-alive idle).
    #[arg(long, env = "MEMBRANE_HTTP_IDLE_TIMEOUT", value_name = "DURATION", default_value = "60s",
          value_parser = humantime::parse_duration)]
    pub http_idle_timeout: Duration,

    /// PEM certificate chain: the HTTP API is served over TLS (https) with it and
    /// --tls-key.
    #[arg(long, env = "MEMBRANE_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "MEMBRANE_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,

    /// Event stream (SSE) subscribers at once; more get 503.
    #[arg(long, env = "MEMBRANE_SSE_MAX_SUBSCRIBERS", value_name = "N",
          default_value_t = crate::http::sse::DEFAULT_MAX_SUBSCRIBERS)]
    pub sse_max_subscribers: usize,

    /// Least time between two writes of events to one event stream subscriber, in
    /// milliseconds: events published meanwhile go out together in one write, so under
    /// churn a subscriber costs one write per period instead of one per event, at the price
    /// of up to this much delay. The period grows with the number of subscribers (see
    /// --sse-max-writes).
    #[arg(
        long,
        env = "MEMBRANE_SSE_BATCH_MS",
        value_name = "MS",
        default_value_t = 50
    )]
    pub sse_batch_ms: u64,

    /// Writes of events per second, all event streams together, that the period between
    /// two writes to one subscriber is stretched to stay under: with S subscribers the
    /// period is at least S / N seconds. Each write costs the server a system call and a
    /// TCP segment (15-20 µs of CPU measured on loopback) whatever the number of events in
    /// it: this caps what fan-out costs under any churn, and delivery time grows with the
    /// fleet instead.
    #[arg(
        long,
        env = "MEMBRANE_SSE_MAX_WRITES",
        value_name = "N",
        default_value_t = 40_000
    )]
    pub sse_max_writes: u32,

    /// DNS-over-TCP connections per address; when full, the longest-idle one makes room.
    /// Lowered at start to fit the open-file limit.
    #[arg(
        long,
        env = "MEMBRANE_DNS_TCP_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = 1024
    )]
    pub dns_tcp_max_connections: usize,

    /// A DNS-over-TCP connection without a query for this long is closed (1s once three
    /// quarters full).
    #[arg(long, env = "MEMBRANE_DNS_TCP_IDLE_TIMEOUT", value_name = "DURATION", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub dns_tcp_idle_timeout: Duration,

    /// Benchmarks only: serve DNS on the main (HTTP) runtime instead of threads of its own,
    /// to measure what the own threads buy (`benches/dns_under_load.rs`).
    #[arg(long, env = "MEMBRANE_DNS_SHARED_RUNTIME", hide = true)]
    pub dns_shared_runtime: bool,
}

/// Client subcommands: they talk to a running server over HTTP.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, list or delete namespaces.
    #[command(subcommand)]
    Namespace(NamespaceCommand),
    /// Show the server's status.
    Status(ClientArgs),
    /// Show registry statistics.
    Stats(ClientArgs),
    /// Print a namespace as a zone file (zone), docker-compose (compose) or Kubernetes (k8s) manifest.
    Export {
        /// Namespace to export.
        #[arg(long, short)]
        namespace: String,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "zone")]
        format: ExportFormat,
        /// compose/k8s: image holding `dns-server` and `agent`
        /// (examples/cognitive-system/Dockerfile).
        #[arg(long, value_name = "IMAGE", default_value = crate::export::DEFAULT_IMAGE)]
        image: String,
        /// compose/k8s: image of the application containers [default: IMAGE running a
        /// `sleep infinity` placeholder]
        #[arg(long, value_name = "IMAGE")]
        app_image: Option<String>,
        /// k8s: existing ReadWriteMany PersistentVolumeClaim for the shared volume, so that
        /// shared-volume messages cross pods [default: an emptyDir per pod]
        #[arg(long, value_name = "CLAIM")]
        shared_claim: Option<String>,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// RFC 1035 master file.
    Zone,
    /// docker-compose.yml.
    Compose,
    /// Kubernetes manifests.
    K8s,
}

/// `dns-server namespace ...`.
#[derive(Debug, Subcommand)]
pub enum NamespaceCommand {
    /// Create a namespace; prints it with its join token.
    Create {
        /// Name (a DNS label).
        name: String,
        /// Free-text description.
        description: Option<String>,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List namespaces.
    List(ClientArgs),
    /// Delete a namespace (refused while it has membranes, unless --force).
    Delete {
        /// Name.
        name: String,
        /// Delete even with membranes registered.
        #[arg(long)]
        force: bool,
        /// Connection options.
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// How a client subcommand reaches the server.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Server URL (the first of a comma-separated list is used).
    #[arg(
        long,
        env = "MEMBRANE_REGISTRY_URL",
        default_value = "http://127.0.0.1:8765"
    )]
    pub url: String,
    /// Admin token to send.
    #[arg(long, env = "MEMBRANE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// A configuration problem; the binary exits 64.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Explained in the message.
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// Which store backs the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// Embedded SQLite in the data dir.
    Sqlite,
    /// etcd endpoints.
    Etcd(Vec<String>),
}

/// The validated server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Store directory.
    pub data_dir: PathBuf,
    /// DNS addresses (UDP and TCP each).
    pub dns_listen: Vec<SocketAddr>,
    /// HTTP address.
    pub http_listen: SocketAddr,
    /// Admin token; `None`: open.
    pub admin_token: Option<String>,
    /// DNS settings (zone suffix lowercase, without leading or trailing dot; NS hosts;
    /// NSID; rate limit), validated.
    pub dns: crate::dns::DnsConfig,
    /// Store.
    pub store: StoreKind,
    /// Key prefix in etcd (ends with `/`).
    pub etcd_prefix: String,
    /// Body limit.
    pub max_body_bytes: usize,
    /// Health check period.
    pub sweep_interval: Duration,
    /// Self-preservation rule of the health sweep.
    pub self_preservation: crate::registry::preserve::PreservationConfig,
    /// Caps on namespaces and membranes.
    pub limits: crate::registry::Limits,
    /// Shutdown grace.
    pub shutdown_grace: Duration,
    /// HTTP connection cap and timeouts.
    pub http_limits: crate::http::HttpLimits,
    /// TLS for the HTTP API (`--tls-cert`, `--tls-key`), checked; `None`: plain http.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// Cap on event stream subscribers.
    pub sse_max_subscribers: usize,
    /// Least time between two writes of events to one subscriber.
    pub sse_batch: Duration,
    /// Writes of events per second, all subscribers together (stretches `sse_batch`).
    pub sse_max_writes: u32,
    /// DNS-over-TCP connection cap and idle timeouts.
    pub dns_tcp: crate::dns::TcpLimits,
    /// Zone transfers: TSIG keys, allow-list, NOTIFY targets.
    pub transfer: crate::dns::TransferConfig,
    /// DNS on the main runtime instead of its own threads (a benchmark switch).
    pub dns_shared_runtime: bool,
}

/// Shortest accepted admin token.
pub const MIN_TOKEN_LEN: usize = 16;

fn default_data_dir() -> PathBuf {
    // systemd's StateDirectory= may list several, colon-separated.
    std::env::var("STATE_DIRECTORY")
        .ok()
        .and_then(|s| s.split(':').next().map(PathBuf::from))
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("/var/lib/membrane"))
}

/// Validates a domain suffix (`svc.example`, dots allowed, each label a DNS label).
pub fn parse_suffix(s: &str) -> Result<String, ConfigError> {
    let t = s.trim_matches('.');
    if t.is_empty() {
        return Err(invalid("--domain-suffix must not be empty"));
    }
    let mut out = Vec::new();
    for label in t.split('.') {
        out.push(
            shared::name::validate_label("domain suffix label", label)
                .map_err(|e| invalid(format!("--domain-suffix {s:?}: {e}")))?,
        );
    }
    if t.len() > 200 {
        return Err(invalid(
            "--domain-suffix is too long (200 characters at most)",
        ));
    }
    Ok(out.join("."))
}

impl TryFrom<ServerArgs> for Config {
    type Error = ConfigError;

    fn try_from(a: ServerArgs) -> Result<Self, ConfigError> {
        let admin_token = match (&a.admin_token, &a.admin_token_file) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(f)) => {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| invalid(format!("--admin-token-file {}: {e}", f.display())))?;
                Some(text.lines().next().unwrap_or("").trim().to_string())
            }
            (None, None) => None,
        };
        if let Some(t) = &admin_token {
            if t.len() < MIN_TOKEN_LEN {
                return Err(invalid(format!(
                    "the admin token must be at least {MIN_TOKEN_LEN} characters \
                     (try: head -c 32 /dev/urandom | base64)"
                )));
            }
            if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(
                    "the admin token must not contain spaces or control characters",
                ));
            }
        }
        if admin_token.is_none() && !a.http_listen.ip().is_loopback() && !a.insecure {
            return Err(invalid(format!(
                "refusing to serve the admin API on {} without an admin token: anyone on the \
                 network could change the registry. Set --admin-token (or MEMBRANE_ADMIN_TOKEN), \
                 or pass --insecure on a closed network",
                a.http_listen
            )));
        }
        if a.dns_listen.is_empty() {
            return Err(invalid("--dns-listen needs at least one address"));
        }
        let store = match a.store.trim() {
            "sqlite" | "" => StoreKind::Sqlite,
            s if s.starts_with("etcd://") => {
                let eps: Vec<String> = s["etcd://".len()..]
                    .split(',')
                    .map(|e| e.trim().to_string())
                    .collect();
                for e in &eps {
                    let ok = e
                        .rsplit_once(':')
                        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
                    if !ok {
                        return Err(invalid(format!(
                            "--store {s:?}: endpoint {e:?} must be HOST:PORT"
                        )));
                    }
                }
                StoreKind::Etcd(eps)
            }
            s => {
                return Err(invalid(format!(
                    "--store {s:?} is not known: use sqlite or etcd://HOST:PORT[,HOST:PORT...]"
                )));
            }
        };
        let mut etcd_prefix = a.etcd_prefix.trim().to_string();
        if !etcd_prefix.starts_with('/') || etcd_prefix.contains(char::is_whitespace) {
            return Err(invalid(format!(
                "--etcd-prefix {etcd_prefix:?} must start with / and contain no spaces"
            )));
        }
        if !etcd_prefix.ends_with('/') {
            etcd_prefix.push('/');
        }
        if a.max_body_bytes < 1024 {
            return Err(invalid("--max-body-bytes must be at least 1024"));
        }
        if a.sweep_interval < Duration::from_millis(10)
            || a.sweep_interval > Duration::from_secs(60)
        {
            return Err(invalid("--sweep-interval must be between 10ms and 60s"));
        }
        if !(0.0..=1.0).contains(&a.self_preservation_threshold) {
            return Err(invalid(
                "--self-preservation-threshold must be a share between 0 (off) and 1",
            ));
        }
        if a.self_preservation_min < 1 {
            return Err(invalid("--self-preservation-min must be at least 1"));
        }
        if a.self_preservation_window < Duration::from_secs(1)
            || a.self_preservation_window > Duration::from_secs(3600)
        {
            return Err(invalid(
                "--self-preservation-window must be between 1s and 1h",
            ));
        }
        if !a.self_preservation_max_hold.is_zero()
            && a.self_preservation_max_hold < a.self_preservation_window
        {
            return Err(invalid(
                "--self-preservation-max-hold must be 0 (no limit) or at least \
                 --self-preservation-window",
            ));
        }
        if a.sse_batch_ms > 10_000 {
            return Err(invalid("--sse-batch-ms must be at most 10000 (10 s)"));
        }
        if a.sse_max_writes < 100 {
            return Err(invalid("--sse-max-writes must be at least 100"));
        }
        for (flag, n) in [
            ("--http-max-connections", a.http_max_connections),
            ("--sse-max-subscribers", a.sse_max_subscribers),
            ("--dns-tcp-max-connections", a.dns_tcp_max_connections),
        ] {
            if !(1..=1_000_000).contains(&n) {
                return Err(invalid(format!("{flag} must be between 1 and 1000000")));
            }
        }
        for (flag, n) in [
            ("--max-namespaces", a.max_namespaces),
            ("--max-membranes", a.max_membranes),
        ] {
            if !(1..=10_000_000).contains(&n) {
                return Err(invalid(format!("{flag} must be between 1 and 10000000")));
            }
        }
        for (flag, d) in [
            ("--http-header-timeout", a.http_header_timeout),
            ("--http-idle-timeout", a.http_idle_timeout),
            ("--dns-tcp-idle-timeout", a.dns_tcp_idle_timeout),
        ] {
            if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
                return Err(invalid(format!("{flag} must be between 100ms and 1h")));
            }
        }
        let dns_tcp = crate::dns::TcpLimits {
            max_connections: a.dns_tcp_max_connections,
            idle_timeout: a.dns_tcp_idle_timeout,
            ..crate::dns::TcpLimits::default()
        };
        let dns_tcp = crate::dns::TcpLimits {
            pressure_idle_timeout: dns_tcp.pressure_idle_timeout.min(dns_tcp.idle_timeout),
            ..dns_tcp
        };
        let ns_addresses = if a.ns_address.is_empty() {
            let mut v: Vec<_> = a
                .dns_listen
                .iter()
                .map(|s| s.ip())
                .filter(|ip| !ip.is_unspecified())
                .collect();
            v.dedup();
            v
        } else {
            a.ns_address.clone()
        };
        let mut ns_hosts = Vec::new();
        for h in &a.ns_host {
            let (name, addr) = match h.split_once('=') {
                Some((n, ip)) => {
                    let ip: std::net::IpAddr = ip.trim().parse().map_err(|_| {
                        invalid(format!("--ns-host {h:?}: {ip:?} is not an IP address"))
                    })?;
                    (n.trim(), Some(ip))
                }
                None => (h.trim(), None),
            };
            ns_hosts.push(crate::dns::NsHost {
                name: name.to_string(),
                addresses: addr.into_iter().collect(),
            });
        }
        let dns = crate::dns::DnsConfig {
            domain_suffix: a.domain_suffix.as_deref().map(parse_suffix).transpose()?,
            ns_hosts,
            ns_addresses,
            nsid: a.nsid.clone(),
            rate_limit: crate::dns::RateLimit {
                responses_per_second: a.dns_rate_limit,
                slip: a.dns_rate_limit_slip,
            },
        };
        dns.validate()
            .map_err(|e| invalid(format!("DNS settings: {e}")))?;
        let mut keys = Vec::new();
        let mut key_lines: Vec<(String, String)> = a
            .tsig_key
            .iter()
            .map(|k| ("--tsig-key".to_string(), k.clone()))
            .collect();
        if let Some(path) = &a.tsig_key_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid(format!("--tsig-key-file {}: {e}", path.display())))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if !line.is_empty() && !line.starts_with('#') {
                    key_lines.push((format!("{}:{}", path.display(), n + 1), line.to_string()));
                }
            }
        }
        for (origin, k) in key_lines {
            let key: crate::dns::TsigKey =
                k.parse().map_err(|e| invalid(format!("{origin}: {e}")))?;
            if keys
                .iter()
                .any(|x: &crate::dns::TsigKey| x.label.eq_ignore_ascii_case(&key.label))
            {
                return Err(invalid(format!(
                    "{origin}: TSIG key {:?} is defined twice",
                    key.label
                )));
            }
            keys.push(key);
        }
        let allow = a
            .xfr_allow
            .iter()
            .map(|s| s.parse().map_err(|e| invalid(format!("--xfr-allow: {e}"))))
            .collect::<Result<Vec<crate::dns::AllowNet>, _>>()?;
        if let Some(bad) = a
            .notify
            .iter()
            .find(|n| n.port() == 0 || n.ip().is_unspecified())
        {
            return Err(invalid(format!(
                "--notify {bad}: needs a specific address and a port"
            )));
        }
        if !a.notify.is_empty() && keys.is_empty() && allow.is_empty() {
            // Zone transfers are off: a secondary could not fetch what it is told of.
            return Err(invalid(
                "--notify needs --tsig-key (or --tsig-key-file) or --xfr-allow: secondaries \
                 must be able to transfer the zones they are notified of",
            ));
        }
        let tls = match (&a.tls_cert, &a.tls_key) {
            (Some(c), Some(k)) => Some(crate::http::tls::server_config(c, k).map_err(invalid)?),
            (None, None) => None,
            _ => return Err(invalid("--tls-cert and --tls-key go together")),
        };
        let transfer = crate::dns::TransferConfig {
            keys,
            allow,
            notify: a.notify.clone(),
        };
        Ok(Config {
            transfer,
            dns_shared_runtime: a.dns_shared_runtime,
            dns,
            data_dir: a.data_dir.unwrap_or_else(default_data_dir),
            dns_listen: a.dns_listen,
            http_listen: a.http_listen,
            admin_token,
            store,
            etcd_prefix,
            max_body_bytes: a.max_body_bytes,
            sweep_interval: a.sweep_interval,
            self_preservation: crate::registry::preserve::PreservationConfig {
                threshold: a.self_preservation_threshold,
                min_silent: a.self_preservation_min,
                window: a.self_preservation_window,
                max_hold: a.self_preservation_max_hold,
            },
            limits: crate::registry::Limits {
                namespaces: a.max_namespaces,
                membranes: a.max_membranes,
            },
            shutdown_grace: a.shutdown_grace,
            http_limits: crate::http::HttpLimits {
                max_connections: a.http_max_connections,
                header_timeout: a.http_header_timeout,
                idle_timeout: a.http_idle_timeout,
            },
            sse_max_subscribers: a.sse_max_subscribers,
            sse_batch: Duration::from_millis(a.sse_batch_ms),
            sse_max_writes: a.sse_max_writes,
            dns_tcp,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> ServerArgs {
        let mut v = vec!["dns-server"];
        v.extend_from_slice(extra);
        Cli::try_parse_from(v).unwrap().server
    }

    fn err(extra: &[&str]) -> String {
        Config::try_from(args(extra)).unwrap_err().to_string()
    }

    #[test]
    fn defaults() {
        let c = Config::try_from(args(&["--data-dir", "/tmp/x"])).unwrap();
        assert_eq!(c.http_listen.to_string(), DEFAULT_HTTP);
        assert_eq!(c.dns_listen[0].to_string(), DEFAULT_DNS);
        assert_eq!(c.store, StoreKind::Sqlite);
        assert!(c.admin_token.is_none());
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn connection_limits() {
        let c = Config::try_from(args(&["--data-dir", "/tmp/x"])).unwrap();
        assert_eq!(c.http_limits, crate::http::HttpLimits::default());
        assert_eq!(c.dns_tcp, crate::dns::TcpLimits::default());
        let c = Config::try_from(args(&[
            "--http-max-connections=10",
            "--http-header-timeout=2s",
            "--http-idle-timeout=5s",
            "--sse-max-subscribers=3",
            "--sse-batch-ms=250",
            "--sse-max-writes=5000",
            "--dns-tcp-max-connections=7",
            "--dns-tcp-idle-timeout=500ms",
        ]))
        .unwrap();
        assert_eq!(c.http_limits.max_connections, 10);
        assert_eq!(c.http_limits.header_timeout, Duration::from_secs(2));
        assert_eq!(c.http_limits.idle_timeout, Duration::from_secs(5));
        assert_eq!(c.sse_max_subscribers, 3);
        assert_eq!(c.sse_batch, Duration::from_millis(250));
        assert_eq!(c.sse_max_writes, 5000);
        assert!(err(&["--sse-max-writes=99"]).contains("--sse-max-writes"));
        assert_eq!(c.dns_tcp.max_connections, 7);
        assert_eq!(c.dns_tcp.pressure_idle_timeout, Duration::from_millis(500));
        assert!(err(&["--http-max-connections=0"]).contains("--http-max-connections"));
        assert!(err(&["--http-idle-timeout=1ms"]).contains("--http-idle-timeout"));
        assert!(err(&["--sse-max-subscribers=0"]).contains("--sse-max-subscribers"));
        assert!(err(&["--sse-batch-ms=10001"]).contains("--sse-batch-ms"));
        assert!(Cli::try_parse_from(["dns-server", "--sse-batch-ms=-1"]).is_err());
    }

    #[test]
    fn registry_limits() {
        let c = Config::try_from(args(&["--data-dir", "/tmp/x"])).unwrap();
        assert_eq!(c.limits, crate::registry::Limits::default());
        let c = Config::try_from(args(&["--max-namespaces=3", "--max-membranes=40"])).unwrap();
        assert_eq!(
            c.limits,
            crate::registry::Limits {
                namespaces: 3,
                membranes: 40
            }
        );
        assert!(err(&["--max-namespaces=0"]).contains("--max-namespaces"));
        assert!(err(&["--max-membranes=0"]).contains("--max-membranes"));
        assert!(err(&["--max-membranes=10000001"]).contains("--max-membranes"));
    }

    #[test]
    fn self_preservation_settings() {
        let c = Config::try_from(args(&["--data-dir", "/tmp/x"])).unwrap();
        assert_eq!(
            c.self_preservation,
            crate::registry::preserve::PreservationConfig::default()
        );
        let c = Config::try_from(args(&[
            "--self-preservation-threshold=0.5",
            "--self-preservation-min=3",
            "--self-preservation-window=30s",
        ]))
        .unwrap();
        assert_eq!(c.self_preservation.threshold, 0.5);
        assert_eq!(c.self_preservation.min_silent, 3);
        assert_eq!(c.self_preservation.window, Duration::from_secs(30));
        assert!(err(&["--self-preservation-threshold=1.5"]).contains("threshold"));
        assert!(err(&["--self-preservation-threshold=-0.1"]).contains("threshold"));
        assert!(err(&["--self-preservation-min=0"]).contains("--self-preservation-min"));
        assert!(err(&["--self-preservation-window=0s"]).contains("--self-preservation-window"));
        let c = Config::try_from(args(&["--self-preservation-max-hold=0"])).unwrap();
        assert_eq!(c.self_preservation.max_hold, Duration::ZERO);
        let c = Config::try_from(args(&["--self-preservation-max-hold=1h"])).unwrap();
        assert_eq!(c.self_preservation.max_hold, Duration::from_secs(3600));
        assert!(err(&["--self-preservation-max-hold=5s"]).contains("max-hold"));
    }

    #[test]
    fn open_api_refused_off_loopback() {
        let e = err(&["--http-listen", "0.0.0.0:8765"]);
        assert!(e.contains("without an admin token"), "{e}");
        assert!(Config::try_from(args(&["--http-listen", "0.0.0.0:8765", "--insecure"])).is_ok());
        assert!(
            Config::try_from(args(&[
                "--http-listen",
                "0.0.0.0:8765",
                "--admin-token",
                "0123456789abcdef0123"
            ]))
            .is_ok()
        );
    }

    #[test]
    fn transfer_flags() {
        const K: &str = "xfr:hmac-sha256:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let c = Config::try_from(args(&[])).unwrap();
        assert!(c.transfer.keys.is_empty() && c.transfer.allow.is_empty());
        assert!(c.transfer.notify.is_empty());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("keys");
        let k2 = K.replacen("xfr", "other", 1);
        std::fs::write(&f, format!("# keys\n\n{k2}\n")).unwrap();
        let c = Config::try_from(args(&[
            "--tsig-key",
            K,
            "--tsig-key-file",
            f.to_str().unwrap(),
            "--xfr-allow",
            "10.0.0.0/8,::1",
            "--notify",
            "127.0.0.1:5300",
        ]))
        .unwrap();
        assert_eq!(c.transfer.keys.len(), 2);
        assert_eq!(c.transfer.allow.len(), 2);
        assert_eq!(c.transfer.notify.len(), 1);
        // The secret never shows in logs of the config.
        assert!(!format!("{c:?}").contains("AAECAwQF"));
        let e = err(&["--tsig-key", K, "--tsig-key", K]);
        assert!(e.contains("defined twice"), "{e}");
        let e = err(&[
            "--tsig-key",
            "xfr:hmac-md5:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        ]);
        assert!(e.contains("hmac-sha256"), "{e}");
        std::fs::write(&f, "broken line\n").unwrap();
        let e = err(&["--tsig-key-file", f.to_str().unwrap()]);
        assert!(e.contains(":1:"), "{e}");
        assert!(err(&["--xfr-allow", "10.0.0.0/40"]).contains("prefix"));
        assert!(err(&["--notify", "0.0.0.0:53"]).contains("--notify"));
        assert!(err(&["--notify", "127.0.0.1:0"]).contains("--notify"));
        let e = err(&["--notify", "127.0.0.1:5300"]);
        assert!(e.contains("--tsig-key") && e.contains("--xfr-allow"), "{e}");
        let c = Config::try_from(args(&["--notify", "127.0.0.1:5300", "--xfr-allow", "::1"]));
        assert_eq!(c.unwrap().transfer.notify.len(), 1);
    }

    #[test]
    fn token_rules_and_file() {
        assert!(err(&["--admin-token", "short"]).contains("at least"));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tok");
        std::fs::write(&f, "0123456789abcdef-token\n").unwrap();
        let c = Config::try_from(args(&["--admin-token-file", f.to_str().unwrap()])).unwrap();
        assert_eq!(c.admin_token.as_deref(), Some("0123456789abcdef-token"));
        let e = err(&["--admin-token-file", "/nonexistent/tok"]);
        assert!(e.contains("/nonexistent/tok"), "{e}");
        assert!(
            Cli::try_parse_from([
                "dns-server",
                "--admin-token",
                "a",
                "--admin-token-file",
                "b"
            ])
            .is_err()
        );
    }

    #[test]
    fn store_and_suffix() {
        let c = Config::try_from(args(&["--store", "etcd://127.0.0.1:2379,h2:2380"])).unwrap();
        assert_eq!(
            c.store,
            StoreKind::Etcd(vec!["127.0.0.1:2379".into(), "h2:2380".into()])
        );
        assert!(err(&["--store", "etcd://nohost"]).contains("HOST:PORT"));
        assert!(err(&["--store", "redis"]).contains("not known"));
        let c = Config::try_from(args(&["--domain-suffix", "Svc.Example."])).unwrap();
        assert_eq!(c.dns.domain_suffix.as_deref(), Some("svc.example"));
        assert!(err(&["--domain-suffix", "bad_label.x"]).contains("domain-suffix"));
    }

    #[test]
    fn several_dns_addresses() {
        let c = Config::try_from(args(&["--dns-listen", "127.0.0.1:0,[::1]:0"])).unwrap();
        assert_eq!(c.dns_listen.len(), 2);
        assert!(Cli::try_parse_from(["dns-server", "--dns-listen", "nope"]).is_err());
    }

    #[test]
    fn dns_flags() {
        let c = Config::try_from(args(&[
            "--dns-listen",
            "192.0.2.9:53",
            "--ns-host",
            "ns1.example.=192.0.2.1,ns1.example.=2001:db8::1,ns2.example",
            "--nsid",
            "dns-a",
            "--dns-rate-limit",
            "50",
            "--dns-rate-limit-slip",
            "3",
        ]))
        .unwrap();
        let hosts: Vec<_> = c
            .dns
            .ns_hosts
            .iter()
            .map(|h| (h.name.as_str(), h.addresses.len()))
            .collect();
        assert_eq!(
            hosts,
            [("ns1.example.", 1), ("ns1.example.", 1), ("ns2.example", 0)]
        );
        assert_eq!(
            c.dns.ns_addresses,
            ["192.0.2.9".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(c.dns.nsid.as_deref(), Some("dns-a"));
        assert_eq!(c.dns.rate_limit.responses_per_second, 50);
        assert_eq!(c.dns.rate_limit.slip, 3);
        let d = Config::try_from(args(&[])).unwrap();
        assert_eq!(d.dns.rate_limit, crate::dns::RateLimit::default());
        assert!(d.dns.nsid.is_none());
        assert!(err(&["--ns-host", "ns1.example=300.1.1.1"]).contains("not an IP"));
        assert!(err(&["--ns-host", "bad host"]).contains("NS host"));
        assert!(err(&["--nsid", ""]).contains("NSID"));
        assert!(err(&["--nsid", &"x".repeat(129)]).contains("NSID"));
    }

    #[test]
    fn subcommands_parse() {
        let cli = Cli::try_parse_from(["dns-server", "namespace", "create", "ns", "desc"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Namespace(NamespaceCommand::Create { .. }))
        ));
        let cli = Cli::try_parse_from([
            "dns-server",
            "export",
            "--namespace",
            "a",
            "--format",
            "zone",
        ])
        .unwrap();
        assert!(matches!(cli.command, Some(Command::Export { .. })));
        let cli = Cli::try_parse_from([
            "dns-server",
            "export",
            "--namespace",
            "a",
            "--format",
            "k8s",
            "--image",
            "reg.example/membrane:1.0",
        ])
        .unwrap();
        let Some(Command::Export {
            format,
            image,
            app_image,
            shared_claim,
            ..
        }) = cli.command
        else {
            panic!("not export")
        };
        assert_eq!(format, ExportFormat::K8s);
        assert_eq!(image, "reg.example/membrane:1.0");
        assert_eq!((app_image, shared_claim), (None, None));
        assert!(Cli::try_parse_from(["dns-server", "export", "-n", "a", "-f", "helm"]).is_err());
    }
}
