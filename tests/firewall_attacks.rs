//! The firewall against an agent that attacks it, in real network namespaces (see
//! `common/netns.rs` for the lab). Each test is written as the attack: root in an agent's
//! namespace, forging sources, sending raw packets, using an admitted host as a relay, with the
//! gateway's own `rp_filter` off so that only dnsfence's ruleset stands in the way. Every "must
//! not reach" has a "can reach" control through the same socket or tool.

mod common;

use std::io::ErrorKind;
use std::io::Read as _;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::netns::*;
use common::upstream::Behaviour;
use common::{addresses, query, require_root, require_tool, sa};
use hickory_proto::rr::RecordType;

/// dnsfence's firewall mark (0x0d5f), written in decimal in the policies.
const MARK: u32 = 0x0d5f;

/// A shape-2 policy for the lab (output and forward hooks) allowing `allow`.
fn policy(lab: &Lab, allow: &[&str]) -> String {
    let allow: String = allow.iter().map(|r| format!("  - \"{r}\"\n")).collect();
    format!(
        "listen: [\"10.77.0.1:53\"]
upstreams: [\"{upstream}\"]
upstream_timeout: 2s
allow:
{allow}qtypes: [A, AAAA]
log: \"-\"
firewall:
  enabled: true
  table: {table}
  hooks: [output, forward]
  log_denied: true
  on_exit: remove
  set_size: 4096
  mark: {MARK}
",
        upstream = addr::UPSTREAM,
        table = lab.table(),
    )
}

/// The gateway's kernel reverse-path filter off: only the ruleset may stop forged sources.
fn rp_filter_off(lab: &Lab) {
    for dev in ["all", "default", "to-a1", "to-a2", "to-inet"] {
        lab.gw
            .sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0");
    }
}

/// A DNS response to (`id`, `qname` A) with one A record, built by hand as a forger would.
fn forged_answer(id: u16, qname: &str, addr: [u8; 4]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
    for label in qname.trim_end_matches('.').split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0x0e, 0x10, 0, 4]);
    m.extend_from_slice(&addr);
    m
}

/// Waits up to `wait` for one datagram on `socket`; its length, or `None`.
fn recv_one(socket: &UdpSocket, wait: Duration) -> Option<usize> {
    socket.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 2048];
    match socket.recv(&mut buf) {
        Ok(n) => Some(n),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(e) => panic!("recv: {e}"),
    }
}

