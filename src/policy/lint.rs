//! Lint: policies that load fine but are probably not what the author meant, and the Public
//! Suffix List checks that decide when a wildcard is too wide to load at all.
//!
//! A wildcard directly over a public suffix from the list's ICANN section (`*.co.uk`,
//! `**.com.au`, or `*.kawasaki.jp`, where every name one level down is itself a suffix) is
//! as wide as a wildcard over a top-level domain: every name under it belongs to an unrelated
//! owner. Rule parsing (`name::parse_rule`) refuses it, so `check`, `serve`, reload and
//! `ctl grant` all refuse it the same way.
//!
//! A wildcard over a multi-tenant suffix (the list's PRIVATE section: `**.github.io`,
//! `*.herokuapp.com`) looks like one company, but anyone can create `attacker.github.io`, and
//! every query for `<secret>.attacker.github.io` reaches the attacker's authoritative server:
//! the wildcard is an exfiltration channel, and the answers it returns are admitted to the
//! firewall. That one warns (and needs `--force` for a grant) rather than errs, because
//! sometimes a wildcard is the only option and the operator has decided to accept the risk.
//!
//! The whole list comes compiled in from the `psl` crate (no file to read at run time, no
//! network). It can answer "which suffix does this name end in" but cannot list the suffixes
//! *below* a name, so for `**.` the curated [`MULTI_TENANT_SUFFIXES`] below still catches
//! `**.amazonaws.com` (whose tenants, like `s3.amazonaws.com`, sit one level down).

use ipnet::IpNet;
use psl::Type;

use super::diagnostic::{Pos, Report, quote};
use super::schema::DraftGroup;
use super::{ExfiltrationLimits, RuleKind};

/// Well-known hosting suffixes below which anyone can register a name (from the PSL PRIVATE
/// section), kept for the `**.` direction the compiled list cannot answer (see module docs).
pub const MULTI_TENANT_SUFFIXES: &[&str] = &[
    "000webhostapp.com",
    "amazonaws.com",
    "appspot.com",
    "azurestaticapps.net",
    "azurewebsites.net",
    "bitbucket.io",
    "blogspot.com",
    "cloudapp.net",
    "cloudflareworkers.com",
    "cloudfront.net",
    "cloudfunctions.net",
    "codeberg.page",
    "deno.dev",
    "elasticbeanstalk.com",
    "firebaseapp.com",
    "fly.dev",
    "github.io",
    "githubusercontent.com",
    "gitlab.io",
    "glitch.me",
    "herokuapp.com",
    "myshopify.com",
    "netlify.app",
    "ngrok-free.app",
    "ngrok.app",
    "ngrok.io",
    "now.sh",
    "onrender.com",
    "pages.dev",
    "pythonanywhere.com",
    "r2.dev",
    "readthedocs.io",
    "repl.co",
    "s3.amazonaws.com",
    "surge.sh",
    "translate.goog",
    "trycloudflare.com",
    "vercel.app",
    "web.app",
    "workers.dev",
];

/// `true` if `name` is `ancestor` or below it (both canonical: lower-case, no trailing dot).
pub(crate) fn is_at_or_below(name: &str, ancestor: &str) -> bool {
    name == ancestor
        || name
            .strip_suffix(ancestor)
            .is_some_and(|head| head.ends_with('.'))
}

/// What the Public Suffix List says about the suffix of a wildcard rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SuffixRisk {
    /// The wildcard is directly over a public suffix of the ICANN section (`co.uk`), or every
    /// name one level below its suffix is one (`*.kawasaki.jp`): refused like a TLD.
    Public {
        /// The suffix as written in the rule (A-labels).
        suffix: String,
        /// `true` when the names one level below `suffix` are the public suffixes.
        children: bool,
    },
    /// The wildcard opens a multi-tenant (PRIVATE section) suffix: a warning.
    MultiTenant { tenant: String },
}

/// A label that no list entry names, to ask "is there a `*.suffix` rule" with.
const PROBE_LABEL: &str = "dnsfence-probe";

/// How many labels of `name` (canonical, Unicode or A-labels) the list calls its public
/// suffix, and from which section; `None` when only the implicit `*` rule matched.
fn listed_suffix(name: &str) -> Option<(usize, Type)> {
    // The compiled list holds Unicode labels only: look internationalised names up in
    // their Unicode form (a name idna cannot decode simply matches nothing).
    let (unicode, decoded) = idna::domain_to_unicode(name);
    let lookup = if decoded.is_ok() {
        unicode.as_str()
    } else {
        name
    };
    let found = psl::suffix(lookup.as_bytes())?;
    let typ = found.typ()?;
    let labels = found.as_bytes().split(|&b| b == b'.').count();
    Some((labels, typ))
}

