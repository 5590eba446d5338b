//! A membrane's Maildir (`tmp/`, `new/`, `cur/`): the inbox of shared-volume mode (the
//! ipc/tcp inbox and the outbox spool are [segment logs](super::seglog); messages left in
//! a Maildir by an older agent are still read).
//!
//! Files are named by message id (32 hex digits, see [`shared::envelope::MessageId`]) and
//! hold one message in the `membrane-message/1` file format. Writers create
//! `tmp/<id>.<pid>.<n>`, make it durable, rename it to `new/<id>` and fsync `new/`. Batches
//! are group-committed: all files of a batch are written, made durable by concurrent
//! `fdatasync`s (which the file system commits together), then renamed, then one fsync of
//! `new/`. `new/` holds the messages not yet taken by the membrane; `cur/` those taken (kept, or emptied to a tombstone with
//! `--after-recv delete`). An id present in `new/` or `cur/` is a duplicate.
//! Directories are created 0700 and files 0600: other users can neither read nor write.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use shared::envelope::{Envelope, MessageId};
use shared::name::{MembraneId, NamespaceName};

use crate::util::fsync_dir;

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Batches of at most this many files are made durable with per-file `fdatasync` in turn;
/// larger ones with `fdatasync`s from [`SYNC_THREADS`] threads at once.
const FSYNC_EACH_MAX: usize = 2;

/// Threads making a batch durable.
const SYNC_THREADS: usize = 16;

/// A Maildir.
#[derive(Debug, Clone)]
pub struct Maildir {
    root: PathBuf,
}

/// What storing one message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Newly stored in `new/`.
    New,
    /// Already in `new/` or `cur/`: nothing written.
    Duplicate,
}

