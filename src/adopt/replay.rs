//! `dnsfence replay`: what a policy change would have done to past traffic.
//!
//! Each logged query goes, in time order, through the decision `serve` takes before any
//! upstream is asked: [`decide`] (the code `explain` runs too) and, for names a wildcard allowed,
//! the exfiltration budget (fed the log's own times, so a burst in the log is a burst here).
//! What the log recorded is reduced to the same policy decision, and the two are compared.
//!
//! Some outcomes cannot be replayed and are not compared: rate limits, malformed messages and
//! opcodes do not depend on the policy, and an answer's fate (rebinding, a CNAME chain leaving
//! the allowlist) depends on what the upstream said then. For those the policy decision is
//! "allow": the name itself was allowed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::pipeline::decision::{Decision, decide, is_wildcard};
use crate::pipeline::limits::{WildcardBudget, client_key};
use crate::policy::Policy;

use super::logfile::LoggedQuery;

/// One kind of change for one question, and how often it happened.
#[derive(Debug, Clone, Default)]
pub struct Change {
    pub queries: usize,
    pub clients: BTreeSet<IpAddr>,
    /// The rule of the new policy that allows it (for changes to allow).
    pub rule: Option<String>,
    pub group: String,
}

/// The comparison of a log with a policy.
#[derive(Debug, Default)]
pub struct Replay {
    pub replayed: usize,
    pub unchanged: usize,
    /// Queries whose outcome did not depend on the policy, or whose question did not parse.
    pub not_comparable: usize,
    /// Keyed by (name, type, before, after).
    pub changes: BTreeMap<(String, String, String, String), Change>,
}

impl Replay {
    /// Queries that were allowed and would now be denied.
    pub fn newly_denied(&self) -> usize {
        self.changes
            .iter()
            .filter(|((_, _, before, after), _)| before == "allow" && after != "allow")
            .map(|(_, change)| change.queries)
            .sum()
    }

    pub fn changed(&self) -> usize {
        self.changes.values().map(|c| c.queries).sum()
    }

    /// The report: a summary line, then one line per name, type and change.
    pub fn report(&self, policy: &Policy) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "replayed {} queries against {}: {} unchanged, {} changed ({} allowed -> denied), \
             {} not comparable",
            self.replayed,
            policy.source.display(),
            self.unchanged,
            self.changed(),
            self.newly_denied(),
            self.not_comparable
        );
        let mut rows: Vec<_> = self.changes.iter().collect();
        // Allowed -> denied first: those are the ones that break the agent.
        rows.sort_by_key(|((name, qtype, before, after), _)| {
            (
                before != "allow",
                before.clone(),
                after.clone(),
                name.clone(),
                qtype.clone(),
            )
        });
        for ((name, qtype, before, after), change) in rows {
            let clients = change.clients.len();
            let _ = write!(
                out,
                "{:<32} {name} {qtype}: {} quer{} from {clients} client{} (group {})",
                format!("{before} -> {after}"),
                change.queries,
                if change.queries == 1 { "y" } else { "ies" },
                if clients == 1 { "" } else { "s" },
                change.group
            );
            if let Some(rule) = &change.rule {
                let _ = write!(out, ", rule {rule}");
            }
            out.push('\n');
        }
        out
    }
}

/// Replays `queries` against `policy`.
pub fn replay(queries: &[LoggedQuery], policy: &Policy) -> Replay {
    let mut ordered: Vec<&LoggedQuery> = queries.iter().collect();
    ordered.sort_by_key(|q| q.time);
    let budget = WildcardBudget::new(policy.exfiltration);
    let start = Instant::now();
    let first = ordered.first().map(|q| q.time);
    let mut replay = Replay::default();
    for query in ordered {
        let (Some(before), Some((name, qtype))) = (logged_decision(query), query.question()) else {
            replay.not_comparable += 1;
            continue;
        };
        replay.replayed += 1;
        // The log's clock, laid on this process's monotonic one, for the budget's windows.
        let offset = first
            .and_then(|first| query.time.duration_since(first).ok())
            .unwrap_or(Duration::ZERO);
        let now = start.checked_add(offset).unwrap_or(start);
        let group = policy.group_for(query.client).name.clone();
        let (after, rule) = match decide(policy, query.client, &name, qtype) {
            Decision::Allow { rule, .. } => {
                let charged = if is_wildcard(rule) {
                    budget.charge(client_key(query.client), &rule.pattern, &name, now)
                } else {
                    Ok(())
                };
                match charged {
                    Ok(()) => ("allow".to_owned(), Some(rule.pattern.clone())),
                    Err(_) => ("deny (exfiltration-budget)".to_owned(), None),
                }
            }
            Decision::Deny(reason) => (format!("deny ({reason})"), None),
        };
        if before == after {
            replay.unchanged += 1;
            continue;
        }
        let change = replay
            .changes
            .entry((query.qname.clone(), query.qtype.clone(), before, after))
            .or_default();
        change.queries += 1;
        change.clients.insert(query.client);
        change.rule = rule;
        change.group = group;
    }
    replay
}

/// The policy's decision as the log recorded it, or `None` when the outcome did not come from
/// the policy (rate limits, malformed input, opcodes).
fn logged_decision(query: &LoggedQuery) -> Option<String> {
    match query.reason.as_deref() {
        None if query.decision == "allow" => Some("allow".to_owned()),
        // The name was allowed; the answer was refused.
        Some("rebinding") => Some("allow".to_owned()),
        Some("policy") if query.rule.is_some() => Some("allow".to_owned()),
        Some(reason @ ("policy" | "qtype" | "special-use" | "exfiltration-budget")) => {
            Some(format!("deny ({reason})"))
        }
        _ => None,
    }
}
