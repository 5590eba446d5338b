//! `GET /v1/namespaces/{ns}/events`: registry changes as Server-Sent Events.
//!
//! Each event carries `id:` (its sequence number), `event:` (its type) and `data:` (the
//! JSON of [`shared::Event`]). A client reconnecting with `Last-Event-ID` gets what it
//! missed, or a `resync` event when that history is gone. A client that falls behind the
//! live buffer also gets `resync` rather than a silent gap.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};
use shared::{Event, NamespaceName};
use tokio::sync::broadcast::error::RecvError;

use super::AppState;

/// Default cap on event stream subscribers.
pub const DEFAULT_MAX_SUBSCRIBERS: usize = 1024;
use super::error::ApiError;
use super::extract::{self, P};
use crate::registry::events::{Published, Sequenced};

fn to_sse((seq, ev): &Sequenced) -> SseEvent {
    SseEvent::default()
        .id(seq.to_string())
        .event(ev.kind())
        .data(ev.json())
}

fn resync(ns: &NamespaceName, seq: u64) -> SseEvent {
    to_sse(&(
        seq,
        Arc::new(Published::new(&Event::Resync {
            namespace: ns.clone(),
        })),
    ))
}

/// The handler.
pub async fn events(
    State(s): State<AppState>,
    P(ns): P<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let ns = extract::ns(&ns)?;
    s.registry.get_namespace(&ns)?;
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let sub = s.registry.events().subscribe(&ns, last_id);
    let revision = s.registry.events().revision();
    let head: Vec<SseEvent> = if sub.resync {
        vec![resync(&ns, revision)]
    } else {
        sub.replay.iter().map(to_sse).collect()
    };
    let registry = s.registry.clone();
    let live = stream::unfold((sub.live, ns), move |(mut rx, ns)| {
        let registry = registry.clone();
        async move {
            let ev = match rx.recv().await {
                Ok(item) => to_sse(&item),
                Err(RecvError::Lagged(_)) => resync(&ns, registry.events().revision()),
                Err(RecvError::Closed) => return None,
            };
            Some((Ok(ev), (rx, ns)))
        }
    });
    // End the stream at shutdown so graceful shutdown does not wait on it.
    let stream = stream::iter(head.into_iter().map(Ok))
        .chain(live)
        .take_until(s.shutdown.clone().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
