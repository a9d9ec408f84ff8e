//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, for both
//! roles pgbastion plays when it terminates authentication: the server
//! toward the client and the client toward the database.
//!
//! Everything here is pure: messages in, messages (or typed errors) out, with
//! no I/O, so every check can be tested on its own. The trick that makes
//! termination possible without knowing any password is in
//! `ServerExchange::finish`: a client's proof is `ClientKey XOR
//! HMAC(StoredKey, AuthMessage)`, so a server that holds the StoredKey
//! recovers the ClientKey, and the ClientKey is all a SCRAM client needs to
//! prove itself to the database (which holds the same verifier).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use thiserror::Error;

/// The mechanism without channel binding.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// The mechanism bound to the TLS channel (`tls-server-end-point`).
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The only channel binding type PostgreSQL supports.
pub const CHANNEL_BINDING_TYPE: &str = "tls-server-end-point";

/// Length of SHA-256 keys and signatures.
pub const KEY_LEN: usize = 32;
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

type HmacSha256 = Hmac<Sha256>;

pub fn hmac(key: &[u8], msg: &[u8]) -> Key {
    // HMAC takes keys of any length; this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

pub fn sha256(data: &[u8]) -> Key {
    Sha256::digest(data).into()
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

/// What the server side offered: with `Some(binding)` (the client leg is TLS
/// and pgbastion's certificate defines `tls-server-end-point`), both
/// mechanisms; with `None`, only `SCRAM-SHA-256`.
#[derive(Debug, Clone, Copy)]
pub struct Offer<'a> {
    pub binding: Option<&'a [u8]>,
}

impl Offer<'_> {
    pub fn mechanisms(&self) -> Vec<String> {
        match self.binding {
            Some(_) => vec![SCRAM_SHA_256_PLUS.into(), SCRAM_SHA_256.into()],
            None => vec![SCRAM_SHA_256.into()],
        }
    }
}

/// The server role, between its first message and the client's final one.
#[derive(Debug)]
pub struct ServerExchange {
    gs2_header: String,
    flag: ChannelBindingFlag,
    client_first_bare: String,
    /// `r=<client nonce><server nonce>,s=...,i=...`: the one copy of the
    /// combined nonce (`nonce_len` bytes after `r=`).
    server_first: String,
    nonce_len: usize,
    /// The channel binding data the client must echo (with flag `p`).
    binding: Option<Vec<u8>>,
}

/// A client proved it holds the key behind the verifier.
pub struct Proven {
    /// The key the client proved it holds: enough to log in to any server
    /// that stores the same verifier.
    pub client_key: Key,
    /// The `v=` message to send back to the client.
    pub server_final: String,
    pub channel_bound: bool,
}

impl std::fmt::Debug for Proven {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proven")
            .field("channel_bound", &self.channel_bound)
            .finish_non_exhaustive()
    }
}

