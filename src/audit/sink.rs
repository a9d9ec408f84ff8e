//! Writing lines (audit events, log lines) off the session path: a thread
//! per sink behind a bounded queue, so a slow or stalled reader (a pipe
//! nobody drains, a full disk, a hung NFS mount) never blocks a runtime
//! thread. Sessions only ever `try_write`; when the queue is full the line is
//! dropped and counted, and the sink reports itself unhealthy so that the
//! audit log's `on_failure = "refuse"` can stop admitting sessions.

use crate::sync::MutexExt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::audit::chain::Chain;

/// A write that has not returned after this long means the sink is stuck.
const STUCK_AFTER: Duration = Duration::from_secs(1);

/// Where a sink's lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkTarget {
    Stdout,
    Stderr,
    /// Appended to; reopened on `reopen` (log rotation).
    File(PathBuf),
}

enum Msg {
    Line(Vec<u8>),
    Reopen,
    /// Answered once everything queued before it is written.
    Drain(std::sync::mpsc::Sender<()>),
}

struct State {
    /// Lines queued and not yet written.
    queued: AtomicUsize,
    capacity: usize,
    /// Lines dropped because the queue was full or the write failed.
    dropped: AtomicU64,
    /// Lines written.
    written: AtomicU64,
    /// The last write failed.
    failing: AtomicBool,
    /// Milliseconds since `epoch` when the write in progress began (0: none).
    writing_since: AtomicU64,
    epoch: Instant,
}

impl State {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

/// A handle to one writer thread. Cloning shares the thread.
#[derive(Clone)]
pub struct Sink {
    tx: SyncSender<Msg>,
    state: Arc<State>,
}

impl Sink {
    /// Opens the target (a file that cannot be opened is an error now, not
    /// later) and starts the writer thread.
    pub fn spawn(name: &str, target: SinkTarget, capacity: usize) -> io::Result<Sink> {
        Sink::start(name, target, capacity, None, Duration::ZERO)
    }

    /// The audit log's writer: it stamps each line with `chain` as it is
    /// written, so the chain holds exactly the lines that reached the file,
    /// and gathers lines for `LINGER` before a write (with the query audit
    /// it gets a line per statement: the one sink busy enough to need it).
    pub fn spawn_audit(
        target: SinkTarget,
        capacity: usize,
        chain: Arc<Mutex<Chain>>,
    ) -> io::Result<Sink> {
        Sink::start("audit", target, capacity, Some(chain), LINGER)
    }

    fn start(
        name: &str,
        target: SinkTarget,
        capacity: usize,
        chain: Option<Arc<Mutex<Chain>>>,
        linger: Duration,
    ) -> io::Result<Sink> {
        let out = open(&target)?;
        Sink::writing_to(name, out, target, capacity, chain, linger)
    }

