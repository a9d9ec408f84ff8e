//! How a failed command's error reaches the person who ran it: one
//! `Error:` line, then each cause that adds something, and a stack
//! backtrace only when asked for.
//!
//! The rule for causes: pgbastion's library errors put their source's text
//! in their own message (so a log line's `error = %e` is complete on its
//! own) and also expose it as `source()`. Printing the whole chain would say
//! each cause twice, so a cause whose text the message before it already
//! contains is dropped; one that adds something is printed on its own
//! `caused by:` line.
//!
//! Backtraces: anyhow captures one when RUST_BACKTRACE or RUST_LIB_BACKTRACE
//! asks, but RUST_BACKTRACE=1 is common on developer machines and in CI
//! images and is meant for panics. A backtrace is printed only with
//! `pgbastion --backtrace` (which sets RUST_LIB_BACKTRACE=1 before anything
//! runs, see [`enable_backtraces`]) or when RUST_LIB_BACKTRACE asks.

use std::backtrace::BacktraceStatus;
use std::fmt::Write as _;

/// Whether a failed command prints the stack backtrace its error captured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backtraces {
    /// Never printed (the default, whatever RUST_BACKTRACE says).
    Hidden,
    /// Printed after the causes: `--backtrace` or RUST_LIB_BACKTRACE.
    Shown,
}

impl Backtraces {
    /// `Shown` when the flag was given or RUST_LIB_BACKTRACE is set to
    /// anything but "0" (anyhow's own reading of it).
    pub fn from_flag(flag: bool) -> Backtraces {
        let lib = std::env::var_os("RUST_LIB_BACKTRACE").is_some_and(|v| v != "0");
        if flag || lib {
            Backtraces::Shown
        } else {
            Backtraces::Hidden
        }
    }
}

/// Makes anyhow capture backtraces from here on (for `--backtrace`). Call
/// it first thing in `main`, before any thread is started: it sets an
/// environment variable.
pub fn enable_backtraces() {
    std::env::set_var("RUST_LIB_BACKTRACE", "1");
}

/// The text printed on stderr for a command that failed with `err`.
pub fn render(err: &anyhow::Error, backtraces: Backtraces) -> String {
    let mut out = format!("Error: {err}\n");
    let mut before = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !before.contains(&text) {
            let _ = writeln!(out, "  caused by: {text}");
        }
        before = text;
    }
    let bt = err.backtrace();
    if backtraces == Backtraces::Shown && bt.status() == BacktraceStatus::Captured {
        let _ = write!(out, "\nStack backtrace:\n{bt}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read TLS certificate /x.pem: {source}")]
    struct Read {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("listener \"public\": {source}")]
    struct Listener {
        source: Read,
    }

    fn missing() -> anyhow::Error {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        anyhow::Error::new(Listener {
            source: Read { source: io },
        })
    }

    #[test]
    fn a_cause_the_message_already_says_is_not_repeated() {
        let text = render(&missing(), Backtraces::Hidden);
        assert_eq!(
            text,
            "Error: listener \"public\": cannot read TLS certificate /x.pem: No such file\n"
        );
    }

    #[test]
    fn a_cause_that_adds_something_is_printed_once() {
        let err = missing().context("c.toml is not usable");
        let text = render(&err, Backtraces::Hidden);
        assert_eq!(
            text,
            "Error: c.toml is not usable\n  caused by: listener \"public\": cannot read TLS certificate /x.pem: No such file\n"
        );
    }
}
