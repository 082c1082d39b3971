//! Stage 4: keep only what answers the question, and decide what the firewall must admit.
//!
//! A response may carry records for any name in any section; a resolver that passed them on, or
//! admitted their addresses, would let an allowed zone open doors for names the policy never
//! named. So the answer is rebuilt from the answer section alone: the CNAME chain that starts at
//! the question's name, followed in order and only inside that section, and the records of the
//! asked type at its end. Authority and additional records never reach the client.
//!
//! The same stage clamps TTLs: an address is admitted for `clamp(ttl, min, max) + grace`, and
//! the client is told at most `min(ttl, max)`, so no client caches an address longer than the
//! firewall lets packets reach it.
//!
//! And it bounds what one answer may put into the firewall: at most `max_per_family` addresses
//! of each family (`firewall.max_addresses_per_answer`) are admitted and returned, in the
//! order the upstream gave them; the rest are removed from the reply. Without that, a hostile
//! allowed zone answering 4,096 addresses over TCP fills a 65,536-element set in 16 answers,
//! and every client gets SERVFAIL until the elements expire.

use std::net::IpAddr;
use std::time::Duration;

use hickory_proto::rr::rdata::svcb::{SvcParamKey, SvcParamValue};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use ipnet::IpNet;

use super::address_guard::{AddressGuard, AddressVerdict};
use crate::policy::{HintMode, TtlPolicy};

/// Longest CNAME chain followed; longer ones are cut there (real chains have a handful).
pub const MAX_CHAIN: usize = 16;

/// What the filter needs to know about the query and the policy.
pub struct AnswerContext<'a> {
    pub qname: &'a Name,
    pub qtype: RecordType,
    pub ttl: TtlPolicy,
    pub guard: &'a AddressGuard,
    /// `allow_answers` of the rule and of the group that allowed the name.
    pub allow_answers: &'a [IpNet],
    /// With `cname: strict`, every name of the chain must pass this test.
    pub strict_chain: Option<&'a (dyn Fn(&Name) -> bool + Sync)>,
    /// Whether HTTPS/SVCB alias targets are allowed names.
    pub name_allowed: &'a (dyn Fn(&Name) -> bool + Sync),
    pub hints: HintMode,
    /// Most addresses of each family admitted and returned (`firewall.max_addresses_per_answer`).
    pub max_per_family: usize,
}

/// The answer as it may be returned, and the addresses the firewall must admit first.
#[derive(Debug, Default)]
pub struct FilteredAnswer {
    pub records: Vec<Record>,
    /// Every address in `records` (A, AAAA and HTTPS/SVCB hints) with its firewall lifetime.
    pub admit: Vec<(IpAddr, Duration)>,
    /// Addresses taken out by the address guard.
    pub refused_addresses: Vec<IpAddr>,
    /// With `cname: strict`: the first name of the chain the policy does not allow.
    pub chain_violation: Option<Name>,
    /// Records of the upstream's answer section that were not passed on.
    pub dropped_records: usize,
    /// Addresses the guard permitted but the per-answer quota left out.
    pub over_quota: usize,
    /// Addresses admitted so far, IPv4 and IPv6.
    admitted_per_family: [usize; 2],
}

impl FilteredAnswer {
    /// True when the guard took every address out and nothing usable is left: the answer is
    /// then replaced by NXDOMAIN and logged as rebinding.
    pub fn stripped_to_nothing(&self) -> bool {
        !self.refused_addresses.is_empty() && self.admit.is_empty()
    }
}

/// TTL the client is told.
pub fn reply_ttl(ttl: u32, policy: &TtlPolicy) -> u32 {
    ttl.min(secs_u32(policy.max))
}

/// How long the firewall admits an address whose record had `ttl`.
pub fn admission_lifetime(ttl: u32, policy: &TtlPolicy) -> Duration {
    let clamped = Duration::from_secs(u64::from(ttl)).clamp(policy.min, policy.max.max(policy.min));
    // Never zero: an element without a timeout would never expire.
    (clamped + policy.grace).max(Duration::from_secs(1))
}

fn secs_u32(duration: Duration) -> u32 {
    u32::try_from(duration.as_secs()).unwrap_or(u32::MAX)
}

