//! The bounded cache of the keyring: what was read from the store, checked and prepared
//! at a key's first use, kept for the next calls (`[keyring] cache_keys` entries at most).
//!
//! Eviction is CLOCK (second chance, an approximation of LRU): a hit only sets the entry's
//! "used" bit under the read lock, so hot keys cost no write lock; an insert past the bound
//! evicts the first entry, in insertion order, that was not used since the hand last passed.
//! A value evicted is dropped here, and with it (once no call still holds it) every derived
//! secret it held: they zeroize on drop.
//!
//! **Stale inserts.** A loader reads the store without a lock, so a change may commit (and
//! replace or remove the entry here) between its read and its insert. Every loader takes
//! an [`Epoch`] before it reads, and [`Cache::insert_loaded`] refuses to insert once any
//! change was published after it: the loader's value serves its own call (which began
//! before the change was published) and nothing after it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// How long "no such key" is remembered on a store only this server writes (where a key
/// it makes replaces the entry at once): a name that does not exist costs one store read
/// per this long, however often it is asked for. On a shared store an absence is not
/// remembered (`Keyring::load_key`).
pub(super) const ABSENT_FOR: Duration = Duration::from_secs(1);

/// What the store said about one name.
pub(super) enum Cached<V> {
    /// Found and checked.
    Found(V),
    /// A record that failed authentication: refused by name.
    Tampered,
    /// No record, as of this instant.
    Absent(Instant),
}

impl<V: Clone> Clone for Cached<V> {
    fn clone(&self) -> Self {
        match self {
            Self::Found(v) => Self::Found(v.clone()),
            Self::Tampered => Self::Tampered,
            Self::Absent(at) => Self::Absent(*at),
        }
    }
}

struct Slot<V> {
    value: Cached<V>,
    used: AtomicBool,
    /// Which insert of this name made the slot (entries of `ring` for older ones are stale).
    generation: u64,
}

struct Inner<V> {
    map: HashMap<String, Slot<V>>,
    /// Names in insertion order, with their slot's generation: the clock's hand is its front.
    ring: VecDeque<(String, u64)>,
    next_generation: u64,
    /// Changes published so far (see the module's "Stale inserts").
    epoch: u64,
}

/// When a loader started reading the store (see [`Cache::epoch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Epoch(u64);

/// A bounded map from names to what the store said about them.
pub(super) struct Cache<V> {
    inner: RwLock<Inner<V>>,
    capacity: usize,
}

