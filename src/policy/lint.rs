//! Lint: policies that load fine but are probably not what the author meant.
//!
//! The most important one is a wildcard over a multi-tenant suffix. `**.github.io` looks like
//! "GitHub", but anyone can create `attacker.github.io`, and every query for
//! `<secret>.attacker.github.io` reaches the attacker's authoritative server: the wildcard is
//! an exfiltration channel, and the answers it returns are admitted to the firewall. The list
//! below is a curated part of the Public Suffix List's PRIVATE section (names where third
//! parties can register subdomains); it warns rather than errs because sometimes a wildcard is
//! the only option and the operator has decided to accept the risk.

use ipnet::IpNet;

use super::diagnostic::{Pos, Report, quote};
use super::schema::DraftGroup;
use super::{ExfiltrationLimits, RuleKind};

/// Suffixes below which anyone can register a name (from the PSL PRIVATE section).
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

/// The multi-tenant suffix a wildcard rule opens, if any: its suffix is at or below one of
/// them, or (for `**.`) one of them is below its suffix.
pub(crate) fn multi_tenant_suffix(kind: RuleKind, suffix: &str) -> Option<&'static str> {
    match kind {
        RuleKind::Exact => None,
        RuleKind::OneLabel => MULTI_TENANT_SUFFIXES
            .iter()
            .copied()
            .find(|t| is_at_or_below(suffix, t)),
        RuleKind::AnyDepth => MULTI_TENANT_SUFFIXES
            .iter()
            .copied()
            .find(|t| is_at_or_below(suffix, t) || is_at_or_below(t, suffix)),
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

    #[test]
    fn wildcards_at_or_below_a_multi_tenant_suffix_are_flagged() {
        assert_eq!(
            multi_tenant_suffix(RuleKind::OneLabel, "github.io"),
            Some("github.io")
        );
        assert_eq!(
            multi_tenant_suffix(RuleKind::AnyDepth, "myorg.github.io"),
            Some("github.io")
        );
        assert_eq!(
            multi_tenant_suffix(RuleKind::AnyDepth, "s3.amazonaws.com"),
            Some("amazonaws.com")
        );
        assert_eq!(
            multi_tenant_suffix(RuleKind::OneLabel, "eu-west-1.amazonaws.com"),
            Some("amazonaws.com")
        );
    }

    #[test]
    fn exact_names_and_lookalike_suffixes_are_not_flagged() {
        assert_eq!(multi_tenant_suffix(RuleKind::Exact, "github.io"), None);
        assert_eq!(
            multi_tenant_suffix(RuleKind::AnyDepth, "notgithub.io"),
            None
        );
        assert_eq!(multi_tenant_suffix(RuleKind::AnyDepth, "github.com"), None);
        assert_eq!(multi_tenant_suffix(RuleKind::OneLabel, "io.example"), None);
    }

    #[test]
    fn any_depth_at_or_above_a_multi_tenant_suffix_is_flagged() {
        assert_eq!(
            multi_tenant_suffix(RuleKind::AnyDepth, "amazonaws.com"),
            Some("amazonaws.com")
        );
        assert!(is_at_or_below("s3.amazonaws.com", "amazonaws.com"));
        assert!(!is_at_or_below("amazonaws.com", "s3.amazonaws.com"));
        assert!(!is_at_or_below("xs3.amazonaws.com", "s3.amazonaws.com"));
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