/// Filters `answers` (the upstream's answer section) for the question in `cx`.
pub fn filter_answer(cx: &AnswerContext<'_>, answers: &[Record]) -> FilteredAnswer {
    let mut out = FilteredAnswer::default();
    let mut current = cx.qname.clone();
    let mut hops = 0;
    // Follow the chain: at each name, take its CNAME (if the question is not for CNAMEs
    // themselves) and move on, until a name has records of the asked type or nothing.
    loop {
        if let Some(test) = cx.strict_chain
            && !test(&current)
        {
            out.chain_violation = Some(current);
            out.records.clear();
            out.admit.clear();
            break;
        }
        let mut next = None;
        for record in answers.iter().filter(|r| r.name == current) {
            let rtype = record.record_type();
            if rtype == cx.qtype {
                keep(cx, record, &mut out);
            } else if rtype == RecordType::CNAME
                && next.is_none()
                && let RData::CNAME(target) = &record.data
            {
                next = Some(target.0.clone());
                keep(cx, record, &mut out);
            }
        }
        match next {
            Some(target) if cx.qtype != RecordType::CNAME && hops < MAX_CHAIN => {
                hops += 1;
                current = target;
            }
            _ => break,
        }
    }
    out.dropped_records = answers.len().saturating_sub(out.records.len());
    out
}

/// Adds one record to the output, with its TTL clamped and its addresses judged.
fn keep(cx: &AnswerContext<'_>, record: &Record, out: &mut FilteredAnswer) {
    let lifetime = admission_lifetime(record.ttl, &cx.ttl);
    let mut record = record.clone();
    record.ttl = reply_ttl(record.ttl, &cx.ttl);
    let judge = |ip: IpAddr, out: &mut FilteredAnswer| -> bool {
        if cx.guard.verdict(ip, cx.allow_answers) != AddressVerdict::Permitted {
            out.refused_addresses.push(ip);
            return false;
        }
        let family = usize::from(ip.is_ipv6());
        if out.admitted_per_family[family] >= cx.max_per_family {
            out.over_quota += 1;
            return false;
        }
        out.admitted_per_family[family] += 1;
        out.admit.push((ip, lifetime));
        true
    };
    let usable = match &mut record.data {
        RData::A(a) => judge(IpAddr::V4(a.0), out),
        RData::AAAA(aaaa) => judge(IpAddr::V6(aaaa.0), out),
        RData::HTTPS(https) => filter_service_binding(cx, &mut https.0, &mut |ip| judge(ip, out)),
        RData::SVCB(svcb) => filter_service_binding(cx, svcb, &mut |ip| judge(ip, out)),
        _ => true,
    };
    if usable {
        out.records.push(record);
    }
}

