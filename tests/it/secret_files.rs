//! Secret files through the real binary: `auth_password_file`, like every
//! other secret file, is refused by `check-config` and `run` when group or
//! others may read it, with a message naming the file and the fix, and
//! never the secret; a file of more than one line is refused rather than
//! cut.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::common::*;

/// A config in scram mode whose lookup role's password is in `password`.
fn scram_config(certs: &ProxyCerts, password: &Path) -> String {
    let dir = certs.dir.path();
    format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:6432\"\n[[upstream]]\naddress = \"db.internal:5432\"\n\
         ca_file = \"{}\"\n{}\n[auth]\nmock_key_file = \"{}\"\n",
        certs.tls_toml(),
        certs.proxy_ca.display(),
        auth_query_keys(password),
        dir.join("mock_key").display()
    )
}

fn password_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

fn check_config(certs: &ProxyCerts, password: &Path) -> std::process::Output {
    let cfg = certs.dir.path().join("pgbastion.toml");
    write_private(&cfg, &scram_config(certs, password));
    bin()
        .arg("check-config")
        .arg("--config")
        .arg(&cfg)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

/// issue 20: `auth_password_file` with group or other bits is refused like
/// every other secret file.
#[test]
fn auth_password_file_others_can_read_is_refused() {
    let certs = ProxyCerts::new();
    let dir = certs.dir.path().to_owned();
    for mode in [0o644, 0o640, 0o604] {
        let pw = password_file(&dir, "auth-password", "hunter2\n", mode);
        let out = check_config(&certs, &pw);
        let err = stderr(&out);
        assert!(!out.status.success(), "mode {mode:04o} must be refused");
        assert!(
            err.contains(&format!(
                "auth_password_file {} can be read by others (mode {mode:04o})",
                pw.display()
            )),
            "{err}"
        );
        assert!(
            err.contains(&format!("chmod 600 {}", pw.display())),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "a secret is never shown: {err}");
    }
    // `run` refuses it too, before binding anything.
    let cfg = dir.join("pgbastion.toml");
    let out = bin()
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));

    let pw = password_file(&dir, "auth-password", "hunter2\n", 0o600);
    let out = check_config(&certs, &pw);
    assert!(
        out.status.success(),
        "mode 0600 is accepted: {}",
        stderr(&out)
    );
}

/// One rule for every password file: trailing line endings are not part
/// of the password; a second line is refused, not silently dropped.
#[test]
fn auth_password_file_is_one_line() {
    let certs = ProxyCerts::new();
    let dir = certs.dir.path().to_owned();
    let pw = password_file(&dir, "crlf", "hunter2\r\n", 0o600);
    assert!(check_config(&certs, &pw).status.success());
    let pw = password_file(&dir, "two-lines", "pgbastion_auth\nhunter2\n", 0o600);
    let out = check_config(&certs, &pw);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("holds more than one line"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}
