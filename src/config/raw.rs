//! The file format: `RawConfig` and the `Raw*` sections mirror the TOML as
//! written (unknown keys are refused, so a typo never silently becomes a
//! default). Sections that need no conversion (`[limits]`, `[timeouts]`,
//! `[admin]`, `[reload]`, `[[rule]]`) are read straight into their public
//! types. Each section's conversion to the validated form lives in that
//! section's module.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{
    AdminConfig, AuditOnFailure, AuthMode, CancelPlaintext, ClientCertMode, ClientTlsMode, Limits,
    PoolMode, ProxyProtocol, RdsIamConfig, ReloadConfig, SendProxyProtocol, Timeouts,
    TlsNegotiation, TlsVersion,
};
use crate::identity::cert::CertName;
use crate::identity::IdentitySource;
use crate::policy::Rule;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) tls: Option<RawTls>,
    #[serde(default, rename = "listener")]
    pub(super) listeners: Vec<RawListener>,
    #[serde(default, rename = "upstream")]
    pub(super) upstreams: Vec<RawUpstream>,
    #[serde(default, rename = "route")]
    pub(super) routes: Vec<RawRoute>,
    #[serde(default)]
    pub(super) limits: Limits,
    #[serde(default)]
    pub(super) timeouts: Timeouts,
    #[serde(default)]
    pub(super) audit: RawAudit,
    #[serde(default, rename = "rule")]
    pub(super) rules: Vec<Rule>,
    #[serde(default)]
    pub(super) tailscale: Option<RawTailscale>,
    #[serde(default)]
    pub(super) forward: RawForward,
    #[serde(default, rename = "credential")]
    pub(super) credentials: Vec<RawCredential>,
    #[serde(default)]
    pub(super) admin: Option<AdminConfig>,
    #[serde(default)]
    pub(super) reload: ReloadConfig,
    #[serde(default)]
    pub(super) cluster: Option<RawCluster>,
    #[serde(default)]
    pub(super) auth: RawAuth,
}

/// `[auth]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    /// Where the key for unknown users' mock salts is made and kept when
    /// there is no `[cluster] secret_file` (see `auth::mock_key`).
    pub(super) mock_key_file: Option<PathBuf>,
}

/// `[cluster]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) redis: String,
    pub(super) redis_password_file: Option<PathBuf>,
    pub(super) redis_ca_file: Option<PathBuf>,
    pub(super) instance: Option<String>,
    pub(super) secret_file: PathBuf,
    #[serde(default = "default_cluster_timeout", with = "humantime_serde")]
    pub(super) timeout: Duration,
    #[serde(default = "default_key_prefix")]
    pub(super) key_prefix: String,
}

fn default_cluster_timeout() -> Duration {
    Duration::from_millis(250)
}

fn default_key_prefix() -> String {
    "pgbastion".into()
}

/// A `[[credential]]` section as written: one kind of credential must be
/// given. Secrets are never inline: every value is a file or a variable
/// name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCredential {
    pub(super) upstream: Option<String>,
    pub(super) user: String,
    pub(super) password_file: Option<PathBuf>,
    pub(super) password_env: Option<String>,
    pub(super) scram_secret: Option<PathBuf>,
    pub(super) client_cert: Option<PathBuf>,
    pub(super) client_key: Option<PathBuf>,
    pub(super) rds_iam: Option<RdsIamConfig>,
}

/// `[tailscale]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTailscale {
    pub(super) socket: Option<PathBuf>,
    pub(super) capability: Option<String>,
    #[serde(default, with = "humantime_serde::option")]
    pub(super) timeout: Option<Duration>,
}

/// `[forward]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawForward {
    pub(super) application_name: Option<String>,
    #[serde(default)]
    pub(super) settings: BTreeMap<String, String>,
}

/// `[tls]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
    #[serde(default)]
    pub(super) min_version: TlsVersion,
    #[serde(default)]
    pub(super) sni: Vec<RawSni>,
}

/// A `[[tls.sni]]` as written: a certificate for the names a client's
/// SNI may ask for.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSni {
    #[serde(default)]
    pub(super) names: Vec<String>,
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
}

/// A `[[listener]]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub(super) name: Option<String>,
    pub(super) listen: Option<String>,
    pub(super) unix_dir: Option<PathBuf>,
    pub(super) port: Option<u16>,
    pub(super) client_tls: Option<ClientTlsMode>,
    #[serde(default)]
    pub(super) cancel_plaintext: CancelPlaintext,
    pub(super) upstream: Option<String>,
    #[serde(default)]
    pub(super) identity: IdentitySource,
    pub(super) client_ca: Option<PathBuf>,
    pub(super) client_cert: Option<ClientCertMode>,
    pub(super) cert_identity: Option<Vec<CertName>>,
    #[serde(default)]
    pub(super) proxy_protocol: ProxyProtocol,
    #[serde(default)]
    pub(super) proxy_trusted: Vec<ipnet::IpNet>,
    #[serde(default)]
    pub(super) protocol: super::http::ListenerProtocolName,
    pub(super) http: Option<super::http::HttpSettings>,
}

/// A `[[route]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) name: Option<String>,
    pub(super) listeners: Option<Vec<String>>,
    pub(super) server_name: Option<String>,
    pub(super) endpoint: Option<String>,
    pub(super) database: Option<String>,
    pub(super) upstream: String,
}

/// An `[[upstream]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) name: Option<String>,
    pub(super) address: String,
    pub(super) server_name: Option<String>,
    /// The database to ask the server for instead of the client's (may
    /// name `{endpoint}`).
    pub(super) database: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) ca_dir: Option<PathBuf>,
    #[serde(default)]
    pub(super) system_roots: bool,
    pub(super) client_cert: Option<PathBuf>,
    pub(super) client_key: Option<PathBuf>,
    #[serde(default)]
    pub(super) tls_negotiation: TlsNegotiation,
    #[serde(default)]
    pub(super) min_tls_version: TlsVersion,
    #[serde(default)]
    pub(super) send_proxy_protocol: SendProxyProtocol,
    #[serde(default)]
    pub(super) auth: AuthMode,
    pub(super) secrets_file: Option<PathBuf>,
    pub(super) auth_user: Option<String>,
    pub(super) auth_password_file: Option<PathBuf>,
    pub(super) auth_database: Option<String>,
    pub(super) auth_query: Option<String>,
    /// Server connection pooling (`None`: one server connection per
    /// client session); the keys below need it. Checked by
    /// `RawUpstream::pool`.
    pub(super) pool_mode: Option<PoolMode>,
    pub(super) pool_size: Option<usize>,
    pub(super) min_pool_size: Option<usize>,
    pub(super) max_server_connections: Option<usize>,
    #[serde(default, with = "humantime_serde::option")]
    pub(super) server_idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub(super) server_lifetime: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub(super) query_wait_timeout: Option<Duration>,
    pub(super) max_prepared_statements: Option<usize>,
}

/// `[audit]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    /// A file path, or "-" for standard output.
    pub(super) log: Option<String>,
    #[serde(default)]
    pub(super) on_failure: AuditOnFailure,
    pub(super) chain_key_file: Option<PathBuf>,
    /// Query audit: replace constants in statements (default true).
    pub(super) redact: Option<bool>,
}
