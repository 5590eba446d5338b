//! Process tests of the `agent` binary, one test binary: the real `dns-server` on port 0,
//! agents started as processes, signals, restarts and the cache.
//!
//! `dns-server` is found through `DNS_SERVER_BIN`, else beside this package's `agent`
//! binary in the target directory, else built there with `cargo build -p dns-server`.

#[path = "cli/support.rs"]
mod support;

#[path = "cli/lifecycle.rs"]
mod lifecycle;

#[path = "cli/cache.rs"]
mod cache;

#[path = "cli/usage.rs"]
mod usage;

#[path = "cli/relay.rs"]
mod relay;

#[path = "cli/relay_security.rs"]
mod relay_security;

#[path = "cli/recv_bad_files.rs"]
mod recv_bad_files;

#[path = "cli/tls.rs"]
mod tls;
