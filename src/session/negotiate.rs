//! Stage 1, the client's first packets: the load balancer's PROXY header
//! (when the listener requires one), then SSLRequest, GSSENCRequest, direct
//! TLS, CancelRequest and the StartupMessage under the rules of docs/design.md,
//! upgrading the client leg to TLS on the way. Also the client leg itself
//! (`ClientConn`) and pgbastion's own ErrorResponse to it.
//!
//! Everything but `Session::negotiate` works on any byte stream, so the
//! protocol rules are unit-tested over `tokio::io::duplex` (`tests`).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

use super::{unless_shutdown, Exit, Session};
use crate::audit::{Carrier, ClientAddress, ClientTransport, ProxyFacts, Requested};
use crate::config::{ClientTlsMode, ProxyProtocol};
use crate::limits::pending::PendingPermit;
use crate::protocol::proxy::{self, Addresses, ProxyHeader};
use crate::protocol::startup::{self, CancelKey, StartupMessage, StartupPacket};
use crate::session::error::SessionError;
use crate::stream::{BoxedIo, Prefixed};
use crate::tls::{TlsAcceptor, TlsInfo, ALPN_POSTGRESQL};

#[cfg(test)]
mod tests;

/// How much the negotiation asks the socket for per read.
const FIRST_READ_CHUNK: usize = 1024;

/// How long pgbastion tries to deliver its own ErrorResponse.
pub const ERROR_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the client's first packets settled.
#[derive(Debug)]
pub enum Negotiated {
    Startup(StartupMessage),
    Cancel(CancelKey),
}

/// Whether the client's GSSENCRequest was answered (with 'N'): a client
/// may ask once, and then only go on in plaintext or with an SSLRequest,
/// never start direct TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GssEnc {
    NotAsked,
    Declined,
}

/// The client side during negotiation: the stream, bytes read but not yet
/// consumed, and whether TLS is on.
pub struct ClientConn {
    pub io: BoxedIo,
    pub buf: Vec<u8>,
    pub transport: ClientTransport,
    /// The verified client certificate (leaf), when one was presented.
    pub peer_cert: Option<Vec<u8>>,
    /// `tls-server-end-point` data of the certificate pgbastion presented
    /// on this connection (taken at the handshake, so a certificate
    /// rotated meanwhile does not change what the client binds to).
    pub binding: Option<Vec<u8>>,
    /// What carries the stream when an https listener does (None: the
    /// client's own socket).
    pub carrier: Option<Carrier>,
}

/// Why a client's TLS handshake failed, for the audit: the TLS alert the
/// client sent or rustls' reason for refusing it, else the I/O error (the
/// client hung up mid-handshake).
fn handshake_failure(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => tls.to_string(),
        None => e.to_string(),
    }
}

impl ClientConn {
    /// A client leg in plaintext, nothing read yet.
    pub fn new(io: BoxedIo) -> Self {
        ClientConn {
            io,
            buf: Vec::new(),
            transport: ClientTransport::Plaintext,
            peer_cert: None,
            binding: None,
            carrier: None,
        }
    }

    /// A stream an https listener carries, already inside its TLS.
    pub fn carried(
        io: BoxedIo,
        carrier: Carrier,
        tls: TlsInfo,
        peer_cert: Option<Vec<u8>>,
    ) -> Self {
        ClientConn {
            io,
            buf: Vec::new(),
            transport: ClientTransport::Tls(tls),
            peer_cert,
            binding: None,
            carrier: Some(carrier),
        }
    }

    pub async fn fill(&mut self, n: usize) -> Result<(), SessionError> {
        while self.buf.len() < n {
            // Read generously, not just the bytes needed: whatever arrived
            // with an SSLRequest must be seen to be refused (CVE-2021-23214).
            self.buf.reserve(FIRST_READ_CHUNK.max(n - self.buf.len()));
            let read = self
                .io
                .read_buf(&mut self.buf)
                .await
                .map_err(SessionError::ClientIo)?;
            if read == 0 {
                return Err(SessionError::ClientClosedEarly);
            }
        }
        Ok(())
    }

