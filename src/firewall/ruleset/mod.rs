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
//! `build` (validation and one builder per base chain), `text` (nft text), `lower` (netlink
//! expressions) and `keys` (the byte keys of set elements).
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

mod build;
mod keys;
mod lower;
mod model;
mod text;

pub(crate) use keys::{element_key, normalize_ip, parse_element_key};
pub(crate) use lower::{Expr, MetaKey};
#[cfg(test)]
pub(crate) use model::Verdict;
pub(crate) use model::{Chain, ChainHook, Family, Layout, SetDef};
