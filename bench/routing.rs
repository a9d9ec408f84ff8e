//! The routing-table scale comparison (issue 22): in one run, a pgbastion
//! with one `[[route]]` and one with 10,000 exact routes followed by a
//! wildcard route to a templated upstream (`database = "{endpoint}"`),
//! against the same PostgreSQL and beside the direct connection. Session
//! setup is what a route lookup could slow, so the workload is the
//! `pgbench -S -C -c 8` connect storm, through the last exact route
//! (`db9999`: a scan would find it last) and through a wildcard tenant,
//! interleaved per round with the one-route instance and direct.
//!
//! Also measured: pgbastion's CPU per connection, its RSS idle and after
//! the storms (the table's memory), how long it takes to listen, the
//! check-config work (`Config::from_toml` and `server::check`) for both
//! configurations, and the table's lookup alone, in process.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pgbastion::config::Config;
use pgbastion::dev::certs::Ca;
use pgbastion::dev::localpg::free_port;
use pgbastion::routing::{Endpoint, Query};

use super::{clk_tck, cpu_ticks, rss_kib, wait_port, Args, Bench, Proc, Results, Target};

/// Exact routes in the large table (`db0.bench.test` ..).
pub const EXACT_ROUTES: usize = 10_000;
/// Tenants the wildcard route serves (t0 .. t999); the storm uses one.
pub const TENANTS: usize = 1_000;
/// The tenant the wildcard storm connects as (its database is created).
const TENANT: &str = "t777";
const DOMAIN: &str = "bench.test";
const TENANT_DOMAIN: &str = "tenants.bench.test";

/// One row of the table: the instance measured and the host name the
/// clients send (libpq sends it as the TLS server name).
struct Row {
    target: Target,
    workload: &'static str,
    label: String,
    host: String,
}

fn rows() -> Vec<Row> {
    let last = EXACT_ROUTES - 1;
    vec![
        Row {
            target: Target::Direct,
            workload: "routing connect",
            label: "direct".into(),
            host: "localhost".into(),
        },
        Row {
            target: Target::PgbastionOneRoute,
            workload: "routing connect",
            label: format!("pgbastion, 1 route (`db0.{DOMAIN}`)"),
            host: format!("db0.{DOMAIN}"),
        },
        Row {
            target: Target::PgbastionRoutes,
            workload: "routing connect",
            label: format!(
                "pgbastion, {EXACT_ROUTES} exact routes + 1 wildcard: the last exact (`db{last}.{DOMAIN}`)"
            ),
            host: format!("db{last}.{DOMAIN}"),
        },
        Row {
            target: Target::PgbastionRoutes,
            workload: "routing connect wildcard",
            label: format!("... same instance, a wildcard tenant (`{TENANT}.{TENANT_DOMAIN}`)"),
            host: format!("{TENANT}.{TENANT_DOMAIN}"),
        },
    ]
}

/// The two routing instances, killed when this is dropped.
struct Instances {
    ports: std::collections::BTreeMap<Target, u16>,
    pids: std::collections::BTreeMap<Target, u32>,
    audit: PathBuf,
    _procs: Vec<Proc>,
}

/// The configuration of a routing instance: `routes` exact routes (and,
/// with more than one, the wildcard route and its templated upstream).
fn config_text(bench: &Bench, cert: &Path, key: &Path, port: u16, routes: usize) -> String {
    let dir = bench.pg.dir();
    let upstream = |name: &str, database: &str| {
        format!(
            "[[upstream]]\nname = \"{name}\"\naddress = \"localhost:{}\"\nserver_name = \"localhost\"\n\
             ca_file = \"{}\"\n{database}",
            bench.pg.port,
            bench.pg.ca_cert.display()
        )
    };
    let mut s = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n[[listener]]\nname = \"main\"\nlisten = \"127.0.0.1:{port}\"\n\
         {}[audit]\nlog = \"{}\"\n[limits]\nmax_sessions = 2000\nmax_pending = 2000\n\
         [auth]\nmock_key_file = \"{}\"\n",
        cert.display(),
        key.display(),
        upstream("pg", ""),
        dir.join("audit-routing.jsonl").display(),
        dir.join("mock_key").display()
    );
    if routes > 1 {
        s.push_str(&upstream("tenants", "database = \"{endpoint}\"\n"));
    }
    s.reserve(routes * 64);
    for i in 0..routes {
        let _ = write!(
            s,
            "[[route]]\nname = \"db{i}\"\nserver_name = \"db{i}.{DOMAIN}\"\nupstream = \"pg\"\n"
        );
    }
    if routes > 1 {
        let _ = write!(
            s,
            "[[route]]\nname = \"tenants\"\nserver_name = \"*.{TENANT_DOMAIN}\"\nupstream = \"tenants\"\n"
        );
    }
    s
}

