//! `dnsfence suggest`: the allow rules a query log asks for, as YAML to review and paste.
//!
//! Every name a policy allows is a place the agent can send bytes to, so a suggestion errs on
//! the narrow side:
//! - exact names by default;
//! - `*.parent` only when at least [`WILDCARD_SIBLINGS`] distinct names one label below `parent`
//!   were seen, `parent` is neither a public suffix (where the siblings belong to strangers)
//!   nor at or below a multi-tenant suffix (the policy lint's list: anyone can register there),
//!   and no name below it looked like data; never `**.`;
//! - names that look like data (a long label with high entropy, seen once or twice: what a DNS
//!   tunnel or a leaked secret looks like) and names over the policy's exfiltration limits are
//!   not suggested at all, and listed, with the reason, as comments.
//!
//! Each rule carries its evidence as a comment: how many queries, from which clients, which
//! types, first and last seen, so the reviewer judges names by what the agent did.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::SystemTime;

use crate::pipeline::decision::{Decision, decide};
use crate::policy::{ExfiltrationLimits, Policy, Rule};

use super::logfile::LoggedQuery;

/// Distinct names one label below a parent before `*.parent` is suggested instead of them.
pub const WILDCARD_SIBLINGS: usize = 3;

/// A label at least this long, with at least [`DATA_BITS_PER_CHAR`] of entropy, looks like data.
const DATA_LABEL_LEN: usize = 16;
const DATA_BITS_PER_CHAR: f64 = 3.5;
/// ... when the name was asked at most this many times (an A and an AAAA for one payload).
const DATA_SEEN_AT_MOST: usize = 2;

/// What the log says about one name.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    pub queries: usize,
    pub clients: BTreeSet<IpAddr>,
    pub qtypes: BTreeSet<String>,
    pub first: Option<SystemTime>,
    pub last: Option<SystemTime>,
}

impl Evidence {
    fn add(&mut self, query: &LoggedQuery) {
        self.queries += 1;
        self.clients.insert(query.client);
        self.qtypes.insert(query.qtype.clone());
        self.first = Some(self.first.map_or(query.time, |t| t.min(query.time)));
        self.last = Some(self.last.map_or(query.time, |t| t.max(query.time)));
    }

    fn merge(&mut self, other: &Evidence) {
        self.queries += other.queries;
        self.clients.extend(other.clients.iter().copied());
        self.qtypes.extend(other.qtypes.iter().cloned());
        self.first = [self.first, other.first].into_iter().flatten().min();
        self.last = [self.last, other.last].into_iter().flatten().max();
    }

    fn describe(&self) -> String {
        let clients: Vec<String> = self.clients.iter().map(IpAddr::to_string).collect();
        let shown = if clients.len() > 4 {
            format!(
                "{}, ... ({} clients)",
                clients[..4].join(", "),
                clients.len()
            )
        } else {
            clients.join(", ")
        };
        let types: Vec<&str> = self.qtypes.iter().map(String::as_str).collect();
        let when = |t: Option<SystemTime>| {
            t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
                .unwrap_or_default()
        };
        format!(
            "{} quer{} from {shown}; {}; {} .. {}",
            self.queries,
            if self.queries == 1 { "y" } else { "ies" },
            types.join(" "),
            when(self.first),
            when(self.last)
        )
    }
}

/// One suggested rule of one group.
#[derive(Debug, Clone)]
pub struct Suggested {
    /// The rule as it goes into `allow`: `api.example.org` or `*.example.org`.
    pub pattern: String,
    pub evidence: Evidence,
    /// For a wildcard: the names it stands for.
    pub covers: Vec<String>,
}

/// A name the log asked for that is deliberately left out.
#[derive(Debug, Clone)]
pub struct NotSuggested {
    pub group: String,
    pub name: String,
    pub why: String,
}

/// The whole suggestion.
#[derive(Debug, Default)]
pub struct Suggestion {
    /// Additions per group, the default group under the name "default".
    pub groups: BTreeMap<String, Vec<Suggested>>,
    pub not_suggested: Vec<NotSuggested>,
    /// Denials for a query type: `qtypes` is global, so these are only notes.
    pub qtype_notes: Vec<String>,
}

