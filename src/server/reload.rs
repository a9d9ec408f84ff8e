//! Reloading while the server runs (SIGHUP, the console's RELOAD, watched
//! files): `ReloadHandle` reads and binds everything a configuration needs
//! first (`Loaded`), then swaps it in; sessions already admitted keep what
//! they started with, new ones follow. Also the file watch
//! (`[reload] watch = true`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::error::ServerError;
use super::listen::{Listener, StopReason};
use super::load::{listener_infos, prepare_tls, record_certificate_expiry, PreparedTls};
use super::route::Route;
use super::state::{ListenerInfo, Settings, Shared};
use crate::audit::PreparedAudit;
use crate::auth::credentials::Credentials;
use crate::config::Config;
use crate::sync::{MutexExt, RwLockExt};

/// Why a reload bound a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rebind {
    /// A listener the running configuration does not have.
    Added,
    /// A listener that moved to another address.
    Moved,
}

/// What a reload read and bound, before it changes anything: a mistake in
/// any of it (a file, a port in use) changes nothing.
struct Loaded {
    credentials: Credentials,
    routes: Vec<Arc<Route>>,
    listeners: Vec<Arc<ListenerInfo>>,
    audit: Option<PreparedAudit>,
    /// Sockets for listeners that are new, or moved to another address.
    bound: Vec<(Rebind, Listener)>,
    /// pgbastion's certificates as loaded, for the expiry metrics.
    certs: Option<Arc<crate::tls::ServerCerts>>,
}

impl Loaded {
    fn read(config: &Config, shared: &Shared) -> Result<Loaded, ServerError> {
        let credentials = Credentials::load(&config.credentials, &config.upstreams)?;
        let PreparedTls {
            certs,
            served,
            routes,
        } = prepare_tls(config)?;
        let audit = shared
            .audit
            .prepare(&config.audit.target, config.audit.on_failure)
            .map_err(ServerError::Audit)?;
        let old = shared.routes();
        let routes: Vec<Arc<Route>> = routes
            .into_iter()
            .map(|r| Arc::new(r.keeping_state_of(&old)))
            .collect();
        let listeners = listener_infos(config, served, &routes);
        Ok(Loaded {
            credentials,
            routes,
            listeners,
            audit,
            bound: bind_changed(config, shared)?,
            certs,
        })
    }
}

