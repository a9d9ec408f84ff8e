//! The upstream leg's options against real servers: trusted roots from a
//! directory or the system, `server_name` as an IP address, SNI, mutual
//! TLS toward PostgreSQL, and direct TLS (PostgreSQL 17 style; the peer is a
//! second pgbastion, which implements it, as PostgreSQL 15 here does not).

use crate::common::*;
use pgbastion::dev::certs::Ca;
use pgbastion::dev::localpg::{LocalPg, LocalPgOptions};

fn listener_toml() -> &'static str {
    "[[listener]]\nlisten = \"127.0.0.1:0\"\n"
}

#[test]
fn server_name_as_ip_address_and_ca_directory() {
    let env = Env::new();
    let ca_dir = env.dir.path().join("cas");
    std::fs::create_dir(&ca_dir).unwrap();
    std::fs::copy(&env.pg.ca_cert, ca_dir.join("db.pem")).unwrap();
    std::fs::write(ca_dir.join("README"), "not a certificate").unwrap();
    let proxy = Proxy::start_toml(&format!(
        "{}{}[[upstream]]\naddress = \"localhost:{}\"\nserver_name = \"127.0.0.1\"\nca_dir = \"{}\"\n",
        env.tls_toml(),
        listener_toml(),
        env.pg.port,
        ca_dir.display()
    ));
    let out = env.psql(
        &env.via_proxy(proxy.addr(), "channel_binding=disable"),
        "select 'ip name ok'",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "ip name ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_roots_do_not_trust_a_private_ca() {
    let env = Env::new();
    let proxy = Proxy::start_toml(&format!(
        "{}{}[[upstream]]\naddress = \"localhost:{}\"\nsystem_roots = true\n",
        env.tls_toml(),
        listener_toml(),
        env.pg.port
    ));
    let Err(err) = proxy.client(&env, "").await else {
        panic!("a private CA is not among the system roots");
    };
    let db = err.as_db_error().expect("an ErrorResponse from pgbastion");
    assert_eq!(db.code().code(), "08001");
    assert!(db.message().contains("unknown issuer"), "{}", db.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_toward_postgres() {
    let client_ca = Ca::new("clients of the database").unwrap();
    let pg = LocalPg::start(LocalPgOptions {
        client_ca_pem: Some(client_ca.cert_pem()),
        ..LocalPgOptions::default()
    })
    .unwrap();
    let certs = ProxyCerts::new();
    let mut params = rcgen::CertificateParams::new(vec!["pgbastion".to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "pgbastion");
    let (cert, key) = client_ca
        .issue(params)
        .unwrap()
        .write(certs.dir.path(), "upstream-client")
        .unwrap();
    let upstream = format!(
        "[[upstream]]\naddress = \"localhost:{}\"\nca_file = \"{}\"\n",
        pg.port,
        pg.ca_cert.display()
    );
    let with_cert = Proxy::start_toml(&format!(
        "{}{}{upstream}client_cert = \"{}\"\nclient_key = \"{}\"\n",
        certs.tls_toml(),
        listener_toml(),
        cert.display(),
        key.display()
    ));
    let (client, _conn) = with_cert
        .client_with(&certs, &pg.password, "")
        .await
        .unwrap();
    let row = client
        .query_one(
            "select client_dn from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    let dn: Option<String> = row.get(0);
    assert_eq!(
        dn.as_deref(),
        Some("/CN=pgbastion"),
        "the server saw pgbastion's client certificate"
    );

    // Without the certificate, the server's own refusal reaches the client.
    let without = Proxy::start_toml(&format!(
        "{}{}{upstream}",
        certs.tls_toml(),
        listener_toml()
    ));
    let Err(err) = without.client_with(&certs, &pg.password, "").await else {
        panic!("the server requires a client certificate");
    };
    let db = err.as_db_error().expect("the server's ErrorResponse");
    assert_eq!(db.code().code(), "28000", "{}", db.message());
}

/// Client -> pgbastion A -> pgbastion B -> PostgreSQL, with A using
/// `tls_negotiation` toward B and B auditing what it saw.
async fn chained(negotiation: &str, server_name: &str) -> serde_json::Value {
    let env = Env::new();
    let b = env.proxy("require", "");
    let a = Proxy::start_toml(&format!(
        "{}{}[[upstream]]\naddress = \"localhost:{}\"\nca_file = \"{}\"\nserver_name = \"{server_name}\"\ntls_negotiation = \"{negotiation}\"\n",
        env.tls_toml(),
        listener_toml(),
        b.addr().port(),
        env.proxy_ca.display()
    ));
    let (client, _conn) = a.client(&env, "").await.unwrap();
    let v: String = client
        .query_one("select 'chained'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "chained");
    let start = b.wait_audit("B's session start", |e| e["event"] == "session.start");
    let a_start = a.wait_audit("A's session start", |e| e["event"] == "session.start");
    assert_eq!(
        a_start["upstream"]["tls"]["alpn"],
        start["client_tls"]["alpn"]
    );
    start
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_upstream_with_alpn_and_sni() {
    let seen_by_b = chained("direct", "localhost").await;
    assert_eq!(seen_by_b["client_tls"]["mode"], "tls");
    assert_eq!(seen_by_b["client_tls"]["alpn"], "postgresql");
    assert_eq!(
        seen_by_b["client_tls"]["sni"], "localhost",
        "SNI is sent for DNS names"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sni_for_an_ip_server_name() {
    let seen_by_b = chained("postgres", "127.0.0.1").await;
    assert_eq!(seen_by_b["client_tls"]["mode"], "tls");
    assert!(seen_by_b["client_tls"].get("sni").is_none(), "{seen_by_b}");
    assert!(
        seen_by_b["client_tls"].get("alpn").is_none(),
        "SSLRequest mode sends no ALPN"
    );
}
