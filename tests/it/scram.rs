//! SCRAM termination (`auth = "scram"`) against a real PostgreSQL and real
//! clients: default libpq settings connect with both legs channel-bound;
//! wrong passwords, unknown users and unusable verifiers get their
//! answers; verifiers come from a secrets file or the lookup
//! function; clients and servers that break the rules are refused; failed
//! logins are throttled.

use std::time::Duration;

use crate::common::*;
use base64::Engine;
use pgbastion::auth::scram::{ClientExchange, Credential, Verifier};
use pgbastion::protocol::message::{self, AuthRequest};
use pgbastion::protocol::startup::{ProtocolVersion, StartupMessage};
use pgbastion::tls::channel_binding::tls_server_end_point;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// pgbastion (TLS required) in scram mode with verifiers from auth_query.
fn scram_proxy(env: &Env) -> Proxy {
    let pw_file = install_roles(env);
    env.proxy("require", &auth_query_keys(&pw_file))
}

/// A libpq connection string to pgbastion with nothing but host, port,
/// user and database: every TLS and channel binding setting at its default.
fn defaults(proxy: &Proxy, user: &str) -> String {
    format!(
        "host=localhost port={} user={user} dbname=postgres",
        proxy.addr().port()
    )
}

/// tokio-postgres over TLS (verifying pgbastion) with a channel binding
/// setting.
async fn tokio_pg(
    proxy: &Proxy,
    env: &Env,
    user: &str,
    password: &str,
    channel_binding: &str,
) -> Result<PgConn, tokio_postgres::Error> {
    tokio_pg_to(proxy, &env.certs, user, password, channel_binding).await
}

async fn tokio_pg_to(
    proxy: &Proxy,
    certs: &ProxyCerts,
    user: &str,
    password: &str,
    channel_binding: &str,
) -> Result<PgConn, tokio_postgres::Error> {
    let conninfo = format!(
        "{} password={password} sslmode=require channel_binding={channel_binding} connect_timeout=20",
        defaults(proxy, user)
    );
    let (client, conn) = tokio_postgres::connect(&conninfo, tls_connector(&certs.proxy_ca)).await?;
    Ok((client, tokio::spawn(conn)))
}

/// The SQLSTATE and message pgbastion (or the server) refused with.
fn refusal(e: &tokio_postgres::Error) -> (String, String) {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got: {e:?}"));
    (db.code().code().to_owned(), db.message().to_owned())
}

fn assert_both_legs_bound(start: &serde_json::Value) {
    let auth = &start["auth"];
    assert_eq!(auth["mode"], "scram", "{start}");
    assert_eq!(auth["result"], "ok", "{start}");
    for leg in ["client", "server"] {
        assert_eq!(
            auth[leg]["mechanism"], "SCRAM-SHA-256-PLUS",
            "{leg}: {start}"
        );
        assert_eq!(auth[leg]["channel_binding"], true, "{leg}: {start}");
    }
}

