//! Append-only segment logs with group commit: the outbox spool and the ipc/tcp inbox.
//!
//! A log is a directory of segment files `<n>.seg` (`n` increasing, 20 digits). A segment is
//! a sequence of records `[len: u32 LE][crc32: u32 LE][kind: u8][payload]`, where `len`
//! counts `kind` and `payload` and the CRC covers them too. Writers append many records and
//! make them durable with one `fdatasync` ([`SegLog::commit`]): a group commit. Only the
//! newest segment is appended to; once it passes its size limit a new one is started.
//!
//! Recovery ([`SegLog::open`]) reads every segment oldest first and stops each at its
//! first incomplete or corrupt record (a torn write of a crash), truncating the file there:
//! nothing after a torn record was ever reported durable, since commits are sequential.
//! Appending then goes on in a new segment.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Bytes of a record's header (length, CRC).
pub const HEADER: usize = 8;

/// Largest record accepted (a 16 MiB body plus its envelope header).
pub const MAX_RECORD: usize = 17 * 1024 * 1024;

/// CRC-32 (IEEE) of the concatenation of `parts`.
pub fn crc32(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

/// Appends one record to `out`.
pub fn encode_record(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    let len = (payload.len() + 1) as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32(&[&[kind], payload]).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
}

/// One record read back: where it starts, its kind and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Segment number.
    pub seg: u64,
    /// Offset of the record's header in the segment.
    pub off: u64,
    /// Offset just past the record.
    pub end: u64,
    /// Kind byte.
    pub kind: u8,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Parses the records of `bytes` (a segment's content from `base`), up to `limit` bytes;
/// returns them and the offset where valid data ends (a torn or corrupt record, or the end).
pub fn parse(seg: u64, base: u64, bytes: &[u8]) -> (Vec<Record>, u64) {
    parse_max(seg, base, bytes, usize::MAX)
}

/// [`parse`], stopping after `max` records.
pub fn parse_max(seg: u64, base: u64, bytes: &[u8], max: usize) -> (Vec<Record>, u64) {
    let mut out = Vec::new();
    let mut p = 0usize;
    while bytes.len() - p >= HEADER && out.len() < max {
        let len = u32::from_le_bytes(bytes[p..p + 4].try_into().expect("4")) as usize;
        let crc = u32::from_le_bytes(bytes[p + 4..p + 8].try_into().expect("4"));
        if len == 0 || len > MAX_RECORD + 1 || bytes.len() - p - HEADER < len {
            break;
        }
        let body = &bytes[p + HEADER..p + HEADER + len];
        if crc32(&[body]) != crc {
            break;
        }
        let end = p + HEADER + len;
        out.push(Record {
            seg,
            off: base + p as u64,
            end: base + end as u64,
            kind: body[0],
            payload: body[1..].to_vec(),
        });
        p = end;
    }
    (out, base + p as u64)
}

/// Reads every record of segment file `path` (number `seg`): the records and where valid
/// data ends.
pub fn read_segment(path: &Path, seg: u64) -> std::io::Result<(Vec<Record>, u64)> {
    Ok(parse(seg, 0, &std::fs::read(path)?))
}

/// Up to `max` records of segment `path` from `from`, never past `until`, reading about
/// `chunk` bytes (more when one record is larger).
pub fn read_records(
    path: &Path,
    seg: u64,
    from: u64,
    until: Option<u64>,
    max: usize,
    chunk: u64,
) -> std::io::Result<Vec<Record>> {
    let f = File::open(path)?;
    let end = match until {
        Some(u) => u,
        None => f.metadata()?.len(),
    };
    let mut want = chunk.min(end.saturating_sub(from));
    loop {
        let mut bytes = vec![0u8; want as usize];
        let mut got = 0;
        while got < bytes.len() {
            match f.read_at(&mut bytes[got..], from + got as u64)? {
                0 => break,
                n => got += n,
            }
        }
        bytes.truncate(got);
        let (recs, _) = parse_max(seg, from, &bytes, max);
        if !recs.is_empty() || got < want as usize || from + want >= end || bytes.len() < HEADER {
            return Ok(recs);
        }
        // The first record is larger than the chunk.
        let len = u64::from(u32::from_le_bytes(bytes[..4].try_into().expect("4")));
        if len as usize > MAX_RECORD + 1 || want >= len + HEADER as u64 {
            return Ok(recs);
        }
        want = (len + HEADER as u64).min(end - from);
    }
}

/// Segment numbers in `dir`, ascending.
pub fn list_segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut v: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| {
            let n = e.ok()?.file_name();
            n.to_str()?.strip_suffix(".seg")?.parse().ok()
        })
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// Path of segment `n` in `dir`.
pub fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}.seg"))
}

