//! `TlsStream` against tokio-rustls as the peer, over sockets that cut
//! every read and write short at random and block at random: bytes arrive
//! whole and in order whatever the cuts, both TLS versions, both roles;
//! key updates both ways; the ends of a stream; errors for garbage; and
//! that an idle connection holds no buffer.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::dev::certs::Ca;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

struct Pki {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    roots: RootCertStore,
}

/// A server config for `localhost` and a client config trusting its CA,
/// both limited to `version`.
fn pki(version: &'static SupportedProtocolVersion) -> Pki {
    pki_of("stream test CA", version)
}

fn pki_of(ca_name: &str, version: &'static SupportedProtocolVersion) -> Pki {
    let ca = Ca::new(ca_name).unwrap();
    let issued = ca.server_cert(&["localhost"]).unwrap();
    let chain = vec![CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    let server = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[version])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    Pki {
        server: Arc::new(server),
        client: Arc::new(client),
        roots,
    }
}

const VERSIONS: [&SupportedProtocolVersion; 2] = [&rustls::version::TLS13, &rustls::version::TLS12];

fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

/// A socket that hands over at most a few bytes per call and sometimes
/// none (Pending, woken at once), as a congested network might: every
/// record gets cut at some point.
struct Choppy {
    inner: DuplexStream,
    rng: u64,
    max: usize,
}

impl Choppy {
    fn new(inner: DuplexStream, seed: u64, max: usize) -> Self {
        Choppy {
            inner,
            rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            max,
        }
    }

    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// None: block this time; else how many bytes to allow.
    fn allowance(&mut self, cx: &mut Context<'_>) -> Option<usize> {
        let r = self.next();
        if r.is_multiple_of(5) {
            cx.waker().wake_by_ref();
            return None;
        }
        Some(1 + (r >> 8) as usize % self.max)
    }
}

impl AsyncRead for Choppy {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Some(n) = self.allowance(cx) else {
            return Poll::Pending;
        };
        let n = n.min(buf.remaining());
        let mut small = vec![0u8; n];
        let mut rb = ReadBuf::new(&mut small);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut rb))?;
        buf.put_slice(rb.filled());
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Choppy {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let Some(n) = self.allowance(cx) else {
            return Poll::Pending;
        };
        let n = n.min(buf.len());
        Pin::new(&mut self.inner).poll_write(cx, &buf[..n])
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Bytes that show a misplaced or lost byte: position-dependent.
fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 8) as u8 ^ salt)
        .collect()
}

const SIZES: [usize; 5] = [1, 5, 16 * 1024, 16 * 1024 + 1, 40_000];

/// Writes each size while reading the peer's echo of it (at once: the
/// echo is written back while the rest is still coming).
async fn send_and_check_echo<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    for (i, size) in SIZES.into_iter().enumerate() {
        let sent = pattern(size, i as u8);
        let (mut r, mut w) = tokio::io::split(&mut *s);
        let write = async {
            w.write_all(&sent).await.unwrap();
            w.flush().await.unwrap();
        };
        let mut back = vec![0u8; size];
        let read = r.read_exact(&mut back);
        let ((), read) = tokio::join!(write, read);
        read.unwrap();
        assert!(back == sent, "echo of {size} bytes differs");
    }
}

