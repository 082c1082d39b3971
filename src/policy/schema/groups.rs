//! `allow`, `allow_answers` and `clients`: the allowlists and who they apply to.

use std::collections::HashMap;

use ipnet::IpNet;

use super::super::diagnostic::{Pos, Report, quote};
use super::super::lint;
use super::super::name;
use super::super::net;
use super::super::raw::{Node, Value};
use super::super::read::{self, Fields};
use super::super::{Group, Rule, RuleSet};

const CLIENT_KEYS: &[&str] = &["name", "from", "allow", "allow_answers"];
const RULE_KEYS: &[&str] = &["name", "allow_answers"];

/// A group while it is being checked: the group and where its parts are in the file.
pub(crate) struct DraftGroup {
    pub(crate) group: Group,
    /// Positions of the group's own `allow_answers` entries and of each rule's, for lints.
    pub(crate) answer_positions: Vec<(Pos, IpNet)>,
    /// Position of each rule (parallel to `group.rules`).
    pub(crate) rule_positions: Vec<Pos>,
    pub(crate) from_positions: Vec<(Pos, IpNet)>,
}

impl std::ops::Deref for DraftGroup {
    type Target = Group;
    fn deref(&self) -> &Group {
        &self.group
    }
}

pub(super) fn group(
    r: &mut Report,
    name: &str,
    from: Vec<(Pos, IpNet)>,
    allow: Option<&Node>,
    allow_answers: Option<&Node>,
) -> DraftGroup {
    let prefix = if name == "default" {
        String::new()
    } else {
        format!("clients[{name}].")
    };
    let mut answer_positions = allow_answers
        .map(|n| read::cidrs(r, n, &format!("{prefix}allow_answers")))
        .unwrap_or_default();
    let group_answers: Vec<IpNet> = answer_positions.iter().map(|&(_, n)| n).collect();
    let (rules, rule_positions) = match allow {
        Some(node) => rules(r, node, &format!("{prefix}allow"), &mut answer_positions),
        None => (Vec::new(), Vec::new()),
    };
    let rules = match RuleSet::new(rules) {
        Ok(set) => set,
        Err(e) => {
            // Unreachable after the checks in `rules`, but never trust that silently.
            let pos = allow.map_or(Pos::START, |n| n.pos);
            r.error(
                pos,
                format!("internal error indexing the rules: {e}; please report it"),
            );
            RuleSet::default()
        }
    };
    DraftGroup {
        group: Group {
            name: name.to_owned(),
            from: from.iter().map(|&(_, n)| n).collect(),
            rules,
            allow_answers: group_answers,
        },
        answer_positions,
        rule_positions,
        from_positions: from,
    }
}

/// The rules of one `allow` list; duplicates are reported with both lines and dropped.
fn rules(
    r: &mut Report,
    node: &Node,
    what: &str,
    answer_positions: &mut Vec<(Pos, IpNet)>,
) -> (Vec<Rule>, Vec<Pos>) {
    let Some(items) = read::list(r, node, what) else {
        return (Vec::new(), Vec::new());
    };
    let mut rules = Vec::new();
    let mut positions = Vec::new();
    let mut seen: HashMap<String, Pos> = HashMap::new();
    for item in items {
        let (text_node, answers) = match &item.value {
            Value::Map(_) => {
                let Some(f) = read::fields(r, item, &format!("a rule in {what}"), RULE_KEYS) else {
                    continue;
                };
                let answers = f
                    .get("allow_answers")
                    .map(|n| read::cidrs(r, n, &format!("{what}: allow_answers")))
                    .unwrap_or_default();
                match f.required(r, "name", "name: api.example.com") {
                    Some(n) => (n, answers),
                    None => continue,
                }
            }
            _ => (item, Vec::new()),
        };
        let Some(text) = read::text(r, text_node, &format!("a rule in {what}")) else {
            continue;
        };
        let canonical = match name::parse_rule(text) {
            Ok(c) => c,
            Err(e) => {
                r.error(text_node.pos, e);
                continue;
            }
        };
        let pos = text_node.pos;
        if let Some(first) = seen.get(&canonical.pattern) {
            let same = if canonical.pattern == text {
                String::new()
            } else {
                format!(", written {}", quote(text))
            };
            r.error(
                pos,
                format!(
                    "duplicate rule {:?}{same} in {what}: also on line {} (column {}); remove one of them",
                    canonical.pattern, first.line, first.column
                ),
            );
            continue;
        }
        seen.insert(canonical.pattern.clone(), pos);
        if let Some(tenant) = lint::multi_tenant_suffix(canonical.kind, canonical.suffix()) {
            r.warn(pos, lint::multi_tenant_message(&canonical.pattern, &tenant));
        }
        answer_positions.extend(answers.iter().copied());
        rules.push(Rule {
            pattern: canonical.pattern,
            kind: canonical.kind,
            line: pos.line,
            column: pos.column,
            allow_answers: answers.into_iter().map(|(_, n)| n).collect(),
        });
        positions.push(pos);
    }
    (rules, positions)
}

