//! `firewall.bind`: two agents on one Linux bridge, dnsfence on the gateway (`hooks:
//! [forward]`, client groups by source, `per_client`). Agent A forges agent B's source address.
//!
//! ```text
//!  a  10.88.0.2 fd88::2 ─ p-a ─┐
//!                              br0 10.88.0.1 fd88::1 (gw, dnsfence) ── inet 198.51.100.0/24,
//!  b  10.88.0.3 fd88::3 ─ p-b ─┘                                       2001:db8:100::/64
//! ```
//!
//! Without `bind` (the control, which proves the checks can fail) A's forged query is
//! answered under B's group and admitted for B, and A's forged SYN to B's admitted address
//! reaches it. With `bind`, the bridge drops both, while B's own traffic and A's own (real
//! source) traffic still work, over IPv4 and IPv6. "Reached" is read on the destination's own
//! kernel: a counter in `inet`'s prerouting hook for SYNs from B's address to port 81.

mod common;

use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::netns::{Netns, Services, dns_udp_from};
use common::{BIN, Upstream, addresses, query, read_log, require_root, require_tool};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;

const A4: &str = "10.88.0.2";
const A6: &str = "fd88::2";
const B4: &str = "10.88.0.3";
const B6: &str = "fd88::3";
const GW4: &str = "10.88.0.1";
const GW6: &str = "fd88::1";
/// The port forged SYNs go to (nothing listens: only `inet`'s counter sees them).
const FORGED_PORT: u16 = 81;

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

struct BridgeLab {
    dir: tempfile::TempDir,
    fence: Option<Child>,
    _upstream: Upstream,
    services: Services,
    gw: Netns,
    inet: Netns,
    a: Netns,
    b: Netns,
    table: String,
}

