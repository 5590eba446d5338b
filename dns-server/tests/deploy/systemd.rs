//! `systemd/*.service` under `systemd-analyze verify` (with ExecStart= pointing at the built
//! binaries, since verify checks that the command exists) and `systemd-analyze security
//! --offline=true` (exposure score; the units must stay well hardened).

use std::path::Path;
use std::process::Command;

use super::common::{agent_bin, ensure, require, workspace};
use crate::harness::bin;

/// Copies the units into `dir` with ExecStart= rewritten to the built binaries.
fn staged_units(dir: &Path) {
    let src = workspace().join("systemd");
    for (unit, from, to) in [
        (
            "dns-server.service",
            "/usr/local/bin/dns-server",
            bin().to_string(),
        ),
        (
            "agent@.service",
            "/usr/local/bin/agent",
            agent_bin().display().to_string(),
        ),
    ] {
        let text = std::fs::read_to_string(src.join(unit)).unwrap();
        let exec = format!("ExecStart={from}");
        assert!(text.contains(&exec), "{unit}: expected {exec}");
        std::fs::write(
            dir.join(unit),
            text.replace(&exec, &format!("ExecStart={to}")),
        )
        .unwrap();
    }
}

fn directives(unit: &str) -> Vec<String> {
    let text = std::fs::read_to_string(workspace().join("systemd").join(unit)).unwrap();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .map(String::from)
        .collect()
}

#[test]
fn units_declare_notify_state_and_least_privilege() {
    let server = directives("dns-server.service");
    for want in [
        "Type=notify",
        "DynamicUser=yes",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "EnvironmentFile=-/etc/membrane/dns-server.env",
        "ProtectSystem=strict",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "MemoryDenyWriteExecute=yes",
    ] {
        assert!(
            server.iter().any(|l| l == want),
            "dns-server.service lacks {want}"
        );
    }
    assert!(
        server
            .iter()
            .any(|l| l.starts_with("StateDirectory=membrane"))
    );
    let agent = directives("agent@.service");
    for want in [
        "Type=notify",
        "EnvironmentFile=/etc/membrane/%i.env",
        "CapabilityBoundingSet=",
        "ProtectSystem=strict",
        "StateDirectory=membrane/agent/%i membrane/shared",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    ] {
        assert!(
            agent.iter().any(|l| l == want),
            "agent@.service lacks {want}"
        );
    }
    assert!(agent.iter().any(|l| l.starts_with("WatchdogSec=")));
    // One open-file limit (soft = hard: setrlimit is filtered by @resources) with room for
    // the default connection caps (HTTP 4096 + DNS-over-TCP 1024 per address).
    for (name, unit) in [("dns-server.service", &server), ("agent@.service", &agent)] {
        let limit: Vec<u64> = unit
            .iter()
            .filter_map(|l| l.strip_prefix("LimitNOFILE="))
            .map(|v| v.parse().expect("LimitNOFILE= is one number"))
            .collect();
        assert!(
            matches!(limit[..], [n] if n >= 8192),
            "{name}: LimitNOFILE= {limit:?}"
        );
    }
    assert!(
        !agent
            .iter()
            .any(|l| l.starts_with("AmbientCapabilities=CAP"))
    );
}

#[test]
fn systemd_analyze_verify_and_security() {
    if !require(
        ensure("systemd-analyze", "systemd"),
        "systemd_analyze_verify_and_security",
        "systemd-analyze (Debian package systemd)",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    staged_units(dir.path());
    let out = Command::new("systemd-analyze")
        .args([
            "verify",
            "--man=no",
            "dns-server.service",
            "agent@perception.service",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("systemd-analyze verify: {}\n{stderr}", out.status);
    assert!(out.status.success(), "verify failed:\n{stderr}");
    // verify exits 0 on unknown keys or bad values ("..., ignoring"): treat any complaint
    // about our units as a failure.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            l.contains("dns-server.service") || l.contains("agent@") || l.contains("ignoring")
        })
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify complained:\n{}",
        complaints.join("\n")
    );

    for unit in ["dns-server.service", "agent@perception.service"] {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager", unit])
            .current_dir(dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| {
                panic!(
                    "no exposure score for {unit}: {text}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        eprintln!("{}", line.trim());
        let score: f64 = line
            .split(':')
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("cannot read the score: {line}"));
        // 0 = fully locked down, 10 = unprotected; the README records the current values
        // (1.4 and 1.2). Anything above 2.0 is a hardening regression.
        assert!(score <= 2.0, "{unit}: exposure {score} > 2.0\n{text}");
    }
}
