//! The query path: a minimal parse of the header, question and OPT record, a lookup in the
//! pre-rendered zone, and a response assembled by copying bytes into a reusable buffer.
//! Anything the minimal parser does not handle (a compressed question name) goes through
//! hickory-proto's full parser and is re-encoded in the plain form. The response's OPT
//! ([`edns`]) is rendered first, so its size counts against the limit; additional records
//! fill what room is left; a set larger than a TCP message is answered with a random
//! subset; UDP responses then pass the rate limiter ([`super::rrl`]).

use std::net::IpAddr;

use super::Catalog;
use super::edns::{self, OptExtras, ReqEdns, parse_opt, write_opt};
use super::records::rtype;
use super::rrl::Verdict;
use super::stats::{Counter, Shard};
use super::wire::{Rendered, Shuffle, be16, skip_name};
use super::zone::{InstanceAnswer, Zone};
use std::collections::HashMap;
use std::sync::Arc;

/// Our advertised (and maximal) UDP payload size.
pub(crate) const EDNS_PAYLOAD: u16 = 1232;
/// Largest DNS message over TCP.
pub(crate) const TCP_MAX: usize = 65_535;
/// SIG resource record type (SIG(0) signed requests, RFC 2931).
const SIG: u16 = 24;
/// Bytes of an OPT record without options: root owner, type, payload, TTL, RDLENGTH.
const OPT_FIXED: usize = 11;

pub(crate) mod rcode {
    pub const FORMERR: u16 = 1;
    pub const NOTIMP: u16 = 4;
    pub const REFUSED: u16 = 5;
    pub const BADVERS: u16 = 16;
}

/// Small fast PRNG (wyrand) for the SRV order; one per receive loop, seeded from the OS.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new() -> Self {
        Rng(rand::random())
    }
    /// A generator with a fixed seed (tests, fuzzing: reproducible orders).
    pub(crate) fn seeded(s: u64) -> Self {
        Rng(s)
    }
    #[inline]
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }
    /// Uniform in `0..n` (n > 0); bias below 2^-32 for the n used here.
    #[inline]
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
    /// Uniform in (0, 1].
    #[inline]
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Per-loop reusable state: no allocation per query once warmed up.
pub(crate) struct Scratch {
    pub rng: Rng,
    order: Vec<u32>,
    keys: Vec<(bool, f64, u32)>,
    /// Slots in the order `write_shuffled` wrote them.
    written: Vec<u32>,
    /// Answers at membranes' own names rendered by this loop, keyed by zone generation,
    /// type and name: reused until the zone changes. Private to the loop (no lock); at
    /// most `cache_cap` entries, emptied when full.
    cache: HashMap<Box<[u8]>, InstanceAnswer>,
    cache_cap: usize,
    key: Vec<u8>,
    /// The response's OPT record, rendered before the rest (its size counts in the limit).
    opt: Vec<u8>,
}

impl Scratch {
    /// Scratch for a loop that keeps up to `cache_cap` rendered membrane answers.
    pub(crate) fn new(cache_cap: usize) -> Self {
        Scratch {
            rng: Rng::new(),
            order: Vec::with_capacity(64),
            keys: Vec::with_capacity(256),
            written: Vec::with_capacity(64),
            cache: HashMap::new(),
            cache_cap,
            key: Vec::with_capacity(8 + 2 + 255),
            opt: Vec::with_capacity(64),
        }
    }

    /// The answer at a membrane's own `name` in `zone`: from this loop's cache when the
    /// zone has not changed since it was rendered.
    fn instance_answer(&mut self, zone: &Zone, name: &[u8], qtype: u16) -> InstanceAnswer {
        if self.cache_cap == 0 {
            return zone.instance_answer(name, qtype);
        }
        self.key.clear();
        self.key.extend_from_slice(&zone.generation.to_le_bytes());
        self.key.extend_from_slice(&qtype.to_le_bytes());
        self.key.extend_from_slice(name);
        if let Some(a) = self.cache.get(self.key.as_slice()) {
            return a.clone();
        }
        let a = zone.instance_answer(name, qtype);
        if self.cache.len() >= self.cache_cap {
            self.cache.clear();
        }
        self.cache.insert(self.key.as_slice().into(), a.clone());
        a
    }
}

/// What was sent, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub rcode: u16,
    pub truncated: bool,
    /// Length of the question echoed after the header (0: none).
    qlen: usize,
    /// The request carried a valid server cookie: its source address is proven.
    verified: bool,
}

impl Outcome {
    fn new(rcode: u16, truncated: bool, qlen: usize) -> Self {
        Outcome {
            rcode,
            truncated,
            qlen,
            verified: false,
        }
    }
}

/// A query as the minimal parser sees it.
struct Parsed<'a> {
    id: u16,
    flags: u16,
    /// Raw question (name as sent, type, class).
    question: &'a [u8],
    /// Lowercase question name.
    lower: [u8; 255],
    qname_len: usize,
    /// Offsets of the labels in the name.
    labels: [u8; 128],
    nlabels: usize,
    qtype: u16,
    qclass: u16,
    edns: Option<ReqEdns>,
}

enum ParseError {
    /// Too broken to answer.
    Drop,
    /// Answer with this rcode, echoing the question if there is one, with an OPT record
    /// when the request had one (RFC 6891 6.1.1), carrying `ede` if set.
    Fail {
        rcode: u16,
        question: Option<usize>,
        edns: Option<ReqEdns>,
        ede: Option<(u16, &'static str)>,
    },
    /// Needs the full parser.
    Slow,
}

/// Finds the OPT record of a request the minimal parser gave up on (several questions,
/// another opcode, a signature), so that the error response can carry one too.
fn scan_opt(req: &[u8]) -> Option<ReqEdns> {
    let (j, end) = opt_range(req)?;
    let ttl = u32::from_be_bytes([req[j + 4], req[j + 5], req[j + 6], req[j + 7]]);
    Some(parse_opt(be16(req, j + 2), ttl, &req[j + 10..end]).unwrap_or_else(|e| e))
}

/// The OPT record of a request without a question when it is the only record there and
/// carries a well-formed COOKIE (RFC 7873 5.4: a query for a server cookie).
fn cookie_only(req: &[u8]) -> Option<ReqEdns> {
    let (j, end) = opt_range(req)?;
    if be16(req, 10) != 1 || j != 13 || end != req.len() {
        return None;
    }
    let ttl = u32::from_be_bytes([req[j + 4], req[j + 5], req[j + 6], req[j + 7]]);
    parse_opt(be16(req, j + 2), ttl, &req[j + 10..end])
        .ok()
        .filter(|e| e.cookie.is_some())
}

/// Where the OPT record of the additional section lies: from its TYPE to its end.
fn opt_range(req: &[u8]) -> Option<(usize, usize)> {
    additional_range(req, |t| t == rtype::OPT)
}

/// Where the first record of the additional section whose type `want` accepts lies: from
/// its TYPE to its end.
fn additional_range(req: &[u8], want: impl Fn(u16) -> bool) -> Option<(usize, usize)> {
    let (qd, an, ns, ar) = (be16(req, 4), be16(req, 6), be16(req, 8), be16(req, 10));
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(req, i)? + 4;
        if i > req.len() {
            return None;
        }
    }
    let before = u32::from(an) + u32::from(ns);
    for k in 0..before + u32::from(ar) {
        let j = skip_name(req, i)?;
        if j + 10 > req.len() {
            return None;
        }
        let end = j + 10 + usize::from(be16(req, j + 8));
        if end > req.len() {
            return None;
        }
        if k >= before && want(be16(req, j)) {
            return Some((j, end));
        }
        i = end;
    }
    None
}

