//! The `pgbastion` binary itself: the flag-only `run` form against a real
//! PostgreSQL, graceful shutdown on SIGTERM, and `check-config`.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flag_form_serves_and_sigterm_drains() {
    let env = Env::new();
    let port = pgbastion::dev::localpg::free_port().unwrap();
    let audit = env.dir.path().join("audit.jsonl");
    let mut proc = Running(
        flag_form(&env, port, &[])
            .arg("--audit-log")
            .arg(&audit)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = wait_listening(port);

    let conninfo = env.via_proxy(addr, "channel_binding=disable");
    let out = env.psql(&conninfo, "select 'flags work'");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "flags work");

    // An idle session and a busy one, then SIGTERM.
    let conn = |app: &str| {
        format!(
            "host=localhost port={port} user=postgres password={} dbname=postgres sslmode=require channel_binding=disable application_name={app}",
            env.pg.password
        )
    };
    let (idle, idle_task) = tokio_postgres::connect(&conn("idle"), tls_connector(&env.proxy_ca))
        .await
        .unwrap();
    let idle_task = tokio::spawn(idle_task);
    idle.simple_query("select 1").await.unwrap();
    let (busy, busy_task) = tokio_postgres::connect(&conn("busy"), tls_connector(&env.proxy_ca))
        .await
        .unwrap();
    tokio::spawn(busy_task);
    let busy_query = tokio::spawn(async move {
        let row = busy.query_one("select 5 from pg_sleep(1.5)", &[]).await;
        (busy, row)
    });
    let direct = env.direct_client().await;
    wait_active(&direct, "busy").await;
    signal(proc.0.id(), "-TERM");
    // New connections are refused once the listener closes...
    wait_for_async("the listener to close", Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    // ...the idle session is ended at once, told why...
    let idle_end = tokio::time::timeout(Duration::from_secs(5), idle_task)
        .await
        .expect("the idle session ends at once")
        .unwrap();
    let e = idle_end.expect_err("ended by pgbastion");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e}");
    assert!(
        proc.0.try_wait().unwrap().is_none(),
        "still draining the busy one"
    );
    // ...and the busy one finishes its transaction first.
    let (busy, row) = busy_query.await.unwrap();
    let v: i32 = row.expect("the busy query completes").get(0);
    assert_eq!(v, 5);
    drop(busy);
    let status = wait_for("pgbastion to exit", Duration::from_secs(10), || {
        proc.0.try_wait().unwrap()
    });
    assert!(status.success(), "{status}");

    let events: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["event"] == "session.end")
        .collect();
    assert_eq!(events.len(), 3, "psql's, and the two sessions'");
    for app in ["idle", "busy"] {
        let end = events
            .iter()
            .find(|e| e["requested"]["application_name"] == app)
            .unwrap_or_else(|| panic!("no end event for {app}"));
        assert_eq!(end["end_reason"], "shutdown", "{end}");
    }
}

/// pgbastion from a config file with a given drain, and a psql session
/// busy with `pg_sleep(30)` through it.
fn busy_session_and_pgbastion(
    env: &Env,
    drain: &str,
) -> (
    Running,
    Running,
    std::path::PathBuf,
    std::path::PathBuf,
    std::net::SocketAddr,
) {
    let port = pgbastion::dev::localpg::free_port().unwrap();
    let config = env.dir.path().join("drain.toml");
    let audit = env.dir.path().join("a.jsonl");
    std::fs::write(
        &config,
        format!(
            "{}\n[[listener]]\nlisten = \"127.0.0.1:{port}\"\n{}\n[timeouts]\nshutdown_drain = \"{drain}\"\n[audit]\nlog = \"{}\"\n",
            env.tls_toml(),
            env.upstream_toml(),
            audit.display()
        ),
    )
    .unwrap();
    let proc = Running(
        bin()
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = wait_listening(port);
    let psql_err = env.dir.path().join("psql.err");
    let psql = Running(
        Command::new("psql")
            .args([
                "-X",
                "-d",
                &env.via_proxy(addr, "channel_binding=disable application_name=busy"),
                "-c",
                "select pg_sleep(30)",
            ])
            .env("PGPASSWORD", &env.pg.password)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&psql_err).unwrap())
            .spawn()
            .unwrap(),
    );
    (proc, psql, audit, psql_err, addr)
}

