//! The change feed behind `GET /v1/namespaces/{ns}/events`.
//!
//! Every event gets a sequence number, increasing across the whole server and across
//! restarts, so a client's `Last-Event-ID` either resumes from the bounded history or,
//! when that history is gone (too old, or never known here), gets a `resync` telling it to
//! refetch the list. With the embedded store the numbering and the history are durable:
//! the store writer numbers and frames each event and commits it with the change it
//! reports (see [`EventLog`]), so after a restart, a crash included, agents resume
//! where they were instead of listing their namespace. With etcd each replica numbers its
//! own events from the wall clock in microseconds at start (a new epoch per process).
//!
//! Each event is framed for SSE once, at publication, into shared [`Bytes`]: the history
//! and every subscriber hold references to the same bytes. A live subscriber holds no
//! queue, only a cursor (the last sequence number it took) into the history and a wake-up
//! channel of its namespace: when it gets to run it takes every event after its cursor at
//! once (see [`Feed::take`]), so a subscriber that falls behind costs nothing until it
//! reads, then catches up in a few large writes instead of one per event. What one
//! subscriber can hold is bounded: a replay of at most [`REPLAY_MAX`] events at subscription
//! (further behind: `resync`); a live subscriber whose cursor fell out of the history
//! (more than [`RING`] events of all namespaces behind) gets `resync`.

use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use shared::{Event, NamespaceName};
use tokio::sync::watch;

use crate::store::EventLog;

/// Events kept (across all namespaces) for resumption and for live subscribers that fall
/// behind: a few hundred bytes each, so about 8 MB; at 5 %/min churn of 20,000 membranes
/// (about 2,000 events a minute) that is eight minutes of history.
pub const RING: usize = 16_384;
/// Most events replayed to a resuming subscriber; further behind, it gets `resync`. A
/// replay holds references to shared frames (16 bytes each) and costs far less than the
/// full list a `resync` leads to: two minutes of the churn above.
pub const REPLAY_MAX: usize = 4096;

/// An event as sent: its type and its whole SSE frame (`id:`, `event:`, `data:` JSON),
/// framed once at publication (so history costs a few hundred bytes per event, and
/// subscribers share the bytes).
#[derive(Debug)]
pub struct Published {
    kind: &'static str,
    frame: Bytes,
}

impl Published {
    /// Frames `event` as number `seq`.
    pub fn new(seq: u64, event: &Event) -> Self {
        // Compact JSON has no newline, so one `data:` line holds it.
        let json = serde_json::to_string(event).unwrap_or_default();
        Published {
            kind: event.kind(),
            frame: Bytes::from(format!(
                "id: {seq}\nevent: {}\ndata: {json}\n\n",
                event.kind()
            )),
        }
    }
    /// The SSE `event:` name.
    pub fn kind(&self) -> &'static str {
        self.kind
    }
    /// An event as kept by the store; `None` for an unknown kind.
    pub fn stored(kind: &str, frame: Vec<u8>) -> Option<Self> {
        Some(Published {
            kind: known_kind(kind)?,
            frame: Bytes::from(frame),
        })
    }
    /// The SSE frame (a reference to the shared bytes).
    pub fn frame(&self) -> Bytes {
        self.frame.clone()
    }
    /// The frame's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.frame
    }
}

/// A sequenced event.
pub type Sequenced = (u64, Arc<Published>);

struct Inner {
    last_seq: u64,
    /// The numbering's identity (see [`EventHub::epoch`]).
    epoch: u64,
    /// Sequence number before the first event of this process.
    start_seq: u64,
    /// Earlier processes' numbers `(start, last)` of this epoch (see [`EventLog`]): a
    /// position in one of them is part of this history.
    segments: Vec<(u64, u64)>,
    /// Recent events of every namespace, oldest first; bounded by [`RING`].
    ring: VecDeque<(NamespaceName, Sequenced)>,
    /// Per namespace: events up to this sequence number have left `ring`.
    dropped_upto: HashMap<NamespaceName, u64>,
    /// Wake-up channels of live subscribers, created by the first subscriber of a namespace
    /// (shared so that a publisher wakes them after releasing the lock).
    live: HashMap<NamespaceName, Arc<watch::Sender<()>>>,
}

/// The `'static` name of a known event kind.
fn known_kind(kind: &str) -> Option<&'static str> {
    ["registered", "deregistered", "state_changed", "resync"]
        .into_iter()
        .find(|k| *k == kind)
}

