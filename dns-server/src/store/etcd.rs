//! The shared store: etcd (v3 API), for several replicas serving one registry.
//!
//! Layout under the prefix `P` (default `/membrane/`):
//!
//! - `P/ns/<ns>`: namespace JSON (description, settings, creation time, join token hash);
//! - `P/m/<ns>/<id>`: registration JSON (registration, secret hash, first registration time);
//!   its `mod_revision` plays the role of the embedded store's row sequence number;
//! - `P/live/<ns>/<id>`: empty value attached to that membrane's own lease (TTL = its
//!   instance TTL). Heartbeats keep the lease alive; when it expires etcd deletes the key and
//!   every replica's watch sees the membrane go stale at the same revision.
//!
//! This module only encodes, decodes and talks to etcd; the registry decides what to write.

use std::time::Duration;

use etcd_client::{
    Client, Compare, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp,
    TxnResponse, WatchOptions, WatchStream,
};
use serde::{Deserialize, Serialize};
use shared::{MembraneId, NamespaceName, NamespaceSettings, Registration};

use super::{StoreError, StoredMembrane, StoredNamespace};

mod batch;
#[cfg(test)]
mod member;

pub use batch::{Batcher, CondWrite, Limits, Outcome};

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/membrane/";

/// Deadline of one request to etcd.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Keys read per page when loading everything.
const PAGE: i64 = 1000;

/// A connection to etcd and the key layout.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    prefix: String,
}

#[derive(Serialize, Deserialize)]
struct NsRecord {
    description: String,
    settings: NamespaceSettings,
    created_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    join_token_hash: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct MembraneRecord {
    registration: Registration,
    secret_hash: String,
    registered_at_ms: i64,
}

/// One change read from etcd (a watch event or a loaded key).
#[derive(Debug, Clone)]
pub enum Change {
    /// A namespace was written; the `i64` is its key's `mod_revision`.
    PutNamespace(StoredNamespace, i64),
    /// A namespace key was deleted.
    DeleteNamespace(NamespaceName),
    /// A registration was written (`seq` is the key's `mod_revision`).
    PutMembrane(StoredMembrane),
    /// A registration key was deleted.
    DeleteMembrane(NamespaceName, MembraneId),
    /// A liveness key was written with this lease.
    PutLive(NamespaceName, MembraneId, i64),
    /// A liveness key was deleted (lease expired or revoked, or deregistered).
    DeleteLive(NamespaceName, MembraneId),
}

impl Change {
    fn order(&self) -> u8 {
        match self {
            Change::PutNamespace(..) | Change::DeleteNamespace(_) => 0,
            Change::PutMembrane(_) | Change::DeleteMembrane(..) => 1,
            Change::PutLive(..) | Change::DeleteLive(..) => 2,
        }
    }
}

/// Everything under the prefix at one revision.
#[derive(Debug)]
pub struct Snapshot {
    /// The revision read.
    pub revision: i64,
    /// Namespaces first, then registrations, then liveness keys.
    pub changes: Vec<Change>,
}

fn hex(b: &[u8; 32]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn err(e: etcd_client::Error) -> StoreError {
    StoreError::Etcd(e.to_string())
}

/// Whether a request failed before reaching any member (connection refused), so that
/// sending it again cannot apply it twice.
fn not_sent(e: &etcd_client::Error) -> bool {
    let m = e.to_string();
    m.contains("tcp connect error") || m.contains("ConnectError")
}

/// Most attempts of a request that could not be sent.
const SEND_ATTEMPTS: usize = 6;

/// Why a request failed.
enum Failed {
    /// etcd (or the connection to it) answered with an error.
    Etcd(etcd_client::Error),
    /// No answer within [`REQUEST_TIMEOUT`]: it may or may not have been applied.
    Timeout,
}

impl Failed {
    fn message(self) -> String {
        match self {
            Failed::Etcd(e) => e.to_string(),
            Failed::Timeout => format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()),
        }
    }
}

impl From<Failed> for StoreError {
    fn from(f: Failed) -> StoreError {
        StoreError::Etcd(f.message())
    }
}

/// Whether etcd refused a request before applying any of it: the request is invalid
/// (too many operations, too large, a key written twice) or names a lease that does not
/// exist. Such a request changed nothing, so its parts may be sent again separately.
fn refused(e: &etcd_client::Error) -> bool {
    // gRPC codes: 3 InvalidArgument, 5 NotFound (lease), 8 ResourceExhausted (message
    // over the server's limit).
    matches!(e, etcd_client::Error::GRpcStatus(s) if matches!(i32::from(s.code()), 3 | 5 | 8))
}

/// Runs one etcd request under [`REQUEST_TIMEOUT`]. The client balances requests over the
/// endpoints and keeps picking a dead member now and then: a request refused at connect
/// time was never sent, so it is sent again (another endpoint is likely picked).
async fn attempt<T, F, Fut>(mut f: F) -> Result<T, Failed>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match tokio::time::timeout_at(deadline, f()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if attempt < SEND_ATTEMPTS && not_sent(&e) => {
                tracing::debug!(error = %e, "etcd endpoint refused the connection; resending");
            }
            Ok(Err(e)) => return Err(Failed::Etcd(e)),
            Err(_) => return Err(Failed::Timeout),
        }
    }
}

