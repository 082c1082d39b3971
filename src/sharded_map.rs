//! A hash map split into shards, so that growing never stalls the thread that inserts.
//!
//! A `HashMap` doubles its table when it fills, moving every entry in one go: at 115,000
//! entries that took the admission thread 27 ms and the revocation index 4.7 ms (measured with
//! `stage_times` during a fill of fresh names), and every query waiting behind it got that much
//! later. The maps that grow with the firewall's sets (the lifetimes granted, the kernel's
//! acknowledgements, the revocation index) hold up to `set_size` entries or more, so they are
//! [`ShardedMap`]s instead: [`SHARDS`] ordinary maps, each key in the one its hash picks, so a
//! shard that doubles moves a sixty-fourth of the entries. Memory is the same (each shard
//! grows as needed, an empty one allocates nothing); bounds stay the caller's business, as
//! with a `HashMap` (`len` is the whole map's).
//!
//! The shard is picked with a hasher seeded at random per map, so answers cannot be crafted
//! to crowd one shard.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};

/// Shards per map.
pub const SHARDS: usize = 64;

/// A hash map in [`SHARDS`] parts (see the module documentation).
pub struct ShardedMap<K, V> {
    shards: Box<[HashMap<K, V>]>,
    picker: RandomState,
    len: usize,
}

impl<K: Hash + Eq, V> Default for ShardedMap<K, V> {
    fn default() -> Self {
        ShardedMap::new()
    }
}

impl<K: Hash + Eq, V> ShardedMap<K, V> {
    pub fn new() -> ShardedMap<K, V> {
        ShardedMap {
            shards: (0..SHARDS).map(|_| HashMap::new()).collect(),
            picker: RandomState::new(),
            len: 0,
        }
    }

    fn index<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        // The high bits: the shard's own map uses its own seed, so no correlation either way.
        (self.picker.hash_one(key) >> 58) as usize % SHARDS
    }

    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> Option<&HashMap<K, V>> {
        self.shards.get(self.index(key))
    }

    fn shard_mut<Q: Hash + ?Sized>(&mut self, key: &Q) -> Option<&mut HashMap<K, V>> {
        let at = self.index(key);
        self.shards.get_mut(at)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shard(key)?.get(key)
    }

    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shard_mut(key)?.get_mut(key)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    /// Inserts, returning the value `key` had.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let shard = self.shard_mut(&key)?;
        let old = shard.insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let old = self.shard_mut(key)?.remove(key);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// The value of `key`, inserted as `V::default()` when absent (`None` only if there were
    /// no shard for it, which cannot happen).
    pub fn get_or_default(&mut self, key: K) -> Option<&mut V>
    where
        V: Default,
    {
        let at = self.index(&key);
        let shard = self.shards.get_mut(at)?;
        if !shard.contains_key(&key) {
            self.len += 1;
        }
        Some(shard.entry(key).or_default())
    }

    pub fn clear(&mut self) {
        for shard in self.shards.iter_mut() {
            shard.clear();
        }
        self.len = 0;
    }

    /// Keeps the entries `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        for shard in self.shards.iter_mut() {
            shard.retain(&mut keep);
        }
        self.len = self.shards.iter().map(HashMap::len).sum();
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(HashMap::iter)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(HashMap::values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_one_map_and_counts_its_entries() {
        let mut map: ShardedMap<u32, u32> = ShardedMap::new();
        for i in 0..10_000 {
            assert_eq!(map.insert(i, i), None);
        }
        assert_eq!(map.insert(7, 70), Some(7));
        assert_eq!(map.len(), 10_000);
        assert_eq!(map.get(&7), Some(&70));
        *map.get_or_default(7).unwrap() += 1;
        *map.get_or_default(20_000).unwrap() += 1;
        assert_eq!(map.get(&7), Some(&71));
        assert_eq!(map.get(&20_000), Some(&1));
        assert_eq!(map.len(), 10_001);
        assert_eq!(map.remove(&20_000), Some(1));
        assert_eq!(map.remove(&20_000), None);
        map.retain(|k, _| k % 2 == 0);
        assert_eq!(map.len(), 5_000);
        assert_eq!(map.iter().count(), 5_000);
        assert!(map.values().all(|v| v % 2 == 0));
        assert!(!map.contains_key(&1) && map.contains_key(&2));
        // Spread over the shards: none holds more than a few times its share.
        let most = map.shards.iter().map(HashMap::len).max().unwrap();
        assert!(most < 5_000 / SHARDS * 3, "{most}");
    }
}
