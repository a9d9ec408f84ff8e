//! The I/O of a pooled session: whole client messages go through the
//! `Engine` to whichever server connection the session holds (checked out
//! at the first message of a transaction, given back at its end in
//! transaction mode), and the server's answers back. Both sockets are
//! read and written in one poll, so neither side can block the other
//! (a client pipelining a large batch while the server answers a large
//! result).

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::engine::{ClientStep, Engine, Next};
use super::{Lease, Opener, Pool, PoolError};
use crate::audit::query::QueryTracker;
use crate::audit::PinReason;
use crate::protocol::message::{self, ErrorResponse};
use crate::protocol::startup::CancelKey;
use crate::relay::{ByteCounts, Progress, RelayEnd, ShutdownPhase};
use crate::sync::MutexExt;

/// The largest message either side may send through a pooled session
/// (messages are held whole to be rewritten; PostgreSQL's own bound is
/// 1 GiB).
pub(crate) const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// How long the last words to a client may take before it is dropped.
const ERROR_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The room made for one read: a whole TLS record.
const READ_CHUNK: usize = 16 * 1024;
/// The room made for a read while nothing is pending.
const IDLE_CHUNK: usize = 2 * 1024;

/// Read at most this much ahead of what has been processed.
const READ_AHEAD: usize = 64 * 1024;

/// Where a cancel for this session goes right now: the server
/// connection serving it, if any (nothing is cancelled between
/// transactions).
pub(crate) type Serving = Mutex<Option<(std::net::SocketAddr, CancelKey)>>;

/// What the session does when it pins itself (audit, metrics).
pub(crate) type OnPin<'a> = Box<dyn FnMut(PinReason) + Send + 'a>;

/// What a pooled session's relay starts with.
pub(crate) struct RelayParts<'a> {
    pub engine: Engine,
    pub pool: Arc<Pool>,
    pub opener: Opener<'a>,
    /// Session mode: the session's connection.
    pub lease: Option<Lease>,
    /// Client bytes read past the login.
    pub cbuf: Vec<u8>,
    pub serving: Arc<Serving>,
    pub progress: Arc<Progress>,
    pub queries: Option<&'a mut QueryTracker>,
    pub on_pin: OnPin<'a>,
    pub on_wait: OnWait<'a>,
}

/// What the session does with each wait for a connection (the wait
/// histogram).
pub(crate) type OnWait<'a> = Box<dyn FnMut(std::time::Duration) + Send + 'a>;

pub(crate) struct PooledRelay<'a, C: ?Sized> {
    pub client: &'a mut C,
    pub engine: Engine,
    pub pool: Arc<Pool>,
    pub opener: Opener<'a>,
    pub lease: Option<Lease>,
    /// Client bytes read and not yet processed.
    pub cbuf: Vec<u8>,
    sbuf: Vec<u8>,
    to_server: Vec<u8>,
    to_client: Vec<u8>,
    /// How much of `to_client` the query audit has seen.
    audited: usize,
    /// Written but not yet flushed (TLS records may wait in the stream).
    client_unflushed: bool,
    server_unflushed: bool,
    pub serving: Arc<Serving>,
    pub counts: ByteCounts,
    pub progress: Arc<Progress>,
    pub queries: Option<&'a mut QueryTracker>,
    pub on_pin: OnPin<'a>,
    on_wait: OnWait<'a>,
}

/// pgbastion stopping a session: an administrator's KILL, or shutdown
/// (draining: idle sessions end; now: every session ends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Kill,
    Draining,
    Now,
}

type Signals<'s> = std::pin::Pin<Box<dyn std::future::Future<Output = Signal> + Send + 's>>;

/// The next stop signal (`draining`: the drain has been seen; only KILL
/// or the end of the drain are news).
fn stop_signals<'s>(
    kill: &'s mut watch::Receiver<bool>,
    shutdown: &'s mut watch::Receiver<ShutdownPhase>,
    draining: bool,
) -> Signals<'s> {
    Box::pin(async move {
        let phase = move |p: &ShutdownPhase| {
            if draining {
                *p == ShutdownPhase::Now
            } else {
                *p != ShutdownPhase::Running
            }
        };
        let killed = async { kill.wait_for(|k| *k).await.ok().map(|_| Signal::Kill) };
        let stopping = async {
            let now = shutdown
                .wait_for(phase)
                .await
                .ok()
                .map(|p| *p == ShutdownPhase::Now)?;
            Some(if now { Signal::Now } else { Signal::Draining })
        };
        tokio::select! {
            biased;
            Some(signal) = killed => signal,
            Some(signal) = stopping => signal,
            // Both senders gone: pgbastion is past caring about this session.
            else => std::future::pending().await,
        }
    })
}

