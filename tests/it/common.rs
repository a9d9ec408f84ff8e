//! The integration-test harness: a real PostgreSQL (TLS, SCRAM, its own CA,
//! random port) from `pgbastion::dev::localpg`, pgbastion running in-process on
//! its own runtime thread, and real clients (psql and tokio-postgres).
//! Everything started here stops when its value is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgbastion::config::{BindAddress, Config};
use pgbastion::dev::certs::Ca;
use pgbastion::dev::localpg::{LocalPg, LocalPgOptions};
use pgbastion::server::Server;
use tokio::net::TcpStream;

/// pgbastion's own CA and certificate (for localhost), made per test.
pub struct ProxyCerts {
    pub dir: tempfile::TempDir,
    pub proxy_ca: PathBuf,
    pub proxy_cert: PathBuf,
    pub proxy_key: PathBuf,
}

impl ProxyCerts {
    pub fn new() -> ProxyCerts {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("pgbastion test proxy CA").unwrap();
        let proxy_ca = ca.write_cert(dir.path(), "proxy-ca").unwrap();
        let (proxy_cert, proxy_key) = ca
            .server_cert(&["localhost", "127.0.0.1"])
            .unwrap()
            .write(dir.path(), "proxy")
            .unwrap();
        ProxyCerts {
            dir,
            proxy_ca,
            proxy_cert,
            proxy_key,
        }
    }

    /// The `[tls]` section for pgbastion's certificate.
    pub fn tls_toml(&self) -> String {
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            self.proxy_cert.display(),
            self.proxy_key.display()
        )
    }
}

/// A PostgreSQL server plus pgbastion's own CA and certificate.
pub struct Env {
    pub pg: LocalPg,
    pub certs: ProxyCerts,
}

impl std::ops::Deref for Env {
    type Target = ProxyCerts;
    fn deref(&self) -> &ProxyCerts {
        &self.certs
    }
}

impl Env {
    pub fn new() -> Env {
        let pg = LocalPg::start(LocalPgOptions::default()).expect("start PostgreSQL");
        Env {
            pg,
            certs: ProxyCerts::new(),
        }
    }

    /// The `[[upstream]]` section for this environment's PostgreSQL.
    pub fn upstream_toml(&self) -> String {
        format!(
            "[[upstream]]\nname = \"pg\"\naddress = \"localhost:{}\"\nca_file = \"{}\"\n",
            self.pg.port,
            self.pg.ca_cert.display()
        )
    }

    /// pgbastion with one TCP listener (`client_tls` as given) in front of
    /// this environment's PostgreSQL, plus any extra TOML.
    pub fn proxy(&self, client_tls: &str, extra: &str) -> Proxy {
        self.proxy_with(&format!("client_tls = \"{client_tls}\""), extra)
    }

    /// pgbastion with one TCP listener named "tcp" carrying `listener_keys`
    /// (TOML lines), in front of this environment's PostgreSQL, plus `extra`.
    pub fn proxy_with(&self, listener_keys: &str, extra: &str) -> Proxy {
        let toml = format!(
            "{}\n[[listener]]\nname = \"tcp\"\nlisten = \"127.0.0.1:0\"\n{listener_keys}\n{}\n{extra}",
            self.tls_toml(),
            self.upstream_toml()
        );
        Proxy::start_toml(&toml)
    }

    /// A libpq connection string to pgbastion at `addr`, verifying
    /// pgbastion's certificate.
    pub fn via_proxy(&self, addr: SocketAddr, extra: &str) -> String {
        format!(
            "host=localhost port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={} {extra}",
            addr.port(),
            self.proxy_ca.display()
        )
    }

    /// A direct (verify-full) tokio-postgres connection to PostgreSQL.
    pub async fn direct_client(&self) -> tokio_postgres::Client {
        let tls = tls_connector(&self.pg.ca_cert);
        let (client, conn) = tokio_postgres::connect(
            &format!(
                "host=localhost port={} user=postgres password={} dbname=postgres sslmode=require",
                self.pg.port, self.pg.password
            ),
            tls,
        )
        .await
        .expect("direct connection");
        tokio::spawn(conn);
        client
    }