/// Applies the hint policy to one HTTPS/SVCB record; false when the record must go.
fn filter_service_binding(
    cx: &AnswerContext<'_>,
    svcb: &mut hickory_proto::rr::rdata::SVCB,
    judge: &mut dyn FnMut(IpAddr) -> bool,
) -> bool {
    // AliasMode sends the client to another name; only an allowed one may stay.
    if svcb.svc_priority == 0
        && !svcb.target_name.is_root()
        && !(cx.name_allowed)(&svcb.target_name)
    {
        return false;
    }
    svcb.svc_params
        .retain_mut(|(key, value)| match (key, value) {
            (SvcParamKey::Ipv4Hint | SvcParamKey::Ipv6Hint, _) if cx.hints == HintMode::Strip => {
                false
            }
            (_, SvcParamValue::Ipv4Hint(hint)) => {
                hint.0.retain(|a| judge(IpAddr::V4(a.0)));
                !hint.0.is_empty()
            }
            (_, SvcParamValue::Ipv6Hint(hint)) => {
                hint.0.retain(|a| judge(IpAddr::V6(a.0)));
                !hint.0.is_empty()
            }
            _ => true,
        });
    true
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_proto::rr::rdata::{A, AAAA};

    use super::*;

    /// Filters with [`PLAIN`] but for the per-family quota.
    fn filter(answers: &[Record], max_per_family: usize) -> FilteredAnswer {
        filtered(
            Setup {
                max_per_family,
                ..PLAIN
            },
            answers,
        )
    }

    fn a_records(n: u32) -> Vec<Record> {
        let qname = name("q.example.");
        (0..n)
            .map(|i| {
                let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 51, 0, 0)) + i);
                Record::from_rdata(qname.clone(), 300, RData::A(A(ip)))
            })
            .collect()
    }

    #[test]
    fn at_most_the_quota_of_addresses_is_admitted_and_returned_in_upstream_order() {
        let answers = a_records(4096);
        let out = filter(&answers, 32);
        assert_eq!(out.admit.len(), 32);
        assert_eq!(out.records.len(), 32);
        assert_eq!(out.over_quota, 4096 - 32);
        assert!(out.refused_addresses.is_empty() && !out.stripped_to_nothing());
        assert_eq!(out.records[0], {
            let mut r = answers[0].clone();
            r.ttl = 300;
            r
        });
        // The control: a quota above the answer keeps everything.
        let out = filter(&answers, 4096);
        assert_eq!((out.admit.len(), out.over_quota), (4096, 0));
    }

    #[test]
    fn the_quota_counts_each_family_apart() {
        let qname = name("q.example.");
        let mut answers = a_records(5);
        for i in 0..5u16 {
            answers.push(Record::from_rdata(
                qname.clone(),
                300,
                RData::AAAA(AAAA(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i + 1))),
            ));
        }
        let mut seen = Vec::new();
        for qtype in [RecordType::A, RecordType::AAAA] {
            let setup = Setup {
                qtype,
                max_per_family: 3,
                ..PLAIN
            };
            let out = filtered(setup, &answers);
            seen.push((out.admit.len(), out.over_quota));
        }
        assert_eq!(seen, [(3, 2), (3, 2)]);
    }

    /// What one filtering kept, in a form a table can state.
    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        /// `name type ttl` of every record passed on, in order.
        records: Vec<String>,
        /// Addresses to admit, with their lifetime in seconds.
        admit: Vec<(IpAddr, u64)>,
        refused: Vec<IpAddr>,
        violation: Option<String>,
        dropped: usize,
    }

    fn name(text: &str) -> Name {
        Name::from_ascii(text).unwrap()
    }

    fn a(owner: &str, ttl: u32, ip: [u8; 4]) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::from(ip))))
    }

    fn cname(owner: &str, target: &str) -> Record {
        Record::from_rdata(
            name(owner),
            300,
            RData::CNAME(hickory_proto::rr::rdata::CNAME(name(target))),
        )
    }

    fn https(owner: &str, priority: u16, target: &str, hint: [u8; 4]) -> Record {
        use hickory_proto::rr::rdata::svcb::{IpHint, SVCB};
        let params = vec![(
            SvcParamKey::Ipv4Hint,
            SvcParamValue::Ipv4Hint(IpHint(vec![A(Ipv4Addr::from(hint))])),
        )];
        Record::from_rdata(
            name(owner),
            300,
            RData::HTTPS(hickory_proto::rr::rdata::HTTPS(SVCB::new(
                priority,
                name(target),
                params,
            ))),
        )
    }

    /// The knobs the tests turn; everything else is the default policy's.
    #[derive(Clone, Copy)]
    struct Setup {
        qtype: RecordType,
        strict: bool,
        hints: HintMode,
        allow_private: bool,
        max_per_family: usize,
    }

    const PLAIN: Setup = Setup {
        qtype: RecordType::A,
        strict: false,
        hints: HintMode::Admit,
        allow_private: false,
        max_per_family: 32,
    };

    /// The one fixture: filters `answers` to `q.example.` with names under `allowed.example.`
    /// (and the question) allowed, the default address guard and TTLs.
    fn filtered(setup: Setup, answers: &[Record]) -> FilteredAnswer {
        let qname = name("q.example.");
        let guard = AddressGuard::default();
        let allowed_zone = name("allowed.example.");
        let allowed = |n: &Name| allowed_zone.zone_of(n) || *n == qname;
        let private: [IpNet; 1] = ["10.0.0.0/8".parse().unwrap()];
        let cx = AnswerContext {
            qname: &qname,
            qtype: setup.qtype,
            ttl: TtlPolicy::default(),
            guard: &guard,
            allow_answers: if setup.allow_private { &private } else { &[] },
            strict_chain: if setup.strict { Some(&allowed) } else { None },
            name_allowed: &allowed,
            hints: setup.hints,
            max_per_family: setup.max_per_family,
        };
        filter_answer(&cx, answers)
    }

    /// [`filtered`], as a table row states it.
    fn run(setup: Setup, answers: &[Record]) -> Outcome {
        let out = filtered(setup, answers);
        Outcome {
            records: out
                .records
                .iter()
                .map(|r| format!("{} {} {}", r.name, r.record_type(), r.ttl))
                .collect(),
            admit: out.admit.iter().map(|(ip, d)| (*ip, d.as_secs())).collect(),
            refused: out.refused_addresses.clone(),
            violation: out.chain_violation.as_ref().map(Name::to_string),
            dropped: out.dropped_records,
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn each_answer_is_filtered_as_the_table_says() {
        let public = [198, 51, 100, 7];
        let chain_of = |n: usize| -> Vec<Record> {
            let mut chain: Vec<Record> = (0..n)
                .map(|i| {
                    let from = if i == 0 {
                        "q.example.".to_owned()
                    } else {
                        format!("c{i}.allowed.example.")
                    };
                    cname(&from, &format!("c{}.allowed.example.", i + 1))
                })
                .collect();
            chain.push(a(&format!("c{n}.allowed.example."), 300, public));
            chain
        };
        let strict = Setup {
            strict: true,
            ..PLAIN
        };
        // The CNAMEs up to the cut (test data: leaked to be 'static like the other rows).
        let cut_chain: Vec<&'static str> = chain_of(MAX_CHAIN + 1)
            .iter()
            .take(MAX_CHAIN + 1)
            .map(|r| &*String::leak(format!("{} CNAME 300", r.name)))
            .collect();
        struct Case {
            what: &'static str,
            setup: Setup,
            answers: Vec<Record>,
            records: Vec<&'static str>,
            admit: Vec<(&'static str, u64)>,
            refused: Vec<&'static str>,
            violation: Option<&'static str>,
        }
        let cases = vec![
            Case {
                what: "an address: kept, TTL as given, admitted for TTL + grace",
                setup: PLAIN,
                answers: vec![a("q.example.", 300, public)],
                records: vec!["q.example. A 300"],
                admit: vec![("198.51.100.7", 330)],
                refused: vec![],
                violation: None,
            },
            Case {
                what: "TTLs clamped: the client is told at most max, the firewall admits at least min",
                setup: PLAIN,
                answers: vec![
                    a("q.example.", 86_400, public),
                    a("q.example.", 1, [198, 51, 100, 8]),
                ],
                records: vec!["q.example. A 3600", "q.example. A 1"],
                admit: vec![("198.51.100.7", 3630), ("198.51.100.8", 60)],
                refused: vec![],
                violation: None,
            },
            Case {
                what: "a record for another name is dropped, not admitted",
                setup: PLAIN,
                answers: vec![
                    a("q.example.", 300, public),
                    a("elsewhere.example.", 300, [203, 0, 113, 9]),
                ],
                records: vec!["q.example. A 300"],
                admit: vec![("198.51.100.7", 330)],
                refused: vec![],
                violation: None,
            },
            Case {
                what: "a CNAME chain is followed in order to its addresses",
                setup: PLAIN,
                answers: chain_of(2),
                records: vec![
                    "q.example. CNAME 300",
                    "c1.allowed.example. CNAME 300",
                    "c2.allowed.example. A 300",
                ],
                admit: vec![("198.51.100.7", 330)],
                refused: vec![],
                violation: None,
            },
            Case {
                what: "a chain longer than MAX_CHAIN is cut there: its end is never admitted",
                setup: PLAIN,
                answers: chain_of(MAX_CHAIN + 1),
                records: cut_chain,
                admit: vec![],
                refused: vec![],
                violation: None,
            },
            Case {
                what: "cname: strict stops at the first name the policy does not allow",
                setup: strict,
                answers: vec![
                    cname("q.example.", "c1.allowed.example."),
                    cname("c1.allowed.example.", "tracker.elsewhere."),
                    a("tracker.elsewhere.", 300, public),
                ],
                records: vec![],
                admit: vec![],
                refused: vec![],
                violation: Some("tracker.elsewhere."),
            },
            Case {
                what: "cname: follow passes the same chain",
                setup: PLAIN,
                answers: vec![
                    cname("q.example.", "tracker.elsewhere."),
                    a("tracker.elsewhere.", 300, public),
                ],
                records: vec!["q.example. CNAME 300", "tracker.elsewhere. A 300"],
                admit: vec![("198.51.100.7", 330)],
                refused: vec![],
                violation: None,
            },
            Case {
                what: "a question for CNAME gets the CNAME, not its target",
                setup: Setup {
                    qtype: RecordType::CNAME,
                    ..PLAIN
                },
                answers: vec![
                    cname("q.example.", "c1.allowed.example."),
                    a("c1.allowed.example.", 300, public),
                ],
                records: vec!["q.example. CNAME 300"],
                admit: vec![],
                refused: vec![],
                violation: None,
            },
            Case {
                what: "a private address is refused (rebinding); a public one beside it stays",
                setup: PLAIN,
                answers: vec![
                    a("q.example.", 300, [10, 0, 0, 1]),
                    a("q.example.", 300, public),
                ],
                records: vec!["q.example. A 300"],
                admit: vec![("198.51.100.7", 330)],
                refused: vec!["10.0.0.1"],
                violation: None,
            },
            Case {
                what: "loopback is refused",
                setup: PLAIN,
                answers: vec![a("q.example.", 300, [127, 0, 0, 1])],
                records: vec![],
                admit: vec![],
                refused: vec!["127.0.0.1"],
                violation: None,
            },
            Case {
                what: "allow_answers lets a private range through",
                setup: Setup {
                    allow_private: true,
                    ..PLAIN
                },
                answers: vec![a("q.example.", 300, [10, 0, 0, 1])],
                records: vec!["q.example. A 300"],
                admit: vec![("10.0.0.1", 330)],
                refused: vec![],
                violation: None,
            },
            Case {
                what: "HTTPS hints are admitted with hints: admit",
                setup: Setup {
                    qtype: RecordType::HTTPS,
                    ..PLAIN
                },
                answers: vec![https("q.example.", 1, ".", public)],
                records: vec!["q.example. HTTPS 300"],
                admit: vec![("198.51.100.7", 330)],
                refused: vec![],
                violation: None,
            },
            Case {
                what: "HTTPS hints are stripped (not admitted) with hints: strip",
                setup: Setup {
                    qtype: RecordType::HTTPS,
                    hints: HintMode::Strip,
                    ..PLAIN
                },
                answers: vec![https("q.example.", 1, ".", public)],
                records: vec!["q.example. HTTPS 300"],
                admit: vec![],
                refused: vec![],
                violation: None,
            },
            Case {
                what: "an HTTPS alias to a name the policy does not allow is dropped",
                setup: Setup {
                    qtype: RecordType::HTTPS,
                    ..PLAIN
                },
                answers: vec![
                    https("q.example.", 0, "other.elsewhere.", public),
                    https("q.example.", 0, "svc.allowed.example.", public),
                ],
                records: vec!["q.example. HTTPS 300"],
                admit: vec![("198.51.100.7", 330)],
                refused: vec![],
                violation: None,
            },
        ];
        for case in cases {
            let got = run(case.setup, &case.answers);
            let expected = Outcome {
                records: case.records.iter().map(|r| r.to_string()).collect(),
                admit: case.admit.iter().map(|(a, s)| (ip(a), *s)).collect(),
                refused: case.refused.iter().map(|a| ip(a)).collect(),
                violation: case.violation.map(str::to_owned),
                dropped: case.answers.len() - got.records.len(),
            };
            assert_eq!(got, expected, "{}", case.what);
        }
    }

    #[test]
    fn only_a_refused_answer_with_nothing_left_is_rebinding() {
        let table: &[(&[[u8; 4]], bool)] = &[
            (&[[10, 0, 0, 1]], true),
            (&[[10, 0, 0, 1], [198, 51, 100, 7]], false),
            (&[[198, 51, 100, 7]], false),
            (&[], false),
        ];
        for (addresses, rebinding) in table {
            let answers: Vec<Record> = addresses
                .iter()
                .map(|ip| a("q.example.", 60, *ip))
                .collect();
            let out = filtered(PLAIN, &answers);
            assert_eq!(out.stripped_to_nothing(), *rebinding, "{addresses:?}");
        }
    }
}
