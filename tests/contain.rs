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
    format!(
        "listen: [\"10.77.0.1:53\"]
upstreams: [\"{upstream}\"]
upstream_timeout: 2s
allow:
  - \"api.allowed.test\"
qtypes: [A, AAAA]
log: \"-\"
firewall:
  table: {table}
  hooks: [{hooks}]
  on_exit: remove
  set_size: 4096
{contain}",
        upstream = addr::UPSTREAM,
        table = lab.table(),
    )
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
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
        Err(text(&out))
    }
}

/// `dig` from a process of `uid` on the gateway, asking `server` (UDP, or TCP with `tcp`) for
/// the A records of `name`: the addresses it got, or why none came.
fn dig_as(lab: &Lab, uid: u32, server: &str, name: &str, tcp: bool) -> Result<Vec<String>, String> {
    let at = format!("@{server}");
    let mut argv = vec!["dig", &at, "+time=2", "+tries=1", "+short"];
    if tcp {
        argv.push("+tcp");
    }
    argv.extend([name, "A"]);
    let out = run_as(lab, uid, &argv);
    let said = text(&out);
    if !out.status.success() || said.contains(";;") {
        return Err(said);
    }
    Ok(said.lines().map(str::to_owned).collect())
}

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
        &format!("  contain: {{uids: [{AGENT_UID}]}}\n"),
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
