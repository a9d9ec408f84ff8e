//! A minimal Postgres frontend for SQL over HTTP: it logs in with a
//! cleartext password (sent with the StartupMessage in one write, as the
//! serverless driver pipelines it) and runs statements with the extended
//! protocol, text in and text out, over any byte stream: in pgbastion, one
//! end of an in-memory duplex whose other end runs the normal session
//! (identity, policy, audit, pool).
//!
//! Reads are bounded twice: each message by `Limits::max_message_bytes`,
//! and a statement's rows together by `Limits::max_row_bytes`. A response
//! over the limit leaves the connection mid-statement: the client refuses
//! further use, and the caller cancels with `backend_key` or drops it.

use std::io;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::response::{Field, QueryResult, ServerError};
use crate::auth::wire::{self, WireError};
use crate::protocol::message::{self, tag, AuthRequest, MessageError};
use crate::protocol::startup::{CancelKey, ProtocolVersion, StartupMessage};

/// AuthenticationCleartextPassword's code: already answered by the
/// pipelined PasswordMessage.
const AUTH_CLEARTEXT: u32 = 3;

#[derive(Debug, Error)]
pub enum ClientError {
    /// The server's ErrorResponse, every field kept.
    #[error("{0}")]
    Server(Box<ServerError>),
    #[error("response is too large (max is {0} bytes)")]
    ResponseTooLarge(usize),
    #[error("the server asked for {0}, but SQL over HTTP logs in with a cleartext password only")]
    AuthMethod(&'static str),
    #[error("the connection closed")]
    Closed,
    #[error("{0}")]
    Io(io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the connection was left mid-statement by an earlier error")]
    Broken,
}

impl From<WireError> for ClientError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Closed => ClientError::Closed,
            WireError::Io(e) => ClientError::Io(e),
            WireError::Protocol(e) => ClientError::Protocol(e.to_string()),
        }
    }
}

impl From<MessageError> for ClientError {
    fn from(e: MessageError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}

/// The StartupMessage parameters (see `ConnInfo::startup_params`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupParams {
    pub user: String,
    pub database: String,
    pub options: Option<String>,
    pub application_name: Option<String>,
}

/// Read bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest single message read (a DataRow included).
    pub max_message_bytes: usize,
    /// The rows of one statement together, as held in memory (each
    /// DataRow's bytes plus the vectors that hold its values).
    pub max_row_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 64 << 20,
            max_row_bytes: 10 << 20,
        }
    }
}

/// What a row costs in memory beyond its values' bytes: its vector.
const ROW_OVERHEAD: usize = std::mem::size_of::<Vec<Option<String>>>();
/// And each value: its `Option<String>`.
const VALUE_OVERHEAD: usize = std::mem::size_of::<Option<String>>();

/// The transaction status of the last ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    Idle,
    InTransaction,
    Failed,
}

/// A logged-in connection.
pub struct Client<S> {
    io: S,
    buf: Vec<u8>,
    limits: Limits,
    key: Option<CancelKey>,
    status: TransactionStatus,
    broken: bool,
}

impl<S> std::fmt::Debug for Client<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("key", &self.key)
            .field("status", &self.status)
            .field("broken", &self.broken)
            .finish()
    }
}

/// The StartupMessage (protocol 3.0, `client_encoding` UTF8 so text comes
/// back as UTF-8) followed by the PasswordMessage, as one buffer.
pub fn login_bytes(params: &StartupParams, password: &[u8]) -> Vec<u8> {
    let mut pairs = vec![
        ("user".to_owned(), params.user.clone()),
        ("database".to_owned(), params.database.clone()),
        ("client_encoding".to_owned(), "UTF8".to_owned()),
    ];
    if let Some(o) = &params.options {
        pairs.push(("options".to_owned(), o.clone()));
    }
    if let Some(a) = &params.application_name {
        pairs.push(("application_name".to_owned(), a.clone()));
    }
    let version = ProtocolVersion { major: 3, minor: 0 };
    let mut out = StartupMessage::new(version, pairs).as_bytes().to_vec();
    out.extend(message::password_message(password));
    out
}

/// Logs in: sends the StartupMessage and the password together, then reads
/// to the first ReadyForQuery.
pub async fn connect<S>(
    mut io: S,
    params: &StartupParams,
    password: &[u8],
    limits: Limits,
) -> Result<Client<S>, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    wire::send(&mut io, &login_bytes(params, password)).await?;
    let mut client = Client {
        io,
        buf: Vec::new(),
        limits,
        key: None,
        status: TransactionStatus::Idle,
        broken: false,
    };
    loop {
        let (t, body) = client.read().await?;
        match t {
            tag::AUTHENTICATION => match AuthRequest::parse(&body)? {
                AuthRequest::Ok => {}
                AuthRequest::Other(AUTH_CLEARTEXT) => {}
                other => {
                    return Err(ClientError::AuthMethod(message::auth_method_name(
                        other.code(),
                    )))
                }
            },
            tag::BACKEND_KEY_DATA => client.key = Some(message::parse_backend_key_data(&body)?),
            tag::ERROR_RESPONSE => return Err(server_error(&body)?),
            tag::READY_FOR_QUERY => {
                client.status = ready_status(&body)?;
                return Ok(client);
            }
            tag::PARAMETER_STATUS | tag::NOTICE_RESPONSE | tag::NEGOTIATE_PROTOCOL_VERSION => {}
            other => return Err(unexpected(other, "login")),
        }
    }
}

