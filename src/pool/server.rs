//! One pooled server connection: dialed and verified like every server
//! leg, logged in by pgbastion itself (with the ClientKey a client of this
//! user proved, or an identity login's credential), and what it holds
//! between its clients: the settings last applied, the prepared
//! statements it has under pgbastion's names, its cancel key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::prepared::ServerStatements;
use super::settings::SessionSettings;
use super::PoolError;
use crate::auth::credentials::{Found, Held};
use crate::auth::identity_login::{self, LoginTarget};
use crate::auth::login;
use crate::auth::scram::{Credential, Key, Verifier};
use crate::auth::wire;
use crate::config::Timeouts;
use crate::protocol::message::{self, tag, ErrorFields};
use crate::protocol::startup::{CancelKey, ProtocolVersion, StartupMessage};
use crate::tls::ClientTlsStream;
use crate::upstream::Upstream;

/// The largest message read while a server connection logs in.
const MAX_LOGIN_MESSAGE: usize = 64 * 1024;

/// How pgbastion logs in to the server for a pool: the latest proof of a
/// client of the pool's user (a pool never logs in for anyone no client
/// proved itself as).
pub(crate) enum ServerLogin {
    /// scram mode: the ClientKey a client revealed, with the verifier it
    /// was checked against (the server must store the same one).
    Keys { client_key: Key, verifier: Verifier },
    /// Identity login: the credential pgbastion holds for the user.
    Identity(Found),
}

/// A logged-in server connection of a pool.
pub(crate) struct ServerConn {
    /// Unique within the process (SHOW SERVERS).
    pub id: u64,
    pub stream: ClientTlsStream<TcpStream>,
    pub addr: SocketAddr,
    /// The server leg's TLS and how pgbastion logged in (the audit).
    pub tls: crate::tls::TlsInfo,
    pub leg: crate::audit::LegAuth,
    /// The server's own cancel key, where a client's cancel goes while
    /// this connection serves it.
    pub key: CancelKey,
    pub created: Instant,
    /// When it was last given back (health checks and idle timeouts).
    pub last_used: Instant,
    /// The pool's generation when opened: RECONNECT retires older ones.
    pub generation: u64,
    /// What of a client it holds between checkouts (the engine's view).
    pub state: ConnState,
    /// Bytes read past the last whole message.
    pub buf: Vec<u8>,
    /// Its place under the upstream's `max_server_connections`.
    pub _total: Option<OwnedSemaphorePermit>,
    /// Its row in `SHOW SERVERS`, removed when it is dropped.
    pub listed: super::registry::Listed,
}

impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConn")
            .field("id", &self.id)
            .field("addr", &self.addr)
            .field("pid", &self.key.process_id)
            .finish_non_exhaustive()
    }
}

/// What a server connection holds for the clients it serves: all the
/// engine reads and changes of it (so the engine is tested without one).
#[derive(Debug)]
pub(crate) struct ConnState {
    /// What the server reported in ParameterStatus, kept current.
    pub params: BTreeMap<String, String>,
    /// The settings last applied for a client; None: not known (a client
    /// changed them in a way pgbastion did not follow), so the next client
    /// gets a full switch.
    pub applied: Option<Arc<SessionSettings>>,
    /// The statements it has under pgbastion's names.
    pub statements: ServerStatements,
    /// SQL that may have dropped some of them ran (see
    /// `Engine::forget_dropped_statements`).
    pub statements_dirty: bool,
}

impl ConnState {
    pub fn new(params: BTreeMap<String, String>, max_prepared: usize) -> Self {
        ConnState {
            params,
            applied: None,
            statements: ServerStatements::new(max_prepared),
            statements_dirty: false,
        }
    }
}

/// Where a new server connection goes and as whom.
pub(crate) struct OpenTarget<'a> {
    pub upstream: &'a Upstream,
    pub database: &'a str,
    pub user: &'a str,
    pub login: &'a ServerLogin,
    pub timeouts: &'a Timeouts,
    pub generation: u64,
    pub max_prepared: usize,
}

