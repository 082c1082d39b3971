//! What dnsfence admitted, and why: the index that makes revocation possible.
//!
//! The firewall knows addresses and lifetimes, not DNS. To take back what a policy no longer
//! allows, dnsfence must remember, for every address it handed out, which answers justified it:
//! the client that asked, the name and type, the group and rule that allowed it, the grant if a
//! grant did, and until when. After a reload (or when a grant ends) every justification is
//! judged again with the pipeline's own decision code; an address (per client, with per-client
//! sets) that keeps no live justification is revoked, one that another allowed name still
//! justifies stays.
//!
//! Bounded: [`MAX_JUSTIFICATIONS`] per address, beyond which a new one replaces the one of
//! its own client (or of a client with several) that ends first, so that one client's many
//! answers never push out another client's only one (up to
//! [`MAX_JUSTIFICATIONS_PER_ADDRESS`] clients) and at most `2 × firewall.set_size` addresses (both allow sets together can hold no
//! more live elements); expired justifications are pruned when the map fills, at most once a
//! second. Judging copies the entries out, so the hot path never waits for a reload's judging.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::rr::{Name, RecordType};

use crate::sharded_map::ShardedMap;

/// Justifications kept per address before one is evicted (see [`eviction`]).
pub const MAX_JUSTIFICATIONS: usize = 16;
/// Justifications kept per address, at most: room for this many clients with one each.
pub const MAX_JUSTIFICATIONS_PER_ADDRESS: usize = 64;
/// Revoked justifications remembered (for explaining drops), the oldest forgotten first.
pub const MAX_REVOKED: usize = 4096;
/// Expired entries are pruned from a full index at most this often.
const PRUNE_INTERVAL: Duration = Duration::from_secs(1);

/// One answer that handed an address out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Justification {
    /// The client that asked (canonical: IPv4-mapped addresses as IPv4).
    pub client: IpAddr,
    /// The question's name, lower case.
    pub name: Name,
    pub qtype: RecordType,
    pub group: Arc<str>,
    pub rule: Arc<str>,
    /// The grant that allowed the name, if one did.
    pub grant: Option<u64>,
    /// When the element admitted for this answer expires.
    pub until: Instant,
}

/// Where an address lost its last justification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    pub addr: IpAddr,
    /// Clients for which no justification of this address is left.
    pub clients: Vec<IpAddr>,
    /// No justification at all is left for the address.
    pub all: bool,
}

/// A justification a reload or a grant's end took back, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedJustification {
    pub addr: IpAddr,
    pub why: Justification,
    pub at: Instant,
}

impl Justification {
    /// The name without its final dot, as people write it (`api.example.com`).
    pub fn bare_name(&self) -> String {
        let name = self.name.to_string();
        name.strip_suffix('.').unwrap_or(&name).to_owned()
    }
}

/// Everything the index still knows about one address: its justifications (live and
/// expired, until pruned) and those revoked (the last [`MAX_REVOKED`] of all addresses).
#[derive(Debug, Clone, Default)]
pub struct History {
    pub justifications: Vec<Justification>,
    pub revoked: Vec<RevokedJustification>,
}

impl History {
    /// The justifications of `client`, or of every client when `None`.
    pub fn justifications_of(
        &self,
        client: Option<IpAddr>,
    ) -> impl Iterator<Item = &Justification> + Clone {
        self.justifications
            .iter()
            .filter(move |j| client.is_none_or(|c| c == j.client))
    }

    /// The revoked justifications of `client`, or of every client when `None`.
    pub fn revoked_of(
        &self,
        client: Option<IpAddr>,
    ) -> impl Iterator<Item = &RevokedJustification> + Clone {
        self.revoked
            .iter()
            .filter(move |r| client.is_none_or(|c| c == r.why.client))
    }
}

/// The last [`MAX_REVOKED`] revoked justifications, indexed by address so that reading one
/// address's history costs its own entries, not a walk over all of them under the lock.
#[derive(Default)]
struct Revoked {
    by_addr: HashMap<IpAddr, VecDeque<RevokedJustification>>,
    /// Addresses in the order their entries were revoked: the front names the oldest entry.
    order: VecDeque<IpAddr>,
}

impl Revoked {
    fn push(&mut self, revoked: RevokedJustification) {
        if self.order.len() >= MAX_REVOKED
            && let Some(oldest) = self.order.pop_front()
            && let Some(list) = self.by_addr.get_mut(&oldest)
        {
            // Entries of one address are revoked in order too: its front is the oldest.
            list.pop_front();
            if list.is_empty() {
                self.by_addr.remove(&oldest);
            }
        }
        self.order.push_back(revoked.addr);
        self.by_addr
            .entry(revoked.addr)
            .or_default()
            .push_back(revoked);
    }

