//! Why was it dropped? In real namespaces, with `firewall.log_denied: nflog`: connects the
//! firewall drops (to a never-resolved address, to an expired one, to port 53 of an admitted
//! host) each give exactly one explained `drop` line in the query log, even under a burst, and
//! `dnsfence why` (live, over the control socket, and offline from the log) agrees. A name a
//! reload removed gives `revoked`; with per-client sets, another agent's address `other-client`.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::*;
use common::{BIN, addresses, require_root, sa};
use hickory_proto::rr::RecordType;

const BURST: usize = 20;

/// The `drop` lines of the query log.
fn drops(lab: &Lab) -> Vec<serde_json::Value> {
    lab.log(0)
        .into_iter()
        .filter(|l| l["event"] == "drop")
        .collect()
}

/// Waits (at most 5 s) for a drop line to `dst`, then a little more for any duplicate; returns
/// every drop line to `dst`.
fn drops_to(lab: &Lab, dst: &str) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !drops(lab).iter().any(|l| l["dst"] == dst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    drops(lab).into_iter().filter(|l| l["dst"] == dst).collect()
}

/// A burst of connects from agent1, all of which must be dropped.
fn burst(lab: &Lab, target: SocketAddr) {
    let targets = vec![target; BURST];
    for reach in lab.a1().probe_all(&targets, BLOCKED_AFTER) {
        assert!(reach.is_blocked(), "{target} was reached: {reach:?}");
    }
}

/// `dnsfence why ARGS`: its exit code, and stdout then stderr.
fn why(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN).arg("why").args(args).output().unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn each_drop_is_explained_once_and_why_agrees() {
    if !require_root("each_drop_is_explained_once_and_why_agrees") {
        return;
    }
    let lab = Lab::new("drops");
    lab.upstream.a("stale.allowed.test", "198.51.100.30", 300);
    lab.upstream.a("dns.allowed.test", "198.51.100.99", 300);
    let socket = lab.dir.path().join("control.sock");
    lab.start_fence(&format!(
        "listen: [\"10.77.0.1:53\"]
upstreams: [\"{upstream}\"]
allow: [stale.allowed.test, dns.allowed.test]
ttl: {{min: 1s, max: 2s, grace: 0s}}
firewall:
  enabled: true
  table: {table}
  hooks: [output, forward]
  on_exit: remove
  log_denied: nflog
  nflog_group: 7
control:
  socket: \"{socket}\"
metrics: {{listen: \"127.0.0.1:9153\"}}
",
        upstream = addr::UPSTREAM,
        table = lab.table(),
        socket = socket.display(),
    ));
    let socket = socket.display().to_string();
    let a1 = lab.a1();
    let agent = addr::A1_4.to_string();

    // Never resolved: a hard-coded address.
    burst(&lab, sa("198.51.100.40", 443));
    let lines = drops_to(&lab, "198.51.100.40");
    assert_eq!(lines.len(), 1, "{lines:#?}\n{}", lab.fence_stderr());
    let line = &lines[0];
    assert_eq!(line["explanation"], "never-resolved", "{line}");
    assert_eq!(line["client"], agent.as_str());
    assert_eq!(line["proto"], "tcp");
    assert_eq!(line["dport"], 443);
    assert_eq!(line["names"], serde_json::json!([]));
    let (code, text) = why(&["198.51.100.40", "--client", &agent, "--socket", &socket]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("(never-resolved)"), "{text}");

    // Expired: admitted for 2 s (ttl.max), reached (the control, same probe), then used after.
    assert_eq!(
        addresses(&a1.resolve("stale.allowed.test", RecordType::A)),
        ["198.51.100.30"]
    );
    assert_eq!(
        a1.probe(sa("198.51.100.30", 443), CONNECT_OK),
        Reach::Connected,
        "admitted address reachable"
    );
    std::thread::sleep(Duration::from_millis(3000));
    burst(&lab, sa("198.51.100.30", 443));
    let lines = drops_to(&lab, "198.51.100.30");
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["explanation"], "expired", "{}", lines[0]);
    assert_eq!(lines[0]["names"], serde_json::json!(["stale.allowed.test"]));
    assert!(lines[0]["admitted_until"].is_string(), "{}", lines[0]);
    let (code, text) = why(&["198.51.100.30", "--client", &agent, "--socket", &socket]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("(expired)") && text.contains("stale.allowed.test"),
        "{text}"
    );

    // DNS to an admitted host: port 53 is dropped before the allow sets, other ports pass.
    assert_eq!(
        addresses(&a1.resolve("dns.allowed.test", RecordType::A)),
        ["198.51.100.99"]
    );
    assert_eq!(
        a1.probe(sa("198.51.100.99", 80), CONNECT_OK),
        Reach::Connected,
        "admitted host reachable on another port"
    );
    burst(&lab, sa("198.51.100.99", 53));
    let lines = drops_to(&lab, "198.51.100.99");
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["explanation"], "dns-bypass", "{}", lines[0]);
    assert_eq!(lines[0]["dport"], 53);
    assert_eq!(lines[0]["names"], serde_json::json!(["dns.allowed.test"]));
    // why names the same host, admitted (the drop is by port, not by address).
    let (code, text) = why(&["198.51.100.99", "--socket", &socket]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("dns.allowed.test"), "{text}");

    // The counters agree with the lines.
    let page = lab.gw.run(|| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9153").unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n").unwrap();
        let mut page = String::new();
        s.read_to_string(&mut page).unwrap();
        page
    });
    for explanation in ["never-resolved", "expired", "dns-bypass"] {
        let series = format!("dnsfence_firewall_drops_total{{explanation=\"{explanation}\"}} 1");
        assert!(page.contains(&series), "{series} in\n{page}");
    }

    // Offline, from the same query log: the same answers.
    let log = lab.log_path().display().to_string();
    let policy = lab.policy_path().display().to_string();
    let (code, text) = why(&["198.51.100.40", "--log", &log, "--policy", &policy]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("never resolved"), "{text}");
    let (code, text) = why(&["198.51.100.30", "--log", &log, "--policy", &policy]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("expired at") && text.contains("stale.allowed.test"),
        "{text}"
    );
}

