//! Tests of loading whole policy files: every check with its line and column, defaults, the
//! shipped example policies, and client groups.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hickory_proto::rr::{Name, RecordType};
use ipnet::IpNet;

use super::*;

/// Three lines every test policy starts with (so test content starts on line 4).
const BASE: &str =
    "listen: [\"127.0.0.1:5353\"]\nupstreams: [\"9.9.9.9:53\"]\nfirewall: {enabled: false}\n";

fn parse(yaml: &str) -> Result<Policy, PolicyError> {
    Policy::parse(yaml, Path::new("policy.yaml"))
}

fn load(extra: &str) -> Policy {
    parse(&format!("{BASE}{extra}")).unwrap_or_else(|e| panic!("{e}"))
}

/// Every error as `FILE:LINE:COLUMN: message`.
fn errors(yaml: &str) -> Vec<String> {
    match parse(yaml) {
        Ok(_) => panic!("policy loaded but should not:\n{yaml}"),
        Err(e) => e.errors.iter().map(ToString::to_string).collect(),
    }
}

/// The errors of BASE + `extra`; asserts there is exactly one and returns it.
fn one_error(extra: &str) -> String {
    let mut errs = errors(&format!("{BASE}{extra}"));
    assert_eq!(errs.len(), 1, "{errs:#?}");
    errs.remove(0)
}

fn warnings(policy: &Policy) -> Vec<String> {
    policy.warnings.iter().map(ToString::to_string).collect()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

// ---- the shipped policies ----

#[test]
fn shipped_policies_load_without_errors_or_warnings() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policy");
    for file in ["default.yaml", "research-agent.yaml"] {
        let policy = Policy::load(&dir.join(file)).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            policy.warnings.is_empty(),
            "{file}: {:#?}",
            warnings(&policy)
        );
    }
}

#[test]
fn default_policy_runs_without_root() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policy");
    let p = Policy::load(&dir.join("default.yaml")).unwrap();
    assert!(!p.firewall.enabled);
    assert!(p.listen.iter().all(|a| a.port() >= 1024));
    assert!(p.default_group.rules.find(&name("pypi.org.")).is_some());
    assert!(p.default_group.rules.find(&name("evil.example.")).is_none());
}

#[test]
fn research_agent_policy_reaches_the_model_server_by_name_and_address() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policy");
    let p = Policy::load(&dir.join("research-agent.yaml")).unwrap();
    assert!(p.firewall.enabled);
    assert_eq!(p.firewall.hooks, [Hook::Output, Hook::Forward]);
    assert!(!p.firewall.per_client);
    assert_eq!(p.firewall.allow_cidrs, [net("10.0.1.100/32")]);
    let rule = p
        .default_group
        .rules
        .find(&name("models.internal.example."))
        .unwrap();
    assert_eq!(rule.allow_answers, [net("10.0.1.0/24")]);
    for n in [
        "api.serper.dev.",
        "api.semanticscholar.org.",
        "export.arxiv.org.",
    ] {
        assert!(p.default_group.rules.find(&name(n)).is_some(), "{n}");
    }
}

// ---- defaults and the happy path ----

#[test]
fn minimal_policy_gets_the_documented_defaults() {
    let p = parse("listen: [\"127.0.0.1:53\"]\nupstreams: [\"10.0.0.53:53\"]\n").unwrap();
    assert_eq!(p.upstream_timeout, Duration::from_secs(2));
    assert_eq!(p.upstream_options.order, UpstreamOrder::Fastest);
    assert_eq!(p.deny_with, DenyWith::NxDomain);
    assert_eq!(
        p.qtypes,
        [
            RecordType::A,
            RecordType::AAAA,
            RecordType::CNAME,
            RecordType::HTTPS
        ]
    );
    assert_eq!(p.log, LogTarget::Stdout);
    assert_eq!(p.ttl, TtlPolicy::default());
    assert_eq!(p.ttl.max, Duration::from_secs(3600));
    assert_eq!(p.cname, CnameMode::Follow);
    assert_eq!(p.https_hints, HintMode::Admit);
    assert_eq!(p.limits, Limits::default());
    assert_eq!(p.limits.client_burst, 400);
    assert_eq!(p.exfiltration, ExfiltrationLimits::default());
    assert_eq!(p.exfiltration.wildcard_names_per_minute, 60);
    assert!(p.deny_answers.is_empty());
    assert!(p.clients.is_empty());
    assert_eq!(p.default_group.name, "default");
    assert!(p.firewall.enabled, "containment is on unless switched off");
    assert_eq!(p.firewall.table, "dnsfence");
    assert_eq!(p.firewall.hooks, [Hook::Output]);
    assert_eq!(p.firewall.on_exit, OnExit::Keep);
    assert_eq!(p.firewall.set_size, 65536);
    assert_eq!(p.firewall.mark, 0x0d5f);
    // No rules at all is legal (deny everything), but worth a warning.
    assert_eq!(p.warnings.len(), 1);
    assert!(p.warnings[0].message.contains("every query will be denied"));
}

