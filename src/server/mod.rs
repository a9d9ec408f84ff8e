//! The server: `Server::bind` does everything that can fail at start-up
//! (TLS files, upstream CA bundles, the audit log, binding sockets) so a
//! misconfigured pgbastion stops before it accepts anyone; `Server::run`
//! then accepts until told to stop, and drains open sessions with a
//! deadline.
//!
//! The rest, by job: `listen` (sockets and accept loops), `state` (what
//! sessions share: `Shared`, `Settings`, `ListenerInfo`), `load` (reading a
//! configuration's files: certificates, upstreams, the chain key), `reload`
//! (swapping a new configuration in, and the file watch), `error`.

mod console;
mod cores;
mod error;
mod listen;
mod load;
mod reload;
pub(crate) mod route;
pub(crate) mod router;
mod state;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::metrics::Metrics;
use crate::audit::AuditLog;
use crate::auth::credentials::Credentials;
use crate::config::{AdminConfig, BindAddress, Config};
use crate::limits::keyed_slots::KeyedSlots;
use crate::limits::pending::LiveLimits;
use crate::limits::warn;
use crate::relay::ShutdownPhase;
use crate::sync::MutexExt;
use route::Route;

pub use cores::Cores;
pub use error::ServerError;
pub(crate) use listen::canonical;
use listen::Listener;
pub use load::{audit_digest, check, read_chain_key};
use load::{listener_infos, prepare_tls, record_certificate_expiry, PreparedTls};
pub use reload::{watch, ReloadHandle, Reloaded};
use state::Accepting;
use state::Started;
pub(crate) use state::{ListenerInfo, Settings, Shared};

/// After the drain, how long sessions have to write their last words.
const FINAL_GRACE: Duration = Duration::from_secs(3);

pub struct Server {
    shared: Arc<Shared>,
    listeners: Vec<Listener>,
    drain: Duration,
    admin: Option<(TcpListener, AdminConfig)>,
    cores: Option<Arc<Cores>>,
}

impl Server {
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        let PreparedTls {
            certs,
            served,
            routes,
        } = prepare_tls(&config)?;
        let credentials = Credentials::load(&config.credentials, &config.upstreams)?;
        let routes: Vec<Arc<Route>> = routes.into_iter().map(Arc::new).collect();
        let infos = listener_infos(&config, served, &routes);
        let digest = audit_digest(&config)?;
        let audit = Arc::new(
            AuditLog::open(&config.audit.target, config.audit.on_failure, digest)
                .map_err(ServerError::Audit)?,
        );
        let metrics = Arc::new(Metrics::new(audit.clone()));
        record_certificate_expiry(&config, certs.as_deref(), &metrics);
        let cluster = match &config.cluster {
            Some(c) => Some(crate::cluster::Cluster::start(c, metrics.clone())?),
            None => None,
        };
        let admin = bind_admin(&config).await?;
        // One count per client address, across every listener.
        let per_address = KeyedSlots::default();
        let limits = Arc::new(LiveLimits::new(&config.limits));
        let listeners = config
            .listeners
            .iter()
            .map(|l| Listener::bind(&l.name, &l.bind, &per_address, &limits))
            .collect::<Result<Vec<_>, _>>()?;
        let started = Started {
            routes,
            credentials,
            listeners: infos,
            audit,
            metrics,
            cluster,
            per_address,
            limits,
        };
        Ok(Server {
            shared: Arc::new(Shared::new(&config, started)),
            listeners,
            drain: config.timeouts.shutdown_drain,
            admin,
            cores: None,
        })
    }

    /// Runs every session on `cores` (thread-per-core) instead of the
    /// runtime `run` is called on.
    pub fn with_cores(mut self, cores: Cores) -> Server {
        self.cores = Some(Arc::new(cores));
        self
    }

    /// A handle to end every session at once while draining.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shared.clone())
    }

    /// A handle to reload the policy and secrets while the server runs.
    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle::from_shared(&self.shared)
    }

    /// The addresses actually bound (a configured port 0 becomes the real
    /// port), by listener name.
    pub fn local_addrs(&self) -> Vec<(String, BindAddress)> {
        self.listeners
            .iter()
            .filter_map(|l| Some((l.name.clone(), l.local_addr()?)))
            .collect()
    }

    /// Accepts until `shutdown` completes, then stops accepting, ends idle
    /// sessions at once and lets busy ones finish for up to the drain
    /// timeout (or until `ShutdownHandle::now`), then ends the rest.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let stop = CancellationToken::new();
        let sessions = TaskTracker::new();
        // Kept until the drain is over: the cores stop when the last
        // holder lets go, and sessions run on them until then.
        let cores = self.cores;
        let mut accepting = Accepting::new(sessions.clone(), cores.clone(), stop.clone());
        for l in self.listeners {
            accepting.start(l, self.shared.clone());
        }
        *self.shared.accepting.locked() = Some(accepting);
        let summaries = tokio::spawn(summarise(self.shared.clone()));
        let relayed_cancels = self.shared.serve_relayed_cancels();
        let admin_stop = CancellationToken::new();
        let unready_grace = match self.admin {
            Some((listener, config)) => serve_admin(listener, config, &self.shared, &admin_stop),
            None => Duration::ZERO,
        };
        self.shared.health.started.store(true, Ordering::SeqCst);
        shutdown.await;
        // Not ready first, so balancers stop sending; then stop accepting.
        self.shared.health.draining.store(true, Ordering::SeqCst);
        if !unready_grace.is_zero() {
            info!(grace = ?unready_grace, "shutting down: /readyz says 503; still accepting for the grace period");
            tokio::time::sleep(unready_grace).await;
        }
        info!("shutting down: no new connections; draining open sessions");
        let accepting = self.shared.accepting.locked().take();
        if let Some(accepting) = accepting {
            accepting.stop_all().await;
        }
        stop.cancel();
        drain(&self.shared, &sessions, self.drain).await;
        summaries.abort();
        if let Some(relayed) = relayed_cancels {
            relayed.abort();
        }
        final_words(&self.shared);
        admin_stop.cancel();
        if let Some(cores) = cores {
            // Joining the core threads blocks; they stop at once.
            let _ = tokio::task::spawn_blocking(move || drop(cores)).await;
        }
    }
}

