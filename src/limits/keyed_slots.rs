//! Concurrent slots counted per key (a client address, an identity name):
//! a key may hold at most a given number at once, and each slot is given
//! back when its permit is dropped. Pending connections are limited per
//! address with it, and sessions per identity (`max_sessions` in a rule).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use crate::sync::MutexExt;

/// The counts, shared by everything that limits by the same key.
#[derive(Debug)]
pub struct KeyedSlots<K: Hash + Eq + Clone> {
    counts: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Hash + Eq + Clone> Default for KeyedSlots<K> {
    fn default() -> Self {
        KeyedSlots {
            counts: Arc::default(),
        }
    }
}

impl<K: Hash + Eq + Clone> Clone for KeyedSlots<K> {
    fn clone(&self) -> Self {
        KeyedSlots {
            counts: self.counts.clone(),
        }
    }
}

/// One slot of `key`, given back on drop.
#[derive(Debug)]
pub struct KeyedPermit<K: Hash + Eq + Clone> {
    key: K,
    counts: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Hash + Eq + Clone> KeyedSlots<K> {
    /// A slot for `key` if it holds fewer than `max`.
    pub fn try_acquire(&self, key: K, max: usize) -> Option<KeyedPermit<K>> {
        let mut map = self.counts.locked();
        let n = map.entry(key.clone()).or_insert(0);
        if *n >= max {
            if *n == 0 {
                map.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(KeyedPermit {
            key,
            counts: self.counts.clone(),
        })
    }

    /// How many slots `key` holds now.
    pub fn held(&self, key: &K) -> usize {
        let map = self.counts.locked();
        map.get(key).copied().unwrap_or(0)
    }
}

impl<K: Hash + Eq + Clone> Drop for KeyedPermit<K> {
    fn drop(&mut self) {
        let mut map = self.counts.locked();
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_key_limits_and_release() {
        let slots = KeyedSlots::default();
        let a1 = slots.try_acquire("a", 2).unwrap();
        let _a2 = slots.try_acquire("a", 2).unwrap();
        assert!(slots.try_acquire("a", 2).is_none());
        let _b = slots.try_acquire("b", 2).unwrap();
        drop(a1);
        assert_eq!(slots.held(&"a"), 1);
        assert!(slots.try_acquire("a", 2).is_some());
        assert!(slots.try_acquire("c", 0).is_none());
        assert_eq!(slots.counts.lock().unwrap().len(), 2, "no entry left for c");
    }
}
