//! Per-client budgets: a query rate, and how many distinct names a wildcard may be used for.
//!
//! An allowed `**.example.com` hands the client an unbounded namespace: every label it invents
//! reaches example.com's authoritative servers, which is exactly how DNS tunnels (iodine,
//! dns2tcp) carry data out. Nothing can make such a rule safe, but its bandwidth can be throttled
//! to a trickle: long names and long labels are refused outright, and each client gets a budget
//! of distinct names per wildcard rule per minute. Repeating a name already seen in the window is
//! free, so ordinary traffic (the same few hosts, over and over) never notices.
//!
//! A third limit is on concurrency: each client's share of the queries in flight
//! ([`InflightShares`]), so that one agent, or one slow zone it keeps asking about, cannot take
//! every slot of `limits.max_inflight` and starve the others.
//!
//! All state lives in maps of fixed maximum size, behind short `std` mutexes that are never held
//! across an await; when a map is full its stale entries are swept, and if none are stale the new
//! client is judged without state (rate-limited), so a flood of spoofed or unique sources cannot
//! grow memory.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use hickory_proto::rr::Name;

use crate::policy::{ExfiltrationLimits, Limits};

/// The identity a budget is charged to. Addresses an agent can change at will without privilege
/// count as one: every loopback address (any local process may send from any of 127/8), and
/// each IPv6 /64 (a host may pick any interface identifier in its prefix). IPv4-mapped IPv6
/// addresses count as their IPv4 address.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) if v4.is_loopback() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) if v6.is_loopback() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(prefix))
        }
    }
}

/// Clients tracked by the rate limiter and the budget at most.
pub const MAX_TRACKED_CLIENTS: usize = 65_536;

const BUDGET_WINDOW: Duration = Duration::from_secs(60);

/// A token bucket per client address.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

struct Bucket {
    tokens: f64,
    refreshed: Instant,
}

impl RateLimiter {
    pub fn new(limits: &Limits) -> Option<RateLimiter> {
        if limits.client_qps == 0 {
            return None;
        }
        Some(RateLimiter {
            rate: f64::from(limits.client_qps),
            burst: f64::from(limits.client_burst.max(limits.client_qps)),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Takes one token for `client`; false when it has none left.
    pub fn allow(&self, client: IpAddr, now: Instant) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else {
            return false;
        };
        if buckets.len() >= MAX_TRACKED_CLIENTS && !buckets.contains_key(&client) {
            // A bucket that has refilled completely carries no information: forget it.
            let full_after = Duration::from_secs_f64(self.burst / self.rate);
            buckets.retain(|_, b| now.duration_since(b.refreshed) < full_after);
            if buckets.len() >= MAX_TRACKED_CLIENTS {
                return false;
            }
        }
        let bucket = buckets.entry(client).or_insert(Bucket {
            tokens: self.burst,
            refreshed: now,
        });
        let elapsed = now.duration_since(bucket.refreshed).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.refreshed = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How many queries each client has in flight, against its share
/// (`limits.max_inflight_per_client`).
///
/// A client holds a count only while it has a query in flight: the count is taken by
/// [`InflightShares::try_take`] after the global in-flight permit, so the map never holds more
/// than `limits.max_inflight` clients, and the entry is removed when the last
/// [`InflightSlot`] is dropped, on every path out of the query (answer, error, a cancelled
/// future when the client's TCP connection closes). The share is read from the policy of each
/// query, so a reload that changes it applies to the next query.
#[derive(Default)]
pub struct InflightShares {
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One query's place in its client's share; releases it when dropped.
#[must_use = "the slot is released as soon as it is dropped"]
pub struct InflightSlot<'a> {
    shares: &'a InflightShares,
    client: IpAddr,
}

impl InflightShares {
    /// Takes one of `client`'s `share` slots; `Err(n)` with the client's count when it has
    /// `share` or more in flight already.
    pub fn try_take(&self, client: IpAddr, share: usize) -> Result<InflightSlot<'_>, usize> {
        // Nothing panics while the lock is held, so a poisoned lock still holds true counts.
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(client).or_insert(0);
        if *count >= share {
            let held = *count;
            if held == 0 {
                counts.remove(&client);
            }
            return Err(held);
        }
        *count += 1;
        Ok(InflightSlot {
            shares: self,
            client,
        })
    }

    /// Queries `client` has in flight now.
    pub fn count(&self, client: IpAddr) -> usize {
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        // Nobody waiting (every query a hit or a denial): no key to hash.
        if counts.is_empty() {
            return 0;
        }
        counts.get(&client).copied().unwrap_or(0)
    }

    /// Clients with a query in flight now (the map's size).
    pub fn clients(&self) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for InflightSlot<'_> {
    fn drop(&mut self) {
        let mut counts = self
            .shares
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.client) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.client);
            }
        }
    }
}

