//! The message-level relay of a pooled session, without I/O: each client
//! message becomes what its server connection must see (statement names
//! rewritten, missing statements prepared again, a settings switch in
//! front), and each server message what the client must see (pgbastion's
//! own answers hidden, answers it owes the client put in their place).
//!
//! Order is the whole difficulty: the server answers messages in order,
//! skips everything after an error up to Sync, and the client expects an
//! answer for each of its messages in the order it sent them, even those
//! pgbastion answers itself (a Parse of a statement the connection already
//! has, a Close of one it keeps). So every message sent to the server, and
//! every answer owed to the client, is an `Expect` in one queue, consumed
//! as the server's answers come; answers of pgbastion's own go out when
//! they reach the queue's front.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use super::classify::{self, Change};
use super::prepared::{AddError, ClientStatements};
use super::server::{parameter_status, parse_parameter_status, ConnState};
use super::settings::{Followed, SessionSettings};
use crate::audit::PinReason;
use crate::config::PoolMode;
use crate::protocol::message::{self, ErrorResponse};

/// What one message sent to the server (or one answer owed) is waiting
/// for.
#[derive(Debug)]
enum Expect {
    /// The client's message, answered as PostgreSQL answers it.
    Forwarded(Kind),
    /// A Parse: the client's (`client` names its statement, undone if the
    /// server refuses or skips it) or pgbastion's own (`client` None and
    /// `hidden`: preparing a statement again).
    Parse {
        client: Option<Vec<u8>>,
        server: Option<Arc<str>>,
        hidden: bool,
    },
    /// A Close pgbastion sent (the least recently used statement).
    HiddenClose,
    /// An answer pgbastion owes the client; `undo` names a statement to
    /// forget if it is skipped (an error earlier in the batch).
    Owed {
        bytes: Vec<u8>,
        undo: Option<Vec<u8>>,
    },
    /// A message sent only to fail: the server's error is replaced by
    /// this one (a refused statement), then the server skips to Sync.
    Refused {
        error: Vec<u8>,
    },
    /// A simple Query: the client's (answered up to ReadyForQuery, its
    /// first error replaced when refused) or pgbastion's (`hidden`).
    Query {
        hidden: bool,
        replace_error: Option<Vec<u8>>,
        /// A query of pgbastion's own whose failure changes nothing that
        /// matters (re-applying forwarded values inside a transaction that
        /// already failed, which rolls back what they would restore).
        tolerant: bool,
    },
    Sync,
    /// A Sync pgbastion sent after preparing a statement of its own.
    HiddenSync,
    FunctionCall,
}

/// The client's extended-protocol messages, by what ends their answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bind,
    DescribeStatement,
    DescribePortal,
    Execute,
    Close,
}

impl Kind {
    /// Whether a server message of type `tag` is the last of the answer.
    fn ends_with(self, tag: u8) -> bool {
        match self {
            Kind::Bind => tag == b'2',
            Kind::DescribeStatement | Kind::DescribePortal => matches!(tag, b'T' | b'n'),
            Kind::Execute => matches!(tag, b'C' | b'I' | b's'),
            Kind::Close => tag == b'3',
        }
    }
}

/// What the driver must do after a server message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Next {
    Continue,
    /// The connection is between transactions with nothing in flight:
    /// in transaction mode, give it back.
    Idle,
    /// A switch pgbastion sent failed: the session cannot go on safely.
    SwitchFailed(String),
}

/// What a client message asks of the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientStep {
    /// Sent (or answered); go on.
    Done,
    /// Terminate: end the session.
    Terminate,
    /// The client pinned itself with this statement.
    Pinned(PinReason),
}

/// A pooled client's state as the relay follows it.
pub(crate) struct Engine {
    pub mode: PoolMode,
    /// Settings as of the last committed transaction.
    pub settings: Arc<SessionSettings>,
    /// Changes made in the transaction in progress.
    pending: Vec<Change>,
    pub statements: ClientStatements,
    protected: Arc<[String]>,
    pub pinned: Option<PinReason>,
    queue: VecDeque<Expect>,
    /// What the client was told in ParameterStatus.
    client_params: BTreeMap<String, String>,
    /// The last ReadyForQuery status.
    pub status: u8,
    /// An error or a ROLLBACK in the transaction in progress: its setting
    /// changes did not take.
    rolled_back: bool,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    /// The held connection's settings differ from the client's (a RESET
    /// took a startup value away): switch before the next message.
    needs_switch: bool,
    /// Messages the client sent in COPY mode.
    in_copy: bool,
    /// The client's startup settings have been applied once (and so
    /// checked) by a server: later switches may be pipelined.
    pub validated: bool,
    /// A pin that came from a server's answer (the settings bound passed
    /// when a transaction committed), not yet reported.
    new_pin: Option<PinReason>,
}

