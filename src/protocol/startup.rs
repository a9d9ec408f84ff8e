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
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn packet(code: u32, rest: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(rest);
        with_length_prefix(&body)
    }

    /// Issue 19 item 16: names are cut as PostgreSQL cuts them, and the
    /// forwarded packet carries the cut name.
    #[test]
    fn overlong_user_and_database_are_truncated_on_a_char_boundary() {
        let user = format!("{}é-tail", "u".repeat(62));
        let db = "d".repeat(100);
        let mut rest = b"\0\x03\0\0".to_vec();
        for (k, v) in [
            ("user", user.as_str()),
            ("database", db.as_str()),
            ("options", &"o".repeat(80)),
        ] {
            rest.extend_from_slice(k.as_bytes());
            rest.push(0);
            rest.extend_from_slice(v.as_bytes());
            rest.push(0);
        }
        rest.push(0);
        let StartupPacket::Startup(m) = parse(&with_length_prefix(&rest)).unwrap() else {
            panic!("not a startup message");
        };
        // 62 ASCII bytes, then a 2-byte character that would end at byte 64.
        assert_eq!(m.user(), "u".repeat(62));
        assert_eq!(m.database(), "d".repeat(63));
        assert_eq!(m.param("options").map(str::len), Some(80));
        let StartupPacket::Startup(again) = parse(m.as_bytes()).unwrap() else {
            panic!("not a startup message");
        };
        assert_eq!(again, m);
        // Short names keep the client's bytes exactly.
        let short = StartupMessage::new(
            ProtocolVersion { major: 3, minor: 0 },
            vec![("user".into(), "u".repeat(63))],
        );
        assert_eq!(
            parse(short.as_bytes()).unwrap(),
            StartupPacket::Startup(short.clone())
        );
    }

    #[test]
    fn ssl_and_gssenc_requests() {
        assert_eq!(parse(&ssl_request()), Ok(StartupPacket::SslRequest));
        assert_eq!(
            parse(&packet(GSSENC_REQUEST_CODE, &[])),
            Ok(StartupPacket::GssEncRequest)
        );
        assert_eq!(
            parse(&packet(SSL_REQUEST_CODE, &[0])),
            Err(StartupError::BadRequestLength("SSL"))
        );
    }

    #[test]
    fn length_bounds() {
        assert_eq!(
            packet_len(7u32.to_be_bytes()),
            Err(StartupError::BadLength(7))
        );
        assert_eq!(packet_len(8u32.to_be_bytes()), Ok(8));
        assert_eq!(packet_len(10_000u32.to_be_bytes()), Ok(10_000));
        assert_eq!(
            packet_len(10_001u32.to_be_bytes()),
            Err(StartupError::BadLength(10_001))
        );
        assert_eq!(
            packet_len(u32::MAX.to_be_bytes()),
            Err(StartupError::BadLength(u64::from(u32::MAX)))
        );
        // A length that lies about the bytes that follow.
        let mut p = ssl_request().to_vec();
        p.push(0);
        assert!(matches!(parse(&p), Err(StartupError::Truncated { .. })));
        assert!(matches!(
            parse(&p[..3]),
            Err(StartupError::Truncated { .. })
        ));
    }

    #[test]
    fn cancel_keys_of_protocol_3_0_and_3_2() {
        let short = packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 7, 1, 2, 3, 4]);
        assert_eq!(
            parse(&short),
            Ok(StartupPacket::Cancel(CancelKey {
                process_id: 7,
                secret_key: vec![1, 2, 3, 4]
            }))
        );
        let mut long = vec![0, 0, 0, 9];
        long.extend_from_slice(&[0xab; 256]);
        assert!(matches!(
            parse(&packet(CANCEL_REQUEST_CODE, &long)),
            Ok(StartupPacket::Cancel(c)) if c.secret_key.len() == 256
        ));
        long.push(0);
        assert_eq!(
            parse(&packet(CANCEL_REQUEST_CODE, &long)),
            Err(StartupError::BadCancelKey(257))
        );
        assert_eq!(
            parse(&packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 1, 2, 3])),
            Err(StartupError::BadCancelKey(2))
        );
    }

    #[test]
    fn startup_versions_including_grease() {
        for minor in [0u16, 2, 9999] {
            let msg = StartupMessage::new(
                ProtocolVersion { major: 3, minor },
                vec![
                    ("user".into(), "alice".into()),
                    ("_pq_.test_option".into(), "x".into()),
                ],
            );
            match parse(msg.as_bytes()) {
                Ok(StartupPacket::Startup(m)) => {
                    assert_eq!(m.version.minor, minor);
                    assert_eq!(m.user(), "alice");
                    assert_eq!(m.database(), "alice");
                    assert_eq!(m.as_bytes(), msg.as_bytes());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            parse(&packet(2 << 16, &[0])),
            Err(StartupError::UnsupportedProtocol { major: 2, minor: 0 })
        );
        // An unknown request code in the 1234.x range is refused, not guessed.
        assert!(matches!(
            parse(&packet((1234 << 16) | 5555, &[])),
            Err(StartupError::UnsupportedProtocol { major: 1234, .. })
        ));
    }

    #[test]
    fn with_param_replaces_or_adds() {
        let m = StartupMessage::new(
            ProtocolVersion { major: 3, minor: 0 },
            vec![
                ("user".into(), "u".into()),
                ("application_name".into(), "psql".into()),
            ],
        );
        let changed = m.with_param("application_name", "psql via x");
        assert_eq!(changed.application_name(), Some("psql via x"));
        assert_eq!(changed.user(), "u");
        assert_eq!(
            parse(changed.as_bytes()),
            Ok(StartupPacket::Startup(changed.clone()))
        );
        let added = StartupMessage::new(m.version, vec![("user".into(), "u".into())])
            .with_param("application_name", "a");
        assert_eq!(added.application_name(), Some("a"));
        // Every spelling the client used is replaced by the one value.
        let spelled = StartupMessage::new(
            m.version,
            vec![
                ("PGBastion.Identity".into(), "evil".into()),
                ("user".into(), "u".into()),
                ("pgbastion.identity".into(), "evil too".into()),
            ],
        )
        .with_param("pgbastion.identity", "alice");
        assert_eq!(
            spelled.params,
            vec![
                ("pgbastion.identity".to_owned(), "alice".to_owned()),
                ("user".to_owned(), "u".to_owned()),
            ]
        );
    }

    #[test]
    fn malformed_parameters() {
        let v3 = 3u32 << 16;
        assert_eq!(
            parse(&packet(v3, &[])),
            Err(StartupError::MalformedParameters)
        );
        assert_eq!(
            parse(&packet(v3, b"user\0")),
            Err(StartupError::MalformedParameters)
        );
        assert_eq!(
            parse(&packet(v3, b"user\0bob")),
            Err(StartupError::MalformedParameters)
        );
        assert_eq!(parse(&packet(v3, b"\0")), Err(StartupError::MissingUser));
        assert_eq!(
            parse(&packet(v3, b"user\0a\0user\0b\0\0")),
            Err(StartupError::DuplicateParameter("user".into()))
        );
        assert_eq!(
            parse(&packet(v3, b"user\0\xff\0\0")),
            Err(StartupError::NotUtf8("user".into()))
        );
    }

    proptest! {
        #[test]
        fn startup_round_trip(
            minor in any::<u16>(),
            params in proptest::collection::btree_map("[a-z_.]{1,12}", "[^\u{0}]{0,20}", 0..6),
        ) {
            let mut params: Vec<(String, String)> = params.into_iter().collect();
            params.retain(|(k, _)| k != "user");
            params.push(("user".into(), "u".into()));
            let msg = StartupMessage::new(ProtocolVersion { major: 3, minor }, params);
            if msg.as_bytes().len() <= MAX_PACKET_LEN {
                prop_assert_eq!(parse(msg.as_bytes()), Ok(StartupPacket::Startup(msg)));
            }
        }

        #[test]
        fn cancel_round_trip(pid in any::<u32>(), key in proptest::collection::vec(any::<u8>(), 4..=256)) {
            let req = CancelKey { process_id: pid, secret_key: key };
            prop_assert_eq!(parse(&req.cancel_request()), Ok(StartupPacket::Cancel(req)));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn every_truncation_is_an_error(cut in 0usize..20) {
            let msg = StartupMessage::new(
                ProtocolVersion { major: 3, minor: 0 },
                vec![("user".into(), "alice".into())],
            );
            let bytes = msg.as_bytes();
            let cut = cut.min(bytes.len() - 1);
            prop_assert!(parse(&bytes[..cut]).is_err());
        }
    }
}
