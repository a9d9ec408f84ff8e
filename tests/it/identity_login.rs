//! Passwordless login by identity (`login = "identity"`, issue 11): a
//! client known by its certificate or tailnet identity is asked for no
//! password, and pgbastion logs in to real PostgreSQL with a credential it
//! holds.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::common::*;
use pgbastion::auth::rds_iam::{auth_token, AwsCredentials, TokenTarget};
use pgbastion::dev::certs::Ca;
use pgbastion::dev::localpg::{LocalPg, LocalPgOptions};
use rcgen::{CertificateParams, DnType};

/// The token pgbastion makes equals boto3's `generate_db_auth_token` for
/// the same credentials, region, host, port, user and time.
#[test]
fn rds_iam_tokens_match_boto3() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/rds_token.py");
    let at = 1_700_000_000u64;
    for (user, session_token) in [
        ("app_ro", None),
        (
            "iam user@x",
            Some("FwoGZXIvYXdzEBYaDExampleSessionToken+/="),
        ),
    ] {
        let creds = AwsCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: session_token.map(str::to_owned),
        };
        let target = TokenTarget {
            host: "mydb.cluster-abc.eu-west-1.rds.amazonaws.com",
            port: 5432,
            user,
            region: "eu-west-1",
        };
        let ours = auth_token(
            &target,
            &creds,
            SystemTime::UNIX_EPOCH + Duration::from_secs(at),
        )
        .unwrap();
        let mut cmd = std::process::Command::new("python3");
        cmd.arg(script)
            .args([target.host, "5432", user, target.region, &at.to_string()])
            .args([&creds.access_key_id, &creds.secret_access_key]);
        if let Some(t) = session_token {
            cmd.arg(t);
        }
        let out = cmd.output().expect("python3");
        assert!(
            out.status.success(),
            "rds_token.py failed (the test command installs boto3): {}",
            stderr(&out)
        );
        assert_eq!(ours, stdout(&out), "user {user:?}");
    }
}

/// Writes a secret file with mode 0600.
fn secret_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

const RW_PASSWORD: &str = "rw-secret-7Hq";
const SK_PASSWORD: &str = "sk-secret-2Zp";

