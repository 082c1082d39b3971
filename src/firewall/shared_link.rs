//! Agents that share a bridge can take each other's source address.
//!
//! Client groups and per-client sets tell agents apart by source address, and the `prerouting`
//! reverse-path check makes a source trustworthy only when it could not come from anywhere
//! else: "the route back to this source leaves through the interface it came in on". On a
//! bridge every agent comes in on the same interface (the bridge), and the route back to each
//! of them is that same bridge: agent A can send with agent B's address and pass the check,
//! getting B's client group and B's per-client elements. (A veth per agent, routed, has one
//! source per interface, and there the check does tell them apart.)
//!
//! `firewall.bind` closes it: each listed port may send only from its own addresses (a
//! `bridge`-family table, see `ruleset::bind`). When the policy tells agents apart (client
//! groups or `per_client`) and an agents' network is on a bridge of this host with ports that
//! are not bound, `check` and `serve` warn, naming the bridge and those ports: the identities
//! of agents behind them cannot be trusted. They also warn about a binding that names an
//! interface which is not a bridge port here (a typo, or an agent not started yet: bindings
//! match by name, so a port created later is bound from the moment it exists). Looked up at
//! start: a bridge or port created later is not seen by these warnings.

use std::net::IpAddr;
use std::path::Path;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::policy::{Hook, Policy};

/// One warning per bridge whose networks hold agents the policy tells apart by address.
pub fn warnings(policy: &Policy) -> Vec<String> {
    let fw = &policy.firewall;
    if !fw.enabled || (policy.clients.is_empty() && !fw.per_client) {
        return Vec::new();
    }
    let routed = fw.hooks.contains(&Hook::Forward);
    let contained: &[String] = fw
        .contain
        .as_ref()
        .map_or(&[], |contain| contain.interfaces.as_slice());
    let bound: Vec<&str> = fw.bind.iter().map(|b| b.port.as_str()).collect();
    let mut out = not_bridge_ports(&bound, Path::new("/sys/class/net"));
    for (bridge, networks) in bridges() {
        let mut reasons: Vec<String> = Vec::new();
        if contained.iter().any(|name| names(name, &bridge)) {
            reasons.push("it is a contained interface".to_owned());
        }
        for group in &policy.clients {
            for range in &group.from {
                if networks.iter().any(|net| overlaps(net, range)) {
                    reasons.push(format!(
                        "client group {}'s range {range} is on it",
                        group.name
                    ));
                }
            }
        }
        let listens_on_it = policy.listen.iter().any(|l| {
            let ip = l.ip().to_canonical();
            networks.iter().any(|net| net.contains(&ip))
        });
        if fw.per_client && routed && listens_on_it {
            reasons.push("dnsfence listens on it with per_client".to_owned());
        }
        let unbound: Vec<String> = ports_of(&bridge, Path::new("/sys/class/net"))
            .into_iter()
            .filter(|p| !bound.contains(&p.as_str()))
            .collect();
        if !reasons.is_empty() && (!unbound.is_empty() || bound.is_empty()) {
            let which = if unbound.is_empty() {
                "it has no ports yet, and firewall.bind lists none".to_string()
            } else {
                format!("its ports {} are not in firewall.bind", unbound.join(", "))
            };
            out.push(format!(
                "interface {bridge} is a bridge ({}; {which}): agents on one bridge can send \
                 with each other's source address and pass the reverse-path check, so client \
                 groups and per-client sets do not tell the agents behind unbound ports apart. \
                 Bind each port to its agent's addresses (firewall.bind: [{{port: PORT, \
                 sources: [ADDRESS, ...]}}]), or give each agent its own routed link (a veth \
                 pair per agent, not enslaved to a bridge)",
                reasons.join("; ")
            ));
        }
    }
    out
}

/// The ports of `bridge` (`/sys/class/net/<bridge>/brif/`), sorted.
fn ports_of(bridge: &str, sys_class_net: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(sys_class_net.join(bridge).join("brif")) else {
        return Vec::new();
    };
    let mut ports: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ports.sort();
    ports
}

