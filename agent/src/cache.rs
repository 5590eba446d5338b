//! The local cache of the namespace's membranes, kept current from the registry's event
//! stream (see [`crate::sync`]) and persisted to `cache.json` in the state directory so that
//! `agent discover` and `agent list` answer from it, marked as cached, while the registry is
//! down, even after the agent restarts.
//!
//! Writing the file is batched: an event marks the cache changed and [`Cache::run_writer`]
//! writes it at most [`WRITE_DELAY`] after the first unwritten change (one write for a burst,
//! where a 20,000-membrane namespace makes each write several megabytes), and once more at
//! shutdown ([`Cache::flush`]). The file always holds a content with its own revision, so
//! events lost to a crash within the delay are replayed when the stream resumes from it.
//! A full list and a forgotten position (`resync`) are written at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use shared::model::{Event, MembraneView};
use shared::name::NamespaceName;

use tokio_util::sync::CancellationToken;

use crate::client::ListFilter;
use crate::util;

/// Longest time a change of the cache waits before it is written to the file.
pub const WRITE_DELAY: Duration = Duration::from_secs(2);

/// File name of the cache in the state directory.
pub const CACHE_FILE: &str = "cache.json";

/// The cache as stored on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheData {
    /// The namespace cached.
    pub namespace: NamespaceName,
    /// Id of the last registry event applied (or the list's revision): the event stream
    /// resumes after it. `None`: the next connection takes a full list.
    pub revision: Option<u64>,
    /// The registry's event numbering `revision` belongs to (its `Membrane-Event-Epoch`):
    /// a stream of another epoch cannot resume from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// When the cache was last confirmed or changed (ms since the Unix epoch); 0 = never.
    pub updated_at_ms: u64,
    /// Membranes by id.
    pub membranes: BTreeMap<String, MembraneView>,
}

/// What [`CacheData::apply`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The cache changed.
    Changed,
    /// Already included (id at or below the revision) or about another namespace.
    Skipped,
    /// The registry asks for a full refresh.
    Resync,
}

impl CacheData {
    /// An empty cache of `namespace`.
    pub fn empty(namespace: NamespaceName) -> Self {
        CacheData {
            namespace,
            revision: None,
            epoch: None,
            updated_at_ms: 0,
            membranes: BTreeMap::new(),
        }
    }

    /// Replaces the content by a full list taken at `revision` of `epoch`.
    pub fn replace(
        &mut self,
        membranes: Vec<MembraneView>,
        revision: Option<u64>,
        epoch: Option<u64>,
        now: SystemTime,
    ) {
        self.membranes = membranes
            .into_iter()
            .filter(|m| m.namespace == self.namespace)
            .map(|m| (m.id.to_string(), m))
            .collect();
        self.revision = revision;
        self.epoch = epoch;
        self.updated_at_ms = util::unix_millis(now);
    }

    /// Applies one stream event with sequence number `id`.
    pub fn apply(&mut self, id: Option<u64>, ev: &Event, now: SystemTime) -> Applied {
        // Before the id check: a resync carries the registry's current revision, which may
        // be below a position it no longer knows.
        if let Event::Resync { .. } = ev {
            return Applied::Resync;
        }
        if let (Some(id), Some(rev)) = (id, self.revision)
            && id <= rev
        {
            return Applied::Skipped;
        }
        let changed = match ev {
            Event::Resync { .. } => return Applied::Resync,
            Event::Registered { membrane } => {
                if membrane.namespace != self.namespace {
                    return Applied::Skipped;
                }
                self.membranes
                    .insert(membrane.id.to_string(), (**membrane).clone());
                true
            }
            Event::Deregistered { namespace, id, .. } => {
                if *namespace != self.namespace {
                    return Applied::Skipped;
                }
                self.membranes.remove(id.as_str());
                true
            }
            Event::StateChanged {
                namespace,
                id,
                state,
            } => {
                if *namespace != self.namespace {
                    return Applied::Skipped;
                }
                if let Some(m) = self.membranes.get_mut(id.as_str()) {
                    m.state = *state;
                }
                true
            }
        };
        if id.is_some() {
            self.revision = id;
        }
        self.updated_at_ms = util::unix_millis(now);
        if changed {
            Applied::Changed
        } else {
            Applied::Skipped
        }
    }

    /// The membranes matching `filter`, by id.
    pub fn select(&self, filter: &ListFilter) -> Vec<MembraneView> {
        self.membranes
            .values()
            .filter(|m| matches(m, filter))
            .cloned()
            .collect()
    }

