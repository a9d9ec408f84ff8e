//! `[tls]`: pgbastion's certificate for the client leg, and `TlsVersion`,
//! the lowest TLS version a leg accepts (here and on upstreams). The files
//! are read later by `crate::tls` (which `check-config` runs too).

use std::path::PathBuf;

use serde::Deserialize;

use super::raw::RawTls;

/// The lowest TLS version accepted on a leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// pgbastion's certificate for the client leg.
#[derive(Debug, Clone)]
pub struct ClientTlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub min_version: TlsVersion,
}

impl RawTls {
    /// Nothing to check until the files are read.
    pub(super) fn into_config(self) -> ClientTlsConfig {
        ClientTlsConfig {
            cert: self.cert,
            key: self.key,
            min_version: self.min_version,
        }
    }
}