    /// Runs psql with the server's password; returns its output.
    pub fn psql(&self, conninfo: &str, sql: &str) -> Output {
        psql(conninfo, &self.pg.password, sql)
    }
}

pub fn psql(conninfo: &str, password: &str, sql: &str) -> Output {
    psql_command(conninfo, sql)
        .env("PGPASSWORD", password)
        .output()
        .expect("psql must be installed")
}

/// psql with no password anywhere (no PGPASSWORD, no password file, never
/// prompting): it fails if anyone asks for one.
pub fn psql_without_password(conninfo: &str, sql: &str) -> Output {
    psql_command(conninfo, sql)
        .arg("-w")
        .env_remove("PGPASSWORD")
        .env("PGPASSFILE", "/dev/null")
        .output()
        .expect("psql must be installed")
}

fn psql_command(conninfo: &str, sql: &str) -> Command {
    let mut cmd = Command::new("psql");
    cmd.args([
        "-X",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        conninfo,
        "-c",
        sql,
    ])
    .env("PGCONNECT_TIMEOUT", "15");
    cmd
}

/// A client certificate for a person: CN `name`, e-mail `name@example.com`.
pub fn person(ca: &pgbastion::dev::certs::Ca, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.subject_alt_names = vec![rcgen::SanType::Rfc822Name(
        format!("{name}@example.com").try_into().unwrap(),
    )];
    ca.issue(p).unwrap().write(dir, name).unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_owned()
}

/// A tokio-postgres TLS connector trusting one CA file.
pub fn tls_connector(ca: &Path) -> tokio_postgres_rustls::MakeRustlsConnect {
    tokio_postgres_rustls::MakeRustlsConnect::new(client_tls_config(ca, &[]))
}

