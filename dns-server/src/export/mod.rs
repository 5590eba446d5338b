//! `dns-server export --format compose|k8s`: deployment manifests generated from what is
//! registered in a namespace.
//!
//! Each membrane becomes an application container (a placeholder until replaced by the real
//! image) plus an `agent` sidecar configured through `MEMBRANE_*` variables to register the
//! same id, parent, services and capabilities. The registry itself (`dns-server`) is part of
//! the output. Rendering is pure (no I/O) so it is unit-tested; the YAML is emitted by
//! [`yaml`] with every string scalar quoted.

pub mod yaml;

use shared::model::{Endpoint, MembraneView};
use yaml::{Yaml, map, s, strs};

/// Where the shared volume is mounted in every container (the Maildir root of the relay).
pub const SHARED_DIR: &str = "/var/lib/membrane/shared";
/// Where the agent keeps its state (control socket, cache); shared with the app container.
pub const AGENT_STATE_DIR: &str = "/var/lib/membrane/agent";
/// Registry data directory in the dns-server container.
pub const REGISTRY_DATA_DIR: &str = "/var/lib/membrane/registry";
/// HTTP admin API port in the generated deployments.
pub const HTTP_PORT: u16 = 8765;
/// DNS port in the generated deployments (unprivileged, so the non-root image can bind it).
pub const DNS_PORT: u16 = 5353;
/// Default image holding both binaries (`examples/cognitive-system/Dockerfile`).
pub const DEFAULT_IMAGE: &str = "membrane:latest";
/// User and group id of the non-root user in that image.
pub const IMAGE_UID: i64 = 10001;

/// What to generate around the registered membranes.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Namespace exported.
    pub namespace: String,
    /// Image with `dns-server` and `agent`.
    pub image: String,
    /// Image of the application containers; `None`: the same image running a placeholder.
    pub app_image: Option<String>,
    /// Kubernetes only: an existing ReadWriteMany claim for the shared volume, so that every
    /// pod sees the same Maildir root; `None`: an `emptyDir` per pod.
    pub shared_claim: Option<String>,
}

impl ExportOptions {
    /// Defaults for namespace `ns`.
    pub fn new(ns: &str) -> Self {
        ExportOptions {
            namespace: ns.to_string(),
            image: DEFAULT_IMAGE.to_string(),
            app_image: None,
            shared_claim: None,
        }
    }
}

fn registry_url() -> String {
    format!("http://dns-server:{HTTP_PORT}")
}

/// The `MEMBRANE_*` environment of a membrane's agent, in a stable order. Raw: the
/// manifests pass the values through [`literal`].
pub fn agent_env(m: &MembraneView, ns: &str) -> Vec<(String, String)> {
    let r = &m.registration;
    let mut env = vec![
        ("MEMBRANE_ID".to_string(), m.id.to_string()),
        ("MEMBRANE_NAMESPACE".to_string(), ns.to_string()),
    ];
    if let Some(p) = &r.parent {
        env.push(("MEMBRANE_PARENT".into(), p.to_string()));
    }
    env.push(("MEMBRANE_REGISTRY_URL".into(), registry_url()));
    let services: Vec<String> = r
        .services
        .iter()
        .map(|sv| {
            format!(
                "{}:{}:{}:{}:{}",
                sv.name,
                sv.proto.as_str(),
                sv.port,
                sv.priority,
                sv.weight
            )
        })
        .collect();
    // Empty lists are left out rather than set to "".
    if !services.is_empty() {
        env.push(("MEMBRANE_SERVICES".into(), services.join(",")));
    }
    if !r.capabilities.is_empty() {
        let caps: Vec<&str> = r.capabilities.iter().map(|c| c.as_str()).collect();
        env.push(("MEMBRANE_CAPABILITIES".into(), caps.join(",")));
    }
    if !r.tags.is_empty() {
        let tags: Vec<&str> = r.tags.iter().map(|c| c.as_str()).collect();
        env.push(("MEMBRANE_TAGS".into(), tags.join(",")));
    }
    let mode = r
        .endpoint
        .as_ref()
        .map(Endpoint::mode)
        .unwrap_or("shared-volume");
    env.push(("MEMBRANE_MODE".into(), mode.into()));
    env.push(("MEMBRANE_SHARED_DIR".into(), SHARED_DIR.into()));
    env.push(("MEMBRANE_STATE_DIR".into(), AGENT_STATE_DIR.into()));
    if let Some(Endpoint::Tcp { address }) = &r.endpoint {
        // Listen on every interface of the container at the port it advertised.
        let port = address.rsplit_once(':').map(|(_, p)| p).unwrap_or("7000");
        env.push(("MEMBRANE_LISTEN".into(), format!("0.0.0.0:{port}")));
    }
    env
}

