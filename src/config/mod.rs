//! The one configuration model, read from TOML or built from command-line
//! flags, and validated up front.
//!
//! `RawConfig` mirrors the file (unknown keys are refused, so a typo never
//! silently becomes a default); `Config` is the validated form the rest of
//! pgbastion uses, with strong types instead of strings. Files named in the
//! config (certificates, keys) are read later by `tls`, but `check-config`
//! runs that step too, so every mistake is found before `run`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::audit::event::{CredentialKind, LoginMode};
use crate::identity::cert::{CertName, DEFAULT_ORDER};
use crate::identity::IdentitySource;
use crate::policy::{Action, Login, Policy, Rule};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// Whether a listener insists on TLS from its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientTlsMode {
    /// Plaintext StartupMessages are refused with SQLSTATE 28000.
    Require,
    /// Plaintext is accepted: for Unix sockets, loopback and overlay
    /// networks that already protect the client leg.
    Allow,
}

/// Whether a listener accepts CancelRequests sent without TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CancelPlaintext {
    /// Accepted: libpq before 17 (psql's Ctrl-C) and most drivers always
    /// send cancels in plaintext, and a cancel carries no credentials.
    #[default]
    Allow,
    /// Refused: only cancels inside TLS are honoured.
    Deny,
}

/// Whether a listener expects a PROXY protocol header (never guessed: the
/// specification forbids detecting it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    Off,
    /// Every connection must start with a v1 or v2 header, from a trusted
    /// source network.
    Required,
}

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

impl From<AuthMode> for LoginMode {
    fn from(mode: AuthMode) -> LoginMode {
        match mode {
            AuthMode::Passthrough => LoginMode::Passthrough,
            AuthMode::Scram => LoginMode::Scram,
        }
    }
}

/// The lowest TLS version accepted on a leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

// ---------------------------------------------------------------------------
// The file format.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    tls: Option<RawTls>,
    #[serde(default, rename = "listener")]
    listeners: Vec<RawListener>,
    #[serde(default, rename = "upstream")]
    upstreams: Vec<RawUpstream>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    timeouts: Timeouts,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default, rename = "rule")]
    rules: Vec<Rule>,
    #[serde(default)]
    tailscale: Option<RawTailscale>,
    #[serde(default)]
    forward: RawForward,
    #[serde(default, rename = "credential")]
    credentials: Vec<RawCredential>,
    #[serde(default)]
    admin: Option<AdminConfig>,
    #[serde(default)]
    reload: ReloadConfig,
    #[serde(default)]
    cluster: Option<RawCluster>,
    #[serde(default)]
    auth: RawAuth,
}

/// `[auth]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    /// Where the key for unknown users' mock salts is made and kept when
    /// there is no `[cluster] secret_file` (see `auth::mock_key`).
    mock_key_file: Option<PathBuf>,
}

/// `[cluster]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    redis: String,
    redis_password_file: Option<PathBuf>,
    redis_ca_file: Option<PathBuf>,
    instance: Option<String>,
    secret_file: PathBuf,
    #[serde(default = "default_cluster_timeout", with = "humantime_serde")]
    timeout: Duration,
    #[serde(default = "default_key_prefix")]
    key_prefix: String,
}

fn default_cluster_timeout() -> Duration {
    Duration::from_millis(250)
}

fn default_key_prefix() -> String {
    "pgbastion".into()
}

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
    fn validate(self) -> Result<ClusterConfig, ConfigError> {
        let url = self.redis.trim();
        let rest = if let Some(r) = url.strip_prefix("rediss://") {
            r
        } else if let Some(r) = url.strip_prefix("redis://") {
            r
        } else {
            return Err(invalid(format!(
                "cluster.redis {url:?}: use redis://host:port/db, or rediss://host:port/db for TLS"
            )));
        };
        if url.contains('#') {
            return Err(invalid(
                "cluster.redis: URL fragments (like #insecure) are not accepted: a rediss:// server is always verified; set cluster.redis_ca_file for a private CA",
            ));
        }
        let authority = rest.split('/').next().unwrap_or("");
        if let Some((userinfo, _)) = authority.rsplit_once('@') {
            if userinfo.contains(':') {
                return Err(invalid(
                    "cluster.redis: put the password in cluster.redis_password_file, not in the URL (the URL shows up in logs and process listings)",
                ));
            }
        }
        if self.redis_ca_file.is_some() && !url.starts_with("rediss://") {
            return Err(invalid(
                "cluster.redis_ca_file is set but cluster.redis is not rediss://: the CA would not be used",
            ));
        }
        let instance = match self.instance {
            Some(i) => i,
            None => rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned(),
        };
        if instance.is_empty() || instance.len() > 128 {
            return Err(invalid("cluster.instance must be 1 to 128 characters"));
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(10) {
            return Err(invalid(
                "cluster.timeout must be more than 0 and at most 10s (sessions wait for it)",
            ));
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(char::is_whitespace) {
            return Err(invalid(
                "cluster.key_prefix must be non-empty without spaces",
            ));
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

/// Reloading without a signal: when a file the configuration names (or
/// the configuration itself) changes, as when Kubernetes swaps a mounted
/// Secret, pgbastion reloads once the files have been still for `debounce`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    pub watch: bool,
    #[serde(with = "humantime_serde")]
    pub debounce: Duration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch: false,
            debounce: Duration::from_secs(2),
        }
    }
}

/// The admin HTTP listener: `/metrics`, `/livez`, `/readyz`, `/startupz`.
/// Off unless configured; bind it to loopback or a management network.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// At shutdown, how long `/readyz` says 503 before the listeners close,
    /// so a load balancer (or Kubernetes) stops sending new clients first.
    #[serde(default, with = "humantime_serde")]
    pub unready_grace: Duration,
    /// Connections served at once; more are closed as soon as they are
    /// accepted, so strangers cannot hold memory and file descriptors.
    #[serde(default = "default_admin_connections")]
    pub max_connections: usize,
    /// How long one connection may take to send its request and read the
    /// answer.
    #[serde(default = "default_admin_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
}

fn default_admin_connections() -> usize {
    256
}

fn default_admin_timeout() -> Duration {
    Duration::from_secs(5)
}

/// A `[[credential]]` section as written: one kind of credential must be
/// given. Secrets are never inline: every value is a file or a variable
/// name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    upstream: Option<String>,
    user: String,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
    scram_secret: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    rds_iam: Option<RdsIamConfig>,
}

/// Amazon RDS / Aurora IAM authentication for a credential.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RdsIamConfig {
    /// The database's AWS region, e.g. `eu-west-1`.
    pub region: String,
}

/// What pgbastion logs in with, for `login = "identity"` sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    /// A password in a file (0600), answered to SCRAM (bound to the
    /// server's certificate) or to a cleartext request over verified TLS.
    PasswordFile(PathBuf),
    /// A password in an environment variable of pgbastion's.
    PasswordEnv(String),
    /// A file (0600) with the role's SCRAM verifier on its first line and
    /// the base64 ClientKey on its second: a SCRAM login with no password.
    ScramSecret(PathBuf),
    /// A client certificate for the server's `cert` method, presented on
    /// the session's upstream TLS handshake.
    ClientCert { cert: PathBuf, key: PathBuf },
    /// An RDS IAM auth token, made per login from AWS credentials.
    RdsIam(RdsIamConfig),
}

