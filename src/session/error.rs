//! Every way a session can be refused or end early, and the one place
//! that decides what the client is told about it (`client_message`).

use std::io;
use std::time::Duration;

use crate::audit::RejectReason;
use crate::auth::identity_login::IdentityLoginError;
use crate::auth::terminate::AuthError;
use crate::identity::IdentityError;
use crate::pool::PoolError;
use crate::protocol::message::ErrorResponse;
use crate::protocol::proxy::ProxyError;
use crate::protocol::startup::StartupError;
use crate::routing::RouteError;
use crate::tls::CertificateProblem;
use crate::upstream::UpstreamError;

/// Where a rule's `max_sessions` was found reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitScope {
    /// On this instance.
    Instance,
    /// Across the fleet (`[cluster]`).
    Fleet,
}

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
    #[error("{identity} asked for the admin console but is not an administrator")]
    NotAdmin { identity: String },
    #[error("{identity} already has {limit} sessions (rule {rule:?} max_sessions)")]
    IdentityLimit {
        identity: String,
        limit: usize,
        rule: String,
        /// Where the sessions were counted.
        scope: LimitScope,
    },
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
    #[error("the audit log cannot be written and audit.on_failure is \"refuse\"")]
    AuditUnavailable,
    /// pgbastion began shutting down while the client was logging in.
    #[error("pgbastion is shutting down")]
    ShuttingDown,
    /// scram mode: pgbastion authenticating the client or itself.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Identity login: pgbastion logging in with a credential it holds.
    #[error(transparent)]
    IdentityLogin(#[from] IdentityLoginError),
    /// A pooled upstream: no server connection for the login.
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("the server refused the session's startup settings: {message} ({code})")]
    PoolSettings { code: String, message: String },
    #[error("replication connections cannot use a pooled upstream")]
    PoolReplication,
    /// Routing: no upstream for what the client sent, or what it sent
    /// contradicts itself.
    #[error(transparent)]
    Route(#[from] crate::routing::RouteError),
}

impl SessionError {
    /// A short stable name for the audit log and metrics.
    pub fn reason(&self) -> RejectReason {
        match self {
            SessionError::Startup(_) => RejectReason::BadStartupPacket,
            SessionError::TlsRequired => RejectReason::TlsRequired,
            SessionError::PipelinedAfterSslRequest => RejectReason::PipelinedAfterSslRequest,
            SessionError::UnexpectedPacket(_) => RejectReason::UnexpectedPacket,
            SessionError::DirectTlsWithoutAlpn => RejectReason::DirectTlsWithoutAlpn,
            SessionError::TlsUnavailable => RejectReason::TlsUnavailable,
            SessionError::ClientTlsHandshake(_) => RejectReason::ClientTlsHandshakeFailed,
            SessionError::ClientClosedEarly => RejectReason::ClientClosed,
            SessionError::ClientIo(_) => RejectReason::ClientIoError,
            SessionError::ClientTimeout(_) => RejectReason::ClientTimeout,
            SessionError::TooManySessions(_) => RejectReason::TooManySessions,
            SessionError::IdentityLimit { .. } => RejectReason::IdentitySessionLimit,
            SessionError::NotAdmin { .. } => RejectReason::NotAdmin,
            SessionError::ProxyUntrusted(_) => RejectReason::ProxyUntrustedSource,
            SessionError::ProxyHeader(_) => RejectReason::BadProxyHeader,
            SessionError::ProxyTimeout(_) => RejectReason::ProxyHeaderTimeout,
            SessionError::Identity(_) => RejectReason::IdentityFailed,
            SessionError::PolicyDenied { .. } => RejectReason::PolicyDenied,
            SessionError::Upstream(e) => upstream_reason(e),
            SessionError::UpstreamIo(_) => RejectReason::UpstreamIoError,
            SessionError::AuditUnavailable => RejectReason::AuditUnavailable,
            SessionError::ShuttingDown => RejectReason::Shutdown,
            SessionError::Auth(e) => e.reason(),
            SessionError::IdentityLogin(e) => e.reason(),
            SessionError::Pool(PoolError::WaitTimeout { .. }) => RejectReason::PoolWaitTimeout,
            SessionError::Pool(PoolError::Upstream(e)) => upstream_reason(e),
            SessionError::Pool(_) => RejectReason::PoolUnavailable,
            SessionError::PoolSettings { .. } => RejectReason::PoolSettingsRefused,
            SessionError::PoolReplication => RejectReason::PoolReplication,
            SessionError::Route(e) => route_reason(e),
        }
    }

    /// The bytes the client is sent (an ErrorResponse), or `None` where
    /// nothing can be said (no usable channel, or the client is gone).
    pub fn client_message(&self) -> Option<Vec<u8>> {
        match self {
            SessionError::Auth(e) => e.client_message(),
            SessionError::IdentityLogin(e) => e.client_message(),
            other => other.client_error().map(|e| e.encode()),
        }
    }

