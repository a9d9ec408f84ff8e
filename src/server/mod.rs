//! Listeners, the accept loop, connection limits, and graceful shutdown.
//!
//! `Server::bind` does everything that can fail at start-up (TLS files,
//! upstream CA bundles, the audit log, binding sockets) so a misconfigured
//! pgbastion stops before it accepts anyone. `Server::run` then accepts until
//! told to stop, and drains open sessions with a deadline.

pub mod config_watch;
pub(crate) mod route;

use crate::sync::{MutexExt, RwLockExt};
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use thiserror::Error;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::admin::metrics::Metrics;
use crate::admin::Health;
use crate::audit::{AuditLog, ClientAddress, PreparedAudit};
use crate::auth::channel_binding::tls_server_end_point;
use crate::auth::credentials::Credentials;
use crate::auth::throttle::LoginThrottle;
use crate::cancel::CancelRegistry;
use crate::config::AdminConfig;
use crate::config::{
    BindAddress, CancelPlaintext, ClientCertMode, ClientTlsMode, Config, ListenerIdentity,
    ProxyProtocol, Timeouts,
};
use crate::identity::tailscale::WhoIsClient;
use crate::limits::keyed_slots::{KeyedPermit, KeyedSlots};
use crate::limits::warn::{self, WarnLimiter};
use crate::policy::Policy;
use crate::relay::ShutdownPhase;
use crate::stream::BoxedIo;
use crate::tls::{self, TlsConfigError};
use crate::upstream::Upstream;
use route::Route;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("listener {name:?}: {source}")]
    Listener {
        name: String,
        source: TlsConfigError,
    },
    #[error("upstream {name:?}: {source}")]
    Upstream {
        name: String,
        source: TlsConfigError,
    },
    #[error("upstream {name:?}: {source}")]
    Auth {
        name: String,
        source: crate::auth::source::SourceError,
    },
    #[error("[[credential]]: {0}")]
    Credential(#[from] crate::auth::credentials::CredentialError),
    #[error("cannot open audit log: {0}")]
    Audit(std::io::Error),
    #[error("listener {name:?}: cannot listen on {addr}: {source}")]
    Bind {
        name: String,
        addr: String,
        source: std::io::Error,
    },
    #[error("listener {name:?}: {path} is in use by another running server")]
    SocketInUse { name: String, path: PathBuf },
    #[error("[cluster]: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("[audit] {0}")]
    ChainKey(crate::secret_file::SecretFileError),
    #[error("[audit] chain_key_file {0} holds fewer than 16 bytes: use a random key (e.g. head -c 32 /dev/urandom | base64)")]
    ChainKeyShort(PathBuf),
}

/// How audit lines are chained: an HMAC under `audit.chain_key_file`
/// (mode 0600), else SHA-256.
pub fn audit_digest(config: &Config) -> Result<crate::audit::chain::Digest, ServerError> {
    let Some(path) = &config.audit_chain_key else {
        return Ok(crate::audit::chain::Digest::Sha256);
    };
    read_chain_key(path).map(|k| crate::audit::chain::Digest::from_key(Some(&k)))
}

/// The key in a chain key file: its bytes, text or not (32 random bytes
/// are a good key), with trailing CR and LF bytes removed, as they always
/// were for text keys (an editor's newline is not part of the key). The
/// same rule applies in pgbastion and `audit verify`, so a chain verifies
/// with the file it was written with.
pub fn read_chain_key(path: &std::path::Path) -> Result<Vec<u8>, ServerError> {
    let key =
        crate::secret_file::read_bytes(path, "chain_key_file").map_err(ServerError::ChainKey)?;
    if key.len() < 16 {
        return Err(ServerError::ChainKeyShort(path.to_owned()));
    }
    Ok(key)
}

/// What every session of the process shares.
pub(crate) struct Shared {
    /// Deadlines, the application_name template and the LocalAPI client:
    /// replaced as a whole on reload; each session keeps the one it
    /// started with.
    settings: RwLock<Arc<Settings>>,
    /// The admin listener as bound: the one thing a reload cannot change.
    admin_bound: Option<AdminConfig>,
    /// Replaced as a whole on reload; a session uses the route its
    /// listener named when it was accepted.
    routes: RwLock<Vec<Arc<Route>>>,
    pub audit: Arc<AuditLog>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Authenticated sessions, against `limits.max_sessions`.
    pub sessions: KeyedSlots<()>,
    /// The limits a reload may change, read where they are applied.
    pub limits: Arc<LiveLimits>,
    pub cancels: Arc<CancelRegistry>,
    /// With `[cluster]`: the fleet's shared state in Redis.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The `[cluster]` section as started: a reload cannot change it.
    cluster_bound: Option<crate::config::ClusterConfig>,
    /// Likewise the audit chain's key file.
    chain_key_bound: Option<PathBuf>,
    /// Replaced as a whole on reload; sessions decide with the one current
    /// when their StartupMessage arrived.
    pub policy: RwLock<Arc<Policy>>,
    /// What identity logins log in with; replaced as a whole on reload.
    pub credentials: RwLock<Arc<Credentials>>,
    /// Sessions per identity name, for rules with `max_sessions`.
    pub identity_sessions: KeyedSlots<String>,
    /// The sessions relaying now (admin console).
    pub live: crate::admin::live::LiveSessions,
    /// Where a reload reads the configuration from: the file, or (started
    /// from flags) the configuration as started, whose files are re-read.
    reload_source: RwLock<Option<(Option<std::path::PathBuf>, Config)>>,

