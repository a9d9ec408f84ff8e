//! Whole-text checks of a client's SQL the engine needs beyond
//! `pool::classify`: statements that drop prepared statements, and where
//! `RESET ALL` stands. Pure.

/// Deallocates every statement prepared under pgbastion's names, and no
/// other.
pub(super) const FORGET_STATEMENTS: &str = "DO $pgb$DECLARE n text; BEGIN FOR n IN SELECT name FROM pg_catalog.pg_prepared_statements WHERE name LIKE $l$pgbastion\\_%$l$ LOOP EXECUTE pg_catalog.format($f$DEALLOCATE %I$f$, n); END LOOP; END$pgb$";

/// Whether SQL may drop prepared statements pgbastion made (DEALLOCATE
/// or DISCARD anywhere, even in a string: a false alarm costs one
/// re-prepare per statement).
pub(super) fn drops_statements(sql: &[u8]) -> bool {
    contains_word(sql, b"deallocate") || contains_word(sql, b"discard")
}

/// Whether SQL mentions RESET ALL or DISCARD ALL anywhere.
pub(super) fn mentions_reset_all(sql: &[u8]) -> bool {
    let lower = sql.to_ascii_lowercase();
    let words: Vec<&[u8]> = lower
        .split(|c| !c.is_ascii_alphanumeric() && *c != b'_')
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .any(|w| (w[0] == b"reset" || w[0] == b"discard") && w[1] == b"all")
}

/// Whether SQL ends with RESET ALL or DISCARD ALL (trailing semicolons and
/// white space aside).
pub(super) fn resets_all(sql: &[u8]) -> bool {
    let lower = sql.to_ascii_lowercase();
    let end = lower
        .iter()
        .rposition(|c| !c.is_ascii_whitespace() && *c != b';')
        .map_or(0, |i| i + 1);
    let words: Vec<&[u8]> = lower[..end]
        .split(|c| c.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
        .collect();
    matches!(words.as_slice(), [.., a, b] if (*a == b"reset" || *a == b"discard") && *b == b"all")
        && words.len() >= 2
        && (words.len() == 2 || lower[..end].contains(&b';'))
}

pub(super) fn contains_word(sql: &[u8], word: &[u8]) -> bool {
    sql.to_ascii_lowercase()
        .split(|c| !c.is_ascii_alphanumeric() && *c != b'_')
        .any(|w| w == word)
}

/// `DEALLOCATE [PREPARE] name|ALL` or `DISCARD ALL` as a whole simple
/// Query (the statements they drop).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Deallocate {
    All,
    Named(String),
}

pub(super) fn deallocate(sql: &[u8]) -> Option<Deallocate> {
    let text = std::str::from_utf8(sql)
        .ok()?
        .trim()
        .trim_end_matches(';')
        .trim();
    let mut words = text.split_ascii_whitespace();
    let first = words.next()?;
    if first.eq_ignore_ascii_case("discard") {
        let all = words.next()?.eq_ignore_ascii_case("all") && words.next().is_none();
        return all.then_some(Deallocate::All);
    }
    if !first.eq_ignore_ascii_case("deallocate") {
        return None;
    }
    let mut name = words.next()?;
    if name.eq_ignore_ascii_case("prepare") {
        name = words.next()?;
    }
    if words.next().is_some() {
        return None;
    }
    if name.eq_ignore_ascii_case("all") {
        return Some(Deallocate::All);
    }
    let name = match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\""),
        None => name.to_ascii_lowercase(),
    };
    Some(Deallocate::Named(name))
}
