//! The outcomes the audit log, the metrics and the console share: why a
//! session was refused or ended, what became of a cancel or a statement,
//! and how each leg authenticated. Each is an enum with one name per
//! variant (`as_str`, the same name serde writes), so other modules match
//! on variants and never compare strings.
//!
//! A leaf: it imports nothing of the crate, so `auth` (which fills in
//! `LegAuth` and `AuthOutcome`) and `config` (which names credential
//! kinds) can use it without pointing back up at the audit log.

use serde::Serialize;

/// Writes the enum's audit name.
macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}

display_as_str!(
    RejectReason,
    EndReason,
    CancelOutcome,
    QueryOutcome,
    QueryProtocol,
    CopyDirection,
    CredentialKind,
    Mechanism,
    LoginMode
);

/// Why a session was refused before it started (`session.rejected`'s
/// `reason`, and the `reason` label of `pgbastion_rejections`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    // Negotiation.
    BadStartupPacket,
    TlsRequired,
    #[serde(rename = "pipelined_after_sslrequest")]
    PipelinedAfterSslRequest,
    UnexpectedPacket,
    DirectTlsWithoutAlpn,
    TlsUnavailable,
    ClientTlsHandshakeFailed,
    ClientClosed,
    ClientIoError,
    ClientError,
    ClientTimeout,
    // PROXY header.
    ProxyUntrustedSource,
    BadProxyHeader,
    ProxyHeaderTimeout,
    // Admission.
    TooManySessions,
    IdentitySessionLimit,
    NotAdmin,
    IdentityFailed,
    PolicyDenied,
    AuditUnavailable,
    Shutdown,
    // The upstream connection.
    UpstreamCertificateUntrusted,
    UpstreamRefusedTls,
    UpstreamUnreachable,
    UpstreamTimeout,
    UpstreamTlsFailed,
    UpstreamIoError,
    // scram mode.
    AuthThrottled,
    VerifierUnavailable,
    VerifierNotScram,
    ScramProtocolViolation,
    AuthFailed,
    VerifierStale,
    UpstreamAuthUnsupported,
    UpstreamAuthUnproven,
    UpstreamRefused,
    UpstreamLoginFailed,
    AuthenticationTimeout,
    // Identity login.
    IdentityLoginWithoutIdentity,
    NoCredential,
    CredentialExpired,
    CredentialUnavailable,
    CredentialUnsupported,
    CredentialRefused,
}

impl RejectReason {
    pub const ALL: [RejectReason; 44] = {
        use RejectReason::*;
        [
            BadStartupPacket,
            TlsRequired,
            PipelinedAfterSslRequest,
            UnexpectedPacket,
            DirectTlsWithoutAlpn,
            TlsUnavailable,
            ClientTlsHandshakeFailed,
            ClientClosed,
            ClientIoError,
            ClientError,
            ClientTimeout,
            ProxyUntrustedSource,
            BadProxyHeader,
            ProxyHeaderTimeout,
            TooManySessions,
            IdentitySessionLimit,
            NotAdmin,
            IdentityFailed,
            PolicyDenied,
            AuditUnavailable,
            Shutdown,
            UpstreamCertificateUntrusted,
            UpstreamRefusedTls,
            UpstreamUnreachable,
            UpstreamTimeout,
            UpstreamTlsFailed,
            UpstreamIoError,
            AuthThrottled,
            VerifierUnavailable,
            VerifierNotScram,
            ScramProtocolViolation,
            AuthFailed,
            VerifierStale,
            UpstreamAuthUnsupported,
            UpstreamAuthUnproven,
            UpstreamRefused,
            UpstreamLoginFailed,
            AuthenticationTimeout,
            IdentityLoginWithoutIdentity,
            NoCredential,
            CredentialExpired,
            CredentialUnavailable,
            CredentialUnsupported,
            CredentialRefused,
        ]
    };

