//! TLS on both legs: pgbastion's own certificates (`ServerCert`, and the
//! set of them a client's SNI picks from, `sni::ServerCerts`) and the
//! acceptors clients talk to (`ServedTls`), the connector that verifies
//! upstreams (chain and host name, what libpq calls `verify-full`), and
//! `tls-server-end-point` channel binding (`channel_binding`).
//!
//! Also owns reading certificates and keys from PEM files, certificate
//! expiry dates, and turning a failed upstream handshake into a
//! `CertificateProblem` a human can act on.

pub mod channel_binding;
mod sni;
pub mod stream;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore};
use serde::Serialize;
use thiserror::Error;

use crate::config::{ClientTlsConfig, RootSources, TlsVersion, UpstreamConfig};

pub use sni::ServerCerts;
pub use stream::{ClientTlsStream, ServerTlsStream, TlsAcceptor, TlsConnector};

/// The ALPN protocol name PostgreSQL uses (required for direct TLS).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";
/// The ALPN protocol name of HTTP/1.1 (https listeners).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

#[derive(Debug, Error)]
pub enum TlsConfigError {
    #[error("cannot read {what} {path}: {reason}")]
    Read {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{what} {path} contains no PEM certificate")]
    NoCertificates { what: &'static str, path: PathBuf },
    #[error("CA directory {0} contains no usable PEM certificate")]
    EmptyCaDir(PathBuf),
    #[error("no system root certificates could be loaded: {0}")]
    SystemRoots(String),
    #[error("{what}: {source}")]
    Rustls { what: String, source: rustls::Error },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn versions(min: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static BOTH: &[&rustls::SupportedProtocolVersion] =
        &[&rustls::version::TLS13, &rustls::version::TLS12];
    static ONLY_13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    match min {
        TlsVersion::Tls12 => BOTH,
        TlsVersion::Tls13 => ONLY_13,
    }
}

/// Reads every certificate in a PEM file (a chain: leaf first).
pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsConfigError::Read {
            what,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificates {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Reads a private key in PKCS#8, PKCS#1 (RSA) or SEC1 (EC) PEM form.
pub fn load_key(path: &Path, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsConfigError::Read {
        what,
        path: path.to_owned(),
        // The error never contains key material, only what went wrong.
        reason: e.to_string(),
    })
}

/// Client certificates a listener asks for: which CA must have issued
/// them, and whether a client without one may continue.
pub struct ClientAuth<'a> {
    pub ca_file: &'a Path,
    pub required: bool,
}

/// One of pgbastion's own certificates (`[tls]` or a `[[tls.sni]]` cert
/// and key), read once per start or reload and then used for everything
/// that concerns it: the acceptors serve its chain and key to the clients
/// whose SNI picks it, SCRAM-SHA-256-PLUS binds to its `end_point`, and
/// the expiry metric reports its `not_after`. Read
/// once, so a certificate rotated on disk between two reads can never make
/// pgbastion offer a binding for a certificate other than the one it
/// serves (issue 20).
pub struct ServerCert {
    /// The chain (leaf first) and its signing key, as rustls serves them:
    /// rustls's `CertifiedKey` holds both (`cert`, `key`), and every
    /// acceptor built from this `ServerCert` hands out this very value.
    certified: Arc<CertifiedKey>,
    /// `tls-server-end-point` data of the leaf (None: a signature
    /// algorithm for which RFC 5929 defines none; then clients are not
    /// offered SCRAM-SHA-256-PLUS).
    end_point: Option<Vec<u8>>,
    /// When the first certificate of the chain to expire does (Unix time;
    /// None if none parses).
    not_after: Option<i64>,
    /// The file the chain was read from (named in `check-config`'s
    /// findings).
    path: PathBuf,
    /// The DNS names the leaf is valid for, lowercase.
    dns_names: Vec<String>,
}

impl ServerCert {
    /// Reads `[tls]`'s chain and key and checks that they belong together.
    pub fn load(cfg: &ClientTlsConfig) -> Result<Arc<ServerCert>, TlsConfigError> {
        ServerCert::load_files(&cfg.cert, &cfg.key)
    }

    /// Reads a chain and key and checks that they belong together.
    pub fn load_files(cert: &Path, key: &Path) -> Result<Arc<ServerCert>, TlsConfigError> {
        let chain = load_certs(cert, "TLS certificate")?;
        let key_der = load_key(key, "TLS key")?;
        let end_point = chain
            .first()
            .and_then(|leaf| channel_binding::tls_server_end_point(leaf));
        let not_after = earliest_not_after(&chain);
        let dns_names = chain.first().map(leaf_dns_names).unwrap_or_default();
        let certified = CertifiedKey::from_der(chain, key_der, &provider()).map_err(|source| {
            TlsConfigError::Rustls {
                what: format!(
                    "TLS certificate {} and key {}",
                    cert.display(),
                    key.display()
                ),
                source,
            }
        })?;
        Ok(Arc::new(ServerCert {
            certified: Arc::new(certified),
            end_point,
            not_after,
            path: cert.to_owned(),
            dns_names,
        }))
    }

    /// The chain served, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    /// The `tls-server-end-point` channel binding data of the leaf.
    pub fn end_point(&self) -> Option<&[u8]> {
        self.end_point.as_deref()
    }

    /// The earliest expiry in the chain, as a Unix time.
    pub fn not_after(&self) -> Option<i64> {
        self.not_after
    }

    /// The certificate file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The DNS names the leaf is valid for (its subjectAltName DNS
    /// entries; its common name only when it has none), lowercase.
    pub fn dns_names(&self) -> &[String] {
        &self.dns_names
    }

    /// An acceptor serving this certificate alone, whatever the SNI (see
    /// `ServerCerts::acceptor`).
    pub fn acceptor(
        self: &Arc<Self>,
        min_version: TlsVersion,
        client_auth: Option<ClientAuth<'_>>,
    ) -> Result<ServedTls, TlsConfigError> {
        Arc::new(ServerCerts::only(self.clone())).acceptor(min_version, client_auth)
    }
}

/// The DNS names `leaf` is valid for: its subjectAltName DNS entries, or
/// its common names when it has none (what libpq checks too), lowercase.
fn leaf_dns_names(leaf: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
        return Vec::new();
    };
    let sans: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(ext)) => ext
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if !sans.is_empty() {
        return sans;
    }
    cert.subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(str::to_ascii_lowercase)
        .collect()
}

/// A listener's TLS: its acceptor and the `ServerCerts` that acceptor
/// serves from, made together and only together (`ServerCerts::acceptor`),
/// so the channel binding a session offers (`end_point_for` its SNI) is
/// always that of the certificate its handshake presented.
#[derive(Clone)]
pub struct ServedTls {
    acceptor: TlsAcceptor,
    certs: Arc<ServerCerts>,
}

impl ServedTls {
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// The certificates the acceptor serves from.
    pub fn certs(&self) -> &ServerCerts {
        &self.certs
    }

