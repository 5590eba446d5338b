//! Real `etcd` members on loopback ports in a temporary directory, and `dns-server`
//! replicas on them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use serde_json::Value;

use crate::harness::{Http, Server};
use crate::member::{self, free_port};

/// The `etcd` binary, or `None` (after a loud SKIP message) when it is not installed and
/// `CI` is not `true`. With `CI=true` a missing etcd fails the test.
pub fn etcd_bin() -> Option<PathBuf> {
    member::etcd_bin_or_skip("the etcd replica tests")
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// An etcd cluster of real processes.
pub struct Cluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    members: Vec<Member>,
    token: String,
}

impl Cluster {
    /// Starts `n` members and waits until the cluster answers.
    pub async fn start(bin: PathBuf, n: usize) -> Cluster {
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                child: None,
            })
            .collect();
        let mut c = Cluster {
            bin,
            dir: tempfile::tempdir().unwrap(),
            members,
            token: format!("t{}", std::process::id()) + &free_port().to_string(),
        };
        for i in 0..n {
            c.spawn(i);
        }
        c.wait_healthy().await;
        c
    }

    fn spawn(&mut self, i: usize) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect();
        let m = &self.members[i];
        let data = self.dir.path().join(&m.name);
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .unwrap();
        let child = Command::new(&self.bin)
            .args(["--name", &m.name])
            .args(["--data-dir", data.to_str().unwrap()])
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{}", m.client),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{}", m.client),
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer),
            ])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            // Elections take a second of silence from the leader: a loaded 2-core CI
            // machine (three members fsyncing to one disk) can stall one for half that.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            // The default from etcd 3.5 on: a member that returns does not depose a
            // healthy leader by calling an election before it hears from it.
            .args(["--pre-vote=true"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.members[i].child = Some(child);
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts member `i` on its data directory.
    pub async fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_healthy().await;
    }

    /// `HOST:PORT` of the members `which`, comma-separated (the `etcd://` list).
    pub fn endpoints(&self, which: &[usize]) -> String {
        which
            .iter()
            .map(|&i| format!("127.0.0.1:{}", self.members[i].client))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every member's `HOST:PORT`.
    pub fn all(&self) -> String {
        self.endpoints(&(0..self.members.len()).collect::<Vec<_>>())
    }

    /// A client on the running members.
    pub async fn client(&self) -> etcd_client::Client {
        let eps: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect();
        etcd_client::Client::connect(eps, None).await.unwrap()
    }

    /// The keys under `prefix` in etcd.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let resp = self
            .client()
            .await
            .get(
                prefix,
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_keys_only(),
                ),
            )
            .await
            .unwrap();
        resp.kvs()
            .iter()
            .map(|k| k.key_str().unwrap().to_string())
            .collect()
    }

    async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = async {
                let mut c = self.client().await;
                tokio::time::timeout(Duration::from_secs(1), c.get("health-probe", None))
                    .await
                    .ok()?
                    .ok()
            }
            .await;
            // Every running member must answer (a restarted one has caught up).
            let mut all = ok.is_some();
            for m in self.members.iter().filter(|m| m.child.is_some()) {
                let one = async {
                    let mut c = etcd_client::Client::connect(
                        [format!("http://127.0.0.1:{}", m.client)],
                        None,
                    )
                    .await
                    .ok()?;
                    tokio::time::timeout(Duration::from_secs(1), c.get("health-probe", None))
                        .await
                        .ok()?
                        .ok()
                }
                .await;
                all &= one.is_some();
            }
            if all {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd cluster did not become healthy; logs in {}",
                self.dir.path().display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// A `dns-server` replica on etcd.
pub struct Replica {
    pub server: Server,
    pub http: Http,
    _dir: tempfile::TempDir,
}

impl Replica {
    /// Starts a replica on `endpoints` and waits until its copy is loaded and its watch
    /// connected.
    pub async fn start(endpoints: &str, extra: &[&str]) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let store = format!("etcd://{endpoints}");
        let mut args = vec!["--store", &store, "--sweep-interval", "100ms"];
        args.extend_from_slice(extra);
        let server = Server::start(dir.path(), &args);
        let http = Http::new(server.url());
        let r = Replica {
            server,
            http,
            _dir: dir,
        };
        r.wait_status(|s| s["store"]["reachable"] == true, Duration::from_secs(20))
            .await;
        r
    }

    pub fn dns(&self) -> SocketAddr {
        self.server.dns
    }

    pub async fn status(&self) -> Value {
        self.http.call("GET", "/status", None).await.unwrap().1
    }

    /// Waits until `/status` satisfies `f`.
    pub async fn wait_status(&self, f: impl Fn(&Value) -> bool, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok((200, s)) = self.http.call("GET", "/status", None).await
                && f(&s)
            {
                return;
            }
            assert!(Instant::now() < deadline, "status never matched");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The state (`passing`/`stale`) of a membrane, or `None` when not registered.
    pub async fn state(&self, ns: &str, id: &str) -> Option<String> {
        let (code, v) = self
            .http
            .call("GET", &format!("/v1/namespaces/{ns}/membranes/{id}"), None)
            .await
            .unwrap();
        (code == 200).then(|| v["state"].as_str().unwrap().to_string())
    }

    /// Ids registered in `ns`, sorted.
    pub async fn ids(&self, ns: &str) -> Vec<String> {
        let (code, v) = self
            .http
            .call("GET", &format!("/v1/namespaces/{ns}/membranes"), None)
            .await
            .unwrap();
        assert_eq!(code, 200, "{v}");
        let mut ids: Vec<String> = v["membranes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    }
}

/// Whether `name` has an A record in the replica's DNS (one UDP query).
pub async fn dns_has_a(addr: SocketAddr, name: &str) -> bool {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let q = m.to_vec().unwrap();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&q, addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => {
            let r = Message::from_vec(&buf[..n]).unwrap();
            r.metadata.response_code == ResponseCode::NoError && !r.answers.is_empty()
        }
        _ => false,
    }
}

/// Polls until `f` is true; panics with `what` after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A registration body.
pub fn body(i: usize, ttl: u32, eviction: u32) -> String {
    format!(
        r#"{{"addresses":["10.1.{}.{}"],"services":[{{"name":"web","proto":"tcp","port":80}}],"ttl_seconds":{ttl},"eviction_seconds":{eviction}}}"#,
        (i >> 8) & 255,
        i & 255
    )
}

/// What an agent with `--registry-url A,B` does: each request goes to the first replica
/// that answers (connection refused or a 503 moves on to the next).
pub struct Failover(pub Vec<Http>);

impl Failover {
    pub async fn call(&self, method: &str, path: &str, body: Option<&str>) -> (usize, u16, Value) {
        let mut last = String::new();
        for (i, h) in self.0.iter().enumerate() {
            match h.call(method, path, body).await {
                Ok((503, v)) => last = v.to_string(),
                Ok((code, v)) => return (i, code, v),
                Err(e) => last = e,
            }
        }
        panic!("no replica answered {method} {path}: {last}");
    }
}