    pub fn as_str(self) -> &'static str {
        use RejectReason::*;
        match self {
            BadStartupPacket => "bad_startup_packet",
            TlsRequired => "tls_required",
            PipelinedAfterSslRequest => "pipelined_after_sslrequest",
            UnexpectedPacket => "unexpected_packet",
            DirectTlsWithoutAlpn => "direct_tls_without_alpn",
            TlsUnavailable => "tls_unavailable",
            ClientTlsHandshakeFailed => "client_tls_handshake_failed",
            ClientClosed => "client_closed",
            ClientIoError => "client_io_error",
            ClientError => "client_error",
            ClientTimeout => "client_timeout",
            ProxyUntrustedSource => "proxy_untrusted_source",
            BadProxyHeader => "bad_proxy_header",
            ProxyHeaderTimeout => "proxy_header_timeout",
            TooManySessions => "too_many_sessions",
            IdentitySessionLimit => "identity_session_limit",
            NotAdmin => "not_admin",
            IdentityFailed => "identity_failed",
            PolicyDenied => "policy_denied",
            AuditUnavailable => "audit_unavailable",
            Shutdown => "shutdown",
            UpstreamCertificateUntrusted => "upstream_certificate_untrusted",
            UpstreamRefusedTls => "upstream_refused_tls",
            UpstreamUnreachable => "upstream_unreachable",
            UpstreamTimeout => "upstream_timeout",
            UpstreamTlsFailed => "upstream_tls_failed",
            UpstreamIoError => "upstream_io_error",
            AuthThrottled => "auth_throttled",
            VerifierUnavailable => "verifier_unavailable",
            VerifierNotScram => "verifier_not_scram",
            ScramProtocolViolation => "scram_protocol_violation",
            AuthFailed => "auth_failed",
            VerifierStale => "verifier_stale",
            UpstreamAuthUnsupported => "upstream_auth_unsupported",
            UpstreamAuthUnproven => "upstream_auth_unproven",
            UpstreamRefused => "upstream_refused",
            UpstreamLoginFailed => "upstream_login_failed",
            AuthenticationTimeout => "authentication_timeout",
            IdentityLoginWithoutIdentity => "identity_login_without_identity",
            NoCredential => "no_credential",
            CredentialExpired => "credential_expired",
            CredentialUnavailable => "credential_unavailable",
            CredentialUnsupported => "credential_unsupported",
            CredentialRefused => "credential_refused",
        }
    }
}

/// Why a session that started ended (`session.end`'s `end_reason`, and the
/// `outcome` label of `pgbastion_sessions`): how the relay ended, or how
/// the authentication phase did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    ClientClosed,
    ServerClosed,
    ClientError,
    ServerError,
    /// pgbastion shut down.
    Shutdown,
    /// An administrator ended the session (`KILL`).
    Killed,
    /// A statement could not be audited under `audit.on_failure = "refuse"`.
    AuditUnavailable,
    /// Passthrough: the client chose SCRAM-SHA-256-PLUS.
    ChannelBindingRefused,
    ProtocolViolation,
    AuthenticationTimeout,
    TooManySessions,
}

impl EndReason {
    pub const ALL: [EndReason; 11] = {
        use EndReason::*;
        [
            ClientClosed,
            ServerClosed,
            ClientError,
            ServerError,
            Shutdown,
            Killed,
            AuditUnavailable,
            ChannelBindingRefused,
            ProtocolViolation,
            AuthenticationTimeout,
            TooManySessions,
        ]
    };

    pub fn as_str(self) -> &'static str {
        use EndReason::*;
        match self {
            ClientClosed => "client_closed",
            ServerClosed => "server_closed",
            ClientError => "client_error",
            ServerError => "server_error",
            Shutdown => "shutdown",
            Killed => "killed",
            AuditUnavailable => "audit_unavailable",
            ChannelBindingRefused => "channel_binding_refused",
            ProtocolViolation => "protocol_violation",
            AuthenticationTimeout => "authentication_timeout",
            TooManySessions => "too_many_sessions",
        }
    }
}

