//! `firewall.bind`: each listed bridge port may send only from its agent's own addresses.
//!
//! # Why a bridge needs this
//!
//! Client groups and per-client sets tell agents apart by source address, and the `inet`
//! table's `prerouting` check (`fib saddr . iif oif missing drop`) trusts a source only if the
//! route back to it leaves through the interface the packet came in on. Agents on one bridge
//! all come in on the bridge and are all routed back through it: agent A can send with agent
//! B's address, pass that check, and get B's group and B's per-client elements. Only the bridge
//! knows which *port* a frame came from, so the binding lives in a table of family `bridge`,
//! named like the main table (`table bridge dnsfence`) and created, replaced and removed in
//! the same transactions as it.
//!
//! # The chain
//!
//! One base chain, `bind`, `type filter hook prerouting priority filter (-200); policy
//! accept`: it sees every frame as it enters the bridge from a port, before the bridge decides
//! whether to deliver it to this host or to another port (so A cannot talk to B directly with
//! C's address either). Frames from ports that are not listed match no rule and pass
//! untouched. For each listed port, in order (every rule starts with `iifname "PORT"`):
//!
//! 1. IPv6 router advertisements and redirects are dropped: an agent is not a router, and
//!    either would let it draw another agent's traffic to itself.
//! 2. IPv4 (`ether type ip`) from one of the port's IPv4 sources: accept.
//! 3. ARP for IPv4 over Ethernet whose sender address is one of the port's IPv4 sources, or
//!    `0.0.0.0` (an RFC 5227 probe): accept. A reply claiming another address would teach the
//!    gateway (and the other agents) to send that address's traffic to this port.
//! 4. IPv6 from one of the port's IPv6 sources, not ICMPv6: accept.
//! 5. ICMPv6 other than neighbour advertisements from one of its IPv6 sources or from a
//!    link-local address (`fe80::/10`): accept. Link-local addresses are not bound (they are
//!    made up by each host, never routed, and no client group, budget or per-client element of
//!    dnsfence can be reached from one), but only ICMPv6 may use them: neighbour and router
//!    solicitations, MLD, echo on the link.
//! 6. Neighbour advertisements from one of those sources, whose *target* is one of the port's
//!    IPv6 sources or link-local: accept. (An advertisement for another address would poison
//!    the gateway's neighbour cache, as an ARP reply would.)
//! 7. Duplicate address detection: neighbour solicitations from `::` whose target is one of the
//!    port's addresses or link-local, and MLDv2 reports from `::` (sent before the host has any
//!    address): accept.
//! 8. Everything else from the port is dropped: other sources, other ether types (VLAN tags,
//!    PPPoE, anything that would carry an address past these rules), IPv6 with no IPv6 source
//!    listed, DHCP (whose clients send from `0.0.0.0`; give bound agents static addresses).
//!
//! # Old kernels
//!
//! Only expressions every kernel since 4.x has in the bridge family: `meta iifname`,
//! `meta l4proto` (set by the bridge family's IPv4/IPv6 packet info, which finds the ICMPv6
//! header behind extension headers), payload loads of the link-layer, network and transport
//! headers, `bitwise`, `cmp`, and `accept`/`drop`. No sets, no `meta ibrname` (not needed: a
//! port name is unique on the host), nothing newer than Linux 5.14 (RHEL 9).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::lower::{Expr, MetaKey, PayloadBase, REG1, ifname_data, mask_octets, octets};
use super::model::{NdType, Verdict};
use crate::policy::{Policy, PortBinding};

/// The one chain of the bridge table.
pub(crate) const BIND_CHAIN: &str = "bind";
/// nft's `filter` priority in the bridge family (`NF_BR_PRI_FILTER_BRIDGED`).
pub(crate) const BIND_PRIORITY: i32 = -200;
/// ICMPv6 MLDv2 listener report (RFC 3810), sent from `::` before a host has an address.
const MLD2_REPORT: u8 = 143;
/// `IPPROTO_ICMPV6`.
const ICMPV6: u8 = 58;

/// The Ethernet payload types a bound port may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EtherType {
    Ipv4,
    Ipv6,
    Arp,
}

