//! Stage 3, the login plan: how this session logs in to the server, and
//! for the modes where pgbastion logs in itself, the client's side done
//! before any server connection (so a throttled, wrong or stalling client
//! costs no server backend): scram mode proves the client against the
//! user's verifier; identity login finds the credential pgbastion holds.
//! Either takes the session's place under `limits.max_sessions` once the
//! client is authenticated.

use std::sync::atomic::Ordering;

use tokio::time::timeout_at;
use tracing::{error, info, warn};

use super::negotiate::ClientConn;
use super::{unless_shutdown, Admitted, Exit, Session, SessionError};
use crate::audit::{AuthFacts, LoginMode};
use crate::auth::credentials::{Found, Held};
use crate::auth::identity_login::IdentityLoginError;
use crate::auth::scram::{Offer, Proven, Verifier};
use crate::auth::secrets::StoredSecret;
use crate::auth::source::{Lookup, ScramAuth, SourceName};
use crate::auth::terminate::{self, AuthError, VerifierKind};
use crate::auth::throttle::{LoginCheck, Throttled};
use crate::limits::keyed_slots::KeyedPermit;
use crate::policy::Login;
use crate::server::route::RouteAuth;
use crate::upstream::Upstream;

/// How the session logs in to the server: the three modes, each with what
/// it needs and nothing it cannot have.
pub(super) enum LoginPlan {
    /// The client authenticates to the server itself, end to end; the auth
    /// phase takes the session's place once the server says
    /// AuthenticationOk.
    Passthrough,
    /// scram mode: the client proved itself; pgbastion logs in with the
    /// key it revealed.
    Scram {
        client: ProvenClient,
        slot: KeyedPermit<()>,
    },
    /// Identity login: the policy admitted a person or service and says
    /// pgbastion logs in for it with a credential it holds; the client is
    /// asked for nothing.
    Identity {
        credential: Found,
        slot: KeyedPermit<()>,
    },
    /// Passthrough with a carried client that pipelined its password
    /// (`ClientConn::pipelined_password`): the server cannot be asked to
    /// take a cleartext password its SCRAM exchange did not ask for, so
    /// pgbastion logs in with it (SCRAM, bound to the server's certificate
    /// where offered) and the server alone decides, as in passthrough.
    Password { password: ClientPassword },
}

/// A carried client's cleartext password, wiped when dropped.
pub(super) struct ClientPassword(Vec<u8>);

impl ClientPassword {
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for ClientPassword {
    fn drop(&mut self) {
        self.0.iter_mut().for_each(|b| *b = 0);
    }
}

impl LoginPlan {
    /// The client certificate pgbastion presents to the server, for an
    /// identity login with one.
    pub fn presenting(&self) -> Option<&crate::tls::TlsConnector> {
        match self {
            LoginPlan::Identity { credential, .. } => match &*credential.held {
                Held::ClientCert { connector, .. } => Some(connector),
                _ => None,
            },
            LoginPlan::Passthrough | LoginPlan::Scram { .. } | LoginPlan::Password { .. } => None,
        }
    }
}

/// A client that proved itself against a real verifier: what logging in
/// to the server on its behalf needs.
pub(super) struct ProvenClient {
    pub proven: Proven,
    pub verifier: Verifier,
    pub source: SourceName,
}

/// Whose verifier a SCRAM exchange runs against.
enum VerifierOf {
    /// The user's own, from this source.
    Known(SourceName),
    /// No such user: a mock verifier, which never proves anyone.
    Unknown,
    /// A user known but without a usable SCRAM verifier (MD5, plain text,
    /// none, expired): the exchange runs against the mock verifier like an
    /// unknown user's, and only the log and the audit say why it failed.
    Unusable(StoredSecret, SourceName),
}

/// A verifier found for the user logging in.
struct FoundVerifier {
    verifier: Verifier,
    of: VerifierOf,
    /// The user's failed-login budget is spent but this address has a
    /// clean record: only a correct proof passes.
    proof_only: Option<Throttled>,
}

/// The client leg of a carried client that sent its password in the
/// clear (inside TLS).
fn note_password_leg(facts: &mut AuthFacts) {
    facts.client = Some(crate::audit::LegAuth {
        mechanism: crate::audit::event::Mechanism::Password,
        channel_binding: false,
    });
}

impl Session {
    /// Stage 3: the login plan, with the client's side of it done.
    pub(super) async fn plan_login(
        &self,
        conn: &mut ClientConn,
        admitted: &Admitted,
        facts: &mut AuthFacts,
        deadline: tokio::time::Instant,
    ) -> Result<LoginPlan, Exit> {
        let upstream = &*admitted.route.upstream;
        let user = admitted.startup.user();
        match (admitted.login, &admitted.route.auth) {
            (Login::Identity, _) => {
                facts.mode = LoginMode::Identity;
                let credential = self
                    .identity_credential(upstream, user)
                    .map_err(|e| Exit::refused_in_login(e, facts))?;
                // Known by certificate or tailnet: authenticated now.
                facts.credential = Some(credential.kind);
                if conn.pipelined_password() {
                    // Sent unasked (the serverless driver always does):
                    // read and wiped, never forwarded to the server.
                    let (io, buf) = (&mut conn.io, &mut conn.buf);
                    let discarding = terminate::discard_cleartext(io, buf);
                    self.client_step(deadline, discarding, facts).await?;
                }
                let slot = self.session_slot(facts)?;
                Ok(LoginPlan::Identity { credential, slot })
            }
            (Login::Password, RouteAuth::Passthrough) if conn.pipelined_password() => {
                note_password_leg(facts);
                let (io, buf) = (&mut conn.io, &mut conn.buf);
                let taking = terminate::read_cleartext(io, buf);
                let password = self.client_step(deadline, taking, facts).await?;
                Ok(LoginPlan::Password {
                    password: ClientPassword(password),
                })
            }
            (Login::Password, RouteAuth::Passthrough) => Ok(LoginPlan::Passthrough),
            (Login::Password, RouteAuth::Scram(scram)) => {
                let proving = timeout_at(
                    deadline,
                    self.prove_client(conn, scram, upstream, user, facts),
                );
                let client = match unless_shutdown(&self.shared.clone(), proving).await {
                    Some(Ok(proved)) => proved,
                    Some(Err(_)) => Err(AuthError::Timeout(self.settings.timeouts.authentication)),
                    None => return Err(Exit::refused_in_login(SessionError::ShuttingDown, facts)),
                }
                .map_err(|e| Exit::refused_in_login(e, facts))?;
                let slot = self.session_slot(facts)?;
                Ok(LoginPlan::Scram { client, slot })
            }
        }
    }