#[test]
fn forged_upstream_replies_from_an_agent_never_reach_the_resolver() {
    if !require_root("forged_upstream_replies_from_an_agent_never_reach_the_resolver") {
        return;
    }
    let lab = Lab::new("forgedreply");
    lab.upstream.a("victim.allowed.test", "198.51.100.10", 300);
    lab.start_fence(&policy(&lab, &["victim.allowed.test"]));
    rp_filter_off(&lab);
    // agent1 (root in its namespace) takes the upstream's address as its own source.
    lab.agent1
        .ip(&["addr", "add", "198.51.100.53/32", "dev", "to-gw"]);

    // 1. The real resolver, attacked as well as possible: the upstream answers late, and
    // agent1 is told (by the test) the exact port and ID of every query dnsfence sends, and
    // races a perfect forged answer (203.0.113.66) to each.
    lab.upstream.set_behaviour(Behaviour::Slow(600));
    let victim = lab.a2();
    let client = {
        let server = victim.dns4;
        let message = query("victim.allowed.test", RecordType::A);
        lab.agent2
            .spawn(move || dns_udp(server, &message, Duration::from_secs(4)))
    };
    let forger = lab
        .agent1
        .run(|| UdpSocket::bind("198.51.100.53:53").expect("bind the upstream's address"));
    let deadline = Instant::now() + Duration::from_millis(700);
    let mut forged = 0;
    while Instant::now() < deadline {
        for seen in lab.upstream.seen_for("victim.allowed.test") {
            let bytes = forged_answer(seen.id, "victim.allowed.test", [203, 0, 113, 66]);
            forger
                .send_to(&bytes, seen.peer)
                .expect("send forged answer");
            forged += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        forged > 0,
        "the upstream saw no query to forge an answer for"
    );
    let reply = client.join().unwrap().expect("the client got an answer");
    assert_eq!(
        addresses(&reply),
        ["198.51.100.10"],
        "the client got a forged address ({forged} forged answers sent)"
    );
    let elems = lab.set_elements("allow4");
    assert!(has_elem(&elems, &["198.51.100.10"]), "{elems:?}");
    assert!(
        !has_elem(&elems, &["203.0.113.66"]),
        "the forged address was admitted: {elems:?}"
    );
    lab.upstream.set_behaviour(Behaviour::Normal);

    // 2. The same forgery against a socket of the gateway that talks to the upstream.
    forged_replies_never_reach_a_gateway_socket(&lab, &forger);
}

/// A socket of the gateway that talks to the upstream (marked like dnsfence's, so its query is
/// let out): the upstream's real reply reaches it, agent1's forged ones (from the upstream's
/// address and port, to the socket's port) do not; then, as the control, dnsfence is stopped
/// (`on_exit: remove`) and the very same forgery arrives.
fn forged_replies_never_reach_a_gateway_socket(lab: &Lab, forger: &UdpSocket) {
    let gw_socket = lab.gw.run(|| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        s.set_mark(MARK).unwrap();
        s.bind(&sa("192.0.2.1", 0).into()).unwrap();
        s.connect(&sa("198.51.100.53", 53).into()).unwrap();
        UdpSocket::from(s)
    });
    let port = gw_socket.local_addr().unwrap().port();
    let probe = query("victim.allowed.test", RecordType::A)
        .to_vec()
        .unwrap();
    gw_socket.send(&probe).unwrap();
    assert!(
        recv_one(&gw_socket, Duration::from_secs(2)).is_some(),
        "control: the upstream's real reply did not reach the gateway socket"
    );
    let spray = |count: usize| {
        for _ in 0..count {
            forger
                .send_to(b"forged upstream reply", sa("192.0.2.1", port))
                .unwrap();
        }
    };
    spray(5);
    assert_eq!(
        recv_one(&gw_socket, Duration::from_millis(700)),
        None,
        "a forged upstream reply from an agent reached a socket on the gateway\n{}",
        lab.ruleset()
    );
    // Control: without dnsfence's table (on_exit: remove), the very same forgery arrives.
    lab.stop_fence();
    spray(5);
    assert!(
        recv_one(&gw_socket, Duration::from_secs(2)).is_some(),
        "control: without the ruleset the forged reply should have arrived (rp_filter is off)"
    );
}

/// Sends `message` from `from` (an address agent1 does not own, added to its link) to
/// `server`, while the real owner in `owner_ns` listens on the same address and port.
fn spoofed_query_gets_no_answer(lab: &Lab, owner: &Netns, from: &str, server: SocketAddr) {
    let qname = format!(
        "spoof{}.allowed.test",
        if from.contains(':') { 6 } else { 4 }
    );
    let bind = SocketAddr::new(from.parse().unwrap(), 0);
    let victim = owner.run(move || UdpSocket::bind(bind).expect("victim socket"));
    let port = victim.local_addr().unwrap().port();
    let forged_from = SocketAddr::new(from.parse().unwrap(), port);
    let message = query(&qname, RecordType::A);
    let bytes = message.to_vec().unwrap();
    lab.agent1.run(move || {
        let s = UdpSocket::bind(forged_from).expect("bind the forged source");
        for _ in 0..5 {
            s.send_to(&bytes, server).expect("send the forged query");
        }
    });
    assert_eq!(
        recv_one(&victim, Duration::from_millis(800)),
        None,
        "dnsfence answered a query with a forged source {forged_from}\n{}",
        lab.ruleset()
    );
    assert!(
        lab.upstream.seen_for(&qname).is_empty(),
        "a query with a forged source {forged_from} was forwarded upstream"
    );
    // Control: the real owner, same socket, same server, is answered.
    let reply = owner
        .run(move || dns_udp_from(&victim, server, &message, Duration::from_secs(3)))
        .expect("control: the owner of the address gets an answer");
    assert_eq!(addresses(&reply), ["198.51.100.20"]);
}

#[test]
fn queries_with_another_agents_source_are_never_answered_v4_and_v6() {
    if !require_root("queries_with_another_agents_source_are_never_answered_v4_and_v6") {
        return;
    }
    let lab = Lab::new("spoofq");
    lab.upstream.a("spoof4.allowed.test", "198.51.100.20", 300);
    lab.upstream.a("spoof6.allowed.test", "198.51.100.20", 300);
    lab.start_fence(&policy(
        &lab,
        &["spoof4.allowed.test", "spoof6.allowed.test"],
    ));
    rp_filter_off(&lab);
    // agent1 claims agent2's addresses on its own link.
    lab.agent1
        .ip(&["addr", "add", "10.78.0.2/32", "dev", "to-gw"]);
    lab.agent1
        .ip(&["-6", "addr", "add", "fd78::2/128", "dev", "to-gw", "nodad"]);
    spoofed_query_gets_no_answer(&lab, &lab.agent2, "10.78.0.2", sa("10.77.0.1", 53));
    spoofed_query_gets_no_answer(&lab, &lab.agent2, "fd78::2", sa("fd77::1", 53));
}

