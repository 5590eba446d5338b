//! Fuzz target body (used by `agent/fuzz` and replayed over its seed corpus by `cargo
//! test`): arbitrary bytes from a peer through the relay receiver's frame reader. Not an
//! API: hidden from the docs, may change at any time.

use shared::envelope::{self, Frame};

use crate::relay::wire::{FrameReader, Read};

/// Frame limit of the fuzzed reader: small, so that skipping an oversized frame is within
/// reach of short inputs (the agent's is the body limit + 8 KiB).
const MAX_FRAME: usize = 600;
const MAX_BODY: usize = 400;

/// The byte stream a sender wrote, read as the receiving agent reads it: nothing panics,
/// the reader holds at most one frame, every message handed on is within the limit, every
/// NACK it answers is one the sender can decode, and the same things are read whether the
/// bytes arrive at once or in small pieces.
pub fn relay_frames(data: &[u8]) {
    let whole = read_all(data, &[data.len().max(1)]);
    let pieces = [1, 2, 3, 5, 7, 64, 13, 600, 4];
    let start = data.len() % pieces.len();
    let sizes: Vec<usize> = pieces[start..]
        .iter()
        .chain(&pieces[..start])
        .copied()
        .collect();
    let chunked = read_all(data, &sizes);
    assert_eq!(whole, chunked, "reads depend on how the bytes were split");
}

fn read_all(data: &[u8], sizes: &[usize]) -> Vec<Read> {
    let mut reader = FrameReader::new(MAX_FRAME, MAX_BODY);
    let mut reads = Vec::new();
    let mut rest = data;
    for &n in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (now, later) = rest.split_at(n.min(rest.len()));
        rest = later;
        reader.push(now);
        while let Some(read) = reader.next() {
            check(&read);
            let fatal = matches!(read, Read::Fatal(_));
            reads.push(read);
            if fatal {
                return reads;
            }
        }
        assert!(
            reader.buffered() < MAX_FRAME + 4 + 4096,
            "reader holds {} bytes",
            reader.buffered()
        );
    }
    reads
}

fn check(read: &Read) {
    match read {
        Read::Msg(bytes, _) => {
            assert!(bytes.len() + 2 <= MAX_FRAME, "{} byte message", bytes.len());
            // What the inbox does next with it.
            let _ = envelope::peek(bytes);
        }
        Read::Refuse(r) | Read::Fatal(r) => {
            let mut wire = Vec::new();
            Frame::Nack(r.clone()).encode_into(&mut wire);
            assert_eq!(
                Frame::take(&mut wire, 1 << 20),
                Ok(Some(Frame::Nack(r.clone()))),
                "the sender cannot read our NACK"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every file of `agent/fuzz/seeds/relay_frames` (the checked-in seed corpus and the
    /// reproducers of past findings) through the target body.
    #[test]
    fn relay_frames_seeds() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/relay_frames");
        shared::fuzzing::replay_seeds(&dir, super::relay_frames);
    }
}
