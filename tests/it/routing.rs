//! Routing one listener to many databases (issue 22) against a real
//! PostgreSQL whose databases stand in for tenants: psql with a host name
//! (libpq sends it as the TLS server name) and `sslmode=verify-full`,
//! `options=endpoint=` with an IP address (no server name), conflicts, no
//! route, database routes and aliases, rules with endpoints, a templated
//! address resolved per session, cancel on a routed session, the audit,
//! and a route added by SIGHUP.

use std::time::Duration;

use pgbastion::dev::certs::Ca;

use crate::common::*;

/// pgbastion's certificate for every name the tests route, and its CA.
struct RoutedCerts {
    ca: std::path::PathBuf,
    tls_toml: String,
    _dir: tempfile::TempDir,
}

fn routed_certs(names: &[&str]) -> RoutedCerts {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("pgbastion routing test CA").unwrap();
    let ca_path = ca.write_cert(dir.path(), "ca").unwrap();
    let (cert, key) = ca
        .server_cert(names)
        .unwrap()
        .write(dir.path(), "proxy")
        .unwrap();
    RoutedCerts {
        ca: ca_path,
        tls_toml: format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ),
        _dir: dir,
    }
}

/// The tenants' databases.
async fn create_databases(env: &Env) {
    let direct = env.direct_client().await;
    for db in ["t1", "t2", "orders", "analytics"] {
        direct
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
    }
}

