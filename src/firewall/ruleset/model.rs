//! The ruleset's vocabulary: families, protocols, matches, verdicts, rules, chains, sets and
//! the layout that holds them. No behaviour beyond naming and numbering.

use std::net::IpAddr;

use ipnet::IpNet;

pub(crate) use super::subids::IdRange;

/// Name of the IPv4 allow set.
pub(crate) const SET4: &str = "allow4";
/// Name of the IPv6 allow set.
pub(crate) const SET6: &str = "allow6";
/// The prefix of logged drops (the kernel log shows it before the packet's fields).
pub(crate) const LOG_PREFIX: &str = "dnsfence drop ";
/// Logged drops per second at most.
pub(crate) const LOG_RATE_PER_SECOND: u64 = 10;
/// nft's default burst for `limit rate`.
pub(crate) const LOG_BURST: u32 = 5;
/// Ports that are DNS whatever the policy says: plain DNS and DNS over TLS.
pub(crate) const DNS_PORTS: [u16; 2] = [53, 853];

/// IP family of an address match or a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    pub(crate) fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// `NFPROTO_IPV4` / `NFPROTO_IPV6`.
    pub(crate) fn nfproto(self) -> u8 {
        match self {
            Family::V4 => 2,
            Family::V6 => 10,
        }
    }

    pub(crate) fn nft_name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// The payload keyword: `ip` or `ip6`.
    pub(crate) fn header(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    pub(crate) fn addr_len(self) -> u32 {
        match self {
            Family::V4 => 4,
            Family::V6 => 16,
        }
    }

    pub(crate) fn saddr_offset(self) -> u32 {
        match self {
            Family::V4 => 12,
            Family::V6 => 8,
        }
    }

    pub(crate) fn daddr_offset(self) -> u32 {
        match self {
            Family::V4 => 16,
            Family::V6 => 24,
        }
    }

    /// The nftables data type of one address (`ipv4_addr` = 7, `ipv6_addr` = 8).
    pub(crate) fn datatype(self) -> u32 {
        match self {
            Family::V4 => 7,
            Family::V6 => 8,
        }
    }

    pub(crate) fn datatype_name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        }
    }

    pub(crate) fn set_name(self) -> &'static str {
        match self {
            Family::V4 => SET4,
            Family::V6 => SET6,
        }
    }
}

/// Transport protocol of a port match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Proto {
    Udp,
    Tcp,
}

impl Proto {
    pub(crate) fn number(self) -> u8 {
        match self {
            Proto::Udp => 17,
            Proto::Tcp => 6,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        }
    }

    pub(crate) const BOTH: [Proto; 2] = [Proto::Udp, Proto::Tcp];
}

/// ICMPv6 neighbour discovery messages (RFC 4861).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NdType {
    RouterSolicit,
    RouterAdvert,
    NeighborSolicit,
    NeighborAdvert,
    Redirect,
}

impl NdType {
    pub(crate) fn number(self) -> u8 {
        match self {
            NdType::RouterSolicit => 133,
            NdType::RouterAdvert => 134,
            NdType::NeighborSolicit => 135,
            NdType::NeighborAdvert => 136,
            NdType::Redirect => 137,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            NdType::RouterSolicit => "nd-router-solicit",
            NdType::RouterAdvert => "nd-router-advert",
            NdType::NeighborSolicit => "nd-neighbor-solicit",
            NdType::NeighborAdvert => "nd-neighbor-advert",
            NdType::Redirect => "nd-redirect",
        }
    }

    /// Accepted on the link (to or from this host), with hop limit 255.
    pub(crate) const NEIGHBOUR: [NdType; 2] = [NdType::NeighborSolicit, NdType::NeighborAdvert];

    /// Never forwarded.
    pub(crate) const ALL: [NdType; 5] = [
        NdType::RouterSolicit,
        NdType::RouterAdvert,
        NdType::NeighborSolicit,
        NdType::NeighborAdvert,
        NdType::Redirect,
    ];
}

