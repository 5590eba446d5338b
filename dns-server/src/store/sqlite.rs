//! The embedded default store: SQLite (bundled) in WAL mode with `synchronous=FULL`, written
//! by one thread that commits everything queued since its last commit in one transaction.
//!
//! With 16 clients registering at once, each commit carries about 16 registrations, so one
//! fsync serves all of them: durability without a throughput cap of one fsync per request.
//!
//! The writer also numbers and frames the events reporting those changes and commits them
//! in the same transaction (see [`EventLog`]), so the event history a client resumes from
//! is never ahead of, nor behind, the data.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;

use rusqlite::{Connection, OptionalExtension, params};
use shared::{Event, HealthState, MembraneId, NamespaceName};

use super::{EventLog, Loaded, Op, StoreError, StoredEvent, StoredMembrane, StoredNamespace};
use crate::registry::events::{Published, RING, Sequenced};

/// Most submissions folded into one transaction.
const MAX_BATCH: usize = 4096;

/// Events kept beyond [`RING`] before the oldest are deleted, while no write waits (the
/// deletion then costs a write burst nothing)...
const TRIM_SLACK: usize = 1024;
/// ... or within a commit once this many are kept beyond it (a sustained burst: about
/// 20 MB of events at most).
const TRIM_HARD: usize = 2 * RING;
/// Numbering segments kept (one per process start).
const MAX_SEGMENTS: usize = 64;

/// Called once the submission's batch is committed (or failed), on the writer thread, in
/// submission order, with the submission's events as numbered and framed.
pub type Done = Box<dyn FnOnce(Result<Vec<(NamespaceName, Sequenced)>, &StoreError>) + Send>;

/// Ops to commit together, the events reporting them, and what to do after.
pub struct Submission {
    /// The changes.
    pub ops: Vec<Op>,
    /// The events: numbered in submission order and committed with the ops.
    pub events: Vec<(NamespaceName, Event)>,
    /// Completion callback.
    pub done: Done,
}

/// Queue into the writer thread. Cloning is cheap.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Submission>,
}

impl Writer {
    /// Queues `sub`; its `done` runs after the commit that contains it.
    pub fn submit(&self, sub: Submission) -> Result<(), StoreError> {
        self.tx.send(sub).map_err(|_| StoreError::Closed)
    }
}

/// The writer thread; join it after every [`Writer`] is dropped to flush the last batch.
pub struct WriterThread(JoinHandle<()>);