/// The last `n` labels of `name`.
fn last_labels(name: &str, n: usize) -> &str {
    let mut start = name.len();
    for _ in 0..n {
        match name[..start].rfind('.') {
            Some(dot) if start > 0 => start = dot,
            _ => return name,
        }
    }
    name.get(start + 1..).unwrap_or(name)
}

/// Judges a rule's suffix against the whole Public Suffix List (and, for `**.`, the curated
/// multi-tenant list below). `suffix` is canonical: lower-case A-labels, no trailing dot.
pub(crate) fn suffix_risk(kind: RuleKind, suffix: &str) -> Option<SuffixRisk> {
    if kind == RuleKind::Exact {
        return None;
    }
    let labels = suffix.split('.').count();
    let own = listed_suffix(suffix);
    let child = listed_suffix(&format!("{PROBE_LABEL}.{suffix}"));
    match child {
        Some((n, Type::Icann)) if n == labels + 1 => {
            return Some(SuffixRisk::Public {
                suffix: suffix.to_owned(),
                children: true,
            });
        }
        Some((n, Type::Private)) if n == labels + 1 => {
            return Some(SuffixRisk::MultiTenant {
                tenant: format!("*.{suffix}"),
            });
        }
        _ => {}
    }
    match own {
        Some((n, Type::Icann)) if n == labels => {
            return Some(SuffixRisk::Public {
                suffix: suffix.to_owned(),
                children: false,
            });
        }
        Some((n, Type::Private)) => {
            return Some(SuffixRisk::MultiTenant {
                tenant: last_labels(suffix, n).to_owned(),
            });
        }
        _ => {}
    }
    MULTI_TENANT_SUFFIXES
        .iter()
        .copied()
        .find(|t| {
            is_at_or_below(suffix, t) || (kind == RuleKind::AnyDepth && is_at_or_below(t, suffix))
        })
        .map(|t| SuffixRisk::MultiTenant {
            tenant: t.to_owned(),
        })
}

/// The multi-tenant suffix a wildcard rule opens, if any (the warning's subject).
pub(crate) fn multi_tenant_suffix(kind: RuleKind, suffix: &str) -> Option<String> {
    match suffix_risk(kind, suffix)? {
        SuffixRisk::MultiTenant { tenant } => Some(tenant),
        SuffixRisk::Public { .. } => None,
    }
}

/// The error for a wildcard over an ICANN public suffix, `None` if it is not one. `shown` is
/// the rule as written, quoted.
pub(crate) fn public_suffix_error(kind: RuleKind, suffix: &str, shown: &str) -> Option<String> {
    let prefix = if kind == RuleKind::AnyDepth {
        "**."
    } else {
        "*."
    };
    match suffix_risk(kind, suffix)? {
        SuffixRisk::Public {
            suffix,
            children: false,
        } => Some(format!(
            "{shown} would allow every name under the public suffix {suffix:?} (Public Suffix \
             List, ICANN section), where unrelated owners register names; write the domain you \
             mean, such as \"{prefix}example.{suffix}\""
        )),
        SuffixRisk::Public {
            suffix,
            children: true,
        } => Some(format!(
            "{shown}: every name directly under {suffix:?} is itself a public suffix (Public \
             Suffix List, ICANN section: \"*.{suffix}\"), so this allows names of unrelated \
             owners; write the domain you mean, such as \"{prefix}example.town.{suffix}\""
        )),
        SuffixRisk::MultiTenant { .. } => None,
    }
}

/// The warning for a wildcard over a multi-tenant suffix.
pub(crate) fn multi_tenant_message(pattern: &str, tenant: &str) -> String {
    format!(
        "{pattern:?} allows names under {tenant:?}, where anyone can register a name and \
         exfiltrate data through it (and have its addresses admitted); list the exact names \
         you need instead"
    )
}

/// `true` if two networks share at least one address.
pub(crate) fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// `true` for a network that covers a whole address family (`0.0.0.0/0`, `::/0`).
pub(crate) fn is_everything(net: &IpNet) -> bool {
    net.prefix_len() == 0
}

