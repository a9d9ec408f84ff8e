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

/// An outcome enum whose variants each have one name, written once: the
/// enum, `ALL` (every variant, in order), `as_str`, `Display` and the serde
/// form (the name as a string) all come from the same list, so they cannot
/// disagree.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident = $text:literal,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            /// Every variant, in the order declared.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The name the audit log, the metrics and the console use.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

/// Writes the name of an enum with data (`as_str`).
macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}

display_as_str!(Mechanism);

named_enum! {
    /// Why a session was refused before it started (`session.rejected`'s
    /// `reason`, and the `reason` label of `pgbastion_rejections`).
    pub enum RejectReason {
        // Negotiation.
        BadStartupPacket = "bad_startup_packet",
        TlsRequired = "tls_required",
        PipelinedAfterSslRequest = "pipelined_after_sslrequest",
        UnexpectedPacket = "unexpected_packet",
        DirectTlsWithoutAlpn = "direct_tls_without_alpn",
        TlsUnavailable = "tls_unavailable",
        ClientTlsHandshakeFailed = "client_tls_handshake_failed",
        ClientClosed = "client_closed",
        ClientIoError = "client_io_error",
        ClientError = "client_error",
        ClientTimeout = "client_timeout",
        // PROXY header.
        ProxyUntrustedSource = "proxy_untrusted_source",
        BadProxyHeader = "bad_proxy_header",
        ProxyHeaderTimeout = "proxy_header_timeout",
        // Admission.
        TooManySessions = "too_many_sessions",
        IdentitySessionLimit = "identity_session_limit",
        NotAdmin = "not_admin",
        IdentityFailed = "identity_failed",
        PolicyDenied = "policy_denied",
        AuditUnavailable = "audit_unavailable",
        Shutdown = "shutdown",
        // The upstream connection.
        UpstreamCertificateUntrusted = "upstream_certificate_untrusted",
        UpstreamRefusedTls = "upstream_refused_tls",
        UpstreamUnreachable = "upstream_unreachable",
        UpstreamTimeout = "upstream_timeout",
        UpstreamTlsFailed = "upstream_tls_failed",
        UpstreamIoError = "upstream_io_error",
        // scram mode.
        AuthThrottled = "auth_throttled",
        VerifierUnavailable = "verifier_unavailable",
        VerifierNotScram = "verifier_not_scram",
        ScramProtocolViolation = "scram_protocol_violation",
        AuthFailed = "auth_failed",
        VerifierStale = "verifier_stale",
        UpstreamAuthUnsupported = "upstream_auth_unsupported",
        UpstreamAuthUnproven = "upstream_auth_unproven",
        UpstreamRefused = "upstream_refused",
        UpstreamLoginFailed = "upstream_login_failed",
        AuthenticationTimeout = "authentication_timeout",
        // Identity login.
        IdentityLoginWithoutIdentity = "identity_login_without_identity",
        NoCredential = "no_credential",
        CredentialExpired = "credential_expired",
        CredentialUnavailable = "credential_unavailable",
        CredentialUnsupported = "credential_unsupported",
        CredentialRefused = "credential_refused",
        // Pooled upstreams.
        PoolWaitTimeout = "pool_wait_timeout",
        PoolUnavailable = "pool_unavailable",
        PoolSettingsRefused = "pool_settings_refused",
        PoolReplication = "pool_replication",
        // Routing (issue 22).
        RouteNone = "route_none",
        RouteConflict = "route_conflict",
        RouteBadEndpoint = "route_bad_endpoint",
        RouteEndpointRequired = "route_endpoint_required",
    }
}

named_enum! {
    /// Why a pooled client was pinned to its server connection for the rest
    /// of its session (`session.pinned`'s `reason`, and the `reason` label of
    /// `pgbastion_pool_pins`): it made state on that connection that
    /// pgbastion cannot carry to another one.
    pub enum PinReason {
        Listen = "listen",
        SqlPrepare = "sql_prepare",
        AdvisoryLock = "advisory_lock",
        TempObject = "temp_object",
        HoldCursor = "cursor_with_hold",
        SetRole = "set_role",
        SessionAuthorization = "session_authorization",
        Load = "load",
        /// A `DO` block: code the server runs, which pgbastion cannot see
        /// into (it may leave any state behind).
        DoBlock = "do_block",
        /// A FunctionCall message (the protocol's fast-path call).
        FunctionCall = "function_call",
        /// The statement could be read two ways (see `audit::normalize`),
        /// and one of them changes session state.
        Unclear = "unclear_statement",
        /// Too many session settings to carry.
        TooManySettings = "too_many_settings",
    }
}

