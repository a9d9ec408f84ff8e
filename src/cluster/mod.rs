//! A fleet of pgbastion instances behind one TCP balancer, sharing through
//! Redis what one instance alone cannot know: which instance holds the
//! session a CancelRequest is for (the request is a new connection, so the
//! balancer may send it anywhere), how many logins from an address or for a
//! user failed, and how many sessions an identity has open.
//!
//! Redis is never in a session's way. Every call has a deadline
//! (`[cluster] timeout`). Once a call fails or a once-a-second PING does,
//! the cluster is "down" and sessions stop asking Redis at all: cancels for
//! other instances' sessions fail (counted, logged at a limited rate), the
//! limits count this instance only, and local cancels work as always. When
//! a PING succeeds again, everything this instance must have in Redis is
//! written again (a restarted Redis is empty) and the fleet-wide checks
//! resume. Writes that do not need an answer (publishing a cancel mapping,
//! releasing a session slot, counting a failed login) go through a
//! background task, so a session never waits for them.
//!
//! A pooled session's server connection changes per transaction, so its
//! mapping only says which instance owns it; a cancel for it is relayed to
//! that instance over pub/sub (see `relay`).
//!
//! What is stored is opaque to a Redis reader (see `keys`).

mod background;
mod connect;
pub mod keys;
mod relay;

use crate::sync::MutexExt;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::warn;

use crate::admin::metrics::Metrics;
use crate::auth::throttle::{LoginCheck, Throttled, ThrottledBy};
use crate::config::{ClusterConfig, Limits};
use crate::limits::warn::WarnLimiter;
use crate::protocol::startup::CancelKey;
use background::background;
use connect::{read_keys, redis_client};
use keys::{FleetKeys, RelayedCancel, RemoteCancel};

/// How long what an instance writes lives in Redis unless refreshed: how
/// long the mappings of an instance that died stay findable (a cancel
/// forwarded to a backend that ended does nothing), and how long its
/// sessions still count against identity limits.
const TTL: Duration = Duration::from_secs(60);
/// How often the live mappings and slots are written again.
const REFRESH: Duration = Duration::from_secs(20);
/// How often Redis is PINGed to notice it went away or came back.
const HEALTH: Duration = Duration::from_secs(1);
/// Writes waiting for the background task; past this, new ones are
/// dropped (the refresh writes the mappings anyway; the TTL ends the rest).
const QUEUE: usize = 65_536;
/// Commands per pipeline when writing everything again.
const CHUNK: usize = 1_000;

#[derive(Debug, Error)]
pub enum ClusterError {
    /// The secret or password file (the error names which).
    #[error("{0}")]
    File(crate::secret_file::SecretFileError),
    #[error("cluster.secret_file {path}: {source}")]
    Secret {
        path: std::path::PathBuf,
        source: keys::SecretError,
    },
    #[error("cluster.redis_ca_file {path}: {reason}")]
    Ca {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("cluster.redis: {0}")]
    Redis(String),
}

/// Redis was not asked, or did not answer in time: the caller goes on
/// without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

/// One identity's session slot in the fleet, given back when dropped.
pub struct FleetSlot {
    cluster: Weak<Cluster>,
    key: String,
    member: String,
}

impl Drop for FleetSlot {
    fn drop(&mut self) {
        if let Some(c) = self.cluster.upgrade() {
            lock(&c.held)
                .slots
                .remove(&(self.key.clone(), self.member.clone()));
            c.send(Op::Release(
                std::mem::take(&mut self.key),
                std::mem::take(&mut self.member),
            ));
        }
    }
}

/// What an identity slot request found.
pub enum Admission {
    Held(FleetSlot),
    /// The fleet already holds this many sessions of the identity.
    Full(u64),
}

/// Writes for the background task.
enum Op {
    Publish(String, Vec<u8>),
    Unpublish(String),
    Release(String, String),
    Failed(Vec<String>, Duration),
}

