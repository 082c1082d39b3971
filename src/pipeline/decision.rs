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
    // Every suffix has one or two labels: read the name's last two once, not once per suffix.
    let mut labels = name.iter().rev();
    let Some(last) = labels.next() else {
        return false;
    };
    let before_last = labels.next();
    SPECIAL_USE.iter().any(|suffix| match suffix {
        [tld] => last.eq_ignore_ascii_case(tld),
        [second, tld] => {
            last.eq_ignore_ascii_case(tld)
                && before_last.is_some_and(|label| label.eq_ignore_ascii_case(second))
        }
        _ => ends_with_labels(name, suffix),
    })
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn special_use_names_are_found_by_their_last_labels_in_any_case() {
        let cases: &[(&str, bool)] = &[
            ("localhost.", true),
            ("LocalHost.", true),
            ("a.b.localhost.", true),
            ("localhost.example.", false),
            ("printer.local.", true),
            ("x.onion.", true),
            ("x.invalid.", true),
            ("x.alt.", true),
            ("home.arpa.", true),
            ("router.HOME.arpa.", true),
            ("arpa.", false),
            ("home.", false),
            ("x.home.example.arpa.", false),
            ("1.0.0.127.in-addr.arpa.", true),
            ("in-addr.arpa.", true),
            ("ip6.arpa.", true),
            ("x.ip6.arpa", true),
            ("use-application-dns.net.", true),
            ("net.", false),
            ("application-dns.net.", false),
            ("x.use-application-dns.net.", true),
            ("example.com.", false),
            ("lab.test.", false),
            (".", false),
            ("com", false),
        ];
        for &(text, special) in cases {
            let name = Name::from_ascii(text).unwrap();
            assert_eq!(is_special_use(&name), special, "{text}");
            let reference = SPECIAL_USE
                .iter()
                .any(|suffix| ends_with_labels(&name, suffix));
            assert_eq!(reference, special, "{text}");
        }
        // A label with a dot in it is one label, not two.
        let dotted = Name::from_labels([b"home.arpa".as_slice()]).unwrap();
        assert!(!is_special_use(&dotted));
    }

    const POLICY: &str = r#"
listen: ["127.0.0.1:5353"]
upstreams: ["192.0.2.53:53"]
qtypes: [A, AAAA, HTTPS]
allow:
  - api.example.com
  - "*.cdn.example.com"
  - "**.deep.example.org"
  - lab.test
clients:
  - name: builders
    from: ["10.1.0.0/16"]
    allow: [registry.example.net]
