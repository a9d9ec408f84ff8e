//! What a SQL text does to session state, for a pooler that hands each
//! transaction to whichever server connection is free: the session
//! settings it changes (re-applied on the next server connection), the
//! first statement that creates state no other connection has (the client
//! is then pinned to this one), and the first attempt to change a
//! protected setting (pgbastion's forwarded identity settings), which the
//! session refuses with 42501 before the server sees it.
//!
//! It reads tokens, not a parse tree: the lexer is the query audit's
//! ([`crate::audit::normalize::lex`]), which follows PostgreSQL's token
//! rules exactly, so nothing inside a string, a dollar quote or a comment
//! is taken for code, and a quoted word (`"listen"`) is a name, never a
//! keyword. Statements are split at top-level `;`.
//!
//! A plain string's backslashes read as the session's
//! standard_conforming_strings says, which a proxy cannot know for
//! certain, so the text is read both ways, and again with every backslash
//! after a non-ASCII byte taken as part of a character (as SJIS, BIG5,
//! GBK, UHC, JOHAB and GB18030 client encodings read it). Readings that
//! disagree are merged on the safe side (see [`classify`]).
//!
//! What it cannot see: what functions, `DO` blocks, rules and views do
//! when they run (a `DO` body calling `set_config` on a protected name, a
//! function that `LISTEN`s). A `set_config` call on a name that is not
//! protected is not a [`Change`]: such a setting is not carried to the
//! next server connection.
//!
//! Pure, and fuzzed (`fuzz/fuzz_targets/classify.rs`).

use crate::audit::event::PinReason;
use crate::audit::normalize::{lex, Backslashes, Kind, Lexeme, Literal};

/// A session-level settings change, to re-apply on another server
/// connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `SET [SESSION] name {TO|=} ...` and the special forms (`SET TIME
    /// ZONE` -> "timezone", `SET NAMES` -> "client_encoding", `SET SCHEMA`
    /// -> "search_path", `SET XML OPTION` -> "xmloption", `SET SESSION
    /// CHARACTERISTICS AS TRANSACTION ...` -> "session_characteristics"):
    /// replay `statement`, the exact source text of that one statement
    /// (comments inside it stay; no trailing `;`). `name`: the setting's
    /// name, lowercased, quotes removed, parts joined by '.'.
    Set { name: String, statement: String },
    /// `RESET name`, `SET name TO DEFAULT`, `SET name = DEFAULT`.
    Reset { name: String },
    /// `RESET ALL`, `DISCARD ALL`.
    ResetAll,
}

/// What a text does to session state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// Session-level changes, in statement order (`SET LOCAL`, `SET
    /// TRANSACTION`, `SET CONSTRAINTS` are not changes).
    pub changes: Vec<Change>,
    /// The first statement that pins, if any.
    pub pin: Option<PinReason>,
    /// The first protected setting a statement tries to change, as the
    /// `protected` list spells it; or "set_config" when what is changed
    /// could be anything: a `set_config(...)` call whose first argument is
    /// not a lone string literal, an `UPDATE` of `pg_settings` (its rule
    /// calls set_config), a setting name that cannot be decoded.
    pub forbidden: Option<String>,
    /// Statements seen (top-level `;`-separated, empty ones not counted).
    pub statements: usize,
}

/// What `sql` (a simple Query's text, or a Parse's) does to session
/// state; `protected` are the settings clients may not change (compared
/// case-insensitively; empty: nothing is forbidden).
///
/// The text is read every way the server might read it (see the module
/// doc). When every reading ends where a token does and they agree, that
/// is the answer. When they disagree, the answer is the first reading's,
/// with `forbidden` set if any reading's is, the first pin any reading
/// has, and [`PinReason::Unclear`] if their changes differ. When some
/// reading does not end (an unterminated string: the server rejects the
/// whole text if it reads it that way), no changes are reported, and the
/// session is pinned (`Unclear`) if another reading changes or pins
/// anything, since the server may read it that way instead.
pub fn classify(sql: &str, protected: &[String]) -> Effects {
    let mut readings = Vec::with_capacity(4);
    let neutral = neutralized(sql);
    for text in std::iter::once(sql).chain(neutral.as_deref()) {
        for mode in [Backslashes::Literal, Backslashes::Escape] {
            readings.push(
                lex(text, mode)
                    .ok()
                    .map(|lexemes| analyze(sql, text, &lexemes, protected)),
            );
        }
    }
    merge(readings)
}

