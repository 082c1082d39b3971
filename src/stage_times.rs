//! Where a query's time goes: per-stage latency histograms, for finding the source of a tail.
//!
//! Off unless `DNSFENCE_STAGE_TIMES=1` is in the environment at start; off, every probe costs one
//! relaxed load of a flag read once. On, each probe adds its duration to a fixed histogram of
//! atomic counters (four buckets per power of two of nanoseconds, so a percentile is known within
//! 19 %; no lock, no allocation), and the process prints the table to stderr and starts afresh on
//! every `SIGUSR1` (send one before a measured run and one after it) and once at exit.
//!
//! A stage is one span of one query or of one admission batch: the UDP socket to the upstream
//! being opened, the upstream's reply, the wait for the kernel's acknowledgement, the index
//! update, and so on ([`Stage`]). The difference between `query.miss` (the server's whole
//! time for a query that took the full path) and the client's view is time the datagram spent
//! in the socket before the receive loop read it; the difference between `query.miss` and the
//! sum of its stages is time the query's task was ready but not running.
//!
//! The table is for people measuring, not for monitoring (that is `metrics`): it is
//! process-wide, across policies and reloads, and a leaf that imports nothing of ours, so any
//! layer may probe it.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The environment variable that turns the probes on.
pub const ENV: &str = "DNSFENCE_STAGE_TIMES";

/// Buckets per power of two.
const SUB: usize = 4;
/// Powers of two of nanoseconds covered: up to about 18 minutes.
const OCTAVES: usize = 40;
const BUCKETS: usize = OCTAVES * SUB;

/// The spans measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// A query answered on the fast path, from the receive loop's read to its reply's send.
    QueryFast,
    /// A query that took the full path, from the read to the reply's send.
    QueryMiss,
    /// Sending the reply of a full-path query.
    ReplySend,
    /// `Upstreams::resolve` for a question not in the cache.
    Resolve,
    /// Opening, marking and connecting the UDP socket for one question.
    UpstreamSocket,
    /// From the question's first send to its accepted reply.
    UpstreamReply,
    /// The answer filter.
    Filter,
    /// `Admitter::admit` when the kernel must be asked: queueing, commit and acknowledgement.
    AdmitWait,
    /// From an admission request's creation to the admission thread picking it up.
    AdmitQueued,
    /// One group commit's netlink transaction (send and acknowledgement).
    AdmitCommit,
    /// One group commit's bookkeeping after the acknowledgement (lifetimes, confirmations).
    AdmitBookkeeping,
    /// One group commit, whole (shares, commit, bookkeeping, replies).
    AdmitGroup,
    /// Recording the admitted addresses in the revocation index.
    IndexRecord,
    /// Filing the answer in the reply cache.
    Share,
    /// One burst of the query log writer (format, write, flush).
    LogBurst,
}

const STAGES: [Stage; 15] = [
    Stage::QueryFast,
    Stage::QueryMiss,
    Stage::ReplySend,
    Stage::Resolve,
    Stage::UpstreamSocket,
    Stage::UpstreamReply,
    Stage::Filter,
    Stage::AdmitWait,
    Stage::AdmitQueued,
    Stage::AdmitCommit,
    Stage::AdmitBookkeeping,
    Stage::AdmitGroup,
    Stage::IndexRecord,
    Stage::Share,
    Stage::LogBurst,
];

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::QueryFast => "query.fast",
            Stage::QueryMiss => "query.miss",
            Stage::ReplySend => "  reply.send",
            Stage::Resolve => "  resolve",
            Stage::UpstreamSocket => "    upstream.socket",
            Stage::UpstreamReply => "    upstream.reply",
            Stage::Filter => "  filter",
            Stage::AdmitWait => "  admit.wait",
            Stage::AdmitQueued => "    admit.queued",
            Stage::AdmitCommit => "admit.commit (per group)",
            Stage::AdmitBookkeeping => "admit.bookkeeping (per group)",
            Stage::AdmitGroup => "admit.group (per group)",
            Stage::IndexRecord => "  index.record",
            Stage::Share => "  share",
            Stage::LogBurst => "log.burst (writer thread)",
        }
    }
}

