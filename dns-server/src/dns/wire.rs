//! Pre-rendered answers: the answer, authority and additional sections of a response in
//! wire format, ready to follow a header and the question.
//!
//! Every name is compressed only against the question name, which always sits at offset 12
//! and has the same length whatever the case the client used, so each rendered record is
//! position independent: records can be copied in any order (the SRV weighted shuffle)
//! after any question of the same name, and a whole section can be dropped.

use super::records::{RData, label_offsets, rtype};

/// Offset of the question name in every message.
pub(crate) const QNAME_OFFSET: usize = 12;

/// The big-endian u16 at `i` (the caller checked the bounds).
#[inline]
pub(crate) fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

/// Skips a (possibly compressed) name at `i`; returns the offset after it. None: it runs
/// past the message or uses a reserved label type.
pub(crate) fn skip_name(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let l = *b.get(i)?;
        match l & 0xC0 {
            0x00 if l == 0 => return Some(i + 1),
            0x00 => i += 1 + l as usize,
            0xC0 => return (i + 2 <= b.len()).then_some(i + 2),
            _ => return None,
        }
    }
}

/// One SRV record of a shuffled answer: where it lies in the body and its weight.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SrvSlot {
    pub off: u32,
    pub len: u32,
    pub weight: u16,
    /// Records in the additional section for this SRV record's target (its addresses,
    /// when no earlier record has the same target): count, offset and length in the body.
    pub ar_n: u16,
    pub ar_off: u32,
    pub ar_len: u32,
}

/// The answer records of a set of more than one, grouped by priority (ascending), for the
/// RFC 2782 order of SRV answers and for the weighted random subset of a set too large for
/// one message (other types: one group, equal weights).
#[derive(Debug, Clone)]
pub(crate) struct Shuffle {
    pub slots: Box<[SrvSlot]>,
    /// `[start, end)` ranges of `slots`, one per priority, in ascending priority.
    pub groups: Box<[(u32, u32)]>,
    /// Shuffle every answer (SRV); otherwise only to pick a subset.
    pub always: bool,
    /// End of the last answer record in the body.
    pub end: u32,
}

/// A pre-rendered response body.
#[derive(Debug, Clone)]
pub(crate) struct Rendered {
    /// RCODE (0 or 3).
    pub rcode: u8,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
    /// Answer, authority, then additional records.
    pub body: Box<[u8]>,
    /// Bytes of answer + authority: the additional records start here.
    pub an_ns_len: u32,
    /// Where each additional RRset ends in the body, with the number of additional
    /// records up to there: a response takes the longest prefix that fits.
    pub ar_cuts: Box<[(u32, u16)]>,
    /// Present when the answer has more than one record.
    pub shuffle: Option<Box<Shuffle>>,
}

/// Writes records whose names are compressed against a question name.
pub(crate) struct Writer<'q> {
    /// Lowercase question name (empty: no compression at all).
    qname: &'q [u8],
    qlabels: Vec<usize>,
    pub out: Vec<u8>,
}

impl<'q> Writer<'q> {
    pub(crate) fn new(qname: &'q [u8]) -> Self {
        Writer {
            qname,
            qlabels: label_offsets(qname),
            out: Vec::new(),
        }
    }

    /// Writes `name`, ending in a pointer to the longest suffix it shares with the question.
    pub(crate) fn name(&mut self, name: &[u8]) {
        let mut o = 0;
        while o < name.len() && name[o] != 0 {
            let suffix = &name[o..];
            if suffix.len() <= self.qname.len() {
                let qo = self.qname.len() - suffix.len();
                if &self.qname[qo..] == suffix && self.qlabels.binary_search(&qo).is_ok() {
                    self.out.extend_from_slice(&name[..o]);
                    let ptr = 0xC000u16 | (QNAME_OFFSET + qo) as u16;
                    self.out.extend_from_slice(&ptr.to_be_bytes());
                    return;
                }
            }
            o += 1 + name[o] as usize;
        }
        self.out.extend_from_slice(name);
    }