impl CredentialSource {
    /// The kind, as the audit log names it.
    pub fn kind(&self) -> CredentialKind {
        match self {
            CredentialSource::PasswordFile(_) | CredentialSource::PasswordEnv(_) => {
                CredentialKind::Password
            }
            CredentialSource::ScramSecret(_) => CredentialKind::ScramSecret,
            CredentialSource::ClientCert { .. } => CredentialKind::ClientCert,
            CredentialSource::RdsIam(_) => CredentialKind::RdsIam,
        }
    }
}

/// One `[[credential]]`: how pgbastion logs in as `user` on an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialConfig {
    /// Index into `Config::upstreams`.
    pub upstream: usize,
    pub user: String,
    pub source: CredentialSource,
}

impl RawCredential {
    fn validate(
        self,
        upstreams: &[UpstreamConfig],
        index: usize,
    ) -> Result<CredentialConfig, ConfigError> {
        let what = format!("credential {} (user {:?})", index + 1, self.user);
        let upstream = match &self.upstream {
            Some(name) => upstreams
                .iter()
                .position(|u| &u.name == name)
                .ok_or_else(|| invalid(format!("{what}: no upstream named {name:?}")))?,
            None if upstreams.len() == 1 => 0,
            None => {
                return Err(invalid(format!(
                    "{what}: upstream = \"...\" is needed when there is more than one upstream"
                )))
            }
        };
        if self.user.is_empty() {
            return Err(invalid(format!("{what}: user must not be empty")));
        }
        let source = match (
            self.password_file,
            self.password_env,
            self.scram_secret,
            self.client_cert,
            self.client_key,
            self.rds_iam,
        ) {
            (Some(f), None, None, None, None, None) => CredentialSource::PasswordFile(f),
            (None, Some(v), None, None, None, None) => CredentialSource::PasswordEnv(v),
            (None, None, Some(f), None, None, None) => CredentialSource::ScramSecret(f),
            (None, None, None, Some(cert), Some(key), None) => {
                CredentialSource::ClientCert { cert, key }
            }
            (None, None, None, None, None, Some(iam)) => CredentialSource::RdsIam(iam),
            (None, None, None, Some(_), None, None) | (None, None, None, None, Some(_), None) => {
                return Err(invalid(format!(
                    "{what}: client_cert and client_key go together"
                )))
            }
            _ => {
                return Err(invalid(format!(
                    "{what}: give exactly one of password_file, password_env, scram_secret, \
                     client_cert + client_key, rds_iam"
                )))
            }
        };
        Ok(CredentialConfig {
            upstream,
            user: self.user,
            source,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTailscale {
    socket: Option<PathBuf>,
    capability: Option<String>,
    #[serde(default, with = "humantime_serde::option")]
    timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    application_name: Option<String>,
    #[serde(default)]
    settings: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    min_version: TlsVersion,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Option<String>,
    listen: Option<String>,
    unix_dir: Option<PathBuf>,
    port: Option<u16>,
    client_tls: Option<ClientTlsMode>,
    #[serde(default)]
    cancel_plaintext: CancelPlaintext,
    upstream: Option<String>,
    #[serde(default)]
    identity: IdentitySource,
    client_ca: Option<PathBuf>,
    client_cert: Option<ClientCertMode>,
    cert_identity: Option<Vec<CertName>>,
    #[serde(default)]
    proxy_protocol: ProxyProtocol,
    #[serde(default)]
    proxy_trusted: Vec<ipnet::IpNet>,
}

/// Whether a `client_cert` listener insists on a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientCertMode {
    /// No certificate, no connection (the TLS handshake fails).
    Required,
    /// Clients without one are identified by their address.
    Optional,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: Option<String>,
    address: String,
    server_name: Option<String>,
    ca_file: Option<PathBuf>,
    ca_dir: Option<PathBuf>,
    #[serde(default)]
    system_roots: bool,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    #[serde(default)]
    tls_negotiation: TlsNegotiation,
    #[serde(default)]
    min_tls_version: TlsVersion,
    #[serde(default)]
    send_proxy_protocol: SendProxyProtocol,
    #[serde(default)]
    auth: AuthMode,
    secrets_file: Option<PathBuf>,
    auth_user: Option<String>,
    auth_password_file: Option<PathBuf>,
    auth_database: Option<String>,
    auth_query: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    /// A file path, or "-" for standard output.
    log: Option<String>,
    #[serde(default)]
    on_failure: AuditOnFailure,
    chain_key_file: Option<PathBuf>,
    /// Query audit: replace constants in statements (default true).
    redact: Option<bool>,
}

/// What pgbastion does while audit events cannot be written (the reader of
/// stdout stalls, the disk is full, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditOnFailure {
    /// Sessions go on; dropped events are counted and reported in the log.
    #[default]
    Continue,
    /// No unaudited session: new sessions are refused (SQLSTATE 08004)
    /// while events cannot be written, and admitted again once they can.
    Refuse,
}

/// Resource limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Authenticated sessions; one more gets SQLSTATE 53300. Logins in
    /// progress are bounded by the pending limits instead, so strangers
    /// cannot take the places of sessions.
    pub max_sessions: usize,
    /// Connections not yet authenticated (negotiating TLS and startup, or
    /// authenticating), per listener; past this, new connections are
    /// closed at once so a flood of idle sockets or stalled logins cannot
    /// starve real clients (nor other listeners).
    pub max_pending: usize,
    /// The same, per client address across listeners, so one address
    /// cannot take every slot (behind a PROXY-protocol balancer, the
    /// address its header states, once read).
    pub max_pending_per_address: usize,
    /// Cancel requests per second allowed from one client address.
    pub cancel_rate: f64,
    /// How many cancel requests one address may send in a burst.
    pub cancel_burst: f64,
    /// scram mode: failed logins one client address may have per
    /// `failed_login_window` before its logins are refused for a while.
    pub failed_logins_per_address: u32,
    /// scram mode: the same per user name, across addresses (higher, so
    /// that a guessing run cannot lock a real user out cheaply).
    pub failed_logins_per_user: u32,
    /// The window over which those failures are counted: the budget
    /// refills at `n / window`.
    #[serde(with = "humantime_serde")]
    pub failed_login_window: Duration,
    /// IPv6 clients are throttled (failed logins, cancel rate) per network
    /// of this prefix length, since one host usually holds a whole /64.
    pub ipv6_prefix: u8,
    /// scram mode: a spent `failed_logins_per_user` refuses the user from
    /// every address. Off (default): from an address with no recent
    /// failure, a correct proof still passes, so strangers cannot keep a
    /// user locked out.
    pub failed_logins_per_user_strict: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 1000,
            max_pending: 256,
            max_pending_per_address: 64,
            cancel_rate: 5.0,
            cancel_burst: 20.0,
            failed_logins_per_address: 10,
            failed_logins_per_user: 30,
            failed_login_window: Duration::from_secs(60),
            ipv6_prefix: 64,
            failed_logins_per_user_strict: false,
        }
    }
}

