//! The relay floor (issue 24): the least a TLS-terminating Postgres relay
//! can do, once with tokio's epoll reactor and once with io_uring
//! (tokio-uring), both thread-per-core with `SO_REUSEPORT` listeners. The
//! benchmark (`bench/run.sh --relay --probes`) measures them beside
//! pgbastion, PgBouncer and HAProxy, so the same run says what io_uring
//! buys at equal work (uring vs epoll), what pgbastion's own work costs
//! above the floor (pgbastion vs epoll), and what TLS costs (epoll vs
//! HAProxy's plain TCP).
//!
//! Not a product: no identity, policy, audit, message tracking, limits or
//! deadlines. The client leg answers the SSLRequest and terminates TLS; the
//! server leg sends its own SSLRequest and verifies the server against a
//! CA, as pgbastion does; then bytes are relayed both ways.

mod epoll;
mod tls;
mod uring;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Io {
    /// tokio's reactor (epoll), one current-thread runtime per thread.
    Epoll,
    /// io_uring through tokio-uring, one ring per thread.
    Uring,
}

#[derive(Parser)]
#[command(
    about = "A minimal TLS relay for the Postgres protocol, to measure the floor of the relay's cost."
)]
struct Args {
    /// Where clients connect.
    #[arg(long)]
    listen: SocketAddr,
    /// The server (TLS after an SSLRequest, verified against --ca).
    #[arg(long)]
    upstream: SocketAddr,
    /// The name the server's certificate is verified for.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// The client leg's certificate chain and key (PEM).
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// The CA the server's certificate chains to (PEM).
    #[arg(long)]
    ca: PathBuf,
    #[arg(long, value_enum, default_value_t = Io::Epoll)]
    io: Io,
    /// Threads, each with its own runtime and listener socket.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// What every connection needs: both legs' TLS settings and the server.
#[derive(Clone)]
pub struct Relay {
    pub tls: tls::Settings,
    pub upstream: SocketAddr,
}

/// The 8-byte SSLRequest (length 8, code 80877103).
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 4, 210, 22, 47];

fn main() -> Result<()> {
    let args = Args::parse();
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    let relay = Relay {
        tls: tls::Settings::load(&args.cert, &args.key, &args.ca, &args.server_name)?,
        upstream: args.upstream,
    };
    let threads: Vec<_> = (0..args.threads)
        .map(|i| {
            let listener = reuse_port_listener(args.listen)?;
            let relay = relay.clone();
            let io = args.io;
            std::thread::Builder::new()
                .name(format!("probe-{i}"))
                .spawn(move || match io {
                    Io::Epoll => epoll::serve(listener, relay),
                    Io::Uring => uring::serve(listener, relay),
                })
                .context("starting a thread")
        })
        .collect::<Result<_>>()?;
    for t in threads {
        match t.join() {
            Ok(r) => r?,
            Err(_) => bail!("a relay thread panicked"),
        }
    }
    Ok(())
}

/// One of the thread's listener sockets on the shared port: the kernel
/// spreads connections across them.
fn reuse_port_listener(addr: SocketAddr) -> Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
