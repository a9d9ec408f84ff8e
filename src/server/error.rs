//! `ServerError`: why pgbastion could not start, or why a reload (or
//! `check-config`) refused a configuration, each naming the section or
//! listener to fix.

use std::path::PathBuf;

use thiserror::Error;

use crate::tls::TlsConfigError;

#[derive(Debug, Error)]
pub enum ServerError {
    /// pgbastion's own certificate and key (`[tls]`), read once for every
    /// listener.
    #[error("[tls]: {0}")]
    Tls(TlsConfigError),
    #[error("listener {name:?}: {source}")]
    Listener {
        name: String,
        source: TlsConfigError,
    },
    #[error("upstream {name:?}: {source}")]
    Upstream {
        name: String,
        source: TlsConfigError,
    },
    #[error("upstream {name:?}: {source}")]
    Auth {
        name: String,
        source: crate::auth::source::SourceError,
    },
    /// A route's server name that no certificate pgbastion serves covers,
    /// so `sslmode=verify-full` clients could never reach it.
    #[error("route {route:?}: {reason}; add a [[tls.sni]] certificate that covers it")]
    RouteCertificate { route: String, reason: String },
    #[error("route {0:?} routes by server_name, which clients send only over TLS: set [tls] cert and key")]
    RouteWithoutTls(String),
    #[error("[[credential]]: {0}")]
    Credential(#[from] crate::auth::credentials::CredentialError),
    #[error("cannot open audit log: {0}")]
    Audit(std::io::Error),
    #[error("listener {name:?}: cannot listen on {addr}: {source}")]
    Bind {
        name: String,
        addr: String,
        source: std::io::Error,
    },
    #[error("listener {name:?}: {path} is in use by another running server")]
    SocketInUse { name: String, path: PathBuf },
    #[error("[cluster]: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("[audit] {0}")]
    ChainKey(crate::secret_file::SecretFileError),
    #[error("[audit] chain_key_file {0} holds fewer than 16 bytes: use a random key (e.g. head -c 32 /dev/urandom | base64)")]
    ChainKeyShort(PathBuf),
}
