//! A registration JSON body: see `shared::fuzzing::registration`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shared::fuzzing::registration(data));
