//! The PROXY protocol with HAProxy as a real peer both ways, pgbastion to
//! pgbastion, and every way a header can be wrong.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;
use pgbastion::protocol::proxy::{self, tlv};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A plaintext-allowed listener that requires a PROXY header from 127.0.0.1.
fn proxied_listener(env: &Env, extra: &str) -> Proxy {
    env.proxy_with(
        "client_tls = \"allow\"\nproxy_protocol = \"required\"\nproxy_trusted = [\"127.0.0.1/32\"]",
        extra,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_send_proxy_v2_gives_the_real_client_address() {
    let env = Env::new();
    let pgb = proxied_listener(
        &env,
        "[[rule]]\nname = \"only-07\"\nnetworks = [\"127.0.0.7/32\"]\n",
    );
    let lb_port = pgbastion::dev::localpg::free_port().unwrap();
    let _lb = Haproxy::start(
        &format!(
            "frontend fe\n  bind 127.0.0.1:{lb_port}\n  default_backend be\nbackend be\n  server pgb {} send-proxy-v2\n",
            pgb.addr()
        ),
        lb_port,
    );
    let lb: SocketAddr = ([127, 0, 0, 1], lb_port).into();
    let pw = env.pg.password.as_str();
    let client = connect_from(lb, "127.0.0.7", "postgres", "postgres", pw, "via-lb")
        .await
        .unwrap();
    client.simple_query("select 1").await.unwrap();
    let e = connect_from(lb, "127.0.0.8", "postgres", "postgres", pw, "via-lb")
        .await
        .err()
        .unwrap();
    let db = e.as_db_error().expect("pgbastion's refusal");
    assert_eq!(db.code().code(), "28000");
    assert!(
        db.message().contains("address \"127.0.0.8\""),
        "{}",
        db.message()
    );

    let start = pgb.wait_audit("session start", |e| e["event"] == "session.start");
    assert_eq!(start["client"]["addr"], "127.0.0.7");
    assert_eq!(
        start["proxy"]["via"]["addr"], "127.0.0.1",
        "the balancer's address is kept"
    );
    assert_eq!(start["proxy"]["version"], 2);
    assert_eq!(start["proxy"]["command"], "proxy");
    assert_eq!(start["rule"], "only-07");
    let refused = pgb.wait_audit("refusal", |e| e["reason"] == "policy_denied");
    assert_eq!(refused["client"]["addr"], "127.0.0.8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbastion_sends_proxy_v2_that_haproxy_reads() {
    let env = Env::new();
    let lb_port = pgbastion::dev::localpg::free_port().unwrap();
    let lb = Haproxy::start(
        &format!(
            "frontend fe\n  bind 127.0.0.1:{lb_port} accept-proxy\n  log-format \"client=%ci:%cp\"\n  default_backend be\n\
             backend be\n  server pg 127.0.0.1:{}\n",
            env.pg.port
        ),
        lb_port,
    );
    let pgb = Proxy::start_toml(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nclient_tls = \"allow\"\n\
         [[upstream]]\naddress = \"localhost:{lb_port}\"\nca_file = \"{}\"\nsend_proxy_protocol = \"v2\"\n",
        env.tls_toml(),
        env.pg.ca_cert.display()
    ));
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.5:0".parse().unwrap()).unwrap();
    let stream = sock.connect(pgb.addr()).await.unwrap();
    let local = stream.local_addr().unwrap();
    let client = pg_over(stream, &env.pg.password, "via-lb").await.unwrap();
    // The server still sees verified TLS through the balancer.
    let ssl: bool = client
        .query_one(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl);
    // HAProxy logs the connection when it ends.
    drop(client);
    let logged = wait_for("haproxy's log line", Duration::from_secs(10), || {
        let text = lb.log_text();
        text.contains("client=").then_some(text)
    });
    assert!(
        logged.contains(&format!("client={}:{}", local.ip(), local.port())),
        "{logged}"
    );

    // Cancel requests go the same way, header included (HAProxy's
    // accept-proxy would drop them otherwise).
    let direct = env.direct_client().await;
    let (client, _conn) = pgb
        .client(&env, "application_name=lb-sleeper")
        .await
        .unwrap();
    let token = client.cancel_token();
    let query = tokio::spawn(async move { client.simple_query("select pg_sleep(60)").await });
    wait_active(&direct, "lb-sleeper").await;
    token
        .cancel_query(tls_connector(&env.proxy_ca))
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(2), query)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"));
    let cancel = pgb.wait_audit("cancel", |e| e["event"] == "session.cancel");
    assert_eq!(cancel["outcome"], "forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbastion_to_pgbastion_carries_client_tls_and_identity() {
    let env = Env::new();
    // The second pgbastion wants a header from 127.0.0.1, then TLS as usual.
    let second = env.proxy_with(
        "proxy_protocol = \"required\"\nproxy_trusted = [\"127.0.0.1/32\"]",
        "",
    );
    let first = Proxy::start_toml(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\n[[upstream]]\naddress = \"localhost:{}\"\n\
         ca_file = \"{}\"\nsend_proxy_protocol = \"v2\"\n",
        env.tls_toml(),
        second.addr().port(),
        env.proxy_ca.display()
    ));
    // A TLS client from 127.0.0.6.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.6:0".parse().unwrap()).unwrap();
    let tls = ssl_request_then_tls(sock.connect(first.addr()).await.unwrap(), &env).await;
    let client = pg_over(tls, &env.pg.password, "test").await.unwrap();
    client.simple_query("select 1").await.unwrap();

    let a = first.wait_audit("first start", |e| e["event"] == "session.start");
    let b = second.wait_audit("second start", |e| e["event"] == "session.start");
    assert_eq!(
        b["client"]["addr"], "127.0.0.6",
        "the original client, not the first pgbastion"
    );
    assert_eq!(b["proxy"]["via"]["addr"], "127.0.0.1");
    assert_eq!(b["proxy"]["unique_id"], a["session_id"]);
    assert_eq!(b["proxy"]["authority"], "localhost", "the client's SNI");
    assert_eq!(b["proxy"]["ssl"]["version"], a["client_tls"]["version"]);
    assert_eq!(b["proxy"]["ssl"]["cipher"], a["client_tls"]["cipher"]);
    assert_eq!(b["proxy"]["ssl"]["client"], tlv::CLIENT_SSL);
    assert_eq!(b["proxy"]["crc32c_verified"], true);
    let identity: serde_json::Value =
        serde_json::from_str(b["proxy"]["pgbastion_identity"].as_str().unwrap()).unwrap();
    assert_eq!(
        identity,
        serde_json::json!({"source": "network", "name": "127.0.0.6"})
    );
    assert_eq!(identity, a["identity"]);
}

/// Opens a raw connection to `addr` from `from`.
async fn raw_from(addr: SocketAddr, from: &str) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    sock.connect(addr).await.unwrap()
}