/// Deadlines for each phase that happens before the relay. After the relay
/// starts, a session may be idle for as long as client and server like.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// From accept to a complete StartupMessage, TLS handshake included.
    #[serde(with = "humantime_serde")]
    pub client_startup: Duration,
    /// TCP connect to one upstream address.
    #[serde(with = "humantime_serde")]
    pub upstream_connect: Duration,
    /// SSL negotiation and TLS handshake with the upstream.
    #[serde(with = "humantime_serde")]
    pub upstream_tls: Duration,
    /// From the StartupMessage sent upstream to ReadyForQuery (covers the
    /// client typing a password into psql's prompt, hence generous).
    #[serde(with = "humantime_serde")]
    pub authentication: Duration,
    /// Reading an inbound PROXY protocol header.
    #[serde(with = "humantime_serde")]
    pub proxy_header: Duration,
    /// Forwarding one cancel request: connect, TLS, send.
    #[serde(with = "humantime_serde")]
    pub cancel: Duration,
    /// After a client closes its sending side: how long the server's reply
    /// to what it sent last is still relayed before the session ends.
    #[serde(with = "humantime_serde")]
    pub half_close: Duration,
    /// After SIGTERM/SIGINT: how long sessions busy in a transaction may
    /// finish it (idle ones end at once).
    #[serde(with = "humantime_serde")]
    pub shutdown_drain: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            client_startup: Duration::from_secs(10),
            upstream_connect: Duration::from_secs(5),
            upstream_tls: Duration::from_secs(10),
            authentication: Duration::from_secs(60),
            proxy_header: Duration::from_secs(3),
            cancel: Duration::from_secs(5),
            half_close: Duration::from_secs(10),
            shutdown_drain: Duration::from_secs(30),
        }
    }
}

// ---------------------------------------------------------------------------
// The validated form.

/// pgbastion's certificate for the client leg.
#[derive(Debug, Clone)]
pub struct ClientTlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub min_version: TlsVersion,
}

/// Where a listener accepts connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindAddress {
    Tcp(SocketAddr),
    /// The full socket path, named `.s.PGSQL.<port>` inside the directory so
    /// `psql -h DIR -p PORT` finds it.
    Unix(PathBuf),
}

impl std::fmt::Display for BindAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindAddress::Tcp(a) => write!(f, "{a}"),
            BindAddress::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: BindAddress,
    pub client_tls: ClientTlsMode,
    pub cancel_plaintext: CancelPlaintext,
    pub identity: ListenerIdentity,
    pub proxy_protocol: ProxyProtocol,
    /// Networks a PROXY header is accepted from (TCP listeners).
    pub proxy_trusted: Vec<ipnet::IpNet>,
    /// Index into `Config::upstreams`.
    pub upstream: usize,
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

/// The default `auth_query`: the lookup function the README installs.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT usename, passwd FROM pgbastion.lookup($1)";

/// How a listener establishes who its clients are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerIdentity {
    Network,
    ClientCert {
        ca_file: PathBuf,
        mode: ClientCertMode,
        order: Vec<CertName>,
    },
    Tailscale,
}

/// Where tailscaled's LocalAPI is, and which peer capability carries
/// pgbastion's grants.
#[derive(Debug, Clone)]
pub struct TailscaleConfig {
    pub socket: PathBuf,
    pub capability: Option<String>,
    pub timeout: Duration,
}

/// The placeholders `[forward] application_name` and `[forward] settings`
/// may use.
pub const FORWARD_PLACEHOLDERS: &[&str] = &[
    "{application_name}",
    "{identity}",
    "{node}",
    "{source}",
    "{session_id}",
    "{client_addr}",
];

/// Refuses a template with a placeholder pgbastion does not know.
fn check_template(what: &str, template: &str) -> Result<(), ConfigError> {
    let mut rest = template.to_owned();
    for p in FORWARD_PLACEHOLDERS {
        rest = rest.replace(p, "");
    }
    if rest.contains('{') || rest.contains('}') {
        return Err(invalid(format!(
            "{what} {template:?}: unknown placeholder; use {}",
            FORWARD_PLACEHOLDERS.join(", ")
        )));
    }
    Ok(())
}

/// A custom setting's name as PostgreSQL accepts one in a StartupMessage:
/// `prefix.name`, letters, digits and underscores. The dot keeps it clear
/// of the protocol's own keys (user, database, options, replication).
fn check_setting_name(name: &str) -> Result<(), ConfigError> {
    let ok = name.len() < 64
        && name.contains('.')
        && !name.starts_with('.')
        && !name.ends_with('.')
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "forward.settings {name:?}: a custom setting name is prefix.name (letters, digits, underscores, under 64 characters), e.g. \"pgbastion.identity\""
        )))
    }
}

/// Where trusted root certificates for an upstream come from. At least one
/// source is required: pgbastion never connects without verification.
#[derive(Debug, Clone, Default)]
pub struct RootSources {
    pub ca_file: Option<PathBuf>,
    pub ca_dir: Option<PathBuf>,
    pub system: bool,
}

/// Where audit events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    Stdout,
    File(PathBuf),
    /// No audit log (`log = "off"`): for benchmarks, or where another
    /// layer audits; never the default.
    Off,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub tls: Option<ClientTlsConfig>,
    pub listeners: Vec<ListenerConfig>,
    pub upstreams: Vec<UpstreamConfig>,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub audit: AuditTarget,
    pub audit_on_failure: AuditOnFailure,
    /// The key each audit line's `prev` is an HMAC with (None: SHA-256).
    pub audit_chain_key: Option<PathBuf>,
    /// Query audit: statements with their constants replaced (true), or
    /// as sent.
    pub audit_redact: bool,
    pub policy: Policy,
    pub tailscale: Option<TailscaleConfig>,
    /// Template for the application_name sent upstream; None: unchanged.
    pub application_name: Option<String>,
    /// Custom settings put in the StartupMessage (name, template),
    /// replacing any the client sent under the same name.
    pub forward_settings: Vec<(String, String)>,
    /// What pgbastion logs in with for `login = "identity"` rules.
    pub credentials: Vec<CredentialConfig>,
    /// The admin HTTP listener (metrics and health), if any.
    pub admin: Option<AdminConfig>,
    pub reload: ReloadConfig,
    /// Redis shared by a fleet of instances, if any.
    pub cluster: Option<ClusterConfig>,
}

impl Config {
    /// Every file this configuration reads (certificates, keys, CA
    /// bundles, secrets and credential files), for `[reload] watch`.
    pub fn referenced_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        if let Some(t) = &self.tls {
            files.extend([t.cert.clone(), t.key.clone()]);
        }
        for l in &self.listeners {
            if let ListenerIdentity::ClientCert { ca_file, .. } = &l.identity {
                files.push(ca_file.clone());
            }
        }
        for u in &self.upstreams {
            files.extend(u.roots.ca_file.clone());
            if let Some((c, k)) = &u.client_identity {
                files.extend([c.clone(), k.clone()]);
            }
            if let Some(scram) = &u.scram {
                files.extend(scram.secrets_file.clone());
                files.extend(scram.auth_query.as_ref().map(|q| q.password_file.clone()));
            }
        }
        for c in &self.credentials {
            match &c.source {
                CredentialSource::PasswordFile(f) | CredentialSource::ScramSecret(f) => {
                    files.push(f.clone())
                }
                CredentialSource::ClientCert { cert, key } => {
                    files.extend([cert.clone(), key.clone()])
                }
                CredentialSource::PasswordEnv(_) | CredentialSource::RdsIam(_) => {}
            }
        }
        files
    }
}

/// Paths where distributions keep the public CA bundle: a `client_ca` there
/// trusts certificates anyone can buy for their own names.
const SYSTEM_CA_BUNDLES: [&str; 5] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
];

/// More CAs than a private PKI has: the file looks like a public bundle.
const PUBLIC_BUNDLE_MIN_CAS: usize = 20;

