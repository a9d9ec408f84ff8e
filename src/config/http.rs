//! `protocol = "https"` and its `[listener.http]` table: the limits of a
//! listener that serves serverless and edge clients over WebSocket and SQL
//! over HTTP (issue 23). Owns the settings, their secure defaults and the
//! checks that refuse an https listener pgbastion could not serve safely.

use std::time::Duration;

use serde::Deserialize;

use super::error::{ConfigError, Section};

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocolName {
    /// The PostgreSQL wire protocol (SSLRequest, direct TLS, plaintext).
    #[default]
    Postgres,
    /// HTTPS: the Postgres byte stream in WebSocket frames, and SQL over
    /// HTTP (`POST /sql`), both inside TLS with pgbastion's certificate.
    Https,
}

/// A listener's protocol with what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerProtocol {
    Postgres,
    Https(HttpSettings),
}

/// `[listener.http]`: every bound on what one https listener holds for its
/// clients. The defaults follow Neon's proxy where it has one (10 MiB for a
/// request and a response) and are small enough that a flood of slow or
/// huge requests is bounded in memory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Open WebSocket sessions at once; one more is answered 503.
    pub max_websockets: usize,
    /// SQL-over-HTTP requests running at once; one more is answered 503.
    pub max_requests: usize,
    /// The largest `POST /sql` body; a larger one is answered 413.
    pub max_request_bytes: usize,
    /// The largest JSON response; a query whose rows would exceed it is
    /// answered 507 (nothing partial is sent).
    pub max_response_bytes: usize,
    /// The largest WebSocket message (the driver sends one per batch of
    /// writes); a larger one ends the connection.
    pub max_websocket_message: usize,
    /// A request's header must arrive within this (slowloris), counted
    /// from the connection or the end of the previous response.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// The body of a `POST /sql` must arrive within this.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// A SQL-over-HTTP request (login, queries, commit) must complete within
    /// this; past it the query is cancelled and the client gets 504 with
    /// SQLSTATE 57014.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// `Access-Control-Allow-Origin` for browsers: `["*"]` (the default,
    /// as Neon: requests carry their own credentials, never cookies) or
    /// the origins allowed; empty: no CORS headers, so browsers refuse.
    pub cors_origins: Vec<String>,
    /// Peers whose `X-Forwarded-For` header is believed (the last address
    /// in it is the client). Empty (default): the header is ignored, so no
    /// client can choose the address policy and audit see. Behind a
    /// balancer, prefer `proxy_protocol = "required"`.
    pub forwarded_for_trusted: Vec<ipnet::IpNet>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        const MIB: usize = 1024 * 1024;
        HttpSettings {
            max_websockets: 1000,
            max_requests: 256,
            max_request_bytes: 10 * MIB,
            max_response_bytes: 10 * MIB,
            max_websocket_message: 8 * MIB,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            cors_origins: vec!["*".into()],
            forwarded_for_trusted: Vec::new(),
        }
    }
}