/// Sends `bytes` and returns everything pgbastion answers before closing.
async fn answer_to(addr: SocketAddr, from: &str, bytes: &[u8]) -> Vec<u8> {
    let mut s = raw_from(addr, from).await;
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("pgbastion closes the connection");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_headers_and_sources_are_refused_and_serving_goes_on() {
    let env = Env::new();
    let pgb = proxied_listener(
        &env,
        "[timeouts]\nproxy_header = \"1s\"\nshutdown_drain = \"1s\"\n",
    );
    let addr = pgb.addr();
    let src: SocketAddr = "192.0.2.10:40000".parse().unwrap();
    let good = proxy::encode_v2(Some(src), Some(addr), &[]);

    // From a source not in proxy_trusted: closed without a word.
    assert!(answer_to(addr, "127.0.0.2", &good).await.is_empty());
    // No header: a Postgres client reaching around the balancer is told.
    let told = answer_to(
        addr,
        "127.0.0.1",
        &pgbastion::protocol::startup::ssl_request(),
    )
    .await;
    assert_eq!(told.first(), Some(&b'E'));
    assert!(String::from_utf8_lossy(&told).contains("PROXY protocol header"));
    // A v1 line with no CRLF within 107 bytes.
    let mut long = b"PROXY TCP4 ".to_vec();
    long.resize(120, b'1');
    assert!(answer_to(addr, "127.0.0.1", &long).await.is_empty());
    // A v2 length too short for its family.
    let mut short = proxy::V2_SIGNATURE.to_vec();
    short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
    assert!(answer_to(addr, "127.0.0.1", &short).await.is_empty());
    // A CRC32C that does not match.
    let mut bad_crc = good.clone();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0x55;
    assert!(answer_to(addr, "127.0.0.1", &bad_crc).await.is_empty());
    // Half a header, then nothing: the header deadline ends it.
    let started = std::time::Instant::now();
    assert!(answer_to(addr, "127.0.0.1", &good[..10]).await.is_empty());
    assert!(started.elapsed() < Duration::from_secs(5));

    let reasons: Vec<String> = pgb
        .wait_audit_count("six refusals", 6, |e| e["event"] == "session.rejected")
        .iter()
        .map(|e| e["reason"].as_str().unwrap().to_owned())
        .collect();
    for (reason, n) in [
        ("proxy_untrusted_source", 1),
        ("bad_proxy_header", 4),
        ("proxy_header_timeout", 1),
    ] {
        assert_eq!(
            reasons.iter().filter(|r| *r == reason).count(),
            n,
            "{reasons:?}"
        );
    }

    // A good v1 header, then a normal session: it still serves.
    let mut s = raw_from(addr, "127.0.0.1").await;
    s.write_all(&proxy::encode_v1(
        Some("198.51.100.4:5555".parse().unwrap()),
        Some(addr),
    ))
    .await
    .unwrap();
    let client = pg_over(s, &env.pg.password, "test").await.unwrap();
    client.simple_query("select 1").await.unwrap();
    let ok = pgb.wait_audit("the v1 session", |e| e["event"] == "session.start");
    assert_eq!(ok["client"]["addr"], "198.51.100.4");
    assert_eq!(ok["client"]["port"], 5555);
    assert_eq!(ok["proxy"]["version"], 1);
}

/// The real binary's log: after a PROXY header, the session's log lines
/// name the client the header states, not the balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_name_the_client_from_the_proxy_header() {
    let env = Env::new();
    let port = pgbastion::dev::localpg::free_port().unwrap();
    let config = env.dir.path().join("pp.toml");
    let log = env.dir.path().join("stderr.log");
    std::fs::write(
        &config,
        format!(
            "{}\n[[listener]]\nlisten = \"127.0.0.1:{port}\"\nproxy_protocol = \"required\"\n\
             proxy_trusted = [\"127.0.0.0/8\"]\n{}\n[audit]\nlog = \"off\"\n",
            env.tls_toml(),
            env.upstream_toml()
        ),
    )
    .unwrap();
    let _proc = Running(config_form(&config, Some(&log)).spawn().unwrap());
    let addr = wait_listening(port);
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 6432\r\n")
        .await
        .unwrap();
    // Then a packet that is no Postgres packet at all: refused, logged.
    s.write_all(&[0, 0, 0, 8, 0, 0, 0, 0]).await.unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    let line = wait_for("the refusal in the log", Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains("session refused"))
            .map(str::to_owned)
    });
    assert!(line.contains("203.0.113.7"), "{line}");
}

