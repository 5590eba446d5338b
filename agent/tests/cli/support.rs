//! Test harness: the `dns-server` process, `agent` processes, a raw HTTP/1.1 getter and
//! polling helpers.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The agent binary under test.
pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_agent"))
}

/// The dns-server binary: `DNS_SERVER_BIN`, else next to the agent binary, else built.
pub fn dns_server_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("DNS_SERVER_BIN") {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "\n\n*** DNS_SERVER_BIN={} does not exist ***\n",
                p.display()
            );
            return p;
        }
        let dir = agent_bin().parent().expect("bin dir").to_path_buf();
        let candidate = dir.join("dns-server");
        if candidate.is_file() {
            return candidate;
        }
        // Build it into the same target directory (profile dir's parent).
        let target_dir = dir.parent().expect("target dir").to_path_buf();
        eprintln!(
            "dns-server not found at {}; building it with `cargo build -p dns-server`",
            candidate.display()
        );
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "dns-server"])
            .env("CARGO_TARGET_DIR", &target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status();
        match status {
            Ok(s) if s.success() && candidate.is_file() => candidate,
            other => panic!(
                "\n\n************************************************************\n\
                 *** dns-server binary missing: {} ({other:?}).\n\
                 *** Build it first: CARGO_TARGET_DIR={} cargo build -p dns-server\n\
                 *** or point DNS_SERVER_BIN at it.\n\
                 ************************************************************\n",
                candidate.display(),
                target_dir.display()
            ),
        }
    })
    .clone()
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running dns-server.
pub struct Server {
    child: Child,
    /// HTTP port.
    pub port: u16,
    /// Its data directory.
    pub data_dir: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts a server on `127.0.0.1:port` (0: any) with `data_dir` and extra flags.
    pub fn start(data_dir: &Path, port: u16, extra: &[&str]) -> Server {
        let mut child = Command::new(dns_server_bin())
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--http-listen",
                &format!("127.0.0.1:{port}"),
                "--dns-listen",
                "127.0.0.1:0",
            ])
            .args(["--sweep-interval", "100ms"])
            .args(extra)
            .env_remove("MEMBRANE_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dns-server");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(i) = line.find("listening http ") {
                    let addr = line[i + "listening http ".len()..].trim().to_string();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "dns-server did not log `listening http`: {}",
                    log.lock().unwrap()
                );
            }
        };
        let port = addr.rsplit(':').next().unwrap().parse().expect("port");
        let s = Server {
            child,
            port,
            data_dir: data_dir.to_path_buf(),
            log,
        };
        // Over TLS (`--tls-cert`) plain http gets no answer: the caller checks readiness.
        if !extra.contains(&"--tls-cert") {
            wait_for("dns-server /health", Duration::from_secs(10), || {
                (http(s.port, "GET", "/health", None).ok()?.0 == 200).then_some(())
            });
        }
        s
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops it with SIGTERM and waits.
    pub fn stop(mut self) {
        signal(&self.child, nix::sys::signal::Signal::SIGTERM);
        wait_exit(&mut self.child, Duration::from_secs(15));
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// `GET /v1/namespaces/{ns}/membranes/{id}`: the membrane JSON, or None on 404.
    pub fn membrane(&self, ns: &str, id: &str) -> Option<Value> {
        let (status, body) = http(
            self.port,
            "GET",
            &format!("/v1/namespaces/{ns}/membranes/{id}"),
            None,
        )
        .expect("registry answers");
        match status {
            200 => Some(serde_json::from_str(&body).expect("json")),
            404 => None,
            s => panic!("GET membrane: {s} {body}"),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, sig);
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("process {} did not exit within {timeout:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One raw HTTP/1.1 request with `Connection: close`; (status, body).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<(&str, &[(&str, &str)])>,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (payload, headers) = body.unwrap_or(("", &[]));
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !payload.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            payload.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(payload);
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A running `agent run`.
pub struct Agent {
    child: Child,
    /// Its state directory.
    pub state_dir: PathBuf,
    log_path: PathBuf,
}

/// Flags for a quick agent: heartbeat 1s, TTL 3s.
pub fn quick(id: &str, ns: &str, url: &str) -> Vec<String> {
    [
        "--id",
        id,
        "--namespace",
        ns,
        "--registry-url",
        url,
        "--heartbeat-interval",
        "1s",
        "--ttl",
        "3s",
        "--max-backoff",
        "2s",
        "--service",
        "visual:tcp:7100",
        "--capability",
        "vision",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Agent {
    /// Starts `agent run ARGS --state-dir DIR` with extra environment.
    pub fn start(args: &[String], state_dir: &Path, env: &[(&str, &str)]) -> Agent {
        Agent::start_in(Command::new(agent_bin()), args, state_dir, env)
    }

    /// Starts `agent run ARGS --state-dir DIR` with its soft limit on open files set to
    /// `nofile` (through `sh -c 'ulimit -Sn N; exec agent ...'`).
    pub fn start_with_nofile(args: &[String], state_dir: &Path, nofile: u64) -> Agent {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("ulimit -Sn {nofile} && exec \"$0\" \"$@\""))
            .arg(agent_bin());
        Agent::start_in(cmd, args, state_dir, &[])
    }

    /// Starts `CMD run ARGS --state-dir DIR` (CMD: the agent binary, or a wrapper that
    /// execs it).
    pub fn start_in(
        mut cmd: Command,
        args: &[String],
        state_dir: &Path,
        env: &[(&str, &str)],
    ) -> Agent {
        std::fs::create_dir_all(state_dir).unwrap();
        let log_path = state_dir.with_extension("stderr.log");
        let log = std::fs::File::create(&log_path).unwrap();
        cmd.arg("run").args(args).arg("--state-dir").arg(state_dir);
        clean_env(&mut cmd);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        Agent {
            child,
            state_dir: state_dir.to_path_buf(),
            log_path,
        }
    }

    /// Its stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit (at most `timeout`); returns the exit code.
    pub fn terminate(mut self, timeout: Duration) -> (Option<i32>, Duration) {
        let t0 = Instant::now();
        signal(&self.child, nix::sys::signal::Signal::SIGTERM);
        let st = wait_exit(&mut self.child, timeout);
        (st.code(), t0.elapsed())
    }

    /// SIGKILL.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process, if it exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits until the agent exits by itself.
    pub fn wait(mut self, timeout: Duration) -> std::process::ExitStatus {
        wait_exit(&mut self.child, timeout)
    }

    /// Runs `agent SUBCOMMAND ... --state-dir DIR`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        let dir = self.state_dir.to_string_lossy().to_string();
        all.extend(["--state-dir", &dir]);
        run_agent(&all)
    }

    /// `agent status` JSON (None when it failed).
    pub fn status(&self) -> Option<Value> {
        let out = self.cli(&["status"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("status json"))
    }

    /// Waits until `agent status` says registered.
    pub fn wait_registered(&self) -> Value {
        wait_for("agent registered", Duration::from_secs(15), || {
            let s = self.status()?;
            (s["registration"]["registered"] == true).then_some(s)
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        if k.starts_with("MEMBRANE_")
            || k == "NOTIFY_SOCKET"
            || k.starts_with("WATCHDOG_")
            || k == "STATE_DIRECTORY"
        {
            cmd.env_remove(k);
        }
    }
}

/// Runs the agent binary with `args` (clean `MEMBRANE_*` environment).
pub fn run_agent(args: &[&str]) -> Output {
    run_agent_env(args, &[])
}

/// Runs the agent binary with `args` and extra environment.
pub fn run_agent_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(agent_bin());
    cmd.args(args);
    clean_env(&mut cmd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null()).output().expect("run agent")
}

/// stdout as JSON.
pub fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// The admin token of servers started with `--admin-token`.
pub const ADMIN_TOKEN: &str = "admin-token-0123456789";

/// Creates namespace `ns` on a server run with `--admin-token ADMIN_TOKEN`; its join token.
pub fn create_namespace(server: &Server, ns: &str) -> String {
    let (status, body) = http(
        server.port,
        "POST",
        "/v1/namespaces",
        Some((
            &format!(r#"{{"name":"{ns}"}}"#),
            &[("Authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        )),
    )
    .unwrap();
    assert_eq!(status, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["join_token"].as_str().expect("join_token").to_string()
}

impl Agent {
    /// Sends SIGKILL without waiting for the process to go (as `kill -9` in a shell).
    pub fn kill_nowait(&self) {
        signal(&self.child, nix::sys::signal::Signal::SIGKILL);
    }
}

/// The ids of the messages `agent recv --json` printed (one JSON object a line).
pub fn ids_printed(out: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}
