//! `agent recv` on a shared-volume Maildir holding files a peer planted to stop it: each
//! is set aside to `bad/` and the good messages are printed, by this `recv` and the next
//! (no agent runs: `recv` reads the Maildir named by `relay.json`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use shared::envelope::{Envelope, MessageId};

use crate::support::ids_printed;

const NOW_MS: u64 = 1_700_000_000_000;

/// A state directory whose `relay.json` names membrane `b` of `ns` on a shared volume
/// (below `dir`): the state directory and the Maildir root.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let state = dir.join("state");
    let shared = dir.join("shared");
    let root = shared.join("ns/b");
    for d in [
        &state,
        &root.join("tmp"),
        &root.join("new"),
        &root.join("cur"),
    ] {
        std::fs::create_dir_all(d).unwrap();
    }
    let info = serde_json::json!({
        "id": "b",
        "namespace": "ns",
        "mode": "shared-volume",
        "maildir": root,
        "after_recv": "keep",
        "max_message_bytes": 65536,
        "message_ttl_ms": 3_600_000,
        "shared_dir": shared,
    });
    std::fs::write(state.join("relay.json"), info.to_string()).unwrap();
    (state, root)
}

fn msg(n: u64, body: &str) -> Envelope {
    Envelope {
        id: MessageId::from_parts(NOW_MS + n, u128::from(n) + 5),
        from: "a".parse().unwrap(),
        to: "b".parse().unwrap(),
        namespace: "ns".parse().unwrap(),
        sent_at: NOW_MS + n,
        content_type: "text/plain".into(),
        body: body.as_bytes().to_vec(),
        reply_to: None,
        expires_at: None,
    }
}

/// Writes `e` into `new/` as a peer sharing the volume would.
fn plant(root: &Path, e: &Envelope) -> PathBuf {
    let p = root.join("new").join(e.id.to_string());
    std::fs::write(&p, e.encode()).unwrap();
    p
}

fn recv(state: &Path) -> Output {
    recv_as(state, None)
}

/// `agent recv`, as user and group `id` when given (root starting it).
fn recv_as(state: &Path, id: Option<u32>) -> Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agent"));
    cmd.args(["recv", "--json", "--state-dir"])
        .arg(state)
        .stdin(Stdio::null());
    if let Some(id) = id {
        cmd.uid(id).gid(id);
    }
    cmd.output().unwrap()
}

/// The ids a successful `recv` printed.
fn printed(out: &Output) -> Vec<String> {
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ids_printed(out)
}

/// `dir` and every directory below it.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        }
    }
    out
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A message claiming to be sent in the year ~11000 (which RFC 3339 cannot show: the
/// formatter panicked, before `take`, so every later `recv` panicked on it again) and one
/// expiring in the far future: both set aside, the good one printed.
#[test]
fn far_future_times_are_set_aside_and_recv_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (state, root) = setup(dir.path());
    let good = msg(1, "fine");
    let mut far_sent = msg(2, "from the future");
    far_sent.sent_at = 300_000_000_000_000;
    let mut far_expiry = msg(3, "never forgotten");
    far_expiry.expires_at = Some(u64::MAX / 2);
    for e in [&good, &far_sent, &far_expiry] {
        plant(&root, e);
    }
    let out = recv(&state);
    assert_eq!(printed(&out), vec![good.id.to_string()]);
    let mut bad = vec![far_sent.id.to_string(), far_expiry.id.to_string()];
    bad.sort();
    assert_eq!(names(&root.join("bad")), bad);
    assert!(names(&root.join("new")).is_empty());
    // The next recv is not stopped either.
    let next = msg(4, "next");
    plant(&root, &next);
    let out = recv(&state);
    assert_eq!(printed(&out), vec![next.id.to_string()]);
}

/// A file the membrane's user cannot read (mode 000) in `new/`: `read_new` failed with a
/// permission error and every `recv` stopped there. It is set aside instead.
#[test]
fn an_unreadable_file_is_set_aside_and_recv_goes_on() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (state, root) = setup(dir.path());
    // Root reads a mode-000 file anyway: as root (CI), `recv` runs as `nobody`, with the
    // test's directories opened to it.
    let nobody = nix::unistd::geteuid().is_root().then_some(65_534);
    if nobody.is_some() {
        for d in walk(dir.path()) {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
    }
    let recv = |state: &Path| recv_as(state, nobody);
    let locked = msg(1, "locked");
    let good = msg(2, "fine");
    let p = plant(&root, &locked);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o000)).unwrap();
    plant(&root, &good);
    let out = recv(&state);
    assert_eq!(printed(&out), vec![good.id.to_string()]);
    assert_eq!(names(&root.join("bad")), vec![locked.id.to_string()]);
    let out = recv(&state);
    assert!(printed(&out).is_empty());
}
