//! The filtering resolver end to end: the real binary, a real upstream on loopback, real
//! UDP and TCP queries. Every denial test also asserts the upstream never saw the name.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

#[test]
fn allowed_name_is_answered_with_the_upstreams_records_over_udp_and_tcp() {
    let upstream = Upstream::start();
    upstream.a("api.allowed.test", "198.51.100.10", 300);
    upstream.a("api.allowed.test", "198.51.100.11", 300);
    let fence = fence_with(&upstream, &["api.allowed.test"], "");
    for reply in fence.both("api.allowed.test", RecordType::A) {
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        let mut got = addresses(&reply);
        got.sort();
        assert_eq!(got, ["198.51.100.10", "198.51.100.11"]);
        assert!(reply.metadata.recursion_available);
    }
}

#[test]
fn denied_names_get_nxdomain_and_never_reach_the_upstream() {
    let upstream = Upstream::start();
    upstream.a("evil.test", "198.51.100.66", 300);
    upstream.a("api.allowed.test.evil.test", "198.51.100.66", 300);
    upstream.a("evilallowed.test", "198.51.100.66", 300);
    let fence = fence_with(&upstream, &["api.allowed.test", "*.wild.allowed.test"], "");
    for denied in [
        "evil.test",
        "api.allowed.test.evil.test",
        "evilallowed.test",
        "x.api.allowed.test",
        "wild.allowed.test",
        "a.b.wild.allowed.test",
        "exfil-4142434445.evil.test",
    ] {
        for reply in fence.both(denied, RecordType::A) {
            assert_eq!(
                reply.metadata.response_code,
                ResponseCode::NXDomain,
                "{denied}"
            );
            assert!(reply.answers.is_empty());
        }
    }
    assert!(
        upstream.seen().is_empty(),
        "upstream saw {:?}",
        upstream.seen()
    );
}

#[test]
fn deny_with_refused_answers_refused() {
    let upstream = Upstream::start();
    let fence = fence_with(&upstream, &["api.allowed.test"], "deny_with: refused\n");
    for reply in fence.both("evil.test", RecordType::A) {
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    }
    assert!(upstream.seen().is_empty());
}

#[test]
fn query_types_outside_qtypes_are_answered_locally() {
    let upstream = Upstream::start();
    upstream.txt("api.allowed.test", "secret", 300);
    let fence = fence_with(&upstream, &["api.allowed.test"], "qtypes: [A, AAAA]\n");
    for qtype in [
        RecordType::TXT,
        RecordType::NULL,
        RecordType::ANY,
        RecordType::MX,
    ] {
        for reply in fence.both("api.allowed.test", qtype) {
            assert_eq!(
                reply.metadata.response_code,
                ResponseCode::NXDomain,
                "{qtype}"
            );
        }
    }
    assert!(
        upstream.seen().is_empty(),
        "upstream saw {:?}",
        upstream.seen()
    );
    let log = fence.log(8);
    assert!(
        log.iter()
            .all(|l| l["decision"] == "deny" && l["reason"] == "qtype"),
        "{log:?}"
    );
}

#[test]
fn two_questions_in_one_message_get_formerr_and_nothing_upstream() {
    let upstream = Upstream::start();
    upstream.a("api.allowed.test", "198.51.100.10", 300);
    let fence = fence_with(&upstream, &["api.allowed.test"], "");
    let mut message = query("api.allowed.test", RecordType::A);
    message.add_query(Query::query(name("evil.test"), RecordType::A));
    for reply in [
        query_udp(fence.addr, &message).unwrap(),
        query_tcp(fence.addr, &message).unwrap(),
    ] {
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        assert!(reply.answers.is_empty());
    }
    assert!(upstream.seen().is_empty());
}

#[test]
fn a_query_carrying_answer_records_gets_formerr() {
    let upstream = Upstream::start();
    let fence = fence_with(&upstream, &["api.allowed.test"], "");
    let mut message = query("api.allowed.test", RecordType::A);
    message.add_answer(Record::from_rdata(
        name("smuggled.evil.test"),
        60,
        RData::A(A::new(1, 2, 3, 4)),
    ));
    let reply = query_udp(fence.addr, &message).unwrap();
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    assert!(upstream.seen().is_empty());
}

