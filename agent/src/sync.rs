//! Keeps the [`Cache`] current from the registry's event stream.
//!
//! Consistency protocol: open `GET /v1/namespaces/{ns}/events` first — resuming after the
//! cache's revision (`Last-Event-ID`) when the cache has one — and take a full list only
//! when the cache has no position (first start, or after a `resync`) or its position
//! belongs to another event numbering (the stream's `Membrane-Event-Epoch` differs from the
//! cache's: another registry instance). The list's `revision` is the last event it
//! includes; stream events at or below it are skipped. So a reconnection costs the events
//! missed meanwhile, not a list of the whole namespace.
//!
//! A `resync` event forgets the cache's position and schedules a full list after a random
//! delay ("full jitter", at least spread over one millisecond per cached membrane, growing
//! exponentially with repeated resyncs), so that a registry asking every subscriber to
//! resync at once is not answered by every subscriber listing at once. A dropped or silent
//! stream (no keep-alive for [`SyncConfig::idle_timeout`]) is reconnected after a capped
//! exponential backoff with ±50 % jitter: the task never polls.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use serde_json::json;
use shared::model::Event;
use shared::name::NamespaceName;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::activity::Activity;
use crate::cache::{Applied, Cache};
use crate::client::{ClientError, EPOCH_HEADER, HttpRegistry, ListFilter};
use crate::sse::SseParser;
use crate::util::{Backoff, Jitter};

/// Timing of the synchronisation.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// The stream is considered dead after this long without any byte (the registry sends a
    /// keep-alive comment every 15 s).
    pub idle_timeout: Duration,
    /// First reconnection delay (and first resync spread).
    pub min_backoff: Duration,
    /// Largest reconnection delay (and resync spread).
    pub max_backoff: Duration,
    /// Seed of the jitter (tests); `None`: random.
    pub seed: Option<u64>,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            idle_timeout: Duration::from_secs(45),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            seed: None,
        }
    }
}

/// Why a synchronisation round ended.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A registry request failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The stream broke or fell silent.
    #[error("event stream: {0}")]
    Stream(String),
}

/// Delays between attempts: reconnections and resync lists.
#[derive(Debug)]
pub struct Pacing {
    reconnect: Backoff,
    resync: Backoff,
    last_resync: Option<Instant>,
    jitter: Jitter,
    max: Duration,
}

/// Jitter of reconnection delays (±50 %).
const RECONNECT_JITTER: f64 = 0.5;
/// Spread of a resync's list per cached membrane: a namespace of N membranes resyncing at
/// once spreads its N lists (of N membranes each) over at least N milliseconds.
const RESYNC_SPREAD_PER_MEMBRANE: Duration = Duration::from_millis(1);

impl Pacing {
    /// From the configuration.
    pub fn new(cfg: &SyncConfig) -> Self {
        let jitter = match cfg.seed {
            Some(seed) => Jitter::with_seed(RECONNECT_JITTER, seed),
            None => Jitter::new(RECONNECT_JITTER),
        };
        Pacing {
            reconnect: Backoff::new(cfg.min_backoff, cfg.max_backoff),
            resync: Backoff::new(cfg.min_backoff, cfg.max_backoff),
            last_resync: None,
            jitter,
            max: cfg.max_backoff,
        }
    }

    /// The delay before the next reconnection: exponential, ±50 %.
    pub fn reconnect_delay(&mut self) -> Duration {
        let d = self.reconnect.next_delay();
        self.jitter.apply(d)
    }

    /// A stream delivered its first frame: the next failure starts from the minimum again.
    pub fn connected(&mut self) {
        self.reconnect.reset();
    }

    /// The delay before the list a `resync` asks for, with `cached` membranes in the cache:
    /// uniform in `[0, spread]`, the spread doubling with resyncs that follow each other
    /// within a few minutes.
    pub fn resync_delay(&mut self, cached: usize) -> Duration {
        let now = Instant::now();
        if self
            .last_resync
            .is_some_and(|t| now.saturating_duration_since(t) > self.max * 10)
        {
            self.resync.reset();
        }
        self.last_resync = Some(now);
        let by_size = RESYNC_SPREAD_PER_MEMBRANE * u32::try_from(cached).unwrap_or(u32::MAX);
        let spread = self.resync.next_delay().max(by_size.min(self.max * 4));
        self.jitter.upto(spread)
    }
}

