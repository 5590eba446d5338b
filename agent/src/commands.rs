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
    ConfigError, DiscoverConfig, ListConfig, LocalConfig, QueryConfig, RegisterConfig, RunConfig,
    SendConfig,
};
use crate::control::{self, ControlError, Request, Response};
use crate::daemon;
use crate::relay::maildir::Maildir;
use crate::relay::resolve::Resolver;
use crate::relay::{self, RelayInfo};
use crate::state;
use crate::util;
use shared::envelope::{self, Envelope, MessageId};

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
                parent: None,
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
        Command::Send(a) => {
            let c = SendConfig::from_args(a, std::io::stdin().lock())?;
            send(c).await
        }
        Command::Recv(a) => {
            let cfg = LocalConfig::try_from(a.local)?;
            recv(&cfg, a.follow, a.json).await
        }
    }
}

/// `agent send`: through the running agent (durable outbox), else directly.
async fn send(c: SendConfig) -> Result<(), AgentError> {
    let (body, body_base64) = match std::str::from_utf8(&c.body) {
        Ok(t) => (Some(t.to_string()), None),
        Err(_) => (None, Some(envelope::base64_encode(&c.body))),
    };
    let req = Request::Send {
        to: c.target.to_string(),
        body,
        body_base64,
        content_type: Some(c.content_type.clone()),
        all: c.all,
        wait: c.wait,
        reply_to: c.reply_to,
        id: c.message_id,
    };
    match control::call(&c.query.local.state_dir, &req, c.query.local.timeout).await {
        Ok(resp) if resp.ok => {
            let mut v = resp.result.unwrap_or(Value::Null);
            print_debug(c.debug, &v);
            if let Some(o) = v.as_object_mut() {
                o.remove("debug");
            }
            print(&v);
            Ok(())
        }
        Ok(resp) => {
            let e = resp.error.unwrap_or(shared::model::ErrorDetail {
                code: "failed".into(),
                message: "the agent gave no reason".into(),
            });
            match e.code.as_str() {
                "bad_target" | "too_large" => Err(ConfigError::Invalid {
                    flag: if e.code == "too_large" {
                        "MESSAGE"
                    } else {
                        "TARGET"
                    },
                    message: e.message,
                }
                .into()),
                _ => Err(AgentError::runtime(e.message)),
            }
        }
        Err(ControlError::NotRunning { .. }) => send_direct(c).await,
        Err(e) => Err(AgentError::runtime(e)),
    }
}

fn print_debug(debug: bool, v: &Value) {
    if !debug {
        return;
    }
    let mut err = std::io::stderr().lock();
    for l in v["debug"].as_array().into_iter().flatten() {
        let _ = writeln!(err, "debug: {}", l.as_str().unwrap_or_default());
    }
    let _ = writeln!(
        err,
        "debug: via {}",
        if v["route"] == "direct" {
            "direct delivery (no agent running)"
        } else {
            "the running agent's outbox"
        }
    );
}

