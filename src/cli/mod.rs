//! The bodies of the `pgbastion` subcommands, which `main.rs` only parses
//! and dispatches to: `run` and the signals around it (`run`),
//! `check-config` (`check_config`), `audit verify` (`audit_verify`),
//! `demo` and `scram-secret` (here), plus the stderr log writer and how a
//! failed command's error is printed (`report`).

pub mod audit_verify;
pub mod check_config;
pub mod report;
pub mod run;

use anyhow::{Context, Result};

use crate::audit::sink::{Sink, SinkTarget};

/// Log line format on stderr.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Log lines waiting for stderr before new ones are dropped.
const LOG_QUEUE_LINES: usize = 10_000;

/// Logs go to stderr through a writer thread (`sink`), so a stalled reader
/// of stderr never blocks a session; lines beyond the queue are dropped.
pub fn init_logging(format: LogFormat) -> Result<Sink> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let stderr = Sink::spawn("log", SinkTarget::Stderr, LOG_QUEUE_LINES)
        .context("starting the log writer")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(stderr.clone());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(stderr)
}

/// `pgbastion scram-secret`: the password on standard input becomes a
/// `scram_secret` file's text on standard output.
pub fn scram_secret(iterations: u32) -> Result<()> {
    let mut password = String::new();
    std::io::stdin()
        .read_line(&mut password)
        .context("reading the password from standard input")?;
    let password = password.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        anyhow::bail!("no password on standard input (e.g. pgbastion scram-secret < password.txt)");
    }
    print!(
        "{}",
        crate::auth::credentials::scram_secret_for(password.as_bytes(), iterations)
    );
    Ok(())
}

/// `pgbastion demo`: starts the throwaway PostgreSQL and pgbastion, says
/// how to connect, and serves until Ctrl-C; then removes everything.
pub async fn demo(port: u16) -> Result<()> {
    eprintln!("starting a throwaway PostgreSQL (initdb, TLS, SCRAM)...");
    let (demo, server) = crate::dev::demo::Demo::start(port).await?;
    println!("{}", demo.instructions());
    run::serve(server).await;
    let dir = demo.dir().to_owned();
    drop(demo);
    eprintln!(
        "demo stopped; PostgreSQL stopped and {} removed",
        dir.display()
    );
    Ok(())
}
