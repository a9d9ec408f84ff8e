//! Reaching an upstream, and nothing more: resolve, connect with a deadline
//! trying every address, negotiate TLS (SSLRequest then exactly `S`, or
//! direct TLS), verify its certificate, and forward cancel requests the
//! same way. How sessions log in to the server is not decided here: the
//! server's `Route` pairs this dialer with that (passthrough, or scram
//! mode's verifier sources), and the auth code computes channel binding
//! from the certificate this hands back.
//!
//! Nothing of the client's is sent here. The session sends the
//! StartupMessage only on the verified stream this returns, so a server that
//! refuses TLS or presents the wrong certificate never sees a user name, let
//! alone a password.

use std::net::SocketAddr;
use std::time::Duration;

use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::config::{SendProxyProtocol, TlsNegotiation, UpstreamConfig};
use crate::protocol::proxy;
use crate::protocol::startup::{ssl_request, CancelKey};
use crate::routing::Endpoint;
use crate::tls::{
    self, CertificateProblem, ClientTlsStream, TlsConfigError, TlsConnector, TlsInfo,
};

#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("could not resolve upstream host {host:?}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("could not connect to upstream {target}: {attempts}")]
    Unreachable { target: String, attempts: String },
    #[error("upstream {addr} refused TLS (answered 'N' to SSLRequest)")]
    RefusedTls { addr: SocketAddr },
    #[error("upstream {addr} answered SSLRequest with an error message instead of 'S'")]
    ErrorBeforeTls { addr: SocketAddr },
    #[error("upstream {addr} answered SSLRequest with unexpected byte 0x{byte:02x}")]
    UnexpectedReply { addr: SocketAddr, byte: u8 },
    #[error("upstream {addr} closed the connection during TLS negotiation")]
    Closed { addr: SocketAddr },
    #[error("upstream {addr} presented a certificate that is not trusted for {server_name:?}: {problem}")]
    Certificate {
        addr: SocketAddr,
        server_name: String,
        problem: CertificateProblem,
    },
    #[error("TLS handshake with upstream {addr} failed: {reason}")]
    Handshake { addr: SocketAddr, reason: String },
    #[error("TLS negotiation with upstream {addr} timed out after {after:?}")]
    TlsTimeout { addr: SocketAddr, after: Duration },
}

/// One upstream, ready to dial: its config and its verify-full connector.
/// Never changed once built: a reload builds a new one (rotated CA bundles,
/// client certificates, a new address), and sessions keep the one they
/// started with.
pub struct Upstream {
    pub config: UpstreamConfig,
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.config.name)
            .field("target", &self.target())
            .finish_non_exhaustive()
    }
}

/// A verified TLS connection to an upstream.
pub struct UpstreamConn {
    pub stream: ClientTlsStream<TcpStream>,
    pub addr: SocketAddr,
    pub tls: TlsInfo,
    /// How long the TCP connect and the TLS negotiation took (metrics).
    pub timing: ConnectTiming,
}

/// The two phases of reaching an upstream.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnectTiming {
    pub connect: Duration,
    pub tls: Duration,
}

impl UpstreamConn {
    /// The server's verified certificate (DER), which SCRAM-SHA-256-PLUS
    /// toward the server binds to (`tls-server-end-point`).
    pub fn server_certificate(&self) -> Option<&[u8]> {
        let leaf = self.stream.get_ref().1.peer_certificates()?.first()?;
        Some(leaf.as_ref())
    }
}

impl Upstream {
    pub fn new(config: UpstreamConfig) -> Result<Upstream, TlsConfigError> {
        let connector = tls::upstream_connector(&config)?;
        Upstream::with_connector(config, connector)
    }

    /// This templated upstream for one endpoint, sharing its connector
    /// (the CA bundle and client certificate do not depend on the
    /// endpoint, so they are read once, not per tenant).
    pub fn for_endpoint(&self, endpoint: &Endpoint) -> Result<Upstream, TlsConfigError> {
        Upstream::with_connector(self.config.for_endpoint(endpoint), self.connector.clone())
    }

    fn with_connector(
        config: UpstreamConfig,
        connector: TlsConnector,
    ) -> Result<Upstream, TlsConfigError> {
        // Validated in config; re-checked here so this type cannot exist
        // without a valid name. A template is never dialed: it carries the
        // name a sample endpoint makes.
        let name = match config.is_templated() {
            true => config.for_endpoint(&Endpoint::sample()).server_name,
            false => config.server_name.clone(),
        };
        let server_name = ServerName::try_from(name).map_err(|e| TlsConfigError::Read {
            what: "upstream server_name",
            path: config.server_name.clone().into(),
            reason: e.to_string(),
        })?;
        Ok(Upstream {
            config,
            connector,
            server_name,
        })
    }

