//! Nothing lost at the end of a session (issue 10): a client that closes
//! its sending side still gets the reply to its last query, and a session
//! the client ended with Terminate is audited as the client's doing.

mod common;

use std::time::Duration;

use common::*;
use pgbastion::localpg::{LocalPg, LocalPgOptions};
use pgbastion::protocol::message;
use pgbastion::protocol::startup::{ProtocolVersion, StartupMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A PostgreSQL that lets role `raw` in without a password (TLS from
/// pgbastion, trust), so a test can speak the protocol by hand.
fn env_with_trusted_role() -> Env {
    let pg = LocalPg::start(LocalPgOptions {
        trust_users: vec!["raw".into()],
        ..LocalPgOptions::default()
    })
    .expect("start PostgreSQL");
    pg.run_sql("CREATE ROLE raw LOGIN; CREATE TABLE t (n int); GRANT ALL ON t TO raw;")
        .unwrap();
    Env {
        pg,
        certs: ProxyCerts::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_after_its_query_gets_the_reply() {
    let env = env_with_trusted_role();
    let proxy = env.proxy("allow", "");
    let mut tcp = raw(proxy.addr()).await;
    let startup = StartupMessage::new(
        ProtocolVersion { major: 3, minor: 0 },
        vec![
            ("user".into(), "raw".into()),
            ("database".into(), "postgres".into()),
        ],
    );
    tcp.write_all(startup.as_bytes()).await.unwrap();
    loop {
        let (t, _) = read_message(&mut tcp).await.unwrap();
        if t == b'Z' {
            break;
        }
    }
    // A query that takes a moment, then at once the end of what the client
    // sends (shutdown(SHUT_WR)), as scripts piping into a socket do.
    let sql = b"insert into t select 42 from pg_sleep(0.3) returning n\0";
    tcp.write_all(&message::build(b'Q', sql)).await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), tcp.read_to_end(&mut reply))
        .await
        .expect("the session ends after the reply")
        .unwrap();
    let mut tags = Vec::new();
    let mut at = 0;
    while let Ok(Some((t, len))) = message::frame(&reply[at..], 1 << 20) {
        tags.push(t);
        at += len;
    }
    assert!(
        tags.contains(&b'D') && tags.contains(&b'C') && tags.contains(&b'Z'),
        "the reply to the last query arrives whole: {:?}",
        String::from_utf8_lossy(&tags)
    );
    let end = proxy.wait_audit("end", |e| e["event"] == "session.end");
    assert_eq!(end["end_reason"], "client_closed");
    let direct = env.direct_client().await;
    let n: i64 = direct
        .query_one("select count(*) from t where n = 42", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_ended_by_the_client_are_audited_as_client_closed() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    const N: usize = 60;
    for _ in 0..N {
        let (client, conn) = proxy.client(&env, "").await.unwrap();
        client.simple_query("select 1").await.unwrap();
        // Dropping the client sends Terminate, then the connection closes.
        drop(client);
        conn.await.unwrap().unwrap();
    }
    let ends = proxy.wait_audit_count("every end", N, |e| e["event"] == "session.end");
    let wrong: Vec<_> = ends
        .iter()
        .filter(|e| e["end_reason"] != "client_closed")
        .map(|e| e["end_reason"].to_string())
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {N} misattributed: {wrong:?}",
        wrong.len()
    );
}
