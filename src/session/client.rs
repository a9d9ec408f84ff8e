//! The client side of a session before the relay: reading the first
//! packets (SSLRequest, GSSENCRequest, direct TLS, CancelRequest,
//! StartupMessage) under the rules of DESIGN.md, upgrading to TLS, and
//! sending pgbastion's own ErrorResponse.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

use crate::audit::ClientTransport;
use crate::config::ClientTlsMode;
use crate::protocol::startup::{self, CancelKey, StartupMessage, StartupPacket};
use crate::session::error::SessionError;
use crate::stream::{BoxedIo, Prefixed};
use crate::tls::{TlsInfo, ALPN_POSTGRESQL};

/// How much the negotiation asks the socket for per read.
const FIRST_READ_CHUNK: usize = 1024;

/// How long pgbastion tries to deliver its own ErrorResponse.
pub const ERROR_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the client's first packets settled.
pub enum Negotiated {
    Startup(StartupMessage),
    Cancel(CancelKey),
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

    pub async fn negotiate(
        &mut self,
        acceptor: Option<&TlsAcceptor>,
        mode: ClientTlsMode,
    ) -> Result<Negotiated, SessionError> {
        let mut gssenc_answered = false;
        loop {
            self.fill(1).await?;
            if self.buf[0] == startup::TLS_HANDSHAKE_RECORD && !self.is_tls() && !gssenc_answered {
                let acceptor = acceptor.ok_or(SessionError::TlsUnavailable)?;
                let prefix = std::mem::take(&mut self.buf);
                let io = std::mem::replace(&mut self.io, Box::new(tokio::io::empty()));
                self.io = Box::new(Prefixed::new(prefix, io));
                self.start_tls(acceptor).await?;
                let ClientTransport::Tls(info) = &self.transport else {
                    return Err(SessionError::TlsUnavailable);
                };
                // Like PostgreSQL: direct TLS must say it is Postgres, so
                // a TLS connection meant for another service on the same
                // port cannot be confused with ours.
                if info.alpn.as_deref().map(str::as_bytes) != Some(ALPN_POSTGRESQL) {
                    return Err(SessionError::DirectTlsWithoutAlpn);
                }
                continue;
            }
            self.fill(4).await?;
            let len = startup::packet_len([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])?;
            self.fill(len).await?;
            let packet = startup::parse(&self.buf[..len])?;
            self.buf.drain(..len);
            match packet {
                StartupPacket::SslRequest => {
                    if self.is_tls() {
                        return Err(SessionError::UnexpectedPacket("SSLRequest inside TLS"));
                    }
                    // CVE-2021-23214: bytes that arrived with the request
                    // were sent before TLS; they must never be read as if
                    // they came through it.
                    if !self.buf.is_empty() {
                        return Err(SessionError::PipelinedAfterSslRequest);
                    }
                    match acceptor {
                        Some(acceptor) => {
                            self.io
                                .write_all(b"S")
                                .await
                                .map_err(SessionError::ClientIo)?;
                            self.start_tls(acceptor).await?;
                        }
                        None => self
                            .io
                            .write_all(b"N")
                            .await
                            .map_err(SessionError::ClientIo)?,
                    }
                }
                StartupPacket::GssEncRequest => {
                    if self.is_tls() || gssenc_answered {
                        return Err(SessionError::UnexpectedPacket("GSSENCRequest"));
                    }
                    gssenc_answered = true;
                    self.io
                        .write_all(b"N")
                        .await
                        .map_err(SessionError::ClientIo)?;
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

    /// Best effort: send an ErrorResponse (encoded) and close.
    pub async fn send_error(&mut self, err: &[u8]) {
        let _ = tokio::time::timeout(ERROR_WRITE_TIMEOUT, async {
            let _ = self.io.write_all(err).await;
            let _ = self.io.shutdown().await;
        })
        .await;
    }
}
