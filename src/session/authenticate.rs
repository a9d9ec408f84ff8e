//! Stage 5, authentication on the server leg: log in as the `LoginPlan`
//! says (pgbastion itself for scram mode and identity logins; nothing yet
//! for passthrough), then the auth phase (`auth::passthrough::AuthPhase`)
//! relays the rest of startup message by message until ReadyForQuery.
//!
//! The two logins are written over any byte streams, so they can be driven
//! without sockets.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::timeout_at;

use super::connect::Connected;
use super::login::{LoginPlan, ProvenClient};
use super::negotiate::ClientConn;
use super::{unless_shutdown, Admitted, Exit, Session};
use crate::audit::LegAuth;
use crate::audit::{AuthFacts, AuthOutcome, LoginMode};
use crate::auth::credentials::Found;
use crate::auth::identity_login::{self, IdentityLoginError, LoginTarget};
use crate::auth::login;
use crate::auth::passthrough::{AuthEnd, AuthPhase, CancelContext, SessionSlot};
use crate::auth::scram::Credential;
use crate::auth::terminate::{self, AuthError};
use crate::auth::wire;
use crate::limits::keyed_slots::KeyedPermit;
use crate::protocol::message::{self, AuthRequest};

#[cfg(test)]
mod tests;

/// Where the session's place under `limits.max_sessions` is.
enum SessionPlace {
    /// scram and identity logins: taken when pgbastion authenticated the
    /// client, before any server connection.
    Taken(KeyedPermit<()>),
    /// Passthrough: the auth phase takes it when the server says
    /// AuthenticationOk (`AuthPhase::session_slot`).
    AtServerOk,
}

/// A session logged in to its server (or, in passthrough mode, about to
/// let its client do so): the auth phase to run.
pub(super) struct LoggedIn {
    pub phase: AuthPhase,
    place: SessionPlace,
}

impl LoggedIn {
    /// The session's place under `limits.max_sessions`, to hold until it
    /// ends (None: the auth phase ended before it took one).
    pub fn session_slot(&mut self) -> Option<KeyedPermit<()>> {
        match std::mem::replace(&mut self.place, SessionPlace::AtServerOk) {
            SessionPlace::Taken(permit) => Some(permit),
            SessionPlace::AtServerOk => self.phase.session_slot.take().and_then(|s| s.held),
        }
    }
}