fn assert_ended_by_shutdown(audit: &std::path::Path, psql_err: &std::path::Path) {
    let end = std::fs::read_to_string(audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["event"] == "session.end")
        .expect("an end event");
    assert_eq!(end["end_reason"], "shutdown", "{end}");
    let told = wait_for("psql to report", Duration::from_secs(10), || {
        std::fs::read_to_string(psql_err)
            .ok()
            .filter(|t| t.contains("pgbastion is shutting down"))
    });
    assert!(told.contains("FATAL"), "{told}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_ends_busy_sessions_with_an_error() {
    let env = Env::new();
    let (mut proc, _psql, audit, psql_err, _) = busy_session_and_pgbastion(&env, "1s");
    let direct = env.direct_client().await;
    wait_active(&direct, "busy").await;
    signal(proc.0.id(), "-INT");
    let status = wait_for(
        "pgbastion to exit after the drain deadline",
        Duration::from_secs(10),
        || proc.0.try_wait().unwrap(),
    );
    assert!(status.success());
    assert_ended_by_shutdown(&audit, &psql_err);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_everything_at_once() {
    let env = Env::new();
    let (mut proc, _psql, audit, psql_err, addr) = busy_session_and_pgbastion(&env, "60s");
    let direct = env.direct_client().await;
    wait_active(&direct, "busy").await;
    signal(proc.0.id(), "-TERM");
    // Draining: the busy session may run for up to a minute...
    wait_for("the listener to close", Duration::from_secs(10), || {
        std::net::TcpStream::connect(addr).err().map(|_| ())
    });
    assert!(proc.0.try_wait().unwrap().is_none());
    // ...unless told again.
    signal(proc.0.id(), "-TERM");
    let status = wait_for("pgbastion to exit at once", Duration::from_secs(8), || {
        proc.0.try_wait().unwrap()
    });
    assert!(status.success());
    assert_ended_by_shutdown(&audit, &psql_err);
}

#[test]
fn check_config_explains_mistakes() {
    let certs = ProxyCerts::new();
    let dir = certs.dir.path();
    let good = format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:6432\"\n[[upstream]]\naddress = \"db.internal:5432\"\nca_file = \"{}\"\n",
        certs.tls_toml(),
        certs.proxy_ca.display()
    );
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        write_private(&p, text);
        p
    };
    let out = bin()
        .arg("check-config")
        .arg("--config")
        .arg(write("good.toml", &good))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("OK"));
    assert!(stdout(&out).contains("\"db.internal\""), "{}", stdout(&out));

    let cases = [
        (
            "typo.toml",
            good.replace("ca_file", "cafile"),
            "unknown field `cafile`",
        ),
        (
            "nofile.toml",
            good.replace(&certs.proxy_ca.display().to_string(), "/nonexistent/ca.pem"),
            "/nonexistent/ca.pem",
        ),
        (
            "noroots.toml",
            good.replace(&format!("ca_file = \"{}\"", certs.proxy_ca.display()), ""),
            "no trusted roots",
        ),
        (
            "badlisten.toml",
            good.replace("127.0.0.1:6432", "localhost"),
            "is not IP:PORT",
        ),
        (
            "badkey.toml",
            good.replace(
                &certs.proxy_key.display().to_string(),
                &certs.proxy_ca.display().to_string(),
            ),
            "TLS key",
        ),
        (
            "scram-nosource.toml",
            format!("{good}auth = \"scram\"\n"),
            "needs a source of SCRAM verifiers",
        ),
        (
            "scram-nofile.toml",
            format!("{good}auth = \"scram\"\nsecrets_file = \"/nonexistent/userlist.txt\"\n"),
            "cannot read secrets file /nonexistent/userlist.txt",
        ),
        (
            "scram-badfile.toml",
            format!(
                "{good}auth = \"scram\"\nsecrets_file = \"{}\"\n",
                write("userlist.txt", "; ok\n\"alice\" hunter2\n").display()
            ),
            "line 2: expected \"user\" \"SCRAM-SHA-256$...\"",
        ),
        (
            // issue 19 item 24: a secrets file others may read.
            "scram-public.toml",
            format!("{good}auth = \"scram\"\nsecrets_file = \"{}\"\n", {
                use std::os::unix::fs::PermissionsExt;
                let p = write("public-userlist.txt", "");
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
                p.display().to_string()
            }),
            "can be read by others (mode 0644)",
        ),
        (
            "scram-nopassword.toml",
            format!(
                "{good}auth = \"scram\"\nauth_user = \"pgbastion_auth\"\nauth_password_file = \"{}\"\n",
                write("empty-password", "\n").display()
            ),
            "is empty",
        ),
    ];
    for (name, text, expect) in cases {
        let out = bin()
            .arg("check-config")
            .arg("--config")
            .arg(write(name, &text))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{name} must be refused");
        assert!(stderr(&out).contains(expect), "{name}: {}", stderr(&out));
        assert!(!stderr(&out).contains("hunter2"), "a secret is never shown");
    }

    // A good scram config says where verifiers come from.
    let scram = format!(
        "{good}auth = \"scram\"\nsecrets_file = \"{}\"\n",
        write("users.txt", "").display()
    );
    let out = bin()
        .arg("check-config")
        .arg("--config")
        .arg(write("scram.toml", &scram))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("auth: scram"), "{}", stdout(&out));
}

