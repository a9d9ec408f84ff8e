//! pgbastion's benchmark harness: one run sets up PostgreSQL (TLS, SCRAM),
//! pgbastion (client TLS, verify-full upstream TLS, audit log on), PgBouncer
//! (session mode, client TLS, verify-full server TLS) and HAProxy (TCP
//! passthrough: the client's TLS goes to PostgreSQL end to end), all on
//! loopback, then runs every workload against every target interleaved
//! (A B C D, A B C D, ...) so the machine's drift hits all alike, and prints
//! medians with each target's ratio to the direct connection.
//!
//! Run: `bash bench/run.sh` (see BENCHMARKS.md).
//! Only same-run ratios mean anything: client, proxies and server share the
//! machine's cores.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use pgbastion::dev::certs::Ca;
use pgbastion::dev::localpg::{free_port, LocalPg, LocalPgOptions};

mod chart;
mod faults;
mod pool;
mod relay;
mod routing;
mod serverless;

#[derive(Parser)]
#[command(
    about = "Benchmark pgbastion against a direct connection, PgBouncer and HAProxy, side by side."
)]
struct Args {
    /// Seconds per pgbench run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Interleaved rounds; medians are taken over them.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Rows in the COPY workload (1,000,000 rows of 1,000 bytes = 1 GB).
    #[arg(long, default_value_t = 1_000_000)]
    copy_rows: u64,
    /// Idle sessions held open for the memory measurement.
    #[arg(long, default_value_t = 300)]
    idle_sessions: usize,
    /// A fast smoke run (1 round, 2 s runs, small COPY, 50 idle sessions).
    #[arg(long)]
    quick: bool,
    /// The report is appended to this file (the history of runs is the
    /// record of what each change bought).
    #[arg(long, default_value = "BENCHMARKS.md")]
    output: PathBuf,
    /// A label for this run in the report (what was being tried).
    #[arg(long, default_value = "")]
    label: String,
    /// Tokio worker threads for pgbastion (TOKIO_WORKER_THREADS); default:
    /// pgbastion's own default.
    #[arg(long)]
    workers: Option<usize>,
    /// `pgbastion run --runtime` for this build's instances (not the
    /// baseline binary's, which may predate the flag): shared or per-core.
    #[arg(long)]
    runtime: Option<String>,
    /// Instead of the benchmark: a soak of this many minutes. Steady load
    /// through pgbastion plus reconnect churn through pgbastion (scram),
    /// RSS and open files of both sampled every 30 s, PostgreSQL stopped
    /// with SIGSTOP for 20 s a third of the way in; fails on growth.
    #[arg(long)]
    soak: Option<u64>,
    /// Instead of the benchmark: the fault drills (see bench/faults.rs):
    /// PostgreSQL restarted and frozen, the LocalAPI and the audit reader
    /// stalled, and what clients saw during each.
    #[arg(long, conflicts_with = "soak")]
    faults: bool,
    /// Another pgbastion binary (e.g. the previous release) run beside this
    /// one with the same configuration and measured in the same rounds, so
    /// a change's cost is a same-run ratio, not a comparison across runs.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Only the pooling comparison (issue 21, see bench/pool.rs): pooled
    /// pgbastion vs PgBouncer in transaction mode vs direct.
    #[arg(long, conflicts_with_all = ["soak", "faults"])]
    pooling: bool,
    /// Only the routing comparison (issue 22, see bench/routing.rs): one
    /// route vs 10,000 exact routes and a wildcard, session setup.
    #[arg(long, conflicts_with_all = ["soak", "faults", "pooling"])]
    routing: bool,
    /// Only the serverless comparison (issue 23, see bench/serverless.rs):
    /// SQL over HTTP and WebSocket sessions on the https listener vs the
    /// TCP listener and direct.
    #[arg(long, conflicts_with_all = ["soak", "faults", "pooling", "routing"])]
    serverless: bool,
    /// Only the relay-cost rounds (issue 24, see bench/relay.rs): pgbench
    /// -S at 1, 8 and 64 clients through every proxy, CPU per transaction,
    /// latency percentiles, memory per idle session and the chart.
    #[arg(long, conflicts_with_all = ["soak", "faults", "pooling", "routing", "serverless"])]
    relay: bool,
    /// With the benchmark: profile pgbastion (and the baseline binary)
    /// with `perf record -g` during each 8-client run, and write flame
    /// graphs (`inferno`, if installed) into this directory.
    #[arg(long)]
    perf: Option<PathBuf>,
    /// With the relay rounds: also measure the relay floor, bench/probe's
    /// minimal TLS relay with epoll and with io_uring (the
    /// `relay-probe` example, built by bench/run.sh).
    #[arg(long)]
    probes: bool,
}

