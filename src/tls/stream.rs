//! `TlsStream`: TLS over any byte stream, driven through rustls's
//! unbuffered API, so that a connection between two reads holds no buffer.
//!
//! Why not tokio-rustls: a buffered rustls connection keeps a 4 KiB receive
//! buffer for its whole life, even while idle, and an idle session is what
//! pgbastion holds most of (issue 24: memory per idle session). Here the
//! ciphertext is read into a buffer on the stack of the poll and decrypted
//! there; only what is left over (a record cut by the read, plaintext the
//! reader had no room for, ciphertext the socket did not take) is kept on
//! the heap, and only until it is used. Between two messages a connection
//! owns nothing but rustls's keys and state.
//!
//! The stream behaves as tokio-rustls's does where callers can tell: a
//! handshake or record error is an `InvalidData` I/O error carrying the
//! `rustls::Error`; the peer's close_notify reads as end of stream, and a
//! TCP close without it as `UnexpectedEof`; `poll_shutdown` sends
//! close_notify, then shuts the socket's write side.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::ops::DerefMut;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedConnectionCommon,
    UnbufferedStatus,
};
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[cfg(test)]
mod tests;

/// One read from the socket: a whole record of the largest size (16 KiB
/// of plaintext and its expansion) fits.
const READ_SIZE: usize = 16 * 1024 + 1024;
/// The most ciphertext held while it does not yet make a record. rustls
/// joins a handshake message of up to 64 KiB across records; beyond that
/// the peer is sending what no TLS message needs.
const MAX_INCOMING: usize = 64 * 1024 + READ_SIZE;
/// Plaintext encrypted per write: one record of the largest size.
const MAX_WRITE: usize = 16 * 1024;
/// A bound on what a record adds to its plaintext (header, explicit nonce,
/// tag, inner content type), for sizing the first try at encrypting.
const RECORD_OVERHEAD: usize = 64;

/// The side of a connection rustls runs: client toward a server, server
/// toward a client. Each has its own `process_tls_records`.
pub trait Role: DerefMut<Target = UnbufferedConnectionCommon<Self::Data>> + Unpin {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Role for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        self.process_tls_records(incoming)
    }
}

/// pgbastion's side of a connection from a client, with the name the
/// client asked for (SNI), which rustls's unbuffered server does not tell:
/// `TlsAcceptor` reads it from the ClientHello first, with rustls's own
/// parser (`rustls::server::Acceptor`).
pub struct ServerSide {
    conn: UnbufferedServerConnection,
    sni: Option<Box<str>>,
}

impl ServerSide {
    /// The client's SNI, as rustls's `ServerConnection::server_name`.
    pub fn server_name(&self) -> Option<&str> {
        self.sni.as_deref()
    }
}

impl std::ops::Deref for ServerSide {
    type Target = UnbufferedConnectionCommon<ServerConnectionData>;
    fn deref(&self) -> &Self::Target {
        &self.conn
    }
}

impl DerefMut for ServerSide {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.conn
    }
}

impl Role for ServerSide {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        self.conn.process_tls_records(incoming)
    }
}

/// pgbastion's side of a connection to a server.
pub type ClientTlsStream<IO> = TlsStream<UnbufferedClientConnection, IO>;
/// pgbastion's side of a connection from a client.
pub type ServerTlsStream<IO> = TlsStream<ServerSide, IO>;

/// Connects as a TLS client with one configuration (the upstream's
/// verify-full settings, a service's roots).
#[derive(Clone)]
pub struct TlsConnector(Arc<ClientConfig>);

impl From<Arc<ClientConfig>> for TlsConnector {
    fn from(config: Arc<ClientConfig>) -> Self {
        TlsConnector(config)
    }
}

impl TlsConnector {
    /// The handshake over `io`, verifying the server as `name`.
    pub async fn connect<IO>(
        &self,
        name: ServerName<'static>,
        io: IO,
    ) -> io::Result<ClientTlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let conn = UnbufferedClientConnection::new(self.0.clone(), name).map_err(invalid_data)?;
        TlsStream::handshake(conn, io).await
    }
}

