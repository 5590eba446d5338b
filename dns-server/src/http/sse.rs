//! `GET /v1/namespaces/{ns}/events`: registry changes as Server-Sent Events.
//!
//! Each event carries `id:` (its sequence number), `event:` (its type) and `data:` (the
//! JSON of [`shared::Event`]). A client reconnecting with `Last-Event-ID` gets what it
//! missed, or a `resync` event when that history is gone or more than
//! [`REPLAY_MAX`](crate::registry::events::REPLAY_MAX) events long. A client that falls
//! behind the live buffer also gets `resync` rather than a silent gap.
//!
//! The response's `Membrane-Event-Epoch` header names the numbering: ids (and list
//! revisions) of another epoch are not comparable, so a client resumes only within one.
//!
//! Every frame sent is the event's shared bytes, framed once at publication; a subscriber
//! holds references, never copies. Subscribers are capped (`--sse-max-subscribers`):
//! beyond the cap a client gets 503 `too_many_subscribers`.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use shared::{Event, NamespaceName};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use super::AppState;
use super::error::ApiError;
use super::extract::{self, P};
use crate::registry::events::Published;

/// The response header carrying the event hub's epoch (see
/// [`EventHub::epoch`](crate::registry::events::EventHub::epoch)); the list answer carries
/// it as `epoch`.
pub const EPOCH_HEADER: &str = "membrane-event-epoch";

/// Default cap on event stream subscribers.
pub const DEFAULT_MAX_SUBSCRIBERS: usize = 1024;
/// A comment line this often keeps proxies and the agent's silence check content.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
const KEEP_ALIVE_FRAME: &[u8] = b": keep-alive\n\n";

fn resync(ns: &NamespaceName, seq: u64) -> Bytes {
    Published::new(
        seq,
        &Event::Resync {
            namespace: ns.clone(),
        },
    )
    .frame()
}

/// The handler.
pub async fn events(
    State(s): State<AppState>,
    P(ns): P<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let ns = extract::ns(&ns)?;
    s.registry.get_namespace(&ns)?;
    let permit = s.sse_permits.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_subscribers",
            "too many event stream subscribers; retry later or poll the membrane list",
        )
    })?;
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let sub = s.registry.events().subscribe(&ns, last_id);
    let revision = s.registry.events().revision();
    let head: Vec<Bytes> = if sub.resync {
        vec![resync(&ns, revision)]
    } else {
        sub.replay.iter().map(|(_, p)| p.frame()).collect()
    };
    let registry = s.registry.clone();
    let state = (sub.live, ns, Instant::now() + KEEP_ALIVE, permit);
    let live = stream::unfold(state, move |(mut rx, ns, mut ping, permit)| {
        let registry = registry.clone();
        async move {
            let frame = tokio::select! {
                r = rx.recv() => match r {
                    Ok((_, p)) => p.frame(),
                    Err(RecvError::Lagged(_)) => resync(&ns, registry.events().revision()),
                    Err(RecvError::Closed) => return None,
                },
                _ = tokio::time::sleep_until(ping) => {
                    ping = Instant::now() + KEEP_ALIVE;
                    Bytes::from_static(KEEP_ALIVE_FRAME)
                }
            };
            Some((frame, (rx, ns, ping, permit)))
        }
    });
    // End the stream at shutdown so graceful shutdown does not wait on it.
    let stream = stream::iter(head)
        .chain(live)
        .take_until(s.shutdown.clone().cancelled_owned())
        .map(Ok::<_, Infallible>);
    let epoch = s.registry.events().epoch().to_string();
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream".to_string()),
            (header::CACHE_CONTROL, "no-cache".to_string()),
            (header::HeaderName::from_static(EPOCH_HEADER), epoch),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
