//! `[[upstream]]`: the PostgreSQL servers pgbastion connects to, how their
//! certificates are verified, and how sessions authenticate to them
//! (passthrough, or scram with a secrets file and/or `auth_query`), and
//! whether their server connections are pooled (`pool_mode` and its keys).
//! Owns the upstream types and the conversion from `RawUpstream`.

use crate::audit::event::LoginMode;
use std::path::PathBuf;
use std::time::Duration;

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

/// What `address`, `server_name` and `database` may contain: the
/// session's endpoint, so one upstream serves a database per tenant.
pub const ENDPOINT_PLACEHOLDER: &str = "{endpoint}";

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    /// Host (DNS name or IP) and port, as written: resolved per connection
    /// so DNS changes (failovers of managed databases) are followed. The
    /// host may hold `{endpoint}` (see `for_endpoint`).
    pub host: String,
    pub port: u16,
    /// The name the upstream certificate must carry: `server_name` if set,
    /// else the host.
    pub server_name: String,
    /// The database asked of the server instead of the client's (None:
    /// the client's).
    pub database: Option<String>,
    /// The endpoint this configuration was made for by `for_endpoint`
    /// (None: as written).
    pub endpoint: Option<crate::routing::Endpoint>,
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
    /// Whether this upstream is a template: `{endpoint}` in its address,
    /// server_name or database, filled in per session.
    pub fn is_templated(&self) -> bool {
        self.endpoint.is_none()
            && [&self.host, &self.server_name]
                .into_iter()
                .chain(self.database.as_ref())
                .any(|v| v.contains(ENDPOINT_PLACEHOLDER))
    }

    /// This upstream for one endpoint: `{endpoint}` replaced everywhere it
    /// may appear. An endpoint is a DNS label (`Endpoint`), so the host it
    /// makes is one the configuration's check already accepted the shape of.
    pub fn for_endpoint(&self, endpoint: &crate::routing::Endpoint) -> UpstreamConfig {
        let fill = |v: &str| v.replace(ENDPOINT_PLACEHOLDER, endpoint.as_str());
        UpstreamConfig {
            host: fill(&self.host),
            server_name: fill(&self.server_name),
            database: self.database.as_deref().map(fill),
            endpoint: Some(endpoint.clone()),
            ..self.clone()
        }
    }

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
        self.check_templates(&at)?;
        let server_name = self.server_name.clone().unwrap_or_else(|| host.clone());
        // A template is checked as a sample endpoint would fill it.
        let sample = server_name.replace(ENDPOINT_PLACEHOLDER, "endpoint");
        if rustls::pki_types::ServerName::try_from(sample.as_str()).is_err() {
            return Err(at.key("server_name").invalid(format!(
                "{server_name:?} is neither a DNS name nor an IP address"
            )));
        }
        if self.database.as_deref() == Some("") {
            return Err(at.key("database").invalid(
                "must not be empty (leave it out to ask for the database the client names)",
            ));
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
        let pool = self.pool(&at)?;
        let database = self.database.clone();
        let scram = self.scram(&at)?;
        Ok(UpstreamConfig {
            name,
            host,
            port,
            server_name,
            database,
            endpoint: None,
            roots,
            client_identity,
            tls_negotiation,
            min_tls_version,
            send_proxy_protocol,
            scram,
            pool,
        })
    }

    /// `{endpoint}` only where it is filled in (the host of `address`,
    /// `server_name`, `database`), and no other `{...}` anywhere: a typo
    /// such as `{endpiont}` would otherwise reach DNS as written.
    fn check_templates(&self, at: &Section) -> Result<(), ConfigError> {
        let (host, port) = self
            .address
            .rsplit_once(':')
            .unwrap_or((self.address.as_str(), ""));
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
        let templated = [
            ("address", Some(host.to_owned())),
            ("server_name", self.server_name.clone()),
            ("database", self.database.clone()),
        ];
        let plain = [
            ("name", self.name.clone()),
            ("address", Some(port.to_owned())),
            ("auth_user", self.auth_user.clone()),
            ("auth_database", self.auth_database.clone()),
            ("ca_file", path(&self.ca_file)),
            ("ca_dir", path(&self.ca_dir)),
            ("client_cert", path(&self.client_cert)),
            ("client_key", path(&self.client_key)),
            ("secrets_file", path(&self.secrets_file)),
            ("auth_password_file", path(&self.auth_password_file)),
        ];
        for (key, value) in templated {
            let Some(value) = value else { continue };
            if value.replace(ENDPOINT_PLACEHOLDER, "").contains(['{', '}']) {
                return Err(at.key(key).invalid(format!(
                    "{value:?}: the only placeholder is {ENDPOINT_PLACEHOLDER}"
                )));
            }
        }
        check_host_template(at, host)?;
        for (key, value) in plain {
            if value.is_some_and(|v| v.contains(ENDPOINT_PLACEHOLDER)) {
                return Err(at.key(key).invalid(format!(
                    "does not take {ENDPOINT_PLACEHOLDER}: only the host of address, \
                     server_name and database are filled in per endpoint"
                )));
            }
        }
        Ok(())
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

/// The largest `pool_size` and `max_prepared_statements`: beyond these a
/// value is a slip of the keyboard, not a plan (servers rarely allow more
/// than a few thousand connections).
const POOL_COUNT_MAX: usize = 10_000;

/// The shortest pool duration: below a second, connections would be
/// closed and reopened (or clients turned away) all the time.
const POOL_DURATION_MIN: Duration = Duration::from_secs(1);

impl RawUpstream {
    /// `pool_mode` and its keys. Refused where sharing server connections
    /// cannot be right: without a key of pgbastion's own to log in with
    /// (passthrough), or with a PROXY header that would speak for one
    /// client on a connection many use.
    fn pool(&self, at: &Section) -> Result<Option<PoolConfig>, ConfigError> {
        let Some(mode) = self.pool_mode else {
            return match self.first_pool_key() {
                Some(key) => Err(at.key(key).invalid(format!(
                    "{key} has no effect without pool_mode = \"transaction\" or \"session\""
                ))),
                None => Ok(None),
            };
        };
        if self.auth == AuthMode::Passthrough {
            return Err(at.key("pool_mode").invalid(
                "pooling needs a key pgbastion holds to log in to the server on its own, and \
                 auth = \"passthrough\" gives it none (each client logs in end to end): set \
                 auth = \"scram\" with secrets_file and/or auth_user + auth_password_file \
                 (auth_query); identity login (rules with login = \"identity\") then also works",
            ));
        }
        if self.send_proxy_protocol != SendProxyProtocol::Off {
            return Err(at.key("send_proxy_protocol").invalid(
                "a PROXY header is sent once per server connection and would describe only its \
                 first client, yet pool_mode shares server connections between clients: leave \
                 send_proxy_protocol out and say who the client is with [forward.settings] \
                 (e.g. \"pgbastion.identity\" = \"{identity}\", \"pgbastion.client_addr\" = \
                 \"{client_addr}\"), which pgbastion applies to every pooled transaction",
            ));
        }
        let default = PoolConfig::default();
        let size = count(at, "pool_size", self.pool_size, default.size)?;
        let min_size = self.min_pool_size.unwrap_or(default.min_size);
        if min_size > size {
            return Err(at.key("min_pool_size").invalid(format!(
                "{min_size} is more than pool_size ({size}): a pool cannot keep more \
                 connections open than it may hold"
            )));
        }
        if self.max_server_connections == Some(0) {
            return Err(at.key("max_server_connections").invalid(
                "must be at least 1 (leave it out for no bound beyond each pool's pool_size)",
            ));
        }
        Ok(Some(PoolConfig {
            mode,
            size,
            min_size,
            max_server_connections: self.max_server_connections,
            server_idle_timeout: duration(
                at,
                "server_idle_timeout",
                self.server_idle_timeout,
                default.server_idle_timeout,
            )?,
            server_lifetime: duration(
                at,
                "server_lifetime",
                self.server_lifetime,
                default.server_lifetime,
            )?,
            query_wait_timeout: duration(
                at,
                "query_wait_timeout",
                self.query_wait_timeout,
                default.query_wait_timeout,
            )?,
            max_prepared_statements: count(
                at,
                "max_prepared_statements",
                self.max_prepared_statements,
                default.max_prepared_statements,
            )?,
        }))
    }

    /// The first pool key written (they mean nothing without `pool_mode`).
    fn first_pool_key(&self) -> Option<&'static str> {
        [
            ("pool_size", self.pool_size.is_some()),
            ("min_pool_size", self.min_pool_size.is_some()),
            (
                "max_server_connections",
                self.max_server_connections.is_some(),
            ),
            ("server_idle_timeout", self.server_idle_timeout.is_some()),
            ("server_lifetime", self.server_lifetime.is_some()),
            ("query_wait_timeout", self.query_wait_timeout.is_some()),
            (
                "max_prepared_statements",
                self.max_prepared_statements.is_some(),
            ),
        ]
        .into_iter()
        .find_map(|(key, set)| set.then_some(key))
    }
}