fn next_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl ServerConn {
    /// Dials, verifies and logs in; the whole login under the
    /// authentication deadline.
    pub async fn open(
        target: &OpenTarget<'_>,
        total: Option<OwnedSemaphorePermit>,
    ) -> Result<ServerConn, PoolError> {
        let t = target.timeouts;
        let presenting = match target.login {
            ServerLogin::Identity(found) => match &*found.held {
                Held::ClientCert { connector, .. } => Some(connector),
                _ => None,
            },
            ServerLogin::Keys { .. } => None,
        };
        let mut up = target
            .upstream
            .connect_presenting(presenting, t.upstream_connect, t.upstream_tls, None)
            .await?;
        let binding = up
            .server_certificate()
            .and_then(crate::tls::channel_binding::tls_server_end_point);
        let startup = StartupMessage::new(
            ProtocolVersion { major: 3, minor: 0 },
            vec![
                ("user".into(), target.user.into()),
                ("database".into(), target.database.into()),
            ],
        );
        let login = async {
            up.stream
                .write_all(startup.as_bytes())
                .await
                .map_err(PoolError::ServerIo)?;
            let mut buf = Vec::new();
            let leg = log_in(&mut up.stream, &mut buf, target, binding).await?;
            let (key, params) = until_ready(&mut up.stream, &mut buf).await?;
            Ok::<_, PoolError>((key, params, buf, leg))
        };
        let (key, params, buf, leg) = tokio::time::timeout(t.authentication, login)
            .await
            .map_err(|_| PoolError::LoginTimeout(t.authentication))??;
        let now = Instant::now();
        let id = next_id();
        let pool = super::PoolKey {
            endpoint: target.upstream.config.endpoint.clone(),
            database: target.database.to_owned(),
            user: target.user.to_owned(),
        };
        let listed = super::registry::Listed::new(
            id,
            &target.upstream.config.name,
            &pool,
            up.addr,
            key.process_id,
        );
        Ok(ServerConn {
            id,
            listed,
            stream: up.stream,
            addr: up.addr,
            tls: up.tls,
            leg,
            key,
            state: ConnState::new(params, target.max_prepared),
            created: now,
            last_used: now,
            generation: target.generation,
            buf,
            _total: total,
        })
    }

    /// Closes the connection as a client should (Terminate, then TLS
    /// close_notify), off the caller's path: the server logs no broken
    /// connection for every connection a pool retires.
    pub fn close(mut self: Box<Self>) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        tokio::spawn(async move {
            let bye = async {
                let _ = self
                    .stream
                    .write_all(&message::build(tag::TERMINATE, &[]))
                    .await;
                let _ = self.stream.shutdown().await;
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), bye).await;
        });
    }

    /// Whether the connection is still open: a dead one (the server
    /// restarted, an idle timeout on the server, a network drop) reads as
    /// EOF or an error at once; a live idle one has nothing to read. Anything
    /// read (a FATAL before closing) counts as dead too.
    pub fn is_alive(&mut self) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut byte = [0u8; 64];
        let mut rb = ReadBuf::new(&mut byte);
        match Pin::new(&mut self.stream).poll_read(&mut cx, &mut rb) {
            Poll::Pending => true,
            Poll::Ready(Ok(())) | Poll::Ready(Err(_)) => false,
        }
    }
}

/// The login itself, as the pool's credential says.
async fn log_in(
    server: &mut ClientTlsStream<TcpStream>,
    buf: &mut Vec<u8>,
    target: &OpenTarget<'_>,
    binding: Option<Vec<u8>>,
) -> Result<crate::audit::LegAuth, PoolError> {
    let first = login::first_request(server, buf, |_| {}).await?;
    Ok(match target.login {
        ServerLogin::Keys {
            client_key,
            verifier,
        } => {
            let credential = Credential::Keys {
                client_key,
                verifier,
            };
            login::complete(server, buf, target.user, first, binding, &credential).await?
        }
        ServerLogin::Identity(found) => {
            let host = &target.upstream.config.host;
            let to = LoginTarget {
                host,
                port: target.upstream.config.port,
                user: target.user,
            };
            identity_login::log_in(server, buf, first, binding, &to, found)
                .await
                .map_err(|e| PoolError::Login(e.to_string()))?
        }
    })
}

/// After AuthenticationOk: ParameterStatus and BackendKeyData, up to
/// ReadyForQuery.
async fn until_ready(
    server: &mut ClientTlsStream<TcpStream>,
    buf: &mut Vec<u8>,
) -> Result<(CancelKey, BTreeMap<String, String>), PoolError> {
    let mut params = BTreeMap::new();
    let mut key = None;
    loop {
        let (t, body) = wire::read_message(server, buf, MAX_LOGIN_MESSAGE).await?;
        match t {
            tag::READY_FOR_QUERY => break,
            tag::BACKEND_KEY_DATA => {
                key = Some(message::parse_backend_key_data(&body).map_err(wire::WireError::from)?)
            }
            tag::PARAMETER_STATUS => {
                if let Some((name, value)) = parse_parameter_status(&body) {
                    params.insert(name, value);
                }
            }
            tag::ERROR_RESPONSE => {
                let fields = ErrorFields::parse(&body).unwrap_or_default();
                return Err(PoolError::Login(format!(
                    "{} ({})",
                    fields.message, fields.code
                )));
            }
            _ => {}
        }
    }
    let key = key.ok_or(PoolError::Login(
        "the server sent no BackendKeyData".to_owned(),
    ))?;
    Ok((key, params))
}

/// A ParameterStatus body: name and value, NUL-terminated.
pub(crate) fn parse_parameter_status(body: &[u8]) -> Option<(String, String)> {
    let mut parts = body.split(|b| *b == 0);
    let name = std::str::from_utf8(parts.next()?).ok()?;
    let value = std::str::from_utf8(parts.next()?).ok()?;
    Some((name.to_owned(), value.to_owned()))
}

/// A ParameterStatus message.
pub(crate) fn parameter_status(name: &str, value: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(name.len() + value.len() + 2);
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    body.extend_from_slice(value.as_bytes());
    body.push(0);
    message::build(tag::PARAMETER_STATUS, &body)
}
