//! One validator: a policy `dnsfence check` accepts is one `serve` and `ruleset` accept, and
//! the other way round.
//!
//! The property test builds random firewall, limits and ttl settings (right ones and wrong
//! ones, with the edges of every bound), writes them as a policy file, and checks that
//! `Policy::parse` (what `check` and `serve` load with) accepts the file exactly when the
//! checks the firewall and the server run on the built values (`firewall_problems`,
//! `limits_problems`, `ttl_problems`, the ruleset builder) find nothing; and that what was
//! accepted reads back as written.

use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;

use dnsfence::policy::{
    Contain, FirewallPolicy, Hook, HostDns, Limits, Policy, TtlPolicy, firewall_problems,
    limits_problems, ttl_problems,
};

fn hook_word(h: Hook) -> &'static str {
    match h {
        Hook::Output => "output",
        Hook::Forward => "forward",
    }
}

/// A duration inside `lo..=hi` most of the time, else one of the edges around every bound
/// (0, 10ms, 100ms, 1s, 1m, 1h, 24h, 168h) or far beyond.
fn duration(lo: u64, hi: u64) -> impl Strategy<Value = Duration> {
    prop_oneof![
        6 => (lo..=hi).prop_map(Duration::from_millis),
        1 => prop::sample::select(vec![
            0u64, 9, 10, 11, 99, 100, 101, 999, 1000, 59_999, 60_000, 60_001, 3_599_999,
            3_600_000, 3_600_001, 86_400_000, 86_400_001, 604_770_000, 604_800_000,
            604_800_001, 720_000_000,
        ])
        .prop_map(Duration::from_millis),
    ]
}

/// Mostly `lo..=hi`, sometimes an edge (0, 1, 4096, 4097, 65536, 65537).
fn count(lo: u64, hi: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => lo..=hi,
        1 => prop::sample::select(vec![0u64, 1, 2, 31, 32, 33, 4095, 4096, 4097, 65_536, 65_537]),
    ]
}

/// A value placed against another one: just below it, at it, just above, or in between.
fn relative(to_low: u64, to_high: u64, choice: u8) -> u64 {
    match choice {
        0 => to_low.saturating_sub(1),
        1 => to_low,
        2 => to_high,
        3 => to_high + 1,
        _ => to_low + (to_high.saturating_sub(to_low)) / 2,
    }
}

fn table_name() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[a-z][a-z0-9_]{0,31}",
        1 => "[a-z][a-z0-9_]{31,40}",
        1 => "[0-9_][a-z0-9_]{0,5}",
        1 => "[a-z]{1,4}[-. ;{]",
        1 => Just(String::new()),
    ]
}

fn hooks() -> impl Strategy<Value = Vec<Hook>> {
    prop_oneof![
        3 => Just(vec![Hook::Output]),
        2 => Just(vec![Hook::Forward]),
        2 => Just(vec![Hook::Output, Hook::Forward]),
        1 => Just(vec![]),
        1 => Just(vec![Hook::Output, Hook::Output]),
    ]
}

/// `firewall.contain`: absent, or some of each selector, right and wrong ones (`*`, `..`, the
/// whole address space, uid -1 written as 4294967295 is refused by the reader's range).
fn contain() -> impl Strategy<Value = Option<Contain>> {
    let pick = |items: &'static [&'static str]| {
        prop::sample::subsequence(items.to_vec(), 0..=items.len())
            .prop_map(|v| v.into_iter().map(str::to_owned).collect::<Vec<String>>())
    };
    let contain = (
        prop::sample::subsequence(vec![0u32, 1000, 4_294_967_294], 0..=3),
        prop::sample::subsequence(vec![100u32, 4242], 0..=2),
        pick(&["system.slice/agent.service", "agents", "a/../b"]),
        pick(&["veth*", "to-a1", "*", "a-name-too-long-for-linux"]),
        pick(&["10.77.0.0/24", "fd77::/64", "0.0.0.0/0"]),
        prop_oneof![Just(HostDns::Dnsfence), Just(HostDns::Direct)],
    )
        .prop_map(
            |(uids, gids, cgroups, interfaces, sources, host_dns)| Contain {
                host_dns,
                subids_from: None,
                uids,
                gids,
                cgroups,
                interfaces,
                sources: sources.iter().map(|s| s.parse().unwrap()).collect(),
            },
        );
    prop_oneof![2 => Just(None), 3 => contain.prop_map(Some)]
}