/// Fan-out of registry events to subscribers, with a bounded history for resumption.
pub struct EventHub {
    inner: Arc<Mutex<Inner>>,
}

/// What a new subscriber gets.
pub struct Subscription {
    /// Events to send first (after the client's `Last-Event-ID`).
    pub replay: Vec<Sequenced>,
    /// The client's position is lost: it must refetch the full list.
    pub resync: bool,
    /// Live events: everything after the replay.
    pub live: Feed,
}

/// A live subscriber's position in the history of its namespace.
pub struct Feed {
    inner: Arc<Mutex<Inner>>,
    ns: NamespaceName,
    /// The last sequence number taken (or skipped: events of other namespaces).
    cursor: u64,
    wake: watch::Receiver<()>,
}

/// What [`Feed::take`] found.
#[derive(Debug)]
pub enum Taken {
    /// Nothing after the cursor.
    Nothing,
    /// The next events, in order; `more`: further events are waiting (a size limit).
    Events {
        /// The events.
        events: Vec<Sequenced>,
        /// More are waiting.
        more: bool,
    },
    /// Events after the cursor left the history before they were taken: the subscriber
    /// must refetch the full list. The cursor moved to this (the last) sequence number.
    Lost(u64),
}

impl Feed {
    /// Waits until an event of the namespace may have been published since the last
    /// [`take`](Self::take) (or this feed's creation); `false` when the hub is gone.
    pub async fn changed(&mut self) -> bool {
        self.wake.changed().await.is_ok()
    }

    /// Whether an event may have been published since the last [`take`](Self::take) (or
    /// this feed's creation), without waiting; `None` when the hub is gone.
    pub fn pending(&self) -> Option<bool> {
        self.wake.has_changed().ok()
    }

    /// Takes the events after the cursor, up to about `max_bytes` of frames (at least one
    /// event), and moves the cursor past them.
    pub fn take(&mut self, max_bytes: usize) -> Taken {
        self.wake.mark_unchanged();
        let inner = self.inner.lock().unwrap();
        if self.cursor < inner.dropped_upto.get(&self.ns).copied().unwrap_or(0) {
            self.cursor = inner.last_seq;
            return Taken::Lost(inner.last_seq);
        }
        let from = inner
            .ring
            .partition_point(|(_, (seq, _))| *seq <= self.cursor);
        let (mut events, mut bytes) = (Vec::new(), 0);
        for (n, item) in inner.ring.range(from..) {
            if n != &self.ns {
                continue;
            }
            if bytes >= max_bytes && !events.is_empty() {
                self.cursor = events.last().map_or(self.cursor, |(s, _): &Sequenced| *s);
                return Taken::Events { events, more: true };
            }
            bytes += item.1.frame.len();
            events.push(item.clone());
        }
        // Everything up to the last event of any namespace has been looked at.
        self.cursor = inner.last_seq;
        if events.is_empty() {
            Taken::Nothing
        } else {
            Taken::Events {
                events,
                more: false,
            }
        }
    }

    /// The next event, waiting for it (one at a time: for tests and simple consumers);
    /// `None` when the hub is gone. A lost position yields a `resync` event.
    pub async fn recv(&mut self) -> Option<Sequenced> {
        loop {
            match self.take(0) {
                Taken::Events { mut events, .. } => return events.pop(),
                Taken::Lost(seq) => {
                    let ev = Event::Resync {
                        namespace: self.ns.clone(),
                    };
                    return Some((seq, Arc::new(Published::new(seq, &ev))));
                }
                Taken::Nothing => {
                    if !self.changed().await {
                        return None;
                    }
                }
            }
        }
    }
}

impl EventHub {
    /// A hub whose first event is numbered after `start_seq`, an epoch of its own.
    pub fn new(start_seq: u64) -> Self {
        EventHub {
            inner: Arc::new(Mutex::new(Inner {
                last_seq: start_seq,
                epoch: start_seq,
                start_seq,
                segments: Vec::new(),
                ring: VecDeque::new(),
                dropped_upto: HashMap::new(),
                live: HashMap::new(),
            })),
        }
    }

