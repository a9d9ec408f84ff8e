//! Identity login (`login = "identity"`): the client has been identified
//! (certificate or tailnet) and admitted by the policy; pgbastion logs in
//! to the server as the requested user with the credential it holds, and
//! only then tells the client AuthenticationOk. The client is never asked
//! for a password, as with PostgreSQL's own `cert` method.
//!
//! `IdentityLoginError` is every way this fails, with what the client is
//! told: never a secret, always the cause and who can fix it.

use std::time::SystemTime;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::audit::event::{CredentialKind, LegAuth, Mechanism, RejectReason};
use crate::auth::credentials::{Found, Held};
use crate::auth::login::{self, LoginError};
use crate::auth::rds_iam::{IamError, TokenTarget};
use crate::auth::scram::Credential;
use crate::auth::wire::WireError;
use crate::protocol::message::{self, AuthRequest, ErrorResponse};

#[derive(Debug, thiserror::Error)]
pub enum IdentityLoginError {
    #[error("identity login needs a client certificate or tailnet identity; this client is known only by its address")]
    NotAPerson,
    #[error("pgbastion holds no credential for user {user:?} on upstream {upstream:?}")]
    NoCredential { user: String, upstream: String },
    #[error("the client certificate of user {user:?} expired at {at}")]
    CertificateExpired { user: String, at: String },
    #[error("RDS IAM token for user {user:?}: {source}")]
    Iam { user: String, source: IamError },
    #[error("the database server asked for {} but pgbastion's credential for user {user:?} is a {kind}", message::auth_method_name(*.code))]
    Unsupported {
        user: String,
        kind: CredentialKind,
        code: u32,
    },
    /// The server refused the credential (SQLSTATE class 28).
    #[error(
        "the database server refused pgbastion's {kind} credential for user {user:?}: {message}"
    )]
    Refused {
        user: String,
        kind: CredentialKind,
        message: String,
    },
    /// The server refused for its own reasons (no such database, too many
    /// clients, ...): its ErrorResponse goes to the client as it is.
    #[error("the database server refused the session: {0}")]
    ServerRefused(LoginError),
    #[error("login to the database server failed: {0}")]
    Login(LoginError),
    #[error("client connection failed during login: {0}")]
    Client(WireError),
    #[error("logging in to the database server did not complete within {0:?}")]
    Timeout(std::time::Duration),
}

impl IdentityLoginError {
    /// The stable name in the audit log.
    pub fn reason(&self) -> RejectReason {
        match self {
            IdentityLoginError::NotAPerson => RejectReason::IdentityLoginWithoutIdentity,
            IdentityLoginError::NoCredential { .. } => RejectReason::NoCredential,
            IdentityLoginError::CertificateExpired { .. } => RejectReason::CredentialExpired,
            IdentityLoginError::Iam { .. } => RejectReason::CredentialUnavailable,
            IdentityLoginError::Unsupported { .. } => RejectReason::CredentialUnsupported,
            IdentityLoginError::Refused { .. } => RejectReason::CredentialRefused,
            IdentityLoginError::ServerRefused(_) => RejectReason::UpstreamRefused,
            IdentityLoginError::Login(_) => RejectReason::UpstreamLoginFailed,
            IdentityLoginError::Client(_) => RejectReason::ClientError,
            IdentityLoginError::Timeout(_) => RejectReason::AuthenticationTimeout,
        }
    }