    /// Starts the writer thread on `out`, which is already open (`target`
    /// says what reopening it means).
    fn writing_to(
        name: &str,
        out: Box<dyn Write + Send>,
        target: SinkTarget,
        capacity: usize,
        chain: Option<Arc<Mutex<Chain>>>,
        linger: Duration,
    ) -> io::Result<Sink> {
        let (tx, rx) = sync_channel(capacity);
        let state = Arc::new(State {
            queued: AtomicUsize::new(0),
            capacity,
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            writing_since: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let thread_state = state.clone();
        std::thread::Builder::new()
            .name(format!("pgbastion-{name}"))
            .spawn(move || write_loop(rx, out, target, thread_state, chain, linger))?;
        Ok(Sink { tx, state })
    }

    /// Queues a line (which should end with '\n'). Never blocks: returns
    /// false, and counts the line as dropped, when the queue is full.
    pub fn try_write(&self, line: Vec<u8>) -> bool {
        self.state.queued.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(Msg::Line(line)) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.state.queued.fetch_sub(1, Ordering::SeqCst);
                self.state.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Asks the writer to reopen a file target (after log rotation).
    pub fn reopen(&self) {
        // A full queue reopens after the lines ahead of it; try until then.
        let _ = self.tx.try_send(Msg::Reopen);
    }

    /// Waits up to `limit` for every line queued so far to be written (at
    /// exit, so the last audit events are not lost). Returns whether they
    /// were.
    pub fn drain(&self, limit: Duration) -> bool {
        let start = Instant::now();
        let (ack_tx, ack_rx) = std::sync::mpsc::channel();
        let mut msg = Msg::Drain(ack_tx);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if start.elapsed() < limit => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
        ack_rx
            .recv_timeout(limit.saturating_sub(start.elapsed()))
            .is_ok()
    }

    /// Whether lines are being written: the last write succeeded, none is
    /// stuck, and the queue has room.
    pub fn healthy(&self) -> bool {
        let s = &self.state;
        let since = s.writing_since.load(Ordering::SeqCst);
        let stuck = since != 0 && s.now_ms().saturating_sub(since) > STUCK_AFTER.as_millis() as u64;
        !s.failing.load(Ordering::SeqCst) && !stuck && s.queued.load(Ordering::SeqCst) < s.capacity
    }

    /// Lines written so far.
    pub fn written(&self) -> u64 {
        self.state.written.load(Ordering::Relaxed)
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.state.dropped.load(Ordering::Relaxed)
    }
}

fn open(target: &SinkTarget) -> io::Result<Box<dyn Write + Send>> {
    Ok(match target {
        SinkTarget::Stdout => Box::new(io::stdout()),
        SinkTarget::Stderr => Box::new(io::stderr()),
        SinkTarget::File(path) => Box::new(append(path)?),
    })
}

fn append(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// At most this much is written in one go: under load, lines queued
/// together go out in one write instead of one system call each.
const BATCH_BYTES: usize = 64 * 1024;

/// Once a line arrives, the audit writer waits this long for more before
/// writing (unless its last batch was full: then it writes at once). A
/// session that queues a line then finds the writer asleep rather than
/// parked on the queue, so it pays no wake-up, and the writer makes one
/// system call per batch instead of one per line: with the query audit (a
/// line per statement) this is most of what a line costs. An audit line
/// reaches its file at most this much later.
const LINGER: Duration = Duration::from_millis(2);

fn write_loop(
    rx: Receiver<Msg>,
    mut out: Box<dyn Write + Send>,
    target: SinkTarget,
    state: Arc<State>,
    chain: Option<Arc<Mutex<Chain>>>,
    linger: Duration,
) {
    mark_continued(&mut out, &target, chain.as_deref());
    // A message taken while gathering a batch, handled after it.
    let mut carried: Option<Msg> = None;
    // The last batch was full: lines are coming faster than a linger
    // gathers, so the next batch is written at once.
    let mut busy = false;
    loop {
        let msg = match carried.take() {
            Some(m) => m,
            None => match rx.recv() {
                Ok(m) => m,
                Err(_) => return,
            },
        };
        match msg {
            Msg::Line(first) => {
                if !busy && !linger.is_zero() {
                    std::thread::sleep(linger);
                }
                let mut lines = vec![first];
                let mut bytes = lines[0].len();
                while bytes < BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(Msg::Line(l)) => {
                            bytes += l.len();
                            lines.push(l);
                        }
                        Ok(other) => {
                            carried = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                busy = bytes >= BATCH_BYTES;
                write_batch(&mut out, &lines, &state, chain.as_deref());
            }
            Msg::Drain(ack) => {
                let _ = ack.send(());
            }
            Msg::Reopen => {
                if let SinkTarget::File(path) = &target {
                    match append(path) {
                        Ok(f) => {
                            out = Box::new(f);
                            mark_continued(&mut out, &target, chain.as_deref());
                        }
                        // Keep writing to the old file rather than lose lines.
                        Err(_) => state.failing.store(true, Ordering::SeqCst),
                    }
                }
            }
        }
    }
}

/// A chained file opened empty while the chain already has lines (after a
/// rotation, or a reload to a new file) starts with a line that says it
/// continues another file, so that `audit verify` can tell it from a file
/// whose first lines were removed (issue 19 item 20).
fn mark_continued(
    out: &mut Box<dyn Write + Send>,
    target: &SinkTarget,
    chain: Option<&Mutex<Chain>>,
) {
    let (Some(chain), SinkTarget::File(path)) = (chain, target) else {
        return;
    };
    if std::fs::metadata(path).map_or(true, |m| m.len() > 0) {
        return;
    }
    let mut chain = chain.locked();
    if chain.seq() == 0 {
        return;
    }
    let line = format!(
        "{{\"ts\":\"{}\",\"event\":\"{}\"}}",
        humantime::format_rfc3339_millis(std::time::SystemTime::now()),
        crate::audit::chain::CONTINUED
    );
    let stamped = chain.stamp(line.as_bytes());
    if out.write_all(&stamped).and_then(|()| out.flush()).is_ok() {
        chain.written(&stamped);
    }
}

/// Writes `lines` in one write, stamped with the chain (which moves on
/// only if the write succeeded: lines that were not written are not in
/// it).
fn write_batch(
    out: &mut Box<dyn Write + Send>,
    lines: &[Vec<u8>],
    state: &State,
    chain: Option<&Mutex<Chain>>,
) {
    state.writing_since.store(state.now_ms(), Ordering::SeqCst);
    let ok = match chain {
        None if lines.len() == 1 => out.write_all(&lines[0]).and_then(|()| out.flush()).is_ok(),
        None => {
            let buf = lines.concat();
            out.write_all(&buf).and_then(|()| out.flush()).is_ok()
        }
        Some(chain) => {
            let mut chain = chain.locked();
            let mut next = chain.clone();
            let mut buf = Vec::with_capacity(lines.iter().map(|l| l.len() + 100).sum());
            for line in lines {
                let stamped = next.stamp(line);
                next.written(&stamped);
                buf.extend_from_slice(&stamped);
            }
            let ok = out.write_all(&buf).and_then(|()| out.flush()).is_ok();
            if ok {
                *chain = next;
            }
            ok
        }
    };
    let n = lines.len();
    state.writing_since.store(0, Ordering::SeqCst);
    state.queued.fetch_sub(n, Ordering::SeqCst);
    state.failing.store(!ok, Ordering::SeqCst);
    if ok {
        state.written.fetch_add(n as u64, Ordering::Relaxed);
    } else {
        state.dropped.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// `tracing_subscriber` writes each log line through one of these; the
/// line goes to the sink when the writer is dropped.
pub struct LineWriter {
    sink: Sink,
    buf: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.sink.try_write(std::mem::take(&mut self.buf));
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Sink {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            sink: self.clone(),
            buf: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the size of every write it is given.
    struct Writes(Arc<Mutex<Vec<usize>>>);

    impl Write for Writes {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(data.len());
            Ok(data.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Lines queued while the audit writer lingers go out in one write,
    /// stamped in order.
    #[test]
    fn the_audit_writer_gathers_lines_into_one_write() {
        let writes = Arc::new(Mutex::new(Vec::new()));
        let chain = Arc::new(Mutex::new(Chain::new(crate::audit::chain::Digest::Sha256)));
        let sink = Sink::writing_to(
            "test",
            Box::new(Writes(writes.clone())),
            SinkTarget::Stdout,
            16,
            Some(chain.clone()),
            Duration::from_millis(200),
        )
        .unwrap();
        for i in 0..5 {
            assert!(sink.try_write(format!("{{\"n\":{i}}}\n").into_bytes()));
        }
        assert!(sink.drain(Duration::from_secs(10)));
        assert_eq!(writes.lock().unwrap().len(), 1, "{:?}", writes.lock());
        assert_eq!(sink.written(), 5);
        let stamped = chain.lock().unwrap().clone();
        assert!(format!("{:?}", stamped).contains("seq: 5"), "{stamped:?}");
    }

    #[test]
    fn writes_lines_in_order_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.log");
        let sink = Sink::spawn("test", SinkTarget::File(path.clone()), 16).unwrap();
        for i in 0..10 {
            assert!(sink.try_write(format!("line {i}\n").into_bytes()));
        }
        let wait = |p: &PathBuf, n: usize| {
            let start = Instant::now();
            loop {
                let text = std::fs::read_to_string(p).unwrap_or_default();
                if text.lines().count() == n {
                    return text;
                }
                assert!(start.elapsed() < Duration::from_secs(10), "{text}");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let text = wait(&path, 10);
        assert!(text.starts_with("line 0\nline 1\n"));
        let rotated = dir.path().join("out.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        sink.reopen();
        assert!(sink.try_write(b"after\n".to_vec()));
        assert_eq!(wait(&path, 1), "after\n");
        assert_eq!(wait(&rotated, 10).lines().count(), 10);
        assert!(sink.healthy());
        assert_eq!(sink.dropped(), 0);
        for i in 0..5 {
            sink.try_write(format!("more {i}\n").into_bytes());
        }
        assert!(sink.drain(Duration::from_secs(10)));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 6);
    }

    #[test]
    fn a_full_queue_drops_and_reports_unhealthy() {
        // A pipe nobody reads: the writer blocks on it once its buffer is
        // full, and the queue fills up behind it.
        let (reader, writer) = std::io::pipe().unwrap();
        let sink = Sink::writing_to(
            "test",
            Box::new(writer),
            SinkTarget::Stdout,
            4,
            None,
            Duration::ZERO,
        )
        .unwrap();
        let big = vec![b'x'; 64 * 1024];
        let mut refused = 0;
        let start = Instant::now();
        while refused == 0 {
            if !sink.try_write(big.clone()) {
                refused += 1;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "never filled up");
        }
        // The writer may take a line off the queue between the refusal and
        // the check (room again, not yet stuck): the sink must turn
        // unhealthy all the same, once it has been stuck long enough.
        while sink.healthy() {
            assert!(start.elapsed() < Duration::from_secs(20), "never unhealthy");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(sink.dropped() >= 1);
        drop(reader);
    }
}