/// What woke the relay.
enum Step {
    Io(Io),
    Signal(Signal),
}

/// How a pass over the sockets ended.
enum Io {
    Progress,
    ClientClosed,
    ServerClosed,
    ClientError(String),
    ServerError(String),
}

impl<'a, C> PooledRelay<'a, C>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    pub fn new(client: &'a mut C, parts: RelayParts<'a>) -> Self {
        let RelayParts {
            engine,
            pool,
            opener,
            lease,
            cbuf,
            serving,
            progress,
            queries,
            on_pin,
            on_wait,
        } = parts;
        PooledRelay {
            client,
            engine,
            pool,
            opener,
            lease,
            cbuf,
            sbuf: Vec::new(),
            to_server: Vec::new(),
            to_client: Vec::new(),
            audited: 0,
            client_unflushed: false,
            server_unflushed: false,
            serving,
            counts: ByteCounts::default(),
            progress,
            queries,
            on_pin,
            on_wait,
        }
    }

    /// Runs until either side ends or pgbastion stops the session.
    pub async fn run(
        &mut self,
        shutdown: &mut watch::Receiver<ShutdownPhase>,
        kill: &mut watch::Receiver<bool>,
    ) -> RelayEnd {
        // One future for pgbastion's own stop signals, kept across wake-ups:
        // polling it again costs nothing, where a fresh `changed()` per
        // wake-up would register with the process-wide shutdown watch each
        // time.
        let mut draining = false;
        let mut signals = stop_signals(kill, shutdown, draining);
        let mut passes: u32 = 0;
        loop {
            let idle = self.lease.is_none() && self.cbuf.is_empty() && self.to_client.is_empty();
            if draining && idle {
                return self
                    .stop(RelayEnd::Shutdown, crate::relay::shutdown_error())
                    .await;
            }
            if let Err(end) = self.client_messages(&mut signals).await {
                return end;
            }
            // The sockets first: a wake-up for them (nearly every one)
            // then never touches the signals' shared watch. Every 64th
            // pass looks at the signals first, so a session whose sockets
            // are always ready still sees a KILL or a shutdown.
            passes = passes.wrapping_add(1);
            let step = if passes.is_multiple_of(64) {
                tokio::select! {
                    biased;
                    signal = &mut signals => Step::Signal(signal),
                    io = poll_fn(|cx| self.poll_io(cx)) => Step::Io(io),
                }
            } else {
                tokio::select! {
                    biased;
                    io = poll_fn(|cx| self.poll_io(cx)) => Step::Io(io),
                    signal = &mut signals => Step::Signal(signal),
                }
            };
            let io = match step {
                Step::Io(io) => io,
                Step::Signal(Signal::Kill) => {
                    return self
                        .stop(RelayEnd::Killed, crate::relay::kill_error())
                        .await
                }
                Step::Signal(Signal::Now) => {
                    return self
                        .stop(RelayEnd::Shutdown, crate::relay::shutdown_error())
                        .await
                }
                Step::Signal(Signal::Draining) => {
                    // Idle sessions end now; busy ones at their end.
                    draining = true;
                    drop(signals);
                    signals = stop_signals(kill, shutdown, draining);
                    continue;
                }
            };
            match io {
                Io::Progress => {}
                Io::ClientClosed => return RelayEnd::ClientClosed,
                Io::ClientError(e) => return RelayEnd::ClientError(e),
                Io::ServerClosed => {
                    return self.server_lost("the server closed the connection").await
                }
                Io::ServerError(e) => return self.server_lost(&e).await,
            }
            if let Err(end) = self.server_messages() {
                return self.server_lost(&end).await;
            }
            if let Some(reason) = self.engine.take_new_pin() {
                (self.on_pin)(reason);
            }
        }
    }

    /// Processes the complete client messages read so far, checking a
    /// connection out first where the session holds none.
    async fn client_messages(&mut self, signals: &mut Signals<'_>) -> Result<(), RelayEnd> {
        let mut at = 0;
        let result = loop {
            if self.to_server.len() >= READ_AHEAD {
                break Ok(());
            }
            let (tag, len) = match message::frame(&self.cbuf[at..], MAX_MESSAGE) {
                Ok(Some(m)) => m,
                Ok(None) => break Ok(()),
                Err(e) => {
                    let err = ErrorResponse::new(
                        "08P01",
                        format!("invalid message from the client: {e}"),
                    );
                    break Err((RelayEnd::ClientError(e.to_string()), err.encode()));
                }
            };
            if tag == b'X' {
                break Err((RelayEnd::ClientClosed, Vec::new()));
            }
            if self.lease.is_none() {
                if let Err(e) = self.check_out(signals).await {
                    break Err(e);
                }
            }
            let Some(lease) = self.lease.as_mut() else {
                break Ok(());
            };
            let msg = &self.cbuf[at..at + len];
            if let Some(q) = self.queries.as_deref_mut() {
                q.client_bytes(msg);
            }
            let step = self.engine.client_message(
                msg,
                &mut lease.conn().state,
                &mut self.to_server,
                &mut self.to_client,
            );
            self.counts.client_to_server += len as u64;
            at += len;
            match step {
                ClientStep::Done => {}
                ClientStep::Terminate => break Err((RelayEnd::ClientClosed, Vec::new())),
                ClientStep::Pinned(reason) => (self.on_pin)(reason),
            }
        };
        self.cbuf.drain(..at);
        self.audit_client_bytes();
        match result {
            Ok(()) => Ok(()),
            Err((end, error)) => {
                if !error.is_empty() {
                    self.to_client.extend_from_slice(&error);
                    self.flush_client().await;
                }
                Err(end)
            }
        }
    }

    /// Hands the query audit what the client is about to be sent (the
    /// server's answers and pgbastion's own, in the order the client sees
    /// them), before any of it is written.
    fn audit_client_bytes(&mut self) {
        if let (Some(q), Some(new)) = (
            self.queries.as_deref_mut(),
            self.to_client.get(self.audited..),
        ) {
            q.server_bytes(new);
        }
        self.audited = self.to_client.len();
    }

    /// A server connection for the next transaction, switched to this
    /// client's settings.
    async fn check_out(&mut self, signals: &mut Signals<'_>) -> Result<(), (RelayEnd, Vec<u8>)> {
        let pool = self.pool.clone();
        let started = std::time::Instant::now();
        let got = tokio::select! {
            biased;
            signal = signals => return Err(match signal {
                Signal::Kill => (RelayEnd::Killed, crate::relay::kill_error()),
                // Waiting for a connection, its transaction not begun: a
                // drain ends it as an idle session.
                Signal::Draining | Signal::Now => (RelayEnd::Shutdown, crate::relay::shutdown_error()),
            }),
            got = pool.checkout(&self.opener) => got,
        };
        let mut lease = got.map_err(|e| pool_failure(&e))?;
        (self.on_wait)(started.elapsed());
        let conn = lease.conn();
        *self.serving.locked() = Some((conn.addr, conn.key.clone()));
        if !self.engine.validated {
            // Boxed: once per session at most, and the relay's future is
            // held by every idle session.
            Box::pin(self.first_switch(conn)).await?;
        }
        self.sbuf = std::mem::take(&mut conn.buf);
        self.engine
            .switch_if_needed(&mut conn.state, &mut self.to_server);
        self.progress
            .busy
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.lease = Some(lease);
        Ok(())
    }

    /// The client logged in without a connection: its startup settings
    /// are applied, and so checked, before its first message goes.
    async fn first_switch(
        &mut self,
        conn: &mut super::ServerConn,
    ) -> Result<(), (RelayEnd, Vec<u8>)> {
        let mut out = Vec::new();
        self.engine.switch_if_needed(&mut conn.state, &mut out);
        let limit = self.opener.timeouts.authentication;
        let switched = tokio::time::timeout(
            limit,
            switch_now(&mut self.engine, conn, &out, &mut self.to_client),
        )
        .await;
        match switched {
            Ok(Ok(())) => Ok(()),
            Ok(Err(SwitchError::Refused { code, message })) => {
                let err = settings_refused(&code, &message);
                Err((RelayEnd::ServerError(message), err.encode()))
            }
            Ok(Err(SwitchError::Io(e))) => Err(pool_failure(&PoolError::ServerIo(e))),
            Err(_) => Err(pool_failure(&PoolError::LoginTimeout(limit))),
        }
    }

    /// Processes the complete server messages read so far; gives the
    /// connection back when the transaction is over.
    fn server_messages(&mut self) -> Result<(), String> {
        let Some(lease) = self.lease.as_mut() else {
            return Ok(());
        };
        let mut at = 0;
        let mut next = Next::Continue;
        while let Some((_, len)) =
            message::frame(&self.sbuf[at..], MAX_MESSAGE).map_err(|e| e.to_string())?
        {
            next = self.engine.server_message(
                &self.sbuf[at..at + len],
                &mut lease.conn().state,
                &mut self.to_client,
            );
            at += len;
            if let Next::SwitchFailed(why) = &next {
                return Err(format!(
                    "the server refused the session's settings on a pooled connection: {why}"
                ));
            }
        }
        self.sbuf.drain(..at);
        self.audit_client_bytes();
        if next == Next::Idle && self.engine.may_release() && self.sbuf.is_empty() {
            self.release();
        }
        Ok(())
    }

    /// Gives the connection back (transaction mode, between transactions).
    fn release(&mut self) {
        // Between transactions a session keeps no buffer it does not need
        // (the memory of an idle pooled client).
        for buf in [&mut self.cbuf, &mut self.sbuf, &mut self.to_server] {
            if buf.is_empty() && buf.capacity() > IDLE_CHUNK {
                *buf = Vec::new();
            }
        }
        if let Some(lease) = self.lease.take() {
            *self.serving.locked() = None;
            self.progress
                .busy
                .store(false, std::sync::atomic::Ordering::Relaxed);
            lease.give_back();
        }
    }

    /// One pass over both sockets: write what is pending, read what is
    /// there; Ready once anything moved.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Io> {
        let mut moved = false;
        match poll_write_out(
            &mut *self.client,
            cx,
            &mut self.to_client,
            &mut self.client_unflushed,
        ) {
            Ok(n) => {
                self.audited = self.audited.saturating_sub(n);
                self.counts.server_to_client += n as u64;
                moved |= n > 0;
            }
            Err(e) => return Poll::Ready(client_error(e)),
        }
        if let Some(lease) = self.lease.as_mut() {
            let server = &mut lease.conn().stream;
            match poll_write_out(server, cx, &mut self.to_server, &mut self.server_unflushed) {
                Ok(n) => moved |= n > 0,
                Err(e) => return Poll::Ready(Io::ServerError(e.to_string())),
            }
            // Read on only while the client keeps up (memory per session
            // stays bounded when a client stops reading).
            let room = self.sbuf.len() < READ_AHEAD || !frame_complete(&self.sbuf);
            if room && self.to_client.len() < READ_AHEAD {
                match poll_read_into(server, cx, &mut self.sbuf) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Io::ServerClosed),
                    Poll::Ready(Ok(_)) => moved = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Io::ServerError(e.to_string())),
                    Poll::Pending => {}
                }
            }
        }
        let room = self.cbuf.len() < READ_AHEAD || !frame_complete(&self.cbuf);
        if room && self.to_server.len() < READ_AHEAD {
            match poll_read_into(&mut *self.client, cx, &mut self.cbuf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Io::ClientClosed),
                Poll::Ready(Ok(_)) => moved = true,
                Poll::Ready(Err(e)) => return Poll::Ready(client_error(e)),
                Poll::Pending => {}
            }
        }
        if moved {
            Poll::Ready(Io::Progress)
        } else {
            Poll::Pending
        }
    }

    /// Writes what the client is owed, within a short bound (the session
    /// is ending).
    async fn flush_client(&mut self) {
        let out = std::mem::take(&mut self.to_client);
        let _ = tokio::time::timeout(ERROR_WRITE_TIMEOUT, async {
            use tokio::io::AsyncWriteExt;
            let _ = self.client.write_all(&out).await;
            let _ = self.client.flush().await;
        })
        .await;
    }

    /// pgbastion ends the session: the client is told why.
    async fn stop(&mut self, end: RelayEnd, error: Vec<u8>) -> RelayEnd {
        self.to_client.extend_from_slice(&error);
        self.flush_client().await;
        end
    }

    /// The server connection failed mid-transaction: the client gets what
    /// the server said (already passed on) and an error; the connection
    /// is dropped, never reused.
    async fn server_lost(&mut self, why: &str) -> RelayEnd {
        self.lease = None;
        *self.serving.locked() = None;
        let err = ErrorResponse::new(
            "08006",
            format!("the pooled server connection was lost: {why}"),
        );
        self.to_client.extend_from_slice(&err.encode());
        self.flush_client().await;
        RelayEnd::ServerError(why.to_owned())
    }
}

