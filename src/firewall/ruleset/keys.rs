//! The byte keys of allow-set elements, both ways.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::lower::octets;
use super::model::{Family, SetDef};

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is the IPv4 address on the wire.
pub(crate) fn normalize_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        IpAddr::V4(_) => ip,
    }
}

/// The key of one allow-set element: the destination, or `client . destination`.
/// `None` when the client cannot be represented in that set (the other family).
pub(crate) fn element_key(per_client: bool, client: IpAddr, dest: IpAddr) -> Option<Vec<u8>> {
    let mut key = Vec::with_capacity(32);
    if per_client {
        match (client, dest) {
            (IpAddr::V4(c), IpAddr::V4(_)) => key.extend_from_slice(&c.octets()),
            (IpAddr::V6(c), IpAddr::V6(_)) => key.extend_from_slice(&c.octets()),
            _ => return None,
        }
    }
    key.extend_from_slice(&octets(dest));
    Some(key)
}

/// Reads back an element key of `set`: `(client, destination)`.
pub(crate) fn parse_element_key(set: &SetDef, key: &[u8]) -> Option<(Option<IpAddr>, IpAddr)> {
    fn addr(family: Family, b: &[u8]) -> Option<IpAddr> {
        match family {
            Family::V4 => <[u8; 4]>::try_from(b)
                .ok()
                .map(|o| IpAddr::V4(Ipv4Addr::from(o))),
            Family::V6 => <[u8; 16]>::try_from(b)
                .ok()
                .map(|o| IpAddr::V6(Ipv6Addr::from(o))),
        }
    }
    let l = set.family.addr_len() as usize;
    if set.per_client {
        if key.len() != 2 * l {
            return None;
        }
        let (c, d) = key.split_at(l);
        Some((Some(addr(set.family, c)?), addr(set.family, d)?))
    } else {
        Some((None, addr(set.family, key)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_keys() {
        let c4: IpAddr = "10.0.0.2".parse().unwrap();
        let d4: IpAddr = "192.0.2.1".parse().unwrap();
        let d6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(element_key(false, c4, d6).unwrap().len(), 16);
        assert_eq!(
            element_key(true, c4, d4).unwrap(),
            [10, 0, 0, 2, 192, 0, 2, 1]
        );
        assert!(element_key(true, c4, d6).is_none());
        let set = SetDef {
            family: Family::V4,
            per_client: true,
            size: 1,
        };
        assert_eq!(
            parse_element_key(&set, &[10, 0, 0, 2, 192, 0, 2, 1]),
            Some((Some(c4), d4))
        );
        assert_eq!(normalize_ip("::ffff:10.0.0.2".parse().unwrap()), c4);
    }
}
