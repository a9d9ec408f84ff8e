//! What the server holds by name: prepared statements and portals, as the
//! server has them, not as the client asked for them. A Parse, Bind or
//! Close takes effect only on its answer (ParseComplete, BindComplete,
//! CloseComplete): one the server refuses (a duplicate name, a syntax
//! error) or skips (after an earlier error, up to Sync) changes nothing.
//! A portal keeps the statement it was bound to, as it was at its Bind
//! (the server's portal does: replacing or closing the statement later
//! does not change what the portal runs). Portals end with their
//! transaction. A portal the audit does not know (a cursor DECLAREd in
//! SQL, one forgotten past the bounds) is recorded as unknown, never as
//! another statement's text.

use super::*;

/// Statement and portal names longer than this are not kept (their
/// statements are recorded as unknown): real names are short.
pub(super) const MAX_NAME: usize = 256;

/// A statement or portal name as kept: None when over `MAX_NAME` or not
/// UTF-8 (never kept, so never matched: in a client encoding such as
/// LATIN1, `\xff` and `\xfe` are two names to the server, and a lossy
/// conversion would make them one here).
pub(super) type Name = Option<String>;

pub(super) fn name(raw: &[u8]) -> Name {
    if raw.len() > MAX_NAME {
        return None;
    }
    std::str::from_utf8(raw).ok().map(str::to_owned)
}

/// A portal: the statement it was bound to, captured at its Bind.
#[derive(Debug, Clone)]
pub(super) struct Bound {
    /// The prepared statement's name ("" when it is unknown).
    pub(super) name: String,
    pub(super) statement: Statement,
    /// Bytes of `MAX_HELD` it counts for: none while its statement's text
    /// is the prepared statement's (shared, counted there); the text's
    /// length once that is gone (see `forget`).
    pub(super) held: usize,
}

/// An extended-protocol message that is not a statement, awaiting its
/// answer. Its change applies when the answer comes.
#[derive(Debug)]
pub(super) enum Step {
    Parse { name: Name, statement: Statement },
    Bind { portal: Name, statement: Name },
    Describe,
    Close { portal: bool, name: Name },
}

impl Step {
    /// Bytes this step counts for against `MAX_STEPS`.
    pub(super) fn cost(&self) -> usize {
        let names = match self {
            Step::Parse { name, .. } | Step::Close { name, .. } => {
                name.as_ref().map_or(0, |n| n.len())
            }
            Step::Bind { portal, statement } => {
                portal.as_ref().map_or(0, |n| n.len()) + statement.as_ref().map_or(0, |n| n.len())
            }
            Step::Describe => 0,
        };
        std::mem::size_of::<Step>() + names
    }

    /// The answer that completes it ('1', '2', '3'; Describe's are 'T' or
    /// 'n').
    pub(super) fn answer(&self) -> u8 {
        match self {
            Step::Parse { .. } => b'1',
            Step::Bind { .. } => b'2',
            Step::Close { .. } => b'3',
            Step::Describe => b'T',
        }
    }
}

/// What the client asked for in a run the server skips (after an error,
/// up to Sync): the statements in it are recorded as the client meant
/// them (not executed), while the server's names stay as they were.
#[derive(Default)]
pub(super) struct Overlay {
    /// None: closed in the skipped run.
    prepared: HashMap<String, Option<Statement>>,
    portals: HashMap<String, Option<Bound>>,
    /// Bytes of `MAX_HELD` its statements count for (kept until the run
    /// ends: its portals may share them).
    held: usize,
    /// Too many names: every statement of the run is unknown.
    full: bool,
}

impl QueryTracker {
    /// The prepared statement `name` as the server has it (with the
    /// skipped run's changes, while there is one).
    fn prepared_now(&self, name: Option<&str>) -> Option<Statement> {
        let name = name?;
        if let Some(o) = &self.overlay {
            if let Some(s) = o.prepared.get(name) {
                return s.clone();
            }
        }
        self.prepared.get(name).cloned()
    }

    /// The statement an Execute of `portal` runs, and its prepared
    /// statement's name: Unknown (and no name) for a portal the audit
    /// does not know.
    pub(super) fn resolve(&self, portal: Option<&str>) -> (Statement, String) {
        let unknown = (Statement::Unknown, String::new());
        let Some(portal) = portal else {
            return unknown;
        };
        let bound = match &self.overlay {
            Some(o) if o.full => return unknown,
            Some(o) => match o.portals.get(portal) {
                Some(b) => b.as_ref(),
                None => self.portals.get(portal),
            },
            None => self.portals.get(portal),
        };
        bound.map_or(unknown, |b| (b.statement.clone(), b.name.clone()))
    }

    /// The portal a Bind creates, its statement captured now.
    fn bound(&self, statement: Option<&str>) -> Bound {
        match self.prepared_now(statement) {
            Some(s) if !matches!(s, Statement::Unknown) => Bound {
                name: statement.unwrap_or_default().to_owned(),
                statement: s,
                held: 0,
            },
            _ => Bound {
                name: String::new(),
                statement: Statement::Unknown,
                held: 0,
            },
        }
    }