fn client_error(e: std::io::Error) -> Io {
    if crate::net::is_close(&e) {
        Io::ClientClosed
    } else {
        Io::ClientError(e.to_string())
    }
}

/// The relay's end and what the client is told when no connection comes.
fn pool_failure(e: &PoolError) -> (RelayEnd, Vec<u8>) {
    (
        RelayEnd::ServerError(e.to_string()),
        e.client_error().encode(),
    )
}

/// Whether `buf` holds at least one whole message (reading on when it
/// does not, so a message larger than the read-ahead completes).
fn frame_complete(buf: &[u8]) -> bool {
    matches!(message::frame(buf, MAX_MESSAGE), Ok(Some(_)) | Err(_))
}

/// Writes as much of `out` as the socket takes now, then flushes what
/// was written (until a flush completes, `unflushed` stays set and every
/// pass tries again). Returns the bytes written.
fn poll_write_out<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    cx: &mut Context<'_>,
    out: &mut Vec<u8>,
    unflushed: &mut bool,
) -> std::io::Result<usize> {
    let mut written = 0;
    while written < out.len() {
        match Pin::new(&mut *w).poll_write(cx, &out[written..]) {
            Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => written += n,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => break,
        }
    }
    out.drain(..written);
    *unflushed |= written > 0;
    if *unflushed {
        match Pin::new(&mut *w).poll_flush(cx) {
            Poll::Ready(Ok(())) => *unflushed = false,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => {}
        }
    }
    Ok(written)
}

