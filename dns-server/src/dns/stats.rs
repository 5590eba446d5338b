//! Query counters, sharded per receive loop so the hot path never shares a cache line.

use std::sync::atomic::{AtomicU64, Ordering};

/// One counter of a shard.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counter {
    QueriesUdp,
    QueriesTcp,
    NoError,
    FormErr,
    NxDomain,
    NotImp,
    Refused,
    OtherRcode,
    Truncated,
    Dropped,
    RateLimited,
}

const COUNTERS: usize = 11;
pub(crate) const SHARDS: usize = 16;

impl Counter {
    pub(crate) fn for_rcode(rcode: u16) -> Counter {
        match rcode {
            0 => Counter::NoError,
            1 => Counter::FormErr,
            3 => Counter::NxDomain,
            4 => Counter::NotImp,
            5 => Counter::Refused,
            _ => Counter::OtherRcode,
        }
    }
}

/// Counters written by one loop (or by the TCP connections).
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Shard {
    c: [AtomicU64; COUNTERS],
}

impl Shard {
    #[inline]
    pub(crate) fn add(&self, c: Counter) {
        self.c[c as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// All shards.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub shards: [Shard; SHARDS],
}

impl Stats {
    pub(crate) fn snapshot(&self) -> DnsStats {
        let mut t = [0u64; COUNTERS];
        for s in &self.shards {
            for (acc, c) in t.iter_mut().zip(&s.c) {
                *acc += c.load(Ordering::Relaxed);
            }
        }
        DnsStats {
            queries_udp: t[Counter::QueriesUdp as usize],
            queries_tcp: t[Counter::QueriesTcp as usize],
            noerror: t[Counter::NoError as usize],
            formerr: t[Counter::FormErr as usize],
            nxdomain: t[Counter::NxDomain as usize],
            notimp: t[Counter::NotImp as usize],
            refused: t[Counter::Refused as usize],
            other_rcode: t[Counter::OtherRcode as usize],
            truncated: t[Counter::Truncated as usize],
            dropped: t[Counter::Dropped as usize],
            rate_limited: t[Counter::RateLimited as usize],
        }
    }
}

/// Counters since start, for Prometheus. NOERROR includes NODATA answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// Queries received over UDP (answered or dropped).
    pub queries_udp: u64,
    /// Queries received over TCP.
    pub queries_tcp: u64,
    /// Answers with RCODE NOERROR (including NODATA).
    pub noerror: u64,
    /// Answers with RCODE FORMERR.
    pub formerr: u64,
    /// Answers with RCODE NXDOMAIN.
    pub nxdomain: u64,
    /// Answers with RCODE NOTIMP.
    pub notimp: u64,
    /// Answers with RCODE REFUSED.
    pub refused: u64,
    /// Answers with any other RCODE (BADVERS).
    pub other_rcode: u64,
    /// UDP answers sent with TC set.
    pub truncated: u64,
    /// Requests dropped without an answer (too short, or responses).
    pub dropped: u64,
    /// UDP responses over the rate limit (dropped, or sent truncated: those also count in
    /// `truncated`).
    pub rate_limited: u64,
}

impl DnsStats {
    /// `(rcode label, count)` pairs, for a labelled counter family.
    pub fn by_rcode(&self) -> [(&'static str, u64); 6] {
        [
            ("NOERROR", self.noerror),
            ("FORMERR", self.formerr),
            ("NXDOMAIN", self.nxdomain),
            ("NOTIMP", self.notimp),
            ("REFUSED", self.refused),
            ("OTHER", self.other_rcode),
        ]
    }
}