impl ServerExchange {
    /// Reads the client's SASLInitialResponse (mechanism and client-first
    /// message) against what was offered, and answers with the
    /// server-first message for the verifier's salt and iterations.
    pub fn start(
        offer: Offer<'_>,
        mechanism: &str,
        client_first: &[u8],
        salt: &[u8],
        iterations: u32,
        server_nonce: &str,
    ) -> Result<(ServerExchange, String), ScramError> {
        let plus = match mechanism {
            SCRAM_SHA_256_PLUS if offer.binding.is_some() => true,
            SCRAM_SHA_256 => false,
            other => return Err(ScramError::UnsupportedMechanism(other.to_owned())),
        };
        let msg = utf8(client_first)?;
        // gs2-header: flag "," [authzid] ","
        let (flag_text, rest) = msg
            .split_once(',')
            .ok_or(ScramError::Malformed("no gs2 header"))?;
        let flag = match flag_text {
            "n" => ChannelBindingFlag::NotSupported,
            "y" => ChannelBindingFlag::ClientOnly,
            _ => match flag_text.strip_prefix("p=") {
                Some(CHANNEL_BINDING_TYPE) => ChannelBindingFlag::Bound,
                Some(other) => return Err(ScramError::UnsupportedChannelBinding(other.into())),
                None => return Err(ScramError::Malformed("unknown gs2 channel binding flag")),
            },
        };
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(ScramError::Malformed("incomplete gs2 header"))?;
        if !authzid.is_empty() {
            return Err(ScramError::AuthzidUnsupported);
        }
        match (&flag, plus) {
            (ChannelBindingFlag::Bound, false) | (ChannelBindingFlag::NotSupported, true) => {
                return Err(ScramError::MechanismMismatch)
            }
            (ChannelBindingFlag::ClientOnly, true) => return Err(ScramError::MechanismMismatch),
            // PostgreSQL's rule: a client that could bind, talking to a
            // server that offered binding, must not pretend it was not
            // offered (someone in between may have removed it).
            (ChannelBindingFlag::ClientOnly, false) if offer.binding.is_some() => {
                return Err(ScramError::Downgrade)
            }
            _ => {}
        }
        let attrs = attributes(bare)?;
        let mut it = attrs.iter();
        match it.next() {
            Some((b'm', _)) => return Err(ScramError::MandatoryExtension),
            // PostgreSQL takes the user from the StartupMessage and ignores
            // this one (libpq sends it empty); it must be present.
            Some((b'n', _)) => {}
            _ => return Err(ScramError::Malformed("client-first lacks the user name")),
        }
        let client_nonce = match it.next() {
            Some((b'r', n)) if n.len() > MAX_CLIENT_NONCE => {
                return Err(ScramError::Malformed("client nonce longer than 256 bytes"))
            }
            Some((b'r', n)) if valid_nonce(n) => *n,
            _ => return Err(ScramError::Malformed("client-first lacks a valid nonce")),
        };
        // Optional extensions follow; they are allowed and ignored.
        let nonce_len = client_nonce.len() + server_nonce.len();
        let server_first = format!(
            "r={client_nonce}{server_nonce},s={},i={iterations}",
            BASE64.encode(salt)
        );
        let gs2_header = format!("{flag_text},,");
        Ok((
            ServerExchange {
                gs2_header,
                binding: matches!(flag, ChannelBindingFlag::Bound)
                    .then(|| offer.binding.map(<[u8]>::to_vec))
                    .flatten(),
                flag,
                client_first_bare: bare.to_owned(),
                server_first: server_first.clone(),
                nonce_len,
            },
            server_first,
        ))
    }

    /// Checks the client-final message against the verifier: channel
    /// binding, nonce, then the proof. Only a client holding the ClientKey
    /// behind `stored_key` gets `Ok`.
    pub fn finish(
        self,
        client_final: &[u8],
        stored_key: &Key,
        server_key: &Key,
    ) -> Result<Proven, ScramError> {
        let msg = utf8(client_final)?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("client-final lacks the proof"))?;
        let attrs = attributes(without_proof)?;
        let mut it = attrs.iter();
        let cbind = match it.next() {
            Some((b'c', c)) => BASE64
                .decode(c)
                .map_err(|_| ScramError::Malformed("channel binding is not base64"))?,
            _ => return Err(ScramError::Malformed("client-final lacks channel binding")),
        };
        let mut expected = self.gs2_header.as_bytes().to_vec();
        if let Some(b) = &self.binding {
            expected.extend_from_slice(b);
        }
        if !bool::from(cbind.ct_eq(&expected)) {
            return Err(ScramError::ChannelBindingMismatch);
        }
        match it.next() {
            Some((b'r', n)) if Some(*n) == self.server_first.get(2..2 + self.nonce_len) => {}
            Some((b'r', _)) => return Err(ScramError::NonceMismatch),
            _ => return Err(ScramError::Malformed("client-final lacks the nonce")),
        }
        let proof: Key = BASE64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("the proof is not 32 bytes of base64"))?;
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let signature = hmac(stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; KEY_LEN];
        for (k, (p, s)) in client_key.iter_mut().zip(proof.iter().zip(signature)) {
            *k = p ^ s;
        }
        if !bool::from(sha256(&client_key).ct_eq(stored_key)) {
            return Err(ScramError::InvalidProof);
        }
        Ok(Proven {
            client_key,
            server_final: format!(
                "v={}",
                BASE64.encode(hmac(server_key, auth_message.as_bytes()))
            ),
            channel_bound: self.flag == ChannelBindingFlag::Bound,
        })
    }
}

