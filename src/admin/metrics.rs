//! Prometheus metrics (`/metrics` on the admin listener), through the
//! `prometheus-client` crate. Sessions, refusals, authentication results,
//! bytes and cancels are counted from the same events the audit log gets
//! (`observe`), so the two always agree; latencies, reloads and
//! certificate expiry are recorded where they happen.
//!
//! Label values are bounded: listener and upstream names from the config,
//! fixed reason/outcome names from the code; never session ids, addresses
//! or user names.

use crate::sync::MutexExt;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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
            expiries: Default::default(),
            registry: Registry::default(),
        };
        m.register_sessions(&mut registry);
        m.register_operations(&mut registry);
        registry.register_collector(Box::new(AuditCounts(audit)));
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
