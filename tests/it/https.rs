//! The https listener's own guarantees (issue 23), with Rust clients
//! against a real PostgreSQL: a request whose client goes away or runs past
//! `http.request_timeout` has its query cancelled on the server; nothing
//! of one request is seen by the next; `X-Forwarded-For` is believed only
//! from configured peers; a passthrough upstream takes a pipelined
//! password (pgbastion logs in with it, the server judges it); and over a
//! WebSocket an SSLRequest is answered `N` and a pipelined startup,
//! password and query are served in one round trip. The real driver's
//! scenarios are in `serverless`.

use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use pgbastion::http::websocket::{WsLimits, WsStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// pgbastion with one https listener (named "tcp", as `Env::proxy_with`
/// names it) in scram mode with a transaction pool, plus `http` keys for
/// `[listener.http]`.
fn https_proxy(env: &Env, http: &str) -> Proxy {
    let pw_file = install_roles(env);
    https_proxy_with(env, &pw_file, http)
}

/// `https_proxy` with the roles already installed (`pw_file`: the lookup
/// role's password file).
fn https_proxy_with(env: &Env, pw_file: &std::path::Path, http: &str) -> Proxy {
    env.proxy_with(
        &format!("protocol = \"https\"\n[listener.http]\n{http}\n"),
        &format!(
            "{}pool_mode = \"transaction\"\npool_size = 4\n",
            auth_query_keys(pw_file)
        ),
    )
}

/// `curl` against the listener, trusting pgbastion's CA; `-i` so the
/// status line is in the output.
fn curl(env: &Env, args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "-i", "--cacert"])
        .arg(&env.proxy_ca)
        .args(args)
        .output()
        .expect("curl runs")
}

fn sql_url(proxy: &Proxy) -> String {
    format!("https://localhost:{}/sql", proxy.addr().port())
}

fn app_conn_header(password: &str) -> String {
    format!("Neon-Connection-String: postgresql://app:{password}@localhost/postgres")
}