    /// scram mode: failed logins per address and per user.
    pub login_throttle: LoginThrottle,
    /// Log lines and audit events caused by strangers, summarised past a
    /// few per kind and window.
    pub warn_limit: WarnLimiter,
    pub audit_limit: WarnLimiter,
    /// Where shutting down stands; every relaying session watches it.
    pub shutdown: watch::Sender<ShutdownPhase>,
    /// Every listener accepting now, as its accept loop hands it to new
    /// sessions: replaced as a whole on reload.
    listeners: RwLock<Vec<Arc<ListenerInfo>>>,
    /// What a reload needs to start and stop accept loops; set by `run`.
    accepting: Mutex<Option<Accepting>>,
    /// Counts shared by every listener's pending slots.
    per_address: KeyedSlots<IpAddr>,
}

/// What a session takes from the configuration when it starts, replaced
/// as a whole on reload.
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
            redact_queries: config.audit_redact,
        }
    }
}

impl Shared {
    /// The settings new sessions get now.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.read_locked().clone()
    }

    /// An event for the audit log and the metrics.
    /// See `AuditLog::emit` for what it returns.
    pub fn record(&self, event: &crate::audit::Event<'_>) -> bool {
        self.metrics.observe(event);
        self.audit.emit(event)
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy.read_locked().clone()
    }

    /// Every listener accepting now.
    pub fn listeners(&self) -> Vec<Arc<ListenerInfo>> {
        self.listeners.read_locked().clone()
    }

    /// The listener of this name as it is now.
    fn listener(&self, name: &str) -> Option<Arc<ListenerInfo>> {
        self.listeners
            .read_locked()
            .iter()
            .find(|l| l.name == name)
            .cloned()
    }

    /// Every upstream as configured now.
    pub fn upstreams(&self) -> Vec<Arc<Upstream>> {
        let routes = self.routes.read_locked();
        routes.iter().map(|r| r.upstream.clone()).collect()
    }

    /// Every route (upstream and how sessions log in to it) as configured
    /// now.
    pub fn routes(&self) -> Vec<Arc<Route>> {
        self.routes.read_locked().clone()
    }

    pub fn credentials(&self) -> Arc<Credentials> {
        self.credentials.read_locked().clone()
    }
}

/// The channel binding data of pgbastion's own certificate (which already
/// loaded fine for the acceptors).
fn own_binding(config: &Config) -> Option<Vec<u8>> {
    config
        .tls
        .as_ref()
        .and_then(|t| tls::load_certs(&t.cert, "TLS certificate").ok())
        .and_then(|certs| certs.first().and_then(|c| tls_server_end_point(c)))
}

/// The expiry of every certificate pgbastion uses, for the metrics.
fn record_certificate_expiry(config: &Config, metrics: &Metrics) {
    let set = |what: String, path: &std::path::Path| {
        if let Some(t) = tls::earliest_expiry(path) {
            metrics.certificate_expires(what, t);
        }
    };
    if let Some(t) = &config.tls {
        set("tls".into(), &t.cert);
    }
    for l in &config.listeners {
        if let ListenerIdentity::ClientCert { ca_file, .. } = &l.identity {
            set(format!("client_ca:{}", l.name), ca_file);
        }
    }
    for u in &config.upstreams {
        if let Some(ca) = &u.roots.ca_file {
            set(format!("upstream_ca:{}", u.name), ca);
        }
        if let Some((cert, _)) = &u.client_identity {
            set(format!("upstream_client_cert:{}", u.name), cert);
        }
    }
    for c in &config.credentials {
        if let crate::config::CredentialSource::ClientCert { cert, .. } = &c.source {
            set(
                format!(
                    "credential:{}:{}",
                    config.upstreams[c.upstream].name, c.user
                ),
                cert,
            );
        }
    }
}