#[test]
fn an_admitted_host_running_a_resolver_is_no_dns_relay() {
    if !require_root("an_admitted_host_running_a_resolver_is_no_dns_relay") {
        return;
    }
    let lab = Lab::new("dnsrelay");
    // The allowed name points at the address where another DNS server runs (and, as on
    // every address of the lab's internet, echo services on TCP 80, 443 and 853).
    lab.upstream.a("relay.allowed.test", "198.51.100.99", 300);
    lab.upstream
        .aaaa("relay.allowed.test", "2001:db8:100::99", 300);
    lab.other_dns4.a("tunnel.example", "203.0.113.7", 60);
    lab.other_dns6.a("tunnel.example", "203.0.113.7", 60);
    lab.start_fence(&policy(&lab, &["relay.allowed.test"]));
    let a1 = lab.a1();
    assert_eq!(
        addresses(&a1.resolve("relay.allowed.test", RecordType::A)),
        ["198.51.100.99"]
    );
    assert_eq!(
        addresses(&a1.resolve("relay.allowed.test", RecordType::AAAA)),
        ["2001:db8:100::99"]
    );
    assert!(has_elem(&lab.set_elements("allow4"), &["198.51.100.99"]));
    assert!(has_elem(&lab.set_elements("allow6"), &["2001:db8:100::99"]));

    // Control: the other resolver answers whoever reaches it (from inside the internet).
    let msg = query("tunnel.example", RecordType::A);
    for server in [addr::OTHER_DNS4, addr::OTHER_DNS6] {
        let server = addr::sa(server);
        let m = msg.clone();
        let reply = lab
            .inet
            .run(move || dns_udp(server, &m, Duration::from_secs(2)));
        assert!(
            reply.is_ok(),
            "control: {server} does not answer: {reply:?}"
        );
    }
    lab.other_dns4.clear_seen();
    lab.other_dns6.clear_seen();

    for (host, name) in [
        (lab.a1(), "agent1 (forward)"),
        (lab.gw_host(), "gateway (output)"),
    ] {
        for ip in ["198.51.100.99", "2001:db8:100::99"] {
            // The admitted host is reachable on the web ports...
            let web = host.probe_all(&[sa(ip, 80), sa(ip, 443)], CONNECT_OK);
            assert!(
                web.iter().all(|r| *r == Reach::Connected),
                "{name}: {ip} 80/443 should be reachable: {web:?}"
            );
            // ...but not as DNS (53), DNS over TLS (TCP 853) or DNS over QUIC (UDP 853).
            let tcp = host.probe_all(&[sa(ip, 53), sa(ip, 853)], BLOCKED_AFTER);
            assert!(
                tcp.iter().all(Reach::is_blocked),
                "{name}: {ip} TCP 53/853 reached: {tcp:?}\n{}",
                lab.ruleset()
            );
            let udp = host.udp_all(&[sa(ip, 853)], BLOCKED_AFTER);
            assert!(
                udp.iter().all(UdpReach::is_blocked),
                "{name}: {ip} UDP 853 reached: {udp:?}"
            );
            let server = sa(ip, 53);
            let m = msg.clone();
            let reply = host.run(move || dns_udp(server, &m, Duration::from_millis(700)));
            assert!(
                reply.is_err(),
                "{name}: the resolver at {server} answered through the firewall: {reply:?}"
            );
        }
    }
    assert!(
        lab.other_dns4.seen().is_empty() && lab.other_dns6.seen().is_empty(),
        "the other resolver saw queries from behind the firewall"
    );
}

/// ICMPv6 `kind` (code 0) with 20 bytes of body, then `marker`: enough for a neighbour
/// solicitation's reserved field and target, and a payload a relay would carry.
fn icmpv6(kind: u8, marker: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, 0, 0, 0];
    m.extend_from_slice(&[0u8; 20]);
    m.extend_from_slice(marker);
    m
}

