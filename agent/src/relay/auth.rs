//! The namespace relay key of this agent ([`shared::relay_auth`]): learned from the
//! registration answer, kept in `<state-dir>/relay-key` (0600) so that a restarted agent
//! and `agent send` without a daemon have it, and used to sign outgoing TCP frames and to
//! check incoming ones.

use std::path::Path;
use std::sync::RwLock;

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
    /// The namespace's key: frames are signed, and TCP frames must carry a valid tag.
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

/// The signing key of `from` in `ns` under `state`, if messages are signed.
pub fn signing_key(state: KeyState, ns: &str, from: &str) -> Option<[u8; 32]> {
    match state {
        KeyState::Key(k) => Some(relay_auth::sender_key(&k, ns, from)),
        _ => None,
    }
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
        assert_eq!(
            signing_key(current(), "ns", "a"),
            Some(relay_auth::sender_key(&k, "ns", "a"))
        );
        learned(Some(dir.path()), None);
        assert_eq!(current(), KeyState::Open);
        assert_eq!(stored(dir.path()), KeyState::Unknown);
        assert_eq!(signing_key(current(), "ns", "a"), None);
    }
}
