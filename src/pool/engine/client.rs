//! The engine's client side: each client message turned into what the
//! server connection is sent (statement names rewritten, missing
//! statements prepared again, refused statements replaced by one that
//! fails in their place) and what the engine then expects.

use std::sync::Arc;

use super::text::{deallocate, drops_statements, mentions_reset_all, resets_all, Deallocate};
use super::*;

/// `pg_catalog.set_config(text, text, bool)`, whose OID is fixed in
/// PostgreSQL's catalog.
pub(super) const SET_CONFIG_OID: u32 = 2078;

/// A statement name nobody has: a Bind to it fails with no side effect,
/// which puts an error exactly where PostgreSQL would raise one. Random
/// per process, so no client can prepare it first (and turn a refusal
/// into its own statement's answer).
fn no_such_statement() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| format!("pgbastion_refused_{:016x}", rand::random::<u64>()))
}

impl Engine {
    /// A FunctionCall (the protocol's fast path, by function OID): what it
    /// runs is not SQL pgbastion can read, so it pins; `set_config` is
    /// refused outright when settings are forwarded (it could set them).
    pub(super) fn function_call(
        &mut self,
        msg: &[u8],
        body: &[u8],
        to_server: &mut Vec<u8>,
    ) -> ClientStep {
        let oid = body.first_chunk::<4>().map(|b| u32::from_be_bytes(*b));
        if oid == Some(SET_CONFIG_OID) && !self.protected.is_empty() {
            let err = ErrorResponse::new(
                "42501",
                "permission denied to call set_config through a FunctionCall on this pooled upstream",
            )
            .with_detail("pgbastion sets some parameters for every transaction to the identity of the client it serves; clients cannot change them")
            .encode_with_severity("ERROR");
            push_query(to_server, "SELECT 1/0");
            self.queue.push_back(Expect::Query {
                hidden: false,
                replace_error: Some(err),
                tolerant: false,
            });
            // A FunctionCall is answered up to ReadyForQuery, as a query is.
            return ClientStep::Done;
        }
        to_server.extend_from_slice(msg);
        self.queue.push_back(Expect::FunctionCall);
        self.pin(Some(PinReason::FunctionCall))
    }

    /// The statement's effects: refused, pinned, or changes to keep.
    fn effects(&mut self, sql: &[u8]) -> (Option<Vec<u8>>, Option<PinReason>) {
        let text = String::from_utf8_lossy(sql);
        let effects = classify::classify(&text, &self.protected);
        if let Some(name) = effects.forbidden {
            let err = ErrorResponse::new(
                "42501",
                format!("permission denied to set parameter \"{name}\""),
            )
            .with_detail("pgbastion sets this parameter for every transaction to the identity of the client it serves; clients cannot change it")
            .encode_with_severity("ERROR");
            return (Some(err), None);
        }
        let mut pin = effects.pin;
        self.pending.extend(effects.changes);
        if pin.is_none() && self.pending.len() > crate::pool::settings::MAX_SETS {
            pin = Some(PinReason::TooManySettings);
        }
        (None, pin)
    }

    pub(super) fn query(
        &mut self,
        msg: &[u8],
        body: &[u8],
        conn: &mut ConnState,
        to_server: &mut Vec<u8>,
    ) -> ClientStep {
        let sql = body.strip_suffix(&[0]).unwrap_or(body);
        let (refused, pin) = self.effects(sql);
        let refused = refused.or_else(|| self.reset_all_not_last(sql));
        if let Some(error) = refused {
            // A query that fails where it stands, without side effects: the
            // transaction fails as it would have on PostgreSQL.
            push_query(to_server, "SELECT 1/0");
            self.queue.push_back(Expect::Query {
                hidden: false,
                replace_error: Some(error),
                tolerant: false,
            });
            return ClientStep::Done;
        }
        match deallocate(sql) {
            Some(Deallocate::All) => {
                self.statements.clear();
                conn.statements.clear();
            }
            Some(Deallocate::Named(name)) => {
                if let Some(st) = self.statements.remove(name.as_bytes()) {
                    self.deallocate_on_server(&st, conn, to_server);
                    return self.pin(pin);
                }
            }
            None => conn.statements_dirty |= drops_statements(sql),
        }
        to_server.extend_from_slice(msg);
        self.queue.push_back(Expect::Query {
            hidden: false,
            replace_error: None,
            tolerant: false,
        });
        if resets_all(sql) {
            self.reapply_forwarded(to_server);
        }
        self.pin(pin)
    }

    fn reset_all_refusal(&self) -> Vec<u8> {
        ErrorResponse::new(
            "42501",
            "on this pooled upstream, RESET ALL and DISCARD ALL must be sent as a simple query",
        )
        .with_detail("pgbastion puts the parameters it forwards back right after RESET ALL, which it can do only for a simple query")
        .encode_with_severity("ERROR")
    }