/// Collects the ICMPv6 messages carrying `marker` that arrive in the calling thread's
/// namespace within `wait`, as their types.
fn icmpv6_received(socket: &socket2::Socket, marker: &[u8], wait: Duration) -> Vec<u8> {
    let deadline = Instant::now() + wait;
    let mut kinds = Vec::new();
    let mut buf = [0u8; 4096];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if left.is_zero() {
            break;
        }
        socket.set_read_timeout(Some(left)).unwrap();
        let Ok(n) = (&*socket).read(&mut buf) else {
            break;
        };
        let bytes = &buf[..n];
        if bytes.windows(marker.len()).any(|w| w == marker) {
            kinds.push(bytes[0]);
        }
    }
    kinds
}

#[test]
fn raw_neighbour_discovery_with_a_payload_is_never_forwarded() {
    if !require_root("raw_neighbour_discovery_with_a_payload_is_never_forwarded") {
        return;
    }
    let lab = Lab::new("ndrelay");
    lab.upstream
        .aaaa("nd.allowed.test", "2001:db8:100::20", 300);
    lab.start_fence(&policy(&lab, &["nd.allowed.test"]));
    assert_eq!(
        addresses(&lab.a1().resolve("nd.allowed.test", RecordType::AAAA)),
        ["2001:db8:100::20"]
    );
    // The internet listens for every ICMPv6 message (a raw socket sees them before the
    // kernel's own neighbour discovery throws away those with the wrong hop limit).
    let listener = lab.inet.run(|| {
        socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::RAW,
            Some(socket2::Protocol::ICMPV6),
        )
        .unwrap()
    });
    let marker = b"dnsfence-nd-relay-marker".to_vec();
    let watcher = {
        let marker = marker.clone();
        lab.inet
            .spawn(move || icmpv6_received(&listener, &marker, Duration::from_secs(2)))
    };
    // agent1, root in its namespace: neighbour solicitation (135), advertisement (136) and
    // router solicitation (133) with hop limit 255 and a payload, to the admitted global
    // address; then an echo request (128) through the same socket as the control.
    lab.agent1.run(move || {
        let s = socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::RAW,
            Some(socket2::Protocol::ICMPV6),
        )
        .unwrap();
        s.set_unicast_hops_v6(255).unwrap();
        let to: socket2::SockAddr = sa("2001:db8:100::20", 0).into();
        for kind in [135u8, 136, 133, 128] {
            for _ in 0..3 {
                s.send_to(&icmpv6(kind, &marker), &to).unwrap();
            }
        }
    });
    let kinds = watcher.join().unwrap();
    assert!(
        kinds.contains(&128),
        "control: the echo request to the admitted address did not arrive: {kinds:?}"
    );
    assert!(
        kinds.iter().all(|k| *k == 128),
        "neighbour discovery messages were forwarded to a global address: {kinds:?}\n{}",
        lab.ruleset()
    );
}

/// Runs a one-shot TCP server on the gateway: as `uid` (via `setpriv`), listening on
/// `0.0.0.0:port`, writing "hello" to each connection. Killed when the lab goes.
fn listener_as(lab: &Lab, uid: u32, port: u16) -> std::process::Child {
    require_tool("setpriv");
    require_tool("perl");
    let script = format!(
        "use IO::Socket::INET; my $s = IO::Socket::INET->new(LocalAddr => '0.0.0.0:{port}', \
         Listen => 8, ReuseAddr => 1) or die $!; print \"ready\\n\"; $| = 1; \
         while (my $c = $s->accept) {{ print $c \"hello\\n\"; close $c; }}"
    );
    let uid = uid.to_string();
    let mut child = lab
        .gw
        .command("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "perl",
            "-e",
            &script,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the listener");
    let mut ready = [0u8; 6];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut ready)
        .expect("the listener did not start");
    child
}

/// Connects from the internet to the gateway's port and reads the greeting.
fn greeting_from_outside(lab: &Lab, port: u16) -> Result<String, String> {
    lab.inet.run(move || {
        let mut s = std::net::TcpStream::connect_timeout(&sa("192.0.2.1", port), BLOCKED_AFTER)
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
        Ok(buf)
    })
}