impl EtherType {
    fn number(self) -> u16 {
        match self {
            EtherType::Ipv4 => 0x0800,
            EtherType::Ipv6 => 0x86dd,
            EtherType::Arp => 0x0806,
        }
    }

    fn name(self) -> &'static str {
        match self {
            EtherType::Ipv4 => "ip",
            EtherType::Ipv6 => "ip6",
            EtherType::Arp => "arp",
        }
    }
}

/// One statement of a rule of the bridge table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PortMatch {
    /// `iifname "PORT"`: the bridge port the frame entered from.
    IifName(String),
    /// `ether type ip|ip6|arp`
    EtherType(EtherType),
    /// `ip saddr …` / `ip6 saddr …` (after the matching `ether type`).
    Saddr(IpNet),
    /// `arp htype 1 arp ptype ip arp hlen 6 arp plen 4`: IPv4 over Ethernet, the only ARP whose
    /// sender address is where rule 3 reads it.
    ArpIpv4OverEthernet,
    /// `arp saddr ip …`
    ArpSender(Ipv4Net),
    /// `meta l4proto != ipv6-icmp`
    NotIcmpv6,
    /// `icmpv6 type [!=] …`
    Icmpv6Type { number: u8, neq: bool },
    /// The target address of a neighbour solicitation or advertisement (ICMPv6 bytes 8..24;
    /// nft 1.0 has no keyword for it and prints `@th,64,128`).
    NdTarget(Ipv6Net),
}

/// One rule: every match holds, then the verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PortRule {
    pub(crate) matches: Vec<PortMatch>,
    pub(crate) verdict: Verdict,
}

/// `table bridge <firewall.table>` with its one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BridgeLayout {
    pub(crate) table: String,
    pub(crate) rules: Vec<PortRule>,
}

fn link_local() -> Ipv6Net {
    Ipv6Net::new(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10).unwrap_or_default()
}

fn host6(ip: Ipv6Addr) -> Ipv6Net {
    Ipv6Net::from(ip)
}

impl BridgeLayout {
    /// The bridge table `policy` asks for; `None` without `firewall.bind` (or without the
    /// firewall): then no bridge table of this name should exist.
    pub(crate) fn from_policy(policy: &Policy) -> Option<BridgeLayout> {
        let fw = &policy.firewall;
        if !fw.enabled || fw.bind.is_empty() {
            return None;
        }
        let rules = fw.bind.iter().flat_map(port_rules).collect();
        Some(BridgeLayout {
            table: fw.table.clone(),
            rules,
        })
    }

    /// The table as nft text, after the `inet` table in `dnsfence ruleset`.
    pub(crate) fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# firewall.bind: each listed bridge port may send only from its own addresses.\n\
             # Compare with the live table: nft list table bridge {t}",
            t = self.table
        );
        let _ = writeln!(s, "table bridge {} {{", self.table);
        let _ = writeln!(s, "\tchain {BIND_CHAIN} {{");
        let _ = writeln!(
            s,
            "\t\ttype filter hook prerouting priority filter; policy accept;"
        );
        for r in &self.rules {
            let _ = writeln!(s, "\t\t{}", r.text());
        }
        let _ = writeln!(s, "\t}}");
        s.push_str("}\n");
        s
    }

    /// The ports bound, in policy order (for status lines).
    pub(crate) fn ports(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for r in &self.rules {
            if let Some(PortMatch::IifName(p)) = r.matches.first()
                && out.last() != Some(&p.as_str())
            {
                out.push(p);
            }
        }
        out
    }
}

