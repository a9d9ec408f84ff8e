//! One client connection, from accept to its last audit event.
//!
//! The steps, each with its own deadline and its own way to fail:
//! 1. `negotiate`: read first packets (SSLRequest, GSSENCRequest, direct
//!    TLS, CancelKey, StartupMessage) and upgrade the client leg to TLS.
//! 2. Admission: the session limit.
//! 3. Upstream: dial and verify (see `upstream`), then forward the
//!    StartupMessage — only now does the server learn anything.
//! 4. `authenticate`: relay message by message until ReadyForQuery,
//!    watching for the outcome and for channel binding.
//! 5. `relay::relay` until either side ends; then `session.end`.
//!
//! A connection whose first packet is a CancelKey takes the short path
//! in `Session::cancel` instead.
//!
//! Every failure is a `SessionError`; `SessionError::client_error` is the one
//! place that decides what the client is told.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::timeout_at;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

use crate::audit::ProxyFacts;
use crate::audit::{
    AuthOutcome, ClientAddress, ClientTransport, Event, Requested, SessionFacts, UpstreamFacts,
};
use crate::cancel::{CancelRegistry, CancelTarget, Registration};
use crate::config::{
    CancelPlaintext, ClientTlsMode, ListenerIdentity, ProxyProtocol, SendProxyProtocol,
};
use crate::identity::{cert, Identity, IdentityError, IdentitySource};
use crate::policy::Request;
use crate::protocol::message::{
    self, tag, AuthRequest, ErrorFields, ErrorResponse, MessageError, SCRAM_PLUS,
};
use crate::protocol::proxy::{self, Addresses, ProxyError, SslInfo};
use crate::protocol::startup::{self, CancelKey, StartupError, StartupMessage, StartupPacket};
use crate::relay::{self, ByteCounts};
use crate::server::{ListenerInfo, Shared};
use crate::stream::{BoxedIo, Prefixed};
use crate::tls::{CertificateProblem, TlsInfo, ALPN_POSTGRESQL};
use crate::upstream::Upstream;
use crate::upstream::UpstreamError;

/// The largest message accepted in either direction while authenticating
/// (GSSAPI tokens are the largest legitimate ones).
const MAX_AUTH_MESSAGE: usize = 1 << 20;

/// How much the negotiation asks the socket for per read.
const FIRST_READ_CHUNK: usize = 1024;

/// How long pgbastion tries to deliver its own ErrorResponse.
const ERROR_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a session was refused or ended early.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("invalid startup packet: {0}")]
    Startup(#[from] StartupError),
    #[error("plaintext StartupMessage on a listener that requires TLS")]
    TlsRequired,
    #[error("client sent bytes after SSLRequest before the TLS handshake")]
    PipelinedAfterSslRequest,
    #[error("unexpected {0}")]
    UnexpectedPacket(&'static str),
    #[error("direct TLS connection without ALPN \"postgresql\"")]
    DirectTlsWithoutAlpn,
    #[error("client started TLS but this listener has no certificate configured")]
    TlsUnavailable,
    #[error("client TLS handshake failed: {0}")]
    ClientTlsHandshake(io::Error),
    #[error("client closed the connection before sending a startup packet")]
    ClientClosedEarly,
    #[error("client connection failed: {0}")]
    ClientIo(io::Error),
    #[error("client did not complete its startup packet within {0:?}")]
    ClientTimeout(Duration),
    #[error("too many sessions (limit {0})")]
    TooManySessions(usize),
    #[error("PROXY protocol header from {0}, which is not in proxy_trusted")]
    ProxyUntrusted(String),
    #[error("invalid PROXY protocol header: {0}")]
    ProxyHeader(ProxyError),
    #[error("no complete PROXY protocol header within {0:?}")]
    ProxyTimeout(Duration),
    #[error("could not establish the client's identity: {0}")]
    Identity(#[from] IdentityError),
    #[error(
        "policy does not allow {identity} to use database {database:?} as user {user:?} ({rule})"
    )]
    PolicyDenied {
        identity: String,
        database: String,
        user: String,
        /// "rule NAME" or "no rule matched".
        rule: String,
    },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("sending the startup packet upstream failed: {0}")]
    UpstreamIo(io::Error),
}

