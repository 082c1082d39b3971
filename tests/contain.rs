//! `firewall.contain`: the firewall contains the agents it names and leaves the rest of the
//! host alone, in real network namespaces (see `common/netns.rs` for the lab).
//!
//! Shape 1 (agents are processes on the host, `contain: {uids: [..]}`): the agent's processes
//! run under `setpriv` as an unprivileged uid; root and another uid on the same host are the
//! controls. Shape 2 (agents routed through a gateway, `contain: {interfaces: [..]}`): agent1's
//! link is contained, agent2 stands for a non-agent namespace routed through the same gateway.
//! Every "cannot" has a "can" through the same tool.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::Output;
use std::time::Duration;

use common::lab::{LabPolicy, dig_addresses, output_text};
use common::netns::*;
use common::{addresses, require_root};
use hickory_proto::rr::RecordType;

/// The agent's uid in shape 1, and another unprivileged uid that is not contained.
const AGENT_UID: u32 = 4242;
const OTHER_UID: u32 = 4343;

/// An address dnsfence admits (api.allowed.test) and one it never hands out.
const ADMITTED: &str = "198.51.100.10:80";
const NOT_ADMITTED: &str = "198.51.100.20:80";
/// Another DNS server than dnsfence's upstream (`addr::OTHER_DNS4`, as `dig @` takes it).
const OTHER_DNS: &str = "198.51.100.99";

fn policy(lab: &Lab, hooks: &str, contain: &str) -> String {
    LabPolicy::new(lab)
        .allow(&["api.allowed.test"])
        .top("qtypes: [A, AAAA]\n")
        .firewall(&format!("  hooks: [{hooks}]\n  set_size: 4096\n{contain}"))
        .yaml()
}

/// `argv` run in the gateway by a process of `uid` (and gid `uid`, no other groups).
fn run_as(lab: &Lab, uid: u32, argv: &[&str]) -> Output {
    let id = uid.to_string();
    let mut all = vec![
        "setpriv",
        "--reuid",
        &id,
        "--regid",
        &id,
        "--clear-groups",
        "timeout",
        "5",
    ];
    all.extend_from_slice(argv);
    lab.gw.exec(Duration::from_secs(8), &all)
}

/// A TCP connect from a process of `uid` on the gateway (perl), within `BLOCKED_AFTER`-ish.
fn connect_as(lab: &Lab, uid: u32, to: &str) -> Result<(), String> {
    let script = format!(
        "use IO::Socket::INET; IO::Socket::INET->new(PeerAddr => '{to}', Timeout => 0.8) \
         or do {{ print \"failed: $!\\n\"; exit 1 }}; print \"connected\\n\";"
    );
    let out = run_as(lab, uid, &["perl", "-e", &script]);
    if out.status.success() {
        Ok(())
    } else {
        Err(output_text(&out))
    }
}

/// `dig` from a process of `uid` on the gateway, asking `server` (UDP, or TCP with `tcp`) for
/// the A records of `name`: the addresses it got, or why none came.
fn dig_as(lab: &Lab, uid: u32, server: &str, name: &str, tcp: bool) -> Result<Vec<String>, String> {
    dig_port_as(lab, uid, server, 53, name, tcp)
}

/// [`dig_as`] to another port than 53.
fn dig_port_as(
    lab: &Lab,
    uid: u32,
    server: &str,
    port: u16,
    name: &str,
    tcp: bool,
) -> Result<Vec<String>, String> {
    let at = format!("@{server}");
    let port = port.to_string();
    let mut argv = vec!["dig", &at, "-p", &port, "+time=2", "+tries=1", "+short"];
    if tcp {
        argv.push("+tcp");
    }
    argv.extend([name, "A"]);
    dig_addresses(&run_as(lab, uid, &argv))
}

