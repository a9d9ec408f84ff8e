//! The pooling comparison (issue 21): pgbastion pooling in transaction
//! mode (`auth = "scram"`, `pool_size = 20`) against PgBouncer in
//! transaction mode (TLS on both legs, a pool of 20) and a direct
//! connection, in the same rounds: `pgbench -S -c 64` (TPS, proxy CPU per
//! transaction), a `pgbench -S -C -c 8` connect storm (connections/s, and
//! how many sessions PostgreSQL itself started meanwhile: a pooler should
//! start almost none), and `pgbench -S -M prepared` (named prepared
//! statements, which PgBouncer 1.18 cannot pool: recorded as "fails").
//!
//! Also owns starting PgBouncer, since the harness runs it twice (session
//! mode for the main table, transaction mode here).

use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use pgbastion::dev::localpg::{free_port, LocalPg};

use super::{insecure_tls, which, Args, Bench, Proc, Results, Target};

/// Server connections per pool, for pgbastion and PgBouncer alike.
pub const POOL_SIZE: usize = 20;

/// The targets compared, in the table's order.
const TARGETS: [Target; 3] = [
    Target::Direct,
    Target::PgbastionPooled,
    Target::PgBouncerTransaction,
];

/// The `[[upstream]]` keys of the pooled pgbastion, after the scram keys.
pub fn pooled_upstream_keys() -> String {
    format!("pool_mode = \"transaction\"\npool_size = {POOL_SIZE}\n")
}

/// Where a PgBouncer listens and how it pools.
pub struct PgBouncerSetup<'a> {
    pub pg: &'a LocalPg,
    pub cert: &'a Path,
    pub key: &'a Path,
    /// The server's user (PgBouncer, like PostgreSQL, refuses root).
    pub owner: (u32, u32),
    /// `session` or `transaction`.
    pub mode: &'a str,
    pub pool: usize,
}

/// Starts PgBouncer: client TLS `require`, server TLS `verify-full`,
/// SCRAM against a userlist with the superuser's password. Returns the
/// process and its port once it listens.
pub fn start_pgbouncer(s: &PgBouncerSetup<'_>) -> Result<(Proc, u16)> {
    let dir = s.pg.dir();
    let port = free_port()?;
    let userlist = dir.join("userlist.txt");
    std::fs::write(&userlist, format!("\"postgres\" \"{}\"\n", s.pg.password))?;
    let ini = dir.join(format!("pgbouncer-{}.ini", s.mode));
    std::fs::write(
        &ini,
        format!(
            "[databases]\npostgres = host=localhost port={pgport} dbname=postgres\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = scram-sha-256\nauth_file = {userlist}\npool_mode = {mode}\n\
             max_client_conn = 2000\ndefault_pool_size = {pool}\nmax_db_connections = {pool}\n\
             client_tls_sslmode = require\nclient_tls_cert_file = {cert}\nclient_tls_key_file = {key}\n\
             server_tls_sslmode = verify-full\nserver_tls_ca_file = {ca}\n\
             logfile = {dir}/pgbouncer-{mode}.log\npidfile = {dir}/pgbouncer-{mode}.pid\n",
            pgport = s.pg.port,
            userlist = userlist.display(),
            mode = s.mode,
            pool = s.pool,
            cert = s.cert.display(),
            key = s.key.display(),
            ca = s.pg.ca_cert.display(),
            dir = dir.display(),
        ),
    )?;
    let (uid, gid) = s.owner;
    for p in [&userlist, &ini] {
        std::os::unix::fs::chown(p, Some(uid), Some(gid))?;
    }
    let child = Command::new(which("pgbouncer").context("pgbouncer")?)
        .arg(&ini)
        .uid(uid)
        .gid(gid)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting pgbouncer")?;
    let proc = Proc(child);
    super::wait_port(port, "pgbouncer")?;
    Ok((proc, port))
}