/// `agent run` plus one `--meta KEY=VALUE` per metadata entry (no environment variable
/// carries metadata). Raw: the manifests pass it through [`literal`].
fn agent_command(m: &MembraneView) -> Vec<String> {
    let mut cmd = vec!["agent".to_string(), "run".to_string()];
    for (k, v) in &m.registration.metadata {
        cmd.push("--meta".into());
        cmd.push(format!("{k}={v}"));
    }
    cmd
}

/// `v` with every `$` doubled, for a string that comes from a registration (metadata
/// values, the TCP endpoint address): docker compose interpolates `$VAR` and `${VAR}` in
/// every value of the file, quoted or not, and kubelet expands `$(VAR)` in a container's
/// `command` and `env` values from the container's environment; both read `$$` as a
/// literal `$`. Registered text thus reaches the agent as registered, never as one of the
/// operator's variables (`${AWS_SECRET_ACCESS_KEY}`) or an error (`${X:?boom}`), while the
/// file's own `${MEMBRANE_HTTP_PORT:-8765}` are left to interpolation. Every `$` rather
/// than only `$(` for kubelet too: it reduces any `$$` to `$`, so a registered `$$(X)`
/// escaped as `$$$(X)` would still expand `X`.
fn literal(v: &str) -> String {
    v.replace('$', "$$")
}

fn app_command(opts: &ExportOptions) -> Option<Yaml> {
    // The placeholder only when the app image is ours; a real image keeps its own command.
    opts.app_image
        .is_none()
        .then(|| strs(["sleep", "infinity"]))
}

fn sorted(membranes: &[MembraneView]) -> Vec<&MembraneView> {
    let mut v: Vec<&MembraneView> = membranes.iter().collect();
    v.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
    v
}

fn header(kind: &str, opts: &ExportOptions, n: usize) -> String {
    format!(
        "# {kind} for namespace {ns:?}: the registry and {n} membrane(s), each an application\n\
         # container plus an `agent` sidecar. Generated by:\n\
         #   dns-server export --format {fmt} --namespace {ns}\n\
         # The application containers are placeholders (`sleep infinity` in the membrane\n\
         # image) unless --app-image is given: replace them with the real membranes.\n\
         {extra}",
        extra = if kind == "docker compose" {
            "# Published on 127.0.0.1: HTTP ${MEMBRANE_HTTP_PORT:-8765}, DNS ${MEMBRANE_DNS_PORT:-5353}.\n\
             # Stop the agents before the registry (docker compose does; with podman-compose,\n\
             # which stops all at once: `podman-compose stop <ID>-agent ...` first).\n"
        } else {
            ""
        },
        ns = opts.namespace,
        fmt = if kind == "docker compose" {
            "compose"
        } else {
            "k8s"
        },
    )
}