fn parse(req: &[u8]) -> Result<Parsed<'_>, ParseError> {
    if req.len() < 12 {
        return Err(ParseError::Drop);
    }
    let flags = be16(req, 2);
    if flags & 0x8000 != 0 {
        // A response: never answer it (no reflection loops).
        return Err(ParseError::Drop);
    }
    let opcode = (flags >> 11) & 0xF;
    let (qd, an, ns, ar) = (be16(req, 4), be16(req, 6), be16(req, 8), be16(req, 10));
    let not_supported = Some((edns::ede::NOT_SUPPORTED, "opcode not supported"));
    if qd == 0
        && opcode == 0
        && an == 0
        && ns == 0
        && let Some(e) = cookie_only(req)
    {
        // RFC 7873 5.4: no question but a COOKIE asks for a server cookie: NOERROR (the
        // reply's OPT carries one).
        return Err(ParseError::Fail {
            rcode: if e.version > 0 { rcode::BADVERS } else { 0 },
            question: None,
            edns: Some(e),
            ede: None,
        });
    }
    if qd != 1 {
        let (rcode, ede) = if opcode != 0 {
            (rcode::NOTIMP, not_supported)
        } else {
            (rcode::FORMERR, None)
        };
        return Err(ParseError::Fail {
            rcode,
            question: None,
            edns: scan_opt(req),
            ede,
        });
    }
    let mut p = Parsed {
        id: be16(req, 0),
        flags,
        question: &[],
        lower: [0; 255],
        qname_len: 0,
        labels: [0; 128],
        nlabels: 0,
        qtype: 0,
        qclass: 0,
        edns: None,
    };
    // A question too broken to echo: FORMERR, with an OPT when one can still be found.
    let formerr = || ParseError::Fail {
        rcode: rcode::FORMERR,
        question: None,
        edns: scan_opt(req),
        ede: None,
    };
    let mut i = 12;
    loop {
        let Some(&l) = req.get(i) else {
            return Err(formerr());
        };
        let pos = i - 12;
        if l == 0 {
            p.lower[pos] = 0;
            i += 1;
            break;
        }
        match l & 0xC0 {
            0x00 => {}
            0xC0 => return Err(ParseError::Slow),
            _ => return Err(formerr()),
        }
        let l = l as usize;
        if pos + 1 + l + 1 > 255 || i + 1 + l > req.len() {
            return Err(formerr());
        }
        p.labels[p.nlabels] = pos as u8;
        p.nlabels += 1;
        p.lower[pos] = l as u8;
        for (d, s) in p.lower[pos + 1..pos + 1 + l]
            .iter_mut()
            .zip(&req[i + 1..i + 1 + l])
        {
            *d = s.to_ascii_lowercase();
        }
        i += 1 + l;
    }
    p.qname_len = i - 12;
    if i + 4 > req.len() {
        return Err(formerr());
    }
    p.qtype = be16(req, i);
    p.qclass = be16(req, i + 2);
    i += 4;
    p.question = &req[12..i];
    let qlen = i - 12;
    let fail = |rcode: u16, edns: Option<ReqEdns>, ede| ParseError::Fail {
        rcode,
        question: Some(qlen),
        edns,
        ede,
    };
    if opcode != 0 {
        return Err(fail(rcode::NOTIMP, scan_opt(req), not_supported));
    }
    if an != 0 || ns != 0 {
        return Err(fail(rcode::FORMERR, scan_opt(req), None));
    }
    for _ in 0..ar {
        let start = i;
        let Some(j) = skip_name(req, i) else {
            return Err(fail(rcode::FORMERR, p.edns, None));
        };
        if j + 10 > req.len() {
            return Err(fail(rcode::FORMERR, p.edns, None));
        }
        let (t, class) = (be16(req, j), be16(req, j + 2));
        let ttl = u32::from_be_bytes([req[j + 4], req[j + 5], req[j + 6], req[j + 7]]);
        let rdlen = be16(req, j + 8) as usize;
        i = j + 10 + rdlen;
        if i > req.len() {
            return Err(fail(rcode::FORMERR, p.edns, None));
        }
        match t {
            rtype::OPT => {
                if p.edns.is_some() || j != start + 1 {
                    // RFC 6891: more than one OPT, or an OPT not owned by the root.
                    let e = p
                        .edns
                        .or_else(|| parse_opt(class, ttl, &req[j + 10..i]).ok());
                    return Err(fail(rcode::FORMERR, e, None));
                }
                match parse_opt(class, ttl, &req[j + 10..i]) {
                    Ok(e) => p.edns = Some(e),
                    // An option running past the OPT data (or a malformed COOKIE).
                    Err(e) => return Err(fail(rcode::FORMERR, Some(e), None)),
                }
            }
            // SIG(0), and TSIG on a request xfr.rs could not take (a compressed question
            // name, another opcode, several questions): not supported.
            super::tsig::TSIG | SIG => {
                return Err(fail(
                    rcode::NOTIMP,
                    p.edns.or_else(|| scan_opt(req)),
                    Some((edns::ede::NOT_SUPPORTED, "signed requests not supported")),
                ));
            }
            _ => {}
        }
    }
    Ok(p)
}

