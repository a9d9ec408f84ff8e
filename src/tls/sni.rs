//! `ServerCerts`: pgbastion's certificates as one set, the default
//! (`[tls] cert`) and those of `[[tls.sni]]`, and the choice among them a
//! client's SNI makes (`for_name`): the rustls resolver serving a
//! handshake and the channel binding a session offers both ask
//! `for_name`, of the same loaded set, so SCRAM-SHA-256-PLUS always binds
//! to the certificate actually served. Also `uncovered`, which tells
//! `check-config` when the certificate a routed name picks does not name
//! it.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use super::{
    client_verifier, provider, versions, ClientAuth, ServedTls, ServerCert, TlsAcceptor,
    TlsConfigError, ALPN_POSTGRESQL,
};
use crate::config::{ClientTlsConfig, TlsVersion};

/// Every certificate pgbastion serves clients, loaded together on a start
/// or reload: a name picks one (exact names first, then wildcards, else
/// the default).
pub struct ServerCerts {
    default: Arc<ServerCert>,
    /// By lowercase name.
    exact: HashMap<String, Arc<ServerCert>>,
    /// By what follows `*.` (`*.b.c` is under `b.c`).
    wildcard: HashMap<String, Arc<ServerCert>>,
    /// Each `[[tls.sni]]` certificate with its first name, in the
    /// configuration's order (for the expiry metrics).
    per_entry: Vec<(String, Arc<ServerCert>)>,
}

impl ServerCerts {
    /// Reads the default certificate and every `[[tls.sni]]` one (the names
    /// were checked with the configuration: unique, lowercase).
    pub fn load(cfg: &ClientTlsConfig) -> Result<Arc<ServerCerts>, TlsConfigError> {
        let mut certs = ServerCerts::only(ServerCert::load(cfg)?);
        for entry in &cfg.sni {
            let cert = ServerCert::load_files(&entry.cert, &entry.key)?;
            for name in &entry.names {
                match name.strip_prefix("*.") {
                    Some(suffix) => certs.wildcard.insert(suffix.to_owned(), cert.clone()),
                    None => certs.exact.insert(name.clone(), cert.clone()),
                };
            }
            if let Some(first) = entry.names.first() {
                certs.per_entry.push((first.clone(), cert));
            }
        }
        Ok(Arc::new(certs))
    }

    /// A set of one certificate, served whatever the SNI.
    pub fn only(default: Arc<ServerCert>) -> ServerCerts {
        ServerCerts {
            default,
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            per_entry: Vec::new(),
        }
    }

    /// The certificate served to a client whose SNI is `sni`: the one of
    /// that exact name, else the wildcard for the name minus its first
    /// label, else the default (also without SNI). Names compare
    /// lowercase.
    pub fn for_name(&self, sni: Option<&str>) -> &Arc<ServerCert> {
        let Some(name) = sni else {
            return &self.default;
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(cert) = self.exact.get(&name) {
            return cert;
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .unwrap_or(&self.default)
    }

    /// The `[tls] cert` one.
    pub fn default_cert(&self) -> &Arc<ServerCert> {
        &self.default
    }

    /// Each `[[tls.sni]]` certificate with the first of its names.
    pub fn per_name(&self) -> impl Iterator<Item = (&str, &Arc<ServerCert>)> {
        self.per_entry.iter().map(|(n, c)| (n.as_str(), c))
    }

    /// Why a client connecting with `routed` (a name, or `*.` and a
    /// name, for which pgbastion routes) would fail `verify-full`: the
    /// certificate `for_name` picks does not name it. None when it does.
    pub fn uncovered(&self, routed: &str) -> Option<String> {
        let routed = routed.trim_end_matches('.').to_ascii_lowercase();
        let cert = self.for_name(Some(&routed));
        let names = cert.dns_names();
        if names.iter().any(|san| covers(san, &routed)) {
            return None;
        }
        let which = if Arc::ptr_eq(cert, &self.default) {
            "the default certificate"
        } else {
            "certificate"
        };
        Some(format!(
            "the routed name {routed:?} is served {which} {}, which does not cover it (it covers {})",
            cert.path().display(),
            if names.is_empty() {
                "no DNS name".to_owned()
            } else {
                names.join(", ")
            }
        ))
    }

    /// An acceptor for the client leg serving these certificates by SNI.
    /// ALPN `postgresql` is advertised; a client that offers ALPN without
    /// it is refused by the handshake. With `client_auth`, client
    /// certificates are verified against its CA.
    pub fn acceptor(
        self: &Arc<Self>,
        min_version: TlsVersion,
        client_auth: Option<ClientAuth<'_>>,
    ) -> Result<ServedTls, TlsConfigError> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions(min_version))
            .map_err(|source| TlsConfigError::Rustls {
                what: "client TLS versions".into(),
                source,
            })?;
        let builder = match client_auth {
            None => builder.with_no_client_auth(),
            Some(auth) => builder.with_client_cert_verifier(client_verifier(&auth)?),
        };
        let mut server = builder.with_cert_resolver(Arc::new(Resolver(self.clone())));
        server.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        Ok(ServedTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            certs: self.clone(),
        })
    }
}

/// Whether a certificate's DNS name `san` (lowercase) covers `name`:
/// equal, or `san` is `*.` and the name minus its first label (so `*.b.c`
/// covers `a.b.c` and the routed wildcard `*.b.c`, never `b.c` or
/// `x.a.b.c`).
fn covers(san: &str, name: &str) -> bool {
    if san == name {
        return true;
    }
    match (san.strip_prefix("*."), name.split_once('.')) {
        (Some(suffix), Some((_, parent))) => suffix == parent,
        _ => false,
    }
}

/// The rustls side of `ServerCerts::for_name`: every handshake of an
/// acceptor gets the chain the client's SNI picks.
struct Resolver(Arc<ServerCerts>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.for_name(hello.server_name()).certified.clone())
    }
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("exact", &self.0.exact.keys().collect::<Vec<_>>())
            .field("wildcard", &self.0.wildcard.keys().collect::<Vec<_>>())
            .finish()
    }
}