impl WriterThread {
    /// Waits for the writer to drain its queue and exit.
    pub fn join(self) {
        let _ = self.0.join();
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS namespaces (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    settings TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    join_token_hash BLOB
) STRICT;
-- Append-only: seq increases with every write; registration NULL marks a tombstone.
CREATE TABLE IF NOT EXISTS membranes (
    seq INTEGER PRIMARY KEY,
    namespace TEXT NOT NULL,
    id TEXT NOT NULL,
    registration TEXT,
    secret_hash BLOB,
    registered_at_ms INTEGER NOT NULL
) STRICT;
-- The event history (see `EventLog`): the newest events; each namespace's last event
-- among those deleted (written when the oldest are deleted); every process's numbering
-- segment (its last number written at the next start, from `events`); and the membranes
-- last announced stale.
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    namespace TEXT NOT NULL,
    kind TEXT NOT NULL,
    frame BLOB NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS event_namespaces (
    namespace TEXT PRIMARY KEY,
    last INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS event_segments (
    start INTEGER PRIMARY KEY,
    last INTEGER NOT NULL
) STRICT;
-- Namespaces whose registrations were kept but not served at the last start (the
-- namespace was missing): served once it exists again, with no event for them.
CREATE TABLE IF NOT EXISTS event_orphans (namespace TEXT PRIMARY KEY) STRICT;
CREATE TABLE IF NOT EXISTS event_stale (
    namespace TEXT NOT NULL,
    id TEXT NOT NULL,
    PRIMARY KEY (namespace, id)
) STRICT;
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '1');
";

/// Superseded rows deleted per garbage-collection transaction.
const GC_CHUNK: usize = 2048;

/// Opens (creating if needed) the database at `path`, reads everything, and starts the
/// writer thread.
///
/// Only a missing file means "start empty": an existing file that is empty or not a
/// registry database is refused ([`StoreError::Unusable`]) and left untouched.
pub fn open(path: &Path) -> Result<(Loaded, Writer, WriterThread), StoreError> {
    prepare_file(path)?;
    let mut conn = connect(path).map_err(|e| unusable(path, e))?;
    let (mut loaded, garbage) = load(&conn).map_err(|e| unusable(path, e))?;
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let (events, kept) =
        load_events(&mut conn, now_us, &loaded.orphaned).map_err(|e| unusable(path, e))?;
    let numbering = Numbering {
        last: events.start,
        kept,
        stale: events.stale.iter().cloned().collect(),
    };
    loaded.events = events;
    let (tx, rx) = mpsc::channel::<Submission>();
    let handle = std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || writer_loop(conn, rx, garbage, numbering))
        .map_err(|e| StoreError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
    Ok((loaded, Writer { tx }, WriterThread(handle)))
}

/// Database errors at open and load mean the file is not what it should be.
fn unusable(path: &Path, e: StoreError) -> StoreError {
    match e {
        StoreError::Sqlite(_) | StoreError::Corrupt { .. } => StoreError::Unusable {
            path: path.display().to_string(),
            reason: e.to_string(),
        },
        other => other,
    }
}

/// The database file and its `-wal`/`-shm` companions (SQLite creates those with the
/// database file's permissions).
fn companions(path: &Path) -> [std::path::PathBuf; 3] {
    let with = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        std::path::PathBuf::from(p)
    };
    [path.to_path_buf(), with("-wal"), with("-shm")]
}

/// Makes sure `path` is either a fresh database with the schema (created whole, 0600) or
/// an existing non-empty file, and that no database file is readable by others.
///
/// A fresh database is built under a temporary name and renamed into place, so a crash
/// while creating it never leaves an empty `path` behind (which would then be refused).
fn prepare_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| StoreError::Io { path: p, source }
    };
    match std::fs::metadata(path) {
        Ok(meta) if meta.len() == 0 => {
            return Err(StoreError::Unusable {
                path: path.display().to_string(),
                reason: "the file is empty (0 bytes)".into(),
            });
        }
        Ok(_) => {
            for p in companions(path) {
                match std::fs::metadata(&p) {
                    Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                            .map_err(io(&p))?;
                    }
                    _ => {}
                }
            }
            return Ok(());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // SQLite would apply a leftover log to the new file: the half of a database
            // moved away without its `-wal` would come back in pieces.
            let [_, wal, _] = companions(path);
            if wal.exists() {
                return Err(StoreError::Unusable {
                    path: wal.display().to_string(),
                    reason: format!(
                        "the write-ahead log of a database that is gone remains ({} is \
                         missing; move its -wal and -shm files with it)",
                        path.display()
                    ),
                });
            }
        }
        Err(e) => return Err(io(path)(e)),
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = std::path::PathBuf::from(tmp);
    for p in companions(&tmp) {
        let _ = std::fs::remove_file(p);
    }
    let _ = std::fs::remove_file(format!("{}-journal", tmp.display()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    {
        // Rollback journal (not WAL) while building: the result is one self-contained file.
        let conn = Connection::open(&tmp)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
    }
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    // WAL + FULL: every commit fsyncs the log before returning, so an acknowledged write
    // survives a crash or power loss; readers never block the writer.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "busy_timeout", 5000)?;
    conn.execute_batch(SCHEMA)?;
    let version: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if version.as_deref() != Some("1") {
        return Err(StoreError::Corrupt {
            table: "meta",
            message: format!("unsupported schema version {version:?}"),
        });
    }
    Ok(conn)
}

fn corrupt(table: &'static str, message: impl ToString) -> StoreError {
    StoreError::Corrupt {
        table,
        message: message.to_string(),
    }
}

fn hash32(table: &'static str, v: Vec<u8>) -> Result<[u8; 32], StoreError> {
    v.try_into()
        .map_err(|_| corrupt(table, "hash is not 32 bytes"))
}

/// Reads everything; returns the live state and the rows to garbage-collect.
fn load(conn: &Connection) -> Result<(Loaded, BTreeSet<i64>), StoreError> {
    let mut out = Loaded::default();
    let mut stmt = conn.prepare(
        "SELECT name, description, settings, created_at_ms, join_token_hash FROM namespaces",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let name: String = row.get(0)?;
        let settings: String = row.get(2)?;
        let hash: Option<Vec<u8>> = row.get(4)?;
        out.namespaces.push(StoredNamespace {
            name: NamespaceName::new(&name).map_err(|e| corrupt("namespaces", e))?,
            description: row.get(1)?,
            settings: serde_json::from_str(&settings).map_err(|e| corrupt("namespaces", e))?,
            created_at_ms: row.get(3)?,
            join_token_hash: hash.map(|h| hash32("namespaces", h)).transpose()?,
        });
    }
    let known: HashSet<String> = out.namespaces.iter().map(|n| n.name.to_string()).collect();
    let mut garbage = BTreeSet::new();
    // Newest row per membrane; `None` for a tombstone.
    let mut latest: HashMap<(String, String), (i64, Option<StoredMembrane>)> = HashMap::new();
    let mut stmt = conn.prepare(
        "SELECT seq, namespace, id, registration, secret_hash, registered_at_ms
         FROM membranes ORDER BY seq",
    )?;
    let mut rows = stmt.query([])?;
    let mut max_seq = 0;
    // Newest row of each membrane of a missing namespace: live or tombstone.
    let mut orphans: HashMap<(String, String), bool> = HashMap::new();
    while let Some(row) = rows.next()? {
        let seq: i64 = row.get(0)?;
        max_seq = max_seq.max(seq);
        let ns: String = row.get(1)?;
        let id: String = row.get(2)?;
        let reg: Option<String> = row.get(3)?;
        if !known.contains(&ns) {
            // Never deleted here: kept as they are, reported below.
            orphans.insert((ns, id), reg.is_some());
            continue;
        }
        let value = match reg {
            None => None,
            Some(reg) => {
                let hash: Option<Vec<u8>> = row.get(4)?;
                Some(StoredMembrane {
                    seq,
                    namespace: NamespaceName::new(&ns).map_err(|e| corrupt("membranes", e))?,
                    id: MembraneId::new(&id).map_err(|e| corrupt("membranes", e))?,
                    registration: std::sync::Arc::new(
                        serde_json::from_str(&reg).map_err(|e| corrupt("membranes", e))?,
                    ),
                    secret_hash: hash32("membranes", hash.unwrap_or_default())?,
                    registered_at_ms: row.get(5)?,
                })
            }
        };
        if let Some((old, _)) = latest.insert((ns, id), (seq, value)) {
            garbage.insert(old);
        }
    }
    for (seq, value) in latest.into_values() {
        match value {
            Some(m) => out.membranes.push(m),
            None => {
                garbage.insert(seq);
            }
        }
    }
    out.membranes.sort_by_key(|m| m.seq);
    for ((ns, _), live) in orphans {
        if live {
            *out.orphaned.entry(ns).or_default() += 1;
        }
    }
    out.next_seq = max_seq + 1;
    Ok((out, garbage))
}

/// Reads the event history and opens this process's numbering segment (after every
/// number used before, and the wall clock `now_us`); drops what belongs to namespaces
/// that no longer exist. Returns the history and the numbers of every event the table
/// holds, oldest first.
/// Column `i` as a sequence number (a non-negative INTEGER; a negative one is an error,
/// and the file is refused as unusable).
fn seq_at(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<u64> {
    let v: i64 = r.get(i)?;
    u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(i, v))
}

/// [`seq_at`] of a column that may be NULL.
fn seq_opt(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Option<u64>> {
    match r.get::<_, Option<i64>>(i)? {
        None => Ok(None),
        Some(_) => seq_at(r, i).map(Some),
    }
}

fn load_events(
    conn: &mut Connection,
    now_us: u64,
    orphaned: &std::collections::BTreeMap<String, usize>,
) -> Result<(EventLog, VecDeque<u64>), StoreError> {
    /// Every row of `sql`, mapped by `f`.
    fn select<T>(
        tx: &Connection,
        sql: &str,
        params: impl rusqlite::Params,
        f: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, StoreError> {
        let mut stmt = tx.prepare(sql)?;
        let rows = stmt.query_map(params, f)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('event_epoch', ?1)",
        [now_us.to_string()],
    )?;
    let epoch: String = tx.query_row(
        "SELECT value FROM meta WHERE key = 'event_epoch'",
        [],
        |r| r.get(0),
    )?;
    let epoch: u64 = epoch
        .parse()
        .map_err(|e| corrupt("meta", format!("event_epoch {epoch:?}: {e}")))?;
    let mut segments: Vec<(u64, u64)> = select(
        &tx,
        "SELECT start, max(start, last) FROM event_segments ORDER BY start",
        [],
        |r| Ok((seq_at(r, 0)?, seq_at(r, 1)?)),
    )?;
    // A segment's last number is not written while its process runs (one write less per
    // commit): its newest events are still kept now, so it is found here.
    for i in 0..segments.len() {
        let end = segments.get(i + 1).map_or(u64::MAX, |&(s, _)| s);
        let (start, last) = segments[i];
        let found: Option<u64> = tx.query_row(
            "SELECT max(seq) FROM events WHERE seq > ?1 AND seq < ?2",
            params![start as i64, end.min(i64::MAX as u64) as i64],
            |r| seq_opt(r, 0),
        )?;
        if let Some(found) = found
            && found > last
        {
            tx.execute(
                "UPDATE event_segments SET last = ?2 WHERE start = ?1",
                params![start as i64, found as i64],
            )?;
            segments[i].1 = found;
        }
    }
    let max_event = tx.query_row("SELECT max(seq) FROM events", [], |r| seq_opt(r, 0))?;
    let high = segments.iter().map(|&(_, l)| l).chain(max_event).max();
    let start = match high {
        Some(h) => now_us.max(h + 1),
        None => now_us.max(epoch),
    };
    if segments.len() >= MAX_SEGMENTS {
        let keep_from = segments[segments.len() + 1 - MAX_SEGMENTS].0;
        tx.execute(
            "DELETE FROM event_segments WHERE start < ?1",
            [keep_from as i64],
        )?;
        segments.retain(|&(s, _)| s >= keep_from);
    }
    tx.execute(
        "INSERT INTO event_segments (start, last) VALUES (?1, ?1)",
        [start as i64],
    )?;
    // A namespace's last event is kept after the namespace is deleted (recreated, its
    // old subscribers must not resume past its deletion) until no kept segment can hold a
    // position before it.
    let oldest = segments.first().map_or(start, |&(s, _)| s);
    tx.execute(
        "DELETE FROM event_namespaces WHERE last < ?1",
        [oldest as i64],
    )?;
    tx.execute(
        "DELETE FROM event_stale WHERE namespace NOT IN (SELECT name FROM namespaces)",
        [],
    )?;
    // Each namespace's last event: among the kept events, else among the deleted ones.
    let namespace_last = select(
        &tx,
        "SELECT namespace, max(last) FROM (
             SELECT namespace, last FROM event_namespaces
             UNION ALL SELECT namespace, seq FROM events)
         GROUP BY namespace",
        [],
        |r| Ok((r.get(0)?, seq_at(r, 1)?)),
    )?;
    let mut recent = select(
        &tx,
        "SELECT seq, namespace, kind, frame FROM events ORDER BY seq DESC LIMIT ?1",
        [RING as i64],
        |r| {
            Ok(StoredEvent {
                seq: seq_at(r, 0)?,
                namespace: r.get(1)?,
                kind: r.get(2)?,
                frame: r.get(3)?,
            })
        },
    )?;
    recent.reverse();
    let stale = select(&tx, "SELECT namespace, id FROM event_stale", [], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })?;
    let adopted = select(
        &tx,
        "SELECT namespace FROM event_orphans WHERE namespace IN (SELECT name FROM namespaces)",
        [],
        |r| r.get(0),
    )?;
    tx.execute("DELETE FROM event_orphans", [])?;
    for ns in orphaned.keys() {
        tx.execute("INSERT INTO event_orphans (namespace) VALUES (?1)", [ns])?;
    }
    let kept = select(&tx, "SELECT seq FROM events ORDER BY seq", [], |r| {
        seq_at(r, 0)
    })?;
    tx.commit()?;
    Ok((
        EventLog {
            epoch,
            segments,
            start,
            namespace_last,
            recent,
            stale,
            adopted,
        },
        kept.into(),
    ))
}

/// The writer's event numbering and what the event tables hold.
struct Numbering {
    /// The last number (this process's segment starts after it).
    last: u64,
    /// The numbers of the events in `events`, oldest first.
    kept: VecDeque<u64>,
    /// The rows of `event_stale` (namespace, id).
    stale: HashSet<(String, String)>,
}

/// Keeps `event_stale` (the membranes last announced stale, mirrored in `stale` as of the
/// last commit, and in `changed` for this transaction) up to date with `ev`.
fn note_health(
    tx: &rusqlite::Transaction<'_>,
    ev: &Event,
    stale: &HashSet<(String, String)>,
    changed: &mut HashMap<(String, String), bool>,
) -> Result<(), rusqlite::Error> {
    let (ns, id, is_stale) = match ev {
        Event::StateChanged {
            namespace,
            id,
            state,
        } => (namespace, id, *state == HealthState::Stale),
        Event::Deregistered { namespace, id, .. } => (namespace, id, false),
        Event::Registered { membrane } => (
            &membrane.namespace,
            &membrane.id,
            membrane.state == HealthState::Stale,
        ),
        Event::Resync { .. } => return Ok(()),
    };
    let key = (ns.as_str().to_string(), id.as_str().to_string());
    let was = changed
        .get(&key)
        .copied()
        .unwrap_or_else(|| stale.contains(&key));
    // Only a change of the set touches the table (most events are not about health).
    let sql = match (is_stale, was) {
        (true, false) => "INSERT OR IGNORE INTO event_stale (namespace, id) VALUES (?1, ?2)",
        (false, true) => "DELETE FROM event_stale WHERE namespace = ?1 AND id = ?2",
        _ => return Ok(()),
    };
    tx.prepare_cached(sql)?
        .execute([ns.as_str(), id.as_str()])?;
    changed.insert(key, is_stale);
    Ok(())
}

const INSERT_ROW: &str = "INSERT INTO membranes
    (seq, namespace, id, registration, secret_hash, registered_at_ms)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

fn apply(
    tx: &rusqlite::Transaction<'_>,
    op: &Op,
    garbage: &mut BTreeSet<i64>,
) -> Result<(), rusqlite::Error> {
    match op {
        Op::PutNamespace(ns) => {
            let settings = serde_json::to_string(&ns.settings).unwrap_or_default();
            tx.prepare_cached(
                "INSERT INTO namespaces (name, description, settings, created_at_ms, join_token_hash)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (name) DO UPDATE SET description = excluded.description,
                   settings = excluded.settings, join_token_hash = excluded.join_token_hash",
            )?
            .execute(params![
                ns.name.as_str(),
                ns.description,
                settings,
                ns.created_at_ms,
                ns.join_token_hash.as_ref().map(|h| &h[..]),
            ])?;
        }
        Op::DeleteNamespace(name) => {
            // Rare: a scan is fine, and keeps every membrane write an append.
            tx.prepare_cached("DELETE FROM membranes WHERE namespace = ?1")?
                .execute([name.as_str()])?;
            tx.prepare_cached("DELETE FROM namespaces WHERE name = ?1")?
                .execute([name.as_str()])?;
        }
        Op::PutMembrane { row, supersedes } => {
            let reg = serde_json::to_string(&*row.registration).unwrap_or_default();
            tx.prepare_cached(INSERT_ROW)?.execute(params![
                row.seq,
                row.namespace.as_str(),
                row.id.as_str(),
                reg,
                &row.secret_hash[..],
                row.registered_at_ms,
            ])?;
            garbage.extend(*supersedes);
        }
        Op::DeleteMembrane {
            seq,
            namespace,
            id,
            supersedes,
        } => {
            tx.prepare_cached(INSERT_ROW)?.execute(params![
                seq,
                namespace.as_str(),
                id.as_str(),
                None::<String>,
                None::<Vec<u8>>,
                0,
            ])?;
            garbage.insert(*supersedes);
            garbage.insert(*seq);
        }
    }
    Ok(())
}

/// Deletes up to [`GC_CHUNK`] of the oldest garbage rows. Oldest first: a tombstone is
/// always newer than the rows it removes, so it is never deleted before them, and a crash
/// between chunks still loads the right state.
fn collect_garbage(conn: &mut Connection, garbage: &mut BTreeSet<i64>) -> Result<(), StoreError> {
    let chunk: Vec<i64> = garbage.iter().take(GC_CHUNK).copied().collect();
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut del = tx.prepare_cached("DELETE FROM membranes WHERE seq = ?1")?;
        for seq in &chunk {
            del.execute([seq])?;
        }
    }
    tx.commit()?;
    for seq in chunk {
        garbage.remove(&seq);
    }
    Ok(())
}

