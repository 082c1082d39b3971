//! Allow rules as written in the policy, turned into the one canonical form the matcher uses.
//!
//! The canonical form is lower-case A-labels (IDNA), no trailing dot, with an optional `*.`
//! (exactly one label below) or `**.` (any depth below) prefix. Normalising here, once, means
//! the matcher compares plain bytes and never has to think about Unicode.
//!
//! Internationalised rules are converted with UTS #46 *non-transitional* processing, which is
//! what `idna::domain_to_ascii` does in idna 1.x (transitional processing is not implemented
//! there): `faß.de` stays `xn--fa-hia.de` instead of becoming `fass.de`, as browsers do today.
//!
//! Everything that could make a rule broader than it looks is an error: a bare `*`/`**`, a
//! wildcard straight on a top-level domain, a `*` inside a label, empty labels, or characters a
//! host name cannot have. Query names are held to the same alphabet by the matcher, so a rule
//! can never match a label that contains a dot, a NUL or other bytes.

use super::lint;
use super::{Rule, RuleKind};

/// Longest name in presentation form without the trailing dot (RFC 1035: 255 octets on the wire).
pub(crate) const MAX_NAME_LEN: usize = 253;
/// Longest label (RFC 1035).
pub(crate) const MAX_LABEL_LEN: usize = 63;

/// Bytes a label may contain, in rules and in queries: letters, digits, `-` and `_`.
pub(crate) fn is_label_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// A rule in canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CanonicalRule {
    pub kind: RuleKind,
    /// With its `*.`/`**.` prefix, e.g. `*.xn--bcher-kva.example`.
    pub pattern: String,
}

impl CanonicalRule {
    /// The name below which a wildcard matches, or the exact name.
    pub(crate) fn suffix(&self) -> &str {
        suffix_of(self.kind, &self.pattern)
    }
}

impl Rule {
    /// Parses one rule as written in a policy (`api.example.com`, `*.example.com`,
    /// `**.example.com`, Unicode or A-labels, optional trailing dot) into canonical form, with no
    /// per-rule options. The error reads "what is wrong; what would be right".
    pub fn parse(text: &str, line: usize) -> Result<Rule, String> {
        let canonical = parse_rule(text)?;
        Ok(Rule {
            pattern: canonical.pattern,
            kind: canonical.kind,
            line,
            column: 0,
            allow_answers: Vec::new(),
        })
    }

    /// The name below which a wildcard rule matches, or the exact name: `example.com` for
    /// `**.example.com`.
    pub fn suffix(&self) -> &str {
        suffix_of(self.kind, &self.pattern)
    }

    /// The multi-tenant suffix (Public Suffix List, PRIVATE section, or the curated list) this
    /// wildcard opens, if any: the policy warns about it and `ctl grant` asks for `--force`.
    pub fn multi_tenant_suffix(&self) -> Option<String> {
        lint::multi_tenant_suffix(self.kind, self.suffix())
    }
}

/// Strips the wildcard prefix of a canonical pattern.
pub(crate) fn suffix_of(kind: RuleKind, pattern: &str) -> &str {
    let prefix = match kind {
        RuleKind::Exact => "",
        RuleKind::OneLabel => "*.",
        RuleKind::AnyDepth => "**.",
    };
    pattern.strip_prefix(prefix).unwrap_or(pattern)
}

