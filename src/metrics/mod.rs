//! Metrics and health: Prometheus text at `/metrics`, liveness at `/healthz`, readiness at
//! `/readyz`, on a loopback address only (`metrics.listen`; the policy refuses any other).
//!
//! Counting sits on the query path, so it must cost next to nothing there: every query's log
//! record passes through [`Metrics::observe`], which turns the record's fields (transport, type,
//! decision and reason, group, rcode, latency, upstream, admitted addresses) into indexes of
//! fixed arrays of atomic counters: no allocation, no lock, no label string built per query.
//! Label values are bounded by construction (a fixed list of query types plus `other`, the
//! policy's groups plus `other`). The label strings are put together only at scrape time, by a
//! [`prometheus_client`] collector that reads the arrays and emits Prometheus text.
//!
//! Per-client counters are unbounded by nature (an agent can send from many addresses), so they
//! exist only when the operator asks (`metrics.client_labels: true`), in a map capped at
//! [`MAX_CLIENT_SERIES`] clients, the rest counted as `other`.
//!
//! The endpoint runs on a thread of its own, not on the DNS runtime: a stalled event loop is
//! then something `/healthz` reports rather than something that silences it.

mod http;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use hickory_proto::op::ResponseCode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::control::{Control, REVOKE_CAUSES};
use crate::health::Readiness;
use crate::policy::{Mode, Policy};
use crate::querylog::QueryRecord;

pub use http::{MetricsServer, serve_metrics};

/// Clients with their own series when `client_labels` is on; later ones count as `other`.
pub const MAX_CLIENT_SERIES: usize = 1024;
/// Groups with their own series; later ones (after a reload adds many) count as `other`.
const MAX_GROUPS: usize = 64;
/// `/healthz` fails when the event loop or the firewall thread has not answered for this long.
pub const HEALTH_STALE_AFTER: Duration = Duration::from_secs(5);

const TRANSPORTS: [&str; 2] = ["udp", "tcp"];
/// Query types with their own label value; the rest are `other`.
const QTYPES: [&str; 15] = [
    "A", "AAAA", "CNAME", "HTTPS", "SVCB", "TXT", "MX", "NS", "PTR", "SRV", "SOA", "CAA", "NULL",
    "ANY", "other",
];
/// (decision, reason) pairs: `allow`, each `deny` reason, and the denials audit mode let through.
const OUTCOMES: [(&str, &str); 12] = [
    ("allow", ""),
    ("deny", "policy"),
    ("deny", "qtype"),
    ("deny", "special-use"),
    ("deny", "rebinding"),
    ("deny", "exfiltration-budget"),
    ("deny", "rate-limit"),
    ("deny", "malformed"),
    ("deny", "opcode"),
    ("audit", "policy"),
    ("audit", "qtype"),
    ("audit", "exfiltration-budget"),
];
const RCODES: [&str; 7] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "other",
];
/// Upper bounds of the request duration histogram, in seconds.
const DURATION_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
const UPSTREAM_RESULTS: [&str; 2] = ["answer", "failure"];
const FAMILIES: [&str; 2] = ["ipv4", "ipv6"];

