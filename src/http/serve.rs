//! One connection of an https listener, as stages: `arrive` (the PROXY
//! header when the listener requires one, then TLS with pgbastion's
//! certificate, ALPN `http/1.1`), then HTTP/1.1 (hyper) until the client
//! leaves or pgbastion shuts down. Each request is answered by `respond`:
//! a WebSocket upgrade becomes a session of its own (`session::
//! handle_carried`), `POST /sql` runs through `sql::handler`, `OPTIONS`
//! is a CORS preflight, anything else is 404 or 405.
//!
//! Who the client is comes from the connection, never from what a request
//! says of itself: its address is the socket's, or the PROXY header's, or
//! (only from `http.forwarded_for_trusted` peers) the last
//! `X-Forwarded-For` hop.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::task::TaskTracker;
use tracing::{debug, Instrument};

use super::websocket::{self, WsLimits, WsStream};
use super::HttpListener;
use crate::audit::{Carrier, ClientAddress, ProxyFacts};
use crate::config::{ListenerIdentity, ProxyProtocol};
use crate::limits::pending::{ConnectionPending, PendingPermit};
use crate::relay::ShutdownPhase;
use crate::server::{ListenerInfo, Shared};
use crate::session::{Carried, ClientConn};
use crate::stream::{BoxedIo, Prefixed};
use crate::tls::TlsInfo;

/// What every response of pgbastion's own carries as its body.
pub(crate) type Body = Full<Bytes>;

/// The request headers a browser may send cross-origin (Neon's driver
/// sends these), for the CORS preflight.
const ALLOWED_HEADERS: &str = "Authorization, Content-Type, Neon-Connection-String, \
    Neon-Raw-Text-Output, Neon-Array-Mode, Neon-Pool-Opt-In, Neon-Batch-Read-Only, \
    Neon-Batch-Isolation-Level, Neon-Batch-Deferrable";

/// Everything the requests of one connection share: who is at the other
/// end and where the listener sends them.
pub(crate) struct ConnCtx {
    pub info: Arc<ListenerInfo>,
    pub shared: Arc<Shared>,
    pub sessions: TaskTracker,
    /// The client's address: the socket's peer, or what a PROXY header
    /// stated.
    pub peer: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub proxy: Option<ProxyFacts>,
    pub tls: TlsInfo,
    pub peer_cert: Option<Vec<u8>>,
    /// The connection's pending slot until its first request: a WebSocket
    /// session keeps it until it is authenticated, anything else frees it;
    /// a later upgrade takes a new one.
    pending: Mutex<ConnectionPending>,
}

impl ConnCtx {
    pub(crate) fn http(&self) -> &HttpListener {
        // Only https listeners' connections get here (`listen`).
        self.info
            .http
            .as_deref()
            .expect("an https listener has its HTTP settings")
    }

    /// The client of one request, and the balancer that named it when a
    /// trusted `X-Forwarded-For` did.
    pub(crate) fn client_of<B>(
        &self,
        req: &Request<B>,
    ) -> (Option<SocketAddr>, Option<ClientAddress>) {
        let trusted = &self.http().settings.forwarded_for_trusted;
        let Some(peer) = self.peer else {
            return (None, None);
        };
        if !trusted.iter().any(|n| n.contains(&peer.ip())) {
            return (Some(peer), None);
        }
        match forwarded_for(req) {
            Some(ip) => (
                Some(SocketAddr::new(ip.to_canonical(), 0)),
                Some(ClientAddress::tcp(peer)),
            ),
            None => (Some(peer), None),
        }
    }

    /// A pending permit for a WebSocket session of this connection.
    fn pending_for_session(&self) -> Result<PendingPermit, &'static str> {
        let ip = self.peer.map(|p| p.ip());
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.for_session(ip).map_err(|why| why.limit())
    }

    fn release_pending(&self) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release();
    }

    /// What a session carried by this connection starts from.
    pub(crate) fn carried(
        &self,
        io: BoxedIo,
        carrier: Carrier,
        server_name: Option<String>,
        forwarded_by: Option<ClientAddress>,
    ) -> Carried {
        Carried {
            io,
            carrier,
            tls: self.tls.clone(),
            peer_cert: self.peer_cert.clone(),
            server_name,
            proxy: self.proxy.clone(),
            forwarded_by,
        }
    }
}

/// The last address of the last `X-Forwarded-For` header: the hop the
/// trusted balancer itself appended (earlier ones are the client's say).
fn forwarded_for<B>(req: &Request<B>) -> Option<IpAddr> {
    let last = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .next_back()?;
    let hop = last.to_str().ok()?.rsplit(',').next()?.trim();
    hop_address(hop)
}