/// Binds the listeners that are new or moved now, so an address in use
/// changes nothing.
fn bind_changed(config: &Config, shared: &Shared) -> Result<Vec<(Rebind, Listener)>, ServerError> {
    let current = shared.listeners();
    let mut bound = Vec::new();
    for l in &config.listeners {
        let why = match current.iter().find(|c| c.name == l.name) {
            Some(c) if c.bind == l.bind => continue,
            Some(_) => Rebind::Moved,
            None => Rebind::Added,
        };
        let listener = Listener::bind(&l.name, &l.bind, &shared.per_address, &shared.limits)?;
        bound.push((why, listener));
    }
    Ok(bound)
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
        let loaded = Loaded::read(config, &self.0);
        self.0.metrics.reloaded(loaded.is_ok());
        let loaded = loaded?;
        if let Some(audit) = loaded.audit {
            self.0.audit.retarget(audit);
            tracing::info!(target = ?config.audit.target, on_failure = ?config.audit.on_failure, "audit log destination changed");
        }
        let n = loaded.credentials.len();
        *self.0.credentials.write_locked() = Arc::new(loaded.credentials);
        *self.0.policy.write_locked() = Arc::new(config.policy.clone());
        *self.0.routes.write_locked() = loaded.routes;
        self.apply_listener_changes(loaded.listeners, loaded.bound);
        self.0.limits.store(&config.limits);
        self.0.login_throttle.configure(&config.limits);
        self.0
            .cancels
            .set_rate(config.limits.cancel_rate, config.limits.cancel_burst);
        *self.0.settings.write_locked() = Arc::new(Settings::from(config));
        record_certificate_expiry(config, loaded.certs.as_deref(), &self.0.metrics);
        Ok(Reloaded {
            credentials: n,
            restart_needed: self.restart_needed(config),
        })
    }

    /// The sections that differ from what was started with but that a
    /// reload cannot change.
    fn restart_needed(&self, config: &Config) -> Vec<String> {
        let mut restart_needed = Vec::new();
        if self.0.admin_bound != config.admin {
            restart_needed.push("[admin]".to_owned());
        }
        if self.0.cluster_bound != config.cluster {
            restart_needed.push("[cluster]".to_owned());
        }
        if self.0.chain_key_bound != config.audit.chain_key {
            restart_needed.push("audit.chain_key_file".to_owned());
        }
        restart_needed
    }

    /// Puts the new listener list in place: stops the accept loops of
    /// listeners removed or moved (their sessions go on), then starts the
    /// ones for sockets the reload bound.
    fn apply_listener_changes(
        &self,
        listeners: Vec<Arc<ListenerInfo>>,
        bound: Vec<(Rebind, Listener)>,
    ) {
        let mut accepting = self.0.accepting.locked();
        let mut list = self.0.listeners.write_locked();
        if let Some(accepting) = accepting.as_mut() {
            for old in list.iter() {
                let moved = bound
                    .iter()
                    .any(|(why, l)| *why == Rebind::Moved && l.name == old.name);
                if moved {
                    accepting.stop(&old.name, StopReason::Moved);
                } else if !listeners.iter().any(|l| l.name == old.name) {
                    accepting.stop(&old.name, StopReason::Removed);
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
    pub fn set_source(&self, path: Option<PathBuf>, initial: Config) {
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
            Ok((rules, reloaded)) => Ok(reloaded_summary(&from, rules, &reloaded)),
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

/// Logs a reload that was applied, and says what it did.
fn reloaded_summary(from: &str, rules: usize, reloaded: &Reloaded) -> String {
    tracing::info!(source = %from, rules, credentials = reloaded.credentials, "policy and credentials reloaded, certificates re-read");
    let restart = reloaded.restart_needed.join(", ");
    if !reloaded.restart_needed.is_empty() {
        tracing::warn!(source = %from, changes = %restart, "these changes take a restart");
    }
    format!(
        "reloaded {from}: {rules} rules, {} credentials, certificates re-read{}",
        reloaded.credentials,
        if reloaded.restart_needed.is_empty() {
            String::new()
        } else {
            format!("; needing a restart: {restart}")
        }
    )
}

// ---------------------------------------------------------------------------
// `[reload] watch = true`: reload when a file changes, without a signal.
// Kubernetes updates a mounted Secret by swapping a symlinked directory,
// cert-manager and certbot by replacing files; polling each file's metadata
// (through symlinks) sees all of these, with no platform notification API.
// A change is acted on once every file has been still for the debounce
// period, so a certificate and its key replaced one after the other are
// reloaded together.

/// How often files are looked at.
const POLL: Duration = Duration::from_millis(500);

/// What is compared between two looks at a file: None when it is missing.
type Fingerprint = Option<(SystemTime, u64, u64)>;

fn fingerprint(path: &PathBuf) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

fn look(files: &[PathBuf]) -> Vec<Fingerprint> {
    files.iter().map(fingerprint).collect()
}

/// The files to watch: the configuration file (if any) and every file it
/// names.
fn watched_files(config_path: Option<&PathBuf>, config: &Config) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = config_path.into_iter().cloned().collect();
    files.extend(config.referenced_files());
    files.sort();
    files.dedup();
    files
}

/// Watches until the process ends.
pub async fn watch(
    handle: ReloadHandle,
    config_path: Option<PathBuf>,
    initial: Config,
    debounce: Duration,
) {
    let mut watched = watched_files(config_path.as_ref(), &initial);
    let mut seen = look(&watched);
    tracing::info!(
        files = watched.len(),
        "watching configuration files for changes"
    );
    loop {
        tokio::time::sleep(POLL).await;
        let now = look(&watched);
        if now == seen {
            continue;
        }
        // Changed: wait until nothing has changed for `debounce`.
        let mut last = now;
        loop {
            tokio::time::sleep(debounce).await;
            let again = look(&watched);
            if again == last {
                break;
            }
            last = again;
        }
        tracing::info!("a configuration file changed; reloading");
        if handle.reload_all().is_ok() {
            // The new configuration may name other files.
            if let Some(Ok(config)) = config_path.as_ref().map(|p| Config::from_file(p)) {
                watched = watched_files(config_path.as_ref(), &config);
            }
        }
        seen = look(&watched);
    }
}
