//! The policy file's schema: which keys exist, their defaults, and every check on them.
//!
//! This walks the positioned YAML tree and builds the validated [`Policy`]. It never stops at
//! an error: each part falls back to its default so that the rest can still be checked, and
//! the caller discards the result if anything was reported as an error.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use hickory_proto::rr::RecordType;
use ipnet::IpNet;

use super::diagnostic::{Pos, Report, quote};
use super::lint;
use super::name;
use super::net::{self, Role};
use super::raw::{Node, Value};
use super::read::{self, Fields};
use super::{
    CnameMode, DenyWith, ExfiltrationLimits, FirewallPolicy, Group, HintMode, Hook, Limits,
    LogTarget, OnExit, Policy, Rule, RuleSet, TtlPolicy,
};

const TOP_KEYS: &[&str] = &[
    "listen",
    "upstreams",
    "upstream_timeout",
    "deny_with",
    "allow",
    "allow_answers",
    "qtypes",
    "clients",
    "log",
    "ttl",
    "deny_answers",
    "cname",
    "https_hints",
    "limits",
    "exfiltration",
    "firewall",
];
const CLIENT_KEYS: &[&str] = &["name", "from", "allow", "allow_answers"];
const RULE_KEYS: &[&str] = &["name", "allow_answers"];
const TTL_KEYS: &[&str] = &["min", "max", "grace"];
const LIMIT_KEYS: &[&str] = &[
    "max_inflight",
    "client_qps",
    "client_burst",
    "tcp_connections",
    "tcp_connections_per_client",
    "tcp_idle_timeout",
];
const EXFILTRATION_KEYS: &[&str] = &[
    "max_name_length",
    "max_label_length",
    "wildcard_names_per_minute",
];
const FIREWALL_KEYS: &[&str] = &[
    "enabled",
    "table",
    "hooks",
    "allow_cidrs",
    "per_client",
    "log_denied",
    "on_exit",
    "set_size",
    "mark",
];

/// The query types allowed when `qtypes` is absent.
pub(crate) const DEFAULT_QTYPES: [RecordType; 4] = [
    RecordType::A,
    RecordType::AAAA,
    RecordType::CNAME,
    RecordType::HTTPS,
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

    let listen_node = f.required(r, "listen", "listen: [\"127.0.0.1:53\"]");
    let listen = socket_list(r, listen_node, "listen", Role::Listen);
    let upstreams_node = f.required(r, "upstreams", "upstreams: [\"9.9.9.9:53\"]");
    let upstreams = socket_list(r, upstreams_node, "upstreams", Role::Upstream);
    check_no_loop(r, &listen, &upstreams);

    let upstream_timeout = nonzero_duration(r, f.get("upstream_timeout"), "upstream_timeout", 2);
    let deny_with = f
        .get("deny_with")
        .and_then(|n| {
            read::choice(
                r,
                n,
                "deny_with",
                &[
                    ("nxdomain", DenyWith::NxDomain),
                    ("refused", DenyWith::Refused),
                ],
            )
        })
        .unwrap_or(DenyWith::NxDomain);
    let qtypes = qtypes(r, f.get("qtypes"));
    let log = log_target(r, f.get("log"));
    let ttl = ttl(r, f.get("ttl"));
    let deny_answers = f
        .get("deny_answers")
        .map(|n| read::cidrs(r, n, "deny_answers"))
        .unwrap_or_default();
    let cname = f
        .get("cname")
        .and_then(|n| {
            read::choice(
                r,
                n,
                "cname",
                &[("follow", CnameMode::Follow), ("strict", CnameMode::Strict)],
            )
        })
        .unwrap_or(CnameMode::Follow);
    let https_hints = f
        .get("https_hints")
        .and_then(|n| {
            read::choice(
                r,
                n,
                "https_hints",
                &[("admit", HintMode::Admit), ("strip", HintMode::Strip)],
            )
        })
        .unwrap_or(HintMode::Admit);
    let limits = limits(r, f.get("limits"));
    let exfiltration = exfiltration(r, f.get("exfiltration"));
    let firewall = firewall(r, f.get("firewall"));

    let default_group = group(
        r,
        "default",
        Vec::new(),
        f.get("allow"),
        f.get("allow_answers"),
    );
    let clients = clients(r, f.get("clients"));

    let all_groups = std::iter::once(&default_group).chain(clients.iter().map(|(_, g)| g));
    lint_groups(r, all_groups, &deny_answers, &exfiltration);
    lint_shadowed_clients(r, &clients);
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
        listen: listen.into_iter().map(|(_, a)| a).collect(),
        upstreams: upstreams.into_iter().map(|(_, a)| a).collect(),
        upstream_timeout,
        deny_with,
        qtypes,
        default_group: default_group.group,
        clients: clients.into_iter().map(|(_, g)| g.group).collect(),
        log,
        ttl,
        firewall,
        deny_answers: deny_answers.into_iter().map(|(_, n)| n).collect(),
        cname,
        https_hints,
        limits,
        exfiltration,
        warnings: Vec::new(),
    })
}