#[test]
fn stock_clients_connect_with_default_settings_and_both_legs_are_bound() {
    let env = Env::new();
    let proxy = scram_proxy(&env);
    let ssl_query = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";

    // psql 15 with nothing set: sslmode=prefer, channel_binding=prefer.
    let out = psql(&defaults(&proxy, "app"), APP_PASSWORD, ssl_query);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "t", "the server sees TLS from pgbastion");
    // verify-full toward pgbastion, and binding demanded by the client.
    let strict = format!(
        "{} channel_binding=require",
        env.via_proxy(proxy.addr(), "")
            .replace("user=postgres", "user=app")
    );
    let out = psql(&strict, APP_PASSWORD, "select current_user");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "app");
    // libpq 18 (psycopg's own) with its defaults.
    let r = libpq18(
        &format!("{} password={APP_PASSWORD}", defaults(&proxy, "app")),
        "query",
    );
    assert_eq!(r["ssl"], true, "{r}");
    assert!(r["libpq"].as_i64().unwrap() >= 180000, "{r}");
    // Asking for protocol 3.2: PostgreSQL 15's NegotiateProtocolVersion
    // reaches the client (after its SCRAM proof, before AuthenticationOk), untouched.
    let r = libpq18(
        &format!(
            "{} password={APP_PASSWORD} max_protocol_version=3.2",
            defaults(&proxy, "app")
        ),
        "query",
    );
    assert_eq!(r["ssl"], true, "{r}");

    let starts = proxy.wait_audit_count("four sessions", 4, |e| e["event"] == "session.start");
    for start in &starts {
        assert_both_legs_bound(start);
        assert_eq!(start["requested"]["user"], "app");
    }
    assert!(starts.iter().any(|e| e["requested"]["protocol"] == "3.2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_with_channel_binding_required() {
    let env = Env::new();
    let proxy = scram_proxy(&env);
    let (client, _conn) = tokio_pg(&proxy, &env, "app", APP_PASSWORD, "require")
        .await
        .expect("channel binding required by the client works through pgbastion");
    let row = client
        .query_one(
            "select current_user::text, ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "app");
    assert!(row.get::<_, bool>(1));
    let start = proxy.wait_audit("start", |e| e["event"] == "session.start");
    assert_both_legs_bound(&start);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unknown_user_get_the_same_answer() {
    let env = Env::new();
    let proxy = scram_proxy(&env);
    let wrong = refusal(
        &tokio_pg(&proxy, &env, "app", "not-the-password", "prefer")
            .await
            .err()
            .unwrap(),
    );
    let unknown = refusal(
        &tokio_pg(&proxy, &env, "ghost", "not-the-password", "prefer")
            .await
            .err()
            .unwrap(),
    );
    assert_eq!(wrong.0, "28P01");
    assert_eq!(wrong.1, "password authentication failed for user \"app\"");
    assert_eq!(unknown.0, "28P01");
    assert_eq!(
        unknown.1,
        wrong.1.replace("\"app\"", "\"ghost\""),
        "an unknown user cannot be told apart"
    );
    let failed = proxy.wait_audit_count("two failures", 2, |e| {
        e["event"] == "session.rejected" && e["reason"] == "auth_failed"
    });
    for e in &failed {
        assert_eq!(e["sqlstate"], "28P01");
        assert_eq!(e["auth"]["mode"], "scram");
        let line = e.to_string();
        assert!(
            !line.contains("not-the-password"),
            "no secret in the audit: {line}"
        );
    }
}

/// What a client without the password learns of `user`: the SASL offer,
/// the shape of the server-first message (salt length, iteration count),
/// and the error after a wrong proof.
#[derive(Debug, PartialEq)]
struct Probe {
    offer: Vec<String>,
    salt: Vec<u8>,
    iterations: String,
    code: String,
    message: String,
}

async fn probe(proxy: &Proxy, env: &Env, user: &str) -> Probe {
    let (mut s, offer, binding) = raw_scram_client_as(proxy, env, user).await;
    let (ex, first) = ClientExchange::start(&offer, Some(binding), "probe-nonce").unwrap();
    let server_first = send_first(&mut s, ex.mechanism, &first).await;
    let attr = |name: &str| {
        server_first
            .split(',')
            .find_map(|a| a.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {server_first}"))
            .to_owned()
    };
    assert!(attr("r=").starts_with("probe-nonce"), "{server_first}");
    let (salt, iterations) = (B64.decode(attr("s=")).unwrap(), attr("i="));
    let (_, final_msg) = ex
        .respond(server_first.as_bytes(), &Credential::Password(b"wrong"))
        .unwrap();
    s.write_all(&message::sasl_response(final_msg.as_bytes()))
        .await
        .unwrap();
    let (code, message) = read_error(&mut s).await;
    Probe {
        offer,
        salt,
        iterations,
        code,
        message: message.replace(&format!("\"{user}\""), "\"USER\""),
    }
}

/// issue 19 item 4: users with an MD5, expired or no password, and users
/// that do not exist, get exactly what a wrong password of a real user
/// gets (a full exchange, then 28P01); the audit says the real reason; each
/// counts as a failed login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_without_a_scram_verifier_look_like_a_wrong_password() {
    let env = Env::new();
    let pw_file = install_roles(&env);
    let proxy = env.proxy(
        "require",
        &format!(
            "{}\n[limits]\nfailed_logins_per_address = 5\n",
            auth_query_keys(&pw_file)
        ),
    );
    env.pg
        .run_sql(
            "SET password_encryption = 'md5';\n\
             CREATE ROLE legacy LOGIN PASSWORD 'legacy-secret';\n\
             RESET password_encryption;\n\
             CREATE ROLE expired LOGIN PASSWORD 'x' VALID UNTIL '2000-01-01';\n\
             CREATE ROLE nopw LOGIN;",
        )
        .unwrap();
    let wrong = probe(&proxy, &env, "app").await;
    assert_eq!(wrong.code, "28P01");
    assert_eq!(
        wrong.message,
        "password authentication failed for user \"USER\""
    );
    assert_eq!(wrong.offer, ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
    for user in ["ghost", "legacy", "expired", "nopw"] {
        let got = probe(&proxy, &env, user).await;
        assert_eq!(
            (
                &got.offer,
                got.salt.len(),
                &got.iterations,
                &got.code,
                &got.message
            ),
            (
                &wrong.offer,
                wrong.salt.len(),
                &wrong.iterations,
                &wrong.code,
                &wrong.message
            ),
            "{user} looks like a wrong password"
        );
    }
    let reason = |user: &str| {
        proxy.wait_audit(user, |e| {
            e["event"] == "session.rejected" && e["requested"]["user"] == user
        })
    };
    assert_eq!(reason("app")["reason"], "auth_failed");
    assert_eq!(reason("ghost")["reason"], "auth_failed");
    for (user, why) in [
        ("legacy", "MD5"),
        ("expired", "has expired"),
        ("nopw", "no password"),
    ] {
        let e = reason(user);
        assert_eq!(e["reason"], "verifier_not_scram", "{e}");
        assert_eq!(e["sqlstate"], "28P01", "{e}");
        assert!(e["message"].as_str().unwrap().contains(why), "{e}");
    }
    // Five failures from this address: the budget is spent, the right
    // password waits too.
    let (code, msg) = refusal(
        &tokio_pg(&proxy, &env, "app", APP_PASSWORD, "prefer")
            .await
            .err()
            .unwrap(),
    );
    assert_eq!(code, "28000");
    assert!(msg.contains("too many failed login attempts"), "{msg}");
}

/// issue 19 item 5: an unknown user's salt comes from a key kept in a file
/// (made once, mode 0600), so two instances, or one before and after a
/// restart, give the same salt, as they do for a real user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_users_get_the_same_salt_from_every_instance() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let pw_file = install_roles(&env);
    let key = env.dir.path().join("state/mock_key");
    let with_key = |key: &std::path::Path| {
        env.proxy(
            "require",
            &format!(
                "{}\n[auth]\nmock_key_file = \"{}\"\n",
                auth_query_keys(&pw_file),
                key.display()
            ),
        )
    };
    let one = with_key(&key);
    let meta = std::fs::metadata(&key).expect("the key file is made at start");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let made = std::fs::read(&key).unwrap();
    assert_eq!(made.len(), 32);
    let two = with_key(&key);
    assert_eq!(std::fs::read(&key).unwrap(), made, "reused, not remade");
    let first = probe(&one, &env, "ghost").await;
    assert_eq!(first.salt.len(), 16);
    assert_eq!(probe(&one, &env, "ghost").await, first, "asked twice");
    assert_eq!(probe(&two, &env, "ghost").await, first, "another instance");
    drop(one);
    drop(two);
    let restarted = with_key(&key);
    assert_eq!(
        probe(&restarted, &env, "ghost").await,
        first,
        "after a restart"
    );
    let other = with_key(&env.dir.path().join("other_key"));
    assert_ne!(probe(&other, &env, "ghost").await.salt, first.salt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_password_takes_effect_at_the_next_login() {
    let env = Env::new();
    let proxy = scram_proxy(&env);
    let direct = env.direct_client().await;
    tokio_pg(&proxy, &env, "app", APP_PASSWORD, "require")
        .await
        .expect("first password");
    direct
        .batch_execute("ALTER ROLE app PASSWORD 'rotated-secret'")
        .await
        .unwrap();
    tokio_pg(&proxy, &env, "app", "rotated-secret", "require")
        .await
        .expect("the new password works at once");
    let (code, _) = refusal(
        &tokio_pg(&proxy, &env, "app", APP_PASSWORD, "require")
            .await
            .err()
            .unwrap(),
    );
    assert_eq!(code, "28P01", "the old password no longer works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_failure_refuses_everyone_with_a_clear_error() {
    let env = Env::new();
    install_roles(&env);
    let bad = env.dir.path().join("wrong-auth-password");
    write_private(&bad, "not-the-lookup-password");
    let proxy = env.proxy("require", &auth_query_keys(&bad));
    let (code, msg) = refusal(
        &tokio_pg(&proxy, &env, "app", APP_PASSWORD, "prefer")
            .await
            .err()
            .unwrap(),
    );
    assert_eq!(code, "08001");
    assert!(msg.contains("could not look up"), "{msg}");
    let e = proxy.wait_audit("unavailable", |e| e["reason"] == "verifier_unavailable");
    assert!(
        e["message"].as_str().unwrap().contains("pgbastion_auth"),
        "the log names the lookup role: {e}"
    );
}

/// The verifier PostgreSQL stores for `role`, read as the superuser.
async fn stored_verifier(env: &Env, role: &str) -> String {
    env.direct_client()
        .await
        .query_one(
            "select rolpassword from pg_authid where rolname = $1",
            &[&role],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_file_stale_verifier_and_sighup_reload_from_flags() {
    let env = Env::new();
    install_roles(&env);
    let secrets = env.dir.path().join("userlist.txt");
    // A verifier for a password the server no longer has.
    let old = Verifier::from_password(b"old-secret", b"some old salt", 4096);
    write_private(&secrets, &format!("\"app\" \"{}\"\n", old.to_text()));

    let port = pgbastion::dev::localpg::free_port().unwrap();
    let log = env.dir.path().join("stderr.log");
    let proc = Running(
        flag_form(&env, port, &[])
            .args(["--auth", "scram", "--secrets-file"])
            .arg(&secrets)
            .args(["--audit-log", "off"])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let addr = wait_listening(port);
    let connect = |password: &'static str| {
        let conninfo = format!(
            "host=localhost port={} user=app dbname=postgres password={password} sslmode=require connect_timeout=20",
            addr.port()
        );
        let tls = tls_connector(&env.certs.proxy_ca);
        async move {
            tokio_postgres::connect(&conninfo, tls)
                .await
                .map(|(c, conn)| (c, tokio::spawn(conn)))
        }
    };

    // pgbastion accepts the old password (its verifier says so), the
    // server does not: the client is told the verifier is out of date.
    let (code, msg) = refusal(&connect("old-secret").await.err().unwrap());
    assert_eq!(code, "28000");
    assert!(msg.contains("does not match the database server"), "{msg}");
    // The log is written off the session path: wait for the line.
    wait_for(
        "the log to name the user and the file to refresh",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&log).ok().filter(|text| {
                text.contains("verifier") && text.contains(&secrets.display().to_string())
            })
        },
    );

    // The current verifier, and SIGHUP: the new file is used at once.
    std::fs::write(
        &secrets,
        format!(
            "; from pg_authid\n\"app\" \"{}\"\n",
            stored_verifier(&env, "app").await
        ),
    )
    .unwrap();
    signal(proc.0.id(), "-HUP");
    wait_log(&log, "secrets file reloaded");
    let (client, _conn) = connect(APP_PASSWORD)
        .await
        .expect("the refreshed verifier works");
    assert_eq!(
        client
            .query_one("select current_user::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        "app"
    );

    // A broken file is refused; the entries in use stay.
    std::fs::write(&secrets, "\"app\" oops\n").unwrap();
    signal(proc.0.id(), "-HUP");
    wait_for("the refusal", Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("secrets file reload refused")
            .then_some(())
    });
    connect(APP_PASSWORD)
        .await
        .expect("still the previous entries");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("oops"), "a secrets line is never logged");
}

/// issue 19 item 14: with a secrets file and auth_query both configured,
/// a user in the file costs an auth_query round trip too, so the time a
/// login takes does not tell who is in the file. The query records each
/// user it is asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_both_sources_auth_query_runs_for_file_users_too() {
    let env = Env::new();
    let pw_file = install_roles(&env);
    env.pg
        .run_sql(
            "CREATE TABLE public.lookups (usename text);\n\
             GRANT INSERT ON public.lookups TO pgbastion_auth;",
        )
        .unwrap();
    let secrets = env.dir.path().join("userlist.txt");
    write_private(
        &secrets,
        &format!("\"app\" \"{}\"\n", stored_verifier(&env, "app").await),
    );
    let proxy = env.proxy(
        "require",
        &format!(
            "{}secrets_file = \"{}\"\nauth_query = \"WITH seen AS (INSERT INTO public.lookups VALUES ($1)) \
             SELECT usename, passwd FROM pgbastion.lookup($1)\"\n",
            auth_query_keys(&pw_file),
            secrets.display()
        ),
    );
    tokio_pg(&proxy, &env, "app", APP_PASSWORD, "require")
        .await
        .expect("a user in the file logs in");
    let wrong = refusal(
        &tokio_pg(&proxy, &env, "app", "wrong", "require")
            .await
            .err()
            .unwrap(),
    );
    assert_eq!(wrong.0, "28P01");
    let looked_up: Vec<String> = env
        .direct_client()
        .await
        .query("select usename from public.lookups", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(looked_up, ["app", "app"], "auth_query ran for each login");
}

/// A raw client over TLS to pgbastion: StartupMessage sent, the SASL
/// offer read. Returns the stream, the offer, and the binding data of
/// pgbastion's certificate.
async fn raw_scram_client(
    proxy: &Proxy,
    env: &Env,
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Vec<String>,
    Vec<u8>,
) {
    raw_scram_client_as(proxy, env, "app").await
}

async fn raw_scram_client_as(
    proxy: &Proxy,
    env: &Env,
    user: &str,
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Vec<String>,
    Vec<u8>,
) {
    let mut tls = ssl_request_then_tls(raw(proxy.addr()).await, &env.certs).await;
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let startup = StartupMessage::new(
        ProtocolVersion { major: 3, minor: 0 },
        vec![
            ("user".into(), user.into()),
            ("database".into(), "postgres".into()),
        ],
    );
    tls.write_all(startup.as_bytes()).await.unwrap();
    let (t, body) = read_message(&mut tls).await.unwrap();
    assert_eq!(t, b'R');
    let AuthRequest::Sasl(offer) = AuthRequest::parse(&body).unwrap() else {
        panic!("expected AuthenticationSASL");
    };
    (tls, offer, tls_server_end_point(&cert).unwrap())
}

/// Sends a SASLInitialResponse and returns the server-first message.
async fn send_first<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    mechanism: &str,
    first: &str,
) -> String {
    s.write_all(&message::sasl_initial_response(mechanism, first.as_bytes()))
        .await
        .unwrap();
    let (t, body) = read_message(s).await.unwrap();
    assert_eq!(t, b'R', "{}", String::from_utf8_lossy(&body));
    match AuthRequest::parse(&body).unwrap() {
        AuthRequest::SaslContinue(data) => String::from_utf8(data).unwrap(),
        other => panic!("expected SASLContinue, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_clients_breaking_scram_rules_are_refused_and_service_goes_on() {
    let env = Env::new();
    let proxy = scram_proxy(&env);
    let pw = Credential::Password(APP_PASSWORD.as_bytes());

    // gs2 "y" although PLUS was offered: a downgrade.
    let (mut s, offer, _) = raw_scram_client(&proxy, &env).await;
    assert_eq!(
        offer,
        ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"],
        "PLUS offered over TLS"
    );
    s.write_all(&message::sasl_initial_response(
        "SCRAM-SHA-256",
        b"y,,n=,r=abc",
    ))
    .await
    .unwrap();
    let (code, msg) = read_error(&mut s).await;
    assert_eq!(code, "08P01");
    assert!(msg.contains("downgrade"), "{msg}");

    // PLUS with the binding data of another certificate.
    let (mut s, offer, _) = raw_scram_client(&proxy, &env).await;
    let (ex, first) = ClientExchange::start(&offer, Some(vec![7; 32]), "nonce1").unwrap();
    let server_first = send_first(&mut s, ex.mechanism, &first).await;
    let (_, final_msg) = ex.respond(server_first.as_bytes(), &pw).unwrap();
    s.write_all(&message::sasl_response(final_msg.as_bytes()))
        .await
        .unwrap();
    let (code, msg) = read_error(&mut s).await;
    assert_eq!(
        (code.as_str(), msg.as_str()),
        ("08P01", "SCRAM channel binding check failed")
    );

    // The right binding, but the nonce changed in the final message.
    let (mut s, offer, binding) = raw_scram_client(&proxy, &env).await;
    let (ex, first) = ClientExchange::start(&offer, Some(binding), "nonce2").unwrap();
    let server_first = send_first(&mut s, ex.mechanism, &first).await;
    let (_, final_msg) = ex.respond(server_first.as_bytes(), &pw).unwrap();
    let tampered = final_msg.replacen("r=nonce2", "r=nonceX", 1);
    s.write_all(&message::sasl_response(tampered.as_bytes()))
        .await
        .unwrap();
    assert_eq!(read_error(&mut s).await.1, "SCRAM nonce mismatch");

    // Malformed client-first, malformed client-final, a mechanism never
    // offered, and a message far over the limit.
    let (mut s, _, _) = raw_scram_client(&proxy, &env).await;
    s.write_all(&message::sasl_initial_response("SCRAM-SHA-256", b"garbage"))
        .await
        .unwrap();
    let (code, msg) = read_error(&mut s).await;
    assert_eq!(code, "08P01");
    assert!(msg.contains("malformed SCRAM message"), "{msg}");

    let (mut s, _, _) = raw_scram_client(&proxy, &env).await;
    send_first(&mut s, "SCRAM-SHA-256", "n,,n=,r=abc").await;
    s.write_all(&message::sasl_response(b"c=biws,r=abc"))
        .await
        .unwrap();
    assert!(read_error(&mut s).await.1.contains("lacks the proof"));

    let (mut s, _, _) = raw_scram_client(&proxy, &env).await;
    s.write_all(&message::sasl_initial_response(
        "SCRAM-SHA-1",
        b"n,,n=,r=abc",
    ))
    .await
    .unwrap();
    assert!(read_error(&mut s)
        .await
        .1
        .contains("unsupported SASL mechanism"));

    let (mut s, _, _) = raw_scram_client(&proxy, &env).await;
    let mut huge = vec![b'p'];
    huge.extend_from_slice(&100_000u32.to_be_bytes());
    s.write_all(&huge).await.unwrap();
    let (code, msg) = read_error(&mut s).await;
    assert_eq!(code, "08P01");
    assert!(msg.contains("exceeds the limit"), "{msg}");

    // issue 19 item 18: a 3.9 KB client nonce (what a prober stalls with
    // to make each pending login hold more) is refused like PostgreSQL's
    // parse errors.
    let (mut s, _, _) = raw_scram_client(&proxy, &env).await;
    let long = format!("n,,n=,r={}", "x".repeat(3900));
    s.write_all(&message::sasl_initial_response(
        "SCRAM-SHA-256",
        long.as_bytes(),
    ))
    .await
    .unwrap();
    assert_eq!(
        read_error(&mut s).await,
        (
            "08P01".to_owned(),
            "malformed SCRAM message: client nonce longer than 256 bytes".to_owned()
        )
    );

    // None of that counted as a failed password, and service goes on.
    tokio_pg(&proxy, &env, "app", APP_PASSWORD, "require")
        .await
        .expect("a well-behaved client still gets in");
    let violations = proxy.wait_audit_count("seven violations", 7, |e| {
        e["reason"] == "scram_protocol_violation"
    });
    assert!(violations.iter().all(|e| e["sqlstate"] == "08P01"));
}

/// What a fake upstream does after the StartupMessage.
#[derive(Clone)]
enum Fake {
    /// SCRAM-SHA-256 with `Verifier`'s salt, accepting any proof, then a
    /// final message with a signature it cannot have made.
    SignsWrongly(Verifier),
    /// Asks for an MD5 password.
    AsksMd5,
}

/// A TLS "PostgreSQL" with a certificate from `ca`, behaving as `fake`.
async fn fake_upstream(ca: &pgbastion::dev::certs::Ca, fake: Fake) -> u16 {
    let tls = std::sync::Arc::new(tls_server_config(&ca.server_cert(&["localhost"]).unwrap()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let (tls, fake) = (tls.clone(), fake.clone());
            tokio::spawn(async move {
                let mut req = [0u8; 8];
                tcp.read_exact(&mut req).await?;
                tcp.write_all(b"S").await?;
                let mut s = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await?;
                let len = s.read_u32().await? as usize;
                let mut startup = vec![0; len.saturating_sub(4)];
                s.read_exact(&mut startup).await?;
                match fake {
                    Fake::AsksMd5 => {
                        s.write_all(&message::build(b'R', &[0, 0, 0, 5, 1, 2, 3, 4]))
                            .await?;
                    }
                    Fake::SignsWrongly(v) => {
                        s.write_all(&message::authentication_sasl(&["SCRAM-SHA-256".into()]))
                            .await?;
                        let (_, body) = read_message(&mut s).await?;
                        let (_, first) = message::parse_sasl_initial_response(&body).unwrap();
                        let first = String::from_utf8_lossy(first.unwrap()).into_owned();
                        let nonce = first.split("r=").nth(1).unwrap().to_owned();
                        let server_first =
                            format!("r={nonce}fake,s={},i={}", B64.encode(&v.salt), v.iterations);
                        s.write_all(&message::authentication_sasl_data(
                            false,
                            server_first.as_bytes(),
                        ))
                        .await?;
                        read_message(&mut s).await?;
                        let bogus = format!("v={}", B64.encode([0u8; 32]));
                        let mut out = message::authentication_sasl_data(true, bogus.as_bytes());
                        out.extend(message::authentication_ok());
                        s.write_all(&out).await?;
                    }
                }
                s.flush().await?;
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
                Ok::<_, std::io::Error>(())
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_that_cannot_prove_themselves_or_want_other_methods_are_refused() {
    let certs = ProxyCerts::new();
    let ca = pgbastion::dev::certs::Ca::new("fake upstream CA").unwrap();
    let ca_file = ca.write_cert(certs.dir.path(), "fake-ca").unwrap();
    let verifier = Verifier::from_password(b"pw", b"fake salt", 4096);
    let secrets = certs.dir.path().join("userlist.txt");
    write_private(&secrets, &format!("\"app\" \"{}\"\n", verifier.to_text()));
    let proxy_for = |port: u16| {
        Proxy::start_toml(&format!(
            "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\n[[upstream]]\naddress = \"localhost:{port}\"\n\
             ca_file = \"{}\"\nauth = \"scram\"\nsecrets_file = \"{}\"\n",
            certs.tls_toml(),
            ca_file.display(),
            secrets.display()
        ))
    };

    let proxy = proxy_for(fake_upstream(&ca, Fake::SignsWrongly(verifier)).await);
    let (code, msg) = refusal(
        &tokio_pg_to(&proxy, &certs, "app", "pw", "require")
            .await
            .err()
            .unwrap(),
    );
    assert_eq!(code, "08001");
    assert!(msg.contains("did not prove"), "{msg}");
    let e = proxy.wait_audit("unproven", |e| e["event"] == "session.rejected");
    assert_eq!(e["reason"], "upstream_auth_unproven");
    assert_eq!(e["auth"]["client"]["channel_binding"], true, "{e}");

    let proxy = proxy_for(fake_upstream(&ca, Fake::AsksMd5).await);
    let (code, msg) = refusal(
        &tokio_pg_to(&proxy, &certs, "app", "pw", "require")
            .await
            .err()
            .unwrap(),
    );
    assert_eq!(code, "28000");
    assert!(
        msg.contains("an MD5 password"),
        "names what the server asked for: {msg}"
    );
    proxy.wait_audit("md5", |e| e["reason"] == "upstream_auth_unsupported");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_throttled_per_address_and_others_are_unaffected() {
    let env = Env::new();
    let pw_file = install_roles(&env);
    // Plaintext listener (a trusted network): SCRAM-SHA-256 without PLUS
    // toward the client, still PLUS toward the server.
    let proxy = env.proxy(
        "allow",
        &format!(
            "{}\n[limits]\nfailed_logins_per_address = 3\nfailed_logins_per_user = 100\n",
            auth_query_keys(&pw_file)
        ),
    );
    let addr = proxy.addr();
    for _ in 0..3 {
        let e = connect_from(addr, "127.0.0.2", "app", "postgres", "guess", "attacker")
            .await
            .err()
            .unwrap();
        assert_eq!(refusal(&e).0, "28P01");
    }
    let e = connect_from(
        addr,
        "127.0.0.2",
        "app",
        "postgres",
        APP_PASSWORD,
        "attacker",
    )
    .await
    .err()
    .unwrap();
    let (code, msg) = refusal(&e);
    assert_eq!(code, "28000");
    assert!(msg.contains("too many failed login attempts"), "{msg}");
    let throttled = proxy.wait_audit("throttled", |e| e["reason"] == "auth_throttled");
    assert_eq!(throttled["client"]["addr"], "127.0.0.2");

    let client = connect_from(
        addr,
        "127.0.0.3",
        "app",
        "postgres",
        APP_PASSWORD,
        "someone",
    )
    .await
    .expect("another address is not affected");
    client.simple_query("select 1").await.unwrap();
    let start = proxy.wait_audit("start", |e| e["event"] == "session.start");
    let auth = &start["auth"];
    assert_eq!(auth["client"]["mechanism"], "SCRAM-SHA-256");
    assert_eq!(auth["client"]["channel_binding"], false);
    assert_eq!(auth["server"]["mechanism"], "SCRAM-SHA-256-PLUS");
    assert_eq!(auth["server"]["channel_binding"], true);
}

/// `tls-server-end-point` for RSA certificates made by OpenSSL: the hash
/// follows the signature (SHA-256, SHA-384), and RSA-PSS has none.
#[test]
fn channel_binding_hash_of_rsa_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let make = |name: &str, extra: &[&str]| {
        let key = dir.path().join(format!("{name}.key"));
        let crt = dir.path().join(format!("{name}.crt"));
        let out = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
            ])
            .args(extra)
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&crt)
            .output()
            .expect("openssl must be installed");
        assert!(out.status.success(), "{}", stderr(&out));
        pgbastion::tls::load_certs(&crt, "test").unwrap()[0].to_vec()
    };
    use sha2::Digest;
    let der = make("sha256", &["-sha256"]);
    assert_eq!(
        tls_server_end_point(&der),
        Some(sha2::Sha256::digest(&der).to_vec())
    );
    let der = make("sha384", &["-sha384"]);
    assert_eq!(
        tls_server_end_point(&der),
        Some(sha2::Sha384::digest(&der).to_vec())
    );
    let der = make("pss", &["-sha256", "-sigopt", "rsa_padding_mode:pss"]);
    assert_eq!(tls_server_end_point(&der), None);
}
