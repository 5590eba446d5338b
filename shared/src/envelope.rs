//! The message envelope of the relay, its file format (one message per file in a Maildir)
//! and the versioned, length-prefixed frames spoken over Unix and TCP sockets.
//!
//! # Message id
//! 32 lowercase hex digits: 12 of the sender's clock in milliseconds since the Unix epoch,
//! then 20 of randomness (80 bits). Ids sort by send time, are unique without coordination,
//! and are safe file names. [`MessageId::from_parts`] builds one; the agent keeps them
//! strictly increasing within a process.
//!
//! # File format (`membrane-message/1`)
//! ```text
//! membrane-message/1\n
//! {"id":"…","from":"a","to":"b","namespace":"ns","sent_at":1700000000123,
//!  "content_type":"text/plain; charset=utf-8","reply_to":null,"expires_at":…,"body_len":5}\n
//! <body_len bytes of body>
//! ```
//! The first line is the magic and version; the second one JSON object on one line (the
//! header; `sent_at` and `expires_at` in milliseconds since the Unix epoch, `reply_to` and
//! `expires_at` optional); then exactly `body_len` raw bytes. A file whose body is shorter
//! than `body_len`, or with another magic, is rejected. Readers ignore unknown header fields.
//!
//! # Frames (version 1)
//! ```text
//! u32 big-endian L | u8 version = 1 | u8 kind | L - 2 bytes of payload
//! ```
//! Kinds: `1` MSG (payload: one message in the file format above), `2` ACK (payload: the
//! message id, ASCII: the message is durably stored, or was a duplicate), `3` NACK (payload:
//! JSON `{"id","code","message"}`: refused for good, e.g. `too_large`, `wrong_recipient`).
//! A receiver answers every MSG with exactly one ACK or NACK, in any order; senders may
//! pipeline any number of MSG frames on one connection.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::name::{MembraneId, NamespaceName};

/// Magic first line of the file format.
pub const FILE_MAGIC: &[u8] = b"membrane-message/1\n";
/// Frame protocol version.
pub const FRAME_VERSION: u8 = 1;
/// Default largest message body accepted, in bytes (1 MiB).
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// Header room allowed on top of the body limit (header line, magic, frame head).
pub const HEADER_ROOM: usize = 8 * 1024;

/// A message id: 48-bit milliseconds then 80 random bits, as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(u128);

impl MessageId {
    /// The id for time `millis` (since the Unix epoch) and 80 bits of `entropy`.
    pub fn from_parts(millis: u64, entropy: u128) -> Self {
        let ms = u128::from(millis & 0xffff_ffff_ffff);
        MessageId((ms << 80) | (entropy & ((1u128 << 80) - 1)))
    }

    /// The raw value.
    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// From the raw value.
    pub fn from_u128(v: u128) -> Self {
        MessageId(v)
    }

    /// The milliseconds part.
    pub fn millis(self) -> u64 {
        (self.0 >> 80) as u64
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// An invalid message id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a message id (32 lowercase hex digits)")]
pub struct BadMessageId(pub String);

impl FromStr for MessageId {
    type Err = BadMessageId;
    fn from_str(s: &str) -> Result<Self, BadMessageId> {
        if s.len() != 32 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(BadMessageId(s.chars().take(64).collect()));
        }
        u128::from_str_radix(s, 16)
            .map(MessageId)
            .map_err(|_| BadMessageId(s.to_string()))
    }
}

impl Serialize for MessageId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Unique, sortable id.
    pub id: MessageId,
    /// Sending membrane.
    pub from: MembraneId,
    /// Receiving membrane.
    pub to: MembraneId,
    /// Namespace of both.
    pub namespace: NamespaceName,
    /// Milliseconds since the Unix epoch at send time.
    pub sent_at: u64,
    /// MIME type of the body.
    pub content_type: String,
    /// The body.
    pub body: Vec<u8>,
    /// The message this one answers.
    pub reply_to: Option<MessageId>,
    /// The sender gives up delivering after this time (ms since the Unix epoch).
    pub expires_at: Option<u64>,
}

/// The header line of the file format.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    id: MessageId,
    from: MembraneId,
    to: MembraneId,
    namespace: NamespaceName,
    sent_at: u64,
    content_type: String,
    #[serde(default)]
    reply_to: Option<MessageId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<u64>,
    body_len: usize,
}

