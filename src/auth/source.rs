//! Where scram mode gets the verifier of the user logging in: a secrets
//! file (PgBouncer's format, re-read on SIGHUP), the database itself
//! (auth_query), or both (the file first). Users found in neither get a
//! mock verifier, so the exchange looks the same for a user who does not
//! exist as for a wrong password.

use crate::sync::RwLockExt;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use thiserror::Error;

use crate::auth::auth_query::{AuthQuery, AuthQueryError};
use crate::auth::mock_key::{self, MockKeyError};
use crate::auth::scram::{self, Key, Verifier};
use crate::auth::secrets::{self, SecretsFileError, StoredSecret};
use crate::config::{ScramConfig, Timeouts};
use crate::secret_file::{self, SecretFileError};
use crate::upstream::Upstream;

#[derive(Debug, Error)]
pub enum SourceError {
    /// The secrets file or the auth password file missing, unreadable,
    /// readable by others (mode 0644: refused like every other secret
    /// file), or empty.
    #[error(transparent)]
    File(#[from] SecretFileError),
    #[error("secrets file {path}: {source}")]
    SecretsFile {
        path: PathBuf,
        source: SecretsFileError,
    },
    #[error("mock verifiers: {0}")]
    MockKey(#[from] Box<MockKeyError>),
    #[error("no stable secret for mock verifiers: set [auth] mock_key_file (no state directory is known: STATE_DIRECTORY, XDG_STATE_HOME and HOME are unset), or [cluster] secret_file")]
    NoMockKey,
}

/// Which source answered, for the message that asks an operator to
/// refresh it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceName {
    SecretsFile(PathBuf),
    AuthQuery { user: String },
}

impl std::fmt::Display for SourceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceName::SecretsFile(p) => write!(f, "secrets_file {}", p.display()),
            SourceName::AuthQuery { user } => write!(f, "auth_query (as {user})"),
        }
    }
}

/// The outcome of looking a user up.
#[derive(Debug)]
pub enum Lookup {
    Found(Verifier, SourceName),
    /// Known, but with no SCRAM verifier (MD5, none, expired, plain text).
    Unusable(StoredSecret, SourceName),
    /// In no source (or not allowed to log in).
    Unknown,
}

struct SecretsFile {
    path: PathBuf,
    entries: RwLock<Arc<HashMap<String, StoredSecret>>>,
}

impl SecretsFile {
    fn read(path: &Path) -> Result<HashMap<String, StoredSecret>, SourceError> {
        let text = secret_file::read(path, "secrets file")?;
        secrets::parse_secrets_file(&text).map_err(|source| SourceError::SecretsFile {
            path: path.to_owned(),
            source,
        })
    }

    fn get(&self, user: &str) -> Option<StoredSecret> {
        self.entries.read_locked().get(user).cloned()
    }
}

/// One upstream's verifier sources.
pub struct ScramAuth {
    /// Shared with the same upstream's per-endpoint copies (`for_endpoint`),
    /// so one SIGHUP re-read serves them all.
    secrets: Option<Arc<SecretsFile>>,
    query: Option<AuthQuery>,
    /// Makes mock verifiers: the same fake salt for the same unknown user
    /// from every instance and across restarts, as PostgreSQL's from its
    /// cluster nonce (`mock_key`).
    mock_key: Key,
    /// The iteration count of the last real verifier seen (PostgreSQL's
    /// default until then): a mock exchange offers what real users'
    /// exchanges do.
    mock_iterations: AtomicU32,
}

