//! End-to-end suite spanning both binaries (`dns-server` and `agent`), run as the test
//! binary `e2e` (`e2e/main.rs`): real processes on loopback, queried with `dig` and HTTP.
#![forbid(unsafe_code)]