#[test]
fn run_without_anything_to_do_says_so() {
    let out = bin()
        .args(["run", "--upstream", "db:5432", "--upstream-ca", "/x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("nothing to listen on"),
        "{}",
        stderr(&out)
    );
    let help = bin().args(["run", "--help"]).output().unwrap();
    let help = stdout(&help);
    for flag in [
        "--upstream-ca",
        "--upstream-server-name",
        "--client-tls",
        "--audit-log",
        "--config",
    ] {
        assert!(help.contains(flag), "run --help documents {flag}");
    }
}

#[test]
fn example_config_is_valid_toml_for_pgbastion() {
    // Every key in the annotated example must be one pgbastion knows; the
    // files it names do not exist here, so only parsing is checked.
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/pgbastion.toml"
    ))
    .unwrap();
    let config = pgbastion::config::Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.listeners.len(), 5);
    assert_eq!(config.policy.len(), 7);
    assert_eq!(config.credentials.len(), 2);
    assert!(config.admin.is_some());
    assert_eq!(
        config.upstreams[0].server_name,
        "mydb.abc123.eu-west-1.rds.amazonaws.com"
    );
    assert_eq!(
        config.upstreams[0].auth_mode(),
        pgbastion::config::AuthMode::Scram
    );
}

#[test]
fn readme_shows_the_lookup_function_pgbastion_installs() {
    let readme = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/authentication.md"
    ))
    .unwrap();
    assert!(
        readme.contains(pgbastion::auth::auth_query::LOOKUP_FUNCTION_SQL),
        "docs/authentication.md must show LOOKUP_FUNCTION_SQL verbatim"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_does_not_end_the_process() {
    let env = Env::new();
    let port = pgbastion::dev::localpg::free_port().unwrap();
    let log = env.dir.path().join("stderr.log");
    // A tiny descriptor limit, so accept() fails with EMFILE.
    let mut proc = Running(
        flag_form(&env, port, &["prlimit", "--nofile=32:32", "--"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let addr = wait_listening(port);
    // Idle connections until the descriptor table is full.
    let mut idle = Vec::new();
    for _ in 0..60 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    wait_for(
        "an accept error in the log",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|l| l.contains("accept failed"))
        },
    );
    assert!(
        proc.0.try_wait().unwrap().is_none(),
        "the process survives EMFILE"
    );
    drop(idle);
    // Once descriptors are free again, it serves as before.
    let conninfo = env.via_proxy(addr, "channel_binding=disable");
    let out = wait_for("a query to succeed again", Duration::from_secs(15), || {
        let out = env.psql(&conninfo, "select 'recovered'");
        out.status.success().then_some(out)
    });
    assert_eq!(stdout(&out), "recovered");
    assert!(proc.0.try_wait().unwrap().is_none());
}

/// The README's first command: `pgbastion demo` starts, prints psql lines
/// that work as printed (with a password, and with none at all through
/// identity login), and Ctrl-C (SIGINT) removes everything.
#[test]
fn the_demo_prints_psql_lines_that_work() {
    use std::io::BufRead;
    let mut demo = Running(
        bin()
            .args(["demo", "--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = demo.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    let mut text = String::new();
    while !text.contains("Directly to PostgreSQL") {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the demo did not print its instructions: {text}"));
        text.push_str(&line);
        text.push('\n');
    }
    let password = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("export PGPASSWORD='"))
        .and_then(|p| p.strip_suffix('\''))
        .expect("the demo prints the password")
        .to_owned();
    let psql_lines: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("psql \""))
        .map(|l| l.trim_end_matches('"').to_owned())
        .collect();
    assert!(psql_lines.len() >= 4, "{text}");
    let dir = psql_lines
        .iter()
        .find_map(|l| l.strip_prefix("host=/"))
        .and_then(|l| l.split(' ').next())
        .map(|d| std::path::PathBuf::from(format!("/{d}")))
        .expect("the Unix socket line names the demo's directory");
    for conninfo in &psql_lines {
        let identity = conninfo.contains("sslcert=");
        let mut cmd = Command::new("psql");
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-w",
            "-d",
            conninfo,
            "-c",
            "select current_user",
        ])
        .env("PGPASSFILE", "/dev/null");
        if identity {
            cmd.env_remove("PGPASSWORD");
        } else {
            cmd.env("PGPASSWORD", &password);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{conninfo}: {}", stderr(&out));
        let user = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(
            user,
            if identity { "demo_app" } else { "postgres" },
            "{conninfo}"
        );
    }
    signal(demo.0.id(), "-INT");
    let status = wait_for("the demo to stop", Duration::from_secs(20), || {
        demo.0.try_wait().unwrap()
    });
    assert!(status.success(), "{status}");
    assert!(!dir.exists(), "{} is removed", dir.display());
}

/// The container form: every run flag from the environment, and
/// `--version`.
#[test]
fn run_flags_come_from_the_environment_and_version_prints() {
    let env = Env::new();
    let port = pgbastion::dev::localpg::free_port().unwrap();
    let _proc = Running(
        bin()
            .arg("run")
            .env("PGBASTION_LISTEN", format!("127.0.0.1:{port}"))
            .env("PGBASTION_TLS_CERT", &env.proxy_cert)
            .env("PGBASTION_TLS_KEY", &env.proxy_key)
            .env("PGBASTION_UPSTREAM", format!("localhost:{}", env.pg.port))
            .env("PGBASTION_UPSTREAM_CA", &env.pg.ca_cert)
            .env("PGBASTION_AUDIT_LOG", env.dir.path().join("audit.jsonl"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = wait_listening(port);
    let out = env.psql(
        &env.via_proxy(addr, "channel_binding=disable"),
        "select 'from the environment'",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "from the environment");
    let out = bin().arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("pgbastion {}", env!("CARGO_PKG_VERSION"))
    );
}

/// examples/pgbastion.service: reload by SIGHUP, sandboxed, and valid for
/// `systemd-analyze verify` where systemd is installed (no warnings).
#[test]
fn the_systemd_unit_is_valid_and_sandboxed() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/pgbastion.service"
    ))
    .unwrap();
    for line in [
        "Type=exec",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
        "SystemCallFilter=@system-service",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} in the unit");
    }
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze is not installed: the unit's syntax is not verified here");
        return;
    };
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("pgbastion.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/pgbastion", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "", "no warnings");
}

