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
mod pipe;
use pipe::{client_half_closed, client_side_end, server_side_end, Pipe, PipeError, ServerView};
use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

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
pub(crate) fn kill_error() -> Vec<u8> {
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
mod tests;
