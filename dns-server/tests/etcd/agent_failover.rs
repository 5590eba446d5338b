//! A real `agent run` given both replicas (`--registry-url A,B`): when replica A is killed
//! it moves to B, its heartbeats keep the membrane passing there (past several TTLs), and
//! on SIGTERM it deregisters through B.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::cluster::{Cluster, Replica, dns_has_a, etcd_bin, eventually};

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_fails_over_to_b_and_deregisters_there() {
    let _serial = crate::SERIAL.lock().await;
    let Some(etcd) = etcd_bin() else { return };
    let agent = crate::harness::agent_bin();
    let cluster = Cluster::start(etcd, 3).await;
    let a = Replica::start(&cluster.all(), &[]).await;
    let b = Replica::start(&cluster.all(), &[]).await;
    let state = tempfile::tempdir().unwrap();
    let log = tempfile::tempdir().unwrap();
    let mut child = Agent(
        Command::new(agent)
            .args(["run", "--id", "af-1", "--namespace", "af"])
            .args([
                "--registry-url",
                &format!("{},{}", a.server.url(), b.server.url()),
            ])
            .args(["--address", "10.0.0.9", "--service", "visual:tcp:7100"])
            .args(["--heartbeat-interval", "300ms", "--ttl", "2s"])
            .args(["--state-dir", state.path().to_str().unwrap()])
            .env("MEMBRANE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log.path().join("agent.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    eventually(
        "registered and passing on both",
        Duration::from_secs(10),
        || async {
            a.state("af", "af-1").await.as_deref() == Some("passing")
                && b.state("af", "af-1").await.as_deref() == Some("passing")
        },
    )
    .await;

    a.server.kill9();
    // Four TTLs later the membrane is still passing on B: the heartbeats reached B (without
    // them the liveness lease expires after one TTL and B marks it stale).
    for _ in 0..16 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(b.state("af", "af-1").await.as_deref(), Some("passing"));
    }
    assert!(dns_has_a(b.dns(), "af-1.af.").await);

    // SIGTERM: the agent deregisters through B and exits cleanly.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::task::spawn_blocking(move || child.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "agent exit: {status}");
    assert_eq!(b.state("af", "af-1").await, None);
    // DNS follows the zone rebuild after the answer.
    eventually(
        "af-1 gone from B's DNS",
        Duration::from_secs(10),
        || async { !dns_has_a(b.dns(), "af-1.af.").await },
    )
    .await;
}
