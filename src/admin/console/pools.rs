//! The pooling commands' answers (issue 21): `SHOW POOLS`, `SHOW SERVERS`,
//! `SHOW CLIENTS`, `PAUSE`, `RESUME`, `RECONNECT`. Column names follow
//! PgBouncer's where they mean the same, so its dashboards and scripts read
//! them.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::backend::{ConsoleBackend, PoolRow};
use super::{done, show, Answer};
use crate::protocol::message::ErrorResponse;

/// How often PAUSE looks whether the pools have drained.
pub(super) const PAUSE_POLL: Duration = Duration::from_millis(20);
/// How long PAUSE waits for busy server connections to come back before
/// it answers with an error (the pause stays).
pub(super) const PAUSE_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) fn pools<B: ConsoleBackend + ?Sized>(backend: &B) -> Answer {
    show(
        vec![
            "upstream",
            "database",
            "user",
            "cl_total",
            "cl_active",
            "cl_waiting",
            "sv_active",
            "sv_idle",
            "sv_used",
            "maxwait",
            "maxwait_us",
            "pool_mode",
            "pool_size",
            "paused",
        ],
        backend.pools().into_iter().map(pool_row).collect(),
    )
}

fn pool_row(p: PoolRow) -> Vec<String> {
    let sv_active = servers_active(&p);
    vec![
        p.upstream,
        p.database,
        p.user,
        p.clients.to_string(),
        p.clients_active.to_string(),
        p.clients_waiting.to_string(),
        sv_active.to_string(),
        p.servers_idle.to_string(),
        // PgBouncer's "used" (given back, not yet checked): pgbastion
        // checks a connection when it hands it out, so none is ever in it.
        "0".into(),
        // PgBouncer's split: whole seconds, and the microseconds beyond.
        p.max_wait.as_secs().to_string(),
        p.max_wait.subsec_micros().to_string(),
        p.mode.as_str().into(),
        p.size.to_string(),
        p.paused.to_string(),
    ]
}

/// Open connections that are not idle: lent to a client, or being
/// opened, cleaned or checked.
fn servers_active(p: &PoolRow) -> usize {
    p.servers_open.saturating_sub(p.servers_idle)
}

/// Every pooled server connection, PgBouncer's way: where it goes, its
/// server process, what it is doing and since when.
pub(super) fn servers<B: ConsoleBackend + ?Sized>(backend: &B) -> Answer {
    let at = |t: std::time::SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let rows = backend
        .servers()
        .into_iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                s.upstream,
                s.database,
                s.user,
                s.state.as_str().into(),
                s.addr.to_string(),
                s.pid.to_string(),
                at(s.connected),
                at(s.since),
            ]
        })
        .collect();
    show(
        vec![
            "id",
            "upstream",
            "database",
            "user",
            "state",
            "addr",
            "pid",
            "connect_time",
            "state_since",
        ],
        rows,
    )
}

/// The sessions of pooled upstreams; `active` while a statement or
/// transaction is in progress.
pub(super) fn clients<B: ConsoleBackend + ?Sized>(backend: &B) -> Answer {
    let pooled = backend.pooled_upstreams();
    let rows = backend
        .sessions()
        .into_iter()
        .filter(|s| pooled.contains(&s.upstream))
        .map(|s| {
            let busy = s.progress.busy.load(Relaxed);
            vec![
                s.id,
                s.identity,
                s.user,
                s.database,
                s.upstream,
                if busy { "active" } else { "idle" }.into(),
                humantime::format_rfc3339_seconds(s.since).to_string(),
            ]
        })
        .collect();
    show(
        vec![
            "id", "identity", "user", "database", "upstream", "state", "since",
        ],
        rows,
    )
}

/// PAUSE: new transactions wait, idle server connections close now and
/// busy ones as they come back; answers once none is open, or after
/// `timeout` with an error saying how many still are (paused either way).
pub(super) async fn pause<B: ConsoleBackend + ?Sized>(
    backend: &B,
    target: Option<&str>,
    poll: Duration,
    timeout: Duration,
) -> Result<Answer, ErrorResponse> {
    let names = targets(backend, target)?;
    backend.pause(&names);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let open = backend.server_connections(&names);
        if open == 0 {
            return Ok(done("PAUSE"));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ErrorResponse::new(
                "55000",
                format!(
                    "PAUSE stopped waiting after {}: {open} server connection{} of {} {} still in use; \
                     the pause stays in force (RESUME lifts it)",
                    humantime::format_duration(timeout),
                    if open == 1 { "" } else { "s" },
                    names.join(", "),
                    if open == 1 { "is" } else { "are" },
                ),
            ));
        }
        tokio::time::sleep(poll).await;
    }
}

pub(super) fn resume<B: ConsoleBackend + ?Sized>(
    backend: &B,
    target: Option<&str>,
) -> Result<Answer, ErrorResponse> {
    backend.resume(&targets(backend, target)?);
    Ok(done("RESUME"))
}

pub(super) fn reconnect<B: ConsoleBackend + ?Sized>(
    backend: &B,
    target: Option<&str>,
) -> Result<Answer, ErrorResponse> {
    backend.reconnect(&targets(backend, target)?);
    Ok(done("RECONNECT"))
}

/// The pooled upstreams a command names: the one given, or all of them.
fn targets<B: ConsoleBackend + ?Sized>(
    backend: &B,
    target: Option<&str>,
) -> Result<Vec<String>, ErrorResponse> {
    let pooled = backend.pooled_upstreams();
    let listed = if pooled.is_empty() {
        "none (no [[upstream]] sets pool_mode)".to_owned()
    } else {
        pooled.join(", ")
    };
    match target {
        None if pooled.is_empty() => Err(ErrorResponse::new(
            "42704",
            format!("no upstream is pooled; the pooled upstreams are {listed}"),
        )),
        None => Ok(pooled),
        Some(name) if pooled.iter().any(|p| p == name) => Ok(vec![name.to_owned()]),
        Some(name) => {
            let known = backend.upstreams().iter().any(|u| u.name == name);
            let what = if known {
                format!("upstream \"{name}\" is not pooled")
            } else {
                format!("no upstream \"{name}\"")
            };
            Err(ErrorResponse::new(
                "42704",
                format!("{what}; the pooled upstreams are {listed}"),
            ))
        }
    }
}
