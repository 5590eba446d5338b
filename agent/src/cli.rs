//! The command line (clap derive). Flags also read the `MEMBRANE_*` environment variables
//! named in their help; list-valued variables are comma-separated. Values are kept as
//! strings here and validated by [`crate::config`], so that every error names its flag.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

const STATE_DIR_HELP: &str = "State directory: instance secret, namespace cache, control socket \
(control.sock, 0600) and activity log. Default: $STATE_DIRECTORY (set by systemd's \
StateDirectory=), else /var/lib/membrane/agent/<ID> when writable, else \
$XDG_RUNTIME_DIR/membrane/<ID>";

/// Membrane sidecar: registers this membrane with the registry (dns-server), heartbeats,
/// deregisters on shutdown and caches what it discovered.
#[derive(Debug, Parser)]
#[command(
    name = "agent",
    version,
    args_override_self = true,
    about,
    long_about = "Membrane sidecar: registers this membrane with the registry (dns-server), \
heartbeats, deregisters on shutdown and keeps a local cache of its namespace.\n\n\
Start `agent run` beside the membrane (container sidecar or systemd unit); the other \
subcommands talk to it through the control socket in its state directory.\n\n\
Exit codes: 0 ok, 1 failure, 64 bad usage or configuration."
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MEMBRANE_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: register, heartbeat, cache the namespace, serve the control socket;
    /// deregister on SIGTERM/SIGINT.
    Run(Box<RunArgs>),
    /// Ask the running agent to register now (optionally under another parent).
    Register(RegisterArgs),
    /// Ask the running agent to deregister now; it stops heartbeating until `agent register`.
    Deregister(LocalArgs),
    /// Ask the running agent to heartbeat now.
    Heartbeat(LocalArgs),
    /// Show registration, last heartbeat, registry reachability and cache age (JSON).
    Status(LocalArgs),
    /// Show one membrane, or all of the namespace (JSON); answers from the cache, marked
    /// `"cached": true`, when no registry answers.
    Discover(DiscoverArgs),
    /// List the namespace's membranes, filtered (JSON); answers from the cache, marked
    /// `"cached": true`, when no registry answers.
    List(ListArgs),
    /// Print the agent's activity log (JSON lines).
    Log(LogArgs),
    /// Send a message to a membrane (id), `parent`, `children` or a service (`_svc._tcp`,
    /// one instance by weight, or all with --all). Hands it to the running agent, which
    /// stores it durably and retries until acknowledged; without one, delivers directly.
    Send(SendArgs),
    /// Print the messages this membrane received, oldest first, and acknowledge them.
    Recv(RecvArgs),
}

/// Message endpoint mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// A Maildir on a volume shared by the membranes (--shared-dir).
    SharedVolume,
    /// A Unix socket (--listen PATH, default <state-dir>/messages.sock).
    Ipc,
    /// A TCP listener (--listen HOST:PORT), for membranes on other hosts.
    Tcp,
}