/// Builds the suggestion from `queries`, skipping what `policy` (the one in force) allows.
pub fn suggest(queries: &[LoggedQuery], policy: Option<&Policy>) -> Suggestion {
    let limits = policy.map_or_else(ExfiltrationLimits::default, |p| p.exfiltration);
    let mut wanted: BTreeMap<(String, String), Evidence> = BTreeMap::new();
    let mut over_budget: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut qtypes: BTreeMap<String, (usize, BTreeSet<String>)> = BTreeMap::new();
    for query in queries {
        if query.decision != "deny" {
            continue;
        }
        let group = match policy {
            Some(policy) => policy.group_for(query.client).name.clone(),
            None => query.group.clone().unwrap_or_else(|| "default".to_owned()),
        };
        let name = query.bare_name().to_ascii_lowercase();
        let mut reason = query.reason.as_deref().unwrap_or_default();
        if let (Some(policy), Some((wire, qtype))) = (policy, query.question()) {
            // Judge by the policy in force, which may already allow what an older one denied.
            reason = match decide(policy, query.client, &wire, qtype) {
                Decision::Allow { .. } if reason == "exfiltration-budget" => reason,
                Decision::Allow { .. } => continue,
                Decision::Deny(now) => now.as_str(),
            };
        }
        match reason {
            // A `policy` denial with a rule is a CNAME chain that left the allowlist: the
            // asked name is allowed already.
            "policy" if query.rule.is_none() => wanted.entry((group, name)).or_default().add(query),
            "exfiltration-budget" => {
                let why = match (&query.rule, &query.error) {
                    (Some(rule), Some(error)) => {
                        format!("over the exfiltration budget of rule {rule}: {error}")
                    }
                    _ => "over the exfiltration budget".to_owned(),
                };
                over_budget.insert((group, name), why);
            }
            "qtype" => {
                let entry = qtypes.entry(query.qtype.clone()).or_default();
                entry.0 += 1;
                entry.1.insert(name);
            }
            _ => {}
        }
    }

    let mut suggestion = Suggestion::default();
    for ((group, name), why) in over_budget {
        suggestion
            .not_suggested
            .push(NotSuggested { group, name, why });
    }
    for (qtype, (count, names)) in qtypes {
        let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
        suggestion.qtype_notes.push(format!(
            "{qtype} was denied {count} time{} ({}{}); qtypes applies to every group: add it by \
             hand only if the agent needs it",
            if count == 1 { "" } else { "s" },
            shown.join(", "),
            if names.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        ));
    }

    // Per group: each name is rejected with a reason, or kept as an exact candidate.
    let mut by_group: BTreeMap<String, BTreeMap<String, Evidence>> = BTreeMap::new();
    for ((group, name), evidence) in wanted {
        match rejection(&name, &evidence, &limits) {
            Some(why) => suggestion
                .not_suggested
                .push(NotSuggested { group, name, why }),
            None => {
                by_group.entry(group).or_default().insert(name, evidence);
            }
        }
    }
    for (group, names) in by_group {
        let tainted: BTreeSet<String> = suggestion
            .not_suggested
            .iter()
            .filter(|n| n.group == group)
            .filter_map(|n| parent_of(&n.name).map(str::to_owned))
            .collect();
        let rules = fold_siblings(names, &tainted);
        suggestion.groups.insert(group, rules);
    }
    suggestion
}

/// Why `name` must not be suggested, if it must not.
fn rejection(name: &str, evidence: &Evidence, limits: &ExfiltrationLimits) -> Option<String> {
    if let Err(error) = Rule::parse(name, 0) {
        return Some(format!("not a rule a policy can hold: {error}"));
    }
    if name.len() > limits.max_name_length {
        return Some(format!(
            "over exfiltration.max_name_length ({}): {} octets",
            limits.max_name_length,
            name.len()
        ));
    }
    if let Some(label) = name.split('.').find(|l| l.len() > limits.max_label_length) {
        return Some(format!(
            "over exfiltration.max_label_length ({}): a label of {} octets",
            limits.max_label_length,
            label.len()
        ));
    }
    if evidence.queries <= DATA_SEEN_AT_MOST {
        for label in name.split('.') {
            let bits = entropy(label);
            if label.len() >= DATA_LABEL_LEN && bits >= DATA_BITS_PER_CHAR {
                return Some(format!(
                    "looks like data: label \"{label}\" of {} octets, {bits:.1} bits per \
                     character, seen {} time{}",
                    label.len(),
                    evidence.queries,
                    if evidence.queries == 1 { "" } else { "s" }
                ));
            }
        }
    }
    None
}

