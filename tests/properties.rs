//! Property tests.
//!
//! 1. Against the real binary: random query names (labels of random bytes, dots, NULs, upper
//!    case, UTF-8, 1-63 octets, 1-8 labels, some under an allowed suffix) and random qtypes.
//!    Every name the upstream sees must be, byte for byte (ASCII case aside), the name that was
//!    sent, and one an independent reference matcher over wire labels allows; every name the
//!    reference allows is forwarded; the server never dies.
//! 2. In process: hickory's request parsing plus `question_of` and `decide` never panic on
//!    random bytes, and what they return is consistent with the message and the reference.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::wire::{self, TcpOutcome};
use common::*;
use hickory_proto::op::OpCode;
use hickory_proto::rr::{DNSClass, RecordType};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use hickory_server::zone_handler::MessageRequest;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use dnsfence::pipeline::decision::{Decision, decide};
use dnsfence::pipeline::request::{Rejection, question_of};
use dnsfence::policy::Policy;

/// The allowlist both the server and the reference use.
const RULES: &[&str] = &[
    "exact.allowed.test",
    "*.one.allowed.test",
    "**.any.allowed.test",
];
/// The default `qtypes`: A, AAAA, CNAME, HTTPS.
const ALLOWED_QTYPES: [u16; 4] = [1, 28, 5, 65];

/// The reference matcher, written from the policy's documentation and nothing else: labels of
/// `[A-Za-z0-9_-]` only, ASCII case-insensitive, exact / exactly one label / any depth (never
/// the apex), and one of the allowed query types.
fn reference_allows(labels: &[Vec<u8>], qtype: u16) -> bool {
    let plain = |l: &Vec<u8>| {
        !l.is_empty()
            && l.iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
    };
    if !ALLOWED_QTYPES.contains(&qtype) || labels.is_empty() || !labels.iter().all(plain) {
        return false;
    }
    let lower: Vec<Vec<u8>> = labels.iter().map(|l| l.to_ascii_lowercase()).collect();
    let n = lower.len();
    let ends_with = |suffix: &[&[u8]]| {
        n >= suffix.len()
            && lower[n - suffix.len()..]
                .iter()
                .zip(suffix)
                .all(|(a, b)| a.as_slice() == *b)
    };
    (n == 3 && ends_with(&[b"exact", b"allowed", b"test"]))
        || (n == 4 && ends_with(&[b"one", b"allowed", b"test"]))
        || (n >= 4 && ends_with(&[b"any", b"allowed", b"test"]))
}

/// Octets of the name on the wire (labels, their length octets, the root).
fn wire_len(labels: &[Vec<u8>]) -> usize {
    labels.iter().map(|l| l.len() + 1).sum::<usize>() + 1
}

fn lower(labels: &[Vec<u8>]) -> Vec<Vec<u8>> {
    labels.iter().map(|l| l.to_ascii_lowercase()).collect()
}

/// One label: plain letters in any case, tricky bytes (dot, NUL, `*`, backslash, space, any
/// byte), UTF-8 text, or a near miss of an allowed label.
fn label() -> impl Strategy<Value = Vec<u8>> {
    let tricky_byte = prop_oneof![
        Just(b'.'),
        Just(0u8),
        Just(b'*'),
        Just(b'\\'),
        Just(b' '),
        Just(b'"'),
        b'a'..=b'z',
        b'A'..=b'Z',
        any::<u8>(),
    ];
    prop_oneof![
        4 => "[A-Za-z0-9_-]{1,63}".prop_map(String::into_bytes),
        3 => vec(tricky_byte, 1..=63),
        2 => "\\PC{1,15}".prop_map(String::into_bytes).prop_filter("<= 63 octets", |l| l.len() <= 63),
        2 => prop::sample::select(vec![
            "allowed.test", "one.allowed", "exact.allowed.test", "ALLOWED", "any", "one",
            "exact", "test", "*", "**", "\u{212A}", "allow\u{0435}d", "xn--llowed-fsa", "any\0",
            "exact.", ".any",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
    ]
}

/// A label in front of a suffix: mostly plain, so that wildcard rules get exercised.
fn prefix_label() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => "[A-Za-z0-9_-]{1,20}".prop_map(String::into_bytes),
        1 => label(),
    ]
}

