//! `pgbastion run --runtime per-core` (issue 24): sessions on a
//! single-threaded runtime per core, each staying on its thread. The same
//! guarantees as the shared runtime: relaying, cancel, drain on SIGTERM.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;

/// The names of a process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|n| n.trim().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_sessions_relay_cancel_and_drain() {
    let env = Env::new();
    let port = pgbastion::dev::localpg::free_port().unwrap();
    let audit = env.dir.path().join("audit.jsonl");
    let mut proc = Running(
        flag_form(&env, port, &[])
            .args(PER_CORE)
            .arg("--audit-log")
            .arg(&audit)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(port);
    let pid = proc.0.id();
    let names = thread_names(pid);
    for core in ["pgb-core-0", "pgb-core-1"] {
        assert!(names.iter().any(|n| n == core), "{core} in {names:?}");
    }

    // Four sessions at once (two per core), each with its own answers.
    let conn = |app: &str| {
        format!(
            "host=localhost port={port} user=postgres password={} dbname=postgres sslmode=require channel_binding=disable application_name={app}",
            env.pg.password
        )
    };
    let mut clients = Vec::new();
    for i in 0..4 {
        let (client, task) =
            tokio_postgres::connect(&conn(&format!("core-{i}")), tls_connector(&env.proxy_ca))
                .await
                .unwrap();
        clients.push((Arc::new(client), tokio::spawn(task)));
    }
    for (i, (client, _)) in clients.iter().enumerate() {
        let row = client
            .query_one("select $1::int * 2", &[&(i as i32)])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), i as i32 * 2);
    }

    // A cancel reaches the session's server from whichever core it lands on.
    let (sleeper, _) = &clients[3];
    let token = sleeper.cancel_token();
    let running = sleeper.clone();
    let query = tokio::spawn(async move { running.simple_query("select pg_sleep(30)").await });
    let direct = env.direct_client().await;
    wait_active(&direct, "core-3").await;
    token
        .cancel_query(tls_connector(&env.proxy_ca))
        .await
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), query)
        .await
        .expect("the cancel ends the query")
        .unwrap()
        .expect_err("cancelled");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");

    // SIGTERM: every idle session is told 57P01, and the process exits 0.
    signal(pid, "-TERM");
    for (_, task) in clients {
        let end = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("each session ends")
            .unwrap();
        let e = end.expect_err("ended by pgbastion");
        assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e}");
    }
    let status = wait_for("pgbastion to exit", Duration::from_secs(10), || {
        proc.0.try_wait().unwrap()
    });
    assert!(status.success(), "{status}");
    let ends = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .filter(|l| {
            l.contains("\"event\":\"session.end\"") && l.contains("\"end_reason\":\"shutdown\"")
        })
        .count();
    assert_eq!(ends, 4, "every session audited as ended by the shutdown");
}

#[test]
fn session_threads_need_the_per_core_runtime() {
    for (args, said) in [
        (
            &["--listen", "127.0.0.1:0", "--session-threads", "2"][..],
            "--session-threads needs --runtime per-core",
        ),
        (
            &["--runtime", "per-core", "--session-threads", "0"][..],
            "--session-threads",
        ),
    ] {
        let out = Command::new(BIN).arg("run").args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(said), "{args:?}: {}", stderr(&out));
    }
}