impl SessionError {
    /// A short stable name for the audit log and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            SessionError::Startup(_) => "bad_startup_packet",
            SessionError::TlsRequired => "tls_required",
            SessionError::PipelinedAfterSslRequest => "pipelined_after_sslrequest",
            SessionError::UnexpectedPacket(_) => "unexpected_packet",
            SessionError::DirectTlsWithoutAlpn => "direct_tls_without_alpn",
            SessionError::TlsUnavailable => "tls_unavailable",
            SessionError::ClientTlsHandshake(_) => "client_tls_handshake_failed",
            SessionError::ClientClosedEarly => "client_closed",
            SessionError::ClientIo(_) => "client_io_error",
            SessionError::ClientTimeout(_) => "client_timeout",
            SessionError::TooManySessions(_) => "too_many_sessions",
            SessionError::ProxyUntrusted(_) => "proxy_untrusted_source",
            SessionError::ProxyHeader(_) => "bad_proxy_header",
            SessionError::ProxyTimeout(_) => "proxy_header_timeout",
            SessionError::Identity(_) => "identity_failed",
            SessionError::PolicyDenied { .. } => "policy_denied",
            SessionError::Upstream(e) => match e {
                UpstreamError::Certificate { .. } => "upstream_certificate_untrusted",
                UpstreamError::RefusedTls { .. } | UpstreamError::ErrorBeforeTls { .. } => {
                    "upstream_refused_tls"
                }
                UpstreamError::Resolve { .. } | UpstreamError::Unreachable { .. } => {
                    "upstream_unreachable"
                }
                UpstreamError::TlsTimeout { .. } => "upstream_timeout",
                UpstreamError::Closed { .. }
                | UpstreamError::UnexpectedReply { .. }
                | UpstreamError::Handshake { .. } => "upstream_tls_failed",
            },
            SessionError::UpstreamIo(_) => "upstream_io_error",
        }
    }

    /// What the client is told, or `None` where nothing can be said (no
    /// usable channel, or the client is gone). Messages name the cause and
    /// what to do; upstream addresses stay in pgbastion's own log.
    pub fn client_error(&self) -> Option<ErrorResponse> {
        Some(match self {
            SessionError::Startup(e) => ErrorResponse::new("08P01", format!("invalid startup packet: {e}")),
            SessionError::TlsRequired => ErrorResponse::new("28000", "this server requires TLS")
                .with_hint("Connect with sslmode=verify-full (and sslrootcert set to the CA of pgbastion's certificate) or at least sslmode=require."),
            SessionError::PipelinedAfterSslRequest => ErrorResponse::new(
                "08P01",
                "received unencrypted data after SSLRequest",
            )
            .with_detail("This could be either a client-software bug or evidence of an attempted man-in-the-middle attack."),
            SessionError::UnexpectedPacket(what) => {
                ErrorResponse::new("08P01", format!("protocol violation: unexpected {what}"))
            }
            SessionError::DirectTlsWithoutAlpn => ErrorResponse::new(
                "08P01",
                "direct TLS connection without the ALPN protocol \"postgresql\"",
            )
            .with_hint("Clients using sslnegotiation=direct must offer ALPN \"postgresql\" (libpq 17+ does)."),
            SessionError::ClientTimeout(d) => ErrorResponse::new(
                "08006",
                format!("timed out after {} waiting for the startup packet", humantime::format_duration(*d)),
            ),
            SessionError::TooManySessions(_) => ErrorResponse::new("53300", "sorry, too many clients already")
                .with_hint("pgbastion's limits.max_sessions is reached; try again later or raise the limit."),
            SessionError::Identity(e) => ErrorResponse::new(
                "28000",
                format!("pgbastion could not establish who you are: {e}"),
            )
            .with_hint("pgbastion admits only clients it can identify; see pgbastion's log for this session."),
            SessionError::PolicyDenied { identity, database, user, rule } => ErrorResponse::new(
                "28000",
                format!("pgbastion policy does not allow {identity} to use database \"{database}\" as user \"{user}\""),
            )
            .with_detail(format!("Decided by {rule}."))
            .with_hint("Connect as a database and user the policy allows you, or ask the administrator of pgbastion's policy."),
            SessionError::Upstream(e) => upstream_client_error(e),
            SessionError::UpstreamIo(_) => ErrorResponse::new("08006", "the connection to the database server failed"),
            // Most likely a PostgreSQL client that reached pgbastion without
            // going through the load balancer: tell it.
            SessionError::ProxyHeader(ProxyError::Missing) => ErrorResponse::new(
                "08P01",
                "this listener accepts connections only through a load balancer that sends a PROXY protocol header",
            )
            .with_hint("Connect through the load balancer's address."),
            // A balancer that sends a bad header, or a source that may not
            // send one at all, is not a Postgres client: just close.
            SessionError::ProxyHeader(_) | SessionError::ProxyUntrusted(_) | SessionError::ProxyTimeout(_) => return None,
            SessionError::TlsUnavailable
            | SessionError::ClientTlsHandshake(_)
            | SessionError::ClientClosedEarly
            | SessionError::ClientIo(_) => return None,
        })
    }
}