/// Everything a reload reads and binds, before anything is replaced: a
/// mistake in any of it (a file, a port in use) changes nothing.
fn load_reloadable(config: &Config, shared: &Shared) -> Result<Loaded, ServerError> {
    let credentials = Credentials::load(&config.credentials, &config.upstreams)?;
    let (acceptors, fresh) = prepare_tls(config)?;
    let audit = shared
        .audit
        .prepare(&config.audit, config.audit_on_failure)
        .map_err(ServerError::Audit)?;
    let old = shared.routes();
    let routes: Vec<Arc<Route>> = fresh
        .into_iter()
        .map(|r| Arc::new(r.keeping_state_of(&old)))
        .collect();
    let listeners = listener_infos(config, acceptors, &routes);
    // Listeners that are new or moved are bound now, so an address in
    // use changes nothing.
    let current = shared.listeners();
    let mut bound = Vec::new();
    for (l, info) in config.listeners.iter().zip(&listeners) {
        let moved = match current.iter().find(|c| c.name == l.name) {
            Some(c) if c.bind == l.bind => continue,
            Some(_) => true,
            None => false,
        };
        bound.push((
            moved,
            make_listener(&info.name, &l.bind, &shared.per_address, &shared.limits)?,
        ));
    }
    Ok(Loaded {
        credentials,
        routes,
        listeners,
        audit,
        bound,
    })
}

/// What each listener's sessions get: its acceptor and certificate
/// binding, and its route (all from one configuration, so a session
/// never mixes a reload's certificate with the previous one's binding).
fn listener_infos(
    config: &Config,
    acceptors: Vec<Option<TlsAcceptor>>,
    routes: &[Arc<Route>],
) -> Vec<Arc<ListenerInfo>> {
    let binding = own_binding(config);
    config
        .listeners
        .iter()
        .zip(acceptors)
        .map(|(l, acceptor)| {
            Arc::new(ListenerInfo {
                name: l.name.clone(),
                bind: l.bind.clone(),
                binding: acceptor.as_ref().and(binding.clone()),
                acceptor,
                identity: l.identity.clone(),
                proxy_protocol: l.proxy_protocol,
                proxy_trusted: l.proxy_trusted.clone(),
                client_tls: l.client_tls,
                cancel_plaintext: l.cancel_plaintext,
                route: routes[l.upstream].clone(),
            })
        })
        .collect()
}

/// What a reload read and bound, before it changes anything.
struct Loaded {
    credentials: Credentials,
    routes: Vec<Arc<Route>>,
    listeners: Vec<Arc<ListenerInfo>>,
    audit: Option<PreparedAudit>,
    /// Sockets for listeners that are new, or moved (true) to another
    /// address.
    bound: Vec<(bool, Listener)>,
}

/// What a reload changed.
pub struct Reloaded {
    pub credentials: usize,
    /// Changes that were not applied: they take a restart.
    pub restart_needed: Vec<String>,
}

/// Reloads the configuration while the server runs (SIGHUP, the console's
/// RELOAD, watched files). Sessions already admitted keep what they started
/// with; new ones follow.
#[derive(Clone)]
pub struct ReloadHandle(Arc<Shared>);

impl ReloadHandle {
    pub(crate) fn from_shared(shared: &Arc<Shared>) -> ReloadHandle {
        ReloadHandle(shared.clone())
    }

    /// Applies a configuration: rules and credentials together (rules
    /// with `login = "identity"` need both), upstreams, listeners,
    /// certificates, limits, timeouts and the audit destination. Everything
    /// is read and bound first: if anything is wrong, nothing changes and
    /// the error says what. Sessions already running keep what they started
    /// with.
    pub fn replace_policy(&self, config: &Config) -> Result<Reloaded, ServerError> {
        let loaded = load_reloadable(config, &self.0);
        self.0.metrics.reloaded(loaded.is_ok());
        let Loaded {
            credentials,
            routes,
            listeners,
            audit,
            bound,
        } = loaded?;
        if let Some(audit) = audit {
            self.0.audit.retarget(audit);
            tracing::info!(target = ?config.audit, on_failure = ?config.audit_on_failure, "audit log destination changed");
        }
        let n = credentials.len();
        *self.0.credentials.write_locked() = Arc::new(credentials);
        *self.0.policy.write_locked() = Arc::new(config.policy.clone());
        *self.0.routes.write_locked() = routes;
        self.apply_listener_changes(listeners, bound);
        self.0.limits.store(&config.limits);
        self.0.login_throttle.configure(&config.limits);
        self.0
            .cancels
            .set_rate(config.limits.cancel_rate, config.limits.cancel_burst);
        *self.0.settings.write_locked() = Arc::new(Settings::from(config));
        record_certificate_expiry(config, &self.0.metrics);
        let mut restart_needed = Vec::new();
        if self.0.admin_bound != config.admin {
            restart_needed.push("[admin]".to_owned());
        }
        if self.0.cluster_bound != config.cluster {
            restart_needed.push("[cluster]".to_owned());
        }
        if self.0.chain_key_bound != config.audit_chain_key {
            restart_needed.push("audit.chain_key_file".to_owned());
        }
        Ok(Reloaded {
            credentials: n,
            restart_needed,
        })
    }