#[test]
fn opcodes_other_than_query_get_notimp() {
    let upstream = Upstream::start();
    let fence = fence_with(&upstream, &["api.allowed.test"], "");
    for op in [OpCode::Status, OpCode::Notify, OpCode::Update] {
        let mut message = query("api.allowed.test", RecordType::A);
        message.metadata.op_code = op;
        let reply = query_tcp(fence.addr, &message).unwrap();
        assert_eq!(reply.metadata.response_code, ResponseCode::NotImp, "{op:?}");
    }
    assert!(upstream.seen().is_empty());
}

#[test]
fn cname_chains_are_kept_and_records_for_other_names_dropped() {
    let upstream = Upstream::start();
    upstream
        .cname("www.allowed.test", "edge.cdn.test", 120)
        .cname("edge.cdn.test", "node7.cdn.test", 60)
        .a("node7.cdn.test", "198.51.100.7", 30);
    upstream.extra_answer(Record::from_rdata(
        name("victim.evil.test"),
        300,
        RData::A(A::new(203, 0, 113, 66)),
    ));
    upstream.extra_additional(Record::from_rdata(
        name("ns.evil.test"),
        300,
        RData::A(A::new(203, 0, 113, 67)),
    ));
    let fence = fence_with(&upstream, &["www.allowed.test"], "");
    for reply in fence.both("www.allowed.test", RecordType::A) {
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        let chain: Vec<(String, RecordType)> = reply
            .answers
            .iter()
            .map(|r| (r.name.to_string(), r.record_type()))
            .collect();
        assert_eq!(
            chain,
            [
                ("www.allowed.test.".to_owned(), RecordType::CNAME),
                ("edge.cdn.test.".to_owned(), RecordType::CNAME),
                ("node7.cdn.test.".to_owned(), RecordType::A),
            ]
        );
        assert_eq!(addresses(&reply), ["198.51.100.7"]);
        assert!(reply.additionals.is_empty(), "{:?}", reply.additionals);
    }
}

#[test]
fn negative_answers_keep_their_rcode_and_soa() {
    let upstream = Upstream::start();
    upstream.a("api.allowed.test", "198.51.100.10", 300);
    let fence = fence_with(&upstream, &["**.allowed.test", "api.allowed.test"], "");
    for reply in fence.both("missing.allowed.test", RecordType::A) {
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        assert!(
            reply
                .authorities
                .iter()
                .any(|r| r.record_type() == RecordType::SOA)
        );
    }
    for reply in fence.both("api.allowed.test", RecordType::AAAA) {
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(reply.answers.is_empty());
        assert!(
            reply
                .authorities
                .iter()
                .any(|r| r.record_type() == RecordType::SOA)
        );
    }
}

#[test]
fn large_answers_are_truncated_over_udp_and_complete_over_tcp() {
    let upstream = Upstream::start();
    for i in 0..120 {
        upstream.a("big.allowed.test", &format!("198.51.100.{}", i + 1), 300);
    }
    // The per-answer quota raised, so that the whole answer needs TCP.
    let fence = fence_with(
        &upstream,
        &["big.allowed.test"],
        "  max_addresses_per_answer: 4096\n",
    );
    let udp = fence.udp("big.allowed.test", RecordType::A);
    assert!(udp.metadata.truncation, "UDP reply should be truncated");
    assert!(udp.to_vec().unwrap().len() <= 1232);
    let tcp = fence.tcp("big.allowed.test", RecordType::A);
    assert!(!tcp.metadata.truncation);
    assert_eq!(addresses(&tcp).len(), 120);
    // The upstream itself truncated over UDP, and dnsfence retried it over TCP.
    assert!(
        upstream.seen().iter().any(|q| q.tcp),
        "{:?}",
        upstream.seen()
    );
}

#[test]
fn a_client_without_edns_gets_at_most_512_bytes_over_udp() {
    let upstream = Upstream::start();
    for i in 0..40 {
        upstream.a("mid.allowed.test", &format!("198.51.100.{}", i + 1), 300);
    }
    let fence = fence_with(&upstream, &["mid.allowed.test"], "");
    let mut message = query("mid.allowed.test", RecordType::A);
    message.edns = None;
    let bytes = query_udp_bytes(fence.addr, &message.to_vec().unwrap()).unwrap();
    assert!(bytes.len() <= 512, "{} bytes", bytes.len());
    assert!(Message::from_vec(&bytes).unwrap().metadata.truncation);
}