/// Why bytes are not a message or a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not the `membrane-message/1` format.
    #[error("not a membrane message (bad magic or version)")]
    BadMagic,
    /// The header line is not valid.
    #[error("bad message header: {0}")]
    BadHeader(String),
    /// The body is shorter or longer than announced.
    #[error("message body is {actual} bytes, header says {expected}")]
    BadLength {
        /// From the header.
        expected: usize,
        /// Present.
        actual: usize,
    },
    /// A frame larger than allowed.
    #[error("frame of {0} bytes is larger than allowed")]
    TooLarge(usize),
    /// Unknown frame version.
    #[error("frame version {0} is not supported (this side speaks 1)")]
    Version(u8),
    /// Unknown frame kind or bad payload.
    #[error("bad frame: {0}")]
    BadFrame(String),
}

impl Envelope {
    /// Whether the body is UTF-8 text.
    pub fn body_text(&self) -> Option<&str> {
        std::str::from_utf8(&self.body).ok()
    }

    /// Encodes in the file format.
    pub fn encode(&self) -> Vec<u8> {
        let h = Header {
            id: self.id,
            from: self.from.clone(),
            to: self.to.clone(),
            namespace: self.namespace.clone(),
            sent_at: self.sent_at,
            content_type: self.content_type.clone(),
            reply_to: self.reply_to,
            expires_at: self.expires_at,
            body_len: self.body.len(),
        };
        let header = serde_json::to_vec(&h).expect("header serialises");
        let mut out = Vec::with_capacity(FILE_MAGIC.len() + header.len() + 1 + self.body.len());
        out.extend_from_slice(FILE_MAGIC);
        out.extend_from_slice(&header);
        out.push(b'\n');
        out.extend_from_slice(&self.body);
        out
    }

    /// Decodes the file format.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        let rest = bytes
            .strip_prefix(FILE_MAGIC)
            .ok_or(DecodeError::BadMagic)?;
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| DecodeError::BadHeader("no end of header line".into()))?;
        let h: Header = serde_json::from_slice(&rest[..nl])
            .map_err(|e| DecodeError::BadHeader(e.to_string()))?;
        let body = &rest[nl + 1..];
        if body.len() != h.body_len {
            return Err(DecodeError::BadLength {
                expected: h.body_len,
                actual: body.len(),
            });
        }
        Ok(Envelope {
            id: h.id,
            from: h.from,
            to: h.to,
            namespace: h.namespace,
            sent_at: h.sent_at,
            content_type: h.content_type,
            body: body.to_vec(),
            reply_to: h.reply_to,
            expires_at: h.expires_at,
        })
    }
}

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A message.
    Msg = 1,
    /// Stored (or duplicate): the sender may forget it.
    Ack = 2,
    /// Refused for good.
    Nack = 3,
    /// A message with its sender's HMAC-SHA256 tag (32 bytes, then the message).
    SignedMsg = 4,
    /// A message with its sender's Ed25519 signature (64 bytes, then the message; see
    /// [`crate::relay_auth::ed25519_input`]).
    Ed25519Msg = 5,
}

/// A refusal, the payload of a NACK frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The refused message (absent when its id could not be read).
    pub id: Option<MessageId>,
    /// Machine-readable reason: `too_large`, `wrong_recipient`, `bad_message`, `unavailable`.
    pub code: String,
    /// Human-readable reason.
    pub message: String,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A message, still in the file format (so a receiver can store the bytes as they are).
    Msg(Vec<u8>),
    /// Stored.
    Ack(MessageId),
    /// Refused.
    Nack(Refusal),
    /// A message with the HMAC-SHA256 tag of its sender (see [`crate::relay_auth`]).
    Signed([u8; 32], Vec<u8>),
    /// A message with the Ed25519 signature of its sender (see [`crate::relay_auth`]).
    Ed25519([u8; 64], Vec<u8>),
}

/// Appends one frame of `kind` with `payload` to `out`.
pub fn encode_frame(kind: FrameKind, payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len() + 2).expect("frame fits u32");
    out.extend_from_slice(&len.to_be_bytes());
    out.push(FRAME_VERSION);
    out.push(kind as u8);
    out.extend_from_slice(payload);
}

/// Appends one signed message frame (`tag`, then the message `msg`) to `out`.
pub fn encode_signed_frame(tag: &[u8; 32], msg: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(msg.len() + 34).expect("frame fits u32");
    out.extend_from_slice(&len.to_be_bytes());
    out.push(FRAME_VERSION);
    out.push(FrameKind::SignedMsg as u8);
    out.extend_from_slice(tag);
    out.extend_from_slice(msg);
}

/// Appends one Ed25519-signed message frame (`sig`, then the message `msg`) to `out`.
pub fn encode_ed25519_frame(sig: &[u8; 64], msg: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(msg.len() + 66).expect("frame fits u32");
    out.extend_from_slice(&len.to_be_bytes());
    out.push(FRAME_VERSION);
    out.push(FrameKind::Ed25519Msg as u8);
    out.extend_from_slice(sig);
    out.extend_from_slice(msg);
}

