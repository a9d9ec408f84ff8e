//! The key mock verifiers are derived from (issue 19 item 5).
//!
//! A user who does not exist gets a full SCRAM exchange with a fake salt
//! (see `source::ScramAuth::mock_verifier`). That salt must be the same
//! every time anyone asks, from any instance and across restarts:
//! otherwise asking twice, through a round-robin balancer or before and
//! after a restart, tells an unknown user (salt changes) from a real one
//! (salt stays). PostgreSQL derives its mock salt from the cluster's
//! `mock_authentication_nonce`, made once at initdb; pgbastion derives it
//! from a secret that lives as long:
//!
//! - the fleet's `[cluster] secret_file`, when set: every instance shares it;
//! - else a key file pgbastion makes once (32 random bytes, mode 0600):
//!   `[auth] mock_key_file`, by default `mock_key` in the state directory
//!   (`$STATE_DIRECTORY`, as systemd's `StateDirectory=` sets it, else
//!   `$XDG_STATE_HOME/pgbastion`, else `~/.local/state/pgbastion`).
//!
//! Either way the key used is an HMAC of the secret under a label of its
//! own, so the cluster secret is never used for two things directly.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::auth::scram::{Key, KEY_LEN};
use crate::secret_file::{self, SecretFileError};

/// The label the mock key is derived under.
const LABEL: &[u8] = b"pgbastion mock SCRAM salt v1";

/// Where the stable secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MockKeySource {
    /// `[cluster] secret_file`: the fleet shares it.
    ClusterSecret(PathBuf),
    /// A key file of this instance, made on first use.
    KeyFile(PathBuf),
}

impl std::fmt::Display for MockKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MockKeySource::ClusterSecret(p) => write!(f, "[cluster] secret_file {}", p.display()),
            MockKeySource::KeyFile(p) => write!(f, "mock_key_file {}", p.display()),
        }
    }
}

#[derive(Debug, Error)]
pub enum MockKeyError {
    #[error(transparent)]
    File(#[from] SecretFileError),
    #[error("mock_key_file {path}: expected exactly {KEY_LEN} bytes (pgbastion writes it), found {len}; remove it to have a new one made")]
    Length { path: PathBuf, len: usize },
    #[error("cannot create mock_key_file {path}: {source}; create it yourself (head -c 32 /dev/urandom > FILE; chmod 600 FILE) or set [auth] mock_key_file to a path pgbastion may write")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The default key file: `mock_key` in pgbastion's state directory. None
/// when the environment names no such directory.
pub fn default_key_file() -> Option<PathBuf> {
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let dir = if let Some(dirs) = env("STATE_DIRECTORY") {
        // systemd may list several, colon-separated: the first is ours.
        let first = dirs.to_string_lossy().split(':').next()?.to_owned();
        PathBuf::from(first)
    } else if let Some(state) = env("XDG_STATE_HOME") {
        PathBuf::from(state).join("pgbastion")
    } else {
        PathBuf::from(env("HOME")?).join(".local/state/pgbastion")
    };
    Some(dir.join("mock_key"))
}

/// The key mock verifiers are made with; creates the key file when it does
/// not exist yet.
pub fn load(source: &MockKeySource) -> Result<Key, MockKeyError> {
    let secret = match source {
        // As the fleet reads it.
        MockKeySource::ClusterSecret(path) => secret_file::read_bytes(path, "secret_file")?,
        MockKeySource::KeyFile(path) => key_file(path)?,
    };
    Ok(crate::crypto::hmac(&secret, LABEL))
}

/// Reads the key file, or makes it: 32 random bytes written to a private
/// temporary file, then linked into place, so that instances starting at
/// the same time agree on one key and nobody ever reads half a file.
fn key_file(path: &Path) -> Result<Vec<u8>, MockKeyError> {
    if !path.exists() {
        create(path).map_err(|source| MockKeyError::Create {
            path: path.to_owned(),
            source,
        })?;
    }
    // Exactly as written: a random key may end in a newline byte.
    let bytes = secret_file::read_raw(path, "mock_key_file")?;
    if bytes.len() != KEY_LEN {
        return Err(MockKeyError::Length {
            path: path.to_owned(),
            len: bytes.len(),
        });
    }
    Ok(bytes)
}

fn create(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let tmp = dir.join(format!(".mock_key.{:016x}", rand::random::<u64>()));
    let mut key = [0u8; KEY_LEN];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut key);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(&key)?;
            f.sync_all()
        });
    // A link fails if the name exists: whoever linked first wins, and the
    // others read that key.
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_file_is_made_once_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/sub/mock_key");
        let source = MockKeySource::KeyFile(path.clone());
        let first = load(&source).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), KEY_LEN as u64);
        assert_eq!(load(&source).unwrap(), first, "reused, not remade");
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["mock_key"]);
        // Others may not read it; a truncated file is not used.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load(&source).unwrap_err().to_string().contains("mode 0644"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            load(&source),
            Err(MockKeyError::Length { len: 5, .. })
        ));
    }

    #[test]
    fn many_starting_at_once_agree_on_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let source = MockKeySource::KeyFile(dir.path().join("mock_key"));
        let keys: Vec<Key> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8).map(|_| s.spawn(|| load(&source).unwrap())).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]));
    }

    #[test]
    fn cluster_secret_gives_the_fleet_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet");
        std::fs::write(&path, "a fleet secret of at least 32 bytes!!\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let source = MockKeySource::ClusterSecret(path.clone());
        let key = load(&source).unwrap();
        assert_eq!(key, load(&source).unwrap());
        // Derived, not the secret itself; the line ending does not count.
        assert_ne!(&key[..], &b"a fleet secret of at least 32 bytes!!"[..32]);
        std::fs::write(&path, "a fleet secret of at least 32 bytes!!").unwrap();
        assert_eq!(load(&source).unwrap(), key);
    }
}