/// Without a running agent: resolve and deliver once, failing loudly.
async fn send_direct(c: SendConfig) -> Result<(), AgentError> {
    let dir = &c.query.local.state_dir;
    // The namespace relay key and the key pair the agent stored, to sign TCP frames.
    relay::auth::load(dir);
    relay::auth::set_identity(relay::auth::Identity::stored(dir));
    let info = RelayInfo::load(dir).ok();
    let cache = CacheData::load(&dir.join(CACHE_FILE)).ok().flatten();
    let from = c
        .from
        .clone()
        .or_else(|| info.as_ref().map(|i| i.id.clone()))
        .ok_or(ConfigError::Missing {
            flag: "--id",
            env: "MEMBRANE_ID",
        })?;
    let namespace = c
        .query
        .namespace
        .clone()
        .or_else(|| info.as_ref().map(|i| i.namespace.clone()))
        .or_else(|| cache.as_ref().map(|c| c.namespace.clone()))
        .ok_or(ConfigError::Missing {
            flag: "--namespace",
            env: "MEMBRANE_NAMESPACE",
        })?;
    let max = c
        .max_body
        .or(info.as_ref().map(|i| i.max_message_bytes))
        .unwrap_or(envelope::DEFAULT_MAX_BODY);
    crate::config::check_size(c.body.len(), max)?;
    let client = (!c.query.registry_urls.is_empty()).then(|| {
        HttpRegistry::new(c.query.registry_urls.clone(), c.query.token.clone())
            .with_tls(c.query.tls.clone())
            .with_timeouts(Duration::from_secs(3), Duration::from_secs(10))
    });
    if client.is_none() && cache.is_none() {
        return Err(AgentError::runtime(format!(
            "no agent is running with state directory {} and no registry to resolve {} \
             (pass --registry-url and --namespace, or start `agent run`)",
            dir.display(),
            c.target
        )));
    }
    let resolver = Resolver {
        namespace: &namespace,
        self_id: &from,
        self_parent: None,
        cache: cache.map(std::sync::Arc::new),
        client: client.as_ref(),
    };
    let r = (relay::next_id().as_u128() as u64 >> 11) as f64 / (1u64 << 53) as f64;
    let res = resolver
        .resolve(&c.target, c.all, r)
        .await
        .map_err(AgentError::runtime)?;
    let ttl = Duration::from_millis(info.as_ref().map_or(3_600_000, |i| i.message_ttl_ms));
    let draft = relay::Draft {
        from,
        namespace,
        content_type: c.content_type.clone(),
        body: c.body.clone(),
        reply_to: c.reply_to,
        ttl,
        id: c.message_id,
    };
    let to: Vec<_> = res.membranes.iter().map(|m| m.id.clone()).collect();
    let now = util::unix_millis(SystemTime::now());
    let envs = draft.envelopes(&to, now).map_err(AgentError::runtime)?;
    let activity = activity::Activity::new(dir.join(state::ACTIVITY_LOG));
    let mut failures = Vec::new();
    let mut conn = None;
    for (e, m) in envs.iter().zip(&res.membranes) {
        let outcome = match &m.registration.endpoint {
            None => Err(format!("{} registered no message endpoint", m.id)),
            Some(ep) => relay::outbox::deliver(ep, &[e], &mut conn, Duration::from_secs(10))
                .await
                .and_then(|mut o| match o.remove(&e.id) {
                    Some(Ok(())) => Ok(()),
                    Some(Err(r)) => Err(format!("refused ({}): {}", r.code, r.message)),
                    None => Err("no answer from the receiver".into()),
                }),
        };
        match outcome {
            Ok(()) => activity.record(
                "sent",
                &format!("message delivered directly to {}", e.to),
                json!({"id": e.id.to_string(), "to": e.to, "bytes": e.body.len(), "route": "direct"}),
            ),
            Err(err) => {
                activity.record(
                    "send_failed",
                    &format!("direct delivery to {} failed: {err}", e.to),
                    json!({"id": e.id.to_string(), "to": e.to}),
                );
                failures.push(format!("{}: {err}", e.to));
            }
        }
    }
    let v = json!({
        "ids": envs.iter().map(|e| e.id.to_string()).collect::<Vec<_>>(),
        "to": to,
        "status": "delivered",
        "route": "direct",
        "debug": res.debug,
    });
    print_debug(c.debug, &v);
    if !failures.is_empty() {
        return Err(AgentError::runtime(format!(
            "delivery failed (no agent is running to retry): {}",
            failures.join("; ")
        )));
    }
    let mut v = v;
    if let Some(o) = v.as_object_mut() {
        o.remove("debug");
    }
    print(&v);
    Ok(())
}

