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
//! once (more are closed when accepted), and each connection ended at
//! `request_timeout` whatever it is doing (issue 19 item 19: thousands of
//! half-sent requests held 88 MB and as many open files).

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
    let slots = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    let mut refused_logged: Option<std::time::Instant> = None;
    loop {
        let (mut stream, _) = tokio::select! {
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Closed at once; one line per minute at most.
            if refused_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                refused_logged = Some(std::time::Instant::now());
                tracing::warn!(
                    limit = config.max_connections,
                    "admin listener: [admin] max_connections reached; closing new connections"
                );
            }
            continue;
        };
        let (metrics, health) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(config.request_timeout, async {
                let Some(head) = read_head(&mut stream).await else {
                    return;
                };
                let response = respond(&head, &metrics, &health);
                let _ = stream.write_all(&response).await;
                let _ = stream.shutdown().await;
            })
            .await;
        });
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
                crate::audit_chain::Digest::Sha256,
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
}