/// A non-empty list of distinct socket addresses.
fn socket_list(
    r: &mut Report,
    node: Option<&Node>,
    what: &str,
    role: Role,
) -> Vec<(Pos, SocketAddr)> {
    let Some(node) = node else {
        return Vec::new();
    };
    let addrs = read::sockets(r, node, what, role);
    if matches!(&node.value, Value::Seq(items) if items.is_empty()) || node.value == Value::Null {
        let example = match role {
            Role::Listen => "[\"127.0.0.1:53\"]",
            Role::Upstream => "[\"9.9.9.9:53\"]",
        };
        r.error(
            node.pos,
            format!("{what} is empty; list at least one address, e.g. {what}: {example}"),
        );
    }
    let mut seen: HashMap<SocketAddr, Pos> = HashMap::new();
    for &(pos, addr) in &addrs {
        if let Some(first) = seen.insert(addr, pos) {
            r.error(
                pos,
                format!(
                    "{what}: \"{addr}\" is listed twice (also on line {}); remove one of them",
                    first.line
                ),
            );
        }
    }
    addrs
}

/// An upstream that is one of our own listening sockets would loop queries forever.
fn check_no_loop(r: &mut Report, listen: &[(Pos, SocketAddr)], upstreams: &[(Pos, SocketAddr)]) {
    for &(pos, up) in upstreams {
        for &(lpos, l) in listen {
            if l == up {
                r.error(
                    pos,
                    format!(
                        "upstream \"{up}\" is dnsfence's own listen address (line {}), so \
                         queries would loop; write the address of another resolver",
                        lpos.line
                    ),
                );
            } else if l.ip().is_unspecified() && l.port() == up.port() && up.ip().is_loopback() {
                r.warn(
                    pos,
                    format!(
                        "upstream \"{up}\" may be dnsfence itself: it listens on \"{l}\" \
                         (line {}); make sure another resolver serves this address",
                        lpos.line
                    ),
                );
            }
        }
    }
}

fn nonzero_duration(
    r: &mut Report,
    node: Option<&Node>,
    what: &str,
    default_secs: u64,
) -> Duration {
    let default = Duration::from_secs(default_secs);
    let Some(node) = node else {
        return default;
    };
    match read::duration(r, node, what) {
        Some(d) if d.is_zero() => {
            r.error(
                node.pos,
                format!("{what} is 0, which makes no sense; write a duration such as \"{default_secs}s\""),
            );
            default
        }
        Some(d) => d,
        None => default,
    }
}

fn qtypes(r: &mut Report, node: Option<&Node>) -> Vec<RecordType> {
    let Some(node) = node else {
        return DEFAULT_QTYPES.to_vec();
    };
    let Some(items) = read::list(r, node, "qtypes") else {
        return DEFAULT_QTYPES.to_vec();
    };
    if items.is_empty() {
        r.error(
            node.pos,
            "qtypes is empty, so no query could be answered; list types such as [A, AAAA, CNAME, HTTPS]",
        );
    }
    let mut types: Vec<RecordType> = Vec::new();
    let mut seen: HashMap<RecordType, Pos> = HashMap::new();
    for item in items {
        let Some(word) = read::text(r, item, "a qtype") else {
            continue;
        };
        let upper = word.to_ascii_uppercase();
        match RecordType::from_str(&upper) {
            Ok(
                t @ (RecordType::ANY
                | RecordType::AXFR
                | RecordType::IXFR
                | RecordType::OPT
                | RecordType::TSIG),
            ) => r.error(
                item.pos,
                format!(
                    "qtype {} is a meta type whose answers cannot be filtered; \
                     list data types such as A, AAAA, CNAME, HTTPS",
                    quote(&t.to_string())
                ),
            ),
            Ok(t) => {
                if let Some(first) = seen.insert(t, item.pos) {
                    r.warn(
                        item.pos,
                        format!(
                            "qtype {t} is listed twice (also on line {}); remove one",
                            first.line
                        ),
                    );
                } else {
                    types.push(t);
                }
            }
            Err(_) => r.error(
                item.pos,
                format!(
                    "unknown qtype {}; write a record type name such as A, AAAA, CNAME, HTTPS, \
                     SVCB, TXT, MX",
                    quote(word)
                ),
            ),
        }
    }
    types
}

