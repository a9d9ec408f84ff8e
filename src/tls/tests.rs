//! `ServerCert` and `ServedTls`: what a client's handshake receives is the
//! chain the certificate was loaded with, and the binding offered is that
//! chain's leaf's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::channel_binding::tls_server_end_point;
use super::*;
use crate::dev::certs::Ca;

struct Files {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cfg: ClientTlsConfig,
}

/// A CA and a server certificate for localhost valid until `year`.
fn files(year: i32) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("tls unit test CA").unwrap();
    let ca_file = ca.write_cert(dir.path(), "ca").unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_after = crate::dev::certs::date_time_ymd(year, 1, 1);
    let (cert, key) = ca
        .issue(params)
        .unwrap()
        .write(dir.path(), "server")
        .unwrap();
    Files {
        _dir: dir,
        ca: ca_file,
        cfg: ClientTlsConfig {
            cert,
            key,
            min_version: TlsVersion::Tls12,
            sni: Vec::new(),
        },
    }
}

/// Runs one handshake against `served` and returns the leaf the client
/// received.
async fn served_leaf(served: &ServedTls, ca: &Path) -> Vec<u8> {
    served_leaf_for(served, ca, "localhost").await
}

/// The same, with `sni` as the server name (which the leaf must cover:
/// the client verifies it).
async fn served_leaf_for(served: &ServedTls, ca: &Path, sni: &str) -> Vec<u8> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca, "CA").unwrap() {
        roots.add(c).unwrap();
    }
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = served.acceptor().clone();
    let server = tokio::spawn(async move {
        let mut tls = acceptor.accept(b).await.unwrap();
        tls.write_all(b"x").await.unwrap();
        tls.flush().await.unwrap();
    });
    let mut tls = TlsConnector::from(Arc::new(client))
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), a)
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    tls.read_exact(&mut byte).await.unwrap();
    server.await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn the_binding_offered_is_that_of_the_certificate_served() {
    let f = files(2041);
    let cert = ServerCert::load(&f.cfg).unwrap();
    let served = cert.acceptor(TlsVersion::Tls12, None).unwrap();
    let leaf = served_leaf(&served, &f.ca).await;
    assert_eq!(leaf, cert.chain()[0].to_vec());
    assert_eq!(
        served.end_point_for(None).map(<[u8]>::to_vec),
        tls_server_end_point(&leaf)
    );
    assert!(
        served.end_point_for(None).is_some(),
        "ECDSA P-256 has a binding"
    );
    // 2041-01-01T00:00:00Z.
    assert_eq!(cert.not_after(), Some(2_240_611_200));
}

#[tokio::test]
async fn a_rotated_file_changes_nothing_until_it_is_loaded_again() {
    let f = files(2041);
    let before = ServerCert::load(&f.cfg).unwrap();
    let served = before.acceptor(TlsVersion::Tls12, None).unwrap();
    // The files replaced on disk: the acceptor and its binding stay those
    // of what was loaded, together.
    let g = files(2042);
    std::fs::copy(&g.cfg.cert, &f.cfg.cert).unwrap();
    std::fs::copy(&g.cfg.key, &f.cfg.key).unwrap();
    let leaf = served_leaf(&served, &f.ca).await;
    assert_eq!(leaf, before.chain()[0].to_vec());
    assert_eq!(
        served.end_point_for(None).map(<[u8]>::to_vec),
        tls_server_end_point(&leaf)
    );
    let after = ServerCert::load(&f.cfg).unwrap();
    assert_ne!(after.chain()[0], before.chain()[0]);
    assert_eq!(after.not_after(), Some(2_272_147_200));
}

#[test]
fn a_key_of_another_certificate_is_refused() {
    let (f, g) = (files(2041), files(2041));
    let cfg = ClientTlsConfig {
        key: g.cfg.key.clone(),
        ..f.cfg.clone()
    };
    let err = ServerCert::load(&cfg).err().unwrap().to_string();
    assert!(
        err.contains(&f.cfg.cert.display().to_string()) && err.contains("key"),
        "{err}"
    );
}