impl Config {
    /// Settings that are valid but probably not what the operator meant;
    /// `check-config` prints them and `run` logs them. Reads the client CA
    /// files (a file that cannot be read is an error elsewhere, not here).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for l in &self.listeners {
            let ListenerIdentity::ClientCert { ca_file, .. } = &l.identity else {
                continue;
            };
            let cas = std::fs::read_to_string(ca_file)
                .map(|t| t.matches("-----BEGIN CERTIFICATE-----").count())
                .unwrap_or(0);
            let canonical = std::fs::canonicalize(ca_file).unwrap_or_else(|_| ca_file.clone());
            let public = SYSTEM_CA_BUNDLES
                .iter()
                .any(|b| canonical == Path::new(b) || ca_file == Path::new(b))
                || cas >= PUBLIC_BUNDLE_MIN_CAS;
            let trusting_rule = self.policy.rules().iter().find(|r| {
                (r.login == Login::Identity || r.admin)
                    && r.listeners.as_ref().is_none_or(|ls| ls.contains(&l.name))
            });
            if let (true, Some(r)) = (public, trusting_rule) {
                warnings.push(format!(
                    "listener {:?}: client_ca {} holds {cas} CA certificates and looks like a public \
                     system bundle, yet rule {:?} logs its clients in by certificate alone or opens \
                     the console: anyone who can buy a certificate for a matching name gets in; use \
                     the CA of your own PKI",
                    l.name,
                    ca_file.display(),
                    r.name
                ));
            }
        }
        warnings
    }
}

/// The flag-only form of `pgbastion run`, for the one-upstream case.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub listen: Vec<String>,
    pub unix_dir: Option<PathBuf>,
    pub port: Option<u16>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub upstream: Option<String>,
    pub upstream_ca: Option<PathBuf>,
    pub upstream_ca_dir: Option<PathBuf>,
    pub upstream_system_roots: bool,
    pub upstream_server_name: Option<String>,
    pub upstream_client_cert: Option<PathBuf>,
    pub upstream_client_key: Option<PathBuf>,
    pub upstream_direct_tls: bool,
    pub client_tls: Option<ClientTlsMode>,
    pub audit_log: Option<String>,
    pub audit_on_failure: Option<AuditOnFailure>,
    pub admin_listen: Option<SocketAddr>,
    pub max_sessions: Option<usize>,
    pub auth: Option<AuthMode>,
    pub secrets_file: Option<PathBuf>,
    pub auth_user: Option<String>,
    pub auth_password_file: Option<PathBuf>,
}

