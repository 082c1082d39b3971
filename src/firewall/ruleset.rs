//! The ruleset as a small intermediate representation, and its two renderings.
//!
//! [`Layout::from_policy`] turns the `firewall` part of a [`Policy`] into a [`Layout`]: the table,
//! its two allow sets and its base chains, each chain a list of [`Rule`]s made of typed
//! [`Match`]es and a verdict. The layout is then rendered twice:
//!
//! * [`Layout::render`] writes it as nft text, in exactly the format `nft list table` prints, so
//!   that `dnsfence ruleset` can be reviewed, applied by hand and diffed against the live table;
//! * [`Rule::exprs`] lowers each rule to [`Expr`]s, one per netlink expression, in the same order
//!   and with the same encoding `nft` itself produces for the text (see `nft --debug=netlink`).
//!   The netlink module only serialises these.
//!
//! Both renderings come from one value, so what is reviewed and what is installed cannot drift;
//! the netns integration test checks it by loading the text with `nft -f` in one namespace,
//! installing through netlink in another, and comparing the kernel's bytecode of both.
//!
//! # Why the rules are in this order
//!
//! The `output` chain (agents on this host):
//!
//! 1. dnsfence's own upstream queries carry the socket mark `firewall.mark` and go to an upstream
//!    address and port: accept them.
//! 2. Anything else to an upstream address is dropped (DNS, DoT, DoH to the trusted resolver
//!    would bypass the allowlist). This rule must come *before* `ct state established`: a
//!    process that binds the source port the resolver has just used rides the resolver's
//!    conntrack entry to the upstream otherwise. For a loopback upstream only its port is
//!    dropped, so that the rest of loopback keeps working.
//! 3. Loopback: DNS (53, 853, the listen ports) to anything but dnsfence's own listen addresses
//!    is dropped (a local stub or forwarder would be a way around dnsfence), the rest of
//!    loopback is accepted.
//! 4. `ct state established,related` accept (replies, and ICMP errors such as "packet too big").
//! 5. DNS to dnsfence's non-loopback listen addresses.
//! 6. Destinations in the allow sets (per client: the pair client . destination).
//! 7. The static `allow_cidrs`.
//! 8. ICMPv6 neighbour discovery (solicit/advert, router solicit); router advertisements are not
//!    accepted, so an agent cannot announce itself as a router.
//! 9. Rate-limited log, then drop (the chain policy is drop as well).
//!
//! The `forward` chain (agents in namespaces or containers routed through this host) drops
//! packets to the upstreams first, then packets whose source would not be routed back through
//! the interface they came in on (`fib saddr . iif oif missing`: no spoofing another client's
//! address, which matters with per-client sets), then accepts established traffic, the allow sets
//! and CIDRs, neighbour discovery, logs and drops. With `forward` an `input` chain protects the
//! gateway itself: loopback, established traffic, DNS to dnsfence, neighbour discovery, nothing
//! else.
//!
//! Every address match checks `meta nfproto` first: an `inet` table sees IPv4 and IPv6 packets,
//! and loading an IPv4 address from an IPv6 header would compare garbage.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net};

use crate::policy::{FirewallPolicy, Hook, Policy};

/// Name of the IPv4 allow set.
pub(crate) const SET4: &str = "allow4";
/// Name of the IPv6 allow set.
pub(crate) const SET6: &str = "allow6";
/// The prefix of logged drops (the kernel log shows it before the packet's fields).
pub(crate) const LOG_PREFIX: &str = "dnsfence drop ";
/// Logged drops per second at most.
const LOG_RATE_PER_SECOND: u64 = 10;
/// nft's default burst for `limit rate`.
const LOG_BURST: u32 = 5;
/// Ports that are DNS whatever the policy says: plain DNS and DNS over TLS.
const DNS_PORTS: [u16; 2] = [53, 853];

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
    fn nfproto(self) -> u8 {
        match self {
            Family::V4 => 2,
            Family::V6 => 10,
        }
    }

    fn nft_name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// The payload keyword: `ip` or `ip6`.
    fn header(self) -> &'static str {
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

    fn saddr_offset(self) -> u32 {
        match self {
            Family::V4 => 12,
            Family::V6 => 8,
        }
    }

    fn daddr_offset(self) -> u32 {
        match self {
            Family::V4 => 16,
            Family::V6 => 24,
        }
    }

    /// The nftables data type of one address (`ipv4_addr` = 7, `ipv6_addr` = 8).
    fn datatype(self) -> u32 {
        match self {
            Family::V4 => 7,
            Family::V6 => 8,
        }
    }

    fn datatype_name(self) -> &'static str {
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
    fn number(self) -> u8 {
        match self {
            Proto::Udp => 17,
            Proto::Tcp => 6,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        }
    }

    const BOTH: [Proto; 2] = [Proto::Udp, Proto::Tcp];
}