    /// The server answered `step`: what it did takes effect.
    pub(super) fn apply(&mut self, step: Step) {
        match step {
            Step::Parse { name, statement } => match name {
                Some(n) if self.prepared.len() < MAX_NAMES || self.prepared.contains_key(&n) => {
                    let old = self.prepared.insert(n, statement);
                    self.forget(old);
                }
                _ => self.forget(Some(statement)),
            },
            Step::Bind { portal, statement } => {
                let Some(p) = portal else { return };
                if self.portals.len() < MAX_NAMES || self.portals.contains_key(&p) {
                    let b = self.bound(statement.as_deref());
                    let old = self.portals.insert(p, b);
                    self.forget_portal(old);
                }
            }
            Step::Close {
                portal,
                name: Some(n),
            } => {
                if portal {
                    let old = self.portals.remove(&n);
                    self.forget_portal(old);
                } else {
                    let old = self.prepared.remove(&n);
                    self.forget(old);
                }
            }
            Step::Close { name: None, .. } | Step::Describe => {}
        }
    }

    /// `step` is skipped by the server: it changes only the skipped run's
    /// view (what its statements meant).
    pub(super) fn overlay(&mut self, step: Step) {
        let mut o = self.overlay.take().unwrap_or_default();
        match step {
            Step::Parse { name, statement } => {
                if let Statement::Text(t) = &statement {
                    o.held += t.len();
                }
                if let Some(n) = name {
                    o.full |= o.prepared.len() >= MAX_NAMES && !o.prepared.contains_key(&n);
                    if !o.full {
                        o.prepared.insert(n, Some(statement));
                    }
                }
            }
            Step::Bind { portal, statement } => {
                self.overlay = Some(o);
                let b = self.bound(statement.as_deref());
                o = self.overlay.take().unwrap_or_default();
                if let Some(p) = portal {
                    o.full |= o.portals.len() >= MAX_NAMES && !o.portals.contains_key(&p);
                    if !o.full {
                        o.portals.insert(p, Some(b));
                    }
                }
            }
            Step::Close {
                portal,
                name: Some(n),
            } => {
                if portal {
                    o.full |= o.portals.len() >= MAX_NAMES && !o.portals.contains_key(&n);
                    if !o.full {
                        o.portals.insert(n, None);
                    }
                } else {
                    o.full |= o.prepared.len() >= MAX_NAMES && !o.prepared.contains_key(&n);
                    if !o.full {
                        o.prepared.insert(n, None);
                    }
                }
            }
            Step::Close { name: None, .. } | Step::Describe => {}
        }
        self.overlay = Some(o);
    }

    /// The skipped run is over (its Sync): its view goes.
    pub(super) fn end_overlay(&mut self) {
        if let Some(o) = self.overlay.take() {
            self.held = self.held.saturating_sub(o.held);
        }
    }

    /// ReadyForQuery: outside a transaction block (status 'I') every
    /// portal is gone: the server drops them at transaction end.
    pub(super) fn ready(&mut self, status: Option<u8>) {
        if status == Some(b'I') {
            self.forget_portals();
        }
    }

    /// A simple query replaces the unnamed statement and the unnamed
    /// portal (postgres.c's exec_simple_query drops both).
    pub(super) fn simple_query_ran(&mut self) {
        let s = self.prepared.remove("");
        self.forget(s);
        let p = self.portals.remove("");
        self.forget_portal(p);
    }

    /// A statement completed with `command` (its tag): SQL that creates,
    /// drops or (by rolling back) loses prepared statements or cursors
    /// behind the protocol's back makes the audit forget the named ones
    /// (their Executes are then unknown, never another statement's text).
    /// So does code run on the server (`DO`, `CALL`, a function-call
    /// message): PL/pgSQL can `EXECUTE 'deallocate ...'` and re-prepare a
    /// name, or close and reopen a portal through a refcursor of its name.
    /// SQL cannot name the unnamed statement; a rollback to a savepoint
    /// may drop the unnamed portal too.
    pub(super) fn completed(&mut self, command: Option<&str>) {
        let Some(command) = command else { return };
        let statements = matches!(
            command,
            "PREPARE" | "DEALLOCATE" | "DEALLOCATE ALL" | "DISCARD ALL" | "DO" | "CALL"
        );
        let portals = statements
            || matches!(
                command,
                "DECLARE CURSOR" | "CLOSE CURSOR" | "CLOSE CURSOR ALL" | "ROLLBACK"
            );
        if statements {
            let named: Vec<String> = self
                .prepared
                .keys()
                .filter(|k| !k.is_empty())
                .cloned()
                .collect();
            for n in named {
                let s = self.prepared.remove(&n);
                self.forget(s);
            }
        }
        if portals {
            self.forget_portals();
        }
    }

    fn forget_portals(&mut self) {
        let gone: Vec<Bound> = self.portals.drain().map(|(_, b)| b).collect();
        for b in gone {
            self.forget_portal(Some(b));
        }
    }

    /// A portal is gone: the text it counted for is given back, or passes
    /// to another portal that holds it.
    pub(super) fn forget_portal(&mut self, b: Option<Bound>) {
        if let Some(b) = b.filter(|b| b.held > 0) {
            self.forget(Some(b.statement));
        }
    }

    /// A text is no longer held by what counted for it: a portal that
    /// still holds it counts for it now (each text is counted once, by
    /// one holder), or its bytes are given back.
    pub(super) fn forget(&mut self, s: Option<Statement>) {
        let Some(Statement::Text(t)) = s else { return };
        let heir = self.portals.values_mut().find(|b| {
            b.held == 0 && matches!(&b.statement, Statement::Text(u) if Arc::ptr_eq(u, &t))
        });
        match heir {
            Some(b) => b.held = t.len(),
            None => self.held = self.held.saturating_sub(t.len()),
        }
    }
}