/// Issue 19 item 25: behind a balancer, one client could take every
/// pending slot of the listener. Once its header is read, a connection
/// counts against the address the header states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_behind_the_balancer_cannot_take_every_pending_slot() {
    let env = Env::new();
    let pgb = proxied_listener(
        &env,
        "[limits]\nmax_pending = 32\nmax_pending_per_address = 3\n\
         [timeouts]\nclient_startup = \"60s\"\nshutdown_drain = \"1s\"\n",
    );
    let addr = pgb.addr();
    let header = |src: &str| proxy::encode_v2(Some(src.parse().unwrap()), Some(addr), &[]);
    // Eight idle connections from one client behind the balancer: three
    // keep a slot, the rest are closed at once.
    let mut idle = Vec::new();
    for _ in 0..8 {
        let mut s = raw_from(addr, "127.0.0.1").await;
        s.write_all(&header("192.0.2.7:4000")).await.unwrap();
        idle.push(s);
    }
    let mut closed = 0;
    for s in &mut idle {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(500), s.read(&mut b)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 5, "all but max_pending_per_address are turned away");
    // Another client behind the same balancer is served.
    let mut s = raw_from(addr, "127.0.0.1").await;
    s.write_all(&header("192.0.2.8:4000")).await.unwrap();
    let client = pg_over(s, &env.pg.password, "other").await.unwrap();
    client.simple_query("select 1").await.unwrap();
    drop(idle);
}
