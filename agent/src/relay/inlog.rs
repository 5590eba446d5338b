//! The inbox of ipc and tcp mode: a [segment log](super::seglog) in `<maildir>/log/`,
//! written by `agent run` (group commit, one `fdatasync` per batch, then the ACKs) and read
//! oldest first by `agent recv`.
//!
//! - `log/<n>.seg`: the messages (one record each, the `membrane-message/1` file format);
//! - `log/durable`: how far the log is durable (segment, offset), rewritten by the agent
//!   after each commit: `agent recv` never reads past it, so the membrane sees only what
//!   survives a crash of the machine;
//! - `log/taken`: how far the membrane took (segment, offset), rewritten in place and
//!   fdatasync'ed by `agent recv` after each printed batch (a constant 20 bytes);
//! - `log/<n>.ids`: once a segment is wholly taken (and `--after-recv delete`), the ids it
//!   held and until when each is remembered, the segment itself being removed. The agent
//!   drops a message whose id it remembers (a sender's retry after a lost ACK) and
//!   forgets ids once their message expired: a message arriving past its expiry is
//!   refused (`expired`), so the memory and the `.ids` files are bounded by the message
//!   rate over the expiry window (default 1 h), 24 bytes per message on disk.
//!
//! The Maildir `new/` of the same membrane is still read by `agent recv` (messages stored
//! by an older agent).

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use shared::envelope::{Envelope, MessageId};

use super::maildir::Stored;
use super::seglog::{self, SegLog};

/// Segment size of the inbox.
pub const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;

const MSG: u8 = 1;
const IDS: u8 = 3;

/// A position in the log: segment, offset.
pub type Pos = (u64, u64);

fn pos_bytes(p: Pos) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..8].copy_from_slice(&p.0.to_le_bytes());
    b[8..16].copy_from_slice(&p.1.to_le_bytes());
    let crc = seglog::crc32(&[&b[..16]]);
    b[16..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Reads a position file (missing or torn: `None`).
pub fn read_pos(path: &Path) -> Option<Pos> {
    let b = std::fs::read(path).ok()?;
    if b.len() != 20 || seglog::crc32(&[&b[..16]]) != u32::from_le_bytes(b[16..].try_into().ok()?) {
        return None;
    }
    Some((
        u64::from_le_bytes(b[..8].try_into().ok()?),
        u64::from_le_bytes(b[8..16].try_into().ok()?),
    ))
}

/// A position file, rewritten in place.
pub struct PosFile(File);

impl PosFile {
    /// Opens (creating, 0600) `path`.
    pub fn open(path: &Path) -> std::io::Result<PosFile> {
        Ok(PosFile(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)?,
        ))
    }

    /// Writes `p`; with `sync`, durably.
    pub fn set(&self, p: Pos, sync: bool) -> std::io::Result<()> {
        self.0.write_all_at(&pos_bytes(p), 0)?;
        if sync {
            self.0.sync_data()?;
        }
        Ok(())
    }
}

/// The log directory of a Maildir root.
pub fn log_dir(maildir_root: &Path) -> PathBuf {
    maildir_root.join("log")
}

fn ids_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}.ids"))
}

/// Bytes of one remembered id in a `.ids` file: the id, then until when (ms, LE).
const IDS_ENTRY: usize = 24;

/// Writes a `.ids` file: one record of the ids and until when each is remembered.
fn write_ids(path: &Path, ids: &[&(MessageId, u64)]) -> std::io::Result<()> {
    let mut payload = Vec::with_capacity(ids.len() * IDS_ENTRY);
    for (id, f) in ids {
        payload.extend_from_slice(&id.as_u128().to_le_bytes());
        payload.extend_from_slice(&f.to_le_bytes());
    }
    let mut bytes = Vec::new();
    seglog::encode_record(IDS, &payload, &mut bytes);
    crate::util::write_atomic(path, &bytes, 0o600)
}