fn log_target(r: &mut Report, node: Option<&Node>) -> LogTarget {
    let Some(node) = node else {
        return LogTarget::Stdout;
    };
    match read::text(r, node, "log") {
        Some("-") | None => LogTarget::Stdout,
        Some("") => {
            r.error(
                node.pos,
                "log is empty; write \"-\" for standard output or a file path",
            );
            LogTarget::Stdout
        }
        Some(path) => LogTarget::File(PathBuf::from(path)),
    }
}

fn ttl(r: &mut Report, node: Option<&Node>) -> TtlPolicy {
    let mut ttl = TtlPolicy::default();
    let Some(f) = node.and_then(|n| read::fields(r, n, "ttl", TTL_KEYS)) else {
        return ttl;
    };
    if let Some(d) = f.get("min").and_then(|n| read::duration(r, n, "ttl.min")) {
        ttl.min = d;
    }
    ttl.max = nonzero_duration(r, f.get("max"), "ttl.max", ttl.max.as_secs());
    if let Some(d) = f
        .get("grace")
        .and_then(|n| read::duration(r, n, "ttl.grace"))
    {
        ttl.grace = d;
    }
    if ttl.min > ttl.max {
        let pos = f.get("min").map_or(f.pos, |n| n.pos);
        r.error(
            pos,
            format!(
                "ttl.min ({}s) is greater than ttl.max ({}s); make min at most max",
                ttl.min.as_secs_f64(),
                ttl.max.as_secs_f64()
            ),
        );
    }
    ttl
}

fn limits(r: &mut Report, node: Option<&Node>) -> Limits {
    let mut l = Limits::default();
    let Some(f) = node.and_then(|n| read::fields(r, n, "limits", LIMIT_KEYS)) else {
        return l;
    };
    let max = u64::from(u32::MAX);
    if let Some(n) = f
        .get("max_inflight")
        .and_then(|n| read::integer(r, n, "limits.max_inflight", 1, max))
    {
        l.max_inflight = usize::try_from(n).unwrap_or(usize::MAX);
    }
    if let Some(n) = f
        .get("client_qps")
        .and_then(|n| read::integer(r, n, "limits.client_qps", 0, max))
    {
        l.client_qps = u32::try_from(n).unwrap_or(u32::MAX);
    }
    if let Some(n) = f
        .get("client_burst")
        .and_then(|n| read::integer(r, n, "limits.client_burst", 0, max))
    {
        l.client_burst = u32::try_from(n).unwrap_or(u32::MAX);
    }
    if l.client_qps > 0 && l.client_burst == 0 {
        let pos = f.get("client_burst").map_or(f.pos, |n| n.pos);
        r.error(
            pos,
            "limits.client_burst is 0 while client_qps is on, so no query would pass; \
             write a burst of at least 1 (or client_qps: 0 to turn the limit off)",
        );
    }
    if let Some(n) = f
        .get("tcp_connections")
        .and_then(|n| read::integer(r, n, "limits.tcp_connections", 1, max))
    {
        l.tcp_connections = usize::try_from(n).unwrap_or(usize::MAX);
    }
    if let Some(n) = f
        .get("tcp_connections_per_client")
        .and_then(|n| read::integer(r, n, "limits.tcp_connections_per_client", 1, max))
    {
        l.tcp_connections_per_client = usize::try_from(n).unwrap_or(usize::MAX);
    }
    l.tcp_idle_timeout = nonzero_duration(
        r,
        f.get("tcp_idle_timeout"),
        "limits.tcp_idle_timeout",
        l.tcp_idle_timeout.as_secs(),
    );
    l
}

