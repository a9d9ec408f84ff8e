//! The audit log: one JSON object per line, for every session that got as
//! far as a first packet, written by a thread of its own (`sink`).
//!
//! Events carry what a reviewer needs to answer "who connected, to what,
//! over which protection, and how did it end" — and never a password, key or
//! cancel key: the types written here have no field that could hold one.

pub mod chain;
pub mod event;
pub mod normalize;
pub mod query;
pub mod sink;

use crate::sync::{MutexExt, RwLockExt};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::audit::chain::{Chain, Digest};
use crate::audit::sink::{Sink, SinkTarget};
use crate::config::{AuditOnFailure, AuditTarget};
use crate::identity::Identity;
use crate::tls::TlsInfo;

pub use event::{
    AuthFacts, AuthOutcome, CancelOutcome, CopyDirection, CredentialKind, EndReason, LegAuth,
    LoginMode, Mechanism, PinReason, QueryOutcome, QueryProtocol, RejectReason,
};

/// How the client leg was protected.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum ClientTransport {
    Tls(TlsInfo),
    Plaintext,
    /// The client asked for TLS and the handshake failed (`error`: the
    /// TLS alert received or the reason pgbastion refused): no session
    /// ran in plaintext, and the audit must not say one did.
    #[serde(rename = "tls_handshake_failed")]
    TlsFailed {
        error: String,
    },
}

/// What carried a session to an https listener.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Carrier {
    /// The Postgres byte stream in WebSocket binary frames (`wss`).
    WebSocket,
    /// One SQL-over-HTTP request (`POST /sql`), run as a session of its own.
    Http,
}

/// Where the client came from.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ClientAddress {
    /// IP address, or "unix" for a Unix-socket client.
    pub addr: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl ClientAddress {
    pub fn tcp(a: SocketAddr) -> Self {
        ClientAddress {
            addr: a.ip().to_string(),
            port: Some(a.port()),
        }
    }
    pub fn unix() -> Self {
        ClientAddress {
            addr: "unix".into(),
            port: None,
        }
    }
}

impl std::fmt::Display for ClientAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) if self.addr.contains(':') => write!(f, "[{}]:{p}", self.addr),
            Some(p) => write!(f, "{}:{p}", self.addr),
            None => f.write_str(&self.addr),
        }
    }
}

/// What the client asked for in its StartupMessage.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Requested {
    pub user: String,
    pub database: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub application_name: Option<String>,
    pub protocol: String,
}

/// How routing placed a session (issue 22): what it matched on and
/// where it went.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct RouteFacts {
    /// The `[[route]]` that matched (None: the listener's upstream).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The TLS server name the client sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    pub upstream: String,
    /// The database as forwarded to the server (an upstream's `database`
    /// may differ from the one the client asked for).
    pub database: String,
}

/// The upstream a session used.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UpstreamFacts {
    pub name: String,
    pub addr: String,
    pub tls: TlsInfo,
}

/// A PROXY protocol header as received: the balancer that sent it (the
/// socket's peer; `client` then holds the address the header states).
#[derive(Debug, Clone, Serialize)]
pub struct ProxyFacts {
    pub via: ClientAddress,
    pub version: u8,
    pub command: crate::protocol::proxy::Command,
    #[serde(flatten)]
    pub tlvs: crate::protocol::proxy::Tlvs,
}

/// A session's query audit, in its start and end events.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct QueryAuditFacts {
    /// `statements` (the rule's `audit_queries`).
    pub mode: &'static str,
    /// End event: the `query` events the session produced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statements: Option<u64>,
    /// End event: why the query audit stopped before the session ended
    /// (statements after that point have no `query` event).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped: Option<&'static str>,
}

/// Why a statement is not in its `query` event.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Unparsed {
    pub len: usize,
    pub why: &'static str,
}