    /// Writes one resource record; returns its byte range in `out`.
    pub(crate) fn record(&mut self, owner: &[u8], ttl: u32, rd: &RData) -> (usize, usize) {
        let start = self.out.len();
        self.name(owner);
        self.out.extend_from_slice(&rd.rtype().to_be_bytes());
        self.out.extend_from_slice(&1u16.to_be_bytes()); // IN
        self.out.extend_from_slice(&ttl.to_be_bytes());
        let len_at = self.out.len();
        self.out.extend_from_slice(&[0, 0]);
        match rd {
            RData::A(a) => self.out.extend_from_slice(&a.octets()),
            RData::Aaaa(a) => self.out.extend_from_slice(&a.octets()),
            RData::Ns(n) | RData::Ptr(n) => self.name(n),
            RData::Soa {
                mname,
                rname,
                serial,
                minimum,
            } => {
                self.name(mname);
                self.name(rname);
                for v in [
                    *serial,
                    super::records::SOA_REFRESH,
                    super::records::SOA_RETRY,
                    super::records::SOA_EXPIRE,
                    *minimum,
                ] {
                    self.out.extend_from_slice(&v.to_be_bytes());
                }
            }
            RData::Srv {
                priority,
                weight,
                port,
                target,
            } => {
                self.out.extend_from_slice(&priority.to_be_bytes());
                self.out.extend_from_slice(&weight.to_be_bytes());
                self.out.extend_from_slice(&port.to_be_bytes());
                // RFC 2782: "name compression is not to be used for this field".
                self.out.extend_from_slice(target);
            }
            RData::Txt(strings) => {
                for s in strings {
                    self.out.push(s.len() as u8);
                    self.out.extend_from_slice(s);
                }
            }
        }
        let rdlen = (self.out.len() - len_at - 2) as u16;
        self.out[len_at..len_at + 2].copy_from_slice(&rdlen.to_be_bytes());
        (start, self.out.len())
    }
}

/// Where the additional section finds the records (of a type) at a name: the addresses of
/// targets, and the SRV and TXT of service instances.
pub(crate) type AddrLookup<'a> = dyn Fn(&[u8], u16) -> Option<&'a [RData]> + 'a;

/// Largest DNS message: additional records past it could never be sent.
const MESSAGE_MAX: usize = 65_535;

