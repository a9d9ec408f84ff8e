//! The credentials pgbastion holds for identity login (`login = "identity"`
//! in a rule): per upstream and database user, what pgbastion logs in to
//! the server with when a client known by its certificate or tailnet
//! identity asks for that user. The client never sees or sends a password.
//!
//! Everything secret comes from files (mode 0600 or narrower, checked) or
//! environment variables, never from the main TOML, and never reaches a log
//! or the audit log: `Secret` has a redacting Debug and no Display. The
//! whole set is read at start (a mistake stops pgbastion, and
//! `check-config` says which) and again on SIGHUP (a mistake keeps the set
//! in use).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine;
use thiserror::Error;
use tokio_rustls::TlsConnector;

use crate::audit::event::CredentialKind;
use crate::auth::aws_sts::CredentialChain;
use crate::auth::rds_iam::TokenCache;
use crate::auth::scram::{Credential, Key, Verifier, KEY_LEN};
use crate::config::{CredentialConfig, CredentialSource, RdsIamConfig, UpstreamConfig};
use crate::tls::{self, TlsConfigError};

#[derive(Debug, Error)]
pub enum CredentialError {
    #[error("{what} {path}: {source}")]
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
    #[error("{what} {0} is empty", what = "password_file")]
    EmptyPasswordFile(PathBuf),
    #[error("password_env {0}: the environment variable is not set or empty")]
    EmptyPasswordEnv(String),
    #[error(
        "scram_secret {0}: expected the role's verifier (SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>) \
         on the first line and its base64 ClientKey on the second (`pgbastion scram-secret` writes both)"
    )]
    ScramSecretFormat(PathBuf),
    #[error(
        "scram_secret {0}: the ClientKey does not belong to the verifier (SHA-256(ClientKey) differs from StoredKey)"
    )]
    ScramSecretMismatch(PathBuf),
    #[error("user {user:?}: client certificate: {source}")]
    ClientCert {
        user: String,
        source: TlsConfigError,
    },
}

/// A secret value: never printed.
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// One credential, ready to use.
pub enum Held {
    Password(Secret),
    ScramKeys {
        verifier: Verifier,
        client_key: Key,
    },
    /// A connector presenting the role's client certificate, and when the
    /// certificate expires (checked before each use, so the client hears
    /// why rather than a failed TLS handshake).
    ClientCert {
        connector: TlsConnector,
        not_after: Option<SystemTime>,
    },
    RdsIam {
        config: RdsIamConfig,
        aws: CredentialChain,
        tokens: TokenCache,
    },
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Held::Password(_) => "Password(..)",
            Held::ScramKeys { .. } => "ScramKeys(..)",
            Held::ClientCert { .. } => "ClientCert(..)",
            Held::RdsIam { .. } => "RdsIam(..)",
        })
    }
}

/// A credential found for a login, with its kind for the audit log.
#[derive(Debug, Clone)]
pub struct Found {
    pub kind: CredentialKind,
    pub held: Arc<Held>,
}

impl Held {
    /// What the SCRAM (or cleartext) client answers with; None for kinds
    /// that need no answer of their own (client certificates) or make one
    /// per login (RDS IAM tokens).
    pub fn credential(&self) -> Option<Credential<'_>> {
        match self {
            Held::Password(p) => Some(Credential::Password(p.expose())),
            Held::ScramKeys {
                verifier,
                client_key,
            } => Some(Credential::Keys {
                client_key,
                verifier,
            }),
            Held::ClientCert { .. } | Held::RdsIam { .. } => None,
        }
    }
}

/// Every credential, by upstream name and user (names, not positions, so a
/// reload that reorders upstreams cannot hand one upstream's credential to
/// another).
#[derive(Debug, Default)]
pub struct Credentials {
    by_user: HashMap<(String, String), Found>,
}

impl Credentials {
    /// Reads every credential; the first mistake is the error.
    pub fn load(
        configs: &[CredentialConfig],
        upstreams: &[UpstreamConfig],
    ) -> Result<Credentials, CredentialError> {
        let mut by_user = HashMap::new();
        for c in configs {
            let held = match &c.source {
                CredentialSource::PasswordFile(path) => {
                    let text = read_private(path, "password_file")?;
                    let password = first_line(&text);
                    if password.is_empty() {
                        return Err(CredentialError::EmptyPasswordFile(path.clone()));
                    }
                    Held::Password(Secret(password.as_bytes().to_vec()))
                }
                CredentialSource::PasswordEnv(name) => match std::env::var_os(name) {
                    Some(v) if !v.is_empty() => Held::Password(Secret(v.into_encoded_bytes())),
                    _ => return Err(CredentialError::EmptyPasswordEnv(name.clone())),
                },
                CredentialSource::ScramSecret(path) => {
                    let text = read_private(path, "scram_secret")?;
                    parse_scram_secret(&text, path)?
                }
                CredentialSource::ClientCert { cert, key } => {
                    check_private(key, "client_key")?;
                    let connector = tls::upstream_connector_with_identity(
                        &upstreams[c.upstream],
                        Some((cert.as_path(), key.as_path())),
                    )
                    .map_err(|source| CredentialError::ClientCert {
                        user: c.user.clone(),
                        source,
                    })?;
                    Held::ClientCert {
                        connector,
                        not_after: not_after(cert),
                    }
                }
                CredentialSource::RdsIam(iam) => Held::RdsIam {
                    config: iam.clone(),
                    aws: CredentialChain::default(),
                    tokens: TokenCache::default(),
                },
            };
            by_user.insert(
                (upstreams[c.upstream].name.clone(), c.user.clone()),
                Found {
                    kind: c.source.kind(),
                    held: Arc::new(held),
                },
            );
        }
        Ok(Credentials { by_user })
    }