    /// A carried client (inside `wss` or HTTPS) sent a PasswordMessage
    /// right behind its StartupMessage without being asked: the Neon
    /// driver's `pipelineConnect: "password"` (its writes of one turn
    /// arrive as one WebSocket message), and every SQL-over-HTTP request.
    pub fn pipelined_password(&self) -> bool {
        self.carrier.is_some() && self.buf.first() == Some(&crate::protocol::message::tag::PASSWORD)
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.transport, ClientTransport::Tls(_))
    }

    async fn start_tls(&mut self, acceptor: &TlsAcceptor) -> Result<(), SessionError> {
        // The old stream moves into the TLS stream; a failed handshake
        // leaves nothing usable to write an error to, which is correct.
        let io = std::mem::replace(&mut self.io, Box::new(tokio::io::empty()));
        let tls = match acceptor.accept(io).await {
            Ok(tls) => tls,
            Err(e) => {
                self.transport = ClientTransport::TlsFailed {
                    error: handshake_failure(&e),
                };
                return Err(SessionError::ClientTlsHandshake(e));
            }
        };
        let conn = tls.get_ref().1;
        self.transport = ClientTransport::Tls(TlsInfo::from_connection(conn, conn.server_name()));
        self.peer_cert = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec());
        self.io = Box::new(tls);
        Ok(())
    }

    /// Direct TLS (the first byte is a TLS handshake record): the bytes
    /// read so far go back to the acceptor with the rest of the ClientHello.
    async fn direct_tls(&mut self, acceptor: Option<&TlsAcceptor>) -> Result<(), SessionError> {
        let acceptor = acceptor.ok_or(SessionError::TlsUnavailable)?;
        let prefix = std::mem::take(&mut self.buf);
        let io = std::mem::replace(&mut self.io, Box::new(tokio::io::empty()));
        self.io = Box::new(Prefixed::new(prefix, io));
        self.start_tls(acceptor).await?;
        let ClientTransport::Tls(info) = &self.transport else {
            return Err(SessionError::TlsUnavailable);
        };
        // Like PostgreSQL: direct TLS must say it is Postgres, so a TLS
        // connection meant for another service on the same port cannot be
        // confused with ours.
        if info.alpn.as_deref().map(str::as_bytes) != Some(ALPN_POSTGRESQL) {
            return Err(SessionError::DirectTlsWithoutAlpn);
        }
        Ok(())
    }

    /// Answers an SSLRequest: 'S' and the handshake, or 'N' without a
    /// certificate.
    async fn ssl_request(&mut self, acceptor: Option<&TlsAcceptor>) -> Result<(), SessionError> {
        if self.carrier.is_some() {
            // Already inside the WebSocket's TLS (`wss`): a driver that
            // asks anyway is told no, as Neon's proxy does, and goes on.
            return self.decline().await;
        }
        if self.is_tls() {
            return Err(SessionError::UnexpectedPacket("SSLRequest inside TLS"));
        }
        // CVE-2021-23214: bytes that arrived with the request were sent
        // before TLS; they must never be read as if they came through it.
        if !self.buf.is_empty() {
            return Err(SessionError::PipelinedAfterSslRequest);
        }
        match acceptor {
            Some(acceptor) => {
                self.io
                    .write_all(b"S")
                    .await
                    .map_err(SessionError::ClientIo)?;
                self.start_tls(acceptor).await
            }
            None => self.decline().await,
        }
    }

    /// 'N': no TLS (or GSS encryption) from this answer on.
    async fn decline(&mut self) -> Result<(), SessionError> {
        self.io
            .write_all(b"N")
            .await
            .map_err(SessionError::ClientIo)
    }

    /// Reads the client's first packets until a StartupMessage or a
    /// CancelRequest, upgrading to TLS on the way.
    pub async fn negotiate(
        &mut self,
        acceptor: Option<&TlsAcceptor>,
        mode: ClientTlsMode,
    ) -> Result<Negotiated, SessionError> {
        let mut gssenc = GssEnc::NotAsked;
        loop {
            self.fill(1).await?;
            if self.buf[0] == startup::TLS_HANDSHAKE_RECORD
                && !self.is_tls()
                && gssenc == GssEnc::NotAsked
            {
                self.direct_tls(acceptor).await?;
                continue;
            }
            self.fill(4).await?;
            let len = startup::packet_len([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])?;
            self.fill(len).await?;
            let packet = startup::parse(&self.buf[..len])?;
            self.buf.drain(..len);
            match packet {
                StartupPacket::SslRequest => self.ssl_request(acceptor).await?,
                StartupPacket::GssEncRequest => {
                    let carried_once = self.carrier.is_some() && gssenc == GssEnc::NotAsked;
                    if (self.is_tls() && !carried_once) || gssenc == GssEnc::Declined {
                        return Err(SessionError::UnexpectedPacket("GSSENCRequest"));
                    }
                    gssenc = GssEnc::Declined;
                    self.decline().await?;
                }
                StartupPacket::Cancel(c) => return Ok(Negotiated::Cancel(c)),
                StartupPacket::Startup(m) => {
                    if !self.is_tls() && mode == ClientTlsMode::Require {
                        return Err(SessionError::TlsRequired);
                    }
                    return Ok(Negotiated::Startup(m));
                }
            }
        }
    }

    /// `negotiate` within the client's startup deadline.
    pub async fn negotiate_within(
        &mut self,
        acceptor: Option<&TlsAcceptor>,
        mode: ClientTlsMode,
        limit: Duration,
    ) -> Result<Negotiated, SessionError> {
        tokio::time::timeout(limit, self.negotiate(acceptor, mode))
            .await
            .unwrap_or(Err(SessionError::ClientTimeout(limit)))
    }

    /// Reads the load balancer's PROXY header within `limit`, refusing an
    /// untrusted `peer` before reading a byte. Bytes after the header stay
    /// in the buffer for the Postgres negotiation.
    pub async fn read_proxy_header(
        &mut self,
        peer: Option<SocketAddr>,
        trusted: &[ipnet::IpNet],
        limit: Duration,
    ) -> Result<ProxyHeader, SessionError> {
        // Only from a source in `proxy_trusted` (a Unix socket's peer has
        // no address: its permissions decide).
        if let Some(peer) = peer {
            if !trusted.iter().any(|n| n.contains(&peer.ip())) {
                return Err(SessionError::ProxyUntrusted(peer.ip().to_string()));
            }
        }
        tokio::time::timeout(limit, async {
            loop {
                match proxy::parse(&self.buf) {
                    Ok(Some((header, len))) => {
                        self.buf.drain(..len);
                        return Ok(header);
                    }
                    Ok(None) => self.fill(self.buf.len() + 1).await?,
                    Err(e) => return Err(SessionError::ProxyHeader(e)),
                }
            }
        })
        .await
        .unwrap_or(Err(SessionError::ProxyTimeout(limit)))
    }

    /// Best effort: send an ErrorResponse (encoded) and close.
    pub async fn send_error(&mut self, err: &[u8]) {
        let _ = tokio::time::timeout(ERROR_WRITE_TIMEOUT, async {
            let _ = self.io.write_all(err).await;
            let _ = self.io.shutdown().await;
        })
        .await;
    }
}

