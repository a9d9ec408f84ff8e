//! The serverless comparison (issue 23): what the `protocol = "https"`
//! listener costs against pgbastion's own TCP listener and a direct
//! connection, in one run, on one pgbastion with both listeners in front
//! of one pooled upstream (`auth = "scram"`, transaction mode,
//! `pool::POOL_SIZE` server connections):
//!
//! - **SQL over HTTP**: `CLIENTS` clients, each with its own keep-alive
//!   HTTPS connection, POST `select 1` to `/sql` back to back (Neon's
//!   contract). Every request is a whole short session inside pgbastion
//!   (login checked against the verifier, a pooled server connection, the
//!   JSON answer), so this is the price of "a connection per query"
//!   clients; beside it, in the same rounds, `CLIENTS` tokio-postgres
//!   clients doing `select 1` through the TCP listener (TLS, same pool)
//!   and direct. Requests/queries per second, p50/p99, pgbastion's CPU.
//! - **WebSocket round trip**: one session whose Postgres byte stream
//!   travels in binary WebSocket frames inside `wss`, `ROUND_TRIPS`
//!   sequential `select 1`, against the same over the TCP listener and
//!   direct: the framing's added latency.
//! - **Memory per open WebSocket**: RSS of a fresh pgbastion before and
//!   after `args.idle_sessions` authenticated idle WebSocket sessions,
//!   against the same number of TLS sessions on the TCP listener of
//!   another fresh instance (fresh, so neither reuses what the other
//!   freed).
//!
//! The HTTP client is a minimal HTTP/1.1 keep-alive client written here
//! (the crate enables hyper's server only): it writes the request with its
//! Content-Length and reads the answer's head and Content-Length body.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pgbastion::dev::certs::Ca;
use pgbastion::dev::localpg::free_port;
use pgbastion::http::websocket::{WsLimits, WsStream};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{
    clk_tck, cpu_ticks, insecure_tls, rss_kib, spawn_pgbastion, wait_port, Args, Bench, Proc,
    Results, Target,
};

/// Concurrent clients in the throughput comparison.
const CLIENTS: usize = 20;
/// Sequential queries in the round-trip comparison.
const ROUND_TRIPS: usize = 2000;
/// The SQL-over-HTTP request body.
const BODY: &str = r#"{"query":"select 1","params":[]}"#;
/// The largest response head the client accepts.
const MAX_HEAD: usize = 16 * 1024;

/// One way of running `select 1`, a row of the tables.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Via {
    Direct,
    /// pgbastion's Postgres (TCP) listener, TLS, the pooled upstream.
    Tcp,
    /// `POST /sql` on the https listener.
    Http,
    /// The Postgres protocol in a WebSocket on the https listener.
    Ws,
}

impl Via {
    /// Where the samples are kept in `Results`.
    fn target(self) -> Target {
        match self {
            Via::Direct => D,
            Via::Tcp => TCP,
            Via::Http | Via::Ws => WEB,
        }
    }
}

/// A pgbastion with a TCP and an https listener to one pooled upstream,
/// killed when dropped.
struct Instance {
    tcp: u16,
    web: u16,
    pid: u32,
    _proc: Proc,
}

/// What every client needs to reach its path.
struct Ctx {
    direct: String,
    tcp: String,
    web: u16,
    password: String,
    tls: TlsConnector,
    /// The complete `POST /sql` request, the same every time.
    request: Arc<Vec<u8>>,
}

/// The certificate for pgbastion's listeners, from a CA of this module's
/// own (the clients trust it), and the client TLS configuration.
fn certificates(dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf, TlsConnector)> {
    let ca = Ca::new("pgbastion bench serverless CA")?;
    let (cert, key) = ca
        .server_cert(&["localhost", "127.0.0.1"])?
        .write(dir, "proxy-serverless")?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes())?)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((cert, key, TlsConnector::from(Arc::new(config))))
}