/// People with client certificates log in with no password as the roles
/// the policy grants, through every kind of credential pgbastion holds
/// (a password file, a SCRAM secret, a role certificate for the server's
/// `cert` method), and every failure says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_with_certificates_log_in_with_no_password() {
    let roles_ca = Ca::new("database roles CA").unwrap();
    let pg = LocalPg::start(LocalPgOptions {
        client_ca_pem: Some(roles_ca.cert_pem()),
        cert_users: vec!["app_cert".into()],
        extra_hba: vec!["hostssl all app_md5 127.0.0.1/32 md5".into()],
        ..LocalPgOptions::default()
    })
    .unwrap();
    let env = Env {
        pg,
        certs: ProxyCerts::new(),
    };
    let dir = env.dir.path();
    let sk = pgbastion::auth::credentials::scram_secret_for(SK_PASSWORD.as_bytes(), 4096);
    let sk_verifier = sk.lines().next().unwrap().to_owned();
    env.pg
        .run_sql(&format!(
            "CREATE ROLE app_rw LOGIN PASSWORD '{RW_PASSWORD}';\n\
             CREATE ROLE app_sk LOGIN PASSWORD '{sk_verifier}';\n\
             CREATE ROLE app_cert LOGIN;\n\
             SET password_encryption = 'md5';\n\
             CREATE ROLE app_md5 LOGIN PASSWORD '{RW_PASSWORD}';\n\
             RESET password_encryption;\n\
             CREATE ROLE app_none LOGIN PASSWORD 'x';\n\
             CREATE ROLE app_stale LOGIN PASSWORD 'the-real-one';"
        ))
        .unwrap();
    let rw = secret_file(dir, "app_rw.password", &format!("{RW_PASSWORD}\n"));
    let stale = secret_file(dir, "app_stale.password", "an-old-password\n");
    let sk_file = secret_file(dir, "app_sk.scram", &sk);
    let mut role = CertificateParams::default();
    role.distinguished_name.push(DnType::CommonName, "app_cert");
    let (role_cert, role_key) = roles_ca
        .issue(role)
        .unwrap()
        .write(dir, "app_cert")
        .unwrap();

    let people = Ca::new("people CA").unwrap();
    let people_ca = people.write_cert(dir, "people-ca").unwrap();
    let alice = person(&people, dir, "alice");
    let bob = person(&people, dir, "bob");
    let proxy = Proxy::start_toml(&format!(
        r#"{tls}
[[listener]]
name = "mtls"
listen = "127.0.0.1:0"
identity = "client_cert"
client_ca = "{people_ca}"
cert_identity = ["email", "cn"]
{upstream}
[[rule]]
name = "alice-apps"
names = ["alice@example.com"]
users = ["app_*"]
login = "identity"
[[credential]]
user = "app_rw"
password_file = "{rw}"
[[credential]]
user = "app_md5"
password_file = "{rw}"
[[credential]]
user = "app_sk"
scram_secret = "{sk}"
[[credential]]
user = "app_cert"
client_cert = "{role_cert}"
client_key = "{role_key}"
[[credential]]
user = "app_stale"
password_file = "{stale}"
"#,
        tls = env.tls_toml(),
        people_ca = people_ca.display(),
        upstream = env.upstream_toml(),
        rw = rw.display(),
        sk = sk_file.display(),
        role_cert = role_cert.display(),
        role_key = role_key.display(),
        stale = stale.display(),
    ));
    let conn = |who: &(PathBuf, PathBuf), user: &str, extra: &str| {
        format!(
            "host=localhost port={} dbname=postgres user={user} sslmode=verify-full sslrootcert={} sslcert={} sslkey={} {extra}",
            proxy.addr().port(),
            env.proxy_ca.display(),
            who.0.display(),
            who.1.display()
        )
    };
    let who_am_i = "select usename || ' ' || ssl from pg_stat_activity join pg_stat_ssl using (pid) where pid = pg_backend_pid()";
    for (user, kind) in [
        ("app_rw", "password"),
        ("app_md5", "password"),
        ("app_sk", "scram_secret"),
        ("app_cert", "client_cert"),
    ] {
        let out = psql_without_password(&conn(&alice, user, ""), who_am_i);
        assert!(out.status.success(), "alice as {user}: {}", stderr(&out));
        assert_eq!(
            stdout(&out),
            format!("{user} true"),
            "the server sees the role, over TLS"
        );
        let start = proxy.wait_audit(user, |e| {
            e["event"] == "session.start" && e["requested"]["user"] == user
        });
        assert_eq!(start["identity"]["name"], "alice@example.com", "{start}");
        assert_eq!(start["auth"]["mode"], "identity", "{start}");
        assert_eq!(start["auth"]["credential"], kind, "{start}");
        assert_eq!(start["rule"], "alice-apps");
    }
    // The server leg of a password credential is SCRAM, bound to the
    // server's certificate.
    let start = proxy.wait_audit("rw", |e| {
        e["event"] == "session.start" && e["requested"]["user"] == "app_rw"
    });
    assert_eq!(start["auth"]["server"]["mechanism"], "SCRAM-SHA-256-PLUS");
    assert_eq!(start["auth"]["server"]["channel_binding"], true);
    // A role the server still keeps an MD5 password for.
    let start = proxy.wait_audit("md5", |e| {
        e["event"] == "session.start" && e["requested"]["user"] == "app_md5"
    });
    assert_eq!(start["auth"]["server"]["mechanism"], "md5");

    // Failures, each saying why, each audited.
    let refused = |who: &(PathBuf, PathBuf), user: &str, extra: &str| {
        let out = psql_without_password(&conn(who, user, extra), "select 1");
        assert!(!out.status.success(), "{user} must be refused");
        stderr(&out)
    };
    let e = refused(&alice, "app_none", "");
    assert!(e.contains("holds no credential for that user"), "{e}");
    let e = refused(&alice, "app_stale", "");
    assert!(
        e.contains(
            "the database server refused pgbastion's password credential for user \"app_stale\""
        ),
        "{e}"
    );
    let e = refused(&bob, "app_rw", "");
    assert!(
        e.contains("policy does not allow certificate \"bob@example.com\""),
        "{e}"
    );
    // A client that insists on channel binding hangs up on a login
    // without a SCRAM exchange; the session's end says why.
    let e = refused(&alice, "app_rw", "channel_binding=require");
    assert!(e.contains("channel binding required"), "{e}");
    proxy.wait_audit("binding refusal explained", |e| {
        e["event"] == "session.end"
            && e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("channel_binding=require"))
    });
    for (reason, user) in [
        ("no_credential", "app_none"),
        ("credential_refused", "app_stale"),
    ] {
        let ev = proxy.wait_audit(reason, |e| e["reason"] == reason);
        assert_eq!(ev["requested"]["user"], user, "{ev}");
        assert_eq!(ev["auth"]["mode"], "identity", "{ev}");
        assert_eq!(ev["sqlstate"], "28000", "{ev}");
    }

    // No secret in the audit log.
    let audit = std::fs::read_to_string(&proxy.audit_log).unwrap();
    for secret in [
        RW_PASSWORD,
        SK_PASSWORD,
        "an-old-password",
        sk.lines().nth(1).unwrap(),
    ] {
        assert!(
            !audit.contains(secret),
            "{secret} leaked into the audit log"
        );
    }
}

