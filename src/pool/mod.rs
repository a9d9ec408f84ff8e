//! Server connection pooling (issue 21): sessions of a pooled upstream
//! borrow server connections per transaction (`pool_mode = "transaction"`)
//! or per session (`"session"`) instead of owning one, and every borrowed
//! connection is switched to the client it now serves: its settings, its
//! prepared statements, its identity (`[forward]`).
//!
//! - `Pools`: an upstream's pools, one per (database, user), with the
//!   upstream-wide bound, PAUSE/RESUME/RECONNECT and the idle sweeper.
//! - `Pool`: the idle connections of one (database, user), the places
//!   (`pool_size`) clients wait for, and the credential its connections
//!   log in with.
//! - `server`: one connection (dial, login, health check).
//! - `settings`, `prepared`, `classify`: what is switched per client.
//! - `engine`: the message-level relay of a pooled session; `session::pooled`
//!   drives it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::config::{PoolConfig, Timeouts};
use crate::protocol::message::ErrorResponse;
use crate::sync::MutexExt;
use crate::upstream::Upstream;

pub mod classify;
mod clean;
pub(crate) mod engine;
pub(crate) mod prepared;
pub(crate) mod registry;
pub(crate) mod relay;
pub(crate) mod server;
pub(crate) mod settings;

pub(crate) use clean::clean_and_return;
pub(crate) use server::{ServerConn, ServerLogin};

/// An idle connection unused for longer than this is checked before it is
/// handed out (a server restart or a network drop leaves dead ones).
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(2);

/// How often idle connections are swept (idle timeout, lifetime,
/// min_pool_size).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum PoolError {
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamError),
    #[error("logging in to the database server for the pool failed: {0}")]
    ServerLogin(#[from] crate::auth::login::LoginError),
    #[error("logging in to the database server for the pool failed: {0}")]
    Login(String),
    #[error("the database server's connection failed while logging in: {0}")]
    Wire(#[from] crate::auth::wire::WireError),
    #[error("the database server's connection failed: {0}")]
    ServerIo(std::io::Error),
    #[error("logging in to the database server did not complete within {}", humantime::format_duration(*.0))]
    LoginTimeout(Duration),
    #[error("no server connection of pool {pool} (pool_size {size}) came free within {} (query_wait_timeout)", humantime::format_duration(*.waited))]
    WaitTimeout {
        pool: String,
        size: usize,
        waited: Duration,
    },
    #[error("pgbastion is shutting down")]
    ShuttingDown,
}

impl PoolError {
    /// What the client is told.
    pub fn client_error(&self) -> ErrorResponse {
        match self {
            PoolError::WaitTimeout { .. } => ErrorResponse::new("53300", self.to_string())
                .with_hint("the pool's server connections are all in use: raise pool_size, shorten transactions, or raise query_wait_timeout"),
            PoolError::ShuttingDown => ErrorResponse::new("57P01", self.to_string()),
            PoolError::Upstream(_) | PoolError::ServerIo(_) | PoolError::Wire(_) => {
                ErrorResponse::new("08006", self.to_string())
            }
            PoolError::ServerLogin(_) | PoolError::Login(_) | PoolError::LoginTimeout(_) => {
                ErrorResponse::new("08006", self.to_string())
            }
        }
    }
}

/// Which pool of an upstream: per endpoint too for a templated upstream,
/// whose endpoints are different servers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct PoolKey {
    pub endpoint: Option<crate::routing::Endpoint>,
    pub database: String,
    pub user: String,
}

impl std::fmt::Display for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(e) = &self.endpoint {
            write!(f, "{e}:")?;
        }
        write!(f, "{}/{}", self.database, self.user)
    }
}

/// An upstream's pools.
pub(crate) struct Pools {
    pub name: String,
    pub config: PoolConfig,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    /// `max_server_connections`: held by every open connection.
    total: Option<Arc<Semaphore>>,
    /// PAUSE: checkouts wait; connections given back are closed.
    paused: watch::Sender<bool>,
    /// RECONNECT: connections opened before the current generation are
    /// closed when next given back.
    generation: AtomicU64,
}

