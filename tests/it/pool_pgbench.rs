//! Pooling (issue 21) under real pgbench: the TPC-B-like script (BEGIN,
//! three UPDATEs, a SELECT, an INSERT, END) through pgbastion in
//! transaction mode with a pool of 4, in every query mode pgbench has
//! (`-M simple`, `extended`, `prepared`) and with a new connection per
//! transaction (`-C`). What must hold: no transaction fails, and
//! PostgreSQL never sees more than the pool's connections for the role,
//! however many clients come and go.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;

/// Server connections per pool in these tests; pgbench runs twice as many
/// clients, so transactions must share connections.
const POOL_SIZE: i64 = 4;

/// PostgreSQL with pgbench's tables (scale 1) in a database `pgbench` the
/// role `app` may use, and pgbastion in front of it pooling in transaction
/// mode. Its verifiers come from auth_query, whose lookup connections go
/// to the database `postgres`: the sessions counted in `pgbench` are the
/// pool's alone.
fn pooled_pgbench(env: &Env) -> Proxy {
    let pw_file = install_roles(env);
    env.pg
        .run_sql("CREATE DATABASE pgbench;")
        .expect("create the database pgbench");
    let conn = format!(
        "host=localhost port={} user=postgres dbname=pgbench sslmode=require",
        env.pg.port
    );
    let init = std::process::Command::new("pgbench")
        .args(["-i", "-q", "-s", "1", &conn])
        .env("PGPASSWORD", &env.pg.password)
        .output()
        .expect("pgbench is installed (postgresql-client)");
    assert!(init.status.success(), "pgbench -i: {}", stderr(&init));
    let grant = env.psql(
        &env.pg.direct_conninfo("pgbench"),
        "GRANT SELECT, INSERT, UPDATE ON pgbench_accounts, pgbench_branches, \
         pgbench_tellers, pgbench_history TO app;",
    );
    assert!(grant.status.success(), "grant: {}", stderr(&grant));
    env.proxy(
        "require",
        &format!(
            "{}pool_mode = \"transaction\"\npool_size = {POOL_SIZE}\nquery_wait_timeout = \"30s\"\n",
            auth_query_keys(&pw_file)
        ),
    )
}

/// What one pgbench run reported.
#[derive(Debug)]
struct Run {
    processed: u64,
    failed: u64,
    output: String,
}

/// pgbench as `app` through `proxy` (TLS), with `args`; blocks.
fn pgbench(proxy: &Proxy, args: &[&str]) -> Run {
    pgbench_at(proxy.addr(), args)
}

/// pgbench as `app` through pgbastion at `addr` (TLS), with `args`.
fn pgbench_at(addr: std::net::SocketAddr, args: &[&str]) -> Run {
    let conn = format!(
        "host=localhost port={} user=app dbname=pgbench sslmode=require connect_timeout=20",
        addr.port()
    );
    let out = std::process::Command::new("pgbench")
        .arg("-n")
        .args(args)
        .arg(&conn)
        .env("PGPASSWORD", APP_PASSWORD)
        .output()
        .expect("run pgbench");
    let output = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        out.status.success(),
        "pgbench {args:?} through the pool failed:\n{output}"
    );
    // "number of transactions actually processed: 1600/1600" and
    // "number of failed transactions: 0 (0.000%)" (pgbench 15+).
    let field = |prefix: &str| -> Option<u64> {
        output
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| {
                rest.trim_start_matches([' ', ':'])
                    .split(['/', ' '])
                    .next()?
                    .parse()
                    .ok()
            })
    };
    Run {
        processed: field("number of transactions actually processed")
            .unwrap_or_else(|| panic!("no processed count in:\n{output}")),
        failed: field("number of failed transactions").unwrap_or(0),
        output,
    }
}