    /// The same certificates and client-certificate checks for an https
    /// listener: ALPN `http/1.1` instead of `postgresql`, so browsers,
    /// Node's `fetch` and WebSocket clients (which offer `http/1.1`, or
    /// `h2` and `http/1.1`) are not refused by the handshake.
    pub fn for_http(&self) -> ServedTls {
        let mut config = (**self.acceptor.config()).clone();
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        ServedTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            certs: self.certs.clone(),
        }
    }

    /// What a TLS client whose SNI was `sni` binds to with
    /// SCRAM-SHA-256-PLUS: the binding of the certificate that SNI was
    /// served.
    pub fn end_point_for(&self, sni: Option<&str>) -> Option<&[u8]> {
        self.certs.for_name(sni).end_point()
    }
}

/// Verifies client certificates against `auth.ca_file`.
fn client_verifier(
    auth: &ClientAuth<'_>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsConfigError> {
    let roots = root_store(&RootSources {
        ca_file: Some(auth.ca_file.to_owned()),
        ca_dir: None,
        system: false,
    })?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    let verifier = if auth.required {
        verifier
    } else {
        verifier.allow_unauthenticated()
    };
    verifier.build().map_err(|e| TlsConfigError::Rustls {
        what: format!("client CA {}", auth.ca_file.display()),
        source: rustls::Error::General(e.to_string()),
    })
}

/// Builds the verify-full connector for one upstream.
pub fn upstream_connector(up: &UpstreamConfig) -> Result<TlsConnector, TlsConfigError> {
    upstream_connector_with_identity(
        up,
        up.client_identity
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path())),
    )
}

/// The same, presenting `identity` (certificate and key files) instead of
/// the upstream's own: a role's certificate for the server's `cert`
/// method (identity login).
pub fn upstream_connector_with_identity(
    up: &UpstreamConfig,
    identity: Option<(&Path, &Path)>,
) -> Result<TlsConnector, TlsConfigError> {
    let roots = root_store(&up.roots)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(up.min_tls_version))
        .map_err(|source| TlsConfigError::Rustls {
            what: format!("upstream {:?} TLS versions", up.name),
            source,
        })?
        .with_root_certificates(roots);
    let mut client = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                load_certs(cert, "upstream client certificate")?,
                load_key(key, "upstream client key")?,
            )
            .map_err(|source| TlsConfigError::Rustls {
                what: format!("upstream {:?} client certificate", up.name),
                source,
            })?,
        None => builder.with_no_client_auth(),
    };
    if up.tls_negotiation == crate::config::TlsNegotiation::Direct {
        client.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    }
    Ok(TlsConnector::from(Arc::new(client)))
}

