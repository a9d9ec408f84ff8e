//! pgbastion's certificate and key files: every PEM key format it promises
//! (PKCS#8, PKCS#1, SEC1), made by the openssl command-line tool, and clear
//! errors for files that are not what they should be.

use std::path::Path;
use std::process::Command;

use pgbastion::config::{ClientTlsConfig, TlsVersion};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command must be installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn acceptor(dir: &Path, cert: &str, key: &str) -> Result<(), String> {
    pgbastion::tls::ServerCert::load(&ClientTlsConfig {
        cert: dir.join(cert),
        key: dir.join(key),
        min_version: TlsVersion::Tls12,
        sni: Vec::new(),
    })
    .and_then(|c| c.acceptor(TlsVersion::Tls12, None))
    .map(|_| ())
    .map_err(|e| e.to_string())
}

#[test]
fn pkcs8_pkcs1_and_sec1_keys_load() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(d, &["genrsa", "-traditional", "-out", "rsa1.key", "2048"]);
    openssl(
        d,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "sec1.key",
        ],
    );
    openssl(d, &["genpkey", "-algorithm", "ed25519", "-out", "p8.key"]);
    for key in ["rsa1.key", "sec1.key", "p8.key"] {
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                key,
                "-subj",
                "/CN=localhost",
                "-days",
                "2",
                "-out",
                &format!("{key}.crt"),
            ],
        );
    }
    let first = std::fs::read_to_string(d.join("rsa1.key")).unwrap();
    assert!(
        first.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
        "PKCS#1"
    );
    let first = std::fs::read_to_string(d.join("sec1.key")).unwrap();
    assert!(first.starts_with("-----BEGIN EC PRIVATE KEY-----"), "SEC1");
    let first = std::fs::read_to_string(d.join("p8.key")).unwrap();
    assert!(first.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8");
    for key in ["rsa1.key", "sec1.key", "p8.key"] {
        acceptor(d, &format!("{key}.crt"), key).unwrap_or_else(|e| panic!("{key}: {e}"));
    }
    // A key that does not match the certificate is refused at start-up.
    let err = acceptor(d, "rsa1.key.crt", "sec1.key").unwrap_err();
    assert!(err.contains("rsa1.key.crt"), "{err}");
}

#[test]
fn wrong_files_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("empty.pem"), "").unwrap();
    let err = acceptor(d, "empty.pem", "empty.pem").unwrap_err();
    assert!(
        err.contains("contains no PEM certificate") && err.contains("empty.pem"),
        "{err}"
    );
    let err = acceptor(d, "missing.pem", "missing.key").unwrap_err();
    assert!(err.contains("missing.pem"), "{err}");
}