/// What became of a CancelRequest (`session.cancel`'s `outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelOutcome {
    /// Sent to the session's server, from this instance.
    Forwarded,
    /// Sent to the server of a session of another instance (`[cluster]`).
    ForwardedRemote,
    /// No live session has that key.
    Unmatched,
    /// Not known here, and Redis could not be asked.
    ClusterUnavailable,
    RateLimited,
    /// A plaintext cancel on a listener with `cancel_plaintext = "deny"`.
    PlaintextRefused,
    /// Matched, but the server could not be reached.
    UpstreamFailed,
}

impl CancelOutcome {
    pub const ALL: [CancelOutcome; 7] = {
        use CancelOutcome::*;
        [
            Forwarded,
            ForwardedRemote,
            Unmatched,
            ClusterUnavailable,
            RateLimited,
            PlaintextRefused,
            UpstreamFailed,
        ]
    };

    pub fn as_str(self) -> &'static str {
        use CancelOutcome::*;
        match self {
            Forwarded => "forwarded",
            ForwardedRemote => "forwarded_remote",
            Unmatched => "unmatched",
            ClusterUnavailable => "cluster_unavailable",
            RateLimited => "rate_limited",
            PlaintextRefused => "plaintext_refused",
            UpstreamFailed => "upstream_failed",
        }
    }

    /// The cancel reached a server: always logged and audited (the other
    /// outcomes are what a stranger can flood, so they are rate-limited).
    pub fn is_forwarded(self) -> bool {
        matches!(
            self,
            CancelOutcome::Forwarded | CancelOutcome::ForwardedRemote
        )
    }
}

/// How a statement ended (`query`'s `outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryOutcome {
    Ok,
    Error,
    /// Skipped by the server after an earlier error in the same pipeline.
    NotExecuted,
    /// The portal's row limit was reached.
    Suspended,
    /// Forwarded to the server, but the session ended before its answer
    /// came: it may or may not have run.
    Unanswered,
}

impl QueryOutcome {
    pub const ALL: [QueryOutcome; 5] = {
        use QueryOutcome::*;
        [Ok, Error, NotExecuted, Suspended, Unanswered]
    };

    pub fn as_str(self) -> &'static str {
        match self {
            QueryOutcome::Ok => "ok",
            QueryOutcome::Error => "error",
            QueryOutcome::NotExecuted => "not_executed",
            QueryOutcome::Suspended => "suspended",
            QueryOutcome::Unanswered => "unanswered",
        }
    }
}

/// The protocol a statement came by (`query`'s `protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryProtocol {
    Simple,
    Extended,
    FunctionCall,
    /// A replication connection's commands.
    Replication,
}

impl QueryProtocol {
    pub const ALL: [QueryProtocol; 4] = [
        QueryProtocol::Simple,
        QueryProtocol::Extended,
        QueryProtocol::FunctionCall,
        QueryProtocol::Replication,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            QueryProtocol::Simple => "simple",
            QueryProtocol::Extended => "extended",
            QueryProtocol::FunctionCall => "function_call",
            QueryProtocol::Replication => "replication",
        }
    }
}

/// Which way a COPY statement moved data (`query`'s `copy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyDirection {
    /// COPY FROM STDIN (CopyInResponse).
    In,
    /// COPY TO STDOUT (CopyOutResponse).
    Out,
    /// Replication streaming (CopyBothResponse).
    Both,
}

impl CopyDirection {
    pub const ALL: [CopyDirection; 3] =
        [CopyDirection::In, CopyDirection::Out, CopyDirection::Both];

    pub fn as_str(self) -> &'static str {
        match self {
            CopyDirection::In => "in",
            CopyDirection::Out => "out",
            CopyDirection::Both => "both",
        }
    }
}

/// The kind of credential an identity login used (`auth.credential`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    Password,
    ScramSecret,
    ClientCert,
    RdsIam,
}

