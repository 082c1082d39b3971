//! Revocation in real namespaces: after a reload or the end of a grant, what the policy no
//! longer allows leaves the kernel's sets, new connections fail, and established ones are cut
//! (or kept, when the policy says so). Checked with the kernel's own set contents and real TCP
//! streams through the gateway (see `common/netns.rs` for the lab).

mod common;

use std::time::{Duration, Instant};

use common::lab::LabPolicy;
use common::netns::*;
use common::{require_root, sa};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

fn yaml(lab: &Lab, allow: &[&str], extra: &str) -> String {
    LabPolicy::new(lab)
        .allow(allow)
        .top("ttl: {min: 30s, max: 3600s, grace: 1s}\n")
        .control(lab, "")
        .firewall("  hooks: [output, forward]\n")
        .tail(extra)
        .yaml()
}

fn sighup(lab: &Lab) {
    let pid = lab.fence_pid().expect("dnsfence runs");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
}

fn has(lab: &Lab, ip: &str) -> bool {
    has_elem(&lab.set_elements("allow4"), &[ip])
}

/// Waits until `ip` is out of the set; returns how long it took, or panics after `limit`.
fn wait_revoked(lab: &Lab, ip: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    while has(lab, ip) {
        assert!(
            start.elapsed() < limit,
            "{ip} still in the set after {limit:?}: {:?}\nstderr:\n{}",
            lab.set_elements("allow4"),
            lab.fence_stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

fn resolve_ok(lab: &Lab, name: &str) {
    let reply = lab.a1().resolve(name, RecordType::A);
    assert_eq!(
        reply.metadata.response_code,
        ResponseCode::NoError,
        "{name}: {reply:?}"
    );
}

/// The scenario of both connection modes: returns (the stream to the revoked address still
/// echoes, the stream to the kept address still echoes).
fn remove_a_name_and_sighup(tag: &str, connections: &str) -> (bool, bool) {
    let lab = Lab::new(tag);
    lab.upstream.a("gone.allowed.test", "198.51.100.20", 300);
    lab.upstream.a("kept.allowed.test", "198.51.100.21", 300);
    lab.upstream.a("shared1.allowed.test", "198.51.100.22", 300);
    lab.upstream.a("shared2.allowed.test", "198.51.100.22", 300);
    let extra = format!("revoke:\n  connections: {connections}\n");
    let all = [
        "gone.allowed.test",
        "kept.allowed.test",
        "shared1.allowed.test",
        "shared2.allowed.test",
    ];
    lab.start_fence(&yaml(&lab, &all, &extra));
    for name in all {
        resolve_ok(&lab, name);
    }
    let a1 = lab.a1();
    let mut doomed = a1.open(sa("198.51.100.20", 80));
    let mut kept = a1.open(sa("198.51.100.21", 80));
    echo(&mut doomed, b"before").unwrap();
    echo(&mut kept, b"before").unwrap();
    assert!(has(&lab, "198.51.100.20") && has(&lab, "198.51.100.22"));

    lab.write_policy(&yaml(
        &lab,
        &["kept.allowed.test", "shared2.allowed.test"],
        &extra,
    ));
    sighup(&lab);
    let took = wait_revoked(&lab, "198.51.100.20", Duration::from_secs(1));
    eprintln!("{tag}: element revoked {took:?} after SIGHUP");
    // Still justified: by the name kept, and by the other name of a shared address.
    assert!(has(&lab, "198.51.100.21"), "kept name's element");
    assert!(has(&lab, "198.51.100.22"), "shared address still justified");

    // New connections: the revoked address is blocked; the control through the same gateway
    // still connects.
    let blocked = a1.probe(sa("198.51.100.20", 443), BLOCKED_AFTER);
    assert!(blocked.is_blocked(), "{blocked:?}");
    assert_eq!(
        a1.probe(sa("198.51.100.21", 443), CONNECT_OK),
        Reach::Connected
    );
    assert_eq!(
        a1.probe(sa("198.51.100.22", 443), CONNECT_OK),
        Reach::Connected
    );

    // The name is denied locally, never forwarded.
    lab.upstream.clear_seen();
    let reply = lab.a1().resolve("gone.allowed.test", RecordType::A);
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    assert!(lab.upstream.seen_for("gone.allowed.test").is_empty());

    let reload = lab
        .log(1)
        .into_iter()
        .find(|l| l["event"] == "reload")
        .expect("a reload line");
    assert_eq!(reload["result"], "ok");
    assert_eq!(reload["revoked"]["elements"], 1, "{reload}");

    let doomed_alive = echo(&mut doomed, b"after").is_ok();
    let kept_alive = echo(&mut kept, b"after").is_ok();
    (doomed_alive, kept_alive)
}

#[test]
fn a_removed_name_is_revoked_within_a_second_and_its_established_stream_is_cut() {
    if !require_root("revocation cut") {
        return;
    }
    let (doomed, kept) = remove_a_name_and_sighup("rv_cut", "cut");
    assert!(!doomed, "the stream to the revoked address lives on");
    assert!(kept, "the stream to the address still allowed was cut too");
}

#[test]
fn with_connections_keep_an_established_stream_outlives_the_revocation() {
    if !require_root("revocation keep") {
        return;
    }
    let (doomed, kept) = remove_a_name_and_sighup("rv_keep", "keep");
    assert!(doomed, "connections: keep, but the stream was cut");
    assert!(kept);
}

#[test]
fn a_grant_admits_for_its_time_only_and_its_elements_go_when_it_ends() {
    if !require_root("grant revocation") {
        return;
    }
    let lab = Lab::new("rv_grant");
    lab.upstream.a("tmp.granted.test", "198.51.100.30", 3600);
    lab.upstream.a("base.allowed.test", "198.51.100.31", 3600);
    lab.start_fence(&yaml(
        &lab,
        &["base.allowed.test"],
        "grants:\n  on_expiry: cut\n",
    ));
    let denied = lab.a1().resolve("tmp.granted.test", RecordType::A);
    assert_eq!(denied.metadata.response_code, ResponseCode::NXDomain);

    let out = lab.ctl(&[
        "grant",
        "tmp.granted.test",
        "--ttl",
        "2s",
        "--reason",
        "lab",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let granted = Instant::now();
    resolve_ok(&lab, "tmp.granted.test");
    resolve_ok(&lab, "base.allowed.test");
    let a1 = lab.a1();
    let mut stream = a1.open(sa("198.51.100.30", 80));
    echo(&mut stream, b"during").unwrap();
    // Capped at admission: the grant's end plus grace (1 s), not the answer's hour.
    let elems = lab.set_elements("allow4");
    let elem = find_elem(&elems, &["198.51.100.30"]).expect("admitted");
    assert!(
        elem.timeout.is_some_and(|t| t <= 3),
        "element outlives the grant: {elem:?}"
    );
    let base = find_elem(&elems, &["198.51.100.31"]).expect("admitted");
    assert!(base.timeout.is_some_and(|t| t > 3000), "{base:?}");

    // At its end: revoked (within the expiry check's 100 ms plus a kernel round trip), the
    // name denied, the stream cut (on_expiry: cut), the policy's own name untouched.
    let left = Duration::from_secs(2).saturating_sub(granted.elapsed());
    wait_revoked(&lab, "198.51.100.30", left + Duration::from_millis(800));
    assert!(granted.elapsed() >= Duration::from_millis(1900));
    let reply = lab.a1().resolve("tmp.granted.test", RecordType::A);
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    assert!(echo(&mut stream, b"after").is_err(), "stream not cut");
    let blocked = a1.probe(sa("198.51.100.30", 443), BLOCKED_AFTER);
    assert!(blocked.is_blocked(), "{blocked:?}");
    assert!(has(&lab, "198.51.100.31"));
    assert_eq!(
        a1.probe(sa("198.51.100.31", 443), CONNECT_OK),
        Reach::Connected
    );
}