    /// Puts the new listener list in place: stops the accept loops of
    /// listeners removed or moved (their sessions go on), then starts the
    /// ones for sockets the reload bound.
    fn apply_listener_changes(
        &self,
        listeners: Vec<Arc<ListenerInfo>>,
        bound: Vec<(bool, Listener)>,
    ) {
        let mut accepting = self.0.accepting.locked();
        let mut list = self.0.listeners.write_locked();
        if let Some(accepting) = accepting.as_mut() {
            for old in list.iter() {
                let moved = bound.iter().any(|(moved, l)| *moved && l.name == old.name);
                if moved || !listeners.iter().any(|l| l.name == old.name) {
                    accepting.stop(&old.name, moved);
                }
            }
        }
        *list = listeners;
        drop(list);
        match accepting.as_mut() {
            Some(accepting) => {
                for (_, l) in bound {
                    accepting.start(l, self.0.clone());
                }
            }
            // Not running (yet, or any more): the sockets just bound close.
            None => drop(bound),
        }
    }

    /// Where `reload_all` reads from: the config file, or the
    /// configuration the server started with (flags).
    pub fn set_source(&self, path: Option<std::path::PathBuf>, initial: Config) {
        *self.0.reload_source.write_locked() = Some((path, initial));
    }

    /// Everything SIGHUP (and the console's RELOAD) does: reopen the audit
    /// file, re-read the scram secrets files, and reload the configuration
    /// (rules, credentials, certificates). Logs each step; returns a
    /// summary, or why the configuration was refused (nothing changed).
    pub fn reload_all(&self) -> Result<String, String> {
        self.reopen_audit();
        tracing::info!("audit log reopened");
        for (upstream, result) in self.reload_secrets() {
            match result {
                Ok(users) => tracing::info!(%upstream, users, "secrets file reloaded"),
                Err(e) => {
                    tracing::error!(%upstream, error = %e, "secrets file reload refused; keeping the entries in use")
                }
            }
        }
        let source = self.0.reload_source.read_locked().clone();
        let Some((path, initial)) = source else {
            return Ok("audit log reopened, secrets files re-read".into());
        };
        let from = path
            .as_ref()
            .map_or_else(|| "flags".to_owned(), |p| p.display().to_string());
        let config = match &path {
            Some(p) => Config::from_file(p).map_err(|e| e.to_string()),
            None => Ok(initial),
        };
        let result = config.and_then(|c| {
            self.replace_policy(&c)
                .map(|r| (c.policy.len(), r))
                .map_err(|e| e.to_string())
        });
        match result {
            Ok((rules, reloaded)) => {
                tracing::info!(source = %from, rules, credentials = reloaded.credentials, "policy and credentials reloaded, certificates re-read");
                if !reloaded.restart_needed.is_empty() {
                    tracing::warn!(source = %from, changes = %reloaded.restart_needed.join(", "), "these changes take a restart");
                }
                Ok(format!(
                    "reloaded {from}: {rules} rules, {} credentials, certificates re-read{}",
                    reloaded.credentials,
                    if reloaded.restart_needed.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; needing a restart: {}",
                            reloaded.restart_needed.join(", ")
                        )
                    }
                ))
            }
            Err(e) => {
                self.0.metrics.reloaded(false);
                tracing::error!(source = %from, error = %e, "reload refused; keeping the current policy, credentials and certificates");
                Err(e)
            }
        }
    }

    /// Reopens the audit file (after log rotation moved it).
    pub fn reopen_audit(&self) {
        self.0.audit.reopen();
    }

    /// Re-reads every upstream's secrets file. A file that does not parse
    /// keeps its previous contents in use; the error says which.
    pub fn reload_secrets(&self) -> Vec<(String, Result<usize, crate::auth::source::SourceError>)> {
        self.0
            .routes()
            .iter()
            .filter_map(|r| {
                let result = r.scram()?.reload().transpose()?;
                Some((r.name().to_owned(), result))
            })
            .collect()
    }
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

