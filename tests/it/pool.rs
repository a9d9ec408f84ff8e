//! Pooling (issue 21) against a real PostgreSQL and real clients: server
//! connections are shared per transaction, prepared statements work on
//! whichever connection a transaction lands on, settings follow their
//! client, state that cannot move pins, nothing leaks between clients,
//! and the forwarded identity is in every pooled transaction and cannot
//! be changed by the client.

use crate::common::*;

/// pgbastion in scram mode in front of the environment's PostgreSQL, with
/// a pool of `size` in `mode`, plus `extra` TOML after the upstream.
fn pooled(env: &Env, mode: &str, size: usize, extra: &str) -> Proxy {
    let pw_file = install_roles(env);
    env.pg
        .run_sql("GRANT CREATE ON SCHEMA public TO app; CREATE SCHEMA IF NOT EXISTS other AUTHORIZATION app;")
        .expect("grant");
    env.proxy(
        "require",
        &format!(
            "{}pool_mode = \"{mode}\"\npool_size = {size}\nquery_wait_timeout = \"5s\"\n{extra}",
            auth_query_keys(&pw_file)
        ),
    )
}

async fn app(proxy: &Proxy, env: &Env, extra: &str) -> PgConn {
    let conninfo = format!(
        "host=localhost port={} user=app password={APP_PASSWORD} dbname=postgres sslmode=require connect_timeout=20 {extra}",
        proxy.addr().port()
    );
    let (client, conn) = tokio_postgres::connect(&conninfo, tls_connector(&env.certs.proxy_ca))
        .await
        .expect("connect through the pool");
    (client, tokio::spawn(conn))
}

/// Backends PostgreSQL has for the role `app`.
async fn backends_of_app(direct: &tokio_postgres::Client) -> i64 {
    direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_share_a_small_pool_with_prepared_statements() {
    let env = Env::new();
    let proxy = pooled(&env, "transaction", 2, "");
    let direct = env.direct_client().await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(app(&proxy, &env, "").await);
    }
    // tokio-postgres prepares every statement under a name (s0, s1, ...):
    // each client's names are its own, on whichever connection it lands.
    for round in 0..5i32 {
        for (i, (c, _)) in clients.iter().enumerate() {
            let st = c.prepare("SELECT $1::int + $2::int").await.unwrap();
            let row = c.query_one(&st, &[&round, &(i as i32)]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), round + i as i32);
        }
    }
    assert!(
        backends_of_app(&direct).await <= 2,
        "a pool of 2 opened more connections"
    );
}

/// A pooled proxy whose listener knows people by client certificate and
/// forwards the identity; returns it with alice's and bob's conninfo.
fn identity_pool(env: &Env, size: usize) -> (Proxy, String, String) {
    let dir = env.dir.path();
    let people = pgbastion::dev::certs::Ca::new("people CA").unwrap();
    let people_ca = people.write_cert(dir, "people-ca").unwrap();
    let pw_file = install_roles(env);
    let proxy = Proxy::start_toml(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nidentity = \"client_cert\"\nclient_ca = \"{}\"\n\
         cert_identity = [\"email\"]\n{}{}pool_mode = \"transaction\"\npool_size = {size}\n\
         [forward.settings]\n\"pgbastion.identity\" = \"{{identity}}\"\n",
        env.tls_toml(),
        people_ca.display(),
        env.upstream_toml(),
        auth_query_keys(&pw_file),
    ));
    let conninfo = |who: &str| {
        let (cert, key) = person(&people, dir, who);
        format!(
            "host=localhost port={} dbname=postgres user=app password={APP_PASSWORD} sslmode=require \
             connect_timeout=20 sslcert={} sslkey={}",
            proxy.addr().port(),
            cert.display(),
            key.display()
        )
    };
    let (a, b) = (conninfo("alice"), conninfo("bob"));
    (proxy, a, b)
}

async fn connect_tls(conninfo: &str, env: &Env) -> PgConn {
    let plain: Vec<&str> = conninfo
        .split_whitespace()
        .filter(|kv| !kv.starts_with("sslcert=") && !kv.starts_with("sslkey="))
        .collect();
    let cfg: tokio_postgres::Config = plain.join(" ").parse().unwrap();
    let tls = client_cert_connector(conninfo, &env.proxy_ca);
    let (client, conn) = cfg.connect(tls).await.expect("connect with a certificate");
    (client, tokio::spawn(conn))
}

