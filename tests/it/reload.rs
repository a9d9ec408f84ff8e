//! Reloading without dropping sessions (issue 12): certificates, keys and
//! CA bundles rotated on disk take effect at SIGHUP for new sessions,
//! while open sessions keep what they started with.

use std::time::Duration;

use crate::common::*;
use pgbastion::dev::certs::Ca;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_certificates_and_open_sessions_keep_working() {
    let env = Env::new();
    let dir = env.dir.path().to_owned();
    // Files pgbastion reads, which an operator (or cert-manager) replaces.
    let cert = dir.join("live.crt");
    let key = dir.join("live.key");
    let upstream_ca = dir.join("live-upstream-ca.crt");
    std::fs::copy(&env.proxy_cert, &cert).unwrap();
    std::fs::copy(&env.proxy_key, &key).unwrap();
    std::fs::copy(&env.pg.ca_cert, &upstream_ca).unwrap();
    let port = pgbastion::dev::localpg::free_port().unwrap();
    let log = dir.join("pgbastion.log");
    let cfg = dir.join("pgbastion.toml");
    std::fs::write(
        &cfg,
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n[[listener]]\nlisten = \"127.0.0.1:{port}\"\n\
             [[upstream]]\nname = \"pg\"\naddress = \"localhost:{}\"\nca_file = \"{}\"\n[audit]\nlog = \"off\"\n",
            cert.display(),
            key.display(),
            env.pg.port,
            upstream_ca.display()
        ),
    )
    .unwrap();
    let proc = Running(config_form(&cfg, Some(&log)).spawn().unwrap());
    let addr = wait_listening(port);
    let reloads = |n: usize| {
        wait_for("the reload", Duration::from_secs(10), || {
            let text = std::fs::read_to_string(&log).ok()?;
            (text.matches("certificates re-read").count() >= n).then_some(())
        })
    };
    let conninfo = |ca: &std::path::Path| {
        format!(
            "host=localhost port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={} channel_binding=disable",
            addr.port(),
            ca.display()
        )
    };
    let open = async {
        let (client, conn) = tokio_postgres::connect(
            &format!(
                "host=localhost port={} user=postgres dbname=postgres password={} sslmode=require channel_binding=disable",
                addr.port(),
                env.pg.password
            ),
            tls_connector(&env.proxy_ca),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        client
    }
    .await;
    assert_eq!(
        open.query_one("select 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );

    // pgbastion's certificate and key from a new CA.
    let new_ca = Ca::new("rotated CA").unwrap();
    let new_ca_file = new_ca.write_cert(&dir, "rotated-ca").unwrap();
    let issued = new_ca.server_cert(&["localhost"]).unwrap();
    std::fs::write(&cert, &issued.cert_pem).unwrap();
    std::fs::write(&key, &issued.key_pem).unwrap();
    signal(proc.0.id(), "-HUP");
    tokio::task::block_in_place(|| reloads(1));
    let out = env.psql(&conninfo(&new_ca_file), "select 'new CA'");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.psql(&conninfo(&env.proxy_ca), "select 1");
    assert!(
        !out.status.success(),
        "a client trusting only the old CA is refused"
    );
    assert!(
        stderr(&out).contains("certificate verify failed"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        open.query_one("select 2", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        2,
        "the open session keeps working"
    );

    // The upstream CA bundle replaced by one that does not sign the
    // server: new sessions are refused, the open one goes on.
    std::fs::write(&upstream_ca, Ca::new("unrelated").unwrap().cert_pem()).unwrap();
    signal(proc.0.id(), "-HUP");
    tokio::task::block_in_place(|| reloads(2));
    let out = env.psql(&conninfo(&new_ca_file), "select 1");
    assert!(
        stderr(&out).contains("certificate is not trusted"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        open.query_one("select 3", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        3
    );
    // A broken file changes nothing.
    std::fs::write(&key, "not a key").unwrap();
    signal(proc.0.id(), "-HUP");
    wait_for("the refusal", Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("reload refused"))
    });
    std::fs::copy(&env.pg.ca_cert, &upstream_ca).unwrap();
    let out = env.psql(&conninfo(&new_ca_file), "select 1");
    assert!(
        stderr(&out).contains("certificate is not trusted"),
        "the refused reload did not apply the restored CA either: {}",
        stderr(&out)
    );
}

/// `[reload] watch = true`: a certificate and key replaced on disk (as
/// cert-manager or a Kubernetes Secret update does) are picked up with no
/// signal at all.
#[test]
fn watched_files_are_reloaded_without_a_signal() {
    let env = Env::new();
    let dir = env.dir.path().to_owned();
    let cert = dir.join("live.crt");
    let key = dir.join("live.key");
    std::fs::copy(&env.proxy_cert, &cert).unwrap();
    std::fs::copy(&env.proxy_key, &key).unwrap();
    let port = pgbastion::dev::localpg::free_port().unwrap();
    let log = dir.join("pgbastion.log");
    let cfg = dir.join("pgbastion.toml");
    std::fs::write(
        &cfg,
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n[[listener]]\nlisten = \"127.0.0.1:{port}\"\n{}\n\
             [reload]\nwatch = true\ndebounce = \"300ms\"\n[audit]\nlog = \"off\"\n",
            cert.display(),
            key.display(),
            env.upstream_toml()
        ),
    )
    .unwrap();
    let _proc = Running(config_form(&cfg, Some(&log)).spawn().unwrap());
    let addr = wait_listening(port);
    let conninfo = |ca: &std::path::Path| {
        format!(
            "host=localhost port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={} channel_binding=disable",
            addr.port(),
            ca.display()
        )
    };
    let out = env.psql(&conninfo(&env.proxy_ca), "select 1");
    assert!(out.status.success(), "{}", stderr(&out));
    let new_ca = Ca::new("rotated CA").unwrap();
    let new_ca_file = new_ca.write_cert(&dir, "rotated-ca").unwrap();
    let issued = new_ca.server_cert(&["localhost"]).unwrap();
    std::fs::write(&cert, &issued.cert_pem).unwrap();
    std::fs::write(&key, &issued.key_pem).unwrap();
    wait_for("the watched reload", Duration::from_secs(15), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("certificates re-read"))
    });
    let out = env.psql(&conninfo(&new_ca_file), "select 'watched'");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "watched");
}

