//! The tailnet identity of a peer, from the local tailscaled's LocalAPI:
//! `GET /localapi/v0/whois?addr=IP:PORT` over its Unix socket.
//!
//! Fail closed: if tailscaled is down, slow, does not know the peer, or
//! answers something unusable, the connection is refused. The HTTP exchange
//! is HTTP/1.0 (one request, the body ends with the connection), which keeps
//! the client small; the parsing is a pure function, tested on its own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Identity, IdentityError, IdentitySource};

/// The Host tailscaled expects on its LocalAPI socket.
const LOCALAPI_HOST: &str = "local-tailscaled.sock";
/// The largest WhoIs answer accepted (a node with a large CapMap is a few
/// KiB).
const MAX_RESPONSE: u64 = 1 << 20;

/// Where to ask, and which peer capability carries pgbastion's grants.
#[derive(Debug, Clone)]
pub struct WhoIsClient {
    pub socket: PathBuf,
    pub capability: Option<String>,
    pub timeout: Duration,
}

/// The parts of tailscale's `apitype.WhoIsResponse` pgbastion reads.
#[derive(Debug, Deserialize)]
struct WhoIsResponse {
    #[serde(rename = "Node")]
    node: Option<Node>,
    #[serde(rename = "UserProfile")]
    user: Option<UserProfile>,
    #[serde(rename = "CapMap", default)]
    cap_map: Option<HashMap<String, Vec<serde_json::Value>>>,
}

#[derive(Debug, Deserialize)]
struct Node {
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "Tags", default)]
    tags: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct UserProfile {
    #[serde(rename = "LoginName", default)]
    login_name: String,
}

impl WhoIsClient {
    pub async fn whois(&self, peer: SocketAddr) -> Result<Identity, IdentityError> {
        let raw = match tokio::time::timeout(self.timeout, self.request(peer)).await {
            Ok(r) => r?,
            Err(_) => return Err(IdentityError::LocalApiTimeout(self.timeout)),
        };
        identity_from_response(&raw, peer, self.capability.as_deref())
    }

