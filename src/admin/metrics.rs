//! Prometheus metrics (`/metrics` on the admin listener), through the
//! `prometheus-client` crate. Sessions, refusals, authentication results,
//! bytes and cancels are counted from the same events the audit log gets
//! (`observe`), so the two always agree; latencies, reloads and
//! certificate expiry are recorded where they happen. The pools' gauges
//! and counters are read from the pools at each scrape (`PoolCollector`,
//! through the reader the server gives `read_pools_with`); the wait for a
//! server connection is recorded by the checkout (`pool_wait`).
//!
//! Label values are bounded: listener and upstream names from the config,
//! fixed reason/outcome names from the code; never session ids, addresses
//! or user names.

use crate::sync::{MutexExt, RwLockExt};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::audit::{AuditLog, AuthFacts, Event, RejectReason};

type Labels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~8 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

fn wait_histogram() -> Histogram {
    // 0.5 ms .. ~131 s: waits up to the default query_wait_timeout (120 s)
    // land in a bucket below +Inf.
    Histogram::new(exponential_buckets(0.0005, 2.0, 19))
}

/// Every metric pgbastion exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sessions_active: Family<Labels, Gauge>,
    sessions: Family<Labels, Counter>,
    rejections: Family<Labels, Counter>,
    client_tls_failures: Family<Labels, Counter>,
    auth: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    cancels: Family<Labels, Counter>,
    upstream_connect: Histograms,
    upstream_tls: Histograms,
    reloads: Family<Labels, Counter>,
    certificate_expiry: Family<Labels, Gauge>,
    cluster_up: Gauge,
    redis_latency: Histograms,
    redis_failures: Family<Labels, Counter>,
    query_audit_stopped: Family<Labels, Counter>,
    pool_pins: Family<Labels, Counter>,
    pool_wait: Histograms,
    /// Where the pools' collector reads them.
    pools: PoolCollector,
    /// The same values, for the console's SHOW CERTIFICATES.
    expiries: std::sync::Mutex<std::collections::BTreeMap<String, i64>>,
}

/// The audit log's own counts, read at each scrape.
struct AuditCounts(Arc<AuditLog>);

impl std::fmt::Debug for AuditCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditCounts")
    }
}

impl Collector for AuditCounts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (written, dropped) = self.0.counts();
        for (name, help, v) in [
            (
                "pgbastion_audit_events_written",
                "Audit events written.",
                written,
            ),
            (
                "pgbastion_audit_events_dropped",
                "Audit events dropped because the audit log was slow or failing.",
                dropped,
            ),
        ] {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v).encode(metric)?;
        }
        Ok(())
    }
}

/// One pooled upstream's pools, summed (labels stay bounded: the
/// upstream, never a database or user).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolSample {
    pub upstream: String,
    /// Server connections lent (or being opened, cleaned, checked), and
    /// idle.
    pub servers_active: u64,
    pub servers_idle: u64,
    /// Sessions holding a server connection, and waiting for one.
    pub clients_active: u64,
    pub clients_waiting: u64,
    /// Since the pools were made (a reload that changes them starts
    /// again: a counter reset, as Prometheus expects).
    pub checkouts: u64,
    pub resets: u64,
    pub opened: u64,
    pub closed: u64,
}

type PoolReader = Box<dyn Fn() -> Vec<PoolSample> + Send + Sync>;

/// The pools as the reader reports them at each scrape; nothing until the
/// server sets the reader (and nothing without pooled upstreams).
#[derive(Clone, Default)]
struct PoolCollector(Arc<RwLock<Option<PoolReader>>>);

impl std::fmt::Debug for PoolCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PoolCollector")
    }
}

