//! The embedded default store: SQLite (bundled) in WAL mode with `synchronous=FULL`, written
//! by one thread that commits everything queued since its last commit in one transaction.
//!
//! With 16 clients registering at once, each commit carries about 16 registrations, so one
//! fsync serves all of them: durability without a throughput cap of one fsync per request.

use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;

use rusqlite::{Connection, OptionalExtension, params};
use shared::{MembraneId, NamespaceName};

use super::{Loaded, Op, StoreError, StoredMembrane, StoredNamespace};

/// Most submissions folded into one transaction.
const MAX_BATCH: usize = 4096;

/// Called once the submission's batch is committed (or failed), on the writer thread, in
/// submission order.
pub type Done = Box<dyn FnOnce(Result<(), &StoreError>) + Send>;

/// Ops to commit together, and what to do after.
pub struct Submission {
    /// The changes.
    pub ops: Vec<Op>,
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
CREATE TABLE IF NOT EXISTS membranes (
    namespace TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
    id TEXT NOT NULL,
    registration TEXT NOT NULL,
    secret_hash BLOB NOT NULL,
    registered_at_ms INTEGER NOT NULL,
    PRIMARY KEY (namespace, id)
) STRICT, WITHOUT ROWID;
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '1');
";

/// Opens (creating if needed) the database at `path`, reads everything, and starts the
/// writer thread.
pub fn open(path: &Path) -> Result<(Loaded, Writer, WriterThread), StoreError> {
    let conn = connect(path)?;
    let loaded = load(&conn)?;
    let (tx, rx) = mpsc::channel::<Submission>();
    let handle = std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || writer_loop(conn, rx))
        .map_err(|e| StoreError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
    Ok((loaded, Writer { tx }, WriterThread(handle)))
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

fn load(conn: &Connection) -> Result<Loaded, StoreError> {
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
    let mut stmt = conn.prepare(
        "SELECT namespace, id, registration, secret_hash, registered_at_ms FROM membranes",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let ns: String = row.get(0)?;
        let id: String = row.get(1)?;
        let reg: String = row.get(2)?;
        out.membranes.push(StoredMembrane {
            namespace: NamespaceName::new(&ns).map_err(|e| corrupt("membranes", e))?,
            id: MembraneId::new(&id).map_err(|e| corrupt("membranes", e))?,
            registration: serde_json::from_str(&reg).map_err(|e| corrupt("membranes", e))?,
            secret_hash: hash32("membranes", row.get(3)?)?,
            registered_at_ms: row.get(4)?,
        });
    }
    Ok(out)
}

fn apply(tx: &rusqlite::Transaction<'_>, op: &Op) -> Result<(), rusqlite::Error> {
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
            tx.prepare_cached("DELETE FROM membranes WHERE namespace = ?1")?
                .execute([name.as_str()])?;
            tx.prepare_cached("DELETE FROM namespaces WHERE name = ?1")?
                .execute([name.as_str()])?;
        }
        Op::PutMembrane(m) => {
            let reg = serde_json::to_string(&m.registration).unwrap_or_default();
            tx.prepare_cached(
                "INSERT INTO membranes (namespace, id, registration, secret_hash, registered_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (namespace, id) DO UPDATE SET registration = excluded.registration,
                   secret_hash = excluded.secret_hash",
            )?
            .execute(params![
                m.namespace.as_str(),
                m.id.as_str(),
                reg,
                &m.secret_hash[..],
                m.registered_at_ms,
            ])?;
        }
        Op::DeleteMembrane(ns, id) => {
            tx.prepare_cached("DELETE FROM membranes WHERE namespace = ?1 AND id = ?2")?
                .execute([ns.as_str(), id.as_str()])?;
        }
    }
    Ok(())
}

fn commit(conn: &mut Connection, batch: &[Submission]) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for sub in batch {
        for op in &sub.ops {
            apply(&tx, op)?;
        }
    }
    tx.commit()?;
    Ok(())
}

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Submission>) {
    let mut batch = Vec::with_capacity(64);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(sub) => batch.push(sub),
                Err(_) => break,
            }
        }
        let has_ops = batch.iter().any(|s| !s.ops.is_empty());
        let result = if has_ops {
            commit(&mut conn, &batch)
        } else {
            Ok(())
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, batch = batch.len(), "store commit failed");
        }
        for sub in batch.drain(..) {
            (sub.done)(result.as_ref().map(|_| ()));
        }
    }
    tracing::debug!("store writer stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::{NamespaceSettings, Registration};
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

    fn mem(ns: &str, id: &str) -> Op {
        Op::PutMembrane(Box::new(StoredMembrane {
            namespace: NamespaceName::new(ns).unwrap(),
            id: MembraneId::new(id).unwrap(),
            registration: Registration::default(),
            secret_hash: [1; 32],
            registered_at_ms: 2,
        }))
    }

    fn submit_wait(w: &Writer, ops: Vec<Op>) -> Result<(), String> {
        let (tx, rx) = mpsc::channel();
        w.submit(Submission {
            ops,
            done: Box::new(move |r| {
                let _ = tx.send(r.map_err(|e| e.to_string()));
            }),
        })
        .unwrap();
        rx.recv().unwrap()
    }

    #[test]
    fn round_trip_and_cascade() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        {
            let (loaded, w, t) = open(&path).unwrap();
            assert!(loaded.namespaces.is_empty());
            submit_wait(
                &w,
                vec![Op::PutNamespace(ns("a")), Op::PutNamespace(ns("b"))],
            )
            .unwrap();
            submit_wait(&w, vec![mem("a", "x"), mem("a", "y"), mem("b", "z")]).unwrap();
            submit_wait(
                &w,
                vec![Op::DeleteMembrane(
                    NamespaceName::new("a").unwrap(),
                    MembraneId::new("y").unwrap(),
                )],
            )
            .unwrap();
            submit_wait(
                &w,
                vec![Op::DeleteNamespace(NamespaceName::new("b").unwrap())],
            )
            .unwrap();
            drop(w);
            t.join();
        }
        let (loaded, _w, _t) = open(&path).unwrap();
        assert_eq!(loaded.namespaces, vec![ns("a")]);
        let ids: Vec<_> = loaded.membranes.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, vec!["x"]);
        assert_eq!(loaded.membranes[0].secret_hash, [1; 32]);
    }

    #[test]
    fn failed_batch_reports_error_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (_, w, _t) = open(&dir.path().join("r.db")).unwrap();
        // Foreign key: membrane in a namespace that does not exist.
        let err = submit_wait(&w, vec![mem("nope", "x")]).unwrap_err();
        assert!(err.contains("FOREIGN KEY"), "{err}");
        submit_wait(&w, vec![Op::PutNamespace(ns("a"))]).unwrap();
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
                ops: vec![mem("a", &format!("m{i}"))],
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
