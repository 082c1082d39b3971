//! The answer cache: upstream answers by question, for as long as their TTLs say, bounded,
//! and evicted by use so that a flood of unique names cannot push the popular answers out.
//!
//! Keys are the question as forwarded (lower-case name, type), so an agent gains nothing by
//! varying case. Positive answers live for their smallest TTL, negative ones for their SOA's
//! negative TTL (RFC 2308), both at most [`MAX_TTL`]; records come back with their TTLs reduced
//! by the time spent in the cache.
//!
//! Eviction is a segmented LRU (SLRU): a new answer enters a small *probation* segment; an
//! answer asked for again while there moves to the *protected* segment, which holds most of the
//! room. When the cache is full, the least recently used answer of probation goes first; when
//! protected is full, its least recently used answer steps back to probation (and gets another
//! chance to be asked for). A flood of names asked once each only ever churns probation: the
//! answers clients keep asking for sit in protected, out of its reach. An expired answer is
//! dropped when it is looked up. The cache is split into shards by key hash, each with its own
//! lock (held for a lookup, never across an await), so threads rarely wait on each other.
//!
//! The same segmented LRU ([`Slru`]) also holds the fast path's encoded answers
//! (`pipeline/fast.rs`), under their own keys and bound.
//!
//! (`moka`, which hickory uses, does this with TinyLFU; it would bring a dependency tree and
//! background housekeeping for what is a hundred lines here.)

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use hickory_proto::rr::{Name, RData, RecordType};

use super::answer::UpstreamAnswer;

/// Answers kept at most.
pub const MAX_ENTRIES: usize = 16_384;

/// Longest time an answer is kept, whatever its TTL.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// Shards of the cache.
const SHARDS: usize = 8;

/// Share of each shard held by the protected segment, in percent.
const PROTECTED_PERCENT: usize = 80;

type Key = (Name, RecordType);

const NIL: usize = usize::MAX;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Segment {
    Probation,
    Protected,
}

struct Node<K, V> {
    hash: u64,
    key: K,
    value: V,
    stored: Instant,
    expires: Instant,
    segment: Segment,
    prev: usize,
    next: usize,
}

/// A list of nodes by index, most recently used at the head.
#[derive(Clone, Copy)]
struct List {
    head: usize,
    tail: usize,
    len: usize,
}

impl List {
    const EMPTY: List = List {
        head: NIL,
        tail: NIL,
        len: 0,
    };
}

/// One shard: a slab of nodes, an index by key hash, and the two segments' lists. The index
/// holds one node per hash: a key whose hash collides with another's replaces it (a lookup
/// compares the whole key, so a collision costs a miss, never a wrong answer).
struct Shard<K, V> {
    nodes: Vec<Option<Node<K, V>>>,
    free: Vec<usize>,
    index: HashMap<u64, usize>,
    probation: List,
    protected: List,
    capacity: usize,
    protected_capacity: usize,
}

impl<K, V> Shard<K, V> {
    fn new(capacity: usize) -> Shard<K, V> {
        Shard {
            nodes: Vec::new(),
            free: Vec::new(),
            index: HashMap::new(),
            probation: List::EMPTY,
            protected: List::EMPTY,
            capacity,
            protected_capacity: capacity * PROTECTED_PERCENT / 100,
        }
    }

    fn node(&mut self, at: usize) -> Option<&mut Node<K, V>> {
        self.nodes.get_mut(at).and_then(Option::as_mut)
    }

    fn list(&mut self, segment: Segment) -> &mut List {
        match segment {
            Segment::Probation => &mut self.probation,
            Segment::Protected => &mut self.protected,
        }
    }

    fn unlink(&mut self, at: usize) {
        let Some((segment, prev, next)) = self.node(at).map(|n| (n.segment, n.prev, n.next)) else {
            return;
        };
        match self.node(prev) {
            Some(p) => p.next = next,
            None => self.list(segment).head = next,
        }
        match self.node(next) {
            Some(n) => n.prev = prev,
            None => self.list(segment).tail = prev,
        }
        let list = self.list(segment);
        list.len = list.len.saturating_sub(1);
    }

