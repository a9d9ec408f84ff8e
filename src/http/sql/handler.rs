//! `POST /sql`: one request, run as one short session. The request's
//! connection string, headers and body are read and checked first (400,
//! 413, 408 before anything else is spent); then an in-memory stream
//! stands in for a client socket: pgbastion's own session flow runs on
//! one end (identity, routing by the connection string's host, policy,
//! the password checked against the user's verifier or handed to the
//! server, the pool, audit and query audit), and `client` speaks the
//! Postgres protocol on the other, with the password pipelined behind the
//! StartupMessage. A batch runs in one transaction (the batch headers on
//! its BEGIN), committed at the end and rolled back on any error.
//!
//! Each request ends its session (Terminate), so nothing of it (settings,
//! temporary tables, prepared statements) is left for the next one: with
//! a pooled upstream the server connection goes back to the pool clean,
//! as for any transaction-mode client. A request that times out, or whose
//! client goes away, cancels its query through the same session path a
//! CancelRequest takes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::sync::OwnedSemaphorePermit;
use tracing::debug;

use super::body::parse_body;
use super::client::{self, Client, ClientError};
use super::conninfo::{self, ConnInfo};
use super::request::{Options, Payload, Query};
use super::response::{self, ResponseBuilder};
use crate::audit::Carrier;
use crate::http::serve::{error, routing_name, Body, ConnCtx, Misdirected};

/// The header that carries the connection string (required).
const CONNECTION_STRING: &str = "neon-connection-string";

/// How much the in-memory stream between the client and its session
/// buffers each way.
const STREAM_BUFFER: usize = 64 * 1024;

/// Why a request is answered without a result, and with what status.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("{0}")]
    BadRequest(String),
    #[error("the request body is larger than http.max_request_bytes ({0} bytes)")]
    TooLarge(usize),
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    #[error("the response would be larger than http.max_response_bytes ({0} bytes)")]
    ResponseTooLarge(usize),
    /// PostgreSQL's (or pgbastion's session's) ErrorResponse, as JSON.
    #[error("{}", .0.message)]
    Postgres(Box<response::ServerError>),
    #[error("the session ended before the request completed: {0}")]
    Session(String),
    /// The connection string names another server than TLS did (421).
    #[error(transparent)]
    Misdirected(#[from] Misdirected),
}

impl Refused {
    fn response(&self) -> Response<Body> {
        match self {
            Refused::BadRequest(m) => error(StatusCode::BAD_REQUEST, m.clone()),
            Refused::TooLarge(_) => error(StatusCode::PAYLOAD_TOO_LARGE, self.to_string()),
            Refused::BodyTimeout(_) => error(StatusCode::REQUEST_TIMEOUT, self.to_string()),
            Refused::ResponseTooLarge(_) => {
                error(StatusCode::INSUFFICIENT_STORAGE, self.to_string())
            }
            Refused::Postgres(e) => json(StatusCode::BAD_REQUEST, e.to_json()),
            Refused::Session(_) => error(StatusCode::BAD_GATEWAY, self.to_string()),
            Refused::Misdirected(e) => e.response(),
        }
    }
}

impl From<ClientError> for Refused {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Server(e) => Refused::Postgres(e),
            ClientError::ResponseTooLarge(n) => Refused::ResponseTooLarge(n),
            other => Refused::Session(other.to_string()),
        }
    }
}

/// Answers one `POST /sql` within `http.request_timeout`, under the
/// listener's `http.max_requests`.
pub(crate) async fn respond(ctx: &Arc<ConnCtx>, req: Request<Incoming>) -> Response<Body> {
    let Ok(slot) = ctx.http().requests.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many SQL-over-HTTP requests on this listener (http.max_requests); try again later",
        );
    };
    let limit = ctx.http().settings.request_timeout;
    let mut running = Running::new(ctx, Arc::new(slot));
    let outcome = tokio::time::timeout(limit, run(ctx, req, &mut running)).await;
    match outcome {
        Ok(Ok(response)) => response,
        Ok(Err(refused)) => refused.response(),
        // `running` cancels the query when dropped.
        Err(_) => json(
            StatusCode::GATEWAY_TIMEOUT,
            response::error_json(
                &format!(
                    "the request did not complete within http.request_timeout ({})",
                    humantime::format_duration(limit)
                ),
                Some("57014"),
            ),
        ),
    }
}