/// Starts one instance (both listeners, audit log on, the verifier file
/// `Bench::setup` wrote for scram mode).
fn start(bench: &Bench, args: &Args, cert: &Path, key: &Path, n: usize) -> Result<Instance> {
    let dir = bench.pg.dir();
    let secrets = dir.join("pgbastion-userlist.txt");
    if !secrets.exists() {
        bail!("{} is missing (Bench::setup writes it)", secrets.display());
    }
    let (tcp, web) = (free_port()?, free_port()?);
    let text = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n\
         [[listener]]\nname = \"main\"\nlisten = \"127.0.0.1:{tcp}\"\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:{web}\"\nprotocol = \"https\"\n\
         [[upstream]]\naddress = \"localhost:{}\"\nca_file = \"{}\"\n\
         auth = \"scram\"\nsecrets_file = \"{}\"\n{}\
         [audit]\nlog = \"{}\"\n\
         [limits]\nmax_sessions = 4000\nmax_pending = 4000\n\
         [auth]\nmock_key_file = \"{}\"\n",
        cert.display(),
        key.display(),
        bench.pg.port,
        bench.pg.ca_cert.display(),
        secrets.display(),
        super::pool::pooled_upstream_keys(),
        dir.join("audit-serverless.jsonl").display(),
        dir.join("mock_key").display()
    );
    let cfg = dir.join(format!("pgbastion-serverless-{n}.toml"));
    std::fs::write(&cfg, text)?;
    let exe = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .context("the harness lives in target/<profile>/examples")?
        .join("pgbastion");
    let child = spawn_pgbastion(&exe, &cfg, args.workers, args.runtime.as_deref())?;
    let pid = child.id();
    let proc = Proc(child);
    wait_port(tcp, "pgbastion (serverless, TCP listener)")?;
    wait_port(web, "pgbastion (serverless, https listener)")?;
    Ok(Instance {
        tcp,
        web,
        pid,
        _proc: proc,
    })
}

/// A minimal HTTP/1.1 keep-alive client on one TLS connection.
struct HttpClient {
    io: TlsStream<TcpStream>,
    /// Bytes read and not yet consumed (the start of the next answer).
    buf: Vec<u8>,
    request: Arc<Vec<u8>>,
}

impl HttpClient {
    async fn connect(ctx: &Ctx) -> Result<HttpClient> {
        Ok(HttpClient {
            io: tls_connect(ctx, ctx.web).await?,
            buf: Vec::with_capacity(4096),
            request: ctx.request.clone(),
        })
    }