/// Times what `check-config` does for a configuration text, in process:
/// (parse and validate, `server::check`) in milliseconds.
fn check_config_ms(text: &str) -> Result<(f64, f64)> {
    let start = Instant::now();
    let config = Config::from_toml(text).context("the routing config")?;
    let parsed = start.elapsed();
    pgbastion::server::check(&config).context("check of the routing config")?;
    let checked = start.elapsed() - parsed;
    Ok((parsed.as_secs_f64() * 1e3, checked.as_secs_f64() * 1e3))
}

/// The table's lookup alone: nanoseconds per lookup of `sni` (median of
/// five batches), with the table the configuration built.
fn lookup_ns(text: &str, sni: &str) -> Result<f64> {
    let config = Config::from_toml(text).context("the routing config")?;
    let query = Query {
        listener: "main",
        sni: Some(sni),
        options_endpoint: None::<&Endpoint>,
        database: "postgres",
    };
    let routed = config
        .routes
        .lookup(&query)
        .map_err(|e| anyhow::anyhow!("lookup of {sni}: {e:?}"))?;
    if routed.route.is_none() {
        bail!("no route for {sni}");
    }
    const N: u32 = 100_000;
    let mut batches = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..N {
            let r = config.routes.lookup(std::hint::black_box(&query));
            std::hint::black_box(r.ok());
        }
        batches.push(start.elapsed().as_secs_f64() * 1e9 / f64::from(N));
    }
    batches.sort_by(|a, b| a.total_cmp(b));
    Ok(batches[2])
}

/// The tenant's database, a copy of the benchmark's tables at the same
/// scale (`pgbench -S` needs them).
fn create_tenant_database(bench: &Bench) -> Result<()> {
    bench
        .pg
        .run_sql(&format!("CREATE DATABASE {TENANT}"))
        .context("creating the tenant database")?;
    super::run_ok(
        Command::new("pgbench")
            .args(["-i", "-q", "-s", "10"])
            .arg(format!(
                "host=localhost port={} user=postgres dbname={TENANT} sslmode=require",
                bench.pg.port
            ))
            .env("PGPASSWORD", &bench.pg.password),
        "pgbench -i (tenant)",
    )
}

/// Starts both routing instances (certificate for every routed name),
/// recording their start-up time and idle RSS, and the check-config and
/// lookup timings.
fn start(bench: &Bench, r: &mut Results) -> Result<Instances> {
    let dir = bench.pg.dir().to_owned();
    let ca = Ca::new("pgbastion bench routing CA")?;
    let wildcard_domain = format!("*.{DOMAIN}");
    let wildcard_tenants = format!("*.{TENANT_DOMAIN}");
    let (cert, key) = ca
        .server_cert(&[
            &wildcard_domain,
            &wildcard_tenants,
            "localhost",
            "127.0.0.1",
        ])?
        .write(&dir, "proxy-routing")?;
    let exe = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .context("the harness lives in target/<profile>/examples")?
        .join("pgbastion");
    let mut inst = Instances {
        ports: Default::default(),
        pids: Default::default(),
        audit: dir.join("audit-routing.jsonl"),
        _procs: Vec::new(),
    };
    for (target, routes) in [
        (Target::PgbastionOneRoute, 1),
        (Target::PgbastionRoutes, EXACT_ROUTES),
    ] {
        let port = free_port()?;
        let text = config_text(bench, &cert, &key, port, routes);
        let (parse, check) = check_config_ms(&text)?;
        r.add("routing config", target, "parse_ms", parse);
        r.add("routing config", target, "check_ms", check);
        r.add("routing config", target, "bytes", text.len() as f64);
        let sni = if routes > 1 {
            format!("db{}.{DOMAIN}", EXACT_ROUTES - 1)
        } else {
            format!("db0.{DOMAIN}")
        };
        r.add("routing lookup", target, "ns", lookup_ns(&text, &sni)?);
        if routes > 1 {
            let tenant = format!("{TENANT}.{TENANT_DOMAIN}");
            r.add(
                "routing lookup wildcard",
                target,
                "ns",
                lookup_ns(&text, &tenant)?,
            );
        }
        let cfg = dir.join(format!("pgbastion-routing-{routes}.toml"));
        std::fs::write(&cfg, &text)?;
        let started = Instant::now();
        let child = super::spawn_pgbastion(&exe, &cfg, None, None)?;
        let pid = child.id();
        inst._procs.push(Proc(child));
        wait_port(port, "pgbastion (routing)")?;
        r.add(
            "routing start",
            target,
            "ms",
            started.elapsed().as_secs_f64() * 1e3,
        );
        // Settled, before any session: the table's memory.
        std::thread::sleep(Duration::from_millis(300));
        r.add("routing rss idle", target, "kib", rss_kib(pid)? as f64);
        inst.pids.insert(target, pid);
        inst.ports.insert(target, port);
    }
    Ok(inst)
}