/// Lints on the allowlists: `allow_answers` that turn protection off or overlap `deny_answers`,
/// wildcard rules no name can fit under `exfiltration.max_name_length`.
pub(crate) fn groups<'a>(
    r: &mut Report,
    groups: impl Iterator<Item = &'a DraftGroup>,
    deny_answers: &[(Pos, IpNet)],
    exfiltration: &ExfiltrationLimits,
) {
    for g in groups {
        for &(pos, allowed) in &g.answer_positions {
            if is_everything(&allowed) {
                r.warn(
                    pos,
                    format!(
                        "allow_answers \"{allowed}\" admits private and internal answers from \
                         anywhere, which turns off DNS-rebinding protection; list the networks you need"
                    ),
                );
            }
            for &(dpos, denied) in deny_answers {
                if overlaps(&allowed, &denied) {
                    r.warn(
                        pos,
                        format!(
                            "allow_answers \"{allowed}\" overlaps deny_answers \"{denied}\" (line {}), \
                             which always wins; remove one of them",
                            dpos.line
                        ),
                    );
                }
            }
        }
        for (rule, &pos) in g.rules.iter().zip(&g.rule_positions) {
            if rule.kind == RuleKind::Exact {
                continue;
            }
            let shortest = rule.suffix().len() + 2;
            if shortest > exfiltration.max_name_length {
                r.warn(
                    pos,
                    format!(
                        "no name under {:?} fits exfiltration.max_name_length ({}), so the rule \
                         can never allow anything; raise the limit or use a shorter suffix",
                        rule.pattern, exfiltration.max_name_length
                    ),
                );
            }
        }
    }
}