struct Histogram {
    buckets: Box<[AtomicU64]>,
    max_ns: AtomicU64,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_ns: AtomicU64::new(0),
        }
    }

    fn add(&self, ns: u64) {
        if let Some(bucket) = self.buckets.get(bucket_of(ns)) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// Counts per bucket and the maximum, zeroing them.
    fn take(&self) -> (Vec<u64>, u64) {
        let counts = self
            .buckets
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect();
        (counts, self.max_ns.swap(0, Ordering::Relaxed))
    }
}

/// Bucket of `ns`: values below `SUB` have one each, then `SUB` per power of two.
fn bucket_of(ns: u64) -> usize {
    if ns < SUB as u64 {
        return ns as usize;
    }
    let octave = 63 - ns.leading_zeros() as usize; // >= 2
    let sub = ((ns >> (octave - 2)) & (SUB as u64 - 1)) as usize;
    ((octave - 1) * SUB + sub).min(BUCKETS - 1)
}

/// The largest value of bucket `i` (the value a percentile in it is reported as).
fn bucket_top(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let octave = i / SUB + 1;
    let sub = (i % SUB) as u64;
    let base = 1u64 << octave;
    base + (sub + 1) * (base / SUB as u64) - 1
}

struct Table {
    stages: Vec<Histogram>,
}

static TABLE: OnceLock<Option<Table>> = OnceLock::new();

fn table() -> Option<&'static Table> {
    TABLE
        .get_or_init(|| {
            std::env::var_os(ENV)
                .is_some_and(|v| !v.is_empty() && v != "0")
                .then(|| Table {
                    stages: STAGES.iter().map(|_| Histogram::new()).collect(),
                })
        })
        .as_ref()
}

/// Whether the probes are on (`DNSFENCE_STAGE_TIMES=1`).
pub fn enabled() -> bool {
    table().is_some()
}

/// Adds one span of `stage`.
pub fn record(stage: Stage, took: Duration) {
    if let Some(table) = table()
        && let Some(h) = STAGES
            .iter()
            .position(|&s| s == stage)
            .and_then(|i| table.stages.get(i))
    {
        h.add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
    }
}

/// A span being measured: `Instant::now()` only when the probes are on.
#[derive(Clone, Copy)]
pub struct Span(Option<Instant>);

impl Span {
    pub fn start() -> Span {
        Span(enabled().then(Instant::now))
    }

    /// Ends the span as one of `stage`.
    pub fn end(self, stage: Stage) {
        if let Some(started) = self.0 {
            record(stage, started.elapsed());
        }
    }
}

/// The table since the last report (count, p50, p90, p99, p99.9, max per stage, in µs), and
/// a fresh start; `None` when the probes are off.
pub fn report() -> Option<String> {
    let table = table()?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<32}{:>9}{:>10}{:>10}{:>10}{:>10}{:>10}   (µs; {ENV})",
        "stage", "count", "p50", "p90", "p99", "p99.9", "max"
    );
    for (stage, h) in STAGES.iter().zip(&table.stages) {
        let (counts, max) = h.take();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            continue;
        }
        let at = |p: f64| {
            let rank = ((p * total as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return bucket_top(i).min(max);
                }
            }
            max
        };
        let us = |ns: u64| ns as f64 / 1000.0;
        let _ = writeln!(
            out,
            "{:<32}{:>9}{:>10.1}{:>10.1}{:>10.1}{:>10.1}{:>10.1}",
            stage.name(),
            total,
            us(at(0.5)),
            us(at(0.9)),
            us(at(0.99)),
            us(at(0.999)),
            us(max)
        );
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_falls_in_a_bucket_whose_top_is_at_least_it() {
        let mut last = 0;
        for ns in (0..5000u64).chain([1 << 20, (1 << 20) + 1, 3 << 30, u64::MAX]) {
            let b = bucket_of(ns);
            assert!(b < BUCKETS);
            assert!(b >= last || ns > 5000, "buckets grow with the value");
            if b < BUCKETS - 1 {
                assert!(
                    bucket_top(b) >= ns,
                    "{ns} in bucket {b} topped {}",
                    bucket_top(b)
                );
                // Within a quarter of an octave.
                assert!(bucket_top(b) <= ns + ns / 4 + 1, "{ns}: {}", bucket_top(b));
            }
            if ns < 5000 {
                last = b;
            }
        }
    }
}
