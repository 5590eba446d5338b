//! The message relay: `agent send` / `agent recv` between membranes.
//!
//! - [`maildir`]: the membrane's Maildir (the shared-volume inbox), with group commit;
//! - [`seglog`]: append-only segment logs with group commit (one `fdatasync` per batch);
//! - [`inlog`]: the ipc/tcp inbox on a segment log, read by `agent recv` up to the durable
//!   position, with the taken position and the bounded dedupe window;
//! - [`wire`]: frames over Unix/TCP sockets: the receiving inbox and listeners, the
//!   sender's pipelined connection;
//! - [`outbox`]: durable spool (a segment log), per-destination delivery with backoff,
//!   backpressure, expiry, dead letters;
//! - [`auth`]: the namespace relay key (sender authentication of TCP frames);
//! - [`resolve`]: targets (`id`, `parent`, `children`, `_svc._tcp`) to membranes and routes;
//! - this module: message ids, the relay settings file, the shared-volume watcher, and the
//!   pieces `agent send` / `agent recv` share with `agent run`.

pub mod auth;
pub mod conns;
pub mod inlog;
pub mod maildir;
pub mod outbox;
pub mod resolve;
pub mod seglog;
pub mod senders;
pub mod service;
pub mod wire;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shared::envelope::{self, Envelope, MessageId};
use shared::name::{MembraneId, NamespaceName};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::activity::Activity;
use crate::util;
use maildir::Maildir;

/// File in the state directory describing the relay of the running agent (for `agent recv`
/// and `agent send` without a daemon).
pub const RELAY_FILE: &str = "relay.json";

/// Longest configurable message lifetime (`--message-ttl`); receivers refuse messages that
/// claim to expire later than this from now.
pub const MAX_MESSAGE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Largest configurable message body.
pub const MAX_BODY_LIMIT: usize = 16 * 1024 * 1024;

/// What `agent recv` does with a message the membrane took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AfterRecv {
    /// Move it to `cur/`.
    Keep,
    /// Move it to `cur/` emptied (a tombstone that keeps the id for deduplication).
    Delete,
}

/// The relay settings of a running agent, in `relay.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    /// The membrane.
    pub id: MembraneId,
    /// Its namespace.
    pub namespace: NamespaceName,
    /// Receiving mode.
    pub mode: String,
    /// The membrane's Maildir (inbox).
    pub maildir: PathBuf,
    /// What `agent recv` does after printing.
    pub after_recv: AfterRecv,
    /// Largest body accepted and sent.
    pub max_message_bytes: usize,
    /// Message lifetime for the sender's retries, in ms.
    pub message_ttl_ms: u64,
    /// Shared-volume mode: the shared directory (trusted; the `<ns>/<id>` below it must be
    /// real directories).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_dir: Option<PathBuf>,
}

impl RelayInfo {
    /// The membrane's Maildir.
    pub fn maildir(&self) -> Maildir {
        match &self.shared_dir {
            Some(s) => Maildir::for_membrane(s, &self.namespace, &self.id),
            None => Maildir::new(&self.maildir),
        }
    }

    /// Reads `relay.json` of `state_dir`.
    pub fn load(state_dir: &Path) -> std::io::Result<RelayInfo> {
        let b = std::fs::read(state_dir.join(RELAY_FILE))?;
        serde_json::from_slice(&b)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Writes it (0600).
    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        util::write_atomic(
            &state_dir.join(RELAY_FILE),
            &serde_json::to_vec_pretty(self).expect("json"),
            0o600,
        )
    }
}

/// Message ids: time-ordered and strictly increasing within this process.
pub fn next_id() -> MessageId {
    use std::hash::{BuildHasher, Hasher};
    static LAST: Mutex<u128> = Mutex::new(0);
    let now = util::unix_millis(SystemTime::now());
    let rs = std::collections::hash_map::RandomState::new();
    let mut h = rs.build_hasher();
    h.write_u64(now);
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    h.write_u32(*PID.get_or_init(std::process::id));
    let a = h.finish();
    h.write_u64(a);
    let b = h.finish();
    let candidate = MessageId::from_parts(now, (u128::from(a) << 64) | u128::from(b)).as_u128();
    let mut last = LAST.lock().unwrap();
    let v = candidate.max(*last + 1);
    *last = v;
    MessageId::from_u128(v)
}

/// Everything needed to build envelopes for one send.
#[derive(Debug, Clone)]
pub struct Draft {
    /// Sender.
    pub from: MembraneId,
    /// Namespace.
    pub namespace: NamespaceName,
    /// MIME type.
    pub content_type: String,
    /// Body.
    pub body: Vec<u8>,
    /// Answered message.
    pub reply_to: Option<MessageId>,
    /// Lifetime for retries.
    pub ttl: Duration,
    /// A caller-chosen id (one recipient only): a retried `send` then never delivers twice.
    pub id: Option<MessageId>,
}