/// Re-encodes a request the minimal parser could not read (a compressed question name) in
/// plain form, using hickory-proto's full parser: the question, the OPT and a signature
/// (TSIG, SIG(0)), which [`parse`] then answers NOTIMP rather than the request being
/// answered unsigned. None: not a valid single-question message.
fn canonicalize(req: &[u8]) -> Option<Vec<u8>> {
    use hickory_proto::op::Message;
    let msg = Message::from_vec(req).ok()?;
    let [q] = msg.queries.as_slice() else {
        return None;
    };
    let opt = opt_range(req);
    let sig = additional_range(req, |t| t == super::tsig::TSIG || t == SIG);
    let ar = u8::from(opt.is_some()) + u8::from(sig.is_some());
    let mut out = Vec::with_capacity(req.len());
    out.extend_from_slice(&req[..4]);
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, ar]);
    for label in q.name().iter() {
        out.push(label.len() as u8);
        out.extend_from_slice(label);
    }
    out.push(0);
    out.extend_from_slice(&u16::from(q.query_type()).to_be_bytes());
    out.extend_from_slice(&u16::from(q.query_class()).to_be_bytes());
    // The OPT as sent (options, DO bit), then the signature, both owned by the root.
    for (j, end) in opt.into_iter().chain(sig) {
        out.push(0);
        out.extend_from_slice(&req[j..end]);
    }
    Some(out)
}

#[inline]
fn push16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Header of a response to a request with `req_flags`: QR, opcode, RD and CD echoed, RA clear.
#[allow(clippy::too_many_arguments)]
#[inline]
fn header(
    out: &mut Vec<u8>,
    id: u16,
    req_flags: u16,
    aa: bool,
    tc: bool,
    rcode: u16,
    qd: u16,
    counts: [u16; 3],
) {
    let flags = 0x8000
        | (req_flags & 0x7800)
        | if aa { 0x0400 } else { 0 }
        | if tc { 0x0200 } else { 0 }
        | (req_flags & 0x0100)
        | (req_flags & 0x0010)
        | (rcode & 0xF);
    push16(out, id);
    push16(out, flags);
    push16(out, qd);
    for c in counts {
        push16(out, c);
    }
}

/// Writes the answer records of `r` in RFC 2782 order: by priority, then a weighted random
/// order within each priority; stops before the first record that would take the output
/// past `budget` bytes (so a set too large for a message yields a weighted random subset).
/// Returns the number of records written.
fn write_shuffled(
    out: &mut Vec<u8>,
    body: &[u8],
    sh: &Shuffle,
    s: &mut Scratch,
    budget: usize,
) -> u16 {
    let limit = out.len().saturating_add(budget);
    let mut written = 0u16;
    s.written.clear();
    for &(gs, ge) in sh.groups.iter() {
        let slots = &sh.slots[gs as usize..ge as usize];
        let order = &mut s.written;
        let mut copy = |out: &mut Vec<u8>, k: usize| -> bool {
            let sl = slots[k];
            if out.len() + sl.len as usize > limit {
                return false;
            }
            out.extend_from_slice(&body[sl.off as usize..(sl.off + sl.len) as usize]);
            order.push(gs + k as u32);
            written += 1;
            true
        };
        if slots.len() == 1 {
            if !copy(out, 0) {
                return written;
            }
        } else if slots.len() <= 64 {
            // RFC 2782's selection: pick the first record whose running weight sum reaches
            // a uniform random number. The RFC draws it from [0, total], which favours the
            // first record by one unit and lets zero weights win with chance 1/(total+1);
            // drawing from [1, total] gives exactly weight/total, with zero weights after
            // all the others (in uniform random order among themselves).
            s.order.clear();
            s.order.extend(0..slots.len() as u32);
            let mut total: u64 = slots.iter().map(|x| u64::from(x.weight)).sum();
            while !s.order.is_empty() {
                let pick = if total == 0 {
                    s.rng.below(s.order.len() as u64) as usize
                } else {
                    let r = 1 + s.rng.below(total);
                    let mut run = 0u64;
                    let mut pick = s.order.len() - 1;
                    for (pos, &k) in s.order.iter().enumerate() {
                        run += u64::from(slots[k as usize].weight);
                        if run >= r {
                            pick = pos;
                            break;
                        }
                    }
                    pick
                };
                let k = s.order.remove(pick) as usize;
                total -= u64::from(slots[k].weight);
                if !copy(out, k) {
                    return written;
                }
            }
        } else {
            // Large groups: Efraimidis-Spirakis sampling (exponential keys of rate weight),
            // the same distribution as repeated weighted selection, in O(n log n); zero
            // weights last, in uniform random order.
            s.keys.clear();
            for (k, sl) in slots.iter().enumerate() {
                let u = s.rng.unit();
                let key = if sl.weight == 0 {
                    (true, u)
                } else {
                    (false, -u.ln() / f64::from(sl.weight))
                };
                s.keys.push((key.0, key.1, k as u32));
            }
            s.keys.sort_unstable_by(|a, b| {
                a.0.cmp(&b.0)
                    .then(a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal))
            });
            for i in 0..s.keys.len() {
                let k = s.keys[i].2 as usize;
                if !copy(out, k) {
                    return written;
                }
            }
        }
    }
    written
}

/// Seconds since the Unix epoch, for cookie timestamps (RFC 9018 serial arithmetic wraps).
fn unix_now() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0)
}