fn exfiltration(r: &mut Report, node: Option<&Node>) -> ExfiltrationLimits {
    let mut e = ExfiltrationLimits::default();
    let Some(f) = node.and_then(|n| read::fields(r, n, "exfiltration", EXFILTRATION_KEYS)) else {
        return e;
    };
    let max_name = name::MAX_NAME_LEN as u64;
    let max_label = name::MAX_LABEL_LEN as u64;
    if let Some(n) = f
        .get("max_name_length")
        .and_then(|n| read::integer(r, n, "exfiltration.max_name_length", 1, max_name))
    {
        e.max_name_length = usize::try_from(n).unwrap_or(usize::MAX);
    }
    if let Some(n) = f
        .get("max_label_length")
        .and_then(|n| read::integer(r, n, "exfiltration.max_label_length", 1, max_label))
    {
        e.max_label_length = usize::try_from(n).unwrap_or(usize::MAX);
    }
    if let Some(n) = f.get("wildcard_names_per_minute").and_then(|n| {
        read::integer(
            r,
            n,
            "exfiltration.wildcard_names_per_minute",
            0,
            u64::from(u32::MAX),
        )
    }) {
        e.wildcard_names_per_minute = u32::try_from(n).unwrap_or(u32::MAX);
    }
    e
}

fn firewall(r: &mut Report, node: Option<&Node>) -> FirewallPolicy {
    let mut fw = FirewallPolicy::default();
    let Some(f) = node.and_then(|n| read::fields(r, n, "firewall", FIREWALL_KEYS)) else {
        return fw;
    };
    if let Some(b) = f
        .get("enabled")
        .and_then(|n| read::boolean(r, n, "firewall.enabled"))
    {
        fw.enabled = b;
    }
    if let Some(node) = f.get("table")
        && let Some(t) = read::text(r, node, "firewall.table")
    {
        let ok = (1..=32).contains(&t.len())
            && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if ok {
            fw.table = t.to_owned();
        } else {
            r.error(
                node.pos,
                format!(
                    "firewall.table {} is not a valid table name; use 1 to 32 letters, digits \
                     or \"_\", such as \"dnsfence\"",
                    quote(t)
                ),
            );
        }
    }
    if let Some(node) = f.get("hooks") {
        fw.hooks = hooks(r, node);
    }
    if let Some(node) = f.get("allow_cidrs") {
        let nets = read::cidrs(r, node, "firewall.allow_cidrs");
        for (pos, net) in &nets {
            if lint::is_everything(net) {
                r.warn(
                    *pos,
                    format!(
                        "firewall.allow_cidrs \"{net}\" admits every destination, so the \
                         firewall contains nothing; list the networks you need"
                    ),
                );
            }
        }
        fw.allow_cidrs = nets.into_iter().map(|(_, n)| n).collect();
    }
    if let Some(b) = f
        .get("per_client")
        .and_then(|n| read::boolean(r, n, "firewall.per_client"))
    {
        fw.per_client = b;
    }
    if let Some(b) = f
        .get("log_denied")
        .and_then(|n| read::boolean(r, n, "firewall.log_denied"))
    {
        fw.log_denied = b;
    }
    if let Some(v) = f.get("on_exit").and_then(|n| {
        read::choice(
            r,
            n,
            "firewall.on_exit",
            &[("keep", OnExit::Keep), ("remove", OnExit::Remove)],
        )
    }) {
        fw.on_exit = v;
    }
    if let Some(n) = f
        .get("set_size")
        .and_then(|n| read::integer(r, n, "firewall.set_size", 1, u64::from(u32::MAX)))
    {
        fw.set_size = u32::try_from(n).unwrap_or(u32::MAX);
    }
    if let Some(node) = f.get("mark")
        && let Some(m) = mark(r, node)
    {
        fw.mark = m;
    }
    fw
}

fn hooks(r: &mut Report, node: &Node) -> Vec<Hook> {
    let default = FirewallPolicy::default().hooks;
    let Some(items) = read::list(r, node, "firewall.hooks") else {
        return default;
    };
    if items.is_empty() {
        r.error(
            node.pos,
            "firewall.hooks is empty, so nothing would be filtered; write [output], [forward] \
             or [output, forward]",
        );
        return default;
    }
    let mut hooks = Vec::new();
    let mut seen: HashMap<&'static str, Pos> = HashMap::new();
    for item in items {
        let Some(hook) = read::choice(
            r,
            item,
            "a firewall hook",
            &[("output", Hook::Output), ("forward", Hook::Forward)],
        ) else {
            continue;
        };
        let word = match hook {
            Hook::Output => "output",
            Hook::Forward => "forward",
        };
        if let Some(first) = seen.insert(word, item.pos) {
            r.error(
                item.pos,
                format!(
                    "firewall hook {word} is listed twice (also on line {}); remove one",
                    first.line
                ),
            );
        } else {
            hooks.push(hook);
        }
    }
    hooks
}

