//! The io_uring floor: a tokio-uring runtime per thread, rustls's
//! connections driven by hand (ciphertext in and out of owned buffers the
//! ring reads and writes), one task per direction.
//!
//! Each direction reads ciphertext from one socket, decrypts it, encrypts
//! the plaintext for the other leg and writes that with one submission.
//! The two connections are shared by the directions through `RefCell`s
//! borrowed only between awaits: one thread, no locks.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::rc::Rc;

use anyhow::{bail, Result};
use rustls::Connection;
use tokio_uring::net::TcpStream;

use crate::{Relay, SSL_REQUEST};

/// A TLS record's worth of ciphertext and then some. Each direction's
/// read holds one while it waits: with io_uring the buffer belongs to the
/// kernel until the read completes, so an idle session pins two.
const BUF: usize = 18 * 1024;

pub fn serve(listener: TcpListener, relay: Relay) -> Result<()> {
    tokio_uring::start(async move {
        let listener = tokio_uring::net::TcpListener::from_std(listener);
        loop {
            let (client, _) = listener.accept().await?;
            let relay = relay.clone();
            tokio_uring::spawn(async move {
                if let Err(e) = session(client, relay).await {
                    eprintln!("relay-probe (uring): {e:#}");
                }
            });
        }
    })
}

async fn session(client: TcpStream, relay: Relay) -> Result<()> {
    client.set_nodelay(true)?;
    let (n, request) = read(&client, Vec::with_capacity(8)).await?;
    if n == 0 {
        // A port probe (the harness's wait for the port).
        return Ok(());
    }
    if n != 8 || request != SSL_REQUEST {
        bail!("the client did not ask for TLS");
    }
    write_all(&client, b"S".to_vec()).await?;
    let client_tls = Connection::from(rustls::ServerConnection::new(relay.tls.server.clone())?);
    let client_tls = handshake(&client, client_tls).await?;

    let server = TcpStream::connect(relay.upstream).await?;
    server.set_nodelay(true)?;
    write_all(&server, SSL_REQUEST.to_vec()).await?;
    let (n, answer) = read(&server, Vec::with_capacity(1)).await?;
    if n != 1 || answer != b"S" {
        bail!("the server refused TLS");
    }
    let server_tls = Connection::from(rustls::ClientConnection::new(
        relay.tls.client.clone(),
        relay.tls.server_name.clone(),
    )?);
    let server_tls = handshake(&server, server_tls).await?;

    let client = Leg {
        socket: Rc::new(client),
        tls: Rc::new(RefCell::new(client_tls)),
    };
    let server = Leg {
        socket: Rc::new(server),
        tls: Rc::new(RefCell::new(server_tls)),
    };
    // Either direction ending (EOF, an error) ends the session.
    tokio::select! {
        r = direction(client.clone(), server.clone()) => r,
        r = direction(server, client) => r,
    }
}

/// One side of the relay: its socket and its TLS connection.
#[derive(Clone)]
struct Leg {
    socket: Rc<TcpStream>,
    tls: Rc<RefCell<Connection>>,
}

/// Drives `tls` until its handshake is done and everything it has to send
/// (a TLS 1.3 server's tickets included) is sent.
async fn handshake(socket: &TcpStream, mut tls: Connection) -> Result<Connection> {
    let mut buf = Vec::with_capacity(BUF);
    loop {
        let out = take_tls(&mut tls)?;
        if !out.is_empty() {
            write_all(socket, out).await?;
        }
        if !tls.is_handshaking() && !tls.wants_write() {
            return Ok(tls);
        }
        if tls.wants_read() {
            buf.clear();
            let (n, b) = read(socket, buf).await?;
            buf = b;
            if n == 0 {
                bail!("closed during the TLS handshake");
            }
            feed(&mut tls, &buf)?;
        }
    }
}

/// Ciphertext from `from`, decrypted, re-encrypted for `to`, until EOF.
/// It starts by passing on what the handshake already decrypted (a
/// client's StartupMessage often arrives with its Finished).
async fn direction(from: Leg, to: Leg) -> Result<()> {
    let mut buf = Vec::with_capacity(BUF);
    let mut ciphertext_len = 0;
    loop {
        let out = {
            let mut from_tls = from.tls.borrow_mut();
            let mut to_tls = to.tls.borrow_mut();
            let mut ciphertext = &buf[..ciphertext_len];
            // In pieces: rustls takes what fits its buffers, and the
            // plaintext is drained after each piece so they never fill.
            loop {
                if !pass_plaintext(&mut from_tls, &mut to_tls)? {
                    return Ok(());
                }
                if ciphertext.is_empty() {
                    break;
                }
                from_tls.read_tls(&mut ciphertext)?;
                from_tls.process_new_packets()?;
            }
            take_tls(&mut to_tls)?
        };
        if !out.is_empty() {
            write_all(&to.socket, out).await?;
        }
        buf.clear();
        let (n, b) = read(&from.socket, buf).await?;
        buf = b;
        if n == 0 {
            return Ok(());
        }
        ciphertext_len = n;
    }
}

/// Moves what `from` decrypted into `to`'s plaintext; false once `from`
/// has closed (close_notify).
fn pass_plaintext(from: &mut Connection, to: &mut Connection) -> Result<bool> {
    thread_local! {
        /// One plaintext buffer per thread: it is only used between awaits.
        static PLAIN: RefCell<Vec<u8>> = RefCell::new(vec![0u8; BUF]);
    }
    PLAIN.with_borrow_mut(|plain| loop {
        match from.reader().read(plain) {
            Ok(0) => return Ok(false),
            Ok(k) => to.writer().write_all(&plain[..k])?,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) => return Err(e.into()),
        }
    })
}

/// Hands handshake `ciphertext` to `tls` whole (rustls takes it in pieces
/// when its buffer is full) and processes the records.
fn feed(tls: &mut Connection, mut ciphertext: &[u8]) -> Result<()> {
    while !ciphertext.is_empty() {
        tls.read_tls(&mut ciphertext)?;
        tls.process_new_packets()?;
    }
    Ok(())
}

/// What `tls` has to send, in one buffer for one write.
fn take_tls(tls: &mut Connection) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    while tls.wants_write() {
        tls.write_tls(&mut out)?;
    }
    Ok(out)
}

async fn read(socket: &TcpStream, buf: Vec<u8>) -> io::Result<(usize, Vec<u8>)> {
    let (r, buf) = socket.read(buf).await;
    Ok((r?, buf))
}

async fn write_all(socket: &TcpStream, buf: Vec<u8>) -> io::Result<()> {
    socket.write_all(buf).await.0
}
