//! Tagged messages (a type byte, a 4-byte length, a body): the tag bytes,
//! `frame` (where the next message ends), the ErrorResponse pgbastion sends
//! and the error fields it reads, and the messages of the authentication
//! phase in both directions (Authentication*, SASL and password messages,
//! BackendKeyData), plus the few pgbastion sends on its own logins
//! (an extended query and the DataRow of its answer, for auth_query).
//!
//! After authentication the relay copies bytes, and messages are parsed
//! only by the query audit (`audit::query`, which frames them itself and
//! reads ErrorResponse fields with `ErrorFields`) and by the relay for the
//! ErrorResponse it sends when it ends a session.

use thiserror::Error;

use crate::protocol::startup::CancelKey;

pub mod tag {
    //! Message type bytes, by direction.
    /// Backend: an Authentication* request or AuthenticationOk.
    pub const AUTHENTICATION: u8 = b'R';
    /// Backend: ErrorResponse.
    pub const ERROR_RESPONSE: u8 = b'E';
    /// Backend: ReadyForQuery, which ends the startup phase.
    pub const READY_FOR_QUERY: u8 = b'Z';
    /// Backend: BackendKeyData.
    pub const BACKEND_KEY_DATA: u8 = b'K';
    /// Frontend: PasswordMessage, SASLInitialResponse, SASLResponse (the
    /// meaning depends on which Authentication request came before).
    pub const PASSWORD: u8 = b'p';
    /// Frontend: Terminate.
    pub const TERMINATE: u8 = b'X';
    /// Backend: NoticeResponse.
    pub const NOTICE_RESPONSE: u8 = b'N';
    /// Backend: NegotiateProtocolVersion.
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
    /// Backend: DataRow.
    pub const DATA_ROW: u8 = b'D';
    /// Backend: ParameterStatus.
    pub const PARAMETER_STATUS: u8 = b'S';
}

/// Authentication request codes (the first 4 bytes of an 'R' body).
const AUTH_OK: u32 = 0;
const AUTH_SASL: u32 = 10;
const AUTH_SASL_CONTINUE: u32 = 11;
const AUTH_SASL_FINAL: u32 = 12;
const AUTH_MD5: u32 = 5;
const AUTH_CLEARTEXT: u32 = 3;

/// A human name for an authentication request code, for messages that
/// say what a server asked for.
pub fn auth_method_name(code: u32) -> &'static str {
    match code {
        AUTH_OK => "no authentication",
        2 => "Kerberos V5",
        3 => "a cleartext password",
        5 => "an MD5 password",
        7 | 8 => "GSSAPI",
        9 => "SSPI",
        AUTH_SASL..=AUTH_SASL_FINAL => "SASL",
        _ => "an unknown authentication method",
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MessageError {
    #[error("message length {0} is invalid (must be at least 4)")]
    BadLength(u32),
    #[error("message of {len} bytes exceeds the limit of {max} bytes during startup")]
    TooLong { len: usize, max: usize },
    #[error("malformed {0} message")]
    Malformed(&'static str),
}

/// If `buf` starts with a complete message, returns its type byte and its
/// total size (type byte and length included). `Ok(None)` means "read more".
pub fn frame(buf: &[u8], max_len: usize) -> Result<Option<(u8, usize)>, MessageError> {
    let Some(header) = buf.get(..5) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if len < 4 {
        return Err(MessageError::BadLength(len));
    }
    let total = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_add(1))
        .ok_or(MessageError::BadLength(len))?;
    if total > max_len {
        return Err(MessageError::TooLong {
            len: total,
            max: max_len,
        });
    }
    Ok((buf.len() >= total).then_some((header[0], total)))
}

/// Builds a tagged message from a type byte and a body.
pub fn build(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(tag);
    let len = u32::try_from(body.len() + 4).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// An ErrorResponse as pgbastion sends it: always FATAL, since every error
/// pgbastion reports ends the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorResponse {
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ErrorResponse {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        ErrorResponse {
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        self.encode_with_severity("FATAL")
    }

    /// The same with another severity (ERROR: the admin console's errors
    /// end the command, not the connection).
    pub fn encode_with_severity(&self, severity: &str) -> Vec<u8> {
        let mut body = Vec::new();
        let mut field = |t: u8, v: &str| {
            body.push(t);
            // A NUL inside a field would end it early and corrupt the
            // message; messages built here never contain one, but be safe.
            body.extend(v.bytes().filter(|&b| b != 0));
            body.push(0);
        };
        field(b'S', severity);
        field(b'V', severity);
        field(b'C', self.code);
        field(b'M', &self.message);
        if let Some(d) = &self.detail {
            field(b'D', d);
        }
        if let Some(h) = &self.hint {
            field(b'H', h);
        }
        body.push(0);
        build(tag::ERROR_RESPONSE, &body)
    }
}

/// The fields of an ErrorResponse or NoticeResponse that pgbastion reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl ErrorFields {
    /// Parses an ErrorResponse body (after the type byte and length).
    pub fn parse(body: &[u8]) -> Result<Self, MessageError> {
        let mut out = ErrorFields::default();
        let mut rest = body;
        loop {
            let (&t, after) = rest
                .split_first()
                .ok_or(MessageError::Malformed("ErrorResponse"))?;
            if t == 0 {
                return Ok(out);
            }
            let nul = after
                .iter()
                .position(|&b| b == 0)
                .ok_or(MessageError::Malformed("ErrorResponse"))?;
            let value = String::from_utf8_lossy(&after[..nul]).into_owned();
            match t {
                b'V' => out.severity = value,
                b'S' if out.severity.is_empty() => out.severity = value,
                b'C' => out.code = value,
                b'M' => out.message = value,
                _ => {}
            }
            rest = &after[nul + 1..];
        }
    }
}

/// What an 'R' message asks of the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest {
    Ok,
    /// AuthenticationSASL with the mechanisms the server offers.
    Sasl(Vec<String>),
    /// AuthenticationSASLContinue with the server's SASL data.
    SaslContinue(Vec<u8>),
    /// AuthenticationSASLFinal with the server's SASL data.
    SaslFinal(Vec<u8>),
    /// AuthenticationMD5Password with its 4-byte salt.
    Md5Password([u8; 4]),
    /// Any other request (password, GSS, ...): the code is kept for
    /// messages (`auth_method_name`).
    Other(u32),
}

