//! Per-sender authentication on the TCP relay: the public key of a message's claimed
//! sender (`from`) comes from the agent's discovery cache, else from the registry, and the
//! message's Ed25519 signature must verify under it.
//!
//! On a miss, or a signature that does not verify under the cached key (the sender may
//! have rotated its key), the registry is asked once: its answer is reused for
//! [`REFRESH_EVERY`] per sender, at most [`MAX_FETCHES`] lookups run at once, each within
//! [`FETCH_TIMEOUT`], and at most [`MAX_REMEMBERED`] senders are remembered, so a peer
//! sending under many made-up ids cannot grow memory or flood the registry. A registry
//! that cannot be reached makes the message `unavailable` (the sender retries), not
//! refused for good.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use shared::envelope::Refusal;
use shared::name::MembraneId;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// How long a registry answer about one sender is reused.
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);
/// Registry lookups at once; more messages wait for one.
pub const MAX_FETCHES: usize = 4;
/// Time allowed for one lookup (and for waiting for a turn).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Senders whose registry answer is remembered.
pub const MAX_REMEMBERED: usize = 1024;

/// A registry answer for one sender: its public key, none registered, or no answer.
pub type Fetched = Result<Option<[u8; 32]>, String>;

/// Where public keys come from.
pub trait Directory: Send + Sync + 'static {
    /// The key the discovery cache holds for `id`.
    fn cached(&self, id: &MembraneId) -> Option<[u8; 32]>;
    /// The key the registry holds now.
    fn fetch<'a>(
        &'a self,
        id: &'a MembraneId,
    ) -> Pin<Box<dyn Future<Output = Fetched> + Send + 'a>>;
}

/// Registry answers by sender: when asked, and the key.
type Remembered = HashMap<MembraneId, (Instant, Option<[u8; 32]>)>;

/// Checks senders' signatures.
pub struct SenderKeys {
    dir: Box<dyn Directory>,
    fetched: Mutex<Remembered>,
    fetches: Semaphore,
}

impl SenderKeys {
    /// A checker over `dir`.
    pub fn new(dir: impl Directory) -> SenderKeys {
        SenderKeys {
            dir: Box::new(dir),
            fetched: Mutex::new(HashMap::new()),
            fetches: Semaphore::new(MAX_FETCHES),
        }
    }

    /// Checks that `sig` is `from`'s signature of message `bytes` (id `id`); the refusal
    /// to send back otherwise.
    pub async fn check(
        &self,
        id: shared::envelope::MessageId,
        from: &MembraneId,
        bytes: &[u8],
        sig: &[u8; 64],
    ) -> Result<(), Refusal> {
        let ok = |k: &[u8; 32]| super::auth::verify(k, bytes, sig);
        if self.dir.cached(from).is_some_and(|k| ok(&k)) {
            return Ok(());
        }
        let refuse = |code: &str, message: String| Refusal {
            id: Some(id),
            code: code.into(),
            message,
        };
        match self.registered(from).await {
            Ok(Some(k)) if ok(&k) => Ok(()),
            Ok(k) => {
                let why = if k.is_some() {
                    "its signature does not verify under the key the registry holds for it"
                } else {
                    "the registry holds no relay public key for it"
                };
                Err(refuse(
                    "unauthenticated",
                    format!("message claiming to be from {from}: {why}"),
                ))
            }
            Err(e) => Err(refuse(
                "unavailable",
                format!("cannot look up the relay key of {from}: {e}"),
            )),
        }
    }

