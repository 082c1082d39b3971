//! Name matching on wire labels: a trie keyed by lower-cased labels from the TLD down.
//!
//! Why a trie on labels and not string suffix tests: a DNS label may contain any byte,
//! including `.`; `Name::to_string()` prints `["evil.allowed", "test"]` as `evil\.allowed.test.`
//! and a careless unescape or suffix test lets it through as `allowed.test`. Here a query is only
//! ever looked at label by label, as bytes, and any label outside `[A-Za-z0-9_-]` (a dot, a NUL,
//! UTF-8, a `*`) makes the whole name match nothing.
//!
//! Case folding is ASCII only. Unicode folding would map `\u{212A}` (KELVIN SIGN) to `k`, so a
//! query for "\u{212A}nown.example" would match a rule for "known.example" although it is
//! another name on the wire.
//!
//! Cost: one hash lookup per query label, independent of the number of rules. Each trie node
//! stands for a suffix (e.g. `example.com`) and says which rules sit there: the exact name,
//! `*.` (exactly one more label) and `**.` (one or more labels). A wildcard never matches the
//! apex itself. When several rules match, Exact beats OneLabel beats AnyDepth, and among `**.`
//! rules the longest suffix wins (it is the most specific and may carry its own options).

use std::collections::HashMap;
use std::fmt;

use hickory_proto::rr::Name;

use super::name::{self, MAX_LABEL_LEN, is_label_byte};
use super::{Rule, RuleKind};

/// The rules of one group, indexed for matching.
#[derive(Debug, Clone)]
pub struct RuleSet {
    rules: Vec<Rule>,
    /// `nodes[0]` is the root (the empty suffix).
    nodes: Vec<TrieNode>,
}

#[derive(Debug, Clone, Default)]
struct TrieNode {
    children: HashMap<Box<[u8]>, usize>,
    /// Indexes into `rules`.
    exact: Option<usize>,
    one_label: Option<usize>,
    any_depth: Option<usize>,
}

/// Why a list of rules cannot be indexed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleSetError {
    /// The rule's pattern is not in canonical form for its kind (see [`Rule::parse`]).
    Malformed {
        index: usize,
        pattern: String,
        reason: String,
    },
    /// Two rules with the same pattern.
    Duplicate { first: usize, second: usize },
}

impl fmt::Display for RuleSetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleSetError::Malformed {
                index,
                pattern,
                reason,
            } => write!(f, "rule {index} ({pattern:?}) is malformed: {reason}"),
            RuleSetError::Duplicate { first, second } => {
                write!(f, "rules {first} and {second} have the same pattern")
            }
        }
    }
}

impl std::error::Error for RuleSetError {}

impl Default for RuleSet {
    fn default() -> Self {
        RuleSet {
            rules: Vec::new(),
            nodes: vec![TrieNode::default()],
        }
    }
}

impl RuleSet {
    /// Indexes rules. Each pattern must be canonical for its kind (as [`Rule::parse`] makes it);
    /// duplicates are refused so that no rule is silently ignored.
    pub fn new(rules: Vec<Rule>) -> Result<RuleSet, RuleSetError> {
        let mut set = RuleSet::default();
        for (index, rule) in rules.iter().enumerate() {
            let canonical =
                name::parse_rule(&rule.pattern).map_err(|reason| RuleSetError::Malformed {
                    index,
                    pattern: rule.pattern.clone(),
                    reason,
                })?;
            if canonical.kind != rule.kind || canonical.pattern != rule.pattern {
                return Err(RuleSetError::Malformed {
                    index,
                    pattern: rule.pattern.clone(),
                    reason: format!(
                        "the canonical form is {:?} ({:?})",
                        canonical.pattern, canonical.kind
                    ),
                });
            }
            let node = set.insert_suffix(canonical.suffix());
            let slot = match rule.kind {
                RuleKind::Exact => &mut set.nodes[node].exact,
                RuleKind::OneLabel => &mut set.nodes[node].one_label,
                RuleKind::AnyDepth => &mut set.nodes[node].any_depth,
            };
            if let Some(first) = *slot {
                return Err(RuleSetError::Duplicate {
                    first,
                    second: index,
                });
            }
            *slot = Some(index);
        }
        set.rules = rules;
        Ok(set)
    }

    /// Walks (creating as needed) the node for a canonical suffix; returns its index.
    fn insert_suffix(&mut self, suffix: &str) -> usize {
        let mut node = 0;
        for label in suffix.rsplit('.') {
            let key = label.as_bytes().to_ascii_lowercase().into_boxed_slice();
            node = match self.nodes[node].children.get(&key) {
                Some(&child) => child,
                None => {
                    let child = self.nodes.len();
                    self.nodes.push(TrieNode::default());
                    self.nodes[node].children.insert(key, child);
                    child
                }
            };
        }
        node
    }