fn counters(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

/// Every counter dnsfence exports, shared by the query path and the endpoint.
pub struct Metrics {
    groups: Vec<String>,
    upstreams: Vec<SocketAddr>,
    mode: Mode,
    firewall_sets: Vec<(String, u32)>,
    /// [transport][qtype][outcome][group]
    queries: Box<[AtomicU64]>,
    responses: Box<[AtomicU64]>,
    duration_buckets: Box<[AtomicU64]>,
    duration_count: AtomicU64,
    duration_sum_us: AtomicU64,
    /// [upstream (+ "unknown")][result]
    upstream_requests: Box<[AtomicU64]>,
    /// Admitted addresses per family, and queries whose admission failed.
    admitted: [AtomicU64; 2],
    admission_failures: AtomicU64,
    clients: Option<Mutex<HashMap<IpAddr, [u64; 3]>>>,
    log_dropped: Option<Arc<AtomicU64>>,
    /// Live elements per allow set (IPv4, IPv6), as the admission thread last told them.
    elements: [AtomicU64; 2],
    /// The running server's control service, once it exists (metrics start first, so that
    /// `/readyz` answers "not ready" meanwhile): reloads, revocations, grants, the cache.
    control: OnceLock<Arc<Control>>,
    /// Drops explained, per explanation, when firewall.log_denied is nflog.
    drops: OnceLock<Arc<dyn DropCounts>>,
    pub(crate) health: Health,
    pub(crate) readiness: Readiness,
}

/// When the event loop and the firewall thread last answered, in milliseconds since `start`.
pub(crate) struct Health {
    start: Instant,
    event_loop: AtomicU64,
    /// `None` when there is no firewall to ask.
    firewall: Option<AtomicU64>,
}

impl Health {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// What is stale, in words; empty when healthy.
    pub(crate) fn stale(&self) -> Vec<String> {
        let now = self.now_ms();
        let limit = u64::try_from(HEALTH_STALE_AFTER.as_millis()).unwrap_or(u64::MAX);
        let mut stale = Vec::new();
        let age = now.saturating_sub(self.event_loop.load(Ordering::Relaxed));
        if age > limit {
            stale.push(format!("the event loop has not answered for {age} ms"));
        }
        if let Some(firewall) = &self.firewall {
            let age = now.saturating_sub(firewall.load(Ordering::Relaxed));
            if age > limit {
                stale.push(format!("the firewall thread has not answered for {age} ms"));
            }
        }
        stale
    }
}

impl Metrics {
    /// Counters for `policy`'s groups and upstreams; `log_dropped` is the query log's count of
    /// records it had to drop.
    pub fn new(
        policy: &Policy,
        readiness: Readiness,
        log_dropped: Option<Arc<AtomicU64>>,
        with_firewall: bool,
    ) -> Metrics {
        let groups: Vec<String> = policy
            .groups()
            .take(MAX_GROUPS)
            .map(|g| g.name.clone())
            .collect();
        let group_slots = groups.len() + 1;
        let set_size = policy.firewall.set_size;
        // The sets are called the same with and without per_client (only their keys differ).
        let firewall_sets = if with_firewall {
            vec![
                ("allow4".to_owned(), set_size),
                ("allow6".to_owned(), set_size),
            ]
        } else {
            Vec::new()
        };
        let client_labels = policy.metrics.is_some_and(|m| m.client_labels);
        Metrics {
            queries: counters(TRANSPORTS.len() * QTYPES.len() * OUTCOMES.len() * group_slots),
            responses: counters(RCODES.len()),
            duration_buckets: counters(DURATION_BUCKETS.len()),
            duration_count: AtomicU64::new(0),
            duration_sum_us: AtomicU64::new(0),
            upstream_requests: counters((policy.upstreams.len() + 1) * UPSTREAM_RESULTS.len()),
            admitted: [AtomicU64::new(0), AtomicU64::new(0)],
            admission_failures: AtomicU64::new(0),
            clients: client_labels.then(|| Mutex::new(HashMap::new())),
            log_dropped,
            elements: [AtomicU64::new(0), AtomicU64::new(0)],
            control: OnceLock::new(),
            drops: OnceLock::new(),
            health: Health {
                start: Instant::now(),
                event_loop: AtomicU64::new(0),
                firewall: with_firewall.then(|| AtomicU64::new(0)),
            },
            readiness,
            groups,
            upstreams: policy.upstreams.clone(),
            mode: policy.mode,
            firewall_sets,
        }
    }

    /// Counts one query from its log record. Allocation-free and lock-free (unless per-client
    /// labels were asked for).
    pub fn observe(&self, record: &QueryRecord) {
        let transport = usize::from(record.transport == "tcp");
        let qtype = record
            .qtype
            .and_then(|qtype| QTYPES.iter().position(|t| *t == <&str>::from(qtype)))
            .unwrap_or(QTYPES.len() - 1);
        let outcome = outcome_index(record);
        let group = record
            .group
            .as_deref()
            .and_then(|name| self.groups.iter().position(|g| g == name))
            .unwrap_or(if record.group.is_none() {
                // Denied before a group was looked up: count it under the default group.
                0
            } else {
                self.groups.len()
            });
        let group_slots = self.groups.len() + 1;
        let index =
            ((transport * QTYPES.len() + qtype) * OUTCOMES.len() + outcome) * group_slots + group;
        if let Some(counter) = self.queries.get(index) {
            counter.fetch_add(1, Ordering::Relaxed);
        }

        let answered = record.error.as_deref() != Some("not answered")
            && !record
                .error
                .as_deref()
                .is_some_and(|e| e.starts_with("reply not sent"));
        if answered {
            let rcode = match record.rcode {
                ResponseCode::NoError => 0,
                ResponseCode::FormErr => 1,
                ResponseCode::ServFail => 2,
                ResponseCode::NXDomain => 3,
                ResponseCode::NotImp => 4,
                ResponseCode::Refused => 5,
                _ => 6,
            };
            self.responses[rcode].fetch_add(1, Ordering::Relaxed);
        }

        let seconds = record.latency_us as f64 / 1e6;
        if let Some(bucket) = DURATION_BUCKETS.iter().position(|&b| seconds <= b) {
            self.duration_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        }
        self.duration_count.fetch_add(1, Ordering::Relaxed);
        self.duration_sum_us
            .fetch_add(record.latency_us, Ordering::Relaxed);

        let admission_failed = record
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("firewall admission failed"));
        if let Some(upstream) = record.upstream {
            let slot = self
                .upstreams
                .iter()
                .position(|u| *u == upstream)
                .unwrap_or(self.upstreams.len());
            let failed = record.rcode == ResponseCode::ServFail && !admission_failed;
            self.upstream_requests[slot * UPSTREAM_RESULTS.len() + usize::from(failed)]
                .fetch_add(1, Ordering::Relaxed);
        }
        if admission_failed {
            self.admission_failures.fetch_add(1, Ordering::Relaxed);
        } else if self.health.firewall.is_some() {
            for answer in &record.answers {
                let family = usize::from(answer.addr.is_ipv6());
                self.admitted[family].fetch_add(1, Ordering::Relaxed);
            }
        }

        if let Some(clients) = &self.clients
            && let Ok(mut clients) = clients.lock()
        {
            let key = if clients.len() < MAX_CLIENT_SERIES || clients.contains_key(&record.client) {
                record.client
            } else {
                IpAddr::from([0, 0, 0, 0])
            };
            let slot = match OUTCOMES[outcome].0 {
                "allow" => 0,
                "deny" => 1,
                _ => 2,
            };
            clients.entry(key).or_default()[slot] += 1;
        }
    }

    /// From now on, also export what the control service and its pipeline count.
    pub fn attach_control(&self, control: Arc<Control>) {
        let _ = self.control.set(control);
    }

    /// From now on, also export the explained drops.
    pub fn attach_drops(&self, drops: Arc<dyn DropCounts>) {
        let _ = self.drops.set(drops);
    }

    /// The admission thread answered with its live elements per family (IPv4, IPv6).
    pub fn firewall_elements(&self, live: [usize; 2]) {
        for (gauge, n) in self.elements.iter().zip(live) {
            gauge.store(n as u64, Ordering::Relaxed);
        }
        self.firewall_answered();
    }

    /// The event loop answered just now.
    pub fn event_loop_answered(&self) {
        let now = self.health.now_ms();
        self.health.event_loop.store(now, Ordering::Relaxed);
    }

    /// The firewall thread answered just now.
    pub fn firewall_answered(&self) {
        if let Some(firewall) = &self.health.firewall {
            firewall.store(self.health.now_ms(), Ordering::Relaxed);
        }
    }

    /// The Prometheus text of every metric.
    pub fn render(self: &Arc<Self>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Exporter(Arc::clone(self))));
        let mut out = String::new();
        if prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

