//! `TryFrom` validation tests, without a process (assumes no `MEMBRANE_*` variables are set
//! in the test environment).

use clap::Parser;

use super::*;
use crate::cli::{Cli, Command};

fn run_args(extra: &[&str]) -> RunArgs {
    let mut argv = vec!["agent", "run", "--state-dir", "/tmp/agent-test-state"];
    argv.extend_from_slice(extra);
    match Cli::try_parse_from(argv).unwrap().command {
        Command::Run(a) => *a,
        other => panic!("{other:?}"),
    }
}

fn ok(extra: &[&str]) -> RunConfig {
    let base = [
        "--id",
        "Worker-1",
        "--namespace",
        "cog",
        "--registry-url",
        "http://127.0.0.1:8765",
    ];
    let mut all: Vec<&str> = base.to_vec();
    all.extend_from_slice(extra);
    RunConfig::try_from(run_args(&all)).unwrap()
}

fn err(args: &[&str]) -> String {
    RunConfig::try_from(run_args(args)).unwrap_err().to_string()
}

const BASE: [&str; 6] = [
    "--id",
    "w",
    "--namespace",
    "cog",
    "--registry-url",
    "http://r:1",
];

fn with(extra: &[&str]) -> Vec<&'static str> {
    let mut v: Vec<&'static str> = BASE.to_vec();
    for e in extra {
        v.push(Box::leak(e.to_string().into_boxed_str()));
    }
    v
}

#[test]
fn full_configuration() {
    let c = ok(&[
        "--parent",
        "perception",
        "--registry-url",
        "http://10.0.0.2:8765,http://10.0.0.3:8765",
        "--service",
        "visual:tcp:7100",
        "--service",
        "stats:udp:7101:1:50",
        "--address",
        "10.0.0.7",
        "--address",
        "fd00::7",
        "--capability",
        "vision",
        "--tag",
        "gpu",
        "--meta",
        "version=1.2",
        "--heartbeat-interval",
        "5s",
        "--ttl",
        "20s",
    ]);
    assert_eq!(c.id.as_str(), "worker-1");
    assert_eq!(c.registry_urls.len(), 3);
    assert_eq!(c.registration.services.len(), 2);
    assert_eq!(c.registration.services[1].weight, 50);
    assert_eq!(c.registration.addresses.len(), 2);
    assert_eq!(
        c.registration.parent.as_ref().unwrap().as_str(),
        "perception"
    );
    assert_eq!(c.registration.metadata["version"], "1.2");
    assert_eq!(c.registration.ttl_seconds, Some(20));
    assert_eq!(c.heartbeat_interval, Duration::from_secs(5));
    assert_eq!(
        c.registration.endpoint,
        Some(Endpoint::SharedVolume {
            path: c.state_dir.join("shared").to_string_lossy().into_owned()
        }),
        "the default shared dir is under the state dir (writable, never another deployment's)"
    );
    let l = c.lifecycle();
    assert_eq!(l.min_backoff, Duration::from_secs(1));
    assert_eq!(
        l.state_dir.as_deref(),
        Some(Path::new("/tmp/agent-test-state"))
    );
}

#[test]
fn missing_id_and_namespace_name_the_flag() {
    let e = err(&["--namespace", "cog", "--registry-url", "http://r:1"]);
    assert!(e.contains("--id") && e.contains("MEMBRANE_ID"), "{e}");
    let e = err(&["--id", "w", "--registry-url", "http://r:1"]);
    assert!(
        e.contains("--namespace") && e.contains("MEMBRANE_NAMESPACE"),
        "{e}"
    );
    let e = err(&["--id", "w", "--namespace", "cog"]);
    assert!(e.contains("--registry-url"), "{e}");
}

