//! Socket helpers every connection uses, client side and server side:
//! tuning a TCP socket, and telling a peer's close from an error.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

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
