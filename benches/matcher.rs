//! Cost of `RuleSet::find` against rule sets of 10, 1,000 and 100,000 rules.
//!
//! The matcher walks a trie one label at a time, so the time per query should depend on the
//! number of labels in the query and not on the number of rules. Each set mixes exact, `*.` and
//! `**.` rules; the queries are an exact hit, a miss that shares two labels with the rules, and
//! a deep name (ten labels) allowed by a `**.` rule.
//!
//! Run briefly: `cargo bench --bench matcher -- --warm-up-time 1 --measurement-time 2`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use dnsfence::policy::{Rule, RuleSet};
use hickory_proto::rr::Name;

/// Rule `i`: exact for i % 3 == 0, one-label for 1, any-depth for 2.
fn rule_text(i: usize) -> String {
    match i % 3 {
        0 => format!("host{i}.zone{}.example.com", i % 100),
        1 => format!("*.w{i}.example.net"),
        _ => format!("**.d{i}.example.org"),
    }
}

fn rule_set(n: usize) -> RuleSet {
    let rules = (0..n)
        .map(|i| Rule::parse(&rule_text(i), i + 1).expect("benchmark rules are valid"))
        .collect();
    RuleSet::new(rules).expect("benchmark rules are distinct")
}

/// The largest `i < n` with `i % 3 == residue`.
fn last_of(n: usize, residue: usize) -> usize {
    (0..n).rev().find(|i| i % 3 == residue).expect("n >= 3")
}

fn queries(n: usize) -> [(&'static str, Name); 3] {
    let exact = last_of(n, 0);
    let deep = last_of(n, 2);
    let name = |s: String| Name::from_ascii(s).expect("benchmark names are valid");
    [
        (
            "hit",
            name(format!("host{exact}.zone{}.example.com.", exact % 100)),
        ),
        ("miss", name("nothere.zone1.example.com.".to_owned())),
        (
            "deep",
            name(format!("a.b.c.d.e.f.g.h.d{deep}.example.org.")),
        ),
    ]
}

fn bench_find(c: &mut Criterion) {
    let mut group = c.benchmark_group("find");
    for n in [10, 1_000, 100_000] {
        let set = rule_set(n);
        for (kind, query) in queries(n) {
            assert_eq!(
                set.find(&query).is_some(),
                kind != "miss",
                "{kind} with {n} rules"
            );
            group.bench_with_input(BenchmarkId::new(kind, n), &query, |b, q| {
                b.iter(|| set.find(black_box(q)).is_some())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_find);
criterion_main!(benches);