    pub fn find(&self, upstream: &str, user: &str) -> Option<Found> {
        self.by_user
            .get(&(upstream.to_owned(), user.to_owned()))
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.by_user.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_user.is_empty()
    }
}

/// When the (already loaded) certificate in `path` expires.
fn not_after(path: &Path) -> Option<SystemTime> {
    let secs = u64::try_from(tls::earliest_expiry(path)?).ok()?;
    Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// The file's first line without its line ending.
fn first_line(text: &str) -> &str {
    let line = text.lines().next().unwrap_or("");
    line.strip_suffix('\r').unwrap_or(line)
}

/// Refuses a secret file others may read (group or world bits set).
pub(crate) fn check_private(path: &Path, what: &'static str) -> Result<(), CredentialError> {
    let meta = std::fs::metadata(path).map_err(|source| CredentialError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CredentialError::Permissions {
            what,
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

pub(crate) fn read_private(path: &Path, what: &'static str) -> Result<String, CredentialError> {
    String::from_utf8(read_private_bytes(path, what)?).map_err(|e| CredentialError::Read {
        what,
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

/// The bytes of a private file (a key, which need not be text).
pub(crate) fn read_private_bytes(
    path: &Path,
    what: &'static str,
) -> Result<Vec<u8>, CredentialError> {
    check_private(path, what)?;
    std::fs::read(path).map_err(|source| CredentialError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// A key from a private file: its bytes, text or not (32 random bytes are
/// a good key), without trailing CR and LF bytes (an editor's newline is
/// not part of a key). The one rule for every key file, so a key reads the
/// same wherever it is used (`chain_key_file` in pgbastion and `audit
/// verify`; `[cluster] secret_file` for the fleet and for mock salts).
pub(crate) fn read_private_key(
    path: &Path,
    what: &'static str,
) -> Result<Vec<u8>, CredentialError> {
    let mut key = read_private_bytes(path, what)?;
    while key.last().is_some_and(|b| matches!(b, b'\r' | b'\n')) {
        key.pop();
    }
    Ok(key)
}

/// The verifier on the first line, the base64 ClientKey on the second;
/// the key must match the verifier's StoredKey.
fn parse_scram_secret(text: &str, path: &Path) -> Result<Held, CredentialError> {
    let mut lines = text.lines().map(|l| l.trim()).filter(|l| !l.is_empty());
    let format = || CredentialError::ScramSecretFormat(path.to_owned());
    let verifier = lines.next().and_then(Verifier::parse).ok_or_else(format)?;
    let client_key: Key = lines
        .next()
        .and_then(|k| base64::engine::general_purpose::STANDARD.decode(k).ok())
        .and_then(|k| <[u8; KEY_LEN]>::try_from(k).ok())
        .ok_or_else(format)?;
    if lines.next().is_some() {
        return Err(format());
    }
    if crate::auth::scram::sha256(&client_key) != verifier.stored_key {
        return Err(CredentialError::ScramSecretMismatch(path.to_owned()));
    }
    Ok(Held::ScramKeys {
        verifier,
        client_key,
    })
}

/// The two lines of a `scram_secret` file for `password`: the verifier
/// PostgreSQL stores (for `ALTER ROLE ... PASSWORD '<verifier>'`) and the
/// ClientKey pgbastion logs in with. After this, nobody needs the password.
pub fn scram_secret_for(password: &[u8], iterations: u32) -> String {
    let mut salt = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut salt);
    let salted = crate::auth::scram::salted_password(password, &salt, iterations);
    let client_key = crate::auth::scram::hmac(&salted, b"Client Key");
    let verifier = Verifier::from_password(password, &salt, iterations);
    format!(
        "{}\n{}\n",
        verifier.to_text(),
        base64::engine::general_purpose::STANDARD.encode(client_key)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn scram_secret_round_trip_and_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let text = scram_secret_for(b"pw", 4096);
        let p = write(dir.path(), "s", &text, 0o600);
        let Held::ScramKeys { verifier, .. } = parse_scram_secret(&text, &p).unwrap() else {
            panic!("keys")
        };
        assert_eq!(verifier.iterations, 4096);
        // Another password's key with this verifier.
        let other = scram_secret_for(b"other", 4096);
        let mixed = format!(
            "{}\n{}\n",
            text.lines().next().unwrap(),
            other.lines().nth(1).unwrap()
        );
        assert!(matches!(
            parse_scram_secret(&mixed, &p),
            Err(CredentialError::ScramSecretMismatch(_))
        ));
        for bad in [
            "",
            "SCRAM-SHA-256$x",
            "garbage\nkey",
            &format!("{text}extra\n"),
        ] {
            assert!(
                matches!(
                    parse_scram_secret(bad, &p),
                    Err(CredentialError::ScramSecretFormat(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn files_others_can_read_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "pw", "secret\n", 0o644);
        let e = read_private(&p, "password_file").unwrap_err();
        assert!(e.to_string().contains("mode 0644"), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        assert!(!e.to_string().contains("secret\n"));
        let p = write(dir.path(), "pw2", "secret\n", 0o600);
        assert_eq!(
            first_line(&read_private(&p, "password_file").unwrap()),
            "secret"
        );
        let p = write(dir.path(), "pw3", "secret\n", 0o640);
        assert!(read_private(&p, "password_file").is_err());
    }

    #[test]
    fn secrets_are_not_printed() {
        let held = Held::Password(Secret(b"hunter2".to_vec()));
        assert!(!format!("{held:?}").contains("hunter2"));
        assert!(!format!("{:?}", Secret(b"hunter2".to_vec())).contains("hunter2"));
    }
}
