//! `[[upstream]]`: the PostgreSQL servers pgbastion connects to, how their
//! certificates are verified, and how sessions authenticate to them
//! (passthrough, or scram with a secrets file and/or `auth_query`). Owns
//! the upstream types and the conversion from `RawUpstream`.

use crate::audit::event::LoginMode;
use std::path::PathBuf;

use serde::Deserialize;

use super::error::{ConfigError, Section};
use super::raw::RawUpstream;
use super::TlsVersion;

/// Which PROXY protocol header pgbastion sends to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendProxyProtocol {
    /// None: stock PostgreSQL fails connections that start with one.
    #[default]
    Off,
    V1,
    V2,
}

/// How pgbastion starts TLS with an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsNegotiation {
    /// SSLRequest first, then TLS (every PostgreSQL version).
    #[default]
    Postgres,
    /// TLS straight away with ALPN `postgresql` (PostgreSQL 17+).
    Direct,
}

/// Who authenticates the client to the database (see `auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// The client authenticates to the server end to end; pgbastion only
    /// watches. SCRAM channel binding cannot work.
    #[default]
    Passthrough,
    /// pgbastion terminates SCRAM on both legs, channel-bound, with the
    /// user's verifier.
    Scram,
}

/// The audit log's name for how a session logs in, from the upstream's
/// mode (identity login is decided later, by the rule).
impl From<AuthMode> for LoginMode {
    fn from(mode: AuthMode) -> LoginMode {
        match mode {
            AuthMode::Passthrough => LoginMode::Passthrough,
            AuthMode::Scram => LoginMode::Scram,
        }
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    /// Host (DNS name or IP) and port, as written: resolved per connection
    /// so DNS changes (failovers of managed databases) are followed.
    pub host: String,
    pub port: u16,
    /// The name the upstream certificate must carry: `server_name` if set,
    /// else the host.
    pub server_name: String,
    pub roots: RootSources,
    pub client_identity: Option<(PathBuf, PathBuf)>,
    pub tls_negotiation: TlsNegotiation,
    pub min_tls_version: TlsVersion,
    pub send_proxy_protocol: SendProxyProtocol,
    /// None: passthrough.
    pub scram: Option<ScramConfig>,
    /// None: one server connection per client session (no pooling).
    pub pool: Option<PoolConfig>,
}

/// How sessions share server connections (`pool_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A server connection per client session, borrowed from the pool and
    /// cleaned when given back.
    Session,
    /// A server connection per transaction.
    Transaction,
}

impl PoolMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        }
    }
}

/// An upstream's pool settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub mode: PoolMode,
    /// Server connections per (database, user) pool, in use or idle.
    pub size: usize,
    /// Connections each pool keeps open even when idle.
    pub min_size: usize,
    /// All pools of the upstream together (None: no bound beyond the
    /// pools' own).
    pub max_server_connections: Option<usize>,
    /// An idle server connection is closed after this long.
    pub server_idle_timeout: std::time::Duration,
    /// A server connection is closed (when next idle) after this long.
    pub server_lifetime: std::time::Duration,
    /// How long a client waits for a free server connection.
    pub query_wait_timeout: std::time::Duration,
    /// Named prepared statements kept per server connection (LRU).
    pub max_prepared_statements: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Transaction,
            size: 20,
            min_size: 0,
            max_server_connections: None,
            server_idle_timeout: std::time::Duration::from_secs(600),
            server_lifetime: std::time::Duration::from_secs(3600),
            query_wait_timeout: std::time::Duration::from_secs(120),
            max_prepared_statements: 200,
        }
    }
}

impl UpstreamConfig {
    pub fn auth_mode(&self) -> AuthMode {
        match self.scram {
            Some(_) => AuthMode::Scram,
            None => AuthMode::Passthrough,
        }
    }
}

/// Where scram mode finds verifiers: at least one of the two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScramConfig {
    /// PgBouncer-format userlist; re-read on SIGHUP.
    pub secrets_file: Option<PathBuf>,
    pub auth_query: Option<AuthQueryConfig>,
    /// The stable secret unknown users' mock salts come from (set for
    /// every scram upstream once `[cluster]` and `[auth]` are read).
    pub mock_key: Option<crate::auth::mock_key::MockKeySource>,
}

/// Looking verifiers up on the server as a dedicated role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthQueryConfig {
    pub user: String,
    pub password_file: PathBuf,
    pub database: String,
    pub query: String,
}

/// The default `auth_query`: the lookup function docs/authentication.md installs.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT usename, passwd FROM pgbastion.lookup($1)";

