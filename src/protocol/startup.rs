//! The client's first packets: SSLRequest, GSSENCRequest, CancelRequest and
//! StartupMessage.
//!
//! These packets have no type byte, only a length and a 32-bit code, and they
//! arrive before anything is known about the client, so every length is
//! bounds-checked before a byte is trusted. The bounds (8..=10000) are the
//! ones the Postgres server itself enforces.

use thiserror::Error;

/// Code of an SSLRequest: "may we switch to TLS?".
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// Code of a GSSENCRequest: "may we switch to GSSAPI encryption?".
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// Code of a CancelRequest.
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// The smallest first packet: a length and a code.
pub const MIN_PACKET_LEN: usize = 8;
/// The largest first packet the Postgres server accepts.
pub const MAX_PACKET_LEN: usize = 10_000;
/// First byte of a TLS record carrying a handshake: a client speaking direct
/// TLS (PostgreSQL 17+) sends this instead of a length.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// Cancel keys are 4 bytes in protocol 3.0 and at most 256 bytes in 3.2.
pub const MAX_CANCEL_KEY_LEN: usize = 256;

/// What can be wrong with a first packet. Each one ends the connection with
/// SQLSTATE 08P01 (protocol violation).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StartupError {
    #[error("startup packet length {0} is outside the allowed range 8..=10000")]
    BadLength(u64),
    #[error("startup packet is truncated: the length says {expected} bytes, {got} arrived")]
    Truncated { expected: usize, got: usize },
    #[error("unsupported frontend protocol {major}.{minor}: pgbastion speaks protocol 3")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("{0} request must be exactly 8 bytes")]
    BadRequestLength(&'static str),
    #[error("cancel request key must be 4 to 256 bytes, got {0}")]
    BadCancelKey(usize),
    #[error("startup parameters are not NUL-terminated name/value pairs")]
    MalformedParameters,
    #[error("startup parameter {0:?} is not valid UTF-8")]
    NotUtf8(String),
    #[error("startup parameter {0:?} appears more than once")]
    DuplicateParameter(String),
    #[error("no PostgreSQL user name specified in startup packet")]
    MissingUser,
}

/// Reads the length prefix of a first packet and checks it against the bounds
/// before anything is allocated for the body.
pub fn packet_len(prefix: [u8; 4]) -> Result<usize, StartupError> {
    let len = u32::from_be_bytes(prefix);
    let len_usize = usize::try_from(len).map_err(|_| StartupError::BadLength(u64::from(len)))?;
    if (MIN_PACKET_LEN..=MAX_PACKET_LEN).contains(&len_usize) {
        Ok(len_usize)
    } else {
        Err(StartupError::BadLength(u64::from(len)))
    }
}

/// A protocol version as sent in a StartupMessage: 3.0, 3.2 (PostgreSQL 18),
/// or a "greased" 3.x that the server answers with NegotiateProtocolVersion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolVersion {
    pub major: u16,
    pub minor: u16,
}

impl std::fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// A StartupMessage. The raw bytes are kept so the packet is forwarded exactly
/// as the client sent it (unknown `_pq_.*` options included); the parameters
/// are parsed for identity, policy and the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub version: ProtocolVersion,
    pub params: Vec<(String, String)>,
    raw: Vec<u8>,
}

impl StartupMessage {
    /// Builds a StartupMessage from parameters (used by tests and tools).
    pub fn new(version: ProtocolVersion, params: Vec<(String, String)>) -> Self {
        let mut body = Vec::new();
        body.extend_from_slice(&version.major.to_be_bytes());
        body.extend_from_slice(&version.minor.to_be_bytes());
        for (k, v) in &params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let raw = with_length_prefix(&body);
        StartupMessage {
            version,
            params,
            raw,
        }
    }

    /// The same message with one parameter set: replaced where it was
    /// (every spelling of it: setting names are case-insensitive to
    /// PostgreSQL, so `PGBastion.Identity` is the same setting), added at
    /// the end if absent.
    pub fn with_param(&self, name: &str, value: &str) -> StartupMessage {
        let mut params = Vec::with_capacity(self.params.len() + 1);
        let mut set = false;
        for (k, v) in &self.params {
            if !k.eq_ignore_ascii_case(name) {
                params.push((k.clone(), v.clone()));
            } else if !set {
                params.push((name.to_owned(), value.to_owned()));
                set = true;
            }
        }
        if !set {
            params.push((name.to_owned(), value.to_owned()));
        }
        StartupMessage::new(self.version, params)
    }

    /// The same message without a parameter (every spelling of it).
    pub fn without_param(&self, name: &str) -> StartupMessage {
        let params = self
            .params
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case(name))
            .cloned()
            .collect();
        StartupMessage::new(self.version, params)
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn user(&self) -> &str {
        // `parse` refuses a StartupMessage without a user.
        self.param("user").unwrap_or_default()
    }

    /// The database, which defaults to the user name as in Postgres.
    pub fn database(&self) -> &str {
        self.param("database").unwrap_or_else(|| self.user())
    }

    pub fn application_name(&self) -> Option<&str> {
        self.param("application_name")
    }

    /// The packet as the client sent it, length prefix included.
    pub fn as_bytes(&self) -> &[u8] {
        &self.raw
    }
}

/// A backend's process id and secret key: what BackendKeyData gives a
/// client and a CancelRequest sends back. The key is 4 bytes in protocol 3.0
/// and up to 256 bytes in 3.2 (PostgreSQL 18 sends 32).
#[derive(Clone, PartialEq, Eq)]
pub struct CancelKey {
    pub process_id: u32,
    pub secret_key: Vec<u8>,
}