/// ICMPv6 neighbour discovery messages that are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NdType {
    RouterSolicit,
    NeighborSolicit,
    NeighborAdvert,
}

impl NdType {
    fn number(self) -> u8 {
        match self {
            NdType::RouterSolicit => 133,
            NdType::NeighborSolicit => 135,
            NdType::NeighborAdvert => 136,
        }
    }

    fn name(self) -> &'static str {
        match self {
            NdType::RouterSolicit => "nd-router-solicit",
            NdType::NeighborSolicit => "nd-neighbor-solicit",
            NdType::NeighborAdvert => "nd-neighbor-advert",
        }
    }

    const ACCEPTED: [NdType; 3] = [
        NdType::NeighborSolicit,
        NdType::NeighborAdvert,
        NdType::RouterSolicit,
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
    /// `udp dport …` / `tcp dport …`
    Dport(Proto, u16),
    /// `ct state established,related`
    CtEstablishedRelated,
    /// `ip daddr @allow4`, or per client `ip saddr . ip daddr @allow4`.
    AllowSet { family: Family, per_client: bool },
    /// `fib saddr . iif oif missing`: the source is not routed back through the input interface.
    FibSaddrIifOifMissing,
    /// `icmpv6 type …`
    Icmpv6(NdType),
    /// `limit rate N/second`
    Limit,
    /// `log prefix "…"`
    Log,
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

    fn name(self) -> &'static str {
        match self {
            Verdict::Accept => "accept",
            Verdict::Drop => "drop",
        }
    }
}

/// One rule: all matches must hold, then the verdict (if any) applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    pub(crate) matches: Vec<Match>,
    pub(crate) verdict: Option<Verdict>,
}

/// The netfilter hook of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChainHook {
    Input,
    Forward,
    Output,
}

impl ChainHook {
    /// `NF_INET_LOCAL_IN` / `NF_INET_FORWARD` / `NF_INET_LOCAL_OUT`.
    pub(crate) fn number(self) -> u32 {
        match self {
            ChainHook::Input => 1,
            ChainHook::Forward => 2,
            ChainHook::Output => 3,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            ChainHook::Input => "input",
            ChainHook::Forward => "forward",
            ChainHook::Output => "output",
        }
    }
}

/// A base chain: `type filter hook <hook> priority filter; policy drop;`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chain {
    pub(crate) hook: ChainHook,
    pub(crate) rules: Vec<Rule>,
}

impl Chain {
    /// Chains are named after their hook.
    pub(crate) fn name(&self) -> &'static str {
        self.hook.name()
    }
}

/// The chain priority: `filter` (0).
pub(crate) const CHAIN_PRIORITY: i32 = 0;
/// The chain policy: drop.
pub(crate) const CHAIN_POLICY: Verdict = Verdict::Drop;

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

    fn type_text(&self) -> String {
        let t = self.family.datatype_name();
        if self.per_client {
            format!("{t} . {t}")
        } else {
            t.to_string()
        }
    }
}

/// Everything install() creates: `table inet <table>` with its sets and chains, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    pub(crate) table: String,
    pub(crate) sets: Vec<SetDef>,
    pub(crate) chains: Vec<Chain>,
}

/// Longest table name accepted (the kernel allows 255; a short name keeps logs readable).
const MAX_TABLE_NAME: usize = 64;

