//! `dns-server` binary: parse arguments, set up logging, run the server or a client
//! subcommand, map errors to exit codes (64: bad usage or configuration, 1: failure).

use std::process::ExitCode;

use clap::Parser;
use dns_server::config::{Cli, Config, LogFormat};
use dns_server::{RunError, client};
use tokio_util::sync::CancellationToken;

const EXIT_USAGE: u8 = 64;

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MEMBRANE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.server.log_format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dns-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(cmd) = cli.command {
        return match rt.block_on(client::run(cmd)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dns-server: {e}");
                match e {
                    client::ClientError::Usage(_) => ExitCode::from(EXIT_USAGE),
                    _ => ExitCode::FAILURE,
                }
            }
        };
    }
    let config = match Config::try_from(cli.server) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dns-server: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    dns_server::raise_open_file_limit();
    let result = rt.block_on(async {
        let shutdown = CancellationToken::new();
        dns_server::cancel_on_signals(shutdown.clone()).map_err(|source| RunError::Io {
            context: "installing signal handlers".into(),
            source,
        })?;
        let listeners = dns_server::bind(&config).await?;
        dns_server::run(config, listeners, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dns-server: {e}");
            match e {
                RunError::Config(_) => ExitCode::from(EXIT_USAGE),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