fn conninfo(bench: &Bench, inst: &Instances, row: &Row) -> String {
    match row.target {
        Target::Direct => bench.conninfo(Target::Direct),
        t => format!(
            "host={} hostaddr=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require channel_binding=disable",
            row.host, inst.ports[&t]
        ),
    }
}

fn pgbench(bench: &Bench, conninfo: &str, extra: &[&str]) -> Result<super::PgbenchOut> {
    let out = Command::new("pgbench")
        .arg("-n")
        .args(extra)
        .arg(conninfo)
        .env("PGPASSWORD", &bench.pg.password)
        .output()
        .context("running pgbench")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "pgbench ({conninfo}) failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    super::PgbenchOut::parse(&text).with_context(|| format!("reading pgbench output:\n{text}"))
}

/// The routing comparison: set up, check every row reaches its route,
/// then `args.rounds` interleaved rounds of connect storms.
pub fn run(bench: &Bench, args: &Args) -> Result<Results> {
    let mut r = Results::default();
    create_tenant_database(bench)?;
    let inst = start(bench, &mut r)?;
    let rows = rows();
    for row in &rows {
        pgbench(
            bench,
            &conninfo(bench, &inst, row),
            &["-S", "-c", "1", "-t", "10"],
        )
        .with_context(|| format!("{} does not work", row.label))?;
    }
    // Each session was routed where its name says (the audit names the
    // route): not, say, to a listener's default.
    let audit = std::fs::read_to_string(&inst.audit).unwrap_or_default();
    for route in ["db0", &format!("db{}", EXACT_ROUTES - 1), "tenants"] {
        if !audit.contains(&format!("\"name\":\"{route}\"")) {
            bail!(
                "no session in {} was routed by route {route:?}",
                inst.audit.display()
            );
        }
    }
    let d = args.duration.to_string();
    for round in 0..args.rounds {
        eprintln!("routing: round {} of {}", round + 1, args.rounds);
        for row in &rows {
            let pid = inst.pids.get(&row.target).copied();
            let before = cpu_ticks(pid);
            let out = pgbench(
                bench,
                &conninfo(bench, &inst, row),
                &["-S", "-C", "-c", "8", "-j", "2", "-T", &d],
            )?;
            let after = cpu_ticks(pid);
            r.add(row.workload, row.target, "tps", out.tps);
            if let (Some((ua, sa)), Some((ub, sb))) = (before, after) {
                if out.transactions > 0 {
                    let ticks = (ub - ua) + (sb - sa);
                    let us = ticks as f64 * 1e6 / clk_tck() / out.transactions as f64;
                    r.add(row.workload, row.target, "cpu_us_per_conn", us);
                }
            }
        }
    }
    for (&target, &pid) in &inst.pids {
        r.add("routing rss after", target, "kib", rss_kib(pid)? as f64);
    }
    Ok(r)
}

