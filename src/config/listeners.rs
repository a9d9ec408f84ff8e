//! `[[listener]]`: where pgbastion accepts clients, how it learns who they
//! are, and whether it insists on TLS or a PROXY header. Owns the listener
//! types, the conversion from `RawListener`, and the checks that tie a
//! listener to `[tls]` and to its identity source.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::error::{ConfigError, Section};
use super::http::{ListenerProtocol, ListenerProtocolName};
use super::raw::RawListener;
use super::{ClientTlsConfig, UpstreamConfig};
use crate::identity::cert::{CertName, DEFAULT_ORDER};
use crate::identity::IdentitySource;

/// Whether a listener insists on TLS from its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientTlsMode {
    /// Plaintext StartupMessages are refused with SQLSTATE 28000.
    Require,
    /// Plaintext is accepted: for Unix sockets, loopback and overlay
    /// networks that already protect the client leg.
    Allow,
}

/// Whether a listener accepts CancelRequests sent without TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CancelPlaintext {
    /// Accepted: libpq before 17 (psql's Ctrl-C) and most drivers always
    /// send cancels in plaintext, and a cancel carries no credentials.
    #[default]
    Allow,
    /// Refused: only cancels inside TLS are honoured.
    Deny,
}

/// Whether a listener expects a PROXY protocol header (never guessed: the
/// specification forbids detecting it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    Off,
    /// Every connection must start with a v1 or v2 header, from a trusted
    /// source network.
    Required,
}

/// Whether a `client_cert` listener insists on a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientCertMode {
    /// No certificate, no connection (the TLS handshake fails).
    Required,
    /// Clients without one are identified by their address.
    Optional,
}

/// Where a listener accepts connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindAddress {
    Tcp(SocketAddr),
    /// The full socket path, named `.s.PGSQL.<port>` inside the directory so
    /// `psql -h DIR -p PORT` finds it.
    Unix(PathBuf),
}

impl std::fmt::Display for BindAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindAddress::Tcp(a) => write!(f, "{a}"),
            BindAddress::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: BindAddress,
    pub client_tls: ClientTlsMode,
    pub cancel_plaintext: CancelPlaintext,
    pub identity: ListenerIdentity,
    pub proxy_protocol: ProxyProtocol,
    /// Networks a PROXY header is accepted from (TCP listeners).
    pub proxy_trusted: Vec<ipnet::IpNet>,
    /// Index into `Config::upstreams`: where sessions go when no
    /// `[[route]]` matches (None: only routed sessions are served).
    pub upstream: Option<usize>,
    /// The PostgreSQL protocol, or HTTPS (WebSocket and SQL over HTTP).
    pub protocol: ListenerProtocol,
}

/// How a listener establishes who its clients are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerIdentity {
    Network,
    ClientCert {
        ca_file: PathBuf,
        mode: ClientCertMode,
        order: Vec<CertName>,
    },
    Tailscale,
}

