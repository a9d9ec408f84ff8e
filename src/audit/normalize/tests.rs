//! The lexer's rules, one test each (see the module doc of `sql`).

use super::*;

fn norm(sql: &str) -> String {
    normalize(sql).unwrap().text
}

fn norm_on(sql: &str) -> String {
    normalize_with(sql, Backslashes::Literal).unwrap().text
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
    assert_eq!(norm("  select\t\n1  "), "select $1");
    assert_eq!(norm("select été, 'é'"), "select été, $1");
}

/// Issue 19 item 1: PostgreSQL ends a `--` comment at `\r` as well as
/// `\n`. Each of these was recorded wrong before: the canary literal,
/// the new password, and `select $1` for a statement that created a
/// table.
#[test]
fn a_carriage_return_ends_a_line_comment() {
    assert_eq!(norm("select --\r'\nCANARY' as c --'\n"), "select $1 as c");
    assert_eq!(
        norm("ALTER ROLE x --\r PASSWORD '\nsecret' --'\n"),
        "ALTER ROLE x PASSWORD $1"
    );
    assert_eq!(
        norm("select 1 --\r; create table hidden(x int); --\n"),
        "select $1 ; create table hidden(x int);"
    );
    assert_eq!(norm("select 1 --c\r\n+ 2"), "select $1 + $2");
}

#[test]
fn whitespace_is_scan_l_s() {
    // \f and \v (PostgreSQL 16) are whitespace too.
    assert_eq!(norm("select\x0b1\x0c,\r2"), "select $1 , $2");
}

/// scan.l's operator rule cuts an operator where `--` or `/*` starts.
#[test]
fn an_operator_ends_where_a_comment_starts() {
    assert_eq!(norm("select 2*--'canary\n3"), "select $1* $2");
    assert_eq!(norm("select 2+/*'canary*/3"), "select $1+ $2");
    assert_eq!(norm("select 2<--'canary\r3"), "select $1< $2");
    assert_eq!(norm("select 1--2\n"), "select $1");
}

/// A string continues across whitespace holding a newline (`\r`
/// included, and `--` comments), and the continuation is read in the
/// first part's form.
#[test]
fn string_continuations() {
    assert_eq!(norm("select 'a'\r'b'"), "select $1");
    assert_eq!(norm("select 'a' -- c\n'b'"), "select $1");
    assert_eq!(norm("select 'a'\n-- c\r  'b'"), "select $1");
    assert_eq!(norm("select 'a' /* c */\n'b'"), "select $1 $2");
    assert_eq!(norm("select 'a' 'b'"), "select $1 $2");
    assert_eq!(norm("select U&'a'\n'b'"), "select $1");
    // The continued part of an E'' string is an escape string: its
    // `\'` is a quote inside, so the canary is in the literal.
    assert_eq!(norm_on("select E'a'\n'\\' , canary --'"), "select $1");
    // Bit strings have no doubled quote: B'1' then '0' (a plain one).
    assert_eq!(norm("select B'1''0'"), "select $1$2");
    assert_eq!(
        normalize("select B'1''\\' , canary --'"),
        Err(Unparsed::AmbiguousBackslash)
    );
    // Thousands of continued parts: a loop, not recursion.
    let many = format!("select 'a'{}", "\n'a'".repeat(100_000));
    assert_eq!(norm(&many), "select $1");
}

/// Issue 19 item 15: a number or a parameter does not take in a `$`,
/// so a dollar quote starts right after one; inside an identifier a
/// `$` starts nothing.
#[test]
fn dollar_quotes_after_numbers_and_parameters() {
    assert_eq!(norm("select 1$a$canary$a$"), "select $1$2");
    assert_eq!(norm("select $1$tag$canary$tag$"), "select $1$2");
    assert_eq!(norm("select 1.5$$canary$$"), "select $1$2");
    assert_eq!(norm("select a$b$canary$b$"), "select a$b$canary$b$");
    assert_eq!(norm("select \"q\"$$canary$$"), "select \"q\"$1");
    // scan.l's dolqfailed: `$abc` not followed by `$` is `$`, `abc`.
    assert_eq!(norm("select $abc"), "select $abc");
    assert_eq!(norm("select $q$a$qq$b$q$, $q$x$ q$y$q$"), "select $1, $2");
}

/// Numbers: digits with PostgreSQL 16's `_`, fractions, exponents, and
/// what runs on.
#[test]
fn number_boundaries() {
    for (sql, want) in [
        ("select 1..2", "select $1.$2"),
        ("select 1.e5, 1.5e-3, .5e+2", "select $1, $2, $3"),
        // Trailing junk: an error since PostgreSQL 15, a number and an
        // alias before; redacted with the number.
        ("select 123canary", "select $1"),
        (
            "select 0x1F, 0o17, 0b101, 1_000_000",
            "select $1, $2, $3, $4",
        ),
        // `1e'...'` before PostgreSQL 15: 1 then an E'' string, whose
        // `\'` is a quote inside.
        ("select 1e'\\' , canary --'", "select $1$2"),
        (
            "select 1x'1F', 1b'1', 1n'canary', 1u&'canary'",
            "select $1$2, $3$4, $5$6, $7$8",
        ),
        // 1e-- is 1, e, then a comment (realfail gives the e back).
        ("select 1e--'\n, 'canary' --'", "select $1 , $2"),
        ("select 1e+x", "select $1+x"),
        // A parameter's run-on name is a name.
        ("select $1abc", "select $1abc"),
        ("select $1_0", "select $1_0"),
    ] {
        assert_eq!(norm_on(sql), want, "{sql}");
    }
}

