//! Event stream continuity across a clean restart (embedded store).
//!
//! Event history lives in memory, so a new process starts a new epoch and every agent has
//! to list its whole namespace again: at 20,000 agents in one namespace, 20,000 lists of
//! 20,000 membranes. A clean shutdown therefore leaves [`MARKER`] in the data dir: the
//! hub's [`Position`] (epoch, last sequence number, each namespace's last event, the last
//! [`REPLAY_MAX`](super::events::REPLAY_MAX) event frames), the membranes stale at that
//! moment, and a fingerprint of what the store holds. The next start takes the file
//! (reads it and deletes it before anything else can change the store) and, when the
//! fingerprint matches what it loaded, continues the epoch: an agent whose `Last-Event-ID`
//! is at or after its namespace's last event resumes with nothing to replay, one a little
//! behind (events published while the streams were closing) gets them from the saved
//! frames, instead of listing. Health is soft state (every membrane starts `passing`),
//! so each membrane that was stale at shutdown gets a `state_changed: passing` event, the
//! first events of the continued epoch.
//!
//! A crash leaves no marker (or the marker of an earlier clean stop was already taken),
//! and a store changed by anything else between the stop and the start no longer matches
//! the fingerprint: either way a new epoch, and agents list as before.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use shared::{Event, HealthState, MembraneId};

use super::events::Position;
use super::{Backend, Registry, State};

/// The marker's file name in the data dir.
pub const MARKER: &str = "events-resume.json";

/// What a clean shutdown leaves for the next start.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResumeMarker {
    /// The event hub's numbering.
    pub position: Position,
    /// Per namespace, the membranes stale at shutdown.
    pub stale: std::collections::BTreeMap<String, Vec<String>>,
    /// SHA-256 (hex) of every namespace and membrane (name, id, store row) held.
    pub fingerprint: String,
}

/// Why the marker could not be saved or taken.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// Reading, writing or removing the file.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The file is not a marker.
    #[error("{0}: not a resume marker: {1}")]
    Format(PathBuf, serde_json::Error),
}

fn fingerprint(st: &State) -> String {
    let mut names: Vec<_> = st.namespaces.keys().collect();
    names.sort();
    let mut h = Sha256::new();
    for name in names {
        h.update(name.as_str().as_bytes());
        h.update([0]);
        for (id, e) in &st.namespaces[name].membranes {
            h.update(id.as_str().as_bytes());
            h.update([1]);
            h.update(e.seq.to_be_bytes());
        }
        h.update([2]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `marker` into `dir` (atomically: a temporary file, fsynced, renamed).
pub fn save(dir: &Path, marker: &ResumeMarker) -> Result<(), ResumeError> {
    let path = dir.join(MARKER);
    let tmp = dir.join(format!("{MARKER}.tmp"));
    let io = |e| ResumeError::Io(path.clone(), e);
    let json = serde_json::to_vec(marker).map_err(|e| ResumeError::Format(path.clone(), e))?;
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&json).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    sync_dir(dir).map_err(io)
}

/// Takes the marker out of `dir`: reads it and deletes it durably, so that it is used
/// by one start at most (a crash after this start must not find it). `Ok(None)` when
/// there is none.
pub fn take(dir: &Path) -> Result<Option<ResumeMarker>, ResumeError> {
    let path = dir.join(MARKER);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ResumeError::Io(path, e)),
    };
    std::fs::remove_file(&path).map_err(|e| ResumeError::Io(path.clone(), e))?;
    sync_dir(dir).map_err(|e| ResumeError::Io(path.clone(), e))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ResumeError::Format(path, e))
}

impl Registry {
    /// What a clean shutdown saves; call once every write has committed (see
    /// [`Registry::flush`]). `None` with etcd (each replica has its own epoch) or once
    /// the store has failed (memory may be ahead of the disk).
    pub fn resume_marker(&self) -> Option<ResumeMarker> {
        if !matches!(self.backend, Backend::Sqlite(_)) || self.store_failed() {
            return None;
        }
        let st = self.state.lock().unwrap();
        let position = self.events.position();
        let mut stale = std::collections::BTreeMap::new();
        for (name, ns) in &st.namespaces {
            let ids: Vec<String> = ns
                .membranes
                .iter()
                .filter(|(_, e)| e.state == HealthState::Stale)
                .map(|(id, _)| id.as_str().to_string())
                .collect();
            if !ids.is_empty() {
                stale.insert(name.as_str().to_string(), ids);
            }
        }
        Some(ResumeMarker {
            position,
            stale,
            fingerprint: fingerprint(&st),
        })
    }

    /// Continues the event epoch of `marker` when it matches what was loaded (call right
    /// after [`Registry::new`], before serving); publishes `state_changed: passing` for
    /// the membranes stale at shutdown. `false` (a new epoch stays) when it does not match.
    pub fn resume_events(&self, marker: &ResumeMarker) -> bool {
        let st = self.state.lock().unwrap();
        if fingerprint(&st) != marker.fingerprint || !self.events.restore(&marker.position) {
            return false;
        }
        for (name, ids) in &marker.stale {
            let Some((ns_name, ns)) = st.namespaces.iter().find(|(n, _)| n.as_str() == name) else {
                continue;
            };
            for id in ids {
                let Ok(id) = MembraneId::new(id) else {
                    continue;
                };
                if ns
                    .membranes
                    .get(&id)
                    .is_some_and(|e| e.state == HealthState::Passing)
                {
                    self.events.publish(
                        ns_name,
                        Event::StateChanged {
                            namespace: ns_name.clone(),
                            id,
                            state: HealthState::Passing,
                        },
                    );
                }
            }
        }
        true
    }

    /// Resolves once everything submitted before it has committed and its events are
    /// published (the writer commits in submission order).
    pub async fn flush(&self) {
        let queued = {
            let mut st = self.state.lock().unwrap();
            self.submit(&mut st, vec![], vec![], vec![], vec![])
        };
        let _ = self.durable(queued).await;
    }
}
