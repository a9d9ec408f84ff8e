//! The relay's cost against the peers (issue 24): proxy CPU per transaction
//! split into user and system time at 1, 8 and 64 clients, TPS ratios,
//! latency percentiles at 1 client (from pgbench's per-transaction log),
//! memory per idle TLS session, and a chart of it all.
//!
//! The figures are gathered by the main run's `select N` rounds (see
//! `Bench::run`); `--relay` runs only those rounds, for quick iteration on
//! the relay with `--baseline` as the old binary.

use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

use pgbastion::dev::localpg::LocalPg;

use crate::{Results, Target};

/// The client counts every relay figure is measured at.
pub const CLIENTS: [usize; 3] = [1, 8, 64];

/// The goals of issue 24, for the verdict line.
const GOAL_VS_HAPROXY: f64 = 1.1;
const GOAL_VS_PGBOUNCER: f64 = 0.75;
const GOAL_KIB_PER_SESSION: f64 = 24.0;

/// pgbench arguments that log every transaction's latency into `dir`.
pub fn latency_log_args(dir: &Path) -> Vec<String> {
    vec![
        "-l".into(),
        "--log-prefix".into(),
        dir.join("txn").display().to_string(),
    ]
}

/// Reads (and removes) the per-transaction logs pgbench wrote into `dir`:
/// latencies in µs, sorted. A log line is `client_id transaction_no time
/// script_no time_epoch time_us`, `time` being the latency in µs.
pub fn take_latencies(dir: &Path) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let is_log = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("txn."));
        if !is_log {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        out.extend(parse_log(&text));
        std::fs::remove_file(&path)?;
    }
    out.sort_by(|a, b| a.total_cmp(b));
    Ok(out)
}

fn parse_log(text: &str) -> impl Iterator<Item = f64> + '_ {
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok())
}

/// The `q` quantile (0..=1) of sorted samples.
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted.get(i).copied()
}

/// The proxies compared, with the baseline binary when there is one.
pub fn proxies(r: &Results) -> Vec<Target> {
    let mut t = vec![Target::Pgbastion, Target::PgBouncer, Target::HAProxy];
    for extra in [Target::Baseline, Target::ProbeEpoll, Target::ProbeUring] {
        if r.median("select 8", extra, "tps").is_some() {
            t.push(extra);
        }
    }
    t
}

