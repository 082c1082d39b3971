//! The firewall end to end, in real network namespaces: the real binary in a gateway namespace,
//! real agents behind it, a real "internet" beyond it, and the kernel's own verdicts.
//!
//! Every test asserts with real connections (a dropped SYN is a connect timeout, and the
//! services in `inet` record what reached them) and, where it applies, with the kernel's set
//! contents (`nft -j list set`). Each test owns its namespaces, so they run in parallel.
//!
//! The `harness_*` tests check the harness itself without dnsfence (topology, AnyIP, drop
//! detection against a hand-written ruleset, set parsing, cleanup): when a dnsfence test fails,
//! they tell a broken harness from a broken firewall.

mod common;

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::netns::*;
use common::{addresses, query, require_root, require_tool, sa};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

/// dnsfence's firewall mark (0x0d5f), written in decimal in the policies.
const MARK: u32 = 0x0d5f;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A policy for the lab: the contract's keys, with the values a test changes.
struct Spec {
    table: String,
    allow: Vec<String>,
    clients: Option<String>,
    ttl: String,
    per_client: bool,
    set_size: u32,
    on_exit: &'static str,
    /// More top-level YAML, verbatim.
    extra: String,
}

impl Spec {
    fn new(lab: &Lab, allow: &[&str]) -> Spec {
        Spec {
            table: lab.table(),
            allow: allow.iter().map(|s| (*s).to_owned()).collect(),
            clients: None,
            ttl: "{min: 30s, max: 3600s, grace: 30s}".to_owned(),
            per_client: false,
            set_size: 65536,
            on_exit: "remove",
            extra: String::new(),
        }
    }

    fn yaml(&self) -> String {
        let allow: String = self
            .allow
            .iter()
            .map(|r| format!("  - \"{r}\"\n"))
            .collect();
        let clients = self
            .clients
            .as_ref()
            .map(|c| format!("clients:\n{c}"))
            .unwrap_or_default();
        format!(
            "listen: [\"10.77.0.1:53\"]
upstreams: [\"{upstream}\"]
upstream_timeout: 2s
allow:
{allow}qtypes: [A, AAAA, CNAME, HTTPS]
{clients}log: \"-\"
ttl: {ttl}
firewall:
  enabled: true
  table: {table}
  hooks: [output, forward]
  allow_cidrs: []
  per_client: {per_client}
  log_denied: true
  on_exit: {on_exit}
  set_size: {set_size}
  mark: {MARK}
{extra}",
            upstream = addr::UPSTREAM,
            ttl = self.ttl,
            table = self.table,
            per_client = self.per_client,
            on_exit = self.on_exit,
            set_size = self.set_size,
            extra = self.extra,
        )
    }
}

/// Asserts every reply is NOERROR with exactly `want` as addresses.
fn assert_answer(reply: &hickory_proto::op::Message, want: &[&str], what: &str) {
    assert_eq!(
        reply.metadata.response_code,
        ResponseCode::NoError,
        "{what}: {reply:?}"
    );
    let mut got = addresses(reply);
    got.sort();
    let mut want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    assert_eq!(got, want, "{what}");
}

fn assert_all_connected(host: &Host<'_>, targets: &[SocketAddr], what: &str) {
    let results = host.probe_all(targets, CONNECT_OK);
    let bad: Vec<_> = targets
        .iter()
        .zip(&results)
        .filter(|(_, r)| **r != Reach::Connected)
        .collect();
    assert!(bad.is_empty(), "{what}: not connected: {bad:?}");
}

fn assert_all_blocked(lab: &Lab, host: &Host<'_>, targets: &[SocketAddr], what: &str) {
    let results = host.probe_all(targets, BLOCKED_AFTER);
    let bad: Vec<_> = targets
        .iter()
        .zip(&results)
        .filter(|(_, r)| !r.is_blocked())
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: reached: {bad:?}\nruleset:\n{}",
        lab.ruleset()
    );
}

