//! Sender authentication of the TCP relay.
//!
//! Per-sender keys (what receivers check): each agent holds an Ed25519 key pair, registers
//! its public key (`relay_public_key`, 64 hex digits) with its registration, and signs each
//! message; a receiver verifies the signature with the public key the registry holds for
//! the `from` of the message header, so a member of the namespace cannot sign as another.
//! The signed bytes are [`ed25519_input`] (a context string and the SHA-256 of the whole
//! message). The signing itself is done by the agent (`ring`); this crate has the format.
//!
//! The namespace relay key below (HMAC-SHA256, frame kind 4) came first: the registry
//! still hands it to every admitted agent, where it tells the agent that its relay must
//! authenticate senders, but receivers no longer accept HMAC-signed frames.
//!
//! The registry holds one relay key per namespace, derived from its admin token's SHA-256
//! ([`namespace_key`]), and hands it to every agent that registers in the namespace (that
//! is, that holds the join or admin token, or the membrane's instance secret). A sender
//! signs each message with its own key, `sender_key(ns_key, ns, from)`; the receiver
//! derives the same key from the `from` in the message header and checks the tag, so a
//! message verifies only under the sender id it names. What this stops: anyone who can
//! reach a relay port but was never admitted to the namespace. What it does not: an agent
//! of the namespace holds the namespace key, so it could derive another member's key;
//! hence the per-sender Ed25519 keys above, and receivers refuse kind-4 frames.
//!
//! HMAC (RFC 2104) is written out here over `sha2` rather than adding a crate for it.

use sha2::{Digest, Sha256};

/// Length of keys and tags.
pub const KEY_LEN: usize = 32;

/// HMAC-SHA256 of the concatenation of `parts` under `key`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// The relay key of namespace `ns`, from the SHA-256 of the registry's admin token.
pub fn namespace_key(admin_token_hash: &[u8; 32], ns: &str) -> [u8; 32] {
    hmac_sha256(
        admin_token_hash,
        &[b"membrane-relay-namespace/1\0", ns.as_bytes()],
    )
}

/// The signing key of sender `from` in `ns`.
pub fn sender_key(ns_key: &[u8; 32], ns: &str, from: &str) -> [u8; 32] {
    hmac_sha256(
        ns_key,
        &[
            b"membrane-relay-sender/1\0",
            ns.as_bytes(),
            b"\0",
            from.as_bytes(),
        ],
    )
}

/// The tag of message `bytes` (the whole file format: header with id, from, to, namespace,
/// times, then the body) under a sender key.
pub fn sign(sender_key: &[u8; 32], bytes: &[u8]) -> [u8; 32] {
    hmac_sha256(sender_key, &[b"membrane-relay-message/1\0", bytes])
}

/// Whether `tag` is the tag of `bytes` (compared in constant time).
pub fn verify(sender_key: &[u8; 32], bytes: &[u8], tag: &[u8; 32]) -> bool {
    let want = sign(sender_key, bytes);
    want.iter().zip(tag).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Length of the Ed25519 signed input: context, then the message's SHA-256.
pub const ED25519_INPUT_LEN: usize = ED25519_CONTEXT.len() + 32;

const ED25519_CONTEXT: &[u8] = b"membrane-relay-ed25519/1\0";

/// What a sender's Ed25519 signature covers for message `bytes` (the whole file format:
/// header with id, from, to, namespace, times, then the body).
pub fn ed25519_input(bytes: &[u8]) -> [u8; ED25519_INPUT_LEN] {
    let mut out = [0u8; ED25519_INPUT_LEN];
    out[..ED25519_CONTEXT.len()].copy_from_slice(ED25519_CONTEXT);
    out[ED25519_CONTEXT.len()..].copy_from_slice(&Sha256::digest(bytes));
    out
}

/// Lower-case hex of a key.
pub fn to_hex(key: &[u8; 32]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// A key from 64 hex digits.
pub fn from_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test cases 1, 2 and 6 (key longer than a block).
        assert_eq!(
            hex(&hmac_sha256(&[0x0b; 20], &[b"Hi There"])),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        assert_eq!(
            hex(&hmac_sha256(
                b"Jefe",
                &[b"what do ya want ", b"for nothing?"]
            )),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex(&hmac_sha256(
                &[0xaa; 131],
                &[b"Test Using Larger Than Block-Size Key - Hash Key First"]
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn tags_bind_key_sender_and_bytes() {
        let ns = namespace_key(&[7; 32], "relay");
        assert_ne!(ns, namespace_key(&[7; 32], "other"));
        assert_ne!(ns, namespace_key(&[8; 32], "relay"));
        let a = sender_key(&ns, "relay", "a");
        let b = sender_key(&ns, "relay", "b");
        let t = sign(&a, b"msg");
        assert!(verify(&a, b"msg", &t));
        assert!(!verify(&b, b"msg", &t), "another sender's key");
        assert!(!verify(&a, b"msh", &t), "other bytes");
        assert_eq!(from_hex(&to_hex(&ns)), Some(ns));
        assert_eq!(from_hex("zz"), None);
    }
}
