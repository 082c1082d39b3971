//! In-process costs of the query path's CPU-bound stages: the policy decision, the answer
//! filter (CNAME chain, TTL clamp, address guard) and the address guard alone.
//!
//! Whole-server throughput (sockets, upstream, netlink) is measured by `benches/load.sh`.
//! Run briefly: `cargo bench --bench pipeline -- --warm-up-time 1 --measurement-time 2`

use std::hint::black_box;
use std::net::IpAddr;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use dnsfence::pipeline::address_guard::AddressGuard;
use dnsfence::pipeline::answer_filter::{AnswerContext, filter_answer};
use dnsfence::pipeline::decision::{Decision, decide};
use dnsfence::policy::{HintMode, Policy};
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

criterion_group!(benches, decision, answer_filter);
criterion_main!(benches);