/// A rustls client config trusting one CA file, with optional ALPN.
pub fn client_tls_config(ca: &Path, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in pgbastion::tls::load_certs(ca, "CA").unwrap() {
        roots.add(cert).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    cfg
}

/// A tokio-postgres client and its connection task.
pub type PgConn = (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
);

/// pgbastion running on a thread of its own, so tests may block (run psql)
/// without stalling it. Dropping it shuts it down and joins the thread.
pub struct Proxy {
    pub addrs: Vec<(String, BindAddress)>,
    pub audit_log: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts pgbastion from TOML. Unless the TOML sets them, the audit log
    /// and the mock-salt key go to files in a temporary directory and the
    /// drain is short; a
    /// TOML with its own `[audit]` may name that file as `{audit_log}`.
    pub fn start_toml(toml: &str) -> Proxy {
        Proxy::start_toml_on(toml, None)
    }

    /// The same, with sessions on `cores` single-threaded runtimes of
    /// their own (`--runtime per-core`) when given.
    pub fn start_toml_on(toml: &str, cores: Option<usize>) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let audit_log = dir.path().join("audit.jsonl");
        let mut toml = toml.replace("{audit_log}", &audit_log.display().to_string());
        if !toml.contains("[audit]") {
            toml.push_str(&format!("\n[audit]\nlog = \"{}\"\n", audit_log.display()));
        }
        if !toml.contains("[timeouts]") {
            toml.push_str("\n[timeouts]\nshutdown_drain = \"1s\"\n");
        }
        if !toml.contains("[auth]") {
            // scram mode's mock-salt key: in the test's directory, not the
            // state directory of whoever runs the tests.
            let key = dir.path().join("mock_key");
            toml.push_str(&format!(
                "\n[auth]\nmock_key_file = \"{}\"\n",
                key.display()
            ));
        }
        let config =
            Config::from_toml(&toml).unwrap_or_else(|e| panic!("test config: {e}\n{toml}"));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let bound = Server::bind(config).await.map(|server| match cores {
                    Some(n) => server.with_cores(
                        pgbastion::server::Cores::start(n).expect("start the session cores"),
                    ),
                    None => server,
                });
                match bound {
                    Ok(server) => {
                        let _ = addr_tx.send(Ok(server.local_addrs()));
                        server
                            .run(async {
                                let _ = stop_rx.await;
                            })
                            .await;
                    }
                    Err(e) => {
                        let _ = addr_tx.send(Err(e.to_string()));
                    }
                }
            });
        });
        let addrs = addr_rx
            .recv()
            .unwrap()
            .unwrap_or_else(|e| panic!("pgbastion failed to start: {e}"));
        Proxy {
            addrs,
            audit_log,
            stop: Some(stop_tx),
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// The first TCP listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs
            .iter()
            .find_map(|(_, a)| match a {
                BindAddress::Tcp(a) => Some(*a),
                BindAddress::Unix(_) => None,
            })
            .expect("a TCP listener")
    }

    /// The audit events written so far, parsed. A line still being
    /// written (no newline yet) is not one of them.
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.audit_log).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// Waits until exactly `n` audit events match `pred`, and returns them.
    pub fn wait_audit_count(
        &self,
        what: &str,
        n: usize,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        wait_for(what, Duration::from_secs(10), || {
            let found: Vec<serde_json::Value> = self
                .audit_events()
                .into_iter()
                .filter(|e| pred(e))
                .collect();
            (found.len() == n).then_some(found)
        })
    }

    /// Waits until an audit event matching `pred` is written.
    pub fn wait_audit(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_for(what, Duration::from_secs(10), || {
            self.audit_events().into_iter().find(|e| pred(e))
        })
    }

    /// A tokio-postgres connection through pgbastion with TLS.
    pub async fn client(&self, env: &Env, extra: &str) -> Result<PgConn, tokio_postgres::Error> {
        self.client_with(&env.certs, &env.pg.password, extra).await
    }

    /// Like `client`, for tests without an `Env`.
    pub async fn client_with(
        &self,
        certs: &ProxyCerts,
        password: &str,
        extra: &str,
    ) -> Result<PgConn, tokio_postgres::Error> {
        let conninfo = format!(
            "host=localhost port={} user=postgres password={password} dbname=postgres sslmode=require channel_binding=disable connect_timeout=20 {extra}",
            self.addr().port(),
        );
        let (client, conn) =
            tokio_postgres::connect(&conninfo, tls_connector(&certs.proxy_ca)).await?;
        Ok((client, tokio::spawn(conn)))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits (10 s at most) until pgbastion's log at `log` contains `line`
/// (what a reload writes when it is done: "certificates re-read", ...),
/// and returns the log's text.
pub fn wait_log(log: &Path, line: &str) -> String {
    wait_for(line, Duration::from_secs(10), || {
        std::fs::read_to_string(log)
            .ok()
            .filter(|t| t.contains(line))
    })
}

/// Polls `check` until it returns Some, or panics after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Async form of `wait_for`.
pub async fn wait_for_async<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects a raw TCP socket.
pub async fn raw(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

/// Reads one backend message (type byte, body) from a raw stream.
pub async fn read_message<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
) -> std::io::Result<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let t = s.read_u8().await?;
    let len = s.read_u32().await? as usize;
    let mut body = vec![0; len.saturating_sub(4)];
    s.read_exact(&mut body).await?;
    Ok((t, body))
}

/// Reads until an ErrorResponse and returns its SQLSTATE and message.
pub async fn read_error<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (String, String) {
    loop {
        let (t, body) = read_message(s).await.expect("an ErrorResponse before EOF");
        if t == b'E' {
            let f = pgbastion::protocol::message::ErrorFields::parse(&body).unwrap();
            return (f.code, f.message);
        }
    }
}

/// The SQLSTATE of a tokio-postgres error, if the server (or pgbastion) sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_owned())
}

/// SSLRequest, `S`, then a TLS handshake verifying pgbastion's certificate.
pub async fn ssl_request_then_tls(
    mut tcp: tokio::net::TcpStream,
    certs: &ProxyCerts,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tokio::io::AsyncWriteExt::write_all(&mut tcp, &pgbastion::protocol::startup::ssl_request())
        .await
        .unwrap();
    assert_eq!(
        tokio::io::AsyncReadExt::read_u8(&mut tcp).await.unwrap(),
        b'S'
    );
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_tls_config(
        &certs.proxy_ca,
        &[],
    )));
    connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

