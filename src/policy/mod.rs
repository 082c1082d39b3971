//! The policy: which names may be resolved, by whom, and what the firewall admits.
//!
//! [`Policy::load`] reads a YAML file, validates all of it and reports every error with its
//! file, line and column. Everything after loading works on these validated types only.
//!
//! The loader is a pipeline of small steps, one file each:
//! - `raw`: YAML text to a tree of nodes that know their line and column (serde-saphyr);
//! - `schema`: the keys, their defaults and checks, one file per section of the policy, reading
//!   through `read` (typed readers), `name` (allow rules, IDNA), `net` (addresses), `duration`;
//! - `lint`: warnings for policies that load but are probably unsafe;
//! - `matcher`: the trie that answers "which rule allows this wire name" at run time.
//!
//! Why so much checking: the policy is the security boundary for agents that may try to leak
//! data through DNS. A rule that is silently broader than it reads (`*.com`, a `*` in the
//! wrong place, a Unicode look-alike) is worse than a policy that refuses to load.

mod control;
mod diagnostic;
mod duration;
mod lint;
mod matcher;
mod name;
mod net;
mod raw;
mod read;
mod schema;
#[cfg(test)]
mod tests;
mod validate;

pub use control::{
    ConnectionsOnRevoke, ControlPolicy, DEFAULT_CONTROL_SOCKET, GrantPolicy, RevokePolicy,
};
pub use diagnostic::{Diagnostic, PolicyError};
pub use lint::MULTI_TENANT_SUFFIXES;
pub use matcher::{RuleSet, RuleSetError};
pub use schema::check_table_name;
pub use validate::{
    MAX_ADDRESSES_PER_ANSWER, MAX_BIND_PORTS, MAX_BIND_SOURCES, MAX_CGROUP_DEPTH, MAX_LIFETIME,
    Problem, check_bind_port, check_bind_source, check_cgroup_path, check_interface_name,
    firewall_problems, limits_problems, ttl_problems, upstream_timeout_problems,
};

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use hickory_proto::rr::RecordType;
use ipnet::{IpNet, Ipv6Net};

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The file it was read from (for messages).
    pub source: PathBuf,
    /// Addresses to serve DNS on, UDP and TCP on each.
    pub listen: Vec<SocketAddr>,
    /// Trusted resolvers, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// How long one query may wait for the upstreams in all before the client gets SERVFAIL.
    pub upstream_timeout: Duration,
    /// How the upstreams are chosen and reached.
    pub upstream_options: UpstreamOptions,
    /// What a denied query is answered with.
    pub deny_with: DenyWith,
    /// Query types that may be forwarded for allowed names.
    pub qtypes: Vec<RecordType>,
    /// The allowlist of clients that belong to no group.
    pub default_group: Group,
    /// Client groups by source address; the first group whose `from` matches wins.
    pub clients: Vec<Group>,
    /// Where the query log goes.
    pub log: LogTarget,
    /// Lifetimes of admitted addresses.
    pub ttl: TtlPolicy,
    /// The nftables side.
    pub firewall: FirewallPolicy,
    /// Answer addresses never returned nor admitted, *in addition to* the built-in private and
    /// special-purpose ranges the pipeline always refuses (this list holds only what the
    /// policy file adds). It wins over every `allow_answers`.
    pub deny_answers: Vec<IpNet>,
    /// The operator's NAT64 /96 prefixes, in addition to the well-known `64:ff9b::/96` and the
    /// local-use `64:ff9b:1::/48`: an answer inside one is judged by the IPv4 address it embeds.
    pub nat64_prefixes: Vec<Ipv6Net>,
    /// Whether every name of a CNAME chain must itself be allowed.
    pub cname: CnameMode,
    /// What happens to `ipv4hint`/`ipv6hint` in HTTPS/SVCB answers.
    pub https_hints: HintMode,
    pub limits: Limits,
    /// Limits on names that matched a wildcard rule (`*.` or `**.`).
    pub exfiltration: ExfiltrationLimits,
    /// Whether denials are enforced, or (until a set time) only logged.
    pub mode: Mode,
    /// The Prometheus and health endpoint; `None` (the default) when off.
    pub metrics: Option<MetricsPolicy>,
    /// The control socket (`dnsfence ctl`).
    pub control: ControlPolicy,
    /// What revocation does to open connections.
    pub revoke: RevokePolicy,
    /// Limits of temporary grants.
    pub grants: GrantPolicy,
    /// Lint findings that did not stop the load; each prints as `FILE:LINE:COLUMN: message`.
    pub warnings: Vec<Diagnostic>,
}