/// Settings new sessions take (here `[forward] application_name`), the
/// limits and the audit log's destination follow a reload; what a reload
/// cannot apply (here a new `[admin]` listener) is named in the log.
#[test]
fn reload_applies_settings_and_names_what_needs_a_restart() {
    let env = Env::new();
    let dir = env.dir.path().to_owned();
    let port = pgbastion::dev::localpg::free_port().unwrap();
    let log = dir.join("pgbastion.log");
    let cfg = dir.join("pgbastion.toml");
    let write = |extra: &str| {
        std::fs::write(
            &cfg,
            format!(
                "{}\n[[listener]]\nlisten = \"127.0.0.1:{port}\"\n{}\n{extra}",
                env.tls_toml(),
                env.upstream_toml()
            ),
        )
        .unwrap()
    };
    write("[audit]\nlog = \"off\"\n");
    let proc = Running(config_form(&cfg, Some(&log)).spawn().unwrap());
    let addr = wait_listening(port);
    let app_name = || {
        let out = env.psql(
            &format!(
                "{} application_name=report",
                env.via_proxy(addr, "channel_binding=disable")
            ),
            "select application_name from pg_stat_activity where pid = pg_backend_pid()",
        );
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(app_name(), "report");
    let audit = dir.join("audit.jsonl");
    write(&format!(
        "[forward]\napplication_name = \"{{application_name}} [{{identity}}]\"\n[limits]\nmax_sessions = 1\n\
         [audit]\nlog = \"{}\"\n[admin]\nlisten = \"127.0.0.1:{}\"\n",
        audit.display(),
        pgbastion::dev::localpg::free_port().unwrap()
    ));
    signal(proc.0.id(), "-HUP");
    let text = wait_log(&log, "these changes take a restart");
    assert_eq!(app_name(), "report [127.0.0.1]");
    wait_for(
        "the session in the new audit file",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&audit)
                .ok()
                .filter(|t| t.contains("\"session.end\""))
        },
    );
    assert!(
        text.contains("these changes take a restart") && text.contains("[admin]"),
        "{text}"
    );
    // max_sessions is now 1: with one session open, the next is refused.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let password = env.pg.password.clone();
    rt.block_on(async {
        let conninfo = format!(
            "host=localhost port={port} user=postgres dbname=postgres password={password} sslmode=require channel_binding=disable"
        );
        let (held, conn) = tokio_postgres::connect(&conninfo, tls_connector(&env.proxy_ca))
            .await
            .unwrap();
        tokio::spawn(conn);
        held.simple_query("select 1").await.unwrap();
        let refused = tokio_postgres::connect(&conninfo, tls_connector(&env.proxy_ca))
            .await
            .err()
            .expect("the second session is refused");
        assert_eq!(sqlstate(&refused).as_deref(), Some("53300"), "{refused}");
    });
}