/// One of the allowed suffixes (or a near one), in a random case.
fn suffix() -> impl Strategy<Value = Vec<Vec<u8>>> {
    (
        prop::sample::select(vec![
            "exact.allowed.test",
            "exact.allowed.test",
            "one.allowed.test",
            "one.allowed.test",
            "any.allowed.test",
            "any.allowed.test",
            "allowed.test",
            "test",
            "any.allowed.test.evil",
            "exact.allowed.test.any.allowed.test",
        ]),
        any::<u64>(),
    )
        .prop_map(|(s, mut mask)| {
            wire::labels(s)
                .into_iter()
                .map(|l| {
                    l.into_iter()
                        .map(|b| {
                            mask = mask.rotate_left(1);
                            if mask & 1 == 1 {
                                b.to_ascii_uppercase()
                            } else {
                                b
                            }
                        })
                        .collect()
                })
                .collect()
        })
}

/// 1-8 labels: random ones, or a few random ones under an allowed (or nearly allowed) suffix.
fn qname() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop_oneof![
        1 => vec(label(), 1..=8),
        3 => (vec(prefix_label(), 0..=3), suffix()).prop_map(|(mut prefix, suffix)| {
            prefix.truncate(8usize.saturating_sub(suffix.len()));
            prefix.extend(suffix);
            prefix
        }),
    ]
}

fn qtype() -> impl Strategy<Value = u16> {
    prop_oneof![
        3 => prop::sample::select(ALLOWED_QTYPES.to_vec()),
        1 => prop::sample::select(vec![16u16, 10, 12, 15, 33, 64, 255, 252, 251, 41, 65280, 0]),
        1 => any::<u16>(),
    ]
}

fn policy_yaml(upstream: SocketAddr) -> String {
    policy(
        upstream,
        RULES,
        "limits: {client_qps: 0}\n\
         exfiltration: {wildcard_names_per_minute: 0, max_label_length: 63, max_name_length: 253}\n",
    )
}

fn runner_cases() -> usize {
    300
}

