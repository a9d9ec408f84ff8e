//! Whole messages on a stream while a session authenticates: read one
//! (length-checked against a bound), write some. The buffers belong to the
//! caller, so bytes read past a message are never lost: they are handed on
//! to the next step (in the end, the relay).

use std::io;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::message::{self, MessageError};

#[derive(Debug, Error)]
pub enum WireError {
    #[error("the connection closed")]
    Closed,
    #[error("{0}")]
    Io(io::Error),
    #[error("{0}")]
    Protocol(#[from] MessageError),
}

/// Reads one message (type byte and body) of at most `max` bytes, taking
/// it out of `buf` and leaving whatever followed it there.
pub async fn read_message<S>(
    io: &mut S,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<(u8, Vec<u8>), WireError>
where
    S: AsyncRead + Unpin + ?Sized,
{
    loop {
        if let Some((tag, len)) = message::frame(buf, max)? {
            let body = buf[5..len].to_vec();
            buf.drain(..len);
            return Ok((tag, body));
        }
        buf.reserve(1024);
        match io.read_buf(buf).await {
            Ok(0) => return Err(WireError::Closed),
            Ok(_) => {}
            Err(e) if crate::net::is_close(&e) => return Err(WireError::Closed),
            Err(e) => return Err(WireError::Io(e)),
        }
    }
}

/// Writes and flushes (TLS streams hold data back until flushed).
pub async fn send<S>(io: &mut S, bytes: &[u8]) -> Result<(), WireError>
where
    S: AsyncWrite + Unpin + ?Sized,
{
    io.write_all(bytes).await.map_err(WireError::Io)?;
    io.flush().await.map_err(WireError::Io)
}
