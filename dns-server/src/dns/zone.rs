//! A zone as the query path sees it: owner name -> pre-rendered answer per type.

use std::collections::HashMap;

use super::records::ZoneData;
use super::wire::{Rendered, render_negative, render_rrset};

/// The pre-rendered answers of one name.
#[derive(Debug)]
pub(crate) struct Node {
    /// One answer per record type present at the name (empty for an empty non-terminal).
    pub rrsets: Box<[(u16, Rendered)]>,
}

impl Node {
    /// The answer for `qtype`, if the name has that type.
    #[inline]
    pub(crate) fn get(&self, qtype: u16) -> Option<&Rendered> {
        self.rrsets
            .iter()
            .find(|(t, _)| *t == qtype)
            .map(|(_, r)| r)
    }

    /// RFC 8482: the answer to ANY is one RRset of the name (the first one).
    #[inline]
    pub(crate) fn any(&self) -> Option<&Rendered> {
        self.rrsets.first().map(|(_, r)| r)
    }
}

/// One namespace zone, immutable once built.
#[derive(Debug)]
pub(crate) struct Zone {
    /// Every owner name (lowercase wire form) of the zone, including empty non-terminals.
    pub nodes: HashMap<Box<[u8]>, Node>,
    /// NXDOMAIN with the SOA in authority.
    pub nxdomain: Rendered,
    /// NOERROR/NODATA with the SOA in authority.
    pub nodata: Rendered,
}

impl Zone {
    /// Renders every answer of `z`.
    pub(crate) fn build(z: &ZoneData) -> Zone {
        let mut nodes = HashMap::with_capacity(z.nodes.len());
        for (owner, data) in &z.nodes {
            let rrsets: Vec<(u16, Rendered)> = data
                .iter()
                .map(|(t, set)| (*t, render_rrset(z, owner, *t, set)))
                .collect();
            nodes.insert(
                owner.clone().into_boxed_slice(),
                Node {
                    rrsets: rrsets.into_boxed_slice(),
                },
            );
        }
        Zone {
            nodes,
            nxdomain: render_negative(z, 3),
            nodata: render_negative(z, 0),
        }
    }
}
