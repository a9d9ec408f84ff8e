//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, for both
//! roles pgbastion plays when it terminates authentication: the server
//! toward the client (`server`) and the client toward the database
//! (`client`). This file holds what both share: the constants, the errors,
//! the verifier PostgreSQL stores, nonces, the gs2 channel-binding flag and
//! the attribute syntax.
//!
//! Everything here is pure: messages in, messages (or typed errors) out, with
//! no I/O, so every check can be tested on its own (`tests`). The trick that
//! makes termination possible without knowing any password is in
//! `ServerExchange::finish`: a client's proof is `ClientKey XOR
//! HMAC(StoredKey, AuthMessage)`, so a server that holds the StoredKey
//! recovers the ClientKey, and the ClientKey is all a SCRAM client needs to
//! prove itself to the database (which holds the same verifier).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use sha2::Sha256;
use thiserror::Error;

use crate::crypto::{hmac, sha256, HASH_LEN};

mod client;
mod server;
#[cfg(test)]
mod tests;

pub use client::{ClientAwaitingFinal, ClientExchange, Credential};
pub use server::{Offer, Proven, ServerExchange};

/// The mechanism without channel binding.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// The mechanism bound to the TLS channel (`tls-server-end-point`).
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The only channel binding type PostgreSQL supports.
pub const CHANNEL_BINDING_TYPE: &str = "tls-server-end-point";

/// Length of SHA-256 keys and signatures.
pub const KEY_LEN: usize = HASH_LEN;
/// Raw bytes of randomness in a nonce pgbastion makes (as PostgreSQL).
pub const NONCE_BYTES: usize = 18;
/// The longest client nonce accepted. Real clients send 18 to 32 random
/// bytes in base64 (libpq 24 characters); a prober sending kilobytes only
/// makes every stalled login hold more memory (issue 19 item 18).
pub const MAX_CLIENT_NONCE: usize = 256;
/// The iteration count PostgreSQL uses by default, and pgbastion for the
/// mock exchange of unknown users.
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// The most iterations pgbastion computes for a password it holds: a
/// server asking for more is refused rather than allowed to burn CPU.
pub const MAX_ITERATIONS: u32 = 10_000_000;

pub type Key = [u8; KEY_LEN];

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("unsupported SASL mechanism {0:?}")]
    UnsupportedMechanism(String),
    #[error("unsupported channel binding type {0:?}")]
    UnsupportedChannelBinding(String),
    #[error("the client chose {SCRAM_SHA_256_PLUS} without channel binding data, or {SCRAM_SHA_256} with it")]
    MechanismMismatch,
    #[error("the client supports channel binding but says the server does not (gs2 flag \"y\"): a downgrade")]
    Downgrade,
    #[error("SCRAM channel binding check failed")]
    ChannelBindingMismatch,
    #[error("SCRAM nonce mismatch")]
    NonceMismatch,
    #[error("authorization identities (a=) are not supported")]
    AuthzidUnsupported,
    #[error("mandatory SCRAM extensions (m=) are not supported")]
    MandatoryExtension,
    #[error("the client's proof is wrong")]
    InvalidProof,
    #[error("the server's signature is wrong: it does not know the user's verifier")]
    InvalidServerSignature,
    #[error("the server reported a SCRAM error: {0}")]
    ServerError(String),
    #[error("the server offers no SCRAM-SHA-256 mechanism (offered: {0})")]
    NoScramOffered(String),
    #[error("the server asked for {asked} iterations, more than the {MAX_ITERATIONS} pgbastion computes")]
    TooManyIterations { asked: u32 },
    #[error("the server's salt or iteration count differs from the verifier pgbastion holds")]
    VerifierMismatch,
}

/// `Hi(password, salt, i)`: PBKDF2 with HMAC-SHA-256, one block.
pub fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> Key {
    let mut out = [0u8; KEY_LEN];
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
    out
}

/// What PostgreSQL stores for a SCRAM password (`pg_authid.rolpassword`).
/// It lets a server check proofs but not make them.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Key,
    pub server_key: Key,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A verifier allows an offline guessing attack: keep it out of logs.
        f.write_str("Verifier(..)")
    }
}

impl Verifier {
    /// The verifier PostgreSQL would store for `password` (used for the
    /// mock exchange and by tests; pgbastion never sees users' passwords).
    pub fn from_password(password: &[u8], salt: &[u8], iterations: u32) -> Verifier {
        let salted = salted_password(password, salt, iterations);
        Verifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&hmac(&salted, b"Client Key")),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// Parses PostgreSQL's text form,
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(text: &str) -> Option<Verifier> {
        let rest = text.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let iterations: u32 = iterations.parse().ok().filter(|&i| i > 0)?;
        let salt = BASE64.decode(salt).ok().filter(|s| !s.is_empty())?;
        Some(Verifier {
            iterations,
            salt,
            stored_key: BASE64.decode(stored).ok()?.try_into().ok()?,
            server_key: BASE64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// The text form PostgreSQL stores.
    pub fn to_text(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            BASE64.encode(&self.salt),
            BASE64.encode(self.stored_key),
            BASE64.encode(self.server_key)
        )
    }
}

/// A fresh nonce: printable, no commas (base64 of random bytes).
pub fn new_nonce() -> String {
    let mut raw = [0u8; NONCE_BYTES];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut raw);
    BASE64.encode(raw)
}

/// The gs2 channel-binding flag a client sends first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelBindingFlag {
    /// `n`: the client does not support channel binding.
    NotSupported,
    /// `y`: the client supports it but believes the server does not.
    ClientOnly,
    /// `p=tls-server-end-point`: the client binds to the TLS channel.
    Bound,
}

impl ChannelBindingFlag {
    fn gs2_header(&self) -> String {
        match self {
            ChannelBindingFlag::NotSupported => "n,,".into(),
            ChannelBindingFlag::ClientOnly => "y,,".into(),
            ChannelBindingFlag::Bound => format!("p={CHANNEL_BINDING_TYPE},,"),
        }
    }
}

/// Splits a SCRAM message into its `x=value` attributes, in order.
fn attributes(msg: &str) -> Result<Vec<(u8, &str)>, ScramError> {
    msg.split(',')
        .map(|part| {
            let b = part.as_bytes();
            if b.len() < 2 || b[1] != b'=' || !b[0].is_ascii_alphabetic() {
                return Err(ScramError::Malformed("expected an attribute x=value"));
            }
            Ok((b[0], &part[2..]))
        })
        .collect()
}

/// A nonce is printable ASCII other than ',' (RFC 5802), and not empty.
fn valid_nonce(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

fn utf8(data: &[u8]) -> Result<&str, ScramError> {
    std::str::from_utf8(data).map_err(|_| ScramError::Malformed("not UTF-8"))
}