/// Deletes the oldest events but the newest [`RING`], keeping each namespace's last event
/// among them in `event_namespaces`; returns how many to drop from `kept` once committed.
fn trim_events(tx: &rusqlite::Transaction<'_>, kept: &VecDeque<u64>) -> Result<usize, StoreError> {
    let extra = kept.len().saturating_sub(RING);
    let Some(&cut) = kept.get(extra) else {
        return Ok(0);
    };
    let cut = cut as i64;
    tx.prepare_cached(
        "INSERT INTO event_namespaces (namespace, last)
         SELECT namespace, max(seq) FROM events WHERE seq < ?1 GROUP BY namespace
         ON CONFLICT (namespace) DO UPDATE SET last = max(last, excluded.last)",
    )?
    .execute([cut])?;
    tx.prepare_cached("DELETE FROM events WHERE seq < ?1")?
        .execute([cut])?;
    Ok(extra)
}

/// One submission's events, numbered and framed.
type Framed = Vec<(NamespaceName, Sequenced)>;

/// Numbers `events` after `last` (moving it) and frames them, once for every subscriber
/// and for the table, off the registry's locks.
fn frame_events(last: &mut u64, events: &[(NamespaceName, Event)]) -> Framed {
    events
        .iter()
        .map(|(ns, ev)| {
            *last += 1;
            let p = Published::new(*last, ev);
            (ns.clone(), (*last, std::sync::Arc::new(p)))
        })
        .collect()
}