impl Config {
    /// Reads and validates a TOML config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: e.to_string(),
        })?;
        raw.validate()
    }

    /// Builds a config from `pgbastion run` flags.
    pub fn from_flags(flags: Flags) -> Result<Config, ConfigError> {
        let upstream = flags
            .upstream
            .ok_or_else(|| invalid("--upstream HOST:PORT is required (or use --config FILE)"))?;
        let mut listeners: Vec<RawListener> = flags
            .listen
            .into_iter()
            .map(|listen| RawListener {
                listen: Some(listen),
                client_tls: flags.client_tls,
                ..RawListener::default()
            })
            .collect();
        if let Some(dir) = flags.unix_dir {
            listeners.push(RawListener {
                name: Some("unix".into()),
                unix_dir: Some(dir),
                port: flags.port,
                ..RawListener::default()
            });
        }
        let tls = match (flags.tls_cert, flags.tls_key) {
            (Some(cert), Some(key)) => Some(RawTls {
                cert,
                key,
                min_version: TlsVersion::default(),
            }),
            (None, None) => None,
            _ => return Err(invalid("--tls-cert and --tls-key go together")),
        };
        let raw = RawConfig {
            tls,
            listeners,
            upstreams: vec![RawUpstream {
                name: Some("upstream".into()),
                address: upstream,
                server_name: flags.upstream_server_name,
                ca_file: flags.upstream_ca,
                ca_dir: flags.upstream_ca_dir,
                system_roots: flags.upstream_system_roots,
                client_cert: flags.upstream_client_cert,
                client_key: flags.upstream_client_key,
                tls_negotiation: if flags.upstream_direct_tls {
                    TlsNegotiation::Direct
                } else {
                    TlsNegotiation::Postgres
                },
                min_tls_version: TlsVersion::default(),
                send_proxy_protocol: SendProxyProtocol::Off,
                auth: flags.auth.unwrap_or_default(),
                secrets_file: flags.secrets_file,
                auth_user: flags.auth_user,
                auth_password_file: flags.auth_password_file,
                auth_database: None,
                auth_query: None,
            }],
            limits: Limits {
                max_sessions: flags.max_sessions.unwrap_or(Limits::default().max_sessions),
                ..Limits::default()
            },
            timeouts: Timeouts::default(),
            audit: RawAudit {
                log: flags.audit_log,
                on_failure: flags.audit_on_failure.unwrap_or_default(),
                chain_key_file: None,
                redact: None,
            },
            rules: Vec::new(),
            tailscale: None,
            forward: RawForward::default(),
            credentials: Vec::new(),
            admin: flags.admin_listen.map(|listen| AdminConfig {
                listen,
                unready_grace: Duration::ZERO,
                max_connections: default_admin_connections(),
                request_timeout: default_admin_timeout(),
            }),
            reload: ReloadConfig::default(),
            cluster: None,
            auth: RawAuth::default(),
        };
        raw.validate()
    }
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let upstreams = self
            .upstreams
            .into_iter()
            .enumerate()
            .map(|(i, u)| u.validate(i))
            .collect::<Result<Vec<_>, _>>()?;
        if upstreams.is_empty() {
            return Err(invalid("at least one [[upstream]] is required"));
        }
        check_unique(upstreams.iter().map(|u| u.name.as_str()), "upstream")?;

        if self.listeners.is_empty() {
            return Err(invalid("at least one [[listener]] is required"));
        }
        let listeners = self
            .listeners
            .into_iter()
            .enumerate()
            .map(|(i, l)| l.validate(i, &upstreams))
            .collect::<Result<Vec<_>, _>>()?;
        check_unique(listeners.iter().map(|l| l.name.as_str()), "listener")?;
        let tls = self.tls.map(|t| ClientTlsConfig {
            cert: t.cert,
            key: t.key,
            min_version: t.min_version,
        });
        if tls.is_none() {
            if let Some(l) = listeners
                .iter()
                .find(|l| l.client_tls == ClientTlsMode::Require)
            {
                return Err(invalid(format!(
                    "listener {:?} requires client TLS but no certificate is configured: \
                     set [tls] cert and key (--tls-cert/--tls-key), or client_tls = \"allow\" \
                     for a listener whose network already protects clients",
                    l.name
                )));
            }
        }
        if self.limits.max_sessions == 0
            || self.limits.max_pending == 0
            || self.limits.max_pending_per_address == 0
        {
            return Err(invalid(
                "limits.max_sessions, max_pending and max_pending_per_address must be at least 1",
            ));
        }
        if self.limits.failed_logins_per_address == 0
            || self.limits.failed_logins_per_user == 0
            || self.limits.failed_login_window.is_zero()
        {
            return Err(invalid(
                "limits.failed_logins_per_address, failed_logins_per_user and failed_login_window must be greater than zero",
            ));
        }
        if self
            .admin
            .as_ref()
            .is_some_and(|a| a.max_connections == 0 || a.request_timeout.is_zero())
        {
            return Err(invalid(
                "[admin] max_connections and request_timeout must be greater than zero",
            ));
        }
        if !(1..=128).contains(&self.limits.ipv6_prefix) {
            return Err(invalid(
                "limits.ipv6_prefix must be between 1 and 128 (64: one host's network)",
            ));
        }
        let t = &self.timeouts;
        for (name, d) in [
            ("client_startup", t.client_startup),
            ("upstream_connect", t.upstream_connect),
            ("upstream_tls", t.upstream_tls),
            ("authentication", t.authentication),
            ("cancel", t.cancel),
            ("proxy_header", t.proxy_header),
            ("half_close", t.half_close),
        ] {
            if d.is_zero() {
                return Err(invalid(format!(
                    "timeouts.{name} must be greater than zero"
                )));
            }
        }
        let audit = match self.audit.log.as_deref() {
            None | Some("-") => AuditTarget::Stdout,
            Some("off") => AuditTarget::Off,
            Some("") => return Err(invalid("audit.log must be a file path or \"-\" for stdout")),
            Some(p) => AuditTarget::File(PathBuf::from(p)),
        };
        if let Some(l) = listeners
            .iter()
            .find(|l| matches!(l.identity, ListenerIdentity::ClientCert { .. }))
        {
            if l.client_tls != ClientTlsMode::Require || tls.is_none() {
                return Err(invalid(format!(
                    "listener {:?}: identity = \"client_cert\" needs client_tls = \"require\" and a [tls] certificate",
                    l.name
                )));
            }
        }
        let tailscale = self.tailscale.map(|t| TailscaleConfig {
            socket: t
                .socket
                .unwrap_or_else(|| PathBuf::from("/var/run/tailscale/tailscaled.sock")),
            capability: t.capability,
            timeout: t.timeout.unwrap_or(Duration::from_secs(2)),
        });
        for l in &listeners {
            if l.identity == ListenerIdentity::Tailscale
                && !matches!(l.bind, BindAddress::Tcp(_))
                && l.proxy_protocol != ProxyProtocol::Required
            {
                return Err(invalid(format!(
                    "listener {:?}: identity = \"tailscale\" needs the peer's address: a TCP listener, \
                     or proxy_protocol = \"required\" (e.g. behind `tailscale serve --proxy-protocol`)",
                    l.name
                )));
            }
        }
        for r in &self.rules {
            for name in r.listeners.iter().flatten() {
                if !listeners.iter().any(|l| &l.name == name) {
                    return Err(invalid(format!(
                        "rule {:?}: no listener named {name:?}",
                        r.name
                    )));
                }
            }
            for name in r.upstreams.iter().flatten() {
                if !upstreams.iter().any(|u| &u.name == name) {
                    return Err(invalid(format!(
                        "rule {:?}: no upstream named {name:?}",
                        r.name
                    )));
                }
            }
            if r.from_grants
                && tailscale
                    .as_ref()
                    .and_then(|t| t.capability.as_ref())
                    .is_none()
            {
                return Err(invalid(format!(
                    "rule {:?}: from_grants needs [tailscale] capability = \"...\" (the peer capability that carries the grants)",
                    r.name
                )));
            }
        }
        let credentials = self
            .credentials
            .into_iter()
            .enumerate()
            .map(|(i, c)| c.validate(&upstreams, i))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, c) in credentials.iter().enumerate() {
            if credentials[..i]
                .iter()
                .any(|o| o.upstream == c.upstream && o.user == c.user)
            {
                return Err(invalid(format!(
                    "two credentials for user {:?} on upstream {:?}",
                    c.user, upstreams[c.upstream].name
                )));
            }
        }
        for r in self
            .rules
            .iter()
            .filter(|r| r.login == Login::Identity || r.admin)
        {
            let what = if r.admin {
                "admin = true"
            } else {
                "login = \"identity\""
            };
            if r.action == Action::Deny {
                return Err(invalid(format!(
                    "rule {:?}: {what} only makes sense in an allow rule",
                    r.name
                )));
            }
            // An address is not a person: a rule that can admit a client
            // known only by its address must not log it in without a
            // password.
            let admits_addresses = r
                .sources
                .as_ref()
                .is_none_or(|s| s.contains(&IdentitySource::Network));
            let by_address = listeners.iter().find(|l| {
                r.listeners.as_ref().is_none_or(|ls| ls.contains(&l.name))
                    && match &l.identity {
                        ListenerIdentity::Network => true,
                        ListenerIdentity::ClientCert { mode, .. } => {
                            *mode == ClientCertMode::Optional
                        }
                        ListenerIdentity::Tailscale => false,
                    }
            });
            if let (true, Some(l)) = (admits_addresses, by_address) {
                return Err(invalid(format!(
                    "rule {:?}: {what} could let in a client of listener {:?} known only by its \
                     address (an address is not a person); limit the rule with listeners = [...] to \
                     client_cert or tailscale listeners, or with sources = [\"client_cert\", \"tailscale\"]",
                    r.name, l.name
                )));
            }
            if let Some(l) = listeners
                .iter()
                .filter(|l| r.listeners.as_ref().is_none_or(|ls| ls.contains(&l.name)))
                .find(|l| identity_forgeable_by_proxy_header(l))
            {
                let admits_tailnet = r
                    .sources
                    .as_ref()
                    .is_none_or(|s| s.contains(&IdentitySource::Tailscale));
                if admits_tailnet {
                    return Err(invalid(format!(
                        "rule {:?}: {what} could let in a client of listener {:?}, whose tailnet identity \
                         is looked up from the PROXY header's address and proxy_trusted ({}) admits senders \
                         beyond a few known hosts, any of which could claim a tailnet address; list only \
                         the balancers' or tailscaled's own addresses (at most {} addresses in all) in \
                         proxy_trusted, or limit the rule with listeners = [...]",
                        r.name,
                        l.name,
                        l.proxy_trusted
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                        MAX_TRUSTED_PROXY_ADDRESSES
                    )));
                }
            }
            if r.login == Login::Identity && credentials.is_empty() {
                return Err(invalid(format!(
                    "rule {:?}: login = \"identity\" needs [[credential]] sections (what pgbastion logs in with)",
                    r.name
                )));
            }
        }
        let policy = Policy::new(self.rules).map_err(invalid)?;
        if let Some(template) = &self.forward.application_name {
            check_template("forward.application_name", template)?;
        }
        for (name, template) in &self.forward.settings {
            check_setting_name(name)?;
            check_template(&format!("forward.settings {name:?}"), template)?;
        }
        let cluster = self.cluster.map(RawCluster::validate).transpose()?;
        // issue 19 item 5: the fleet's secret, else a key file of this
        // instance (none found: ScramAuth refuses to start without one).
        use crate::auth::mock_key::{default_key_file, MockKeySource};
        let mock_key = match (&cluster, self.auth.mock_key_file) {
            (Some(c), _) => Some(MockKeySource::ClusterSecret(c.secret_file.clone())),
            (None, file) => file.or_else(default_key_file).map(MockKeySource::KeyFile),
        };
        let mut upstreams = upstreams;
        for scram in upstreams.iter_mut().filter_map(|u| u.scram.as_mut()) {
            scram.mock_key = mock_key.clone();
        }
        Ok(Config {
            tls,
            listeners,
            upstreams,
            limits: self.limits,
            timeouts: self.timeouts,
            audit,
            audit_on_failure: self.audit.on_failure,
            audit_chain_key: self.audit.chain_key_file,
            audit_redact: self.audit.redact.unwrap_or(true),
            policy,
            tailscale,
            application_name: self.forward.application_name,
            forward_settings: self.forward.settings.into_iter().collect(),
            credentials,
            admin: self.admin,
            reload: self.reload,
            cluster,
        })
    }
}

/// The largest network `proxy_trusted` may name on a listener whose
/// identity comes from the PROXY header's address (256: a /24 or an IPv6
/// /120), for rules that log in without a password or open the console.
pub const MAX_TRUSTED_PROXY_ADDRESSES: u32 = 256;

