//! The admin console, PgBouncer's convention: a client that asks for the
//! database `pgbastion`, as an identity that a rule marks `admin = true`,
//! talks to pgbastion itself through the simple query protocol (psql
//! works): `SHOW SESSIONS`, `SHOW UPSTREAMS`, `SHOW LISTENERS`, `SHOW
//! STATS`, `SHOW CERTIFICATES`, `SHOW VERSION`, `KILL '<session id>'`,
//! `RELOAD`. Every command is audited (`console.command`).
//!
//! `command` is pure (text in, rows out) apart from what it reads from
//! `Shared`; `serve` is the message loop.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::audit::{Event, SessionFacts};
use crate::auth::wire::{self, WireError};
use crate::protocol::message::{self, tag, ErrorResponse};
use crate::server::{ReloadHandle, Shared};

/// The database name that means "the console".
pub const DATABASE: &str = "pgbastion";

/// The largest console message read.
const MAX_MESSAGE: usize = 64 * 1024;

const COMMANDS: &str = "SHOW SESSIONS, SHOW UPSTREAMS, SHOW LISTENERS, SHOW STATS, SHOW CERTIFICATES, SHOW VERSION, KILL '<session id>', RELOAD";

/// A command's answer: a table (possibly empty) and its command tag.
#[derive(Debug, PartialEq)]
pub struct Answer {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
    pub tag: String,
}

/// Runs one command.
pub(crate) fn command(text: &str, shared: &Arc<Shared>) -> Result<Answer, ErrorResponse> {
    let text = text.trim().trim_end_matches(';').trim();
    let upper = text.to_ascii_uppercase();
    let words: Vec<&str> = upper.split_whitespace().collect();
    let show = |columns: Vec<&'static str>, rows: Vec<Vec<String>>| Answer {
        tag: format!("SHOW {}", rows.len()),
        columns,
        rows,
    };
    match words.as_slice() {
        ["SHOW", "SESSIONS"] => Ok(show(
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
            shared
                .live
                .list()
                .into_iter()
                .map(|s| {
                    use std::sync::atomic::Ordering::Relaxed;
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
                })
                .collect(),
        )),
        ["SHOW", "UPSTREAMS"] => Ok(show(
            vec!["name", "address", "server_name", "auth", "sessions"],
            shared
                .upstreams()
                .iter()
                .map(|u| {
                    let sessions = shared
                        .live
                        .list()
                        .iter()
                        .filter(|s| s.upstream == u.config.name)
                        .count();
                    vec![
                        u.config.name.clone(),
                        u.target(),
                        u.config.server_name.clone(),
                        format!("{:?}", u.config.auth_mode()).to_lowercase(),
                        sessions.to_string(),
                    ]
                })
                .collect(),
        )),
        ["SHOW", "LISTENERS"] => Ok(show(
            vec!["name", "identity", "client_tls", "upstream"],
            shared
                .listeners()
                .iter()
                .map(|l| {
                    vec![
                        l.name.clone(),
                        match l.identity {
                            crate::config::ListenerIdentity::Network => "network",
                            crate::config::ListenerIdentity::ClientCert { .. } => "client_cert",
                            crate::config::ListenerIdentity::Tailscale => "tailscale",
                        }
                        .into(),
                        format!("{:?}", l.client_tls).to_lowercase(),
                        l.route.name().to_owned(),
                    ]
                })
                .collect(),
        )),
        ["SHOW", "STATS"] => {
            let (written, dropped) = shared.audit.counts();
            let mut rows = vec![
                vec![
                    "sessions_active".into(),
                    shared.live.list().len().to_string(),
                ],
                vec!["audit_events_written".into(), written.to_string()],
                vec!["audit_events_dropped".into(), dropped.to_string()],
            ];
            match &shared.cluster {
                None => rows.push(vec!["cluster".into(), "off".into()]),
                Some(fleet) => {
                    let (cancels, slots) = fleet.held_counts();
                    rows.extend([
                        vec![
                            "cluster".into(),
                            if fleet.is_up() { "up" } else { "down" }.into(),
                        ],
                        vec!["cluster_instance".into(), fleet.instance().to_owned()],
                        vec!["cluster_cancel_mappings".into(), cancels.to_string()],
                        vec!["cluster_identity_slots".into(), slots.to_string()],
                    ]);
                }
            }
            Ok(show(vec!["name", "value"], rows))
        }
        ["SHOW", "CERTIFICATES"] => Ok(show(
            vec!["certificate", "expires"],
            shared
                .metrics
                .certificate_expiries()
                .into_iter()
                .map(|(what, t)| {
                    let at = u64::try_from(t).map_or_else(
                        |_| t.to_string(),
                        |t| {
                            humantime::format_rfc3339_seconds(
                                std::time::UNIX_EPOCH + std::time::Duration::from_secs(t),
                            )
                            .to_string()
                        },
                    );
                    vec![what, at]
                })
                .collect(),
        )),
        ["SHOW", "VERSION"] => Ok(show(
            vec!["version"],
            vec![vec![format!("pgbastion {}", env!("CARGO_PKG_VERSION"))]],
        )),
        ["KILL", _] => {
            // The id as written (quotes optional), not upper-cased.
            let id = text[4..].trim().trim_matches('\'');
            if shared.live.kill(id) {
                Ok(Answer {
                    columns: vec![],
                    rows: vec![],
                    tag: "KILL".into(),
                })
            } else {
                Err(ErrorResponse::new(
                    "42704",
                    format!("no session with id \"{id}\" (SHOW SESSIONS lists them)"),
                ))
            }
        }
        ["RELOAD"] => match ReloadHandle::from_shared(shared).reload_all() {
            Ok(summary) => Ok(show(vec!["reload"], vec![vec![summary]])).map(|mut a| {
                a.tag = "RELOAD".into();
                a
            }),
            Err(e) => Err(ErrorResponse::new(
                "F0000",
                format!("reload refused, nothing changed: {e}"),
            )),
        },
        _ => Err(ErrorResponse::new(
            "42601",
            format!("unknown command \"{text}\"; the console knows {COMMANDS}"),
        )),
    }
}

