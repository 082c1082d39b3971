//! The upstream stage end to end: the real binary against scripted upstreams on loopback that
//! record every query. Slow upstreams, unguessable queries, forged replies, many clients asking
//! one name.

mod common;

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::upstream::{SeenQuery, tls_server};
use common::*;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// A policy whose upstream_timeout is `timeout` (the shared helper's is 1 s).
fn policy_with_timeout(upstream: SocketAddr, allow: &str, timeout: &str, extra: &str) -> String {
    format!(
        "listen: [\"127.0.0.1:5353\"]\nupstreams: [\"{upstream}\"]\nupstream_timeout: {timeout}\n\
         allow: [\"{allow}\"]\nfirewall: {{enabled: false}}\n{extra}"
    )
}

/// A recursive resolver on the real internet often takes 0.5-1.5 s for a cold name: every such
/// answer must reach the client within `upstream_timeout`, however many times dnsfence re-sent
/// the question meanwhile (every copy's answer counts), with only a few copies sent.
#[test]
fn slow_upstreams_are_answered_within_the_timeout() {
    let delays = [200u64, 600, 1200, 1800];
    let results: Vec<(u64, Result<Duration, String>, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = delays
            .iter()
            .map(|&delay| {
                s.spawn(move || {
                    let upstream = Upstream::start();
                    upstream.a("api.allowed.test", "198.51.100.10", 300);
                    upstream.set_behaviour(Behaviour::Slow(delay));
                    let fence = Dnsfence::start(&policy_with_timeout(
                        upstream.addr,
                        "api.allowed.test",
                        "2s",
                        "",
                    ));
                    let started = Instant::now();
                    let reply = fence.udp("api.allowed.test", RecordType::A);
                    let took = started.elapsed();
                    let outcome = if addresses(&reply) == ["198.51.100.10"] {
                        Ok(took)
                    } else {
                        Err(format!(
                            "{} after {took:?}: {:?}",
                            reply.metadata.response_code,
                            fence.log(1)
                        ))
                    };
                    (delay, outcome, upstream.seen().len())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (delay, outcome, queries) in &results {
        eprintln!("upstream answering after {delay} ms: {outcome:?}, {queries} upstream queries");
    }
    for (delay, outcome, queries) in results {
        let took = outcome.unwrap_or_else(|e| panic!("answer after {delay} ms: {e}"));
        assert!(
            took < Duration::from_millis(2000),
            "{delay} ms took {took:?}"
        );
        assert!(
            took >= Duration::from_millis(delay),
            "{delay} ms answered in {took:?}"
        );
        assert!(
            (1..=4).contains(&queries),
            "{delay} ms cost {queries} queries"
        );
    }
}

/// RFC 5452: an off-path forger must guess the source port and the ID. 500 upstream queries
/// leave from at least 400 different ports, and their IDs show no pattern.
#[test]
fn upstream_queries_use_random_source_ports_and_ids() {
    let upstream = Upstream::start();
    let names: Vec<String> = (0..500).map(|i| format!("n{i}.ports.test")).collect();
    for n in &names {
        upstream.a(n, "198.51.100.10", 300);
    }
    let fence = fence_with(
        &upstream,
        &["*.ports.test"],
        "limits: {client_qps: 0}\nexfiltration: {wildcard_names_per_minute: 0}\n",
    );
    for n in &names {
        let reply = fence.udp(n, RecordType::A);
        assert_eq!(addresses(&reply), ["198.51.100.10"], "{n}");
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 500, "one upstream query per name");
    let ports: HashSet<u16> = seen.iter().map(|q| q.peer.port()).collect();
    let ids: Vec<u16> = seen.iter().map(|q| q.id).collect();
    let mut buckets = [0u32; 8];
    for id in &ids {
        buckets[usize::from(id >> 13)] += 1;
    }
    let close_neighbours = ids.windows(2).filter(|w| w[0].abs_diff(w[1]) <= 16).count();
    eprintln!(
        "500 queries: {} distinct source ports, ID buckets {buckets:?}, {close_neighbours} \
         consecutive IDs within 16 of each other",
        ports.len()
    );
    assert!(ports.len() >= 400, "{} distinct ports", ports.len());
    // Each eighth of the ID space expects 62.5 of 500 (sd 7.4).
    assert!(
        buckets.iter().all(|&b| (30..=95).contains(&b)),
        "{buckets:?}"
    );
    // A counter or a small step would put neighbours close; random IDs almost never do.
    assert!(close_neighbours <= 5, "{close_neighbours}");
}

/// A reply from `from` (the upstream's socket or another), for `labels` spelled as given.
fn forged_reply(id: u16, labels: &[Vec<u8>], addr: [u8; 4]) -> Vec<u8> {
    let name = Name::from_labels(labels.iter().map(Vec::as_slice)).unwrap();
    let mut reply = Message::new(id, MessageType::Response, OpCode::Query);
    reply.metadata.recursion_desired = true;
    reply.metadata.recursion_available = true;
    reply.add_query(Query::query(name.clone(), RecordType::A));
    reply.add_answer(Record::from_rdata(
        name,
        300,
        RData::A(A::new(addr[0], addr[1], addr[2], addr[3])),
    ));
    reply.to_vec().unwrap()
}

fn flip_case(labels: &[Vec<u8>]) -> Vec<Vec<u8>> {
    labels
        .iter()
        .map(|l| {
            l.iter()
                .map(|b| {
                    if b.is_ascii_alphabetic() {
                        b ^ 0x20
                    } else {
                        *b
                    }
                })
                .collect()
        })
        .collect()
}

/// Waits until the upstream has received a query for `suffix`.
fn pending_query(upstream: &Upstream, suffix: &str) -> SeenQuery {
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        if let Some(q) = upstream.seen_for(suffix).into_iter().next() {
            return q;
        }
        assert!(Instant::now() < until, "no upstream query for {suffix}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// While a query is pending, replies forged from the upstream's address to the port it left
/// from, with another ID, another question, the question in another letter case, or sent from
/// another port of the upstream's address, are all ignored, and the real answer is taken. The
/// control: a forgery that matches in every respect does get through (so the forgeries above
/// did reach dnsfence's socket, and were refused for what was wrong with them).
#[test]
fn forged_upstream_replies_are_ignored_and_the_real_answer_taken() {
    let upstream = Upstream::start();
    upstream.a("api.allowed.test", "198.51.100.10", 300);
    upstream.a("ctl.allowed.test", "198.51.100.11", 300);
    upstream.set_behaviour(Behaviour::Slow(700));
    let fence = fence_with(&upstream, &["*.allowed.test"], "");
    let forged = [198, 51, 100, 66];
    let other_port = UdpSocket::bind("127.0.0.1:0").unwrap();

    let addr = fence.addr;
    let client = std::thread::spawn(move || {
        let reply = query_udp(addr, &query("api.allowed.test", RecordType::A)).unwrap();
        addresses(&reply)
    });
    let pending = pending_query(&upstream, "api.allowed.test");
    let to = pending.peer;
    let (id, labels) = (pending.id, pending.labels.clone());
    let other_name: Vec<Vec<u8>> = vec![b"evil".to_vec(), b"test".to_vec()];
    upstream.send_from_upstream(&forged_reply(id ^ 0x5a5a, &labels, forged), to);
    upstream.send_from_upstream(&forged_reply(id, &other_name, forged), to);
    upstream.send_from_upstream(&forged_reply(id, &flip_case(&labels), forged), to);
    other_port
        .send_to(&forged_reply(id, &labels, forged), to)
        .unwrap();
    assert_eq!(client.join().unwrap(), ["198.51.100.10"]);
    let log = fence.log(1);
    assert_eq!(log[0]["answers"].as_array().unwrap().len(), 1, "{log:?}");

    // Control: the same path with everything right is taken (the forger's win, by design).
    let client = std::thread::spawn(move || {
        let reply = query_udp(addr, &query("ctl.allowed.test", RecordType::A)).unwrap();
        addresses(&reply)
    });
    let pending = pending_query(&upstream, "ctl.allowed.test");
    upstream.send_from_upstream(
        &forged_reply(pending.id, &pending.labels, forged),
        pending.peer,
    );
    assert_eq!(client.join().unwrap(), ["198.51.100.66"]);
}

/// 200 clients asking one uncached name at once cost the upstream one query, and every client
/// gets the answer.
#[test]
fn many_clients_asking_one_uncached_name_cause_one_upstream_query() {
    let upstream = Upstream::start();
    upstream.a("herd.allowed.test", "198.51.100.10", 300);
    upstream.set_behaviour(Behaviour::Slow(300));
    let fence = fence_with(
        &upstream,
        &["herd.allowed.test"],
        // All of loopback is one client to dnsfence: give it every in-flight slot.
        "limits: {client_qps: 0, max_inflight_per_client: 1024}\n",
    );
    let bytes = query("herd.allowed.test", RecordType::A).to_vec().unwrap();
    let clients: Vec<UdpSocket> = (0..200)
        .map(|_| {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            socket.send_to(&bytes, fence.addr).unwrap();
            socket
        })
        .collect();
    let mut answered = 0;
    let mut buf = [0u8; 1500];
    for socket in &clients {
        if let Ok((len, _)) = socket.recv_from(&mut buf) {
            let reply = Message::from_vec(&buf[..len]).unwrap();
            if reply.metadata.response_code == ResponseCode::NoError
                && addresses(&reply) == ["198.51.100.10"]
            {
                answered += 1;
            }
        }
    }
    let queries = upstream.seen_for("herd.allowed.test").len();
    eprintln!("200 clients: {answered} answered, {queries} upstream queries");
    assert_eq!(answered, 200);
    assert_eq!(queries, 1);
    assert_eq!(fence.log(200).len(), 200, "every client has its log line");
}

/// A policy with `upstreams` in this order, `*.allowed.test` allowed without a name budget.
fn policy_for(upstreams: &[&Upstream], extra: &str) -> String {
    let list: Vec<String> = upstreams
        .iter()
        .map(|u| format!("\"{}\"", u.addr))
        .collect();
    format!(
        "listen: [\"127.0.0.1:5353\"]\nupstreams: [{}]\nupstream_timeout: 2s\n\
         allow: [\"*.allowed.test\"]\nfirewall: {{enabled: false}}\n\
         limits: {{client_qps: 0}}\nexfiltration: {{wildcard_names_per_minute: 0}}\n{extra}",
        list.join(", ")
    )
}

/// The upstream a query's log line names.
fn answered_by(fence: &Dnsfence, qname: &str) -> String {
    let want = fqdn(qname);
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let log = read_log(&fence.log_path);
        if let Some(line) = log.iter().find(|l| l["qname"] == want.as_str()) {
            return line["upstream"].as_str().unwrap_or("").to_owned();
        }
        assert!(Instant::now() < until, "no log line for {qname}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `[dead, alive]`: the first query finds out (answered by the live one within its budget),
/// the next 20 are answered at the live one's speed without waiting for the dead one, and when
/// the dead one comes back (probed in the background) it is used again, being the faster.
#[test]
fn a_dead_upstream_is_skipped_after_one_failure_and_used_again_when_it_comes_back() {
    let dead = Upstream::start();
    let alive = Upstream::start();
    for i in 0..200 {
        dead.a(&format!("n{i}.allowed.test"), "198.51.100.1", 300);
        alive.a(&format!("n{i}.allowed.test"), "198.51.100.2", 300);
    }
    dead.set_behaviour(Behaviour::Silent);
    let fence = Dnsfence::start(&policy_for(&[&dead, &alive], ""));

    let started = Instant::now();
    let first = fence.udp("n0.allowed.test", RecordType::A);
    let took = started.elapsed();
    assert_eq!(addresses(&first), ["198.51.100.2"], "{:?}", fence.log(1));
    assert!(
        took < Duration::from_millis(1500),
        "first query took {took:?}"
    );
    assert_eq!(
        answered_by(&fence, "n0.allowed.test"),
        alive.addr.to_string()
    );
    let dead_queries = dead.seen().len();

    let mut slowest = Duration::ZERO;
    for i in 1..=20 {
        let name = format!("n{i}.allowed.test");
        let started = Instant::now();
        let reply = fence.udp(&name, RecordType::A);
        slowest = slowest.max(started.elapsed());
        assert_eq!(addresses(&reply), ["198.51.100.2"], "{name}");
        assert_eq!(answered_by(&fence, &name), alive.addr.to_string());
    }
    eprintln!(
        "first query {took:?}; next 20: slowest {slowest:?}; the dead upstream saw {} queries \
         meanwhile (background probes)",
        dead.seen().len() - dead_queries
    );
    assert!(slowest < Duration::from_millis(100), "slowest {slowest:?}");

    // It comes back: a background probe finds out, and being faster now (the other one slows
    // down) it gets the queries again.
    dead.set_behaviour(Behaviour::Normal);
    alive.set_behaviour(Behaviour::Slow(150));
    let until = Instant::now() + Duration::from_secs(12);
    let mut i = 21;
    let back_after = loop {
        let name = format!("n{i}.allowed.test");
        let reply = fence.udp(&name, RecordType::A);
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::NoError,
            "{name}"
        );
        if answered_by(&fence, &name) == dead.addr.to_string() {
            break i - 21;
        }
        assert!(
            Instant::now() < until,
            "the upstream that came back is never used"
        );
        std::thread::sleep(Duration::from_millis(50));
        i += 1;
    };
    eprintln!("used again after {back_after} more queries");
}

/// `upstream_order: strict` keeps to the policy's order while the first upstream works;
/// `fastest` (the default) moves to the faster one.
#[test]
fn upstream_order_strict_keeps_the_policy_order_and_fastest_moves_to_the_faster() {
    for (order, extra) in [("strict", "upstream_order: strict\n"), ("fastest", "")] {
        let slow = Upstream::start();
        let fast = Upstream::start();
        for i in 0..10 {
            slow.a(&format!("n{i}.allowed.test"), "198.51.100.1", 300);
            fast.a(&format!("n{i}.allowed.test"), "198.51.100.2", 300);
        }
        slow.set_behaviour(Behaviour::Slow(40));
        let fence = Dnsfence::start(&policy_for(&[&slow, &fast], extra));
        let mut by_fast = 0;
        for i in 0..10 {
            let name = format!("n{i}.allowed.test");
            let reply = fence.udp(&name, RecordType::A);
            assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
            if answered_by(&fence, &name) == fast.addr.to_string() {
                by_fast += 1;
            }
        }
        eprintln!("{order}: {by_fast} of 10 answered by the faster second upstream");
        if order == "strict" {
            assert_eq!(by_fast, 0, "strict order");
        } else {
            assert!(by_fast >= 8, "fastest: {by_fast} of 10");
        }
    }
}

/// An upstream whose answer for `www.allowed.test` is a CNAME to `edge.cdn.test` with 120
/// addresses: too big for UDP, so it is truncated and must be asked again over TCP.
fn big_chain_upstream() -> Upstream {
    let upstream = Upstream::start();
    upstream.cname("www.allowed.test", "edge.cdn.test", 300);
    for i in 0..120 {
        upstream.a("edge.cdn.test", &format!("198.51.100.{}", i + 1), 300);
    }
    upstream
}

/// A truncated answer is asked again over TCP exactly once, for the question itself and never
/// for the CNAME target (hickory-resolver's client followed targets itself), and `cname:
/// strict` holds over TCP: the chain leaves the allowlist, so the client is denied.
#[test]
fn a_truncated_answer_costs_one_tcp_query_and_none_for_cname_targets() {
    // The per-answer quota raised, so that the whole chain comes back.
    let quota = "  max_addresses_per_answer: 4096\n";
    for (mode, extra) in [
        ("follow", quota.to_owned()),
        ("strict", format!("{quota}cname: strict\n")),
    ] {
        let upstream = big_chain_upstream();
        let fence = fence_with(&upstream, &["www.allowed.test"], &extra);
        let reply = fence.tcp("www.allowed.test", RecordType::A);
        let seen = upstream.seen();
        let over_tcp: Vec<&SeenQuery> = seen.iter().filter(|q| q.tcp).collect();
        eprintln!(
            "cname {mode}: {} with {} addresses; upstream saw {:?}",
            reply.metadata.response_code,
            addresses(&reply).len(),
            seen.iter()
                .map(|q| (q.name.as_str(), q.tcp))
                .collect::<Vec<_>>()
        );
        assert_eq!(over_tcp.len(), 1, "{mode}: {seen:?}");
        assert_eq!(over_tcp[0].name, "www.allowed.test.");
        assert!(
            seen.iter().all(|q| q.name == "www.allowed.test."),
            "{mode}: a CNAME target was asked: {seen:?}"
        );
        if mode == "follow" {
            // Control: the chain does come back complete over TCP.
            assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
            assert_eq!(addresses(&reply).len(), 120);
        } else {
            assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
            assert!(reply.answers.is_empty());
        }
    }
}

/// A `tcp://` upstream is asked over TCP only, on one kept-alive connection that carries many
/// questions at once (the upstream answers them one after another, 100 ms each).
#[test]
fn a_tcp_upstream_gets_pipelined_questions_on_one_connection() {
    let upstream = Upstream::start();
    for i in 0..10 {
        upstream.a(&format!("p{i}.allowed.test"), "198.51.100.10", 300);
    }
    upstream.set_tcp_behaviour(Behaviour::Slow(100));
    let yaml = format!(
        "listen: [\"127.0.0.1:5353\"]\nupstreams: [\"tcp://{}\"]\nupstream_timeout: 3s\n\
         allow: [\"*.allowed.test\"]\nfirewall: {{enabled: false}}\nlimits: {{client_qps: 0}}\n",
        upstream.addr
    );
    let fence = Dnsfence::start(&yaml);
    let addr = fence.addr;
    let started = Instant::now();
    let answered: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..10)
            .map(|i| {
                s.spawn(move || {
                    let q = query(&format!("p{i}.allowed.test"), RecordType::A);
                    let reply = query_udp(addr, &q).unwrap();
                    usize::from(addresses(&reply) == ["198.51.100.10"])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let took = started.elapsed();
    let seen = upstream.seen();
    let connections: HashSet<SocketAddr> = seen.iter().map(|q| q.peer).collect();
    eprintln!(
        "10 questions: {answered} answered in {took:?} over {} connection(s); {} queries",
        connections.len(),
        seen.len()
    );
    assert_eq!(answered, 10);
    assert!(seen.iter().all(|q| q.tcp), "UDP used: {seen:?}");
    assert_eq!(seen.len(), 10, "one query per question: {seen:?}");
    assert!(connections.len() <= 2, "{connections:?}");
}

/// A `tls://` upstream: answers come over TLS from a server whose certificate carries the name
/// after `#` and chains to a trusted CA, on one kept-alive connection. A certificate for another
/// name, or one from a CA dnsfence does not trust, fails the handshake: SERVFAIL, no address in
/// the reply or the log, and the server never even received the question.
#[test]
fn a_tls_upstream_answers_only_with_a_trusted_certificate_for_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    let (ca_pem, config) = tls_server("dns.test");
    std::fs::write(&ca_path, ca_pem).unwrap();
    let cases = [
        ("right name, trusted CA", "dns.test", true, true),
        ("wrong name", "other.test", true, false),
        ("untrusted CA", "dns.test", false, false),
    ];
    for (case, cert_name, trust_ca, answers) in cases {
        let upstream = Upstream::start();
        for i in 0..3 {
            upstream.a(&format!("t{i}.allowed.test"), "198.51.100.10", 300);
        }
        let tls_addr = upstream.serve_tls(config.clone());
        let ca_line = if trust_ca {
            format!("upstream_tls_ca: \"{}\"\n", ca_path.display())
        } else {
            String::new()
        };
        let yaml = format!(
            "listen: [\"127.0.0.1:5353\"]\nupstreams: [\"tls://{tls_addr}#{cert_name}\"]\n\
             upstream_timeout: 2s\nallow: [\"*.allowed.test\"]\nfirewall: {{enabled: false}}\n\
             {ca_line}"
        );
        let fence = Dnsfence::start(&yaml);
        for i in 0..3 {
            let name = format!("t{i}.allowed.test");
            let reply = fence.udp(&name, RecordType::A);
            if answers {
                assert_eq!(addresses(&reply), ["198.51.100.10"], "{case}: {name}");
            } else {
                assert_eq!(
                    reply.metadata.response_code,
                    ResponseCode::ServFail,
                    "{case}"
                );
                assert!(reply.answers.is_empty(), "{case}");
            }
        }
        let log = fence.log(3);
        let seen = upstream.seen();
        let connections: HashSet<SocketAddr> = seen.iter().map(|q| q.peer).collect();
        eprintln!(
            "{case}: {} queries over {} TLS connection(s); log errors {:?}",
            seen.len(),
            connections.len(),
            log.iter().map(|l| l["error"].clone()).collect::<Vec<_>>()
        );
        if answers {
            assert_eq!(seen.len(), 3, "{seen:?}");
            assert!(seen.iter().all(|q| q.tcp));
            assert_eq!(connections.len(), 1, "kept alive: {connections:?}");
            assert!(log.iter().all(|l| l["upstream"] == tls_addr.to_string()));
        } else {
            assert!(
                seen.is_empty(),
                "{case}: the server got questions: {seen:?}"
            );
            assert!(
                log.iter().all(|l| l["rcode"] == "SERVFAIL"
                    && l.get("answers")
                        .is_none_or(|a| a.as_array().is_some_and(Vec::is_empty))),
                "{case}: {log:?}"
            );
        }
    }
}

/// A `tcp://` upstream that stops answering is skipped like a UDP one, probed over TCP (a UDP
/// probe would never reach it), on a fresh connection once a question timed out on the old
/// one, and used again when it answers.
#[test]
fn a_dead_tcp_upstream_is_probed_over_tcp_and_used_again_when_it_comes_back() {
    let dead = Upstream::start();
    let alive = Upstream::start();
    for i in 0..300 {
        dead.a(&format!("n{i}.allowed.test"), "198.51.100.1", 300);
        alive.a(&format!("n{i}.allowed.test"), "198.51.100.2", 300);
    }
    dead.set_tcp_behaviour(Behaviour::Silent);
    alive.set_tcp_behaviour(Behaviour::Normal);
    let yaml = format!(
        "listen: [\"127.0.0.1:5353\"]\nupstreams: [\"tcp://{}\", \"tcp://{}\"]\n\
         upstream_timeout: 2s\nupstream_order: strict\nallow: [\"*.allowed.test\"]\n\
         firewall: {{enabled: false}}\nlimits: {{client_qps: 0}}\n\
         exfiltration: {{wildcard_names_per_minute: 0}}\n",
        dead.addr, alive.addr
    );
    let fence = Dnsfence::start(&yaml);
    assert_eq!(
        addresses(&fence.udp("n0.allowed.test", RecordType::A)),
        ["198.51.100.2"]
    );
    for i in 1..=10 {
        let name = format!("n{i}.allowed.test");
        let started = Instant::now();
        assert_eq!(
            addresses(&fence.udp(&name, RecordType::A)),
            ["198.51.100.2"]
        );
        assert!(started.elapsed() < Duration::from_millis(100), "{name}");
    }
    dead.set_tcp_behaviour(Behaviour::Normal);
    let until = Instant::now() + Duration::from_secs(15);
    let mut i = 11;
    loop {
        let name = format!("n{i}.allowed.test");
        if addresses(&fence.udp(&name, RecordType::A)) == ["198.51.100.1"] {
            break;
        }
        assert!(
            Instant::now() < until,
            "the tcp:// upstream that came back is never used: {:?}",
            dead.seen()
        );
        std::thread::sleep(Duration::from_millis(50));
        i += 1;
    }
    assert!(dead.seen().iter().all(|q| q.tcp), "probed over UDP");
    eprintln!("tcp:// upstream used again after {} more queries", i - 11);
}
