//! Request bytes through the DNS query path: see `dns_server::dns::fuzzing::dns_query`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dns_server::dns::fuzzing::dns_query(data));