impl Frame {
    /// Appends the encoded frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Msg(b) => encode_frame(FrameKind::Msg, b, out),
            Frame::Ack(id) => encode_frame(FrameKind::Ack, id.to_string().as_bytes(), out),
            Frame::Nack(r) => encode_frame(
                FrameKind::Nack,
                &serde_json::to_vec(r).expect("refusal serialises"),
                out,
            ),
            Frame::Signed(tag, b) => encode_signed_frame(tag, b, out),
            Frame::Ed25519(sig, b) => encode_ed25519_frame(sig, b, out),
        }
    }

    /// Takes one complete frame off the front of `buf`: `Ok(None)` when more bytes are
    /// needed. `max` bounds the length field (checked before anything is buffered).
    pub fn take(buf: &mut Vec<u8>, max: usize) -> Result<Option<Frame>, DecodeError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > max {
            return Err(DecodeError::TooLarge(len));
        }
        if len < 2 {
            return Err(DecodeError::BadFrame("length below 2".into()));
        }
        if buf.len() < 6 {
            return Ok(None);
        }
        if buf[4] != FRAME_VERSION {
            return Err(DecodeError::Version(buf[4]));
        }
        if buf.len() < 4 + len {
            return Ok(None);
        }
        let kind = buf[5];
        let payload = buf[6..4 + len].to_vec();
        buf.drain(..4 + len);
        let frame = match kind {
            1 => Frame::Msg(payload),
            2 => Frame::Ack(
                std::str::from_utf8(&payload)
                    .map_err(|_| DecodeError::BadFrame("ack id not ASCII".into()))?
                    .parse()
                    .map_err(|e: BadMessageId| DecodeError::BadFrame(e.to_string()))?,
            ),
            3 => Frame::Nack(
                serde_json::from_slice(&payload)
                    .map_err(|e| DecodeError::BadFrame(format!("nack: {e}")))?,
            ),
            4 if payload.len() >= 32 => {
                let tag: [u8; 32] = payload[..32].try_into().expect("32 bytes");
                Frame::Signed(tag, payload[32..].to_vec())
            }
            4 => {
                return Err(DecodeError::BadFrame(
                    "signed message without its tag".into(),
                ));
            }
            5 if payload.len() >= 64 => {
                let sig: [u8; 64] = payload[..64].try_into().expect("64 bytes");
                Frame::Ed25519(sig, payload[64..].to_vec())
            }
            5 => {
                return Err(DecodeError::BadFrame(
                    "signed message without its signature".into(),
                ));
            }
            k => return Err(DecodeError::BadFrame(format!("unknown kind {k}"))),
        };
        Ok(Some(frame))
    }
}

/// What [`peek`] reads of a message's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Id.
    pub id: MessageId,
    /// Sender.
    pub from: MembraneId,
    /// Recipient.
    pub to: MembraneId,
    /// Namespace.
    pub namespace: NamespaceName,
    /// Body length.
    pub body_len: usize,
    /// Sent at (ms since the epoch).
    pub sent_at: u64,
    /// Expiry (ms since the epoch).
    pub expires_at: Option<u64>,
}

