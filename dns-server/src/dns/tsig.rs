//! TSIG (RFC 8945): shared-key authentication of requests and responses, with HMAC-SHA256
//! and HMAC-SHA512 (HMAC as RFC 2104 over the `sha2` crate; no other crypto dependency).
//!
//! A request's TSIG record is checked (key and algorithm known, MAC right, time within
//! the fudge); the response is signed with the same key, its MAC covering the request's
//! MAC. The messages of a zone transfer are each signed, each MAC covering the previous one
//! (RFC 8945 5.3.1).

use sha2::{Digest, Sha256, Sha512};

use super::records::{WireName, parse_text_name};
use super::wire::be16;

/// TSIG resource record type.
pub(crate) const TSIG: u16 = 250;
/// Allowed clock difference we put in our signatures (RFC 8945 recommends 300 s).
const FUDGE: u16 = 300;

/// TSIG error codes (RFC 8945 3).
pub(crate) mod error {
    pub const BADSIG: u16 = 16;
    pub const BADKEY: u16 = 17;
    pub const BADTIME: u16 = 18;
}

/// A supported MAC algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// hmac-sha256 (the one to use).
    HmacSha256,
    /// hmac-sha512.
    HmacSha512,
}

impl Algorithm {
    fn wire(self) -> WireName {
        let text = match self {
            Algorithm::HmacSha256 => "hmac-sha256.",
            Algorithm::HmacSha512 => "hmac-sha512.",
        };
        parse_text_name(text).unwrap_or_default()
    }

    /// The name as NSD, Knot and BIND spell it.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::HmacSha256 => "hmac-sha256",
            Algorithm::HmacSha512 => "hmac-sha512",
        }
    }

    /// Length of its MAC.
    fn mac_len(self) -> usize {
        match self {
            Algorithm::HmacSha256 => 32,
            Algorithm::HmacSha512 => 64,
        }
    }

    fn mac(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        match self {
            Algorithm::HmacSha256 => hmac::<Sha256>(key, parts),
            Algorithm::HmacSha512 => hmac::<Sha512>(key, parts),
        }
    }
}

/// RFC 2104 HMAC (both digests have a 64- or 128-byte block).
fn hmac<D: Digest + sha2::digest::core_api::BlockSizeUser>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let block = <D as sha2::digest::core_api::BlockSizeUser>::block_size();
    let mut k = if key.len() > block {
        D::digest(key).to_vec()
    } else {
        key.to_vec()
    };
    k.resize(block, 0);
    let mut inner = D::new();
    inner.update(k.iter().map(|b| b ^ 0x36).collect::<Vec<_>>());
    for p in parts {
        inner.update(p);
    }
    let inner = inner.finalize();
    let mut outer = D::new();
    outer.update(k.iter().map(|b| b ^ 0x5c).collect::<Vec<_>>());
    outer.update(inner);
    outer.finalize().to_vec()
}

/// A shared TSIG key.
#[derive(Clone, PartialEq, Eq)]
pub struct TsigKey {
    /// Key name, lowercase wire form.
    pub(crate) name: WireName,
    /// The name as configured (for logs and docs).
    pub label: String,
    /// MAC algorithm.
    pub algorithm: Algorithm,
    secret: Vec<u8>,
}

impl std::fmt::Debug for TsigKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TsigKey")
            .field("name", &self.label)
            .field("algorithm", &self.algorithm)
            .field("secret", &"<hidden>")
            .finish()
    }
}

impl std::str::FromStr for TsigKey {
    type Err = String;
    /// `NAME:ALGORITHM:BASE64SECRET`, e.g. `xfr-key:hmac-sha256:3q2+7w==`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut it = s.trim().splitn(3, ':');
        let (Some(name), Some(alg), Some(secret)) = (it.next(), it.next(), it.next()) else {
            return Err("a TSIG key is NAME:ALGORITHM:BASE64SECRET".into());
        };
        let wire = parse_text_name(name).map_err(|e| format!("TSIG key name: {e}"))?;
        if wire == [0] {
            return Err("TSIG key name: the root is not a key name".into());
        }
        let algorithm = match alg.trim_end_matches('.').to_ascii_lowercase().as_str() {
            "hmac-sha256" => Algorithm::HmacSha256,
            "hmac-sha512" => Algorithm::HmacSha512,
            other => {
                return Err(format!(
                    "TSIG algorithm {other:?} is not supported: use hmac-sha256 or hmac-sha512"
                ));
            }
        };
        let secret = base64_decode(secret.trim())
            .ok_or_else(|| format!("TSIG key {name:?}: the secret is not valid base64"))?;
        if secret.len() < 16 {
            return Err(format!(
                "TSIG key {name:?}: the secret has {} bytes; use at least 16 (32 random bytes \
                 recommended: `openssl rand -base64 32`)",
                secret.len()
            ));
        }
        Ok(TsigKey {
            name: wire,
            label: name.trim_end_matches('.').to_string(),
            algorithm,
            secret,
        })
    }
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Reads an uncompressed wire name at `i`: (lowercase name, offset after it).
fn read_name(b: &[u8], mut i: usize) -> Option<(WireName, usize)> {
    let mut name = Vec::new();
    loop {
        let l = *b.get(i)? as usize;
        if l & 0xC0 != 0 {
            return None;
        }
        name.push(l as u8);
        if l == 0 {
            return Some((name, i + 1));
        }
        name.extend(b.get(i + 1..i + 1 + l)?.iter().map(u8::to_ascii_lowercase));
        i += 1 + l;
        if name.len() > 255 {
            return None;
        }
    }
}