/// Reads a `.ids` file: the ids and until when each is remembered.
fn read_ids(path: &Path) -> std::io::Result<Vec<(MessageId, u64)>> {
    let (recs, _) = seglog::read_segment(path, 0)?;
    Ok(recs
        .iter()
        .filter(|r| r.kind == IDS)
        .flat_map(|r| r.payload.chunks_exact(IDS_ENTRY))
        .map(|c| {
            let id = MessageId::from_u128(u128::from_le_bytes(c[..16].try_into().expect("16")));
            (id, u64::from_le_bytes(c[16..].try_into().expect("8")))
        })
        .collect())
}

/// Until when the id of `e` must be remembered (ms since the epoch): its expiry, at least
/// `window` after it was sent.
pub fn forget_at(e_sent_at: u64, e_expires_at: Option<u64>, window_ms: u64) -> u64 {
    e_expires_at
        .unwrap_or(0)
        .max(e_sent_at.saturating_add(window_ms))
}

/// The writing side, owned by the inbox committer of `agent run`.
pub struct InboxLog {
    log: SegLog,
    durable: PosFile,
    /// Remembered ids: until when.
    seen: HashMap<MessageId, u64>,
    /// Per retained segment, its ids (to write the `.ids` file when it goes).
    seg_ids: BTreeMap<u64, Vec<(MessageId, u64)>>,
    window_ms: u64,
    delete_taken: bool,
    last_forget: u64,
}

impl InboxLog {
    /// Opens the log of `maildir_root` (recovering torn tails), loads the remembered ids.
    pub fn open(
        maildir_root: &Path,
        window_ms: u64,
        delete_taken: bool,
        now_ms: u64,
    ) -> std::io::Result<InboxLog> {
        let dir = log_dir(maildir_root);
        let (log, records) = SegLog::open(&dir, SEGMENT_BYTES)?;
        let mut seen = HashMap::new();
        let mut seg_ids: BTreeMap<u64, Vec<(MessageId, u64)>> = BTreeMap::new();
        for n in seglog::list_segments(&dir)? {
            seg_ids.insert(n, Vec::new());
        }
        for r in records {
            if r.kind != MSG {
                continue;
            }
            if let Ok(e) = Envelope::decode(&r.payload) {
                let f = forget_at(e.sent_at, e.expires_at, window_ms);
                if f > now_ms {
                    seen.insert(e.id, f);
                }
                if delete_taken {
                    seg_ids.entry(r.seg).or_default().push((e.id, f));
                }
            }
        }
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|x| x == "ids") {
                let mut latest = 0;
                for (id, f) in read_ids(&p)? {
                    latest = latest.max(f);
                    if f > now_ms {
                        seen.insert(id, f);
                    }
                }
                if latest <= now_ms {
                    std::fs::remove_file(&p)?;
                }
            }
        }
        let durable = PosFile::open(&dir.join("durable"))?;
        durable.set(log.position(), true)?;
        Ok(InboxLog {
            log,
            durable,
            seen,
            seg_ids,
            window_ms,
            delete_taken,
            last_forget: now_ms,
        })
    }

    /// Stores messages (id, envelope bytes, sent_at, expires_at) as one group commit: when
    /// this returns `Ok`, each is durable (or a duplicate of a remembered one).
    pub fn store(
        &mut self,
        msgs: &[(MessageId, &[u8], u64, Option<u64>)],
    ) -> std::io::Result<Vec<Stored>> {
        let mut out = Vec::with_capacity(msgs.len());
        let mut added = Vec::new();
        for (id, bytes, sent, exp) in msgs {
            if self.seen.contains_key(id) {
                out.push(Stored::Duplicate);
                continue;
            }
            let f = forget_at(*sent, *exp, self.window_ms);
            let (seg, _) = self.log.append(MSG, bytes);
            self.seen.insert(*id, f);
            added.push((seg, *id, f));
            out.push(Stored::New);
        }
        if let Err(e) = self.log.commit() {
            for (_, id, _) in added {
                self.seen.remove(&id);
            }
            return Err(e);
        }
        for (seg, id, f) in added {
            let ids = self.seg_ids.entry(seg).or_default();
            // With `--after-recv keep` segments stay: no `.ids` files to write.
            if self.delete_taken {
                ids.push((id, f));
            }
        }
        self.seg_ids.entry(self.log.active()).or_default();
        self.durable.set(self.log.position(), false)?;
        Ok(out)
    }

    /// Whether `id` is remembered.
    pub fn contains(&self, id: &MessageId) -> bool {
        self.seen.contains_key(id)
    }

    /// Number of remembered ids.
    pub fn remembered(&self) -> usize {
        self.seen.len()
    }

    /// Housekeeping: segments wholly taken are replaced by their `.ids` (with
    /// `--after-recv delete`); expired ids are forgotten (at most once a minute).
    pub fn collect(&mut self, now_ms: u64) -> std::io::Result<()> {
        let dir = self.log.dir().to_path_buf();
        if self.delete_taken
            && let Some((taken_seg, _)) = read_pos(&dir.join("taken"))
        {
            let done: Vec<u64> = self
                .seg_ids
                .range(..taken_seg.min(self.log.active()))
                .map(|(n, _)| *n)
                .collect();
            for n in done {
                let ids = self.seg_ids.remove(&n).unwrap_or_default();
                let live: Vec<&(MessageId, u64)> =
                    ids.iter().filter(|(_, f)| *f > now_ms).collect();
                if !live.is_empty() {
                    write_ids(&ids_path(&dir, n), &live)?;
                }
                self.log.remove(n)?;
            }
        }
        if now_ms >= self.last_forget + 60_000 {
            self.last_forget = now_ms;
            self.seen.retain(|_, f| *f > now_ms);
            for entry in std::fs::read_dir(&dir)?.flatten() {
                let p = entry.path();
                if p.extension().is_some_and(|x| x == "ids")
                    && let Ok(ids) = read_ids(&p)
                    && ids.iter().all(|(_, f)| *f <= now_ms)
                {
                    std::fs::remove_file(&p)?;
                }
            }
        }
        Ok(())
    }

    /// The durable end of the log.
    pub fn position(&self) -> Pos {
        self.log.position()
    }
}

