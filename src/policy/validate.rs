//! The one decider: the checks on a built policy that the rest of dnsfence relies on.
//!
//! `dnsfence check`, `serve` and `ruleset` must accept exactly the same policies. The schema
//! readers check each value as they read it (bounds, syntax) and give the best message, with
//! its position; the checks *between* values, and every fact the firewall and the pipeline
//! build on, live here, in one function per section. The schema runs them after reading a
//! section and reports each problem at the key it names; the firewall runs the same function
//! before it builds a ruleset (so a policy built in code, not read from a file, is held to the
//! same rules). A property test generates policies and checks that both sides agree.
//!
//! The bounds of every duration and size are constants here, named in the README.

use std::time::Duration;

use ipnet::IpNet;

use super::schema::check_table_name;
use super::{Contain, FirewallPolicy, Hook, Limits, PortBinding, TtlPolicy};

/// The longest lifetime an admitted address gets (`ttl.max + ttl.grace`). An element without
/// a timeout would be permanent; a week is far beyond any useful DNS TTL.
pub const MAX_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// Bounds of `ttl.max`.
pub const TTL_MAX_RANGE: (Duration, Duration) = (Duration::from_secs(1), MAX_LIFETIME);
/// Bounds of `ttl.grace`.
pub const TTL_GRACE_RANGE: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(24 * 3600));
/// Bounds of `upstream_timeout`.
pub const UPSTREAM_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_millis(10), Duration::from_secs(60));
/// Bounds of `limits.tcp_idle_timeout`.
pub const TCP_IDLE_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(3600));
/// The most addresses of one family an answer may have admitted: a DNS message over TCP holds
/// at most about 4,096 A records, so nothing larger can ever matter.
pub const MAX_ADDRESSES_PER_ANSWER: u32 = 4096;

/// The deepest cgroup `firewall.contain.cgroups` may name (path components below the root).
pub const MAX_CGROUP_DEPTH: usize = 32;
/// The longest interface name Linux takes (`IFNAMSIZ` - 1).
const MAX_IFNAME: usize = 15;
/// The most ports `firewall.bind` lists (each costs a few rules every bridged frame walks).
pub const MAX_BIND_PORTS: usize = 256;
/// The most sources one port of `firewall.bind` lists (its neighbour-advertisement rules grow
/// with the square of its IPv6 sources).
pub const MAX_BIND_SOURCES: usize = 16;

/// The one rule for a `firewall.bind` port: one interface name, no wildcard.
pub fn check_bind_port(name: &str) -> Result<(), String> {
    if name.ends_with('*') {
        return Err(format!(
            "port {name:?} is a wildcard: a binding names exactly one bridge port (the ports a \
             prefix matches would share their sources, and could take each other's); write \
             one entry per port, such as \"veth-agent1\""
        ));
    }
    check_interface_name(name)
}

/// The one rule for a `firewall.bind` source: an address (or network) an agent can own.
pub fn check_bind_source(net: &IpNet) -> Result<(), String> {
    let ip = net.addr();
    let why = if net.prefix_len() == 0 {
        Some("is every address, so the port could take any other's")
    } else if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        Some("is not an address an agent sends from")
    } else if matches!(ip, std::net::IpAddr::V6(v6) if v6.is_unicast_link_local()) {
        Some(
            "is link-local: link-local sources are always allowed for neighbour discovery and never routed, so they are not bound",
        )
    } else if matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("is not an address an agent sends from")
    } else {
        None
    };
    match why {
        Some(why) => Err(format!(
            "source \"{net}\" {why}; write the agent's own addresses, such as \"10.88.0.2\" \
             and \"fd88::2\""
        )),
        None => Ok(()),
    }
}

