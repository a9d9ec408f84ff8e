//! The console's commands: `Command`, parsed from the text of one simple
//! Query. Pure (text in, a command or why not out), so every spelling is
//! unit-tested here.

use thiserror::Error;

/// What the console knows, as its error for anything else lists it.
pub(crate) const COMMANDS: &str = "SHOW SESSIONS, SHOW UPSTREAMS, SHOW LISTENERS, SHOW STATS, SHOW CERTIFICATES, SHOW VERSION, SHOW POOLS, SHOW SERVERS, SHOW CLIENTS, KILL '<session id>', RELOAD, PAUSE [upstream], RESUME [upstream], RECONNECT [upstream]";

/// One console command. Keywords are matched in any case and with any
/// whitespace between them; trailing semicolons are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command<'a> {
    ShowSessions,
    ShowUpstreams,
    ShowListeners,
    ShowStats,
    ShowCertificates,
    ShowVersion,
    /// The pools of every pooled upstream, one row per (database, user).
    ShowPools,
    /// The pools' server connections, counted by state.
    ShowServers,
    /// The sessions of pooled upstreams.
    ShowClients,
    /// `KILL '<session id>'`: the id as written (quotes optional), its case
    /// kept.
    Kill(&'a str),
    Reload,
    /// `PAUSE [upstream]`, `RESUME [upstream]`, `RECONNECT [upstream]`:
    /// the upstream's name as written (quotes optional, case kept); None:
    /// every pooled upstream.
    Pause(Option<&'a str>),
    Resume(Option<&'a str>),
    Reconnect(Option<&'a str>),
}

/// Text that is no command: the text as the console repeats it (trimmed,
/// trailing semicolons removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("unknown command \"{0}\"; the console knows {COMMANDS}")]
pub(crate) struct UnknownCommand<'a>(pub &'a str);

impl<'a> Command<'a> {
    pub(crate) fn parse(text: &'a str) -> Result<Command<'a>, UnknownCommand<'a>> {
        let text = text.trim().trim_end_matches(';').trim();
        let upper = text.to_ascii_uppercase();
        let words: Vec<&str> = upper.split_whitespace().collect();
        Ok(match words.as_slice() {
            ["SHOW", "SESSIONS"] => Command::ShowSessions,
            ["SHOW", "UPSTREAMS"] => Command::ShowUpstreams,
            ["SHOW", "LISTENERS"] => Command::ShowListeners,
            ["SHOW", "STATS"] => Command::ShowStats,
            ["SHOW", "CERTIFICATES"] => Command::ShowCertificates,
            ["SHOW", "VERSION"] => Command::ShowVersion,
            ["SHOW", "POOLS"] => Command::ShowPools,
            ["SHOW", "SERVERS"] => Command::ShowServers,
            ["SHOW", "CLIENTS"] => Command::ShowClients,
            ["KILL", _] => Command::Kill(argument(text, "KILL")),
            ["RELOAD"] => Command::Reload,
            ["PAUSE"] => Command::Pause(None),
            ["PAUSE", _] => Command::Pause(Some(name(text, "PAUSE"))),
            ["RESUME"] => Command::Resume(None),
            ["RESUME", _] => Command::Resume(Some(name(text, "RESUME"))),
            ["RECONNECT"] => Command::Reconnect(None),
            ["RECONNECT", _] => Command::Reconnect(Some(name(text, "RECONNECT"))),
            _ => return Err(UnknownCommand(text)),
        })
    }
}

/// The one word after `keyword`, as written (not upper-cased), single
/// quotes around it dropped. The keyword is ASCII and upper-casing only
/// changes ASCII, so it is the text's first `keyword.len()` bytes.
fn argument<'a>(text: &'a str, keyword: &str) -> &'a str {
    text.get(keyword.len()..)
        .unwrap_or("")
        .trim()
        .trim_matches('\'')
}

/// An upstream's name after a keyword: single or double quotes (an
/// identifier as psql users write it) dropped.
fn name<'a>(text: &'a str, keyword: &str) -> &'a str {
    argument(text, keyword).trim_matches('"')
}

#[cfg(test)]
mod tests {
    use super::Command::*;
    use super::*;

    fn parse(text: &str) -> Result<Command<'_>, UnknownCommand<'_>> {
        Command::parse(text)
    }

    #[test]
    fn every_command_in_every_case() {
        for (text, want) in [
            ("SHOW SESSIONS", ShowSessions),
            ("SHOW UPSTREAMS", ShowUpstreams),
            ("SHOW LISTENERS", ShowListeners),
            ("SHOW STATS", ShowStats),
            ("SHOW CERTIFICATES", ShowCertificates),
            ("SHOW VERSION", ShowVersion),
            ("SHOW POOLS", ShowPools),
            ("SHOW SERVERS", ShowServers),
            ("SHOW CLIENTS", ShowClients),
            ("RELOAD", Reload),
            ("PAUSE", Pause(None)),
            ("RESUME", Resume(None)),
            ("RECONNECT", Reconnect(None)),
        ] {
            assert_eq!(parse(text), Ok(want), "{text}");
            let lower = text.to_lowercase();
            assert_eq!(parse(&lower), Ok(want), "{lower}");
            // Mixed case: every other letter upper-cased.
            let mixed: String = lower
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    if i % 2 == 0 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect();
            assert_eq!(parse(&mixed), Ok(want), "{mixed}");
        }
    }

