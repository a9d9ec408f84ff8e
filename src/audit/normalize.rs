//! Statement text for the query audit, with its constants taken out: every
//! literal (strings in all of PostgreSQL's forms, dollar-quoted strings,
//! bit and hex strings, numbers) becomes a parameter `$n`, numbered after
//! the highest `$n` the statement already has, as `pg_stat_statements`
//! normalizes them. Comments are dropped too (they are free text). So a
//! password in `ALTER ROLE ... PASSWORD '...'` or an e-mail address in a
//! `WHERE` clause never reaches the audit log.
//!
//! A lexer, not a parser: it follows PostgreSQL's rules for where a token
//! starts and ends (`src/backend/parser/scan.l`), which is all that
//! redaction needs, and it must follow them exactly: a token boundary read
//! differently from the server hides statements in what the audit takes
//! for a comment, or shows a literal the audit takes for code. The rules,
//! each with a test below:
//!
//! - whitespace is `[ \t\n\r\f\v]` (`\v` since PostgreSQL 16; before, it is
//!   a syntax error, so reading it as whitespace changes nothing that runs);
//! - a `--` comment ends at a newline, which is `\n` *or* `\r`;
//! - `/* */` comments nest;
//! - an operator stops where `--` or `/*` starts (byte by byte here);
//! - identifiers are `[A-Za-z\x80-\xff_][A-Za-z\x80-\xff_0-9$]*`, so a `$`
//!   inside one starts nothing;
//! - a string continues across whitespace holding a newline (comments
//!   included), in the same form: `E'a'` newline `'\''` is one escape
//!   string; bit strings (`B'..'`, `X'..'`) have no doubled quotes;
//! - a plain `'...'` string reads backslashes as the session's
//!   `standard_conforming_strings` says, which is read both ways (see
//!   [`Backslashes`]);
//! - a number is digits (with `_` since PostgreSQL 16), a fraction, an
//!   exponent; letters run on (`123abc`, `0x1F`: an error since
//!   PostgreSQL 15, a number and an alias before, a hex integer in 16) are
//!   part of the constant, except a string's prefix (`1e'..'` is `1` then
//!   `E'..'` before PostgreSQL 15);
//! - `$` starts a parameter before a digit, a dollar quote before
//!   `tag$` or `$`, and nothing else. A number or parameter does not take
//!   in a `$`, so `1$q$..$q$` and `$1$q$..$q$` start dollar quotes.
//!
//! Where the text could be read two ways (a backslash in a plain string
//! whose two readings, by `standard_conforming_strings` on and off, give
//! different statements; a backslash after a non-ASCII byte, which some
//! client encodings take as part of a character), or does not end where a
//! token does (an unterminated string, comment or dollar quote), the
//! statement is refused as `Unparsed` rather than risk logging part of a
//! literal.
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
    #[error("a backslash right after a non-ASCII byte: its meaning depends on client_encoding")]
    EncodingDependentBackslash,
}

/// How the server reads a backslash in a plain `'...'` string: the
/// session's `standard_conforming_strings`.
///
/// A proxy cannot know it for certain when a statement arrives: the server
/// reports a change in ParameterStatus only at its next ReadyForQuery (a
/// SET executed before a Flush, not a Sync, is in force unreported), and a
/// configuration reload on the server changes it between any two
/// statements. So the query audit reads every statement both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backslashes {
    /// Not known: the statement is read both ways, and recorded only when
    /// both readings agree (`'a\b'` is one constant either way; in
    /// `'a\' , b --'` the `b` is code one way and text the other).
    Unknown,
    /// `standard_conforming_strings = on`: a backslash is a character.
    Literal,
    /// `standard_conforming_strings = off`: a backslash escapes, as in
    /// `E'...'`.
    Escape,
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
    Constant(Literal),
    Space,
    Param(usize, usize, usize),
}

/// The forms of quoted strings, by how their body ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Quoted {
    /// `'...'` read as standard strings, and `U&'...'`: `''` is a quote.
    Standard,
    /// `E'...'` (and plain strings with standard_conforming_strings off):
    /// a backslash escapes the next byte, `''` is a quote.
    Escape,
    /// `B'...'`, `X'...'`: the first quote ends it (`B'1''0'` is two
    /// strings).
    Bits,
}

/// A constant's form, as [`lex`] reports it: how its text reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Literal {
    /// `'...'` (or `N'...'`) read as a standard string: `''` is a quote,
    /// a backslash is a character.
    Standard,
    /// `E'...'`, or `'...'` read with standard_conforming_strings off: a
    /// backslash escapes, `''` is a quote.
    Escape,
    /// `B'...'`, `X'...'`.
    Bits,
    /// `U&'...'` (Unicode escapes, perhaps a `UESCAPE` after it).
    Unicode,
    /// `$tag$...$tag$`.
    Dollar,
    Number,
}

