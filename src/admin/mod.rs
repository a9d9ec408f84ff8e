//! What operators use. This module: the admin HTTP listener (`[admin]
//! listen`, `--admin-listen`), what an operator's tools poll; `metrics`:
//! the Prometheus metrics it serves; `console`: the admin console on
//! database `pgbastion`, over `live`, the sessions relaying now.
//!
//! The HTTP listener:
//! - `/metrics`: Prometheus text format (see `metrics`).
//! - `/livez`: the process serves HTTP.
//! - `/readyz`: listeners bound, configuration loaded, not shutting down;
//!   503 from the moment SIGTERM arrives, so a balancer stops sending.
//! - `/startupz`: 200 once the listeners accept.
//!
//! A deliberately small HTTP/1.1 server: GET (and HEAD) only, one request
//! per connection, a bounded request head, at most `max_connections` at
//! once, and each connection ended at `request_timeout` whatever it is
//! doing (issue 19 item 19: thousands of half-sent requests held 88 MB and
//! as many open files).
//!
//! Half-sent requests must not starve the probes, though (issue 19
//! adversarial M3: 300 of them, renewed as they expired, made /livez fail
//! 67 times in 85 while the cap refused new connections, enough for a
//! liveness probe to restart the process). So the request head must arrive
//! within `HEAD_TIMEOUT`, and when the cap is reached a new connection
//! takes the place of the oldest one still sending its head; only when
//! every connection has sent its request (each is then being answered,
//! which takes no time) is a new one closed at once. A flood must then
//! outpace a probe's own request, not merely outnumber it.

use crate::sync::MutexExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod console;
pub mod live;
pub mod metrics;

use metrics::Metrics;

/// The largest request head read.
const MAX_REQUEST: usize = 8 * 1024;

/// How long a client has to send its request head (at most
/// `request_timeout`): a probe sends it at once.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);

/// The connections being served: how many, and which are still reading
/// their request head (in accept order, each with what ends it).
#[derive(Default)]
struct Connections {
    open: usize,
    next_id: u64,
    reading: std::collections::BTreeMap<u64, CancellationToken>,
}

/// One admitted connection: `evicted` fires when a newer connection takes
/// its place; dropping it frees the place.
struct Place {
    conns: Arc<std::sync::Mutex<Connections>>,
    id: u64,
    evicted: CancellationToken,
}

fn lock(m: &std::sync::Mutex<Connections>) -> std::sync::MutexGuard<'_, Connections> {
    m.locked()
}

/// How a new connection got in, if it did.
#[derive(Debug, PartialEq, Eq)]
enum Admitted {
    Free,
    /// In the place of the oldest connection still reading its head.
    Evicted,
}

impl Place {
    /// A place for a new connection: a free one, else the oldest one still
    /// reading its head (which is ended); None if every place is answering.
    fn take(conns: &Arc<std::sync::Mutex<Connections>>, max: usize) -> Option<(Place, Admitted)> {
        let mut c = lock(conns);
        let how = if c.open < max {
            Admitted::Free
        } else {
            let (_, oldest) = c.reading.pop_first()?;
            // Its place is ours from now: its Place does not free it again.
            oldest.cancel();
            c.open -= 1;
            Admitted::Evicted
        };
        c.open += 1;
        let id = c.next_id;
        c.next_id += 1;
        let evicted = CancellationToken::new();
        c.reading.insert(id, evicted.clone());
        drop(c);
        let place = Place {
            conns: conns.clone(),
            id,
            evicted,
        };
        Some((place, how))
    }

    /// The head is read: the connection is answered, never evicted.
    fn head_read(&self) {
        lock(&self.conns).reading.remove(&self.id);
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if !self.evicted.is_cancelled() {
            let mut c = lock(&self.conns);
            c.reading.remove(&self.id);
            c.open -= 1;
        }
    }
}

/// What the probes report, set by the server as it starts and stops.
#[derive(Debug, Default)]
pub struct Health {
    pub started: AtomicBool,
    pub draining: AtomicBool,
}

impl Health {
    fn ready(&self) -> bool {
        self.started.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst)
    }
}

/// Serves until `stop`.
pub async fn serve(
    listener: TcpListener,
    config: crate::config::AdminConfig,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let conns = Arc::new(std::sync::Mutex::new(Connections::default()));
    let mut full_logged: Option<std::time::Instant> = None;
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let admitted = Place::take(&conns, config.max_connections);
        if admitted.as_ref().is_none_or(|(_, how)| *how == Admitted::Evicted)
            // One line per minute at most.
            && full_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            full_logged = Some(std::time::Instant::now());
            tracing::warn!(
                limit = config.max_connections,
                "admin listener: [admin] max_connections reached; closing the oldest connections that have not sent their request (or new ones, if all have)"
            );
        }
        let Some((place, _)) = admitted else {
            continue;
        };
        tokio::spawn(serve_one(
            stream,
            place,
            config.request_timeout,
            metrics.clone(),
            health.clone(),
        ));
    }
}

