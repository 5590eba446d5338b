//! Fuzz target bodies (used by `shared/fuzz` and replayed over its seed corpus by
//! `cargo test`): arbitrary bytes through the relay's message file parser and through the
//! registration JSON, checking that nothing panics and that what is accepted round-trips.
//! Not an API: hidden from the docs, may change at any time.

use crate::envelope::{Envelope, MessageId, peek};
use crate::model::Registration;

/// A Maildir message file (`membrane-message/1`): [`Envelope::decode`] and [`peek`] agree,
/// and an accepted message encodes to bytes that decode to the same message. The bytes as a
/// Maildir file name: an accepted [`MessageId`] is spelled canonically.
pub fn message_file(data: &[u8]) {
    let full = Envelope::decode(data);
    let meta = peek(data);
    match (&full, &meta) {
        (Ok(e), Ok(m)) => {
            assert_eq!(
                (
                    e.id,
                    &e.to,
                    &e.namespace,
                    e.body.len(),
                    e.sent_at,
                    e.expires_at
                ),
                (
                    m.id,
                    &m.to,
                    &m.namespace,
                    m.body_len,
                    m.sent_at,
                    m.expires_at
                ),
                "decode and peek disagree"
            );
            let again = e.encode();
            assert_eq!(Envelope::decode(&again).as_ref(), Ok(e), "round trip");
            assert_eq!(peek(&again).as_ref(), Ok(m), "peek of the round trip");
        }
        (Err(a), Err(b)) => assert_eq!(a, b, "decode and peek fail differently"),
        _ => panic!("decode {full:?} but peek {meta:?}"),
    }
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(id) = s.parse::<MessageId>()
    {
        assert_eq!(id.to_string(), s, "file name not canonical");
    }
}

/// A registration body as `PUT …/membranes/{id}` reads it: deserialise, validate; what
/// parses serialises to JSON that parses to the same registration and validates the same.
pub fn registration(data: &[u8]) {
    let Ok(reg) = serde_json::from_slice::<Registration>(data) else {
        return;
    };
    let verdict = reg.validate();
    let json = serde_json::to_vec(&reg).expect("a registration serialises");
    let back: Registration = match serde_json::from_slice(&json) {
        Ok(b) => b,
        Err(e) => panic!(
            "{} does not parse back: {e}",
            String::from_utf8_lossy(&json)
        ),
    };
    assert_eq!(back, reg, "round trip");
    assert_eq!(back.validate(), verdict, "validation after the round trip");
}

/// Runs every file of `dir` (a target's checked-in seed corpus and the reproducers of
/// past findings) through the target body `f`; a crate's `cargo test` replays its seeds
/// with it. Panics when `dir` holds fewer than 10 seeds (a corpus gone missing).
pub fn replay_seeds(dir: &std::path::Path, f: fn(&[u8])) {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        eprintln!("{}", path.display());
        f(&std::fs::read(&path).unwrap());
        n += 1;
    }
    assert!(n >= 10, "{}: only {n} seeds", dir.display());
}

#[cfg(test)]
mod tests {
    /// `shared/fuzz/seeds/<target>` through the target body.
    fn replay(target: &str, f: fn(&[u8])) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        super::replay_seeds(&dir.join(target), f);
    }

    #[test]
    fn message_file_seeds() {
        replay("message_file", super::message_file);
    }

    #[test]
    fn registration_seeds() {
        replay("registration", super::registration);
    }
}
