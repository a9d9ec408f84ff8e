//! `[cluster]` and `[auth]`: the Redis a fleet of instances shares (its
//! URL, password and CA files, this instance's name, the fleet's secret,
//! the time Redis may take), and where scram upstreams get the key for
//! unknown users' mock salts (the fleet's secret, else `[auth]
//! mock_key_file`). Owns `ClusterConfig` and both conversions.

use std::path::PathBuf;
use std::time::Duration;

use super::error::{ConfigError, Section};
use super::raw::{RawAuth, RawCluster};
use crate::auth::mock_key::{default_key_file, MockKeySource};

/// A fleet of pgbastion instances sharing cancel mappings, failed-login
/// counts and per-identity session counts through Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `redis://` or `rediss://` (TLS, verified), without a password.
    pub redis: String,
    pub redis_password_file: Option<PathBuf>,
    /// The CA bundle a `rediss://` server's certificate must chain to
    /// (default: the system's roots).
    pub redis_ca_file: Option<PathBuf>,
    /// This instance's name in Redis and in audit events.
    pub instance: String,
    /// The key the fleet shares: what Redis keys are hashed and cancel
    /// mappings encrypted with.
    pub secret_file: PathBuf,
    /// How long any Redis call may take before the session goes on
    /// without it.
    pub timeout: Duration,
    /// Prepended to every Redis key, so fleets can share a Redis.
    pub key_prefix: String,
}

impl RawCluster {
    pub(super) fn validate(self) -> Result<ClusterConfig, ConfigError> {
        let url = self.redis.trim();
        check_redis_url(url)?;
        if self.redis_ca_file.is_some() && !url.starts_with("rediss://") {
            return Err(Section::Cluster
                .key("redis_ca_file")
                .invalid("is set but cluster.redis is not rediss://: the CA would not be used"));
        }
        let instance = match self.instance {
            Some(i) => i,
            None => rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned(),
        };
        if instance.is_empty() || instance.len() > 128 {
            return Err(Section::Cluster
                .key("instance")
                .invalid("must be 1 to 128 characters"));
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(10) {
            return Err(Section::Cluster
                .key("timeout")
                .invalid("must be more than 0 and at most 10s (sessions wait for it)"));
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(char::is_whitespace) {
            return Err(Section::Cluster
                .key("key_prefix")
                .invalid("must be non-empty without spaces"));
        }
        Ok(ClusterConfig {
            redis: url.to_owned(),
            redis_password_file: self.redis_password_file,
            redis_ca_file: self.redis_ca_file,
            instance,
            secret_file: self.secret_file,
            timeout: self.timeout,
            key_prefix: self.key_prefix,
        })
    }
}

/// A Redis URL pgbastion will use: redis:// or rediss://, always verified,
/// with no password in it (URLs show up in logs and process listings).
/// The message never repeats the URL's password.
fn check_redis_url(url: &str) -> Result<(), ConfigError> {
    let at = Section::Cluster.key("redis");
    let rest = if let Some(r) = url.strip_prefix("rediss://") {
        r
    } else if let Some(r) = url.strip_prefix("redis://") {
        r
    } else {
        return Err(at.invalid(format!(
            "{url:?}: use redis://host:port/db, or rediss://host:port/db for TLS"
        )));
    };
    if url.contains('#') {
        return Err(at.invalid(
            "URL fragments (like #insecure) are not accepted: a rediss:// server is always verified; set cluster.redis_ca_file for a private CA",
        ));
    }
    let authority = rest.split('/').next().unwrap_or("");
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        if userinfo.contains(':') {
            return Err(at.invalid(
                "put the password in cluster.redis_password_file, not in the URL (the URL shows up in logs and process listings)",
            ));
        }
    }
    Ok(())
}

impl RawAuth {
    /// issue 19 item 5: the fleet's secret, else a key file of this
    /// instance (none found: ScramAuth refuses to start without one).
    pub(super) fn mock_key(self, cluster: Option<&ClusterConfig>) -> Option<MockKeySource> {
        match cluster {
            Some(c) => Some(MockKeySource::ClusterSecret(c.secret_file.clone())),
            None => self
                .mock_key_file
                .or_else(default_key_file)
                .map(MockKeySource::KeyFile),
        }
    }
}
