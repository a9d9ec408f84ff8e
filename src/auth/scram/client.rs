//! The SCRAM client role, toward the database: choosing a mechanism from
//! the server's offer as libpq does, answering its challenge with a
//! password or a recovered ClientKey, and checking that the server knows
//! the verifier.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use subtle::ConstantTimeEq;

use super::{
    attributes, salted_password, utf8, valid_nonce, ChannelBindingFlag, Key, ScramError, Verifier,
    KEY_LEN, MAX_ITERATIONS, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use crate::crypto::{hmac, sha256};

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