    /// The rule that allows `name`, if any (see the module documentation for precedence).
    pub fn find(&self, name: &Name) -> Option<&Rule> {
        let count = name.iter().len();
        if count == 0 || !name.iter().all(is_plain_label) {
            return None;
        }
        let mut node = self.nodes.first()?;
        let mut one_label = None;
        let mut any_depth = None;
        let mut exact = None;
        let mut buf = [0u8; MAX_LABEL_LEN];
        for (depth, label) in name.iter().rev().enumerate() {
            // `node` is the suffix made of the last `depth` labels; `count - depth` remain.
            if node.any_depth.is_some() {
                any_depth = node.any_depth; // deeper suffix: more specific
            }
            if count - depth == 1 {
                one_label = node.one_label;
            }
            let key = buf.get_mut(..label.len())?;
            key.copy_from_slice(label);
            key.make_ascii_lowercase();
            match node.children.get(&*key) {
                Some(&child) => node = self.nodes.get(child)?,
                None => break,
            }
            if depth + 1 == count {
                exact = node.exact;
            }
        }
        exact
            .or(one_label)
            .or(any_depth)
            .and_then(|index| self.rules.get(index))
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules in policy order.
    pub fn iter(&self) -> std::slice::Iter<'_, Rule> {
        self.rules.iter()
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
}

impl<'a> IntoIterator for &'a RuleSet {
    type Item = &'a Rule;
    type IntoIter = std::slice::Iter<'a, Rule>;

