//! `WsStream`: a server-side WebSocket seen as a plain byte stream. Reads
//! give the payloads of the client's binary messages back to back; each
//! write goes out as one binary message. tokio-tungstenite does the
//! framing, masking, control frames and waker bookkeeping; this owns the
//! mapping onto `AsyncRead`/`AsyncWrite` and the per-socket memory bounds.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{error::ProtocolError, Bytes, Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// The most one `poll_write` takes, so one message (and the write buffer
/// behind it) stays small however much the relay hands over at once.
pub const MAX_WRITE: usize = 64 * 1024;

/// What tungstenite reads from the socket at a time. Its default (128 KiB)
/// is allocated up front for every socket; Postgres traffic is mostly
/// small messages.
const READ_CHUNK: usize = 16 * 1024;

/// Bounds on what a client can make one socket hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsLimits {
    /// The largest message, and the largest frame, accepted from the
    /// client; a bigger one is a read error and ends the connection.
    /// tungstenite reserves a frame's declared length before its payload
    /// arrives, so this is also what a client can make the socket reserve.
    pub max_message: usize,
}

impl Default for WsLimits {
    /// 16 MiB: far above what the Neon driver sends in one message (one
    /// socket write of the pg client), well below tungstenite's 64 MiB.
    fn default() -> Self {
        WsLimits {
            max_message: 16 * 1024 * 1024,
        }
    }
}

/// A server-role WebSocket after the upgrade, as `AsyncRead + AsyncWrite`.
pub struct WsStream<S> {
    ws: WebSocketStream<S>,
    /// The unread rest of the binary message being read (a view into the
    /// message's own buffer: nothing is copied into a stream buffer).
    pending: Bytes,
    /// End of stream seen (Close, the peer's EOF, or a read error):
    /// further reads give 0.
    read_done: bool,
    /// A Close was received or sent: further writes fail.
    write_closed: bool,
    /// Our Close frame is queued (shutdown in progress).
    close_sent: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> WsStream<S> {
    /// Wraps the upgraded connection (the handshake is already done), as
    /// the server.
    pub async fn new(io: S, limits: WsLimits) -> WsStream<S> {
        Self::with_role(io, limits, Role::Server).await
    }

    /// The client's side of the same stream (the benchmark's WebSocket
    /// client, after its own handshake).
    pub async fn client(io: S, limits: WsLimits) -> WsStream<S> {
        Self::with_role(io, limits, Role::Client).await
    }

    async fn with_role(io: S, limits: WsLimits, role: Role) -> WsStream<S> {
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_CHUNK)
            // Each message is written to `io` at once; `poll_flush` then
            // flushes `io`. Nothing waits in tungstenite for more data.
            .write_buffer_size(0)
            // One message of MAX_WRITE plus the pongs/close queued while
            // the socket would block; Sink::poll_ready drains it before the
            // next message is taken.
            .max_write_buffer_size(2 * MAX_WRITE)
            .max_message_size(Some(limits.max_message))
            .max_frame_size(Some(limits.max_message));
        let ws = WebSocketStream::from_raw_socket(io, role, Some(config)).await;
        WsStream {
            ws,
            pending: Bytes::new(),
            read_done: false,
            write_closed: false,
            close_sent: false,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.read_done {
                return Poll::Ready(Ok(()));
            }
            // Each poll_next first flushes what tungstenite queued (a pong,
            // the reply to a Close), so a caller that only reads still
            // answers pings.
            let msg = match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                None => {
                    this.end();
                    continue;
                }
                Some(Ok(msg)) => msg,
                Some(Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake))) => {
                    // The peer hung up without a Close: end of stream, as
                    // on TCP. A frame cut short by the hang-up lands here
                    // too (tungstenite does not tell them apart); the
                    // Postgres framing above sees a truncated message.
                    this.end();
                    continue;
                }
                Some(Err(e)) => {
                    this.read_done = true;
                    return Poll::Ready(Err(to_io(e)));
                }
            };
            match msg {
                Message::Binary(bytes) => this.pending = bytes,
                Message::Text(_) => {
                    this.read_done = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "websocket: a text message; the Postgres protocol travels in binary messages only",
                    )));
                }
                // Close: tungstenite queued the reply; the next poll_next
                // sends it and then reports the end (None).
                Message::Close(_) => this.write_closed = true,
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }
}

impl<S> WsStream<S> {
    fn end(&mut self) {
        self.read_done = true;
        self.write_closed = true;
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = buf.len().min(MAX_WRITE);
        self.send_with(cx, n, |out| out.extend_from_slice(&buf[..n]))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total = bufs.iter().map(|b| b.len()).sum::<usize>();
        let n = total.min(MAX_WRITE);
        self.send_with(cx, n, |out| {
            for b in bufs {
                let room = n - out.len();
                if room == 0 {
                    break;
                }
                out.extend_from_slice(&b[..b.len().min(room)]);
            }
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = ready!(Pin::new(&mut self.ws).poll_flush(cx));
        Poll::Ready(res.map_err(to_io))
    }

    /// Sends a Close (1000, normal closure), flushes, and shuts the
    /// connection down. The client's Close in reply is not waited for.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.write_closed && !this.close_sent {
            ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(to_io)?;
            let close = CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            };
            this.close_sent = true;
            Pin::new(&mut this.ws)
                .start_send(Message::Close(Some(close)))
                .map_err(to_io)?;
        }
        this.write_closed = true;
        // A peer that already went away makes the flush fail; there is
        // nothing left to tell it, so shutting down still succeeds.
        match ready!(Pin::new(&mut this.ws).poll_flush(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {}
            Err(WsError::Io(e)) if e.kind() != io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Err(to_io(e))),
        }
        Pin::new(this.ws.get_mut()).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Sends `n` bytes (`n > 0` unless the write is empty) that `fill`
    /// copies out of the caller's buffers, as one binary message.
    fn send_with(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        n: usize,
        fill: impl FnOnce(&mut Vec<u8>),
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.write_closed {
            return Poll::Ready(Err(broken_pipe()));
        }
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(to_io)?;
        let mut out = Vec::with_capacity(n);
        fill(&mut out);
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(out.into()))
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }
}

fn broken_pipe() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "websocket: the connection is closed",
    )
}

/// tungstenite's error as the `io::Error` a byte stream gives: what the
/// client sent wrong is `InvalidData`, a closed connection `BrokenPipe`.
fn to_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => broken_pipe(),
        WsError::Capacity(e) => {
            io::Error::new(io::ErrorKind::InvalidData, format!("websocket: {e}"))
        }
        WsError::Protocol(e) => {
            io::Error::new(io::ErrorKind::InvalidData, format!("websocket: {e}"))
        }
        WsError::Utf8(e) => io::Error::new(io::ErrorKind::InvalidData, format!("websocket: {e}")),
        e => io::Error::other(format!("websocket: {e}")),
    }
}