impl Session {
    /// Stage 5a: log in to the server as the plan says.
    pub(super) async fn log_in(
        &self,
        conn: &mut ClientConn,
        up: &mut Connected,
        admitted: &Admitted,
        plan: LoginPlan,
        facts: &mut AuthFacts,
        deadline: tokio::time::Instant,
    ) -> Result<LoggedIn, Exit> {
        let cancel = CancelContext {
            registry: self.shared.cancels.clone(),
            session_id: self.facts.session_id.clone(),
            upstream: admitted.route.upstream.clone(),
            addr: up.conn.addr,
        };
        let user = admitted.startup.user();
        let limit = self.settings.timeouts.authentication;
        let binding = up
            .conn
            .server_certificate()
            .and_then(crate::tls::channel_binding::tls_server_end_point);
        let server = &mut up.conn.stream;
        let (mut phase, place) = match plan {
            LoginPlan::Passthrough => {
                let mut phase =
                    AuthPhase::new(std::mem::take(&mut conn.buf), !conn.is_tls(), cancel);
                phase.session_slot = Some(SessionSlot {
                    slots: self.shared.sessions.clone(),
                    limit: self
                        .shared
                        .limits
                        .max_sessions
                        .load(std::sync::atomic::Ordering::SeqCst),
                    held: None,
                });
                (phase, SessionPlace::AtServerOk)
            }
            LoginPlan::Scram { client, slot } => {
                let login = scram_log_in(&mut conn.io, server, binding, user, &client, facts);
                let server_leftover = match timeout_at(deadline, login).await {
                    Ok(Ok(leftover)) => leftover,
                    Ok(Err(e)) => return Err(Exit::refused_in_login(e, facts).holding(slot)),
                    Err(_) => {
                        let e = AuthError::Timeout(limit);
                        return Err(Exit::refused_in_login(e, facts).holding(slot));
                    }
                };
                let phase =
                    AuthPhase::after_login(std::mem::take(&mut conn.buf), server_leftover, cancel);
                (phase, SessionPlace::Taken(slot))
            }
            LoginPlan::Password { password } => {
                let login =
                    password_log_in(&mut conn.io, server, binding, user, password.bytes(), facts);
                let server_leftover = match timeout_at(deadline, login).await {
                    Ok(Ok(leftover)) => leftover,
                    Ok(Err(e)) => return Err(Exit::refused_in_login(e, facts)),
                    Err(_) => return Err(Exit::refused_in_login(AuthError::Timeout(limit), facts)),
                };
                // The server said AuthenticationOk: the session's place.
                let slot = self.session_slot(facts)?;
                let phase =
                    AuthPhase::after_login(std::mem::take(&mut conn.buf), server_leftover, cancel);
                (phase, SessionPlace::Taken(slot))
            }
            LoginPlan::Identity { credential, slot } => {
                let target = LoginTarget {
                    host: &admitted.route.upstream.config.host,
                    port: admitted.route.upstream.config.port,
                    user,
                };
                let login =
                    identity_log_in(&mut conn.io, server, binding, &target, &credential, facts);
                let server_leftover = match timeout_at(deadline, login).await {
                    Ok(Ok(leftover)) => leftover,
                    Ok(Err(e)) => return Err(Exit::refused_in_login(e, facts).holding(slot)),
                    Err(_) => {
                        let e = IdentityLoginError::Timeout(limit);
                        return Err(Exit::refused_in_login(e, facts).holding(slot));
                    }
                };
                let phase =
                    AuthPhase::after_login(std::mem::take(&mut conn.buf), server_leftover, cancel);
                (phase, SessionPlace::Taken(slot))
            }
        };
        phase.counts.client_to_server = admitted.startup.as_bytes().len() as u64;
        Ok(LoggedIn { phase, place })
    }

    /// Stage 5b: the rest of startup, until ReadyForQuery, under the
    /// authentication deadline; its outcome goes into `facts`.
    pub(super) async fn auth_phase(
        &self,
        conn: &mut ClientConn,
        up: &mut Connected,
        logged_in: &mut LoggedIn,
        facts: &mut AuthFacts,
        deadline: tokio::time::Instant,
    ) -> Result<(), AuthEnd> {
        let auth = &mut logged_in.phase;
        let limit = self.settings.timeouts.authentication;
        let result = unless_shutdown(
            &self.shared.clone(),
            timeout_at(deadline, auth.run(&mut conn.io, &mut up.conn.stream)),
        )
        .await
        .map_or(Err(AuthEnd::Shutdown), |r| {
            r.unwrap_or(Err(AuthEnd::Timeout(limit)))
        });
        let refused_with = match &result {
            Err(AuthEnd::ChannelBinding) => Some("28000"),
            Err(AuthEnd::TooManySessions(_)) => Some("53300"),
            _ => None,
        };
        if let Some(sqlstate) = refused_with {
            auth.outcome = AuthOutcome::RefusedByProxy {
                sqlstate: sqlstate.into(),
            };
        }
        facts.outcome = auth.outcome.clone();
        if facts.mode == LoginMode::Passthrough && auth.mechanism.is_some() {
            // One exchange, end to end: the same mechanism on both legs,
            // never bound (pgbastion refuses -PLUS in this mode).
            let leg = auth.mechanism.take().map(|mechanism| LegAuth {
                mechanism,
                channel_binding: false,
            });
            facts.server = leg.clone();
            facts.client = leg;
        }
        result
    }
}