/// Connects through pgbastion from a chosen loopback address (the
/// listener allows plaintext: the tailnet or LAN protects this leg).
pub async fn connect_from(
    proxy: SocketAddr,
    from: &str,
    user: &str,
    db: &str,
    password: &str,
    app: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let stream = sock.connect(proxy).await.unwrap();
    pg_over_as(stream, user, db, password, app).await
}

/// HAProxy from Debian's package as a real peer, in the foreground with its
/// log on stdout (captured to a file). Killed on drop.
pub struct Haproxy {
    child: std::process::Child,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// Starts HAProxy with `body` (frontends and backends) after a common
    /// global/defaults section, and waits until `port` accepts connections.
    pub fn start(body: &str, port: u16) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("haproxy.cfg");
        let log = dir.path().join("haproxy.log");
        std::fs::write(
            &cfg,
            format!(
                "global\n  log stdout format raw local0\n\ndefaults\n  mode tcp\n  log global\n  \
                 timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\n{body}\n"
            ),
        )
        .unwrap();
        let child = std::process::Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("haproxy must be installed (the test command installs it)");
        let mut h = Haproxy {
            child,
            log,
            _dir: dir,
        };
        wait_for("haproxy to listen", Duration::from_secs(10), || {
            if let Ok(Some(status)) = h.child.try_wait() {
                panic!("haproxy exited: {status}");
            }
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        h
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// tokio-postgres as `postgres` over a stream that is already set up (plain
/// TCP, or TLS the test negotiated itself), with an application_name.
pub async fn pg_over<S>(
    stream: S,
    password: &str,
    app: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    pg_over_as(stream, "postgres", "postgres", password, app).await
}

/// Like `pg_over`, as another user and database.
pub async fn pg_over_as<S>(
    stream: S,
    user: &str,
    db: &str,
    password: &str,
    app: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut cfg = tokio_postgres::Config::new();
    cfg.user(user)
        .password(password)
        .dbname(db)
        .application_name(app)
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    let (client, conn) = cfg.connect_raw(stream, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Waits until the server runs a query for `app`; returns its server pid.
pub async fn wait_active(direct: &tokio_postgres::Client, app: &str) -> i32 {
    wait_for_async(
        "the query to run on the server",
        Duration::from_secs(15),
        || async {
            direct
            .query_opt(
                "select pid from pg_stat_activity where application_name = $1 and state = 'active'",
                &[&app],
            )
            .await
            .unwrap()
            .map(|r| r.get::<_, i32>(0))
        },
    )
    .await
}

/// The pgbastion binary built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_pgbastion");

/// A child process (pgbastion, a client) killed when the test ends, pass
/// or fail.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until something accepts connections on 127.0.0.1:`port`.
pub fn wait_listening(port: u16) -> SocketAddr {
    let addr = ([127, 0, 0, 1], port).into();
    wait_for("pgbastion to listen", Duration::from_secs(10), || {
        std::net::TcpStream::connect(addr).ok()
    });
    addr
}

/// Sends a signal (`-HUP`, `-TERM`, ...) with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Runs the libpq 18 client (tests/clients/libpq18.py, psycopg's bundled
/// libpq) and returns its JSON report.
pub fn libpq18(conninfo: &str, mode: &str) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/libpq18.py");
    let out = Command::new("python3")
        .args([script, conninfo, mode])
        .output()
        .expect("python3 must be installed");
    assert!(
        out.status.success(),
        "libpq18.py failed (the test command installs psycopg[binary]): {}",
        stderr(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A rustls server config presenting an issued certificate (rogue and
/// fake upstreams).
pub fn tls_server_config(issued: &pgbastion::dev::certs::Issued) -> rustls::ServerConfig {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap()
}

/// `pgbastion run`'s arguments for sessions on two single-threaded runtimes
/// of their own (issue 24).
pub const PER_CORE: [&str; 4] = ["--runtime", "per-core", "--session-threads", "2"];

/// The pgbastion binary, with scram mode's mock-salt key kept in a
/// directory of the test run's (STATE_DIRECTORY), not in the state
/// directory of whoever runs the tests.
pub fn bin() -> Command {
    static STATE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let state = STATE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pgbastion-tests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    });
    let mut cmd = Command::new(BIN);
    cmd.env("STATE_DIRECTORY", state);
    cmd
}

/// `pgbastion run --config CFG`, its log (stderr) in `log`, or discarded.
pub fn config_form(cfg: &Path, log: Option<&Path>) -> Command {
    let mut cmd = bin();
    cmd.args(["run", "--config"]).arg(cfg).stderr(match log {
        Some(log) => std::process::Stdio::from(std::fs::File::create(log).unwrap()),
        None => std::process::Stdio::null(),
    });
    cmd
}

/// `pgbastion run` in its flag-only form in front of `env`'s PostgreSQL,
/// listening on 127.0.0.1:`port`, optionally under a wrapper command
/// (e.g. `prlimit`).
pub fn flag_form(env: &Env, port: u16, wrapper: &[&str]) -> Command {
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(BIN);
            c
        }
        None => bin(),
    };
    cmd.env("STATE_DIRECTORY", env.dir.path())
        .args(["run", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--tls-cert")
        .arg(&env.proxy_cert)
        .arg("--tls-key")
        .arg(&env.proxy_key)
        .args(["--upstream", &format!("localhost:{}", env.pg.port)])
        .arg("--upstream-ca")
        .arg(&env.pg.ca_cert);
    cmd
}

/// A real Redis (Debian's `redis-server`) on a free loopback port, run as
/// the unprivileged `redis` user, without persistence: a restart starts it
/// empty, as a fleet must survive. Killed when dropped.
pub struct Redis {
    child: Option<std::process::Child>,
    pub port: u16,
    /// TLS only (`rediss://`), with this certificate and key.
    tls: bool,
    dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(None)
    }

    /// Speaking TLS only, presenting `issued` (no client certificates).
    pub fn start_tls(issued: &pgbastion::dev::certs::Issued) -> Redis {
        Redis::start_with(Some(issued))
    }

    fn start_with(tls: Option<&pgbastion::dev::certs::Issued>) -> Redis {
        let dir = tempfile::tempdir().unwrap();
        if let Some(issued) = tls {
            // Where the redis user can read them.
            std::fs::write(dir.path().join("redis.crt"), &issued.cert_pem).unwrap();
            std::fs::write(dir.path().join("redis.key"), &issued.key_pem).unwrap();
            let (uid, gid) = redis_user();
            for f in ["redis.crt", "redis.key"] {
                std::os::unix::fs::chown(dir.path().join(f), Some(uid), Some(gid)).unwrap();
            }
        }
        let mut r = Redis {
            child: None,
            port: pgbastion::dev::localpg::free_port().unwrap(),
            tls: tls.is_some(),
            dir,
        };
        r.restart();
        r
    }

    /// Starts it (again, empty) on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let (uid, gid) = redis_user();
        std::os::unix::fs::chown(self.dir.path(), Some(uid), Some(gid)).unwrap();
        let tls = self.tls;
        let tls_args: Vec<std::ffi::OsString> = if tls {
            vec![
                "--tls-port".into(),
                self.port.to_string().into(),
                "--tls-cert-file".into(),
                self.dir.path().join("redis.crt").into(),
                "--tls-key-file".into(),
                self.dir.path().join("redis.key").into(),
                "--tls-auth-clients".into(),
                "no".into(),
            ]
        } else {
            Vec::new()
        };
        let mut cmd = Command::new("setpriv");
        cmd.args([
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--clear-groups".into(),
            "--pdeathsig".into(),
            "KILL".into(),
            "--".into(),
            "redis-server".into(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--port".into(),
            if tls {
                "0".into()
            } else {
                self.port.to_string()
            },
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
        ])
        .arg(self.dir.path())
        .args(&tls_args)
        .stdout(std::fs::File::create(self.dir.path().join("redis.log")).unwrap())
        .stderr(std::process::Stdio::null());
        self.child = Some(
            cmd.spawn()
                .expect("redis-server must be installed (the test command installs it)"),
        );
        let port = self.port;
        wait_for("redis-server to listen", Duration::from_secs(10), || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("redis-server exited: {status}: {}", self.log());
            }
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
    }

    /// Stops it (SIGKILL: what a crash or a lost node looks like).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `redis` user's uid and gid (created by the Debian package), else
/// `nobody`'s.
fn redis_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    ["redis", "nobody"]
        .iter()
        .find_map(|wanted| {
            passwd.lines().find_map(|line| {
                let f: Vec<&str> = line.split(':').collect();
                (f.len() >= 4 && f[0] == *wanted)
                    .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
                    .flatten()
            })
        })
        .expect("a redis or nobody user")
}

/// The password of the role `app` that `install_roles` creates.
pub const APP_PASSWORD: &str = "app-secret";

/// A role `app` with a SCRAM password, and the lookup role and function
/// exactly as docs/authentication.md gives them. Returns the lookup role's password
/// file.
pub fn install_roles(env: &Env) -> PathBuf {
    env.pg
        .run_sql(&format!(
            "CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}';\n\
             CREATE ROLE pgbastion_auth LOGIN PASSWORD 'lookup-secret';\n{}",
            pgbastion::auth::auth_query::LOOKUP_FUNCTION_SQL
        ))
        .expect("install the lookup function");
    let file = env.dir.path().join("auth-password");
    write_private(&file, "lookup-secret\n");
    file
}

/// Writes a secret file with mode 0600, as pgbastion requires of them.
pub fn write_private(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

pub fn auth_query_keys(password_file: &std::path::Path) -> String {
    format!(
        "auth = \"scram\"\nauth_user = \"pgbastion_auth\"\nauth_password_file = \"{}\"\n",
        password_file.display()
    )
}

/// `pgbastion_certificate_expiry_timestamp_seconds{certificate="..."}` as
/// the admin listener reports it now (None: not reported, or unreachable).
pub fn certificate_expiry(admin: SocketAddr, certificate: &str) -> Option<i64> {
    let (_, body) = http_get(admin, "/metrics")?;
    let label = format!("certificate=\"{certificate}\"");
    let line = body.lines().find(|l| {
        l.starts_with("pgbastion_certificate_expiry_timestamp_seconds{") && l.contains(&label)
    })?;
    line.rsplit(' ')
        .next()?
        .parse::<f64>()
        .ok()
        .map(|t| t as i64)
}

/// GET `path` from the admin listener: status code and body.
pub fn http_get(admin: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n")?.1.to_owned()))
}

/// A tokio-postgres session through pgbastion (TLS) whose CancelKey,
/// as the client received it, is captured on the way.
pub async fn sniffed_session(
    addr: SocketAddr,
    env: &Env,
    app: &str,
) -> (
    tokio_postgres::Client,
    pgbastion::protocol::startup::CancelKey,
) {
    use pgbastion::protocol::message;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tls = ssl_request_then_tls(raw(addr).await, env).await;
    let (local, remote) = tokio::io::duplex(64 * 1024);
    let (key_tx, key_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut tls_r, mut tls_w) = tokio::io::split(tls);
        let (mut rem_r, mut rem_w) = tokio::io::split(remote);
        let up = tokio::io::copy(&mut rem_r, &mut tls_w);
        let down = async {
            let mut key_tx = Some(key_tx);
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = tls_r.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                if key_tx.is_some() {
                    seen.extend_from_slice(&buf[..n]);
                    let mut at = 0;
                    while let Ok(Some((t, len))) = message::frame(&seen[at..], 1 << 20) {
                        if t == b'K' {
                            let key =
                                message::parse_backend_key_data(&seen[at + 5..at + len]).unwrap();
                            let _ = key_tx.take().unwrap().send(key);
                            break;
                        }
                        at += len;
                    }
                }
                if rem_w.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = rem_w.shutdown().await;
        };
        tokio::select! { _ = up => {}, _ = down => {} }
    });
    let client = pg_over(local, &env.pg.password, app).await.unwrap();
    (client, key_rx.await.unwrap())
}
