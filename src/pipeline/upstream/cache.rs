//! The answer cache: upstream answers by question, for as long as their TTLs say, bounded.
//!
//! Keys are the question as forwarded (lower-case name, type), so an agent gains nothing by
//! varying case. Positive answers live for their smallest TTL, negative ones for their SOA's
//! negative TTL (RFC 2308), both at most [`MAX_TTL`]; records come back with their TTLs reduced
//! by the time spent in the cache. At most [`MAX_ENTRIES`] answers are kept; the oldest go
//! first, so a flood of unique names churns the cache but cannot grow it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::rr::{Name, RData, RecordType};

use super::answer::UpstreamAnswer;

/// Answers kept at most.
pub const MAX_ENTRIES: usize = 16_384;

/// Longest time an answer is kept, whatever its TTL.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

type Key = (Name, RecordType);

struct Entry {
    answer: UpstreamAnswer,
    stored: Instant,
    expires: Instant,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// Insertion order, for eviction; may hold keys replaced or removed since.
    order: VecDeque<Key>,
}

/// A bounded, TTL-honouring cache of upstream answers.
#[derive(Default)]
pub struct AnswerCache {
    inner: Mutex<Inner>,
}

impl AnswerCache {
    /// The cached answer, with TTLs reduced by its age, if still valid.
    pub fn get(&self, name: &Name, qtype: RecordType, now: Instant) -> Option<UpstreamAnswer> {
        let mut inner = self.inner.lock().ok()?;
        let key = (name.clone(), qtype);
        let entry = inner.entries.get(&key)?;
        if now >= entry.expires {
            inner.entries.remove(&key);
            return None;
        }
        let age = u32::try_from(now.duration_since(entry.stored).as_secs()).unwrap_or(u32::MAX);
        let mut answer = entry.answer.clone();
        drop(inner);
        for record in answer.answers.iter_mut().chain(answer.soa.as_mut()) {
            record.ttl = record.ttl.saturating_sub(age);
        }
        Some(answer)
    }

    /// Keeps `answer` for the question, unless its TTL is 0.
    pub fn put(&self, name: &Name, qtype: RecordType, answer: &UpstreamAnswer, now: Instant) {
        let ttl = cache_ttl(answer).min(MAX_TTL);
        if ttl.is_zero() {
            return;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let key = (name.clone(), qtype);
        while inner.entries.len() >= MAX_ENTRIES && !inner.entries.contains_key(&key) {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            inner.entries.remove(&oldest);
        }
        // Replaced keys leave stale places in `order`; rebuild it before it outgrows the map.
        if inner.order.len() >= 2 * MAX_ENTRIES {
            let live: VecDeque<Key> = inner
                .order
                .iter()
                .filter(|k| inner.entries.contains_key(*k))
                .cloned()
                .collect();
            inner.order = live;
        }
        inner.order.push_back(key.clone());
        inner.entries.insert(
            key,
            Entry {
                answer: answer.clone(),
                stored: now,
                expires: now + ttl,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map_or(0, |inner| inner.entries.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How long an answer may be reused: its smallest record TTL, or for a negative answer the
/// SOA's negative TTL, min(SOA TTL, SOA minimum). A negative answer without SOA is not kept.
fn cache_ttl(answer: &UpstreamAnswer) -> Duration {
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
        for i in 0..(MAX_ENTRIES + 500) {
            let name = Name::from_ascii(format!("n{i}.test.")).unwrap();
            cache.put(&name, RecordType::A, &answer(300), t0);
        }
        assert_eq!(cache.len(), MAX_ENTRIES);
        // The oldest went first.
        let first = Name::from_ascii("n0.test.").unwrap();
        assert!(cache.get(&first, RecordType::A, t0).is_none());
        let last = Name::from_ascii(format!("n{}.test.", MAX_ENTRIES + 499)).unwrap();
        assert!(cache.get(&last, RecordType::A, t0).is_some());
    }
}
