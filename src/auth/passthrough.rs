//! The startup phase as pgbastion watches it, from the StartupMessage to
//! ReadyForQuery: in passthrough mode the whole authentication exchange
//! (the client authenticates to the server end to end; pgbastion only
//! watches), and after a terminated SCRAM login the rest of startup.
//!
//! Messages are framed and forwarded whole in both directions, so pgbastion
//! sees the outcome, stops a client that chose channel binding (which
//! cannot survive a passthrough proxy) with an explanation instead of the
//! server's cryptic error, and replaces the server's BackendKeyData with a
//! cancel key of its own.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::audit::event::{AuthOutcome, EndReason, Mechanism};
use crate::auth::scram::SCRAM_SHA_256_PLUS;
use crate::cancel::{CancelRegistry, CancelTarget, Registration};
use crate::limits::keyed_slots::{KeyedPermit, KeyedSlots};
use crate::protocol::message::{self, tag, AuthRequest, ErrorFields, ErrorResponse, MessageError};
use crate::relay::ByteCounts;

/// The largest message accepted from a client while it authenticates:
/// PostgreSQL's own limit for authentication messages (GSSAPI and SSPI
/// tokens, the largest legitimate ones, are at most 65535 bytes), plus the
/// tag and length. This bounds what an unauthenticated client can make
/// pgbastion buffer.
const MAX_CLIENT_AUTH_MESSAGE: usize = 65_535 + 5;

/// The largest message accepted from the (verified) server before
/// ReadyForQuery: ParameterStatus, notices and errors are small, but a
/// server's GSSAPI token or a long notice may be larger than a client's.
const MAX_SERVER_AUTH_MESSAGE: usize = 1 << 20;

/// How an authentication phase (StartupMessage to ReadyForQuery) ended
/// other than with ReadyForQuery.
#[derive(Debug, thiserror::Error)]
pub enum AuthEnd {
    #[error("the client chose SCRAM-SHA-256-PLUS (channel binding)")]
    ChannelBinding,
    #[error("the server closed the connection during authentication")]
    ServerClosed,
    #[error("the client closed the connection during authentication")]
    ClientClosed,
    #[error("client connection failed during authentication: {0}")]
    ClientIo(io::Error),
    #[error("server connection failed during authentication: {0}")]
    ServerIo(io::Error),
    #[error("invalid message from the {side} during authentication: {error}")]
    Protocol {
        side: &'static str,
        error: MessageError,
    },
    #[error("authentication did not complete within {0:?}")]
    Timeout(Duration),
    #[error("authenticated, but limits.max_sessions ({0}) is reached")]
    TooManySessions(usize),
    /// pgbastion began shutting down: a login holds nothing worth waiting
    /// for, so it ends at once (issue 19 item 17).
    #[error("pgbastion is shutting down")]
    Shutdown,
}

impl AuthEnd {
    /// The session's `end_reason`.
    pub fn reason(&self) -> EndReason {
        match self {
            AuthEnd::ChannelBinding => EndReason::ChannelBindingRefused,
            AuthEnd::ServerClosed => EndReason::ServerClosed,
            AuthEnd::ClientClosed => EndReason::ClientClosed,
            AuthEnd::ClientIo(_) => EndReason::ClientError,
            AuthEnd::ServerIo(_) => EndReason::ServerError,
            AuthEnd::Protocol { .. } => EndReason::ProtocolViolation,
            AuthEnd::Timeout(_) => EndReason::AuthenticationTimeout,
            AuthEnd::TooManySessions(_) => EndReason::TooManySessions,
            AuthEnd::Shutdown => EndReason::Shutdown,
        }
    }

    pub fn client_error(&self) -> Option<ErrorResponse> {
        Some(match self {
            AuthEnd::ChannelBinding => ErrorResponse::new(
                "28000",
                "channel binding (SCRAM-SHA-256-PLUS) cannot work through pgbastion in passthrough mode",
            )
            .with_detail(
                "pgbastion terminates TLS: your client would bind to pgbastion's certificate while the database server binds to its own, so the server would reject the login. Your connection is still protected: the client leg uses TLS, and pgbastion verifies the database server's certificate itself.",
            )
            .with_hint("Connect with channel_binding=disable (in the connection string, or PGCHANNELBINDING=disable), or ask pgbastion's administrator to set auth = \"scram\" for this upstream, which binds both legs."),
            AuthEnd::Protocol { .. } => ErrorResponse::new("08P01", self.to_string()),
            AuthEnd::TooManySessions(_) => ErrorResponse::new("53300", "sorry, too many clients already")
                .with_hint("pgbastion's limits.max_sessions is reached; try again later or raise the limit."),
            AuthEnd::Shutdown => ErrorResponse::new(
                "57P01",
                "terminating connection because pgbastion is shutting down",
            ),
            AuthEnd::Timeout(d) => ErrorResponse::new(
                "08006",
                format!("authentication did not complete within {}", humantime::format_duration(*d)),
            ),
            // The server's own ErrorResponse (if any) was already relayed.
            AuthEnd::ServerClosed | AuthEnd::ServerIo(_) | AuthEnd::ClientClosed | AuthEnd::ClientIo(_) => return None,
        })
    }
}

