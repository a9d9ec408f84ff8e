//! `Config::warnings`: settings that are valid but probably not what the
//! operator meant (today: a public CA bundle as a listener's `client_ca`
//! while a rule trusts its certificates alone). `check-config` prints
//! them and `run` logs them.

use std::path::Path;

use super::{Config, ListenerIdentity};
use crate::policy::Login;

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
pub(super) const PUBLIC_BUNDLE_MIN_CAS: usize = 20;

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