/// `agent recv`: prints the messages of the membrane's Maildir `new/`, oldest first, then
/// moves them to `cur/`. One `recv` at a time per Maildir (an exclusive lock).
async fn recv(cfg: &LocalConfig, follow: bool, as_json: bool) -> Result<(), AgentError> {
    let info = RelayInfo::load(&cfg.state_dir).map_err(|e| {
        AgentError::runtime(format!(
            "no relay settings in {} ({e}); has `agent run` started with this --state-dir?",
            cfg.state_dir.join(relay::RELAY_FILE).display()
        ))
    })?;
    let md = info.maildir();
    let lock_file = md
        .open_recv_lock()
        .map_err(|e| AgentError::runtime(format!("cannot lock the Maildir: {e}")))?;
    let _lock = tokio::task::spawn_blocking(move || {
        nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
    })
    .await
    .map_err(AgentError::runtime)?
    .map_err(|(_, e)| AgentError::runtime(format!("cannot lock the Maildir: {e}")))?;
    let activity = activity::Activity::new(cfg.state_dir.join(state::ACTIVITY_LOG));
    let delete = info.after_recv == relay::AfterRecv::Delete;
    let mut log = relay::inlog::Reader::open(&info.maildir)
        .map_err(|e| AgentError::runtime(format!("{}: {e}", info.maildir.display())))?;
    loop {
        let m = md.clone();
        let me = info.clone();
        let (batch, full) = tokio::task::spawn_blocking(move || take_batch(&m, &me, 512))
            .await
            .map_err(AgentError::runtime)?
            .map_err(|e| AgentError::runtime(format!("{}: {e}", info.maildir.display())))?;
        if !batch.is_empty() {
            if print_batch(batch.iter(), as_json).is_err() {
                return Ok(()); // stdout closed: nothing taken from this batch
            }
            let ids: Vec<MessageId> = batch.iter().map(|e| e.id).collect();
            let m = md.clone();
            tokio::task::spawn_blocking(move || m.take(&ids, delete))
                .await
                .map_err(AgentError::runtime)?
                .map_err(|e| AgentError::runtime(format!("cannot move messages to cur/: {e}")))?;
            record_taken(&activity, batch.iter());
        }
        // The inbox log (ipc, tcp): oldest first, the taken position recorded (durably)
        // once the membrane got them.
        let mut from_log = 0;
        if let Some(r) = log.as_mut() {
            let msgs = r
                .next_batch(LOG_BATCH)
                .map_err(|e| AgentError::runtime(format!("{}: {e}", info.maildir.display())))?;
            from_log = msgs.len();
            if let Some(end) = r.read_end() {
                if print_batch(msgs.iter().map(|(e, _)| e), as_json).is_err() {
                    return Ok(()); // stdout closed: nothing taken from this batch
                }
                r.take(end).map_err(|e| {
                    AgentError::runtime(format!("cannot record the taken messages: {e}"))
                })?;
                record_taken(&activity, msgs.iter().map(|(e, _)| e));
                if msgs.is_empty() {
                    // Only unreadable records (logged), now stepped over: read on.
                    continue;
                }
            }
        }
        if full || from_log >= LOG_BATCH {
            continue;
        }
        if !follow {
            return Ok(());
        }
        if batch.is_empty() && from_log == 0 {
            let req = Request::RecvWait { timeout_ms: 25_000 };
            match control::call(&cfg.state_dir, &req, Duration::from_secs(30)).await {
                Ok(r) if r.ok => {}
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// Most messages of the inbox log printed between two records of the taken position.
const LOG_BATCH: usize = 1024;

/// Up to `max` readable messages of `new/`, oldest first; duplicates of taken messages are
/// removed. A file that is not a message for this membrane is moved to `bad/` (once, and
/// logged; never printed): a symbolic link or special file, one over the size limit, one
/// not in the message format, one whose name is not its header's id (else it would be
/// printed again and again), one addressed to another membrane, one whose `sent_at` or
/// `expires_at` is too far in the future (as over ipc/tcp: [`relay::wire::check_times`]),
/// one this user may not read (another user's 0600 file, mode 000). `true` when more may
/// be waiting.
fn take_batch(
    md: &Maildir,
    info: &RelayInfo,
    max: usize,
) -> std::io::Result<(Vec<Envelope>, bool)> {
    use crate::relay::maildir::ReadError;
    let ids = md.list_new()?;
    let full = ids.len() > max;
    let mut out = Vec::new();
    let limit = info.max_message_bytes + shared::envelope::HEADER_ROOM;
    let now = util::unix_millis(SystemTime::now());
    for id in ids.into_iter().take(max) {
        let (_, in_cur) = md.state_of(id);
        if in_cur {
            let _ = md.remove_new(id);
            continue;
        }
        let why = match md.read_new(id, limit) {
            Ok(e) if e.id != id => format!("its header says id {}", e.id),
            Ok(e) if e.to != info.id || e.namespace != info.namespace => format!(
                "addressed to {} in {}, not to {} in {}",
                e.to, e.namespace, info.id, info.namespace
            ),
            Ok(e) if e.body.len() > info.max_message_bytes => format!(
                "body of {} bytes, over the limit of {} bytes",
                e.body.len(),
                info.max_message_bytes
            ),
            Ok(e) => match relay::wire::check_times(e.sent_at, e.expires_at, now) {
                Ok(()) => {
                    out.push(e);
                    continue;
                }
                Err(why) => why,
            },
            Err(ReadError::NotFound) => continue,
            Err(ReadError::Unsafe(why)) => why,
            // Not ours to read, now or later: it would stop every `recv` here.
            Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                format!("cannot be read: {e}")
            }
            Err(ReadError::Io(e)) => return Err(e),
        };
        let to = md.quarantine(id)?;
        tracing::warn!(id = %id, reason = %why, moved_to = ?to, "message file set aside, not delivered");
    }
    Ok((out, full))
}

/// Logs that the membrane took `batch`.
fn record_taken<'a>(activity: &activity::Activity, batch: impl Iterator<Item = &'a Envelope>) {
    activity.record_many(batch.map(|e| {
        (
            "taken",
            format!("message from {} taken by the membrane", e.from),
            json!({"id": e.id.to_string(), "from": e.from}),
        )
    }));
}

/// Prints `batch` to stdout in one write (stdout alone flushes at every newline). An error
/// means stdout is closed: the caller records nothing of the batch as taken (a part that
/// got out is printed again by the next `recv`; the ids let the membrane drop repeats).
fn print_batch<'a>(
    batch: impl Iterator<Item = &'a Envelope>,
    as_json: bool,
) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, std::io::stdout().lock());
    for e in batch {
        if as_json {
            writeln!(out, "{}", relay::message_json(e))?;
        } else {
            write_text(&mut out, e)?;
        }
    }
    out.flush()
}

