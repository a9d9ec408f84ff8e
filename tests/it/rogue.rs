//! Man-in-the-middle tests: upstreams that must not be trusted. Each time
//! the client gets an error naming the cause, and the rogue upstream (which
//! records everything it receives) got the SSLRequest and nothing else: no
//! StartupMessage, no user name, no password.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use pgbastion::dev::certs::{date_time_ymd, Ca};
use pgbastion::protocol::startup::ssl_request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Copy)]
enum Answer {
    /// `S`, then TLS with the given certificate.
    Tls,
    /// `N`: no TLS here.
    RefuseTls,
    /// An ErrorResponse in plaintext (CVE-2024-10977 must not show it).
    PlaintextError,
    /// Close the connection after the SSLRequest.
    Close,
    /// Say nothing at all.
    Silent,
}

#[derive(Default, Debug)]
struct Record {
    plaintext: Vec<u8>,
    tls_data: Vec<u8>,
    handshake_failed: bool,
    /// The connection handler is done: everything received is recorded.
    finished: bool,
}

struct Rogue {
    addr: SocketAddr,
    record: Arc<Mutex<Record>>,
    _task: tokio::task::JoinHandle<()>,
}

impl Rogue {
    async fn start(answer: Answer, tls: Option<rustls::ServerConfig>) -> Rogue {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let record = Arc::new(Mutex::new(Record::default()));
        let rec = record.clone();
        let acceptor = tls.map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                let rec = rec.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let mut req = [0u8; 8];
                    if tcp.read_exact(&mut req).await.is_err() {
                        return;
                    }
                    rec.lock().unwrap().plaintext.extend_from_slice(&req);
                    match answer {
                        Answer::Tls => {
                            tcp.write_all(b"S").await.unwrap();
                            match acceptor.unwrap().accept(tcp).await {
                                Ok(mut tls) => {
                                    let mut data = Vec::new();
                                    let _ = tokio::time::timeout(
                                        Duration::from_secs(5),
                                        tls.read_to_end(&mut data),
                                    )
                                    .await;
                                    rec.lock().unwrap().tls_data.extend_from_slice(&data);
                                }
                                Err(_) => rec.lock().unwrap().handshake_failed = true,
                            }
                        }
                        Answer::RefuseTls | Answer::PlaintextError | Answer::Silent => {
                            match answer {
                                Answer::RefuseTls => tcp.write_all(b"N").await.unwrap(),
                                Answer::PlaintextError => tcp
                                    .write_all(
                                        &pgbastion::protocol::message::ErrorResponse::new(
                                            "XX000",
                                            "ROGUE SAYS HI",
                                        )
                                        .encode(),
                                    )
                                    .await
                                    .unwrap(),
                                _ => {}
                            }
                            // Record whatever else arrives, until pgbastion hangs up.
                            let mut rest = Vec::new();
                            let _ = tokio::time::timeout(
                                Duration::from_secs(5),
                                tcp.read_to_end(&mut rest),
                            )
                            .await;
                            rec.lock().unwrap().plaintext.extend_from_slice(&rest);
                        }
                        Answer::Close => drop(tcp),
                    }
                    rec.lock().unwrap().finished = true;
                });
            }
        });
        Rogue {
            addr,
            record,
            _task: task,
        }
    }

    fn assert_learned_nothing(&self) {
        // Every handler ends by itself within 5 s (its read deadline), so
        // this never passes just because recording is still under way.
        wait_for(
            "the rogue to finish recording",
            Duration::from_secs(10),
            || self.record.lock().unwrap().finished.then_some(()),
        );
        let r = self.record.lock().unwrap();
        assert_eq!(
            r.plaintext,
            ssl_request(),
            "the rogue must receive only the SSLRequest"
        );
        assert!(
            r.tls_data.is_empty(),
            "no StartupMessage or password over TLS: {:?}",
            r.tls_data
        );
    }
}

/// pgbastion trusting `trusted_ca` for an upstream at `addr` named localhost.
fn proxy_to(
    certs: &ProxyCerts,
    addr: SocketAddr,
    trusted_ca: &std::path::Path,
    extra: &str,
) -> Proxy {
    Proxy::start_toml(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\n[[upstream]]\naddress = \"localhost:{}\"\nca_file = \"{}\"\n{extra}",
        certs.tls_toml(),
        addr.port(),
        trusted_ca.display()
    ))
}

/// Connects through pgbastion and returns the SQLSTATE and full text of the
/// error, which must come from pgbastion (the rogue never speaks Postgres).
async fn refused(proxy: &Proxy, certs: &ProxyCerts) -> (String, String) {
    let Err(err) = proxy.client_with(certs, "secret-password", "").await else {
        panic!("the connection must be refused");
    };
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got {err}"));
    let text = format!(
        "{} {} {}",
        db.message(),
        db.detail().unwrap_or(""),
        db.hint().unwrap_or("")
    );
    (db.code().code().to_owned(), text)
}

struct Setup {
    certs: ProxyCerts,
    trusted: Ca,
    trusted_path: std::path::PathBuf,
}

fn setup() -> Setup {
    let certs = ProxyCerts::new();
    let trusted = Ca::new("the database's real CA").unwrap();
    let trusted_path = trusted.write_cert(certs.dir.path(), "db-ca").unwrap();
    Setup {
        certs,
        trusted,
        trusted_path,
    }
}

