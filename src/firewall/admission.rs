//! The admission thread: group commit of set elements, and the lifetimes granted so far.
//!
//! One OS thread owns a netlink socket (opened by `install`, so it lives in the network
//! namespace `install` ran in). Callers queue requests on a bounded channel and wait for a
//! oneshot reply. The thread takes every request that is waiting, merges them into one batch
//! (one transaction, at most one message per 1,000 elements), sends it and reads the
//! acknowledgements: a burst of N queries costs one round trip to the kernel instead of N. If
//! the merged batch fails because the kernel refused it (for example `ENFILE`: a set is full),
//! the requests are retried one by one, so one client's failure does not fail the others.
//!
//! # Lifetimes
//!
//! Since Linux 6.12 re-adding an element overwrites its timeout, shorter or longer; through
//! 6.11 it keeps the old one. `probe` finds out at start which this kernel does; where re-adding
//! keeps the old timeout, an element that needs a longer lifetime is added (a no-op if it is
//! there), deleted and added again with the new timeout, all in the same transaction, so that
//! no packet ever sees it missing. Two answers
//! for the same address (a long TTL, then a short one, or two clients in a shared set) must not
//! cut each other's allowance, so the thread remembers the longest expiry granted per
//! (client, address) and re-adds with `max(requested, remaining)`. Lifetimes are clamped to
//! [1 s, 7 days] (an element without timeout would be permanent). The map is bounded by the set
//! size per family: an entry that is still live has a live element in the kernel set, and that
//! set cannot hold more. Expired entries are pruned when a map fills (at most once a second).
//!
//! # Shares
//!
//! With per-client sets, one client (or a zone that answers it thousands of addresses) could
//! fill a set and leave every other client with SERVFAIL until the elements expire. The
//! lifetime map also indexes its entries by client, so the thread knows each client's live
//! elements; a request that would take its client beyond `firewall.max_elements_per_client`
//! is refused ([`AdmitError::ClientShare`]: that client gets SERVFAIL) before the batch is
//! built, counting the other requests of the same group commit. Re-admitting an element the
//! client already has costs no share.
//!
//! # Answers already covered
//!
//! Most answers (every cache hit) ask for an element the kernel acknowledged moments ago with
//! at least that lifetime. [`Confirmed`] remembers, per key, the expiry the kernel acknowledged
//! and when; the caller consults it before queueing a request, and when every address of an
//! answer is covered by an acknowledgement younger than [`REFRESH_AFTER`] (to the second:
//! [`TTL_GRANULARITY`]) the answer needs no round trip at all. The kernel stays the source of truth: every element is re-added at least
//! that often while answers for it keep coming, so one deleted behind dnsfence's back (by hand,
//! with `nft`) is back within seconds, and until then connections to it fail closed.

mod replace;
mod revoke;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use tokio::sync::{mpsc, oneshot};

use super::AdmitError;
use super::netlink::{Elem, NfSocket, NlError, Op};
use super::ruleset::{Family, element_key};
use crate::sharded_map::ShardedMap;
use crate::stage_times::{Span, Stage};

/// Shortest lifetime of an element.
pub(crate) const MIN_LIFETIME: Duration = Duration::from_secs(1);
/// Longest lifetime of an element.
pub(crate) const MAX_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// Upper bound of elements in one merged batch (a single larger request still goes alone).
const MAX_BATCH_ELEMS: usize = 8192;
/// Bytes per element in a batch, an upper bound (IPv6 pair with timeout: 56).
const BYTES_PER_ELEM: usize = 64;
/// Expired entries are pruned from a full map at most this often.
const PRUNE_INTERVAL: Duration = Duration::from_secs(1);

/// (client in per-client sets, destination).
pub(crate) type Key = (Option<IpAddr>, IpAddr);

/// An answer is re-sent to the kernel at least this often even when its elements are covered.
pub(crate) const REFRESH_AFTER: Duration = Duration::from_secs(10);

/// How much an acknowledged expiry may fall short of a request and still cover it: a TTL
/// counts whole seconds, so an answer served again from a cache asks for its aged TTL rounded
/// *down* plus the time that went by exactly, up to a second more than its first admission
/// granted. Without this slack a hit would be covered only in the microseconds after each
/// whole second of its age, and nearly every cache hit would wait for the kernel. The element
/// still outlives the TTL the client is told by the grace period less under a second.
pub(crate) const TTL_GRANULARITY: Duration = Duration::from_secs(1);