/// An open log, appending to its newest segment.
#[derive(Debug)]
pub struct SegLog {
    dir: PathBuf,
    file: File,
    seg: u64,
    len: u64,
    max_segment: u64,
    buf: Vec<u8>,
    /// Failure injection (tests).
    #[cfg(test)]
    pub(crate) faults: Faults,
}

/// Failures a test makes a [`SegLog`] report, as a failing disk (ENOSPC, EIO) would.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// Outcomes of the next commits that write something, in turn (`true`: its
    /// `fdatasync` fails, after the write); commits past the list succeed.
    pub(crate) syncs: std::collections::VecDeque<bool>,
    /// Starting a new segment fails.
    pub(crate) rotate: bool,
}

impl SegLog {
    /// Opens (creating, 0700) the log in `dir`: every record of every segment (torn tails
    /// cut off), and the log, appending to a fresh segment.
    pub fn open(dir: &Path, max_segment: u64) -> std::io::Result<(SegLog, Vec<Record>)> {
        crate::state::prepare_dir(dir)?;
        let mut all = Vec::new();
        let segs = list_segments(dir)?;
        for &n in &segs {
            let path = segment_path(dir, n);
            let (recs, valid) = read_segment(&path, n)?;
            let size = std::fs::metadata(&path)?.len();
            if valid < size {
                tracing::warn!(segment = %path.display(), valid, size, "torn or corrupt tail cut off");
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(valid)?;
                f.sync_all()?;
            }
            all.extend(recs);
        }
        let next = segs.last().map_or(1, |n| n + 1);
        let file = Self::create_segment(dir, next)?;
        Ok((
            SegLog {
                dir: dir.to_path_buf(),
                file,
                seg: next,
                len: 0,
                max_segment,
                buf: Vec::new(),
                #[cfg(test)]
                faults: Faults::default(),
            },
            all,
        ))
    }

