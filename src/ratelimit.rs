//! Token buckets keyed by who is asking (a client address, a user name),
//! with bounded memory: the one rate limiter behind cancel requests and
//! failed-login throttling.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How many keys a limiter remembers before it forgets the idlest ones.
const MAX_TRACKED_KEYS: usize = 10_000;

/// One bucket per key: `burst` tokens, refilled at `rate` per second.
pub struct KeyedBuckets<K> {
    rate: f64,
    burst: f64,
    buckets: HashMap<K, (f64, Instant)>,
}

impl<K: Hash + Eq + Clone> KeyedBuckets<K> {
    /// New rate and burst (a reload); buckets keep their tokens, capped at
    /// the new burst.
    pub fn set_rate(&mut self, rate: f64, burst: f64) {
        self.rate = rate;
        self.burst = burst;
        for (tokens, _) in self.buckets.values_mut() {
            *tokens = tokens.min(burst);
        }
    }

    pub fn new(rate: f64, burst: f64) -> Self {
        KeyedBuckets {
            rate,
            burst,
            buckets: HashMap::new(),
        }
    }

    /// The key's bucket, refilled up to `now`.
    fn bucket(&mut self, key: &K, now: Instant) -> &mut f64 {
        if self.buckets.len() >= MAX_TRACKED_KEYS && !self.buckets.contains_key(key) {
            // Forget buckets that have refilled completely: they carry no
            // information. Under a flood of distinct keys, forget all.
            let (rate, burst) = (self.rate, self.burst);
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
            if self.buckets.len() >= MAX_TRACKED_KEYS {
                self.buckets.clear();
            }
        }
        let (tokens, at) = self.buckets.entry(key.clone()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        tokens
    }

    /// Takes a token if there is one.
    pub fn try_take(&mut self, key: &K, now: Instant) -> bool {
        let tokens = self.bucket(key, now);
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until the key has a token again (zero: it has one now).
    /// Nothing is taken.
    pub fn wait(&mut self, key: &K, now: Instant) -> Duration {
        let missing = 1.0 - *self.bucket(key, now);
        if missing <= 0.0 || self.rate <= 0.0 {
            return if missing <= 0.0 {
                Duration::ZERO
            } else {
                Duration::MAX
            };
        }
        Duration::from_secs_f64(missing / self.rate)
    }

    /// Takes a token whether or not one is left (never below zero).
    pub fn take(&mut self, key: &K, now: Instant) {
        let tokens = self.bucket(key, now);
        *tokens = (*tokens - 1.0).max(0.0);
    }

    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn per_key_buckets_refill() {
        let mut l = KeyedBuckets::new(2.0, 3.0);
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        let t0 = Instant::now();
        assert!((0..3).all(|_| l.try_take(&a, t0)));
        assert!(!l.try_take(&a, t0), "burst used up");
        assert_eq!(l.wait(&a, t0), Duration::from_millis(500));
        assert!(l.try_take(&b, t0), "another key has its own bucket");
        let later = t0 + Duration::from_millis(500);
        assert_eq!(l.wait(&a, later), Duration::ZERO);
        assert!(l.try_take(&a, later), "refilled by one");
        assert!(!l.try_take(&a, later));
    }

    #[test]
    fn take_without_checking_and_peek() {
        let mut l = KeyedBuckets::new(1.0, 2.0);
        let t0 = Instant::now();
        l.take(&"bob", t0);
        assert_eq!(l.wait(&"bob", t0), Duration::ZERO);
        l.take(&"bob", t0);
        l.take(&"bob", t0);
        assert_eq!(l.wait(&"bob", t0), Duration::from_secs(1));
        assert_eq!(l.wait(&"alice", t0), Duration::ZERO);
    }

    #[test]
    fn memory_is_bounded() {
        let mut l = KeyedBuckets::new(1.0, 1.0);
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED_KEYS as u32 + 10) {
            l.try_take(&Some(IpAddr::from(i.to_be_bytes())), t0);
        }
        assert!(l.tracked() <= MAX_TRACKED_KEYS);
    }
}