impl Policy {
    /// Reads and validates a policy file. The error lists every problem found.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let bytes = std::fs::read(path).map_err(|e| PolicyError {
            source: path.to_path_buf(),
            errors: vec![Diagnostic {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                message: format!(
                    "cannot read the policy file: {e}; check the path and its permissions"
                ),
            }],
            read_error: Some(e.kind()),
        })?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let before = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let column = before
                .rsplit(|&b| b == b'\n')
                .next()
                .map_or(0, |l| String::from_utf8_lossy(l).chars().count())
                + 1;
            PolicyError {
                source: path.to_path_buf(),
                errors: vec![Diagnostic {
                    file: path.to_path_buf(),
                    line,
                    column,
                    message: "the file is not valid UTF-8; save it as UTF-8".into(),
                }],
                read_error: None,
            }
        })?;
        Policy::parse(&text, path)
    }

    /// Validates policy text; `source` names the file in messages.
    pub fn parse(text: &str, source: &Path) -> Result<Policy, PolicyError> {
        let mut report = diagnostic::Report::new(source);
        let policy = match raw::parse(text) {
            Ok(root) => schema::build(&root, source, &mut report),
            Err((pos, message)) => {
                report.error(pos, message);
                None
            }
        };
        let (errors, warnings) = report.finish();
        match policy {
            Some(mut policy) if errors.is_empty() => {
                policy.warnings = warnings;
                Ok(policy)
            }
            _ => Err(PolicyError {
                source: source.to_path_buf(),
                errors,
                read_error: None,
            }),
        }
    }

    /// The group for a client: the first client group whose `from` contains the address, else
    /// the default group. An IPv4-mapped IPv6 client (`::ffff:a.b.c.d`, as seen on a dual-stack
    /// socket) is matched as its IPv4 address.
    pub fn group_for(&self, client: IpAddr) -> &Group {
        let client = client.to_canonical();
        self.clients
            .iter()
            .find(|g| g.from.iter().any(|net| net.contains(&client)))
            .unwrap_or(&self.default_group)
    }

    /// Every group: the default group first, then the client groups in order.
    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        std::iter::once(&self.default_group).chain(self.clients.iter())
    }
}

/// How the upstreams are chosen and reached, beyond their addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamOptions {
    /// `upstream_order`.
    pub order: UpstreamOrder,
    /// Upstreams written `tcp://` or `tls://` in `upstreams`, by address; the others are asked
    /// over UDP (and over TCP when they truncate).
    pub transports: Vec<(SocketAddr, UpstreamTransport)>,
    /// `upstream_tls_ca`: a PEM file of CA certificates trusted for `tls://` upstreams besides
    /// the built-in public roots.
    pub tls_ca: Option<PathBuf>,
}

impl UpstreamOptions {
    /// How the upstream at `addr` is reached.
    pub fn transport(&self, addr: SocketAddr) -> UpstreamTransport {
        self.transports
            .iter()
            .find(|(a, _)| *a == addr)
            .map(|(_, t)| t.clone())
            .unwrap_or(UpstreamTransport::Udp)
    }
}

/// How an upstream is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTransport {
    /// UDP, and TCP for truncated answers (`"9.9.9.9:53"`).
    Udp,
    /// TCP only (`"tcp://10.0.0.53:53"`).
    Tcp,
    /// DNS over TLS, the certificate checked against `name` (`"tls://9.9.9.9:853#dns.quad9.net"`).
    Tls { name: String },
}

/// Which upstream a question goes to first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamOrder {
    /// The upstream that is up and has answered fastest lately.
    #[default]
    Fastest,
    /// The first upstream in the policy's order that is up.
    Strict,
}