fn outcome_index(record: &QueryRecord) -> usize {
    let decision = if record.audit {
        "audit"
    } else {
        record.decision
    };
    let reason = record.reason.unwrap_or("");
    OUTCOMES
        .iter()
        .position(|&(d, r)| d == decision && (r == reason || decision == "allow"))
        // A denial with a reason of the future: counted as a policy denial rather than lost.
        .unwrap_or(1)
}

/// Reads the counters at scrape time.
#[derive(Debug)]
struct Exporter(Arc<Metrics>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Vec<(&str, String)>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        ConstCounter::new(*value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Vec<(&str, String)>, i64)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in series {
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        ConstGauge::new(*value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Exporter {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let group_slots = m.groups.len() + 1;

        let mut series = Vec::new();
        for (t, transport) in TRANSPORTS.iter().enumerate() {
            for (q, qtype) in QTYPES.iter().enumerate() {
                for (o, (decision, reason)) in OUTCOMES.iter().enumerate() {
                    for g in 0..group_slots {
                        let index = ((t * QTYPES.len() + q) * OUTCOMES.len() + o) * group_slots + g;
                        let value = m.queries.get(index).map_or(0, load);
                        if value == 0 {
                            continue;
                        }
                        let group = m.groups.get(g).map_or("other", String::as_str);
                        series.push((
                            vec![
                                ("transport", (*transport).to_owned()),
                                ("qtype", (*qtype).to_owned()),
                                ("decision", (*decision).to_owned()),
                                ("reason", (*reason).to_owned()),
                                ("group", group.to_owned()),
                            ],
                            value,
                        ));
                    }
                }
            }
        }
        counter(
            &mut encoder,
            "dnsfence_queries",
            "Queries answered, by transport, type, decision (allow, deny, audit: denied but let \
             through by audit mode), reason and client group",
            &series,
        )?;

        let series: Vec<_> = RCODES
            .iter()
            .zip(m.responses.iter())
            .map(|(rcode, c)| (vec![("rcode", (*rcode).to_owned())], load(c)))
            .collect();
        counter(
            &mut encoder,
            "dnsfence_responses",
            "Replies sent, by rcode",
            &series,
        )?;

        {
            let mut metric = encoder.encode_descriptor(
                "dnsfence_request_duration_seconds",
                "From receipt of a query to its reply sent",
                None,
                MetricType::Histogram,
            )?;
            let mut cumulative = 0;
            let buckets: Vec<(f64, u64)> = DURATION_BUCKETS
                .iter()
                .zip(m.duration_buckets.iter())
                .map(|(&bound, c)| {
                    cumulative += load(c);
                    (bound, cumulative)
                })
                .chain(std::iter::once((f64::INFINITY, load(&m.duration_count))))
                .collect();
            metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                load(&m.duration_sum_us) as f64 / 1e6,
                load(&m.duration_count),
                &buckets,
                None,
            )?;
        }

        let mut series = Vec::new();
        for (slot, chunk) in m
            .upstream_requests
            .chunks(UPSTREAM_RESULTS.len())
            .enumerate()
        {
            let upstream = m
                .upstreams
                .get(slot)
                .map_or_else(|| "unknown".to_owned(), SocketAddr::to_string);
            for (result, c) in UPSTREAM_RESULTS.iter().zip(chunk) {
                series.push((
                    vec![
                        ("upstream", upstream.clone()),
                        ("result", (*result).to_owned()),
                    ],
                    load(c),
                ));
            }
        }
        counter(
            &mut encoder,
            "dnsfence_upstream_requests",
            "Forwarded queries by the upstream that answered them (answer) or was asked last \
             before SERVFAIL (failure)",
            &series,
        )?;

        if m.health.firewall.is_some() {
            let mut series: Vec<_> = FAMILIES
                .iter()
                .zip(m.admitted.iter())
                .map(|(family, c)| {
                    (
                        vec![
                            ("family", (*family).to_owned()),
                            ("result", "admitted".to_owned()),
                        ],
                        load(c),
                    )
                })
                .collect();
            series.push((
                vec![
                    ("family", "any".to_owned()),
                    ("result", "failed".to_owned()),
                ],
                load(&m.admission_failures),
            ));
            counter(
                &mut encoder,
                "dnsfence_firewall_admissions",
                "Addresses admitted to the firewall (acknowledged by the kernel before the reply), \
                 and queries whose admission failed (answered SERVFAIL)",
                &series,
            )?;
            let series: Vec<_> = m
                .firewall_sets
                .iter()
                .zip(m.elements.iter())
                .map(|((set, _), n)| {
                    (
                        vec![("set", set.clone())],
                        i64::try_from(load(n)).unwrap_or(i64::MAX),
                    )
                })
                .collect();
            gauge(
                &mut encoder,
                "dnsfence_firewall_elements",
                "Live elements in each allow set, as dnsfence admitted them (updated every second)",
                &series,
            )?;
            let series: Vec<_> = m
                .firewall_sets
                .iter()
                .map(|(set, size)| (vec![("set", set.clone())], i64::from(*size)))
                .collect();
            gauge(
                &mut encoder,
                "dnsfence_firewall_capacity",
                "Elements each allow set can hold (firewall.set_size)",
                &series,
            )?;
        }

        if let Some(control) = m.control.get() {
            encode_control(&mut encoder, control)?;
        }
        if let Some(drops) = m.drops.get() {
            let series: Vec<_> = drops
                .drop_counts()
                .into_iter()
                .map(|(explanation, n)| (vec![("explanation", explanation.to_owned())], n))
                .collect();
            counter(
                &mut encoder,
                "dnsfence_firewall_drops",
                "Packets the firewall dropped and logged to firewall.nflog_group, by explanation \
                 (each (client, destination, port) counted once per few seconds, like the log)",
                &series,
            )?;
        }

        let dropped = m.log_dropped.as_deref().map_or(0, load);
        counter(
            &mut encoder,
            "dnsfence_querylog_dropped",
            "Query log records dropped because the writer could not keep up",
            &[(Vec::new(), dropped)],
        )?;

        let auditing = m.mode.audits_at(SystemTime::now());
        gauge(
            &mut encoder,
            "dnsfence_mode",
            "1 for the mode dnsfence is in now (audit ends by itself at audit.until)",
            &[
                (vec![("mode", "enforce".to_owned())], i64::from(!auditing)),
                (vec![("mode", "audit".to_owned())], i64::from(auditing)),
            ],
        )?;
        gauge(
            &mut encoder,
            "dnsfence_build_info",
            "The running version",
            &[(vec![("version", env!("CARGO_PKG_VERSION").to_owned())], 1)],
        )?;

        if let Some(clients) = &m.clients {
            let snapshot: Vec<(IpAddr, [u64; 3])> = clients
                .lock()
                .map(|c| c.iter().map(|(k, v)| (*k, *v)).collect())
                .unwrap_or_default();
            let mut series = Vec::new();
            for (client, counts) in snapshot {
                let shown = if client == IpAddr::from([0, 0, 0, 0]) {
                    "other".to_owned()
                } else {
                    client.to_string()
                };
                for (decision, value) in ["allow", "deny", "audit"].iter().zip(counts) {
                    if value > 0 {
                        series.push((
                            vec![
                                ("client", shown.clone()),
                                ("decision", (*decision).to_owned()),
                            ],
                            value,
                        ));
                    }
                }
            }
            counter(
                &mut encoder,
                "dnsfence_client_queries",
                "Queries per client address (metrics.client_labels; at most 1024 clients, the \
                 rest as other)",
                &series,
            )?;
        }
        Ok(())
    }
}

/// Counts of explained drops, by explanation (the explainer keeps them).
pub trait DropCounts: Send + Sync {
    fn drop_counts(&self) -> Vec<(&'static str, u64)>;
}

/// What the control service and the upstream stage count: reloads, revocations, grants,
/// the answer cache and the upstreams' reply times.
fn encode_control(
    encoder: &mut DescriptorEncoder,
    control: &Control,
) -> Result<(), std::fmt::Error> {
    let stats = control.stats();
    counter(
        encoder,
        "dnsfence_policy_reloads",
        "Policy reloads (SIGHUP, --watch, ctl reload), by result: ok, or invalid (refused, \
         the previous policy kept serving)",
        &[
            (vec![("result", "ok".to_owned())], stats.reloads_ok),
            (
                vec![("result", "invalid".to_owned())],
                stats.reloads_invalid,
            ),
        ],
    )?;
    let series: Vec<_> = REVOKE_CAUSES
        .iter()
        .zip(stats.revoked)
        .map(|(cause, n)| (vec![("cause", (*cause).to_owned())], n))
        .collect();
    counter(
        encoder,
        "dnsfence_firewall_revoked",
        "Elements deleted from the allow sets before their time, by cause",
        &series,
    )?;
    gauge(
        encoder,
        "dnsfence_grants_active",
        "Temporary grants in force",
        &[(
            Vec::new(),
            i64::try_from(stats.grants_active).unwrap_or(i64::MAX),
        )],
    )?;
    let upstream = control.pipeline().upstream_stats();
    counter(
        encoder,
        "dnsfence_cache_hits",
        "Allowed questions answered from the answer cache",
        &[(Vec::new(), upstream.cache_hits)],
    )?;
    counter(
        encoder,
        "dnsfence_cache_misses",
        "Allowed questions the answer cache could not answer (asked upstream, or waiting for \
         the same question already asked)",
        &[(Vec::new(), upstream.cache_misses)],
    )?;
    gauge(
        encoder,
        "dnsfence_cache_entries",
        "Answers held in the answer cache",
        &[(
            Vec::new(),
            i64::try_from(upstream.cache_entries).unwrap_or(i64::MAX),
        )],
    )?;
    let mut metric = encoder.encode_descriptor(
        "dnsfence_upstream_duration_seconds",
        "From a question sent to an upstream to its reply, per upstream",
        None,
        MetricType::Histogram,
    )?;
    for timings in &upstream.durations {
        let (buckets, sum) = (&timings.buckets, &timings.sum_seconds);
        let count = buckets.last().map_or(0, |(_, n)| *n);
        let upstream = timings.upstream.to_string();
        let labels = [("upstream", upstream.as_str())];
        metric
            .encode_family(&labels.to_vec())?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                *sum, count, buckets, None,
            )?;
    }
    Ok(())
}
