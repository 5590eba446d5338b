//! Starts `dns-server` as a child process and talks HTTP to it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_dns-server")
}

/// The `agent` binary: `$AGENT_BIN`, else beside `dns-server` in the target dir, built with
/// `cargo build -p agent` when missing.
#[allow(dead_code)] // used by the deploy and etcd tests
pub fn agent_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("AGENT_BIN") {
        return p.into();
    }
    let path = Path::new(bin()).with_file_name("agent");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "agent"])
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap());
        if path.parent().and_then(|p| p.file_name()) == Some(std::ffi::OsStr::new("release")) {
            cmd.arg("--release");
        }
        let ok = cmd.status().is_ok_and(|s| s.success());
        assert!(
            ok && path.exists(),
            "cannot build the agent binary at {}",
            path.display()
        );
    }
    path
}

/// A running server.
pub struct Server {
    pub child: Child,
    pub http: SocketAddr,
    #[allow(dead_code)] // used by the DNS process tests
    pub dns: SocketAddr,
    /// Keeps the log reader alive (a closed pipe would kill the server on its next log line).
    _stderr: mpsc::Receiver<String>,
}

impl Server {
    /// Starts the server on loopback port 0 with `data_dir` and extra args, and waits for
    /// its "listening" lines.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Self::spawn(Command::new(bin()), data_dir, extra)
    }

    /// [`Server::start`] under `ulimit ULIMIT` (e.g. `-n 400`: open files, soft and hard).
    #[allow(dead_code)] // used by the limits tests
    pub fn start_with_ulimit(data_dir: &Path, extra: &[&str], ulimit: &str) -> Server {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("ulimit {ulimit} && exec \"$0\" \"$@\""))
            .arg(bin());
        Self::spawn(cmd, data_dir, extra)
    }

    fn spawn(mut cmd: Command, data_dir: &Path, extra: &[&str]) -> Server {
        let mut child = cmd
            .args(["--data-dir", data_dir.to_str().unwrap()])
            .args([
                "--http-listen",
                "127.0.0.1:0",
                "--dns-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("MEMBRANE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dns-server");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut http, mut dns) = (None, None);
        while http.is_none() || dns.is_none() {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("dns-server did not report its addresses");
            if let Some(a) = line.split("listening http ").nth(1) {
                http = Some(a.trim().parse().unwrap());
            }
            if let Some(a) = line.split("listening dns udp ").nth(1) {
                dns = Some(a.trim().parse().unwrap());
            }
        }
        Server {
            child,
            http: http.unwrap(),
            dns: dns.unwrap(),
            _stderr: rx,
        }
    }

    /// Base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small HTTP client.
#[derive(Clone)]
pub struct Http {
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    base: String,
}

impl Http {
    pub fn new(base: String) -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base,
        }
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, Value), String> {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
            .unwrap();
        let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }
}