/// (With `host_dns: direct`, the behaviour from before `host_dns`: the host's own DNS goes
/// where it is sent.)
#[test]
fn shape_1_contains_only_the_named_uid_and_root_and_other_users_keep_full_egress() {
    if !require_root(
        "shape_1_contains_only_the_named_uid_and_root_and_other_users_keep_full_egress",
    ) {
        return;
    }
    let lab = Lab::new("contain1");
    lab.upstream.a("api.allowed.test", "198.51.100.10", 300);
    let yaml = policy(
        &lab,
        "output",
        &format!("  contain: {{uids: [{AGENT_UID}], host_dns: direct}}\n"),
    );
    lab.start_fence(&yaml);
    let started = lab.fence_stderr();
    assert!(
        started.contains(&format!(
            "for the contained agents only (uids {AGENT_UID}; firewall.contain)"
        )),
        "the start line must say who is contained:\n{started}"
    );

    // The agent resolves through dnsfence and reaches what it was given, and nothing else.
    assert_eq!(
        dig_as(&lab, AGENT_UID, "127.0.0.1", "api.allowed.test", false),
        Ok(vec!["198.51.100.10".to_string()])
    );
    assert_eq!(connect_as(&lab, AGENT_UID, ADMITTED), Ok(()));
    let blocked = connect_as(&lab, AGENT_UID, NOT_ADMITTED);
    assert!(
        blocked.is_err(),
        "the contained uid reached an address dnsfence never handed out\n{}",
        lab.ruleset()
    );
    // Root (sshd, the package manager) and another user on the same host are untouched.
    for uid in [0, OTHER_UID] {
        assert_eq!(
            connect_as(&lab, uid, NOT_ADMITTED),
            Ok(()),
            "uid {uid} is not contained and must keep its egress\n{}",
            lab.ruleset()
        );
    }
    // DNS: whatever server the agent asks, over UDP or TCP, dnsfence answers (transparent
    // interception), while the others reach the server they asked. The other server answers
    // the same name with another address, so the answer says who answered.
    lab.other_dns4.a("api.allowed.test", "198.51.100.66", 300);
    lab.other_dns4.clear_seen();
    for tcp in [false, true] {
        assert_eq!(
            dig_as(&lab, AGENT_UID, OTHER_DNS, "api.allowed.test", tcp),
            Ok(vec!["198.51.100.10".to_string()]),
            "the contained uid's DNS to another server must be answered by dnsfence (tcp: {tcp})\n{}",
            lab.ruleset()
        );
    }
    assert!(
        lab.other_dns4.seen().is_empty(),
        "the contained uid's query reached the other server: {:?}",
        lab.other_dns4.seen()
    );
    let asked = lab
        .log(3)
        .iter()
        .filter(|l| l["qname"] == "api.allowed.test.")
        .count();
    assert!(
        asked >= 3,
        "dnsfence's log must show the intercepted queries ({asked})"
    );
    // A name the policy denies gets dnsfence's NXDOMAIN, not the other server's answer.
    lab.other_dns4.a("elsewhere.test", "198.51.100.66", 300);
    assert_eq!(
        dig_as(&lab, AGENT_UID, OTHER_DNS, "elsewhere.test", false),
        Ok(vec![])
    );
    for uid in [0, OTHER_UID] {
        assert_eq!(
            dig_as(&lab, uid, OTHER_DNS, "api.allowed.test", false),
            Ok(vec!["198.51.100.66".to_string()]),
            "uid {uid} is not contained: its DNS goes where it sent it"
        );
    }
    // What is not plain DNS is not rewritten: DNS over TLS stays dropped for the agent only.
    let dot = connect_as(&lab, AGENT_UID, "198.51.100.99:853");
    assert!(dot.is_err(), "the contained uid reached port 853");
    assert_eq!(connect_as(&lab, OTHER_UID, "198.51.100.99:853"), Ok(()));
}