fn upstream_client_error(e: &UpstreamError) -> ErrorResponse {
    match e {
        UpstreamError::Certificate { problem, .. } => ErrorResponse::new(
            "08001",
            format!("pgbastion did not connect to the database server: its TLS certificate is not trusted: {problem}"),
        )
        .with_detail("pgbastion verifies the database server's certificate (chain and host name) so that no one in between can read or change this session.")
        .with_hint(match problem {
            CertificateProblem::UnknownIssuer => "If the server uses a private CA (RDS, Cloud SQL, Azure, your own), set the upstream's ca_file in pgbastion's configuration to that CA bundle.",
            CertificateProblem::NameMismatch => "Set the upstream's server_name to a name the server's certificate is issued for, or address the upstream by that name.",
            CertificateProblem::Expired => "The database server's certificate has expired and must be renewed (or pgbastion's clock is wrong).",
            CertificateProblem::NotYetValid => "The database server's certificate is not valid yet: check the clocks of the server and of pgbastion.",
            CertificateProblem::Other(_) => "See pgbastion's log for the certificate error.",
        }),
        UpstreamError::RefusedTls { .. } | UpstreamError::ErrorBeforeTls { .. } => ErrorResponse::new(
            "08001",
            "the database server refused TLS, and pgbastion never connects to it without TLS",
        )
        .with_hint("Enable TLS on the database server (ssl = on)."),
        UpstreamError::Resolve { .. } | UpstreamError::Unreachable { .. } => {
            ErrorResponse::new("08001", "pgbastion could not reach the database server")
                .with_hint("Check that the database server is running and reachable from pgbastion; pgbastion's log names the address.")
        }
        UpstreamError::TlsTimeout { .. } => ErrorResponse::new(
            "08001",
            "timed out negotiating TLS with the database server",
        )
        .with_hint("Check that the upstream address points at a PostgreSQL server."),
        UpstreamError::Closed { .. } | UpstreamError::UnexpectedReply { .. } => ErrorResponse::new(
            "08001",
            "the database server closed the connection during TLS negotiation",
        )
        .with_hint("Check that the upstream is a PostgreSQL server with TLS enabled; for direct TLS (PostgreSQL 17+) set tls_negotiation = \"direct\"."),
        UpstreamError::Handshake { reason, .. } => ErrorResponse::new(
            "08001",
            format!("the TLS handshake with the database server failed: {reason}"),
        ),
    }
}

/// How an authentication phase (StartupMessage to ReadyForQuery) ended
/// other than with ReadyForQuery.
#[derive(Debug, thiserror::Error)]
enum AuthEnd {
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
}

impl AuthEnd {
    fn reason(&self) -> &'static str {
        match self {
            AuthEnd::ChannelBinding => "channel_binding_refused",
            AuthEnd::ServerClosed => "server_closed",
            AuthEnd::ClientClosed => "client_closed",
            AuthEnd::ClientIo(_) => "client_error",
            AuthEnd::ServerIo(_) => "server_error",
            AuthEnd::Protocol { .. } => "protocol_violation",
            AuthEnd::Timeout(_) => "authentication_timeout",
        }
    }

    fn client_error(&self) -> Option<ErrorResponse> {
        Some(match self {
            AuthEnd::ChannelBinding => ErrorResponse::new(
                "28000",
                "channel binding (SCRAM-SHA-256-PLUS) cannot work through pgbastion",
            )
            .with_detail(
                "pgbastion terminates TLS: your client would bind to pgbastion's certificate while the database server binds to its own, so the server would reject the login. Your connection is still protected: the client leg uses TLS, and pgbastion verifies the database server's certificate itself.",
            )
            .with_hint("Connect with channel_binding=disable (in the connection string, or PGCHANNELBINDING=disable)."),
            AuthEnd::Protocol { .. } => ErrorResponse::new("08P01", self.to_string()),
            AuthEnd::Timeout(d) => ErrorResponse::new(
                "08006",
                format!("authentication did not complete within {}", humantime::format_duration(*d)),
            ),
            // The server's own ErrorResponse (if any) was already relayed.
            AuthEnd::ServerClosed | AuthEnd::ServerIo(_) | AuthEnd::ClientClosed | AuthEnd::ClientIo(_) => return None,
        })
    }
}

/// What the client's first packets settled.
enum Negotiated {
    Startup(StartupMessage),
    Cancel(CancelKey),
}

/// The client side during negotiation: the stream, bytes read but not yet
/// consumed, and whether TLS is on.
struct ClientConn {
    io: BoxedIo,
    buf: Vec<u8>,
    transport: ClientTransport,
    /// The verified client certificate (leaf), when one was presented.
    peer_cert: Option<Vec<u8>>,
}

impl ClientConn {
    async fn fill(&mut self, n: usize) -> Result<(), SessionError> {
        while self.buf.len() < n {
            // Read generously, not just the bytes needed: whatever arrived
            // with an SSLRequest must be seen to be refused (CVE-2021-23214).
            self.buf.reserve(FIRST_READ_CHUNK.max(n - self.buf.len()));
            let read = self
                .io
                .read_buf(&mut self.buf)
                .await
                .map_err(SessionError::ClientIo)?;
            if read == 0 {
                return Err(SessionError::ClientClosedEarly);
            }
        }
        Ok(())
    }

