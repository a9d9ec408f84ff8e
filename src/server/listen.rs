//! Listening: binding a listener's socket (TCP, or a Unix socket replacing
//! a stale file), the accept loop that gives each connection a pending
//! slot and a session, and the set of running loops a reload starts and
//! stops (`Accepting`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::cores::{Cores, Detached};
use super::error::ServerError;
use super::state::{AcceptLoop, Accepting, ListenerInfo, Shared};
use crate::audit::ClientAddress;
use crate::config::{BindAddress, ProxyProtocol};
use crate::limits::keyed_slots::KeyedSlots;
use crate::limits::pending::{ConnectionPending, LiveLimits, PendingPermit, PendingSlots};
use crate::stream::BoxedIo;

pub(super) enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A bound socket and its accept loop's state; what a session gets with
/// each connection is looked up by `name` when it is accepted.
pub(super) struct Listener {
    pub name: String,
    pub socket: Socket,
    pending: Arc<PendingSlots>,
}

impl Listener {
    /// A listener's socket, bound, with its pending slots (`per_address`
    /// is shared by every listener).
    pub(super) fn bind(
        name: &str,
        bind: &BindAddress,
        per_address: &KeyedSlots<std::net::IpAddr>,
        limits: &Arc<LiveLimits>,
    ) -> Result<Listener, ServerError> {
        Ok(Listener {
            name: name.to_owned(),
            socket: bind_socket(name, bind)?,
            pending: Arc::new(PendingSlots::new(per_address, limits)),
        })
    }

    /// The address actually bound (a configured port 0 becomes the real
    /// port).
    pub(super) fn local_addr(&self) -> Option<BindAddress> {
        Some(match &self.socket {
            Socket::Tcp(t) => BindAddress::Tcp(t.local_addr().ok()?),
            Socket::Unix(_, p) => BindAddress::Unix(p.clone()),
        })
    }
}

/// Binds one listener's socket, replacing a stale Unix socket file left by
/// a crashed process but never one a live server is listening on.
/// Synchronous (std sockets handed to tokio), so a reload can bind new
/// listeners before it changes anything.
fn bind_socket(name: &str, bind: &BindAddress) -> Result<Socket, ServerError> {
    let failed = |addr: String| {
        move |source| ServerError::Bind {
            name: name.into(),
            addr,
            source,
        }
    };
    match bind {
        BindAddress::Tcp(addr) => {
            let std = std::net::TcpListener::bind(addr).map_err(failed(addr.to_string()))?;
            std.set_nonblocking(true)
                .map_err(failed(addr.to_string()))?;
            Ok(Socket::Tcp(
                TcpListener::from_std(std).map_err(failed(addr.to_string()))?,
            ))
        }
        BindAddress::Unix(path) => {
            let shown = path.display().to_string();
            if path.exists() {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(ServerError::SocketInUse {
                        name: name.into(),
                        path: path.into(),
                    });
                }
                let _ = std::fs::remove_file(path);
            }
            let std =
                std::os::unix::net::UnixListener::bind(path).map_err(failed(shown.clone()))?;
            std.set_nonblocking(true).map_err(failed(shown.clone()))?;
            Ok(Socket::Unix(
                UnixListener::from_std(std).map_err(failed(shown))?,
                path.clone(),
            ))
        }
    }
}

/// Why a reload stops a listener's accept loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StopReason {
    /// The listener is gone from the configuration.
    Removed,
    /// It listens on another address now (a new loop takes over).
    Moved,
}

impl Accepting {
    /// No loops yet; sessions are spawned on `sessions`, and every loop
    /// ends when `stop` is cancelled.
    pub(super) fn new(
        sessions: TaskTracker,
        cores: Option<Arc<Cores>>,
        stop: CancellationToken,
    ) -> Accepting {
        Accepting {
            sessions,
            cores,
            stop,
            loops: HashMap::new(),
        }
    }

    pub(super) fn start(&mut self, l: Listener, shared: Arc<Shared>) {
        let own = self.stop.child_token();
        let path = match &l.socket {
            Socket::Unix(_, p) => Some(p.clone()),
            Socket::Tcp(_) => None,
        };
        info!(listener = %l.name, "listening");
        let name = l.name.clone();
        let task = tokio::spawn(accept_loop(
            l,
            shared,
            self.sessions.clone(),
            self.cores.clone(),
            own.clone(),
        ));
        self.loops.insert(
            name,
            AcceptLoop {
                stop: own,
                unix_path: path,
                task,
            },
        );
    }

    /// Stops one listener's loop; its sessions go on.
    pub(super) fn stop(&mut self, name: &str, why: StopReason) {
        if let Some(l) = self.loops.remove(name) {
            l.stop.cancel();
            if let Some(p) = l.unix_path {
                let _ = std::fs::remove_file(p);
            }
            let why = match why {
                StopReason::Moved => "moved",
                StopReason::Removed => "removed",
            };
            info!(listener = %name, "stopped listening on the old address ({why} by a reload)");
        }
    }

