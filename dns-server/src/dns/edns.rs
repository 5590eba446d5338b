//! EDNS(0) beyond the payload size: the options of a request (NSID, COOKIE) and the OPT
//! record of a response: DO copied (RFC 3225), the configured NSID (RFC 5001), a server
//! cookie (RFC 7873, in the interoperable RFC 9018 format: SipHash-2-4 over the client
//! cookie, version, timestamp and client address, keyed with a secret drawn at start) and
//! Extended DNS Errors (RFC 8914).

use std::net::IpAddr;

/// Option codes.
pub(crate) mod code {
    pub const NSID: u16 = 3;
    pub const COOKIE: u16 = 10;
    pub const EDE: u16 = 15;
}

/// Extended DNS Error info codes (RFC 8914 section 4).
pub(crate) mod ede {
    pub const NOT_AUTHORITATIVE: u16 = 20;
    pub const NOT_SUPPORTED: u16 = 21;
}

/// Longest NSID accepted in the configuration (it travels in every asking response).
pub const NSID_MAX: usize = 128;

/// A client's COOKIE option: its 8-byte client cookie and the server cookie it returned
/// (empty on first contact).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReqCookie {
    pub client: [u8; 8],
    server: [u8; 32],
    server_len: u8,
}

impl ReqCookie {
    fn server(&self) -> &[u8] {
        &self.server[..usize::from(self.server_len)]
    }
}

/// The OPT record of a request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReqEdns {
    pub payload: u16,
    pub version: u8,
    /// DNSSEC OK (RFC 3225): copied into the response.
    pub dnssec_ok: bool,
    /// The client asked for the NSID.
    pub nsid: bool,
    pub cookie: Option<ReqCookie>,
}

/// Reads an OPT record (its CLASS, TTL and RDATA). Err: the options are malformed (an
/// option running past the RDATA, a COOKIE of a forbidden length): FORMERR, answered
/// with the OPT fields that could be read.
pub(crate) fn parse_opt(class: u16, ttl: u32, rdata: &[u8]) -> Result<ReqEdns, ReqEdns> {
    let mut e = ReqEdns {
        payload: class,
        version: (ttl >> 16) as u8,
        dnssec_ok: ttl & 0x8000 != 0,
        nsid: false,
        cookie: None,
    };
    let mut i = 0;
    while i < rdata.len() {
        if i + 4 > rdata.len() {
            return Err(e);
        }
        let c = u16::from_be_bytes([rdata[i], rdata[i + 1]]);
        let len = usize::from(u16::from_be_bytes([rdata[i + 2], rdata[i + 3]]));
        let Some(data) = rdata.get(i + 4..i + 4 + len) else {
            return Err(e);
        };
        match c {
            code::NSID => e.nsid = true,
            code::COOKIE => {
                // RFC 7873 5.2.2: 8 (client only) or 16 to 40 bytes; anything else is
                // FORMERR, and so is a second COOKIE option.
                if e.cookie.is_some() || !(len == 8 || (16..=40).contains(&len)) {
                    e.cookie = None;
                    return Err(e);
                }
                let mut ck = ReqCookie {
                    client: [0; 8],
                    server: [0; 32],
                    server_len: (len - 8) as u8,
                };
                ck.client.copy_from_slice(&data[..8]);
                ck.server[..len - 8].copy_from_slice(&data[8..]);
                e.cookie = Some(ck);
            }
            _ => {}
        }
        i += 4 + len;
    }
    Ok(e)
}

/// Server cookie validity (RFC 9018 4.3): up to an hour old, at most 5 minutes ahead.
const COOKIE_PAST: u32 = 3600;
const COOKIE_FUTURE: u32 = 300;

/// The server's EDNS settings: NSID and the cookie secret.
#[derive(Debug)]
pub(crate) struct EdnsServer {
    pub nsid: Option<Box<[u8]>>,
    secret: (u64, u64),
}

impl EdnsServer {
    pub(crate) fn new(nsid: Option<&str>) -> Self {
        EdnsServer {
            nsid: nsid.map(|s| s.as_bytes().into()),
            secret: (rand::random(), rand::random()),
        }
    }

    /// The 8-byte hash of an RFC 9018 server cookie.
    #[allow(deprecated)] // std's SipHasher is SipHash-2-4, the hash RFC 9018 names.
    fn hash(&self, client: &[u8; 8], ts: u32, ip: IpAddr) -> [u8; 8] {
        use std::hash::Hasher;
        let mut h = std::hash::SipHasher::new_with_keys(self.secret.0, self.secret.1);
        h.write(client);
        h.write(&[1, 0, 0, 0]);
        h.write(&ts.to_be_bytes());
        match ip {
            IpAddr::V4(a) => h.write(&a.octets()),
            IpAddr::V6(a) => h.write(&a.octets()),
        }
        h.finish().to_be_bytes()
    }