/// Shannon entropy of the characters of `label`, in bits per character.
fn entropy(label: &str) -> f64 {
    let mut counts = [0usize; 256];
    for b in label.bytes() {
        counts[usize::from(b)] += 1;
    }
    let len = label.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / len;
            -p * p.log2()
        })
        .sum()
}

fn parent_of(name: &str) -> Option<&str> {
    name.split_once('.').map(|(_, parent)| parent)
}

/// Replaces groups of [`WILDCARD_SIBLINGS`] or more names under one parent by `*.parent`, where
/// that is safe; keeps the rest as exact names.
fn fold_siblings(names: BTreeMap<String, Evidence>, tainted: &BTreeSet<String>) -> Vec<Suggested> {
    let mut by_parent: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for name in names.keys() {
        if let Some(parent) = parent_of(name) {
            by_parent.entry(parent).or_default().push(name);
        }
    }
    let mut folded: BTreeMap<String, Suggested> = BTreeMap::new();
    let mut covered: BTreeSet<&str> = BTreeSet::new();
    for (parent, children) in &by_parent {
        if children.len() < WILDCARD_SIBLINGS
            || tainted.contains(*parent)
            || is_public_suffix(parent)
            || is_multi_tenant(parent)
        {
            continue;
        }
        let pattern = format!("*.{parent}");
        if Rule::parse(&pattern, 0).is_err() {
            continue;
        }
        let mut evidence = Evidence::default();
        for child in children {
            if let Some(e) = names.get(*child) {
                evidence.merge(e);
            }
            covered.insert(child);
        }
        folded.insert(
            pattern.clone(),
            Suggested {
                pattern,
                evidence,
                covers: children.iter().map(|c| (*c).to_owned()).collect(),
            },
        );
    }
    for (name, evidence) in &names {
        if !covered.contains(name.as_str()) {
            folded.insert(
                name.clone(),
                Suggested {
                    pattern: name.clone(),
                    evidence: evidence.clone(),
                    covers: Vec::new(),
                },
            );
        }
    }
    folded.into_values().collect()
}

/// Second-level labels under which country registries hand out names (`co.uk`, `com.au`).
const REGISTRY_SECOND_LEVELS: &[&str] = &[
    "ac", "co", "com", "edu", "gob", "gov", "govt", "ltd", "mil", "ne", "net", "nic", "or", "org",
    "plc", "sch",
];

/// A suffix under which names belong to unrelated owners: a top-level domain, or a registry's
/// second level such as `co.uk`.
fn is_public_suffix(parent: &str) -> bool {
    let labels: Vec<&str> = parent.split('.').collect();
    match labels.as_slice() {
        [_] => true,
        [second, tld] => tld.len() == 2 && REGISTRY_SECOND_LEVELS.contains(second),
        _ => false,
    }
}

fn is_multi_tenant(parent: &str) -> bool {
    Rule::parse(&format!("*.{parent}"), 0).is_ok_and(|r| r.multi_tenant_suffix().is_some())
}

impl Suggestion {
    /// The YAML fragment: `allow:` for the default group, `clients:` for the others, every
    /// rule with its evidence, and what was left out as comments.
    pub fn to_yaml(&self, header: &str) -> String {
        let mut out = String::new();
        for line in header.lines() {
            let _ = writeln!(out, "# {line}");
        }
        let nothing = self.groups.values().all(Vec::is_empty);
        if nothing {
            out.push_str("# Nothing to add.\n");
        }
        if let Some(rules) = self.groups.get("default").filter(|r| !r.is_empty()) {
            out.push_str("allow:\n");
            write_rules(&mut out, rules, "  ");
        }
        let others: Vec<(&String, &Vec<Suggested>)> = self
            .groups
            .iter()
            .filter(|(name, rules)| name.as_str() != "default" && !rules.is_empty())
            .collect();
        if !others.is_empty() {
            out.push_str("clients:\n");
            for (name, rules) in others {
                let _ = writeln!(out, "  - name: {name}\n    allow:");
                write_rules(&mut out, rules, "      ");
            }
        }
        if !self.not_suggested.is_empty() || !self.qtype_notes.is_empty() {
            out.push_str("# Not suggested:\n");
            for n in &self.not_suggested {
                let _ = writeln!(out, "#   {} (group {}): {}", n.name, n.group, n.why);
            }
            for note in &self.qtype_notes {
                let _ = writeln!(out, "#   qtype {note}");
            }
        }
        out
    }
}

