//! Typed reading of YAML nodes, reporting each problem at the node's line and column.
//!
//! Every reader returns `None` after reporting, so the schema can carry on and find the next
//! problem instead of stopping at the first.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;

use super::diagnostic::{Pos, Report, quote};
use super::duration;
use super::net::{self, Role};
use super::raw::{Node, Value};

/// The entries of a mapping, after unknown and duplicate keys have been reported.
pub(crate) struct Fields<'a> {
    /// Where the mapping starts (for "missing key" messages).
    pub pos: Pos,
    entries: HashMap<&'a str, (Pos, &'a Node)>,
}

impl<'a> Fields<'a> {
    pub(crate) fn get(&self, key: &str) -> Option<&'a Node> {
        self.entries.get(key).map(|&(_, node)| node)
    }

    /// A key that must be present; reports it missing otherwise, with an example.
    pub(crate) fn required(&self, r: &mut Report, key: &str, example: &str) -> Option<&'a Node> {
        let node = self.get(key);
        if node.is_none() {
            r.error(
                self.pos,
                format!("the key {key:?} is missing; add it, e.g. {example}"),
            );
        }
        node
    }
}

/// Reads a mapping whose keys must be among `allowed`. `what` names it in messages.
pub(crate) fn fields<'a>(
    r: &mut Report,
    node: &'a Node,
    what: &str,
    allowed: &[&str],
) -> Option<Fields<'a>> {
    let Value::Map(entries) = &node.value else {
        r.error(
            node.pos,
            format!(
                "{what} must be a mapping of keys ({}), found {}; write it as `key: value` lines",
                allowed.join(", "),
                node.value.kind()
            ),
        );
        return None;
    };
    let mut fields = Fields {
        pos: node.pos,
        entries: HashMap::new(),
    };
    for (key, value) in entries {
        let Value::Str(name) = &key.value else {
            r.error(
                key.pos,
                format!(
                    "a key in {what} is {}, not a name; the keys are: {}",
                    key.value.kind(),
                    allowed.join(", ")
                ),
            );
            continue;
        };
        if !allowed.contains(&name.as_str()) {
            let hint = match closest(name, allowed) {
                Some(near) => format!("did you mean {near:?}? The keys are: "),
                None => "the keys are: ".to_owned(),
            };
            r.error(
                key.pos,
                format!(
                    "unknown key {} in {what}; {hint}{}",
                    quote(name),
                    allowed.join(", ")
                ),
            );
            continue;
        }
        if let Some(&(first, _)) = fields.entries.get(name.as_str()) {
            r.error(
                key.pos,
                format!(
                    "the key {} appears twice in {what} (first on line {}); keep one of them",
                    quote(name),
                    first.line
                ),
            );
            continue;
        }
        fields.entries.insert(name.as_str(), (key.pos, value));
    }
    Some(fields)
}

/// The allowed key nearest to a misspelt one (one edit for short keys, two for longer ones).
fn closest<'k>(name: &str, allowed: &[&'k str]) -> Option<&'k str> {
    let limit = if name.chars().count() <= 5 { 1 } else { 2 };
    allowed
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .filter(|&(d, _)| d <= limit)
        .min_by_key(|&(d, _)| d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Text (a YAML string; numbers and booleans must be quoted to be text).
pub(crate) fn text<'a>(r: &mut Report, node: &'a Node, what: &str) -> Option<&'a str> {
    match &node.value {
        Value::Str(s) => Some(s),
        other => {
            r.error(
                node.pos,
                format!(
                    "{what} must be text, found {}; write it in quotes",
                    other.kind()
                ),
            );
            None
        }
    }
}

pub(crate) fn boolean(r: &mut Report, node: &Node, what: &str) -> Option<bool> {
    match &node.value {
        Value::Bool(b) => Some(*b),
        other => {
            let found = match other {
                Value::Str(s) => quote(s),
                _ => other.kind().to_owned(),
            };
            r.error(
                node.pos,
                format!("{what} must be true or false, found {found}; write true or false"),
            );
            None
        }
    }
}

