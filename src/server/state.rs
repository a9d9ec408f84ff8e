//! What every session of the process shares (`Shared`), what a session
//! takes from the configuration when it starts (`Settings`) and from the
//! listener it arrived on (`ListenerInfo`), and the console's view of all
//! of it (`ConsoleBackend for Arc<Shared>`).
//!
//! One access rule: what a reload replaces (settings, policy, credentials,
//! upstreams, listeners) is read through an accessor that returns a
//! snapshot (`Arc`), which the session keeps; only `server` itself swaps
//! them. What lives as long as the process (the audit log, metrics,
//! counters, limiters) is a field.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::route::Route;
use crate::admin::metrics::{Metrics, PoolSample};
use crate::admin::Health;
use crate::audit::AuditLog;
use crate::auth::credentials::Credentials;
use crate::auth::throttle::LoginThrottle;
use crate::cancel::CancelRegistry;
use crate::config::{
    AdminConfig, BindAddress, CancelPlaintext, ClientTlsMode, ClusterConfig, Config,
    ListenerIdentity, ProxyProtocol, Timeouts,
};
use crate::identity::tailscale::WhoIsClient;
use crate::limits::keyed_slots::KeyedSlots;
use crate::limits::pending::LiveLimits;
use crate::limits::warn::WarnLimiter;
use crate::policy::Policy;
use crate::pool::Pools;
use crate::relay::ShutdownPhase;
use crate::sync::RwLockExt;
use crate::tls::{ServedTls, TlsAcceptor};
use crate::upstream::Upstream;

/// Log lines of one kind caused by strangers, per `warn::WINDOW`.
const WARN_LINES_PER_WINDOW: u32 = 10;
/// Audit events of one kind for connections that never named a user (and
/// unmatched or refused cancels), per window.
const AUDIT_EVENTS_PER_WINDOW: u32 = 100;

/// What every session of the process shares.
pub(crate) struct Shared {
    /// Deadlines, the application_name template and the LocalAPI client:
    /// each session keeps the one it started with.
    pub(super) settings: RwLock<Arc<Settings>>,
    /// A session uses the upstream its listener named when it was
    /// accepted. Shared with the metrics, which read the pools at each
    /// scrape.
    pub(super) routes: Arc<RwLock<Vec<Arc<Route>>>>,
    /// Sessions decide with the policy current when their StartupMessage
    /// arrived.
    pub(super) policy: RwLock<Arc<Policy>>,
    /// What identity logins log in with.
    pub(super) credentials: RwLock<Arc<Credentials>>,
    /// Every listener accepting now, as its accept loop hands it to new
    /// sessions.
    pub(super) listeners: RwLock<Vec<Arc<ListenerInfo>>>,
    /// Where a reload reads the configuration from: the file, or (started
    /// from flags) the configuration as started, whose files are re-read.
    pub(super) reload_source: RwLock<Option<(Option<PathBuf>, Config)>>,
    /// What a reload needs to start and stop accept loops; set by `run`.
    pub(super) accepting: Mutex<Option<Accepting>>,
    /// What a reload cannot change, as started: the admin listener, the
    /// `[cluster]` section and the audit chain's key file.
    pub(super) admin_bound: Option<AdminConfig>,
    pub(super) cluster_bound: Option<ClusterConfig>,
    pub(super) chain_key_bound: Option<PathBuf>,
    /// Counts shared by every listener's pending slots.
    pub(super) per_address: KeyedSlots<IpAddr>,

    pub(crate) audit: Arc<AuditLog>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) health: Arc<Health>,
    /// Authenticated sessions, against `limits.max_sessions`.
    pub(crate) sessions: KeyedSlots<()>,
    /// The limits a reload may change, read where they are applied.
    pub(crate) limits: Arc<LiveLimits>,
    pub(crate) cancels: Arc<CancelRegistry>,
    /// With `[cluster]`: the fleet's shared state in Redis.
    pub(crate) cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Sessions per identity name, for rules with `max_sessions`.
    pub(crate) identity_sessions: KeyedSlots<String>,
    /// The sessions relaying now (admin console).
    pub(crate) live: crate::admin::live::LiveSessions,
    /// scram mode: failed logins per address and per user.
    pub(crate) login_throttle: LoginThrottle,
    /// Log lines and audit events caused by strangers, summarised past a
    /// few per kind and window.
    pub(crate) warn_limit: WarnLimiter,
    pub(crate) audit_limit: WarnLimiter,
    /// Where shutting down stands; every relaying session watches it.
    pub(crate) shutdown: watch::Sender<ShutdownPhase>,
    /// Where process-wide work goes when a session starts it (a console
    /// `RELOAD` on a per-core session thread).
    pub(crate) process: super::cores::ProcessRuntime,
}