    async fn request(&self, peer: SocketAddr) -> Result<Vec<u8>, IdentityError> {
        let unreachable = |e: std::io::Error| IdentityError::LocalApiUnreachable {
            socket: self.socket.display().to_string(),
            reason: e.to_string(),
        };
        let mut stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(unreachable)?;
        let request = format!(
            "GET /localapi/v0/whois?addr={} HTTP/1.0\r\nHost: {LOCALAPI_HOST}\r\nSec-Tailscale: localapi\r\nConnection: close\r\n\r\n",
            query_escape(&peer.to_string())
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(unreachable)?;
        let mut raw = Vec::new();
        stream
            .take(MAX_RESPONSE + 1)
            .read_to_end(&mut raw)
            .await
            .map_err(unreachable)?;
        if raw.len() as u64 > MAX_RESPONSE {
            return Err(IdentityError::BadWhoIs(
                "the answer is larger than 1 MiB".into(),
            ));
        }
        Ok(raw)
    }
}

/// Percent-encodes everything but unreserved characters.
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Splits an HTTP/1.x response into status and body. The body is what
/// follows the headers, cut to Content-Length when one is given.
fn parse_http(raw: &[u8]) -> Result<(u16, &[u8]), IdentityError> {
    let bad = |m: &str| IdentityError::BadWhoIs(m.to_owned());
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of HTTP headers"))?;
    let head =
        std::str::from_utf8(&raw[..head_end]).map_err(|_| bad("HTTP headers are not text"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    match parts.next() {
        Some(v) if v.starts_with("HTTP/1.") => {}
        _ => return Err(bad("not an HTTP/1.x response")),
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no HTTP status"))?;
    let mut body = &raw[head_end + 4..];
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                let len: usize = v.trim().parse().map_err(|_| bad("bad Content-Length"))?;
                body = body
                    .get(..len)
                    .ok_or_else(|| bad("body shorter than Content-Length"))?;
            }
        }
    }
    Ok((status, body))
}

/// Turns a raw LocalAPI answer into an identity, refusing anything that
/// does not name a peer.
pub fn identity_from_response(
    raw: &[u8],
    peer: SocketAddr,
    capability: Option<&str>,
) -> Result<Identity, IdentityError> {
    let (status, body) = parse_http(raw)?;
    match status {
        200 => {}
        404 => return Err(IdentityError::UnknownPeer(peer.to_string())),
        other => {
            return Err(IdentityError::LocalApiStatus {
                status: other,
                body: String::from_utf8_lossy(&body[..body.len().min(200)])
                    .trim()
                    .to_owned(),
            })
        }
    }
    let who: WhoIsResponse =
        serde_json::from_slice(body).map_err(|e| IdentityError::BadWhoIs(e.to_string()))?;
    let node = who
        .node
        .ok_or_else(|| IdentityError::BadWhoIs("no Node".into()))?;
    let tags = node.tags.unwrap_or_default();
    let login = who.user.map(|u| u.login_name).unwrap_or_default();
    // Tagged nodes have no human owner (their profile is a placeholder
    // like "tagged-devices"): they are known by their tags.
    let name = if !tags.is_empty() {
        tags.join(",")
    } else {
        login
    };
    if name.is_empty() {
        return Err(IdentityError::BadWhoIs(
            "neither a login name nor tags".into(),
        ));
    }
    let grants = match (capability, who.cap_map) {
        (Some(cap), Some(mut map)) => map.remove(cap).unwrap_or_default(),
        _ => Vec::new(),
    };
    Ok(Identity {
        source: IdentitySource::Tailscale,
        name,
        node: Some(node.name.trim_end_matches('.').to_owned()).filter(|n| !n.is_empty()),
        tags,
        cert_names: Vec::new(),
        grants,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn peer() -> SocketAddr {
        "100.64.0.7:41000".parse().unwrap()
    }

    fn ok(body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    const USER: &str = r#"{"Node":{"ID":1,"StableID":"n1","Name":"laptop.tail-scale.ts.net.","Tags":null,"Addresses":["100.64.0.7/32"]},
        "UserProfile":{"ID":9,"LoginName":"alice@example.com","DisplayName":"Alice"},
        "CapMap":{"example.com/cap/pgbastion":[{"databases":["app"],"users":["app_ro"]}],"other/cap":[true]}}"#;

    #[test]
    fn user_node_with_grants() {
        let id =
            identity_from_response(&ok(USER), peer(), Some("example.com/cap/pgbastion")).unwrap();
        assert_eq!(id.source, IdentitySource::Tailscale);
        assert_eq!(id.name, "alice@example.com");
        assert_eq!(id.node.as_deref(), Some("laptop.tail-scale.ts.net"));
        assert!(id.tags.is_empty());
        assert_eq!(
            id.grants,
            vec![serde_json::json!({"databases":["app"],"users":["app_ro"]})]
        );
        let no_cap = identity_from_response(&ok(USER), peer(), None).unwrap();
        assert!(no_cap.grants.is_empty());
    }

    #[test]
    fn tagged_node_is_known_by_its_tags() {
        let body = r#"{"Node":{"Name":"ci-runner.ts.net.","Tags":["tag:ci","tag:db"]},"UserProfile":{"LoginName":"tagged-devices"}}"#;
        let id = identity_from_response(&ok(body), peer(), None).unwrap();
        assert_eq!(id.name, "tag:ci,tag:db");
        assert_eq!(id.tags, vec!["tag:ci", "tag:db"]);
    }

    #[test]
    fn refusals() {
        let not_found = b"HTTP/1.0 404 Not Found\r\n\r\nno match for IP:port\n";
        assert!(matches!(
            identity_from_response(not_found, peer(), None),
            Err(IdentityError::UnknownPeer(_))
        ));
        let forbidden = b"HTTP/1.0 403 Forbidden\r\n\r\nlocalapi access denied\n";
        assert!(matches!(
            identity_from_response(forbidden, peer(), None),
            Err(IdentityError::LocalApiStatus { status: 403, .. })
        ));
        for body in [
            "{}",
            r#"{"Node":{"Name":"x"},"UserProfile":{"LoginName":""}}"#,
            "not json",
            "null",
        ] {
            assert!(
                identity_from_response(&ok(body), peer(), None).is_err(),
                "{body}"
            );
        }
        assert!(identity_from_response(b"garbage", peer(), None).is_err());
        assert!(identity_from_response(
            b"HTTP/1.0 200 OK\r\nContent-Length: 99\r\n\r\n{}",
            peer(),
            None
        )
        .is_err());
    }

    #[test]
    fn addresses_are_escaped() {
        assert_eq!(query_escape("100.64.0.7:41000"), "100.64.0.7%3A41000");
        assert_eq!(query_escape("[fd7a::1]:5"), "%5Bfd7a%3A%3A1%5D%3A5");
    }

    proptest! {
        #[test]
        fn arbitrary_answers_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = identity_from_response(&raw, peer(), Some("c"));
        }
    }
}