impl CredentialKind {
    pub const ALL: [CredentialKind; 4] = [
        CredentialKind::Password,
        CredentialKind::ScramSecret,
        CredentialKind::ClientCert,
        CredentialKind::RdsIam,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Password => "password",
            CredentialKind::ScramSecret => "scram_secret",
            CredentialKind::ClientCert => "client_cert",
            CredentialKind::RdsIam => "rds_iam",
        }
    }
}

/// How one leg authenticated (`auth.client.mechanism`,
/// `auth.server.mechanism`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Mechanism {
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// Bound to the leg's TLS channel.
    #[serde(rename = "SCRAM-SHA-256-PLUS")]
    ScramSha256Plus,
    /// A cleartext password pgbastion holds, over verified TLS.
    #[serde(rename = "password")]
    Password,
    /// An MD5 answer from a password pgbastion holds, over verified TLS.
    #[serde(rename = "md5")]
    Md5,
    /// A role certificate on the TLS handshake.
    #[serde(rename = "cert")]
    Cert,
    /// The server asked for nothing.
    #[serde(rename = "none")]
    Trust,
    /// Passthrough: a SASL mechanism the client named that is none of the
    /// above (the server refuses it), recorded as named.
    #[serde(untagged)]
    Other(String),
}

impl Mechanism {
    /// The mechanism a SASL exchange named.
    pub fn named(name: &str) -> Mechanism {
        match name {
            "SCRAM-SHA-256" => Mechanism::ScramSha256,
            "SCRAM-SHA-256-PLUS" => Mechanism::ScramSha256Plus,
            other => Mechanism::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::ScramSha256Plus => "SCRAM-SHA-256-PLUS",
            Mechanism::Password => "password",
            Mechanism::Md5 => "md5",
            Mechanism::Cert => "cert",
            Mechanism::Trust => "none",
            Mechanism::Other(name) => name,
        }
    }
}

/// How one leg authenticated, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LegAuth {
    pub mechanism: Mechanism,
    pub channel_binding: bool,
}

/// What the server said about authentication.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AuthOutcome {
    /// The server sent AuthenticationOk.
    Ok,
    /// The server sent an ErrorResponse before AuthenticationOk.
    Error { sqlstate: String },
    /// pgbastion ended the exchange (e.g. channel binding was chosen).
    RefusedByProxy { sqlstate: String },
    /// Neither happened: the connection ended or timed out first.
    Incomplete,
}

impl AuthOutcome {
    /// The `result` the audit log and the metrics name it by.
    pub fn as_str(&self) -> &'static str {
        match self {
            AuthOutcome::Ok => "ok",
            AuthOutcome::Error { .. } => "error",
            AuthOutcome::RefusedByProxy { .. } => "refused_by_proxy",
            AuthOutcome::Incomplete => "incomplete",
        }
    }
}

/// Who authenticated the client: the server (passthrough), pgbastion with
/// SCRAM (scram), or nobody but the identity (identity login).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LoginMode {
    Passthrough,
    Scram,
    Identity,
}

impl LoginMode {
    pub const ALL: [LoginMode; 3] = [
        LoginMode::Passthrough,
        LoginMode::Scram,
        LoginMode::Identity,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LoginMode::Passthrough => "passthrough",
            LoginMode::Scram => "scram",
            LoginMode::Identity => "identity",
        }
    }
}

/// How a session authenticated: the mode, what the server said, and for
/// each leg the SASL mechanism and whether it was bound to its TLS channel.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AuthFacts {
    pub mode: LoginMode,
    /// Identity login: the kind of credential pgbastion logged in with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialKind>,
    #[serde(flatten)]
    pub outcome: AuthOutcome,
    /// Client to pgbastion (scram) or client to server (passthrough).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<LegAuth>,
    /// pgbastion to server (scram mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<LegAuth>,
}

impl AuthFacts {
    /// `mode`: the upstream's (`config::AuthMode` converts).
    pub fn new(mode: impl Into<LoginMode>) -> AuthFacts {
        AuthFacts {
            mode: mode.into(),
            credential: None,
            outcome: AuthOutcome::Incomplete,
            client: None,
            server: None,
        }
    }
}

#[cfg(test)]
mod tests;
