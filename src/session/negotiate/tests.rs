//! Unit tests of the negotiation over `tokio::io::duplex` (as Neon's
//! proxy tests do): every protocol rule of the client's first packets that
//! needs no PostgreSQL. The integration tests (tests/it/proxy.rs,
//! proxy_protocol.rs) cover the same rules end to end with the audit.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::TlsConnector;

use crate::tls::TlsAcceptor;

use super::*;
use crate::protocol::startup::{ProtocolVersion, CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE};

/// A client leg over an in-memory pipe, and the client's end of it.
fn pair() -> (ClientConn, DuplexStream) {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    (ClientConn::new(Box::new(ours)), theirs)
}

fn startup(user: &str) -> StartupMessage {
    StartupMessage::new(
        ProtocolVersion { major: 3, minor: 0 },
        vec![
            ("user".into(), user.into()),
            ("database".into(), "postgres".into()),
        ],
    )
}

fn packet(code: u32) -> Vec<u8> {
    [8u32.to_be_bytes(), code.to_be_bytes()].concat()
}

/// The SQLSTATE the client would be told.
fn sqlstate(err: &SessionError) -> Option<String> {
    err.client_error().map(|e| e.encode()).and_then(|b| {
        crate::protocol::message::ErrorFields::parse(&b[5..])
            .ok()
            .map(|f| f.code)
    })
}

/// A TLS acceptor with a fresh certificate for "localhost", and a client
/// config that trusts it and offers `alpn`.
fn tls(alpn: &[&[u8]]) -> (TlsAcceptor, TlsConnector, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::dev::certs::Ca::new("test CA").unwrap();
    let (cert, key) = ca
        .server_cert(&["localhost"])
        .unwrap()
        .write(dir.path(), "server")
        .unwrap();
    let ca_file = ca.write_cert(dir.path(), "ca").unwrap();
    let cfg = crate::config::ClientTlsConfig {
        cert,
        key,
        min_version: crate::config::TlsVersion::default(),
        sni: Vec::new(),
    };
    let served = crate::tls::ServerCert::load(&cfg)
        .unwrap()
        .acceptor(cfg.min_version, None)
        .unwrap();
    let acceptor = served.acceptor().clone();
    let mut roots = rustls::RootCertStore::empty();
    for c in crate::tls::load_certs(&ca_file, "CA").unwrap() {
        roots.add(c).unwrap();
    }
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    client.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    (acceptor, TlsConnector::from(Arc::new(client)), dir)
}

#[tokio::test]
async fn plaintext_startup_on_an_allow_listener() {
    let (mut conn, mut client) = pair();
    client.write_all(startup("alice").as_bytes()).await.unwrap();
    match conn.negotiate(None, ClientTlsMode::Allow).await.unwrap() {
        Negotiated::Startup(m) => assert_eq!(m.user(), "alice"),
        other => panic!("{other:?}"),
    }
    assert!(!conn.is_tls());
}

#[tokio::test]
async fn plaintext_startup_refused_when_tls_is_required() {
    let (mut conn, mut client) = pair();
    client.write_all(startup("alice").as_bytes()).await.unwrap();
    let err = conn
        .negotiate(None, ClientTlsMode::Require)
        .await
        .unwrap_err();
    assert!(matches!(err, SessionError::TlsRequired), "{err}");
    assert_eq!(err.reason().as_str(), "tls_required");
    assert_eq!(sqlstate(&err).as_deref(), Some("28000"));
}

#[tokio::test]
async fn sslrequest_without_a_certificate_is_answered_n() {
    let (mut conn, mut client) = pair();
    client.write_all(&startup::ssl_request()).await.unwrap();
    let negotiating = tokio::spawn(async move {
        let r = conn.negotiate(None, ClientTlsMode::Allow).await;
        (r, conn)
    });
    assert_eq!(client.read_u8().await.unwrap(), b'N');
    client.write_all(startup("bob").as_bytes()).await.unwrap();
    let (r, _) = negotiating.await.unwrap();
    assert!(matches!(r.unwrap(), Negotiated::Startup(m) if m.user() == "bob"));
}