/// What `Server::bind` read and opened, from which `Shared` is made.
pub(super) struct Started {
    pub routes: Vec<Arc<Route>>,
    pub credentials: Credentials,
    pub listeners: Vec<Arc<ListenerInfo>>,
    pub audit: Arc<AuditLog>,
    pub metrics: Arc<Metrics>,
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    pub per_address: KeyedSlots<IpAddr>,
    pub limits: Arc<LiveLimits>,
}

impl Shared {
    pub(super) fn new(config: &Config, started: Started) -> Shared {
        let routes = Arc::new(RwLock::new(started.routes));
        // Weak: the metrics must not keep the routes (and the pools'
        // server connections) alive past the state.
        let read = Arc::downgrade(&routes);
        started.metrics.read_pools_with(move || {
            read.upgrade()
                .map(|r| {
                    pooled(&r.read_locked())
                        .iter()
                        .map(|p| pool_sample(p))
                        .collect()
                })
                .unwrap_or_default()
        });
        Shared {
            settings: RwLock::new(Arc::new(Settings::from(config))),
            routes,
            policy: RwLock::new(Arc::new(config.policy.clone())),
            credentials: RwLock::new(Arc::new(started.credentials)),
            listeners: RwLock::new(started.listeners),
            reload_source: RwLock::new(None),
            accepting: Mutex::new(None),
            admin_bound: config.admin.clone(),
            cluster_bound: config.cluster.clone(),
            chain_key_bound: config.audit.chain_key.clone(),
            per_address: started.per_address,
            audit: started.audit,
            metrics: started.metrics,
            health: Arc::default(),
            sessions: KeyedSlots::default(),
            limits: started.limits,
            cancels: CancelRegistry::new(
                config.limits.cancel_rate,
                config.limits.cancel_burst,
                started.cluster.clone(),
            ),
            cluster: started.cluster,
            identity_sessions: KeyedSlots::default(),
            live: Default::default(),
            login_throttle: LoginThrottle::new(&config.limits),
            warn_limit: WarnLimiter::new(WARN_LINES_PER_WINDOW),
            audit_limit: WarnLimiter::new(AUDIT_EVENTS_PER_WINDOW),
            shutdown: watch::Sender::new(ShutdownPhase::Running),
            process: super::cores::ProcessRuntime::current(),
        }
    }

    /// The settings new sessions get now.
    pub(crate) fn settings(&self) -> Arc<Settings> {
        self.settings.read_locked().clone()
    }

    pub(crate) fn policy(&self) -> Arc<Policy> {
        self.policy.read_locked().clone()
    }

    pub(crate) fn credentials(&self) -> Arc<Credentials> {
        self.credentials.read_locked().clone()
    }

    /// Every upstream as configured now.
    pub(crate) fn upstreams(&self) -> Vec<Arc<Upstream>> {
        let routes = self.routes.read_locked();
        routes.iter().map(|r| r.upstream.clone()).collect()
    }

    /// Every route (an upstream and how sessions log in to it) as
    /// configured now.
    pub(crate) fn routes(&self) -> Vec<Arc<Route>> {
        self.routes.read_locked().clone()
    }

    /// The pools of every pooled upstream as configured now (the console's
    /// SHOW POOLS, PAUSE, ...).
    pub(crate) fn pooled(&self) -> Vec<Arc<Pools>> {
        pooled(&self.routes.read_locked())
    }

    /// Every listener accepting now.
    pub(crate) fn listeners(&self) -> Vec<Arc<ListenerInfo>> {
        self.listeners.read_locked().clone()
    }

    /// The listener of this name as it is now.
    pub(super) fn listener(&self, name: &str) -> Option<Arc<ListenerInfo>> {
        self.listeners
            .read_locked()
            .iter()
            .find(|l| l.name == name)
            .cloned()
    }

    /// An event for the audit log and the metrics.
    /// See `AuditLog::emit` for what it returns.
    pub(crate) fn record(&self, event: &crate::audit::Event<'_>) -> bool {
        self.metrics.observe(event);
        self.audit.emit(event)
    }
}

/// The pools of these routes' pooled upstreams, once per upstream name, in
/// the configuration's order.
fn pooled(routes: &[Arc<Route>]) -> Vec<Arc<Pools>> {
    let mut out: Vec<Arc<Pools>> = Vec::new();
    for pools in routes.iter().filter_map(|r| r.pools.as_ref()) {
        if !out.iter().any(|p| p.name == pools.name) {
            out.push(pools.clone());
        }
    }
    out
}