/// Whether anyone in `proxy_trusted` could forge a client's identity: on a
/// tailscale listener the PROXY header's source address is what WhoIs is
/// asked about, so every trusted sender can claim to be any tailnet peer.
/// A few named hosts (the balancers, `tailscale serve` on this host) are a
/// deliberate choice; a broad network is a mistake waiting for a stranger.
fn identity_forgeable_by_proxy_header(l: &ListenerConfig) -> bool {
    // Counted over every entry: 256 networks of 256 addresses each are as
    // broad as one /16.
    let senders: u128 = l
        .proxy_trusted
        .iter()
        // Loopback is this host, however wide it is written.
        .filter(|net| !net.network().is_loopback())
        .map(|net| {
            let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
            1u128.checked_shl(host_bits).unwrap_or(u128::MAX)
        })
        .fold(0u128, u128::saturating_add);
    matches!(l.identity, ListenerIdentity::Tailscale)
        && l.proxy_protocol == ProxyProtocol::Required
        && senders > u128::from(MAX_TRUSTED_PROXY_ADDRESSES)
}

fn check_unique<'a>(names: impl Iterator<Item = &'a str>, what: &str) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for n in names {
        if !seen.insert(n) {
            return Err(invalid(format!(
                "two {what}s are named {n:?}: names must be unique"
            )));
        }
    }
    Ok(())
}

impl RawListener {
    fn validate(
        self,
        index: usize,
        upstreams: &[UpstreamConfig],
    ) -> Result<ListenerConfig, ConfigError> {
        let name = self.name.unwrap_or_else(|| format!("listener{index}"));
        let bind = match (self.listen, self.unix_dir) {
            (Some(addr), None) => {
                if self.port.is_some() {
                    return Err(invalid(format!(
                        "listener {name:?}: `port` is only for unix_dir; put the port in `listen`"
                    )));
                }
                BindAddress::Tcp(addr.parse().map_err(|_| {
                    invalid(format!(
                        "listener {name:?}: listen = {addr:?} is not IP:PORT \
                         (e.g. \"127.0.0.1:6432\" or \"[::]:6432\")"
                    ))
                })?)
            }
            (None, Some(dir)) => {
                let port = self.port.unwrap_or(5432);
                BindAddress::Unix(dir.join(format!(".s.PGSQL.{port}")))
            }
            (Some(_), Some(_)) => {
                return Err(invalid(format!(
                    "listener {name:?}: set either `listen` (TCP) or `unix_dir` (Unix socket), not both"
                )))
            }
            (None, None) => {
                return Err(invalid(format!(
                    "listener {name:?}: set `listen` (TCP IP:PORT) or `unix_dir` (Unix socket directory)"
                )))
            }
        };
        // Clients on a Unix socket are local processes, and libpq never
        // uses TLS there, so `allow` is the only useful default.
        let client_tls = self.client_tls.unwrap_or(match bind {
            BindAddress::Tcp(_) => ClientTlsMode::Require,
            BindAddress::Unix(_) => ClientTlsMode::Allow,
        });
        let upstream = match self.upstream {
            Some(u) => upstreams
                .iter()
                .position(|x| x.name == u)
                .ok_or_else(|| invalid(format!("listener {name:?}: no upstream named {u:?}")))?,
            None if upstreams.len() == 1 => 0,
            None => {
                return Err(invalid(format!(
                    "listener {name:?}: several upstreams exist, so set `upstream = \"NAME\"`"
                )))
            }
        };
        let identity = match self.identity {
            IdentitySource::Network => {
                if self.client_ca.is_some() || self.client_cert.is_some() || self.cert_identity.is_some() {
                    return Err(invalid(format!(
                        "listener {name:?}: client_ca, client_cert and cert_identity need identity = \"client_cert\""
                    )));
                }
                ListenerIdentity::Network
            }
            IdentitySource::Tailscale => ListenerIdentity::Tailscale,
            IdentitySource::ClientCert => ListenerIdentity::ClientCert {
                ca_file: self.client_ca.ok_or_else(|| {
                    invalid(format!(
                        "listener {name:?}: identity = \"client_cert\" needs client_ca (the CA that issues client certificates)"
                    ))
                })?,
                mode: self.client_cert.unwrap_or(ClientCertMode::Required),
                order: match self.cert_identity {
                    Some(order) if order.is_empty() => {
                        return Err(invalid(format!("listener {name:?}: cert_identity must name at least one kind")))
                    }
                    Some(order) => order,
                    None => DEFAULT_ORDER.to_vec(),
                },
            },
        };
        match (self.proxy_protocol, &bind) {
            (ProxyProtocol::Required, BindAddress::Tcp(_)) if self.proxy_trusted.is_empty() => {
                return Err(invalid(format!(
                    "listener {name:?}: proxy_protocol = \"required\" needs proxy_trusted = [\"CIDR\", ...]: \
                     the networks of the load balancers allowed to state client addresses"
                )))
            }
            (ProxyProtocol::Off, _) if !self.proxy_trusted.is_empty() => {
                return Err(invalid(format!(
                    "listener {name:?}: proxy_trusted is set but proxy_protocol is \"off\""
                )))
            }
            (ProxyProtocol::Required, BindAddress::Unix(_)) if !self.proxy_trusted.is_empty() => {
                return Err(invalid(format!(
                    "listener {name:?}: proxy_trusted does not apply to a Unix socket (its file permissions decide who may connect)"
                )))
            }
            _ => {}
        }
        Ok(ListenerConfig {
            name,
            bind,
            client_tls,
            cancel_plaintext: self.cancel_plaintext,
            identity,
            proxy_protocol: self.proxy_protocol,
            proxy_trusted: self.proxy_trusted,
            upstream,
        })
    }
}

impl RawUpstream {
    fn validate(self, index: usize) -> Result<UpstreamConfig, ConfigError> {
        let name = self.name.unwrap_or_else(|| format!("upstream{index}"));
        let (host, port) = split_host_port(&self.address).ok_or_else(|| {
            invalid(format!(
                "upstream {name:?}: address = {:?} is not HOST:PORT (IPv6 as \"[::1]:5432\")",
                self.address
            ))
        })?;
        let server_name = self.server_name.unwrap_or_else(|| host.clone());
        if rustls::pki_types::ServerName::try_from(server_name.as_str()).is_err() {
            return Err(invalid(format!(
                "upstream {name:?}: server_name {server_name:?} is neither a DNS name nor an IP address"
            )));
        }
        let roots = RootSources {
            ca_file: self.ca_file,
            ca_dir: self.ca_dir,
            system: self.system_roots,
        };
        if roots.ca_file.is_none() && roots.ca_dir.is_none() && !roots.system {
            return Err(invalid(format!(
                "upstream {name:?}: no trusted roots: set ca_file, ca_dir and/or system_roots = true \
                 (pgbastion always verifies the upstream certificate)"
            )));
        }
        let client_identity = match (self.client_cert, self.client_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(invalid(format!(
                    "upstream {name:?}: client_cert and client_key go together"
                )))
            }
        };
        let auth_query = match (self.auth_user, self.auth_password_file) {
            (Some(user), Some(password_file)) => Some(AuthQueryConfig {
                user,
                password_file,
                database: self.auth_database.unwrap_or_else(|| "postgres".into()),
                query: self.auth_query.unwrap_or_else(|| DEFAULT_AUTH_QUERY.into()),
            }),
            (None, None) if self.auth_database.is_some() || self.auth_query.is_some() => {
                return Err(invalid(format!(
                    "upstream {name:?}: auth_database and auth_query need auth_user and auth_password_file"
                )))
            }
            (None, None) => None,
            _ => {
                return Err(invalid(format!(
                    "upstream {name:?}: auth_user and auth_password_file go together \
                     (the role pgbastion logs in as to look verifiers up, and the file holding its password)"
                )))
            }
        };
        let scram = match self.auth {
            AuthMode::Passthrough => {
                if self.secrets_file.is_some() || auth_query.is_some() {
                    return Err(invalid(format!(
                        "upstream {name:?}: secrets_file and auth_user are for auth = \"scram\"; \
                         this upstream uses auth = \"passthrough\""
                    )));
                }
                None
            }
            AuthMode::Scram => {
                if self.secrets_file.is_none() && auth_query.is_none() {
                    return Err(invalid(format!(
                        "upstream {name:?}: auth = \"scram\" needs a source of SCRAM verifiers: \
                         secrets_file = \"FILE\" (PgBouncer's auth_file format), and/or \
                         auth_user + auth_password_file (a role that may run auth_query on the server)"
                    )));
                }
                Some(ScramConfig {
                    secrets_file: self.secrets_file,
                    auth_query,
                    mock_key: None,
                })
            }
        };
        Ok(UpstreamConfig {
            name,
            host,
            port,
            server_name,
            roots,
            client_identity,
            tls_negotiation: self.tls_negotiation,
            min_tls_version: self.min_tls_version,
            send_proxy_protocol: self.send_proxy_protocol,
            scram,
        })
    }
}

