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
//! Once hyper has parsed the request, the stream leaves hyper (see
//! [`detachable_paced`](super::accept::detachable_paced)): on plain TCP a subscriber is a
//! [`Paced`] source visited at its slots by the accept loop's paced writer
//! ([`paced`](super::paced)), with TLS a stream its connection writes. Hyper's buffers are
//! not kept for the stream's whole life.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, StreamExt};
use shared::{Event, NamespaceName};
use tokio::time::Instant;

use super::AppState;
use super::accept::{DetachedStream, Paced, Visit};
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
/// A write costs the server about the same whatever it carries (a system call, a TCP
/// segment: about 10 µs of CPU measured on loopback), so what fan-out costs is writes
/// per second, not events: each subscriber is written to at most once per *window*, with
/// everything published since its last write. The window is `min_window`, stretched so
/// that all subscribers together make at most `writes_per_sec` writes: 20,000 subscribers
/// at 40,000 writes/s get a write every 500 ms at most, under any churn.
///
/// Each subscriber writes in its own phase of the window (random at first, then a window
/// after its last slot), so writes are spread over time rather than 20,000 at once after
/// every event: no burst holds up the requests (heartbeats) queued behind it.
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

/// The first of the slots `slot`, `slot + window`, `slot + 2 window`, ... that is after
/// `after`. Slots are counted from the subscriber's own last slot, so that a change of the
/// window (of the number of subscribers) moves only the slots after it: counted from a
/// common origin, a window 25 µs longer (one subscriber more at 40,000 writes/s) moved the
/// slot of a server up for an hour by over a window, and a write came up to one and a half
/// windows after the last.
fn slot_after(slot: Instant, window: Duration, after: Instant) -> Instant {
    if slot > after {
        return slot;
    }
    let window = window.max(Duration::from_millis(1));
    let k = (after - slot).as_nanos() / window.as_nanos() + 1;
    // (u64 nanoseconds: 584 years.)
    slot + Duration::from_nanos(u64::try_from(k * window.as_nanos()).unwrap_or(u64::MAX))
}

/// A subscriber's live part.
struct Live {
    feed: Feed,
    ns: NamespaceName,
    /// When a keep-alive comment is due.
    ping: Instant,
    /// The subscriber's last slot (the first: its phase in the first window, at random):
    /// its writes of events are at this plus whole windows.
    slot: Instant,
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
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// Ends the stream when it paces itself ([`Paced::into_stream`]).
    shutdown: tokio_util::sync::CancellationToken,
}

impl Live {
    /// The window for the current number of subscribers.
    fn window(&self) -> Duration {
        let subscribers = self
            .pacing
            .cap
            .saturating_sub(self.permits.available_permits());
        self.pacing.window(subscribers)
    }

    /// The paced writer's next visit after `now`: the next slot, or the keep-alive if due
    /// before it.
    fn next_visit(&mut self, now: Instant) -> Instant {
        self.slot_after(now).min(self.ping)
    }

    /// This subscriber's first slot after `after` (see [`slot_after`]), now its last.
    fn slot_after(&mut self, after: Instant) -> Instant {
        self.slot = slot_after(self.slot, self.window(), after);
        self.slot
    }

    /// The events published since the last write, at most [`MAX_WRITE`] of them (`more`
    /// is set when others wait), or a `resync`; `None` when there are none.
    fn take(&mut self, now: Instant) -> Option<Bytes> {
        let (bytes, more, several) = match self.feed.take(MAX_WRITE) {
            Taken::Nothing => {
                (self.more, self.busy) = (false, false);
                return None;
            }
            Taken::Lost(seq) => (resync(&self.ns, seq), false, false),
            Taken::Events { events, more } => (concat(&events), more, events.len() > 1),
        };
        (self.more, self.busy) = (more, several);
        self.ping = now + KEEP_ALIVE;
        Some(bytes)
    }

    /// The next bytes to send: the events published since the last write, all at once,
    /// at this subscriber's next slot (see [`Pacing`]), or a keep-alive; `None` when the
    /// hub is gone. (The pacing of a stream not written by the paced writer.)
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
                let at = self.slot_after(Instant::now());
                tokio::time::sleep_until(at).await;
                self.wakes += 1;
            }
            if let Some(bytes) = self.take(Instant::now()) {
                return Some(bytes);
            }
        }
    }
}