/// What this instance has in Redis and keeps there.
#[derive(Default)]
struct Held {
    cancels: HashMap<String, Vec<u8>>,
    slots: HashSet<(String, String)>,
}

pub struct Cluster {
    instance: String,
    timeout: Duration,
    keys: FleetKeys,
    /// Replaced after an authentication failure: the manager reconnects
    /// after I/O errors only, so a refused AUTH would stay refused even
    /// once Redis accepts the password.
    redis: Mutex<ConnectionManager>,
    client: redis::Client,
    manager_config: ConnectionManagerConfig,
    up: AtomicBool,
    held: Mutex<Held>,
    ops: mpsc::Sender<Op>,
    metrics: Arc<Metrics>,
    warn: WarnLimiter,
}

/// Takes a slot for a session when fewer than `ARGV[1]` live ones exist;
/// slots whose expiry (Redis's own clock, so instances' clocks do not
/// matter) has passed are dropped first. Returns the count after taking
/// one, or minus the count when full.
const HOLD_SLOT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[1]) then return -n end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return n + 1
";

/// Pushes the expiry of slots this instance still holds (the refresh).
const KEEP_SLOTS: &str = r"
local t = redis.call('TIME')
local until_ = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[i - 1], until_, ARGV[i])
  redis.call('PEXPIRE', KEYS[i - 1], ARGV[1])
end
return #ARGV - 1
";

/// Counts a failed login in each key, in a window (`ARGV[1]` ms) that
/// starts at the first failure. One script, so no key is ever left without
/// an expiry (`SET ... NX PX` then `INCR` were two commands: when the key
/// expired between them, INCR made one that never expired, and the user
/// was refused for good; issue 19 item 10). A key found without an expiry
/// gets one.
const COUNT_FAILURE: &str = r"
for i = 1, #KEYS do
  redis.call('INCR', KEYS[i])
  if redis.call('PTTL', KEYS[i]) < 0 then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
  end
end
return #KEYS
";

