//! Validated configuration: every command-line value checked once, with an error naming the
//! flag (and its environment variable) at fault. All of these are exit code 64.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use shared::model::{Endpoint, Registration, ServiceSpec, limits};
use shared::name::{MembraneId, NamespaceName, ServiceName, Tag};

use crate::cli::{DiscoverArgs, ListArgs, LocalArgs, Mode, QueryArgs, RegisterArgs, RunArgs};
use crate::lifecycle::LifecycleConfig;
use crate::url::RegistryUrl;

/// A configuration error: exit code 64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A required flag is missing.
    #[error("missing {flag} (or the environment variable {env})")]
    Missing {
        /// The flag.
        flag: &'static str,
        /// Its environment variable.
        env: &'static str,
    },
    /// A flag's value is invalid.
    #[error("{flag}: {message}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn invalid(flag: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        message: message.into(),
    }
}

/// The validated configuration of `agent run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Membrane id.
    pub id: MembraneId,
    /// Namespace.
    pub namespace: NamespaceName,
    /// Registry URLs, in failover order.
    pub registry_urls: Vec<RegistryUrl>,
    /// Bearer token.
    pub token: Option<String>,
    /// TLS for https registry URLs.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// The registration sent (addresses may be empty: route address).
    pub registration: Registration,
    /// tcp mode on an unspecified address: advertise the route address with this port.
    pub tcp_port_on_route: Option<u16>,
    /// Heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Largest retry delay.
    pub max_backoff: Duration,
    /// Deregistration grace time.
    pub shutdown_grace: Duration,
    /// State directory.
    pub state_dir: PathBuf,
    /// Message relay settings.
    pub relay: RelaySettings,
    /// `--replace`: take over a registration held by another instance (first time only).
    pub replace: bool,
}

/// Message relay settings of `agent run`.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Largest body sent or accepted.
    pub max_body: usize,
    /// How long the outbox retries.
    pub message_ttl: Duration,
    /// Longest delay between delivery retries.
    pub retry_max_backoff: Duration,
    /// What `agent recv` does after printing.
    pub after_recv: crate::relay::AfterRecv,
}

/// Parses a byte size: `1048576`, `64K`, `64KiB`, `1M`, `1MiB` (K and M are binary).
pub fn parse_size(flag: &'static str, s: &str) -> Result<usize, ConfigError> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("MiB").or_else(|| t.strip_suffix('M')) {
        (n, 1024 * 1024)
    } else if let Some(n) = t.strip_suffix("KiB").or_else(|| t.strip_suffix('K')) {
        (n, 1024)
    } else {
        (t.strip_suffix('B').unwrap_or(t), 1)
    };
    let n: usize = num.trim().parse().map_err(|_| {
        invalid(
            flag,
            format!("{s:?} is not a size like 1048576, 64KiB or 1MiB"),
        )
    })?;
    let v = n.saturating_mul(mult);
    if v == 0 || v > crate::relay::MAX_BODY_LIMIT {
        return Err(invalid(flag, format!("{s:?} must be from 1 byte to 16MiB")));
    }
    Ok(v)
}

impl RunConfig {
    /// The lifecycle's part of the configuration.
    pub fn lifecycle(&self) -> LifecycleConfig {
        LifecycleConfig {
            namespace: self.namespace.clone(),
            id: self.id.clone(),
            registration: self.registration.clone(),
            tcp_port_on_route: self.tcp_port_on_route,
            heartbeat_interval: self.heartbeat_interval,
            jitter: 0.1,
            min_backoff: Duration::from_secs(1).min(self.heartbeat_interval),
            max_backoff: self.max_backoff,
            shutdown_grace: self.shutdown_grace,
            state_dir: Some(self.state_dir.clone()),
            replace: self.replace,
        }
    }
}

fn required<'a>(
    v: &'a Option<String>,
    flag: &'static str,
    env: &'static str,
) -> Result<&'a str, ConfigError> {
    match v.as_deref().map(str::trim) {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(ConfigError::Missing { flag, env }),
    }
}

