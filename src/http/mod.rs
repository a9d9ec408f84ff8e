//! The `protocol = "https"` listener: serverless and edge clients
//! (`@neondatabase/serverless` and the like) that cannot open raw TCP.
//! One TLS port carries two things: the Postgres byte stream inside a
//! WebSocket (`websocket`), which then runs the normal session flow, and
//! SQL over HTTP (`sql`), where each request runs as one short session.
//!
//! - `serve`: one accepted connection: the PROXY header, TLS, HTTP/1.1,
//!   and the choice between WebSocket, `POST /sql`, CORS preflight and
//!   404; the client address and the server name routing uses.
//! - `websocket`: the byte stream in binary frames.
//! - `sql`: Neon's contract (headers, JSON in and out) and the request's
//!   run through a session.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::config::HttpSettings;

pub(crate) mod serve;
pub mod sql;
pub mod websocket;

/// An https listener's settings with what its caps count. Made with each
/// configuration: a reload that changes the caps starts counting anew
/// (sessions already open keep their places under the old count).
#[derive(Debug)]
pub struct HttpListener {
    pub settings: HttpSettings,
    /// One permit per open WebSocket session.
    pub(crate) websockets: Arc<Semaphore>,
    /// One permit per SQL-over-HTTP request in progress.
    pub(crate) requests: Arc<Semaphore>,
}

impl HttpListener {
    pub fn new(settings: HttpSettings) -> HttpListener {
        HttpListener {
            websockets: Arc::new(Semaphore::new(settings.max_websockets)),
            requests: Arc::new(Semaphore::new(settings.max_requests)),
            settings,
        }
    }
}