/// The facts every event of one session shares.
#[derive(Debug, Clone, Serialize)]
pub struct SessionFacts {
    pub session_id: String,
    pub listener: String,
    pub client: ClientAddress,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_tls: Option<ClientTransport>,
    /// How an https listener carried the session (absent: the PostgreSQL
    /// protocol on its own socket).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<Carrier>,
    /// The balancer whose `X-Forwarded-For` header stated `client` (only
    /// from the listener's `http.forwarded_for_trusted` networks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarded_by: Option<ClientAddress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested: Option<Requested>,
    /// Who the client is (see `identity`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
    /// What the load balancer's PROXY header said, when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyFacts>,
    /// The policy rule that admitted (or refused) the session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Where routing sent the session, once it was routed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteFacts>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "event")]
pub enum Event<'a> {
    #[serde(rename = "session.start")]
    Start {
        #[serde(flatten)]
        facts: &'a SessionFacts,
        upstream: &'a UpstreamFacts,
        auth: &'a AuthFacts,
        /// Present when the session's statements are audited (its rule's
        /// `audit_queries`): an auditor sees from the session's own events
        /// whether its `query` events are the whole story.
        #[serde(skip_serializing_if = "Option::is_none")]
        query_audit: Option<&'a QueryAuditFacts>,
    },
    #[serde(rename = "session.end")]
    End {
        #[serde(flatten)]
        facts: &'a SessionFacts,
        upstream: &'a UpstreamFacts,
        auth: &'a AuthFacts,
        bytes_client_to_server: u64,
        bytes_server_to_client: u64,
        duration_ms: u64,
        end_reason: EndReason,
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        query_audit: Option<&'a QueryAuditFacts>,
    },
    /// A CancelRequest and what became of it.
    #[serde(rename = "session.cancel")]
    Cancel {
        #[serde(flatten)]
        facts: &'a SessionFacts,
        /// The session it matched, or "unmatched".
        target_session_id: &'a str,
        /// With `[cluster]`: the instance the session runs on, when that
        /// is another one (the cancel was looked up in Redis).
        #[serde(skip_serializing_if = "Option::is_none")]
        session_instance: Option<&'a str>,
        outcome: CancelOutcome,
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// Events held back because strangers caused too many of one kind
    /// (see `warn_limit`): how many, of which kind, in the last window.
    #[serde(rename = "events.suppressed")]
    Suppressed {
        /// The `reason` (rejections) or `outcome` (cancels) held back.
        kind: &'a str,
        count: u64,
        window_s: u64,
    },
    /// A statement of a session whose rule has `audit_queries =
    /// "statements"` (see `query_audit`).
    #[serde(rename = "query")]
    Query {
        #[serde(flatten)]
        facts: &'a SessionFacts,
        /// With constants replaced (unless `[audit] redact = false`);
        /// None when it could not be recorded safely (see `unparsed`).
        statement: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        unparsed: Option<Unparsed>,
        protocol: QueryProtocol,
        /// Extended protocol: the prepared statement's name ("" unnamed).
        #[serde(skip_serializing_if = "Option::is_none")]
        prepared: Option<&'a str>,
        started: String,
        duration_us: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        tag: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        rows: Option<u64>,
        /// CommandCompletes (a simple query may hold several commands).
        commands: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        sqlstate: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        copy: Option<CopyDirection>,
        outcome: QueryOutcome,
    },
    /// The query audit of a session lost its place in the protocol and
    /// records no more of its statements (see `query_audit`); under
    /// `audit.on_failure = "refuse"` the session ends right after.
    #[serde(rename = "query_audit.stopped")]
    QueryAuditStopped {
        #[serde(flatten)]
        facts: &'a SessionFacts,
        why: &'static str,
    },
    /// A pooled session made state on its server connection that
    /// pgbastion cannot carry to another (LISTEN, a temporary table, ...):
    /// it keeps that connection until it ends.
    #[serde(rename = "session.pinned")]
    Pinned {
        #[serde(flatten)]
        facts: &'a SessionFacts,
        reason: PinReason,
        pool: &'a str,
    },
    /// A command run in the admin console.
    #[serde(rename = "console.command")]
    Console {
        #[serde(flatten)]
        facts: &'a SessionFacts,
        command: &'a str,
        /// The command tag, or the error.
        result: String,
    },
    /// A restart found the file's last line cut (see `audit_chain`).
    #[serde(rename = "audit.resumed")]
    Resumed {
        partial_line_bytes: u64,
        partial_line_sha256: String,
    },
    #[serde(rename = "session.rejected")]
    Rejected {
        #[serde(flatten)]
        facts: &'a SessionFacts,
        reason: RejectReason,
        #[serde(skip_serializing_if = "Option::is_none")]
        sqlstate: Option<&'a str>,
        message: String,
        duration_ms: u64,
        /// scram mode: how far authentication got.
        #[serde(skip_serializing_if = "Option::is_none")]
        auth: Option<&'a AuthFacts>,
    },
}

/// How many audit lines may wait for the writer before new ones are dropped.
const QUEUE_LINES: usize = 10_000;

/// How often dropped audit events are reported in pgbastion's log.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(10);

/// The destination of audit events: a writer thread behind a bounded queue
/// (see `sink`), so a slow or stalled audit reader never blocks a session.
/// Each event is one whole line, so concurrent sessions never interleave.
/// The destination can change on reload (`retarget`).
pub struct AuditLog {
    current: RwLock<Current>,
    /// Where the hash chain stands; shared by every destination in turn,
    /// so a reload to a new file goes on with the same chain.
    chain: Arc<Mutex<Chain>>,
    /// When dropped events were last reported, and how many had been.
    reported: Mutex<(Instant, u64)>,
}

struct Current {
    /// None when the log is off: nothing is serialised at all.
    sink: Option<Sink>,
    target: AuditTarget,
    on_failure: AuditOnFailure,
    /// Events written and dropped by earlier destinations.
    earlier: (u64, u64),
}

/// A destination opened for a reload, not yet in use.
pub struct PreparedAudit {
    sink: Option<Sink>,
    target: AuditTarget,
    on_failure: AuditOnFailure,
}

/// `resume`: at start, a file that already has lines makes the chain go on
/// from its last complete line (a restart); a reload to another file goes
/// on with the chain as it stands, so the new file's first line links to
/// the last line written to the old one. Returns also the partial last
/// line a restart found (a crash mid-write), which it terminated.
fn open_sink(
    target: &AuditTarget,
    chain: &Arc<Mutex<Chain>>,
    resume: bool,
) -> std::io::Result<(Option<Sink>, Option<CutLine>)> {
    let chained = |t| Sink::spawn_audit(t, QUEUE_LINES, chain.clone());
    Ok(match target {
        AuditTarget::Off => (None, None),
        AuditTarget::Stdout => (Some(chained(SinkTarget::Stdout)?), None),
        AuditTarget::File(path) => {
            let partial = if resume {
                resume_from(path, chain)?
            } else {
                None
            };
            (Some(chained(SinkTarget::File(path.clone()))?), partial)
        }
    })
}

/// A last line a crash cut: its length and `chain::cut_digest`.
struct CutLine {
    bytes: u64,
    sha256: String,
}

/// Points `chain` at the last complete line of an existing file. A
/// partial line after it (a crash cut it) is ended with a newline, so
/// the next line is not glued onto it, and its length and digest returned.
fn resume_from(path: &std::path::Path, chain: &Mutex<Chain>) -> std::io::Result<Option<CutLine>> {
    use std::io::Write;
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let tail = crate::audit::chain::read_tail(&mut f)?;
    if let Some(last) = &tail.last_complete {
        let mut c = chain.locked();
        *c = Chain::resume(c.digest().clone(), last);
    }
    if tail.partial > 0 {
        f.write_all(b"\n")?;
        tracing::warn!(
            path = %path.display(),
            bytes = tail.partial,
            "the audit log ended in a partial line (a crash mid-write): it was terminated and the chain goes on from the last complete line"
        );
    }
    Ok(tail.partial_sha256.map(|sha256| CutLine {
        bytes: tail.partial,
        sha256,
    }))
}

impl AuditLog {
    /// `digest`: how each line's `prev` is computed (SHA-256, or HMAC with
    /// `audit.chain_key_file`).
    pub fn open(
        target: &AuditTarget,
        on_failure: AuditOnFailure,
        digest: Digest,
    ) -> std::io::Result<AuditLog> {
        let chain = Arc::new(Mutex::new(Chain::new(digest)));
        let (sink, partial) = open_sink(target, &chain, true)?;
        let log = AuditLog {
            current: RwLock::new(Current {
                sink,
                target: target.clone(),
                on_failure,
                earlier: (0, 0),
            }),
            chain,
            reported: Mutex::new((Instant::now(), 0)),
        };
        if let Some(cut) = partial {
            // The first line after the cut one says so (how long it was,
            // and its digest), so `audit verify` can tell a crash from an
            // edit.
            log.emit(&Event::Resumed {
                partial_line_bytes: cut.bytes,
                partial_line_sha256: cut.sha256,
            });
        }
        Ok(log)
    }