/// An upstream's pools summed, as the metrics read them at each scrape.
pub(super) fn pool_sample(pools: &Pools) -> PoolSample {
    use std::sync::atomic::Ordering::Relaxed;
    let count = |n: usize| n as u64;
    let mut s = PoolSample {
        upstream: pools.name.clone(),
        ..PoolSample::default()
    };
    for pool in pools.all() {
        let (st, open, idle) = (&pool.stats, pool.open(), pool.idle_count());
        s.servers_active += count(open.saturating_sub(idle));
        s.servers_idle += count(idle);
        s.clients_active += count(st.active.load(Relaxed));
        s.clients_waiting += count(st.waiting.load(Relaxed));
        s.checkouts += st.checkouts.load(Relaxed);
        s.resets += st.resets.load(Relaxed);
        s.opened += st.opened.load(Relaxed);
        s.closed += st.closed.load(Relaxed);
    }
    s
}

/// What a session takes from the configuration when it starts, replaced
/// as a whole on reload: a plain value, read by its fields.
pub(crate) struct Settings {
    pub timeouts: Timeouts,
    /// The failed-login limits, for the fleet-wide check (`[cluster]`).
    pub limits: crate::config::Limits,
    pub whois: Option<WhoIsClient>,
    pub application_name: Option<String>,
    pub forward_settings: Vec<(String, String)>,
    /// Query audit: replace constants (`[audit] redact`).
    pub redact_queries: bool,
}

impl From<&Config> for Settings {
    fn from(config: &Config) -> Self {
        Settings {
            timeouts: config.timeouts.clone(),
            limits: config.limits.clone(),
            whois: config.tailscale.as_ref().map(|t| WhoIsClient {
                socket: t.socket.clone(),
                capability: t.capability.clone(),
                timeout: t.timeout,
            }),
            application_name: config.application_name.clone(),
            forward_settings: config.forward_settings.clone(),
            redact_queries: config.audit.redact,
        }
    }
}

/// What a session needs to know about the listener it arrived on.
/// Replaced as a whole on reload; each session keeps the one it was
/// accepted with.
pub(crate) struct ListenerInfo {
    pub name: String,
    /// Where it listens as configured (a reload that changes it rebinds).
    pub bind: BindAddress,
    /// This listener's acceptor (it differs per listener when client
    /// certificates are verified) with the certificate it serves; None
    /// without `[tls]`.
    pub tls: Option<ServedTls>,
    pub identity: ListenerIdentity,
    pub proxy_protocol: ProxyProtocol,
    pub proxy_trusted: Vec<ipnet::IpNet>,
    pub client_tls: ClientTlsMode,
    pub cancel_plaintext: CancelPlaintext,
    /// The upstream its sessions go to when no `[[route]]` matches, and
    /// how they log in to it (None: only routed sessions are served).
    pub route: Option<Arc<Route>>,
    /// The `[[route]]` table of the configuration it was made with.
    pub router: Arc<super::router::Router>,
    /// An https listener's limits and what they count (None: Postgres).
    pub http: Option<Arc<crate::http::HttpListener>>,
}

impl ListenerInfo {
    pub(crate) fn acceptor(&self) -> Option<&TlsAcceptor> {
        self.tls.as_ref().map(ServedTls::acceptor)
    }

    /// `tls-server-end-point` data of the certificate `acceptor` presents
    /// to a client whose SNI was `sni`: what that client binds to with
    /// SCRAM-SHA-256-PLUS (None: no TLS, or a signature algorithm that
    /// defines no binding).
    pub(crate) fn binding_for(&self, sni: Option<&str>) -> Option<Vec<u8>> {
        self.tls
            .as_ref()
            .and_then(|t| t.end_point_for(sni))
            .map(<[u8]>::to_vec)
    }
}

/// The running accept loops, for reloads that add or remove listeners
/// (defined here because `Shared` holds them; started and stopped by
/// `listen`, which implements them).
pub(super) struct Accepting {
    pub(super) sessions: TaskTracker,
    /// With `--runtime per-core`, where sessions run.
    pub(super) cores: Option<Arc<super::cores::Cores>>,
    pub(super) stop: CancellationToken,
    /// Each listener's own stop, its Unix socket path (removed when it
    /// stops) and its task.
    pub(super) loops: HashMap<String, AcceptLoop>,
}

pub(super) struct AcceptLoop {
    pub(super) stop: CancellationToken,
    pub(super) unix_path: Option<PathBuf>,
    pub(super) task: tokio::task::JoinHandle<()>,
}
