//! The relay: after authentication, bytes are copied both ways as they
//! arrive, until the session is over. Nothing is changed or held back: the
//! server's direction is framed (`protocol::framer`) only to know where the
//! session is idle and where a message of pgbastion's own may go, and a
//! session whose rule audits its statements hands every chunk, once
//! written on, to its query audit (`audit::query`), which parses both
//! directions.
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
//! - an error on either side ends the session at once;
//! - pgbastion stops it (`StopReason`): shutdown, an administrator's KILL,
//!   or a statement that could not be audited; the client is told why.

use crate::audit::event::EndReason;
use crate::audit::query::QueryTracker;
use crate::protocol::framer::Framer;
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

/// The server's direction as the relay follows it: message boundaries,
/// and whether the last message was ReadyForQuery saying "idle".
#[derive(Debug, Default)]
struct ServerView {
    framer: Framer,
    /// The last complete message was ReadyForQuery with status 'I'.
    ready_idle: bool,
}

/// The largest ReadyForQuery body looked at (it is one status byte).
const READY_FOR_QUERY_MAX: usize = 16;

impl ServerView {
    fn advance(&mut self, data: &[u8]) {
        let mut idle = self.ready_idle;
        // A server whose stream cannot be framed is never between two
        // messages again (`at_boundary`): nothing of pgbastion's goes in.
        let _ = self.framer.feed(
            data,
            |tag| (tag == b'Z').then_some(READY_FOR_QUERY_MAX),
            |m| idle = m.tag == b'Z' && m.body.last() == Some(&b'I'),
        );
        self.ready_idle = idle;
    }

    /// Between two messages, the last of them ReadyForQuery "idle".
    fn idle(&self) -> bool {
        self.ready_idle && self.framer.at_boundary()
    }

    fn at_boundary(&self) -> bool {
        self.framer.at_boundary()
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
    /// The session's `end_reason`.
    pub fn reason(&self) -> EndReason {
        match self {
            RelayEnd::ClientClosed => EndReason::ClientClosed,
            RelayEnd::ServerClosed => EndReason::ServerClosed,
            RelayEnd::ClientError(_) => EndReason::ClientError,
            RelayEnd::ServerError(_) => EndReason::ServerError,
            RelayEnd::Shutdown => EndReason::Shutdown,
            RelayEnd::Killed => EndReason::Killed,
            RelayEnd::AuditUnavailable => EndReason::AuditUnavailable,
        }
    }
}

/// Why pgbastion itself ended a session, rather than one of its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    /// pgbastion is shutting down (SIGTERM).
    Shutdown,
    /// An administrator ended the session (`KILL`).
    Killed,
    /// A statement's query audit event could not be queued and the audit
    /// log's `on_failure` is "refuse".
    AuditLost,
}

impl StopReason {
    /// What the client is told.
    fn client_error(self) -> Vec<u8> {
        match self {
            StopReason::Shutdown => shutdown_error(),
            StopReason::Killed => kill_error(),
            StopReason::AuditLost => audit_error(),
        }
    }

    fn end(self) -> RelayEnd {
        match self {
            StopReason::Shutdown => RelayEnd::Shutdown,
            StopReason::Killed => RelayEnd::Killed,
            StopReason::AuditLost => RelayEnd::AuditUnavailable,
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
    framer: Option<ServerView>,
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
            framer: Some(ServerView {
                ready_idle: idle,
                ..ServerView::default()
            }),
            ..Pipe::new()
        }
    }

    /// Everything read has been written and it ended between messages.
    fn at_boundary(&self) -> bool {
        self.pos >= self.pending.len() && self.framer.as_ref().is_some_and(ServerView::at_boundary)
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
    /// pgbastion ends the session.
    Stop(StopReason),
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
    queries: Option<&mut QueryTracker>,
) -> (RelayEnd, ByteCounts)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut relay = Relay {
        client,
        server,
        up: Pipe::new(),
        down: Pipe::framed(!progress.busy.load(std::sync::atomic::Ordering::Relaxed)),
        clock: 0,
        queries,
    };
    let step = relay.copy_until_step(shutdown, kill, progress).await;
    let end = relay.end_for(step, half_close).await;
    relay.close_both().await;
    // Statements the server was sent and never answered (the client reset
    // or half-closed, the server ended the session) are recorded too.
    if let Some(q) = relay.queries {
        q.end_of_session();
    }
    let counts = ByteCounts {
        client_to_server: relay.up.copied,
        server_to_client: relay.down.copied,
    };
    (end, counts)
}

