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
//!
//! Every file of a Maildir is reached through directory file descriptors, never by a path
//! that could be redirected: the membrane directory below a shared volume, `tmp/`, `new/`,
//! `cur/` and the message files are opened with `O_NOFOLLOW` relative to their parent's
//! descriptor (`openat`, `renameat`, `unlinkat`, `fstatat`), so a symbolic link planted on
//! the shared volume is refused instead of followed. Message files are opened
//! non-blocking (a FIFO cannot hang a reader), must be regular files and are read up to a
//! bound; anything else is refused ([`ReadError::Unsafe`]) and set aside to `bad/` by
//! `agent recv`. `--after-recv delete` never writes to the message's inode: it renames a new
//! empty tombstone over the name in `cur/` and unlinks the message.

use std::ffi::CString;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};
use shared::envelope::{Envelope, MessageId};
use shared::name::{MembraneId, NamespaceName};

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Batches of at most this many files are made durable with per-file `fdatasync` in turn;
/// larger ones with `fdatasync`s from [`SYNC_THREADS`] threads at once.
const FSYNC_EACH_MAX: usize = 2;

/// Threads making a batch durable.
const SYNC_THREADS: usize = 16;

/// The lock file of `agent recv` in a Maildir's root.
pub const RECV_LOCK: &str = ".recv.lock";

/// A Maildir: a trusted base directory (the configured shared volume, or the state
/// directory) and the components below it, each of which must be a real directory.
#[derive(Debug, Clone)]
pub struct Maildir {
    root: PathBuf,
    base: PathBuf,
    rel: Vec<String>,
}

/// What storing one message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Newly stored in `new/`.
    New,
    /// Already in `new/` or `cur/`: nothing written.
    Duplicate,
}

/// Why a message file of `new/` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Gone (taken by another reader).
    #[error("gone")]
    NotFound,
    /// Not something to read, ever: a symbolic link, FIFO, device, directory, a file over
    /// the size limit or not in the message format. Set it aside.
    #[error("{0}")]
    Unsafe(String),
    /// Could not be read now (retry later).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn cname(name: &str) -> CString {
    CString::new(name).expect("Maildir names have no NUL")
}

const DIR_FLAGS: OFlag = OFlag::O_DIRECTORY
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_RDONLY)
    .union(OFlag::O_CLOEXEC);

/// Opens directory `name` of `parent` without following a symbolic link.
fn open_dir_at(parent: impl AsFd, name: &str, shown: &Path) -> std::io::Result<OwnedFd> {
    openat(parent, cname(name).as_c_str(), DIR_FLAGS, Mode::empty()).map_err(|e| match e {
        Errno::ELOOP | Errno::ENOTDIR => std::io::Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{} is a symbolic link or not a directory: refused",
                shown.display()
            ),
        ),
        e => std::io::Error::new(
            std::io::Error::from(e).kind(),
            format!("{}: {e}", shown.display()),
        ),
    })
}

