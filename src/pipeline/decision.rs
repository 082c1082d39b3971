//! Stage 2: may this question leave the machine?
//!
//! The decision is a pure function of the policy, the client address and the question (plus the
//! per-client budgets of [`super::limits`]), so that `dnsfence explain` can print exactly what
//! the server would do. A denied question is answered locally and never forwarded: forwarding a
//! denied name would itself be the exfiltration channel, since the name reaches whoever runs the
//! authoritative server for it.

use std::fmt;
use std::net::IpAddr;

use hickory_proto::rr::{Name, RecordType};

use crate::policy::{Policy, Rule, RuleKind};

/// Why a query was answered locally instead of being forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// The name matches no rule of the client's group.
    Policy,
    /// The query type (or class) is not one the policy forwards.
    Qtype,
    /// A special-use name (RFC 6761 and friends) that never belongs upstream.
    SpecialUse,
    /// Every address of the answer was one that must never be admitted (DNS rebinding).
    Rebinding,
    /// The client spent its budget of distinct names under a wildcard, or the name is too long
    /// to be anything but a payload.
    ExfiltrationBudget,
    /// The client sends queries faster than its rate limit.
    RateLimit,
    /// Not a well-formed single-question query.
    Malformed,
    /// An opcode other than QUERY.
    Opcode,
}

impl DenyReason {
    /// The name used in the query log and by `explain`.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Policy => "policy",
            DenyReason::Qtype => "qtype",
            DenyReason::SpecialUse => "special-use",
            DenyReason::Rebinding => "rebinding",
            DenyReason::ExfiltrationBudget => "exfiltration-budget",
            DenyReason::RateLimit => "rate-limit",
            DenyReason::Malformed => "malformed",
            DenyReason::Opcode => "opcode",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of the policy stage.
#[derive(Debug, Clone)]
pub enum Decision<'p> {
    Allow { group: &'p str, rule: &'p Rule },
    Deny(DenyReason),
}

/// Special-use suffixes that are never forwarded, whatever the policy says (except `test`, which
/// a policy may name on purpose for a lab). `use-application-dns.net` is the canary browsers query
/// to decide whether to switch their own DNS-over-HTTPS on: answering it NXDOMAIN turns DoH off.
const SPECIAL_USE: &[&[&[u8]]] = &[
    &[b"localhost"],
    &[b"local"],
    &[b"onion"],
    &[b"invalid"],
    &[b"alt"],
    &[b"home", b"arpa"],
    &[b"in-addr", b"arpa"],
    &[b"ip6", b"arpa"],
    &[b"use-application-dns", b"net"],
];

/// Whether `name` is, or lies below, one of the special-use suffixes.
pub fn is_special_use(name: &Name) -> bool {
    SPECIAL_USE
        .iter()
        .any(|suffix| ends_with_labels(name, suffix))
}

fn is_test_domain(name: &Name) -> bool {
    ends_with_labels(name, &[b"test"])
}

/// ASCII case-insensitive suffix test on wire labels (never on the presentation string, where a
/// label containing a dot would pass for two).
fn ends_with_labels(name: &Name, suffix: &[&[u8]]) -> bool {
    let mut labels = name.iter().rev();
    for want in suffix.iter().rev() {
        match labels.next() {
            Some(label) if label.eq_ignore_ascii_case(want) => {}
            _ => return false,
        }
    }
    true
}

/// Decides on one question from `client`, as the server does before any budget or rate limit.
pub fn decide<'p>(
    policy: &'p Policy,
    client: IpAddr,
    name: &Name,
    qtype: RecordType,
) -> Decision<'p> {
    if is_special_use(name) {
        return Decision::Deny(DenyReason::SpecialUse);
    }
    let group = policy.group_for(client);
    let Some(rule) = group.rules.find(name) else {
        // `.test` names no rule allows are special-use; the log says so rather than "policy".
        if is_test_domain(name) {
            return Decision::Deny(DenyReason::SpecialUse);
        }
        return Decision::Deny(DenyReason::Policy);
    };
    if !policy.qtypes.contains(&qtype) {
        return Decision::Deny(DenyReason::Qtype);
    }
    Decision::Allow {
        group: &group.name,
        rule,
    }
}

/// Whether a rule matched through a wildcard (and so lets the client choose labels freely).
pub fn is_wildcard(rule: &Rule) -> bool {
    rule.kind != RuleKind::Exact
}