#[test]
fn missing_and_empty_files_are_named() {
    let f = files(2041);
    let missing = ClientTlsConfig {
        cert: f.cfg.cert.with_file_name("missing.crt"),
        ..f.cfg.clone()
    };
    let err = ServerCert::load(&missing).err().unwrap().to_string();
    assert!(
        err.starts_with("cannot read TLS certificate") && err.contains("missing.crt"),
        "{err}"
    );
    let empty = f.cfg.cert.with_file_name("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let err = ServerCert::load(&ClientTlsConfig {
        cert: empty,
        ..f.cfg.clone()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("contains no PEM certificate"), "{err}");
    let err = ServerCert::load(&ClientTlsConfig {
        key: f.ca.clone(),
        ..f.cfg.clone()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(err.starts_with("cannot read TLS key"), "{err}");
}

/// A CA, a default certificate (for `localhost`, `nobody.test` and
/// `*.other.test`), and two `[[tls.sni]]` ones: `orders.tenants.test`
/// (configured for `billing.test` too, which it does not cover) and
/// `*.tenants.test`.
struct SniFiles {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cfg: ClientTlsConfig,
}

fn sni_files() -> SniFiles {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("sni unit test CA").unwrap();
    let ca_file = ca.write_cert(dir.path(), "ca").unwrap();
    let issue = |names: &[&str], stem: &str| {
        ca.server_cert(names)
            .unwrap()
            .write(dir.path(), stem)
            .unwrap()
    };
    let (cert, key) = issue(&["localhost", "nobody.test", "*.other.test"], "default");
    let (orders_cert, orders_key) = issue(&["orders.tenants.test"], "orders");
    let (tenants_cert, tenants_key) = issue(&["*.tenants.test"], "tenants");
    SniFiles {
        _dir: dir,
        ca: ca_file,
        cfg: ClientTlsConfig {
            cert,
            key,
            min_version: TlsVersion::Tls12,
            sni: vec![
                crate::config::SniCertConfig {
                    names: vec!["orders.tenants.test".into(), "billing.test".into()],
                    cert: orders_cert,
                    key: orders_key,
                },
                crate::config::SniCertConfig {
                    names: vec!["*.tenants.test".into()],
                    cert: tenants_cert,
                    key: tenants_key,
                },
            ],
        },
    }
}

/// The leaf of the certificate `file` holds.
fn leaf_of(file: &Path) -> Vec<u8> {
    load_certs(file, "certificate").unwrap()[0].to_vec()
}

#[tokio::test]
async fn the_sni_picks_the_exact_name_then_the_wildcard_then_the_default() {
    let f = sni_files();
    let certs = ServerCerts::load(&f.cfg).unwrap();
    let served = certs.acceptor(TlsVersion::Tls12, None).unwrap();
    let (default, orders, tenants) = (&f.cfg.cert, &f.cfg.sni[0].cert, &f.cfg.sni[1].cert);
    for (sni, file) in [
        ("orders.tenants.test", orders),
        ("ORDERS.Tenants.test", orders),
        ("t1.tenants.test", tenants),
        ("nobody.test", default),
        ("localhost", default),
        ("a.other.test", default),
    ] {
        let leaf = served_leaf_for(&served, &f.ca, sni).await;
        assert_eq!(leaf, leaf_of(file), "{sni}");
        // The binding offered to that client is that of the leaf it got.
        let sni = sni.to_ascii_lowercase();
        assert_eq!(
            served.end_point_for(Some(&sni)).map(<[u8]>::to_vec),
            tls_server_end_point(&leaf),
            "{sni}"
        );
        assert!(served.end_point_for(Some(&sni)).is_some());
    }
}

#[test]
fn for_name_compares_lowercase_and_a_wildcard_covers_one_label() {
    let f = sni_files();
    let certs = ServerCerts::load(&f.cfg).unwrap();
    let path = |sni: Option<&str>| certs.for_name(sni).path().to_owned();
    assert_eq!(path(None), f.cfg.cert);
    assert_eq!(path(Some("Billing.TEST.")), f.cfg.sni[0].cert);
    assert_eq!(path(Some("x.tenants.test")), f.cfg.sni[1].cert);
    assert_eq!(path(Some("*.tenants.test")), f.cfg.sni[1].cert);
    assert_eq!(path(Some("a.b.tenants.test")), f.cfg.cert);
    assert_eq!(path(Some("tenants.test")), f.cfg.cert);
    assert_eq!(path(Some("test")), f.cfg.cert);
    let firsts: Vec<&str> = certs.per_name().map(|(n, _)| n).collect();
    assert_eq!(firsts, ["orders.tenants.test", "*.tenants.test"]);
    assert_eq!(certs.default_cert().path(), f.cfg.cert);
}

#[test]
fn uncovered_names_the_routed_name_the_file_and_what_it_covers() {
    let f = sni_files();
    let certs = ServerCerts::load(&f.cfg).unwrap();
    for covered in [
        "orders.tenants.test",
        "t1.tenants.test",
        "*.tenants.test",
        "nobody.test",
        "*.other.test",
        "a.other.test",
        "LOCALHOST",
    ] {
        assert_eq!(certs.uncovered(covered), None, "{covered}");
    }
    let err = certs.uncovered("billing.test").unwrap();
    assert!(
        err.contains("\"billing.test\"")
            && err.contains(&f.cfg.sni[0].cert.display().to_string())
            && err.contains("orders.tenants.test"),
        "{err}"
    );
    let err = certs.uncovered("*.orders.test").unwrap();
    assert!(
        err.contains("the default certificate")
            && err.contains(&f.cfg.cert.display().to_string())
            && err.contains("localhost, nobody.test, *.other.test"),
        "{err}"
    );
    // A wildcard certificate covers one label: not the parent, not deeper.
    assert!(certs.uncovered("x.a.other.test").is_some());
    assert!(certs.uncovered("other.test").is_some());
}

#[test]
fn the_common_name_counts_only_without_dns_names() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cn test CA").unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "CN.test");
    let (cert, key) = ca.issue(params).unwrap().write(dir.path(), "cn").unwrap();
    assert_eq!(
        ServerCert::load_files(&cert, &key).unwrap().dns_names(),
        ["cn.test"]
    );
    let (cert, key) = ca
        .server_cert(&["san.test"])
        .unwrap()
        .write(dir.path(), "san")
        .unwrap();
    // `server_cert` sets the common name too; the SAN wins.
    let c = ServerCert::load_files(&cert, &key).unwrap();
    assert_eq!(c.dns_names(), ["san.test"]);
}
