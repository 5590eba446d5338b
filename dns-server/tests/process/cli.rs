//! The command line: exit codes, messages, and the client subcommands against a live server.

use std::process::Command;

use super::harness::{Server, bin};

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .env_remove("MEMBRANE_ADMIN_TOKEN")
        .env_remove("MEMBRANE_REGISTRY_URL")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn bad_config_exits_64_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (code, _, err) = run(&["--data-dir", d, "--http-listen", "0.0.0.0:0"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("admin token"), "{err}");
    let (code, _, err) = run(&["--data-dir", d, "--admin-token", "short"]);
    assert_eq!(code, 64, "{err}");
    let (code, _, err) = run(&["--data-dir", d, "--store", "mongodb://x"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--store"), "{err}");
    // clap's own usage errors exit 2 by default; bad flags are usage errors too.
    let (code, _, _) = run(&["--no-such-flag"]);
    assert_ne!(code, 0);
}

#[test]
fn help_explains_itself() {
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    for s in [
        "--dns-listen",
        "--http-listen",
        "--admin-token",
        "MEMBRANE_DATA_DIR",
        "namespace",
    ] {
        assert!(out.contains(s), "--help lacks {s}:\n{out}");
    }
}

#[test]
fn namespace_subcommands_against_a_live_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let url = server.url();
    let (code, out, err) = run(&[
        "namespace",
        "create",
        "cognitive-system",
        "AI cognitive architecture",
        "--url",
        &url,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("join_token"), "{out}");
    let (code, _, err) = run(&["namespace", "create", "cognitive-system", "--url", &url]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
    let (code, _, err) = run(&["namespace", "create", "Bad_Name", "--url", &url]);
    assert_eq!(code, 64, "{err}");
    let (code, out, _) = run(&["namespace", "list", "--url", &url]);
    assert_eq!(code, 0);
    assert!(out.contains("AI cognitive architecture"), "{out}");
    let (code, out, _) = run(&["status", "--url", &url]);
    assert_eq!(code, 0);
    assert!(out.contains("\"namespaces\": 1"), "{out}");
    let (code, out, _) = run(&["stats", "--url", &url]);
    assert_eq!(code, 0);
    assert!(out.contains("cognitive-system"), "{out}");
    let (code, _, _) = run(&["namespace", "delete", "cognitive-system", "--url", &url]);
    assert_eq!(code, 0);
    let (code, _, err) = run(&["namespace", "delete", "cognitive-system", "--url", &url]);
    assert_eq!(code, 1);
    assert!(err.contains("does not exist"), "{err}");
    // Unreachable server: a clear message, exit 1.
    drop(server);
    let (code, _, err) = run(&["status", "--url", &url]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the registry"), "{err}");
}