/// Enforce the policy, or audit it: forward (and admit) what it would deny for `policy`,
/// `qtype` or `exfiltration-budget`, log it as an audited denial, and enforce from `until` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Enforce,
    Audit {
        until: SystemTime,
    },
}

impl Mode {
    /// Whether denials are only audited at `now`.
    pub fn audits_at(self, now: SystemTime) -> bool {
        matches!(self, Mode::Audit { until } if now < until)
    }
}

/// Where the metrics and health endpoint listens (always a loopback address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsPolicy {
    pub listen: SocketAddr,
    /// Label query counters with the client address (unbounded: only when asked for).
    pub client_labels: bool,
}

/// How CNAME chains in answers are judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CnameMode {
    /// Only the question's name must be allowed; the chain it points to is followed.
    #[default]
    Follow,
    /// Every name of the chain must be allowed too.
    Strict,
}

/// What to do with address hints in HTTPS/SVCB answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HintMode {
    /// Admit the hinted addresses like A/AAAA answers.
    #[default]
    Admit,
    /// Remove `ipv4hint`/`ipv6hint` from the answer.
    Strip,
}

/// Resource limits of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Queries being resolved at once (>= 1).
    pub max_inflight: usize,
    /// Queries of one client being resolved at once (1..=`max_inflight`), so that one agent or
    /// one slow zone cannot take every slot; the client is keyed as the budgets key it.
    pub max_inflight_per_client: usize,
    /// Per-client queries per second (token bucket refill); 0 turns the limit off.
    pub client_qps: u32,
    /// Per-client bucket size (>= 1 when `client_qps` is on).
    pub client_burst: u32,
    /// Open TCP connections (>= 1).
    pub tcp_connections: usize,
    /// Open TCP connections of one client (>= 1; capped by `tcp_connections`), so one agent
    /// cannot take every slot.
    pub tcp_connections_per_client: usize,
    /// A TCP connection with no request for this long is closed (> 0).
    pub tcp_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_inflight: 1024,
            max_inflight_per_client: 64,
            client_qps: 200,
            client_burst: 400,
            tcp_connections: 256,
            tcp_connections_per_client: 64,
            tcp_idle_timeout: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// The default `max_inflight_per_client`: a quarter of `max_inflight`, at least 1 and at
    /// most 64 (so the default 1,024 slots are shared by at least 16 busy clients).
    pub fn default_inflight_share(max_inflight: usize) -> usize {
        (max_inflight / 4).clamp(1, 64)
    }
}

/// Limits on names that matched a wildcard rule, where the left labels are chosen by the
/// client and can carry data out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExfiltrationLimits {
    /// Octets of the presentation name without the trailing dot (1..=253).
    pub max_name_length: usize,
    /// Octets of any one label (1..=63).
    pub max_label_length: usize,
    /// Distinct names per (client, wildcard rule) per minute; 0 turns the limit off.
    pub wildcard_names_per_minute: u32,
}

impl Default for ExfiltrationLimits {
    fn default() -> Self {
        ExfiltrationLimits {
            max_name_length: 120,
            max_label_length: 40,
            wildcard_names_per_minute: 60,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyWith {
    NxDomain,
    Refused,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    File(PathBuf),
}

/// A named allowlist: the default group (name "default", `from` empty) or a client group.
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub from: Vec<IpNet>,
    pub rules: RuleSet,
    /// Private or internal networks that answers for this group may contain (DNS-rebinding
    /// protection refuses them otherwise). Rules may add their own.
    pub allow_answers: Vec<IpNet>,
}

/// How a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleKind {
    /// `api.example.com`: exactly this name.
    Exact,
    /// `*.example.com`: exactly one label below it, never the apex.
    OneLabel,
    /// `**.example.com`: any depth below it, never the apex.
    AnyDepth,
}

/// One allow rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The rule as it is matched, lower-case A-labels, no trailing dot, with its `*.`/`**.`
    /// prefix: this is what logs and `explain` show.
    pub pattern: String,
    pub kind: RuleKind,
    /// Line of the rule in the policy file (1-based; 0 if not from a file).
    pub line: usize,
    /// Column of the rule's name in the policy file (1-based; 0 if not from a file).
    pub column: usize,
    /// Private or internal networks that answers for names of this rule may contain, in
    /// addition to the group's `allow_answers`.
    pub allow_answers: Vec<IpNet>,
}

