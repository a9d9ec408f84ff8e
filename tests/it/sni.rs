//! A certificate per TLS server name (`[[tls.sni]]`, issue 22): libpq's
//! SNI picks the certificate, so `sslmode=verify-full` works for every
//! routed name; SCRAM-SHA-256-PLUS binds to the certificate served; a
//! SIGHUP re-reads the per-name certificates like the default one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;
use pgbastion::dev::certs::Ca;

/// A CA and pgbastion's three certificates: the default (`localhost`),
/// `orders.test`, and `*.tenants.test`.
struct NamedCerts {
    ca: PathBuf,
    toml: String,
    orders: (PathBuf, PathBuf),
}

fn named_certs(dir: &Path, ca: &Ca, stem: &str) -> NamedCerts {
    let issue = |names: &[&str], name: &str| {
        ca.server_cert(names)
            .unwrap()
            .write(dir, &format!("{stem}-{name}"))
            .unwrap()
    };
    let default = issue(&["localhost"], "default");
    let orders = issue(&["orders.test"], "orders");
    let tenants = issue(&["*.tenants.test"], "tenants");
    let entry = |names: &str, (cert, key): &(PathBuf, PathBuf)| {
        format!(
            "[[tls.sni]]\nnames = {names}\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        )
    };
    let toml = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n{}{}",
        default.0.display(),
        default.1.display(),
        entry(r#"["orders.test"]"#, &orders),
        entry(r#"["*.tenants.test"]"#, &tenants)
    );
    NamedCerts {
        ca: ca.write_cert(dir, &format!("{stem}-ca")).unwrap(),
        toml,
        orders,
    }
}

/// libpq to pgbastion at `port` as `host` (sent as SNI), connecting to
/// 127.0.0.1 and verifying the certificate names `host`.
fn as_host(host: &str, port: u16, ca: &Path, extra: &str) -> String {
    format!(
        "host={host} hostaddr=127.0.0.1 port={port} user=app dbname=postgres \
         sslmode=verify-full sslrootcert={} {extra}",
        ca.display()
    )
}

#[test]
fn each_routed_name_gets_its_certificate_and_its_channel_binding() {
    let env = Env::new();
    let password_file = install_roles(&env);
    let certs = named_certs(env.dir.path(), &Ca::new("sni test CA").unwrap(), "sni");
    let proxy = Proxy::start_toml(&format!(
        "{}\n[[listener]]\nname = \"tcp\"\nlisten = \"127.0.0.1:0\"\nclient_tls = \"require\"\n{}{}",
        certs.toml,
        env.upstream_toml(),
        auth_query_keys(&password_file)
    ));
    let port = proxy.addr().port();
    for host in ["orders.test", "t1.tenants.test", "localhost"] {
        // channel_binding=require: SCRAM-SHA-256-PLUS with the binding of
        // the certificate this name was served, else the login fails.
        let conninfo = as_host(host, port, &certs.ca, "channel_binding=require");
        let out = psql(&conninfo, APP_PASSWORD, "select current_user");
        assert!(out.status.success(), "{host}: {}", stderr(&out));
        assert_eq!(stdout(&out), "app", "{host}");
    }
    // A name no certificate covers gets the default, which verify-full
    // refuses.
    let out = psql(
        &as_host("other.test", port, &certs.ca, ""),
        APP_PASSWORD,
        "select 1",
    );
    assert!(!out.status.success(), "other.test connected");
    assert!(
        stderr(&out).contains("does not match host name \"other.test\""),
        "{}",
        stderr(&out)
    );

    let starts = proxy.wait_audit_count("three sessions", 3, |e| e["event"] == "session.start");
    let mut snis: Vec<&str> = starts
        .iter()
        .map(|s| {
            for leg in ["client", "server"] {
                assert_eq!(s["auth"][leg]["mechanism"], "SCRAM-SHA-256-PLUS", "{s}");
                assert_eq!(s["auth"][leg]["channel_binding"], true, "{s}");
            }
            s["client_tls"]["sni"].as_str().unwrap_or_default()
        })
        .collect();
    snis.sort();
    assert_eq!(
        snis,
        ["localhost", "orders.test", "t1.tenants.test"],
        "{starts:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_per_name_certificates() {
    let env = Env::new();
    let dir = env.dir.path().to_owned();
    let ca = Ca::new("sni reload CA").unwrap();
    let certs = named_certs(&dir, &ca, "live");
    let port = pgbastion::dev::localpg::free_port().unwrap();
    let admin_port = pgbastion::dev::localpg::free_port().unwrap();
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], admin_port).into();
    let log = dir.join("pgbastion.log");
    let cfg = dir.join("pgbastion.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}\n[[listener]]\nlisten = \"127.0.0.1:{port}\"\n{}\n[admin]\nlisten = \"{admin}\"\n[audit]\nlog = \"off\"\n",
            certs.toml,
            env.upstream_toml()
        ),
    )
    .unwrap();
    let proc = Running(config_form(&cfg, Some(&log)).spawn().unwrap());
    wait_listening(port);
    let connect = |ca: &Path| {
        let conninfo = as_host("orders.test", port, ca, "channel_binding=disable")
            .replace("user=app", "user=postgres");
        env.psql(&conninfo, "select 1")
    };
    let out = connect(&certs.ca);
    assert!(out.status.success(), "{}", stderr(&out));
    let expiry = || certificate_expiry(admin, "tls_sni:orders.test");
    let before = wait_for("the sni expiry metric", Duration::from_secs(10), expiry);

    // orders.test's certificate and key replaced by one from another CA,
    // valid until 2042.
    let new_ca = Ca::new("rotated sni CA").unwrap();
    let new_ca_file = new_ca.write_cert(&dir, "rotated-ca").unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["orders.test".to_owned()]).unwrap();
    params.not_after = pgbastion::dev::certs::date_time_ymd(2042, 1, 1);
    let issued = new_ca.issue(params).unwrap();
    std::fs::write(&certs.orders.0, &issued.cert_pem).unwrap();
    std::fs::write(&certs.orders.1, &issued.key_pem).unwrap();
    signal(proc.0.id(), "-HUP");
    tokio::task::block_in_place(|| wait_log(&log, "certificates re-read"));
    let out = connect(&new_ca_file);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = connect(&certs.ca);
    assert!(
        !out.status.success(),
        "the old CA still verifies orders.test"
    );
    assert!(
        stderr(&out).contains("certificate verify failed"),
        "{}",
        stderr(&out)
    );
    // The other names keep their certificates.
    let out = env.psql(
        &as_host(
            "t1.tenants.test",
            port,
            &certs.ca,
            "channel_binding=disable",
        )
        .replace("user=app", "user=postgres"),
        "select 1",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(expiry(), Some(2_272_147_200), "2042-01-01, was {before}");
}
