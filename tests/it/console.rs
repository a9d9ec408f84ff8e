//! The admin console (issue 12): psql to database `pgbastion` as an
//! identity a rule marks `admin = true`.

use std::path::PathBuf;
use std::time::Duration;

use crate::common::*;
use pgbastion::dev::certs::Ca;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_list_and_kill_sessions_and_reload() {
    admins_list_and_kill_sessions_and_reload_on(&[]).await;
}

/// Per-core (issue 24): the console runs in a session on a core, and what
/// its RELOAD starts (here a new listener's accept loop) lives on the
/// process runtime, so it serves as on the shared runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_list_and_kill_sessions_and_reload_per_core() {
    admins_list_and_kill_sessions_and_reload_on(&PER_CORE).await;
}

async fn admins_list_and_kill_sessions_and_reload_on(runtime: &[&str]) {
    let env = Env::new();
    let dir = env.dir.path().to_owned();
    let people = Ca::new("people CA").unwrap();
    let people_ca = people.write_cert(&dir, "people-ca").unwrap();
    let alice = person(&people, &dir, "alice");
    let bob = person(&people, &dir, "bob");
    let (tcp, mtls, late) = (
        pgbastion::dev::localpg::free_port().unwrap(),
        pgbastion::dev::localpg::free_port().unwrap(),
        pgbastion::dev::localpg::free_port().unwrap(),
    );
    let audit = dir.join("audit.jsonl");
    let cfg = dir.join("pgbastion.toml");
    // `with_late` adds a listener, which a RELOAD starts.
    let write_config = |admins: &str, with_late: bool| {
        let added = match with_late {
            true => format!("[[listener]]\nname = \"late\"\nlisten = \"127.0.0.1:{late}\"\n"),
            false => String::new(),
        };
        std::fs::write(
            &cfg,
            format!(
                "{tls}\n{added}[[listener]]\nname = \"tcp\"\nlisten = \"127.0.0.1:{tcp}\"\n\
                 [[listener]]\nname = \"mtls\"\nlisten = \"127.0.0.1:{mtls}\"\nidentity = \"client_cert\"\n\
                 client_ca = \"{ca}\"\ncert_identity = [\"email\"]\n{upstream}\n\
                 [[rule]]\nname = \"admins\"\nlisteners = [\"mtls\"]\nnames = [{admins}]\nadmin = true\n\
                 [[rule]]\nname = \"others\"\n[audit]\nlog = \"{audit}\"\n",
                tls = env.tls_toml(),
                ca = people_ca.display(),
                upstream = env.upstream_toml(),
                audit = audit.display()
            ),
        )
        .unwrap()
    };
    write_config("\"alice@example.com\"", false);
    let _proc = Running(config_form(&cfg, None).args(runtime).spawn().unwrap());
    wait_listening(tcp);
    wait_listening(mtls);
    let console = |who: &(PathBuf, PathBuf), sql: &str| {
        psql_without_password(
            &format!(
                "host=localhost port={mtls} dbname=pgbastion user=admin sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
                env.proxy_ca.display(),
                who.0.display(),
                who.1.display()
            ),
            sql,
        )
    };
    let events = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };

    // A session to look at, through the plain listener.
    let conninfo = format!(
        "host=localhost port={tcp} user=postgres dbname=postgres password={} sslmode=require channel_binding=disable",
        env.pg.password
    );
    let (victim, conn) = tokio_postgres::connect(&conninfo, tls_connector(&env.proxy_ca))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    victim.simple_query("select 1").await.unwrap();
    let id = wait_for("the session's start", Duration::from_secs(10), || {
        events()
            .iter()
            .find(|e| e["event"] == "session.start")
            .and_then(|e| e["session_id"].as_str().map(str::to_owned))
    });

    let out = tokio::task::block_in_place(|| console(&alice, "SHOW SESSIONS"));
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = stdout(&out);
    let row: Vec<&str> = listed
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{id} in {listed}"))
        .split('|')
        .collect();
    assert_eq!(
        &row[3..9],
        ["postgres", "postgres", "pg", "true", "true", "idle"],
        "{listed}"
    );
    let bytes_out: u64 = row[11].parse().unwrap();
    assert!(bytes_out > 0, "bytes the session received so far: {listed}");
    for (cmd, needle) in [
        ("SHOW VERSION", "pgbastion "),
        ("SHOW UPSTREAMS", "pg|localhost:"),
        ("SHOW LISTENERS", "mtls|client_cert|require|pg"),
        ("SHOW CERTIFICATES", "client_ca:mtls|"),
        ("SHOW STATS", "sessions_active|1"),
    ] {
        let out = tokio::task::block_in_place(|| console(&alice, cmd));
        assert!(stdout(&out).contains(needle), "{cmd}: {}", stdout(&out));
    }
    let out = tokio::task::block_in_place(|| console(&alice, "DROP TABLE x"));
    assert!(
        stderr(&out).contains("unknown command") && stderr(&out).contains("KILL '<session id>'"),
        "{}",
        stderr(&out)
    );

    // KILL: the client is told, the session ends.
    let out = tokio::task::block_in_place(|| console(&alice, &format!("KILL '{id}'")));
    assert!(out.status.success(), "{}", stderr(&out));
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the killed session ends")
        .unwrap();
    let err = ended.expect_err("the connection says why");
    assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err}");
    let message = err.as_db_error().map(|d| d.message().to_owned());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("administrator")),
        "{message:?}"
    );
    wait_for("the killed end event", Duration::from_secs(10), || {
        events()
            .iter()
            .find(|e| e["event"] == "session.end" && e["session_id"] == id.as_str())
            .filter(|e| e["end_reason"] == "killed")
            .cloned()
    });

    // Bob is no administrator; RELOAD makes him one.
    let out = tokio::task::block_in_place(|| console(&bob, "SHOW VERSION"));
    assert!(
        stderr(&out).contains("may not use the pgbastion admin console"),
        "{}",
        stderr(&out)
    );
    write_config("\"alice@example.com\", \"bob@example.com\"", true);
    let out = tokio::task::block_in_place(|| console(&alice, "RELOAD"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("reloaded"), "{}", stdout(&out));
    let out = tokio::task::block_in_place(|| console(&bob, "SHOW VERSION"));
    assert!(out.status.success(), "{}", stderr(&out));
    // The listener the RELOAD added serves sessions.
    wait_listening(late);
    let through_late = conninfo.replace(&format!("port={tcp}"), &format!("port={late}"));
    let (late_client, late_conn) =
        tokio_postgres::connect(&through_late, tls_connector(&env.proxy_ca))
            .await
            .unwrap();
    let late_conn = tokio::spawn(late_conn);
    let rows = late_client.simple_query("select 1").await.unwrap();
    assert!(!rows.is_empty());
    drop(late_client);
    late_conn.await.unwrap().unwrap();

    // Every command is audited with who ran it (bob's, the last, once
    // the audit writer has written it).
    let ran = wait_for("bob's command audited", Duration::from_secs(10), || {
        let ran: Vec<(String, String)> = events()
            .iter()
            .filter(|e| e["event"] == "console.command")
            .map(|e| {
                (
                    e["identity"]["name"].as_str().unwrap_or("").to_owned(),
                    e["command"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        ran.iter()
            .any(|(who, _)| who == "bob@example.com")
            .then_some(ran)
    });
    assert!(
        ran.contains(&("alice@example.com".into(), format!("KILL '{id}'"))),
        "{ran:?}"
    );
    assert!(
        ran.contains(&("bob@example.com".into(), "SHOW VERSION".into())),
        "{ran:?}"
    );
    let refused = events()
        .into_iter()
        .find(|e| e["reason"] == "not_admin")
        .expect("bob's refusal is audited");
    assert_eq!(refused["identity"]["name"], "bob@example.com");
}
