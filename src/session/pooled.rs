//! Stages 4–6 for a pooled upstream (`pool_mode`): instead of dialing a
//! server for the session, the client is logged in against the pool. A
//! connection is checked out once at login (opened with the client's
//! proven key or identity credential if none is idle) to apply and so
//! check the client's startup settings, and to give the client the
//! server's ParameterStatus; the client gets pgbastion's own
//! BackendKeyData. Then `pool::relay` runs the session, and a connection
//! it held at the end (session mode, a pinned client, a transaction left
//! open) is cleaned before anyone else gets it.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::finish::{is_replication, Ending};
use super::login::LoginPlan;
use super::negotiate::ClientConn;
use super::{Admitted, Exit, Session, SessionError};
use crate::admin::live::SessionInfo;
use crate::audit::{AuthFacts, AuthOutcome, Event, QueryAuditFacts, UpstreamFacts};
use crate::auth::scram::Proven;
use crate::cancel::{CancelTarget, Registration};
use crate::config::PoolMode;
use crate::limits::keyed_slots::KeyedPermit;
use crate::policy::AuditQueries;
use crate::pool::engine::{Engine, Next};
use crate::pool::relay::{PooledRelay, RelayParts, Serving};
use crate::pool::settings::SessionSettings;
use crate::pool::{Lease, Opener, Pool, PoolKey, Pools, ServerLogin};
use crate::protocol::message::{self, tag};
use crate::protocol::startup::CancelKey;
use crate::relay::{Progress, RelayEnd};

/// A pooled client, logged in: what its relay needs.
struct PooledLogin {
    pool: Arc<Pool>,
    /// Session mode: the session's connection.
    lease: Option<Lease>,
    engine: Engine,
    serving: Arc<Serving>,
    _registration: Registration,
    _slot: KeyedPermit<()>,
    upstream: UpstreamFacts,
}

impl Session {
    /// Stages 4–6 for a pooled upstream.
    pub(super) async fn pooled(
        self,
        mut conn: ClientConn,
        admitted: Admitted,
        pools: Arc<Pools>,
        plan: LoginPlan,
        mut auth_facts: AuthFacts,
    ) {
        let login = self
            .pooled_login(&mut conn, &admitted, &pools, plan, &mut auth_facts)
            .await;
        match login {
            Ok(login) => {
                self.pooled_session(conn, &admitted, login, auth_facts)
                    .await
            }
            Err(exit) => self.exit(&mut conn, exit).await,
        }
    }

    /// The login against the pool: the pool's credential, a connection
    /// switched to the client's settings, the client welcomed.
    async fn pooled_login(
        &self,
        conn: &mut ClientConn,
        admitted: &Admitted,
        pools: &Arc<Pools>,
        plan: LoginPlan,
        facts: &mut AuthFacts,
    ) -> Result<PooledLogin, Exit> {
        let (server_login, slot, proven) = match plan {
            LoginPlan::Scram { client, slot } => {
                let login = ServerLogin::Keys {
                    client_key: client.proven.client_key,
                    verifier: client.verifier.clone(),
                };
                (login, slot, Some(client.proven))
            }
            LoginPlan::Identity { credential, slot } => {
                (ServerLogin::Identity(credential), slot, None)
            }
            // check-config refuses pool_mode on passthrough upstreams.
            LoginPlan::Passthrough => {
                let e = crate::pool::PoolError::Login(
                    "a pooled upstream needs auth = \"scram\"".into(),
                );
                return Err(Exit::refused_in_login(SessionError::Pool(e), facts));
            }
        };
        if is_replication(&admitted.startup) {
            return Err(Exit::refused_in_login(SessionError::PoolReplication, facts).holding(slot));
        }
        let key = PoolKey {
            database: admitted.startup.database().to_owned(),
            user: admitted.startup.user().to_owned(),
        };
        let pool = pools.pool(key);
        pool.set_login(server_login);
        let opener = Opener {
            upstream: &admitted.route.upstream,
            timeouts: &self.settings.timeouts,
        };
        let started = std::time::Instant::now();
        let mut lease = match pool.checkout(&opener).await {
            Ok(lease) => {
                self.shared
                    .metrics
                    .pool_wait(&pools.name, started.elapsed());
                lease
            }
            Err(e) => {
                return Err(Exit::refused_in_login(SessionError::Pool(e), facts).holding(slot))
            }
        };
        let mode = pools.config.mode;
        let engine = match self.first_switch(&mut lease, admitted, mode).await {
            Ok(engine) => engine,
            Err(e) => return Err(Exit::refused_in_login(e, facts).holding(slot)),
        };
        let server = lease.conn();
        facts.server = Some(server.leg.clone());
        facts.outcome = AuthOutcome::Ok;
        let upstream = UpstreamFacts {
            name: admitted.route.upstream.config.name.clone(),
            addr: server.addr.to_string(),
            tls: server.tls.clone(),
        };
        let serving = Arc::new(Serving::new(None));
        let (issued, registration) = self.shared.cancels.register(CancelTarget {
            session_id: self.facts.session_id.clone(),
            upstream: admitted.route.upstream.clone(),
            addr: server.addr,
            // Never a server's: the process ID is pgbastion's own (the
            // session moves between backends), the key's length is the
            // protocol's.
            real: CancelKey {
                process_id: rand::random::<u32>() & 0x7fff_ffff,
                secret_key: vec![0; server.key.secret_key.len()],
            },
            serving: Some(serving.clone()),
        });
        let welcome = welcome(admitted, proven.as_ref(), &engine, &issued);
        if let Err(e) = conn.io.write_all(&welcome).await {
            return Err(Exit::refused_in_login(SessionError::ClientIo(e), facts).holding(slot));
        }
        let lease = match mode {
            PoolMode::Session => Some(lease),
            PoolMode::Transaction => {
                lease.give_back();
                None
            }
        };
        Ok(PooledLogin {
            pool,
            lease,
            engine,
            serving,
            _registration: registration,
            _slot: slot,
            upstream,
        })
    }