/// What a session needs to know about the listener it arrived on.
/// Replaced as a whole on reload; each session keeps the one it was
/// accepted with.
pub(crate) struct ListenerInfo {
    pub name: String,
    /// Where it listens as configured (a reload that changes it rebinds).
    pub bind: BindAddress,
    /// This listener's TLS acceptor (it differs per listener when client
    /// certificates are verified).
    pub acceptor: Option<TlsAcceptor>,
    /// `tls-server-end-point` data of the certificate `acceptor` presents:
    /// what a TLS client binds to with SCRAM-SHA-256-PLUS (None: no TLS,
    /// or a signature algorithm that defines no binding).
    pub binding: Option<Vec<u8>>,
    pub identity: ListenerIdentity,
    pub proxy_protocol: ProxyProtocol,
    pub proxy_trusted: Vec<ipnet::IpNet>,
    pub client_tls: ClientTlsMode,
    pub cancel_plaintext: CancelPlaintext,
    /// The upstream its sessions go to, and how they log in to it.
    pub route: Arc<Route>,
}

enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A bound socket and its accept loop's state; what a session gets with
/// each connection is looked up by `name` when it is accepted.
struct Listener {
    name: String,
    socket: Socket,
    pending: PendingSlots,
}

/// Validates a config completely (reading every certificate, key and CA
/// bundle) without binding anything: what `check-config` runs.
pub fn check(config: &Config) -> Result<(), ServerError> {
    prepare_tls(config)?;
    Credentials::load(&config.credentials, &config.upstreams)?;
    if let Some(c) = &config.cluster {
        crate::cluster::Cluster::check(c)?;
    }
    audit_digest(config)?;
    Ok(())
}

/// Each listener's acceptor (None: no [tls]), and every route.
type PreparedTls = (Vec<Option<TlsAcceptor>>, Vec<Route>);