impl AuthRequest {
    pub fn parse(body: &[u8]) -> Result<Self, MessageError> {
        let (code, rest) = body
            .split_first_chunk::<4>()
            .ok_or(MessageError::Malformed("Authentication"))?;
        Ok(match u32::from_be_bytes(*code) {
            AUTH_OK => AuthRequest::Ok,
            AUTH_SASL => {
                let mut mechanisms = Vec::new();
                let mut rest = rest;
                loop {
                    let nul = rest
                        .iter()
                        .position(|&b| b == 0)
                        .ok_or(MessageError::Malformed("AuthenticationSASL"))?;
                    if nul == 0 {
                        break;
                    }
                    mechanisms.push(String::from_utf8_lossy(&rest[..nul]).into_owned());
                    rest = &rest[nul + 1..];
                }
                AuthRequest::Sasl(mechanisms)
            }
            AUTH_SASL_CONTINUE => AuthRequest::SaslContinue(rest.to_vec()),
            AUTH_SASL_FINAL => AuthRequest::SaslFinal(rest.to_vec()),
            AUTH_MD5 => AuthRequest::Md5Password(
                rest.try_into()
                    .map_err(|_| MessageError::Malformed("AuthenticationMD5Password"))?,
            ),
            other => AuthRequest::Other(other),
        })
    }

    /// The request's code, for messages (`auth_method_name`) about
    /// requests pgbastion cannot answer in some mode.
    pub fn code(&self) -> u32 {
        match self {
            AuthRequest::Ok => AUTH_OK,
            AuthRequest::Sasl(_) => AUTH_SASL,
            AuthRequest::SaslContinue(_) => AUTH_SASL_CONTINUE,
            AuthRequest::SaslFinal(_) => AUTH_SASL_FINAL,
            AuthRequest::Md5Password(_) => AUTH_MD5,
            AuthRequest::Other(code) => *code,
        }
    }
}

/// The answer to AuthenticationMD5Password: "md5" and the hex MD5 of the
/// hex MD5 of password and user, salted. Only for a password pgbastion
/// holds, over verified TLS.
pub fn md5_password_message(user: &str, password: &[u8], salt: [u8; 4]) -> Vec<u8> {
    use md5::Digest;
    let inner = hex::encode(
        md5::Md5::new()
            .chain_update(password)
            .chain_update(user.as_bytes())
            .finalize(),
    );
    let outer = hex::encode(
        md5::Md5::new()
            .chain_update(inner.as_bytes())
            .chain_update(salt)
            .finalize(),
    );
    password_message(format!("md5{outer}").as_bytes())
}

/// Builds an AuthenticationSASL message offering `mechanisms`.
pub fn authentication_sasl(mechanisms: &[String]) -> Vec<u8> {
    let mut body = AUTH_SASL.to_be_bytes().to_vec();
    for m in mechanisms {
        body.extend_from_slice(m.as_bytes());
        body.push(0);
    }
    body.push(0);
    build(tag::AUTHENTICATION, &body)
}

/// AuthenticationCleartextPassword.
pub fn authentication_cleartext_password() -> Vec<u8> {
    build(tag::AUTHENTICATION, &AUTH_CLEARTEXT.to_be_bytes())
}

/// AuthenticationOk.
pub fn authentication_ok() -> Vec<u8> {
    build(tag::AUTHENTICATION, &AUTH_OK.to_be_bytes())
}

/// AuthenticationSASLContinue (server-first message) or, with `last`,
/// AuthenticationSASLFinal (server-final message).
pub fn authentication_sasl_data(last: bool, data: &[u8]) -> Vec<u8> {
    let code = if last {
        AUTH_SASL_FINAL
    } else {
        AUTH_SASL_CONTINUE
    };
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(data);
    build(tag::AUTHENTICATION, &body)
}

