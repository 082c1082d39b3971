//! Counters the upstream stage keeps for the metrics endpoint: cache hits and misses, and how
//! long each upstream took to reply. Atomic increments only; read at scrape time.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the upstream duration histogram, in seconds.
pub const DURATION_BUCKETS: [f64; 10] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// A histogram of reply times, lock-free.
#[derive(Debug)]
pub struct Timings {
    /// Not cumulative: one count per bucket, the last one for anything slower.
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Default for Timings {
    fn default() -> Timings {
        Timings {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Timings {
    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(DURATION_BUCKETS.len());
        if let Some(counter) = self.buckets.get(bucket) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Cumulative counts per bucket bound (the last is +Inf, the total), and the sum in seconds.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, f64) {
        let mut total = 0;
        let mut out = Vec::with_capacity(self.buckets.len());
        for (i, counter) in self.buckets.iter().enumerate() {
            total += counter.load(Ordering::Relaxed);
            out.push((
                DURATION_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY),
                total,
            ));
        }
        (out, self.sum_us.load(Ordering::Relaxed) as f64 / 1e6)
    }
}

/// What the upstream stage did, as the metrics endpoint shows it.
#[derive(Debug, Clone)]
pub struct UpstreamStats {
    /// Questions answered from the cache.
    pub cache_hits: u64,
    /// Questions the cache could not answer (asked upstream, or joined a flight that did).
    pub cache_misses: u64,
    pub cache_entries: usize,
    pub durations: Vec<UpstreamTimings>,
}

/// One upstream's reply times.
#[derive(Debug, Clone)]
pub struct UpstreamTimings {
    pub upstream: SocketAddr,
    /// Cumulative counts per bucket bound, the last one +Inf (the total).
    pub buckets: Vec<(f64, u64)>,
    pub sum_seconds: f64,
}