    /// One read of the client's during login, bounded by the
    /// authentication deadline and by shutdown.
    async fn client_step<T>(
        &self,
        deadline: tokio::time::Instant,
        step: impl std::future::Future<Output = Result<T, AuthError>>,
        facts: &AuthFacts,
    ) -> Result<T, Exit> {
        let bounded = timeout_at(deadline, step);
        match unless_shutdown(&self.shared.clone(), bounded).await {
            Some(Ok(Ok(done))) => Ok(done),
            Some(Ok(Err(e))) => Err(Exit::refused_in_login(e, facts)),
            Some(Err(_)) => {
                let e = AuthError::Timeout(self.settings.timeouts.authentication);
                Err(Exit::refused_in_login(e, facts))
            }
            None => Err(Exit::refused_in_login(SessionError::ShuttingDown, facts)),
        }
    }

    /// The session's place under `limits.max_sessions`, for a client
    /// authenticated by pgbastion (issue 19 item 8: counted only once
    /// authenticated, so strangers never take the places of sessions).
    pub(super) fn session_slot(&self, facts: &AuthFacts) -> Result<KeyedPermit<()>, Exit> {
        let max_sessions = self.shared.limits.max_sessions.load(Ordering::SeqCst);
        self.shared
            .sessions
            .try_acquire((), max_sessions)
            .ok_or_else(|| {
                Exit::refused_in_login(SessionError::TooManySessions(max_sessions), facts)
            })
    }

    /// Identity login, before any server connection: the credential for
    /// `user`, if this client may use one.
    fn identity_credential(
        &self,
        upstream: &Upstream,
        user: &str,
    ) -> Result<Found, IdentityLoginError> {
        if !self.is_person() {
            return Err(IdentityLoginError::NotAPerson);
        }
        let found = self
            .shared
            .credentials()
            .find(&upstream.config.name, user)
            .ok_or_else(|| IdentityLoginError::NoCredential {
                user: user.to_owned(),
                upstream: upstream.config.name.clone(),
            })?;
        if let Held::ClientCert {
            not_after: Some(at),
            ..
        } = &*found.held
        {
            if *at < std::time::SystemTime::now() {
                return Err(IdentityLoginError::CertificateExpired {
                    user: user.to_owned(),
                    at: humantime::format_rfc3339_seconds(*at).to_string(),
                });
            }
        }
        Ok(found)
    }

    /// Is this client throttled (here, and with `[cluster]` in the
    /// fleet)? `Some`: only a correct proof may pass.
    async fn check_throttle(&self, user: &str) -> Result<Option<Throttled>, AuthError> {
        let addr = self.peer.map(|p| p.ip());
        let check = self.shared.login_throttle.check(addr, user);
        let mut proof_only = match check.map_err(AuthError::Throttled)? {
            LoginCheck::Open => None,
            LoginCheck::ProofOnly(t) => Some(t),
        };
        if let Some(fleet) = &self.shared.cluster {
            // Unavailable: this instance's count (above) alone decides.
            match fleet
                .check_failures(addr, user, &self.settings.limits)
                .await
            {
                Ok(Err(throttled)) => return Err(AuthError::Throttled(throttled)),
                Ok(Ok(LoginCheck::ProofOnly(t))) => proof_only = proof_only.or(Some(t)),
                Ok(Ok(LoginCheck::Open)) | Err(_) => {}
            }
        }
        Ok(proof_only)
    }

