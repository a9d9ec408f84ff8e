//! The Postgres byte stream carried in WebSocket binary frames: the
//! upgrade handshake (`handshake`) and the stream itself (`stream`).
//!
//! The wire rule is the one `@neondatabase/serverless` and Neon's wsproxy
//! use: after the upgrade, the client's binary messages carry the Postgres
//! v3 byte stream and nothing else. Message boundaries mean nothing (one
//! message may hold half a Postgres message or three of them), so the
//! payloads are read back as one continuous stream, and what pgbastion
//! writes goes out as binary messages of whatever size the relay wrote.
//! A text message is refused (it cannot be Postgres bytes, and guessing an
//! encoding would hide a client bug), and a Close, or the peer simply
//! hanging up, is end of stream. With that, a WebSocket client looks to the
//! session flow exactly like a TCP one: `WsStream` is `AsyncRead +
//! AsyncWrite` and is boxed as `BoxedIo`.

mod handshake;
mod stream;
#[cfg(test)]
mod tests;

pub use handshake::{is_upgrade_request, upgrade_response, HandshakeError};
pub use stream::{WsLimits, WsStream, MAX_WRITE};
