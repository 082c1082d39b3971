//! The fast path against the full one, table-driven: for every hit and denial the fast path
//! takes, its reply is the full path's byte for byte (TTLs aside) and its log record says the
//! same; every odd request goes to the full path untouched.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use hickory_proto::op::{Edns, Message, OpCode, Query};
use hickory_proto::rr::{DNSClass, Name, RecordType};

use super::Handler;
use crate::pipeline::upstream::Upstreams;
use crate::pipeline::{Generation, Pipeline, Transport};
use crate::policy::{LogTarget, Policy};
use crate::querylog::QueryLog;

#[allow(dead_code, clippy::all)]
#[path = "../../tests/common/upstream.rs"]
pub(in crate::server) mod upstream;

use upstream::Upstream;

const PEER: &str = "127.0.0.1:40000";

async fn handler_with(extra: &str) -> (Handler, Upstream) {
    handler_observed(extra, None).await
}

/// A handler on a policy allowing `**.fast.test` and `exact.example` (upstream records for
/// `api`, `www` (a CNAME) and `big`), the firewall off, whose log records `observer` sees.
pub(in crate::server) async fn handler_observed(
    extra: &str,
    observer: Option<crate::querylog::Observer>,
) -> (Handler, Upstream) {
    let up = Upstream::start();
    up.a("api.fast.test", "11.0.0.1", 300)
        .a("api.fast.test", "11.0.0.2", 300)
        .cname("www.fast.test", "api.fast.test", 600)
        .aaaa("api.fast.test", "2001:db9::1", 300)
        .txt("api.fast.test", "hello", 300);
    for i in 0..30 {
        up.a("big.fast.test", &format!("11.0.1.{i}"), 300);
    }
    let yaml = format!(
        "listen: [\"127.0.0.1:5353\"]\nupstreams: [\"{}\"]\nallow: [\"**.fast.test\", \"exact.example\"]\n\
         firewall: {{enabled: false}}\n{extra}",
        up.addr
    );
    let policy = Arc::new(Policy::parse(&yaml, Path::new("fast.yaml")).expect("policy"));
    let upstreams = Upstreams::new(
        &policy.upstreams,
        &policy.upstream_options,
        policy.upstream_timeout,
        0,
    )
    .expect("upstreams");
    let pipeline = Pipeline::new(Generation::new(policy, "00"), upstreams, None);
    let (mut log, writer) = QueryLog::open(&LogTarget::File("/dev/null".into())).expect("log");
    if let Some(observer) = observer {
        log.observe(observer);
    }
    std::mem::forget(writer);
    (Handler::new(Arc::new(pipeline), log), up)
}

fn query(name: &str, qtype: RecordType) -> Message {
    let mut message = Message::query();
    message.metadata.id = 0x4242;
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    message
}

fn with_edns(mut message: Message, payload: u16, dnssec_ok: bool) -> Message {
    let mut edns = Edns::new();
    edns.set_max_payload(payload);
    edns.set_dnssec_ok(dnssec_ok);
    message.edns = Some(edns);
    message
}

fn bytes(message: &Message) -> Vec<u8> {
    message.to_vec().expect("encode")
}

/// `reply` with every record's TTL field zeroed (the TTLs age by the second).
fn without_ttls(reply: &[u8]) -> Vec<u8> {
    let mut out = reply.to_vec();
    let count = |at: usize| usize::from(u16::from_be_bytes([reply[at], reply[at + 1]]));
    let records = count(6) + count(8) + count(10);
    let mut at = 12;
    let skip_name = |at: &mut usize| {
        loop {
            let len = reply[*at];
            if len & 0xc0 == 0xc0 {
                *at += 2;
                return;
            }
            *at += 1 + usize::from(len);
            if len == 0 {
                return;
            }
        }
    };
    for _ in 0..count(4) {
        skip_name(&mut at);
        at += 4;
    }
    for _ in 0..records {
        skip_name(&mut at);
        out[at + 4..at + 8].fill(0);
        at += 10 + count(at + 8);
    }
    assert_eq!(at, reply.len(), "walked the whole reply");
    out
}

async fn full(handler: &Handler, message: &[u8], transport: Transport) -> (Vec<u8>, String) {
    let mut reply = Vec::new();
    let pending = handler
        .answer(
            message.to_vec(),
            PEER.parse().unwrap(),
            transport,
            &mut reply,
        )
        .await;
    let log = summary(&pending.record);
    handler.finish(pending, Ok(()));
    (reply, log)
}