    fn of(&self, addr: IpAddr) -> Vec<RevokedJustification> {
        self.by_addr
            .get(&addr)
            .map(|list| list.iter().cloned().collect())
            .unwrap_or_default()
    }
}

struct Inner {
    /// Sharded: it grows to the size of the sets, and doubling it in one go held the lock (and
    /// the query recording into it) for milliseconds.
    by_addr: ShardedMap<IpAddr, Vec<Justification>>,
    revoked: Revoked,
    next_prune: Instant,
}

/// Which justification of a full list makes room for one of `client`: never a client's only
/// one while another client holds several (with per-client sets, a client whose only
/// justification was forgotten keeps its element through a revoking reload until it expires).
/// The earliest-ending of `client`'s own, else of a client holding more than one; only when
/// every client holds one and the list is at [`MAX_JUSTIFICATIONS_PER_ADDRESS`], the
/// earliest-ending of all. `None`: the list may grow.
fn eviction(list: &[Justification], client: IpAddr) -> Option<usize> {
    let count = |c: IpAddr| list.iter().filter(|j| j.client == c).count();
    let earliest = |keep: &dyn Fn(&Justification) -> bool| {
        list.iter()
            .enumerate()
            .filter(|(_, j)| keep(j))
            .min_by_key(|(_, j)| j.until)
            .map(|(at, _)| at)
    };
    earliest(&|j| j.client == client)
        .or_else(|| earliest(&|j| count(j.client) > 1))
        .or_else(|| {
            if list.len() >= MAX_JUSTIFICATIONS_PER_ADDRESS {
                earliest(&|_| true)
            } else {
                None
            }
        })
}

/// The revocation index.
pub struct AdmittedIndex {
    inner: Mutex<Inner>,
    max_addresses: usize,
}

impl AdmittedIndex {
    pub fn new(max_addresses: usize) -> AdmittedIndex {
        AdmittedIndex {
            inner: Mutex::new(Inner {
                by_addr: ShardedMap::new(),
                revoked: Revoked::default(),
                next_prune: Instant::now(),
            }),
            max_addresses: max_addresses.max(1),
        }
    }

