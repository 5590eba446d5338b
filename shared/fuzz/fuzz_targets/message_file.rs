//! A Maildir message file (`membrane-message/1`): see `shared::fuzzing::message_file`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shared::fuzzing::message_file(data));