    /// scram mode, before any server connection: is this client throttled,
    /// and which verifier does its user have? Unknown users get a mock one.
    async fn find_verifier(
        &self,
        scram: &ScramAuth,
        upstream: &Upstream,
        user: &str,
    ) -> Result<FoundVerifier, AuthError> {
        let proof_only = self.check_throttle(user).await?;
        let (verifier, of) = match scram.lookup(user, upstream, &self.settings.timeouts).await {
            Ok(Lookup::Found(verifier, source)) => (verifier, VerifierOf::Known(source)),
            Ok(Lookup::Unknown) => (scram.mock_verifier(user), VerifierOf::Unknown),
            // issue 19 item 4: as PostgreSQL, a full mock exchange and the
            // answer to a wrong password, so nobody learns without a
            // password that the user exists and how its password is kept.
            Ok(Lookup::Unusable(secret, from)) => (
                scram.mock_verifier(user),
                VerifierOf::Unusable(secret, from),
            ),
            Err(source) => {
                return Err(AuthError::VerifierUnavailable {
                    user: user.to_owned(),
                    source,
                })
            }
        };
        Ok(FoundVerifier {
            verifier,
            of,
            proof_only,
        })
    }

    /// scram mode, before any server connection: find the user's verifier
    /// and prove the client against it. A mock verifier (unknown user)
    /// never proves anyone, with the same answer as a wrong password.
    async fn prove_client(
        &self,
        conn: &mut ClientConn,
        scram: &ScramAuth,
        upstream: &Upstream,
        user: &str,
        facts: &mut AuthFacts,
    ) -> Result<ProvenClient, AuthError> {
        let found = self.find_verifier(scram, upstream, user).await?;
        let kind = match found.of {
            VerifierOf::Known(_) => VerifierKind::Users,
            VerifierOf::Unknown | VerifierOf::Unusable(..) => VerifierKind::Mock,
        };
        let proved = if conn.pipelined_password() {
            let (io, buf) = (&mut conn.io, &mut conn.buf);
            terminate::prove_cleartext(io, buf, user, &found.verifier, kind, &mut facts.client)
                .await
        } else {
            let offer = Offer {
                binding: conn.binding.as_deref(),
            };
            let (io, buf) = (&mut conn.io, &mut conn.buf);
            terminate::prove_client(
                io,
                buf,
                offer,
                user,
                &found.verifier,
                kind,
                &mut facts.client,
            )
            .await
        };
        let proven = match proved {
            Ok(p) => p,
            Err(e) => return Err(self.failed_proof(e, user, found)),
        };
        match found.of {
            VerifierOf::Known(source) => {
                if found.proof_only.is_some() {
                    info!(%user, "the user's failed-login budget is spent; admitted with a correct proof from an address with no recent failures");
                }
                Ok(ProvenClient {
                    proven,
                    verifier: found.verifier,
                    source,
                })
            }
            // prove_client never succeeds for a mock verifier.
            VerifierOf::Unknown | VerifierOf::Unusable(..) => Err(AuthError::Failed {
                user: user.to_owned(),
                verifier: VerifierKind::Mock,
            }),
        }
    }

    /// A client that did not prove itself: counted as a failed attempt
    /// where it was one, and told what a wrong password is told.
    fn failed_proof(&self, e: AuthError, user: &str, found: FoundVerifier) -> AuthError {
        let e = match (e, found.of) {
            (AuthError::Failed { .. }, VerifierOf::Unusable(secret, from)) => AuthError::NotScram {
                user: user.to_owned(),
                secret,
                from,
            },
            (e, _) => e,
        };
        if e.is_failed_attempt() {
            let addr = self.peer.map(|p| p.ip());
            self.shared.login_throttle.failed(addr, user);
            if let Some(fleet) = &self.shared.cluster {
                fleet.count_failure(addr, user, &self.settings.limits);
            }
            if let Some(throttled) = found.proof_only {
                return AuthError::Throttled(throttled);
            }
        }
        e
    }
}

/// What the operator must fix about a refused scram-mode login, logged
/// off the session's path after the client has its answer: a user whose
/// password pgbastion cannot use must take exactly as long to refuse as a
/// wrong password (the client is told only "password authentication
/// failed"), so the time of the answer does not say which it was.
pub(super) fn operator_note(err: &SessionError, session: &str) -> Option<Box<dyn FnOnce() + Send>> {
    let SessionError::Auth(err) = err else {
        return None;
    };
    let session = session.to_owned();
    match err {
        AuthError::VerifierStale { user, from, .. } => {
            let (user, source) = (user.clone(), from.to_string());
            Some(Box::new(move || {
                error!(%session, %user, %source, "the database server does not accept pgbastion's verifier for this user: refresh the source");
            }))
        }
        AuthError::NotScram { user, from, .. } => {
            let (user, source, hint) = (user.clone(), from.to_string(), err.operator_hint());
            Some(Box::new(move || warn!(%session, %user, %source, "{hint}")))
        }
        _ => None,
    }
}