impl<V: Clone> Cache<V> {
    /// An empty cache of at most `capacity` entries (at least 1).
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            inner: RwLock::new(Inner {
                map: HashMap::new(),
                ring: VecDeque::new(),
                next_generation: 0,
                epoch: 0,
            }),
            capacity: capacity.max(1),
        }
    }

    // Every update of `Inner` completes or leaves it whole (no panic halfway): a poisoned
    // lock still guards a usable map.
    fn read(&self) -> RwLockReadGuard<'_, Inner<V>> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner<V>> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// What is cached for `name`, marking it used; `None` on a miss, or when an absence
    /// has been remembered for longer than [`ABSENT_FOR`].
    pub(super) fn get(&self, name: &str) -> Option<Cached<V>> {
        self.look(name, true)
    }

    /// As [`Cache::get`] (an absence remembered too long is a miss), without marking the
    /// entry used (for looks that are not uses).
    pub(super) fn peek(&self, name: &str) -> Option<Cached<V>> {
        self.look(name, false)
    }

    fn look(&self, name: &str, used: bool) -> Option<Cached<V>> {
        let inner = self.read();
        let slot = inner.map.get(name)?;
        if let Cached::Absent(at) = slot.value
            && at.elapsed() > ABSENT_FOR
        {
            return None;
        }
        if used {
            slot.used.store(true, Ordering::Relaxed);
        }
        Some(slot.value.clone())
    }

    /// The epoch a loader takes before it reads the store.
    pub(super) fn epoch(&self) -> Epoch {
        Epoch(self.read().epoch)
    }

    /// Inserts what a loader read since `epoch`, unless a change was published since.
    pub(super) fn insert_loaded(&self, name: &str, value: Cached<V>, epoch: Epoch) {
        let mut inner = self.write();
        if inner.epoch == epoch.0 {
            self.put_locked(&mut inner, name, value);
        }
    }

    /// Publishes a change: `name` now stands for `value` (loads begun before are not
    /// inserted).
    pub(super) fn replace(&self, name: &str, value: Cached<V>) {
        let mut inner = self.write();
        inner.epoch += 1;
        self.put_locked(&mut inner, name, value);
    }

    /// Publishes a change to `name`: forgotten here, read again at its next use.
    pub(super) fn evict(&self, name: &str) {
        let mut inner = self.write();
        inner.epoch += 1;
        inner.map.remove(name);
    }

    /// Publishes a change whose entry is not cached: loads begun before now are not
    /// inserted (they may have read the store before the change).
    pub(super) fn refuse_loads_begun(&self) {
        self.write().epoch += 1;
    }

    /// Publishes a change to everything: every entry forgotten.
    pub(super) fn clear(&self) {
        let mut inner = self.write();
        inner.epoch += 1;
        inner.map.clear();
        inner.ring.clear();
    }

    /// The first name whose cached value satisfies `f` (a scan of the whole cache: for
    /// rare events only).
    pub(super) fn find(&self, mut f: impl FnMut(&V) -> bool) -> Option<String> {
        self.read()
            .map
            .iter()
            .find(|(_, s)| matches!(&s.value, Cached::Found(v) if f(v)))
            .map(|(k, _)| k.clone())
    }

    /// How many entries are cached.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.read().map.len()
    }

    fn put_locked(&self, inner: &mut Inner<V>, name: &str, value: Cached<V>) {
        if let Some(slot) = inner.map.get_mut(name) {
            slot.value = value;
            slot.used.store(true, Ordering::Relaxed);
            return;
        }
        while inner.map.len() >= self.capacity {
            let Some((victim, generation)) = inner.ring.pop_front() else {
                break;
            };
            let Some(slot) = inner.map.get(&victim) else {
                continue;
            };
            if slot.generation != generation {
                continue;
            }
            if slot.used.swap(false, Ordering::Relaxed) {
                inner.ring.push_back((victim, generation));
            } else {
                // Dropped here: its secrets zeroize once no call holds them.
                inner.map.remove(&victim);
            }
        }
        // Entries forgotten by `evict` leave stale names in the ring: compact it before it
        // outgrows the map.
        if inner.ring.len() > self.capacity.saturating_mul(2) {
            let map = &inner.map;
            let kept: VecDeque<(String, u64)> = inner
                .ring
                .iter()
                .filter(|(n, g)| map.get(n).is_some_and(|s| s.generation == *g))
                .cloned()
                .collect();
            inner.ring = kept;
        }
        let generation = inner.next_generation;
        inner.next_generation += 1;
        inner.map.insert(
            name.to_owned(),
            Slot {
                value,
                used: AtomicBool::new(false),
                generation,
            },
        );
        inner.ring.push_back((name.to_owned(), generation));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn found(c: &Cache<u32>, name: &str) -> Option<u32> {
        match c.get(name) {
            Some(Cached::Found(v)) => Some(v),
            _ => None,
        }
    }

    #[test]
    fn the_bound_holds_and_used_entries_get_a_second_chance() {
        let c = Cache::new(3);
        for (i, n) in ["a", "b", "c"].iter().enumerate() {
            c.insert_loaded(n, Cached::Found(i as u32), c.epoch());
        }
        // "a" used: "b" goes first.
        assert_eq!(found(&c, "a"), Some(0));
        c.insert_loaded("d", Cached::Found(3), c.epoch());
        assert_eq!(c.len(), 3);
        assert_eq!(c.peek("b").map(|_| ()), None);
        assert_eq!(found(&c, "a"), Some(0));
        assert_eq!(found(&c, "d"), Some(3));
        for i in 0..100 {
            c.insert_loaded(&format!("k{i}"), Cached::Found(i), c.epoch());
            assert!(c.len() <= 3);
        }
        assert!(c.read().ring.len() <= 6);
    }

    #[test]
    fn a_load_that_began_before_a_change_is_not_inserted() {
        let c = Cache::new(10);
        let before = c.epoch();
        c.replace("a", Cached::Found(2));
        c.insert_loaded("a", Cached::Found(1), before);
        assert_eq!(found(&c, "a"), Some(2));
        let before = c.epoch();
        c.evict("a");
        c.insert_loaded("a", Cached::Found(1), before);
        assert!(c.get("a").is_none());
        c.insert_loaded("a", Cached::Found(3), c.epoch());
        assert_eq!(found(&c, "a"), Some(3));
        c.clear();
        assert!(c.get("a").is_none());
        // Evicted and inserted again: the old ring entry is stale, not a second one.
        for _ in 0..50 {
            c.evict("x");
            c.insert_loaded("x", Cached::Found(0), c.epoch());
        }
        assert!(c.read().ring.len() <= 20);
    }

    /// What the cache drops is dropped (a key entry's secrets zeroize on drop): nothing
    /// evicted, replaced or cleared is kept alive by the cache.
    #[test]
    fn an_evicted_value_is_dropped() {
        let c: Cache<std::sync::Arc<u32>> = Cache::new(2);
        let v = std::sync::Arc::new(7);
        c.insert_loaded("a", Cached::Found(std::sync::Arc::clone(&v)), c.epoch());
        assert_eq!(std::sync::Arc::strong_count(&v), 2);
        c.insert_loaded("b", Cached::Found(std::sync::Arc::new(1)), c.epoch());
        c.insert_loaded("c", Cached::Found(std::sync::Arc::new(2)), c.epoch());
        assert_eq!(std::sync::Arc::strong_count(&v), 1);
        c.replace("b", Cached::Found(std::sync::Arc::clone(&v)));
        c.replace("b", Cached::Tampered);
        assert_eq!(std::sync::Arc::strong_count(&v), 1);
        c.replace("c", Cached::Found(std::sync::Arc::clone(&v)));
        c.clear();
        assert_eq!(std::sync::Arc::strong_count(&v), 1);
    }

    #[test]
    fn an_absence_is_remembered_for_a_moment() {
        let c: Cache<u32> = Cache::new(10);
        c.insert_loaded("gone", Cached::Absent(Instant::now()), c.epoch());
        assert!(matches!(c.get("gone"), Some(Cached::Absent(_))));
        c.insert_loaded(
            "old",
            Cached::Absent(Instant::now() - ABSENT_FOR * 2),
            c.epoch(),
        );
        assert!(c.get("old").is_none());
    }
}