/// `agent run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Membrane id: a DNS label (a-z, 0-9, '-'; 1-63 characters), unique in the namespace.
    #[arg(long, env = "MEMBRANE_ID")]
    pub id: Option<String>,
    /// Namespace (a DNS label), e.g. cognitive-system.
    #[arg(long, env = "MEMBRANE_NAMESPACE")]
    pub namespace: Option<String>,
    /// Parent membrane id in the hierarchy.
    #[arg(long, env = "MEMBRANE_PARENT")]
    pub parent: Option<String>,
    /// Registry URL(s), http:// or https:// (https needs --registry-ca); several
    /// (comma-separated or repeated) for failover:
    /// the agent moves to the next one when one does not answer.
    #[arg(
        long = "registry-url",
        env = "MEMBRANE_REGISTRY_URL",
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub registry_urls: Vec<String>,
    /// A service this membrane offers, served as SRV: NAME:PROTO:PORT[:PRIORITY:WEIGHT]
    /// (PROTO tcp or udp; priority 0 and weight 10 by default). Repeat for more.
    #[arg(
        long = "service",
        env = "MEMBRANE_SERVICES",
        value_delimiter = ',',
        value_name = "SPEC"
    )]
    pub services: Vec<String>,
    /// Address(es) to register (IPv4/IPv6), served as A/AAAA. Default: the local address of
    /// this host's route to the registry.
    #[arg(
        long = "address",
        env = "MEMBRANE_ADDRESS",
        value_delimiter = ',',
        value_name = "IP"
    )]
    pub addresses: Vec<String>,
    /// A capability (DNS label), served as a DNS-SD subtype. Repeat for more.
    #[arg(
        long = "capability",
        env = "MEMBRANE_CAPABILITIES",
        value_delimiter = ',',
        value_name = "C"
    )]
    pub capabilities: Vec<String>,
    /// A tag (DNS label). Repeat for more.
    #[arg(
        long = "tag",
        env = "MEMBRANE_TAGS",
        value_delimiter = ',',
        value_name = "T"
    )]
    pub tags: Vec<String>,
    /// Metadata KEY=VALUE, served as TXT. Repeat for more.
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    pub metadata: Vec<String>,
    /// How this membrane receives messages (advertised in its registration).
    #[arg(long, value_enum, default_value_t = Mode::SharedVolume, env = "MEMBRANE_MODE")]
    pub mode: Mode,
    /// Take over this id's registration if another instance holds it (an open registry
    /// answers 409 otherwise; with tokens only the admin token can). Only for the first
    /// registration: after that this agent's own instance secret (kept in --state-dir)
    /// proves it is the same instance, across agent and server restarts.
    #[arg(long, env = "MEMBRANE_REPLACE")]
    pub replace: bool,
    /// Root of the shared message volume (shared-volume mode); default `<state-dir>/shared`
    /// (senders write to the path the receiver advertises, so agents of one user on one
    /// host reach each other, and two deployments never share a directory by default).
    #[arg(long, env = "MEMBRANE_SHARED_DIR")]
    pub shared_dir: Option<PathBuf>,
    /// Message listener: a socket path (ipc mode) or HOST:PORT (tcp mode; with 0.0.0.0 or
    /// [::] the route address is advertised).
    #[arg(long, env = "MEMBRANE_LISTEN")]
    pub listen: Option<String>,
    /// Bearer token for the registry: the admin token or the namespace's join token.
    #[arg(long, env = "MEMBRANE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate(s), PEM, that an https:// registry's certificate must chain to.
    #[arg(long, env = "MEMBRANE_REGISTRY_CA", value_name = "FILE")]
    pub registry_ca: Option<PathBuf>,
    /// Allow the token to go over plain http:// to a registry that is not on loopback.
    #[arg(long, env = "MEMBRANE_INSECURE")]
    pub insecure: bool,
    /// Time between heartbeats (±10 % jitter), e.g. 10s, 1m.
    #[arg(long, env = "MEMBRANE_HEARTBEAT_INTERVAL", default_value = "10s")]
    pub heartbeat_interval: String,
    /// Instance TTL asked of the registry: the membrane goes stale after this long without a
    /// heartbeat. Must exceed --heartbeat-interval.
    #[arg(long, env = "MEMBRANE_TTL", default_value = "30s")]
    pub ttl: String,
    /// Longest delay between retries while no registry answers (exponential from 1s).
    #[arg(long, env = "MEMBRANE_MAX_BACKOFF", default_value = "30s")]
    pub max_backoff: String,
    /// Time allowed to deregister on SIGTERM/SIGINT before exiting anyway.
    #[arg(long, env = "MEMBRANE_SHUTDOWN_GRACE", default_value = "5s")]
    pub shutdown_grace: String,
    #[arg(long, env = "MEMBRANE_STATE_DIR", help = STATE_DIR_HELP)]
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// Largest message body sent or accepted, in bytes (suffixes K, KiB, M, MiB; at most
    /// 16 MiB). Larger messages are refused (exit 64 for `agent send`).
    #[arg(long, env = "MEMBRANE_MAX_MESSAGE_SIZE", default_value = "1MiB")]
    pub max_message_size: String,
    /// How long the outbox retries a message before moving it to the dead-letter folder.
    #[arg(long, env = "MEMBRANE_MESSAGE_TTL", default_value = "1h")]
    pub message_ttl: String,
    /// Longest delay between delivery retries (exponential from 100ms).
    #[arg(long, env = "MEMBRANE_RETRY_MAX_BACKOFF", default_value = "30s")]
    pub retry_max_backoff: String,
    /// What `agent recv` does with a message once printed: keep it in cur/, or delete its
    /// content (an empty file keeps the id, so late retries are still dropped, for 24 h).
    #[arg(long, env = "MEMBRANE_AFTER_RECV", value_enum, default_value_t = crate::relay::AfterRecv::Keep)]
    pub after_recv: crate::relay::AfterRecv,
}

