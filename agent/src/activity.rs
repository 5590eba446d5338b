//! The agent's activity log: one JSON object per line in `activity.log` in the state
//! directory (`{"ts": RFC 3339, "event": "...", "message": "...", ...}`), rotated to
//! `activity.log.1` past 1 MiB. `agent log [--follow]` reads it, with or without a running
//! agent.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Map, Value};

use crate::util;

/// Size past which the log is rotated.
pub const MAX_LOG_BYTES: u64 = 1024 * 1024;

/// Appends activity records.
#[derive(Debug)]
pub struct Activity {
    path: PathBuf,
    file: Mutex<Option<File>>,
}

impl Activity {
    /// The activity log at `path` (opened lazily).
    pub fn new(path: PathBuf) -> Self {
        Activity {
            path,
            file: Mutex::new(None),
        }
    }

    /// A log that records nothing (tests).
    pub fn disabled() -> Self {
        Activity {
            path: PathBuf::new(),
            file: Mutex::new(None),
        }
    }

    /// Records one event with extra fields (an object, or `Value::Null` for none).
    pub fn record(&self, event: &str, message: &str, fields: Value) {
        if self.path.as_os_str().is_empty() {
            return;
        }
        let mut obj = Map::new();
        obj.insert("ts".into(), Value::String(util::now_rfc3339()));
        obj.insert("event".into(), Value::String(event.into()));
        obj.insert("message".into(), Value::String(message.into()));
        if let Value::Object(extra) = fields {
            obj.extend(extra);
        }
        let mut line = serde_json::to_vec(&Value::Object(obj)).expect("json");
        line.push(b'\n');
        let mut g = self.file.lock().unwrap();
        if let Err(e) = self.write(&mut g, &line) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the activity log");
            *g = None;
        }
    }

    fn write(&self, slot: &mut Option<File>, line: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(f) = slot.as_ref()
            && f.metadata()?.len() + line.len() as u64 > MAX_LOG_BYTES
        {
            *slot = None;
            std::fs::rename(&self.path, rotated(&self.path))?;
        }
        if slot.is_none() {
            *slot = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(&self.path)?,
            );
        }
        slot.as_mut().expect("opened").write_all(line)
    }
}

/// The rotated log's path.
pub fn rotated(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_json_lines_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("activity.log");
        let a = Activity::new(path.clone());
        a.record("registered", "hello", serde_json::json!({"id": "a"}));
        let text = std::fs::read_to_string(&path).unwrap();
        let v: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(v["event"], "registered");
        assert_eq!(v["id"], "a");
        assert!(v["ts"].as_str().unwrap().ends_with('Z'));
        let big = "x".repeat(4000);
        for _ in 0..300 {
            a.record("e", &big, Value::Null);
        }
        assert!(rotated(&path).exists());
        assert!(std::fs::metadata(&path).unwrap().len() <= MAX_LOG_BYTES);
    }
}