/// One `X-Forwarded-For` hop: an address, or one with a port
/// (`203.0.113.9:4711`, `[2001:db8::1]:4711`, `[2001:db8::1]`), as
/// balancers write them.
fn hop_address(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = hop.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    hop.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// Runs one accepted connection of an https listener to completion.
pub(crate) async fn connection(
    io: BoxedIo,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
    info: Arc<ListenerInfo>,
    shared: Arc<Shared>,
    pending: ConnectionPending,
    sessions: TaskTracker,
) {
    let client = peer.map_or_else(ClientAddress::unix, ClientAddress::tcp);
    let span = tracing::info_span!("https", client = %client, listener = %info.name);
    async move {
        let Some((ctx, tls)) = arrive(io, peer, local, info, shared, pending, sessions).await
        else {
            return;
        };
        serve(ctx, tls).await;
    }
    .instrument(span)
    .await
}

/// The PROXY header (when required) and the TLS handshake, each under its
/// deadline. None: the connection ended there (logged).
async fn arrive(
    io: BoxedIo,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
    info: Arc<ListenerInfo>,
    shared: Arc<Shared>,
    mut pending: ConnectionPending,
    sessions: TaskTracker,
) -> Option<(Arc<ConnCtx>, BoxedIo)> {
    let settings = shared.settings();
    let (io, peer, local, proxy) = match info.proxy_protocol {
        ProxyProtocol::Off => (io, peer, local, None),
        ProxyProtocol::Required => {
            let mut conn = ClientConn::new(io);
            let header = conn
                .read_proxy_header(peer, &info.proxy_trusted, settings.timeouts.proxy_header)
                .await
                .inspect_err(|e| debug!(error = %e, "refused the PROXY header"))
                .ok()?;
            let via = peer.map_or_else(ClientAddress::unix, ClientAddress::tcp);
            let source = header.source().map(crate::server::canonical);
            if let (Some(src), Some(permit)) = (source, pending.held_mut()) {
                if !permit.readdress(src.ip()) {
                    debug!("too many unauthenticated connections from the stated address");
                    return None;
                }
            }
            let local = match header.addresses {
                crate::protocol::proxy::Addresses::Tcp { dst, .. } if source.is_some() => {
                    Some(crate::server::canonical(dst))
                }
                _ => local,
            };
            let facts = ProxyFacts {
                via,
                version: header.version,
                command: header.command,
                tlvs: header.tlvs,
            };
            let io: BoxedIo = Box::new(Prefixed::new(std::mem::take(&mut conn.buf), conn.io));
            (io, source.or(peer), local, Some(facts))
        }
    };
    let acceptor = info.acceptor()?.clone();
    let handshake = tokio::time::timeout(settings.timeouts.client_startup, acceptor.accept(io));
    let tls = match handshake.await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            debug!("TLS handshake timed out");
            return None;
        }
    };
    let conn = tls.get_ref().1;
    let tls_info = TlsInfo::from_connection(conn, conn.server_name());
    let peer_cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec());
    let ctx = Arc::new(ConnCtx {
        info,
        shared,
        sessions,
        peer,
        local,
        proxy,
        tls: tls_info,
        peer_cert,
        pending: Mutex::new(pending),
    });
    Some((ctx, Box::new(tls)))
}

/// HTTP/1.1 over the TLS stream until the client closes, a deadline
/// passes, or pgbastion shuts down (then the request in progress is
/// answered and the connection closes; WebSocket sessions already carried
/// away drain like any other session).
async fn serve(ctx: Arc<ConnCtx>, tls: BoxedIo) {
    let settings = &ctx.http().settings;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    let service_ctx = ctx.clone();
    let service = hyper::service::service_fn(move |req| {
        let ctx = service_ctx.clone();
        async move { Ok::<_, Infallible>(respond(&ctx, req).await) }
    });
    let conn = builder
        .serve_connection(TokioIo::new(tls), service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut phase = ctx.shared.shutdown.subscribe();
    let shutting_down = tokio::select! {
        done = conn.as_mut() => {
            if let Err(e) = done {
                debug!(error = %e, "HTTP connection ended");
            }
            false
        }
        _ = phase.wait_for(|p| *p != ShutdownPhase::Running) => true,
    };
    if shutting_down {
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    }
}

/// The most a request's head (request line and headers) may take: hyper
/// answers a longer one with 431. It checks after each read and one read
/// may add up to this much again, so a connection's head buffer stays
/// under about twice this.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Answers one request, with the CORS header its origin gets.
async fn respond(ctx: &Arc<ConnCtx>, req: Request<Incoming>) -> Response<Body> {
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_owned);
    let mut response = if req.method() == Method::OPTIONS {
        preflight()
    } else if let Some(refused) = origin.as_deref().and_then(|o| foreign_origin(ctx, o)) {
        refused
    } else if websocket::is_upgrade_request(&req) {
        upgrade(ctx, req)
    } else if req.uri().path() == "/sql" {
        if req.method() == Method::POST {
            // A request is bounded by http.max_requests and its deadlines
            // from here, not by the pending slots.
            ctx.release_pending();
            super::sql::handler::respond(ctx, req).await
        } else {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "use POST /sql (or a WebSocket upgrade for the Postgres protocol)",
            )
        }
    } else {
        error(
            StatusCode::NOT_FOUND,
            "pgbastion serves POST /sql and WebSocket upgrades (any path) here",
        )
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // No session starts on this connection now: the slot it arrived
        // with is given back (a later upgrade takes a new one).
        ctx.release_pending();
    }
    allow_origin(ctx, &mut response, origin.as_deref());
    response
}