    /// Creates segment `n` (durably named). On error no file is left behind, so creating
    /// it can be tried again.
    fn create_segment(dir: &Path, n: u64) -> std::io::Result<File> {
        let path = segment_path(dir, n);
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        if let Err(e) = crate::util::fsync_dir(dir) {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(f)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The segment being appended to.
    pub fn active(&self) -> u64 {
        self.seg
    }

    /// Where the next appended record will start (segment, offset).
    pub fn position(&self) -> (u64, u64) {
        (self.seg, self.len + self.buf.len() as u64)
    }

    /// Appends a record (not yet written: see [`SegLog::commit`]); returns where it starts.
    pub fn append(&mut self, kind: u8, payload: &[u8]) -> (u64, u64) {
        let p = self.position();
        encode_record(kind, payload, &mut self.buf);
        p
    }

    /// Writes the appended records and makes them durable (one `fdatasync`); then starts a
    /// new segment if this one is full. On error the records are dropped and the segment
    /// is cut back to its committed length (the caller reports every one of them failed).
    /// Once the records are durable this returns `Ok`: should the new segment fail to
    /// start, appending goes on in this one and the next commit tries again (an error
    /// would have the caller report durable records failed, and their senders send them
    /// again).
    pub fn commit(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let r = self
            .file
            .write_all_at(&self.buf, self.len)
            .and_then(|()| self.file.sync_data());
        #[cfg(test)]
        let r = r.and_then(|()| match self.faults.syncs.pop_front() {
            Some(true) => Err(std::io::Error::other("injected fdatasync failure")),
            _ => Ok(()),
        });
        if let Err(e) = r {
            self.buf.clear();
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.len += self.buf.len() as u64;
        self.buf.clear();
        if self.len >= self.max_segment
            && let Err(e) = self.rotate()
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot start a new segment; will retry");
        }
        Ok(())
    }

    /// Starts a new segment. On error nothing changed (appending goes on in this one).
    pub fn rotate(&mut self) -> std::io::Result<()> {
        #[cfg(test)]
        if self.faults.rotate {
            return Err(std::io::Error::other("injected failure to start a segment"));
        }
        let n = self.seg + 1;
        self.file = Self::create_segment(&self.dir, n)?;
        self.seg = n;
        self.len = 0;
        Ok(())
    }

    /// Removes an older segment.
    pub fn remove(&self, n: u64) -> std::io::Result<()> {
        assert!(n != self.seg, "the active segment is never removed");
        match std::fs::remove_file(segment_path(&self.dir, n)) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn crc_matches_the_ieee_check_value() {
        assert_eq!(crc32(&[b"123456789"]), 0xCBF4_3926);
        assert_eq!(crc32(&[b"1234", b"56789"]), 0xCBF4_3926);
        assert_eq!(crc32(&[b""]), 0);
    }

    #[test]
    fn records_survive_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("log");
        let (mut log, recs) = SegLog::open(&d, 1 << 20).unwrap();
        assert!(recs.is_empty());
        for i in 0..10u8 {
            log.append(1, &vec![i; 100 + usize::from(i)]);
        }
        log.commit().unwrap();
        let seg = log.active();
        drop(log);
        // A crash in the middle of the next record: half of it on disk.
        let path = segment_path(&d, seg);
        let mut half = Vec::new();
        encode_record(1, &[9; 300], &mut half);
        let full_len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().append(true).open(&path).unwrap();
        (&f).write_all(&half[..150]).unwrap();
        drop(f);
        let (mut log, recs) = SegLog::open(&d, 1 << 20).unwrap();
        assert_eq!(recs.len(), 10);
        assert_eq!(recs[3].payload, vec![3; 103]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), full_len);
        assert!(log.active() > seg);
        // A flipped bit in a committed record: the segment is cut there.
        log.append(2, b"later");
        log.commit().unwrap();
        let seg2 = log.active();
        drop(log);
        let p2 = segment_path(&d, seg2);
        let mut bytes = std::fs::read(&path).unwrap();
        let off = recs[5].off as usize + HEADER + 10;
        bytes[off] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let (_log, recs) = SegLog::open(&d, 1 << 20).unwrap();
        assert_eq!(recs.len(), 6, "5 before the bad one, 1 in the next segment");
        assert_eq!(recs[5].payload, b"later");
        assert!(p2.exists());
    }

    /// Records made durable are reported so even when the next segment cannot be started
    /// (before: an error, the caller reported them failed and their senders sent them
    /// again); starting it is retried by the next commit.
    #[test]
    fn a_failure_to_start_the_next_segment_does_not_fail_a_durable_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = SegLog::open(dir.path(), 1000).unwrap();
        let first = log.active();
        log.faults.rotate = true;
        log.append(1, &[1; 1000]);
        log.commit().expect("the records are durable");
        assert_eq!(log.active(), first, "still appending to the full segment");
        log.append(1, &[2; 10]);
        log.commit().unwrap();
        log.faults.rotate = false;
        log.append(1, &[3; 10]);
        log.commit().unwrap();
        assert_eq!(log.active(), first + 1, "retried by the next commit");
        let (_, recs) = SegLog::open(dir.path(), 1000).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[2].payload, vec![3; 10]);
    }

    #[test]
    fn segments_rotate_and_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = SegLog::open(dir.path(), 1000).unwrap();
        let first = log.active();
        for _ in 0..5 {
            log.append(1, &[0; 1000]);
            log.commit().unwrap();
        }
        assert_eq!(log.active(), first + 5);
        log.remove(first).unwrap();
        assert_eq!(list_segments(dir.path()).unwrap().len(), 5);
        let (_, recs) = SegLog::open(dir.path(), 1000).unwrap();
        assert_eq!(recs.len(), 4);
    }
}