fn write_rules(out: &mut String, rules: &[Suggested], indent: &str) {
    for rule in rules {
        if rule.covers.is_empty() {
            let _ = writeln!(out, "{indent}# {}", rule.evidence.describe());
            let _ = writeln!(out, "{indent}- {}", rule.pattern);
        } else {
            let _ = writeln!(
                out,
                "{indent}# {} names: {}",
                rule.covers.len(),
                rule.covers.join(", ")
            );
            let _ = writeln!(out, "{indent}# {}", rule.evidence.describe());
            let _ = writeln!(out, "{indent}- \"{}\"", rule.pattern);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::Name;

    fn rule_matches(rule: &str, name: &str) -> bool {
        let rule = Rule::parse(rule, 0).unwrap();
        let name = Name::from_ascii(name).unwrap();
        crate::policy::RuleSet::new(vec![rule]).is_ok_and(|set| set.find(&name).is_some())
    }

    fn q(client: &str, name: &str, reason: &str) -> LoggedQuery {
        LoggedQuery {
            time: SystemTime::UNIX_EPOCH,
            client: client.parse().unwrap(),
            qname: format!("{name}."),
            qtype: "A".into(),
            decision: "deny".into(),
            reason: Some(reason.into()),
            group: Some("default".into()),
            rule: None,
            error: None,
            audit: true,
            answers: Vec::new(),
        }
    }

    #[test]
    fn three_siblings_fold_into_a_wildcard_but_not_under_a_public_or_shared_suffix() {
        let mut log = Vec::new();
        for n in [
            "a.cdn.example.org",
            "b.cdn.example.org",
            "c.cdn.example.org",
            "x.co.uk",
            "y.co.uk",
            "z.co.uk",
            "one.github.io",
            "two.github.io",
            "three.github.io",
            "api.example.net",
        ] {
            log.push(q("10.0.0.1", n, "policy"));
        }
        let s = suggest(&log, None);
        let rules: Vec<&str> = s.groups["default"]
            .iter()
            .map(|r| r.pattern.as_str())
            .collect();
        assert_eq!(
            rules,
            [
                "*.cdn.example.org",
                "api.example.net",
                "one.github.io",
                "three.github.io",
                "two.github.io",
                "x.co.uk",
                "y.co.uk",
                "z.co.uk",
            ]
        );
        assert!(!s.to_yaml("").contains("**."));
    }

    #[test]
    fn data_looking_and_over_limit_names_are_left_out_with_a_reason() {
        let log = vec![
            q(
                "10.0.0.1",
                "mzxw6ytboi4dsnzqgq3tkmrwhe2a.example.org",
                "policy",
            ),
            q(
                "10.0.0.1",
                &format!("{}.example.org", "a".repeat(45)),
                "policy",
            ),
            q("10.0.0.1", "repeated-words-here.example.org", "policy"),
        ];
        let s = suggest(&log, None);
        let why: Vec<&str> = s.not_suggested.iter().map(|n| n.why.as_str()).collect();
        assert!(
            why[0].starts_with("over exfiltration.max_label_length"),
            "{why:?}"
        );
        assert!(why[1].starts_with("looks like data"), "{why:?}");
        assert_eq!(s.groups["default"].len(), 1);
    }

    #[test]
    fn a_parent_with_a_data_looking_child_gets_no_wildcard() {
        let mut log: Vec<LoggedQuery> = ["a", "b", "c"]
            .iter()
            .map(|l| q("10.0.0.1", &format!("{l}.t.example.org"), "policy"))
            .collect();
        log.push(q(
            "10.0.0.1",
            "q8x7z2k9w4m1n6b3v5c0.t.example.org",
            "policy",
        ));
        let s = suggest(&log, None);
        assert_eq!(s.groups["default"].len(), 3);
        assert!(rule_matches("*.t.example.org", "a.t.example.org."));
    }
}
