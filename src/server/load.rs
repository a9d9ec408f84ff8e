//! What a start or a reload reads from files before it changes anything:
//! pgbastion's certificates (one `ServerCerts`: `[tls]`'s and those of
//! `[[tls.sni]]`) and each listener's acceptor serving them, the upstreams (verify-full connectors and SCRAM sources),
//! what each listener's sessions get (`ListenerInfo`), the audit chain's
//! key, and the certificate expiry metrics; `check` reads all of it for
//! `check-config`.

use std::path::Path;
use std::sync::Arc;

use super::error::ServerError;
use super::route::Route;
use super::router::Router;
use super::state::ListenerInfo;
use crate::admin::metrics::Metrics;
use crate::auth::credentials::Credentials;
use crate::config::{ClientCertMode, Config, CredentialSource, ListenerIdentity, ListenerProtocol};
use crate::http::HttpListener;
use crate::tls::{self, ServedTls, ServerCerts};

/// How audit lines are chained: an HMAC under `audit.chain_key_file`
/// (mode 0600), else SHA-256.
pub fn audit_digest(config: &Config) -> Result<crate::audit::chain::Digest, ServerError> {
    let Some(path) = &config.audit.chain_key else {
        return Ok(crate::audit::chain::Digest::Sha256);
    };
    read_chain_key(path).map(|k| crate::audit::chain::Digest::from_key(Some(&k)))
}

/// The key in a chain key file: its bytes, text or not (32 random bytes
/// are a good key), with trailing CR and LF bytes removed, as they always
/// were for text keys (an editor's newline is not part of the key). The
/// same rule applies in pgbastion and `audit verify`, so a chain verifies
/// with the file it was written with.
pub fn read_chain_key(path: &Path) -> Result<Vec<u8>, ServerError> {
    let key =
        crate::secret_file::read_bytes(path, "chain_key_file").map_err(ServerError::ChainKey)?;
    if key.len() < 16 {
        return Err(ServerError::ChainKeyShort(path.to_owned()));
    }
    Ok(key)
}

/// Validates a config completely (reading every certificate, key and CA
/// bundle) without binding anything: what `check-config` runs.
pub fn check(config: &Config) -> Result<(), ServerError> {
    prepare_tls(config)?;
    Credentials::load(&config.credentials, &config.upstreams)?;
    if let Some(c) = &config.cluster {
        crate::cluster::Cluster::check(c)?;
    }
    audit_digest(config)?;
    Ok(())
}

/// The TLS side of a configuration, read: pgbastion's certificates (None
/// without `[tls]`), each listener's acceptor serving them, and every
/// upstream.
pub(super) struct PreparedTls {
    pub certs: Option<Arc<ServerCerts>>,
    pub served: Vec<Option<ServedTls>>,
    pub routes: Vec<Route>,
}

pub(super) fn prepare_tls(config: &Config) -> Result<PreparedTls, ServerError> {
    let certs = match &config.tls {
        Some(t) => Some(ServerCerts::load(t).map_err(ServerError::Tls)?),
        None => None,
    };
    check_routed_names(config, certs.as_deref())?;
    Ok(PreparedTls {
        served: served_tls(config, certs.as_ref())?,
        routes: routes(config)?,
        certs,
    })
}

/// Every name a route matches is one a certificate pgbastion serves
/// covers (else clients with `sslmode=verify-full`, the only safe mode,
/// could never use the route).
fn check_routed_names(config: &Config, certs: Option<&ServerCerts>) -> Result<(), ServerError> {
    for route in config.routes.routes() {
        let Some(name) = &route.server_name else {
            continue;
        };
        let Some(certs) = certs else {
            return Err(ServerError::RouteWithoutTls(route.name.clone()));
        };
        if let Some(reason) = certs.uncovered(&name.to_string()) {
            return Err(ServerError::RouteCertificate {
                route: route.name.clone(),
                reason,
            });
        }
    }
    Ok(())
}