#[test]
fn shape_2_contains_the_agents_interface_and_leaves_other_namespaces_and_the_gateway_alone() {
    if !require_root(
        "shape_2_contains_the_agents_interface_and_leaves_other_namespaces_and_the_gateway_alone",
    ) {
        return;
    }
    let lab = Lab::new("contain2");
    lab.upstream.a("api.allowed.test", "198.51.100.10", 300);
    let yaml = policy(&lab, "forward", "  contain: {interfaces: [\"to-a1\"]}\n");
    lab.start_fence(&yaml);

    // A stand-in for the gateway's SSH: a TCP listener of root's on every address.
    let ssh = lab
        .gw
        .run(|| TcpListener::bind("0.0.0.0:2222").expect("bind the gateway's port"));
    let gw_from_a1: SocketAddr = "10.77.0.1:2222".parse().unwrap();
    let gw_from_a2: SocketAddr = "10.78.0.1:2222".parse().unwrap();
    let admitted: SocketAddr = ADMITTED.parse().unwrap();
    let not_admitted: SocketAddr = NOT_ADMITTED.parse().unwrap();

    // agent1 is contained: what dnsfence answered, nothing else, not the gateway's port.
    let a1 = lab.a1();
    let answer = a1.resolve("api.allowed.test", RecordType::A);
    assert_eq!(answer.answers.len(), 1, "{answer:?}");
    assert_eq!(
        a1.run(move || tcp_probe(admitted, CONNECT_OK)),
        Reach::Connected
    );
    let reach = a1.run(move || tcp_probe(not_admitted, BLOCKED_AFTER));
    assert!(
        reach.is_blocked(),
        "agent1 reached {not_admitted}: {reach:?}\n{}",
        lab.ruleset()
    );
    let reach = a1.run(move || tcp_probe(gw_from_a1, BLOCKED_AFTER));
    assert!(
        reach.is_blocked(),
        "agent1 reached the gateway's port: {reach:?}"
    );

    // agent1's DNS to another server, UDP and TCP, is answered by dnsfence.
    lab.other_dns4.a("api.allowed.test", "198.51.100.66", 300);
    lab.other_dns4.clear_seen();
    let other: SocketAddr = addr::OTHER_DNS4.parse().unwrap();
    for tcp in [false, true] {
        let reply = a1
            .try_resolve(other, "api.allowed.test", RecordType::A, tcp)
            .unwrap_or_else(|e| {
                panic!(
                    "agent1's DNS to {other} (tcp: {tcp}): {e}\n{}",
                    lab.ruleset()
                )
            });
        assert_eq!(addresses(&reply), ["198.51.100.10"], "tcp: {tcp}");
    }
    assert!(
        lab.other_dns4.seen().is_empty(),
        "agent1's query reached the other server"
    );

    // agent2 is not an agent: anywhere, the gateway's port, and its own choice of resolver.
    let a2 = lab.a2();
    assert_eq!(
        a2.run(move || tcp_probe(not_admitted, CONNECT_OK)),
        Reach::Connected
    );
    assert_eq!(
        a2.run(move || tcp_probe(gw_from_a2, CONNECT_OK)),
        Reach::Connected
    );
    let reply = a2
        .try_resolve(other, "api.allowed.test", RecordType::A, false)
        .expect("a non-agent namespace asks any resolver it likes");
    assert_eq!(addresses(&reply), ["198.51.100.66"]);
    drop(ssh);
}