/// Checks that `name` is a plain nft identifier: a letter, then letters, digits or `_`.
/// Anything else could break (or inject into) the rendered script.
pub(crate) fn check_table_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if !first_ok
        || name.len() > MAX_TABLE_NAME
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(format!(
            "firewall.table {name:?} is not a valid table name (a letter, then letters, digits or _, \
             at most {MAX_TABLE_NAME} characters)"
        ));
    }
    Ok(())
}

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

/// Truncates host bits and turns an IPv4-mapped prefix (at least /96) into its IPv4 prefix.
fn normalize_net(net: IpNet) -> IpNet {
    let net = net.trunc();
    if let IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
        && let Ok(n) = Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(n.trunc());
    }
    net
}

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

fn rule(matches: Vec<Match>, verdict: Verdict) -> Rule {
    Rule {
        matches,
        verdict: Some(verdict),
    }
}

/// A listen address of dnsfence, normalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Listen {
    ip: IpAddr,
    port: u16,
}

/// Matches "DNS to this listen address" for one protocol: for a wildcard address (0.0.0.0, ::)
/// any address of its family, which is right on loopback and in `input` (local destinations only).
fn listen_matches(l: Listen, proto: Proto, prefix: &[Match]) -> Vec<Match> {
    let mut m = prefix.to_vec();
    if l.ip.is_unspecified() {
        m.push(Match::NfProto(Family::of(l.ip)));
    } else {
        m.push(Match::Daddr(host_net(l.ip)));
    }
    m.push(Match::Dport(proto, l.port));
    m
}