/// A client group whose every network is inside an earlier group's can never be chosen.
pub(crate) fn shadowed_clients(r: &mut Report, clients: &[(Pos, DraftGroup)]) {
    for (i, (pos, g)) in clients.iter().enumerate() {
        if g.from_positions.is_empty() {
            continue;
        }
        for (_, earlier) in &clients[..i] {
            let covered = g
                .from_positions
                .iter()
                .all(|(_, net)| earlier.from.iter().any(|e| e.contains(net)));
            if covered {
                r.warn(
                    *pos,
                    format!(
                        "group {} can never match: every network in its `from` is inside the \
                         earlier group {}, and the first match wins; move it up or narrow the earlier group",
                        quote(&g.name),
                        quote(&earlier.name)
                    ),
                );
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(kind: RuleKind, suffix: &str) -> Option<String> {
        multi_tenant_suffix(kind, suffix)
    }

    fn public(kind: RuleKind, suffix: &str) -> bool {
        matches!(suffix_risk(kind, suffix), Some(SuffixRisk::Public { .. }))
    }

    #[test]
    fn wildcards_at_or_below_a_multi_tenant_suffix_are_flagged() {
        assert_eq!(
            tenant(RuleKind::OneLabel, "github.io").as_deref(),
            Some("github.io")
        );
        assert_eq!(
            tenant(RuleKind::AnyDepth, "myorg.github.io").as_deref(),
            Some("github.io")
        );
        assert!(tenant(RuleKind::AnyDepth, "s3.amazonaws.com").is_some());
        assert_eq!(
            tenant(RuleKind::OneLabel, "eu-west-1.amazonaws.com").as_deref(),
            Some("amazonaws.com")
        );
    }

    #[test]
    fn exact_names_and_lookalike_suffixes_are_not_flagged() {
        assert_eq!(suffix_risk(RuleKind::Exact, "github.io"), None);
        assert_eq!(suffix_risk(RuleKind::Exact, "co.uk"), None);
        assert_eq!(suffix_risk(RuleKind::AnyDepth, "notgithub.io"), None);
        assert_eq!(suffix_risk(RuleKind::AnyDepth, "github.com"), None);
        assert_eq!(suffix_risk(RuleKind::OneLabel, "io.example"), None);
        assert_eq!(suffix_risk(RuleKind::OneLabel, "example.co.uk"), None);
        assert_eq!(suffix_risk(RuleKind::AnyDepth, "bbc.co.uk"), None);
        assert_eq!(suffix_risk(RuleKind::AnyDepth, "svc.cluster.local"), None);
    }

    #[test]
    fn any_depth_at_or_above_a_multi_tenant_suffix_is_flagged() {
        assert_eq!(
            tenant(RuleKind::AnyDepth, "amazonaws.com").as_deref(),
            Some("amazonaws.com")
        );
        assert!(is_at_or_below("s3.amazonaws.com", "amazonaws.com"));
        assert!(!is_at_or_below("amazonaws.com", "s3.amazonaws.com"));
        assert!(!is_at_or_below("xs3.amazonaws.com", "s3.amazonaws.com"));
    }

    #[test]
    fn wildcards_over_icann_public_suffixes_are_public() {
        for (kind, suffix) in [
            (RuleKind::OneLabel, "co.uk"),
            (RuleKind::AnyDepth, "com.au"),
            (RuleKind::OneLabel, "com.br"),
            (RuleKind::AnyDepth, "gov.uk"),
            (RuleKind::OneLabel, "ac.jp"),
            (RuleKind::AnyDepth, "k12.ma.us"),
            // Only `*.kawasaki.jp` is listed: the names one level down are the suffixes.
            (RuleKind::OneLabel, "kawasaki.jp"),
            (RuleKind::AnyDepth, "sch.uk"),
            // An internationalised suffix, written as A-labels (`公司.cn`).
            (RuleKind::OneLabel, "xn--55qx5d.cn"),
        ] {
            assert!(public(kind, suffix), "{suffix}");
        }
        // The exception `!city.kawasaki.jp` is a registrable domain.
        assert!(!public(RuleKind::OneLabel, "city.kawasaki.jp"));
        assert!(!public(RuleKind::OneLabel, "example.co.uk"));
    }

    #[test]
    fn wildcards_over_the_whole_private_section_are_multi_tenant() {
        // None of these is in the curated list: they come from the compiled PSL.
        for suffix in [
            "herokuapp.com",
            "duckdns.org",
            "wixsite.com",
            "ddns.net",
            "compute.herokuapp.com",
        ] {
            assert!(tenant(RuleKind::OneLabel, suffix).is_some(), "{suffix}");
            assert!(!public(RuleKind::OneLabel, suffix), "{suffix}");
        }
        for suffix in [
            "duckdns.org",
            "wixsite.com",
            "ddns.net",
            "compute.herokuapp.com",
        ] {
            assert!(!MULTI_TENANT_SUFFIXES.contains(&suffix), "{suffix}");
        }
        assert_eq!(
            tenant(RuleKind::AnyDepth, "app.herokuapp.com").as_deref(),
            Some("herokuapp.com")
        );
    }

    #[test]
    fn the_public_suffix_error_names_the_suffix_and_a_fix() {
        let e = public_suffix_error(RuleKind::OneLabel, "co.uk", "\"*.co.uk\"").unwrap();
        assert!(e.contains("public suffix \"co.uk\""), "{e}");
        assert!(e.contains("\"*.example.co.uk\""), "{e}");
        let e =
            public_suffix_error(RuleKind::AnyDepth, "kawasaki.jp", "\"**.kawasaki.jp\"").unwrap();
        assert!(
            e.contains("every name directly under \"kawasaki.jp\""),
            "{e}"
        );
        assert!(public_suffix_error(RuleKind::OneLabel, "github.io", "x").is_none());
    }

    #[test]
    fn last_labels_counts_from_the_right() {
        assert_eq!(last_labels("a.b.c", 2), "b.c");
        assert_eq!(last_labels("a.b.c", 3), "a.b.c");
        assert_eq!(last_labels("a.b.c", 9), "a.b.c");
        assert_eq!(last_labels("a.b.c", 1), "c");
    }

    #[test]
    fn networks_overlap_when_either_contains_the_other() {
        let a: IpNet = "10.0.0.0/8".parse().unwrap();
        let b: IpNet = "10.0.1.0/24".parse().unwrap();
        let c: IpNet = "192.168.0.0/16".parse().unwrap();
        assert!(overlaps(&a, &b) && overlaps(&b, &a));
        assert!(!overlaps(&a, &c));
    }

    #[test]
    fn the_required_multi_tenant_suffixes_are_listed() {
        for s in [
            "github.io",
            "githubusercontent.com",
            "amazonaws.com",
            "s3.amazonaws.com",
            "cloudfront.net",
            "workers.dev",
            "pages.dev",
            "herokuapp.com",
            "vercel.app",
            "netlify.app",
            "appspot.com",
            "azurewebsites.net",
            "blogspot.com",
            "firebaseapp.com",
            "web.app",
            "ngrok.io",
            "ngrok-free.app",
            "fly.dev",
            "onrender.com",
            "glitch.me",
            "repl.co",
            "trycloudflare.com",
        ] {
            assert!(MULTI_TENANT_SUFFIXES.contains(&s), "{s}");
        }
        let mut sorted = MULTI_TENANT_SUFFIXES.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted, MULTI_TENANT_SUFFIXES);
    }
}