/// How pgbastion proves itself as a SCRAM client.
#[derive(Clone, Copy)]
pub enum Credential<'a> {
    /// A password it holds (the auth_query role).
    Password(&'a [u8]),
    /// A password it holds, already salted for the server's salt and
    /// iteration count (`derive::salted_password`, off the async workers).
    Salted {
        salted: &'a Key,
        salt: &'a [u8],
        iterations: u32,
    },
    /// A ClientKey recovered from a client's proof, with the verifier it
    /// was checked against: the server must use the same salt and
    /// iterations, and sign with the same ServerKey.
    Keys {
        client_key: &'a Key,
        verifier: &'a Verifier,
    },
}

/// The client role, after its first message.
#[derive(Debug)]
pub struct ClientExchange {
    pub mechanism: &'static str,
    gs2_header: String,
    client_first_bare: String,
    nonce: String,
    binding: Option<Vec<u8>>,
}

/// The client role, waiting for the server's signature.
#[derive(Debug)]
pub struct ClientAwaitingFinal {
    expected_signature: Key,
}

impl ClientExchange {
    /// Chooses a mechanism from the server's offer and makes the
    /// client-first message. `binding` is the `tls-server-end-point` data of
    /// the server's certificate (None if undefined for it): with it,
    /// `-PLUS` is used when offered, and otherwise the flag says `y` (we
    /// could bind, the server did not offer), exactly as libpq does.
    pub fn start(
        offered: &[String],
        binding: Option<Vec<u8>>,
        nonce: &str,
    ) -> Result<(ClientExchange, String), ScramError> {
        let has = |m: &str| offered.iter().any(|o| o == m);
        let (mechanism, flag) = match &binding {
            Some(_) if has(SCRAM_SHA_256_PLUS) => (SCRAM_SHA_256_PLUS, ChannelBindingFlag::Bound),
            Some(_) if has(SCRAM_SHA_256) => (SCRAM_SHA_256, ChannelBindingFlag::ClientOnly),
            None if has(SCRAM_SHA_256) => (SCRAM_SHA_256, ChannelBindingFlag::NotSupported),
            _ => return Err(ScramError::NoScramOffered(offered.join(", "))),
        };
        let gs2_header = flag.gs2_header();
        let client_first_bare = format!("n=,r={nonce}");
        let first = format!("{gs2_header}{client_first_bare}");
        Ok((
            ClientExchange {
                mechanism,
                binding: (flag == ChannelBindingFlag::Bound)
                    .then_some(binding)
                    .flatten(),
                gs2_header,
                client_first_bare,
                nonce: nonce.to_owned(),
            },
            first,
        ))
    }

    pub fn channel_bound(&self) -> bool {
        self.binding.is_some()
    }

    /// The salt and iteration count the server-first message asks for:
    /// what a password must be salted with before `respond`.
    pub fn server_params(&self, server_first: &[u8]) -> Result<(Vec<u8>, u32), ScramError> {
        let (_, salt, iterations) = self.parse_server_first(utf8(server_first)?)?;
        Ok((salt, iterations))
    }