impl Catalog {
    /// Renders into `s.opt` the OPT record answering `e` (nothing without one): DO
    /// copied, NSID if asked for and configured, a fresh server cookie for a client
    /// cookie, and `ede`. Returns whether the request's server cookie was valid.
    fn render_opt(
        &self,
        s: &mut Scratch,
        e: Option<&ReqEdns>,
        rcode: u16,
        peer: IpAddr,
        ede: Option<(u16, &'static str)>,
    ) -> bool {
        s.opt.clear();
        let Some(e) = e else {
            return false;
        };
        let mut verified = false;
        let cookie = e.cookie.map(|c| {
            let now = unix_now();
            verified = self.edns.cookie_valid(&c, peer, now);
            (c.client, self.edns.server_cookie(&c.client, peer, now))
        });
        let extras = OptExtras {
            nsid: if e.nsid {
                self.edns.nsid.as_deref()
            } else {
                None
            },
            cookie,
            ede,
        };
        write_opt(&mut s.opt, EDNS_PAYLOAD, rcode, e.dnssec_ok, &extras);
        verified
    }

    /// Accounts one UDP response to `peer` with the rate limiter ([`super::rrl`]).
    pub(crate) fn rate_limit(&self, peer: IpAddr) -> Verdict {
        self.rrl.check(peer, self.started.elapsed().as_secs())
    }

    /// Answers the request `req` from `peer` into `out` (cleared first). None: send
    /// nothing.
    pub(crate) fn respond(
        &self,
        req: &[u8],
        tcp: bool,
        peer: IpAddr,
        out: &mut Vec<u8>,
        s: &mut Scratch,
        shard: &Shard,
    ) -> Option<Outcome> {
        self.respond_reserving(req, tcp, 0, peer, out, s, shard)
    }

    /// [`Catalog::respond`] with the answer kept `reserve` bytes under the size limit:
    /// room for a record appended afterwards (the TSIG of a signed answer), so that the
    /// whole still fits the client's UDP limit or a TCP message.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn respond_reserving(
        &self,
        req: &[u8],
        tcp: bool,
        reserve: usize,
        peer: IpAddr,
        out: &mut Vec<u8>,
        s: &mut Scratch,
        shard: &Shard,
    ) -> Option<Outcome> {
        out.clear();
        let fail = |s: &mut Scratch,
                    out: &mut Vec<u8>,
                    rcode: u16,
                    q: Option<&[u8]>,
                    edns: Option<ReqEdns>,
                    ede| {
            let verified = self.render_opt(s, edns.as_ref(), rcode, peer, ede);
            header(
                out,
                be16(req, 0),
                be16(req, 2),
                false,
                false,
                rcode,
                u16::from(q.is_some()),
                [0, 0, u16::from(!s.opt.is_empty())],
            );
            if let Some(q) = q {
                out.extend_from_slice(q);
            }
            out.extend_from_slice(&s.opt);
            Outcome {
                verified,
                ..Outcome::new(rcode, false, q.map_or(0, <[u8]>::len))
            }
        };
        let mut res = match parse(req) {
            Ok(p) => Some(self.answer(&p, tcp, reserve, peer, out, s)),
            Err(ParseError::Drop) => None,
            Err(ParseError::Fail {
                rcode,
                question,
                edns,
                ede,
            }) => {
                let q = question.map(|l| &req[12..12 + l]);
                Some(fail(s, out, rcode, q, edns, ede))
            }
            Err(ParseError::Slow) => match canonicalize(req) {
                Some(c) => match parse(&c) {
                    Ok(p) => Some(self.answer(&p, tcp, reserve, peer, out, s)),
                    Err(ParseError::Fail {
                        rcode,
                        question,
                        edns,
                        ede,
                    }) => {
                        let q = question.map(|l| &c[12..12 + l]);
                        Some(fail(s, out, rcode, q, edns, ede))
                    }
                    Err(_) => None,
                },
                None => Some(fail(s, out, rcode::FORMERR, None, scan_opt(req), None)),
            },
        };
        shard.add(if tcp {
            Counter::QueriesTcp
        } else {
            Counter::QueriesUdp
        });
        // Response rate limiting: UDP only, unless the source proved itself with a cookie.
        if !tcp
            && let Some(o) = res
            && !o.verified
        {
            match self.rate_limit(peer) {
                Verdict::Send => {}
                Verdict::Slip => {
                    // Header and question only, plus a bare OPT (payload, extended rcode,
                    // DO; no NSID, cookie or EDE): no larger than the query.
                    out.truncate(12 + o.qlen);
                    out[2] |= 0x02;
                    out[6..12].copy_from_slice(&[0, 0, 0, 0, 0, u8::from(!s.opt.is_empty())]);
                    if let Some(fixed) = s.opt.get(..OPT_FIXED - 2) {
                        out.extend_from_slice(fixed);
                        out.extend_from_slice(&[0, 0]);
                    }
                    shard.add(Counter::RateLimited);
                    res = Some(Outcome {
                        truncated: true,
                        ..o
                    });
                }
                Verdict::Drop => {
                    shard.add(Counter::RateLimited);
                    return None;
                }
            }
        }
        match res {
            Some(o) => {
                shard.add(Counter::for_rcode(o.rcode));
                if o.truncated {
                    shard.add(Counter::Truncated);
                }
            }
            None => shard.add(Counter::Dropped),
        }
        res
    }

