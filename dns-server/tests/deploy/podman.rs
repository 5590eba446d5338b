//! The example's `docker-compose.yml` run for real: rootful podman + podman-compose (both
//! installed by `tests/run.sh`), an image built FROM scratch out of the binaries this test
//! run built (`examples/cognitive-system/scratch-image.sh`; nothing is pulled).
//!
//! Checks, on the registry and six membranes (app container + agent sidecar each): every
//! membrane in SRV and A from the host (dig against the published port), the A record is
//! the address inside the app container's network namespace, `agent status` / `agent
//! discover` in a sidecar, a relay round trip between two app containers, the app
//! placeholders stop at once on SIGTERM (compose `init: true`), and stopping the agents
//! deregisters all six.
//!
//! Podman is configured through its own `containers.conf` (`CONTAINERS_CONF`, nothing in
//! /etc is changed): runtime runc (crun fails on hybrid cgroup hosts), explicit
//! nofile/nproc ulimits (the defaults fail setrlimit on such hosts) and 192.168.x subnets.

use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::common::{COGNITIVE, agent_bin, have, require, workspace};
use crate::harness::{Http, bin};

const CONTAINERS_CONF: &str = r#"[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"

[network]
default_subnet = "192.168.230.0/24"
default_subnet_pools = [{"base" = "192.168.232.0/22", "size" = 24}]
"#;

/// A podman-compose project: brought down (volumes too) on drop, also after a failure.
struct Project {
    name: String,
    conf: PathBuf,
    compose: PathBuf,
    http_port: u16,
    dns_port: u16,
}

impl Project {
    fn podman(&self, args: &[&str]) -> Output {
        Command::new("podman")
            .args(args)
            .env("CONTAINERS_CONF", &self.conf)
            .output()
            .expect("podman")
    }

    fn compose(&self, args: &[&str]) -> Output {
        // Bounded: `up` waits forever for a container that cannot start (a taken port).
        Command::new("timeout")
            .args(["120", "podman-compose", "-p", &self.name, "-f"])
            .arg(&self.compose)
            .args(args)
            .env("CONTAINERS_CONF", &self.conf)
            .env("MEMBRANE_HTTP_PORT", self.http_port.to_string())
            .env("MEMBRANE_DNS_PORT", self.dns_port.to_string())
            .output()
            .expect("podman-compose")
    }

    /// The container name podman-compose gives `service`.
    fn container(&self, service: &str) -> String {
        format!("{}_{service}_1", self.name)
    }

    /// `podman exec` in `service`; the output's stdout as JSON.
    fn exec_json(&self, service: &str, cmd: &[&str]) -> Value {
        let name = self.container(service);
        let out = self.podman(&[&["exec", name.as_str()][..], cmd].concat());
        assert!(
            out.status.success(),
            "podman exec {service} {cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{cmd:?}: not JSON ({e}): {}", lossy(&out.stdout)))
    }

    fn inspect(&self, service: &str, format: &str) -> String {
        let out = self.podman(&["inspect", "--format", format, &self.container(service)]);
        assert!(out.status.success(), "{}", lossy(&out.stderr));
        lossy(&out.stdout).trim().to_string()
    }

    /// `inspect` without asserting (for failure reports).
    fn inspect_any(&self, service: &str, format: &str) -> String {
        let out = self.podman(&["inspect", "--format", format, &self.container(service)]);
        lossy(&out.stdout).trim().to_string()
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        let mut services = vec!["dns-server".to_string()];
        services.extend(COGNITIVE.iter().map(|m| format!("{}-agent", m.0)));
        for s in &services {
            let out = self.podman(&["logs", "--tail", "8", &self.container(s)]);
            all += &format!(
                "--- {s} (exit {})\n{}{}",
                self.inspect_any(s, "{{.State.ExitCode}}"),
                lossy(&out.stdout),
                lossy(&out.stderr)
            );
        }
        all
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        let _ = self.compose(&["down", "-v", "-t", "2"]);
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A port free on 127.0.0.1 for TCP and, when `udp`, for UDP too.
fn free_port(udp: bool) -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if !udp || UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn dig(port: u16, qtype: &str, name: &str) -> Vec<String> {
    let out = Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string()])
        .args(["+short", "+time=2", "+tries=2", qtype, name])
        .output()
        .expect("dig");
    assert!(out.status.success(), "dig {qtype} {name}");
    let mut v: Vec<String> = lossy(&out.stdout).lines().map(str::to_string).collect();
    v.sort();
    v
}