/// When the first certificate of the PEM file at `path` to expire does,
/// as a Unix time (None if the file cannot be read or parsed).
pub fn earliest_expiry(path: &Path) -> Option<i64> {
    earliest_not_after(&load_certs(path, "certificate").ok()?)
}

/// When the first of `certs` to expire does (None if none parses).
fn earliest_not_after(certs: &[CertificateDer<'_>]) -> Option<i64> {
    certs
        .iter()
        .filter_map(|c| {
            x509_parser::parse_x509_certificate(c)
                .ok()
                .map(|(_, cert)| cert.validity().not_after.timestamp())
        })
        .min()
}

/// A verifying HTTPS-style connector (no client certificate, no ALPN) for
/// services pgbastion calls itself, such as AWS STS.
pub fn service_connector(roots: &RootSources) -> Result<TlsConnector, TlsConfigError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsConfigError::Rustls {
            what: "service TLS versions".into(),
            source,
        })?
        .with_root_certificates(root_store(roots)?)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

fn root_store(src: &RootSources) -> Result<RootCertStore, TlsConfigError> {
    let mut store = RootCertStore::empty();
    if let Some(file) = &src.ca_file {
        for cert in load_certs(file, "CA file")? {
            store.add(cert).map_err(|source| TlsConfigError::Rustls {
                what: format!("CA file {}", file.display()),
                source,
            })?;
        }
    }
    if let Some(dir) = &src.ca_dir {
        let entries = std::fs::read_dir(dir).map_err(|e| TlsConfigError::Read {
            what: "CA directory",
            path: dir.clone(),
            reason: e.to_string(),
        })?;
        let before = store.len();
        for entry in entries.flatten() {
            // A CA directory (like /etc/ssl/certs) holds other files too;
            // take every PEM certificate that parses and skip the rest.
            if let Ok(certs) = CertificateDer::pem_file_iter(entry.path()) {
                for cert in certs.flatten() {
                    let _ = store.add(cert);
                }
            }
        }
        if store.len() == before {
            return Err(TlsConfigError::EmptyCaDir(dir.clone()));
        }
    }
    if src.system {
        let found = rustls_native_certs::load_native_certs();
        if found.certs.is_empty() {
            let reasons: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
            return Err(TlsConfigError::SystemRoots(if reasons.is_empty() {
                "none found".into()
            } else {
                reasons.join("; ")
            }));
        }
        store.add_parsable_certificates(found.certs);
    }
    Ok(store)
}

/// The facts about one TLS session that go into the audit log.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpn: Option<String>,
}

impl TlsInfo {
    pub fn from_connection(conn: &rustls::CommonState, sni: Option<&str>) -> TlsInfo {
        TlsInfo {
            version: match conn.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".into(),
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".into(),
                Some(other) => format!("{other:?}"),
                None => "unknown".into(),
            },
            cipher: conn
                .negotiated_cipher_suite()
                .map(|s| format!("{:?}", s.suite()))
                .unwrap_or_else(|| "unknown".into()),
            sni: sni.map(str::to_owned),
            alpn: conn
                .alpn_protocol()
                .map(|a| String::from_utf8_lossy(a).into_owned()),
        }
    }
}

/// Why an upstream's certificate was not accepted, in the terms a person
/// fixing it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateProblem {
    UnknownIssuer,
    NameMismatch,
    Expired,
    NotYetValid,
    Other(String),
}

impl std::fmt::Display for CertificateProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertificateProblem::UnknownIssuer => {
                f.write_str("it is not signed by a trusted CA (unknown issuer)")
            }
            CertificateProblem::NameMismatch => {
                f.write_str("it is not valid for the expected host name")
            }
            CertificateProblem::Expired => f.write_str("it has expired"),
            CertificateProblem::NotYetValid => f.write_str("it is not yet valid"),
            CertificateProblem::Other(s) => write!(f, "{s}"),
        }
    }
}

/// Finds the certificate problem behind a failed handshake, if that is
/// what failed.
pub fn certificate_problem(err: &std::io::Error) -> Option<CertificateProblem> {
    use rustls::CertificateError as C;
    let rustls_err = err.get_ref()?.downcast_ref::<rustls::Error>()?;
    let rustls::Error::InvalidCertificate(cert_err) = rustls_err else {
        return None;
    };
    Some(match cert_err {
        C::UnknownIssuer => CertificateProblem::UnknownIssuer,
        C::NotValidForName | C::NotValidForNameContext { .. } => CertificateProblem::NameMismatch,
        C::Expired | C::ExpiredContext { .. } => CertificateProblem::Expired,
        C::NotValidYet | C::NotValidYetContext { .. } => CertificateProblem::NotYetValid,
        other => CertificateProblem::Other(format!("{other:?}")),
    })
}
