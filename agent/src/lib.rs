//! `agent`: the membrane sidecar.
//!
//! `agent run` registers its membrane with the registry (`dns-server`), heartbeats, re-registers
//! when the registry forgot it, deregisters on SIGTERM/SIGINT, keeps a persisted cache of its
//! namespace fed by the registry's event stream, and answers the other subcommands through a
//! control socket in its state directory.
//!
//! Modules:
//! - [`cli`]: the command line (clap derive); [`config`]: its validation into typed configs;
//! - [`url`], [`client`], [`sse`]: the plain-HTTP registry client with URL failover;
//! - [`lifecycle`]: register / heartbeat / re-register / deregister state machine;
//! - [`cache`], [`sync`]: the namespace cache and its event-stream synchronisation;
//! - [`control`]: the control socket protocol, server and client;
//! - [`daemon`]: `agent run` wiring; [`commands`]: the client subcommands;
//! - [`relay`]: the message relay (`send`, `recv`): Maildir, frames, outbox, targets;
//! - [`activity`], [`state`], [`systemd`], [`output`], [`util`]: supporting pieces.
#![forbid(unsafe_code)]

pub mod activity;
pub mod cache;
pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub mod control;
pub mod daemon;
#[doc(hidden)]
pub mod fuzzing;
pub mod lifecycle;
pub mod output;
pub mod relay;
pub mod sse;
pub mod state;
pub mod sync;
pub mod systemd;
pub mod url;
pub mod util;

/// Exit code for success.
pub const EXIT_OK: i32 = 0;
/// Exit code for runtime failures (registry refused, agent not running, I/O error...).
pub const EXIT_FAILURE: i32 = 1;
/// Exit code for bad usage or configuration (sysexits `EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;

/// Any error a subcommand ends with, sorted by exit code.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Bad flags or configuration: exit 64.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Something failed at run time: exit 1.
    #[error("{0}")]
    Runtime(String),
}

impl AgentError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            AgentError::Config(_) => EXIT_USAGE,
            AgentError::Runtime(_) => EXIT_FAILURE,
        }
    }

    /// A runtime failure with this message.
    pub fn runtime(msg: impl std::fmt::Display) -> Self {
        AgentError::Runtime(msg.to_string())
    }
}