    /// Age in whole seconds of the last confirmation, if any.
    pub fn age_seconds(&self, now: SystemTime) -> Option<u64> {
        (self.updated_at_ms > 0)
            .then(|| util::unix_millis(now).saturating_sub(self.updated_at_ms) / 1000)
    }

    /// Reads a cache file; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> std::io::Result<Option<CacheData>> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes the cache file atomically (mode 0600).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(self).expect("cache serialises");
        util::write_atomic(path, &bytes, 0o600)
    }
}

/// Whether a membrane matches a list filter (same semantics as the registry's query).
pub fn matches(m: &MembraneView, f: &ListFilter) -> bool {
    let svc_ok = f
        .service
        .as_deref()
        .is_none_or(|s| m.registration.services.iter().any(|x| x.name.as_str() == s));
    let cap_ok = f
        .capability
        .as_deref()
        .is_none_or(|c| m.registration.capabilities.iter().any(|x| x.as_str() == c));
    let parent_ok = f.parent.as_deref().is_none_or(|p| {
        m.registration
            .parent
            .as_ref()
            .is_some_and(|x| x.as_str() == p)
    });
    svc_ok && cap_ok && parent_ok
}

/// The agent's shared cache: the data, whether the event stream is live, and its file.
#[derive(Debug)]
pub struct Cache {
    path: PathBuf,
    /// Copy-on-write: readers share the current data (an `Arc` clone per snapshot), a
    /// change copies it only while a snapshot is still held.
    inner: Mutex<(Arc<CacheData>, bool)>,
    /// Changes not yet in the file.
    dirty: AtomicBool,
    /// A change was marked (wakes [`Cache::run_writer`]).
    changed: tokio::sync::Notify,
    /// One write at a time, each of the data as of its start: the file never goes back.
    writing: Mutex<()>,
}

