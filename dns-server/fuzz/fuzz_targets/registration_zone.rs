//! A registration body through validation into a zone and its answers: see
//! `dns_server::dns::fuzzing::registration_zone`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dns_server::dns::fuzzing::registration_zone(data));
