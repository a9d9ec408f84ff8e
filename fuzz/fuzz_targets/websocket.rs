//! What a client sends after the WebSocket upgrade: raw frames, read as
//! the Postgres byte stream until end or error. Nothing may panic or hang,
//! and no read may invent bytes: what comes out is at most what went in
//! (payloads are never larger than the frames that carried them).
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pgbastion::http::websocket::{WsLimits, WsStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        // Room for all the input and all the server's replies (a pong or
        // close reply is never longer than the masked frame it answers),
        // so neither side waits on the other.
        let (server_io, mut client) = tokio::io::duplex(2 * data.len() + 1024);
        // A small limit, so over-limit frames and messages are reachable.
        let mut server = WsStream::new(server_io, WsLimits { max_message: 1024 }).await;
        client.write_all(data).await.expect("duplex has room");
        client.shutdown().await.expect("duplex shutdown");
        let mut buf = [0u8; 512];
        let mut total = 0usize;
        while let Ok(n) = server.read(&mut buf).await {
            if n == 0 {
                break;
            }
            total += n;
            assert!(
                total <= data.len(),
                "read {total} bytes from {} of input",
                data.len()
            );
        }
        let _ = server.write(b"Z\0\0\0\x05I").await;
        let _ = server.flush().await;
        let _ = server.shutdown().await;
    });
});