/// Whether the browser brings this listener's identity by itself: a
/// client certificate, or the tailnet the machine is on (`admits_origin`).
fn ambient_identity(ctx: &ConnCtx) -> bool {
    matches!(
        ctx.info.identity,
        ListenerIdentity::ClientCert { .. } | ListenerIdentity::Tailscale
    )
}

/// 403 for a page whose origin `http.cors_origins` does not admit (a
/// request without `Origin` is not a browser page's, and passes).
fn foreign_origin(ctx: &ConnCtx, origin: &str) -> Option<Response<Body>> {
    let ambient = ambient_identity(ctx);
    if ctx.http().settings.admits_origin(origin, ambient) {
        return None;
    }
    debug!(
        origin,
        "refused a request from an origin http.cors_origins does not admit"
    );
    let why = if ambient {
        " (this listener knows clients by what the browser brings, so \"*\" admits no page: name the origin)"
    } else {
        ""
    };
    Some(error(
        StatusCode::FORBIDDEN,
        format!("requests from {origin} are not allowed here: it is not in http.cors_origins{why}"),
    ))
}

/// `Access-Control-Allow-Origin` as `http.cors_origins` allows `origin`.
fn allow_origin(ctx: &ConnCtx, response: &mut Response<Body>, origin: Option<&str>) {
    let ambient = ambient_identity(ctx);
    let Some(allowed) = ctx.http().settings.allowed_origin(origin, ambient) else {
        return;
    };
    let headers = response.headers_mut();
    if allowed != "*" {
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    if let Ok(value) = HeaderValue::from_str(&allowed) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
    }
}

/// The answer to a CORS preflight: which methods and headers a browser
/// may use (the origin is added by `allow_origin`).
fn preflight() -> Response<Body> {
    let mut response = Response::new(Body::default());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(ALLOWED_HEADERS),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    response
}

/// pgbastion's own HTTP error: `{"message": ...}` (the shape of Neon's
/// proxy errors, which the driver shows).
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let body = serde_json::json!({ "message": message.into() }).to_string();
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A WebSocket upgrade: 101 now, and once hyper hands over the stream, a
/// session of its own (on the session tracker, so a drain waits for it).
fn upgrade(ctx: &Arc<ConnCtx>, mut req: Request<Incoming>) -> Response<Body> {
    let Ok(slot) = ctx.http().websockets.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many WebSocket sessions on this listener (http.max_websockets); try again later",
        );
    };
    let pending = match ctx.pending_for_session() {
        Ok(pending) => pending,
        Err(limit) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("too many connections waiting to authenticate ({limit}); try again later"),
            )
        }
    };
    let server_name = match websocket_server_name(&ctx.tls, &req) {
        Ok(name) => name,
        Err(misdirected) => return misdirected.response(),
    };
    let accepted = match websocket::upgrade_response(&req) {
        Ok(accepted) => accepted,
        Err(e) => return e.error_response().map(Body::from),
    };
    let (peer, forwarded_by) = ctx.client_of(&req);
    let on_upgrade = hyper::upgrade::on(&mut req);
    let limits = WsLimits {
        max_message: ctx.http().settings.max_websocket_message,
    };
    let session_ctx = ctx.clone();
    ctx.sessions.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => return debug!(error = %e, "the WebSocket upgrade did not complete"),
        };
        let io: BoxedIo = Box::new(WsStream::new(TokioIo::new(upgraded), limits).await);
        let carried = session_ctx.carried(io, Carrier::WebSocket, server_name, forwarded_by);
        crate::session::handle_carried(
            carried,
            peer,
            session_ctx.local,
            session_ctx.info.clone(),
            session_ctx.shared.clone(),
            Some(pending),
        )
        .await;
        drop(slot);
    });
    accepted.map(|()| Body::default())
}

