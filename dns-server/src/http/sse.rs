//! `GET /v1/namespaces/{ns}/events`: registry changes as Server-Sent Events.
//!
//! Each event carries `id:` (its sequence number), `event:` (its type) and `data:` (the
//! JSON of [`shared::Event`]). A client reconnecting with `Last-Event-ID` gets what it
//! missed, or a `resync` event when that history is gone or more than
//! [`REPLAY_MAX`](crate::registry::events::REPLAY_MAX) events long. A live client that falls
//! out of the shared history ([`RING`](crate::registry::events::RING) events) also gets
//! `resync` rather than a silent gap.
//!
//! The response's `Membrane-Event-Epoch` header names the numbering: ids (and list
//! revisions) of another epoch are not comparable, so a client resumes only within one.
//!
//! Every frame sent is the event's bytes, framed once at publication; a subscriber holds
//! no queue, only its position in the shared history, and writes what it missed at once:
//! each subscriber is written to at most once per window, with everything published
//! since its last write; the window grows with the number of subscribers so that fan-out
//! costs a bounded number of writes per second (see [`Pacing`]). Subscribers are capped
//! (`--sse-max-subscribers`): beyond the cap a client gets 503 `too_many_subscribers`.
//!
//! The accept loop writes each stream itself once hyper has parsed the request (see
//! [`detachable`](super::accept::detachable)): hyper's buffers are not kept for the
//! stream's whole life.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, StreamExt};
use shared::{Event, NamespaceName};
use tokio::time::Instant;

use super::AppState;
use super::error::ApiError;
use super::extract::{self, P};
use crate::registry::events::{Feed, Published, Sequenced, Taken};

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

/// Most bytes of events written at once (a subscriber further behind takes several writes,
/// back to back). Each write is one buffer, copied from the shared frames: one chunk, one
/// `writev` (frames handed over one by one cost a chunk each: 15 % more server CPU at
/// 5,000 agents when hyper wrote them). Bounded so that a subscriber behind holds at most
/// this at a time.
const MAX_WRITE: usize = 16 * 1024;

/// How often each subscriber is written to.
///
/// A write costs the server about the same whatever it carries (a wake-up, a system call,
/// a TCP segment: 15-20 µs of CPU measured on loopback), so what fan-out costs is writes
/// per second, not events: each subscriber is written to at most once per *window*, with
/// everything published since its last write. The window is `min_window`, stretched so
/// that all subscribers together make at most `writes_per_sec` writes: 20,000 subscribers
/// at 40,000 writes/s get a write every 500 ms at most, under any churn.
///
/// Each subscriber writes in its own phase of the window (random), so writes are spread
/// over time rather than 20,000 at once after every event: no burst holds up the requests
/// (heartbeats) queued behind it.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// The subscriber cap (for the number of subscribers: cap minus free permits).
    pub cap: usize,
    /// The least window.
    pub min_window: Duration,
    /// Writes per second, all subscribers together.
    pub writes_per_sec: u32,
}

impl Pacing {
    /// The window with `subscribers` subscribers.
    pub fn window(&self, subscribers: usize) -> Duration {
        let spread =
            Duration::from_secs_f64(subscribers as f64 / f64::from(self.writes_per_sec.max(1)));
        self.min_window.max(spread)
    }
}

/// The instant all phases are counted from.
fn origin() -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// The first instant at or after `not_before` that is `phase` (a fraction of the window)
/// into a window counted from [`origin`].
fn next_slot(not_before: Instant, window: Duration, phase: f64) -> Instant {
    let window = window.max(Duration::from_millis(1));
    let offset = window.mul_f64(phase);
    let since = not_before.saturating_duration_since(origin() + offset);
    let k = since.as_nanos().div_ceil(window.as_nanos());
    // (u64 nanoseconds: 584 years of uptime.)
    let after = u64::try_from(k * window.as_nanos()).unwrap_or(u64::MAX);
    let slot = origin() + offset + Duration::from_nanos(after);
    slot.max(not_before)
}

