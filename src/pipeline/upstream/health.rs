//! What dnsfence has learnt about each upstream: how fast it answers, and whether it is down.
//!
//! Every answer updates a smoothed round-trip time and its variation (as TCP does, RFC 6298);
//! they give the upstream's retransmission timeout, which is also how long a question waits
//! before it is asked of the next upstream as well. An upstream that fails (times out, refuses,
//! is unreachable) is *down* for a back-off period that doubles with each failure in a row up to
//! [`MAX_BACKOFF`]; while down, questions go to the others and cost nothing waiting for it.
//! When its period ends, one question is copied to it as a probe, in the background, and its
//! answer (if any) brings it back. If every upstream is down, they are asked all the same:
//! there is nobody else to ask.
//!
//! Selection: `fastest` asks the upstreams that are up in order of their smoothed RTT (an
//! upstream not yet measured counts as fastest, so each is tried), `strict` in the policy's
//! order; the ones that are down come last either way.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::policy::UpstreamOrder as Order;

/// Retransmission timeout of an upstream not yet measured, and the most it ever is: a cold
/// recursive lookup may take a second, and asking again sooner only doubles its load.
pub const MAX_RTO: Duration = Duration::from_millis(400);

/// The least retransmission timeout, however fast the upstream has been.
pub const MIN_RTO: Duration = Duration::from_millis(200);

/// Back-off after the first failure; it doubles with each failure in a row.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// The longest back-off: a recovered upstream is back in use within this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct State {
    srtt: Option<Duration>,
    rttvar: Duration,
    /// Failures in a row.
    failures: u32,
    down_until: Option<Instant>,
    probing: bool,
}

/// One upstream's health.
#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<State>,
}