/// The socket mark: a YAML integer (`0x0d5f`, `3423`) or a string (`"0x0d5f"`), nonzero.
fn mark(r: &mut Report, node: &Node) -> Option<u32> {
    let hint = "write a nonzero 32-bit number such as 0x0d5f";
    let value: Option<u64> = match &node.value {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::Str(s) => {
            let t = s.trim();
            match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => t.parse().ok(),
            }
        }
        _ => None,
    };
    match value.and_then(|v| u32::try_from(v).ok()) {
        Some(0) => {
            r.error(
                node.pos,
                format!("firewall.mark is 0, which means \"no mark\" and cannot tell dnsfence's own queries apart; {hint}"),
            );
            None
        }
        Some(m) => Some(m),
        None => {
            let found = match &node.value {
                Value::Str(s) => quote(s),
                other => other.kind().to_owned(),
            };
            r.error(node.pos, format!("firewall.mark cannot be {found}; {hint}"));
            None
        }
    }
}

/// A group while it is being checked: the group and where its parts are in the file.
struct DraftGroup {
    group: Group,
    /// Positions of the group's own `allow_answers` entries and of each rule's, for lints.
    answer_positions: Vec<(Pos, IpNet)>,
    /// Position of each rule (parallel to `group.rules`).
    rule_positions: Vec<Pos>,
    from_positions: Vec<(Pos, IpNet)>,
}

impl std::ops::Deref for DraftGroup {
    type Target = Group;
    fn deref(&self) -> &Group {
        &self.group
    }
}

fn group(
    r: &mut Report,
    name: &str,
    from: Vec<(Pos, IpNet)>,
    allow: Option<&Node>,
    allow_answers: Option<&Node>,
) -> DraftGroup {
    let prefix = if name == "default" {
        String::new()
    } else {
        format!("clients[{name}].")
    };
    let mut answer_positions = allow_answers
        .map(|n| read::cidrs(r, n, &format!("{prefix}allow_answers")))
        .unwrap_or_default();
    let group_answers: Vec<IpNet> = answer_positions.iter().map(|&(_, n)| n).collect();
    let (rules, rule_positions) = match allow {
        Some(node) => rules(r, node, &format!("{prefix}allow"), &mut answer_positions),
        None => (Vec::new(), Vec::new()),
    };
    let rules = match RuleSet::new(rules) {
        Ok(set) => set,
        Err(e) => {
            // Unreachable after the checks in `rules`, but never trust that silently.
            let pos = allow.map_or(Pos::START, |n| n.pos);
            r.error(
                pos,
                format!("internal error indexing the rules: {e}; please report it"),
            );
            RuleSet::default()
        }
    };
    DraftGroup {
        group: Group {
            name: name.to_owned(),
            from: from.iter().map(|&(_, n)| n).collect(),
            rules,
            allow_answers: group_answers,
        },
        answer_positions,
        rule_positions,
        from_positions: from,
    }
}

/// The rules of one `allow` list; duplicates are reported with both lines and dropped.
fn rules(
    r: &mut Report,
    node: &Node,
    what: &str,
    answer_positions: &mut Vec<(Pos, IpNet)>,
) -> (Vec<Rule>, Vec<Pos>) {
    let Some(items) = read::list(r, node, what) else {
        return (Vec::new(), Vec::new());
    };
    let mut rules = Vec::new();
    let mut positions = Vec::new();
    let mut seen: HashMap<String, Pos> = HashMap::new();
    for item in items {
        let (text_node, answers) = match &item.value {
            Value::Map(_) => {
                let Some(f) = read::fields(r, item, &format!("a rule in {what}"), RULE_KEYS) else {
                    continue;
                };
                let answers = f
                    .get("allow_answers")
                    .map(|n| read::cidrs(r, n, &format!("{what}: allow_answers")))
                    .unwrap_or_default();
                match f.required(r, "name", "name: api.example.com") {
                    Some(n) => (n, answers),
                    None => continue,
                }
            }
            _ => (item, Vec::new()),
        };
        let Some(text) = read::text(r, text_node, &format!("a rule in {what}")) else {
            continue;
        };
        let canonical = match name::parse_rule(text) {
            Ok(c) => c,
            Err(e) => {
                r.error(text_node.pos, e);
                continue;
            }
        };
        let pos = text_node.pos;
        if let Some(first) = seen.get(&canonical.pattern) {
            let same = if canonical.pattern == text {
                String::new()
            } else {
                format!(", written {}", quote(text))
            };
            r.error(
                pos,
                format!(
                    "duplicate rule {:?}{same} in {what}: also on line {} (column {}); remove one of them",
                    canonical.pattern, first.line, first.column
                ),
            );
            continue;
        }
        seen.insert(canonical.pattern.clone(), pos);
        if let Some(tenant) = lint::multi_tenant_suffix(canonical.kind, canonical.suffix()) {
            r.warn(pos, lint::multi_tenant_message(&canonical.pattern, tenant));
        }
        answer_positions.extend(answers.iter().copied());
        rules.push(Rule {
            pattern: canonical.pattern,
            kind: canonical.kind,
            line: pos.line,
            column: pos.column,
            allow_answers: answers.into_iter().map(|(_, n)| n).collect(),
        });
        positions.push(pos);
    }
    (rules, positions)
}

