//! End-to-end: real PostgreSQL, real psql and tokio-postgres, through
//! pgbastion.

use std::time::Duration;

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn psql_verify_full_through_proxy_and_server_sees_tls() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let out = env.psql(
        &env.via_proxy(proxy.addr(), "channel_binding=disable"),
        "select ssl, version from pg_stat_ssl where pid = pg_backend_pid()",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let line = stdout(&out);
    assert!(
        line.starts_with("t|TLSv1."),
        "server must see TLS on the proxied session: {line}"
    );
}

#[test]
fn plaintext_on_allow_listener_and_unix_socket() {
    let env = Env::new();
    let sock_dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "{}\n[[listener]]\nname = \"plain\"\nlisten = \"127.0.0.1:0\"\nclient_tls = \"allow\"\n\
         [[listener]]\nname = \"unix\"\nunix_dir = \"{}\"\nport = 7777\n{}",
        env.tls_toml(),
        sock_dir.path().display(),
        env.upstream_toml()
    );
    let proxy = Proxy::start_toml(&toml);
    let plain = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable",
        proxy.addr().port()
    );
    let out = env.psql(
        &plain,
        "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "t",
        "upstream leg is TLS even for a plaintext client"
    );

    let unix = format!(
        "host={} port=7777 user=postgres dbname=postgres",
        sock_dir.path().display()
    );
    let out = env.psql(&unix, "select 'via unix'");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "via unix");

    let ev = proxy.wait_audit("unix session start", |e| {
        e["event"] == "session.start" && e["listener"] == "unix"
    });
    assert_eq!(ev["client"]["addr"], "unix");
    assert_eq!(ev["client_tls"]["mode"], "plaintext");
    assert_eq!(ev["auth"]["result"], "ok");
}

#[test]
fn plaintext_on_require_listener_gets_28000() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let plain = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable",
        proxy.addr().port()
    );
    let out = env.psql(&plain, "select 1");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("this server requires TLS"), "{err}");
    let ev = proxy.wait_audit("rejection", |e| e["event"] == "session.rejected");
    assert_eq!(ev["reason"], "tls_required");
    assert_eq!(ev["sqlstate"], "28000");
    assert_eq!(ev["client_tls"]["mode"], "plaintext");
    assert_eq!(ev["client"]["addr"], "127.0.0.1");
    assert!(ev["client"]["port"].as_u64().unwrap() > 0);
    assert!(ev["ts"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn channel_binding_is_explained_and_disable_works() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    // libpq's default (channel_binding=prefer) picks SCRAM-SHA-256-PLUS.
    let out = env.psql(&env.via_proxy(proxy.addr(), ""), "select 1");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("channel binding (SCRAM-SHA-256-PLUS) cannot work through pgbastion"),
        "{err}"
    );
    assert!(
        err.contains("channel_binding=disable"),
        "the hint must say what to do: {err}"
    );
    let ev = proxy.wait_audit("refused session end", |e| e["event"] == "session.end");
    assert_eq!(ev["end_reason"], "channel_binding_refused");
    assert_eq!(ev["auth"]["result"], "refused_by_proxy");

    let out = env.psql(
        &env.via_proxy(proxy.addr(), "channel_binding=disable"),
        "select 42",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "42");
}

#[test]
fn audit_lines_of_accepted_session_carry_every_field() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let out = env.psql(
        &env.via_proxy(
            proxy.addr(),
            "channel_binding=disable application_name=auditme",
        ),
        "select repeat('x', 5000)",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let start = proxy.wait_audit("start", |e| e["event"] == "session.start");
    let end = proxy.wait_audit("end", |e| e["event"] == "session.end");
    for ev in [&start, &end] {
        assert_eq!(ev["session_id"], start["session_id"]);
        assert_eq!(ev["listener"], "tcp");
        assert_eq!(ev["client"]["addr"], "127.0.0.1");
        assert_eq!(ev["client_tls"]["mode"], "tls");
        assert!(ev["client_tls"]["version"]
            .as_str()
            .unwrap()
            .starts_with("TLSv1."));
        assert!(!ev["client_tls"]["cipher"].as_str().unwrap().is_empty());
        assert_eq!(ev["client_tls"]["sni"], "localhost");
        assert_eq!(ev["requested"]["user"], "postgres");
        assert_eq!(ev["requested"]["database"], "postgres");
        assert_eq!(ev["requested"]["application_name"], "auditme");
        assert_eq!(ev["requested"]["protocol"], "3.0");
        assert_eq!(ev["upstream"]["addr"], format!("127.0.0.1:{}", env.pg.port));
        assert!(ev["upstream"]["tls"]["version"]
            .as_str()
            .unwrap()
            .starts_with("TLSv1."));
        assert_eq!(ev["auth"]["result"], "ok");
    }
    assert_eq!(end["end_reason"], "client_closed");
    assert!(end["bytes_server_to_client"].as_u64().unwrap() > 5000);
    assert!(end["bytes_client_to_server"].as_u64().unwrap() > 0);
    assert!(end["duration_ms"].is_u64());
    // No secret ever lands in the audit log.
    let raw = std::fs::read_to_string(&proxy.audit_log).unwrap();
    assert!(!raw.contains(&env.pg.password));
}