/// A `docker-compose.yml`: the registry, and per membrane an app container `ID` and its
/// sidecar `ID-agent`, the app in the agent's network namespace (so the agent registers
/// the app's address, and keeps its network until it has deregistered), sharing the
/// namespace-wide `shared` volume and a per-membrane state volume (the agent's control
/// socket, so `docker compose exec ID agent status` works).
pub fn compose(membranes: &[MembraneView], opts: &ExportOptions) -> String {
    let ms = sorted(membranes);
    let app_image = opts.app_image.clone().unwrap_or_else(|| opts.image.clone());
    let user = format!("{IMAGE_UID}:{IMAGE_UID}");
    let mut services = vec![(
        "dns-server".to_string(),
        map([
            ("image", s(&opts.image)),
            ("user", s(&user)),
            (
                "command",
                strs([
                    "dns-server".to_string(),
                    "--data-dir".into(),
                    REGISTRY_DATA_DIR.into(),
                    "--dns-listen".into(),
                    format!("0.0.0.0:{DNS_PORT}"),
                    "--http-listen".into(),
                    format!("0.0.0.0:{HTTP_PORT}"),
                    // Open API on the project's private network; the published ports below
                    // are bound to the host's loopback only. Set MEMBRANE_ADMIN_TOKEN (and
                    // MEMBRANE_TOKEN for the agents) to close it.
                    "--insecure".into(),
                ]),
            ),
            ("environment", map([("MEMBRANE_LOG_FORMAT", s("json"))])),
            (
                "ports",
                // The host ports can be moved with MEMBRANE_HTTP_PORT / MEMBRANE_DNS_PORT
                // (compose variable interpolation), e.g. when 5353 is taken by mDNS.
                strs([
                    format!("127.0.0.1:${{MEMBRANE_HTTP_PORT:-{HTTP_PORT}}}:{HTTP_PORT}/tcp"),
                    format!("127.0.0.1:${{MEMBRANE_DNS_PORT:-{DNS_PORT}}}:{DNS_PORT}/udp"),
                    format!("127.0.0.1:${{MEMBRANE_DNS_PORT:-{DNS_PORT}}}:{DNS_PORT}/tcp"),
                ]),
            ),
            (
                "volumes",
                strs([format!("registry-data:{REGISTRY_DATA_DIR}")]),
            ),
            ("restart", s("unless-stopped")),
        ]),
    )];
    let mut volumes = vec![
        ("registry-data".to_string(), Yaml::Map(vec![])),
        ("shared".to_string(), Yaml::Map(vec![])),
    ];
    for m in &ms {
        let id = m.id.as_str();
        let state_vol = format!("{id}-state");
        let mounts = strs([
            format!("shared:{SHARED_DIR}"),
            format!("{state_vol}:{AGENT_STATE_DIR}"),
        ]);
        let agent_service = format!("{id}-agent");
        let mut app = vec![
            ("image".to_string(), s(&app_image)),
            ("user".to_string(), s(&user)),
        ];
        if let Some(cmd) = app_command(opts) {
            app.push(("command".into(), cmd));
        }
        // An init as PID 1 forwards SIGTERM: a process without a handler (the placeholder's
        // `sleep`) ignores it as PID 1 and would only go at the stop timeout's SIGKILL.
        app.push(("init".into(), Yaml::Bool(true)));
        // The app joins the agent's network namespace (same address), not the other way
        // round: stopping or restarting the app then never takes the network away from an
        // agent that still has to deregister (podman-compose stops every container at
        // once); the dependency makes docker compose stop the app before its agent.
        app.push(("network_mode".into(), s(format!("service:{agent_service}"))));
        app.push((
            "environment".into(),
            map([
                ("MEMBRANE_ID", s(id)),
                ("MEMBRANE_NAMESPACE", s(&opts.namespace)),
                ("MEMBRANE_STATE_DIR", s(AGENT_STATE_DIR)),
                ("MEMBRANE_SHARED_DIR", s(SHARED_DIR)),
            ]),
        ));
        app.push(("volumes".into(), mounts.clone()));
        app.push(("depends_on".into(), strs([agent_service.clone()])));
        app.push(("restart".into(), s("unless-stopped")));
        services.push((id.to_string(), Yaml::Map(app)));

        let env = agent_env(m, &opts.namespace);
        services.push((
            agent_service,
            map([
                ("image", s(&opts.image)),
                ("user", s(&user)),
                ("command", strs(agent_command(m).iter().map(|a| literal(a)))),
                (
                    "environment",
                    Yaml::Map(env.into_iter().map(|(k, v)| (k, s(literal(&v)))).collect()),
                ),
                ("volumes", mounts),
                // docker compose stops dependents first: the registry outlives the agents.
                ("depends_on", strs(["dns-server"])),
                ("stop_grace_period", s("10s")),
                ("restart", s("unless-stopped")),
            ]),
        ));
        volumes.push((state_vol, Yaml::Map(vec![])));
    }
    let doc = map([
        ("name", s(&opts.namespace)),
        ("services", Yaml::Map(services)),
        ("volumes", Yaml::Map(volumes)),
    ]);
    format!(
        "{}{}",
        header("docker compose", opts, ms.len()),
        yaml::render(&doc)
    )
}

fn labels(opts: &ExportOptions, component: &str, id: &str) -> Yaml {
    map([
        ("app.kubernetes.io/name", s(id)),
        ("app.kubernetes.io/component", s(component)),
        ("app.kubernetes.io/part-of", s(&opts.namespace)),
    ])
}

