//! The relay: after authentication, bytes are copied both ways without
//! parsing, and the session ends as soon as either side does.
//!
//! `tokio::io::copy_bidirectional` waits for *both* directions to finish,
//! which leaves a session half-open when one peer stops reading. Postgres
//! has no use for half-closed connections (the server treats EOF as "client
//! gone"), so this relay shuts the other side down (TLS close_notify, then
//! FIN) the moment one direction ends, and then the session is over.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// The most read at once. One TLS record carries up to 16 KiB of plaintext,
/// so a 16 KiB read takes a whole record at a time.
const BUF_SIZE: usize = 16 * 1024;

/// How long the final shutdown of the surviving side may take before the
/// socket is simply dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Sets TCP_NODELAY (Postgres messages are small and latency-bound) and
/// keepalive (so a peer that vanishes without a FIN is noticed) on a socket.
pub fn tune_tcp(tcp: &TcpStream) {
    let sock = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    // Both are best effort: a socket that refuses them still works.
    let _ = sock.set_nodelay(true);
    let _ = sock.set_tcp_keepalive(&keepalive);
}

/// Whether a read error is just the peer closing. A TCP close without TLS
/// close_notify surfaces as `UnexpectedEof`; many clients end that way, and
/// Postgres's own Terminate message (not TLS) is what marks a clean end, so
/// it counts as a close, not an error.
pub fn is_close(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

/// Which side ended the relay, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEnd {
    ClientClosed,
    ServerClosed,
    ClientError(String),
    ServerError(String),
}

impl RelayEnd {
    /// A short stable name for the audit log.
    pub fn as_str(&self) -> &'static str {
        match self {
            RelayEnd::ClientClosed => "client_closed",
            RelayEnd::ServerClosed => "server_closed",
            RelayEnd::ClientError(_) => "client_error",
            RelayEnd::ServerError(_) => "server_error",
        }
    }
}

/// Bytes copied by the relay, per direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ByteCounts {
    pub client_to_server: u64,
    pub server_to_client: u64,
}

/// One direction of the copy. It owns no buffer while idle: data is read
/// into a buffer on the stack of the poll and written straight on; only what
/// a writer does not take at once is kept, on the heap, until it is written.
/// An idle session thus costs no relay memory at all.
struct Pipe {
    /// Read but not yet written (usually empty).
    pending: Vec<u8>,
    pos: usize,
    eof: bool,
    need_flush: bool,
    copied: u64,
    /// When this direction last moved bytes, on the relay's shared clock.
    last_active: u64,
}

enum PipeError {
    Read(io::Error),
    Write(io::Error),
}

impl Pipe {
    fn new() -> Self {
        Pipe {
            pending: Vec::new(),
            pos: 0,
            eof: false,
            need_flush: false,
            copied: 0,
            last_active: 0,
        }
    }