/// The JSON body of a response printed by `curl -i`.
fn body_json(o: &Output) -> serde_json::Value {
    let text = stdout(o);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Backends running `pg_sleep` now.
async fn sleeping(direct: &tokio_postgres::Client) -> i64 {
    direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%pg_sleep%' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn wait_sleeping(direct: &tokio_postgres::Client, n: i64, what: &str) {
    wait_for_async(what, Duration::from_secs(15), || async {
        (sleeping(direct).await == n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_or_times_out_has_its_query_cancelled() {
    let env = Env::new();
    let proxy = https_proxy(&env, "request_timeout = \"2s\"");
    let direct = env.direct_client().await;
    let (url, conn) = (sql_url(&proxy), app_conn_header(APP_PASSWORD));
    let body = r#"{"query":"select pg_sleep(60)"}"#;

    // curl gives up after 1 s and closes its connection.
    let (u, c) = (url.clone(), conn.clone());
    let ca = env.proxy_ca.clone();
    let gone = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", "--max-time", "1", "--cacert"])
            .arg(ca)
            .args(["-H", &c, "-d", body, &u])
            .output()
            .unwrap()
    });
    wait_sleeping(&direct, 1, "the query to start").await;
    gone.await.unwrap();
    wait_sleeping(&direct, 0, "the abandoned query to be cancelled").await;

    // Past http.request_timeout: 504 with SQLSTATE 57014, query cancelled.
    let out = tokio::task::spawn_blocking({
        let env_ca = env.proxy_ca.clone();
        move || {
            Command::new("curl")
                .args(["-sS", "-i", "--cacert"])
                .arg(env_ca)
                .args(["-H", &conn, "-d", body, &url])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(stdout(&out).starts_with("HTTP/1.1 504"), "{}", stdout(&out));
    assert_eq!(body_json(&out)["code"], "57014");
    wait_sleeping(&direct, 0, "the timed-out query to be cancelled").await;
    let cancels = proxy.wait_audit_count("both cancels audited", 2, |e| {
        e["event"] == "session.cancel"
    });
    assert!(
        cancels.iter().all(|e| e["outcome"] == "forwarded"),
        "{cancels:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_of_one_request_is_seen_by_the_next() {
    let env = Env::new();
    let proxy = https_proxy(&env, "");
    let conn = app_conn_header(APP_PASSWORD);
    let url = sql_url(&proxy);
    let set = r#"{"query":"select set_config('pgbastion.test', 'leaked', false)"}"#;
    let out = curl(&env, &["-H", &conn, "-d", set, &url]);
    assert!(stdout(&out).starts_with("HTTP/1.1 200"), "{}", stdout(&out));
    for _ in 0..4 {
        let get = r#"{"query":"select current_setting('pgbastion.test', true) as v"}"#;
        let out = curl(&env, &["-H", &conn, "-d", get, &url]);
        let v = &body_json(&out)["rows"][0]["v"];
        assert!(v.is_null() || v == "", "a setting leaked: {v}");
    }
    // A batch that fails is rolled back as a whole.
    let pg = env.direct_client().await;
    pg.batch_execute("CREATE TABLE IF NOT EXISTS batch_t (x int); GRANT ALL ON batch_t TO app")
        .await
        .unwrap();
    let batch =
        r#"{"queries":[{"query":"insert into batch_t values (1)"},{"query":"select 1/0"}]}"#;
    let out = curl(&env, &["-H", &conn, "-d", batch, &url]);
    assert!(stdout(&out).starts_with("HTTP/1.1 400"), "{}", stdout(&out));
    assert_eq!(body_json(&out)["code"], "22012");
    let n: i64 = pg
        .query_one("select count(*) from batch_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the failed batch's insert was committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_believed_only_from_trusted_peers() {
    let env = Env::new();
    let pw_file = install_roles(&env);
    let trusting = https_proxy_with(&env, &pw_file, "forwarded_for_trusted = [\"127.0.0.1/32\"]");
    let conn = app_conn_header(APP_PASSWORD);
    let select = r#"{"query":"select 1"}"#;
    let xff = "X-Forwarded-For: 198.51.100.1, 203.0.113.9";
    let out = curl(
        &env,
        &["-H", &conn, "-H", xff, "-d", select, &sql_url(&trusting)],
    );
    assert!(stdout(&out).starts_with("HTTP/1.1 200"), "{}", stdout(&out));
    let start = trusting.wait_audit("session.start", |e| e["event"] == "session.start");
    assert_eq!(start["client"]["addr"], "203.0.113.9", "{start}");
    assert_eq!(start["forwarded_by"]["addr"], "127.0.0.1", "{start}");
    assert_eq!(start["transport"], "http");
    drop(trusting);

    let untrusting = https_proxy_with(&env, &pw_file, "");
    let out = curl(
        &env,
        &["-H", &conn, "-H", xff, "-d", select, &sql_url(&untrusting)],
    );
    assert!(stdout(&out).starts_with("HTTP/1.1 200"), "{}", stdout(&out));
    let start = untrusting.wait_audit("session.start", |e| e["event"] == "session.start");
    assert_eq!(start["client"]["addr"], "127.0.0.1", "{start}");
    assert!(start.get("forwarded_by").is_none(), "{start}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passthrough_upstream_takes_a_pipelined_password() {
    let env = Env::new();
    install_roles(&env);
    let proxy = env.proxy_with("protocol = \"https\"", "");
    let url = sql_url(&proxy);
    let select = r#"{"query":"select current_user as u"}"#;
    let out = curl(
        &env,
        &["-H", &app_conn_header(APP_PASSWORD), "-d", select, &url],
    );
    assert!(stdout(&out).starts_with("HTTP/1.1 200"), "{}", stdout(&out));
    assert_eq!(body_json(&out)["rows"][0]["u"], "app");
    let start = proxy.wait_audit("session.start", |e| e["event"] == "session.start");
    assert_eq!(start["auth"]["mode"], "passthrough", "{start}");
    assert_eq!(start["auth"]["client"]["mechanism"], "password", "{start}");
    assert_eq!(
        start["auth"]["server"]["mechanism"], "SCRAM-SHA-256-PLUS",
        "{start}"
    );
    assert_eq!(start["auth"]["server"]["channel_binding"], true, "{start}");
    // The server judges the password, and its answer reaches the client.
    let out = curl(&env, &["-H", &app_conn_header("wrong"), "-d", select, &url]);
    assert!(stdout(&out).starts_with("HTTP/1.1 400"), "{}", stdout(&out));
    assert_eq!(body_json(&out)["code"], "28P01");
}

/// A person known by a client certificate logs in by identity over HTTPS:
/// the password the connection string must carry is read and wiped, never
/// forwarded (were it, the server would see a PasswordMessage where it
/// expects a query).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_login_over_https_drops_the_password_the_client_sent() {
    let env = Env::new();
    let pw_file = install_roles(&env);
    let dir = env.dir.path();
    let people = pgbastion::dev::certs::Ca::new("people CA").unwrap();
    let people_ca = people.write_cert(dir, "people-ca").unwrap();
    let alice = person(&people, dir, "alice");
    let app_pw = dir.join("app.password");
    write_private(&app_pw, &format!("{APP_PASSWORD}\n"));
    let proxy = env.proxy_with(
        &format!(
            "protocol = \"https\"\nidentity = \"client_cert\"\nclient_ca = \"{}\"\n\
             cert_identity = [\"email\"]",
            people_ca.display()
        ),
        &format!(
            "{}pool_mode = \"transaction\"\npool_size = 4\n\
             [[rule]]\nnames = [\"alice@example.com\"]\nusers = [\"app\"]\nlogin = \"identity\"\n\
             [[credential]]\nuser = \"app\"\npassword_file = \"{}\"\n",
            auth_query_keys(&pw_file),
            app_pw.display()
        ),
    );
    let (cert, key) = (alice.0.to_str().unwrap(), alice.1.to_str().unwrap());
    let select = r#"{"query":"select current_user as u"}"#;
    for _ in 0..2 {
        let out = curl(
            &env,
            &[
                "--cert",
                cert,
                "--key",
                key,
                "-H",
                &app_conn_header("not-needed"),
                "-d",
                select,
                &sql_url(&proxy),
            ],
        );
        assert!(stdout(&out).starts_with("HTTP/1.1 200"), "{}", stdout(&out));
        assert_eq!(body_json(&out)["rows"][0]["u"], "app", "{}", stdout(&out));
    }
    let start = proxy.wait_audit("session.start", |e| e["event"] == "session.start");
    assert_eq!(start["auth"]["mode"], "identity", "{start}");
    assert_eq!(start["identity"]["name"], "alice@example.com", "{start}");
    assert_eq!(start["transport"], "http", "{start}");
    let audit = serde_json::to_string(&proxy.audit_events()).unwrap();
    assert!(
        !audit.contains("not-needed"),
        "the password reached the audit log"
    );
}

/// A WebSocket to the listener: TLS trusting pgbastion's CA, the upgrade
/// written by hand, then the client's side of the byte stream.
async fn websocket(
    env: &Env,
    proxy: &Proxy,
) -> WsStream<impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> {
    let tcp = raw(proxy.addr()).await;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls_config(
        &env.proxy_ca,
        &[b"http/1.1"],
    )));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("TLS to the listener");
    let port = proxy.addr().port();
    tls.write_all(
        format!(
            "GET /v2 HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tls.read_u8().await.expect("the upgrade response"));
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    WsStream::client(
        tls,
        WsLimits {
            max_message: 1 << 20,
        },
    )
    .await
}

fn startup(user: &str) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", "postgres")] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_websocket_sslrequest_gets_n_and_a_pipelined_login_runs_in_one_round_trip() {
    let env = Env::new();
    let proxy = https_proxy(&env, "");
    let mut ws = websocket(&env, &proxy).await;
    // An SSLRequest inside wss: answered N, and the session goes on.
    ws.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).await.unwrap();
    ws.flush().await.unwrap();
    assert_eq!(ws.read_u8().await.unwrap(), b'N');
    // Startup, password and a query in one write, as the driver sends them.
    let mut out = startup("app");
    out.extend(tagged(b'p', format!("{APP_PASSWORD}\0").as_bytes()));
    out.extend(tagged(b'Q', b"select 40 + 2\0"));
    ws.write_all(&out).await.unwrap();
    ws.flush().await.unwrap();
    let mut seen = Vec::new();
    let mut value = None;
    loop {
        let (t, body) = read_message(&mut ws).await.expect("the session's answer");
        seen.push(t as char);
        if t == b'D' {
            value = Some(String::from_utf8_lossy(&body[6..]).into_owned());
        }
        if t == b'E' {
            panic!("error: {}", String::from_utf8_lossy(&body));
        }
        if t == b'C' {
            break;
        }
    }
    assert_eq!(value.as_deref(), Some("42"), "{seen:?}");
    // AuthenticationCleartextPassword, then AuthenticationOk.
    assert_eq!(seen[..2], ['R', 'R'], "{seen:?}");
    let start = proxy.wait_audit("session.start", |e| e["event"] == "session.start");
    assert_eq!(start["transport"], "websocket", "{start}");
    assert_eq!(start["auth"]["client"]["mechanism"], "password", "{start}");
    assert_eq!(start["auth"]["client"]["channel_binding"], false, "{start}");
    assert_eq!(start["auth"]["server"]["channel_binding"], true, "{start}");

    // A wrong pipelined password is refused like a wrong SCRAM proof.
    let mut ws = websocket(&env, &proxy).await;
    let mut out = startup("app");
    out.extend(tagged(b'p', b"wrong\0"));
    ws.write_all(&out).await.unwrap();
    ws.flush().await.unwrap();
    let (code, message) = read_error(&mut ws).await;
    assert_eq!(code, "28P01", "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_are_checked_and_capped() {
    let env = Env::new();
    let proxy = https_proxy(
        &env,
        "max_websockets = 1\ncors_origins = [\"https://app.example.com\"]",
    );
    let url = format!("https://localhost:{}/v2", proxy.addr().port());
    let upgrade = |extra: &[&str]| {
        let mut args = vec![
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: websocket",
            "-H",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            // A 101 leaves curl waiting on the WebSocket: it gives up then.
            "--max-time",
            "2",
        ];
        args.extend_from_slice(extra);
        args.push(&url);
        stdout(&curl(&env, &args))
    };
    // A version other than 13: 426 naming the version pgbastion speaks.
    let out = upgrade(&["-H", "Sec-WebSocket-Version: 8"]);
    assert!(out.starts_with("HTTP/1.1 426"), "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{out}"
    );
    // A Host naming another server than the TLS server name: 421.
    let out = upgrade(&[
        "-H",
        "Sec-WebSocket-Version: 13",
        "-H",
        "Host: other.example.com",
    ]);
    assert!(out.starts_with("HTTP/1.1 421"), "{out}");
    // So is a connection string naming another host than TLS did.
    let sql = format!("https://localhost:{}/sql", proxy.addr().port());
    let elsewhere = format!(
        "Neon-Connection-String: postgresql://app:{APP_PASSWORD}@other.example.com/postgres"
    );
    let post = curl(
        &env,
        &["-H", &elsewhere, "-d", r#"{"query":"select 1"}"#, &sql],
    );
    assert!(
        stdout(&post).starts_with("HTTP/1.1 421"),
        "{}",
        stdout(&post)
    );
    assert!(
        stdout(&post).contains("other.example.com"),
        "{}",
        stdout(&post)
    );
    // A page from an origin http.cors_origins does not name: 403 (browsers
    // apply no CORS to WebSockets; this is the only check), for SQL over
    // HTTP too.
    let out = upgrade(&[
        "-H",
        "Sec-WebSocket-Version: 13",
        "-H",
        "Origin: https://evil.example",
    ]);
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(out.contains("http.cors_origins"), "{out}");
    let post = curl(
        &env,
        &[
            "-H",
            "Origin: https://evil.example",
            "-H",
            &app_conn_header(APP_PASSWORD),
            "-d",
            r#"{"query":"select 1"}"#,
            &sql,
        ],
    );
    assert!(
        stdout(&post).starts_with("HTTP/1.1 403"),
        "{}",
        stdout(&post)
    );
    // A head over 64 KiB: refused before anything else. (hyper checks
    // after each read, and one read may take up to 64 KiB more, so the
    // head here is well past twice the limit.)
    let big = env.dir.path().join("big-header");
    std::fs::write(&big, format!("X-Big: {}\n", "a".repeat(200 * 1024))).unwrap();
    let big = format!("@{}", big.display());
    let out = upgrade(&["-H", "Sec-WebSocket-Version: 13", "-H", &big]);
    // pgbastion answers 431 and closes with the rest of the head unread,
    // which resets the connection: the client may see the reset before it
    // reads the 431. Either way the head was refused, never upgraded.
    assert!(out.starts_with("HTTP/1.1 431") || out.is_empty(), "{out}");
    // One WebSocket open: the next is 503 (http.max_websockets = 1) ...
    let held = websocket(&env, &proxy).await;
    let out = upgrade(&["-H", "Sec-WebSocket-Version: 13"]);
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    // ... until it closes.
    drop(held);
    // (From the origin it names, which is let in.)
    let out = wait_for(
        "the WebSocket's place to come free",
        Duration::from_secs(10),
        || {
            let out = upgrade(&[
                "-H",
                "Sec-WebSocket-Version: 13",
                "-H",
                "Origin: https://app.example.com",
            ]);
            out.starts_with("HTTP/1.1 101").then_some(out)
        },
    );
    assert!(
        out.contains("access-control-allow-origin: https://app.example.com"),
        "{out}"
    );
}