    /// The PROXY header for a connection pgbastion makes on its own behalf
    /// (auth_query lookups): one without addresses (v1 `UNKNOWN`, v2
    /// `UNSPEC`), since no client is behind it.
    pub fn local_proxy_header(&self) -> Option<Vec<u8>> {
        match self.config.send_proxy_protocol {
            SendProxyProtocol::Off => None,
            SendProxyProtocol::V1 => Some(proxy::encode_v1(None, None)),
            SendProxyProtocol::V2 => Some(proxy::encode_v2(None, None, &[])),
        }
    }

    /// `host:port` as configured, for messages.
    pub fn target(&self) -> String {
        if self.config.host.contains(':') {
            format!("[{}]:{}", self.config.host, self.config.port)
        } else {
            format!("{}:{}", self.config.host, self.config.port)
        }
    }

    /// Connects and verifies. `proxy_header`, when given, is written first
    /// (for upstreams configured with `send_proxy_protocol`).
    pub async fn connect(
        &self,
        connect_timeout: Duration,
        tls_timeout: Duration,
        proxy_header: Option<&[u8]>,
    ) -> Result<UpstreamConn, UpstreamError> {
        self.connect_presenting(None, connect_timeout, tls_timeout, proxy_header)
            .await
    }

    /// `connect`, presenting the client certificate of `identity` (a
    /// connector from the same upstream config) instead of the upstream's
    /// own: identity login with a role's certificate (`cert` method).
    pub async fn connect_presenting(
        &self,
        identity: Option<&TlsConnector>,
        connect_timeout: Duration,
        tls_timeout: Duration,
        proxy_header: Option<&[u8]>,
    ) -> Result<UpstreamConn, UpstreamError> {
        let started = std::time::Instant::now();
        let (tcp, addr) = self.dial(connect_timeout).await?;
        let connect = started.elapsed();
        crate::net::tune_tcp(&tcp);
        let connector = identity.unwrap_or(&self.connector).clone();
        match timeout(
            tls_timeout,
            self.negotiate(&connector, tcp, addr, proxy_header),
        )
        .await
        {
            Ok(result) => result.map(|mut up| {
                up.timing = ConnectTiming {
                    connect,
                    tls: started.elapsed().saturating_sub(connect),
                };
                up
            }),
            Err(_) => Err(UpstreamError::TlsTimeout {
                addr,
                after: tls_timeout,
            }),
        }
    }