impl Drop for BridgeLab {
    fn drop(&mut self) {
        if let Some(mut child) = self.fence.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl BridgeLab {
    fn new(tag: &str) -> BridgeLab {
        for program in ["ip", "nft", "timeout"] {
            require_tool(program);
        }
        let base = format!("dfe-{}-{tag}-", std::process::id());
        let gw = Netns::create(&format!("{base}gw"));
        let inet = Netns::create(&format!("{base}in"));
        let a = Netns::create(&format!("{base}a"));
        let b = Netns::create(&format!("{base}b"));
        for ns in [&gw, &inet, &a, &b] {
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
            ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
        }
        gw.sysctl("net.ipv4.ip_forward", "1");
        gw.sysctl("net.ipv6.conf.all.forwarding", "1");
        gw.ip(&["link", "add", "br0", "type", "bridge"]);
        gw.ip(&["link", "set", "br0", "address", "02:00:00:88:00:01"]);
        for (port, ns) in [("p-a", &a), ("p-b", &b)] {
            gw.ip(&[
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ]);
            gw.ip(&["link", "set", port, "master", "br0"]);
            gw.ip(&["link", "set", port, "up"]);
        }
        gw.ip(&[
            "link",
            "add",
            "to-inet",
            "type",
            "veth",
            "peer",
            "name",
            "to-gw",
            "netns",
            inet.name(),
        ]);
        gw.ip(&["addr", "add", "10.88.0.1/24", "dev", "br0"]);
        gw.ip(&["-6", "addr", "add", "fd88::1/64", "dev", "br0", "nodad"]);
        gw.ip(&["addr", "add", "192.0.2.1/30", "dev", "to-inet"]);
        gw.ip(&[
            "-6",
            "addr",
            "add",
            "2001:db8:ffff::1/64",
            "dev",
            "to-inet",
            "nodad",
        ]);
        for dev in ["br0", "to-inet"] {
            gw.ip(&["link", "set", dev, "up"]);
        }
        gw.ip(&["route", "add", "default", "via", "192.0.2.2"]);
        gw.ip(&["-6", "route", "add", "default", "via", "2001:db8:ffff::2"]);

        inet.ip(&["addr", "add", "192.0.2.2/30", "dev", "to-gw"]);
        inet.ip(&[
            "-6",
            "addr",
            "add",
            "2001:db8:ffff::2/64",
            "dev",
            "to-gw",
            "nodad",
        ]);
        inet.ip(&["link", "set", "to-gw", "up"]);
        inet.ip(&["route", "add", "local", "198.51.100.0/24", "dev", "lo"]);
        inet.ip(&[
            "-6",
            "route",
            "add",
            "local",
            "2001:db8:100::/64",
            "dev",
            "lo",
        ]);
        inet.ip(&["route", "add", "10.88.0.0/24", "via", "192.0.2.1"]);
        inet.ip(&["-6", "route", "add", "fd88::/64", "via", "2001:db8:ffff::1"]);
        inet.sysctl("net.ipv4.ip_nonlocal_bind", "1");
        inet.sysctl("net.ipv6.ip_nonlocal_bind", "1");

        for (ns, v4, v6) in [(&a, A4, A6), (&b, B4, B6)] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            ns.ip(&["link", "set", "eth0", "up"]);
            ns.ip(&["route", "add", "default", "via", GW4]);
            ns.ip(&["-6", "route", "add", "default", "via", GW6]);
            // The agents know the gateway's MAC for good: a forged packet leaves the agent
            // whatever happens to ARP and neighbour discovery, so only the bridge can stop it.
            for gw_ip in [GW4, GW6] {
                ns.ip(&[
                    "neigh",
                    "replace",
                    gw_ip,
                    "lladdr",
                    "02:00:00:88:00:01",
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ]);
            }
        }

        // SYNs from B's addresses to the forged port, counted by inet's own kernel.
        let counter = format!(
            "table inet probe {{\nchain c {{\ntype filter hook prerouting priority -400; \
             policy accept;\nip saddr {B4} tcp dport {FORGED_PORT} counter\n\
             ip6 saddr {B6} tcp dport {FORGED_PORT} counter\n}}\n}}\n"
        );
        let out = inet.exec(Duration::from_secs(10), &["nft", &counter]);
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let (upstream, services) = inet.run(|| {
            let upstream = Upstream::start_at(sa("198.51.100.53", 53));
            upstream.a("a.example", "198.51.100.10", 300);
            upstream.aaaa("a.example", "2001:db8:100::10", 300);
            upstream.a("b.example", "198.51.100.20", 300);
            upstream.aaaa("b.example", "2001:db8:100::20", 300);
            upstream.a("b2.example", "198.51.100.22", 300);
            upstream.aaaa("b2.example", "2001:db8:100::22", 300);
            (upstream, Services::start(&[80], &[]))
        });
        BridgeLab {
            dir: tempfile::tempdir().unwrap(),
            fence: None,
            _upstream: upstream,
            services,
            gw,
            inet,
            a,
            b,
            table: format!("dnsfence_{tag}"),
        }
    }

    fn policy(&self, bind: bool) -> String {
        let bind = if bind {
            format!(
                "  bind:\n    - {{port: p-a, sources: [\"{A4}\", \"{A6}\"]}}\n    \
                 - {{port: p-b, sources: [\"{B4}/32\", \"{B6}/128\"]}}\n"
            )
        } else {
            String::new()
        };
        format!(
            "listen: [\"{GW4}:53\", \"[{GW6}]:53\"]
upstreams: [\"198.51.100.53:53\"]
allow: []
clients:
  - {{name: agent_b, from: [\"{B4}/32\", \"{B6}/128\"], allow: [b.example, b2.example]}}
  - {{name: agent_a, from: [\"{A4}/32\", \"{A6}/128\"], allow: [a.example]}}
log: {log}
control: {{socket: {control}}}
firewall:
  table: {table}
  hooks: [forward]
  per_client: true
  log_denied: false
  on_exit: remove
{bind}",
            log = self.dir.path().join("queries.jsonl").display(),
            control = self.dir.path().join("control.sock").display(),
            table = self.table,
        )
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    fn start(&mut self, bind: bool) {
        let policy = self.dir.path().join("policy.yaml");
        std::fs::write(&policy, self.policy(bind)).unwrap();
        let stderr = std::fs::File::create(self.dir.path().join("stderr")).unwrap();
        let child = self
            .gw
            .command(BIN)
            .arg("serve")
            .arg("--policy")
            .arg(&policy)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start dnsfence");
        self.fence = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let up = self.a.run(|| {
                TcpStream::connect_timeout(&sa(GW4, 53), Duration::from_millis(200)).is_ok()
            });
            if up {
                return;
            }
            if let Some(status) = self
                .fence
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("dnsfence exited ({status}):\n{}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "dnsfence not up:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        let Some(mut child) = self.fence.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() {
            assert!(Instant::now() < deadline, "dnsfence did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Rewrites the policy (with or without `bind`), sends SIGHUP and waits for the reload.
    fn reload(&self, bind: bool) {
        let before = self.stderr().matches("policy reloaded").count();
        std::fs::write(self.dir.path().join("policy.yaml"), self.policy(bind)).unwrap();
        let pid = self.fence.as_ref().expect("dnsfence runs").id();
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.stderr().matches("policy reloaded").count() == before {
            assert!(Instant::now() < deadline, "no reload:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn tables(&self) -> String {
        let out = self
            .gw
            .exec(Duration::from_secs(10), &["nft", "list", "tables"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// SYNs from B's addresses to [`FORGED_PORT`] that reached `inet`: (IPv4, IPv6).
    fn forged_syns(&self) -> (u64, u64) {
        let out = self.inet.exec(
            Duration::from_secs(10),
            &["nft", "list", "chain", "inet", "probe", "c"],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let count = |needle: &str| {
            text.lines()
                .find(|l| l.contains(needle))
                .and_then(|l| l.split("packets ").nth(1))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no counter for {needle} in:\n{text}"))
        };
        (
            count(&format!("ip saddr {B4}")),
            count(&format!("ip6 saddr {B6}")),
        )
    }

    fn per_client_has(&self, client: &str, dest: &str) -> bool {
        let set = if client.contains(':') {
            "allow6"
        } else {
            "allow4"
        };
        let out = self.gw.exec(
            Duration::from_secs(10),
            &["nft", "list", "set", "inet", &self.table, set],
        );
        String::from_utf8_lossy(&out.stdout).contains(&format!("{client} . {dest}"))
    }
}

/// One UDP query from `source` (bound in `ns`) to `server`; `None` when nothing answers.
fn ask(
    ns: &Netns,
    source: &str,
    server: SocketAddr,
    qname: &str,
    qtype: RecordType,
) -> Option<Message> {
    let source = sa(source, 0);
    let message = query(qname, qtype);
    ns.run(move || {
        let socket = UdpSocket::bind(source).unwrap();
        dns_udp_from(&socket, server, &message, Duration::from_millis(1500)).ok()
    })
}

/// A TCP connection from `source` to `dest`, within `limit`.
fn connect(ns: &Netns, source: &str, dest: SocketAddr, limit: Duration) -> bool {
    let source = sa(source, 0);
    ns.run(move || {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(dest),
            socket2::Type::STREAM,
            None,
        )
        .unwrap();
        socket.bind(&source.into()).unwrap();
        socket.connect_timeout(&dest.into(), limit).is_ok()
    })
}

/// An agent's own traffic, from its real addresses: its name resolves (IPv4 and IPv6) and its
/// address is reached on port 80.
fn own_traffic_works(lab: &BridgeLab, ns: &Netns, v4: &str, v6: &str, name: &str) {
    for (source, server, qtype) in [
        (v4, sa(GW4, 53), RecordType::A),
        (v6, sa(GW6, 53), RecordType::AAAA),
    ] {
        let answer = ask(ns, source, server, name, qtype).unwrap_or_else(|| {
            panic!("{name} {qtype} from {source}: no answer:\n{}", lab.stderr())
        });
        assert_eq!(
            answer.metadata.response_code,
            ResponseCode::NoError,
            "{answer:?}"
        );
        let addrs = addresses(&answer);
        let dest: IpAddr = addrs.first().expect("an address").parse().unwrap();
        assert!(
            connect(
                ns,
                source,
                SocketAddr::new(dest, 80),
                Duration::from_secs(2)
            ),
            "{source} -> {dest}:80 blocked"
        );
        let deadline = Instant::now() + Duration::from_secs(2);
        while lab.services.hits_from(source.parse().unwrap()).is_empty() {
            assert!(
                Instant::now() < deadline,
                "{source} did not reach the echo service"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A takes B's addresses onto its own interface and tries them: a query for a name only B's
/// group may resolve, and a SYN to B's admitted address. Returns (answered, syns reached).
fn forge(lab: &BridgeLab) -> (bool, (u64, u64)) {
    lab.a
        .ip(&["addr", "add", &format!("{B4}/32"), "dev", "eth0"]);
    lab.a.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{B6}/128"),
        "dev",
        "eth0",
        "nodad",
    ]);
    let mut answered = false;
    for (source, server, qtype) in [
        (B4, sa(GW4, 53), RecordType::A),
        (B6, sa(GW6, 53), RecordType::AAAA),
    ] {
        answered |= ask(&lab.a, source, server, "b2.example", qtype).is_some();
    }
    for (source, dest) in [(B4, "198.51.100.20"), (B6, "2001:db8:100::20")] {
        connect(
            &lab.a,
            source,
            sa(dest, FORGED_PORT),
            Duration::from_millis(800),
        );
    }
    lab.a
        .ip(&["addr", "del", &format!("{B4}/32"), "dev", "eth0"]);
    lab.a
        .ip(&["-6", "addr", "del", &format!("{B6}/128"), "dev", "eth0"]);
    (answered, lab.forged_syns())
}

fn forged_queries_logged(lab: &BridgeLab) -> Vec<serde_json::Value> {
    read_log(&lab.dir.path().join("queries.jsonl"))
        .into_iter()
        .filter(|r| {
            r["qname"]
                .as_str()
                .is_some_and(|n| n.starts_with("b2.example"))
        })
        .collect()
}

#[test]
fn without_bind_an_agent_on_a_bridge_takes_another_agents_group_and_elements() {
    if !require_root("without_bind_an_agent_on_a_bridge_takes_another_agents_group_and_elements") {
        return;
    }
    let mut lab = BridgeLab::new("brctl");
    lab.start(false);
    // check and serve say so (the warning this feature answers).
    assert!(
        lab.stderr().contains("interface br0 is a bridge"),
        "{}",
        lab.stderr()
    );
    own_traffic_works(&lab, &lab.b, B4, B6, "b.example");
    let (_, syns) = forge(&lab);
    // The forged query was decided under B's group and admitted for B ...
    let forged = forged_queries_logged(&lab);
    assert!(
        forged
            .iter()
            .any(|r| r["client"] == B4 && r["group"] == "agent_b"),
        "no forged query from {B4} in the log: {forged:?}"
    );
    assert!(lab.per_client_has(B4, "198.51.100.22"));
    // ... and A's SYNs from B's addresses reached B's admitted address, both families.
    assert!(
        syns.0 >= 1 && syns.1 >= 1,
        "forged SYNs did not arrive: {syns:?}"
    );
}

#[test]
fn with_bind_forged_sources_are_dropped_at_the_bridge_and_real_ones_work() {
    if !require_root("with_bind_forged_sources_are_dropped_at_the_bridge_and_real_ones_work") {
        return;
    }
    let mut lab = BridgeLab::new("brbind");
    lab.start(true);
    let stderr = lab.stderr();
    // Every port of br0 is bound: no warning about the bridge.
    assert!(!stderr.contains("interface br0 is a bridge"), "{stderr}");

    // The kernel's own ruleset holds the bindings.
    let out = lab.gw.exec(
        Duration::from_secs(10),
        &["nft", "list", "table", "bridge", &lab.table],
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "hook prerouting priority filter; policy accept;",
        &format!("iifname \"p-a\" ip saddr {A4} accept"),
        &format!("iifname \"p-b\" ip6 saddr {B6} meta l4proto != ipv6-icmp accept"),
        &format!(
            "iifname \"p-b\" arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp saddr ip {B4} accept"
        ),
        "iifname \"p-a\" drop",
    ] {
        assert!(listed.contains(needle), "{needle:?} not in:\n{listed}");
    }
    let status = lab.gw.exec(
        Duration::from_secs(10),
        &[BIN, "firewall", "status", "--table", &lab.table],
    );
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("table bridge") && status.contains("p-a, p-b"),
        "{status}"
    );

    own_traffic_works(&lab, &lab.b, B4, B6, "b.example");
    own_traffic_works(&lab, &lab.a, A4, A6, "a.example");
    let (answered, syns) = forge(&lab);
    assert!(!answered, "a forged query was answered");
    assert!(
        forged_queries_logged(&lab).is_empty(),
        "a forged query reached dnsfence"
    );
    assert!(!lab.per_client_has(B4, "198.51.100.22"));
    assert!(!lab.per_client_has(B6, "2001:db8:100::22"));
    assert_eq!(syns, (0, 0), "forged SYNs reached B's admitted address");
    // A claimed B's addresses in ARP and neighbour discovery meanwhile: B still works.
    lab.services.clear();
    own_traffic_works(&lab, &lab.b, B4, B6, "b.example");
    own_traffic_works(&lab, &lab.a, A4, A6, "a.example");

    // on_exit: remove takes the bridge table with the main one.
    lab.stop();
    let out = lab
        .gw
        .exec(Duration::from_secs(10), &["nft", "list", "tables"]);
    let tables = String::from_utf8_lossy(&out.stdout);
    assert!(!tables.contains(&lab.table), "left behind:\n{tables}");
}

#[test]
fn a_reload_binds_the_ports_and_a_later_one_unbinds_them_keeping_the_main_table() {
    if !require_root("a_reload_binds_the_ports_and_a_later_one_unbinds_them_keeping_the_main_table")
    {
        return;
    }
    let mut lab = BridgeLab::new("brrld");
    lab.start(false);
    let bridge_table = format!("table bridge {}", lab.table);
    let inet_table = format!("table inet {}", lab.table);
    assert!(!lab.tables().contains(&bridge_table), "{}", lab.tables());
    own_traffic_works(&lab, &lab.b, B4, B6, "b.example");

    lab.reload(true);
    assert!(lab.tables().contains(&bridge_table), "{}", lab.tables());
    // B's admitted element lived through the reload (only the bridge table changed).
    assert!(lab.per_client_has(B4, "198.51.100.20"));
    let (answered, syns) = forge(&lab);
    assert!(!answered, "a forged query was answered after the reload");
    assert_eq!(syns, (0, 0), "forged SYNs arrived after the reload");
    own_traffic_works(&lab, &lab.b, B4, B6, "b.example");

    lab.reload(false);
    let tables = lab.tables();
    assert!(
        !tables.contains(&bridge_table) && tables.contains(&inet_table),
        "{tables}"
    );
}
