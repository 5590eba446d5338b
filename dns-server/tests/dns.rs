//! Resolver-level tests of the authoritative DNS: real sockets on 127.0.0.1:0, answers
//! checked with hickory's parser and resolver.

#[path = "dns/common.rs"]
mod common;
#[path = "dns/conformance.rs"]
mod conformance;
#[path = "dns/export.rs"]
mod export;
#[path = "dns/resolver.rs"]
mod resolver;
#[path = "dns/rules.rs"]
mod rules;
#[path = "dns/schema.rs"]
mod schema;