/// Lifetimes of admitted addresses: `clamp(ttl, min, max) + grace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlPolicy {
    pub min: Duration,
    pub max: Duration,
    pub grace: Duration,
}

impl Default for TtlPolicy {
    fn default() -> Self {
        TtlPolicy {
            min: Duration::from_secs(30),
            max: Duration::from_secs(3600),
            grace: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Output,
    Forward,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExit {
    Keep,
    Remove,
}

#[derive(Debug, Clone)]
pub struct FirewallPolicy {
    pub enabled: bool,
    /// nftables table name (family inet).
    pub table: String,
    pub hooks: Vec<Hook>,
    /// Static destinations always allowed.
    pub allow_cidrs: Vec<IpNet>,
    pub per_client: bool,
    /// Drops are logged (rate-limited): to the kernel log, or with `nflog_group` to that
    /// NFLOG group, which dnsfence reads itself to explain each drop.
    pub log_denied: bool,
    /// `log_denied: nflog`: the NFLOG group the drop rules log to (`firewall.nflog_group`,
    /// default 0), read by dnsfence.
    pub nflog_group: Option<u16>,
    pub on_exit: OnExit,
    /// Maximum number of elements in each allow set.
    pub set_size: u32,
    /// Socket mark dnsfence puts on its own upstream queries, so the ruleset can tell them apart
    /// from an agent's (setting a mark needs CAP_NET_ADMIN).
    pub mark: u32,
    /// Ports that outside hosts may open connections to on an agent (`"8080/tcp"`); empty by
    /// default, so nothing from outside reaches a non-root listener.
    pub inbound: Vec<InboundPort>,
    /// The most addresses of each family that one answer may have admitted (and returned);
    /// the rest are removed from the reply, so one zone cannot fill a set (1..=4096). Use
    /// [`FirewallPolicy::addresses_per_answer`], which also respects a smaller set.
    pub max_addresses_per_answer: u32,
    /// With `per_client`, the most elements of each allow set that belong to one client, so
    /// one client cannot fill a set for the others; `None`: the default share. Use
    /// [`FirewallPolicy::elements_per_client`].
    pub max_elements_per_client: Option<u32>,
    /// Who the firewall contains (`firewall.contain`); `None`: every process and every packet
    /// the hooks see, as before `contain` existed.
    pub contain: Option<Contain>,
    /// `firewall.bind`: bridge ports whose frames may carry only their own source addresses
    /// (a `bridge`-family table named like the main one); ports not listed are untouched.
    pub bind: Vec<PortBinding>,
}

/// One entry of `firewall.bind`: a bridge port (the host-side interface of one agent) and
/// the addresses the agent behind it may send from. Frames entering the bridge from this port
/// with another IPv4/IPv6 source, an ARP sender address or an IPv6 neighbour advertisement
/// for another address are dropped, so agents on one bridge cannot take each other's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortBinding {
    /// The port's interface name (exactly one port, no wildcard).
    pub port: String,
    /// The agent's own addresses (or networks), IPv4 and IPv6; one family may be absent (the
    /// port then sends none of it, but IPv6 link-local neighbour discovery).
    pub sources: Vec<IpNet>,
}

/// `firewall.contain`: the agents. Only their traffic meets the default-drop rules; the rest
/// passes to the host's own firewall untouched. Processes on this host are told apart by the
/// owner of their socket (`uids`, `gids`, `cgroups`: the `output` hook), agents routed through
/// this host by where their packets come from (`interfaces`, `sources`: `forward`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contain {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    /// cgroup v2 paths relative to the cgroup2 mount, without leading or trailing `/`
    /// (`system.slice/agent.service`); a socket in the cgroup or below it is contained.
    pub cgroups: Vec<String>,
    /// Interface names, an optional trailing `*` matching every name with that prefix.
    pub interfaces: Vec<String>,
    pub sources: Vec<IpNet>,
    /// Where `subuid` and `subgid` are read (the ranges `newuidmap`/`newgidmap` grant the
    /// contained uids, which their user namespaces' sockets are owned by); `None`: `/etc`.
    pub subids_from: Option<std::path::PathBuf>,
    /// Where the host's own (uncontained) DNS may go; only the `output` hook sees it.
    pub host_dns: HostDns,
}

/// `firewall.contain.host_dns`: where the DNS of the processes `contain` leaves alone may go.
///
/// A resolver on the host (systemd-resolved, nscd, dnsmasq) answers anyone who asks it, a
/// contained agent too (through NSS, D-Bus, varlink or a loopback port that is not 53), and
/// sends the question on as an uncontained process: a denied name would leave the host, a
/// channel for data in names. [`HostDns::Dnsfence`] closes it by letting the host's DNS go
/// to dnsfence only, so every relay on the host has to ask dnsfence (and its policy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HostDns {
    /// DNS (UDP/TCP 53, DNS over TLS or QUIC on 853) of every process on the host that leaves
    /// through an interface other than `lo` goes to dnsfence's listen addresses or nowhere
    /// (dnsfence's own marked upstream queries excepted). The default: without `contain`, the
    /// host's DNS never had another way out either.
    #[default]
    Dnsfence,
    /// The host's own DNS goes wherever it is sent; a relay on the host can carry a contained
    /// agent's names out (the start-up line warns when it finds one).
    Direct,
}