#[test]
fn in_shape_1_an_agent_listening_for_outside_hosts_gets_nothing_back_out() {
    if !require_root("in_shape_1_an_agent_listening_for_outside_hosts_gets_nothing_back_out") {
        return;
    }
    let lab = Lab::new("inbound");
    let yaml = policy(&lab, &["api.allowed.test"])
        .replace("hooks: [output, forward]", "hooks: [output]")
        .replace("  mark:", "  inbound: [\"9102/tcp\"]\n  mark:");
    lab.start_fence(&yaml);
    // An agent (uid 65534) listens on the host's public address, as does a root service.
    let mut agent = listener_as(&lab, 65534, 9100);
    let mut agent_listed = listener_as(&lab, 65534, 9102);
    let mut root = listener_as(&lab, 0, 9101);
    let from_root = greeting_from_outside(&lab, 9101);
    let from_listed = greeting_from_outside(&lab, 9102);
    let from_agent = greeting_from_outside(&lab, 9100);
    for child in [&mut agent, &mut agent_listed, &mut root] {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert_eq!(
        from_root.as_deref(),
        Ok("hello\n"),
        "a root service (sshd) must keep working"
    );
    assert_eq!(
        from_listed.as_deref(),
        Ok("hello\n"),
        "a port in firewall.inbound must be reachable"
    );
    assert!(
        from_agent.is_err(),
        "an outside host got a reply from an agent's listening socket: {from_agent:?}\n{}",
        lab.ruleset()
    );
}

#[test]
fn a_client_beyond_its_share_of_the_set_gets_servfail_and_the_others_do_not() {
    if !require_root("a_client_beyond_its_share_of_the_set_gets_servfail_and_the_others_do_not") {
        return;
    }
    let lab = Lab::new("share");
    for i in 1..=4 {
        lab.upstream.a(
            &format!("n{i}.allowed.test"),
            &format!("198.51.100.{}", 10 + i),
            300,
        );
    }
    let names: Vec<String> = (1..=4).map(|i| format!("n{i}.allowed.test")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let yaml = policy(&lab, &names).replace(
        "  mark:",
        "  per_client: true\n  max_addresses_per_answer: 1\n  max_elements_per_client: 2\n  mark:",
    );
    lab.start_fence(&yaml);
    let (a1, a2) = (lab.a1(), lab.a2());
    assert_eq!(
        addresses(&a1.resolve("n1.allowed.test", RecordType::A)),
        ["198.51.100.11"]
    );
    assert_eq!(
        addresses(&a1.resolve("n2.allowed.test", RecordType::A)),
        ["198.51.100.12"]
    );
    // agent1 has its share (2): a third address is refused, and not admitted.
    let third = a1.resolve("n3.allowed.test", RecordType::A);
    assert_eq!(
        third.metadata.response_code,
        hickory_proto::op::ResponseCode::ServFail,
        "{third:?}"
    );
    assert!(!has_elem(
        &lab.set_elements("allow4"),
        &["10.77.0.2", "198.51.100.13"]
    ));
    // What it has is still answered; agent2 is not affected.
    assert_eq!(
        addresses(&a1.resolve("n1.allowed.test", RecordType::A)),
        ["198.51.100.11"]
    );
    assert_eq!(
        addresses(&a2.resolve("n3.allowed.test", RecordType::A)),
        ["198.51.100.13"]
    );
    assert_eq!(
        addresses(&a2.resolve("n4.allowed.test", RecordType::A)),
        ["198.51.100.14"]
    );
    assert!(has_elem(
        &lab.set_elements("allow4"),
        &["10.78.0.2", "198.51.100.14"]
    ));
}

#[test]
fn the_source_check_is_strict_when_the_agents_link_carries_the_default_route() {
    if !require_root("the_source_check_is_strict_when_the_agents_link_carries_the_default_route") {
        return;
    }
    // The gateway's default route goes out through agent1's link; only a more specific route
    // leads to the upstream. A loose reverse-path check (is there *any* route back through the
    // input interface?) would accept the upstream's address from agent1; the check must ask
    // whether the *best* route back uses that interface.
    let lab = Lab::new("strictrpf");
    lab.start_fence(&policy(&lab, &["victim.allowed.test"]));
    rp_filter_off(&lab);
    lab.gw
        .ip(&["route", "add", "198.51.100.53/32", "via", "192.0.2.2"]);
    lab.gw.ip(&[
        "route",
        "replace",
        "default",
        "via",
        "10.77.0.2",
        "dev",
        "to-a1",
    ]);
    lab.agent1
        .ip(&["addr", "add", "198.51.100.53/32", "dev", "to-gw"]);
    let forger = lab
        .agent1
        .run(|| UdpSocket::bind("198.51.100.53:53").expect("bind the upstream's address"));
    forged_replies_never_reach_a_gateway_socket(&lab, &forger);
}

#[test]
fn a_client_beyond_its_share_of_queries_in_flight_is_refused_and_another_is_answered() {
    if !require_root(
        "a_client_beyond_its_share_of_queries_in_flight_is_refused_and_another_is_answered",
    ) {
        return;
    }
    // A slow allowed zone: every answer takes 1.2 s, so agent1's queries stay in flight.
    let lab = Lab::new("inflight");
    for i in 0..6 {
        lab.upstream.a(
            &format!("n{i}.slow.test"),
            &format!("198.51.100.{}", 10 + i),
            300,
        );
    }
    lab.upstream.set_behaviour(Behaviour::Slow(1200));
    let yaml = policy(&lab, &["*.slow.test"]).replace(
        "log: \"-\"\n",
        "log: \"-\"\nlimits: {max_inflight: 64, max_inflight_per_client: 2, client_qps: 0}\n",
    );
    lab.start_fence(&yaml);
    let dns = lab.a1().dns4;
    // agent1 asks four distinct names at once: two take its share, two are refused at once.
    let asked: Vec<_> = (0..4)
        .map(|i| {
            lab.agent1.spawn(move || {
                let started = Instant::now();
                let reply = dns_udp(
                    dns,
                    &query(&format!("n{i}.slow.test"), RecordType::A),
                    Duration::from_secs(4),
                );
                (reply.map(|m| m.metadata.response_code), started.elapsed())
            })
        })
        .collect();
    // While agent1's two are still waiting on the upstream, agent2 is answered.
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let other = lab.a2().resolve("n5.slow.test", RecordType::A);
    assert_eq!(addresses(&other), ["198.51.100.15"], "{other:?}");
    let other_took = started.elapsed();
    let outcomes: Vec<_> = asked.into_iter().map(|h| h.join().unwrap()).collect();
    let refused: Vec<_> = outcomes
        .iter()
        .filter(|(r, _)| matches!(r, Ok(hickory_proto::op::ResponseCode::Refused)))
        .collect();
    let answered: Vec<_> = outcomes
        .iter()
        .filter(|(r, _)| matches!(r, Ok(hickory_proto::op::ResponseCode::NoError)))
        .collect();
    assert_eq!((refused.len(), answered.len()), (2, 2), "{outcomes:?}");
    assert!(
        refused
            .iter()
            .all(|(_, took)| *took < Duration::from_millis(500)),
        "refusals wait for nothing: {outcomes:?}"
    );
    // agent2 was asked while agent1 held its share (its answer needed the slow upstream too).
    assert!(
        answered
            .iter()
            .all(|(_, took)| *took > Duration::from_millis(1000)),
        "{outcomes:?}"
    );
    assert!(other_took > Duration::from_millis(1000), "{other_took:?}");
    // Each refusal is logged with its reason, counted like the global bound's.
    let log = lab.log(7);
    let share_refusals: Vec<_> = log
        .iter()
        .filter(|l| {
            l["reason"] == "rate-limit"
                && l["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("limits.max_inflight_per_client 2"))
        })
        .collect();
    assert_eq!(share_refusals.len(), 2, "{log:#?}");
    assert!(
        share_refusals.iter().all(|l| l["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("10.77.0.2"))),
        "{share_refusals:#?}"
    );
    // With its queries answered, agent1 has its share back.
    let again = lab.a1().resolve("n3.slow.test", RecordType::A);
    assert_eq!(addresses(&again), ["198.51.100.13"], "{again:?}");
}

/// The DNS-over-TLS upstream of the test below, in a namespace of its own behind `inet` (every
/// address of `inet` already has the lab's echo service on TCP 853).
const DOT_UPSTREAM: &str = "192.0.2.53:853";

/// A host at 192.0.2.53 behind `inet`, serving DNS over TLS on port 853 with a certificate
/// for `dns.test` from a test CA; returns the namespace, the server and the CA in PEM.
fn dot_upstream(lab: &Lab) -> (Netns, common::Upstream, String) {
    let dot = Netns::create(&lab.gw.name().replace("-gw", "-dot"));
    dot.sysctl("net.ipv6.conf.all.accept_dad", "0");
    lab.inet.sysctl("net.ipv4.ip_forward", "1");
    lab.inet.ip(&[
        "link",
        "add",
        "to-dot",
        "type",
        "veth",
        "peer",
        "name",
        "to-inet",
        "netns",
        dot.name(),
    ]);
    lab.inet
        .ip(&["addr", "add", "192.0.2.9/30", "dev", "to-dot"]);
    lab.inet.ip(&["link", "set", "to-dot", "up"]);
    lab.inet.ip(&[
        "route",
        "add",
        "192.0.2.53/32",
        "via",
        "192.0.2.10",
        "dev",
        "to-dot",
    ]);
    dot.ip(&["addr", "add", "192.0.2.10/30", "dev", "to-inet"]);
    dot.ip(&["addr", "add", "192.0.2.53/32", "dev", "lo"]);
    dot.ip(&["link", "set", "to-inet", "up"]);
    dot.ip(&["route", "add", "default", "via", "192.0.2.9"]);
    let (ca_pem, config) = common::upstream::tls_server("dns.test");
    let server = dot.run(move || {
        let upstream = common::Upstream::start_at(sa("192.0.2.53", 53));
        upstream.serve_tls_at(DOT_UPSTREAM.parse().unwrap(), config);
        upstream
    });
    (dot, server, ca_pem)
}

#[test]
fn a_tls_upstream_passes_the_ruleset_while_the_agents_own_dot_to_it_is_dropped() {
    if !require_root("a_tls_upstream_passes_the_ruleset_while_the_agents_own_dot_to_it_is_dropped")
    {
        return;
    }
    let lab = Lab::new("dotup");
    let (_dot, server, ca_pem) = dot_upstream(&lab);
    server.a("api.allowed.test", "198.51.100.10", 300);
    let dot: SocketAddr = DOT_UPSTREAM.parse().unwrap();
    // Control, before any ruleset: agent1 and the gateway reach the DoT server themselves.
    assert_eq!(lab.a1().probe(dot, CONNECT_OK), Reach::Connected);
    assert_eq!(lab.gw_host().probe(dot, CONNECT_OK), Reach::Connected);
    server.clear_seen();

    let ca_path = lab.dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca_pem).unwrap();
    let yaml = policy(&lab, &["api.allowed.test"]).replace(
        &format!("upstreams: [\"{}\"]\n", addr::UPSTREAM),
        &format!(
            "upstreams: [\"tls://{DOT_UPSTREAM}#dns.test\"]\nupstream_tls_ca: \"{}\"\n",
            ca_path.display()
        ),
    );
    assert!(yaml.contains("tls://"), "{yaml}");
    lab.start_fence(&yaml);

    // dnsfence's own DoT connection (marked) passes the "DoT to anyone" drop: answered over TLS.
    let reply = lab.a1().resolve("api.allowed.test", RecordType::A);
    assert_eq!(addresses(&reply), ["198.51.100.10"], "{reply:?}");
    let seen = server.seen();
    assert!(!seen.is_empty() && seen.iter().all(|q| q.tcp), "{seen:?}");
    assert!(
        seen.iter()
            .all(|q| q.peer.ip() == IpAddr::from(addr::GW_INET4)),
        "the questions came from the gateway: {seen:?}"
    );
    // The answer's address is admitted and reachable; an address nobody answered is not.
    assert_eq!(
        lab.a1().probe(sa("198.51.100.10", 80), CONNECT_OK),
        Reach::Connected
    );
    assert!(
        lab.a1()
            .probe(sa("198.51.100.20", 80), BLOCKED_AFTER)
            .is_blocked()
    );
    // The agent's own port-853 connection to the same upstream is dropped, routed (agent1)
    // and from the gateway host without dnsfence's mark; the server saw nothing of them.
    server.clear_seen();
    assert!(lab.a1().probe(dot, BLOCKED_AFTER).is_blocked());
    assert!(lab.gw_host().probe(dot, BLOCKED_AFTER).is_blocked());
    // And dnsfence still asks over its kept-alive connection.
    let reply = lab.a1().resolve("api.allowed.test", RecordType::A);
    assert_eq!(addresses(&reply), ["198.51.100.10"], "{reply:?}");
}

/// [`policy`] on `forward` only with `firewall.contain: {sources: [10.77.0.0/24]}`: agent1
/// is the agent, agent2 (10.78.0.0/24) is not.
fn contained_by_source(lab: &Lab) -> String {
    policy(lab, &["victim.allowed.test"]).replace("hooks: [output, forward]", "hooks: [forward]")
        + "  contain: {sources: [\"10.77.0.0/24\"]}\n"
}

/// Sends three datagrams carrying `marker` from `ns`, from `from` (an address of `ns`), to
/// `to`, where `listener` (in `inet`) waits; whether one arrived.
fn udp_arrives(ns: &Netns, from: SocketAddr, to: SocketAddr, listener: &UdpSocket) -> bool {
    ns.run(move || {
        let s = UdpSocket::bind(from).expect("bind the sender");
        for _ in 0..3 {
            // A send refused locally counts as not arriving; the listener decides.
            let _ = s.send_to(b"exfiltrated", to);
        }
    });
    recv_one(listener, Duration::from_millis(800)).is_some()
}

#[test]
fn an_agent_contained_by_source_cannot_escape_by_forging_a_source_outside_the_range() {
    if !require_root(
        "an_agent_contained_by_source_cannot_escape_by_forging_a_source_outside_the_range",
    ) {
        return;
    }
    let lab = Lab::new("forgesrc");
    lab.start_fence(&contained_by_source(&lab));
    rp_filter_off(&lab);
    let target = sa("203.0.113.77", 9999);
    let listener = lab
        .inet
        .run(move || UdpSocket::bind(target).expect("target listener"));
    // agent1 (root in its namespace) claims an address outside the contained range.
    lab.agent1
        .ip(&["addr", "add", "10.99.0.5/32", "dev", "to-gw"]);
    assert!(
        !udp_arrives(&lab.agent1, sa("10.99.0.5", 0), target, &listener),
        "a datagram with a forged source outside the contained range was forwarded\n{}",
        lab.ruleset()
    );
    // Control: agent2, whose real source is outside the range, is not contained: the same
    // send through the same gateway arrives.
    assert!(
        udp_arrives(&lab.agent2, sa("10.78.0.2", 0), target, &listener),
        "control: an uncontained namespace's datagram did not arrive\n{}",
        lab.ruleset()
    );
}

#[test]
fn an_agent_contained_by_an_ipv4_range_cannot_leave_over_ipv6() {
    if !require_root("an_agent_contained_by_an_ipv4_range_cannot_leave_over_ipv6") {
        return;
    }
    let lab = Lab::new("v6escape");
    let target = SocketAddr::from((addr::INET_PROBE6, 80));
    // Control: before the ruleset, agent1 reaches the IPv6 target.
    assert_eq!(
        lab.agent1.run(move || tcp_probe(target, CONNECT_OK)),
        Reach::Connected,
        "control: agent1 cannot reach {target} even without dnsfence"
    );
    lab.start_fence(&contained_by_source(&lab));
    let reach = lab.agent1.run(move || tcp_probe(target, CONNECT_OK));
    assert!(
        reach.is_blocked(),
        "agent1, contained by an IPv4 range, reached {target} over IPv6 ({reach:?})\n{}",
        lab.ruleset()
    );
}

#[test]
fn dockers_embedded_dns_on_its_random_port_is_unreachable_once_the_ruleset_is_in() {
    if !require_root(
        "dockers_embedded_dns_on_its_random_port_is_unreachable_once_the_ruleset_is_in",
    ) {
        return;
    }
    let lab = Lab::new("embdns");
    lab.upstream.a("api.allowed.test", "198.51.100.10", 300);
    // A stand-in for Docker's embedded DNS: 127.0.0.11 on a port that is not 53, as an agent
    // reads it from /proc/net/udp and asks it directly (no NAT, no original port 53).
    let embedded = lab.gw.run(|| common::Upstream::start_on("127.0.0.11"));
    embedded.a("anything.example", "198.51.100.77", 60);
    let server = embedded.addr;
    assert_ne!(server.port(), 53);
    let ask = |ns: &Netns| {
        let m = query("anything.example", RecordType::A);
        ns.run(move || dns_udp(server, &m, Duration::from_secs(2)))
    };

    // Control: before the ruleset it answers anyone on the host, over UDP and TCP.
    let before = ask(&lab.gw).expect("the stand-in answers before the ruleset");
    assert_eq!(addresses(&before), ["198.51.100.77"]);
    assert_eq!(
        lab.gw.run(move || tcp_probe(server, CONNECT_OK)),
        Reach::Connected
    );

    lab.start_fence(&policy(&lab, &["api.allowed.test"]));
    let after = ask(&lab.gw);
    assert!(
        after.is_err(),
        "127.0.0.11:{} answered: {after:?}",
        server.port()
    );
    assert!(
        lab.gw
            .run(move || tcp_probe(server, BLOCKED_AFTER))
            .is_blocked()
    );
    assert_eq!(embedded.seen().len(), 1, "{:?}", embedded.seen());
    // Control through the same socket code: dnsfence on loopback answers.
    let m = query("api.allowed.test", RecordType::A);
    let own = lab
        .gw
        .run(move || dns_udp(sa("127.0.0.1", 53), &m, Duration::from_secs(3)))
        .expect("dnsfence answers on loopback");
    assert_eq!(addresses(&own), ["198.51.100.10"]);
}
