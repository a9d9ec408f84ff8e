//! A pooled client's session settings, kept by pgbastion so any server
//! connection can be switched to them: `[forward]`'s values (the client's
//! identity, which it cannot change), the StartupMessage's parameters as
//! the server would have taken them at connect time, and the `SET`s the
//! client ran since, replayed as it wrote them.
//!
//! Switching is up to three simple Queries pipelined before the client's
//! first message, each its own implicit transaction, so a failure in one
//! cannot undo an earlier one: `RESET ALL` with the forwarded values
//! (which cannot fail: the identity is in place first), the startup values
//! with `set_config` (which takes a value as a StartupMessage or `options`
//! does, so `search_path=a,b` means two schemas), then the client's `SET`s
//! in order. Two clients with the same settings share connections without
//! any switch.

use std::collections::BTreeMap;

use super::classify::Change;

/// Distinct settings a client may change with `SET` before it is pinned
/// instead (bounds the memory and the switch query per client).
pub(crate) const MAX_SETS: usize = 100;

/// Startup parameters that are not settings.
const NOT_SETTINGS: &[&str] = &["user", "database", "options", "replication"];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SessionSettings {
    /// `[forward]`'s values (the client's identity): applied first, in a
    /// query of their own that cannot fail, and never the client's to
    /// change.
    pub forwarded: BTreeMap<String, String>,
    /// Name → value, from the StartupMessage (its `options` `-c`s
    /// included): a direct connection's reset values.
    pub startup: BTreeMap<String, String>,
    /// `SET` statements the client ran, one per setting (the last), in
    /// the order they were run.
    pub sets: Vec<(String, String)>,
}

/// What a change to the settings asks of the server connection it ran on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Followed {
    /// The server connection now has exactly these settings.
    Yes,
    /// A `RESET` took a setting to the server's default, not the client's
    /// startup value: the connection must be switched again.
    NeedsSwitch,
    /// More than `MAX_SETS` settings.
    TooMany,
}

impl SessionSettings {
    /// The settings a StartupMessage's parameters give; `protected`
    /// names (lower case) are `[forward]`'s, taken only from the top-level
    /// parameters pgbastion set, never from the client's `options`.
    pub fn from_startup(
        params: &[(String, String)],
        default_encoding: Option<&str>,
        protected: &[String],
    ) -> Self {
        let mut startup = BTreeMap::new();
        let mut forwarded = BTreeMap::new();
        let is_protected = |n: &str| protected.iter().any(|p| p == n);
        for (name, value) in params {
            let lower = name.to_ascii_lowercase();
            if lower == "options" {
                for (n, v) in parse_options(value) {
                    let n = n.to_ascii_lowercase();
                    if !is_protected(&n) {
                        startup.insert(n, v);
                    }
                }
            } else if is_protected(&lower) {
                forwarded.insert(lower, value.clone());
            } else if !NOT_SETTINGS.contains(&lower.as_str()) && !lower.starts_with("_pq_.") {
                startup.insert(lower, value.clone());
            }
        }
        // RESET ALL leaves client_encoding alone: every client names its
        // own, so one client's never stays for the next.
        if let Some(enc) = default_encoding {
            startup
                .entry("client_encoding".to_owned())
                .or_insert_with(|| enc.to_owned());
        }
        SessionSettings {
            forwarded,
            startup,
            sets: Vec::new(),
        }
    }

