//! The server's side of the query audit: its answers (CommandComplete,
//! ErrorResponse, COPY responses, the answers to extended-protocol steps,
//! ReadyForQuery), matched in order with the statements waiting for them.

use crate::audit::event::{CopyDirection, QueryOutcome};

use super::{Pending, QueryTracker, MAX_ANSWER};

impl QueryTracker {
    /// What the server sent.
    pub fn server_bytes(&mut self, data: &[u8]) {
        if self.stopped.is_some() {
            return;
        }
        let mut messages = Vec::new();
        let fed = self.server.feed(
            data,
            |tag| matches!(tag, b'C' | b'E' | b'Z').then_some(MAX_ANSWER),
            |m| messages.push((m.tag, m.body.to_vec())),
        );
        for (tag, body) in messages {
            if self.stopped.is_some() {
                return;
            }
            self.server_message(tag, &body);
        }
        if fed.is_err() && self.stopped.is_none() {
            self.stop("the server's messages could not be framed");
        }
    }

    fn server_message(&mut self, tag: u8, body: &[u8]) {
        // The server left COPY FROM STDIN on its own (an error in the
        // data): the client need not end it, and its Syncs count again.
        if self.copy_in && matches!(tag, b'E' | b'Z') {
            self.copy_in = false;
        }
        // Markers of a COPY the server never entered (it failed first).
        while matches!(self.pending.front(), Some(Pending::CopyEnd)) {
            self.pending.pop_front();
        }
        match tag {
            b'C' | b'I' | b's' => self.command_done(tag, body),
            b'E' => self.error(sqlstate(body)),
            b'G' | b'H' | b'W' => self.copy_response(tag),
            b'1' | b'2' | b'3' if !self.answered_step(tag) => {
                self.stop("an answer did not match the statements sent");
            }
            // A Describe's answer; a simple query's RowDescription is not.
            b'T' | b'n' => {
                self.answered_step(b'T');
            }
            b'Z' => self.ready_for_query(body.first().copied()),
            _ => {}
        }
    }

    /// CommandComplete (`C`), EmptyQueryResponse (`I`) or PortalSuspended
    /// (`s`).
    fn command_done(&mut self, tag: u8, body: &[u8]) {
        let (command, rows) = match tag {
            b'C' => command_tag(body),
            b'I' => (Some("EMPTY".to_owned()), None),
            _ => (None, None),
        };
        let done = command.clone();
        match self.pending.front_mut() {
            Some(Pending::Simple(w)) => {
                w.record.tag = command;
                w.record.rows = rows;
                w.record.commands += 1;
                self.completed(done.as_deref());
            }
            Some(Pending::Execute(_)) => {
                if let Some(Pending::Execute(mut w)) = self.pending.pop_front() {
                    w.record.tag = command;
                    w.record.rows = rows;
                    w.record.commands += u32::from(tag == b'C');
                    if tag == b's' {
                        w.record.outcome = QueryOutcome::Suspended;
                    }
                    self.finish(w);
                    self.completed(done.as_deref());
                }
            }
            _ => {}
        }
    }

    /// An ErrorResponse with SQLSTATE `code`.
    fn error(&mut self, code: Option<String>) {
        match self.pending.front_mut() {
            Some(Pending::Simple(w)) | Some(Pending::Call(w)) => {
                w.record.sqlstate = code;
                w.record.outcome = QueryOutcome::Error;
            }
            Some(Pending::Execute(_)) => {
                if let Some(Pending::Execute(mut w)) = self.pending.pop_front() {
                    w.record.sqlstate = code;
                    w.record.outcome = QueryOutcome::Error;
                    self.finish(w);
                }
                self.skip_to_sync();
            }
            // A Parse, Bind, Describe or Close failed: when an Execute
            // follows in the same run, its statement is the one that failed.
            Some(Pending::Steps(_)) => {
                // The failed step and those after it are skipped: the
                // server's names stay as they were.
                self.overlay.get_or_insert_with(super::Overlay::default);
                if let Some(Pending::Steps(q)) = self.pending.pop_front() {
                    self.skip_steps(q);
                }
                if let Some(Pending::Execute(_)) = self.pending.front() {
                    if let Some(Pending::Execute(mut w)) = self.pending.pop_front() {
                        w.record.sqlstate = code;
                        w.record.outcome = QueryOutcome::Error;
                        self.finish(w);
                    }
                }
                self.skip_to_sync();
            }
            // An error at Sync (a deferred constraint at commit) is
            // followed by ReadyForQuery; the server skips nothing.
            Some(Pending::Sync | Pending::CopyEnd) | None => {}
        }
    }

    /// CopyInResponse (`G`), CopyOutResponse (`H`) or CopyBothResponse
    /// (`W`): the statement in front is a COPY.
    fn copy_response(&mut self, tag: u8) {
        let dir = match tag {
            b'G' => CopyDirection::In,
            b'H' => CopyDirection::Out,
            _ => CopyDirection::Both,
        };
        match self.pending.front_mut() {
            Some(Pending::Simple(w)) | Some(Pending::Execute(w)) => {
                w.record.copy = Some(dir);
            }
            _ => {}
        }
        if tag == b'G' {
            self.entered_copy_in();
        }
    }

    /// ReadyForQuery with transaction `status`.
    fn ready_for_query(&mut self, status: Option<u8>) {
        match self.pending.pop_front() {
            Some(Pending::Simple(w)) => {
                self.finish(w);
                self.simple_query_ran();
                self.ready(status);
            }
            Some(Pending::Call(w)) => {
                self.finish(w);
                // The function ran code, which may have changed names as a
                // CALL can.
                self.completed(Some("CALL"));
                self.ready(status);
            }
            Some(Pending::Sync | Pending::CopyEnd) | None => self.ready(status),
            Some(other @ (Pending::Execute(_) | Pending::Steps(_))) => {
                // An Execute or a Parse, Bind, ... answered by nothing but
                // ReadyForQuery: not a conversation this tracker
                // understands.
                self.pending.push_front(other);
                self.stop("an answer did not match the statements sent");
            }
        }
    }
}

impl QueryTracker {
    /// The server entered COPY FROM STDIN for the statement in front: the
    /// Syncs the client sent after it, up to its CopyDone, are ignored by
    /// the server, so they get no ReadyForQuery either.
    fn entered_copy_in(&mut self) {
        let mut i = 1;
        while i < self.pending.len() {
            match self.pending[i] {
                Pending::Sync => {
                    self.pending.remove(i);
                }
                Pending::CopyEnd => {
                    self.pending.remove(i);
                    return;
                }
                _ => i += 1,
            }
        }
        // The client has not ended the COPY yet.
        self.copy_in = true;
    }
}

/// The command and row count of a CommandComplete body (`INSERT 0 5`:
/// INSERT, 5; `CREATE TABLE`: no count).
pub(super) fn command_tag(body: &[u8]) -> (Option<String>, Option<u64>) {
    let text = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(body)).into_owned();
    let mut words = text.split(' ');
    let rows = text
        .rsplit(' ')
        .next()
        .filter(|_| text.contains(' '))
        .and_then(|w| w.parse().ok());
    let command: Vec<&str> = words
        .by_ref()
        .take_while(|w| w.parse::<u64>().is_err())
        .collect();
    (Some(command.join(" ")).filter(|c| !c.is_empty()), rows)
}

/// The SQLSTATE (`C` field) of an ErrorResponse body.
fn sqlstate(body: &[u8]) -> Option<String> {
    crate::protocol::message::ErrorFields::parse(body)
        .ok()
        .map(|f| f.code)
}