    /// A fresh server cookie for `client` at `ip` (version 1, reserved, timestamp, hash).
    pub(crate) fn server_cookie(&self, client: &[u8; 8], ip: IpAddr, now: u32) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = 1;
        c[4..8].copy_from_slice(&now.to_be_bytes());
        c[8..].copy_from_slice(&self.hash(client, now, ip));
        c
    }

    /// Whether the request carries a server cookie this server made for `ip` recently:
    /// the source address is then not spoofed.
    pub(crate) fn cookie_valid(&self, c: &ReqCookie, ip: IpAddr, now: u32) -> bool {
        let s = c.server();
        if s.len() != 16 || s[0] != 1 {
            return false;
        }
        let ts = u32::from_be_bytes([s[4], s[5], s[6], s[7]]);
        // Serial-number arithmetic on the 32-bit timestamps (RFC 9018 4.3).
        let age = now.wrapping_sub(ts);
        let fresh = age <= COOKIE_PAST || ts.wrapping_sub(now) <= COOKIE_FUTURE;
        fresh && super::tsig::constant_time_eq(&s[8..], &self.hash(&c.client, ts, ip))
    }
}

/// What a response's OPT record carries besides the fixed fields.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct OptExtras<'a> {
    pub nsid: Option<&'a [u8]>,
    /// Client cookie and the server cookie to return.
    pub cookie: Option<([u8; 8], [u8; 16])>,
    /// Extended DNS Error: info code and extra text.
    pub ede: Option<(u16, &'static str)>,
}

/// Appends the response's OPT record: payload `payload`, the high bits of `rcode`, version
/// 0, DO as the request had it, then the options.
pub(crate) fn write_opt(
    out: &mut Vec<u8>,
    payload: u16,
    rcode: u16,
    dnssec_ok: bool,
    x: &OptExtras<'_>,
) {
    out.extend_from_slice(&[0, 0, 41]);
    out.extend_from_slice(&payload.to_be_bytes());
    out.extend_from_slice(&[(rcode >> 4) as u8, 0, if dnssec_ok { 0x80 } else { 0 }, 0]);
    let len_at = out.len();
    out.extend_from_slice(&[0, 0]);
    let opt = |out: &mut Vec<u8>, c: u16, parts: &[&[u8]]| {
        out.extend_from_slice(&c.to_be_bytes());
        let len: usize = parts.iter().map(|p| p.len()).sum();
        out.extend_from_slice(&(len as u16).to_be_bytes());
        for p in parts {
            out.extend_from_slice(p);
        }
    };
    if let Some(n) = x.nsid {
        opt(out, code::NSID, &[n]);
    }
    if let Some((client, server)) = &x.cookie {
        opt(out, code::COOKIE, &[client, server]);
    }
    if let Some((info, text)) = x.ede {
        opt(out, code::EDE, &[&info.to_be_bytes(), text.as_bytes()]);
    }
    let rdlen = (out.len() - len_at - 2) as u16;
    out[len_at..len_at + 2].copy_from_slice(&rdlen.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(options: &[(u16, &[u8])]) -> Vec<u8> {
        let mut v = Vec::new();
        for (c, d) in options {
            v.extend_from_slice(&c.to_be_bytes());
            v.extend_from_slice(&(d.len() as u16).to_be_bytes());
            v.extend_from_slice(d);
        }
        v
    }

    #[test]
    fn options_are_read_and_overruns_rejected() {
        let e = parse_opt(
            1232,
            0x8000,
            &opt(&[(code::NSID, b""), (code::COOKIE, &[7; 8])]),
        )
        .unwrap();
        assert!(e.dnssec_ok && e.nsid);
        assert_eq!(e.cookie.unwrap().client, [7; 8]);
        // An option whose length runs past the data.
        let mut bad = opt(&[(code::NSID, b"")]);
        bad.extend_from_slice(&[0, 12, 0, 9, 1, 2]);
        assert!(parse_opt(1232, 0, &bad).is_err());
        // Three stray bytes: not even an option header.
        assert!(parse_opt(1232, 0, &[0, 3, 0]).is_err());
        // COOKIE lengths: 8 and 16..=40 only.
        for (len, ok) in [
            (8, true),
            (9, false),
            (15, false),
            (16, true),
            (40, true),
            (41, false),
        ] {
            let v = vec![1u8; len];
            assert_eq!(
                parse_opt(512, 0, &opt(&[(code::COOKIE, &v)])).is_ok(),
                ok,
                "{len}"
            );
        }
    }

    #[test]
    fn server_cookies_verify_only_for_their_address_and_time() {
        let s = EdnsServer::new(None);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let client = [3u8; 8];
        let now = 1_000_000;
        let sc = s.server_cookie(&client, ip, now);
        let data = [&client[..], &sc[..]].concat();
        let e = parse_opt(512, 0, &opt(&[(code::COOKIE, &data)])).unwrap();
        let c = e.cookie.unwrap();
        assert!(s.cookie_valid(&c, ip, now + 10));
        assert!(!s.cookie_valid(&c, "192.0.2.8".parse().unwrap(), now + 10));
        assert!(!s.cookie_valid(&c, ip, now + COOKIE_PAST + 1));
        assert!(!EdnsServer::new(None).cookie_valid(&c, ip, now));
        let mut forged = data.clone();
        forged[20] ^= 1;
        let f = parse_opt(512, 0, &opt(&[(code::COOKIE, &forged)])).unwrap();
        assert!(!s.cookie_valid(&f.cookie.unwrap(), ip, now));
    }
}