/// Issue 20: a missing certificate is said once, and RUST_BACKTRACE (meant
/// for panics) never adds a stack backtrace; `--backtrace` does.
#[test]
fn check_config_says_each_cause_once_without_a_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("missing-cert.toml");
    std::fs::write(
        &config,
        "[tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n\
         [[listener]]\nname = \"public\"\nlisten = \"127.0.0.1:6432\"\n\
         [[upstream]]\naddress = \"db.internal:5432\"\nsystem_roots = true\n",
    )
    .unwrap();
    let check = |env: &[(&str, &str)], flag: bool| {
        let mut cmd = bin();
        cmd.env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .envs(env.iter().copied());
        if flag {
            cmd.arg("--backtrace");
        }
        let out = cmd
            .arg("check-config")
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(!out.status.success());
        stderr(&out)
    };
    for env in [
        &[][..],
        &[("RUST_BACKTRACE", "1")][..],
        &[("RUST_BACKTRACE", "full")][..],
    ] {
        let err = check(env, false);
        assert_eq!(
            err.matches("cannot read TLS certificate /nonexistent/cert.pem")
                .count(),
            1,
            "{env:?}: {err}"
        );
        assert!(!err.contains("backtrace"), "{env:?}: {err}");
        assert!(err.lines().count() <= 3, "{env:?}: {err}");
    }
    let err = check(&[], true);
    assert!(err.contains("Stack backtrace:"), "{err}");
    let err = check(&[("RUST_LIB_BACKTRACE", "1")], false);
    assert!(err.contains("Stack backtrace:"), "{err}");
}
