//! Query-level audit: watches the bytes the relay copies in both
//! directions (never changing them), frames the protocol messages, and
//! matches each statement the client sent with the server's answer, in
//! order: simple queries (`Q`) up to their ReadyForQuery, extended-protocol
//! executions (`Parse`/`Bind`/`Execute`, pipelined or not) to their
//! CommandComplete or error, function calls (`F`). COPY is a statement like
//! any other: its data is skipped, never kept. Bind parameters are never
//! looked at.
//!
//! Pure: `client_bytes` and `server_bytes` take what the relay read; each
//! finished statement is handed to the `emit` callback. Memory is bounded:
//! only statement texts up to `MAX_STATEMENT` bytes and short server
//! answers are buffered, at most `MAX_HELD` bytes of statement text are
//! held per session (prepared statements, queries awaiting answers), and
//! at most `MAX_PENDING` statements wait for their answers (past that,
//! tracking stops for the session, and says so).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::audit::event::{CopyDirection, QueryOutcome};
use crate::audit::normalize;
use crate::protocol::framer::Framer;

mod names;
mod server;
use names::{Bound, Name, Overlay, Step};
#[cfg(test)]
use server::command_tag;

/// Longer statements are recorded as unparsed, with their length.
pub const MAX_STATEMENT: usize = 256 * 1024;
/// Server messages whose body is read (CommandComplete, ErrorResponse)
/// are cut here; the SQLSTATE comes first in practice.
const MAX_ANSWER: usize = 16 * 1024;
/// Statements sent and not yet answered.
pub const MAX_PENDING: usize = 10_000;
/// Bytes of extended-protocol messages (Parse, Bind, Describe, Close)
/// awaiting their answers (their names, and a few words each).
const MAX_STEPS: usize = 16 << 20;
/// Prepared statements and portals remembered per session.
const MAX_NAMES: usize = 10_000;
/// Statement text one session's audit holds at once (its prepared
/// statements, and its simple queries waiting for answers). Past it, new
/// statements are recorded as unparsed, with their length: a client that
/// prepares thousands of huge statements cannot make pgbastion keep them.
pub const MAX_HELD: usize = 8 * 1024 * 1024;

/// A statement as the audit records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Statement {
    /// Normalized (constants replaced), or as sent when redaction is off.
    Text(Arc<str>),
    /// Not recorded: too long, not UTF-8, or not safely normalizable.
    Unparsed { len: usize, why: &'static str },
    /// A prepared statement or portal this session's audit does not know:
    /// prepared or DECLAREd in SQL, or forgotten past its bounds.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    Simple,
    /// Extended protocol; the prepared statement's name ("" = unnamed).
    Extended {
        name: String,
    },
    FunctionCall,
    /// A replication connection's commands (IDENTIFY_SYSTEM,
    /// START_REPLICATION, ...); the WAL it streams is never looked at.
    Replication,
}

/// One statement and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryRecord {
    pub statement: Statement,
    pub protocol: Protocol,
    pub started: SystemTime,
    pub duration: Duration,
    /// The command tag's command (`SELECT`, `INSERT`, `COPY`, ...) of the
    /// last CommandComplete.
    pub tag: Option<String>,
    /// The row count of the last CommandComplete, when it has one.
    pub rows: Option<u64>,
    /// CommandCompletes (a simple query may hold several statements).
    pub commands: u32,
    pub sqlstate: Option<String>,
    /// The direction of data when the statement was a COPY.
    pub copy: Option<CopyDirection>,
    pub outcome: QueryOutcome,
}

struct Waiting {
    record: QueryRecord,
    at: Instant,
    /// Bytes of `MAX_HELD` this statement's text counts for (given back
    /// when it is recorded).
    held: usize,
    /// An Execute of this portal: its statement is the one the portal
    /// holds when the server runs it (or, skipped, the one the client
    /// meant).
    execute: Option<Name>,
}

enum Pending {
    Simple(Waiting),
    Execute(Waiting),
    Call(Waiting),
    Sync,
    /// The client ended a COPY FROM STDIN (CopyDone or CopyFail).
    CopyEnd,
    /// Extended-protocol messages that are not statements, awaiting their
    /// answers in order: `P`arse (ParseComplete), `B`ind (BindComplete),
    /// `D`escribe (RowDescription or NoData), `C`lose (CloseComplete).
    /// Their errors matter: after one the server skips to the next Sync.
    /// Consecutive ones share an entry.
    Steps(VecDeque<Step>),
}