/// Waits for `start` (the first registration: the registry only streams events of a
/// namespace that exists), then synchronises until `cancel`.
pub async fn run(
    client: Arc<HttpRegistry>,
    namespace: NamespaceName,
    cache: Arc<Cache>,
    activity: Arc<Activity>,
    cfg: SyncConfig,
    start: CancellationToken,
    cancel: CancellationToken,
) {
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = start.cancelled() => {}
    }
    let mut pacing = Pacing::new(&cfg);
    let mut was_live = false;
    loop {
        let r = tokio::select! {
            _ = cancel.cancelled() => return,
            r = round(&client, &namespace, &cache, &activity, &cfg, &mut pacing, &mut was_live) => r,
        };
        cache.set_live(false);
        match &r {
            Ok(()) => tracing::info!("event stream closed by the registry; reconnecting"),
            Err(e) => tracing::debug!(error = %e, "cache synchronisation failed"),
        }
        if was_live {
            was_live = false;
            activity.record(
                "cache_offline",
                &match &r {
                    Ok(()) => "event stream closed; the cache is no longer live".to_string(),
                    Err(e) => format!("the cache is no longer live: {e}"),
                },
                serde_json::Value::Null,
            );
        }
        let delay = pacing.reconnect_delay();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Takes a full list into the cache; refuses one of another epoch than the stream's.
async fn refresh(
    client: &HttpRegistry,
    namespace: &NamespaceName,
    cache: &Cache,
    stream_epoch: Option<u64>,
) -> Result<usize, SyncError> {
    let list = client.list(namespace, &ListFilter::default()).await?;
    if list.epoch != stream_epoch {
        return Err(SyncError::Stream(format!(
            "the list (event epoch {:?}) and the stream (epoch {stream_epoch:?}) come from \
             different registry instances",
            list.epoch
        )));
    }
    let n = list.membranes.len();
    cache.replace(list.membranes, list.revision, list.epoch);
    Ok(n)
}

async fn round(
    client: &HttpRegistry,
    namespace: &NamespaceName,
    cache: &Cache,
    activity: &Activity,
    cfg: &SyncConfig,
    pacing: &mut Pacing,
    was_live: &mut bool,
) -> Result<(), SyncError> {
    let resume = cache.resume_point();
    // A full list is due (after a resync or a change of epoch): when.
    let mut list_at: Option<Instant> = None;
    let resp = client
        .open_events(namespace, resume.map(|(rev, _)| rev))
        .await?;
    let stream_epoch = resp
        .headers()
        .get(EPOCH_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match resume {
        Some((rev, epoch)) if epoch == stream_epoch => {
            // Events after `rev` (or a `resync`) come first on the stream.
            cache.set_live(true);
            tracing::info!(
                revision = rev,
                "event stream resumed after the cache's revision"
            );
            activity.record(
                "cache_resumed",
                &format!("event stream resumed after revision {rev}"),
                json!({"revision": rev, "registry": client.current_url().to_string()}),
            );
        }
        Some((rev, epoch)) => {
            // Another numbering (another instance answered, an etcd replica restarted, a
            // new database): like a resync, list after a random delay.
            cache.forget_revision();
            let delay = pacing.resync_delay(cache.snapshot().0.membranes.len());
            tracing::info!(
                revision = rev,
                ?epoch,
                ?stream_epoch,
                delay_ms = delay.as_millis() as u64,
                "the cache's revision is of another registry epoch; listing after a random delay"
            );
            list_at = Some(Instant::now() + delay);
        }
        None => {
            let n = refresh(client, namespace, cache, stream_epoch).await?;
            tracing::info!(
                membranes = n,
                "cache synchronised; following the event stream"
            );
            activity.record(
                "cache_synced",
                &format!("cache refreshed with {n} membranes; following events"),
                json!({"membranes": n, "registry": client.current_url().to_string()}),
            );
        }
    }
    *was_live = true;
    let mut body = resp.into_body();
    let mut parser = SseParser::new();
    let mut silent_at = Instant::now() + cfg.idle_timeout;
    // The reconnection backoff is reset by the stream's first frame (an event or a
    // keep-alive), not by its headers: a registry or proxy answering 200 and closing at
    // once (or sending anything but SSE) is retried with a growing delay, not every second.
    let mut streaming = false;
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = tokio::time::sleep_until(silent_at) => {
                return Err(SyncError::Stream(format!("silent for {:?}", cfg.idle_timeout)));
            }
            _ = tokio::time::sleep_until(list_at.unwrap_or(silent_at)), if list_at.is_some() => {
                list_at = None;
                let n = refresh(client, namespace, cache, stream_epoch).await?;
                activity.record(
                    "cache_resync",
                    &format!("registry asked for a resync; cache refreshed with {n} membranes"),
                    serde_json::Value::Null,
                );
                // The stream was not read during the list (which may take long): its
                // silence counts from now.
                silent_at = Instant::now() + cfg.idle_timeout;
                continue;
            }
        };
        silent_at = Instant::now() + cfg.idle_timeout;
        let frame = match frame {
            None => return Ok(()),
            Some(f) => f.map_err(|e| SyncError::Stream(e.to_string()))?,
        };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        for ev in parser.feed(data) {
            // An event over the parser's caps (a stream that never ends its event, or
            // garbage): the stream lost it; reconnect, resuming after the cache's revision.
            let ev = ev.map_err(|e| SyncError::Stream(e.to_string()))?;
            let id = ev.id.as_deref().and_then(|s| s.trim().parse::<u64>().ok());
            let event = match serde_json::from_str::<Event>(&ev.data) {
                Ok(e) => e,
                Err(_) if ev.event.as_deref() == Some("resync") => Event::Resync {
                    namespace: namespace.clone(),
                },
                Err(e) => {
                    tracing::warn!(error = %e, kind = ?ev.event, "ignoring an unreadable event");
                    continue;
                }
            };
            if list_at.is_some() {
                // A list is due: it covers these events.
                continue;
            }
            match cache.apply(id, &event) {
                Applied::Resync => {
                    cache.forget_revision();
                    let cached = cache.snapshot().0.membranes.len();
                    let delay = pacing.resync_delay(cached);
                    tracing::info!(
                        delay_ms = delay.as_millis() as u64,
                        "registry asked for a resync; listing after a random delay"
                    );
                    list_at = Some(Instant::now() + delay);
                }
                Applied::Changed => tracing::debug!(kind = event.kind(), ?id, "cache updated"),
                Applied::Skipped => {}
            }
        }
        if !streaming && parser.frames() > 0 {
            streaming = true;
            pacing.connected();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheData;
    use crate::cache::tests::view;
    use shared::model::HealthState;
    use shared::name::MembraneId;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn sse(id: u64, ev: &Event) -> String {
        format!(
            "id: {id}\nevent: {}\ndata: {}\n\n",
            ev.kind(),
            serde_json::to_string(ev).unwrap()
        )
    }

    fn ns() -> NamespaceName {
        NamespaceName::new("cog").unwrap()
    }

    fn mid(s: &str) -> MembraneId {
        MembraneId::new(s).unwrap()
    }

    fn list_body(ms: Vec<shared::model::MembraneView>, rev: u64, epoch: u64) -> String {
        serde_json::json!({"membranes": ms, "revision": rev, "epoch": epoch}).to_string()
    }

    /// One request the fake registry saw: when (tokio time), and its head.
    #[derive(Debug, Clone)]
    struct Seen {
        at: Instant,
        head: String,
    }

    impl Seen {
        fn is_list(&self) -> bool {
            self.head.contains("/membranes")
        }
        fn is_events(&self) -> bool {
            self.head.contains("/events")
        }
    }

    /// What the fake answers.
    enum Answer {
        /// A JSON body with this status.
        Json(u16, String),
        /// A JSON body with this status, after this long.
        Slow(Duration, u16, String),
        /// An event stream's head with this epoch, then these bytes alone (not even the
        /// first keep-alive), then closed.
        Bare(u64, String),
        /// An event stream: head with this epoch, then `parts` (each written once the
        /// registry saw at least that many list requests), then held open or closed.
        Stream {
            epoch: u64,
            parts: Vec<(usize, String)>,
            hold: bool,
        },
    }

    type Respond = Box<dyn Fn(&Seen, usize) -> Answer + Send + Sync>;

    /// A registry whose event stream (epoch `epoch`) sends `parts` and closes, and whose
    /// list answers `list` (at `rev`, same epoch).
    fn stream_or_list(
        epoch: u64,
        parts: Vec<(usize, String)>,
        list: Vec<shared::model::MembraneView>,
        rev: u64,
    ) -> Respond {
        let body = list_body(list, rev, epoch);
        Box::new(move |req, _| {
            if req.is_events() {
                Answer::Stream {
                    epoch,
                    parts: parts.clone(),
                    hold: false,
                }
            } else {
                Answer::Json(200, body.clone())
            }
        })
    }

    /// A raw HTTP/1.1 registry on loopback; `respond` gets each request and how many lists
    /// came before it.
    async fn fake(respond: Respond) -> (String, Arc<Mutex<Vec<Seen>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let respond = Arc::new(respond);
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let (log, respond) = (log.clone(), respond.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if s.read(&mut b).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    let req = Seen {
                        at: Instant::now(),
                        head: String::from_utf8_lossy(&head).to_lowercase(),
                    };
                    let lists = {
                        let mut l = log.lock().unwrap();
                        let n = l.iter().filter(|r| r.is_list()).count();
                        l.push(req.clone());
                        n
                    };
                    match respond(&req, lists) {
                        Answer::Slow(delay, status, body) => {
                            tokio::time::sleep(delay).await;
                            let r = format!(
                                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                body.len()
                            );
                            let _ = s.write_all(r.as_bytes()).await;
                        }
                        Answer::Bare(epoch, body) => {
                            let h = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nmembrane-event-epoch: {epoch}\r\nconnection: close\r\n\r\n{body}"
                            );
                            let _ = s.write_all(h.as_bytes()).await;
                        }
                        Answer::Json(status, body) => {
                            let r = format!(
                                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                body.len()
                            );
                            let _ = s.write_all(r.as_bytes()).await;
                        }
                        Answer::Stream { epoch, parts, hold } => {
                            let h = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nmembrane-event-epoch: {epoch}\r\nconnection: close\r\n\r\n: ok\n\n"
                            );
                            if s.write_all(h.as_bytes()).await.is_err() {
                                return;
                            }
                            for (after_lists, part) in parts {
                                while log.lock().unwrap().iter().filter(|r| r.is_list()).count()
                                    < after_lists
                                {
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                                if s.write_all(part.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                            if hold {
                                // Keep-alives, like the registry, until the client leaves.
                                loop {
                                    tokio::time::sleep(Duration::from_secs(15)).await;
                                    if s.write_all(b": keep-alive\n\n").await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    }
                    let _ = s.shutdown().await;
                });
            }
        });
        (url, seen)
    }

    fn client(url: &str) -> HttpRegistry {
        HttpRegistry::new(vec![url.parse().unwrap()], None)
    }

    fn seeded() -> SyncConfig {
        SyncConfig {
            seed: Some(7),
            ..Default::default()
        }
    }

    async fn one_round(url: &str, cache: &Cache) -> Result<(), SyncError> {
        round_with(url, cache, &seeded()).await
    }

    /// One [`round`] against `url` with `cfg`.
    async fn round_with(url: &str, cache: &Cache, cfg: &SyncConfig) -> Result<(), SyncError> {
        round(
            &client(url),
            &ns(),
            cache,
            &Activity::disabled(),
            cfg,
            &mut Pacing::new(cfg),
            &mut false,
        )
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn first_start_lists_then_applies_only_events_after_the_list_revision() {
        let stream = [
            sse(
                4,
                &Event::Deregistered {
                    namespace: ns(),
                    id: mid("a"),
                    reason: "deregistered".into(),
                },
            ),
            sse(
                6,
                &Event::Registered {
                    membrane: Box::new(view("cog", "b", "s", "x")),
                },
            ),
        ]
        .concat();
        let (url, seen) = fake(Box::new(move |req, _| {
            if req.is_events() {
                assert!(!req.head.contains("last-event-id"), "no position yet");
                Answer::Stream {
                    epoch: 900,
                    parts: vec![(1, stream.clone())],
                    hold: false,
                }
            } else {
                Answer::Json(200, list_body(vec![view("cog", "a", "s", "x")], 5, 900))
            }
        }))
        .await;
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), ns());
        let t0 = Instant::now();
        one_round(&url, &cache).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.iter().filter(|r| r.is_list()).count(), 1);
        assert_eq!(seen[1].at, t0, "the first list is taken at once");
        let (data, _) = cache.snapshot();
        let ids: Vec<&str> = data.membranes.keys().map(String::as_str).collect();
        assert_eq!(ids, ["a", "b"], "event 4 <= revision 5 was skipped");
        assert_eq!((data.revision, data.epoch), (Some(6), Some(900)));
        // Events are written in batches (the daemon's writer, within WRITE_DELAY).
        assert!(
            cache.flush().unwrap(),
            "the event after the list is still to write"
        );
        let on_disk = CacheData::load(&dir.path().join(crate::cache::CACHE_FILE))
            .unwrap()
            .unwrap();
        assert_eq!(on_disk, *data, "persisted");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconnection_resumes_from_the_cache_revision_without_listing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), ns());
        cache.replace(
            vec![view("cog", "a", "s", "x"), view("cog", "b", "s", "x")],
            Some(5),
            Some(900),
        );
        let replay = [
            sse(
                6,
                &Event::Registered {
                    membrane: Box::new(view("cog", "c", "s", "x")),
                },
            ),
            sse(
                7,
                &Event::Deregistered {
                    namespace: ns(),
                    id: mid("a"),
                    reason: "deregistered".into(),
                },
            ),
        ]
        .concat();
        let (url, seen) = fake(stream_or_list(900, vec![(0, replay)], vec![], 99)).await;
        one_round(&url, &cache).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        assert!(
            seen[0].head.contains("last-event-id: 5\r\n"),
            "{}",
            seen[0].head
        );
        assert_eq!(
            seen.iter().filter(|r| r.is_list()).count(),
            0,
            "no full list on a reconnection: {seen:?}"
        );
        let (data, _) = cache.snapshot();
        let ids: Vec<&str> = data.membranes.keys().map(String::as_str).collect();
        assert_eq!(ids, ["b", "c"]);
        assert_eq!(data.revision, Some(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_resync_forgets_the_position_and_lists_after_a_jittered_delay() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), ns());
        cache.replace(vec![view("cog", "a", "s", "x")], Some(5), Some(900));
        let before = [
            sse(
                6,
                &Event::Registered {
                    membrane: Box::new(view("cog", "b", "s", "x")),
                },
            ),
            // The registry lost this subscriber's place (its id is its revision, below 5
            // would not matter: a resync is never skipped).
            sse(3, &Event::Resync { namespace: ns() }),
            // Covered by the coming list: not applied.
            sse(
                8,
                &Event::Registered {
                    membrane: Box::new(view("cog", "d", "s", "x")),
                },
            ),
        ]
        .concat();
        let after = sse(
            10,
            &Event::StateChanged {
                namespace: ns(),
                id: mid("c"),
                state: HealthState::Stale,
            },
        );
        let (url, seen) = fake(stream_or_list(
            900,
            vec![(0, before), (1, after)],
            vec![view("cog", "b", "s", "x"), view("cog", "c", "s", "x")],
            9,
        ))
        .await;
        let t0 = Instant::now();
        let task = {
            let url = url.clone();
            let dir = dir.path().to_path_buf();
            tokio::spawn(async move {
                let cache = Cache::open(&dir, ns());
                one_round(&url, &cache).await.map(|()| cache)
            })
        };
        // While the list is due, a restart of the agent would not resume from a position
        // the registry disowned.
        tokio::time::sleep(Duration::from_millis(1)).await;
        while seen.lock().unwrap().iter().all(|r| !r.is_list()) {
            assert_eq!(
                Cache::open(dir.path(), ns()).resume_point(),
                None,
                "position forgotten at once"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let cache = task.await.unwrap().unwrap();
        let seen = seen.lock().unwrap().clone();
        let lists: Vec<_> = seen.iter().filter(|r| r.is_list()).collect();
        assert_eq!(lists.len(), 1, "one list, for the resync");
        let waited = lists[0].at - t0;
        // Seed 7: somewhere in the first resync's spread of 1 s, not at once.
        assert!(
            waited > Duration::from_millis(10) && waited <= Duration::from_secs(1),
            "{waited:?}"
        );
        let (data, _) = cache.snapshot();
        let ids: Vec<&str> = data.membranes.keys().map(String::as_str).collect();
        assert_eq!(
            ids,
            ["b", "c"],
            "the list replaced the cache; d was skipped"
        );
        assert_eq!(data.membranes["c"].state, HealthState::Stale);
        assert_eq!(data.revision, Some(10));
    }

    #[tokio::test(start_paused = true)]
    async fn another_epoch_is_not_resumed_but_listed_after_a_jittered_delay() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), ns());
        cache.replace(vec![view("cog", "a", "s", "x")], Some(5), Some(900));
        // The registry restarted (epoch 901): its numbering is another; event 6 of the
        // new epoch says nothing about the cache's 5.
        let (url, seen) = fake(stream_or_list(
            901,
            vec![(1, String::new())],
            vec![view("cog", "z", "s", "x")],
            2,
        ))
        .await;
        let t0 = Instant::now();
        one_round(&url, &cache).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        let lists: Vec<_> = seen.iter().filter(|r| r.is_list()).collect();
        assert_eq!(lists.len(), 1);
        assert!(lists[0].at > t0, "listed after a delay, not at once");
        let (data, _) = cache.snapshot();
        assert_eq!(data.membranes.keys().collect::<Vec<_>>(), ["z"]);
        assert_eq!((data.revision, data.epoch), (Some(2), Some(901)));
    }

    #[test]
    fn resync_lists_spread_over_the_namespace_size_and_back_off() {
        // 2,000 agents of a 20,000-membrane namespace told to resync at once: their lists
        // spread evenly over 20 s instead of arriving together.
        let cfg = SyncConfig::default();
        let mut buckets = [0usize; 20];
        for seed in 0..2000 {
            let mut p = Pacing::new(&SyncConfig {
                seed: Some(seed * 7919 + 1),
                ..cfg.clone()
            });
            let d = p.resync_delay(20_000);
            assert!(d <= Duration::from_secs(20), "{d:?}");
            buckets[(d.as_secs() as usize).min(19)] += 1;
        }
        assert!(
            buckets.iter().all(|&n| (50..=150).contains(&n)),
            "about 100 per second: {buckets:?}"
        );
        // Resyncs in a row: the spread doubles (1, 2, 4, 8 s) up to the cap.
        let mut worst = [Duration::ZERO; 6];
        for seed in 0..200 {
            let mut p = Pacing::new(&SyncConfig {
                seed: Some(seed * 31 + 1),
                ..cfg.clone()
            });
            for w in worst.iter_mut() {
                *w = (*w).max(p.resync_delay(0));
            }
        }
        for (i, (w, cap)) in worst.iter().zip([1u64, 2, 4, 8, 16, 30]).enumerate() {
            assert!(
                *w <= Duration::from_secs(cap) && *w > Duration::from_secs(cap) * 9 / 10,
                "resync {i}: worst {w:?} vs spread {cap} s"
            );
        }
    }

    /// Reconnection attempts against a registry refusing the stream: exponential backoff,
    /// jittered ±50 %, capped.
    #[tokio::test(start_paused = true)]
    async fn reconnections_back_off_exponentially_with_jitter() {
        let (url, seen) = fake(Box::new(|_, _| {
            Answer::Json(
                503,
                r#"{"error":{"code":"too_many_subscribers","message":"later"}}"#.into(),
            )
        }))
        .await;
        let attempts = |seed: u64| {
            let url = url.clone();
            async move {
                let start = CancellationToken::new();
                start.cancel();
                let cancel = CancellationToken::new();
                let dir = tempfile::tempdir().unwrap();
                let task = tokio::spawn(run(
                    Arc::new(client(&url)),
                    ns(),
                    Arc::new(Cache::open(dir.path(), ns())),
                    Arc::new(Activity::disabled()),
                    SyncConfig {
                        seed: Some(seed),
                        max_backoff: Duration::from_secs(16),
                        ..Default::default()
                    },
                    start,
                    cancel.clone(),
                ));
                tokio::time::sleep(Duration::from_secs(120)).await;
                cancel.cancel();
                task.await.unwrap();
            }
        };
        let t0 = Instant::now();
        attempts(7).await;
        let times: Vec<Duration> = seen.lock().unwrap().drain(..).map(|r| r.at - t0).collect();
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.len() >= 7, "{gaps:?}");
        for (gap, base) in gaps.iter().zip([1u64, 2, 4, 8, 16, 16, 16]) {
            let base = Duration::from_secs(base);
            assert!(
                *gap >= base / 2 && *gap <= base * 3 / 2,
                "gap {gap:?} outside ±50 % of {base:?}: {gaps:?}"
            );
        }
        // Another agent (seed) retries at other moments: a crowd does not move in step.
        let t1 = Instant::now();
        attempts(8).await;
        let other: Vec<Duration> = seen.lock().unwrap().iter().map(|r| r.at - t1).collect();
        assert_ne!(times[1..4], other[1..4], "jitter differs between agents");
    }

    /// Reconnection times (from `t0`) of `run` against the registry at `url` for 120 s.
    async fn stream_openings(url: &str, seen: &Mutex<Vec<Seen>>) -> Vec<Duration> {
        let start = CancellationToken::new();
        start.cancel();
        let cancel = CancellationToken::new();
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let task = tokio::spawn(run(
            Arc::new(client(url)),
            ns(),
            Arc::new(Cache::open(dir.path(), ns())),
            Arc::new(Activity::disabled()),
            SyncConfig {
                seed: Some(7),
                max_backoff: Duration::from_secs(16),
                ..Default::default()
            },
            start,
            cancel.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(120)).await;
        cancel.cancel();
        task.await.unwrap();
        let seen = seen.lock().unwrap();
        seen.iter()
            .filter(|r| r.is_events())
            .map(|r| r.at - t0)
            .collect()
    }

    /// A registry (or proxy) that answers the stream's head and closes at once, or sends
    /// bytes that end no frame: the backoff is not reset by the head, reconnections slow
    /// down like refusals do. One that sends a frame first (a keep-alive) did stream: the
    /// backoff starts again.
    #[tokio::test(start_paused = true)]
    async fn a_stream_closed_before_its_first_frame_does_not_reset_the_backoff() {
        for body in ["", "data: no end\n"] {
            let (url, seen) = fake(Box::new(move |req, _| {
                if req.is_events() {
                    Answer::Bare(900, body.into())
                } else {
                    Answer::Json(200, list_body(vec![], 1, 900))
                }
            }))
            .await;
            let times = stream_openings(&url, &seen).await;
            let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
            assert!(gaps.len() >= 7, "{body:?}: {gaps:?}");
            for (gap, base) in gaps.iter().zip([1u64, 2, 4, 8, 16, 16, 16]) {
                let base = Duration::from_secs(base);
                assert!(
                    *gap >= base / 2 && *gap <= base * 3 / 2,
                    "{body:?}: gap {gap:?} outside ±50 % of {base:?}: {gaps:?}"
                );
            }
        }

        let (url, seen) = fake(stream_or_list(900, vec![], vec![], 1)).await;
        let times = stream_openings(&url, &seen).await;
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.len() >= 80, "{gaps:?}");
        assert!(
            gaps.iter().all(|g| *g <= Duration::from_millis(1500)),
            "each stream streamed: the backoff starts again: {gaps:?}"
        );
    }

    /// The idle deadline counts from the end of a resync's list, not from the last byte
    /// before it: a list longer than the idle timeout does not make the stream silent.
    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_counts_from_the_end_of_a_resync_list() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), ns());
        cache.replace(vec![view("cog", "a", "s", "x")], Some(5), Some(900));
        // Longer than the idle timeout, within the client's request timeout (10 s).
        let list_time = Duration::from_secs(8);
        let (url, seen) = fake(Box::new(move |req, _| {
            if req.is_events() {
                Answer::Stream {
                    epoch: 900,
                    parts: vec![(0, sse(6, &Event::Resync { namespace: ns() }))],
                    // Open, the first keep-alive 15 s after the head.
                    hold: true,
                }
            } else {
                Answer::Slow(
                    list_time,
                    200,
                    list_body(vec![view("cog", "b", "s", "x")], 9, 900),
                )
            }
        }))
        .await;
        let cfg = SyncConfig {
            idle_timeout: Duration::from_secs(5),
            ..seeded()
        };
        let r = round_with(&url, &cache, &cfg).await;
        let ended = Instant::now();
        assert!(
            matches!(r, Err(SyncError::Stream(ref m)) if m.contains("silent")),
            "{r:?}"
        );
        let listed = seen
            .lock()
            .unwrap()
            .iter()
            .find(|r| r.is_list())
            .expect("the resync's list")
            .at;
        assert!(
            ended >= listed + list_time + cfg.idle_timeout,
            "dropped {:?} after the list ended, before the idle timeout",
            ended - (listed + list_time)
        );
        let (data, _) = cache.snapshot();
        assert_eq!(data.membranes.keys().collect::<Vec<_>>(), ["b"]);
    }

    /// A stream sending `data:` lines without ever ending the event: the parser's cap
    /// gives up on it and the round ends with an error (a reconnection), instead of the
    /// agent holding the growing event.
    #[tokio::test(start_paused = true)]
    async fn an_event_that_never_ends_drops_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), ns());
        cache.replace(vec![view("cog", "a", "s", "x")], Some(5), Some(900));
        let line = format!("data: {}\n", "x".repeat(1000));
        let endless = line.repeat(crate::sse::MAX_EVENT / 1000 + 10);
        let (url, _) = fake(stream_or_list(900, vec![(0, endless)], vec![], 9)).await;
        let r = one_round(&url, &cache).await;
        assert!(
            matches!(r, Err(SyncError::Stream(ref m)) if m.contains("larger than")),
            "{r:?}"
        );
        assert_eq!(
            cache.resume_point(),
            Some((5, Some(900))),
            "nothing applied"
        );
    }

    #[tokio::test]
    async fn a_silent_stream_is_dropped_after_the_idle_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 2048];
                let n = s.read(&mut buf).await.unwrap();
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                if head.contains("/events") {
                    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
                        .await
                        .unwrap();
                    held.push(s); // never a byte more
                } else {
                    let body = r#"{"membranes":[],"revision":1}"#;
                    let r = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    s.write_all(r.as_bytes()).await.unwrap();
                }
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), ns());
        let cfg = SyncConfig {
            idle_timeout: Duration::from_millis(300),
            ..Default::default()
        };
        let t0 = std::time::Instant::now();
        let r = round_with(&url, &cache, &cfg).await;
        assert!(
            matches!(r, Err(SyncError::Stream(ref m)) if m.contains("silent")),
            "{r:?}"
        );
        assert!(t0.elapsed() >= Duration::from_millis(300));
    }
}