/// The form a plain string (or `N'...'`) is read in.
fn plain_literal(plain: Quoted) -> Literal {
    match plain {
        Quoted::Escape => Literal::Escape,
        Quoted::Standard | Quoted::Bits => Literal::Standard,
    }
}

/// What a token of [`lex`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A bare word: a keyword or an unquoted name.
    Ident,
    /// `"..."`.
    QuotedIdent,
    /// A constant (a string, continuations included, or a number).
    Literal(Literal),
    /// `$n`.
    Param,
    /// One byte of an operator or punctuation (`$` alone included).
    Punct,
    /// Whitespace.
    Space,
    /// A `--` or `/* */` comment.
    Comment,
}

/// A token and where it is in the text: `sql[start..end]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lexeme {
    pub(crate) kind: Kind,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

/// `sql` with every constant replaced by `$n` and comments removed,
/// whatever the session's standard_conforming_strings (see
/// [`Backslashes::Unknown`]).
pub fn normalize(sql: &str) -> Result<Normalized, Unparsed> {
    normalize_with(sql, Backslashes::Unknown)
}

/// `sql` with every constant replaced by `$n` and comments removed,
/// plain strings read as `backslashes` says.
///
/// A backslash right after a byte of 0x80 or more is refused whatever the
/// setting: in the client encodings whose characters may end in 0x5C
/// (SJIS, BIG5, GBK, UHC, JOHAB, GB18030) that backslash is half of a
/// character to the server, not an escape, and the audit cannot know the
/// session's client_encoding for certain any more than its
/// standard_conforming_strings.
pub fn normalize_with(sql: &str, backslashes: Backslashes) -> Result<Normalized, Unparsed> {
    let b = sql.as_bytes();
    if b.windows(2).any(|w| w[0] >= 0x80 && w[1] == b'\\') {
        return Err(Unparsed::EncodingDependentBackslash);
    }
    match backslashes {
        Backslashes::Literal => normalize_as(sql, Quoted::Standard),
        Backslashes::Escape => normalize_as(sql, Quoted::Escape),
        Backslashes::Unknown if !b.contains(&b'\\') => normalize_as(sql, Quoted::Standard),
        Backslashes::Unknown => {
            match (
                normalize_as(sql, Quoted::Standard),
                normalize_as(sql, Quoted::Escape),
            ) {
                (Ok(a), Ok(b)) if a == b => Ok(a),
                (Err(Unparsed::Unterminated), Err(Unparsed::Unterminated)) => {
                    Err(Unparsed::Unterminated)
                }
                _ => Err(Unparsed::AmbiguousBackslash),
            }
        }
    }
}