impl Layout {
    /// Validates the firewall part of `policy` and builds the layout.
    pub(crate) fn from_policy(policy: &Policy) -> Result<Layout, String> {
        let fw: &FirewallPolicy = &policy.firewall;
        check_table_name(&fw.table)?;
        if fw.hooks.is_empty() {
            return Err("firewall.hooks is empty: the firewall would enforce nothing".to_string());
        }
        if fw.set_size == 0 {
            return Err(
                "firewall.set_size must be at least 1 (the kernel reads 0 as unlimited)"
                    .to_string(),
            );
        }
        if fw.mark == 0 {
            return Err(
                "firewall.mark must not be 0: every unmarked packet has mark 0, so agents \
                 could reach the upstreams"
                    .to_string(),
            );
        }

        let listens: BTreeSet<Listen> = policy
            .listen
            .iter()
            .map(|s| Listen {
                ip: normalize_ip(s.ip()),
                port: s.port(),
            })
            .collect();
        let upstreams: BTreeSet<(IpAddr, u16)> = policy
            .upstreams
            .iter()
            .map(|s| (normalize_ip(s.ip()), s.port()))
            .collect();
        let mut cidrs: Vec<IpNet> = Vec::new();
        for net in fw.allow_cidrs.iter().map(|n| normalize_net(*n)) {
            if !cidrs.contains(&net) {
                cidrs.push(net);
            }
        }

        let output = fw.hooks.contains(&Hook::Output);
        let forward = fw.hooks.contains(&Hook::Forward);

        let upstream_accept: Vec<Rule> = upstreams
            .iter()
            .flat_map(|&(ip, port)| {
                Proto::BOTH.map(|p| {
                    rule(
                        vec![
                            Match::Mark(fw.mark),
                            Match::Daddr(host_net(ip)),
                            Match::Dport(p, port),
                        ],
                        Verdict::Accept,
                    )
                })
            })
            .collect();
        let upstream_drop: Vec<Rule> = {
            let mut rules = Vec::new();
            let mut seen = BTreeSet::new();
            for &(ip, port) in &upstreams {
                if ip.is_loopback() {
                    for p in Proto::BOTH {
                        rules.push(rule(
                            vec![Match::Daddr(host_net(ip)), Match::Dport(p, port)],
                            Verdict::Drop,
                        ));
                    }
                } else if seen.insert(ip) {
                    rules.push(rule(vec![Match::Daddr(host_net(ip))], Verdict::Drop));
                }
            }
            rules
        };
        let allow_sets: Vec<Rule> = [Family::V4, Family::V6]
            .map(|family| {
                rule(
                    vec![Match::AllowSet {
                        family,
                        per_client: fw.per_client,
                    }],
                    Verdict::Accept,
                )
            })
            .to_vec();
        let allow_cidrs: Vec<Rule> = cidrs
            .iter()
            .map(|n| rule(vec![Match::Daddr(*n)], Verdict::Accept))
            .collect();
        let nd: Vec<Rule> = NdType::ACCEPTED
            .map(|t| rule(vec![Match::Icmpv6(t)], Verdict::Accept))
            .to_vec();
        let ct = rule(vec![Match::CtEstablishedRelated], Verdict::Accept);
        let mut tail = Vec::new();
        if fw.log_denied {
            tail.push(Rule {
                matches: vec![Match::Limit, Match::Log],
                verdict: None,
            });
        }
        tail.push(rule(vec![], Verdict::Drop));

        let mut chains = Vec::new();
        if output {
            let mut rules = upstream_accept;
            rules.extend(upstream_drop.iter().cloned());
            // Loopback: dnsfence's own listen addresses, then no other DNS, then the rest.
            for &l in &listens {
                for p in Proto::BOTH {
                    rules.push(rule(listen_matches(l, p, &[Match::OifLo]), Verdict::Accept));
                }
            }
            let dns_ports: BTreeSet<u16> = DNS_PORTS
                .iter()
                .copied()
                .chain(listens.iter().map(|l| l.port))
                .collect();
            for &port in &dns_ports {
                for p in Proto::BOTH {
                    rules.push(rule(
                        vec![Match::OifLo, Match::Dport(p, port)],
                        Verdict::Drop,
                    ));
                }
            }
            rules.push(rule(vec![Match::OifLo], Verdict::Accept));
            rules.push(ct.clone());
            // Non-loopback listen addresses (a wildcard would mean "DNS to anywhere": skipped;
            // locally destined packets leave through lo and were handled above).
            for &l in &listens {
                if !l.ip.is_loopback() && !l.ip.is_unspecified() {
                    for p in Proto::BOTH {
                        rules.push(rule(listen_matches(l, p, &[]), Verdict::Accept));
                    }
                }
            }
            rules.extend(allow_sets.iter().cloned());
            rules.extend(allow_cidrs.iter().cloned());
            rules.extend(nd.iter().cloned());
            rules.extend(tail.iter().cloned());
            chains.push(Chain {
                hook: ChainHook::Output,
                rules,
            });
        }
        if forward {
            let mut rules = vec![rule(vec![Match::IifLo], Verdict::Accept), ct.clone()];
            for &l in &listens {
                if !l.ip.is_loopback() {
                    for p in Proto::BOTH {
                        rules.push(rule(listen_matches(l, p, &[]), Verdict::Accept));
                    }
                }
            }
            rules.extend(nd.iter().cloned());
            rules.extend(tail.iter().cloned());
            chains.push(Chain {
                hook: ChainHook::Input,
                rules,
            });

            let mut rules = upstream_drop;
            rules.push(rule(vec![Match::FibSaddrIifOifMissing], Verdict::Drop));
            rules.push(ct);
            rules.extend(allow_sets);
            rules.extend(allow_cidrs);
            rules.extend(nd);
            rules.extend(tail);
            chains.push(Chain {
                hook: ChainHook::Forward,
                rules,
            });
        }

        let sets = [Family::V4, Family::V6]
            .map(|family| SetDef {
                family,
                per_client: fw.per_client,
                size: fw.set_size,
            })
            .to_vec();
        Ok(Layout {
            table: fw.table.clone(),
            sets,
            chains,
        })
    }