/// Listeners come and go with a reload: a new one accepts at once, a
/// removed one stops accepting while its open sessions go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_listeners() {
    let env = Env::new();
    let dir = env.dir.path().to_owned();
    let (port_a, port_b) = (
        pgbastion::dev::localpg::free_port().unwrap(),
        pgbastion::dev::localpg::free_port().unwrap(),
    );
    let log = dir.join("pgbastion.log");
    let cfg = dir.join("pgbastion.toml");
    let write = |ports: &[(&str, u16)]| {
        let listeners: String = ports
            .iter()
            .map(|(name, port)| {
                format!("[[listener]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\n")
            })
            .collect();
        std::fs::write(
            &cfg,
            format!(
                "{}\n{listeners}{}\n[audit]\nlog = \"off\"\n",
                env.tls_toml(),
                env.upstream_toml()
            ),
        )
        .unwrap()
    };
    write(&[("a", port_a)]);
    let proc = Running(config_form(&cfg, Some(&log)).spawn().unwrap());
    let addr_a = wait_listening(port_a);
    let conninfo = |port: u16| {
        format!(
            "host=localhost port={port} user=postgres dbname=postgres password={} sslmode=require channel_binding=disable connect_timeout=5",
            env.pg.password
        )
    };
    let (open, conn) = tokio_postgres::connect(&conninfo(port_a), tls_connector(&env.proxy_ca))
        .await
        .unwrap();
    tokio::spawn(conn);
    open.simple_query("select 1").await.unwrap();

    write(&[("b", port_b)]);
    signal(proc.0.id(), "-HUP");
    tokio::task::block_in_place(|| wait_log(&log, "certificates re-read"));
    let (new, conn) = tokio_postgres::connect(&conninfo(port_b), tls_connector(&env.proxy_ca))
        .await
        .expect("the added listener accepts");
    tokio::spawn(conn);
    new.simple_query("select 1").await.unwrap();
    tokio::task::block_in_place(|| {
        wait_for(
            "the removed listener to close",
            Duration::from_secs(5),
            || std::net::TcpStream::connect(addr_a).is_err().then_some(()),
        )
    });
    assert_eq!(
        open.query_one("select 2", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        2,
        "its open session goes on"
    );
}