    fn into_iter(self) -> Self::IntoIter {
        self.rules.iter()
    }
}

/// A label a rule may match: 1..=63 bytes of `[A-Za-z0-9_-]`.
fn is_plain_label(label: &[u8]) -> bool {
    !label.is_empty() && label.len() <= MAX_LABEL_LEN && label.iter().all(|&b| is_label_byte(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy as _;
    use std::str::FromStr;

    fn set(patterns: &[&str]) -> RuleSet {
        let rules = patterns
            .iter()
            .enumerate()
            .map(|(i, p)| Rule::parse(p, i + 1).unwrap())
            .collect();
        RuleSet::new(rules).unwrap()
    }

    fn name(text: &str) -> Name {
        Name::from_ascii(text).unwrap()
    }

    fn matched<'a>(set: &'a RuleSet, text: &str) -> Option<&'a str> {
        set.find(&name(text)).map(|r| r.pattern.as_str())
    }

    #[test]
    fn exact_rule_matches_only_that_name() {
        let s = set(&["allowed.test"]);
        assert_eq!(matched(&s, "allowed.test."), Some("allowed.test"));
        assert_eq!(matched(&s, "allowed.test"), Some("allowed.test"));
        assert_eq!(matched(&s, "www.allowed.test."), None);
        assert_eq!(matched(&s, "test."), None);
        assert_eq!(matched(&s, "."), None);
    }

    #[test]
    fn matching_is_ascii_case_insensitive() {
        let s = set(&["Allowed.Test", "*.wild.test"]);
        assert_eq!(matched(&s, "ALLOWED.test."), Some("allowed.test"));
        assert_eq!(matched(&s, "Api.WILD.tEsT."), Some("*.wild.test"));
    }

    #[test]
    fn kelvin_sign_does_not_fold_to_k() {
        let s = set(&["known.test", "**.known.test"]);
        let kelvin = Name::from_labels(vec!["\u{212A}nown".as_bytes(), b"test"]).unwrap();
        assert_eq!(s.find(&kelvin), None);
        let below =
            Name::from_labels(vec![b"a".as_ref(), "\u{212A}nown".as_bytes(), b"test"]).unwrap();
        assert_eq!(s.find(&below), None);
        // The sanity check that motivates this: Unicode lower-casing would have matched.
        assert_eq!("\u{212A}nown".to_lowercase(), "known");
    }

    #[test]
    fn allowed_name_inside_a_longer_name_does_not_match() {
        let s = set(&["api.allowed.test"]);
        assert_eq!(matched(&s, "api.allowed.test.evil.test."), None);
        assert_eq!(matched(&s, "x.api.allowed.test."), None);
    }

    #[test]
    fn label_boundaries_are_respected() {
        let s = set(&["allowed.test", "*.allowed.test", "**.deep.test"]);
        assert_eq!(matched(&s, "evilallowed.test."), None);
        assert_eq!(matched(&s, "x.evilallowed.test."), None);
        assert_eq!(matched(&s, "evildeep.test."), None);
        assert_eq!(matched(&s, "a.evildeep.test."), None);
    }

    #[test]
    fn one_label_wildcard_matches_exactly_one_label_below_never_the_apex() {
        let s = set(&["*.allowed.test"]);
        assert_eq!(matched(&s, "a.allowed.test."), Some("*.allowed.test"));
        assert_eq!(matched(&s, "allowed.test."), None);
        assert_eq!(matched(&s, "a.b.allowed.test."), None);
    }

    #[test]
    fn any_depth_wildcard_matches_every_depth_below_never_the_apex() {
        let s = set(&["**.allowed.test"]);
        assert_eq!(matched(&s, "allowed.test."), None);
        assert_eq!(matched(&s, "a.allowed.test."), Some("**.allowed.test"));
        assert_eq!(
            matched(&s, "a.b.c.d.e.allowed.test."),
            Some("**.allowed.test")
        );
    }

    #[test]
    fn label_with_embedded_dot_never_matches() {
        let s = set(&["allowed.test", "*.allowed.test", "**.deep.test"]);
        let dotted = Name::from_labels(vec![b"evil.allowed".as_ref(), b"test"]).unwrap();
        assert_eq!(s.find(&dotted), None);
        let below = Name::from_labels(vec![b"x.y".as_ref(), b"allowed", b"test"]).unwrap();
        assert_eq!(s.find(&below), None);
        let deep = Name::from_labels(vec![b"a".as_ref(), b"x.y", b"deep", b"test"]).unwrap();
        assert_eq!(s.find(&deep), None);
        // The same bytes split at the dot do match: the refusal is about the label, not the text.
        assert_eq!(matched(&s, "x.allowed.test."), Some("*.allowed.test"));
    }

    #[test]
    fn label_with_nul_or_other_bytes_never_matches() {
        let s = set(&["**.allowed.test", "*.one.test"]);
        for bad in [
            b"a\0".as_ref(),
            b"\0",
            b"a b",
            b"*",
            b"a/b",
            "\u{e9}".as_bytes(),
            b"\xff",
        ] {
            let n = Name::from_labels(vec![bad, b"allowed", b"test"]).unwrap();
            assert_eq!(s.find(&n), None, "{bad:?}");
            let n = Name::from_labels(vec![bad, b"one", b"test"]).unwrap();
            assert_eq!(s.find(&n), None, "{bad:?}");
        }
        let n = Name::from_labels(vec![b"ok".as_ref(), b"allowed\0", b"test"]).unwrap();
        assert_eq!(s.find(&n), None);
    }

    #[test]
    fn exact_beats_wildcard() {
        let s = set(&["**.allowed.test", "*.allowed.test", "api.allowed.test"]);
        assert_eq!(matched(&s, "api.allowed.test."), Some("api.allowed.test"));
        assert_eq!(matched(&s, "www.allowed.test."), Some("*.allowed.test"));
        assert_eq!(matched(&s, "a.www.allowed.test."), Some("**.allowed.test"));
    }

    #[test]
    fn one_label_beats_any_depth_even_when_shorter() {
        let s = set(&["**.a.b.test", "*.b.test"]);
        // "x.b.test" is only matched by "*.b.test".
        assert_eq!(matched(&s, "x.b.test."), Some("*.b.test"));
        assert_eq!(matched(&s, "x.a.b.test."), Some("**.a.b.test"));
        let s = set(&["**.b.test", "*.a.b.test"]);
        assert_eq!(matched(&s, "x.a.b.test."), Some("*.a.b.test"));
    }

    #[test]
    fn longest_suffix_wins() {
        let s = set(&["**.test.example", "**.deep.test.example"]);
        assert_eq!(
            matched(&s, "a.b.deep.test.example."),
            Some("**.deep.test.example")
        );
        assert_eq!(matched(&s, "deep.test.example."), Some("**.test.example"));
        assert_eq!(
            matched(&s, "a.other.test.example."),
            Some("**.test.example")
        );
    }

    #[test]
    fn idn_rules_match_their_a_labels() {
        let s = set(&["bücher.example", "*.bücher.example"]);
        assert_eq!(
            matched(&s, "xn--bcher-kva.example."),
            Some("xn--bcher-kva.example")
        );
        assert_eq!(
            matched(&s, "WWW.XN--BCHER-KVA.example."),
            Some("*.xn--bcher-kva.example")
        );
        // The raw UTF-8 bytes on the wire are not the name: no match.
        let utf8 = Name::from_labels(vec!["bücher".as_bytes(), b"example"]).unwrap();
        assert_eq!(s.find(&utf8), None);
    }

    #[test]
    fn underscore_and_hyphen_labels_match() {
        let s = set(&["_dmarc.example.test", "**.my-app.test"]);
        assert_eq!(
            matched(&s, "_DMARC.example.test."),
            Some("_dmarc.example.test")
        );
        assert_eq!(matched(&s, "a-b.my-app.test."), Some("**.my-app.test"));
    }

    #[test]
    fn duplicates_and_non_canonical_rules_are_refused() {
        let dup = RuleSet::new(vec![
            Rule::parse("a.test", 1).unwrap(),
            Rule::parse("A.test.", 2).unwrap(),
        ]);
        assert_eq!(
            dup.unwrap_err(),
            RuleSetError::Duplicate {
                first: 0,
                second: 1
            }
        );
        let mut bad = Rule::parse("a.test", 1).unwrap();
        bad.kind = RuleKind::AnyDepth;
        assert!(matches!(
            RuleSet::new(vec![bad]),
            Err(RuleSetError::Malformed { .. })
        ));
        let mut upper = Rule::parse("a.test", 1).unwrap();
        upper.pattern = "A.test".into();
        assert!(RuleSet::new(vec![upper]).is_err());
    }

    #[test]
    fn len_iter_and_empty() {
        let s = set(&["a.test", "*.b.test"]);
        assert_eq!(s.len(), 2);
        assert!(!s.is_empty());
        let patterns: Vec<_> = s.iter().map(|r| r.pattern.as_str()).collect();
        assert_eq!(patterns, ["a.test", "*.b.test"]);
        assert_eq!((&s).into_iter().count(), 2);
        let empty = RuleSet::default();
        assert!(empty.is_empty());
        assert_eq!(empty.find(&name("a.test.")), None);
    }

    /// The obvious O(rules) matcher the trie must agree with.
    fn reference<'a>(rules: &'a [Rule], labels: &[Vec<u8>]) -> Option<&'a str> {
        if labels.is_empty() || !labels.iter().all(|l| is_plain_label(l)) {
            return None;
        }
        let query: Vec<Vec<u8>> = labels.iter().map(|l| l.to_ascii_lowercase()).collect();
        let rank = |k: RuleKind| match k {
            RuleKind::Exact => 0,
            RuleKind::OneLabel => 1,
            RuleKind::AnyDepth => 2,
        };
        rules
            .iter()
            .filter(|r| {
                let suffix: Vec<&[u8]> = r.suffix().split('.').map(str::as_bytes).collect();
                let tail_matches = query.len() >= suffix.len()
                    && query[query.len() - suffix.len()..]
                        .iter()
                        .zip(&suffix)
                        .all(|(q, s)| q.as_slice() == *s);
                tail_matches
                    && match r.kind {
                        RuleKind::Exact => query.len() == suffix.len(),
                        RuleKind::OneLabel => query.len() == suffix.len() + 1,
                        RuleKind::AnyDepth => query.len() > suffix.len(),
                    }
            })
            .min_by_key(|r| (rank(r.kind), std::cmp::Reverse(r.suffix().len())))
            .map(|r| r.pattern.as_str())
    }

    fn label_strategy() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        proptest::prop_oneof![
            4 => "[ab]".prop_map(String::into_bytes),
            2 => "[AB]".prop_map(String::into_bytes),
            1 => proptest::strategy::Just(b"a.b".to_vec()),
            1 => proptest::strategy::Just(b"a\0".to_vec()),
            1 => proptest::strategy::Just("\u{212A}".as_bytes().to_vec()),
        ]
    }

    proptest::proptest! {
        #[test]
        fn trie_agrees_with_the_reference_matcher(
            rules in proptest::collection::vec(
                (0usize..3, proptest::collection::vec("[ab]", 2..5)), 1..16),
            queries in proptest::collection::vec(
                (
                    proptest::collection::vec(label_strategy(), 0..4),
                    0usize..16,
                    proptest::bool::ANY,
                ),
                1..24),
        ) {
            let mut seen = std::collections::HashSet::new();
            let mut list = Vec::new();
            let mut suffixes = Vec::new();
            for (kind, labels) in rules {
                let prefix = ["", "*.", "**."][kind];
                let text = format!("{prefix}{}", labels.join("."));
                if seen.insert(text.clone()) {
                    list.push(Rule::parse(&text, list.len() + 1).unwrap());
                    suffixes.push(labels);
                }
            }
            let set = RuleSet::new(list.clone()).unwrap();
            for (head, index, upper) in queries {
                // A few labels in front of (a case variant of) some rule's suffix.
                let mut labels = head;
                for l in &suffixes[index % suffixes.len()] {
                    let l = if upper { l.to_ascii_uppercase() } else { l.clone() };
                    labels.push(l.into_bytes());
                }
                let name = Name::from_labels(labels.iter().map(Vec::as_slice)).unwrap();
                let got = set.find(&name).map(|r| r.pattern.as_str());
                proptest::prop_assert_eq!(got, reference(&list, &labels), "{:?}", labels);
            }
        }
    }

    #[test]
    fn names_from_text_with_escapes_are_judged_on_their_labels() {
        let s = set(&["**.allowed.test"]);
        // "evil\.x" is one label containing a dot.
        let n = Name::from_str("evil\\.x.allowed.test.").unwrap();
        assert_eq!(n.iter().count(), 3);
        assert_eq!(s.find(&n), None);
    }
}
