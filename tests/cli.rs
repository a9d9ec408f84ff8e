//! The `pgbastion` binary itself: the flag-only `run` form against a real
//! PostgreSQL, graceful shutdown on SIGTERM, and `check-config`.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flag_form_serves_and_sigterm_drains() {
    let env = Env::new();
    let port = pgbastion::localpg::free_port().unwrap();
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

    // An open session, then SIGTERM.
    let conn = format!(
        "host=localhost port={port} user=postgres password={} dbname=postgres sslmode=require channel_binding=disable",
        env.pg.password
    );
    let (client, task) = tokio_postgres::connect(&conn, tls_connector(&env.proxy_ca))
        .await
        .unwrap();
    tokio::spawn(task);
    signal(proc.0.id(), "-TERM");
    // New connections are refused once the listener closes...
    wait_for_async("the listener to close", Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    // ...while the open session keeps working.
    let v: i32 = client.query_one("select 5", &[]).await.unwrap().get(0);
    assert_eq!(v, 5);
    assert!(proc.0.try_wait().unwrap().is_none(), "still draining");
    // Once it ends, the process exits cleanly.
    drop(client);
    let status = wait_for("pgbastion to exit", Duration::from_secs(10), || {
        proc.0.try_wait().unwrap()
    });
    assert!(status.success(), "{status}");

    let events = std::fs::read_to_string(&audit).unwrap();
    assert_eq!(
        events
            .lines()
            .filter(|l| l.contains("\"session.end\""))
            .count(),
        2
    );
}

#[test]
fn drain_deadline_ends_lingering_sessions() {
    let env = Env::new();
    let port = pgbastion::localpg::free_port().unwrap();
    let config = env.dir.path().join("drain.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[[listener]]\nlisten = \"127.0.0.1:{port}\"\n{}\n[timeouts]\nshutdown_drain = \"1s\"\n[audit]\nlog = \"{}\"\n",
            env.tls_toml(),
            env.upstream_toml(),
            env.dir.path().join("a.jsonl").display()
        ),
    )
    .unwrap();
    let mut proc = Running(
        Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = wait_listening(port);
    // An idle psql session that would stay forever.
    let mut psql = Running(
        Command::new("psql")
            .args([
                "-X",
                "-d",
                &env.via_proxy(addr, "channel_binding=disable application_name=idle"),
            ])
            .env("PGPASSWORD", &env.pg.password)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the session to start", Duration::from_secs(10), || {
        std::fs::read_to_string(env.dir.path().join("a.jsonl"))
            .ok()
            .filter(|s| s.contains("session.start"))
    });
    signal(proc.0.id(), "-INT");
    let status = wait_for(
        "pgbastion to exit after the drain deadline",
        Duration::from_secs(10),
        || proc.0.try_wait().unwrap(),
    );
    assert!(status.success());
    // psql sees its connection close.
    let _ = psql.0.kill();
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
        std::fs::write(&p, text).unwrap();
        p
    };
    let out = Command::new(BIN)
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
            "scram-nopassword.toml",
            format!(
                "{good}auth = \"scram\"\nauth_user = \"pgbastion_auth\"\nauth_password_file = \"{}\"\n",
                write("empty-password", "\n").display()
            ),
            "is empty",
        ),
    ];
    for (name, text, expect) in cases {
        let out = Command::new(BIN)
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
    let out = Command::new(BIN)
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
    let out = Command::new(BIN)
        .args(["run", "--upstream", "db:5432", "--upstream-ca", "/x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("nothing to listen on"),
        "{}",
        stderr(&out)
    );
    let help = Command::new(BIN).args(["run", "--help"]).output().unwrap();
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
    assert_eq!(config.listeners.len(), 4);
    assert_eq!(config.policy.len(), 5);
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
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(
        readme.contains(pgbastion::auth::auth_query::LOOKUP_FUNCTION_SQL),
        "README.md must show LOOKUP_FUNCTION_SQL verbatim"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_does_not_end_the_process() {
    let env = Env::new();
    let port = pgbastion::localpg::free_port().unwrap();
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