fn prepare_tls(config: &Config) -> Result<PreparedTls, ServerError> {
    let acceptors = config
        .listeners
        .iter()
        .map(|l| {
            let Some(tls_cfg) = &config.tls else {
                return Ok(None);
            };
            let auth = match &l.identity {
                ListenerIdentity::ClientCert { ca_file, mode, .. } => Some(tls::ClientAuth {
                    ca_file,
                    required: *mode == ClientCertMode::Required,
                }),
                _ => None,
            };
            tls::client_acceptor(tls_cfg, auth)
                .map(Some)
                .map_err(|source| ServerError::Listener {
                    name: l.name.clone(),
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let routes = config
        .upstreams
        .iter()
        .map(Route::new)
        .collect::<Result<Vec<_>, ServerError>>()?;
    Ok((acceptors, routes))
}

/// Connections not yet authenticated (negotiating TLS and startup, or in
/// the middle of authentication): a share per listener, so a flood on one
/// listener cannot lock out another (the Unix socket, say), and a cap per
/// client address across listeners (the counts are shared by every
/// listener), so one address cannot take every slot. Together with the
/// per-message limits while authenticating, this is what bounds the memory
/// strangers can make pgbastion hold.
pub(crate) struct PendingSlots {
    per_listener: KeyedSlots<()>,
    per_address: KeyedSlots<IpAddr>,
    limits: Arc<LiveLimits>,
}

/// The limits a reload may change: read at each use, stored on reload.
#[derive(Debug)]
pub(crate) struct LiveLimits {
    pub max_sessions: AtomicUsize,
    pub max_pending: AtomicUsize,
    pub max_pending_per_address: AtomicUsize,
}

impl LiveLimits {
    fn new(limits: &crate::config::Limits) -> Self {
        LiveLimits {
            max_sessions: AtomicUsize::new(limits.max_sessions),
            max_pending: AtomicUsize::new(limits.max_pending),
            max_pending_per_address: AtomicUsize::new(limits.max_pending_per_address),
        }
    }

    fn store(&self, limits: &crate::config::Limits) {
        self.max_sessions
            .store(limits.max_sessions, Ordering::SeqCst);
        self.max_pending.store(limits.max_pending, Ordering::SeqCst);
        self.max_pending_per_address
            .store(limits.max_pending_per_address, Ordering::SeqCst);
    }
}

/// One unauthenticated connection's slot, given back when dropped (once
/// the session is authenticated, or ends).
pub(crate) struct PendingPermit {
    _listener: KeyedPermit<()>,
    address: Option<KeyedPermit<IpAddr>>,
    per_address: KeyedSlots<IpAddr>,
    limits: Arc<LiveLimits>,
}

impl PendingPermit {
    /// Counts the connection against the client address a PROXY header
    /// states, from now on: one client behind a balancer must not take
    /// every pending slot of the listener (issue 19 item 25). False: that
    /// address holds its share already.
    pub(crate) fn readdress(&mut self, ip: IpAddr) -> bool {
        let max = self.limits.max_pending_per_address.load(Ordering::SeqCst);
        self.address = self.per_address.try_acquire(ip, max);
        self.address.is_some()
    }
}

/// Why a connection got no pending slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingRefusal {
    Listener,
    Address,
}

impl PendingSlots {
    fn new(per_address: &KeyedSlots<IpAddr>, limits: &Arc<LiveLimits>) -> Self {
        PendingSlots {
            per_listener: KeyedSlots::default(),
            per_address: per_address.clone(),
            limits: limits.clone(),
        }
    }

    fn try_acquire(&self, ip: Option<IpAddr>) -> Result<PendingPermit, PendingRefusal> {
        let listener = self
            .per_listener
            .try_acquire((), self.limits.max_pending.load(Ordering::SeqCst))
            .ok_or(PendingRefusal::Listener)?;
        let address = match ip {
            Some(ip) => Some(
                self.per_address
                    .try_acquire(
                        ip,
                        self.limits.max_pending_per_address.load(Ordering::SeqCst),
                    )
                    .ok_or(PendingRefusal::Address)?,
            ),
            // Unix-socket clients: the socket's permissions decide.
            None => None,
        };
        Ok(PendingPermit {
            _listener: listener,
            address,
            per_address: self.per_address.clone(),
            limits: self.limits.clone(),
        })
    }
}

/// Log lines of one kind caused by strangers, per `warn::WINDOW`.
const WARN_LINES_PER_WINDOW: u32 = 10;
/// Audit events of one kind for connections that never named a user (and
/// unmatched or refused cancels), per window.
const AUDIT_EVENTS_PER_WINDOW: u32 = 100;

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

/// After the drain, how long sessions have to write their last words.
const FINAL_GRACE: Duration = Duration::from_secs(3);

pub struct Server {
    shared: Arc<Shared>,
    listeners: Vec<Listener>,
    drain: Duration,
    admin: Option<(TcpListener, AdminConfig)>,
}

impl Server {
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        let (acceptors, routes) = prepare_tls(&config)?;
        let credentials = Credentials::load(&config.credentials, &config.upstreams)?;
        let routes: Vec<Arc<Route>> = routes.into_iter().map(Arc::new).collect();
        let infos = listener_infos(&config, acceptors, &routes);
        let digest = audit_digest(&config)?;
        let audit = Arc::new(
            AuditLog::open(&config.audit, config.audit_on_failure, digest)
                .map_err(ServerError::Audit)?,
        );
        let metrics = Arc::new(Metrics::new(audit.clone()));
        record_certificate_expiry(&config, &metrics);
        let cluster = match &config.cluster {
            Some(c) => Some(crate::cluster::Cluster::start(c, metrics.clone())?),
            None => None,
        };
        let admin = match &config.admin {
            Some(a) => Some((
                TcpListener::bind(a.listen)
                    .await
                    .map_err(|source| ServerError::Bind {
                        name: "admin".into(),
                        addr: a.listen.to_string(),
                        source,
                    })?,
                a.clone(),
            )),
            None => None,
        };
        let mut listeners = Vec::new();
        // One count per client address, across every listener.
        let per_address = KeyedSlots::default();
        let limits = Arc::new(LiveLimits::new(&config.limits));
        for l in &config.listeners {
            listeners.push(make_listener(&l.name, &l.bind, &per_address, &limits)?);
        }
        Ok(Server {
            shared: Arc::new(Shared {
                settings: RwLock::new(Arc::new(Settings::from(&config))),
                admin_bound: config.admin.clone(),
                routes: RwLock::new(routes),
                audit,
                metrics,
                health: Arc::default(),
                sessions: KeyedSlots::default(),
                limits: limits.clone(),
                cancels: CancelRegistry::new(
                    config.limits.cancel_rate,
                    config.limits.cancel_burst,
                    cluster.clone(),
                ),
                cluster,
                cluster_bound: config.cluster.clone(),
                chain_key_bound: config.audit_chain_key.clone(),
                policy: RwLock::new(Arc::new(config.policy.clone())),
                credentials: RwLock::new(Arc::new(credentials)),
                identity_sessions: KeyedSlots::default(),
                live: Default::default(),
                reload_source: RwLock::new(None),

                login_throttle: LoginThrottle::new(&config.limits),
                shutdown: watch::Sender::new(ShutdownPhase::Running),
                warn_limit: WarnLimiter::new(WARN_LINES_PER_WINDOW),
                audit_limit: WarnLimiter::new(AUDIT_EVENTS_PER_WINDOW),
                listeners: RwLock::new(infos),
                accepting: Mutex::new(None),
                per_address: per_address.clone(),
            }),
            listeners,
            drain: config.timeouts.shutdown_drain,
            admin,
        })
    }

    /// A handle to end every session at once while draining.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shared.clone())
    }

    /// A handle to reload the policy and secrets while the server runs.
    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle(self.shared.clone())
    }

    /// The addresses actually bound (a configured port 0 becomes the real
    /// port), by listener name.
    pub fn local_addrs(&self) -> Vec<(String, BindAddress)> {
        self.listeners
            .iter()
            .filter_map(|l| {
                let addr = match &l.socket {
                    Socket::Tcp(t) => BindAddress::Tcp(t.local_addr().ok()?),
                    Socket::Unix(_, p) => BindAddress::Unix(p.clone()),
                };
                Some((l.name.clone(), addr))
            })
            .collect()
    }

    /// Accepts until `shutdown` completes, then stops accepting, ends idle
    /// sessions at once and lets busy ones finish for up to the drain
    /// timeout (or until `ShutdownHandle::now`), then ends the rest.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let stop = CancellationToken::new();
        let sessions = TaskTracker::new();
        {
            let mut accepting = Accepting {
                sessions: sessions.clone(),
                stop: stop.clone(),
                loops: HashMap::new(),
            };
            for l in self.listeners {
                accepting.start(l, self.shared.clone());
            }
            *self.shared.accepting.locked() = Some(accepting);
        }
        let summaries = tokio::spawn(summarise(self.shared.clone()));
        let admin_stop = CancellationToken::new();
        let mut unready_grace = Duration::ZERO;
        if let Some((listener, config)) = self.admin {
            unready_grace = config.unready_grace;
            info!(address = %config.listen, "admin listener: /metrics /livez /readyz /startupz");
            tokio::spawn(crate::admin::serve(
                listener,
                config,
                self.shared.metrics.clone(),
                self.shared.health.clone(),
                admin_stop.clone(),
            ));
        }
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
        sessions.close();
        // Idle sessions end now (57P01); busy ones as soon as they are
        // idle, or at the drain deadline, or at a second signal.
        self.shared.shutdown.send_if_modified(|p| {
            std::mem::replace(p, ShutdownPhase::Draining) == ShutdownPhase::Running
        });
        let mut phase = self.shared.shutdown.subscribe();
        let now_requested = async {
            let _ = phase.wait_for(|p| *p == ShutdownPhase::Now).await;
        };
        tokio::select! {
            _ = tokio::time::timeout(self.drain, sessions.wait()) => {}
            _ = now_requested => {}
        }
        if !sessions.is_empty() {
            warn!(
                remaining = sessions.len(),
                "ending the remaining sessions now"
            );
            self.shared.shutdown.send_replace(ShutdownPhase::Now);
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
        summaries.abort();
        for (kind, count) in self.shared.warn_limit.take_summaries() {
            warn!(
                kind,
                count, "{count} more like the above ({kind}), not logged one by one"
            );
        }
        for (kind, count) in self.shared.audit_limit.take_summaries() {
            self.shared.audit.emit(&crate::audit::Event::Suppressed {
                kind,
                count,
                window_s: warn::WINDOW.as_secs(),
            });
        }
        // Blocking, but nothing else runs any more.
        self.shared.audit.drain(Duration::from_secs(5));
        admin_stop.cancel();
    }
}