/// A secret file others can read stops pgbastion at start (and
/// check-config) with the fix, never with the secret.
#[test]
fn a_secret_file_others_can_read_is_refused_at_start() {
    let certs = ProxyCerts::new();
    let dir = certs.dir.path();
    let pw = dir.join("app.password");
    std::fs::write(&pw, "hunter2-do-not-print\n").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = dir.join("pgbastion.toml");
    std::fs::write(
        &cfg,
        format!(
            "{tls}\n[[listener]]\nname = \"mtls\"\nlisten = \"127.0.0.1:0\"\nidentity = \"client_cert\"\nclient_ca = \"{ca}\"\n\
             [[upstream]]\naddress = \"localhost:5432\"\nca_file = \"{ca}\"\n\
             [[rule]]\nlisteners = [\"mtls\"]\nlogin = \"identity\"\n\
             [[credential]]\nuser = \"app\"\npassword_file = \"{pw}\"\n",
            tls = certs.tls_toml(),
            ca = certs.proxy_ca.display(),
            pw = pw.display()
        ),
    )
    .unwrap();
    for args in [&["check-config", "--config"][..], &["run", "--config"][..]] {
        let out = bin()
            .args(args)
            .arg(&cfg)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} must fail");
        let err = stderr(&out);
        assert!(
            err.contains("can be read by others (mode 0644)") && err.contains("chmod 600"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("hunter2"), "{args:?}: {err}");
    }
}

/// The real binary, logging at debug level: a password from the
/// environment works, a credential file fixed on disk takes effect on
/// SIGHUP, and no secret reaches the log or the audit log.
#[test]
fn credentials_reload_on_sighup_and_never_reach_the_logs() {
    let env = Env::new();
    let dir = env.dir.path().to_owned();
    env.pg
        .run_sql(&format!(
            "CREATE ROLE app_env LOGIN PASSWORD 'env-secret-9Kd';\n\
             CREATE ROLE app_file LOGIN PASSWORD '{RW_PASSWORD}';"
        ))
        .unwrap();
    let file = secret_file(&dir, "app_file.password", "not-yet-right-4Tc\n");
    let people = Ca::new("people CA").unwrap();
    let people_ca = people.write_cert(&dir, "people-ca").unwrap();
    let alice = person(&people, &dir, "alice");
    let port = pgbastion::dev::localpg::free_port().unwrap();
    let audit = dir.join("audit.jsonl");
    let log = dir.join("pgbastion.log");
    let cfg = dir.join("pgbastion.toml");
    std::fs::write(
        &cfg,
        format!(
            "{tls}\n[[listener]]\nname = \"mtls\"\nlisten = \"127.0.0.1:{port}\"\nidentity = \"client_cert\"\n\
             client_ca = \"{ca}\"\ncert_identity = [\"email\"]\n{upstream}\n\
             [[rule]]\nlisteners = [\"mtls\"]\nlogin = \"identity\"\n\
             [[credential]]\nuser = \"app_env\"\npassword_env = \"APP_ENV_PASSWORD\"\n\
             [[credential]]\nuser = \"app_file\"\npassword_file = \"{file}\"\n\
             [audit]\nlog = \"{audit}\"\n",
            tls = env.tls_toml(),
            ca = people_ca.display(),
            upstream = env.upstream_toml(),
            file = file.display(),
            audit = audit.display()
        ),
    )
    .unwrap();
    let proc = Running(
        config_form(&cfg, Some(&log))
            .env("APP_ENV_PASSWORD", "env-secret-9Kd")
            .env("RUST_LOG", "debug")
            .spawn()
            .unwrap(),
    );
    wait_listening(port);
    let conn = |user: &str| {
        format!(
            "host=localhost port={port} dbname=postgres user={user} sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
            env.proxy_ca.display(),
            alice.0.display(),
            alice.1.display()
        )
    };
    let out = psql_without_password(&conn("app_env"), "select current_user");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "app_env");
    let out = psql_without_password(&conn("app_file"), "select 1");
    assert!(
        stderr(&out).contains("refused pgbastion's password credential"),
        "{}",
        stderr(&out)
    );
    // The administrator fixes the file and sends SIGHUP.
    std::fs::write(&file, format!("{RW_PASSWORD}\n")).unwrap();
    signal(proc.0.id(), "-HUP");
    wait_log(&log, "policy and credentials reloaded");
    let out = psql_without_password(&conn("app_file"), "select current_user");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "app_file");

    // A reload that would break a credential changes nothing.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    signal(proc.0.id(), "-HUP");
    wait_for("the refused reload", Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|l| l.contains("reload refused") && l.contains("mode 0644"))
    });
    let out = psql_without_password(&conn("app_file"), "select current_user");
    assert!(out.status.success(), "{}", stderr(&out));

    drop(proc);
    let text = std::fs::read_to_string(&log).unwrap() + &std::fs::read_to_string(&audit).unwrap();
    assert!(text.contains("app_file"), "the logs are there");
    for secret in ["env-secret-9Kd", RW_PASSWORD, "not-yet-right-4Tc"] {
        assert!(!text.contains(secret), "{secret} leaked into the logs");
    }
}

