//! `[[credential]]`: what pgbastion logs in with for `login = "identity"`
//! sessions (a password file or variable, a SCRAM secret, a client
//! certificate, RDS IAM). Owns the credential types, the conversion from
//! `RawCredential`, and the one-credential-per-user-and-upstream check.

use crate::audit::event::CredentialKind;
use std::path::PathBuf;

use serde::Deserialize;

use super::error::{ConfigError, Section};
use super::raw::RawCredential;
use super::UpstreamConfig;

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
    /// The credential at `index` (0-based), its upstream looked up by name.
    fn validate(
        self,
        upstreams: &[UpstreamConfig],
        index: usize,
    ) -> Result<CredentialConfig, ConfigError> {
        let at = Section::Credential {
            number: index + 1,
            user: self.user.clone(),
        };
        let upstream = match &self.upstream {
            Some(name) => upstreams
                .iter()
                .position(|u| &u.name == name)
                .ok_or_else(|| {
                    at.key("upstream")
                        .invalid(format!("no upstream named {name:?}"))
                })?,
            None if upstreams.len() == 1 => 0,
            None => {
                return Err(at
                    .key("upstream")
                    .invalid("upstream = \"...\" is needed when there is more than one upstream"))
            }
        };
        if self.user.is_empty() {
            return Err(at.key("user").invalid("must not be empty"));
        }
        let user = self.user.clone();
        let source = self.source(&at)?;
        Ok(CredentialConfig {
            upstream,
            user,
            source,
        })
    }

    /// The one kind of credential given.
    fn source(self, at: &Section) -> Result<CredentialSource, ConfigError> {
        Ok(
            match (
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
                (None, None, None, Some(_), None, None)
                | (None, None, None, None, Some(_), None) => {
                    return Err(at.whole().invalid("client_cert and client_key go together"))
                }
                _ => {
                    return Err(at.whole().invalid(
                        "give exactly one of password_file, password_env, scram_secret, \
                         client_cert + client_key, rds_iam",
                    ))
                }
            },
        )
    }
}

/// Every `[[credential]]`, checked, with at most one per user and upstream.
pub(super) fn validate(
    raw: Vec<RawCredential>,
    upstreams: &[UpstreamConfig],
) -> Result<Vec<CredentialConfig>, ConfigError> {
    let credentials = raw
        .into_iter()
        .enumerate()
        .map(|(i, c)| c.validate(upstreams, i))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, c) in credentials.iter().enumerate() {
        if credentials[..i]
            .iter()
            .any(|o| o.upstream == c.upstream && o.user == c.user)
        {
            return Err(ConfigError::DuplicateCredential {
                user: c.user.clone(),
                upstream: upstreams[c.upstream].name.clone(),
            });
        }
    }
    Ok(credentials)
}