    fn is_tls(&self) -> bool {
        matches!(self.transport, ClientTransport::Tls(_))
    }

    async fn start_tls(&mut self, acceptor: &TlsAcceptor) -> Result<(), SessionError> {
        // The old stream moves into the TLS stream; a failed handshake
        // leaves nothing usable to write an error to, which is correct.
        let io = std::mem::replace(&mut self.io, Box::new(tokio::io::empty()));
        let tls = acceptor
            .accept(io)
            .await
            .map_err(SessionError::ClientTlsHandshake)?;
        let conn = tls.get_ref().1;
        self.transport = ClientTransport::Tls(TlsInfo::from_connection(conn, conn.server_name()));
        self.peer_cert = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec());
        self.io = Box::new(tls);
        Ok(())
    }

    async fn negotiate(
        &mut self,
        acceptor: Option<&TlsAcceptor>,
        mode: ClientTlsMode,
    ) -> Result<Negotiated, SessionError> {
        let mut gssenc_answered = false;
        loop {
            self.fill(1).await?;
            if self.buf[0] == startup::TLS_HANDSHAKE_RECORD && !self.is_tls() && !gssenc_answered {
                let acceptor = acceptor.ok_or(SessionError::TlsUnavailable)?;
                let prefix = std::mem::take(&mut self.buf);
                let io = std::mem::replace(&mut self.io, Box::new(tokio::io::empty()));
                self.io = Box::new(Prefixed::new(prefix, io));
                self.start_tls(acceptor).await?;
                let ClientTransport::Tls(info) = &self.transport else {
                    return Err(SessionError::TlsUnavailable);
                };
                // Like PostgreSQL: direct TLS must say it is Postgres, so
                // a TLS connection meant for another service on the same
                // port cannot be confused with ours.
                if info.alpn.as_deref().map(str::as_bytes) != Some(ALPN_POSTGRESQL) {
                    return Err(SessionError::DirectTlsWithoutAlpn);
                }
                continue;
            }
            self.fill(4).await?;
            let len = startup::packet_len([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])?;
            self.fill(len).await?;
            let packet = startup::parse(&self.buf[..len])?;
            self.buf.drain(..len);
            match packet {
                StartupPacket::SslRequest => {
                    if self.is_tls() {
                        return Err(SessionError::UnexpectedPacket("SSLRequest inside TLS"));
                    }
                    // CVE-2021-23214: bytes that arrived with the request
                    // were sent before TLS; they must never be read as if
                    // they came through it.
                    if !self.buf.is_empty() {
                        return Err(SessionError::PipelinedAfterSslRequest);
                    }
                    match acceptor {
                        Some(acceptor) => {
                            self.io
                                .write_all(b"S")
                                .await
                                .map_err(SessionError::ClientIo)?;
                            self.start_tls(acceptor).await?;
                        }
                        None => self
                            .io
                            .write_all(b"N")
                            .await
                            .map_err(SessionError::ClientIo)?,
                    }
                }
                StartupPacket::GssEncRequest => {
                    if self.is_tls() || gssenc_answered {
                        return Err(SessionError::UnexpectedPacket("GSSENCRequest"));
                    }
                    gssenc_answered = true;
                    self.io
                        .write_all(b"N")
                        .await
                        .map_err(SessionError::ClientIo)?;
                }
                StartupPacket::Cancel(c) => return Ok(Negotiated::Cancel(c)),
                StartupPacket::Startup(m) => {
                    if !self.is_tls() && mode == ClientTlsMode::Require {
                        return Err(SessionError::TlsRequired);
                    }
                    return Ok(Negotiated::Startup(m));
                }
            }
        }
    }

    /// Best effort: send an ErrorResponse and close.
    async fn send_error(&mut self, err: &ErrorResponse) {
        let _ = tokio::time::timeout(ERROR_WRITE_TIMEOUT, async {
            let _ = self.io.write_all(&err.encode()).await;
            let _ = self.io.shutdown().await;
        })
        .await;
    }
}

/// A random id that ties log lines, audit events and client messages of one
/// session together.
fn new_session_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Runs one accepted connection to completion.
pub(crate) async fn handle(
    io: BoxedIo,
    peer: Option<std::net::SocketAddr>,
    local: Option<std::net::SocketAddr>,
    listener: Arc<ListenerInfo>,
    shared: Arc<Shared>,
    pending: OwnedSemaphorePermit,
) {
    let client = peer.map_or_else(ClientAddress::unix, ClientAddress::tcp);
    let id = new_session_id();
    let span =
        tracing::info_span!("session", id = %id, client = %client, listener = %listener.name);
    let session = Session {
        started: Instant::now(),
        facts: SessionFacts {
            session_id: id,
            listener: listener.name.clone(),
            client,
            client_tls: None,
            requested: None,
            identity: None,
            proxy: None,
            rule: None,
        },
        peer,
        local,
        listener,
        shared,
    };
    session.run(io, pending).instrument(span).await
}