/// A subscriber's live part.
struct Live {
    feed: Feed,
    ns: NamespaceName,
    /// When a keep-alive comment is due.
    ping: Instant,
    /// The last write of events.
    last_write: Option<Instant>,
    /// Events are waiting (the last write was full).
    more: bool,
    /// The last slot found several events: the next slot is likely to find some too, so
    /// it is waited for directly instead of waking first at the next publication (under
    /// steady churn that is one wake-up per write instead of two; with about one event per
    /// window or fewer, an empty slot would cost a wake-up more than it saves).
    busy: bool,
    /// Wake-ups to take events (at a publication, at a slot).
    wakes: u64,
    pacing: Pacing,
    /// This subscriber's phase in the window, in [0, 1).
    phase: f64,
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Live {
    /// The next bytes to send: the events published since the last write, all at once,
    /// at this subscriber's next slot (see [`Pacing`]), or a keep-alive; `None` when the
    /// hub is gone.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if !self.more {
                if !self.busy {
                    tokio::select! {
                        alive = self.feed.changed() => {
                            if !alive {
                                return None;
                            }
                            self.wakes += 1;
                        }
                        _ = tokio::time::sleep_until(self.ping) => {
                            self.ping = Instant::now() + KEEP_ALIVE;
                            return Some(Bytes::from_static(KEEP_ALIVE_FRAME));
                        }
                    }
                }
                let subscribers = self
                    .pacing
                    .cap
                    .saturating_sub(self.permits.available_permits());
                let window = self.pacing.window(subscribers);
                // Half a window after the last write at the earliest: the subscriber's next
                // slot is then a whole window after it (if the window has not changed).
                let not_before = self
                    .last_write
                    .map_or_else(Instant::now, |at| (at + window / 2).max(Instant::now()));
                tokio::time::sleep_until(next_slot(not_before, window, self.phase)).await;
                self.wakes += 1;
            }
            let (bytes, more, several) = match self.feed.take(MAX_WRITE) {
                Taken::Nothing => {
                    // Quiet: wait for the next publication again.
                    (self.more, self.busy) = (false, false);
                    continue;
                }
                Taken::Lost(seq) => (resync(&self.ns, seq), false, false),
                Taken::Events { events, more } => (concat(&events), more, events.len() > 1),
            };
            let now = Instant::now();
            (self.more, self.busy) = (more, several);
            self.last_write = Some(now);
            self.ping = now + KEEP_ALIVE;
            return Some(bytes);
        }
    }
}

/// The frames of `events` as one buffer (one event: its shared bytes, no copy).
fn concat(events: &[Sequenced]) -> Bytes {
    if let [(_, one)] = events {
        return one.frame();
    }
    let mut buf = BytesMut::with_capacity(events.iter().map(|(_, p)| p.bytes().len()).sum());
    for (_, p) in events {
        buf.extend_from_slice(p.bytes());
    }
    buf.freeze()
}