    fn push_front(&mut self, at: usize, segment: Segment) {
        let head = self.list(segment).head;
        if let Some(node) = self.node(at) {
            node.segment = segment;
            node.prev = NIL;
            node.next = head;
        }
        if let Some(old) = self.node(head) {
            old.prev = at;
        }
        let list = self.list(segment);
        list.head = at;
        if list.tail == NIL {
            list.tail = at;
        }
        list.len += 1;
    }

    fn remove(&mut self, at: usize) {
        self.unlink(at);
        if let Some(node) = self.nodes.get_mut(at).and_then(Option::take) {
            self.index.remove(&node.hash);
            self.free.push(at);
        }
    }

    /// Runs `read` on the value stored under `hash` whose key `is_key` accepts, with the time
    /// it has spent in the cache, and marks it used; `None` when absent or expired.
    fn get<R>(
        &mut self,
        hash: u64,
        is_key: impl FnOnce(&K) -> bool,
        now: Instant,
        read: impl FnOnce(&V, Duration) -> R,
    ) -> Option<R> {
        let at = *self.index.get(&hash)?;
        let node = self.node(at)?;
        if !is_key(&node.key) {
            return None;
        }
        if now >= node.expires {
            self.remove(at);
            return None;
        }
        let out = read(&node.value, now.saturating_duration_since(node.stored));
        // Asked again: into (or to the front of) protected.
        self.unlink(at);
        self.push_front(at, Segment::Protected);
        while self.protected.len > self.protected_capacity {
            let tail = self.protected.tail;
            self.unlink(tail);
            self.push_front(tail, Segment::Probation);
        }
        Some(out)
    }

    fn put(&mut self, hash: u64, key: K, value: V, now: Instant, ttl: Duration) {
        if let Some(&at) = self.index.get(&hash) {
            self.remove(at);
        }
        while self.index.len() >= self.capacity {
            let victim = if self.probation.tail != NIL {
                self.probation.tail
            } else {
                self.protected.tail
            };
            if victim == NIL {
                break;
            }
            self.remove(victim);
        }
        let node = Node {
            hash,
            key,
            value,
            stored: now,
            expires: now + ttl,
            segment: Segment::Probation,
            prev: NIL,
            next: NIL,
        };
        let at = match self.free.pop() {
            Some(at) => {
                if let Some(slot) = self.nodes.get_mut(at) {
                    *slot = Some(node);
                }
                at
            }
            None => {
                self.nodes.push(Some(node));
                self.nodes.len() - 1
            }
        };
        self.index.insert(hash, at);
        self.push_front(at, Segment::Probation);
    }
}

/// The bounded, scan-resistant store behind both caches: values by key hash, in shards, each
/// behind its own lock (held for one lookup or insertion, never across an await).
pub(crate) struct Slru<K, V> {
    shards: Vec<Mutex<Shard<K, V>>>,
    hasher: RandomState,
}

impl<K, V> Slru<K, V> {
    pub(crate) fn with_capacity(entries: usize) -> Slru<K, V> {
        let per_shard = (entries / SHARDS).max(1);
        Slru {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard::new(per_shard)))
                .collect(),
            hasher: RandomState::new(),
        }
    }

    /// The keyed hash of `key` (anything hashable that stands for a key, so that a lookup
    /// need not build one).
    pub(crate) fn hash_of(&self, key: impl std::hash::Hash) -> u64 {
        self.hasher.hash_one(key)
    }

    fn shard(&self, hash: u64) -> Option<std::sync::MutexGuard<'_, Shard<K, V>>> {
        #[allow(clippy::cast_possible_truncation)]
        let index = (hash as usize) % self.shards.len().max(1);
        let shard = self.shards.get(index)?;
        Some(shard.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Reads the live value stored for `hash` whose key `is_key` accepts, with its age.
    pub(crate) fn get<R>(
        &self,
        hash: u64,
        is_key: impl FnOnce(&K) -> bool,
        now: Instant,
        read: impl FnOnce(&V, Duration) -> R,
    ) -> Option<R> {
        self.shard(hash)?.get(hash, is_key, now, read)
    }

    /// Keeps `value` under `key` (whose hash is `hash`) for `ttl`.
    pub(crate) fn put(&self, hash: u64, key: K, value: V, now: Instant, ttl: Duration) {
        if let Some(mut shard) = self.shard(hash) {
            shard.put(hash, key, value, now, ttl);
        }
    }

    /// Drops every value whose key `keep` rejects.
    pub(crate) fn retain(&self, keep: impl Fn(&K) -> bool) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            let doomed: Vec<usize> = shard
                .nodes
                .iter()
                .enumerate()
                .filter_map(|(at, node)| node.as_ref().filter(|n| !keep(&n.key)).map(|_| at))
                .collect();
            for at in doomed {
                shard.remove(at);
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).index.len())
            .sum()
    }
}