/// `sql` with every backslash right after a non-ASCII byte replaced by
/// `_` (a byte that starts and escapes nothing, and continues an
/// identifier as a multibyte character does): the reading of a client
/// encoding whose characters may end in 0x5C. None when there is none.
fn neutralized(sql: &str) -> Option<String> {
    let b = sql.as_bytes();
    if !b.windows(2).any(|w| w[0] >= 0x80 && w[1] == b'\\') {
        return None;
    }
    let mut out = b.to_vec();
    for i in 1..out.len() {
        if b[i] == b'\\' && b[i - 1] >= 0x80 {
            out[i] = b'_';
        }
    }
    // Only ASCII bytes were replaced by ASCII bytes.
    String::from_utf8(out).ok()
}

/// The readings' effects merged on the safe side (see [`classify`]).
fn merge(readings: Vec<Option<Effects>>) -> Effects {
    let failed = readings.iter().any(Option::is_none);
    let ok: Vec<Effects> = readings.into_iter().flatten().collect();
    let Some(first) = ok.first() else {
        return Effects::default();
    };
    let forbidden = ok.iter().find_map(|e| e.forbidden.clone());
    if failed {
        let acts = ok.iter().any(|e| e.pin.is_some() || !e.changes.is_empty());
        return Effects {
            changes: Vec::new(),
            pin: acts.then_some(PinReason::Unclear),
            forbidden,
            statements: first.statements,
        };
    }
    let mut pin = ok.iter().find_map(|e| e.pin);
    if ok.iter().any(|e| e.changes != first.changes) {
        pin = Some(PinReason::Unclear);
    }
    Effects {
        changes: first.changes.clone(),
        pin,
        forbidden,
        statements: first.statements,
    }
}

/// One reading's effects: `text` is what was lexed (`sql`, or its
/// neutralized copy, byte for byte the same length); statements replayed
/// are sliced from `sql`.
fn analyze(sql: &str, text: &str, lexemes: &[Lexeme], protected: &[String]) -> Effects {
    let code: Vec<Lexeme> = lexemes
        .iter()
        .filter(|l| !matches!(l.kind, Kind::Space | Kind::Comment))
        .copied()
        .collect();
    let mut acc = Acc {
        protected,
        effects: Effects::default(),
    };
    for t in code.split(|l| l.kind == Kind::Punct && text.as_bytes()[l.start] == b';') {
        let (Some(first), Some(last)) = (t.first(), t.last()) else {
            continue;
        };
        acc.effects.statements += 1;
        let s = Stmt {
            text,
            t,
            source: sql.get(first.start..last.end).unwrap_or_default(),
        };
        s.classify(&mut acc);
    }
    acc.effects
}

/// Effects being gathered, first pin and first forbidden name kept.
struct Acc<'a> {
    protected: &'a [String],
    effects: Effects,
}

impl Acc<'_> {
    fn pin(&mut self, why: PinReason) {
        self.effects.pin.get_or_insert(why);
    }

    fn change(&mut self, c: Change) {
        self.effects.changes.push(c);
    }

    /// Forbidden when `name` (folded) is protected; whether it is.
    fn check(&mut self, name: &str) -> bool {
        let found = self.protected.iter().find(|p| p.eq_ignore_ascii_case(name));
        if let Some(p) = found {
            self.forbid(p.clone());
        }
        found.is_some()
    }

    /// Forbidden whatever the list holds: what is changed could be any
    /// setting. With nothing protected, it still could be `role`: the
    /// client is pinned.
    fn check_unknown(&mut self) {
        if self.protected.is_empty() {
            self.pin(PinReason::Unclear);
        } else {
            self.forbid("set_config".to_owned());
        }
    }

    fn forbid(&mut self, what: String) {
        self.effects.forbidden.get_or_insert(what);
    }
}