fn be48(b: &[u8], i: usize) -> u64 {
    b[i..i + 6]
        .iter()
        .fold(0u64, |a, &x| (a << 8) | u64::from(x))
}

/// A request whose signature checked out: what its response is signed with.
#[derive(Debug, Clone)]
pub(crate) struct Signer {
    key: TsigKey,
    /// The MAC the next signature covers (the request's, then each message's).
    prior: Vec<u8>,
    /// Whether the next message is the first response message (full variables).
    first: bool,
    /// TSIG error to put in the signature (BADTIME), 0 otherwise.
    error: u16,
    time: u64,
}

/// Why a signed request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Not a well-formed TSIG record: FORMERR.
    Malformed,
    /// NOTAUTH with this TSIG error in an unsigned TSIG record (BADKEY, BADSIG), echoing
    /// the key and algorithm names as received.
    Unsigned {
        error: u16,
        key: WireName,
        alg: WireName,
    },
}

/// Checks the TSIG record at `at` (the last record of `req`) against `keys` at unix time
/// `now`. Ok: the signer for the response (its `error` is BADTIME when only the time was
/// wrong: the response is then a signed NOTAUTH).
pub(crate) fn verify(req: &[u8], at: usize, keys: &[TsigKey], now: u64) -> Result<Signer, Failure> {
    let (key_name, i) = read_name(req, at).ok_or(Failure::Malformed)?;
    if i + 10 > req.len() || be16(req, i) != TSIG || be16(req, i + 2) != 255 {
        return Err(Failure::Malformed);
    }
    let rdlen = be16(req, i + 8) as usize;
    let rd = i + 10;
    if rd + rdlen != req.len() {
        return Err(Failure::Malformed);
    }
    let (alg, j) = read_name(req, rd).ok_or(Failure::Malformed)?;
    if j + 10 > req.len() {
        return Err(Failure::Malformed);
    }
    let time = be48(req, j);
    let fudge = be16(req, j + 6);
    let mac_len = be16(req, j + 8) as usize;
    let m = j + 10;
    if m + mac_len + 6 > req.len() {
        return Err(Failure::Malformed);
    }
    let mac = &req[m..m + mac_len];
    let orig_id = be16(req, m + mac_len);
    let other_len = be16(req, m + mac_len + 4) as usize;
    if m + mac_len + 6 + other_len != req.len() {
        return Err(Failure::Malformed);
    }
    let Some(key) = keys
        .iter()
        .find(|k| k.name == key_name && k.algorithm.wire() == alg)
    else {
        return Err(Failure::Unsigned {
            error: error::BADKEY,
            key: key_name,
            alg,
        });
    };
    // The message as signed: without the TSIG record, ARCOUNT one less, the original id.
    let mut msg = req[..at].to_vec();
    msg[0..2].copy_from_slice(&orig_id.to_be_bytes());
    let ar = be16(&msg, 10).wrapping_sub(1);
    msg[10..12].copy_from_slice(&ar.to_be_bytes());
    // Variables: key name, class, TTL, then the RDATA from the algorithm to the error and
    // other data, MAC and original id left out.
    let mut vars = Vec::with_capacity(64);
    vars.extend_from_slice(&key.name);
    vars.extend_from_slice(&[0, 255, 0, 0, 0, 0]);
    vars.extend_from_slice(&alg);
    vars.extend_from_slice(&req[j..j + 8]);
    vars.extend_from_slice(&req[m + mac_len + 2..]);
    let want = key.algorithm.mac(&key.secret, &[&msg, &vars]);
    if mac.len() != want.len() || !constant_time_eq(mac, &want) {
        return Err(Failure::Unsigned {
            error: error::BADSIG,
            key: key_name,
            alg,
        });
    }
    let error = if now.abs_diff(time) > u64::from(fudge) {
        error::BADTIME
    } else {
        0
    };
    Ok(Signer {
        key: key.clone(),
        prior: mac.to_vec(),
        first: true,
        error,
        time: now,
    })
}

