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
//! Parts, one concern each: `model` (the IR: families, matches, rules, chains, sets),
//! `build` (validation and one builder per base chain), `contain` (the gate that hands
//! everything but the agents' traffic on to the host's own rules), `text` (nft text), `lower` (netlink
//! expressions) and `keys` (the byte keys of set elements).
//!
//! Both renderings come from one value, so what is reviewed and what is installed cannot drift;
//! the netns integration test checks it by loading the text with `nft -f` in one namespace,
//! installing through netlink in another, and comparing the kernel's bytecode of both.
//!
//! # Why the rules are in this order
//!
//! With `firewall.contain`, each chain first accepts what is not an agent's (see `contain`:
//! on `output` the socket's owner, on the other chains the interface and address; after
//! `iif "lo" accept` where that comes first). Everything below applies to the agents' packets
//! only; without `contain`, to every packet the hook sees.
//!
//! With `contain`, two `nat` chains (priority `dstnat`, -100: after conntrack, before the
//! filter chains) rewrite the agents' DNS (UDP and TCP 53, to any address) to dnsfence:
//! `intercept_output` (after the same gate and dnsfence's own marked queries) to a loopback
//! listen address, `intercept_prerouting` (after `iif "lo"` and the gate) to a non-loopback
//! one. The `output` filter chain then accepts `ct status dnat` packets to that address and
//! port before its DNS drops: the rewritten packet keeps the output interface its first
//! destination routed to, so `oif "lo"` does not match it.
//!
//! The `prerouting` chain (priority `raw`, policy accept; present with `forward`, or when
//! dnsfence listens on a non-loopback address) sees every packet that enters the host before
//! conntrack, routing or any socket does:
//!
//! 1. Loopback is accepted (no other host can put a packet on it), but only with a source
//!    this host owns (`iif "lo" ct direction original fib saddr type != local drop` first;
//!    replies are left alone, since nat rewrites their source): any local user may send
//!    over loopback from an address it does not own (IPv6 checks nothing on output, and
//!    `IPV6_FREEBIND` binds any address without privilege), to be taken by dnsfence for a
//!    routed agent, or to have dnsfence's reply sent to an outside address. This rule is for
//!    everything on the host, contained or not (a transparent proxy that connects to a local
//!    service from its client's address, or a process talking to itself from an IPv6
//!    link-local address, is dropped too).
//! 2. `fib saddr . iif oif missing drop`: a source the host would not route back out of the
//!    interface the packet came in on is forged. This is strict: the kernel looks up the best
//!    route to the source and requires one of its next hops to use that interface, so a
//!    default route through the agents' interface does not let them claim an address with a
//!    more specific route elsewhere (the upstream's, another agent's), and a source that is one
//!    of the host's own addresses finds a local route and is dropped too. It covers the input
//!    path as well as the forwarded one: a forged "reply" from the upstream's address and port
//!    would otherwise match the resolver's conntrack entry, pass `ct state established` in
//!    `input` and reach the resolver's socket; a forged query would be answered to, and
//!    counted against, another client. IPv6 has no `rp_filter` in the kernel at all, and the
//!    IPv4 one may be off: this rule does not depend on either. What it cannot tell apart is a
//!    source whose best route really is the agents' own link (an upstream that sits on the
//!    agents' network): put the upstream on another interface.
//!
//! The `output` chain (agents on this host), after the gate:
//!
//! 0. A packet whose source is not an address of this host is dropped (`fib saddr type !=
//!    local`; for IPv6 any source but `::`, which only the kernel's duplicate address
//!    detection sends): a contained user forging a routed agent's address (IPv6 lets it)
//!    would be accepted by that agent's per-client elements or ride its connections. The
//!    sender gets `EPERM`.
//! 1. dnsfence's own upstream queries carry the socket mark `firewall.mark` and go to an upstream
//!    address and port: accept them.
//! 2. Anything else to an upstream address is dropped (DNS, DoT, DoH to the trusted resolver
//!    would bypass the allowlist). This rule must come *before* `ct state established`: a
//!    process that binds the source port the resolver has just used rides the resolver's
//!    conntrack entry to the upstream otherwise. For a loopback upstream only its port is
//!    dropped, so that the rest of loopback keeps working; and every upstream's port (but 53,
//!    853 and the listen ports, dropped below to all but dnsfence) is dropped to every address
//!    of this host (`fib daddr type local`): a resolver on the host listening on the wildcard
//!    answers at `127.0.0.2`, `::1` and the interface addresses as well.
//! 3. DNS to dnsfence's own listen addresses is accepted; then DNS (UDP and TCP 53), DNS over
//!    TLS (TCP 853) and DNS over QUIC (UDP 853) to anything else is dropped, on loopback also
//!    the listen ports (a local stub or forwarder would be a way around dnsfence). This comes
//!    *before* the allow sets: an admitted host that also runs a resolver (or a CDN edge that
//!    does) would otherwise be a DNS tunnel to anywhere. The same drops again by the port the
//!    connection was opened to (`ct direction original ... ct original proto-dst`), because
//!    the filter hook sees packets after NAT: Docker's embedded DNS answers `127.0.0.11:53`
//!    on a random port a DNAT rule sends it to, which would pass as "the rest of loopback".
//! 4. The rest of loopback is accepted.
//! 5. Replies on connections that other hosts opened (`ct direction reply`) are accepted from
//!    dnsfence's listen addresses and ports and from `firewall.inbound`, and dropped when the socket belongs to a
//!    user other than root: an agent that listens on a port gets nothing back out, while sshd
//!    and other services started by root keep working. Before `ct state established`, which
//!    would accept them.
//! 6. `ct state established,related` accept (replies, and ICMP errors such as "packet too big").
//! 7. Destinations in the allow sets (per client: the pair client . destination).
//! 8. The static `allow_cidrs`.
//! 9. ICMPv6 neighbour solicitations and advertisements with hop limit 255, router
//!    solicitations with hop limit 255 to all-routers (`ff02::2`): neighbour discovery on the
//!    link, where RFC 4861 says it lives. Router advertisements are not accepted, so an agent
//!    cannot announce itself as a router.
//! 10. Rate-limited log, then drop (the chain policy is drop as well).
//!
//! The `forward` chain (agents in namespaces or containers routed through this host) drops
//! packets to the upstreams first, then DNS, DoT and DoQ to anywhere (nothing routed through
//! the host is ever DNS to dnsfence), then every neighbour discovery message (ND packets can
//! carry over a kilobyte of options and Linux forwards those whose addresses are not
//! link-local: a channel to any global address), all before `ct state established`; then it
//! accepts established traffic, the allow sets and CIDRs, logs and drops. Nothing from outside
//! reaches an agent unless the agent opened it: only established traffic and admitted
//! destinations pass. With `forward` an `input` chain protects the gateway itself: loopback,
//! DNS to dnsfence, no other DNS, established traffic, neighbour discovery on the link, nothing
//! else.
//!
//! Every address match checks `meta nfproto` first: an `inet` table sees IPv4 and IPv6 packets,
//! and loading an IPv4 address from an IPv6 header would compare garbage.

mod bind;
mod build;
mod contain;
mod keys;
mod lower;
mod model;
mod subids;
mod text;

pub(crate) use bind::{BIND_CHAIN, BIND_PRIORITY, BridgeLayout};
pub(crate) use contain::{
    CgroupPlan, Outside, cgroup_host_warnings, cgroup_root, interface_host_warnings,
    missing_cgroup_message,
};
pub(crate) use keys::{element_key, normalize_ip, parse_element_key};
pub(crate) use lower::{Expr, MetaKey};
pub(crate) use model::Verdict;
pub(crate) use model::{CgroupSetDef, Chain, ChainHook, Family, Layout, SetDef};
