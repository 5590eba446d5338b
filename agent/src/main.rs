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
    match rt.block_on(agent::commands::dispatch(cli.command)) {
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

/// Logs to stderr; `RUST_LOG` overrides the default (`info` for `run`, `warn` otherwise).
fn init_tracing(format: LogFormat, daemon: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if daemon { "info" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}