pub(super) fn clients(r: &mut Report, node: Option<&Node>) -> Vec<(Pos, DraftGroup)> {
    let Some(items) = node.and_then(|n| read::list(r, n, "clients")) else {
        return Vec::new();
    };
    let mut groups = Vec::new();
    let mut seen: HashMap<String, Pos> = HashMap::new();
    for item in items {
        let Some(f) = read::fields(r, item, "a client group", CLIENT_KEYS) else {
            continue;
        };
        let name_node = f.required(r, "name", "name: research");
        let name = name_node.and_then(|n| group_name(r, n));
        if let (Some(name), Some(node)) = (&name, name_node) {
            if let Some(first) = seen.get(name) {
                r.error(
                    node.pos,
                    format!(
                        "duplicate group name {} (also on line {}); give each group its own name",
                        quote(name),
                        first.line
                    ),
                );
            } else {
                seen.insert(name.clone(), node.pos);
            }
        }
        let label = name.clone().unwrap_or_else(|| "?".to_owned());
        let from = from(r, &f, &label);
        let g = group(r, &label, from, f.get("allow"), f.get("allow_answers"));
        groups.push((name_node.map_or(f.pos, |n| n.pos), g));
    }
    groups
}

fn group_name(r: &mut Report, node: &Node) -> Option<String> {
    let name = read::text(r, node, "a group name")?;
    if name == "default" {
        r.error(
            node.pos,
            "the group name \"default\" is reserved for the top-level allowlist; choose another name",
        );
        return None;
    }
    let ok = (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        r.error(
            node.pos,
            format!(
                "group name {} is not valid; use 1 to 32 letters, digits, \"-\" or \"_\", such as \"research\"",
                quote(name)
            ),
        );
        return None;
    }
    Some(name.to_owned())
}

fn from(r: &mut Report, f: &Fields<'_>, group: &str) -> Vec<(Pos, IpNet)> {
    let what = format!("clients[{group}].from");
    let Some(node) = f.required(r, "from", "from: [\"10.200.0.0/24\"]") else {
        return Vec::new();
    };
    let nets = read::cidrs(r, node, &what);
    if matches!(&node.value, Value::Seq(items) if items.is_empty()) || node.value == Value::Null {
        r.error(
            node.pos,
            format!(
                "{what} is empty, so the group would match no client; list its source networks, \
                 e.g. from: [\"10.200.0.0/24\"]"
            ),
        );
    }
    let mut kept = Vec::new();
    for (pos, net) in nets {
        if let Some(v4) = net::unmapped(&net) {
            r.error(
                pos,
                format!(
                    "{what}: \"{net}\" is an IPv4-mapped IPv6 network, but clients are matched \
                     by their IPv4 address; write \"{v4}\""
                ),
            );
        } else {
            kept.push((pos, net));
        }
    }
    kept
}
