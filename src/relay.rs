//! The relay: after authentication, bytes are copied both ways without
//! parsing, until the session is over.
//!
//! `tokio::io::copy_bidirectional` waits for *both* directions to finish,
//! which leaves a session half-open for as long as one peer likes. This
//! relay ends sessions promptly and loses nothing:
//! - the server closing ends the session at once (the client is shut down:
//!   TLS close_notify, then FIN);
//! - the client closing its sending side (FIN, or close_notify) is passed on
//!   to the server, and the server's reply to what the client sent last is
//!   still relayed, until the server closes or `half_close` passes (a client
//!   may send a query and `shutdown(SHUT_WR)` at once);
//! - an error on either side ends the session at once.

use crate::audit::query::QueryTracker;
use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::net::is_close;

/// The most read at once. One TLS record carries up to 16 KiB of plaintext,
/// so a 16 KiB read takes a whole record at a time.
const BUF_SIZE: usize = 16 * 1024;

/// How long the final shutdown of the surviving side may take before the
/// socket is simply dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The Terminate message, which a client sends last when it ends a session
/// cleanly.
const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// Where the process stands in shutting down, as every relay sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShutdownPhase {
    #[default]
    Running,
    /// SIGTERM: sessions idle between transactions end now; busy ones
    /// when they become idle.
    Draining,
    /// The drain deadline, or a second SIGTERM: every session ends now.
    Now,
}

/// Follows the server's messages as they stream past (headers only; the
/// relay still just copies bytes), so pgbastion knows whether the session
/// is idle between transactions and where a message of its own may go.
#[derive(Debug, Default)]
struct Framer {
    header: [u8; 5],
    /// Header bytes of the current message seen so far.
    have: usize,
    /// Body bytes of the current message still to come.
    remaining: usize,
    /// The last complete message was ReadyForQuery with status 'I'.
    idle: bool,
}

impl Framer {
    fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining == 0 {
                let take = (5 - self.have).min(data.len());
                self.header[self.have..self.have + take].copy_from_slice(&data[..take]);
                self.have += take;
                data = &data[take..];
                if self.have < 5 {
                    self.idle = false;
                    return;
                }
                self.have = 0;
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                self.remaining = usize::try_from(len).unwrap_or(usize::MAX).saturating_sub(4);
                self.idle = false;
            } else {
                let take = self.remaining.min(data.len());
                self.remaining -= take;
                // ReadyForQuery's body is its one status byte.
                if self.remaining == 0 && self.header[0] == b'Z' && take > 0 {
                    self.idle = data[take - 1] == b'I';
                }
                data = &data[take..];
            }
        }
    }

    /// Between two messages: a message of pgbastion's own may go here.
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }
}

/// What the admin console sees of a session while it relays: bytes so far
/// each way, and whether it is inside a transaction (updated on every
/// wake-up of the relay, with relaxed stores: a view, not an account).
#[derive(Debug, Default)]
pub struct Progress {
    pub client_to_server: std::sync::atomic::AtomicU64,
    pub server_to_client: std::sync::atomic::AtomicU64,
    /// The server's last ReadyForQuery said "in a transaction", or a query
    /// is running. Set before the relay starts: whether the session starts
    /// busy (bytes went on after the login's ReadyForQuery).
    pub busy: std::sync::atomic::AtomicBool,
}

/// Which side ended the relay, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEnd {
    ClientClosed,
    ServerClosed,
    ClientError(String),
    ServerError(String),
    /// pgbastion shut down (SIGTERM): the client was told.
    Shutdown,
    /// An administrator ended the session (`KILL`): the client was told.
    Killed,
    /// A statement's query audit event could not be queued and the audit
    /// log's `on_failure` is "refuse": the client was told.
    AuditUnavailable,
}