/// SASLInitialResponse: the chosen mechanism and the client-first message.
pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Vec<u8> {
    let mut body = mechanism.as_bytes().to_vec();
    body.push(0);
    let len = i32::try_from(data.len()).unwrap_or(i32::MAX);
    body.extend_from_slice(&len.to_be_bytes());
    body.extend_from_slice(data);
    build(tag::PASSWORD, &body)
}

/// SASLResponse, or a PasswordMessage: the body as it is (a password
/// message's body must end with a NUL; see `password_message`).
pub fn sasl_response(data: &[u8]) -> Vec<u8> {
    build(tag::PASSWORD, data)
}

/// PasswordMessage (cleartext), NUL-terminated.
pub fn password_message(password: &[u8]) -> Vec<u8> {
    let mut body = password.to_vec();
    body.push(0);
    build(tag::PASSWORD, &body)
}

/// The password of a PasswordMessage body: everything before its NUL,
/// which must be the body's last byte (a SASLInitialResponse, which has
/// bytes after its first NUL, is not a password).
pub fn parse_password(body: &[u8]) -> Result<&[u8], MessageError> {
    match body.iter().position(|b| *b == 0) {
        Some(end) if end + 1 == body.len() => Ok(&body[..end]),
        _ => Err(MessageError::Malformed("PasswordMessage")),
    }
}

/// Parses a SASLInitialResponse body: the mechanism name and the initial
/// response (`None` when the client sent length -1).
pub fn parse_sasl_initial_response(body: &[u8]) -> Result<(&str, Option<&[u8]>), MessageError> {
    let bad = MessageError::Malformed("SASLInitialResponse");
    let mechanism = sasl_initial_mechanism(body)?;
    let rest = &body[mechanism.len() + 1..];
    let (len, data) = rest.split_first_chunk::<4>().ok_or(bad.clone())?;
    let mechanism = std::str::from_utf8(mechanism).map_err(|_| bad.clone())?;
    match i32::from_be_bytes(*len) {
        -1 if data.is_empty() => Ok((mechanism, None)),
        n if usize::try_from(n).ok() == Some(data.len()) => Ok((mechanism, Some(data))),
        _ => Err(bad),
    }
}

/// The frontend messages of one extended-protocol query with text
/// parameters and text results: Parse, Bind, Execute, Sync (unnamed
/// statement and portal).
pub fn extended_query(sql: &str, params: &[&str]) -> Vec<u8> {
    let mut parse = sql.as_bytes().to_vec();
    parse.insert(0, 0);
    parse.push(0);
    parse.extend_from_slice(&0u16.to_be_bytes());
    let mut bind = vec![0, 0];
    bind.extend_from_slice(&0u16.to_be_bytes());
    bind.extend_from_slice(
        &u16::try_from(params.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    for p in params {
        bind.extend_from_slice(&i32::try_from(p.len()).unwrap_or(i32::MAX).to_be_bytes());
        bind.extend_from_slice(p.as_bytes());
    }
    bind.extend_from_slice(&0u16.to_be_bytes());
    let mut out = build(b'P', &parse);
    out.extend(build(b'B', &bind));
    out.extend(build(b'E', &[0, 0, 0, 0, 0]));
    out.extend(build(b'S', &[]));
    out
}

/// Parses a DataRow body into its columns (`None`: SQL NULL).
pub fn parse_data_row(body: &[u8]) -> Result<Vec<Option<&[u8]>>, MessageError> {
    let bad = MessageError::Malformed("DataRow");
    let (count, mut rest) = body.split_first_chunk::<2>().ok_or(bad.clone())?;
    let mut columns = Vec::new();
    for _ in 0..u16::from_be_bytes(*count) {
        let (len, after) = rest.split_first_chunk::<4>().ok_or(bad.clone())?;
        match i32::from_be_bytes(*len) {
            -1 => {
                columns.push(None);
                rest = after;
            }
            n => {
                let n = usize::try_from(n).map_err(|_| bad.clone())?;
                let value = after.get(..n).ok_or(bad.clone())?;
                columns.push(Some(value));
                rest = &after[n..];
            }
        }
    }
    if !rest.is_empty() {
        return Err(bad);
    }
    Ok(columns)
}

/// Parses a BackendKeyData body, with the key length bounded as in a
/// CancelRequest.
pub fn parse_backend_key_data(body: &[u8]) -> Result<CancelKey, MessageError> {
    CancelKey::from_bytes(body).ok_or(MessageError::Malformed("BackendKeyData"))
}

/// Builds a BackendKeyData message.
pub fn backend_key_data(key: &CancelKey) -> Vec<u8> {
    let mut body = key.process_id.to_be_bytes().to_vec();
    body.extend_from_slice(&key.secret_key);
    build(tag::BACKEND_KEY_DATA, &body)
}

/// The mechanism a client chose in its SASLInitialResponse (the 'p' message
/// that follows AuthenticationSASL): a NUL-terminated name first.
pub fn sasl_initial_mechanism(body: &[u8]) -> Result<&[u8], MessageError> {
    let nul = body
        .iter()
        .position(|&b| b == 0)
        .ok_or(MessageError::Malformed("SASLInitialResponse"))?;
    Ok(&body[..nul])
}

#[cfg(test)]
mod tests;
