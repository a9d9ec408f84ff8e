//! `pgbastion run`: the configuration from a file or from flags, the
//! open-files limit, and the signals around the server: SIGHUP reloads,
//! SIGTERM/SIGINT drain, a second one ends every session at once. `serve`
//! is shared with `pgbastion demo`.

use std::path::PathBuf;

use anyhow::Result;

use crate::config::{Config, Flags};
use crate::server::{self, ReloadHandle, Server};

/// Where `run` takes its configuration from.
pub enum ConfigSource {
    /// `--config FILE`: watched and re-read on SIGHUP.
    File(PathBuf),
    /// The flag-only form, one upstream.
    Flags(Box<Flags>),
}

impl ConfigSource {
    fn load(self) -> Result<(Config, Option<PathBuf>)> {
        match self {
            ConfigSource::File(path) => Ok((Config::from_file(&path)?, Some(path))),
            ConfigSource::Flags(flags) => {
                let flags = *flags;
                if flags.listen.is_empty() && flags.unix_dir.is_none() {
                    anyhow::bail!(
                        "nothing to listen on: give --listen IP:PORT and/or --unix-dir DIR (or --config FILE)"
                    );
                }
                Ok((Config::from_flags(flags)?, None))
            }
        }
    }
}

/// Where sessions run (`--runtime`): on the runtime `run` is called on, or
/// on a single-threaded runtime per core (`server::Cores`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionThreads {
    Shared,
    PerCore(usize),
}

/// Binds every listener and serves until SIGTERM/SIGINT.
pub async fn run(source: ConfigSource, threads: SessionThreads) -> Result<()> {
    let (config, config_path) = source.load()?;
    check_open_files(&config);
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let initial = config.clone();
    let mut server = Server::bind(config).await?;
    if let SessionThreads::PerCore(n) = threads {
        server = server.with_cores(server::Cores::start(n)?);
        tracing::info!(threads = n, "sessions run thread-per-core");
    }
    for (name, addr) in server.local_addrs() {
        tracing::info!(listener = %name, address = %addr, "bound");
    }
    let handle = server.reload_handle();
    handle.set_source(config_path.clone(), initial.clone());
    if initial.reload.watch {
        let debounce = initial.reload.debounce;
        tokio::spawn(server::watch(
            handle.clone(),
            config_path,
            initial,
            debounce,
        ));
    }
    tokio::spawn(reload_on_sighup(handle));
    serve(server).await;
    Ok(())
}

/// Raises the open-files limit, and warns when it is still too low for the
/// configured limits (sessions would fail with "too many open files").
fn check_open_files(config: &Config) {
    let needed = crate::limits::fd::needed(
        config.limits.max_sessions,
        config.limits.max_pending,
        config.listeners.len(),
    );
    match crate::limits::fd::raise() {
        Ok(files) => {
            if files.before != files.now {
                tracing::debug!(before = ?files.before, now = ?files.now, "open files limit raised");
            }
            if let Some(now) = files.now.filter(|&n| n < needed) {
                tracing::warn!(limit = now, needed, "the open files limit (ulimit -n) is below what limits.max_sessions and max_pending need; raise it (LimitNOFILE= in systemd) or lower those limits");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C will stop pgbastion");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Runs the server until SIGTERM/SIGINT, then drains; a second signal ends
/// every remaining session at once (each still told and audited).
pub async fn serve(server: Server) {
    let handle = server.shutdown_handle();
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    let signals = tokio::spawn(async move {
        shutdown_signal().await;
        let _ = first_tx.send(());
        shutdown_signal().await;
        tracing::warn!("second signal: ending every session now");
        handle.now();
    });
    server
        .run(async {
            let _ = first_rx.await;
        })
        .await;
    signals.abort();
}

/// SIGHUP runs `ReloadHandle::reload_all` (audit file, secrets files,
/// rules, credentials, certificates); it logs what it did.
async fn reload_on_sighup(handle: ReloadHandle) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; nothing can be reloaded");
            return;
        }
    };
    while hup.recv().await.is_some() {
        let _ = handle.reload_all();
    }
}