fn fast(handler: &Handler, message: &[u8], transport: Transport) -> Option<(Vec<u8>, String)> {
    let mut reply = Vec::new();
    let peer: SocketAddr = PEER.parse().unwrap();
    let Some(pending) = handler.answer_fast(message, peer, transport, &mut reply) else {
        assert!(reply.is_empty(), "a fall-through leaves the buffer alone");
        return None;
    };
    let log = summary(&pending.record);
    handler.finish(pending, Ok(()));
    Some((reply, log))
}

/// What the log record says, TTLs aside.
fn summary(record: &crate::querylog::QueryRecord) -> String {
    let answers: Vec<String> = record.answers.iter().map(|a| a.addr.to_string()).collect();
    format!(
        "{} {:?} {} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {} {}",
        record.qname,
        record.qtype,
        record.decision,
        record.group,
        record.rule,
        record.reason,
        record.rcode,
        answers,
        record.refused,
        record.upstream,
        record.error,
        record.truncated,
        record.transport,
    )
}

/// Hits and denials: the full path answers first (and fills the reply cache), then the fast
/// path must answer with the same bytes and the same log record.
#[tokio::test]
async fn the_fast_path_answers_hits_and_denials_exactly_as_the_full_path_does() {
    let (handler, _up) = handler_with("").await;
    let mut no_rd = query("api.fast.test.", RecordType::A);
    no_rd.metadata.recursion_desired = false;
    let mut cd = query("api.fast.test.", RecordType::A);
    cd.metadata.checking_disabled = true;
    cd.metadata.authentic_data = true;
    let cases: Vec<(&str, Message)> = vec![
        ("hit A", query("api.fast.test.", RecordType::A)),
        ("hit AAAA", query("api.fast.test.", RecordType::AAAA)),
        (
            "hit through a CNAME",
            query("www.fast.test.", RecordType::A),
        ),
        ("hit NXDOMAIN", query("none.fast.test.", RecordType::A)),
        ("hit NODATA", query("api.fast.test.", RecordType::HTTPS)),
        ("hit exact rule", query("exact.example.", RecordType::A)),
        (
            "hit with EDNS",
            with_edns(query("api.fast.test.", RecordType::A), 4096, false),
        ),
        (
            "hit with EDNS, DO and a small buffer",
            with_edns(query("api.fast.test.", RecordType::A), 100, true),
        ),
        ("hit without RD", no_rd),
        ("hit with CD and AD", cd),
        ("denied by policy", query("evil.example.", RecordType::A)),
        (
            "denied, long name",
            query("exfil-0123456789abcdef.evil.example.", RecordType::A),
        ),
        ("denied special-use", query("printer.local.", RecordType::A)),
        ("denied .test", query("other.test.", RecordType::A)),
        ("denied qtype", query("api.fast.test.", RecordType::TXT)),
        (
            "denied with EDNS",
            with_edns(query("evil.example.", RecordType::A), 1232, false),
        ),
    ];
    for transport in [Transport::Udp, Transport::Tcp] {
        for (what, message) in &cases {
            let message = bytes(message);
            let (full_reply, full_log) = full(&handler, &message, transport).await;
            assert!(!full_reply.is_empty(), "{what}: the full path answers");
            let Some((fast_reply, fast_log)) = fast(&handler, &message, transport) else {
                panic!("{what} ({transport:?}): the fast path did not answer");
            };
            assert_eq!(
                without_ttls(&fast_reply),
                without_ttls(&full_reply),
                "{what} ({transport:?}): fast and full replies differ"
            );
            assert_eq!(
                fast_log, full_log,
                "{what} ({transport:?}): log records differ"
            );
        }
    }
}

/// A cached answer's TTLs go down with its age on the fast path, as on the full one.
#[tokio::test]
async fn fast_path_ttls_age() {
    let (handler, _up) = handler_with("").await;
    let message = bytes(&query("api.fast.test.", RecordType::A));
    full(&handler, &message, Transport::Udp).await;
    let (first, _) = fast(&handler, &message, Transport::Udp).expect("hit");
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (later, _) = fast(&handler, &message, Transport::Udp).expect("hit");
    let ttls = |reply: &[u8]| -> Vec<u32> {
        Message::from_vec(reply)
            .expect("reply parses")
            .answers
            .iter()
            .map(|r| r.ttl)
            .collect()
    };
    let (first, later) = (ttls(&first), ttls(&later));
    assert_eq!(first.len(), 2);
    for (a, b) in first.iter().zip(&later) {
        assert!(*b + 2 <= *a && *b + 3 >= *a, "{first:?} then {later:?}");
    }
}