fn clients(r: &mut Report, node: Option<&Node>) -> Vec<(Pos, DraftGroup)> {
    let Some(items) = node.and_then(|n| read::list(r, n, "clients")) else {
        return Vec::new();
    };
    let mut groups = Vec::new();
    let mut seen: HashMap<String, Pos> = HashMap::new();
    for item in items {
        let Some(f) = read::fields(r, item, "a client group", CLIENT_KEYS) else {
            continue;
        };
        let name_node = f.required(r, "name", "name: research");
        let name = name_node.and_then(|n| group_name(r, n));
        if let (Some(name), Some(node)) = (&name, name_node) {
            if let Some(first) = seen.get(name) {
                r.error(
                    node.pos,
                    format!(
                        "duplicate group name {} (also on line {}); give each group its own name",
                        quote(name),
                        first.line
                    ),
                );
            } else {
                seen.insert(name.clone(), node.pos);
            }
        }
        let label = name.clone().unwrap_or_else(|| "?".to_owned());
        let from = from(r, &f, &label);
        let g = group(r, &label, from, f.get("allow"), f.get("allow_answers"));
        groups.push((name_node.map_or(f.pos, |n| n.pos), g));
    }
    groups
}

fn group_name(r: &mut Report, node: &Node) -> Option<String> {
    let name = read::text(r, node, "a group name")?;
    if name == "default" {
        r.error(
            node.pos,
            "the group name \"default\" is reserved for the top-level allowlist; choose another name",
        );
        return None;
    }
    let ok = (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        r.error(
            node.pos,
            format!(
                "group name {} is not valid; use 1 to 32 letters, digits, \"-\" or \"_\", such as \"research\"",
                quote(name)
            ),
        );
        return None;
    }
    Some(name.to_owned())
}

fn from(r: &mut Report, f: &Fields<'_>, group: &str) -> Vec<(Pos, IpNet)> {
    let what = format!("clients[{group}].from");
    let Some(node) = f.required(r, "from", "from: [\"10.200.0.0/24\"]") else {
        return Vec::new();
    };
    let nets = read::cidrs(r, node, &what);
    if matches!(&node.value, Value::Seq(items) if items.is_empty()) || node.value == Value::Null {
        r.error(
            node.pos,
            format!(
                "{what} is empty, so the group would match no client; list its source networks, \
                 e.g. from: [\"10.200.0.0/24\"]"
            ),
        );
    }
    let mut kept = Vec::new();
    for (pos, net) in nets {
        if let Some(v4) = net::unmapped(&net) {
            r.error(
                pos,
                format!(
                    "{what}: \"{net}\" is an IPv4-mapped IPv6 network, but clients are matched \
                     by their IPv4 address; write \"{v4}\""
                ),
            );
        } else {
            kept.push((pos, net));
        }
    }
    kept
}

fn lint_groups<'a>(
    r: &mut Report,
    groups: impl Iterator<Item = &'a DraftGroup>,
    deny_answers: &[(Pos, IpNet)],
    exfiltration: &ExfiltrationLimits,
) {
    for g in groups {
        for &(pos, allowed) in &g.answer_positions {
            if lint::is_everything(&allowed) {
                r.warn(
                    pos,
                    format!(
                        "allow_answers \"{allowed}\" admits private and internal answers from \
                         anywhere, which turns off DNS-rebinding protection; list the networks you need"
                    ),
                );
            }
            for &(dpos, denied) in deny_answers {
                if lint::overlaps(&allowed, &denied) {
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
            if rule.kind == super::RuleKind::Exact {
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
fn lint_shadowed_clients(r: &mut Report, clients: &[(Pos, DraftGroup)]) {
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
