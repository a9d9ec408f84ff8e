//! SCRAM termination (`auth = "scram"`): pgbastion is the SCRAM server to
//! the client and the SCRAM client to the database, so both legs can be
//! channel-bound and a client with default settings just connects.
//!
//! The session runs these steps in order (see `session`): throttle check,
//! verifier lookup, `prove_client` against the verifier, upstream connect,
//! then `login::complete` toward the server with the recovered ClientKey,
//! and `welcome_client` once the server has proved itself. `AuthError` is
//! every way that can fail, with what the client is told.

use std::time::Duration;

use subtle::ConstantTimeEq;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::audit::event::{LegAuth, Mechanism, RejectReason};
use crate::auth::auth_query::AuthQueryError;
use crate::auth::login::LoginError;
use crate::auth::proven_keys;
use crate::auth::scram::{self, Offer, Proven, ScramError, ServerExchange, Verifier};
use crate::auth::secrets::StoredSecret;
use crate::auth::source::SourceName;
use crate::auth::throttle::{Throttled, ThrottledBy};
use crate::auth::wire::{self, WireError};
use crate::protocol::message::{self, tag, ErrorResponse};

/// The largest SASL message accepted from a client (libpq's are ~100 bytes).
pub const MAX_CLIENT_SASL_MESSAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("too many failed logins from this {}; retry in {}", match .0.by { ThrottledBy::Address => "address", ThrottledBy::User => "user" }, humantime::format_duration(round_up(.0.retry_after)))]
    Throttled(Throttled),
    #[error("cannot look up the verifier of user {user:?}: {source}")]
    VerifierUnavailable {
        user: String,
        source: AuthQueryError,
    },
    #[error("user {user:?} has no SCRAM verifier in {from}: {}", .secret.unusable_reason().unwrap_or("unusable"))]
    NotScram {
        user: String,
        secret: StoredSecret,
        from: SourceName,
    },
    #[error("client SCRAM exchange failed: {0}")]
    ClientScram(#[from] ScramError),
    #[error("client connection failed during authentication: {0}")]
    ClientWire(#[from] WireError),
    #[error("expected a SASL response from the client, got message {0:?}")]
    ClientUnexpected(char),
    #[error("password authentication failed for user {user:?}{}", match .verifier { VerifierKind::Users => "", VerifierKind::Mock => " (no such user)" })]
    Failed {
        user: String,
        verifier: VerifierKind,
    },
    #[error("the database server does not accept pgbastion's copy of the verifier of user {user:?} from {from} ({detail}); refresh it")]
    VerifierStale {
        user: String,
        from: SourceName,
        detail: String,
    },
    #[error("the database server asked for {}, but scram mode can only answer SCRAM-SHA-256", message::auth_method_name(*.0))]
    ServerMethod(u32),
    #[error("the database server did not prove it knows the verifier: {0}")]
    ServerProof(LoginError),
    /// The server refused for its own reasons (too many clients, no such
    /// database, ...): its ErrorResponse goes to the client as it is.
    #[error("the database server refused the session: {0}")]
    ServerRefused(LoginError),
    #[error("login to the database server failed: {0}")]
    ServerLogin(LoginError),
    #[error("authentication did not complete within {0:?}")]
    Timeout(Duration),
}

fn round_up(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

impl AuthError {
    /// The stable name in the audit log.
    pub fn reason(&self) -> RejectReason {
        match self {
            AuthError::Throttled(_) => RejectReason::AuthThrottled,
            AuthError::VerifierUnavailable { .. } => RejectReason::VerifierUnavailable,
            AuthError::NotScram { .. } => RejectReason::VerifierNotScram,
            AuthError::ClientScram(_) | AuthError::ClientUnexpected(_) => {
                RejectReason::ScramProtocolViolation
            }
            AuthError::ClientWire(WireError::Closed) => RejectReason::ClientClosed,
            AuthError::ClientWire(_) => RejectReason::ClientError,
            AuthError::Failed { .. } => RejectReason::AuthFailed,
            AuthError::VerifierStale { .. } => RejectReason::VerifierStale,
            AuthError::ServerMethod(_) => RejectReason::UpstreamAuthUnsupported,
            AuthError::ServerProof(_) => RejectReason::UpstreamAuthUnproven,
            AuthError::ServerRefused(_) => RejectReason::UpstreamRefused,
            AuthError::ServerLogin(_) => RejectReason::UpstreamLoginFailed,
            AuthError::Timeout(_) => RejectReason::AuthenticationTimeout,
        }
    }

    /// Whether this counts as a failed password attempt for throttling: a
    /// user without a usable verifier too (issue 19 item 4), or probing
    /// for such users would be free.
    pub fn is_failed_attempt(&self) -> bool {
        matches!(self, AuthError::Failed { .. } | AuthError::NotScram { .. })
    }

    /// What an operator must change, for pgbastion's log (the client is
    /// not told: it would say that the user exists).
    pub fn operator_hint(&self) -> &'static str {
        match self {
            AuthError::NotScram {
                from: SourceName::SecretsFile(_),
                ..
            } => "this user cannot log in: pgbastion needs a SCRAM-SHA-256 verifier for it in its secrets file: copy the user's rolpassword (SCRAM-SHA-256$...) from pg_authid",
            AuthError::NotScram { .. } => "this user cannot log in: pgbastion needs a SCRAM-SHA-256 password: on the database server run SET password_encryption = 'scram-sha-256'; then set the password again (ALTER ROLE ... PASSWORD, or \\password in psql), with no expired VALID UNTIL",
            _ => "",
        }
    }

    /// A failure while the server has not yet seen a proof.
    pub fn before_proof(e: LoginError) -> AuthError {
        match e {
            LoginError::Refused { .. } => AuthError::ServerRefused(e),
            other => AuthError::ServerLogin(other),
        }
    }

    /// Sorts a failed login toward the server into what it means.
    pub fn from_server(e: LoginError, user: &str, source: &SourceName) -> AuthError {
        let stale = |detail: String| AuthError::VerifierStale {
            user: user.to_owned(),
            from: source.clone(),
            detail,
        };
        match e {
            LoginError::Scram(ScramError::VerifierMismatch) => {
                stale("its salt or iteration count differs".into())
            }
            // The client's proof checked out against our verifier, so a
            // server that still says "wrong password" holds another one.
            LoginError::Refused { ref fields, .. } if fields.code == "28P01" => {
                stale("it rejected the proof".into())
            }
            LoginError::Refused { .. } => AuthError::ServerRefused(e),
            LoginError::UnsupportedMethod(code) => AuthError::ServerMethod(code),
            LoginError::Scram(ScramError::InvalidServerSignature) | LoginError::NoServerProof => {
                AuthError::ServerProof(e)
            }
            other => AuthError::ServerLogin(other),
        }
    }

    /// What the client is sent: pgbastion's own ErrorResponse, the
    /// server's as it was, or nothing (the client is gone).
    pub fn client_message(&self) -> Option<Vec<u8>> {
        let e = match self {
            AuthError::Throttled(t) => ErrorResponse::new(
                "28000",
                format!(
                    "too many failed login attempts from your {}; try again in {}",
                    match t.by {
                        ThrottledBy::Address => "address",
                        ThrottledBy::User => "user name",
                    },
                    humantime::format_duration(round_up(t.retry_after))
                ),
            )
            .with_hint("pgbastion limits failed logins (limits.failed_logins_per_address and failed_logins_per_user)."),
            AuthError::VerifierUnavailable { user, .. } => ErrorResponse::new(
                "08001",
                format!("pgbastion could not look up the credentials of user \"{user}\""),
            )
            .with_hint("The lookup (auth_query) failed; pgbastion's log says why. Nobody is let in while it fails."),
            AuthError::ClientScram(e) => ErrorResponse::new("08P01", e.to_string()),
            AuthError::ClientUnexpected(_) => ErrorResponse::new("08P01", self.to_string()),
            AuthError::ClientWire(WireError::Protocol(e)) => ErrorResponse::new("08P01", format!("invalid message during authentication: {e}")),
            AuthError::ClientWire(_) => return None,
            // A user without a usable verifier is answered like a wrong
            // password after the same mock exchange (issue 19 item 4): the
            // reason is in the log and the audit only.
            AuthError::Failed { user, .. } | AuthError::NotScram { user, .. } => ErrorResponse::new(
                "28P01",
                format!("password authentication failed for user \"{user}\""),
            ),
            AuthError::VerifierStale { user, .. } => ErrorResponse::new(
                "28000",
                format!("pgbastion's copy of the SCRAM verifier of user \"{user}\" does not match the database server's"),
            )
            .with_detail("Your password was accepted by pgbastion, but the database server holds a different verifier (the password was probably changed on the server).")
            .with_hint("Ask the administrator of pgbastion to refresh its secrets file; pgbastion's log names the user and the source."),
            AuthError::ServerMethod(code) => ErrorResponse::new(
                "28000",
                format!(
                    "the database server asked pgbastion for {}; pgbastion's scram mode can only answer SCRAM-SHA-256",
                    message::auth_method_name(*code)
                ),
            )
            .with_hint("Use scram-sha-256 in the database server's pg_hba.conf for pgbastion's address, or auth = \"passthrough\" for this upstream."),
            AuthError::ServerProof(_) => ErrorResponse::new(
                "08001",
                "the database server did not prove that it knows your verifier",
            )
            .with_detail("A genuine PostgreSQL server signs its final SCRAM message with the user's ServerKey; this one did not, so pgbastion refused it.")
            .with_hint("See pgbastion's log for this session."),
            AuthError::ServerRefused(LoginError::Refused { raw, .. }) => return Some(raw.clone()),
            AuthError::Timeout(d) => ErrorResponse::new(
                "08006",
                format!("authentication did not complete within {}", humantime::format_duration(*d)),
            ),
            AuthError::ServerRefused(_) | AuthError::ServerLogin(_) => {
                ErrorResponse::new("08006", "pgbastion could not log in to the database server")
                    .with_hint("See pgbastion's log for this session.")
            }
        };
        Some(e.encode())
    }
}

/// Whose verifier a client is proved against: the user's own, or a mock
/// one (no such user, or none usable) that no proof can match, so the
/// exchange looks the same to the client either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifierKind {
    Users,
    Mock,
}

