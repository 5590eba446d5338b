//! Deployment tests: `dns-server export --format compose|k8s` parsed as YAML, the systemd
//! units under `systemd-analyze`, the example's `run-local.sh --check`, and the web page
//! driven in headless Chromium.
//!
//! Tools that may be missing (python3 with PyYAML, systemd-analyze, chromium, dig) are
//! installed by `tests/run.sh`; without them a test prints a loud SKIP, except with CI=true
//! where it fails.

mod deploy {
    pub mod browser;
    pub mod common;
    pub mod export;
    pub mod podman;
    pub mod run_local;
    pub mod systemd;
}

#[path = "process/harness.rs"]
#[allow(dead_code)]
mod harness;