/// Accepts TLS clients with one configuration.
#[derive(Clone)]
pub struct TlsAcceptor(Arc<ServerConfig>);

impl From<Arc<ServerConfig>> for TlsAcceptor {
    fn from(config: Arc<ServerConfig>) -> Self {
        TlsAcceptor(config)
    }
}

impl TlsAcceptor {
    /// The configuration it accepts with (to derive another, as the
    /// https listener's with its own ALPN).
    pub fn config(&self) -> &Arc<ServerConfig> {
        &self.0
    }

    /// The handshake over `io`, as the server.
    pub async fn accept<IO>(&self, io: IO) -> io::Result<ServerTlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let conn = UnbufferedServerConnection::new(self.0.clone()).map_err(invalid_data)?;
        let mut stream = TlsStream::new(ServerSide { conn, sni: None }, io);
        let mut probe = ClientHelloProbe::default();
        let sni = poll_fn(|cx| stream.poll_client_hello(cx, &mut probe)).await?;
        stream.engine.conn.sni = sni.map(String::into_boxed_str);
        poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }
}

/// rustls's ClientHello parser, fed the bytes `TlsAcceptor` reads until
/// the ClientHello is whole. The same bytes then go to the handshake.
#[derive(Default)]
struct ClientHelloProbe {
    acceptor: rustls::server::Acceptor,
    /// How much of the kept ciphertext it has been given.
    fed: usize,
}

/// A TLS connection whose handshake is done.
pub struct TlsStream<C, IO> {
    io: IO,
    engine: Engine<C>,
    /// Ciphertext read that does not yet make a whole record (usually
    /// empty, and then unallocated).
    incoming: Vec<u8>,
    close_sent: bool,
}

/// The connection's state and what it produced but no one has taken yet,
/// apart from the incoming ciphertext so that both can be borrowed at once.
struct Engine<C> {
    conn: C,
    /// Decrypted, not yet read.
    plaintext: Pending,
    /// Encrypted, not yet written.
    outgoing: Pending,
    read: ReadEnd,
    /// The error that ended the connection. rustls's unbuffered
    /// connection does not remember every error, and the ciphertext it had
    /// not discarded is gone with it, so rustls is never called again:
    /// reads and writes return this error, a shutdown only closes the
    /// socket.
    failed: Option<rustls::Error>,
}

/// How far the peer's direction has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadEnd {
    Open,
    /// The peer sent close_notify: nothing more will come.
    CloseNotify,
    /// The socket ended without close_notify.
    Eof,
}

/// What processing the buffered records came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drive {
    /// Every whole record is processed; more input is needed.
    NeedInput,
    /// Both sides sent close_notify.
    Closed,
}

/// Bytes produced but not yet taken, with how much was taken. Freed once
/// all are taken.
#[derive(Default)]
struct Pending {
    data: Vec<u8>,
    pos: usize,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn rest(&self) -> &[u8] {
        &self.data[self.pos.min(self.data.len())..]
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.is_empty() {
            *self = Pending::default();
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.is_empty() {
            *self = Pending::default();
        }
        self.data.extend_from_slice(bytes);
    }

    /// Moves as much as fits into `buf`.
    fn take_into(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.rest().len().min(buf.remaining());
        buf.put_slice(&self.rest()[..n]);
        self.consume(n);
    }
}

impl<C: Role> Engine<C> {
    /// Processes the whole records at the front of `input`: application
    /// data goes to `sink` while it has room, then to `plaintext`;
    /// handshake and alert records rustls wants sent go to `outgoing`.
    /// Returns where that left the connection and how many bytes of
    /// `input` were used (the rest is an incomplete record).
    fn drive(
        &mut self,
        input: &mut [u8],
        mut sink: Option<&mut ReadBuf<'_>>,
    ) -> Result<(Drive, usize), rustls::Error> {
        let mut used = 0;
        loop {
            let UnbufferedStatus { discard, state } = self.conn.process(&mut input[used..]);
            let mut extra = 0;
            let outcome = match state? {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record?;
                        extra += record.discard;
                        deliver(record.payload, sink.as_deref_mut(), &mut self.plaintext);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    encode(&mut data, &mut self.outgoing)?;
                    None
                }
                // Sent before anything else goes out or the stream waits
                // for input: the caller flushes `outgoing` first.
                ConnectionState::TransmitTlsData(data) => {
                    data.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    self.read = ReadEnd::CloseNotify;
                    None
                }
                ConnectionState::Closed => {
                    self.read = ReadEnd::CloseNotify;
                    Some(Drive::Closed)
                }
                ConnectionState::BlockedHandshake | ConnectionState::WriteTraffic(_) => {
                    Some(Drive::NeedInput)
                }
                // Early data is never enabled.
                ConnectionState::ReadEarlyData(_) => {
                    return Err(rustls::Error::General("unexpected early data".into()))
                }
                _ => return Err(rustls::Error::General("unexpected TLS state".into())),
            };
            used += discard + extra;
            if let Some(outcome) = outcome {
                return Ok((outcome, used));
            }
        }
    }