/// A warning for each bound port that is not a port of a bridge here (`/sys/class/net/<port>/
/// brport` is missing): its binding does nothing until such a port exists.
fn not_bridge_ports(bound: &[&str], sys_class_net: &Path) -> Vec<String> {
    bound
        .iter()
        .filter(|port| !sys_class_net.join(port).join("brport").is_dir())
        .map(|port| {
            let what = if sys_class_net.join(port).exists() {
                "is not a port of a bridge"
            } else {
                "does not exist (yet)"
            };
            format!(
                "firewall.bind port {port:?} {what} in this network namespace: its binding \
                 takes effect only when a bridge port of that name exists (bindings match by \
                 name); name the host-side interface of an agent enslaved to a bridge \
                 (`ip link show master BRIDGE` lists them)"
            )
        })
        .collect()
}

/// `name` as `contain.interfaces` writes it (a trailing `*` is a prefix) matches `interface`.
fn names(name: &str, interface: &str) -> bool {
    match name.strip_suffix('*') {
        Some(prefix) => interface.starts_with(prefix),
        None => name == interface,
    }
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// This host's bridges and the networks of their addresses.
fn bridges() -> Vec<(String, Vec<IpNet>)> {
    let mut out: Vec<(String, Vec<IpNet>)> = Vec::new();
    let Ok(interfaces) = nix::ifaddrs::getifaddrs() else {
        return out;
    };
    for interface in interfaces {
        let name = interface.interface_name;
        if !Path::new("/sys/class/net")
            .join(&name)
            .join("bridge")
            .is_dir()
        {
            continue;
        }
        let network = match (interface.address, interface.netmask) {
            (Some(a), Some(m)) => {
                if let (Some(a), Some(m)) = (a.as_sockaddr_in(), m.as_sockaddr_in()) {
                    let len = u8::try_from(u32::from(m.ip()).leading_ones()).unwrap_or(32);
                    Ipv4Net::new(a.ip(), len).ok().map(|n| IpNet::V4(n.trunc()))
                } else if let (Some(a), Some(m)) = (a.as_sockaddr_in6(), m.as_sockaddr_in6()) {
                    let len = u8::try_from(u128::from(m.ip()).leading_ones()).unwrap_or(128);
                    Ipv6Net::new(a.ip(), len).ok().map(|n| IpNet::V6(n.trunc()))
                } else {
                    None
                }
            }
            _ => None,
        };
        let at = match out.iter().position(|(n, _)| *n == name) {
            Some(at) => at,
            None => {
                out.push((name, Vec::new()));
                out.len() - 1
            }
        };
        if let (Some(network), Some((_, networks))) = (network, out.get_mut(at))
            && !is_link_local(network)
        {
            networks.push(network);
        }
    }
    out
}

fn is_link_local(net: IpNet) -> bool {
    match net.addr() {
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
        IpAddr::V4(v4) => v4.is_link_local(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_patterns_match_like_contain_interfaces() {
        assert!(names("br-agents", "br-agents"));
        assert!(names("br-*", "br-agents"));
        assert!(!names("br-agents", "br-agents2"));
        assert!(!names("veth*", "br-agents"));
    }

    #[test]
    fn bridge_ports_and_bindings_are_read_from_sys_class_net() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path();
        for p in [
            "br0/brif/p-a",
            "br0/brif/p-b",
            "p-a/brport",
            "p-b/brport",
            "eth0",
        ] {
            std::fs::create_dir_all(sys.join(p)).unwrap();
        }
        assert_eq!(ports_of("br0", sys), ["p-a", "p-b"]);
        assert!(not_bridge_ports(&["p-a", "p-b"], sys).is_empty());
        let w = not_bridge_ports(&["eth0", "nope"], sys);
        assert!(w[0].contains("\"eth0\" is not a port of a bridge"), "{w:?}");
        assert!(w[1].contains("\"nope\" does not exist"), "{w:?}");
    }

    #[test]
    fn ranges_overlap_either_way() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        assert!(overlaps(&n("10.88.0.0/24"), &n("10.88.0.0/25")));
        assert!(overlaps(&n("10.88.0.128/25"), &n("10.88.0.0/16")));
        assert!(!overlaps(&n("10.88.0.0/24"), &n("10.89.0.0/24")));
    }
}
