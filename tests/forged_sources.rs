//! Sources a local user forges on the gateway itself. IPv6 lets any user bind an address the
//! host does not own (`IPV6_FREEBIND`, no privilege needed) and checks nothing on output, so a
//! process on the gateway can send as a routed agent (`fd77::2`) or as an outside host:
//!
//! * to dnsfence over loopback, to be taken for that agent (its group, its budgets, elements
//!   keyed on it) or to have the reply, with the question's bytes, sent to the outside host;
//! * out through the firewall, to be accepted by the agent's per-client elements.
//!
//! The lab is `common::netns`'s; the forging client is a perl one-liner run under `setpriv`
//! as an unprivileged uid, and every "cannot" has a "can" through the same tool.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::Output;
use std::time::Duration;

use common::netns::*;
use common::{addresses, query, require_root, require_tool};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;

/// The contained agent user on the gateway, and another unprivileged user that is not.
const AGENT_UID: u32 = 4242;
const OTHER_UID: u32 = 4343;

/// `agents` is agent1's routed ranges; it alone may resolve `agent-one.test` and
/// `agent-two.test`.
fn policy(lab: &Lab) -> String {
    format!(
        "listen: [\"127.0.0.1:53\"]
upstreams: [\"{upstream}\"]
upstream_timeout: 2s
allow: [everyone.test]
qtypes: [A, AAAA]
clients:
  - {{name: agents, from: [\"fd77::/64\", \"10.77.0.0/24\"], allow: [agent-one.test, agent-two.test]}}
log: \"-\"
firewall:
  table: {table}
  hooks: [output, forward]
  on_exit: remove
  per_client: true
  set_size: 4096
  contain: {{uids: [{AGENT_UID}], interfaces: [\"to-a*\"]}}
",
        upstream = addr::UPSTREAM,
        table = lab.table(),
    )
}

/// Sends one UDP datagram (hex `payload`) from `source` (bound with `IPV6_FREEBIND`, so any
/// address) to `target`, as `uid` on the gateway, and waits up to 2 s for a reply. Prints
/// `reply <hex>`, `no reply`, or why it could not send.
const FORGE: &str = r#"
use Socket qw(:all);
my ($src, $sport, $dst, $dport, $hex) = @ARGV;
socket(my $s, AF_INET6, SOCK_DGRAM, IPPROTO_UDP) or die "socket: $!";
setsockopt($s, IPPROTO_IPV6, 78, 1) or die "IPV6_FREEBIND: $!";
bind($s, pack_sockaddr_in6($sport, inet_pton(AF_INET6, $src))) or die "bind: $!";
send($s, pack("H*", $hex), 0, pack_sockaddr_in6($dport, inet_pton(AF_INET6, $dst)))
    or do { print "send failed: $!\n"; exit 3 };
my $rin = ''; vec($rin, fileno($s), 1) = 1;
if (select(my $rout = $rin, undef, undef, 2)) {
    recv($s, my $buf, 4096, 0); print "reply ", unpack("H*", $buf), "\n"; exit 0;
}
print "no reply\n"; exit 2;
"#;

#[derive(Debug, PartialEq)]
enum Forged {
    Reply(Vec<u8>),
    NoReply,
    SendFailed(String),
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

/// [`FORGE`] as `uid` on the gateway.
fn forge(lab: &Lab, uid: u32, source: SocketAddr, target: SocketAddr, payload: &[u8]) -> Forged {
    let id = uid.to_string();
    let (sport, dport) = (source.port().to_string(), target.port().to_string());
    let (src, dst) = (source.ip().to_string(), target.ip().to_string());
    let payload = hex(payload);
    let argv = [
        "setpriv",
        "--reuid",
        &id,
        "--regid",
        &id,
        "--clear-groups",
        "timeout",
        "5",
        "perl",
        "-e",
        FORGE,
        &src,
        &sport,
        &dst,
        &dport,
        &payload,
    ];
    let out = lab.gw.exec(Duration::from_secs(8), &argv);
    let said = text(&out);
    if let Some(reply) = said.trim().strip_prefix("reply ") {
        Forged::Reply(unhex(reply))
    } else if said.contains("no reply") {
        Forged::NoReply
    } else if said.contains("send failed") {
        Forged::SendFailed(said)
    } else {
        panic!("forging tool failed as uid {uid}: {said}")
    }
}

/// A DNS query for `name` forged from `source` to dnsfence at `server`, as `uid`.
fn forged_query(lab: &Lab, uid: u32, source: &str, server: SocketAddr, name: &str) -> Forged {
    let bytes = query(name, RecordType::AAAA).to_vec().unwrap();
    forge(lab, uid, addr::sa(source), server, &bytes)
}

fn answer(forged: &Forged) -> Message {
    match forged {
        Forged::Reply(bytes) => Message::from_vec(bytes).unwrap(),
        other => panic!("expected a DNS reply, got {other:?}"),
    }
}

fn tools() {
    for program in ["setpriv", "perl"] {
        require_tool(program);
    }
}

#[test]
fn a_local_user_forging_an_agents_or_an_outside_ipv6_source_over_loopback_gets_nothing() {
    if !require_root(
        "a_local_user_forging_an_agents_or_an_outside_ipv6_source_over_loopback_gets_nothing",
    ) {
        return;
    }
    tools();
    let lab = Lab::new("forgelo");
    lab.upstream
        .aaaa("agent-one.test", "2001:db8:100::10", 300)
        .aaaa("agent-two.test", "2001:db8:100::20", 300)
        .aaaa("everyone.test", "2001:db8:100::66", 300);
    lab.start_fence(&policy(&lab));
    let dnsfence = SocketAddr::new(addr::GW_A1_6.into(), 53);

    // Control: the agent itself gets its group, and the element is keyed on it.
    let real = lab.a1().resolve6("agent-one.test", RecordType::AAAA);
    assert_eq!(addresses(&real), ["2001:db8:100::10"]);
    assert!(has_elem(
        &lab.set_elements("allow6"),
        &["fd77::2", "2001:db8:100::10"]
    ));

    // Control: the same forging tool, from an address the host owns, is answered (as the
    // loopback client: the default group, so the agents' name is denied).
    let own = forged_query(&lab, OTHER_UID, "[fd77::1]:0", dnsfence, "agent-two.test");
    assert_eq!(answer(&own).metadata.response_code, ResponseCode::NXDomain);
    let own = forged_query(&lab, OTHER_UID, "[fd77::1]:0", dnsfence, "everyone.test");
    assert_eq!(addresses(&answer(&own)), ["2001:db8:100::66"]);

    // Forging the agent's address: dropped before dnsfence sees it (no group, no element for
    // the agent, nothing charged to the agent's budgets), from an unprivileged user and from a
    // contained one.
    for uid in [OTHER_UID, AGENT_UID] {
        let forged = forged_query(&lab, uid, "[fd77::2]:0", dnsfence, "agent-two.test");
        assert_eq!(forged, Forged::NoReply, "uid {uid}");
    }
    assert!(!has_elem(
        &lab.set_elements("allow6"),
        &["fd77::2", "2001:db8:100::20"]
    ));

    // Reflection: a denied name carrying data, forged from an outside address and port, must
    // not have its NXDOMAIN (with the question's bytes) sent there.
    let outside = addr::sa("[2001:db8:100::66]:9999");
    let catcher = lab.inet.run(move || {
        let socket = UdpSocket::bind(outside).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        socket
    });
    let reflected = forged_query(
        &lab,
        OTHER_UID,
        &outside.to_string(),
        dnsfence,
        "c2VjcmV0.denied.test",
    );
    assert_eq!(reflected, Forged::NoReply);
    let mut buf = [0u8; 2048];
    let caught = catcher.recv_from(&mut buf);
    assert!(
        caught.is_err(),
        "the reflected reply reached {outside}: {caught:?}"
    );
    // Control: the catcher hears a datagram the gateway sends it for real (root is not
    // contained).
    lab.gw.run(move || {
        let socket = UdpSocket::bind("[::]:0").unwrap();
        socket.send_to(b"hello", outside).unwrap();
    });
    let (n, from) = catcher.recv_from(&mut buf).expect("the control datagram");
    assert_eq!(
        (&buf[..n], from.ip()),
        (&b"hello"[..], addr::GW_INET6.into())
    );

    // Nothing forged reached the query log: the agent's query and the tool's two from the
    // host's own address only.
    let log = lab.log(3);
    let clients: Vec<&str> = log.iter().filter_map(|r| r["client"].as_str()).collect();
    assert_eq!(clients, ["fd77::2", "fd77::1", "fd77::1"]);
}

#[test]
fn a_contained_user_cannot_send_from_an_agents_ipv6_address_through_its_elements() {
    if !require_root(
        "a_contained_user_cannot_send_from_an_agents_ipv6_address_through_its_elements",
    ) {
        return;
    }
    tools();
    let lab = Lab::new("forgeout");
    lab.upstream.aaaa("agent-one.test", "2001:db8:100::10", 300);
    lab.start_fence(&policy(&lab));
    let echo = addr::sa("[2001:db8:100::10]:443");

    // The agent's own element, and the agent reaching it: the control.
    let real = lab.a1().resolve6("agent-one.test", RecordType::AAAA);
    assert_eq!(addresses(&real), ["2001:db8:100::10"]);
    assert_eq!(
        lab.a1().udp(echo, Duration::from_secs(2)),
        UdpReach::Replied
    );
    lab.services.clear();

    // Control: the forging tool gets the datagram out as an uncontained user (the gateway's
    // own firewall is not dnsfence's business), so what follows tests containment only.
    let other = forge(&lab, OTHER_UID, addr::sa("[fd77::2]:40001"), echo, b"x");
    assert_ne!(
        std::mem::discriminant(&other),
        std::mem::discriminant(&Forged::SendFailed(String::new())),
        "{other:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(lab.services.hits_from(addr::A1_6.into()).len(), 1);
    lab.services.clear();

    // The contained user, forging the agent's address to the agent's admitted destination:
    // refused at the sender (EPERM), nothing arrives.
    let forged = forge(&lab, AGENT_UID, addr::sa("[fd77::2]:40002"), echo, b"x");
    assert!(matches!(forged, Forged::SendFailed(_)), "{forged:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(lab.services.hits().is_empty(), "{:?}", lab.services.hits());
}

/// Any local process may bind any of 127/8 (no `IPV6_FREEBIND` needed): each one its own
/// per-client key would let one process fill a per-client set. Every loopback source is the
/// one loopback client.
#[test]
fn every_loopback_source_is_one_client_so_127_addresses_cannot_fill_a_per_client_set() {
    if !require_root(
        "every_loopback_source_is_one_client_so_127_addresses_cannot_fill_a_per_client_set",
    ) {
        return;
    }
    let lab = Lab::new("forge127");
    lab.upstream.a("everyone.test", "198.51.100.66", 300);
    lab.start_fence(&policy(&lab));
    let dnsfence = addr::sa("127.0.0.1:53");
    let sources: Vec<String> = (1..=6).map(|i| format!("127.0.{i}.{i}")).collect();
    for source in &sources {
        let bound = addr::sa(&format!("{source}:0"));
        let message = query("everyone.test", RecordType::A);
        let reply = lab
            .gw
            .run(move || {
                let socket = UdpSocket::bind(bound).unwrap();
                dns_udp_from(&socket, dnsfence, &message, Duration::from_secs(3))
            })
            .unwrap_or_else(|e| panic!("from {source}: {e}"));
        // Control: every one of them is answered.
        assert_eq!(addresses(&reply), ["198.51.100.66"], "from {source}");
    }
    let v4 = lab.set_elements("allow4");
    assert!(has_elem(&v4, &["127.0.0.1", "198.51.100.66"]), "{v4:?}");
    for source in &sources {
        assert!(
            !has_elem(&v4, &[source, "198.51.100.66"]),
            "{source}: {v4:?}"
        );
    }
    // The log still says which address asked.
    let log = lab.log(sources.len());
    let clients: Vec<&str> = log.iter().filter_map(|r| r["client"].as_str()).collect();
    assert_eq!(clients, sources, "{log:?}");
}
