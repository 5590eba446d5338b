//! The change feed behind `GET /v1/namespaces/{ns}/events`.
//!
//! Every event gets a sequence number, increasing across the whole server and across
//! restarts (it starts from the wall clock in microseconds), so a client's `Last-Event-ID`
//! either resumes from the per-namespace ring buffer or, when that history is gone (too old,
//! or from before a restart), gets a `resync` telling it to refetch the list.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use shared::{Event, NamespaceName};
use tokio::sync::broadcast;

/// Events kept per namespace for resumption.
const RING: usize = 4096;

/// A sequenced event.
pub type Sequenced = (u64, Arc<Event>);

struct NsLog {
    ring: VecDeque<Sequenced>,
    /// Every event with a sequence number up to this one is no longer in `ring`.
    dropped_upto: u64,
    tx: broadcast::Sender<Sequenced>,
}

struct Inner {
    last_seq: u64,
    /// Sequence number before the first event of this process.
    start_seq: u64,
    logs: HashMap<NamespaceName, NsLog>,
}

/// Fan-out of registry events to subscribers, with per-namespace history.
pub struct EventHub {
    inner: Mutex<Inner>,
}

/// What a new subscriber gets.
pub struct Subscription {
    /// Events to send first (after the client's `Last-Event-ID`).
    pub replay: Vec<Sequenced>,
    /// The client's position is lost: it must refetch the full list.
    pub resync: bool,
    /// Live events.
    pub live: broadcast::Receiver<Sequenced>,
}

impl EventHub {
    /// A hub whose first event is numbered after `start_seq`.
    pub fn new(start_seq: u64) -> Self {
        EventHub {
            inner: Mutex::new(Inner {
                last_seq: start_seq,
                start_seq,
                logs: HashMap::new(),
            }),
        }
    }

    fn log<'a>(inner: &'a mut Inner, ns: &NamespaceName) -> &'a mut NsLog {
        let start = inner.last_seq;
        inner.logs.entry(ns.clone()).or_insert_with(|| NsLog {
            ring: VecDeque::new(),
            dropped_upto: start,
            tx: broadcast::channel(RING).0,
        })
    }

    /// Numbers and publishes `event` for `ns`; returns its sequence number.
    pub fn publish(&self, ns: &NamespaceName, event: Event) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        inner.last_seq += 1;
        let seq = inner.last_seq;
        let log = Self::log(&mut inner, ns);
        let item = (seq, Arc::new(event));
        if log.ring.len() == RING
            && let Some((old, _)) = log.ring.pop_front()
        {
            log.dropped_upto = old;
        }
        log.ring.push_back(item.clone());
        // No receivers is fine.
        let _ = log.tx.send(item);
        seq
    }

    /// The sequence number of the last published event.
    pub fn revision(&self) -> u64 {
        self.inner.lock().unwrap().last_seq
    }

    /// Subscribes to `ns`, replaying what came after `last_id`.
    pub fn subscribe(&self, ns: &NamespaceName, last_id: Option<u64>) -> Subscription {
        let mut inner = self.inner.lock().unwrap();
        let (last_seq, start_seq) = (inner.last_seq, inner.start_seq);
        let log = Self::log(&mut inner, ns);
        let live = log.tx.subscribe();
        let Some(last_id) = last_id else {
            return Subscription {
                replay: Vec::new(),
                resync: false,
                live,
            };
        };
        // An id from the future, or from before this process, or older than the ring.
        let lost = last_id > last_seq || last_id < start_seq || last_id < log.dropped_upto;
        if lost {
            return Subscription {
                replay: Vec::new(),
                resync: true,
                live,
            };
        }
        let replay = log
            .ring
            .iter()
            .filter(|(seq, _)| *seq > last_id)
            .cloned()
            .collect();
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