impl HostDns {
    /// The word the policy writes.
    pub fn as_str(self) -> &'static str {
        match self {
            HostDns::Dnsfence => "dnsfence",
            HostDns::Direct => "direct",
        }
    }
}

impl Contain {
    /// Names processes on this host (the `output` hook can match them).
    pub fn names_local_processes(&self) -> bool {
        !self.uids.is_empty() || !self.gids.is_empty() || !self.cgroups.is_empty()
    }

    /// Names agents routed through this host (the `forward` hook can match them).
    pub fn names_routed_agents(&self) -> bool {
        !self.interfaces.is_empty() || !self.sources.is_empty()
    }

    /// One line for logs: `uids 1000,1001; interfaces veth*`.
    pub fn summary(&self) -> String {
        fn list<T: std::fmt::Display>(name: &str, items: &[T]) -> Option<String> {
            (!items.is_empty()).then(|| {
                let items: Vec<String> = items.iter().map(T::to_string).collect();
                format!("{name} {}", items.join(","))
            })
        }
        [
            list("uids", &self.uids),
            list("gids", &self.gids),
            list("cgroups", &self.cgroups),
            list("interfaces", &self.interfaces),
            list("sources", &self.sources),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("; ")
    }
}

impl FirewallPolicy {
    /// The answer quota in effect: `max_addresses_per_answer`, never more than the set holds.
    pub fn addresses_per_answer(&self) -> u32 {
        self.max_addresses_per_answer.min(self.set_size)
    }

    /// One client's share of each allow set: `max_elements_per_client`, or by default a
    /// sixteenth of the set (4,096 of the default 65,536), never less than one whole answer,
    /// never more than the set.
    pub fn elements_per_client(&self) -> u32 {
        self.max_elements_per_client.unwrap_or_else(|| {
            (self.set_size / 16)
                .max(self.addresses_per_answer())
                .min(self.set_size)
        })
    }
}

/// A port outside hosts may connect to (`firewall.inbound`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InboundPort {
    pub port: u16,
    pub transport: Transport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transport {
    Tcp,
    Udp,
}

/// Defaults when the `firewall` section or one of its keys is absent. Enabled unless the policy
/// says otherwise: a policy that forgets the section must not silently drop containment.
impl Default for FirewallPolicy {
    fn default() -> Self {
        FirewallPolicy {
            enabled: true,
            table: "dnsfence".into(),
            hooks: vec![Hook::Output],
            allow_cidrs: Vec::new(),
            per_client: false,
            log_denied: true,
            nflog_group: None,
            on_exit: OnExit::Keep,
            set_size: 65536,
            mark: 0x0d5f,
            inbound: Vec::new(),
            max_addresses_per_answer: 32,
            max_elements_per_client: None,
            contain: None,
            bind: Vec::new(),
        }
    }
}