fn metadata(opts: &ExportOptions, name: &str, component: &str) -> Yaml {
    map([
        ("name", s(name)),
        ("namespace", s(&opts.namespace)),
        ("labels", labels(opts, component, name)),
    ])
}

fn container_security() -> Yaml {
    map([
        ("allowPrivilegeEscalation", Yaml::Bool(false)),
        ("readOnlyRootFilesystem", Yaml::Bool(true)),
        ("capabilities", map([("drop", strs(["ALL"]))])),
    ])
}

fn pod_security() -> Yaml {
    map([
        ("runAsNonRoot", Yaml::Bool(true)),
        ("runAsUser", Yaml::Int(IMAGE_UID)),
        ("runAsGroup", Yaml::Int(IMAGE_UID)),
        ("fsGroup", Yaml::Int(IMAGE_UID)),
        ("seccompProfile", map([("type", s("RuntimeDefault"))])),
    ])
}

fn env_list(pairs: Vec<(String, String)>) -> Yaml {
    Yaml::Seq(
        pairs
            .into_iter()
            .map(|(k, v)| map([("name", s(k)), ("value", s(v))]))
            .collect(),
    )
}

fn deployment(opts: &ExportOptions, name: &str, component: &str, pod: Yaml) -> Yaml {
    map([
        ("apiVersion", s("apps/v1")),
        ("kind", s("Deployment")),
        ("metadata", metadata(opts, name, component)),
        (
            "spec",
            map([
                ("replicas", Yaml::Int(1)),
                (
                    "selector",
                    map([(
                        "matchLabels",
                        map([
                            ("app.kubernetes.io/name", s(name)),
                            ("app.kubernetes.io/part-of", s(&opts.namespace)),
                        ]),
                    )]),
                ),
                (
                    "template",
                    map([
                        ("metadata", map([("labels", labels(opts, component, name))])),
                        ("spec", pod),
                    ]),
                ),
            ]),
        ),
    ])
}

fn port(name: &str, port: u16, proto: &str) -> Yaml {
    map([
        ("name", s(name)),
        ("containerPort", Yaml::Int(port.into())),
        ("protocol", s(proto)),
    ])
}

