//! `dns-server` binary.
fn main() {}
