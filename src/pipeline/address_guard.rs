//! Which answer addresses may ever be admitted to the firewall and handed to a client.
//!
//! An allowed name is only as trustworthy as whoever runs its zone. A hostile zone (or a
//! hijacked one) can answer `127.0.0.1`, `169.254.169.254` or a LAN address and so aim the
//! agent, with the firewall's blessing, at the host's own services, the cloud metadata service
//! or the internal network: DNS rebinding. These ranges are never admitted nor returned unless a
//! rule or group lists them in `allow_answers`; `deny_answers` adds ranges that nothing can
//! allow back, and so are the upstreams' own addresses (admitting those would open the resolver
//! to the agent, which is the tunnel dnsfence exists to close).
//!
//! The networks dnsfence serves (the client groups' `from` ranges and the networks of the
//! interfaces it listens on) are refused the same way: an answer naming an agent's own address
//! would get it admitted, and with `forward` anyone could then open connections into that agent.
//!
//! IPv6 forms that carry an IPv4 address (mapped, compatible, 6to4, NAT64 including the
//! local-use `64:ff9b:1::/48` and the policy's `nat64_prefixes`, Teredo) are judged by the IPv4
//! address inside them, since that is where the packets end up. The standard library's
//! predicates are not used: `"::ffff:127.0.0.1".is_loopback()` is false.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// IPv4 ranges that no answer may contain by default.
const DENIED_V4: &[(Ipv4Addr, u8)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8), // "this network", 0.0.0.0 connects to the host itself
    (Ipv4Addr::new(10, 0, 0, 0), 8), // RFC 1918
    (Ipv4Addr::new(100, 64, 0, 0), 10), // CGNAT (RFC 6598)
    (Ipv4Addr::new(127, 0, 0, 0), 8), // loopback
    (Ipv4Addr::new(169, 254, 0, 0), 16), // link-local, cloud metadata 169.254.169.254
    (Ipv4Addr::new(172, 16, 0, 0), 12), // RFC 1918
    (Ipv4Addr::new(192, 0, 0, 0), 24), // IETF protocol assignments
    (Ipv4Addr::new(192, 168, 0, 0), 16), // RFC 1918
    (Ipv4Addr::new(198, 18, 0, 0), 15), // benchmarking
    (Ipv4Addr::new(224, 0, 0, 0), 4), // multicast
    (Ipv4Addr::new(240, 0, 0, 0), 4), // reserved, and 255.255.255.255 broadcast
];

/// IPv6 ranges that no answer may contain by default (embedded-IPv4 forms are handled apart).
const DENIED_V6: &[(Ipv6Addr, u8)] = &[
    (Ipv6Addr::UNSPECIFIED, 128),
    (Ipv6Addr::LOCALHOST, 128),
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7), // ULA, incl. fd00:ec2::254 (AWS metadata)
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10), // link-local
    (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10), // deprecated site-local
    (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8), // multicast
    (Ipv6Addr::new(0x0100, 0, 0, 0, 0, 0, 0, 0), 64), // discard-only
];

/// The verdict on one answer address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressVerdict {
    Permitted,
    /// In a range denied by default (private, loopback, ...), not allowed back by `allow_answers`.
    Private,
    /// In `deny_answers` or an upstream's address: never permitted.
    Denied,
}

/// The answer-address policy of one server.
#[derive(Debug, Clone, Default)]
pub struct AddressGuard {
    /// `deny_answers`, the upstreams' addresses and this host's own addresses.
    always_denied: Vec<IpNet>,
    /// The agents' networks: refused like private ranges (`allow_answers` may list them).
    served: Vec<IpNet>,
    /// The operator's NAT64 /96 prefixes (`nat64_prefixes`).
    nat64: Vec<Ipv6Net>,
}

impl AddressGuard {
    /// `never` holds addresses no answer may ever contain: the upstreams', and this host's own
    /// (an agent handed one of those reaches every service the host listens on).
    pub fn new(deny_answers: &[IpNet], never: &[IpAddr]) -> AddressGuard {
        let mut always_denied = deny_answers.to_vec();
        always_denied.extend(never.iter().map(|&ip| IpNet::from(ip)));
        AddressGuard {
            always_denied,
            served: Vec::new(),
            nat64: Vec::new(),
        }
    }

    /// Adds the networks dnsfence serves, refused like private ranges.
    pub fn with_served(mut self, served: Vec<IpNet>) -> AddressGuard {
        self.served = served;
        self
    }

    /// Adds NAT64 /96 prefixes whose last 32 bits are the IPv4 address packets reach.
    pub fn with_nat64(mut self, prefixes: &[Ipv6Net]) -> AddressGuard {
        self.nat64 = prefixes.to_vec();
        self
    }

    /// The address packets to `ip` really reach, with the operator's NAT64 prefixes too.
    fn effective(&self, ip: IpAddr) -> IpAddr {
        if let IpAddr::V6(v6) = ip
            && self.nat64.iter().any(|p| p.contains(&v6))
        {
            let o = v6.octets();
            return IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
        }
        effective_address(ip)
    }

