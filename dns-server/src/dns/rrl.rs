//! Response rate limiting for UDP: at most `rate` responses per second to one source
//! prefix (an IPv4 /24, an IPv6 /56), so that a spoofed query stream reflects at most that
//! many answers onto a victim network whatever their size. Of the responses over the
//! limit, every `slip`-th is sent truncated (TC=1, no records: no larger than the query),
//! so a real client behind the prefix retries over TCP and is served there; the others are
//! dropped. TCP is never limited (its source cannot be spoofed), nor a query carrying a
//! valid server cookie (RFC 7873: the source is proven), nor loopback sources.
//!
//! The table is fixed: `SLOTS` atomic words, each holding a hash tag of a prefix, the
//! second it counts and the count. A prefix lands in the slot of its keyed hash; another
//! prefix hashing to the same slot takes it over. The table never grows, whatever the
//! number of sources.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

/// Slots of the table (8 bytes each: 512 KiB).
const SLOTS: usize = 1 << 16;

/// What to do with one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Send,
    /// Send it truncated (TC=1, no records).
    Slip,
    Drop,
}

/// Rate limiting settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Responses per second per source prefix; 0 turns limiting off.
    pub responses_per_second: u32,
    /// Every `slip`-th limited response is sent truncated; 0: none (all dropped).
    pub slip: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            responses_per_second: DEFAULT_RATE,
            slip: DEFAULT_SLIP,
        }
    }
}

/// Default responses per second per prefix.
pub const DEFAULT_RATE: u32 = 200;
/// Default slip.
pub const DEFAULT_SLIP: u32 = 2;

pub(crate) struct Limiter {
    cfg: RateLimit,
    key: (u64, u64),
    slots: Box<[AtomicU64]>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").field("cfg", &self.cfg).finish()
    }
}

/// Slot layout: tag (24 bits) | second (16 bits) | count (24 bits).
fn pack(tag: u64, sec: u64, count: u64) -> u64 {
    (tag << 40) | ((sec & 0xFFFF) << 24) | count.min(0xFF_FFFF)
}

impl Limiter {
    pub(crate) fn new(cfg: RateLimit) -> Self {
        let slots = if cfg.responses_per_second == 0 {
            0
        } else {
            SLOTS
        };
        Limiter {
            cfg,
            key: (rand::random(), rand::random()),
            slots: (0..slots).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Accounts one response to `ip` during second `sec` (of any monotonic clock).
    pub(crate) fn check(&self, ip: IpAddr, sec: u64) -> Verdict {
        // IPv4 clients of a dual-stack socket arrive as ::ffff:a.b.c.d: count them by /24.
        let ip = ip.to_canonical();
        if self.cfg.responses_per_second == 0 || ip.is_loopback() {
            return Verdict::Send;
        }
        let h = self.hash(ip);
        let slot = &self.slots[(h as usize) & (SLOTS - 1)];
        let tag = h >> 40;
        let sec = sec & 0xFFFF;
        let mut cur = slot.load(Ordering::Relaxed);
        let count = loop {
            let same = cur >> 40 == tag && (cur >> 24) & 0xFFFF == sec;
            let count = if same { (cur & 0xFF_FFFF) + 1 } else { 1 };
            match slot.compare_exchange_weak(
                cur,
                pack(tag, sec, count),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break count,
                Err(now) => cur = now,
            }
        };
        let rate = u64::from(self.cfg.responses_per_second);
        if count <= rate {
            Verdict::Send
        } else if self.cfg.slip != 0 && (count - rate) % u64::from(self.cfg.slip) == 0 {
            Verdict::Slip
        } else {
            Verdict::Drop
        }
    }

    /// Keyed hash of the source prefix (/24 or /56).
    #[allow(deprecated)] // std's SipHasher: keyed, so sources cannot aim at one slot.
    fn hash(&self, ip: IpAddr) -> u64 {
        use std::hash::Hasher;
        let mut h = std::hash::SipHasher::new_with_keys(self.key.0, self.key.1);
        match prefix(ip) {
            Prefix::V4(p) => h.write(&p),
            Prefix::V6(p) => {
                h.write(&[6]);
                h.write(&p);
            }
        }
        h.finish()
    }
}

/// The network a source address is counted by: its IPv4 /24 or IPv6 /56.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Prefix {
    V4([u8; 3]),
    V6([u8; 7]),
}

/// The prefix of `ip` (an IPv4 client of a dual-stack socket, ::ffff:a.b.c.d, by its /24).
pub(crate) fn prefix(ip: IpAddr) -> Prefix {
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let o = a.octets();
            Prefix::V4([o[0], o[1], o[2]])
        }
        IpAddr::V6(a) => {
            let o = a.octets();
            Prefix::V6([o[0], o[1], o[2], o[3], o[4], o[5], o[6]])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(l: &Limiter, ip: &str, sec: u64, n: usize) -> (usize, usize, usize) {
        let ip: IpAddr = ip.parse().unwrap();
        let mut c = (0, 0, 0);
        for _ in 0..n {
            match l.check(ip, sec) {
                Verdict::Send => c.0 += 1,
                Verdict::Slip => c.1 += 1,
                Verdict::Drop => c.2 += 1,
            }
        }
        c
    }

    #[test]
    fn per_prefix_rate_with_slip() {
        let l = Limiter::new(RateLimit {
            responses_per_second: 10,
            slip: 3,
        });
        // 10 sent, then of 90 more every third slips.
        assert_eq!(count(&l, "192.0.2.1", 5, 100), (10, 30, 60));
        // The same /24 shares the budget; another /24 has its own.
        assert_eq!(count(&l, "192.0.2.200", 5, 3), (0, 1, 2));
        // The same /24 seen through a dual-stack socket.
        assert_eq!(count(&l, "::ffff:192.0.2.7", 5, 2), (0, 0, 2));
        assert_eq!(count(&l, "::ffff:127.0.0.1", 5, 100), (100, 0, 0));
        assert_eq!(count(&l, "192.0.3.1", 5, 10), (10, 0, 0));
        // The next second starts afresh.
        assert_eq!(count(&l, "192.0.2.1", 6, 11), (10, 0, 1));
        // IPv6 by /56.
        assert_eq!(count(&l, "2001:db8:0:1::1", 5, 10), (10, 0, 0));
        assert_eq!(count(&l, "2001:db8:0:ff::2", 5, 1), (0, 0, 1));
        assert_eq!(count(&l, "2001:db8:0:100::2", 5, 1), (1, 0, 0));
        // Loopback and a zero rate: never limited.
        assert_eq!(count(&l, "127.0.0.1", 5, 100), (100, 0, 0));
        let off = Limiter::new(RateLimit {
            responses_per_second: 0,
            slip: 2,
        });
        assert_eq!(count(&off, "192.0.2.1", 5, 1000), (1000, 0, 0));
    }

    #[test]
    fn slip_zero_drops_everything_over_the_limit() {
        let l = Limiter::new(RateLimit {
            responses_per_second: 5,
            slip: 0,
        });
        assert_eq!(count(&l, "198.51.100.9", 1, 20), (5, 0, 15));
    }
}
