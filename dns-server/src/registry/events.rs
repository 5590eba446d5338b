//! The change feed behind `GET /v1/namespaces/{ns}/events`.
//!
//! Every event gets a sequence number, increasing across the whole server and across
//! restarts (it starts from the wall clock in microseconds), so a client's `Last-Event-ID`
//! either resumes from the bounded history or, when that history is gone (too old,
//! or from before a restart), gets a `resync` telling it to refetch the list.
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
    /// Sequence number before the first event of this process.
    start_seq: u64,
    /// Recent events of every namespace, oldest first; bounded by [`RING`].
    ring: VecDeque<(NamespaceName, Sequenced)>,
    /// Per namespace: events up to this sequence number have left `ring`.
    dropped_upto: HashMap<NamespaceName, u64>,
    /// Wake-up channels of live subscribers, created by the first subscriber of a namespace
    /// (shared so that a publisher wakes them after releasing the lock).
    live: HashMap<NamespaceName, Arc<watch::Sender<()>>>,
    /// Per namespace: the sequence number of its last event in this epoch (what a clean
    /// shutdown hands to the next process, see [`Position`]).
    ns_last: HashMap<NamespaceName, u64>,
}

/// Where a hub's numbering stands: what a clean shutdown saves so that the next process
/// continues the same epoch (see [`EventHub::restore`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    /// The epoch.
    pub epoch: u64,
    /// The last sequence number used.
    pub last_seq: u64,
    /// Per namespace, the sequence number of its last event in the epoch.
    pub namespaces: std::collections::BTreeMap<String, u64>,
    /// The last events (at most [`REPLAY_MAX`]), oldest first: the next process replays
    /// them to clients a little behind (events published while the streams were closing,
    /// or not yet delivered) instead of sending `resync`.
    #[serde(default)]
    pub tail: Vec<TailEvent>,
}