#[test]
fn upstream_down_gives_servfail_within_the_bound() {
    let upstream = Upstream::start();
    upstream.set_behaviour(Behaviour::Silent);
    let fence = fence_with(&upstream, &["api.allowed.test"], "");
    for transport in ["udp", "tcp"] {
        let started = Instant::now();
        let reply = if transport == "udp" {
            fence.udp("api.allowed.test", RecordType::A)
        } else {
            fence.tcp("api.allowed.test", RecordType::A)
        };
        let took = started.elapsed();
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::ServFail,
            "{transport}"
        );
        assert!(
            took < Duration::from_millis(1800),
            "{transport} took {took:?} (bound 1s)"
        );
    }
    let log = fence.log(2);
    assert!(
        log.iter()
            .all(|l| l["rcode"] == "SERVFAIL" && l["error"].is_string()),
        "{log:?}"
    );
}

#[test]
fn the_next_upstream_is_tried_when_the_first_fails() {
    let dead = Upstream::start();
    dead.set_behaviour(Behaviour::Silent);
    let live = Upstream::start();
    live.a("api.allowed.test", "198.51.100.10", 300);
    let yaml = format!(
        "listen: [\"127.0.0.1:5353\"]\nupstreams: [\"{}\", \"{}\"]\nupstream_timeout: 2s\nallow: [api.allowed.test]\nfirewall: {{enabled: false}}\n",
        dead.addr, live.addr
    );
    let fence = Dnsfence::start(&yaml);
    let reply = fence.udp("api.allowed.test", RecordType::A);
    assert_eq!(addresses(&reply), ["198.51.100.10"], "{:?}", fence.log(1));
    assert!(!dead.seen().is_empty());
    let log = fence.log(1);
    assert_eq!(log[0]["upstream"], live.addr.to_string());
}

#[test]
fn the_upstream_sees_dnsfences_own_id_and_no_client_edns_options() {
    let upstream = Upstream::start();
    upstream.a("api.allowed.test", "198.51.100.10", 300);
    let fence = fence_with(&upstream, &["api.allowed.test"], "");
    let mut message = query("api.allowed.test", RecordType::A);
    message.metadata.id = 0x1234;
    // A client-subnet option (code 8) and an unknown option (65001).
    let edns = message.edns.as_mut().unwrap();
    edns.options_mut()
        .insert(hickory_proto::rr::rdata::opt::EdnsOption::Unknown(
            8,
            vec![0, 1, 24, 0, 10, 1, 2],
        ));
    edns.options_mut()
        .insert(hickory_proto::rr::rdata::opt::EdnsOption::Unknown(
            65001,
            b"exfil".to_vec(),
        ));
    let reply = query_udp(fence.addr, &message).unwrap();
    assert_eq!(reply.metadata.id, 0x1234);
    assert_eq!(addresses(&reply), ["198.51.100.10"]);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert!(
        !seen[0].edns_options.contains(&8) && !seen[0].edns_options.contains(&65001),
        "{seen:?}"
    );
}

#[test]
fn names_are_matched_on_wire_labels_not_on_their_text() {
    let upstream = Upstream::start();
    upstream.a("api.allowed.test", "198.51.100.10", 300);
    let fence = fence_with(&upstream, &["api.allowed.test", "*.allowed.test"], "");
    // One label "evil.allowed" followed by "test": prints as evil\.allowed.test.
    let mut message = Message::new(rand_id(), MessageType::Query, OpCode::Query);
    let tricky =
        hickory_proto::rr::Name::from_labels(vec![b"x".as_ref(), b"evil.allowed", b"test"])
            .unwrap();
    message.add_query(Query::query(tricky, RecordType::A));
    let reply = query_udp(fence.addr, &message).unwrap();
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    // Case does not matter.
    let reply = fence.udp("API.Allowed.TEST", RecordType::A);
    assert_eq!(addresses(&reply), ["198.51.100.10"]);
    assert_eq!(upstream.seen().len(), 1);
}