/// Reads what is there into `buf`'s spare room, with nothing zeroed or
/// copied on the way: a little room while nothing is pending (an idle
/// session waiting for its client holds 2 KiB, not a record's worth),
/// a whole TLS record's once a message is arriving.
fn poll_read_into<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    cx: &mut Context<'_>,
    buf: &mut Vec<u8>,
) -> Poll<std::io::Result<usize>> {
    buf.reserve(if buf.is_empty() {
        IDLE_CHUNK
    } else {
        READ_CHUNK
    });
    tokio_util::io::poll_read_buf(Pin::new(r), cx, buf)
}

/// What a client is told when the server refuses one of its startup
/// settings (on a direct connection, the login would have failed).
pub(crate) fn settings_refused(code: &str, message: &str) -> ErrorResponse {
    ErrorResponse::new(
        "22023",
        format!("the database server refused a setting of this session: {message}"),
    )
    .with_detail(format!(
        "SQLSTATE {code} from the server, applying the StartupMessage's parameters and options on a pooled connection."
    ))
}

/// Why a switch sent and awaited (`switch_now`) failed.
#[derive(Debug)]
pub(crate) enum SwitchError {
    /// The server refused a setting: its SQLSTATE and message.
    Refused {
        code: String,
        message: String,
    },
    Io(std::io::Error),
}