/// Starts the relay floor (bench/probe) with `io` on `port`, in front of
/// `pg` with the proxies' certificate, two threads as pgbastion has.
pub fn start_probe(
    exe: &Path,
    io: &str,
    port: u16,
    pg: &LocalPg,
    (cert, key): (&Path, &Path),
) -> Result<Child> {
    Command::new(exe)
        .args(["--io", io, "--threads", "2", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--upstream")
        .arg(format!("127.0.0.1:{}", pg.port))
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg("--ca")
        .arg(&pg.ca_cert)
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (built by bench/run.sh)", exe.display()))
}

/// The section: tables, the verdict, and a link to the chart.
pub fn report(r: &Results, chart: Option<&str>) -> Result<String> {
    let mut s = String::from("### Relay cost (issue 24)\n\n");
    let targets = proxies(r);
    let m = |w: &str, t, k| r.median(w, t, k);
    let names: Vec<&str> = targets.iter().map(|t| t.name()).collect();
    writeln!(
        s,
        "Proxy CPU per transaction (user + system from /proc/PID/stat during each pgbench -S run), µs, \
         and TPS as a share of direct:\n"
    )?;
    writeln!(
        s,
        "| clients | metric | {} | pgbastion / haproxy | pgbastion / pgbouncer |",
        names.join(" | ")
    )?;
    writeln!(s, "|---|---|{}---|---|", "---|".repeat(targets.len()))?;
    for c in CLIENTS {
        let w = format!("select {c}");
        for (label, metric) in [
            ("user µs/tx", "user_us_per_txn"),
            ("system µs/tx", "sys_us_per_txn"),
            ("total µs/tx", "cpu_us_per_txn"),
            ("TPS", "tps"),
        ] {
            let direct = m(&w, Target::Direct, "tps");
            let cell = |t| match (m(&w, t, metric), direct) {
                (Some(v), Some(d)) if metric == "tps" => format!("{v:.0} ({:.2}x)", v / d),
                (Some(v), _) => format!("{v:.1}"),
                (None, _) => "—".into(),
            };
            let ratio = |other| match (m(&w, Target::Pgbastion, metric), m(&w, other, metric)) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                _ => "—".into(),
            };
            let cells: Vec<String> = targets.iter().map(|&t| cell(t)).collect();
            writeln!(
                s,
                "| {c} | {label} | {} | {} | {} |",
                cells.join(" | "),
                ratio(Target::HAProxy),
                ratio(Target::PgBouncer)
            )?;
        }
    }
    writeln!(s)?;
    latency_lines(&mut s, r, &targets)?;
    memory_line(&mut s, r, &targets)?;
    verdict(&mut s, r)?;
    if let Some(chart) = chart {
        writeln!(
            s,
            "\nChart (TPS and proxy CPU per transaction by target and client count; in `docs/` of the \
             repository): [{chart}]({chart})"
        )?;
    }
    Ok(s)
}

fn latency_lines(s: &mut String, r: &Results, targets: &[Target]) -> Result<()> {
    let mut parts = Vec::new();
    for &t in std::iter::once(&Target::Direct).chain(targets) {
        if let (Some(p50), Some(p99)) = (
            r.median("select 1", t, "p50_us"),
            r.median("select 1", t, "p99_us"),
        ) {
            parts.push(format!("{} {p50:.0} / {p99:.0}", t.name()));
        }
    }
    writeln!(
        s,
        "Latency at 1 client, p50 / p99 µs (pgbench -l): {}.",
        parts.join(", ")
    )?;
    Ok(())
}

fn memory_line(s: &mut String, r: &Results, targets: &[Target]) -> Result<()> {
    let parts: Vec<String> = targets
        .iter()
        .filter_map(|&t| {
            let kib = r.median("memory", t, "kib_per_session")?;
            Some(format!("{} {kib:.1}", t.name()))
        })
        .collect();
    writeln!(
        s,
        "Memory per idle TLS session, KiB (RSS growth over the idle sessions held): {}.",
        parts.join(", ")
    )?;
    Ok(())
}

fn verdict(s: &mut String, r: &Results) -> Result<()> {
    let cpu = |t| {
        r.median("select 8", t, "cpu_us_per_txn")
            .unwrap_or(f64::NAN)
    };
    let tps = |t| r.median("select 8", t, "tps").unwrap_or(f64::NAN);
    let vs_haproxy = cpu(Target::Pgbastion) / cpu(Target::HAProxy);
    let vs_pgbouncer = cpu(Target::Pgbastion) / cpu(Target::PgBouncer);
    let kib = r
        .median("memory", Target::Pgbastion, "kib_per_session")
        .unwrap_or(f64::NAN);
    let mark = |ok: bool| if ok { "met" } else { "not met" };
    writeln!(
        s,
        "Goals at 8 clients: CPU {vs_haproxy:.2}x HAProxy's (≤ {GOAL_VS_HAPROXY}: {}), \
         {vs_pgbouncer:.2}x PgBouncer's (≤ {GOAL_VS_PGBOUNCER}: {}), TPS {:.2}x HAProxy's (≥ 1: {}); \
         memory per idle TLS session {kib:.1} KiB (≤ {GOAL_KIB_PER_SESSION}: {}).",
        mark(vs_haproxy <= GOAL_VS_HAPROXY),
        mark(vs_pgbouncer <= GOAL_VS_PGBOUNCER),
        tps(Target::Pgbastion) / tps(Target::HAProxy),
        mark(tps(Target::Pgbastion) >= tps(Target::HAProxy)),
        mark(kib <= GOAL_KIB_PER_SESSION),
    )?;
    Ok(())
}

/// Where a run's chart goes: `docs/charts/run-STAMP.svg` beside the
/// report, so each run in the history links its own chart, and the link as
/// the manual (which includes BENCHMARKS.md from `docs/`) resolves it.
pub fn chart_path(output: &Path) -> (PathBuf, String) {
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(':', "");
    let name = format!("run-{stamp}.svg");
    let file = output
        .parent()
        .unwrap_or(Path::new(""))
        .join("docs")
        .join("charts")
        .join(&name);
    (file, format!("charts/{name}"))
}

/// Whether `--perf` profiles this target.
pub fn profiled(t: Target) -> bool {
    matches!(t, Target::Pgbastion | Target::Baseline)
}

/// A `perf record` attached to a proxy for one pgbench run.
pub struct Profile {
    perf: Child,
    data: PathBuf,
    svg: PathBuf,
}

impl Profile {
    /// Samples `pid` (cpu-clock, call graphs) for `seconds` less one, so
    /// the samples fall inside the pgbench run that starts next.
    pub fn start(dir: &Path, t: Target, pid: u32, seconds: u64) -> Result<Profile> {
        std::fs::create_dir_all(dir)?;
        let name = t.name().replace([' ', '(', ')'], "");
        let data = dir.join(format!("{name}.perf.data"));
        let perf = Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F", "999", "-g", "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(&data)
            .args(["--", "sleep", &seconds.saturating_sub(1).max(1).to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf (is it installed?)")?;
        Ok(Profile {
            perf,
            svg: dir.join(format!("{name}.svg")),
            data,
        })
    }

    /// Waits for perf, then folds the stacks into a flame graph with
    /// `inferno` when it is installed (`cargo install inferno`); the
    /// perf.data stays for `perf report` either way.
    pub fn finish(mut self) -> Result<()> {
        self.perf.wait()?;
        let script = Command::new("perf")
            .args(["script", "-i"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .context("perf script")?;
        let folded = pipe("inferno-collapse-perf", &[], &script.stdout);
        let svg = folded.and_then(|f| pipe("inferno-flamegraph", &["--width", "1400"], &f));
        match svg {
            Ok(svg) => std::fs::write(&self.svg, svg)?,
            Err(e) => eprintln!("no flame graph for {}: {e:#}", self.data.display()),
        }
        Ok(())
    }
}

/// Runs `cmd args` with `input` on stdin; its stdout.
fn pipe(cmd: &str, args: &[&str], input: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write as _;
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {cmd}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    anyhow::ensure!(out.status.success(), "{cmd} failed");
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbench_log_lines_give_latencies() {
        let log = "0 1 153 0 1733443200 123456\n0 2 98 0 1733443200 223456\nbad line\n";
        assert_eq!(parse_log(log).collect::<Vec<_>>(), vec![153.0, 98.0]);
    }

    #[test]
    fn quantiles_of_sorted_samples() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(51.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
