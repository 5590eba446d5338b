//! `examples/cognitive-system/run-local.sh --check`: one dns-server and six agents as
//! processes on loopback; every membrane answers SRV and A through dig, the hierarchy is
//! right, `agent discover` works (and the relay round trip once `agent send` exists).

use std::process::Command;

use super::common::{agent_bin, have, have_pyyaml, require, workspace};
use crate::harness::bin;

#[test]
fn run_local_check() {
    let tools = have("bash") && have("dig") && have("python3");
    if !require(tools, "run_local_check", "bash, dig (dnsutils) and python3") {
        return;
    }
    let script = workspace().join("examples/cognitive-system/run-local.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--check")
        .env("DNS_SERVER_BIN", bin())
        .env("AGENT_BIN", agent_bin())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(
        out.status.success(),
        "run-local.sh --check failed: {}",
        out.status
    );
    assert!(stdout.contains("CHECK OK"), "no CHECK OK");
    for id in [
        "cognitive-root",
        "perception",
        "visual-worker-1",
        "visual-worker-2",
        "action",
        "motor-worker",
    ] {
        assert!(
            stdout.contains(&format!(" {id}.cognitive-system.,")),
            "{id} not checked"
        );
    }
}

/// The example's docker-compose.yml parses and has the registry plus an app and an agent
/// sidecar for each of the six membranes (Docker itself is not needed).
#[test]
fn example_compose_and_k8s_parse() {
    if !require(
        have_pyyaml(),
        "example_compose_and_k8s_parse",
        "python3 with PyYAML (python3-yaml)",
    ) {
        return;
    }
    let dir = workspace().join("examples/cognitive-system");
    let compose = std::fs::read_to_string(dir.join("docker-compose.yml")).unwrap();
    let docs = super::common::parse_yaml(&compose);
    let services = docs[0]["services"].as_object().unwrap();
    assert!(services.contains_key("dns-server"));
    for (id, parent, ..) in super::common::COGNITIVE {
        let agent = &services[&format!("{id}-agent")];
        assert!(services.contains_key(*id), "no app container {id}");
        assert_eq!(agent["environment"]["MEMBRANE_ID"], *id);
        assert_eq!(agent["environment"]["MEMBRANE_PARENT"].as_str(), *parent);
        assert_eq!(agent["volumes"], services[*id]["volumes"]);
    }
    let mut deployments = Vec::new();
    for entry in std::fs::read_dir(dir.join("k8s")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for d in super::common::parse_yaml(&text) {
            if d["kind"] == "Deployment" {
                deployments.push(d["metadata"]["name"].as_str().unwrap().to_string());
            }
        }
    }
    deployments.sort();
    assert_eq!(
        deployments,
        [
            "action",
            "cognitive-root",
            "dns-server",
            "motor-worker",
            "perception",
            "visual-worker-1",
            "visual-worker-2"
        ]
    );
}
