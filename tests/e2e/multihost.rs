//! Across hosts, simulated with network namespaces (root and `ip` needed; loopback cannot
//! cross namespaces): the registry runs in namespace `srv`, two agents in namespaces `a`
//! and `b`, joined by veth pairs on a bridge in `srv` with 169.254.70.0/24 addresses. No
//! traffic leaves these namespaces.
//!
//! The agents find the registry by name, `registry.infra`, through a resolver in `srv` (a
//! second dns-server answering on port 53; `/etc/netns/<ns>/resolv.conf` points at it).
//! Checks: both register with their namespace's address, DNS answers it, a message is
//! relayed a -> b over TCP; then, with the resolver frozen (SIGSTOP: a container network's
//! DNS going away while containers stop), stopping agent a still deregisters it (the agent
//! falls back to the address it last connected to) and it exits promptly (no wait on the
//! hung lookup). The namespaces and their /etc/netns files are removed even on failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::harness::{Proc, bin, wait_for};

const SRV_IP: &str = "169.254.70.1";

/// The three namespaces; deleted (with their /etc/netns directories) on drop.
struct Netns {
    names: [String; 3],
}

impl Netns {
    fn create() -> Netns {
        let p = std::process::id();
        let names = [format!("mh{p}srv"), format!("mh{p}a"), format!("mh{p}b")];
        let ns = Netns { names };
        let [srv, a, b] = &ns.names;
        for n in &ns.names {
            ip(&["netns", "add", n]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        ip(&["-n", srv, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            srv,
            "addr",
            "add",
            &format!("{SRV_IP}/24"),
            "dev",
            "br0",
        ]);
        ip(&["-n", srv, "link", "set", "br0", "up"]);
        for (i, peer) in [(2, a), (3, b)] {
            // The peer end is created in `srv`, then moved into its namespace.
            let (here, there) = (format!("v{i}"), format!("v{i}p"));
            ip(&[
                "-n", srv, "link", "add", &here, "type", "veth", "peer", "name", &there,
            ]);
            ip(&["-n", srv, "link", "set", &there, "netns", peer]);
            ip(&["-n", srv, "link", "set", &here, "master", "br0", "up"]);
            ip(&[
                "-n",
                peer,
                "addr",
                "add",
                &format!("169.254.70.{i}/24"),
                "dev",
                &there,
            ]);
            ip(&["-n", peer, "link", "set", &there, "up"]);
            // `ip netns exec` mounts this over /etc/resolv.conf; a long timeout makes a
            // hung lookup obvious.
            let dir = Path::new("/etc/netns").join(peer);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("resolv.conf"),
                format!("nameserver {SRV_IP}\noptions timeout:30 attempts:1\n"),
            )
            .unwrap();
        }
        ns
    }

    /// A command run inside namespace `n`.
    fn exec(&self, n: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", n]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(n));
        }
        // Only when empty: other namespaces' files stay.
        let _ = std::fs::remove_dir("/etc/netns");
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn can_use_netns() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let ip = Command::new("ip").arg("-V").output().is_ok();
    let dig = Command::new("dig").arg("-v").output().is_ok();
    if root && ip && dig {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "multi-host test: CI needs root, ip (iproute2) and dig (tests/run.sh)"
    );
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIP agents_in_two_network_namespaces: needs root, ip and dig; NOT run ***\n"
    );
    false
}

fn spawn(mut c: Command, log: &Path) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    let child: Child = c.stdout(Stdio::null()).stderr(log).spawn().unwrap();
    Proc { child }
}