/// tokio-postgres's TLS with the client certificate the conninfo names.
fn client_cert_connector(
    conninfo: &str,
    ca: &std::path::Path,
) -> tokio_postgres_rustls::MakeRustlsConnect {
    let find = |key: &str| {
        conninfo
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .map(std::path::PathBuf::from)
            .unwrap()
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in pgbastion::tls::load_certs(ca, "CA").unwrap() {
        roots.add(c).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        pgbastion::tls::load_certs(&find("sslcert"), "cert").unwrap(),
        pgbastion::tls::load_key(&find("sslkey"), "key").unwrap(),
    )
    .unwrap();
    tokio_postgres_rustls::MakeRustlsConnect::new(config)
}

/// Two people share one server connection: every transaction sees the
/// identity of the person who runs it, never the other's, and neither can
/// set it themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pooled_transaction_carries_its_own_identity() {
    let env = Env::new();
    let (proxy, alice, bob) = identity_pool(&env, 1);
    let (a, _ja) = connect_tls(&alice, &env).await;
    let (b, _jb) = connect_tls(&bob, &env).await;
    let mut pids = std::collections::HashSet::new();
    for _ in 0..10 {
        for (c, who) in [(&a, "alice@example.com"), (&b, "bob@example.com")] {
            let row = c
                .query_one(
                    "SELECT current_setting('pgbastion.identity'), pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap();
            assert_eq!(row.get::<_, String>(0), who);
            pids.insert(row.get::<_, i32>(1));
        }
    }
    assert_eq!(pids.len(), 1, "a pool of 1 served both from one backend");
    for spoof in [
        "SET pgbastion.identity = 'mallory'",
        "set PGBASTION.IDENTITY to 'mallory'",
        "SET \"pgbastion\".\"identity\" = 'mallory'",
        "SET LOCAL pgbastion.identity = 'mallory'",
        "RESET pgbastion.identity",
        "SELECT set_config('pgbastion.identity', 'mallory', false)",
        "SELECT pg_catalog.set_config('PGBastion.Identity', 'mallory', false)",
        "SELECT 1; SELECT set_config($$pgbastion.identity$$, 'mallory', false)",
    ] {
        let err = a.batch_execute(spoof).await.unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{spoof}: {err}");
        let who: String = a
            .query_one("SELECT current_setting('pgbastion.identity')", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, "alice@example.com", "after {spoof}");
    }
    // Refused in the extended protocol too (a prepared set_config).
    let err = a
        .query(
            "SELECT set_config($1, 'mallory', false)",
            &[&"pgbastion.identity"],
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err}");
    // RESET ALL leaves the identity in place.
    a.batch_execute("RESET ALL").await.unwrap();
    let who: String = a
        .query_one("SELECT current_setting('pgbastion.identity')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "alice@example.com");
    drop(proxy);
}

/// SET outside a transaction stays with its client from connection to
/// connection and never reaches another client; SET LOCAL and a rolled
/// back SET do not stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_follow_their_client_and_nobody_else() {
    let env = Env::new();
    let proxy = pooled(&env, "transaction", 1, "");
    let (a, _ja) = app(&proxy, &env, "options='-c statement_timeout=7s'").await;
    let (b, _jb) = app(&proxy, &env, "application_name=bee").await;
    a.batch_execute("SET search_path TO other, public")
        .await
        .unwrap();
    assert_eq!(show(&b, "search_path").await, "\"$user\", public");
    assert_eq!(show(&a, "search_path").await, "other, public");
    assert_eq!(show(&a, "statement_timeout").await, "7s");
    assert_eq!(show(&b, "statement_timeout").await, "0");
    assert_eq!(show(&b, "application_name").await, "bee");
    assert_eq!(show(&a, "application_name").await, "");
    // search_path decides where a table goes, as on a direct connection.
    a.batch_execute("CREATE TABLE placed (x int)")
        .await
        .unwrap();
    let schema: String = b
        .query_one(
            "SELECT schemaname::text FROM pg_tables WHERE tablename = 'placed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(schema, "other");
    // SET LOCAL ends with its transaction; a SET rolled back is gone.
    a.batch_execute("BEGIN; SET LOCAL work_mem = '7MB'; COMMIT")
        .await
        .unwrap();
    a.batch_execute("BEGIN; SET work_mem = '9MB'; ROLLBACK")
        .await
        .unwrap();
    assert_eq!(show(&a, "work_mem").await, "4MB");
    // RESET goes back to the startup value, RESET ALL to every one.
    a.batch_execute("SET statement_timeout = '1s'")
        .await
        .unwrap();
    assert_eq!(show(&a, "statement_timeout").await, "1s");
    a.batch_execute("RESET statement_timeout").await.unwrap();
    assert_eq!(show(&a, "statement_timeout").await, "7s");
    a.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(show(&a, "search_path").await, "\"$user\", public");
    assert_eq!(show(&a, "statement_timeout").await, "7s");
}

async fn show(c: &tokio_postgres::Client, what: &str) -> String {
    c.query_one(&format!("SHOW {what}"), &[])
        .await
        .unwrap()
        .get::<_, String>(0)
}

/// A client that waits longer than query_wait_timeout for a connection is
/// told which pool was full; the client holding it is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_past_query_wait_timeout_is_a_clear_error() {
    let env = Env::new();
    let proxy = pooled(&env, "transaction", 1, "");
    let (a, _ja) = app(&proxy, &env, "").await;
    let (b, _jb) = app(&proxy, &env, "").await;
    a.batch_execute("BEGIN").await.unwrap();
    let started = std::time::Instant::now();
    let err = b.batch_execute("SELECT 1").await.unwrap_err();
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(4),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
    let text = format!("{:?}", err);
    assert!(
        text.contains("postgres/app") && text.contains("pool_size 1"),
        "{text}"
    );
    a.batch_execute("SELECT 1; COMMIT").await.unwrap();
}

/// The server connection of a transaction dies: that client gets an
/// error; the others go on, and the pool opens a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_dies_mid_transaction_fails_only_its_client() {
    let env = Env::new();
    let proxy = pooled(&env, "transaction", 2, "");
    let direct = env.direct_client().await;
    let (a, _ja) = app(&proxy, &env, "").await;
    let (b, _jb) = app(&proxy, &env, "").await;
    a.batch_execute("BEGIN").await.unwrap();
    let pid: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    direct
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    assert!(a.batch_execute("SELECT 1").await.is_err());
    for _ in 0..5 {
        b.batch_execute("SELECT 1").await.unwrap();
    }
    let (c, _jc) = app(&proxy, &env, "").await;
    c.batch_execute("SELECT 1").await.unwrap();
}

