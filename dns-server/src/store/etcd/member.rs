//! Finding `etcd` and starting a single-member etcd on loopback ports: for the batcher's
//! tests, the etcd cluster tests and the etcd bench (which include this file with
//! `#[path]`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `etcd` binary: `ETCD_BIN`, else `etcd` on PATH, if installed.
pub fn etcd_bin() -> Option<PathBuf> {
    std::env::var_os("ETCD_BIN")
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::var_os("PATH").into_iter().flat_map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("etcd"))
                .collect::<Vec<_>>()
        }))
        .find(|p| p.is_file())
}

/// [`etcd_bin`] for tests: when etcd is not installed, `None` after a loud SKIP message
/// saying that `what` did not run, or a failure when `CI` is `true`.
pub fn etcd_bin_or_skip(what: &str) -> Option<PathBuf> {
    let found = etcd_bin();
    if found.is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("etcd is not installed but CI=true: apt-get install etcd-server etcd-client");
        }
        eprintln!(
            "\n################################################################\n\
             SKIP: etcd is not installed (apt-get install etcd-server):\n\
             {what} did NOT run. Set CI=true to make this fail.\n\
             ################################################################\n"
        );
    }
    found
}

/// Starts a member with default (durable) settings and its data in `dir`; returns the
/// process and its client address `HOST:PORT`. It may take a moment to answer.
pub fn spawn(bin: &Path, dir: &Path) -> (Child, String) {
    let (client, peer) = (free_port(), free_port());
    let (client_url, peer_url) = (
        format!("http://127.0.0.1:{client}"),
        format!("http://127.0.0.1:{peer}"),
    );
    let child = Command::new(bin)
        .args(["--name", "solo"])
        .args(["--data-dir", dir.join("etcd").to_str().unwrap()])
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("solo={peer_url}")])
        .args(["--logger", "zap", "--log-level", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn etcd");
    (child, format!("127.0.0.1:{client}"))
}