/// Echoes everything until end of stream, then closes.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let mut buf = vec![0u8; 7000];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).await.unwrap();
        s.flush().await.unwrap();
    }
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn bytes_arrive_whole_and_in_order_however_the_socket_cuts_them() {
    for version in VERSIONS {
        let pki = pki(version);
        for seed in 0..8 {
            let max = [2, 37, 1500, 20_000][seed as usize % 4];
            let (a, b) = tokio::io::duplex(4096);
            // pgbastion as the client, tokio-rustls as the server.
            let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
            let peer = tokio::spawn(async move {
                echo(
                    acceptor
                        .accept(Choppy::new(b, seed + 100, max))
                        .await
                        .unwrap(),
                )
                .await
            });
            let connector = TlsConnector::from(pki.client.clone());
            let mut ours = connector
                .connect(localhost(), Choppy::new(a, seed, max))
                .await
                .unwrap();
            send_and_check_echo(&mut ours).await;
            ours.shutdown().await.unwrap();
            let mut rest = Vec::new();
            ours.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            peer.await.unwrap();

            // pgbastion as the server, tokio-rustls as the client.
            let (a, b) = tokio::io::duplex(4096);
            let acceptor = TlsAcceptor::from(pki.server.clone());
            let ours = tokio::spawn(async move {
                echo(
                    acceptor
                        .accept(Choppy::new(b, seed + 200, max))
                        .await
                        .unwrap(),
                )
                .await
            });
            let connector = tokio_rustls::TlsConnector::from(pki.client.clone());
            let mut peer = connector
                .connect(localhost(), Choppy::new(a, seed + 300, max))
                .await
                .unwrap();
            send_and_check_echo(&mut peer).await;
            peer.shutdown().await.unwrap();
            ours.await.unwrap();
        }
    }
}

#[tokio::test]
async fn a_reader_with_little_room_gets_every_byte_in_order() {
    let pki = pki(&rustls::version::TLS13);
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
    let sent = pattern(50_000, 9);
    let expected = sent.clone();
    let peer = tokio::spawn(async move {
        let mut tls = acceptor.accept(b).await.unwrap();
        tls.write_all(&sent).await.unwrap();
        tls.shutdown().await.unwrap();
    });
    let mut ours = TlsConnector::from(pki.client)
        .connect(localhost(), a)
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut small = [0u8; 3];
    loop {
        let n = ours.read(&mut small).await.unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&small[..n]);
    }
    assert!(got == expected);
    peer.await.unwrap();
}

#[tokio::test]
async fn an_idle_connection_holds_no_buffer() {
    let pki = pki(&rustls::version::TLS13);
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
    let peer = tokio::spawn(async move { echo(acceptor.accept(b).await.unwrap()).await });
    let mut ours = TlsConnector::from(pki.client)
        .connect(localhost(), a)
        .await
        .unwrap();
    send_and_check_echo(&mut ours).await;
    // Between two messages: nothing kept for input, output or plaintext.
    assert_eq!(ours.incoming.capacity(), 0);
    assert_eq!(ours.engine.plaintext.data.capacity(), 0);
    assert_eq!(ours.engine.outgoing.data.capacity(), 0);
    ours.shutdown().await.unwrap();
    peer.await.unwrap();
}

#[tokio::test]
async fn close_notify_ends_the_stream_and_a_bare_close_is_unexpected_eof() {
    let pki = pki(&rustls::version::TLS13);
    for clean in [true, false] {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
        let peer = tokio::spawn(async move {
            let mut tls = acceptor.accept(b).await.unwrap();
            tls.write_all(b"last words").await.unwrap();
            if clean {
                tls.shutdown().await.unwrap();
            } else {
                tls.flush().await.unwrap();
                // Drops the socket under TLS without close_notify.
                let (mut raw, _) = tls.into_inner();
                raw.shutdown().await.unwrap();
            }
        });
        let mut ours = TlsConnector::from(pki.client.clone())
            .connect(localhost(), a)
            .await
            .unwrap();
        let mut got = Vec::new();
        let end = ours.read_to_end(&mut got).await;
        assert_eq!(got, b"last words");
        match clean {
            true => assert!(end.is_ok(), "{end:?}"),
            false => assert_eq!(end.unwrap_err().kind(), io::ErrorKind::UnexpectedEof),
        }
        peer.await.unwrap();
    }
}