/// Commits the batch's ops and events in one transaction; returns each submission's
/// events as numbered (in submission order, after every number used before). Nothing of
/// `numbering` changes unless the commit succeeds.
fn commit(
    conn: &mut Connection,
    batch: &[Submission],
    garbage: &mut BTreeSet<i64>,
    numbering: &mut Numbering,
) -> Result<Vec<Framed>, StoreError> {
    let mut last = numbering.last;
    let framed: Vec<Framed> = batch
        .iter()
        .map(|sub| frame_events(&mut last, &sub.events))
        .collect();
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut new_garbage = BTreeSet::new();
    for sub in batch {
        for op in &sub.ops {
            apply(&tx, op, &mut new_garbage)?;
        }
    }
    let mut health = HashMap::new();
    for (sub, framed) in batch.iter().zip(&framed) {
        for ((_, ev), (ns, (seq, p))) in sub.events.iter().zip(framed) {
            tx.prepare_cached(
                "INSERT INTO events (seq, namespace, kind, frame) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![*seq as i64, ns.as_str(), p.kind(), p.bytes()])?;
            note_health(&tx, ev, &numbering.stale, &mut health)?;
        }
    }
    let added = framed.iter().map(Vec::len).sum::<usize>();
    // Trimmed while idle (see `writer_loop`); here only past the hard bound.
    let mut trimmed = 0;
    if numbering.kept.len() + added > RING + TRIM_HARD {
        let mut kept = numbering.kept.clone();
        kept.extend(framed.iter().flatten().map(|(_, (seq, _))| *seq));
        trimmed = trim_events(&tx, &kept)?;
    }
    tx.commit()?;
    numbering
        .kept
        .extend(framed.iter().flatten().map(|(_, (seq, _))| *seq));
    numbering.kept.drain(..trimmed);
    for (key, stale) in health {
        if stale {
            numbering.stale.insert(key);
        } else {
            numbering.stale.remove(&key);
        }
    }
    numbering.last = last;
    garbage.append(&mut new_garbage);
    Ok(framed)
}

fn writer_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<Submission>,
    mut garbage: BTreeSet<i64>,
    mut numbering: Numbering,
) {
    let mut batch = Vec::with_capacity(64);
    // Fail-stop: after one failed commit every later write fails too, so the registry,
    // which drops every staged (uncommitted) change then, matches the disk exactly.
    let mut broken = false;
    let mut idle_trim = true;
    // Garbage is deleted oldest first, a tombstone after the rows it removes. Once a
    // collection failed, its rows are forgotten: deleting newer ones (a tombstone above
    // all) could leave an older row the newest of its membrane, alive again at the next
    // start. So collection stops until a restart, which finds all garbage again.
    let mut collect = true;
    loop {
        // Collect garbage only while no write is waiting.
        let first = match rx.try_recv() {
            Ok(sub) => sub,
            Err(mpsc::TryRecvError::Empty)
                if idle_trim && !broken && numbering.kept.len() > RING + TRIM_SLACK =>
            {
                let trimmed = conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(StoreError::from)
                    .and_then(|tx| {
                        let n = trim_events(&tx, &numbering.kept)?;
                        tx.commit()?;
                        Ok(n)
                    });
                match trimmed {
                    Ok(n) => drop(numbering.kept.drain(..n)),
                    // Only costs space: left to the hard bound within commits.
                    Err(e) => {
                        tracing::warn!(error = %e, "deleting old events failed");
                        idle_trim = false;
                    }
                }
                continue;
            }
            Err(mpsc::TryRecvError::Empty) if collect && !garbage.is_empty() => {
                if let Err(e) = collect_garbage(&mut conn, &mut garbage) {
                    // Harmless to keep: superseded rows only cost space until next start.
                    tracing::warn!(
                        error = %e,
                        "store garbage collection failed; superseded rows are kept until \
                         the next start"
                    );
                    collect = false;
                    garbage.clear();
                }
                continue;
            }
            Err(mpsc::TryRecvError::Empty) => match rx.recv() {
                Ok(sub) => sub,
                Err(_) => break,
            },
            Err(mpsc::TryRecvError::Disconnected) => break,
        };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(sub) => batch.push(sub),
                Err(_) => break,
            }
        }
        let has_work = batch
            .iter()
            .any(|s| !s.ops.is_empty() || !s.events.is_empty());
        let result = if !has_work {
            Ok(batch.iter().map(|_| Vec::new()).collect())
        } else if broken {
            Err(StoreError::Closed)
        } else {
            commit(&mut conn, &batch, &mut garbage, &mut numbering)
        };
        if !collect {
            garbage.clear();
        }
        if let Err(e) = &result
            && !broken
        {
            broken = true;
            tracing::error!(
                error = %e,
                batch = batch.len(),
                "store commit failed; writes are refused until a restart"
            );
        }
        match result {
            Ok(framed) => {
                for (sub, events) in batch.drain(..).zip(framed) {
                    (sub.done)(Ok(events));
                }
            }
            Err(e) => {
                for sub in batch.drain(..) {
                    if sub.ops.is_empty() {
                        // Health changes (events only) go on in memory once the store
                        // has failed, as they must for DNS: numbered, not kept. No
                        // segment holds these numbers, so after a restart their holders
                        // resync instead of resuming.
                        let framed = frame_events(&mut numbering.last, &sub.events);
                        (sub.done)(Ok(framed));
                    } else {
                        (sub.done)(Err(&e));
                    }
                }
            }
        }
    }
    tracing::debug!("store writer stopped");
}