/// Parses one rule. The error reads "what is wrong; what would be right".
pub(crate) fn parse_rule(text: &str) -> Result<CanonicalRule, String> {
    let shown = format!("{text:?}");
    if text.is_empty() {
        return Err("empty rule; write a name such as \"api.example.com\"".into());
    }
    let host = host_hint(text);
    let is_ip = |t: &str| {
        t.trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok()
    };
    let bare = if is_ip(text) {
        Some(text)
    } else {
        host.as_deref().filter(|h| is_ip(h))
    }
    .map(|t| t.trim_matches(['[', ']']));
    if let Some(bare) = bare {
        let len = if bare.contains(':') { 128 } else { 32 };
        return Err(format!(
            "{shown} is an IP address, not a name; allow destinations by address with \
             firewall.allow_cidrs, such as [\"{bare}/{len}\"]"
        ));
    }
    if let Some(host) = &host {
        return Err(format!(
            "{shown} is not a host name; write the name only, such as {host:?}"
        ));
    }
    // One trailing dot (the root) is allowed: "example.com." is "example.com".
    let body = text.strip_suffix('.').unwrap_or(text);

    let (kind, suffix) = if body == "*" || body == "**" {
        return Err(format!(
            "{body:?} alone would allow every name; write a suffix such as \"{body}.example.com\""
        ));
    } else if let Some(rest) = body.strip_prefix("**.") {
        (RuleKind::AnyDepth, rest)
    } else if let Some(rest) = body.strip_prefix("*.") {
        (RuleKind::OneLabel, rest)
    } else {
        (RuleKind::Exact, body)
    };
    let prefix = match kind {
        RuleKind::Exact => "",
        RuleKind::OneLabel => "*.",
        RuleKind::AnyDepth => "**.",
    };

    if suffix.contains('*') {
        return Err(misplaced_star(&shown));
    }
    check_empty_labels(&shown, suffix)?;
    if let Some(c) = suffix
        .chars()
        .find(|&c| c.is_ascii() && c != '.' && !is_label_byte(c as u8))
    {
        return Err(bad_character(&shown, c));
    }

    // UTS #46 non-transitional: maps (including upper to lower case) and Punycode-encodes.
    let ascii = idna::domain_to_ascii(suffix).map_err(|_| {
        format!(
            "{shown} is not a valid internationalized domain name (UTS #46); \
             check the spelling, or write its A-label form (\"xn--...\")"
        )
    })?;
    // Mapping can create dots (U+3002 IDEOGRAPHIC FULL STOP becomes '.'): check again.
    check_empty_labels(&shown, &ascii)?;
    if let Some(c) = ascii.bytes().find(|&b| b != b'.' && !is_label_byte(b)) {
        if c == b'*' {
            return Err(misplaced_star(&shown));
        }
        return Err(bad_character(&shown, char::from(c)));
    }
    let ascii = ascii.to_ascii_lowercase();
    for label in ascii.split('.') {
        if label.len() > MAX_LABEL_LEN {
            return Err(format!(
                "{shown} has a label of {} octets ({label:?}), over the DNS limit of {MAX_LABEL_LEN}; \
                 shorten it",
                label.len()
            ));
        }
    }
    // A wildcard matches at least one more label of one octet: "x." in front of the suffix.
    let shortest_match = ascii.len() + if kind == RuleKind::Exact { 0 } else { 2 };
    if shortest_match > MAX_NAME_LEN {
        return Err(format!(
            "{shown} is {shortest_match} octets long, over the DNS limit of {MAX_NAME_LEN}; \
             shorten it"
        ));
    }
    if kind != RuleKind::Exact && !ascii.contains('.') {
        return Err(format!(
            "{shown} would allow every name under the top-level domain {ascii:?}; \
             write a longer suffix such as \"{prefix}example.{ascii}\""
        ));
    }
    if let Some(e) = lint::public_suffix_error(kind, &ascii, &shown) {
        return Err(e);
    }
    Ok(CanonicalRule {
        kind,
        pattern: format!("{prefix}{ascii}"),
    })
}

fn misplaced_star(shown: &str) -> String {
    format!(
        "{shown}: \"*\" may only be the whole first label; write \"*.example.com\" \
         (one label below) or \"**.example.com\" (any depth below)"
    )
}

fn bad_character(shown: &str, c: char) -> String {
    format!(
        "{shown} contains the character {c:?}, which a host name cannot have; \
         use only letters, digits, \"-\" and \"_\""
    )
}

fn check_empty_labels(shown: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!(
            "{shown} has no name after the wildcard; write a suffix such as \"*.example.com\""
        ));
    }
    if name.split('.').any(str::is_empty) {
        return Err(format!(
            "{shown} has an empty label (a leading dot or two dots in a row); remove the extra dot"
        ));
    }
    Ok(())
}