impl std::fmt::Debug for CancelKey {
    /// The key is a credential for cancelling a query: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelKey")
            .field("process_id", &self.process_id)
            .field(
                "secret_key",
                &format_args!("<{} bytes>", self.secret_key.len()),
            )
            .finish()
    }
}

impl CancelKey {
    /// Reads a process id and a key (what follows the code in a
    /// CancelRequest, and the body of a BackendKeyData), the key bounded to
    /// 4..=256 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<CancelKey> {
        let (pid, key) = bytes.split_first_chunk::<4>()?;
        (4..=MAX_CANCEL_KEY_LEN)
            .contains(&key.len())
            .then(|| CancelKey {
                process_id: u32::from_be_bytes(*pid),
                secret_key: key.to_vec(),
            })
    }

    /// The CancelRequest packet carrying this key.
    pub fn cancel_request(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(8 + self.secret_key.len());
        body.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        body.extend_from_slice(&self.process_id.to_be_bytes());
        body.extend_from_slice(&self.secret_key);
        with_length_prefix(&body)
    }
}

/// One parsed first packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
    Startup(StartupMessage),
}

/// Builds the 8-byte SSLRequest that pgbastion sends to its upstreams.
pub fn ssl_request() -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&8u32.to_be_bytes());
    out[4..].copy_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    out
}

/// Parses one complete first packet, length prefix included.
pub fn parse(packet: &[u8]) -> Result<StartupPacket, StartupError> {
    let prefix: [u8; 4] =
        packet
            .get(..4)
            .and_then(|p| p.try_into().ok())
            .ok_or(StartupError::Truncated {
                expected: MIN_PACKET_LEN,
                got: packet.len(),
            })?;
    let len = packet_len(prefix)?;
    if packet.len() != len {
        return Err(StartupError::Truncated {
            expected: len,
            got: packet.len(),
        });
    }
    // packet_len guarantees at least 8 bytes.
    let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    let rest = &packet[8..];
    match code {
        SSL_REQUEST_CODE => exact_request(rest, "SSL", StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE => exact_request(rest, "GSSENC", StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE => parse_cancel(rest),
        _ => parse_startup(code, rest, packet),
    }
}

fn exact_request(
    rest: &[u8],
    name: &'static str,
    packet: StartupPacket,
) -> Result<StartupPacket, StartupError> {
    if rest.is_empty() {
        Ok(packet)
    } else {
        Err(StartupError::BadRequestLength(name))
    }
}

fn parse_cancel(rest: &[u8]) -> Result<StartupPacket, StartupError> {
    CancelKey::from_bytes(rest)
        .map(StartupPacket::Cancel)
        .ok_or(StartupError::BadCancelKey(rest.len().saturating_sub(4)))
}

fn parse_startup(code: u32, rest: &[u8], packet: &[u8]) -> Result<StartupPacket, StartupError> {
    let version = ProtocolVersion {
        major: (code >> 16) as u16,
        minor: (code & 0xffff) as u16,
    };
    if version.major != 3 {
        return Err(StartupError::UnsupportedProtocol {
            major: version.major,
            minor: version.minor,
        });
    }
    let mut params = parse_params(rest)?;
    if !params.iter().any(|(k, _)| k == "user") {
        return Err(StartupError::MissingUser);
    }
    let mut truncated = false;
    for (k, v) in params.iter_mut() {
        if k == "user" || k == "database" {
            truncated |= truncate_name(v);
        }
    }
    if truncated {
        // Forward what policy checked, so the server has nothing left to
        // truncate and acts on exactly the name the rules saw.
        return Ok(StartupPacket::Startup(StartupMessage::new(version, params)));
    }
    Ok(StartupPacket::Startup(StartupMessage {
        version,
        params,
        raw: packet.to_vec(),
    }))
}

/// PostgreSQL's `NAMEDATALEN`: a name holds at most this many bytes less one.
pub const NAMEDATALEN: usize = 64;

/// Cuts `name` to what PostgreSQL makes of it (at most `NAMEDATALEN - 1`
/// bytes, on a character boundary as its multibyte clipping does), so a
/// rule denying `role_x` also denies `role_x` followed by padding that the
/// server drops. Returns whether anything was cut.
fn truncate_name(name: &mut String) -> bool {
    if name.len() < NAMEDATALEN {
        return false;
    }
    let mut end = NAMEDATALEN - 1;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name.truncate(end);
    true
}

/// Parameters are `name\0value\0` pairs ending with one extra `\0`.
/// Duplicates are refused: a policy must never check one `user` while the
/// server acts on another.
fn parse_params(mut rest: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut params: Vec<(String, String)> = Vec::new();
    loop {
        match rest {
            [0] => return Ok(params),
            [] => return Err(StartupError::MalformedParameters),
            _ => {}
        }
        let (name, after_name) = take_cstr(rest)?;
        let (value, after_value) = take_cstr(after_name)?;
        let name = String::from_utf8(name.to_vec())
            .map_err(|e| StartupError::NotUtf8(String::from_utf8_lossy(e.as_bytes()).into()))?;
        let value =
            String::from_utf8(value.to_vec()).map_err(|_| StartupError::NotUtf8(name.clone()))?;
        if params.iter().any(|(k, _)| *k == name) {
            return Err(StartupError::DuplicateParameter(name));
        }
        params.push((name, value));
        rest = after_value;
    }
}

fn take_cstr(buf: &[u8]) -> Result<(&[u8], &[u8]), StartupError> {
    let nul = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(StartupError::MalformedParameters)?;
    Ok((&buf[..nul], &buf[nul + 1..]))
}

/// Prepends the 4-byte length (which counts itself) to an untagged body.
fn with_length_prefix(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 4);
    // Bodies built here are bounded by MAX_PACKET_LEN in practice; saturate
    // rather than wrap if a caller ever passes something absurd.
    let len = u32::try_from(body.len() + 4).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests;