/// The rules of one port (see the module documentation for the order).
fn port_rules(b: &PortBinding) -> Vec<PortRule> {
    let port = || PortMatch::IifName(b.port.clone());
    let rule = |mut matches: Vec<PortMatch>, verdict| {
        matches.insert(0, port());
        PortRule { matches, verdict }
    };
    let v4: Vec<Ipv4Net> = b
        .sources
        .iter()
        .filter_map(|n| match n {
            IpNet::V4(n) => Some(*n),
            IpNet::V6(_) => None,
        })
        .collect();
    let v6: Vec<Ipv6Net> = b
        .sources
        .iter()
        .filter_map(|n| match n {
            IpNet::V6(n) => Some(*n),
            IpNet::V4(_) => None,
        })
        .collect();
    let ip6 = || PortMatch::EtherType(EtherType::Ipv6);
    let icmp = |nd: NdType| PortMatch::Icmpv6Type {
        number: nd.number(),
        neq: false,
    };
    let mut out = Vec::new();
    for nd in [NdType::RouterAdvert, NdType::Redirect] {
        out.push(rule(vec![ip6(), icmp(nd)], Verdict::Drop));
    }
    for n in &v4 {
        out.push(rule(
            vec![
                PortMatch::EtherType(EtherType::Ipv4),
                PortMatch::Saddr(IpNet::V4(*n)),
            ],
            Verdict::Accept,
        ));
    }
    let probe = Ipv4Net::from(Ipv4Addr::UNSPECIFIED);
    for n in v4.iter().chain(std::iter::once(&probe)) {
        out.push(rule(
            vec![
                PortMatch::EtherType(EtherType::Arp),
                PortMatch::ArpIpv4OverEthernet,
                PortMatch::ArpSender(*n),
            ],
            Verdict::Accept,
        ));
    }
    for n in &v6 {
        out.push(rule(
            vec![ip6(), PortMatch::Saddr(IpNet::V6(*n)), PortMatch::NotIcmpv6],
            Verdict::Accept,
        ));
    }
    // Addresses this port may speak for in ICMPv6: its own, and link-local ones.
    let own: Vec<Ipv6Net> = v6.iter().copied().chain([link_local()]).collect();
    for n in &own {
        out.push(rule(
            vec![
                ip6(),
                PortMatch::Saddr(IpNet::V6(*n)),
                PortMatch::Icmpv6Type {
                    number: NdType::NeighborAdvert.number(),
                    neq: true,
                },
            ],
            Verdict::Accept,
        ));
    }
    for n in &own {
        for target in &own {
            out.push(rule(
                vec![
                    ip6(),
                    PortMatch::Saddr(IpNet::V6(*n)),
                    icmp(NdType::NeighborAdvert),
                    PortMatch::NdTarget(*target),
                ],
                Verdict::Accept,
            ));
        }
    }
    let unspecified = IpNet::V6(host6(Ipv6Addr::UNSPECIFIED));
    for target in &own {
        out.push(rule(
            vec![
                ip6(),
                PortMatch::Saddr(unspecified),
                icmp(NdType::NeighborSolicit),
                PortMatch::NdTarget(*target),
            ],
            Verdict::Accept,
        ));
    }
    out.push(rule(
        vec![
            ip6(),
            PortMatch::Saddr(unspecified),
            PortMatch::Icmpv6Type {
                number: MLD2_REPORT,
                neq: false,
            },
        ],
        Verdict::Accept,
    ));
    out.push(rule(Vec::new(), Verdict::Drop));
    out
}

fn icmpv6_type_name(number: u8) -> String {
    let nd = [
        NdType::RouterSolicit,
        NdType::RouterAdvert,
        NdType::NeighborSolicit,
        NdType::NeighborAdvert,
        NdType::Redirect,
    ];
    match nd.iter().find(|t| t.number() == number) {
        Some(t) => t.name().to_string(),
        None if number == MLD2_REPORT => "mld2-listener-report".to_string(),
        None => number.to_string(),
    }
}