    /// The hub continuing the history the store kept: the same epoch, the kept events in
    /// the history (an agent whose `Last-Event-ID` is among or after them resumes), and
    /// numbering from `log.start` (the store writer numbers the events, see
    /// [`EventHub::publish_sequenced`]).
    pub fn from_log(log: &EventLog) -> Self {
        let mut ring = VecDeque::new();
        let mut prev = 0;
        // Events that cannot be replayed (an unknown kind: written by a newer version):
        // their namespace's subscribers behind them resync.
        let mut unreadable: HashMap<NamespaceName, u64> = HashMap::new();
        for e in log
            .recent
            .iter()
            .skip(log.recent.len().saturating_sub(RING))
        {
            // A namespace name that no longer validates cannot be subscribed to anyway.
            let Ok(ns) = NamespaceName::new(&e.namespace) else {
                continue;
            };
            // In order, and before this process's numbers.
            if e.seq <= prev || e.seq > log.start {
                continue;
            }
            prev = e.seq;
            match Published::stored(&e.kind, e.frame.clone()) {
                Some(p) => ring.push_back((ns, (e.seq, Arc::new(p)))),
                None => {
                    unreadable.insert(ns, e.seq);
                }
            }
        }
        // Events up to `before` are not in the ring: a namespace's last one among them is
        // at most `before` (exact when none of its events is in the ring).
        let before = ring.front().map_or(log.start, |(_, (seq, _))| seq - 1);
        let mut dropped_upto: HashMap<NamespaceName, u64> = log
            .namespace_last
            .iter()
            .filter_map(|(ns, seq)| Some((NamespaceName::new(ns).ok()?, (*seq).min(before))))
            .collect();
        for (ns, seq) in unreadable {
            let d = dropped_upto.entry(ns).or_default();
            *d = (*d).max(seq);
        }
        EventHub {
            inner: Arc::new(Mutex::new(Inner {
                last_seq: log.start,
                epoch: log.epoch,
                start_seq: log.start,
                segments: log.segments.clone(),
                ring,
                dropped_upto,
                live: HashMap::new(),
            })),
        }
    }

    /// Numbers and publishes `event` for `ns`; returns its sequence number.
    pub fn publish(&self, ns: &NamespaceName, event: Event) -> u64 {
        let inner = self.inner.lock().unwrap();
        let seq = inner.last_seq + 1;
        let item = (seq, Arc::new(Published::new(seq, &event)));
        Self::publish_locked(inner, ns, item);
        seq
    }

    /// Publishes an event numbered and framed by the store writer, which numbers them in
    /// the order they are published here: after every number published before.
    pub fn publish_sequenced(&self, ns: &NamespaceName, item: Sequenced) {
        let inner = self.inner.lock().unwrap();
        debug_assert!(item.0 > inner.last_seq, "events published out of order");
        if item.0 > inner.last_seq {
            Self::publish_locked(inner, ns, item);
        }
    }

    fn publish_locked(
        mut inner: std::sync::MutexGuard<'_, Inner>,
        ns: &NamespaceName,
        item: Sequenced,
    ) {
        inner.last_seq = item.0;
        if inner.ring.len() == RING
            && let Some((old_ns, (old, _))) = inner.ring.pop_front()
        {
            inner.dropped_upto.insert(old_ns, old);
        }
        inner.ring.push_back((ns.clone(), item));
        let wake = match inner.live.get(ns) {
            // No subscribers left: drop the channel.
            Some(tx) if tx.receiver_count() == 0 => {
                inner.live.remove(ns);
                None
            }
            tx => tx.cloned(),
        };
        drop(inner);
        // Waking every subscriber of a namespace is outside the lock, which they take to
        // read the event.
        if let Some(tx) = wake {
            tx.send_replace(());
        }
    }

    /// This hub's epoch: the identity of its numbering, created with the embedded store's
    /// database (with etcd: the sequence number before the first event, the wall clock in
    /// microseconds at start, so one per process). Event ids and list revisions are only
    /// comparable within one epoch: a client resuming with an id of another epoch (another
    /// replica behind the same address, say) must list instead.
    pub fn epoch(&self) -> u64 {
        self.inner.lock().unwrap().epoch
    }

    /// The sequence number of the last published event.
    pub fn revision(&self) -> u64 {
        self.inner.lock().unwrap().last_seq
    }