struct Session {
    started: Instant,
    facts: SessionFacts,
    /// The client's address: the socket's peer, or what a PROXY header
    /// says it is.
    peer: Option<std::net::SocketAddr>,
    /// The address the client connected to (likewise).
    local: Option<std::net::SocketAddr>,
    listener: Arc<ListenerInfo>,
    shared: Arc<Shared>,
}

impl Session {
    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn run(mut self, io: BoxedIo, pending: OwnedSemaphorePermit) {
        let mut conn = ClientConn {
            io,
            buf: Vec::new(),
            transport: ClientTransport::Plaintext,
            peer_cert: None,
        };
        if self.listener.proxy_protocol == ProxyProtocol::Required {
            if let Err(e) = self.read_proxy_header(&mut conn).await {
                return self.reject(&mut conn, e).await;
            }
        }
        let t = self.shared.timeouts.clone();
        let deadline = tokio::time::Instant::now() + t.client_startup;
        let negotiated = timeout_at(
            deadline,
            conn.negotiate(self.listener.acceptor.as_ref(), self.listener.client_tls),
        )
        .await
        .unwrap_or(Err(SessionError::ClientTimeout(t.client_startup)));
        self.facts.client_tls = Some(conn.transport.clone());
        drop(pending);
        let startup = match negotiated {
            Ok(Negotiated::Startup(m)) => m,
            Ok(Negotiated::Cancel(c)) => return self.cancel(conn, c).await,
            Err(e) => return self.reject(&mut conn, e).await,
        };
        self.facts.requested = Some(Requested {
            user: startup.user().to_owned(),
            database: startup.database().to_owned(),
            application_name: startup.application_name().map(str::to_owned),
            protocol: startup.version.to_string(),
        });

        // Who is this, and may they? Decided before any upstream is used.
        let identity = match self.identify(conn.peer_cert.as_deref()).await {
            Ok(identity) => identity,
            Err(e) => return self.reject(&mut conn, e.into()).await,
        };
        let upstream = &self.shared.upstreams[self.listener.upstream];
        let decision = self.shared.policy().decide(&Request {
            identity: &identity,
            client_ip: self.peer.map(|p| p.ip()),
            listener: &self.listener.name,
            upstream: &upstream.config.name,
            database: startup.database(),
            user: startup.user(),
            proxy: self.facts.proxy.as_ref().map(|p| &p.tlvs),
        });
        self.facts.rule = decision.rule.clone();
        let identity_text = identity.to_string();
        self.facts.identity = Some(identity);
        if !decision.allowed {
            let err = SessionError::PolicyDenied {
                identity: identity_text,
                database: startup.database().to_owned(),
                user: startup.user().to_owned(),
                rule: decision
                    .rule
                    .map_or_else(|| "no rule matched".to_owned(), |r| format!("rule \"{r}\"")),
            };
            return self.reject(&mut conn, err).await;
        }
        let startup = self.forwarded_startup(startup);

        let Ok(_permit) = self.shared.sessions.clone().try_acquire_owned() else {
            let limit = self.shared.max_sessions;
            return self
                .reject(&mut conn, SessionError::TooManySessions(limit))
                .await;
        };

        let proxy_header = self.outbound_proxy_header(upstream, conn.peer_cert.as_deref());
        let mut up = match upstream
            .connect(t.upstream_connect, t.upstream_tls, proxy_header.as_deref())
            .await
        {
            Ok(up) => up,
            Err(e) => return self.reject(&mut conn, e.into()).await,
        };
        let upstream_facts = UpstreamFacts {
            name: upstream.config.name.clone(),
            addr: up.addr.to_string(),
            tls: up.tls.clone(),
        };
        // Only now, on a verified connection, does the server see anything
        // the client sent.
        if let Err(e) = up.stream.write_all(startup.as_bytes()).await {
            return self.reject(&mut conn, SessionError::UpstreamIo(e)).await;
        }

        let auth_deadline = tokio::time::Instant::now() + t.authentication;
        let mut auth = AuthPhase::new(
            std::mem::take(&mut conn.buf),
            !conn.is_tls(),
            CancelContext {
                registry: self.shared.cancels.clone(),
                session_id: self.facts.session_id.clone(),
                upstream: self.listener.upstream,
                addr: up.addr,
            },
        );
        auth.counts.client_to_server = startup.as_bytes().len() as u64;
        let auth_result = timeout_at(auth_deadline, auth.run(&mut conn.io, &mut up.stream))
            .await
            .unwrap_or(Err(AuthEnd::Timeout(t.authentication)));
        if let Err(AuthEnd::ChannelBinding) = auth_result {
            auth.outcome = AuthOutcome::RefusedByProxy {
                sqlstate: "28000".into(),
            };
        }
        self.shared.audit.emit(&Event::Start {
            facts: &self.facts,
            upstream: &upstream_facts,
            auth: &auth.outcome,
        });
        info!(
            user = %startup.user(),
            database = %startup.database(),
            upstream = %upstream_facts.addr,
            auth = ?auth.outcome,
            "session started"
        );

        let (end_reason, detail, counts) = match auth_result {
            Ok(()) => {
                // The authentication buffers are not needed any more; an
                // idle session should hold as little memory as possible.
                auth.client_buf = Vec::new();
                auth.server_buf = Vec::new();
                let (end, counts) = relay::relay(&mut *conn.io, &mut up.stream).await;
                let detail = match &end {
                    relay::RelayEnd::ClientError(d) | relay::RelayEnd::ServerError(d) => {
                        Some(d.clone())
                    }
                    _ => None,
                };
                (end.as_str(), detail, counts)
            }
            Err(end) => {
                if let Some(err) = end.client_error() {
                    conn.send_error(&err).await;
                }
                let _ = tokio::time::timeout(ERROR_WRITE_TIMEOUT, async {
                    let _ = up.stream.shutdown().await;
                    let _ = conn.io.shutdown().await;
                })
                .await;
                warn!(
                    reason = end.reason(),
                    "session ended during authentication: {end}"
                );
                (end.reason(), Some(end.to_string()), ByteCounts::default())
            }
        };
        let total = ByteCounts {
            client_to_server: auth.counts.client_to_server + counts.client_to_server,
            server_to_client: auth.counts.server_to_client + counts.server_to_client,
        };
        self.shared.audit.emit(&Event::End {
            facts: &self.facts,
            upstream: &upstream_facts,
            auth: &auth.outcome,
            bytes_client_to_server: total.client_to_server,
            bytes_server_to_client: total.server_to_client,
            duration_ms: self.elapsed_ms(),
            end_reason,
            detail: detail.as_deref(),
        });
        info!(
            reason = end_reason,
            bytes_in = total.client_to_server,
            bytes_out = total.server_to_client,
            "session ended"
        );
    }