pub struct QueryTracker {
    client: Framer,
    server: Framer,
    pending: VecDeque<Pending>,
    /// Prepared statements and portals as the server has them (see
    /// `names`).
    prepared: HashMap<String, Statement>,
    portals: HashMap<String, Bound>,
    /// What the client meant in a run the server skips, while there is
    /// one.
    overlay: Option<Overlay>,
    redact: bool,
    /// A replication connection: its simple queries are replication
    /// commands.
    replication: bool,
    /// The server is in COPY FROM STDIN and the client has not ended it
    /// yet: the Syncs it sends meanwhile are ignored by the server.
    copy_in: bool,
    /// A record could not be kept (the audit log refuses unaudited
    /// statements): the session must end.
    lost: bool,
    /// Tracking stopped (framing lost, or too much pending).
    stopped: Option<&'static str>,
    /// Records handed to `emit`.
    recorded: u64,
    /// Statement text held, against `MAX_HELD`.
    held: usize,
    /// Bytes of the `Pending::Steps`, against `MAX_STEPS`.
    steps: usize,
    /// The server answered an extended-protocol message with an error and
    /// no Sync has been sent since: it discards everything the client
    /// sends up to the next Sync (postgres.c's `ignore_till_sync`), simple
    /// queries and function calls included.
    skipping: bool,
    /// Hands a record on; false: it could not be kept and the session
    /// must not go on (see `lost`).
    emit: Box<dyn FnMut(QueryRecord) -> bool + Send>,
    /// Told why, when tracking stops; false: the session must not go on
    /// unaudited (see `lost`). A tracker that loses its place never stops
    /// silently.
    on_stop: Option<Box<dyn FnMut(&'static str) -> bool + Send>>,
}

impl QueryTracker {
    /// `redact`: replace constants (the default); off records statements
    /// as sent.
    pub fn new(redact: bool, emit: Box<dyn FnMut(QueryRecord) -> bool + Send>) -> Self {
        Self::for_session(redact, false, emit)
    }

    /// `replication`: the session's StartupMessage asked for a replication
    /// connection.
    pub fn for_session(
        redact: bool,
        replication: bool,
        emit: Box<dyn FnMut(QueryRecord) -> bool + Send>,
    ) -> Self {
        QueryTracker {
            client: Framer::default(),
            server: Framer::default(),
            pending: VecDeque::new(),
            prepared: HashMap::new(),
            portals: HashMap::new(),
            overlay: None,
            redact,
            replication,
            copy_in: false,
            lost: false,
            stopped: None,
            recorded: 0,
            held: 0,
            steps: 0,
            skipping: false,
            emit,
            on_stop: None,
        }
    }

    /// What to do when tracking stops (the session records it in the audit
    /// and a metric, and ends the session under `audit.on_failure =
    /// "refuse"`).
    pub fn on_stop(mut self, f: Box<dyn FnMut(&'static str) -> bool + Send>) -> Self {
        self.on_stop = Some(f);
        self
    }

    /// A record could not be kept and the audit log does not allow
    /// unaudited statements: the relay ends the session.
    pub fn lost(&self) -> bool {
        self.lost
    }

    /// How many statements were handed on (the session's `query` events,
    /// or attempts at them).
    pub fn recorded(&self) -> u64 {
        self.recorded
    }

    /// The session is over: every statement forwarded to the server and
    /// not answered is recorded now, with outcome "unanswered" (the
    /// client reset the connection, half-closed it, or the server ended
    /// the session mid-statement: the server may have run it).
    pub fn end_of_session(&mut self) {
        // What was sent is taken as done, to record what the client meant.
        self.overlay.get_or_insert_with(Overlay::default);
        while let Some(p) = self.pending.pop_front() {
            match p {
                Pending::Simple(mut w) | Pending::Execute(mut w) | Pending::Call(mut w) => {
                    if w.record.outcome == QueryOutcome::Ok {
                        w.record.outcome = QueryOutcome::Unanswered;
                    }
                    self.finish(w);
                }
                Pending::Steps(q) => q.into_iter().for_each(|step| self.overlay(step)),
                Pending::Sync | Pending::CopyEnd => {}
            }
        }
        self.end_overlay();
    }

    /// Why tracking stopped, if it did.
    pub fn stopped(&self) -> Option<&'static str> {
        self.stopped
    }

    /// What the client sent (as the relay read it).
    pub fn client_bytes(&mut self, data: &[u8]) {
        if self.stopped.is_some() {
            return;
        }
        let mut messages = Vec::new();
        let fed = self.client.feed(
            data,
            |tag| matches!(tag, b'Q' | b'P' | b'B' | b'E' | b'C').then_some(MAX_STATEMENT),
            |m| messages.push((m.tag, m.body.to_vec(), m.len, m.cut)),
        );
        for (tag, body, len, cut) in messages {
            // Once stopped, the rest of the batch means nothing (and must
            // not stop it, and report, again).
            if self.stopped.is_some() {
                return;
            }
            self.client_message(tag, &body, len, cut);
        }
        if fed.is_err() && self.stopped.is_none() {
            self.stop("the client's messages could not be framed");
        }
    }