    /// Stops every listener and waits until none accepts any more.
    pub(super) async fn stop_all(self) {
        self.stop.cancel();
        for (_, l) in self.loops {
            let _ = l.task.await;
            if let Some(p) = l.unix_path {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

async fn accept_loop(
    l: Listener,
    shared: Arc<Shared>,
    sessions: TaskTracker,
    cores: Option<Arc<Cores>>,
    stop: CancellationToken,
) {
    loop {
        let accepted: std::io::Result<Accepted> = tokio::select! {
            _ = stop.cancelled() => return,
            r = accept(&l.socket) => r,
        };
        let accepted = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS and friends are transient: back off
                // briefly so a full fd table does not spin the CPU, and go on.
                error!(listener = %l.name, error = %e, "accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some((info, permit)) = admit(&l, &shared, accepted.peer) else {
            continue;
        };
        let (peer, local, shared) = (accepted.peer, accepted.local, shared.clone());
        let cores = cores.as_deref();
        if info.http.is_some() {
            let pending = ConnectionPending::new(permit, l.pending.clone());
            let tracker = sessions.clone();
            spawn_on(cores, &sessions, accepted.io, move |io| {
                crate::http::serve::connection(io, peer, local, info, shared, pending, tracker)
            });
            continue;
        }
        spawn_on(cores, &sessions, accepted.io, move |io| {
            crate::session::handle(io, peer, local, info, shared, permit)
        });
    }
}

/// What a new connection's session gets: the listener as configured now
/// (a reload may have changed it since the last connection) and a pending
/// slot. None: the listener was just removed, or no slot is free (logged,
/// within the limiter's budget).
fn admit(
    l: &Listener,
    shared: &Shared,
    peer: Option<SocketAddr>,
) -> Option<(Arc<ListenerInfo>, PendingPermit)> {
    // None: removed by a reload that is stopping this loop right now.
    let info = shared.listener(&l.name)?;
    let client = peer.map_or_else(ClientAddress::unix, ClientAddress::tcp);
    // Behind a PROXY-protocol balancer every connection comes from the
    // balancer: until its header is read (under the header deadline)
    // only the listener's share applies; then the address the header
    // states is counted (`PendingPermit::readdress`). Counting the
    // balancer's address meanwhile would refuse a burst of new
    // connections (a pool starting) before their headers are read.
    let ip = match info.proxy_protocol {
        ProxyProtocol::Required => None,
        ProxyProtocol::Off => peer.map(|p| p.ip()),
    };
    match l.pending.try_acquire(ip) {
        Ok(permit) => {
            debug!(listener = %l.name, %client, "accepted");
            Some((info, permit))
        }
        Err(why) => {
            let limit = why.limit();
            if shared.warn_limit.allow(limit) {
                warn!(listener = %l.name, %client, limit, "too many unauthenticated connections; closing");
            }
            None
        }
    }
}

/// The address as everything compares it: an IPv4 client of a dual-stack
/// listener (`[::]`) arrives as `::ffff:a.b.c.d`, which no IPv4 rule,
/// limit or audit search would match (issue 19 item 3).
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// One accepted connection; the addresses are None for Unix sockets.
struct Accepted {
    io: Conn,
    peer: Option<SocketAddr>,
    /// The address the client connected to (PROXY headers carry it on).
    local: Option<SocketAddr>,
}

/// An accepted socket, still registered with the shared runtime.
enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Conn {
    fn boxed(self) -> BoxedIo {
        match self {
            Conn::Tcp(s) => Box::new(s),
            Conn::Unix(s) => Box::new(s),
        }
    }

    /// Off the shared runtime's reactor, for a core to register.
    fn detach(self) -> std::io::Result<Detached> {
        Ok(match self {
            Conn::Tcp(s) => Detached::Tcp(s.into_std()?),
            Conn::Unix(s) => Detached::Unix(s.into_std()?),
        })
    }
}

/// Starts a connection's task: on the shared runtime, or with `cores` on
/// the least loaded core (issue 24).
fn spawn_on<F, Fut>(cores: Option<&Cores>, sessions: &TaskTracker, conn: Conn, task: F)
where
    F: FnOnce(BoxedIo) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let Some(cores) = cores else {
        sessions.spawn(task(conn.boxed()));
        return;
    };
    match conn.detach() {
        Ok(detached) => cores.spawn(sessions, detached, task),
        Err(e) => warn!(error = %e, "cannot hand an accepted connection to a core; closed"),
    }
}

async fn accept(socket: &Socket) -> std::io::Result<Accepted> {
    match socket {
        Socket::Tcp(t) => {
            let (tcp, addr) = t.accept().await?;
            crate::net::tune_tcp(&tcp);
            let local = tcp.local_addr().ok().map(canonical);
            Ok(Accepted {
                io: Conn::Tcp(tcp),
                peer: Some(canonical(addr)),
                local,
            })
        }
        Socket::Unix(u, _) => {
            let (s, _) = u.accept().await?;
            Ok(Accepted {
                io: Conn::Unix(s),
                peer: None,
                local: None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_addresses_unwrap_ipv4_mapped_ipv6() {
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:5432".parse().unwrap();
        assert_eq!(canonical(mapped), "192.0.2.1:5432".parse().unwrap());
        let v6: SocketAddr = "[2001:db8::1]:5432".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[tokio::test]
    async fn a_live_unix_socket_is_never_replaced_and_a_stale_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let bind = BindAddress::Unix(path.clone());
        let live = bind_socket("a", &bind).unwrap();
        let err = bind_socket("b", &bind).err().unwrap();
        assert!(matches!(err, ServerError::SocketInUse { .. }), "{err}");
        drop(live);
        // The file a dead server left: replaced.
        assert!(path.exists());
        assert!(bind_socket("b", &bind).is_ok());
    }

    #[tokio::test]
    async fn a_port_in_use_names_the_listener_and_address() {
        let first = bind_socket("a", &BindAddress::Tcp("127.0.0.1:0".parse().unwrap())).unwrap();
        let Socket::Tcp(t) = &first else {
            panic!("tcp")
        };
        let addr = t.local_addr().unwrap();
        let err = bind_socket("b", &BindAddress::Tcp(addr)).err().unwrap();
        assert!(
            err.to_string()
                .starts_with(&format!("listener \"b\": cannot listen on {addr}")),
            "{err}"
        );
    }
}
