//! Statement text for the query audit, with its constants taken out: every
//! literal (strings in all of PostgreSQL's forms, dollar-quoted strings,
//! bit and hex strings, numbers) becomes a parameter `$n`, numbered after
//! the highest `$n` the statement already has, as `pg_stat_statements`
//! normalizes them. Comments are dropped too (they are free text). So a
//! password in `ALTER ROLE ... PASSWORD '...'` or an e-mail address in a
//! `WHERE` clause never reaches the audit log.
//!
//! A lexer, not a parser: it follows PostgreSQL's rules for where a token
//! starts and ends (scan.l), which is all that redaction needs. Where the
//! text could be read two ways (a backslash in a plain string, whose meaning
//! depends on `standard_conforming_strings`), or does not end where a token
//! does (an unterminated string, comment or dollar quote), the statement is
//! refused as `Unparsed` rather than risk logging part of a literal.
//!
//! Why not PostgreSQL's own parser (the `pg_query` crate, libpg_query): it
//! builds here (about a minute, with libclang), but its normalization is
//! `pg_stat_statements`', which replaces only the constants of plannable
//! statements: `COMMENT ... IS '...'`, `COPY ... FROM '...'`, `ALTER
//! SYSTEM SET ... = '...'`, `PREPARE ... AS SELECT '...'`, column defaults
//! and comments keep their text; and it reads backslashes as
//! standard_conforming_strings = on does, whatever the session has set.
//! Each of those is a test below.
//!
//! Pure, and fuzzed (`fuzz/fuzz_targets/normalize.rs`).

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Unparsed {
    #[error("a string, quoted identifier, comment or dollar quote does not end")]
    Unterminated,
    #[error("a backslash in a plain string: its meaning depends on standard_conforming_strings")]
    AmbiguousBackslash,
}

/// A statement with its constants replaced, and how many were.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    pub text: String,
    pub constants: usize,
}

/// What the lexer finds: text kept as it is, a constant, a run of
/// whitespace or comments, a parameter.
enum Token {
    Keep(usize, usize),
    Constant,
    Space,
    Param(usize, usize, usize),
}