/// An integer in `min..=max`.
pub(crate) fn integer(r: &mut Report, node: &Node, what: &str, min: u64, max: u64) -> Option<u64> {
    let value = match &node.value {
        Value::Int(n) => *n,
        other => {
            r.error(
                node.pos,
                format!(
                    "{what} must be a whole number from {min} to {max}, found {}; write a number",
                    other.kind()
                ),
            );
            return None;
        }
    };
    match u64::try_from(value) {
        Ok(n) if (min..=max).contains(&n) => Some(n),
        _ => {
            r.error(
                node.pos,
                format!("{what} is {value}, out of range; write a number from {min} to {max}"),
            );
            None
        }
    }
}

/// A list; `None` (reported) if the node is something else.
pub(crate) fn list<'a>(r: &mut Report, node: &'a Node, what: &str) -> Option<&'a [Node]> {
    match &node.value {
        Value::Seq(items) => Some(items),
        Value::Null => Some(&[]),
        other => {
            r.error(
                node.pos,
                format!(
                    "{what} must be a list, found {}; write it as [\"...\", \"...\"] or as \
                     `- ...` lines",
                    other.kind()
                ),
            );
            None
        }
    }
}

/// One of a few words, e.g. `nxdomain` or `refused`.
pub(crate) fn choice<T: Copy>(
    r: &mut Report,
    node: &Node,
    what: &str,
    options: &[(&str, T)],
) -> Option<T> {
    let words: Vec<&str> = options.iter().map(|(w, _)| *w).collect();
    let found = match &node.value {
        Value::Str(s) => {
            if let Some((_, v)) = options.iter().find(|(w, _)| w == s) {
                return Some(*v);
            }
            quote(s)
        }
        other => other.kind().to_owned(),
    };
    r.error(
        node.pos,
        format!(
            "{what} cannot be {found}; write one of: {}",
            words.join(", ")
        ),
    );
    None
}

/// A duration: `500ms`, `30s`, `5m`, `1h`, or a bare integer of seconds.
pub(crate) fn duration(r: &mut Report, node: &Node, what: &str) -> Option<Duration> {
    let parsed = match &node.value {
        Value::Str(s) => duration::parse(s),
        Value::Int(n) => duration::from_seconds(*n),
        other => Err(format!(
            "found {}; write a duration such as \"30s\"",
            other.kind()
        )),
    };
    parsed
        .map_err(|e| r.error(node.pos, format!("{what}: {e}")))
        .ok()
}

/// A duration within `range` (both ends included); absent or wrong (reported) gives `default`.
pub(crate) fn duration_in(
    r: &mut Report,
    node: Option<&Node>,
    what: &str,
    (min, max): (Duration, Duration),
    default: Duration,
) -> Duration {
    let Some(node) = node else {
        return default;
    };
    match duration(r, node, what) {
        Some(d) if d < min || d > max => {
            r.error(
                node.pos,
                format!(
                    "{what} is {}, out of range; write a duration from {} to {}",
                    super::validate::show(d),
                    super::validate::show(min),
                    super::validate::show(max)
                ),
            );
            default
        }
        Some(d) => d,
        None => default,
    }
}

/// A list of CIDRs (each reported on its own line and column).
pub(crate) fn cidrs(r: &mut Report, node: &Node, what: &str) -> Vec<(Pos, IpNet)> {
    let Some(items) = list(r, node, what) else {
        return Vec::new();
    };
    let mut nets = Vec::new();
    for item in items {
        if let Some(s) = text(r, item, what) {
            match net::parse_cidr(s) {
                Ok(n) => nets.push((item.pos, n)),
                Err(e) => r.error(item.pos, format!("{what}: {e}")),
            }
        }
    }
    nets
}

/// A list of socket addresses.
pub(crate) fn sockets(
    r: &mut Report,
    node: &Node,
    what: &str,
    role: Role,
) -> Vec<(Pos, SocketAddr)> {
    let Some(items) = list(r, node, what) else {
        return Vec::new();
    };
    let mut addrs = Vec::new();
    for item in items {
        if let Some(s) = text(r, item, what) {
            match net::parse_socket(s, role) {
                Ok(a) => addrs.push((item.pos, a)),
                Err(e) => r.error(item.pos, format!("{what}: {e}")),
            }
        }
    }
    addrs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misspelt_keys_get_a_suggestion() {
        assert_eq!(
            closest("upstream", &["listen", "upstreams"]),
            Some("upstreams")
        );
        assert_eq!(closest("qtype", &["qtypes", "log"]), Some("qtypes"));
        assert_eq!(closest("frobnicate", &["listen", "upstreams"]), None);
        assert_eq!(closest("note", &["name", "allow_answers"]), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