/// A policy for agent1's gateway address, with drops logged to NFLOG group 7.
fn nflog_policy(lab: &Lab, allow: &[&str], per_client: bool) -> String {
    format!(
        "listen: [\"10.77.0.1:53\"]
upstreams: [\"{upstream}\"]
allow: [{allow}]
firewall:
  enabled: true
  table: {table}
  hooks: [output, forward]
  on_exit: remove
  per_client: {per_client}
  log_denied: nflog
  nflog_group: 7
revoke: {{connections: cut}}
control:
  socket: \"{socket}\"
",
        upstream = addr::UPSTREAM,
        allow = allow.join(", "),
        table = lab.table(),
        socket = lab.dir.path().join("control.sock").display(),
    )
}

#[test]
fn a_name_a_reload_removed_is_explained_as_revoked() {
    if !require_root("a_name_a_reload_removed_is_explained_as_revoked") {
        return;
    }
    let lab = Lab::new("droprev");
    lab.upstream.a("gone.allowed.test", "198.51.100.20", 300);
    lab.start_fence(&nflog_policy(
        &lab,
        &["gone.allowed.test", "kept.allowed.test"],
        false,
    ));
    let a1 = lab.a1();
    assert_eq!(
        addresses(&a1.resolve("gone.allowed.test", RecordType::A)),
        ["198.51.100.20"]
    );
    assert_eq!(
        a1.probe(sa("198.51.100.20", 443), CONNECT_OK),
        Reach::Connected
    );
    let tmp = lab.dir.path().join(".policy.tmp");
    std::fs::write(&tmp, nflog_policy(&lab, &["kept.allowed.test"], false)).unwrap();
    std::fs::rename(&tmp, lab.policy_path()).unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(lab.fence_pid().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lab.log(0).iter().any(|l| l["event"] == "revoke") {
        assert!(
            Instant::now() < deadline,
            "no revoke event\n{}",
            lab.fence_stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    burst(&lab, sa("198.51.100.20", 443));
    let lines = drops_to(&lab, "198.51.100.20");
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["explanation"], "revoked", "{}", lines[0]);
    assert_eq!(lines[0]["names"], serde_json::json!(["gone.allowed.test"]));
    assert!(lines[0]["revoked_at"].is_string(), "{}", lines[0]);
    let socket = lab.dir.path().join("control.sock").display().to_string();
    let (code, text) = why(&["198.51.100.20", "--socket", &socket]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("(revoked)") && text.contains("gone.allowed.test"),
        "{text}"
    );
}

#[test]
fn with_per_client_sets_another_agents_address_is_other_client() {
    if !require_root("with_per_client_sets_another_agents_address_is_other_client") {
        return;
    }
    let lab = Lab::new("dropoc");
    lab.upstream.a("mine.allowed.test", "198.51.100.21", 300);
    lab.start_fence(&nflog_policy(&lab, &["mine.allowed.test"], true));
    assert_eq!(
        addresses(&lab.a1().resolve("mine.allowed.test", RecordType::A)),
        ["198.51.100.21"]
    );
    // The control: the agent that asked reaches it.
    assert_eq!(
        lab.a1().probe(sa("198.51.100.21", 443), CONNECT_OK),
        Reach::Connected
    );
    let targets = vec![sa("198.51.100.21", 443); BURST];
    for reach in lab.a2().probe_all(&targets, BLOCKED_AFTER) {
        assert!(
            reach.is_blocked(),
            "agent2 reached agent1's address: {reach:?}"
        );
    }
    let lines = drops_to(&lab, "198.51.100.21");
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["explanation"], "other-client", "{}", lines[0]);
    assert_eq!(lines[0]["client"], addr::A2_4.to_string());
    assert_eq!(lines[0]["names"], serde_json::json!(["mine.allowed.test"]));
    assert_eq!(
        lines[0]["admitted_for"],
        serde_json::json!([addr::A1_4.to_string()])
    );
    let socket = lab.dir.path().join("control.sock").display().to_string();
    let a2 = addr::A2_4.to_string();
    let (code, text) = why(&["198.51.100.21", "--client", &a2, "--socket", &socket]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("(other-client)"), "{text}");
}