/// Reads `pg_stat_database.sessions` of the database `postgres` over one
/// direct connection, kept for the whole round so that it is not itself
/// counted between two readings.
struct SessionCount {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl SessionCount {
    fn connect(bench: &Bench) -> Result<SessionCount> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let conninfo = format!(
            "host=localhost port={} user=postgres dbname=postgres sslmode=require password={}",
            bench.pg.port, bench.pg.password
        );
        let client = rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&conninfo, insecure_tls()).await?;
            tokio::spawn(conn);
            // A backend reports its own connect when it first goes idle.
            client.simple_query("select 1").await?;
            anyhow::Ok(client)
        })?;
        Ok(SessionCount { rt, client })
    }

    fn read(&self) -> Result<f64> {
        self.rt.block_on(async {
            self.client
                .simple_query("select pg_stat_clear_snapshot()")
                .await?;
            let row = self
                .client
                .query_one(
                    "select sessions from pg_stat_database where datname = 'postgres'",
                    &[],
                )
                .await?;
            anyhow::Ok(row.get::<_, i64>(0) as f64)
        })
    }
}

/// Clients held open at once for the memory figure (and the "many
/// clients on a pool of 20" check): each logs in and runs `select 1`.
fn idle_clients(args: &Args) -> usize {
    if args.idle_sessions <= 50 {
        args.idle_sessions
    } else {
        1000
    }
}

/// One round of the pooling workloads against every target, interleaved.
pub fn round(bench: &Bench, args: &Args, r: &mut Results) -> Result<()> {
    let d = args.duration.to_string();
    // Memory once, before the workloads: every client idle after one
    // query, all of them on the pool's 20 server connections.
    if r.median("pooled idle", Target::PgbastionPooled, "kib_per_client")
        .is_none()
    {
        for t in [Target::PgbastionPooled, Target::PgBouncerTransaction] {
            match bench.idle_memory(t, idle_clients(args)) {
                Ok(kib) => r.add("pooled idle", t, "kib_per_client", kib),
                Err(e) => eprintln!("idle clients through {} failed: {e:#}", t.name()),
            }
        }
    }
    for &t in &TARGETS {
        let cpu_before = super::cpu_ticks(bench.pids.get(&t).copied());
        let out = bench.pgbench(t, &["-S", "-c", "64", "-j", "2", "-T", &d])?;
        let cpu_after = super::cpu_ticks(bench.pids.get(&t).copied());
        r.add("pooled select 64", t, "tps", out.tps);
        r.add("pooled select 64", t, "latency_ms", out.latency_ms);
        if let (Some((ua, sa)), Some((ub, sb))) = (cpu_before, cpu_after) {
            if out.transactions > 0 {
                let ticks = (ub - ua) + (sb - sa);
                let us = ticks as f64 * 1e6 / super::clk_tck() / out.transactions as f64;
                r.add("pooled select 64", t, "cpu_us_per_txn", us);
            }
        }
    }
    let counter = SessionCount::connect(bench)?;
    for &t in &TARGETS {
        let before = counter.read()?;
        let out = bench.pgbench(t, &["-S", "-C", "-c", "8", "-j", "2", "-T", &d])?;
        // Backends report their session at the latest as they exit.
        std::thread::sleep(Duration::from_millis(500));
        let after = counter.read()?;
        r.add("pooled connect", t, "tps", out.tps);
        r.add("pooled connect", t, "sessions", after - before);
    }
    drop(counter);
    for &t in &TARGETS {
        match bench.pgbench(t, &["-S", "-M", "prepared", "-c", "8", "-j", "2", "-T", &d]) {
            Ok(out) => r.add("pooled prepared", t, "tps", out.tps),
            // PgBouncer 1.18: "prepared statement P_0 already exists".
            Err(e) => {
                let first = format!("{e:#}");
                let line = first
                    .lines()
                    .find(|l| l.contains("error") || l.contains("ERROR"))
                    .unwrap_or("")
                    .trim()
                    .to_owned();
                eprintln!("pgbench -M prepared through {} failed: {line}", t.name());
                r.add("pooled prepared", t, "fails", 1.0);
            }
        }
    }
    Ok(())
}