    /// With settings forwarded, `RESET ALL` / `DISCARD ALL` must end the
    /// query (pgbastion puts the forwarded values back right after it;
    /// statements after it in the same query would run without them).
    fn reset_all_not_last(&self, sql: &[u8]) -> Option<Vec<u8>> {
        if self.settings.forwarded.is_empty() || !mentions_reset_all(sql) || resets_all(sql) {
            return None;
        }
        let err = ErrorResponse::new(
            "42501",
            "on this pooled upstream, RESET ALL and DISCARD ALL must be the last statement of a query",
        )
        .with_detail("pgbastion puts the parameters it forwards back right after RESET ALL; statements after it in the same query would run without them")
        .with_hint("Send RESET ALL (or DISCARD ALL) as a query of its own, or last.")
        .encode_with_severity("ERROR");
        Some(err)
    }

    /// The forwarded values again, right after a client's `RESET ALL`, in
    /// the same transaction (so a rollback undoes both together).
    fn reapply_forwarded(&mut self, to_server: &mut Vec<u8>) {
        if self.settings.forwarded.is_empty() {
            return;
        }
        push_query(
            to_server,
            &crate::pool::settings::set_configs(&self.settings.forwarded),
        );
        self.queue.push_back(Expect::Query {
            hidden: true,
            replace_error: None,
            tolerant: true,
        });
    }

    /// SQL `DEALLOCATE` of one of the client's protocol-level statements:
    /// its server statement goes (prepared first where missing, so the
    /// client gets PostgreSQL's own answer).
    fn deallocate_on_server(
        &mut self,
        st: &crate::pool::prepared::ClientStatement,
        conn: &mut ConnState,
        to_server: &mut Vec<u8>,
    ) {
        if !conn.statements.touch(&st.server_name) {
            self.prepare_on_server(&st.server_name, &st.parse_rest, conn, to_server, None);
            to_server.extend_from_slice(&message::build(b'S', &[]));
            self.queue.push_back(Expect::HiddenSync);
            self.unsynced = false;
        }
        conn.statements.remove(&st.server_name);
        push_query(to_server, &format!("DEALLOCATE {}", st.server_name));
        self.queue.push_back(Expect::Query {
            hidden: false,
            replace_error: None,
            tolerant: false,
        });
    }

    pub(super) fn parse(
        &mut self,
        msg: &[u8],
        body: &[u8],
        conn: &mut ConnState,
        to_server: &mut Vec<u8>,
        to_client: &mut Vec<u8>,
    ) -> ClientStep {
        self.unsynced = true;
        let Some((name, rest)) = split_cstr(body) else {
            self.forward(msg, to_server, None);
            self.queue.push_back(Expect::Parse {
                client: None,
                server: None,
                hidden: false,
            });
            return ClientStep::Done;
        };
        let sql = split_cstr(rest).map_or(&[][..], |(q, _)| q);
        let (refused, pin) = self.effects(sql);
        let refused = refused.or_else(|| {
            // In the extended protocol pgbastion cannot follow it with the
            // forwarded values before the next statement.
            (!self.settings.forwarded.is_empty() && mentions_reset_all(sql))
                .then(|| self.reset_all_refusal())
        });
        conn.statements_dirty |= drops_statements(sql);
        if let Some(error) = refused {
            self.refuse(error, to_server);
            return ClientStep::Done;
        }
        if name.is_empty() {
            to_server.extend_from_slice(msg);
            self.queue.push_back(Expect::Parse {
                client: None,
                server: None,
                hidden: false,
            });
            return self.pin(pin);
        }
        let statement = match self.statements.add(name, rest) {
            Ok(s) => s,
            Err(AddError::Exists) => {
                let shown = String::from_utf8_lossy(name);
                let error = ErrorResponse::new(
                    "42P05",
                    format!("prepared statement \"{shown}\" already exists"),
                );
                self.refuse(error.encode_with_severity("ERROR"), to_server);
                return ClientStep::Done;
            }
            Err(AddError::TooMany) => {
                let error = ErrorResponse::new(
                    "54000",
                    "too many prepared statements on this pooled session: close the ones no longer used",
                );
                self.refuse(error.encode_with_severity("ERROR"), to_server);
                return ClientStep::Done;
            }
        };
        if conn.statements.touch(&statement.server_name) {
            self.owe(message::build(b'1', &[]), Some(name.to_vec()), to_client);
        } else {
            self.prepare_on_server(&statement.server_name, rest, conn, to_server, Some(name));
        }
        self.pin(pin)
    }