/// Binds the admin listener, if there is one.
async fn bind_admin(config: &Config) -> Result<Option<(TcpListener, AdminConfig)>, ServerError> {
    let Some(a) = &config.admin else {
        return Ok(None);
    };
    let listener = TcpListener::bind(a.listen)
        .await
        .map_err(|source| ServerError::Bind {
            name: "admin".into(),
            addr: a.listen.to_string(),
            source,
        })?;
    Ok(Some((listener, a.clone())))
}

/// Serves the admin listener until `stop`; returns how long to stay
/// unready before shutting down.
fn serve_admin(
    listener: TcpListener,
    config: AdminConfig,
    shared: &Shared,
    stop: &CancellationToken,
) -> Duration {
    let unready_grace = config.unready_grace;
    info!(address = %config.listen, "admin listener: /metrics /livez /readyz /startupz");
    tokio::spawn(crate::admin::serve(
        listener,
        config,
        shared.metrics.clone(),
        shared.health.clone(),
        stop.clone(),
    ));
    unready_grace
}

/// Ends the sessions once nothing accepts any more: idle ones now (57P01),
/// busy ones as soon as they are idle, or at the drain deadline, or at a
/// second signal; then whatever is left.
async fn drain(shared: &Shared, sessions: &TaskTracker, deadline: Duration) {
    sessions.close();
    shared.shutdown.send_if_modified(|p| {
        std::mem::replace(p, ShutdownPhase::Draining) == ShutdownPhase::Running
    });
    let mut phase = shared.shutdown.subscribe();
    let now_requested = async {
        let _ = phase.wait_for(|p| *p == ShutdownPhase::Now).await;
    };
    tokio::select! {
        _ = tokio::time::timeout(deadline, sessions.wait()) => {}
        _ = now_requested => {}
    }
    if !sessions.is_empty() {
        warn!(
            remaining = sessions.len(),
            "ending the remaining sessions now"
        );
        shared.shutdown.send_replace(ShutdownPhase::Now);
        // Sessions in the relay end at once; this bounds the rest
        // (those still authenticating have deadlines of their own).
        if tokio::time::timeout(FINAL_GRACE, sessions.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = sessions.len(),
                "sessions still authenticating are dropped"
            );
        }
    }
    info!("all sessions ended");
}

/// What the limiters still held back, then the audit log's last lines.
fn final_words(shared: &Shared) {
    for (kind, count) in shared.warn_limit.take_summaries() {
        warn!(
            kind,
            count, "{count} more like the above ({kind}), not logged one by one"
        );
    }
    for (kind, count) in shared.audit_limit.take_summaries() {
        shared.audit.emit(&crate::audit::Event::Suppressed {
            kind,
            count,
            window_s: warn::WINDOW.as_secs(),
        });
    }
    // Blocking, but nothing else runs any more.
    shared.audit.drain(Duration::from_secs(5));
}

/// Ends every session now (a second SIGTERM during the drain): each is
/// told 57P01 and audited with `end_reason = "shutdown"`.
#[derive(Clone)]
pub struct ShutdownHandle(Arc<Shared>);

impl ShutdownHandle {
    pub fn now(&self) {
        self.0.shutdown.send_replace(ShutdownPhase::Now);
    }
}

/// Writes what the limiters held back, once per window.
async fn summarise(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(warn::WINDOW);
    tick.tick().await;
    loop {
        tick.tick().await;
        for (kind, count) in shared.warn_limit.take_summaries() {
            warn!(
                kind,
                count,
                "{count} more like the above ({kind}) in the last {} s, not logged one by one",
                warn::WINDOW.as_secs()
            );
        }
        for (kind, count) in shared.audit_limit.take_summaries() {
            shared.audit.emit(&crate::audit::Event::Suppressed {
                kind,
                count,
                window_s: warn::WINDOW.as_secs(),
            });
        }
    }
}