#[test]
fn every_query_is_logged_as_one_json_line() {
    let upstream = Upstream::start();
    upstream.a("api.allowed.test", "198.51.100.10", 120);
    let fence = fence_with(&upstream, &["api.allowed.test"], "");
    fence.udp("api.allowed.test", RecordType::A);
    fence.tcp("evil.example", RecordType::A);
    let log = fence.log(2);
    assert_eq!(log.len(), 2, "{log:?}");
    // Records are written as replies leave: find each by its name, not its place.
    let by_name = |n: &str| {
        log.iter()
            .find(|l| l["qname"] == n)
            .unwrap_or_else(|| panic!("{n}: {log:?}"))
    };
    let allow = by_name("api.allowed.test.");
    assert_eq!(allow["decision"], "allow");
    assert_eq!(allow["qname"], "api.allowed.test.");
    assert_eq!(allow["qtype"], "A");
    assert_eq!(allow["transport"], "udp");
    assert_eq!(allow["client"], "127.0.0.1");
    assert!(allow["port"].as_u64().unwrap() > 0);
    assert_eq!(allow["rule"], "api.allowed.test");
    assert_eq!(allow["rcode"], "NOERROR");
    assert_eq!(allow["answers"][0]["addr"], "198.51.100.10");
    assert_eq!(allow["answers"][0]["ttl"], 120);
    assert_eq!(allow["upstream"], upstream.addr.to_string());
    assert!(allow["latency_us"].as_u64().is_some());
    assert!(allow["time"].as_str().unwrap().ends_with('Z'));
    let deny = by_name("evil.example.");
    assert_eq!(deny["decision"], "deny");
    assert_eq!(deny["reason"], "policy");
    assert_eq!(deny["transport"], "tcp");
    assert!(deny.get("upstream").is_none());
}

#[test]
fn ttls_are_capped_at_ttl_max() {
    let upstream = Upstream::start();
    upstream.a("api.allowed.test", "198.51.100.10", 86400);
    let fence = fence_with(
        &upstream,
        &["api.allowed.test"],
        "ttl: {min: 5s, max: 600s, grace: 5s}\n",
    );
    let reply = fence.udp("api.allowed.test", RecordType::A);
    assert_eq!(reply.answers[0].ttl, 600);
}

#[allow(dead_code)]
fn _unused(_: SocketAddr) {}

#[test]
fn a_lost_upstream_datagram_is_asked_again_well_within_the_timeout() {
    let upstream = Upstream::start();
    upstream.a("api.allowed.test", "198.51.100.10", 300);
    // upstream_timeout is 1 s: the retry must come well before it.
    let fence = fence_with(&upstream, &["api.allowed.test"], "");
    upstream.lose_next_udp(1);
    let started = Instant::now();
    let reply = fence.udp("api.allowed.test", RecordType::A);
    let took = started.elapsed();
    assert_eq!(addresses(&reply), ["198.51.100.10"]);
    // Answered at all means before the 1 s bound, so after one retransmission at 400 ms.
    assert!(took < Duration::from_millis(1000), "took {took:?}");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    // The copy asks exactly the same thing (ID, port, letter case): the answer to either
    // counts, and a forger gets nothing new to aim at.
    assert_eq!(seen[0].id, seen[1].id, "the retry keeps its ID");
    assert_eq!(
        seen[0].peer, seen[1].peer,
        "the retry keeps its source port"
    );
    assert_eq!(
        seen[0].labels, seen[1].labels,
        "the retry keeps its letter case"
    );
}

#[test]
fn answers_are_cached_for_their_ttl_and_no_longer() {
    let upstream = Upstream::start();
    upstream.a("short.allowed.test", "198.51.100.10", 1);
    upstream.a("long.allowed.test", "198.51.100.11", 300);
    let fence = fence_with(&upstream, &["*.allowed.test"], "");
    for _ in 0..3 {
        assert_eq!(
            addresses(&fence.udp("long.allowed.test", RecordType::A)),
            ["198.51.100.11"]
        );
        assert_eq!(
            addresses(&fence.udp("LONG.allowed.test", RecordType::A)),
            ["198.51.100.11"]
        );
    }
    assert_eq!(
        upstream.seen_for("long.allowed.test").len(),
        1,
        "served from the cache"
    );
    fence.udp("short.allowed.test", RecordType::A);
    std::thread::sleep(Duration::from_millis(1100));
    fence.udp("short.allowed.test", RecordType::A);
    assert_eq!(
        upstream.seen_for("short.allowed.test").len(),
        2,
        "expired after its TTL"
    );
}