/// A DNS relay run by root on the gateway, standing in for systemd-resolved, nscd or dnsmasq
/// (uncontained programs that resolve for any local process and send the question on as
/// themselves): UDP on `127.0.0.1:<port>` (not a DNS port, so a contained process may reach
/// it through `lo`), each query forwarded from a fresh socket to `to`, the answer sent back.
/// Bounded: at most 64 queries, stops when dropped.
struct Relay {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(lab: &Lab, port: u16, to: SocketAddr) -> Relay {
        use std::net::UdpSocket;
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = std::sync::Arc::clone(&stop);
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let thread = lab.gw.spawn(move || {
            let listener = UdpSocket::bind(("127.0.0.1", port)).expect("bind the relay");
            listener
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            bound_tx.send(()).unwrap();
            let mut buf = [0u8; 4096];
            let mut relayed = 0;
            while !stopped.load(Ordering::Relaxed) && relayed < 64 {
                let Ok((len, client)) = listener.recv_from(&mut buf) else {
                    continue;
                };
                relayed += 1;
                let out = UdpSocket::bind("0.0.0.0:0").unwrap();
                out.set_read_timeout(Some(Duration::from_millis(1500)))
                    .unwrap();
                if out.send_to(&buf[..len], to).is_err() {
                    continue;
                }
                let mut answer = [0u8; 4096];
                if let Ok((n, _)) = out.recv_from(&mut answer) {
                    let _ = listener.send_to(&answer[..n], client);
                }
            }
        });
        bound_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the relay is listening");
        Relay {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `host_dns: dnsfence` (the default with `contain`): the host's own DNS reaches dnsfence and
/// nothing else, so a relay on the host cannot carry a contained agent's names out. The same
/// checks under `host_dns: direct` first, as the control: there root reaches the other
/// resolver and the agent's denied name leaves through the relay.
#[test]
fn shape_1_host_dns_through_dnsfence_closes_the_host_relays_and_keeps_dnsfence_working() {
    if !require_root(
        "shape_1_host_dns_through_dnsfence_closes_the_host_relays_and_keeps_dnsfence_working",
    ) {
        return;
    }
    let lab = Lab::new("hostdns");
    lab.upstream.a("api.allowed.test", "198.51.100.10", 300);
    lab.other_dns4.a("api.allowed.test", "198.51.100.66", 300);
    lab.other_dns4.a("secret.exfil.test", "198.51.100.77", 300);
    let other: SocketAddr = addr::OTHER_DNS4.parse().unwrap();
    // A relay that asks the other resolver (systemd-resolved with its own DNS=), and one that
    // asks dnsfence (resolved with DNS= pointed at dnsfence, as the README says to).
    let to_other = Relay::start(&lab, 5300, other);
    let to_dnsfence = Relay::start(&lab, 5301, "10.77.0.1:53".parse().unwrap());
    let contain = |host_dns: &str| {
        policy(
            &lab,
            "output",
            &format!("  contain: {{uids: [{AGENT_UID}]{host_dns}}}\n"),
        )
    };

    // Control, host_dns: direct: root asks the other resolver and is answered; the agent's
    // denied name leaves through the relay and comes back with the other server's answer.
    lab.start_fence(&contain(", host_dns: direct"));
    lab.other_dns4.clear_seen();
    for tcp in [false, true] {
        assert_eq!(
            dig_as(&lab, 0, OTHER_DNS, "api.allowed.test", tcp),
            Ok(vec!["198.51.100.66".to_string()]),
            "with host_dns: direct root reaches the other resolver (tcp: {tcp})"
        );
    }
    assert_eq!(
        dig_port_as(
            &lab,
            AGENT_UID,
            "127.0.0.1",
            5300,
            "secret.exfil.test",
            false
        ),
        Ok(vec!["198.51.100.77".to_string()]),
        "with host_dns: direct the relay carries the agent's name out\n{}",
        lab.ruleset()
    );
    assert_eq!(lab.other_dns4.seen_for("secret.exfil.test").len(), 1);
    assert_eq!(connect_as(&lab, 0, "198.51.100.99:853"), Ok(()));
    lab.stop_fence();

    // host_dns: dnsfence (the default): the same attempts get nothing through.
    lab.start_fence(&contain(""));
    let started = lab.fence_stderr();
    assert!(
        started.contains("the host's own DNS (53, 853) reaches dnsfence only"),
        "the start line must say where the host's DNS goes:\n{started}"
    );
    lab.other_dns4.clear_seen();
    lab.upstream.clear_seen();
    for tcp in [false, true] {
        let reply = dig_as(&lab, 0, OTHER_DNS, "api.allowed.test", tcp);
        assert!(
            reply.is_err(),
            "root's DNS reached another resolver (tcp: {tcp}): {reply:?}\n{}",
            lab.ruleset()
        );
    }
    assert!(
        connect_as(&lab, 0, "198.51.100.99:853").is_err(),
        "root reached port 853 of another resolver"
    );
    let leaked = dig_port_as(
        &lab,
        AGENT_UID,
        "127.0.0.1",
        5300,
        "secret.exfil.test",
        false,
    );
    assert!(
        leaked.is_err(),
        "the relay carried the agent's name out: {leaked:?}"
    );
    assert!(
        lab.other_dns4.seen().is_empty(),
        "the other resolver saw queries: {:?}",
        lab.other_dns4.seen()
    );
    // Root's other egress is untouched (the same tool that failed above on 853 and 53).
    assert_eq!(connect_as(&lab, 0, NOT_ADMITTED), Ok(()));
    // dnsfence's own marked upstream queries still leave: root asking dnsfence gets the
    // allowed name from the upstream.
    assert_eq!(
        dig_as(&lab, 0, "10.77.0.1", "api.allowed.test", false),
        Ok(vec!["198.51.100.10".to_string()])
    );
    assert_eq!(lab.upstream.seen_for("api.allowed.test").len(), 1);
    // A relay pointed at dnsfence works, under dnsfence's policy: allowed names resolve, a
    // denied one is NXDOMAIN and never reaches any upstream.
    assert_eq!(
        dig_port_as(
            &lab,
            AGENT_UID,
            "127.0.0.1",
            5301,
            "api.allowed.test",
            false
        ),
        Ok(vec!["198.51.100.10".to_string()])
    );
    assert_eq!(
        dig_port_as(
            &lab,
            AGENT_UID,
            "127.0.0.1",
            5301,
            "secret.exfil.test",
            false
        ),
        Ok(vec![])
    );
    assert!(lab.upstream.seen_for("secret.exfil.test").is_empty());
    // The contained uid's DNS to another server is still intercepted and answered by dnsfence.
    for tcp in [false, true] {
        assert_eq!(
            dig_as(&lab, AGENT_UID, OTHER_DNS, "api.allowed.test", tcp),
            Ok(vec!["198.51.100.10".to_string()]),
            "the contained uid's DNS must still be answered by dnsfence (tcp: {tcp})\n{}",
            lab.ruleset()
        );
    }
    assert!(lab.other_dns4.seen().is_empty());
    drop((to_other, to_dnsfence));
}