    /// Sends the request and reads the answer; anything but 200 fails.
    /// Returns the body.
    async fn post(&mut self) -> Result<Vec<u8>> {
        self.io.write_all(&self.request).await?;
        self.io.flush().await?;
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if self.buf.len() > MAX_HEAD {
                bail!("a response head over {MAX_HEAD} bytes");
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).context("a non-UTF-8 head")?;
        let status = head.split(' ').nth(1).unwrap_or("");
        let length = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .with_context(|| format!("no Content-Length in {head:?}"))?;
        let status = status.to_owned();
        while self.buf.len() < head_end + length {
            self.fill().await?;
        }
        let body = self.buf[head_end..head_end + length].to_vec();
        self.buf.drain(..head_end + length);
        if status != "200" {
            bail!("POST /sql: {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(body)
    }

    async fn fill(&mut self) -> Result<()> {
        let mut chunk = [0u8; 4096];
        let n = self.io.read(&mut chunk).await?;
        if n == 0 {
            bail!("the server closed the connection mid-answer");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn tls_connect(ctx: &Ctx, port: u16) -> Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost")?;
    Ok(ctx.tls.connect(name, tcp).await?)
}

/// A client of one path, connected and authenticated.
enum Client {
    Http(Box<HttpClient>),
    Pg(tokio_postgres::Client),
}

impl Client {
    async fn select1(&mut self) -> Result<()> {
        match self {
            Client::Http(c) => c.post().await.map(drop),
            Client::Pg(c) => c
                .simple_query("select 1")
                .await
                .map(drop)
                .map_err(Into::into),
        }
    }
}

impl Ctx {
    async fn connect(&self, path: Via) -> Result<Client> {
        match path {
            Via::Direct => pg_connect(&self.direct).await,
            Via::Tcp => pg_connect(&self.tcp).await,
            Via::Http => Ok(Client::Http(Box::new(HttpClient::connect(self).await?))),
            Via::Ws => self.ws_connect().await,
        }
    }

    /// `wss` (TLS trusting the bench CA, tungstenite's client handshake),
    /// then the Postgres protocol in binary frames; SCRAM without channel
    /// binding (the stream's TLS is the wss, not a Postgres SSLRequest's).
    async fn ws_connect(&self) -> Result<Client> {
        let tls = tls_connect(self, self.web).await?;
        let (ws, _response) = tokio_tungstenite::client_async("wss://localhost/", tls)
            .await
            .context("the WebSocket handshake")?;
        let stream = WsStream::client(ws.into_inner(), WsLimits::default()).await;
        let mut config = tokio_postgres::Config::new();
        config
            .user("postgres")
            .dbname("postgres")
            .password(self.password.as_str())
            .ssl_mode(tokio_postgres::config::SslMode::Disable)
            .channel_binding(tokio_postgres::config::ChannelBinding::Disable);
        let (client, conn) = config
            .connect_raw(stream, tokio_postgres::NoTls)
            .await
            .context("the Postgres login over the WebSocket")?;
        tokio::spawn(conn);
        Ok(Client::Pg(client))
    }
}

async fn pg_connect(conninfo: &str) -> Result<Client> {
    let (client, conn) = tokio_postgres::connect(conninfo, insecure_tls()).await?;
    tokio::spawn(conn);
    Ok(Client::Pg(client))
}

/// Operations per second and latency percentiles (µs) of one run.
struct Stats {
    per_sec: f64,
    p50: f64,
    p99: f64,
    count: usize,
}

fn stats(mut lat: Vec<f64>, elapsed: Duration) -> Stats {
    lat.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| crate::relay::quantile(&lat, q).unwrap_or(f64::NAN);
    Stats {
        per_sec: lat.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        count: lat.len(),
    }
}

/// `CLIENTS` clients of `path` doing `select 1` back to back for `secs`.
async fn load(ctx: &Ctx, path: Via, secs: u64) -> Result<Stats> {
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(ctx.connect(path).await?);
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for mut c in clients {
        tasks.spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                c.select1().await?;
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            anyhow::Ok(lat)
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done??);
    }
    Ok(stats(all, start.elapsed()))
}

/// One session of `path`, `ROUND_TRIPS` sequential `select 1`.
async fn round_trips(ctx: &Ctx, path: Via) -> Result<Stats> {
    let mut c = ctx.connect(path).await?;
    // The first query warms the pool's server connection.
    c.select1().await?;
    let start = Instant::now();
    let mut lat = Vec::with_capacity(ROUND_TRIPS);
    for _ in 0..ROUND_TRIPS {
        let t = Instant::now();
        c.select1().await?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(stats(lat, start.elapsed()))
}

/// RSS growth of `pid` per idle session of `path` (`n` sessions, each
/// authenticated and one query done), in KiB. The sessions are closed
/// before returning.
async fn idle_memory(ctx: &Ctx, pid: u32, path: Via, n: usize) -> Result<f64> {
    // One session first, kept open: what the first one costs once (the
    // pool's server connection, lazily built state) is not per session.
    let mut warm = ctx.connect(path).await?;
    warm.select1().await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid)?;
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = ctx.connect(path).await?;
        c.select1().await?;
        held.push(c);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid)?;
    drop((held, warm));
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

fn context(bench: &Bench, inst: &Instance, tls: TlsConnector) -> Ctx {
    let password = bench.pg.password.clone();
    let request = format!(
        "POST /sql HTTP/1.1\r\nHost: localhost\r\n\
         Neon-Connection-String: postgresql://postgres:{password}@localhost/postgres\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    Ctx {
        direct: format!(
            "{} password={password}",
            bench.conninfo(Target::Direct)
        ),
        tcp: format!(
            "host=localhost port={} user=postgres dbname=postgres sslmode=require password={password}",
            inst.tcp
        ),
        web: inst.web,
        password,
        tls,
        request: Arc::new(request.into_bytes()),
    }
}

/// The serverless comparison: memory on two fresh instances, then
/// `args.rounds` interleaved rounds of the throughput and round-trip
/// workloads on a third.
pub fn run(bench: &Bench, args: &Args) -> Result<Results> {
    let mut r = Results::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (cert, key, tls) = certificates(bench.pg.dir())?;
    for (n, path) in [(1, Via::Ws), (2, Via::Tcp)] {
        let inst = start(bench, args, &cert, &key, n)?;
        let ctx = context(bench, &inst, tls.clone());
        let kib = rt
            .block_on(idle_memory(&ctx, inst.pid, path, args.idle_sessions))
            .with_context(|| format!("idle {path:?} sessions"))?;
        r.add("serverless memory", path.target(), "kib_per_session", kib);
    }
    let inst = start(bench, args, &cert, &key, 0)?;
    let ctx = context(bench, &inst, tls);
    // Every path answers before anything is measured, and the answer to
    // `POST /sql` is a row.
    rt.block_on(async {
        for path in [Via::Direct, Via::Tcp, Via::Ws] {
            ctx.connect(path).await?.select1().await?;
        }
        let body = HttpClient::connect(&ctx).await?.post().await?;
        if !String::from_utf8_lossy(&body).contains("\"rows\"") {
            bail!(
                "POST /sql answered without rows: {}",
                String::from_utf8_lossy(&body)
            );
        }
        anyhow::Ok(())
    })?;
    for round in 0..args.rounds {
        eprintln!("serverless: round {} of {}", round + 1, args.rounds);
        for path in [Via::Direct, Via::Tcp, Via::Http] {
            let pid = (path != Via::Direct).then_some(inst.pid);
            let before = cpu_ticks(pid);
            let s = rt
                .block_on(load(&ctx, path, args.duration))
                .with_context(|| format!("{CLIENTS} {path:?} clients"))?;
            let after = cpu_ticks(pid);
            let w = "serverless load";
            r.add(w, path.target(), "per_sec", s.per_sec);
            r.add(w, path.target(), "p50_us", s.p50);
            r.add(w, path.target(), "p99_us", s.p99);
            if let (Some((ua, sa)), Some((ub, sb)), true) = (before, after, s.count > 0) {
                let us = ((ub - ua) + (sb - sa)) as f64 * 1e6 / clk_tck() / s.count as f64;
                r.add(w, path.target(), "cpu_us", us);
            }
        }
        for path in [Via::Direct, Via::Tcp, Via::Ws] {
            let s = rt
                .block_on(round_trips(&ctx, path))
                .with_context(|| format!("round trips over {path:?}"))?;
            r.add("serverless rtt", path.target(), "p50_us", s.p50);
            r.add("serverless rtt", path.target(), "p99_us", s.p99);
        }
    }
    Ok(r)
}

/// The rows of the tables, as `Results` keeps them.
const D: Target = Target::Direct;
const TCP: Target = Target::PgbastionPooled;
const WEB: Target = Target::PgbastionHttps;

/// The serverless section of the report.
pub fn report(args: &Args, r: &Results) -> Result<String> {
    let m = |w: &str, t, k| r.median(w, t, k).unwrap_or(f64::NAN);
    let mut s = String::new();
    writeln!(
        s,
        "### Serverless (issue 23)\n\nOne pgbastion with a Postgres listener and a `protocol = \"https\"` listener \
         in front of one upstream (`auth = \"scram\"`, `pool_mode = \"transaction\"`, pool of {}), audit log on; \
         TLS on every client leg. {CLIENTS} clients each doing `select 1` back to back for {} s: over TLS through \
         the TCP listener (tokio-postgres, simple query), direct, and SQL over HTTP (`POST /sql`, \
         `{BODY}`, one keep-alive HTTPS connection per client; every request is a whole session: login \
         checked against the verifier, a pooled server connection, the JSON answer).\n",
        super::pool::POOL_SIZE,
        args.duration
    )?;
    load_table(&mut s, r)?;
    rtt_table(&mut s, r)?;
    let w = "serverless memory";
    writeln!(
        s,
        "\nRSS per open idle session ({} sessions, each authenticated after one query, on a fresh instance each): \
         WebSocket {:.1} KiB, TLS on the TCP listener {:.1} KiB.",
        args.idle_sessions,
        m(w, WEB, "kib_per_session"),
        m(w, TCP, "kib_per_session"),
    )?;
    let lw = "serverless load";
    writeln!(
        s,
        "\nSQL over HTTP vs the TCP listener, same run: {:.2}x the throughput, {:.2}x the p50 latency, \
         {:.1}x pgbastion's CPU per query; vs direct {:.2}x the throughput. A WebSocket round trip adds \
         {:+.0} µs (p50) over the TCP listener.",
        m(lw, WEB, "per_sec") / m(lw, TCP, "per_sec"),
        m(lw, WEB, "p50_us") / m(lw, TCP, "p50_us"),
        m(lw, WEB, "cpu_us") / m(lw, TCP, "cpu_us"),
        m(lw, WEB, "per_sec") / m(lw, D, "per_sec"),
        // Rounded first, so that a difference under 0.5 µs reads "+0".
        (m("serverless rtt", WEB, "p50_us") - m("serverless rtt", TCP, "p50_us")).round() + 0.0,
    )?;
    Ok(s)
}

/// The throughput table: `CLIENTS` clients per path.
fn load_table(s: &mut String, r: &Results) -> Result<()> {
    let w = "serverless load";
    let m = |t, k| r.median(w, t, k).unwrap_or(f64::NAN);
    writeln!(
        s,
        "| {CLIENTS} clients, `select 1` | per second | p50 µs | p99 µs | pgbastion CPU per query, µs | vs TCP listener | vs direct |"
    )?;
    writeln!(s, "|---|---|---|---|---|---|---|")?;
    for (label, t) in [
        ("direct", D),
        ("pgbastion TCP listener (pooled)", TCP),
        ("pgbastion `POST /sql` (https listener)", WEB),
    ] {
        let ps = m(t, "per_sec");
        let ratio = |base: Target| {
            if base == t || (base == TCP && t == D) {
                "—".to_owned()
            } else {
                format!("{:.2}x", ps / m(base, "per_sec"))
            }
        };
        let cpu = r.median(w, t, "cpu_us");
        writeln!(
            s,
            "| {label} | {ps:.0} | {:.0} | {:.0} | {} | {} | {} |",
            m(t, "p50_us"),
            m(t, "p99_us"),
            cpu.map_or("—".to_owned(), |v| format!("{v:.0}")),
            ratio(TCP),
            ratio(D),
        )?;
    }
    Ok(())
}

/// The round-trip table: one session per path, sequential queries.
fn rtt_table(s: &mut String, r: &Results) -> Result<()> {
    let m = |t, k| r.median("serverless rtt", t, k).unwrap_or(f64::NAN);
    writeln!(
        s,
        "\n| one session, {ROUND_TRIPS} sequential `select 1` | p50 µs | p99 µs | p50 vs TCP listener | p50 vs direct |\n|---|---|---|---|---|"
    )?;
    for (label, t) in [
        ("direct", D),
        ("pgbastion TCP listener (pooled)", TCP),
        ("pgbastion WebSocket (wss, https listener)", WEB),
    ] {
        let p50 = m(t, "p50_us");
        let ratio = |base: Target| format!("{:.2}x", p50 / m(base, "p50_us"));
        writeln!(
            s,
            "| {label} | {p50:.0} | {:.0} | {} | {} |",
            m(t, "p99_us"),
            if t == WEB {
                ratio(TCP)
            } else {
                "—".to_owned()
            },
            if t == D { "—".to_owned() } else { ratio(D) },
        )?;
    }
    Ok(())
}
