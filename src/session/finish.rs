//! Stage 6, how a session ends: the start event, `relay::relay` with the
//! query audit the rule asks for, and the end event; or, for a session
//! refused on the way, its one `session.rejected` event and the client's
//! ErrorResponse.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use super::connect::Connected;
use super::login;
use super::negotiate::{ClientConn, ERROR_WRITE_TIMEOUT};
use super::{Admitted, Session, SessionError};
use crate::admin::live::SessionInfo;
use crate::audit::query::{Protocol, QueryRecord, QueryTracker, Statement};
use crate::audit::{
    AuthFacts, Event, LoginMode, QueryAuditFacts, QueryProtocol, SessionFacts, Unparsed,
};
use crate::auth::passthrough::{AuthEnd, AuthPhase};
use crate::policy::AuditQueries;
use crate::protocol::message::ErrorFields;
use crate::protocol::startup::StartupMessage;
use crate::relay::{self, ByteCounts, RelayEnd};
use crate::server::Shared;

/// How a started session ended, for its end event.
pub(super) struct Ending {
    pub reason: crate::audit::EndReason,
    pub detail: Option<String>,
    /// What the relay carried (the auth phase counts its own).
    pub counts: ByteCounts,
}

/// The SQLSTATE of an encoded ErrorResponse, for the audit log.
fn sqlstate_of(bytes: &[u8]) -> Option<String> {
    let body = bytes.get(5..)?;
    ErrorFields::parse(body).ok().map(|f| f.code)
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

/// Whether the StartupMessage opens a replication connection ("true" and
/// "database" do; "false"/"off" do not).
pub(super) fn is_replication(startup: &StartupMessage) -> bool {
    startup.param("replication").is_some_and(|v| {
        !matches!(
            v.to_ascii_lowercase().as_str(),
            "false" | "off" | "no" | "0"
        )
    })
}

/// A `query` audit event from the query audit's record. False: it was lost
/// and the audit log refuses unaudited statements.
pub(super) fn record_query(shared: &Shared, facts: &SessionFacts, r: &QueryRecord) -> bool {
    let (statement, unparsed) = match &r.statement {
        Statement::Text(t) => (Some(&**t), None),
        Statement::Unparsed { len, why } => (None, Some(Unparsed { len: *len, why })),
        Statement::Unknown => (
            None,
            Some(Unparsed {
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

/// The auth phase ended the session: the client is told why (when it
/// can be), both legs are closed.
async fn ended_in_auth(
    conn: &mut ClientConn,
    up: &mut Connected,
    end: AuthEnd,
    mode: LoginMode,
) -> Ending {
    if let Some(err) = end.client_error() {
        conn.send_error(&err.encode()).await;
    }
    let _ = tokio::time::timeout(ERROR_WRITE_TIMEOUT, async {
        let _ = up.conn.stream.shutdown().await;
        let _ = conn.io.shutdown().await;
    })
    .await;
    // libpq accepts no message before AuthenticationOk but an error, and a
    // client with channel_binding=require hangs up on an AuthenticationOk
    // that came without a SCRAM exchange: this is the one place that can
    // say so.
    let detail = match (&end, mode) {
        (AuthEnd::ClientClosed | AuthEnd::ClientIo(_), LoginMode::Identity) => {
            identity_hangup(&end)
        }
        _ => end.to_string(),
    };
    warn!(
        reason = end.reason().as_str(),
        "session ended during authentication: {detail}"
    );
    Ending {
        reason: end.reason(),
        detail: Some(detail),
        counts: ByteCounts::default(),
    }
}

impl Session {
    /// Stage 6: the start event, the relay (or the auth phase's failure),
    /// the end event. Everything by reference: the caller's future holds
    /// it already, and a second copy here would last as long as the
    /// session (see `Session::run`).
    pub(super) async fn finish(
        &self,
        conn: &mut ClientConn,
        up: &mut Connected,
        admitted: &Admitted,
        auth: &mut AuthPhase,
        auth_facts: &AuthFacts,
        authenticated: Result<(), AuthEnd>,
    ) {
        let mut query_audit = self.record_start(admitted, &up.facts, auth_facts);
        info!(
            user = %admitted.startup.user(),
            database = %admitted.startup.database(),
            upstream = %up.facts.addr,
            auth = ?auth_facts.outcome,
            mode = ?auth_facts.mode,
            "session started"
        );
        let ending = match authenticated {
            Ok(()) => {
                let mode = auth_facts.mode;
                self.relay(conn, up, admitted, auth, mode, &mut query_audit)
                    .await
            }
            Err(end) => ended_in_auth(conn, up, end, auth_facts.mode).await,
        };
        self.record_end(&up.facts, auth_facts, &auth.counts, ending, query_audit);
    }

    /// The start event, pooled or not; returns the query audit's facts
    /// when the session's rule audits its statements.
    pub(super) fn record_start(
        &self,
        admitted: &Admitted,
        upstream: &crate::audit::UpstreamFacts,
        auth: &AuthFacts,
    ) -> Option<QueryAuditFacts> {
        let query_audit =
            (admitted.audit_queries == AuditQueries::Statements).then_some(QueryAuditFacts {
                mode: "statements",
                statements: None,
                stopped: None,
            });
        self.shared.record(&Event::Start {
            facts: &self.facts,
            upstream,
            auth,
            query_audit: query_audit.as_ref(),
        });
        query_audit
    }

    /// The session proper: relayed until either side ends, killed by the
    /// console or pgbastion shuts down.
    async fn relay(
        &self,
        conn: &mut ClientConn,
        up: &mut Connected,
        admitted: &Admitted,
        auth: &mut AuthPhase,
        mode: LoginMode,
        query_audit: &mut Option<QueryAuditFacts>,
    ) -> Ending {
        // What followed the login's ReadyForQuery went on already (a query
        // pipelined behind the login): the relay starts busy.
        let pipelined = !auth.client_buf.is_empty() || !auth.server_buf.is_empty();
        // The authentication buffers are not needed any more; an idle
        // session should hold as little memory as possible.
        auth.client_buf = Vec::new();
        auth.server_buf = Vec::new();
        let mut shutdown = self.shared.shutdown.subscribe();
        let progress = Arc::new(relay::Progress::default());
        progress.busy.store(pipelined, Ordering::Relaxed);
        let info = self.live_info(conn, up, &admitted.startup, progress.clone());
        let (_live, mut kill) = self.shared.live.register(info);
        // Query audit only for sessions whose rule asks for it; the others'
        // relay never looks at the bytes. Boxed: the others' futures do not
        // carry a tracker's worth of room for it either.
        let mut queries = (admitted.audit_queries == AuditQueries::Statements)
            .then(|| Box::new(self.query_tracker(is_replication(&admitted.startup))));
        let (end, counts) = relay::relay(
            &mut *conn.io,
            &mut up.conn.stream,
            self.settings.timeouts.half_close,
            &mut shutdown,
            &mut kill,
            &progress,
            queries.as_deref_mut(),
        )
        .await;
        if let (Some(q), Some(facts)) = (&queries, query_audit) {
            facts.statements = Some(q.recorded());
            facts.stopped = q.stopped();
            if let Some(why) = q.stopped() {
                warn!(reason = why, "query audit stopped for this session");
            }
        }
        let hung_up = matches!(end, RelayEnd::ClientClosed | RelayEnd::ClientError(_))
            && counts.client_to_server == 0;
        let detail = match &end {
            _ if hung_up && mode == LoginMode::Identity => Some(identity_hangup(&end.reason())),
            RelayEnd::ClientError(d) | RelayEnd::ServerError(d) => Some(d.clone()),
            _ => None,
        };
        Ending {
            reason: end.reason(),
            detail,
            counts,
        }
    }

    /// The session as the admin console lists it.
    fn live_info(
        &self,
        conn: &ClientConn,
        up: &Connected,
        startup: &StartupMessage,
        progress: Arc<relay::Progress>,
    ) -> SessionInfo {
        SessionInfo {
            id: self.facts.session_id.clone(),
            identity: self
                .facts
                .identity
                .as_ref()
                .map_or_else(String::new, ToString::to_string),
            client: self.facts.client.to_string(),
            user: startup.user().to_owned(),
            database: startup.database().to_owned(),
            upstream: up.facts.name.clone(),
            client_tls: conn.is_tls(),
            upstream_tls: true,
            since: std::time::SystemTime::now(),
            progress,
        }
    }

    /// The query audit for this session: each statement becomes a `query`
    /// event with the session's facts.
    pub(super) fn query_tracker(&self, replication: bool) -> QueryTracker {
        let shared = self.shared.clone();
        let facts = self.facts.clone();
        let (stop_shared, stop_facts) = (shared.clone(), facts.clone());
        QueryTracker::for_session(
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

    pub(super) fn record_end(
        &self,
        upstream: &crate::audit::UpstreamFacts,
        auth_facts: &AuthFacts,
        auth_counts: &ByteCounts,
        ending: Ending,
        mut query_audit: Option<QueryAuditFacts>,
    ) {
        let total = ByteCounts {
            client_to_server: auth_counts.client_to_server + ending.counts.client_to_server,
            server_to_client: auth_counts.server_to_client + ending.counts.server_to_client,
        };
        if let Some(q) = &mut query_audit {
            // Ended before the relay: no statement was run.
            q.statements.get_or_insert(0);
        }
        self.shared.record(&Event::End {
            facts: &self.facts,
            upstream,
            auth: auth_facts,
            bytes_client_to_server: total.client_to_server,
            bytes_server_to_client: total.server_to_client,
            duration_ms: self.elapsed_ms(),
            end_reason: ending.reason,
            detail: ending.detail.as_deref(),
            query_audit: query_audit.as_ref(),
        });
        info!(
            reason = ending.reason.as_str(),
            bytes_in = total.client_to_server,
            bytes_out = total.server_to_client,
            "session ended"
        );
    }

    /// Refuses a session before its relay: tells the client (when there
    /// is a channel), logs, and audits, with how far authentication got
    /// once it began.
    pub(super) async fn reject(
        &self,
        conn: &mut ClientConn,
        err: SessionError,
        auth: Option<&AuthFacts>,
    ) {
        let note = login::operator_note(&err, &self.facts.session_id);
        self.refuse(conn, err, auth).await;
        if let Some(note) = note {
            tokio::spawn(async move { note() });
        }
    }

    async fn refuse(&self, conn: &mut ClientConn, err: SessionError, auth: Option<&AuthFacts>) {
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
