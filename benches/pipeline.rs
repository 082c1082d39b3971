//! In-process costs of the query path: the policy decision, the answer filter (CNAME chain, TTL
//! clamp, address guard), the address guard alone, and one whole UDP query through the server's
//! handler (parse, pipeline, encode, log record) for a cache hit and for a denial.
//!
//! The query log: what the answering thread pays to hand one record to the writer
//! (`querylog/hand_off`: fill the fields of a cache hit's record and queue it), and what the
//! writer thread pays to turn it into its JSON line (`querylog/format_line`).
//!
//! Whole-server throughput (sockets, upstream, netlink) is measured by `benches/load.sh`.
//! Run briefly: `cargo bench --bench pipeline -- --warm-up-time 1 --measurement-time 2`
//!
//! Instructions per query, repeatable on a busy machine (the benchmark binary runs N queries of
//! one kind and nothing else when `CALLGRIND` is set):
//! `CALLGRIND=hit CALLGRIND_QUERIES=10000 valgrind --tool=callgrind --toggle-collect='*one_query*' target/release/deps/pipeline-*[^.d]`

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use dnsfence::pipeline::address_guard::AddressGuard;
use dnsfence::pipeline::answer_filter::{AnswerContext, filter_answer};
use dnsfence::pipeline::decision::{Decision, decide};
use dnsfence::pipeline::upstream::Upstreams;
use dnsfence::pipeline::{Generation, Pipeline, Transport};
use dnsfence::policy::{HintMode, LogTarget, Policy};
use dnsfence::querylog::{LineFormat, LoggedAddress, PolicyTag, QueryLog, QueryRecord, ShortText};
use dnsfence::server::Handler;
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::rdata::{A, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};

const POLICY: &str = r#"
listen: ["127.0.0.1:5353"]
upstreams: ["192.0.2.53:53"]
allow:
  - api.allowed.test
  - "*.cdn.allowed.test"
  - "**.deep.allowed.test"
firewall: {enabled: false}
"#;

fn name(text: &str) -> Name {
    Name::from_ascii(text).expect("benchmark names are valid")
}

fn decision(c: &mut Criterion) {
    let policy = Policy::parse(POLICY, Path::new("bench.yaml")).expect("benchmark policy");
    let client: IpAddr = "127.0.0.1".parse().expect("address");
    let allowed = name("x.y.z.deep.allowed.test.");
    let denied = name("exfil-0123456789abcdef.evil.example.");
    c.bench_function("decide/allowed_wildcard", |b| {
        b.iter(|| {
            matches!(
                decide(&policy, client, black_box(&allowed), RecordType::A),
                Decision::Allow { .. }
            )
        })
    });
    c.bench_function("decide/denied", |b| {
        b.iter(|| {
            matches!(
                decide(&policy, client, black_box(&denied), RecordType::A),
                Decision::Allow { .. }
            )
        })
    });
}

