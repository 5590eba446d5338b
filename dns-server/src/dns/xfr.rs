//! Zone transfers out: AXFR (RFC 5936) and IXFR (RFC 1995) over TCP, and TSIG-signed
//! queries (RFC 8945), for secondaries (NSD, Knot, BIND) that serve the zones at scale.
//!
//! Who may transfer: a request signed with a configured TSIG key, or one from an address of
//! the allow-list. Without keys and allow-list (the default) every transfer is REFUSED.
//!
//! IXFR is answered from a bounded in-memory history of each zone's recent versions (the
//! snapshots the registry produced, which share the membranes' records by pointer): the
//! difference between the client's version and the current one, as one condensed change
//! (RFC 1995 5). A serial no longer (or never) in the history, for example after a restart,
//! gets the whole zone in AXFR form, which RFC 1995 4 allows. Over UDP an IXFR gets the
//! current SOA only (up to date, or "use TCP", RFC 1995 2).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use super::Catalog;
use super::edns::{OptExtras, ede, write_opt};
use super::query::Scratch;
use super::records::{self, WireName, rtype};
use super::rrl::Verdict;
use super::stats::{Counter, Shard};
use super::tsig::{self, Failure, Signer, TsigKey};
use super::wire::{Writer, be16, skip_name};
use crate::snapshot::NamespaceSnapshot;

/// Older versions of a zone kept for IXFR (besides the current one).
const HISTORY_VERSIONS: usize = 32;
/// At most this many membrane pointers (8 bytes each) over a zone's older versions.
const HISTORY_POINTERS: usize = 1 << 18;
/// Bytes of records per transfer message (well below 64 KiB, room for TSIG).
const MESSAGE_BYTES: usize = 16_000;

mod rcode {
    pub const FORMERR: u16 = 1;
    pub const NOTIMP: u16 = 4;
    pub const REFUSED: u16 = 5;
    pub const NOTAUTH: u16 = 9;
}

/// An address or network allowed to transfer zones (`192.0.2.7`, `10.0.0.0/8`, `::1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowNet {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for AllowNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or ADDRESS/PREFIX"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0-{max}"))?,
            None => max,
        };
        Ok(AllowNet { addr, prefix })
    }
}

impl AllowNet {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Zone transfer settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferConfig {
    /// TSIG keys: a request signed with one of them may transfer; the first also signs
    /// our NOTIFY messages.
    pub keys: Vec<TsigKey>,
    /// Addresses that may transfer without TSIG.
    pub allow: Vec<AllowNet>,
    /// Secondaries sent a NOTIFY (RFC 1996) when a zone's serial changes.
    pub notify: Vec<SocketAddr>,
}

impl TransferConfig {
    /// Whether any peer may transfer (a key or an allowed address): only then is the
    /// history IXFR answers from kept.
    pub(crate) fn enabled(&self) -> bool {
        !self.keys.is_empty() || !self.allow.is_empty()
    }
}

/// Recent versions of every zone, newest last.
#[derive(Default)]
pub(crate) struct History {
    zones: Mutex<HashMap<String, VecDeque<Arc<NamespaceSnapshot>>>>,
}

impl History {
    pub(crate) fn push(&self, snap: Arc<NamespaceSnapshot>) {
        let mut zones = self.zones.lock().unwrap_or_else(|e| e.into_inner());
        let v = zones.entry(snap.name.as_str().to_string()).or_default();
        v.push_back(snap);
        // Older versions within both bounds (the current one is always kept).
        let mut pointers: usize = v.iter().rev().skip(1).map(|s| s.instances.len()).sum();
        while v.len() > 1 && (v.len() - 1 > HISTORY_VERSIONS || pointers > HISTORY_POINTERS) {
            if let Some(old) = v.pop_front() {
                pointers -= old.instances.len();
            }
        }
    }

    pub(crate) fn remove(&self, ns: &str) {
        self.zones
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(ns);
    }

    /// The current version of `ns`.
    pub(crate) fn current(&self, ns: &str) -> Option<Arc<NamespaceSnapshot>> {
        let zones = self.zones.lock().unwrap_or_else(|e| e.into_inner());
        zones.get(ns)?.back().cloned()
    }