fn write_text(out: &mut impl Write, e: &Envelope) -> std::io::Result<()> {
    let sent = util::rfc3339(util::from_unix_millis(e.sent_at));
    write!(
        out,
        "--- {} from {} at {sent} ({})",
        e.id, e.from, e.content_type
    )?;
    if let Some(r) = e.reply_to {
        write!(out, " reply to {r}")?;
    }
    writeln!(out)?;
    match e.body_text() {
        Some(t) => writeln!(out, "{t}"),
        None => writeln!(out, "<{} bytes of binary body; use --json>", e.body.len()),
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
            .with_tls(cfg.tls.clone())
            .with_timeouts(Duration::from_secs(3), Duration::from_secs(10))
    });
    answer(
        daemon::query(client.as_ref(), &namespace, id, &filter, || {
            cache.map(std::sync::Arc::new)
        })
        .await,
    )
}

/// The most `agent log` reads of each part of the log: its end (a log grown by an older
/// agent, which did not rotate it from short-lived commands, can be larger).
const LOG_READ_LIMIT: u64 = 2 * activity::MAX_LOG_BYTES;

/// Prints the activity log (the rotated part first), then follows it if asked. Bytes that
/// are not UTF-8 (a torn write) are shown replaced; a part that exists but cannot be read
/// is an error.
async fn log(dir: &Path, lines: Option<usize>, follow: bool) -> Result<(), AgentError> {
    let path = dir.join(state::ACTIVITY_LOG);
    let mut text = String::new();
    for p in [activity::rotated(&path), path.clone()] {
        match read_tail(&p, LOG_READ_LIMIT) {
            Ok(b) => {
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                text.push_str(&String::from_utf8_lossy(&b));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(AgentError::runtime(format!(
                    "cannot read the activity log {}: {e}",
                    p.display()
                )));
            }
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
        if partial.len() as u64 > LOG_READ_LIMIT {
            partial.clear(); // a line that never ends
        }
        if out.flush().is_err() {
            return Ok(()); // stdout closed
        }
    }
}

/// The last `max` bytes of the file at `path`, from the first line that starts in them.
fn read_tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    // From the byte before, to see whether the first line starts there.
    let start = len.saturating_sub(max).saturating_sub(1);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(max + 1).read_to_end(&mut buf)?;
    if start > 0 {
        let cut = buf
            .iter()
            .position(|&b| b == b'\n')
            .map_or(buf.len(), |i| i + 1);
        buf.drain(..cut);
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_tail_keeps_whole_lines_of_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("activity.log");
        std::fs::write(&p, b"aaaa\nbbbb\ncccc\n").unwrap();
        assert_eq!(read_tail(&p, 100).unwrap(), b"aaaa\nbbbb\ncccc\n");
        assert_eq!(read_tail(&p, 10).unwrap(), b"bbbb\ncccc\n");
        assert_eq!(read_tail(&p, 9).unwrap(), b"cccc\n");
        assert_eq!(read_tail(&p, 11).unwrap(), b"bbbb\ncccc\n");
        assert_eq!(read_tail(&p, 16).unwrap(), b"aaaa\nbbbb\ncccc\n");
    }
}