#[tokio::test]
async fn key_updates_either_side_starts_keep_the_stream_readable() {
    let pki = pki(&rustls::version::TLS13);
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
    let peer = tokio::spawn(async move {
        let mut tls = acceptor.accept(b).await.unwrap();
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"first");
        // The peer renews its keys and asks for ours to be renewed.
        tls.get_mut().1.refresh_traffic_keys().unwrap();
        tls.write_all(b"second").await.unwrap();
        tls.flush().await.unwrap();
        tls.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"third");
        tls.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"forth");
        tls.shutdown().await.unwrap();
    });
    let mut ours = TlsConnector::from(pki.client)
        .connect(localhost(), a)
        .await
        .unwrap();
    ours.write_all(b"first").await.unwrap();
    let mut buf = [0u8; 6];
    ours.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"second");
    // Our answer to the peer's request went out before "third".
    ours.write_all(b"third").await.unwrap();
    // Now pgbastion renews its own keys, as at rustls's limit of records
    // per key: the KeyUpdate must precede the records under the new key.
    ours.engine.refresh_keys(&mut ours.incoming);
    ours.write_all(b"forth").await.unwrap();
    ours.flush().await.unwrap();
    let mut rest = Vec::new();
    ours.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    peer.await.unwrap();
}

#[tokio::test]
async fn garbage_from_the_peer_is_an_invalid_data_error() {
    let pki = pki(&rustls::version::TLS13);
    let garbage: [&[u8]; 3] = [
        // An application data record too long for TLS.
        &[0x17, 0x03, 0x03, 0xff, 0xff, 1, 2, 3],
        // A record that does not decrypt.
        &[
            0x17, 0x03, 0x03, 0x00, 0x20, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
            7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
        ],
        // Not TLS at all.
        b"HTTP/1.1 400 Bad Request\r\n\r\n",
    ];
    for bytes in garbage {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
        let peer = tokio::spawn(async move {
            let tls = acceptor.accept(b).await.unwrap();
            let (mut raw, _) = tls.into_inner();
            raw.write_all(bytes).await.unwrap();
            raw
        });
        let mut ours = TlsConnector::from(pki.client.clone())
            .connect(localhost(), a)
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        let err = ours.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err
            .get_ref()
            .unwrap()
            .downcast_ref::<rustls::Error>()
            .is_some());
        // The error sticks, whatever the caller does next, and a shutdown
        // still closes the socket (the peer reads to its end).
        let again = ours.read(&mut buf).await.unwrap_err();
        assert_eq!(again.to_string(), err.to_string());
        let write = ours.write_all(b"more").await.unwrap_err();
        assert_eq!(write.to_string(), err.to_string());
        ours.shutdown().await.unwrap();
        let mut raw = peer.await.unwrap();
        let mut rest = Vec::new();
        raw.read_to_end(&mut rest).await.unwrap();
    }
}

#[tokio::test]
async fn a_handshake_failure_carries_the_rustls_error() {
    let pki = pki(&rustls::version::TLS13);
    let other = pki_of("another CA", &rustls::version::TLS13);
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(other.server);
    let peer = tokio::spawn(async move { acceptor.accept(b).await.err() });
    let err = TlsConnector::from(pki.client.clone())
        .connect(localhost(), a)
        .await
        .err()
        .unwrap();
    assert_eq!(
        crate::tls::certificate_problem(&err),
        Some(crate::tls::CertificateProblem::UnknownIssuer)
    );
    // The alert went out: the peer learns why.
    let peer_err = peer.await.unwrap().unwrap().to_string();
    assert!(peer_err.contains("UnknownCA"), "{peer_err}");

    // A peer that closes mid-handshake, once it has the ClientHello.
    let (a, mut b) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let mut hello = [0u8; 5];
        b.read_exact(&mut hello).await.unwrap();
    });
    let err = TlsConnector::from(pki.client)
        .connect(localhost(), a)
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
}

#[tokio::test]
async fn a_handshake_message_past_the_bound_is_refused() {
    let pki = pki(&rustls::version::TLS13);
    let (a, mut b) = tokio::io::duplex(1024 * 1024);
    let acceptor = TlsAcceptor::from(pki.server);
    let ours = tokio::spawn(async move { acceptor.accept(a).await.err() });
    // A ClientHello announcing 60000 bytes, one byte per record: the
    // message is within rustls's limit, the records around it are not.
    let announced = [0x01, 0x00, 0xea, 0x60];
    let mut flight = Vec::new();
    for i in 0..60_000usize {
        let byte = announced.get(i).copied().unwrap_or(0);
        flight.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x01, byte]);
    }
    // The writer stops mattering once the acceptor gives up.
    let _ = b.write_all(&flight).await;
    let err = ours.await.unwrap().unwrap();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
}