    /// The client's own values of the settings the server reports (those
    /// in `reported`), for a login answered without a connection: what
    /// the server would have said, as the client wrote them (the first
    /// switch then reports the server's spelling, if it differs).
    pub fn reported_values(&self, reported: &BTreeMap<String, String>) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (name, value) in self.startup.iter().chain(self.forwarded.iter()) {
            // Reported names keep the server's case (TimeZone, DateStyle).
            if let Some(server_name) = reported.keys().find(|k| k.eq_ignore_ascii_case(name)) {
                out.push((server_name.clone(), value.clone()));
            }
        }
        out
    }

    /// Applies the changes a statement made (after it succeeded).
    pub fn apply(&mut self, changes: &[Change]) -> Followed {
        let mut followed = Followed::Yes;
        for change in changes {
            match change {
                Change::Set { name, statement } => {
                    self.sets.retain(|(n, _)| n != name);
                    self.sets.push((name.clone(), statement.clone()));
                }
                Change::Reset { name } => {
                    self.sets.retain(|(n, _)| n != name);
                    if self.startup.contains_key(name) {
                        followed = Followed::NeedsSwitch;
                    }
                }
                Change::ResetAll => {
                    self.sets.clear();
                    followed = Followed::NeedsSwitch;
                }
            }
        }
        if self.sets.len() > MAX_SETS {
            return Followed::TooMany;
        }
        followed
    }

    /// The simple Queries that switch a server connection to these
    /// settings from any others, each its own implicit transaction (a
    /// failure in one cannot undo an earlier one): `RESET ALL` with the
    /// forwarded values, which cannot fail, so the identity is in place
    /// whatever follows; the startup values; the client's `SET`s.
    pub fn switch_sql(&self) -> Vec<String> {
        // RESET ALL leaves the role alone; nothing a client did should
        // reach this point with one set (it pins), but no client's role
        // ever reaches another.
        let mut queries = vec![format!(
            "RESET ALL;RESET SESSION AUTHORIZATION;RESET ROLE;{}",
            set_configs(&self.forwarded)
        )];
        if !self.startup.is_empty() {
            queries.push(set_configs(&self.startup));
        }
        // Each SET a query of its own, as the client sent it alone: joined,
        // one statement's quotes could run into the next (its reading
        // depends on standard_conforming_strings), and what was a string
        // in each could become code.
        for (_, statement) in &self.sets {
            queries.push(statement.clone());
        }
        queries
    }
}

/// `SELECT set_config(...), ...` for these values (empty for none).
pub(crate) fn set_configs(values: &BTreeMap<String, String>) -> String {
    if values.is_empty() {
        return String::new();
    }
    let mut sql = String::from("SELECT ");
    for (i, (name, value)) in values.iter().enumerate() {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("pg_catalog.set_config(");
        push_literal(&mut sql, name);
        sql.push(',');
        push_literal(&mut sql, value);
        sql.push_str(",false)");
    }
    sql
}

/// A dollar-quoted literal, whose meaning no setting (not even
/// `standard_conforming_strings`) can change.
fn push_literal(sql: &mut String, value: &str) {
    // The body ends at the first occurrence of the tag: pick one that
    // first occurs where the body ends (`x$pgb` + `$pgb$` would end early).
    let mut n = 0;
    let tag = loop {
        let tag = if n == 0 {
            "$pgb$".to_owned()
        } else {
            format!("$pgb{n}$")
        };
        if format!("{value}{tag}").find(&tag) == Some(value.len()) {
            break tag;
        }
        n += 1;
    };
    sql.push_str(&tag);
    sql.push_str(value);
    sql.push_str(&tag);
}