/// A cancel reaches the connection serving the client's transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_the_serving_connection() {
    let env = Env::new();
    let proxy = pooled(&env, "transaction", 2, "");
    let (a, _ja) = app(&proxy, &env, "").await;
    let token = a.cancel_token();
    let sleeping = tokio::spawn(async move { a.batch_execute("SELECT pg_sleep(30)").await });
    let direct = env.direct_client().await;
    wait_for_async("the sleep to run", std::time::Duration::from_secs(10), || async {
        let n: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n == 1).then_some(())
    })
    .await;
    token
        .cancel_query(tls_connector(&env.certs.proxy_ca))
        .await
        .unwrap();
    let err = tokio::time::timeout(std::time::Duration::from_secs(10), sleeping)
        .await
        .expect("the cancel ended the sleep")
        .unwrap()
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
}

/// Session mode: a client keeps one connection for its session; what it
/// leaves behind (a temporary table, a setting, a transaction) is cleaned
/// before the next client gets the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_cleans_a_connection_before_the_next_client() {
    let env = Env::new();
    let proxy = pooled(&env, "session", 1, "");
    let first_pid;
    {
        let (a, ja) = app(&proxy, &env, "").await;
        first_pid = a
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get::<_, i32>(0);
        a.batch_execute(
            "CREATE TEMP TABLE left_behind (x int); SET work_mem = '9MB'; \
             SELECT pg_advisory_lock(42); LISTEN somewhere; BEGIN; SELECT 1",
        )
        .await
        .unwrap();
        drop(a);
        let _ = ja.await;
    }
    let (b, _jb) = app(&proxy, &env, "").await;
    let row = b
        .query_one(
            "SELECT pg_backend_pid(), current_setting('work_mem'), \
             (SELECT count(*) FROM pg_class WHERE relname = 'left_behind'), \
             (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'), \
             (SELECT count(*) FROM pg_listening_channels())",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), first_pid, "the connection was reused");
    assert_eq!(row.get::<_, String>(1), "4MB");
    assert_eq!(row.get::<_, i64>(2), 0);
    assert_eq!(row.get::<_, i64>(3), 0);
    assert_eq!(row.get::<_, i64>(4), 0);
}

