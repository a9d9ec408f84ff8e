//! The epoll floor: a current-thread tokio runtime per thread, tokio-rustls
//! on both legs (as pgbastion), and `copy_bidirectional` between them.

use std::net::TcpListener;

use anyhow::{bail, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{Relay, SSL_REQUEST};

pub fn serve(listener: TcpListener, relay: Relay) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        loop {
            let (client, _) = listener.accept().await?;
            let relay = relay.clone();
            tokio::spawn(async move {
                if let Err(e) = session(client, relay).await {
                    eprintln!("relay-probe (epoll): {e:#}");
                }
            });
        }
    })
}

async fn session(mut client: TcpStream, relay: Relay) -> Result<()> {
    client.set_nodelay(true)?;
    let mut request = [0u8; 8];
    match client.read_exact(&mut request).await {
        // A port probe (the harness's wait for the port).
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
        r => r?,
    };
    if request != SSL_REQUEST {
        bail!("the client did not ask for TLS");
    }
    client.write_all(b"S").await?;
    let mut client = tokio_rustls::TlsAcceptor::from(relay.tls.server.clone())
        .accept(client)
        .await?;

    let mut server = TcpStream::connect(relay.upstream).await?;
    server.set_nodelay(true)?;
    server.write_all(&SSL_REQUEST).await?;
    let mut answer = [0u8; 1];
    server.read_exact(&mut answer).await?;
    if answer != *b"S" {
        bail!("the server refused TLS");
    }
    let mut server = tokio_rustls::TlsConnector::from(relay.tls.client.clone())
        .connect(relay.tls.server_name.clone(), server)
        .await?;
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    Ok(())
}