impl Paced for Live {
    /// At each of the subscriber's slots: what was published since the last write, or a
    /// keep-alive when due; back to back while more events wait. A keep-alive due before the
    /// next slot (a window longer than [`KEEP_ALIVE`]) gets a visit of its own, which does
    /// not move the slots.
    fn visit(&mut self, now: Instant) -> Visit {
        let Some(published) = self.feed.pending() else {
            return Visit::End;
        };
        if (published || self.more)
            && let Some(bytes) = self.take(now)
        {
            let at = if self.more { now } else { self.next_visit(now) };
            return Visit::Write(bytes, at);
        }
        if now >= self.ping {
            self.ping = now + KEEP_ALIVE;
            return Visit::Write(Bytes::from_static(KEEP_ALIVE_FRAME), self.next_visit(now));
        }
        Visit::Wait(self.next_visit(now))
    }

    fn into_stream(self: Box<Self>) -> DetachedStream {
        let shutdown = self.shutdown.clone();
        // End the stream at shutdown so graceful shutdown does not wait on it.
        Box::pin(
            stream::unfold(*self, |mut st| async move {
                let frame = st.next().await?;
                Some((frame, st))
            })
            .take_until(shutdown.cancelled_owned()),
        )
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
    // A position that is not one of ours (not a number) is a lost one: `u64::MAX` is
    // from the future, which gets `resync`, never a silent fresh start.
    let last_id = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("?").trim())
        .filter(|v| !v.is_empty())
        .map(|v| v.parse::<u64>().unwrap_or(u64::MAX));
    let sub = s.registry.events().subscribe(&ns, last_id);
    let revision = s.registry.events().revision();
    let head: Vec<Bytes> = if sub.resync {
        vec![resync(&ns, revision)]
    } else {
        sub.replay.iter().map(|(_, p)| p.frame()).collect()
    };
    let mut state = Live {
        feed: sub.live,
        ns,
        ping: Instant::now() + KEEP_ALIVE,
        slot: Instant::now(),
        more: false,
        busy: false,
        wakes: 0,
        pacing: s.sse_pacing,
        permits: s.sse_permits.clone(),
        _permit: permit,
        shutdown: s.shutdown.clone(),
    };
    // The first slot in the first window, at random: subscribers are spread over it.
    state.slot += state.window().mul_f64(rand::random::<f64>());
    // Written by the connection (or the paced writer), without hyper's per-connection
    // buffers.
    let (body, detach) = super::accept::detachable_paced(head, Box::new(state));
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
            slot: Instant::now() + Duration::from_millis(20).mul_f64(phase),
            more: false,
            busy: false,
            wakes: 0,
            pacing: Pacing {
                cap: 8,
                min_window: Duration::from_millis(20),
                writes_per_sec: 1_000,
            },
            permits,
            _permit: permit,
            shutdown: Default::default(),
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
            assert_eq!((*w - started).as_millis() % 20, 10, "{:?}", *w - started);
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
        let created = Instant::now();
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
        assert_eq!((a[0].0 - created).as_millis() % 20, 2);
        assert_eq!((b[0].0 - created).as_millis() % 20, 18);
    }

    /// Visited as the paced writer does (at the instants it asks for): events published
    /// 4 ms apart go out once per window at the subscriber's phase, all of them in order; a
    /// quiet subscriber is visited once per window and writes nothing until a keep-alive is
    /// due.
    #[tokio::test(start_paused = true)]
    async fn visits_write_once_per_window_at_the_phase_and_keep_alive_when_quiet() {
        let hub = Arc::new(EventHub::new(0));
        let ns = NamespaceName::new("a").unwrap();
        let mut sub = live(&hub, &ns, 0.5);
        let start = Instant::now();
        let mut at = start;
        let (mut writes, mut ids, mut keep_alives, mut quiet_visits) = (vec![], vec![], 0, 0);
        let mut published = 0;
        while at < start + KEEP_ALIVE + Duration::from_secs(1) {
            // Publish what is due by the visit, 4 ms apart for the first 400 ms.
            while published < 100 && start + Duration::from_millis(4 * published) <= at {
                hub.publish(&ns, gone(&ns, published as usize));
                published += 1;
            }
            tokio::time::sleep_until(at).await;
            let next = match sub.visit(at) {
                Visit::Write(bytes, next) => {
                    let text = String::from_utf8(bytes.to_vec()).unwrap();
                    if text == std::str::from_utf8(KEEP_ALIVE_FRAME).unwrap() {
                        keep_alives += 1;
                    } else {
                        writes.push(at);
                        ids.extend(
                            text.lines()
                                .filter_map(|l| l.strip_prefix("id: "))
                                .map(|id| id.parse::<u64>().unwrap()),
                        );
                    }
                    next
                }
                Visit::Wait(next) => {
                    if published == 100 {
                        quiet_visits += 1;
                    }
                    next
                }
                Visit::End => panic!("ended with the hub alive"),
            };
            assert!(next > at, "visited again at once without more to write");
            at = next;
        }
        assert_eq!(ids, (1..=100).collect::<Vec<_>>());
        assert!(writes.len() <= 23, "{} writes", writes.len());
        // The first visit is at the hand-in (the writer's), the next ones at slots.
        let slotted = &writes[1..];
        assert!(
            slotted
                .windows(2)
                .all(|w| w[1] - w[0] >= Duration::from_millis(20))
        );
        for w in slotted {
            assert_eq!((*w - start).as_millis() % 20, 10);
        }
        // Quiet for about 15 s at one visit per 20 ms window.
        assert!(
            (700..=800).contains(&quiet_visits),
            "{quiet_visits} quiet visits"
        );
        assert_eq!(keep_alives, 1);
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
    fn slots_are_a_window_apart_from_the_last_one() {
        let t0 = Instant::now();
        let w = Duration::from_millis(100);
        let first = t0 + Duration::from_millis(25);
        // Before the first slot: it; on a slot or just after: the next one.
        assert_eq!(slot_after(first, w, t0), first);
        assert_eq!(slot_after(first, w, first), first + w);
        assert_eq!(
            slot_after(first, w, first + Duration::from_millis(1)),
            first + w
        );
        assert_eq!(slot_after(first, w, first + w * 7 + w / 2), first + w * 8);
    }

    /// With a window longer than the keep-alive interval (few writes per second for many
    /// subscribers), keep-alives still go out every 15 s, between slots, and do not move
    /// them.
    #[tokio::test(start_paused = true)]
    async fn keep_alives_are_not_held_back_by_a_long_window() {
        let hub = EventHub::new(0);
        let ns = NamespaceName::new("a").unwrap();
        let mut sub = live(&hub, &ns, 0.5);
        sub.pacing.min_window = Duration::from_secs(40);
        let start = Instant::now();
        let slot = sub.slot;
        let mut at = start;
        let mut pings = vec![];
        while at < start + Duration::from_secs(50) {
            tokio::time::sleep_until(at).await;
            at = match sub.visit(at) {
                Visit::Write(bytes, next) => {
                    assert_eq!(&bytes[..], KEEP_ALIVE_FRAME);
                    pings.push(at - start);
                    next
                }
                Visit::Wait(next) => next,
                Visit::End => panic!("ended"),
            };
        }
        let s = Duration::from_secs;
        assert_eq!(pings, vec![s(15), s(30), s(45)]);
        // The first slot (10 ms in: phase 0.5 of the 20 ms window it was made with), then
        // one 40 s window after it, whatever the keep-alives in between.
        assert_eq!(sub.slot, slot + s(40) * 2);
    }

    /// The window grows by 25 µs (one subscriber more at 40,000 writes/s) on a server up
    /// for a day: the next slot is still one window after the last, not anywhere in the
    /// window (as with slots counted from the server's start: 86,400 s / 100 ms windows
    /// times 25 µs moved it by 86 windows' worth).
    #[tokio::test(start_paused = true)]
    async fn a_window_change_moves_only_the_slots_after_it() {
        let hub = EventHub::new(0);
        let ns = NamespaceName::new("a").unwrap();
        let mut sub = live(&hub, &ns, 0.5);
        tokio::time::advance(Duration::from_secs(86_400)).await;
        let now = Instant::now();
        let last = sub.slot_after(now);
        assert!(last > now && last - now <= Duration::from_millis(20));
        sub.pacing.min_window = Duration::from_millis(20) + Duration::from_micros(25);
        assert_eq!(sub.slot_after(last), last + sub.pacing.min_window);
    }
}
