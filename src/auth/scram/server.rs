//! The SCRAM server role, toward the client: what pgbastion offers, the
//! client's first message checked against it (mechanism, gs2 flag, nonce),
//! and the client's proof checked against the verifier, which recovers the
//! ClientKey the other leg logs in with.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use subtle::ConstantTimeEq;

use super::{
    attributes, utf8, valid_nonce, ChannelBindingFlag, Key, ScramError, CHANNEL_BINDING_TYPE,
    KEY_LEN, MAX_CLIENT_NONCE, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use crate::crypto::{hmac, sha256};

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
    /// The `v=` message to send back to the client (None: the client sent
    /// its password in cleartext, and expects only AuthenticationOk).
    pub server_final: Option<String>,
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
        let (flag_text, flag, bare) = gs2_header(msg)?;
        check_flag(&flag, plus, offer)?;
        let client_nonce = client_nonce(bare)?;
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
            server_final: Some(format!(
                "v={}",
                BASE64.encode(hmac(server_key, auth_message.as_bytes()))
            )),
            channel_bound: self.flag == ChannelBindingFlag::Bound,
        })
    }
}

/// Splits a client-first message into its gs2 header (`flag "," [authzid]
/// ","`: the flag as sent, and parsed) and the bare message after it.
fn gs2_header(msg: &str) -> Result<(&str, ChannelBindingFlag, &str), ScramError> {
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
    Ok((flag_text, flag, bare))
}

/// The gs2 flag must agree with the mechanism chosen (`plus`: -PLUS), and
/// must not deny an offer of binding that was made.
fn check_flag(flag: &ChannelBindingFlag, plus: bool, offer: Offer<'_>) -> Result<(), ScramError> {
    match (flag, plus) {
        (ChannelBindingFlag::Bound, false) | (ChannelBindingFlag::NotSupported, true) => {
            Err(ScramError::MechanismMismatch)
        }
        (ChannelBindingFlag::ClientOnly, true) => Err(ScramError::MechanismMismatch),
        // PostgreSQL's rule: a client that could bind, talking to a
        // server that offered binding, must not pretend it was not
        // offered (someone in between may have removed it).
        (ChannelBindingFlag::ClientOnly, false) if offer.binding.is_some() => {
            Err(ScramError::Downgrade)
        }
        _ => Ok(()),
    }
}

/// The client nonce of a bare client-first message (`n=<user>,r=<nonce>`,
/// then optional extensions, which are allowed and ignored).
fn client_nonce(bare: &str) -> Result<&str, ScramError> {
    let attrs = attributes(bare)?;
    let mut it = attrs.iter();
    match it.next() {
        Some((b'm', _)) => return Err(ScramError::MandatoryExtension),
        // PostgreSQL takes the user from the StartupMessage and ignores
        // this one (libpq sends it empty); it must be present.
        Some((b'n', _)) => {}
        _ => return Err(ScramError::Malformed("client-first lacks the user name")),
    }
    match it.next() {
        Some((b'r', n)) if n.len() > MAX_CLIENT_NONCE => {
            Err(ScramError::Malformed("client nonce longer than 256 bytes"))
        }
        Some((b'r', n)) if valid_nonce(n) => Ok(n),
        _ => Err(ScramError::Malformed("client-first lacks a valid nonce")),
    }
}