/// The handler.
pub async fn events(
    State(s): State<AppState>,
    P(ns): P<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let ns = extract::ns(&ns)?;
    s.registry.check_namespace(&ns)?;
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
    let state = Live {
        feed: sub.live,
        ns,
        ping: Instant::now() + KEEP_ALIVE,
        last_write: None,
        more: false,
        busy: false,
        wakes: 0,
        pacing: s.sse_pacing,
        phase: rand::random::<f64>(),
        permits: s.sse_permits.clone(),
        _permit: permit,
    };
    let live = stream::unfold(state, |mut st| async move {
        let frame = st.next().await?;
        Some((frame, st))
    });
    // End the stream at shutdown so graceful shutdown does not wait on it.
    let stream = stream::iter(head)
        .chain(live)
        .take_until(s.shutdown.clone().cancelled_owned());
    // Written by the connection itself, without hyper's per-connection buffers.
    let (body, detach) = super::accept::detachable(stream);
    let epoch = s.registry.events().epoch().to_string();
    let mut resp = (
        [
            (header::CONTENT_TYPE, "text/event-stream".to_string()),
            (header::CACHE_CONTROL, "no-cache".to_string()),
            (header::HeaderName::from_static(EPOCH_HEADER), epoch),
        ],
        body,
    )
        .into_response();
    resp.extensions_mut().insert(detach);
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::tests::gone;
    use crate::registry::events::EventHub;
    use std::sync::Arc;

    /// A subscriber of `hub` with a 20 ms window.
    fn live(hub: &EventHub, ns: &NamespaceName, phase: f64) -> Live {
        let permits = Arc::new(tokio::sync::Semaphore::new(8));
        let permit = permits.clone().try_acquire_owned().unwrap();
        Live {
            feed: hub.subscribe(ns, None).live,
            ns: ns.clone(),
            ping: Instant::now() + KEEP_ALIVE,
            last_write: None,
            more: false,
            busy: false,
            wakes: 0,
            pacing: Pacing {
                cap: 8,
                min_window: Duration::from_millis(20),
                writes_per_sec: 1_000,
            },
            phase,
            permits,
            _permit: permit,
        }
    }

    /// Collects what `live` yields until `n` events came: (instant, sequence number).
    async fn collect(live: &mut Live, n: usize) -> Vec<(Instant, u64)> {
        let mut got = Vec::new();
        while got.len() < n {
            let frame = live.next().await.unwrap();
            let text = std::str::from_utf8(&frame).unwrap();
            for line in text.lines() {
                if let Some(id) = line.strip_prefix("id: ") {
                    got.push((Instant::now(), id.parse().unwrap()));
                }
            }
        }
        got
    }

    /// Events published one by one, 4 ms apart, reach a subscriber at most once per
    /// window (20 ms), every one of them in order: the frames of one window go out as one
    /// write, not one write per event.
    #[tokio::test(start_paused = true)]
    async fn writes_to_a_subscriber_are_paced_per_window() {
        let hub = Arc::new(EventHub::new(0));
        let ns = NamespaceName::new("a").unwrap();
        let mut sub = live(&hub, &ns, 0.5);
        let publisher = {
            let (hub, ns) = (hub.clone(), ns.clone());
            tokio::spawn(async move {
                for i in 0..100 {
                    hub.publish(&ns, gone(&ns, i));
                    tokio::time::sleep(Duration::from_millis(4)).await;
                }
            })
        };
        let started = Instant::now();
        let got = collect(&mut sub, 100).await;
        publisher.await.unwrap();
        assert_eq!(
            got.iter().map(|g| g.1).collect::<Vec<_>>(),
            (1..=100).collect::<Vec<_>>()
        );
        let mut writes: Vec<Instant> = got.iter().map(|g| g.0).collect();
        writes.dedup();
        // 400 ms of events: about 20 windows, never one write per event.
        assert!(writes.len() <= 22, "{} writes", writes.len());
        assert!(
            writes
                .windows(2)
                .all(|w| w[1] - w[0] >= Duration::from_millis(20))
        );
        // Each write at the subscriber's phase: 10 ms into a 20 ms window.
        for w in &writes {
            assert_eq!((*w - origin()).as_millis() % 20, 10, "{:?}", *w - started);
        }
        // Under steady events, woken once per write (at its slot), not also at each
        // publication before it.
        assert!(
            sub.wakes <= writes.len() as u64 + 2,
            "{} wake-ups for {} writes",
            sub.wakes,
            writes.len()
        );
        // Quiet again: after one slot that finds nothing, the subscriber waits for the
        // next publication (not for slots: 50 of them in a second).
        let before = sub.wakes;
        let quiet = tokio::spawn(async move {
            let frame = sub.next().await;
            (frame, sub.wakes)
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!quiet.is_finished());
        hub.publish(&ns, gone(&ns, 100));
        let (frame, wakes) = quiet.await.unwrap();
        assert!(String::from_utf8_lossy(&frame.unwrap()).contains("id: 101"));
        assert!(
            wakes - before <= 3,
            "{} wake-ups while quiet",
            wakes - before
        );
    }

    /// A burst goes out in one write; subscribers with other phases write at other
    /// instants (spread, not all at once).
    #[tokio::test(start_paused = true)]
    async fn a_burst_is_one_write_and_phases_spread_subscribers() {
        let hub = EventHub::new(0);
        let ns = NamespaceName::new("a").unwrap();
        let (mut early, mut late) = (live(&hub, &ns, 0.1), live(&hub, &ns, 0.9));
        for i in 0..200 {
            hub.publish(&ns, gone(&ns, i));
        }
        let (a, b) = (
            collect(&mut early, 200).await,
            collect(&mut late, 200).await,
        );
        assert!(a.iter().all(|g| g.0 == a[0].0), "one write");
        assert!(b.iter().all(|g| g.0 == b[0].0), "one write");
        assert_eq!((a[0].0 - origin()).as_millis() % 20, 2);
        assert_eq!((b[0].0 - origin()).as_millis() % 20, 18);
    }

    #[test]
    fn the_window_stretches_with_subscribers_to_cap_writes() {
        let p = Pacing {
            cap: 30_000,
            min_window: Duration::from_millis(50),
            writes_per_sec: 40_000,
        };
        assert_eq!(p.window(0), Duration::from_millis(50));
        assert_eq!(p.window(1_000), Duration::from_millis(50));
        assert_eq!(p.window(4_000), Duration::from_millis(100));
        assert_eq!(p.window(20_000), Duration::from_millis(500));
    }

    #[test]
    fn slots_are_a_window_apart_at_the_subscribers_phase() {
        let w = Duration::from_millis(100);
        let start = origin() + Duration::from_secs(7) + Duration::from_millis(3);
        let a = next_slot(start, w, 0.25);
        // The first instant 25 ms into a window: 7.025 s after the origin.
        assert_eq!(a - origin(), Duration::from_millis(7_025));
        // Exactly on a slot: that slot; just after: the next one.
        assert_eq!(next_slot(a, w, 0.25), a);
        assert_eq!(next_slot(a + Duration::from_millis(1), w, 0.25), a + w);
        // Another phase, the same window: another instant.
        assert_eq!(
            next_slot(start, w, 0.75) - origin(),
            Duration::from_millis(7_075)
        );
    }
}
