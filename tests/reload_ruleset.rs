//! Reloads that change the firewall's shape (`allow_cidrs`, `per_client`, `hooks`,
//! `contain`), in real namespaces: the ruleset is replaced in one transaction while dnsfence
//! runs, the elements still justified are carried over, and a ruleset the kernel (or the
//! builder) refuses leaves the old one serving. Checked with real TCP connects from the agents
//! and the kernel's own ruleset and set contents (see `common/netns.rs` for the lab).

mod common;

use std::net::SocketAddr;

use common::lab::{LabPolicy, output_text};
use common::netns::*;
use common::require_root;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn yaml(lab: &Lab, allow: &[&str], firewall_extra: &str, extra: &str) -> String {
    LabPolicy::new(lab)
        .listen(&["10.77.0.1:53", "10.78.0.1:53"])
        .allow(allow)
        .top("ttl: {min: 30s, max: 3600s, grace: 1s}\n")
        .control(lab, "")
        .firewall(firewall_extra)
        .tail(extra)
        .yaml()
}

/// `ctl reload`, which must succeed; returns its JSON.
fn reload_ok(lab: &Lab) -> serde_json::Value {
    let out = lab.ctl(&["--json", "reload"]);
    assert!(
        out.status.success(),
        "ctl reload: {}{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        lab.fence_stderr()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn resolve_ok(host: Host<'_>, name: &str) {
    let reply = host.resolve(name, RecordType::A);
    assert_eq!(
        reply.metadata.response_code,
        ResponseCode::NoError,
        "{name}: {reply:?}"
    );
}

#[test]
fn a_reload_that_adds_allow_cidrs_opens_the_range_and_one_that_removes_it_cuts_it() {
    if !require_root("reload allow_cidrs") {
        return;
    }
    require_tool_nft();
    let lab = Lab::new("rr_cidr");
    lab.upstream.a("base.allowed.test", "198.51.100.80", 300);
    let hooks = "  hooks: [output, forward]\n";
    lab.start_fence(&yaml(&lab, &["base.allowed.test"], hooks, ""));
    resolve_ok(lab.a1(), "base.allowed.test");
    let a1 = lab.a1();
    // Control first: the admitted address connects; the range does not (never resolved).
    assert_eq!(
        a1.probe(sa("198.51.100.80", 443), CONNECT_OK),
        Reach::Connected
    );
    let before = a1.probe(sa("203.0.113.10", 443), BLOCKED_AFTER);
    assert!(
        before.is_blocked(),
        "reachable before the reload: {before:?}"
    );

    let with_cidr = format!("{hooks}  allow_cidrs: [\"203.0.113.0/28\"]\n");
    lab.write_policy(&yaml(&lab, &["base.allowed.test"], &with_cidr, ""));
    let reloaded = reload_ok(&lab);
    assert_eq!(reloaded["ruleset"]["replaced"], true, "{reloaded}");
    assert_eq!(reloaded["ruleset"]["carried"], 1, "{reloaded}");
    assert!(
        lab.table_text().contains("203.0.113.0/28"),
        "{}",
        lab.table_text()
    );
    // The range is reachable without a restart; the admitted element was carried over into
    // the new table with its remaining timeout, so it connects without a new query.
    assert_eq!(
        a1.probe(sa("203.0.113.10", 443), CONNECT_OK),
        Reach::Connected
    );
    let elems = lab.set_elements("allow4");
    let carried = find_elem(&elems, &["198.51.100.80"]).expect("carried over");
    assert!(
        carried
            .expires
            .is_some_and(|left| (200..=302).contains(&left)),
        "{carried:?}"
    );
    assert_eq!(
        a1.probe(sa("198.51.100.80", 443), CONNECT_OK),
        Reach::Connected
    );
    // Outside the range stays dropped.
    assert!(
        a1.probe(sa("203.0.113.20", 443), BLOCKED_AFTER)
            .is_blocked()
    );

    let mut stream = a1.open(sa("203.0.113.10", 80));
    echo(&mut stream, b"before").unwrap();
    let mut kept = a1.open(sa("198.51.100.80", 80));
    echo(&mut kept, b"before").unwrap();

    lab.write_policy(&yaml(&lab, &["base.allowed.test"], hooks, ""));
    let reloaded = reload_ok(&lab);
    assert_eq!(reloaded["ruleset"]["replaced"], true, "{reloaded}");
    assert!(!lab.table_text().contains("203.0.113.0/28"));
    let after = a1.probe(sa("203.0.113.10", 443), BLOCKED_AFTER);
    assert!(
        after.is_blocked(),
        "still reachable after removal: {after:?}"
    );
    // revoke.connections: cut (the default) also ends the stream into the removed range ...
    assert!(
        echo(&mut stream, b"after").is_err(),
        "stream into the removed range lives on"
    );
    assert!(
        reloaded["ruleset"]["connections_cut"].as_u64().unwrap_or(0) >= 1,
        "{reloaded}"
    );
    // ... but not the one to an address a name still justifies, which keeps connecting.
    echo(&mut kept, b"after").expect("stream to the still-allowed address");
    assert_eq!(
        a1.probe(sa("198.51.100.80", 443), CONNECT_OK),
        Reach::Connected
    );
    let line = lab
        .log(1)
        .into_iter()
        .rfind(|l| l["event"] == "reload")
        .expect("a reload line");
    assert_eq!(line["result"], "ok");
    assert_eq!(line["ruleset"]["replaced"], true, "{line}");
}

#[test]
fn a_reload_that_toggles_per_client_keeps_what_each_client_resolved_and_nothing_else() {
    if !require_root("reload per_client") {
        return;
    }
    require_tool_nft();
    let lab = Lab::new("rr_pc");
    lab.upstream.a("one.allowed.test", "198.51.100.70", 300);
    lab.upstream.a("gone.allowed.test", "198.51.100.71", 300);
    let shared = "  hooks: [output, forward]\n  per_client: false\n";
    let paired = "  hooks: [output, forward]\n  per_client: true\n";
    let both = ["one.allowed.test", "gone.allowed.test"];
    lab.start_fence(&yaml(&lab, &both, shared, ""));
    let (a1, a2) = (lab.a1(), lab.a2());
    resolve_ok(a1, "one.allowed.test");
    resolve_ok(a1, "gone.allowed.test");
    // Shared sets: an address one agent resolved is open to the other too (the control that
    // shows the switch below changes something).
    assert_eq!(
        a2.probe(sa("198.51.100.70", 443), CONNECT_OK),
        Reach::Connected
    );
    let mut stream = a1.open(sa("198.51.100.70", 80));
    echo(&mut stream, b"before").unwrap();

    // Switch per_client on and drop one name in the same reload.
    lab.write_policy(&yaml(&lab, &["one.allowed.test"], paired, ""));
    let reloaded = reload_ok(&lab);
    assert_eq!(reloaded["ruleset"]["replaced"], true, "{reloaded}");
    let elems = lab.set_elements("allow4");
    assert!(
        has_elem(&elems, &["10.77.0.2", "198.51.100.70"]),
        "{elems:?}"
    );
    assert!(
        !elems
            .iter()
            .any(|e| e.key.iter().any(|k| k == "198.51.100.71")),
        "the removed name's address was carried over: {elems:?}"
    );
    assert_eq!(elems.len(), 1, "{elems:?}");
    // The client that resolved it keeps reaching it, established stream included; the other
    // client, which never resolved it, is dropped now.
    echo(&mut stream, b"after").expect("a1's stream survives the switch");
    assert_eq!(
        a1.probe(sa("198.51.100.70", 443), CONNECT_OK),
        Reach::Connected
    );
    let other = a2.probe(sa("198.51.100.70", 443), BLOCKED_AFTER);
    assert!(other.is_blocked(), "a2 reaches a1's address: {other:?}");
    assert!(
        a1.probe(sa("198.51.100.71", 443), BLOCKED_AFTER)
            .is_blocked()
    );
    // a2 gets it by asking.
    resolve_ok(a2, "one.allowed.test");
    assert_eq!(
        a2.probe(sa("198.51.100.70", 443), CONNECT_OK),
        Reach::Connected
    );

    // And back: the per-client elements merge into one shared element.
    lab.write_policy(&yaml(&lab, &["one.allowed.test"], shared, ""));
    let reloaded = reload_ok(&lab);
    assert_eq!(reloaded["ruleset"]["replaced"], true, "{reloaded}");
    let elems = lab.set_elements("allow4");
    assert!(has_elem(&elems, &["198.51.100.70"]), "{elems:?}");
    assert_eq!(elems.len(), 1, "{elems:?}");
    assert_eq!(
        a1.probe(sa("198.51.100.70", 443), CONNECT_OK),
        Reach::Connected
    );
    assert!(
        a1.probe(sa("198.51.100.71", 443), BLOCKED_AFTER)
            .is_blocked()
    );
}

#[test]
fn a_reload_that_adds_the_forward_hook_starts_containing_routed_agents() {
    if !require_root("reload hooks") {
        return;
    }
    require_tool_nft();
    let lab = Lab::new("rr_hook");
    lab.upstream.a("one.allowed.test", "198.51.100.90", 300);
    lab.start_fence(&yaml(
        &lab,
        &["one.allowed.test"],
        "  hooks: [output]\n",
        "",
    ));
    let a1 = lab.a1();
    // Only `output`: routed agents are not contained (the control).
    assert_eq!(
        a1.probe(sa("198.51.100.91", 443), CONNECT_OK),
        Reach::Connected
    );
    assert!(!lab.table_text().contains("hook forward"));

    lab.write_policy(&yaml(
        &lab,
        &["one.allowed.test"],
        "  hooks: [output, forward]\n",
        "",
    ));
    let reloaded = reload_ok(&lab);
    assert_eq!(reloaded["ruleset"]["replaced"], true, "{reloaded}");
    let hooks: Vec<&str> = reloaded["ruleset"]["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h.as_str())
        .collect();
    assert!(hooks.contains(&"forward"), "{reloaded}");
    assert!(
        lab.table_text().contains("hook forward"),
        "{}",
        lab.table_text()
    );
    let blocked = a1.probe(sa("198.51.100.91", 443), BLOCKED_AFTER);
    assert!(
        blocked.is_blocked(),
        "routed agent not contained: {blocked:?}"
    );
    resolve_ok(a1, "one.allowed.test");
    assert_eq!(
        a1.probe(sa("198.51.100.90", 443), CONNECT_OK),
        Reach::Connected
    );
}

#[test]
fn a_reload_with_a_restart_only_firewall_key_applies_nothing_of_itself() {
    if !require_root("reload refused ruleset") {
        return;
    }
    require_tool_nft();
    let lab = Lab::new("rr_fail");
    lab.upstream.a("one.allowed.test", "198.51.100.95", 300);
    lab.upstream.a("new.allowed.test", "198.51.100.96", 300);
    let hooks = "  hooks: [output, forward]\n";
    lab.start_fence(&yaml(&lab, &["one.allowed.test"], hooks, ""));
    resolve_ok(lab.a1(), "one.allowed.test");
    let before = lab.table_text();

    // set_size needs a restart (the admission thread's maps are sized at start). The same
    // reload also adds a name, a range and a gate: none of them may apply.
    let broken = format!(
        "{hooks}  allow_cidrs: [\"203.0.113.0/28\"]\n  set_size: 8192\n  contain:\n    \
         uids: [4242]\n    interfaces: [\"veth*\"]\n"
    );
    lab.write_policy(&yaml(
        &lab,
        &["one.allowed.test", "new.allowed.test"],
        &broken,
        "",
    ));
    let out = lab.ctl(&["reload"]);
    let said = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("firewall.set_size changed"), "{said}");
    assert_eq!(lab.table_text(), before, "the ruleset changed");
    assert!(has_elem(&lab.set_elements("allow4"), &["198.51.100.95"]));
    let a1 = lab.a1();
    assert!(
        a1.probe(sa("203.0.113.10", 443), BLOCKED_AFTER)
            .is_blocked()
    );
    assert_eq!(
        a1.probe(sa("198.51.100.95", 443), CONNECT_OK),
        Reach::Connected
    );
    let reply = a1.resolve("new.allowed.test", RecordType::A);
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    // Restart-only keys are still refused whole, with the key named.
    lab.write_policy(&yaml(
        &lab,
        &["one.allowed.test"],
        &format!("{hooks}  mark: 7\n"),
        "",
    ));
    let out = lab.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("firewall.mark changed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lab.table_text(), before);
}

fn require_tool_nft() {
    common::tools::require_tool("nft");
}