/// Runs the SCRAM server role toward the client: offers the mechanisms of
/// `offer`, and checks the client's proof against `verifier`. For an
/// unknown user (`VerifierKind::Mock`) the exchange runs to the
/// end and then fails exactly like a wrong password. `leg` learns the
/// client's mechanism as soon as it is chosen, so a failed login is
/// audited with it too.
pub async fn prove_client<C>(
    client: &mut C,
    buf: &mut Vec<u8>,
    offer: Offer<'_>,
    user: &str,
    verifier: &Verifier,
    kind: VerifierKind,
    leg: &mut Option<LegAuth>,
) -> Result<Proven, AuthError>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    wire::send(client, &message::authentication_sasl(&offer.mechanisms())).await?;
    // The client's first message is dropped once the exchange has what it
    // needs of it: a login stalled before its final message holds one
    // copy of the (bounded) nonce, not three.
    let (exchange, server_first) = {
        let body = read_sasl(client, buf).await?;
        let (mechanism, data) =
            message::parse_sasl_initial_response(&body).map_err(WireError::from)?;
        let data = data.ok_or(ScramError::Malformed("no client-first message"))?;
        let started = ServerExchange::start(
            offer,
            mechanism,
            data,
            &verifier.salt,
            verifier.iterations,
            &scram::new_nonce(),
        )?;
        // `start` has checked that PLUS comes with binding data and only then.
        *leg = Some(LegAuth {
            mechanism: Mechanism::named(mechanism),
            channel_binding: mechanism == scram::SCRAM_SHA_256_PLUS,
        });
        started
    };
    wire::send(
        client,
        &message::authentication_sasl_data(false, server_first.as_bytes()),
    )
    .await?;
    let body = read_sasl(client, buf).await?;
    let failed = || AuthError::Failed {
        user: user.to_owned(),
        verifier: kind,
    };
    match exchange.finish(&body, &verifier.stored_key, &verifier.server_key) {
        Ok(_) if kind == VerifierKind::Mock => Err(failed()),
        Err(ScramError::InvalidProof) => Err(failed()),
        other => other.map_err(AuthError::from),
    }
}