/// What is measured through.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Target {
    Direct,
    Pgbastion,
    PgBouncer,
    HAProxy,
    /// pgbastion with the audit log off, for the audit-cost comparison.
    PgbastionNoAudit,
    /// pgbastion terminating SCRAM (auth = "scram", verifier from a
    /// secrets file), clients at libpq's defaults: both legs channel-bound.
    PgbastionScram,
    /// pgbastion with `[cluster]` (a Redis on loopback), for the cost of
    /// publishing cancel mappings.
    PgbastionCluster,
    /// A second instance of that fleet: cancels sent here for sessions
    /// of the first are looked up in Redis (cancel latency only).
    PgbastionClusterPeer,
    /// pgbastion with a rule `audit_queries = "statements"`: a `query`
    /// event per statement, redacted.
    PgbastionQueries,
    /// The `--baseline` binary, configured exactly like `Pgbastion`.
    Baseline,
    /// pgbastion pooling server connections (issue 21): scram, transaction
    /// mode, `pool::POOL_SIZE` connections.
    PgbastionPooled,
    /// PgBouncer in transaction mode with the same pool size.
    PgBouncerTransaction,
    /// pgbastion with a single `[[route]]` (issue 22, bench/routing.rs).
    PgbastionOneRoute,
    /// pgbastion with 10,000 exact routes and a wildcard route.
    PgbastionRoutes,
    /// pgbastion's https listener (issue 23, bench/serverless.rs): SQL
    /// over HTTP and WebSocket sessions.
    PgbastionHttps,
    /// The relay floor with tokio's epoll reactor (bench/probe, `--probes`).
    ProbeEpoll,
    /// The relay floor with io_uring.
    ProbeUring,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Pgbastion => "pgbastion",
            Target::PgBouncer => "pgbouncer",
            Target::HAProxy => "haproxy",
            Target::PgbastionNoAudit => "pgbastion (audit off)",
            Target::PgbastionScram => "pgbastion (scram)",
            Target::PgbastionCluster => "pgbastion (cluster)",
            Target::PgbastionClusterPeer => "pgbastion (cluster, other instance)",
            Target::PgbastionQueries => "pgbastion (query audit)",
            Target::Baseline => "pgbastion (baseline binary)",
            Target::PgbastionPooled => "pgbastion (pooled)",
            Target::PgBouncerTransaction => "pgbouncer (transaction)",
            Target::PgbastionOneRoute => "pgbastion (1 route)",
            Target::PgbastionRoutes => "pgbastion (10,000 routes)",
            Target::PgbastionHttps => "pgbastion (https listener)",
            Target::ProbeEpoll => "floor (epoll)",
            Target::ProbeUring => "floor (io_uring)",
        }
    }
}

/// `pgbastion run --config CFG`, quiet, with `workers` runtime threads
/// when given.
fn spawn_pgbastion(
    exe: &std::path::Path,
    cfg: &std::path::Path,
    workers: Option<usize>,
    runtime: Option<&str>,
) -> Result<Child> {
    let mut cmd = Command::new(exe);
    if let Some(n) = workers {
        cmd.env("TOKIO_WORKER_THREADS", n.to_string());
    }
    cmd.args(["run", "--config"]).arg(cfg);
    if let Some(r) = runtime {
        cmd.args(["--runtime", r]);
    }
    cmd.env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))
}

/// A process started for the benchmark, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Bench {
    pg: LocalPg,
    ports: BTreeMap<Target, u16>,
    pids: BTreeMap<Target, u32>,
    _procs: Vec<Proc>,
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.duration = 2;
        args.rounds = 1;
        args.copy_rows = 50_000;
        args.idle_sessions = 50;
    }
    for tool in ["pgbench", "psql", "pgbouncer", "haproxy", "redis-server"] {
        if which(tool).is_none() {
            bail!("{tool} is not installed; on Debian/Ubuntu: apt-get install -y postgresql postgresql-client pgbouncer haproxy redis-server");
        }
    }
    let (report, soak_failed) = if args.faults {
        (faults::run(&args.label)?, false)
    } else {
        eprintln!("setting up PostgreSQL, pgbastion, PgBouncer, HAProxy and Redis...");
        let bench = Bench::setup(&args)?;
        match args.soak {
            Some(minutes) => bench.soak(minutes, &args.label)?,
            None => (report(&args, &bench.run(&args)?)?, false),
        }
    };
    print!("{report}");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.output)
            .with_context(|| format!("opening {}", args.output.display()))?;
        writeln!(f, "\n{report}")?;
    }
    eprintln!("written to {}", args.output.display());
    if soak_failed {
        bail!("the soak found growth (see the report)");
    }
    Ok(())
}

/// A report's heading: "## KIND of TIME: WHAT, LABEL" and a blank line.
fn heading(kind: &str, what: &str, label: &str) -> String {
    let rest: Vec<&str> = [what, label]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect();
    format!(
        "## {kind} of {}{}\n\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        if rest.is_empty() {
            String::new()
        } else {
            format!(": {}", rest.join(", "))
        }
    )
}

/// Open file descriptors of a process.
fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// A process and its children (PostgreSQL's postmaster and backends).
fn with_children(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let ppid = std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|st| {
                    let rest = st.get(st.rfind(')')? + 2..)?.to_owned();
                    rest.split(' ').nth(1)?.parse::<u32>().ok()
                });
            if ppid == Some(pid) {
                out.push(child);
            }
        }
    }
    out
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.exists())
}

/// The uid/gid of the directory the server runs in: PgBouncer, like
/// PostgreSQL, refuses to run as root, so it runs as the same user.
fn owner(dir: &Path) -> Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir)?;
    Ok((m.uid(), m.gid()))
}