/// The exfiltration budget for names matched by wildcard rules.
///
/// Windows are filed by client, then by rule pattern, so that a charge looks both up by
/// reference (`&str`, the name's lower-case wire form on the stack) and allocates only for a
/// name it has not seen in the window.
pub struct WildcardBudget {
    limits: ExfiltrationLimits,
    windows: Mutex<BudgetWindows>,
}

#[derive(Default)]
struct BudgetWindows {
    by_client: HashMap<IpAddr, HashMap<Box<str>, Window>>,
    /// (client, rule) windows in `by_client`: at most [`MAX_TRACKED_CLIENTS`].
    windows: usize,
}

struct Window {
    started: Instant,
    /// Names in lower-case wire form.
    names: HashSet<Box<[u8]>>,
}

/// Why a wildcard name is over budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BudgetExceeded {
    NameTooLong { octets: usize, max: usize },
    LabelTooLong { octets: usize, max: usize },
    TooManyNames { per_minute: u32 },
}

impl std::fmt::Display for BudgetExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BudgetExceeded::NameTooLong { octets, max } => {
                write!(f, "name of {octets} octets under a wildcard (max {max})")
            }
            BudgetExceeded::LabelTooLong { octets, max } => {
                write!(f, "label of {octets} octets under a wildcard (max {max})")
            }
            BudgetExceeded::TooManyNames { per_minute } => write!(
                f,
                "more than {per_minute} distinct names under this wildcard in a minute"
            ),
        }
    }
}

impl WildcardBudget {
    pub fn new(limits: ExfiltrationLimits) -> WildcardBudget {
        WildcardBudget {
            limits,
            windows: Mutex::new(BudgetWindows::default()),
        }
    }

    /// Charges `name`, allowed through wildcard rule `rule`, to `client`'s budget.
    pub fn charge(
        &self,
        client: IpAddr,
        rule: &str,
        name: &Name,
        now: Instant,
    ) -> Result<(), BudgetExceeded> {
        let limits = &self.limits;
        // One walk over the labels: the lengths the limits read, and the name's identity, its
        // wire form in lower case (ASCII only, as `Name::to_lowercase`), on the stack.
        let mut wire = [0u8; 256];
        let (mut len, mut labels, mut longest) = (0usize, 0usize, 0usize);
        for label in name.iter() {
            if let Some((first, rest)) = wire
                .get_mut(len..=len + label.len())
                .and_then(<[u8]>::split_first_mut)
            {
                *first = u8::try_from(label.len()).unwrap_or(u8::MAX);
                rest.copy_from_slice(label);
                rest.make_ascii_lowercase();
            }
            len += 1 + label.len();
            labels += 1;
            longest = longest.max(label.len());
        }
        // Presentation length without the trailing dot: the labels plus the dots between them.
        let octets = len.saturating_sub(labels) + labels.saturating_sub(1);
        if octets > limits.max_name_length {
            return Err(BudgetExceeded::NameTooLong {
                octets,
                max: limits.max_name_length,
            });
        }
        if labels > 0 && longest > limits.max_label_length {
            return Err(BudgetExceeded::LabelTooLong {
                octets: longest,
                max: limits.max_label_length,
            });
        }
        let per_minute = limits.wildcard_names_per_minute;
        if per_minute == 0 {
            return Ok(());
        }
        // A name is at most 255 octets, so it always fits; if it ever did not, it would be over
        // every name length limit anyway.
        let Some(key_name) = wire.get(..len) else {
            return Err(BudgetExceeded::NameTooLong {
                octets,
                max: limits.max_name_length,
            });
        };
        let Ok(mut windows) = self.windows.lock() else {
            return Err(BudgetExceeded::TooManyNames { per_minute });
        };
        // The common case: a window this client and rule already have (two lookups).
        if let Some(window) = windows
            .by_client
            .get_mut(&client)
            .and_then(|rules| rules.get_mut(rule))
        {
            return window.charge(key_name, now, per_minute);
        }
        if windows.windows >= MAX_TRACKED_CLIENTS {
            windows.sweep(now);
            if windows.windows >= MAX_TRACKED_CLIENTS {
                return Err(BudgetExceeded::TooManyNames { per_minute });
            }
        }
        let mut window = Window {
            started: now,
            names: HashSet::new(),
        };
        let charged = window.charge(key_name, now, per_minute);
        windows
            .by_client
            .entry(client)
            .or_default()
            .insert(rule.into(), window);
        windows.windows += 1;
        charged
    }
}