/// [`attempt`], failures as [`StoreError`].
async fn timed<T, F, Fut>(f: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    Ok(attempt(f).await?)
}

/// The first key after every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Etcd {
    /// Connects to `endpoints` (`HOST:PORT`). Connections are made lazily: this does not
    /// prove etcd is reachable.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Etcd, StoreError> {
        let eps: Vec<String> = endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            // A member cut off from the leader refuses (and cancels watches) instead of
            // serving an old view.
            .with_require_leader(true);
        let client = Client::connect(eps, Some(opts)).await.map_err(err)?;
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(Etcd { client, prefix })
    }

    /// The key prefix (ends with `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `P/ns/<ns>`.
    pub fn ns_key(&self, ns: &NamespaceName) -> String {
        format!("{}ns/{ns}", self.prefix)
    }

    /// `P/m/<ns>/<id>`.
    pub fn membrane_key(&self, ns: &NamespaceName, id: &MembraneId) -> String {
        format!("{}m/{ns}/{id}", self.prefix)
    }

    /// `P/live/<ns>/<id>`.
    pub fn live_key(&self, ns: &NamespaceName, id: &MembraneId) -> String {
        format!("{}live/{ns}/{id}", self.prefix)
    }

    /// `P/m/<ns>/`.
    pub fn membranes_prefix(&self, ns: &NamespaceName) -> String {
        format!("{}m/{ns}/", self.prefix)
    }

    /// `P/live/<ns>/`.
    pub fn live_prefix(&self, ns: &NamespaceName) -> String {
        format!("{}live/{ns}/", self.prefix)
    }

    /// The value stored for a namespace.
    pub fn encode_namespace(ns: &StoredNamespace) -> Vec<u8> {
        serde_json::to_vec(&NsRecord {
            description: ns.description.clone(),
            settings: ns.settings,
            created_at_ms: ns.created_at_ms,
            join_token_hash: ns.join_token_hash.as_ref().map(hex),
        })
        .expect("namespace record serializes")
    }

    /// The value stored for a registration (`seq` is not stored: it is the mod revision).
    pub fn encode_membrane(m: &StoredMembrane) -> Vec<u8> {
        serde_json::to_vec(&MembraneRecord {
            registration: (*m.registration).clone(),
            secret_hash: hex(&m.secret_hash),
            registered_at_ms: m.registered_at_ms,
        })
        .expect("membrane record serializes")
    }

    /// Decodes a key (and, for a put, its value). Keys outside the layout and undecodable
    /// values are logged and skipped: a replica keeps serving what it can read.
    fn decode(&self, kv: &KeyValue, put: bool) -> Option<Change> {
        let key = std::str::from_utf8(kv.key()).ok()?;
        let rest = key.strip_prefix(&self.prefix)?;
        let mut parts = rest.splitn(3, '/');
        let kind = parts.next()?;
        let first = parts.next();
        let second = parts.next();
        let decoded = match (kind, first, second) {
            ("ns", Some(n), None) => {
                let name = NamespaceName::new(n).ok()?;
                if !put {
                    return Some(Change::DeleteNamespace(name));
                }
                serde_json::from_slice::<NsRecord>(kv.value())
                    .map_err(|e| e.to_string())
                    .and_then(|r| {
                        let join_token_hash = match r.join_token_hash {
                            Some(h) => Some(unhex(&h).ok_or("bad join_token_hash")?),
                            None => None,
                        };
                        Ok(Change::PutNamespace(
                            StoredNamespace {
                                name,
                                description: r.description,
                                settings: r.settings,
                                created_at_ms: r.created_at_ms,
                                join_token_hash,
                            },
                            kv.mod_revision(),
                        ))
                    })
            }
            ("m", Some(n), Some(i)) => {
                let (ns, id) = (NamespaceName::new(n).ok()?, MembraneId::new(i).ok()?);
                if !put {
                    return Some(Change::DeleteMembrane(ns, id));
                }
                serde_json::from_slice::<MembraneRecord>(kv.value())
                    .map_err(|e| e.to_string())
                    .and_then(|r| {
                        Ok(Change::PutMembrane(StoredMembrane {
                            seq: kv.mod_revision(),
                            namespace: ns,
                            id,
                            registration: std::sync::Arc::new(r.registration),
                            secret_hash: unhex(&r.secret_hash).ok_or("bad secret_hash")?,
                            registered_at_ms: r.registered_at_ms,
                        }))
                    })
            }
            ("live", Some(n), Some(i)) => {
                let (ns, id) = (NamespaceName::new(n).ok()?, MembraneId::new(i).ok()?);
                Ok(if put {
                    Change::PutLive(ns, id, kv.lease())
                } else {
                    Change::DeleteLive(ns, id)
                })
            }
            _ => return None,
        };
        match decoded {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(key, error = %e, "skipping undecodable etcd value");
                None
            }
        }
    }

    /// Reads everything under the prefix at one revision, in pages.
    pub async fn load(&self) -> Result<Snapshot, StoreError> {
        let kv = self.client.kv_client();
        let end = prefix_end(self.prefix.as_bytes());
        let mut from = self.prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut changes = Vec::new();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = timed(|| {
                let (mut kv, from, opts) = (kv.clone(), from.clone(), opts.clone());
                async move { kv.get(from, Some(opts)).await }
            })
            .await?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            for kv in resp.kvs() {
                changes.extend(self.decode(kv, true));
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        changes.sort_by_key(Change::order);
        Ok(Snapshot { revision, changes })
    }

    /// Watches the prefix from `revision` on (progress notifications on).
    pub async fn watch(&self, revision: i64) -> Result<WatchStream, StoreError> {
        let w = self
            .client
            .watch_client()
            .max_decoding_message_size(64 << 20);
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision)
            .with_progress_notify();
        timed(|| {
            let (mut w, key, opts) = (w.clone(), self.prefix.as_bytes().to_vec(), opts.clone());
            async move { w.watch(key, Some(opts)).await }
        })
        .await
    }

    /// Whether history at `revision` was compacted away. A watch resumed at exactly the
    /// compaction revision is not told it was compacted, yet a deletion at that revision
    /// is gone (compaction drops tombstones), so a resuming replica asks explicitly.
    pub async fn compacted(&self, revision: i64) -> Result<bool, StoreError> {
        if revision <= 0 {
            return Ok(false);
        }
        let kv = self.client.kv_client();
        let key = self.prefix.as_bytes().to_vec();
        let r = timed(|| {
            let (mut kv, key) = (kv.clone(), key.clone());
            let opts = GetOptions::new()
                .with_revision(revision)
                .with_keys_only()
                .with_limit(1);
            async move { kv.get(key, Some(opts)).await }
        })
        .await;
        match r {
            Ok(_) => Ok(false),
            Err(StoreError::Etcd(m)) if m.contains("compacted") => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Decodes the events of a watch response, in order, and the highest revision among
    /// them.
    pub fn decode_events(&self, events: &[etcd_client::Event]) -> (Vec<Change>, i64) {
        let mut top = 0;
        let mut out = Vec::with_capacity(events.len());
        for ev in events {
            let Some(kv) = ev.kv() else { continue };
            top = top.max(kv.mod_revision());
            out.extend(self.decode(kv, ev.event_type() == EventType::Put));
        }
        (out, top)
    }

    /// Commits `txn`.
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        Ok(self.try_txn(txn).await?)
    }

    /// Commits `txn`, telling apart a refusal that applied nothing.
    async fn try_txn(&self, txn: Txn) -> Result<TxnResponse, Failed> {
        let kv = self.client.kv_client();
        attempt(|| {
            let (mut kv, txn) = (kv.clone(), txn.clone());
            async move { kv.txn(txn).await }
        })
        .await
    }

    /// Grants a lease of `ttl`; returns its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, StoreError> {
        let l = self.client.lease_client();
        let secs = ttl.as_secs().max(1) as i64;
        Ok(timed(|| {
            let mut l = l.clone();
            async move { l.grant(secs, None).await }
        })
        .await?
        .id())
    }

    /// Renews a lease once (one keep-alive round trip). `Ok(false)`: the lease is gone.
    pub async fn keep_alive(&self, lease: i64) -> Result<bool, StoreError> {
        let l = self.client.lease_client();
        match timed(|| {
            let mut l = l.clone();
            async move { l.keep_alive(lease).await }
        })
        .await
        {
            Ok(_) => Ok(true),
            Err(StoreError::Etcd(m)) if m.contains("lease not found") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Revokes a lease (deleting the keys attached to it); failures are only logged (an
    /// unrevoked lease expires on its own).
    pub async fn revoke(&self, lease: i64) {
        let l = self.client.lease_client();
        if let Err(e) = timed(|| {
            let mut l = l.clone();
            async move { l.revoke(lease).await }
        })
        .await
            && !matches!(&e, StoreError::Etcd(m) if m.contains("lease not found"))
        {
            tracing::debug!(lease, error = %e, "lease revoke failed; it will expire");
        }
    }

    /// A put of `value` at `key`, with a lease when not 0.
    pub fn put(key: String, value: Vec<u8>, lease: i64) -> TxnOp {
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        TxnOp::put(key, value, opts)
    }

    /// `key`'s mod revision is `rev` (`rev` 0: the key does not exist).
    pub fn unchanged(key: String, rev: i64) -> Compare {
        if rev == 0 {
            Compare::version(key, etcd_client::CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key, etcd_client::CompareOp::Equal, rev)
        }
    }
}

/// The revision a transaction committed at.
pub fn revision(resp: &TxnResponse) -> i64 {
    resp.header().map(|h| h.revision()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_prefix_end() {
        let h = [0xabu8; 32];
        assert_eq!(unhex(&hex(&h)), Some(h));
        assert_eq!(unhex("zz"), None);
        assert_eq!(prefix_end(b"/membrane/"), b"/membrane0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }
}