    /// The registry's key for `from`: remembered for [`REFRESH_EVERY`], else asked.
    async fn registered(&self, from: &MembraneId) -> Fetched {
        let fresh = |m: &Remembered| {
            m.get(from)
                .filter(|(t, _)| t.elapsed() < REFRESH_EVERY)
                .map(|(_, k)| *k)
        };
        if let Some(k) = fresh(&self.fetched.lock().unwrap()) {
            return Ok(k);
        }
        let _turn = tokio::time::timeout(FETCH_TIMEOUT, self.fetches.acquire())
            .await
            .map_err(|_| "too many lookups at once".to_string())?
            .expect("semaphore open");
        // Another message may have asked while this one waited.
        if let Some(k) = fresh(&self.fetched.lock().unwrap()) {
            return Ok(k);
        }
        let k = tokio::time::timeout(FETCH_TIMEOUT, self.dir.fetch(from))
            .await
            .map_err(|_| "the registry did not answer in time".to_string())??;
        let mut m = self.fetched.lock().unwrap();
        if m.len() >= MAX_REMEMBERED {
            m.retain(|_, (t, _)| t.elapsed() < REFRESH_EVERY);
            if m.len() >= MAX_REMEMBERED {
                m.clear();
            }
        }
        m.insert(from.clone(), (Instant::now(), k));
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::auth::Identity;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Fake {
        cache: Mutex<HashMap<String, [u8; 32]>>,
        registry: Mutex<HashMap<String, [u8; 32]>>,
        down: std::sync::atomic::AtomicBool,
        asked: AtomicUsize,
    }

    impl Directory for Arc<Fake> {
        fn cached(&self, id: &MembraneId) -> Option<[u8; 32]> {
            self.cache.lock().unwrap().get(id.as_str()).copied()
        }
        fn fetch<'a>(
            &'a self,
            id: &'a MembraneId,
        ) -> Pin<Box<dyn Future<Output = Fetched> + Send + 'a>> {
            Box::pin(async move {
                self.asked.fetch_add(1, Ordering::SeqCst);
                if self.down.load(Ordering::SeqCst) {
                    return Err("down".into());
                }
                Ok(self.registry.lock().unwrap().get(id.as_str()).copied())
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn forged_rotated_and_unknown_senders() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = Identity::load_or_create(da.path()).unwrap();
        let b = Identity::load_or_create(db.path()).unwrap();
        let fake = Arc::new(Fake::default());
        fake.cache.lock().unwrap().insert("a".into(), a.public());
        fake.registry.lock().unwrap().insert("a".into(), a.public());
        let keys = SenderKeys::new(fake.clone());
        let (ida, idb): (MembraneId, MembraneId) = ("a".parse().unwrap(), "b".parse().unwrap());
        let mid = shared::envelope::MessageId::from_parts(1, 1);
        // From the cache, no lookup.
        assert!(keys.check(mid, &ida, b"m", &a.sign(b"m")).await.is_ok());
        assert_eq!(fake.asked.load(Ordering::SeqCst), 0);
        // b signing as a: refused after one lookup, which is then reused.
        for _ in 0..3 {
            let r = keys.check(mid, &ida, b"m", &b.sign(b"m")).await;
            assert_eq!(r.unwrap_err().code, "unauthenticated");
        }
        assert_eq!(fake.asked.load(Ordering::SeqCst), 1);
        // a rotated its key: the stale cache is corrected by the registry (after the
        // remembered answer ages out).
        let da2 = tempfile::tempdir().unwrap();
        let a2 = Identity::load_or_create(da2.path()).unwrap();
        fake.registry
            .lock()
            .unwrap()
            .insert("a".into(), a2.public());
        tokio::time::advance(REFRESH_EVERY).await;
        assert!(keys.check(mid, &ida, b"m", &a2.sign(b"m")).await.is_ok());
        // A sender with no key registered: refused; the registry down: unavailable.
        let r = keys.check(mid, &idb, b"m", &b.sign(b"m")).await;
        assert_eq!(r.unwrap_err().code, "unauthenticated");
        fake.down.store(true, Ordering::SeqCst);
        let c: MembraneId = "c".parse().unwrap();
        let r = keys.check(mid, &c, b"m", &b.sign(b"m")).await;
        assert_eq!(r.unwrap_err().code, "unavailable");
    }

    #[tokio::test(start_paused = true)]
    async fn made_up_senders_are_remembered_in_bounded_memory() {
        let d = tempfile::tempdir().unwrap();
        let x = Identity::load_or_create(d.path()).unwrap();
        let fake = Arc::new(Fake::default());
        let keys = SenderKeys::new(fake.clone());
        let mid = shared::envelope::MessageId::from_parts(1, 1);
        for n in 0..(MAX_REMEMBERED + 10) {
            let id: MembraneId = format!("m{n}").parse().unwrap();
            let r = keys.check(mid, &id, b"m", &x.sign(b"m")).await;
            assert_eq!(r.unwrap_err().code, "unauthenticated");
        }
        assert!(keys.fetched.lock().unwrap().len() <= MAX_REMEMBERED);
    }
}