    fn current(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read_locked()
    }

    /// For a reload: opens `target` if it differs from the one in use
    /// (None: nothing to change). A destination that cannot be opened is
    /// an error now, and the reload changes nothing.
    pub fn prepare(
        &self,
        target: &AuditTarget,
        on_failure: AuditOnFailure,
    ) -> std::io::Result<Option<PreparedAudit>> {
        let cur = self.current();
        if cur.target == *target && cur.on_failure == on_failure {
            return Ok(None);
        }
        let sink = if cur.target == *target {
            cur.sink.clone()
        } else {
            open_sink(target, &self.chain, false)?.0
        };
        Ok(Some(PreparedAudit {
            sink,
            target: target.clone(),
            on_failure,
        }))
    }

    /// Puts a prepared destination in use. What the old one had queued is
    /// written out first (up to a second), and its counts carry over.
    pub fn retarget(&self, prepared: PreparedAudit) {
        let old = {
            let mut cur = self.current.write_locked();
            let old_sink = std::mem::replace(&mut cur.sink, prepared.sink.clone());
            let same = cur.target == prepared.target;
            cur.target = prepared.target;
            cur.on_failure = prepared.on_failure;
            if same {
                None
            } else {
                old_sink
            }
        };
        if let Some(old) = old {
            old.drain(Duration::from_secs(1));
            let mut cur = self.current.write_locked();
            cur.earlier.0 += old.written();
            cur.earlier.1 += old.dropped();
            *self.reported.locked() = (Instant::now(), 0);
        }
    }

