//! One client connection, from accept to its last audit event, as stages
//! in their own files, each returning what the next one takes (`run`
//! reads top to bottom in this order):
//! 1. `negotiate`: the PROXY header, then the first packets (SSLRequest,
//!    GSSENCRequest, direct TLS, CancelRequest, StartupMessage), upgrading
//!    the client leg to TLS. A CancelRequest takes the short path in
//!    `cancel`.
//! 2. `admit`: identity, routing (`route`: which upstream, from the TLS
//!    server name, `options=endpoint=` and the database), policy, the
//!    admin console branch, the rule's per-identity session limit.
//! 3. `login::plan`: how the client logs in (`LoginPlan`). scram mode
//!    proves the client here and identity login finds its credential, so
//!    an unauthenticated client never costs a server connection.
//! 4. `connect`: dial and verify the upstream, then forward the
//!    StartupMessage — only now does the server learn anything.
//! 5. `login::log_in` and `login::auth_phase`: log in to the server as the
//!    plan says, then relay the rest of startup message by message until
//!    ReadyForQuery (in passthrough mode the whole authentication, watched
//!    for its outcome and for channel binding).
//!    A pooled upstream takes `pooled` here instead of 4–6: the client
//!    logs in against the pool and `pool::relay` runs the session.
//! 6. `finish`: the start event, `relay::relay` until either side ends,
//!    the end event; or, for a session refused on the way, the rejection.
//!
//! Every refusal is a `SessionError` (in `error`), whose `client_message`
//! is the one place that decides what the client is told.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use crate::audit::{AuthFacts, Carrier, ClientAddress, SessionFacts};
use crate::limits::keyed_slots::KeyedPermit;
use crate::limits::pending::PendingPermit;
use crate::relay;
use crate::server::{ListenerInfo, Shared};
use crate::stream::BoxedIo;

mod admit;
mod authenticate;
mod cancel;
mod connect;
mod error;
mod finish;
mod login;
mod negotiate;
mod pooled;
mod route;

pub use error::SessionError;

use admit::{Admission, Admitted};
pub(crate) use negotiate::ClientConn;
use negotiate::Negotiated;

/// How a session leaves before its relay.
enum Exit {
    /// Closed without a word to the client and without an audit event
    /// (shutting down before the startup packet, no pending slot left for
    /// the address a PROXY header states).
    Silent,
    /// Refused: the client is told what the error says, and the refusal
    /// is logged and audited, with how far authentication got once it
    /// began.
    Refused(Box<Refusal>),
}

/// A refusal: the error, how far authentication got once it began, and
/// the session's place under `limits.max_sessions` if it had one: held
/// until the client has been told, so a refused session's client and
/// server connections never count beside the session that takes its place.
struct Refusal {
    err: SessionError,
    auth: Option<AuthFacts>,
    held: Option<KeyedPermit<()>>,
}

impl Exit {
    fn refused(err: impl Into<SessionError>) -> Exit {
        Exit::Refused(Box::new(Refusal {
            err: err.into(),
            auth: None,
            held: None,
        }))
    }

    fn refused_in_login(err: impl Into<SessionError>, auth: &AuthFacts) -> Exit {
        Exit::Refused(Box::new(Refusal {
            err: err.into(),
            auth: Some(auth.clone()),
            held: None,
        }))
    }