    /// The server-first message's nonce, salt and iteration count, checked.
    fn parse_server_first<'m>(&self, msg: &'m str) -> Result<(&'m str, Vec<u8>, u32), ScramError> {
        let attrs = attributes(msg)?;
        let mut it = attrs.iter();
        let nonce = match it.next() {
            Some((b'm', _)) => return Err(ScramError::MandatoryExtension),
            Some((b'r', n)) if n.len() > self.nonce.len() && n.starts_with(&self.nonce) => {
                if !valid_nonce(n) {
                    return Err(ScramError::Malformed("server nonce has invalid characters"));
                }
                *n
            }
            Some((b'r', _)) => return Err(ScramError::NonceMismatch),
            _ => return Err(ScramError::Malformed("server-first lacks the nonce")),
        };
        let salt = match it.next() {
            Some((b's', s)) => BASE64
                .decode(s)
                .ok()
                .filter(|s| !s.is_empty())
                .ok_or(ScramError::Malformed("salt is not base64"))?,
            _ => return Err(ScramError::Malformed("server-first lacks the salt")),
        };
        let iterations: u32 = match it.next() {
            Some((b'i', i)) => i
                .parse()
                .ok()
                .filter(|&i| i > 0)
                .ok_or(ScramError::Malformed(
                    "iteration count is not a positive number",
                ))?,
            _ => {
                return Err(ScramError::Malformed(
                    "server-first lacks the iteration count",
                ))
            }
        };
        Ok((nonce, salt, iterations))
    }

    /// Answers the server-first message with the client-final message.
    pub fn respond(
        self,
        server_first: &[u8],
        credential: &Credential<'_>,
    ) -> Result<(ClientAwaitingFinal, String), ScramError> {
        let msg = utf8(server_first)?;
        let (nonce, salt, iterations) = self.parse_server_first(msg)?;
        let (client_key, server_key) = match credential {
            Credential::Salted {
                salted,
                salt: s,
                iterations: i,
            } => {
                if *s != salt || *i != iterations {
                    return Err(ScramError::VerifierMismatch);
                }
                (hmac(*salted, b"Client Key"), hmac(*salted, b"Server Key"))
            }
            Credential::Password(password) => {
                if iterations > MAX_ITERATIONS {
                    return Err(ScramError::TooManyIterations { asked: iterations });
                }
                let salted = salted_password(password, &salt, iterations);
                (hmac(&salted, b"Client Key"), hmac(&salted, b"Server Key"))
            }
            Credential::Keys {
                client_key,
                verifier,
            } => {
                if salt != verifier.salt || iterations != verifier.iterations {
                    return Err(ScramError::VerifierMismatch);
                }
                (**client_key, verifier.server_key)
            }
        };
        let mut cbind = self.gs2_header.into_bytes();
        if let Some(b) = &self.binding {
            cbind.extend_from_slice(b);
        }
        let without_proof = format!("c={},r={nonce}", BASE64.encode(&cbind));
        let auth_message = format!("{},{msg},{without_proof}", self.client_first_bare);
        let signature = hmac(&sha256(&client_key), auth_message.as_bytes());
        let mut proof = [0u8; KEY_LEN];
        for (p, (k, s)) in proof.iter_mut().zip(client_key.iter().zip(signature)) {
            *p = k ^ s;
        }
        Ok((
            ClientAwaitingFinal {
                expected_signature: hmac(&server_key, auth_message.as_bytes()),
            },
            format!("{without_proof},p={}", BASE64.encode(proof)),
        ))
    }
}

