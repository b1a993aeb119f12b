//! The byte-budgeted LRU index both blob stores keep: which blobs are held,
//! in which order they were last used, how many bytes they take, and how many
//! bytes are reserved by uploads in progress.
//!
//! The invariant is `used + reserved <= max`. An upload reserves its declared
//! size before it writes a byte ([`Lru::reserve`] evicts least recently used
//! blobs to make room); committing turns the reservation into a stored blob
//! ([`Lru::insert_reserved`]); an abandoned upload gives it back
//! ([`Lru::release`]). So a store never holds more than its budget, even with
//! uploads in flight.

use std::collections::{BTreeMap, HashMap};

use super::super::digest::BlobKey;

/// An LRU index of blobs with a byte budget; `V` is what the store keeps per
/// blob (the bytes for memory, bookkeeping for disk).
pub(super) struct Lru<V> {
    entries: HashMap<BlobKey, Entry<V>>,
    order: BTreeMap<u64, BlobKey>,
    tick: u64,
    used: u64,
    reserved: u64,
    max: u64,
    evictions: u64,
}

struct Entry<V> {
    value: V,
    tick: u64,
}

/// Not enough room: the bytes reserved by uploads in progress leave no space
/// even after evicting every stored blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoRoom {
    pub wanted: u64,
    pub reserved: u64,
    pub max: u64,
}

impl<V> Lru<V> {
    /// An empty index with a budget of `max` bytes.
    pub(super) fn new(max: u64) -> Lru<V> {
        Lru {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            used: 0,
            reserved: 0,
            max,
            evictions: 0,
        }
    }

    /// Blobs evicted since the index was made.
    pub(super) fn evictions(&self) -> u64 {
        self.evictions
    }

    /// The budget.
    pub(super) fn max(&self) -> u64 {
        self.max
    }

    /// Bytes held by stored blobs.
    pub(super) fn used(&self) -> u64 {
        self.used
    }

    /// Bytes reserved by uploads in progress.
    #[cfg(test)]
    pub(super) fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Number of stored blobs.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Marks `key` as just used and returns its value.
    pub(super) fn touch(&mut self, key: &BlobKey) -> Option<&mut V> {
        let tick = self.next_tick();
        let entry = self.entries.get_mut(key)?;
        self.order.remove(&entry.tick);
        entry.tick = tick;
        self.order.insert(tick, *key);
        Some(&mut entry.value)
    }

    /// Whether `key` is stored (without changing its order).
    #[cfg(test)]
    pub(super) fn contains(&self, key: &BlobKey) -> bool {
        self.entries.contains_key(key)
    }

    /// Reserves `n` bytes for an upload, evicting least recently used blobs as
    /// needed; returns what was evicted (the store disposes of it).
    pub(super) fn reserve(&mut self, n: u64) -> Result<Vec<(BlobKey, V)>, NoRoom> {
        if self.reserved.saturating_add(n) > self.max {
            return Err(NoRoom {
                wanted: n,
                reserved: self.reserved,
                max: self.max,
            });
        }
        let mut evicted = Vec::new();
        while self.used + self.reserved + n > self.max {
            match self.pop_oldest() {
                Some(e) => evicted.push(e),
                None => break,
            }
        }
        self.reserved += n;
        Ok(evicted)
    }

    /// Gives back `n` reserved bytes.
    pub(super) fn release(&mut self, n: u64) {
        self.reserved = self.reserved.saturating_sub(n);
    }

    /// Stores `key` using `key.size` bytes previously reserved. If it is
    /// already stored (a concurrent upload won), the reservation is released
    /// and `false` is returned with the value handed back.
    pub(super) fn insert_reserved(&mut self, key: BlobKey, value: V) -> Result<(), V> {
        self.release(key.size);
        if self.entries.contains_key(&key) {
            self.touch(&key);
            return Err(value);
        }
        let tick = self.next_tick();
        self.entries.insert(key, Entry { value, tick });
        self.order.insert(tick, key);
        self.used += key.size;
        Ok(())
    }

    /// Adds a blob found at start-up, in least-recently-used-first order,
    /// without a reservation. Returns evicted blobs if over budget.
    pub(super) fn insert_loaded(&mut self, key: BlobKey, value: V) -> Vec<(BlobKey, V)> {
        if self.entries.contains_key(&key) {
            return Vec::new();
        }
        let tick = self.next_tick();
        self.entries.insert(key, Entry { value, tick });
        self.order.insert(tick, key);
        self.used += key.size;
        let mut evicted = Vec::new();
        while self.used + self.reserved > self.max {
            match self.pop_oldest() {
                Some(e) => evicted.push(e),
                None => break,
            }
        }
        evicted
    }

    fn pop_oldest(&mut self) -> Option<(BlobKey, V)> {
        let (_, key) = self.order.pop_first()?;
        let entry = self.entries.remove(&key)?;
        self.used -= key.size;
        self.evictions += 1;
        Some((key, entry.value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8, size: u64) -> BlobKey {
        BlobKey {
            hash: [i; 32],
            size,
        }
    }

    #[test]
    fn evicts_least_recently_used_within_budget() {
        let mut lru = Lru::new(100);
        for i in 0..4 {
            assert!(lru.reserve(30).unwrap().is_empty() || i == 3);
            if i < 3 {
                lru.insert_reserved(key(i, 30), ()).unwrap();
            }
        }
        // The fourth reservation evicted key 0 (least recently used).
        assert!(!lru.contains(&key(0, 30)));
        lru.insert_reserved(key(3, 30), ()).unwrap();
        assert_eq!(lru.used(), 90);
        lru.touch(&key(1, 30));
        let evicted = lru.reserve(30).unwrap();
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].0, key(2, 30));
        assert!(lru.used() + lru.reserved() <= 100);
    }

    #[test]
    fn reservations_bound_the_budget() {
        let mut lru: Lru<()> = Lru::new(100);
        lru.reserve(80).unwrap();
        assert!(lru.reserve(30).is_err());
        lru.release(80);
        assert!(lru.reserve(100).is_ok());
    }

    #[test]
    fn duplicate_insert_releases() {
        let mut lru = Lru::new(100);
        lru.reserve(10).unwrap();
        lru.insert_reserved(key(1, 10), 1).unwrap();
        lru.reserve(10).unwrap();
        assert_eq!(lru.insert_reserved(key(1, 10), 2), Err(2));
        assert_eq!((lru.used(), lru.reserved()), (10, 0));
    }
}