/// Binds a Unix socket, replacing a stale socket file left by a crashed
/// process but never one a live server is listening on.
/// Binds one listener's socket. Synchronous (std sockets handed to
/// tokio), so a reload can bind new listeners before it changes anything.
fn bind_socket(name: &str, bind: &BindAddress) -> Result<Socket, ServerError> {
    let failed = |addr: String| {
        move |source| ServerError::Bind {
            name: name.into(),
            addr,
            source,
        }
    };
    match bind {
        BindAddress::Tcp(addr) => {
            let std = std::net::TcpListener::bind(addr).map_err(failed(addr.to_string()))?;
            std.set_nonblocking(true)
                .map_err(failed(addr.to_string()))?;
            Ok(Socket::Tcp(
                TcpListener::from_std(std).map_err(failed(addr.to_string()))?,
            ))
        }
        BindAddress::Unix(path) => {
            let shown = path.display().to_string();
            if path.exists() {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(ServerError::SocketInUse {
                        name: name.into(),
                        path: path.into(),
                    });
                }
                let _ = std::fs::remove_file(path);
            }
            let std =
                std::os::unix::net::UnixListener::bind(path).map_err(failed(shown.clone()))?;
            std.set_nonblocking(true).map_err(failed(shown.clone()))?;
            Ok(Socket::Unix(
                UnixListener::from_std(std).map_err(failed(shown))?,
                path.clone(),
            ))
        }
    }
}

/// A listener's socket, bound, with its pending slots.
fn make_listener(
    name: &str,
    bind: &BindAddress,
    per_address: &KeyedSlots<IpAddr>,
    limits: &Arc<LiveLimits>,
) -> Result<Listener, ServerError> {
    Ok(Listener {
        name: name.to_owned(),
        socket: bind_socket(name, bind)?,
        pending: PendingSlots::new(per_address, limits),
    })
}