impl ClientAwaitingFinal {
    /// Checks the server-final message: the server proves it knows the
    /// verifier (ServerKey), so a server that merely accepts any proof is
    /// caught here.
    pub fn verify(self, server_final: &[u8]) -> Result<(), ScramError> {
        let msg = utf8(server_final)?;
        let attrs = attributes(msg)?;
        match attrs.first() {
            Some((b'e', e)) => Err(ScramError::ServerError((*e).to_owned())),
            Some((b'v', v)) => {
                let sig = BASE64
                    .decode(v)
                    .map_err(|_| ScramError::Malformed("server signature is not base64"))?;
                if bool::from(sig.ct_eq(&self.expected_signature)) {
                    Ok(())
                } else {
                    Err(ScramError::InvalidServerSignature)
                }
            }
            _ => Err(ScramError::Malformed("server-final lacks the signature")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 7677, section 3.
    const RFC_SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
    const RFC_CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const RFC_SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const RFC_CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const RFC_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_verifier() -> Verifier {
        Verifier::from_password(b"pencil", &BASE64.decode(RFC_SALT).unwrap(), 4096)
    }

    #[test]
    fn rfc7677_vector_server_role() {
        let v = rfc_verifier();
        let (ex, server_first) = ServerExchange::start(
            Offer { binding: None },
            SCRAM_SHA_256,
            format!("n,,n=user,r={RFC_CLIENT_NONCE}").as_bytes(),
            &v.salt,
            v.iterations,
            RFC_SERVER_NONCE,
        )
        .unwrap();
        assert_eq!(
            server_first,
            format!("r={RFC_CLIENT_NONCE}{RFC_SERVER_NONCE},s={RFC_SALT},i=4096")
        );
        let proven = ex
            .finish(RFC_CLIENT_FINAL.as_bytes(), &v.stored_key, &v.server_key)
            .unwrap();
        assert_eq!(proven.server_final, RFC_SERVER_FINAL);
        assert!(!proven.channel_bound);
        assert_eq!(sha256(&proven.client_key), v.stored_key);
    }

    #[test]
    fn rfc7677_vector_client_role_with_password_and_with_recovered_key() {
        let v = rfc_verifier();
        let server_first = format!("r={RFC_CLIENT_NONCE}{RFC_SERVER_NONCE},s={RFC_SALT},i=4096");
        // The RFC's client sends user "user"; PostgreSQL clients send it
        // empty, which changes the AuthMessage, so check the client role
        // against our own server role rather than the literal proof.
        let (ex, first) =
            ClientExchange::start(&[SCRAM_SHA_256.into()], None, RFC_CLIENT_NONCE).unwrap();
        assert_eq!(first, format!("n,,n=,r={RFC_CLIENT_NONCE}"));
        let (awaiting, final_msg) = ex
            .respond(server_first.as_bytes(), &Credential::Password(b"pencil"))
            .unwrap();
        assert!(final_msg.starts_with(&format!("c=biws,r={RFC_CLIENT_NONCE}{RFC_SERVER_NONCE},p=")));
        let (server, _) = ServerExchange::start(
            Offer { binding: None },
            SCRAM_SHA_256,
            first.as_bytes(),
            &v.salt,
            4096,
            RFC_SERVER_NONCE,
        )
        .unwrap();
        let proven = server
            .finish(final_msg.as_bytes(), &v.stored_key, &v.server_key)
            .unwrap();
        awaiting.verify(proven.server_final.as_bytes()).unwrap();
    }

    #[test]
    fn verifier_text_round_trip_and_rejects() {
        let v = rfc_verifier();
        let text = v.to_text();
        assert!(text.starts_with("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$"));
        assert_eq!(Verifier::parse(&text), Some(v));
        for bad in [
            "",
            "md5abcdef",
            "SCRAM-SHA-256$0:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:c2FsdA==$AAAA",
            "SCRAM-SHA-256$4096:$AAAA:AAAA",
            "SCRAM-SHA-256$x:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
        ] {
            assert_eq!(Verifier::parse(bad), None, "{bad}");
        }
        assert_eq!(format!("{:?}", rfc_verifier()), "Verifier(..)");
    }

    fn start_server(
        binding: Option<&[u8]>,
        mech: &str,
        first: &str,
    ) -> Result<(ServerExchange, String), ScramError> {
        ServerExchange::start(
            Offer { binding },
            mech,
            first.as_bytes(),
            b"salt",
            4096,
            "SRV",
        )
    }

    #[test]
    fn server_refuses_bad_client_first_messages() {
        let cb: &[u8] = b"certhash";
        let plus = SCRAM_SHA_256_PLUS;
        let plain = SCRAM_SHA_256;
        let cases: &[(Option<&[u8]>, &str, &str, ScramError)] = &[
            (Some(cb), plain, "y,,n=,r=abc", ScramError::Downgrade),
            (Some(cb), plus, "n,,n=,r=abc", ScramError::MechanismMismatch),
            (
                Some(cb),
                plain,
                "p=tls-server-end-point,,n=,r=abc",
                ScramError::MechanismMismatch,
            ),
            (
                None,
                plus,
                "p=tls-server-end-point,,n=,r=abc",
                ScramError::UnsupportedMechanism(plus.into()),
            ),
            (
                Some(cb),
                plus,
                "p=tls-unique,,n=,r=abc",
                ScramError::UnsupportedChannelBinding("tls-unique".into()),
            ),
            (
                None,
                "SCRAM-SHA-1",
                "n,,n=,r=abc",
                ScramError::UnsupportedMechanism("SCRAM-SHA-1".into()),
            ),
            (
                None,
                plain,
                "n,a=admin,n=,r=abc",
                ScramError::AuthzidUnsupported,
            ),
            (
                None,
                plain,
                "n,,m=ext,n=,r=abc",
                ScramError::MandatoryExtension,
            ),
            (
                None,
                plain,
                "n,,r=abc",
                ScramError::Malformed("client-first lacks the user name"),
            ),
            (
                None,
                plain,
                "n,,n=",
                ScramError::Malformed("client-first lacks a valid nonce"),
            ),
            (
                None,
                plain,
                "n,,n=,r=a,b",
                ScramError::Malformed("expected an attribute x=value"),
            ),
            (
                None,
                plain,
                "x,,n=,r=abc",
                ScramError::Malformed("unknown gs2 channel binding flag"),
            ),
            (None, plain, "n", ScramError::Malformed("no gs2 header")),
            (
                None,
                plain,
                "n,",
                ScramError::Malformed("incomplete gs2 header"),
            ),
            (None, plain, "", ScramError::Malformed("no gs2 header")),
        ];
        for (binding, mech, first, want) in cases {
            let got = start_server(*binding, mech, first).map(|_| ()).unwrap_err();
            assert_eq!(&got, want, "{mech} {first}");
        }
        assert_eq!(
            ServerExchange::start(Offer { binding: None }, plain, &[0xff, 0xfe], b"s", 1, "x")
                .map(|_| ())
                .unwrap_err(),
            ScramError::Malformed("not UTF-8")
        );
        // `y` is fine where no binding was offered (a plaintext leg),
        // extensions after the nonce are ignored, and so is the user name
        // (PostgreSQL takes it from the StartupMessage).
        assert!(start_server(None, plain, "y,,n=,r=abc,x=ext").is_ok());
        assert!(start_server(None, plain, "n,,n=someone,r=abc").is_ok());
    }

    /// issue 19 item 18: a client nonce is bounded (256 bytes is far more
    /// than any client sends), and the exchange keeps working at the bound.
    #[test]
    fn client_nonces_are_bounded() {
        let at_limit = "x".repeat(MAX_CLIENT_NONCE);
        let (ex, server_first) =
            start_server(None, SCRAM_SHA_256, &format!("n,,n=,r={at_limit}")).unwrap();
        assert!(server_first.starts_with(&format!("r={at_limit}SRV,")));
        // The nonce check still holds with the one stored copy.
        assert_eq!(
            ex.finish(
                format!("c=biws,r={at_limit}SRX,p=AAAA").as_bytes(),
                &[0; 32],
                &[0; 32]
            )
            .unwrap_err(),
            ScramError::NonceMismatch
        );
        let over = "x".repeat(MAX_CLIENT_NONCE + 1);
        assert_eq!(
            start_server(None, SCRAM_SHA_256, &format!("n,,n=,r={over}"))
                .map(|_| ())
                .unwrap_err(),
            ScramError::Malformed("client nonce longer than 256 bytes")
        );
        let huge = "x".repeat(3900);
        assert!(start_server(None, SCRAM_SHA_256, &format!("n,,n=,r={huge}")).is_err());
    }

    /// A full exchange over a bound channel, with the client-final message
    /// tampered with by `tamper`.
    fn bound_exchange(tamper: impl Fn(String) -> String) -> Result<Proven, ScramError> {
        let v = Verifier::from_password(b"secret", b"salty", 16);
        let cb = b"server-cert-hash".to_vec();
        let (client, first) = ClientExchange::start(
            &[SCRAM_SHA_256_PLUS.into(), SCRAM_SHA_256.into()],
            Some(cb.clone()),
            "cnonce",
        )
        .unwrap();
        assert!(client.channel_bound());
        let (server, server_first) = ServerExchange::start(
            Offer { binding: Some(&cb) },
            client.mechanism,
            first.as_bytes(),
            &v.salt,
            v.iterations,
            "snonce",
        )
        .unwrap();
        let (_, final_msg) = client
            .respond(server_first.as_bytes(), &Credential::Password(b"secret"))
            .unwrap();
        server.finish(tamper(final_msg).as_bytes(), &v.stored_key, &v.server_key)
    }

    #[test]
    fn server_checks_binding_nonce_and_proof() {
        assert!(bound_exchange(|m| m).unwrap().channel_bound);
        // The proof is over the whole message: any change is caught by one
        // check or another.
        let other_binding = BASE64.encode(b"p=tls-server-end-point,,another-cert");
        assert_eq!(
            bound_exchange(|m| {
                let rest = m.split_once(',').unwrap().1.to_owned();
                format!("c={other_binding},{rest}")
            })
            .unwrap_err(),
            ScramError::ChannelBindingMismatch
        );
        assert_eq!(
            bound_exchange(|m| m.replacen("r=cnonce", "r=cnoncX", 1)).unwrap_err(),
            ScramError::NonceMismatch
        );
        assert_eq!(
            bound_exchange(|m| {
                let (head, proof) = m.rsplit_once(",p=").unwrap();
                let mut p = BASE64.decode(proof).unwrap();
                p[0] ^= 1;
                format!("{head},p={}", BASE64.encode(p))
            })
            .unwrap_err(),
            ScramError::InvalidProof
        );
        for (tamper, want) in [
            (
                Box::new(|m: String| m.rsplit_once(",p=").unwrap().0.to_owned())
                    as Box<dyn Fn(String) -> String>,
                "client-final lacks the proof",
            ),
            (
                Box::new(|m: String| format!("{m}AAAA")),
                "the proof is not 32 bytes of base64",
            ),
            (
                Box::new(|m: String| m.replacen("c=", "c=!", 1)),
                "channel binding is not base64",
            ),
            (
                Box::new(|m: String| m.split_once(',').unwrap().1.to_owned()),
                "client-final lacks channel binding",
            ),
        ] {
            assert_eq!(
                bound_exchange(tamper).unwrap_err(),
                ScramError::Malformed(want)
            );
        }
    }

    #[test]
    fn client_checks_server_messages() {
        let v = Verifier::from_password(b"pw", b"salt", 8);
        let start = || {
            ClientExchange::start(&[SCRAM_SHA_256.into()], None, "abc")
                .unwrap()
                .0
        };
        let key = sha256(b"not it");
        let keys = Credential::Keys {
            client_key: &key,
            verifier: &v,
        };
        let salt = BASE64.encode(b"salt");
        for (first, want) in [
            (format!("r=abd,s={salt},i=8"), ScramError::NonceMismatch),
            (format!("r=abc,s={salt},i=8"), ScramError::NonceMismatch),
            (
                format!("m=x,r=abcX,s={salt},i=8"),
                ScramError::MandatoryExtension,
            ),
            (
                "r=abcX,s=,i=8".into(),
                ScramError::Malformed("salt is not base64"),
            ),
            (
                format!("r=abcX,s={salt},i=0"),
                ScramError::Malformed("iteration count is not a positive number"),
            ),
            (
                format!("r=abcX,s={salt}"),
                ScramError::Malformed("server-first lacks the iteration count"),
            ),
            (format!("r=abcX,s={salt},i=9"), ScramError::VerifierMismatch),
            (
                format!("r=abcX,s={},i=8", BASE64.encode(b"other")),
                ScramError::VerifierMismatch,
            ),
        ] {
            assert_eq!(
                start().respond(first.as_bytes(), &keys).unwrap_err(),
                want,
                "{first}"
            );
        }
        assert_eq!(
            start()
                .respond(
                    format!("r=abcX,s={salt},i={}", MAX_ITERATIONS + 1).as_bytes(),
                    &Credential::Password(b"pw")
                )
                .unwrap_err(),
            ScramError::TooManyIterations {
                asked: MAX_ITERATIONS + 1
            }
        );
        let (awaiting, _) = start()
            .respond(format!("r=abcX,s={salt},i=8").as_bytes(), &keys)
            .unwrap();
        assert_eq!(
            awaiting.verify(b"e=invalid-proof").unwrap_err(),
            ScramError::ServerError("invalid-proof".into())
        );
        let (awaiting, _) = start()
            .respond(format!("r=abcX,s={salt},i=8").as_bytes(), &keys)
            .unwrap();
        assert_eq!(
            awaiting
                .verify(format!("v={}", BASE64.encode([0u8; 32])).as_bytes())
                .unwrap_err(),
            ScramError::InvalidServerSignature
        );
    }

    #[test]
    fn client_chooses_mechanism_and_flag_like_libpq() {
        let both: Vec<String> = vec![SCRAM_SHA_256_PLUS.into(), SCRAM_SHA_256.into()];
        let only: Vec<String> = vec![SCRAM_SHA_256.into()];
        let cb = Some(b"h".to_vec());
        let first = |offer: &[String], cb: Option<Vec<u8>>| {
            let (ex, msg) = ClientExchange::start(offer, cb, "n1").unwrap();
            (ex.mechanism, msg)
        };
        assert_eq!(
            first(&both, cb.clone()),
            (SCRAM_SHA_256_PLUS, "p=tls-server-end-point,,n=,r=n1".into())
        );
        assert_eq!(first(&only, cb), (SCRAM_SHA_256, "y,,n=,r=n1".into()));
        assert_eq!(first(&both, None), (SCRAM_SHA_256, "n,,n=,r=n1".into()));
        assert!(matches!(
            ClientExchange::start(&["OAUTHBEARER".into()], None, "n"),
            Err(ScramError::NoScramOffered(_))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// pgbastion's two halves agree: a client with the password, or with
        /// a ClientKey recovered by the server half, always logs in, bound
        /// or not; and the recovered key is the password's.
        #[test]
        fn halves_round_trip(
            password in proptest::collection::vec(any::<u8>(), 0..40),
            salt in proptest::collection::vec(any::<u8>(), 1..32),
            iterations in 1u32..64,
            cnonce in "[!-+--~]{1,40}",
            snonce in "[!-+--~]{1,40}",
            binding in proptest::option::of(proptest::collection::vec(any::<u8>(), 32..=64)),
        ) {
            let v = Verifier::from_password(&password, &salt, iterations);
            let offer = Offer { binding: binding.as_deref() };
            let (client, first) = ClientExchange::start(&offer.mechanisms(), binding.clone(), &cnonce).unwrap();
            prop_assert_eq!(client.channel_bound(), binding.is_some());
            let (server, server_first) = ServerExchange::start(offer, client.mechanism, first.as_bytes(), &v.salt, v.iterations, &snonce).unwrap();
            let (awaiting, final_msg) = client.respond(server_first.as_bytes(), &Credential::Password(&password)).unwrap();
            let proven = server.finish(final_msg.as_bytes(), &v.stored_key, &v.server_key).unwrap();
            prop_assert_eq!(proven.channel_bound, binding.is_some());
            prop_assert_eq!(proven.client_key, hmac(&salted_password(&password, &salt, iterations), b"Client Key"));
            awaiting.verify(proven.server_final.as_bytes()).unwrap();

            // Second leg: the recovered key logs in to another server with
            // the same verifier.
            let (client2, first2) = ClientExchange::start(&offer.mechanisms(), binding.clone(), "leg2").unwrap();
            let (server2, sf2) = ServerExchange::start(offer, client2.mechanism, first2.as_bytes(), &v.salt, v.iterations, "srv2").unwrap();
            let (awaiting2, final2) = client2.respond(sf2.as_bytes(), &Credential::Keys { client_key: &proven.client_key, verifier: &v }).unwrap();
            let proven2 = server2.finish(final2.as_bytes(), &v.stored_key, &v.server_key).unwrap();
            awaiting2.verify(proven2.server_final.as_bytes()).unwrap();
        }

        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..120), mech in "SCRAM-SHA-256(-PLUS)?") {
            let cb = b"cb".to_vec();
            let _ = ServerExchange::start(Offer { binding: Some(&cb) }, &mech, &data, b"s", 1, "n");
            if let Ok((server, _)) = ServerExchange::start(Offer { binding: None }, SCRAM_SHA_256, b"n,,n=,r=abc", b"s", 1, "n") {
                let _ = server.finish(&data, &[0; 32], &[0; 32]);
            }
            let (client, _) = ClientExchange::start(&[SCRAM_SHA_256.into()], None, "abc").unwrap();
            let _ = client.respond(&data, &Credential::Password(b"pw"));
            let _ = Verifier::parse(&String::from_utf8_lossy(&data));
        }
    }
}