/// Runs `argv` on the gateway as uid/gid 65534 with no groups, killed after `limit`; returns
/// (exit code, stdout and stderr).
fn as_nobody(lab: &Lab, limit: Duration, argv: &[&str]) -> (i32, String) {
    let mut all = vec![
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    // `exec` checks setpriv; the program under it is checked here.
    require_tool(argv[0]);
    all.extend_from_slice(argv);
    let out = lab.gw.exec(limit, &all);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `bash -c 'exec 3<>/dev/tcp/<ip>/<port>'` as nobody on the gateway: exit 0 when it connects.
fn nobody_tcp(lab: &Lab, ip: &str, port: u16) -> i32 {
    let script = format!("exec 3<>/dev/tcp/{ip}/{port}");
    // Generous: under a loaded CI machine starting setpriv and bash alone can take a second.
    as_nobody(lab, Duration::from_secs(4), &["bash", "-c", &script]).0
}

/// Polls `set` until no element has key `key` (at most `limit`); returns whether it went.
fn wait_gone(lab: &Lab, set: &str, key: &[&str], limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !has_elem(&lab.set_elements(set), key) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

// =============================================================================================
// The harness on its own
// =============================================================================================

#[test]
fn harness_topology_routes_agents_and_the_gateway_to_every_internet_address_and_cleans_up() {
    if !require_root("harness topology") {
        return;
    }
    let lab = Lab::new("harness_topo");
    lab.upstream.a("api.allowed.test", "198.51.100.10", 300);
    lab.other_dns4.a("api.allowed.test", "198.51.100.12", 300);
    lab.other_dns6.a("api.allowed.test", "198.51.100.13", 300);
    assert_eq!(lab.gw.read_sysctl("net.ipv4.ip_forward"), "1");
    assert_eq!(lab.gw.read_sysctl("net.ipv6.conf.all.forwarding"), "1");

    // Without a firewall everything is reachable from both agents and the gateway: the drops
    // the dnsfence tests see are the firewall's doing, not the topology's.
    let everything = [
        sa("198.51.100.10", 80),
        sa("198.51.100.66", 80),
        sa("203.0.113.9", 853),
        sa("198.51.100.99", 53),
        sa("198.51.100.53", 53),
        sa("2001:db8:100::1234", 80),
        sa("2001:db8:100::99", 53),
        sa("2001:db8:100::66", 443),
    ];
    for host in [lab.a1(), lab.a2(), lab.gw_host()] {
        assert_all_connected(&host, &everything, host.ns.name());
        let udp = host.udp_all(
            &[sa("198.51.100.66", 443), sa("2001:db8:100::66", 443)],
            Duration::from_secs(2),
        );
        assert!(udp.iter().all(|r| *r == UdpReach::Replied), "{udp:?}");
    }
    let a1 = lab.a1();
    // The services saw the addresses that were dialled and who dialled them.
    assert!(
        lab.services.hits().iter().any(|h| h.tcp
            && h.local == sa("2001:db8:100::1234", 80)
            && h.peer.ip() == ip("fd77::2")),
        "{:?}",
        lab.services.hits()
    );
    assert!(
        lab.services
            .hits_from(ip("10.78.0.2"))
            .iter()
            .any(|h| h.local == sa("198.51.100.66", 80))
    );
    // A closed port answers RST (Refused, not blocked); an unroutable address is unreachable.
    assert_eq!(
        a1.probe(sa("198.51.100.10", 81), CONNECT_OK),
        Reach::Refused
    );
    let unroutable = a1.probe(sa("192.0.2.200", 80), Duration::from_secs(2));
    assert!(unroutable.is_blocked(), "{unroutable:?}");
    // Echo on a held connection, and the DNS servers answer agents directly.
    let mut stream = a1.open(sa("198.51.100.10", 80));
    echo(&mut stream, b"hello").unwrap();
    for (server, want) in [
        (addr::UPSTREAM, "198.51.100.10"),
        (addr::OTHER_DNS4, "198.51.100.12"),
        (addr::OTHER_DNS6, "198.51.100.13"),
    ] {
        for tcp in [false, true] {
            let reply = a1
                .try_resolve(addr::sa(server), "api.allowed.test", RecordType::A, tcp)
                .unwrap();
            assert_answer(&reply, &[want], server);
        }
    }
    assert!(
        lab.upstream
            .seen()
            .iter()
            .all(|q| q.peer.ip() == ip("10.77.0.2"))
    );
    // dig as an unprivileged user on the gateway works too.
    let (code, out) = as_nobody(
        &lab,
        Duration::from_secs(5),
        &[
            "dig",
            "@198.51.100.53",
            "+time=1",
            "+tries=1",
            "+short",
            "api.allowed.test",
            "A",
        ],
    );
    assert_eq!((code, out.trim()), (0, "198.51.100.10"));
    assert_eq!(nobody_tcp(&lab, "2001:db8:100::5", 80), 0);

    let names: Vec<String> = [&lab.gw, &lab.inet, &lab.agent1, &lab.agent2]
        .iter()
        .map(|ns| ns.name().to_owned())
        .collect();
    drop(stream);
    drop(lab);
    require_tool("ip");
    let listed = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(listed.status.success(), "ip netns list: {listed:?}");
    let listed = String::from_utf8_lossy(&listed.stdout);
    for name in &names {
        assert!(
            !std::path::Path::new("/run/netns").join(name).exists(),
            "{name} left behind"
        );
        assert!(!listed.contains(name.as_str()), "{name} still listed");
    }
}

#[test]
fn harness_sees_drops_expiry_and_set_elements_of_a_hand_written_ruleset() {
    if !require_root("harness ruleset") {
        return;
    }
    let lab = Lab::new("harness_nft");
    lab.upstream.a("api.allowed.test", "198.51.100.10", 300);
    let table = lab.table();
    // A stand-in for dnsfence's ruleset, just enough to exercise the harness.
    let ruleset = format!(
        "table inet {table} {{
  set allow4 {{ type ipv4_addr; flags timeout; }}
  set allow6 {{ type ipv6_addr; flags timeout; }}
  set pc4 {{ type ipv4_addr . ipv4_addr; flags timeout; }}
  chain fw_forward {{
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    ip daddr @allow4 accept
    ip6 daddr @allow6 accept
  }}
  chain fw_output {{
    type filter hook output priority 0; policy drop;
    oif lo accept
    ct state established,related accept
    meta mark {MARK} accept
    ip daddr @allow4 accept
    ip6 daddr @allow6 accept
  }}
}}
add element inet {table} allow4 {{ 198.51.100.10 timeout 6s }}
add element inet {table} allow6 {{ 2001:db8:100::10 timeout 6s }}
add element inet {table} pc4 {{ 10.77.0.2 . 198.51.100.10 timeout 1h }}
"
    );
    let file = lab.dir.path().join("ruleset.nft");
    std::fs::write(&file, ruleset).unwrap();
    let out = lab.gw.exec(
        Duration::from_secs(10),
        &["nft", "-f", file.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");
    let started = Instant::now();

    let v4 = lab.set_elements("allow4");
    assert!(
        find_elem(&v4, &["198.51.100.10"]).is_some_and(|e| e.timeout == Some(6)),
        "{v4:?}"
    );
    let pc4 = lab.set_elements("pc4");
    assert!(has_elem(&pc4, &["10.77.0.2", "198.51.100.10"]), "{pc4:?}");
    assert!(lab.try_set_elements("nosuch").is_err());

    let a1 = lab.a1();
    let mut held4 = a1.open(sa("198.51.100.10", 80));
    let mut held6 = a1.open(sa("2001:db8:100::10", 80));
    let blocked = [sa("198.51.100.66", 80), sa("2001:db8:100::66", 80)];
    let results = a1.probe_all(&blocked, BLOCKED_AFTER);
    assert_eq!(results, [Reach::TimedOut, Reach::TimedOut]);
    let udp = a1.udp_all(
        &[sa("198.51.100.66", 443), sa("2001:db8:100::66", 443)],
        BLOCKED_AFTER,
    );
    assert_eq!(udp, [UdpReach::NoReply, UdpReach::NoReply]);
    assert!(lab.services.hits_on(ip("198.51.100.66")).is_empty());

    // The gateway: unmarked traffic is dropped, marked traffic passes.
    let gw = lab.gw_host();
    let upstream = addr::sa(addr::UPSTREAM);
    let unmarked = gw.run(move || {
        dns_udp(
            upstream,
            &query("api.allowed.test", RecordType::A),
            BLOCKED_AFTER,
        )
    });
    assert!(unmarked.is_err(), "{unmarked:?}");
    let marked = gw.run(move || {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        socket.set_mark(MARK).unwrap();
        socket
            .bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)).into())
            .unwrap();
        let socket: UdpSocket = socket.into();
        dns_udp_from(
            &socket,
            upstream,
            &query("api.allowed.test", RecordType::A),
            Duration::from_secs(2),
        )
    });
    assert_answer(&marked.unwrap(), &["198.51.100.10"], "marked query");
    assert!(
        gw.probe(sa("198.51.100.66", 80), BLOCKED_AFTER)
            .is_blocked()
    );
    assert_eq!(nobody_tcp(&lab, "198.51.100.10", 80), 0);
    assert_ne!(nobody_tcp(&lab, "198.51.100.66", 80), 0);

    // Expiry: the element leaves the listing, new connections drop, held ones keep working.
    assert!(wait_gone(
        &lab,
        "allow4",
        &["198.51.100.10"],
        Duration::from_secs(12)
    ));
    assert!(wait_gone(
        &lab,
        "allow6",
        &["2001:db8:100::10"],
        Duration::from_secs(2)
    ));
    assert!(started.elapsed() >= Duration::from_millis(5500));
    let again = a1.probe_all(
        &[sa("198.51.100.10", 80), sa("2001:db8:100::10", 80)],
        BLOCKED_AFTER,
    );
    assert_eq!(again, [Reach::TimedOut, Reach::TimedOut]);
    echo(&mut held4, b"still there").unwrap();
    echo(&mut held6, b"still there").unwrap();
}