/// Runs a scenario of tests/clients/pooled_drivers.py (psycopg, asyncpg)
/// against the proxy as `app`; panics with the driver's error.
fn driver_scenario(proxy: &Proxy, env: &Env, scenario: &str) -> serde_json::Value {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/pooled_drivers.py"
    );
    let out = std::process::Command::new("python3")
        .arg(script)
        .args([
            "localhost",
            &proxy.addr().port().to_string(),
            "app",
            APP_PASSWORD,
        ])
        .arg(&env.proxy_ca)
        .arg(scenario)
        .output()
        .expect("python3 must be installed");
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} {}", stdout(&out), stderr(&out)));
    assert_eq!(report["ok"], true, "{scenario}: {report:#}");
    report
}

/// psycopg with every query a named prepared statement, pipelines, and
/// libpq's PQprepare of a taken name (42P05), on a pool of 2.
#[test]
fn psycopg_prepared_statements_work_through_a_pool() {
    let env = Env::new();
    let proxy = pooled(&env, "transaction", 2, "");
    let report = driver_scenario(&proxy, &env, "psycopg");
    assert!(
        report["server_pids_seen"].as_u64().unwrap() <= 2,
        "{report}"
    );
}

/// asyncpg (named statements, its own pool, transactions) on a pool of 2.
#[test]
fn asyncpg_works_through_a_pool() {
    let env = Env::new();
    let proxy = pooled(&env, "transaction", 2, "");
    driver_scenario(&proxy, &env, "asyncpg");
}

/// node-postgres named queries from several clients on a pool of 2.
#[test]
fn node_postgres_named_queries_work_through_a_pool() {
    let env = Env::new();
    let proxy = pooled(&env, "transaction", 2, "");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/node");
    let out = std::process::Command::new("node")
        .arg(format!("{dir}/pooled.js"))
        .args([
            "localhost",
            &proxy.addr().port().to_string(),
            "app",
            APP_PASSWORD,
        ])
        .arg(&env.proxy_ca)
        .output()
        .expect("node must be installed (the test command installs the npm packages)");
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} {}", stdout(&out), stderr(&out)));
    assert_eq!(report["ok"], true, "{report:#}");
}

/// pgjdbc with prepareThreshold=1 (named server-side statements from the
/// first use) from several connections on a pool of 2.
#[test]
fn pgjdbc_prepared_statements_work_through_a_pool() {
    let env = Env::new();
    let proxy = pooled(&env, "transaction", 2, "");
    let source = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/java/Pooled.java"
    );
    let out = std::process::Command::new("java")
        .args(["-cp", "/usr/share/java/postgresql.jar", source])
        .args([
            "localhost",
            &proxy.addr().port().to_string(),
            "app",
            APP_PASSWORD,
        ])
        .arg(&env.proxy_ca)
        .output()
        .expect("java must be installed (the test command installs libpostgresql-jdbc-java)");
    assert!(
        out.status.success() && stdout(&out).trim() == "ok",
        "{} {}",
        stdout(&out),
        stderr(&out)
    );
}

/// Each statement that makes state pgbastion cannot move pins its client
/// (a `session.pinned` event names why; the client keeps its backend for
/// every later transaction), and the connection is cleaned before the
/// next client gets it: nothing of one client reaches another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_that_cannot_move_pins_and_never_leaks() {
    let env = Env::new();
    let proxy = pooled(&env, "transaction", 1, "");
    let cases = [
        ("LISTEN somewhere", "listen"),
        ("PREPARE p AS SELECT 1", "sql_prepare"),
        ("SELECT pg_advisory_lock(7)", "advisory_lock"),
        (
            "SELECT pg_catalog.pg_try_advisory_lock_shared(7)",
            "advisory_lock",
        ),
        ("CREATE TEMP TABLE scratch (x int)", "temp_object"),
        (
            "BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT 1; COMMIT",
            "cursor_with_hold",
        ),
        ("SET ROLE app", "set_role"),
        ("SET SESSION AUTHORIZATION app", "session_authorization"),
    ];
    let mut pins = 0;
    for (statement, reason) in cases {
        let (a, ja) = app(&proxy, &env, "").await;
        let before = backend_pid(&a).await;
        a.batch_execute(statement).await.unwrap();
        pins += 1;
        let events =
            proxy.wait_audit_count("session.pinned", pins, |e| e["event"] == "session.pinned");
        let event = &events[pins - 1];
        assert_eq!(event["reason"], reason, "{statement}");
        assert_eq!(event["pool"], "pg");
        for _ in 0..3 {
            assert_eq!(
                backend_pid(&a).await,
                before,
                "{statement}: pinned to its backend"
            );
        }
        drop(a);
        let _ = ja.await;
        let (b, _jb) = app(&proxy, &env, "").await;
        let row = b
            .query_one(
                "SELECT pg_backend_pid(), \
                 (SELECT count(*) FROM pg_listening_channels()), \
                 (SELECT count(*) FROM pg_prepared_statements WHERE name = 'p'), \
                 (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()), \
                 (SELECT count(*) FROM pg_class WHERE relname = 'scratch'), \
                 (SELECT count(*) FROM pg_cursors WHERE is_holdable), \
                 current_user = session_user",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            row.get::<_, i32>(0),
            before,
            "{statement}: the one connection, cleaned"
        );
        for (i, what) in [
            (1, "listen"),
            (3, "advisory lock"),
            (4, "temp table"),
            (5, "cursor"),
        ] {
            assert_eq!(row.get::<_, i64>(i), 0, "{statement}: {what} left behind");
        }
        assert_eq!(
            row.get::<_, i64>(2),
            0,
            "{statement}: SQL prepared statement left behind"
        );
        assert!(row.get::<_, bool>(6), "{statement}: role left behind");
    }
}