/// One statement of a rule, in nft terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Match {
    /// `meta mark 0x…`
    Mark(u32),
    /// `oif "lo"` (the loopback interface is index 1 in every network namespace).
    OifLo,
    /// `iif "lo"`
    IifLo,
    /// `meta nfproto ipv4|ipv6`
    NfProto(Family),
    /// `ip daddr …` / `ip6 daddr …`, an address or a prefix.
    Daddr(IpNet),
    /// `ip saddr …` / `ip6 saddr …`, one address.
    Saddr(IpAddr),
    /// `udp sport …` / `tcp sport …`
    Sport(Proto, u16),
    /// `udp dport …` / `tcp dport …`
    Dport(Proto, u16),
    /// `ct state established,related`
    CtEstablishedRelated,
    /// `ip daddr @allow4`, or per client `ip saddr . ip daddr @allow4`.
    AllowSet { family: Family, per_client: bool },
    /// `fib saddr . iif oif missing`: the source is not routed back through the input interface.
    FibSaddrIifOifMissing,
    /// `fib saddr type != local`: the source is not one of this host's addresses (a packet on
    /// `lo`, or one a local socket sends, that carries a source the host does not own was
    /// forged: IPv6 lets any user bind any address with `IPV6_FREEBIND` and checks nothing
    /// on output).
    FibSaddrNotLocal,
    /// `fib daddr type local`: the destination is one of this host's addresses (any of 127/8,
    /// `::1`, every interface's).
    FibDaddrLocal,
    /// `icmpv6 type …`
    Icmpv6(NdType),
    /// `ip6 hoplimit 255`: sent on this link (a router would have decremented it). Only after
    /// an IPv6 match (`icmpv6 type`), as nft then leaves out the family check.
    HopLimit255,
    /// `ct direction reply`: a packet answering a connection the other side opened.
    CtDirectionReply,
    /// `ct direction original`: a packet of the side that opened the connection.
    CtDirectionOriginal,
    /// `ct direction original meta l4proto udp|tcp ct original proto-dst …`: a packet of a
    /// connection this side opened to that port, whatever NAT rewrote the port to since.
    OpenedToPort(Proto, u16),
    /// `meta skuid != 0`: sent by a socket of a user other than root.
    SkUidNotRoot,
    /// `meta skuid != U`: a socket of another user (or none: the match then fails).
    SkUidNot(u32),
    /// `meta skgid != G`
    SkGidNot(u32),
    /// `meta skuid != FIRST-LAST`: a socket owned by none of these uids (a contained user's
    /// subordinate uids, `/etc/subuid`).
    SkUidNotIn(IdRange),
    /// `meta skgid != FIRST-LAST` (`/etc/subgid`)
    SkGidNotIn(IdRange),
    /// `socket cgroupv2 level N @outside_cgroupsN`: the socket's ancestor N levels below the
    /// root is one of the cgroups known to be outside every contained one (the set's elements
    /// are cgroup ids, kept current by the firewall's cgroup watch; see `contain`).
    CgroupOutside { level: u32 },
    /// `iifname != "name"`, or a prefix with `*`.
    IifNameNot(String),
    /// `oifname != "name"`, or a prefix with `*`.
    OifNameNot(String),
    /// `ip saddr != …` / `ip6 saddr != …`, an address or a prefix.
    SaddrNotIn(IpNet),
    /// `ip daddr != …` / `ip6 daddr != …`
    DaddrNotIn(IpNet),
    /// `ct status dnat`: a connection whose destination a nat chain rewrote.
    CtStatusDnat,
    /// `limit rate N/second`
    Limit,
    /// `log prefix "…"`, and with an NFLOG group `… group N` (dnsfence reads the group to
    /// explain each drop).
    Log(Option<u16>),
}

/// The verdict of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Accept,
    Drop,
}