#[test]
fn invalid_values_name_the_flag() {
    for (extra, flag, needle) in [
        (vec!["--id", "bad_id"], "--id", "'_'"),
        (vec!["--namespace=-x"], "--namespace", "start or end"),
        (vec!["--parent", "a.b"], "--parent", "'.'"),
        (vec!["--parent", "w"], "--parent", "own parent"),
        (
            vec!["--registry-url", "https://r"],
            "--registry-ca",
            "https",
        ),
        (
            vec!["--service", "visual:tcp"],
            "--service",
            "NAME:PROTO:PORT",
        ),
        (
            vec!["--service", "visual:sctp:1"],
            "--service",
            "tcp or udp",
        ),
        (vec!["--service", "visual:tcp:0"], "--service", "1-65535"),
        (
            vec!["--service", "v:tcp:1", "--service", "v:tcp:1"],
            "--service",
            "duplicate",
        ),
        (vec!["--address", "10.0.0"], "--address", "not an IPv4"),
        (vec!["--address", "0.0.0.0"], "--address", "unicast"),
        (vec!["--capability", "has space"], "--capability", "' '"),
        (vec!["--tag", "UPPER_"], "--tag", "'_'"),
        (vec!["--meta", "novalue"], "--meta", "KEY=VALUE"),
        (vec!["--meta", "bad key=v"], "--meta", "keys are"),
        (
            vec!["--heartbeat-interval", "soon"],
            "--heartbeat-interval",
            "not a duration",
        ),
        (
            vec!["--heartbeat-interval", "30s"],
            "--heartbeat-interval",
            "shorter than --ttl",
        ),
        (vec!["--ttl", "1500ms"], "--ttl", "whole seconds"),
        (vec!["--ttl", "0s"], "--ttl", "more than zero"),
        (vec!["--token", "two words"], "--token", "printable"),
        (vec!["--shared-dir", "rel"], "--shared-dir", "absolute"),
        (vec!["--mode", "tcp"], "--listen", "needs --listen"),
        (
            vec!["--mode", "tcp", "--listen", "nohost"],
            "--listen",
            "HOST:PORT",
        ),
        (
            vec!["--mode", "ipc", "--listen", "rel.sock"],
            "--listen",
            "absolute",
        ),
    ] {
        let e = err(&with(&extra));
        assert!(e.starts_with(flag), "{extra:?}: {e}");
        assert!(e.contains(needle), "{extra:?}: {e}");
    }
}

#[test]
fn endpoints_per_mode() {
    let c = ok(&["--mode", "ipc"]);
    assert_eq!(
        c.registration.endpoint,
        Some(Endpoint::Ipc {
            path: "/tmp/agent-test-state/messages.sock".into()
        })
    );
    let c = ok(&["--mode", "tcp", "--listen", "10.0.0.7:7000"]);
    assert_eq!(
        c.registration.endpoint,
        Some(Endpoint::Tcp {
            address: "10.0.0.7:7000".into()
        })
    );
    assert_eq!(c.tcp_port_on_route, None);
    let c = ok(&["--mode", "tcp", "--listen", "0.0.0.0:7000"]);
    assert_eq!(c.tcp_port_on_route, Some(7000));
    let c = ok(&["--mode", "tcp", "--listen", "host-a:7000"]);
    assert_eq!(
        c.registration.endpoint,
        Some(Endpoint::Tcp {
            address: "host-a:7000".into()
        })
    );
}

#[test]
fn empty_token_means_none() {
    assert_eq!(ok(&["--token", ""]).token, None);
    assert_eq!(ok(&["--token", "abc"]).token.as_deref(), Some("abc"));
}