    /// `drive` over the kept ciphertext, dropping what was used (and the
    /// buffer itself once it is empty).
    fn settle(
        &mut self,
        incoming: &mut Vec<u8>,
        sink: Option<&mut ReadBuf<'_>>,
    ) -> Result<Drive, rustls::Error> {
        let (drive, used) = self.drive(incoming, sink)?;
        incoming.drain(..used);
        if incoming.is_empty() {
            *incoming = Vec::new();
        }
        Ok(drive)
    }

    /// Moves the records rustls has queued to send (the alert after an
    /// error) to `outgoing`. rustls hands those out before it looks at
    /// any input, so no input is passed: this is safe to call whatever
    /// state the kept ciphertext is in.
    fn queued(&mut self) -> Result<(), rustls::Error> {
        while self.conn.wants_write() {
            let UnbufferedStatus { state, .. } = self.conn.process(&mut []);
            match state? {
                ConnectionState::EncodeTlsData(mut data) => encode(&mut data, &mut self.outgoing)?,
                _ => break,
            }
        }
        Ok(())
    }

    /// Encrypts `data` (whole) after whatever `outgoing` holds.
    fn encrypt(&mut self, incoming: &mut Vec<u8>, data: &[u8]) -> Result<(), rustls::Error> {
        if self.settle(incoming, None)? == Drive::Closed {
            return Err(rustls::Error::General(
                "the TLS connection is closed".into(),
            ));
        }
        let UnbufferedStatus { state, .. } = self.conn.process(incoming);
        let ConnectionState::WriteTraffic(mut traffic) = state? else {
            return Err(rustls::Error::General(
                "the TLS connection cannot send".into(),
            ));
        };
        let records = data.len().div_ceil(MAX_WRITE).max(1);
        let mut out = vec![0u8; data.len() + records * RECORD_OVERHEAD];
        let written = match traffic.encrypt(data, &mut out) {
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                out.resize(required_size, 0);
                traffic.encrypt(data, &mut out)
            }
            other => other,
        }
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        // Records rustls queued (a KeyUpdate, when this encryption reached
        // its limit of records per key) come first in `out`: rustls puts
        // them there.
        out.truncate(written);
        if self.outgoing.is_empty() {
            self.outgoing = Pending { data: out, pos: 0 };
        } else {
            self.outgoing.push(&out);
        }
        Ok(())
    }

    /// Renews this side's keys now, as rustls does at its limit of records
    /// per key.
    #[cfg(test)]
    fn refresh_keys(&mut self, incoming: &mut [u8]) {
        let UnbufferedStatus { state, .. } = self.conn.process(incoming);
        match state {
            Ok(ConnectionState::WriteTraffic(traffic)) => traffic.refresh_traffic_keys().unwrap(),
            other => panic!("cannot renew keys in {other:?}"),
        }
    }

    /// Queues close_notify, if the connection can still send.
    fn close_notify(&mut self, incoming: &mut Vec<u8>) -> Result<(), rustls::Error> {
        if self.settle(incoming, None)? == Drive::Closed {
            return Ok(());
        }
        let UnbufferedStatus { state, .. } = self.conn.process(incoming);
        if let ConnectionState::WriteTraffic(mut traffic) = state? {
            let mut alert = [0u8; 64];
            let n = traffic
                .queue_close_notify(&mut alert)
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            self.outgoing.push(&alert[..n]);
        }
        Ok(())
    }
}