/// scram mode, on a verified server connection that has the
/// StartupMessage: log in with the key the client revealed, and let the
/// client in once the server has proved itself. Returns the server bytes
/// read past its AuthenticationOk.
pub(super) async fn scram_log_in<C, S>(
    client: &mut C,
    server: &mut S,
    binding: Option<Vec<u8>>,
    user: &str,
    proven: &ProvenClient,
    facts: &mut AuthFacts,
) -> Result<Vec<u8>, AuthError>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut server_buf = Vec::new();
    let first = first_request(
        client,
        server,
        &mut server_buf,
        AuthError::before_proof,
        AuthError::from,
    )
    .await?;
    if let AuthRequest::Other(_) | AuthRequest::Md5Password(_) = first {
        return Err(AuthError::ServerMethod(first.code()));
    }
    let credential = Credential::Keys {
        client_key: &proven.proven.client_key,
        verifier: &proven.verifier,
    };
    let server_leg = login::complete(server, &mut server_buf, user, first, binding, &credential)
        .await
        .map_err(|e| AuthError::from_server(e, user, &proven.source))?;
    facts.server = Some(server_leg);
    terminate::welcome_client(client, &proven.proven).await?;
    facts.outcome = AuthOutcome::Ok;
    Ok(server_buf)
}

/// Passthrough for a carried client that pipelined its password: log in
/// with it (the server judges it), then tell the client AuthenticationOk.
/// A refusal is the server's own ErrorResponse, passed on as it is.
pub(super) async fn password_log_in<C, S>(
    client: &mut C,
    server: &mut S,
    binding: Option<Vec<u8>>,
    user: &str,
    password: &[u8],
    facts: &mut AuthFacts,
) -> Result<Vec<u8>, AuthError>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut server_buf = Vec::new();
    let first = first_request(
        client,
        server,
        &mut server_buf,
        AuthError::before_proof,
        AuthError::from,
    )
    .await?;
    let credential = Credential::Password(password);
    let leg = login::complete(server, &mut server_buf, user, first, binding, &credential)
        .await
        .map_err(AuthError::before_proof)?;
    facts.server = Some(leg);
    wire::send(client, &message::authentication_ok()).await?;
    facts.outcome = AuthOutcome::Ok;
    Ok(server_buf)
}

/// Identity login, on a verified server connection that has the
/// StartupMessage: log in with the credential, then tell the client
/// AuthenticationOk. Returns the server bytes read past its own.
pub(super) async fn identity_log_in<C, S>(
    client: &mut C,
    server: &mut S,
    binding: Option<Vec<u8>>,
    target: &LoginTarget<'_>,
    found: &Found,
    facts: &mut AuthFacts,
) -> Result<Vec<u8>, IdentityLoginError>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut server_buf = Vec::new();
    let first = first_request(
        client,
        server,
        &mut server_buf,
        |e| identity_login::refusal(e, target.user, found.kind),
        IdentityLoginError::Client,
    )
    .await?;
    let leg =
        identity_login::log_in(server, &mut server_buf, first, binding, target, found).await?;
    facts.server = Some(leg);
    wire::send(client, &message::authentication_ok())
        .await
        .map_err(IdentityLoginError::Client)?;
    facts.outcome = AuthOutcome::Ok;
    Ok(server_buf)
}

/// The server's first authentication request, for every login pgbastion
/// makes itself. What the server says before it (NegotiateProtocolVersion,
/// notices) belongs to the client and is sent on. `refused` and
/// `client_failed` say what a server's refusal and a failed write to the
/// client are to the caller.
async fn first_request<C, S, E>(
    client: &mut C,
    server: &mut S,
    server_buf: &mut Vec<u8>,
    refused: impl FnOnce(login::LoginError) -> E,
    client_failed: impl FnOnce(wire::WireError) -> E,
) -> Result<AuthRequest, E>
where
    C: AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + Unpin + ?Sized,
{
    let mut early = Vec::new();
    let first = login::first_request(server, server_buf, |m| early.extend(m))
        .await
        .map_err(refused)?;
    if !early.is_empty() {
        wire::send(client, &early).await.map_err(client_failed)?;
    }
    Ok(first)
}