/// Each key's failure count and expiry in ms. A count without an expiry
/// (left by an older version, or written by hand) cannot say when its
/// failures happened: it is reported as 0, so it throttles no one, and
/// given the window (`ARGV[1]` ms) it lacked, so it ends.
const READ_FAILURES: &str = r"
local out = {}
for i = 1, #KEYS do
  local n = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl == -1 then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    n = 0
  end
  out[#out + 1] = n
  out[#out + 1] = ttl
end
return out
";

impl Cluster {
    /// Reads the secret and password files and prepares the Redis client;
    /// does not need Redis to be up (it is connected to lazily, and the
    /// fleet features wait for the first PING).
    pub fn start(
        config: &ClusterConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let keys = read_keys(config)?;
        let client = redis_client(config)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let redis = ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
            .map_err(|e| ClusterError::Redis(e.to_string()))?;
        let (ops, rx) = mpsc::channel(QUEUE);
        let cluster = Arc::new(Cluster {
            instance: config.instance.clone(),
            timeout: config.timeout,
            keys,
            redis: Mutex::new(redis),
            client,
            manager_config,
            up: AtomicBool::new(false),
            held: Mutex::default(),
            ops,
            metrics,
            warn: WarnLimiter::new(1),
        });
        cluster.metrics.cluster_up(false);
        tokio::spawn(background(Arc::downgrade(&cluster), rx));
        Ok(cluster)
    }

    /// What `start` reads, without starting anything (`check-config`).
    pub fn check(config: &ClusterConfig) -> Result<(), ClusterError> {
        read_keys(config)?;
        redis_client(config)?;
        Ok(())
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Whether the fleet-wide features are in use now.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Publishes a live session's cancel mapping; returns where it is, for
    /// `unpublish_cancel` when the session ends.
    pub fn publish_cancel(&self, issued: &CancelKey, entry: &RemoteCancel) -> String {
        let key = self.keys.cancel_key(issued);
        let sealed = self.keys.seal(&key, entry);
        lock(&self.held).cancels.insert(key.clone(), sealed.clone());
        self.send(Op::Publish(key.clone(), sealed));
        key
    }

    pub fn unpublish_cancel(&self, key: &str) {
        lock(&self.held).cancels.remove(key);
        self.send(Op::Unpublish(key.to_owned()));
    }

    /// The mapping another instance published for this key, if any.
    pub async fn find_cancel(&self, req: &CancelKey) -> Result<Option<RemoteCancel>, Unavailable> {
        let key = self.keys.cancel_key(req);
        let value: Option<Vec<u8>> = self
            .call("cancel_lookup", redis::cmd("GET").arg(&key))
            .await?;
        Ok(value.and_then(|v| {
            let opened = self.keys.open(&key, &v);
            if opened.is_none() && self.warn.allow("cluster_cancel_unreadable") {
                warn!("a cancel mapping in Redis did not open with this instance's cluster secret (another fleet's secret, or altered); ignored");
            }
            opened
        }))
    }

    /// Relays a cancel for a pooled session of `instance` to it; returns
    /// how many subscribers got it (0: that instance is not listening now).
    pub async fn relay_cancel(
        &self,
        instance: &str,
        req: &CancelKey,
        request_session: &str,
        proxy_header: Option<Vec<u8>>,
    ) -> Result<u64, Unavailable> {
        let channel = self.keys.relay_channel(instance);
        let message = self.keys.seal_relay(
            &channel,
            &RelayedCancel {
                process_id: req.process_id,
                secret_key: req.secret_key.clone(),
                from: self.instance.clone(),
                request_session: request_session.to_owned(),
                proxy_header,
                sent_ms: relay::now_ms(),
            },
        );
        self.call(
            "cancel_relay",
            redis::cmd("PUBLISH").arg(&channel).arg(message),
        )
        .await
    }

    /// Subscribes to the cancels other instances relay to this one's
    /// pooled sessions; each one that opened (sealed by the fleet for this
    /// instance, fresh, not seen before) arrives once. Call once.
    pub fn relayed_cancels(self: &Arc<Self>) -> mpsc::Receiver<RelayedCancel> {
        relay::start(
            Arc::downgrade(self),
            self.keys.relay_channel(&self.instance),
        )
    }

    /// Takes one of `limit` fleet-wide slots for `identity`.
    pub async fn hold_identity(
        self: &Arc<Self>,
        identity: &str,
        limit: usize,
        session_id: &str,
    ) -> Result<Admission, Unavailable> {
        let key = self.keys.identity_key(identity);
        let member = format!("{}/{session_id}", self.instance);
        let n: i64 = self
            .call(
                "identity_slot",
                redis::cmd("EVAL")
                    .arg(HOLD_SLOT)
                    .arg(1)
                    .arg(&key)
                    .arg(limit)
                    .arg(ms(TTL))
                    .arg(&member),
            )
            .await?;
        if n <= 0 {
            return Ok(Admission::Full(n.unsigned_abs()));
        }
        lock(&self.held).slots.insert((key.clone(), member.clone()));
        Ok(Admission::Held(FleetSlot {
            cluster: Arc::downgrade(self),
            key,
            member,
        }))
    }

    /// Whether the fleet has counted too many failed logins from `addr` or
    /// for `user` in the current window (see `throttle::user_admission`
    /// for a user whose budget is spent). The address is clean when it has
    /// no failure in its window: as in the local throttle, not "some of its
    /// budget refilled", and since a guess from a clean address starts a
    /// whole window, a locked-out user gets at most one guess per address
    /// per window (issue 19 adversarial M2).
    pub async fn check_failures(
        &self,
        addr: Option<IpAddr>,
        user: &str,
        limits: &Limits,
    ) -> Result<Result<LoginCheck, Throttled>, Unavailable> {
        let (a, u) = self.failure_keys(addr, user, limits);
        let (na, ta, nu, tu): (Option<u64>, i64, Option<u64>, i64) = self
            .call(
                "failed_logins",
                redis::cmd("EVAL")
                    .arg(READ_FAILURES)
                    .arg(2)
                    .arg(&a)
                    .arg(&u)
                    .arg(ms(limits.failed_login_window).max(1)),
            )
            .await?;
        let wait = |ttl: i64| Duration::from_millis(u64::try_from(ttl).unwrap_or(0));
        let na = na.unwrap_or(0);
        if na >= u64::from(limits.failed_logins_per_address) {
            return Ok(Err(Throttled {
                by: ThrottledBy::Address,
                retry_after: wait(ta),
            }));
        }
        let user_wait = if nu.unwrap_or(0) >= u64::from(limits.failed_logins_per_user) {
            // At least a millisecond: spent, even if it ends right now.
            wait(tu).max(Duration::from_millis(1))
        } else {
            Duration::ZERO
        };
        Ok(crate::auth::throttle::user_admission(
            user_wait,
            na == 0,
            limits.failed_logins_per_user_strict,
        ))
    }

    /// Counts a failed login fleet-wide, in a window that starts at the
    /// first failure.
    pub fn count_failure(&self, addr: Option<IpAddr>, user: &str, limits: &Limits) {
        let (a, u) = self.failure_keys(addr, user, limits);
        self.send(Op::Failed(vec![a, u], limits.failed_login_window));
    }

    /// The Redis keys of an address's (per `limits.ipv6_prefix`) and a
    /// user's failures.
    fn failure_keys(&self, addr: Option<IpAddr>, user: &str, limits: &Limits) -> (String, String) {
        let addr = crate::auth::throttle::address_key(addr, limits.ipv6_prefix)
            .map_or_else(|| "unix".to_owned(), |a| a.to_string());
        (
            self.keys.failures_key("addr", &addr),
            self.keys.failures_key("user", user),
        )
    }

    /// Live cancel mappings and identity slots this instance keeps in Redis.
    pub fn held_counts(&self) -> (usize, usize) {
        let held = lock(&self.held);
        (held.cancels.len(), held.slots.len())
    }

    fn send(&self, op: Op) {
        if self.ops.try_send(op).is_err() && self.warn.allow("cluster_queue_full") {
            warn!("the Redis write queue is full; writes are dropped until it drains (the periodic refresh restores cancel mappings)");
        }
    }

    /// One request with the deadline, skipped while the cluster is down;
    /// a failure marks it down.
    async fn call<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        request: impl Into<Request<'_>>,
    ) -> Result<T, Unavailable> {
        if !self.is_up() {
            return Err(Unavailable);
        }
        self.send_now(op, request).await
    }

    /// The same, whether up or down (PINGs, the background writes).
    async fn send_now<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        request: impl Into<Request<'_>>,
    ) -> Result<T, Unavailable> {
        let started = Instant::now();
        let mut conn = lock(&self.redis).clone();
        let run = async {
            match request.into() {
                Request::Cmd(c) => c.query_async::<T>(&mut conn).await,
                Request::Pipe(p) => p.query_async::<T>(&mut conn).await,
            }
        };
        let result = tokio::time::timeout(self.timeout, run).await;
        let elapsed = started.elapsed();
        match result {
            Ok(Ok(v)) => {
                self.metrics.redis_call(op, elapsed, true);
                Ok(v)
            }
            failed => {
                self.metrics.redis_call(op, elapsed, false);
                let why = match failed {
                    Ok(Err(e)) => {
                        if e.kind() == redis::ErrorKind::AuthenticationFailed {
                            self.new_connection();
                        }
                        e.to_string()
                    }
                    _ => format!("no answer within {:?}", self.timeout),
                };
                self.mark_down(op, &why);
                Err(Unavailable)
            }
        }
    }

    /// A fresh connection manager, which authenticates again.
    fn new_connection(&self) {
        match ConnectionManager::new_lazy_with_config(
            self.client.clone(),
            self.manager_config.clone(),
        ) {
            Ok(m) => *lock(&self.redis) = m,
            Err(e) => {
                if self.warn.allow("redis_reconnect") {
                    warn!(error = %e, "cannot prepare a new Redis connection");
                }
            }
        }
    }

    /// A failed call: the transition from up is always logged; while down
    /// (from the start, say, with a wrong password or an unreachable
    /// Redis) every failed attempt is, at a limited rate (issue 19 item 22:
    /// a Redis that refused pgbastion from the start was never logged).
    fn mark_down(&self, op: &str, why: &str) {
        if self.up.swap(false, Ordering::SeqCst) {
            self.metrics.cluster_up(false);
            warn!(op, error = %why, "Redis is unavailable: cancels for other instances' sessions fail and limits count this instance only until it is back");
        } else if self.warn.allow("redis_unavailable") {
            warn!(op, error = %why, "Redis is still unavailable (cancels across instances and fleet-wide limits are off); retrying every second");
        }
    }

    /// Writes every live mapping and slot again (after Redis came back,
    /// and every REFRESH).
    async fn rewrite_all(&self) -> Result<(), Unavailable> {
        let (cancels, slots): (Vec<_>, Vec<_>) = {
            let held = lock(&self.held);
            (
                held.cancels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                held.slots.iter().cloned().collect(),
            )
        };
        for chunk in cancels.chunks(CHUNK) {
            let mut pipe = redis::pipe();
            for (k, v) in chunk {
                set_mapping(&mut pipe, k, v);
            }
            self.send_now::<()>("refresh", &pipe).await?;
        }
        for chunk in slots.chunks(CHUNK) {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(KEEP_SLOTS).arg(chunk.len());
            for (key, _) in chunk {
                cmd.arg(key);
            }
            cmd.arg(ms(TTL));
            for (_, member) in chunk {
                cmd.arg(member);
            }
            self.send_now::<i64>("refresh", &cmd).await?;
        }
        Ok(())
    }

    /// Sends a batch of queued writes as one pipeline.
    async fn write(&self, batch: Vec<Op>) {
        let mut pipe = redis::pipe();
        for op in batch {
            match op {
                Op::Publish(k, v) => set_mapping(&mut pipe, &k, &v),
                Op::Unpublish(k) => {
                    pipe.cmd("DEL").arg(k).ignore();
                }
                Op::Release(k, m) => {
                    pipe.cmd("ZREM").arg(k).arg(m).ignore();
                }
                Op::Failed(keys, window) => {
                    pipe.cmd("EVAL")
                        .arg(COUNT_FAILURE)
                        .arg(keys.len())
                        .arg(&keys)
                        .arg(ms(window).max(1))
                        .ignore();
                }
            }
        }
        // Skipped while down: the rewrite after recovery restores the
        // mappings and slots; deletions are left to the TTL.
        let _ = self.call::<()>("write", &pipe).await;
    }
}

/// A single command or a pipeline.
#[derive(Clone, Copy)]
enum Request<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a redis::Pipeline),
}

impl<'a> From<&'a redis::Cmd> for Request<'a> {
    fn from(c: &'a redis::Cmd) -> Self {
        Request::Cmd(c)
    }
}

impl<'a> From<&'a mut redis::Cmd> for Request<'a> {
    fn from(c: &'a mut redis::Cmd) -> Self {
        Request::Cmd(c)
    }
}

impl<'a> From<&'a mut redis::Pipeline> for Request<'a> {
    fn from(p: &'a mut redis::Pipeline) -> Self {
        Request::Pipe(p)
    }
}

impl<'a> From<&'a redis::Pipeline> for Request<'a> {
    fn from(p: &'a redis::Pipeline) -> Self {
        Request::Pipe(p)
    }
}

/// Writes one cancel mapping, expiring unless written again.
fn set_mapping(pipe: &mut redis::Pipeline, key: &str, sealed: &[u8]) {
    pipe.cmd("SET")
        .arg(key)
        .arg(sealed)
        .arg("PX")
        .arg(ms(TTL))
        .ignore();
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.locked()
}