/// Splits "host:port", "1.2.3.4:port" or "[v6]:port".
fn split_host_port(s: &str) -> Option<(String, u16)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [tls]
        cert = "proxy.crt"
        key = "proxy.key"

        [[listener]]
        listen = "127.0.0.1:6432"

        [[upstream]]
        address = "db.example.com:5432"
        ca_file = "ca.pem"
    "#;

    #[test]
    fn minimal_config_gets_secure_defaults() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.listeners[0].client_tls, ClientTlsMode::Require);
        assert_eq!(c.upstreams[0].server_name, "db.example.com");
        assert_eq!(c.upstreams[0].tls_negotiation, TlsNegotiation::Postgres);
        assert_eq!(c.audit, AuditTarget::Stdout);
    }

    #[test]
    fn cluster_is_off_by_default_and_checked_when_set() {
        assert_eq!(Config::from_toml(MINIMAL).unwrap().cluster, None);
        let with = |lines: &str| {
            Config::from_toml(&format!(
                "{MINIMAL}\n[cluster]\nsecret_file = \"k\"\n{lines}"
            ))
        };
        let c = with("redis = \"redis://10.0.0.9:6379/0\"\ninstance = \"pgb-1\"")
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(c.instance, "pgb-1");
        assert_eq!(c.timeout, Duration::from_millis(250));
        assert_eq!(c.key_prefix, "pgbastion");
        let host = with("redis = \"redis://r:6379\"").unwrap().cluster.unwrap();
        assert!(!host.instance.is_empty(), "the host name by default");
        for (lines, says) in [
            ("redis = \"http://r:6379\"", "use redis://"),
            ("redis = \"redis://:hunter2@r:6379\"", "redis_password_file"),
            (
                "redis = \"redis://user:hunter2@r:6379\"",
                "redis_password_file",
            ),
            ("redis = \"rediss://r:6380/#insecure\"", "always verified"),
            (
                "redis = \"redis://r:6379\"\nredis_ca_file = \"ca.pem\"",
                "not rediss://",
            ),
            ("redis = \"redis://r:6379\"\ntimeout = \"0s\"", "timeout"),
            ("redis = \"redis://r:6379\"\ninstance = \"\"", "instance"),
            (
                "redis = \"redis://r:6379\"\nkey_prefix = \"a b\"",
                "key_prefix",
            ),
        ] {
            let err = with(lines).unwrap_err().to_string();
            assert!(err.contains(says), "{lines}: {err}");
            assert!(
                !err.contains("hunter2"),
                "the password is not repeated: {err}"
            );
        }
        let acl_user = with("redis = \"redis://pgbastion@r:6379/0\"").unwrap();
        assert!(acl_user.cluster.is_some(), "an ACL user name alone is fine");
    }

    #[test]
    fn forward_settings_need_a_prefixed_name_and_known_placeholders() {
        let with =
            |lines: &str| Config::from_toml(&format!("{MINIMAL}\n[forward.settings]\n{lines}"));
        let c = with(
            "\"pgbastion.identity\" = \"{identity}\"\n\"app.who\" = \"{source}:{client_addr}\"",
        )
        .unwrap();
        assert_eq!(
            c.forward_settings,
            vec![
                ("app.who".to_owned(), "{source}:{client_addr}".to_owned()),
                ("pgbastion.identity".to_owned(), "{identity}".to_owned()),
            ]
        );
        for (lines, says) in [
            ("\"identity\" = \"{identity}\"", "prefix.name"),
            ("\"user\" = \"x\"", "prefix.name"),
            ("\"a.b;drop\" = \"x\"", "prefix.name"),
            ("\".b\" = \"x\"", "prefix.name"),
            ("\"1a.b\" = \"x\"", "prefix.name"),
            ("\"a.b\" = \"{password}\"", "unknown placeholder"),
        ] {
            let err = with(lines).unwrap_err().to_string();
            assert!(err.contains(says), "{lines}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = MINIMAL.replace("ca_file", "ca_fiel");
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("ca_fiel"), "{err}");
    }

    #[test]
    fn upstream_without_roots_is_refused() {
        let text = MINIMAL.replace("ca_file = \"ca.pem\"", "");
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("no trusted roots"), "{err}");
    }

    #[test]
    fn require_without_certificate_is_refused() {
        let text = MINIMAL.replace(
            "[tls]\n        cert = \"proxy.crt\"\n        key = \"proxy.key\"",
            "",
        );
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("requires client TLS"), "{err}");
    }

    #[test]
    fn unix_listener_is_named_like_postgres() {
        let text = MINIMAL.replace(
            "listen = \"127.0.0.1:6432\"",
            "unix_dir = \"/run/pgb\"\nport = 7000",
        );
        let c = Config::from_toml(&text).unwrap();
        assert_eq!(
            c.listeners[0].bind,
            BindAddress::Unix("/run/pgb/.s.PGSQL.7000".into())
        );
        assert_eq!(c.listeners[0].client_tls, ClientTlsMode::Allow);
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("db:5432"), Some(("db".into(), 5432)));
        assert_eq!(split_host_port("[::1]:5432"), Some(("::1".into(), 5432)));
        assert_eq!(split_host_port("::1:5432"), None);
        assert_eq!(split_host_port("db"), None);
        assert_eq!(split_host_port(":5432"), None);
        assert_eq!(split_host_port("db:99999"), None);
    }

    #[test]
    fn server_name_accepts_ip_and_refuses_garbage() {
        let ip = MINIMAL.replace("ca_file", "server_name = \"10.0.0.5\"\nca_file");
        assert_eq!(
            Config::from_toml(&ip).unwrap().upstreams[0].server_name,
            "10.0.0.5"
        );
        let bad = MINIMAL.replace("ca_file", "server_name = \"not a name!\"\nca_file");
        assert!(Config::from_toml(&bad).is_err());
    }

    #[test]
    fn scram_mode_needs_a_verifier_source() {
        let scram = |keys: &str| {
            Config::from_toml(&MINIMAL.replace("ca_file", &format!("{keys}\nca_file")))
        };
        let err = scram("auth = \"scram\"").unwrap_err().to_string();
        assert!(err.contains("needs a source of SCRAM verifiers"), "{err}");
        let c = scram("auth = \"scram\"\nsecrets_file = \"users.txt\"").unwrap();
        assert_eq!(c.upstreams[0].auth_mode(), AuthMode::Scram);
        let c = scram("auth = \"scram\"\nauth_user = \"pgbastion\"\nauth_password_file = \"pw\"")
            .unwrap();
        let q = c.upstreams[0].scram.clone().unwrap().auth_query.unwrap();
        assert_eq!(q.database, "postgres");
        assert_eq!(q.query, DEFAULT_AUTH_QUERY);
        let err = scram("auth = \"scram\"\nauth_user = \"pgbastion\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("go together"), "{err}");
        let err = scram("secrets_file = \"users.txt\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("are for auth = \"scram\""), "{err}");
        let err = scram("auth = \"kerberos\"").unwrap_err().to_string();
        assert!(err.contains("kerberos"), "{err}");
        assert_eq!(
            Config::from_toml(MINIMAL).unwrap().upstreams[0].auth_mode(),
            AuthMode::Passthrough
        );
    }

    #[test]
    fn durations_are_human() {
        let text = format!("{MINIMAL}\n[timeouts]\nupstream_connect = \"2s 500ms\"\n");
        let c = Config::from_toml(&text).unwrap();
        assert_eq!(c.timeouts.upstream_connect, Duration::from_millis(2500));
    }
}

