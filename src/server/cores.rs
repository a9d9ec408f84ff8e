//! Thread-per-core sessions (`pgbastion run --runtime per-core`, issue 24):
//! one single-threaded tokio runtime per core, each on its own thread, and
//! every accepted connection handed to the least loaded one for its whole
//! life. A session's sockets are registered with its core's reactor, so
//! every wake-up of its relay lands on the thread that runs it: no work
//! stealing, no cross-thread hand-off on the hot path. The shared runtime
//! (the default) keeps what runs once per process: accept loops, the admin
//! listener, reloads, Redis.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::stream::BoxedIo;

/// The session runtimes; dropping this stops them (after the drain: a
/// session still running on a core when it stops is dropped).
pub struct Cores {
    cores: Vec<Core>,
    /// Where the search for the least loaded core starts, turning with
    /// every connection: ties do not all go to the first core.
    next: AtomicUsize,
}

struct Core {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// How long a stopping core waits for blocking work of its sessions (a
/// PBKDF2 derivation, a DNS lookup) before it lets go.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// A connection accepted on the shared runtime, taken off its reactor so
/// that the core which runs the session registers it with its own.
pub enum Detached {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Detached {
    /// Registers the socket with the reactor of the runtime this runs on.
    fn attach(self) -> std::io::Result<BoxedIo> {
        Ok(match self {
            Detached::Tcp(s) => Box::new(tokio::net::TcpStream::from_std(s)?),
            Detached::Unix(s) => Box::new(tokio::net::UnixStream::from_std(s)?),
        })
    }
}

/// The runtime that owns what lives as long as the process: accept loops,
/// pools and their sweepers. A console `RELOAD` arrives on a session, which
/// with `--runtime per-core` runs on a core; what the reload starts must
/// not live there (a core is for its sessions, and stops after the drain).
#[derive(Clone, Debug)]
pub(crate) struct ProcessRuntime(Option<Handle>);

impl ProcessRuntime {
    /// The runtime this is called on (the one `Server` is made on), if any.
    pub fn current() -> ProcessRuntime {
        ProcessRuntime(Handle::try_current().ok())
    }

    /// Runs `f` (synchronous) with the process runtime current, so what it
    /// spawns or registers with a reactor goes to that runtime, whichever
    /// thread calls.
    pub fn enter<R>(&self, f: impl FnOnce() -> R) -> R {
        let _entered = self.0.as_ref().map(Handle::enter);
        f()
    }
}

impl Cores {
    /// Starts `n` session runtimes (at least one), each on a thread named
    /// `pgb-core-N`.
    pub fn start(n: usize) -> std::io::Result<Cores> {
        let cores = (0..n.max(1))
            .map(Core::start)
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Cores {
            cores,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs `session` on the least loaded core, with `conn` registered
    /// there, tracked by `tracker` (the drain waits for it like any other
    /// session).
    pub(super) fn spawn<F, Fut>(&self, tracker: &TaskTracker, conn: Detached, session: F)
    where
        F: FnOnce(BoxedIo) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(core) = self.least_loaded() else {
            return;
        };
        core.handle.spawn(tracker.track_future(async move {
            match conn.attach() {
                Ok(io) => session(io).await,
                Err(e) => warn!(error = %e, "cannot register an accepted connection with its core; closed"),
            }
        }));
    }
}

impl Cores {
    /// The core running the fewest tasks. Tasks, not connections: a
    /// WebSocket's session is a task of its own once its HTTP connection
    /// has upgraded, and tasks a session spawns count too.
    fn least_loaded(&self) -> Option<&Core> {
        let n = self.cores.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n.max(1);
        (0..n)
            .map(|i| &self.cores[(start + i) % n])
            .min_by_key(|c| c.handle.metrics().num_alive_tasks())
    }
}

impl Core {
    fn start(i: usize) -> std::io::Result<Core> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            // At most 15 characters: what Linux keeps of a thread name.
            .name(format!("pgb-core-{i}"))
            .spawn(move || {
                // Spawned sessions run while this waits.
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                runtime.shutdown_timeout(STOP_GRACE);
            })?;
        Ok(Core {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            // Never a thread joining itself (a task on this core that held
            // the last reference): it stops on its own once told to.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sessions_run_on_the_core_threads_spread_by_load_and_are_tracked() {
        let cores = Cores::start(2).unwrap();
        let tracker = TaskTracker::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (release, released) = tokio::sync::watch::channel(false);
        for _ in 0..4 {
            let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
            a.set_nonblocking(true).unwrap();
            let tx = tx.clone();
            let mut released = released.clone();
            cores.spawn(&tracker, Detached::Unix(a), move |_io| async move {
                let name = std::thread::current().name().map(str::to_owned);
                let _ = tx.send(name);
                let _ = released.wait_for(|r| *r).await;
            });
        }
        let mut names = Vec::new();
        for _ in 0..4 {
            names.push(rx.recv().await.unwrap().unwrap());
        }
        names.sort();
        assert_eq!(
            names,
            ["pgb-core-0", "pgb-core-0", "pgb-core-1", "pgb-core-1"]
        );
        tracker.close();
        assert_eq!(tracker.len(), 4, "the drain sees every session");
        release.send_replace(true);
        tracker.wait().await;
        // Ended tasks leave the count the placement reads (a task is
        // released just after its future is dropped).
        let alive = || -> usize {
            cores
                .cores
                .iter()
                .map(|c| c.handle.metrics().num_alive_tasks())
                .sum()
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            while alive() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("no task left on the cores");
    }

    /// What a session on a core starts through `ProcessRuntime::enter`
    /// runs on the process runtime; what it spawns otherwise stays on the
    /// core.
    #[test]
    fn work_entered_from_a_core_lands_on_the_process_runtime() {
        let process = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("pgb-process")
            .enable_all()
            .build()
            .unwrap();
        let on_process = process.block_on(async { ProcessRuntime::current() });
        let cores = Cores::start(1).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        cores.cores[0].handle.spawn(async move {
            let (entered, plain) = (tx.clone(), tx);
            on_process.enter(|| {
                tokio::spawn(async move {
                    let name = std::thread::current().name().map(str::to_owned);
                    let _ = entered.send(("entered", name));
                })
            });
            tokio::spawn(async move {
                let name = std::thread::current().name().map(str::to_owned);
                let _ = plain.send(("plain", name));
            });
        });
        let mut seen: Vec<_> = (0..2)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                ("entered", Some("pgb-process".to_owned())),
                ("plain", Some("pgb-core-0".to_owned())),
            ]
        );
    }
}
