//! The WebSocket upgrade (RFC 6455, section 4.2): which requests ask for
//! one, whether a request is a valid one, and the 101 answer. hyper does
//! the HTTP and the connection takeover; this only judges headers, so the
//! router can answer a bad upgrade with a status that says what was wrong
//! instead of a browser's opaque "WebSocket failed".

use base64::Engine;
use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{Method, Request, Response, StatusCode};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// The only WebSocket version there is (RFC 6455).
const VERSION: &str = "13";

/// How much of a header value a client sent is quoted back in an error:
/// enough to recognise it, not enough to fill a log line.
const QUOTE_MAX: usize = 40;

/// Why an upgrade request was refused. Each message is meant for the
/// person reading the client's error: it names the header and the fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("a WebSocket upgrade must be a GET request, not {0}")]
    Method(String),
    #[error("the Connection header must contain the token \"upgrade\" for a WebSocket upgrade")]
    ConnectionNotUpgrade,
    #[error("the Upgrade header must be \"websocket\"")]
    NotWebSocket,
    #[error("Sec-WebSocket-Version is missing; this server speaks version 13")]
    VersionMissing,
    #[error("Sec-WebSocket-Version {0:?} is not supported; this server speaks version 13")]
    VersionUnsupported(String),
    #[error("Sec-WebSocket-Key is missing")]
    KeyMissing,
    #[error("Sec-WebSocket-Key must be the base64 of 16 bytes, given once")]
    KeyInvalid,
}

impl HandshakeError {
    /// The HTTP status for the refusal: 426 Upgrade Required when only the
    /// version is wrong (RFC 6455 says to name the supported version, which
    /// [`Self::error_response`] does), otherwise 400 Bad Request.
    pub fn status(&self) -> StatusCode {
        match self {
            HandshakeError::VersionMissing | HandshakeError::VersionUnsupported(_) => {
                StatusCode::UPGRADE_REQUIRED
            }
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The whole refusal: the status, `Sec-WebSocket-Version: 13` with a
    /// 426, and the message as a plain-text body (the caller maps the body
    /// into its own body type).
    pub fn error_response(&self) -> Response<String> {
        let mut resp = Response::new(format!("{self}\n"));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if self.status() == StatusCode::UPGRADE_REQUIRED {
            headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static(VERSION));
        }
        resp
    }
}

/// Whether the request asks for a WebSocket: its `Upgrade` header names
/// `websocket`. Deliberately loose (any method, any `Connection`), so that
/// a half-right upgrade reaches [`upgrade_response`] and gets an error
/// that names the missing piece rather than being served as SQL over HTTP.
pub fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    has_token(req.headers(), &UPGRADE, "websocket")
}

/// Checks an upgrade request and gives the 101 Switching Protocols answer
/// (without body; the caller then takes the connection over with
/// `hyper::upgrade::on`). A `Sec-WebSocket-Protocol` the client offers is
/// not echoed: no subprotocol is chosen, which the Neon driver (it offers
/// none) expects and which makes a client that insists on one fail at the
/// handshake. Extensions (permessage-deflate) are not accepted either, so
/// frames are never compressed.
pub fn upgrade_response<B>(req: &Request<B>) -> Result<Response<()>, HandshakeError> {
    if req.method() != Method::GET {
        return Err(HandshakeError::Method(quote(
            req.method().as_str().as_bytes(),
        )));
    }
    let headers = req.headers();
    if !has_token(headers, &CONNECTION, "upgrade") {
        return Err(HandshakeError::ConnectionNotUpgrade);
    }
    if !has_token(headers, &UPGRADE, "websocket") {
        return Err(HandshakeError::NotWebSocket);
    }
    check_version(headers)?;
    let key = key(headers)?;
    let accept = HeaderValue::try_from(derive_accept_key(key))
        // Base64 is always a valid header value; were it not, the key
        // that produced it is what is wrong.
        .map_err(|_| HandshakeError::KeyInvalid)?;
    let mut resp = Response::new(());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let out = resp.headers_mut();
    out.insert(UPGRADE, HeaderValue::from_static("websocket"));
    out.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    out.insert(SEC_WEBSOCKET_ACCEPT, accept);
    Ok(resp)
}

fn check_version(headers: &HeaderMap) -> Result<(), HandshakeError> {
    let mut values = headers.get_all(SEC_WEBSOCKET_VERSION).iter();
    match (values.next(), values.next()) {
        (None, _) => Err(HandshakeError::VersionMissing),
        (Some(v), None) if v.as_bytes().trim_ascii() == VERSION.as_bytes() => Ok(()),
        (Some(v), _) => Err(HandshakeError::VersionUnsupported(quote(v.as_bytes()))),
    }
}

/// The `Sec-WebSocket-Key`, exactly one, which must decode to 16 bytes
/// (the accept key is derived from its text, not from the bytes).
fn key(headers: &HeaderMap) -> Result<&[u8], HandshakeError> {
    let mut values = headers.get_all(SEC_WEBSOCKET_KEY).iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return match headers.contains_key(SEC_WEBSOCKET_KEY) {
            true => Err(HandshakeError::KeyInvalid),
            false => Err(HandshakeError::KeyMissing),
        };
    };
    let key = v.as_bytes().trim_ascii();
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(bytes) if bytes.len() == 16 => Ok(key),
        _ => Err(HandshakeError::KeyInvalid),
    }
}