impl<S> Client<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// The key for a CancelRequest (`CancelKey::cancel_request`), if the
    /// server sent one.
    pub fn backend_key(&self) -> Option<&CancelKey> {
        self.key.as_ref()
    }

    pub fn transaction_status(&self) -> TransactionStatus {
        self.status
    }

    /// Runs one statement: Parse, Bind (text parameters, `None` is NULL;
    /// text results), Describe, Execute (all rows), Sync, and reads to
    /// ReadyForQuery. A server error is returned after ReadyForQuery, so
    /// the connection stays usable (a failed transaction shows in
    /// `transaction_status`).
    pub async fn query(
        &mut self,
        text: &str,
        params: &[Option<String>],
    ) -> Result<QueryResult, ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        let bytes = extended_query(text, params)?;
        self.send(&bytes).await?;
        let read = self.read_result().await;
        self.settle(read)
    }

    /// A statement's answer up to ReadyForQuery.
    async fn read_result(&mut self) -> Result<QueryResult, ClientError> {
        let mut result = QueryResult::default();
        let mut error = None;
        let mut row_bytes = 0usize;
        loop {
            let (t, body) = self.read().await?;
            match t {
                b'T' => result.fields = parse_row_description(&body)?,
                tag::DATA_ROW => {
                    let row = parse_row(&body)?;
                    // What the row takes in memory, not only on the wire:
                    // a million empty rows or NULLs are small messages
                    // but not small vectors.
                    let held = body.len() + ROW_OVERHEAD + VALUE_OVERHEAD * row.len();
                    row_bytes = row_bytes.saturating_add(held);
                    if row_bytes > self.limits.max_row_bytes {
                        return Err(ClientError::ResponseTooLarge(self.limits.max_row_bytes));
                    }
                    result.rows.push(row);
                }
                b'C' => result.command_tag = Some(cstring(&body, "CommandComplete")?),
                tag::ERROR_RESPONSE => error = Some(server_error(&body)?),
                tag::READY_FOR_QUERY => {
                    self.status = ready_status(&body)?;
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(result),
                    };
                }
                // ParseComplete, BindComplete, NoData, EmptyQueryResponse,
                // PortalSuspended, and what may come at any time.
                b'1'
                | b'2'
                | b'n'
                | b'I'
                | b's'
                | b'A'
                | tag::NOTICE_RESPONSE
                | tag::PARAMETER_STATUS => {}
                other => return Err(unexpected(other, "a query")),
            }
        }
    }

    /// Runs a statement with the simple query protocol (BEGIN, COMMIT,
    /// ROLLBACK; rows are not kept) and returns its last command tag.
    pub async fn simple(&mut self, sql: &str) -> Result<Option<String>, ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        let body = nul_terminated(sql)?;
        self.send(&message::build(b'Q', &body)).await?;
        let read = self.read_simple().await;
        self.settle(read)
    }

    /// A simple query's answer up to ReadyForQuery: its last command tag.
    async fn read_simple(&mut self) -> Result<Option<String>, ClientError> {
        let mut error = None;
        let mut command_tag = None;
        loop {
            let (t, body) = self.read().await?;
            match t {
                b'C' => command_tag = Some(cstring(&body, "CommandComplete")?),
                tag::ERROR_RESPONSE => error = Some(server_error(&body)?),
                tag::READY_FOR_QUERY => {
                    self.status = ready_status(&body)?;
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(command_tag),
                    };
                }
                b'T'
                | tag::DATA_ROW
                | b'I'
                | b'A'
                | tag::NOTICE_RESPONSE
                | tag::PARAMETER_STATUS => {}
                other => return Err(unexpected(other, "a simple query")),
            }
        }
    }

    /// After an answer was read: any failure but the server's own
    /// ErrorResponse (which comes before ReadyForQuery) leaves the stream
    /// somewhere in the middle of a message sequence, so nothing more may
    /// be sent on it.
    fn settle<T>(&mut self, read: Result<T, ClientError>) -> Result<T, ClientError> {
        if matches!(&read, Err(e) if !matches!(e, ClientError::Server(_))) {
            self.broken = true;
        }
        read
    }

    /// Sends Terminate and closes the write side.
    pub async fn terminate(mut self) -> Result<(), ClientError> {
        self.send(&message::build(tag::TERMINATE, &[])).await?;
        self.io.shutdown().await.map_err(ClientError::Io)
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        let sent = wire::send(&mut self.io, bytes).await;
        if sent.is_err() {
            self.broken = true;
        }
        Ok(sent?)
    }

    async fn read(&mut self) -> Result<(u8, Vec<u8>), ClientError> {
        let max = self.limits.max_message_bytes;
        match wire::read_message(&mut self.io, &mut self.buf, max).await {
            Ok(m) => Ok(m),
            Err(e) => {
                self.broken = true;
                Err(match e {
                    WireError::Protocol(MessageError::TooLong { .. }) => {
                        ClientError::ResponseTooLarge(max)
                    }
                    e => e.into(),
                })
            }
        }
    }
}

