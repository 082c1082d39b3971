//! YAML text to a tree of positioned nodes.
//!
//! Why not `#[derive(Deserialize)]` straight into the policy types: serde stops at the first
//! unknown key or wrong type, and we promise to report *every* error. So serde-saphyr (pure safe
//! Rust, with budgets against alias bombs and deep nesting) only builds a generic tree here,
//! every node carrying the line and column of its text (via `serde_saphyr::Spanned`); the schema
//! in `schema.rs` walks that tree and reports all problems at once.
//!
//! Parser settings chosen for a security policy:
//! - duplicate keys are passed through so the schema can report both lines (YAML forbids them);
//! - only YAML 1.2 booleans (`true`/`false`): `on`/`no` stay text and are rejected where a
//!   boolean is expected, instead of silently meaning something else;
//! - unknown tags are rejected;
//! - exactly one document.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::options::DuplicateKeyPolicy;
use serde_saphyr::{Location, Spanned};
use std::fmt;

use super::diagnostic::Pos;

/// A YAML node and where its text starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub pos: Pos,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Entries in file order; duplicate keys are kept (the schema reports them).
    Map(Vec<(Node, Node)>),
}

impl Value {
    /// What this is called in messages ("expected a list, found a number").
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Value::Null => "nothing (null)",
            Value::Bool(_) => "a boolean",
            Value::Int(_) | Value::Float(_) => "a number",
            Value::Str(_) => "text",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

fn pos_of(spanned_defined: Location, referenced: Location) -> Pos {
    // `defined` is where the text is (for an alias: the anchored node); fall back to the use site.
    let loc = if spanned_defined.line() > 0 {
        spanned_defined
    } else {
        referenced
    };
    Pos {
        line: usize::try_from(loc.line()).unwrap_or(usize::MAX),
        column: usize::try_from(loc.column()).unwrap_or(usize::MAX),
    }
}

impl From<Spanned<Value>> for Node {
    fn from(s: Spanned<Value>) -> Node {
        Node {
            pos: pos_of(s.defined, s.referenced),
            value: s.value,
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        // Larger than any limit in a policy; keep it out of range rather than wrap.
        Ok(Value::Int(i128::try_from(v).unwrap_or(i128::MAX)))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Value>>()? {
            items.push(Node::from(item));
        }
        Ok(Value::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<Value>>()? {
            let value = map.next_value::<Spanned<Value>>()?;
            entries.push((Node::from(key), Node::from(value)));
        }
        Ok(Value::Map(entries))
    }
}

/// Parses YAML text into a node tree, or says where the YAML itself is broken.
pub(crate) fn parse(text: &str) -> Result<Node, (Pos, String)> {
    let options = serde_saphyr::options! {
        duplicate_keys: DuplicateKeyPolicy::PassThrough,
        strict_booleans: true,
        reject_unsupported_tags: true,
        with_snippet: false,
    };
    match serde_saphyr::from_str_with_options::<Spanned<Value>>(text, options) {
        Ok(root) => Ok(Node::from(root)),
        Err(err) => Err(describe(&err, text)),
    }
}

fn describe(err: &serde_saphyr::Error, source: &str) -> (Pos, String) {
    let mut inner = err.without_snippet();
    while let serde_saphyr::Error::AliasError { error, .. } = inner {
        inner = error.without_snippet();
    }
    let pos = match inner.location().or_else(|| err.location()) {
        Some(loc) if loc.line() > 0 => pos_of(loc, loc),
        _ => Pos::START,
    };
    let text =
        serde_saphyr::MessageFormatter::format_message(&serde_saphyr::UserMessageFormatter, inner);
    // The parser's wording may quote file text: strip control characters.
    let text: String = text.chars().filter(|c| !c.is_control()).collect();
    let at = source
        .lines()
        .nth(pos.line.saturating_sub(1))
        .and_then(|line| line.chars().nth(pos.column.saturating_sub(1)));
    let fix = if at == Some('*') {
        // The most likely mistake in a policy: an unquoted wildcard rule reads as an alias.
        "a value that starts with \"*\" is a YAML alias: put wildcard rules in quotes, \
         such as \"*.example.com\""
    } else {
        "fix the YAML syntax here (values containing \": \" or \" #\" need quotes)"
    };
    (pos, format!("the file is not valid YAML: {text}; {fix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(node: &Node) -> &[(Node, Node)] {
        match &node.value {
            Value::Map(m) => m,
            other => panic!("not a map: {other:?}"),
        }
    }

    #[test]
    fn nodes_carry_line_and_column_of_keys_and_values() {
        let root =
            parse("listen: [\"127.0.0.1:53\"]\nallow:\n  - a.example\n  - name: b.example\n")
                .unwrap();
        let entries = map(&root);
        assert_eq!(entries[0].0.pos, Pos { line: 1, column: 1 });
        assert_eq!(entries[1].0.pos, Pos { line: 2, column: 1 });
        let Value::Seq(items) = &entries[1].1.value else {
            panic!()
        };
        assert_eq!(items[0].pos, Pos { line: 3, column: 5 });
        assert_eq!(items[0].value, Value::Str("a.example".into()));
        let inner = map(&items[1]);
        assert_eq!(inner[0].0.pos, Pos { line: 4, column: 5 });
        assert_eq!(
            inner[0].1.pos,
            Pos {
                line: 4,
                column: 11
            }
        );
    }

    #[test]
    fn duplicate_keys_are_kept_for_the_schema_to_report() {
        let root = parse("a: 1\na: 2\n").unwrap();
        assert_eq!(map(&root).len(), 2);
    }

    #[test]
    fn scalars_are_typed_by_yaml_1_2_rules() {
        let root = parse("a: 0x0d5f\nb: 2s\nc: on\nd: true\ne:\n").unwrap();
        let values: Vec<_> = map(&root).iter().map(|(_, v)| v.value.clone()).collect();
        assert_eq!(
            values,
            vec![
                Value::Int(0x0d5f),
                Value::Str("2s".into()),
                Value::Str("on".into()),
                Value::Bool(true),
                Value::Null
            ]
        );
    }

    #[test]
    fn broken_yaml_reports_a_position() {
        let (pos, msg) = parse("a: [1, 2\nb: c\n").unwrap_err();
        assert!(pos.line >= 1, "{pos:?}");
        assert!(msg.starts_with("the file is not valid YAML"), "{msg}");
    }

    #[test]
    fn unquoted_wildcard_gets_a_hint_to_quote_it() {
        let (pos, msg) = parse("allow:\n  - *.example.com\n").unwrap_err();
        assert_eq!(pos, Pos { line: 2, column: 5 });
        assert!(
            msg.ends_with("put wildcard rules in quotes, such as \"*.example.com\""),
            "{msg}"
        );
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let prev = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
            ));
        }
        assert!(parse(&text).is_err());
    }
}