/// Compares secrets (MACs, cookies) in time independent of where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Appends a TSIG record to `msg` (ARCOUNT raised by one).
fn append(
    msg: &mut Vec<u8>,
    key: &[u8],
    alg: &[u8],
    time: u64,
    mac: &[u8],
    error: u16,
    other: &[u8],
) {
    let id = [msg[0], msg[1]];
    msg.extend_from_slice(key);
    msg.extend_from_slice(&[0, 250, 0, 255, 0, 0, 0, 0]);
    let len_at = msg.len();
    msg.extend_from_slice(&[0, 0]);
    msg.extend_from_slice(alg);
    msg.extend_from_slice(&time.to_be_bytes()[2..]);
    msg.extend_from_slice(&FUDGE.to_be_bytes());
    msg.extend_from_slice(&(mac.len() as u16).to_be_bytes());
    msg.extend_from_slice(mac);
    msg.extend_from_slice(&id);
    msg.extend_from_slice(&error.to_be_bytes());
    msg.extend_from_slice(&(other.len() as u16).to_be_bytes());
    msg.extend_from_slice(other);
    let rdlen = (msg.len() - len_at - 2) as u16;
    msg[len_at..len_at + 2].copy_from_slice(&rdlen.to_be_bytes());
    let ar = be16(msg, 10) + 1;
    msg[10..12].copy_from_slice(&ar.to_be_bytes());
}

impl Signer {
    /// A signer for a request we send (NOTIFY): no prior MAC.
    pub(crate) fn for_request(key: &TsigKey, now: u64) -> Self {
        Signer {
            key: key.clone(),
            prior: Vec::new(),
            first: true,
            error: 0,
            time: now,
        }
    }

    /// The TSIG error to report (BADTIME), 0 if none.
    pub(crate) fn error(&self) -> u16 {
        self.error
    }

    /// Bytes the TSIG record [`Signer::sign`] appends takes: the key name, type to
    /// RDLENGTH (10), the algorithm name, time, fudge and MAC size (10), the MAC, original
    /// id, error and other length (6), other data (the server's time with BADTIME). An
    /// answer built to be signed leaves this much room under its size limit.
    pub(crate) fn record_len(&self) -> usize {
        let other = if self.error == error::BADTIME { 6 } else { 0 };
        let alg = self.key.algorithm.wire().len();
        self.key.name.len() + 10 + alg + 10 + self.key.algorithm.mac_len() + 6 + other
    }

    /// Signs `msg` (a complete message without TSIG) and appends the TSIG record. The first
    /// message covers every TSIG variable, the following ones only the timers.
    pub(crate) fn sign(&mut self, msg: &mut Vec<u8>) {
        let alg = self.key.algorithm.wire();
        let time = self.time.to_be_bytes();
        let other: Vec<u8> = if self.error == error::BADTIME {
            time[2..].to_vec()
        } else {
            Vec::new()
        };
        let prior_len = (self.prior.len() as u16).to_be_bytes();
        let mut vars = Vec::with_capacity(64);
        if self.first {
            vars.extend_from_slice(&self.key.name);
            vars.extend_from_slice(&[0, 255, 0, 0, 0, 0]);
            vars.extend_from_slice(&alg);
            vars.extend_from_slice(&time[2..]);
            vars.extend_from_slice(&FUDGE.to_be_bytes());
            vars.extend_from_slice(&self.error.to_be_bytes());
            vars.extend_from_slice(&(other.len() as u16).to_be_bytes());
            vars.extend_from_slice(&other);
        } else {
            vars.extend_from_slice(&time[2..]);
            vars.extend_from_slice(&FUDGE.to_be_bytes());
        }
        let mac = if self.prior.is_empty() {
            self.key.algorithm.mac(&self.key.secret, &[msg, &vars])
        } else {
            self.key
                .algorithm
                .mac(&self.key.secret, &[&prior_len, &self.prior, msg, &vars])
        };
        append(
            msg,
            &self.key.name,
            &alg,
            self.time,
            &mac,
            self.error,
            &other,
        );
        self.prior = mac;
        self.first = false;
    }

    /// Checks the signed response `resp` (TSIG record at `at`) to the request this signer
    /// signed last (NOTIFY replies).
    pub(crate) fn verify_response(&self, resp: &[u8], at: usize) -> bool {
        verify_with_prior(resp, at, std::slice::from_ref(&self.key), &self.prior).unwrap_or(false)
    }
}