/// ring's TLS 1.3 AES-128-GCM with a confidentiality limit of a few
/// records, so that rustls renews the keys inside an encryption, as it
/// does after 2^24 records with the real limit.
fn provider_renewing_keys_often() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::CipherSuiteCommon;
    use rustls::{SupportedCipherSuite, Tls13CipherSuite};
    let SupportedCipherSuite::Tls13(real) =
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
    else {
        unreachable!("a TLS 1.3 suite")
    };
    let suite: &'static Tls13CipherSuite = Box::leak(Box::new(Tls13CipherSuite {
        common: CipherSuiteCommon {
            suite: real.common.suite,
            hash_provider: real.common.hash_provider,
            confidentiality_limit: 4,
        },
        hkdf_provider: real.hkdf_provider,
        aead_alg: real.aead_alg,
        quic: real.quic,
    }));
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![SupportedCipherSuite::Tls13(suite)],
        ..rustls::crypto::ring::default_provider()
    })
}

#[tokio::test]
async fn keys_renewed_at_the_record_limit_reach_the_peer_before_their_records() {
    let pki = pki(&rustls::version::TLS13);
    let client = ClientConfig::builder_with_provider(provider_renewing_keys_often())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(pki.roots.clone())
        .with_no_client_auth();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
    let peer = tokio::spawn(async move {
        let mut tls = acceptor.accept(b).await.unwrap();
        let mut got = Vec::new();
        tls.read_to_end(&mut got).await.unwrap();
        got
    });
    let mut ours = TlsConnector::from(Arc::new(client))
        .connect(localhost(), a)
        .await
        .unwrap();
    let mut sent = Vec::new();
    for i in 0..20u8 {
        let record = pattern(100 + i as usize, i);
        ours.write_all(&record).await.unwrap();
        ours.flush().await.unwrap();
        sent.extend_from_slice(&record);
    }
    ours.shutdown().await.unwrap();
    assert!(peer.await.unwrap() == sent);
}

#[tokio::test]
async fn the_server_side_knows_the_name_the_client_asked_for() {
    let pki = pki(&rustls::version::TLS13);
    for (name, sni) in [("localhost", Some("localhost")), ("127.0.0.1", None)] {
        let mut client = (*pki.client).clone();
        // An IP address is never sent as SNI; the certificate does not
        // name it, so only the name is checked here, not the chain.
        client
            .dangerous()
            .set_certificate_verifier(Arc::new(AnyServer(provider())));
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(pki.server.clone());
        let ours = tokio::spawn(async move {
            let mut tls = acceptor.accept(b).await.unwrap();
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.unwrap();
            tls.get_ref().1.server_name().map(str::to_owned)
        });
        let mut peer = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(ServerName::try_from(name).unwrap(), a)
            .await
            .unwrap();
        peer.write_all(b"x").await.unwrap();
        peer.flush().await.unwrap();
        assert_eq!(ours.await.unwrap().as_deref(), sni);
    }
}

#[tokio::test]
async fn a_client_hello_rustls_refuses_is_refused_with_its_alert() {
    let pki = pki(&rustls::version::TLS13);
    let (a, mut b) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(pki.server);
    let ours = tokio::spawn(async move { acceptor.accept(a).await.err() });
    // A handshake record holding a ClientHello too short to parse.
    b.write_all(&[
        0x16, 0x03, 0x01, 0x00, 0x06, 0x01, 0x00, 0x00, 0x02, 0x03, 0x03,
    ])
    .await
    .unwrap();
    let err = ours.await.unwrap().unwrap();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    // The alert record reached the client.
    let mut alert = [0u8; 7];
    b.read_exact(&mut alert).await.unwrap();
    assert_eq!(alert[0], 0x15, "an alert record: {alert:?}");
}

/// Accepts any server certificate (the SNI test checks names, not trust).
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
