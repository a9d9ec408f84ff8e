//! Token buckets keyed by who is asking (a client address, a user name),
//! with bounded memory: the one rate limiter behind cancel requests and
//! failed-login throttling.
//!
//! Memory is bounded by `MAX_TRACKED_KEYS`. What is forgotten when the
//! table is full matters, because strangers choose the keys (issue 19
//! item 9: a flood of distinct user names used to clear an existing
//! lockout):
//! - asking about a key (`wait`) never adds it;
//! - a full table first forgets buckets that have refilled completely
//!   (they carry no information), then the fullest buckets that still have
//!   a token (a partial count is lost, never a lockout);
//! - a throttled bucket (less than one token) is never forgotten in favour
//!   of a new key. When every tracked key is throttled, new keys are not
//!   tracked one by one: they all share one overflow bucket with the same
//!   rate and burst, so a flood from beyond the table is limited as if it
//!   came from a single key. That fails closed for the untracked keys while
//!   the table is saturated (which takes `MAX_TRACKED_KEYS` keys each
//!   spending its whole budget), rather than giving each of them an
//!   unlimited budget.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How many keys a limiter remembers one by one.
const MAX_TRACKED_KEYS: usize = 10_000;

/// Tokens as of `at`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// The tokens at `now`, refilled at `rate` up to `burst`.
    fn level(&self, now: Instant, rate: f64, burst: f64) -> f64 {
        (self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * rate).min(burst)
    }
}

/// One bucket per key: `burst` tokens, refilled at `rate` per second.
pub struct KeyedBuckets<K> {
    rate: f64,
    burst: f64,
    capacity: usize,
    buckets: HashMap<K, Bucket>,
    /// Shared by the keys that found the table full of throttled buckets.
    overflow: Bucket,
    /// Until then, the table is known to hold only throttled buckets: a new
    /// key goes to `overflow` without another sweep.
    saturated_until: Option<Instant>,
}

impl<K: Hash + Eq + Clone> KeyedBuckets<K> {
    /// New rate and burst (a reload); buckets keep their tokens, capped at
    /// the new burst.
    pub fn set_rate(&mut self, rate: f64, burst: f64) {
        self.rate = rate;
        self.burst = burst;
        for b in self.buckets.values_mut() {
            b.tokens = b.tokens.min(burst);
        }
        self.overflow.tokens = self.overflow.tokens.min(burst);
        self.saturated_until = None;
    }

    pub fn new(rate: f64, burst: f64) -> Self {
        Self::with_capacity(rate, burst, MAX_TRACKED_KEYS)
    }

    fn with_capacity(rate: f64, burst: f64, capacity: usize) -> Self {
        KeyedBuckets {
            rate,
            burst,
            capacity,
            buckets: HashMap::new(),
            overflow: Bucket {
                tokens: burst,
                at: Instant::now(),
            },
            saturated_until: None,
        }
    }

    /// The key's tokens at `now`, without tracking it: an untracked key
    /// has a full bucket, or the overflow bucket's tokens while the table
    /// is full.
    fn level(&self, key: &K, now: Instant) -> f64 {
        let (rate, burst) = (self.rate, self.burst);
        match self.buckets.get(key) {
            Some(b) => b.level(now, rate, burst),
            None if self.buckets.len() >= self.capacity => self.overflow.level(now, rate, burst),
            None => burst,
        }
    }

    /// The key's bucket, refilled up to `now`, tracking the key if there is
    /// room (see the module comment), else the overflow bucket.
    fn bucket(&mut self, key: &K, now: Instant) -> &mut Bucket {
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.capacity {
            self.make_room(now);
        }
        let (rate, burst) = (self.rate, self.burst);
        let b = if self.buckets.len() < self.capacity || self.buckets.contains_key(key) {
            self.buckets.entry(key.clone()).or_insert(Bucket {
                tokens: burst,
                at: now,
            })
        } else {
            &mut self.overflow
        };
        b.tokens = b.level(now, rate, burst);
        b.at = now;
        b
    }