/// Each listener's acceptor, all serving from `certs` (they differ only in
/// the client certificates they ask for).
fn served_tls(
    config: &Config,
    certs: Option<&Arc<ServerCerts>>,
) -> Result<Vec<Option<ServedTls>>, ServerError> {
    let (Some(tls_cfg), Some(certs)) = (&config.tls, certs) else {
        return Ok(config.listeners.iter().map(|_| None).collect());
    };
    config
        .listeners
        .iter()
        .map(|l| {
            let auth = match &l.identity {
                ListenerIdentity::ClientCert { ca_file, mode, .. } => Some(tls::ClientAuth {
                    ca_file,
                    required: *mode == ClientCertMode::Required,
                }),
                _ => None,
            };
            let https = matches!(l.protocol, ListenerProtocol::Https(_));
            certs
                .acceptor(tls_cfg.min_version, auth)
                .map(|served| Some(if https { served.for_http() } else { served }))
                .map_err(|source| ServerError::Listener {
                    name: l.name.clone(),
                    source,
                })
        })
        .collect()
}

/// Every route: the upstream's connector, and its SCRAM source in scram
/// mode.
fn routes(config: &Config) -> Result<Vec<Route>, ServerError> {
    config.upstreams.iter().map(Route::new).collect()
}

/// What each listener's sessions get: its acceptor with the certificate
/// it serves, and its route (all from one configuration, so a session
/// never mixes a reload's certificate with the previous one's binding).
pub(super) fn listener_infos(
    config: &Config,
    served: Vec<Option<ServedTls>>,
    routes: &[Arc<Route>],
) -> Vec<Arc<ListenerInfo>> {
    let router = Arc::new(Router::new(config.routes.clone(), routes.to_vec()));
    config
        .listeners
        .iter()
        .zip(served)
        .map(|(l, tls)| {
            Arc::new(ListenerInfo {
                name: l.name.clone(),
                bind: l.bind.clone(),
                tls,
                identity: l.identity.clone(),
                proxy_protocol: l.proxy_protocol,
                proxy_trusted: l.proxy_trusted.clone(),
                client_tls: l.client_tls,
                cancel_plaintext: l.cancel_plaintext,
                route: l.upstream.map(|u| routes[u].clone()),
                router: router.clone(),
                http: match &l.protocol {
                    ListenerProtocol::Https(settings) => {
                        Some(Arc::new(HttpListener::new(settings.clone())))
                    }
                    ListenerProtocol::Postgres => None,
                },
            })
        })
        .collect()
}

/// The expiry of every certificate pgbastion uses, for the metrics: its
/// own as loaded (the ones it serves: `tls`, and `tls_sni:<first name>`
/// per `[[tls.sni]]`), the others as their files say.
pub(super) fn record_certificate_expiry(
    config: &Config,
    certs: Option<&ServerCerts>,
    metrics: &Metrics,
) {
    if let Some(certs) = certs {
        if let Some(t) = certs.default_cert().not_after() {
            metrics.certificate_expires("tls".into(), t);
        }
        for (name, cert) in certs.per_name() {
            if let Some(t) = cert.not_after() {
                metrics.certificate_expires(format!("tls_sni:{name}"), t);
            }
        }
    }
    let set = |what: String, path: &Path| {
        if let Some(t) = tls::earliest_expiry(path) {
            metrics.certificate_expires(what, t);
        }
    };
    for l in &config.listeners {
        if let ListenerIdentity::ClientCert { ca_file, .. } = &l.identity {
            set(format!("client_ca:{}", l.name), ca_file);
        }
    }
    for u in &config.upstreams {
        if let Some(ca) = &u.roots.ca_file {
            set(format!("upstream_ca:{}", u.name), ca);
        }
        if let Some((cert, _)) = &u.client_identity {
            set(format!("upstream_client_cert:{}", u.name), cert);
        }
    }
    for c in &config.credentials {
        if let CredentialSource::ClientCert { cert, .. } = &c.source {
            let upstream = &config.upstreams[c.upstream].name;
            set(format!("credential:{upstream}:{}", c.user), cert);
        }
    }
}