// =============================================================================================
// dnsfence
// =============================================================================================

#[test]
fn answered_address_is_reachable_immediately_1000_times() {
    if !require_root("answered_address_is_reachable_immediately_1000_times") {
        return;
    }
    let lab = Lab::new("reach");
    // 1,000 AAAA names and 100 A names for the agent, 50 AAAA names for the gateway: each a
    // distinct address, none of which is reachable before dnsfence answers it.
    let mut agent_names: Vec<(String, RecordType, IpAddr)> = Vec::new();
    for i in 0..1000u32 {
        let addr: IpAddr = format!("2001:db8:100::a:{i:x}").parse().unwrap();
        agent_names.push((format!("h{i}.deep.allowed.test"), RecordType::AAAA, addr));
    }
    for i in 1..=100u32 {
        let addr: IpAddr = format!("203.0.113.{i}").parse().unwrap();
        agent_names.push((format!("v{i}.x.deep.allowed.test"), RecordType::A, addr));
    }
    let mut gw_names: Vec<(String, RecordType, IpAddr)> = Vec::new();
    for i in 0..50u32 {
        let addr: IpAddr = format!("2001:db8:100::b:{i:x}").parse().unwrap();
        gw_names.push((format!("g{i}.deep.allowed.test"), RecordType::AAAA, addr));
    }
    for (name, _, addr) in agent_names.iter().chain(&gw_names) {
        match addr {
            IpAddr::V4(_) => lab.upstream.a(name, &addr.to_string(), 300),
            IpAddr::V6(_) => lab.upstream.aaaa(name, &addr.to_string(), 300),
        };
    }
    // Nothing is reachable before it is answered (the firewall is in place before dnsfence
    // listens).
    let mut spec = Spec::new(&lab, &["**.deep.allowed.test"]);
    // This test is about admission, not about the query rate or wildcard budgets: lift them.
    spec.extra =
        "limits: {client_qps: 0}\nexfiltration: {wildcard_names_per_minute: 0}\n".to_owned();
    lab.start_fence(&spec.yaml());
    assert_all_blocked(
        &lab,
        &lab.a1(),
        &[agent_names[0].2, agent_names[1000].2].map(|a| SocketAddr::new(a, 80)),
        "before any answer",
    );

    // Resolve and connect at once, every 10th query over TCP, every 100th connection echoes.
    fn resolve_and_connect(
        dns: SocketAddr,
        names: Vec<(String, RecordType, IpAddr)>,
    ) -> Vec<String> {
        let mut failures = Vec::new();
        for (i, (name, qtype, addr)) in names.iter().enumerate() {
            if failures.len() >= 20 {
                failures.push("… stopped after 20 failures".to_owned());
                break;
            }
            let message = query(name, *qtype);
            let reply = if i % 10 == 9 {
                dns_tcp(dns, &message, Duration::from_secs(3))
            } else {
                dns_udp(dns, &message, Duration::from_secs(3))
            };
            match reply {
                Ok(reply)
                    if reply.metadata.response_code == ResponseCode::NoError
                        && addresses(&reply) == [addr.to_string()] => {}
                Ok(reply) => {
                    failures.push(format!(
                        "{name}: {} {:?}",
                        reply.metadata.response_code,
                        addresses(&reply)
                    ));
                    continue;
                }
                Err(e) => {
                    failures.push(format!("{name}: no reply: {e}"));
                    continue;
                }
            }
            match tcp_open(SocketAddr::new(*addr, 80), CONNECT_OK) {
                Ok(mut stream) if i % 100 == 0 => {
                    if let Err(e) = echo(&mut stream, name.as_bytes()) {
                        failures.push(format!("{name} -> {addr}: echo: {e}"));
                    }
                }
                Ok(_) => {}
                Err(e) => failures.push(format!("{name} -> {addr}: connect: {e}")),
            }
        }
        failures
    }

    let dns = lab.a1().dns4;
    let work = agent_names.clone();
    let started = Instant::now();
    let failures = lab.agent1.run(move || resolve_and_connect(dns, work));
    assert!(
        failures.is_empty(),
        "agent: {} of {} failed:\n{}\nruleset:\n{}",
        failures.len(),
        agent_names.len(),
        failures.join("\n"),
        lab.ruleset()
    );
    eprintln!(
        "1,100 resolve+connect from the agent took {:?}",
        started.elapsed()
    );

    // The gateway's own processes (output hook), via 127.0.0.1:53.
    let dns = lab.gw_host().dns4;
    let work = gw_names.clone();
    let failures = lab.gw.run(move || resolve_and_connect(dns, work));
    assert!(
        failures.is_empty(),
        "gateway: {} of {} failed:\n{}",
        failures.len(),
        gw_names.len(),
        failures.join("\n")
    );

    // The kernel holds every answered address, with a lifetime of clamp(300 s) + 30 s grace.
    let v6 = lab.set_elements("allow6");
    let v4 = lab.set_elements("allow4");
    let mut missing = Vec::new();
    let mut bad_timeout = Vec::new();
    for (name, _, addr) in agent_names.iter().chain(&gw_names) {
        let elems = if addr.is_ipv4() { &v4 } else { &v6 };
        match find_elem(elems, &[&addr.to_string()]) {
            None => missing.push(format!("{name} {addr}")),
            Some(e) if !e.timeout.is_some_and(|t| (300..=331).contains(&t)) => {
                bad_timeout.push(format!("{addr}: {e:?}"));
            }
            Some(_) => {}
        }
    }
    assert!(missing.is_empty(), "not in the sets: {missing:?}");
    assert!(
        bad_timeout.is_empty(),
        "timeouts not 300..=330 s: {:?}",
        &bad_timeout[..bad_timeout.len().min(10)]
    );

    // The services saw each agent connection on its own address, from the agent.
    let hits = lab.services.hits();
    for (name, _, addr) in &agent_names {
        let from_agent = |h: &&Hit| {
            h.local == SocketAddr::new(*addr, 80)
                && (h.peer.ip() == IpAddr::from(addr::A1_4)
                    || h.peer.ip() == IpAddr::from(addr::A1_6))
        };
        assert!(
            hits.iter().any(|h| from_agent(&h)),
            "{name}: no hit on {addr}"
        );
    }
    // One allow line per query, without error.
    let total = agent_names.len() + gw_names.len();
    let log = lab.log(total);
    let allowed = log
        .iter()
        .filter(|l| l["decision"] == "allow" && l.get("error").is_none())
        .count();
    assert_eq!(allowed, total, "log lines: {}", log.len());
}