    /// Reads the load balancer's PROXY header, refusing untrusted sources
    /// before reading a byte. Afterwards the header's source is the client
    /// address everywhere (policy, audit, logs, rate limits).
    async fn read_proxy_header(&mut self, conn: &mut ClientConn) -> Result<(), SessionError> {
        if let Some(peer) = self.peer {
            if !self
                .listener
                .proxy_trusted
                .iter()
                .any(|n| n.contains(&peer.ip()))
            {
                return Err(SessionError::ProxyUntrusted(peer.ip().to_string()));
            }
        }
        let limit = self.shared.timeouts.proxy_header;
        let header = tokio::time::timeout(limit, async {
            loop {
                match proxy::parse(&conn.buf) {
                    // Bytes after the header stay in the buffer for the
                    // Postgres negotiation.
                    Ok(Some((header, len))) => {
                        conn.buf.drain(..len);
                        return Ok(header);
                    }
                    Ok(None) => conn.fill(conn.buf.len() + 1).await?,
                    Err(e) => return Err(SessionError::ProxyHeader(e)),
                }
            }
        })
        .await
        .unwrap_or(Err(SessionError::ProxyTimeout(limit)))?;
        let via = self.facts.client.clone();
        if let Some(src) = header.source() {
            self.peer = Some(src);
            self.facts.client = ClientAddress::tcp(src);
            if let Addresses::Tcp { dst, .. } = header.addresses {
                self.local = Some(dst);
            }
            debug!(client = %self.facts.client, %via, "client address from PROXY header");
        }
        self.facts.proxy = Some(ProxyFacts {
            via,
            version: header.version,
            command: header.command,
            tlvs: header.tlvs,
        });
        Ok(())
    }

    /// The PROXY header for an upstream that wants one: the client's real
    /// address and, in v2, the client leg's TLS facts (SSL TLV with version,
    /// cipher and certificate CN; SNI as AUTHORITY), the session id as
    /// UNIQUE_ID, and pgbastion's identity of the client as JSON in TLV
    /// 0xE4.
    fn outbound_proxy_header(
        &self,
        upstream: &Upstream,
        peer_cert: Option<&[u8]>,
    ) -> Option<Vec<u8>> {
        match upstream.config.send_proxy_protocol {
            SendProxyProtocol::Off => None,
            SendProxyProtocol::V1 => Some(proxy::encode_v1(self.peer, self.local)),
            SendProxyProtocol::V2 => {
                let mut tlvs = vec![(
                    proxy::tlv::UNIQUE_ID,
                    self.facts.session_id.as_bytes().to_vec(),
                )];
                if let Some(ClientTransport::Tls(info)) = &self.facts.client_tls {
                    if let Some(sni) = &info.sni {
                        tlvs.push((proxy::tlv::AUTHORITY, sni.as_bytes().to_vec()));
                    }
                    if let Some(alpn) = &info.alpn {
                        tlvs.push((proxy::tlv::ALPN, alpn.as_bytes().to_vec()));
                    }
                    let cert_flags = if peer_cert.is_some() {
                        proxy::tlv::CLIENT_CERT_CONN | proxy::tlv::CLIENT_CERT_SESS
                    } else {
                        0
                    };
                    let ssl = SslInfo {
                        client: proxy::tlv::CLIENT_SSL | cert_flags,
                        verify: 0,
                        version: Some(info.version.clone()),
                        cipher: Some(info.cipher.clone()),
                        cn: peer_cert.and_then(cert::common_name),
                        ..SslInfo::default()
                    };
                    tlvs.push((proxy::tlv::SSL, proxy::ssl_tlv(&ssl)));
                }
                if let Some(identity) = &self.facts.identity {
                    if let Ok(json) = serde_json::to_vec(identity) {
                        tlvs.push((proxy::tlv::PGBASTION_IDENTITY, json));
                    }
                }
                Some(proxy::encode_v2(self.peer, self.local, &tlvs))
            }
        }
    }

