//! The console's commands: `Command`, parsed from the text of one simple
//! Query. Pure (text in, a command or why not out), so every spelling is
//! unit-tested here.

use thiserror::Error;

/// What the console knows, as its error for anything else lists it.
pub(crate) const COMMANDS: &str = "SHOW SESSIONS, SHOW UPSTREAMS, SHOW LISTENERS, SHOW STATS, SHOW CERTIFICATES, SHOW VERSION, KILL '<session id>', RELOAD";

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
    /// `KILL '<session id>'`: the id as written (quotes optional), its case
    /// kept.
    Kill(&'a str),
    Reload,
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
            // The id as written, not upper-cased: what follows the four
            // ASCII letters of KILL (upper-casing only changes ASCII, so
            // they are the text's first four bytes).
            ["KILL", _] => Command::Kill(text.get(4..).unwrap_or("").trim().trim_matches('\'')),
            ["RELOAD"] => Command::Reload,
            _ => return Err(UnknownCommand(text)),
        })
    }
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
            ("RELOAD", Reload),
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
             SHOW LISTENERS, SHOW STATS, SHOW CERTIFICATES, SHOW VERSION, KILL '<session id>', RELOAD"
        );
    }
}