fn net_text(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl PortMatch {
    fn text(&self) -> String {
        match self {
            PortMatch::IifName(p) => format!("iifname \"{p}\""),
            PortMatch::EtherType(t) => format!("ether type {}", t.name()),
            PortMatch::Saddr(net) => {
                let h = if net.addr().is_ipv4() { "ip" } else { "ip6" };
                format!("{h} saddr {}", net_text(net))
            }
            PortMatch::ArpIpv4OverEthernet => {
                "arp htype 1 arp ptype ip arp hlen 6 arp plen 4".to_string()
            }
            PortMatch::ArpSender(n) => format!("arp saddr ip {}", net_text(&IpNet::V4(*n))),
            PortMatch::NotIcmpv6 => "meta l4proto != ipv6-icmp".to_string(),
            PortMatch::Icmpv6Type { number, neq } => format!(
                "icmpv6 type {}{}",
                if *neq { "!= " } else { "" },
                icmpv6_type_name(*number)
            ),
            PortMatch::NdTarget(n) => {
                let net = IpNet::V6(*n);
                if n.prefix_len() == 128 {
                    format!("@th,64,128 0x{}", hex(&octets(IpAddr::V6(n.addr()))))
                } else {
                    format!(
                        "@th,64,128 & 0x{} == 0x{}",
                        hex(&mask_octets(&net)),
                        hex(&octets(IpAddr::V6(n.network())))
                    )
                }
            }
        }
    }

    fn lower(&self, out: &mut Vec<Expr>) {
        match self {
            PortMatch::IifName(p) => {
                out.push(Expr::Meta {
                    key: MetaKey::IifName,
                    dreg: REG1,
                });
                out.push(cmp_eq(ifname_data(p)));
            }
            PortMatch::EtherType(t) => {
                out.push(load(PayloadBase::LinkLayer, 12, 2));
                out.push(cmp_eq(t.number().to_be_bytes()));
            }
            PortMatch::Saddr(net) => {
                let offset = if net.addr().is_ipv4() { 12 } else { 8 };
                net_cmp(out, PayloadBase::Network, offset, net);
            }
            PortMatch::ArpIpv4OverEthernet => {
                // htype 1 (Ethernet), ptype 0x0800 (IPv4), hlen 6, plen 4: one load, as nft
                // merges adjacent payload matches.
                out.push(load(PayloadBase::Network, 0, 6));
                out.push(cmp_eq([0u8, 1, 8, 0, 6, 4]));
            }
            PortMatch::ArpSender(n) => {
                // After the 8-byte header and the 6-byte sender hardware address.
                net_cmp(out, PayloadBase::Network, 14, &IpNet::V4(*n));
            }
            PortMatch::NotIcmpv6 => {
                out.push(Expr::Meta {
                    key: MetaKey::L4Proto,
                    dreg: REG1,
                });
                out.push(Expr::Cmp {
                    neq: true,
                    data: vec![ICMPV6],
                });
            }
            PortMatch::Icmpv6Type { number, neq } => {
                out.push(Expr::Meta {
                    key: MetaKey::L4Proto,
                    dreg: REG1,
                });
                out.push(cmp_eq([ICMPV6]));
                out.push(load(PayloadBase::Transport, 0, 1));
                out.push(Expr::Cmp {
                    neq: *neq,
                    data: vec![*number],
                });
            }
            PortMatch::NdTarget(n) => {
                net_cmp_full(out, PayloadBase::Transport, 8, &IpNet::V6(*n));
            }
        }
    }
}

impl PortRule {
    /// The rule as netlink expressions, in order.
    pub(crate) fn exprs(&self) -> Vec<Expr> {
        let mut out = Vec::new();
        for m in &self.matches {
            m.lower(&mut out);
        }
        out.push(Expr::Verdict(self.verdict));
        out
    }

    /// The rule as nft text.
    pub(crate) fn text(&self) -> String {
        let mut parts: Vec<String> = self.matches.iter().map(PortMatch::text).collect();
        parts.push(self.verdict.name().to_string());
        parts.join(" ")
    }
}

fn cmp_eq(data: impl Into<Vec<u8>>) -> Expr {
    Expr::Cmp {
        neq: false,
        data: data.into(),
    }
}

fn load(base: PayloadBase, offset: u32, len: u32) -> Expr {
    Expr::Payload {
        base,
        offset,
        len,
        dreg: REG1,
    }
}

/// An address or prefix compared for equality, as nft encodes it: only the prefix's bytes
/// when it is byte-aligned, else the whole address masked.
fn net_cmp(out: &mut Vec<Expr>, base: PayloadBase, offset: u32, net: &IpNet) {
    let prefix = u32::from(net.prefix_len());
    if prefix > 0 && prefix % 8 == 0 {
        out.push(load(base, offset, prefix / 8));
        let mut data = octets(net.addr());
        data.truncate((prefix / 8) as usize);
        out.push(cmp_eq(data));
    } else {
        net_cmp_full(out, base, offset, net);
    }
}

/// The whole address loaded, masked when it is a prefix (a raw payload match, as nft does for
/// `@th,64,128`).
fn net_cmp_full(out: &mut Vec<Expr>, base: PayloadBase, offset: u32, net: &IpNet) {
    let len = if net.addr().is_ipv4() { 4 } else { 16 };
    out.push(load(base, offset, len));
    if net.prefix_len() != net.max_prefix_len() {
        let mask = mask_octets(net);
        let xor = vec![0; mask.len()];
        out.push(Expr::Bitwise { mask, xor });
    }
    out.push(cmp_eq(octets(net.network())));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(port: &str, sources: &[&str]) -> PortBinding {
        PortBinding {
            port: port.into(),
            sources: sources.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn a_port_accepts_its_own_sources_and_ends_in_drop() {
        let rules = port_rules(&binding("veth-a", &["10.88.0.2/32", "fd88::2/128"]));
        let texts: Vec<String> = rules.iter().map(PortRule::text).collect();
        assert!(texts.iter().all(|t| t.starts_with("iifname \"veth-a\" ")));
        assert!(
            texts.contains(&"iifname \"veth-a\" ether type ip ip saddr 10.88.0.2 accept".into())
        );
        assert!(texts.contains(
            &"iifname \"veth-a\" ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 \
              arp saddr ip 10.88.0.2 accept"
                .into()
        ));
        assert!(texts.contains(
            &"iifname \"veth-a\" ether type ip6 ip6 saddr fd88::2 meta l4proto != ipv6-icmp accept"
                .into()
        ));
        assert_eq!(texts.last().unwrap(), "iifname \"veth-a\" drop");
        // Router advertisements are dropped before anything ICMPv6 is accepted.
        let ra = texts
            .iter()
            .position(|t| t.contains("nd-router-advert"))
            .unwrap();
        let icmp = texts
            .iter()
            .position(|t| t.contains("!= nd-neighbor-advert"))
            .unwrap();
        assert!(ra < icmp);
        // Advertisements: own and link-local targets from own and link-local sources (2 x 2).
        assert_eq!(
            texts
                .iter()
                .filter(|t| t.contains("type nd-neighbor-advert @th"))
                .count(),
            4
        );
    }

    #[test]
    fn lowering_matches_nft_for_the_bridge_family() {
        // nft --debug=netlink for `iifname "x" ether type ip6 ip6 saddr fe80::/10 ...`
        let r = PortRule {
            matches: vec![
                PortMatch::IifName("x".into()),
                PortMatch::EtherType(EtherType::Ipv6),
                PortMatch::Saddr("fe80::/10".parse().unwrap()),
            ],
            verdict: Verdict::Accept,
        };
        let e = r.exprs();
        assert_eq!(e[1], cmp_eq(ifname_data("x")));
        assert_eq!(e[2], load(PayloadBase::LinkLayer, 12, 2));
        assert_eq!(e[3], cmp_eq([0x86u8, 0xdd]));
        assert_eq!(e[4], load(PayloadBase::Network, 8, 16));
        assert!(matches!(&e[5], Expr::Bitwise { mask, .. } if mask[..2] == [0xff, 0xc0]));
        let arp = PortRule {
            matches: vec![PortMatch::ArpSender("1.2.3.4/32".parse().unwrap())],
            verdict: Verdict::Accept,
        };
        assert_eq!(arp.exprs()[0], load(PayloadBase::Network, 14, 4));
    }

    #[test]
    fn ports_are_listed_once_each_in_order() {
        let layout = BridgeLayout {
            table: "t".into(),
            rules: [
                binding("veth-b", &["10.0.0.3/32"]),
                binding("veth-a", &["10.0.0.2/32"]),
            ]
            .iter()
            .flat_map(port_rules)
            .collect(),
        };
        assert_eq!(layout.ports(), ["veth-b", "veth-a"]);
        assert!(layout.render().contains("table bridge t {"));
    }
}
