//! The flag-only form of `pgbastion run`, for the one-upstream case:
//! `Flags` (what `main` parsed) turned into the same `RawConfig` a file
//! gives, so flags and files are validated by one path.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::error::ConfigError;
use super::raw::{RawAudit, RawConfig, RawListener, RawTls, RawUpstream};
use super::{
    AdminConfig, AuditOnFailure, AuthMode, ClientTlsMode, Config, Limits, PoolMode,
    SendProxyProtocol, TlsNegotiation, TlsVersion,
};

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
    /// Server connection pooling: `--pool-mode` and the flags that tune
    /// it, each the `[[upstream]]` key of the same name (`--pool-size` is
    /// `pool_size`); unset: the key's default.
    pub pool_mode: Option<PoolMode>,
    pub pool_size: Option<usize>,
    pub min_pool_size: Option<usize>,
    pub max_server_connections: Option<usize>,
    pub server_idle_timeout: Option<Duration>,
    pub server_lifetime: Option<Duration>,
    pub query_wait_timeout: Option<Duration>,
    pub max_prepared_statements: Option<usize>,
}

impl Config {
    /// Builds a config from `pgbastion run` flags.
    pub fn from_flags(mut flags: Flags) -> Result<Config, ConfigError> {
        let address = flags.upstream.take().ok_or(ConfigError::Flag {
            flag: "--upstream",
            reason: "HOST:PORT is required (or use --config FILE)",
        })?;
        let tls = match (flags.tls_cert.take(), flags.tls_key.take()) {
            (Some(cert), Some(key)) => Some(RawTls {
                cert,
                key,
                min_version: TlsVersion::default(),
                sni: Vec::new(),
            }),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Flag {
                    flag: "--tls-cert",
                    reason: "and --tls-key go together",
                })
            }
        };
        let raw = RawConfig {
            tls,
            listeners: listeners(&mut flags),
            limits: Limits {
                max_sessions: flags.max_sessions.unwrap_or(Limits::default().max_sessions),
                ..Limits::default()
            },
            audit: RawAudit {
                log: flags.audit_log.take(),
                on_failure: flags.audit_on_failure.unwrap_or_default(),
                chain_key_file: None,
                redact: None,
            },
            admin: flags.admin_listen.map(AdminConfig::on),
            upstreams: vec![upstream(address, flags)],
            ..RawConfig::default()
        };
        raw.validate()
    }
}

/// One TCP listener per `--listen`, and a Unix socket for `--unix-dir`.
fn listeners(flags: &mut Flags) -> Vec<RawListener> {
    let mut listeners: Vec<RawListener> = std::mem::take(&mut flags.listen)
        .into_iter()
        .map(|listen| RawListener {
            listen: Some(listen),
            client_tls: flags.client_tls,
            ..RawListener::default()
        })
        .collect();
    if let Some(dir) = flags.unix_dir.take() {
        listeners.push(RawListener {
            name: Some("unix".into()),
            unix_dir: Some(dir),
            port: flags.port,
            ..RawListener::default()
        });
    }
    listeners
}

/// The one upstream, named "upstream".
fn upstream(address: String, flags: Flags) -> RawUpstream {
    RawUpstream {
        name: Some("upstream".into()),
        address,
        server_name: flags.upstream_server_name,
        database: None,
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
        pool_mode: flags.pool_mode,
        pool_size: flags.pool_size,
        min_pool_size: flags.min_pool_size,
        max_server_connections: flags.max_server_connections,
        server_idle_timeout: flags.server_idle_timeout,
        server_lifetime: flags.server_lifetime,
        query_wait_timeout: flags.query_wait_timeout,
        max_prepared_statements: flags.max_prepared_statements,
    }
}