fn overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Every problem of `firewall.bind` (empty when it is absent).
fn bind_problems(bind: &[PortBinding], out: &mut Vec<Problem>) {
    let key = "firewall.bind";
    if bind.len() > MAX_BIND_PORTS {
        out.push(problem(
            key,
            format!(
                "firewall.bind lists {} ports, more than {MAX_BIND_PORTS}; give agents their own \
                 routed links, or split them over several bridges and gateways",
                bind.len()
            ),
        ));
    }
    for (i, b) in bind.iter().enumerate() {
        if let Err(e) = check_bind_port(&b.port) {
            out.push(problem(key, format!("firewall.bind: {e}")));
        }
        if bind[..i].iter().any(|o| o.port == b.port) {
            out.push(problem(
                key,
                format!(
                    "firewall.bind: port {:?} is listed twice; list each port once, with all \
                     its sources",
                    b.port
                ),
            ));
        }
        if b.sources.is_empty() {
            out.push(problem(
                key,
                format!(
                    "firewall.bind: port {:?} has no sources; list the addresses of the agent \
                     behind it, such as sources: [\"10.88.0.2\", \"fd88::2\"]",
                    b.port
                ),
            ));
        }
        if b.sources.len() > MAX_BIND_SOURCES {
            out.push(problem(
                key,
                format!(
                    "firewall.bind: port {:?} lists {} sources, more than {MAX_BIND_SOURCES}; \
                     list networks instead of single addresses",
                    b.port,
                    b.sources.len()
                ),
            ));
        }
        for (j, net) in b.sources.iter().enumerate() {
            if let Err(e) = check_bind_source(net) {
                out.push(problem(
                    key,
                    format!("firewall.bind: port {:?}: {e}", b.port),
                ));
            }
            if b.sources[..j].iter().any(|o| overlap(o, net)) {
                out.push(problem(
                    key,
                    format!(
                        "firewall.bind: port {:?}: source \"{net}\" overlaps another of its \
                         sources; list each address once",
                        b.port
                    ),
                ));
            }
            for other in &bind[..i] {
                if let Some(o) = other.sources.iter().find(|o| overlap(o, net)) {
                    out.push(problem(
                        key,
                        format!(
                            "firewall.bind: source \"{net}\" of port {:?} overlaps \"{o}\" of \
                             port {:?}: each address belongs to one port, or the two agents can \
                             take each other's; give each port its own addresses",
                            b.port, other.port
                        ),
                    ));
                }
            }
        }
    }
}

/// The one rule for `firewall.contain.interfaces` entries: a Linux interface name (1 to 15
/// bytes, no `/`, `:` or white space), or a prefix followed by one `*` (`veth*`).
pub fn check_interface_name(name: &str) -> Result<(), String> {
    let hint = "write an interface name such as \"eth1\", or a prefix and a trailing \"*\" \
                such as \"veth*\"";
    let stem = name.strip_suffix('*').unwrap_or(name);
    if stem.is_empty() {
        return Err(if name.is_empty() {
            format!("an empty interface name; {hint}")
        } else {
            "\"*\" matches every interface, so it contains everything; remove \
             firewall.contain to contain everything, or name the agents' interfaces"
                .to_string()
        });
    }
    if name.len() > MAX_IFNAME {
        return Err(format!(
            "interface name {name:?} is longer than {MAX_IFNAME} bytes, which Linux never \
             names an interface; {hint}"
        ));
    }
    let bad = stem.chars().find(|c| {
        *c == '/' || *c == ':' || *c == '*' || *c == '"' || c.is_whitespace() || c.is_control()
    });
    if let Some(c) = bad {
        return Err(format!(
            "interface name {name:?} contains {c:?} (\"*\" only at the end, no \"/\", \":\", \
             quote or space); {hint}"
        ));
    }
    if stem == "." || stem == ".." {
        return Err(format!("{name:?} is not an interface name; {hint}"));
    }
    Ok(())
}

