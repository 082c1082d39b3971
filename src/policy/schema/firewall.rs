//! `firewall`: the nftables side (table, hooks, sets and their quotas, inbound ports).

use std::collections::HashMap;

use super::super::diagnostic::{Pos, Report, quote};
use super::super::lint;
use super::super::raw::{Node, Value};
use super::super::read;
use super::super::validate;
use super::super::{
    Contain, FirewallPolicy, Hook, HostDns, InboundPort, OnExit, PortBinding, Transport,
};

const FIREWALL_KEYS: &[&str] = &[
    "enabled",
    "table",
    "hooks",
    "allow_cidrs",
    "per_client",
    "log_denied",
    "nflog_group",
    "on_exit",
    "set_size",
    "mark",
    "inbound",
    "max_addresses_per_answer",
    "max_elements_per_client",
    "contain",
    "bind",
];

const BIND_KEYS: &[&str] = &["port", "sources"];

const CONTAIN_KEYS: &[&str] = &[
    "uids",
    "gids",
    "cgroups",
    "interfaces",
    "sources",
    "subids_from",
    "host_dns",
];

/// The longest nftables table name a policy may use. The kernel takes longer ones, but the
/// ruleset derives chain and set names from it and prints it for `nft`; 32 keeps all of that
/// readable and inside every kernel's limits.
pub(crate) const MAX_TABLE_NAME: usize = 32;

/// The one rule for table names, used by `check`, `serve` and `ruleset` alike: a letter, then
/// letters, digits or `_`, at most [`MAX_TABLE_NAME`] characters (what `nft` accepts unquoted).
pub fn check_table_name(name: &str) -> Result<(), String> {
    let starts_with_letter = name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic());
    let ok = starts_with_letter
        && name.len() <= MAX_TABLE_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "firewall.table {} is not a valid table name; use a letter, then letters, digits \
             or \"_\", at most {MAX_TABLE_NAME} characters, such as \"dnsfence\"",
            quote(name)
        ))
    }
}

/// `log_denied`: true (the kernel log), false, or nflog (read above).
fn log_denied(r: &mut Report, node: &Node) -> Option<bool> {
    match &node.value {
        Value::Bool(b) => Some(*b),
        other => {
            let found = match other {
                Value::Str(s) => quote(s),
                _ => other.kind().to_owned(),
            };
            r.error(
                node.pos,
                format!(
                    "firewall.log_denied must be true (the kernel log), false or nflog (an \
                     NFLOG group dnsfence reads to explain each drop), found {found}"
                ),
            );
            None
        }
    }
}

