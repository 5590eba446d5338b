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

/// Bytes written between two checks of the file's size.
const CHECK_EVERY: u64 = 64 * 1024;

/// Appends activity records.
#[derive(Debug)]
pub struct Activity {
    path: PathBuf,
    file: Mutex<Option<(File, u64)>>,
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

    /// Whether records go anywhere.
    pub fn enabled(&self) -> bool {
        !self.path.as_os_str().is_empty()
    }

    /// Records one event with extra fields (an object, or `Value::Null` for none).
    pub fn record(&self, event: &str, message: &str, fields: Value) {
        self.record_many(std::iter::once((event, message.to_string(), fields)));
    }

    /// Records several events with one write (a relay batch: one line per message).
    pub fn record_many<'a>(&self, events: impl IntoIterator<Item = (&'a str, String, Value)>) {
        if !self.enabled() {
            return;
        }
        let ts = Value::String(util::now_rfc3339());
        let mut lines = Vec::new();
        for (event, message, fields) in events {
            let mut obj = Map::new();
            obj.insert("ts".into(), ts.clone());
            obj.insert("event".into(), Value::String(event.into()));
            obj.insert("message".into(), Value::String(message));
            if let Value::Object(extra) = fields {
                obj.extend(extra);
            }
            serde_json::to_writer(&mut lines, &Value::Object(obj)).expect("json");
            lines.push(b'\n');
        }
        if lines.is_empty() {
            return;
        }
        let mut g = self.file.lock().unwrap();
        if let Err(e) = self.write(&mut g, &lines) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the activity log");
            *g = None;
        }
    }

    fn write(&self, slot: &mut Option<(File, u64)>, lines: &[u8]) -> std::io::Result<()> {
        // The size is tracked in memory and checked against the file (which `agent recv`
        // and `agent send` append to as well, and may rotate) every 64 KiB of our own
        // writes, by opening the file again.
        if slot
            .as_ref()
            .is_some_and(|(_, since)| *since + lines.len() as u64 > CHECK_EVERY)
        {
            *slot = None;
        }
        if slot.is_none() {
            let (f, len) = self.open(lines.len() as u64)?;
            *slot = Some((f, next_check(len)));
        }
        let (f, since) = slot.as_mut().expect("opened");
        f.write_all(lines)?;
        *since += lines.len() as u64;
        Ok(())
    }

    /// Opens the log for appending `incoming` bytes, and its size: a non-empty file that
    /// `incoming` would push past [`MAX_LOG_BYTES`] is first rotated to `activity.log.1`
    /// (a short-lived `agent recv` or `agent send` writes once per process, so this is its
    /// only check). Processes rotate under an exclusive `flock` of the file, and only the
    /// file still at the path, so two of them never both rotate (which would overwrite the
    /// rotated part with a nearly empty log). After a few rounds of others filling the new
    /// file at once, it appends anyway.
    fn open(&self, incoming: u64) -> std::io::Result<(File, u64)> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let mut attempts = 0;
        loop {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)?;
            let len = f.metadata()?.len();
            attempts += 1;
            if len == 0 || len + incoming <= MAX_LOG_BYTES || attempts > 3 {
                return Ok((f, len));
            }
            let locked = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| std::io::Error::from(e))?;
            let ino = locked.metadata()?.ino();
            match std::fs::metadata(&self.path) {
                // Still over the limit: nobody rotated it while we waited for the lock.
                Ok(m) if m.ino() == ino && m.len() + incoming > MAX_LOG_BYTES => {
                    std::fs::rename(&self.path, rotated(&self.path))?;
                }
                _ => {}
            }
        }
    }
}

/// The count of bytes "written since the last check" that makes the next check come
/// before our own writes could push a file of `len` bytes past the limit.
fn next_check(len: u64) -> u64 {
    CHECK_EVERY - CHECK_EVERY.min(MAX_LOG_BYTES.saturating_sub(len))
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

    #[test]
    fn short_lived_writers_rotate_a_full_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("activity.log");
        // Left near the limit by an earlier process.
        let line = format!("{}\n", "o".repeat(99));
        std::fs::write(&path, line.repeat((MAX_LOG_BYTES / 100) as usize)).unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        // One record per process, like `agent recv` or a direct `agent send`.
        Activity::new(path.clone()).record("received", &"x".repeat(200), Value::Null);
        assert_eq!(std::fs::metadata(rotated(&path)).unwrap().len(), before);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("\"received\""));
        // Many of them, alternating with a long-lived writer: the log stays bounded.
        let daemon = Activity::new(path.clone());
        let big = "x".repeat(4000);
        for _ in 0..600 {
            Activity::new(path.clone()).record("received", &big, Value::Null);
            daemon.record("e", &big, Value::Null);
            for p in [path.clone(), rotated(&path)] {
                let len = std::fs::metadata(&p).unwrap().len();
                assert!(len <= MAX_LOG_BYTES + CHECK_EVERY, "{}: {len}", p.display());
            }
        }
    }
}