/// The most backends PostgreSQL had for `app` at once, polled from a
/// direct connection every few milliseconds while a run lasts.
struct BackendWatch {
    max: Arc<AtomicI64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl BackendWatch {
    async fn start(env: &Env) -> BackendWatch {
        let direct = env.direct_client().await;
        let max = Arc::new(AtomicI64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (max.clone(), stop.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                let n: i64 = direct
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
                        &[],
                    )
                    .await
                    .expect("poll pg_stat_activity")
                    .get(0);
                m.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        BackendWatch { max, stop, task }
    }

    async fn finish(self) -> i64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the watcher");
        self.max.load(Ordering::Relaxed)
    }
}

/// pgbench `-c 8 -t 200` in `mode` through a pool of 4: every
/// transaction succeeds, at most 4 backends ever.
///
/// One pgbench thread per client (`-j 8`): pgbench connects (libpq's
/// PQconnectdb) and, with `-M prepared`, prepares (PQprepare) without
/// yielding its thread, so with several clients per thread one client
/// blocked on a pool place stops the others of its thread mid-transaction,
/// holding the places it waits for: a deadlock of the client, not of the
/// pool (two threads of four clients deadlocked a pool of 4 in about one
/// run in three here, at `-M prepared`'s first transactions).
async fn runs_in_mode(mode: &'static str) {
    let env = Env::new();
    let proxy = pooled_pgbench(&env);
    let watch = BackendWatch::start(&env).await;
    let run = tokio::task::spawn_blocking(move || {
        let run = pgbench(&proxy, &["-M", mode, "-c", "8", "-j", "8", "-t", "200"]);
        drop(proxy);
        run
    })
    .await
    .unwrap();
    let max = watch.finish().await;
    assert_eq!(run.failed, 0, "failed transactions:\n{}", run.output);
    assert_eq!(run.processed, 1600, "{}", run.output);
    assert!(
        max <= POOL_SIZE,
        "PostgreSQL had {max} backends for app with a pool of {POOL_SIZE}"
    );
    assert!(max >= 1, "the watcher never saw a pooled backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_simple_protocol_through_a_pool_of_4() {
    runs_in_mode("simple").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_extended_protocol_through_a_pool_of_4() {
    runs_in_mode("extended").await;
}

/// `-M prepared`: pgbench Parses each statement once per connection under
/// a fixed name (P_0, P_1, ...) and Binds it for every transaction, on
/// whichever server connection that transaction lands (PgBouncer 1.18
/// fails this at once with "prepared statement P_0 already exists").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_statements_through_a_pool_of_4() {
    runs_in_mode("prepared").await;
}

/// Sessions PostgreSQL has started in the database `pgbench` (a backend
/// reports its connect when it first flushes its statistics, at the latest
/// when it exits).
async fn sessions(direct: &tokio_postgres::Client) -> i64 {
    direct
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .await
        .unwrap();
    direct
        .query_one(
            "SELECT sessions FROM pg_stat_database WHERE datname = 'pgbench'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Ends every backend of `app` (the pool's server connections), so that
/// each has reported its session to the statistics, and waits until they
/// are gone.
async fn end_app_backends(direct: &tokio_postgres::Client) {
    direct
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'",
        )
        .await
        .unwrap();
    for _ in 0..200 {
        let n: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("app's backends did not end");
}

/// `-C`: a new client connection (TLS, SCRAM against pgbastion) for every
/// transaction; PostgreSQL starts at most the pool's connections for all
/// of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_new_connection_per_transaction_through_a_pool_of_4() {
    let env = Env::new();
    let proxy = pooled_pgbench(&env);
    let direct = env.direct_client().await;
    let before = sessions(&direct).await;
    let watch = BackendWatch::start(&env).await;
    let (run, proxy) = tokio::task::spawn_blocking(move || {
        let run = pgbench(
            &proxy,
            &["-M", "extended", "-C", "-c", "8", "-j", "8", "-t", "50"],
        );
        (run, proxy)
    })
    .await
    .unwrap();
    let max = watch.finish().await;
    end_app_backends(&direct).await;
    let after = sessions(&direct).await;
    drop(proxy);
    assert_eq!(run.failed, 0, "failed transactions:\n{}", run.output);
    assert_eq!(run.processed, 400, "{}", run.output);
    assert!(
        max <= POOL_SIZE,
        "PostgreSQL had {max} backends for app with a pool of {POOL_SIZE}"
    );
    let grew = after - before;
    assert!(
        grew <= POOL_SIZE,
        "400 client connections through a pool of {POOL_SIZE} started {grew} server sessions"
    );
}

/// `-C` with four clients per pgbench thread (`-j 2`): a client's
/// connect blocks its thread (PQconnectdb) while the thread's other
/// clients sit in open transactions (BEGIN ... END) holding all 4
/// connections: a pooled login must not wait for a connection (it is
/// answered from what the pool knows of the server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_connect_per_transaction_with_four_clients_per_thread() {
    let env = Env::new();
    let proxy = pooled_pgbench(&env);
    let run = tokio::task::spawn_blocking(move || {
        pgbench(&proxy, &["-C", "-c", "8", "-j", "2", "-t", "50"])
    })
    .await
    .unwrap();
    assert_eq!(run.failed, 0, "failed transactions:\n{}", run.output);
    assert_eq!(run.processed, 400, "{}", run.output);
}

/// PAUSE, a PostgreSQL restart, RESUME, all under pgbench: running
/// transactions finish, new ones wait, the pool's connections close
/// before the restart and open again after it; pgbench sees latency,
/// never an error.
#[test]
fn pause_restart_resume_under_pgbench_loses_nothing() {
    let mut env = Env::new();
    // The tables and grants, through the usual pooled proxy (dropped).
    drop(pooled_pgbench(&env));
    let dir = env.dir.path().to_owned();
    let people = pgbastion::dev::certs::Ca::new("people CA").unwrap();
    let people_ca = people.write_cert(&dir, "people-ca").unwrap();
    let alice = person(&people, &dir, "alice");
    let pw_file = dir.join("auth-password");
    let proxy = Proxy::start_toml(&format!(
        "{tls}\n[[listener]]\nname = \"tcp\"\nlisten = \"127.0.0.1:0\"\nclient_tls = \"require\"\n\
         [[listener]]\nname = \"mtls\"\nlisten = \"127.0.0.1:0\"\nidentity = \"client_cert\"\n\
         client_ca = \"{ca}\"\ncert_identity = [\"email\"]\n\
         {upstream}{auth}pool_mode = \"transaction\"\npool_size = {POOL_SIZE}\nquery_wait_timeout = \"60s\"\n\
         [[rule]]\nname = \"admins\"\nlisteners = [\"mtls\"]\nnames = [\"alice@example.com\"]\nadmin = true\n\
         [[rule]]\nname = \"others\"\n",
        tls = env.tls_toml(),
        ca = people_ca.display(),
        upstream = env.upstream_toml(),
        auth = auth_query_keys(&pw_file),
    ));
    let console_port = proxy
        .addrs
        .iter()
        .find_map(|(name, a)| match a {
            pgbastion::config::BindAddress::Tcp(a) if name == "mtls" => Some(a.port()),
            _ => None,
        })
        .expect("the mtls listener");
    let console_conninfo = format!(
        "host=localhost port={console_port} dbname=pgbastion user=admin sslmode=verify-full \
         sslrootcert={} sslcert={} sslkey={}",
        env.proxy_ca.display(),
        alice.0.display(),
        alice.1.display()
    );
    let console = |sql: &str| {
        let out = psql_without_password(&console_conninfo, sql);
        assert!(out.status.success(), "{sql}: {}", stderr(&out));
        stdout(&out)
    };
    let bench = {
        let addr = proxy.addr();
        std::thread::spawn(move || pgbench_at(addr, &["-c", "8", "-j", "8", "-T", "10"]))
    };
    // pgbench is running once the pool has connections.
    wait_for("pgbench to start", Duration::from_secs(20), || {
        (console("SHOW SERVERS").lines().count() > 1).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    console("PAUSE");
    env.pg.restart().expect("restart PostgreSQL");
    console("RESUME");
    let run = bench.join().unwrap();
    assert_eq!(run.failed, 0, "{}", run.output);
    assert!(run.processed > 0, "{}", run.output);
    assert!(
        !run.output.contains("aborted"),
        "a client aborted:\n{}",
        run.output
    );
}