    /// Forgets refilled buckets, then the fullest ones that are not
    /// throttled (down to 90% of the capacity, so that a flood does not
    /// sweep at every new key); throttled buckets stay.
    fn make_room(&mut self, now: Instant) {
        if self.saturated_until.is_some_and(|t| now < t) {
            return;
        }
        let (rate, burst) = (self.rate, self.burst);
        self.buckets
            .retain(|_, b| b.level(now, rate, burst) < burst);
        let target = self.capacity - self.capacity / 10;
        if self.buckets.len() >= self.capacity {
            let mut open: Vec<(f64, K)> = self
                .buckets
                .iter()
                .map(|(k, b)| (b.level(now, rate, burst), k))
                .filter(|(level, _)| *level >= 1.0)
                .map(|(level, k)| (level, k.clone()))
                .collect();
            open.sort_by(|a, b| b.0.total_cmp(&a.0));
            let excess = self.buckets.len().saturating_sub(target);
            for (_, k) in open.into_iter().take(excess) {
                self.buckets.remove(&k);
            }
        }
        self.saturated_until = (self.buckets.len() >= self.capacity).then(|| {
            // The first throttled bucket to get a token back frees a place.
            let soonest = self
                .buckets
                .values()
                .map(|b| (1.0 - b.level(now, rate, burst)).max(0.0))
                .fold(f64::INFINITY, f64::min);
            let wait = if rate > 0.0 && soonest.is_finite() {
                (soonest / rate).min(3600.0)
            } else {
                1.0
            };
            now + Duration::from_secs_f64(wait)
        });
    }

    /// Takes a token if there is one.
    pub fn try_take(&mut self, key: &K, now: Instant) -> bool {
        let b = self.bucket(key, now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until the key has a token again (zero: it has one now).
    /// Nothing is taken, and the key is not tracked.
    pub fn wait(&self, key: &K, now: Instant) -> Duration {
        let missing = 1.0 - self.level(key, now);
        if missing <= 0.0 {
            Duration::ZERO
        } else if self.rate <= 0.0 {
            Duration::MAX
        } else {
            Duration::from_secs_f64(missing / self.rate)
        }
    }

    /// Whether the key has its whole budget (no failure counted recently):
    /// not tracked, or refilled completely. Nothing is taken.
    pub fn is_untouched(&self, key: &K, now: Instant) -> bool {
        self.level(key, now) >= self.burst
    }

    /// Takes a token whether or not one is left (never below zero).
    pub fn take(&mut self, key: &K, now: Instant) {
        let b = self.bucket(key, now);
        b.tokens = (b.tokens - 1.0).max(0.0);
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

    /// Issue 19 item 9: 10,050 failures and checks for distinct keys used
    /// to clear the table, lockouts included.
    #[test]
    fn a_flood_of_distinct_keys_does_not_lift_a_lockout() {
        let mut l = KeyedBuckets::new(3.0 / 60.0, 3.0);
        let t0 = Instant::now();
        let victim = "victim".to_owned();
        for _ in 0..3 {
            l.take(&victim, t0);
        }
        assert!(!l.wait(&victim, t0).is_zero());
        for i in 0..10_050 {
            let t = t0 + Duration::from_micros(i);
            l.take(&format!("flood-{i}"), t);
            assert!(l.wait(&format!("check-{i}"), t).is_zero());
        }
        let later = t0 + Duration::from_millis(100);
        assert!(
            !l.wait(&victim, later).is_zero(),
            "the lockout survives the flood"
        );
        assert!(l.tracked() <= MAX_TRACKED_KEYS);
    }

    #[test]
    fn asking_does_not_track_a_key() {
        let l = KeyedBuckets::<u32>::new(1.0, 1.0);
        let t0 = Instant::now();
        for i in 0..20_000 {
            assert!(l.wait(&i, t0).is_zero());
        }
        assert_eq!(l.tracked(), 0);
    }

    /// A table full of throttled keys keeps them; new keys share one
    /// overflow bucket until a throttled bucket refills.
    #[test]
    fn a_table_full_of_lockouts_counts_new_keys_together() {
        let mut l = KeyedBuckets::with_capacity(1.0 / 60.0, 2.0, 10);
        let t0 = Instant::now();
        for k in 0..10u32 {
            l.take(&k, t0);
            l.take(&k, t0);
        }
        assert_eq!(l.tracked(), 10);
        assert!(l.wait(&100, t0).is_zero(), "the overflow bucket is full");
        l.take(&100, t0);
        l.take(&101, t0);
        assert!(!l.wait(&102, t0).is_zero(), "new keys share one budget");
        assert!((0..10).all(|k| !l.wait(&k, t0).is_zero()), "lockouts kept");
        assert_eq!(l.tracked(), 10);
        // Once the lockouts have refilled, they make room again.
        let later = t0 + Duration::from_secs(121);
        l.take(&200, later);
        assert_eq!(l.tracked(), 1);
        assert!(l.is_untouched(&0, later) && !l.is_untouched(&200, later));
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