fn membranes(v: &Value) -> Vec<(String, String)> {
    let mut m: Vec<(String, String)> = v["membranes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    let id = m["id"].as_str().unwrap_or_default().to_string();
                    (id, m["state"].as_str().unwrap_or_default().to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    m.sort();
    m
}

async fn wait_for_membranes(http: &Http, want: usize, what: &str, timeout: Duration) {
    let start = Instant::now();
    let mut last = Value::Null;
    while start.elapsed() < timeout {
        if let Ok((200, v)) = http
            .call("GET", "/v1/namespaces/cognitive-system/membranes", None)
            .await
        {
            let ms = membranes(&v);
            if ms.len() == want && ms.iter().all(|(_, s)| s == "passing") {
                return;
            }
            last = v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not {want} passing membranes after {timeout:?}: {last}");
}

/// The IPv4 addresses (global scope) in the network namespace of the process `pid`.
fn netns_addresses(pid: &str) -> Vec<String> {
    let out = Command::new("nsenter")
        .args([
            "-t", pid, "-n", "ip", "-4", "-o", "addr", "show", "scope", "global",
        ])
        .output()
        .expect("nsenter");
    assert!(out.status.success(), "{}", lossy(&out.stderr));
    lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .map(|a| a.split('/').next().unwrap().to_string())
        .collect()
}

fn podman_available() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    root && ["podman", "podman-compose", "dig", "nsenter", "ip"]
        .iter()
        .all(|p| have(p))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_example_runs_under_podman() {
    if !require(
        podman_available(),
        "compose_example_runs_under_podman",
        "root with podman, podman-compose (PyPI), dig, nsenter and ip",
    ) {
        return;
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("containers.conf");
    std::fs::write(&conf, CONTAINERS_CONF).unwrap();
    let example = workspace().join("examples/cognitive-system");

    // The image, FROM scratch, out of this build's binaries.
    let out = Command::new("bash")
        .arg(example.join("scratch-image.sh"))
        .arg("membrane:latest")
        .env("DNS_SERVER_BIN", bin())
        .env("AGENT_BIN", agent_bin())
        .env("ENGINE", "podman")
        .env("CONTAINERS_CONF", &conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scratch-image.sh: {}{}",
        lossy(&out.stdout),
        lossy(&out.stderr)
    );

    let project = Project {
        name: format!("membrane-ci-{}", std::process::id()),
        conf: conf.clone(),
        compose: example.join("docker-compose.yml"),
        http_port: free_port(false),
        dns_port: free_port(true),
    };
    let up = project.compose(&["up", "-d"]);
    assert!(
        up.status.success(),
        "podman-compose up: {}{}",
        lossy(&up.stdout),
        lossy(&up.stderr)
    );
    let http = Http::new(format!("http://127.0.0.1:{}", project.http_port));
    wait_for_membranes(&http, 6, "after up", Duration::from_secs(30)).await;
    let up_secs = started.elapsed().as_secs_f32();

    // Every membrane in SRV and A through the published DNS port; the A record is the
    // address the app container has (its network namespace, entered from the host).
    for (id, _, svc, port, _) in COGNITIVE {
        let srv = dig(
            project.dns_port,
            "SRV",
            &format!("_{svc}._tcp.cognitive-system"),
        );
        assert!(
            srv.contains(&format!("0 10 {port} {id}.cognitive-system.")),
            "SRV _{svc}._tcp: {srv:?}"
        );
        let a = dig(project.dns_port, "A", &format!("{id}.cognitive-system"));
        let pid = project.inspect(id, "{{.State.Pid}}");
        let mut app = netns_addresses(&pid);
        app.sort();
        assert!(!app.is_empty(), "{id}: no address in the app container");
        assert_eq!(a, app, "A {id}.cognitive-system vs the app container");
        assert!(
            app.iter().all(|ip| ip.starts_with("192.168.23")),
            "{id}: {app:?} not on the containers.conf subnet pool"
        );
    }

    // The agent's view from inside a sidecar.
    let status = project.exec_json("perception-agent", &["agent", "status"]);
    assert_eq!(status["registration"]["registered"], true, "{status}");
    assert_eq!(status["registration"]["phase"], "registered", "{status}");
    assert_eq!(status["cache"]["membranes"], 6, "{status}");
    let found = project.exec_json(
        "perception-agent",
        &["agent", "discover", "visual-worker-1"],
    );
    let want = dig(project.dns_port, "A", "visual-worker-1.cognitive-system");
    assert_eq!(
        found["membrane"]["membrane_id"], "visual-worker-1",
        "{found}"
    );
    assert_eq!(
        found["membrane"]["addresses"][0],
        want[0].as_str(),
        "{found}"
    );

    // A relay round trip between two app containers (shared volume, through their agents).
    for (from, to, body) in [
        ("perception", "visual-worker-1", "process image 1"),
        ("visual-worker-1", "perception", "image 1 done"),
    ] {
        let sent = project.exec_json(from, &["agent", "send", to, body, "--wait"]);
        assert_eq!(sent["status"], "delivered", "{sent}");
        let got = project.podman(&["exec", &project.container(to), "agent", "recv", "--json"]);
        assert!(got.status.success(), "{}", lossy(&got.stderr));
        let msg: Value = serde_json::from_str(lossy(&got.stdout).trim()).unwrap_or(Value::Null);
        assert_eq!(msg["body"], body, "{to} received: {}", lossy(&got.stdout));
        assert_eq!(msg["from"], from);
    }

    // The app placeholders stop at once on SIGTERM (init as PID 1), and the agents keep
    // their network and registration: the apps live in the agents' network namespaces.
    let apps: Vec<&str> = COGNITIVE.iter().map(|m| m.0).collect();
    let t = Instant::now();
    let stop = project.compose(&[&["stop", "-t", "8"][..], &apps].concat());
    assert!(stop.status.success(), "{}", lossy(&stop.stderr));
    let apps_stop = t.elapsed();
    for id in &apps {
        assert_eq!(
            project.inspect(id, "{{.State.ExitCode}}"),
            "143",
            "{id}: not stopped by its SIGTERM (137: killed at the stop timeout)"
        );
    }
    wait_for_membranes(&http, 6, "apps stopped", Duration::from_secs(1)).await;

    // Stopping the agents (all at once, as podman-compose does) deregisters all six.
    // Several containers leaving a network at once wedge Debian 12's aardvark-dns 1.4 for
    // ~20 s: the agents then reach `dns-server` at the address they last connected to.
    let agents: Vec<String> = apps.iter().map(|id| format!("{id}-agent")).collect();
    let agents: Vec<&str> = agents.iter().map(String::as_str).collect();
    let t = Instant::now();
    let stop = project.compose(&[&["stop", "-t", "8"][..], &agents].concat());
    assert!(stop.status.success(), "{}", lossy(&stop.stderr));
    for a in &agents {
        assert_eq!(
            project.inspect(a, "{{.State.ExitCode}}"),
            "0",
            "{a} did not stop cleanly on SIGTERM (137: killed at the stop timeout)"
        );
    }
    let agents_stop = t.elapsed();
    let (code, left) = http
        .call("GET", "/v1/namespaces/cognitive-system/membranes", None)
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert_eq!(
        membranes(&left),
        [],
        "still registered after the agents stopped"
    );
    for (id, ..) in COGNITIVE {
        let a = dig(project.dns_port, "A", &format!("{id}.cognitive-system"));
        assert!(a.is_empty(), "{id} still in DNS: {a:?}");
    }
    drop(project);
    eprintln!(
        "compose_example_runs_under_podman: up {up_secs:.1} s, apps stopped in {apps_stop:?}, \
         agents in {agents_stop:?}, total {:.1} s",
        started.elapsed().as_secs_f32()
    );
}