/// Where trusted root certificates for an upstream come from. At least one
/// source is required: pgbastion never connects without verification.
#[derive(Debug, Clone, Default)]
pub struct RootSources {
    pub ca_file: Option<PathBuf>,
    pub ca_dir: Option<PathBuf>,
    pub system: bool,
}

impl RawUpstream {
    /// The upstream at `index` (0-based; unnamed upstreams are
    /// `upstream<index>`).
    pub(super) fn validate(self, index: usize) -> Result<UpstreamConfig, ConfigError> {
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| format!("upstream{index}"));
        let at = Section::Upstream(name.clone());
        let (host, port) = split_host_port(&self.address).ok_or_else(|| {
            at.key("address").invalid(format!(
                "{:?} is not HOST:PORT (IPv6 as \"[::1]:5432\")",
                self.address
            ))
        })?;
        let server_name = self.server_name.clone().unwrap_or_else(|| host.clone());
        if rustls::pki_types::ServerName::try_from(server_name.as_str()).is_err() {
            return Err(at.key("server_name").invalid(format!(
                "{server_name:?} is neither a DNS name nor an IP address"
            )));
        }
        let roots = RootSources {
            ca_file: self.ca_file.clone(),
            ca_dir: self.ca_dir.clone(),
            system: self.system_roots,
        };
        if roots.ca_file.is_none() && roots.ca_dir.is_none() && !roots.system {
            return Err(at.whole().invalid(
                "no trusted roots: set ca_file, ca_dir and/or system_roots = true \
                 (pgbastion always verifies the upstream certificate)",
            ));
        }
        let client_identity = match (self.client_cert.clone(), self.client_key.clone()) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err(at.whole().invalid("client_cert and client_key go together")),
        };
        let (tls_negotiation, min_tls_version, send_proxy_protocol) = (
            self.tls_negotiation,
            self.min_tls_version,
            self.send_proxy_protocol,
        );
        let scram = self.scram(&at)?;
        Ok(UpstreamConfig {
            name,
            host,
            port,
            server_name,
            roots,
            client_identity,
            tls_negotiation,
            min_tls_version,
            send_proxy_protocol,
            scram,
            // Written from `pool_mode` and its keys by `RawUpstream::pool`.
            pool: None,
        })
    }

    /// `auth` and where scram mode finds verifiers.
    fn scram(self, at: &Section) -> Result<Option<ScramConfig>, ConfigError> {
        let auth_query = match (self.auth_user, self.auth_password_file) {
            (Some(user), Some(password_file)) => Some(AuthQueryConfig {
                user,
                password_file,
                database: self.auth_database.unwrap_or_else(|| "postgres".into()),
                query: self.auth_query.unwrap_or_else(|| DEFAULT_AUTH_QUERY.into()),
            }),
            (None, None) if self.auth_database.is_some() || self.auth_query.is_some() => {
                return Err(at.whole().invalid(
                    "auth_database and auth_query need auth_user and auth_password_file",
                ))
            }
            (None, None) => None,
            _ => {
                return Err(at.whole().invalid(
                    "auth_user and auth_password_file go together \
                     (the role pgbastion logs in as to look verifiers up, and the file holding its password)",
                ))
            }
        };
        match self.auth {
            AuthMode::Passthrough => {
                if self.secrets_file.is_some() || auth_query.is_some() {
                    return Err(at.key("auth").invalid(
                        "secrets_file and auth_user are for auth = \"scram\"; \
                         this upstream uses auth = \"passthrough\"",
                    ));
                }
                Ok(None)
            }
            AuthMode::Scram => {
                if self.secrets_file.is_none() && auth_query.is_none() {
                    return Err(at.key("auth").invalid(
                        "\"scram\" needs a source of SCRAM verifiers: \
                         secrets_file = \"FILE\" (PgBouncer's auth_file format), and/or \
                         auth_user + auth_password_file (a role that may run auth_query on the server)",
                    ));
                }
                Ok(Some(ScramConfig {
                    secrets_file: self.secrets_file,
                    auth_query,
                    mock_key: None,
                }))
            }
        }
    }
}

/// Splits "host:port", "1.2.3.4:port" or "[v6]:port".
pub(super) fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        (h, p)
    } else {
        let (h, p) = s.rsplit_once(':')?;
        if h.contains(':') {
            return None;
        }
        (h, p)
    };
    if host.is_empty() {
        return None;
    }
    Some((host.to_owned(), port.parse().ok()?))
}