/// [`verify`] of a response whose MAC covers `prior` (the request's MAC) first.
fn verify_with_prior(
    resp: &[u8],
    at: usize,
    keys: &[TsigKey],
    prior: &[u8],
) -> Result<bool, Failure> {
    let (key_name, i) = read_name(resp, at).ok_or(Failure::Malformed)?;
    if i + 10 > resp.len() {
        return Err(Failure::Malformed);
    }
    let rd = i + 10;
    let (alg, j) = read_name(resp, rd).ok_or(Failure::Malformed)?;
    if j + 10 > resp.len() {
        return Err(Failure::Malformed);
    }
    let mac_len = be16(resp, j + 8) as usize;
    let m = j + 10;
    if m + mac_len + 6 > resp.len() {
        return Err(Failure::Malformed);
    }
    let Some(key) = keys
        .iter()
        .find(|k| k.name == key_name && k.algorithm.wire() == alg)
    else {
        return Ok(false);
    };
    let orig_id = be16(resp, m + mac_len);
    let mut msg = resp[..at].to_vec();
    msg[0..2].copy_from_slice(&orig_id.to_be_bytes());
    let ar = be16(&msg, 10).wrapping_sub(1);
    msg[10..12].copy_from_slice(&ar.to_be_bytes());
    let mut vars = Vec::new();
    vars.extend_from_slice(&key.name);
    vars.extend_from_slice(&[0, 255, 0, 0, 0, 0]);
    vars.extend_from_slice(&alg);
    vars.extend_from_slice(&resp[j..j + 8]);
    vars.extend_from_slice(&resp[m + mac_len + 2..]);
    let prior_len = (prior.len() as u16).to_be_bytes();
    let want = key
        .algorithm
        .mac(&key.secret, &[&prior_len, prior, &msg, &vars]);
    Ok(constant_time_eq(&resp[m..m + mac_len], &want))
}

/// NOTAUTH's unsigned TSIG record for a request that failed (BADKEY, BADSIG).
pub(crate) fn append_unsigned(msg: &mut Vec<u8>, key: &[u8], alg: &[u8], error: u16, now: u64) {
    append(msg, key, alg, now, &[], error, &[]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_sha256_matches_rfc4231() {
        // RFC 4231 test case 2.
        let mac = hmac::<Sha256>(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block.
        let mac = hmac::<Sha256>(
            &[0xaa; 131],
            &[b"Test Using Larger Than Block-Size Key - Hash Key First"],
        );
        assert_eq!(mac[..4], [0x60, 0xe4, 0x31, 0x59]);
    }

    #[test]
    fn key_parsing() {
        let k: TsigKey = "xfr.key:hmac-sha256:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
            .parse()
            .unwrap();
        assert_eq!(k.secret, (0..32).collect::<Vec<u8>>());
        assert_eq!(k.label, "xfr.key");
        assert!(format!("{k:?}").contains("hidden"));
        for bad in [
            "nokey",
            "k:hmac-md5:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            "k:hmac-sha256:not base64!",
            "k:hmac-sha256:AAEC",
            "bad name:hmac-sha256:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        ] {
            assert!(bad.parse::<TsigKey>().is_err(), "{bad}");
        }
    }

    /// A request signed by hickory's reference values is out of scope here; instead a
    /// request signed with our signer verifies, and every bit flip of it fails.
    #[test]
    fn sign_then_verify_and_tampering_fails() {
        let key: TsigKey = "k:hmac-sha256:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
            .parse()
            .unwrap();
        let other: TsigKey = "k:hmac-sha256:AQECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
            .parse()
            .unwrap();
        let mut req = vec![0x12, 0x34, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        req.extend_from_slice(b"\x02ns\x00\x00\xfc\x00\x01");
        let at = req.len();
        Signer::for_request(&key, 1_000_000).sign(&mut req);
        assert_eq!(req.len() - at, Signer::for_request(&key, 0).record_len());
        assert!(verify(&req, at, std::slice::from_ref(&key), 1_000_100).is_ok());
        assert_eq!(
            verify(&req, at, &[other], 1_000_000).unwrap_err(),
            Failure::Unsigned {
                error: error::BADSIG,
                key: b"\x01k\x00".to_vec(),
                alg: Algorithm::HmacSha256.wire()
            }
        );
        let mut late = verify(&req, at, std::slice::from_ref(&key), 2_000_000).unwrap();
        assert_eq!(late.error(), error::BADTIME);
        // The length a signature takes, known before signing (BADTIME adds the time).
        let mut resp = req[..at].to_vec();
        let (n, want) = (resp.len(), late.record_len());
        late.sign(&mut resp);
        assert_eq!(resp.len() - n, want);
        let k512: TsigKey = "k:hmac-sha512:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
            .parse()
            .unwrap();
        let mut signer = Signer::for_request(&k512, 1_000_000);
        let want = signer.record_len();
        signer.sign(&mut resp);
        assert_eq!(resp.len() - n - late.record_len(), want);
        for i in 2..at {
            let mut t = req.clone();
            t[i] ^= 1;
            assert!(
                verify(&t, at, std::slice::from_ref(&key), 1_000_000).is_err(),
                "byte {i}"
            );
        }
    }
}