/// The reading side (`agent recv`): messages after the taken position, up to the durable
/// one.
pub struct Reader {
    dir: PathBuf,
    taken: Option<PosFile>,
    pos: Pos,
    /// End of the last record the last [`Reader::next_batch`] read (readable or not).
    read_end: std::cell::Cell<Option<Pos>>,
}

impl Reader {
    /// Opens the log of `maildir_root` for reading (`None` when there is no log).
    pub fn open(maildir_root: &Path) -> std::io::Result<Option<Reader>> {
        let Some(mut r) = Reader::peek(maildir_root) else {
            return Ok(None);
        };
        r.taken = Some(PosFile::open(&r.dir.join("taken"))?);
        Ok(Some(r))
    }

    /// A reader from the taken position that records nothing (`None` when there is no
    /// log): to look at what is pending.
    fn peek(maildir_root: &Path) -> Option<Reader> {
        let dir = log_dir(maildir_root);
        if !dir.is_dir() {
            return None;
        }
        Some(Reader {
            pos: read_pos(&dir.join("taken")).unwrap_or((0, 0)),
            dir,
            taken: None,
            read_end: std::cell::Cell::new(None),
        })
    }

    /// Up to `max` messages after the taken position (each with the position just past
    /// it), oldest first, never past the durable position; from one segment at a time.
    pub fn next_batch(&self, max: usize) -> std::io::Result<Vec<(Envelope, Pos)>> {
        let Some(durable) = read_pos(&self.dir.join("durable")) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        self.read_end.set(None);
        for n in seglog::list_segments(&self.dir)? {
            if n < self.pos.0 || n > durable.0 {
                continue;
            }
            let from = if n == self.pos.0 { self.pos.1 } else { 0 };
            let until = (n == durable.0).then_some(durable.1);
            let path = seglog::segment_path(&self.dir, n);
            let recs = match seglog::read_records(&path, n, from, until, max, 4 << 20) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for r in &recs {
                if r.kind != MSG {
                    continue;
                }
                match Envelope::decode(&r.payload) {
                    Ok(e) => out.push((e, (n, r.end))),
                    Err(err) => {
                        tracing::warn!(segment = n, offset = r.off, error = %err, "unreadable message skipped")
                    }
                }
            }
            if let Some(last) = recs.last() {
                self.read_end.set(Some((n, last.end)));
                // The rest of this segment, or the next ones: the next call.
                break;
            }
        }
        Ok(out)
    }