/// The running accept loops, for reloads that add or remove listeners.
struct Accepting {
    sessions: TaskTracker,
    stop: CancellationToken,
    /// Each listener's own stop, its Unix socket path (removed when it
    /// stops) and its task.
    loops: HashMap<String, AcceptLoop>,
}

struct AcceptLoop {
    stop: CancellationToken,
    unix_path: Option<PathBuf>,
    task: tokio::task::JoinHandle<()>,
}

impl Accepting {
    fn start(&mut self, l: Listener, shared: Arc<Shared>) {
        let own = self.stop.child_token();
        let path = match &l.socket {
            Socket::Unix(_, p) => Some(p.clone()),
            Socket::Tcp(_) => None,
        };
        info!(listener = %l.name, "listening");
        let name = l.name.clone();
        let task = tokio::spawn(accept_loop(l, shared, self.sessions.clone(), own.clone()));
        self.loops.insert(
            name,
            AcceptLoop {
                stop: own,
                unix_path: path,
                task,
            },
        );
    }

    /// Stops one listener (removed, or `moved` to another address, by a
    /// reload); its sessions go on.
    fn stop(&mut self, name: &str, moved: bool) {
        if let Some(l) = self.loops.remove(name) {
            l.stop.cancel();
            if let Some(p) = l.unix_path {
                let _ = std::fs::remove_file(p);
            }
            let why = if moved { "moved" } else { "removed" };
            info!(listener = %name, "stopped listening on the old address ({why} by a reload)");
        }
    }

    /// Stops every listener and waits until none accepts any more.
    async fn stop_all(self) {
        self.stop.cancel();
        for (_, l) in self.loops {
            let _ = l.task.await;
            if let Some(p) = l.unix_path {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

async fn accept_loop(
    l: Listener,
    shared: Arc<Shared>,
    sessions: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let accepted: std::io::Result<Accepted> = tokio::select! {
            _ = stop.cancelled() => return,
            r = accept(&l.socket) => r,
        };
        let Accepted { io, peer, local } = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS and friends are transient: back off
                // briefly so a full fd table does not spin the CPU, and go on.
                error!(listener = %l.name, error = %e, "accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // What this connection's session gets: the listener as configured
        // now (a reload may have changed it since the last connection).
        let Some(info) = shared.listener(&l.name) else {
            // Removed by a reload that is stopping this loop right now.
            continue;
        };
        let client = peer.map_or_else(ClientAddress::unix, ClientAddress::tcp);
        // Behind a PROXY-protocol balancer every connection comes from the
        // balancer: until its header is read (under the header deadline)
        // only the listener's share applies; then the address the header
        // states is counted (`PendingPermit::readdress`). Counting the
        // balancer's address meanwhile would refuse a burst of new
        // connections (a pool starting) before their headers are read.
        let ip = match info.proxy_protocol {
            ProxyProtocol::Required => None,
            ProxyProtocol::Off => peer.map(|p| p.ip()),
        };
        let permit = match l.pending.try_acquire(ip) {
            Ok(p) => p,
            Err(why) => {
                let limit = match why {
                    PendingRefusal::Listener => "limits.max_pending",
                    PendingRefusal::Address => "limits.max_pending_per_address",
                };
                if shared.warn_limit.allow(limit) {
                    warn!(listener = %l.name, %client, limit, "too many unauthenticated connections; closing");
                }
                continue;
            }
        };
        debug!(listener = %l.name, %client, "accepted");
        sessions.spawn(crate::session::handle(
            io,
            peer,
            local,
            info,
            shared.clone(),
            permit,
        ));
    }
}

/// The address as everything compares it: an IPv4 client of a dual-stack
/// listener (`[::]`) arrives as `::ffff:a.b.c.d`, which no IPv4 rule,
/// limit or audit search would match (issue 19 item 3).
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// One accepted connection; the addresses are None for Unix sockets.
struct Accepted {
    io: BoxedIo,
    peer: Option<SocketAddr>,
    /// The address the client connected to (PROXY headers carry it on).
    local: Option<SocketAddr>,
}

async fn accept(socket: &Socket) -> std::io::Result<Accepted> {
    match socket {
        Socket::Tcp(t) => {
            let (tcp, addr) = t.accept().await?;
            crate::net::tune_tcp(&tcp);
            let local = tcp.local_addr().ok().map(canonical);
            Ok(Accepted {
                io: Box::new(tcp),
                peer: Some(canonical(addr)),
                local,
            })
        }
        Socket::Unix(u, _) => {
            let (s, _) = u.accept().await?;
            Ok(Accepted {
                io: Box::new(s),
                peer: None,
                local: None,
            })
        }
    }
}