/// Reads the header of a message in the file format without copying the body (for
/// receivers that store the bytes as they are).
pub fn peek(bytes: &[u8]) -> Result<Meta, DecodeError> {
    let rest = bytes
        .strip_prefix(FILE_MAGIC)
        .ok_or(DecodeError::BadMagic)?;
    let nl = rest
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| DecodeError::BadHeader("no end of header line".into()))?;
    let h: Header =
        serde_json::from_slice(&rest[..nl]).map_err(|e| DecodeError::BadHeader(e.to_string()))?;
    let body = rest.len() - nl - 1;
    if body != h.body_len {
        return Err(DecodeError::BadLength {
            expected: h.body_len,
            actual: body,
        });
    }
    Ok(Meta {
        id: h.id,
        from: h.from,
        to: h.to,
        namespace: h.namespace,
        body_len: h.body_len,
        sent_at: h.sent_at,
        expires_at: h.expires_at,
    })
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (for binary bodies in JSON).
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(B64[(n >> 18) as usize & 63] as char);
        out.push(B64[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            B64[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            B64[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// Decodes standard base64 (padding optional); `None` when not base64.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = B64.iter().position(|&x| x == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    (bits < 6 && acc == 0).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(body: &[u8]) -> Envelope {
        Envelope {
            id: MessageId::from_parts(1_700_000_000_123, 42),
            from: MembraneId::new("a").unwrap(),
            to: MembraneId::new("b").unwrap(),
            namespace: NamespaceName::new("ns").unwrap(),
            sent_at: 1_700_000_000_123,
            content_type: "text/plain".into(),
            body: body.to_vec(),
            reply_to: Some(MessageId::from_parts(1, 2)),
            expires_at: Some(1_700_003_600_123),
        }
    }

    #[test]
    fn ids_sort_by_time_and_parse() {
        let a = MessageId::from_parts(1000, u128::MAX);
        let b = MessageId::from_parts(1001, 0);
        assert!(a < b);
        assert!(a.to_string() < b.to_string());
        assert_eq!(a.to_string().len(), 32);
        assert_eq!(a.to_string().parse::<MessageId>().unwrap(), a);
        assert_eq!(b.millis(), 1001);
        for bad in ["", "../../etc/passwd", &"A".repeat(32), &"0".repeat(31)] {
            assert!(bad.parse::<MessageId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn file_format_round_trip_and_rejects() {
        let e = env(b"hello\nworld\0\xff");
        let bytes = e.encode();
        assert!(bytes.starts_with(b"membrane-message/1\n{\"id\":\""));
        assert_eq!(Envelope::decode(&bytes).unwrap(), e);
        let Meta {
            id,
            to,
            namespace: ns,
            body_len: len,
            ..
        } = peek(&bytes).unwrap();
        assert_eq!((id, to.as_str(), ns.as_str(), len), (e.id, "b", "ns", 13));
        // Truncated body, extra bytes, bad magic.
        assert!(matches!(
            Envelope::decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::BadLength { .. })
        ));
        let mut longer = bytes.clone();
        longer.push(b'x');
        assert!(Envelope::decode(&longer).is_err());
        assert_eq!(
            Envelope::decode(b"membrane-message/2\n{}\n"),
            Err(DecodeError::BadMagic)
        );
        // A header with a path in `to` is refused by the label validation.
        let evil = String::from_utf8_lossy(&bytes).replace("\"to\":\"b\"", "\"to\":\"../x\"");
        assert!(evil.contains("../x"));
        assert!(matches!(
            Envelope::decode(evil.as_bytes()),
            Err(DecodeError::BadHeader(_))
        ));
    }

    #[test]
    fn frames_split_anywhere() {
        let e = env(b"x");
        let mut wire = Vec::new();
        Frame::Msg(e.encode()).encode_into(&mut wire);
        Frame::Ack(e.id).encode_into(&mut wire);
        let nack = Refusal {
            id: Some(e.id),
            code: "too_large".into(),
            message: "m".into(),
        };
        Frame::Nack(nack.clone()).encode_into(&mut wire);
        Frame::Ed25519([7; 64], e.encode()).encode_into(&mut wire);
        // Feed byte by byte: frames come out whole and in order.
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for b in wire {
            buf.push(b);
            while let Some(f) = Frame::take(&mut buf, 1 << 20).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(
            got,
            vec![
                Frame::Msg(e.encode()),
                Frame::Ack(e.id),
                Frame::Nack(nack),
                Frame::Ed25519([7; 64], e.encode())
            ]
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn frame_limits_and_versions() {
        let mut buf = Vec::new();
        encode_frame(FrameKind::Msg, &[0u8; 100], &mut buf);
        assert_eq!(Frame::take(&mut buf, 50), Err(DecodeError::TooLarge(102)));
        // Only the 4-byte length is needed to refuse an oversized frame.
        let mut head = (10_000_000u32).to_be_bytes().to_vec();
        assert_eq!(
            Frame::take(&mut head, 1 << 20),
            Err(DecodeError::TooLarge(10_000_000))
        );
        let mut v2 = vec![0, 0, 0, 2, 2, 1];
        assert_eq!(Frame::take(&mut v2, 100), Err(DecodeError::Version(2)));
        // A signed frame too short for its signature.
        let mut short = vec![0, 0, 0, 12, 1, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            Frame::take(&mut short, 100),
            Err(DecodeError::BadFrame(_))
        ));
        let mut k9 = vec![0, 0, 0, 2, 1, 9];
        assert!(matches!(
            Frame::take(&mut k9, 100),
            Err(DecodeError::BadFrame(_))
        ));
    }

    #[test]
    fn base64_round_trip() {
        for n in 0..40 {
            let data: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let s = base64_encode(&data);
            assert_eq!(base64_decode(&s).unwrap(), data, "{n}");
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert!(base64_decode("Zm9v!").is_none());
    }
}