type Sampled = fn(&PoolSample) -> u64;
/// A gauge by upstream and state: name, help, each state's value.
type ByState = (&'static str, &'static str, [(&'static str, Sampled); 2]);

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let samples = match &*self.0.read_locked() {
            Some(read) => read(),
            None => return Ok(()),
        };
        if samples.is_empty() {
            return Ok(());
        }
        let gauges: [ByState; 2] = [
            (
                "pgbastion_pool_server_connections",
                "Pooled server connections open, by upstream and state (active: lent to a client; idle).",
                [("active", |s| s.servers_active), ("idle", |s| s.servers_idle)],
            ),
            (
                "pgbastion_pool_clients",
                "Pooled sessions holding a server connection (active) or waiting for one, by upstream.",
                [("active", |s| s.clients_active), ("waiting", |s| s.clients_waiting)],
            ),
        ];
        for (name, help, states) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for s in &samples {
                for (state, value) in states {
                    let labels = [("upstream", s.upstream.as_str()), ("state", state)];
                    let v = i64::try_from(value(s)).unwrap_or(i64::MAX);
                    ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let counters: [(&str, &str, Sampled); 4] = [
            (
                "pgbastion_pool_checkouts",
                "Server connections lent to clients, by upstream.",
                |s| s.checkouts,
            ),
            (
                "pgbastion_pool_resets",
                "Server connections cleaned (DISCARD ALL) before reuse, by upstream.",
                |s| s.resets,
            ),
            (
                "pgbastion_pool_server_opened",
                "Pooled server connections opened, by upstream.",
                |s| s.opened,
            ),
            (
                "pgbastion_pool_server_closed",
                "Pooled server connections closed, by upstream.",
                |s| s.closed,
            ),
        ];
        for (name, help, value) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in &samples {
                let labels = [("upstream", s.upstream.as_str())];
                ConstCounter::new(value(s)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl Metrics {
    pub fn new(audit: Arc<AuditLog>) -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            sessions_active: Family::default(),
            sessions: Family::default(),
            rejections: Family::default(),
            client_tls_failures: Family::default(),
            auth: Family::default(),
            bytes: Family::default(),
            cancels: Family::default(),
            upstream_connect: Family::new_with_constructor(latency_histogram),
            upstream_tls: Family::new_with_constructor(latency_histogram),
            reloads: Family::default(),
            certificate_expiry: Family::default(),
            cluster_up: Gauge::default(),
            redis_latency: Family::new_with_constructor(latency_histogram),
            redis_failures: Family::default(),
            query_audit_stopped: Family::default(),
            pool_pins: Family::default(),
            pool_wait: Family::new_with_constructor(wait_histogram),
            pools: PoolCollector::default(),
            expiries: Default::default(),
            registry: Registry::default(),
        };
        m.register_sessions(&mut registry);
        m.register_operations(&mut registry);
        registry.register_collector(Box::new(AuditCounts(audit)));
        registry.register_collector(Box::new(m.pools.clone()));
        Metrics { registry, ..m }
    }

    /// The session metrics: counted from audit events (`observe`).
    fn register_sessions(&self, registry: &mut Registry) {
        registry.register(
            "pgbastion_sessions_active",
            "Sessions relaying now, by listener and upstream.",
            self.sessions_active.clone(),
        );
        registry.register(
            "pgbastion_sessions",
            "Sessions that ended, by listener, upstream and end reason.",
            self.sessions.clone(),
        );
        registry.register(
            "pgbastion_rejections",
            "Connections refused before a session started, by listener and reason.",
            self.rejections.clone(),
        );
        registry.register(
            "pgbastion_client_tls_handshake_failures",
            "Client TLS handshakes that failed, by listener.",
            self.client_tls_failures.clone(),
        );
        registry.register(
            "pgbastion_authentications",
            "Logins by mode (passthrough, scram, identity) and result.",
            self.auth.clone(),
        );
        registry.register_with_unit(
            "pgbastion_relayed",
            "Bytes relayed, by direction.",
            Unit::Bytes,
            self.bytes.clone(),
        );
        registry.register(
            "pgbastion_cancel_requests",
            "Cancel requests by outcome.",
            self.cancels.clone(),
        );
    }

    /// What happens around sessions: upstream dials, reloads,
    /// certificates, the fleet's Redis, the query audit.
    fn register_operations(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "pgbastion_upstream_connect",
            "Time to open a TCP connection to an upstream.",
            Unit::Seconds,
            self.upstream_connect.clone(),
        );
        registry.register_with_unit(
            "pgbastion_upstream_tls_handshake",
            "Time for the TLS negotiation (SSLRequest and handshake) with an upstream.",
            Unit::Seconds,
            self.upstream_tls.clone(),
        );
        registry.register(
            "pgbastion_config_reloads",
            "Configuration reloads by result (ok, failed).",
            self.reloads.clone(),
        );
        registry.register(
            "pgbastion_certificate_expiry_timestamp_seconds",
            "When each certificate pgbastion uses expires (the earliest in a bundle), as a Unix time.",
            self.certificate_expiry.clone(),
            );
        registry.register(
            "pgbastion_cluster_up",
            "1 while Redis answers and cancels and limits work across the fleet; 0 while down (or [cluster] is not set).",
            self.cluster_up.clone(),
            );
        registry.register_with_unit(
            "pgbastion_cluster_redis",
            "Time of Redis calls, by operation.",
            Unit::Seconds,
            self.redis_latency.clone(),
        );
        registry.register(
            "pgbastion_query_audit_stopped",
            "Audited sessions whose query audit lost its place in the protocol (later statements unrecorded), by listener.",
            self.query_audit_stopped.clone(),
        );
        registry.register(
            "pgbastion_pool_pins",
            "Pooled sessions pinned to their server connection, by upstream and reason (state pgbastion cannot move: LISTEN, temporary objects, ...).",
            self.pool_pins.clone(),
        );
        registry.register_with_unit(
            "pgbastion_pool_wait",
            "Time pooled sessions waited for a server connection, by upstream.",
            Unit::Seconds,
            self.pool_wait.clone(),
        );
        registry.register(
            "pgbastion_cluster_redis_failures",
            "Redis calls that failed or missed the deadline, by operation.",
            self.redis_failures.clone(),
        );
    }

    /// Counts what an audit event says (called for every event, including
    /// those the audit log summarises).
    pub fn observe(&self, event: &Event<'_>) {
        match event {
            Event::Start {
                facts,
                upstream,
                auth,
                ..
            } => {
                self.sessions_active
                    .get_or_create(&where_(&facts.listener, &upstream.name))
                    .inc();
                self.count_auth(auth);
            }
            Event::End {
                facts,
                upstream,
                end_reason,
                bytes_client_to_server,
                bytes_server_to_client,
                ..
            } => {
                let at = where_(&facts.listener, &upstream.name);
                self.sessions_active.get_or_create(&at).dec();
                let mut labels = at;
                labels.push(("outcome", end_reason.as_str().to_owned()));
                self.sessions.get_or_create(&labels).inc();
                for (direction, n) in [
                    ("client_to_server", bytes_client_to_server),
                    ("server_to_client", bytes_server_to_client),
                ] {
                    self.bytes
                        .get_or_create(&vec![("direction", direction.to_owned())])
                        .inc_by(*n);
                }
            }
            Event::Rejected {
                facts,
                reason,
                auth,
                ..
            } => {
                self.rejections
                    .get_or_create(&vec![
                        ("listener", facts.listener.clone()),
                        ("reason", reason.as_str().to_owned()),
                    ])
                    .inc();
                if *reason == RejectReason::ClientTlsHandshakeFailed {
                    self.client_tls_failures
                        .get_or_create(&vec![("listener", facts.listener.clone())])
                        .inc();
                }
                if let Some(auth) = auth {
                    self.count_auth(auth);
                }
            }
            Event::Cancel { outcome, .. } => {
                self.cancels
                    .get_or_create(&vec![("outcome", outcome.as_str().to_owned())])
                    .inc();
            }
            Event::QueryAuditStopped { facts, .. } => {
                self.query_audit_stopped
                    .get_or_create(&vec![("listener", facts.listener.clone())])
                    .inc();
            }
            Event::Pinned { reason, pool, .. } => {
                self.pool_pins
                    .get_or_create(&vec![
                        ("upstream", (*pool).to_owned()),
                        ("reason", reason.as_str().to_owned()),
                    ])
                    .inc();
            }
            Event::Suppressed { .. }
            | Event::Console { .. }
            | Event::Query { .. }
            | Event::Resumed { .. } => {}
        }
    }

    fn count_auth(&self, auth: &AuthFacts) {
        let mode = auth.mode.as_str().to_owned();
        let result = auth.outcome.as_str().to_owned();
        self.auth
            .get_or_create(&vec![("mode", mode), ("result", result)])
            .inc();
    }

    pub fn upstream_connected(&self, upstream: &str, connect: Duration, tls: Duration) {
        let labels = vec![("upstream", upstream.to_owned())];
        self.upstream_connect
            .get_or_create(&labels)
            .observe(connect.as_secs_f64());
        self.upstream_tls
            .get_or_create(&labels)
            .observe(tls.as_secs_f64());
    }

    /// One checkout of a pooled server connection: how long the session
    /// waited for it (a place under `pool_size`, the pause, opening one).
    pub fn pool_wait(&self, upstream: &str, waited: Duration) {
        self.pool_wait_of(upstream).observe(waited.as_secs_f64());
    }

    /// The wait histogram of one upstream, for a session to keep: a
    /// checkout per transaction then records without a lookup.
    pub fn pool_wait_of(&self, upstream: &str) -> Histogram {
        self.pool_wait
            .get_or_create(&vec![("upstream", upstream.to_owned())])
            .clone()
    }

    /// Where the pools' metrics are read at each scrape: the server gives
    /// a reader of the pools as configured now (a later call replaces it).
    pub fn read_pools_with(&self, read: impl Fn() -> Vec<PoolSample> + Send + Sync + 'static) {
        *self.pools.0.write_locked() = Some(Box::new(read));
    }

    pub fn cluster_up(&self, up: bool) {
        self.cluster_up.set(i64::from(up));
    }

    /// One Redis call: how long it took, and whether it answered in time.
    pub fn redis_call(&self, op: &'static str, took: Duration, ok: bool) {
        let labels = vec![("op", op.to_owned())];
        self.redis_latency
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if !ok {
            self.redis_failures.get_or_create(&labels).inc();
        }
    }

    pub fn reloaded(&self, ok: bool) {
        self.reloads
            .get_or_create(&vec![(
                "result",
                if ok { "ok" } else { "failed" }.to_owned(),
            )])
            .inc();
    }

    /// Sets the expiry of one certificate (`what`: `tls`, `client_ca:NAME`,
    /// `upstream_ca:NAME`, ...), a Unix time.
    pub fn certificate_expires(&self, what: String, unix_time: i64) {
        self.certificate_expiry
            .get_or_create(&vec![("certificate", what.clone())])
            .set(unix_time);
        self.expiries.locked().insert(what, unix_time);
    }

    /// Every certificate's expiry (Unix time), by name.
    pub fn certificate_expiries(&self) -> Vec<(String, i64)> {
        self.expiries
            .locked()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn where_(listener: &str, upstream: &str) -> Labels {
    vec![
        ("listener", listener.to_owned()),
        ("upstream", upstream.to_owned()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::new(Arc::new(
            AuditLog::open(
                &crate::config::AuditTarget::Off,
                crate::config::AuditOnFailure::Continue,
                crate::audit::chain::Digest::Sha256,
            )
            .unwrap(),
        ))
    }

    /// The exposition's sample lines that start with `prefix`.
    fn samples(text: &str, prefix: &str) -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn the_pools_are_read_at_each_scrape() {
        let m = metrics();
        assert!(
            !m.encode().contains("pgbastion_pool_server_connections"),
            "nothing before the server gives a reader"
        );
        let checkouts = Arc::new(std::sync::atomic::AtomicU64::new(10));
        let read = checkouts.clone();
        m.read_pools_with(move || {
            vec![
                PoolSample {
                    upstream: "pg".into(),
                    servers_active: 3,
                    servers_idle: 2,
                    clients_active: 3,
                    clients_waiting: 4,
                    checkouts: read.load(std::sync::atomic::Ordering::Relaxed),
                    resets: 5,
                    opened: 9,
                    closed: 4,
                },
                PoolSample {
                    upstream: "other".into(),
                    ..PoolSample::default()
                },
            ]
        });
        let text = m.encode();
        assert_eq!(
            samples(&text, "pgbastion_pool_server_connections{"),
            [
                "pgbastion_pool_server_connections{upstream=\"pg\",state=\"active\"} 3",
                "pgbastion_pool_server_connections{upstream=\"pg\",state=\"idle\"} 2",
                "pgbastion_pool_server_connections{upstream=\"other\",state=\"active\"} 0",
                "pgbastion_pool_server_connections{upstream=\"other\",state=\"idle\"} 0",
            ]
        );
        assert_eq!(
            samples(&text, "pgbastion_pool_clients{upstream=\"pg\""),
            [
                "pgbastion_pool_clients{upstream=\"pg\",state=\"active\"} 3",
                "pgbastion_pool_clients{upstream=\"pg\",state=\"waiting\"} 4",
            ]
        );
        for line in [
            "pgbastion_pool_checkouts_total{upstream=\"pg\"} 10",
            "pgbastion_pool_resets_total{upstream=\"pg\"} 5",
            "pgbastion_pool_server_opened_total{upstream=\"pg\"} 9",
            "pgbastion_pool_server_closed_total{upstream=\"pg\"} 4",
            "pgbastion_pool_checkouts_total{upstream=\"other\"} 0",
            "# TYPE pgbastion_pool_checkouts counter",
            "# TYPE pgbastion_pool_server_connections gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        // Live: the next scrape reads the pools again.
        checkouts.store(11, std::sync::atomic::Ordering::Relaxed);
        assert!(m
            .encode()
            .contains("pgbastion_pool_checkouts_total{upstream=\"pg\"} 11"));
        // No pooled upstream: no pool series at all.
        m.read_pools_with(Vec::new);
        assert!(!m.encode().contains("pgbastion_pool_server_connections"));
    }

    #[test]
    fn pool_wait_is_a_histogram_by_upstream() {
        let m = metrics();
        m.pool_wait("pg", Duration::from_millis(3));
        m.pool_wait("pg", Duration::from_secs(119));
        let text = m.encode();
        assert!(text.contains("# TYPE pgbastion_pool_wait_seconds histogram"));
        assert!(text.contains("pgbastion_pool_wait_seconds_count{upstream=\"pg\"} 2"));
        assert!(text.contains("pgbastion_pool_wait_seconds_bucket{le=\"0.004\",upstream=\"pg\"} 1"));
        // A wait as long as the default query_wait_timeout (120 s) has a
        // bucket below +Inf.
        for (le, n) in [("65.536", 1), ("131.072", 2)] {
            let line =
                format!("pgbastion_pool_wait_seconds_bucket{{le=\"{le}\",upstream=\"pg\"}} {n}");
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