/// One connection: its request head within `HEAD_TIMEOUT`, the answer,
/// all within `request_timeout`, unless a newer connection takes its place
/// first.
async fn serve_one(
    mut stream: tokio::net::TcpStream,
    place: Place,
    request_timeout: Duration,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) {
    let evicted = place.evicted.clone();
    let serve = tokio::time::timeout(request_timeout, async {
        let head = tokio::time::timeout(HEAD_TIMEOUT.min(request_timeout), read_head(&mut stream));
        let Ok(Some(head)) = head.await else {
            return;
        };
        place.head_read();
        let response = respond(&head, &metrics, &health);
        let _ = stream.write_all(&response).await;
        let _ = stream.shutdown().await;
    });
    tokio::select! {
        _ = evicted.cancelled() => {}
        _ = serve => {}
    }
}

/// The request head, or None if the client closed or sent too much.
async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// The whole response to one request head.
fn respond(head: &str, metrics: &Metrics, health: &Health) -> Vec<u8> {
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        ("GET" | "HEAD", "/livez") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET" | "HEAD", "/readyz") if health.ready() => {
            ("200 OK", "text/plain", "ready\n".to_owned())
        }
        ("GET" | "HEAD", "/readyz") => (
            "503 Service Unavailable",
            "text/plain",
            if health.draining.load(Ordering::SeqCst) {
                "shutting down\n"
            } else {
                "starting\n"
            }
            .to_owned(),
        ),
        ("GET" | "HEAD", "/startupz") if health.started.load(Ordering::SeqCst) => {
            ("200 OK", "text/plain", "started\n".to_owned())
        }
        ("GET" | "HEAD", "/startupz") => (
            "503 Service Unavailable",
            "text/plain",
            "starting\n".to_owned(),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain",
            "not found; try /metrics, /livez, /readyz or /startupz\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET and HEAD\n".to_owned(),
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(head: &str, health: &Health) -> String {
        let metrics = Metrics::new(Arc::new(
            crate::audit::AuditLog::open(
                &crate::config::AuditTarget::Off,
                crate::config::AuditOnFailure::Continue,
                crate::audit::chain::Digest::Sha256,
            )
            .unwrap(),
        ));
        let r = String::from_utf8(respond(head, &metrics, health)).unwrap();
        r.lines().next().unwrap().to_owned()
    }

    #[test]
    fn probes_follow_the_server_state() {
        let h = Health::default();
        assert_eq!(status("GET /livez HTTP/1.1\r\n\r\n", &h), "HTTP/1.1 200 OK");
        assert!(status("GET /readyz HTTP/1.1\r\n\r\n", &h).contains("503"));
        assert!(status("GET /startupz HTTP/1.1\r\n\r\n", &h).contains("503"));
        h.started.store(true, Ordering::SeqCst);
        assert!(status("GET /readyz HTTP/1.1\r\n\r\n", &h).contains("200"));
        assert!(status("GET /startupz HTTP/1.1\r\n\r\n", &h).contains("200"));
        h.draining.store(true, Ordering::SeqCst);
        assert!(status("GET /readyz HTTP/1.1\r\n\r\n", &h).contains("503"));
        assert!(status("GET /nope HTTP/1.1\r\n\r\n", &h).contains("404"));
        assert!(status("POST /metrics HTTP/1.1\r\n\r\n", &h).contains("405"));
        assert!(status("", &h).contains("405"));
        assert!(status("GET /metrics HTTP/1.1\r\n\r\n", &h).contains("200"));
    }

    /// Issue 19 adversarial M3: a full listener made room for nobody; now
    /// the oldest connection still sending its head gives way, and only
    /// connections being answered are never ended for a newer one.
    #[test]
    fn a_new_connection_takes_the_place_of_the_oldest_half_sent_one() {
        let conns = Arc::new(std::sync::Mutex::new(Connections::default()));
        let (a, how) = Place::take(&conns, 2).unwrap();
        assert_eq!(how, Admitted::Free);
        let (b, _) = Place::take(&conns, 2).unwrap();
        let (c, how) = Place::take(&conns, 2).expect("room is made");
        assert_eq!(how, Admitted::Evicted);
        assert!(a.evicted.is_cancelled() && !b.evicted.is_cancelled());
        drop(a);
        assert_eq!(lock(&conns).open, 2, "an evicted place is not freed twice");
        b.head_read();
        c.head_read();
        assert!(Place::take(&conns, 2).is_none(), "both are being answered");
        drop(b);
        let (d, how) = Place::take(&conns, 2).unwrap();
        assert_eq!(how, Admitted::Free);
        drop((c, d));
        let c = lock(&conns);
        assert_eq!((c.open, c.reading.len()), (0, 0));
    }
}