    /// Judges `ip`, with `allowed` the `allow_answers` of the rule and group that allowed the name.
    pub fn verdict(&self, ip: IpAddr, allowed: &[IpNet]) -> AddressVerdict {
        let effective = self.effective(ip);
        let hits = |nets: &[IpNet]| {
            nets.iter()
                .any(|net| net.contains(&ip) || net.contains(&effective))
        };
        if hits(&self.always_denied) {
            return AddressVerdict::Denied;
        }
        if is_denied_by_default(ip) || is_denied_by_default(effective) || hits(&self.served) {
            // Judged by where the packets land: `64:ff9b::/96` in allow_answers must not let
            // `64:ff9b::7f00:1` (loopback through NAT64) back in.
            if allowed.iter().any(|net| net.contains(&effective)) {
                return AddressVerdict::Permitted;
            }
            return AddressVerdict::Private;
        }
        AddressVerdict::Permitted
    }
}

/// The address packets to `ip` really reach: the IPv4 address inside the IPv6 forms that embed
/// one, else `ip` itself.
pub fn effective_address(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    let s = v6.segments();
    let o = v6.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (compatible; :: and ::1 are handled as IPv6).
    if s[..5] == [0; 5] && (s[5] == 0xffff || (s[5] == 0 && u32::from(tail) > 1)) {
        return IpAddr::V4(tail);
    }
    // ::ffff:0:a.b.c.d (IPv4-translated, RFC 2765).
    if s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0 {
        return IpAddr::V4(tail);
    }
    // 64:ff9b::/96 well-known NAT64 prefix and 64:ff9b:1::/48 local-use NAT64.
    if s[0] == 0x64 && s[1] == 0xff9b && (s[2..6] == [0; 4] || s[2] == 1) {
        return IpAddr::V4(tail);
    }
    // 2002:AABB:CCDD::/48 6to4.
    if s[0] == 0x2002 {
        return IpAddr::V4(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    // 2001:0::/32 Teredo: the client's address is the last 32 bits, inverted.
    if s[0] == 0x2001 && s[1] == 0 {
        return IpAddr::V4(!tail);
    }
    ip
}

/// This host's own addresses, from its interfaces (empty if they cannot be read).
pub fn host_addresses() -> Vec<IpAddr> {
    let Ok(interfaces) = nix::ifaddrs::getifaddrs() else {
        tracing::warn!("cannot list this host's addresses; answers naming them are not refused");
        return Vec::new();
    };
    let mut out: Vec<IpAddr> = interfaces
        .filter_map(|interface| {
            let address = interface.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The networks dnsfence serves: the client groups' `from` ranges and the networks of the
/// interfaces its listen addresses are on (every interface's for a wildcard listen address).
pub fn served_networks(client_ranges: &[IpNet], listen: &[SocketAddr]) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = client_ranges.to_vec();
    match nix::ifaddrs::getifaddrs() {
        Ok(interfaces) => {
            for interface in interfaces {
                let (Some(address), Some(mask)) = (interface.address, interface.netmask) else {
                    continue;
                };
                let net =
                    if let (Some(a), Some(m)) = (address.as_sockaddr_in(), mask.as_sockaddr_in()) {
                        let len = u32::from(m.ip()).leading_ones();
                        Ipv4Net::new(a.ip(), u8::try_from(len).unwrap_or(32))
                            .ok()
                            .map(|n| (IpAddr::V4(a.ip()), IpNet::V4(n.trunc())))
                    } else if let (Some(a), Some(m)) =
                        (address.as_sockaddr_in6(), mask.as_sockaddr_in6())
                    {
                        let len = u128::from(m.ip()).leading_ones();
                        Ipv6Net::new(a.ip(), u8::try_from(len).unwrap_or(128))
                            .ok()
                            .map(|n| (IpAddr::V6(a.ip()), IpNet::V6(n.trunc())))
                    } else {
                        None
                    };
                let Some((own, net)) = net else { continue };
                let on_it = listen.iter().any(|l| {
                    let ip = l.ip().to_canonical();
                    ip == own || (ip.is_unspecified() && ip.is_ipv4() == own.is_ipv4())
                });
                if on_it {
                    out.push(net);
                }
            }
        }
        Err(_) => {
            tracing::warn!(
                "cannot list this host's interfaces; answers inside the networks of the listen \
                 addresses are not refused (client groups' ranges still are)"
            );
        }
    }
    out.sort();
    out.dedup();
    out
}

fn is_denied_by_default(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => DENIED_V4
            .iter()
            .any(|&(net, len)| Ipv4Net::new(net, len).is_ok_and(|net| net.contains(&v4))),
        IpAddr::V6(v6) => DENIED_V6
            .iter()
            .any(|&(net, len)| Ipv6Net::new(net, len).is_ok_and(|net| net.contains(&v6))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> AddressGuard {
        AddressGuard::new(
            &["203.0.113.0/24".parse().unwrap()],
            &["192.0.2.53".parse().unwrap()],
        )
    }

    fn verdict(ip: &str) -> AddressVerdict {
        guard().verdict(ip.parse().unwrap(), &[])
    }

    #[test]
    fn public_addresses_are_permitted() {
        for ip in [
            "93.184.216.34",
            "198.51.100.7",
            "2606:4700::1111",
            "2001:db8::1",
        ] {
            assert_eq!(verdict(ip), AddressVerdict::Permitted, "{ip}");
        }
    }

    #[test]
    fn rebinding_targets_are_refused_in_every_spelling() {
        for ip in [
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "224.0.0.251",
            "255.255.255.255",
            "::",
            "::1",
            "fd00:ec2::254",
            "fc00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::10.0.0.1",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::a00:1",
            "2001:0:4136:e378:8000:63bf:80ff:fffe",
            "::ffff:0:7f00:1",
        ] {
            assert_eq!(verdict(ip), AddressVerdict::Private, "{ip}");
        }
    }

    #[test]
    fn allow_answers_lets_a_private_range_back_in() {
        let allowed: Vec<IpNet> = vec!["10.0.1.0/24".parse().unwrap()];
        let guard = guard();
        assert_eq!(
            guard.verdict("10.0.1.5".parse().unwrap(), &allowed),
            AddressVerdict::Permitted
        );
        assert_eq!(
            guard.verdict("10.0.2.5".parse().unwrap(), &allowed),
            AddressVerdict::Private
        );
    }

    #[test]
    fn an_allowed_ipv6_prefix_does_not_let_an_embedded_private_address_in() {
        let nat64: Vec<IpNet> = vec!["64:ff9b::/96".parse().unwrap()];
        let guard = guard();
        assert_eq!(
            guard.verdict("64:ff9b::7f00:1".parse().unwrap(), &nat64),
            AddressVerdict::Private
        );
        assert_eq!(
            guard.verdict("64:ff9b::5db8:d822".parse().unwrap(), &nat64),
            AddressVerdict::Permitted
        );
    }

    #[test]
    fn this_hosts_addresses_include_loopback() {
        assert!(host_addresses().contains(&"127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn deny_answers_and_upstreams_are_never_permitted() {
        let everything: Vec<IpNet> = vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
        let guard = guard();
        for ip in [
            "203.0.113.9",
            "192.0.2.53",
            "::ffff:192.0.2.53",
            "64:ff9b::c000:235",
        ] {
            assert_eq!(
                guard.verdict(ip.parse().unwrap(), &everything),
                AddressVerdict::Denied,
                "{ip}"
            );
        }
    }
}

#[cfg(test)]
mod served_tests {
    use super::*;

    #[test]
    fn the_agents_networks_are_refused_like_private_ranges() {
        let served: Vec<IpNet> = vec!["203.0.113.0/24".parse().unwrap()];
        let guard = AddressGuard::new(&[], &[]).with_served(served.clone());
        let agent: IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(guard.verdict(agent, &[]), AddressVerdict::Private);
        // Also through an IPv6 form that embeds it.
        let mapped: IpAddr = "64:ff9b::cb00:7107".parse().unwrap();
        assert_eq!(guard.verdict(mapped, &[]), AddressVerdict::Private);
        // allow_answers can list them, like any private range; others stay permitted.
        assert_eq!(guard.verdict(agent, &served), AddressVerdict::Permitted);
        let other: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(guard.verdict(other, &[]), AddressVerdict::Permitted);
    }

    #[test]
    fn the_operators_nat64_prefixes_are_judged_by_the_embedded_ipv4_address() {
        let prefix: Ipv6Net = "2001:db8:64::/96".parse().unwrap();
        let inside: IpAddr = "2001:db8:64::a00:1".parse().unwrap(); // 10.0.0.1
        let public: IpAddr = "2001:db8:64::c633:6407".parse().unwrap(); // 198.51.100.7
        let plain = AddressGuard::new(&[], &[]);
        assert_eq!(plain.verdict(inside, &[]), AddressVerdict::Permitted);
        let guard = AddressGuard::new(&[], &[]).with_nat64(&[prefix]);
        assert_eq!(guard.verdict(inside, &[]), AddressVerdict::Private);
        assert_eq!(guard.verdict(public, &[]), AddressVerdict::Permitted);
        // The local-use prefix of RFC 8215 is built in.
        let local_use: IpAddr = "64:ff9b:1::7f00:1".parse().unwrap();
        assert_eq!(plain.verdict(local_use, &[]), AddressVerdict::Private);
    }

    #[test]
    fn a_listen_address_brings_in_its_interfaces_network() {
        let listen: Vec<SocketAddr> = vec!["127.0.0.1:53".parse().unwrap()];
        let nets = served_networks(&[], &listen);
        assert!(nets.contains(&"127.0.0.0/8".parse().unwrap()), "{nets:?}");
        let none = served_networks(&[], &[]);
        assert!(none.is_empty(), "{none:?}");
    }
}