impl Window {
    /// Charges one name (lower-case wire form) to this window.
    fn charge(&mut self, name: &[u8], now: Instant, per_minute: u32) -> Result<(), BudgetExceeded> {
        if now.duration_since(self.started) >= BUDGET_WINDOW {
            self.started = now;
            self.names.clear();
        }
        if self.names.contains(name) {
            return Ok(());
        }
        // The set never holds more than the budget, so its memory is bounded too.
        if self.names.len() >= per_minute as usize {
            return Err(BudgetExceeded::TooManyNames { per_minute });
        }
        self.names.insert(name.into());
        Ok(())
    }
}

impl BudgetWindows {
    /// Forgets every window older than [`BUDGET_WINDOW`] (it carries no information).
    fn sweep(&mut self, now: Instant) {
        self.by_client.retain(|_, rules| {
            rules.retain(|_, w| now.duration_since(w.started) < BUDGET_WINDOW);
            !rules.is_empty()
        });
        self.windows = self.by_client.values().map(HashMap::len).sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_minute: u32) -> ExfiltrationLimits {
        ExfiltrationLimits {
            max_name_length: 60,
            max_label_length: 20,
            wildcard_names_per_minute: per_minute,
        }
    }

    fn n(text: &str) -> Name {
        Name::from_ascii(text).unwrap()
    }

    #[test]
    fn distinct_names_beyond_the_budget_are_refused_but_repeats_are_free() {
        let budget = WildcardBudget::new(limits(3));
        let client: IpAddr = "10.0.0.7".parse().unwrap();
        let now = Instant::now();
        for name in ["a.x.test.", "b.x.test.", "c.x.test."] {
            assert_eq!(budget.charge(client, "**.x.test", &n(name), now), Ok(()));
        }
        assert!(
            budget
                .charge(client, "**.x.test", &n("d.x.test."), now)
                .is_err()
        );
        assert_eq!(
            budget.charge(client, "**.x.test", &n("A.x.test."), now),
            Ok(())
        );
        // Another client has its own budget; a new window restores it.
        let other: IpAddr = "10.0.0.8".parse().unwrap();
        assert_eq!(
            budget.charge(other, "**.x.test", &n("d.x.test."), now),
            Ok(())
        );
        let later = now + BUDGET_WINDOW;
        assert_eq!(
            budget.charge(client, "**.x.test", &n("d.x.test."), later),
            Ok(())
        );
    }

    #[test]
    fn each_client_and_rule_has_its_own_budget_and_case_does_not_make_a_name_new() {
        // (client, rule, name, expected): per_minute 2.
        let cases: &[(&str, &str, &str, bool)] = &[
            ("10.0.0.1", "**.x.test", "a.x.test.", true),
            ("10.0.0.1", "**.x.test", "A.X.TEST.", true),
            ("10.0.0.1", "**.x.test", "b.x.test", true),
            ("10.0.0.1", "**.x.test", "c.x.test.", false),
            ("10.0.0.1", "**.x.test", "B.x.Test.", true),
            ("10.0.0.1", "*.y.test", "c.y.test.", true),
            ("10.0.0.1", "*.y.test", "d.y.test.", true),
            ("10.0.0.1", "*.y.test", "e.y.test.", false),
            ("10.0.0.2", "**.x.test", "c.x.test.", true),
            ("10.0.0.2", "**.x.test", "d.x.test.", true),
            ("10.0.0.2", "**.x.test", "e.x.test.", false),
            // A label with a dot in it is another name than the two labels.
            ("10.0.0.3", "**.x.test", "a\\.b.x.test.", true),
            ("10.0.0.3", "**.x.test", "a.b.x.test.", true),
            ("10.0.0.3", "**.x.test", "a.c.x.test.", false),
        ];
        let budget = WildcardBudget::new(limits(2));
        let now = Instant::now();
        for &(client, rule, name, expected) in cases {
            let charged = budget.charge(client.parse().unwrap(), rule, &n(name), now);
            assert_eq!(
                charged.is_ok(),
                expected,
                "{client} {rule} {name}: {charged:?}"
            );
        }
    }

