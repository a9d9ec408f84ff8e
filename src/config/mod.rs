//! The one configuration model, read from TOML or built from command-line
//! flags, and validated up front.
//!
//! This module owns `Config`, the validated form the rest of pgbastion
//! uses (strong types instead of strings), and re-exports every public
//! type of the sections so callers name them `crate::config::X`. The file
//! format is in `raw` (unknown keys are refused, so a typo never silently
//! becomes a default), flags in `flags`, and each section's types,
//! conversion and checks in its own file (`listeners`, `upstreams`, `routes`,
//! `credentials`, `rules`, `limits`, `audit`, `forward`, `cluster`,
//! `tailscale`, `admin`, `tls`), wired together by `validate`. Files named
//! in the config (certificates, keys) are read later by `crate::tls`, but
//! `check-config` runs that step too, so every mistake is found before
//! `run`.

use std::path::{Path, PathBuf};

mod admin;
mod audit;
mod cluster;
mod credentials;
mod error;
mod flags;
mod forward;
mod http;
mod limits;
mod listeners;
mod raw;
mod routes;
mod rules;
mod tailscale;
mod tls;
mod upstreams;
mod validate;
mod warnings;

pub use admin::{AdminConfig, ReloadConfig};
pub use audit::{AuditConfig, AuditOnFailure, AuditTarget};
pub use cluster::ClusterConfig;
pub use credentials::{CredentialConfig, CredentialSource, RdsIamConfig};
pub use error::{ConfigError, KeyPath, Section};
pub use flags::Flags;
pub use forward::FORWARD_PLACEHOLDERS;
pub use http::{HttpSettings, ListenerProtocol, ListenerProtocolName};
pub use limits::{Limits, Timeouts};
pub use listeners::{
    BindAddress, CancelPlaintext, ClientCertMode, ClientTlsMode, ListenerConfig, ListenerIdentity,
    ProxyProtocol,
};
pub use rules::MAX_TRUSTED_PROXY_ADDRESSES;
pub use tailscale::TailscaleConfig;
pub use tls::{ClientTlsConfig, SniCertConfig, TlsVersion};
pub use upstreams::{
    AuthMode, AuthQueryConfig, PoolConfig, PoolMode, RootSources, ScramConfig, SendProxyProtocol,
    TlsNegotiation, UpstreamConfig, DEFAULT_AUTH_QUERY, ENDPOINT_PLACEHOLDER,
};

use crate::policy::Policy;
use raw::RawConfig;

#[derive(Debug, Clone)]
pub struct Config {
    pub tls: Option<ClientTlsConfig>,
    pub listeners: Vec<ListenerConfig>,
    pub upstreams: Vec<UpstreamConfig>,
    /// `[[route]]`s in file order (shared: a reload's sessions keep the
    /// table they were routed with).
    pub routes: std::sync::Arc<crate::routing::Table>,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub audit: AuditConfig,
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

    /// Every file this configuration reads (certificates, keys, CA
    /// bundles, secrets and credential files), for `[reload] watch`.
    pub fn referenced_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        if let Some(t) = &self.tls {
            files.extend([t.cert.clone(), t.key.clone()]);
            for s in &t.sni {
                files.extend([s.cert.clone(), s.key.clone()]);
            }
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

#[cfg(test)]
mod tests;