/// The rows and tag of an answer as messages, then ReadyForQuery.
fn encode(answer: &Answer) -> Vec<u8> {
    let mut out = Vec::new();
    if !answer.columns.is_empty() {
        let mut body = (answer.columns.len() as u16).to_be_bytes().to_vec();
        for c in &answer.columns {
            body.extend_from_slice(c.as_bytes());
            body.push(0);
            body.extend_from_slice(&0u32.to_be_bytes()); // table oid
            body.extend_from_slice(&0u16.to_be_bytes()); // column number
            body.extend_from_slice(&25u32.to_be_bytes()); // text
            body.extend_from_slice(&(-1i16).to_be_bytes());
            body.extend_from_slice(&(-1i32).to_be_bytes());
            body.extend_from_slice(&0u16.to_be_bytes()); // text format
        }
        out.extend(message::build(b'T', &body));
        for row in &answer.rows {
            let mut body = (row.len() as u16).to_be_bytes().to_vec();
            for v in row {
                body.extend_from_slice(&(v.len() as u32).to_be_bytes());
                body.extend_from_slice(v.as_bytes());
            }
            out.extend(message::build(b'D', &body));
        }
    }
    let mut tag_body = answer.tag.as_bytes().to_vec();
    tag_body.push(0);
    out.extend(message::build(b'C', &tag_body));
    out
}

fn ready() -> Vec<u8> {
    message::build(tag::READY_FOR_QUERY, b"I")
}

/// Error for a command (the session goes on): severity ERROR.
fn error(e: &ErrorResponse) -> Vec<u8> {
    e.encode_with_severity("ERROR")
}

/// The console session: greeting, then commands until Terminate or EOF.
/// Returns the end reason for the audit log.
pub(crate) async fn serve<C>(
    client: &mut C,
    buf: &mut Vec<u8>,
    shared: &Arc<Shared>,
    facts: &SessionFacts,
) -> &'static str
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut hello = message::authentication_ok();
    for (k, v) in [
        (
            "server_version",
            concat!(env!("CARGO_PKG_VERSION"), " (pgbastion console)"),
        ),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        let mut body = k.as_bytes().to_vec();
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
        hello.extend(message::build(b'S', &body));
    }
    hello.extend(ready());
    if wire::send(client, &hello).await.is_err() {
        return "client_error";
    }
    loop {
        let (t, body) = match wire::read_message(client, buf, MAX_MESSAGE).await {
            Ok(m) => m,
            Err(WireError::Closed) => return "client_closed",
            Err(_) => return "client_error",
        };
        let out = match t {
            tag::TERMINATE => return "client_closed",
            b'Q' => {
                let text =
                    String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(&body)).into_owned();
                let result = command(&text, shared);
                shared.audit.emit(&Event::Console {
                    facts,
                    command: &text,
                    result: match &result {
                        Ok(a) => a.tag.clone(),
                        Err(e) => format!("error {}: {}", e.code, e.message),
                    },
                });
                let mut out = match &result {
                    Ok(a) => encode(a),
                    Err(e) => error(e),
                };
                out.extend(ready());
                out
            }
            _ => {
                let mut out = error(&ErrorResponse::new(
                    "0A000",
                    "the pgbastion console speaks the simple query protocol only",
                ));
                out.extend(ready());
                out
            }
        };
        if wire::send(client, &out).await.is_err() {
            return "client_error";
        }
    }
}