fn answer_filter(c: &mut Criterion) {
    let policy = Policy::parse(POLICY, Path::new("bench.yaml")).expect("benchmark policy");
    let guard = AddressGuard::new(&[], &["192.0.2.53".parse().expect("address")]);
    let qname = name("www.api.allowed.test.");
    let mut answers = vec![
        Record::from_rdata(
            qname.clone(),
            300,
            RData::CNAME(CNAME(name("edge.cdn.example."))),
        ),
        Record::from_rdata(
            name("edge.cdn.example."),
            60,
            RData::CNAME(CNAME(name("n7.cdn.example."))),
        ),
    ];
    for i in 0..8u8 {
        answers.push(Record::from_rdata(
            name("n7.cdn.example."),
            30,
            RData::A(A::new(198, 51, 100, i)),
        ));
    }
    answers.push(Record::from_rdata(
        name("other.example."),
        30,
        RData::A(A::new(203, 0, 113, 1)),
    ));
    let allowed = |_: &Name| true;
    let cx = AnswerContext {
        qname: &qname,
        qtype: RecordType::A,
        ttl: policy.ttl,
        guard: &guard,
        allow_answers: &[],
        strict_chain: None,
        name_allowed: &allowed,
        hints: HintMode::Admit,
        max_per_family: 32,
    };
    c.bench_function("answer_filter/cname_chain_8_addresses", |b| {
        b.iter(|| {
            black_box(filter_answer(&cx, black_box(&answers)))
                .admit
                .len()
        })
    });
    let addresses: Vec<IpAddr> = [
        "93.184.216.34",
        "10.1.2.3",
        "::ffff:127.0.0.1",
        "2606:4700::1111",
    ]
    .iter()
    .map(|a| a.parse().expect("address"))
    .collect();
    c.bench_function("address_guard/4_addresses", |b| {
        b.iter(|| {
            addresses
                .iter()
                .filter(|&&ip| {
                    guard.verdict(black_box(ip), &[])
                        == dnsfence::pipeline::address_guard::AddressVerdict::Permitted
                })
                .count()
        })
    });
}

// ---- the whole answering path of one UDP query, in process --------------------------------------

/// A loopback upstream that answers every A question with 11.0.0.1 (TTL 3600), for as long as
/// the benchmark runs; only the first query of each name reaches it (the rest are cache hits).
fn start_upstream() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the upstream");
    let addr = socket.local_addr().expect("upstream address");
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((len, peer)) = socket.recv_from(&mut buf) {
            let Ok(query) = Message::from_vec(buf.get(..len).unwrap_or_default()) else {
                continue;
            };
            let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
            reply.metadata.recursion_available = true;
            reply.queries = query.queries.clone();
            for q in &query.queries {
                reply.answers.push(Record::from_rdata(
                    q.name().clone(),
                    3600,
                    RData::A(A::new(11, 0, 0, 1)),
                ));
            }
            if let Ok(bytes) = reply.to_vec() {
                let _ = socket.send_to(&bytes, peer);
            }
        }
    });
    addr
}

/// A handler over a real pipeline (firewall off) and a query log written to /dev/null by its
/// own thread, as `dnsfence serve` builds it.
fn handler(runtime: &tokio::runtime::Runtime) -> Handler {
    let upstream = start_upstream();
    let yaml = format!(
        "listen: [\"127.0.0.1:5353\"]\nupstreams: [\"{upstream}\"]\nallow: [\"**.bench.test\"]\n\
         limits: {{client_qps: 0}}\nfirewall: {{enabled: false}}\n"
    );
    let policy = Arc::new(Policy::parse(&yaml, Path::new("bench.yaml")).expect("bench policy"));
    let upstreams = runtime
        .block_on(async {
            Upstreams::new(
                &policy.upstreams,
                &policy.upstream_options,
                policy.upstream_timeout,
                0,
            )
        })
        .expect("upstreams");
    let pipeline = Pipeline::new(Generation::new(policy, "00"), upstreams, None);
    let (log, writer) =
        QueryLog::open(&LogTarget::File("/dev/null".into())).expect("query log to /dev/null");
    // The writer thread lives as long as the benchmark process.
    std::mem::forget(writer);
    Handler::new(Arc::new(pipeline), log)
}

fn query_bytes(name: &str) -> Vec<u8> {
    let mut message = Message::query();
    message.metadata.id = 0x4242;
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(
        Name::from_ascii(name).expect("name"),
        RecordType::A,
    ));
    message.to_vec().expect("query")
}

/// One query through the handler, as a UDP front end runs it: answer, then log.
#[inline(never)]
fn one_query(
    runtime: &tokio::runtime::Runtime,
    handler: &Handler,
    message: &[u8],
    reply: &mut Vec<u8>,
) -> usize {
    let peer: SocketAddr = "127.0.0.1:40000".parse().expect("peer");
    runtime.block_on(async {
        let pending = handler
            .answer(message.to_vec(), peer, Transport::Udp, reply)
            .await;
        handler.finish(pending, Ok(()));
    });
    reply.len()
}