/// The one rule for `firewall.contain.cgroups` entries: a cgroup v2 path below the root, as
/// `/sys/fs/cgroup/<path>` would name it (`system.slice/agent.service`); returns it without
/// leading or trailing `/`.
pub fn check_cgroup_path(path: &str) -> Result<String, String> {
    let hint = "write a cgroup v2 path below the root, such as \"system.slice/agent.service\"";
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() {
        return Err(format!(
            "cgroup {path:?} is the root cgroup, which holds every process: remove \
             firewall.contain to contain everything, or {hint}"
        ));
    }
    let parts: Vec<&str> = trimmed.split('/').collect();
    if let Some(bad) = parts
        .iter()
        .find(|p| p.is_empty() || **p == "." || **p == ".." || p.contains(['\0', '"', '\n']))
    {
        return Err(format!(
            "cgroup {path:?} has the component {bad:?} (empty, \".\", \"..\", a quote or \
             a control character); {hint}"
        ));
    }
    if parts.len() > MAX_CGROUP_DEPTH {
        return Err(format!(
            "cgroup {path:?} is {} levels deep, more than {MAX_CGROUP_DEPTH}; {hint}",
            parts.len()
        ));
    }
    Ok(trimmed.to_string())
}

/// Every problem of `firewall.contain` (empty when it is absent).
fn contain_problems(fw: &FirewallPolicy, out: &mut Vec<Problem>) {
    let Some(c): Option<&Contain> = fw.contain.as_ref() else {
        return;
    };
    let key = "firewall.contain";
    if !c.names_local_processes() && !c.names_routed_agents() {
        out.push(problem(
            key,
            "firewall.contain names no one, so nothing would be filtered; list the agents \
             (uids, gids, cgroups, interfaces or sources), or remove firewall.contain to \
             contain everything",
        ));
        return;
    }
    if fw.hooks.contains(&Hook::Output) && !c.names_local_processes() {
        out.push(problem(
            key,
            "firewall.hooks has output, but firewall.contain names no process on this host \
             (interfaces and sources only match routed traffic), so the output hook would \
             contain nothing; add uids, gids or cgroups, or remove output from hooks",
        ));
    }
    if fw.hooks.contains(&Hook::Forward) && !c.names_routed_agents() {
        out.push(problem(
            key,
            "firewall.hooks has forward, but firewall.contain names no routed agent (uids, \
             gids and cgroups only match processes on this host), so the forward hook would \
             contain nothing; add interfaces or sources, or remove forward from hooks",
        ));
    }
    for name in &c.interfaces {
        if let Err(e) = check_interface_name(name) {
            out.push(problem(key, format!("firewall.contain.interfaces: {e}")));
        }
    }
    for path in &c.cgroups {
        match check_cgroup_path(path) {
            Ok(p) if p == *path => {}
            Ok(p) => out.push(problem(
                key,
                format!("firewall.contain.cgroups: write {path:?} as {p:?}"),
            )),
            Err(e) => out.push(problem(key, format!("firewall.contain.cgroups: {e}"))),
        }
    }
    if c.uids.contains(&u32::MAX) || c.gids.contains(&u32::MAX) {
        out.push(problem(
            key,
            "firewall.contain: 4294967295 is (uid_t)-1, which no socket is owned by; write a \
             real uid or gid",
        ));
    }
    for net in &c.sources {
        if net.prefix_len() == 0 {
            out.push(problem(
                key,
                format!(
                    "firewall.contain.sources \"{net}\" is every address of its family, so \
                     it contains everything routed; name the agents' networks"
                ),
            ));
        }
    }
}

/// One thing wrong with a built policy: the key it concerns (`firewall.set_size`) and a
/// message that reads "what is wrong; what would be right".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: &'static str,
    pub message: String,
}

fn problem(key: &'static str, message: impl Into<String>) -> Problem {
    Problem {
        key,
        message: message.into(),
    }
}