/// The name a WebSocket session is routed by: the TLS server name, else
/// the `Host` header's (`routing_name`).
fn websocket_server_name<B>(
    tls: &TlsInfo,
    req: &Request<B>,
) -> Result<Option<String>, Misdirected> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(host_name);
    routing_name(tls, host.as_deref(), "the Host header")
}

/// A request naming another server than TLS did: 421.
#[derive(Debug, thiserror::Error)]
#[error("{what} ({host}) names another server than TLS did ({sni})")]
pub(crate) struct Misdirected {
    what: &'static str,
    host: String,
    sni: String,
}

impl Misdirected {
    pub(crate) fn response(&self) -> Response<Body> {
        error(StatusCode::MISDIRECTED_REQUEST, self.to_string())
    }
}

/// The name a carried session is routed by, from the TLS server name and
/// the host the request names (`named`, described by `what`): the TLS
/// name when there is one, else the named host if it is a DNS name (an
/// address routes nothing). A named host other than the TLS one is
/// refused, so a certificate served for one name never carries a session
/// for another.
pub(crate) fn routing_name(
    tls: &TlsInfo,
    named: Option<&str>,
    what: &'static str,
) -> Result<Option<String>, Misdirected> {
    let named = named.filter(|h| !h.is_empty());
    match (tls.sni.as_deref(), named) {
        (Some(sni), Some(host)) if !sni.eq_ignore_ascii_case(host) => Err(Misdirected {
            what,
            host: host.to_owned(),
            sni: sni.to_owned(),
        }),
        (Some(sni), _) => Ok(Some(sni.to_ascii_lowercase())),
        (None, Some(host)) if host.parse::<IpAddr>().is_err() => {
            Ok(Some(host.to_ascii_lowercase()))
        }
        (None, _) => Ok(None),
    }
}

/// The host of a `Host` header value, without its port or IPv6 brackets.
pub(crate) fn host_name(value: &str) -> String {
    let value = value.trim();
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default().to_owned();
    }
    value.split(':').next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_lose_port_and_brackets() {
        assert_eq!(host_name("db.example.com:443"), "db.example.com");
        assert_eq!(host_name("db.example.com"), "db.example.com");
        assert_eq!(host_name("[::1]:8443"), "::1");
        assert_eq!(host_name("127.0.0.1:1"), "127.0.0.1");
    }

    #[test]
    fn routing_names_come_from_tls_or_a_dns_host() {
        let tls = |sni: Option<&str>| TlsInfo {
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_128_GCM_SHA256".into(),
            sni: sni.map(str::to_owned),
            alpn: None,
        };
        let name = |sni, host| routing_name(&tls(sni), host, "host").map_err(|e| e.to_string());
        assert_eq!(
            name(Some("db.example.com"), Some("DB.example.com")),
            Ok(Some("db.example.com".into()))
        );
        assert_eq!(
            name(Some("db.example.com"), None),
            Ok(Some("db.example.com".into()))
        );
        assert_eq!(
            name(Some("db.example.com"), Some("")),
            Ok(Some("db.example.com".into()))
        );
        assert_eq!(
            name(Some("db.example.com"), Some("other.example.com")),
            Err(
                "host (other.example.com) names another server than TLS did (db.example.com)"
                    .into()
            )
        );
        assert!(name(Some("db.example.com"), Some("10.0.0.1")).is_err());
        assert_eq!(
            name(None, Some("Db.Example.com")),
            Ok(Some("db.example.com".into()))
        );
        assert_eq!(name(None, Some("10.0.0.1")), Ok(None));
        assert_eq!(name(None, Some("::1")), Ok(None));
        assert_eq!(name(None, None), Ok(None));
    }

    #[test]
    fn forwarded_for_takes_the_last_hop() {
        let req = Request::builder()
            .header("x-forwarded-for", "203.0.113.9, 198.51.100.7")
            .header("x-forwarded-for", "192.0.2.1, 10.0.0.5")
            .body(())
            .unwrap();
        assert_eq!(forwarded_for(&req), Some("10.0.0.5".parse().unwrap()));
        for (hop, ip) in [
            ("203.0.113.9:4711", "203.0.113.9"),
            ("[2001:db8::1]:4711", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            (" 2001:db8::2 ", "2001:db8::2"),
        ] {
            let req = Request::builder()
                .header("x-forwarded-for", format!("198.51.100.1, {hop}"))
                .body(())
                .unwrap();
            assert_eq!(forwarded_for(&req), Some(ip.parse().unwrap()), "{hop}");
        }
        for junk in ["203.0.113.9:", "[2001:db8::1", "unknown", "_hidden", ""] {
            assert_eq!(hop_address(junk), None, "{junk}");
        }
        let junk = Request::builder()
            .header("x-forwarded-for", "not-an-ip")
            .body(())
            .unwrap();
        assert_eq!(forwarded_for(&junk), None);
    }
}