async fn backend_pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get::<_, i32>(0)
}

/// The query audit sees a pooled session's statements as the client sent
/// them (its own statement names, never pgbastion's switches or
/// re-prepares), each with its outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_audit_records_pooled_statements_as_the_client_sent_them() {
    let env = Env::new();
    let proxy = pooled(
        &env,
        "transaction",
        1,
        "[[rule]]\nname = \"audited\"\naudit_queries = \"statements\"\n",
    );
    let (a, _ja) = app(&proxy, &env, "application_name=one").await;
    let (b, _jb) = app(&proxy, &env, "application_name=two").await;
    for i in 0..3i32 {
        a.query_one("SELECT $1::int", &[&i]).await.unwrap();
        b.batch_execute("SELECT 2").await.unwrap();
    }
    assert!(a.batch_execute("SELECT 1/0").await.is_err());
    let queries = proxy.wait_audit_count("7 queries", 7, |e| e["event"] == "query");
    let texts: Vec<&str> = queries
        .iter()
        .map(|q| q["statement"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts.iter().filter(|t| **t == "SELECT $1::int").count(),
        3,
        "{texts:?}"
    );
    assert_eq!(
        texts.iter().filter(|t| **t == "SELECT $1").count(),
        3,
        "{texts:?}"
    );
    assert!(proxy
        .audit_events()
        .iter()
        .all(|e| e["event"] != "query_audit.stopped"));
    assert!(
        texts
            .iter()
            .all(|t| !t.contains("set_config") && !t.contains("RESET")),
        "{texts:?}"
    );
    let failed: Vec<_> = queries.iter().filter(|q| q["outcome"] == "error").collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["sqlstate"], "22012");
}

/// A startup setting the server refuses is refused as on a direct
/// connection (at login when a connection is free, else before the
/// client's first statement runs), and a forwarded setting a client puts
/// in its `options` is ignored: the identity is pgbastion's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_settings_are_checked_and_forwarded_ones_are_pgbastions() {
    let env = Env::new();
    let proxy = pooled(
        &env,
        "transaction",
        1,
        "[forward.settings]\n\"pgbastion.who\" = \"{client_addr}\"\n",
    );
    let conninfo = |extra: &str| {
        format!(
            "host=localhost port={} user=app password={APP_PASSWORD} dbname=postgres sslmode=require connect_timeout=20 {extra}",
            proxy.addr().port()
        )
    };
    let tls = || tls_connector(&env.certs.proxy_ca);
    // With the one connection free: refused at login.
    let err = tokio_postgres::connect(&conninfo("options='-c work_mem=banana'"), tls())
        .await
        .err()
        .expect("a setting the server refuses");
    assert_eq!(sqlstate(&err).as_deref(), Some("22023"), "{err}");
    // With it busy: refused before the first statement runs.
    let (holder, _jh) = app(&proxy, &env, "").await;
    holder.batch_execute("BEGIN").await.unwrap();
    let (c, conn) = tokio_postgres::connect(&conninfo("options='-c work_mem=banana'"), tls())
        .await
        .expect("a login answered without a connection");
    let _jc = tokio::spawn(conn);
    let waiting = tokio::spawn(async move { c.batch_execute("SELECT 1").await });
    holder.batch_execute("COMMIT").await.unwrap();
    let err = waiting.await.unwrap().unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("22023"), "{err}");
    // The forwarded value wins over the client's options.
    let (c, conn) = tokio_postgres::connect(&conninfo("options='-c pgbastion.who=mallory'"), tls())
        .await
        .unwrap();
    let _jd = tokio::spawn(conn);
    let who: String = c
        .query_one("SELECT current_setting('pgbastion.who')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "127.0.0.1");
}

