//! Running a `Command` against a `ConsoleBackend`: one function per
//! command, each turning what the backend reports into the table (or
//! error) the client sees. The pooling commands are in `pools`.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, UNIX_EPOCH};

use super::backend::{ClusterState, ConsoleBackend, Link, ListenerRow, UpstreamRow};
use super::command::{Command, UnknownCommand};
use super::{done, pools, show, Answer};
use crate::admin::live::SessionInfo;
use crate::config::{AuthMode, ClientTlsMode, ListenerIdentity};
use crate::protocol::message::ErrorResponse;

/// Runs one command: PAUSE waits for the pools to drain, everything else
/// answers at once.
pub(crate) async fn execute<B>(command: Command<'_>, backend: &B) -> Result<Answer, ErrorResponse>
where
    B: ConsoleBackend + ?Sized,
{
    Ok(match command {
        Command::ShowSessions => sessions(backend),
        Command::ShowUpstreams => upstreams(backend),
        Command::ShowListeners => listeners(backend),
        Command::ShowStats => stats(backend),
        Command::ShowCertificates => certificates(backend),
        Command::ShowVersion => version(),
        Command::ShowPools => pools::pools(backend),
        Command::ShowServers => pools::servers(backend),
        Command::ShowClients => pools::clients(backend),
        Command::Kill(id) => return kill(backend, id),
        Command::Reload => return reload(backend),
        Command::Pause(target) => {
            return pools::pause(backend, target, pools::PAUSE_POLL, pools::PAUSE_TIMEOUT).await
        }
        Command::Resume(target) => return pools::resume(backend, target),
        Command::Reconnect(target) => return pools::reconnect(backend, target),
    })
}

/// The error for text that is no command.
pub(crate) fn unknown(e: UnknownCommand<'_>) -> ErrorResponse {
    ErrorResponse::new("42601", e.to_string())
}

fn sessions<B: ConsoleBackend + ?Sized>(backend: &B) -> Answer {
    show(
        vec![
            "id",
            "identity",
            "client",
            "user",
            "database",
            "upstream",
            "client_tls",
            "upstream_tls",
            "state",
            "since",
            "bytes_in",
            "bytes_out",
        ],
        backend.sessions().into_iter().map(session_row).collect(),
    )
}

fn session_row(s: SessionInfo) -> Vec<String> {
    let (bytes_in, bytes_out, busy) = (
        s.progress.client_to_server.load(Relaxed),
        s.progress.server_to_client.load(Relaxed),
        s.progress.busy.load(Relaxed),
    );
    vec![
        s.id,
        s.identity,
        s.client,
        s.user,
        s.database,
        s.upstream,
        s.client_tls.to_string(),
        s.upstream_tls.to_string(),
        if busy { "active" } else { "idle" }.into(),
        humantime::format_rfc3339_seconds(s.since).to_string(),
        bytes_in.to_string(),
        bytes_out.to_string(),
    ]
}

fn upstreams<B: ConsoleBackend + ?Sized>(backend: &B) -> Answer {
    let live = backend.sessions();
    let row = |u: UpstreamRow| {
        let sessions = live.iter().filter(|s| s.upstream == u.name).count();
        vec![
            u.name,
            u.address,
            u.server_name,
            auth_mode(u.auth).into(),
            sessions.to_string(),
        ]
    };
    show(
        vec!["name", "address", "server_name", "auth", "sessions"],
        backend.upstreams().into_iter().map(row).collect(),
    )
}

fn auth_mode(mode: AuthMode) -> &'static str {
    match mode {
        AuthMode::Passthrough => "passthrough",
        AuthMode::Scram => "scram",
    }
}

fn listeners<B: ConsoleBackend + ?Sized>(backend: &B) -> Answer {
    let row = |l: ListenerRow| {
        vec![
            l.name,
            match l.identity {
                ListenerIdentity::Network => "network",
                ListenerIdentity::ClientCert { .. } => "client_cert",
                ListenerIdentity::Tailscale => "tailscale",
            }
            .into(),
            match l.client_tls {
                ClientTlsMode::Require => "require",
                ClientTlsMode::Allow => "allow",
            }
            .into(),
            l.upstream,
        ]
    };
    show(
        vec!["name", "identity", "client_tls", "upstream"],
        backend.listeners().into_iter().map(row).collect(),
    )
}

fn stats<B: ConsoleBackend + ?Sized>(backend: &B) -> Answer {
    let (written, dropped) = backend.audit_counts();
    let pair = |name: &str, value: String| vec![name.to_owned(), value];
    let mut rows = vec![
        pair("sessions_active", backend.sessions().len().to_string()),
        pair("audit_events_written", written.to_string()),
        pair("audit_events_dropped", dropped.to_string()),
    ];
    match backend.cluster() {
        ClusterState::Off => rows.push(pair("cluster", "off".into())),
        ClusterState::On {
            link,
            instance,
            cancel_mappings,
            identity_slots,
        } => rows.extend([
            pair(
                "cluster",
                match link {
                    Link::Up => "up",
                    Link::Down => "down",
                }
                .into(),
            ),
            pair("cluster_instance", instance),
            pair("cluster_cancel_mappings", cancel_mappings.to_string()),
            pair("cluster_identity_slots", identity_slots.to_string()),
        ]),
    }
    show(vec!["name", "value"], rows)
}

fn certificates<B: ConsoleBackend + ?Sized>(backend: &B) -> Answer {
    let row = |(what, t): (String, i64)| {
        let at = u64::try_from(t).map_or_else(
            |_| t.to_string(),
            |t| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t)).to_string(),
        );
        vec![what, at]
    };
    show(
        vec!["certificate", "expires"],
        backend
            .certificate_expiries()
            .into_iter()
            .map(row)
            .collect(),
    )
}

fn version() -> Answer {
    show(
        vec!["version"],
        vec![vec![format!("pgbastion {}", env!("CARGO_PKG_VERSION"))]],
    )
}

fn kill<B: ConsoleBackend + ?Sized>(backend: &B, id: &str) -> Result<Answer, ErrorResponse> {
    if backend.kill(id) {
        Ok(done("KILL"))
    } else {
        Err(ErrorResponse::new(
            "42704",
            format!("no session with id \"{id}\" (SHOW SESSIONS lists them)"),
        ))
    }
}

fn reload<B: ConsoleBackend + ?Sized>(backend: &B) -> Result<Answer, ErrorResponse> {
    match backend.reload() {
        Ok(summary) => Ok(Answer {
            tag: "RELOAD".into(),
            ..show(vec!["reload"], vec![vec![summary]])
        }),
        Err(e) => Err(ErrorResponse::new(
            "F0000",
            format!("reload refused, nothing changed: {e}"),
        )),
    }
}