fn mkdir_private(p: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists && p.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

impl Maildir {
    /// The Maildir at `root` (containing `tmp`, `new`, `cur`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Maildir { root: root.into() }
    }

    /// The Maildir of membrane `id` of `ns` on a shared volume: `<shared>/<ns>/<id>`. Both
    /// are validated DNS labels, so the path cannot leave `shared`.
    pub fn for_membrane(shared: &Path, ns: &NamespaceName, id: &MembraneId) -> Self {
        Maildir::new(shared.join(ns.as_str()).join(id.as_str()))
    }

    /// Its root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `new/`.
    pub fn new_dir(&self) -> PathBuf {
        self.root.join("new")
    }

    /// `cur/`.
    pub fn cur_dir(&self) -> PathBuf {
        self.root.join("cur")
    }

    /// `tmp/`.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Creates the root and `tmp`, `new`, `cur` (each 0700; parents too when missing).
    pub fn create(&self) -> std::io::Result<()> {
        if let Some(parent) = self.root.parent() {
            crate::state::prepare_dir(parent)?;
        }
        mkdir_private(&self.root)?;
        for d in ["tmp", "new", "cur"] {
            mkdir_private(&self.root.join(d))?;
        }
        Ok(())
    }

    /// Whether the three directories exist.
    pub fn exists(&self) -> bool {
        self.new_dir().is_dir() && self.tmp_dir().is_dir() && self.cur_dir().is_dir()
    }

    /// Whether `id` is in `new/` or `cur/`.
    pub fn contains(&self, id: MessageId) -> bool {
        let name = id.to_string();
        self.new_dir().join(&name).exists() || self.cur_dir().join(&name).exists()
    }

    /// Stores messages (id and bytes in the file format) durably, as one group commit;
    /// duplicates (already in `new/` or `cur/`) are skipped. When this returns `Ok`, every
    /// message is durably in `new/` (or was already there or in `cur/`).
    pub fn store_batch(&self, msgs: &[(MessageId, &[u8])]) -> std::io::Result<Vec<Stored>> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut out = Vec::with_capacity(msgs.len());
        let mut written: Vec<(PathBuf, PathBuf, File)> = Vec::new();
        let mut seen_here = std::collections::HashSet::new();
        let result = (|| {
            for (id, bytes) in msgs {
                if !seen_here.insert(*id) || self.contains(*id) {
                    out.push(Stored::Duplicate);
                    continue;
                }
                let name = id.to_string();
                let tmp = self.tmp_dir().join(format!(
                    "{name}.{}.{}",
                    std::process::id(),
                    TMP_SEQ.fetch_add(1, Ordering::Relaxed)
                ));
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all(bytes)?;
                written.push((tmp, self.new_dir().join(name), f));
                out.push(Stored::New);
            }
            if written.is_empty() {
                return Ok(());
            }
            if written.len() <= FSYNC_EACH_MAX {
                for (_, _, f) in &written {
                    f.sync_data()?;
                }
            } else {
                // Concurrent fdatasyncs share the file system's journal commits. (syncfs
                // would also do, but it walks every cached inode of the file system: on a
                // busy disk that costs more than the messages.)
                let per = written.len().div_ceil(SYNC_THREADS);
                std::thread::scope(|s| {
                    let hs: Vec<_> = written
                        .chunks(per)
                        .map(|c| s.spawn(move || c.iter().try_for_each(|(_, _, f)| f.sync_data())))
                        .collect();
                    hs.into_iter()
                        .try_for_each(|h| h.join().expect("fdatasync thread"))
                })?;
            }
            for (tmp, dest, _) in &written {
                std::fs::rename(tmp, dest)?;
            }
            fsync_dir(&self.new_dir())
        })();
        if let Err(e) = result {
            for (tmp, _, _) in &written {
                let _ = std::fs::remove_file(tmp);
            }
            return Err(e);
        }
        Ok(out)
    }

    /// Ids in `new/`, oldest first (names that are not ids are ignored).
    pub fn list_new(&self) -> std::io::Result<Vec<MessageId>> {
        list_ids(&self.new_dir())
    }

    /// Ids in `cur/`.
    pub fn list_cur(&self) -> std::io::Result<Vec<MessageId>> {
        list_ids(&self.cur_dir())
    }

    /// Reads one message of `new/`.
    pub fn read_new(&self, id: MessageId) -> std::io::Result<Envelope> {
        let bytes = std::fs::read(self.new_dir().join(id.to_string()))?;
        Envelope::decode(&bytes).map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))
    }

    /// Removes from `new/` the ids already in `cur/` (a sender's retry of a message the
    /// membrane took); returns them.
    pub fn drop_duplicates(&self) -> std::io::Result<Vec<MessageId>> {
        let mut dropped = Vec::new();
        for id in self.list_new()? {
            if self.cur_dir().join(id.to_string()).exists() {
                match std::fs::remove_file(self.new_dir().join(id.to_string())) {
                    Ok(()) => dropped.push(id),
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(dropped)
    }

    /// Marks messages as taken by the membrane: moves them from `new/` to `cur/` (emptied to
    /// a tombstone when `delete`), then fsyncs both directories.
    pub fn take(&self, ids: &[MessageId], delete: bool) -> std::io::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        for id in ids {
            let name = id.to_string();
            let dest = self.cur_dir().join(&name);
            match std::fs::rename(self.new_dir().join(&name), &dest) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
            if delete {
                OpenOptions::new().write(true).open(&dest)?.set_len(0)?;
            }
        }
        fsync_dir(&self.cur_dir())?;
        fsync_dir(&self.new_dir())
    }

    /// Moves a message of `new/` aside to `<root>/bad/` (unreadable files).
    pub fn quarantine(&self, id: MessageId) -> std::io::Result<PathBuf> {
        let bad = self.root.join("bad");
        mkdir_private(&bad)?;
        let dest = bad.join(id.to_string());
        std::fs::rename(self.new_dir().join(id.to_string()), &dest)?;
        Ok(dest)
    }

    /// Removes a message from `new/` (the outbox after delivery). Not fsynced: should the
    /// removal be lost in a crash, the message is sent again and dropped as a duplicate.
    pub fn remove_new(&self, id: MessageId) -> std::io::Result<()> {
        match std::fs::remove_file(self.new_dir().join(id.to_string())) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Moves a message from `new/` to `dir` (the dead-letter folder), durably.
    pub fn move_new_to(&self, id: MessageId, dir: &Path) -> std::io::Result<PathBuf> {
        mkdir_private(dir)?;
        let dest = dir.join(id.to_string());
        std::fs::rename(self.new_dir().join(id.to_string()), &dest)?;
        fsync_dir(dir)?;
        Ok(dest)
    }

    /// Removes tombstones (empty files) of `cur/` older than `age`, and leftovers of `tmp/`
    /// older than an hour; returns how many went.
    pub fn prune(&self, age: std::time::Duration) -> std::io::Result<usize> {
        let now = std::time::SystemTime::now();
        let old = |m: &std::fs::Metadata, a: std::time::Duration| {
            m.modified()
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|d| d > a)
        };
        let mut n = 0;
        for e in std::fs::read_dir(self.cur_dir())?.flatten() {
            if let Ok(m) = e.metadata()
                && m.len() == 0
                && old(&m, age)
                && std::fs::remove_file(e.path()).is_ok()
            {
                n += 1;
            }
        }
        for e in std::fs::read_dir(self.tmp_dir())?.flatten() {
            if let Ok(m) = e.metadata()
                && old(&m, std::time::Duration::from_secs(3600))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(n)
    }
}

fn list_ids(dir: &Path) -> std::io::Result<Vec<MessageId>> {
    let mut ids: Vec<MessageId> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    pub(crate) fn envelope(n: u64, body: &str) -> Envelope {
        Envelope {
            id: MessageId::from_parts(1_700_000_000_000 + n, u128::from(n)),
            from: "a".parse().unwrap(),
            to: "b".parse().unwrap(),
            namespace: "ns".parse().unwrap(),
            sent_at: 1_700_000_000_000 + n,
            content_type: "text/plain".into(),
            body: body.as_bytes().to_vec(),
            reply_to: None,
            expires_at: None,
        }
    }

    #[test]
    fn store_take_dedup_and_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let md = Maildir::for_membrane(dir.path(), &"ns".parse().unwrap(), &"b".parse().unwrap());
        md.create().unwrap();
        for d in [
            md.root().to_path_buf(),
            md.new_dir(),
            md.cur_dir(),
            md.tmp_dir(),
        ] {
            assert_eq!(
                std::fs::metadata(&d).unwrap().permissions().mode() & 0o777,
                0o700
            );
        }
        let es: Vec<Envelope> = (0..5).map(|n| envelope(n, &format!("m{n}"))).collect();
        let bytes: Vec<Vec<u8>> = es.iter().map(Envelope::encode).collect();
        // Batch with an internal duplicate: 5 stored (syncfs path), the repeat skipped.
        let mut batch: Vec<(MessageId, &[u8])> =
            es.iter().zip(&bytes).map(|(e, b)| (e.id, &b[..])).collect();
        batch.push((es[0].id, &bytes[0]));
        let r = md.store_batch(&batch).unwrap();
        assert_eq!(r.iter().filter(|s| **s == Stored::New).count(), 5);
        assert_eq!(r[5], Stored::Duplicate);
        let f = md.new_dir().join(es[0].id.to_string());
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            md.list_new().unwrap(),
            es.iter().map(|e| e.id).collect::<Vec<_>>()
        );
        assert_eq!(md.read_new(es[2].id).unwrap(), es[2]);
        assert_eq!(std::fs::read_dir(md.tmp_dir()).unwrap().count(), 0);
        // Take two (one deleted to a tombstone); a retry of a taken one is a duplicate.
        md.take(&[es[0].id], false).unwrap();
        md.take(&[es[1].id], true).unwrap();
        assert_eq!(
            std::fs::metadata(md.cur_dir().join(es[1].id.to_string()))
                .unwrap()
                .len(),
            0
        );
        assert_eq!(
            md.store_batch(&[(es[1].id, &bytes[1])]).unwrap(),
            vec![Stored::Duplicate]
        );
        // A copy that slipped into new/ (a sender writing directly) is dropped.
        std::fs::write(md.new_dir().join(es[0].id.to_string()), &bytes[0]).unwrap();
        assert_eq!(md.drop_duplicates().unwrap(), vec![es[0].id]);
        assert_eq!(md.list_new().unwrap().len(), 3);
        // Single-message path (fdatasync).
        let e = envelope(99, "solo");
        assert_eq!(
            md.store_batch(&[(e.id, &e.encode())]).unwrap(),
            vec![Stored::New]
        );
        assert_eq!(md.read_new(e.id).unwrap().body, b"solo");
    }

    #[test]
    fn failure_leaves_no_tmp_files() {
        let dir = tempfile::tempdir().unwrap();
        let md = Maildir::new(dir.path().join("m"));
        md.create().unwrap();
        std::fs::remove_dir(md.new_dir()).unwrap();
        let e = envelope(1, "x");
        assert!(md.store_batch(&[(e.id, &e.encode())]).is_err());
        assert_eq!(std::fs::read_dir(md.tmp_dir()).unwrap().count(), 0);
    }
}
