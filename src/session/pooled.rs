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
use std::future::Future;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::finish::{is_replication, Ending};
use super::login::LoginPlan;
use super::negotiate::ClientConn;
use super::{Admitted, Exit, Session, SessionError};
use crate::admin::live::SessionInfo;
use crate::audit::{AuthFacts, AuthOutcome, Event, UpstreamFacts};
use crate::auth::scram::Proven;
use crate::cancel::{CancelTarget, Registration};
use crate::config::PoolMode;
use crate::limits::keyed_slots::KeyedPermit;
use crate::pool::engine::Engine;
use crate::pool::relay::{switch_now, PooledRelay, RelayParts, Serving, SwitchError};
use crate::pool::settings::SessionSettings;
use crate::pool::{Lease, Opened, Opener, Pool, PoolError, PoolKey, Pools, ServerLogin};
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
    /// Stages 4–6 for a pooled upstream (not an `async fn`: see
    /// `Session::run`).
    // Written out on purpose: an `async fn` keeps its arguments twice.
    #[allow(clippy::manual_async_fn)]
    pub(super) fn pooled(
        &self,
        mut conn: ClientConn,
        admitted: Admitted,
        pools: Arc<Pools>,
        plan: LoginPlan,
        mut auth_facts: AuthFacts,
    ) -> impl Future<Output = ()> + '_ {
        async move {
            // Boxed: the login's futures (a checkout that may dial, the first
            // switch) are freed once it is done, not kept with the session.
            let login =
                Box::pin(self.pooled_login(&mut conn, &admitted, &pools, plan, &mut auth_facts))
                    .await;
            match login {
                Ok(login) => {
                    self.pooled_session(&mut conn, &admitted, login, &auth_facts)
                        .await
                }
                // Boxed, as the login is: a session's future is as large as its
                // largest part, and this one is only for refusals.
                Err(exit) => Box::pin(self.exit(&mut conn, exit)).await,
            }
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
            LoginPlan::Passthrough | LoginPlan::Password { .. } => {
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
            endpoint: admitted.route.upstream.config.endpoint.clone(),
            database: admitted.startup.database().to_owned(),
            user: admitted.startup.user().to_owned(),
        };
        let pool = pools.pool(key);
        pool.set_login(server_login);
        let opener = Opener {
            upstream: &admitted.route.upstream,
            timeouts: &self.settings.timeouts,
        };
        let mode = pools.config.mode;
        let (lease, engine, opened) =
            match self.login_connection(&pool, &opener, admitted, mode).await {
                Ok(got) => got,
                Err(e) => return Err(Exit::refused_in_login(e, facts).holding(slot)),
            };
        facts.server = Some(opened.leg.clone());
        facts.outcome = AuthOutcome::Ok;
        let upstream = UpstreamFacts {
            name: admitted.route.upstream.config.name.clone(),
            addr: opened.addr.to_string(),
            tls: opened.tls.clone(),
        };
        let serving = Arc::new(Serving::new(None));
        let (issued, registration) = self.shared.cancels.register(CancelTarget {
            session_id: self.facts.session_id.clone(),
            upstream: admitted.route.upstream.clone(),
            addr: opened.addr,
            // Never a server's: the process ID is pgbastion's own (the
            // session moves between backends), the key's length is the
            // protocol's.
            real: CancelKey {
                process_id: rand::random::<u32>() & 0x7fff_ffff,
                secret_key: vec![0; opened.key_len],
            },
            serving: Some(serving.clone()),
        });
        let welcome = welcome(admitted, proven.as_ref(), &engine, &issued);
        if let Err(e) = conn.io.write_all(&welcome).await {
            return Err(Exit::refused_in_login(SessionError::ClientIo(e), facts).holding(slot));
        }
        let lease = match (mode, lease) {
            (PoolMode::Transaction, Some(lease)) => {
                lease.give_back();
                None
            }
            (_, lease) => lease,
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

    /// The login's server side. Transaction mode does not wait for a
    /// connection: with one free, the client's startup settings are
    /// applied (and so checked) now; with none, the login is answered
    /// from what the pool knows of the server and the settings are
    /// checked before the client's first statement. Session mode waits
    /// for the session's connection.
    async fn login_connection(
        &self,
        pool: &Arc<Pool>,
        opener: &Opener<'_>,
        admitted: &Admitted,
        mode: PoolMode,
    ) -> Result<(Option<Lease>, Engine, Opened), SessionError> {
        let started = std::time::Instant::now();
        let free = match (mode, pool.opened()) {
            (PoolMode::Transaction, Some(_)) => pool.try_checkout(opener).await?,
            _ => Some(pool.checkout(opener).await?),
        };
        let Some(mut lease) = free else {
            // Only when the pool knows its server (`opened` above).
            let opened = pool.opened().ok_or(PoolError::ShuttingDown)?;
            let mut engine = self.new_engine(admitted, mode, &opened);
            let mut params = opened.params.clone();
            params.extend(engine.settings.reported_values(&opened.params));
            engine.set_client_params(params);
            return Ok((None, engine, opened));
        };
        self.shared
            .metrics
            .pool_wait(&admitted.route.upstream.config.name, started.elapsed());
        let server = lease.conn();
        let opened = Opened::of(server);
        let mut engine = self.new_engine(admitted, mode, &opened);
        let mut out = Vec::new();
        engine.switch_if_needed(&mut server.state, &mut out);
        let limit = self.settings.timeouts.authentication;
        let switched = tokio::time::timeout(
            limit,
            switch_now(&mut engine, server, &out, &mut Vec::new()),
        )
        .await;
        match switched {
            Ok(Ok(())) => {}
            Ok(Err(SwitchError::Refused { code, message })) => {
                return Err(SessionError::PoolSettings { code, message })
            }
            Ok(Err(SwitchError::Io(e))) => return Err(PoolError::ServerIo(e).into()),
            Err(_) => return Err(PoolError::LoginTimeout(limit).into()),
        }
        engine.set_client_params(server.state.params.clone());
        Ok((Some(lease), engine, opened))
    }

    /// The engine for this client: its settings from the StartupMessage.
    fn new_engine(&self, admitted: &Admitted, mode: PoolMode, opened: &Opened) -> Engine {
        let encoding = opened.params.get("client_encoding").map(String::as_str);
        let protected = self.protected_settings();
        let settings =
            SessionSettings::from_startup(&admitted.startup.params, encoding, &protected);
        Engine::new(mode, settings, protected, BTreeMap::new())
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
    /// Not an `async fn`, and the session borrowed: see `Session::run`.
    // Written out on purpose: an `async fn` keeps its arguments twice.
    #[allow(clippy::manual_async_fn)]
    fn pooled_session<'a>(
        &'a self,
        conn: &'a mut ClientConn,
        admitted: &'a Admitted,
        login: PooledLogin,
        auth_facts: &'a AuthFacts,
    ) -> impl Future<Output = ()> + 'a {
        async move {
            let mut query_audit = self.record_start(admitted, &login.upstream, auth_facts);
            info!(
                user = %admitted.startup.user(),
                database = %admitted.startup.database(),
                pool = %login.pool.key,
                mode = login.pool.config.mode.as_str(),
                "pooled session started"
            );
            let upstream = login.upstream.clone();
            // Boxed, as in `finish`: no room for a tracker in the others.
            let mut queries = query_audit
                .is_some()
                .then(|| Box::new(self.query_tracker(false)));
            let (end, counts) = self
                .run_pooled(conn, admitted, login, queries.as_deref_mut())
                .await;
            let _ = tokio::time::timeout(super::negotiate::ERROR_WRITE_TIMEOUT, conn.io.shutdown())
                .await;
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
            let no_auth_bytes = Default::default();
            self.record_end(&upstream, auth_facts, &no_auth_bytes, ending, query_audit);
        }
    }

    /// The relay, registered for the console (KILL) and the drain, with
    /// the pin and wait reporting; then the held connection cleaned.
    async fn run_pooled(
        &self,
        conn: &mut ClientConn,
        admitted: &Admitted,
        login: PooledLogin,
        queries: Option<&mut crate::audit::query::QueryTracker>,
    ) -> (RelayEnd, crate::relay::ByteCounts) {
        let PooledLogin {
            pool,
            lease,
            engine,
            serving,
            ..
        } = login;
        let _attached = pool.attach();
        let progress = Arc::new(Progress::default());
        let info = self.pooled_info(conn, admitted, progress.clone());
        let (_live, mut kill) = self.shared.live.register(info);
        let mut shutdown = self.shared.shutdown.subscribe();
        let upstream_name = &admitted.route.upstream.config.name;
        let on_pin = Box::new(move |reason: crate::audit::PinReason| {
            info!(
                reason = reason.as_str(),
                "pooled session pinned to its server connection"
            );
            self.shared.record(&Event::Pinned {
                facts: &self.facts,
                reason,
                pool: upstream_name,
            });
        });
        let waits = self.shared.metrics.pool_wait_of(upstream_name);
        let on_wait =
            Box::new(move |waited: std::time::Duration| waits.observe(waited.as_secs_f64()));
        let parts = RelayParts {
            engine,
            pool,
            opener: Opener {
                upstream: &admitted.route.upstream,
                timeouts: &self.settings.timeouts,
            },
            lease,
            cbuf: std::mem::take(&mut conn.buf),
            serving,
            progress,
            queries,
            on_pin,
            on_wait,
        };
        let mut relay = PooledRelay::new(&mut *conn.io, parts);
        let end = relay.run(&mut shutdown, &mut kill).await;
        let counts = relay.counts;
        if let Some(lease) = relay.lease.take() {
            // Boxed: only a session that still holds a connection at its
            // end needs it (see `pooled`'s refusals).
            Box::pin(crate::pool::clean_and_return(lease, &relay.engine)).await;
        }
        (end, counts)
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
    if let Some(server_final) = proven.and_then(|p| p.server_final.as_ref()) {
        out.extend(message::authentication_sasl_data(
            true,
            server_final.as_bytes(),
        ));
    }
    out.extend(message::authentication_ok());
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
