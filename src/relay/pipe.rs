//! One direction of the relay's copy (`Pipe`), and the server's direction
//! as the relay follows it (`ServerView`: message boundaries, idleness).

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{is_close, RelayEnd, BUF_SIZE, TERMINATE};
use crate::protocol::framer::Framer;

/// The server's direction as the relay follows it: message boundaries,
/// and whether the last message was ReadyForQuery saying "idle".
#[derive(Debug, Default)]
pub(super) struct ServerView {
    pub(super) framer: Framer,
    /// The last complete message was ReadyForQuery with status 'I'.
    pub(super) ready_idle: bool,
}

/// The largest ReadyForQuery body looked at (it is one status byte).
const READY_FOR_QUERY_MAX: usize = 16;

impl ServerView {
    pub(super) fn advance(&mut self, data: &[u8]) {
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
    pub(super) fn idle(&self) -> bool {
        self.ready_idle && self.framer.at_boundary()
    }

    pub(super) fn at_boundary(&self) -> bool {
        self.framer.at_boundary()
    }
}

/// One direction of the copy. It owns no buffer while idle: data is read
/// into a buffer on the stack of the poll and written straight on; only what
/// a writer does not take at once is kept, on the heap, until it is written.
/// An idle session thus costs no relay memory at all.
pub(super) struct Pipe {
    /// Read but not yet written (usually empty).
    pub(super) pending: Vec<u8>,
    pub(super) pos: usize,
    pub(super) eof: bool,
    pub(super) need_flush: bool,
    pub(super) copied: u64,
    /// When this direction last moved bytes, on the relay's shared clock.
    pub(super) last_active: u64,
    /// The last bytes read ended with a Terminate message (meaningful for
    /// the client's direction: a server closing after it was asked to).
    pub(super) ends_with_terminate: bool,
    /// The server's direction follows message boundaries.
    pub(super) framer: Option<ServerView>,
}

pub(super) enum PipeError {
    Read(io::Error),
    Write(io::Error),
}

impl Pipe {
    pub(super) fn new() -> Self {
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
    pub(super) fn framed(idle: bool) -> Self {
        Pipe {
            framer: Some(ServerView {
                ready_idle: idle,
                ..ServerView::default()
            }),
            ..Pipe::new()
        }
    }

    /// Everything read has been written and it ended between messages.
    pub(super) fn at_boundary(&self) -> bool {
        self.pos >= self.pending.len() && self.framer.as_ref().is_some_and(ServerView::at_boundary)
    }

    /// Writes `data` until the writer would block; returns how much it took.
    pub(super) fn write_some<W: AsyncWrite + ?Sized>(
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
    pub(super) fn poll_copy<R, W>(
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
pub(super) fn server_side_end(res: Result<(), PipeError>) -> RelayEnd {
    match res {
        Ok(()) => RelayEnd::ServerClosed,
        Err(PipeError::Read(e)) if is_close(&e) => RelayEnd::ServerClosed,
        Err(PipeError::Read(e)) => RelayEnd::ServerError(e.to_string()),
        Err(PipeError::Write(e)) if is_close(&e) => RelayEnd::ClientClosed,
        Err(PipeError::Write(e)) => RelayEnd::ClientError(e.to_string()),
    }
}

/// How the client -> server direction ended, as a relay end.
pub(super) fn client_side_end(res: Result<(), PipeError>) -> RelayEnd {
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
pub(super) fn client_half_closed(res: &Result<(), PipeError>) -> bool {
    match res {
        Ok(()) => true,
        // A TCP FIN without TLS close_notify: the same thing, for Postgres.
        Err(PipeError::Read(e)) => e.kind() == io::ErrorKind::UnexpectedEof,
        Err(PipeError::Write(_)) => false,
    }
}