/// CVE-2021-23214: bytes behind an SSLRequest were sent before TLS.
#[tokio::test]
async fn bytes_pipelined_after_sslrequest_are_refused() {
    let (acceptor, _, _dir) = tls(&[]);
    let (mut conn, mut client) = pair();
    let mut bytes = startup::ssl_request().to_vec();
    bytes.extend_from_slice(startup("mallory").as_bytes());
    client.write_all(&bytes).await.unwrap();
    let err = conn
        .negotiate(Some(&acceptor), ClientTlsMode::Require)
        .await
        .unwrap_err();
    assert!(
        matches!(err, SessionError::PipelinedAfterSslRequest),
        "{err}"
    );
    assert_eq!(err.reason().as_str(), "pipelined_after_sslrequest");
    assert_eq!(sqlstate(&err).as_deref(), Some("08P01"));
    // Nothing was answered: no 'S', no handshake.
    drop(conn);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn gssencrequest_is_answered_n_once_then_sslrequest_works() {
    let (acceptor, connector, _dir) = tls(&[]);
    let (mut conn, mut client) = pair();
    let negotiating = tokio::spawn(async move {
        let r = conn
            .negotiate(Some(&acceptor), ClientTlsMode::Require)
            .await;
        (r, conn)
    });
    client
        .write_all(&packet(GSSENC_REQUEST_CODE))
        .await
        .unwrap();
    assert_eq!(client.read_u8().await.unwrap(), b'N');
    client.write_all(&startup::ssl_request()).await.unwrap();
    assert_eq!(client.read_u8().await.unwrap(), b'S');
    let mut tls = connector
        .connect("localhost".try_into().unwrap(), client)
        .await
        .unwrap();
    tls.write_all(startup("carol").as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let (r, conn) = negotiating.await.unwrap();
    assert!(matches!(r.unwrap(), Negotiated::Startup(m) if m.user() == "carol"));
    assert!(conn.is_tls());
}

#[tokio::test]
async fn a_second_gssencrequest_is_a_protocol_violation() {
    let (mut conn, mut client) = pair();
    let two = [packet(GSSENC_REQUEST_CODE), packet(GSSENC_REQUEST_CODE)].concat();
    client.write_all(&two).await.unwrap();
    let err = conn
        .negotiate(None, ClientTlsMode::Allow)
        .await
        .unwrap_err();
    assert!(
        matches!(err, SessionError::UnexpectedPacket("GSSENCRequest")),
        "{err}"
    );
    assert_eq!(sqlstate(&err).as_deref(), Some("08P01"));
}

#[tokio::test]
async fn direct_tls_with_alpn_postgresql_is_accepted() {
    let (acceptor, connector, _dir) = tls(&[ALPN_POSTGRESQL]);
    let (mut conn, client) = pair();
    let negotiating = tokio::spawn(async move {
        let r = conn
            .negotiate(Some(&acceptor), ClientTlsMode::Require)
            .await;
        (r, conn)
    });
    let mut tls = connector
        .connect("localhost".try_into().unwrap(), client)
        .await
        .unwrap();
    tls.write_all(startup("dave").as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let (r, conn) = negotiating.await.unwrap();
    assert!(matches!(r.unwrap(), Negotiated::Startup(m) if m.user() == "dave"));
    assert!(conn.is_tls());
}

#[tokio::test]
async fn direct_tls_without_alpn_is_refused() {
    let (acceptor, connector, _dir) = tls(&[]);
    let (mut conn, client) = pair();
    let negotiating = tokio::spawn(async move {
        conn.negotiate(Some(&acceptor), ClientTlsMode::Require)
            .await
            .map(|_| ())
    });
    let _tls = connector
        .connect("localhost".try_into().unwrap(), client)
        .await
        .unwrap();
    let err = negotiating.await.unwrap().unwrap_err();
    assert!(matches!(err, SessionError::DirectTlsWithoutAlpn), "{err}");
    assert_eq!(sqlstate(&err).as_deref(), Some("08P01"));
}

#[tokio::test]
async fn direct_tls_without_a_certificate_is_refused_silently() {
    let (mut conn, mut client) = pair();
    client
        .write_all(&[startup::TLS_HANDSHAKE_RECORD, 3, 1, 0, 5])
        .await
        .unwrap();
    let err = conn
        .negotiate(None, ClientTlsMode::Allow)
        .await
        .unwrap_err();
    assert!(matches!(err, SessionError::TlsUnavailable), "{err}");
    assert_eq!(err.client_message(), None);
}

/// Lengths no Postgres packet has: closed without a word, as PostgreSQL
/// does (issue 19 item 28).
#[tokio::test]
async fn impossible_startup_lengths_are_closed_without_a_word() {
    let cases: [(&str, Vec<u8>); 4] = [
        ("too short", 4u32.to_be_bytes().to_vec()),
        ("over 10000", 10_001u32.to_be_bytes().to_vec()),
        ("absurd", u32::MAX.to_be_bytes().to_vec()),
        ("node-postgres Terminate first", vec![b'X', 0, 0, 0, 4]),
    ];
    for (name, bytes) in cases {
        let (mut conn, mut client) = pair();
        client.write_all(&bytes).await.unwrap();
        let err = conn
            .negotiate(None, ClientTlsMode::Allow)
            .await
            .unwrap_err();
        assert!(matches!(err, SessionError::Startup(_)), "{name}: {err}");
        assert_eq!(err.reason().as_str(), "bad_startup_packet", "{name}");
        assert_eq!(err.client_message(), None, "{name}");
    }
}

#[tokio::test]
async fn postgres_shaped_bad_packets_get_08p01() {
    let cases: [(&str, Vec<u8>); 3] = [
        ("unknown code", packet(1234 << 16 | 9999)),
        (
            "protocol 2",
            [
                9u32.to_be_bytes().to_vec(),
                (2u32 << 16).to_be_bytes().to_vec(),
                vec![0],
            ]
            .concat(),
        ),
        (
            "no user",
            [
                9u32.to_be_bytes().to_vec(),
                (3u32 << 16).to_be_bytes().to_vec(),
                vec![0],
            ]
            .concat(),
        ),
    ];
    for (name, bytes) in cases {
        let (mut conn, mut client) = pair();
        client.write_all(&bytes).await.unwrap();
        let err = conn
            .negotiate(None, ClientTlsMode::Allow)
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("08P01"), "{name}: {err}");
    }
}

#[tokio::test]
async fn a_client_that_closes_first_is_not_an_error_to_tell() {
    let (mut conn, client) = pair();
    drop(client);
    let err = conn
        .negotiate(None, ClientTlsMode::Allow)
        .await
        .unwrap_err();
    assert!(matches!(err, SessionError::ClientClosedEarly), "{err}");
    assert_eq!(err.client_message(), None);
}

/// A length that promises more than arrives, or a trickle: the startup
/// deadline ends it with 08006.
#[tokio::test]
async fn the_startup_deadline_ends_a_stalled_client() {
    let (mut conn, mut client) = pair();
    client.write_all(&100u32.to_be_bytes()).await.unwrap();
    client.write_all(&(3u32 << 16).to_be_bytes()).await.unwrap();
    let limit = Duration::from_millis(100);
    let err = conn
        .negotiate_within(None, ClientTlsMode::Allow, limit)
        .await
        .unwrap_err();
    assert!(
        matches!(err, SessionError::ClientTimeout(d) if d == limit),
        "{err}"
    );
    assert_eq!(err.reason().as_str(), "client_timeout");
    assert_eq!(sqlstate(&err).as_deref(), Some("08006"));
}

#[tokio::test]
async fn cancel_request_shapes() {
    // A CancelRequest (protocol 3.0: a 4-byte key).
    let (mut conn, mut client) = pair();
    let cancel = [
        16u32.to_be_bytes(),
        CANCEL_REQUEST_CODE.to_be_bytes(),
        7u32.to_be_bytes(),
        42u32.to_be_bytes(),
    ]
    .concat();
    client.write_all(&cancel).await.unwrap();
    assert!(matches!(
        conn.negotiate(None, ClientTlsMode::Require).await.unwrap(),
        Negotiated::Cancel(_)
    ));
    // A cancel too short to carry a key is a bad packet.
    let (mut conn, mut client) = pair();
    client
        .write_all(&packet(CANCEL_REQUEST_CODE))
        .await
        .unwrap();
    let err = conn
        .negotiate(None, ClientTlsMode::Allow)
        .await
        .unwrap_err();
    assert!(matches!(err, SessionError::Startup(_)), "{err}");
}

#[tokio::test]
async fn proxy_header_from_an_untrusted_source_is_refused_before_reading() {
    let (mut conn, _client) = pair();
    let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
    let err = conn
        .read_proxy_header(
            Some("192.0.2.1:5000".parse().unwrap()),
            &trusted,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, SessionError::ProxyUntrusted(_)), "{err}");
    assert_eq!(err.client_message(), None);
}

#[tokio::test]
async fn proxy_header_then_startup_in_one_write() {
    let (mut conn, mut client) = pair();
    let src: SocketAddr = "198.51.100.4:5555".parse().unwrap();
    let mut bytes = proxy::encode_v1(Some(src), Some("127.0.0.1:6432".parse().unwrap()));
    bytes.extend_from_slice(startup("erin").as_bytes());
    client.write_all(&bytes).await.unwrap();
    let trusted: Vec<ipnet::IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
    let header = conn
        .read_proxy_header(
            Some("127.0.0.1:40000".parse().unwrap()),
            &trusted,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(header.source(), Some(src));
    // The bytes after the header are the Postgres negotiation's.
    assert!(matches!(
        conn.negotiate(None, ClientTlsMode::Allow).await.unwrap(),
        Negotiated::Startup(m) if m.user() == "erin"
    ));
}

#[tokio::test]
async fn no_proxy_header_is_told_bad_headers_are_not() {
    let trusted: Vec<ipnet::IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
    let from = Some("127.0.0.1:40000".parse().unwrap());
    // A Postgres client that went around the balancer is told.
    let (mut conn, mut client) = pair();
    client.write_all(&startup::ssl_request()).await.unwrap();
    let err = conn
        .read_proxy_header(from, &trusted, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("08P01"), "{err}");
    // A v1 line with no CRLF within 107 bytes: closed without a word.
    let (mut conn, mut client) = pair();
    let mut long = b"PROXY TCP4 ".to_vec();
    long.resize(120, b'1');
    client.write_all(&long).await.unwrap();
    let err = conn
        .read_proxy_header(from, &trusted, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(err.reason().as_str(), "bad_proxy_header");
    assert_eq!(err.client_message(), None);
}

#[tokio::test]
async fn half_a_proxy_header_ends_at_its_deadline() {
    let (mut conn, mut client) = pair();
    let good = proxy::encode_v2(Some("192.0.2.10:40000".parse().unwrap()), None, &[]);
    client.write_all(&good[..10]).await.unwrap();
    let err = conn
        .read_proxy_header(None, &[], Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(err, SessionError::ProxyTimeout(_)), "{err}");
    assert_eq!(err.client_message(), None);
}