/// Renders the positive answer for the RRset `t` at `owner` (the question name). The
/// additional section holds, as whole RRsets in this order, for a PTR answer the SRV and
/// TXT of each instance pointed to (RFC 6763 12.1) each followed by the addresses of its
/// SRV targets, and for SRV and NS answers the addresses of the targets.
pub(crate) fn render_rrset(
    owner: &[u8],
    t: u16,
    set: &[RData],
    ttl: u32,
    addrs: &AddrLookup<'_>,
) -> Rendered {
    let mut w = Writer::new(owner);
    let mut set: Vec<&RData> = set.iter().collect();
    if t == rtype::SRV {
        set.sort_by_key(|r| match r {
            RData::Srv { priority, .. } => *priority,
            _ => 0,
        });
    }
    let mut slots = Vec::new();
    let mut groups: Vec<(u32, u32)> = Vec::new();
    let mut last_prio = None;
    for rd in &set {
        let (s, e) = w.record(owner, ttl, rd);
        let (priority, weight) = match rd {
            RData::Srv {
                priority, weight, ..
            } => (*priority, *weight),
            _ => (0, 1),
        };
        if last_prio != Some(priority) {
            groups.push((slots.len() as u32, slots.len() as u32));
            last_prio = Some(priority);
        }
        slots.push(SrvSlot {
            off: s as u32,
            len: (e - s) as u32,
            weight,
            ar_n: 0,
            ar_off: 0,
            ar_len: 0,
        });
        if let Some(g) = groups.last_mut() {
            g.1 = slots.len() as u32;
        }
    }
    let an_ns_len = w.out.len() as u32;
    let mut cuts: Vec<(u32, u16)> = Vec::new();
    let mut arcount = 0u16;
    let mut done: std::collections::HashSet<(Vec<u8>, u16)> = std::collections::HashSet::new();
    // Adds the RRset of `at` at `name` once: the records added; None when the message
    // limit is reached.
    let mut add = |w: &mut Writer<'_>, name: &'_ [u8], at: u16| -> Option<u16> {
        if w.out.len() > MESSAGE_MAX {
            return None;
        }
        let mut n = 0;
        if let Some(found) = addrs(name, at)
            && done.insert((name.to_vec(), at))
        {
            for a in found {
                w.record(name, ttl, a);
                n += 1;
            }
            arcount += n;
            cuts.push((w.out.len() as u32, arcount));
        }
        Some(n)
    };
    'targets: for (i, rd) in set.iter().enumerate() {
        match rd {
            RData::Ptr(inst) => {
                for at in [rtype::SRV, rtype::TXT] {
                    if add(&mut w, inst, at).is_none() {
                        break 'targets;
                    }
                }
                for srv in addrs(inst, rtype::SRV).unwrap_or_default() {
                    if let RData::Srv { target, .. } = srv {
                        for at in [rtype::A, rtype::AAAA] {
                            if add(&mut w, target, at).is_none() {
                                break 'targets;
                            }
                        }
                    }
                }
            }
            RData::Srv { target, .. } | RData::Ns(target) => {
                let start = w.out.len();
                let mut n = 0;
                for at in [rtype::A, rtype::AAAA] {
                    match add(&mut w, target, at) {
                        Some(k) => n += k,
                        None => break 'targets,
                    }
                }
                if let (RData::Srv { .. }, Some(slot)) = (rd, slots.get_mut(i)) {
                    slot.ar_n = n;
                    slot.ar_off = start as u32;
                    slot.ar_len = (w.out.len() - start) as u32;
                }
            }
            _ => {}
        }
    }
    // Never keep records past what a message can hold.
    while cuts.last().is_some_and(|(e, _)| *e as usize > MESSAGE_MAX) {
        cuts.pop();
    }
    let keep = cuts.last().map_or(an_ns_len, |(e, _)| *e);
    w.out.truncate(keep as usize);
    for sl in &mut slots {
        if sl.ar_off + sl.ar_len > keep {
            (sl.ar_n, sl.ar_off, sl.ar_len) = (0, 0, 0);
        }
    }
    let shuffle = (slots.len() > 1).then(|| {
        Box::new(Shuffle {
            slots: slots.into_boxed_slice(),
            groups: groups.into_boxed_slice(),
            always: t == rtype::SRV,
            end: an_ns_len,
        })
    });
    Rendered {
        rcode: 0,
        ancount: set.len() as u16,
        nscount: 0,
        arcount: cuts.last().map_or(0, |(_, n)| *n),
        body: w.out.into_boxed_slice(),
        an_ns_len,
        ar_cuts: cuts.into_boxed_slice(),
        shuffle,
    }
}

/// Renders a negative answer (NODATA with rcode 0, NXDOMAIN with rcode 3): the SOA in the
/// authority section with TTL min(record TTL, SOA minimum) (RFC 2308), names uncompressed so
/// that it can follow any question.
pub(crate) fn render_negative(apex: &[u8], soa: &RData, ttl: u32, rcode: u8) -> Rendered {
    let mut w = Writer::new(&[]);
    let minimum = match soa {
        RData::Soa { minimum, .. } => *minimum,
        _ => ttl,
    };
    w.record(apex, ttl.min(minimum), soa);
    Rendered {
        rcode,
        ancount: 0,
        nscount: 1,
        arcount: 0,
        an_ns_len: w.out.len() as u32,
        body: w.out.into_boxed_slice(),
        ar_cuts: Box::new([]),
        shuffle: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::records::name_with;

    #[test]
    fn compression_against_question() {
        let apex = name_with(&["ns"], &[0]);
        let q = name_with(&["_svc", "_tcp"], &apex);
        let mut w = Writer::new(&q);
        w.name(&q);
        assert_eq!(w.out, [0xC0, 12]);
        w.out.clear();
        w.name(&name_with(&["web-1"], &apex));
        // "web-1" then a pointer to "ns." inside the question (offset 12 + 10).
        assert_eq!(w.out, [&[5u8][..], b"web-1", &[0xC0, 22]].concat());
        w.out.clear();
        w.name(&name_with(&["other"], &[0]));
        assert_eq!(w.out, name_with(&["other"], &[0]));
        let mut none = Writer::new(&[]);
        none.name(&q);
        assert_eq!(none.out, q);
    }
}
