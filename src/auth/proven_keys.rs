//! The ClientKeys of cleartext passwords pgbastion has already proven, so
//! a client that sends its password on every connection (SQL over HTTP
//! sends it with every request) pays PBKDF2 once, not each time.
//!
//! Without this, a serverless workload costs one full SCRAM derivation
//! (4096 iterations by default, ~700 µs of CPU) per HTTP request, which
//! caps a 2-core proxy at ~2000 requests per second whatever the pool does.
//! A SCRAM server cannot cache like this (the client salts), but a
//! cleartext check can: the ClientKey is a pure function of the password,
//! the salt and the iteration count.
//!
//! What is held, and why it is safe:
//! - only entries for passwords that *matched* a verifier are inserted, so
//!   a wrong guess always pays the full derivation (throttling and the cost
//!   of guessing are unchanged) and cannot evict anything it did not earn;
//! - the lookup key is an HMAC of (password, salt, iterations) under a
//!   random per-process key: the password itself is never stored, and the
//!   table's keys are worthless outside this process;
//! - a hit is still checked against the verifier's StoredKey in constant
//!   time, so a rotated verifier (new StoredKey, same salt) never accepts an
//!   old password;
//! - the table is bounded (`CAPACITY`, oldest out first) and entries expire
//!   (`LIFETIME`), so key material does not linger past its use.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

use crate::crypto::{self, Hash};

/// At most this many proven passwords are remembered.
const CAPACITY: usize = 4096;

/// How long one stays remembered after it was proven.
const LIFETIME: Duration = Duration::from_secs(15 * 60);

/// The process's table.
fn table() -> &'static ProvenKeys {
    static TABLE: OnceLock<ProvenKeys> = OnceLock::new();
    TABLE.get_or_init(|| ProvenKeys::new(CAPACITY, LIFETIME))
}

/// The ClientKey proven earlier for this password, salt and iteration
/// count, if it still matches `stored_key`.
pub fn recall(password: &[u8], salt: &[u8], iterations: u32, stored_key: &Hash) -> Option<Hash> {
    table().recall(password, salt, iterations, stored_key, Instant::now())
}

/// Remembers a ClientKey the caller has just proven against a verifier.
pub fn remember(password: &[u8], salt: &[u8], iterations: u32, client_key: Hash) {
    table().remember(password, salt, iterations, client_key, Instant::now());
}

/// A bounded, expiring map from a keyed hash of (password, salt,
/// iterations) to the ClientKey derived from them.
struct ProvenKeys {
    /// The HMAC key the lookup keys are made with; random per process.
    secret: Hash,
    capacity: usize,
    lifetime: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    keys: HashMap<Hash, (Hash, Instant)>,
    /// Lookup keys, oldest insertion first.
    order: VecDeque<Hash>,
}

impl ProvenKeys {
    fn new(capacity: usize, lifetime: Duration) -> Self {
        Self {
            secret: rand::random(),
            capacity,
            lifetime,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The lookup key: every field length-prefixed, so no two different
    /// triples share an encoding.
    fn lookup_key(&self, password: &[u8], salt: &[u8], iterations: u32) -> Hash {
        let mut msg = Vec::with_capacity(password.len() + salt.len() + 20);
        for part in [password, salt] {
            msg.extend((part.len() as u64).to_be_bytes());
            msg.extend(part);
        }
        msg.extend(iterations.to_be_bytes());
        let key = crypto::hmac(&self.secret, &msg);
        msg.iter_mut().for_each(|b| *b = 0);
        key
    }

    fn recall(
        &self,
        password: &[u8],
        salt: &[u8],
        iterations: u32,
        stored_key: &Hash,
        now: Instant,
    ) -> Option<Hash> {
        let lookup = self.lookup_key(password, salt, iterations);
        let (client_key, proven_at) = *self.lock().keys.get(&lookup)?;
        let fresh = now.saturating_duration_since(proven_at) < self.lifetime;
        let matches = crypto::sha256(&client_key).ct_eq(stored_key);
        (fresh && bool::from(matches)).then_some(client_key)
    }

    fn remember(&self, password: &[u8], salt: &[u8], iterations: u32, key: Hash, now: Instant) {
        let lookup = self.lookup_key(password, salt, iterations);
        let mut inner = self.lock();
        if inner.keys.insert(lookup, (key, now)).is_none() {
            inner.order.push_back(lookup);
        }
        while inner.order.len() > self.capacity {
            if let Some(oldest) = inner.order.pop_front() {
                if let Some((mut evicted, _)) = inner.keys.remove(&oldest) {
                    evicted.iter_mut().for_each(|b| *b = 0);
                }
            }
        }
    }

    /// The table stays usable if a holder panicked: every update leaves
    /// it consistent.
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_for(password: &[u8]) -> (Hash, Hash) {
        let salted = crate::auth::scram::salted_password(password, b"salt", 64);
        let client_key = crypto::hmac(&salted, b"Client Key");
        (client_key, crypto::sha256(&client_key))
    }

    #[test]
    fn recalls_only_what_was_proven_for_the_same_inputs() {
        let t = ProvenKeys::new(8, LIFETIME);
        let now = Instant::now();
        let (ck, stored) = key_for(b"pw");
        assert_eq!(t.recall(b"pw", b"salt", 64, &stored, now), None);
        t.remember(b"pw", b"salt", 64, ck, now);
        assert_eq!(t.recall(b"pw", b"salt", 64, &stored, now), Some(ck));
        // Any other password, salt or count is a miss.
        assert_eq!(t.recall(b"pw2", b"salt", 64, &stored, now), None);
        assert_eq!(t.recall(b"pw", b"salt2", 64, &stored, now), None);
        assert_eq!(t.recall(b"pw", b"salt", 65, &stored, now), None);
        // Field boundaries are part of the key.
        assert_eq!(t.recall(b"pws", b"alt", 64, &stored, now), None);
    }

    #[test]
    fn a_rotated_verifier_or_an_old_entry_is_a_miss() {
        let t = ProvenKeys::new(8, Duration::from_secs(60));
        let now = Instant::now();
        let (ck, stored) = key_for(b"pw");
        t.remember(b"pw", b"salt", 64, ck, now);
        let (_, other_stored) = key_for(b"new password");
        assert_eq!(t.recall(b"pw", b"salt", 64, &other_stored, now), None);
        let later = now + Duration::from_secs(61);
        assert_eq!(t.recall(b"pw", b"salt", 64, &stored, later), None);
    }

    #[test]
    fn bounded_oldest_out_first() {
        let t = ProvenKeys::new(2, LIFETIME);
        let now = Instant::now();
        let keys: Vec<_> = [&b"a"[..], b"b", b"c"].iter().map(|p| key_for(p)).collect();
        for (p, (ck, _)) in [&b"a"[..], b"b", b"c"].iter().zip(&keys) {
            t.remember(p, b"salt", 64, *ck, now);
        }
        assert_eq!(t.lock().keys.len(), 2);
        assert_eq!(t.recall(b"a", b"salt", 64, &keys[0].1, now), None);
        assert_eq!(
            t.recall(b"b", b"salt", 64, &keys[1].1, now),
            Some(keys[1].0)
        );
        assert_eq!(
            t.recall(b"c", b"salt", 64, &keys[2].1, now),
            Some(keys[2].0)
        );
        // Remembering the same one again does not grow the order.
        t.remember(b"c", b"salt", 64, keys[2].0, now);
        assert_eq!(t.lock().order.len(), 2);
    }
}