/// Creates directory `name` (0700) in `parent` when missing.
fn mkdir_at(parent: impl AsFd, name: &str) -> std::io::Result<()> {
    match mkdirat(
        parent,
        cname(name).as_c_str(),
        Mode::from_bits_truncate(0o700),
    ) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn stat_at(dir: impl AsFd, name: &str) -> Option<FileStat> {
    fstatat(dir, cname(name).as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW).ok()
}

fn is_regular(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
}

fn unlink_at(dir: impl AsFd, name: &str) -> std::io::Result<()> {
    match unlinkat(dir, cname(name).as_c_str(), UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Creates a new private file in `tmp` named after `name` (with `tag`, this process and a
/// sequence number, so names never collide), without following links: (its name, fd).
fn create_tmp(tmp: impl AsFd, name: &str, tag: &str) -> nix::Result<(String, OwnedFd)> {
    let tmp_name = format!(
        "{name}{tag}.{}.{}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let fd = openat(
        tmp,
        cname(&tmp_name).as_c_str(),
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )?;
    Ok((tmp_name, fd))
}

fn rename_at(from: impl AsFd, a: &str, to: impl AsFd, b: &str) -> nix::Result<()> {
    renameat(from, cname(a).as_c_str(), to, cname(b).as_c_str())
}

/// Names in a directory (by its descriptor).
fn names(dir: impl AsFd) -> std::io::Result<Vec<String>> {
    let fd = openat(dir, c".", DIR_FLAGS, Mode::empty())?;
    let mut d = nix::dir::Dir::from_fd(fd)?;
    Ok(d.iter()
        .filter_map(|e| e.ok()?.file_name().to_str().ok().map(str::to_owned))
        .filter(|n| n != "." && n != "..")
        .collect())
}

fn ids_of(names: Vec<String>) -> Vec<MessageId> {
    let mut ids: Vec<MessageId> = names.iter().filter_map(|n| n.parse().ok()).collect();
    ids.sort_unstable();
    ids
}

/// Open descriptors of a Maildir's root and its three directories.
struct Dirs {
    root: OwnedFd,
    tmp: OwnedFd,
    new: OwnedFd,
    cur: OwnedFd,
}

impl Dirs {
    fn contains(&self, name: &str) -> bool {
        stat_at(&self.new, name).is_some() || stat_at(&self.cur, name).is_some()
    }
}

impl Maildir {
    /// The Maildir at `root` (containing `tmp`, `new`, `cur`); `root` itself must not be a
    /// symbolic link, its parent is trusted.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root: PathBuf = root.into();
        let (base, rel) = match (root.parent(), root.file_name().and_then(|n| n.to_str())) {
            (Some(p), Some(n)) => (p.to_path_buf(), vec![n.to_string()]),
            _ => (root.clone(), Vec::new()),
        };
        Maildir { root, base, rel }
    }

    /// The Maildir of membrane `id` of `ns` on a shared volume: `<shared>/<ns>/<id>`. Both
    /// are validated DNS labels, so the path cannot leave `shared`; neither may be a
    /// symbolic link.
    pub fn for_membrane(shared: &Path, ns: &NamespaceName, id: &MembraneId) -> Self {
        Maildir {
            root: shared.join(ns.as_str()).join(id.as_str()),
            base: shared.to_path_buf(),
            rel: vec![ns.as_str().to_string(), id.as_str().to_string()],
        }
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

    /// Opens the root, one component at a time below the base, refusing symbolic links;
    /// with `create`, missing components are made (0700).
    fn open_root(&self, create: bool) -> std::io::Result<OwnedFd> {
        let mut fd: OwnedFd = File::open(&self.base)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", self.base.display())))?
            .into();
        let mut shown = self.base.clone();
        for c in &self.rel {
            shown.push(c);
            if create {
                mkdir_at(&fd, c)?;
            }
            fd = open_dir_at(&fd, c, &shown)?;
        }
        Ok(fd)
    }

    fn dirs(&self, create: bool) -> std::io::Result<Dirs> {
        let root = self.open_root(create)?;
        let sub = |n: &str| {
            if create {
                mkdir_at(&root, n)?;
            }
            open_dir_at(&root, n, &self.root.join(n))
        };
        Ok(Dirs {
            tmp: sub("tmp")?,
            new: sub("new")?,
            cur: sub("cur")?,
            root,
        })
    }

    /// Creates the root and `tmp`, `new`, `cur` (each 0700; parents too when missing),
    /// refusing symbolic links in their place.
    pub fn create(&self) -> std::io::Result<()> {
        crate::state::prepare_dir(&self.base)?;
        self.dirs(true).map(drop)
    }

    /// Whether the three directories exist (and are not symbolic links).
    pub fn exists(&self) -> bool {
        self.check().is_ok()
    }

    /// Opens the three directories (refusing symbolic links): why not, if they cannot be.
    pub fn check(&self) -> std::io::Result<()> {
        self.dirs(false).map(drop)
    }

    /// Opens (creating, 0600) the lock file of `agent recv`, refusing a symbolic link.
    pub fn open_recv_lock(&self) -> std::io::Result<File> {
        let root = self.open_root(false)?;
        let fd = openat(
            &root,
            cname(RECV_LOCK).as_c_str(),
            OFlag::O_CREAT
                | OFlag::O_WRONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| {
            let shown = self.root.join(RECV_LOCK);
            std::io::Error::new(
                std::io::Error::from(e).kind(),
                if e == Errno::ELOOP {
                    format!("{} is a symbolic link: refused", shown.display())
                } else {
                    format!("{}: {e}", shown.display())
                },
            )
        })?;
        if !is_regular(&fstat(&fd)?) {
            return Err(std::io::Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{} is not a regular file: refused",
                    self.root.join(RECV_LOCK).display()
                ),
            ));
        }
        Ok(File::from(fd))
    }

    /// Whether `id` is in `new/` or `cur/`.
    pub fn contains(&self, id: MessageId) -> bool {
        self.dirs(false).is_ok_and(|d| d.contains(&id.to_string()))
    }

    /// Where `id` is: (in `new/`, in `cur/`).
    pub fn state_of(&self, id: MessageId) -> (bool, bool) {
        let name = id.to_string();
        match self.dirs(false) {
            Ok(d) => (
                stat_at(&d.new, &name).is_some(),
                stat_at(&d.cur, &name).is_some(),
            ),
            Err(_) => (false, false),
        }
    }

    /// Stores messages (id and bytes in the file format) durably, as one group commit;
    /// duplicates (already in `new/` or `cur/`) are skipped. When this returns `Ok`, every
    /// message is durably in `new/` (or was already there or in `cur/`).
    pub fn store_batch(&self, msgs: &[(MessageId, &[u8])]) -> std::io::Result<Vec<Stored>> {
        let d = self.dirs(false)?;
        let mut out = Vec::with_capacity(msgs.len());
        let mut written: Vec<(String, String, File)> = Vec::new();
        let mut seen_here = std::collections::HashSet::new();
        let result = (|| {
            for (id, bytes) in msgs {
                let name = id.to_string();
                if !seen_here.insert(*id) || d.contains(&name) {
                    out.push(Stored::Duplicate);
                    continue;
                }
                let (tmp, fd) = create_tmp(&d.tmp, &name, "")?;
                let mut f = File::from(fd);
                written.push((tmp, name, f.try_clone()?));
                f.write_all(bytes)?;
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
            for (tmp, name, _) in &written {
                rename_at(&d.tmp, tmp, &d.new, name)?;
            }
            nix::unistd::fsync(&d.new)?;
            Ok(())
        })();
        if let Err(e) = result {
            for (tmp, _, _) in &written {
                let _ = unlink_at(&d.tmp, tmp);
            }
            return Err(e);
        }
        Ok(out)
    }

    /// Ids in `new/`, oldest first (names that are not ids are ignored).
    pub fn list_new(&self) -> std::io::Result<Vec<MessageId>> {
        Ok(ids_of(names(self.dirs(false)?.new)?))
    }

    /// Ids in `cur/`.
    pub fn list_cur(&self) -> std::io::Result<Vec<MessageId>> {
        Ok(ids_of(names(self.dirs(false)?.cur)?))
    }

    /// Reads one message of `new/` of at most `max_bytes` (in the file format): a regular
    /// file, opened without following a link and without blocking, read up to the bound.
    pub fn read_new(&self, id: MessageId, max_bytes: usize) -> Result<Envelope, ReadError> {
        let d = self.dirs(false)?;
        let fd = match openat(
            &d.new,
            cname(&id.to_string()).as_c_str(),
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Err(ReadError::NotFound),
            Err(Errno::ELOOP) => return Err(ReadError::Unsafe("a symbolic link".into())),
            Err(e) => return Err(ReadError::Io(e.into())),
        };
        let st = fstat(&fd).map_err(std::io::Error::from)?;
        if !is_regular(&st) {
            return Err(ReadError::Unsafe(
                "not a regular file (FIFO, device, socket or directory)".into(),
            ));
        }
        if st.st_size as u64 > max_bytes as u64 {
            return Err(ReadError::Unsafe(format!(
                "{} bytes, over the limit of {max_bytes} bytes",
                st.st_size
            )));
        }
        let mut bytes = Vec::with_capacity(st.st_size as usize);
        File::from(fd)
            .take(max_bytes as u64 + 1)
            .read_to_end(&mut bytes)?;
        if bytes.len() > max_bytes {
            return Err(ReadError::Unsafe(format!(
                "over the limit of {max_bytes} bytes"
            )));
        }
        Envelope::decode(&bytes).map_err(|e| ReadError::Unsafe(e.to_string()))
    }

    /// Removes from `new/` the ids already in `cur/` (a sender's retry of a message the
    /// membrane took); returns them.
    pub fn drop_duplicates(&self) -> std::io::Result<Vec<MessageId>> {
        let d = self.dirs(false)?;
        let mut dropped = Vec::new();
        for id in ids_of(names(&d.new)?) {
            let name = id.to_string();
            if stat_at(&d.cur, &name).is_some() {
                match unlinkat(&d.new, name.as_str(), UnlinkatFlags::NoRemoveDir) {
                    Ok(()) => dropped.push(id),
                    Err(Errno::ENOENT) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(dropped)
    }

    /// Marks messages as taken by the membrane: moves them from `new/` to `cur/`, then
    /// fsyncs both directories. With `delete`, `cur/` gets a new empty tombstone instead
    /// (created in `tmp/` and renamed over the name) and the message is unlinked: the
    /// message's own inode is never written to (it could be a hard link to anything).
    pub fn take(&self, ids: &[MessageId], delete: bool) -> std::io::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let d = self.dirs(false)?;
        for id in ids {
            let name = id.to_string();
            if delete {
                if stat_at(&d.new, &name).is_none() {
                    continue;
                }
                let (tmp, fd) = create_tmp(&d.tmp, &name, ".tomb")?;
                drop(fd);
                rename_at(&d.tmp, &tmp, &d.cur, &name)?;
                unlink_at(&d.new, &name)?;
            } else {
                match rename_at(&d.new, &name, &d.cur, &name) {
                    Ok(()) | Err(Errno::ENOENT) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        nix::unistd::fsync(&d.cur)?;
        nix::unistd::fsync(&d.new)?;
        Ok(())
    }

    /// Moves a message of `new/` aside to `<root>/bad/` (unreadable or unsafe files: the
    /// link or special file itself is moved, never opened). When that is impossible (`bad`
    /// is not a directory), the entry is removed from `new/` so it is never looked at
    /// again. Returns where it went (`None`: removed).
    pub fn quarantine(&self, id: MessageId) -> std::io::Result<Option<PathBuf>> {
        let d = self.dirs(false)?;
        let name = id.to_string();
        let bad_path = self.root.join("bad");
        let moved = mkdir_at(&d.root, "bad")
            .and_then(|()| open_dir_at(&d.root, "bad", &bad_path))
            .and_then(|bad| rename_at(&d.new, &name, &bad, &name).map_err(Into::into));
        match moved {
            Ok(()) => Ok(Some(bad_path.join(name))),
            Err(e) => {
                tracing::warn!(error = %e, id = %id, "cannot move to bad/; removing it from new/");
                unlink_at(&d.new, &name)?;
                Ok(None)
            }
        }
    }

    /// Removes a message from `new/` (the outbox after delivery). Not fsynced: should the
    /// removal be lost in a crash, the message is sent again and dropped as a duplicate.
    pub fn remove_new(&self, id: MessageId) -> std::io::Result<()> {
        unlink_at(&self.dirs(false)?.new, &id.to_string())
    }

    /// Removes tombstones (empty regular files) of `cur/` older than `age`, and leftovers
    /// of `tmp/` older than an hour; returns how many tombstones went.
    pub fn prune(&self, age: std::time::Duration) -> std::io::Result<usize> {
        let d = self.dirs(false)?;
        let now = std::time::SystemTime::now();
        let old = |st: &FileStat, a: std::time::Duration| {
            let t =
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(st.st_mtime.max(0) as u64);
            now.duration_since(t).is_ok_and(|d| d > a)
        };
        let mut n = 0;
        for name in names(&d.cur)? {
            if let Some(st) = stat_at(&d.cur, &name)
                && is_regular(&st)
                && st.st_size == 0
                && old(&st, age)
                && unlink_at(&d.cur, &name).is_ok()
            {
                n += 1;
            }
        }
        for name in names(&d.tmp)? {
            if let Some(st) = stat_at(&d.tmp, &name)
                && SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR
                && old(&st, std::time::Duration::from_secs(3600))
            {
                let _ = unlink_at(&d.tmp, &name);
            }
        }
        Ok(n)
    }
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
        assert_eq!(md.read_new(es[2].id, 1 << 20).unwrap(), es[2]);
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
        assert_eq!(md.read_new(e.id, 1 << 20).unwrap().body, b"solo");
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