async fn check_rogue_cert(issued: pgbastion::dev::certs::Issued, expect_in_message: &str) {
    let s = setup();
    let rogue = Rogue::start(Answer::Tls, Some(tls_server_config(&issued))).await;
    let proxy = proxy_to(&s.certs, rogue.addr, &s.trusted_path, "");
    let (code, text) = refused(&proxy, &s.certs).await;
    assert_eq!(code, "08001", "{text}");
    assert!(text.contains("certificate is not trusted"), "{text}");
    assert!(text.contains(expect_in_message), "{text}");
    wait_for(
        "the rogue's handshake to fail",
        Duration::from_secs(5),
        || rogue.record.lock().unwrap().handshake_failed.then_some(()),
    );
    rogue.assert_learned_nothing();
    let ev = proxy.wait_audit("rejection", |e| e["event"] == "session.rejected");
    assert_eq!(ev["reason"], "upstream_certificate_untrusted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_ca() {
    let other = Ca::new("an attacker's CA").unwrap();
    check_rogue_cert(other.server_cert(&["localhost"]).unwrap(), "unknown issuer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_for_another_name() {
    // Signed by the CA pgbastion trusts, but for another host.
    let s = setup();
    let issued_by_trusted = s.trusted.server_cert(&["other.example.com"]).unwrap();
    let rogue = Rogue::start(Answer::Tls, Some(tls_server_config(&issued_by_trusted))).await;
    let proxy = proxy_to(&s.certs, rogue.addr, &s.trusted_path, "");
    let (code, text) = refused(&proxy, &s.certs).await;
    assert_eq!(code, "08001");
    assert!(
        text.contains("not valid for the expected host name"),
        "{text}"
    );
    assert!(
        text.contains("server_name"),
        "the hint names the setting: {text}"
    );
    wait_for("handshake failure", Duration::from_secs(5), || {
        rogue.record.lock().unwrap().handshake_failed.then_some(())
    });
    rogue.assert_learned_nothing();
}

fn with_validity(
    names: &[&str],
    from: (i32, u8, u8),
    to: (i32, u8, u8),
) -> rcgen::CertificateParams {
    let mut p =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    p.not_before = date_time_ymd(from.0, from.1, from.2);
    p.not_after = date_time_ymd(to.0, to.1, to.2);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_not_yet_valid_certificates() {
    for (from, to, expect) in [
        ((2000, 1, 1), (2001, 1, 1), "it has expired"),
        ((2090, 1, 1), (2091, 1, 1), "it is not yet valid"),
    ] {
        let s = setup();
        let issued = s
            .trusted
            .issue(with_validity(&["localhost"], from, to))
            .unwrap();
        let rogue = Rogue::start(Answer::Tls, Some(tls_server_config(&issued))).await;
        let proxy = proxy_to(&s.certs, rogue.addr, &s.trusted_path, "");
        let (code, text) = refused(&proxy, &s.certs).await;
        assert_eq!(code, "08001");
        assert!(text.contains(expect), "{text}");
        wait_for("handshake failure", Duration::from_secs(5), || {
            rogue.record.lock().unwrap().handshake_failed.then_some(())
        });
        rogue.assert_learned_nothing();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_refuses_tls_or_answers_in_plaintext() {
    for answer in [Answer::RefuseTls, Answer::PlaintextError] {
        let s = setup();
        let rogue = Rogue::start(answer, None).await;
        let proxy = proxy_to(&s.certs, rogue.addr, &s.trusted_path, "");
        let (code, text) = refused(&proxy, &s.certs).await;
        assert_eq!(code, "08001");
        assert!(text.contains("refused TLS"), "{text}");
        assert!(
            !text.contains("ROGUE"),
            "a pre-TLS upstream message must never reach the client"
        );
        // pgbastion hung up: the rogue's read_to_end finished well before
        // its 5 s limit, with nothing after the SSLRequest.
        proxy.wait_audit("rejection", |e| e["reason"] == "upstream_refused_tls");
        rogue.assert_learned_nothing();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_closes_or_stays_silent() {
    let s = setup();
    let rogue = Rogue::start(Answer::Close, None).await;
    let proxy = proxy_to(&s.certs, rogue.addr, &s.trusted_path, "");
    let (code, text) = refused(&proxy, &s.certs).await;
    assert_eq!(code, "08001");
    assert!(
        text.contains("closed the connection during TLS negotiation"),
        "{text}"
    );
    rogue.assert_learned_nothing();

    let s = setup();
    let rogue = Rogue::start(Answer::Silent, None).await;
    let proxy = proxy_to(
        &s.certs,
        rogue.addr,
        &s.trusted_path,
        "[timeouts]\nupstream_tls = \"1s\"\nshutdown_drain = \"1s\"\n",
    );
    let (code, text) = refused(&proxy, &s.certs).await;
    assert_eq!(code, "08001");
    assert!(text.contains("timed out negotiating TLS"), "{text}");
    rogue.assert_learned_nothing();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream() {
    let s = setup();
    let closed_port = pgbastion::dev::localpg::free_port().unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], closed_port).into();
    let proxy = proxy_to(&s.certs, addr, &s.trusted_path, "");
    let (code, text) = refused(&proxy, &s.certs).await;
    assert_eq!(code, "08001");
    assert!(
        text.contains("could not reach the database server"),
        "{text}"
    );
    let ev = proxy.wait_audit("rejection", |e| e["event"] == "session.rejected");
    assert_eq!(ev["reason"], "upstream_unreachable");
    assert!(
        ev["message"]
            .as_str()
            .unwrap()
            .contains("Connection refused"),
        "{ev}"
    );
}