    /// Writes `data` until the writer would block; returns how much it took.
    fn write_some<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut Pin<&mut W>,
        data: &[u8],
    ) -> Result<usize, PipeError> {
        let mut off = 0;
        while off < data.len() {
            match w.as_mut().poll_write(cx, &data[off..]) {
                Poll::Ready(Ok(0)) => {
                    return Err(PipeError::Write(io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => {
                    off += n;
                    self.copied += n as u64;
                    self.need_flush = true;
                }
                Poll::Ready(Err(e)) => return Err(PipeError::Write(e)),
                Poll::Pending => break,
            }
        }
        Ok(off)
    }

    /// Copies until the reader reaches EOF (Ready(Ok)) or would block.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        clock: &mut u64,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<Result<(), PipeError>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            // Leftovers first, so bytes stay in order.
            if self.pos < self.pending.len() {
                let pending = std::mem::take(&mut self.pending);
                let taken = self.write_some(cx, &mut w, &pending[self.pos..]);
                self.pending = pending;
                self.pos += taken?;
                if self.pos < self.pending.len() {
                    return Poll::Pending;
                }
                self.pending = Vec::new();
                self.pos = 0;
            }
            if self.eof {
                ready!(w.as_mut().poll_flush(cx)).map_err(PipeError::Write)?;
                return Poll::Ready(Ok(()));
            }
            let mut stack = [MaybeUninit::<u8>::uninit(); BUF_SIZE];
            let mut rb = ReadBuf::uninit(&mut stack);
            match r.as_mut().poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let data = rb.filled();
                    if data.is_empty() {
                        self.eof = true;
                        continue;
                    }
                    *clock += 1;
                    self.last_active = *clock;
                    let taken = self.write_some(cx, &mut w, data)?;
                    if taken < data.len() {
                        self.pending = data[taken..].to_vec();
                        self.pos = 0;
                        return Poll::Pending;
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(PipeError::Read(e))),
                Poll::Pending => {
                    // Nothing more to read for now: push out what the
                    // writer buffered (TLS records) before sleeping.
                    if self.need_flush {
                        ready!(w.as_mut().poll_flush(cx)).map_err(PipeError::Write)?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// How the server -> client direction ended, as a relay end.
fn server_side_end(res: Result<(), PipeError>) -> RelayEnd {
    match res {
        Ok(()) => RelayEnd::ServerClosed,
        Err(PipeError::Read(e)) if is_close(&e) => RelayEnd::ServerClosed,
        Err(PipeError::Read(e)) => RelayEnd::ServerError(e.to_string()),
        Err(PipeError::Write(e)) if is_close(&e) => RelayEnd::ClientClosed,
        Err(PipeError::Write(e)) => RelayEnd::ClientError(e.to_string()),
    }
}

/// How the client -> server direction ended, as a relay end.
fn client_side_end(res: Result<(), PipeError>) -> RelayEnd {
    match res {
        Ok(()) => RelayEnd::ClientClosed,
        Err(PipeError::Read(e)) if is_close(&e) => RelayEnd::ClientClosed,
        Err(PipeError::Read(e)) => RelayEnd::ClientError(e.to_string()),
        Err(PipeError::Write(e)) if is_close(&e) => RelayEnd::ServerClosed,
        Err(PipeError::Write(e)) => RelayEnd::ServerError(e.to_string()),
    }
}

/// Copies both ways until one side ends, then shuts the other down.
pub async fn relay<C, S>(client: &mut C, server: &mut S) -> (RelayEnd, ByteCounts)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = Pipe::new();
    let mut down = Pipe::new();
    let mut clock = 0u64;
    let end = poll_fn(|cx| {
        let down_done = down.poll_copy(
            cx,
            &mut clock,
            Pin::new(&mut *server),
            Pin::new(&mut *client),
        );
        let up_done = up.poll_copy(
            cx,
            &mut clock,
            Pin::new(&mut *client),
            Pin::new(&mut *server),
        );
        match (down_done, up_done) {
            (Poll::Pending, Poll::Pending) => Poll::Pending,
            (Poll::Ready(d), Poll::Pending) => Poll::Ready(server_side_end(d)),
            (Poll::Pending, Poll::Ready(u)) => Poll::Ready(client_side_end(u)),
            // Both ended in one wake-up: the side that spoke last caused it
            // (a client's Terminate, or the server's FATAL).
            (Poll::Ready(d), Poll::Ready(u)) => Poll::Ready(if down.last_active > up.last_active {
                server_side_end(d)
            } else {
                client_side_end(u)
            }),
        }
    })
    .await;
    // Whoever ended, both sides are told now; a peer that does not take the
    // close_notify within the grace period is dropped anyway.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let _ = server.shutdown().await;
        let _ = client.shutdown().await;
    })
    .await;
    let counts = ByteCounts {
        client_to_server: up.copied,
        server_to_client: down.copied,
    };
    (end, counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt};

    #[tokio::test]
    async fn copies_both_ways_and_ends_when_one_side_closes() {
        let (mut client_far, mut client_near) = duplex(1024);
        let (mut server_near, mut server_far) = duplex(1024);
        let task = tokio::spawn(async move { relay(&mut client_near, &mut server_near).await });

        client_far.write_all(b"query").await.unwrap();
        let mut got = [0u8; 5];
        server_far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"query");

        server_far.write_all(b"result!").await.unwrap();
        let mut got = [0u8; 7];
        client_far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"result!");

        // The server goes away: the client must see EOF, even though the
        // client never closes its side.
        drop(server_far);
        let mut rest = Vec::new();
        client_far.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let (end, counts) = task.await.unwrap();
        assert_eq!(end, RelayEnd::ServerClosed);
        assert_eq!(
            counts,
            ByteCounts {
                client_to_server: 5,
                server_to_client: 7
            }
        );
    }

    #[tokio::test]
    async fn large_transfer_is_complete() {
        let (mut client_far, mut client_near) = duplex(4096);
        let (mut server_near, mut server_far) = duplex(4096);
        let task = tokio::spawn(async move { relay(&mut client_near, &mut server_near).await });
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            server_far.write_all(&data).await.unwrap();
            server_far.shutdown().await.unwrap();
            server_far
        });
        let mut got = Vec::new();
        client_far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expected);
        let _ = writer.await.unwrap();
        let (end, counts) = task.await.unwrap();
        assert_eq!(end, RelayEnd::ServerClosed);
        assert_eq!(counts.server_to_client, 1_000_000);
    }
}