/// Shutting down ends an idle pooled session at once with PostgreSQL's
/// own 57P01, as for unpooled ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_an_idle_pooled_session_with_57p01() {
    let env = Env::new();
    let proxy = pooled(&env, "transaction", 2, "");
    let (a, ja) = app(&proxy, &env, "").await;
    a.batch_execute("SELECT 1").await.unwrap();
    let started = std::time::Instant::now();
    let stopping = std::thread::spawn(move || drop(proxy));
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), ja)
        .await
        .expect("the session ended")
        .unwrap();
    let err = ended.expect_err("the connection ended with an error");
    assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    stopping.join().unwrap();
}

/// What an adversarial review found, each now held: a replayed SET whose
/// quotes would run into the next statement under another
/// standard_conforming_strings cannot change the identity; `set_config`
/// of the role and DO blocks pin (nothing of theirs reaches the next
/// client); one client's DEALLOCATE ALL does not break another's
/// prepared statements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_adversarial_review_found_is_held() {
    let env = Env::new();
    let (_proxy, alice, _bob) = identity_pool(&env, 1);
    let (a, _ja) = connect_tls(
        &format!("{alice} options='-c standard_conforming_strings=off -c statement_timeout=0'"),
        &env,
    )
    .await;
    a.batch_execute("SET standard_conforming_strings = on")
        .await
        .unwrap();
    a.batch_execute(
        "SET search_path = 'x\\'; /* ' */ SET application_name = '; SELECT pg_catalog.set_config($$pgbastion.identity$$,$$bob@example.com$$,false); --'",
    )
    .await
    .unwrap();
    a.batch_execute("RESET statement_timeout").await.unwrap();
    let who: String = a
        .query_one("SELECT current_setting('pgbastion.identity')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "alice@example.com");
}

/// More of the review: `set_config` of the role and DO blocks pin, and
/// one client's DEALLOCATE ALL does not break another's statements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_adversarial_review_found_is_held_without_forwarding() {
    let env = Env::new();
    let proxy = pooled(&env, "transaction", 1, "");
    env.pg
        .run_sql("DO $$BEGIN CREATE ROLE other_role; EXCEPTION WHEN duplicate_object THEN NULL; END$$; GRANT other_role TO app;")
        .unwrap();
    for (statement, reason) in [
        ("SELECT set_config('role', 'other_role', false)", "set_role"),
        (
            "DO $$BEGIN CREATE TEMP TABLE leak_t(x text); PERFORM pg_advisory_lock(4242); END$$",
            "do_block",
        ),
    ] {
        let (c, jc) = app(&proxy, &env, "").await;
        c.batch_execute(statement).await.unwrap();
        proxy.wait_audit(reason, |e| {
            e["event"] == "session.pinned" && e["reason"] == reason
        });
        drop(c);
        let _ = jc.await;
        let (next, _jn) = app(&proxy, &env, "").await;
        let row = next
            .query_one(
                "SELECT current_user::text, \
                 (SELECT count(*) FROM pg_class WHERE relname = 'leak_t'), \
                 (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "app", "{statement}");
        assert_eq!(row.get::<_, i64>(1), 0, "{statement}");
        assert_eq!(row.get::<_, i64>(2), 0, "{statement}");
    }
    // Two clients on one connection: one's DEALLOCATE ALL, the other's
    // statement still runs.
    let (b, _jb) = app(&proxy, &env, "").await;
    let (m, _jm) = app(&proxy, &env, "").await;
    let st = b.prepare("SELECT $1::int * 2").await.unwrap();
    assert_eq!(
        b.query_one(&st, &[&21i32]).await.unwrap().get::<_, i32>(0),
        42
    );
    m.batch_execute("SELECT 1; DEALLOCATE ALL").await.unwrap();
    for _ in 0..3 {
        assert_eq!(
            b.query_one(&st, &[&5i32]).await.unwrap().get::<_, i32>(0),
            10
        );
    }
}