    /// The layout as nft text, formatted exactly like `nft list table inet <table>` prints it
    /// (when its sets are empty), after a comment header.
    pub(crate) fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# nftables ruleset of dnsfence (what `dnsfence` installs at start-up).\n\
             # Compare with the live table: nft list table inet {t}\n\
             # Apply by hand (replaces the table, dropping its elements):\n\
             #   nft delete table inet {t}; nft -f <this file>",
            t = self.table
        );
        let _ = writeln!(s, "table inet {} {{", self.table);
        let mut first = true;
        for set in &self.sets {
            if !first {
                s.push('\n');
            }
            first = false;
            let _ = writeln!(s, "\tset {} {{", set.name());
            let _ = writeln!(s, "\t\ttype {}", set.type_text());
            let _ = writeln!(s, "\t\tsize {}", set.size);
            let _ = writeln!(s, "\t\tflags timeout");
            let _ = writeln!(s, "\t}}");
        }
        for chain in &self.chains {
            if !first {
                s.push('\n');
            }
            first = false;
            let _ = writeln!(s, "\tchain {} {{", chain.name());
            let _ = writeln!(
                s,
                "\t\ttype filter hook {} priority filter; policy {};",
                chain.hook.name(),
                CHAIN_POLICY.name()
            );
            for r in &chain.rules {
                let _ = writeln!(s, "\t\t{}", r.text());
            }
            let _ = writeln!(s, "\t}}");
        }
        s.push_str("}\n");
        s
    }
}

fn addr_text(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

impl Match {
    fn text(&self) -> String {
        match self {
            Match::Mark(m) => format!("meta mark 0x{m:08x}"),
            Match::OifLo => "oif \"lo\"".to_string(),
            Match::IifLo => "iif \"lo\"".to_string(),
            Match::NfProto(f) => format!("meta nfproto {}", f.nft_name()),
            Match::Daddr(net) => {
                let f = Family::of(net.addr());
                format!("{} daddr {}", f.header(), addr_text(net))
            }
            Match::Dport(p, port) => format!("{} dport {port}", p.name()),
            Match::CtEstablishedRelated => "ct state established,related".to_string(),
            Match::AllowSet { family, per_client } => {
                let h = family.header();
                if *per_client {
                    format!("{h} saddr . {h} daddr @{}", family.set_name())
                } else {
                    format!("{h} daddr @{}", family.set_name())
                }
            }
            Match::FibSaddrIifOifMissing => "fib saddr . iif oif missing".to_string(),
            Match::Icmpv6(t) => format!("icmpv6 type {}", t.name()),
            Match::Limit => format!("limit rate {LOG_RATE_PER_SECOND}/second"),
            Match::Log => format!("log prefix \"{LOG_PREFIX}\""),
        }
    }
}

impl Rule {
    /// The rule as nft prints it.
    pub(crate) fn text(&self) -> String {
        let mut parts: Vec<String> = self.matches.iter().map(Match::text).collect();
        if let Some(v) = self.verdict {
            parts.push(v.name().to_string());
        }
        parts.join(" ")
    }

    /// The rule as netlink expressions, in order.
    pub(crate) fn exprs(&self) -> Vec<Expr> {
        let mut out = Vec::new();
        for m in &self.matches {
            m.lower(&mut out);
        }
        if let Some(v) = self.verdict {
            out.push(Expr::Verdict(v));
        }
        out
    }
}

/// Registers: `1` is the first 16-byte register, `2` the second; `9` is the second 4-byte
/// register (NFT_REG32_01), right after the first 4 bytes of register 1.
pub(crate) const REG1: u32 = 1;
const REG2: u32 = 2;
const REG32_01: u32 = 9;

/// `meta` keys used here (`enum nft_meta_keys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetaKey {
    Mark,
    Iif,
    Oif,
    NfProto,
    L4Proto,
}

/// `payload` bases (`enum nft_payload_bases`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PayloadBase {
    Network,
    Transport,
}

impl PayloadBase {
    pub(crate) fn number(self) -> u32 {
        match self {
            PayloadBase::Network => 1,
            PayloadBase::Transport => 2,
        }
    }
}