impl Cache {
    /// Opens the cache file of `namespace` in `state_dir` (empty when missing, unreadable or
    /// of another namespace).
    pub fn open(state_dir: &Path, namespace: NamespaceName) -> Self {
        let path = state_dir.join(CACHE_FILE);
        let data = match CacheData::load(&path) {
            Ok(Some(d)) if d.namespace == namespace => d,
            Ok(_) => CacheData::empty(namespace),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable cache");
                CacheData::empty(namespace)
            }
        };
        Cache {
            path,
            inner: Mutex::new((Arc::new(data), false)),
            dirty: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
            writing: Mutex::new(()),
        }
    }

    /// Marks the cache changed: written within [`WRITE_DELAY`] by [`Cache::run_writer`].
    fn mark(&self) {
        self.dirty.store(true, Ordering::SeqCst);
        self.changed.notify_one();
    }

    /// Writes the changes not yet in the file, now; `Ok(false)` when there were none.
    pub fn flush(&self) -> std::io::Result<bool> {
        let _one = self.writing.lock().unwrap();
        if !self.dirty.swap(false, Ordering::SeqCst) {
            return Ok(false);
        }
        let data = self.snapshot().0;
        data.save(&self.path).inspect_err(|_| {
            // Still to write: the next change or flush tries again.
            self.dirty.store(true, Ordering::SeqCst);
        })?;
        Ok(true)
    }

    fn flush_logged(&self) {
        if let Err(e) = self.flush() {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the cache");
        }
    }

    /// Writes changes to the file, each at most [`WRITE_DELAY`] after it was made (what
    /// changes meanwhile goes in the same write), until `stop`; then writes what is left.
    pub async fn run_writer(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.changed.notified() => {}
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(WRITE_DELAY) => {}
            }
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || this.flush_logged()).await;
        }
        self.flush_logged();
    }

    /// Replaces the content with a full list (taken at `revision` of `epoch`) and marks
    /// the cache live.
    pub fn replace(&self, membranes: Vec<MembraneView>, revision: Option<u64>, epoch: Option<u64>) {
        let mut g = self.inner.lock().unwrap();
        Arc::make_mut(&mut g.0).replace(membranes, revision, epoch, SystemTime::now());
        g.1 = true;
        drop(g);
        self.mark();
        self.flush_logged();
    }

    /// Where the event stream can resume: the revision and its epoch, if the cache has one.
    pub fn resume_point(&self) -> Option<(u64, Option<u64>)> {
        let g = self.inner.lock().unwrap();
        g.0.revision.map(|r| (r, g.0.epoch))
    }

    /// The registry asked for a resync: the cache's position is lost until the next full
    /// list (a reconnection meanwhile must not resume from it). Not live until then.
    pub fn forget_revision(&self) {
        let mut g = self.inner.lock().unwrap();
        g.1 = false;
        if g.0.revision.is_some() {
            Arc::make_mut(&mut g.0).revision = None;
            drop(g);
            // At once: a restart meanwhile must not resume from a disowned position.
            self.mark();
            self.flush_logged();
        }
    }

    /// Applies a stream event (persisting a change).
    pub fn apply(&self, id: Option<u64>, ev: &Event) -> Applied {
        let mut g = self.inner.lock().unwrap();
        let r = Arc::make_mut(&mut g.0).apply(id, ev, SystemTime::now());
        drop(g);
        if r == Applied::Changed {
            self.mark();
        }
        r
    }

    /// Marks whether the event stream is connected (the cache is then current).
    pub fn set_live(&self, live: bool) {
        let mut g = self.inner.lock().unwrap();
        if g.1 && !live {
            // Remember when it was last known current.
            Arc::make_mut(&mut g.0).updated_at_ms = util::unix_millis(SystemTime::now());
            self.mark();
        }
        g.1 = live;
    }

    /// The data (shared, not copied) and the live flag.
    pub fn snapshot(&self) -> (Arc<CacheData>, bool) {
        let g = self.inner.lock().unwrap();
        (g.0.clone(), g.1)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use shared::model::{HealthState, Registration};
    use shared::name::MembraneId;

    pub(crate) fn view(ns: &str, id: &str, svc: &str, cap: &str) -> MembraneView {
        let reg: Registration = serde_json::from_value(serde_json::json!({
            "services": [{"name": svc, "port": 7100}],
            "capabilities": [cap],
            "addresses": ["10.0.0.7"],
        }))
        .unwrap();
        MembraneView {
            id: MembraneId::new(id).unwrap(),
            namespace: NamespaceName::new(ns).unwrap(),
            registration: reg,
            state: HealthState::Passing,
            registered_at: "2026-01-01T00:00:00Z".into(),
            last_heartbeat: "2026-01-01T00:00:00Z".into(),
        }
    }

    fn ns() -> NamespaceName {
        NamespaceName::new("cog").unwrap()
    }

    #[test]
    fn list_then_events_after_revision() {
        let now = SystemTime::now();
        let mut c = CacheData::empty(ns());
        c.replace(
            vec![view("cog", "a", "s", "x"), view("other", "z", "s", "x")],
            Some(10),
            None,
            now,
        );
        assert_eq!(c.membranes.len(), 1, "other namespaces are not cached");
        // An event the list already included is skipped, even a removal.
        let gone = Event::Deregistered {
            namespace: ns(),
            id: MembraneId::new("a").unwrap(),
            reason: "deregistered".into(),
        };
        assert_eq!(c.apply(Some(9), &gone, now), Applied::Skipped);
        assert!(c.membranes.contains_key("a"));
        let b = Event::Registered {
            membrane: Box::new(view("cog", "b", "t", "y")),
        };
        assert_eq!(c.apply(Some(11), &b, now), Applied::Changed);
        assert_eq!(c.revision, Some(11));
        let stale = Event::StateChanged {
            namespace: ns(),
            id: MembraneId::new("b").unwrap(),
            state: HealthState::Stale,
        };
        assert_eq!(c.apply(Some(12), &stale, now), Applied::Changed);
        assert_eq!(c.membranes["b"].state, HealthState::Stale);
        assert_eq!(c.apply(Some(13), &gone, now), Applied::Changed);
        assert!(!c.membranes.contains_key("a"));
        assert_eq!(
            c.apply(Some(14), &Event::Resync { namespace: ns() }, now),
            Applied::Resync
        );
    }

    #[test]
    fn filters_like_the_registry() {
        let mut c = CacheData::empty(ns());
        c.replace(
            vec![
                view("cog", "a", "visual", "vision"),
                view("cog", "b", "motor", "act"),
            ],
            None,
            None,
            SystemTime::now(),
        );
        let f = |s: Option<&str>, k: Option<&str>| ListFilter {
            service: s.map(Into::into),
            capability: k.map(Into::into),
            parent: None,
        };
        assert_eq!(c.select(&f(None, None)).len(), 2);
        assert_eq!(c.select(&f(Some("visual"), None))[0].id.as_str(), "a");
        assert_eq!(c.select(&f(None, Some("act")))[0].id.as_str(), "b");
        assert!(c.select(&f(Some("visual"), Some("act"))).is_empty());
    }

    #[test]
    fn persisted_cache_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), ns());
        cache.replace(vec![view("cog", "a", "s", "x")], Some(3), Some(77));
        drop(cache);
        let again = Cache::open(dir.path(), ns());
        let (data, live) = again.snapshot();
        assert!(
            !live,
            "a reopened cache is not live until the stream connects"
        );
        assert_eq!(data.revision, Some(3));
        assert_eq!(
            again.resume_point(),
            Some((3, Some(77))),
            "resumes after a restart"
        );
        assert!(data.membranes.contains_key("a"));
        // A resync forgets the position, durably.
        again.forget_revision();
        drop(again);
        assert_eq!(Cache::open(dir.path(), ns()).resume_point(), None);
        // Another namespace does not reuse it.
        let other = Cache::open(dir.path(), NamespaceName::new("zz").unwrap());
        assert!(other.snapshot().0.membranes.is_empty());
    }

    #[test]
    fn snapshots_share_the_data_and_a_change_copies_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), ns());
        cache.replace(vec![view("cog", "a", "s", "x")], Some(3), Some(77));
        let (s1, _) = cache.snapshot();
        let (s2, _) = cache.snapshot();
        assert!(Arc::ptr_eq(&s1, &s2), "no copy per snapshot");
        cache.replace(vec![view("cog", "b", "s", "x")], Some(4), Some(77));
        assert!(
            s1.membranes.contains_key("a"),
            "a held snapshot is unchanged"
        );
        let (s3, _) = cache.snapshot();
        assert!(s3.membranes.contains_key("b") && !s3.membranes.contains_key("a"));
    }

    fn on_disk(dir: &Path) -> Option<u64> {
        CacheData::load(&dir.join(CACHE_FILE))
            .unwrap()
            .unwrap()
            .revision
    }

    /// Waits (in real time: the write runs on a blocking thread) until the file holds
    /// `rev`.
    fn wait_on_disk(dir: &Path, rev: u64) {
        for _ in 0..5000 {
            if on_disk(dir) == Some(rev) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("the file never reached revision {rev}: {:?}", on_disk(dir));
    }

    #[tokio::test(start_paused = true)]
    async fn event_writes_are_batched_within_the_delay_and_flushed_at_stop() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Cache::open(dir.path(), ns()));
        cache.replace(vec![view("cog", "a", "s", "x")], Some(10), Some(77));
        assert_eq!(
            on_disk(dir.path()),
            Some(10),
            "a full list is written at once"
        );
        let stop = CancellationToken::new();
        let writer = tokio::spawn(cache.clone().run_writer(stop.clone()));
        let reg = |id: &str| Event::Registered {
            membrane: Box::new(view("cog", id, "s", "x")),
        };
        let t0 = tokio::time::Instant::now();
        for (i, id) in ["b", "c", "d"].into_iter().enumerate() {
            assert_eq!(cache.apply(Some(11 + i as u64), &reg(id)), Applied::Changed);
        }
        // A burst of events: nothing written until the delay has passed...
        tokio::time::sleep(WRITE_DELAY - Duration::from_millis(1)).await;
        assert_eq!(on_disk(dir.path()), Some(10), "written before the delay");
        // ...then one write holding all of it.
        tokio::time::sleep(Duration::from_millis(2)).await;
        wait_on_disk(dir.path(), 13);
        assert!(t0.elapsed() < WRITE_DELAY + Duration::from_millis(10));
        let data = CacheData::load(&dir.path().join(CACHE_FILE))
            .unwrap()
            .unwrap();
        assert_eq!(data.membranes.len(), 4);
        // A change just before stopping is written at the stop, not lost or delayed.
        tokio::time::sleep(Duration::from_secs(30)).await;
        cache.apply(Some(14), &reg("e"));
        let t1 = tokio::time::Instant::now();
        stop.cancel();
        writer.await.unwrap();
        assert_eq!(t1.elapsed(), Duration::ZERO);
        assert_eq!(on_disk(dir.path()), Some(14));
        // Nothing changed: a flush writes nothing.
        assert!(!cache.flush().unwrap());
    }
}