/// Expiries the kernel acknowledged, shared with the callers; bounded like [`Lifetimes`].
pub(crate) struct Confirmed {
    acked: std::sync::Mutex<Acked>,
    cap: usize,
}

/// (key → (expiry, acknowledged at)), and when a full map may next be pruned: pruning walks
/// every entry under the lock the fast path takes, so at most once per [`PRUNE_INTERVAL`].
struct Acked {
    map: ShardedMap<Key, (Instant, Instant)>,
    next_prune: Instant,
}

impl Confirmed {
    pub(crate) fn new(cap: usize) -> Confirmed {
        Confirmed {
            acked: std::sync::Mutex::new(Acked {
                map: ShardedMap::new(),
                next_prune: Instant::now(),
            }),
            cap: cap.max(1),
        }
    }

    /// True when every item is in the kernel, as acknowledged less than [`REFRESH_AFTER`] ago,
    /// until at least `now + lifetime` (less [`TTL_GRANULARITY`]).
    pub(crate) fn covers(
        &self,
        client: Option<IpAddr>,
        items: &[(IpAddr, Duration)],
        now: Instant,
    ) -> bool {
        let Ok(acked) = self.acked.lock() else {
            return false;
        };
        items.iter().all(|&(addr, lifetime)| {
            acked.map.get(&(client, addr)).is_some_and(|&(expiry, at)| {
                now.saturating_duration_since(at) < REFRESH_AFTER
                    && now
                        .checked_add(lifetime.saturating_sub(TTL_GRANULARITY))
                        .is_some_and(|wanted| expiry >= wanted)
            })
        })
    }

    fn record(&self, granted: impl Iterator<Item = (Key, Instant)>, now: Instant) {
        let Ok(mut acked) = self.acked.lock() else {
            return;
        };
        for (key, expiry) in granted {
            if acked.map.len() >= self.cap && !acked.map.contains_key(&key) {
                if now < acked.next_prune {
                    // Full, and pruned moments ago: this one is not remembered, and answers
                    // for it ask the kernel (the safe side).
                    return;
                }
                acked.next_prune = now + PRUNE_INTERVAL;
                acked
                    .map
                    .retain(|_, (_, at)| now.saturating_duration_since(*at) < REFRESH_AFTER);
                if acked.map.len() >= self.cap {
                    return;
                }
            }
            acked.map.insert(key, (expiry, now));
        }
    }
}

/// One caller's request.
pub(crate) struct Request {
    /// The client (normalized). The thread pairs it with the addresses only while the sets
    /// are per client: a reload can switch that between the ask and the commit.
    pub(crate) client: Option<IpAddr>,
    /// Destinations with their lifetimes, already clamped.
    pub(crate) items: Vec<(IpAddr, Duration)>,
    pub(crate) reply: oneshot::Sender<Result<(), AdmitError>>,
    /// When it was asked (for `stage_times`; empty when those are off).
    pub(crate) queued: Span,
}

pub(crate) use replace::ReplaceRequest;
pub(crate) use replace::drop_hooks;
pub use replace::{Carry, Replaced};
pub(crate) use revoke::RevokeRequest;

pub(crate) enum Msg {
    Admit(Request),
    /// Delete elements (and maybe their connections): see `revoke.rs`.
    Revoke(RevokeRequest),
    /// Replace the table, carrying elements over: see `replace.rs`.
    Replace(ReplaceRequest),
    /// Wakes the thread so that it notices the stop flag.
    Wake,
    /// Asks the thread to answer, for health checks; it answers with the live elements it
    /// granted per family (IPv4, IPv6).
    Ping(tokio::sync::oneshot::Sender<[usize; 2]>),
}

/// Who a per-client element counts against: the client as the pipeline's budgets and
/// in-flight shares key it (`pipeline::limits::client_key`; the firewall knows no DNS, so the
/// rule is repeated here and a test keeps the two equal). An IPv6 client may pick any address
/// of its /64 without privilege, and an element per address of one share would let it fill
/// the set for everyone else; elements themselves stay keyed on the exact address.
pub(crate) fn share_key(client: IpAddr) -> IpAddr {
    match client.to_canonical() {
        IpAddr::V4(v4) if v4.is_loopback() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) if v6.is_loopback() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(v6) & !((1u128 << 64) - 1),
        )),
    }
}