#[test]
fn wrong_password_outcome_is_audited() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let out = crate::common::psql(
        &env.via_proxy(proxy.addr(), "channel_binding=disable"),
        "not-the-password",
        "select 1",
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("password authentication failed"),
        "{}",
        stderr(&out)
    );
    let end = proxy.wait_audit("end", |e| e["event"] == "session.end");
    assert_eq!(end["auth"]["result"], "error");
    assert_eq!(end["auth"]["sqlstate"], "28P01");
    let raw = std::fs::read_to_string(&proxy.audit_log).unwrap();
    assert!(!raw.contains("not-the-password"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_terminate_reaches_client_at_once() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let (client, conn) = proxy.client(&env, "").await.unwrap();
    let pid: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let direct = env.direct_client().await;
    direct
        .execute("select pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    // The connection task ends with the server's FATAL 57P01, promptly.
    let res = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("client connection must end promptly")
        .unwrap();
    let err = res.expect_err("the connection ends with the server's FATAL message");
    assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err}");
    assert!(client.is_closed());
    let end = proxy.wait_audit("end", |e| e["event"] == "session.end");
    // The server sends FATAL and then exits; a fast client may hang up
    // before the server's FIN arrives, so either side may be seen closing
    // first. Never an error.
    let reason = end["end_reason"].as_str().unwrap();
    assert!(
        reason == "server_closed" || reason == "client_closed",
        "{reason}"
    );
}

/// Counts the server backends with the given application_name.
async fn backends(direct: &tokio_postgres::Client, app: &str) -> i64 {
    direct
        .query_one(
            "select count(*) from pg_stat_activity where application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_vanishes_over_tcp_ends_the_upstream_session() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let direct = env.direct_client().await;
    // psql reading SQL from a pipe we never write to: connected and idle.
    let mut psql = std::process::Command::new("psql")
        .args([
            "-X",
            "-d",
            &env.via_proxy(
                proxy.addr(),
                "channel_binding=disable application_name=vanisher",
            ),
        ])
        .env("PGPASSWORD", &env.pg.password)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_async(
        "psql's session on the server",
        Duration::from_secs(15),
        || async { (backends(&direct, "vanisher").await == 1).then_some(()) },
    )
    .await;
    // SIGKILL: no Terminate message, no close_notify; the kernel sends FIN.
    psql.kill().unwrap();
    psql.wait().unwrap();
    wait_for_async(
        "the server session to end",
        Duration::from_secs(5),
        || async { (backends(&direct, "vanisher").await == 0).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_notify_without_terminate_ends_the_upstream_session() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let direct = env.direct_client().await;
    // Our own TLS connection to pgbastion, handed to tokio-postgres through
    // a pipe, so the test decides when the TLS session ends.
    let tcp = raw(proxy.addr()).await;
    let mut tls = ssl_request_then_tls(tcp, &env).await;
    let (local, mut remote) = tokio::io::duplex(64 * 1024);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut tls, &mut remote) => {}
            _ = stop_rx => {
                // close_notify and FIN, but keep the socket object alive.
                tls.shutdown().await.unwrap();
                let _ = done_tx.send(tls);
            }
        }
    });
    let client = pg_over(local, &env.pg.password, "notifier").await.unwrap();
    client.simple_query("select 1").await.unwrap();
    assert_eq!(backends(&direct, "notifier").await, 1);
    stop_tx.send(()).unwrap();
    let _still_open = done_rx.await.unwrap();
    wait_for_async(
        "the server session to end",
        Duration::from_secs(5),
        || async { (backends(&direct, "notifier").await == 0).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_sessions_gets_53300() {
    let env = Env::new();
    let proxy = env.proxy("require", "[limits]\nmax_sessions = 1\n");
    let (first, _conn) = proxy.client(&env, "").await.unwrap();
    let Err(err) = proxy.client(&env, "").await else {
        panic!("the second session must be refused");
    };
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
    // The first session is unaffected, and its slot frees on close.
    first.simple_query("select 1").await.unwrap();
    drop(first);
    wait_for_async("the slot to free", Duration::from_secs(5), || async {
        proxy.client(&env, "").await.ok().map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gssenc_then_ssl_on_one_socket() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let mut tcp = raw(proxy.addr()).await;
    let mut gss = 8u32.to_be_bytes().to_vec();
    gss.extend_from_slice(&pgbastion::protocol::startup::GSSENC_REQUEST_CODE.to_be_bytes());
    tcp.write_all(&gss).await.unwrap();
    assert_eq!(tcp.read_u8().await.unwrap(), b'N');
    let tls = ssl_request_then_tls(tcp, &env).await;
    let client = pg_over(tls, &env.pg.password, "test").await.unwrap();
    let row = client
        .query_one(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_requires_alpn_postgresql() {
    let env = Env::new();
    let proxy = env.proxy("require", "");

    // With ALPN "postgresql": works.
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_tls_config(
        &env.proxy_ca,
        &[b"postgresql"],
    )));
    let tls = connector
        .connect("localhost".try_into().unwrap(), raw(proxy.addr()).await)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    let client = pg_over(tls, &env.pg.password, "direct").await.unwrap();
    let v: i32 = client.query_one("select 7", &[]).await.unwrap().get(0);
    assert_eq!(v, 7);

    // Without ALPN: the handshake completes, then pgbastion refuses with
    // 08P01 inside TLS.
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_tls_config(
        &env.proxy_ca,
        &[],
    )));
    let mut tls = connector
        .connect("localhost".try_into().unwrap(), raw(proxy.addr()).await)
        .await
        .unwrap();
    let (code, message) = read_error(&mut tls).await;
    assert_eq!(code, "08P01");
    assert!(message.contains("ALPN"), "{message}");
    let ev = proxy.wait_audit("rejection", |e| e["event"] == "session.rejected");
    assert_eq!(ev["reason"], "direct_tls_without_alpn");

    // ALPN naming another protocol: the handshake fails with the TLS alert
    // no_application_protocol (RFC 7301), as PostgreSQL's does, so the
    // client learns why instead of seeing the connection drop.
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_tls_config(
        &env.proxy_ca,
        &[b"http/1.1"],
    )));
    let err = connector
        .connect("localhost".try_into().unwrap(), raw(proxy.addr()).await)
        .await
        .map(|_| ())
        .unwrap_err();
    let tls_error = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    assert_eq!(
        tls_error,
        Some(&rustls::Error::AlertReceived(
            rustls::AlertDescription::NoApplicationProtocol
        )),
        "{err}"
    );
    let ev = proxy.wait_audit("handshake failure", |e| {
        e["event"] == "session.rejected" && e["reason"] != "direct_tls_without_alpn"
    });
    assert_eq!(ev["reason"], "client_tls_handshake_failed", "{ev}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_pipelined_after_sslrequest_are_refused() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let mut tcp = raw(proxy.addr()).await;
    let mut bytes = pgbastion::protocol::startup::ssl_request().to_vec();
    // A plaintext StartupMessage an attacker injected behind the request.
    bytes.extend_from_slice(
        pgbastion::protocol::startup::StartupMessage::new(
            pgbastion::protocol::startup::ProtocolVersion { major: 3, minor: 0 },
            vec![("user".into(), "postgres".into())],
        )
        .as_bytes(),
    );
    tcp.write_all(&bytes).await.unwrap();
    let (code, message) = read_error(&mut tcp).await;
    assert_eq!(code, "08P01");
    assert!(
        message.contains("unencrypted data after SSLRequest"),
        "{message}"
    );
    let mut rest = Vec::new();
    tcp.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "connection closed after the error");
    let ev = proxy.wait_audit("rejection", |e| e["event"] == "session.rejected");
    assert_eq!(ev["reason"], "pipelined_after_sslrequest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_startup_packets_never_hurt_the_proxy() {
    let env = Env::new();
    let proxy = env.proxy(
        "allow",
        "[timeouts]\nclient_startup = \"1s\"\nshutdown_drain = \"1s\"\n",
    );
    // Not a Postgres packet at all (an impossible length): closed without
    // a word, as PostgreSQL does ("invalid length of startup packet" goes
    // to its log only). Issue 19 item 28: node-postgres' quick-disconnect
    // sends its Terminate before its StartupMessage, and an ErrorResponse
    // to that became an unhandled error that ended the application.
    let silent: Vec<(&str, Vec<u8>)> = vec![
        ("too short", 4u32.to_be_bytes().to_vec()),
        ("over 10000", 10_001u32.to_be_bytes().to_vec()),
        ("absurd length", u32::MAX.to_be_bytes().to_vec()),
        ("node-postgres Terminate first", vec![b'X', 0, 0, 0, 4]),
    ];
    for (name, bytes) in silent {
        let mut tcp = raw(proxy.addr()).await;
        tcp.write_all(&bytes).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut got))
            .await
            .unwrap_or_else(|_| panic!("{name}: not closed"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, b"", "{name}: closed without a word");
    }
    // Postgres-shaped packets get an explanatory error.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "unknown code",
            [8u32.to_be_bytes(), (1234u32 << 16 | 9999).to_be_bytes()].concat(),
        ),
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
        let mut tcp = raw(proxy.addr()).await;
        tcp.write_all(&bytes).await.unwrap();
        let (code, message) = tokio::time::timeout(Duration::from_secs(5), read_error(&mut tcp))
            .await
            .unwrap_or_else(|_| panic!("{name}: no error"));
        assert_eq!(code, "08P01", "{name}: {message}");
    }
    // A length that promises more than arrives: the deadline ends it.
    let mut tcp = raw(proxy.addr()).await;
    tcp.write_all(&100u32.to_be_bytes()).await.unwrap();
    tcp.write_all(&(3u32 << 16).to_be_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let (code, message) = read_error(&mut tcp).await;
    assert_eq!(code, "08006", "{message}");
    assert!(message.contains("timed out"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(4));
    // A slow trickle, one byte at a time, also ends at the deadline.
    let mut tcp = raw(proxy.addr()).await;
    let startup = pgbastion::protocol::startup::StartupMessage::new(
        pgbastion::protocol::startup::ProtocolVersion { major: 3, minor: 0 },
        vec![
            ("user".into(), "postgres".into()),
            ("database".into(), "postgres".into()),
        ],
    );
    let trickle = async {
        for b in startup.as_bytes() {
            if tcp.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(3), trickle)
        .await
        .ok();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(&mut got)).await;
    assert_eq!(
        got.first(),
        Some(&b'E'),
        "the trickling client gets an error, not a session"
    );
    // The process keeps serving.
    let out = env.psql(
        &env.via_proxy(proxy.addr(), "channel_binding=disable"),
        "select 'still serving'",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "still serving");
    proxy.wait_audit_count("two client timeouts", 2, |e| {
        e["reason"] == "client_timeout"
    });
}

#[test]
fn ipv6_listener() {
    let env = Env::new();
    let proxy = Proxy::start_toml(&format!(
        "{}\n[[listener]]\nlisten = \"[::1]:0\"\n{}",
        env.tls_toml(),
        env.upstream_toml()
    ));
    let addr = proxy.addr();
    assert!(addr.is_ipv6());
    // Verify pgbastion's certificate by name while connecting to ::1.
    let conninfo = format!(
        "host=localhost hostaddr=::1 port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={} channel_binding=disable",
        addr.port(),
        env.proxy_ca.display()
    );
    let out = env.psql(&conninfo, "select 'v6'");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "v6");
    let ev = proxy.wait_audit("start", |e| e["event"] == "session.start");
    assert_eq!(ev["client"]["addr"], "::1");
}