pub(super) fn read(r: &mut Report, node: Option<&Node>) -> FirewallPolicy {
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
        match check_table_name(t) {
            Ok(()) => fw.table = t.to_owned(),
            Err(e) => r.error(node.pos, e),
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
    if let Some(node) = f.get("per_client")
        && let Some(b) = read::boolean(r, node, "firewall.per_client")
    {
        fw.per_client = b;
        if b && fw.hooks.contains(&Hook::Output) {
            r.warn(
                node.pos,
                "firewall.per_client keys every process on this host as the loopback client \
                 (127.0.0.1, ::1), but its packets leave from the host's own addresses, so the \
                 output chain drops what dnsfence admits for it (it fails closed: local \
                 processes reach only allow_cidrs); per_client is for agents routed through \
                 this host (hooks: [forward]). Remove output from firewall.hooks or per_client \
                 if local processes must reach what they resolve",
            );
        }
    }
    let nflog = match f.get("log_denied") {
        Some(node) if matches!(&node.value, Value::Str(s) if s == "nflog") => {
            fw.log_denied = true;
            true
        }
        Some(node) => {
            if let Some(b) = log_denied(r, node) {
                fw.log_denied = b;
            }
            false
        }
        None => false,
    };
    let group = f.get("nflog_group").and_then(|node| {
        let n = read::integer(r, node, "firewall.nflog_group", 0, u64::from(u16::MAX))?;
        if !nflog {
            r.error(
                node.pos,
                "firewall.nflog_group is only read with log_denied: nflog; add \
                 `log_denied: nflog` or remove nflog_group",
            );
        }
        u16::try_from(n).ok()
    });
    if nflog {
        fw.nflog_group = Some(group.unwrap_or(0));
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
    if let Some(node) = f.get("inbound") {
        fw.inbound = inbound(r, node);
    }
    let set_size = u64::from(fw.set_size);
    if let Some(node) = f.get("max_addresses_per_answer")
        && let Some(n) = read::integer(
            r,
            node,
            "firewall.max_addresses_per_answer",
            1,
            u64::from(validate::MAX_ADDRESSES_PER_ANSWER),
        )
    {
        fw.max_addresses_per_answer = u32::try_from(n).unwrap_or(u32::MAX);
        if n > set_size {
            r.warn(
                node.pos,
                format!(
                    "firewall.max_addresses_per_answer ({n}) is above firewall.set_size \
                     ({set_size}), so one answer can fill the whole set; lower it or raise set_size"
                ),
            );
        }
    }
    if let Some(node) = f.get("max_elements_per_client")
        && let Some(n) = read::integer(r, node, "firewall.max_elements_per_client", 1, set_size)
    {
        fw.max_elements_per_client = Some(u32::try_from(n).unwrap_or(u32::MAX));
        if !fw.per_client {
            r.warn(
                node.pos,
                "firewall.max_elements_per_client has no effect without per_client: true \
                 (the allow sets are shared by every client); remove it or set per_client: true",
            );
        }
    }
    if let Some(node) = f.get("contain") {
        fw.contain = contain(r, node, fw.hooks.contains(&Hook::Output));
    }
    if let Some(node) = f.get("bind") {
        fw.bind = bind(r, node);
        if !fw.enabled && !fw.bind.is_empty() {
            r.warn(
                node.pos,
                "firewall.bind has no effect with firewall.enabled: false (no table is \
                 installed, so no port is bound); set enabled: true or remove bind",
            );
        }
    }
    super::report(r, &f, validate::firewall_problems(&fw));
    fw
}

/// `firewall.bind`: `- {port: veth-a, sources: ["10.88.0.2", "fd88::2"]}`. Each problem is
/// reported where it is written, and an entry with one is left out, so that `validate` (which
/// holds built policies to the same rules) has nothing left to say.
fn bind(r: &mut Report, node: &Node) -> Vec<PortBinding> {
    let what = "firewall.bind";
    let Some(items) = read::list(r, node, what) else {
        return Vec::new();
    };
    if items.len() > validate::MAX_BIND_PORTS {
        r.error(
            node.pos,
            format!(
                "{what} lists {} ports, more than {}; give agents their own routed links, or \
                 split them over several bridges and gateways",
                items.len(),
                validate::MAX_BIND_PORTS
            ),
        );
        return Vec::new();
    }
    let mut out: Vec<PortBinding> = Vec::new();
    let mut ports: HashMap<String, Pos> = HashMap::new();
    let mut owners: Vec<(ipnet::IpNet, String, Pos)> = Vec::new();
    for item in items {
        let Some(f) = read::fields(r, item, "a firewall.bind entry", BIND_KEYS) else {
            continue;
        };
        let errors_before = r.error_count();
        let port =
            match f.get("port") {
                None => {
                    r.error(
                        f.pos,
                        "a firewall.bind entry needs port: the bridge port of one agent, such as \
                     {port: veth-agent1, sources: [\"10.88.0.2\"]}",
                    );
                    None
                }
                Some(n) => read::text(r, n, "firewall.bind port").and_then(|t| {
                    match validate::check_bind_port(t) {
                        Err(e) => {
                            r.error(n.pos, format!("{what}: {e}"));
                            None
                        }
                        Ok(()) => match ports.get(t) {
                            Some(first) => {
                                r.error(
                                    n.pos,
                                    format!(
                                        "{what}: port {} is listed twice (also on line {}); list \
                                     each port once, with all its sources",
                                        quote(t),
                                        first.line
                                    ),
                                );
                                None
                            }
                            None => {
                                ports.insert(t.to_owned(), n.pos);
                                Some(t.to_owned())
                            }
                        },
                    }
                }),
            };
        let mut sources: Vec<ipnet::IpNet> = Vec::new();
        match f.get("sources") {
            None => r.error(
                f.pos,
                "a firewall.bind entry needs sources: the addresses of the agent behind the \
                 port, such as sources: [\"10.88.0.2\", \"fd88::2\"]",
            ),
            Some(n) => {
                let nets = read::cidrs(r, n, "firewall.bind sources");
                if nets.is_empty() && r.error_count() == errors_before {
                    r.error(
                        n.pos,
                        "firewall.bind sources is empty; list the addresses of the agent behind \
                         the port, such as [\"10.88.0.2\", \"fd88::2\"]",
                    );
                }
                if nets.len() > validate::MAX_BIND_SOURCES {
                    r.error(
                        n.pos,
                        format!(
                            "firewall.bind sources lists {} entries, more than {}; list networks \
                             instead of single addresses",
                            nets.len(),
                            validate::MAX_BIND_SOURCES
                        ),
                    );
                }
                let name = port.clone().unwrap_or_default();
                for (pos, net) in nets {
                    if let Err(e) = validate::check_bind_source(&net) {
                        r.error(pos, format!("{what}: {e}"));
                        continue;
                    }
                    if let Some((other, owner, at)) = owners
                        .iter()
                        .find(|(o, ..)| o.contains(&net.network()) || net.contains(&o.network()))
                    {
                        let message = if *owner == name {
                            format!(
                                "{what}: source \"{net}\" overlaps \"{other}\" (line {}) of the \
                                 same port; list each address once",
                                at.line
                            )
                        } else {
                            format!(
                                "{what}: source \"{net}\" overlaps \"{other}\" of port {} (line \
                                 {}): each address belongs to one port, or the two agents can \
                                 take each other's; give each port its own addresses",
                                quote(owner),
                                at.line
                            )
                        };
                        r.error(pos, message);
                        continue;
                    }
                    owners.push((net, name.clone(), pos));
                    sources.push(net);
                }
            }
        }
        if let (Some(port), true) = (port, r.error_count() == errors_before) {
            out.push(PortBinding { port, sources });
        }
    }
    out
}

/// `firewall.contain`: each entry checked where it is written; what concerns the whole (no
/// one named, a hook with nothing to match) is `validate`'s, reported at `contain`. After an
/// entry's error it is `None`, so the whole is not judged on what is left.
fn contain(r: &mut Report, node: &Node, output_hook: bool) -> Option<Contain> {
    let errors_before = r.error_count();
    let c = contain_entries(r, node, output_hook)?;
    (r.error_count() == errors_before).then_some(c)
}

fn contain_entries(r: &mut Report, node: &Node, output_hook: bool) -> Option<Contain> {
    let f = read::fields(r, node, "firewall.contain", CONTAIN_KEYS)?;
    let mut c = Contain::default();
    if let Some(n) = f.get("uids") {
        c.uids = ids(r, n, "firewall.contain.uids");
    }
    if let Some(n) = f.get("gids") {
        c.gids = ids(r, n, "firewall.contain.gids");
        if !c.gids.is_empty() && c.uids.is_empty() {
            r.warn(
                n.pos,
                "firewall.contain.gids without uids: a gid matches the socket owner's primary \
                 group only (meta skgid), so a user whose primary group is another one (the \
                 listed group among its supplementary groups) is not contained, and one who \
                 can switch its primary group (sg, newgrp) steps out; list the agents' uids \
                 (or contain them by cgroups), and keep gids for users whose primary group \
                 you control",
            );
        }
    }
    if let Some(n) = f.get("cgroups") {
        c.cgroups = texts(
            r,
            n,
            "firewall.contain.cgroups",
            validate::check_cgroup_path,
        );
        if !c.cgroups.is_empty() && c.uids.is_empty() {
            r.warn(
                n.pos,
                "firewall.contain.cgroups without uids: a cgroup holds only the processes \
                 started in it, and the agent's user can start others elsewhere (cron, at, \
                 systemd-run --user, ssh localhost) or move itself into a cgroup it may \
                 write (a delegated one under user@UID.service), uncontained; add the \
                 agent's uid to firewall.contain.uids",
            );
        }
    }
    if let Some(n) = f.get("subids_from")
        && let Some(dir) = read::text(r, n, "firewall.contain.subids_from")
    {
        if dir.starts_with('/') && !dir.contains('\0') {
            c.subids_from = Some(std::path::PathBuf::from(dir));
        } else {
            r.error(
                n.pos,
                format!(
                    "firewall.contain.subids_from must be an absolute directory (where \
                     subuid and subgid are, /etc by default), found {}",
                    quote(dir)
                ),
            );
        }
    }
    if let Some(n) = f.get("interfaces") {
        c.interfaces = texts(r, n, "firewall.contain.interfaces", |t| {
            validate::check_interface_name(t).map(|()| t.to_string())
        });
    }
    if let Some(n) = f.get("sources") {
        let mut seen: HashMap<ipnet::IpNet, Pos> = HashMap::new();
        for (pos, net) in read::cidrs(r, n, "firewall.contain.sources") {
            if let Some(first) = seen.insert(net, pos) {
                r.error(
                    pos,
                    format!(
                        "firewall.contain.sources: \"{net}\" is listed twice (also on line {}); \
                         remove one",
                        first.line
                    ),
                );
            } else {
                c.sources.push(net);
            }
        }
    }
    if let Some(n) = f.get("host_dns") {
        let what = "firewall.contain.host_dns";
        let options = [("dnsfence", HostDns::Dnsfence), ("direct", HostDns::Direct)];
        if let Some(v) = read::choice(r, n, what, &options) {
            c.host_dns = v;
            if !output_hook {
                r.warn(
                    n.pos,
                    format!(
                        "{what} has no effect without output in firewall.hooks (it filters \
                         the DNS of processes on this host); remove it or add output"
                    ),
                );
            }
        }
    }
    Some(c)
}

/// A list of uids or gids (0 to 4294967294), each once.
fn ids(r: &mut Report, node: &Node, what: &str) -> Vec<u32> {
    let Some(items) = read::list(r, node, what) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut seen: HashMap<u32, Pos> = HashMap::new();
    for item in items {
        let Some(n) = read::integer(r, item, what, 0, u64::from(u32::MAX - 1)) else {
            continue;
        };
        let Ok(id) = u32::try_from(n) else { continue };
        if let Some(first) = seen.insert(id, item.pos) {
            r.error(
                item.pos,
                format!(
                    "{what}: {id} is listed twice (also on line {}); remove one",
                    first.line
                ),
            );
        } else {
            out.push(id);
        }
    }
    out
}

/// A list of strings, each checked (and normalized) by `check`, each once.
fn texts(
    r: &mut Report,
    node: &Node,
    what: &str,
    check: impl Fn(&str) -> Result<String, String>,
) -> Vec<String> {
    let Some(items) = read::list(r, node, what) else {
        return Vec::new();
    };
    let mut out: Vec<String> = Vec::new();
    let mut seen: HashMap<String, Pos> = HashMap::new();
    for item in items {
        let Some(text) = read::text(r, item, what) else {
            continue;
        };
        match check(text) {
            Err(e) => r.error(item.pos, format!("{what}: {e}")),
            Ok(value) => {
                if let Some(first) = seen.insert(value.clone(), item.pos) {
                    r.error(
                        item.pos,
                        format!(
                            "{what}: {} is listed twice (also on line {}); remove one",
                            quote(text),
                            first.line
                        ),
                    );
                } else {
                    out.push(value);
                }
            }
        }
    }
    out
}

/// `firewall.inbound`: ports outside hosts may open connections to, as `"8080/tcp"`.
fn inbound(r: &mut Report, node: &Node) -> Vec<InboundPort> {
    let what = "firewall.inbound";
    let Some(items) = read::list(r, node, what) else {
        return Vec::new();
    };
    let mut ports = Vec::new();
    let mut seen: HashMap<InboundPort, Pos> = HashMap::new();
    for item in items {
        let Some(text) = read::text(r, item, "a firewall.inbound entry") else {
            continue;
        };
        let Some(port) = parse_inbound(text) else {
            r.error(
                item.pos,
                format!(
                    "{what} entry {} is not a port; write a port from 1 to 65535 and its \
                     protocol, such as \"8080/tcp\" or \"5000/udp\"",
                    quote(text)
                ),
            );
            continue;
        };
        if let Some(first) = seen.insert(port, item.pos) {
            r.error(
                item.pos,
                format!(
                    "{what}: {} is listed twice (also on line {}); remove one",
                    quote(text),
                    first.line
                ),
            );
        } else {
            ports.push(port);
        }
    }
    ports
}

fn parse_inbound(text: &str) -> Option<InboundPort> {
    let (port, proto) = text.split_once('/')?;
    let transport = match proto {
        "tcp" => Transport::Tcp,
        "udp" => Transport::Udp,
        _ => return None,
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.starts_with('0') {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    Some(InboundPort { port, transport })
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