/// The authentication phase: messages are framed and forwarded whole in
/// both directions, so pgbastion can see the outcome and stop a client that
/// chose channel binding before the server does with a cryptic error.
pub struct AuthPhase {
    pub client_buf: Vec<u8>,
    pub server_buf: Vec<u8>,
    /// The server's last request was AuthenticationSASL, so the client's
    /// next 'p' message is a SASLInitialResponse naming its mechanism.
    expect_sasl_initial: bool,
    /// The client leg is plaintext: channel binding is impossible for the
    /// client, and libpq refuses a server that offers SCRAM-SHA-256-PLUS
    /// over a non-TLS connection, so that mechanism is withdrawn from the
    /// offer. (Over TLS, withdrawing it would make libpq send the gs2 flag
    /// `y`, which the server rejects as a downgrade; see `scan_client`.)
    client_plaintext: bool,
    pub outcome: AuthOutcome,
    /// The SASL mechanism the client chose, when it used SASL.
    pub mechanism: Option<Mechanism>,
    pub counts: ByteCounts,
    cancel: CancelContext,
    /// The session's cancel key mapping; dropped with the session.
    registration: Option<Registration>,
    /// Passthrough: the session's place under `limits.max_sessions`, taken
    /// when the server says AuthenticationOk (before the client sees it),
    /// so logins in progress never take an authenticated session's place.
    pub session_slot: Option<SessionSlot>,
}

/// A place under `limits.max_sessions`, to take (`held`) once the client
/// is authenticated.
pub struct SessionSlot {
    pub slots: KeyedSlots<()>,
    pub limit: usize,
    pub held: Option<KeyedPermit<()>>,
}

/// What the authentication phase needs to issue the session's cancel key.
pub struct CancelContext {
    pub registry: Arc<CancelRegistry>,
    pub session_id: String,
    pub upstream: Arc<crate::upstream::Upstream>,
    pub addr: std::net::SocketAddr,
}

impl AuthPhase {
    pub fn new(client_leftover: Vec<u8>, client_plaintext: bool, cancel: CancelContext) -> Self {
        AuthPhase {
            client_buf: client_leftover,
            server_buf: Vec::with_capacity(1024),
            expect_sasl_initial: false,
            client_plaintext,
            cancel,
            registration: None,
            session_slot: None,
            outcome: AuthOutcome::Incomplete,
            mechanism: None,
            counts: ByteCounts::default(),
        }
    }

    /// The rest of startup after pgbastion has logged the client in
    /// itself (scram mode): whatever either side sent past the login goes
    /// through the same scan (BackendKeyData replaced, up to ReadyForQuery).
    pub fn after_login(
        client_leftover: Vec<u8>,
        server_leftover: Vec<u8>,
        cancel: CancelContext,
    ) -> Self {
        let mut phase = AuthPhase::new(client_leftover, false, cancel);
        phase.server_buf = server_leftover;
        phase.outcome = AuthOutcome::Ok;
        phase
    }

    /// Runs until ReadyForQuery has been forwarded (`Ok`) or the phase ends.
    pub async fn run<C, S>(&mut self, client: &mut C, server: &mut S) -> Result<(), AuthEnd>
    where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    {
        loop {
            let to_server = self.scan_client()?;
            if to_server > 0 {
                server
                    .write_all(&self.client_buf[..to_server])
                    .await
                    .map_err(AuthEnd::ServerIo)?;
                self.client_buf.drain(..to_server);
                self.counts.client_to_server += to_server as u64;
            }
            let (to_client, ready) = self.scan_server()?;
            if to_client > 0 {
                client
                    .write_all(&self.server_buf[..to_client])
                    .await
                    .map_err(AuthEnd::ClientIo)?;
                self.server_buf.drain(..to_client);
                self.counts.server_to_client += to_client as u64;
            }
            if ready {
                // Anything that followed ReadyForQuery (in either direction)
                // belongs to the relay now: pass it on untouched.
                if !self.server_buf.is_empty() {
                    client
                        .write_all(&self.server_buf)
                        .await
                        .map_err(AuthEnd::ClientIo)?;
                    self.counts.server_to_client += self.server_buf.len() as u64;
                }
                if !self.client_buf.is_empty() {
                    server
                        .write_all(&self.client_buf)
                        .await
                        .map_err(AuthEnd::ServerIo)?;
                    self.counts.client_to_server += self.client_buf.len() as u64;
                }
                client.flush().await.map_err(AuthEnd::ClientIo)?;
                server.flush().await.map_err(AuthEnd::ServerIo)?;
                return Ok(());
            }
            client.flush().await.map_err(AuthEnd::ClientIo)?;
            server.flush().await.map_err(AuthEnd::ServerIo)?;
            tokio::select! {
                r = client.read_buf(&mut self.client_buf) => match r {
                    Ok(0) => return Err(AuthEnd::ClientClosed),
                    Err(e) if crate::net::is_close(&e) => return Err(AuthEnd::ClientClosed),
                    Ok(_) => {}
                    Err(e) => return Err(AuthEnd::ClientIo(e)),
                },
                r = server.read_buf(&mut self.server_buf) => match r {
                    Ok(0) => return Err(AuthEnd::ServerClosed),
                    Err(e) if crate::net::is_close(&e) => return Err(AuthEnd::ServerClosed),
                    Ok(_) => {}
                    Err(e) => return Err(AuthEnd::ServerIo(e)),
                },
            }
        }
    }