    /// Records that `addr` was admitted for `why` (the firewall acknowledged it).
    pub fn record(&self, addr: IpAddr, why: Justification, now: Instant) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if !inner.by_addr.contains_key(&addr) && inner.by_addr.len() >= self.max_addresses {
            if now >= inner.next_prune {
                inner.by_addr.retain(|_, list| {
                    list.retain(|j| j.until > now);
                    !list.is_empty()
                });
                inner.next_prune = now + PRUNE_INTERVAL;
            }
            if inner.by_addr.len() >= self.max_addresses {
                // Every address here is live, so the allow sets are full as well and this
                // admission could only succeed after elements were removed behind dnsfence's
                // back: the address expires on its own.
                tracing::warn!(%addr, "revocation index full; this address cannot be revoked before it expires");
                return;
            }
        }
        let Some(list) = inner.by_addr.get_or_default(addr) else {
            return;
        };
        if let Some(same) = list
            .iter_mut()
            .find(|j| j.client == why.client && j.qtype == why.qtype && j.name == why.name)
        {
            let until = same.until.max(why.until);
            *same = why;
            same.until = until;
            return;
        }
        if list.len() >= MAX_JUSTIFICATIONS {
            list.retain(|j| j.until > now);
        }
        if list.len() >= MAX_JUSTIFICATIONS
            && let Some(evicted) = eviction(list, why.client)
        {
            list.swap_remove(evicted);
        }
        list.push(why);
    }

    /// A copy of every address's justifications, so that judging them needs no lock.
    fn snapshot(&self) -> Option<Vec<(IpAddr, Vec<Justification>)>> {
        let inner = self.inner.lock().ok()?;
        Some(
            inner
                .by_addr
                .iter()
                .map(|(addr, list)| (*addr, list.clone()))
                .collect(),
        )
    }

    /// Judges every live justification with `still_allowed`; drops those it rejects and those
    /// expired, and returns the addresses (and clients) left without any justification.
    /// `still_allowed` runs without the index locked.
    pub fn revoke_unjustified(
        &self,
        now: Instant,
        mut still_allowed: impl FnMut(IpAddr, &Justification) -> bool,
    ) -> Vec<Lost> {
        let Some(snapshot) = self.snapshot() else {
            return Vec::new();
        };
        let mut rejected: Vec<(IpAddr, Justification)> = Vec::new();
        for (addr, list) in snapshot {
            for j in list {
                if j.until > now && !still_allowed(addr, &j) {
                    rejected.push((addr, j));
                }
            }
        }
        let Ok(mut inner) = self.inner.lock() else {
            return Vec::new();
        };
        let mut touched: Vec<(IpAddr, Vec<IpAddr>)> = Vec::new();
        for (addr, j) in rejected {
            let Some(list) = inner.by_addr.get_mut(&addr) else {
                continue;
            };
            // Renewed meanwhile by a query under the new policy: that one justifies it now.
            let before = list.len();
            list.retain(|k| {
                !(k.client == j.client
                    && k.qtype == j.qtype
                    && k.name == j.name
                    && k.until <= j.until)
            });
            if list.len() < before {
                inner.revoked.push(RevokedJustification {
                    addr,
                    why: j.clone(),
                    at: now,
                });
            }
            match touched.iter_mut().find(|(a, _)| *a == addr) {
                Some((_, clients)) if !clients.contains(&j.client) => clients.push(j.client),
                Some(_) => {}
                None => touched.push((addr, vec![j.client])),
            }
        }
        let mut lost = Vec::new();
        for (addr, clients) in touched {
            let live: Vec<&Justification> = inner
                .by_addr
                .get(&addr)
                .map(|list| list.iter().filter(|j| j.until > now).collect())
                .unwrap_or_default();
            let clients: Vec<IpAddr> = clients
                .into_iter()
                .filter(|c| live.iter().all(|j| j.client != *c))
                .collect();
            let all = live.is_empty();
            if all {
                inner.by_addr.remove(&addr);
            }
            if !clients.is_empty() {
                lost.push(Lost { addr, clients, all });
            }
        }
        lost
    }

    /// Per address, the clients with a live justification that `still_allowed` accepts, and
    /// the latest expiry among those: what a replaced ruleset carries over. Changes nothing
    /// (the revocation pass that follows records what was lost).
    pub fn still_justified(
        &self,
        now: Instant,
        mut still_allowed: impl FnMut(IpAddr, &Justification) -> bool,
    ) -> HashMap<IpAddr, Vec<(IpAddr, Instant)>> {
        let Some(snapshot) = self.snapshot() else {
            return HashMap::new();
        };
        let mut justified: HashMap<IpAddr, Vec<(IpAddr, Instant)>> = HashMap::new();
        for (addr, list) in snapshot {
            for j in list {
                if j.until <= now || !still_allowed(addr, &j) {
                    continue;
                }
                let clients = justified.entry(addr).or_default();
                match clients.iter_mut().find(|(c, _)| *c == j.client) {
                    Some((_, until)) => *until = (*until).max(j.until),
                    None => clients.push((j.client, j.until)),
                }
            }
        }
        justified
    }

    /// What the index knows about `addr` (canonical: IPv4-mapped as IPv4): for `why` and
    /// for explaining a dropped packet.
    pub fn history(&self, addr: IpAddr) -> History {
        let addr = addr.to_canonical();
        let Ok(inner) = self.inner.lock() else {
            return History::default();
        };
        History {
            justifications: inner.by_addr.get(&addr).cloned().unwrap_or_default(),
            revoked: inner.revoked.of(addr),
        }
    }

    /// Addresses held, for status.
    pub fn len(&self) -> usize {
        self.inner.lock().map_or(0, |inner| inner.by_addr.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(client: &str, name: &str, until: Instant) -> Justification {
        Justification {
            client: client.parse().unwrap(),
            name: Name::from_ascii(name).unwrap(),
            qtype: RecordType::A,
            group: "default".into(),
            rule: name.trim_end_matches('.').into(),
            grant: None,
            until,
        }
    }

    /// `client`'s answers for `count` names `n0.example.` .. (each justifying `addr`).
    fn record_names(
        index: &AdmittedIndex,
        addr: IpAddr,
        client: &str,
        count: usize,
        until: Instant,
        now: Instant,
    ) {
        for i in 0..count {
            index.record(addr, j(client, &format!("n{i}.example."), until), now);
        }
    }

    /// Judges the index with `name` no longer allowed: what is lost.
    fn revoke_name(index: &AdmittedIndex, now: Instant, name: &str) -> Vec<Lost> {
        let name = Name::from_ascii(name).unwrap();
        index.revoke_unjustified(now, |_, j| j.name != name)
    }

    /// `client` lost `addr` (and `all`: nobody else keeps it).
    fn lost_by(addr: IpAddr, client: &str, all: bool) -> Vec<Lost> {
        vec![Lost {
            addr,
            clients: vec![client.parse().unwrap()],
            all,
        }]
    }

    #[test]
    fn an_address_another_allowed_name_justifies_stays() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let index = AdmittedIndex::new(16);
        let shared: IpAddr = "198.51.100.1".parse().unwrap();
        let only: IpAddr = "198.51.100.2".parse().unwrap();
        index.record(shared, j("10.0.0.1", "a.example.", later), now);
        index.record(shared, j("10.0.0.1", "b.example.", later), now);
        index.record(only, j("10.0.0.1", "a.example.", later), now);
        assert_eq!(
            revoke_name(&index, now, "a.example."),
            lost_by(only, "10.0.0.1", true)
        );
        assert_eq!(index.len(), 1);
        // Judged again: nothing left to revoke.
        assert!(revoke_name(&index, now, "a.example.").is_empty());
    }

    #[test]
    fn per_client_losses_are_reported_per_client() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let index = AdmittedIndex::new(16);
        let addr: IpAddr = "198.51.100.1".parse().unwrap();
        index.record(addr, j("10.0.0.1", "a.example.", later), now);
        index.record(addr, j("10.0.0.2", "b.example.", later), now);
        assert_eq!(
            revoke_name(&index, now, "a.example."),
            lost_by(addr, "10.0.0.1", false)
        );
    }

    #[test]
    fn revocations_are_remembered_per_address_oldest_forgotten_first() {
        let now = Instant::now();
        let mut revoked = Revoked::default();
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        let entry = |addr, name: &str| RevokedJustification {
            addr,
            why: j("10.0.0.1", name, now),
            at: now,
        };
        revoked.push(entry(a, "first.example."));
        for i in 0..MAX_REVOKED - 1 {
            revoked.push(entry(b, &format!("n{i}.example.")));
        }
        assert_eq!(revoked.of(a).len(), 1);
        revoked.push(entry(a, "second.example."));
        let left = revoked.of(a);
        assert_eq!(left.len(), 1, "the oldest entry of all was a's first");
        assert_eq!(left[0].why.bare_name(), "second.example");
        assert_eq!(revoked.of(b).len(), MAX_REVOKED - 1);
        revoked.push(entry(a, "third.example."));
        assert_eq!(revoked.of(b).len(), MAX_REVOKED - 2);
        assert_eq!(revoked.order.len(), MAX_REVOKED);
        let held: usize = revoked.by_addr.values().map(VecDeque::len).sum();
        assert_eq!(held, MAX_REVOKED);
    }

    #[test]
    fn a_history_walks_one_client_or_all() {
        let now = Instant::now();
        let addr: IpAddr = "198.51.100.1".parse().unwrap();
        let history = History {
            justifications: vec![
                j("10.0.0.1", "a.example.", now),
                j("10.0.0.2", "b.example.", now),
            ],
            revoked: vec![RevokedJustification {
                addr,
                why: j("10.0.0.2", "c.example.", now),
                at: now,
            }],
        };
        let one = Some("10.0.0.1".parse().unwrap());
        let names = |c| {
            history
                .justifications_of(c)
                .map(Justification::bare_name)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(one), ["a.example"]);
        assert_eq!(names(None), ["a.example", "b.example"]);
        assert_eq!(history.revoked_of(one).count(), 0);
        assert_eq!(history.revoked_of(None).count(), 1);
    }

    #[test]
    fn the_index_stays_bounded() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let index = AdmittedIndex::new(2);
        for i in 0..4u8 {
            let addr = IpAddr::from([198, 51, 100, i]);
            index.record(addr, j("10.0.0.1", "a.example.", later), now);
        }
        assert_eq!(index.len(), 2);
        let addr: IpAddr = "198.51.100.0".parse().unwrap();
        record_names(&index, addr, "10.0.0.1", 40, later, now);
        let held = index
            .inner
            .lock()
            .unwrap()
            .by_addr
            .get(&addr)
            .unwrap()
            .len();
        assert_eq!(held, MAX_JUSTIFICATIONS);
        // Many clients with one each: bounded all the same.
        for i in 0..200u8 {
            let client = format!("10.1.0.{i}");
            index.record(addr, j(&client, "a.example.", later), now);
        }
        let held = index
            .inner
            .lock()
            .unwrap()
            .by_addr
            .get(&addr)
            .unwrap()
            .len();
        assert_eq!(held, MAX_JUSTIFICATIONS_PER_ADDRESS);
    }

    #[test]
    fn another_clients_many_answers_never_evict_a_clients_only_one() {
        // With per_client, client 10.0.0.1's only justification must survive client
        // 10.0.0.2's sixteen (and more), so that a revoking reload still finds and revokes it.
        let now = Instant::now();
        let soon = now + Duration::from_secs(10);
        let later = now + Duration::from_secs(60);
        let index = AdmittedIndex::new(16);
        let addr: IpAddr = "198.51.100.1".parse().unwrap();
        index.record(addr, j("10.0.0.1", "victim.example.", soon), now);
        record_names(&index, addr, "10.0.0.2", 40, later, now);
        assert_eq!(
            revoke_name(&index, now, "victim.example."),
            lost_by(addr, "10.0.0.1", false)
        );
        // Control: the other client's justifications stayed bounded.
        let held = index
            .inner
            .lock()
            .unwrap()
            .by_addr
            .get(&addr)
            .unwrap()
            .len();
        assert!(held <= MAX_JUSTIFICATIONS, "{held}");
    }
}