/// An `agent` subcommand against the agent whose state dir is `state` (through its control
/// socket: a Unix socket works across network namespaces).
fn agent_cli(state: &Path, args: &[&str]) -> Output {
    Command::new(bin("agent"))
        .args(args)
        .args(["--state-dir", state.to_str().unwrap()])
        .output()
        .unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn dig_in(ns: &Netns, n: &str, name: &str) -> Vec<String> {
    dig_in_port(ns, n, 5353, name)
}

#[test]
fn agents_in_two_network_namespaces() {
    if !can_use_netns() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = |p: &str| -> PathBuf { tmp.path().join(p) };
    let ns = Netns::create();
    let [srv, a, b] = ns.names.clone();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        scenario(&ns, &srv, &a, &b, &d)
    }));
    if result.is_err() {
        for log in ["registry.log", "resolver.log", "alpha.log", "beta.log"] {
            let text = std::fs::read_to_string(d(log)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(10).collect();
            eprintln!("--- {log}");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
    drop(ns);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn scenario(ns: &Netns, srv: &str, a: &str, b: &str, d: &dyn Fn(&str) -> PathBuf) {
    let dns_server = bin("dns-server");
    let agent = bin("agent");
    // The registry, reachable from the other namespaces at 169.254.70.1.
    let mut c = ns.exec(srv, &dns_server);
    c.args(["--data-dir", d("registry").to_str().unwrap()])
        .args(["--http-listen", &format!("{SRV_IP}:8765")])
        .args(["--dns-listen", &format!("{SRV_IP}:5353")])
        .args(["--insecure", "--sweep-interval", "100ms"]);
    let _registry = spawn(c, &d("registry.log"));
    // The resolver on port 53 (its HTTP API on srv's loopback), and the record it serves:
    // registry.infra -> 169.254.70.1, registered by an agent in srv.
    let mut c = ns.exec(srv, &dns_server);
    c.args(["--data-dir", d("resolver").to_str().unwrap()])
        .args(["--http-listen", "127.0.0.1:8700"])
        .args(["--dns-listen", &format!("{SRV_IP}:53")]);
    let mut resolver = spawn(c, &d("resolver.log"));
    let mut c = ns.exec(srv, &agent);
    c.args(["run", "--id", "registry", "--namespace", "infra"])
        .args(["--registry-url", "http://127.0.0.1:8700"])
        .args(["--address", SRV_IP, "--mode", "ipc"])
        .args(["--state-dir", d("rec").to_str().unwrap()]);
    let _record = spawn(c, &d("record.log"));
    wait_for(
        "registry.infra in the resolver",
        Duration::from_secs(20),
        || (dig_in_port(ns, srv, 53, "registry.infra") == [SRV_IP]).then_some(()),
    );

    // One agent per "host", registry by name, relay over TCP.
    let mut agents = Vec::new();
    for (n, id, ip) in [(a, "alpha", "169.254.70.2"), (b, "beta", "169.254.70.3")] {
        let mut c = ns.exec(n, &agent);
        c.args(["run", "--id", id, "--namespace", "multi"])
            .args(["--registry-url", "http://registry.infra:8765"])
            .args(["--service", &format!("{id}:tcp:7400")])
            .args(["--mode", "tcp", "--listen", "0.0.0.0:7400"])
            .args(["--heartbeat-interval", "1s", "--ttl", "30s"])
            .args(["--state-dir", d(id).to_str().unwrap()]);
        agents.push((spawn(c, &d(&format!("{id}.log"))), id, ip));
    }
    for (_, id, ip) in &agents {
        let state = d(id);
        wait_for(&format!("{id} registered"), Duration::from_secs(20), || {
            let s = json(&agent_cli(&state, &["status"]));
            (s["registration"]["registered"] == true).then_some(())
        });
        // The registry saw the namespace's own address; DNS answers it, in every namespace
        // (once the zone is rebuilt, just after the registration was answered).
        for n in [srv, a, b] {
            wait_for(
                &format!("{id} in DNS from {n}"),
                Duration::from_secs(10),
                || (dig_in(ns, n, &format!("{id}.multi")) == [*ip]).then_some(()),
            );
        }
        let other = if *id == "alpha" { "beta" } else { "alpha" };
        let found = json(&agent_cli(&state, &["discover", other]));
        let want = if *id == "alpha" {
            "169.254.70.3"
        } else {
            "169.254.70.2"
        };
        assert_eq!(found["membrane"]["addresses"][0], want, "{found}");
    }

    // alpha -> beta over TCP between the namespaces.
    let sent = agent_cli(&d("alpha"), &["send", "beta", "across hosts", "--wait"]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert_eq!(
        json(&sent)["status"],
        "delivered",
        "{}",
        String::from_utf8_lossy(&sent.stdout)
    );
    let got = agent_cli(&d("beta"), &["recv", "--json"]);
    let msg: Value = serde_json::from_slice(&got.stdout).unwrap_or(Value::Null);
    assert_eq!(
        msg["body"],
        "across hosts",
        "{}",
        String::from_utf8_lossy(&got.stdout)
    );
    assert_eq!(msg["from"], "alpha");

    // The resolver stops answering; SIGTERM to alpha still deregisters it, promptly.
    let freeze = |sig: &str| {
        Command::new("kill")
            .args([sig, &resolver.child.id().to_string()])
            .status()
            .unwrap()
    };
    assert!(freeze("-STOP").success());
    let (mut alpha, ..) = agents.remove(0);
    let t = Instant::now();
    let status = alpha.terminate();
    let took = t.elapsed();
    freeze("-CONT");
    assert!(status.success(), "alpha exit: {status}");
    assert!(
        took < Duration::from_secs(15),
        "alpha took {took:?} to stop: it waited for the hung name lookup"
    );
    wait_for(
        "alpha out of DNS (still registered: no deregistration without DNS?)",
        Duration::from_secs(10),
        || dig_in(ns, srv, "alpha.multi").is_empty().then_some(()),
    );
    assert_eq!(dig_in(ns, srv, "beta.multi"), ["169.254.70.3"]);
    let _ = resolver.terminate();
}

fn dig_in_port(ns: &Netns, n: &str, port: u16, name: &str) -> Vec<String> {
    let out = ns
        .exec(n, Path::new("dig"))
        .args([&format!("@{SRV_IP}"), "-p", &port.to_string()])
        .args(["+short", "+time=1", "+tries=1", "A", name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}