/// `CALLGRIND=hit|denied`: `CALLGRIND_QUERIES` (10,000) queries of one kind and nothing else,
/// for `valgrind --tool=callgrind --toggle-collect='*one_query*'` (instructions per query: the
/// collected total over the count).
fn callgrind(which: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let handler = handler(&runtime);
    let hit = query_bytes("api.bench.test.");
    let denied = query_bytes("exfil-0123456789abcdef.evil.example.");
    let mut reply = Vec::new();
    assert!(one_query(&runtime, &handler, &hit, &mut reply) > hit.len());
    let count: usize = std::env::var("CALLGRIND_QUERIES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let message = if which == "denied" { &denied } else { &hit };
    for _ in 0..count {
        black_box(one_query(&runtime, &handler, message, &mut reply));
    }
}

fn handler_paths(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let handler = handler(&runtime);
    let hit = query_bytes("api.bench.test.");
    let denied = query_bytes("exfil-0123456789abcdef.evil.example.");
    let mut reply = Vec::new();
    // Fills the cache: every later `hit` is answered from it.
    assert!(one_query(&runtime, &handler, &hit, &mut reply) > hit.len());
    c.bench_function("handler/udp_cache_hit", |b| {
        b.iter(|| one_query(&runtime, &handler, black_box(&hit), &mut reply))
    });
    c.bench_function("handler/udp_denied", |b| {
        b.iter(|| one_query(&runtime, &handler, black_box(&denied), &mut reply))
    });
}

/// A cache hit's record as the pipeline fills it: question, group, rule, one address.
fn hit_record(name: &Name) -> QueryRecord {
    let mut record = QueryRecord::new("127.0.0.1:40000".parse().expect("peer"), "udp")
        .with_question(name, RecordType::A);
    record.policy = PolicyTag::of_hex("0123456789abcdef");
    record.decision = "allow";
    record.group = Some(ShortText::from("default"));
    record.rule = Some(ShortText::from("**.bench.test"));
    record.answers = [LoggedAddress {
        addr: IpAddr::from([11, 0, 0, 1]),
        ttl: 3600,
    }]
    .into_iter()
    .collect();
    record.upstream = Some("127.0.0.1:53".parse().expect("upstream"));
    record.latency_us = 21;
    record
}

fn querylog(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (log, writer) =
        QueryLog::open(&LogTarget::File(dir.path().join("queries.jsonl"))).expect("query log");
    let name = name("api.bench.test.");
    // Timed in bursts well below the queue's length, with a pause after each for the writer
    // to drain it (untimed): what is measured is the hand-off, never the drop of a full queue.
    const BURST: u64 = 1000;
    c.bench_function("querylog/hand_off", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let burst = left.min(BURST);
                let start = Instant::now();
                for _ in 0..burst {
                    log.record(hit_record(black_box(&name)));
                }
                spent += start.elapsed();
                left -= burst;
                std::thread::sleep(Duration::from_millis(15));
            }
            spent
        })
    });
    let record = hit_record(&name);
    let mut line = Vec::with_capacity(1024);
    // As the writer thread does: one formatter for every line (the date is formatted once a
    // second).
    let mut format = LineFormat::default();
    c.bench_function("querylog/format_line", |b| {
        b.iter(|| {
            line.clear();
            format.write(&mut line, black_box(&record));
            line.len()
        })
    });
    assert_eq!(
        log.dropped().load(Ordering::Relaxed),
        0,
        "records were dropped"
    );
    drop(log);
    writer.finish();
}

criterion_group!(benches, decision, answer_filter, handler_paths, querylog);

fn main() {
    if let Ok(which) = std::env::var("CALLGRIND") {
        callgrind(&which);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
