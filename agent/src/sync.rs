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