/// The functions whose session-level lock outlives the transaction.
const ADVISORY_LOCKS: &[&str] = &[
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];

/// What a SET or RESET statement (or form) does with a setting.
enum Action {
    Set,
    Reset,
    FromCurrent,
    Nothing,
}

/// One statement: its code tokens (no whitespace or comments), the text
/// they index, and its source text.
struct Stmt<'a> {
    text: &'a str,
    t: &'a [Lexeme],
    source: &'a str,
}

impl Stmt<'_> {
    fn classify(&self, acc: &mut Acc) {
        match self.word(0).as_deref() {
            Some("set") => self.set(acc),
            Some("reset") => self.reset(acc),
            Some("discard") if self.is(1, "all") => acc.change(Change::ResetAll),
            Some("listen") => acc.pin(PinReason::Listen),
            Some("prepare") if !(self.is(1, "transaction") && self.is_string(2)) => {
                acc.pin(PinReason::SqlPrepare)
            }
            Some("declare") => self.declare(acc),
            Some("load") => acc.pin(PinReason::Load),
            Some("do") => acc.pin(PinReason::DoBlock),
            Some("create") => self.create(acc),
            Some("alter") if self.is_routine(1) => self.routine_settings(acc),
            _ => {}
        }
        self.scan(acc);
    }

    /// What any statement may hold: calls, `INTO TEMP`, `UPDATE
    /// pg_settings`.
    fn scan(&self, acc: &mut Acc) {
        let mut update = false;
        let mut settings = false;
        for k in 0..self.t.len() {
            update |= self.is(k, "update");
            let Some((name, next)) = self.name_at(k) else {
                continue;
            };
            let name = name.unwrap_or_default();
            settings |= name == "pg_settings";
            if self.punct(next, b'(') {
                if ADVISORY_LOCKS.contains(&name.as_str()) {
                    acc.pin(PinReason::AdvisoryLock);
                } else if name == "set_config" {
                    self.set_config(next, acc);
                }
            }
            if self.is(k, "into")
                && !(k > 0 && (self.is(k - 1, "insert") || self.is(k - 1, "merge")))
                && self.temp_target(k + 1)
            {
                acc.pin(PinReason::TempObject);
            }
        }
        if update && settings {
            acc.check_unknown();
        }
    }

    /// `set_config(` with its `(` at `open`: forbidden when its first
    /// argument is a protected name, or not a lone string literal.
    fn set_config(&self, open: usize, acc: &mut Acc) {
        if !self.punct(open + 2, b',') {
            return acc.check_unknown();
        }
        match self.string(open + 1) {
            Some(name) => {
                acc.check(&name);
                // RESET ALL leaves these alone: only a pin keeps them from
                // the next client.
                if name.eq_ignore_ascii_case("role") {
                    acc.pin(PinReason::SetRole);
                } else if name.eq_ignore_ascii_case("session_authorization") {
                    acc.pin(PinReason::SessionAuthorization);
                }
            }
            None => acc.check_unknown(),
        }
    }

    /// After `INTO` at `k - 1`: a temporary table's name follows.
    fn temp_target(&self, k: usize) -> bool {
        let k = k + usize::from(self.is(k, "local") || self.is(k, "global"));
        if self.is(k, "temp") || self.is(k, "temporary") {
            return true;
        }
        let k = k + usize::from(self.is(k, "table"));
        self.temp_schema_at(k)
    }

    /// A `pg_temp.` (or `pg_temp_N.`) qualification at `k`.
    fn temp_schema_at(&self, k: usize) -> bool {
        matches!(self.name_at(k), Some((Some(n), next))
            if n.starts_with("pg_temp") && self.punct(next, b'.'))
    }

    fn set(&self, acc: &mut Acc) {
        let mut k = 1;
        let mut local = false;
        let session_form = self.is(2, "authorization") || self.is(2, "characteristics");
        if (self.is(1, "local") || (self.is(1, "session") && !session_form)) && !self.assigns(2) {
            local = self.is(1, "local");
            k = 2;
        }
        let (name, action) = if self.is(k, "transaction") && !self.assigns(k + 1) {
            return;
        } else if self.is(k, "session") && self.is(k + 1, "authorization") {
            ("session_authorization".to_owned(), Action::Set)
        } else if self.is(k, "session") && self.is(k + 1, "characteristics") {
            ("session_characteristics".to_owned(), Action::Set)
        } else if self.is(k, "role") && !self.assigns(k + 1) {
            ("role".to_owned(), Action::Set)
        } else if self.is(k, "time") && self.is(k + 1, "zone") {
            let default = self.is(k + 2, "default") || self.is(k + 2, "local");
            ("timezone".to_owned(), reset_if(default))
        } else if self.is(k, "names") && !self.assigns(k + 1) {
            let default = k + 1 == self.t.len() || self.is(k + 1, "default");
            ("client_encoding".to_owned(), reset_if(default))
        } else if self.is(k, "schema") && !self.assigns(k + 1) {
            ("search_path".to_owned(), Action::Set)
        } else if self.is(k, "xml") && self.is(k + 1, "option") {
            ("xmloption".to_owned(), Action::Set)
        } else {
            match self.dotted_name(k) {
                None => return,
                Some((None, _)) => return acc.check_unknown(),
                Some((Some(name), j)) => {
                    let action = if self.is(j, "to") || self.punct(j, b'=') {
                        reset_if(self.is(j + 1, "default"))
                    } else if self.is(j, "from") && self.is(j + 1, "current") {
                        Action::FromCurrent
                    } else {
                        Action::Nothing
                    };
                    (name, action)
                }
            }
        };
        // A refused statement changes nothing; a local one, nothing that
        // lasts.
        if acc.check(&name) || local {
            return;
        }
        match (name.as_str(), action) {
            ("role", Action::Set) => acc.pin(PinReason::SetRole),
            ("session_authorization", Action::Set) => acc.pin(PinReason::SessionAuthorization),
            ("role" | "session_authorization", _) | (_, Action::Nothing) => {}
            (_, Action::FromCurrent) => acc.pin(PinReason::Unclear),
            (_, Action::Reset) => acc.change(Change::Reset { name }),
            (_, Action::Set) => acc.change(Change::Set {
                name,
                statement: self.source.to_owned(),
            }),
        }
    }

    fn reset(&self, acc: &mut Acc) {
        let name = if self.is(1, "all") {
            return acc.change(Change::ResetAll);
        } else if self.is(1, "time") && self.is(2, "zone") {
            "timezone".to_owned()
        } else if self.is(1, "session") && self.is(2, "authorization") {
            "session_authorization".to_owned()
        } else if self.is(1, "transaction") && self.is(2, "isolation") {
            return;
        } else {
            match self.dotted_name(1) {
                None => return,
                Some((None, _)) => return acc.check_unknown(),
                Some((Some(name), _)) => name,
            }
        };
        if !acc.check(&name) && !matches!(name.as_str(), "role" | "session_authorization") {
            acc.change(Change::Reset { name });
        }
    }

    /// `DECLARE name [options] CURSOR WITH HOLD FOR ...`.
    fn declare(&self, acc: &mut Acc) {
        let mut k = 1;
        while k + 1 < self.t.len() && !self.is(k, "for") {
            if self.is(k, "with") && self.is(k + 1, "hold") {
                return acc.pin(PinReason::HoldCursor);
            }
            k += 1;
        }
    }

    /// `CREATE [OR REPLACE] [GLOBAL|LOCAL] TEMP|TEMPORARY ...`, or an
    /// object in (or reading from) `pg_temp`; a routine's SET clauses.
    fn create(&self, acc: &mut Acc) {
        let mut k = 1;
        if self.is(k, "or") && self.is(k + 1, "replace") {
            k += 2;
        }
        if self.is_routine(k) {
            self.routine_settings(acc);
        }
        k += usize::from(self.is(k, "global") || self.is(k, "local"));
        if self.is(k, "temp")
            || self.is(k, "temporary")
            || (k..self.t.len()).any(|j| self.temp_schema_at(j))
        {
            acc.pin(PinReason::TempObject);
        }
    }

    fn is_routine(&self, k: usize) -> bool {
        self.is(k, "function") || self.is(k, "procedure") || self.is(k, "routine")
    }

    /// A routine's `SET name {TO|=|FROM CURRENT}` clauses: a protected
    /// setting changed while the routine runs is as forbidden as one
    /// changed by the session (up to a `BEGIN ATOMIC` body).
    fn routine_settings(&self, acc: &mut Acc) {
        let mut k = 0;
        while k < self.t.len() && !self.is(k, "atomic") {
            if !self.is(k, "set") {
                k += 1;
                continue;
            }
            match self.dotted_name(k + 1) {
                Some((Some(name), j)) => {
                    let _ = acc.check(&name);
                    k = j;
                }
                Some((None, j)) => {
                    acc.check_unknown();
                    k = j;
                }
                None => k += 1,
            }
        }
    }

    /// Whether the token at `k` ends a setting's name: `TO`, `=`, `.`,
    /// `FROM`.
    fn assigns(&self, k: usize) -> bool {
        self.is(k, "to") || self.is(k, "from") || self.punct(k, b'=') || self.punct(k, b'.')
    }

    /// `name[.name...]` at `k`: the parts joined by `.` and lowercased
    /// (setting names are case-insensitive; None
    /// when a part cannot be decoded), and the index after it.
    fn dotted_name(&self, k: usize) -> Option<(Option<String>, usize)> {
        let (mut name, mut j) = self.name_at(k)?;
        while self.punct(j, b'.') {
            let (part, next) = self.name_at(j + 1)?;
            name = name.zip(part).map(|(a, b)| format!("{a}.{b}"));
            j = next;
        }
        Some((name.map(|n| n.to_ascii_lowercase()), j))
    }

    /// A name at `k`, as PostgreSQL folds it (a bare word lowercased, a
    /// quoted one as it is, a `U&"..."` one decoded; None when it cannot
    /// be), and the index after it.
    fn name_at(&self, k: usize) -> Option<(Option<String>, usize)> {
        let l = self.t.get(k)?;
        let raw = self.text.get(l.start..l.end)?;
        match l.kind {
            Kind::Ident if raw.eq_ignore_ascii_case("u") && self.unicode_ident(k) => {
                let body = self.quoted(k + 2)?;
                let (escape, next) = if self.is(k + 3, "uescape") {
                    (self.string(k + 4).and_then(single_char), k + 5)
                } else {
                    (Some('\\'), k + 3)
                };
                Some((escape.and_then(|e| unicode_unescape(&body, e)), next))
            }
            Kind::Ident => Some((Some(raw.to_ascii_lowercase()), k + 1)),
            Kind::QuotedIdent => Some((Some(self.quoted(k)?), k + 1)),
            _ => None,
        }
    }

    /// `U&"`: the `U` at `k`, `&` and a quoted identifier right after it.
    fn unicode_ident(&self, k: usize) -> bool {
        match (self.t.get(k), self.t.get(k + 1), self.t.get(k + 2)) {
            (Some(u), Some(amp), Some(q)) => {
                amp.kind == Kind::Punct
                    && self.text.as_bytes().get(amp.start) == Some(&b'&')
                    && q.kind == Kind::QuotedIdent
                    && u.end == amp.start
                    && amp.end == q.start
            }
            _ => false,
        }
    }

    /// The quoted identifier at `k`, unquoted.
    fn quoted(&self, k: usize) -> Option<String> {
        let l = self.t.get(k)?;
        let raw = self.text.get(l.start + 1..l.end.checked_sub(1)?)?;
        Some(raw.replace("\"\"", "\""))
    }

    /// The value of the string literal at `k`, in the simple forms; None
    /// for anything else (a continued string, `U&'...'`, an escape other
    /// than a quote or a character standing for itself).
    fn string(&self, k: usize) -> Option<String> {
        let l = self.t.get(k)?;
        let raw = self.text.get(l.start..l.end)?;
        match l.kind {
            Kind::Literal(Literal::Standard) => quoted_value(raw, false),
            Kind::Literal(Literal::Escape) => quoted_value(raw, true),
            Kind::Literal(Literal::Dollar) => {
                let tag = raw.get(1..)?.find('$')? + 2;
                raw.get(tag..raw.len().checked_sub(tag)?).map(str::to_owned)
            }
            _ => None,
        }
    }

    fn is_string(&self, k: usize) -> bool {
        matches!(self.t.get(k), Some(l) if matches!(l.kind, Kind::Literal(f) if f != Literal::Number))
    }

    /// The bare word at `k`, lowercased.
    fn word(&self, k: usize) -> Option<String> {
        let l = self.t.get(k).filter(|l| l.kind == Kind::Ident)?;
        Some(self.text.get(l.start..l.end)?.to_ascii_lowercase())
    }

    /// Whether the token at `k` is the keyword `kw` (lowercase; a bare
    /// word, not a quoted one).
    fn is(&self, k: usize, kw: &str) -> bool {
        matches!(self.t.get(k), Some(l) if l.kind == Kind::Ident
            && self.text.get(l.start..l.end).is_some_and(|w| w.eq_ignore_ascii_case(kw)))
    }

    fn punct(&self, k: usize, c: u8) -> bool {
        matches!(self.t.get(k), Some(l) if l.kind == Kind::Punct
            && self.text.as_bytes().get(l.start) == Some(&c))
    }
}

