//! The zone as an RFC 1035 master file.

use std::fmt::Write;

use super::records::{RData, SOA_EXPIRE, SOA_REFRESH, SOA_RETRY, ZoneData, name_to_text, rtype};

fn txt_quoted(s: &[u8]) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for &b in s {
        match b {
            b'"' | b'\\' => {
                q.push('\\');
                q.push(b as char);
            }
            0x20..=0x7e => q.push(b as char),
            _ => {
                let _ = write!(q, "\\{b:03}");
            }
        }
    }
    q.push('"');
    q
}

fn type_name(t: u16) -> &'static str {
    match t {
        rtype::A => "A",
        rtype::AAAA => "AAAA",
        rtype::NS => "NS",
        rtype::SOA => "SOA",
        rtype::PTR => "PTR",
        rtype::SRV => "SRV",
        rtype::TXT => "TXT",
        _ => "TYPE0",
    }
}

/// Formats every record of `z`: SOA first, then NS, then the rest by owner name.
pub(crate) fn master_file(z: &ZoneData) -> String {
    let mut s = String::new();
    let apex = name_to_text(&z.apex);
    let _ = writeln!(s, "; zone {apex} exported by dns-server");
    if let RData::Soa { mname, .. } = &z.soa
        && super::records::is_within(mname, &z.apex)
        && z.rrset(mname, rtype::A).is_none()
        && z.rrset(mname, rtype::AAAA).is_none()
    {
        let _ = writeln!(
            s,
            "; WARNING: the NS host {} has no address (no NS addresses configured); \
             named-checkzone rejects a zone whose in-zone NS host has no A/AAAA",
            name_to_text(mname)
        );
    }
    let _ = writeln!(s, "$ORIGIN {apex}");
    let _ = writeln!(s, "$TTL {}", z.ttl);
    let mut nodes: Vec<_> = z.nodes.iter().collect();
    // Apex first; then the other names in order.
    nodes.sort_by_key(|(owner, _)| (owner.as_slice() != z.apex.as_slice(), *owner));
    for (owner, data) in nodes {
        let owner = name_to_text(owner);
        let mut sets: Vec<_> = data.iter().collect();
        sets.sort_by_key(|(t, _)| match *t {
            rtype::SOA => 0,
            rtype::NS => 1,
            _ => 2,
        });
        for (t, set) in sets {
            for rd in set {
                let rdata = match rd {
                    RData::A(a) => a.to_string(),
                    RData::Aaaa(a) => a.to_string(),
                    RData::Ns(n) | RData::Ptr(n) => name_to_text(n),
                    RData::Soa {
                        mname,
                        rname,
                        serial,
                        minimum,
                    } => format!(
                        "{} {} {serial} {SOA_REFRESH} {SOA_RETRY} {SOA_EXPIRE} {minimum}",
                        name_to_text(mname),
                        name_to_text(rname)
                    ),
                    RData::Srv {
                        priority,
                        weight,
                        port,
                        target,
                    } => format!("{priority} {weight} {port} {}", name_to_text(target)),
                    RData::Txt(strings) => strings
                        .iter()
                        .map(|x| txt_quoted(x))
                        .collect::<Vec<_>>()
                        .join(" "),
                };
                let _ = writeln!(s, "{owner} {} IN {} {rdata}", z.ttl, type_name(*t));
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(txt_quoted(b"a=b c"), "\"a=b c\"");
        assert_eq!(txt_quoted(b"q\"\\"), "\"q\\\"\\\\\"");
        assert_eq!(txt_quoted("é".as_bytes()), "\"\\195\\169\"");
    }
}