/// The request's checks, its session and its queries.
async fn run(
    ctx: &Arc<ConnCtx>,
    req: Request<Incoming>,
    running: &mut Running,
) -> Result<Response<Body>, Refused> {
    let settings = &ctx.http().settings;
    let conn = connection_string(&req)?;
    let server_name = routing_name(&ctx.tls, Some(&conn.host), "the connection string's host")?;
    let options = Options::from_headers(req.headers()).map_err(bad)?;
    let (peer, forwarded_by) = ctx.client_of(&req);
    let body = read_body(
        req.into_body(),
        settings.max_request_bytes,
        settings.body_timeout,
    )
    .await?;
    let payload = parse_body(&body).map_err(bad)?;
    drop(body);
    let io = start_session(ctx, server_name, peer, forwarded_by, running.slot.clone());
    let limits = client::Limits {
        max_message_bytes: settings.max_response_bytes,
        max_row_bytes: settings.max_response_bytes,
    };
    let client = client::connect(io, &conn.startup_params(), conn.password(), limits).await?;
    let client = running.hold(client);
    let batch = matches!(payload, Payload::Batch(_));
    let mut out = ResponseBuilder::new(
        options.raw_text_output,
        options.array_mode,
        batch,
        settings.max_response_bytes,
    );
    let result = match &payload {
        Payload::Single(query) => run_query(client, query, &mut out).await,
        Payload::Batch(queries) => run_batch(client, queries, &options, &mut out).await,
    };
    // Either way the session ends now: nothing of this request outlives it.
    running.finish().await;
    result?;
    let mut response = json(StatusCode::OK, out.finish());
    if batch {
        for (name, value) in options.batch_response_headers() {
            response
                .headers_mut()
                .insert(name, HeaderValue::from_static(value));
        }
    }
    Ok(response)
}

fn bad(e: impl std::fmt::Display) -> Refused {
    Refused::BadRequest(e.to_string())
}

/// The parsed `Neon-Connection-String` header.
fn connection_string<B>(req: &Request<B>) -> Result<ConnInfo, Refused> {
    let value = req.headers().get(CONNECTION_STRING).ok_or_else(|| {
        bad("missing the Neon-Connection-String header (postgresql://user:password@host/database)")
    })?;
    let text = value
        .to_str()
        .map_err(|_| bad("the Neon-Connection-String header is not ASCII text"))?;
    conninfo::parse(text).map_err(bad)
}

/// The whole body, refused past `max` bytes or `deadline`.
async fn read_body(body: Incoming, max: usize, deadline: Duration) -> Result<Bytes, Refused> {
    let collected = tokio::time::timeout(deadline, Limited::new(body, max).collect()).await;
    match collected {
        Err(_) => Err(Refused::BodyTimeout(deadline)),
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(Refused::TooLarge(max)),
        Ok(Err(e)) => Err(bad(format!("the request body could not be read: {e}"))),
    }
}

/// The session this request runs as, on the far end of an in-memory
/// stream; the near end is returned for the client. The session holds
/// the request's place under `http.max_requests` until it ends: a request
/// that went away leaves its session to end on its own (it reads EOF, or
/// its connect or pool wait runs out), and until then it still counts.
fn start_session(
    ctx: &Arc<ConnCtx>,
    server_name: Option<String>,
    peer: Option<std::net::SocketAddr>,
    forwarded_by: Option<crate::audit::ClientAddress>,
    slot: Arc<OwnedSemaphorePermit>,
) -> DuplexStream {
    let (near, far) = tokio::io::duplex(STREAM_BUFFER);
    let carried = ctx.carried(Box::new(far), Carrier::Http, server_name, forwarded_by);
    let session = crate::session::handle_carried(
        carried,
        peer,
        ctx.local,
        ctx.info.clone(),
        ctx.shared.clone(),
        None,
    );
    ctx.sessions.spawn(async move {
        session.await;
        drop(slot);
    });
    near
}

