//! `agent` binary.
fn main() {}