/// The `-c name=value` and `--name=value` settings of a StartupMessage's
/// `options`, read as the server does: words split at spaces, a backslash
/// keeps the next character.
pub(crate) fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut words = words.into_iter();
    while let Some(w) = words.next() {
        let setting = if w == "-c" {
            words.next()
        } else if let Some(rest) = w.strip_prefix("-c") {
            Some(rest.to_owned())
        } else {
            w.strip_prefix("--").map(str::to_owned)
        };
        if let Some((name, value)) = setting.as_deref().and_then(|s| s.split_once('=')) {
            // The server takes '-' in a name as '_'.
            out.push((name.replace('-', "_"), value.to_owned()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_read_as_the_server_reads_them() {
        assert_eq!(
            parse_options(r"-c search_path=a,b --statement-timeout=5s -cwork_mem=1MB -c x.y=a\ b"),
            vec![
                ("search_path".to_owned(), "a,b".to_owned()),
                ("statement_timeout".to_owned(), "5s".to_owned()),
                ("work_mem".to_owned(), "1MB".to_owned()),
                ("x.y".to_owned(), "a b".to_owned()),
            ]
        );
        assert!(parse_options("-c").is_empty());
        assert!(parse_options("-c noequals -d 1").is_empty());
    }

    #[test]
    fn startup_parameters_become_settings_and_the_protocol_keys_do_not() {
        let params = vec![
            ("user".to_owned(), "alice".to_owned()),
            ("database".to_owned(), "db".to_owned()),
            ("application_name".to_owned(), "app".to_owned()),
            ("options".to_owned(), "-c search_path=s".to_owned()),
            ("_pq_.x".to_owned(), "1".to_owned()),
        ];
        let s = SessionSettings::from_startup(&params, Some("UTF8"), &[]);
        let names: Vec<_> = s.startup.keys().cloned().collect();
        assert_eq!(
            names,
            ["application_name", "client_encoding", "search_path"]
        );
        assert!(s.forwarded.is_empty());
    }

    #[test]
    fn forwarded_values_come_from_pgbastion_never_from_options() {
        let params = vec![
            ("user".to_owned(), "alice".to_owned()),
            (
                "options".to_owned(),
                "-c pgbastion.identity=mallory".to_owned(),
            ),
            (
                "pgbastion.identity".to_owned(),
                "alice@example.com".to_owned(),
            ),
            (
                "options".to_owned(),
                "-c PGBASTION.IDENTITY=mallory".to_owned(),
            ),
        ];
        let protected = ["pgbastion.identity".to_owned()];
        let s = SessionSettings::from_startup(&params, None, &protected);
        assert_eq!(s.forwarded["pgbastion.identity"], "alice@example.com");
        assert!(!s.startup.contains_key("pgbastion.identity"));
        let queries = s.switch_sql();
        assert_eq!(queries.len(), 1);
        assert!(
            queries[0].starts_with(
                "RESET ALL;RESET SESSION AUTHORIZATION;RESET ROLE;SELECT pg_catalog.set_config($pgb$pgbastion.identity$pgb$,$pgb$alice@example.com$pgb$,false)"
            ),
            "{queries:?}"
        );
    }

    #[test]
    fn switch_sql_quotes_values_so_nothing_can_break_out() {
        let mut s = SessionSettings::default();
        s.startup
            .insert("a".into(), "x$pgb$;DROP TABLE t;$pgb$".into());
        s.startup.insert("b".into(), "ends$".into());
        s.startup.insert("c".into(), "x$pgb".into());
        let queries = s.switch_sql();
        assert_eq!(
            queries[0],
            "RESET ALL;RESET SESSION AUTHORIZATION;RESET ROLE;"
        );
        let sql = &queries[1];
        assert!(sql.starts_with("SELECT pg_catalog.set_config($pgb$a$pgb$,"));
        assert!(
            sql.contains("$pgb1$x$pgb$;DROP TABLE t;$pgb$$pgb1$"),
            "{sql}"
        );
        assert!(sql.contains("$pgb$ends$$pgb$"), "{sql}");
        assert!(sql.contains("$pgb1$x$pgb$pgb1$"), "{sql}");
    }

    #[test]
    fn sets_keep_the_last_per_name_and_resets_ask_for_a_switch() {
        let mut s = SessionSettings::default();
        s.startup.insert("search_path".into(), "a".into());
        let set = |n: &str, st: &str| Change::Set {
            name: n.into(),
            statement: st.into(),
        };
        assert_eq!(
            s.apply(&[
                set("x", "SET x=1"),
                set("y", "SET y=1"),
                set("x", "SET x=2")
            ]),
            Followed::Yes
        );
        assert_eq!(
            s.sets,
            vec![
                ("y".into(), "SET y=1".into()),
                ("x".into(), "SET x=2".into())
            ]
        );
        assert_eq!(
            s.apply(&[Change::Reset { name: "y".into() }]),
            Followed::Yes
        );
        assert_eq!(
            s.apply(&[Change::Reset {
                name: "search_path".into()
            }]),
            Followed::NeedsSwitch
        );
        assert_eq!(s.apply(&[Change::ResetAll]), Followed::NeedsSwitch);
        assert!(s.sets.is_empty());
        let many: Vec<_> = (0..=MAX_SETS)
            .map(|i| set(&format!("s.n{i}"), "SET s.n=1"))
            .collect();
        assert_eq!(s.apply(&many), Followed::TooMany);
    }
}