/// `sql` with every constant replaced by `$n` and comments removed.
pub fn normalize(sql: &str) -> Result<Normalized, Unparsed> {
    let tokens = tokenize(sql.as_bytes())?;
    let mut next = 1 + tokens
        .iter()
        .filter_map(|t| match t {
            Token::Param(n, _, _) => Some(*n),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let mut out = String::with_capacity(sql.len());
    let mut constants = 0;
    for t in tokens {
        match t {
            Token::Keep(a, b) | Token::Param(_, a, b) => out.push_str(&sql[a..b]),
            Token::Space => {
                if !out.ends_with(' ') && !out.is_empty() {
                    out.push(' ');
                }
            }
            Token::Constant => {
                use std::fmt::Write;
                let _ = write!(out, "${next}");
                next += 1;
                constants += 1;
            }
        }
    }
    Ok(Normalized {
        text: out.trim_end().to_owned(),
        constants,
    })
}

/// The tokens of `b`, each with where the next one starts.
fn tokenize(b: &[u8]) -> Result<Vec<Token>, Unparsed> {
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let (token, end) = match c {
            // Comments: -- to end of line; /* */ nesting as PostgreSQL does.
            b'-' if b.get(i + 1) == Some(&b'-') => (
                Token::Space,
                b[i..]
                    .iter()
                    .position(|&x| x == b'\n')
                    .map_or(b.len(), |p| i + p),
            ),
            b'/' if b.get(i + 1) == Some(&b'*') => (Token::Space, block_comment_end(b, i)?),
            b'\'' => (Token::Constant, plain_string_end(b, i)?),
            // E'...', B'...', X'...', N'...', U&'...' (any case), when the
            // letter starts a token.
            b'e' | b'E' if b.get(i + 1) == Some(&b'\'') && starts_token(b, i) => {
                (Token::Constant, escape_string_end(b, i + 1)?)
            }
            b'b' | b'B' | b'x' | b'X' | b'n' | b'N'
                if b.get(i + 1) == Some(&b'\'') && starts_token(b, i) =>
            {
                (Token::Constant, plain_string_end(b, i + 1)?)
            }
            // Backslashes in U&'...' are Unicode escapes, never quotes.
            b'u' | b'U'
                if b.get(i + 1) == Some(&b'&')
                    && b.get(i + 2) == Some(&b'\'')
                    && starts_token(b, i) =>
            {
                (Token::Constant, unicode_string_end(b, i + 2)?)
            }
            // Quoted identifiers are names, not constants: kept.
            b'"' => {
                let end = quoted_ident_end(b, i)?;
                (Token::Keep(i, end), end)
            }
            b'$' => match dollar_quote_end(b, i)? {
                Some(end) => (Token::Constant, end),
                None => {
                    // A parameter ($1) or a lone $: kept.
                    let end = i + 1 + b[i + 1..].iter().take_while(|x| x.is_ascii_digit()).count();
                    let n = std::str::from_utf8(&b[i + 1..end])
                        .ok()
                        .and_then(|d| d.parse::<usize>().ok())
                        .filter(|_| starts_token(b, i));
                    match n {
                        // Bounded, so numbering after it cannot overflow.
                        Some(n) => (Token::Param(n.min(1 << 20), i, end), end),
                        None => (Token::Keep(i, end), end),
                    }
                }
            },
            b'0'..=b'9' if starts_token(b, i) => (Token::Constant, number_end(b, i)),
            b'.' if b.get(i + 1).is_some_and(u8::is_ascii_digit)
                && starts_token(b, i)
                && (i == 0 || b[i - 1] != b'.') =>
            {
                (Token::Constant, number_end(b, i))
            }
            _ if is_ident_start(c) => {
                let end = i + 1 + b[i + 1..].iter().take_while(|&&x| is_ident_char(x)).count();
                (Token::Keep(i, end), end)
            }
            _ if c.is_ascii_whitespace() => (Token::Space, i + 1),
            // Operators and punctuation (bytes >= 0x80 are identifier
            // characters above, so this is one ASCII byte).
            _ => (Token::Keep(i, i + 1), i + 1),
        };
        // A leading space is dropped; the rest of the text is kept as is.
        if !(matches!(token, Token::Space) && tokens.is_empty()) {
            tokens.push(token);
        }
        i = end;
    }
    Ok(tokens)
}

/// Whether position `i` begins a token (not inside an identifier or
/// number): `x'1'` is a hex string, `ax'1'` is `ax` then a string.
fn starts_token(b: &[u8], i: usize) -> bool {
    i == 0 || !(is_ident_char(b[i - 1]) || b[i - 1] == b'$')
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_char(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

/// After `/* ... */` starting at `i` (nested comments count).
fn block_comment_end(b: &[u8], mut i: usize) -> Result<usize, Unparsed> {
    let mut depth = 0usize;
    while i + 1 < b.len() {
        if b[i] == b'/' && b[i + 1] == b'*' {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b[i + 1] == b'/' {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return Ok(i);
            }
        } else {
            i += 1;
        }
    }
    Err(Unparsed::Unterminated)
}

/// After a `'...'` string opening at `i` (`''` is a quote inside). A
/// backslash makes it ambiguous. Strings separated by whitespace with a
/// newline continue each other; they are one constant.
fn plain_string_end(b: &[u8], i: usize) -> Result<usize, Unparsed> {
    let mut j = i + 1;
    loop {
        match b.get(j) {
            None => return Err(Unparsed::Unterminated),
            Some(b'\\') => return Err(Unparsed::AmbiguousBackslash),
            Some(b'\'') if b.get(j + 1) == Some(&b'\'') => j += 2,
            Some(b'\'') => return Ok(continuation(b, j + 1, plain_string_end)),
            Some(_) => j += 1,
        }
    }
}

/// After a `U&'...'` string whose quote is at `i`: like a plain string,
/// but a backslash starts a Unicode escape, which cannot be a quote.
fn unicode_string_end(b: &[u8], i: usize) -> Result<usize, Unparsed> {
    let mut j = i + 1;
    loop {
        match b.get(j) {
            None => return Err(Unparsed::Unterminated),
            Some(b'\'') if b.get(j + 1) == Some(&b'\'') => j += 2,
            Some(b'\'') => return Ok(j + 1),
            Some(_) => j += 1,
        }
    }
}

/// After an `E'...'` string whose quote is at `i` (backslash escapes).
fn escape_string_end(b: &[u8], i: usize) -> Result<usize, Unparsed> {
    let mut j = i + 1;
    loop {
        match b.get(j) {
            None => return Err(Unparsed::Unterminated),
            Some(b'\\') => j += 2,
            Some(b'\'') if b.get(j + 1) == Some(&b'\'') => j += 2,
            Some(b'\'') => return Ok(continuation(b, j + 1, escape_string_end)),
            Some(_) => j += 1,
        }
    }
}

/// SQL's string continuation: `'a'` newline `'b'` is `'ab'`. Returns the
/// end of the whole constant (or `at` when nothing continues it).
fn continuation(b: &[u8], at: usize, rest: fn(&[u8], usize) -> Result<usize, Unparsed>) -> usize {
    let gap = b[at..]
        .iter()
        .take_while(|x| x.is_ascii_whitespace())
        .count();
    let next = at + gap;
    if b[at..next].contains(&b'\n') && b.get(next) == Some(&b'\'') {
        // An unterminated continuation is caught when lexed on its own.
        rest(b, next).unwrap_or(at)
    } else {
        at
    }
}

fn quoted_ident_end(b: &[u8], i: usize) -> Result<usize, Unparsed> {
    let mut j = i + 1;
    loop {
        match b.get(j) {
            None => return Err(Unparsed::Unterminated),
            Some(b'"') if b.get(j + 1) == Some(&b'"') => j += 2,
            Some(b'"') => return Ok(j + 1),
            Some(_) => j += 1,
        }
    }
}

/// A dollar quote `$tag$...$tag$` starting at `i`: its end, or None when
/// the `$` starts no dollar quote (a parameter `$1`).
fn dollar_quote_end(b: &[u8], i: usize) -> Result<Option<usize>, Unparsed> {
    if !starts_token(b, i) {
        return Ok(None);
    }
    // The tag: empty, or an identifier not starting with a digit.
    let tag_len = match b.get(i + 1) {
        Some(b'$') => 0,
        Some(&c) if is_ident_start(c) => {
            let n = 1 + b[i + 2..]
                .iter()
                .take_while(|&&x| is_ident_start(x) || x.is_ascii_digit())
                .count();
            if b.get(i + 1 + n) != Some(&b'$') {
                return Ok(None);
            }
            n
        }
        _ => return Ok(None),
    };
    let delim = &b[i..i + tag_len + 2];
    let body = i + delim.len();
    match b[body..].windows(delim.len()).position(|w| w == delim) {
        Some(p) => Ok(Some(body + p + delim.len())),
        None => Err(Unparsed::Unterminated),
    }
}

/// After a numeric literal at `i`: digits (with `_`), a fraction, an
/// exponent, or 0x/0o/0b forms; letters run on are part of it (`1e`,
/// `0xZZ` are errors to the server, and redacted whole here).
fn number_end(b: &[u8], i: usize) -> usize {
    let mut j = i;
    while j < b.len() {
        let c = b[j];
        let exponent_sign = (c == b'+' || c == b'-')
            && j > i
            && matches!(b[j - 1], b'e' | b'E')
            && !b[i..j].starts_with(b"0x")
            && !b[i..j].starts_with(b"0X");
        if c.is_ascii_alphanumeric() || c == b'_' || exponent_sign {
            j += 1;
        } else if c == b'.' && b.get(j + 1) != Some(&b'.') {
            // `1..2` is not a number; `1.5` and `1.` are.
            j += 1;
        } else {
            break;
        }
    }
    j
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(sql: &str) -> String {
        normalize(sql).unwrap().text
    }

    #[test]
    fn constants_become_parameters_in_order() {
        assert_eq!(
            norm("SELECT * FROM users WHERE email = 'a@example.com' AND age > 42"),
            "SELECT * FROM users WHERE email = $1 AND age > $2"
        );
        assert_eq!(
            norm("insert into t values (1, 2.5, -3e10, .5, 1_000, 0x1F, 'x')"),
            "insert into t values ($1, $2, -$3, $4, $5, $6, $7)"
        );
        assert_eq!(norm("select $1, 5, $3"), "select $1, $4, $3");
        assert_eq!(normalize("select 1, 2").unwrap().constants, 2);
    }

    #[test]
    fn every_string_form_is_redacted() {
        for (sql, want) in [
            (
                "ALTER ROLE app PASSWORD 'canary'",
                "ALTER ROLE app PASSWORD $1",
            ),
            ("select E'it\\'s \\\\ canary'", "select $1"),
            ("select e'canary'", "select $1"),
            ("select B'1010', X'1F', N'canary'", "select $1, $2, $3"),
            ("select U&'d\\0061t\\+000061'", "select $1"),
            ("select 'it''s canary'", "select $1"),
            ("select $$canary$$, $tag$ca'na$ry$tag$", "select $1, $2"),
            ("select interval '1 day'", "select interval $1"),
            ("select 'can'\n  'ary'", "select $1"),
            ("select 'a' 'b'", "select $1 $2"),
        ] {
            assert_eq!(norm(sql), want, "{sql}");
        }
    }

    #[test]
    fn names_operators_and_comments() {
        assert_eq!(
            norm("select \"Weird \"\"Name\"\" 1\", col1, t2.x$ from t2 -- secret\nwhere a<>b"),
            "select \"Weird \"\"Name\"\" 1\", col1, t2.x$ from t2 where a<>b"
        );
        assert_eq!(norm("select /* a /* nested */ secret */ 1"), "select $1");
        assert_eq!(norm("select a::int[], b->>'k'"), "select a::int[], b->>$1");
        assert_eq!(norm("select x'1' , ax'1'"), "select $1 , ax$2");
        assert_eq!(norm("select 1..2"), "select $1..$2");
        assert_eq!(norm("  select\t\n1  "), "select $1");
        assert_eq!(norm("select été, 'é'"), "select été, $1");
    }

    #[test]
    fn what_could_leak_is_refused() {
        for (sql, why) in [
            ("select 'canary", Unparsed::Unterminated),
            ("select E'canary\\'", Unparsed::Unterminated),
            ("select $x$canary", Unparsed::Unterminated),
            ("select /* canary", Unparsed::Unterminated),
            ("select \"canary", Unparsed::Unterminated),
            (
                "select 'a\\' or password = 'canary'",
                Unparsed::AmbiguousBackslash,
            ),
        ] {
            assert_eq!(normalize(sql), Err(why), "{sql}");
        }
    }

    /// Statements where `pg_stat_statements`' normalization (and so the
    /// `pg_query` crate's) keeps literals as written, because it replaces
    /// only the constants of plannable statements: here every literal goes,
    /// whatever the statement, and so do comments.
    #[test]
    fn utility_statements_and_comments_lose_their_literals_too() {
        for (sql, want) in [
            ("comment on table t is 'canary'", "comment on table t is $1"),
            ("copy t from '/tmp/canary.csv'", "copy t from $1"),
            (
                "alter system set password_encryption = 'canary'",
                "alter system set password_encryption = $1",
            ),
            ("prepare p as select 'canary'", "prepare p as select $1"),
            (
                "create table t (c text default 'canary')",
                "create table t (c text default $1)",
            ),
            (
                "security label on table t is 'canary'",
                "security label on table t is $1",
            ),
            ("select 1 -- canary", "select $1"),
            ("select /* canary */ 1", "select $1"),
        ] {
            assert_eq!(norm(sql), want, "{sql}");
        }
        // What pg_query reads as `$1 , canary --'` (standard strings) is one
        // literal holding the canary with standard_conforming_strings off.
        assert_eq!(
            normalize("select 'a\\' , canary --'"),
            Err(Unparsed::AmbiguousBackslash)
        );
    }

    proptest::proptest! {
        /// Whatever the input, a literal never survives: a canary inside a
        /// string is either redacted or the statement is refused.
        #[test]
        fn a_quoted_canary_never_survives(
            prefix in "[ -~]{0,20}",
            suffix in "[ -~]{0,20}",
            quote in proptest::sample::select(vec!["'", "E'", "$$", "$q$", "X'", "B'"]),
        ) {
            let close = match quote { "E'" | "X'" | "B'" => "'", q => q };
            let sql = format!("{prefix} {quote}canary{close} {suffix}");
            if let Ok(n) = normalize(&sql) {
                let inside_comment_or_ident = prefix.contains("--") || prefix.contains("/*")
                    || prefix.contains('"') || prefix.contains('\'') || prefix.contains('$');
                if !inside_comment_or_ident {
                    proptest::prop_assert!(!n.text.contains("canary"), "{} -> {}", sql, n.text);
                }
            }
        }

        #[test]
        fn never_panics(s in "\\PC{0,64}") {
            let _ = normalize(&s);
        }
    }
}