    /// This refusal, keeping `slot` until the client has been told.
    fn holding(self, slot: KeyedPermit<()>) -> Exit {
        match self {
            Exit::Refused(mut refusal) => {
                refusal.held = Some(slot);
                Exit::Refused(refusal)
            }
            Exit::Silent => Exit::Silent,
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
    let session = Session::new(peer, local, listener, shared);
    let span = session.span();
    let conn = ClientConn::new(io);
    session.run(conn, Some(pending)).instrument(span).await
}

/// A client stream an https listener carries to a session (`crate::http`):
/// already inside TLS, past any PROXY header, its client address settled.
pub(crate) struct Carried {
    pub io: BoxedIo,
    pub carrier: Carrier,
    pub tls: crate::tls::TlsInfo,
    /// The verified client certificate (leaf), when one was presented.
    pub peer_cert: Option<Vec<u8>>,
    /// The name routing uses for the TLS server name: the SNI, else the
    /// WebSocket's `Host`; for SQL over HTTP the connection string's host.
    pub server_name: Option<String>,
    /// What the balancer's PROXY header said (its source is `peer`).
    pub proxy: Option<crate::audit::ProxyFacts>,
    /// The balancer whose `X-Forwarded-For` stated `peer`.
    pub forwarded_by: Option<ClientAddress>,
}

/// Runs a carried client stream (a WebSocket, or one SQL-over-HTTP
/// request) through the same stages as a socket, from the StartupMessage
/// on. `pending`: the connection's slot, when it still holds one.
pub(crate) async fn handle_carried(
    carried: Carried,
    peer: Option<std::net::SocketAddr>,
    local: Option<std::net::SocketAddr>,
    listener: Arc<ListenerInfo>,
    shared: Arc<Shared>,
    pending: Option<PendingPermit>,
) {
    let mut session = Session::new(peer, local, listener, shared);
    session.facts.transport = Some(carried.carrier);
    session.facts.proxy = carried.proxy;
    session.facts.forwarded_by = carried.forwarded_by;
    session.routing_name = carried.server_name;
    let span = session.span();
    let conn = ClientConn::carried(carried.io, carried.carrier, carried.tls, carried.peer_cert);
    session.run(conn, pending).instrument(span).await
}

struct Session {
    started: Instant,
    /// Stands in for the TLS server name in routing (carried sessions).
    routing_name: Option<String>,
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
    fn new(
        peer: Option<std::net::SocketAddr>,
        local: Option<std::net::SocketAddr>,
        listener: Arc<ListenerInfo>,
        shared: Arc<Shared>,
    ) -> Session {
        let client = peer.map_or_else(ClientAddress::unix, ClientAddress::tcp);
        Session {
            started: Instant::now(),
            routing_name: None,
            facts: SessionFacts {
                session_id: new_session_id(),
                listener: listener.name.clone(),
                client,
                client_tls: None,
                transport: None,
                forwarded_by: None,
                requested: None,
                identity: None,
                proxy: None,
                rule: None,
                route: None,
            },
            peer,
            local,
            listener,
            settings: shared.settings(),
            shared,
        }
    }

    /// The span every log line of the session is in.
    fn span(&self) -> tracing::Span {
        tracing::info_span!("session", id = %self.facts.session_id, client = %self.facts.client, listener = %self.listener.name)
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The stages, in order; each failure ends the session through `exit`.
    ///
    /// The stages a session lives in until it ends (`run`, `direct`,
    /// `finish`, `pooled`, `pooled_session`) are plain functions returning
    /// an `async move` block, not `async fn`s: rustc (1.95) keeps an
    /// `async fn`'s arguments twice in its future, once as passed and once
    /// as moved into the body, and a session future lasts as long as the
    /// session. With the session borrowed by the later stages, this took an
    /// idle TLS session from 38.5 to 27.3 KiB (docs/performance.md).
    // Written out on purpose: an `async fn` keeps its arguments twice.
    #[allow(clippy::manual_async_fn)]
    fn run(
        mut self,
        mut conn: ClientConn,
        mut pending: Option<PendingPermit>,
    ) -> impl Future<Output = ()> {
        async move {
            let negotiated = match conn.carrier {
                None => Box::pin(self.negotiate(&mut conn, &mut pending)).await,
                Some(_) => Box::pin(self.negotiate_carried(&mut conn)).await,
            };
            let startup = match negotiated {
                Ok(Negotiated::Startup(startup)) => startup,
                Ok(Negotiated::Cancel(key)) => return Box::pin(self.cancel(conn, key)).await,
                Err(exit) => return Box::pin(self.exit(&mut conn, exit)).await,
            };
            let admitted = match Box::pin(self.admit(conn.peer_cert.as_deref(), startup)).await {
                Ok(Admission::Session(admitted)) => admitted,
                Ok(Admission::Console { admin, identity }) => {
                    return Box::pin(self.console(conn, admin, identity, pending)).await
                }
                Err(exit) => return Box::pin(self.exit(&mut conn, exit)).await,
            };
            let deadline = tokio::time::Instant::now() + self.settings.timeouts.authentication;
            let mut auth_facts = AuthFacts::new(admitted.route.upstream.config.auth_mode());
            // Boxed, like every stage that only a login or a refusal needs: a
            // session's future is as large as its largest stage, for as long as
            // the session lives (proving a SCRAM client is about 12 KiB of it).
            let plan =
                match Box::pin(self.plan_login(&mut conn, &admitted, &mut auth_facts, deadline))
                    .await
                {
                    Ok(plan) => plan,
                    Err(exit) => return Box::pin(self.exit(&mut conn, exit)).await,
                };
            if let Some(pools) = admitted.route.pools.clone() {
                drop(pending);
                // Boxed: its state stays out of every session's future (a
                // thousand stalled logins must not each carry a pooled relay).
                return Box::pin(self.pooled(conn, admitted, pools, plan, auth_facts)).await;
            }
            // Boxed too: a pooled session need not carry this path's state.
            Box::pin(self.direct(conn, admitted, plan, auth_facts, pending, deadline)).await;
        }
    }

    /// Stages 4–6 with a server connection of the session's own (not an
    /// `async fn`: see `run`).
    // Written out on purpose: an `async fn` keeps its arguments twice.
    #[allow(clippy::manual_async_fn)]
    fn direct(
        &self,
        mut conn: ClientConn,
        admitted: Admitted,
        plan: login::LoginPlan,
        mut auth_facts: AuthFacts,
        pending: Option<PendingPermit>,
        deadline: tokio::time::Instant,
    ) -> impl Future<Output = ()> + '_ {
        async move {
            // The login stages boxed, as in `run`: only the relay's state
            // stays with an established session.
            let mut up = match Box::pin(self.connect(
                &admitted,
                &plan,
                conn.peer_cert.as_deref(),
                &auth_facts,
            ))
            .await
            {
                Ok(up) => up,
                Err(exit) => return Box::pin(self.exit(&mut conn, exit)).await,
            };
            let mut logged_in = match Box::pin(self.log_in(
                &mut conn,
                &mut up,
                &admitted,
                plan,
                &mut auth_facts,
                deadline,
            ))
            .await
            {
                Ok(logged_in) => logged_in,
                Err(exit) => return Box::pin(self.exit(&mut conn, exit)).await,
            };
            let authenticated = self
                .auth_phase(
                    &mut conn,
                    &mut up,
                    &mut logged_in,
                    &mut auth_facts,
                    deadline,
                )
                .await;
            // Authenticated (or finished): the connection leaves the pending
            // slots, which bound what strangers can hold.
            drop(pending);
            let _session_slot = logged_in.session_slot();
            self.finish(
                &mut conn,
                &mut up,
                &admitted,
                &mut logged_in.phase,
                &auth_facts,
                authenticated,
            )
            .await;
            // The connections close before the session's slot comes back
            // (a new client may take it at once), as when they were moved.
            drop(logged_in);
            drop(up);
            drop(conn);
        }
    }

    /// Ends a session that did not reach its relay.
    async fn exit(&self, conn: &mut ClientConn, exit: Exit) {
        match exit {
            Exit::Silent => {}
            Exit::Refused(refusal) => {
                let Refusal { err, auth, held } = *refusal;
                self.reject(conn, err, auth.as_ref()).await;
                drop(held);
            }
        }
    }
}
