//! Locates (or builds) both binaries, starts them, and offers tiny HTTP and dig helpers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The workspace's binaries dir (`target/<profile>`), with both binaries built.
fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // This test runs from target/<profile>/deps/.
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        if !(dir.join("dns-server").is_file() && dir.join("agent").is_file()) {
            eprintln!("e2e: building dns-server and agent into {}", dir.display());
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "-p", "dns-server", "-p", "agent"])
                .env("CARGO_TARGET_DIR", dir.parent().unwrap())
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .unwrap();
            assert!(status.success(), "building the binaries failed");
        }
        dir
    })
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Polls `f` every 25 ms until it returns `Some`, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A child process killed on drop, its stderr drained (and kept for failure messages).
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct DnsServer {
    _proc: Proc,
    pub http: SocketAddr,
    pub dns: SocketAddr,
}

impl DnsServer {
    pub fn start(data_dir: &Path) -> DnsServer {
        Self::start_on(data_dir, "127.0.0.1:0")
    }

    /// [`DnsServer::start`] with its HTTP API on `http` (a restart keeps its address).
    pub fn start_on(data_dir: &Path, http: &str) -> DnsServer {
        let mut child = Command::new(bin("dns-server"))
            .args(["--data-dir", data_dir.to_str().unwrap()])
            .args(["--http-listen", http, "--dns-listen", "127.0.0.1:0"])
            .args(["--sweep-interval", "100ms"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (mut http, mut dns) = (None, None);
        while http.is_none() || dns.is_none() {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("server start");
            if let Some(a) = line.split("listening http ").nth(1) {
                http = a.trim().parse().ok();
            }
            if let Some(a) = line.split("listening dns udp ").nth(1) {
                dns = a.trim().parse().ok();
            }
        }
        // Keep draining so the server never blocks on its log pipe.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        DnsServer {
            _proc: Proc { child },
            http: http.unwrap(),
            dns: dns.unwrap(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Stops the server cleanly (SIGTERM) and waits for it.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self._proc.terminate()
    }

    /// GET a JSON document: (status, body).
    pub fn get(&self, path: &str) -> (u16, Value) {
        let mut s = TcpStream::connect(self.http).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let status = resp[9..12].parse().unwrap();
        let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    /// `dig +short` answer lines, or None when dig is missing (loud SKIP; a failure on CI).
    pub fn dig(&self, qtype: &str, name: &str) -> Option<Vec<String>> {
        if Command::new("dig").arg("-v").output().is_err() {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "CI needs dig");
            eprintln!("SKIP: dig not installed (apt-get install dnsutils)");
            return None;
        }
        let out = Command::new("dig")
            .arg(format!("@{}", self.dns.ip()))
            .args([
                "-p",
                &self.dns.port().to_string(),
                "+short",
                "+time=2",
                "+tries=1",
            ])
            .args([qtype, name])
            .output()
            .unwrap();
        assert!(out.status.success());
        let mut v: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        Some(v)
    }
}

/// Starts `agent run` with `args` (after `run`) and a private state dir.
pub fn agent(state_dir: &Path, args: &[&str]) -> Proc {
    let child = Command::new(bin("agent"))
        .arg("run")
        .args(["--state-dir", state_dir.to_str().unwrap()])
        .args(args)
        .env_remove("MEMBRANE_REGISTRY_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Proc { child }
}
