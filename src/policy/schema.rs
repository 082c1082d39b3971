//! The policy file's schema: which keys exist, their defaults, and every check on them.
//!
//! This walks the positioned YAML tree and builds the validated [`Policy`]. It never stops at
//! an error: each part falls back to its default so that the rest can still be checked, and
//! the caller discards the result if anything was reported as an error.
//!
//! One file per section of the policy, each owning its keys, their bounds and their checks:
//! - `endpoints`: `listen`, `upstreams`, `upstream_timeout`, `upstream_order`,
//!   `upstream_tls_ca`;
//! - `queries`: `deny_with`, `qtypes`, `cname`, `https_hints` (how a query is answered);
//! - `answer_addresses`: `deny_answers`, `nat64_prefixes` (which answer addresses are refused);
//! - `groups`: `allow`, `allow_answers`, `clients` (the allowlists);
//! - `log`, `ttl`, `limits`, `exfiltration`, `firewall`.
//!
//! Lints that look across sections (overlaps, shadowed groups) live in `lint.rs`.

mod answer_addresses;
mod endpoints;
mod exfiltration;
mod firewall;
mod groups;
mod limits;
mod log;
mod observe;
mod queries;
mod ttl;

use std::path::Path;

use super::Policy;
use super::diagnostic::{Pos, Report};
use super::lint;
use super::raw::{Node, Value};
use super::read;
use super::validate;

pub use firewall::check_table_name;

/// Reports the problems `validate` found in a section at the keys they name (the section's
/// own position when the key is absent).
fn report(r: &mut Report, f: &read::Fields<'_>, problems: Vec<validate::Problem>) {
    for p in problems {
        let leaf = p.key.rsplit('.').next().unwrap_or(p.key);
        let pos = f.get(leaf).map_or(f.pos, |n| n.pos);
        r.error(pos, p.message);
    }
}
pub(crate) use groups::DraftGroup;

const TOP_KEYS: &[&str] = &[
    "listen",
    "upstreams",
    "upstream_timeout",
    "upstream_order",
    "upstream_tls_ca",
    "deny_with",
    "allow",
    "allow_answers",
    "qtypes",
    "clients",
    "log",
    "ttl",
    "deny_answers",
    "nat64_prefixes",
    "cname",
    "https_hints",
    "limits",
    "exfiltration",
    "firewall",
    "mode",
    "audit",
    "metrics",
    "control",
    "revoke",
    "grants",
];

/// Builds the policy; `None` if any error was reported.
pub(crate) fn build(root: &Node, source: &Path, r: &mut Report) -> Option<Policy> {
    if root.value == Value::Null {
        r.error(
            Pos::START,
            "the policy is empty; write at least `listen:`, `upstreams:` and `allow:` \
             (see policy/default.yaml)",
        );
        return None;
    }
    let f = read::fields(r, root, "the policy", TOP_KEYS)?;

    let endpoints = endpoints::read(r, &f);
    let deny_with = queries::deny_with(r, f.get("deny_with"));
    let qtypes = queries::qtypes(r, f.get("qtypes"));
    let cname = queries::cname(r, f.get("cname"));
    let https_hints = queries::https_hints(r, f.get("https_hints"));
    let log = log::target(r, f.get("log"));
    let ttl = ttl::read(r, f.get("ttl"));
    let deny_answers = answer_addresses::deny_answers(r, f.get("deny_answers"));
    let nat64_prefixes = answer_addresses::nat64_prefixes(r, f.get("nat64_prefixes"));
    let limits = limits::read(r, f.get("limits"));
    let exfiltration = exfiltration::read(r, f.get("exfiltration"));
    let firewall = firewall::read(r, f.get("firewall"));
    let mode = observe::mode(r, f.get("mode"), f.get("audit"), f.pos);
    let metrics = observe::metrics(r, f.get("metrics"), &endpoints.listen);

    let control = super::control::read_sections::control(r, f.get("control"));
    let revoke = super::control::read_sections::revoke(r, f.get("revoke"));
    let grants = super::control::read_sections::grants(r, f.get("grants"));

    let default_group = groups::group(
        r,
        "default",
        Vec::new(),
        f.get("allow"),
        f.get("allow_answers"),
    );
    let clients = groups::clients(r, f.get("clients"));

    let all_groups = std::iter::once(&default_group).chain(clients.iter().map(|(_, g)| g));
    lint::groups(r, all_groups, &deny_answers, &exfiltration);
    lint::shadowed_clients(r, &clients);
    if default_group.rules.is_empty() && clients.iter().all(|(_, g)| g.rules.is_empty()) {
        r.warn(
            f.pos,
            "no group allows any name, so every query will be denied; add names under `allow:`",
        );
    }

    if r.has_errors() {
        return None;
    }
    Some(Policy {
        source: source.to_path_buf(),
        listen: endpoints.listen,
        upstreams: endpoints.upstreams,
        upstream_timeout: endpoints.upstream_timeout,
        upstream_options: endpoints.upstream_options,
        deny_with,
        qtypes,
        default_group: default_group.group,
        clients: clients.into_iter().map(|(_, g)| g.group).collect(),
        log,
        ttl,
        firewall,
        deny_answers: deny_answers.into_iter().map(|(_, n)| n).collect(),
        nat64_prefixes,
        cname,
        https_hints,
        limits,
        exfiltration,
        mode,
        metrics,
        control,
        revoke,
        grants,
        warnings: Vec::new(),
    })
}