/// The pooling section of the report.
pub fn report(r: &Results) -> Result<String> {
    let mut s = String::new();
    writeln!(
        s,
        "### Pooling (issue 21)\n\npgbastion (pooled): `pool_mode = \"transaction\"`, `pool_size = {POOL_SIZE}`, \
         `auth = \"scram\"` (verifier from `secrets_file`), audit log on, clients at libpq's default \
         channel binding (bound to pgbastion's certificate); PgBouncer (transaction): `pool_mode = \
         transaction`, `default_pool_size = {POOL_SIZE}`, client TLS `require`, server TLS `verify-full`. \
         Sessions started: `pg_stat_database.sessions` of the database before and after the storm.\n"
    )?;
    writeln!(
        s,
        "| workload | metric | direct | pgbastion (pooled) | pgbouncer (transaction) |"
    )?;
    writeln!(s, "|---|---|---|---|---|")?;
    let row = |s: &mut String, w: &str, label: &str, metric: &'static str, ratio: bool| {
        let base = r.median(w, Target::Direct, metric);
        let cells: Vec<String> = TARGETS
            .iter()
            .map(|&t| match (r.median(w, t, metric), base) {
                _ if r.median(w, t, "fails").is_some() => "fails".to_owned(),
                (Some(v), Some(b)) if ratio && t != Target::Direct && b > 0.0 => {
                    format!("{v:.1} ({:.2}x)", v / b)
                }
                (Some(v), _) => format!("{v:.1}"),
                (None, _) => "—".to_owned(),
            })
            .collect();
        writeln!(s, "| {w} | {label} | {} |", cells.join(" | "))
    };
    row(
        &mut s,
        "pooled select 64",
        "pgbench -S, 64 clients: TPS",
        "tps",
        true,
    )?;
    row(
        &mut s,
        "pooled select 64",
        "avg latency, ms",
        "latency_ms",
        true,
    )?;
    row(
        &mut s,
        "pooled select 64",
        "proxy CPU per transaction (64 clients), µs",
        "cpu_us_per_txn",
        false,
    )?;
    row(
        &mut s,
        "pooled connect",
        "pgbench -S -C, 8 clients: connections/s",
        "tps",
        true,
    )?;
    row(
        &mut s,
        "pooled connect",
        "... PostgreSQL sessions started during the storm",
        "sessions",
        false,
    )?;
    row(
        &mut s,
        "pooled prepared",
        "pgbench -S -M prepared, 8 clients: TPS",
        "tps",
        true,
    )?;
    writeln!(
        s,
        "| pooled idle | RSS per idle client (every one logged in and ran `select 1`; a pool of {POOL_SIZE}), KiB | {} |",
        TARGETS
            .iter()
            .map(|&t| r
                .median("pooled idle", t, "kib_per_client")
                .map_or("—".to_owned(), |v| format!("{v:.1}")))
            .collect::<Vec<_>>()
            .join(" | ")
    )?;
    let m = |w: &str, t, k| r.median(w, t, k).unwrap_or(f64::NAN);
    let (p, b) = (Target::PgbastionPooled, Target::PgBouncerTransaction);
    writeln!(
        s,
        "\nPooled pgbastion vs PgBouncer (transaction mode): 64 clients {:.2}x TPS, proxy CPU {:.1} vs \
         {:.1} µs per transaction; connect storm {:.2}x PgBouncer, {:.2}x direct.",
        m("pooled select 64", p, "tps") / m("pooled select 64", b, "tps"),
        m("pooled select 64", p, "cpu_us_per_txn"),
        m("pooled select 64", b, "cpu_us_per_txn"),
        m("pooled connect", p, "tps") / m("pooled connect", b, "tps"),
        m("pooled connect", p, "tps") / m("pooled connect", Target::Direct, "tps"),
    )?;
    Ok(s)
}