/// `sql` normalized with plain strings read as `plain` (Standard or
/// Escape).
fn normalize_as(sql: &str, plain: Quoted) -> Result<Normalized, Unparsed> {
    let tokens = tokenize(sql.as_bytes(), plain)?;
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
            Token::Constant(_) => {
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

/// The tokens of `b`, lexed one after the other from the start as
/// scan.l's INITIAL state does: every position the loop reaches begins a
/// token, so no rule needs to look behind it.
fn tokenize(b: &[u8], plain: Quoted) -> Result<Vec<Token>, Unparsed> {
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let (token, end) = token_at(b, i, plain)?;
        // A leading space is dropped; the rest of the text is kept as is.
        if !(matches!(token, Token::Space) && tokens.is_empty()) {
            tokens.push(token);
        }
        i = end;
    }
    Ok(tokens)
}

/// Every token of `sql`, whitespace and comments included, by the rules
/// above, for readers of statement text other than the normalizer (the
/// pool's session-state classifier). Plain strings read as `backslashes`
/// says; `Unknown` lexes both ways and answers only if both agree.
/// Unlike [`normalize_with`], a backslash after a non-ASCII byte is not
/// refused: it is read as an escape where the form says so (the caller
/// decides what the other reading means to it).
pub(crate) fn lex(sql: &str, backslashes: Backslashes) -> Result<Vec<Lexeme>, Unparsed> {
    let b = sql.as_bytes();
    let plain = match backslashes {
        Backslashes::Literal => Quoted::Standard,
        Backslashes::Escape => Quoted::Escape,
        Backslashes::Unknown if !b.contains(&b'\\') => Quoted::Standard,
        Backslashes::Unknown => {
            let one = lex(sql, Backslashes::Literal);
            return match (one, lex(sql, Backslashes::Escape)) {
                (Ok(a), Ok(b)) if a == b => Ok(a),
                (Err(_), Err(_)) => Err(Unparsed::Unterminated),
                _ => Err(Unparsed::AmbiguousBackslash),
            };
        }
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let (token, end) = token_at(b, i, plain)?;
        let kind = match token {
            Token::Constant(l) => Kind::Literal(l),
            Token::Param(..) => Kind::Param,
            Token::Space if is_space(b[i]) => Kind::Space,
            Token::Space => Kind::Comment,
            Token::Keep(..) if b[i] == b'"' => Kind::QuotedIdent,
            Token::Keep(..) if is_ident_start(b[i]) => Kind::Ident,
            Token::Keep(..) => Kind::Punct,
        };
        out.push(Lexeme {
            kind,
            start: i,
            end,
        });
        i = end;
    }
    Ok(out)
}

/// The token starting at `i`, and where the next one starts.
fn token_at(b: &[u8], i: usize, plain: Quoted) -> Result<(Token, usize), Unparsed> {
    let at = |k: usize| b.get(i + k).copied();
    Ok(match b[i] {
        c if is_space(c) => (Token::Space, i + 1),
        b'-' if at(1) == Some(b'-') => (Token::Space, line_comment_end(b, i)),
        b'/' if at(1) == Some(b'*') => (Token::Space, block_comment_end(b, i)?),
        b'\'' => (
            Token::Constant(plain_literal(plain)),
            string_end(b, i, plain)?,
        ),
        // E'...', B'...', X'...', N'...' (N is NCHAR then a plain
        // string), U&'...', any case.
        b'e' | b'E' if at(1) == Some(b'\'') => (
            Token::Constant(Literal::Escape),
            string_end(b, i + 1, Quoted::Escape)?,
        ),
        b'b' | b'B' | b'x' | b'X' if at(1) == Some(b'\'') => (
            Token::Constant(Literal::Bits),
            string_end(b, i + 1, Quoted::Bits)?,
        ),
        b'n' | b'N' if at(1) == Some(b'\'') => (
            Token::Constant(plain_literal(plain)),
            string_end(b, i + 1, plain)?,
        ),
        b'u' | b'U' if at(1) == Some(b'&') && at(2) == Some(b'\'') => (
            Token::Constant(Literal::Unicode),
            string_end(b, i + 2, Quoted::Standard)?,
        ),
        // Quoted identifiers are names, not constants: kept.
        b'"' => {
            let end = quoted_ident_end(b, i)?;
            (Token::Keep(i, end), end)
        }
        b'$' if at(1).is_some_and(|c| c.is_ascii_digit()) => {
            let end = digits_end(b, i + 1);
            let n = b[i + 1..end]
                .iter()
                .filter(|c| c.is_ascii_digit())
                .fold(0usize, |n, &d| {
                    // Bounded, so numbering after it cannot overflow.
                    (n * 10 + usize::from(d - b'0')).min(1 << 20)
                });
            (Token::Param(n, i, end), end)
        }
        // A dollar quote, or a lone `$` (scan.l's dolqfailed: `$abc` is
        // `$` then the identifier `abc`).
        b'$' => match dollar_quote_end(b, i)? {
            Some(end) => (Token::Constant(Literal::Dollar), end),
            None => (Token::Keep(i, i + 1), i + 1),
        },
        b'0'..=b'9' => (Token::Constant(Literal::Number), number_end(b, i)),
        b'.' if at(1).is_some_and(|c| c.is_ascii_digit()) => {
            (Token::Constant(Literal::Number), number_end(b, i))
        }
        c if is_ident_start(c) => {
            let end = ident_end(b, i);
            (Token::Keep(i, end), end)
        }
        // Operators and punctuation (bytes >= 0x80 are identifier
        // characters above, so this is one ASCII byte). Kept byte by byte,
        // so an operator ends where `--` or `/*` starts, as scan.l's
        // operator rule cuts it.
        _ => (Token::Keep(i, i + 1), i + 1),
    })
}

/// scan.l's `space`: `[ \t\n\r\f\v]`.
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0c | 0x0b)
}

/// scan.l's `horiz_space`: whitespace other than a newline.
fn is_horiz_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | 0x0c | 0x0b)
}

