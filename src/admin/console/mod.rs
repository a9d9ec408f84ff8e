//! The admin console, PgBouncer's convention: a client that asks for the
//! database `pgbastion`, as an identity that a rule marks `admin = true`,
//! talks to pgbastion itself through the simple query protocol (psql
//! works): `SHOW SESSIONS`, `SHOW UPSTREAMS`, `SHOW LISTENERS`, `SHOW
//! STATS`, `SHOW CERTIFICATES`, `SHOW VERSION`, `KILL '<session id>'`,
//! `RELOAD`, and for pooled upstreams `SHOW POOLS`, `SHOW SERVERS`, `SHOW
//! CLIENTS`, `PAUSE`, `RESUME`, `RECONNECT`. Every command is audited
//! (`console.command`) with its result, once it has one (PAUSE: when the
//! pools drained or the wait gave up).
//!
//! This module owns the message loop (`serve`), `Answer` and its wire
//! form; `command` parses text into a `Command` (pure), `answer` runs it
//! against a `ConsoleBackend` (`backend`), which the server implements: the
//! console imports no server or session code.

mod answer;
mod backend;
mod command;
#[cfg(test)]
mod pool_tests;
mod pools;
#[cfg(test)]
mod tests;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::audit::{Event, SessionFacts};
use crate::auth::wire::{self, WireError};
use crate::protocol::message::{self, tag, ErrorResponse};

pub(crate) use backend::{ClusterState, ConsoleBackend, Link, ListenerRow, PoolRow, UpstreamRow};
pub(crate) use command::Command;

/// The database name that means "the console".
pub const DATABASE: &str = "pgbastion";

/// The largest console message read.
const MAX_MESSAGE: usize = 64 * 1024;

/// A command's answer: a table (possibly empty) and its command tag.
#[derive(Debug, PartialEq)]
pub struct Answer {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
    pub tag: String,
}

/// A SHOW's answer: its table, tagged with the number of rows.
fn show(columns: Vec<&'static str>, rows: Vec<Vec<String>>) -> Answer {
    Answer {
        tag: format!("SHOW {}", rows.len()),
        columns,
        rows,
    }
}

/// A command's answer that is its tag alone.
fn done(tag: &str) -> Answer {
    Answer {
        columns: vec![],
        rows: vec![],
        tag: tag.into(),
    }
}

/// Parses and runs one command (only PAUSE takes time: it waits for the
/// pools to drain).
pub(crate) async fn command<B>(text: &str, backend: &B) -> Result<Answer, ErrorResponse>
where
    B: ConsoleBackend + ?Sized,
{
    match Command::parse(text) {
        Ok(command) => answer::execute(command, backend).await,
        Err(unknown) => Err(answer::unknown(unknown)),
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

/// What a console client is told first: AuthenticationOk, the parameters
/// psql looks at, ReadyForQuery.
fn hello() -> Vec<u8> {
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
    hello
}

/// The reply to one simple Query (its body: the text, NUL-terminated):
/// the answer or the error, then ReadyForQuery. The command is audited
/// with its result.
async fn query<B>(body: &[u8], backend: &B, facts: &SessionFacts) -> Vec<u8>
where
    B: ConsoleBackend + ?Sized,
{
    let text = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(body)).into_owned();
    let result = command(&text, backend).await;
    backend.audit(&Event::Console {
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

/// The console session: greeting, then commands until Terminate or EOF.
/// Returns the end reason for the audit log.
pub(crate) async fn serve<C, B>(
    client: &mut C,
    buf: &mut Vec<u8>,
    backend: &B,
    facts: &SessionFacts,
) -> &'static str
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: ConsoleBackend + ?Sized,
{
    if wire::send(client, &hello()).await.is_err() {
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
            b'Q' => query(&body, backend, facts).await,
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
