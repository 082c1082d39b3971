//! From policy to [`Layout`]: validation, then one builder per base chain.
//!
//! [`Parts`] holds what the chains share (the upstreams, the listen addresses, the rule groups
//! that several chains repeat); `output_chain`, `input_chain` and `forward_chain` each put them
//! in the order the module documentation of `ruleset` explains.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use ipnet::{IpNet, Ipv4Net};

use super::contain::Contained;
use super::keys::normalize_ip;
use super::model::{
    Chain, ChainHook, ChainKind, DNS_PORTS, Family, Layout, Match, NdType, Proto, Rule, SetDef,
    Verdict,
};
use super::subids;
use crate::policy::{FirewallPolicy, Hook, HostDns, Policy, Transport};

/// `ff02::2`, all routers on the link: where router solicitations go.
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);

/// Docker's embedded DNS server in a container on a user-defined network.
const EMBEDDED_DNS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);

/// Truncates host bits and turns an IPv4-mapped prefix (at least /96) into its IPv4 prefix.
pub(super) fn normalize_net(net: IpNet) -> IpNet {
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
        dnat: None,
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

/// Validates the firewall part of a policy with the policy's own checks (the ones `dnsfence
/// check` runs), so a policy built in code is held to the same rules as one read from a file.
fn validate(fw: &FirewallPolicy) -> Result<(), String> {
    match crate::policy::firewall_problems(fw).into_iter().next() {
        Some(problem) => Err(problem.message),
        None => Ok(()),
    }
}

/// What the chains are built from.
struct Parts {
    mark: u32,
    per_client: bool,
    /// Log drops: `Some(None)` to the kernel log, `Some(Some(group))` to an NFLOG group.
    log: Option<Option<u16>>,
    listens: BTreeSet<Listen>,
    upstreams: BTreeSet<(IpAddr, u16)>,
    cidrs: Vec<IpNet>,
    /// Ports that outside hosts may open connections to, on sockets of any user.
    inbound: Vec<(Proto, u16)>,
    /// `firewall.contain`; `None`: everything is contained.
    contain: Option<Contained>,
    /// `firewall.contain.host_dns: dnsfence`: the uncontained host's own DNS goes to dnsfence
    /// only (without `contain` every process is contained, and so is its DNS).
    host_dns_to_dnsfence: bool,
}

impl Parts {
    fn of(policy: &Policy) -> Result<Parts, String> {
        let fw = &policy.firewall;
        let contain = match &fw.contain {
            Some(c) => {
                let dir = c
                    .subids_from
                    .as_deref()
                    .unwrap_or(Path::new(subids::DEFAULT_DIR));
                Some(Contained::of(c).with_subordinate_ids(dir)?)
            }
            None => None,
        };
        let listens = policy
            .listen
            .iter()
            .map(|s| Listen {
                ip: normalize_ip(s.ip()),
                port: s.port(),
            })
            .collect();
        let upstreams = policy
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
        Ok(Parts {
            contain,
            host_dns_to_dnsfence: fw
                .contain
                .as_ref()
                .is_some_and(|c| c.host_dns == HostDns::Dnsfence),
            mark: fw.mark,
            per_client: fw.per_client,
            log: fw.log_denied.then_some(fw.nflog_group),
            listens,
            upstreams,
            cidrs,
            inbound: fw
                .inbound
                .iter()
                .map(|i| {
                    let proto = match i.transport {
                        Transport::Tcp => Proto::Tcp,
                        Transport::Udp => Proto::Udp,
                    };
                    (proto, i.port)
                })
                .collect(),
        })
    }

    /// The gate of `output`: what no contained process sent passes untouched.
    fn local_gate(&self) -> Vec<Rule> {
        self.contain
            .as_ref()
            .map(Contained::local_gate)
            .unwrap_or_default()
    }

    /// The gate of the routed chains (`both_ways` in `forward`).
    fn routed_gate(&self, both_ways: bool) -> Vec<Rule> {
        self.contain
            .as_ref()
            .map(|c| c.routed_gate(both_ways))
            .unwrap_or_default()
    }

    /// Per family (IPv4 first), the first listen address of that family that `target` turns
    /// into a place to send intercepted DNS to; a family with none has no target.
    fn intercept_targets(&self, target: impl Fn(Listen) -> Option<IpAddr>) -> Vec<SocketAddr> {
        [Family::V4, Family::V6]
            .into_iter()
            .filter_map(|family| {
                self.listens
                    .iter()
                    .filter(|l| Family::of(l.ip) == family)
                    .find_map(|&l| target(l).map(|ip| SocketAddr::new(ip, l.port)))
            })
            .collect()
    }

    /// Where the `output` nat chain sends a local process's DNS, per family: the first
    /// loopback listen address of that family (a wildcard one counts as `127.0.0.1`/`::1`).
    fn local_intercept_targets(&self) -> Vec<SocketAddr> {
        self.intercept_targets(|l| match l.ip {
            ip if ip.is_loopback() => Some(ip),
            IpAddr::V4(ip) if ip.is_unspecified() => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            IpAddr::V6(ip) if ip.is_unspecified() => Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            _ => None,
        })
    }

    /// Where the `prerouting` nat chain sends a routed agent's DNS, per family: the first
    /// listen address of that family that is neither loopback (the kernel drops packets
    /// routed to loopback) nor a wildcard (no address to write).
    fn routed_intercept_targets(&self) -> Vec<SocketAddr> {
        self.intercept_targets(|l| (!l.ip.is_loopback() && !l.ip.is_unspecified()).then_some(l.ip))
    }

    /// A nat chain on `hook`: what the `pass` rules accept is left alone, everything else's DNS
    /// (UDP and TCP 53) is rewritten to dnsfence, one rule per protocol and target. No chain
    /// when there is no target.
    fn intercept_chain(hook: ChainHook, pass: Vec<Rule>, targets: &[SocketAddr]) -> Option<Chain> {
        if targets.is_empty() {
            return None;
        }
        let mut rules = pass;
        for &to in targets {
            for p in Proto::BOTH {
                rules.push(Rule {
                    matches: vec![Match::Dport(p, 53)],
                    verdict: None,
                    dnat: Some(to),
                });
            }
        }
        Some(Chain {
            hook,
            kind: ChainKind::Nat,
            rules,
        })
    }

    /// The `output` nat chain: a contained process's DNS to any address goes to dnsfence
    /// (dnsfence's own marked queries and, with `contain`, everyone else's are left alone).
    fn intercept_output_chain(&self) -> Option<Chain> {
        let mut pass = self.local_gate();
        pass.push(rule(vec![Match::Mark(self.mark)], Verdict::Accept));
        Self::intercept_chain(ChainHook::Output, pass, &self.local_intercept_targets())
    }

    /// The `prerouting` nat chain: a routed agent's DNS to any address goes to dnsfence.
    fn intercept_prerouting_chain(&self) -> Option<Chain> {
        let mut pass = vec![rule(vec![Match::IifLo], Verdict::Accept)];
        pass.extend(self.routed_gate(false));
        Self::intercept_chain(
            ChainHook::Prerouting,
            pass,
            &self.routed_intercept_targets(),
        )
    }

    /// In `output`, intercepted DNS: after the nat chain its destination is dnsfence's, but
    /// its output interface is still the one the original destination routed to (not `lo`).
    fn intercepted_accept(&self) -> Vec<Rule> {
        let mut rules = Vec::new();
        if self.contain.is_none() {
            return rules;
        }
        for to in self.local_intercept_targets() {
            for p in Proto::BOTH {
                rules.push(rule(
                    vec![
                        Match::CtStatusDnat,
                        Match::Daddr(host_net(to.ip())),
                        Match::Dport(p, to.port()),
                    ],
                    Verdict::Accept,
                ));
            }
        }
        rules
    }

    /// dnsfence's own marked queries to an upstream address and port.
    fn upstream_accept(&self) -> Vec<Rule> {
        self.upstreams
            .iter()
            .flat_map(|&(ip, port)| {
                Proto::BOTH.map(|p| {
                    rule(
                        vec![
                            Match::Mark(self.mark),
                            Match::Daddr(host_net(ip)),
                            Match::Dport(p, port),
                        ],
                        Verdict::Accept,
                    )
                })
            })
            .collect()
    }

    /// Anything else to an upstream (for a loopback upstream: to its port only).
    fn upstream_drop(&self) -> Vec<Rule> {
        let mut rules = Vec::new();
        let mut seen = BTreeSet::new();
        for &(ip, port) in &self.upstreams {
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
    }

    /// In `output`, an upstream's port on *every* address of this host. A resolver on the
    /// host that dnsfence uses as its upstream (`127.0.0.1:5399`, or one of the host's own
    /// addresses) usually listens on the wildcard, so it also answers at `127.0.0.2`, `::1`
    /// and every interface address: an agent would ask it any name. Ports 53 and 853 and
    /// dnsfence's listen ports are already dropped to everything but dnsfence; this covers
    /// the others, for every upstream (the rule cannot know which of the host's addresses a
    /// remote-looking upstream is, and a contained process has no business on that port).
    fn upstream_port_drop_local(&self) -> Vec<Rule> {
        let covered: BTreeSet<u16> = DNS_PORTS
            .iter()
            .copied()
            .chain(self.listens.iter().map(|l| l.port))
            .collect();
        let ports: BTreeSet<u16> = self
            .upstreams
            .iter()
            .map(|&(_, port)| port)
            .filter(|port| !covered.contains(port))
            .collect();
        ports
            .into_iter()
            .flat_map(|port| {
                Proto::BOTH.map(|p| {
                    rule(
                        // The port first: cheaper than a route lookup, and most packets
                        // stop there.
                        vec![Match::Dport(p, port), Match::FibDaddrLocal],
                        Verdict::Drop,
                    )
                })
            })
            .collect()
    }

    fn allow_sets(&self) -> Vec<Rule> {
        [Family::V4, Family::V6]
            .map(|family| {
                rule(
                    vec![Match::AllowSet {
                        family,
                        per_client: self.per_client,
                    }],
                    Verdict::Accept,
                )
            })
            .to_vec()
    }

    fn allow_cidrs(&self) -> Vec<Rule> {
        self.cidrs
            .iter()
            .map(|n| rule(vec![Match::Daddr(*n)], Verdict::Accept))
            .collect()
    }

    /// Neighbour discovery on the link only: hop limit 255 (RFC 4861: a router on the way
    /// would have decremented it), router solicitations only to all-routers (`ff02::2`).
    fn neighbour_discovery() -> Vec<Rule> {
        let mut rules: Vec<Rule> = NdType::NEIGHBOUR
            .map(|t| rule(vec![Match::Icmpv6(t), Match::HopLimit255], Verdict::Accept))
            .to_vec();
        rules.push(rule(
            vec![
                Match::Icmpv6(NdType::RouterSolicit),
                Match::HopLimit255,
                Match::Daddr(host_net(IpAddr::V6(ALL_ROUTERS))),
            ],
            Verdict::Accept,
        ));
        rules
    }

    /// No neighbour discovery message is ever forwarded: with options, one carries over a
    /// kilobyte, and Linux forwards those whose addresses are not link-local.
    fn neighbour_discovery_drop() -> Vec<Rule> {
        NdType::ALL
            .map(|t| rule(vec![Match::Icmpv6(t)], Verdict::Drop))
            .to_vec()
    }

    /// DNS (53) and DNS over TLS or QUIC (853) to anything that is not dnsfence: UDP and TCP,
    /// IPv4 and IPv6. Any admitted host that runs a resolver would otherwise be a DNS tunnel.
    /// With an NFLOG group, each is logged first (rate-limited, in a rule of its own without
    /// a verdict: a limit that fails must not skip the drop), so that dnsfence can explain
    /// the drop as a DNS bypass.
    fn dns_drop(&self, prefix: &[Match], ports: &BTreeSet<u16>) -> Vec<Rule> {
        self.dns_drop_by(prefix, ports, Match::Dport)
    }

    /// Like [`dns_drop`](Self::dns_drop), by the destination port the connection was opened
    /// to (its conntrack entry's original tuple), and only in that direction: replies of
    /// dnsfence's own listeners are the other direction of such connections.
    fn nat_dns_drop(&self, prefix: &[Match], ports: &BTreeSet<u16>) -> Vec<Rule> {
        self.dns_drop_by(prefix, ports, Match::OpenedToPort)
    }

    /// The drops of [`dns_drop`](Self::dns_drop) and [`nat_dns_drop`](Self::nat_dns_drop),
    /// each preceded by its NFLOG rule when the policy logs drops.
    fn dns_drop_by(
        &self,
        prefix: &[Match],
        ports: &BTreeSet<u16>,
        port_match: fn(Proto, u16) -> Match,
    ) -> Vec<Rule> {
        let mut rules = Vec::new();
        for &port in ports {
            for p in Proto::BOTH {
                let mut m = prefix.to_vec();
                m.push(port_match(p, port));
                if let Some(Some(group)) = self.log {
                    let mut logged = m.clone();
                    logged.extend([Match::Limit, Match::Log(Some(group))]);
                    rules.push(Rule {
                        matches: logged,
                        verdict: None,
                        dnat: None,
                    });
                }
                rules.push(rule(m, Verdict::Drop));
            }
        }
        rules
    }

    /// Replies on connections that outside hosts opened: from root's sockets (sshd and the
    /// like), from dnsfence's listen ports and from the listed ports only. An agent (a user
    /// other than root) that listens on a port gets nothing back out.
    fn inbound(&self) -> Vec<Rule> {
        // (source address, for a listen address that is not a wildcard; protocol; port)
        let mut ports: BTreeSet<(Option<IpAddr>, Proto, u16)> = self
            .inbound
            .iter()
            .map(|&(p, port)| (None, p, port))
            .collect();
        for l in self.listens.iter().filter(|l| !l.ip.is_loopback()) {
            let from = (!l.ip.is_unspecified()).then_some(l.ip);
            for p in Proto::BOTH {
                ports.insert((from, p, l.port));
            }
        }
        let mut rules: Vec<Rule> = ports
            .into_iter()
            .map(|(from, p, port)| {
                let mut m = vec![Match::CtDirectionReply];
                m.extend(from.map(Match::Saddr));
                m.push(Match::Sport(p, port));
                rule(m, Verdict::Accept)
            })
            .collect();
        rules.push(rule(
            vec![Match::CtDirectionReply, Match::SkUidNotRoot],
            Verdict::Drop,
        ));
        rules
    }

    /// The source check on every packet before anything else sees it (`prerouting`, priority
    /// raw: before conntrack, routing and any local socket).
    ///
    /// With `contain.sources` the check comes first, for every interface: a source address
    /// selects an agent only if the agent cannot forge it, and a gate above the check would
    /// let a forged source from outside the range skip it (and then pass the `forward` gate).
    /// With only `interfaces` (which a packet cannot forge) the gate comes first and the check
    /// stays on the contained links.
    ///
    /// Loopback is accepted first (no other host can put a packet on it), but only with a
    /// source this host owns: any local user may send with a source it does not own (IPv6
    /// checks nothing on output; `IPV6_FREEBIND` binds any address without privilege), and a
    /// query to dnsfence from an agent's address would be answered as that agent (its group,
    /// its budgets, elements keyed on it), one from an outside address would have its reply
    /// (the question's bytes) sent out to that address. Only the direction that opens a
    /// connection is checked: a reply on loopback to a connection a nat rule rewrote carries
    /// the address the opener first asked for as its source (dnsfence answering a contained
    /// process's intercepted DNS as `198.51.100.99`), and a forged packet can only be a reply
    /// to a connection whose original destination it names, which delivers it to the local
    /// socket that opened that connection, not to dnsfence. Loopback packets are tracked from
    /// `output`, so the direction is known here, before conntrack's own hook.
    fn prerouting_chain(&self) -> Chain {
        let mut rules = vec![
            rule(
                vec![
                    Match::IifLo,
                    Match::CtDirectionOriginal,
                    Match::FibSaddrNotLocal,
                ],
                Verdict::Drop,
            ),
            rule(vec![Match::IifLo], Verdict::Accept),
        ];
        let by_source = self
            .contain
            .as_ref()
            .is_some_and(Contained::selects_by_source);
        if !by_source {
            rules.extend(self.routed_gate(false));
        }
        rules.push(rule(vec![Match::FibSaddrIifOifMissing], Verdict::Drop));
        Chain::filter(ChainHook::Prerouting, rules)
    }

    fn established() -> Rule {
        rule(vec![Match::CtEstablishedRelated], Verdict::Accept)
    }

    /// DNS to dnsfence's listen addresses, except loopback (and, unless `wildcards`, the
    /// wildcard addresses, which would mean "DNS to anywhere" outside `input`).
    fn listen_accept(&self, wildcards: bool) -> Vec<Rule> {
        let mut rules = Vec::new();
        for &l in &self.listens {
            if l.ip.is_loopback() || (!wildcards && l.ip.is_unspecified()) {
                continue;
            }
            for p in Proto::BOTH {
                rules.push(rule(listen_matches(l, p, &[]), Verdict::Accept));
            }
        }
        rules
    }

    /// The optional rate-limited log, then drop.
    fn tail(&self) -> Vec<Rule> {
        let mut tail = Vec::new();
        if let Some(group) = self.log {
            tail.push(Rule {
                matches: vec![Match::Limit, Match::Log(group)],
                verdict: None,
                dnat: None,
            });
        }
        tail.push(rule(vec![], Verdict::Drop));
        tail
    }

    /// DNS to dnsfence itself from this host: to each listen address through `lo` (where
    /// locally destined packets leave), to the non-loopback ones by their address, and
    /// intercepted DNS (rewritten to a loopback listen address but still leaving on the
    /// interface its first destination routed to).
    fn local_dns_to_dnsfence(&self) -> Vec<Rule> {
        let mut rules = Vec::new();
        for &l in &self.listens {
            for p in Proto::BOTH {
                rules.push(rule(listen_matches(l, p, &[Match::OifLo]), Verdict::Accept));
            }
        }
        rules.extend(self.listen_accept(false));
        rules.extend(self.intercepted_accept());
        rules
    }

    /// `host_dns: dnsfence`: every process's DNS and DNS over TLS or QUIC that leaves through
    /// another interface than `lo` (by its port, and by the port its connection was opened
    /// to, before a NAT rule rewrote it). On `lo` a host program may still ask a local stub
    /// (127.0.0.53): what the stub sends on leaves the host and meets these rules.
    fn host_dns_drop(&self) -> Vec<Rule> {
        let off_loopback = [Match::OifNameNot("lo".into())];
        let ports: BTreeSet<u16> = DNS_PORTS.into_iter().collect();
        let mut rules = self.dns_drop(&off_loopback, &ports);
        rules.extend(self.nat_dns_drop(&off_loopback, &ports));
        rules
    }

    /// A contained socket sends only from this host's own addresses: IPv6 lets any user bind
    /// any source (`IPV6_FREEBIND`) and checks nothing on output, so a contained user could
    /// send as a routed agent and be accepted by that agent's per-client elements (or ride its
    /// connections' conntrack entries). The sender gets `EPERM`. IPv6's unspecified source
    /// (`::`, duplicate address detection by the kernel, which no socket can send) is left to
    /// the neighbour discovery rules.
    fn forged_source_drop() -> Vec<Rule> {
        vec![
            rule(
                vec![Match::NfProto(Family::V4), Match::FibSaddrNotLocal],
                Verdict::Drop,
            ),
            rule(
                vec![
                    Match::SaddrNotIn(host_net(IpAddr::V6(Ipv6Addr::UNSPECIFIED))),
                    Match::FibSaddrNotLocal,
                ],
                Verdict::Drop,
            ),
        ]
    }

    /// Agents on this host.
    ///
    /// With `host_dns: dnsfence` the upstream accept, DNS to dnsfence and the off-loopback
    /// DNS drop come before the gate, so they apply to the host's own processes as well:
    /// a resolver on the host (which a contained agent can ask through NSS or D-Bus) reaches
    /// nothing but dnsfence. Otherwise the gate comes first and the table is the one from
    /// before `host_dns` existed.
    fn output_chain(&self) -> Chain {
        let mut rules = Vec::new();
        if self.host_dns_to_dnsfence {
            rules.extend(self.upstream_accept());
            rules.extend(self.local_dns_to_dnsfence());
            rules.extend(self.host_dns_drop());
            rules.extend(self.local_gate());
            rules.extend(Self::forged_source_drop());
            rules.extend(self.upstream_drop());
            rules.extend(self.upstream_port_drop_local());
        } else {
            rules.extend(self.local_gate());
            rules.extend(Self::forged_source_drop());
            rules.extend(self.upstream_accept());
            rules.extend(self.upstream_drop());
            rules.extend(self.upstream_port_drop_local());
            // DNS to dnsfence's own listen addresses, then no other DNS anywhere (below).
            rules.extend(self.local_dns_to_dnsfence());
        }
        // No other DNS anywhere: on loopback not even to the listen ports (a local stub or
        // forwarder would be a way around dnsfence), then the rest of loopback.
        let loopback_dns: BTreeSet<u16> = DNS_PORTS
            .iter()
            .copied()
            .chain(self.listens.iter().map(|l| l.port))
            .filter(|p| !DNS_PORTS.contains(p))
            .collect();
        rules.extend(self.dns_drop(&[Match::OifLo], &loopback_dns));
        rules.extend(self.dns_drop(&[], &DNS_PORTS.into_iter().collect()));
        // The same by the port a connection was opened to, before NAT rewrote it: Docker's
        // embedded DNS answers 127.0.0.11:53 on a random port that a DNAT rule sends it to, and
        // the filter hook only sees the rewritten packet.
        rules.extend(self.nat_dns_drop(&[Match::OifLo], &loopback_dns));
        rules.extend(self.nat_dns_drop(&[], &DNS_PORTS.into_iter().collect()));
        // Docker's embedded DNS also answers at 127.0.0.11 on its random port, which anyone
        // reads in /proc/net/udp and asks directly (no NAT, so no original port 53): nothing
        // at that address is dnsfence's beyond the listen addresses accepted above.
        rules.push(rule(
            vec![
                Match::OifLo,
                Match::Daddr(host_net(IpAddr::V4(EMBEDDED_DNS))),
            ],
            Verdict::Drop,
        ));
        rules.push(rule(vec![Match::OifLo], Verdict::Accept));
        rules.extend(self.inbound());
        rules.push(Self::established());
        rules.extend(self.allow_sets());
        rules.extend(self.allow_cidrs());
        rules.extend(Self::neighbour_discovery());
        rules.extend(self.tail());
        Chain::filter(ChainHook::Output, rules)
    }

    /// The gateway itself, when agents are routed through it.
    fn input_chain(&self) -> Chain {
        let mut rules = vec![rule(vec![Match::IifLo], Verdict::Accept)];
        rules.extend(self.routed_gate(false));
        rules.extend(self.listen_accept(true));
        rules.extend(self.dns_drop(&[], &DNS_PORTS.into_iter().collect()));
        rules.push(Self::established());
        rules.extend(Self::neighbour_discovery());
        rules.extend(self.tail());
        Chain::filter(ChainHook::Input, rules)
    }

    /// Agents in namespaces or containers routed through this host.
    fn forward_chain(&self) -> Chain {
        let mut rules = self.routed_gate(true);
        rules.extend(self.upstream_drop());
        rules.extend(self.dns_drop(&[], &DNS_PORTS.into_iter().collect()));
        rules.extend(Self::neighbour_discovery_drop());
        rules.push(Self::established());
        rules.extend(self.allow_sets());
        rules.extend(self.allow_cidrs());
        rules.extend(self.tail());
        Chain::filter(ChainHook::Forward, rules)
    }
}

impl Layout {
    /// Validates the firewall part of `policy` and builds the layout. Nothing here reads the
    /// host: the cgroup sets are declared empty, and the firewall fills them.
    pub(crate) fn from_policy(policy: &Policy) -> Result<Layout, String> {
        let fw: &FirewallPolicy = &policy.firewall;
        validate(fw)?;
        let parts = Parts::of(policy)?;
        let mut chains = Vec::new();
        let forward = fw.hooks.contains(&Hook::Forward);
        // Packets from other hosts reach dnsfence (or are routed by this host): check every
        // source before anything else.
        if forward || parts.listens.iter().any(|l| !l.ip.is_loopback()) {
            chains.push(parts.prerouting_chain());
        }
        if fw.hooks.contains(&Hook::Output) {
            chains.push(parts.output_chain());
        }
        if forward {
            chains.push(parts.input_chain());
            chains.push(parts.forward_chain());
        }
        // DNS interception: a contained agent's DNS to any address is answered by dnsfence.
        // Only with `contain`: without it the layout stays what it was (a restart after an
        // upgrade keeps the table and its elements), and DNS elsewhere is dropped as before.
        if fw.contain.is_some() {
            if fw.hooks.contains(&Hook::Output) {
                chains.extend(parts.intercept_output_chain());
            }
            if forward {
                chains.extend(parts.intercept_prerouting_chain());
            }
        }
        let sets = [Family::V4, Family::V6]
            .map(|family| SetDef {
                family,
                per_client: fw.per_client,
                size: fw.set_size,
            })
            .to_vec();
        let cgroup_sets = parts
            .contain
            .as_ref()
            .map(Contained::cgroup_sets)
            .unwrap_or_default();
        Ok(Layout {
            subordinate_ids: parts
                .contain
                .as_ref()
                .map(Contained::subordinate_summary)
                .unwrap_or_default(),
            table: fw.table.clone(),
            sets,
            cgroup_sets,
            chains,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::firewall::ruleset::model::ChainHook;

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

    /// Where `rule` stands in a chain's `rules` (the first place); panics listing the chain.
    fn at(rules: &[String], rule: &str) -> usize {
        rules
            .iter()
            .position(|r| r == rule)
            .unwrap_or_else(|| panic!("no rule {rule:?} in {rules:#?}"))
    }

    #[test]
    fn dns_redirected_by_nat_is_dropped_before_loopback_is_accepted() {
        // Docker's embedded DNS: 127.0.0.11:53 is DNATed to a random port before the filter
        // hook; only the conntrack entry's original port says it was DNS. Replies of
        // dnsfence's own listeners are the reply direction and must not match.
        let l = Layout::from_policy(&policy(vec![Hook::Output], false)).unwrap();
        let rules = chain(&l, ChainHook::Output);
        let pos = |s: &str| at(&rules, s);
        let own = pos("oif \"lo\" ip daddr 127.0.0.1 udp dport 53 accept");
        let lo = pos("oif \"lo\" accept");
        for rule in [
            "ct direction original meta l4proto udp ct original proto-dst 53 drop",
            "ct direction original meta l4proto tcp ct original proto-dst 53 drop",
            "ct direction original meta l4proto tcp ct original proto-dst 853 drop",
            "ct direction original meta l4proto udp ct original proto-dst 853 drop",
        ] {
            assert!(
                own < pos(rule) && pos(rule) < lo,
                "{rule} out of place: {rules:?}"
            );
        }
    }

    #[test]
    fn dockers_embedded_dns_address_is_dropped_on_every_port_but_dnsfences_own() {
        // The embedded DNS listens on 127.0.0.11 at a random port an agent can read.
        let mut p = policy(vec![Hook::Output], false);
        p.listen.push("127.0.0.11:53".parse().unwrap());
        let l = Layout::from_policy(&p).unwrap();
        let rules = chain(&l, ChainHook::Output);
        let pos = |s: &str| {
            rules
                .iter()
                .position(|r| r == s)
                .unwrap_or_else(|| panic!("no rule {s:?} in {rules:#?}"))
        };
        let own = pos("oif \"lo\" ip daddr 127.0.0.11 udp dport 53 accept");
        let embedded = pos("oif \"lo\" ip daddr 127.0.0.11 drop");
        let lo = pos("oif \"lo\" accept");
        assert!(own < embedded && embedded < lo, "{rules:#?}");
    }

    #[test]
    fn output_order_puts_upstream_and_dns_drops_before_established() {
        let l = Layout::from_policy(&policy(vec![Hook::Output], false)).unwrap();
        let rules = chain(&l, ChainHook::Output);
        let pos = |s: &str| at(&rules, s);
        let mark = pos("meta mark 0x0000002a ip daddr 192.0.2.53 udp dport 53 accept");
        let drop = pos("ip daddr 192.0.2.53 drop");
        let drop6 = pos("ip6 daddr 2001:db8::53 drop");
        let lo_dns = pos("oif \"lo\" ip daddr 127.0.0.1 udp dport 53 accept");
        let listen = pos("ip daddr 10.9.0.1 tcp dport 53 accept");
        let dns = pos("udp dport 53 drop");
        let dot = pos("tcp dport 853 drop");
        let doq = pos("udp dport 853 drop");
        let lo = pos("oif \"lo\" accept");
        let own_replies = pos("ct direction reply ip saddr 10.9.0.1 udp sport 53 accept");
        let inbound = pos("ct direction reply meta skuid != 0 drop");
        let ct = pos("ct state established,related accept");
        let set = pos("ip daddr @allow4 accept");
        let cidr = pos("ip daddr 10.0.0.0/8 accept");
        let mapped = pos("ip daddr 192.0.2.0/24 accept");
        let nd = pos("icmpv6 type nd-neighbor-solicit ip6 hoplimit 255 accept");
        let rs = pos("icmpv6 type nd-router-solicit ip6 hoplimit 255 ip6 daddr ff02::2 accept");
        let log = pos("limit rate 10/second log prefix \"dnsfence drop \"");
        assert!(mark < drop && drop < drop6 && drop6 < lo_dns && lo_dns < listen);
        assert!(listen < dns && dns < lo && dot < lo && doq < lo);
        assert!(lo < own_replies && own_replies < inbound && inbound < ct);
        assert!(ct < set && set < cidr && cidr < mapped && mapped < nd && nd < rs && rs < log);
        assert_eq!(rules.last().map(String::as_str), Some("drop"));
        // A non-loopback listen address: the source check comes first.
        let names: Vec<_> = l.chains.iter().map(|c| c.name()).collect();
        assert_eq!(names, ["prerouting", "output"]);
    }

    #[test]
    fn nflog_logs_dns_drops_and_the_tail_to_the_group() {
        let mut p = policy(vec![Hook::Output, Hook::Forward], false);
        p.firewall.nflog_group = Some(7);
        let l = Layout::from_policy(&p).unwrap();
        for hook in [ChainHook::Output, ChainHook::Forward, ChainHook::Input] {
            let rules = chain(&l, hook);
            let log = "limit rate 10/second log prefix \"dnsfence drop \" group 7";
            for dns in [
                "udp dport 53",
                "tcp dport 53",
                "udp dport 853",
                "tcp dport 853",
            ] {
                let logged = rules
                    .iter()
                    .position(|r| *r == format!("{dns} {log}"))
                    .unwrap_or_else(|| panic!("{hook:?}: no logged {dns} in {rules:#?}"));
                // The log rule has no verdict; the drop follows at once.
                assert_eq!(rules[logged + 1], format!("{dns} drop"), "{hook:?}");
            }
            assert_eq!(rules[rules.len() - 2], log, "{hook:?}");
            assert_eq!(rules.last().map(String::as_str), Some("drop"));
        }
        // Kernel log mode: DNS drops are not logged (unchanged), the tail is.
        let l = Layout::from_policy(&policy(vec![Hook::Output], false)).unwrap();
        let rules = chain(&l, ChainHook::Output);
        assert!(!rules.iter().any(|r| r.contains("dport 53 limit")));
        assert!(!rules.iter().any(|r| r.contains("group")));
    }

    #[test]
    fn dns_of_contained_agents_is_rewritten_to_dnsfence() {
        let mut p = policy(vec![Hook::Output, Hook::Forward], false);
        p.firewall.contain = Some(crate::policy::Contain {
            uids: vec![1000],
            interfaces: vec!["veth*".into()],
            ..Default::default()
        });
        let l = Layout::from_policy(&p).unwrap();
        let nat = |name: &str| -> Vec<String> {
            let c = l.chains.iter().find(|c| c.name() == name).unwrap();
            assert_eq!(c.policy(), Verdict::Accept);
            assert_eq!(c.priority(), -100);
            c.rules.iter().map(Rule::text).collect()
        };
        assert_eq!(
            nat("intercept_output"),
            [
                "meta skuid != 1000 accept",
                "meta mark 0x0000002a accept",
                "udp dport 53 dnat ip to 127.0.0.1:53",
                "tcp dport 53 dnat ip to 127.0.0.1:53",
            ]
        );
        assert_eq!(
            nat("intercept_prerouting"),
            [
                "iif \"lo\" accept",
                "iifname != \"veth*\" accept",
                "udp dport 53 dnat ip to 10.9.0.1:53",
                "tcp dport 53 dnat ip to 10.9.0.1:53",
            ]
        );
        // The rewritten packet still leaves on its original interface: the filter accepts it
        // by its new destination before the DNS drops.
        let out = chain(&l, ChainHook::Output);
        let accept = at(
            &out,
            "ct status dnat ip daddr 127.0.0.1 udp dport 53 accept",
        );
        let drop = at(&out, "udp dport 53 drop");
        assert!(accept < drop);
    }

    /// With `host_dns: dnsfence`, the rules that keep the host's own DNS on dnsfence come
    /// before the gate (so they apply to uncontained processes), in this order: dnsfence's
    /// marked upstream queries, DNS to dnsfence (and intercepted DNS), then every other DNS
    /// off loopback. With `direct` the chain is exactly the one from before `host_dns`.
    #[test]
    fn host_dns_through_dnsfence_puts_upstream_accept_and_dns_drops_before_the_gate() {
        let contained = |host_dns| {
            let mut p = policy(vec![Hook::Output], false);
            p.firewall.contain = Some(crate::policy::Contain {
                uids: vec![1000],
                host_dns,
                ..Default::default()
            });
            chain(&Layout::from_policy(&p).unwrap(), ChainHook::Output)
        };
        let rules = contained(HostDns::Dnsfence);
        let pos = |s: &str| at(&rules, s);
        let gate = pos("meta skuid != 1000 accept");
        let upstream = pos("meta mark 0x0000002a ip daddr 192.0.2.53 udp dport 53 accept");
        let own_lo = pos("oif \"lo\" ip daddr 127.0.0.1 udp dport 53 accept");
        let own = pos("ip daddr 10.9.0.1 tcp dport 53 accept");
        let intercepted = pos("ct status dnat ip daddr 127.0.0.1 tcp dport 53 accept");
        let host_drops: Vec<usize> = [
            "oifname != \"lo\" udp dport 53 drop",
            "oifname != \"lo\" tcp dport 53 drop",
            "oifname != \"lo\" udp dport 853 drop",
            "oifname != \"lo\" tcp dport 853 drop",
            "oifname != \"lo\" ct direction original meta l4proto udp ct original proto-dst 53 drop",
        ]
        .iter()
        .map(|r| pos(r))
        .collect();
        assert_eq!(upstream, 0);
        assert!(upstream < own_lo && own_lo < own && own < intercepted);
        for drop in host_drops {
            assert!(intercepted < drop && drop < gate, "{rules:#?}");
        }
        // After the gate, the agents' rules as before; the accepts before it are not repeated.
        assert!(gate < pos("ip daddr 192.0.2.53 drop"));
        assert!(gate < pos("udp dport 53 drop"));
        assert_eq!(rules.iter().filter(|r| **r == rules[own]).count(), 1);
        assert_eq!(rules.last().map(String::as_str), Some("drop"));

        let direct = contained(HostDns::Direct);
        assert_eq!(direct[0], "meta skuid != 1000 accept");
        assert!(!direct.iter().any(|r| r.contains("oifname != \"lo\"")));
        // `direct` is the gate followed by the chain of a policy without `contain`, but for
        // the intercepted DNS accept.
        let everyone = chain(
            &Layout::from_policy(&policy(vec![Hook::Output], false)).unwrap(),
            ChainHook::Output,
        );
        let without: Vec<&String> = direct[1..]
            .iter()
            .filter(|r| !r.starts_with("ct status dnat"))
            .collect();
        assert_eq!(without, everyone.iter().collect::<Vec<_>>());
    }

    /// A contained socket sending from an address this host does not own (IPv6 lets any user
    /// bind one) is dropped right after the gate: before the allow sets (keyed on the forged
    /// source with `per_client`) and before `ct state established` (another's connection).
    #[test]
    fn forged_sources_of_contained_sockets_are_dropped_after_the_gate() {
        for host_dns in [HostDns::Dnsfence, HostDns::Direct] {
            let mut p = policy(vec![Hook::Output], true);
            p.firewall.contain = Some(crate::policy::Contain {
                uids: vec![1000],
                host_dns,
                ..Default::default()
            });
            let rules = chain(&Layout::from_policy(&p).unwrap(), ChainHook::Output);
            let gate = at(&rules, "meta skuid != 1000 accept");
            let v4 = at(&rules, "meta nfproto ipv4 fib saddr type != local drop");
            let v6 = at(&rules, "ip6 saddr != :: fib saddr type != local drop");
            assert_eq!((v4, v6), (gate + 1, gate + 2), "{rules:#?}");
            assert!(v6 < at(&rules, "ct state established,related accept"));
            assert!(v6 < at(&rules, "ip6 saddr . ip6 daddr @allow6 accept"));
        }
    }

    #[test]
    fn loopback_only_output_has_no_prerouting() {
        let mut p = policy(vec![Hook::Output], false);
        p.listen = vec!["127.0.0.1:53".parse().unwrap()];
        let l = Layout::from_policy(&p).unwrap();
        let names: Vec<_> = l.chains.iter().map(|c| c.name()).collect();
        assert_eq!(names, ["output"]);
    }

    #[test]
    fn containing_by_sources_checks_the_reverse_path_before_any_gate() {
        let mut p = policy(vec![Hook::Forward], true);
        p.firewall.contain = Some(crate::policy::Contain {
            sources: vec!["10.77.0.0/24".parse().unwrap()],
            ..Default::default()
        });
        let l = Layout::from_policy(&p).unwrap();
        assert_eq!(
            chain(&l, ChainHook::Prerouting),
            [
                "iif \"lo\" ct direction original fib saddr type != local drop",
                "iif \"lo\" accept",
                "fib saddr . iif oif missing drop"
            ]
        );
        let fwd = chain(&l, ChainHook::Forward);
        assert_eq!(
            fwd[0],
            "ip saddr != 10.77.0.0/24 ip daddr != 10.77.0.0/24 accept"
        );
        assert!(!fwd.iter().any(|r| r.contains("nfproto ipv6")), "{fwd:?}");
        p.firewall.contain = Some(crate::policy::Contain {
            interfaces: vec!["to-a1".into()],
            ..Default::default()
        });
        let l = Layout::from_policy(&p).unwrap();
        assert_eq!(
            chain(&l, ChainHook::Prerouting),
            [
                "iif \"lo\" ct direction original fib saddr type != local drop",
                "iif \"lo\" accept",
                "iifname != \"to-a1\" accept",
                "fib saddr . iif oif missing drop"
            ]
        );
    }

    #[test]
    fn forward_checks_sources_first_and_never_forwards_dns_or_nd() {
        let l = Layout::from_policy(&policy(vec![Hook::Forward], true)).unwrap();
        let names: Vec<_> = l.chains.iter().map(|c| c.name()).collect();
        assert_eq!(names, ["prerouting", "input", "forward"]);
        let pre = chain(&l, ChainHook::Prerouting);
        assert_eq!(
            pre,
            [
                "iif \"lo\" ct direction original fib saddr type != local drop",
                "iif \"lo\" accept",
                "fib saddr . iif oif missing drop"
            ]
        );
        assert_eq!(l.chains[0].policy(), Verdict::Accept);
        assert_eq!(l.chains[0].priority(), -300);
        let fwd = chain(&l, ChainHook::Forward);
        let ct = at(&fwd, "ct state established,related accept");
        assert_eq!(fwd[0], "ip daddr 192.0.2.53 drop");
        for r in [
            "udp dport 53 drop",
            "tcp dport 53 drop",
            "udp dport 853 drop",
            "tcp dport 853 drop",
            "icmpv6 type nd-neighbor-solicit drop",
            "icmpv6 type nd-router-solicit drop",
            "icmpv6 type nd-redirect drop",
        ] {
            assert!(at(&fwd, r) < ct, "{r} after ct");
        }
        assert_eq!(fwd[ct + 1], "ip saddr . ip daddr @allow4 accept");
        assert_eq!(fwd[ct + 2], "ip6 saddr . ip6 daddr @allow6 accept");
        assert!(
            !fwd.iter()
                .any(|r| r.contains("accept") && r.contains("icmpv6"))
        );
        let inp = chain(&l, ChainHook::Input);
        assert_eq!(inp[0], "iif \"lo\" accept");
        let listen = at(&inp, "ip daddr 10.9.0.1 udp dport 53 accept");
        let dns = at(&inp, "udp dport 53 drop");
        let ct = at(&inp, "ct state established,related accept");
        assert!(listen < dns && dns < ct);
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
            assert!(crate::policy::check_table_name(bad).is_err(), "{bad}");
        }
        assert!(crate::policy::check_table_name("dnsfence_2").is_ok());
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
    fn loopback_upstream_drops_only_its_port_on_every_local_address() {
        let mut p = policy(vec![Hook::Output], false);
        p.upstreams = vec![
            "127.0.0.1:5353".parse().unwrap(),
            "192.0.2.53:53".parse().unwrap(),
        ];
        let l = Layout::from_policy(&p).unwrap();
        let out = chain(&l, ChainHook::Output);
        assert!(out.contains(&"ip daddr 127.0.0.1 udp dport 5353 drop".to_string()));
        assert!(!out.contains(&"ip daddr 127.0.0.1 drop".to_string()));
        // The resolver behind it answers on 127.0.0.2, ::1 and the host's addresses too,
        // before loopback is accepted; after dnsfence's own marked queries.
        let local = at(&out, "udp dport 5353 fib daddr type local drop");
        at(&out, "tcp dport 5353 fib daddr type local drop");
        assert!(local < at(&out, "oif \"lo\" accept"));
        assert!(
            at(
                &out,
                "meta mark 0x0000002a ip daddr 127.0.0.1 udp dport 5353 accept"
            ) < local
        );
        // Port 53 is dropped everywhere but dnsfence already, and dnsfence's own listen
        // addresses must stay reachable: no such rule for it.
        assert!(!out.iter().any(|r| r.starts_with("udp dport 53 fib daddr")));
    }
}
