//! The agent's state directory: its layout, and the persisted instance secret (mode 0600)
//! that lets a restarted agent re-register, heartbeat and deregister its membrane.
//!
//! Layout: `secret.json` (instance secret), `cache.json` (namespace cache), `control.sock`
//! (control socket, 0600), `activity.log` (+ `activity.log.1`, JSON lines), `agent.lock`
//! (held with `flock` by the running agent: the kernel releases it when the process dies).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shared::name::{MembraneId, NamespaceName};

use crate::util;

/// Instance secret file.
pub const SECRET_FILE: &str = "secret.json";
/// Control socket.
pub const CONTROL_SOCKET: &str = "control.sock";
/// Activity log (JSON lines).
pub const ACTIVITY_LOG: &str = "activity.log";

/// Lock file of the running agent.
pub const LOCK_FILE: &str = "agent.lock";

/// How long a starting agent waits for the lock: an agent killed with SIGKILL holds it
/// until the kernel has closed its files, a little after `kill -9` returned.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Takes the state directory's lock (`flock` on `agent.lock`), waiting up to
/// [`LOCK_WAIT`] for a dying agent to release it. Held as long as the value lives.
pub async fn lock(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(LOCK_FILE);
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    loop {
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) if tokio::time::Instant::now() < deadline => {
                file = f;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(format!(
                    "another agent is already running with state directory {} (it holds {})",
                    dir.display(),
                    path.display()
                ));
            }
            Err((_, e)) => return Err(format!("cannot lock {}: {e}", path.display())),
        }
    }
}

/// The control socket path in `dir`.
pub fn control_socket(dir: &Path) -> PathBuf {
    dir.join(CONTROL_SOCKET)
}

/// Creates the state directory (mode 0700 when created here).
pub fn prepare_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates the agent's own state directory like [`prepare_dir`]; one that exists must
/// belong to the effective user (another user could read its secret or swap its files) or
/// to root (a volume a container runtime made, such as a Kubernetes `emptyDir`), and one of
/// ours loses any group and other permissions. Not for the folders other agents share
/// (the relay's volume), which [`prepare_dir`] leaves as they are.
pub fn prepare_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    prepare_dir(dir)?;
    let meta = std::fs::metadata(dir)?;
    let me = nix::unistd::geteuid();
    if meta.uid() != me.as_raw() && meta.uid() != 0 {
        let name = |uid: u32| match nix::unistd::User::from_uid(uid.into()) {
            Ok(Some(u)) => format!("{} (uid {uid})", u.name),
            _ => format!("uid {uid}"),
        };
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is owned by {}, not by this agent's user {}",
                dir.display(),
                name(meta.uid()),
                name(me.as_raw())
            ),
        ));
    }
    if meta.uid() == me.as_raw() && meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// The stored instance secret of one membrane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSecret {
    /// Namespace of the registration.
    pub namespace: NamespaceName,
    /// Membrane id.
    pub id: MembraneId,
    /// `X-Membrane-Secret` value.
    pub secret: String,
}

/// The secret stored for `ns`/`id` in `dir`, if any (an unusable file counts as none:
/// [`check_secret`] refuses to start on one).
pub fn load_secret(dir: &Path, ns: &NamespaceName, id: &MembraneId) -> Option<String> {
    check_secret(dir, ns, id).ok().flatten()
}