    /// Subscribes to `ns`, replaying what came after `last_id`.
    pub fn subscribe(&self, ns: &NamespaceName, last_id: Option<u64>) -> Subscription {
        let mut inner = self.inner.lock().unwrap();
        let live = Feed {
            inner: self.inner.clone(),
            ns: ns.clone(),
            // The replay (or nothing, or a resync) takes the subscriber to here.
            cursor: inner.last_seq,
            wake: inner
                .live
                .entry(ns.clone())
                .or_insert_with(|| Arc::new(watch::channel(()).0))
                .subscribe(),
        };
        let Some(last_id) = last_id else {
            return Subscription {
                replay: Vec::new(),
                resync: false,
                live,
            };
        };
        let dropped = inner.dropped_upto.get(ns).copied().unwrap_or(0);
        // An id from the future, never issued in this history (before it, or by a process
        // whose numbers the store no longer knows), or older than the history kept.
        let known = last_id >= inner.start_seq
            || inner
                .segments
                .iter()
                .any(|&(start, last)| (start..=last).contains(&last_id));
        let lost = last_id > inner.last_seq || !known || last_id < dropped;
        if lost {
            return Subscription {
                replay: Vec::new(),
                resync: true,
                live,
            };
        }
        // The ring is in sequence order: start right after `last_id`.
        let from = inner.ring.partition_point(|(_, (seq, _))| *seq <= last_id);
        let mut replay: Vec<Sequenced> = Vec::new();
        for (n, item) in inner.ring.range(from..) {
            if n == ns {
                // Too far behind: a resync costs one list, a replay would hold this many
                // events.
                if replay.len() == REPLAY_MAX {
                    return Subscription {
                        replay: Vec::new(),
                        resync: true,
                        live,
                    };
                }
                replay.push(item.clone());
            }
        }
        Subscription {
            replay,
            resync: false,
            live,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::MembraneId;

    fn ev(ns: &NamespaceName, id: &str) -> Event {
        Event::Deregistered {
            namespace: ns.clone(),
            id: MembraneId::new(id).unwrap(),
            reason: "deregistered".into(),
        }
    }

    #[test]
    fn resume_replays_only_newer_events_of_that_namespace() {
        let hub = EventHub::new(1000);
        let a = NamespaceName::new("a").unwrap();
        let b = NamespaceName::new("b").unwrap();
        let s1 = hub.publish(&a, ev(&a, "x"));
        hub.publish(&b, ev(&b, "y"));
        let s3 = hub.publish(&a, ev(&a, "z"));
        assert_eq!((s1, s3), (1001, 1003));
        let sub = hub.subscribe(&a, Some(s1));
        assert!(!sub.resync);
        assert_eq!(
            sub.replay.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![s3]
        );
    }

    #[test]
    fn lost_positions_ask_for_resync() {
        let hub = EventHub::new(1000);
        let a = NamespaceName::new("a").unwrap();
        hub.publish(&a, ev(&a, "x"));
        assert!(
            hub.subscribe(&a, Some(5)).resync,
            "id from before this process"
        );
        assert!(hub.subscribe(&a, Some(99_999)).resync, "id from the future");
        for i in 0..RING + 10 {
            hub.publish(&a, ev(&a, &format!("m{i}")));
        }
        assert!(hub.subscribe(&a, Some(1001)).resync, "older than the ring");
        let rev = hub.revision();
        let sub = hub.subscribe(&a, Some(rev - 3));
        assert!(!sub.resync);
        assert_eq!(sub.replay.len(), 3);
    }

    #[test]
    fn replays_are_bounded_and_share_the_published_bytes() {
        let hub = EventHub::new(0);
        let a = NamespaceName::new("a").unwrap();
        let b = NamespaceName::new("b").unwrap();
        for i in 0..REPLAY_MAX + 100 {
            hub.publish(&a, ev(&a, &format!("m{i}")));
            hub.publish(&b, ev(&b, &format!("m{i}")));
        }
        let rev = hub.revision();
        // Within the ring but more than REPLAY_MAX of its namespace behind: resync.
        let far = hub.subscribe(&a, Some(rev - 2 * REPLAY_MAX as u64 - 10));
        assert!(far.resync && far.replay.is_empty());
        // Exactly REPLAY_MAX of `a` behind (interleaved with `b`): replayed, in order.
        let near = hub.subscribe(&a, Some(rev - 2 * REPLAY_MAX as u64));
        assert!(!near.resync);
        assert_eq!(near.replay.len(), REPLAY_MAX);
        assert!(near.replay.windows(2).all(|w| w[0].0 < w[1].0));
        // Two subscribers hold the same bytes, not copies.
        let other = hub.subscribe(&a, Some(rev - 2 * REPLAY_MAX as u64));
        assert!(Arc::ptr_eq(&near.replay[0].1, &other.replay[0].1));
        assert_eq!(
            near.replay[0].1.frame().as_ptr(),
            other.replay[0].1.frame().as_ptr()
        );
        let text = String::from_utf8(near.replay[0].1.frame().to_vec()).unwrap();
        assert!(text.starts_with(&format!(
            "id: {}\nevent: deregistered\ndata: {{",
            near.replay[0].0
        )));
        assert!(text.ends_with("}\n\n"), "{text}");
    }

    fn log_of(hub: &EventHub, start: u64) -> EventLog {
        let inner = hub.inner.lock().unwrap();
        let mut namespace_last = HashMap::new();
        let recent = inner
            .ring
            .iter()
            .map(|(ns, (seq, p))| {
                namespace_last.insert(ns.as_str().to_string(), *seq);
                crate::store::StoredEvent {
                    seq: *seq,
                    namespace: ns.as_str().to_string(),
                    kind: p.kind().to_string(),
                    frame: p.bytes().to_vec(),
                }
            })
            .collect();
        EventLog {
            epoch: inner.epoch,
            segments: vec![(inner.start_seq, inner.last_seq)],
            start,
            namespace_last: namespace_last.into_iter().collect(),
            recent,
            stale: vec![],
            adopted: vec![],
        }
    }

    #[test]
    fn a_hub_from_the_kept_log_resumes_known_positions_only() {
        let hub = EventHub::new(1000);
        let (a, b, c) = (
            NamespaceName::new("a").unwrap(),
            NamespaceName::new("b").unwrap(),
            NamespaceName::new("c").unwrap(),
        );
        let only_c = hub.publish(&c, ev(&c, "only"));
        let first_b = hub.publish(&b, ev(&b, "only"));
        let mut a_seqs = Vec::new();
        for _ in 0..10 {
            a_seqs.push(hub.publish(&a, ev(&a, "m")));
        }
        let mut log = log_of(&hub, 5_000);
        let last = hub.revision();
        // The oldest kept event is `b`'s: `c`'s left the table.
        log.recent.remove(0);
        let next = EventHub::from_log(&log);
        assert_eq!((next.epoch(), next.revision()), (1000, 5_000));
        // Within the kept events: replayed, the same frames.
        let near = next.subscribe(&a, Some(a_seqs[7]));
        assert!(!near.resync);
        assert_eq!(near.replay.len(), 2);
        let before = hub.subscribe(&a, Some(a_seqs[7]));
        assert_eq!(near.replay[1].1.frame(), before.replay[1].1.frame());
        // `c` had everything at its last event, though it is no longer kept; a client that
        // missed it resyncs.
        assert!(!next.subscribe(&c, Some(only_c)).resync);
        assert!(next.subscribe(&c, Some(only_c - 1)).resync);
        assert!(!next.subscribe(&b, Some(first_b - 1)).resync, "b is kept");
        // The previous process's last number, and this process's start, are positions.
        assert!(next.subscribe(&a, Some(last)).replay.is_empty());
        assert!(!next.subscribe(&a, Some(last)).resync);
        assert!(!next.subscribe(&a, Some(5_000)).resync);
        // Numbers no segment holds: issued by a process whose numbers the store lost (a
        // database restored from a backup), or from the future.
        assert!(next.subscribe(&a, Some(last + 1)).resync);
        assert!(next.subscribe(&a, Some(4_999)).resync);
        assert!(next.subscribe(&a, Some(5_001)).resync);
        // An event that cannot be replayed (an unknown kind) is a gap: its namespace's
        // subscribers behind it resync, the others are not concerned.
        let mut odd = log_of(&hub, 5_000);
        let i = odd.recent.len() - 2;
        odd.recent[i].kind = "from_a_newer_version".into();
        let odd = EventHub::from_log(&odd);
        assert!(odd.subscribe(&a, Some(a_seqs[7])).resync);
        assert!(!odd.subscribe(&a, Some(a_seqs[8])).resync);
        assert!(!odd.subscribe(&b, Some(first_b)).resync);
        // The writer's numbers go on after the start.
        let p = Arc::new(Published::new(5_001, &ev(&a, "new")));
        next.publish_sequenced(&a, (5_001, p));
        let sub = next.subscribe(&a, Some(last));
        assert_eq!(
            sub.replay.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [5_001]
        );
    }

    #[tokio::test]
    async fn live_events_reach_subscribers() {
        let hub = EventHub::new(0);
        let a = NamespaceName::new("a").unwrap();
        let mut sub = hub.subscribe(&a, None);
        hub.publish(&a, ev(&a, "x"));
        let (seq, e) = sub.live.recv().await.unwrap();
        assert_eq!(seq, 1);
        assert_eq!(e.kind(), "deregistered");
    }
}