    pub fn client_message(&self) -> Option<Vec<u8>> {
        let admin = "Ask the administrator of pgbastion; its log has the details for this session.";
        let e = match self {
            IdentityLoginError::NotAPerson => ErrorResponse::new("28000", self.to_string())
                .with_hint("Connect through a listener that identifies clients by certificate or tailnet."),
            IdentityLoginError::NoCredential { user, .. } => ErrorResponse::new(
                "28000",
                format!("pgbastion cannot log you in as user \"{user}\" without a password: it holds no credential for that user"),
            )
            .with_hint(format!("Connect as a user pgbastion holds a credential for, or ask its administrator to add a [[credential]] for \"{user}\".")),
            IdentityLoginError::CertificateExpired { user, at } => ErrorResponse::new(
                "28000",
                format!("pgbastion's client certificate for user \"{user}\" expired at {at}"),
            )
            .with_hint("Ask the administrator of pgbastion to renew it and send pgbastion SIGHUP."),
            IdentityLoginError::Iam { user, source } => ErrorResponse::new(
                "28000",
                format!("pgbastion could not make an RDS IAM token for user \"{user}\": {source}"),
            )
            .with_hint(admin),
            IdentityLoginError::Unsupported { .. } => {
                ErrorResponse::new("28000", self.to_string()).with_hint(admin)
            }
            IdentityLoginError::Refused { user, kind, message } => ErrorResponse::new(
                "28000",
                format!("the database server refused pgbastion's {kind} credential for user \"{user}\""),
            )
            .with_detail(format!("The server said: {message}"))
            .with_hint(admin),
            IdentityLoginError::ServerRefused(LoginError::Refused { raw, .. }) => return Some(raw.clone()),
            IdentityLoginError::ServerRefused(_) | IdentityLoginError::Login(_) => {
                ErrorResponse::new("08006", "pgbastion could not log in to the database server")
                    .with_hint(admin)
            }
            IdentityLoginError::Client(_) => return None,
            IdentityLoginError::Timeout(d) => ErrorResponse::new(
                "08006",
                format!(
                    "pgbastion could not log in to the database server within {}",
                    humantime::format_duration(*d)
                ),
            ),
        };
        Some(e.encode())
    }
}

/// Where the login goes: for RDS IAM tokens, the host and port clients of
/// RDS name (the upstream's address as configured).
pub struct LoginTarget<'a> {
    pub host: &'a str,
    pub port: u16,
    pub user: &'a str,
}

/// Logs in to the server (which has the StartupMessage) with `found`, after
/// `first` (the server's first authentication request). `binding` is the
/// server certificate's channel binding data.
pub async fn log_in<S>(
    server: &mut S,
    buf: &mut Vec<u8>,
    first: AuthRequest,
    binding: Option<Vec<u8>>,
    target: &LoginTarget<'_>,
    found: &Found,
) -> Result<LegAuth, IdentityLoginError>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let user = target.user;
    let token;
    let credential = match &*found.held {
        Held::ClientCert { .. } => {
            // The certificate was the proof, on the TLS handshake; a
            // server that wants more is not set up for `cert`.
            return match first {
                AuthRequest::Ok => Ok(LegAuth {
                    mechanism: Mechanism::Cert,
                    channel_binding: false,
                }),
                other => Err(IdentityLoginError::Unsupported {
                    user: user.to_owned(),
                    kind: found.kind,
                    code: other.code(),
                }),
            };
        }
        Held::RdsIam {
            config,
            aws,
            tokens,
        } => {
            let creds =
                aws.resolve(&config.region)
                    .await
                    .map_err(|source| IdentityLoginError::Iam {
                        user: user.to_owned(),
                        source,
                    })?;
            let t = TokenTarget {
                host: target.host,
                port: target.port,
                user,
                region: &config.region,
            };
            token = tokens
                .token(&t, &creds, SystemTime::now())
                .map_err(|source| IdentityLoginError::Iam {
                    user: user.to_owned(),
                    source,
                })?;
            Credential::Password(token.as_bytes())
        }
        held => held.credential().ok_or(IdentityLoginError::Unsupported {
            user: user.to_owned(),
            kind: found.kind,
            code: 0,
        })?,
    };
    login::complete(server, buf, user, first, binding, &credential)
        .await
        .map_err(|e| refusal(e, user, found.kind))
}

/// Sorts a failed login: the credential refused (class 28), the method
/// unsupported, or the server's own reasons.
pub fn refusal(e: LoginError, user: &str, kind: CredentialKind) -> IdentityLoginError {
    match e {
        LoginError::Refused { fields, .. } if fields.code.starts_with("28") => {
            IdentityLoginError::Refused {
                user: user.to_owned(),
                kind,
                message: fields.message,
            }
        }
        LoginError::UnsupportedMethod(code) => IdentityLoginError::Unsupported {
            user: user.to_owned(),
            kind,
            code,
        },
        e @ LoginError::Refused { .. } => IdentityLoginError::ServerRefused(e),
        e => IdentityLoginError::Login(e),
    }
}
