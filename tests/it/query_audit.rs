//! Query-level audit (issue 14): every statement of a session whose rule
//! has `audit_queries = "statements"` is a `query` event, in order, with its
//! command tag, row count or SQLSTATE; literals, bind parameters and COPY
//! data never reach the audit log.

use crate::common::*;

fn queries(proxy: &Proxy) -> Vec<serde_json::Value> {
    proxy
        .audit_events()
        .into_iter()
        .filter(|e| e["event"] == "query")
        .collect()
}

fn audited(env: &Env) -> Proxy {
    env.proxy(
        "require",
        "[[rule]]\nname = \"audited\"\naudit_queries = \"statements\"\n",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_are_audited_in_order_without_their_literals() {
    let env = Env::new();
    env.direct_client()
        .await
        .batch_execute("create role app login password 'x'")
        .await
        .unwrap();
    let proxy = audited(&env);
    let (client, _conn) = proxy.client(&env, "application_name=qa").await.unwrap();
    client
        .batch_execute("create table t (email text, n int)")
        .await
        .unwrap();
    // Extended protocol: a prepared statement with bind parameters.
    let insert = client
        .prepare("insert into t values ($1, $2)")
        .await
        .unwrap();
    client
        .execute(&insert, &[&"canary-param@example.com", &5i32])
        .await
        .unwrap();
    // Simple protocol with a literal, then a transaction with an error.
    let rows = client
        .simple_query("select * from t where email <> 'canary-literal@example.com'")
        .await
        .unwrap();
    assert!(!rows.is_empty());
    client.batch_execute("begin").await.unwrap();
    let e = client.batch_execute("select 1/0").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("22012"));
    client.batch_execute("rollback").await.unwrap();
    // COPY in and out.
    {
        use futures_util::SinkExt;
        let sink = client.copy_in("copy t from stdin").await.unwrap();
        futures_util::pin_mut!(sink);
        sink.send(bytes::Bytes::from_static(b"canary-copy@example.com\t7\n"))
            .await
            .unwrap();
        assert_eq!(sink.finish().await.unwrap(), 1);
    }
    {
        use futures_util::StreamExt;
        let stream = client.copy_out("copy t to stdout").await.unwrap();
        futures_util::pin_mut!(stream);
        let mut n = 0;
        while let Some(chunk) = stream.next().await {
            n += chunk.unwrap().len();
        }
        assert!(n > 0);
    }
    client
        .batch_execute("alter role app password 'canary-password'")
        .await
        .unwrap();
    drop(client);
    // psql (simple protocol), and a replication connection's command.
    let out = env.psql(
        &env.via_proxy(
            proxy.addr(),
            "channel_binding=disable application_name=psql",
        ),
        "select 'canary-psql' as x",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.psql(
        &env.via_proxy(
            proxy.addr(),
            "channel_binding=disable replication=database application_name=walsender",
        ),
        "IDENTIFY_SYSTEM",
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // libpq's pipeline mode (through psycopg's binding of it): three
    // statements and one Sync sent before any answer is read, the second
    // failing, so the server skips the third. (psycopg's high-level
    // pipeline reads answers while it sends, so whether it sends the third
    // statement at all depends on timing.)
    let conninfo = format!(
        "host=localhost port={} user=postgres dbname=postgres password={} sslmode=require \
         channel_binding=disable application_name=pipeline",
        proxy.addr().port(),
        env.pg.password
    );
    let script = r#"
import sys
from psycopg import pq
conn = pq.PGconn.connect(sys.argv[1].encode())
assert conn.status == pq.ConnStatus.OK, conn.error_message
conn.enter_pipeline_mode()
conn.send_query_params(b"select $1::text", [b"canary-pipe-1"])
conn.send_query_params(b"select 1/0", None)
conn.send_query_params(b"select $1::text", [b"canary-pipe-2"])
conn.pipeline_sync()
assert conn.flush() == 0
seen = []
for _ in range(20):
    r = conn.get_result()
    if r is None:
        continue
    seen.append(pq.ExecStatus(r.status).name)
    if r.status == pq.ExecStatus.PIPELINE_SYNC:
        break
conn.exit_pipeline_mode()
conn.finish()
print(" ".join(seen))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, &conninfo])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "TUPLES_OK FATAL_ERROR PIPELINE_ABORTED PIPELINE_SYNC"
    );

    // psycopg's own pipeline mode, as applications use it: it reads
    // answers while it sends, so the statement after the failing one is
    // either never sent or skipped by the server.
    let script = r#"
import sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    try:
        with conn.pipeline():
            conn.execute("select %s::text", ["canary-pipe-3"])
            conn.execute("select 1/0")
            conn.execute("select %s::text", ["canary-pipe-4"])
    except psycopg.errors.DivisionByZero:
        print("22012")
"#;
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            &conninfo.replace(
                "application_name=pipeline",
                "application_name=psycopg-pipeline",
            ),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "22012");

    // The pipelines' sessions have ended: all their events are written.
    for app in ["pipeline", "psycopg-pipeline"] {
        proxy.wait_audit("the pipeline session's end", |e| {
            e["event"] == "session.end" && e["requested"]["application_name"] == app
        });
    }
    let all = queries(&proxy);
    let brief: Vec<(String, String, String, String)> = all
        .iter()
        .map(|e| {
            (
                e["statement"].as_str().unwrap_or("-").to_owned(),
                e["protocol"].as_str().unwrap().to_owned(),
                e["tag"]
                    .as_str()
                    .or(e["sqlstate"].as_str())
                    .unwrap_or("-")
                    .to_owned(),
                e["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want = |s: &str, p: &str, t: &str, o: &str| (s.into(), p.into(), t.into(), o.into());
    let expected = vec![
        want(
            "create table t (email text, n int)",
            "simple",
            "CREATE TABLE",
            "ok",
        ),
        want("insert into t values ($1, $2)", "extended", "INSERT", "ok"),
        want(
            "select * from t where email <> $1",
            "simple",
            "SELECT",
            "ok",
        ),
        want("begin", "simple", "BEGIN", "ok"),
        want("select $1/$2", "simple", "22012", "error"),
        want("rollback", "simple", "ROLLBACK", "ok"),
        want("copy t from stdin", "extended", "COPY", "ok"),
        want("copy t to stdout", "extended", "COPY", "ok"),
        want("alter role app password $1", "simple", "ALTER ROLE", "ok"),
        want("select $1 as x", "simple", "SELECT", "ok"),
    ];
    assert_eq!(&brief[..expected.len()], &expected[..], "{brief:#?}");
    let walsender = all
        .iter()
        .find(|e| e["requested"]["application_name"] == "walsender")
        .expect("the replication command");
    assert_eq!(walsender["protocol"], "replication", "{walsender}");
    assert_eq!(walsender["statement"], "IDENTIFY_SYSTEM", "{walsender}");
    let of_app = |app: &str| -> Vec<(String, String, String, String)> {
        all.iter()
            .zip(&brief)
            .filter(|(e, _)| e["requested"]["application_name"] == app)
            .map(|(_, b)| b.clone())
            .collect()
    };
    let hl = of_app("psycopg-pipeline");
    assert!(hl.len() == 2 || hl.len() == 3, "{hl:#?}");
    assert_eq!(
        hl[..2],
        [
            want("select $1::text", "extended", "SELECT", "ok"),
            want("select $1/$2", "extended", "22012", "error"),
        ],
        "{hl:#?}"
    );
    if let Some(third) = hl.get(2) {
        assert_eq!(
            third,
            &want("select $1::text", "extended", "-", "not_executed")
        );
    }
    assert_eq!(
        of_app("pipeline"),
        vec![
            want("select $1::text", "extended", "SELECT", "ok"),
            want("select $1/$2", "extended", "22012", "error"),
            want("select $1::text", "extended", "-", "not_executed"),
        ],
        "{brief:#?}"
    );
    let insert = &all[1];
    assert_eq!(insert["rows"], 1);
    assert!(insert["prepared"].is_string(), "{insert}");
    assert_eq!(all[6]["copy"], "in");
    assert_eq!(all[6]["rows"], 1);
    assert_eq!(all[7]["copy"], "out");
    assert!(all[0]["duration_us"].is_u64() && all[0]["started"].is_string());
    assert_eq!(all[0]["rule"], "audited");
    // The session's own events say its statements were audited, and how
    // many query events it has.
    let qa_start = proxy.wait_audit("qa's start", |e| {
        e["event"] == "session.start" && e["requested"]["application_name"] == "qa"
    });
    assert_eq!(qa_start["query_audit"]["mode"], "statements", "{qa_start}");
    let qa_end = proxy.wait_audit("qa's end", |e| {
        e["event"] == "session.end" && e["requested"]["application_name"] == "qa"
    });
    assert_eq!(
        qa_end["query_audit"]["statements"],
        of_app("qa").len(),
        "{qa_end}"
    );
    assert_eq!(of_app("qa").len(), 9);
    assert!(qa_end["query_audit"].get("stopped").is_none(), "{qa_end}");
    // No literal, parameter or COPY data anywhere in the audit file.
    let text = std::fs::read_to_string(&proxy.audit_log).unwrap();
    assert!(!text.contains("canary"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_audit_queries_there_are_no_query_events() {
    let env = Env::new();
    let proxy = env.proxy(
        "require",
        "[[rule]]\nname = \"plain\"\naudit_queries = \"off\"\n",
    );
    let (client, _conn) = proxy.client(&env, "application_name=plain").await.unwrap();
    client.simple_query("select 'x'").await.unwrap();
    drop(client);
    let end = proxy.wait_audit("the end", |e| e["event"] == "session.end");
    assert!(queries(&proxy).is_empty());
    // The relay that served it was the plain one: the session's events
    // say no query audit ran (the same decision picks the relay path).
    let start = proxy.wait_audit("the start", |e| e["event"] == "session.start");
    assert!(start.get("query_audit").is_none(), "{start}");
    assert!(end.get("query_audit").is_none(), "{end}");
}

/// With `on_failure = "refuse"`, a session whose statements can no longer
/// be audited (nobody reads the audit log, its queue is full) is ended
/// with a clear error rather than left to run unaudited; with the default
/// "continue" it goes on and the lost events are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_cannot_be_audited_is_ended_under_refuse() {
    let env = Env::new();
    let port = pgbastion::dev::localpg::free_port().unwrap();
    let cfg = env.dir.path().join("pgbastion.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}\n[[listener]]\nlisten = \"127.0.0.1:{port}\"\n{}\n[audit]\nlog = \"-\"\non_failure = \"refuse\"\n\
             [[rule]]\nname = \"audited\"\naudit_queries = \"statements\"\n",
            env.tls_toml(),
            env.upstream_toml()
        ),
    )
    .unwrap();
    // stdout, the audit log, is a pipe nobody reads.
    let _proc = Running(
        config_form(&cfg, None)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_listening(port);
    // psql running statement after statement: the pipe holds a few
    // hundred events and the queue 10,000.
    let script = env.dir.path().join("many.sql");
    std::fs::write(&script, "select 1;\n".repeat(30_000)).unwrap();
    let out = tokio::task::spawn_blocking({
        let conninfo = env.via_proxy(
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            "channel_binding=disable",
        );
        let password = env.pg.password.clone();
        move || {
            std::process::Command::new("psql")
                .args(["-X", "-q", "-d", &conninfo, "-f"])
                .arg(&script)
                .env("PGPASSWORD", password)
                .stdout(std::process::Stdio::piped())
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(!out.status.success(), "the session was ended");
    let err = stderr(&out);
    assert!(err.contains("audit log cannot be written"), "{err}");
    let answered = stdout(&out).lines().filter(|l| l.trim() == "1").count();
    assert!(
        (1_000..30_000).contains(&answered),
        "ended once the queue was full, after {answered} statements"
    );
}

/// A small deterministic generator (xorshift), so a failure is
/// reproducible from its case number.
struct Gen(u64);

impl Gen {
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        from[(self.0 % from.len() as u64) as usize]
    }
}

/// Issue 19 item 1: the lexer's token boundaries, compared with the
/// server's on generated statements. Each statement is `select` and a few
/// items `(<constant>)::text as cN`, with whitespace and comments of every
/// kind (`\r`-ended `--` comments, `/* */`, form feeds) between any two
/// tokens, constants in every string form (continued ones too, and
/// backslashes read per standard_conforming_strings, half the cases with it
/// off), each holding text that would open a string or comment if read as
/// code. The server prepares the statement (so its own lexer reads it); the
/// lexer's normalized text must then have exactly one constant per item,
/// no canary, and the server must prepare it (with `$n` parameters) to the
/// same columns: a boundary read differently either hides an item (as in
/// the issue's `--\r`), leaves text of a literal or comment behind, or
/// breaks the statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lexer_agrees_with_the_server_on_token_boundaries() {
    use pgbastion::audit::normalize::{normalize_with, Backslashes};
    let env = Env::new();
    let client = env.direct_client().await;
    let gaps = [
        " ",
        "\n",
        "\r",
        "\r\n",
        "\t\x0c",
        "--canary'\r",
        "--canary $$\n",
        "-- canary /*\r",
        "/* canary ' */",
        "/* /* canary */ -- */",
        "/*\r canary*/",
    ];
    // Newline-holding gaps that continue a string.
    let continued = [
        "\n",
        "\r",
        " --canary'\r",
        "\r\n\x0c",
        "\t-- x\n-- canary\r ",
    ];
    let constants = [
        "1",
        "2.5",
        ".5",
        "1e3",
        "'canary'",
        "'it''s canary'",
        "'--canary'",
        "'/*canary'",
        "'canary\r--'",
        "E'canary\\'--'",
        "E'\\\\'",
        "$$canary'--$$",
        "$q$canary$$--$q$",
        "U&'canary\\0061'",
        "B'101'",
        "X'1F'",
        "N'canary'",
        "CONTINUED",
    ];
    // Plain strings with a backslash, read per the setting.
    let on = ["'canary\\'", "'a\\b'"];
    let off = ["'canary\\'--'", "'\\\\'"];
    let mut g = Gen(0x9e37_79b9_7f4a_7c15);
    for scf_on in [true, false] {
        client
            .batch_execute(if scf_on {
                "set standard_conforming_strings = on"
            } else {
                "set standard_conforming_strings = off; set escape_string_warning = off"
            })
            .await
            .unwrap();
        let mode = if scf_on {
            Backslashes::Literal
        } else {
            Backslashes::Escape
        };
        let plain: &[&str] = if scf_on { &on } else { &off };
        for case in 0..150 {
            let items = 1 + case % 4;
            let mut sql = format!("select{}", g.pick(&gaps));
            for n in 1..=items {
                let mut constant = g.pick(&constants).to_owned();
                if case % 3 == 0 {
                    constant = g.pick(plain).to_owned();
                }
                // U&'' with standard_conforming_strings off is an error.
                if !scf_on && constant.starts_with("U&") {
                    constant = "'canary'".to_owned();
                }
                if constant == "CONTINUED" {
                    constant = format!("'canary'{}'canary'", g.pick(&continued));
                }
                let op = if n % 2 == 0 { "||" } else { "::text" };
                let mut item = format!("({}{constant}{})", g.pick(&gaps), g.pick(&gaps));
                if op == "||" {
                    // An operator followed at once by a comment.
                    item = format!("''{op}{}{item}", g.pick(&gaps));
                    constant.clear();
                }
                sql.push_str(&format!(
                    "{item}::text{}as{}c{n}",
                    g.pick(&gaps),
                    g.pick(&gaps)
                ));
                if n < items {
                    sql.push_str(&format!("{},{}", g.pick(&gaps), g.pick(&gaps)));
                }
            }
            let want = client
                .prepare(&sql)
                .await
                .unwrap_or_else(|e| panic!("case {case}: the server refused {sql:?}: {e:?}"));
            let want: Vec<&str> = want.columns().iter().map(|c| c.name()).collect();
            assert_eq!(want.len(), items, "{sql:?}");
            let n = normalize_with(&sql, mode)
                .unwrap_or_else(|e| panic!("case {case}: {sql:?} unparsed: {e}"));
            // `''||(...)`: the empty string is a constant too.
            let expected = items + items / 2;
            assert_eq!(
                n.constants, expected,
                "case {case}: {sql:?} -> {:?}",
                n.text
            );
            assert!(
                !n.text.contains("canary"),
                "case {case}: {sql:?} -> {:?}",
                n.text
            );
            let got = client.prepare(&n.text).await.unwrap_or_else(|e| {
                panic!(
                    "case {case}: {sql:?} -> {:?}, which the server refused: {e}",
                    n.text
                )
            });
            let got: Vec<&str> = got.columns().iter().map(|c| c.name()).collect();
            assert_eq!(got, want, "case {case}: {sql:?} -> {:?}", n.text);
        }
    }
}

fn python_conninfo(env: &Env, proxy: &Proxy, app: &str) -> String {
    format!(
        "host=localhost port={} user=postgres dbname=postgres password={} sslmode=require \
         channel_binding=disable application_name={app}",
        proxy.addr().port(),
        env.pg.password
    )
}

fn of_app(proxy: &Proxy, app: &str) -> Vec<serde_json::Value> {
    queries(proxy)
        .into_iter()
        .filter(|e| e["requested"]["application_name"] == app)
        .collect()
}

fn brief(e: &serde_json::Value) -> (String, String, String) {
    (
        e["statement"].as_str().unwrap_or("-").to_owned(),
        e["tag"]
            .as_str()
            .or(e["sqlstate"].as_str())
            .unwrap_or("-")
            .to_owned(),
        e["outcome"].as_str().unwrap().to_owned(),
    )
}

/// Issue 19 item 13 through a real driver: psycopg's `executemany` and
/// pipeline with an error inside (extended protocol), then more
/// statements: the query audit must not stop, and the later statements
/// must carry their own tags. And the backslash decision: a plain string
/// with a backslash is recorded when both readings of
/// standard_conforming_strings agree, and not otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_in_pipelines_and_backslashes_keep_the_audit_in_step() {
    let env = Env::new();
    let proxy = audited(&env);
    let script = r#"
import sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    conn.execute("create table m (x int primary key)")
    try:
        conn.cursor().executemany("insert into m values (%s)", [(1,), (1,), (2,)])
    except psycopg.errors.UniqueViolation:
        print("23505")
    try:
        with conn.pipeline():
            conn.execute("select %s::int", [1])
            conn.execute("selec 2")
            conn.execute("select %s::int", [3])
    except psycopg.errors.SyntaxError:
        print("42601")
    conn.execute("drop table m")
    conn.execute("select 'a\\b' as plain")
    conn.execute("set standard_conforming_strings = off")
    conn.execute("select 'a\\' , canary --' as escaped")
    conn.execute("set standard_conforming_strings = on")
    conn.execute("select 'a\\' , 1 as canary_code --'")
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, &python_conninfo(&env, &proxy, "drivers")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "23505\n42601");
    let end = proxy.wait_audit("the session's end", |e| {
        e["event"] == "session.end" && e["requested"]["application_name"] == "drivers"
    });
    assert!(end["query_audit"].get("stopped").is_none(), "{end}");
    let all: Vec<(String, String, String)> = of_app(&proxy, "drivers").iter().map(brief).collect();
    assert_eq!(end["query_audit"]["statements"], all.len(), "{end}");
    // psycopg's own DEALLOCATE ALL comes and goes with its versions.
    let all: Vec<_> = all
        .into_iter()
        .filter(|s| !s.0.starts_with("DEALLOCATE"))
        .collect();
    let want = |s: &str, t: &str, o: &str| (s.to_owned(), t.to_owned(), o.to_owned());
    // Whatever psycopg had sent of the rows and statements after each
    // error when it arrived, the statements that follow carry their own
    // answers.
    let tail = &all[all.len() - 6..];
    assert_eq!(
        tail,
        [
            want("drop table m", "DROP TABLE", "ok"),
            want("select $1 as plain", "SELECT", "ok"),
            want("set standard_conforming_strings = off", "SET", "ok"),
            // Read both ways (the setting in force is never known for
            // certain: normalize::Backslashes), these two differ: not recorded.
            want("-", "SELECT", "ok"),
            want("set standard_conforming_strings = on", "SET", "ok"),
            want("-", "SELECT", "ok"),
        ],
        "{all:#?}"
    );
    let events = of_app(&proxy, "drivers");
    let unparsed: Vec<_> = events.iter().filter(|e| e["statement"].is_null()).collect();
    assert_eq!(unparsed.len(), 2, "{unparsed:#?}");
    for e in unparsed {
        assert_eq!(e["unparsed"]["why"], "backslash in a plain string", "{e}");
    }
    assert!(
        all.contains(&want("insert into m values ($1)", "23505", "error")),
        "{all:#?}"
    );
    assert!(
        all.contains(&want("selec $1", "42601", "error")),
        "{all:#?}"
    );
    for (s, _, o) in &all {
        assert!(o == "ok" || o == "error" || o == "not_executed", "{s}: {o}");
    }
}

/// Issue 19 item 2: statements the server was sent but whose answer never
/// came through are recorded with outcome "unanswered" (a client that
/// resets its connection mid-statement), and a session the server
/// terminates mid-COPY records its COPY with the server's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_without_an_answer_are_recorded() {
    let env = Env::new();
    let proxy = audited(&env);
    let direct = env.direct_client().await;
    // The issue's reproduction: send, and reset the connection 0.1 s
    // later (SO_LINGER 0, so the close is an RST), while the server
    // sleeps.
    let script = r#"
import os, socket, struct, sys, time, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
conn.pgconn.send_query(b"select pg_sleep(0.5); create table t(x int)")
conn.pgconn.flush()
time.sleep(0.1)
s = socket.socket(fileno=os.dup(conn.pgconn.socket))
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
os._exit(0)
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, &python_conninfo(&env, &proxy, "reset")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    proxy.wait_audit("the reset session's end", |e| {
        e["event"] == "session.end" && e["requested"]["application_name"] == "reset"
    });
    // The server ran it all the same.
    wait_for_async("the table", std::time::Duration::from_secs(10), || async {
        direct
            .query_opt("select 1 from pg_class where relname = 't'", &[])
            .await
            .unwrap()
    })
    .await;
    let reset: Vec<_> = of_app(&proxy, "reset").iter().map(brief).collect();
    assert_eq!(
        reset,
        [(
            "select pg_sleep($1); create table t(x int)".to_owned(),
            "-".to_owned(),
            "unanswered".to_owned()
        )]
    );

    // A COPY the server ends (pg_terminate_backend) while the client is
    // still sending its data.
    let script = r#"
import sys, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
try:
    with conn.cursor().copy("copy t from stdin") as copy:
        copy.write_row([1])
        print("copying", flush=True)
        sys.stdin.readline()
        copy.write_row([2])
except psycopg.OperationalError:
    print("terminated")
"#;
    let mut child = Running(
        std::process::Command::new("python3")
            .args(["-c", script, &python_conninfo(&env, &proxy, "copying")])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = wait_active(&direct, "copying").await;
    direct
        .execute("select pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    drop(child.0.stdin.take());
    proxy.wait_audit("the terminated session's end", |e| {
        e["event"] == "session.end" && e["requested"]["application_name"] == "copying"
    });
    let copying: Vec<_> = of_app(&proxy, "copying").iter().map(brief).collect();
    assert_eq!(
        copying,
        [(
            "copy t from stdin".to_owned(),
            "57P01".to_owned(),
            "error".to_owned()
        )]
    );
}

/// Issue 19 item 13: a query audit that loses its place in the protocol
/// never stops silently. With `audit.on_failure = "continue"` the session
/// goes on and a `query_audit.stopped` event says so; with `"refuse"` the
/// session ends (57P01), as when an event cannot be written. The client
/// here sends a message no protocol has (a length under 4) after logging
/// in, injected beneath tokio-postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_audit_that_loses_its_place_says_so() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = Env::new();
    for on_failure in ["continue", "refuse"] {
        let proxy = env.proxy(
            "allow",
            &format!(
                "[[rule]]\nname = \"audited\"\naudit_queries = \"statements\"\n\
                 [audit]\nlog = \"{{audit_log}}\"\non_failure = \"{on_failure}\"\n"
            ),
        );
        let (local, remote) = tokio::io::duplex(64 * 1024);
        let (inject, mut injected) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let (mut sr, mut sw) = tokio::io::split(raw(proxy.addr()).await);
        let (mut rr, mut rw) = tokio::io::split(remote);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let bytes = tokio::select! {
                    n = rr.read(&mut buf) => match n {
                        Ok(n) if n > 0 => buf[..n].to_vec(),
                        _ => break,
                    },
                    Some(b) = injected.recv() => b,
                };
                if sw.write_all(&bytes).await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut sr, &mut rw).await;
        });
        let client = pg_over(local, &env.pg.password, on_failure).await.unwrap();
        client.simple_query("select 1").await.unwrap();
        inject.send(vec![b'Q', 0, 0, 0, 2]).unwrap();
        let stopped = proxy.wait_audit("the stop", |e| e["event"] == "query_audit.stopped");
        assert_eq!(stopped["why"], "the client's messages could not be framed");
        assert_eq!(stopped["requested"]["application_name"], on_failure);
        let end = proxy.wait_audit("the end", |e| e["event"] == "session.end");
        assert_eq!(
            end["query_audit"]["stopped"],
            "the client's messages could not be framed"
        );
        // Under "refuse" pgbastion ends the session itself; under
        // "continue" the server's own answer to the bad message ends it.
        assert_eq!(
            end["end_reason"] == "audit_unavailable",
            on_failure == "refuse",
            "{end}"
        );
        drop(client);
    }
}

/// In SJIS, 0x81 0x5C is one character: the server sees no backslash where
/// a UTF-8 reading sees an escape, so `E'\x81\', 'CANARY' --'` ran with the
/// canary as code and the audit recorded it (adversarial H2). Such a
/// statement is now recorded only as unparsed, with its length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backslash_that_is_half_a_character_hides_nothing() {
    let env = Env::new();
    let proxy = audited(&env);
    let script = r#"
import sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    conn.execute("set client_encoding = 'SJIS'")
    # Bytes that are valid UTF-8 (U+0081, then a backslash) and, to the
    # server, one SJIS character: the string ends at the next quote.
    res = conn.pgconn.exec_(b"select E'\xc2\x81\\', 'CANARY_SJIS' --'")
    print(res.get_value(0, 1).decode())
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, &python_conninfo(&env, &proxy, "sjis")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "CANARY_SJIS",
        "the server read the canary as a value"
    );
    let end = proxy.wait_audit("the session's end", |e| {
        e["event"] == "session.end" && e["requested"]["application_name"] == "sjis"
    });
    let text = std::fs::read_to_string(&proxy.audit_log).unwrap();
    assert!(!text.contains("CANARY"), "{text}");
    let events = of_app(&proxy, "sjis");
    let hidden = events
        .iter()
        .find(|e| e["statement"].is_null())
        .unwrap_or_else(|| panic!("{events:#?}"));
    assert_eq!(
        hidden["unparsed"]["why"],
        "backslash after a non-ASCII byte"
    );
    assert_eq!(end["query_audit"]["statements"], events.len());
}

