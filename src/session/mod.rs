//! One client connection, from accept to its last audit event.
//!
//! The steps, each with its own deadline and its own way to fail (`run`
//! reads top to bottom in this order):
//! 1. `negotiate` (in `client`): read first packets (SSLRequest,
//!    GSSENCRequest, direct TLS, CancelRequest, StartupMessage) and upgrade
//!    the client leg to TLS.
//! 2. Identity and policy, then the session limit.
//! 3. scram mode only: `prove_client` (throttle check, verifier lookup,
//!    the client's SCRAM exchange), so an unauthenticated client never
//!    costs a server connection.
//! 4. Upstream: dial and verify (see `upstream`), then forward the
//!    StartupMessage — only now does the server learn anything.
//! 5. scram mode only: `log_in` to the server with the key the client
//!    revealed; the client gets AuthenticationOk once the server proved
//!    itself.
//! 6. `AuthPhase` (in `auth::passthrough`) relays the rest of startup
//!    message by message until ReadyForQuery: in passthrough mode the whole
//!    authentication, watched for its outcome and for channel binding.
//! 7. `relay::relay` until either side ends; then `session.end`.
//!
//! A connection whose first packet is a CancelRequest takes the short path
//! in `Session::cancel` instead.
//!
//! Every failure is a `SessionError` (in `error`), whose `client_message`
//! is the one place that decides what the client is told.

use std::sync::Arc;
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::time::timeout_at;
use tracing::{debug, error, info, warn, Instrument};

use crate::admin::console;
use crate::admin::live::SessionInfo;
use crate::audit::{
    AuthFacts, AuthOutcome, ClientAddress, ClientTransport, Event, LoginMode, ProxyFacts,
    Requested, SessionFacts, UpstreamFacts,
};
use crate::auth::credentials::{Found, Held};
use crate::auth::identity_login::{self, IdentityLoginError, LoginTarget};
use crate::audit::{CancelOutcome, LegAuth, QueryProtocol};
use crate::auth::login;
use crate::auth::passthrough::{AuthEnd, AuthPhase, CancelContext};
use crate::auth::scram::{Credential, Offer, Proven, Verifier};
use crate::auth::secrets::StoredSecret;
use crate::auth::source::{Lookup, ScramAuth, SourceName};
use crate::auth::terminate::{self, AuthError};
use crate::auth::wire;
use crate::config::{CancelPlaintext, ListenerIdentity, ProxyProtocol, SendProxyProtocol};
use crate::identity::{cert, Identity, IdentityError, IdentitySource};
use crate::policy::{Login, Request};
use crate::protocol::message::{self, AuthRequest, ErrorFields};
use crate::protocol::proxy::{self, Addresses, SslInfo};
use crate::protocol::startup::{CancelKey, StartupMessage};
use crate::relay::{self, ByteCounts};
use crate::server::{ListenerInfo, PendingPermit, Shared};
use crate::stream::BoxedIo;
use crate::upstream::{Upstream, UpstreamConn};

mod client;
mod error;

pub use error::SessionError;

use client::{ClientConn, Negotiated, ERROR_WRITE_TIMEOUT};

/// The SQLSTATE of an encoded ErrorResponse, for the audit log.
fn sqlstate_of(bytes: &[u8]) -> Option<String> {
    let body = bytes.get(5..)?;
    ErrorFields::parse(body).ok().map(|f| f.code)
}

/// A verifier found for the user logging in; `source` is None for the mock
/// verifier of an unknown user.
struct FoundVerifier {
    verifier: Verifier,
    source: Option<SourceName>,
    /// A user known but without a usable SCRAM verifier (MD5, plain text,
    /// none, expired): the exchange runs against the mock verifier like an
    /// unknown user's, and only the log and the audit say why it failed.
    unusable: Option<(StoredSecret, SourceName)>,
    /// The user's failed-login budget is spent but this address has a
    /// clean record: only a correct proof passes.
    proof_only: Option<crate::auth::throttle::Throttled>,
}

/// A client that proved itself against a real verifier: what logging in
/// to the server on its behalf needs.
struct ProvenClient {
    proven: Proven,
    verifier: Verifier,
    source: SourceName,
}

/// Why a client may hang up right after an identity login, for the log
/// and the audit: libpq accepts no message but an error before
/// AuthenticationOk, and a client with channel_binding=require hangs up on
/// an AuthenticationOk that came without a SCRAM exchange, so this is the
/// one place that can say so.
fn identity_hangup(end: &dyn std::fmt::Display) -> String {
    format!(
        "{end} right after pgbastion's AuthenticationOk, without a query: a client that requires channel \
         binding (channel_binding=require) refuses a login without a SCRAM exchange, and identity login has \
         none; such clients must leave channel_binding at its default (prefer)"
    )
}