impl Verdict {
    /// `NF_ACCEPT` / `NF_DROP`.
    pub(crate) fn code(self) -> u32 {
        match self {
            Verdict::Accept => 1,
            Verdict::Drop => 0,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Verdict::Accept => "accept",
            Verdict::Drop => "drop",
        }
    }
}

/// One rule: all matches must hold, then the verdict (if any) applies, or the destination
/// is rewritten (`dnat`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    pub(crate) matches: Vec<Match>,
    pub(crate) verdict: Option<Verdict>,
    pub(crate) dnat: Option<std::net::SocketAddr>,
}

/// The netfilter hook of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChainHook {
    Input,
    Forward,
    Output,
    Prerouting,
}

impl ChainHook {
    pub(crate) fn name(self) -> &'static str {
        match self {
            ChainHook::Prerouting => "prerouting",
            ChainHook::Input => "input",
            ChainHook::Forward => "forward",
            ChainHook::Output => "output",
        }
    }
}

/// What a base chain does: filter packets, or rewrite the destination of new connections
/// (DNS interception).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChainKind {
    Filter,
    Nat,
}

impl ChainKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            ChainKind::Filter => "filter",
            ChainKind::Nat => "nat",
        }
    }
}

/// A base chain: `type <kind> hook <hook> priority <priority>; policy <policy>;`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chain {
    pub(crate) hook: ChainHook,
    pub(crate) kind: ChainKind,
    pub(crate) rules: Vec<Rule>,
}

impl Chain {
    /// A filter chain on `hook`.
    pub(crate) fn filter(hook: ChainHook, rules: Vec<Rule>) -> Chain {
        Chain {
            hook,
            kind: ChainKind::Filter,
            rules,
        }
    }

    /// Filter chains are named after their hook, nat chains `intercept_<hook>`.
    pub(crate) fn name(&self) -> &'static str {
        match (self.kind, self.hook) {
            (ChainKind::Filter, hook) => hook.name(),
            (ChainKind::Nat, ChainHook::Prerouting) => "intercept_prerouting",
            (ChainKind::Nat, _) => "intercept_output",
        }
    }

    /// `raw` (-300) for the filter `prerouting`, before conntrack sees a forged packet;
    /// `dstnat` (-100) for nat chains (after conntrack, before the filter chains, which then
    /// see the rewritten destination); `filter` (0) for the others.
    pub(crate) fn priority(&self) -> i32 {
        match (self.kind, self.hook) {
            (ChainKind::Nat, _) => -100,
            (ChainKind::Filter, ChainHook::Prerouting) => -300,
            (ChainKind::Filter, _) => 0,
        }
    }

    /// nft's name of [`Chain::priority`] (it prints `-100` on `output`, where `dstnat` is
    /// not a standard name).
    pub(crate) fn priority_name(&self) -> &'static str {
        match (self.kind, self.hook) {
            (ChainKind::Nat, ChainHook::Prerouting) => "dstnat",
            (ChainKind::Nat, _) => "-100",
            (ChainKind::Filter, ChainHook::Prerouting) => "raw",
            (ChainKind::Filter, _) => "filter",
        }
    }

    /// `prerouting` only filters sources and lets the rest through to the other chains, and
    /// nat chains only rewrite; the others drop what no rule accepted.
    pub(crate) fn policy(&self) -> Verdict {
        match (self.kind, self.hook) {
            (ChainKind::Nat, _) | (ChainKind::Filter, ChainHook::Prerouting) => Verdict::Accept,
            _ => Verdict::Drop,
        }
    }
}

/// One allow set (`flags timeout`, never a default timeout: every element carries its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SetDef {
    pub(crate) family: Family,
    /// Keyed by `client . destination` instead of `destination`.
    pub(crate) per_client: bool,
    pub(crate) size: u32,
}