    /// Where the last [`Reader::next_batch`] stopped reading: past its last message, and
    /// past records that could not be read (taking up to there skips them for good).
    pub fn read_end(&self) -> Option<Pos> {
        self.read_end.get()
    }

    /// Records that the membrane took everything up to `p` (durably).
    pub fn take(&mut self, p: Pos) -> std::io::Result<()> {
        if let Some(t) = &self.taken {
            t.set(p, true)?;
        }
        self.pos = p;
        Ok(())
    }
}

/// Whether the log of `maildir_root` holds messages not yet taken.
pub fn has_pending(maildir_root: &Path) -> bool {
    let Some(r) = Reader::peek(maildir_root) else {
        return false;
    };
    if read_pos(&r.dir.join("durable")).is_none_or(|d| d <= r.pos) {
        return false;
    }
    // A segment end reached and the next segment empty: nothing pending.
    r.next_batch(1).is_ok_and(|b| !b.is_empty())
}

/// Number of messages not yet taken (reads the log: for `agent status`).
pub fn pending_count(maildir_root: &Path) -> usize {
    let Some(mut r) = Reader::peek(maildir_root) else {
        return 0;
    };
    let mut n = 0;
    while let Ok(b) = r.next_batch(4096) {
        let Some(end) = r.read_end() else { break };
        n += b.len();
        r.pos = end;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::maildir::tests::envelope;

    fn msg(n: u64, expires_at: u64) -> (MessageId, Vec<u8>, u64, Option<u64>) {
        let mut e = envelope(n, &"x".repeat(3000));
        e.expires_at = Some(expires_at);
        (e.id, e.encode(), e.sent_at, e.expires_at)
    }

    fn store(log: &mut InboxLog, msgs: &[(MessageId, Vec<u8>, u64, Option<u64>)]) -> Vec<Stored> {
        let refs: Vec<(MessageId, &[u8], u64, Option<u64>)> = msgs
            .iter()
            .map(|(i, b, s, x)| (*i, &b[..], *s, *x))
            .collect();
        log.store(&refs).unwrap()
    }

    /// A message made durable is stored once, though the next segment could not be
    /// started: before, the commit failed, the ids were forgotten and the sender's retry
    /// was stored again.
    #[test]
    fn a_failed_rotation_after_a_durable_commit_stores_a_retry_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let now = 1_700_000_100_000;
        let mut log = InboxLog::open(root, 0, true, now).unwrap();
        let mut e = envelope(1, "");
        e.body = vec![b'x'; SEGMENT_BYTES as usize]; // fills the segment: rotation is due
        e.expires_at = Some(now + 60_000);
        let big = (e.id, e.encode(), e.sent_at, e.expires_at);
        log.log.faults.rotate = true;
        let refs = [(big.0, &big.1[..], big.2, big.3)];
        assert_eq!(log.store(&refs).unwrap(), vec![Stored::New]);
        // The sender's retry (as after a lost ACK) is a duplicate.
        assert_eq!(log.store(&refs).unwrap(), vec![Stored::Duplicate]);
        log.log.faults.rotate = false;
        store(&mut log, &[msg(2, now + 60_000)]);
        assert_eq!(pending_count(root), 2);
    }

    #[test]
    fn taken_position_survives_and_ids_are_remembered_until_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let now = 1_700_000_100_000;
        let (soon, late) = (now + 10_000, now + 3_600_000);
        let mut log = InboxLog::open(root, 0, true, now).unwrap();
        let a: Vec<_> = (0..3).map(|n| msg(n, soon)).collect();
        let b: Vec<_> = (3..6).map(|n| msg(n, late)).collect();
        assert!(store(&mut log, &a).iter().all(|s| *s == Stored::New));
        // A retry of a stored message is a duplicate, also within one batch.
        assert_eq!(
            store(&mut log, &[a[0].clone(), b[0].clone(), b[0].clone()]),
            vec![Stored::Duplicate, Stored::New, Stored::Duplicate]
        );
        let mut r = Reader::open(root).unwrap().unwrap();
        let got = r.next_batch(2).unwrap();
        assert_eq!(got.len(), 2);
        r.take(got[1].1).unwrap();
        drop(r);
        // A new reader (a restarted `agent recv`) goes on after the taken position.
        let r = Reader::open(root).unwrap().unwrap();
        let rest = r.next_batch(100).unwrap();
        assert_eq!(
            rest.iter().map(|(e, _)| e.id).collect::<Vec<_>>(),
            vec![a[2].0, b[0].0]
        );
        assert_eq!(pending_count(root), 2);
        let mut r = r;
        r.take(rest[1].1).unwrap();
        assert!(!has_pending(root));
        // Everything taken: the next commit goes to a new segment, the old ones are
        // replaced by their ids.
        log.log.rotate().unwrap();
        store(&mut log, &b[1..]);
        let r2 = Reader::open(root).unwrap().unwrap();
        let last = r2.next_batch(100).unwrap();
        assert_eq!(last.len(), 2);
        let mut r2 = r2;
        r2.take(last[1].1).unwrap();
        log.log.rotate().unwrap();
        log.collect(now).unwrap();
        let dir = log_dir(root);
        // The first segment went (its ids kept); the one holding the taken position stays.
        assert_eq!(seglog::list_segments(&dir).unwrap().len(), 2);
        drop(log);
        // Restarted agent: ids still remembered (from the .ids files).
        let mut log = InboxLog::open(root, 0, true, now).unwrap();
        assert_eq!(log.remembered(), 6);
        assert_eq!(store(&mut log, &a[1..2]), vec![Stored::Duplicate]);
        // Past the first expiry (and the once-a-minute sweep): those are forgotten.
        log.collect(soon + 60_001).unwrap();
        assert_eq!(log.remembered(), 3);
        assert!(!log.contains(&a[0].0) && log.contains(&b[0].0));
        drop(log);
        let log = InboxLog::open(root, 0, true, late + 1).unwrap();
        assert_eq!(log.remembered(), 0);
        let ids_files = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "ids")
            })
            .count();
        assert_eq!(ids_files, 0, "expired .ids files removed");
    }

    #[test]
    fn an_unreadable_message_is_skipped_not_stuck() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let now = 1_700_000_100_000;
        let mut log = InboxLog::open(root, 0, true, now).unwrap();
        // A record that passes its CRC but is not a message, then a message.
        let good = msg(2, now + 60_000);
        store(&mut log, &[(good.0, b"garbage".to_vec(), good.2, good.3)]);
        store(&mut log, &[msg(3, now + 60_000)]);
        let mut r = Reader::open(root).unwrap().unwrap();
        let first = r.next_batch(1).unwrap();
        assert!(first.is_empty());
        r.take(r.read_end().expect("read past it")).unwrap();
        assert_eq!(r.next_batch(10).unwrap().len(), 1);
    }

    #[test]
    fn reader_never_reads_past_the_durable_position() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let now = 1_700_000_100_000;
        let mut log = InboxLog::open(root, 0, true, now).unwrap();
        store(&mut log, &[msg(1, now + 60_000)]);
        // Bytes appended but not committed (a crash before the fdatasync).
        let (seg, _) = log.position();
        let mut torn = Vec::new();
        seglog::encode_record(MSG, &msg(2, now + 60_000).1, &mut torn);
        let path = seglog::segment_path(&log_dir(root), seg);
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&torn, len)
            .unwrap();
        let r = Reader::open(root).unwrap().unwrap();
        assert_eq!(r.next_batch(100).unwrap().len(), 1);
    }
}