/// One netlink expression, as `nft --debug=netlink` prints them. Data is in the byte order the
/// kernel compares: addresses and ports big-endian, meta values (mark, ifindex) host order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Expr {
    /// `[ meta load <key> => reg 1 ]`
    Meta { key: MetaKey, dreg: u32 },
    /// `[ payload load <len>b @ <base> header + <offset> => reg <dreg> ]`
    Payload {
        base: PayloadBase,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// `[ cmp eq|neq reg 1 <data> ]`
    Cmp { neq: bool, data: Vec<u8> },
    /// `[ bitwise reg 1 = ( reg 1 & <mask> ) ^ <xor> ]`
    Bitwise { mask: Vec<u8>, xor: Vec<u8> },
    /// `[ lookup reg 1 set <set> ]`
    Lookup { set: &'static str },
    /// `[ ct load state => reg 1 ]`
    CtState,
    /// `[ fib saddr . iif oif present => reg 1 ]`
    FibSaddrIifOifPresent,
    /// `[ limit rate N/second burst 5 type packets flags 0x0 ]`
    Limit { rate: u64, burst: u32 },
    /// `[ log prefix … ]`
    Log { prefix: &'static str },
    /// `[ immediate reg 0 accept|drop ]`
    Verdict(Verdict),
}

fn cmp_eq(data: impl Into<Vec<u8>>) -> Expr {
    Expr::Cmp {
        neq: false,
        data: data.into(),
    }
}

fn meta(key: MetaKey) -> Expr {
    Expr::Meta { key, dreg: REG1 }
}

fn network(offset: u32, len: u32, dreg: u32) -> Expr {
    Expr::Payload {
        base: PayloadBase::Network,
        offset,
        len,
        dreg,
    }
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn mask_octets(net: &IpNet) -> Vec<u8> {
    match net {
        IpNet::V4(n) => n.netmask().octets().to_vec(),
        IpNet::V6(n) => n.netmask().octets().to_vec(),
    }
}

/// `ct state` bits: established (2) and related (4).
const CT_ESTABLISHED_RELATED: u32 = 2 | 4;

impl Match {
    fn lower(&self, out: &mut Vec<Expr>) {
        match self {
            Match::Mark(m) => {
                out.push(meta(MetaKey::Mark));
                out.push(cmp_eq(m.to_ne_bytes()));
            }
            Match::OifLo => {
                out.push(meta(MetaKey::Oif));
                out.push(cmp_eq(1u32.to_ne_bytes()));
            }
            Match::IifLo => {
                out.push(meta(MetaKey::Iif));
                out.push(cmp_eq(1u32.to_ne_bytes()));
            }
            Match::NfProto(f) => {
                out.push(meta(MetaKey::NfProto));
                out.push(cmp_eq([f.nfproto()]));
            }
            Match::Daddr(net) => {
                let f = Family::of(net.addr());
                Match::NfProto(f).lower(out);
                let prefix = u32::from(net.prefix_len());
                if prefix > 0 && prefix % 8 == 0 {
                    // nft loads just the prefix bytes when the prefix is byte-aligned.
                    let len = prefix / 8;
                    out.push(network(f.daddr_offset(), len, REG1));
                    let mut data = octets(net.addr());
                    data.truncate(len as usize);
                    out.push(cmp_eq(data));
                } else {
                    out.push(network(f.daddr_offset(), f.addr_len(), REG1));
                    let mask = mask_octets(net);
                    let xor = vec![0; mask.len()];
                    out.push(Expr::Bitwise { mask, xor });
                    out.push(cmp_eq(octets(net.network())));
                }
            }
            Match::Dport(p, port) => {
                out.push(meta(MetaKey::L4Proto));
                out.push(cmp_eq([p.number()]));
                out.push(Expr::Payload {
                    base: PayloadBase::Transport,
                    offset: 2,
                    len: 2,
                    dreg: REG1,
                });
                out.push(cmp_eq(port.to_be_bytes()));
            }
            Match::CtEstablishedRelated => {
                out.push(Expr::CtState);
                out.push(Expr::Bitwise {
                    mask: CT_ESTABLISHED_RELATED.to_ne_bytes().to_vec(),
                    xor: vec![0; 4],
                });
                out.push(Expr::Cmp {
                    neq: true,
                    data: vec![0; 4],
                });
            }
            Match::AllowSet { family, per_client } => {
                Match::NfProto(*family).lower(out);
                let len = family.addr_len();
                if *per_client {
                    out.push(network(family.saddr_offset(), len, REG1));
                    let second = match family {
                        Family::V4 => REG32_01,
                        Family::V6 => REG2,
                    };
                    out.push(network(family.daddr_offset(), len, second));
                } else {
                    out.push(network(family.daddr_offset(), len, REG1));
                }
                out.push(Expr::Lookup {
                    set: family.set_name(),
                });
            }
            Match::FibSaddrIifOifMissing => {
                out.push(Expr::FibSaddrIifOifPresent);
                out.push(cmp_eq([0u8; 4]));
            }
            Match::Icmpv6(t) => {
                Match::NfProto(Family::V6).lower(out);
                out.push(meta(MetaKey::L4Proto));
                out.push(cmp_eq([58u8]));
                out.push(Expr::Payload {
                    base: PayloadBase::Transport,
                    offset: 0,
                    len: 1,
                    dreg: REG1,
                });
                out.push(cmp_eq([t.number()]));
            }
            Match::Limit => out.push(Expr::Limit {
                rate: LOG_RATE_PER_SECOND,
                burst: LOG_BURST,
            }),
            Match::Log => out.push(Expr::Log { prefix: LOG_PREFIX }),
        }
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
    use std::net::SocketAddr;

    /// The shared test policy with two listen addresses, two upstreams (v4 and v6) and
    /// static CIDRs in odd spellings (host bits set, IPv4-mapped).
    fn policy(hooks: Vec<Hook>, per_client: bool) -> Policy {
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let mut p = crate::firewall::testns::policy("dnsfence");
        p.listen = vec![sa("127.0.0.1:53"), sa("10.9.0.1:53")];
        p.upstreams = vec![sa("192.0.2.53:53"), sa("[2001:db8::53]:53")];
        p.firewall.hooks = hooks;
        p.firewall.per_client = per_client;
        p.firewall.allow_cidrs = vec![
            "10.1.2.3/8".parse().unwrap(),
            "::ffff:192.0.2.0/120".parse().unwrap(),
        ];
        p.firewall.log_denied = true;
        p.firewall.mark = 0x2a;
        p
    }

    fn chain(l: &Layout, hook: ChainHook) -> Vec<String> {
        l.chains
            .iter()
            .find(|c| c.hook == hook)
            .map(|c| c.rules.iter().map(Rule::text).collect())
            .unwrap_or_default()
    }

    #[test]
    fn output_order_puts_upstream_drop_before_established() {
        let l = Layout::from_policy(&policy(vec![Hook::Output], false)).unwrap();
        let rules = chain(&l, ChainHook::Output);
        let pos = |s: &str| rules.iter().position(|r| r == s).unwrap();
        let mark = pos("meta mark 0x0000002a ip daddr 192.0.2.53 udp dport 53 accept");
        let drop = pos("ip daddr 192.0.2.53 drop");
        let drop6 = pos("ip6 daddr 2001:db8::53 drop");
        let lo_dns = pos("oif \"lo\" ip daddr 127.0.0.1 udp dport 53 accept");
        let lo_other = pos("oif \"lo\" udp dport 853 drop");
        let lo = pos("oif \"lo\" accept");
        let ct = pos("ct state established,related accept");
        let listen = pos("ip daddr 10.9.0.1 tcp dport 53 accept");
        let set = pos("ip daddr @allow4 accept");
        let cidr = pos("ip daddr 10.0.0.0/8 accept");
        let mapped = pos("ip daddr 192.0.2.0/24 accept");
        let nd = pos("icmpv6 type nd-neighbor-solicit accept");
        let log = pos("limit rate 10/second log prefix \"dnsfence drop \"");
        assert!(mark < drop && drop < drop6 && drop6 < lo_dns && lo_dns < lo_other);
        assert!(lo_other < lo && lo < ct && ct < listen && listen < set && set < cidr);
        assert!(cidr < mapped && mapped < nd && nd < log);
        assert_eq!(rules.last().map(String::as_str), Some("drop"));
        assert!(!l.chains.iter().any(|c| c.hook != ChainHook::Output));
    }

    #[test]
    fn forward_adds_input_and_rpf() {
        let l = Layout::from_policy(&policy(vec![Hook::Forward], true)).unwrap();
        let names: Vec<_> = l.chains.iter().map(|c| c.name()).collect();
        assert_eq!(names, ["input", "forward"]);
        let fwd = chain(&l, ChainHook::Forward);
        assert_eq!(fwd[0], "ip daddr 192.0.2.53 drop");
        assert_eq!(fwd[2], "fib saddr . iif oif missing drop");
        assert_eq!(fwd[3], "ct state established,related accept");
        assert_eq!(fwd[4], "ip saddr . ip daddr @allow4 accept");
        assert_eq!(fwd[5], "ip6 saddr . ip6 daddr @allow6 accept");
        let inp = chain(&l, ChainHook::Input);
        assert_eq!(inp[0], "iif \"lo\" accept");
        assert!(inp.contains(&"ip daddr 10.9.0.1 udp dport 53 accept".to_string()));
        assert!(!inp.iter().any(|r| r.contains("127.0.0.1")));
    }

    #[test]
    fn rejects_dangerous_settings() {
        let mut p = policy(vec![Hook::Output], false);
        p.firewall.mark = 0;
        assert!(Layout::from_policy(&p).unwrap_err().contains("mark"));
        let mut p = policy(vec![Hook::Output], false);
        p.firewall.set_size = 0;
        assert!(Layout::from_policy(&p).unwrap_err().contains("set_size"));
        let mut p = policy(vec![], false);
        p.firewall.hooks.clear();
        assert!(Layout::from_policy(&p).is_err());
        for bad in ["", "1x", "a b", "x;flush ruleset", "a{", "é"] {
            assert!(check_table_name(bad).is_err(), "{bad}");
        }
        assert!(check_table_name("dnsfence_2").is_ok());
    }

    #[test]
    fn wildcard_listen_never_opens_dns_to_anywhere() {
        let mut p = policy(vec![Hook::Output, Hook::Forward], false);
        p.listen = vec!["0.0.0.0:53".parse().unwrap()];
        let l = Layout::from_policy(&p).unwrap();
        let out = chain(&l, ChainHook::Output);
        // Allowed on loopback only, in output.
        assert!(out.contains(&"oif \"lo\" meta nfproto ipv4 udp dport 53 accept".to_string()));
        assert!(!out.contains(&"meta nfproto ipv4 udp dport 53 accept".to_string()));
        let inp = chain(&l, ChainHook::Input);
        assert!(inp.contains(&"meta nfproto ipv4 udp dport 53 accept".to_string()));
    }

    #[test]
    fn loopback_upstream_drops_only_its_port() {
        let mut p = policy(vec![Hook::Output], false);
        p.upstreams = vec!["127.0.0.1:5353".parse().unwrap()];
        let l = Layout::from_policy(&p).unwrap();
        let out = chain(&l, ChainHook::Output);
        assert!(out.contains(&"ip daddr 127.0.0.1 udp dport 5353 drop".to_string()));
        assert!(!out.contains(&"ip daddr 127.0.0.1 drop".to_string()));
    }

    #[test]
    fn lowering_matches_nft() {
        let r = Rule {
            matches: vec![Match::Daddr("10.1.2.0/23".parse().unwrap())],
            verdict: Some(Verdict::Accept),
        };
        let e = r.exprs();
        assert_eq!(e.len(), 6);
        assert_eq!(
            e[3],
            Expr::Bitwise {
                mask: vec![255, 255, 254, 0],
                xor: vec![0; 4]
            }
        );
        let r = Rule {
            matches: vec![Match::Daddr("10.0.0.0/8".parse().unwrap())],
            verdict: None,
        };
        assert_eq!(r.exprs()[2], network(16, 1, REG1));
        assert_eq!(r.exprs()[3], cmp_eq([10u8]));
    }

    #[test]
    #[ignore = "prints the rendered ruleset"]
    fn print_render() {
        let l = Layout::from_policy(&policy(vec![Hook::Output, Hook::Forward], false)).unwrap();
        println!("{}", l.render());
    }

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