impl Draft {
    /// One envelope per recipient, sent at `now_ms`.
    pub fn envelopes(&self, to: &[MembraneId], now_ms: u64) -> Result<Vec<Envelope>, String> {
        if self.id.is_some() && to.len() != 1 {
            return Err("a message id can be given only for a single recipient".into());
        }
        Ok(to
            .iter()
            .map(|t| Envelope {
                id: self.id.unwrap_or_else(next_id),
                from: self.from.clone(),
                to: t.clone(),
                namespace: self.namespace.clone(),
                sent_at: now_ms,
                content_type: self.content_type.clone(),
                body: self.body.clone(),
                reply_to: self.reply_to,
                expires_at: Some(now_ms + self.ttl.as_millis() as u64),
            })
            .collect())
    }
}

/// A message as `agent recv --json` prints it (one line each): the envelope's fields, with
/// `body` as text when it is UTF-8, else `body_base64`.
pub fn message_json(e: &Envelope) -> Value {
    let mut v = json!({
        "id": e.id.to_string(),
        "from": e.from,
        "to": e.to,
        "namespace": e.namespace,
        "sent_at": util::rfc3339(util::from_unix_millis(e.sent_at)),
        "content_type": e.content_type,
        "reply_to": e.reply_to.map(|r| r.to_string()),
    });
    match e.body_text() {
        Some(t) => v["body"] = Value::String(t.to_string()),
        None => v["body_base64"] = Value::String(envelope::base64_encode(&e.body)),
    }
    v
}

/// The activity record of a message arriving in the Maildir.
fn received_event(id: MessageId) -> (&'static str, String, Value) {
    (
        "received",
        "message arrived in the Maildir".to_string(),
        json!({"id": id.to_string()}),
    )
}

/// The activity record of a duplicate of a taken message, dropped from `new/`.
fn duplicate_event(id: MessageId) -> (&'static str, String, Value) {
    (
        "duplicate",
        "duplicate message dropped (already taken)".to_string(),
        json!({"id": id.to_string()}),
    )
}

/// Watches a shared-volume Maildir's `new/` (inotify through `notify`): drops duplicates of
/// messages already taken, logs arrivals and bumps `arrivals` for `agent recv --follow`.
/// Each event is handled by itself (the file it names is looked at), the directory being
/// scanned only at the start, when events were lost, and every 30 s as a safety net. Also
/// prunes old tombstones hourly.
pub async fn watch_maildir(
    md: Maildir,
    arrivals: watch::Sender<u64>,
    activity: Arc<Activity>,
    tombstone_age: Duration,
    cancel: CancellationToken,
) {
    use notify::{RecursiveMode, Watcher};
    // Names of files in new/ an event was about; `None`: rescan.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<std::ffi::OsString>>();
    let mut watcher =
        match notify::recommended_watcher(move |r: notify::Result<notify::Event>| match r {
            Ok(ev) if !ev.need_rescan() => {
                for p in ev.paths {
                    if let Some(n) = p.file_name() {
                        let _ = tx.send(Some(n.to_owned()));
                    }
                }
            }
            _ => {
                let _ = tx.send(None);
            }
        }) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the Maildir; falling back to polling");
                return poll_maildir(md, arrivals, activity, cancel).await;
            }
        };
    if let Err(e) = watcher.watch(&md.new_dir(), RecursiveMode::NonRecursive) {
        tracing::error!(error = %e, dir = %md.new_dir().display(), "cannot watch; falling back to polling");
        return poll_maildir(md, arrivals, activity, cancel).await;
    }
    let mut seen = std::collections::HashSet::new();
    let mut prune = tokio::time::interval(Duration::from_secs(3600));
    let mut rescan = tokio::time::interval(Duration::from_secs(30));
    scan(&md, &mut seen, &arrivals, &activity).await;
    loop {
        let mut names = Vec::new();
        let mut full = false;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = prune.tick() => {
                let m = md.clone();
                let _ = tokio::task::spawn_blocking(move || m.prune(tombstone_age)).await;
                continue;
            }
            _ = rescan.tick() => full = true,
            r = rx.recv() => match r {
                None => return,
                Some(None) => full = true,
                Some(Some(n)) => names.push(n),
            },
        }
        while let Ok(r) = rx.try_recv() {
            match r {
                Some(n) => names.push(n),
                None => full = true,
            }
        }
        if full {
            scan(&md, &mut seen, &arrivals, &activity).await;
            continue;
        }
        names.sort_unstable();
        names.dedup();
        let ids: Vec<MessageId> = names
            .iter()
            .filter_map(|n| n.to_str()?.parse().ok())
            .collect();
        let m = md.clone();
        let Ok(states) = tokio::task::spawn_blocking(move || {
            ids.into_iter()
                .map(|id| {
                    let (in_new, in_cur) = m.state_of(id);
                    let dup = in_new && in_cur;
                    if dup {
                        let _ = m.remove_new(id);
                    }
                    (id, in_new, dup)
                })
                .collect::<Vec<_>>()
        })
        .await
        else {
            continue;
        };
        let mut events = Vec::new();
        for (id, in_new, dup) in states {
            if dup {
                seen.remove(&id);
                events.push(duplicate_event(id));
            } else if !in_new {
                // Taken (moved to cur/) or removed.
                seen.remove(&id);
            } else if seen.insert(id) {
                events.push(received_event(id));
            }
        }
        let any = events.iter().any(|e| e.0 == "received");
        activity.record_many(events);
        if any {
            arrivals.send_modify(|v| *v += 1);
        }
    }
}

