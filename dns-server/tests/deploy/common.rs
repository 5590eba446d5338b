//! Helpers shared by the deployment tests.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::harness::Http;

/// The workspace root (parent of `dns-server/`).
#[allow(dead_code)] // used by the systemd and run-local tests
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// True when `CI=true`: missing tools fail instead of skipping.
pub fn on_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// `false` (after a loud SKIP line) when `available` is false outside CI; panics on CI.
pub fn require(available: bool, test: &str, what: &str) -> bool {
    if available {
        return true;
    }
    assert!(
        !on_ci(),
        "{test}: {what} is required on CI (tests/run.sh installs it)"
    );
    // Written to the stderr handle, not through eprintln!: the test harness captures the
    // latter for passing tests, and a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIP {test}: {what} is not available; this test did NOT run ***\n"
    );
    false
}

/// Whether `cmd args...` runs and exits 0.
pub fn runs(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether python3 with PyYAML is available.
pub fn have_pyyaml() -> bool {
    runs("python3", &["-c", "import yaml"])
}

/// Parses every YAML document in `text` (PyYAML's safe loader) into JSON values.
pub fn parse_yaml(text: &str) -> Vec<Value> {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml; json.dump(list(yaml.safe_load_all(sys.stdin)), sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "not valid YAML: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// One membrane of the example: (id, parent, service, port, capabilities).
pub type Example = (
    &'static str,
    Option<&'static str>,
    &'static str,
    u16,
    &'static [&'static str],
);

/// The example hierarchy.
pub const COGNITIVE: &[Example] = &[
    ("cognitive-root", None, "cognitive", 7000, &["p-system"]),
    (
        "perception",
        Some("cognitive-root"),
        "perception",
        7100,
        &["perception"],
    ),
    (
        "visual-worker-1",
        Some("perception"),
        "visual",
        7101,
        &["vision"],
    ),
    (
        "visual-worker-2",
        Some("perception"),
        "visual",
        7102,
        &["vision"],
    ),
    (
        "action",
        Some("cognitive-root"),
        "action",
        7200,
        &["planning"],
    ),
    ("motor-worker", Some("action"), "motor", 7201, &["motor"]),
];

/// Registers the example hierarchy in `cognitive-system` over HTTP.
pub async fn register_cognitive(http: &Http) {
    for (i, (id, parent, svc, port, caps)) in COGNITIVE.iter().enumerate() {
        let mut body = serde_json::json!({
            "addresses": [format!("10.0.0.{}", i + 10)],
            "services": [{"name": svc, "proto": "tcp", "port": port}],
            "capabilities": caps,
            "endpoint": {"mode": "shared-volume", "path": "/var/lib/membrane/shared"},
        });
        if let Some(p) = parent {
            body["parent"] = Value::from(*p);
        }
        let (status, v) = http
            .call(
                "PUT",
                &format!("/v1/namespaces/cognitive-system/membranes/{id}"),
                Some(&body.to_string()),
            )
            .await
            .unwrap();
        assert_eq!(status, 201, "{v}");
    }
}

/// Whether `program` is found on PATH (or is an existing path).
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", "command -v \"$1\" >/dev/null", "sh", program])
        .status()
        .is_ok_and(|s| s.success())
}

/// Makes sure `program` exists: when missing and running as root with apt-get, installs
/// Debian package `package` (loudly). Returns whether `program` is available afterwards.
pub fn ensure(program: &str, package: &str) -> bool {
    if have(program) {
        return true;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !root || !have("apt-get") {
        return false;
    }
    // One apt-get at a time (tests run in parallel threads).
    static APT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = APT.lock().unwrap_or_else(|e| e.into_inner());
    if have(program) {
        return true;
    }
    eprintln!("{program} missing: apt-get install {package}");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        install();
    }
    have(program)
}

pub use crate::harness::agent_bin;