    /// Applies the client's startup settings on the login's connection and
    /// waits for the answer: a setting the server refuses refuses the
    /// login, as it would on a direct connection.
    async fn first_switch(
        &self,
        lease: &mut Lease,
        admitted: &Admitted,
        mode: PoolMode,
    ) -> Result<Engine, SessionError> {
        let server = lease.conn();
        let encoding = server.state.params.get("client_encoding").cloned();
        let settings = SessionSettings::from_startup(&admitted.startup.params, encoding.as_deref());
        let mut engine = Engine::new(mode, settings, self.protected_settings(), BTreeMap::new());
        let mut out = Vec::new();
        if engine.switch_if_needed(&mut server.state, &mut out) {
            let limit = self.settings.timeouts.authentication;
            let switched = tokio::time::timeout(limit, run_switch(&mut engine, server, &out)).await;
            match switched {
                Ok(Ok(())) => {}
                Ok(Err(SwitchError::Refused { code, message })) => {
                    return Err(SessionError::PoolSettings { code, message })
                }
                Ok(Err(SwitchError::Io(e))) => {
                    return Err(SessionError::Pool(crate::pool::PoolError::ServerIo(e)))
                }
                Err(_) => {
                    return Err(SessionError::Pool(crate::pool::PoolError::LoginTimeout(
                        limit,
                    )))
                }
            }
        }
        engine.set_client_params(server.state.params.clone());
        Ok(engine)
    }

    /// The settings a client may not change: `[forward]`'s.
    fn protected_settings(&self) -> Arc<[String]> {
        let mut names: Vec<String> = self
            .settings
            .forward_settings
            .iter()
            .map(|(n, _)| n.to_ascii_lowercase())
            .collect();
        if self.settings.application_name.is_some() {
            names.push("application_name".to_owned());
        }
        names.into()
    }

    /// The pooled session proper: start event, relay, clean-up, end event.
    async fn pooled_session(
        self,
        mut conn: ClientConn,
        admitted: &Admitted,
        login: PooledLogin,
        auth_facts: AuthFacts,
    ) {
        let PooledLogin {
            pool,
            lease,
            engine,
            serving,
            upstream,
            ..
        } = login;
        let mut query_audit =
            (admitted.audit_queries == AuditQueries::Statements).then_some(QueryAuditFacts {
                mode: "statements",
                statements: None,
                stopped: None,
            });
        self.shared.record(&Event::Start {
            facts: &self.facts,
            upstream: &upstream,
            auth: &auth_facts,
            query_audit: query_audit.as_ref(),
        });
        info!(
            user = %admitted.startup.user(),
            database = %admitted.startup.database(),
            pool = %pool.key,
            mode = pool.config.mode.as_str(),
            "pooled session started"
        );
        let _attached = pool.attach();
        let progress = Arc::new(Progress::default());
        let info = self.pooled_info(&conn, admitted, progress.clone());
        let (_live, mut kill) = self.shared.live.register(info);
        let mut shutdown = self.shared.shutdown.subscribe();
        let mut queries = query_audit.is_some().then(|| self.query_tracker(false));
        let upstream_name = admitted.route.upstream.config.name.clone();
        let upstream_name_for_wait = upstream_name.clone();
        let on_pin = Box::new(|reason: crate::audit::PinReason| {
            info!(
                reason = reason.as_str(),
                "pooled session pinned to its server connection"
            );
            self.shared.record(&Event::Pinned {
                facts: &self.facts,
                reason,
                pool: &upstream_name,
            });
        });
        let opener = Opener {
            upstream: &admitted.route.upstream,
            timeouts: &self.settings.timeouts,
        };
        let cbuf = std::mem::take(&mut conn.buf);
        let metrics = self.shared.metrics.clone();
        let on_wait = Box::new(move |waited| metrics.pool_wait(&upstream_name_for_wait, waited));
        let parts = RelayParts {
            engine,
            pool,
            opener,
            lease,
            cbuf,
            serving,
            progress,
            queries: queries.as_mut(),
            on_pin,
            on_wait,
        };
        let mut relay = PooledRelay::new(&mut *conn.io, parts);
        let end = relay.run(&mut shutdown, &mut kill).await;
        let counts = relay.counts;
        if let Some(lease) = relay.lease.take() {
            crate::pool::clean_and_return(lease, &relay.engine).await;
        }
        drop(relay);
        let _ =
            tokio::time::timeout(super::negotiate::ERROR_WRITE_TIMEOUT, conn.io.shutdown()).await;
        if let (Some(q), Some(facts)) = (&mut queries, &mut query_audit) {
            q.end_of_session();
            facts.statements = Some(q.recorded());
            facts.stopped = q.stopped();
        }
        let detail = match &end {
            RelayEnd::ClientError(d) | RelayEnd::ServerError(d) => Some(d.clone()),
            _ => None,
        };
        if let RelayEnd::ServerError(d) = &end {
            warn!("pooled session ended: {d}");
        }
        let ending = Ending {
            reason: end.reason(),
            detail,
            counts,
        };
        self.record_end(
            &upstream,
            &auth_facts,
            &Default::default(),
            ending,
            query_audit,
        );
    }

