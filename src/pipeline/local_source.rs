//! Who a query comes from when its source is one of this host's own addresses.
//!
//! A client group is chosen by source address, and so is a per-client set's key. A packet
//! from another host (or namespace) can only carry a source the reverse-path check lets
//! through, but a process on this host may bind *any* address the host owns: the gateway's
//! `10.200.0.1` on the agents' link, say, which lies inside the agents' client range. Queried
//! from there, dnsfence would give that local process the group's allowlist (and, with
//! `per_client`, admit elements keyed on an address it can also connect from). Queries that
//! the `output` chain intercepts arrive with the routed source for the same reason.
//!
//! So a query whose source is an address of this host is the loopback client: the default
//! group (unless a group names loopback), the budgets' loopback key, and `127.0.0.1` (or `::1`)
//! as its per-client key, exactly as if it had been sent from `127.0.0.1`. So is every
//! loopback source: any local process may bind any of 127/8 without privilege, and each
//! address its own per-client key would let one process fill a per-client set with elements
//! (`127.0.1.1 . dest`, `127.0.1.2 . dest`, ...) that nothing can use but that crowd out
//! everyone else's.
//!
//! A source this host does *not* own is taken as it is. A query over loopback can carry one:
//! IPv6 lets any local user bind any address (`IPV6_FREEBIND`) and checks nothing on output,
//! so a local process could claim a routed agent's address (its group, budgets and elements)
//! or an outside one (the reply, with the question, sent there). The firewall drops such
//! packets (`iif "lo" fib saddr type != local drop` in `prerouting`, and a contained socket's
//! forged source in `output`); the pipeline cannot tell (a UDP socket learns the arrival
//! interface only with `IPV6_RECVPKTINFO`). Without the firewall, or without a `prerouting`
//! chain (only `output` and only loopback listen addresses), local users are trusted with
//! their sources: README's threat model says so.
//!
//! [`HostAddresses`] is the current list, read on every query without a lock; whoever owns
//! the process (`main`) keeps it current with [`HostAddresses::refresh`] (on every address
//! change the kernel announces, and periodically).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::address_guard::host_addresses;

/// This host's addresses (sorted, canonical), swapped whole on refresh.
pub struct HostAddresses {
    current: ArcSwap<Vec<IpAddr>>,
}

impl HostAddresses {
    /// The host's addresses now.
    pub fn read() -> HostAddresses {
        HostAddresses::of(host_addresses())
    }

    /// A fixed list (tests).
    pub fn of(addresses: Vec<IpAddr>) -> HostAddresses {
        HostAddresses {
            current: ArcSwap::from_pointee(canonical_sorted(addresses)),
        }
    }

    /// Reads the host's addresses again. An empty read (the interfaces could not be listed)
    /// keeps the previous list: forgetting every address would hand local processes their
    /// addresses' groups again.
    pub fn refresh(&self) {
        let fresh = host_addresses();
        if !fresh.is_empty() {
            self.current.store(Arc::new(canonical_sorted(fresh)));
        }
    }

    /// Whether `ip` is one of this host's addresses.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.current
            .load()
            .binary_search(&ip.to_canonical())
            .is_ok()
    }

    /// The client a query from `source` is decided, budgeted and admitted as: the loopback
    /// address of its family (`127.0.0.1` or `::1`) for any loopback source (all of 127/8,
    /// which any local process may bind, and its IPv4-mapped forms) and any address of this
    /// host, `source` otherwise.
    pub fn client_for(&self, source: IpAddr) -> IpAddr {
        let canonical = source.to_canonical();
        if !canonical.is_loopback() && !self.contains(canonical) {
            return source;
        }
        match canonical {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        }
    }
}

fn canonical_sorted(addresses: Vec<IpAddr>) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = addresses.into_iter().map(|a| a.to_canonical()).collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn host_addresses_become_the_loopback_client_of_their_family() {
        let host = HostAddresses::of(vec![ip("10.99.0.1"), ip("fd99::1"), ip("127.0.0.1")]);
        assert_eq!(host.client_for(ip("10.99.0.1")), ip("127.0.0.1"));
        assert_eq!(host.client_for(ip("::ffff:10.99.0.1")), ip("127.0.0.1"));
        assert_eq!(host.client_for(ip("fd99::1")), ip("::1"));
    }

    #[test]
    fn other_sources_stay_as_they_are() {
        let host = HostAddresses::of(vec![ip("10.99.0.1")]);
        assert_eq!(host.client_for(ip("10.99.0.2")), ip("10.99.0.2"));
        assert_eq!(host.client_for(ip("fd99::2")), ip("fd99::2"));
        assert_eq!(
            host.client_for(ip("::ffff:10.99.0.2")),
            ip("::ffff:10.99.0.2")
        );
    }

    #[test]
    fn every_loopback_source_is_one_loopback_client_per_family() {
        // Not even in the host's list: loopback is loopback.
        let host = HostAddresses::of(vec![ip("10.99.0.1")]);
        for v4 in ["127.0.0.1", "127.0.0.5", "127.255.3.4", "::ffff:127.0.9.9"] {
            assert_eq!(host.client_for(ip(v4)), ip("127.0.0.1"), "{v4}");
        }
        assert_eq!(host.client_for(ip("::1")), ip("::1"));
    }

    #[test]
    fn a_failed_refresh_keeps_the_previous_list() {
        let host = HostAddresses::read();
        assert!(host.contains(ip("127.0.0.1")));
        host.refresh();
        assert!(host.contains(ip("127.0.0.1")));
    }
}