/// Checks the cleartext password a carried client sent with its
/// StartupMessage (the Neon driver's `pipelineConnect: "password"`, and
/// every SQL-over-HTTP request) against `verifier`, the way a SCRAM
/// server would: SaltedPassword with the verifier's salt and iterations
/// (off the async workers), ClientKey, StoredKey, compared in constant
/// time. The ClientKey is then all pgbastion needs to log in to the
/// server with SCRAM (bound to the server's certificate), exactly as for
/// a client that ran SCRAM itself; the password is dropped here.
///
/// Only for streams inside TLS (a WebSocket's `wss`, HTTPS): the caller
/// never takes this path for a plaintext client. AuthenticationCleartext-
/// Password is still sent first, as a server would (the driver has
/// already answered it and ignores it).
pub async fn prove_cleartext<C>(
    client: &mut C,
    buf: &mut Vec<u8>,
    user: &str,
    verifier: &Verifier,
    kind: VerifierKind,
    leg: &mut Option<LegAuth>,
) -> Result<Proven, AuthError>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    *leg = Some(LegAuth {
        mechanism: Mechanism::Password,
        channel_binding: false,
    });
    let mut password = read_cleartext(client, buf).await?;
    let client_key = cleartext_client_key(&password, verifier, kind).await;
    password.iter_mut().for_each(|b| *b = 0);
    let Some(client_key) = client_key? else {
        return Err(AuthError::Failed {
            user: user.to_owned(),
            verifier: kind,
        });
    };
    Ok(Proven {
        client_key,
        server_final: None,
        channel_bound: false,
    })
}

