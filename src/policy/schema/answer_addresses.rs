//! `deny_answers` and `nat64_prefixes`: answer addresses refused beyond the built-in ranges.

use std::collections::HashMap;
use std::net::Ipv6Addr;

use ipnet::{IpNet, Ipv6Net};

use super::super::diagnostic::{Pos, Report, quote};
use super::super::raw::Node;
use super::super::read;

/// The well-known NAT64 prefix's network (RFC 6052, a /96), which the address guard always knows.
const WELL_KNOWN_NAT64: Ipv6Addr = Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0);

pub(super) fn deny_answers(r: &mut Report, node: Option<&Node>) -> Vec<(Pos, IpNet)> {
    node.map(|n| read::cidrs(r, n, "deny_answers"))
        .unwrap_or_default()
}

/// `nat64_prefixes`: the operator's NAT64 /96 prefixes. An answer inside one embeds an IPv4
/// address in its last 32 bits, and the address guard judges that IPv4 address (so a private
/// IPv4 address cannot be smuggled in through the NAT64 translator).
pub(super) fn nat64_prefixes(r: &mut Report, node: Option<&Node>) -> Vec<Ipv6Net> {
    let what = "nat64_prefixes";
    let Some(node) = node else {
        return Vec::new();
    };
    let mut prefixes: Vec<Ipv6Net> = Vec::new();
    let mut seen: HashMap<Ipv6Net, Pos> = HashMap::new();
    for (pos, net) in read::cidrs(r, node, what) {
        let IpNet::V6(v6) = net else {
            r.error(
                pos,
                format!(
                    "{what}: \"{net}\" is an IPv4 network; a NAT64 prefix is an IPv6 /96 such \
                     as \"64:ff9b::/96\""
                ),
            );
            continue;
        };
        if v6.prefix_len() != 96 {
            r.error(
                pos,
                format!(
                    "{what}: \"{v6}\" is a /{}, but dnsfence reads only /96 NAT64 prefixes \
                     (the IPv4 address in the last 32 bits); write a /96 such as \"{}/96\"",
                    v6.prefix_len(),
                    v6.network()
                ),
            );
            continue;
        }
        if v6.network() == WELL_KNOWN_NAT64 {
            r.warn(
                pos,
                format!(
                    "{what}: \"{v6}\" is the well-known NAT64 prefix, which dnsfence always \
                     handles; remove it"
                ),
            );
            continue;
        }
        if let Some(first) = seen.insert(v6, pos) {
            r.error(
                pos,
                format!(
                    "{what}: {} is listed twice (also on line {}); remove one",
                    quote(&v6.to_string()),
                    first.line
                ),
            );
            continue;
        }
        prefixes.push(v6);
    }
    prefixes
}