/// Whether any of the header's comma-separated values is `token`, compared
/// case-insensitively (RFC 7230 tokens; `Connection: keep-alive, Upgrade`
/// is what Firefox sends).
fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// A client-sent value for an error message: lossy UTF-8, cut short.
/// Messages print it with `{:?}`, which escapes control characters.
fn quote(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .take(QUOTE_MAX)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> http::request::Builder {
        Request::builder()
            .method("GET")
            .uri("/v2")
            .header("Host", "db.example.com")
            .header("Connection", "keep-alive, Upgrade")
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
    }

    /// The request with `name` removed (when `value` is None) or replaced.
    fn with(name: &str, value: Option<&str>) -> Request<()> {
        let mut req = good().body(()).unwrap();
        req.headers_mut().remove(name);
        if let Some(v) = value {
            req.headers_mut().insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        req
    }

    #[test]
    fn rfc_example_key_gets_its_accept() {
        let req = good().body(()).unwrap();
        assert!(is_upgrade_request(&req));
        let resp = upgrade_response(&req).unwrap();
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        let h = resp.headers();
        assert_eq!(h["sec-websocket-accept"], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "Upgrade");
        assert!(!h.contains_key("sec-websocket-protocol"));
    }

    #[test]
    fn tokens_are_case_insensitive_and_protocols_are_not_chosen() {
        let req = good()
            .header("Sec-WebSocket-Protocol", "chat, superchat")
            .header("Sec-WebSocket-Extensions", "permessage-deflate")
            .body(())
            .unwrap();
        let mut req = req;
        let h = req.headers_mut();
        h.insert("connection", HeaderValue::from_static("UPGRADE"));
        h.insert("upgrade", HeaderValue::from_static("WebSocket"));
        let resp = upgrade_response(&req).unwrap();
        assert!(!resp.headers().contains_key("sec-websocket-protocol"));
        assert!(!resp.headers().contains_key("sec-websocket-extensions"));
    }

    #[test]
    fn connection_token_in_a_second_header_counts() {
        let mut req = with("connection", Some("keep-alive"));
        req.headers_mut()
            .append("connection", HeaderValue::from_static("upgrade"));
        assert!(upgrade_response(&req).is_ok());
    }

    #[test]
    fn is_upgrade_request_only_needs_upgrade_websocket() {
        assert!(!is_upgrade_request(&with("upgrade", None)));
        assert!(!is_upgrade_request(&with("upgrade", Some("h2c"))));
        assert!(is_upgrade_request(&with("connection", None)));
        let post = good().method("POST").body(()).unwrap();
        assert!(is_upgrade_request(&post));
        assert!(!is_upgrade_request(&Request::get("/sql").body(()).unwrap()));
    }

    fn refused(req: &Request<()>) -> HandshakeError {
        upgrade_response(req).unwrap_err()
    }

    #[test]
    fn each_bad_header_has_its_error_and_status() {
        let bad = StatusCode::BAD_REQUEST;
        let cases: Vec<(Request<()>, HandshakeError, StatusCode)> = vec![
            (
                good().method("POST").body(()).unwrap(),
                HandshakeError::Method("POST".into()),
                bad,
            ),
            (
                with("connection", None),
                HandshakeError::ConnectionNotUpgrade,
                bad,
            ),
            (
                with("connection", Some("keep-alive")),
                HandshakeError::ConnectionNotUpgrade,
                bad,
            ),
            (with("upgrade", None), HandshakeError::NotWebSocket, bad),
            (
                with("upgrade", Some("h2c")),
                HandshakeError::NotWebSocket,
                bad,
            ),
            (
                with("sec-websocket-key", None),
                HandshakeError::KeyMissing,
                bad,
            ),
            (
                with("sec-websocket-key", Some("not base64!")),
                HandshakeError::KeyInvalid,
                bad,
            ),
            (
                with("sec-websocket-key", Some("AAAA")),
                HandshakeError::KeyInvalid,
                bad,
            ),
        ];
        for (req, err, status) in cases {
            let got = refused(&req);
            assert_eq!(got, err);
            assert_eq!(got.status(), status, "{got}");
            let resp = got.error_response();
            assert_eq!(resp.status(), status);
            assert!(!resp.headers().contains_key("sec-websocket-version"));
            assert_eq!(resp.body(), &format!("{got}\n"));
        }
    }

    #[test]
    fn two_keys_are_refused() {
        let mut req = good().body(()).unwrap();
        req.headers_mut().append(
            "sec-websocket-key",
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert_eq!(refused(&req), HandshakeError::KeyInvalid);
    }

    #[test]
    fn wrong_version_is_426_naming_13() {
        for (req, err) in [
            (
                with("sec-websocket-version", None),
                HandshakeError::VersionMissing,
            ),
            (
                with("sec-websocket-version", Some("8")),
                HandshakeError::VersionUnsupported("8".into()),
            ),
        ] {
            let got = refused(&req);
            assert_eq!(got, err);
            assert_eq!(got.status(), StatusCode::UPGRADE_REQUIRED);
            let resp = got.error_response();
            assert_eq!(resp.status(), StatusCode::UPGRADE_REQUIRED);
            assert_eq!(resp.headers()["sec-websocket-version"], "13");
        }
    }

    #[test]
    fn quoted_values_are_cut_and_escaped() {
        let long = "9".repeat(200);
        let got = refused(&with("sec-websocket-version", Some(&long)));
        assert!(got.to_string().len() < 120, "{got}");
        let got = refused(&with("sec-websocket-version", Some("1\t3")));
        assert!(got.to_string().contains(r#""1\t3""#), "{got}");
    }
}
