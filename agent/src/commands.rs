//! The subcommands: `run` starts the daemon; the others talk to it through the control
//! socket. `status`, `discover`, `list` and `log` still answer without a running agent (from
//! the state directory, or the registry when `--registry-url` and `--namespace` are known).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::AgentError;
use crate::activity;
use crate::cache::{CACHE_FILE, CacheData};
use crate::cli::Command;
use crate::client::{HttpRegistry, ListFilter};
use crate::config::{
    DiscoverConfig, ListConfig, LocalConfig, QueryConfig, RegisterConfig, RunConfig,
};
use crate::control::{self, ControlError, Request, Response};
use crate::daemon;
use crate::state;

/// Runs one subcommand.
pub async fn dispatch(cmd: Command) -> Result<(), AgentError> {
    match cmd {
        Command::Run(a) => daemon::run(RunConfig::try_from(*a)?).await,
        Command::Register(a) => {
            let c = RegisterConfig::try_from(a)?;
            let req = Request::Register {
                parent: c.parent.clone().flatten(),
                clear_parent: c.parent == Some(None),
            };
            agent_call(&c.local, &req).await
        }
        Command::Deregister(a) => agent_call(&a.try_into()?, &Request::Deregister).await,
        Command::Heartbeat(a) => agent_call(&a.try_into()?, &Request::Heartbeat).await,
        Command::Status(a) => status(&a.try_into()?).await,
        Command::Discover(a) => {
            let c = DiscoverConfig::try_from(a)?;
            let req = Request::Discover { id: c.id.clone() };
            query(&c.query, req, c.id.as_ref(), ListFilter::default()).await
        }
        Command::List(a) => {
            let c = ListConfig::try_from(a)?;
            let filter = ListFilter {
                service: c.service.as_ref().map(ToString::to_string),
                capability: c.capability.as_ref().map(ToString::to_string),
            };
            let req = Request::List {
                service: c.service,
                capability: c.capability,
            };
            query(&c.query, req, None, filter).await
        }
        Command::Log(a) => {
            let cfg = LocalConfig::try_from(a.local)?;
            log(&cfg.state_dir, a.lines, a.follow).await
        }
    }
}

fn print(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::to_string_pretty(v).expect("json"));
}

fn answer(resp: Response) -> Result<(), AgentError> {
    if resp.ok {
        print(&resp.result.unwrap_or(Value::Null));
        Ok(())
    } else {
        let e = resp.error.unwrap_or(shared::model::ErrorDetail {
            code: "failed".into(),
            message: "the agent gave no reason".into(),
        });
        Err(AgentError::runtime(e.message))
    }
}

async fn agent_call(cfg: &LocalConfig, req: &Request) -> Result<(), AgentError> {
    let resp = control::call(&cfg.state_dir, req, cfg.timeout)
        .await
        .map_err(|e| match e {
            ControlError::NotRunning { .. } => AgentError::runtime(format!(
                "{e}; start it with `agent run` (or pass its --state-dir / --id)"
            )),
            e => AgentError::runtime(e),
        })?;
    answer(resp)
}

async fn status(cfg: &LocalConfig) -> Result<(), AgentError> {
    match control::call(&cfg.state_dir, &Request::Status, cfg.timeout).await {
        Ok(resp) => answer(resp),
        Err(e @ ControlError::NotRunning { .. }) => {
            let cache = CacheData::load(&cfg.state_dir.join(CACHE_FILE))
                .ok()
                .flatten();
            let secret: Option<state::StoredSecret> =
                std::fs::read(cfg.state_dir.join(state::SECRET_FILE))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
            print(&json!({
                "agent_running": false,
                "state_dir": cfg.state_dir,
                "id": secret.as_ref().map(|s| &s.id),
                "namespace": secret.as_ref().map(|s| &s.namespace).or(cache.as_ref().map(|c| &c.namespace)),
                "registration": {"registered": Value::Null, "note": "unknown: no agent is running"},
                "cache": cache.as_ref().map(|c| daemon::cache_json(c, false, SystemTime::now())),
            }));
            Err(AgentError::runtime(e))
        }
        Err(e) => Err(AgentError::runtime(e)),
    }
}

async fn query(
    cfg: &QueryConfig,
    req: Request,
    id: Option<&shared::name::MembraneId>,
    filter: ListFilter,
) -> Result<(), AgentError> {
    match control::call(&cfg.local.state_dir, &req, cfg.local.timeout).await {
        Ok(resp) => return answer(resp),
        Err(ControlError::NotRunning { .. }) => {}
        Err(e) => return Err(AgentError::runtime(e)),
    }
    // No agent: ask the registry directly if we can, else read the agent's cache file.
    let cache = CacheData::load(&cfg.local.state_dir.join(CACHE_FILE))
        .ok()
        .flatten();
    let Some(namespace) = cfg
        .namespace
        .clone()
        .or_else(|| cache.as_ref().map(|c| c.namespace.clone()))
    else {
        return Err(AgentError::runtime(format!(
            "no agent is running with state directory {} and no cache there; pass --namespace and \
             --registry-url (MEMBRANE_NAMESPACE, MEMBRANE_REGISTRY_URL) to ask the registry directly",
            cfg.local.state_dir.display()
        )));
    };
    let client = (!cfg.registry_urls.is_empty()).then(|| {
        HttpRegistry::new(cfg.registry_urls.clone(), cfg.token.clone())
            .with_timeouts(Duration::from_secs(3), Duration::from_secs(10))
    });
    answer(daemon::query(client.as_ref(), &namespace, id, &filter, || cache).await)
}

/// Prints the activity log (the rotated part first), then follows it if asked.
async fn log(dir: &Path, lines: Option<usize>, follow: bool) -> Result<(), AgentError> {
    let path = dir.join(state::ACTIVITY_LOG);
    let mut text = String::new();
    for p in [activity::rotated(&path), path.clone()] {
        if let Ok(t) = std::fs::read_to_string(&p) {
            text.push_str(&t);
        }
    }
    if text.is_empty() && !follow && !path.exists() {
        return Err(AgentError::runtime(format!(
            "no activity log at {} (has the agent run with this --state-dir?)",
            path.display()
        )));
    }
    let all: Vec<&str> = text.lines().collect();
    let skip = lines.map_or(0, |n| all.len().saturating_sub(n));
    {
        let mut out = std::io::stdout().lock();
        for l in &all[skip..] {
            let _ = writeln!(out, "{l}");
        }
        let _ = out.flush();
    }
    if !follow {
        return Ok(());
    }
    // Follow: poll the file's size (this is the short-lived client, not the daemon).
    let mut pos = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let mut partial = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.len() < pos {
            pos = 0; // rotated
        }
        if meta.len() == pos {
            continue;
        }
        let Ok(mut f) = std::fs::File::open(&path) else {
            continue;
        };
        if f.seek(SeekFrom::Start(pos)).is_err() {
            continue;
        }
        let mut buf = Vec::new();
        let n = f.read_to_end(&mut buf).unwrap_or(0);
        pos += n as u64;
        partial.extend_from_slice(&buf);
        let mut out = std::io::stdout().lock();
        let mut rest = &partial[..];
        let mut consumed = 0;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let _ = out.write_all(&rest[..=i]);
            consumed += i + 1;
            rest = &rest[i + 1..];
        }
        partial.drain(..consumed);
        if out.flush().is_err() {
            return Ok(()); // stdout closed
        }
    }
}
