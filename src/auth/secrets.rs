//! What a database stores for a user's password, and PgBouncer's
//! `auth_file` format that carries it: pure parsing, no I/O.
//!
//! Only SCRAM verifiers can be used for termination. The other kinds are
//! recognised so that the user is told precisely why they cannot log in
//! through pgbastion, instead of a generic failure.

use std::collections::HashMap;

use thiserror::Error;

use crate::auth::scram::Verifier;

/// A user's stored password, as `pg_authid.rolpassword` (or a PgBouncer
/// userlist) has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredSecret {
    Scram(Verifier),
    /// `md5` + 32 hex digits: pgbastion cannot run SCRAM with it.
    Md5,
    /// A plain-text password in a userlist: not accepted, a verifier is
    /// what belongs there.
    PlainText,
    /// No password, or one past its `VALID UNTIL` (the lookup function
    /// returns NULL for both).
    NoneOrExpired,
}

impl StoredSecret {
    /// Classifies a stored password (`None`: SQL NULL).
    pub fn classify(text: Option<&str>) -> StoredSecret {
        let Some(text) = text.filter(|t| !t.is_empty()) else {
            return StoredSecret::NoneOrExpired;
        };
        if let Some(v) = Verifier::parse(text) {
            return StoredSecret::Scram(v);
        }
        let md5 = text
            .strip_prefix("md5")
            .is_some_and(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if md5 {
            StoredSecret::Md5
        } else {
            StoredSecret::PlainText
        }
    }

    /// Why this secret cannot be used, for the user (None: it can).
    pub fn unusable_reason(&self) -> Option<&'static str> {
        match self {
            StoredSecret::Scram(_) => None,
            StoredSecret::Md5 => Some("its password is stored as an MD5 hash"),
            StoredSecret::PlainText => {
                Some("pgbastion's secrets file holds a plain-text password for it")
            }
            StoredSecret::NoneOrExpired => Some("it has no password, or its password has expired"),
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SecretsFileError {
    /// The line's text is not shown: it may hold a secret.
    #[error("line {line}: expected \"user\" \"SCRAM-SHA-256$...\" (two double-quoted fields; a quote inside a field is written twice)")]
    Syntax { line: usize },
    #[error("line {line}: user {user:?} is listed twice")]
    Duplicate { line: usize, user: String },
}

/// Parses PgBouncer's `auth_file` format: one user per line,
/// `"name" "secret"`, fields in double quotes with `""` for a quote inside,
/// anything after the second field ignored. Blank lines and lines starting
/// with `;` or `#` are comments. Unlike PgBouncer, a malformed line or a
/// user listed twice is an error rather than skipped, so a typo never
/// silently locks a user out (or keeps an old secret alive).
pub fn parse_secrets_file(text: &str) -> Result<HashMap<String, StoredSecret>, SecretsFileError> {
    let mut out = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with(';') || trimmed.starts_with('#') {
            continue;
        }
        let (user, rest) = quoted(trimmed).ok_or(SecretsFileError::Syntax { line })?;
        let (secret, _) = quoted(rest.trim_start()).ok_or(SecretsFileError::Syntax { line })?;
        if user.is_empty() {
            return Err(SecretsFileError::Syntax { line });
        }
        if out.contains_key(&user) {
            return Err(SecretsFileError::Duplicate { line, user });
        }
        out.insert(user, StoredSecret::classify(Some(&secret)));
    }
    Ok(out)
}

/// Reads one `"..."` field at the start of `s`; returns it and the rest.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut rest = s.strip_prefix('"')?;
    let mut value = String::new();
    loop {
        let end = rest.find('"')?;
        value.push_str(&rest[..end]);
        rest = &rest[end + 1..];
        match rest.strip_prefix('"') {
            Some(after) => {
                value.push('"');
                rest = after;
            }
            None => return Some((value, rest)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn verifier() -> Verifier {
        Verifier::from_password(b"pw", b"salt", 4096)
    }

    #[test]
    fn classifies_stored_passwords() {
        let v = verifier();
        assert_eq!(
            StoredSecret::classify(Some(&v.to_text())),
            StoredSecret::Scram(v)
        );
        assert_eq!(
            StoredSecret::classify(Some("md5c4ca4238a0b923820dcc509a6f75849b")),
            StoredSecret::Md5
        );
        assert_eq!(
            StoredSecret::classify(Some("md5short")),
            StoredSecret::PlainText
        );
        assert_eq!(
            StoredSecret::classify(Some("hunter2")),
            StoredSecret::PlainText
        );
        assert_eq!(StoredSecret::classify(None), StoredSecret::NoneOrExpired);
        assert_eq!(
            StoredSecret::classify(Some("")),
            StoredSecret::NoneOrExpired
        );
    }

    #[test]
    fn reads_a_pgbouncer_userlist() {
        let v = verifier().to_text();
        let text = format!(
            "; PgBouncer userlist\n\n\"alice\" \"{v}\"\n  \"bo\"\"b\"   \"{v}\" \"extra ignored\"\n\
             # comment\n\"carol\" \"md5c4ca4238a0b923820dcc509a6f75849b\"\n\"dave\" \"plain\"\n"
        );
        let m = parse_secrets_file(&text).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m["alice"], StoredSecret::Scram(verifier()));
        assert_eq!(m["bo\"b"], StoredSecret::Scram(verifier()));
        assert_eq!(m["carol"], StoredSecret::Md5);
        assert_eq!(m["dave"], StoredSecret::PlainText);
    }

    #[test]
    fn refuses_malformed_lines_without_showing_them() {
        for (text, line) in [
            ("alice \"x\"", 1),
            ("\"alice\"", 1),
            ("\"alice\" secret", 1),
            ("\"\" \"x\"", 1),
            ("\n\"alice\" \"unterminated", 2),
        ] {
            let e = parse_secrets_file(text).unwrap_err();
            assert_eq!(e, SecretsFileError::Syntax { line }, "{text}");
            assert!(!e.to_string().contains("secret"), "{e}");
        }
        assert_eq!(
            parse_secrets_file("\"a\" \"x\"\n\"a\" \"y\"").unwrap_err(),
            SecretsFileError::Duplicate {
                line: 2,
                user: "a".into()
            }
        );
    }

    proptest! {
        #[test]
        fn quoting_round_trips(user in "[^\n\r]{1,20}", secret in "[^\n\r]{0,40}") {
            let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
            let m = parse_secrets_file(&format!("{} {}\n", q(&user), q(&secret))).unwrap();
            prop_assert_eq!(m.len(), 1);
            prop_assert_eq!(&m[&user], &StoredSecret::classify(Some(&secret)));
        }

        #[test]
        fn never_panics(text in "\\PC{0,200}") {
            let _ = parse_secrets_file(&text);
        }
    }
}