impl RelayEnd {
    /// A short stable name for the audit log.
    pub fn as_str(&self) -> &'static str {
        match self {
            RelayEnd::ClientClosed => "client_closed",
            RelayEnd::ServerClosed => "server_closed",
            RelayEnd::ClientError(_) => "client_error",
            RelayEnd::ServerError(_) => "server_error",
            RelayEnd::Shutdown => "shutdown",
            RelayEnd::Killed => "killed",
            RelayEnd::AuditUnavailable => "audit_unavailable",
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
    /// The last bytes read ended with a Terminate message (meaningful for
    /// the client's direction: a server closing after it was asked to).
    ends_with_terminate: bool,
    /// The server's direction follows message boundaries.
    framer: Option<Framer>,
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
            ends_with_terminate: false,
            framer: None,
        }
    }

    /// `idle`: the relay starts right after the login's ReadyForQuery
    /// (idle) reached the client, so a session that never runs a query is
    /// idle and a drain ends it at once (issue 19 item 17); not when bytes
    /// followed it (a query pipelined behind the login).
    fn framed(idle: bool) -> Self {
        Pipe {
            framer: Some(Framer {
                idle,
                ..Framer::default()
            }),
            ..Pipe::new()
        }
    }

    /// Everything read has been written and it ended between messages.
    fn at_boundary(&self) -> bool {
        self.pos >= self.pending.len() && self.framer.as_ref().is_some_and(Framer::at_boundary)
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
    /// `observe` sees every chunk read, once it is handed to the writer
    /// (the query audit; a no-op otherwise).
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        clock: &mut u64,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        mut observe: impl FnMut(&[u8]),
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
                    self.ends_with_terminate = data.ends_with(&TERMINATE);
                    if let Some(f) = &mut self.framer {
                        f.advance(data);
                    }
                    let taken = self.write_some(cx, &mut w, data)?;
                    // After the write: what the observer does overlaps
                    // with the peer's work instead of delaying it.
                    observe(data);
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

/// Whether the client's direction ended by a clean close of its sending
/// side (after which the server's reply is still wanted), rather than by an
/// error.
fn client_half_closed(res: &Result<(), PipeError>) -> bool {
    match res {
        Ok(()) => true,
        // A TCP FIN without TLS close_notify: the same thing, for Postgres.
        Err(PipeError::Read(e)) => e.kind() == io::ErrorKind::UnexpectedEof,
        Err(PipeError::Write(_)) => false,
    }
}

/// What one wake-up of the relay decided.
enum Step {
    /// A side ended: the server's result, or the client's.
    Server(Result<(), PipeError>),
    Client(Result<(), PipeError>),
    /// Shutting down and the session is idle: end it now.
    Idle,
}

/// Copies both ways until the session is over (see the module doc), then
/// shuts both sides down. `half_close` bounds how long the server's reply
/// is awaited after the client has closed its sending side. `shutdown`
/// ends the session when pgbastion stops: at once if it is idle between
/// transactions, else once it is or when told `Now`; the client is then
/// sent FATAL 57P01, like PostgreSQL's own shutdown.
pub async fn relay<C, S>(
    client: &mut C,
    server: &mut S,
    half_close: Duration,
    shutdown: &mut tokio::sync::watch::Receiver<ShutdownPhase>,
    kill: &mut tokio::sync::watch::Receiver<bool>,
    progress: &Progress,
    mut queries: Option<&mut QueryTracker>,
) -> (RelayEnd, ByteCounts)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = Pipe::new();
    let mut down = Pipe::framed(!progress.busy.load(std::sync::atomic::Ordering::Relaxed));
    let mut clock = 0u64;
    let mut watching = true;
    let mut watching_kill = true;
    let mut killed = false;
    let mut audit_lost = false;
    let step = loop {
        let phase = *shutdown.borrow_and_update();
        if *kill.borrow_and_update() {
            killed = true;
            break Step::Idle;
        }
        if phase == ShutdownPhase::Now {
            break Step::Idle;
        }
        let draining = phase == ShutdownPhase::Draining;
        let copy = poll_fn(|cx| {
            let down_done = down.poll_copy(
                cx,
                &mut clock,
                Pin::new(&mut *server),
                Pin::new(&mut *client),
                |d| {
                    if let Some(q) = queries.as_deref_mut() {
                        q.server_bytes(d);
                    }
                },
            );
            let up_done = up.poll_copy(
                cx,
                &mut clock,
                Pin::new(&mut *client),
                Pin::new(&mut *server),
                |d| {
                    if let Some(q) = queries.as_deref_mut() {
                        q.client_bytes(d);
                    }
                },
            );
            if queries.as_deref().is_some_and(QueryTracker::lost) {
                // No statement goes on unaudited (audit.on_failure =
                // "refuse").
                audit_lost = true;
                return Poll::Ready(Step::Idle);
            }
            {
                use std::sync::atomic::Ordering::Relaxed;
                progress.client_to_server.store(up.copied, Relaxed);
                progress.server_to_client.store(down.copied, Relaxed);
                let idle = down.framer.as_ref().is_some_and(|f| f.idle)
                    && up.last_active <= down.last_active;
                progress.busy.store(!idle, Relaxed);
            }
            match (down_done, up_done) {
                (Poll::Pending, Poll::Pending) => {
                    // Idle: the server's last word was ReadyForQuery (not in
                    // a transaction) and the client has said nothing since.
                    let idle = down.at_boundary()
                        && down.framer.as_ref().is_some_and(|f| f.idle)
                        && up.last_active <= down.last_active
                        && up.pos >= up.pending.len();
                    if draining && idle {
                        Poll::Ready(Step::Idle)
                    } else {
                        Poll::Pending
                    }
                }
                (Poll::Ready(d), Poll::Pending) => Poll::Ready(Step::Server(d)),
                (Poll::Pending, Poll::Ready(u)) => Poll::Ready(Step::Client(u)),
                // Both ended in one wake-up: the side that spoke last caused
                // it (a client's Terminate, or the server's FATAL).
                (Poll::Ready(d), Poll::Ready(u)) => {
                    Poll::Ready(if down.last_active > up.last_active {
                        Step::Server(d)
                    } else {
                        Step::Client(u)
                    })
                }
            }
        });
        let shutdown_changed = async {
            if watching {
                shutdown.changed().await
            } else {
                std::future::pending().await
            }
        };
        let kill_changed = async {
            if watching_kill {
                kill.changed().await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            step = copy => break step,
            changed = shutdown_changed => {
                // No sender any more: nobody will shut this relay down.
                watching = changed.is_ok();
            }
            changed = kill_changed => {
                watching_kill = changed.is_ok();
            }
        }
    };
    let first = match step {
        Step::Server(d) => (Some(d), None),
        Step::Client(u) => (None, Some(u)),
        Step::Idle => (None, None),
    };
    let end = match first {
        (Some(d), _) => {
            // The server closed. After the client's Terminate that is the
            // client ending the session, whichever EOF arrived first.
            let end = server_side_end(d);
            if end == RelayEnd::ServerClosed && up.ends_with_terminate {
                RelayEnd::ClientClosed
            } else {
                end
            }
        }
        (None, Some(u)) if client_half_closed(&u) => {
            let client_end = client_side_end(u);
            // Pass the client's EOF on (close_notify, FIN), and relay the
            // server's answer to what came before it.
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, server.shutdown()).await;
            let rest = tokio::time::timeout(
                half_close,
                poll_fn(|cx| {
                    down.poll_copy(
                        cx,
                        &mut clock,
                        Pin::new(&mut *server),
                        Pin::new(&mut *client),
                        |d| {
                            if let Some(q) = queries.as_deref_mut() {
                                q.server_bytes(d);
                            }
                        },
                    )
                }),
            )
            .await;
            match rest {
                // The server's own end after the client's is the client's
                // doing; only a failure to deliver the reply is worth naming.
                Ok(Err(PipeError::Write(e))) if !is_close(&e) => {
                    RelayEnd::ClientError(e.to_string())
                }
                _ => client_end,
            }
        }
        (_, Some(u)) => client_side_end(u),
        (None, None) => {
            // Shutdown. A message may only go between two of the server's;
            // an idle session's server gets a Terminate for a clean end.
            let idle =
                down.framer.as_ref().is_some_and(|f| f.idle) && up.last_active <= down.last_active;
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
                if down.at_boundary() {
                    let message = if killed {
                        kill_error()
                    } else if audit_lost {
                        audit_error()
                    } else {
                        shutdown_error()
                    };
                    let _ = client.write_all(&message).await;
                    let _ = client.flush().await;
                }
                if idle {
                    let _ = server.write_all(&TERMINATE).await;
                    let _ = server.flush().await;
                }
            })
            .await;
            if killed {
                RelayEnd::Killed
            } else if audit_lost {
                RelayEnd::AuditUnavailable
            } else {
                RelayEnd::Shutdown
            }
        }
    };
    // Whoever ended, both sides are told now; a peer that does not take the
    // close_notify within the grace period is dropped anyway.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let _ = server.shutdown().await;
        let _ = client.shutdown().await;
    })
    .await;
    // Statements the server was sent and never answered (the client reset
    // or half-closed, the server ended the session) are recorded too.
    if let Some(q) = queries {
        q.end_of_session();
    }
    let counts = ByteCounts {
        client_to_server: up.copied,
        server_to_client: down.copied,
    };
    (end, counts)
}