    fn stop(&mut self, why: &'static str) {
        if let Some(on_stop) = self.on_stop.as_mut() {
            if !on_stop(why) {
                self.lost = true;
            }
        }
        self.stopped = Some(why);
        self.pending.clear();
        self.prepared.clear();
        self.portals.clear();
        self.overlay = None;
        self.held = 0;
        self.steps = 0;
        self.skipping = false;
    }

    /// Counts `s` against `MAX_HELD`, or, past it, keeps only its length.
    /// Returns the statement to keep and the bytes it counts for.
    fn hold(&mut self, s: Statement) -> (Statement, usize) {
        match s {
            Statement::Text(t) if self.held + t.len() > MAX_HELD => (
                Statement::Unparsed {
                    len: t.len(),
                    why: "over the session's query audit memory bound",
                },
                0,
            ),
            Statement::Text(t) => {
                self.held += t.len();
                let n = t.len();
                (Statement::Text(t), n)
            }
            other => (other, 0),
        }
    }

    fn statement(&self, text: &[u8], len: usize, cut: bool) -> Statement {
        if cut {
            return Statement::Unparsed {
                len,
                why: "too long",
            };
        }
        let Ok(text) = std::str::from_utf8(text) else {
            return Statement::Unparsed {
                len,
                why: "not UTF-8",
            };
        };
        if !self.redact {
            return Statement::Text(text.into());
        }
        // Read both ways: the session's standard_conforming_strings is
        // never known for certain (see `normalize::Backslashes`).
        match normalize::normalize(text) {
            Ok(n) => Statement::Text(n.text.into()),
            Err(normalize::Unparsed::Unterminated) => Statement::Unparsed {
                len,
                why: "unterminated literal",
            },
            Err(normalize::Unparsed::AmbiguousBackslash) => Statement::Unparsed {
                len,
                why: "backslash in a plain string",
            },
            Err(normalize::Unparsed::EncodingDependentBackslash) => Statement::Unparsed {
                len,
                why: "backslash after a non-ASCII byte",
            },
        }
    }

    fn push(&mut self, p: Pending) {
        if self.skipping {
            // The server discards it; a Sync ends the skipping and is
            // answered.
            match p {
                Pending::Simple(mut w) | Pending::Execute(mut w) | Pending::Call(mut w) => {
                    w.record.outcome = QueryOutcome::NotExecuted;
                    self.finish(w);
                    return;
                }
                Pending::Sync => {
                    self.skipping = false;
                    self.end_overlay();
                }
                Pending::CopyEnd => return,
                Pending::Steps(q) => {
                    q.into_iter().for_each(|step| self.overlay(step));
                    return;
                }
            }
        }
        if self.pending.len() >= MAX_PENDING {
            self.stop("more than 10000 statements waiting for answers");
            return;
        }
        self.pending.push_back(p);
    }

    fn waiting(statement: Statement, protocol: Protocol) -> Waiting {
        Waiting {
            record: QueryRecord {
                statement,
                protocol,
                started: SystemTime::now(),
                duration: Duration::ZERO,
                tag: None,
                rows: None,
                commands: 0,
                sqlstate: None,
                copy: None,
                outcome: QueryOutcome::Ok,
            },
            at: Instant::now(),
            held: 0,
            execute: None,
        }
    }

    /// An extended-protocol message that is not a statement: its answer
    /// (or error) comes in its turn.
    fn push_step(&mut self, step: Step) {
        if self.skipping {
            // Skipped by the server: it changes only what the skipped
            // run's statements meant.
            self.overlay(step);
            return;
        }
        if self.steps + step.cost() > MAX_STEPS {
            self.forget_step(step);
            self.stop("more than 16 MiB of protocol messages waiting for answers");
            return;
        }
        self.steps += step.cost();
        if let Some(Pending::Steps(q)) = self.pending.back_mut() {
            q.push_back(step);
        } else {
            self.push(Pending::Steps(VecDeque::from([step])));
        }
    }

    fn forget_step(&mut self, step: Step) {
        if let Step::Parse { statement, .. } = step {
            self.forget(Some(statement));
        }
    }

