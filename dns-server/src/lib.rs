//! `dns-server`: the central membrane registry.
//!
//! Keeps namespaces and registered membranes on a durable embedded store, tracks their
//! heartbeats, answers DNS per namespace and serves the HTTP admin API.
#![forbid(unsafe_code)]

pub mod dns;
pub mod metrics;
pub mod registry;
pub mod snapshot;
pub mod store;