#[cfg(test)]
mod credential_tests {
    use super::*;

    const BASE: &str = r#"
        [tls]
        cert = "proxy.crt"
        key = "proxy.key"
        [[listener]]
        name = "mtls"
        listen = "127.0.0.1:6432"
        identity = "client_cert"
        client_ca = "people.pem"
        [[listener]]
        name = "lan"
        listen = "127.0.0.1:6433"
        [[upstream]]
        name = "pg"
        address = "db.example.com:5432"
        ca_file = "ca.pem"
    "#;

    fn with(extra: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&format!("{BASE}\n{extra}"))
    }

    #[test]
    fn identity_login_is_refused_where_an_address_could_match() {
        let cred = "[[credential]]\nuser = \"app\"\npassword_file = \"pw\"\n";
        let err = with(&format!(
            "[[rule]]\nname = \"all\"\nlogin = \"identity\"\n{cred}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("rule \"all\"")
                && err.contains("listener \"lan\"")
                && err.contains("not a person"),
            "{err}"
        );
        // Limited to the certificate listener, or to identities that are
        // people: accepted.
        let c = with(&format!(
            "[[rule]]\nlisteners = [\"mtls\"]\nlogin = \"identity\"\n{cred}"
        ))
        .unwrap();
        assert_eq!(c.credentials[0].source.kind().as_str(), "password");
        with(&format!(
            "[[rule]]\nsources = [\"client_cert\"]\nlogin = \"identity\"\n{cred}"
        ))
        .unwrap();
        let err = with("[[rule]]\nlisteners = [\"mtls\"]\nlogin = \"identity\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs [[credential]]"), "{err}");
        let err = with("[[rule]]\nlisteners = [\"mtls\"]\nlogin = \"magic\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("magic"), "{err}");
    }

    /// Issue 19 item 7: a tailnet identity looked up from a PROXY header
    /// that anyone in 0.0.0.0/0 may send is no identity.
    #[test]
    fn identity_and_admin_rules_refuse_a_forgeable_proxy_header() {
        let tailnet = |trusted: &str| {
            format!(
                "[[listener]]\nname = \"ts\"\nlisten = \"127.0.0.1:6434\"\nidentity = \"tailscale\"\n\
                 proxy_protocol = \"required\"\nproxy_trusted = [{trusted}]\n"
            )
        };
        let cred = "[[credential]]\nuser = \"app\"\npassword_file = \"pw\"\n";
        for rule in [
            format!("[[rule]]\nname = \"r\"\nlisteners = [\"ts\"]\nlogin = \"identity\"\n{cred}"),
            "[[rule]]\nname = \"r\"\nlisteners = [\"ts\"]\nadmin = true\n".to_owned(),
        ] {
            // Two /24s: more than 256 senders in all.
            for broad in [
                "\"0.0.0.0/0\"",
                "\"10.0.0.0/8\"",
                "\"127.0.0.1/32\", \"::/0\"",
                "\"192.0.2.0/24\", \"198.51.100.0/24\"",
            ] {
                let err = with(&format!("{}{rule}", tailnet(broad)))
                    .unwrap_err()
                    .to_string();
                assert!(
                    err.contains("rule \"r\"")
                        && err.contains("listener \"ts\"")
                        && err.contains("PROXY header"),
                    "{broad}: {err}"
                );
            }
            // Named hosts (a balancer pair, tailscaled on this host): a choice.
            for narrow in ["\"127.0.0.0/8\"", "\"192.0.2.0/25\", \"2001:db8::1/128\""] {
                with(&format!("{}{rule}", tailnet(narrow))).unwrap();
            }
        }
        // A password login through the same listener is not refused.
        with(&format!(
            "{}[[rule]]\nlisteners = [\"ts\"]\n",
            tailnet("\"0.0.0.0/0\"")
        ))
        .unwrap();
    }

    /// Issue 19 item 7: a client CA that is a public bundle, with a rule
    /// that trusts the certificate alone, is warned about.
    #[test]
    fn a_public_client_ca_with_identity_login_is_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle.pem");
        let one = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";
        std::fs::write(&bundle, one.repeat(PUBLIC_BUNDLE_MIN_CAS)).unwrap();
        let private = dir.path().join("people.pem");
        std::fs::write(&private, one.repeat(2)).unwrap();
        let config = |ca: &Path, rule: &str| {
            Config::from_toml(&format!(
                "{}\n[[listener]]\nname = \"pub\"\nlisten = \"127.0.0.1:6435\"\n\
                 identity = \"client_cert\"\nclient_ca = \"{}\"\n{rule}",
                BASE,
                ca.display()
            ))
            .unwrap()
        };
        let admin = "[[rule]]\nname = \"ops\"\nlisteners = [\"pub\"]\nadmin = true\n";
        let warnings = config(&bundle, admin).warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("listener \"pub\"")
                && warnings[0].contains("public")
                && warnings[0].contains("rule \"ops\""),
            "{warnings:?}"
        );
        assert!(config(&private, admin).warnings().is_empty());
        let password_only = "[[rule]]\nname = \"ops\"\nlisteners = [\"pub\"]\n";
        assert!(config(&bundle, password_only).warnings().is_empty());
    }

    #[test]
    fn a_credential_has_exactly_one_kind() {
        for (body, needle) in [
            (
                "password_file = \"a\"\npassword_env = \"B\"",
                "exactly one of",
            ),
            ("", "exactly one of"),
            ("client_cert = \"c\"", "go together"),
            ("client_key = \"k\"", "go together"),
            (
                "password_file = \"a\"\nupstream = \"nope\"",
                "no upstream named \"nope\"",
            ),
            ("password = \"inline\"", "unknown field `password`"),
        ] {
            let err = with(&format!("[[credential]]\nuser = \"app\"\n{body}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{body}: {err}");
        }
        let err = with(
            "[[credential]]\nuser = \"app\"\npassword_file = \"a\"\n[[credential]]\nuser = \"app\"\npassword_env = \"B\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("two credentials for user \"app\""), "{err}");
        let c =
            with("[[credential]]\nuser = \"app\"\nrds_iam = { region = \"eu-west-1\" }\n").unwrap();
        assert_eq!(
            c.credentials[0].source,
            CredentialSource::RdsIam(RdsIamConfig {
                region: "eu-west-1".into()
            })
        );
    }
}