/// One saved event of [`Position::tail`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TailEvent {
    /// Namespace.
    pub ns: String,
    /// Sequence number.
    pub seq: u64,
    /// SSE `event:` name.
    pub kind: String,
    /// The whole SSE frame, as sent.
    pub frame: String,
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
    /// A hub whose first event is numbered after `start_seq`.
    pub fn new(start_seq: u64) -> Self {
        EventHub {
            inner: Arc::new(Mutex::new(Inner {
                last_seq: start_seq,
                start_seq,
                ring: VecDeque::new(),
                dropped_upto: HashMap::new(),
                live: HashMap::new(),
                ns_last: HashMap::new(),
            })),
        }
    }

    /// Where the numbering stands (epoch, last sequence number, each namespace's last
    /// event).
    pub fn position(&self) -> Position {
        let inner = self.inner.lock().unwrap();
        Position {
            epoch: inner.start_seq,
            last_seq: inner.last_seq,
            namespaces: inner
                .ns_last
                .iter()
                .map(|(ns, seq)| (ns.as_str().to_string(), *seq))
                .collect(),
            tail: inner
                .ring
                .iter()
                .skip(inner.ring.len().saturating_sub(REPLAY_MAX))
                .filter_map(|(ns, (seq, p))| {
                    Some(TailEvent {
                        ns: ns.as_str().to_string(),
                        seq: *seq,
                        kind: p.kind.to_string(),
                        frame: String::from_utf8(p.frame.to_vec()).ok()?,
                    })
                })
                .collect(),
        }
    }

    /// Continues the epoch of `pos` (saved by a clean shutdown of the previous process):
    /// numbering goes on after `pos.last_seq`, and a client resuming with an id of that
    /// epoch resumes: replayed from the saved tail of events, or with nothing to replay
    /// when it had every event of its namespace; a client further behind than the tail
    /// gets `resync`. Only before the first event (else
    /// `false`, nothing changed).
    pub fn restore(&self, pos: &Position) -> bool {
        let mut inner = self.inner.lock().unwrap();
        if inner.last_seq != inner.start_seq || pos.last_seq < pos.epoch {
            return false;
        }
        let mut last = HashMap::new();
        for (ns, seq) in &pos.namespaces {
            // A namespace name that no longer validates cannot be subscribed to anyway.
            if let Ok(n) = NamespaceName::new(ns) {
                last.insert(n, (*seq).clamp(pos.epoch, pos.last_seq));
            }
        }
        // The saved tail: in order, within the epoch, at most REPLAY_MAX.
        let mut ring = VecDeque::new();
        let mut prev = pos.epoch;
        for t in pos
            .tail
            .iter()
            .skip(pos.tail.len().saturating_sub(REPLAY_MAX))
        {
            let (Ok(ns), Some(kind)) = (NamespaceName::new(&t.ns), known_kind(&t.kind)) else {
                continue;
            };
            if t.seq <= prev || t.seq > pos.last_seq {
                continue;
            }
            prev = t.seq;
            let frame = Bytes::from(t.frame.clone());
            ring.push_back((ns, (t.seq, Arc::new(Published { kind, frame }))));
        }
        // Events up to `before` are not in the ring: a namespace's last one among them
        // is at most `before` (exact when none of its events is in the tail).
        let before = ring.front().map_or(pos.last_seq, |(_, (seq, _))| seq - 1);
        inner.dropped_upto = last
            .iter()
            .map(|(ns, seq)| (ns.clone(), (*seq).min(before)))
            .collect();
        inner.start_seq = pos.epoch;
        inner.last_seq = pos.last_seq;
        inner.ring = ring;
        inner.ns_last = last;
        true
    }

    /// Numbers and publishes `event` for `ns`; returns its sequence number.
    pub fn publish(&self, ns: &NamespaceName, event: Event) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        inner.last_seq += 1;
        let seq = inner.last_seq;
        let item = (seq, Arc::new(Published::new(seq, &event)));
        if inner.ring.len() == RING
            && let Some((old_ns, (old, _))) = inner.ring.pop_front()
        {
            inner.dropped_upto.insert(old_ns, old);
        }
        inner.ring.push_back((ns.clone(), item));
        inner.ns_last.insert(ns.clone(), seq);
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
        seq
    }

    /// This hub's epoch: the sequence number before its first event, unique per process
    /// (the wall clock in microseconds at start). Event ids and list revisions are only
    /// comparable within one epoch: a client resuming with an id of another epoch (another
    /// replica behind the same address, say) must list instead.
    pub fn epoch(&self) -> u64 {
        self.inner.lock().unwrap().start_seq
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
        // An id from the future, from before this process, or older than the history.
        let lost = last_id > inner.last_seq || last_id < inner.start_seq || last_id < dropped;
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

    #[test]
    fn a_restored_hub_replays_the_saved_tail_and_resyncs_further_behind() {
        let hub = EventHub::new(1000);
        let (a, b) = (
            NamespaceName::new("a").unwrap(),
            NamespaceName::new("b").unwrap(),
        );
        let first_b = hub.publish(&b, ev(&b, "only"));
        let mut a_seqs = Vec::new();
        for i in 0..REPLAY_MAX + 10 {
            a_seqs.push(hub.publish(&a, ev(&a, &format!("m{i}"))));
        }
        let pos = hub.position();
        assert_eq!(pos.tail.len(), REPLAY_MAX);
        assert_eq!(pos.namespaces["b"], first_b);
        let json = serde_json::to_string(&pos).unwrap();
        let next = EventHub::new(5_000_000);
        assert!(next.restore(&serde_json::from_str(&json).unwrap()));
        assert_eq!((next.epoch(), next.revision()), (1000, pos.last_seq));
        // Within the tail: replayed, the same frames.
        let n = a_seqs.len();
        let near = next.subscribe(&a, Some(a_seqs[n - 3]));
        assert!(!near.resync);
        assert_eq!(near.replay.len(), 2);
        let before = hub.subscribe(&a, Some(a_seqs[n - 2]));
        assert_eq!(near.replay[1].1.frame(), before.replay[0].1.frame());
        // Before the tail: resync; `b` had everything at its last event.
        assert!(next.subscribe(&a, Some(a_seqs[0])).resync);
        assert!(!next.subscribe(&b, Some(first_b)).resync);
        assert!(next.subscribe(&b, Some(first_b - 1)).resync);
        // Numbering continues; a second restore is refused.
        assert_eq!(next.publish(&b, ev(&b, "new")), pos.last_seq + 1);
        assert!(!next.restore(&pos));
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
