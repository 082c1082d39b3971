//! Who a client is: a query must not pick its client group (or per-client set key) by choosing
//! its source address. Namespaces as in `firewall_e2e` (see `common::netns`).

mod common;

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use common::netns::*;
use common::{addresses, query, require_root, wire};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use socket2::{Domain, Socket, Type};

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// The default group allows `everyone.example`; the `research` group, agent1's range
/// 10.77.0.0/24 (which holds the gateway's own 10.77.0.1), allows `research-only.example`.
fn grouped_policy(lab: &Lab) -> String {
    format!(
        "listen: [\"10.77.0.1:53\"]
upstreams: [\"{upstream}\"]
upstream_timeout: 2s
allow: [everyone.example]
clients:
  - {{name: research, from: [\"10.77.0.0/24\"], allow: [research-only.example]}}
log: \"-\"
firewall:
  enabled: true
  table: {table}
  hooks: [output, forward]
  allow_cidrs: []
  per_client: true
",
        upstream = addr::UPSTREAM,
        table = lab.table(),
    )
}

/// One UDP query to `server` from a socket bound to `source` in `ns`.
fn ask_from(ns: &Netns, source: &str, server: SocketAddr, qname: &str) -> Message {
    let source = sa(source, 0);
    let message = query(qname, RecordType::A);
    ns.run(move || {
        let socket = UdpSocket::bind(source).unwrap();
        dns_udp_from(&socket, server, &message, Duration::from_secs(3))
    })
    .unwrap_or_else(|e| panic!("{qname} from {source} via {server}: {e}"))
}

fn pc4_has(lab: &Lab, client: &str, dest: &str) -> bool {
    has_elem(&lab.set_elements("allow4"), &[client, dest])
}

#[test]
fn a_local_process_binding_a_host_address_inside_a_group_range_is_the_loopback_client() {
    if !require_root(
        "a_local_process_binding_a_host_address_inside_a_group_range_is_the_loopback_client",
    ) {
        return;
    }
    let lab = Lab::new("hostsrc");
    lab.upstream.a("research-only.example", "203.0.113.9", 300);
    lab.upstream.a("everyone.example", "203.0.113.10", 300);
    lab.start_fence(&grouped_policy(&lab));
    let loopback = sa("127.0.0.1", 53);
    let gateway = sa("10.77.0.1", 53);

    // Control: the group works for its real member, and the set is keyed on it.
    let member = lab.a1().resolve("research-only.example", RecordType::A);
    assert_eq!(member.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&member), ["203.0.113.9"]);
    assert!(pc4_has(&lab, "10.77.0.2", "203.0.113.9"));

    // A process on the gateway asking from loopback gets the default group.
    let plain = ask_from(&lab.gw, "127.0.0.1", loopback, "research-only.example");
    assert_eq!(plain.metadata.response_code, ResponseCode::NXDomain);

    // The same process binding the gateway's address on agent1's link (inside research's
    // range), asking at loopback and at that address: still the default group.
    for server in [loopback, gateway] {
        let forged = ask_from(&lab.gw, "10.77.0.1", server, "research-only.example");
        assert_eq!(
            forged.metadata.response_code,
            ResponseCode::NXDomain,
            "from 10.77.0.1 via {server}: {forged:?}"
        );
        // What the default group allows is admitted under the loopback key, never under the
        // bound address (from which the process could also connect).
        let allowed = ask_from(&lab.gw, "10.77.0.1", server, "everyone.example");
        assert_eq!(addresses(&allowed), ["203.0.113.10"], "via {server}");
    }
    assert!(pc4_has(&lab, "127.0.0.1", "203.0.113.10"));
    assert!(!pc4_has(&lab, "10.77.0.1", "203.0.113.10"));
    assert!(!pc4_has(&lab, "10.77.0.1", "203.0.113.9"));

    // An address the host gains after dnsfence started counts too (within the watcher's
    // period at most; announcements make it immediate).
    lab.gw.ip(&["addr", "add", "10.77.0.9/24", "dev", "to-a1"]);
    std::thread::sleep(dnsfence::host_watch::PERIOD + Duration::from_secs(1));
    let late = ask_from(&lab.gw, "10.77.0.9", loopback, "research-only.example");
    assert_eq!(late.metadata.response_code, ResponseCode::NXDomain);
    assert!(!pc4_has(&lab, "10.77.0.9", "203.0.113.9"));

    let log = lab.log(7);
    let groups: Vec<(IpAddr, String)> = log
        .iter()
        .filter_map(|r| {
            Some((
                r["client"].as_str()?.parse().ok()?,
                r["group"].as_str().unwrap_or("-").to_owned(),
            ))
        })
        .collect();
    assert!(
        groups
            .iter()
            .all(|(client, group)| group != "research" || client.to_string() == "10.77.0.2"),
        "{groups:?}"
    );
}

/// A TCP connection to `server` from a socket bound to `source` in `ns`.
fn tcp_from(ns: &Netns, source: &str, server: SocketAddr) -> TcpStream {
    let source = sa(source, 0);
    ns.run(move || {
        let socket = Socket::new(Domain::for_address(server), Type::STREAM, None)?;
        socket.bind(&source.into())?;
        socket.connect_timeout(&server.into(), Duration::from_secs(2))?;
        Ok::<TcpStream, std::io::Error>(socket.into())
    })
    .unwrap_or_else(|e| panic!("connect from {source} to {server}: {e}"))
}

/// Whether `stream` still gets an answer to a query (it was kept, not closed).
fn answers(stream: &mut TcpStream) -> bool {
    let message = query("everyone.example", RecordType::A).to_vec().unwrap();
    stream.write_all(&wire::frame(&message)).is_ok()
        && matches!(
            wire::read_frame(stream, Duration::from_secs(3)),
            wire::TcpOutcome::Reply(_)
        )
}

/// `limits.tcp_connections_per_client` counts the client the pipeline decides a query as, not
/// the raw peer address: a process on the gateway binding one host address after another is
/// the loopback client every time, so it gets one share of the TCP slots, not one per address.
#[test]
fn a_local_process_binding_several_host_addresses_gets_one_tcp_connection_share() {
    if !require_root("a_local_process_binding_several_host_addresses_gets_one_tcp_connection_share")
    {
        return;
    }
    let lab = Lab::new("tcpshare");
    lab.upstream.a("everyone.example", "203.0.113.10", 300);
    let policy = grouped_policy(&lab).replace(
        "log: \"-\"\n",
        "log: \"-\"\nlimits: {tcp_connections: 16, tcp_connections_per_client: 2, \
         tcp_idle_timeout: 10s}\n",
    );
    lab.start_fence(&policy);
    let server = sa("10.77.0.1", 53);

    // Two of the gateway's addresses: two connections, the share (both kept: the control).
    let mut held = vec![
        tcp_from(&lab.gw, "10.77.0.1", server),
        tcp_from(&lab.gw, "10.78.0.1", server),
    ];
    for stream in &mut held {
        assert!(
            answers(stream),
            "a connection within the share was not served"
        );
    }
    // A third host address, and loopback: the same client, over its share. (The caps count
    // per listener: all of these ask the same one.)
    for source in ["192.0.2.1", "127.0.0.1"] {
        let mut extra = tcp_from(&lab.gw, source, server);
        let closed = wire::time_until_closed(&mut extra, Duration::from_secs(2));
        assert!(
            closed.is_some_and(|t| t < Duration::from_millis(500)),
            "a connection from the host's {source} was kept beside two from its other \
             addresses (closed after {closed:?})"
        );
    }
    // Another client (the agent) still gets its own share: the server had free slots.
    let mut agent = tcp_from(&lab.agent1, "10.77.0.2", server);
    assert!(answers(&mut agent), "the agent's connection was not served");
    // And the share comes back when the local process lets a connection go.
    drop(held.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let mut again = tcp_from(&lab.gw, "192.0.2.1", server);
        if answers(&mut again) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the local process's share never came back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client group over `range`, the firewall on (forward), for `check` and `serve`.
fn bridge_policy(table: &str, range: &str, control: &str) -> String {
    format!(
        "listen: [\"127.0.0.1:53\"]
upstreams: [\"127.0.0.1:5353\"]
control: {{socket: \"{control}\"}}
allow: [everyone.example]
clients:
  - {{name: research, from: [\"{range}\"], allow: [research-only.example]}}
log: \"-\"
firewall:
  enabled: true
  table: {table}
  hooks: [output, forward]
  on_exit: remove
"
    )
}

#[test]
fn check_and_serve_warn_when_a_client_group_lives_on_a_bridge_and_not_on_a_routed_link() {
    if !require_root(
        "check_and_serve_warn_when_a_client_group_lives_on_a_bridge_and_not_on_a_routed_link",
    ) {
        return;
    }
    common::require_tool("ip");
    common::require_tool("timeout");
    // Agents on a shared bridge can forge each other's source past the reverse-path check:
    // dnsfence cannot tell them apart, and says so. A veth per agent (routed) is the control.
    let ns = Netns::create(&format!("dfe-{}-brwarn", std::process::id()));
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["addr", "add", "10.88.0.1/24", "dev", "br0"]);
    ns.ip(&["link", "add", "rt0", "type", "veth", "peer", "name", "rt0p"]);
    ns.ip(&["addr", "add", "10.89.0.1/24", "dev", "rt0"]);
    for dev in ["br0", "rt0", "rt0p", "lo"] {
        ns.ip(&["link", "set", dev, "up"]);
    }
    let dir = tempfile::tempdir().unwrap();
    let run = |range: &str, serve: bool| {
        let path = dir.path().join("policy.yaml");
        std::fs::write(
            &path,
            bridge_policy(
                "dnsfence_brwarn",
                range,
                &dir.path().join("control.sock").display().to_string(),
            ),
        )
        .unwrap();
        let path = path.display().to_string();
        let argv: Vec<&str> = if serve {
            vec!["timeout", "3", common::BIN, "serve", "--policy", &path]
        } else {
            vec![common::BIN, "check", "--policy", &path]
        };
        let out = ns.exec(Duration::from_secs(10), &argv);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for serve in [false, true] {
        let bridged = run("10.88.0.0/24", serve);
        assert!(
            bridged.contains("interface br0 is a bridge")
                && bridged.contains("client group research's range 10.88.0.0/24"),
            "serve {serve}: no warning for a group on br0:\n{bridged}"
        );
        let routed = run("10.89.0.0/24", serve);
        assert!(
            !routed.contains("is a bridge"),
            "serve {serve}: a warning for a routed link:\n{routed}"
        );
        if serve {
            // Control: serve really started (and was stopped by `timeout`), not refused.
            assert!(routed.contains("listening on UDP and TCP"), "{routed}");
        }
    }
}