/// The client's letter case comes back in the question; the records are the same names.
#[tokio::test]
async fn a_hit_in_another_letter_case_keeps_the_clients_question() {
    let (handler, _up) = handler_with("").await;
    full(
        &handler,
        &bytes(&query("api.fast.test.", RecordType::A)),
        Transport::Udp,
    )
    .await;
    let mixed = bytes(&query("ApI.fAsT.tEsT.", RecordType::A));
    let (reply, _) = fast(&handler, &mixed, Transport::Udp).expect("a hit in any case");
    let (full_reply, _) = full(&handler, &mixed, Transport::Udp).await;
    let (fast_msg, full_msg) = (
        Message::from_vec(&reply).unwrap(),
        Message::from_vec(&full_reply).unwrap(),
    );
    assert_eq!(
        reply.get(12..12 + 15),
        mixed.get(12..12 + 15),
        "question as sent"
    );
    assert_eq!(fast_msg.queries, full_msg.queries);
    assert_eq!(fast_msg.answers.len(), full_msg.answers.len());
    for (a, b) in fast_msg.answers.iter().zip(&full_msg.answers) {
        assert_eq!(a.data, b.data);
        assert_eq!(a.name.to_lowercase(), b.name.to_lowercase());
    }
}

/// Anything unusual goes to the full path: the fast path neither answers nor touches the
/// reply buffer. (Each is first asked through the full path, so a hit would be ready.)
#[tokio::test]
async fn odd_requests_fall_through_to_the_full_path() {
    let (handler, _up) = handler_with("").await;
    let hit = query("api.fast.test.", RecordType::A);
    full(&handler, &bytes(&hit), Transport::Udp).await;
    assert!(
        fast(&handler, &bytes(&hit), Transport::Udp).is_some(),
        "control: a hit"
    );

    let plain = bytes(&hit);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // A client cookie (option 10, 8 bytes) in the OPT record's data.
    let mut with_option = bytes(&with_edns(hit.clone(), 1232, false));
    let rdlen = with_option.len() - 2;
    with_option[rdlen..].copy_from_slice(&12u16.to_be_bytes());
    with_option.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
    cases.push(("EDNS with an option (cookie)", with_option));
    let mut two = hit.clone();
    two.add_query(Query::query(
        Name::from_ascii("www.fast.test.").unwrap(),
        RecordType::A,
    ));
    cases.push(("two questions", bytes(&two)));
    for op in [OpCode::Status, OpCode::Notify, OpCode::Update] {
        let mut m = hit.clone();
        m.metadata.op_code = op;
        cases.push(("another opcode", bytes(&m)));
    }
    let flag = |bits: u16| {
        let mut m = plain.clone();
        let flags = u16::from_be_bytes([m[2], m[3]]) | bits;
        m[2..4].copy_from_slice(&flags.to_be_bytes());
        m
    };
    cases.push(("TC set", flag(0x0200)));
    cases.push(("QR set", flag(0x8000)));
    cases.push(("AA set", flag(0x0400)));
    cases.push(("Z set", flag(0x0040)));
    cases.push(("an rcode in a query", flag(0x0003)));
    let mut chaos = hit.clone();
    chaos.queries[0].set_query_class(DNSClass::CH);
    cases.push(("class CH", bytes(&chaos)));
    for qtype in [RecordType::ANY, RecordType::AXFR, RecordType::IXFR] {
        cases.push(("a meta type", bytes(&query("api.fast.test.", qtype))));
    }
    let mut answer_count = plain.clone();
    answer_count[7] = 1;
    cases.push(("ANCOUNT 1", answer_count));
    let mut version = bytes(&with_edns(hit.clone(), 1232, false));
    let opt_ttl = version.len() - 6;
    version[opt_ttl + 1] = 1;
    cases.push(("EDNS version 1", version));
    let mut trailing = plain.clone();
    trailing.push(0);
    cases.push(("a byte after the question", trailing));
    cases.push(("cut short", plain[..plain.len() - 2].to_vec()));
    cases.push(("header only", plain[..12].to_vec()));
    cases.push(("empty", Vec::new()));
    // A question whose name is a pointer back into the header.
    let mut pointer = plain[..12].to_vec();
    pointer.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    cases.push(("a compression pointer in the name", pointer));
    // 30 addresses do not fit 512 bytes: the full path truncates, the fast path does not try.
    let big = query("big.fast.test.", RecordType::A);
    full(&handler, &bytes(&big), Transport::Tcp).await;
    assert!(
        fast(&handler, &bytes(&big), Transport::Tcp).is_some(),
        "control: over TCP it fits"
    );
    cases.push(("an answer larger than the client's buffer", bytes(&big)));

    for (what, message) in cases {
        assert!(
            fast(&handler, &message, Transport::Udp).is_none(),
            "{what}: the fast path answered"
        );
    }
}