/// Every problem of the `firewall` section. Empty for every policy `Policy::load` returns.
pub fn firewall_problems(fw: &FirewallPolicy) -> Vec<Problem> {
    let mut out = Vec::new();
    if let Err(e) = check_table_name(&fw.table) {
        out.push(problem("firewall.table", e));
    }
    if fw.hooks.is_empty() {
        out.push(problem(
            "firewall.hooks",
            "firewall.hooks is empty, so nothing would be filtered; write [output], [forward] \
             or [output, forward]",
        ));
    }
    for (i, hook) in fw.hooks.iter().enumerate() {
        if fw.hooks[..i].contains(hook) {
            out.push(problem(
                "firewall.hooks",
                format!("firewall hook {hook:?} is listed twice; remove one"),
            ));
        }
    }
    if fw.set_size == 0 {
        out.push(problem(
            "firewall.set_size",
            "firewall.set_size is 0, which the kernel reads as unlimited; write a size of at \
             least 1, such as 65536",
        ));
    }
    if fw.mark == 0 {
        out.push(problem(
            "firewall.mark",
            "firewall.mark is 0, which means \"no mark\" and cannot tell dnsfence's own queries \
             apart; write a nonzero 32-bit number such as 0x0d5f",
        ));
    }
    contain_problems(fw, &mut out);
    bind_problems(&fw.bind, &mut out);
    let per_answer = fw.max_addresses_per_answer;
    if per_answer == 0 || per_answer > MAX_ADDRESSES_PER_ANSWER {
        out.push(problem(
            "firewall.max_addresses_per_answer",
            format!(
                "firewall.max_addresses_per_answer is {per_answer}, out of range; write a number \
                 from 1 to {MAX_ADDRESSES_PER_ANSWER}"
            ),
        ));
        return out;
    }
    let Some(share) = fw.max_elements_per_client else {
        return out;
    };
    let per_answer = fw.addresses_per_answer();
    if share == 0 || share > fw.set_size {
        out.push(problem(
            "firewall.max_elements_per_client",
            format!(
                "firewall.max_elements_per_client is {share}, out of range; write a number \
                 from 1 to firewall.set_size ({})",
                fw.set_size
            ),
        ));
    } else if share < per_answer {
        out.push(problem(
            "firewall.max_elements_per_client",
            format!(
                "firewall.max_elements_per_client ({share}) is below \
                 firewall.max_addresses_per_answer ({per_answer}), so one answer could not be \
                 admitted whole; write at least {per_answer}"
            ),
        ));
    }
    out
}

/// Every problem of the `limits` section.
pub fn limits_problems(l: &Limits) -> Vec<Problem> {
    let mut out = Vec::new();
    if l.max_inflight == 0 {
        out.push(problem(
            "limits.max_inflight",
            "limits.max_inflight is 0, so no query could be answered; write at least 1",
        ));
    }
    if l.max_inflight_per_client == 0 || l.max_inflight_per_client > l.max_inflight {
        out.push(problem(
            "limits.max_inflight_per_client",
            format!(
                "limits.max_inflight_per_client ({}) must be from 1 to limits.max_inflight \
                 ({}), or one client could take every slot; write at most {}",
                l.max_inflight_per_client,
                l.max_inflight,
                l.max_inflight.max(1)
            ),
        ));
    }
    if l.client_qps > 0 && l.client_burst == 0 {
        out.push(problem(
            "limits.client_burst",
            "limits.client_burst is 0 while client_qps is on, so no query would pass; \
             write a burst of at least 1 (or client_qps: 0 to turn the limit off)",
        ));
    }
    if l.tcp_connections == 0 {
        out.push(problem(
            "limits.tcp_connections",
            "limits.tcp_connections is 0, so TCP would refuse everyone; write at least 1",
        ));
    }
    if l.tcp_connections_per_client == 0 {
        out.push(problem(
            "limits.tcp_connections_per_client",
            "limits.tcp_connections_per_client is 0; write at least 1",
        ));
    }
    if let Some(p) = out_of(
        "limits.tcp_idle_timeout",
        l.tcp_idle_timeout,
        TCP_IDLE_TIMEOUT_RANGE,
    ) {
        out.push(p);
    }
    out
}