impl ScramAuth {
    /// Reads the secrets file and the auth password file: a mistake in
    /// either stops pgbastion at start (and `check-config`).
    pub fn new(cfg: &ScramConfig) -> Result<ScramAuth, SourceError> {
        let secrets = match &cfg.secrets_file {
            Some(path) => Some(Arc::new(SecretsFile {
                entries: RwLock::new(Arc::new(SecretsFile::read(path)?)),
                path: path.clone(),
            })),
            None => None,
        };
        let query = match &cfg.auth_query {
            Some(q) => {
                let password = secret_file::read_password(&q.password_file, "auth_password_file")?;
                Some(AuthQuery::new(
                    q.user.clone(),
                    password,
                    q.database.clone(),
                    q.query.clone(),
                ))
            }
            None => None,
        };
        let mock_key = match &cfg.mock_key {
            Some(source) => mock_key::load(source).map_err(Box::new)?,
            None => return Err(SourceError::NoMockKey),
        };
        Ok(ScramAuth {
            secrets,
            query,
            mock_key,
            mock_iterations: AtomicU32::new(scram::DEFAULT_ITERATIONS),
        })
    }

    /// These sources for one endpoint of a templated upstream: the same
    /// secrets file and mock key, and an auth_query of its own, since
    /// each endpoint's server holds its own roles (and a lookup
    /// connection to one tenant's server must never answer for another).
    pub fn for_endpoint(&self) -> ScramAuth {
        ScramAuth {
            secrets: self.secrets.clone(),
            query: self.query.as_ref().map(AuthQuery::fresh),
            mock_key: self.mock_key,
            mock_iterations: AtomicU32::new(self.mock_iterations.load(Ordering::Relaxed)),
        }
    }

    /// Re-reads the secrets file (SIGHUP). On error the entries in use
    /// stay. Returns how many users it now holds (None: no file).
    pub fn reload(&self) -> Result<Option<usize>, SourceError> {
        let Some(file) = &self.secrets else {
            return Ok(None);
        };
        let entries = SecretsFile::read(&file.path)?;
        let n = entries.len();
        *file.entries.write_locked() = Arc::new(entries);
        Ok(Some(n))
    }

    /// Finds `user`'s verifier: the secrets file first, then auth_query.
    ///
    /// With both configured, auth_query runs for users in the file too and
    /// its answer is set aside (issue 19 item 14): otherwise the file's
    /// users are answered in microseconds and the others after a round
    /// trip to the server, and the time a refusal takes tells who is in
    /// the file. Its failure does not refuse a user the file knows.
    pub async fn lookup(
        &self,
        user: &str,
        upstream: &Upstream,
        timeouts: &Timeouts,
    ) -> Result<Lookup, AuthQueryError> {
        let in_file = self.secrets.as_ref().and_then(|file| {
            let secret = file.get(user)?;
            Some(classified(
                secret,
                SourceName::SecretsFile(file.path.clone()),
            ))
        });
        let found = match (in_file, &self.query) {
            (Some(found), None) => found,
            (Some(found), Some(q)) => {
                let _ = q.lookup(upstream, timeouts, user).await;
                found
            }
            (None, Some(q)) => match q.lookup(upstream, timeouts, user).await? {
                Some(stored) => classified(
                    StoredSecret::classify(stored.as_deref()),
                    SourceName::AuthQuery {
                        user: q.user().to_owned(),
                    },
                ),
                None => Lookup::Unknown,
            },
            (None, None) => Lookup::Unknown,
        };
        if let Lookup::Found(v, _) = &found {
            self.mock_iterations.store(v.iterations, Ordering::Relaxed);
        }
        Ok(found)
    }

    /// A verifier for a user who does not exist: deterministic per user
    /// (a prober asking twice sees the same salt, as for a real user) and
    /// matching no password.
    pub fn mock_verifier(&self, user: &str) -> Verifier {
        let derive = |label: &str| {
            crate::crypto::hmac(&self.mock_key, format!("{label}\0{user}").as_bytes())
        };
        Verifier {
            iterations: self.mock_iterations.load(Ordering::Relaxed),
            salt: derive("salt")[..16].to_vec(),
            stored_key: derive("stored"),
            server_key: derive("server"),
        }
    }
}