/// The rate limit holds on the fast path: beyond the burst, hits and denials are refused.
#[tokio::test]
async fn the_rate_limit_holds_on_the_fast_path() {
    let (handler, _up) = handler_with("limits: {client_qps: 1, client_burst: 3}\n").await;
    let hit = bytes(&query("api.fast.test.", RecordType::A));
    let denied = bytes(&query("evil.example.", RecordType::A));
    full(&handler, &hit, Transport::Udp).await;
    let mut refused = 0;
    for message in [&hit, &denied, &hit, &denied, &hit] {
        let (reply, log) = fast(&handler, message, Transport::Udp).expect("answered");
        if log.contains("rate-limit") {
            refused += 1;
            assert_eq!(reply[3] & 0x0f, 5, "REFUSED");
        }
    }
    assert!(refused >= 3, "{refused} refused");
}

/// The exfiltration budget holds on the fast path: distinct names under a wildcard are
/// charged, and beyond the budget denied (NXDOMAIN, logged).
#[tokio::test]
async fn the_exfiltration_budget_holds_on_the_fast_path() {
    let (handler, up) =
        handler_with("exfiltration: {wildcard_names_per_minute: 2}\nlimits: {client_qps: 0}\n")
            .await;
    for i in 0..3 {
        up.a(&format!("n{i}.fast.test"), "11.0.0.9", 300);
    }
    let message = |i: usize| bytes(&query(&format!("n{i}.fast.test."), RecordType::A));
    full(&handler, &message(0), Transport::Udp).await;
    full(&handler, &message(1), Transport::Udp).await;
    // n0 and n1 are within the budget, and hits now.
    let (_, log) = fast(&handler, &message(0), Transport::Udp).expect("hit");
    assert!(log.contains("allow"), "{log}");
    let (_, log) = full(&handler, &message(2), Transport::Udp).await;
    assert!(log.contains("exfiltration-budget"), "{log}");
    // The fast path sees the same budget (n2 was never cached: it is not a hit).
    assert!(fast(&handler, &message(2), Transport::Udp).is_none());
}

/// The in-flight limits hold on the fast path exactly as on the full one: with other queries
/// waiting (held here), a hit is refused by the fast path when and only when the full path
/// refuses it, with the same record.
#[tokio::test]
async fn the_in_flight_limits_hold_on_the_fast_path_as_on_the_full_one() {
    // (held by this client, held by another, answered, error)
    let cases: &[(usize, usize, bool, &str)] = &[
        (0, 0, true, ""),
        (1, 0, true, ""),
        (2, 0, false, "client has 2 queries in flight"),
        (0, 3, true, ""),
        (0, 4, false, "too many queries in flight"),
        (1, 3, false, "too many queries in flight"),
        (3, 1, false, "too many queries in flight"),
    ];
    let (handler, _up) =
        handler_with("limits: {client_qps: 0, max_inflight: 4, max_inflight_per_client: 2}\n")
            .await;
    let hit = bytes(&query("api.fast.test.", RecordType::A));
    full(&handler, &hit, Transport::Udp).await;
    let client: SocketAddr = PEER.parse().unwrap();
    for &(mine, others, answered, error) in cases {
        let pipeline = &handler.pipeline;
        let _mine = pipeline.hold_in_flight(client.ip(), mine);
        let _others = pipeline.hold_in_flight("10.0.0.9".parse().unwrap(), others);
        let (fast_reply, fast_log) = fast(&handler, &hit, Transport::Udp).expect("answered");
        let (full_reply, full_log) = full(&handler, &hit, Transport::Udp).await;
        let what = format!("{mine} mine, {others} others");
        assert_eq!(fast_log, full_log, "{what}");
        assert_eq!(
            without_ttls(&fast_reply),
            without_ttls(&full_reply),
            "{what}"
        );
        assert_eq!(fast_log.contains("NoError"), answered, "{what}: {fast_log}");
        assert!(fast_log.contains(error), "{what}: {fast_log}");
    }
}