/// Upstreams: a template (a database per endpoint), orders, an alias
/// ("reports" is the server's "analytics"), one resolved by endpoint,
/// and the server as is. Listeners "main" and "strict" have no upstream
/// of their own.
fn routed_config(env: &Env, certs: &RoutedCerts) -> String {
    let upstream = |name: &str, address: &str, keys: &str| {
        format!(
            "[[upstream]]\nname = \"{name}\"\naddress = \"{address}\"\nserver_name = \"localhost\"\nca_file = \"{}\"\n{keys}\n",
            env.pg.ca_cert.display()
        )
    };
    let port = env.pg.port;
    format!(
        "{tls}
[[listener]]
name = \"main\"
listen = \"127.0.0.1:0\"

[[listener]]
name = \"strict\"
listen = \"127.0.0.1:0\"

[[listener]]
name = \"dbs\"
listen = \"127.0.0.1:0\"

{tenants}{orders}{reporting}{byhost}{pg}
[[route]]
name = \"orders\"
server_name = \"orders.test\"
upstream = \"orders\"

[[route]]
name = \"reports\"
database = \"reports\"
upstream = \"reporting\"

[[route]]
name = \"byhost\"
endpoint = \"ghost\"
upstream = \"byhost\"

[[route]]
name = \"tenants\"
server_name = \"*.tenants.test\"
upstream = \"tenants\"

[[route]]
name = \"plain\"
database = \"postgres\"
upstream = \"pg\"

[[rule]]
name = \"strict-t1\"
listeners = [\"strict\"]
endpoints = [\"t1\"]

[[rule]]
name = \"dbs-t1\"
listeners = [\"dbs\"]
databases = [\"t1\"]

[[rule]]
name = \"main\"
listeners = [\"main\"]
",
        tls = certs.tls_toml,
        tenants = upstream(
            "tenants",
            &format!("localhost:{port}"),
            "database = \"{endpoint}\""
        ),
        orders = upstream(
            "orders",
            &format!("localhost:{port}"),
            "database = \"orders\""
        ),
        reporting = upstream(
            "reporting",
            &format!("localhost:{port}"),
            "database = \"analytics\""
        ),
        byhost = upstream("byhost", &format!("{{endpoint}}.invalid:{port}"), ""),
        pg = upstream("pg", &format!("localhost:{port}"), ""),
    )
}

/// The listener's address by name.
fn listener(proxy: &Proxy, name: &str) -> std::net::SocketAddr {
    proxy
        .addrs
        .iter()
        .find_map(|(n, a)| match a {
            pgbastion::config::BindAddress::Tcp(a) if n == name => Some(*a),
            _ => None,
        })
        .unwrap()
}

/// A verify-full conninfo: `host` is what libpq verifies and sends as the
/// TLS server name (none for an IP address); it always dials 127.0.0.1.
fn conninfo(certs: &RoutedCerts, addr: std::net::SocketAddr, host: &str, rest: &str) -> String {
    format!(
        "host={host} hostaddr=127.0.0.1 port={} user=postgres sslmode=verify-full sslrootcert={} channel_binding=disable {rest}",
        addr.port(),
        certs.ca.display()
    )
}

/// The routed configuration running, with its databases and certificates
/// (fields in drop order: pgbastion stops before PostgreSQL).
struct Routed {
    proxy: Proxy,
    certs: RoutedCerts,
    env: Env,
}

async fn routed() -> Routed {
    let env = Env::new();
    create_databases(&env).await;
    let certs = routed_certs(&["localhost", "127.0.0.1", "*.tenants.test", "orders.test"]);
    Routed {
        proxy: Proxy::start_toml(&routed_config(&env, &certs)),
        certs,
        env,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_names_endpoints_and_databases_reach_their_databases() {
    let Routed { proxy, certs, env } = routed().await;
    let main = listener(&proxy, "main");
    let db_of = |host: &str, rest: &str| {
        let out = env.psql(
            &conninfo(&certs, main, host, rest),
            "SELECT current_database()",
        );
        assert!(out.status.success(), "{host} {rest}: {}", stderr(&out));
        stdout(&out).trim().to_owned()
    };
    tokio::task::block_in_place(|| {
        // The wildcard's label is the endpoint, filled into the database.
        assert_eq!(db_of("t1.tenants.test", "dbname=postgres"), "t1");
        assert_eq!(db_of("T2.Tenants.Test", "dbname=postgres"), "t2");
        // An exact name, and a database route with an alias.
        assert_eq!(db_of("orders.test", "dbname=postgres"), "orders");
        assert_eq!(db_of("127.0.0.1", "dbname=reports"), "analytics");
        // No server name (an IP address): the endpoint in options, the
        // rest of options forwarded without it.
        assert_eq!(
            db_of("127.0.0.1", "dbname=postgres options=endpoint=t2"),
            "t2"
        );
        let out = env.psql(
            &conninfo(
                &certs,
                main,
                "127.0.0.1",
                "dbname=postgres options='endpoint=t1 -c search_path=tenant_schema'",
            ),
            "SELECT current_database() || ' ' || current_setting('search_path')",
        );
        assert_eq!(stdout(&out).trim(), "t1 tenant_schema", "{}", stderr(&out));
        // A templated address: {endpoint} fills the host, resolved per
        // session (`.invalid` never resolves: the refusal names the host).
        let out = env.psql(
            &conninfo(
                &certs,
                main,
                "127.0.0.1",
                "dbname=postgres options=endpoint=ghost",
            ),
            "SELECT 1",
        );
        assert!(!out.status.success(), "ghost.invalid resolved");
        // The database route "plain" for everything else.
        assert_eq!(db_of("localhost", "dbname=postgres"), "postgres");
    });
    let starts = proxy.wait_audit_count("7 session starts", 7, |e| e["event"] == "session.start");
    let t1 = starts
        .iter()
        .find(|e| e["route"]["endpoint"] == "t1" && e["route"]["server_name"].is_string())
        .expect("t1's start event");
    assert_eq!(
        t1["route"],
        serde_json::json!({
            "name": "tenants", "server_name": "t1.tenants.test", "endpoint": "t1",
            "upstream": "tenants", "database": "t1"
        })
    );
    assert_eq!(t1["requested"]["database"], "postgres");
    let ghost = proxy.wait_audit("the templated address's refusal", |e| {
        e["event"] == "session.rejected" && e["route"]["name"] == "byhost"
    });
    assert_eq!(ghost["route"]["endpoint"], "ghost");
    assert!(ghost.to_string().contains("ghost.invalid"), "{ghost}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_routed_is_refused_naming_what_was_sent_and_the_fix() {
    let Routed { proxy, certs, env } = routed().await;
    let main = listener(&proxy, "main");
    let refused = |host: &str, rest: &str| {
        let out = env.psql(&conninfo(&certs, main, host, rest), "SELECT 1");
        assert!(!out.status.success(), "{host} {rest} was routed");
        stderr(&out)
    };
    tokio::task::block_in_place(|| {
        let err = refused("127.0.0.1", "dbname=nowhere");
        assert!(
            err.contains("no route for no TLS server name, database \"nowhere\""),
            "{err}"
        );
        assert!(
            err.contains("options=endpoint%3D<id>"),
            "the fix is named: {err}"
        );
        assert!(err.contains("host name"), "the other fix is named: {err}");
        let err = refused("t1.tenants.test", "dbname=postgres options=endpoint=t2");
        assert!(
            err.contains("names endpoint \"t1\" but options name endpoint \"t2\""),
            "{err}"
        );
        let err = refused("127.0.0.1", "dbname=postgres options=endpoint=Bad_Id");
        assert!(err.contains("is not an endpoint id"), "{err}");
        // The certificate's wildcard covers any first label, so libpq
        // accepts the name; pgbastion refuses it as an endpoint.
        let err = refused("a_b.tenants.test", "dbname=postgres");
        assert!(err.contains("'_' is not allowed"), "{err}");
    });
    let rejected = proxy.wait_audit_count("4 rejections", 4, |e| e["event"] == "session.rejected");
    let reasons: Vec<&str> = rejected
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .collect();
    for reason in ["route_none", "route_conflict", "route_bad_endpoint"] {
        assert!(reasons.contains(&reason), "{reason} in {reasons:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_with_endpoints_admits_one_tenant_only() {
    let Routed { proxy, certs, env } = routed().await;
    let strict = listener(&proxy, "strict");
    tokio::task::block_in_place(|| {
        let ok = env.psql(
            &conninfo(&certs, strict, "t1.tenants.test", "dbname=postgres"),
            "SELECT current_database()",
        );
        assert_eq!(stdout(&ok).trim(), "t1", "{}", stderr(&ok));
        for (host, rest) in [
            ("t2.tenants.test", "dbname=postgres"),
            ("127.0.0.1", "dbname=postgres options=endpoint=t2"),
            // No endpoint at all: a rule with endpoints does not match.
            ("orders.test", "dbname=postgres"),
            // An endpoint in options that does not choose the server (an
            // exact name's route, a database route) is no endpoint.
            ("orders.test", "dbname=postgres options=endpoint=t1"),
            ("127.0.0.1", "dbname=reports options=endpoint=t1"),
        ] {
            let out = env.psql(&conninfo(&certs, strict, host, rest), "SELECT 1");
            assert!(!out.status.success(), "{host} {rest} was admitted");
            assert!(
                stderr(&out).contains("policy does not allow"),
                "{host}: {}",
                stderr(&out)
            );
        }
    });
}

/// A rule's `databases` holds for the database a template or an alias
/// gives the session, not only for the name the client typed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_rule_holds_for_the_database_given() {
    let Routed { proxy, certs, env } = routed().await;
    let dbs = listener(&proxy, "dbs");
    tokio::task::block_in_place(|| {
        let ok = env.psql(
            &conninfo(&certs, dbs, "t1.tenants.test", "dbname=t1"),
            "SELECT current_database()",
        );
        assert_eq!(stdout(&ok).trim(), "t1", "{}", stderr(&ok));
        // Typed t1, given t2 by the template: refused.
        let out = env.psql(
            &conninfo(&certs, dbs, "t2.tenants.test", "dbname=t1"),
            "SELECT 1",
        );
        assert!(!out.status.success(), "t2 reached through a rule for t1");
        assert!(
            stderr(&out).contains("policy does not allow"),
            "{}",
            stderr(&out)
        );
    });
}

/// Ctrl-C on a routed session reaches the server the session was routed
/// to (through the templated upstream's endpoint route).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_a_routed_session() {
    let Routed { proxy, certs, env } = routed().await;
    let main = listener(&proxy, "main");
    let conninfo = format!(
        "host=t2.tenants.test hostaddr=127.0.0.1 port={} user=postgres password={} dbname=postgres sslmode=require channel_binding=disable application_name=routed-cancel",
        main.port(),
        env.pg.password
    );
    let (client, conn) = tokio_postgres::connect(&conninfo, tls_connector(&certs.ca))
        .await
        .expect("a routed session");
    tokio::spawn(conn);
    let db: String = client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(db, "t2");
    let token = client.cancel_token();
    let direct = env.direct_client().await;
    let query = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    wait_active(&direct, "routed-cancel").await;
    token
        .cancel_query(tls_connector(&certs.ca))
        .await
        .expect("the cancel request is sent");
    let err = tokio::time::timeout(Duration::from_secs(10), query)
        .await
        .expect("cancelled within 10 s")
        .unwrap()
        .expect_err("the query was cancelled");
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
}

/// A route added by SIGHUP applies to new sessions; an open session keeps
/// the route it was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_added_by_sighup_applies_to_new_sessions() {
    let env = Env::new();
    create_databases(&env).await;
    let certs = routed_certs(&["localhost", "127.0.0.1", "*.tenants.test", "orders.test"]);
    let dir = tempfile::tempdir().unwrap();
    let (cfg, log) = (
        dir.path().join("pgbastion.toml"),
        dir.path().join("pgbastion.log"),
    );
    let port = pgbastion::dev::localpg::free_port().unwrap();
    let write = |routes: &str| {
        let body = format!(
            "{}\n[[listener]]\nlisten = \"127.0.0.1:{port}\"\nupstream = \"pg\"\n\
             [[upstream]]\nname = \"pg\"\naddress = \"localhost:{pg}\"\nca_file = \"{ca}\"\n\
             [[upstream]]\nname = \"orders\"\naddress = \"localhost:{pg}\"\nca_file = \"{ca}\"\ndatabase = \"orders\"\n\
             {routes}\n[audit]\nlog = \"off\"\n",
            certs.tls_toml,
            pg = env.pg.port,
            ca = env.pg.ca_cert.display()
        );
        std::fs::write(&cfg, body).unwrap();
    };
    write("");
    let proc = Running(config_form(&cfg, Some(&log)).spawn().unwrap());
    let addr = wait_listening(port);
    let db_of = |host: &str| {
        let out = env.psql(
            &conninfo(&certs, addr, host, "dbname=postgres"),
            "SELECT current_database()",
        );
        assert!(out.status.success(), "{host}: {}", stderr(&out));
        stdout(&out).trim().to_owned()
    };
    tokio::task::block_in_place(|| assert_eq!(db_of("orders.test"), "postgres"));
    let held_conninfo = format!(
        "host=localhost hostaddr=127.0.0.1 port={port} user=postgres password={} dbname=postgres sslmode=require channel_binding=disable",
        env.pg.password
    );
    let (held, conn) = tokio_postgres::connect(&held_conninfo, tls_connector(&certs.ca))
        .await
        .unwrap();
    tokio::spawn(conn);

    write("[[route]]\nname = \"orders\"\nserver_name = \"orders.test\"\nupstream = \"orders\"\n");
    signal(proc.0.id(), "-HUP");
    tokio::task::block_in_place(|| {
        wait_log(&log, "certificates re-read");
        assert_eq!(db_of("orders.test"), "orders", "the new route applies");
        assert_eq!(
            db_of("localhost"),
            "postgres",
            "the listener's upstream still applies"
        );
    });
    let db: String = held
        .query_one("SELECT current_database()", &[])
        .await
        .expect("the open session keeps working")
        .get(0);
    assert_eq!(db, "postgres");
}

/// A pooled templated upstream: each endpoint's sessions share that
/// endpoint's pool (keyed by endpoint, database and user), never another
/// tenant's server connections; scram mode's auth_query runs per
/// endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_template_keeps_each_tenant_on_its_own_connections() {
    let env = Env::new();
    create_databases(&env).await;
    let pw_file = install_roles(&env);
    let certs = routed_certs(&["localhost", "127.0.0.1", "*.tenants.test"]);
    let proxy = Proxy::start_toml(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\n\
         [[upstream]]\nname = \"tenants\"\naddress = \"localhost:{}\"\nca_file = \"{}\"\n\
         database = \"{{endpoint}}\"\n{}pool_mode = \"transaction\"\npool_size = 2\n\
         [[route]]\nserver_name = \"*.tenants.test\"\nupstream = \"tenants\"\n",
        certs.tls_toml,
        env.pg.port,
        env.pg.ca_cert.display(),
        auth_query_keys(&pw_file)
    ));
    let connect = |tenant: &'static str| {
        let conninfo = format!(
            "host={tenant}.tenants.test hostaddr=127.0.0.1 port={} user=app password={APP_PASSWORD} dbname=postgres sslmode=require connect_timeout=20",
            proxy.addr().port()
        );
        let tls = tls_connector(&certs.ca);
        async move {
            let (client, conn) = tokio_postgres::connect(&conninfo, tls)
                .await
                .unwrap_or_else(|e| panic!("{tenant}: {e}"));
            tokio::spawn(conn);
            (tenant, client)
        }
    };
    let mut clients = Vec::new();
    for tenant in ["t1", "t2", "t1", "t2", "t1", "t2"] {
        clients.push(connect(tenant).await);
    }
    for _round in 0..5 {
        for (tenant, client) in &clients {
            let db: String = client
                .query_one("SELECT current_database()", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(&db, tenant, "a pooled transaction landed on another tenant");
        }
    }
    let direct = env.direct_client().await;
    let rows = direct
        .query(
            "SELECT datname, count(*) FROM pg_stat_activity WHERE usename = 'app' GROUP BY datname",
            &[],
        )
        .await
        .unwrap();
    let counts: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert!(
        counts
            .iter()
            .all(|(db, n)| (db == "t1" || db == "t2") && *n <= 2),
        "each tenant's pool holds at most pool_size connections to its own database: {counts:?}"
    );
}

/// check-config refuses a routed name that no certificate pgbastion
/// serves covers, naming the route and the fix.
#[test]
fn check_config_refuses_a_routed_name_no_certificate_covers() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("pgbastion.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\n{}\n\
             [[route]]\nname = \"billing\"\nserver_name = \"billing.test\"\nupstream = \"pg\"\n",
            env.tls_toml(),
            env.upstream_toml()
        ),
    )
    .unwrap();
    let out = bin()
        .arg("check-config")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("route \"billing\""), "{err}");
    assert!(err.contains("does not cover it"), "{err}");
    assert!(err.contains("[[tls.sni]]"), "{err}");
}

/// Strangers naming many endpoints of a template with auth_query make
/// pgbastion look verifiers up on each endpoint's server, but the lookup
/// connections it keeps are bounded per upstream, not per endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_connections_are_bounded_across_endpoints() {
    let env = Env::new();
    let pw_file = install_roles(&env);
    let certs = routed_certs(&["localhost", "127.0.0.1", "*.tenants.test"]);
    let proxy = Proxy::start_toml(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\n\
         [[upstream]]\nname = \"tenants\"\naddress = \"localhost:{}\"\nca_file = \"{}\"\n\
         database = \"{{endpoint}}\"\n{}\n\
         [[route]]\nserver_name = \"*.tenants.test\"\nupstream = \"tenants\"\n\
         [limits]\nfailed_logins_per_address = 1000\nfailed_logins_per_user = 1000\n",
        certs.tls_toml,
        env.pg.port,
        env.pg.ca_cert.display(),
        auth_query_keys(&pw_file)
    ));
    let addr = proxy.addr();
    tokio::task::block_in_place(|| {
        for i in 0..12 {
            let out = psql(
                &conninfo(
                    &certs,
                    addr,
                    &format!("x{i}.tenants.test"),
                    "user=app dbname=postgres",
                )
                .replace("user=postgres ", ""),
                "wrong-password",
                "SELECT 1",
            );
            assert!(
                stderr(&out).contains("password authentication failed"),
                "{}",
                stderr(&out)
            );
        }
    });
    let direct = env.direct_client().await;
    let lookups: i64 = direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'pgbastion_auth'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        (1..=4).contains(&lookups),
        "{lookups} lookup connections kept for 12 endpoints"
    );
}