    /// What the client is told, or `None` where nothing can be said (no
    /// usable channel, or the client is gone). Messages name the cause and
    /// what to do; upstream addresses stay in pgbastion's own log.
    pub fn client_error(&self) -> Option<ErrorResponse> {
        Some(match self {
            // Not a Postgres packet at all (node-postgres' Terminate sent
            // before its StartupMessage, another protocol): PostgreSQL
            // closes without a word and logs "invalid length of startup
            // packet"; an answer would only confuse such a client.
            SessionError::Startup(StartupError::BadLength(_)) => return None,
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
            SessionError::IdentityLimit { identity, limit, rule, scope } => ErrorResponse::new(
                "53300",
                format!(
                    "{identity} already has {limit} sessions open through pgbastion{}, the most rule \"{rule}\" allows",
                    match scope { LimitScope::Fleet => " (across all instances)", LimitScope::Instance => "" }
                ),
            )
            .with_hint("Close a session and try again, or ask pgbastion's administrator to raise max_sessions in that rule."),
            SessionError::NotAdmin { identity } => ErrorResponse::new(
                "28000",
                format!("{identity} may not use the pgbastion admin console"),
            )
            .with_hint("The database name \"pgbastion\" is pgbastion's admin console; it needs a client certificate or tailnet identity that a rule marks admin = true."),
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
            SessionError::Pool(PoolError::Upstream(e)) => upstream_client_error(e),
            SessionError::Pool(e) => e.client_error(),
            SessionError::PoolSettings { code, message } => ErrorResponse::new(
                "22023",
                format!("the database server refused a setting of this session: {message}"),
            )
            .with_detail(format!("SQLSTATE {code} from the server, applying the StartupMessage's parameters and options on a pooled connection.")),
            SessionError::Route(e) => route_client_error(e),
            SessionError::PoolReplication => ErrorResponse::new(
                "0A000",
                "replication connections cannot go through a pooled upstream",
            )
            .with_hint("Connect for replication through an upstream without pool_mode."),
            SessionError::AuditUnavailable => ErrorResponse::new(
                "08004",
                "pgbastion is not accepting sessions: its audit log cannot be written",
            )
            .with_hint("pgbastion admits no session it cannot audit (audit.on_failure = \"refuse\"); try again shortly. Its administrator must check the audit log's destination."),
            SessionError::UpstreamIo(_) => ErrorResponse::new("08006", "the connection to the database server failed"),
            SessionError::ShuttingDown => ErrorResponse::new(
                "57P01",
                "terminating connection because pgbastion is shutting down",
            ),
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
            SessionError::Auth(_) | SessionError::IdentityLogin(_) => return None,
        })
    }
}

/// Why the upstream connection failed, for the audit and metrics.
fn route_reason(e: &RouteError) -> RejectReason {
    match e {
        RouteError::NoRoute { .. } => RejectReason::RouteNone,
        RouteError::EndpointRequired { .. } => RejectReason::RouteEndpointRequired,
        RouteError::EndpointConflict { .. } | RouteError::TwoEndpoints(..) => {
            RejectReason::RouteConflict
        }
        RouteError::BadEndpoint { .. } => RejectReason::RouteBadEndpoint,
    }
}

/// How a client names where it wants to go, for every routing refusal
/// that is about a missing or unknown name (as Neon words it: both
/// fixes, since which one works depends on the client library).
const ROUTE_HINT: &str = "Connect with a host name pgbastion routes (libpq sends the host name as the TLS server name when it is a name, not an IP address), or name the endpoint in options: options=endpoint%3D<id> in a connection URI, options='endpoint=<id>' in a keyword/value string.";

/// What a client is told when it cannot be routed: SQLSTATE 08004 (the
/// server rejected the connection), what it sent, and how to fix it.
fn route_client_error(e: &RouteError) -> ErrorResponse {
    let message = format!("cannot route this connection: {e}");
    match e {
        RouteError::NoRoute { .. } | RouteError::EndpointRequired { .. } => {
            ErrorResponse::new("08004", message).with_hint(ROUTE_HINT)
        }
        RouteError::EndpointConflict { .. } => ErrorResponse::new("08004", message)
            .with_hint("Name one endpoint: remove endpoint= from options, or make it match the host name."),
        RouteError::TwoEndpoints(..) => ErrorResponse::new("08004", message)
            .with_hint("Name one endpoint in options."),
        RouteError::BadEndpoint { .. } => ErrorResponse::new("08004", message).with_hint(
            "An endpoint id is 1 to 63 characters of a-z, 0-9 and -: the first label of a routed host name.",
        ),
    }
}

fn upstream_reason(e: &UpstreamError) -> RejectReason {
    match e {
        UpstreamError::Certificate { .. } => RejectReason::UpstreamCertificateUntrusted,
        UpstreamError::RefusedTls { .. } | UpstreamError::ErrorBeforeTls { .. } => {
            RejectReason::UpstreamRefusedTls
        }
        UpstreamError::Resolve { .. } | UpstreamError::Unreachable { .. } => {
            RejectReason::UpstreamUnreachable
        }
        UpstreamError::TlsTimeout { .. } => RejectReason::UpstreamTimeout,
        UpstreamError::Closed { .. }
        | UpstreamError::UnexpectedReply { .. }
        | UpstreamError::Handshake { .. } => RejectReason::UpstreamTlsFailed,
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
