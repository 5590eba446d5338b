//! End-to-end: `dns-server` and `agent` processes together on loopback.

mod harness;
mod multihost;
mod restart;
mod sidecar;