fn wait_port(port: u16, what: &str) -> Result<()> {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(15) {
            bail!("{what} did not listen on port {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

impl Bench {
    fn setup(args: &Args) -> Result<Bench> {
        // PgBouncer keeps its pooled server connections after its clients
        // leave, so leave room for two sets of idle sessions at once.
        let max_conn = 2 * args.idle_sessions + 200;
        let pg = LocalPg::start(LocalPgOptions {
            extra_conf: vec![
                format!("max_connections = {max_conn}"),
                "shared_buffers = '128MB'".into(),
            ],
            ..LocalPgOptions::default()
        })?;
        let dir = pg.dir().to_owned();
        let (uid, gid) = owner(&dir)?;
        let conn = format!(
            "host=localhost port={} user=postgres dbname=postgres sslmode=require",
            pg.port
        );
        run_ok(
            Command::new("pgbench")
                .args(["-i", "-q", "-s", "10", &conn])
                .env("PGPASSWORD", &pg.password),
            "pgbench -i",
        )?;

        let ca = Ca::new("pgbastion bench CA")?;
        let (cert, key) = ca
            .server_cert(&["localhost", "127.0.0.1"])?
            .write(&dir, "proxy")?;
        for p in [&cert, &key] {
            std::os::unix::fs::chown(p, Some(uid), Some(gid))?;
        }
        let mut ports = BTreeMap::new();
        let mut pids = BTreeMap::new();
        let mut procs = Vec::new();
        ports.insert(Target::Direct, pg.port);

        // pgbastion, as its own process (release build beside this one).
        // target/release/examples/bench -> target/release/pgbastion
        let exe = std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .context("the harness lives in target/<profile>/examples")?
            .join("pgbastion");
        // scram mode reads the server's own verifier from a secrets file.
        let secrets = dir.join("pgbastion-userlist.txt");
        let verifier = Command::new("psql")
            .args(["-X", "-A", "-t", "-d", &conn, "-c"])
            .arg("select rolpassword from pg_authid where rolname = 'postgres'")
            .env("PGPASSWORD", &pg.password)
            .output()
            .context("reading the postgres verifier")?;
        let verifier = String::from_utf8_lossy(&verifier.stdout).trim().to_owned();
        if !verifier.starts_with("SCRAM-SHA-256$") {
            bail!("the postgres role has no SCRAM verifier: {verifier:?}");
        }
        // A secrets file others may read is refused, like every secret.
        pgbastion::dev::certs::write_private(
            &secrets,
            format!("\"postgres\" \"{verifier}\"\n").as_bytes(),
        )?;
        let audit_file = dir.join("audit.jsonl").display().to_string();
        let scram = format!(
            "auth = \"scram\"\nsecrets_file = \"{}\"\n",
            secrets.display()
        );
        let pooled = format!("{scram}{}", pool::pooled_upstream_keys());
        // Redis for the fleet (no persistence), as the server's user.
        let redis_port = free_port()?;
        let child = Command::new(which("redis-server").context("redis-server")?)
            .args(["--bind", "127.0.0.1", "--port", &redis_port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&dir)
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        procs.push(Proc(child));
        wait_port(redis_port, "redis-server")?;
        let cluster_key = dir.join("cluster.key");
        pgbastion::dev::certs::write_private(
            &cluster_key,
            b"bench fleet secret, 32 bytes or more\n",
        )?;
        let cluster = |instance: &str| {
            format!(
                "[cluster]\nredis = \"redis://127.0.0.1:{redis_port}/0\"\ninstance = \"{instance}\"\nsecret_file = \"{}\"\n",
                cluster_key.display()
            )
        };
        let mut instances = vec![
            (
                Target::Pgbastion,
                audit_file.clone(),
                String::new(),
                String::new(),
            ),
            (
                Target::PgbastionNoAudit,
                "off".to_owned(),
                String::new(),
                String::new(),
            ),
            (
                Target::PgbastionScram,
                audit_file.clone(),
                scram,
                String::new(),
            ),
            (
                Target::PgbastionPooled,
                audit_file.clone(),
                pooled,
                String::new(),
            ),
            (
                Target::PgbastionCluster,
                audit_file.clone(),
                String::new(),
                cluster("bench-a"),
            ),
            (
                Target::PgbastionClusterPeer,
                audit_file.clone(),
                String::new(),
                cluster("bench-b"),
            ),
            (
                Target::PgbastionQueries,
                dir.join("audit-queries.jsonl").display().to_string(),
                String::new(),
                "[[rule]]\nname = \"all\"\naudit_queries = \"statements\"\n".to_owned(),
            ),
        ];
        if args.baseline.is_some() {
            let audit = dir.join("audit-baseline.jsonl").display().to_string();
            instances.push((Target::Baseline, audit, String::new(), String::new()));
        }
        for (target, audit, upstream_keys, extra) in instances {
            let port = free_port()?;
            let cfg = dir.join(format!("pgbastion-{port}.toml"));
            std::fs::write(
                &cfg,
                format!(
                    "[tls]\ncert = \"{}\"\nkey = \"{}\"\n[[listener]]\nlisten = \"127.0.0.1:{port}\"\n\
                     [[upstream]]\naddress = \"localhost:{}\"\nca_file = \"{}\"\n{upstream_keys}[audit]\nlog = \"{audit}\"\n\
                     [limits]\nmax_sessions = 2000\nmax_pending = 2000\n\
                     [auth]\nmock_key_file = \"{}\"\n{extra}",
                    cert.display(),
                    key.display(),
                    pg.port,
                    pg.ca_cert.display(),
                    dir.join("mock_key").display()
                ),
            )?;
            let (exe, runtime) = match (target, &args.baseline) {
                (Target::Baseline, Some(baseline)) => (baseline.clone(), None),
                _ => (exe.clone(), args.runtime.as_deref()),
            };
            let child = spawn_pgbastion(&exe, &cfg, args.workers, runtime)?;
            pids.insert(target, child.id());
            procs.push(Proc(child));
            wait_port(port, "pgbastion")?;
            ports.insert(target, port);
        }

        // PgBouncer: session pooling, TLS both ways, verify-full upstream;
        // and in transaction mode for the pooling comparison.
        for (target, mode, size) in [
            (Target::PgBouncer, "session", args.idle_sessions + 80),
            (Target::PgBouncerTransaction, "transaction", pool::POOL_SIZE),
        ] {
            let (proc, port) = pool::start_pgbouncer(&pool::PgBouncerSetup {
                pg: &pg,
                cert: &cert,
                key: &key,
                owner: (uid, gid),
                mode,
                pool: size,
            })?;
            pids.insert(target, proc.0.id());
            procs.push(proc);
            ports.insert(target, port);
        }

        // HAProxy: plain TCP passthrough to PostgreSQL.
        let port = free_port()?;
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  \
                 timeout server 1h\nfrontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n\
                 backend be\n  server pg 127.0.0.1:{}\n",
                pg.port
            ),
        )?;
        let child = Command::new(which("haproxy").context("haproxy")?)
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting haproxy")?;
        pids.insert(Target::HAProxy, child.id());
        procs.push(Proc(child));
        wait_port(port, "haproxy")?;
        ports.insert(Target::HAProxy, port);

        if args.probes {
            let exe = exe.with_file_name("examples").join("relay-probe");
            for (target, io) in [(Target::ProbeEpoll, "epoll"), (Target::ProbeUring, "uring")] {
                let port = free_port()?;
                let child = relay::start_probe(&exe, io, port, &pg, (&cert, &key))?;
                pids.insert(target, child.id());
                procs.push(Proc(child));
                wait_port(port, target.name())?;
                ports.insert(target, port);
            }
        }

        Ok(Bench {
            pg,
            ports,
            pids,
            _procs: procs,
        })
    }

    /// The soak (see `Args::soak`). Returns the report and whether it
    /// found growth.
    fn soak(&self, minutes: u64, label: &str) -> Result<(String, bool)> {
        use std::fmt::Write;
        let secs = (minutes * 60).max(90);
        let spawn = |target: Target, extra: &[&str], log: &Path, secs: u64| -> Result<Proc> {
            Ok(Proc(
                Command::new("pgbench")
                    .arg("-n")
                    .args(extra)
                    .args(["-T", &secs.to_string()])
                    .arg(self.conninfo(target))
                    .env("PGPASSWORD", &self.pg.password)
                    .stdout(std::fs::File::create(log)?)
                    .stderr(std::fs::File::create(log.with_extension("err"))?)
                    .spawn()
                    .context("starting pgbench")?,
            ))
        };
        let dir = self.pg.dir().to_owned();
        let steady_log = dir.join("soak-steady.log");
        let churn_args = ["-S", "-C", "-c", "2", "-j", "1"];
        let churn_log = |n: usize| dir.join(format!("soak-churn-{n}.log"));
        let mut steady = spawn(
            Target::Pgbastion,
            &["-S", "-c", "4", "-j", "2"],
            &steady_log,
            secs,
        )?;
        let mut churn = spawn(Target::PgbastionScram, &churn_args, &churn_log(0), secs)?;
        // pgbench gives up on a client whose connection fails (as during
        // the fault): the churn is started again for the time left.
        let mut churn_runs = 1;
        let pids = [
            ("pgbastion", self.pids[&Target::Pgbastion]),
            ("pgbastion (scram)", self.pids[&Target::PgbastionScram]),
        ];
        let postmaster: u32 = std::fs::read_to_string(dir.join("data/postmaster.pid"))?
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .context("postmaster.pid")?;
        let start = Instant::now();
        let mut samples: Vec<(u64, Vec<(u64, usize)>)> = Vec::new();
        let mut stopped = false;
        let sample = |at: u64| -> Result<(u64, Vec<(u64, usize)>)> {
            let mut v = Vec::new();
            for (_, pid) in pids {
                v.push((rss_kib(pid)?, open_fds(pid)?));
            }
            Ok((at, v))
        };
        while start.elapsed().as_secs() < secs {
            std::thread::sleep(
                Duration::from_secs(30)
                    .min(Duration::from_secs(secs).saturating_sub(start.elapsed())),
            );
            let at = start.elapsed().as_secs();
            samples.push(sample(at)?);
            if churn.0.try_wait()?.is_some() && secs.saturating_sub(at) > 15 {
                churn = spawn(
                    Target::PgbastionScram,
                    &churn_args,
                    &churn_log(churn_runs),
                    secs - at,
                )?;
                churn_runs += 1;
            }
            eprintln!("soak: {at} s: {:?}", samples.last().map(|s| &s.1));
            if !stopped && at >= secs / 3 {
                stopped = true;
                let procs = with_children(postmaster);
                eprintln!(
                    "soak: stopping PostgreSQL ({} processes) for 20 s",
                    procs.len()
                );
                for p in &procs {
                    let _ = Command::new("kill")
                        .args(["-STOP", &p.to_string()])
                        .status();
                }
                std::thread::sleep(Duration::from_secs(20));
                for p in &procs {
                    let _ = Command::new("kill")
                        .args(["-CONT", &p.to_string()])
                        .status();
                }
            }
        }
        let _ = steady.0.wait();
        let _ = churn.0.wait();
        // The load is over: what is left is what pgbastion keeps.
        std::thread::sleep(Duration::from_secs(5));
        let after = sample(start.elapsed().as_secs())?;

        let mut s = String::new();
        s.push_str(&heading("Soak", &format!("{minutes} minute(s)"), label));
        writeln!(s, "Steady load: `pgbench -S -c 4` through pgbastion (passthrough); churn: `pgbench -S -C -c 2` (a new connection per transaction) through pgbastion (scram); PostgreSQL stopped with SIGSTOP for 20 s at {} s.\n", secs / 3)?;
        writeln!(
            s,
            "| t (s) | pgbastion RSS KiB | open files | pgbastion (scram) RSS KiB | open files |"
        )?;
        writeln!(s, "|---|---|---|---|---|")?;
        for (at, v) in samples.iter().chain([&after]) {
            writeln!(
                s,
                "| {at} | {} | {} | {} | {} |",
                v[0].0, v[0].1, v[1].0, v[1].1
            )?;
        }
        // Growth: the last sample under load against the first one after a
        // minute of warm-up, and what is left once the load is gone.
        let base = samples.iter().find(|(at, _)| *at >= 60).or(samples.first());
        let last = samples.last();
        let mut failed = false;
        if let (Some((_, b)), Some((_, l))) = (base, last) {
            for (i, (name, _)) in pids.iter().enumerate() {
                let grew = l[i].0 as f64 > b[i].0 as f64 * 1.3 + 4096.0 || l[i].1 > b[i].1 + 16;
                let leaked = after.1[i].1 > b[i].1 + 16;
                writeln!(
                    s,
                    "\n{name}: RSS {} -> {} KiB under load, {} KiB after; open files {} -> {}, {} after: {}",
                    b[i].0,
                    l[i].0,
                    after.1[i].0,
                    b[i].1,
                    l[i].1,
                    after.1[i].1,
                    if grew || leaked { "GROWTH" } else { "no growth" }
                )?;
                failed |= grew || leaked;
            }
        }
        writeln!(
            s,
            "\nchurn ran as {churn_runs} pgbench run(s) (restarted after its clients gave up); the last:"
        )?;
        for (what, log) in [
            ("steady", steady_log.clone()),
            ("churn", churn_log(churn_runs - 1)),
        ] {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let errors = std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
            let pick = |p: &str| {
                text.lines()
                    .find(|l| l.trim_start().starts_with(p))
                    .map(|l| l.trim().to_owned())
                    .unwrap_or_default()
            };
            let first_error = errors
                .lines()
                .find(|l| l.contains("error") || l.contains("abort"));
            writeln!(
                s,
                "\n{what}: {}; {}; {}; error lines: {}{}",
                pick("number of transactions actually processed"),
                pick("number of failed transactions"),
                pick("tps"),
                errors
                    .lines()
                    .filter(|l| l.contains("error") || l.contains("abort"))
                    .count(),
                first_error
                    .map(|e| format!(" (first: `{}`)", e.trim()))
                    .unwrap_or_default()
            )?;
        }
        Ok((s, failed))
    }

    fn conninfo(&self, target: Target) -> String {
        // scram mode needs no client setting: libpq's default
        // channel_binding=prefer binds to pgbastion's certificate.
        let binding = match target {
            Target::PgbastionScram | Target::PgbastionPooled => "",
            _ => " channel_binding=disable",
        };
        format!(
            "host=localhost port={} user=postgres dbname=postgres sslmode=require{binding}",
            self.ports[&target]
        )
    }

    fn run(&self, args: &Args) -> Result<Results> {
        if args.routing {
            return routing::run(self, args);
        }
        if args.serverless {
            return serverless::run(self, args);
        }
        let mut r = Results::default();
        let main = [
            Target::Direct,
            Target::Pgbastion,
            Target::PgBouncer,
            Target::HAProxy,
        ];
        let baseline = self.ports.contains_key(&Target::Baseline);
        let probes: Vec<Target> = [Target::ProbeEpoll, Target::ProbeUring]
            .into_iter()
            .filter(|t| self.ports.contains_key(t))
            .collect();
        // Every target answers before anything is measured.
        for t in main
            .iter()
            .chain([
                &Target::PgbastionNoAudit,
                &Target::PgbastionScram,
                &Target::PgbastionCluster,
                &Target::PgbastionQueries,
                &Target::PgbastionPooled,
                &Target::PgBouncerTransaction,
            ])
            .chain(baseline.then_some(&Target::Baseline))
            .chain(&probes)
        {
            self.pgbench(*t, &["-S", "-c", "1", "-t", "10"])
                .with_context(|| format!("{} does not work", t.name()))?;
        }
        if args.pooling {
            for round in 0..args.rounds {
                eprintln!("pooling: round {} of {}", round + 1, args.rounds);
                pool::round(self, args, &mut r)?;
            }
            return Ok(r);
        }
        // Memory first, while every pool is fresh (PgBouncer last: it keeps
        // its server connections after the clients leave).
        let memory = [Target::Pgbastion, Target::HAProxy]
            .into_iter()
            .chain(baseline.then_some(Target::Baseline))
            .chain(probes.iter().copied())
            .chain([Target::PgBouncer]);
        for t in memory {
            match self.idle_memory(t, args.idle_sessions) {
                Ok(kib) => r.add("memory", t, "kib_per_session", kib),
                Err(e) => eprintln!("memory measurement through {} failed: {e:#}", t.name()),
            }
        }
        let d = args.duration.to_string();
        let logs = tempfile::tempdir()?;
        for round in 0..args.rounds {
            eprintln!("round {} of {}", round + 1, args.rounds);
            for (clients, jobs) in [(1, 1), (8, 2), (64, 2)] {
                let mut targets = main.to_vec();
                if args.relay {
                    // Only the proxies the relay is compared with.
                } else if clients == 8 {
                    targets.extend([
                        Target::PgbastionNoAudit,
                        Target::PgbastionCluster,
                        Target::PgbastionQueries,
                    ]);
                }
                if clients == 1 && !args.relay {
                    targets.push(Target::PgbastionQueries);
                }
                if baseline && (clients != 64 || args.relay) {
                    targets.push(Target::Baseline);
                }
                targets.extend(&probes);
                for &t in &targets {
                    let profile = match &args.perf {
                        Some(dir) if clients == 8 && relay::profiled(t) => {
                            Some(relay::Profile::start(dir, t, self.pids[&t], args.duration)?)
                        }
                        _ => None,
                    };
                    self.select_run(&mut r, t, clients, jobs, &d, logs.path())?;
                    if let Some(p) = profile {
                        p.finish()?;
                    }
                }
            }
            if args.relay {
                continue;
            }
            for &t in main
                .iter()
                .chain([&Target::PgbastionScram, &Target::PgbastionCluster])
            {
                let out = self.pgbench(t, &["-S", "-C", "-c", "8", "-j", "2", "-T", &d])?;
                r.add("connect", t, "tps", out.tps);
            }
            // Cancel latency: a session's pg_sleep cancelled through the
            // server itself, pgbastion, the session's own instance of the
            // fleet, and the other instance (a Redis lookup).
            for (session, cancel_at) in [
                (Target::Direct, Target::Direct),
                (Target::Pgbastion, Target::Pgbastion),
                (Target::PgbastionCluster, Target::PgbastionCluster),
                (Target::PgbastionCluster, Target::PgbastionClusterPeer),
            ] {
                match self.cancel_latency(session, cancel_at, 10) {
                    Ok(times) => {
                        for ms in times {
                            r.add("cancel", cancel_at, "ms", ms);
                        }
                    }
                    // One odd measurement must not cost the whole run.
                    Err(e) => eprintln!("cancel latency via {}: {e:#}", cancel_at.name()),
                }
            }
            for &t in &main {
                let secs = self.copy(t, args.copy_rows)?;
                let mb = args.copy_rows as f64 * 1001.0 / 1e6;
                r.add("copy", t, "seconds", secs);
                r.add("copy", t, "mb_per_s", mb / secs);
            }
            pool::round(self, args, &mut r)?;
        }
        Ok(r)
    }

    /// One `pgbench -S` run at `clients`: TPS, average latency and the
    /// proxy's CPU per transaction (user and system), and at 1 client the
    /// latency percentiles from pgbench's per-transaction log.
    fn select_run(
        &self,
        r: &mut Results,
        t: Target,
        clients: usize,
        jobs: usize,
        seconds: &str,
        logs: &Path,
    ) -> Result<()> {
        let workload = format!("select {clients}");
        let (c, j) = (clients.to_string(), jobs.to_string());
        let mut extra: Vec<String> = ["-S", "-c", &c, "-j", &j, "-T", seconds]
            .map(String::from)
            .to_vec();
        if clients == 1 {
            extra.extend(relay::latency_log_args(logs));
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let cpu_before = cpu_ticks(self.pids.get(&t).copied());
        let out = self.pgbench(t, &extra)?;
        let cpu_after = cpu_ticks(self.pids.get(&t).copied());
        r.add(&workload, t, "tps", out.tps);
        r.add(&workload, t, "latency_ms", out.latency_ms);
        if clients == 1 {
            let lat = relay::take_latencies(logs)?;
            if let (Some(p50), Some(p99)) =
                (relay::quantile(&lat, 0.5), relay::quantile(&lat, 0.99))
            {
                r.add(&workload, t, "p50_us", p50);
                r.add(&workload, t, "p99_us", p99);
            }
        }
        if let (Some((ua, sa)), Some((ub, sb))) = (cpu_before, cpu_after) {
            if out.transactions > 0 {
                let tck = clk_tck();
                let per_txn = |ticks: u64| ticks as f64 * 1e6 / tck / out.transactions as f64;
                r.add(
                    &workload,
                    t,
                    "cpu_us_per_txn",
                    per_txn((ub - ua) + (sb - sa)),
                );
                r.add(&workload, t, "user_us_per_txn", per_txn(ub - ua));
                r.add(&workload, t, "sys_us_per_txn", per_txn(sb - sa));
            }
        }
        Ok(())
    }

    fn pgbench(&self, target: Target, extra: &[&str]) -> Result<PgbenchOut> {
        let out = Command::new("pgbench")
            .arg("-n")
            .args(extra)
            .arg(self.conninfo(target))
            .env("PGPASSWORD", &self.pg.password)
            .output()
            .context("running pgbench")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "pgbench against {} failed: {}{}",
                target.name(),
                text,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        PgbenchOut::parse(&text).with_context(|| format!("reading pgbench output:\n{text}"))
    }

    fn copy(&self, target: Target, rows: u64) -> Result<f64> {
        let sql =
            format!("COPY (SELECT repeat('x', 1000) FROM generate_series(1, {rows})) TO STDOUT");
        let start = Instant::now();
        let out = Command::new("psql")
            .args(["-X", "-q", "-d", &self.conninfo(target), "-c", &sql])
            .env("PGPASSWORD", &self.pg.password)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()?;
        let secs = start.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!(
                "COPY via {} failed: {}",
                target.name(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(secs)
    }

    /// Runs `select pg_sleep(30)` in a session through `session` and
    /// cancels it `n` times by a plaintext CancelRequest (as psql sends)
    /// to `cancel_at`; returns the milliseconds from sending each cancel
    /// to the query's end.
    fn cancel_latency(&self, session: Target, cancel_at: Target, n: usize) -> Result<Vec<f64>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // sslmode=prefer: the session uses TLS; the cancel token may
        // still send its request in plaintext.
        let conninfo = format!(
            "{} password={}",
            self.conninfo(session)
                .replace("sslmode=require", "sslmode=prefer"),
            self.pg.password
        );
        let port = self.ports[&cancel_at];
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&conninfo, insecure_tls()).await?;
            tokio::spawn(conn);
            let client = std::sync::Arc::new(client);
            let token = client.cancel_token();
            let pid: i32 = client.query_one("select pg_backend_pid()", &[]).await?.get(0);
            let (watcher, conn) = tokio_postgres::connect(
                &format!(
                    "host=localhost port={} user=postgres dbname=postgres sslmode=require password={}",
                    self.pg.port, self.pg.password
                ),
                insecure_tls(),
            )
            .await?;
            tokio::spawn(conn);
            let mut times = Vec::with_capacity(n);
            for _ in 0..n {
                let running = client.clone();
                let query =
                    tokio::spawn(async move { running.simple_query("select pg_sleep(30)").await });
                // Until the server runs it (polling, as psql's user would
                // press Ctrl-C on a running query). A query that ended
                // already (a late cancel hit it) is a failed measurement.
                let waited = Instant::now();
                loop {
                    if query.is_finished() {
                        bail!("the query through {} ended before it was cancelled (a stray cancel?)", cancel_at.name());
                    }
                    if waited.elapsed() > Duration::from_secs(10) {
                        bail!("the query through {} did not start within 10 s", session.name());
                    }
                    let active: bool = watcher
                        .query_one(
                            "select count(*) = 1 from pg_stat_activity where pid = $1 and state = 'active'",
                            &[&pid],
                        )
                        .await?
                        .get(0);
                    if active {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let started = Instant::now();
                let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                token.cancel_query_raw(stream, tokio_postgres::NoTls).await?;
                let ended = tokio::time::timeout(Duration::from_secs(10), query).await;
                let ms = started.elapsed().as_secs_f64() * 1e3;
                match ended {
                    Ok(Ok(Err(e))) if e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) => {
                        times.push(ms)
                    }
                    other => bail!(
                        "a cancel through {} did not cancel the query: {other:?}",
                        cancel_at.name()
                    ),
                }
            }
            anyhow::Ok(times)
        })
    }

    /// Holds `n` authenticated idle TLS sessions through a proxy and
    /// returns its RSS increase per session, in KiB.
    fn idle_memory(&self, target: Target, n: usize) -> Result<f64> {
        let pid = self.pids[&target];
        let before = rss_kib(pid)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let conninfo = format!("{} password={}", self.conninfo(target), self.pg.password);
        let after = rt.block_on(async {
            let mut held = Vec::with_capacity(n);
            for _ in 0..n {
                let (client, conn) = tokio_postgres::connect(&conninfo, insecure_tls()).await?;
                let task = tokio::spawn(conn);
                client.simple_query("select 1").await?;
                held.push((client, task));
            }
            // Let the proxy settle, then read its RSS while all are open.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = rss_kib(pid);
            drop(held);
            anyhow::Ok(after)
        })??;
        Ok((after.saturating_sub(before)) as f64 / n as f64)
    }
}

/// TLS for the memory clients: encrypted like the pgbench clients'
/// sslmode=require, without verification (what is measured is the proxy).
fn insecure_tls() -> tokio_postgres_rustls::MakeRustlsConnect {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    #[derive(Debug)]
    struct AcceptAny(std::sync::Arc<rustls::crypto::CryptoProvider>);
    impl ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    tokio_postgres_rustls::MakeRustlsConnect::new(config)
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

struct PgbenchOut {
    tps: f64,
    latency_ms: f64,
    transactions: u64,
}

impl PgbenchOut {
    fn parse(text: &str) -> Result<PgbenchOut> {
        let find = |prefix: &str| -> Option<&str> {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(prefix))
                .map(|rest| {
                    rest.trim_start_matches([' ', '=', ':'])
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                })
        };
        Ok(PgbenchOut {
            tps: find("tps").context("no tps line")?.parse()?,
            latency_ms: find("latency average")
                .context("no latency line")?
                .parse()?,
            transactions: find("number of transactions actually processed")
                .context("no transactions line")?
                .split('/')
                .next()
                .unwrap_or("0")
                .parse()?,
        })
    }
}

/// (user, system) CPU ticks of a process (all threads), from /proc/PID/stat.
fn cpu_ticks(pid: Option<u32>) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

/// Samples by workload, target and metric.
#[derive(Default)]
struct Results(BTreeMap<(String, Target, &'static str), Vec<f64>>);

impl Results {
    fn add(&mut self, workload: &str, t: Target, metric: &'static str, v: f64) {
        self.0
            .entry((workload.to_owned(), t, metric))
            .or_default()
            .push(v);
    }

    fn median(&self, workload: &str, t: Target, metric: &'static str) -> Option<f64> {
        let mut v = self.0.get(&(workload.to_owned(), t, metric))?.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        Some(v[v.len() / 2])
    }
}

fn version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_else(|_| "unknown".into())
}

fn report(args: &Args, r: &Results) -> Result<String> {
    use std::fmt::Write;
    let main = [
        Target::Direct,
        Target::Pgbastion,
        Target::PgBouncer,
        Target::HAProxy,
    ];
    let mut s = String::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    s.push_str(&heading("Run", "", &args.label));
    writeln!(
        s,
        "- machine: {cores} cores, {cpu}; client, proxies and server share them"
    )?;
    writeln!(
        s,
        "- versions: pgbastion {}; {}; {}; {}; {}",
        env!("CARGO_PKG_VERSION"),
        version("postgres", "--version").replace("postgres (PostgreSQL)", "PostgreSQL"),
        version("pgbench", "--version"),
        version(
            which("pgbouncer")
                .map(|p| p.display().to_string())
                .as_deref()
                .unwrap_or("pgbouncer"),
            "--version"
        ),
        version(
            which("haproxy")
                .map(|p| p.display().to_string())
                .as_deref()
                .unwrap_or("haproxy"),
            "-v"
        ),
    )?;
    writeln!(
        s,
        "- {} round(s), {} s per pgbench run, medians; TLS on every client leg (sslmode=require; channel_binding=disable, except pgbastion (scram) and (pooled) at libpq's default: bound on both legs)\n",
        args.rounds, args.duration
    )?;
    if args.pooling {
        s.push_str(&pool::report(r)?);
        return Ok(s);
    }
    if args.routing {
        s.push_str(&routing::report(r)?);
        return Ok(s);
    }
    if args.serverless {
        s.push_str(&serverless::report(args, r)?);
        return Ok(s);
    }
    if args.relay {
        s.push_str(&relay_section(args, r)?);
        return Ok(s);
    }
    writeln!(
        s,
        "| workload | metric | direct | pgbastion | pgbouncer | haproxy |"
    )?;
    writeln!(s, "|---|---|---|---|---|---|")?;
    let row = |s: &mut String, workload: &str, label: &str, metric: &'static str| -> Result<()> {
        let base = r.median(workload, Target::Direct, metric);
        let mut cells = Vec::new();
        for t in main {
            cells.push(match (r.median(workload, t, metric), base) {
                (Some(v), Some(b)) if t != Target::Direct && b > 0.0 => {
                    format!("{v:.1} ({:.2}x)", v / b)
                }
                (Some(v), _) => format!("{v:.1}"),
                (None, _) => "—".into(),
            });
        }
        writeln!(s, "| {workload} | {label} | {} |", cells.join(" | "))?;
        Ok(())
    };
    for c in [1, 8, 64] {
        let w = format!("select {c}");
        row(
            &mut s,
            &w,
            &format!("pgbench -S, {c} client(s): TPS"),
            "tps",
        )?;
        row(&mut s, &w, "avg latency, ms", "latency_ms")?;
    }
    row(
        &mut s,
        "connect",
        "pgbench -S -C, 8 clients: connections/s",
        "tps",
    )?;
    row(
        &mut s,
        "copy",
        &format!("COPY {} MB: seconds", args.copy_rows * 1001 / 1_000_000),
        "seconds",
    )?;
    row(&mut s, "copy", "COPY: MB/s", "mb_per_s")?;
    row(
        &mut s,
        "select 8",
        "proxy CPU per transaction (8 clients), µs",
        "cpu_us_per_txn",
    )?;
    row(
        &mut s,
        "select 8",
        "... of which kernel (system) time, µs",
        "sys_us_per_txn",
    )?;
    row(
        &mut s,
        "memory",
        &format!("RSS per idle TLS session ({}), KiB", args.idle_sessions),
        "kib_per_session",
    )?;

    writeln!(s)?;
    let m = |w: &str, t, k| r.median(w, t, k).unwrap_or(f64::NAN);
    let on = m("select 8", Target::Pgbastion, "tps");
    let off = m("select 8", Target::PgbastionNoAudit, "tps");
    writeln!(
        s,
        "Audit log cost (8 clients): {on:.0} TPS with the audit log on, {off:.0} off ({:+.1}%).",
        (on / off - 1.0) * 100.0
    )?;
    let d1 = m("select 1", Target::Direct, "latency_ms");
    writeln!(
        s,
        "Added latency at 1 client: pgbastion {:.0} µs, PgBouncer {:.0} µs, HAProxy {:.0} µs.",
        (m("select 1", Target::Pgbastion, "latency_ms") - d1) * 1000.0,
        (m("select 1", Target::PgBouncer, "latency_ms") - d1) * 1000.0,
        (m("select 1", Target::HAProxy, "latency_ms") - d1) * 1000.0
    )?;
    writeln!(
        s,
        "pgbastion vs PgBouncer at 8 clients: {:.2}x TPS.",
        on / m("select 8", Target::PgBouncer, "tps")
    )?;
    let c = |t| m("connect", t, "tps");
    let fleet = m("select 8", Target::PgbastionCluster, "tps");
    let cpu = |t| m("select 8", t, "cpu_us_per_txn");
    writeln!(
        s,
        "With [cluster] (Redis on loopback), 8 clients: {fleet:.0} TPS vs {on:.0} without ({:+.1}%), \
         proxy CPU {:.1} vs {:.1} µs per transaction; connections/s (pgbench -C, each publishing \
         and deleting a cancel mapping): {:.0} vs {:.0} ({:+.1}%).",
        (fleet / on - 1.0) * 100.0,
        cpu(Target::PgbastionCluster),
        cpu(Target::Pgbastion),
        c(Target::PgbastionCluster),
        c(Target::Pgbastion),
        (c(Target::PgbastionCluster) / c(Target::Pgbastion) - 1.0) * 100.0
    )?;
    let qa = m("select 8", Target::PgbastionQueries, "tps");
    writeln!(
        s,
        "Query audit (audit_queries = \"statements\", a redacted query event per statement), \
         8 clients: {qa:.0} TPS vs {on:.0} without ({:+.1}%), proxy CPU {:.1} vs {:.1} µs per \
         transaction ({:+.1} µs); 1 client: {:.0} vs {:.0} TPS.",
        (qa / on - 1.0) * 100.0,
        cpu(Target::PgbastionQueries),
        cpu(Target::Pgbastion),
        cpu(Target::PgbastionQueries) - cpu(Target::Pgbastion),
        m("select 1", Target::PgbastionQueries, "tps"),
        m("select 1", Target::Pgbastion, "tps"),
    )?;
    let k = |t| m("cancel", t, "ms");
    writeln!(
        s,
        "Cancel latency (plaintext CancelRequest sent → query ended, median): direct {:.2} ms, \
         pgbastion {:.2} ms, [cluster] same instance {:.2} ms, [cluster] another instance \
         (looked up in Redis) {:.2} ms: {:+.2} ms for the lookup.",
        k(Target::Direct),
        k(Target::Pgbastion),
        k(Target::PgbastionCluster),
        k(Target::PgbastionClusterPeer),
        k(Target::PgbastionClusterPeer) - k(Target::PgbastionCluster)
    )?;
    let scram = c(Target::PgbastionScram);
    writeln!(
        s,
        "Connections/s in scram mode (pgbench -S -C, 8 clients, libpq defaults, both legs \
         channel-bound): {scram:.0}, {:.2}x of passthrough, {:.2}x of PgBouncer, {:.2}x of direct.",
        scram / c(Target::Pgbastion),
        scram / c(Target::PgBouncer),
        scram / c(Target::Direct)
    )?;
    if let Some(path) = &args.baseline {
        let tps = |w, t| m(w, t, "tps");
        writeln!(
            s,
            "This build vs the baseline binary ({}), same run: 8 clients {on:.0} vs {:.0} TPS \
             ({:.3}x), proxy CPU {:.1} vs {:.1} µs per transaction ({:+.1}%); 1 client {:.0} vs \
             {:.0} TPS ({:.3}x).",
            path.display(),
            tps("select 8", Target::Baseline),
            on / tps("select 8", Target::Baseline),
            cpu(Target::Pgbastion),
            cpu(Target::Baseline),
            (cpu(Target::Pgbastion) / cpu(Target::Baseline) - 1.0) * 100.0,
            tps("select 1", Target::Pgbastion),
            tps("select 1", Target::Baseline),
            tps("select 1", Target::Pgbastion) / tps("select 1", Target::Baseline),
        )?;
    }
    writeln!(s)?;
    s.push_str(&relay_section(args, r)?);
    writeln!(s)?;
    s.push_str(&pool::report(r)?);
    Ok(s)
}

/// The relay-cost section, with its chart written beside the report (a
/// chart that cannot be drawn is said, not fatal: the tables are the
/// record).
fn relay_section(args: &Args, r: &Results) -> Result<String> {
    let (path, link) = relay::chart_path(&args.output);
    let chart = match chart::write(r, &relay::proxies(r), &path) {
        Ok(()) => Some(link),
        Err(e) => {
            eprintln!("the chart was not written: {e:#}");
            None
        }
    };
    relay::report(r, chart.as_deref())
}