impl SetDef {
    pub(crate) fn name(&self) -> &'static str {
        self.family.set_name()
    }

    /// `NFTA_SET_KEY_TYPE`: a concatenation packs its types 6 bits each.
    pub(crate) fn key_type(&self) -> u32 {
        let t = self.family.datatype();
        if self.per_client { (t << 6) | t } else { t }
    }

    /// `NFTA_SET_KEY_LEN` in bytes (each concatenated field is padded to 4 bytes; addresses are).
    pub(crate) fn key_len(&self) -> u32 {
        let l = self.family.addr_len();
        if self.per_client { 2 * l } else { l }
    }

    pub(crate) fn type_text(&self) -> String {
        let t = self.family.datatype_name();
        if self.per_client {
            format!("{t} . {t}")
        } else {
            t.to_string()
        }
    }
}

/// The most levels a contained cgroup path may have (`policy::MAX_CGROUP_DEPTH`), and so the
/// most cgroup sets: one per level.
pub(crate) const MAX_CGROUP_LEVELS: usize = 32;

/// Names of the cgroup sets, by level (index 0: level 1).
const CGROUP_SET_NAMES: [&str; MAX_CGROUP_LEVELS] = [
    "outside_cgroups1",
    "outside_cgroups2",
    "outside_cgroups3",
    "outside_cgroups4",
    "outside_cgroups5",
    "outside_cgroups6",
    "outside_cgroups7",
    "outside_cgroups8",
    "outside_cgroups9",
    "outside_cgroups10",
    "outside_cgroups11",
    "outside_cgroups12",
    "outside_cgroups13",
    "outside_cgroups14",
    "outside_cgroups15",
    "outside_cgroups16",
    "outside_cgroups17",
    "outside_cgroups18",
    "outside_cgroups19",
    "outside_cgroups20",
    "outside_cgroups21",
    "outside_cgroups22",
    "outside_cgroups23",
    "outside_cgroups24",
    "outside_cgroups25",
    "outside_cgroups26",
    "outside_cgroups27",
    "outside_cgroups28",
    "outside_cgroups29",
    "outside_cgroups30",
    "outside_cgroups31",
    "outside_cgroups32",
];

/// The name of the cgroup set of `level` (1-based; levels beyond the table share its last
/// name, which validation never lets happen).
pub(crate) fn cgroup_set_name(level: u32) -> &'static str {
    let i = (level.max(1) as usize - 1).min(MAX_CGROUP_LEVELS - 1);
    CGROUP_SET_NAMES
        .get(i)
        .copied()
        .unwrap_or("outside_cgroups32")
}

/// One set of cgroup ids (`type cgroupsv2`, no timeout): the cgroups `level` levels below the
/// root that are known to be outside every contained cgroup. The elements change while
/// dnsfence runs (the cgroup watch); the layout holds only the declaration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CgroupSetDef {
    pub(crate) level: u32,
}

impl CgroupSetDef {
    /// nft's `cgroupsv2` data type (`TYPE_CGROUPV2`).
    pub(crate) const KEY_TYPE: u32 = 46;
    /// A cgroup id: 64 bits, host byte order (as `socket cgroupv2` loads it).
    pub(crate) const KEY_LEN: u32 = 8;
    /// Elements at most: the cgroups beside one contained path's level (a host's services).
    /// Beyond that the rest stay contained (fail closed) and the watch says so.
    pub(crate) const SIZE: u32 = 16384;

    pub(crate) fn name(&self) -> &'static str {
        cgroup_set_name(self.level)
    }
}

/// Everything install() creates: `table inet <table>` with its sets and chains, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    pub(crate) table: String,
    pub(crate) sets: Vec<SetDef>,
    /// With `contain.cgroups`: one set per level of the contained paths (empty otherwise).
    pub(crate) cgroup_sets: Vec<CgroupSetDef>,
    pub(crate) chains: Vec<Chain>,
    /// The subordinate ids the `output` gate contains (`subuids 100000-165535`), for the
    /// start-up line; empty when there are none.
    pub(crate) subordinate_ids: String,
}