    /// Returns how many leading bytes of the client buffer are complete
    /// messages that may go to the server.
    fn scan_client(&mut self) -> Result<usize, AuthEnd> {
        let mut at = 0;
        while let Some((t, len)) = message::frame(&self.client_buf[at..], MAX_CLIENT_AUTH_MESSAGE)
            .map_err(|error| AuthEnd::Protocol {
            side: "client",
            error,
        })? {
            if t == tag::PASSWORD && self.expect_sasl_initial {
                self.expect_sasl_initial = false;
                let body = &self.client_buf[at + 5..at + len];
                let mechanism =
                    message::sasl_initial_mechanism(body).map_err(|error| AuthEnd::Protocol {
                        side: "client",
                        error,
                    })?;
                self.mechanism = Some(Mechanism::named(&String::from_utf8_lossy(mechanism)));
                if mechanism == SCRAM_SHA_256_PLUS.as_bytes() {
                    return Err(AuthEnd::ChannelBinding);
                }
            }
            at += len;
        }
        Ok(at)
    }

    /// Returns how many leading bytes of the server buffer are complete
    /// messages, and whether the last of them is ReadyForQuery.
    fn scan_server(&mut self) -> Result<(usize, bool), AuthEnd> {
        let mut at = 0;
        while let Some((t, len)) = message::frame(&self.server_buf[at..], MAX_SERVER_AUTH_MESSAGE)
            .map_err(|error| AuthEnd::Protocol {
            side: "server",
            error,
        })? {
            let body = &self.server_buf[at + 5..at + len];
            let start = at;
            at += len;
            match t {
                tag::AUTHENTICATION => match AuthRequest::parse(body) {
                    Ok(AuthRequest::Ok) => {
                        if let Some(s) = &mut self.session_slot {
                            s.held = Some(
                                s.slots
                                    .try_acquire((), s.limit)
                                    .ok_or(AuthEnd::TooManySessions(s.limit))?,
                            );
                        }
                        self.outcome = AuthOutcome::Ok;
                    }
                    Ok(AuthRequest::Sasl(mut mechanisms)) => {
                        self.expect_sasl_initial = true;
                        if self.client_plaintext
                            && mechanisms.iter().any(|m| m == SCRAM_SHA_256_PLUS)
                        {
                            mechanisms.retain(|m| m != SCRAM_SHA_256_PLUS);
                            let offer = message::authentication_sasl(&mechanisms);
                            at = start + offer.len();
                            self.server_buf.splice(start..start + len, offer);
                        }
                    }
                    Ok(
                        AuthRequest::Other(_)
                        | AuthRequest::Md5Password(_)
                        | AuthRequest::SaslContinue(_)
                        | AuthRequest::SaslFinal(_),
                    ) => {}
                    Err(error) => {
                        return Err(AuthEnd::Protocol {
                            side: "server",
                            error,
                        })
                    }
                },
                tag::ERROR_RESPONSE if self.outcome != AuthOutcome::Ok => {
                    let fields = ErrorFields::parse(body).unwrap_or_default();
                    self.outcome = AuthOutcome::Error {
                        sqlstate: fields.code,
                    };
                }
                tag::BACKEND_KEY_DATA => {
                    // The client gets pgbastion's key, never the server's.
                    let real = message::parse_backend_key_data(body).map_err(|error| {
                        AuthEnd::Protocol {
                            side: "server",
                            error,
                        }
                    })?;
                    let (ours, registration) = self.cancel.registry.register(CancelTarget {
                        session_id: self.cancel.session_id.clone(),
                        upstream: self.cancel.upstream.clone(),
                        addr: self.cancel.addr,
                        real,
                        serving: None,
                    });
                    self.registration = Some(registration);
                    let replacement = message::backend_key_data(&ours);
                    at = start + replacement.len();
                    self.server_buf.splice(start..start + len, replacement);
                }
                tag::READY_FOR_QUERY => return Ok((at, true)),
                _ => {}
            }
        }
        Ok((at, false))
    }
}