    #[test]
    fn the_budget_tracks_a_bounded_number_of_windows_and_frees_stale_ones() {
        let budget = WildcardBudget::new(limits(5));
        let now = Instant::now();
        let name = n("a.x.test.");
        let clients = (0..MAX_TRACKED_CLIENTS as u32)
            .map(|i| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)));
        for client in clients {
            assert_eq!(budget.charge(client, "**.x.test", &name, now), Ok(()));
        }
        let newcomer: IpAddr = "192.0.2.1".parse().unwrap();
        let known: IpAddr = "10.0.0.0".parse().unwrap();
        // Full and nothing stale: a new window is refused, known ones go on, even for a new rule
        // of a known client (a window is a client and a rule).
        assert!(budget.charge(newcomer, "**.x.test", &name, now).is_err());
        assert!(
            budget
                .charge(known, "**.y.test", &n("a.y.test."), now)
                .is_err()
        );
        assert_eq!(
            budget.charge(known, "**.x.test", &n("b.x.test."), now),
            Ok(())
        );
        // A window later every one of them is stale and swept.
        let later = now + BUDGET_WINDOW;
        assert_eq!(budget.charge(newcomer, "**.x.test", &name, later), Ok(()));
        let windows = budget.windows.lock().unwrap();
        assert_eq!(windows.windows, 1);
        assert_eq!(windows.by_client.len(), 1);
    }

    #[test]
    fn addresses_an_agent_can_pick_freely_share_one_key() {
        let key = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(key("127.0.0.1"), key("127.9.8.7"));
        assert_eq!(key("::1"), key("127.0.0.1"));
        assert_eq!(key("::ffff:10.0.0.7"), key("10.0.0.7"));
        assert_ne!(key("10.0.0.7"), key("10.0.0.8"));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }

    #[test]
    fn long_names_and_labels_are_refused() {
        let budget = WildcardBudget::new(limits(100));
        let client: IpAddr = "10.0.0.7".parse().unwrap();
        let now = Instant::now();
        let long_label = format!("{}.x.test.", "a".repeat(21));
        assert!(matches!(
            budget.charge(client, "*.x.test", &n(&long_label), now),
            Err(BudgetExceeded::LabelTooLong { octets: 21, .. })
        ));
        let long_name = format!("{}.x.test.", ["abcdefghij"; 6].join("."));
        assert!(matches!(
            budget.charge(client, "**.x.test", &n(&long_name), now),
            Err(BudgetExceeded::NameTooLong { .. })
        ));
    }

    #[test]
    fn a_client_gets_its_share_of_slots_and_others_keep_theirs() {
        let shares = InflightShares::default();
        let hog: IpAddr = "10.0.0.7".parse().unwrap();
        let other: IpAddr = "10.0.0.8".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| shares.try_take(hog, 3).unwrap()).collect();
        assert_eq!(shares.try_take(hog, 3).err(), Some(3));
        assert!(shares.try_take(other, 3).is_ok());
        // The share comes with each query: a reload that raises it lets the next one in.
        let fourth = shares.try_take(hog, 4).unwrap();
        assert_eq!(shares.count(hog), 4);
        drop(fourth);
        drop(held);
        assert_eq!(shares.count(hog), 0);
    }

    #[test]
    fn entries_leave_the_map_when_their_last_slot_is_released() {
        let shares = InflightShares::default();
        for i in 0..1000u32 {
            let client = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let a = shares.try_take(client, 2).unwrap();
            let b = shares.try_take(client, 2).unwrap();
            assert_eq!(shares.try_take(client, 2).err(), Some(2));
            drop(a);
            assert_eq!(shares.clients(), 1);
            drop(b);
        }
        assert_eq!(shares.clients(), 0);
        // A share of 0 takes nothing and leaves nothing behind.
        let client: IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(shares.try_take(client, 0).err(), Some(0));
        assert_eq!(shares.clients(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_query_releases_its_slot() {
        let shares = InflightShares::default();
        let client: IpAddr = "10.0.0.7".parse().unwrap();
        let query = async {
            let _slot = shares.try_take(client, 1).unwrap();
            std::future::pending::<()>().await;
        };
        // The query is abandoned mid-flight, as when a TCP client goes away.
        let timed_out = tokio::time::timeout(Duration::from_millis(10), query).await;
        assert!(timed_out.is_err());
        assert_eq!(shares.clients(), 0);
        assert!(shares.try_take(client, 1).is_ok());
    }

    #[test]
    fn the_rate_limiter_allows_a_burst_then_the_rate() {
        let limiter = RateLimiter::new(&Limits {
            max_inflight: 10,
            max_inflight_per_client: 10,
            client_qps: 10,
            client_burst: 20,
            tcp_connections: 10,
            tcp_connections_per_client: 10,
            tcp_idle_timeout: Duration::from_secs(1),
        })
        .unwrap();
        let client: IpAddr = "10.0.0.7".parse().unwrap();
        let now = Instant::now();
        let allowed = (0..50).filter(|_| limiter.allow(client, now)).count();
        assert_eq!(allowed, 20);
        assert!(limiter.allow(client, now + Duration::from_millis(100)));
        assert!(!limiter.allow(client, now + Duration::from_millis(100)));
    }
}