    /// The answer to the step in front (`answer`: '1', '2', '3', or 'T'
    /// for a Describe's): it takes effect. False when the step in front
    /// is another one.
    fn answered_step(&mut self, answer: u8) -> bool {
        let Some(Pending::Steps(q)) = self.pending.front_mut() else {
            return false;
        };
        if q.front().map(Step::answer) != Some(answer) {
            return false;
        }
        let Some(step) = q.pop_front() else {
            return false;
        };
        if q.is_empty() {
            self.pending.pop_front();
        }
        self.steps = self.steps.saturating_sub(step.cost());
        self.apply(step);
        true
    }

    /// Steps the server skips: they change only the skipped run's view.
    fn skip_steps(&mut self, q: VecDeque<Step>) {
        for step in q {
            self.steps = self.steps.saturating_sub(step.cost());
            self.overlay(step);
        }
    }

    /// The server skips what the client sent up to the next Sync: the
    /// statements among it are recorded as not executed. With no Sync
    /// sent yet, what the client sends next is skipped too.
    fn skip_to_sync(&mut self) {
        self.overlay.get_or_insert_with(Overlay::default);
        loop {
            match self.pending.front() {
                Some(Pending::Sync) => {
                    self.end_overlay();
                    return;
                }
                None => {
                    self.skipping = true;
                    return;
                }
                Some(_) => match self.pending.pop_front() {
                    Some(
                        Pending::Simple(mut w) | Pending::Execute(mut w) | Pending::Call(mut w),
                    ) => {
                        w.record.outcome = QueryOutcome::NotExecuted;
                        self.finish(w);
                    }
                    Some(Pending::Steps(q)) => self.skip_steps(q),
                    _ => {}
                },
            }
        }
    }

    fn client_message(&mut self, tag: u8, body: &[u8], len: usize, cut: bool) {
        match tag {
            b'Q' => {
                let text = body.strip_suffix(&[0]).unwrap_or(body);
                let s = self.statement(text, len, cut);
                let (s, held) = self.hold(s);
                let protocol = if self.replication {
                    Protocol::Replication
                } else {
                    Protocol::Simple
                };
                let mut w = Self::waiting(s, protocol);
                w.held = held;
                self.push(Pending::Simple(w));
            }
            b'P' => {
                // name \0 query \0 (parameter types follow).
                let mut parts = body.splitn(3, |b| *b == 0);
                let name = names::name(parts.next().unwrap_or_default());
                let s = match parts.next() {
                    _ if cut => self.statement(&[], len, true),
                    Some(q) => self.statement(q, q.len(), false),
                    None => Statement::Unknown,
                };
                let (statement, _) = self.hold(s);
                self.push_step(Step::Parse { name, statement });
            }
            b'B' => {
                // portal \0 statement \0 ...: the parameter values after
                // them are never looked at.
                let mut parts = body.splitn(3, |b| *b == 0);
                let portal = names::name(parts.next().unwrap_or_default());
                let statement = names::name(parts.next().unwrap_or_default());
                self.push_step(Step::Bind { portal, statement });
            }
            b'E' => {
                let portal = body.split(|b| *b == 0).next().unwrap_or_default();
                let mut w = Self::waiting(
                    Statement::Unknown,
                    Protocol::Extended {
                        name: String::new(),
                    },
                );
                w.execute = Some(names::name(portal));
                self.push(Pending::Execute(w));
            }
            b'C' => {
                // Close: 'S' statement or 'P' portal, then its name.
                let (kind, rest) = body.split_first().unwrap_or((&0, &[]));
                let name = names::name(rest.strip_suffix(&[0]).unwrap_or(rest));
                self.push_step(Step::Close {
                    portal: *kind == b'P',
                    name,
                });
            }
            b'D' => self.push_step(Step::Describe),
            // PostgreSQL ignores a Sync while it is in COPY FROM STDIN
            // (tokio-postgres sends one right after the Execute).
            b'S' if self.copy_in => {}
            b'S' => self.push(Pending::Sync),
            b'c' | b'f' if self.copy_in => self.copy_in = false,
            b'c' | b'f' => self.push(Pending::CopyEnd),
            b'F' => self.push(Pending::Call(Self::waiting(
                Statement::Text("function call".into()),
                Protocol::FunctionCall,
            ))),
            _ => {}
        }
    }

    fn finish(&mut self, mut w: Waiting) {
        if let Some(portal) = w.execute.take() {
            let (statement, name) = self.resolve(portal.as_deref());
            w.record.statement = statement;
            w.record.protocol = Protocol::Extended { name };
        }
        w.record.duration = w.at.elapsed();
        self.held = self.held.saturating_sub(w.held);
        self.recorded += 1;
        if !(self.emit)(w.record) {
            self.lost = true;
        }
    }
}

#[cfg(test)]
mod tests;