/// Clamps a lifetime to [`MIN_LIFETIME`, `MAX_LIFETIME`].
pub(crate) fn clamp(d: Duration) -> Duration {
    d.clamp(MIN_LIFETIME, MAX_LIFETIME)
}

/// Milliseconds, rounded up, saturating, within the clamp.
fn millis(d: Duration) -> u64 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    let ms = u64::try_from(ms).unwrap_or(u64::MAX);
    ms.clamp(
        MIN_LIFETIME.as_millis() as u64,
        MAX_LIFETIME.as_millis() as u64,
    )
}

/// The longest expiry granted per key, per family, bounded.
pub(crate) struct Lifetimes {
    /// Sharded: they grow to the size of the sets, and one map doubling at once stalled the
    /// thread for milliseconds.
    maps: [ShardedMap<Key, Instant>; 2],
    /// Per client (per-client sets only), keyed by [`share_key`]: its elements and their
    /// expiries, the same entries as `maps`, to count a client's live elements without
    /// scanning everyone's.
    clients: HashMap<IpAddr, ShardedMap<Key, Instant>>,
    cap: usize,
    next_prune: [Instant; 2],
}

fn slot(addr: IpAddr) -> usize {
    match Family::of(addr) {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

impl Lifetimes {
    pub(crate) fn new(cap: usize) -> Lifetimes {
        let now = Instant::now();
        Lifetimes {
            maps: [ShardedMap::new(), ShardedMap::new()],
            clients: HashMap::new(),
            cap: cap.max(1),
            next_prune: [now, now],
        }
    }

    /// How long the element still has, as far as dnsfence granted it.
    pub(crate) fn remaining(&self, key: &Key, now: Instant) -> Duration {
        self.maps
            .get(slot(key.1))
            .and_then(|m| m.get(key))
            .map_or(Duration::ZERO, |exp| exp.saturating_duration_since(now))
    }

    /// Records that `key` was granted until `expiry` (keeping a later expiry already recorded).
    pub(crate) fn record(&mut self, key: Key, expiry: Instant, now: Instant) {
        let s = slot(key.1);
        let cap = self.cap;
        let Some(map) = self.maps.get_mut(s) else {
            return;
        };
        if let Some(e) = map.get_mut(&key) {
            *e = (*e).max(expiry);
            let e = *e;
            if let Some(client) = key.0
                && let Some(dests) = self.clients.get_mut(&share_key(client))
            {
                dests.insert(key, e);
            }
            return;
        }
        if map.len() >= cap
            && let Some(next) = self.next_prune.get_mut(s)
            && now >= *next
        {
            map.retain(|_, exp| *exp > now);
            self.clients.retain(|_, dests| {
                dests.retain(|_, exp| *exp > now);
                !dests.is_empty()
            });
            *next = now + PRUNE_INTERVAL;
        }
        // Still full: every entry is live, so the kernel set is full too and this add could
        // only have succeeded if elements were removed behind dnsfence's back. Not recorded.
        if map.len() < cap {
            map.insert(key, expiry);
            if let Some(client) = key.0 {
                self.clients
                    .entry(share_key(client))
                    .or_default()
                    .insert(key, expiry);
            }
        }
    }

    /// Whether `client` may have `new` more elements and stay within `share` live ones
    /// (its expired entries are dropped when it comes close).
    pub(crate) fn client_has_room(
        &mut self,
        client: IpAddr,
        new: usize,
        share: usize,
        now: Instant,
    ) -> bool {
        let Some(dests) = self.clients.get_mut(&share_key(client)) else {
            return new <= share;
        };
        if dests.len() + new > share {
            dests.retain(|_, exp| *exp > now);
        }
        dests.len() + new <= share
    }

    /// Live elements per family (IPv4, IPv6), as far as dnsfence granted them: what the allow
    /// sets hold, unless someone edited them by hand. One pass over the maps, for metrics.
    pub(crate) fn live(&self, now: Instant) -> [usize; 2] {
        self.maps
            .each_ref()
            .map(|m| m.values().filter(|exp| **exp > now).count())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.maps.iter().map(ShardedMap::len).sum()
    }
}

/// What the thread needs to know about the table.
pub(crate) struct Config {
    pub(crate) table: String,
    pub(crate) per_client: bool,
    pub(crate) set_size: u32,
    /// The kernel keeps an element's old timeout when it is added again (before 6.12):
    /// extend by delete and re-add in the same transaction.
    pub(crate) delete_readd: bool,
    /// With per-client sets, the most live elements one client may have in a set.
    pub(crate) client_share: u32,
}

struct Admission {
    sock: NfSocket,
    cfg: Config,
    lifetimes: Lifetimes,
    rx: mpsc::Receiver<Msg>,
    stop: Arc<AtomicBool>,
    max_batch_elems: usize,
    confirmed: Arc<Confirmed>,
    /// The callers' view of `cfg.per_client`, updated when a replacement switches it.
    shared_per_client: Arc<AtomicBool>,
}

/// Starts the thread. `seed` holds the expiries of elements already in the sets.
pub(crate) fn spawn(
    sock: NfSocket,
    cfg: Config,
    seed: Vec<(Key, Instant)>,
    rx: mpsc::Receiver<Msg>,
    stop: Arc<AtomicBool>,
    confirmed: Arc<Confirmed>,
    shared_per_client: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    let mut lifetimes = Lifetimes::new(cfg.set_size as usize);
    let now = Instant::now();
    for (key, exp) in seed {
        lifetimes.record(key, exp, now);
    }
    let max_batch_elems = (sock.max_batch_bytes() / BYTES_PER_ELEM).clamp(256, MAX_BATCH_ELEMS);
    let a = Admission {
        sock,
        cfg,
        lifetimes,
        rx,
        stop,
        max_batch_elems,
        confirmed,
        shared_per_client,
    };
    std::thread::Builder::new()
        .name("dnsfence-admit".to_string())
        .spawn(move || a.run())
}

impl Admission {
    fn run(mut self) {
        let mut carry: Option<Request> = None;
        loop {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            let first = match carry.take() {
                Some(r) => r,
                None => match self.rx.blocking_recv() {
                    Some(Msg::Admit(r)) => r,
                    Some(Msg::Revoke(r)) => {
                        self.revoke(r);
                        continue;
                    }
                    Some(Msg::Replace(r)) => {
                        self.replace(r);
                        continue;
                    }
                    Some(Msg::Wake) => continue,
                    Some(Msg::Ping(reply)) => {
                        let _ = reply.send(self.lifetimes.live(Instant::now()));
                        continue;
                    }
                    None => break,
                },
            };
            if self.stop.load(Ordering::Acquire) {
                carry = Some(first);
                break;
            }
            let mut elems = first.items.len();
            let mut group = vec![first];
            let mut revoke_after = None;
            while elems < self.max_batch_elems {
                match self.rx.try_recv() {
                    // In queue order: the admissions before it first.
                    Ok(Msg::Revoke(r)) => {
                        revoke_after = Some(Msg::Revoke(r));
                        break;
                    }
                    Ok(Msg::Replace(r)) => {
                        revoke_after = Some(Msg::Replace(r));
                        break;
                    }
                    Ok(Msg::Admit(r)) => {
                        if elems + r.items.len() > self.max_batch_elems {
                            carry = Some(r);
                            break;
                        }
                        elems += r.items.len();
                        group.push(r);
                    }
                    Ok(Msg::Wake) => {}
                    Ok(Msg::Ping(reply)) => {
                        let _ = reply.send(self.lifetimes.live(Instant::now()));
                    }
                    Err(_) => break,
                }
            }
            for r in &group {
                r.queued.end(Stage::AdmitQueued);
            }
            let whole = Span::start();
            self.process(group);
            whole.end(Stage::AdmitGroup);
            match revoke_after {
                Some(Msg::Revoke(r)) => self.revoke(r),
                Some(Msg::Replace(r)) => self.replace(r),
                _ => {}
            }
        }
        // Stopping: refuse whatever is still queued.
        self.rx.close();
        if let Some(r) = carry {
            let _ = r.reply.send(Err(AdmitError::Closed));
        }
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Msg::Admit(r) => {
                    let _ = r.reply.send(Err(AdmitError::Closed));
                }
                Msg::Revoke(r) => {
                    let _ = r.reply.send(Err(AdmitError::Closed));
                }
                Msg::Replace(r) => {
                    let _ = r.reply.send(Err(super::FirewallError::Stopped));
                }
                // Dropping the reply tells the asker the thread does not answer.
                Msg::Wake | Msg::Ping(_) => {}
            }
        }
    }

    /// Refuses the requests that would take a client beyond its share of the set (per-client
    /// sets only), counting every request of the group; returns the others.
    fn within_shares(&mut self, group: Vec<Request>) -> Vec<Request> {
        if !self.cfg.per_client {
            return group
                .into_iter()
                .map(|r| Request { client: None, ..r })
                .collect();
        }
        let now = Instant::now();
        let share = self.cfg.client_share as usize;
        // Keyed like the share: several addresses of one client's /64 count together.
        let mut pending: HashMap<IpAddr, std::collections::HashSet<Key>> = HashMap::new();
        let mut kept = Vec::with_capacity(group.len());
        for r in group {
            let Some(client) = r.client else {
                kept.push(r);
                continue;
            };
            // Asked while the sets were shared; they are per client now.
            if let Some(&(addr, _)) = r
                .items
                .iter()
                .find(|(addr, _)| Family::of(*addr) != Family::of(client))
            {
                let _ = r
                    .reply
                    .send(Err(AdmitError::FamilyMismatch { client, addr }));
                continue;
            }
            let queued = pending.entry(share_key(client)).or_default();
            let fresh: std::collections::HashSet<Key> = r
                .items
                .iter()
                .map(|&(addr, _)| (Some(client), addr))
                .filter(|key| !queued.contains(key) && self.lifetimes.remaining(key, now).is_zero())
                .collect();
            if self
                .lifetimes
                .client_has_room(client, queued.len() + fresh.len(), share, now)
            {
                queued.extend(fresh);
                kept.push(r);
            } else {
                let _ = r.reply.send(Err(AdmitError::ClientShare {
                    client,
                    share: self.cfg.client_share,
                }));
            }
        }
        kept
    }

    fn process(&mut self, group: Vec<Request>) {
        let group = self.within_shares(group);
        if group.is_empty() {
            return;
        }
        match self.commit(&group) {
            Ok(()) => {
                for r in group {
                    let _ = r.reply.send(Ok(()));
                }
            }
            Err(e) if group.len() > 1 && e.is_kernel() => {
                tracing::debug!(
                    target: "dnsfence::firewall",
                    error = %e,
                    requests = group.len(),
                    "merged admission failed; retrying one by one"
                );
                for r in group {
                    let res = self
                        .commit(std::slice::from_ref(&r))
                        .map_err(|e| self.admit_error(&e));
                    let _ = r.reply.send(res);
                }
            }
            Err(e) => {
                let err = self.admit_error(&e);
                for r in group {
                    let _ = r.reply.send(Err(err.clone()));
                }
            }
        }
    }

    /// Adds every element of `reqs` in one transaction; records the lifetimes once ACKed.
    fn commit(&mut self, reqs: &[Request]) -> Result<(), NlError> {
        let now = Instant::now();
        let mut wanted: HashMap<Key, Duration> = HashMap::new();
        for r in reqs {
            for &(addr, life) in &r.items {
                let e = wanted.entry((r.client, addr)).or_insert(life);
                *e = (*e).max(life);
            }
        }
        // (key, lifetime, element key, whether it extends an element already in the set)
        let mut granted: Vec<(Key, Duration, Vec<u8>, bool)> = Vec::with_capacity(wanted.len());
        for (key, life) in wanted {
            let remaining = self.lifetimes.remaining(&key, now);
            let extends = !remaining.is_zero() && life > remaining;
            let life = life.max(remaining).min(MAX_LIFETIME);
            let client = key.0.unwrap_or(key.1);
            // The family was checked by admit(); a mismatch cannot reach this point.
            if let Some(k) = element_key(self.cfg.per_client, client, key.1) {
                granted.push((key, life, k, extends));
            }
        }
        let mut batch = self.sock.begin(&self.cfg.table);
        for family in [Family::V4, Family::V6] {
            let elems: Vec<Elem<'_>> = granted
                .iter()
                .filter(|(key, ..)| Family::of(key.1) == family)
                .map(|(_, life, k, _)| Elem {
                    key: k,
                    timeout_ms: millis(*life),
                })
                .collect();
            if !elems.is_empty() {
                batch.add_elements(family.set_name(), &elems);
            }
            if self.cfg.delete_readd {
                // Before 6.12 the add above kept the old expiry of an element that is there.
                // The add made sure it is there (so the delete cannot fail with ENOENT should
                // it have just expired); delete and add again set the new timeout. One
                // transaction: no packet sees the element missing.
                let longer: Vec<Elem<'_>> = granted
                    .iter()
                    .filter(|(key, _, _, extends)| *extends && Family::of(key.1) == family)
                    .map(|(_, life, k, _)| Elem {
                        key: k,
                        timeout_ms: millis(*life),
                    })
                    .collect();
                if !longer.is_empty() {
                    let keys: Vec<Vec<u8>> = longer.iter().map(|e| e.key.to_vec()).collect();
                    batch.del_elements(family.set_name(), &keys);
                    batch.add_elements(family.set_name(), &longer);
                }
            }
        }
        let committing = Span::start();
        self.sock.commit(batch)?;
        committing.end(Stage::AdmitCommit);
        let bookkeeping = Span::start();
        let mut acked = Vec::with_capacity(granted.len());
        for (key, life, ..) in granted {
            if let Some(expiry) = now.checked_add(life) {
                self.lifetimes.record(key, expiry, now);
                acked.push((key, expiry));
            }
        }
        self.confirmed.record(acked.into_iter(), now);
        bookkeeping.end(Stage::AdmitBookkeeping);
        Ok(())
    }

    fn admit_error(&self, e: &NlError) -> AdmitError {
        if e.is_permission() {
            return AdmitError::PermissionDenied;
        }
        match (e.errno(), e.op()) {
            (Some(Errno::ENFILE), Some(Op::NewElems { set, .. })) => AdmitError::SetFull {
                set,
                size: self.cfg.set_size,
            },
            (Some(Errno::ENOENT), Some(Op::NewElems { set, .. })) => AdmitError::Kernel(format!(
                "set {set} of table inet {} does not exist (was the table deleted?)",
                self.cfg.table
            )),
            _ if e.is_kernel() => AdmitError::Kernel(e.to_string()),
            _ => AdmitError::Transport(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A merged batch that the kernel refuses is retried request by request (needs root; see
    /// `testns`).
    #[test]
    fn refused_group_is_retried_one_by_one() {
        use crate::firewall::ruleset::Layout;
        use crate::firewall::testns::{Netns, policy};
        let Some(ns) = Netns::new("retry") else {
            return;
        };
        let mut p = policy("dnsf_retry");
        p.firewall.set_size = 2;
        let Ok(layout) = Layout::from_policy(&p) else {
            panic!("layout");
        };
        let results = ns.enter(|| {
            let mut sock = NfSocket::open().expect("socket");
            let mut b = sock.begin(&layout.table);
            b.add_layout(&layout);
            sock.commit(b).expect("install");
            let (_tx, rx) = mpsc::channel(1);
            let mut adm = Admission {
                sock,
                cfg: Config {
                    table: layout.table.clone(),
                    per_client: false,
                    set_size: 2,
                    delete_readd: false,
                    client_share: 2,
                },
                lifetimes: Lifetimes::new(2),
                rx,
                stop: Arc::new(AtomicBool::new(false)),
                max_batch_elems: MAX_BATCH_ELEMS,
                confirmed: Arc::new(Confirmed::new(2)),
                shared_per_client: Arc::new(AtomicBool::new(false)),
            };
            let mut answers = Vec::new();
            let group = ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.1"]
                .iter()
                .map(|a| {
                    let (reply, answer) = oneshot::channel();
                    answers.push(answer);
                    Request {
                        client: None,
                        items: vec![(a.parse().expect("ip"), Duration::from_secs(60))],
                        reply,
                        queued: Span::start(),
                    }
                })
                .collect();
            adm.process(group);
            answers
                .into_iter()
                .map(|mut a| a.try_recv().expect("answered"))
                .collect::<Vec<_>>()
        });
        assert_eq!(results[0], Ok(()));
        assert_eq!(results[1], Ok(()));
        assert_eq!(
            results[2],
            Err(AdmitError::SetFull {
                set: "allow4",
                size: 2
            })
        );
        assert_eq!(results[3], Ok(()));
    }

    #[test]
    fn an_acknowledged_element_covers_shorter_requests_for_a_while() {
        let confirmed = Confirmed::new(2);
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        let t0 = Instant::now();
        confirmed.record([((None, a), t0 + Duration::from_secs(60))].into_iter(), t0);
        let secs = Duration::from_secs;
        assert!(confirmed.covers(None, &[(a, secs(30))], t0));
        assert!(confirmed.covers(None, &[(a, secs(60))], t0));
        // The same answer from a cache half a second later: its TTL still says 60 s.
        assert!(
            confirmed.covers(None, &[(a, secs(60))], t0 + Duration::from_millis(500)),
            "a TTL rounded down"
        );
        assert!(
            !confirmed.covers(None, &[(a, secs(62))], t0),
            "longer than acknowledged"
        );
        assert!(
            !confirmed.covers(None, &[(a, secs(1)), (b, secs(1))], t0),
            "b never added"
        );
        assert!(
            !confirmed.covers(Some(b), &[(a, secs(1))], t0),
            "another client's pair"
        );
        assert!(
            !confirmed.covers(None, &[(a, secs(1))], t0 + REFRESH_AFTER),
            "stale"
        );
        // Bounded: a third key does not fit while the others are fresh.
        confirmed.record([((None, b), t0 + secs(60))].into_iter(), t0);
        let c: IpAddr = "198.51.100.3".parse().unwrap();
        confirmed.record([((None, c), t0 + secs(60))].into_iter(), t0);
        assert!(!confirmed.covers(None, &[(c, secs(1))], t0));
    }

    #[test]
    fn millis_clamps_and_rounds_up() {
        assert_eq!(millis(Duration::ZERO), 1000);
        assert_eq!(millis(Duration::from_nanos(1_000_000_001)), 1001);
        assert_eq!(millis(Duration::MAX), MAX_LIFETIME.as_millis() as u64);
        assert_eq!(clamp(Duration::from_secs(u64::MAX)), MAX_LIFETIME);
        assert_eq!(clamp(Duration::from_millis(1)), MIN_LIFETIME);
    }

    #[test]
    fn lifetimes_keep_the_longest_and_stay_bounded() {
        let now = Instant::now();
        let mut l = Lifetimes::new(2);
        let a: Key = (None, "192.0.2.1".parse().unwrap());
        let b: Key = (None, "192.0.2.2".parse().unwrap());
        let c: Key = (None, "192.0.2.3".parse().unwrap());
        let v6: Key = (None, "2001:db8::1".parse().unwrap());
        l.record(a, now + Duration::from_secs(100), now);
        l.record(a, now + Duration::from_secs(10), now);
        assert_eq!(l.remaining(&a, now), Duration::from_secs(100));
        l.record(b, now + Duration::from_secs(5), now);
        // Full of live entries: c is not recorded.
        l.record(c, now + Duration::from_secs(5), now);
        assert_eq!(l.remaining(&c, now), Duration::ZERO);
        // The other family has its own bound.
        l.record(v6, now + Duration::from_secs(5), now);
        assert_eq!(l.len(), 3);
        // Once b expired, c fits.
        let later = now + Duration::from_secs(6);
        l.record(c, later + Duration::from_secs(5), later);
        assert_eq!(l.remaining(&c, later), Duration::from_secs(5));
        assert_eq!(l.remaining(&b, later), Duration::ZERO);
    }

    #[test]
    fn a_clients_share_counts_every_address_of_its_ipv6_64_together() {
        let now = Instant::now();
        let until = now + Duration::from_secs(60);
        let mut l = Lifetimes::new(1000);
        let dest: IpAddr = "2001:db8:100::10".parse().unwrap();
        // Four sources of one /64, one element each (the elements stay per address).
        for i in 1..=4u16 {
            let client = IpAddr::V6(std::net::Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, i));
            l.record((Some(client), dest), until, now);
            assert_eq!(
                l.remaining(&(Some(client), dest), now),
                Duration::from_secs(60)
            );
        }
        let fifth: IpAddr = "fd77::ffff".parse().unwrap();
        assert!(
            !l.client_has_room(fifth, 1, 4, now),
            "the /64 has used its share"
        );
        // Another /64 has its own share.
        let other: IpAddr = "fd78::1".parse().unwrap();
        assert!(l.client_has_room(other, 4, 4, now));
    }

    #[test]
    fn the_share_key_is_the_pipelines_client_key() {
        for ip in [
            "10.77.0.2",
            "127.0.0.1",
            "127.3.2.1",
            "::1",
            "::ffff:10.1.2.3",
            "::ffff:127.0.0.5",
            "fd77::2",
            "fd77::1:2:3:4",
            "2001:db8:1:2:3:4:5:6",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(
                share_key(ip),
                crate::pipeline::limits::client_key(ip),
                "{ip}"
            );
        }
    }
}