/// Kubernetes manifests: the Namespace, the registry (PVC, Deployment, Service) and one
/// Deployment per membrane with the app container and the `agent` sidecar sharing an
/// `emptyDir` for the agent state and the shared volume (an `emptyDir`, or the
/// ReadWriteMany claim `--shared-claim` so that shared-volume messages cross pods).
pub fn kubernetes(membranes: &[MembraneView], opts: &ExportOptions) -> String {
    let ms = sorted(membranes);
    let ns = &opts.namespace;
    let mut docs = vec![
        map([
            ("apiVersion", s("v1")),
            ("kind", s("Namespace")),
            (
                "metadata",
                map([("name", s(ns)), ("labels", labels(opts, "namespace", ns))]),
            ),
        ]),
        map([
            ("apiVersion", s("v1")),
            ("kind", s("PersistentVolumeClaim")),
            ("metadata", metadata(opts, "dns-server-data", "registry")),
            (
                "spec",
                map([
                    ("accessModes", strs(["ReadWriteOnce"])),
                    (
                        "resources",
                        map([("requests", map([("storage", s("1Gi"))]))]),
                    ),
                ]),
            ),
        ]),
    ];
    let registry_pod = map([
        ("securityContext", pod_security()),
        (
            "containers",
            Yaml::Seq(vec![map([
                ("name", s("dns-server")),
                ("image", s(&opts.image)),
                (
                    "command",
                    strs([
                        "dns-server".to_string(),
                        "--data-dir".into(),
                        REGISTRY_DATA_DIR.into(),
                        "--dns-listen".into(),
                        format!("0.0.0.0:{DNS_PORT}"),
                        "--http-listen".into(),
                        format!("0.0.0.0:{HTTP_PORT}"),
                        "--insecure".into(),
                    ]),
                ),
                (
                    "env",
                    env_list(vec![("MEMBRANE_LOG_FORMAT".into(), "json".into())]),
                ),
                (
                    "ports",
                    Yaml::Seq(vec![
                        port("http", HTTP_PORT, "TCP"),
                        port("dns-udp", DNS_PORT, "UDP"),
                        port("dns-tcp", DNS_PORT, "TCP"),
                    ]),
                ),
                (
                    "readinessProbe",
                    map([(
                        "httpGet",
                        map([("path", s("/health")), ("port", s("http"))]),
                    )]),
                ),
                (
                    "livenessProbe",
                    map([(
                        "httpGet",
                        map([("path", s("/health")), ("port", s("http"))]),
                    )]),
                ),
                (
                    "volumeMounts",
                    Yaml::Seq(vec![
                        map([("name", s("data")), ("mountPath", s(REGISTRY_DATA_DIR))]),
                        // SQLite's temporary files; the root file system is read-only.
                        map([("name", s("tmp")), ("mountPath", s("/tmp"))]),
                    ]),
                ),
                ("securityContext", container_security()),
            ])]),
        ),
        (
            "volumes",
            Yaml::Seq(vec![
                map([
                    ("name", s("data")),
                    (
                        "persistentVolumeClaim",
                        map([("claimName", s("dns-server-data"))]),
                    ),
                ]),
                map([("name", s("tmp")), ("emptyDir", Yaml::Map(vec![]))]),
            ]),
        ),
    ]);
    let mut registry = deployment(opts, "dns-server", "registry", registry_pod);
    // One writer for the embedded store: never two pods at once.
    if let Yaml::Map(top) = &mut registry
        && let Some((_, Yaml::Map(spec))) = top.iter_mut().find(|(k, _)| k == "spec")
    {
        spec.push(("strategy".into(), map([("type", s("Recreate"))])));
    }
    docs.push(registry);
    docs.push(map([
        ("apiVersion", s("v1")),
        ("kind", s("Service")),
        ("metadata", metadata(opts, "dns-server", "registry")),
        (
            "spec",
            map([
                (
                    "selector",
                    map([
                        ("app.kubernetes.io/name", s("dns-server")),
                        ("app.kubernetes.io/part-of", s(ns)),
                    ]),
                ),
                (
                    "ports",
                    Yaml::Seq(vec![
                        map([
                            ("name", s("http")),
                            ("port", Yaml::Int(HTTP_PORT.into())),
                            ("targetPort", s("http")),
                            ("protocol", s("TCP")),
                        ]),
                        map([
                            ("name", s("dns-udp")),
                            ("port", Yaml::Int(DNS_PORT.into())),
                            ("targetPort", s("dns-udp")),
                            ("protocol", s("UDP")),
                        ]),
                        map([
                            ("name", s("dns-tcp")),
                            ("port", Yaml::Int(DNS_PORT.into())),
                            ("targetPort", s("dns-tcp")),
                            ("protocol", s("TCP")),
                        ]),
                    ]),
                ),
            ]),
        ),
    ]));
    let app_image = opts.app_image.clone().unwrap_or_else(|| opts.image.clone());
    for m in &ms {
        let id = m.id.as_str();
        let mounts = Yaml::Seq(vec![
            map([("name", s("shared")), ("mountPath", s(SHARED_DIR))]),
            map([
                ("name", s("agent-state")),
                ("mountPath", s(AGENT_STATE_DIR)),
            ]),
        ]);
        let mut app = vec![
            ("name".to_string(), s("app")),
            ("image".to_string(), s(&app_image)),
        ];
        if let Some(cmd) = app_command(opts) {
            app.push(("command".into(), cmd));
        }
        app.push((
            "env".into(),
            env_list(vec![
                ("MEMBRANE_ID".into(), id.into()),
                ("MEMBRANE_NAMESPACE".into(), ns.clone()),
                ("MEMBRANE_STATE_DIR".into(), AGENT_STATE_DIR.into()),
                ("MEMBRANE_SHARED_DIR".into(), SHARED_DIR.into()),
            ]),
        ));
        let ports: Vec<Yaml> = m
            .registration
            .services
            .iter()
            .map(|sv| {
                map([
                    ("containerPort", Yaml::Int(sv.port.into())),
                    ("protocol", s(sv.proto.as_str().to_ascii_uppercase())),
                ])
            })
            .collect();
        if !ports.is_empty() {
            app.push(("ports".into(), Yaml::Seq(ports)));
        }
        app.push(("volumeMounts".into(), mounts.clone()));
        app.push(("securityContext".into(), container_security()));
        let agent = map([
            ("name", s("agent")),
            ("image", s(&opts.image)),
            ("command", strs(agent_command(m).iter().map(|a| literal(a)))),
            (
                "env",
                env_list(
                    agent_env(m, ns)
                        .into_iter()
                        .map(|(k, v)| (k, literal(&v)))
                        .collect(),
                ),
            ),
            ("volumeMounts", mounts),
            ("securityContext", container_security()),
            (
                "resources",
                map([
                    ("requests", map([("cpu", s("10m")), ("memory", s("16Mi"))])),
                    ("limits", map([("memory", s("64Mi"))])),
                ]),
            ),
        ]);
        let shared = match &opts.shared_claim {
            Some(claim) => map([
                ("name", s("shared")),
                ("persistentVolumeClaim", map([("claimName", s(claim))])),
            ]),
            None => map([("name", s("shared")), ("emptyDir", Yaml::Map(vec![]))]),
        };
        let mut pod = vec![("securityContext".to_string(), pod_security())];
        if opts.app_image.is_none() {
            // The placeholder `sleep` ignores SIGTERM as PID 1; with a shared process
            // namespace the pod's pause process is PID 1 and `sleep` stops at once.
            pod.push(("shareProcessNamespace".into(), Yaml::Bool(true)));
        }
        pod.extend([
            ("terminationGracePeriodSeconds".to_string(), Yaml::Int(15)),
            ("containers".into(), Yaml::Seq(vec![Yaml::Map(app), agent])),
            (
                "volumes".into(),
                Yaml::Seq(vec![
                    shared,
                    map([("name", s("agent-state")), ("emptyDir", Yaml::Map(vec![]))]),
                ]),
            ),
        ]);
        docs.push(deployment(opts, id, "membrane", Yaml::Map(pod)));
    }
    let mut out = header("Kubernetes manifests", opts, ms.len());
    for d in &docs {
        out.push_str("---\n");
        out.push_str(&yaml::render(d));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn membrane(json: &str) -> MembraneView {
        serde_json::from_str(json).unwrap()
    }

    fn sample() -> Vec<MembraneView> {
        vec![
            membrane(
                r#"{"id":"perception","namespace":"cognitive-system","parent":"cognitive-root",
                "addresses":["10.0.0.2"],"services":[{"name":"perception","proto":"tcp","port":7100,"priority":0,"weight":10}],
                "capabilities":["vision","p-system"],"tags":[],"metadata":{"version":"1.2"},
                "endpoint":{"mode":"shared-volume","path":"/x"},"state":"passing",
                "registered_at":"2026-01-01T00:00:00Z","last_heartbeat":"2026-01-01T00:00:00Z"}"#,
            ),
            membrane(
                r#"{"id":"cognitive-root","namespace":"cognitive-system",
                "addresses":[],"services":[],"capabilities":[],"tags":["t1"],"metadata":{},
                "endpoint":{"mode":"tcp","address":"10.0.0.1:7300"},"state":"stale",
                "registered_at":"2026-01-01T00:00:00Z","last_heartbeat":"2026-01-01T00:00:00Z"}"#,
            ),
        ]
    }

    #[test]
    fn agent_env_carries_the_registration() {
        let ms = sample();
        let env = agent_env(&ms[0], "cognitive-system");
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("MEMBRANE_ID"), Some("perception"));
        assert_eq!(get("MEMBRANE_PARENT"), Some("cognitive-root"));
        assert_eq!(get("MEMBRANE_SERVICES"), Some("perception:tcp:7100:0:10"));
        assert_eq!(get("MEMBRANE_CAPABILITIES"), Some("vision,p-system"));
        assert_eq!(get("MEMBRANE_MODE"), Some("shared-volume"));
        assert_eq!(get("MEMBRANE_REGISTRY_URL"), Some("http://dns-server:8765"));
        assert_eq!(get("MEMBRANE_LISTEN"), None);
        let root = agent_env(&ms[1], "cognitive-system");
        let get = |k: &str| root.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("MEMBRANE_PARENT"), None, "no parent: variable left out");
        assert_eq!(get("MEMBRANE_MODE"), Some("tcp"));
        assert_eq!(get("MEMBRANE_LISTEN"), Some("0.0.0.0:7300"));
        assert_eq!(get("MEMBRANE_TAGS"), Some("t1"));
        assert_eq!(
            agent_command(&ms[0]),
            ["agent", "run", "--meta", "version=1.2"]
        );
    }

    /// What an interpolator makes of `text`, each variable shown as `<VAR>`: `$$` is a
    /// literal `$`; `$` + `open` … `close` is a variable, and so is `$NAME` when `bare`;
    /// any other `$` is kept. Docker compose: `{`, `}`, bare names; kubelet's `$(NAME)`
    /// in a command or env value (`third_party/forked/golang/expansion`): `(`, `)`.
    fn interpolate(text: &str, open: char, close: char, bare: bool) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            if let Some(a) = after.strip_prefix('$') {
                out.push('$');
                rest = a;
            } else if let Some(end) = after.strip_prefix(open).and_then(|a| a.find(close)) {
                out.push_str("<VAR>");
                rest = &after[end + 2..];
            } else if bare && after.starts_with(|c: char| c == '_' || c.is_ascii_alphabetic()) {
                let end = after
                    .find(|c: char| c != '_' && !c.is_ascii_alphanumeric())
                    .unwrap_or(after.len());
                out.push_str("<VAR>");
                rest = &after[end..];
            } else {
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
        out
    }

    #[test]
    fn registered_dollars_reach_the_agent_as_registered() {
        let ms = vec![membrane(
            r#"{"id":"m","namespace":"ns","addresses":[],"services":[],"capabilities":[],
            "tags":[],"metadata":{"x":"${AWS_SECRET_ACCESS_KEY}","y":"$HOME","z":"$(SECRET)",
            "w":"$$(X)","e":"${X:?boom}","t":"1$"},
            "endpoint":{"mode":"tcp","address":"h:$(P)${Q}"},"state":"passing",
            "registered_at":"2026-01-01T00:00:00Z","last_heartbeat":"2026-01-01T00:00:00Z"}"#,
        )];
        let registered = [
            "\"--meta\"",
            "\"x=${AWS_SECRET_ACCESS_KEY}\"",
            "\"y=$HOME\"",
            "\"z=$(SECRET)\"",
            "\"w=$$(X)\"",
            "\"e=${X:?boom}\"",
            "\"t=1$\"",
            "\"0.0.0.0:$(P)${Q}\"",
        ];
        let opts = ExportOptions::new("ns");
        let c = compose(&ms, &opts);
        assert!(c.contains("\"x=$${AWS_SECRET_ACCESS_KEY}\""), "{c}");
        assert!(c.contains("MEMBRANE_LISTEN: \"0.0.0.0:$$(P)$${Q}\""), "{c}");
        let seen = interpolate(&c, '{', '}', true);
        for r in registered {
            assert!(seen.contains(r), "{r} as compose reads it:\n{seen}");
        }
        // Only the file's own variables are interpolated: the header's two, the ports' three.
        assert!(
            c.contains("\"127.0.0.1:${MEMBRANE_HTTP_PORT:-8765}:8765/tcp\""),
            "{c}"
        );
        assert!(
            c.contains("\"127.0.0.1:${MEMBRANE_DNS_PORT:-5353}:5353/udp\""),
            "{c}"
        );
        assert_eq!(seen.matches("<VAR>").count(), 5, "{seen}");

        let k = kubernetes(&ms, &opts);
        assert!(k.contains("\"z=$$(SECRET)\""), "{k}");
        let seen = interpolate(&k, '(', ')', false);
        for r in registered {
            assert!(seen.contains(r), "{r} as kubelet reads it:\n{seen}");
        }
        assert!(!seen.contains("<VAR>"), "{seen}");
    }

    #[test]
    fn outputs_are_sorted_and_name_every_membrane() {
        let opts = ExportOptions::new("cognitive-system");
        let c = compose(&sample(), &opts);
        let root = c.find("\n  cognitive-root:\n").unwrap();
        let perception = c.find("\n  perception:\n").unwrap();
        assert!(root < perception, "{c}");
        assert!(c.contains("\n  perception-agent:\n"), "{c}");
        let k = kubernetes(&sample(), &opts);
        assert_eq!(k.matches("\n---\n").count(), 6, "{k}");
        assert!(k.contains("kind: \"Deployment\"\n"), "{k}");
    }
}
