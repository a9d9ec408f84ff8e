//! `options=endpoint=<id>`: the endpoint named in a StartupMessage's
//! `options` (for clients that send no TLS server name), taken out of the
//! options before they are forwarded, since the server would refuse a
//! word it does not know. Pure: a string in, the id and the rest out.
//!
//! `options` is split the way PostgreSQL splits it (`pg_split_opts`):
//! words separated by whitespace, a backslash escaping the next
//! character, and read as a command line: the word after a flag that
//! takes an argument (`-c`, `--`, ...) is that argument, so
//! `-c endpoint=x` sets a parameter and names no endpoint. Every word
//! but a standalone `endpoint=...` is kept exactly as sent.

/// The options with their `endpoint=` words taken out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// The id as sent (not yet validated), when there was one.
    pub endpoint: Option<String>,
    /// What is left, words joined by one space (empty: nothing left,
    /// and the parameter should not be forwarded at all).
    pub rest: String,
}

/// The word that names the endpoint.
const KEY: &str = "endpoint=";

/// Takes the `endpoint=` words out of `options`. Err: two words name
/// different endpoints (which one the client meant cannot be guessed).
pub fn take_endpoint(options: &str) -> Result<Split, (String, String)> {
    let mut endpoint: Option<String> = None;
    let mut kept: Vec<&str> = Vec::new();
    for (raw, word) in standalone(options) {
        match word.as_deref().and_then(|w| w.strip_prefix(KEY)) {
            Some(id) => match &endpoint {
                Some(first) if first != id => return Err((first.clone(), id.to_owned())),
                _ => endpoint = Some(id.to_owned()),
            },
            None => kept.push(raw),
        }
    }
    Ok(Split {
        endpoint,
        rest: kept.join(" "),
    })
}

/// The flags of PostgreSQL's command line that take an argument
/// (`process_postgres_switches`' getopt string), `-` included for
/// `-- name=value`.
const FLAGS_WITH_ARGUMENT: &str = "BcCDdfhkNprStvW-";

/// Each word with what it is: (text as sent, text as read) for a word
/// that stands alone, (text as sent, None) for a flag's argument.
fn standalone(options: &str) -> Vec<(&str, Option<String>)> {
    let mut out = Vec::new();
    let mut argument_next = false;
    for (raw, word) in words(options) {
        if argument_next {
            argument_next = false;
            out.push((raw, None));
            continue;
        }
        argument_next =
            word.len() == 2 && word.starts_with('-') && FLAGS_WITH_ARGUMENT.contains(&word[1..]);
        out.push((raw, Some(word)));
    }
    out
}

/// PostgreSQL's `isspace` in the C locale: ASCII whitespace only (a
/// no-break space is part of a word to the server, so it is here too).
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// Each word: its text as sent (escapes included) and as PostgreSQL
/// reads it (escapes resolved).
fn words(options: &str) -> Vec<(&str, String)> {
    let mut out = Vec::new();
    let mut chars = options.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| is_space(*c)).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            return out;
        };
        let mut word = String::new();
        let mut end = options.len();
        while let Some((i, c)) = chars.next() {
            if is_space(c) {
                end = i;
                break;
            }
            if c == '\\' {
                if let Some((_, escaped)) = chars.next() {
                    word.push(escaped);
                }
                continue;
            }
            word.push(c);
        }
        out.push((&options[start..end], word));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split(s: &str) -> Split {
        take_endpoint(s).unwrap()
    }

    #[test]
    fn the_endpoint_word_is_taken_and_the_rest_kept_as_sent() {
        assert_eq!(
            split("endpoint=t1"),
            Split {
                endpoint: Some("t1".into()),
                rest: String::new()
            }
        );
        assert_eq!(
            split("-c search_path=a\\ b  endpoint=t1\t--work_mem=4MB"),
            Split {
                endpoint: Some("t1".into()),
                rest: "-c search_path=a\\ b --work_mem=4MB".into()
            }
        );
        assert_eq!(split("-c geqo=off").endpoint, None);
        assert_eq!(split("-c geqo=off").rest, "-c geqo=off");
        assert_eq!(split("").rest, "");
    }

    #[test]
    fn escapes_are_read_as_postgres_reads_them() {
        // `endpoint\=t1` is the word `endpoint=t1` to PostgreSQL.
        assert_eq!(split("endpoint\\=t1").endpoint.as_deref(), Some("t1"));
        // A value that is not an id is returned for the caller to refuse.
        assert_eq!(split("endpoint=a\\ b").endpoint.as_deref(), Some("a b"));
        // `-c endpoint=x` is a setting named endpoint, not the endpoint
        // (likewise `-- endpoint=x`); `-cendpoint=x` is one word.
        for sent in ["-c endpoint=x", "-- endpoint=x", "-cendpoint=x"] {
            let s = split(sent);
            assert_eq!((s.endpoint, s.rest.as_str()), (None, sent));
        }
        assert_eq!(split("-c a=b endpoint=t1").rest, "-c a=b");
        // Only ASCII whitespace separates words, as in PostgreSQL.
        assert_eq!(
            split("-c application_name=a\u{a0}b endpoint=t1").rest,
            "-c application_name=a\u{a0}b"
        );
        // A trailing backslash escapes nothing.
        assert_eq!(split("a\\").rest, "a\\");
    }

    #[test]
    fn two_different_endpoints_are_refused_and_repeats_are_one() {
        assert_eq!(
            take_endpoint("endpoint=a endpoint=b"),
            Err(("a".into(), "b".into()))
        );
        assert_eq!(
            split("endpoint=a endpoint=a").endpoint.as_deref(),
            Some("a")
        );
    }

    proptest! {
        /// Whatever a client sends: no panic, the endpoint word never
        /// survives in what is forwarded, and the other words keep their
        /// order and spelling.
        #[test]
        fn any_options_string_splits_cleanly(s in "[ a-z=\\\\\t-]{0,40}") {
            if let Ok(out) = take_endpoint(&s) {
                for (_, w) in standalone(&out.rest) {
                    prop_assert!(!w.is_some_and(|w| w.starts_with(KEY)));
                }
                let before: Vec<String> = standalone(&s)
                    .into_iter()
                    .filter(|(_, w)| !w.as_ref().is_some_and(|w| w.starts_with(KEY)))
                    .map(|(raw, _)| raw.to_owned())
                    .collect();
                let after: Vec<String> =
                    standalone(&out.rest).into_iter().map(|(raw, _)| raw.to_owned()).collect();
                prop_assert_eq!(before, after);
            }
        }
    }
}