/// Hands a decrypted record to the reader, keeping what does not fit (and
/// everything once something had to be kept, so the order holds).
fn deliver(payload: &[u8], sink: Option<&mut ReadBuf<'_>>, plaintext: &mut Pending) {
    let mut rest = payload;
    if let (Some(buf), true) = (sink, plaintext.is_empty()) {
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        rest = &rest[n..];
    }
    plaintext.push(rest);
}

/// Copies a record rustls built into `outgoing`.
fn encode<D>(
    data: &mut rustls::unbuffered::EncodeTlsData<'_, D>,
    outgoing: &mut Pending,
) -> Result<(), rustls::Error> {
    let mut chunk = vec![0u8; 512];
    let n = match data.encode(&mut chunk) {
        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
            chunk.resize(required_size, 0);
            data.encode(&mut chunk)
        }
        other => other,
    }
    .map_err(|e| rustls::Error::General(e.to_string()))?;
    outgoing.push(&chunk[..n]);
    Ok(())
}

fn invalid_data(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn unexpected_eof(during: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the peer closed the connection {during} without TLS close_notify"),
    )
}

impl<C: Role, IO: AsyncRead + AsyncWrite + Unpin> TlsStream<C, IO> {
    fn new(conn: C, io: IO) -> Self {
        TlsStream {
            io,
            engine: Engine {
                conn,
                plaintext: Pending::default(),
                outgoing: Pending::default(),
                read: ReadEnd::Open,
                failed: None,
            },
            incoming: Vec::new(),
            close_sent: false,
        }
    }