impl RawListener {
    /// The listener at `index` (0-based; unnamed listeners are
    /// `listener<index>`), its upstream looked up by name. With `routed`
    /// (the file has `[[route]]`s), a listener may have no upstream of
    /// its own.
    pub(super) fn validate(
        self,
        index: usize,
        upstreams: &[UpstreamConfig],
        routed: bool,
    ) -> Result<ListenerConfig, ConfigError> {
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| format!("listener{index}"));
        let at = Section::Listener(name.clone());
        let bind = self.bind(&at)?;
        // Clients on a Unix socket are local processes, and libpq never
        // uses TLS there, so `allow` is the only useful default.
        let client_tls = self.client_tls.unwrap_or(match bind {
            BindAddress::Tcp(_) => ClientTlsMode::Require,
            BindAddress::Unix(_) => ClientTlsMode::Allow,
        });
        let upstream = self.upstream_index(&at, upstreams, routed)?;
        let identity = self.identity(&at)?;
        self.check_proxy_protocol(&at, &bind)?;
        let protocol = self.protocol(&at, &bind)?;
        Ok(ListenerConfig {
            name,
            bind,
            client_tls,
            cancel_plaintext: self.cancel_plaintext,
            identity,
            proxy_protocol: self.proxy_protocol,
            proxy_trusted: self.proxy_trusted,
            upstream,
            protocol,
        })
    }

    /// An https listener is TCP and always TLS (the WebSocket's `wss` and
    /// HTTPS are the client leg's protection); `[listener.http]` belongs
    /// to https listeners only.
    fn protocol(&self, at: &Section, bind: &BindAddress) -> Result<ListenerProtocol, ConfigError> {
        match self.protocol {
            ListenerProtocolName::Postgres => match self.http {
                Some(_) => Err(at.key("http").invalid("is only for protocol = \"https\"")),
                None => Ok(ListenerProtocol::Postgres),
            },
            ListenerProtocolName::Https => {
                if matches!(bind, BindAddress::Unix(_)) {
                    return Err(at.key("protocol").invalid(
                        "\"https\" needs a TCP listener (`listen = \"IP:PORT\"`), not unix_dir",
                    ));
                }
                if self.client_tls == Some(ClientTlsMode::Allow) {
                    return Err(at.key("client_tls").invalid(
                        "an https listener is always TLS; remove client_tls = \"allow\"",
                    ));
                }
                let settings = self.http.clone().unwrap_or_default();
                settings.check(at)?;
                Ok(ListenerProtocol::Https(settings))
            }
        }
    }

    fn bind(&self, at: &Section) -> Result<BindAddress, ConfigError> {
        match (&self.listen, &self.unix_dir) {
            (Some(addr), None) => {
                if self.port.is_some() {
                    return Err(at
                        .key("port")
                        .invalid("is only for unix_dir; put the port in `listen`"));
                }
                let addr = addr.parse().map_err(|_| {
                    at.key("listen").invalid(format!(
                        "{addr:?} is not IP:PORT (e.g. \"127.0.0.1:6432\" or \"[::]:6432\")"
                    ))
                })?;
                Ok(BindAddress::Tcp(addr))
            }
            (None, Some(dir)) => {
                let port = self.port.unwrap_or(5432);
                Ok(BindAddress::Unix(dir.join(format!(".s.PGSQL.{port}"))))
            }
            (Some(_), Some(_)) => Err(at
                .whole()
                .invalid("set either `listen` (TCP) or `unix_dir` (Unix socket), not both")),
            (None, None) => Err(at
                .whole()
                .invalid("set `listen` (TCP IP:PORT) or `unix_dir` (Unix socket directory)")),
        }
    }

    fn upstream_index(
        &self,
        at: &Section,
        upstreams: &[UpstreamConfig],
        routed: bool,
    ) -> Result<Option<usize>, ConfigError> {
        match &self.upstream {
            Some(u) => upstreams
                .iter()
                .position(|x| &x.name == u)
                .map(Some)
                .ok_or_else(|| {
                    at.key("upstream")
                        .invalid(format!("no upstream named {u:?}"))
                }),
            None if upstreams.len() == 1 => Ok(Some(0)),
            None if routed => Ok(None),
            None => Err(at.key("upstream").invalid(
                "several upstreams exist, so set `upstream = \"NAME\"` (or add [[route]]s)",
            )),
        }
    }

    fn identity(&self, at: &Section) -> Result<ListenerIdentity, ConfigError> {
        match self.identity {
            IdentitySource::Network => {
                if self.client_ca.is_some()
                    || self.client_cert.is_some()
                    || self.cert_identity.is_some()
                {
                    return Err(at.whole().invalid(
                        "client_ca, client_cert and cert_identity need identity = \"client_cert\"",
                    ));
                }
                Ok(ListenerIdentity::Network)
            }
            IdentitySource::Tailscale => Ok(ListenerIdentity::Tailscale),
            IdentitySource::ClientCert => Ok(ListenerIdentity::ClientCert {
                ca_file: self.client_ca.clone().ok_or_else(|| {
                    at.key("client_ca").invalid(
                        "missing: identity = \"client_cert\" needs client_ca (the CA that issues client certificates)",
                    )
                })?,
                mode: self.client_cert.unwrap_or(ClientCertMode::Required),
                order: match &self.cert_identity {
                    Some(order) if order.is_empty() => {
                        return Err(at
                            .key("cert_identity")
                            .invalid("must name at least one kind"))
                    }
                    Some(order) => order.clone(),
                    None => DEFAULT_ORDER.to_vec(),
                },
            }),
        }
    }

    fn check_proxy_protocol(&self, at: &Section, bind: &BindAddress) -> Result<(), ConfigError> {
        let trusted = at.key("proxy_trusted");
        match (self.proxy_protocol, bind) {
            (ProxyProtocol::Required, BindAddress::Tcp(_)) if self.proxy_trusted.is_empty() => {
                Err(trusted.invalid(
                    "proxy_protocol = \"required\" needs proxy_trusted = [\"CIDR\", ...]: \
                     the networks of the load balancers allowed to state client addresses",
                ))
            }
            (ProxyProtocol::Off, _) if !self.proxy_trusted.is_empty() => {
                Err(trusted.invalid("is set but proxy_protocol is \"off\""))
            }
            (ProxyProtocol::Required, BindAddress::Unix(_)) if !self.proxy_trusted.is_empty() => {
                Err(trusted.invalid(
                    "does not apply to a Unix socket (its file permissions decide who may connect)",
                ))
            }
            _ => Ok(()),
        }
    }
}

/// A listener that requires client TLS needs a certificate to serve.
pub(super) fn check_client_tls(
    listeners: &[ListenerConfig],
    tls: Option<&ClientTlsConfig>,
) -> Result<(), ConfigError> {
    if tls.is_some() {
        return Ok(());
    }
    match listeners
        .iter()
        .find(|l| l.client_tls == ClientTlsMode::Require)
    {
        Some(l) => Err(Section::Listener(l.name.clone()).whole().invalid(
            "requires client TLS but no certificate is configured: \
             set [tls] cert and key (--tls-cert/--tls-key), or client_tls = \"allow\" \
             for a listener whose network already protects clients",
        )),
        None => Ok(()),
    }
}

/// Each identity source has what it needs: a certificate identity needs
/// TLS, a tailnet identity needs the peer's address.
pub(super) fn check_identities(
    listeners: &[ListenerConfig],
    tls: Option<&ClientTlsConfig>,
) -> Result<(), ConfigError> {
    if let Some(l) = listeners
        .iter()
        .find(|l| matches!(l.identity, ListenerIdentity::ClientCert { .. }))
    {
        if l.client_tls != ClientTlsMode::Require || tls.is_none() {
            return Err(Section::Listener(l.name.clone()).key("identity").invalid(
                "\"client_cert\" needs client_tls = \"require\" and a [tls] certificate",
            ));
        }
    }
    for l in listeners {
        if l.identity == ListenerIdentity::Tailscale
            && !matches!(l.bind, BindAddress::Tcp(_))
            && l.proxy_protocol != ProxyProtocol::Required
        {
            return Err(Section::Listener(l.name.clone()).key("identity").invalid(
                "\"tailscale\" needs the peer's address: a TCP listener, \
                 or proxy_protocol = \"required\" (e.g. behind `tailscale serve --proxy-protocol`)",
            ));
        }
    }
    Ok(())
}