fn reset_if(default: bool) -> Action {
    if default {
        Action::Reset
    } else {
        Action::Set
    }
}

fn single_char(s: String) -> Option<char> {
    let mut chars = s.chars();
    let c = chars.next()?;
    chars.next().is_none().then_some(c)
}

/// The value of a one-part quoted string `raw` (its prefix letter, if
/// any, included): `''` is a quote; with `escapes`, a backslash before a
/// character that stands for itself is dropped, and any other escape
/// (`\n`, octal, hex, Unicode) gives None, as does a continuation.
fn quoted_value(raw: &str, escapes: bool) -> Option<String> {
    let body = &raw[raw.find('\'')? + 1..];
    let mut out = String::new();
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if escapes => match chars.next()? {
                'b' | 'f' | 'n' | 'r' | 't' | 'x' | 'u' | 'U' | '0'..='7' => return None,
                e => out.push(e),
            },
            '\'' => match chars.next() {
                Some('\'') => out.push('\''),
                Some(_) => return None,
                None => return Some(out),
            },
            c => out.push(c),
        }
    }
    None
}

/// A `U&"..."` identifier's body with its escapes (`\XXXX`, `\+XXXXXX`,
/// surrogate pairs, `\\`, `escape` standing for the backslash) decoded;
/// None when one is invalid (the server rejects it).
fn unicode_unescape(body: &str, escape: char) -> Option<String> {
    let mut out = String::new();
    let mut chars = body.chars().peekable();
    let mut high: Option<u32> = None;
    while let Some(c) = chars.next() {
        if c != escape {
            if high.is_some() {
                return None;
            }
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&escape) {
            chars.next();
            out.push(escape);
            continue;
        }
        let n = if chars.peek() == Some(&'+') {
            chars.next();
            6
        } else {
            4
        };
        let mut code = 0u32;
        for _ in 0..n {
            code = code * 16 + chars.next()?.to_digit(16)?;
        }
        match (high.take(), code) {
            (None, 0xD800..=0xDBFF) => high = Some(code),
            (Some(h), 0xDC00..=0xDFFF) => out.push(char::from_u32(
                0x10000 + ((h - 0xD800) << 10) + (code - 0xDC00),
            )?),
            (Some(_), _) => return None,
            (None, code) => out.push(char::from_u32(code)?),
        }
    }
    high.is_none().then_some(out)
}

#[cfg(test)]
mod tests;