impl HttpSettings {
    /// Refuses zeros (a listener that serves nothing or never times out)
    /// and origins a browser would never send.
    pub(super) fn check(&self, at: &Section) -> Result<(), ConfigError> {
        let positive = [
            ("http.max_websockets", self.max_websockets),
            ("http.max_requests", self.max_requests),
            ("http.max_request_bytes", self.max_request_bytes),
            ("http.max_response_bytes", self.max_response_bytes),
            ("http.max_websocket_message", self.max_websocket_message),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(at.key(key).invalid("must be at least 1"));
            }
        }
        if self.max_websocket_message < 64 * 1024 {
            return Err(at.key("http.max_websocket_message").invalid(
                "must be at least 64 KiB (65536): the driver sends a whole batch of messages in one",
            ));
        }
        let deadlines = [
            ("http.header_timeout", self.header_timeout),
            ("http.body_timeout", self.body_timeout),
            ("http.request_timeout", self.request_timeout),
        ];
        for (key, value) in deadlines {
            if value.is_zero() {
                return Err(at.key(key).invalid("must be longer than 0s"));
            }
        }
        for origin in &self.cors_origins {
            if origin != "*" && !(origin.starts_with("https://") || origin.starts_with("http://")) {
                return Err(at.key("http.cors_origins").invalid(format!(
                    "{origin:?} is not an origin: use \"*\" or \"https://app.example.com\""
                )));
            }
        }
        Ok(())
    }

    /// Whether a browser page at `origin` may use the listener (open a
    /// WebSocket, send `POST /sql`). Browsers do not apply CORS to
    /// WebSockets, so this check is the only thing between any web page
    /// and the listener. Where the listener knows clients by what the
    /// browser attaches on its own (`ambient`: a client certificate, the
    /// tailnet the machine is on), a page from anywhere would act with the
    /// user's identity, so `"*"` does not count there: only origins listed
    /// by name are admitted.
    pub fn admits_origin(&self, origin: &str, ambient: bool) -> bool {
        self.cors_origins
            .iter()
            .any(|o| (o == "*" && !ambient) || (o != "*" && o.eq_ignore_ascii_case(origin)))
    }

    /// The `Access-Control-Allow-Origin` value for a request from
    /// `origin` (None: no CORS headers), by the rule of `admits_origin`.
    pub fn allowed_origin(&self, origin: Option<&str>, ambient: bool) -> Option<String> {
        let wildcard = self.cors_origins.iter().any(|o| o == "*");
        if wildcard && !ambient {
            return Some("*".into());
        }
        let origin = origin?;
        self.admits_origin(origin, ambient)
            .then(|| origin.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_and_zeros_are_refused() {
        let at = Section::Listener("web".into());
        assert!(HttpSettings::default().check(&at).is_ok());
        let zero = HttpSettings {
            max_requests: 0,
            ..HttpSettings::default()
        };
        let err = zero.check(&at).unwrap_err().to_string();
        assert!(err.contains("http.max_requests"), "{err}");
        let never = HttpSettings {
            request_timeout: Duration::ZERO,
            ..HttpSettings::default()
        };
        assert!(never.check(&at).is_err());
        let bad_origin = HttpSettings {
            cors_origins: vec!["app.example.com".into()],
            ..HttpSettings::default()
        };
        let err = bad_origin.check(&at).unwrap_err().to_string();
        assert!(err.contains("not an origin"), "{err}");
    }

    #[test]
    fn origins_are_echoed_only_when_listed() {
        let any = HttpSettings::default();
        assert_eq!(any.allowed_origin(None, false).as_deref(), Some("*"));
        assert!(any.admits_origin("https://anywhere.example", false));
        let listed = HttpSettings {
            cors_origins: vec!["https://app.example.com".into()],
            ..HttpSettings::default()
        };
        for ambient in [false, true] {
            assert_eq!(
                listed
                    .allowed_origin(Some("https://APP.example.com"), ambient)
                    .as_deref(),
                Some("https://APP.example.com")
            );
            assert!(listed.admits_origin("https://app.example.com", ambient));
            assert!(!listed.admits_origin("https://evil.example", ambient));
            assert_eq!(
                listed.allowed_origin(Some("https://evil.example"), ambient),
                None
            );
            assert_eq!(listed.allowed_origin(None, ambient), None);
        }
        let none = HttpSettings {
            cors_origins: vec![],
            ..HttpSettings::default()
        };
        assert_eq!(none.allowed_origin(Some("https://a.example"), false), None);
        assert!(!none.admits_origin("https://a.example", false));
    }

    /// Where the browser brings the identity (a client certificate, the
    /// tailnet), "*" admits no page: only origins named.
    #[test]
    fn a_wildcard_does_not_lend_ambient_identity() {
        let any = HttpSettings::default();
        assert!(!any.admits_origin("https://evil.example", true));
        assert_eq!(any.allowed_origin(Some("https://evil.example"), true), None);
        let both = HttpSettings {
            cors_origins: vec!["*".into(), "https://app.example.com".into()],
            ..HttpSettings::default()
        };
        assert!(both.admits_origin("https://app.example.com", true));
        assert!(!both.admits_origin("https://evil.example", true));
        assert_eq!(both.allowed_origin(None, false).as_deref(), Some("*"));
    }
}