impl Engine {
    pub fn new(
        mode: PoolMode,
        settings: SessionSettings,
        protected: Arc<[String]>,
        client_params: BTreeMap<String, String>,
    ) -> Self {
        Engine {
            mode,
            settings: Arc::new(settings),
            pending: Vec::new(),
            statements: ClientStatements::default(),
            protected,
            pinned: None,
            queue: VecDeque::new(),
            client_params,
            status: b'I',
            rolled_back: false,
            unsynced: false,
            needs_switch: false,
            in_copy: false,
            validated: false,
            new_pin: None,
        }
    }

    /// Whether the held connection has nothing of this client's in flight
    /// and is outside any transaction: it can go back to the pool (in
    /// transaction mode) or be cleaned.
    pub fn at_rest(&self) -> bool {
        self.queue.is_empty() && self.status == b'I' && !self.unsynced && !self.in_copy
    }

    /// A pin made by a server's answer since last asked (the audit event
    /// and the metric are the relay's to record).
    pub fn take_new_pin(&mut self) -> Option<PinReason> {
        self.new_pin.take()
    }

    /// Whether every message sent has been answered.
    pub fn nothing_in_flight(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether the connection is mid-batch (extended messages without a
    /// Sync) or in COPY: it cannot be cleaned by a query.
    pub fn mid_protocol(&self) -> bool {
        self.unsynced || self.in_copy
    }

    /// What the client was told at login.
    pub fn set_client_params(&mut self, params: BTreeMap<String, String>) {
        self.client_params = params;
    }

    pub fn client_params(&self) -> &BTreeMap<String, String> {
        &self.client_params
    }

    /// Whether the held connection may go back to the pool now.
    pub fn may_release(&self) -> bool {
        self.mode == PoolMode::Transaction && self.pinned.is_none() && self.at_rest()
    }

    /// Before the first message of a checkout: the settings switch, when
    /// the connection's settings are not this client's. Returns whether
    /// one was sent.
    pub fn switch_if_needed(&mut self, conn: &mut ConnState, to_server: &mut Vec<u8>) -> bool {
        self.forget_dropped_statements(conn, to_server);
        let same = conn.applied.as_deref() == Some(&*self.settings) && !self.needs_switch;
        if same {
            return false;
        }
        self.send_switch(conn, to_server);
        true
    }

    /// After SQL that may have dropped prepared statements (a DEALLOCATE
    /// or DISCARD pgbastion did not follow): pgbastion's statements on the
    /// connection are deallocated and forgotten, so what it knows is what
    /// the server has (every client's statements are prepared again where
    /// used). Only pgbastion's own: a pinned client's SQL PREPAREs stay.
    fn forget_dropped_statements(&mut self, conn: &mut ConnState, to_server: &mut Vec<u8>) {
        if !conn.statements_dirty {
            return;
        }
        conn.statements_dirty = false;
        conn.statements.clear();
        push_query(to_server, FORGET_STATEMENTS);
        self.queue.push_back(Expect::Query {
            hidden: true,
            replace_error: None,
            tolerant: false,
        });
    }

    fn send_switch(&mut self, conn: &mut ConnState, to_server: &mut Vec<u8>) {
        // Two queries: the first (RESET ALL, the startup and forwarded
        // values) cannot fail, so the identity is in place whatever the
        // second (the client's SETs) does.
        for sql in self.settings.switch_sql() {
            push_query(to_server, &sql);
            self.queue.push_back(Expect::Query {
                hidden: true,
                replace_error: None,
                tolerant: false,
            });
        }
        conn.applied = Some(self.settings.clone());
        self.needs_switch = false;
    }

    /// One client message (`msg` is the whole message, type byte first).
    pub fn client_message(
        &mut self,
        msg: &[u8],
        conn: &mut ConnState,
        to_server: &mut Vec<u8>,
        to_client: &mut Vec<u8>,
    ) -> ClientStep {
        let tag = msg[0];
        let body = &msg[5..];
        if self.queue.is_empty() && !self.unsynced {
            if self.needs_switch {
                self.send_switch(conn, to_server);
            }
            self.forget_dropped_statements(conn, to_server);
        }
        match tag {
            b'X' => return ClientStep::Terminate,
            b'Q' => return self.query(msg, body, conn, to_server),
            b'P' => return self.parse(msg, body, conn, to_server, to_client),
            b'B' => self.bind(msg, body, conn, to_server),
            b'D' => self.describe(msg, body, conn, to_server),
            b'C' => self.close(msg, body, to_server, to_client),
            b'E' => self.forward(msg, to_server, Some(Kind::Execute)),
            b'S' => {
                to_server.extend_from_slice(msg);
                self.queue.push_back(Expect::Sync);
                self.unsynced = false;
            }
            b'F' => return self.function_call(msg, body, to_server),
            b'c' | b'f' => {
                self.in_copy = false;
                to_server.extend_from_slice(msg);
            }
            // CopyData, Flush, and anything else: as sent.
            _ => to_server.extend_from_slice(msg),
        }
        ClientStep::Done
    }

    fn forward(&mut self, msg: &[u8], to_server: &mut Vec<u8>, kind: Option<Kind>) {
        to_server.extend_from_slice(msg);
        if let Some(kind) = kind {
            self.queue.push_back(Expect::Forwarded(kind));
            self.unsynced = true;
        }
    }

    fn pin(&mut self, reason: Option<PinReason>) -> ClientStep {
        match reason {
            Some(r) if self.pinned.is_none() => {
                self.pinned = Some(r);
                ClientStep::Pinned(r)
            }
            _ => ClientStep::Done,
        }
    }

    /// An answer pgbastion owes the client: now, when nothing is in
    /// flight before it, else when its turn comes.
    fn owe(&mut self, bytes: Vec<u8>, undo: Option<Vec<u8>>, to_client: &mut Vec<u8>) {
        if self.queue.is_empty() {
            to_client.extend_from_slice(&bytes);
        } else {
            self.queue.push_back(Expect::Owed { bytes, undo });
        }
    }

    /// One server message (`msg` whole, type byte first).
    pub fn server_message(
        &mut self,
        msg: &[u8],
        conn: &mut ConnState,
        to_client: &mut Vec<u8>,
    ) -> Next {
        let tag = msg[0];
        let body = &msg[5..];
        let hidden = matches!(self.queue.front(), Some(Expect::Query { hidden: true, .. }));
        match tag {
            b'S' => {
                self.parameter(body, conn, to_client);
                return Next::Continue;
            }
            b'N' | b'A' => {
                if !hidden {
                    to_client.extend_from_slice(msg);
                }
                return Next::Continue;
            }
            b'E' => return self.error(msg, conn, to_client),
            _ => {}
        }
        if tag == b'Z' {
            return self.ready(msg, body, conn, to_client);
        }
        let Some(front) = self.queue.front() else {
            // Nothing asked for it: pass it on (the client's business).
            to_client.extend_from_slice(msg);
            return Next::Continue;
        };
        let (forward, done) = match front {
            Expect::Forwarded(kind) => (true, kind.ends_with(tag)),
            Expect::Parse { hidden, .. } => (!*hidden, tag == b'1'),
            Expect::HiddenClose => (false, tag == b'3'),
            Expect::Query { hidden, .. } => (!*hidden, false),
            Expect::HiddenSync => (false, false),
            Expect::Sync | Expect::FunctionCall | Expect::Refused { .. } | Expect::Owed { .. } => {
                (true, false)
            }
        };
        if matches!(tag, b'G' | b'W') {
            self.in_copy = true;
        }
        if tag == b'C' && body.starts_with(b"ROLLBACK") && forward {
            self.rolled_back = true;
        }
        if forward {
            to_client.extend_from_slice(msg);
        }
        if done {
            self.queue.pop_front();
            self.pay_owed(to_client);
        }
        Next::Continue
    }

    /// ParameterStatus: kept for the connection, passed on when the client
    /// has not been told that value.
    fn parameter(&mut self, body: &[u8], conn: &mut ConnState, to_client: &mut Vec<u8>) {
        let Some((name, value)) = parse_parameter_status(body) else {
            return;
        };
        conn.params.insert(name.clone(), value.clone());
        if self.client_params.get(&name) != Some(&value) {
            to_client.extend_from_slice(&parameter_status(&name, &value));
            self.client_params.insert(name, value);
        }
    }

    /// ReadyForQuery: the end of a Query, Sync or FunctionCall.
    fn ready(
        &mut self,
        msg: &[u8],
        body: &[u8],
        conn: &mut ConnState,
        to_client: &mut Vec<u8>,
    ) -> Next {
        let hidden = matches!(
            self.queue.front(),
            Some(Expect::Query { hidden: true, .. } | Expect::HiddenSync)
        );
        self.queue.pop_front();
        self.in_copy = false;
        if hidden {
            self.pay_owed(to_client);
            return Next::Continue;
        }
        to_client.extend_from_slice(msg);
        self.status = body.first().copied().unwrap_or(b'I');
        if self.status == b'I' {
            self.end_transaction(conn);
        }
        self.pay_owed(to_client);
        if self.at_rest() {
            Next::Idle
        } else {
            Next::Continue
        }
    }

    /// A transaction ended: its setting changes take, unless it failed or
    /// rolled back.
    fn end_transaction(&mut self, conn: &mut ConnState) {
        let changes = std::mem::take(&mut self.pending);
        if self.rolled_back {
            self.rolled_back = false;
            if !changes.is_empty() {
                // What the server kept is not certain (savepoints): the
                // connection gets a full switch before its next client.
                conn.applied = None;
            }
            return;
        }
        if changes.is_empty() {
            return;
        }
        let mut settings = (*self.settings).clone();
        match settings.apply(&changes) {
            Followed::Yes => {}
            Followed::NeedsSwitch => self.needs_switch = true,
            Followed::TooMany => {
                if self.pinned.is_none() {
                    self.pinned = Some(PinReason::TooManySettings);
                    self.new_pin = Some(PinReason::TooManySettings);
                }
            }
        }
        self.settings = Arc::new(settings);
        conn.applied = if self.needs_switch {
            None
        } else {
            Some(self.settings.clone())
        };
    }

    /// An ErrorResponse: the client's, or one to replace; in the extended
    /// protocol the server then skips to Sync, and so do the expectations.
    fn error(&mut self, msg: &[u8], conn: &mut ConnState, to_client: &mut Vec<u8>) -> Next {
        self.rolled_back = true;
        let Some(front) = self.queue.front_mut() else {
            to_client.extend_from_slice(msg);
            return Next::Continue;
        };
        match front {
            Expect::Query {
                hidden: true,
                tolerant: true,
                ..
            } => return Next::Continue,
            Expect::Query { hidden: true, .. } => {
                let fields = message::ErrorFields::parse(&msg[5..]).unwrap_or_default();
                return Next::SwitchFailed(format!("{} ({})", fields.message, fields.code));
            }
            Expect::Query { replace_error, .. } => {
                match replace_error.take() {
                    Some(error) => to_client.extend_from_slice(&error),
                    None => to_client.extend_from_slice(msg),
                }
                return Next::Continue;
            }
            Expect::FunctionCall | Expect::Sync | Expect::HiddenSync => {
                to_client.extend_from_slice(msg);
                return Next::Continue;
            }
            Expect::Refused { error } => {
                let error = std::mem::take(error);
                to_client.extend_from_slice(&error);
            }
            _ => to_client.extend_from_slice(msg),
        }
        // The failed message and everything up to Sync, simple queries
        // and function calls included (the server ignores every message
        // until Sync): never answered.
        while let Some(e) = self.queue.front() {
            if matches!(e, Expect::Sync | Expect::HiddenSync) {
                break;
            }
            if let Some(e) = self.queue.pop_front() {
                self.undo(e, conn);
            }
        }
        Next::Continue
    }

    /// Forgets what a refused or skipped message would have made.
    fn undo(&mut self, e: Expect, conn: &mut ConnState) {
        match e {
            Expect::Parse { client, server, .. } => {
                if let Some(server) = server {
                    conn.statements.remove(&server);
                }
                if let Some(name) = client {
                    self.statements.remove(&name);
                }
            }
            Expect::Owed {
                undo: Some(name), ..
            } => {
                self.statements.remove(&name);
            }
            _ => {}
        }
    }

    /// Answers pgbastion owes, now at the front of the queue.
    fn pay_owed(&mut self, to_client: &mut Vec<u8>) {
        while let Some(Expect::Owed { .. }) = self.queue.front() {
            if let Some(Expect::Owed { bytes, .. }) = self.queue.pop_front() {
                to_client.extend_from_slice(&bytes);
            }
        }
    }
}

fn push_query(out: &mut Vec<u8>, sql: &str) {
    let mut body = Vec::with_capacity(sql.len() + 1);
    push_cstr(&mut body, sql.as_bytes());
    out.extend_from_slice(&message::build(b'Q', &body));
}

fn push_cstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(s);
    out.push(0);
}

/// A NUL-terminated string and what follows it.
fn split_cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = b.iter().position(|c| *c == 0)?;
    Some((&b[..end], &b[end + 1..]))
}

mod client;
mod text;

use text::FORGET_STATEMENTS;
#[cfg(test)]
use text::{deallocate, drops_statements, mentions_reset_all, resets_all, Deallocate};

#[cfg(test)]
mod tests;