/// Until the startup packet, a shutdown closes the connection at once and
/// says nothing, as PostgreSQL does (issue 19 adversarial L1: it held the
/// exit for the drain deadline and 3 s more).
fn closed_at_shutdown() -> Exit {
    debug!("shutting down: closed a connection that sent no startup packet");
    Exit::Silent
}

impl Session {
    /// Stage 1: the PROXY header, then the client's first packets, each
    /// under its own deadline. The StartupMessage's user and database are
    /// in the session's facts from here on.
    pub(super) async fn negotiate(
        &mut self,
        conn: &mut ClientConn,
        pending: &mut Option<PendingPermit>,
    ) -> Result<Negotiated, Exit> {
        if self.listener.proxy_protocol == ProxyProtocol::Required {
            self.proxy_header(conn, pending).await?;
        }
        let listener = self.listener.clone();
        let limit = self.settings.timeouts.client_startup;
        let negotiated = unless_shutdown(
            &self.shared,
            conn.negotiate_within(listener.acceptor(), listener.client_tls, limit),
        )
        .await
        .ok_or_else(closed_at_shutdown)?;
        self.facts.client_tls = Some(conn.transport.clone());
        // Negotiation read in generous chunks; a login that stalls from
        // here on holds only what is left unread (issue 19 item 18).
        conn.buf.shrink_to_fit();
        if let ClientTransport::Tls(info) = &conn.transport {
            conn.binding = listener.binding_for(info.sni.as_deref());
        }
        self.note_startup(negotiated.map_err(Exit::refused)?)
    }