fn duration(flag: &'static str, s: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        invalid(
            flag,
            format!("{s:?} is not a duration like 10s or 1m ({e})"),
        )
    })?;
    if d.is_zero() {
        return Err(invalid(flag, "must be more than zero"));
    }
    Ok(d)
}

fn urls(v: &[String]) -> Result<Vec<RegistryUrl>, ConfigError> {
    v.iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|e| invalid("--registry-url", e)))
        .collect()
}

/// The TLS settings for the registry: a rustls client trusting the CAs of `ca` when a URL is
/// https (required then); refuses a token over plain http to a host off loopback unless
/// `insecure`.
pub fn registry_tls(
    urls: &[RegistryUrl],
    token: Option<&str>,
    ca: Option<&Path>,
    insecure: bool,
) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>, ConfigError> {
    if token.is_some()
        && !insecure
        && let Some(u) = urls.iter().find(|u| !u.tls && !u.is_loopback())
    {
        return Err(invalid(
            "--registry-url",
            format!(
                "{u} would carry the token in clear to another host: use https:// with \
                 --registry-ca (MEMBRANE_REGISTRY_CA), or --insecure (MEMBRANE_INSECURE) on a \
                 trusted network"
            ),
        ));
    }
    if !urls.iter().any(|u| u.tls) {
        return Ok(None);
    }
    let ca = ca.ok_or_else(|| {
        invalid(
            "--registry-ca",
            "an https:// registry URL needs the CA certificate(s) to verify it (PEM file; \
             no system roots are loaded)",
        )
    })?;
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<rustls_pki_types::CertificateDer<'static>> =
        rustls_pki_types::CertificateDer::pem_file_iter(ca)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| invalid("--registry-ca", format!("{}: {e}", ca.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .map_err(|e| invalid("--registry-ca", format!("{}: {e}", ca.display())))?;
    }
    if roots.is_empty() {
        return Err(invalid(
            "--registry-ca",
            format!("{}: no PEM certificate in it", ca.display()),
        ));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("--registry-ca", e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(std::sync::Arc::new(cfg)))
}

fn token(v: &Option<String>) -> Result<Option<String>, ConfigError> {
    match v.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(t) if t.chars().any(|c| c.is_whitespace() || c.is_control()) || !t.is_ascii() => {
            Err(invalid("--token", "must be printable ASCII without spaces"))
        }
        Some(t) => Ok(Some(t.to_string())),
    }
}

fn non_empty(v: &[String]) -> impl Iterator<Item = &str> {
    v.iter().map(|s| s.trim()).filter(|s| !s.is_empty())
}

/// Where the state directory is when `--state-dir` is not given: `$STATE_DIRECTORY` (the
/// first of its colon-separated paths), else `/var/lib/membrane/agent/<id>` when `writable`
/// says so, else `$XDG_RUNTIME_DIR/membrane/<id>`.
pub fn default_state_dir(
    id: Option<&MembraneId>,
    env: impl Fn(&str) -> Option<OsString>,
    writable: impl Fn(&Path) -> bool,
) -> Result<PathBuf, ConfigError> {
    if let Some(sd) = env("STATE_DIRECTORY").filter(|s| !s.is_empty()) {
        let first = sd
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string();
        return Ok(PathBuf::from(first));
    }
    let id = id.ok_or_else(|| {
        invalid(
            "--state-dir",
            "not given, and no --id (MEMBRANE_ID) to derive the default from",
        )
    })?;
    let system = Path::new("/var/lib/membrane/agent").join(id.as_str());
    if writable(&system) {
        return Ok(system);
    }
    if let Some(xdg) = env("XDG_RUNTIME_DIR").filter(|s| !s.is_empty()) {
        return Ok(PathBuf::from(xdg).join("membrane").join(id.as_str()));
    }
    Err(invalid(
        "--state-dir",
        format!(
            "not given; {} is not writable and XDG_RUNTIME_DIR is not set",
            system.display()
        ),
    ))
}

/// Whether `dir` exists (or can be created) and is writable by this process.
pub fn dir_writable(dir: &Path) -> bool {
    if crate::state::prepare_dir(dir).is_err() {
        return false;
    }
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok()
}

fn state_dir(explicit: &Option<PathBuf>, id: Option<&MembraneId>) -> Result<PathBuf, ConfigError> {
    match explicit {
        Some(p) if !p.as_os_str().is_empty() => Ok(p.clone()),
        _ => default_state_dir(id, |k| std::env::var_os(k), dir_writable),
    }
}

/// Maps a registration field to the flag that sets it.
fn flag_of(field: &str) -> &'static str {
    let head = field.split(['.', '[']).next().unwrap_or(field);
    match head {
        "addresses" => "--address",
        "services" => "--service",
        "capabilities" => "--capability",
        "tags" => "--tag",
        "metadata" => "--meta",
        "endpoint" => "--shared-dir/--listen",
        "ttl_seconds" => "--ttl",
        "parent" => "--parent",
        _ => "registration",
    }
}