/// What a client is told when an administrator ends its session (`KILL`
/// in the admin console): PostgreSQL's SQLSTATE for an administrator's
/// termination, and who did it.
fn kill_error() -> Vec<u8> {
    crate::protocol::message::ErrorResponse::new(
        "57P01",
        "terminating connection: ended by an administrator of pgbastion (KILL)",
    )
    .encode()
}

/// What a client is told when its statements can no longer be audited and
/// the audit log's `on_failure` is "refuse".
fn audit_error() -> Vec<u8> {
    crate::protocol::message::ErrorResponse::new(
        "57P01",
        "terminating connection: pgbastion's audit log cannot be written, and its rule audits every statement",
    )
    .with_hint("pgbastion's audit.on_failure is \"refuse\"; reconnect once its audit log is being written again.")
    .encode()
}

/// What a client is told when pgbastion shuts its session down: what
/// PostgreSQL says on its own shutdown, so clients treat it the same way.
pub(crate) fn shutdown_error() -> Vec<u8> {
    crate::protocol::message::ErrorResponse::new(
        "57P01",
        "terminating connection because pgbastion is shutting down",
    )
    .encode()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt};
    use tokio::sync::watch;

    /// A shutdown signal that never fires.
    fn running() -> watch::Receiver<ShutdownPhase> {
        let (tx, rx) = watch::channel(ShutdownPhase::Running);
        std::mem::forget(tx);
        rx
    }

    type Far = tokio::io::DuplexStream;

    /// A relay between two in-memory pipes; returns the client's far end,
    /// the server's far end, and the relay's task.
    fn spawn_relay(
        half_close: Duration,
        shutdown: watch::Receiver<ShutdownPhase>,
    ) -> (Far, Far, tokio::task::JoinHandle<(RelayEnd, ByteCounts)>) {
        // Nobody will KILL these sessions: the sender is gone at once.
        spawn_killable_relay(half_close, shutdown, watch::channel(false).1)
    }

    fn spawn_killable_relay(
        half_close: Duration,
        mut shutdown: watch::Receiver<ShutdownPhase>,
        mut kill: watch::Receiver<bool>,
    ) -> (Far, Far, tokio::task::JoinHandle<(RelayEnd, ByteCounts)>) {
        let (client_far, mut client_near) = duplex(1024);
        let (mut server_near, server_far) = duplex(1024);
        let task = tokio::spawn(async move {
            relay(
                &mut client_near,
                &mut server_near,
                half_close,
                &mut shutdown,
                &mut kill,
                &Progress::default(),
                None,
            )
            .await
        });
        (client_far, server_far, task)
    }

    #[tokio::test]
    async fn kill_ends_a_session_with_its_own_message() {
        let (kill_tx, kill) = watch::channel(false);
        let (mut client_far, _server_far, task) =
            spawn_killable_relay(Duration::from_secs(5), running(), kill);
        kill_tx.send_replace(true);
        let (end, _) = task.await.unwrap();
        assert_eq!(end, RelayEnd::Killed);
        let mut got = Vec::new();
        client_far.read_to_end(&mut got).await.unwrap();
        let fields = crate::protocol::message::ErrorFields::parse(&got[5..]).unwrap();
        assert_eq!(fields.code, "57P01");
        assert!(
            fields.message.contains("administrator"),
            "{}",
            fields.message
        );
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        crate::protocol::message::build(tag, body)
    }

    #[test]
    fn framer_follows_messages_across_chunks() {
        let mut stream = msg(b'D', b"row data");
        stream.extend(msg(b'C', b"SELECT 1\0"));
        stream.extend(msg(b'Z', b"I"));
        for split in 0..stream.len() {
            let mut f = Framer::default();
            f.advance(&stream[..split]);
            f.advance(&stream[split..]);
            assert!(f.at_boundary() && f.idle, "split at {split}");
        }
        let mut f = Framer::default();
        f.advance(&msg(b'Z', b"T"));
        assert!(f.at_boundary() && !f.idle, "in a transaction is not idle");
        f.advance(&msg(b'Z', b"I")[..3]);
        assert!(!f.at_boundary() && !f.idle);
    }

    #[tokio::test]
    async fn shutdown_ends_an_idle_session_at_once_and_a_busy_one_when_idle() {
        let (tx, rx) = watch::channel(ShutdownPhase::Running);
        let (mut client_far, mut server_far, task) = spawn_relay(Duration::from_secs(5), rx);
        // Busy: the client asked something the server has not answered.
        server_far.write_all(&msg(b'Z', b"I")).await.unwrap();
        let mut rfq = [0u8; 6];
        client_far.read_exact(&mut rfq).await.unwrap();
        client_far
            .write_all(&msg(b'Q', b"select 1\0"))
            .await
            .unwrap();
        let mut q = [0u8; 14];
        server_far.read_exact(&mut q).await.unwrap();
        tx.send_replace(ShutdownPhase::Draining);
        // The answer completes the transaction: now the session ends.
        let mut answer = msg(b'C', b"SELECT 1\0");
        answer.extend(msg(b'Z', b"I"));
        server_far.write_all(&answer).await.unwrap();
        let (end, _) = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("ends once idle")
            .unwrap();
        assert_eq!(end, RelayEnd::Shutdown);
        let mut got = Vec::new();
        client_far.read_to_end(&mut got).await.unwrap();
        assert!(got.starts_with(&answer), "the answer first");
        let fields =
            crate::protocol::message::ErrorFields::parse(&got[answer.len() + 5..]).unwrap();
        assert_eq!(fields.code, "57P01");
        let mut to_server = Vec::new();
        server_far.read_to_end(&mut to_server).await.unwrap();
        assert_eq!(to_server, TERMINATE, "a clean end for the server");
    }

    #[tokio::test]
    async fn shutdown_now_ends_a_busy_session() {
        let (tx, rx) = watch::channel(ShutdownPhase::Running);
        let (mut client_far, mut server_far, task) = spawn_relay(Duration::from_secs(5), rx);
        client_far
            .write_all(&msg(b'Q', b"select pg_sleep(60)\0"))
            .await
            .unwrap();
        let mut q = [0u8; 25];
        server_far.read_exact(&mut q).await.unwrap();
        tx.send_replace(ShutdownPhase::Draining);
        tx.send_replace(ShutdownPhase::Now);
        let (end, _) = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("ends at once")
            .unwrap();
        assert_eq!(end, RelayEnd::Shutdown);
        let mut got = Vec::new();
        client_far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got[0], b'E');
        let mut to_server = Vec::new();
        server_far.read_to_end(&mut to_server).await.unwrap();
        assert!(
            to_server.is_empty(),
            "no Terminate in the middle of a query"
        );
    }

    #[tokio::test]
    async fn copies_both_ways_and_ends_when_one_side_closes() {
        let (mut client_far, mut server_far, task) = spawn_relay(Duration::from_secs(5), running());

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
    async fn a_half_closed_client_still_gets_the_reply() {
        let (mut client_far, mut server_far, task) = spawn_relay(Duration::from_secs(5), running());
        client_far.write_all(b"query").await.unwrap();
        client_far.shutdown().await.unwrap();
        // The server gets the query, then the client's EOF...
        let mut got = Vec::new();
        server_far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"query");
        // ...and its reply still reaches the client.
        server_far.write_all(b"reply").await.unwrap();
        drop(server_far);
        let mut reply = Vec::new();
        client_far.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply");
        let (end, counts) = task.await.unwrap();
        assert_eq!(end, RelayEnd::ClientClosed);
        assert_eq!(counts.server_to_client, 5);
    }

    #[tokio::test]
    async fn a_half_closed_session_ends_at_the_deadline() {
        let (mut client_far, mut server_far, task) =
            spawn_relay(Duration::from_millis(200), running());
        client_far.shutdown().await.unwrap();
        // The server never answers nor closes: the relay ends anyway.
        let (end, _) = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("ended by the half-close deadline")
            .unwrap();
        assert_eq!(end, RelayEnd::ClientClosed);
        let mut rest = Vec::new();
        client_far.read_to_end(&mut rest).await.unwrap();
        let mut got = Vec::new();
        server_far.read_to_end(&mut got).await.unwrap();
    }

    #[tokio::test]
    async fn a_server_closing_after_terminate_is_the_client_ending() {
        let (mut client_far, mut server_far, task) = spawn_relay(Duration::from_secs(5), running());
        // The client sends Terminate but its FIN has not arrived yet when
        // the server, having read the Terminate, closes.
        client_far.write_all(&TERMINATE).await.unwrap();
        let mut got = [0u8; 5];
        server_far.read_exact(&mut got).await.unwrap();
        drop(server_far);
        let (end, _) = task.await.unwrap();
        assert_eq!(end, RelayEnd::ClientClosed);
        drop(client_far);
    }

    #[tokio::test]
    async fn large_transfer_is_complete() {
        let (mut client_far, mut server_far, task) = spawn_relay(Duration::from_secs(5), running());
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
