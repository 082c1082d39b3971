//! Addresses and networks as written in a policy, with messages that say what to write instead.
//!
//! Strictness where a typo would widen the policy silently: a CIDR with host bits set
//! (`10.0.1.5/24`) is refused rather than read as `10.0.1.0/24`, since the author may have meant
//! the single host. Host names are never accepted for addresses: resolving them at load time
//! would make the policy depend on DNS, the very thing it controls.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// Parses `10.0.0.0/8`, `2001:db8::/32`, or a bare address (a single host, /32 or /128).
pub(crate) fn parse_cidr(text: &str) -> Result<IpNet, String> {
    if let Ok(addr) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    let net: IpNet = text.parse().map_err(|_| {
        format!(
            "{text:?} is not a network; write an address with a prefix length, such as \
             \"10.0.0.0/8\" or \"2001:db8::/32\""
        )
    })?;
    let network = net.trunc();
    if network != net {
        let host = IpNet::from(net.addr());
        return Err(format!(
            "{text:?} has host bits set; write \"{network}\" for the network or \"{host}\" for \
             the single address"
        ));
    }
    Ok(net)
}

/// What a socket address is for: listening or sending to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Listen,
    Upstream,
}

/// Parses `127.0.0.1:53` or `[::1]:53`.
pub(crate) fn parse_socket(text: &str, role: Role) -> Result<SocketAddr, String> {
    let addr: SocketAddr = match text.parse() {
        Ok(addr) => addr,
        Err(_) => {
            return Err(match text.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => {
                    format!("{text:?} has no port; write \"{ip}:53\"")
                }
                Ok(IpAddr::V6(ip)) => {
                    format!("{text:?} has no port; write \"[{ip}]:53\" (IPv6 in brackets)")
                }
                Err(_) => format!(
                    "{text:?} is not an address with a port; write an IP address and port \
                     such as \"127.0.0.1:53\" or \"[::1]:53\" (names are not resolved here)"
                ),
            });
        }
    };
    if addr.port() == 0 {
        return Err(format!(
            "{text:?} has port 0; write the DNS port, such as \"{}\"",
            SocketAddr::new(addr.ip(), 53)
        ));
    }
    if role == Role::Upstream && addr.ip().is_unspecified() {
        return Err(format!(
            "{text:?} is the unspecified address, which is not a server (the kernel would \
             send to this host); write the resolver's address, such as \"127.0.0.1:53\""
        ));
    }
    Ok(addr)
}

/// `true` for a network inside `::ffff:0:0/96` (IPv4-mapped IPv6).
pub(crate) fn is_v4_mapped(net: &IpNet) -> bool {
    match net {
        IpNet::V6(v6) => v6.prefix_len() >= 96 && v6.network().to_ipv4_mapped().is_some(),
        IpNet::V4(_) => false,
    }
}

/// The IPv4 form of an IPv4-mapped IPv6 network, for a suggestion.
pub(crate) fn unmapped(net: &IpNet) -> Option<IpNet> {
    match net {
        IpNet::V6(v6) if is_v4_mapped(net) => {
            let v4 = v6.network().to_ipv4_mapped()?;
            IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_and_bare_addresses_parse() {
        assert_eq!(
            parse_cidr("10.0.0.0/8").unwrap(),
            "10.0.0.0/8".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_cidr("10.0.1.100").unwrap(),
            "10.0.1.100/32".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_cidr("2001:db8::1").unwrap(),
            "2001:db8::1/128".parse::<IpNet>().unwrap()
        );
    }

    #[test]
    fn host_bits_and_garbage_are_refused_with_a_suggestion() {
        assert_eq!(
            parse_cidr("10.0.1.5/24").unwrap_err(),
            "\"10.0.1.5/24\" has host bits set; write \"10.0.1.0/24\" for the network or \
             \"10.0.1.5/32\" for the single address"
        );
        assert!(
            parse_cidr("10.0.0.0/33")
                .unwrap_err()
                .contains("not a network")
        );
        assert!(parse_cidr("example.com").is_err());
    }

    #[test]
    fn socket_addresses_need_a_port_and_brackets_for_ipv6() {
        assert!(parse_socket("127.0.0.1:53", Role::Listen).is_ok());
        assert!(parse_socket("[::1]:5353", Role::Listen).is_ok());
        assert_eq!(
            parse_socket("9.9.9.9", Role::Upstream).unwrap_err(),
            "\"9.9.9.9\" has no port; write \"9.9.9.9:53\""
        );
        assert!(
            parse_socket("::1", Role::Upstream)
                .unwrap_err()
                .contains("[::1]:53")
        );
        assert!(parse_socket("dns.google:53", Role::Upstream).is_err());
        assert!(parse_socket("127.0.0.1:0", Role::Listen).is_err());
        assert!(parse_socket("0.0.0.0:53", Role::Listen).is_ok());
        assert!(parse_socket("0.0.0.0:53", Role::Upstream).is_err());
    }

    #[test]
    fn mapped_networks_are_recognised() {
        let net: IpNet = "::ffff:10.0.0.0/104".parse().unwrap();
        assert!(is_v4_mapped(&net));
        assert_eq!(unmapped(&net), Some("10.0.0.0/8".parse().unwrap()));
        assert!(!is_v4_mapped(&"2001:db8::/32".parse().unwrap()));
    }
}