    /// Events written and dropped so far, across destinations.
    pub fn counts(&self) -> (u64, u64) {
        let cur = self.current();
        let (w, d) = cur
            .sink
            .as_ref()
            .map_or((0, 0), |s| (s.written(), s.dropped()));
        (cur.earlier.0 + w, cur.earlier.1 + d)
    }

    /// Queues one event. A sink that cannot keep up or fails loses events:
    /// they are counted and reported in pgbastion's log at most every 10 s;
    /// with `on_failure = "refuse"` no new session is admitted meanwhile
    /// (see `accepting`).
    ///
    /// Returns false when the event was lost and `on_failure` is
    /// "refuse" (the query audit then ends the session); true otherwise.
    pub fn emit(&self, event: &Event<'_>) -> bool {
        let cur = self.current();
        let Some(sink) = &cur.sink else {
            return true;
        };
        let mut line = match serde_json::to_vec(&TimedEvent {
            ts: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            event,
        }) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot serialise audit event");
                return cur.on_failure != AuditOnFailure::Refuse;
            }
        };
        line.push(b'\n');
        let queued = sink.try_write(line);
        self.report_drops(sink, cur.on_failure);
        queued || cur.on_failure != AuditOnFailure::Refuse
    }

    fn report_drops(&self, sink: &Sink, on_failure: AuditOnFailure) {
        let dropped = sink.dropped();
        // The common case, on every event: nothing was ever dropped, so
        // there is nothing to report and no lock to take.
        if dropped == 0 {
            return;
        }
        let mut reported = self.reported.locked();
        if dropped > reported.1 && reported.0.elapsed() >= DROP_REPORT_EVERY {
            tracing::error!(
                dropped = dropped - reported.1,
                total = dropped,
                ?on_failure,
                "audit events could not be written (the audit log is slow or failing) and were dropped"
            );
            *reported = (Instant::now(), dropped);
        }
    }

    /// What the audit log asks for when a record cannot be kept.
    pub fn on_failure(&self) -> AuditOnFailure {
        self.current().on_failure
    }

    /// Whether a new session may be admitted: always with `on_failure =
    /// "continue"`; with `"refuse"`, only while events are being written.
    pub fn accepting(&self) -> bool {
        let cur = self.current();
        match (&cur.sink, cur.on_failure) {
            (Some(sink), AuditOnFailure::Refuse) => {
                let ok = sink.healthy();
                if !ok {
                    self.report_drops(sink, cur.on_failure);
                }
                ok
            }
            _ => true,
        }
    }

    /// Waits (up to `limit`) until every event emitted so far is written:
    /// at shutdown, so the last sessions' end events are not lost.
    pub fn drain(&self, limit: Duration) {
        if let Some(sink) = &self.current().sink {
            if !sink.drain(limit) {
                tracing::error!("audit events still queued at exit could not all be written");
            }
        }
    }

    /// Reopens an audit file (SIGHUP, after logrotate moved it).
    pub fn reopen(&self) {
        if let Some(sink) = &self.current().sink {
            sink.reopen();
        }
    }
}

#[derive(Serialize)]
struct TimedEvent<'a> {
    ts: String,
    #[serde(flatten)]
    event: &'a Event<'a>,
}

#[cfg(test)]
mod golden;

#[cfg(test)]
mod tests;