fn server_error(body: &[u8]) -> Result<ClientError, ClientError> {
    Ok(ClientError::Server(Box::new(ServerError::parse(body)?)))
}

fn unexpected(t: u8, during: &str) -> ClientError {
    ClientError::Protocol(format!(
        "unexpected message {:?} during {during}",
        char::from(t)
    ))
}

fn ready_status(body: &[u8]) -> Result<TransactionStatus, ClientError> {
    match body {
        b"I" => Ok(TransactionStatus::Idle),
        b"T" => Ok(TransactionStatus::InTransaction),
        b"E" => Ok(TransactionStatus::Failed),
        _ => Err(MessageError::Malformed("ReadyForQuery").into()),
    }
}

fn nul_terminated(s: &str) -> Result<Vec<u8>, ClientError> {
    if s.contains('\0') {
        return Err(ClientError::Protocol(
            "a statement cannot contain a NUL character".to_owned(),
        ));
    }
    let mut out = Vec::with_capacity(s.len() + 1);
    out.extend_from_slice(s.as_bytes());
    out.push(0);
    Ok(out)
}

/// Parse, Bind, Describe (portal), Execute, Sync for the unnamed statement
/// and portal, all parameters and results in text.
pub fn extended_query(text: &str, params: &[Option<String>]) -> Result<Vec<u8>, ClientError> {
    let count = u16::try_from(params.len())
        .map_err(|_| ClientError::Protocol("more than 65535 parameters".to_owned()))?;
    let mut parse = vec![0];
    parse.extend(nul_terminated(text)?);
    parse.extend_from_slice(&0u16.to_be_bytes());
    let mut bind = vec![0, 0, 0, 0];
    bind.extend_from_slice(&count.to_be_bytes());
    for p in params {
        match p {
            None => bind.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(p) => {
                let len = i32::try_from(p.len())
                    .map_err(|_| ClientError::Protocol("a parameter is too long".to_owned()))?;
                bind.extend_from_slice(&len.to_be_bytes());
                bind.extend_from_slice(p.as_bytes());
            }
        }
    }
    bind.extend_from_slice(&0u16.to_be_bytes());
    let mut out = message::build(b'P', &parse);
    out.extend(message::build(b'B', &bind));
    out.extend(message::build(b'D', b"P\0"));
    out.extend(message::build(b'E', &[0, 0, 0, 0, 0]));
    out.extend(message::build(b'S', &[]));
    Ok(out)
}

fn cstring(body: &[u8], what: &'static str) -> Result<String, ClientError> {
    let nul = body
        .iter()
        .position(|&b| b == 0)
        .ok_or(MessageError::Malformed(what))?;
    Ok(String::from_utf8_lossy(&body[..nul]).into_owned())
}

/// A RowDescription body: the columns.
pub fn parse_row_description(body: &[u8]) -> Result<Vec<Field>, MessageError> {
    let bad = MessageError::Malformed("RowDescription");
    let (count, mut rest) = body.split_first_chunk::<2>().ok_or(bad.clone())?;
    let mut fields = Vec::new();
    for _ in 0..u16::from_be_bytes(*count) {
        let nul = rest.iter().position(|&b| b == 0).ok_or(bad.clone())?;
        let name = String::from_utf8_lossy(&rest[..nul]).into_owned();
        let (fixed, after) = rest[nul + 1..]
            .split_first_chunk::<18>()
            .ok_or(bad.clone())?;
        let u32_at =
            |i: usize| u32::from_be_bytes([fixed[i], fixed[i + 1], fixed[i + 2], fixed[i + 3]]);
        let i16_at = |i: usize| i16::from_be_bytes([fixed[i], fixed[i + 1]]);
        fields.push(Field {
            name,
            table_oid: u32_at(0),
            column_id: i16_at(4),
            type_oid: u32_at(6),
            type_size: i16_at(10),
            type_modifier: i32::from_be_bytes([fixed[12], fixed[13], fixed[14], fixed[15]]),
        });
        rest = after;
    }
    if !rest.is_empty() {
        return Err(bad);
    }
    Ok(fields)
}

/// A DataRow of text values (the session asked for UTF-8).
fn parse_row(body: &[u8]) -> Result<Vec<Option<String>>, ClientError> {
    message::parse_data_row(body)?
        .into_iter()
        .map(|v| {
            v.map(|v| {
                String::from_utf8(v.to_vec())
                    .map_err(|_| ClientError::Protocol("a value is not valid UTF-8".to_owned()))
            })
            .transpose()
        })
        .collect()
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
