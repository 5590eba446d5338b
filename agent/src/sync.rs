//! Keeps the [`Cache`] current from the registry's event stream.
//!
//! Consistency protocol: open `GET /v1/namespaces/{ns}/events` first, then take the full list
//! (whose `revision` is the last event it includes), then apply the stream's events with ids
//! above that revision. A `resync` event, a dropped stream or a silent one (no keep-alive for
//! [`SyncConfig::idle_timeout`]) leads to a full refresh on the next connection. Between
//! attempts the task sleeps with capped exponential backoff: it never polls.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use serde_json::json;
use shared::model::Event;
use shared::name::NamespaceName;
use tokio_util::sync::CancellationToken;

use crate::activity::Activity;
use crate::cache::{Applied, Cache};
use crate::client::{ClientError, HttpRegistry, ListFilter};
use crate::sse::SseParser;
use crate::util::{Backoff, Jitter};

/// Timing of the synchronisation.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// The stream is considered dead after this long without any byte (the registry sends a
    /// keep-alive comment every 15 s).
    pub idle_timeout: Duration,
    /// First reconnection delay.
    pub min_backoff: Duration,
    /// Largest reconnection delay.
    pub max_backoff: Duration,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            idle_timeout: Duration::from_secs(45),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
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
    let mut backoff = Backoff::new(cfg.min_backoff, cfg.max_backoff);
    let mut jitter = Jitter::new(0.2);
    let mut was_live = false;
    loop {
        let r = tokio::select! {
            _ = cancel.cancelled() => return,
            r = round(&client, &namespace, &cache, &activity, &cfg, &mut backoff, &mut was_live) => r,
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
        let delay = jitter.apply(backoff.next_delay());
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn refresh(
    client: &HttpRegistry,
    namespace: &NamespaceName,
    cache: &Cache,
) -> Result<usize, ClientError> {
    let list = client.list(namespace, &ListFilter::default()).await?;
    let n = list.membranes.len();
    cache.replace(list.membranes, list.revision);
    Ok(n)
}

async fn round(
    client: &HttpRegistry,
    namespace: &NamespaceName,
    cache: &Cache,
    activity: &Activity,
    cfg: &SyncConfig,
    backoff: &mut Backoff,
    was_live: &mut bool,
) -> Result<(), SyncError> {
    let resp = client.open_events(namespace).await?;
    let n = refresh(client, namespace, cache).await?;
    backoff.reset();
    *was_live = true;
    tracing::info!(
        membranes = n,
        "cache synchronised; following the event stream"
    );
    activity.record(
        "cache_synced",
        &format!("cache refreshed with {n} membranes; following events"),
        json!({"membranes": n, "registry": client.current_url().to_string()}),
    );
    let mut body = resp.into_body();
    let mut parser = SseParser::new();
    loop {
        let frame = tokio::time::timeout(cfg.idle_timeout, body.frame())
            .await
            .map_err(|_| SyncError::Stream(format!("silent for {:?}", cfg.idle_timeout)))?;
        let frame = match frame {
            None => return Ok(()),
            Some(f) => f.map_err(|e| SyncError::Stream(e.to_string()))?,
        };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        for ev in parser.feed(data) {
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
            match cache.apply(id, &event) {
                Applied::Resync => {
                    let n = refresh(client, namespace, cache).await?;
                    activity.record(
                        "cache_resync",
                        &format!("registry asked for a resync; cache refreshed with {n} membranes"),
                        serde_json::Value::Null,
                    );
                }
                Applied::Changed => tracing::debug!(kind = event.kind(), ?id, "cache updated"),
                Applied::Skipped => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheData;
    use crate::cache::tests::view;
    use shared::model::HealthState;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn sse(id: u64, ev: &Event) -> String {
        format!(
            "id: {id}\nevent: {}\ndata: {}\n\n",
            ev.kind(),
            serde_json::to_string(ev).unwrap()
        )
    }

    /// A raw HTTP/1.1 registry: the list answers `lists` in turn, the events route streams
    /// `stream` then closes.
    async fn fake_registry(lists: Vec<String>, stream: String) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let calls = Arc::new(AtomicUsize::new(0));
        let calls2 = calls.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap() == 0 {
                        break;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let resp = if head.contains("/events") {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n: ok\n\n{stream}"
                    )
                } else {
                    let n = calls2.fetch_add(1, Ordering::SeqCst);
                    let body = &lists[n.min(lists.len() - 1)];
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                s.write_all(resp.as_bytes()).await.unwrap();
                let _ = s.shutdown().await;
            }
        });
        (url, calls)
    }

    #[tokio::test]
    async fn applies_only_events_after_the_list_revision_and_refreshes_on_resync() {
        let ns = NamespaceName::new("cog").unwrap();
        let list = |ms: Vec<shared::model::MembraneView>, rev: u64| {
            serde_json::json!({"membranes": ms, "revision": rev}).to_string()
        };
        let lists = vec![
            list(vec![view("cog", "a", "s", "x")], 5),
            list(
                vec![view("cog", "b", "s", "x"), view("cog", "c", "s", "x")],
                9,
            ),
        ];
        let id = |s: &str| shared::name::MembraneId::new(s).unwrap();
        let mut stream = String::new();
        stream += &sse(
            4,
            &Event::Deregistered {
                namespace: ns.clone(),
                id: id("a"),
                reason: "deregistered".into(),
            },
        );
        stream += &sse(
            6,
            &Event::Registered {
                membrane: Box::new(view("cog", "b", "s", "x")),
            },
        );
        stream += &sse(
            7,
            &Event::Resync {
                namespace: ns.clone(),
            },
        );
        stream += &sse(
            8,
            &Event::Registered {
                membrane: Box::new(view("cog", "d", "s", "x")),
            },
        );
        stream += &sse(
            10,
            &Event::StateChanged {
                namespace: ns.clone(),
                id: id("c"),
                state: HealthState::Stale,
            },
        );
        let (url, calls) = fake_registry(lists, stream).await;

        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), ns.clone());
        let client = HttpRegistry::new(vec![url.parse().unwrap()], None);
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        backoff.next_delay();
        let mut was_live = false;
        let r = round(
            &client,
            &ns,
            &cache,
            &Activity::disabled(),
            &SyncConfig::default(),
            &mut backoff,
            &mut was_live,
        )
        .await;
        assert!(r.is_ok(), "the stream ended normally: {r:?}");
        assert!(was_live);
        assert_eq!(
            backoff.next_delay(),
            Duration::from_secs(1),
            "a successful list resets the backoff"
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "one list per connection plus one per resync"
        );
        let (data, _) = cache.snapshot();
        let ids: Vec<&str> = data.membranes.keys().map(String::as_str).collect();
        assert_eq!(
            ids,
            ["b", "c"],
            "the resync list replaced a; d (event 8 <= revision 9) was skipped"
        );
        assert_eq!(data.membranes["c"].state, HealthState::Stale);
        assert_eq!(data.revision, Some(10));
        // Persisted.
        let on_disk = CacheData::load(&dir.path().join(crate::cache::CACHE_FILE))
            .unwrap()
            .unwrap();
        assert_eq!(on_disk, *data);
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
        let ns = NamespaceName::new("cog").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), ns.clone());
        let client = HttpRegistry::new(vec![url.parse().unwrap()], None);
        let cfg = SyncConfig {
            idle_timeout: Duration::from_millis(300),
            ..Default::default()
        };
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let t0 = std::time::Instant::now();
        let r = round(
            &client,
            &ns,
            &cache,
            &Activity::disabled(),
            &cfg,
            &mut backoff,
            &mut false,
        )
        .await;
        assert!(
            matches!(r, Err(SyncError::Stream(ref m)) if m.contains("silent")),
            "{r:?}"
        );
        assert!(t0.elapsed() >= Duration::from_millis(300));
    }
}
