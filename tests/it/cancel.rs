//! Query cancellation through pgbastion: its own keys, every way clients
//! send CancelRequests, isolation between sessions, and protocol 3.2.

use std::time::{Duration, Instant};

use crate::common::*;
use pgbastion::protocol::message;
use pgbastion::protocol::startup::{CancelKey, ProtocolVersion, StartupMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn still_active(direct: &tokio_postgres::Client, pid: i32) -> bool {
    direct
        .query_one(
            "select count(*) = 1 from pg_stat_activity where pid = $1 and state = 'active'",
            &[&pid],
        )
        .await
        .unwrap()
        .get(0)
}

/// Sends a CancelKey in plaintext, as libpq's PQcancel does.
async fn plaintext_cancel(proxy: &Proxy, key: &CancelKey) {
    let mut tcp = raw(proxy.addr()).await;
    tcp.write_all(&key.cancel_request()).await.unwrap();
    let mut rest = Vec::new();
    tcp.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "nothing is answered to a cancel request");
}

/// Sends a CancelKey inside TLS, as libpq 17+ and tokio-postgres do.
async fn tls_cancel(proxy: &Proxy, certs: &ProxyCerts, key: &CancelKey) {
    let mut tls = ssl_request_then_tls(raw(proxy.addr()).await, certs).await;
    tls.write_all(&key.cancel_request()).await.unwrap();
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "nothing is answered to a cancel request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_ctrl_c_cancels_through_proxy() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let direct = env.direct_client().await;
    let psql = std::process::Command::new("psql")
        .args([
            "-X",
            "-d",
            &env.via_proxy(
                proxy.addr(),
                "channel_binding=disable application_name=sleeper",
            ),
            "-c",
            "select pg_sleep(60)",
        ])
        .env("PGPASSWORD", &env.pg.password)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_active(&direct, "sleeper").await;
    let started = Instant::now();
    // psql's own Ctrl-C handler: a plaintext PQcancel (libpq 15).
    let ok = std::process::Command::new("kill")
        .args(["-INT", &psql.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let out = tokio::task::spawn_blocking(move || psql.wait_with_output().unwrap())
        .await
        .unwrap();
    let elapsed = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("canceling statement due to user request"),
        "{err}"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "cancelled after {elapsed:?}"
    );
    let start = proxy.wait_audit("session start", |e| e["event"] == "session.start");
    let cancel = proxy.wait_audit("cancel event", |e| e["event"] == "session.cancel");
    assert_eq!(cancel["outcome"], "forwarded");
    assert_eq!(cancel["target_session_id"], start["session_id"]);
    assert_eq!(cancel["client_tls"]["mode"], "plaintext");
    assert_eq!(cancel["client"]["addr"], "127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_cancel_inside_tls() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let direct = env.direct_client().await;
    let (client, _conn) = proxy.client(&env, "application_name=tpg").await.unwrap();
    let token = client.cancel_token();
    let query = tokio::spawn(async move { client.simple_query("select pg_sleep(60)").await });
    wait_active(&direct, "tpg").await;
    let started = Instant::now();
    token
        .cancel_query(tls_connector(&env.proxy_ca))
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(2), query)
        .await
        .expect("cancelled within 2 s")
        .unwrap()
        .expect_err("the query was cancelled");
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let cancel = proxy.wait_audit("cancel event", |e| e["event"] == "session.cancel");
    assert_eq!(cancel["outcome"], "forwarded");
    assert_eq!(cancel["client_tls"]["mode"], "tls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_pgbastions_own_and_cancel_only_their_session() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let direct = env.direct_client().await;
    let (a, key_a) = sniffed_session(proxy.addr(), &env, "session-a").await;
    let (b, key_b) = sniffed_session(proxy.addr(), &env, "session-b").await;
    let pid_a: i32 = a
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        key_a.process_id as i32, pid_a,
        "the client is told the server's process ID (issue 19 item 27)"
    );
    assert_eq!(key_a.secret_key.len(), 4, "protocol 3.0: a 4-byte key");

    let query_a = tokio::spawn(async move { a.simple_query("select pg_sleep(60)").await });
    let query_b = tokio::spawn(async move { b.simple_query("select pg_sleep(60)").await });
    let server_a = wait_active(&direct, "session-a").await;
    let server_b = wait_active(&direct, "session-b").await;

    // The right process ID with a wrong key (one bit off) cancels nothing.
    let mut wrong = key_a.clone();
    wrong.secret_key[0] ^= 1;
    plaintext_cancel(&proxy, &wrong).await;
    proxy.wait_audit("the wrong key's cancel event", |e| {
        e["outcome"] == "unmatched"
    });
    assert!(still_active(&direct, server_a).await && still_active(&direct, server_b).await);

    // A's key, in plaintext as PQcancel sends it, stops A only.
    plaintext_cancel(&proxy, &key_a).await;
    let err = tokio::time::timeout(Duration::from_secs(2), query_a)
        .await
        .expect("A cancelled within 2 s")
        .unwrap()
        .expect_err("A was cancelled");
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"));
    assert!(still_active(&direct, server_b).await, "B keeps running");
    // And B's own key stops B.
    tls_cancel(&proxy, &env, &key_b).await;
    let err = tokio::time::timeout(Duration::from_secs(2), query_b)
        .await
        .expect("B cancelled within 2 s")
        .unwrap()
        .expect_err("B was cancelled");
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_after_the_session_ended_does_nothing() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let (client, key) = sniffed_session(proxy.addr(), &env, "short").await;
    drop(client);
    proxy.wait_audit("session end", |e| e["event"] == "session.end");
    plaintext_cancel(&proxy, &key).await;
    let ev = proxy.wait_audit("cancel event", |e| e["event"] == "session.cancel");
    assert_eq!(ev["outcome"], "unmatched");
    assert_eq!(ev["target_session_id"], "unmatched");
    let (client, _conn) = proxy.client(&env, "").await.unwrap();
    client.simple_query("select 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_cancel_can_be_denied_and_attempts_are_rate_limited() {
    let env = Env::new();
    let proxy = env.proxy_with(
        "cancel_plaintext = \"deny\"",
        "[limits]\ncancel_rate = 0.001\ncancel_burst = 4\n",
    );
    let direct = env.direct_client().await;
    let (client, key) = sniffed_session(proxy.addr(), &env, "guarded").await;
    let query = tokio::spawn(async move { client.simple_query("select pg_sleep(60)").await });
    let server_pid = wait_active(&direct, "guarded").await;
    plaintext_cancel(&proxy, &key).await;
    proxy.wait_audit("refusal", |e| e["outcome"] == "plaintext_refused");
    assert!(still_active(&direct, server_pid).await);
    // Inside TLS it works.
    tls_cancel(&proxy, &env, &key).await;
    let err = tokio::time::timeout(Duration::from_secs(2), query)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"));
    // Two attempts are used; two more pass, then the limit holds.
    for _ in 0..4 {
        plaintext_cancel(&proxy, &key).await;
    }
    proxy.wait_audit_count("two rate-limited events", 2, |e| {
        e["outcome"] == "rate_limited"
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_3_2_client_downgraded_by_the_server_can_still_cancel() {
    let env_pg = pgbastion::dev::localpg::LocalPg::start(pgbastion::dev::localpg::LocalPgOptions {
        trust_users: vec!["raw".into()],
        ..Default::default()
    })
    .unwrap();
    let env = Env {
        pg: env_pg,
        certs: ProxyCerts::new(),
    };
    env.direct_client()
        .await
        .execute("create role raw login", &[])
        .await
        .unwrap();
    let proxy = env.proxy("require", "");
    let mut tls = ssl_request_then_tls(raw(proxy.addr()).await, &env).await;
    // A PostgreSQL 18 client asking for 3.2, greased like PG 19 betas.
    let startup = StartupMessage::new(
        ProtocolVersion { major: 3, minor: 2 },
        vec![
            ("user".into(), "raw".into()),
            ("database".into(), "postgres".into()),
            ("_pq_.grease_option".into(), "1".into()),
        ],
    );
    tls.write_all(startup.as_bytes()).await.unwrap();
    let mut negotiated = None;
    let mut key = None;
    loop {
        let (t, body) = read_message(&mut tls).await.unwrap();
        match t {
            b'v' => negotiated = Some(body),
            b'K' => key = Some(message::parse_backend_key_data(&body).unwrap()),
            b'Z' => break,
            b'E' => panic!("{:?}", message::ErrorFields::parse(&body)),
            _ => {}
        }
    }
    // NegotiateProtocolVersion arrives untouched: newest minor 0, and the
    // unrecognised option named.
    let v = negotiated.expect("the server's NegotiateProtocolVersion reaches the client");
    assert_eq!(&v[..4], &[0, 3, 0, 0], "the server offers 3.0");
    assert_eq!(&v[4..8], &1u32.to_be_bytes());
    assert_eq!(&v[8..], b"_pq_.grease_option\0");
    let key = key.expect("CancelKey");
    assert_eq!(
        key.secret_key.len(),
        4,
        "downgraded to 3.0: a 3.0-sized key"
    );
    tls.write_all(&message::build(b'Q', b"select pg_sleep(60)\0"))
        .await
        .unwrap();
    let direct = env.direct_client().await;
    wait_for_async("the raw query to run", Duration::from_secs(10), || async {
        direct
            .query_opt(
                "select 1 from pg_stat_activity where usename = 'raw' and state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .map(|_| ())
    })
    .await;
    plaintext_cancel(&proxy, &key).await;
    let (code, _) = tokio::time::timeout(Duration::from_secs(2), read_error(&mut tls))
        .await
        .unwrap();
    assert_eq!(code, "57014");
}

#[test]
fn libpq_18_encrypted_cancel_protocol_3_2_and_direct_tls() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let base = format!(
        "{} password={} channel_binding=disable",
        env.via_proxy(proxy.addr(), ""),
        env.pg.password
    );
    // libpq 17+ sends the cancel inside TLS (PQcancelCreate).
    let r = libpq18(&format!("{base} max_protocol_version=3.2"), "cancel");
    assert!(r["libpq"].as_i64().unwrap() >= 170000, "{r}");
    assert_eq!(r["sqlstate"], "57014", "{r}");
    assert_eq!(
        r["cancel_error"],
        serde_json::Value::Null,
        "libpq's cancel call succeeds too (a clean TLS close, after forwarding): {r}"
    );
    assert!(r["cancel_seconds"].as_f64().unwrap() < 2.0, "{r}");
    assert_eq!(
        r["backend_pid_seen"], r["server_pid"],
        "libpq's PQbackendPID is the server's process ID (issue 19 item 27)"
    );
    assert_eq!(r["ssl"], true);
    let cancel = proxy.wait_audit("cancel", |e| e["event"] == "session.cancel");
    assert_eq!(cancel["outcome"], "forwarded");
    assert_eq!(cancel["client_tls"]["mode"], "tls", "encrypted cancel");
    let start = proxy.wait_audit("start", |e| {
        e["event"] == "session.start" && e["requested"]["protocol"] == "3.2"
    });
    assert_eq!(start["auth"]["result"], "ok");

    // libpq's own direct TLS (sslnegotiation=direct) with ALPN.
    let r = libpq18(&format!("{base} sslnegotiation=direct"), "query");
    assert_eq!(r["ssl"], true, "{r}");
    let direct = proxy.wait_audit("direct TLS session", |e| {
        e["event"] == "session.start" && e["client_tls"]["alpn"] == "postgresql"
    });
    assert_eq!(direct["auth"]["result"], "ok");
}

/// Issue 19 item 27: BackendKeyData carried a process ID pgbastion made up,
/// so `pg_terminate_backend(backend_pid)` killed nothing and a NOTIFY's
/// sender never matched the listener's own process ID. Now the client is
/// told the server's process ID (the secret key stays pgbastion's own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_is_told_the_servers_process_id() {
    let env = Env {
        pg: pgbastion::dev::localpg::LocalPg::start(pgbastion::dev::localpg::LocalPgOptions {
            trust_users: vec!["raw".into()],
            ..Default::default()
        })
        .unwrap(),
        certs: ProxyCerts::new(),
    };
    let direct = env.direct_client().await;
    direct.execute("create role raw login", &[]).await.unwrap();
    let proxy = env.proxy("require", "");
    let mut tls = ssl_request_then_tls(raw(proxy.addr()).await, &env).await;
    let startup = StartupMessage::new(
        ProtocolVersion { major: 3, minor: 0 },
        vec![
            ("user".into(), "raw".into()),
            ("database".into(), "postgres".into()),
        ],
    );
    tls.write_all(startup.as_bytes()).await.unwrap();
    let mut key = None;
    loop {
        let (t, body) = read_message(&mut tls).await.unwrap();
        match t {
            b'K' => key = Some(message::parse_backend_key_data(&body).unwrap()),
            b'Z' => break,
            b'E' => panic!("{:?}", message::ErrorFields::parse(&body)),
            _ => {}
        }
    }
    let key = key.expect("BackendKeyData");
    tls.write_all(&message::build(
        b'Q',
        b"listen ch; notify ch, 'hi'; select pg_backend_pid()\0",
    ))
    .await
    .unwrap();
    let (mut notified, mut selected) = (None, None);
    loop {
        let (t, body) = read_message(&mut tls).await.unwrap();
        match t {
            // NotificationResponse: the sender's process ID first.
            b'A' => notified = Some(u32::from_be_bytes(body[..4].try_into().unwrap())),
            // DataRow: one column, its length, then the text.
            b'D' => {
                let text = std::str::from_utf8(&body[6..]).unwrap();
                selected = Some(text.parse::<u32>().unwrap());
            }
            b'Z' => break,
            b'E' => panic!("{:?}", message::ErrorFields::parse(&body)),
            _ => {}
        }
    }
    assert_eq!(selected, Some(key.process_id), "select pg_backend_pid()");
    assert_eq!(
        notified,
        Some(key.process_id),
        "a NOTIFY's sender is recognisably this session"
    );
    // Another connection terminates this session by that process ID.
    let terminated: bool = direct
        .query_one(
            "select pg_terminate_backend($1)",
            &[&(key.process_id as i32)],
        )
        .await
        .unwrap()
        .get(0);
    assert!(terminated);
    let (code, _) = tokio::time::timeout(Duration::from_secs(5), read_error(&mut tls))
        .await
        .expect("the terminated session is told at once");
    assert_eq!(code, "57P01");
}