/// Every problem of the `ttl` section.
pub fn ttl_problems(t: &TtlPolicy) -> Vec<Problem> {
    let mut out = Vec::new();
    if let Some(p) = out_of("ttl.max", t.max, TTL_MAX_RANGE) {
        out.push(p);
    }
    if let Some(p) = out_of("ttl.grace", t.grace, TTL_GRACE_RANGE) {
        out.push(p);
    }
    if t.min > t.max {
        out.push(problem(
            "ttl.min",
            format!(
                "ttl.min ({}) is greater than ttl.max ({}); make min at most max",
                show(t.min),
                show(t.max)
            ),
        ));
    }
    let longest = t.max.saturating_add(t.grace);
    if longest > MAX_LIFETIME && t.max <= MAX_LIFETIME && t.grace <= TTL_GRACE_RANGE.1 {
        out.push(problem(
            "ttl.max",
            format!(
                "ttl.max + ttl.grace is {}, but an admitted address lives at most {} (168h); \
                 lower ttl.max or ttl.grace so that their sum is at most 168h",
                show(longest),
                show(MAX_LIFETIME)
            ),
        ));
    }
    out
}

/// Every problem of `upstream_timeout`.
pub fn upstream_timeout_problems(timeout: Duration) -> Vec<Problem> {
    out_of("upstream_timeout", timeout, UPSTREAM_TIMEOUT_RANGE)
        .into_iter()
        .collect()
}

fn out_of(key: &'static str, d: Duration, (min, max): (Duration, Duration)) -> Option<Problem> {
    (d < min || d > max).then(|| {
        problem(
            key,
            format!(
                "{key} is {}, out of range; write a duration from {} to {}",
                show(d),
                show(min),
                show(max)
            ),
        )
    })
}

/// A duration in the largest unit that writes it exactly: `500ms`, `30s`, `5m`, `168h`.
pub(crate) fn show(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".into()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_show_in_their_largest_exact_unit() {
        assert_eq!(show(Duration::from_millis(500)), "500ms");
        assert_eq!(show(Duration::from_secs(90)), "90s");
        assert_eq!(show(Duration::from_secs(300)), "5m");
        assert_eq!(show(MAX_LIFETIME), "168h");
        assert_eq!(show(Duration::ZERO), "0s");
    }

    #[test]
    fn the_defaults_have_no_problems() {
        assert!(firewall_problems(&FirewallPolicy::default()).is_empty());
        assert!(limits_problems(&Limits::default()).is_empty());
        assert!(ttl_problems(&TtlPolicy::default()).is_empty());
        assert!(upstream_timeout_problems(Duration::from_secs(2)).is_empty());
    }

    #[test]
    fn a_built_firewall_policy_is_held_to_the_same_rules() {
        let mut fw = FirewallPolicy {
            table: "9fw".into(),
            hooks: Vec::new(),
            set_size: 0,
            mark: 0,
            ..FirewallPolicy::default()
        };
        let keys: Vec<&str> = firewall_problems(&fw).iter().map(|p| p.key).collect();
        for key in [
            "firewall.table",
            "firewall.hooks",
            "firewall.set_size",
            "firewall.mark",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
        fw = FirewallPolicy {
            max_addresses_per_answer: 4097,
            ..FirewallPolicy::default()
        };
        let keys: Vec<&str> = firewall_problems(&fw).iter().map(|p| p.key).collect();
        assert_eq!(keys, ["firewall.max_addresses_per_answer"]);
        // A set smaller than one answer is fine: the set is the bound, and the quota follows.
        fw = FirewallPolicy {
            set_size: 4,
            ..FirewallPolicy::default()
        };
        assert!(firewall_problems(&fw).is_empty());
        assert_eq!(
            (fw.addresses_per_answer(), fw.elements_per_client()),
            (4, 4)
        );
    }

    #[test]
    fn lifetimes_beyond_a_week_are_refused_not_silently_capped() {
        let t = TtlPolicy {
            max: Duration::from_secs(7 * 24 * 3600),
            grace: Duration::from_secs(30),
            ..TtlPolicy::default()
        };
        let problems = ttl_problems(&t);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("at most 168h"), "{problems:?}");
    }
}