impl Pools {
    pub fn new(name: &str, config: PoolConfig) -> Arc<Pools> {
        let pools = Arc::new(Pools {
            name: name.to_owned(),
            total: config
                .max_server_connections
                .map(|n| Arc::new(Semaphore::new(n))),
            config,
            pools: Mutex::new(HashMap::new()),
            paused: watch::channel(false).0,
            generation: AtomicU64::new(0),
        });
        spawn_sweeper(Arc::downgrade(&pools));
        pools
    }

    /// The pool of (database, user), made on first use.
    pub fn pool(self: &Arc<Self>, key: PoolKey) -> Arc<Pool> {
        let mut pools = self.pools.locked();
        pools
            .entry(key.clone())
            .or_insert_with(|| Pool::new(key, self))
            .clone()
    }

    /// Every pool, sorted by key (the console).
    pub fn all(&self) -> Vec<Arc<Pool>> {
        let mut all: Vec<_> = self.pools.locked().values().cloned().collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        all
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// PAUSE: new transactions wait; idle connections close now, busy
    /// ones when their transaction ends.
    pub fn pause(&self) {
        self.paused.send_replace(true);
        for pool in self.all() {
            pool.close_idle(|_| true);
        }
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// RECONNECT: every connection is replaced as it comes free.
    pub fn reconnect(&self) {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        for pool in self.all() {
            pool.close_idle(|c| c.generation < generation);
        }
    }

    /// Server connections open (in use or idle), all pools.
    pub fn open_connections(&self) -> usize {
        self.all().iter().map(|p| p.open()).sum()
    }

    /// A place under `max_server_connections` for one more connection:
    /// if none is free, an idle connection of another pool gives its up.
    async fn total_place(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<Option<OwnedSemaphorePermit>, ()> {
        let Some(total) = &self.total else {
            return Ok(None);
        };
        if let Ok(p) = total.clone().try_acquire_owned() {
            return Ok(Some(p));
        }
        for pool in self.all() {
            if pool.close_one_idle() {
                break;
            }
        }
        tokio::time::timeout_at(deadline, total.clone().acquire_owned())
            .await
            .map_err(|_| ())?
            .map(Some)
            .map_err(|_| ())
    }

    async fn until_resumed(&self, deadline: tokio::time::Instant) -> Result<(), ()> {
        let mut rx = self.paused.subscribe();
        let resumed = tokio::time::timeout_at(deadline, rx.wait_for(|p| !*p)).await;
        match resumed {
            Ok(Ok(_)) => Ok(()),
            _ => Err(()),
        }
    }
}

/// A pool's counters, for SHOW POOLS and the metrics.
#[derive(Debug, Default)]
pub(crate) struct PoolStats {
    /// Sessions attached to the pool.
    pub clients: AtomicUsize,
    /// Sessions holding a server connection now.
    pub active: AtomicUsize,
    /// Sessions waiting for one.
    pub waiting: AtomicUsize,
    /// Server connections open.
    pub open: AtomicUsize,
    pub checkouts: AtomicU64,
    /// Connections cleaned (DISCARD ALL) before reuse.
    pub resets: AtomicU64,
    /// Connections opened and closed over the pool's life.
    pub opened: AtomicU64,
    pub closed: AtomicU64,
}

/// The server connections of one (database, user).
pub(crate) struct Pool {
    pub key: PoolKey,
    parent: Weak<Pools>,
    pub config: PoolConfig,
    /// `pool_size` places; a client holds one while it holds a connection.
    places: Arc<Semaphore>,
    /// Idle connections, the most recently used last.
    /// (Boxed: a connection with its TLS state is large, and it moves
    /// between this list and a lease at every checkout.)
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<ServerConn>>>,
    /// How the pool logs in: the latest client's proof.
    login: Mutex<Option<Arc<ServerLogin>>>,
    /// Where the latest session dialed (for `min_pool_size`, which opens
    /// connections with no session waiting).
    dialer: Mutex<Option<(Arc<Upstream>, Timeouts)>>,
    /// What the latest connection opened said of the server (a login that
    /// finds no free connection is answered with it).
    opened: Mutex<Option<Opened>>,
    /// A background open for `min_pool_size` is under way.
    filling: std::sync::atomic::AtomicBool,
    /// Start times of the waits in progress (maxwait).
    waits: Mutex<HashMap<u64, Instant>>,
    next_wait: AtomicU64,
    pub stats: PoolStats,
}

/// What a login learns from a server connection, kept by the pool so a
/// login can be answered without one: the server's ParameterStatus at
/// connect time, where it is, how pgbastion logged in, the cancel key's
/// length.
#[derive(Debug, Clone)]
pub(crate) struct Opened {
    pub params: std::collections::BTreeMap<String, String>,
    pub addr: std::net::SocketAddr,
    pub tls: crate::tls::TlsInfo,
    pub leg: crate::audit::LegAuth,
    pub key_len: usize,
}

impl Opened {
    pub fn of(conn: &ServerConn) -> Opened {
        Opened {
            params: conn.state.params.clone(),
            addr: conn.addr,
            tls: conn.tls.clone(),
            leg: conn.leg.clone(),
            key_len: conn.key.secret_key.len(),
        }
    }
}

/// What a checkout needs to open a connection when none is idle.
pub(crate) struct Opener<'a> {
    pub upstream: &'a Arc<Upstream>,
    pub timeouts: &'a Timeouts,
}

impl Pool {
    fn new(key: PoolKey, parent: &Arc<Pools>) -> Arc<Pool> {
        Arc::new(Pool {
            key,
            parent: Arc::downgrade(parent),
            places: Arc::new(Semaphore::new(parent.config.size)),
            config: parent.config.clone(),
            idle: Mutex::new(Vec::new()),
            login: Mutex::new(None),
            dialer: Mutex::new(None),
            opened: Mutex::new(None),
            filling: std::sync::atomic::AtomicBool::new(false),
            waits: Mutex::new(HashMap::new()),
            next_wait: AtomicU64::new(0),
            stats: PoolStats::default(),
        })
    }

    /// Counts a session as the pool's client until the guard drops.
    pub fn attach(self: &Arc<Self>) -> Attached {
        self.stats.clients.fetch_add(1, Ordering::Relaxed);
        Attached(self.clone())
    }

    /// Keeps the latest credential a client of this user proved.
    pub fn set_login(&self, login: ServerLogin) {
        *self.login.locked() = Some(Arc::new(login));
    }

    pub fn open(&self) -> usize {
        self.stats.open.load(Ordering::Relaxed)
    }

    pub fn idle_count(&self) -> usize {
        self.idle.locked().len()
    }

    /// The longest wait in progress.
    pub fn max_wait(&self) -> Duration {
        self.waits
            .locked()
            .values()
            .map(Instant::elapsed)
            .max()
            .unwrap_or_default()
    }

    /// A server connection for one transaction (or session), waiting up
    /// to `query_wait_timeout` for a place (and while the pool is paused).
    pub async fn checkout(self: &Arc<Self>, opener: &Opener<'_>) -> Result<Lease, PoolError> {
        // The common case, a place free and no pause, takes no timer and
        // no wait registration.
        if let Some(lease) = self.try_checkout(opener).await? {
            return Ok(lease);
        }
        let waited_from = Instant::now();
        let deadline = tokio::time::Instant::now() + self.config.query_wait_timeout;
        let wait_id = self.next_wait.fetch_add(1, Ordering::Relaxed);
        self.waits.locked().insert(wait_id, waited_from);
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        let got = self.wait_for_place(deadline).await;
        self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        self.waits.locked().remove(&wait_id);
        if self.config.min_size > 0 {
            *self.dialer.locked() = Some((opener.upstream.clone(), opener.timeouts.clone()));
        }
        let place = got.map_err(|()| PoolError::WaitTimeout {
            pool: self.key.to_string(),
            size: self.config.size,
            // Whole seconds: "2m", not "2m 3ms 120us".
            waited: Duration::from_secs(waited_from.elapsed().as_secs()),
        })?;
        self.lease_with(place, opener, deadline).await
    }

    /// A connection now, without waiting: an idle one, or a new one if a
    /// place is free (None: every place is taken, or the pool is paused).
    pub async fn try_checkout(
        self: &Arc<Self>,
        opener: &Opener<'_>,
    ) -> Result<Option<Lease>, PoolError> {
        if self.parent.upgrade().is_none_or(|p| p.is_paused()) {
            return Ok(None);
        }
        let Ok(place) = self.places.clone().try_acquire_owned() else {
            return Ok(None);
        };
        let deadline = tokio::time::Instant::now() + self.config.query_wait_timeout;
        self.lease_with(place, opener, deadline).await.map(Some)
    }

    /// Lends a connection under `place`: an idle one or a new one.
    async fn lease_with(
        self: &Arc<Self>,
        place: OwnedSemaphorePermit,
        opener: &Opener<'_>,
        deadline: tokio::time::Instant,
    ) -> Result<Lease, PoolError> {
        let conn = match self.take_idle() {
            Some(conn) => conn,
            None => self.open_new(opener, deadline).await?,
        };
        conn.listed.set(registry::State::Active);
        self.stats.checkouts.fetch_add(1, Ordering::Relaxed);
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        Ok(Lease {
            conn: Some(conn),
            pool: self.clone(),
            _place: place,
        })
    }

    /// What the latest connection opened said of the server, if any has.
    pub fn opened(&self) -> Option<Opened> {
        self.opened.locked().clone()
    }

    async fn wait_for_place(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<OwnedSemaphorePermit, ()> {
        let parent = self.parent.upgrade().ok_or(())?;
        loop {
            parent.until_resumed(deadline).await?;
            let place = tokio::time::timeout_at(deadline, self.places.clone().acquire_owned())
                .await
                .map_err(|_| ())?
                .map_err(|_| ())?;
            // PAUSE may have come while waiting for the place.
            if !parent.is_paused() {
                return Ok(place);
            }
        }
    }

    /// The most recently used idle connection that is still good.
    fn take_idle(&self) -> Option<Box<ServerConn>> {
        let generation = self.generation();
        loop {
            let mut conn = self.idle.locked().pop()?;
            let expired = conn.created.elapsed() >= self.config.server_lifetime
                || conn.generation < generation;
            let dead = conn.last_used.elapsed() >= CHECK_IDLE_AFTER && !conn.is_alive();
            if expired || dead {
                self.closed(conn);
                continue;
            }
            return Some(conn);
        }
    }

    async fn open_new(
        &self,
        opener: &Opener<'_>,
        deadline: tokio::time::Instant,
    ) -> Result<Box<ServerConn>, PoolError> {
        let parent = self.parent.upgrade().ok_or(PoolError::ShuttingDown)?;
        let total = parent
            .total_place(deadline)
            .await
            .map_err(|()| PoolError::WaitTimeout {
                pool: format!("{} (max_server_connections)", parent.name),
                size: parent.config.max_server_connections.unwrap_or(0),
                waited: self.config.query_wait_timeout,
            })?;
        let login = self
            .login
            .locked()
            .clone()
            .ok_or_else(|| PoolError::Login("no client of this user has logged in".into()))?;
        let target = server::OpenTarget {
            upstream: opener.upstream,
            database: &self.key.database,
            user: &self.key.user,
            login: &login,
            timeouts: opener.timeouts,
            generation: self.generation(),
            max_prepared: self.config.max_prepared_statements,
        };
        // Boxed: dialing and logging in is a large future, and every
        // checkout's future (held by each session between transactions)
        // would otherwise be as large as it.
        let conn = Box::pin(ServerConn::open(&target, total)).await?;
        *self.opened.locked() = Some(Opened::of(&conn));
        let conn = Box::new(conn);
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        self.stats.opened.fetch_add(1, Ordering::Relaxed);
        Ok(conn)
    }

    fn generation(&self) -> u64 {
        self.parent
            .upgrade()
            .map_or(0, |p| p.generation.load(Ordering::SeqCst))
    }

    fn closed(&self, conn: Box<ServerConn>) {
        conn.close();
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
        self.stats.closed.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes back a connection after a transaction or session: kept idle
    /// unless the pool is paused, it is past its lifetime or generation.
    fn give_back(&self, mut conn: Box<ServerConn>) {
        let parent = self.parent.upgrade();
        let retire = parent.as_ref().is_none_or(|p| p.is_paused())
            || conn.created.elapsed() >= self.config.server_lifetime
            || conn.generation < self.generation();
        if retire {
            return self.closed(conn);
        }
        conn.last_used = Instant::now();
        conn.listed.set(registry::State::Idle);
        self.idle.locked().push(conn);
    }

    fn close_idle(&self, which: impl Fn(&ServerConn) -> bool) {
        let closing: Vec<Box<ServerConn>> = {
            let mut idle = self.idle.locked();
            let (close, keep) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|c| which(c));
            *idle = keep;
            close
        };
        for conn in closing {
            self.closed(conn);
        }
    }

    fn close_one_idle(&self) -> bool {
        let conn = {
            let mut idle = self.idle.locked();
            if idle.is_empty() {
                return false;
            }
            idle.remove(0)
        };
        self.closed(conn);
        true
    }

    /// The sweep: idle connections past `server_idle_timeout` or their
    /// lifetime close (down to `min_pool_size` for the idle timeout).
    fn sweep(&self) {
        let min = self.config.min_size;
        let idle_timeout = self.config.server_idle_timeout;
        let lifetime = self.config.server_lifetime;
        let closing: Vec<Box<ServerConn>> = {
            let mut idle = self.idle.locked();
            let mut open = self.open();
            let mut keep = Vec::new();
            let mut close = Vec::new();
            for c in std::mem::take(&mut *idle) {
                let old = c.created.elapsed() >= lifetime;
                let unused = c.last_used.elapsed() >= idle_timeout && open > min;
                if old || unused {
                    open = open.saturating_sub(1);
                    close.push(c);
                } else {
                    keep.push(c);
                }
            }
            *idle = keep;
            close
        };
        for conn in closing {
            self.closed(conn);
        }
    }

    /// `min_pool_size`: opens one connection in the background when the
    /// pool has fewer, once a client has logged in (the pool never logs
    /// in for anyone no client proved itself as).
    fn fill(self: &Arc<Self>) {
        let paused = self.parent.upgrade().is_none_or(|p| p.is_paused());
        if self.open() >= self.config.min_size || paused {
            return;
        }
        let Some((upstream, timeouts)) = self.dialer.locked().clone() else {
            return;
        };
        if self.filling.swap(true, Ordering::SeqCst) {
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            // A place, so the pool never goes past pool_size.
            if let Ok(place) = pool.places.clone().try_acquire_owned() {
                let opener = Opener {
                    upstream: &upstream,
                    timeouts: &timeouts,
                };
                let deadline = tokio::time::Instant::now() + timeouts.authentication;
                match pool.open_new(&opener, deadline).await {
                    Ok(conn) => pool.give_back(conn),
                    Err(e) => {
                        tracing::warn!(pool = %pool.key, "min_pool_size: opening a server connection failed: {e}")
                    }
                }
                drop(place);
            }
            pool.filling.store(false, Ordering::SeqCst);
        });
    }
}

/// A session counted among a pool's clients.
pub(crate) struct Attached(Arc<Pool>);

impl Drop for Attached {
    fn drop(&mut self) {
        self.0.stats.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sweeps every pool of an upstream until the upstream's pools are gone
/// (a reload that changed them, or the end of the process).
fn spawn_sweeper(pools: Weak<Pools>) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        loop {
            tick.tick().await;
            let Some(pools) = pools.upgrade() else { return };
            for pool in pools.all() {
                pool.sweep();
                pool.fill();
            }
        }
    });
}

/// A server connection lent to one client. Given back with `give_back`
/// once clean; dropped otherwise (the connection closes: it may hold the
/// client's state, so it is never handed to anyone else).
pub(crate) struct Lease {
    /// Boxed: a lease moves with its session (login, relay), and a
    /// connection with its TLS state is large.
    conn: Option<Box<ServerConn>>,
    pub pool: Arc<Pool>,
    _place: OwnedSemaphorePermit,
}

impl Lease {
    pub fn conn(&mut self) -> &mut ServerConn {
        // Always Some until `give_back` consumes the lease.
        self.conn.as_mut().expect("a lease holds its connection")
    }

    /// Returns a clean connection (idle, no transaction, nothing of its
    /// client left but what the settings switch covers) to the pool.
    pub fn give_back(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.give_back(conn);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.stats.active.fetch_sub(1, Ordering::Relaxed);
        if let Some(conn) = self.conn.take() {
            self.pool.closed(conn);
        }
    }
}
