//! Bytes from a relay peer through the receiver's frame reader: see
//! `agent::fuzzing::relay_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| agent::fuzzing::relay_frames(data));