/// A bounded, TTL-honouring, scan-resistant cache of upstream answers.
pub struct AnswerCache {
    entries: Slru<Key, UpstreamAnswer>,
}

impl Default for AnswerCache {
    fn default() -> AnswerCache {
        AnswerCache::with_capacity(MAX_ENTRIES)
    }
}

impl AnswerCache {
    pub fn with_capacity(entries: usize) -> AnswerCache {
        AnswerCache {
            entries: Slru::with_capacity(entries),
        }
    }

    /// The cached answer, with TTLs reduced by its age, if still valid.
    pub fn get(&self, name: &Name, qtype: RecordType, now: Instant) -> Option<UpstreamAnswer> {
        // `Name` hashes case-insensitively, like it compares.
        let hash = self.entries.hash_of((name, qtype));
        self.entries.get(
            hash,
            |(n, t)| *t == qtype && n == name,
            now,
            |answer, age| {
                let age = u32::try_from(age.as_secs()).unwrap_or(u32::MAX);
                let mut answer = answer.clone();
                for record in answer.answers.iter_mut().chain(answer.soa.as_mut()) {
                    record.ttl = record.ttl.saturating_sub(age);
                }
                answer
            },
        )
    }

    /// Keeps `answer` for the question, unless its TTL is 0.
    pub fn put(&self, name: &Name, qtype: RecordType, answer: &UpstreamAnswer, now: Instant) {
        let ttl = cache_ttl(answer).min(MAX_TTL);
        if ttl.is_zero() {
            return;
        }
        let hash = self.entries.hash_of((name, qtype));
        self.entries
            .put(hash, (name.clone(), qtype), answer.clone(), now, ttl);
    }