/// scan.l's `newline`: `[\n\r]`.
fn is_newline(c: u8) -> bool {
    matches!(c, b'\n' | b'\r')
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_char(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

/// After the identifier starting at `i`.
fn ident_end(b: &[u8], i: usize) -> usize {
    i + 1 + b[i + 1..].iter().take_while(|&&x| is_ident_char(x)).count()
}

/// Where a `--` comment at `i` ends: before the next `\n` or `\r`.
fn line_comment_end(b: &[u8], i: usize) -> usize {
    b[i..]
        .iter()
        .position(|&x| is_newline(x))
        .map_or(b.len(), |p| i + p)
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

/// After the string whose opening quote is at `i`, continuations
/// included (`'a'` newline `'b'` is one constant, read in the first
/// part's form). A loop, not recursion: a statement may hold thousands of
/// continued parts.
fn string_end(b: &[u8], mut i: usize, form: Quoted) -> Result<usize, Unparsed> {
    loop {
        let end = quoted_body_end(b, i, form)?;
        match continuation(b, end) {
            Some(next) => i = next,
            None => return Ok(end),
        }
    }
}

/// After one quoted part whose opening quote is at `i`.
fn quoted_body_end(b: &[u8], i: usize, form: Quoted) -> Result<usize, Unparsed> {
    let mut j = i + 1;
    loop {
        match b.get(j) {
            None => return Err(Unparsed::Unterminated),
            Some(b'\\') if form == Quoted::Escape => j += 2,
            Some(b'\'') if form != Quoted::Bits && b.get(j + 1) == Some(&b'\'') => j += 2,
            Some(b'\'') => return Ok(j + 1),
            Some(_) => j += 1,
        }
    }
}

/// scan.l's `quotecontinue`: after a string's closing quote at `at - 1`,
/// horizontal whitespace or `--` comments, a newline, then whitespace or
/// comments each ending in a newline, and a quote. Returns where that
/// quote is.
fn continuation(b: &[u8], at: usize) -> Option<usize> {
    let mut j = at;
    loop {
        match b.get(j) {
            Some(&c) if is_horiz_space(c) => j += 1,
            Some(b'-') if b.get(j + 1) == Some(&b'-') => j = line_comment_end(b, j),
            _ => break,
        }
    }
    if !b.get(j).copied().is_some_and(is_newline) {
        return None;
    }
    j += 1;
    loop {
        match b.get(j) {
            Some(&c) if is_space(c) => j += 1,
            Some(b'-') if b.get(j + 1) == Some(&b'-') => {
                let end = line_comment_end(b, j);
                if end >= b.len() {
                    return None;
                }
                j = end + 1;
            }
            _ => break,
        }
    }
    (b.get(j) == Some(&b'\'')).then_some(j)
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
/// the `$` starts none (scan.l's `dolqfailed`, or a lone `$`).
fn dollar_quote_end(b: &[u8], i: usize) -> Result<Option<usize>, Unparsed> {
    // The tag: empty, or an identifier not starting with a digit and
    // without `$`.
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
    // Every `$` inside is where scan.l tries a delimiter, and a `tag$`
    // after it can be read only one way: the first occurrence ends it.
    match b[body..].windows(delim.len()).position(|w| w == delim) {
        Some(p) => Ok(Some(body + p + delim.len())),
        None => Err(Unparsed::Unterminated),
    }
}

/// After the digits (and PostgreSQL 16's single `_` between digits) at
/// `i`.
fn digits_end(b: &[u8], i: usize) -> usize {
    let mut j = i;
    while j < b.len() {
        let underscore = b[j] == b'_' && j > i && b.get(j + 1).is_some_and(u8::is_ascii_digit);
        if !(b[j].is_ascii_digit() || underscore) {
            break;
        }
        j += 1;
    }
    j
}

/// After a numeric literal at `i` (a digit, or `.` before a digit):
/// digits, a fraction (`1..2` is `1`, `.`, `.2`), an exponent (`1e` and
/// `1e-` leave the `e` to what follows, as scan.l's realfail does), then
/// any identifier run on, which is redacted with it, unless it is a
/// string's prefix.
fn number_end(b: &[u8], i: usize) -> usize {
    let mut j = if b[i] == b'.' {
        digits_end(b, i + 1)
    } else {
        let j = digits_end(b, i);
        if b.get(j) == Some(&b'.') && b.get(j + 1) != Some(&b'.') {
            digits_end(b, j + 1)
        } else {
            j
        }
    };
    if matches!(b.get(j), Some(b'e' | b'E')) {
        let k = j + 1 + usize::from(matches!(b.get(j + 1), Some(b'+' | b'-')));
        if b.get(k).is_some_and(u8::is_ascii_digit) {
            j = digits_end(b, k);
        }
    }
    if b.get(j).copied().is_some_and(is_ident_start) && !starts_string(b, j) {
        j = ident_end(b, j);
    }
    j
}

/// Whether a string with a letter prefix (`E'`, `B'`, `X'`, `N'`, `U&'`)
/// starts at `i`.
fn starts_string(b: &[u8], i: usize) -> bool {
    match b[i] {
        b'e' | b'E' | b'b' | b'B' | b'x' | b'X' | b'n' | b'N' => b.get(i + 1) == Some(&b'\''),
        b'u' | b'U' => b.get(i + 1) == Some(&b'&') && b.get(i + 2) == Some(&b'\''),
        _ => false,
    }
}

#[cfg(test)]
mod tests;
