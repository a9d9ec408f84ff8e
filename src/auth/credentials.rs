//! The credentials pgbastion holds for identity login (`login = "identity"`
//! in a rule): per upstream and database user, what pgbastion logs in to
//! the server with when a client known by its certificate or tailnet
//! identity asks for that user. The client never sees or sends a password.
//!
//! Everything secret comes from files (read by `secret_file`: mode 0600 or
//! narrower, checked) or environment variables, never from the main TOML,
//! and never reaches a log or the audit log: `Secret` has a redacting
//! Debug and no Display. The whole set is read at start (a mistake stops
//! pgbastion, and `check-config` says which) and again on SIGHUP (a mistake
//! keeps the set in use).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine;
use thiserror::Error;

use crate::audit::event::CredentialKind;
use crate::auth::aws_sts::CredentialChain;
use crate::auth::rds_iam::TokenCache;
use crate::auth::scram::{Credential, Key, Verifier, KEY_LEN};
use crate::config::{CredentialConfig, CredentialSource, RdsIamConfig, UpstreamConfig};
use crate::secret_file::{self, SecretFileError};
use crate::tls::{self, TlsConfigError, TlsConnector};

#[derive(Debug, Error)]
pub enum CredentialError {
    /// A file missing, unreadable, readable by others, or empty.
    #[error(transparent)]
    File(#[from] SecretFileError),
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
                    let password = secret_file::read_password(path, "password_file")?;
                    Held::Password(Secret(password.into_bytes()))
                }
                CredentialSource::PasswordEnv(name) => match std::env::var_os(name) {
                    Some(v) if !v.is_empty() => Held::Password(Secret(v.into_encoded_bytes())),
                    _ => return Err(CredentialError::EmptyPasswordEnv(name.clone())),
                },
                CredentialSource::ScramSecret(path) => {
                    let text = secret_file::read(path, "scram_secret")?;
                    parse_scram_secret(&text, path)?
                }
                CredentialSource::ClientCert { cert, key } => {
                    secret_file::check(key, "client_key")?;
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
    if crate::crypto::sha256(&client_key) != verifier.stored_key {
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
    let client_key = crate::crypto::hmac(&salted, b"Client Key");
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
    use std::os::unix::fs::PermissionsExt;

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
    fn secrets_are_not_printed() {
        let held = Held::Password(Secret(b"hunter2".to_vec()));
        assert!(!format!("{held:?}").contains("hunter2"));
        assert!(!format!("{:?}", Secret(b"hunter2".to_vec())).contains("hunter2"));
    }
}