#[test]
fn default_state_dir_order() {
    let id = MembraneId::new("w1").unwrap();
    let env = |sd: Option<&str>, xdg: Option<&str>| {
        let sd = sd.map(OsString::from);
        let xdg = xdg.map(OsString::from);
        move |k: &str| match k {
            "STATE_DIRECTORY" => sd.clone(),
            "XDG_RUNTIME_DIR" => xdg.clone(),
            _ => None,
        }
    };
    assert_eq!(
        default_state_dir(
            Some(&id),
            env(Some("/sd/a:/sd/b"), Some("/run/user/1")),
            |_| true
        )
        .unwrap(),
        PathBuf::from("/sd/a")
    );
    assert_eq!(
        default_state_dir(Some(&id), env(None, Some("/run/user/1")), |_| true).unwrap(),
        PathBuf::from("/var/lib/membrane/agent/w1")
    );
    assert_eq!(
        default_state_dir(Some(&id), env(None, Some("/run/user/1")), |_| false).unwrap(),
        PathBuf::from("/run/user/1/membrane/w1")
    );
    let e = default_state_dir(Some(&id), env(None, None), |_| false).unwrap_err();
    assert!(e.to_string().starts_with("--state-dir"), "{e}");
    let e = default_state_dir(None, env(None, None), |_| true).unwrap_err();
    assert!(e.to_string().contains("--id"), "{e}");
}

#[test]
fn local_and_query_configs() {
    let cli = Cli::try_parse_from([
        "agent",
        "list",
        "--service",
        "visual",
        "--capability",
        "vision",
        "--state-dir",
        "/tmp/x",
        "--namespace",
        "cog",
        "--registry-url",
        "http://r:1",
    ])
    .unwrap();
    let Command::List(a) = cli.command else {
        panic!()
    };
    let c = ListConfig::try_from(a).unwrap();
    assert_eq!(c.service.unwrap().as_str(), "visual");
    assert_eq!(c.query.local.state_dir, PathBuf::from("/tmp/x"));
    assert_eq!(c.query.registry_urls.len(), 1);
    let cli = Cli::try_parse_from([
        "agent",
        "list",
        "--service",
        "bad_svc",
        "--state-dir",
        "/tmp/x",
    ])
    .unwrap();
    let Command::List(a) = cli.command else {
        panic!()
    };
    assert!(
        ListConfig::try_from(a)
            .unwrap_err()
            .to_string()
            .starts_with("--service")
    );
    let cli =
        Cli::try_parse_from(["agent", "discover", "Bad.Id", "--state-dir", "/tmp/x"]).unwrap();
    let Command::Discover(a) = cli.command else {
        panic!()
    };
    assert!(DiscoverConfig::try_from(a).is_err());
}

#[test]
fn register_parent_choices() {
    let parse = |args: &[&str]| {
        let mut argv = vec!["agent", "register", "--state-dir", "/tmp/x"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Register(a) => RegisterConfig::try_from(a),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(parse(&[]).unwrap().parent, None);
    assert_eq!(parse(&["--no-parent"]).unwrap().parent, Some(None));
    assert_eq!(
        parse(&["--parent", "Root"]).unwrap().parent,
        Some(Some(MembraneId::new("root").unwrap()))
    );
    assert!(
        parse(&["--parent", "a b"])
            .unwrap_err()
            .to_string()
            .starts_with("--parent")
    );
    assert!(Cli::try_parse_from(["agent", "register", "--parent", "a", "--no-parent"]).is_err());
}

#[test]
fn token_over_plain_http_off_loopback_needs_insecure_and_https_needs_a_ca() {
    use crate::config::registry_tls;
    use crate::url::RegistryUrl;
    let off: Vec<RegistryUrl> = vec!["http://10.0.0.1:1".parse().unwrap()];
    let e = registry_tls(&off, Some("t"), None, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("in clear") && e.contains("--insecure"), "{e}");
    assert!(registry_tls(&off, Some("t"), None, true).unwrap().is_none());
    assert!(registry_tls(&off, None, None, false).unwrap().is_none());
    let lo: Vec<RegistryUrl> = vec!["http://localhost:1".parse().unwrap()];
    assert!(registry_tls(&lo, Some("t"), None, false).is_ok());
    let https: Vec<RegistryUrl> = vec!["https://r:1".parse().unwrap()];
    let e = registry_tls(&https, Some("t"), None, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--registry-ca"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("ca.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let e = registry_tls(&https, Some("t"), Some(&junk), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no PEM certificate"), "{e}");
}