#[test]
fn random_names_reach_the_upstream_only_when_the_reference_matcher_allows_them() {
    let upstream = Upstream::start();
    let fence = Dnsfence::start(&policy_yaml(upstream.addr));
    let mut runner = TestRunner::new(Config {
        cases: runner_cases() as u32,
        failure_persistence: None,
        max_shrink_iters: 200,
        ..Config::default()
    });
    let sent_all = std::sync::Mutex::new(HashSet::<Vec<Vec<u8>>>::new());
    let allowed_sent = std::sync::Mutex::new(HashSet::<Vec<Vec<u8>>>::new());
    let counter = std::sync::atomic::AtomicU16::new(0);
    let allowed_cases = std::sync::atomic::AtomicUsize::new(0);
    let parseable_cases = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(
        &(qname(), qtype(), any::<bool>()),
        |(labels, qtype, tcp)| {
            let id = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            upstream.clear_seen();
            sent_all.lock().unwrap().insert(lower(&labels));
            let bytes = wire::query(id, &labels, qtype, wire::CLASS_IN);
            let reply = if tcp {
                match wire::tcp_exchange(fence.addr, &bytes, Duration::from_secs(3)) {
                    TcpOutcome::Reply(reply) => Some(reply),
                    _ => None,
                }
            } else {
                wire::udp_exchange(fence.addr, &bytes, Duration::from_secs(3))
            };
            prop_assert!(fence.alive(), "dnsfence died");
            let reply = reply.ok_or_else(|| TestCaseError::fail("no reply"))?;
            let h = wire::parse_header(&reply).ok_or_else(|| TestCaseError::fail("short reply"))?;
            prop_assert_eq!(h.id, id);
            let valid = wire_len(&labels) <= 255;
            if valid {
                parseable_cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let allowed = valid && reference_allows(&labels, qtype);
            if allowed {
                allowed_cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }

            // Whatever reached the upstream is the name sent, and an allowed one. On a loaded
            // machine a retransmit of an earlier allowed case can reach the upstream after that
            // case was answered (and after clear_seen): such a name was allowed then and is not
            // a leak; a name never allowed is one.
            if allowed {
                allowed_sent.lock().unwrap().insert(lower(&labels));
            }
            let seen = upstream.seen();
            let mut seen_current = 0;
            for q in &seen {
                if lower(&q.labels) != lower(&labels) {
                    prop_assert!(
                        allowed_sent.lock().unwrap().contains(&lower(&q.labels)),
                        "the upstream saw a name that no allowed case sent: {:?}",
                        q.name
                    );
                    continue;
                }
                seen_current += 1;
                prop_assert_eq!(u16::from(q.qtype), qtype);
                prop_assert!(
                    allowed,
                    "the reference denies {:?} {} but it was forwarded",
                    q.name,
                    qtype
                );
            }
            // The first send and, under load, its retransmits (same ID, same case).
            prop_assert!(seen_current <= 3, "{seen:?}");
            if allowed {
                // Forwarded (or answered from the cache of an earlier, differently cased query):
                // the upstream's NXDOMAIN with its SOA.
                prop_assert_eq!(h.rcode, wire::RCODE_NXDOMAIN, "{:?}", h);
                prop_assert!(h.ns >= 1, "allowed but answered locally: {:?}", h);
            } else {
                // Answered locally: no records at all.
                prop_assert!(h.an == 0 && h.ns == 0, "denied but not local: {:?}", h);
                prop_assert_ne!(h.rcode, wire::RCODE_NOERROR);
            }
            Ok(())
        },
    );
    if let Err(error) = result {
        panic!("{error}");
    }
    // And across the whole run: nothing the upstream saw was not sent.
    let sent = sent_all.lock().unwrap();
    let allowed_cases = allowed_cases.into_inner();
    eprintln!(
        "{} distinct names sent, {allowed_cases} cases allowed by the reference",
        sent.len()
    );
    assert!(
        allowed_cases >= 20,
        "too few allowed cases to mean anything"
    );
    for q in upstream.seen() {
        assert!(sent.contains(&lower(&q.labels)), "{q:?}");
    }
    assert!(fence.alive(), "dnsfence died");
    // Every log line is still one valid JSON object (no name broke a line or the quoting), and
    // every query that parsed is in it. (Names over 255 octets get FORMERR from the parser and
    // are not logged at all.)
    let parseable = parseable_cases.into_inner();
    let log = fence.log(parseable);
    eprintln!(
        "{} log lines for {parseable} parseable queries of {} run",
        log.len(),
        counter.into_inner()
    );
    assert!(log.len() >= parseable, "{} log lines", log.len());
    // It still answers a plain allowed query.
    let reply = fence.udp("x.any.allowed.test", RecordType::A);
    assert_eq!(
        reply.metadata.response_code,
        hickory_proto::op::ResponseCode::NXDomain
    );
    assert!(!reply.authorities.is_empty());
}

// ---------------------------------------------------------------------------------------------
// In process: parsing and question extraction
// ---------------------------------------------------------------------------------------------

/// Pieces of a message body, so that random messages often parse far enough to be interesting.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // A label.
        vec(any::<u8>(), 0..=63).prop_map(|l| {
            let mut out = vec![l.len() as u8];
            out.extend(l);
            out
        }),
        // A plain label of the allowlist.
        prop::sample::select(vec!["exact", "one", "any", "allowed", "test", "localhost"]).prop_map(
            |l| {
                let mut out = vec![l.len() as u8];
                out.extend_from_slice(l.as_bytes());
                out
            }
        ),
        // A compression pointer (anywhere, including forwards and onto itself).
        (0u8..=0x3f, any::<u8>()).prop_map(|(hi, lo)| vec![0xc0 | hi, lo]),
        // The root, a type or class, a TTL, a length.
        Just(vec![0]),
        prop::sample::select(vec![1u16, 28, 5, 65, 41, 250, 255, 3, 4, 254, 0xffff])
            .prop_map(|v| v.to_be_bytes().to_vec()),
        any::<u32>().prop_map(|v| v.to_be_bytes().to_vec()),
        // A bad label type (0x40 and 0x80 prefixes).
        (0x40u8..=0xbf).prop_map(|b| vec![b]),
        vec(any::<u8>(), 0..8),
    ]
}

