//! `agent` binary: parses the command line, sets up logging and a current-thread runtime,
//! runs the subcommand and maps errors to exit codes (0 ok, 1 failure, 64 usage/config).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use agent::cli::{Cli, Command, LogFormat};
use clap::Parser;
use clap::error::ErrorKind;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(agent::EXIT_USAGE as u8),
            };
        }
    };
    init_tracing(cli.log_format, matches!(cli.command, Command::Run(_)));
    let rt = match build_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agent: {e:#}");
            return ExitCode::from(agent::EXIT_FAILURE as u8);
        }
    };
    let result = rt.block_on(agent::commands::dispatch(cli.command));
    // Dropping the runtime would wait for every blocking task, such as a name lookup of the
    // registry that hangs on an unreachable resolver (a container network being torn
    // down): the agent would outlive its stop timeout and be killed. Finished work is
    // already durable here; give what is left a moment, then exit.
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn build_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Logs to stderr; `RUST_LOG` (`LEVEL` or `target=LEVEL,...`) overrides the default (`info`
/// for `run`, `warn` otherwise). A plain target filter rather than `EnvFilter` keeps the
/// regex engine out of the binary.
fn init_tracing(format: LogFormat, daemon: bool) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let default = if daemon { "info" } else { "warn" };
    let filter: Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| default.parse().expect("valid default filter"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false);
    match format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(layer)
            .with(filter)
            .init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(layer.json())
            .with(filter)
            .init(),
    }
}
