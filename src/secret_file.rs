//! Reading secret files: the one way every file holding a secret is read
//! (`auth_password_file`, the scram `secrets_file`, identity login's
//! `password_file` and `scram_secret`, the mock-salt key, the audit
//! `chain_key_file`, `[cluster] secret_file` and `redis_password_file`),
//! and the one permission check (client certificate keys, which the TLS
//! loader reads itself, pass it too).
//!
//! Two rules, the same for every file, so a secret reads the same wherever
//! it is used:
//! - group and other permission bits are refused (mode 0600 or narrower),
//!   with a message that names the file and the `chmod` that fixes it; the
//!   mode is checked on the file as opened, so what is read is what was
//!   checked;
//! - trailing CR and LF bytes are not part of the secret (an editor's
//!   newline, Windows' too); nothing else is trimmed (a space may be part
//!   of a password). A password is then the file's one line: one with more
//!   lines is refused rather than cut, as is an empty one.
//!
//! No secret ever appears in an error: messages name the file only.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SecretFileError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{what} {path} can be read by others (mode {mode:04o}); secrets must be readable by pgbastion's user only: chmod 600 {path}"
    )]
    Permissions {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error("{what} {path} is not UTF-8 text")]
    NotText { what: &'static str, path: PathBuf },
    #[error("{what} {path} is empty")]
    Empty { what: &'static str, path: PathBuf },
    #[error("{what} {path} holds more than one line: write the password alone on the first line")]
    MoreThanOneLine { what: &'static str, path: PathBuf },
}

/// Refuses a secret file others may read, without reading it (for files
/// another loader reads, such as TLS keys).
pub fn check(path: &Path, what: &'static str) -> Result<(), SecretFileError> {
    open(path, what).map(drop)
}

/// A secret file's bytes, text or not (32 random bytes are a good key),
/// without trailing CR and LF bytes.
pub fn read_bytes(path: &Path, what: &'static str) -> Result<Vec<u8>, SecretFileError> {
    let mut bytes = read_raw(path, what)?;
    let kept = without_line_endings(&bytes).len();
    bytes.truncate(kept);
    Ok(bytes)
}

/// A secret file's text, without trailing CR and LF bytes.
pub fn read(path: &Path, what: &'static str) -> Result<String, SecretFileError> {
    String::from_utf8(read_bytes(path, what)?).map_err(|_| SecretFileError::NotText {
        what,
        path: path.to_owned(),
    })
}

/// A password file: its one line, which must not be empty.
pub fn read_password(path: &Path, what: &'static str) -> Result<String, SecretFileError> {
    let text = read(path, what)?;
    let path = path.to_owned();
    if text.is_empty() {
        return Err(SecretFileError::Empty { what, path });
    }
    if text.contains(['\n', '\r']) {
        return Err(SecretFileError::MoreThanOneLine { what, path });
    }
    Ok(text)
}

/// A file's exact bytes, permission-checked, with no newline rule: only
/// for binary keys pgbastion writes itself (the mock key file), whose last
/// random byte may well be 0x0a.
pub fn read_raw(path: &Path, what: &'static str) -> Result<Vec<u8>, SecretFileError> {
    let mut file = open(path, what)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|source| SecretFileError::Read {
            what,
            path: path.to_owned(),
            source,
        })?;
    Ok(bytes)
}

/// Opens the file and checks the mode of what was opened.
fn open(path: &Path, what: &'static str) -> Result<std::fs::File, SecretFileError> {
    let read_error = |source| SecretFileError::Read {
        what,
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mode = file.metadata().map_err(read_error)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::Permissions {
            what,
            path: path.to_owned(),
            mode,
        });
    }
    Ok(file)
}

/// The one newline rule: trailing CR and LF bytes dropped, all of them.
fn without_line_endings(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .rposition(|b| !matches!(b, b'\r' | b'\n'))
        .map_or(0, |i| i + 1);
    &bytes[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    /// issue 20: every secret file, `auth_password_file` included, is
    /// refused when group or others may read it, and the message says
    /// which file and what to run.
    #[test]
    fn group_and_other_bits_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602, 0o660] {
            let p = write(dir.path(), "pw", b"hunter2\n", mode);
            for e in [
                read_password(&p, "auth_password_file").unwrap_err(),
                read(&p, "secrets file").unwrap_err(),
                read_bytes(&p, "chain_key_file").unwrap_err(),
                read_raw(&p, "mock_key_file").unwrap_err(),
                check(&p, "client_key").unwrap_err(),
            ] {
                let text = e.to_string();
                assert!(matches!(e, SecretFileError::Permissions { .. }), "{text}");
                assert!(text.contains(&format!("mode {mode:04o}")), "{text}");
                assert!(
                    text.contains(&format!("chmod 600 {}", p.display())),
                    "{text}"
                );
                assert!(!text.contains("hunter2"), "no secret in the error");
            }
        }
        for mode in [0o600, 0o400] {
            let p = write(dir.path(), "pw", b"hunter2\n", mode);
            assert_eq!(read_password(&p, "auth_password_file").unwrap(), "hunter2");
            check(&p, "client_key").unwrap();
        }
        let e = read(&dir.path().join("missing"), "secrets file").unwrap_err();
        assert!(
            e.to_string().starts_with("cannot read secrets file "),
            "{e}"
        );
    }

    #[test]
    fn one_newline_rule_for_every_file() {
        let dir = tempfile::tempdir().unwrap();
        for (bytes, want) in [
            (&b"key"[..], &b"key"[..]),
            (b"key\n", b"key"),
            (b"key\r\n", b"key"),
            (b"key\n\n\r\n", b"key"),
            (b" key \n", b" key "),
            (b"\n", b""),
            (b"", b""),
            (b"\xff\x00\n", b"\xff\x00"),
        ] {
            let p = write(dir.path(), "k", bytes, 0o600);
            assert_eq!(read_bytes(&p, "k").unwrap(), want, "{bytes:?}");
            assert_eq!(read_raw(&p, "k").unwrap(), bytes, "raw: as written");
            if let Ok(text) = std::str::from_utf8(want) {
                assert_eq!(read(&p, "k").unwrap(), text);
            } else {
                assert!(matches!(
                    read(&p, "k"),
                    Err(SecretFileError::NotText { .. })
                ));
            }
        }
    }

    #[test]
    fn a_password_is_one_line_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "pw", b"two words \r\n", 0o600);
        assert_eq!(read_password(&p, "password_file").unwrap(), "two words ");
        for text in [&b""[..], b"\n", b"\r\n\n"] {
            let p = write(dir.path(), "pw", text, 0o600);
            let e = read_password(&p, "password_file").unwrap_err();
            assert!(matches!(e, SecretFileError::Empty { .. }), "{e}");
            assert!(e.to_string().ends_with("is empty"), "{e}");
        }
        for text in [&b"user\nhunter2\n"[..], b"hunter2\r\rx", b"\nhunter2"] {
            let p = write(dir.path(), "pw", text, 0o600);
            let e = read_password(&p, "password_file").unwrap_err();
            assert!(matches!(e, SecretFileError::MoreThanOneLine { .. }), "{e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }
}