fn contain_yaml(c: &Option<Contain>) -> String {
    let Some(c) = c else {
        return String::new();
    };
    let list = |items: Vec<String>| items.join(", ");
    format!(
        "  contain:\n    uids: [{}]\n    gids: [{}]\n    cgroups: [{}]\n    interfaces: [{}]\n    sources: [{}]\n    host_dns: {}\n",
        list(c.uids.iter().map(u32::to_string).collect()),
        list(c.gids.iter().map(u32::to_string).collect()),
        list(c.cgroups.iter().map(|s| format!("{s:?}")).collect()),
        list(c.interfaces.iter().map(|s| format!("{s:?}")).collect()),
        list(c.sources.iter().map(|s| format!("\"{s}\"")).collect()),
        c.host_dns.as_str(),
    )
}

#[derive(Debug, Clone)]
struct Settings {
    contain: Option<Contain>,
    table: String,
    hooks: Vec<Hook>,
    per_client: bool,
    set_size: u64,
    mark: u64,
    per_answer: u64,
    per_client_share: u64,
    max_inflight: u64,
    inflight_share: u64,
    client_qps: u64,
    client_burst: u64,
    tcp_idle: Duration,
    ttl: (Duration, Duration, Duration),
    upstream_timeout: Duration,
}

fn settings() -> impl Strategy<Value = Settings> {
    (
        (
            table_name(),
            hooks(),
            any::<bool>(),
            count(32, 70_000),
            prop_oneof![9 => 1u64..=0xffff, 1 => Just(0u64)],
            count(1, 64),
            0u8..6,
        ),
        (
            count(1, 2000),
            0u8..6,
            0u64..3,
            prop_oneof![4 => 1u64..500, 1 => Just(0u64)],
            duration(100, 3_600_000),
            (
                duration(0, 3_600_000),
                duration(1000, 7_200_000),
                duration(0, 3_600_000),
            ),
            duration(10, 60_000),
        ),
        contain(),
    )
        .prop_map(
            |(
                (table, hooks, per_client, set_size, mark, per_answer, share_choice),
                (
                    max_inflight,
                    inflight_choice,
                    client_qps,
                    client_burst,
                    tcp_idle,
                    ttl,
                    upstream_timeout,
                ),
                contain,
            )| Settings {
                contain,
                table,
                hooks,
                per_client,
                set_size,
                mark,
                per_answer,
                per_client_share: relative(per_answer, set_size, share_choice),
                max_inflight,
                inflight_share: relative(1, max_inflight, inflight_choice),
                client_qps,
                client_burst,
                tcp_idle,
                ttl,
                upstream_timeout,
            },
        )
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

fn yaml(s: &Settings) -> String {
    let hooks: Vec<&str> = s.hooks.iter().map(|&h| hook_word(h)).collect();
    format!(
        "listen: [\"127.0.0.1:5353\"]
upstreams: [\"192.0.2.53:53\"]
upstream_timeout: {}
allow: [api.example.com]
ttl: {{min: {}, max: {}, grace: {}}}
limits:
  max_inflight: {}
  max_inflight_per_client: {}
  client_qps: {}
  client_burst: {}
  tcp_idle_timeout: {}
firewall:
  table: {:?}
  hooks: [{}]
  per_client: {}
  set_size: {}
  mark: {}
  max_addresses_per_answer: {}
  max_elements_per_client: {}
{}",
        ms(s.upstream_timeout),
        ms(s.ttl.0),
        ms(s.ttl.1),
        ms(s.ttl.2),
        s.max_inflight,
        s.inflight_share,
        s.client_qps,
        s.client_burst,
        ms(s.tcp_idle),
        s.table,
        hooks.join(", "),
        s.per_client,
        s.set_size,
        s.mark,
        s.per_answer,
        s.per_client_share,
        contain_yaml(&s.contain),
    )
}

/// The settings as the built types hold them (what a policy made in code would carry).
fn built(s: &Settings) -> (FirewallPolicy, Limits, TtlPolicy) {
    let fw = FirewallPolicy {
        table: s.table.clone(),
        hooks: s.hooks.clone(),
        per_client: s.per_client,
        set_size: u32::try_from(s.set_size).unwrap(),
        mark: u32::try_from(s.mark).unwrap(),
        max_addresses_per_answer: u32::try_from(s.per_answer).unwrap(),
        max_elements_per_client: Some(u32::try_from(s.per_client_share).unwrap()),
        contain: s.contain.clone(),
        ..FirewallPolicy::default()
    };
    let limits = Limits {
        max_inflight: usize::try_from(s.max_inflight).unwrap(),
        max_inflight_per_client: usize::try_from(s.inflight_share).unwrap(),
        client_qps: u32::try_from(s.client_qps).unwrap(),
        client_burst: u32::try_from(s.client_burst).unwrap(),
        tcp_idle_timeout: s.tcp_idle,
        ..Limits::default()
    };
    let ttl = TtlPolicy {
        min: s.ttl.0,
        max: s.ttl.1,
        grace: s.ttl.2,
    };
    (fw, limits, ttl)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn check_accepts_exactly_what_serve_and_ruleset_accept(s in settings()) {
        let text = yaml(&s);
        let parsed = Policy::parse(&text, Path::new("p.yaml"));
        let (fw, limits, ttl) = built(&s);
        let mut problems = firewall_problems(&fw);
        problems.extend(limits_problems(&limits));
        problems.extend(ttl_problems(&ttl));
        problems.extend(dnsfence::policy::upstream_timeout_problems(s.upstream_timeout));
        match &parsed {
            Ok(policy) => {
                prop_assert!(problems.is_empty(), "check accepted but the built values have problems: {problems:?}\n{text}");
                prop_assert_eq!(&policy.firewall.table, &fw.table);
                prop_assert_eq!(&policy.firewall.hooks, &fw.hooks);
                prop_assert_eq!(policy.firewall.set_size, fw.set_size);
                prop_assert_eq!(policy.firewall.max_addresses_per_answer, fw.max_addresses_per_answer);
                prop_assert_eq!(policy.firewall.max_elements_per_client, fw.max_elements_per_client);
                prop_assert_eq!(&policy.firewall.contain, &fw.contain);
                prop_assert_eq!(policy.limits, limits);
                prop_assert_eq!(policy.ttl, ttl);
                let script = dnsfence::firewall::render_nft(policy);
                prop_assert!(!script.starts_with("# dnsfence: no ruleset"), "check accepted, ruleset refused:\n{script}\n{text}");
            }
            Err(e) => {
                prop_assert!(!problems.is_empty(), "check refused values the firewall and server accept:\n{e}\n{text}");
                // And every error points into the file.
                prop_assert!(e.errors.iter().all(|d| d.line > 0 && d.column > 0), "{e}");
            }
        }
    }
}

/// A wildcard or exact rule over a mix of suffixes: top-level domains, ICANN public suffixes
/// (also one level above a `*.` entry, and in Unicode), multi-tenant (private) suffixes from
/// the compiled list and the curated one, and ordinary registrable domains.
fn rule_text() -> impl Strategy<Value = String> {
    let suffixes = prop_oneof![
        Just("com"),
        Just("co.uk"),
        Just("com.au"),
        Just("gov.uk"),
        Just("kawasaki.jp"),
        Just("city.kawasaki.jp"),
        Just("公司.cn"),
        Just("xn--55qx5d.cn"),
        Just("github.io"),
        Just("duckdns.org"),
        Just("compute.herokuapp.com"),
        Just("amazonaws.com"),
        Just("example.co.uk"),
        Just("example.com"),
        Just("pythonhosted.org"),
        Just("svc.cluster.local"),
    ];
    (
        prop_oneof![
            Just(""),
            Just("*."),
            Just("**."),
            Just("app."),
            Just("*.app.")
        ],
        suffixes,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(prefix, suffix, upper, dot)| {
            let mut t = format!("{prefix}{suffix}");
            if upper {
                t = t.to_ascii_uppercase();
            }
            if dot {
                t.push('.');
            }
            t
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 400,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// `check`/`serve`/reload (`Policy::parse`) and `ctl grant` (`Rule::parse`, `--force` when
    /// `multi_tenant_suffix` says so) judge every rule the same way: refused by both, or
    /// accepted by both with a warning exactly when the grant would need `--force` for the
    /// multi-tenant suffix.
    #[test]
    fn policy_and_grant_judge_wildcards_alike(text in rule_text()) {
        let policy = format!(
            "listen: [\"127.0.0.1:5353\"]\nupstreams: [\"192.0.2.53:53\"]\nallow:\n  - {text:?}\n"
        );
        let parsed = Policy::parse(&policy, Path::new("p.yaml"));
        let grant = dnsfence::policy::Rule::parse(&text, 0);
        match (&parsed, &grant) {
            (Ok(p), Ok(rule)) => {
                let warned = p.warnings.iter().any(|w| w.message.contains("anyone can register"));
                prop_assert_eq!(warned, rule.multi_tenant_suffix().is_some(), "{}", text);
            }
            (Err(e), Err(g)) => {
                prop_assert_eq!(e.errors.len(), 1, "{}", e);
                prop_assert!(e.errors[0].message.contains(g.as_str()), "{} vs {}", e, g);
                prop_assert_eq!((e.errors[0].line, e.errors[0].column), (4, 5));
            }
            _ => prop_assert!(false, "policy {:?} but grant {:?} for {}", parsed.is_ok(), grant.is_ok(), text),
        }
    }
}