/// The ClientKey `password` proves against `verifier`, or None when it
/// does not match. A password proven recently (`proven_keys`) skips the
/// derivation; a mock verifier never matches and is never remembered.
async fn cleartext_client_key(
    password: &[u8],
    verifier: &Verifier,
    kind: VerifierKind,
) -> Result<Option<crate::crypto::Hash>, AuthError> {
    let (salt, iterations) = (&verifier.salt, verifier.iterations);
    if kind != VerifierKind::Mock {
        if let Some(key) = proven_keys::recall(password, salt, iterations, &verifier.stored_key) {
            return Ok(Some(key));
        }
    }
    let salted = crate::auth::derive::salted_password(password, salt, iterations).await?;
    let client_key = crate::crypto::hmac(&salted, b"Client Key");
    let matches = crate::crypto::sha256(&client_key).ct_eq(&verifier.stored_key);
    if !bool::from(matches) || kind == VerifierKind::Mock {
        return Ok(None);
    }
    proven_keys::remember(password, salt, iterations, client_key);
    Ok(Some(client_key))
}

/// Asks for a cleartext password (AuthenticationCleartextPassword) and
/// reads the client's PasswordMessage: the password, which the caller
/// wipes once used.
pub async fn read_cleartext<C>(client: &mut C, buf: &mut Vec<u8>) -> Result<Vec<u8>, AuthError>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    wire::send(client, &message::authentication_cleartext_password()).await?;
    let mut body = read_sasl(client, buf).await?;
    let password = message::parse_password(&body)
        .map(<[u8]>::to_vec)
        .map_err(WireError::from);
    body.iter_mut().for_each(|b| *b = 0);
    Ok(password?)
}

/// Reads and wipes a PasswordMessage nobody asked for (a carried client
/// pipelines one even where pgbastion logs in by identity).
pub async fn discard_cleartext<C>(client: &mut C, buf: &mut Vec<u8>) -> Result<(), AuthError>
where
    C: AsyncRead + Unpin + ?Sized,
{
    let mut body = read_sasl(client, buf).await?;
    body.iter_mut().for_each(|b| *b = 0);
    Ok(())
}

/// Reads the client's next SASL message ('p'), bounded in size.
async fn read_sasl<C>(client: &mut C, buf: &mut Vec<u8>) -> Result<Vec<u8>, AuthError>
where
    C: AsyncRead + Unpin + ?Sized,
{
    let read = wire::read_message(client, buf, MAX_CLIENT_SASL_MESSAGE).await?;
    // What the buffer grew to for this message is not kept while the
    // client takes its time over the next one.
    buf.shrink_to_fit();
    match read {
        (tag::PASSWORD, body) => Ok(body),
        (tag::TERMINATE, _) => Err(WireError::Closed.into()),
        (other, _) => Err(AuthError::ClientUnexpected(char::from(other))),
    }
}

/// Tells the client it is in: the server-final message pgbastion signed
/// with the verifier's ServerKey, then AuthenticationOk.
pub async fn welcome_client<C>(client: &mut C, proven: &Proven) -> Result<(), WireError>
where
    C: AsyncWrite + Unpin + ?Sized,
{
    let mut out = match &proven.server_final {
        Some(server_final) => message::authentication_sasl_data(true, server_final.as_bytes()),
        None => Vec::new(),
    };
    out.extend(message::authentication_ok());
    wire::send(client, &out).await
}