named_enum! {
    /// Why a session that started ended (`session.end`'s `end_reason`, and the
    /// `outcome` label of `pgbastion_sessions`): how the relay ended, or how
    /// the authentication phase did.
    pub enum EndReason {
        ClientClosed = "client_closed",
        ServerClosed = "server_closed",
        ClientError = "client_error",
        ServerError = "server_error",
        /// pgbastion shut down.
        Shutdown = "shutdown",
        /// An administrator ended the session (`KILL`).
        Killed = "killed",
        /// A statement could not be audited under `audit.on_failure = "refuse"`.
        AuditUnavailable = "audit_unavailable",
        /// Passthrough: the client chose SCRAM-SHA-256-PLUS.
        ChannelBindingRefused = "channel_binding_refused",
        ProtocolViolation = "protocol_violation",
        AuthenticationTimeout = "authentication_timeout",
        TooManySessions = "too_many_sessions",
    }
}

named_enum! {
    /// What became of a CancelRequest (`session.cancel`'s `outcome`).
    pub enum CancelOutcome {
        /// Sent to the session's server, from this instance.
        Forwarded = "forwarded",
        /// Sent to the server of a session of another instance (`[cluster]`).
        ForwardedRemote = "forwarded_remote",
        /// No live session has that key.
        Unmatched = "unmatched",
        /// Not known here, and Redis could not be asked.
        ClusterUnavailable = "cluster_unavailable",
        RateLimited = "rate_limited",
        /// A plaintext cancel on a listener with `cancel_plaintext = "deny"`.
        PlaintextRefused = "plaintext_refused",
        /// Matched, but the server could not be reached.
        UpstreamFailed = "upstream_failed",
        /// Matched a pooled session that holds no server connection now
        /// (between transactions): nothing to cancel.
        NothingRunning = "nothing_running",
        /// Matched a pooled session of another instance (`[cluster]`):
        /// relayed to that instance, which forwards it to the server
        /// connection serving the session then.
        RelayedToInstance = "relayed_to_instance",
    }
}

impl CancelOutcome {
    /// The cancel reached a server: always logged and audited (the other
    /// outcomes are what a stranger can flood, so they are rate-limited).
    pub fn is_forwarded(self) -> bool {
        matches!(
            self,
            CancelOutcome::Forwarded
                | CancelOutcome::ForwardedRemote
                | CancelOutcome::RelayedToInstance
        )
    }
}

named_enum! {
    /// How a statement ended (`query`'s `outcome`).
    pub enum QueryOutcome {
        Ok = "ok",
        Error = "error",
        /// Skipped by the server after an earlier error in the same pipeline.
        NotExecuted = "not_executed",
        /// The portal's row limit was reached.
        Suspended = "suspended",
        /// Forwarded to the server, but the session ended before its answer
        /// came: it may or may not have run.
        Unanswered = "unanswered",
    }
}

named_enum! {
    /// The protocol a statement came by (`query`'s `protocol`).
    pub enum QueryProtocol {
        Simple = "simple",
        Extended = "extended",
        FunctionCall = "function_call",
        /// A replication connection's commands.
        Replication = "replication",
    }
}

named_enum! {
    /// Which way a COPY statement moved data (`query`'s `copy`).
    pub enum CopyDirection {
        /// COPY FROM STDIN (CopyInResponse).
        In = "in",
        /// COPY TO STDOUT (CopyOutResponse).
        Out = "out",
        /// Replication streaming (CopyBothResponse).
        Both = "both",
    }
}

named_enum! {
    /// The kind of credential an identity login used (`auth.credential`).
    pub enum CredentialKind {
        Password = "password",
        ScramSecret = "scram_secret",
        ClientCert = "client_cert",
        RdsIam = "rds_iam",
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

named_enum! {
    /// Who authenticated the client: the server (passthrough), pgbastion with
    /// SCRAM (scram), or nobody but the identity (identity login).
    pub enum LoginMode {
        Passthrough = "passthrough",
        Scram = "scram",
        Identity = "identity",
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