/// Issue 19 item 26: the audit of a failed client TLS handshake said
/// `client_tls: {"mode": "plaintext"}`, so a scan for plaintext sessions
/// found clients that never sent a plaintext byte. Now it says the
/// handshake failed, and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_client_tls_handshake_is_audited_as_such() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let failures = |n: usize| {
        proxy.wait_audit_count("handshake failures", n, |e| {
            e["reason"] == "client_tls_handshake_failed"
        })
    };
    // A client that does not trust pgbastion's CA aborts with an alert.
    let other = tempfile::tempdir().unwrap();
    let stranger = pgbastion::dev::certs::Ca::new("another CA").unwrap();
    let stranger_ca = other.path().join("ca.pem");
    std::fs::write(&stranger_ca, stranger.cert_pem()).unwrap();
    let mut tcp = raw(proxy.addr()).await;
    tcp.write_all(&pgbastion::protocol::startup::ssl_request())
        .await
        .unwrap();
    assert_eq!(tcp.read_u8().await.unwrap(), b'S');
    let connector =
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_tls_config(&stranger_ca, &[])));
    assert!(connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .is_err());
    let ev = failures(1).pop().unwrap();
    assert_eq!(ev["client_tls"]["mode"], "tls_handshake_failed", "{ev}");
    let error = ev["client_tls"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("alert") && error.contains("UnknownCA"),
        "{ev}"
    );

    // Garbage after the 'S': not a TLS ClientHello.
    let mut tcp = raw(proxy.addr()).await;
    tcp.write_all(&pgbastion::protocol::startup::ssl_request())
        .await
        .unwrap();
    assert_eq!(tcp.read_u8().await.unwrap(), b'S');
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    let events = failures(2);
    let ev = events
        .iter()
        .find(|e| {
            !e["client_tls"]["error"]
                .as_str()
                .unwrap_or_default()
                .contains("UnknownCA")
        })
        .unwrap();
    assert_eq!(ev["client_tls"]["mode"], "tls_handshake_failed", "{ev}");
    assert!(
        !ev["client_tls"]["error"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{ev}"
    );
    assert!(
        proxy
            .audit_events()
            .iter()
            .all(|e| e["client_tls"]["mode"] != "plaintext"),
        "no plaintext session was audited"
    );
}