/// The decision on a backslash in a plain string: read as the
/// session's standard_conforming_strings says; refused when unknown.
#[test]
fn backslashes_follow_standard_conforming_strings() {
    let sql = "select 'a\\' , canary --'";
    assert_eq!(normalize(sql), Err(Unparsed::AmbiguousBackslash));
    // on: `'a\'` ends at its second quote; `canary` is code.
    assert_eq!(
        normalize_with(sql, Backslashes::Literal).unwrap().text,
        "select $1 , canary"
    );
    // off: `\'` is a quote inside, the canary is in the literal.
    assert_eq!(
        normalize_with(sql, Backslashes::Escape).unwrap().text,
        "select $1"
    );
    assert_eq!(
        normalize_with("select 'a\\b', N'c\\d'", Backslashes::Literal)
            .unwrap()
            .text,
        "select $1, $2"
    );
    assert_eq!(
        normalize_with("select N'\\' , canary --'", Backslashes::Escape)
            .unwrap()
            .text,
        "select $1"
    );
    // Forms whose backslashes never depend on the setting.
    for sql in [
        "select E'\\''",
        "select U&'\\0061'",
        "select $$\\$$",
        "select B'\\'",
    ] {
        assert!(normalize(sql).is_ok(), "{sql}");
    }
}

/// Not knowing the setting, both readings are tried: a statement is
/// normalized when they agree, and refused when they do not.
#[test]
fn an_unknown_setting_reads_backslashes_both_ways() {
    for (sql, want) in [
        ("select 'a\\b'", "select $1"),
        (
            "select 'a\\b', 'c' from t where x = 'd\\\\'",
            "select $1, $2 from t where x = $3",
        ),
        ("select 'a\\nb' -- x", "select $1"),
    ] {
        assert_eq!(normalize(sql).unwrap().text, want, "{sql}");
    }
    for sql in [
        "select 'x\\' , canary --'",
        "select '\\'';create table hidden(x int);--'",
        "select 'a\\' '",
    ] {
        assert_eq!(normalize(sql), Err(Unparsed::AmbiguousBackslash), "{sql}");
    }
}

/// In SJIS (and BIG5, GBK, UHC, JOHAB, GB18030) 0x81 0x5C is one
/// character: the server sees no backslash where the lexer sees an
/// escape. Whatever the setting, such a statement is refused.
#[test]
fn a_backslash_after_a_non_ascii_byte_is_refused() {
    let sql = "select E'\u{81}\\', 'CANARY' --'";
    for mode in [
        Backslashes::Unknown,
        Backslashes::Literal,
        Backslashes::Escape,
    ] {
        assert_eq!(
            normalize_with(sql, mode),
            Err(Unparsed::EncodingDependentBackslash)
        );
    }
    assert_eq!(
        normalize("select 'é', '\\x' from t").unwrap().text,
        "select $1, $2 from t"
    );
}

#[test]
fn what_could_leak_is_refused() {
    for (sql, why) in [
        ("select 'canary", Unparsed::Unterminated),
        ("select E'canary\\'", Unparsed::Unterminated),
        ("select $x$canary", Unparsed::Unterminated),
        ("select 1$x$canary", Unparsed::Unterminated),
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
        prefix in "[ -~\r\n]{0,20}",
        suffix in "[ -~\r\n]{0,20}",
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

    /// What the normalizer keeps is code, byte for byte: no quote of a
    /// literal and no comment start can be left in it, whatever the
    /// pieces (the lexer's tricky ones) and however backslashes are read.
    #[test]
    fn kept_text_holds_no_literal_or_comment(
        parts in proptest::collection::vec(proptest::sample::select(vec![
            "'", "E'", "B'", "U&'", "$$", "$q$", "$1", "1", "1e", ".5", "x", "--", "/*", "*/",
            "*", "-", "\\", "\r", "\n", " ", "\x0b", "canary",
        ]), 0..14),
        mode in 0..3u8,
    ) {
        let sql: String = parts.concat();
        let mode = [Backslashes::Unknown, Backslashes::Literal, Backslashes::Escape][usize::from(mode)];
        if let Ok(n) = normalize_with(&sql, mode) {
            proptest::prop_assert!(
                !n.text.contains('\'') && !n.text.contains("--") && !n.text.contains("/*"),
                "{:?} -> {:?}", sql, n.text
            );
        }
    }

    #[test]
    fn never_panics(s in "\\PC{0,64}", mode in 0..3u8) {
        let mode = [Backslashes::Unknown, Backslashes::Literal, Backslashes::Escape][usize::from(mode)];
        let _ = normalize_with(&s, mode);
    }
}