fn message() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => vec(any::<u8>(), 0..600),
        3 => (
            any::<u16>(),
            any::<u16>(),
            0u16..=3,
            0u16..=2,
            0u16..=2,
            0u16..=3,
            vec(piece(), 0..24),
        )
            .prop_map(|(id, flags, qd, an, ns, ar, pieces)| {
                let mut out = wire::header(id, flags & 0x7fff, qd, an, ns, ar);
                out.extend(pieces.concat());
                out
            }),
    ]
}

fn test_policy() -> Policy {
    let yaml = policy("127.0.0.1:53".parse().unwrap(), RULES, "");
    Policy::parse(&yaml, Path::new("properties.yaml")).expect("test policy")
}

fn check_message(bytes: Vec<u8>, protocol: Protocol, policy: &Policy) -> Result<(), TestCaseError> {
    let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let Ok(request) = Request::from_bytes(bytes, client, protocol) else {
        return Ok(());
    };
    let message: &MessageRequest = &request;
    let queries = message.queries.queries();
    match question_of(message) {
        Ok(question) => {
            prop_assert_eq!(message.metadata.op_code, OpCode::Query);
            prop_assert_eq!(queries.len(), 1);
            prop_assert!(message.answers.is_empty() && message.authorities.is_empty());
            prop_assert_eq!(queries[0].query_class(), DNSClass::IN);
            prop_assert!(question.name.is_fqdn());
            let sent: Vec<Vec<u8>> = queries[0]
                .original()
                .name()
                .iter()
                .map(<[u8]>::to_vec)
                .collect();
            let got: Vec<Vec<u8>> = question.name.iter().map(<[u8]>::to_vec).collect();
            prop_assert_eq!(&got, &sent, "question_of changed the name");
            // The policy's decision agrees with the reference (none of the allowed names is
            // special-use).
            let allowed = matches!(
                decide(policy, client.ip(), &question.name, question.qtype),
                Decision::Allow { .. }
            );
            prop_assert_eq!(
                allowed,
                reference_allows(&got, u16::from(question.qtype)),
                "decide and the reference disagree on {:?} {}",
                question.name,
                question.qtype
            );
        }
        Err(Rejection::OpCode) => prop_assert_ne!(message.metadata.op_code, OpCode::Query),
        Err(Rejection::Malformed) => prop_assert!(
            queries.len() != 1 || !message.answers.is_empty() || !message.authorities.is_empty()
        ),
        Err(Rejection::Class) => prop_assert_ne!(queries[0].query_class(), DNSClass::IN),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn parsing_and_question_extraction_never_panic_on_random_bytes(
        bytes in message(),
        tcp in any::<bool>(),
    ) {
        thread_local!(static POLICY: Policy = test_policy());
        let protocol = if tcp { Protocol::Tcp } else { Protocol::Udp };
        POLICY.with(|policy| check_message(bytes, protocol, policy))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Wire names built from random labels: `decide` agrees with the reference matcher.
    #[test]
    fn decide_agrees_with_the_reference_matcher_on_wire_labels(
        labels in qname(),
        qtype in qtype(),
    ) {
        thread_local!(static POLICY: Policy = test_policy());
        prop_assume!(wire_len(&labels) <= 255);
        let bytes = wire::query(7, &labels, qtype, wire::CLASS_IN);
        POLICY.with(|policy| check_message(bytes, Protocol::Udp, policy))?;
    }
}