/// A stand-in STS over TLS: answers AssumeRoleWithWebIdentity with
/// `status` and `body`, recording each request line.
async fn fake_sts(
    ca: &Ca,
    status: &'static str,
    body: &'static str,
) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tls = std::sync::Arc::new(tls_server_config(&ca.server_cert(&["localhost"]).unwrap()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut s) = tokio_rustls::TlsAcceptor::from(tls.clone())
                .accept(tcp)
                .await
            else {
                continue;
            };
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&req).into_owned();
            record
                .lock()
                .unwrap()
                .push(text.lines().next().unwrap_or("").to_owned());
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        }
    });
    (port, seen)
}

/// AWS credentials from a web identity token (EKS IRSA and the like): the
/// token is exchanged with STS over verified TLS, and a refusal says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_identity_credentials_come_from_sts() {
    use pgbastion::auth::aws_sts::WebIdentity;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("STS stand-in CA").unwrap();
    let ca_file = ca.write_cert(dir.path(), "sts-ca").unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "eyJ.web-identity.sig\n").unwrap();
    let answer =
        "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials>\
        <AccessKeyId>ASIASTUB</AccessKeyId><SecretAccessKey>stub-secret</SecretAccessKey>\
        <SessionToken>stub-session</SessionToken><Expiration>2030-01-01T00:00:00Z</Expiration>\
        </Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>";
    let (port, seen) = fake_sts(&ca, "200 OK", answer).await;
    let web = |port: u16, ca_bundle: Option<PathBuf>| WebIdentity {
        token_file: token_file.clone(),
        role_arn: "arn:aws:iam::123456789012:role/pgbastion".into(),
        session_name: "pgbastion".into(),
        endpoint: format!("localhost:{port}"),
        ca_bundle,
    };
    let (creds, expires) = web(port, Some(ca_file.clone())).assume().await.unwrap();
    assert_eq!(creds.access_key_id, "ASIASTUB");
    assert_eq!(creds.session_token.as_deref(), Some("stub-session"));
    assert_eq!(
        expires,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_456_000)
    );
    let line = seen.lock().unwrap()[0].clone();
    for part in [
        "GET /?Action=AssumeRoleWithWebIdentity&",
        "RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fpgbastion",
        "WebIdentityToken=eyJ.web-identity.sig",
    ] {
        assert!(line.contains(part), "{part} in {line}");
    }
    // The endpoint is verified: without its CA, no credentials.
    let err = web(port, None).assume().await.unwrap_err().to_string();
    assert!(err.contains("TLS"), "{err}");
    // STS says no: its message reaches the error.
    let (port, _) = fake_sts(
        &ca,
        "403 Forbidden",
        "<ErrorResponse><Error><Code>AccessDenied</Code><Message>Not authorized to perform sts:AssumeRoleWithWebIdentity</Message></Error></ErrorResponse>",
    )
    .await;
    let err = web(port, Some(ca_file))
        .assume()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("Not authorized to perform"), "{err}");
}