impl TryFrom<RunArgs> for RunConfig {
    type Error = ConfigError;

    fn try_from(a: RunArgs) -> Result<Self, ConfigError> {
        let id = MembraneId::new(required(&a.id, "--id", "MEMBRANE_ID")?)
            .map_err(|e| invalid("--id", e.to_string()))?;
        let namespace =
            NamespaceName::new(required(&a.namespace, "--namespace", "MEMBRANE_NAMESPACE")?)
                .map_err(|e| invalid("--namespace", e.to_string()))?;
        let parent = match a.parent.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(p) => Some(MembraneId::new(p).map_err(|e| invalid("--parent", e.to_string()))?),
        };
        if parent.as_ref() == Some(&id) {
            return Err(invalid("--parent", "a membrane cannot be its own parent"));
        }
        let registry_urls = urls(&a.registry_urls)?;
        if registry_urls.is_empty() {
            return Err(ConfigError::Missing {
                flag: "--registry-url",
                env: "MEMBRANE_REGISTRY_URL",
            });
        }
        let services = non_empty(&a.services)
            .map(|s| {
                s.parse::<ServiceSpec>()
                    .map_err(|e| invalid("--service", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let addresses = non_empty(&a.addresses)
            .map(|s| {
                s.parse::<IpAddr>().map_err(|_| {
                    invalid("--address", format!("{s:?} is not an IPv4 or IPv6 address"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let capabilities = non_empty(&a.capabilities)
            .map(|s| Tag::new(s).map_err(|e| invalid("--capability", e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let tags = non_empty(&a.tags)
            .map(|s| Tag::new(s).map_err(|e| invalid("--tag", e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let mut metadata = BTreeMap::new();
        for m in &a.metadata {
            let (k, v) = m
                .split_once('=')
                .ok_or_else(|| invalid("--meta", format!("{m:?} must be KEY=VALUE")))?;
            metadata.insert(k.trim().to_string(), v.to_string());
        }
        let heartbeat_interval = duration("--heartbeat-interval", &a.heartbeat_interval)?;
        let ttl = duration("--ttl", &a.ttl)?;
        let ttl_secs = ttl.as_secs();
        if ttl.subsec_nanos() != 0
            || !limits::TTL_RANGE.contains(&(ttl_secs.min(u32::MAX as u64) as u32))
        {
            return Err(invalid(
                "--ttl",
                format!("{:?} must be whole seconds from 1s to 1d", a.ttl),
            ));
        }
        if heartbeat_interval >= ttl {
            return Err(invalid(
                "--heartbeat-interval",
                format!(
                    "{} must be shorter than --ttl {} or the membrane goes stale between heartbeats",
                    a.heartbeat_interval, a.ttl
                ),
            ));
        }
        let max_backoff = duration("--max-backoff", &a.max_backoff)?;
        let shutdown_grace = duration("--shutdown-grace", &a.shutdown_grace)?;
        let token = token(&a.token)?;
        let tls = registry_tls(
            &registry_urls,
            token.as_deref(),
            a.registry_ca.as_deref(),
            a.insecure,
        )?;
        let state_dir = state_dir(&a.state_dir, Some(&id))?;
        if !state_dir.is_absolute() {
            return Err(invalid(
                "--state-dir",
                format!("{} must be an absolute path", state_dir.display()),
            ));
        }

        let mut tcp_port_on_route = None;
        let endpoint = match a.mode {
            Mode::SharedVolume => {
                let shared = a
                    .shared_dir
                    .clone()
                    .unwrap_or_else(|| state_dir.join("shared"));
                if !shared.is_absolute() {
                    return Err(invalid(
                        "--shared-dir",
                        format!("{} must be an absolute path", shared.display()),
                    ));
                }
                Endpoint::SharedVolume {
                    path: shared.to_string_lossy().into_owned(),
                }
            }
            Mode::Ipc => {
                let path = match a.listen.as_deref().map(str::trim) {
                    None | Some("") => state_dir.join("messages.sock"),
                    Some(p) => PathBuf::from(p),
                };
                if !path.is_absolute() {
                    return Err(invalid(
                        "--listen",
                        format!(
                            "{} must be an absolute socket path in ipc mode",
                            path.display()
                        ),
                    ));
                }
                Endpoint::Ipc {
                    path: path.to_string_lossy().into_owned(),
                }
            }
            Mode::Tcp => {
                let l = match a.listen.as_deref().map(str::trim) {
                    None | Some("") => {
                        return Err(invalid("--listen", "tcp mode needs --listen HOST:PORT"));
                    }
                    Some(l) => l,
                };
                match l.parse::<SocketAddr>() {
                    Ok(sa) if sa.port() == 0 => {
                        return Err(invalid("--listen", "the port must be 1-65535"));
                    }
                    Ok(sa) if sa.ip().is_unspecified() => {
                        tcp_port_on_route = Some(sa.port());
                        Endpoint::Tcp {
                            address: l.to_string(),
                        }
                    }
                    Ok(_) => Endpoint::Tcp {
                        address: l.to_string(),
                    },
                    Err(_) => match l.rsplit_once(':') {
                        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) => {
                            Endpoint::Tcp {
                                address: l.to_string(),
                            }
                        }
                        _ => {
                            return Err(invalid(
                                "--listen",
                                format!("{l:?} must be HOST:PORT in tcp mode"),
                            ));
                        }
                    },
                }
            }
        };

        let message_ttl = duration("--message-ttl", &a.message_ttl)?;
        if message_ttl > crate::relay::MAX_MESSAGE_TTL {
            return Err(invalid(
                "--message-ttl",
                format!(
                    "{} is over the maximum of {}",
                    a.message_ttl,
                    humantime::format_duration(crate::relay::MAX_MESSAGE_TTL)
                ),
            ));
        }
        let relay = RelaySettings {
            max_body: parse_size("--max-message-size", &a.max_message_size)?,
            message_ttl,
            retry_max_backoff: duration("--retry-max-backoff", &a.retry_max_backoff)?,
            after_recv: a.after_recv,
        };
        let registration = Registration {
            parent,
            addresses,
            services,
            capabilities,
            tags,
            metadata: metadata.into(),
            endpoint: Some(endpoint),
            ttl_seconds: Some(ttl_secs as u32),
            eviction_seconds: None,
            relay_public_key: None,
        };
        registration
            .validate()
            .map_err(|e| invalid(flag_of(&e.field), e.to_string()))?;
        Ok(RunConfig {
            id,
            namespace,
            registry_urls,
            token,
            tls,
            registration,
            tcp_port_on_route,
            heartbeat_interval,
            max_backoff,
            shutdown_grace,
            state_dir,
            relay,
            replace: a.replace,
        })
    }
}

/// Validated flags of the subcommands that talk to a running agent.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// The agent's state directory.
    pub state_dir: PathBuf,
    /// How long to wait for the agent.
    pub timeout: Duration,
}

impl TryFrom<LocalArgs> for LocalConfig {
    type Error = ConfigError;
    fn try_from(a: LocalArgs) -> Result<Self, ConfigError> {
        let id = match a.id.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => Some(MembraneId::new(s).map_err(|e| invalid("--id", e.to_string()))?),
        };
        Ok(LocalConfig {
            state_dir: state_dir(&a.state_dir, id.as_ref())?,
            timeout: duration("--timeout", &a.timeout)?,
        })
    }
}

/// `agent register`, validated.
#[derive(Debug, Clone)]
pub struct RegisterConfig {
    /// The agent.
    pub local: LocalConfig,
    /// `Some(Some(p))`: new parent `p`; `Some(None)`: no parent; `None`: unchanged.
    pub parent: Option<Option<MembraneId>>,
}

impl TryFrom<RegisterArgs> for RegisterConfig {
    type Error = ConfigError;
    fn try_from(a: RegisterArgs) -> Result<Self, ConfigError> {
        let parent = match (a.parent.as_deref(), a.no_parent) {
            (_, true) => Some(None),
            (Some(p), false) => Some(Some(
                MembraneId::new(p).map_err(|e| invalid("--parent", e.to_string()))?,
            )),
            (None, false) => None,
        };
        Ok(RegisterConfig {
            local: a.local.try_into()?,
            parent,
        })
    }
}

/// Validated flags of `discover` and `list`.
#[derive(Debug, Clone)]
pub struct QueryConfig {
    /// The agent.
    pub local: LocalConfig,
    /// Namespace, to ask the registry directly.
    pub namespace: Option<NamespaceName>,
    /// Registry URLs, to ask directly.
    pub registry_urls: Vec<RegistryUrl>,
    /// Bearer token.
    pub token: Option<String>,
    /// TLS for https registry URLs.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl TryFrom<QueryArgs> for QueryConfig {
    type Error = ConfigError;
    fn try_from(a: QueryArgs) -> Result<Self, ConfigError> {
        let namespace = match a.namespace.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => {
                Some(NamespaceName::new(s).map_err(|e| invalid("--namespace", e.to_string()))?)
            }
        };
        let registry_urls = urls(&a.registry_urls)?;
        let token = token(&a.token)?;
        let tls = registry_tls(
            &registry_urls,
            token.as_deref(),
            a.registry_ca.as_deref(),
            a.insecure,
        )?;
        Ok(QueryConfig {
            local: a.local.try_into()?,
            namespace,
            registry_urls,
            token,
            tls,
        })
    }
}

/// `agent discover`, validated.
#[derive(Debug, Clone)]
pub struct DiscoverConfig {
    /// Where to ask.
    pub query: QueryConfig,
    /// One membrane, or all.
    pub id: Option<MembraneId>,
}

impl TryFrom<DiscoverArgs> for DiscoverConfig {
    type Error = ConfigError;
    fn try_from(a: DiscoverArgs) -> Result<Self, ConfigError> {
        let id = match a.target.as_deref() {
            None => None,
            Some(s) => Some(MembraneId::new(s).map_err(|e| invalid("ID", e.to_string()))?),
        };
        Ok(DiscoverConfig {
            query: a.query.try_into()?,
            id,
        })
    }
}

/// `agent list`, validated.
#[derive(Debug, Clone)]
pub struct ListConfig {
    /// Where to ask.
    pub query: QueryConfig,
    /// Service filter.
    pub service: Option<ServiceName>,
    /// Capability filter.
    pub capability: Option<Tag>,
}

impl TryFrom<ListArgs> for ListConfig {
    type Error = ConfigError;
    fn try_from(a: ListArgs) -> Result<Self, ConfigError> {
        let service = match a.service.as_deref() {
            None => None,
            Some(s) => Some(ServiceName::new(s).map_err(|e| invalid("--service", e.to_string()))?),
        };
        let capability = match a.capability.as_deref() {
            None => None,
            Some(s) => Some(Tag::new(s).map_err(|e| invalid("--capability", e.to_string()))?),
        };
        Ok(ListConfig {
            query: a.query.try_into()?,
            service,
            capability,
        })
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;

/// `agent send`, validated.
#[derive(Debug, Clone)]
pub struct SendConfig {
    /// Where the agent (and registry) is.
    pub query: QueryConfig,
    /// The target.
    pub target: crate::relay::resolve::Target,
    /// The body.
    pub body: Vec<u8>,
    /// MIME type.
    pub content_type: String,
    /// Every instance of a service.
    pub all: bool,
    /// Wait for the ack.
    pub wait: bool,
    /// Print the resolution.
    pub debug: bool,
    /// Answered message.
    pub reply_to: Option<shared::envelope::MessageId>,
    /// Caller-chosen id.
    pub message_id: Option<shared::envelope::MessageId>,
    /// Explicit size limit.
    pub max_body: Option<usize>,
    /// Membrane id given with --id (the sender, for direct delivery).
    pub from: Option<MembraneId>,
}

impl SendConfig {
    /// Validates `a`, reading the body from `stdin` when the message is `-`.
    pub fn from_args(
        a: crate::cli::SendArgs,
        stdin: impl std::io::Read,
    ) -> Result<Self, ConfigError> {
        use crate::relay::resolve::Target;
        let target = Target::parse(&a.target).map_err(|m| invalid("TARGET", m))?;
        if a.all && !matches!(target, Target::Service(_) | Target::Children) {
            return Err(invalid(
                "--all",
                "only applies to a service target (_NAME._tcp)",
            ));
        }
        let from = match a.query.local.id.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => Some(MembraneId::new(s).map_err(|e| invalid("--id", e.to_string()))?),
        };
        let max_body = a
            .max_message_size
            .as_deref()
            .map(|s| parse_size("--max-message-size", s))
            .transpose()?;
        let msg_id = |flag: &'static str, v: &Option<String>| {
            v.as_deref()
                .map(|s| {
                    s.trim()
                        .parse()
                        .map_err(|e: shared::envelope::BadMessageId| invalid(flag, e.to_string()))
                })
                .transpose()
        };
        let reply_to = msg_id("--reply-to", &a.reply_to)?;
        let message_id = msg_id("--message-id", &a.message_id)?;
        let (body, from_stdin) = if a.message == "-" {
            let limit = max_body.unwrap_or(crate::relay::MAX_BODY_LIMIT) as u64;
            let mut b = Vec::new();
            std::io::Read::read_to_end(&mut stdin.take(limit + 1), &mut b)
                .map_err(|e| invalid("MESSAGE", format!("cannot read standard input: {e}")))?;
            (b, true)
        } else {
            (a.message.into_bytes(), false)
        };
        let content_type = match a.content_type.as_deref().map(str::trim) {
            Some(t) if !t.is_empty() => {
                if t.len() > 255 || t.chars().any(|c| c.is_control()) {
                    return Err(invalid(
                        "--content-type",
                        "must be a printable MIME type up to 255 characters",
                    ));
                }
                t.to_string()
            }
            _ if from_stdin && std::str::from_utf8(&body).is_err() => {
                "application/octet-stream".into()
            }
            _ => "text/plain; charset=utf-8".into(),
        };
        if let Some(max) = max_body {
            check_size(body.len(), max)?;
        }
        Ok(SendConfig {
            query: a.query.try_into()?,
            target,
            body,
            content_type,
            all: a.all,
            wait: a.wait,
            debug: a.debug,
            reply_to,
            message_id,
            max_body,
            from,
        })
    }
}

/// The "message too large" usage error.
pub fn check_size(len: usize, max: usize) -> Result<(), ConfigError> {
    if len > max {
        return Err(invalid(
            "MESSAGE",
            format!(
                "the message is {len} bytes, over the limit of {max} bytes (--max-message-size)"
            ),
        ));
    }
    Ok(())
}