/// What to do with an upstream for the next question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Up {
        srtt: Option<Duration>,
    },
    /// Down; `probe` when its back-off is over and no probe is out (the caller sends one).
    Down {
        until: Instant,
        probe: bool,
    },
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The upstream's standing now; claims the probe if one is due.
    pub fn standing(&self, now: Instant) -> Standing {
        let mut state = self.lock();
        match state.down_until {
            None => Standing::Up { srtt: state.srtt },
            Some(until) if now >= until && !state.probing => {
                state.probing = true;
                Standing::Down { until, probe: true }
            }
            Some(until) => Standing::Down {
                until,
                probe: false,
            },
        }
    }

    /// How long to wait for an answer before asking again (or asking the next upstream).
    pub fn rto(&self) -> Duration {
        let state = self.lock();
        match state.srtt {
            None => MAX_RTO,
            Some(srtt) => (srtt + 4 * state.rttvar).clamp(MIN_RTO, MAX_RTO),
        }
    }

    /// An answer (or any reply that shows the upstream works) after `rtt`.
    pub fn answered(&self, rtt: Duration) {
        let mut state = self.lock();
        match state.srtt {
            None => {
                state.srtt = Some(rtt);
                state.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let delta = srtt.abs_diff(rtt);
                state.rttvar = (state.rttvar * 3 + delta) / 4;
                state.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
        state.failures = 0;
        state.down_until = None;
        state.probing = false;
    }

    /// A timeout or an upstream-wide failure: down for the next back-off period.
    pub fn failed(&self, now: Instant) {
        let mut state = self.lock();
        state.failures = state.failures.saturating_add(1);
        let doublings = state.failures.saturating_sub(1).min(16);
        let backoff = FIRST_BACKOFF
            .saturating_mul(1u32 << doublings)
            .min(MAX_BACKOFF);
        state.down_until = Some(now + backoff);
        state.probing = false;
    }

    /// A probe that ended without telling anything (it was cut short).
    pub fn probe_abandoned(&self) {
        self.lock().probing = false;
    }
}

/// The order to ask the upstreams in, and the ones to probe in the background, by index.
pub fn plan(healths: &[&Health], order: Order, now: Instant) -> (Vec<usize>, Vec<usize>) {
    let mut up: Vec<(usize, Option<Duration>)> = Vec::with_capacity(healths.len());
    let mut down: Vec<(usize, Instant)> = Vec::new();
    let mut probes = Vec::new();
    for (index, health) in healths.iter().enumerate() {
        match health.standing(now) {
            Standing::Up { srtt } => up.push((index, srtt)),
            Standing::Down { until, probe } => {
                down.push((index, until));
                if probe {
                    probes.push(index);
                }
            }
        }
    }
    if order == Order::Fastest {
        // Stable: ties keep the policy's order. Unmeasured first, so each gets measured.
        up.sort_by_key(|&(_, srtt)| srtt.unwrap_or(Duration::ZERO));
    }
    // Down ones last, the one back soonest first; if all are down they are all asked, and
    // a probe would only duplicate that.
    down.sort_by_key(|&(_, until)| until);
    if up.is_empty() {
        for &index in &probes {
            if let Some(health) = healths.get(index) {
                health.probe_abandoned();
            }
        }
        probes.clear();
    }
    let asked = up
        .into_iter()
        .map(|(index, _)| index)
        .chain(down.into_iter().map(|(index, _)| index))
        .collect();
    (asked, probes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fastest_healthy_upstream_goes_first_and_a_down_one_last() {
        let (a, b, c) = (Health::default(), Health::default(), Health::default());
        let now = Instant::now();
        let all = [&a, &b, &c];
        assert_eq!(plan(&all, Order::Fastest, now).0, [0, 1, 2], "policy order");
        a.answered(Duration::from_millis(30));
        b.answered(Duration::from_millis(5));
        c.failed(now);
        assert_eq!(plan(&all, Order::Fastest, now).0, [1, 0, 2]);
        assert_eq!(plan(&all, Order::Strict, now).0, [0, 1, 2]);
        b.failed(now);
        assert_eq!(plan(&all, Order::Strict, now).0, [0, 1, 2]);
        assert_eq!(plan(&all, Order::Fastest, now).0, [0, 1, 2]);
    }

    #[test]
    fn back_off_doubles_up_to_its_cap_and_one_probe_is_claimed_when_it_ends() {
        let h = Health::default();
        let t0 = Instant::now();
        h.failed(t0);
        assert_eq!(
            h.standing(t0),
            Standing::Down {
                until: t0 + FIRST_BACKOFF,
                probe: false
            }
        );
        let later = t0 + FIRST_BACKOFF;
        assert!(matches!(
            h.standing(later),
            Standing::Down { probe: true, .. }
        ));
        assert!(
            matches!(h.standing(later), Standing::Down { probe: false, .. }),
            "only one probe at a time"
        );
        h.failed(later);
        assert_eq!(
            h.standing(later),
            Standing::Down {
                until: later + 2 * FIRST_BACKOFF,
                probe: false
            }
        );
        for _ in 0..40 {
            h.failed(later);
        }
        assert!(matches!(
            h.standing(later),
            Standing::Down { until, .. } if until == later + MAX_BACKOFF
        ));
        h.answered(Duration::from_millis(3));
        assert_eq!(
            h.standing(later),
            Standing::Up {
                srtt: Some(Duration::from_millis(3))
            }
        );
    }

    #[test]
    fn the_retransmission_timeout_follows_the_rtt_within_bounds() {
        let h = Health::default();
        assert_eq!(h.rto(), MAX_RTO);
        for _ in 0..20 {
            h.answered(Duration::from_millis(1));
        }
        assert_eq!(h.rto(), MIN_RTO);
        for _ in 0..20 {
            h.answered(Duration::from_millis(900));
        }
        assert_eq!(h.rto(), MAX_RTO);
    }

    #[test]
    fn when_all_are_down_all_are_asked_and_none_probed() {
        let (a, b) = (Health::default(), Health::default());
        let now = Instant::now();
        a.failed(now);
        b.failed(now - Duration::from_millis(500));
        let (asked, probes) = plan(&[&a, &b], Order::Strict, now + FIRST_BACKOFF);
        assert_eq!(asked, [1, 0], "the one back soonest first");
        assert!(probes.is_empty());
    }
}