/// The SOA serial ceilings of the DNS zones (`zone_serials`), on a connection of their
/// own: written once per zone at start and then once every thousand updates of a zone, never
/// on the writer's path.
pub struct SerialTable(std::sync::Mutex<Connection>);

impl SerialTable {
    /// Opens the store at `path` (created as [`open`] does) with the `zone_serials` table.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        prepare_file(path)?;
        let conn = connect(path).map_err(|e| unusable(path, e))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS zone_serials (
                namespace TEXT PRIMARY KEY,
                ceiling INTEGER NOT NULL
            ) STRICT;",
        )?;
        Ok(SerialTable(std::sync::Mutex::new(conn)))
    }
}

impl crate::dns::SerialStore for SerialTable {
    fn load(&self) -> Result<Vec<(String, u32)>, StoreError> {
        let conn = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut stmt = conn.prepare("SELECT namespace, ceiling FROM zone_serials")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (ns, c) = row?;
            let c = u32::try_from(c).map_err(|_| corrupt("zone_serials", format!("{ns}: {c}")))?;
            out.push((ns, c));
        }
        Ok(out)
    }

    fn save(&self, ceilings: &[(String, u32)]) -> Result<(), StoreError> {
        let mut conn = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO zone_serials (namespace, ceiling) VALUES (?1, ?2)
                 ON CONFLICT (namespace) DO UPDATE SET ceiling = excluded.ceiling",
            )?;
            for (ns, c) in ceilings {
                stmt.execute(params![ns, i64::from(*c)])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::NamespaceSettings;
    use std::sync::{Arc, Mutex};

    fn ns(name: &str) -> StoredNamespace {
        StoredNamespace {
            name: NamespaceName::new(name).unwrap(),
            description: "d".into(),
            settings: NamespaceSettings::default(),
            created_at_ms: 1,
            join_token_hash: Some([7; 32]),
        }
    }

    fn put(seq: i64, ns: &str, id: &str, supersedes: Option<i64>) -> Op {
        Op::PutMembrane {
            row: Box::new(StoredMembrane {
                seq,
                namespace: NamespaceName::new(ns).unwrap(),
                id: MembraneId::new(id).unwrap(),
                registration: Default::default(),
                secret_hash: [seq as u8; 32],
                registered_at_ms: 2,
            }),
            supersedes,
        }
    }

    fn del(seq: i64, ns: &str, id: &str, supersedes: i64) -> Op {
        Op::DeleteMembrane {
            seq,
            namespace: NamespaceName::new(ns).unwrap(),
            id: MembraneId::new(id).unwrap(),
            supersedes,
        }
    }

    fn submit_wait(w: &Writer, ops: Vec<Op>) -> Result<(), String> {
        let (tx, rx) = mpsc::channel();
        w.submit(Submission {
            ops,
            events: vec![],
            done: Box::new(move |r| {
                let _ = tx.send(r.map(|_| ()).map_err(|e| e.to_string()));
            }),
        })
        .unwrap();
        rx.recv().unwrap()
    }

    fn rows(path: &Path) -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row("SELECT count(*) FROM membranes", [], |r| r.get(0))
            .unwrap()
    }

    /// Garbage is collected while the writer is idle: wait for it.
    fn wait_rows(path: &Path, want: i64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while rows(path) != want {
            assert!(std::time::Instant::now() < deadline, "rows: {}", rows(path));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn newest_row_wins_tombstones_remove_and_garbage_is_collected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        {
            let (loaded, w, t) = open(&path).unwrap();
            assert!(loaded.namespaces.is_empty());
            assert_eq!(loaded.next_seq, 1);
            submit_wait(
                &w,
                vec![Op::PutNamespace(ns("a")), Op::PutNamespace(ns("b"))],
            )
            .unwrap();
            submit_wait(
                &w,
                vec![
                    put(1, "a", "x", None),
                    put(2, "a", "y", None),
                    put(3, "b", "z", None),
                ],
            )
            .unwrap();
            // x updated, y removed, namespace b deleted.
            submit_wait(&w, vec![put(4, "a", "x", Some(1)), del(5, "a", "y", 2)]).unwrap();
            submit_wait(
                &w,
                vec![Op::DeleteNamespace(NamespaceName::new("b").unwrap())],
            )
            .unwrap();
            drop(w);
            t.join();
        }
        let (loaded, w, t) = open(&path).unwrap();
        assert_eq!(loaded.namespaces, vec![ns("a")]);
        let live: Vec<_> = loaded
            .membranes
            .iter()
            .map(|m| (m.id.as_str(), m.seq))
            .collect();
        assert_eq!(live, vec![("x", 4)]);
        assert_eq!(loaded.membranes[0].secret_hash, [4; 32]);
        // Past every row still on disk (collected rows may already be gone, so 5 or 6).
        assert!(loaded.next_seq > 4, "{}", loaded.next_seq);
        wait_rows(&path, 1);
        drop(w);
        t.join();
    }

    /// The database moved away without its write-ahead log: the next start refuses
    /// rather than let SQLite apply that log to a fresh file.
    #[test]
    fn a_log_left_without_its_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        {
            let (_, w, t) = open(&path).unwrap();
            submit_wait(&w, vec![Op::PutNamespace(ns("a"))]).unwrap();
            // Like a crash: the log is not checkpointed into the file.
            std::mem::forget(w);
            std::mem::forget(t);
        }
        let wal = dir.path().join("r.db-wal");
        assert!(wal.exists());
        std::fs::rename(&path, dir.path().join("moved.db")).unwrap();
        let err = open(&path).err().expect("refused").to_string();
        assert!(
            err.contains("r.db-wal") && err.contains("write-ahead log"),
            "{err}"
        );
        assert!(!path.exists(), "nothing created");
        // Moved away together: a fresh, empty registry.
        std::fs::rename(&wal, dir.path().join("moved.db-wal")).unwrap();
        let (loaded, w, t) = open(&path).unwrap();
        assert!(loaded.namespaces.is_empty());
        drop(w);
        t.join();
    }

    /// A garbage collection fails (its rows forgotten), writes go on: no later collection
    /// may delete a tombstone and leave an older row of its membrane the newest on disk
    /// (a deregistered membrane back at the next start).
    #[test]
    fn a_failed_collection_never_brings_a_removed_membrane_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        {
            let (_, w, t) = open(&path).unwrap();
            submit_wait(&w, vec![Op::PutNamespace(ns("a"))]).unwrap();
            submit_wait(&w, vec![put(1, "a", "x", None)]).unwrap();
            // Deleting row 1 fails (an I/O error, say); writes still commit.
            let other = Connection::open(&path).unwrap();
            other
                .execute_batch(
                    "CREATE TRIGGER keep1 BEFORE DELETE ON membranes WHEN OLD.seq = 1
                     BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
                )
                .unwrap();
            submit_wait(&w, vec![put(2, "a", "x", Some(1))]).unwrap();
            // The idle writer tries (and fails) to collect row 1 before the next write.
            std::thread::sleep(std::time::Duration::from_millis(200));
            submit_wait(&w, vec![del(3, "a", "x", 2)]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(w);
            t.join();
            other.execute_batch("DROP TRIGGER keep1").unwrap();
        }
        let (loaded, w, t) = open(&path).unwrap();
        assert!(loaded.membranes.is_empty(), "{:?}", loaded.membranes);
        // The next start collects everything.
        wait_rows(&path, 0);
        drop(w);
        t.join();
    }

    #[test]
    fn crash_before_collection_still_loads_the_newest_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        // Write rows directly as a crash would leave them: nothing collected.
        {
            let (_, w, t) = open(&path).unwrap();
            drop(w);
            t.join();
            let conn = connect(&path).unwrap();
            conn.execute_batch(
                "INSERT INTO namespaces VALUES ('a', '', '{}', 0, NULL);
                 INSERT INTO membranes VALUES (1, 'a', 'x', '{\"services\":[]}', zeroblob(32), 0);
                 INSERT INTO membranes VALUES (2, 'a', 'x', NULL, NULL, 0);
                 INSERT INTO membranes VALUES (3, 'a', 'y', '{\"services\":[]}', zeroblob(32), 0);
                 INSERT INTO membranes VALUES (4, 'a', 'y', '{\"services\":[],\"ttl_seconds\":9}', zeroblob(32), 0);
                 INSERT INTO membranes VALUES (5, 'gone', 'q', '{\"services\":[]}', zeroblob(32), 0);",
            )
            .unwrap();
        }
        let (loaded, w, t) = open(&path).unwrap();
        let live: Vec<_> = loaded
            .membranes
            .iter()
            .map(|m| (m.id.as_str(), m.seq))
            .collect();
        assert_eq!(live, vec![("y", 4)]);
        assert_eq!(loaded.membranes[0].registration.ttl_seconds, Some(9));
        // The row of the missing namespace is reported and kept, never collected.
        assert_eq!(loaded.orphaned, [("gone".to_string(), 1)].into());
        wait_rows(&path, 2);
        drop(w);
        t.join();
    }

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn database_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let (_, w, t) = open(&path).unwrap();
        submit_wait(&w, vec![Op::PutNamespace(ns("a"))]).unwrap();
        for p in companions(&path) {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
        drop(w);
        t.join();
        // Files left readable by an older version are tightened at start.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (loaded, w, t) = open(&path).unwrap();
        assert_eq!(loaded.namespaces.len(), 1);
        assert_eq!(mode(&path), 0o600);
        drop(w);
        t.join();
    }

    #[test]
    fn empty_or_corrupt_database_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        std::fs::write(&path, b"").unwrap();
        let err = open(&path).err().expect("empty file accepted").to_string();
        assert!(err.contains("empty (0 bytes)"), "{err}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);

        std::fs::remove_file(&path).unwrap();
        {
            let (_, w, t) = open(&path).unwrap();
            submit_wait(&w, vec![Op::PutNamespace(ns("a"))]).unwrap();
            drop(w);
            t.join();
        }
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[..16].copy_from_slice(b"garbage garbage!");
        std::fs::write(&path, &bytes).unwrap();
        let err = open(&path)
            .err()
            .expect("corrupt file accepted")
            .to_string();
        assert!(err.contains("unusable"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "the file was changed");
    }

    #[test]
    fn failed_batch_reports_error() {
        let dir = tempfile::tempdir().unwrap();
        let (_, w, _t) = open(&dir.path().join("r.db")).unwrap();
        submit_wait(&w, vec![Op::PutNamespace(ns("a")), put(1, "a", "x", None)]).unwrap();
        // A reused sequence number violates the primary key.
        let err = submit_wait(&w, vec![put(1, "a", "y", None)]).unwrap_err();
        assert!(err.contains("UNIQUE"), "{err}");
        // Fail-stop: later writes fail too (the registry has rolled them back in memory);
        // submissions without ops (event ordering only) still complete.
        let err = submit_wait(&w, vec![put(2, "a", "y", None)]).unwrap_err();
        assert!(err.contains("stopped"), "{err}");
        submit_wait(&w, vec![]).unwrap();
        // Events without ops (health changes) are still numbered, in order.
        let first = submit_events(&w, "a", 2);
        let next = submit_events(&w, "a", 1);
        assert_eq!((first[1], next[0]), (first[0] + 1, first[0] + 2));
    }

    /// `n` events of `ns`.
    fn events_of(ns: &str, n: usize) -> Vec<(NamespaceName, Event)> {
        let ns = NamespaceName::new(ns).unwrap();
        (0..n)
            .map(|i| {
                let ev = Event::Deregistered {
                    namespace: ns.clone(),
                    id: MembraneId::new(&format!("m{i}")).unwrap(),
                    reason: "deregistered".into(),
                };
                (ns.clone(), ev)
            })
            .collect()
    }

    /// Submits `n` events of `ns` without ops; returns their numbers.
    fn submit_events(w: &Writer, ns: &str, n: usize) -> Vec<u64> {
        let (tx, rx) = mpsc::channel();
        w.submit(Submission {
            ops: vec![],
            events: events_of(ns, n),
            done: Box::new(move |r| {
                let seqs = r.unwrap().iter().map(|(_, (s, _))| *s).collect();
                let _ = tx.send(seqs);
            }),
        })
        .unwrap();
        rx.recv().unwrap()
    }

    #[test]
    fn the_event_history_is_bounded_and_keeps_each_namespace_last_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let (loaded, w, t) = open(&path).unwrap();
        let first = loaded.events.start;
        let gone = NamespaceName::new("gone").unwrap();
        submit_wait(
            &w,
            vec![
                Op::PutNamespace(ns("a")),
                Op::PutNamespace(ns("b")),
                Op::PutNamespace(ns("gone")),
            ],
        )
        .unwrap();
        let quiet = submit_events(&w, "b", 1)[0];
        assert_eq!(quiet, first + 1, "numbered after the segment's start");
        // `gone` is deleted after its last event: that event is still what its old
        // subscribers must be behind of, should it be created again.
        let deleted = submit_events(&w, "gone", 1)[0];
        submit_wait(&w, vec![Op::DeleteNamespace(gone)]).unwrap();
        let count = |path: &Path| -> i64 {
            Connection::open(path)
                .unwrap()
                .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
                .unwrap()
        };
        // One burst past the hard bound: trimmed within its own commit (`done` runs right
        // after it, on the writer thread, before any trimming while idle).
        let (tx, rx) = mpsc::channel();
        let p = path.clone();
        w.submit(Submission {
            ops: vec![],
            events: events_of("a", RING + TRIM_HARD + 100),
            done: Box::new(move |r| {
                assert!(r.is_ok());
                let _ = tx.send(count(&p));
            }),
        })
        .unwrap();
        assert_eq!(rx.recv().unwrap() as usize, RING);
        // Then smaller ones: trimmed once the writer is idle.
        let mut last = 0;
        for _ in 0..2 {
            let seqs = submit_events(&w, "a", 1000);
            assert!(seqs.windows(2).all(|p| p[1] == p[0] + 1));
            last = *seqs.last().unwrap();
        }
        let count = || count(&path);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while count() as usize > RING + TRIM_SLACK {
            assert!(std::time::Instant::now() < deadline, "{}", count());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop(w);
        t.join();

        let (loaded, w, t) = open(&path).unwrap();
        let log = &loaded.events;
        assert_eq!(log.recent.len(), RING);
        assert_eq!(log.recent.last().unwrap().seq, last);
        assert!(log.recent.iter().all(|e| e.namespace == "a"));
        let by_ns: HashMap<_, _> = log.namespace_last.iter().cloned().collect();
        assert_eq!(by_ns["b"], quiet, "b's only event is no longer kept");
        assert_eq!(by_ns["gone"], deleted);
        assert_eq!(by_ns["a"], last);
        // The previous process's segment ends at its last event; this one starts after.
        assert_eq!(log.segments, [(first, last)]);
        assert!(log.start > last);
        drop(w);
        t.join();
    }

    #[test]
    fn callbacks_run_in_submission_order() {
        let dir = tempfile::tempdir().unwrap();
        let (_, w, t) = open(&dir.path().join("r.db")).unwrap();
        submit_wait(&w, vec![Op::PutNamespace(ns("a"))]).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        for i in 0..200 {
            let order = order.clone();
            w.submit(Submission {
                ops: vec![put(i + 1, "a", &format!("m{i}"), None)],
                events: vec![],
                done: Box::new(move |r| {
                    assert!(r.is_ok());
                    order.lock().unwrap().push(i);
                }),
            })
            .unwrap();
        }
        drop(w);
        t.join();
        assert_eq!(*order.lock().unwrap(), (0..200).collect::<Vec<_>>());
    }
}
