//! Fault drills (`bash bench/run.sh --faults`): what clients of pgbastion
//! see while something it depends on fails, and whether they recover
//! without anyone touching pgbastion.
//!
//! One pgbastion (a TLS listener, and a tailnet listener whose identities
//! come from a stand-in LocalAPI on a Unix socket) sits in front of a local
//! PostgreSQL, its audit log written into a FIFO that `cat` drains. Three
//! probers run all the time, each recording every attempt:
//! - `session`: one long-lived session running `select 1` every 100 ms
//!   (and reconnecting when it is lost);
//! - `connect`: a new session (connect, `select 1`, close) every 100 ms;
//! - `tailnet`: the same through the tailnet listener.
//!
//! The faults, one after another with quiet time between: PostgreSQL
//! restarted (fast shutdown), PostgreSQL frozen with SIGSTOP for 20 s, the
//! LocalAPI stalled for 20 s (it accepts and never answers), the audit
//! reader stopped for 20 s under reconnect churn. For each, the report
//! gives per prober the attempts that worked and failed, what the failures
//! said, and the longest time without a success.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pgbastion::dev::certs::Ca;
use pgbastion::dev::localpg::{free_port, LocalPg, LocalPgOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{insecure_tls, wait_port, which, Proc};

/// How long each stalling fault lasts.
const STALL: Duration = Duration::from_secs(20);
/// Quiet time before a fault and after it (recovery is measured in it).
const QUIET: Duration = Duration::from_secs(10);
/// Every prober's pace, and how long one attempt may take.
const PACE: Duration = Duration::from_millis(100);
const ATTEMPT_LIMIT: Duration = Duration::from_secs(5);

/// One prober attempt: when it ended, and its error if it failed.
type Attempt = (Instant, &'static str, Option<String>);

/// Runs the drills and returns the report.
pub fn run(label: &str) -> Result<String> {
    let mut pg = LocalPg::start(LocalPgOptions::default())?;
    let dir = pg.dir().to_owned();
    let ca = Ca::new("pgbastion fault drill CA")?;
    let (cert, key) = ca.server_cert(&["localhost"])?.write(&dir, "proxy")?;

    // The audit log goes into a FIFO; `cat` is its reader.
    let fifo = dir.join("audit.fifo");
    let audit_copy = dir.join("audit.jsonl");
    run_ok(Command::new("mkfifo").arg(&fifo), "mkfifo")?;
    let reader = Proc(
        Command::new("cat")
            .arg(&fifo)
            .stdout(std::fs::File::create(&audit_copy)?)
            .spawn()
            .context("starting cat")?,
    );

    let localapi_socket = dir.join("tailscaled.sock");
    let stalled = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(serve_localapi(&localapi_socket, stalled.clone()))?;

    let (tls_port, tailnet_port) = (free_port()?, free_port()?);
    let cfg = dir.join("pgbastion-faults.toml");
    std::fs::write(
        &cfg,
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n\
             [[listener]]\nname = \"tls\"\nlisten = \"127.0.0.1:{tls_port}\"\n\
             [[listener]]\nname = \"tailnet\"\nlisten = \"127.0.0.1:{tailnet_port}\"\nclient_tls = \"allow\"\nidentity = \"tailscale\"\n\
             [tailscale]\nsocket = \"{}\"\n\
             [[upstream]]\naddress = \"localhost:{}\"\nca_file = \"{}\"\n\
             [audit]\nlog = \"{}\"\n",
            cert.display(),
            key.display(),
            localapi_socket.display(),
            pg.port,
            pg.ca_cert.display(),
            fifo.display()
        ),
    )?;
    let exe = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .context("the harness lives in target/<profile>/examples")?
        .join("pgbastion");
    let log = dir.join("pgbastion.log");
    let _pgbastion = Proc(
        Command::new(&exe)
            .args(["run", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?,
    );
    wait_port(tls_port, "pgbastion")?;

    let attempts: Arc<Mutex<Vec<Attempt>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let password = pg.password.clone();
    let tls_conninfo = format!(
        "host=localhost port={tls_port} user=postgres dbname=postgres password={password} \
         sslmode=require channel_binding=disable"
    );
    let tailnet_conninfo = format!(
        "host=localhost port={tailnet_port} user=postgres dbname=postgres password={password} sslmode=disable"
    );
    for (name, conninfo, tls) in [
        ("connect", tls_conninfo.clone(), true),
        ("tailnet", tailnet_conninfo, false),
    ] {
        rt.spawn(probe_new_sessions(
            name,
            conninfo,
            tls,
            attempts.clone(),
            stop.clone(),
        ));
    }
    rt.spawn(probe_session(
        tls_conninfo.clone(),
        attempts.clone(),
        stop.clone(),
    ));

    let postmaster = || -> Result<u32> {
        std::fs::read_to_string(dir.join("data/postmaster.pid"))?
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .context("postmaster.pid")
    };
    let mut windows: Vec<(&str, Instant, Instant)> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    std::thread::sleep(QUIET);

    eprintln!("faults: restarting PostgreSQL");
    let t = Instant::now();
    pg.restart()?;
    notes.push(format!(
        "PostgreSQL was down for {:.1} s (fast shutdown, then start).",
        t.elapsed().as_secs_f64()
    ));
    std::thread::sleep(QUIET);
    windows.push(("PostgreSQL restarted", t, Instant::now()));

    eprintln!("faults: stopping PostgreSQL for {} s", STALL.as_secs());
    let procs = crate::with_children(postmaster()?);
    let t = Instant::now();
    signal_all(&procs, "-STOP");
    std::thread::sleep(STALL);
    signal_all(&procs, "-CONT");
    std::thread::sleep(QUIET);
    windows.push(("PostgreSQL frozen (SIGSTOP) for 20 s", t, Instant::now()));

    eprintln!("faults: stalling the LocalAPI for {} s", STALL.as_secs());
    let t = Instant::now();
    stalled.store(true, Ordering::SeqCst);
    std::thread::sleep(STALL);
    stalled.store(false, Ordering::SeqCst);
    std::thread::sleep(QUIET);
    windows.push(("LocalAPI stalled for 20 s", t, Instant::now()));

    eprintln!(
        "faults: stopping the audit reader for {} s",
        STALL.as_secs()
    );
    let script = dir.join("select1.sql");
    std::fs::write(&script, "select 1;\n")?;
    let lines_before = count_lines(&audit_copy);
    let t = Instant::now();
    signal_all(&[reader.0.id()], "-STOP");
    let churn = Command::new(which("pgbench").context("pgbench")?)
        .args(["-n", "-C", "-c", "2", "-j", "1", "-f"])
        .arg(&script)
        .arg("-T")
        .arg(STALL.as_secs().to_string())
        .arg(&tls_conninfo)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting pgbench")?
        .wait_with_output()?;
    let churned = String::from_utf8_lossy(&churn.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .map(|n| n.trim().to_owned())
        .with_context(|| {
            format!(
                "pgbench churn failed: {}",
                String::from_utf8_lossy(&churn.stderr)
            )
        })?;
    let lines_stalled = count_lines(&audit_copy);
    signal_all(&[reader.0.id()], "-CONT");
    std::thread::sleep(QUIET);
    windows.push(("audit reader stopped for 20 s", t, Instant::now()));
    stop.store(true, Ordering::SeqCst);
    rt.shutdown_timeout(ATTEMPT_LIMIT);
    // Every session has ended now: each start must have its end.
    let audit = wait_audit_settled(&audit_copy);
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let dropped = log_text
        .lines()
        .rev()
        .find(|l| l.contains("audit events could not be written"))
        .map_or_else(
            || "pgbastion reported no dropped event".to_owned(),
            |l| format!("pgbastion logged: `{}`", l.trim()),
        );
    notes.push(format!(
        "Audit reader stopped under churn (`pgbench -C -c 2`, `select 1`, {churned} sessions in the 20 s): \
         the audit file had {lines_before} lines before, still {lines_stalled} while the reader was stopped \
         (events waited in the pipe and pgbastion's queue), and {} at the end; {} sessions started, {} ended, \
         {} refused: {} started sessions without an end event; {dropped}.",
        audit.lines, audit.starts, audit.ends, audit.rejected, audit.unmatched
    ));
    std::fs::copy(&log, std::env::temp_dir().join("pgbastion-faults.log"))?;
    if audit.unmatched > 0 {
        bail!("audit events were lost while the reader was stopped");
    }

    let attempts = attempts.lock().unwrap_or_else(|p| p.into_inner()).clone();
    report(label, &windows, &attempts, &notes)
}

/// Sends a signal to each process with kill(1) (PostgreSQL runs as another
/// user).
fn signal_all(pids: &[u32], sig: &str) {
    for p in pids {
        let _ = Command::new("kill").args([sig, &p.to_string()]).status();
    }
}

/// What the audit file holds once it stops growing.
struct AuditCount {
    lines: usize,
    starts: usize,
    ends: usize,
    rejected: usize,
    unmatched: usize,
}

fn wait_audit_settled(path: &Path) -> AuditCount {
    let mut last = usize::MAX;
    loop {
        let now = count_lines(path);
        if now == last {
            break;
        }
        last = now;
        std::thread::sleep(Duration::from_secs(1));
    }
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let events: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let ids = |kind: &str| -> std::collections::BTreeSet<String> {
        events
            .iter()
            .filter(|e| e["event"] == kind)
            .filter_map(|e| e["session_id"].as_str().map(str::to_owned))
            .collect()
    };
    let (starts, ends) = (ids("session.start"), ids("session.end"));
    AuditCount {
        lines: events.len(),
        starts: starts.len(),
        ends: ends.len(),
        rejected: ids("session.rejected").len(),
        unmatched: starts.difference(&ends).count(),
    }
}

fn count_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<()> {
    if !cmd.status().with_context(|| what.to_owned())?.success() {
        bail!("{what} failed");
    }
    Ok(())
}

/// The stand-in LocalAPI: every peer is `drill@example.com` on node
/// `laptop`; while `stalled`, requests are read and never answered.
async fn serve_localapi(socket: &PathBuf, stalled: Arc<AtomicBool>) -> Result<()> {
    let listener = tokio::net::UnixListener::bind(socket)?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let stalled = stalled.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                if stalled.load(Ordering::SeqCst) {
                    // Hold the connection until the caller gives up.
                    let _ = s.read(&mut buf).await;
                    return;
                }
                let body = serde_json::json!({
                    "Node": {"ID": 1, "StableID": "nDrill", "Name": "laptop.tail1234.ts.net.",
                             "Tags": null, "Addresses": ["100.64.0.1/32"]},
                    "UserProfile": {"ID": 7, "LoginName": "drill@example.com",
                                    "DisplayName": "Drill", "ProfilePicURL": ""},
                });
                let resp =
                    format!("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{body}");
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(())
}

/// What a client would say about an error: the SQLSTATE and message
/// pgbastion or the server sent, or the client library's own words.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

async fn attempt_session(conninfo: &str, tls: bool) -> Result<(), String> {
    let once = async {
        let client = if tls {
            let (client, conn) = tokio_postgres::connect(conninfo, insecure_tls()).await?;
            tokio::spawn(conn);
            client
        } else {
            let (client, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            client
        };
        client.simple_query("select 1").await?;
        Ok::<_, tokio_postgres::Error>(())
    };
    match tokio::time::timeout(ATTEMPT_LIMIT, once).await {
        Ok(r) => r.map_err(|e| describe(&e)),
        Err(_) => Err(format!(
            "no answer within {} s (client gave up)",
            ATTEMPT_LIMIT.as_secs()
        )),
    }
}

async fn probe_new_sessions(
    name: &'static str,
    conninfo: String,
    tls: bool,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::SeqCst) {
        let r = attempt_session(&conninfo, tls).await;
        attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((Instant::now(), name, r.err()));
        tokio::time::sleep(PACE).await;
    }
}

async fn probe_session(
    conninfo: String,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    stop: Arc<AtomicBool>,
) {
    type Conn = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;
    let mut client: Option<(tokio_postgres::Client, Conn)> = None;
    while !stop.load(Ordering::SeqCst) {
        let r = async {
            if client.is_none() {
                let (c, conn) = tokio::time::timeout(
                    ATTEMPT_LIMIT,
                    tokio_postgres::connect(&conninfo, insecure_tls()),
                )
                .await
                .map_err(|_| "reconnect: no answer within 5 s".to_owned())?
                .map_err(|e| format!("reconnect: {}", describe(&e)))?;
                client = Some((c, tokio::spawn(conn)));
            }
            let (c, conn) = client.as_mut().ok_or("no session")?;
            match tokio::time::timeout(ATTEMPT_LIMIT, c.simple_query("select 1")).await {
                Ok(Ok(_)) => Ok(()),
                // An ErrorResponse that arrived between queries (the
                // server's 57P01) ends the connection task, not the query.
                Ok(Err(e)) if conn.is_finished() => match conn.await {
                    Ok(Err(why)) => Err(describe(&why)),
                    _ => Err(describe(&e)),
                },
                Ok(Err(e)) => Err(describe(&e)),
                Err(_) => Err("query: no answer within 5 s".to_owned()),
            }
        }
        .await;
        if r.is_err() {
            client = None;
        }
        attempts.lock().unwrap_or_else(|p| p.into_inner()).push((
            Instant::now(),
            "session",
            r.err(),
        ));
        tokio::time::sleep(PACE).await;
    }
}

fn report(
    label: &str,
    windows: &[(&str, Instant, Instant)],
    attempts: &[Attempt],
    notes: &[String],
) -> Result<String> {
    use std::fmt::Write;
    let mut s = String::new();
    s.push_str(&crate::heading("Fault drills", "", label));
    writeln!(s, "Probers every 100 ms: `session` (one long-lived session, `select 1`, reconnecting when lost), `connect` (a new TLS session each time), `tailnet` (a new session through the tailnet listener, identity from the LocalAPI). Each window runs from the fault's start to {} s after it ended. An attempt gives up after 5 s.\n", QUIET.as_secs())?;
    writeln!(
        s,
        "| fault | prober | ok | failed | longest without success | what failing clients saw |"
    )?;
    writeln!(s, "|---|---|---|---|---|---|")?;
    for (fault, from, to) in windows {
        for prober in ["session", "connect", "tailnet"] {
            let mine: Vec<&Attempt> = attempts
                .iter()
                .filter(|(at, p, _)| *p == prober && at >= from && at <= to)
                .collect();
            let ok = mine.iter().filter(|a| a.2.is_none()).count();
            let mut errors: BTreeMap<&str, usize> = BTreeMap::new();
            for (_, _, e) in &mine {
                if let Some(e) = e {
                    *errors.entry(e.as_str()).or_default() += 1;
                }
            }
            let mut last_ok = *from;
            let mut gap = Duration::ZERO;
            for (at, _, e) in &mine {
                if e.is_none() {
                    gap = gap.max(at.duration_since(last_ok));
                    last_ok = *at;
                }
            }
            gap = gap.max(to.duration_since(last_ok));
            let seen = errors
                .iter()
                .map(|(e, n)| format!("{n}× `{}`", e.replace('|', "\\|")))
                .collect::<Vec<_>>()
                .join("; ");
            writeln!(
                s,
                "| {fault} | {prober} | {ok} | {} | {:.1} s | {} |",
                mine.len() - ok,
                gap.as_secs_f64(),
                if seen.is_empty() { "—" } else { &seen }
            )?;
        }
    }
    for n in notes {
        writeln!(s, "\n{n}")?;
    }
    Ok(s)
}
