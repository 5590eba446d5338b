//! Shared answers of `GET /v1/namespaces/{ns}/membranes`.
//!
//! When agents must list a namespace all at once (a new database, or a history they fell
//! out of: every agent of the namespace lists), thousands of identical lists arrive within
//! seconds, all at the same revision. Each answer is serialized once per (namespace,
//! query, epoch, revision) and shared for at most [`MAX_AGE`]: membership and health are
//! exact as of the answer's `revision` (every change is a new revision, so a change is
//! never answered from here), only `last_heartbeat` may be up to [`MAX_AGE`] old.
//! Bounded: [`MAX_ENTRIES`] answers and [`MAX_BYTES`] in all; an answer larger than a
//! quarter of that is not kept, and expired answers are dropped at the next one kept.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

/// How long an answer is shared.
pub const MAX_AGE: Duration = Duration::from_secs(1);
/// Most answers kept.
pub const MAX_ENTRIES: usize = 64;
/// Most bytes kept, all answers together (a list of 20,000 membranes is about 6 MB).
pub const MAX_BYTES: usize = 32 << 20;

/// Which answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListKey {
    /// The namespace.
    pub namespace: String,
    /// The raw query string (filters).
    pub query: String,
}

struct Entry {
    epoch: u64,
    revision: u64,
    at: Instant,
    body: Bytes,
}

/// The shared answers.
#[derive(Default)]
pub struct ListCache {
    entries: Mutex<HashMap<ListKey, Entry>>,
}

/// Bytes held by `entries`.
fn held(entries: &HashMap<ListKey, Entry>) -> usize {
    entries.values().map(|e| e.body.len()).sum()
}

impl ListCache {
    /// The answer for `key` serialized at `revision` of `epoch` less than [`MAX_AGE`] ago.
    pub fn get(&self, key: &ListKey, epoch: u64, revision: u64) -> Option<Bytes> {
        let entries = self.entries.lock().unwrap();
        let e = entries.get(key)?;
        (e.epoch == epoch && e.revision == revision && e.at.elapsed() < MAX_AGE)
            .then(|| e.body.clone())
    }

    /// Keeps `body`, the answer for `key` at `revision` of `epoch`.
    pub fn put(&self, key: ListKey, epoch: u64, revision: u64, body: Bytes) {
        if body.len() > MAX_BYTES / 4 {
            return;
        }
        let mut entries = self.entries.lock().unwrap();
        // Expired answers go first (at most MAX_ENTRIES to look at).
        entries.remove(&key);
        entries.retain(|_, e| e.at.elapsed() < MAX_AGE);
        if entries.len() >= MAX_ENTRIES || held(&entries) + body.len() > MAX_BYTES {
            entries.clear();
        }
        entries.insert(
            key,
            Entry {
                epoch,
                revision,
                at: Instant::now(),
                body,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, q: &str) -> ListKey {
        ListKey {
            namespace: ns.into(),
            query: q.into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_is_shared_only_at_its_revision_and_for_a_second() {
        let c = ListCache::default();
        c.put(key("a", ""), 1, 10, Bytes::from_static(b"x"));
        assert_eq!(c.get(&key("a", ""), 1, 10).as_deref(), Some(&b"x"[..]));
        assert!(c.get(&key("a", ""), 1, 11).is_none(), "another revision");
        assert!(c.get(&key("a", ""), 2, 10).is_none(), "another epoch");
        assert!(
            c.get(&key("a", "state=stale"), 1, 10).is_none(),
            "another query"
        );
        assert!(c.get(&key("b", ""), 1, 10).is_none(), "another namespace");
        tokio::time::advance(MAX_AGE).await;
        assert!(c.get(&key("a", ""), 1, 10).is_none(), "too old");
    }

    #[tokio::test(start_paused = true)]
    async fn entries_and_bytes_are_bounded() {
        let c = ListCache::default();
        for i in 0..MAX_ENTRIES * 2 {
            c.put(key(&format!("n{i}"), ""), 1, 1, Bytes::from_static(b"x"));
        }
        assert!(c.entries.lock().unwrap().len() <= MAX_ENTRIES);
        let big = Bytes::from(vec![0; MAX_BYTES / 4]);
        for i in 0..8 {
            c.put(key(&format!("big{i}"), ""), 1, 1, big.clone());
            assert!(held(&c.entries.lock().unwrap()) <= MAX_BYTES);
        }
        c.put(
            key("huge", ""),
            1,
            1,
            Bytes::from(vec![0; MAX_BYTES / 4 + 1]),
        );
        assert!(c.get(&key("huge", ""), 1, 1).is_none(), "too large to keep");
        // Expired answers are dropped at the next one kept.
        tokio::time::advance(MAX_AGE).await;
        c.put(key("small", ""), 1, 1, Bytes::from_static(b"x"));
        let entries = c.entries.lock().unwrap();
        assert_eq!((entries.len(), held(&entries)), (1, 1));
    }
}