firewall: {enabled: false}
"#;

    fn policy() -> Policy {
        Policy::parse(POLICY, Path::new("decision-test.yaml")).unwrap()
    }

    #[test]
    fn each_question_gets_its_decision() {
        let policy = policy();
        let anyone: IpAddr = "127.0.0.1".parse().unwrap();
        let builder: IpAddr = "10.1.2.3".parse().unwrap();
        use RecordType::{A, AAAA, HTTPS, TXT};
        // (client, name, type, expected: Ok(rule pattern) or Err(reason))
        let table: &[(IpAddr, &str, RecordType, Result<&str, DenyReason>)] = &[
            (anyone, "api.example.com.", A, Ok("api.example.com")),
            (anyone, "API.Example.COM.", AAAA, Ok("api.example.com")),
            (anyone, "api.example.com.", HTTPS, Ok("api.example.com")),
            (anyone, "api.example.com.", TXT, Err(DenyReason::Qtype)),
            (anyone, "x.api.example.com.", A, Err(DenyReason::Policy)),
            (anyone, "example.com.", A, Err(DenyReason::Policy)),
            (anyone, "a.cdn.example.com.", A, Ok("*.cdn.example.com")),
            (anyone, "a.b.cdn.example.com.", A, Err(DenyReason::Policy)),
            (anyone, "cdn.example.com.", A, Err(DenyReason::Policy)),
            (
                anyone,
                "a.b.c.deep.example.org.",
                A,
                Ok("**.deep.example.org"),
            ),
            (anyone, "evil.example.", A, Err(DenyReason::Policy)),
            // Groups: the builders' allowlist is theirs alone.
            (
                builder,
                "registry.example.net.",
                A,
                Ok("registry.example.net"),
            ),
            (anyone, "registry.example.net.", A, Err(DenyReason::Policy)),
            // Special-use names are never forwarded, rule or not.
            (anyone, "localhost.", A, Err(DenyReason::SpecialUse)),
            (anyone, "printer.local.", A, Err(DenyReason::SpecialUse)),
            (anyone, "x.onion.", A, Err(DenyReason::SpecialUse)),
            (
                anyone,
                "1.0.0.10.in-addr.arpa.",
                A,
                Err(DenyReason::SpecialUse),
            ),
            (anyone, "router.home.arpa.", A, Err(DenyReason::SpecialUse)),
            (
                anyone,
                "use-application-dns.net.",
                A,
                Err(DenyReason::SpecialUse),
            ),
            (anyone, "x.invalid.", A, Err(DenyReason::SpecialUse)),
            // `.test` is special-use unless a rule names it.
            (anyone, "lab.test.", A, Ok("lab.test")),
            (anyone, "other.test.", A, Err(DenyReason::SpecialUse)),
        ];
        for (client, name, qtype, expected) in table {
            let name = Name::from_ascii(name).unwrap();
            let got = match decide(&policy, *client, &name, *qtype) {
                Decision::Allow { rule, .. } => Ok(rule.pattern.as_str()),
                Decision::Deny(reason) => Err(reason),
            };
            assert_eq!(&got, expected, "{client} {name} {qtype}");
        }
    }

    #[test]
    fn a_label_with_a_dot_is_not_two_labels() {
        let policy = policy();
        let client: IpAddr = "127.0.0.1".parse().unwrap();
        // Prints as `evil\.api.example.com.`, but is three labels under example.com.
        let name = Name::from_labels([b"evil.api".as_slice(), b"example", b"com"]).unwrap();
        assert!(matches!(
            decide(&policy, client, &name, RecordType::A),
            Decision::Deny(DenyReason::Policy)
        ));
        // `local` as part of a label is not the special-use suffix.
        let name = Name::from_labels([b"x".as_slice(), b"not.local"]).unwrap();
        assert!(!is_special_use(&name));
    }

    #[test]
    fn the_group_that_allowed_is_named() {
        let policy = policy();
        let name = Name::from_ascii("registry.example.net.").unwrap();
        let Decision::Allow { group, rule } =
            decide(&policy, "10.1.0.9".parse().unwrap(), &name, RecordType::A)
        else {
            panic!("allowed for builders");
        };
        assert_eq!(group, "builders");
        assert!(!is_wildcard(rule));
        let name = Name::from_ascii("x.cdn.example.com.").unwrap();
        let Decision::Allow { group, rule } =
            decide(&policy, "127.0.0.1".parse().unwrap(), &name, RecordType::A)
        else {
            panic!("allowed by the wildcard");
        };
        assert_eq!(group, "default");
        assert!(is_wildcard(rule));
    }

    #[test]
    fn every_reason_has_its_log_name() {
        let table = [
            (DenyReason::Policy, "policy"),
            (DenyReason::Qtype, "qtype"),
            (DenyReason::SpecialUse, "special-use"),
            (DenyReason::Rebinding, "rebinding"),
            (DenyReason::ExfiltrationBudget, "exfiltration-budget"),
            (DenyReason::RateLimit, "rate-limit"),
            (DenyReason::Malformed, "malformed"),
            (DenyReason::Opcode, "opcode"),
        ];
        for (reason, text) in table {
            assert_eq!(reason.to_string(), text);
        }
    }
}