/// Upstreams and listeners change with a reload too: an upstream pointed at
/// another server (with its own CA), a listener moved to another port, a
/// new upstream with a new listener. A session already open stays on the
/// server it started with, and its Ctrl-C still reaches that server, verified
/// with the CA bundle the session was verified with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_moves_listeners_and_repoints_upstreams() {
    let env = Env::new();
    let other = tokio::task::block_in_place(|| {
        pgbastion::dev::localpg::LocalPg::start(Default::default()).expect("a second PostgreSQL")
    });
    let dir = env.dir.path().to_owned();
    let port = || pgbastion::dev::localpg::free_port().unwrap();
    let (port_a, port_m, port_m2, port_b) = (port(), port(), port(), port());
    let log = dir.join("pgbastion.log");
    let cfg = dir.join("pgbastion.toml");
    let upstream = |name: &str, pg: &pgbastion::dev::localpg::LocalPg| {
        format!(
            "[[upstream]]\nname = \"{name}\"\naddress = \"localhost:{}\"\nca_file = \"{}\"\n",
            pg.port,
            pg.ca_cert.display()
        )
    };
    let listener = |name: &str, port: u16, upstream: &str| {
        format!("[[listener]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nupstream = \"{upstream}\"\n")
    };
    let write = |body: String| {
        std::fs::write(
            &cfg,
            format!("{}\n{body}\n[audit]\nlog = \"off\"\n", env.tls_toml()),
        )
        .unwrap()
    };
    write(listener("a", port_a, "pg") + &listener("m", port_m, "pg") + &upstream("pg", &env.pg));
    let proc = Running(config_form(&cfg, Some(&log)).spawn().unwrap());
    let addr_m = wait_listening(port_m);
    let connect = |port: u16, password: String, app: &'static str| {
        let conninfo = format!(
            "host=localhost port={port} user=postgres dbname=postgres password={password} sslmode=require channel_binding=disable connect_timeout=5 application_name={app}"
        );
        let tls = tls_connector(&env.proxy_ca);
        async move {
            let (client, conn) = tokio_postgres::connect(&conninfo, tls)
                .await
                .unwrap_or_else(|e| panic!("port {port}: {e}"));
            tokio::spawn(conn);
            client
        }
    };
    let open = connect(port_a, env.pg.password.clone(), "held").await;
    assert_eq!(server_port(&open).await, env.pg.port);

    write(
        listener("a", port_a, "pg")
            + &listener("m", port_m2, "pg")
            + &listener("b", port_b, "first")
            + &upstream("pg", &other)
            + &upstream("first", &env.pg),
    );
    signal(proc.0.id(), "-HUP");
    let text = tokio::task::block_in_place(|| wait_log(&log, "certificates re-read"));
    assert!(!text.contains("take a restart"), "{text}");

    // New sessions follow the new configuration.
    let a = connect(port_a, other.password.clone(), "new-a").await;
    assert_eq!(
        server_port(&a).await,
        other.port,
        "upstream pg now points at the other server"
    );
    let m = connect(port_m2, other.password.clone(), "new-m").await;
    assert_eq!(server_port(&m).await, other.port);
    let b = connect(port_b, env.pg.password.clone(), "new-b").await;
    assert_eq!(server_port(&b).await, env.pg.port);
    tokio::task::block_in_place(|| {
        wait_for(
            "the moved listener's old port to close",
            Duration::from_secs(5),
            || std::net::TcpStream::connect(addr_m).is_err().then_some(()),
        )
    });

    // The session opened before stays where it was, and can be cancelled.
    assert_eq!(server_port(&open).await, env.pg.port);
    let token = open.cancel_token();
    let direct = env.direct_client().await;
    let query = tokio::spawn(async move { open.simple_query("select pg_sleep(60)").await });
    wait_active(&direct, "held").await;
    token
        .cancel_query(tls_connector(&env.proxy_ca))
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), query)
        .await
        .expect("cancelled within 5 s")
        .unwrap()
        .expect_err("the query was cancelled");
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
}

/// The port of the server a session is connected to.
async fn server_port(client: &tokio_postgres::Client) -> u16 {
    let row = client
        .query_one("select current_setting('port')", &[])
        .await
        .unwrap();
    row.get::<_, String>(0).parse().unwrap()
}

