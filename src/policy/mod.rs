//! The policy: which names may be resolved, by whom, and what the firewall admits.
//!
//! [`Policy::load`] reads a YAML file, validates all of it and reports every error with its
//! file, line and column. Everything after loading works on these validated types only.

mod matcher;
mod name;
pub use matcher::{RuleSet, RuleSetError};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hickory_proto::rr::RecordType;
use ipnet::IpNet;

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The file it was read from (for messages).
    pub source: PathBuf,
    /// Addresses to serve DNS on, UDP and TCP on each.
    pub listen: Vec<SocketAddr>,
    /// Trusted resolvers, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// How long one query may wait for the upstreams in all before the client gets SERVFAIL.
    pub upstream_timeout: Duration,
    /// What a denied query is answered with.
    pub deny_with: DenyWith,
    /// Query types that may be forwarded for allowed names.
    pub qtypes: Vec<RecordType>,
    /// The allowlist of clients that belong to no group.
    pub default_group: Group,
    /// Client groups by source address; the first group whose `from` matches wins.
    pub clients: Vec<Group>,
    /// Where the query log goes.
    pub log: LogTarget,
    /// Lifetimes of admitted addresses.
    pub ttl: TtlPolicy,
    /// The nftables side.
    pub firewall: FirewallPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyWith {
    NxDomain,
    Refused,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    File(PathBuf),
}

/// A named allowlist: the default group (name "default", `from` empty) or a client group.
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub from: Vec<IpNet>,
    pub rules: RuleSet,
}

/// How a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleKind {
    /// `api.example.com`: exactly this name.
    Exact,
    /// `*.example.com`: exactly one label below it, never the apex.
    OneLabel,
    /// `**.example.com`: any depth below it, never the apex.
    AnyDepth,
}

/// One allow rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The rule as it is matched, lower-case A-labels, no trailing dot, with its `*.`/`**.`
    /// prefix: this is what logs and `explain` show.
    pub pattern: String,
    pub kind: RuleKind,
    /// Line of the rule in the policy file (1-based; 0 if not from a file).
    pub line: usize,
    /// Column of the rule's name in the policy file (1-based; 0 if not from a file).
    pub column: usize,
    /// Private or internal networks that answers for names of this rule may contain, in
    /// addition to the group's `allow_answers`.
    pub allow_answers: Vec<IpNet>,
}

/// Lifetimes of admitted addresses: `clamp(ttl, min, max) + grace`.
#[derive(Debug, Clone, Copy)]
pub struct TtlPolicy {
    pub min: Duration,
    pub max: Duration,
    pub grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Output,
    Forward,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExit {
    Keep,
    Remove,
}

#[derive(Debug, Clone)]
pub struct FirewallPolicy {
    pub enabled: bool,
    /// nftables table name (family inet).
    pub table: String,
    pub hooks: Vec<Hook>,
    /// Static destinations always allowed.
    pub allow_cidrs: Vec<IpNet>,
    pub per_client: bool,
    pub log_denied: bool,
    pub on_exit: OnExit,
    /// Maximum number of elements in each allow set.
    pub set_size: u32,
    /// Socket mark dnsfence puts on its own upstream queries, so the ruleset can tell them apart
    /// from an agent's (setting a mark needs CAP_NET_ADMIN).
    pub mark: u32,
}