/// Sends a switch (`out`, from `Engine::switch_if_needed`) and reads the
/// server's answers until it is done, before anything of the client's
/// goes: how a client's startup settings are first applied, so one the
/// server refuses is an error before any statement runs without it.
/// ParameterStatus news goes to `to_client`.
pub(crate) async fn switch_now(
    engine: &mut Engine,
    server: &mut super::ServerConn,
    out: &[u8],
    to_client: &mut Vec<u8>,
) -> Result<(), SwitchError> {
    use tokio::io::AsyncWriteExt;
    server
        .stream
        .write_all(out)
        .await
        .map_err(SwitchError::Io)?;
    server.stream.flush().await.map_err(SwitchError::Io)?;
    let mut buf = std::mem::take(&mut server.buf);
    while !engine.nothing_in_flight() {
        let (t, body) = crate::auth::wire::read_message(&mut server.stream, &mut buf, MAX_MESSAGE)
            .await
            .map_err(|e| SwitchError::Io(std::io::Error::other(e.to_string())))?;
        if t == message::tag::ERROR_RESPONSE {
            let fields = message::ErrorFields::parse(&body).unwrap_or_default();
            return Err(SwitchError::Refused {
                code: fields.code,
                message: fields.message,
            });
        }
        let msg = message::build(t, &body);
        if let Next::SwitchFailed(why) = engine.server_message(&msg, &mut server.state, to_client) {
            return Err(SwitchError::Refused {
                code: "XX000".into(),
                message: why,
            });
        }
    }
    server.buf = buf;
    engine.validated = true;
    Ok(())
}
