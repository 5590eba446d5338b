//! `dns-server export --format compose|k8s` against a real server: the output parses as
//! YAML and has the registry plus an app container and an agent sidecar per membrane.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;

use super::common::{COGNITIVE, have_pyyaml, parse_yaml, register_cognitive, require};
use crate::harness::{Http, Server, bin};

fn export(server: &Server, format: &str, ns: &str, extra: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(["export", "--format", format, "--namespace", ns])
        .args(["--url", &server.url()])
        .args(extra)
        .output()
        .unwrap()
}

fn stdout_ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "export failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `env` of a compose service as a map, or of a k8s container as name/value pairs.
fn env_of(v: &Value) -> std::collections::BTreeMap<String, String> {
    match v {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect(),
        Value::Array(a) => a
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_string(),
                    e["value"].as_str().unwrap().to_string(),
                )
            })
            .collect(),
        _ => panic!("no env: {v}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_compose_and_k8s_from_the_registry() {
    if !require(
        have_pyyaml(),
        "export_compose_and_k8s",
        "python3 with PyYAML (python3-yaml)",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let http = Http::new(server.url());
    register_cognitive(&http).await;

    // docker compose
    let text = stdout_ok(export(
        &server,
        "compose",
        "cognitive-system",
        &["--image", "reg.example/membrane:1"],
    ));
    let docs = parse_yaml(&text);
    assert_eq!(docs.len(), 1);
    let services = docs[0]["services"].as_object().expect("services");
    let mut expected: BTreeSet<String> = BTreeSet::from(["dns-server".to_string()]);
    for (id, ..) in COGNITIVE {
        expected.insert(id.to_string());
        expected.insert(format!("{id}-agent"));
    }
    let got: BTreeSet<String> = services.keys().cloned().collect();
    assert_eq!(got, expected, "{text}");
    for (id, parent, svc, port, caps) in COGNITIVE {
        let agent = &services[&format!("{id}-agent")];
        assert_eq!(agent["image"], "reg.example/membrane:1");
        assert_eq!(agent["command"][0], "agent");
        let app = &services[*id];
        assert_eq!(
            app["network_mode"],
            format!("service:{id}-agent"),
            "the app shares its sidecar's network"
        );
        assert_eq!(app["init"], true, "an init forwards SIGTERM to the app");
        assert_eq!(app["depends_on"][0], format!("{id}-agent"));
        assert_eq!(agent["depends_on"][0], "dns-server");
        let env = env_of(&agent["environment"]);
        assert_eq!(env["MEMBRANE_ID"], *id);
        assert_eq!(env["MEMBRANE_NAMESPACE"], "cognitive-system");
        assert_eq!(env.get("MEMBRANE_PARENT").map(String::as_str), *parent);
        assert_eq!(env["MEMBRANE_REGISTRY_URL"], "http://dns-server:8765");
        assert_eq!(env["MEMBRANE_SERVICES"], format!("{svc}:tcp:{port}:0:10"));
        assert_eq!(env["MEMBRANE_CAPABILITIES"], caps.join(","));
        assert_eq!(env["MEMBRANE_MODE"], "shared-volume");
        let shared = &env["MEMBRANE_SHARED_DIR"];
        // The app container and its sidecar mount the same volumes.
        assert_eq!(app["volumes"], agent["volumes"]);
        let mounts: Vec<&str> = agent["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            mounts.contains(&format!("shared:{shared}").as_str()),
            "{mounts:?}"
        );
    }
    let registry = &services["dns-server"];
    assert_eq!(registry["command"][0], "dns-server");
    let volumes = docs[0]["volumes"].as_object().unwrap();
    assert!(volumes.contains_key("shared") && volumes.contains_key("registry-data"));

    // Kubernetes
    let text = stdout_ok(export(&server, "k8s", "cognitive-system", &[]));
    let docs = parse_yaml(&text);
    let kinds: Vec<(String, String)> = docs
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap().to_string(),
                d["metadata"]["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for want in [
        ("Namespace", "cognitive-system"),
        ("Deployment", "dns-server"),
        ("Service", "dns-server"),
        ("PersistentVolumeClaim", "dns-server-data"),
    ] {
        assert!(
            kinds.contains(&(want.0.into(), want.1.into())),
            "{want:?} missing: {kinds:?}"
        );
    }
    for (id, parent, ..) in COGNITIVE {
        let d = docs
            .iter()
            .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == *id)
            .unwrap_or_else(|| panic!("no Deployment {id}"));
        assert_eq!(d["metadata"]["namespace"], "cognitive-system");
        let spec = &d["spec"]["template"]["spec"];
        let names: Vec<&str> = spec["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["app", "agent"]);
        let agent = &spec["containers"][1];
        let env = env_of(&agent["env"]);
        assert_eq!(env["MEMBRANE_ID"], *id);
        assert_eq!(env.get("MEMBRANE_PARENT").map(String::as_str), *parent);
        assert_eq!(spec["containers"][0]["volumeMounts"], agent["volumeMounts"]);
        // Selector matches the pod template's labels.
        let sel = d["spec"]["selector"]["matchLabels"].as_object().unwrap();
        for (k, v) in sel {
            assert_eq!(&d["spec"]["template"]["metadata"]["labels"][k], v);
        }
        let vols: Vec<&str> = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(vols, ["shared", "agent-state"]);
    }
    // --shared-claim puts every pod on one ReadWriteMany claim.
    let text = stdout_ok(export(
        &server,
        "k8s",
        "cognitive-system",
        &["--shared-claim", "membrane-shared"],
    ));
    let docs = parse_yaml(&text);
    let claims = docs
        .iter()
        .filter(|d| d["kind"] == "Deployment")
        .filter(|d| {
            d["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
                == "membrane-shared"
        })
        .count();
    assert_eq!(claims, COGNITIVE.len());

    // An unknown namespace is an error, not an empty manifest.
    let out = export(&server, "compose", "no-such-ns", &[]);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.stdout.is_empty());
}

/// The checked-in `examples/cognitive-system/docker-compose.yml` and
/// `k8s/cognitive-system.yaml` are exactly what the exporter makes of the example
/// hierarchy. `UPDATE_EXAMPLES=1 cargo test -p dns-server --test deploy examples_are_` rewrites
/// them after a change to the exporter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_are_the_exporter_output() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let http = Http::new(server.url());
    register_cognitive(&http).await;
    let example = super::common::workspace().join("examples/cognitive-system");
    let update = std::env::var_os("UPDATE_EXAMPLES").is_some();
    for (format, file) in [
        ("compose", "docker-compose.yml"),
        ("k8s", "k8s/cognitive-system.yaml"),
    ] {
        let text = stdout_ok(export(&server, format, "cognitive-system", &[]));
        let path = example.join(file);
        if update {
            std::fs::write(&path, &text).unwrap();
            continue;
        }
        let checked_in = std::fs::read_to_string(&path).unwrap();
        assert!(
            checked_in == text,
            "{} is not the exporter's output; regenerate it with UPDATE_EXAMPLES=1 \
             cargo test -p dns-server --test deploy examples_are_the_exporter_output",
            path.display()
        );
    }
}