/// A templated host puts `{endpoint}` in a label of its own next to at
/// least one fixed label (`{endpoint}.tenants.internal`): a host that is
/// the endpoint alone would let a client name any single-label host the
/// resolver completes, or an IP address (`2130706433` and `0x7f000001`
/// are 127.0.0.1 to the C library).
fn check_host_template(at: &Section, host: &str) -> Result<(), ConfigError> {
    if !host.contains(ENDPOINT_PLACEHOLDER) {
        return Ok(());
    }
    let labels: Vec<&str> = host.split('.').collect();
    let whole = labels
        .iter()
        .all(|l| *l == ENDPOINT_PLACEHOLDER || !l.contains(ENDPOINT_PLACEHOLDER));
    let fixed = labels.iter().any(|l| !l.contains(ENDPOINT_PLACEHOLDER));
    let sample = host
        .replace(ENDPOINT_PLACEHOLDER, "endpoint")
        .to_ascii_lowercase();
    if !(whole && fixed && crate::routing::name::is_dns_name(&sample)) {
        return Err(at.key("address").invalid(format!(
            "{host:?}: {ENDPOINT_PLACEHOLDER} must be a whole label of a DNS name with at least \
             one fixed label (\"{ENDPOINT_PLACEHOLDER}.tenants.internal:5432\"), so the host a client \
             names is always under your domain"
        )));
    }
    Ok(())
}

/// A pool count: `default` when not written, else 1 to `POOL_COUNT_MAX`.
fn count(
    at: &Section,
    key: &'static str,
    value: Option<usize>,
    default: usize,
) -> Result<usize, ConfigError> {
    let n = value.unwrap_or(default);
    if !(1..=POOL_COUNT_MAX).contains(&n) {
        return Err(at
            .key(key)
            .invalid(format!("must be between 1 and {POOL_COUNT_MAX}, not {n}")));
    }
    Ok(n)
}

/// A pool duration: `default` when not written, else at least
/// `POOL_DURATION_MIN`.
fn duration(
    at: &Section,
    key: &'static str,
    value: Option<Duration>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let d = value.unwrap_or(default);
    if d < POOL_DURATION_MIN {
        return Err(at.key(key).invalid(format!(
            "must be at least 1s, not {}",
            humantime::format_duration(d)
        )));
    }
    Ok(d)
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