    /// Drops every answer whose name `keep` rejects.
    pub fn retain(&self, keep: impl Fn(&Name) -> bool) {
        self.entries.retain(|(name, _)| keep(name));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How long an answer may be reused: its smallest record TTL, or for a negative answer the
/// SOA's negative TTL, min(SOA TTL, SOA minimum). A negative answer without SOA is not kept.
pub fn cache_ttl(answer: &UpstreamAnswer) -> Duration {
    let secs = if answer.answers.is_empty() {
        match &answer.soa {
            Some(soa) => match &soa.data {
                RData::SOA(data) => soa.ttl.min(data.minimum),
                _ => 0,
            },
            None => 0,
        }
    } else {
        answer.answers.iter().map(|r| r.ttl).min().unwrap_or(0)
    };
    Duration::from_secs(u64::from(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::ResponseCode;
    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::A;

    fn answer(ttl: u32) -> UpstreamAnswer {
        UpstreamAnswer {
            upstream: "127.0.0.1:53".parse().unwrap(),
            rcode: ResponseCode::NoError,
            answers: vec![Record::from_rdata(
                Name::from_ascii("a.test.").unwrap(),
                ttl,
                RData::A(A::new(198, 51, 100, 1)),
            )],
            soa: None,
        }
    }

    #[test]
    fn answers_for_names_no_longer_allowed_are_dropped() {
        let cache = AnswerCache::default();
        let t0 = Instant::now();
        let kept = Name::from_ascii("kept.test.").unwrap();
        let gone = Name::from_ascii("gone.test.").unwrap();
        cache.put(&kept, RecordType::A, &answer(300), t0);
        cache.put(&gone, RecordType::A, &answer(300), t0);
        cache.put(&gone, RecordType::AAAA, &answer(300), t0);
        cache.retain(|name| name != &gone);
        assert!(cache.get(&kept, RecordType::A, t0).is_some());
        assert!(cache.get(&gone, RecordType::A, t0).is_none());
        assert!(cache.get(&gone, RecordType::AAAA, t0).is_none());
        assert_eq!(cache.len(), 1);
        // The freed slots are used again.
        cache.put(&gone, RecordType::A, &answer(300), t0);
        assert!(cache.get(&gone, RecordType::A, t0).is_some());
    }

    #[test]
    fn answers_age_and_expire_with_their_ttl() {
        let cache = AnswerCache::default();
        let name = Name::from_ascii("a.test.").unwrap();
        let t0 = Instant::now();
        cache.put(&name, RecordType::A, &answer(10), t0);
        let later = cache
            .get(&name, RecordType::A, t0 + Duration::from_secs(4))
            .unwrap();
        assert_eq!(later.answers[0].ttl, 6);
        assert!(cache.get(&name, RecordType::AAAA, t0).is_none());
        assert!(
            cache
                .get(&name, RecordType::A, t0 + Duration::from_secs(10))
                .is_none()
        );
        assert!(cache.is_empty());
        cache.put(&name, RecordType::A, &answer(0), t0);
        assert!(cache.is_empty(), "TTL 0 is not cached");
    }

    #[test]
    fn the_cache_never_holds_more_than_its_bound() {
        let cache = AnswerCache::default();
        let t0 = Instant::now();
        for i in 0..(2 * MAX_ENTRIES) {
            let name = Name::from_ascii(format!("n{i}.test.")).unwrap();
            cache.put(&name, RecordType::A, &answer(300), t0);
        }
        assert!(cache.len() <= MAX_ENTRIES, "{}", cache.len());
        assert!(cache.len() >= MAX_ENTRIES * 9 / 10, "{}", cache.len());
        // Never asked again: the oldest went first.
        let first = Name::from_ascii("n0.test.").unwrap();
        assert!(cache.get(&first, RecordType::A, t0).is_none());
        let last = Name::from_ascii(format!("n{}.test.", 2 * MAX_ENTRIES - 1)).unwrap();
        assert!(cache.get(&last, RecordType::A, t0).is_some());
    }

    /// 1,000 answers clients keep asking for survive a flood of 100,000 names asked once each;
    /// the control, 1,000 answers never asked again, do not.
    #[test]
    fn a_flood_of_unique_names_cannot_evict_the_popular_answers() {
        let cache = AnswerCache::default();
        let t0 = Instant::now();
        let names = |prefix: &str| -> Vec<Name> {
            (0..1000)
                .map(|i| Name::from_ascii(format!("{prefix}{i}.test.")).unwrap())
                .collect()
        };
        let (popular, once) = (names("popular"), names("once"));
        for name in popular.iter().chain(&once) {
            cache.put(name, RecordType::A, &answer(300), t0);
        }
        for name in &popular {
            assert!(cache.get(name, RecordType::A, t0).is_some());
        }
        for i in 0..100_000 {
            let name = Name::from_ascii(format!("flood{i}.test.")).unwrap();
            cache.put(&name, RecordType::A, &answer(300), t0);
        }
        let kept = |names: &[Name]| {
            names
                .iter()
                .filter(|n| cache.get(n, RecordType::A, t0).is_some())
                .count()
        };
        assert_eq!(kept(&popular), 1000, "popular answers evicted by the flood");
        assert_eq!(
            kept(&once),
            0,
            "control: the flood does evict what is not asked again"
        );
        assert!(cache.len() <= MAX_ENTRIES);
    }

    #[test]
    fn a_protected_answer_no_longer_asked_for_steps_back_and_can_go() {
        let cache = AnswerCache::with_capacity(8 * 10);
        let t0 = Instant::now();
        let names: Vec<Name> = (0..2000)
            .map(|i| Name::from_ascii(format!("p{i}.test.")).unwrap())
            .collect();
        // Ask many names twice: protected overflows and demotes its oldest into probation.
        for name in &names {
            cache.put(name, RecordType::A, &answer(300), t0);
            cache.get(name, RecordType::A, t0);
        }
        assert!(cache.len() <= 80);
        assert!(cache.get(&names[0], RecordType::A, t0).is_none());
        assert!(cache.get(&names[1999], RecordType::A, t0).is_some());
    }
}
