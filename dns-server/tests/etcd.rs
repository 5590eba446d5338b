//! Replicas on a shared etcd: real `etcd` members on loopback and real `dns-server`
//! processes. Needs `etcd` on PATH (Debian: etcd-server); without it the tests print SKIP,
//! or fail when `CI=true`. Run with `cargo test -p dns-server --features etcd --test etcd
//! -- --nocapture` to see the propagation figures.

#[allow(dead_code)]
#[path = "process/harness.rs"]
mod harness;

/// Finding etcd and free ports (shared with the batcher's tests and the etcd bench).
#[allow(dead_code)]
#[path = "../src/store/etcd/member.rs"]
mod member;

mod etcd {
    mod agent_failover;
    pub mod cluster;
    mod failover;
    mod limits;
    mod liveness;
    mod propagation;
    mod unreachable;
}

/// The tests start clusters of processes: one at a time on a small machine.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