#[test]
fn unanswered_destinations_are_dropped() {
    if !require_root("unanswered_destinations_are_dropped") {
        return;
    }
    let lab = Lab::new("drop");
    lab.upstream
        .a("api.allowed.test", "198.51.100.10", 300)
        .aaaa("api.allowed.test", "2001:db8:100::10", 300)
        .a("direct.allowed.test", "198.51.100.11", 300);
    for other in [&lab.other_dns4, &lab.other_dns6] {
        other.a("direct.allowed.test", "198.51.100.12", 300);
    }
    lab.start_fence(&Spec::new(&lab, &["api.allowed.test", "direct.allowed.test"]).yaml());
    let a1 = lab.a1();

    // Control: what dnsfence answered is reachable, so the drops below are decisions.
    assert_answer(
        &a1.resolve("api.allowed.test", RecordType::A),
        &["198.51.100.10"],
        "A",
    );
    assert_answer(
        &a1.resolve6("api.allowed.test", RecordType::AAAA),
        &["2001:db8:100::10"],
        "AAAA",
    );
    assert_all_connected(
        &a1,
        &[sa("198.51.100.10", 80), sa("2001:db8:100::10", 80)],
        "answered",
    );

    // TCP from the agent: an unanswered address, another DNS server (53 and DoT 853), the
    // trusted upstream itself, over IPv4 and IPv6.
    let tcp_targets = [
        sa("198.51.100.66", 80),
        sa("198.51.100.99", 53),
        sa("198.51.100.99", 853),
        sa("198.51.100.53", 53),
        sa("203.0.113.7", 443),
        sa("2001:db8:100::66", 80),
        sa("2001:db8:100::99", 53),
        sa("2001:db8:100::99", 853),
        sa("2001:db8:100::66", 443),
    ];
    assert_all_blocked(&lab, &a1, &tcp_targets, "agent TCP");

    // UDP from the agent: DNS to another server and to the upstream get no reply; QUIC-like
    // UDP 443 gets no echo.
    let dns_targets = [
        addr::sa(addr::OTHER_DNS4),
        addr::sa(addr::OTHER_DNS6),
        addr::sa(addr::UPSTREAM),
    ];
    let replies = a1.run(move || {
        std::thread::scope(|scope| {
            let handles: Vec<_> = dns_targets
                .iter()
                .map(|&server| {
                    scope.spawn(move || {
                        let message = query("direct.allowed.test", RecordType::A);
                        dns_udp(server, &message, BLOCKED_AFTER).map(|r| addresses(&r))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        })
    });
    for (server, reply) in dns_targets.iter().zip(&replies) {
        assert!(reply.is_err(), "DNS to {server} answered: {reply:?}");
    }
    let udp = a1.udp_all(
        &[sa("198.51.100.66", 443), sa("2001:db8:100::66", 443)],
        BLOCKED_AFTER,
    );
    assert!(udp.iter().all(UdpReach::is_blocked), "UDP 443: {udp:?}");

    // Nothing the agent sent arrived anywhere but at the answered addresses.
    let answered = [ip("198.51.100.10"), ip("2001:db8:100::10")];
    for agent_ip in [IpAddr::from(addr::A1_4), IpAddr::from(addr::A1_6)] {
        let stray: Vec<_> = lab
            .services
            .hits_from(agent_ip)
            .into_iter()
            .filter(|h| !(h.tcp && answered.contains(&h.local.ip())))
            .collect();
        assert!(stray.is_empty(), "arrived from the agent: {stray:?}");
    }
    assert!(
        lab.other_dns4.seen().is_empty(),
        "{:?}",
        lab.other_dns4.seen()
    );
    assert!(
        lab.other_dns6.seen().is_empty(),
        "{:?}",
        lab.other_dns6.seen()
    );
    let from_agent: Vec<_> = lab
        .upstream
        .seen()
        .into_iter()
        .filter(|q| q.peer.ip() != IpAddr::from(addr::GW_INET4))
        .collect();
    assert!(from_agent.is_empty(), "the upstream heard: {from_agent:?}");
    assert!(lab.upstream.seen_for("direct.allowed.test").is_empty());

    // The gateway itself (output hook), as an unprivileged user: control first.
    assert_eq!(nobody_tcp(&lab, "198.51.100.10", 80), 0, "control");
    for (dest, port) in [
        ("198.51.100.66", 80),
        ("2001:db8:100::66", 80),
        ("198.51.100.53", 53),
        ("198.51.100.99", 853),
    ] {
        assert_ne!(
            nobody_tcp(&lab, dest, port),
            0,
            "nobody reached {dest}:{port}"
        );
    }
    let dig = |server: &str, tcp: bool| {
        let at = format!("@{server}");
        let mut argv = vec![
            "dig",
            at.as_str(),
            "+time=1",
            "+tries=1",
            "+short",
            "direct.allowed.test",
            "A",
        ];
        if tcp {
            argv.push("+tcp");
        }
        as_nobody(&lab, Duration::from_secs(4), &argv)
    };
    // Control: dig as nobody through dnsfence works.
    let (code, out) = dig("127.0.0.1", false);
    assert_eq!((code, out.trim()), (0, "198.51.100.11"), "dig via dnsfence");
    lab.upstream.clear_seen();
    for server in ["198.51.100.53", "198.51.100.99"] {
        for tcp in [false, true] {
            let (code, out) = dig(server, tcp);
            assert!(
                code != 0 && !out.contains("198.51.100.11") && !out.contains("198.51.100.12"),
                "dig @{server} tcp={tcp} as nobody: {code} {out}"
            );
        }
    }
    assert!(lab.upstream.seen().is_empty(), "{:?}", lab.upstream.seen());
    assert!(lab.other_dns4.seen().is_empty());

    // And as root without dnsfence's mark.
    assert_all_blocked(
        &lab,
        &lab.gw_host(),
        &[
            sa("198.51.100.66", 80),
            sa("2001:db8:100::66", 80),
            sa("198.51.100.53", 53),
        ],
        "gateway root",
    );
    let gw_ips = [IpAddr::from(addr::GW_INET4), IpAddr::from(addr::GW_INET6)];
    let stray: Vec<_> = lab
        .services
        .hits()
        .into_iter()
        .filter(|h| gw_ips.contains(&h.peer.ip()) && h.local.ip() != ip("198.51.100.10"))
        .collect();
    assert!(stray.is_empty(), "arrived from the gateway: {stray:?}");
}

#[test]
fn admission_expires_after_the_lifetime() {
    if !require_root("admission_expires_after_the_lifetime") {
        return;
    }
    let lab = Lab::new("expiry");
    lab.upstream
        .a("short.allowed.test", "198.51.100.20", 1)
        .aaaa("short.allowed.test", "2001:db8:100::20", 1);
    let mut spec = Spec::new(&lab, &["short.allowed.test"]);
    spec.ttl = "{min: 1s, max: 2s, grace: 1s}".to_owned();
    lab.start_fence(&spec.yaml());
    let a1 = lab.a1();

    let resolved = Instant::now();
    assert_answer(
        &a1.resolve("short.allowed.test", RecordType::A),
        &["198.51.100.20"],
        "A",
    );
    assert_answer(
        &a1.resolve("short.allowed.test", RecordType::AAAA),
        &["2001:db8:100::20"],
        "AAAA",
    );
    let targets = [sa("198.51.100.20", 80), sa("2001:db8:100::20", 80)];
    let mut held: Vec<_> = targets.iter().map(|&t| a1.open(t)).collect();
    for stream in &mut held {
        echo(stream, b"right after resolving").unwrap();
    }
    // Lifetime clamp(1 s, 1 s, 2 s) + 1 s grace = 2 s.
    let v4 = lab.set_elements("allow4");
    let v6 = lab.set_elements("allow6");
    for (elems, key) in [(&v4, "198.51.100.20"), (&v6, "2001:db8:100::20")] {
        let elem = find_elem(elems, &[key]).unwrap_or_else(|| panic!("{key} not in {elems:?}"));
        assert!(elem.timeout.is_some_and(|t| t <= 3), "{elem:?}");
    }

    for (set, key) in [("allow4", "198.51.100.20"), ("allow6", "2001:db8:100::20")] {
        assert!(
            wait_gone(&lab, set, &[key], Duration::from_secs(8)),
            "{key} still in {set} {:?} after resolving",
            resolved.elapsed()
        );
    }
    let left = Duration::from_secs(4).saturating_sub(resolved.elapsed());
    std::thread::sleep(left);

    // New connections drop; the ones opened in time keep working.
    assert_all_blocked(&lab, &a1, &targets, "after the lifetime");
    for stream in &mut held {
        echo(stream, b"after the lifetime").unwrap();
    }
    for target in targets {
        let hits = lab.services.hits_on(target.ip());
        assert_eq!(hits.len(), 1, "{target}: {hits:?}");
    }
}

#[test]
fn per_client_sets_isolate_agents() {
    if !require_root("per_client_sets_isolate_agents") {
        return;
    }
    let lab = Lab::new("perclient");
    lab.upstream
        .a("api.allowed.test", "198.51.100.10", 300)
        .aaaa("api.allowed.test", "2001:db8:100::10", 300)
        .a("other.allowed.test", "198.51.100.30", 300)
        .aaaa("other.allowed.test", "2001:db8:100::30", 300);
    let mut spec = Spec::new(&lab, &["api.allowed.test"]);
    spec.per_client = true;
    spec.clients = Some(
        "  - {name: agent2, from: [\"10.78.0.0/24\", \"fd78::/64\"], allow: [\"other.allowed.test\"]}\n"
            .to_owned(),
    );
    lab.start_fence(&spec.yaml());
    let (a1, a2) = (lab.a1(), lab.a2());

    // Each agent asks over the address family of the answer, so the client key matches it.
    assert_answer(
        &a1.resolve("api.allowed.test", RecordType::A),
        &["198.51.100.10"],
        "agent1 A",
    );
    assert_answer(
        &a1.resolve6("api.allowed.test", RecordType::AAAA),
        &["2001:db8:100::10"],
        "agent1 AAAA",
    );
    // agent2's group does not allow api.allowed.test.
    let denied = a2.resolve("api.allowed.test", RecordType::A);
    assert_eq!(denied.metadata.response_code, ResponseCode::NXDomain);
    assert!(denied.answers.is_empty());
    assert_answer(
        &a2.resolve("other.allowed.test", RecordType::A),
        &["198.51.100.30"],
        "agent2 A",
    );
    assert_answer(
        &a2.resolve6("other.allowed.test", RecordType::AAAA),
        &["2001:db8:100::30"],
        "agent2 AAAA",
    );

    let x = [sa("198.51.100.10", 80), sa("2001:db8:100::10", 80)];
    let y = [sa("198.51.100.30", 80), sa("2001:db8:100::30", 80)];
    assert_all_blocked(&lab, &a2, &x, "agent2 to agent1's addresses");
    assert_all_blocked(&lab, &a1, &y, "agent1 to agent2's addresses");
    assert_all_connected(&a1, &x, "agent1 to its own");
    assert_all_connected(&a2, &y, "agent2 to its own");

    let v4 = lab.set_elements("allow4");
    let v6 = lab.set_elements("allow6");
    assert!(
        v4.iter().chain(&v6).all(|e| e.key.len() == 2),
        "{v4:?} {v6:?}"
    );
    for (elems, client, dest) in [
        (&v4, "10.77.0.2", "198.51.100.10"),
        (&v4, "10.78.0.2", "198.51.100.30"),
        (&v6, "fd77::2", "2001:db8:100::10"),
        (&v6, "fd78::2", "2001:db8:100::30"),
    ] {
        assert!(
            has_elem(elems, &[client, dest]),
            "{client} . {dest} not in {elems:?}"
        );
    }
    for (elems, client, dest) in [
        (&v4, "10.78.0.2", "198.51.100.10"),
        (&v4, "10.77.0.2", "198.51.100.30"),
        (&v6, "fd78::2", "2001:db8:100::10"),
        (&v6, "fd77::2", "2001:db8:100::30"),
    ] {
        assert!(
            !has_elem(elems, &[client, dest]),
            "{client} . {dest} in {elems:?}"
        );
    }
    for (dest, owner) in [
        ("198.51.100.10", "10.77.0.2"),
        ("2001:db8:100::10", "fd77::2"),
        ("198.51.100.30", "10.78.0.2"),
        ("2001:db8:100::30", "fd78::2"),
    ] {
        let hits = lab.services.hits_on(ip(dest));
        assert!(
            !hits.is_empty() && hits.iter().all(|h| h.peer.ip() == ip(owner)),
            "{dest}: {hits:?}"
        );
    }
    let log = lab.log(5);
    assert!(
        log.iter().any(|l| l["client"] == "10.78.0.2"
            && l["qname"] == "api.allowed.test."
            && l["decision"] == "deny"),
        "{log:?}"
    );
}

#[test]
fn full_set_gives_servfail_and_hides_the_address() {
    if !require_root("full_set_gives_servfail_and_hides_the_address") {
        return;
    }
    let lab = Lab::new("full");
    lab.upstream
        .a("one.full.allowed.test", "198.51.100.41", 300)
        .a("two.full.allowed.test", "198.51.100.42", 300)
        .a("three.full.allowed.test", "198.51.100.43", 300);
    let mut spec = Spec::new(&lab, &["*.full.allowed.test"]);
    spec.set_size = 2;
    lab.start_fence(&spec.yaml());
    let a1 = lab.a1();

    assert_answer(
        &a1.resolve("one.full.allowed.test", RecordType::A),
        &["198.51.100.41"],
        "one",
    );
    assert_answer(
        &a1.resolve("two.full.allowed.test", RecordType::A),
        &["198.51.100.42"],
        "two",
    );
    let full = lab.set_elements("allow4");
    assert_eq!(full.len(), 2, "{full:?}");

    let third = a1.resolve("three.full.allowed.test", RecordType::A);
    assert_eq!(third.metadata.response_code, ResponseCode::ServFail);
    assert!(addresses(&third).is_empty(), "{third:?}");
    assert!(!format!("{third:?}").contains("198.51.100.43"), "{third:?}");
    let after = lab.set_elements("allow4");
    assert!(!has_elem(&after, &["198.51.100.43"]), "{after:?}");
    assert_eq!(after.len(), 2, "{after:?}");
    assert_all_blocked(&lab, &a1, &[sa("198.51.100.43", 80)], "the refused address");
    assert!(lab.services.hits_on(ip("198.51.100.43")).is_empty());
    assert_all_connected(
        &a1,
        &[sa("198.51.100.41", 80), sa("198.51.100.42", 80)],
        "admitted before the set filled",
    );
    // Re-answering an address already in the full set only refreshes it.
    assert_answer(
        &a1.resolve("one.full.allowed.test", RecordType::A),
        &["198.51.100.41"],
        "one again, set full",
    );

    let log = lab.log(4);
    let line = log
        .iter()
        .find(|l| l["qname"] == "three.full.allowed.test.")
        .unwrap_or_else(|| panic!("{log:?}"));
    assert_eq!(line["rcode"], "SERVFAIL", "{line}");
    assert!(line["error"].is_string(), "{line}");
    assert_eq!(line["answers"], serde_json::json!([]), "{line}");
}

#[test]
fn restart_keeps_elements_and_established_connections() {
    if !require_root("restart_keeps_elements_and_established_connections") {
        return;
    }
    let lab = Lab::new("restart");
    lab.upstream.a("api.allowed.test", "198.51.100.10", 300).a(
        "new.allowed.test",
        "198.51.100.11",
        300,
    );
    let mut spec = Spec::new(&lab, &["api.allowed.test", "new.allowed.test"]);
    spec.on_exit = "keep";
    let policy = spec.yaml();
    lab.start_fence(&policy);
    let a1 = lab.a1();
    let target = sa("198.51.100.10", 80);

    assert_answer(
        &a1.resolve("api.allowed.test", RecordType::A),
        &["198.51.100.10"],
        "before",
    );
    let mut held = a1.open(target);
    echo(&mut held, b"before").unwrap();

    let status = lab.stop_fence();
    assert!(
        status.success(),
        "SIGTERM exit: {status}\n{}",
        lab.fence_stderr()
    );
    // The table and its elements stay, and it still fails closed.
    assert!(has_elem(&lab.set_elements("allow4"), &["198.51.100.10"]));
    echo(&mut held, b"while stopped").unwrap();
    assert_all_connected(&a1, &[target], "admitted, dnsfence stopped");
    assert_all_blocked(
        &lab,
        &a1,
        &[sa("198.51.100.66", 80), sa("198.51.100.11", 80)],
        "never answered, dnsfence stopped",
    );

    lab.start_fence(&policy);
    let elems = lab.set_elements("allow4");
    assert!(
        has_elem(&elems, &["198.51.100.10"]),
        "after restart: {elems:?}"
    );
    echo(&mut held, b"after restart").unwrap();
    assert_all_connected(&a1, &[target], "admitted before the restart");
    assert_answer(
        &a1.resolve("new.allowed.test", RecordType::A),
        &["198.51.100.11"],
        "after restart",
    );
    assert_all_connected(&a1, &[sa("198.51.100.11", 80)], "answered after restart");
    assert_all_blocked(&lab, &a1, &[sa("198.51.100.66", 80)], "after restart");
    assert!(has_elem(&lab.set_elements("allow4"), &["198.51.100.10"]));
}

#[test]
fn upstream_queries_from_the_resolver_pass_but_reused_ports_do_not() {
    if !require_root("upstream_queries_from_the_resolver_pass_but_reused_ports_do_not") {
        return;
    }
    let lab = Lab::new("reuse");
    for i in 0..8 {
        lab.upstream.a(
            &format!("q{i}.allowed.test"),
            &format!("198.51.100.{}", 100 + i),
            300,
        );
    }
    lab.upstream.a("bypass.allowed.test", "198.51.100.77", 300);
    // Too big for UDP: dnsfence retries over TCP, which gives TCP source ports to reuse too.
    for i in 1..=120 {
        lab.upstream
            .a("big.allowed.test", &format!("203.0.113.{i}"), 300);
    }
    lab.start_fence(&Spec::new(&lab, &["*.allowed.test"]).yaml());
    let a1 = lab.a1();
    for i in 0..8 {
        assert_answer(
            &a1.resolve(&format!("q{i}.allowed.test"), RecordType::A),
            &[&format!("198.51.100.{}", 100 + i)],
            "resolver path",
        );
    }
    let big = a1.resolve_tcp("big.allowed.test", RecordType::A);
    // 32: firewall.max_addresses_per_answer's default cuts the answer, after the TCP retry.
    assert_eq!(addresses(&big).len(), 32);

    let gw4 = IpAddr::from(addr::GW_INET4);
    let seen = lab.upstream.seen();
    assert!(
        seen.iter().all(|q| q.peer.ip() == gw4),
        "only dnsfence asked: {seen:?}"
    );
    let udp_ports: Vec<u16> = seen
        .iter()
        .filter(|q| !q.tcp)
        .map(|q| q.peer.port())
        .collect();
    let tcp_ports: Vec<u16> = seen
        .iter()
        .filter(|q| q.tcp)
        .map(|q| q.peer.port())
        .collect();
    assert!(!udp_ports.is_empty(), "{seen:?}");

    // A process on the gateway that is not dnsfence, from the very source ports dnsfence just
    // used (the conntrack entries of those exchanges are still alive).
    let upstream = addr::sa(addr::UPSTREAM);
    let (udp_tried, udp_answered, tcp_tried, tcp_reached) = lab.gw.run(move || {
        use socket2::{Domain, Protocol, Socket, Type};
        let (mut udp_tried, mut udp_answered) = (0, Vec::new());
        for &port in udp_ports.iter().take(12) {
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
            socket.set_reuse_address(true).unwrap();
            if socket.bind(&SocketAddr::new(gw4, port).into()).is_err() {
                continue;
            }
            udp_tried += 1;
            let socket: UdpSocket = socket.into();
            let message = query("bypass.allowed.test", RecordType::A);
            if let Ok(reply) = dns_udp_from(&socket, upstream, &message, BLOCKED_AFTER) {
                udp_answered.push((port, addresses(&reply)));
            }
        }
        let (mut tcp_tried, mut tcp_reached) = (0, Vec::new());
        for &port in tcp_ports.iter().take(4) {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
            socket.set_reuse_address(true).unwrap();
            if socket.bind(&SocketAddr::new(gw4, port).into()).is_err() {
                continue;
            }
            match socket.connect_timeout(&upstream.into(), BLOCKED_AFTER) {
                Err(e)
                    if matches!(e.kind(), ErrorKind::AddrInUse | ErrorKind::AddrNotAvailable) =>
                {
                    continue;
                }
                Err(_) => tcp_tried += 1,
                Ok(()) => {
                    tcp_tried += 1;
                    tcp_reached.push(port);
                }
            }
        }
        (udp_tried, udp_answered, tcp_tried, tcp_reached)
    });
    assert!(udp_tried > 0, "could not reuse any UDP source port");
    assert!(udp_answered.is_empty(), "answered: {udp_answered:?}");
    assert!(
        tcp_reached.is_empty(),
        "TCP reached from ports {tcp_reached:?}"
    );
    eprintln!("reused {udp_tried} UDP and {tcp_tried} TCP source ports of the resolver");

    // Nor from a fresh port.
    let gw = lab.gw_host();
    let fresh = gw.run(move || {
        dns_udp(
            upstream,
            &query("bypass.allowed.test", RecordType::A),
            BLOCKED_AFTER,
        )
        .is_ok()
    });
    assert!(!fresh, "a fresh port got an answer");
    assert_all_blocked(&lab, &gw, &[upstream], "gateway TCP to the upstream");
    assert!(
        lab.upstream.seen_for("bypass.allowed.test").is_empty(),
        "{:?}",
        lab.upstream.seen_for("bypass.allowed.test")
    );

    // dnsfence's own queries still pass.
    lab.upstream.a("after.allowed.test", "198.51.100.78", 300);
    assert_answer(
        &a1.resolve("after.allowed.test", RecordType::A),
        &["198.51.100.78"],
        "after the bypass attempts",
    );
}

// =============================================================================================
// Ways around the firewall (hardening)
// =============================================================================================

/// `ping -c 1` from `ns` to `target`, waiting one second: true when a reply came back, false
/// when ping ran and got none (its exit code 1). Anything else (ping missing or broken, exit
/// 2, killed by `timeout`) fails the test: "no reply" must mean the packet was dropped.
fn pings(ns: &Netns, target: &str) -> bool {
    let out = ns.exec(
        Duration::from_secs(3),
        &["ping", "-n", "-c", "1", "-W", "1", target],
    );
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "ping {target} in {} did not run: {:?}\n{}{}",
            ns.name(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn icmp_reaches_only_admitted_addresses_and_never_the_gateway() {
    if !require_root("icmp_reaches_only_admitted_addresses_and_never_the_gateway") {
        return;
    }
    let lab = Lab::new("icmp");
    lab.upstream
        .a("api.allowed.test", "198.51.100.10", 300)
        .aaaa("api.allowed.test", "2001:db8:100::10", 300);
    lab.start_fence(&Spec::new(&lab, &["api.allowed.test"]).yaml());
    let a1 = lab.a1();
    // Before any answer, nothing answers a ping: not the internet, not the gateway.
    for target in [
        "198.51.100.10",
        "2001:db8:100::10",
        "198.51.100.66",
        "10.77.0.1",
        "fd77::1",
        "192.0.2.1",
    ] {
        assert!(!pings(&lab.agent1, target), "agent1 pinged {target}");
    }
    assert_answer(
        &a1.resolve("api.allowed.test", RecordType::A),
        &["198.51.100.10"],
        "A",
    );
    assert_answer(
        &a1.resolve("api.allowed.test", RecordType::AAAA),
        &["2001:db8:100::10"],
        "AAAA",
    );
    // An admitted address is a destination like any other; the rest stays dark.
    assert!(pings(&lab.agent1, "198.51.100.10"), "admitted IPv4 address");
    assert!(
        pings(&lab.agent1, "2001:db8:100::10"),
        "admitted IPv6 address"
    );
    for target in [
        "198.51.100.66",
        "2001:db8:100::66",
        "10.77.0.1",
        "fd77::1",
        "192.0.2.1",
    ] {
        assert!(!pings(&lab.agent1, target), "agent1 pinged {target}");
    }
}

#[test]
fn agents_reach_nothing_on_the_gateway_but_dnsfence() {
    if !require_root("agents_reach_nothing_on_the_gateway_but_dnsfence") {
        return;
    }
    let lab = Lab::new("gwsvc");
    lab.start_fence(&Spec::new(&lab, &["api.allowed.test"]).yaml());
    // Services of the gateway itself: one on every address, one on loopback only, one on the
    // agents' side.
    let listeners = lab.gw.run(|| {
        [
            "0.0.0.0:2222",
            "[::]:2223",
            "127.0.0.1:8080",
            "10.77.0.1:9090",
            "192.0.2.1:9191",
        ]
        .iter()
        .map(|a| std::net::TcpListener::bind(a).unwrap())
        .collect::<Vec<_>>()
    });
    let a1 = lab.a1();
    // dnsfence itself is reachable, over UDP and TCP.
    assert!(
        a1.try_resolve(a1.dns4, "evil.example", RecordType::A, false)
            .is_ok()
    );
    assert!(
        a1.try_resolve(a1.dns4, "evil.example", RecordType::A, true)
            .is_ok()
    );
    let targets = [
        sa("10.77.0.1", 2222),
        sa("fd77::1", 2223),
        sa("10.77.0.1", 9090),
        sa("192.0.2.1", 9191),
        sa("192.0.2.1", 2222),
        sa("10.78.0.1", 2222),
        sa("2001:db8:ffff::1", 2223),
        sa("10.77.0.1", 8080),
    ];
    assert_all_blocked(&lab, &a1, &targets, "agent1 to the gateway's services");
    // A process on the gateway still reaches its own services over loopback.
    let local = lab.gw.run(|| tcp_probe(sa("127.0.0.1", 8080), CONNECT_OK));
    assert_eq!(local, Reach::Connected);
    drop(listeners);
}

#[test]
fn spoofed_sources_from_an_agent_are_dropped() {
    if !require_root("spoofed_sources_from_an_agent_are_dropped") {
        return;
    }
    let lab = Lab::new("spoof");
    lab.upstream.a("other.allowed.test", "198.51.100.20", 300);
    let mut spec = Spec::new(&lab, &["api.allowed.test"]);
    spec.per_client = true;
    spec.clients = Some(
        "  - {name: agent2, from: [\"10.78.0.0/24\", \"fd78::/64\"], allow: [\"other.allowed.test\"]}\n"
            .to_owned(),
    );
    lab.start_fence(&spec.yaml());
    // The kernel's own reverse-path filter is off, so only the ruleset stands in the way.
    lab.gw.sysctl("net.ipv4.conf.all.rp_filter", "0");
    lab.gw.sysctl("net.ipv4.conf.default.rp_filter", "0");
    for dev in ["to-a1", "to-a2", "to-inet"] {
        lab.gw
            .sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0");
    }
    // agent2 is admitted to 198.51.100.20 (its own pair in the per-client set).
    assert_answer(
        &lab.a2().resolve("other.allowed.test", RecordType::A),
        &["198.51.100.20"],
        "agent2",
    );
    assert!(has_elem(
        &lab.set_elements("allow4"),
        &["10.78.0.2", "198.51.100.20"]
    ));
    lab.services.clear();

    // agent1, root in its namespace, puts agent2's address on its own link and sends from it:
    // the pair (10.78.0.2 . 198.51.100.20) is in the set, so only the reverse-path check
    // can stop these packets. Replies would go to agent2, but one-way UDP is enough to leak.
    lab.agent1
        .ip(&["addr", "add", "10.78.0.2/32", "dev", "to-gw"]);
    let spoofed = lab.agent1.run(|| {
        let socket = std::net::UdpSocket::bind("10.78.0.2:0").unwrap();
        for _ in 0..5 {
            let _ = socket.send_to(b"stolen", "198.51.100.20:443");
        }
        let stream =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        stream.bind(&sa("10.78.0.2", 0).into()).unwrap();
        stream
            .connect_timeout(&sa("198.51.100.20", 80).into(), BLOCKED_AFTER)
            .is_ok()
    });
    assert!(!spoofed, "a TCP connection from a spoofed source completed");
    std::thread::sleep(Duration::from_millis(300));
    let hits = lab.services.hits_on(ip("198.51.100.20"));
    assert!(hits.is_empty(), "spoofed packets arrived: {hits:?}");
    // agent2 itself still gets through.
    assert_all_connected(
        &lab.a2(),
        &[sa("198.51.100.20", 80)],
        "agent2 to its own address",
    );
}

/// Runs `dnsfence firewall <args>` in the gateway; (exit code, stdout).
fn fence_firewall(lab: &Lab, args: &[&str]) -> (i32, String) {
    let mut argv = vec![common::BIN, "firewall"];
    argv.extend_from_slice(args);
    let out = lab.gw.exec(Duration::from_secs(10), &argv);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn first_run_says_what_it_closed_and_how_to_remove_it() {
    if !require_root("first_run_says_what_it_closed_and_how_to_remove_it") {
        return;
    }
    let lab = Lab::new("firstrun");
    lab.upstream.a("api.allowed.test", "198.51.100.10", 300);
    let table = lab.table();
    let mut spec = Spec::new(&lab, &["api.allowed.test"]);
    spec.on_exit = "keep";
    lab.start_fence(&spec.yaml());
    let remove = format!("dnsfence firewall remove --table {table}");
    let started = lab.fence_stderr();
    let line = started
        .lines()
        .find(|l| l.contains("installed, default drop on"))
        .unwrap_or_else(|| panic!("no start line in:\n{started}"));
    assert!(
        line.contains(&format!("table inet {table}")) && line.contains("output, input, forward"),
        "{line}"
    );
    assert!(line.contains(&remove), "{line}");
    assert!(
        line.contains("everything on these hooks (no firewall.contain)"),
        "the start line must say that everything is contained: {line}"
    );

    assert_answer(
        &lab.a1().resolve("api.allowed.test", RecordType::A),
        &["198.51.100.10"],
        "agent1",
    );
    let (code, status) = fence_firewall(&lab, &["status", "--table", &table]);
    assert_eq!(code, 0, "{status}");
    assert!(
        status.contains(&format!("table inet {table}: installed")),
        "{status}"
    );
    assert!(
        status.contains("default drop: output, input, forward"),
        "{status}"
    );
    assert!(
        status.contains("set allow4: 1 elements (size 65536)"),
        "{status}"
    );
    assert!(status.contains("set allow6: 0 elements"), "{status}");
    assert!(
        status.contains("dnsfence serve is running (pid"),
        "{status}"
    );
    // The same table found through the policy file.
    let policy = lab.policy_path();
    let (code, by_policy) = fence_firewall(&lab, &["status", "--policy", policy.to_str().unwrap()]);
    assert_eq!((code, by_policy.lines().next()), (0, status.lines().next()));

    // Stopped with on_exit: keep, it says the table stays, and how to remove it.
    lab.stop_fence();
    let stopped = lab.fence_stderr();
    let line = stopped
        .lines()
        .find(|l| l.contains("stays (on_exit: keep)"))
        .unwrap_or_else(|| panic!("no stop line in:\n{stopped}"));
    assert!(line.contains(&remove), "{line}");
    let (code, status) = fence_firewall(&lab, &["status", "--table", &table]);
    assert_eq!(code, 0, "{status}");
    assert!(status.contains("no dnsfence serve is running"), "{status}");
    // The table still closes egress: the gateway cannot reach an address nobody answered...
    assert!(
        lab.gw_host()
            .probe(sa("203.0.113.5", 80), BLOCKED_AFTER)
            .is_blocked()
    );
    // ...until the printed command removes it.
    let (code, out) = fence_firewall(&lab, &["remove", "--table", &table]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        lab.gw_host().probe(sa("203.0.113.5", 80), CONNECT_OK),
        Reach::Connected
    );
    let (code, out) = fence_firewall(&lab, &["status", "--table", &table]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not installed"), "{out}");
    let (code, _) = fence_firewall(&lab, &["remove", "--table", &table]);
    assert_eq!(code, 1, "removing twice");
}
