//! Authoritative DNS for every namespace, answered from registry snapshots.