/// Issue 19 adversarial H3/H4/H5 through the real server: raw protocol
/// messages written beneath psycopg on its (plaintext) socket. Each
/// Execute is recorded with the statement the server ran, or as unknown:
/// a portal keeps the statement it was bound to (H3); a Parse the server
/// refuses changes nothing (H4); a portal gone with its transaction, or a
/// cursor DECLAREd in SQL, is unknown (H5). Before, the audit recorded
/// `select $1 as harmless` with the CREATE TABLE's tag, and the unnamed
/// statement's text for the cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execute_is_recorded_as_the_statement_the_server_ran() {
    let env = Env::new();
    let proxy = env.proxy(
        "allow",
        "[[rule]]\nname = \"audited\"\naudit_queries = \"statements\"\n",
    );
    let script = r#"
import os, socket, struct, sys, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
s = socket.socket(fileno=os.dup(conn.pgconn.socket))
s.setblocking(True)
def m(t, b): return t + struct.pack("!i", len(b) + 4) + b
def c(x): return x.encode() + b"\0"
P = lambda n, q: m(b"P", c(n) + c(q) + b"\0\0")
B = lambda p, n: m(b"B", c(p) + c(n) + b"\0\0\0\0\0\0")
E = lambda p: m(b"E", c(p) + b"\0\0\0\0")
CLOSE = lambda k, n: m(b"C", k + c(n))
S = m(b"S", b"")
Q = lambda q: m(b"Q", c(q))
buf = b""
def run(data):
    global buf
    s.sendall(data)
    seen = []
    while True:
        while len(buf) < 5 or len(buf) < 1 + struct.unpack("!i", buf[1:5])[0]:
            chunk = s.recv(65536)
            assert chunk, seen
            buf += chunk
        n = 1 + struct.unpack("!i", buf[1:5])[0]
        msg, buf = buf[:n], buf[n:]
        if msg[:1] == b"E":
            seen.append([f[1:].decode() for f in msg[5:].split(b"\0") if f[:1] == b"C"][0])
        elif msg[:1] in (b"C", b"Z"):
            seen.append(msg[5:-1].decode() if msg[:1] == b"C" else "Z")
        if msg[:1] == b"Z":
            print(" ".join(seen))
            return