/// A `query` audit event from the query audit's record. False: it was lost
/// and the audit log refuses unaudited statements.
fn record_query(
    shared: &Shared,
    facts: &SessionFacts,
    r: &crate::audit::query::QueryRecord,
) -> bool {
    use crate::audit::query::{Protocol, Statement};
    let (statement, unparsed) = match &r.statement {
        Statement::Text(t) => (Some(&**t), None),
        Statement::Unparsed { len, why } => (None, Some(crate::audit::Unparsed { len: *len, why })),
        Statement::Unknown => (
            None,
            Some(crate::audit::Unparsed {
                len: 0,
                why: "unknown to the audit: prepared or declared in SQL, ended, or past its bounds",
            }),
        ),
    };
    let (protocol, prepared) = match &r.protocol {
        Protocol::Simple => (QueryProtocol::Simple, None),
        Protocol::Extended { name } => (QueryProtocol::Extended, Some(name.as_str())),
        Protocol::FunctionCall => (QueryProtocol::FunctionCall, None),
        Protocol::Replication => (QueryProtocol::Replication, None),
    };
    shared.record(&Event::Query {
        facts,
        statement,
        unparsed,
        protocol,
        prepared,
        started: humantime::format_rfc3339_micros(r.started).to_string(),
        duration_us: u64::try_from(r.duration.as_micros()).unwrap_or(u64::MAX),
        tag: r.tag.as_deref(),
        rows: r.rows,
        commands: r.commands,
        sqlstate: r.sqlstate.as_deref(),
        copy: r.copy,
        outcome: r.outcome,
    })
}

/// A session's place under its rule's `max_sessions`, given back when
/// dropped.
struct IdentitySlot {
    _local: crate::limits::keyed_slots::KeyedPermit<String>,
    _fleet: Option<crate::cluster::FleetSlot>,
}

/// What became of a CancelRequest, for the log and the audit.
struct CancelDelivery {
    target_id: Option<String>,
    /// The instance the session runs on, when it is another one.
    instance: Option<String>,
    outcome: CancelOutcome,
    detail: Option<String>,
}

impl CancelDelivery {
    fn refused(outcome: CancelOutcome) -> Self {
        CancelDelivery {
            target_id: None,
            instance: None,
            outcome,
            detail: None,
        }
    }

    fn sent(
        session_id: String,
        instance: Option<String>,
        sent: Result<(), crate::upstream::UpstreamError>,
    ) -> Self {
        let (outcome, detail) = match (sent, instance.is_some()) {
            (Ok(()), false) => (CancelOutcome::Forwarded, None),
            (Ok(()), true) => (CancelOutcome::ForwardedRemote, None),
            (Err(e), _) => (CancelOutcome::UpstreamFailed, Some(e.to_string())),
        };
        CancelDelivery {
            target_id: Some(session_id),
            instance,
            outcome,
            detail,
        }
    }
}

