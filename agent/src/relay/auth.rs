//! The relay keys of this agent ([`shared::relay_auth`]):
//!
//! - the namespace relay key, learned from the registration answer and kept in
//!   `<state-dir>/relay-key` (0600): its presence says that the namespace authenticates
//!   senders (the TCP listener then checks every message, and this agent signs its own);
//! - the agent's own Ed25519 key pair ([`Identity`]), made at the first `agent run` and
//!   kept in `<state-dir>/relay-identity` (PKCS#8, 0600): its public key goes into every
//!   registration, and outgoing TCP messages are signed with it. Removing the file rotates
//!   it: the next `agent run` makes a new pair and its registration replaces the public key
//!   the registry holds.

use std::path::Path;
use std::sync::{Arc, RwLock};

use ring::signature::{Ed25519KeyPair, KeyPair};

use shared::relay_auth;

/// File of the key in the state directory.
pub const KEY_FILE: &str = "relay-key";

/// What the agent knows of its namespace's relay key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Not registered yet and no stored key: TCP messages are refused as `unavailable`
    /// (their senders retry).
    Unknown,
    /// The registry runs without an admin token and hands out no key: nothing is signed
    /// or checked.
    Open,
    /// The namespace's key: the namespace authenticates senders, so this agent signs its
    /// TCP frames with its [`Identity`] and its TCP listener checks every sender's.
    Key([u8; 32]),
}

static STATE: RwLock<KeyState> = RwLock::new(KeyState::Unknown);

/// The current state.
pub fn current() -> KeyState {
    *STATE.read().expect("relay key lock")
}

/// Reads the stored key of `state_dir` (none stored: `Unknown`).
pub fn stored(state_dir: &Path) -> KeyState {
    std::fs::read_to_string(state_dir.join(KEY_FILE))
        .ok()
        .and_then(|s| relay_auth::from_hex(&s))
        .map_or(KeyState::Unknown, KeyState::Key)
}

/// At the start of `agent run`: the stored key, if any.
pub fn load(state_dir: &Path) {
    *STATE.write().expect("relay key lock") = stored(state_dir);
}

/// What a registration answer said (`relay_key`): kept, and stored when it changed.
pub fn learned(state_dir: Option<&Path>, key: Option<&str>) {
    let new = match key.and_then(relay_auth::from_hex) {
        Some(k) => KeyState::Key(k),
        None => KeyState::Open,
    };
    let old = std::mem::replace(&mut *STATE.write().expect("relay key lock"), new);
    if old == new {
        return;
    }
    if let Some(dir) = state_dir {
        let r = match new {
            KeyState::Key(k) => crate::util::write_atomic(
                &dir.join(KEY_FILE),
                relay_auth::to_hex(&k).as_bytes(),
                0o600,
            ),
            _ => match std::fs::remove_file(dir.join(KEY_FILE)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot store the relay key");
        }
    }
}

/// File of the agent's Ed25519 key pair in the state directory.
pub const IDENTITY_FILE: &str = "relay-identity";

/// The agent's Ed25519 key pair.
pub struct Identity {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.public_hex())
    }
}

static IDENTITY: RwLock<Option<Arc<Identity>>> = RwLock::new(None);

impl Identity {
    /// The key pair stored in `state_dir`, if any (and readable).
    pub fn stored(state_dir: &Path) -> Option<Identity> {
        let der = std::fs::read(state_dir.join(IDENTITY_FILE)).ok()?;
        Ed25519KeyPair::from_pkcs8(&der)
            .ok()
            .map(|pair| Identity { pair })
    }

    /// The stored key pair, or a new one written (0600) to `state_dir`.
    pub fn load_or_create(state_dir: &Path) -> std::io::Result<Identity> {
        if let Some(id) = Identity::stored(state_dir) {
            return Ok(id);
        }
        let rng = ring::rand::SystemRandom::new();
        let der = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| std::io::Error::other("cannot generate an Ed25519 key"))?;
        crate::util::write_atomic(&state_dir.join(IDENTITY_FILE), der.as_ref(), 0o600)?;
        let pair = Ed25519KeyPair::from_pkcs8(der.as_ref())
            .map_err(|_| std::io::Error::other("generated key does not parse"))?;
        Ok(Identity { pair })
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        self.pair
            .public_key()
            .as_ref()
            .try_into()
            .expect("32-byte Ed25519 public key")
    }

    /// The public key in 64 hex digits (the registration's `relay_public_key`).
    pub fn public_hex(&self) -> String {
        relay_auth::to_hex(&self.public())
    }

    /// The signature of message `bytes` (file format).
    pub fn sign(&self, bytes: &[u8]) -> [u8; 64] {
        self.pair
            .sign(&relay_auth::ed25519_input(bytes))
            .as_ref()
            .try_into()
            .expect("64-byte Ed25519 signature")
    }
}

/// Whether `sig` is `public`'s signature of message `bytes`.
pub fn verify(public: &[u8; 32], bytes: &[u8], sig: &[u8; 64]) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public)
        .verify(&relay_auth::ed25519_input(bytes), sig)
        .is_ok()
}

/// Makes this process use `id` (`agent run`: made if absent; `agent send`: stored one).
pub fn set_identity(id: Option<Identity>) {
    *IDENTITY.write().expect("identity lock") = id.map(Arc::new);
}

/// The agent's key pair, if loaded.
pub fn identity() -> Option<Arc<Identity>> {
    IDENTITY.read().expect("identity lock").clone()
}

/// What outgoing TCP messages are signed with: the agent's key pair, when the namespace
/// authenticates senders.
pub fn signer() -> Option<Arc<Identity>> {
    matches!(current(), KeyState::Key(_))
        .then(identity)
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_kept_private_and_dropped_when_the_registry_gives_none() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(stored(dir.path()), KeyState::Unknown);
        let k = [5u8; 32];
        learned(Some(dir.path()), Some(&relay_auth::to_hex(&k)));
        assert_eq!(current(), KeyState::Key(k));
        assert_eq!(stored(dir.path()), KeyState::Key(k));
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        learned(Some(dir.path()), None);
        assert_eq!(current(), KeyState::Open);
        assert_eq!(stored(dir.path()), KeyState::Unknown);
    }

    #[test]
    fn the_identity_is_made_once_kept_private_and_signs_what_it_says() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        assert!(Identity::stored(dir.path()).is_none());
        let a = Identity::load_or_create(dir.path()).unwrap();
        let again = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.public(), again.public(), "kept across restarts");
        let mode = std::fs::metadata(dir.path().join(IDENTITY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let sig = a.sign(b"message");
        assert!(verify(&a.public(), b"message", &sig));
        assert!(!verify(&a.public(), b"messagf", &sig), "other bytes");
        let other = tempfile::tempdir().unwrap();
        let b = Identity::load_or_create(other.path()).unwrap();
        assert_ne!(a.public(), b.public());
        assert!(!verify(&b.public(), b"message", &sig), "another key");
        assert_eq!(relay_auth::from_hex(&a.public_hex()), Some(a.public()));
    }
}