    /// Stage 1 for a stream an https listener carries: TLS and the PROXY
    /// header are behind it, so only the first packets remain (an
    /// SSLRequest is answered 'N'; direct TLS inside TLS is refused as a
    /// protocol error).
    pub(super) async fn negotiate_carried(
        &mut self,
        conn: &mut ClientConn,
    ) -> Result<Negotiated, Exit> {
        let limit = self.settings.timeouts.client_startup;
        let negotiated = unless_shutdown(
            &self.shared,
            conn.negotiate_within(None, ClientTlsMode::Allow, limit),
        )
        .await
        .ok_or_else(closed_at_shutdown)?;
        self.facts.client_tls = Some(conn.transport.clone());
        conn.buf.shrink_to_fit();
        if let ClientTransport::Tls(info) = &conn.transport {
            conn.binding = self.listener.binding_for(info.sni.as_deref());
        }
        self.note_startup(negotiated.map_err(Exit::refused)?)
    }

    /// The StartupMessage's user and database go into the session's facts.
    fn note_startup(&mut self, negotiated: Negotiated) -> Result<Negotiated, Exit> {
        if let Negotiated::Startup(startup) = &negotiated {
            self.facts.requested = Some(Requested {
                user: startup.user().to_owned(),
                database: startup.database().to_owned(),
                application_name: startup.application_name().map(str::to_owned),
                protocol: startup.version.to_string(),
            });
        }
        Ok(negotiated)
    }

    /// The load balancer's PROXY header: afterwards its source is the
    /// client address everywhere (policy, audit, logs, rate limits), and
    /// the connection counts against that address's pending slots.
    async fn proxy_header(
        &mut self,
        conn: &mut ClientConn,
        pending: &mut Option<PendingPermit>,
    ) -> Result<(), Exit> {
        let shared = self.shared.clone();
        let read = conn.read_proxy_header(
            self.peer,
            &self.listener.proxy_trusted,
            self.settings.timeouts.proxy_header,
        );
        let header = unless_shutdown(&shared, read)
            .await
            .ok_or_else(closed_at_shutdown)?
            .map_err(Exit::refused)?;
        if let Some(ip) = self.take_proxy_header(header) {
            if !pending.as_mut().is_none_or(|p| p.readdress(ip)) {
                let limit = "limits.max_pending_per_address";
                if self.shared.warn_limit.allow(limit) {
                    warn!(limit, "too many unauthenticated connections; closing");
                }
                return Err(Exit::Silent);
            }
        }
        Ok(())
    }

    /// Records what the PROXY header says about the client. Returns the
    /// client's address, if the header states one.
    fn take_proxy_header(&mut self, header: ProxyHeader) -> Option<IpAddr> {
        let via = self.facts.client.clone();
        if let Some(src) = header.source().map(crate::server::canonical) {
            self.peer = Some(src);
            self.facts.client = ClientAddress::tcp(src);
            if let Addresses::Tcp { dst, .. } = header.addresses {
                self.local = Some(crate::server::canonical(dst));
            }
            // Every later log line of the session names the real client.
            tracing::Span::current().record("client", tracing::field::display(&self.facts.client));
            debug!(%via, "client address from PROXY header");
        }
        let stated = header.source().map(|s| s.ip().to_canonical());
        self.facts.proxy = Some(ProxyFacts {
            via,
            version: header.version,
            command: header.command,
            tlvs: header.tlvs,
        });
        stated
    }
}