/// One statement, outside any transaction of ours (as Neon: a statement
/// is its own transaction).
async fn run_query(
    client: &mut Client<DuplexStream>,
    query: &Query,
    out: &mut ResponseBuilder,
) -> Result<(), Refused> {
    let result = client.query(&query.text, &query.params).await?;
    out.push(&result, query.array_mode)
        .map_err(response_refused)
}

/// Every statement in one transaction: BEGIN with the batch options,
/// COMMIT at the end, ROLLBACK on the first error (whose JSON is the
/// answer).
async fn run_batch(
    client: &mut Client<DuplexStream>,
    queries: &[Query],
    options: &Options,
    out: &mut ResponseBuilder,
) -> Result<(), Refused> {
    client.simple(&options.begin_statement()).await?;
    for query in queries {
        let done = match client.query(&query.text, &query.params).await {
            Ok(result) => out
                .push(&result, query.array_mode)
                .map_err(response_refused),
            Err(e) => Err(Refused::from(e)),
        };
        if let Err(e) = done {
            let _ = client.simple("ROLLBACK").await;
            return Err(e);
        }
    }
    client.simple("COMMIT").await?;
    Ok(())
}

fn response_refused(e: response::ResponseError) -> Refused {
    match e {
        response::ResponseError::TooLarge(n) => Refused::ResponseTooLarge(n),
        other => Refused::Session(other.to_string()),
    }
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The request's session while its queries run. If the request ends first
/// (its client went away, or `http.request_timeout` passed), the query is
/// cancelled through a CancelRequest on a session of its own, exactly as
/// a Postgres client's would be (rate limit, audit, delivery), and the
/// request's session is kept open until that cancel has been delivered:
/// closing it first would end the session and retire its cancel key
/// before the cancel could match it.
struct Running {
    ctx: Arc<ConnCtx>,
    client: Option<Client<DuplexStream>>,
    /// The request's place under `http.max_requests`, shared with its
    /// session and with the cancel that outlives the request.
    slot: Arc<OwnedSemaphorePermit>,
}

impl Running {
    fn new(ctx: &Arc<ConnCtx>, slot: Arc<OwnedSemaphorePermit>) -> Running {
        Running {
            ctx: ctx.clone(),
            client: None,
            slot,
        }
    }

    /// Keeps the logged-in client here for the queries to use.
    fn hold(&mut self, client: Client<DuplexStream>) -> &mut Client<DuplexStream> {
        self.client.insert(client)
    }

    /// The queries are done: RESET ALL, then Terminate; nothing to cancel.
    /// The reset is for what the pool cannot see: a statement may change
    /// a setting for the session (`set_config(name, value, false)` on a
    /// name the pool does not track, or a function doing so), and on a
    /// pooled upstream the server connection goes on to the next
    /// request; this request's session must leave nothing to it.
    async fn finish(&mut self) {
        if let Some(mut client) = self.client.take() {
            let _ = client.simple("RESET ALL").await;
            let _ = client.terminate().await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let Some(key) = client.backend_key().cloned() else {
            return;
        };
        debug!("the request ended before its query: cancelling it");
        let ctx = self.ctx.clone();
        let slot = self.slot.clone();
        let (mut near, far) = tokio::io::duplex(64);
        let carried = ctx.carried(Box::new(far), Carrier::Http, None, None);
        let session = crate::session::handle_carried(
            carried,
            ctx.peer,
            ctx.local,
            ctx.info.clone(),
            ctx.shared.clone(),
            None,
        );
        self.ctx.sessions.spawn(async move {
            let send = async move {
                let _ = near.write_all(&key.cancel_request()).await;
                near
            };
            // The cancel session ends once it has forwarded the cancel.
            let (_, near) = tokio::join!(session, send);
            drop(near);
            drop(client);
            drop(slot);
        });
    }
}