    /// Sends a Parse of a statement under its server name, closing the
    /// least recently used one past the bound.
    fn prepare_on_server(
        &mut self,
        server_name: &Arc<str>,
        rest: &[u8],
        conn: &mut ConnState,
        to_server: &mut Vec<u8>,
        client: Option<&[u8]>,
    ) {
        if let Some(evicted) = conn.statements.insert(server_name.clone()) {
            let mut body = vec![b'S'];
            push_cstr(&mut body, evicted.as_bytes());
            to_server.extend_from_slice(&message::build(b'C', &body));
            self.queue.push_back(Expect::HiddenClose);
        }
        let mut body = Vec::with_capacity(server_name.len() + 1 + rest.len());
        push_cstr(&mut body, server_name.as_bytes());
        body.extend_from_slice(rest);
        to_server.extend_from_slice(&message::build(b'P', &body));
        self.queue.push_back(Expect::Parse {
            client: client.map(<[u8]>::to_vec),
            server: Some(server_name.clone()),
            hidden: client.is_none(),
        });
        self.unsynced = true;
    }

    /// The server name of the client's statement `name`, prepared on the
    /// connection first if it is missing there. None: not the client's
    /// (sent as it is: PostgreSQL's own error names it).
    fn server_statement(
        &mut self,
        name: &[u8],
        conn: &mut ConnState,
        to_server: &mut Vec<u8>,
    ) -> Option<Arc<str>> {
        let st = self.statements.get(name)?.clone();
        if !conn.statements.touch(&st.server_name) {
            self.prepare_on_server(&st.server_name, &st.parse_rest, conn, to_server, None);
        }
        Some(st.server_name)
    }

    pub(super) fn bind(
        &mut self,
        msg: &[u8],
        body: &[u8],
        conn: &mut ConnState,
        to_server: &mut Vec<u8>,
    ) {
        let renamed = split_cstr(body).and_then(|(portal, rest)| {
            let (name, params) = split_cstr(rest)?;
            if name.is_empty() {
                return None;
            }
            let server = self.server_statement(name, conn, to_server)?;
            let mut b = Vec::with_capacity(body.len() + server.len());
            push_cstr(&mut b, portal);
            push_cstr(&mut b, server.as_bytes());
            b.extend_from_slice(params);
            Some(b)
        });
        match renamed {
            Some(b) => to_server.extend_from_slice(&message::build(b'B', &b)),
            None => to_server.extend_from_slice(msg),
        }
        self.queue.push_back(Expect::Forwarded(Kind::Bind));
        self.unsynced = true;
    }

    pub(super) fn describe(
        &mut self,
        msg: &[u8],
        body: &[u8],
        conn: &mut ConnState,
        to_server: &mut Vec<u8>,
    ) {
        let kind = if body.first() == Some(&b'S') {
            Kind::DescribeStatement
        } else {
            Kind::DescribePortal
        };
        let renamed = (kind == Kind::DescribeStatement)
            .then(|| split_cstr(&body[1..]))
            .flatten()
            .filter(|(name, _)| !name.is_empty())
            .and_then(|(name, _)| self.server_statement(name, conn, to_server));
        match renamed {
            Some(server) => {
                let mut b = vec![b'S'];
                push_cstr(&mut b, server.as_bytes());
                to_server.extend_from_slice(&message::build(b'D', &b));
            }
            None => to_server.extend_from_slice(msg),
        }
        self.queue.push_back(Expect::Forwarded(kind));
        self.unsynced = true;
    }

    pub(super) fn close(
        &mut self,
        msg: &[u8],
        body: &[u8],
        to_server: &mut Vec<u8>,
        to_client: &mut Vec<u8>,
    ) {
        self.unsynced = true;
        if body.first() == Some(&b'S') {
            if let Some((name, _)) = split_cstr(&body[1..]).filter(|(n, _)| !n.is_empty()) {
                // The server keeps it for whoever prepares the same text;
                // the client's name is gone, and PostgreSQL answers a Close
                // of an unknown name with CloseComplete too.
                self.statements.remove(name);
                self.owe(message::build(b'3', &[]), None, to_client);
                return;
            }
        }
        self.forward(msg, to_server, Some(Kind::Close));
    }

    /// Makes the server fail at this point of the batch (a Bind to a
    /// statement nobody has), and answers with `error` in its place.
    fn refuse(&mut self, error: Vec<u8>, to_server: &mut Vec<u8>) {
        let mut b = Vec::new();
        push_cstr(&mut b, b"");
        push_cstr(&mut b, no_such_statement().as_bytes());
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        to_server.extend_from_slice(&message::build(b'B', &b));
        self.queue.push_back(Expect::Refused { error });
        self.unsynced = true;
    }
}