/// `agent send`.
#[derive(Debug, Clone, Args)]
pub struct SendArgs {
    /// A membrane id, `parent`, `children` (each child) or a service `_NAME._tcp`.
    pub target: String,
    /// The message text, or `-` to read the body from standard input.
    pub message: String,
    /// Send to every passing instance of the service (not just one chosen by weight).
    #[arg(long)]
    pub all: bool,
    /// Return only once the receiving agent acknowledged (stored) the message.
    #[arg(long)]
    pub wait: bool,
    /// Print how the target was resolved and the route taken (stderr).
    #[arg(long)]
    pub debug: bool,
    /// MIME type of the body. Default: text/plain; charset=utf-8 (application/octet-stream
    /// for a body read from stdin that is not UTF-8).
    #[arg(long, value_name = "TYPE")]
    pub content_type: Option<String>,
    /// The id of the message this one answers.
    #[arg(long, value_name = "MESSAGE_ID")]
    pub reply_to: Option<String>,
    /// Use this message id (32 hex digits) instead of a new one: sending again with the
    /// same id never delivers twice (single recipient only).
    #[arg(long, value_name = "MESSAGE_ID")]
    pub message_id: Option<String>,
    /// Largest body, in bytes (default: the running agent's setting, else 1MiB).
    #[arg(long, env = "MEMBRANE_MAX_MESSAGE_SIZE")]
    pub max_message_size: Option<String>,
    #[command(flatten)]
    /// Where the agent is (and the registry, for direct delivery without an agent).
    pub query: QueryArgs,
}

/// `agent recv`.
#[derive(Debug, Clone, Args)]
pub struct RecvArgs {
    #[command(flatten)]
    /// Where the agent is.
    pub local: LocalArgs,
    /// Keep waiting for new messages.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// One JSON object per message and line (body as text, or body_base64).
    #[arg(long)]
    pub json: bool,
}

/// Flags of the subcommands that talk to a running agent (or read its state directory).
#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    #[arg(long, env = "MEMBRANE_STATE_DIR", help = STATE_DIR_HELP)]
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// Membrane id, to find the default state directory.
    #[arg(long, env = "MEMBRANE_ID")]
    pub id: Option<String>,
    /// Time to wait for the agent's answer, e.g. 30s, 2m (a duration: a bare number is
    /// refused).
    #[arg(long, default_value = "30s")]
    pub timeout: String,
}

/// Flags of `discover` and `list`, which can also ask the registry directly when no agent
/// runs.
#[derive(Debug, Clone, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    /// Where the agent is.
    pub local: LocalArgs,
    /// Namespace, for asking the registry directly when no agent runs.
    #[arg(long, env = "MEMBRANE_NAMESPACE")]
    pub namespace: Option<String>,
    /// Registry URL(s), for asking the registry directly when no agent runs.
    #[arg(
        long = "registry-url",
        env = "MEMBRANE_REGISTRY_URL",
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub registry_urls: Vec<String>,
    /// Bearer token for the registry.
    #[arg(long, env = "MEMBRANE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate(s), PEM, that an https:// registry's certificate must chain to.
    #[arg(long, env = "MEMBRANE_REGISTRY_CA", value_name = "FILE")]
    pub registry_ca: Option<PathBuf>,
    /// Allow the token to go over plain http:// to a registry that is not on loopback.
    #[arg(long, env = "MEMBRANE_INSECURE")]
    pub insecure: bool,
}

/// `agent register`.
#[derive(Debug, Clone, Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    /// Where the agent is.
    pub local: LocalArgs,
    /// Register under this parent membrane from now on.
    #[arg(long, conflicts_with = "no_parent")]
    pub parent: Option<String>,
    /// Register without a parent from now on.
    #[arg(long)]
    pub no_parent: bool,
}

/// `agent discover`.
#[derive(Debug, Clone, Args)]
pub struct DiscoverArgs {
    /// Membrane id; all membranes of the namespace when absent.
    pub target: Option<String>,
    #[command(flatten)]
    /// Where to ask.
    pub query: QueryArgs,
}

/// `agent list`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Only membranes offering this service.
    #[arg(long)]
    pub service: Option<String>,
    /// Only membranes with this capability.
    #[arg(long)]
    pub capability: Option<String>,
    #[command(flatten)]
    /// Where to ask.
    pub query: QueryArgs,
}

/// `agent log`.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    #[command(flatten)]
    /// Where the agent is.
    pub local: LocalArgs,
    /// Keep printing new lines as the agent writes them.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Print only the last N lines first.
    #[arg(long, short = 'n', value_name = "N")]
    pub lines: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