    #[test]
    fn whitespace_and_semicolons_around_and_between_words() {
        for text in [
            "  show sessions",
            "show sessions  ",
            "\tshow\tsessions\n",
            "show \r\n  sessions",
            "show sessions;",
            "show sessions ;",
            "show sessions;;;",
            " show sessions ; ",
            "\nshow\u{a0}sessions\n",
        ] {
            assert_eq!(parse(text), Ok(ShowSessions), "{text:?}");
        }
        assert_eq!(parse(" reload;\n"), Ok(Reload));
    }

    #[test]
    fn kill_keeps_the_id_as_written() {
        for (text, id) in [
            ("KILL 'abc-123'", "abc-123"),
            ("kill 'AbC-123'", "AbC-123"),
            ("Kill AbC", "AbC"),
            ("KILL   'x';", "x"),
            ("KILL\t'x'\n", "x"),
            ("KILL 'x", "x"),
            ("KILL x'", "x"),
            ("KILL ''", ""),
            ("KILL '''", ""),
            ("KILL é", "é"),
            ("KILL ';'", ";"),
        ] {
            assert_eq!(parse(text), Ok(Kill(id)), "{text:?}");
        }
    }

    #[test]
    fn pause_resume_reconnect_keep_the_upstream_as_written() {
        type Make = fn(Option<&'static str>) -> Command<'static>;
        let keywords: [(&str, Make); 3] = [
            ("PAUSE", Pause),
            ("RESUME", Resume),
            ("RECONNECT", Reconnect),
        ];
        for (keyword, make) in keywords {
            // The keyword in any case; the name's case is kept.
            for kw in [
                keyword.to_owned(),
                keyword.to_lowercase(),
                keyword[..1].to_owned() + &keyword[1..].to_lowercase(),
            ] {
                for (rest, name) in [
                    (" pg", "pg"),
                    (" Main_DB", "Main_DB"),
                    (" 'pg'", "pg"),
                    (" \"Pg\";", "Pg"),
                    ("\t'pg'\n", "pg"),
                    ("   pg ; ", "pg"),
                    (" ''", ""),
                    (" é", "é"),
                ] {
                    let text = format!("{kw}{rest}");
                    assert_eq!(parse(&text), Ok(make(Some(name))), "{text:?}");
                }
                for rest in ["", ";", " ; ", ";;", "\n"] {
                    let text = format!("  {kw}{rest}");
                    assert_eq!(parse(&text), Ok(make(None)), "{text:?}");
                }
            }
        }
    }

    #[test]
    fn anything_else_is_unknown_and_repeated_trimmed() {
        for (text, repeated) in [
            ("", ""),
            (";", ""),
            ("  ;  ", ""),
            ("SHOW", "SHOW"),
            ("SHOW SESSION", "SHOW SESSION"),
            ("SHOW SESSIONS NOW", "SHOW SESSIONS NOW"),
            ("SHOWSESSIONS", "SHOWSESSIONS"),
            ("SHOW; SESSIONS", "SHOW; SESSIONS"),
            ("SHOW SESSIONS; SHOW STATS", "SHOW SESSIONS; SHOW STATS"),
            ("KILL", "KILL"),
            ("KILL a b", "KILL a b"),
            ("KILL 'a b'", "KILL 'a b'"),
            ("KILLx y", "KILLx y"),
            ("RELOAD NOW", "RELOAD NOW"),
            ("SHOW POOL", "SHOW POOL"),
            ("SHOW POOLS x", "SHOW POOLS x"),
            ("SHOW SERVER", "SHOW SERVER"),
            ("SHOW CLIENTS; SHOW POOLS", "SHOW CLIENTS; SHOW POOLS"),
            ("PAUSE a b", "PAUSE a b"),
            ("PAUSE 'a b'", "PAUSE 'a b'"),
            ("PAUSEx", "PAUSEx"),
            ("RESUME ALL NOW", "RESUME ALL NOW"),
            ("RECONNECTx y", "RECONNECTx y"),
            ("  DROP TABLE x;  ", "DROP TABLE x"),
            ("select 1", "select 1"),
            ("SHOW VERSİON", "SHOW VERSİON"),
            ("ＳＨＯＷ ＳＴＡＴＳ", "ＳＨＯＷ ＳＴＡＴＳ"),
            ("\u{0}", "\u{0}"),
        ] {
            assert_eq!(parse(text), Err(UnknownCommand(repeated)), "{text:?}");
        }
    }

    #[test]
    fn the_error_names_the_text_and_every_command() {
        assert_eq!(
            UnknownCommand("DROP TABLE x").to_string(),
            "unknown command \"DROP TABLE x\"; the console knows SHOW SESSIONS, SHOW UPSTREAMS, \
             SHOW LISTENERS, SHOW STATS, SHOW CERTIFICATES, SHOW VERSION, SHOW POOLS, SHOW SERVERS, \
             SHOW CLIENTS, KILL '<session id>', RELOAD, PAUSE [upstream], RESUME [upstream], \
             RECONNECT [upstream]"
        );
    }
}