/// The routing section of the report.
pub fn report(r: &Results) -> Result<String> {
    let m = |w: &str, t, k| r.median(w, t, k).unwrap_or(f64::NAN);
    let (one, many) = (Target::PgbastionOneRoute, Target::PgbastionRoutes);
    let mut s = String::new();
    writeln!(
        s,
        "### Routing (issue 22)\n\nTwo pgbastion instances against the same PostgreSQL, passthrough, audit log on, \
         no listener upstream (routes only): one with a single route `db0.{DOMAIN}`; one with {EXACT_ROUTES} \
         exact routes `db0.{DOMAIN}` .. `db{}.{DOMAIN}` to one upstream, then a wildcard route \
         `*.{TENANT_DOMAIN}` (tenants t0 .. t{}) to an upstream with `database = \"{{endpoint}}\"` \
         (the database `{TENANT}` holds the same pgbench tables). Clients: `host=NAME hostaddr=127.0.0.1 \
         sslmode=require` (libpq sends NAME as the TLS server name).\n",
        EXACT_ROUTES - 1,
        TENANTS - 1
    )?;
    writeln!(
        s,
        "| `pgbench -S -C -c 8 -j 2` through | connections/s | vs direct | vs 1 route | pgbastion CPU per connection, µs |"
    )?;
    writeln!(s, "|---|---|---|---|---|")?;
    let base = m("routing connect", Target::Direct, "tps");
    let single = m("routing connect", one, "tps");
    for row in rows() {
        let tps = m(row.workload, row.target, "tps");
        let cpu = r.median(row.workload, row.target, "cpu_us_per_conn");
        let direct = row.target == Target::Direct;
        writeln!(
            s,
            "| {} | {tps:.1} | {} | {} | {} |",
            row.label,
            if direct {
                "—".to_owned()
            } else {
                format!("{:.2}x", tps / base)
            },
            if direct || row.target == one {
                "—".to_owned()
            } else {
                format!("{:.2}x", tps / single)
            },
            cpu.map_or("—".to_owned(), |v| format!("{v:.0}")),
        )?;
    }
    let mib = |kib: f64| kib / 1024.0;
    writeln!(
        s,
        "\n| | 1 route | {EXACT_ROUTES} + 1 routes |\n|---|---|---|\n\
         | config size, KiB | {:.1} | {:.1} |\n\
         | `Config::from_toml` (parse, validate, build the table), ms | {:.2} | {:.2} |\n\
         | `server::check` (certificates, names covered, upstreams), ms | {:.2} | {:.2} |\n\
         | start to listening, ms | {:.0} | {:.0} |\n\
         | RSS idle (before any session), MiB | {:.1} | {:.1} |\n\
         | RSS after the storms, MiB | {:.1} | {:.1} |\n\
         | `Table::lookup` in process, exact name (db0 / db{}), ns | {:.0} | {:.0} |\n\
         | `Table::lookup` in process, wildcard tenant, ns | — | {:.0} |",
        m("routing config", one, "bytes") / 1024.0,
        m("routing config", many, "bytes") / 1024.0,
        m("routing config", one, "parse_ms"),
        m("routing config", many, "parse_ms"),
        m("routing config", one, "check_ms"),
        m("routing config", many, "check_ms"),
        m("routing start", one, "ms"),
        m("routing start", many, "ms"),
        mib(m("routing rss idle", one, "kib")),
        mib(m("routing rss idle", many, "kib")),
        mib(m("routing rss after", one, "kib")),
        mib(m("routing rss after", many, "kib")),
        EXACT_ROUTES - 1,
        m("routing lookup", one, "ns"),
        m("routing lookup", many, "ns"),
        m("routing lookup wildcard", many, "ns"),
    )?;
    writeln!(
        s,
        "\nSession setup with {EXACT_ROUTES} routes vs one, same run: {:.2}x connections/s through the last \
         exact route, {:.2}x through a wildcard tenant; the table costs {:.1} MiB of RSS idle; check-config \
         work for the {EXACT_ROUTES}-route file {:.0} ms.",
        m("routing connect", many, "tps") / single,
        m("routing connect wildcard", many, "tps") / single,
        mib(m("routing rss idle", many, "kib") - m("routing rss idle", one, "kib")),
        m("routing config", many, "parse_ms") + m("routing config", many, "check_ms"),
    )?;
    Ok(s)
}