    /// The answer to `p`, at most the transport's limit less `reserve` bytes.
    fn answer(
        &self,
        p: &Parsed<'_>,
        tcp: bool,
        reserve: usize,
        peer: IpAddr,
        out: &mut Vec<u8>,
        s: &mut Scratch,
    ) -> Outcome {
        let qlen = p.question.len();
        let fail = |out: &mut Vec<u8>, s: &mut Scratch, rcode: u16, ede| {
            let verified = self.render_opt(s, p.edns.as_ref(), rcode, peer, ede);
            header(
                out,
                p.id,
                p.flags,
                false,
                false,
                rcode,
                1,
                [0, 0, u16::from(!s.opt.is_empty())],
            );
            out.extend_from_slice(p.question);
            out.extend_from_slice(&s.opt);
            Outcome {
                verified,
                ..Outcome::new(rcode, false, qlen)
            }
        };
        let not_auth = Some((edns::ede::NOT_AUTHORITATIVE, ""));
        if let Some(e) = p.edns
            && e.version > 0
        {
            return fail(out, s, rcode::BADVERS, None);
        }
        if p.qclass != 1 {
            return fail(
                out,
                s,
                rcode::REFUSED,
                Some((edns::ede::NOT_SUPPORTED, "class not served")),
            );
        }
        // Meta types. Transfers are answered by xfr.rs; one reaching here is a request it
        // could not take (a compressed question name, say): NOTIMP.
        match p.qtype {
            0 => return fail(out, s, rcode::FORMERR, None),
            rtype::IXFR | rtype::AXFR | rtype::MAILA | rtype::MAILB => {
                return fail(
                    out,
                    s,
                    rcode::NOTIMP,
                    Some((edns::ede::NOT_SUPPORTED, "query type not supported")),
                );
            }
            _ => {}
        }
        // Zone: the label just before the suffix.
        let k = self.suffix_labels;
        if p.nlabels <= k {
            return fail(out, s, rcode::REFUSED, not_auth);
        }
        let suffix_at = if k == 0 {
            p.qname_len - 1
        } else {
            p.labels[p.nlabels - k] as usize
        };
        if p.lower[suffix_at..p.qname_len] != self.naming.suffix[..] {
            return fail(out, s, rcode::REFUSED, not_auth);
        }
        let zl = p.labels[p.nlabels - k - 1] as usize;
        let zone_label = &p.lower[zl + 1..zl + 1 + p.lower[zl] as usize];
        let zones = self.zones.read().unwrap_or_else(|e| e.into_inner());
        let Some(zone) = zones.get(zone_label) else {
            drop(zones);
            return fail(out, s, rcode::REFUSED, not_auth);
        };
        // Pre-rendered names first, then the names membranes own (rendered now).
        let qname = &p.lower[..p.qname_len];
        let rendered: Arc<Rendered>;
        let node = zone.nodes.get(qname);
        let found = node.and_then(|node| {
            if p.qtype == rtype::ANY {
                node.any()
            } else {
                node.get(p.qtype)
            }
        });
        let r: &Rendered = match found {
            Some(r) => r,
            None => match s.instance_answer(zone, qname, p.qtype) {
                InstanceAnswer::Found(x) => {
                    rendered = x;
                    &rendered
                }
                InstanceAnswer::NoData => &zone.nodata,
                InstanceAnswer::NoName if node.is_some() => &zone.nodata,
                InstanceAnswer::NoName => &zone.nxdomain,
            },
        };
        let rcode = u16::from(r.rcode);
        let verified = self.render_opt(s, p.edns.as_ref(), rcode, peer, None);
        let limit = if tcp {
            TCP_MAX
        } else if let Some(e) = p.edns {
            usize::from(e.payload.clamp(512, EDNS_PAYLOAD))
        } else {
            512
        }
        .saturating_sub(reserve);
        let opt_count = u16::from(!s.opt.is_empty());
        let base = 12 + qlen + s.opt.len();
        let budget = limit.saturating_sub(base);
        let an_ns = r.an_ns_len as usize;
        let at = out.len();
        header(out, p.id, p.flags, true, false, rcode, 1, [0; 3]);
        out.extend_from_slice(p.question);
        let (ancount, nscount, arcount, tc) = if an_ns <= budget {
            match &r.shuffle {
                Some(sh) if sh.always => {
                    write_shuffled(out, &r.body, sh, s, usize::MAX);
                    out.extend_from_slice(&r.body[sh.end as usize..an_ns]);
                }
                _ => out.extend_from_slice(&r.body[..an_ns]),
            }
            // Additional: the whole RRsets that fit (RFC 2181 9: no TC for them); for a
            // shuffled SRV answer the targets' addresses in the order of the answer, else
            // in rendering order.
            let ar = if r.body.len() <= budget {
                out.extend_from_slice(&r.body[an_ns..]);
                r.arcount
            } else if let Some(sh) = r.shuffle.as_ref().filter(|sh| sh.always) {
                let max = at + 12 + qlen + budget;
                let mut n = 0;
                for &k in &s.written {
                    let sl = &sh.slots[k as usize];
                    if sl.ar_len > 0 && out.len() + sl.ar_len as usize <= max {
                        let o = sl.ar_off as usize;
                        out.extend_from_slice(&r.body[o..o + sl.ar_len as usize]);
                        n += sl.ar_n;
                    }
                }
                n
            } else {
                let (end, ar) = r
                    .ar_cuts
                    .iter()
                    .rev()
                    .find(|(end, _)| *end as usize <= budget)
                    .copied()
                    .unwrap_or((an_ns as u32, 0));
                out.extend_from_slice(&r.body[an_ns..end as usize]);
                ar
            };
            (r.ancount, r.nscount, ar, false)
        } else if let (true, Some(sh), 0) = (tcp, &r.shuffle, r.nscount) {
            // More than a TCP message holds: a weighted random subset of the records.
            let n = write_shuffled(out, &r.body, sh, s, budget);
            // Not even one record fits: TC rather than an answer that looks like NODATA.
            (n, 0, 0, n == 0)
        } else {
            (0, 0, 0, true)
        };
        drop(zones);
        let counts = [ancount, nscount, arcount + opt_count];
        for (i, c) in counts.iter().enumerate() {
            out[at + 6 + 2 * i..at + 8 + 2 * i].copy_from_slice(&c.to_be_bytes());
        }
        if tc {
            out[at + 2] |= 0x02;
        }
        out.extend_from_slice(&s.opt);
        Outcome {
            verified,
            ..Outcome::new(rcode, tc, qlen)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::wire::SrvSlot;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// Mutated and random packets never panic the parser, and every answer is a message
    /// hickory-proto can parse, with the request's id.
    #[test]
    fn garbage_never_panics() {
        use std::sync::Arc;

        use shared::model::{Proto, Registration, ServiceSpec};
        use shared::{MembraneId, NamespaceName, NamespaceSettings, ServiceName};

        use crate::dns::{Catalog, DnsConfig};
        use crate::snapshot::{Instance, NamespaceSnapshot};

        let catalog = Catalog::new(DnsConfig::default()).unwrap();
        catalog.update(&NamespaceSnapshot {
            name: NamespaceName::new("ns").unwrap(),
            settings: NamespaceSettings::default(),
            instances: (0..40)
                .map(|i| Instance {
                    id: MembraneId::new(&format!("m{i}")).unwrap(),
                    registration: Arc::new(Registration {
                        addresses: vec![std::net::IpAddr::from([10, 0, 0, i as u8])],
                        services: vec![ServiceSpec {
                            name: ServiceName::new("web").unwrap(),
                            proto: Proto::Tcp,
                            port: 80,
                            priority: (i % 3) as u16,
                            weight: i as u16,
                        }],
                        ..Default::default()
                    }),
                })
                .map(Arc::new)
                .collect(),
            serial: 1,
        });
        let valid: Vec<Vec<u8>> = [
            ("_web._tcp.ns.", hickory_proto::rr::RecordType::SRV),
            ("m1.ns.", hickory_proto::rr::RecordType::A),
            ("nope.ns.", hickory_proto::rr::RecordType::TXT),
        ]
        .iter()
        .map(|(n, t)| {
            let mut m = hickory_proto::op::Message::query();
            m.add_query(hickory_proto::op::Query::query(
                hickory_proto::rr::Name::from_ascii(n).unwrap(),
                *t,
            ));
            m.set_edns(hickory_proto::op::Edns::new());
            m.to_vec().unwrap()
        })
        .collect();
        let shard = Shard::default();
        let mut s = Scratch::new(64);
        let mut rng = Rng::seeded(9);
        let mut out = Vec::new();
        let mut answered = 0;
        for round in 0..60_000 {
            let mut pkt = valid[round % valid.len()].clone();
            match rng.below(4) {
                0 => {
                    // Flip a few bytes.
                    for _ in 0..=rng.below(4) {
                        let i = rng.below(pkt.len() as u64) as usize;
                        pkt[i] = rng.next() as u8;
                    }
                }
                1 => pkt.truncate(rng.below(pkt.len() as u64 + 1) as usize),
                2 => {
                    let n = rng.below(80) as usize;
                    pkt = (0..n).map(|_| rng.next() as u8).collect();
                }
                _ => {
                    let i = rng.below(pkt.len() as u64) as usize;
                    pkt[i] = 0xC0 | (rng.next() as u8 & 0x3F);
                }
            }
            let tcp = round % 2 == 0;
            if catalog
                .respond(&pkt, tcp, LOCAL, &mut out, &mut s, &shard)
                .is_some()
            {
                answered += 1;
                assert!(out.len() >= 12 && out[..2] == pkt[..2], "{pkt:?}");
                assert!(tcp || out.len() <= 1232, "{pkt:?}");
                if let Err(e) = hickory_proto::op::Message::from_vec(&out) {
                    panic!("unparsable answer {out:?} to {pkt:?}: {e}");
                }
            }
        }
        assert!(answered > 10_000, "{answered}");
    }

    /// Found by fuzzing (dns_query): a request with another opcode than QUERY and a
    /// compressed question name went unanswered; it gets NOTIMP like any other.
    #[test]
    fn compressed_name_with_another_opcode_gets_notimp() {
        use crate::dns::{Catalog, DnsConfig};
        let catalog = Catalog::new(DnsConfig::default()).unwrap();
        // IQUERY for `.` A, the name a pointer to offset 11 (ARCOUNT's low byte: 0, the
        // root), as the fuzzer found it.
        let req = [0, 7, 0x08, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0, 11, 0, 1, 0, 1];
        let mut out = Vec::new();
        let o = catalog.respond(
            &req,
            false,
            LOCAL,
            &mut out,
            &mut Scratch::new(0),
            &Shard::default(),
        );
        assert_eq!(o.map(|o| o.rcode), Some(rcode::NOTIMP));
        let m = hickory_proto::op::Message::from_vec(&out).unwrap();
        assert_eq!(m.metadata.id, 7);
        assert_eq!(m.queries[0].name().to_ascii(), ".");
    }

    /// The per-loop cache of membrane answers stays within its bound and never serves an
    /// answer rendered before a change of the zone.
    #[test]
    fn membrane_answer_cache_is_bounded_and_follows_changes() {
        use std::sync::Arc;

        use hickory_proto::op::{Message, Query};
        use hickory_proto::rr::{Name, RData, RecordType};
        use shared::model::Registration;
        use shared::{MembraneId, NamespaceName, NamespaceSettings};

        use crate::dns::{Catalog, DnsConfig};
        use crate::snapshot::{Instance, NamespaceSnapshot};

        let snap = |serial: u32, last: u8| NamespaceSnapshot {
            name: NamespaceName::new("ns").unwrap(),
            settings: NamespaceSettings::default(),
            instances: (0..20u8)
                .map(|i| Instance {
                    id: MembraneId::new(&format!("m{i:02}")).unwrap(),
                    registration: Arc::new(Registration {
                        addresses: vec![std::net::IpAddr::from([10, 0, last, i])],
                        ..Default::default()
                    }),
                })
                .map(Arc::new)
                .collect(),
            serial,
        };
        let catalog = Catalog::new(DnsConfig::default()).unwrap();
        catalog.update(&snap(1, 1));
        let shard = Shard::default();
        let mut s = Scratch::new(8);
        let mut out = Vec::new();
        let mut ask = |s: &mut Scratch, name: &str| -> Vec<String> {
            let mut m = Message::query();
            m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
            catalog.respond(&m.to_vec().unwrap(), false, LOCAL, &mut out, s, &shard);
            Message::from_vec(&out)
                .unwrap()
                .answers
                .iter()
                .map(|r| match &r.data {
                    RData::A(a) => a.to_string(),
                    other => format!("{other:?}"),
                })
                .collect()
        };
        for round in 0..3 {
            for i in 0..20 {
                assert_eq!(
                    ask(&mut s, &format!("m{i:02}.ns.")),
                    [format!("10.0.1.{i}")],
                    "round {round}"
                );
                assert!(s.cache.len() <= 8);
            }
        }
        assert_eq!(ask(&mut s, "m19.ns."), ["10.0.1.19"]);
        catalog.update(&snap(2, 2));
        assert_eq!(ask(&mut s, "m19.ns."), ["10.0.2.19"]);
        assert!(ask(&mut s, "m20.ns.").is_empty());
    }

    /// A raw query for `name` type `t` with an OPT (payload 1232) carrying `options`.
    fn raw_query(name: &str, t: u16, options: &[u8]) -> Vec<u8> {
        let mut q = vec![0x55, 0x66, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1];
        for l in name.split('.').filter(|l| !l.is_empty()) {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&t.to_be_bytes());
        q.extend_from_slice(&[0, 1, 0, 0, 41, 0x04, 0xD0, 0, 0, 0, 0]);
        q.extend_from_slice(&(options.len() as u16).to_be_bytes());
        q.extend_from_slice(options);
        q
    }

    /// UDP answers over the limit are dropped or, every `slip`-th, sent truncated and no
    /// larger than the query, whatever the answer's size (a TXT padded to ~1 KB: ~20x);
    /// TCP, another /24 and a valid server cookie are not limited.
    #[tokio::test(start_paused = true)]
    async fn rate_limit_bounds_udp_reflection() {
        use std::sync::Arc;

        use shared::model::Registration;
        use shared::{MembraneId, NamespaceName, NamespaceSettings};

        use crate::dns::{Catalog, DnsConfig, RateLimit};
        use crate::snapshot::{Instance, NamespaceSnapshot};

        let catalog = Catalog::new(DnsConfig {
            rate_limit: RateLimit {
                responses_per_second: 5,
                slip: 2,
            },
            ..Default::default()
        })
        .unwrap();
        catalog.update(&NamespaceSnapshot {
            name: NamespaceName::new("ns").unwrap(),
            settings: NamespaceSettings::default(),
            instances: vec![Arc::new(Instance {
                id: MembraneId::new("pad").unwrap(),
                registration: Arc::new(Registration {
                    addresses: vec![std::net::IpAddr::from([10, 0, 0, 1])],
                    services: vec![shared::model::ServiceSpec {
                        name: shared::ServiceName::new("api").unwrap(),
                        proto: shared::model::Proto::Tcp,
                        port: 80,
                        priority: 0,
                        weight: 1,
                    }],
                    metadata: std::collections::BTreeMap::from([(
                        "k".to_string(),
                        "v".repeat(900),
                    )])
                    .into(),
                    ..Default::default()
                }),
            })],
            serial: 1,
        });
        let shard = &catalog.stats.shards[0];
        let mut s = Scratch::new(8);
        let mut out = Vec::new();
        let q = raw_query("pad._api._tcp.ns.", rtype::TXT, &[]);
        let victim: IpAddr = "192.0.2.10".parse().unwrap();
        let (mut full, mut slipped, mut dropped) = (0, 0, 0);
        for _ in 0..20 {
            match catalog.respond(&q, false, victim, &mut out, &mut s, shard) {
                None => dropped += 1,
                Some(o) if o.truncated => {
                    slipped += 1;
                    assert!(out.len() <= q.len(), "{} > {}", out.len(), q.len());
                    assert_eq!(out[2] & 0x02, 0x02, "TC");
                    assert_eq!(&out[6..10], &[0, 0, 0, 0], "no records");
                }
                Some(_) => {
                    full += 1;
                    assert!(out.len() > 15 * q.len(), "amplifying answer {}", out.len());
                }
            }
        }
        assert_eq!((full, slipped, dropped), (5, 7, 8));
        assert_eq!(catalog.stats().rate_limited, 15);
        // Same /24, other host: limited too. Another /24: its own budget.
        let near: IpAddr = "192.0.2.200".parse().unwrap();
        assert!(
            catalog
                .respond(&q, false, near, &mut out, &mut s, shard)
                .is_none_or(|o| o.truncated)
        );
        let other: IpAddr = "192.0.3.10".parse().unwrap();
        let o = catalog.respond(&q, false, other, &mut out, &mut s, shard);
        assert!(!o.unwrap().truncated);
        // TCP is never limited.
        for _ in 0..20 {
            let o = catalog.respond(&q, true, victim, &mut out, &mut s, shard);
            assert!(!o.unwrap().truncated);
        }
        // A valid server cookie proves the source: not limited either.
        let client = [4u8; 8];
        let sc = catalog.edns.server_cookie(&client, victim, unix_now());
        let mut opt = vec![0, 10, 0, 24];
        opt.extend_from_slice(&client);
        opt.extend_from_slice(&sc);
        let with_cookie = raw_query("pad._api._tcp.ns.", rtype::TXT, &opt);
        for _ in 0..20 {
            let o = catalog.respond(&with_cookie, false, victim, &mut out, &mut s, shard);
            assert!(!o.unwrap().truncated);
        }
        // A forged one does not.
        let mut forged = with_cookie.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert!(
            catalog
                .respond(&forged, false, victim, &mut out, &mut s, shard)
                .is_none_or(|o| o.truncated)
        );
        // The next second: a fresh budget.
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        let o = catalog.respond(&q, false, victim, &mut out, &mut s, shard);
        assert!(!o.unwrap().truncated);
    }

    /// Zone `ns.` with the one membrane `m1` (10.0.0.1).
    fn one_membrane() -> crate::snapshot::NamespaceSnapshot {
        use std::sync::Arc;

        use shared::model::Registration;
        use shared::{MembraneId, NamespaceName, NamespaceSettings};

        crate::snapshot::NamespaceSnapshot {
            name: NamespaceName::new("ns").unwrap(),
            settings: NamespaceSettings::default(),
            instances: vec![Arc::new(crate::snapshot::Instance {
                id: MembraneId::new("m1").unwrap(),
                registration: Arc::new(Registration {
                    addresses: vec![std::net::IpAddr::from([10, 0, 0, 1])],
                    ..Default::default()
                }),
            })],
            serial: 1,
        }
    }

    /// A slipped (TC) reply carries a bare OPT, DO copied and no options: the NSID (up to
    /// 128 bytes) and server cookie of the full answer would make it several times the
    /// query.
    #[tokio::test(start_paused = true)]
    async fn slipped_replies_carry_a_bare_opt() {
        use crate::dns::{Catalog, DnsConfig, RateLimit};

        let catalog = Catalog::new(DnsConfig {
            nsid: Some("n".repeat(edns::NSID_MAX)),
            rate_limit: RateLimit {
                responses_per_second: 1,
                slip: 1,
            },
            ..Default::default()
        })
        .unwrap();
        catalog.update(&one_membrane());
        let shard = Shard::default();
        let mut s = Scratch::new(0);
        let mut out = Vec::new();
        // NSID asked for, a client cookie, DO set.
        let mut options = vec![0, 3, 0, 0, 0, 10, 0, 8];
        options.extend_from_slice(&[7; 8]);
        let mut q = raw_query("m1.ns.", rtype::A, &options);
        let flags_at = q.len() - options.len() - 4;
        q[flags_at] |= 0x80;
        let victim: IpAddr = "192.0.2.10".parse().unwrap();
        let o = catalog.respond(&q, false, victim, &mut out, &mut s, &shard);
        assert!(!o.unwrap().truncated);
        assert!(out.len() > q.len() + edns::NSID_MAX, "{}", out.len());
        let o = catalog.respond(&q, false, victim, &mut out, &mut s, &shard);
        assert!(o.unwrap().truncated);
        assert!(out.len() <= q.len(), "{} > {}", out.len(), q.len());
        assert_eq!(&out[6..12], &[0, 0, 0, 0, 0, 1], "the OPT alone");
        let opt = &out[out.len() - 11..];
        assert_eq!(&opt[..3], &[0, 0, 41]);
        assert_eq!(opt[7] & 0x80, 0x80, "DO copied");
        assert_eq!(&opt[9..], &[0, 0], "no options");
    }

    /// RFC 7873 5.4: a QUERY without a question but with a COOKIE asks for a server
    /// cookie: NOERROR, with one. Without a COOKIE it stays FORMERR.
    #[test]
    fn a_cookie_without_a_question_gets_a_server_cookie() {
        use crate::dns::{Catalog, DnsConfig};

        let catalog = Catalog::new(DnsConfig::default()).unwrap();
        let (shard, mut s, mut out) = (Shard::default(), Scratch::new(0), Vec::new());
        let only_opt = |options: &[u8]| {
            let mut q = vec![0x55, 0x66, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
            q.extend_from_slice(&[0, 0, 41, 0x04, 0xD0, 0, 0, 0, 0]);
            q.extend_from_slice(&(options.len() as u16).to_be_bytes());
            q.extend_from_slice(options);
            q
        };
        let mut cookie = vec![0, 10, 0, 8];
        cookie.extend_from_slice(&[7; 8]);
        let o = catalog.respond(&only_opt(&cookie), false, LOCAL, &mut out, &mut s, &shard);
        assert_eq!(o.map(|o| o.rcode), Some(0));
        assert_eq!(&out[4..12], &[0, 0, 0, 0, 0, 0, 0, 1]);
        // The OPT: COOKIE, the client cookie and an RFC 9018 server cookie.
        assert_eq!(&out[12 + 11..12 + 15], &[0, 10, 0, 24]);
        assert_eq!(&out[12 + 15..12 + 23], &[7; 8]);
        let mut back = vec![0, 10, 0, 24];
        back.extend_from_slice(&out[12 + 15..12 + 39]);
        // Sent back: still NOERROR, and it proves the source.
        let o = catalog.respond(&only_opt(&back), false, LOCAL, &mut out, &mut s, &shard);
        assert_eq!(o.map(|o| (o.rcode, o.verified)), Some((0, true)));
        // No COOKIE, or a malformed one: FORMERR.
        for options in [
            &[][..],
            &[0, 3, 0, 0],
            &[0, 10, 0, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        ] {
            let o = catalog.respond(&only_opt(options), false, LOCAL, &mut out, &mut s, &shard);
            assert_eq!(o.map(|o| o.rcode), Some(rcode::FORMERR), "{options:?}");
        }
    }

    /// A TSIG-signed query with a compressed question name (which xfr.rs cannot take) is
    /// answered NOTIMP like any signed request it cannot take, not answered unsigned.
    #[test]
    fn signed_query_with_a_compressed_name_gets_notimp() {
        use crate::dns::tsig::{Signer, TsigKey};
        use crate::dns::{Catalog, DnsConfig};

        let catalog = Catalog::new(DnsConfig::default()).unwrap();
        catalog.update(&one_membrane());
        let (shard, mut s, mut out) = (Shard::default(), Scratch::new(0), Vec::new());
        // `m1.ns.` A, the name ending in a pointer to offset 10 (ARCOUNT's high byte: 0,
        // the root), then an OPT.
        let mut q = vec![1, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1];
        q.extend_from_slice(b"\x02m1\x02ns\xC0\x0A\x00\x01\x00\x01");
        q.extend_from_slice(&[0, 0, 41, 0x04, 0xD0, 0, 0, 0, 0, 0, 0]);
        let o = catalog.respond(&q, false, LOCAL, &mut out, &mut s, &shard);
        assert_eq!(o.map(|o| o.rcode), Some(0), "unsigned: answered");
        let key: TsigKey = "k:hmac-sha256:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
            .parse()
            .unwrap();
        Signer::for_request(&key, 0).sign(&mut q);
        assert!(crate::dns::xfr::scan(&q).is_none(), "not for xfr.rs");
        let o = catalog.respond(&q, false, LOCAL, &mut out, &mut s, &shard);
        assert_eq!(o.map(|o| o.rcode), Some(rcode::NOTIMP));
        let m = hickory_proto::op::Message::from_vec(&out).unwrap();
        assert!(m.answers.is_empty());
        assert_eq!(m.queries[0].name().to_ascii(), "m1.ns.");
        assert_eq!(&out[6..12], &[0, 0, 0, 0, 0, 1], "the OPT, no signature");
    }

    fn shuffle_counts(weights: &[u16], rounds: usize) -> Vec<Vec<usize>> {
        // Body: one byte per record, the byte being its index.
        let body: Vec<u8> = (0..weights.len() as u8).collect();
        let sh = Shuffle {
            slots: weights
                .iter()
                .enumerate()
                .map(|(i, &w)| SrvSlot {
                    off: i as u32,
                    len: 1,
                    weight: w,
                    ar_n: 0,
                    ar_off: 0,
                    ar_len: 0,
                })
                .collect(),
            groups: vec![(0, weights.len() as u32)].into_boxed_slice(),
            always: true,
            end: weights.len() as u32,
        };
        let mut s = Scratch::new(64);
        s.rng = Rng::seeded(42);
        // counts[record][position]
        let mut counts = vec![vec![0usize; weights.len()]; weights.len()];
        let mut out = Vec::new();
        for _ in 0..rounds {
            out.clear();
            write_shuffled(&mut out, &body, &sh, &mut s, usize::MAX);
            let mut seen = out.clone();
            seen.sort();
            assert_eq!(seen, body, "every record exactly once");
            for (pos, &rec) in out.iter().enumerate() {
                counts[rec as usize][pos] += 1;
            }
        }
        counts
    }

    #[test]
    fn weighted_order_small_group() {
        // Weights 10:30:60: the first position follows the weights (RFC 2782).
        let n = 60_000;
        let c = shuffle_counts(&[10, 30, 60], n);
        for (rec, w) in [(0, 0.1), (1, 0.3), (2, 0.6)] {
            let got = c[rec][0] as f64 / n as f64;
            assert!((got - w).abs() < 0.01, "record {rec} first {got}, want {w}");
        }
        // Zero weight: after the weighted ones.
        let c = shuffle_counts(&[0, 50, 50], 20_000);
        assert_eq!(c[0][2], 20_000, "{:?}", c[0]);
        let f = c[1][0] as f64 / 20_000.0;
        assert!((f - 0.5).abs() < 0.02, "{f}");
        // Only zero weights: uniform.
        let c = shuffle_counts(&[0, 0, 0], 30_000);
        for rec in &c {
            for &cnt in rec {
                assert!((cnt as f64 / 30_000.0 - 1.0 / 3.0).abs() < 0.02, "{c:?}");
            }
        }
    }

    #[test]
    fn weighted_order_large_group() {
        // 100 records: 99 of weight 1 and one of weight 99: the heavy one first half the time.
        let mut w = vec![1u16; 100];
        w[7] = 99;
        let n = 20_000;
        let c = shuffle_counts(&w, n);
        let first = c[7][0] as f64 / n as f64;
        assert!((first - 0.5).abs() < 0.02, "{first}");
        // A weight-1 record is first about 1/198 of the time and spread over positions.
        let light_first = c[3][0] as f64 / n as f64;
        assert!(light_first < 0.02, "{light_first}");
    }

    #[test]
    fn equal_weights_are_uniform() {
        let n = 40_000;
        let c = shuffle_counts(&[10, 10, 10, 10], n);
        for rec in c.iter() {
            for &cnt in rec {
                let f = cnt as f64 / n as f64;
                assert!((f - 0.25).abs() < 0.015, "{c:?}");
            }
        }
    }
}
