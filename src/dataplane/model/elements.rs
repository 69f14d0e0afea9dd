//! Set elements: allowed networks as intervals, exemptions keyed on (interface, source), and
//! back.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use super::spec::Element;
use crate::policy::{Exempt6Key, ExemptKey};

/// The `allowed` set's elements for `networks` (sorted, aggregated), as nft writes an interval
/// set: each range as its start and, unless it runs to the top of the address space, an
/// end-of-interval element at the first address after it (ranges that touch keep both their
/// end and the next start, as nft sends them; overlapping ones merge); and an end-of-interval
/// element at 0.0.0.0 when no range starts there.
pub fn interval_elements(networks: &[Ipv4Net]) -> Vec<Element> {
    let ranges = networks.iter().map(|n| {
        (
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
        )
    });
    intervals(ranges, 4)
}

/// [`interval_elements`] for an IPv6 interval set.
pub fn interval_elements6(networks: &[Ipv6Net]) -> Vec<Element> {
    let ranges = networks
        .iter()
        .map(|n| (u128::from(n.network()), u128::from(n.broadcast())));
    intervals(ranges, 16)
}

/// Interval set elements for (first, last) address ranges of `width`-byte addresses.
pub(super) fn intervals(ranges: impl Iterator<Item = (u128, u128)>, width: usize) -> Vec<Element> {
    let key = |value: u128| value.to_be_bytes()[16 - width..].to_vec();
    let mut sorted: Vec<(u128, u128)> = ranges.collect();
    sorted.sort();
    // (start, last) with overlapping ranges merged; touching ones kept apart, as nft does.
    let mut merged: Vec<(u128, u128)> = Vec::new();
    for (start, last) in sorted {
        match merged.last_mut() {
            Some((_, previous_last)) if start <= *previous_last => {
                *previous_last = (*previous_last).max(last);
            }
            _ => merged.push((start, last)),
        }
    }
    let top = if width == 16 {
        u128::MAX
    } else {
        (1u128 << (width * 8)) - 1
    };
    let mut elements = Vec::with_capacity(merged.len() * 2 + 1);
    if merged.first().is_some_and(|(start, _)| *start != 0) {
        elements.push(Element {
            key: vec![0; width],
            interval_end: true,
            jump: None,
        });
    }
    for (start, last) in merged {
        elements.push(Element {
            key: key(start),
            interval_end: false,
            jump: None,
        });
        if last < top {
            elements.push(Element {
                key: key(last + 1),
                interval_end: true,
                jump: None,
            });
        }
    }
    elements
}

/// An exempt set element: the interface index in host byte order (nft's `iface_index`), then
/// the address, each in a 4-byte register slot.
pub fn exempt_element(key: &ExemptKey) -> Element {
    let mut bytes = key.ifindex.to_ne_bytes().to_vec();
    bytes.extend_from_slice(&key.ip.octets());
    Element {
        key: bytes,
        interval_end: false,
        jump: None,
    }
}

/// An IPv6 exempt set element: interface index (host order), then the 16-byte address.
pub fn exempt6_element(key: &Exempt6Key) -> Element {
    let mut bytes = key.ifindex.to_ne_bytes().to_vec();
    bytes.extend_from_slice(&key.ip.octets());
    Element {
        key: bytes,
        interval_end: false,
        jump: None,
    }
}

/// The inverse of [`exempt6_element`].
pub fn exempt6_key(element: &Element) -> Option<Exempt6Key> {
    let (index, address) = element.key.split_first_chunk::<4>()?;
    let address: [u8; 16] = address.try_into().ok()?;
    Some(Exempt6Key {
        ifindex: u32::from_ne_bytes(*index),
        ip: Ipv6Addr::from(address),
    })
}

/// The inverse of [`exempt_element`].
pub fn exempt_key(element: &Element) -> Option<ExemptKey> {
    let key: [u8; 8] = element.key.as_slice().try_into().ok()?;
    let ifindex = u32::from_ne_bytes([key[0], key[1], key[2], key[3]]);
    let ip = Ipv4Addr::new(key[4], key[5], key[6], key[7]);
    Some(ExemptKey { ifindex, ip })
}

/// A `containers6` element: the 16-byte address.
pub fn container6_element(ip: &Ipv6Addr) -> Element {
    Element {
        key: ip.octets().to_vec(),
        interval_end: false,
        jump: None,
    }
}

/// The inverse of [`container6_element`].
pub fn container6_address(element: &Element) -> Option<Ipv6Addr> {
    let octets: [u8; 16] = element.key.as_slice().try_into().ok()?;
    Some(Ipv6Addr::from(octets))
}