    async fn handshake(conn: C, io: IO) -> io::Result<Self> {
        let mut stream = TlsStream::new(conn, io);
        poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let drive = self.process_incoming(None, cx)?;
            ready!(self.poll_send(cx))?;
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            if !self.engine.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if drive == Drive::Closed || self.engine.read != ReadEnd::Open {
                return Poll::Ready(Err(unexpected_eof("during the handshake")));
            }
            ready!(self.poll_input(None, cx))?;
        }
    }

    /// Processes the whole records already in `incoming`.
    fn process_incoming(
        &mut self,
        sink: Option<&mut ReadBuf<'_>>,
        cx: &mut Context<'_>,
    ) -> io::Result<Drive> {
        let result = self.engine.settle(&mut self.incoming, sink);
        result.map_err(|e| self.fail(e, cx))
    }

    /// Reads once from the socket and processes what came. The common
    /// case, no record cut by the last read, is decrypted on the stack;
    /// only an incomplete record's bytes are kept.
    fn poll_input(
        &mut self,
        sink: Option<&mut ReadBuf<'_>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Drive>> {
        if self.incoming.len() >= MAX_INCOMING {
            let e = rustls::Error::General("TLS message too large".into());
            return Poll::Ready(Err(self.fail(e, cx)));
        }
        let mut stack = [MaybeUninit::<u8>::uninit(); READ_SIZE];
        let mut rb = ReadBuf::uninit(&mut stack);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        if rb.filled().is_empty() {
            if self.engine.read == ReadEnd::Open {
                self.engine.read = ReadEnd::Eof;
            }
            return Poll::Ready(Ok(Drive::NeedInput));
        }
        if !self.incoming.is_empty() {
            self.incoming.extend_from_slice(rb.filled());
            return Poll::Ready(self.process_incoming(sink, cx));
        }
        let input = rb.filled_mut();
        let result = self.engine.drive(input, sink);
        let (drive, used) = result.map_err(|e| self.fail(e, cx))?;
        self.incoming.extend_from_slice(&input[used..]);
        Poll::Ready(Ok(drive))
    }

    /// Writes `outgoing` until it is empty or the socket would block.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.engine.outgoing.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, self.engine.outgoing.rest()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.engine.outgoing.consume(n);
        }
        Poll::Ready(Ok(()))
    }

    /// The I/O error for a TLS error, after one try at sending the alert;
    /// from now on the stream only gives that error.
    fn fail(&mut self, e: rustls::Error, cx: &mut Context<'_>) -> io::Error {
        let _ = self.engine.queued();
        let _ = self.poll_send(cx);
        self.engine.failed = Some(e.clone());
        invalid_data(e)
    }

    /// The error the stream failed with, again.
    fn failure(&self) -> Option<io::Error> {
        self.engine.failed.clone().map(invalid_data)
    }

    /// The socket and the rustls connection, as tokio-rustls gives them.
    pub fn get_ref(&self) -> (&IO, &C) {
        (&self.io, &self.engine.conn)
    }

    /// The socket, for socket options.
    pub fn get_mut(&mut self) -> (&mut IO, &mut C) {
        (&mut self.io, &mut self.engine.conn)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsStream<ServerSide, IO> {
    /// Reads until the ClientHello is whole and returns its SNI. A
    /// ClientHello rustls refuses is refused here, with rustls's alert.
    fn poll_client_hello(
        &mut self,
        cx: &mut Context<'_>,
        probe: &mut ClientHelloProbe,
    ) -> Poll<io::Result<Option<String>>> {
        loop {
            while probe.fed < self.incoming.len() {
                let mut unfed = &self.incoming[probe.fed..];
                match probe.acceptor.read_tls(&mut unfed) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => probe.fed += n,
                }
            }
            match probe.acceptor.accept() {
                Ok(Some(accepted)) => {
                    return Poll::Ready(Ok(accepted.client_hello().server_name().map(Into::into)))
                }
                Ok(None) => {}
                Err((e, mut alert)) => {
                    let mut bytes = Vec::new();
                    let _ = alert.write_all(&mut bytes);
                    self.engine.outgoing.push(&bytes);
                    let _ = self.poll_send(cx);
                    return Poll::Ready(Err(invalid_data(e)));
                }
            }
            if self.incoming.len() >= MAX_INCOMING {
                let e = rustls::Error::General("TLS message too large".into());
                return Poll::Ready(Err(invalid_data(e)));
            }
            let mut stack = [MaybeUninit::<u8>::uninit(); READ_SIZE];
            let mut rb = ReadBuf::uninit(&mut stack);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                return Poll::Ready(Err(unexpected_eof("during the handshake")));
            }
            self.incoming.extend_from_slice(rb.filled());
        }
    }
}

impl<C: Role, IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<C, IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(e) = this.failure() {
            return Poll::Ready(Err(e));
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let mut drive = Drive::NeedInput;
        loop {
            if !this.engine.plaintext.is_empty() {
                this.engine.plaintext.take_into(buf);
            }
            // What rustls queued while reading (a warning alert) goes out
            // with the next write or flush: polling the socket's write side
            // here would take the writer's waker.
            if buf.filled().len() > before
                || drive == Drive::Closed
                || this.engine.read == ReadEnd::CloseNotify
            {
                return Poll::Ready(Ok(()));
            }
            if this.engine.read == ReadEnd::Eof {
                return Poll::Ready(Err(unexpected_eof("mid-stream")));
            }
            drive = ready!(this.poll_input(Some(buf), cx))?;
        }
    }
}

impl<C: Role, IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<C, IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(e) = this.failure() {
            return Poll::Ready(Err(e));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // What is already encrypted goes first: a slow peer holds back the
        // writer instead of growing a buffer.
        ready!(this.poll_send(cx))?;
        let n = buf.len().min(MAX_WRITE);
        let result = this.engine.encrypt(&mut this.incoming, &buf[..n]);
        result.map_err(|e| this.fail(e, cx))?;
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.close_sent && this.engine.failed.is_none() {
            ready!(this.poll_send(cx))?;
            let result = this.engine.close_notify(&mut this.incoming);
            result.map_err(|e| this.fail(e, cx))?;
            this.close_sent = true;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
