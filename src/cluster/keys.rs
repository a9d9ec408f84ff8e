//! What the fleet writes to Redis, made useless to anyone who can read
//! Redis: key names are keyed hashes (HMAC-SHA-256 with a key derived from
//! the fleet's shared secret) of what they stand for, and a cancel mapping
//! is sealed with ChaCha20-Poly1305 under another derived key, bound to the
//! Redis key it is stored under. A reader of Redis learns neither the keys
//! pgbastion gave its clients nor the servers' real keys, nor user names or
//! client addresses; a writer cannot plant a mapping that opens. A cancel
//! relayed to the instance that owns a pooled session is sealed the same
//! way, bound to that instance's channel, so a Redis client without the
//! secret cannot inject one.
//!
//! Pure: no I/O, so it is tested (and fuzzed through `open`) on its own.

use std::net::SocketAddr;

use ring::aead::{self, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::crypto::{self, Hash};
use crate::protocol::startup::CancelKey;

/// The shortest shared secret accepted: 256 bits.
pub const MIN_SECRET_LEN: usize = 32;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SecretError {
    #[error(
        "the cluster secret is {0} bytes; it must be at least {MIN_SECRET_LEN} (e.g. `head -c 32 /dev/urandom | base64 > cluster.key`)"
    )]
    TooShort(usize),
}

/// The keys derived from the fleet's shared secret, and the key prefix.
pub struct FleetKeys {
    names: Hash,
    seal: LessSafeKey,
    prefix: String,
}

impl std::fmt::Debug for FleetKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetKeys")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A live session's cancel mapping as another instance needs it: where the
/// session's server is, and the server's real key; or, for a pooled
/// session, only that the owning instance must be asked (its server
/// connection changes per transaction).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteCancel {
    pub session_id: String,
    /// The instance the session runs on.
    pub instance: String,
    /// The upstream's name (every instance shares the upstream config).
    pub upstream: String,
    pub addr: SocketAddr,
    pub process_id: u32,
    pub secret_key: Vec<u8>,
    /// A pooled session: `addr` and the key mean nothing; the cancel is
    /// relayed to `instance`. Absent in mappings of older versions.
    #[serde(default)]
    pub pooled: bool,
    /// The session's endpoint, for a templated upstream (whose server and
    /// verified name depend on it). Absent in mappings of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// A cancel relayed to the instance that owns a pooled session, as
/// published on that instance's channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayedCancel {
    /// The key the client sent (the one pgbastion issued).
    pub process_id: u32,
    pub secret_key: Vec<u8>,
    /// The instance that received the CancelRequest, and that request's
    /// session id (for the owner's log).
    pub from: String,
    pub request_session: String,
    /// The PROXY header the receiving instance would have sent the
    /// upstream (it knows the client's address), if the upstream wants one.
    pub proxy_header: Option<Vec<u8>>,
    /// When it was sent (Unix ms, the sender's clock): a replay is refused
    /// once it is too old.
    pub sent_ms: u64,
}

impl RelayedCancel {
    pub fn key(&self) -> CancelKey {
        CancelKey {
            process_id: self.process_id,
            secret_key: self.secret_key.clone(),
        }
    }
}

impl RemoteCancel {
    pub fn real_key(&self) -> CancelKey {
        CancelKey {
            process_id: self.process_id,
            secret_key: self.secret_key.clone(),
        }
    }
}