    fn pooled_info(
        &self,
        conn: &ClientConn,
        admitted: &Admitted,
        progress: Arc<Progress>,
    ) -> SessionInfo {
        SessionInfo {
            id: self.facts.session_id.clone(),
            identity: self
                .facts
                .identity
                .as_ref()
                .map_or_else(String::new, ToString::to_string),
            client: self.facts.client.to_string(),
            user: admitted.startup.user().to_owned(),
            database: admitted.startup.database().to_owned(),
            upstream: admitted.route.upstream.config.name.clone(),
            client_tls: conn.is_tls(),
            upstream_tls: true,
            since: std::time::SystemTime::now(),
            progress,
        }
    }
}

/// Why the login's settings switch failed.
enum SwitchError {
    Refused { code: String, message: String },
    Io(std::io::Error),
}

/// Sends the switch and reads the server's answers until it is done.
async fn run_switch(
    engine: &mut Engine,
    server: &mut crate::pool::ServerConn,
    out: &[u8],
) -> Result<(), SwitchError> {
    server
        .stream
        .write_all(out)
        .await
        .map_err(SwitchError::Io)?;
    server.stream.flush().await.map_err(SwitchError::Io)?;
    let mut buf = std::mem::take(&mut server.buf);
    let mut ignored = Vec::new();
    while !engine.nothing_in_flight() {
        let (t, body) = crate::auth::wire::read_message(
            &mut server.stream,
            &mut buf,
            crate::pool::relay::MAX_MESSAGE,
        )
        .await
        .map_err(|e| SwitchError::Io(std::io::Error::other(e.to_string())))?;
        let msg = message::build(t, &body);
        if t == tag::ERROR_RESPONSE {
            let fields = message::ErrorFields::parse(&body).unwrap_or_default();
            return Err(SwitchError::Refused {
                code: fields.code,
                message: fields.message,
            });
        }
        if let Next::SwitchFailed(why) =
            engine.server_message(&msg, &mut server.state, &mut ignored)
        {
            return Err(SwitchError::Refused {
                code: "XX000".into(),
                message: why,
            });
        }
    }
    server.buf = buf;
    Ok(())
}

/// What the client is sent to end its login: the end of SCRAM (or
/// AuthenticationOk), a protocol downgrade if it asked for more than
/// 3.0, the server's ParameterStatus, pgbastion's BackendKeyData, and
/// ReadyForQuery.
fn welcome(
    admitted: &Admitted,
    proven: Option<&Proven>,
    engine: &Engine,
    key: &CancelKey,
) -> Vec<u8> {
    let mut out = Vec::new();
    let startup = &admitted.startup;
    let options: Vec<&str> = startup
        .params
        .iter()
        .filter(|(n, _)| n.starts_with("_pq_."))
        .map(|(n, _)| n.as_str())
        .collect();
    if startup.version.minor > 0 || !options.is_empty() {
        out.extend(negotiate_protocol_version(&options));
    }
    match proven {
        Some(p) => {
            out.extend(message::authentication_sasl_data(
                true,
                p.server_final.as_bytes(),
            ));
            out.extend(message::authentication_ok());
        }
        None => out.extend(message::authentication_ok()),
    }
    for (name, value) in engine.client_params() {
        out.extend(crate::pool::server::parameter_status(name, value));
    }
    out.extend(message::backend_key_data(key));
    out.extend(message::build(tag::READY_FOR_QUERY, b"I"));
    out
}

/// NegotiateProtocolVersion: pgbastion's pooled connections speak 3.0,
/// and no `_pq_` option.
fn negotiate_protocol_version(options: &[&str]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&0u32.to_be_bytes());
    body.extend_from_slice(&(options.len() as u32).to_be_bytes());
    for o in options {
        body.extend_from_slice(o.as_bytes());
        body.push(0);
    }
    message::build(tag::NEGOTIATE_PROTOCOL_VERSION, &body)
}