async fn poll_maildir(
    md: Maildir,
    arrivals: watch::Sender<u64>,
    activity: Arc<Activity>,
    cancel: CancellationToken,
) {
    let mut seen = std::collections::HashSet::new();
    loop {
        scan(&md, &mut seen, &arrivals, &activity).await;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

async fn scan(
    md: &Maildir,
    seen: &mut std::collections::HashSet<MessageId>,
    arrivals: &watch::Sender<u64>,
    activity: &Activity,
) {
    let m = md.clone();
    let Ok(Ok((dups, ids))) = tokio::task::spawn_blocking(move || {
        let dups = m.drop_duplicates()?;
        Ok::<_, std::io::Error>((dups, m.list_new()?))
    })
    .await
    else {
        return;
    };
    let mut events: Vec<(&str, String, Value)> =
        dups.iter().map(|id| duplicate_event(*id)).collect();
    let mut any = false;
    for id in &ids {
        if seen.insert(*id) {
            any = true;
            events.push(received_event(*id));
        }
    }
    activity.record_many(events);
    // Forget ids that left new/ (taken), so the set stays bounded.
    if seen.len() > ids.len() + 10_000 {
        let keep: std::collections::HashSet<MessageId> = ids.into_iter().collect();
        seen.retain(|id| keep.contains(id));
    }
    if any {
        arrivals.send_modify(|v| *v += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_strictly() {
        let ids: Vec<MessageId> = (0..10_000).map(|_| next_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        let now = util::unix_millis(SystemTime::now());
        assert!(ids[0].millis() <= now && ids[0].millis() + 60_000 > now);
    }

    #[test]
    fn draft_makes_one_envelope_per_recipient() {
        let d = Draft {
            from: "a".parse().unwrap(),
            namespace: "ns".parse().unwrap(),
            content_type: "text/plain".into(),
            body: b"hi".to_vec(),
            reply_to: None,
            ttl: Duration::from_secs(3600),
            id: None,
        };
        let to: Vec<MembraneId> = vec!["b".parse().unwrap(), "c".parse().unwrap()];
        let es = d.envelopes(&to, 1000).unwrap();
        assert_eq!(es.len(), 2);
        assert_ne!(es[0].id, es[1].id);
        assert_eq!(es[1].expires_at, Some(1000 + 3_600_000));
        let fixed = Draft {
            id: Some(next_id()),
            ..d
        };
        assert!(fixed.envelopes(&to, 1000).is_err());
        assert_eq!(
            fixed.envelopes(&to[..1], 1000).unwrap()[0].id,
            fixed.id.unwrap()
        );
        let j = message_json(&es[0]);
        assert_eq!(j["body"], "hi");
        let mut bin = es[0].clone();
        bin.body = vec![0xff, 0];
        assert_eq!(message_json(&bin)["body_base64"], "/wA=");
    }

    /// A `sent_at` past the year 9999 (a peer's made-up header) is shown as its number of
    /// milliseconds: the RFC 3339 formatter panicked on it, stopping `agent recv`.
    #[test]
    fn a_sending_time_rfc3339_cannot_show_is_printed_as_a_number() {
        let mut e = maildir::tests::envelope(1, "x");
        e.sent_at = 300_000_000_000_000;
        assert_eq!(message_json(&e)["sent_at"], "300000000000000");
        e.sent_at = 253_402_300_799_000; // the last second of 9999
        assert_eq!(message_json(&e)["sent_at"], "9999-12-31T23:59:59Z");
        e.sent_at = u64::MAX;
        assert_eq!(message_json(&e)["sent_at"], u64::MAX.to_string());
    }

    #[tokio::test]
    async fn watcher_reports_arrivals_and_drops_taken_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let md = Maildir::new(dir.path().join("m"));
        md.create().unwrap();
        let (arrivals, mut rx) = watch::channel(0);
        let cancel = CancellationToken::new();
        let log = dir.path().join("activity.log");
        tokio::spawn(watch_maildir(
            md.clone(),
            arrivals,
            Arc::new(Activity::new(log.clone())),
            Duration::from_secs(3600),
            cancel.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let e = maildir::tests::envelope(1, "x");
        md.store_batch(&[(e.id, &e.encode())]).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        md.take(&[e.id], false).unwrap();
        // A sender's retry lands in new/ again: the watcher removes it.
        std::fs::write(md.new_dir().join(e.id.to_string()), e.encode()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while !md.list_new().unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text.matches("\"event\":\"received\"").count(), 1, "{text}");
        assert!(text.contains("\"event\":\"duplicate\""));
        cancel.cancel();
    }
}