    /// Forwards a cancel request to the server at `addr` (the address of
    /// the session being cancelled) over a new, verified TLS connection, and
    /// waits for the server to close it, as it does once the request is
    /// processed.
    pub async fn cancel(
        &self,
        addr: SocketAddr,
        req: &CancelKey,
        limit: Duration,
        proxy_header: Option<&[u8]>,
    ) -> Result<(), UpstreamError> {
        let work = async {
            let tcp = match TcpStream::connect(addr).await {
                Ok(tcp) => tcp,
                Err(e) => {
                    return Err(UpstreamError::Unreachable {
                        target: addr.to_string(),
                        attempts: e.to_string(),
                    })
                }
            };
            // Without TCP_NODELAY the CancelRequest, written right after
            // the handshake's last flight, waits for the server's delayed
            // ACK: measured at +45 ms per cancel (bench, cancel latency).
            crate::net::tune_tcp(&tcp);
            let mut conn = self
                .negotiate(&self.connector, tcp, addr, proxy_header)
                .await?;
            let closed = |_| UpstreamError::Closed { addr };
            conn.stream
                .write_all(&req.cancel_request())
                .await
                .map_err(closed)?;
            conn.stream.flush().await.map_err(closed)?;
            let mut sink = Vec::new();
            // The server answers nothing; EOF means it has the request.
            let _ = conn.stream.read_to_end(&mut sink).await;
            Ok(())
        };
        match timeout(limit, work).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::TlsTimeout { addr, after: limit }),
        }
    }

    /// Resolves the host on every call and tries each address in turn.
    async fn dial(
        &self,
        connect_timeout: Duration,
    ) -> Result<(TcpStream, SocketAddr), UpstreamError> {
        let host = self.config.host.as_str();
        let addrs: Vec<SocketAddr> = match timeout(
            connect_timeout,
            tokio::net::lookup_host((host, self.config.port)),
        )
        .await
        {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(e)) => {
                return Err(UpstreamError::Resolve {
                    host: host.into(),
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                return Err(UpstreamError::Resolve {
                    host: host.into(),
                    reason: format!("timed out after {connect_timeout:?}"),
                })
            }
        };
        if addrs.is_empty() {
            return Err(UpstreamError::Resolve {
                host: host.into(),
                reason: "no addresses".into(),
            });
        }
        let mut attempts = Vec::new();
        for addr in addrs {
            match timeout(connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => return Ok((tcp, addr)),
                Ok(Err(e)) => attempts.push(format!("{addr}: {e}")),
                Err(_) => attempts.push(format!("{addr}: timed out after {connect_timeout:?}")),
            }
        }
        Err(UpstreamError::Unreachable {
            target: self.target(),
            attempts: attempts.join("; "),
        })
    }

    async fn negotiate(
        &self,
        connector: &TlsConnector,
        mut tcp: TcpStream,
        addr: SocketAddr,
        proxy_header: Option<&[u8]>,
    ) -> Result<UpstreamConn, UpstreamError> {
        let closed = |_| UpstreamError::Closed { addr };
        if let Some(header) = proxy_header {
            tcp.write_all(header).await.map_err(closed)?;
        }
        if self.config.tls_negotiation == TlsNegotiation::Postgres {
            tcp.write_all(&ssl_request()).await.map_err(closed)?;
            // Exactly one byte: anything the server sends after `S` must be
            // TLS, and rustls will reject it if it is not.
            let reply = tcp.read_u8().await.map_err(closed)?;
            match reply {
                b'S' => {}
                b'N' => return Err(UpstreamError::RefusedTls { addr }),
                // Never read or show a pre-TLS error message: it is
                // unauthenticated (CVE-2024-10977).
                b'E' => return Err(UpstreamError::ErrorBeforeTls { addr }),
                byte => return Err(UpstreamError::UnexpectedReply { addr, byte }),
            }
        }
        let stream = connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| match tls::certificate_problem(&e) {
                Some(problem) => UpstreamError::Certificate {
                    addr,
                    server_name: self.config.server_name.clone(),
                    problem,
                },
                None if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    UpstreamError::Closed { addr }
                }
                None => UpstreamError::Handshake {
                    addr,
                    reason: e.to_string(),
                },
            })?;
        let tls = TlsInfo::from_connection(stream.get_ref().1, None);
        Ok(UpstreamConn {
            stream,
            addr,
            tls,
            timing: ConnectTiming::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// An upstream at a local port whose server answers the SSLRequest
    /// with `reply`, then closes.
    async fn fake_server(reply: &'static [u8]) -> (Upstream, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 8];
            tcp.read_exact(&mut request).await.unwrap();
            assert_eq!(request.to_vec(), ssl_request(), "SSLRequest first");
            tcp.write_all(reply).await.unwrap();
        });
        let config = crate::config::Config::from_toml(&format!(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\nclient_tls = \"allow\"\n[[upstream]]\naddress = \"{addr}\"\nsystem_roots = true\n"
        ))
        .unwrap();
        (Upstream::new(config.upstreams[0].clone()).unwrap(), addr)
    }

    async fn connect(upstream: &Upstream) -> Result<UpstreamConn, UpstreamError> {
        let limit = Duration::from_secs(5);
        upstream.connect(limit, limit, None).await
    }

    /// Nothing but `S` lets TLS start; a pre-TLS error message is never
    /// read (CVE-2024-10977).
    #[tokio::test]
    async fn only_s_starts_tls() {
        let (up, addr) = fake_server(b"N").await;
        assert!(
            matches!(connect(&up).await, Err(UpstreamError::RefusedTls { addr: a }) if a == addr)
        );
        let (up, _) = fake_server(b"E\0\0\0\x08secret").await;
        let e = connect(&up).await.err().unwrap();
        assert!(matches!(e, UpstreamError::ErrorBeforeTls { .. }), "{e}");
        assert!(!e.to_string().contains("secret"), "never shown: {e}");
        let (up, _) = fake_server(b"H").await;
        assert!(matches!(
            connect(&up).await,
            Err(UpstreamError::UnexpectedReply { byte: b'H', .. })
        ));
        let (up, _) = fake_server(b"").await;
        assert!(matches!(
            connect(&up).await,
            Err(UpstreamError::Closed { .. })
        ));
    }

    #[tokio::test]
    async fn unreachable_and_local_proxy_header() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let config = crate::config::Config::from_toml(&format!(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\nclient_tls = \"allow\"\n[[upstream]]\naddress = \"{addr}\"\nsystem_roots = true\nsend_proxy_protocol = \"v1\"\n"
        ))
        .unwrap();
        let up = Upstream::new(config.upstreams[0].clone()).unwrap();
        assert_eq!(up.target(), addr.to_string());
        assert!(matches!(
            connect(&up).await,
            Err(UpstreamError::Unreachable { .. })
        ));
        assert_eq!(
            up.local_proxy_header().as_deref(),
            Some(&b"PROXY UNKNOWN\r\n"[..])
        );
    }
}