/// Runs `work` unless pgbastion begins shutting down first (None). A login
/// (or an admin console waiting for a command) holds nothing a drain should
/// wait for: it ends at once with 57P01 instead of holding the exit until
/// the drain deadline (issue 19 item 17).
async fn unless_shutdown<T>(
    shared: &Shared,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    let mut phase = shared.shutdown.subscribe();
    tokio::select! {
        biased;
        _ = phase.wait_for(|p| *p != relay::ShutdownPhase::Running) => None,
        done = work => Some(done),
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
    pending: PendingPermit,
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
        settings: shared.settings(),
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
    /// Deadlines and templates as they were when the session started.
    settings: Arc<crate::server::Settings>,
    shared: Arc<Shared>,
}

impl Session {
    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn run(mut self, io: BoxedIo, mut pending: PendingPermit) {
        let mut conn = ClientConn {
            io,
            buf: Vec::new(),
            transport: ClientTransport::Plaintext,
            peer_cert: None,
            binding: None,
        };
        // Until the startup packet, a shutdown closes the connection at
        // once and says nothing, as PostgreSQL does (issue 19 adversarial
        // L1: it held the exit for the drain deadline and 3 s more).
        let unstarted_at_shutdown =
            || debug!("shutting down: closed a connection that sent no startup packet");
        if self.listener.proxy_protocol == ProxyProtocol::Required {
            let shared = self.shared.clone();
            let stated = match unless_shutdown(&shared, self.read_proxy_header(&mut conn)).await {
                Some(Ok(stated)) => stated,
                Some(Err(e)) => return self.reject(&mut conn, e).await,
                None => return unstarted_at_shutdown(),
            };
            if let Some(ip) = stated {
                if !pending.readdress(ip) {
                    let limit = "limits.max_pending_per_address";
                    if self.shared.warn_limit.allow(limit) {
                        warn!(limit, "too many unauthenticated connections; closing");
                    }
                    return;
                }
            }
        }
        let t = self.settings.timeouts.clone();
        let deadline = tokio::time::Instant::now() + t.client_startup;
        let negotiated = unless_shutdown(
            &self.shared,
            timeout_at(
                deadline,
                conn.negotiate(self.listener.acceptor.as_ref(), self.listener.client_tls),
            ),
        )
        .await;
        let Some(negotiated) = negotiated else {
            return unstarted_at_shutdown();
        };
        let negotiated = negotiated.unwrap_or(Err(SessionError::ClientTimeout(t.client_startup)));
        self.facts.client_tls = Some(conn.transport.clone());
        // Negotiation read in generous chunks; a login that stalls from
        // here on holds only what is left unread (issue 19 item 18).
        conn.buf.shrink_to_fit();
        if conn.is_tls() {
            conn.binding = self.listener.binding.clone();
        }
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

        if !self.shared.audit.accepting() {
            return self.reject(&mut conn, SessionError::AuditUnavailable).await;
        }

        // Who is this, and may they? Decided before any upstream is used.
        let identity = match self.identify(conn.peer_cert.as_deref()).await {
            Ok(identity) => identity,
            Err(e) => return self.reject(&mut conn, e.into()).await,
        };
        let upstream = self.listener.upstream.clone();
        let upstream = &*upstream;
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
        let audit_queries = decision.audit_queries;
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
        if startup.database() == console::DATABASE {
            return self
                .console(conn, decision.admin, identity_text, pending)
                .await;
        }
        let startup = self.forwarded_startup(startup);

        // Per identity (a rule's max_sessions): held for the session.
        let _identity_permit = match decision.max_sessions {
            None => None,
            Some(limit) => match self.identity_slot(&identity_text, limit).await {
                Ok(p) => Some(p),
                Err(fleet) => {
                    let err = SessionError::IdentityLimit {
                        identity: identity_text,
                        limit,
                        rule: decision.rule.clone().unwrap_or_default(),
                        fleet,
                    };
                    return self.reject(&mut conn, err).await;
                }
            },
        };
        // Counted against limits.max_sessions only once authenticated
        // (issue 19 item 8): logins in progress are bounded by the pending
        // slots, and strangers must never take the places of sessions.
        let max_sessions = self
            .shared
            .limits
            .max_sessions
            .load(std::sync::atomic::Ordering::SeqCst);
        let mut _session_slot = None;

        let auth_deadline = tokio::time::Instant::now() + t.authentication;
        let mut auth_facts = AuthFacts::new(upstream.config.auth_mode());
        // Identity login: the policy admitted a person or service and says
        // pgbastion logs in for it; the client is asked for nothing.
        let credential = match decision.login {
            Login::Password => None,
            Login::Identity => {
                auth_facts.mode = LoginMode::Identity;
                match self.identity_credential(upstream, startup.user()) {
                    // Known by certificate or tailnet: authenticated now.
                    Ok(found) => {
                        auth_facts.credential = Some(found.kind);
                        let Some(slot) = self.shared.sessions.try_acquire((), max_sessions) else {
                            let err = SessionError::TooManySessions(max_sessions);
                            return self.reject_with(&mut conn, err, Some(&auth_facts)).await;
                        };
                        _session_slot = Some(slot);
                        Some(found)
                    }
                    Err(e) => {
                        return self
                            .reject_with(&mut conn, e.into(), Some(&auth_facts))
                            .await
                    }
                }
            }
        };

        // scram mode: the client proves itself before any server connection
        // is made, so a throttled, wrong or stalling client costs no server
        // backend (and cannot use up the server's connection slots).
        let proven = match (&upstream.scram, &credential) {
            (Some(scram), None) => match unless_shutdown(
                &self.shared.clone(),
                timeout_at(
                    auth_deadline,
                    self.prove_client(&mut conn, scram, upstream, startup.user(), &mut auth_facts),
                ),
            )
            .await
            {
                Some(Ok(Ok(proven))) => {
                    let Some(slot) = self.shared.sessions.try_acquire((), max_sessions) else {
                        let err = SessionError::TooManySessions(max_sessions);
                        return self.reject_with(&mut conn, err, Some(&auth_facts)).await;
                    };
                    _session_slot = Some(slot);
                    Some(proven)
                }
                Some(Ok(Err(e))) => return self.reject_auth(&mut conn, e, &auth_facts).await,
                Some(Err(_)) => {
                    let e = AuthError::Timeout(t.authentication);
                    return self.reject_auth(&mut conn, e, &auth_facts).await;
                }
                None => {
                    return self
                        .reject_with(&mut conn, SessionError::ShuttingDown, Some(&auth_facts))
                        .await
                }
            },
            _ => None,
        };

        let proxy_header = self.outbound_proxy_header(upstream, conn.peer_cert.as_deref());
        let presenting = credential.as_ref().and_then(|f| match &*f.held {
            Held::ClientCert { connector, .. } => Some(connector),
            _ => None,
        });
        let mut up = match upstream
            .connect_presenting(
                presenting,
                t.upstream_connect,
                t.upstream_tls,
                proxy_header.as_deref(),
            )
            .await
        {
            Ok(up) => up,
            Err(e) => {
                return self
                    .reject_with(&mut conn, e.into(), Some(&auth_facts))
                    .await
            }
        };
        self.shared.metrics.upstream_connected(
            &upstream.config.name,
            up.timing.connect,
            up.timing.tls,
        );
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

        let cancel = CancelContext {
            registry: self.shared.cancels.clone(),
            session_id: self.facts.session_id.clone(),
            upstream: self.listener.upstream.clone(),
            addr: up.addr,
        };
        let mut auth = match (proven, credential) {
            (_, Some(found)) => {
                let login = timeout_at(
                    auth_deadline,
                    self.log_in_for_identity(
                        &mut conn,
                        &mut up,
                        upstream,
                        startup.user(),
                        &found,
                        &mut auth_facts,
                    ),
                )
                .await
                .unwrap_or(Err(IdentityLoginError::Timeout(t.authentication)));
                match login {
                    Ok(server_leftover) => AuthPhase::after_login(
                        std::mem::take(&mut conn.buf),
                        server_leftover,
                        cancel,
                    ),
                    Err(e) => {
                        return self
                            .reject_with(&mut conn, e.into(), Some(&auth_facts))
                            .await
                    }
                }
            }
            (None, None) => {
                let mut phase =
                    AuthPhase::new(std::mem::take(&mut conn.buf), !conn.is_tls(), cancel);
                phase.session_slot = Some(crate::auth::passthrough::SessionSlot {
                    slots: self.shared.sessions.clone(),
                    limit: max_sessions,
                    held: None,
                });
                phase
            }
            (Some(proven), None) => {
                let login = timeout_at(
                    auth_deadline,
                    self.log_in(&mut conn, &mut up, startup.user(), proven, &mut auth_facts),
                )
                .await
                .unwrap_or(Err(AuthError::Timeout(t.authentication)));
                match login {
                    Ok(server_leftover) => AuthPhase::after_login(
                        std::mem::take(&mut conn.buf),
                        server_leftover,
                        cancel,
                    ),
                    Err(e) => return self.reject_auth(&mut conn, e, &auth_facts).await,
                }
            }
        };
        auth.counts.client_to_server = startup.as_bytes().len() as u64;
        let auth_result = unless_shutdown(
            &self.shared.clone(),
            timeout_at(auth_deadline, auth.run(&mut conn.io, &mut up.stream)),
        )
        .await
        .map_or(Err(AuthEnd::Shutdown), |r| {
            r.unwrap_or(Err(AuthEnd::Timeout(t.authentication)))
        });
        // Authenticated (or finished): the connection leaves the pending
        // slots, which bound what strangers can hold.
        drop(pending);
        let _passthrough_slot = auth.session_slot.take();
        match auth_result {
            Err(AuthEnd::ChannelBinding) => {
                auth.outcome = AuthOutcome::RefusedByProxy {
                    sqlstate: "28000".into(),
                };
            }
            Err(AuthEnd::TooManySessions(_)) => {
                auth.outcome = AuthOutcome::RefusedByProxy {
                    sqlstate: "53300".into(),
                };
            }
            _ => {}
        }
        auth_facts.outcome = auth.outcome.clone();
        if auth_facts.mode == LoginMode::Passthrough {
            // One exchange, end to end: the same mechanism on both legs,
            // never bound (pgbastion refuses -PLUS in this mode).
            let leg = auth.mechanism.take().map(|mechanism| LegAuth {
                mechanism,
                channel_binding: false,
            });
            auth_facts.server = leg.clone();
            auth_facts.client = leg;
        }
        let mut query_audit = (audit_queries == crate::policy::AuditQueries::Statements).then_some(
            crate::audit::QueryAuditFacts {
                mode: "statements",
                statements: None,
                stopped: None,
            },
        );
        self.shared.record(&Event::Start {
            facts: &self.facts,
            upstream: &upstream_facts,
            auth: &auth_facts,
            query_audit: query_audit.as_ref(),
        });
        info!(
            user = %startup.user(),
            database = %startup.database(),
            upstream = %upstream_facts.addr,
            auth = ?auth_facts.outcome,
            mode = ?auth_facts.mode,
            "session started"
        );

        let (end_reason, detail, counts) = match auth_result {
            Ok(()) => {
                // What followed the login's ReadyForQuery went on already
                // (a query pipelined behind the login): the relay starts busy.
                let pipelined = !auth.client_buf.is_empty() || !auth.server_buf.is_empty();
                // The authentication buffers are not needed any more; an
                // idle session should hold as little memory as possible.
                auth.client_buf = Vec::new();
                auth.server_buf = Vec::new();
                let mut shutdown = self.shared.shutdown.subscribe();
                let progress = Arc::new(relay::Progress::default());
                progress
                    .busy
                    .store(pipelined, std::sync::atomic::Ordering::Relaxed);
                let (_live, mut kill) = self.shared.live.register(SessionInfo {
                    id: self.facts.session_id.clone(),
                    identity: self
                        .facts
                        .identity
                        .as_ref()
                        .map_or_else(String::new, ToString::to_string),
                    client: self.facts.client.to_string(),
                    user: startup.user().to_owned(),
                    database: startup.database().to_owned(),
                    upstream: upstream_facts.name.clone(),
                    client_tls: conn.is_tls(),
                    upstream_tls: true,
                    since: std::time::SystemTime::now(),
                    progress: progress.clone(),
                });
                // Query audit only for sessions whose rule asks for it; the
                // others' relay never looks at the bytes.
                let mut queries =
                    (audit_queries == crate::policy::AuditQueries::Statements).then(|| {
                        // "true"/"database" open a replication connection
                        // ("false"/"off" do not).
                        let replication = startup.param("replication").is_some_and(|v| {
                            !matches!(
                                v.to_ascii_lowercase().as_str(),
                                "false" | "off" | "no" | "0"
                            )
                        });
                        self.query_tracker(replication)
                    });
                let (end, counts) = relay::relay(
                    &mut *conn.io,
                    &mut up.stream,
                    t.half_close,
                    &mut shutdown,
                    &mut kill,
                    &progress,
                    queries.as_mut(),
                )
                .await;
                if let (Some(q), Some(facts)) = (&queries, &mut query_audit) {
                    facts.statements = Some(q.recorded());
                    facts.stopped = q.stopped();
                    if let Some(why) = q.stopped() {
                        warn!(reason = why, "query audit stopped for this session");
                    }
                }
                let hung_up = matches!(
                    end,
                    relay::RelayEnd::ClientClosed | relay::RelayEnd::ClientError(_)
                ) && counts.client_to_server == 0;
                let detail = match &end {
                    _ if hung_up && auth_facts.mode == LoginMode::Identity => {
                        Some(identity_hangup(&end.reason()))
                    }
                    relay::RelayEnd::ClientError(d) | relay::RelayEnd::ServerError(d) => {
                        Some(d.clone())
                    }
                    _ => None,
                };
                (end.reason(), detail, counts)
            }
            Err(end) => {
                if let Some(err) = end.client_error() {
                    conn.send_error(&err.encode()).await;
                }
                let _ = tokio::time::timeout(ERROR_WRITE_TIMEOUT, async {
                    let _ = up.stream.shutdown().await;
                    let _ = conn.io.shutdown().await;
                })
                .await;
                // libpq accepts no message before AuthenticationOk but an
                // error, and a client with channel_binding=require hangs up
                // on an AuthenticationOk that came without a SCRAM exchange:
                // this is the one place that can say so.
                let detail = match (&end, auth_facts.mode) {
                    (AuthEnd::ClientClosed | AuthEnd::ClientIo(_), LoginMode::Identity) => {
                        identity_hangup(&end)
                    }
                    _ => end.to_string(),
                };
                warn!(
                    reason = end.reason().as_str(),
                    "session ended during authentication: {detail}"
                );
                (end.reason(), Some(detail), ByteCounts::default())
            }
        };
        let total = ByteCounts {
            client_to_server: auth.counts.client_to_server + counts.client_to_server,
            server_to_client: auth.counts.server_to_client + counts.server_to_client,
        };
        if let Some(q) = &mut query_audit {
            // Ended before the relay: no statement was run.
            q.statements.get_or_insert(0);
        }
        self.shared.record(&Event::End {
            facts: &self.facts,
            upstream: &upstream_facts,
            auth: &auth_facts,
            bytes_client_to_server: total.client_to_server,
            bytes_server_to_client: total.server_to_client,
            duration_ms: self.elapsed_ms(),
            end_reason,
            detail: detail.as_deref(),
            query_audit: query_audit.as_ref(),
        });
        info!(
            reason = end_reason.as_str(),
            bytes_in = total.client_to_server,
            bytes_out = total.server_to_client,
            "session ended"
        );
    }

    /// scram mode, before any server connection: is this client throttled,
    /// and which verifier does its user have? Unknown users get a mock one.
    async fn find_verifier(
        &self,
        scram: &ScramAuth,
        upstream: &Upstream,
        user: &str,
    ) -> Result<FoundVerifier, AuthError> {
        use crate::auth::throttle::LoginCheck;
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
        match scram.lookup(user, upstream, &self.settings.timeouts).await {
            Ok(Lookup::Found(verifier, source)) => Ok(FoundVerifier {
                verifier,
                source: Some(source),
                unusable: None,
                proof_only,
            }),
            Ok(Lookup::Unknown) => Ok(FoundVerifier {
                verifier: scram.mock_verifier(user),
                source: None,
                unusable: None,
                proof_only,
            }),
            // issue 19 item 4: as PostgreSQL, a full mock exchange and the
            // answer to a wrong password, so nobody learns without a
            // password that the user exists and how its password is kept.
            Ok(Lookup::Unusable(secret, from)) => Ok(FoundVerifier {
                verifier: scram.mock_verifier(user),
                source: None,
                unusable: Some((secret, from)),
                proof_only,
            }),
            Err(source) => Err(AuthError::VerifierUnavailable {
                user: user.to_owned(),
                source,
            }),
        }
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
        let offer = Offer {
            binding: conn.binding.as_deref(),
        };
        let proved = terminate::prove_client(
            &mut conn.io,
            &mut conn.buf,
            offer,
            user,
            &found.verifier,
            found.source.is_some(),
            &mut facts.client,
        )
        .await;
        let proven = match proved {
            Ok(p) => p,
            Err(e) => {
                let e = match (e, found.unusable) {
                    (AuthError::Failed { .. }, Some((secret, from))) => AuthError::NotScram {
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
                        return Err(AuthError::Throttled(throttled));
                    }
                }
                return Err(e);
            }
        };
        if found.proof_only.is_some() && found.source.is_some() {
            info!(%user, "the user's failed-login budget is spent; admitted with a correct proof from an address with no recent failures");
        }
        match found.source {
            Some(source) => Ok(ProvenClient {
                proven,
                verifier: found.verifier,
                source,
            }),
            // prove_client never succeeds for a mock verifier.
            None => Err(AuthError::Failed {
                user: user.to_owned(),
                known: false,
            }),
        }
    }

    /// scram mode, on a verified server connection that has the
    /// StartupMessage: log in with the key the client revealed, and let the
    /// client in once the server has proved itself. Returns the server
    /// bytes read past its AuthenticationOk.
    async fn log_in(
        &self,
        conn: &mut ClientConn,
        up: &mut UpstreamConn,
        user: &str,
        client: ProvenClient,
        facts: &mut AuthFacts,
    ) -> Result<Vec<u8>, AuthError> {
        let mut server_buf = Vec::new();
        // What the server says before asking for authentication
        // (NegotiateProtocolVersion, notices) belongs to the client.
        let mut early = Vec::new();
        let first = login::first_request(&mut up.stream, &mut server_buf, |m| early.extend(m))
            .await
            .map_err(AuthError::before_proof)?;
        if !early.is_empty() {
            wire::send(&mut conn.io, &early).await?;
        }
        if let AuthRequest::Other(_) | AuthRequest::Md5Password(_) = first {
            return Err(AuthError::ServerMethod(first.code()));
        }
        let credential = Credential::Keys {
            client_key: &client.proven.client_key,
            verifier: &client.verifier,
        };
        let binding = up.channel_binding();
        let server_leg = login::complete(
            &mut up.stream,
            &mut server_buf,
            user,
            first,
            binding,
            &credential,
        )
        .await
        .map_err(|e| AuthError::from_server(e, user, &client.source))?;
        facts.server = Some(server_leg);
        terminate::welcome_client(&mut conn.io, &client.proven).await?;
        facts.outcome = AuthOutcome::Ok;
        Ok(server_buf)
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

    /// Identity login, on a verified server connection that has the
    /// StartupMessage: log in with the credential, then tell the client
    /// AuthenticationOk. Returns the server bytes read past its own.
    async fn log_in_for_identity(
        &self,
        conn: &mut ClientConn,
        up: &mut UpstreamConn,
        upstream: &Upstream,
        user: &str,
        found: &Found,
        facts: &mut AuthFacts,
    ) -> Result<Vec<u8>, IdentityLoginError> {
        let mut server_buf = Vec::new();
        let mut early = Vec::new();
        let first = login::first_request(&mut up.stream, &mut server_buf, |m| early.extend(m))
            .await
            .map_err(|e| identity_login::refusal(e, user, found.kind))?;
        if !early.is_empty() {
            wire::send(&mut conn.io, &early)
                .await
                .map_err(IdentityLoginError::Client)?;
        }
        let target = LoginTarget {
            host: &upstream.config.host,
            port: upstream.config.port,
            user,
        };
        let binding = up.channel_binding();
        let leg = identity_login::log_in(
            &mut up.stream,
            &mut server_buf,
            first,
            binding,
            &target,
            found,
        )
        .await?;
        facts.server = Some(leg);
        let out = message::authentication_ok();
        wire::send(&mut conn.io, &out)
            .await
            .map_err(IdentityLoginError::Client)?;
        facts.outcome = AuthOutcome::Ok;
        Ok(server_buf)
    }

    /// Whether the client is known as a person or service (a certificate
    /// or tailnet identity), not only by its address: what identity login
    /// and the admin console require (check-config keeps such rules off
    /// address-only listeners; this holds even if it did not).
    fn is_person(&self) -> bool {
        self.facts
            .identity
            .as_ref()
            .is_some_and(|i| i.source != IdentitySource::Network)
    }

    /// The admin console (database `pgbastion`), for identities a rule
    /// marks `admin = true`; a person, never just an address.
    async fn console(
        self,
        mut conn: ClientConn,
        admin: bool,
        identity: String,
        pending: PendingPermit,
    ) {
        if !admin || !self.is_person() {
            return self
                .reject(&mut conn, SessionError::NotAdmin { identity })
                .await;
        }
        drop(pending);
        let shared = self.shared.clone();
        let record = |what: &str| {
            shared.audit.emit(&Event::Console {
                facts: &self.facts,
                command: what,
                result: "ok".into(),
            })
        };
        record("(console session start)");
        info!("admin console session started");
        let served = unless_shutdown(
            &shared,
            console::serve(&mut *conn.io, &mut conn.buf, &self.shared, &self.facts),
        )
        .await;
        let end = match served {
            Some(end) => end,
            None => {
                let _ = tokio::time::timeout(
                    ERROR_WRITE_TIMEOUT,
                    conn.io.write_all(&relay::shutdown_error()),
                )
                .await;
                "shutdown"
            }
        };
        record(&format!("(console session end: {end})"));
        let _ = conn.io.shutdown().await;
    }

    /// Refuses a scram-mode login: like `reject`, with how far
    /// authentication got in the audit event.
    async fn reject_auth(self, conn: &mut ClientConn, err: AuthError, facts: &AuthFacts) {
        // What the operator must fix is logged off the session's path,
        // after the client has its answer: a user whose password pgbastion
        // cannot use must take exactly as long to refuse as a wrong
        // password (the client is told only "password authentication
        // failed"), so the time of the answer does not say which it was.
        let session = self.facts.session_id.clone();
        let note: Option<Box<dyn FnOnce() + Send>> = match &err {
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
        };
        self.reject_with(conn, err.into(), Some(facts)).await;
        if let Some(note) = note {
            tokio::spawn(async move { note() });
        }
    }

    /// Reads the load balancer's PROXY header, refusing untrusted sources
    /// before reading a byte. Afterwards the header's source is the client
    /// address everywhere (policy, audit, logs, rate limits). Returns that
    /// address, if the header states one.
    async fn read_proxy_header(
        &mut self,
        conn: &mut ClientConn,
    ) -> Result<Option<std::net::IpAddr>, SessionError> {
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
        let limit = self.settings.timeouts.proxy_header;
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
        if let Some(src) = header.source().map(crate::server::canonical) {
            self.peer = Some(src);
            self.facts.client = ClientAddress::tcp(src);
            if let Addresses::Tcp { dst, .. } = header.addresses {
                self.local = Some(crate::server::canonical(dst));
            }
            // Every later log line of the session names the real client.
            tracing::Span::current().record("client", tracing::field::display(&self.facts.client));
            debug!(%via, "client address from PROXY header");
        }
        let stated = header.source().map(|s| s.ip().to_canonical());
        self.facts.proxy = Some(ProxyFacts {
            via,
            version: header.version,
            command: header.command,
            tlvs: header.tlvs,
        });
        Ok(stated)
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
                let whois = self.settings.whois.as_ref().ok_or_else(|| {
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
        let Some(identity) = &self.facts.identity else {
            return startup;
        };
        let source = match identity.source {
            IdentitySource::Network => "network",
            IdentitySource::ClientCert => "client_cert",
            IdentitySource::Tailscale => "tailscale",
        };
        let client_addr = self
            .peer
            .map_or_else(|| "local".to_owned(), |p| p.ip().to_string());
        let expand = |template: &str, startup: &StartupMessage| {
            template
                .replace(
                    "{application_name}",
                    startup.application_name().unwrap_or(""),
                )
                .replace("{identity}", &identity.name)
                .replace("{node}", identity.node.as_deref().unwrap_or(""))
                .replace("{source}", source)
                .replace("{session_id}", &self.facts.session_id)
                .replace("{client_addr}", &client_addr)
                // A NUL would end the value early in the StartupMessage.
                .replace('\0', "")
        };
        let mut startup = startup;
        if let Some(template) = &self.settings.application_name {
            let value = expand(template, &startup);
            startup = startup.with_param("application_name", &value);
        }
        // Replaces what the client sent under the same names: the server
        // sees pgbastion's values, never the client's.
        for (name, template) in &self.settings.forward_settings {
            let value = expand(template, &startup);
            startup = startup.with_param(name, &value);
        }
        startup
    }

    /// Handles a CancelRequest: honoured only with a key pgbastion issued to
    /// a live session, forwarded to that session's server with the real key.
    /// Like PostgreSQL, the client is told nothing either way, and its
    /// connection is closed once the request has been dealt with.
    async fn cancel(self, mut conn: ClientConn, req: CancelKey) {
        let client_ip = crate::auth::throttle::address_key(
            self.peer.map(|p| p.ip()),
            self.settings.limits.ipv6_prefix,
        );
        let delivery = if !self.shared.cancels.allow(client_ip) {
            CancelDelivery::refused(CancelOutcome::RateLimited)
        } else if self.facts.client_tls == Some(ClientTransport::Plaintext)
            && self.listener.cancel_plaintext == CancelPlaintext::Deny
        {
            CancelDelivery::refused(CancelOutcome::PlaintextRefused)
        } else {
            match self.shared.cancels.lookup(&req) {
                Some(target) => {
                    let upstream = target.upstream.clone();
                    let sent = upstream
                        .cancel(
                            target.addr,
                            &target.real,
                            self.settings.timeouts.cancel,
                            self.outbound_proxy_header(&upstream, None).as_deref(),
                        )
                        .await;
                    CancelDelivery::sent(target.session_id, None, sent)
                }
                None => match &self.shared.cluster {
                    None => CancelDelivery::refused(CancelOutcome::Unmatched),
                    Some(fleet) => self.remote_cancel(fleet, &req).await,
                },
            }
        };
        // Only now is the client's connection closed, cleanly (TLS
        // close_notify, then FIN): libpq takes that close as the sign its
        // cancel was delivered, as PostgreSQL closes once it has acted, and
        // over TLS a close without close_notify reads as an error.
        let _ = tokio::time::timeout(ERROR_WRITE_TIMEOUT, conn.io.shutdown()).await;
        drop(conn);
        let CancelDelivery {
            target_id,
            instance,
            outcome,
            detail,
        } = delivery;
        let target_id = target_id.as_deref().unwrap_or("unmatched");
        // A forwarded cancel is always logged and audited; the rest
        // (unknown keys, rate limits) is what a stranger can flood.
        let forwarded = outcome.is_forwarded();
        if forwarded || self.shared.warn_limit.allow(outcome.as_str()) {
            info!(
                target = target_id,
                session_instance = instance.as_deref(),
                outcome = outcome.as_str(),
                "cancel request"
            );
        }
        let event = Event::Cancel {
            facts: &self.facts,
            target_session_id: target_id,
            session_instance: instance.as_deref(),
            outcome,
            detail,
        };
        if forwarded || self.shared.audit_limit.allow(outcome.as_str()) {
            self.shared.record(&event);
        } else {
            self.shared.metrics.observe(&event);
        }
    }

    /// The query audit for this session: each statement becomes a `query`
    /// event with the session's facts.
    fn query_tracker(&self, replication: bool) -> crate::audit::query::QueryTracker {
        let shared = self.shared.clone();
        let facts = self.facts.clone();
        let (stop_shared, stop_facts) = (shared.clone(), facts.clone());
        crate::audit::query::QueryTracker::for_session(
            self.settings.redact_queries,
            replication,
            Box::new(move |r| record_query(&shared, &facts, &r)),
        )
        .on_stop(Box::new(move |why| {
            warn!(session = %stop_facts.session_id, why, "the query audit lost its place; the session's later statements are not recorded");
            let recorded = stop_shared.record(&Event::QueryAuditStopped {
                facts: &stop_facts,
                why,
            });
            recorded && stop_shared.audit.on_failure() != crate::config::AuditOnFailure::Refuse
        }))
    }

    /// One of the `limit` sessions a rule allows `identity`: on this
    /// instance and, with `[cluster]`, across the fleet (when Redis cannot
    /// be asked, this instance's count alone decides). Err(true): the fleet
    /// is full; Err(false): this instance is.
    async fn identity_slot(&self, identity: &str, limit: usize) -> Result<IdentitySlot, bool> {
        let local = self
            .shared
            .identity_sessions
            .try_acquire(identity.to_owned(), limit)
            .ok_or(false)?;
        let fleet = match &self.shared.cluster {
            None => None,
            Some(fleet) => {
                match fleet
                    .hold_identity(identity, limit, &self.facts.session_id)
                    .await
                {
                    Ok(crate::cluster::Admission::Held(slot)) => Some(slot),
                    Ok(crate::cluster::Admission::Full(_)) => return Err(true),
                    Err(crate::cluster::Unavailable) => {
                        if self.shared.warn_limit.allow("cluster_limits_local") {
                            warn!(identity, "Redis is unavailable: max_sessions is counted on this instance only");
                        }
                        None
                    }
                }
            }
        };
        Ok(IdentitySlot {
            _local: local,
            _fleet: fleet,
        })
    }

    /// A cancel for a session of another instance of the fleet: looked up
    /// in Redis and forwarded from here, to the server and address the
    /// session uses, with the server's real key.
    async fn remote_cancel(
        &self,
        fleet: &crate::cluster::Cluster,
        req: &CancelKey,
    ) -> CancelDelivery {
        let found = match fleet.find_cancel(req).await {
            Err(crate::cluster::Unavailable) => {
                return CancelDelivery::refused(CancelOutcome::ClusterUnavailable)
            }
            // Our own instance's mapping for a session that has ended (the
            // local registry no longer has it): nothing to cancel.
            Ok(Some(remote)) if remote.instance != fleet.instance() => remote,
            Ok(_) => return CancelDelivery::refused(CancelOutcome::Unmatched),
        };
        let Some(upstream) = self
            .shared
            .upstreams()
            .into_iter()
            .find(|u| u.config.name == found.upstream)
        else {
            return CancelDelivery {
                target_id: Some(found.session_id),
                detail: Some(format!(
                    "upstream {:?} of instance {:?} is not configured here: every instance needs the same upstreams",
                    found.upstream, found.instance
                )),
                instance: Some(found.instance),
                outcome: CancelOutcome::UpstreamFailed,
            };
        };
        let sent = upstream
            .cancel(
                found.addr,
                &found.real_key(),
                self.settings.timeouts.cancel,
                self.outbound_proxy_header(&upstream, None).as_deref(),
            )
            .await;
        CancelDelivery::sent(found.session_id, Some(found.instance), sent)
    }

    /// Refuses a session before any upstream was used: tells the client
    /// (when there is a channel), logs, and audits.
    async fn reject(self, conn: &mut ClientConn, err: SessionError) {
        self.reject_with(conn, err, None).await
    }

    async fn reject_with(self, conn: &mut ClientConn, err: SessionError, auth: Option<&AuthFacts>) {
        // A connection that closed without sending anything (a port probe,
        // a load balancer's health check) is not worth an audit event.
        if matches!(err, SessionError::ClientClosedEarly)
            && self.facts.requested.is_none()
            && conn.buf.is_empty()
        {
            debug!("connection closed before a startup packet");
            return;
        }
        let response = err.client_message();
        if let Some(bytes) = &response {
            conn.send_error(bytes).await;
        }
        let sqlstate = response.as_deref().and_then(sqlstate_of);
        if self.shared.warn_limit.allow(err.reason().as_str()) {
            warn!(reason = err.reason().as_str(), "session refused: {err}");
        }
        // Refusals before a StartupMessage name no user: a flood of them is
        // summarised in the audit log too. Every refusal of a session that
        // asked for a user and database is audited.
        let event = Event::Rejected {
            facts: &self.facts,
            reason: err.reason(),
            sqlstate: sqlstate.as_deref(),
            message: err.to_string(),
            duration_ms: self.elapsed_ms(),
            auth,
        };
        if self.facts.requested.is_none() && !self.shared.audit_limit.allow(err.reason().as_str()) {
            self.shared.metrics.observe(&event);
            return;
        }
        self.shared.record(&event);
    }
}
