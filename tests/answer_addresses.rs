//! What one answer may put into the firewall, tried at the DNS level against the real binary
//! and a scripted upstream: a hostile allowed zone answering the agents' own addresses, private
//! addresses behind an operator's NAT64 prefix, and 4,096 addresses over TCP (as many as one
//! TCP message holds).

mod common;

use std::net::IpAddr;

use common::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

#[test]
fn an_answer_naming_an_agents_own_address_is_refused_like_a_private_one() {
    let upstream = Upstream::start();
    upstream.a("agent.allowed.test", "203.0.113.7", 300);
    upstream.a("public.allowed.test", "198.51.100.7", 300);
    let fence = Dnsfence::start(&policy(
        upstream.addr,
        &["agent.allowed.test", "public.allowed.test"],
        "clients:
  - name: agents
    from: [\"203.0.113.0/24\"]
    allow: [\"none.allowed.test\"]
",
    ));
    for reply in fence.both("agent.allowed.test", RecordType::A) {
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        assert!(addresses(&reply).is_empty(), "{:?}", addresses(&reply));
    }
    // Control: the same zone's public address is answered.
    let reply = fence.udp("public.allowed.test", RecordType::A);
    assert_eq!(addresses(&reply), ["198.51.100.7"]);
    let log = fence.log(3);
    let lines = log_for(&log, "agent.allowed.test");
    assert!(
        lines.iter().all(|l| l["reason"] == "rebinding"),
        "{lines:#?}"
    );
}

#[test]
fn private_addresses_behind_the_operators_nat64_prefix_are_refused() {
    let upstream = Upstream::start();
    upstream.aaaa("inside.allowed.test", "2001:db8:64::a00:1", 300); // 10.0.0.1
    upstream.aaaa("outside.allowed.test", "2001:db8:64::c633:6407", 300); // 198.51.100.7
    upstream.aaaa("local-use.allowed.test", "64:ff9b:1::7f00:1", 300); // 127.0.0.1
    let rules = [
        "inside.allowed.test",
        "outside.allowed.test",
        "local-use.allowed.test",
    ];
    // Control first: without nat64_prefixes the operator's prefix is just an IPv6 network.
    let plain = Dnsfence::start(&policy(upstream.addr, &rules, ""));
    let reply = plain.udp("inside.allowed.test", RecordType::AAAA);
    assert_eq!(addresses(&reply), ["2001:db8:64::a00:1"]);
    drop(plain);

    let fence = Dnsfence::start(&policy(
        upstream.addr,
        &rules,
        "nat64_prefixes: [\"2001:db8:64::/96\"]\n",
    ));
    for name in ["inside.allowed.test", "local-use.allowed.test"] {
        let reply = fence.udp(name, RecordType::AAAA);
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::NXDomain,
            "{name}"
        );
        assert!(
            addresses(&reply).is_empty(),
            "{name}: {:?}",
            addresses(&reply)
        );
    }
    let reply = fence.udp("outside.allowed.test", RecordType::AAAA);
    assert_eq!(addresses(&reply), ["2001:db8:64::c633:6407"]);
}

#[test]
fn a_4096_address_answer_over_tcp_is_cut_to_the_per_answer_quota() {
    let upstream = Upstream::start();
    let mut all = Vec::new();
    for i in 0..4096u32 {
        let ip = format!("198.51.{}.{}", 100 + i / 250, 1 + i % 250);
        upstream.a("big.allowed.test", &ip, 300);
        all.push(ip);
    }
    let fence = Dnsfence::start(&policy(upstream.addr, &["big.allowed.test"], ""));
    let reply = fence.tcp("big.allowed.test", RecordType::A);
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    let got = addresses(&reply);
    assert_eq!(got.len(), 32, "default firewall.max_addresses_per_answer");
    assert_eq!(got, all[..32], "the first 32, in the upstream's order");
    let log = fence.log(1);
    let line = log_for(&log, "big.allowed.test")[0];
    assert_eq!(line["answers"].as_array().map(Vec::len), Some(32), "{line}");
    // The upstream fits what a 64 KiB TCP message holds (over 2,000 of the 4,096); the log
    // says how many were removed.
    let removed: usize = line["error"]
        .as_str()
        .and_then(|e| {
            e.strip_suffix(
                " addresses beyond firewall.max_addresses_per_answer (32 per family) removed",
            )
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no quota line: {line}"));
    assert!(removed > 2000, "{line}");
    drop(fence);

    // Control: a quota as large as the answer lets all of it through the same path.
    let fence = Dnsfence::start(&policy(
        upstream.addr,
        &["big.allowed.test"],
        "  max_addresses_per_answer: 4096\n",
    ));
    let reply = fence.tcp("big.allowed.test", RecordType::A);
    let got: Vec<IpAddr> = addresses(&reply)
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    assert_eq!(got.len(), 32 + removed);
}