impl FleetKeys {
    /// `secret`: the contents of `secret_file`, trailing newline removed.
    pub fn new(secret: &[u8], prefix: &str) -> Result<FleetKeys, SecretError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(SecretError::TooShort(secret.len()));
        }
        let names = crypto::hmac(secret, b"pgbastion cluster: key names v1");
        let seal_key = crypto::hmac(secret, b"pgbastion cluster: cancel seal v1");
        // 32 bytes is exactly ChaCha20-Poly1305's key length.
        let seal = UnboundKey::new(&aead::CHACHA20_POLY1305, &seal_key)
            .map(LessSafeKey::new)
            .unwrap_or_else(|_| unreachable!("a 32-byte key"));
        Ok(FleetKeys {
            names,
            seal,
            prefix: prefix.to_owned(),
        })
    }

    fn name(&self, kind: &str, parts: &[&[u8]]) -> String {
        let mut msg = Vec::with_capacity(64);
        msg.extend_from_slice(kind.as_bytes());
        for p in parts {
            // Length-prefixed, so ("ab","c") and ("a","bc") differ.
            msg.extend_from_slice(&(p.len() as u64).to_be_bytes());
            msg.extend_from_slice(p);
        }
        format!(
            "{}:{kind}:{}",
            self.prefix,
            hex::encode(crypto::hmac(&self.names, &msg))
        )
    }

    /// Where the mapping for the key pgbastion gave a client is stored: a
    /// hash of the whole key, so only a request with the exact key finds it.
    pub fn cancel_key(&self, issued: &CancelKey) -> String {
        self.name(
            "cancel",
            &[&issued.process_id.to_be_bytes(), &issued.secret_key],
        )
    }

    /// The sorted set of one identity's sessions across the fleet.
    pub fn identity_key(&self, identity: &str) -> String {
        self.name("sessions", &[identity.as_bytes()])
    }

    /// The failed-login count of one client address or user (`kind`:
    /// `addr` or `user`).
    pub fn failures_key(&self, kind: &str, value: &str) -> String {
        self.name(&format!("failed-{kind}"), &[value.as_bytes()])
    }

    /// The pub/sub channel where cancels for `instance`'s pooled sessions
    /// are relayed.
    pub fn relay_channel(&self, instance: &str) -> String {
        self.name("relay", &[instance.as_bytes()])
    }

    /// The mapping, encrypted and bound to `redis_key`: a random nonce,
    /// then the ciphertext and tag.
    pub fn seal(&self, redis_key: &str, entry: &RemoteCancel) -> Vec<u8> {
        self.seal_json(redis_key, entry)
    }

    /// The mapping stored under `redis_key`, or None when the value was
    /// not sealed by this fleet for this key (altered, moved, or another
    /// secret).
    pub fn open(&self, redis_key: &str, value: &[u8]) -> Option<RemoteCancel> {
        self.open_json(redis_key, value)
    }

    /// A relayed cancel, sealed and bound to the channel it is published on.
    pub fn seal_relay(&self, channel: &str, relayed: &RelayedCancel) -> Vec<u8> {
        self.seal_json(channel, relayed)
    }

    /// A relayed cancel received on `channel`, or None when it was not
    /// sealed by this fleet for this channel.
    pub fn open_relay(&self, channel: &str, message: &[u8]) -> Option<RelayedCancel> {
        self.open_json(channel, message)
    }

    /// `value` as JSON, encrypted and bound to `aad`: a random nonce, then
    /// the ciphertext and tag.
    fn seal_json(&self, aad: &str, value: &impl Serialize) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut nonce);
        // Serialising these structs to JSON cannot fail.
        let mut data = serde_json::to_vec(value).unwrap_or_default();
        // Sealing fails only for inputs larger than ChaCha20 allows (GiBs).
        let _ = self.seal.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(aad.as_bytes()),
            &mut data,
        );
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        out
    }

    fn open_json<T: serde::de::DeserializeOwned>(&self, aad: &str, value: &[u8]) -> Option<T> {
        if value.len() < NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = value.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut data = sealed.to_vec();
        let plain = self
            .seal
            .open_in_place(nonce, aead::Aad::from(aad.as_bytes()), &mut data)
            .ok()?;
        serde_json::from_slice(plain).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(secret: &[u8]) -> FleetKeys {
        FleetKeys::new(secret, "pgbastion").unwrap()
    }

    fn entry() -> RemoteCancel {
        RemoteCancel {
            session_id: "0123456789abcdef".into(),
            instance: "pgb-1".into(),
            upstream: "main".into(),
            addr: "10.0.0.5:5432".parse().unwrap(),
            process_id: 4242,
            secret_key: vec![0xA5; 32],
            pooled: false,
            endpoint: None,
        }
    }

    #[test]
    fn a_short_secret_is_refused() {
        assert_eq!(
            FleetKeys::new(&[1; 31], "p").unwrap_err(),
            SecretError::TooShort(31)
        );
    }

    #[test]
    fn sealed_mappings_open_only_under_their_key_and_secret() {
        let k = keys(&[7; 32]);
        let at = k.cancel_key(&CancelKey {
            process_id: 1,
            secret_key: vec![9; 4],
        });
        let sealed = k.seal(&at, &entry());
        assert_eq!(k.open(&at, &sealed), Some(entry()));
        // Moved to another key, another fleet's secret, one bit changed,
        // truncated: none opens.
        assert_eq!(k.open("pgbastion:cancel:00", &sealed), None);
        assert_eq!(keys(&[8; 32]).open(&at, &sealed), None);
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert_eq!(k.open(&at, &bad), None, "bit flipped at {i}");
        }
        for n in 0..sealed.len() {
            assert_eq!(k.open(&at, &sealed[..n]), None);
        }
        // Two seals of the same mapping differ (random nonce).
        assert_ne!(k.seal(&at, &entry()), sealed);
    }

    /// A mapping sealed by an older version (no `pooled`) still opens, as
    /// not pooled; a pooled one round-trips.
    #[test]
    fn mappings_without_the_pooled_marker_still_open() {
        let k = keys(&[7; 32]);
        let old = serde_json::json!({
            "session_id": "s", "instance": "pgb-1", "upstream": "main",
            "addr": "10.0.0.5:5432", "process_id": 1, "secret_key": [1, 2, 3, 4],
        });
        let sealed = k.seal_json("at", &old);
        let opened = k.open("at", &sealed).expect("opens");
        assert!(!opened.pooled);
        let pooled = RemoteCancel {
            pooled: true,
            ..entry()
        };
        assert_eq!(k.open("at", &k.seal("at", &pooled)), Some(pooled));
    }

    /// A relayed cancel opens only on its channel: not on another
    /// instance's, not as a mapping, not with another secret.
    #[test]
    fn relayed_cancels_open_only_on_their_channel() {
        let k = keys(&[7; 32]);
        let relayed = RelayedCancel {
            process_id: 9,
            secret_key: vec![3; 32],
            from: "pgb-2".into(),
            request_session: "r".into(),
            proxy_header: None,
            sent_ms: 1,
        };
        let channel = k.relay_channel("pgb-1");
        assert!(channel.starts_with("pgbastion:relay:") && !channel.contains("pgb-1"));
        let sealed = k.seal_relay(&channel, &relayed);
        assert_eq!(k.open_relay(&channel, &sealed), Some(relayed));
        assert_eq!(k.open_relay(&k.relay_channel("pgb-2"), &sealed), None);
        assert_eq!(k.open(&channel, &sealed), None);
        assert_eq!(keys(&[8; 32]).open_relay(&channel, &sealed), None);
    }

    #[test]
    fn nothing_stored_shows_the_keys_or_names() {
        let k = keys(b"0123456789abcdef0123456789abcdef");
        let issued = CancelKey {
            process_id: 0x1234_5678,
            secret_key: vec![0xC3; 32],
        };
        let at = k.cancel_key(&issued);
        let sealed = k.seal(&at, &entry());
        let shown = format!("{at} {}", String::from_utf8_lossy(&sealed));
        for needle in [
            "c3c3", "12345678", "a5a5", "10.0.0.5", "main", "pgb-1", "4242",
        ] {
            assert!(!shown.contains(needle), "{needle} in {shown}");
        }
        assert!(!sealed.windows(4).any(|w| w == [0xA5; 4]));
        let who = k.identity_key("alice@example.com");
        assert!(who.starts_with("pgbastion:sessions:") && !who.contains("alice"));
        assert!(!k.failures_key("addr", "10.0.0.1").contains("10.0.0.1"));
    }

    #[test]
    fn names_depend_on_every_part() {
        let k = keys(&[7; 32]);
        let key = |pid, secret: &[u8]| {
            k.cancel_key(&CancelKey {
                process_id: pid,
                secret_key: secret.to_vec(),
            })
        };
        assert_ne!(key(1, &[1, 2, 3, 4]), key(1, &[1, 2, 3, 5]));
        assert_ne!(key(1, &[1, 2, 3, 4]), key(2, &[1, 2, 3, 4]));
        assert_eq!(key(1, &[1, 2, 3, 4]), key(1, &[1, 2, 3, 4]));
        assert_ne!(k.failures_key("addr", "x"), k.failures_key("user", "x"));
        assert_ne!(
            keys(&[7; 32]).identity_key("a"),
            FleetKeys::new(&[7; 32], "other").unwrap().identity_key("a")
        );
    }
}