/// One session's relay: both sockets and both directions' state.
struct Relay<'a, C: ?Sized, S: ?Sized> {
    client: &'a mut C,
    server: &'a mut S,
    /// Client to server.
    up: Pipe,
    /// Server to client (framed).
    down: Pipe,
    /// Ticks at every read, so the two directions' `last_active` compare.
    clock: u64,
    queries: Option<&'a mut QueryTracker>,
}

impl<C, S> Relay<'_, C, S>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    /// Copies until a side ends or pgbastion stops the session, following
    /// shutdown and KILL as they change.
    async fn copy_until_step(
        &mut self,
        shutdown: &mut tokio::sync::watch::Receiver<ShutdownPhase>,
        kill: &mut tokio::sync::watch::Receiver<bool>,
        progress: &Progress,
    ) -> Step {
        let mut watching = true;
        let mut watching_kill = true;
        loop {
            let phase = *shutdown.borrow_and_update();
            if *kill.borrow_and_update() {
                return Step::Stop(StopReason::Killed);
            }
            if phase == ShutdownPhase::Now {
                return Step::Stop(StopReason::Shutdown);
            }
            let draining = phase == ShutdownPhase::Draining;
            let copy = poll_fn(|cx| self.poll_both(cx, draining, progress));
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
                step = copy => return step,
                changed = shutdown_changed => {
                    // No sender any more: nobody will shut this relay down.
                    watching = changed.is_ok();
                }
                changed = kill_changed => {
                    watching_kill = changed.is_ok();
                }
            }
        }
    }

    /// One wake-up: copies what each side has, publishes progress, and
    /// says whether the session is over.
    fn poll_both(
        &mut self,
        cx: &mut Context<'_>,
        draining: bool,
        progress: &Progress,
    ) -> Poll<Step> {
        let down_done = self.poll_down(cx);
        let queries = &mut self.queries;
        let up_done = self.up.poll_copy(
            cx,
            &mut self.clock,
            Pin::new(&mut *self.client),
            Pin::new(&mut *self.server),
            |d| {
                if let Some(q) = queries.as_deref_mut() {
                    q.client_bytes(d);
                }
            },
        );
        if self.queries.as_deref().is_some_and(QueryTracker::lost) {
            // No statement goes on unaudited (audit.on_failure = "refuse").
            return Poll::Ready(Step::Stop(StopReason::AuditLost));
        }
        {
            use std::sync::atomic::Ordering::Relaxed;
            progress.client_to_server.store(self.up.copied, Relaxed);
            progress.server_to_client.store(self.down.copied, Relaxed);
            progress.busy.store(!self.server_idle(), Relaxed);
        }
        match (down_done, up_done) {
            (Poll::Pending, Poll::Pending) => {
                // Idle: the server's last word was ReadyForQuery (not in a
                // transaction) and the client has said nothing since.
                let idle = self.down.at_boundary()
                    && self.server_idle()
                    && self.up.pos >= self.up.pending.len();
                if draining && idle {
                    Poll::Ready(Step::Stop(StopReason::Shutdown))
                } else {
                    Poll::Pending
                }
            }
            (Poll::Ready(d), Poll::Pending) => Poll::Ready(Step::Server(d)),
            (Poll::Pending, Poll::Ready(u)) => Poll::Ready(Step::Client(u)),
            // Both ended in one wake-up: the side that spoke last caused
            // it (a client's Terminate, or the server's FATAL).
            (Poll::Ready(d), Poll::Ready(u)) => {
                Poll::Ready(if self.down.last_active > self.up.last_active {
                    Step::Server(d)
                } else {
                    Step::Client(u)
                })
            }
        }
    }

    /// The server to client direction, its bytes shown to the query audit.
    fn poll_down(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PipeError>> {
        let queries = &mut self.queries;
        self.down.poll_copy(
            cx,
            &mut self.clock,
            Pin::new(&mut *self.server),
            Pin::new(&mut *self.client),
            |d| {
                if let Some(q) = queries.as_deref_mut() {
                    q.server_bytes(d);
                }
            },
        )
    }

    /// The server's last message was ReadyForQuery "idle" and the client
    /// has sent nothing since.
    fn server_idle(&self) -> bool {
        self.down.framer.as_ref().is_some_and(ServerView::idle)
            && self.up.last_active <= self.down.last_active
    }

    /// How the session ended, once the step that ended it is known.
    async fn end_for(&mut self, step: Step, half_close: Duration) -> RelayEnd {
        match step {
            Step::Server(d) => {
                // The server closed. After the client's Terminate that is
                // the client ending the session, whichever EOF came first.
                let end = server_side_end(d);
                if end == RelayEnd::ServerClosed && self.up.ends_with_terminate {
                    RelayEnd::ClientClosed
                } else {
                    end
                }
            }
            Step::Client(u) if client_half_closed(&u) => {
                let client_end = client_side_end(u);
                self.finish_after_client_eof(client_end, half_close).await
            }
            Step::Client(u) => client_side_end(u),
            Step::Stop(reason) => self.stop(reason).await,
        }
    }

    /// The client closed its sending side: its EOF is passed on (close_notify,
    /// FIN), and the server's answer to what came before it relayed.
    async fn finish_after_client_eof(
        &mut self,
        client_end: RelayEnd,
        half_close: Duration,
    ) -> RelayEnd {
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.server.shutdown()).await;
        let rest = tokio::time::timeout(half_close, poll_fn(|cx| self.poll_down(cx))).await;
        match rest {
            // The server's own end after the client's is the client's
            // doing; only a failure to deliver the reply is worth naming.
            Ok(Err(PipeError::Write(e))) if !is_close(&e) => RelayEnd::ClientError(e.to_string()),
            _ => client_end,
        }
    }

    /// pgbastion ends the session: the client is told why, if a message
    /// may go between two of the server's; an idle session's server gets
    /// a Terminate for a clean end.
    async fn stop(&mut self, reason: StopReason) -> RelayEnd {
        let idle = self.server_idle();
        let at_boundary = self.down.at_boundary();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
            if at_boundary {
                let _ = self.client.write_all(&reason.client_error()).await;
                let _ = self.client.flush().await;
            }
            if idle {
                let _ = self.server.write_all(&TERMINATE).await;
                let _ = self.server.flush().await;
            }
        })
        .await;
        reason.end()
    }

    /// Whoever ended, both sides are told now; a peer that does not take
    /// the close_notify within the grace period is dropped anyway.
    async fn close_both(&mut self) {
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
            let _ = self.server.shutdown().await;
            let _ = self.client.shutdown().await;
        })
        .await;
    }
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
    fn the_server_view_knows_when_the_session_is_idle() {
        let mut stream = msg(b'D', b"row data");
        stream.extend(msg(b'C', b"SELECT 1\0"));
        stream.extend(msg(b'Z', b"I"));
        for split in 0..stream.len() {
            let mut v = ServerView::default();
            v.advance(&stream[..split]);
            v.advance(&stream[split..]);
            assert!(v.at_boundary() && v.idle(), "split at {split}");
        }
        let mut v = ServerView::default();
        v.advance(&msg(b'Z', b"T"));
        assert!(v.at_boundary() && !v.idle(), "in a transaction is not idle");
        v.advance(&msg(b'Z', b"I")[..3]);
        assert!(!v.at_boundary() && !v.idle());
        let mut v = ServerView {
            ready_idle: true,
            ..ServerView::default()
        };
        v.advance(&msg(b'N', b"notice")[..3]);
        assert!(!v.idle(), "a message under way is not idle");
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