/// The secret file in `dir`: `None` when there is none, its secret when it is readable and
/// belongs to `ns`/`id`; else an error naming it (the agent would otherwise pick a new
/// secret and overwrite the only proof of an existing registration).
pub fn check_secret(
    dir: &Path,
    ns: &NamespaceName,
    id: &MembraneId,
) -> Result<Option<String>, String> {
    let path = dir.join(SECRET_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let s: StoredSecret = serde_json::from_slice(&bytes).map_err(|e| {
        format!(
            "{} is not an instance secret ({e}); restore it, or remove it to register as a \
             new instance (the registry then refuses the old one's id until it is evicted, or \
             use --replace)",
            path.display()
        )
    })?;
    if s.namespace != *ns || s.id != *id {
        return Err(format!(
            "{} holds the instance secret of membrane {} in namespace {}, not {id} in {ns}: \
             give each membrane a state directory of its own (or remove the file if that \
             membrane is gone)",
            path.display(),
            s.id,
            s.namespace
        ));
    }
    Ok(Some(s.secret))
}

/// A new instance secret: 32 random bytes from the kernel, hex. The agent picks it before
/// its first registration (the registry adopts it), so a registration retried after a lost
/// answer, or after a restart, proves the same instance.
pub fn new_secret() -> std::io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Stores the secret (atomically, mode 0600).
pub fn save_secret(
    dir: &Path,
    ns: &NamespaceName,
    id: &MembraneId,
    secret: &str,
) -> std::io::Result<()> {
    let s = StoredSecret {
        namespace: ns.clone(),
        id: id.clone(),
        secret: secret.to_string(),
    };
    util::write_atomic(
        &dir.join(SECRET_FILE),
        &serde_json::to_vec(&s).expect("secret serialises"),
        0o600,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_round_trip_is_private_and_scoped() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ns = NamespaceName::new("cog").unwrap();
        let id = MembraneId::new("a").unwrap();
        assert_eq!(load_secret(dir.path(), &ns, &id), None);
        save_secret(dir.path(), &ns, &id, "s3cret").unwrap();
        assert_eq!(load_secret(dir.path(), &ns, &id).as_deref(), Some("s3cret"));
        let other = MembraneId::new("b").unwrap();
        assert_eq!(load_secret(dir.path(), &ns, &other), None);
        let mode = std::fs::metadata(dir.path().join(SECRET_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// A secret file that cannot be read, is not one, or is another membrane's, is never
    /// silently replaced: the agent refuses to start, naming it.
    #[test]
    fn a_secret_file_that_is_not_ours_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let (ns, id) = (
            NamespaceName::new("cog").unwrap(),
            MembraneId::new("a").unwrap(),
        );
        assert_eq!(check_secret(dir.path(), &ns, &id), Ok(None), "none yet");
        save_secret(dir.path(), &ns, &id, "s3cret").unwrap();
        assert_eq!(
            check_secret(dir.path(), &ns, &id),
            Ok(Some("s3cret".into()))
        );
        let other = MembraneId::new("b").unwrap();
        let e = check_secret(dir.path(), &ns, &other).unwrap_err();
        assert!(e.contains("membrane a in namespace cog, not b"), "{e}");
        std::fs::write(dir.path().join(SECRET_FILE), b"x").unwrap();
        let e = check_secret(dir.path(), &ns, &id).unwrap_err();
        assert!(e.contains("is not an instance secret"), "{e}");
        std::fs::remove_file(dir.path().join(SECRET_FILE)).unwrap();
        std::fs::create_dir(dir.path().join(SECRET_FILE)).unwrap();
        let e = check_secret(dir.path(), &ns, &id).unwrap_err();
        assert!(e.contains("cannot read"), "{e}");
    }

    #[test]
    fn prepare_dir_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        prepare_dir(&sub).unwrap();
        let mode = std::fs::metadata(&sub).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn private_dir_must_be_ours_and_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // Made beforehand, open to everyone (`--state-dir /tmp/x`).
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        prepare_private_dir(&open).unwrap();
        let mode = std::fs::metadata(&open).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // Another user's: refused, naming it and its owner (chown needs root, as in CI).
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o777)).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let other = if me == 65534 { 65533 } else { 65534 };
        if std::os::unix::fs::chown(&theirs, Some(other), None).is_ok() {
            let e = prepare_private_dir(&theirs).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
            let msg = e.to_string();
            assert!(msg.contains(theirs.to_str().unwrap()), "{msg}");
            assert!(msg.contains(&format!("uid {other}")), "{msg}");
            let mode = std::fs::metadata(&theirs).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o777, "left alone");
        }
        // Created here: 0700 as before.
        let new = dir.path().join("a/b");
        prepare_private_dir(&new).unwrap();
        let mode = std::fs::metadata(&new).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