/// Issue 20: the channel binding pgbastion offers comes from the very
/// certificate it serves. Clients log in with `channel_binding=require`
/// (scram mode: pgbastion terminates SCRAM and offers SCRAM-SHA-256-PLUS,
/// bound to its own certificate) in a loop while the certificate is
/// rotated on disk and SIGHUP reloads it: no login fails, every session is
/// bound on both legs, and afterwards the new certificate is the one
/// served and the one the expiry metric reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_channel_bound_logins() {
    let env = Env::new();
    let pw_file = install_roles(&env);
    let dir = env.dir.path().to_owned();
    // One CA signs both certificates, so clients trust either; they differ
    // in key, serial and expiry.
    let ca = Ca::new("rotation CA").unwrap();
    let ca_file = ca.write_cert(&dir, "rotation-ca").unwrap();
    let issue = |year: i32| {
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        p.not_after = pgbastion::dev::certs::date_time_ymd(year, 1, 1);
        ca.issue(p).unwrap()
    };
    let (cert, key) = issue(2041).write(&dir, "live").unwrap();
    let (port, admin_port) = (
        pgbastion::dev::localpg::free_port().unwrap(),
        pgbastion::dev::localpg::free_port().unwrap(),
    );
    let (log, audit) = (dir.join("pgbastion.log"), dir.join("audit.jsonl"));
    let cfg = dir.join("pgbastion.toml");
    std::fs::write(
        &cfg,
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n[[listener]]\nlisten = \"127.0.0.1:{port}\"\n{}{}\
             [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n[audit]\nlog = \"{}\"\n",
            cert.display(),
            key.display(),
            env.upstream_toml(),
            auth_query_keys(&pw_file),
            audit.display()
        ),
    )
    .unwrap();
    let proc = Running(config_form(&cfg, Some(&log)).spawn().unwrap());
    let addr = wait_listening(port);
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], admin_port).into();
    let old_leaf = served_leaf(addr, &ca_file).await;
    assert_eq!(
        certificate_expiry(admin, "tls"),
        Some(2_240_611_200),
        "2041-01-01"
    );

    // Clients logging in, each login bound, until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let logins = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let conninfo = format!(
        "host=localhost port={port} user=app dbname=postgres password={APP_PASSWORD} \
         sslmode=require channel_binding=require connect_timeout=20"
    );
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (stop, logins, conninfo) = (stop.clone(), logins.clone(), conninfo.clone());
            let tls = tls_connector(&ca_file);
            tokio::spawn(async move {
                let mut failures = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let login = async {
                        let (client, conn) =
                            tokio_postgres::connect(&conninfo, tls.clone()).await?;
                        let conn = tokio::spawn(conn);
                        client.simple_query("select 1").await?;
                        drop(client);
                        let _ = conn.await;
                        Ok::<_, tokio_postgres::Error>(())
                    };
                    match login.await {
                        Ok(()) => logins.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
                        Err(e) => {
                            failures.push(format!("{e:?}"));
                            0
                        }
                    };
                }
                failures
            })
        })
        .collect();
    let count = || logins.load(std::sync::atomic::Ordering::SeqCst);
    tokio::task::block_in_place(|| {
        wait_for(
            "logins before the rotation",
            Duration::from_secs(30),
            || (count() >= 6).then_some(()),
        )
    });

    // Rotate: new certificate and key on disk, then SIGHUP.
    let issued = issue(2042);
    std::fs::write(&cert, &issued.cert_pem).unwrap();
    pgbastion::dev::certs::write_private(&key, issued.key_pem.as_bytes()).unwrap();
    signal(proc.0.id(), "-HUP");
    tokio::task::block_in_place(|| wait_log(&log, "certificates re-read"));
    let at_reload = count();
    tokio::task::block_in_place(|| {
        wait_for("logins after the rotation", Duration::from_secs(30), || {
            (count() >= at_reload + 6).then_some(())
        })
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for client in clients {
        let failures = client.await.unwrap();
        assert!(failures.is_empty(), "logins failed: {failures:#?}");
    }

    // The new certificate is served, and reported.
    let new_leaf = served_leaf(addr, &ca_file).await;
    assert_ne!(new_leaf, old_leaf);
    let want = pgbastion::tls::load_certs(&cert, "rotated").unwrap()[0].to_vec();
    assert_eq!(new_leaf, want, "the rotated certificate is the one served");
    let (_, parsed) = x509_parser::parse_x509_certificate(&new_leaf).unwrap();
    assert_eq!(parsed.validity().not_after.timestamp(), 2_272_147_200);
    assert_eq!(
        certificate_expiry(admin, "tls"),
        Some(2_272_147_200),
        "2042-01-01"
    );

    // Every login was bound on both legs.
    let total = count();
    let starts = tokio::task::block_in_place(|| {
        wait_for("every login audited", Duration::from_secs(10), || {
            let starts: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
                .ok()?
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|e| e["event"] == "session.start")
                .collect();
            (starts.len() >= total).then_some(starts)
        })
    });
    for start in &starts {
        for leg in ["client", "server"] {
            assert_eq!(
                start["auth"][leg]["mechanism"], "SCRAM-SHA-256-PLUS",
                "{start}"
            );
            assert_eq!(start["auth"][leg]["channel_binding"], true, "{start}");
        }
    }
}

/// The leaf certificate pgbastion at `addr` presents to a TLS client.
async fn served_leaf(addr: std::net::SocketAddr, ca: &std::path::Path) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = raw(addr).await;
    tcp.write_all(&pgbastion::protocol::startup::ssl_request())
        .await
        .unwrap();
    assert_eq!(tcp.read_u8().await.unwrap(), b'S');
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_tls_config(ca, &[])))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}