#[test]
fn every_key_is_read() {
    let p = load(
        "upstream_timeout: 500ms
upstream_order: strict
deny_with: refused
allow: [a.example.com]
allow_answers: [\"10.1.0.0/16\"]
qtypes: [a, TXT]
log: /tmp/q.jsonl
ttl: {min: 0, max: 5m, grace: 1h}
deny_answers: [\"203.0.113.0/24\"]
cname: strict
https_hints: strip
limits: {max_inflight: 10, max_inflight_per_client: 4, client_qps: 0, client_burst: 0, tcp_connections: 3, tcp_idle_timeout: 2}
exfiltration: {max_name_length: 253, max_label_length: 63, wildcard_names_per_minute: 0}
",
    );
    assert_eq!(p.upstream_timeout, Duration::from_millis(500));
    assert_eq!(p.upstream_options.order, UpstreamOrder::Strict);
    assert_eq!(p.deny_with, DenyWith::Refused);
    assert_eq!(p.default_group.allow_answers, [net("10.1.0.0/16")]);
    assert_eq!(p.qtypes, [RecordType::A, RecordType::TXT]);
    assert_eq!(p.log, LogTarget::File("/tmp/q.jsonl".into()));
    assert_eq!(
        p.ttl,
        TtlPolicy {
            min: Duration::ZERO,
            max: Duration::from_secs(300),
            grace: Duration::from_secs(3600)
        }
    );
    assert_eq!(p.deny_answers, [net("203.0.113.0/24")]);
    assert_eq!(p.cname, CnameMode::Strict);
    assert_eq!(p.https_hints, HintMode::Strip);
    assert_eq!(
        p.limits,
        Limits {
            max_inflight: 10,
            max_inflight_per_client: 4,
            client_qps: 0,
            client_burst: 0,
            tcp_connections: 3,
            tcp_connections_per_client: 64,
            tcp_idle_timeout: Duration::from_secs(2)
        }
    );
    assert_eq!(
        p.exfiltration,
        ExfiltrationLimits {
            max_name_length: 253,
            max_label_length: 63,
            wildcard_names_per_minute: 0
        }
    );
    assert!(p.warnings.is_empty(), "{:#?}", warnings(&p));
}

#[test]
fn firewall_section_is_read() {
    let p = parse(
        "listen: [\"[::1]:53\"]
upstreams: [\"[2620:fe::fe]:53\"]
firewall:
  enabled: true
  table: fence_1
  hooks: [forward, output]
  allow_cidrs: [\"10.0.1.100/32\", \"2001:db8::/48\"]
  per_client: true
  log_denied: false
  on_exit: remove
  set_size: 1
  mark: \"0xBEEF\"
",
    )
    .unwrap();
    let fw = &p.firewall;
    assert_eq!(fw.table, "fence_1");
    assert_eq!(fw.hooks, [Hook::Forward, Hook::Output]);
    assert_eq!(fw.allow_cidrs, [net("10.0.1.100/32"), net("2001:db8::/48")]);
    assert!(fw.per_client && !fw.log_denied);
    assert_eq!(fw.on_exit, OnExit::Remove);
    assert_eq!(fw.set_size, 1);
    assert_eq!(fw.mark, 0xbeef);
    assert_eq!(p.listen, ["[::1]:53".parse().unwrap()]);
}

#[test]
fn mark_accepts_a_yaml_integer_in_hex_or_decimal() {
    let p =
        parse("listen: [\"127.0.0.1:53\"]\nupstreams: [\"9.9.9.9:53\"]\nfirewall: {mark: 0x10}\n")
            .unwrap();
    assert_eq!(p.firewall.mark, 16);
    let p =
        parse("listen: [\"127.0.0.1:53\"]\nupstreams: [\"9.9.9.9:53\"]\nfirewall: {mark: 42}\n")
            .unwrap();
    assert_eq!(p.firewall.mark, 42);
}

#[test]
fn rules_keep_their_line_and_column_and_options() {
    let p = load(
        "allow:
  - Api.Example.COM.
  - \"*.bücher.example\"
  - name: models.internal.example
    allow_answers: [\"10.0.1.0/24\"]
",
    );
    let rules: Vec<_> = p.default_group.rules.iter().collect();
    assert_eq!(rules[0].pattern, "api.example.com");
    assert_eq!((rules[0].line, rules[0].column), (5, 5));
    assert_eq!(rules[1].pattern, "*.xn--bcher-kva.example");
    assert_eq!(rules[1].kind, RuleKind::OneLabel);
    assert_eq!((rules[1].line, rules[1].column), (6, 5));
    assert_eq!(rules[2].pattern, "models.internal.example");
    assert_eq!((rules[2].line, rules[2].column), (7, 11));
    assert_eq!(rules[2].allow_answers, [net("10.0.1.0/24")]);
    // Matching on the wire form, case-insensitively, trailing dot or not.
    assert!(
        p.default_group
            .rules
            .find(&name("API.example.com"))
            .is_some()
    );
    assert!(
        p.default_group
            .rules
            .find(&name("x.XN--BCHER-KVA.example."))
            .is_some()
    );
}

#[test]
fn yaml_anchors_can_share_an_allowlist_between_groups() {
    let p = load(
        "allow: &common [pypi.org, crates.io]
clients:
  - name: research
    from: [\"10.200.0.0/24\"]
    allow: *common
",
    );
    assert_eq!(p.clients[0].rules.len(), 2);
}

// ---- rule errors, each with its line and column ----

#[test]
fn bare_any_depth_wildcard_is_refused_at_its_position() {
    let e = one_error("allow:\n  - api.example.com\n  - crates.io\n  - \"**\"\n");
    assert_eq!(
        e,
        "policy.yaml:7:5: \"**\" alone would allow every name; write a suffix such as \"**.example.com\""
    );
}

#[test]
fn bare_one_label_wildcard_is_refused_at_its_position() {
    let e = one_error("allow: [a.example, \"*\"]\n");
    assert_eq!(
        e,
        "policy.yaml:4:20: \"*\" alone would allow every name; write a suffix such as \"*.example.com\""
    );
}

#[test]
fn wildcard_on_a_top_level_domain_is_refused() {
    let e = one_error("allow:\n  - \"*.com\"\n");
    assert!(e.starts_with("policy.yaml:5:5: \"*.com\" would allow every name under the top-level domain \"com\"; write a longer suffix such as \"*.example.com\""), "{e}");
    let e = one_error("allow:\n  - \"**.org.\"\n");
    assert!(
        e.starts_with(
            "policy.yaml:5:5: \"**.org.\" would allow every name under the top-level domain"
        ),
        "{e}"
    );
}

#[test]
fn wildcard_on_an_icann_public_suffix_is_refused_like_a_tld() {
    let e = one_error("allow:\n  - \"*.co.uk\"\n");
    assert!(e.starts_with("policy.yaml:5:5: \"*.co.uk\" would allow every name under the public suffix \"co.uk\" (Public Suffix List, ICANN section)"), "{e}");
    assert!(e.ends_with("such as \"*.example.co.uk\""), "{e}");
    // In a client group, any depth, with a trailing dot and upper case: the same refusal.
    let e = one_error(
        "clients:\n  - name: lab\n    from: [10.0.0.0/24]\n    allow:\n      - \"**.COM.AU.\"\n",
    );
    assert!(
        e.starts_with("policy.yaml:8:9: \"**.COM.AU.\" would allow every name under the public suffix \"com.au\""),
        "{e}"
    );
    // One level above a wildcard entry (`*.kawasaki.jp`): every name it allows is a suffix.
    let e = one_error("allow:\n  - \"*.kawasaki.jp\"\n");
    assert!(
        e.contains("every name directly under \"kawasaki.jp\" is itself a public suffix"),
        "{e}"
    );
    // A registrable domain under it loads, silently.
    let p = load("allow:\n  - \"*.example.co.uk\"\n  - \"**.bbc.co.uk\"\n");
    assert!(warnings(&p).is_empty(), "{:#?}", warnings(&p));
}

#[test]
fn wildcards_over_private_section_suffixes_outside_the_curated_list_warn() {
    let p = load("allow:\n  - \"*.duckdns.org\"\n  - \"**.wixsite.com\"\n");
    let w = warnings(&p);
    assert_eq!(w.len(), 2, "{w:#?}");
    assert!(
        w[0].starts_with("policy.yaml:5:5: \"*.duckdns.org\" allows names under \"duckdns.org\""),
        "{w:#?}"
    );
    assert!(
        w[1].starts_with("policy.yaml:6:5: \"**.wixsite.com\" allows names under \"wixsite.com\""),
        "{w:#?}"
    );
}

#[test]
fn star_outside_the_first_label_is_refused() {
    let e = one_error("allow:\n  - \"api.*.example.com\"\n");
    assert_eq!(
        e,
        "policy.yaml:5:5: \"api.*.example.com\": \"*\" may only be the whole first label; write \"*.example.com\" (one label below) or \"**.example.com\" (any depth below)"
    );
    let e = one_error("allow:\n  - \"a*.example.com\"\n");
    assert!(
        e.starts_with("policy.yaml:5:5:") && e.contains("whole first label"),
        "{e}"
    );
}

#[test]
fn empty_labels_are_refused() {
    let e = one_error("allow:\n  - a..b.example\n");
    assert_eq!(
        e,
        "policy.yaml:5:5: \"a..b.example\" has an empty label (a leading dot or two dots in a row); remove the extra dot"
    );
    let e = one_error("allow:\n  - .example.com\n");
    assert!(
        e.starts_with("policy.yaml:5:5:") && e.contains("empty label"),
        "{e}"
    );
}

#[test]
fn overlong_names_and_labels_are_refused() {
    let label = "a".repeat(64);
    let e = one_error(&format!("allow:\n  - {label}.example\n"));
    assert!(
        e.starts_with("policy.yaml:5:5:") && e.contains("over the DNS limit of 63"),
        "{e}"
    );
    let long = vec!["b".repeat(63); 4].join(".");
    let e = one_error(&format!("allow:\n  - {long}\n"));
    assert!(
        e.starts_with("policy.yaml:5:5:") && e.contains("over the DNS limit of 253"),
        "{e}"
    );
}

#[test]
fn characters_outside_the_host_alphabet_are_refused() {
    let e = one_error("allow:\n  - \"api example.com\"\n");
    assert_eq!(
        e,
        "policy.yaml:5:5: \"api example.com\" contains the character ' ', which a host name cannot have; use only letters, digits, \"-\" and \"_\""
    );
    let e = one_error("allow:\n  - https://api.example.com/\n");
    assert!(
        e.contains("write the name only, such as \"api.example.com\""),
        "{e}"
    );
}

#[test]
fn trailing_dot_is_accepted_and_stripped() {
    let p = load("allow: [\"example.com.\", \"*.example.org.\"]\n");
    let patterns: Vec<_> = p
        .default_group
        .rules
        .iter()
        .map(|r| r.pattern.clone())
        .collect();
    assert_eq!(patterns, ["example.com", "*.example.org"]);
}

#[test]
fn idn_rules_are_converted_to_a_labels() {
    let p = load("allow: [bücher.example, \"**.ÄPFEL.example\"]\n");
    let patterns: Vec<_> = p
        .default_group
        .rules
        .iter()
        .map(|r| r.pattern.clone())
        .collect();
    assert_eq!(
        patterns,
        ["xn--bcher-kva.example", "**.xn--pfel-koa.example"]
    );
}

#[test]
fn duplicate_rules_report_both_lines() {
    let e = one_error("allow:\n  - api.example.com\n  - other.example\n  - API.example.com.\n");
    assert_eq!(
        e,
        "policy.yaml:7:5: duplicate rule \"api.example.com\", written \"API.example.com.\" in allow: also on line 5 (column 5); remove one of them"
    );
    // The same name in two groups is fine.
    let p = load(
        "allow: [api.example.com]\nclients:\n  - name: g\n    from: [\"10.0.0.0/8\"]\n    allow: [api.example.com]\n",
    );
    assert_eq!(p.clients[0].rules.len(), 1);
}

#[test]
fn long_form_rules_are_checked_like_short_ones() {
    let errs = errors(&format!(
        "{BASE}allow:\n  - name: \"**\"\n  - allow_answers: []\n  - name: a.example\n    allow_answers: [\"10.0.0.1/8\"]\n    note: x\n"
    ));
    assert_eq!(errs.len(), 4, "{errs:#?}");
    assert!(
        errs[0].starts_with("policy.yaml:5:11: \"**\" alone"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("policy.yaml:6:5: the key \"name\" is missing"),
        "{errs:#?}"
    );
    assert!(
        errs[2].starts_with("policy.yaml:8:21: allow: allow_answers: \"10.0.0.1/8\" has host bits set; write \"10.0.0.0/8\""),
        "{errs:#?}"
    );
    assert!(
        errs[3].starts_with("policy.yaml:9:5: unknown key \"note\" in a rule in allow; the keys are: name, allow_answers"),
        "{errs:#?}"
    );
}

// ---- other errors ----

#[test]
fn unknown_keys_name_the_allowed_keys() {
    let errs = errors(&format!("{BASE}alow: [a.example]\nbogus: 1\n"));
    assert_eq!(errs.len(), 2, "{errs:#?}");
    // A prefix only: every new top-level key lengthens the list.
    assert!(
        errs[0].starts_with(
            "policy.yaml:4:1: unknown key \"alow\" in the policy; did you mean \"allow\"? The keys are: listen, upstreams, upstream_timeout, upstream_order, upstream_tls_ca, deny_with, allow, allow_answers, qtypes, clients, log, ttl, deny_answers, nat64_prefixes, cname, https_hints, limits, exfiltration, firewall"
        ),
        "{}",
        errs[0]
    );
    assert!(errs[1].starts_with(
        "policy.yaml:5:1: unknown key \"bogus\" in the policy; the keys are: listen,"
    ));
    let e = one_error("ttl: {min: 1s, maximum: 2s}\n");
    assert!(
        e.starts_with(
            "policy.yaml:4:16: unknown key \"maximum\" in ttl; the keys are: min, max, grace"
        ),
        "{e}"
    );
}

#[test]
fn unknown_keys_inside_firewall_are_errors() {
    let errs = errors(
        "listen: [\"127.0.0.1:53\"]\nupstreams: [\"9.9.9.9:53\"]\nfirewall:\n  enable: false\n",
    );
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with(
            "policy.yaml:4:3: unknown key \"enable\" in firewall; did you mean \"enabled\"?"
        ),
        "{errs:#?}"
    );
}

#[test]
fn duplicate_keys_are_reported_with_the_first_line() {
    let e = one_error("deny_with: refused\ndeny_with: nxdomain\n");
    assert_eq!(
        e,
        "policy.yaml:5:1: the key \"deny_with\" appears twice in the policy (first on line 4); keep one of them"
    );
}

#[test]
fn invalid_cidrs_are_reported_where_they_are() {
    let errs = errors(&format!(
        "{BASE}deny_answers: [\"10.0.0.0/33\"]\nallow_answers:\n  - 192.168.1.1/16\n  - nonsense\n"
    ));
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(
        errs[0].starts_with("policy.yaml:4:16: deny_answers: \"10.0.0.0/33\" is not a network"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("policy.yaml:6:5: allow_answers: \"192.168.1.1/16\" has host bits set"),
        "{errs:#?}"
    );
    assert!(
        errs[2].starts_with("policy.yaml:7:5: allow_answers: \"nonsense\" is not a network"),
        "{errs:#?}"
    );
}

#[test]
fn invalid_socket_addresses_are_reported_where_they_are() {
    let errs = errors(
        "listen:\n  - 127.0.0.1\n  - \"::1:53\"\nupstreams: [\"dns.quad9.net:53\", \"0.0.0.0:53\"]\n",
    );
    assert_eq!(errs.len(), 4, "{errs:#?}");
    assert_eq!(
        errs[0],
        "policy.yaml:2:5: listen: \"127.0.0.1\" has no port; write \"127.0.0.1:53\""
    );
    assert!(
        errs[1]
            .starts_with("policy.yaml:3:5: listen: \"::1:53\" has no port; write \"[::1:53]:53\""),
        "{errs:#?}"
    );
    assert!(
        errs[2].starts_with("policy.yaml:4:13: upstreams: \"dns.quad9.net:53\" is not an address"),
        "{errs:#?}"
    );
    assert!(
        errs[3]
            .starts_with("policy.yaml:4:33: upstreams: \"0.0.0.0:53\" is the unspecified address"),
        "{errs:#?}"
    );
}

#[test]
fn upstream_equal_to_listen_address_is_a_loop() {
    let errs = errors("listen: [\"127.0.0.1:53\"]\nupstreams: [\"127.0.0.1:53\"]\n");
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with(
            "policy.yaml:2:13: upstream \"127.0.0.1:53\" is dnsfence's own listen address (line 1)"
        ),
        "{errs:#?}"
    );
}

#[test]
fn missing_or_empty_upstreams_and_listen_are_errors() {
    let errs = errors("allow: [a.example]\n");
    assert_eq!(
        errs,
        [
            "policy.yaml:1:1: the key \"listen\" is missing; add it, e.g. listen: [\"127.0.0.1:53\"]",
            "policy.yaml:1:1: the key \"upstreams\" is missing; add it, e.g. upstreams: [\"9.9.9.9:53\"]",
        ]
    );
    let errs = errors("listen: [\"127.0.0.1:53\"]\nupstreams: []\n");
    assert_eq!(
        errs,
        [
            "policy.yaml:2:12: upstreams is empty; list at least one address, e.g. upstreams: [\"9.9.9.9:53\"]"
        ]
    );
}

#[test]
fn unknown_and_meta_qtypes_are_refused() {
    let errs = errors(&format!("{BASE}qtypes: [A, AAA, ANY, 1]\n"));
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(
        errs[0].starts_with(
            "policy.yaml:4:13: unknown qtype \"AAA\"; write a record type name such as A, AAAA"
        ),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("policy.yaml:4:18: qtype \"ANY\" is a meta type"),
        "{errs:#?}"
    );
    assert!(
        errs[2].starts_with("policy.yaml:4:23: a qtype must be text, found a number"),
        "{errs:#?}"
    );
}

#[test]
fn duplicate_group_names_are_refused() {
    let e = one_error(
        "clients:
  - name: research
    from: [\"10.1.0.0/16\"]
  - name: research
    from: [\"10.2.0.0/16\"]
",
    );
    assert_eq!(
        e,
        "policy.yaml:7:11: duplicate group name \"research\" (also on line 5); give each group its own name"
    );
}

#[test]
fn group_with_empty_or_missing_from_is_refused() {
    let errs = errors(&format!(
        "{BASE}clients:\n  - name: a\n    from: []\n  - name: b\n    allow: [x.example]\n"
    ));
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].starts_with(
            "policy.yaml:6:11: clients[a].from is empty, so the group would match no client"
        ),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with(
            "policy.yaml:7:5: the key \"from\" is missing; add it, e.g. from: [\"10.200.0.0/24\"]"
        ),
        "{errs:#?}"
    );
}

#[test]
fn group_names_are_checked() {
    let errs = errors(&format!(
        "{BASE}clients:\n  - name: default\n    from: [\"10.0.0.0/8\"]\n  - name: \"a b\"\n    from: [\"10.1.0.0/16\"]\n"
    ));
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].starts_with("policy.yaml:5:11: the group name \"default\" is reserved"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("policy.yaml:7:11: group name \"a b\" is not valid"),
        "{errs:#?}"
    );
}

#[test]
fn ipv4_mapped_networks_in_from_are_refused_with_the_ipv4_form() {
    let e = one_error("clients:\n  - name: a\n    from: [\"::ffff:10.0.0.0/104\"]\n");
    assert!(e.starts_with("policy.yaml:6:12: clients[a].from: \"::ffff:10.0.0.0/104\" is an IPv4-mapped IPv6 network"), "{e}");
    assert!(e.ends_with("write \"10.0.0.0/8\""), "{e}");
}

#[test]
fn zero_durations_and_min_above_max_are_refused() {
    let errs = errors(&format!(
        "{BASE}upstream_timeout: 0s\nttl:\n  min: 2h\n  max: 0\n  grace: 5x\nlimits: {{tcp_idle_timeout: 0ms}}\n"
    ));
    assert_eq!(errs.len(), 5, "{errs:#?}");
    assert!(
        errs[0].starts_with("policy.yaml:4:19: upstream_timeout is 0s, out of range; write a duration from 10ms to 1m"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("policy.yaml:6:8: ttl.min (2h) is greater than ttl.max (1h)"),
        "{errs:#?}"
    );
    assert!(
        errs[2].starts_with(
            "policy.yaml:7:8: ttl.max is 0s, out of range; write a duration from 1s to 168h"
        ),
        "{errs:#?}"
    );
    assert!(
        errs[3].starts_with("policy.yaml:8:10: ttl.grace: \"5x\" has an unknown unit \"x\""),
        "{errs:#?}"
    );
    assert!(
        errs[4].starts_with("policy.yaml:9:28: limits.tcp_idle_timeout is 0s, out of range; write a duration from 100ms to 1h"),
        "{errs:#?}"
    );
}

#[test]
fn min_above_max_is_refused_when_both_are_valid() {
    let e = one_error("ttl: {min: 10m, max: 5m}\n");
    assert!(
        e.starts_with(
            "policy.yaml:4:12: ttl.min (10m) is greater than ttl.max (5m); make min at most max"
        ),
        "{e}"
    );
}

#[test]
fn out_of_range_numbers_are_refused() {
    let errs = errors(&format!(
        "{BASE}limits: {{max_inflight: 0, client_qps: 5, client_burst: 0, tcp_connections: -1}}\nexfiltration: {{max_name_length: 254, max_label_length: 64}}\n"
    ));
    assert_eq!(errs.len(), 5, "{errs:#?}");
    assert!(
        errs[0].starts_with(
            "policy.yaml:4:24: limits.max_inflight is 0, out of range; write a number from 1 to"
        ),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("policy.yaml:4:56: limits.client_burst is 0 while client_qps is on"),
        "{errs:#?}"
    );
    assert!(
        errs[2].starts_with("policy.yaml:4:76: limits.tcp_connections is -1, out of range"),
        "{errs:#?}"
    );
    assert!(errs[3].starts_with("policy.yaml:5:33: exfiltration.max_name_length is 254, out of range; write a number from 1 to 253"), "{errs:#?}");
    assert!(errs[4].starts_with("policy.yaml:5:56: exfiltration.max_label_length is 64, out of range; write a number from 1 to 63"), "{errs:#?}");
}

#[test]
fn firewall_values_are_checked() {
    let errs = errors(
        "listen: [\"127.0.0.1:53\"]
upstreams: [\"9.9.9.9:53\"]
firewall:
  enabled: yes
  table: \"my-table\"
  hooks: [output, input, output]
  on_exit: delete
  set_size: 0
  mark: 0
",
    );
    assert_eq!(errs.len(), 7, "{errs:#?}");
    assert_eq!(
        errs[0],
        "policy.yaml:4:12: firewall.enabled must be true or false, found \"yes\"; write true or false"
    );
    assert!(
        errs[1]
            .starts_with("policy.yaml:5:10: firewall.table \"my-table\" is not a valid table name"),
        "{errs:#?}"
    );
    assert_eq!(
        errs[2],
        "policy.yaml:6:19: a firewall hook cannot be \"input\"; write one of: output, forward"
    );
    assert!(
        errs[3]
            .starts_with("policy.yaml:6:26: firewall hook output is listed twice (also on line 6)"),
        "{errs:#?}"
    );
    assert_eq!(
        errs[4],
        "policy.yaml:7:12: firewall.on_exit cannot be \"delete\"; write one of: keep, remove"
    );
    assert!(
        errs[5].starts_with("policy.yaml:8:13: firewall.set_size is 0, out of range"),
        "{errs:#?}"
    );
    assert!(
        errs[6].starts_with("policy.yaml:9:9: firewall.mark is 0"),
        "{errs:#?}"
    );
}

#[test]
fn wrong_shapes_are_reported() {
    let errs = errors(&format!(
        "{BASE}allow: api.example.com\nttl: 5\ndeny_with: [nxdomain]\n"
    ));
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(
        errs[0].starts_with("policy.yaml:4:8: allow must be a list, found text"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with(
            "policy.yaml:5:6: ttl must be a mapping of keys (min, max, grace), found a number"
        ),
        "{errs:#?}"
    );
    assert!(
        errs[2].starts_with(
            "policy.yaml:6:12: deny_with cannot be a list; write one of: nxdomain, refused"
        ),
        "{errs:#?}"
    );
}

#[test]
fn multiple_errors_are_all_collected_in_file_order() {
    let yaml = "listen: [\"127.0.0.1\"]
upstreams: [\"9.9.9.9:53\"]
colour: blue
allow:
  - \"**\"
  - \"*.com\"
  - ok.example
  - ok.example
qtypes: [A, BOGUS]
ttl: {max: 0}
clients:
  - name: g
    from: [\"10.0.0.0/33\"]
";
    let err = parse(yaml).unwrap_err();
    let lines: Vec<_> = err.errors.iter().map(|d| (d.line, d.column)).collect();
    assert_eq!(
        lines,
        [
            (1, 10),
            (3, 1),
            (5, 5),
            (6, 5),
            (8, 5),
            (9, 13),
            (10, 12),
            (13, 12)
        ],
        "{err}"
    );
    // Display: one line per error, each FILE:LINE:COLUMN.
    let text = err.to_string();
    assert_eq!(text.lines().count(), 8);
    assert!(
        text.lines().all(|l| l.starts_with("policy.yaml:")),
        "{text}"
    );
}

#[test]
fn broken_yaml_is_an_error_with_a_position() {
    let errs = errors("listen: [\"127.0.0.1:53\"\nupstreams: [\n");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("policy.yaml:"), "{errs:#?}");
    assert!(errs[0].contains("not valid YAML"), "{errs:#?}");
}

#[test]
fn empty_file_is_an_error() {
    let errs = errors("# nothing here\n");
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("policy.yaml:1:1: the policy is empty"),
        "{errs:#?}"
    );
    let errs = errors("- a\n- b\n");
    assert!(
        errs[0].starts_with("policy.yaml:1:1: the policy must be a mapping of keys"),
        "{errs:#?}"
    );
}

#[test]
fn unreadable_file_names_the_path() {
    let path = Path::new("/nonexistent/dnsfence/policy.yaml");
    let err = Policy::load(path).unwrap_err();
    assert_eq!(err.read_error, Some(std::io::ErrorKind::NotFound));
    assert_eq!(err.errors.len(), 1);
    let text = err.to_string();
    assert!(
        text.starts_with("/nonexistent/dnsfence/policy.yaml: cannot read the policy file:"),
        "{text}"
    );
}

#[test]
fn non_utf8_file_is_refused_with_a_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.yaml");
    std::fs::write(&path, b"listen: []\nallow: [caf\xe9.example]\n").unwrap();
    let err = Policy::load(&path).unwrap_err();
    assert_eq!((err.errors[0].line, err.errors[0].column), (2, 12));
    assert!(err.to_string().contains("not valid UTF-8"));
}

#[test]
fn load_reads_a_file_and_names_it_in_messages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.yaml");
    std::fs::write(&path, format!("{BASE}allow: [\"**\"]\n")).unwrap();
    let err = Policy::load(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}:4:9: \"**\" alone would allow every name; write a suffix such as \"**.example.com\"",
            path.display()
        )
    );
}

// ---- client groups ----

fn grouped() -> Policy {
    load(
        "allow: [default.example]
clients:
  - name: research
    from: [\"10.200.0.0/24\", \"fd00:200::/64\"]
    allow: [research.example]
  - name: wide
    from: [\"10.0.0.0/8\"]
    allow: [wide.example]
",
    )
}

#[test]
fn group_for_picks_the_first_matching_group() {
    let p = grouped();
    assert_eq!(p.group_for(ip("10.200.0.7")).name, "research");
    assert_eq!(p.group_for(ip("10.9.9.9")).name, "wide");
    assert_eq!(p.group_for(ip("fd00:200::1")).name, "research");
    assert_eq!(p.group_for(ip("192.0.2.1")).name, "default");
    assert_eq!(p.group_for(ip("2001:db8::1")).name, "default");
    assert!(
        p.group_for(ip("10.200.0.7"))
            .rules
            .find(&name("research.example."))
            .is_some()
    );
    assert!(
        p.group_for(ip("10.200.0.7"))
            .rules
            .find(&name("default.example."))
            .is_none()
    );
}

#[test]
fn group_for_matches_ipv4_mapped_ipv6_clients_as_ipv4() {
    let p = grouped();
    assert_eq!(p.group_for(ip("::ffff:10.200.0.7")).name, "research");
    assert_eq!(p.group_for(ip("::ffff:10.1.2.3")).name, "wide");
    assert_eq!(p.group_for(ip("::ffff:192.0.2.1")).name, "default");
}

#[test]
fn groups_iterates_default_first() {
    let names: Vec<_> = grouped().groups().map(|g| g.name.clone()).collect();
    assert_eq!(names, ["default", "research", "wide"]);
}

// ---- lint warnings ----

#[test]
fn wildcards_over_multi_tenant_suffixes_warn_but_load() {
    let p = load(
        "allow:
  - \"*.githubusercontent.com\"
  - \"**.s3.amazonaws.com\"
  - \"*.myproject.github.io\"
  - raw.githubusercontent.com
  - \"*.example.com\"
",
    );
    let w = warnings(&p);
    assert_eq!(w.len(), 3, "{w:#?}");
    assert!(w[0].starts_with("policy.yaml:5:5: \"*.githubusercontent.com\" allows names under \"githubusercontent.com\", where anyone can register a name and exfiltrate data through it"), "{w:#?}");
    assert!(
        w[1].starts_with(
            "policy.yaml:6:5: \"**.s3.amazonaws.com\" allows names under \"s3.amazonaws.com\""
        ),
        "{w:#?}"
    );
    assert!(
        w[2].starts_with(
            "policy.yaml:7:5: \"*.myproject.github.io\" allows names under \"github.io\""
        ),
        "{w:#?}"
    );
    assert!(
        w.iter()
            .all(|l| l.contains("list the exact names you need instead"))
    );
}

#[test]
fn other_lints_warn_about_overlaps_shadowed_groups_and_unusable_wildcards() {
    let long = format!("**.{}.example", "x".repeat(60));
    let p = load(&format!(
        "allow: [\"{long}\"]
deny_answers: [\"10.0.0.0/8\"]
allow_answers: [\"10.0.1.0/24\"]
clients:
  - name: wide
    from: [\"10.0.0.0/8\"]
  - name: narrow
    from: [\"10.1.0.0/16\"]
exfiltration: {{max_name_length: 60}}
"
    ));
    let w = warnings(&p);
    assert_eq!(w.len(), 3, "{w:#?}");
    assert!(w[0].starts_with("policy.yaml:4:9: no name under"), "{w:#?}");
    assert!(w[1].starts_with("policy.yaml:6:17: allow_answers \"10.0.1.0/24\" overlaps deny_answers \"10.0.0.0/8\" (line 5)"), "{w:#?}");
    assert!(
        w[2].starts_with("policy.yaml:10:11: group \"narrow\" can never match"),
        "{w:#?}"
    );
}

/// A policy with a `firewall:` section of its own (BASE turns the firewall off).
fn firewall_policy(section: &str) -> Result<Policy, PolicyError> {
    parse(&format!(
        "listen: [\"127.0.0.1:5353\"]\nupstreams: [\"9.9.9.9:53\"]\nfirewall:\n{section}"
    ))
}

fn firewall_errors(section: &str) -> Vec<String> {
    match firewall_policy(section) {
        Ok(_) => panic!("policy loaded but should not:\n{section}"),
        Err(e) => e.errors.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn quota_and_inbound_keys_have_their_documented_defaults() {
    let p = load("");
    assert!(p.nat64_prefixes.is_empty());
    assert!(p.firewall.inbound.is_empty());
    assert_eq!(p.firewall.max_addresses_per_answer, 32);
    assert_eq!(p.firewall.max_elements_per_client, None);
    assert_eq!(p.firewall.elements_per_client(), 4096);
    assert_eq!(p.limits.max_inflight_per_client, 64);
    // The default share of in-flight queries is a quarter of the whole (1..=64).
    let share = |max: usize| {
        load(&format!("limits: {{max_inflight: {max}}}\n"))
            .limits
            .max_inflight_per_client
    };
    assert_eq!(share(10), 2);
    assert_eq!(share(3), 1);
    assert_eq!(share(1), 1);
    assert_eq!(share(100_000), 64);
    // The default per-client set share follows set_size, never below one whole answer.
    let p = firewall_policy("  set_size: 160\n  per_client: true\n").unwrap();
    assert_eq!(p.firewall.elements_per_client(), 32);
    let p = firewall_policy("  set_size: 8\n").unwrap();
    assert_eq!(p.firewall.addresses_per_answer(), 8);
    assert_eq!(p.firewall.elements_per_client(), 8);
}

#[test]
fn quota_and_inbound_keys_are_read() {
    let p = firewall_policy(
        "  per_client: true
  inbound: [\"8080/tcp\", \"5353/udp\", \"65535/tcp\"]
  max_addresses_per_answer: 4
  max_elements_per_client: 100
",
    )
    .unwrap();
    assert_eq!(
        p.firewall.inbound,
        [
            InboundPort {
                port: 8080,
                transport: Transport::Tcp
            },
            InboundPort {
                port: 5353,
                transport: Transport::Udp
            },
            InboundPort {
                port: 65535,
                transport: Transport::Tcp
            }
        ]
    );
    assert_eq!(p.firewall.max_addresses_per_answer, 4);
    assert_eq!(p.firewall.max_elements_per_client, Some(100));
    let p = load("limits: {max_inflight: 100, max_inflight_per_client: 7}\n");
    assert_eq!(p.limits.max_inflight_per_client, 7);
    let p = load("nat64_prefixes: [\"2001:db8:64::/96\"]\n");
    assert_eq!(p.nat64_prefixes, ["2001:db8:64::/96".parse().unwrap()]);
}

#[test]
fn bad_inbound_ports_are_refused_with_their_position() {
    for bad in [
        "8080",
        "0/tcp",
        "70000/tcp",
        "8080/sctp",
        "08080/tcp",
        "/tcp",
        "80/TCP",
        "-1/udp",
    ] {
        let errs = firewall_errors(&format!("  inbound: [\"{bad}\"]\n"));
        assert_eq!(errs.len(), 1, "{bad}: {errs:#?}");
        assert!(
            errs[0].starts_with("policy.yaml:4:13: firewall.inbound entry"),
            "{}",
            errs[0]
        );
        assert!(errs[0].contains("\"8080/tcp\""), "{}", errs[0]);
    }
    let errs = firewall_errors("  inbound: [\"22/tcp\", \"22/tcp\"]\n");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].contains("listed twice"), "{}", errs[0]);
}

#[test]
fn answer_and_client_quotas_are_bounded() {
    for (section, expected) in [
        (
            "  max_addresses_per_answer: 0\n",
            "policy.yaml:4:29: firewall.max_addresses_per_answer is 0, out of range; write a number from 1 to 4096",
        ),
        (
            "  max_addresses_per_answer: 5000\n",
            "policy.yaml:4:29: firewall.max_addresses_per_answer is 5000, out of range",
        ),
        (
            "  per_client: true\n  max_elements_per_client: 8\n",
            "policy.yaml:5:28: firewall.max_elements_per_client (8) is below firewall.max_addresses_per_answer (32)",
        ),
        (
            "  max_elements_per_client: 70000\n",
            "policy.yaml:4:28: firewall.max_elements_per_client is 70000, out of range; write a number from 1 to 65536",
        ),
    ] {
        let errs = firewall_errors(section);
        assert_eq!(errs.len(), 1, "{section}: {errs:#?}");
        assert!(errs[0].starts_with(expected), "{}", errs[0]);
    }
    let e = one_error("limits: {max_inflight: 10, max_inflight_per_client: 11}\n");
    assert!(
        e.starts_with(
            "policy.yaml:4:53: limits.max_inflight_per_client (11) must be from 1 to limits.max_inflight (10)"
        ),
        "{e}"
    );
    let e = one_error("limits: {max_inflight_per_client: 0}\n");
    assert!(e.contains("out of range"), "{e}");
}

#[test]
fn an_answer_quota_above_the_set_size_is_warned_about() {
    let p = firewall_policy("  set_size: 16\n  max_addresses_per_answer: 32\n").unwrap();
    assert!(
        warnings(&p).iter().any(|w| w.starts_with(
            "policy.yaml:5:29: firewall.max_addresses_per_answer (32) is above firewall.set_size (16)"
        )),
        "{:#?}",
        warnings(&p)
    );
    assert_eq!(p.firewall.addresses_per_answer(), 16);
}

#[test]
fn a_client_share_without_per_client_is_warned_about() {
    let p = firewall_policy("  max_elements_per_client: 100\n").unwrap();
    let w = warnings(&p);
    assert!(
        w.iter()
            .any(|w| w
                .starts_with("policy.yaml:4:28: firewall.max_elements_per_client has no effect")),
        "{w:#?}"
    );
    let p = firewall_policy("  per_client: true\n  max_elements_per_client: 100\n").unwrap();
    assert!(
        !warnings(&p)
            .iter()
            .any(|w| w.contains("max_elements_per_client")),
        "{:#?}",
        warnings(&p)
    );
}

#[test]
fn nat64_prefixes_must_be_ipv6_slash_96() {
    let e = one_error("nat64_prefixes: [\"2001:db8:64::/64\"]\n");
    assert!(
        e.starts_with("policy.yaml:4:18: nat64_prefixes: \"2001:db8:64::/64\" is a /64"),
        "{e}"
    );
    let e = one_error("nat64_prefixes: [\"10.0.0.0/8\"]\n");
    assert!(e.contains("is an IPv4 network"), "{e}");
    let e = one_error("nat64_prefixes: [\"2001:db8:64::/96\", \"2001:db8:64::/96\"]\n");
    assert!(e.contains("listed twice"), "{e}");
    let p = load("nat64_prefixes: [\"64:ff9b::/96\"]\n");
    assert!(p.nat64_prefixes.is_empty());
    assert!(
        warnings(&p).iter().any(|w| w
            .starts_with("policy.yaml:4:18: nat64_prefixes: \"64:ff9b::/96\" is the well-known")),
        "{:#?}",
        warnings(&p)
    );
}

#[test]
fn table_names_follow_the_one_rule_the_ruleset_uses() {
    for bad in ["9fw", "_fw", &"a".repeat(33)] {
        let errs = firewall_errors(&format!("  table: \"{bad}\"\n"));
        assert_eq!(errs.len(), 1, "{bad}: {errs:#?}");
        assert!(errs[0].contains("is not a valid table name"), "{}", errs[0]);
    }
    let p = firewall_policy(&format!("  table: {}\n", "a".repeat(32))).unwrap();
    assert_eq!(p.firewall.table.len(), 32);
}

#[test]
fn upstreams_may_be_tcp_only_and_bad_schemes_are_errors() {
    let p = parse(
        "listen: [\"127.0.0.1:53\"]\nupstreams: [\"10.0.0.53:53\", \"tcp://10.0.0.54:53\"]\n",
    )
    .unwrap();
    assert_eq!(p.upstreams.len(), 2);
    assert_eq!(
        p.upstream_options
            .transport("10.0.0.53:53".parse().unwrap()),
        UpstreamTransport::Udp
    );
    assert_eq!(
        p.upstream_options
            .transport("10.0.0.54:53".parse().unwrap()),
        UpstreamTransport::Tcp
    );
    let errs = errors(
        "listen: [\"127.0.0.1:53\"]\nupstreams: [\"quic://10.0.0.53:853\", \"tcp://10.0.0.53\"]\n",
    );
    assert!(
        errs[0]
            .starts_with("policy.yaml:2:13: upstreams: \"quic://10.0.0.53:853\": unknown scheme"),
        "{errs:?}"
    );
    assert!(errs[1].contains("\"10.0.0.53\" has no port"), "{errs:?}");
}

#[test]
fn every_duration_has_bounds_and_absurd_lifetimes_are_not_silently_capped() {
    for (extra, expected) in [
        (
            "ttl: {max: 200h}\n",
            "policy.yaml:4:12: ttl.max is 200h, out of range; write a duration from 1s to 168h",
        ),
        (
            "ttl: {max: 168h, grace: 1m}\n",
            "policy.yaml:4:12: ttl.max + ttl.grace is 10081m, but an admitted address lives at most 168h",
        ),
        (
            "ttl: {grace: 25h}\n",
            "policy.yaml:4:14: ttl.grace is 25h, out of range; write a duration from 0s to 24h",
        ),
        (
            "upstream_timeout: 2m\n",
            "policy.yaml:4:19: upstream_timeout is 2m, out of range; write a duration from 10ms to 1m",
        ),
        (
            "limits: {tcp_idle_timeout: 2h}\n",
            "policy.yaml:4:28: limits.tcp_idle_timeout is 2h, out of range; write a duration from 100ms to 1h",
        ),
    ] {
        let e = one_error(extra);
        assert!(e.starts_with(expected), "{extra}: {e}");
    }
    let p = load("ttl: {min: 0, max: 167h, grace: 1h}\nupstream_timeout: 10ms\n");
    assert_eq!(p.ttl.max + p.ttl.grace, MAX_LIFETIME);
}

#[test]
fn tls_upstreams_name_their_certificate_and_the_ca_file_must_hold_one() {
    let p = parse("listen: [\"127.0.0.1:53\"]\nupstreams: [\"tls://9.9.9.9:853#DNS.Quad9.net\"]\n")
        .unwrap();
    assert_eq!(p.upstreams, ["9.9.9.9:853".parse::<SocketAddr>().unwrap()]);
    assert_eq!(
        p.upstream_options.transport("9.9.9.9:853".parse().unwrap()),
        UpstreamTransport::Tls {
            name: "dns.quad9.net".into()
        }
    );
    assert_eq!(p.upstream_options.tls_ca, None);
    let errs = errors(
        "listen: [\"127.0.0.1:53\"]\nupstreams: [\"tls://9.9.9.9:853\", \"tls://9.9.9.9:854#bad name\"]\nupstream_tls_ca: /nonexistent/ca.pem\n",
    );
    assert!(errs[0].contains("names no certificate"), "{errs:?}");
    assert!(errs[1].contains("is not a host name"), "{errs:?}");
    assert!(
        errs[2]
            .starts_with("policy.yaml:3:18: upstream_tls_ca: cannot read \"/nonexistent/ca.pem\""),
        "{errs:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let errs = errors(&format!(
        "listen: [\"127.0.0.1:53\"]\nupstreams: [\"9.9.9.9:53\"]\nupstream_tls_ca: \"{}\"\n",
        not_pem.display()
    ));
    assert!(errs[0].contains("holds no PEM certificate"), "{errs:?}");
}

#[test]
fn contain_reads_every_selector_and_defaults_to_everything() {
    assert_eq!(load("").firewall.contain, None);
    let p = firewall_policy(
        "  hooks: [output, forward]\n  contain:\n    uids: [1000, 0]\n    gids: [100]\n    \
         cgroups: [\"/system.slice/agent.service/\"]\n    interfaces: [veth*, br-agents]\n    \
         sources: [10.77.0.0/24, \"fd77::/64\"]\n",
    )
    .unwrap();
    let c = p.firewall.contain.unwrap();
    assert_eq!(c.uids, [1000, 0]);
    assert_eq!(c.gids, [100]);
    assert_eq!(c.cgroups, ["system.slice/agent.service"]);
    assert_eq!(c.interfaces, ["veth*", "br-agents"]);
    assert_eq!(c.sources.len(), 2);
    assert_eq!(
        c.summary(),
        "uids 1000,0; gids 100; cgroups system.slice/agent.service; interfaces veth*,br-agents; \
         sources 10.77.0.0/24,fd77::/64"
    );
}

#[test]
fn contain_gids_without_uids_warns_that_only_the_primary_group_counts() {
    let contain_warnings = |section: &str| -> Vec<String> {
        let p = firewall_policy(section).unwrap();
        warnings(&p)
            .into_iter()
            .filter(|w| w.contains("firewall.contain"))
            .collect()
    };
    let w = contain_warnings("  contain: {gids: [100]}\n");
    assert_eq!(w.len(), 1, "{w:#?}");
    assert!(
        w[0].starts_with("policy.yaml:4:19: firewall.contain.gids without uids")
            && w[0].contains("primary group only")
            && w[0].contains("list the agents' uids"),
        "{}",
        w[0]
    );
    // With uids the gids only add to them: no warning.
    let w = contain_warnings("  contain: {uids: [1000], gids: [100]}\n");
    assert!(w.is_empty(), "{w:#?}");
}

#[test]
fn host_dns_goes_through_dnsfence_unless_the_policy_says_direct() {
    let host_dns = |section: &str| {
        let p = firewall_policy(section).unwrap();
        let about: Vec<String> = warnings(&p)
            .into_iter()
            .filter(|w| w.contains("host_dns"))
            .collect();
        (p.firewall.contain.as_ref().unwrap().host_dns, about)
    };
    assert_eq!(
        host_dns("  contain: {uids: [1000]}\n"),
        (HostDns::Dnsfence, vec![])
    );
    assert_eq!(
        host_dns("  contain: {uids: [1000], host_dns: direct}\n"),
        (HostDns::Direct, vec![])
    );
    assert_eq!(
        host_dns("  contain: {uids: [1000], host_dns: dnsfence}\n").0,
        HostDns::Dnsfence
    );
    // Only the output hook sees the host's own DNS: said where it is written.
    let (_, w) =
        host_dns("  hooks: [forward]\n  contain: {interfaces: [veth*], host_dns: direct}\n");
    assert_eq!(w.len(), 1, "{w:#?}");
    assert!(
        w[0].starts_with(
            "policy.yaml:5:44: firewall.contain.host_dns has no effect without output"
        ),
        "{w:#?}"
    );
}

#[test]
fn contain_errors_name_file_line_and_column() {
    for (section, expected) in [
        (
            "  contain: {uids: [1000, 1000]}\n",
            "policy.yaml:4:26: firewall.contain.uids: 1000 is listed twice",
        ),
        (
            "  contain: {uids: [-1]}\n",
            "policy.yaml:4:20: firewall.contain.uids is -1, out of range; write a number from 0 to 4294967294",
        ),
        (
            "  contain: {uids: [1], interfaces: [\"ve*th\"]}\n",
            "policy.yaml:4:37: firewall.contain.interfaces: interface name \"ve*th\" contains '*'",
        ),
        (
            "  contain: {uids: [1], interfaces: [\"*\"]}\n",
            "policy.yaml:4:37: firewall.contain.interfaces: \"*\" matches every interface",
        ),
        (
            "  contain: {uids: [1], interfaces: [\"a-very-long-interface\"]}\n",
            "policy.yaml:4:37: firewall.contain.interfaces: interface name \"a-very-long-interface\" is longer than 15 bytes",
        ),
        (
            "  contain: {cgroups: [\"a/../b\"]}\n",
            "policy.yaml:4:23: firewall.contain.cgroups: cgroup \"a/../b\" has the component \"..\"",
        ),
        (
            "  contain: {cgroups: [\"/\"]}\n",
            "policy.yaml:4:23: firewall.contain.cgroups: cgroup \"/\" is the root cgroup",
        ),
        (
            "  contain: {uids: [1], sources: [10.0.0.1/8]}\n",
            "policy.yaml:4:34: firewall.contain.sources: \"10.0.0.1/8\" has host bits set",
        ),
        (
            "  contain: {}\n",
            "policy.yaml:4:12: firewall.contain names no one",
        ),
        (
            "  contain: {interfaces: [veth*]}\n",
            "policy.yaml:4:12: firewall.hooks has output, but firewall.contain names no process on this host",
        ),
        (
            "  hooks: [forward]\n  contain: {uids: [1000]}\n",
            "policy.yaml:5:12: firewall.hooks has forward, but firewall.contain names no routed agent",
        ),
        (
            "  hooks: [forward]\n  contain: {sources: [0.0.0.0/0]}\n",
            "policy.yaml:5:12: firewall.contain.sources \"0.0.0.0/0\" is every address",
        ),
        (
            "  contain: {users: [1000]}\n",
            "policy.yaml:4:13: unknown key \"users\" in firewall.contain",
        ),
        (
            "  contain: {uids: [1], host_dns: resolved}\n",
            "policy.yaml:4:34: firewall.contain.host_dns cannot be \"resolved\"; write one of: dnsfence, direct",
        ),
    ] {
        let errs = firewall_errors(section);
        assert_eq!(errs.len(), 1, "{section}: {errs:#?}");
        assert!(errs[0].starts_with(expected), "{section}\n{}", errs[0]);
    }
}

#[test]
fn log_denied_nflog_takes_a_group() {
    let fw = |extra: &str| {
        let text = format!(
            "listen: [\"127.0.0.1:53\"]\nupstreams: [\"127.0.0.1:5300\"]\nallow: [a.test]\nfirewall:\n{extra}"
        );
        Policy::parse(&text, Path::new("p.yaml"))
    };
    let p = fw("  log_denied: nflog\n  nflog_group: 7\n").unwrap();
    assert!(p.firewall.log_denied);
    assert_eq!(p.firewall.nflog_group, Some(7));
    let p = fw("  log_denied: nflog\n").unwrap();
    assert_eq!(p.firewall.nflog_group, Some(0));
    let p = fw("  log_denied: true\n").unwrap();
    assert_eq!(p.firewall.nflog_group, None);
    let e = fw("  log_denied: true\n  nflog_group: 7\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("p.yaml:6:16") && e.contains("log_denied: nflog"),
        "{e}"
    );
    let e = fw("  log_denied: syslog\n").unwrap_err().to_string();
    assert!(
        e.contains("p.yaml:5:15") && e.contains("true (the kernel log), false or nflog"),
        "{e}"
    );
    let e = fw("  log_denied: nflog\n  nflog_group: 70000\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("firewall.nflog_group"), "{e}");
}

#[test]
fn contain_subids_from_is_an_absolute_directory_defaulting_to_etc() {
    let p = firewall_policy("  contain: {uids: [1000]}\n").unwrap();
    assert_eq!(p.firewall.contain.unwrap().subids_from, None);
    let p = firewall_policy("  contain: {uids: [1000], subids_from: /srv/host/etc}\n").unwrap();
    assert_eq!(
        p.firewall.contain.unwrap().subids_from,
        Some(PathBuf::from("/srv/host/etc"))
    );
    let errs = firewall_errors("  contain: {uids: [1000], subids_from: etc}\n");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].starts_with(
            "policy.yaml:4:40: firewall.contain.subids_from must be an absolute directory"
        ),
        "{}",
        errs[0]
    );
}

#[test]
fn contain_cgroups_without_uids_warn_that_the_agent_can_leave_them() {
    let p = firewall_policy("  contain: {cgroups: [system.slice/agent.service]}\n").unwrap();
    let w: Vec<String> = warnings(&p)
        .into_iter()
        .filter(|w| w.contains("firewall.contain"))
        .collect();
    assert_eq!(w.len(), 1, "{w:#?}");
    assert!(
        w[0].starts_with("policy.yaml:4:22: firewall.contain.cgroups without uids")
            && w[0].contains("systemd-run --user"),
        "{}",
        w[0]
    );
    let p = firewall_policy("  contain: {uids: [1000], cgroups: [system.slice/agent.service]}\n")
        .unwrap();
    assert!(
        !warnings(&p).iter().any(|w| w.contains("firewall.contain")),
        "{:#?}",
        warnings(&p)
    );
}

// ---- firewall.bind ----

/// A policy whose `firewall` section ends with `bind:` + `entries` (the first entry on line 6).
fn bind_policy(entries: &str) -> String {
    format!(
        "listen: [\"10.88.0.1:53\"]\nupstreams: [\"9.9.9.9:53\"]\nallow: [a.example]\n\
         firewall:\n  bind:\n{entries}"
    )
}

#[test]
fn bind_reads_ports_and_their_sources() {
    let p = parse(&bind_policy(
        "    - {port: p-a, sources: [\"10.88.0.2\", \"fd88::2/128\"]}\n    \
         - {port: p-b, sources: [\"10.88.1.0/28\"]}\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        p.firewall.bind,
        [
            PortBinding {
                port: "p-a".into(),
                sources: vec![net("10.88.0.2/32"), net("fd88::2/128")],
            },
            PortBinding {
                port: "p-b".into(),
                sources: vec![net("10.88.1.0/28")],
            },
        ]
    );
    assert!(FirewallPolicy::default().bind.is_empty());
}

#[test]
fn bind_errors_name_the_entry_and_what_would_be_right() {
    let cases = [
        (
            "    - {port: \"veth*\", sources: [\"10.88.0.2\"]}\n",
            "policy.yaml:6:14: firewall.bind: port \"veth*\" is a wildcard",
        ),
        (
            "    - {sources: [\"10.88.0.2\"]}\n",
            "policy.yaml:6:7: a firewall.bind entry needs port",
        ),
        (
            "    - {port: p-a}\n",
            "policy.yaml:6:7: a firewall.bind entry needs sources",
        ),
        (
            "    - {port: p-a, sources: []}\n",
            "policy.yaml:6:28: firewall.bind sources is empty",
        ),
        (
            "    - {port: p-a, sources: [\"fe80::1\"]}\n",
            "policy.yaml:6:29: firewall.bind: source \"fe80::1/128\" is link-local",
        ),
        (
            "    - {port: p-a, sources: [\"0.0.0.0/0\"]}\n",
            "policy.yaml:6:29: firewall.bind: source \"0.0.0.0/0\" is every address",
        ),
        (
            "    - {port: p-a, sources: [\"10.88.0.2\"]}\n    - {port: p-a, sources: [\"10.88.0.3\"]}\n",
            "policy.yaml:7:14: firewall.bind: port \"p-a\" is listed twice (also on line 6)",
        ),
        (
            "    - {port: p-a, sources: [\"10.88.0.0/24\"]}\n    - {port: p-b, sources: [\"10.88.0.3\"]}\n",
            "policy.yaml:7:29: firewall.bind: source \"10.88.0.3/32\" overlaps \"10.88.0.0/24\" of port \"p-a\" (line 6)",
        ),
        (
            "    - {port: p-a, sources: [\"10.88.0.2\"], from: x}\n",
            "policy.yaml:6:43: unknown key \"from\" in a firewall.bind entry; the keys are: port, sources",
        ),
    ];
    for (entries, want) in cases {
        let errs = errors(&bind_policy(entries));
        assert_eq!(errs.len(), 1, "{entries}: {errs:#?}");
        assert!(
            errs[0].starts_with(want),
            "{entries}:\n got {}\nwant {want}",
            errs[0]
        );
        // Every message says what would be right.
        assert!(
            errs[0].contains("; ") || errs[0].contains("such as"),
            "{}",
            errs[0]
        );
    }
}

#[test]
fn a_built_policy_with_a_bad_binding_is_held_to_the_same_rules() {
    let fw = FirewallPolicy {
        bind: vec![
            PortBinding {
                port: "p-a".into(),
                sources: vec![net("10.88.0.0/24")],
            },
            PortBinding {
                port: "p-b".into(),
                sources: vec![net("10.88.0.3/32")],
            },
        ],
        ..FirewallPolicy::default()
    };
    let problems = firewall_problems(&fw);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].key, "firewall.bind");
    assert!(problems[0].message.contains("overlaps"));
}

#[test]
fn bind_without_the_firewall_warns_that_it_does_nothing() {
    let p = parse(
        "listen: [\"127.0.0.1:5353\"]\nupstreams: [\"9.9.9.9:53\"]\nallow: [a.example]\n\
         firewall:\n  enabled: false\n  bind: [{port: p-a, sources: [\"10.88.0.2\"]}]\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let w = warnings(&p);
    assert!(
        w.iter()
            .any(|w| w.starts_with("policy.yaml:6:9:") && w.contains("bind has no effect")),
        "{w:?}"
    );
}