# H3: the unnamed statement replaced after the Bind.
run(P("", "create table hidden_t4a(x int)") + B("", "") + P("", "select 1 as harmless") + E("") + S)
# H3: a named statement closed and prepared again after the Bind.
run(Q("begin"))
run(P("s1", "create table hidden_t4b(x int)") + B("p", "s1") + CLOSE(b"S", "s1")
    + P("s1", "select 1 as harmless") + E("p") + S)
run(Q("commit"))
# H4: a refused Parse.
run(P("s", "create table hidden_t6(x int)") + S)
run(P("s", "select 1 as harmless") + S)
run(B("", "s") + E("") + S)
# H5: a portal gone with its transaction; a cursor DECLAREd in SQL.
run(P("", "create table hidden_t7(x int)") + B("p", "") + S)
run(E("p") + S)
run(Q("begin"))
run(Q("declare cur cursor for select 1 from pg_class limit 1"))
run(P("", "select 2 as harmless") + B("", "") + E("") + S)
run(E("cur") + S)
run(Q("commit"))
"#;
    let conninfo = format!(
        "host=localhost port={} user=postgres dbname=postgres password={} sslmode=disable \
         application_name=raw",
        proxy.addr().port(),
        env.pg.password
    );
    let out = std::process::Command::new("python3")
        .args(["-c", script, &conninfo])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // What the server answered: the CREATE TABLEs ran, the refused Parse
    // was refused, the ended portal was gone.
    assert_eq!(
        stdout(&out),
        "CREATE TABLE Z\nBEGIN Z\nCREATE TABLE Z\nCOMMIT Z\nZ\n42P05 Z\nCREATE TABLE Z\n\
         Z\n34000 Z\nBEGIN Z\nDECLARE CURSOR Z\nSELECT 1 Z\nSELECT 1 Z\nCOMMIT Z"
    );
    proxy.wait_audit("the session's end", |e| {
        e["event"] == "session.end" && e["requested"]["application_name"] == "raw"
    });
    let want = |s: &str, t: &str, o: &str| (s.to_owned(), t.to_owned(), o.to_owned());
    let extended: Vec<_> = of_app(&proxy, "raw")
        .iter()
        .filter(|e| e["protocol"] == "extended")
        .map(brief)
        .collect();
    assert_eq!(
        extended,
        [
            want("create table hidden_t4a(x int)", "CREATE TABLE", "ok"),
            want("create table hidden_t4b(x int)", "CREATE TABLE", "ok"),
            want("create table hidden_t6(x int)", "CREATE TABLE", "ok"),
            want("-", "34000", "error"),
            want("select $1 as harmless", "SELECT", "ok"),
            want("-", "SELECT", "ok"),
        ]
    );
}