fn classified(secret: StoredSecret, source: SourceName) -> Lookup {
    match secret {
        StoredSecret::Scram(v) => Lookup::Found(v, source),
        other => Lookup::Unusable(other, source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::mock_key::MockKeySource;
    use std::os::unix::fs::PermissionsExt;

    fn mock() -> MockKeySource {
        let dir = tempfile::tempdir().unwrap().keep();
        MockKeySource::KeyFile(dir.join("mock_key"))
    }

    /// issue 19 item 24: a secrets file (or auth password file) others may
    /// read is refused at start, as every other secret file is.
    #[test]
    fn secret_files_others_can_read_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let verifier = Verifier::from_password(b"pw", b"salt", 16).to_text();
        let line = format!("\"alice\" \"{verifier}\"\n");
        for mode in [0o644, 0o640, 0o604] {
            let cfg = ScramConfig {
                secrets_file: Some(file("users.txt", &line, mode)),
                auth_query: None,
                mock_key: Some(mock()),
            };
            let e = ScramAuth::new(&cfg).err().expect("refused");
            let text = e.to_string();
            assert!(
                matches!(e, SourceError::File(SecretFileError::Permissions { .. })),
                "{text}"
            );
            assert!(text.contains(&format!("mode {mode:04o}")), "{text}");
            assert!(text.contains("chmod 600"), "{text}");
            assert!(!text.contains(&verifier), "no secret in the error");
        }
        let cfg = ScramConfig {
            secrets_file: Some(file("users.txt", &line, 0o600)),
            auth_query: Some(crate::config::AuthQueryConfig {
                user: "lookup".into(),
                password_file: file("pw", "secret\n", 0o644),
                database: "postgres".into(),
                query: "select 1".into(),
            }),
            mock_key: Some(mock()),
        };
        let e = ScramAuth::new(&cfg).err().expect("password file refused");
        assert!(e.to_string().contains("auth_password_file"), "{e}");
        let cfg = ScramConfig {
            auth_query: None,
            ..cfg
        };
        assert!(ScramAuth::new(&cfg).is_ok(), "mode 0600 is accepted");
        // A missing file still says what it is.
        let cfg = ScramConfig {
            secrets_file: Some(dir.path().join("missing")),
            auth_query: None,
            mock_key: Some(mock()),
        };
        let e = ScramAuth::new(&cfg).err().unwrap().to_string();
        assert!(e.starts_with("cannot read secrets file"), "{e}");
    }

    /// issue 19 item 5: two instances (two processes, or one before and
    /// after a restart) with the same key file give an unknown user the
    /// same salt; another key, another salt.
    #[test]
    fn mock_verifiers_are_stable_per_user_and_across_instances() {
        let dir = tempfile::tempdir().unwrap();
        let with_key = |path: &Path| {
            ScramAuth::new(&ScramConfig {
                secrets_file: None,
                auth_query: None,
                mock_key: Some(MockKeySource::KeyFile(path.to_owned())),
            })
            .unwrap()
        };
        let key = dir.path().join("mock_key");
        let auth = with_key(&key);
        let ghost = auth.mock_verifier("ghost");
        assert_eq!(ghost, auth.mock_verifier("ghost"), "asked twice, same salt");
        assert_ne!(ghost.salt, auth.mock_verifier("ghost2").salt);
        assert_eq!(ghost.salt.len(), 16);
        assert_eq!(ghost.iterations, scram::DEFAULT_ITERATIONS);
        drop(auth);
        assert_eq!(
            with_key(&key).mock_verifier("ghost"),
            ghost,
            "another instance with the same key file"
        );
        assert_ne!(
            with_key(&dir.path().join("other_key")).mock_verifier("ghost"),
            ghost,
            "another key, another salt"
        );
        let none = ScramAuth::new(&ScramConfig {
            secrets_file: None,
            auth_query: None,
            mock_key: None,
        });
        assert!(matches!(none, Err(SourceError::NoMockKey)));
    }
}