    /// Establishes who the client is, by the listener's identity source.
    async fn identify(&self, peer_cert: Option<&[u8]>) -> Result<Identity, IdentityError> {
        let ip = self.peer.map(|p| p.ip());
        match &self.listener.identity {
            ListenerIdentity::Network => Ok(Identity::network(ip)),
            ListenerIdentity::ClientCert { order, .. } => match peer_cert {
                Some(der) => {
                    let (name, cert_names) = cert::names(der, order)?;
                    Ok(Identity {
                        source: IdentitySource::ClientCert,
                        name,
                        cert_names,
                        ..Identity::network(ip)
                    })
                }
                // `optional` and no certificate: known by address only.
                None => Ok(Identity::network(ip)),
            },
            ListenerIdentity::Tailscale => {
                let peer = self.peer.ok_or(IdentityError::NotTcp)?;
                let whois = self.shared.whois.as_ref().ok_or_else(|| {
                    IdentityError::LocalApiUnreachable {
                        socket: "(none configured)".into(),
                        reason: "no [tailscale] section in the configuration".into(),
                    }
                })?;
                whois.whois(peer).await
            }
        }
    }

    /// The StartupMessage as it goes upstream: unchanged, unless an
    /// application_name template adds the identity (for visibility in
    /// pg_stat_activity and server logs; the client can change it later, so
    /// it is not a security boundary).
    fn forwarded_startup(&self, startup: StartupMessage) -> StartupMessage {
        let (Some(template), Some(identity)) =
            (&self.shared.application_name, &self.facts.identity)
        else {
            return startup;
        };
        let source = match identity.source {
            IdentitySource::Network => "network",
            IdentitySource::ClientCert => "client_cert",
            IdentitySource::Tailscale => "tailscale",
        };
        let value = template
            .replace(
                "{application_name}",
                startup.application_name().unwrap_or(""),
            )
            .replace("{identity}", &identity.name)
            .replace("{node}", identity.node.as_deref().unwrap_or(""))
            .replace("{source}", source)
            .replace("{session_id}", &self.facts.session_id);
        startup.with_param("application_name", &value)
    }

    /// Handles a CancelRequest: honoured only with a key pgbastion issued to
    /// a live session, forwarded to that session's server with the real key.
    /// Like PostgreSQL, the client is told nothing either way.
    async fn cancel(self, conn: ClientConn, req: CancelKey) {
        // The client may close now: nothing more will be said to it.
        drop(conn);
        let client_ip = self.facts.client.addr.parse().ok();
        let (target, outcome, detail) = if !self.shared.cancels.allow(client_ip) {
            (None, "rate_limited", None)
        } else if self.facts.client_tls == Some(ClientTransport::Plaintext)
            && self.listener.cancel_plaintext == CancelPlaintext::Deny
        {
            (None, "plaintext_refused", None)
        } else {
            match self.shared.cancels.lookup(&req) {
                None => (None, "unmatched", None),
                Some(target) => {
                    let upstream = &self.shared.upstreams[target.upstream];
                    match upstream
                        .cancel(
                            target.addr,
                            &target.real,
                            self.shared.timeouts.cancel,
                            self.outbound_proxy_header(upstream, None).as_deref(),
                        )
                        .await
                    {
                        Ok(()) => (Some(target), "forwarded", None),
                        Err(e) => (Some(target), "upstream_failed", Some(e.to_string())),
                    }
                }
            }
        };
        let target_id = target
            .as_ref()
            .map_or("unmatched", |t| t.session_id.as_str());
        info!(target = target_id, outcome, "cancel request");
        self.shared.audit.emit(&Event::Cancel {
            facts: &self.facts,
            target_session_id: target_id,
            outcome,
            detail,
        });
    }