    /// The current version and, if still kept, the version with `serial`.
    fn get(
        &self,
        ns: &str,
        serial: Option<u32>,
    ) -> Option<(Arc<NamespaceSnapshot>, Option<Arc<NamespaceSnapshot>>)> {
        let zones = self.zones.lock().unwrap_or_else(|e| e.into_inner());
        let v = zones.get(ns)?;
        let cur = v.back()?.clone();
        let old = serial.and_then(|s| v.iter().find(|x| x.serial == s).cloned());
        Some((cur, old))
    }
}

/// A request this module answers (a transfer, or one carrying TSIG), as [`scan`] read it:
/// the server reads each message once and hands it here or to [`Catalog::respond`].
pub(crate) struct Request {
    id: u16,
    flags: u16,
    /// End of the question.
    qend: usize,
    qname: WireName,
    qtype: u16,
    qclass: u16,
    /// IXFR: the serial of the client's SOA in the authority section.
    client_serial: Option<u32>,
    /// Offset of the TSIG record (the last one).
    tsig_at: Option<usize>,
    /// A TSIG record that is not the last one.
    misplaced_tsig: bool,
    /// Largest UDP reply the client takes (512, or its EDNS payload up to ours).
    udp_limit: usize,
    /// The request's OPT record: its DO bit (error replies then carry an OPT too).
    edns_do: Option<bool>,
}

/// Reads a QUERY that is a transfer or carries TSIG; None for anything else (served by
/// the normal path). Allocates nothing for an ordinary query.
pub(crate) fn scan(req: &[u8]) -> Option<Request> {
    if req.len() < 12 {
        return None;
    }
    let flags = be16(req, 2);
    if flags & 0x8000 != 0 || (flags >> 11) & 0xF != 0 || be16(req, 4) != 1 {
        return None;
    }
    // The question name: uncompressed, at most 255 bytes (lowercased below if needed).
    let mut i = 12;
    loop {
        let l = *req.get(i)? as usize;
        if l & 0xC0 != 0 || i - 12 + l + 1 > 255 || i + 1 + l > req.len() {
            return None;
        }
        i += 1 + l;
        if l == 0 {
            break;
        }
    }
    let qname_end = i;
    if i + 4 > req.len() {
        return None;
    }
    let (qtype, qclass) = (be16(req, i), be16(req, i + 2));
    i += 4;
    let qend = i;
    let (an, ns, ar) = (be16(req, 6), be16(req, 8), be16(req, 10));
    let mut client_serial = None;
    let (mut tsig_at, mut misplaced_tsig) = (None, false);
    let mut udp_limit = 512;
    let mut edns_do = None;
    let total = u32::from(an) + u32::from(ns) + u32::from(ar);
    for k in 0..total {
        let start = i;
        let j = skip_name(req, i)?;
        if j + 10 > req.len() {
            return None;
        }
        let t = be16(req, j);
        let rd = j + 10;
        i = rd + be16(req, j + 8) as usize;
        if i > req.len() {
            return None;
        }
        let section_ns = k >= u32::from(an) && k < u32::from(an) + u32::from(ns);
        if section_ns && t == rtype::SOA {
            let s = skip_name(req, skip_name(req, rd)?)?;
            if s + 4 <= i {
                client_serial = Some(u32::from_be_bytes([
                    req[s],
                    req[s + 1],
                    req[s + 2],
                    req[s + 3],
                ]));
            }
        }
        if t == rtype::OPT && k >= u32::from(an) + u32::from(ns) {
            let payload = usize::from(be16(req, j + 2));
            udp_limit = payload.clamp(512, usize::from(super::query::EDNS_PAYLOAD));
            edns_do = Some(req[j + 6] & 0x80 != 0);
        }
        if t == tsig::TSIG {
            if k + 1 == total && k >= u32::from(an) + u32::from(ns) {
                tsig_at = Some(start);
            } else {
                misplaced_tsig = true;
            }
        }
    }
    let transfer = qtype == rtype::AXFR || qtype == rtype::IXFR;
    if !(transfer || tsig_at.is_some() || misplaced_tsig) {
        return None;
    }
    Some(Request {
        id: be16(req, 0),
        flags,
        qend,
        qname: req[12..qname_end]
            .iter()
            .map(u8::to_ascii_lowercase)
            .collect(),
        qtype,
        qclass,
        client_serial,
        tsig_at,
        misplaced_tsig,
        udp_limit,
        edns_do,
    })
}

impl Request {
    /// Whether it asks for a zone transfer (served off the async workers).
    pub(crate) fn is_transfer(&self) -> bool {
        self.qtype == rtype::AXFR || self.qtype == rtype::IXFR
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Header and question of a response to `r` with `counts` answers.
fn start(req: &[u8], r: &Request, rcode: u16, aa: bool, ancount: u16) -> Vec<u8> {
    let flags = 0x8000
        | (r.flags & 0x7800)
        | if aa { 0x0400 } else { 0 }
        | (r.flags & 0x0100)
        | (rcode & 0xF);
    let mut m = Vec::with_capacity(MESSAGE_BYTES + 512);
    m.extend_from_slice(&r.id.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    m.extend_from_slice(&ancount.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(&req[12..r.qend]);
    m
}

/// Extended DNS Error "Prohibited" (RFC 8914 4.19): a transfer not allowed.
const EDE_PROHIBITED: u16 = 18;

/// An error reply to `r`: header and question, and an OPT record (DO copied, `ede`) when
/// the request had one (RFC 6891 6.1.1).
fn error_reply(req: &[u8], r: &Request, rcode: u16, ede: Option<(u16, &'static str)>) -> Vec<u8> {
    let mut m = start(req, r, rcode, false, 0);
    if let Some(dnssec_ok) = r.edns_do {
        let x = OptExtras {
            ede,
            ..Default::default()
        };
        write_opt(&mut m, super::query::EDNS_PAYLOAD, rcode, dnssec_ok, &x);
        m[10..12].copy_from_slice(&1u16.to_be_bytes());
    }
    m
}

/// The reply to `r` sent in place of one over the rate limit, every `slip`-th: header (TC,
/// `rcode`) and question, and a bare OPT when the request had one; no larger than the
/// request, unsigned (the client retries over TCP).
fn slipped(req: &[u8], r: &Request, rcode: u16) -> Vec<u8> {
    let mut m = error_reply(req, r, rcode, None);
    m[2] |= 0x02;
    m
}

#[cfg(test)]
thread_local! {
    /// Zone versions [`encode`]d on this thread (tests: which requests render a whole zone).
    static ENCODED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Every record of a zone version, uncompressed: the SOA, and the others in name order.
fn encode(snap: &NamespaceSnapshot, naming: &records::Naming) -> (Vec<u8>, Vec<Vec<u8>>) {
    #[cfg(test)]
    ENCODED.with(|n| n.set(n.get() + 1));
    let z = records::zone_data(snap, naming);
    let soa = soa_record(&z.apex, z.ttl, &z.soa);
    let mut w = Writer::new(&[]);
    let mut rest = Vec::new();
    for (owner, data) in &z.nodes {
        for (t, set) in data {
            if *t == rtype::SOA {
                continue;
            }
            for rd in set {
                w.out.clear();
                w.record(owner, z.ttl, rd);
                rest.push(w.out.clone());
            }
        }
    }
    (soa, rest)
}

/// The SOA record of a zone version, uncompressed (the rest of the zone not rendered).
fn encode_soa(snap: &NamespaceSnapshot, naming: &records::Naming) -> Vec<u8> {
    let apex = naming.apex(snap.name.as_str());
    soa_record(
        &apex,
        snap.settings.record_ttl,
        &records::soa_of(snap, naming),
    )
}

/// One SOA record, uncompressed.
fn soa_record(apex: &[u8], ttl: u32, soa: &records::RData) -> Vec<u8> {
    let mut w = Writer::new(&[]);
    w.record(apex, ttl, soa);
    w.out
}

/// Packs records into messages of at most [`MESSAGE_BYTES`] of records each.
fn pack<'a>(req: &[u8], r: &Request, rrs: impl Iterator<Item = &'a [u8]>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut cur = start(req, r, 0, true, 0);
    let (base, mut n) = (cur.len(), 0u16);
    for rr in rrs {
        if n > 0 && (cur.len() - base + rr.len() > MESSAGE_BYTES || n == u16::MAX) {
            cur[6..8].copy_from_slice(&n.to_be_bytes());
            out.push(std::mem::replace(&mut cur, start(req, r, 0, true, 0)));
            n = 0;
        }
        cur.extend_from_slice(rr);
        n += 1;
    }
    cur[6..8].copy_from_slice(&n.to_be_bytes());
    out.push(cur);
    out
}

impl Catalog {
    /// The namespace whose apex is `qname`, if `qname` is a zone apex of our form.
    fn zone_of_apex(&self, qname: &[u8]) -> Option<String> {
        let suffix = &self.naming.suffix;
        let l = *qname.first()? as usize;
        if l == 0 || 1 + l + suffix.len() != qname.len() || !qname.ends_with(suffix) {
            return None;
        }
        String::from_utf8(qname[1..1 + l].to_vec()).ok()
    }

    /// Answers transfers (AXFR, IXFR) and TSIG-signed queries: the messages to send, in
    /// order (none: dropped by rate limiting). None: an ordinary query, for
    /// [`Catalog::respond`].
    #[cfg(test)]
    pub(crate) fn respond_special(
        &self,
        req: &[u8],
        tcp: bool,
        peer: IpAddr,
        s: &mut Scratch,
        shard: &Shard,
    ) -> Option<Vec<Vec<u8>>> {
        self.respond_scanned(req, scan(req)?, tcp, peer, s, shard)
    }

    /// Answers `req`, which [`scan`] read as `r`: the messages to send, in order (none: an
    /// answer rate limiting dropped; a signed query must not go on to the ordinary path,
    /// which would answer it NOTIMP). Over UDP every reply passes the rate limiter, the
    /// refusals, TSIG errors and SOA-only IXFR answers made here as much as the answers of
    /// [`Catalog::respond`], so that a spoofed flood draws them no faster than any other.
    pub(crate) fn respond_scanned(
        &self,
        req: &[u8],
        r: Request,
        tcp: bool,
        peer: IpAddr,
        s: &mut Scratch,
        shard: &Shard,
    ) -> Option<Vec<Vec<u8>>> {
        let (mut msgs, counted) = self.special(req, &r, tcp, peer, s, shard)?;
        if !counted {
            shard.add(if tcp {
                Counter::QueriesTcp
            } else {
                Counter::QueriesUdp
            });
            let rcode = msgs.first().map_or(0, |m| u16::from(m[3] & 0xF));
            // Answers of `respond` (counted) were rate limited there; no cookie here proves
            // the source.
            if !tcp && !msgs.is_empty() {
                match self.rate_limit(peer) {
                    Verdict::Send => {}
                    Verdict::Slip => {
                        shard.add(Counter::RateLimited);
                        shard.add(Counter::Truncated);
                        msgs = vec![slipped(req, &r, rcode)];
                    }
                    Verdict::Drop => {
                        shard.add(Counter::RateLimited);
                        shard.add(Counter::Dropped);
                        return Some(Vec::new());
                    }
                }
            }
            shard.add(Counter::for_rcode(rcode));
        }
        Some(msgs)
    }

    /// [`Catalog::respond_scanned`]'s work; the flag: already counted (by `respond`).
    fn special(
        &self,
        req: &[u8],
        r: &Request,
        tcp: bool,
        peer: IpAddr,
        s: &mut Scratch,
        shard: &Shard,
    ) -> Option<(Vec<Vec<u8>>, bool)> {
        let cfg = &self.transfer;
        let now = unix_now();
        let bare = |rcode: u16| error_reply(req, r, rcode, None);
        if r.misplaced_tsig {
            return Some((vec![bare(rcode::FORMERR)], false));
        }
        let mut signer: Option<Signer> = None;
        if let Some(at) = r.tsig_at {
            match tsig::verify(req, at, &cfg.keys, now) {
                Ok(mut sg) if sg.error() != 0 => {
                    let mut m = bare(rcode::NOTAUTH);
                    sg.sign(&mut m);
                    tracing::info!(%peer, "dns: TSIG time outside the fudge (BADTIME)");
                    return Some((vec![m], false));
                }
                Ok(sg) => signer = Some(sg),
                Err(Failure::Malformed) => return Some((vec![bare(rcode::FORMERR)], false)),
                Err(Failure::Unsigned { error, key, alg }) => {
                    let mut m = bare(rcode::NOTAUTH);
                    tsig::append_unsigned(&mut m, &key, &alg, error, now);
                    tracing::info!(%peer, error, "dns: TSIG check failed");
                    return Some((vec![m], false));
                }
            }
        }
        let ordinary = r.qtype != rtype::AXFR && r.qtype != rtype::IXFR;
        let mut msgs = if ordinary {
            // A signed ordinary query: answered as if unsigned, with room left for the
            // signature (a TCP message holds at most 65,535 bytes), then signed.
            let at = r.tsig_at?;
            let mut plain = req[..at].to_vec();
            let ar = be16(&plain, 10) - 1;
            plain[10..12].copy_from_slice(&ar.to_be_bytes());
            let reserve = signer.as_ref().map_or(0, Signer::record_len);
            let mut out = Vec::new();
            if self
                .respond_reserving(&plain, tcp, reserve, peer, &mut out, s, shard)
                .is_none()
            {
                // Dropped (rate limiting, or nothing to answer): send nothing. Returning
                // None would hand the signed request to the ordinary path, which answers
                // it a second time (NOTIMP) and counts it twice.
                return Some((Vec::new(), true));
            }
            vec![out]
        } else {
            self.transfer_messages(req, r, tcp, peer, signer.is_some())
        };
        if let Some(sg) = &mut signer {
            for m in &mut msgs {
                sg.sign(m);
            }
            if !tcp && msgs.iter().any(|m| m.len() > r.udp_limit) {
                // The signature pushed the answer over the client's limit (answers are
                // built with room for it; this is the safety net): TC, signed afresh (over
                // the request's MAC), so that it retries over TCP.
                let mut tc = start(req, r, 0, true, 0);
                tc[2] |= 0x02;
                let Ok(mut fresh) = tsig::verify(req, r.tsig_at?, &cfg.keys, now) else {
                    return None;
                };
                fresh.sign(&mut tc);
                msgs = vec![tc];
            }
        }
        Some((msgs, ordinary))
    }

    fn transfer_messages(
        &self,
        req: &[u8],
        r: &Request,
        tcp: bool,
        peer: IpAddr,
        signed: bool,
    ) -> Vec<Vec<u8>> {
        let bare = |rcode: u16| vec![error_reply(req, r, rcode, None)];
        let fail =
            |rcode: u16, ede: (u16, &'static str)| vec![error_reply(req, r, rcode, Some(ede))];
        if r.qtype == rtype::AXFR && !tcp {
            // RFC 5936 4.2: AXFR is TCP only.
            return fail(rcode::NOTIMP, (ede::NOT_SUPPORTED, "AXFR over TCP only"));
        }
        let allowed = signed || self.transfer.allow.iter().any(|n| n.contains(peer));
        let kind = if r.qtype == rtype::AXFR {
            "AXFR"
        } else {
            "IXFR"
        };
        if !allowed {
            tracing::info!(%peer, kind, "dns: zone transfer refused (no TSIG, not allowed)");
            return fail(
                rcode::REFUSED,
                (EDE_PROHIBITED, "zone transfer not allowed"),
            );
        }
        if r.qclass != 1 {
            return bare(rcode::REFUSED);
        }
        if r.qtype == rtype::IXFR && r.client_serial.is_none() {
            return bare(rcode::FORMERR);
        }
        let Some((cur, old)) = self
            .zone_of_apex(&r.qname)
            .and_then(|ns| self.history.get(&ns, r.client_serial))
        else {
            return fail(rcode::NOTAUTH, (ede::NOT_AUTHORITATIVE, ""));
        };
        let client = r.client_serial.unwrap_or_default();
        if r.qtype == rtype::IXFR && (!super::serial::gt(cur.serial, client) || !tcp) {
            // Up to date, or over UDP: the current SOA only, the zone not rendered (over
            // UDP this runs in the receive loop, for a source address that may be forged).
            let soa = encode_soa(&cur, &self.naming);
            return pack(req, r, std::iter::once(soa.as_slice()));
        }
        let (soa, rest) = encode(&cur, &self.naming);
        if r.qtype == rtype::IXFR
            && let Some(old) = old
        {
            let (old_soa, old_rest) = encode(&old, &self.naming);
            let before: HashSet<&[u8]> = old_rest.iter().map(Vec::as_slice).collect();
            let after: HashSet<&[u8]> = rest.iter().map(Vec::as_slice).collect();
            let deleted = old_rest.iter().filter(|x| !after.contains(x.as_slice()));
            let added = rest.iter().filter(|x| !before.contains(x.as_slice()));
            tracing::debug!(%peer, from = client, to = cur.serial, "dns: IXFR");
            let seq = std::iter::once(soa.as_slice())
                .chain(std::iter::once(old_soa.as_slice()))
                .chain(deleted.map(Vec::as_slice))
                .chain(std::iter::once(soa.as_slice()))
                .chain(added.map(Vec::as_slice))
                .chain(std::iter::once(soa.as_slice()));
            return pack(req, r, seq);
        }
        tracing::debug!(%peer, kind, serial = cur.serial, records = rest.len() + 1, "dns: full zone transfer");
        let seq = std::iter::once(soa.as_slice())
            .chain(rest.iter().map(Vec::as_slice))
            .chain(std::iter::once(soa.as_slice()));
        pack(req, r, seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use hickory_proto::op::Message;
    use hickory_proto::rr::RData;
    use shared::model::Registration;
    use shared::{MembraneId, NamespaceName, NamespaceSettings};

    use crate::dns::{DnsConfig, stats::Shard};
    use crate::snapshot::Instance;

    const KEY: &str = "xfr-key:hmac-sha256:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn snap(ids: &[u8]) -> NamespaceSnapshot {
        NamespaceSnapshot {
            name: NamespaceName::new("ns").unwrap(),
            settings: NamespaceSettings::default(),
            instances: ids
                .iter()
                .map(|i| {
                    Arc::new(Instance {
                        id: MembraneId::new(&format!("m{i}")).unwrap(),
                        registration: Arc::new(Registration {
                            addresses: vec![IpAddr::from([10, 0, 0, *i])],
                            ..Default::default()
                        }),
                    })
                })
                .collect(),
            serial: 100,
        }
    }

    fn catalog(allow: &[&str]) -> Catalog {
        Catalog::new(DnsConfig::default())
            .unwrap()
            .with_transfer(TransferConfig {
                keys: vec![KEY.parse().unwrap()],
                allow: allow.iter().map(|a| a.parse().unwrap()).collect(),
                notify: vec![],
            })
    }

    /// AXFR or IXFR (with the client's serial) of `ns.`.
    fn request(qtype: u16, serial: Option<u32>) -> Vec<u8> {
        let mut m = vec![
            0xab,
            0xcd,
            0,
            0,
            0,
            1,
            0,
            0,
            0,
            u8::from(serial.is_some()),
            0,
            0,
        ];
        m.extend_from_slice(b"\x02ns\x00");
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&[0, 1]);
        if let Some(s) = serial {
            m.extend_from_slice(b"\x02ns\x00\x00\x06\x00\x01\x00\x00\x00\x00\x00\x16");
            m.extend_from_slice(&[0, 0]);
            m.extend_from_slice(&s.to_be_bytes());
            m.extend_from_slice(&[0; 16]);
        }
        m
    }

    fn ask(c: &Catalog, req: &[u8], tcp: bool, peer: &str) -> Vec<Message> {
        let mut s = Scratch::new(0);
        c.respond_special(req, tcp, peer.parse().unwrap(), &mut s, &Shard::default())
            .expect("handled here")
            .iter()
            .map(|m| Message::from_vec(m).unwrap())
            .collect()
    }

    /// (rcode, answer records as text) over every message.
    fn records(msgs: &[Message]) -> (u16, Vec<String>) {
        let rcode = u16::from(msgs[0].metadata.response_code);
        let rrs = msgs
            .iter()
            .flat_map(|m| m.answers.iter())
            .map(|r| match &r.data {
                RData::SOA(soa) => format!("SOA {}", soa.serial),
                RData::A(a) => format!("{} A {a}", r.name),
                other => format!("{} {}", r.name, other.record_type()),
            })
            .collect();
        (rcode, rrs)
    }

    #[test]
    fn transfers_are_refused_unless_allowed_or_signed() {
        let c = catalog(&["192.0.2.0/24"]);
        c.update(&snap(&[1, 2]));
        let axfr = request(rtype::AXFR, None);
        // Not on the list, unsigned: REFUSED, nothing of the zone.
        assert_eq!(records(&ask(&c, &axfr, true, "198.51.100.1")), (5, vec![]));
        // On the list: the zone, SOA first and last.
        let (rc, rrs) = records(&ask(&c, &axfr, true, "192.0.2.9"));
        assert_eq!(rc, 0);
        assert_eq!(rrs.first(), Some(&"SOA 100".to_string()));
        assert_eq!(rrs.last(), Some(&"SOA 100".to_string()));
        assert!(rrs.contains(&"m2.ns. A 10.0.0.2".to_string()), "{rrs:?}");
        // Over UDP: never the zone.
        assert_eq!(records(&ask(&c, &axfr, false, "192.0.2.9")).0, 4);
        // Signed with the key, from anywhere: the zone, every message signed.
        let key: TsigKey = KEY.parse().unwrap();
        let mut signed = axfr.clone();
        let mut signer = Signer::for_request(&key, unix_now());
        signer.sign(&mut signed);
        let raw = c
            .respond_special(
                &signed,
                true,
                "198.51.100.1".parse().unwrap(),
                &mut Scratch::new(0),
                &Shard::default(),
            )
            .unwrap();
        let msgs: Vec<Message> = raw.iter().map(|m| Message::from_vec(m).unwrap()).collect();
        assert_eq!(records(&msgs).1.len(), 7, "{:?}", records(&msgs));
        // The TSIG record is last and its MAC covers our request's MAC.
        let at = raw[0].len() - TSIG_LEN;
        assert!(signer.verify_response(&raw[0], at));
        // A wrong key: NOTAUTH (BADSIG), nothing of the zone.
        let bad: TsigKey = "xfr-key:hmac-sha256:AQECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
            .parse()
            .unwrap();
        let mut forged = axfr.clone();
        Signer::for_request(&bad, unix_now()).sign(&mut forged);
        assert_eq!(
            records(&ask(&c, &forged, true, "198.51.100.1")),
            (9, vec![])
        );
        // An unknown key name: NOTAUTH (BADKEY).
        let other: TsigKey = "other:hmac-sha256:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
            .parse()
            .unwrap();
        let mut unknown = axfr.clone();
        Signer::for_request(&other, unix_now()).sign(&mut unknown);
        assert_eq!(
            records(&ask(&c, &unknown, true, "198.51.100.1")),
            (9, vec![])
        );
        // A zone we do not serve.
        let mut elsewhere = axfr.clone();
        elsewhere[13] = b'x';
        assert_eq!(records(&ask(&c, &elsewhere, true, "192.0.2.9")).0, 9);
    }

    /// Length of our TSIG record with this key: the name "xfr-key." (9), type to rdlength
    /// (10), the algorithm (13), timers and MAC size (10), the MAC (32), id to other (6).
    const TSIG_LEN: usize = 9 + 10 + 13 + 10 + 32 + 6;

    #[test]
    fn ixfr_sends_the_difference_or_the_whole_zone() {
        let c = catalog(&["127.0.0.1"]);
        c.update(&snap(&[1, 2])); // serial 100
        c.update(&snap(&[2, 3])); // 101
        c.update(&snap(&[2, 3, 4])); // 102
        let (rc, rrs) = records(&ask(
            &c,
            &request(rtype::IXFR, Some(100)),
            true,
            "127.0.0.1",
        ));
        assert_eq!(rc, 0);
        // Current SOA, old SOA, deletions, current SOA, additions, current SOA.
        let pos = |x: &str| rrs.iter().position(|r| r == x).unwrap_or(usize::MAX);
        assert_eq!(rrs[0], "SOA 102");
        assert_eq!(rrs[1], "SOA 100");
        let mid = 2 + rrs[2..].iter().position(|r| r == "SOA 102").unwrap();
        assert!(pos("m1.ns. A 10.0.0.1") < mid, "{rrs:?}");
        assert!(
            pos("m3.ns. A 10.0.0.3") > mid && pos("m4.ns. A 10.0.0.4") > mid,
            "{rrs:?}"
        );
        assert_eq!(
            pos("m2.ns. A 10.0.0.2"),
            usize::MAX,
            "unchanged records are not sent"
        );
        assert_eq!(rrs.last().unwrap(), "SOA 102");
        // Up to date: the SOA alone.
        assert_eq!(
            records(&ask(
                &c,
                &request(rtype::IXFR, Some(102)),
                true,
                "127.0.0.1"
            ))
            .1,
            ["SOA 102"]
        );
        // Over UDP: the SOA alone (use TCP).
        assert_eq!(
            records(&ask(
                &c,
                &request(rtype::IXFR, Some(100)),
                false,
                "127.0.0.1"
            ))
            .1,
            ["SOA 102"]
        );
        // A serial not in the history: the whole zone, AXFR style.
        let (_, full) = records(&ask(&c, &request(rtype::IXFR, Some(7)), true, "127.0.0.1"));
        assert_eq!(full.first().unwrap(), "SOA 102");
        assert_eq!(full.iter().filter(|r| r.starts_with("SOA")).count(), 2);
        assert!(full.contains(&"m2.ns. A 10.0.0.2".to_string()));
        // IXFR without the client's SOA: FORMERR.
        assert_eq!(
            records(&ask(&c, &request(rtype::IXFR, None), true, "127.0.0.1")).0,
            1
        );
    }

    /// Mutated transfer and signed requests never panic; every reply parses and echoes the
    /// id; nothing of the zone goes to a request that is neither signed nor allowed.
    #[test]
    fn garbage_never_panics_or_leaks() {
        let c = catalog(&[]);
        c.update(&snap(&[1, 2, 3]));
        c.update(&snap(&[1, 2]));
        let key: TsigKey = KEY.parse().unwrap();
        let mut valid = vec![request(rtype::AXFR, None), request(rtype::IXFR, Some(100))];
        let mut signed = request(rtype::IXFR, Some(100));
        Signer::for_request(&key, unix_now()).sign(&mut signed);
        valid.push(signed);
        let mut q = vec![1, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x02ns\x00\x00\x06\x00\x01");
        Signer::for_request(&key, unix_now()).sign(&mut q);
        valid.push(q);
        let mut x: u64 = 99;
        let mut rnd = |n: usize| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) as usize) % n.max(1)
        };
        let (mut s, shard) = (Scratch::new(0), Shard::default());
        for round in 0..40_000 {
            let mut pkt = valid[round % valid.len()].clone();
            match rnd(3) {
                0 => {
                    for _ in 0..=rnd(3) {
                        let i = rnd(pkt.len());
                        pkt[i] = rnd(256) as u8;
                    }
                }
                1 => pkt.truncate(rnd(pkt.len() + 1)),
                _ => {
                    let i = rnd(pkt.len());
                    pkt[i] ^= 1 << rnd(8);
                }
            }
            let tcp = round % 3 != 0;
            let Some(msgs) =
                c.respond_special(&pkt, tcp, "198.51.100.7".parse().unwrap(), &mut s, &shard)
            else {
                continue;
            };
            for m in &msgs {
                assert_eq!(m[..2], pkt[..2]);
                let parsed = Message::from_vec(m).unwrap_or_else(|e| panic!("{e}: {pkt:?}"));
                // Records of the zone only with a verified signature (the mutation may
                // have left the signed request intact).
                if !parsed.answers.is_empty() {
                    assert!(
                        tsig::verify(
                            &pkt,
                            pkt.len() - TSIG_LEN,
                            std::slice::from_ref(&key),
                            unix_now()
                        )
                        .is_ok(),
                        "zone data for an unsigned request {pkt:?}"
                    );
                }
            }
        }
    }

    /// A signed answer that the signature pushes over 512 bytes (no EDNS) is sent as a
    /// signed TC instead, so the client retries over TCP; over TCP the whole answer.
    #[test]
    fn signed_udp_answers_stay_within_the_limit() {
        let c = catalog(&[]);
        let mut big = snap(&[1]);
        let mut reg = (*big.instances[0].registration).clone();
        reg.addresses = (0..28).map(|k| IpAddr::from([10, 9, 0, k])).collect();
        Arc::make_mut(&mut big.instances[0]).registration = Arc::new(reg);
        c.update(&big);
        let key: TsigKey = KEY.parse().unwrap();
        let mut q = vec![1, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x02m1\x02ns\x00\x00\x01\x00\x01");
        let mut signer = Signer::for_request(&key, unix_now());
        signer.sign(&mut q);
        let (mut s, shard) = (Scratch::new(0), Shard::default());
        let peer = "198.51.100.7".parse().unwrap();
        let udp = c.respond_special(&q, false, peer, &mut s, &shard).unwrap();
        assert!(udp[0].len() <= 512, "{}", udp[0].len());
        let m = Message::from_vec(&udp[0]).unwrap();
        assert!(m.metadata.truncation && m.answers.is_empty());
        assert!(signer.verify_response(&udp[0], udp[0].len() - TSIG_LEN));
        let tcp = c.respond_special(&q, true, peer, &mut s, &shard).unwrap();
        let m = Message::from_vec(&tcp[0]).unwrap();
        assert_eq!(m.answers.len(), 28);
        assert!(tcp[0].len() > 512);
    }

    /// A signed answer over TCP for an RRset far over 64 KB (3,000 SRV records) leaves room
    /// for its signature: the message with the TSIG record still fits the TCP length
    /// prefix (65,535 bytes) and verifies, with either algorithm.
    #[test]
    fn signed_tcp_answers_leave_room_for_the_signature() {
        use shared::ServiceName;
        use shared::model::{Proto, ServiceSpec};

        const KEY512: &str = "xfr-key:hmac-sha512:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let keys: Vec<TsigKey> = [KEY, KEY512].iter().map(|k| k.parse().unwrap()).collect();
        let c = Catalog::new(DnsConfig::default())
            .unwrap()
            .with_transfer(TransferConfig {
                keys: keys.clone(),
                allow: vec![],
                notify: vec![],
            });
        let mut huge = snap(&[]);
        huge.instances = (0..3000u16)
            .map(|i| {
                Arc::new(Instance {
                    id: MembraneId::new(&format!("i{i:04}")).unwrap(),
                    registration: Arc::new(Registration {
                        addresses: vec![IpAddr::from([10, 2, (i / 250) as u8, (i % 250) as u8])],
                        services: vec![ServiceSpec {
                            name: ServiceName::new("api").unwrap(),
                            proto: Proto::Tcp,
                            port: 8000,
                            priority: 0,
                            weight: 1,
                        }],
                        ..Default::default()
                    }),
                })
            })
            .collect();
        c.update(&huge);
        let (mut s, shard) = (Scratch::new(0), Shard::default());
        let peer = "198.51.100.7".parse().unwrap();
        for (key, mac) in keys.iter().zip([32, 64]) {
            let mut q = vec![1, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
            q.extend_from_slice(b"\x04_api\x04_tcp\x02ns\x00\x00\x21\x00\x01");
            let mut signer = Signer::for_request(key, unix_now());
            signer.sign(&mut q);
            let tcp = c.respond_special(&q, true, peer, &mut s, &shard).unwrap();
            let m = &tcp[0];
            assert!(m.len() <= 65_535, "{:?}: {} bytes", key.algorithm, m.len());
            assert!(signer.verify_response(m, m.len() - (TSIG_LEN - 32 + mac)));
            let parsed = Message::from_vec(m).unwrap();
            assert!(!parsed.metadata.truncation);
            assert!(parsed.answers.len() > 1000, "{}", parsed.answers.len());
        }
    }

    /// An IXFR over UDP, or from a client already up to date, is answered with the current
    /// SOA without rendering the zone (over UDP this runs in the receive loop); only a
    /// transfer over TCP renders it.
    #[test]
    fn ixfr_renders_the_zone_only_for_a_transfer() {
        let c = catalog(&["127.0.0.1"]);
        c.update(&snap(&[1, 2])); // serial 100
        c.update(&snap(&[2, 3])); // 101
        let encoded = || ENCODED.with(std::cell::Cell::get);
        let before = encoded();
        for (serial, tcp) in [(100, false), (7, false), (101, false), (101, true)] {
            let msgs = ask(&c, &request(rtype::IXFR, Some(serial)), tcp, "127.0.0.1");
            assert_eq!(records(&msgs).1, ["SOA 101"], "{serial} {tcp}");
            assert_eq!(
                encoded(),
                before,
                "{serial} tcp={tcp}: the zone was rendered"
            );
        }
        // A real transfer: the current and the client's version.
        let msgs = ask(&c, &request(rtype::IXFR, Some(100)), true, "127.0.0.1");
        assert!(records(&msgs).1.len() > 3);
        assert_eq!(encoded(), before + 2);
    }

    /// A signed query that rate limiting drops is not sent on to the ordinary path (which
    /// would answer the signed request NOTIMP and count it twice).
    #[test]
    fn a_rate_limited_signed_query_is_dropped_not_answered_twice() {
        let c = Catalog::new(DnsConfig {
            rate_limit: crate::dns::RateLimit {
                responses_per_second: 1,
                slip: 0,
            },
            ..DnsConfig::default()
        })
        .unwrap()
        .with_transfer(TransferConfig {
            keys: vec![KEY.parse().unwrap()],
            allow: vec![],
            notify: vec![],
        });
        c.update(&snap(&[1]));
        let key: TsigKey = KEY.parse().unwrap();
        let mut q = vec![1, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x02m1\x02ns\x00\x00\x01\x00\x01");
        Signer::for_request(&key, unix_now()).sign(&mut q);
        let (mut s, shard) = (Scratch::new(0), Shard::default());
        let peer = "198.51.100.7".parse().unwrap();
        let first = c.respond_special(&q, false, peer, &mut s, &shard).unwrap();
        assert_eq!(Message::from_vec(&first[0]).unwrap().answers.len(), 1);
        for _ in 0..5 {
            let next = c.respond_special(&q, false, peer, &mut s, &shard);
            assert_eq!(
                next,
                Some(vec![]),
                "dropped, not handed to the ordinary path"
            );
        }
    }

    /// Over UDP the replies made here (AXFR's NOTIMP, a refused transfer, a TSIG error,
    /// IXFR's SOA) pass the rate limiter like every other answer: a spoofed flood of them
    /// draws `rate` replies per second and then, every `slip`-th, a truncated one no larger
    /// than the query.
    #[test]
    fn udp_replies_made_here_are_rate_limited() {
        let c = Catalog::new(DnsConfig {
            rate_limit: crate::dns::RateLimit {
                responses_per_second: 5,
                slip: 2,
            },
            ..DnsConfig::default()
        })
        .unwrap()
        .with_transfer(TransferConfig {
            keys: vec![KEY.parse().unwrap()],
            allow: vec!["192.0.2.0/24".parse().unwrap()],
            notify: vec![],
        });
        c.update(&snap(&[1, 2]));
        // With an OPT (EDNS payload 1232), whose reply carries the extended error text.
        let with_opt = |mut m: Vec<u8>| {
            m[11] += 1;
            m.extend_from_slice(&[0, 0, 41, 0x04, 0xD0, 0, 0, 0, 0, 0, 0]);
            m
        };
        let forged = {
            let bad: TsigKey = "xfr-key:hmac-sha256:AQECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
                .parse()
                .unwrap();
            let mut m = with_opt(request(rtype::AXFR, None));
            Signer::for_request(&bad, unix_now()).sign(&mut m);
            m
        };
        let cases = [
            (with_opt(request(rtype::AXFR, None)), "198.51.100.1", 4),
            (with_opt(request(rtype::IXFR, Some(7))), "198.51.101.1", 5),
            (forged, "198.51.102.1", 9),
            (with_opt(request(rtype::IXFR, Some(7))), "192.0.2.9", 0),
        ];
        for (req, peer, rcode) in cases {
            let (mut s, shard) = (Scratch::new(0), Shard::default());
            let peer: IpAddr = peer.parse().unwrap();
            let (mut full, mut slipped, mut dropped) = (0, 0, 0);
            for _ in 0..20 {
                let msgs = c
                    .respond_special(&req, false, peer, &mut s, &shard)
                    .unwrap();
                let Some(m) = msgs.first() else {
                    dropped += 1;
                    continue;
                };
                assert_eq!(msgs.len(), 1);
                let msg = Message::from_vec(m).unwrap();
                assert_eq!(u16::from(msg.metadata.response_code), rcode, "{peer}");
                if msg.metadata.truncation {
                    assert!(msg.answers.is_empty() && m.len() <= req.len(), "{peer}");
                    slipped += 1;
                } else {
                    full += 1;
                }
            }
            assert_eq!((full, slipped, dropped), (5, 7, 8), "{peer}");
        }
    }

    /// Without keys or an allow-list nobody may transfer: no versions are kept.
    #[test]
    fn no_history_is_kept_when_transfers_are_off() {
        let c = Catalog::new(DnsConfig::default()).unwrap();
        c.update(&snap(&[1, 2]));
        c.update(&snap(&[2, 3]));
        assert!(c.history.zones.lock().unwrap().is_empty());
        let c = catalog(&[]);
        c.update(&snap(&[1, 2]));
        assert_eq!(c.history.zones.lock().unwrap()["ns"].len(), 1);
    }

    /// The server reads each message once: `scan` tells transfers (served off the async
    /// workers), signed queries (handled here) and ordinary queries (None) apart, and the
    /// question name it keeps is lowercased.
    #[test]
    fn scan_sorts_requests_once() {
        let r = scan(&request(rtype::AXFR, None)).expect("a transfer");
        assert!(r.is_transfer());
        let mut ixfr = request(rtype::IXFR, Some(7));
        ixfr[13..15].copy_from_slice(b"NS");
        let r = scan(&ixfr).expect("a transfer");
        assert!(r.is_transfer());
        assert_eq!(
            (r.qname.as_slice(), r.client_serial),
            (&b"\x02ns\x00"[..], Some(7))
        );
        let mut q = vec![1, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x02m1\x02ns\x00\x00\x01\x00\x01");
        assert!(
            scan(&q).is_none(),
            "an ordinary query goes to the normal path"
        );
        let key: TsigKey = KEY.parse().unwrap();
        Signer::for_request(&key, unix_now()).sign(&mut q);
        let r = scan(&q).expect("a signed query is handled here");
        assert!(!r.is_transfer() && r.tsig_at.is_some());
    }

    #[test]
    fn history_is_bounded() {
        let h = History::default();
        for serial in 0..100 {
            let mut s = snap(&[1]);
            s.serial = serial;
            h.push(Arc::new(s));
        }
        let zones = h.zones.lock().unwrap();
        assert_eq!(zones["ns"].len(), HISTORY_VERSIONS + 1);
        assert_eq!(zones["ns"].back().unwrap().serial, 99);
    }

    #[test]
    fn large_zones_span_several_messages() {
        let c = catalog(&["127.0.0.1"]);
        let mut big = snap(&(0..=250).collect::<Vec<u8>>());
        for inst in &mut big.instances {
            let mut reg = (*inst.registration).clone();
            reg.addresses = (0..8).map(|k| IpAddr::from([10, 1, k, 1])).collect();
            Arc::make_mut(inst).registration = Arc::new(reg);
        }
        c.update(&big);
        let msgs = ask(&c, &request(rtype::AXFR, None), true, "127.0.0.1");
        assert!(msgs.len() > 1, "{}", msgs.len());
        let (_, rrs) = records(&msgs);
        assert_eq!(
            rrs.iter().filter(|r| r.contains(" A 10.1.")).count(),
            251 * 8
        );
        assert_eq!(rrs.iter().filter(|r| r.starts_with("SOA")).count(), 2);
    }

    #[test]
    fn allow_list_matching() {
        let n: AllowNet = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one: AllowNet = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("127.0.0.1".parse().unwrap()));
        let all: AllowNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "x", "10.0.0.0/", "::/129"] {
            assert!(bad.parse::<AllowNet>().is_err(), "{bad}");
        }
    }
}