/// If the text looks like a URL or `host:port`, the host part, to suggest instead.
fn host_hint(text: &str) -> Option<String> {
    let rest = text.split_once("://").map_or(text, |(_, rest)| rest);
    let host = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    (host != text && !host.is_empty()).then(|| host.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> (RuleKind, String) {
        let r = parse_rule(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        (r.kind, r.pattern)
    }

    fn err(text: &str) -> String {
        parse_rule(text).expect_err(text)
    }

    #[test]
    fn rules_are_lowercased_and_lose_the_trailing_dot() {
        assert_eq!(
            ok("API.Example.COM."),
            (RuleKind::Exact, "api.example.com".into())
        );
        assert_eq!(
            ok("*.Example.com"),
            (RuleKind::OneLabel, "*.example.com".into())
        );
        assert_eq!(
            ok("**.s3.amazonaws.com."),
            (RuleKind::AnyDepth, "**.s3.amazonaws.com".into())
        );
        assert_eq!(
            ok("_dmarc.example.com"),
            (RuleKind::Exact, "_dmarc.example.com".into())
        );
    }

    #[test]
    fn unicode_rules_become_a_labels_and_keep_the_wildcard() {
        assert_eq!(
            ok("bücher.example"),
            (RuleKind::Exact, "xn--bcher-kva.example".into())
        );
        assert_eq!(
            ok("*.bücher.example"),
            (RuleKind::OneLabel, "*.xn--bcher-kva.example".into())
        );
        assert_eq!(
            ok("**.BÜCHER.example"),
            (RuleKind::AnyDepth, "**.xn--bcher-kva.example".into())
        );
    }

    #[test]
    fn idna_is_non_transitional() {
        // Transitional processing would turn ß into ss (a different name).
        assert_eq!(ok("faß.de"), (RuleKind::Exact, "xn--fa-hia.de".into()));
    }

    #[test]
    fn ideographic_full_stop_is_a_dot_after_mapping() {
        assert_eq!(
            ok("bücher。example"),
            (RuleKind::Exact, "xn--bcher-kva.example".into())
        );
        assert!(err("a。。example").contains("empty label"));
    }

    #[test]
    fn bare_wildcards_are_refused() {
        assert_eq!(
            err("**"),
            "\"**\" alone would allow every name; write a suffix such as \"**.example.com\""
        );
        assert!(err("*").contains("alone would allow every name"));
        assert!(err("*.").contains("alone would allow every name"));
    }

    #[test]
    fn wildcards_on_a_top_level_domain_are_refused() {
        for text in ["*.com", "**.com", "*.com.", "**.COM"] {
            assert!(err(text).contains("top-level domain"), "{text}");
        }
        // An exact single-label name is harmless.
        assert_eq!(ok("localhost"), (RuleKind::Exact, "localhost".into()));
    }

    #[test]
    fn a_star_anywhere_but_the_first_label_is_refused() {
        for text in [
            "a*.example.com",
            "api.*.example.com",
            "***.example.com",
            "*a.example.com",
            "*.*.example.com",
            "example.*",
            "＊.example.com",
        ] {
            assert!(
                err(text).contains("may only be the whole first label"),
                "{text}"
            );
        }
    }

    #[test]
    fn empty_labels_are_refused() {
        for text in [
            "a..b",
            ".example.com",
            "example.com..",
            "*..example.com",
            "",
        ] {
            let e = err(text);
            assert!(e.contains("empty"), "{text}: {e}");
        }
    }

    #[test]
    fn lengths_are_limited() {
        let label63 = "a".repeat(63);
        assert!(parse_rule(&format!("{label63}.example")).is_ok());
        assert!(err(&format!("{}.example", "a".repeat(64))).contains("over the DNS limit of 63"));
        // 4 labels of 63 and dots: 255 octets.
        let long = [label63.as_str(); 4].join(".");
        assert!(err(&long).contains("over the DNS limit of 253"));
        let just = format!("{}.{}.{}.{}", label63, label63, label63, "a".repeat(61));
        assert_eq!(just.len(), 253);
        assert!(parse_rule(&just).is_ok());
        assert!(err(&format!("*.{just}")).contains("over the DNS limit of 253"));
    }

    #[test]
    fn characters_outside_the_host_alphabet_are_refused() {
        for text in [
            "api example.com",
            "api!.example.com",
            "a\u{0}b.example",
            "a'b.example",
        ] {
            let e = err(text);
            assert!(e.contains("use only letters, digits"), "{text}: {e}");
        }
    }

    #[test]
    fn urls_get_a_hint_with_the_host() {
        assert_eq!(
            err("https://api.example.com/v1"),
            "\"https://api.example.com/v1\" is not a host name; write the name only, such as \"api.example.com\""
        );
        assert!(err("api.example.com:443").contains("\"api.example.com\""));
    }

    #[test]
    fn ip_addresses_are_not_names() {
        for text in ["10.0.1.100", "::1", "[2001:db8::1]:443", "10.0.0.1:53"] {
            let e = err(text);
            assert!(e.contains("is an IP address, not a name"), "{text}: {e}");
        }
        assert!(err("::1").ends_with("[\"::1/128\"]"));
        assert!(err("10.0.1.100").ends_with("[\"10.0.1.100/32\"]"));
    }

    #[test]
    fn invalid_punycode_is_refused() {
        assert!(err("xn--zz.example").contains("internationalized"));
    }
}
