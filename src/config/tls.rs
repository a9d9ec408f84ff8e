//! `[tls]`: pgbastion's certificate for the client leg, the per-name
//! certificates of `[[tls.sni]]` (which a client's SNI picks), and
//! `TlsVersion`, the lowest TLS version a leg accepts (here and on
//! upstreams). The names are checked here; the files are read later by
//! `crate::tls` (which `check-config` runs too).

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::error::{ConfigError, Section};
use super::raw::{RawSni, RawTls};

/// The lowest TLS version accepted on a leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// pgbastion's certificates for the client leg: the default one (`cert`,
/// `key`) and those served to clients whose SNI names one of `sni`'s
/// names.
#[derive(Debug, Clone)]
pub struct ClientTlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub min_version: TlsVersion,
    pub sni: Vec<SniCertConfig>,
}

/// One `[[tls.sni]]`: a certificate and key for `names`, each a DNS name
/// or `*.` and a DNS name (lowercase; unique across all entries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniCertConfig {
    pub names: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl RawTls {
    /// Checks the SNI names; the files are read later.
    pub(super) fn into_config(self) -> Result<ClientTlsConfig, ConfigError> {
        let mut seen: HashMap<String, usize> = HashMap::new();
        let sni = self
            .sni
            .into_iter()
            .enumerate()
            .map(|(i, raw)| raw.validate(i, &mut seen))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ClientTlsConfig {
            cert: self.cert,
            key: self.key,
            min_version: self.min_version,
            sni,
        })
    }
}

impl RawSni {
    /// Entry `index` (from 0, as `sni[index]` in errors); `seen` maps each
    /// name of the entries before it to its entry, so that one name never
    /// picks two certificates.
    fn validate(
        self,
        index: usize,
        seen: &mut HashMap<String, usize>,
    ) -> Result<SniCertConfig, ConfigError> {
        let at = Section::Tls.key(format!("sni[{index}].names"));
        if self.names.is_empty() {
            return Err(at.invalid("lists no name: give the names this certificate is served for"));
        }
        let mut names = Vec::with_capacity(self.names.len());
        for name in self.names {
            let lower = name.to_ascii_lowercase();
            if !is_sni_name(&lower) {
                return Err(at.invalid(format!(
                    "{name:?} is not a DNS name or a wildcard (\"*.\" and a DNS name, \
                     the \"*\" only as the whole first label)"
                )));
            }
            if let Some(other) = seen.insert(lower.clone(), index) {
                return Err(at.invalid(if other == index {
                    format!("{name:?} is listed twice")
                } else {
                    format!("{name:?} is also in tls.sni[{other}]: a name picks one certificate")
                }));
            }
            names.push(lower);
        }
        Ok(SniCertConfig {
            names,
            cert: self.cert,
            key: self.key,
        })
    }
}

/// Whether `name` (lowercase) is a DNS name, or `*.` and a DNS name.
pub(crate) fn is_sni_name(name: &str) -> bool {
    is_dns_name(name.strip_prefix("*.").unwrap_or(name))
}

/// A DNS name of letters, digits, `-` and `_` in labels of 1 to 63
/// characters that neither start nor end with `-`, 253 characters at most,
/// without a trailing dot (clients send SNI without one).
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        })
}