    /// Refuses a session before any upstream was used: tells the client
    /// (when there is a channel), logs, and audits.
    async fn reject(self, conn: &mut ClientConn, err: SessionError) {
        // A connection that closed without sending anything (a port probe,
        // a load balancer's health check) is not worth an audit event.
        if matches!(err, SessionError::ClientClosedEarly)
            && self.facts.requested.is_none()
            && conn.buf.is_empty()
        {
            debug!("connection closed before a startup packet");
            return;
        }
        let response = err.client_error();
        if let Some(resp) = &response {
            conn.send_error(resp).await;
        }
        warn!(reason = err.reason(), "session refused: {err}");
        self.shared.audit.emit(&Event::Rejected {
            facts: &self.facts,
            reason: err.reason(),
            sqlstate: response.as_ref().map(|r| r.code),
            message: err.to_string(),
            duration_ms: self.elapsed_ms(),
        });
    }
}

/// The authentication phase: messages are framed and forwarded whole in
/// both directions, so pgbastion can see the outcome and stop a client that
/// chose channel binding before the server does with a cryptic error.
struct AuthPhase {
    client_buf: Vec<u8>,
    server_buf: Vec<u8>,
    /// The server's last request was AuthenticationSASL, so the client's
    /// next 'p' message is a SASLInitialResponse naming its mechanism.
    expect_sasl_initial: bool,
    /// The client leg is plaintext: channel binding is impossible for the
    /// client, and libpq refuses a server that offers SCRAM-SHA-256-PLUS
    /// over a non-TLS connection, so that mechanism is withdrawn from the
    /// offer. (Over TLS, withdrawing it would make libpq send the gs2 flag
    /// `y`, which the server rejects as a downgrade; see `scan_client`.)
    client_plaintext: bool,
    outcome: AuthOutcome,
    counts: ByteCounts,
    cancel: CancelContext,
    /// The session's cancel key mapping; dropped with the session.
    registration: Option<Registration>,
}

/// What the authentication phase needs to issue the session's cancel key.
struct CancelContext {
    registry: Arc<CancelRegistry>,
    session_id: String,
    upstream: usize,
    addr: std::net::SocketAddr,
}

impl AuthPhase {
    fn new(client_leftover: Vec<u8>, client_plaintext: bool, cancel: CancelContext) -> Self {
        AuthPhase {
            client_buf: client_leftover,
            server_buf: Vec::with_capacity(1024),
            expect_sasl_initial: false,
            client_plaintext,
            cancel,
            registration: None,
            outcome: AuthOutcome::Incomplete,
            counts: ByteCounts::default(),
        }
    }

    /// Runs until ReadyForQuery has been forwarded (`Ok`) or the phase ends.
    async fn run<C, S>(&mut self, client: &mut C, server: &mut S) -> Result<(), AuthEnd>
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
                    Err(e) if relay::is_close(&e) => return Err(AuthEnd::ClientClosed),
                    Ok(_) => {}
                    Err(e) => return Err(AuthEnd::ClientIo(e)),
                },
                r = server.read_buf(&mut self.server_buf) => match r {
                    Ok(0) => return Err(AuthEnd::ServerClosed),
                    Err(e) if relay::is_close(&e) => return Err(AuthEnd::ServerClosed),
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
        while let Some((t, len)) = message::frame(&self.client_buf[at..], MAX_AUTH_MESSAGE)
            .map_err(|error| AuthEnd::Protocol {
                side: "client",
                error,
            })?
        {
            if t == tag::PASSWORD && self.expect_sasl_initial {
                self.expect_sasl_initial = false;
                let body = &self.client_buf[at + 5..at + len];
                let mechanism =
                    message::sasl_initial_mechanism(body).map_err(|error| AuthEnd::Protocol {
                        side: "client",
                        error,
                    })?;
                if mechanism == SCRAM_PLUS.as_bytes() {
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
        while let Some((t, len)) = message::frame(&self.server_buf[at..], MAX_AUTH_MESSAGE)
            .map_err(|error| AuthEnd::Protocol {
                side: "server",
                error,
            })?
        {
            let body = &self.server_buf[at + 5..at + len];
            let start = at;
            at += len;
            match t {
                tag::AUTHENTICATION => match AuthRequest::parse(body) {
                    Ok(AuthRequest::Ok) => self.outcome = AuthOutcome::Ok,
                    Ok(AuthRequest::Sasl(mut mechanisms)) => {
                        self.expect_sasl_initial = true;
                        if self.client_plaintext && mechanisms.iter().any(|m| m == SCRAM_PLUS) {
                            mechanisms.retain(|m| m != SCRAM_PLUS);
                            let offer = message::authentication_sasl(&mechanisms);
                            at = start + offer.len();
                            self.server_buf.splice(start..start + len, offer);
                        }
                    }
                    Ok(AuthRequest::Other(_)) => {}
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
                        upstream: self.cancel.upstream,
                        addr: self.cancel.addr,
                        real,
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
