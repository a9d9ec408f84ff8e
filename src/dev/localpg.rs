//! A throwaway local PostgreSQL server: `initdb` into a temporary directory,
//! TLS on with certificates from its own CA, SCRAM authentication, a free
//! port, and everything removed when the value is dropped.
//!
//! `pgbastion demo` and the integration tests both use it, so the demo is
//! exactly what the tests exercise. PostgreSQL refuses to run as root; when
//! pgbastion runs as root the server runs as the `postgres` user (created
//! by Debian's postgresql package). The server is started through
//! `setpriv --pdeathsig KILL`, so it dies with the thread that started it
//! even if this process is killed before `Drop` runs.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::distributions::{Alphanumeric, DistString};
use thiserror::Error;

use crate::dev::certs::{self, Ca};

/// How long the server may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum LocalPgError {
    #[error(
        "PostgreSQL server binaries (initdb, postgres) were not found in PATH or /usr/lib/postgresql/*/bin. \
         Install them, e.g. on Debian/Ubuntu: apt-get install -y postgresql"
    )]
    BinariesMissing,
    #[error("running as root, but there is no unprivileged `postgres` (or `nobody`) user to run PostgreSQL as")]
    NoUnprivilegedUser,
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{command} failed ({status}):\n{output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
    #[error("PostgreSQL did not become ready within {timeout:?}; its log:\n{log}")]
    NotReady { timeout: Duration, log: String },
    #[error("PostgreSQL exited during start-up ({status}); its log:\n{log}")]
    Exited { status: String, log: String },
    #[error("making certificates: {0}")]
    Certs(#[from] certs::CertError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LocalPgError {
    let what = what.into();
    move |source| LocalPgError::Io { what, source }
}

/// Settings for a new local server.
#[derive(Debug, Clone)]
pub struct LocalPgOptions {
    /// Names the server certificate is issued for.
    pub server_names: Vec<String>,
    /// Extra `postgresql.conf` lines, e.g. `max_connections = 400`.
    pub extra_conf: Vec<String>,
    /// A CA (PEM) whose client certificates the server then requires on
    /// every TCP connection, in addition to the password.
    pub client_ca_pem: Option<String>,
    /// Roles that may log in over TLS without a password (for tests that
    /// speak the protocol by hand). The roles must still be created.
    pub trust_users: Vec<String>,
    /// Roles that log in with a client certificate only (`hostssl ...
    /// cert`, the certificate's CN being the role), from `client_ca_pem`'s
    /// CA. With any, the other roles need no certificate.
    pub cert_users: Vec<String>,
    /// pg_hba.conf lines placed before the generated ones, e.g.
    /// `hostssl all app_md5 127.0.0.1/32 md5`.
    pub extra_hba: Vec<String>,
}

impl Default for LocalPgOptions {
    fn default() -> Self {
        LocalPgOptions {
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            extra_conf: Vec::new(),
            client_ca_pem: None,
            trust_users: Vec::new(),
            cert_users: Vec::new(),
            extra_hba: Vec::new(),
        }
    }
}

/// A running local PostgreSQL server, stopped and deleted on drop.
pub struct LocalPg {
    child: Child,
    /// The port on 127.0.0.1.
    pub port: u16,
    /// The superuser, `postgres`.
    pub user: String,
    /// The superuser's password (random per server).
    pub password: String,
    /// The CA that issued the server's certificate.
    pub ca_cert: PathBuf,
    /// The directory of the server's Unix socket.
    pub socket_dir: PathBuf,
    /// The server's log file.
    pub log_file: PathBuf,
    dir: tempfile::TempDir,
}

/// The directory holding initdb, postgres and pg_ctl.
pub fn bin_dir() -> Result<PathBuf, LocalPgError> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let initdb = dir.join("initdb");
            if initdb.exists() {
                // Follow a symlink (Debian's /usr/local/bin -> /usr/lib/...)
                // so `postgres` is found beside it.
                let real = fs::canonicalize(&initdb).unwrap_or(initdb);
                if let Some(parent) = real.parent() {
                    if parent.join("postgres").exists() {
                        return Ok(parent.to_owned());
                    }
                }
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let v = e.file_name().to_str()?.parse().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("initdb").exists().then_some((v, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .map(|(_, p)| p)
        .ok_or(LocalPgError::BinariesMissing)
}

/// Starts the postmaster of the data directory under `root` as the
/// unprivileged user, its output appended to `log_file`; it dies with us.
fn spawn_postgres(root: &Path, log_file: &Path) -> Result<Child, LocalPgError> {
    let log = fs::OpenOptions::new()
        .append(true)
        .open(log_file)
        .map_err(io_err("opening the server log"))?;
    let log_err = log.try_clone().map_err(io_err("opening the server log"))?;
    let mut postgres = Command::new("setpriv");
    if let Some((uid, gid)) = unprivileged_user()? {
        postgres.uid(uid).gid(gid);
    }
    postgres
        .current_dir(root)
        .args(["--pdeathsig", "KILL", "--"])
        .arg(bin_dir()?.join("postgres"))
        .arg("-D")
        .arg(root.join("data"))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    postgres.spawn().map_err(io_err("starting postgres"))
}

/// The uid/gid to run PostgreSQL as: `None` when not root.
fn unprivileged_user() -> Result<Option<(u32, u32)>, LocalPgError> {
    // /proc/self is owned by the effective uid of the process.
    let euid = fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
    if euid != 0 {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd").map_err(io_err("reading /etc/passwd"))?;
    for wanted in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() >= 4 && f[0] == wanted {
                if let (Ok(uid), Ok(gid)) = (f[2].parse(), f[3].parse()) {
                    return Ok(Some((uid, gid)));
                }
            }
        }
    }
    Err(LocalPgError::NoUnprivilegedUser)
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> Result<u16, LocalPgError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err("finding a free port"))?;
    Ok(l.local_addr()
        .map_err(io_err("finding a free port"))?
        .port())
}

fn run(mut cmd: Command, what: &str) -> Result<(), LocalPgError> {
    let out = cmd.output().map_err(io_err(format!("running {what}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(LocalPgError::Command {
        command: what.into(),
        status: out.status.to_string(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    })
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<(), LocalPgError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(io_err(format!("chown {}", path.display())))?;
    if path.is_dir() {
        for entry in fs::read_dir(path).map_err(io_err(format!("reading {}", path.display())))? {
            let entry = entry.map_err(io_err("reading a directory"))?;
            chown_tree(&entry.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// A command run as the unprivileged `user` (when root), in `dir`.
fn as_user(program: &Path, user: Option<(u32, u32)>, dir: &Path) -> Command {
    let mut c = Command::new(program);
    if let Some((uid, gid)) = user {
        c.uid(uid).gid(gid);
    }
    c.current_dir(dir);
    c
}

/// Appends `conf` and the options' settings to postgresql.conf, and writes
/// pg_hba.conf: the options' trusted and certificate users first, then
/// SCRAM over TLS for everyone, and no plaintext TCP.
fn configure(data: &Path, mut conf: String, opts: &LocalPgOptions) -> Result<(), LocalPgError> {
    let mut hostssl_options = "";
    if let Some(pem) = &opts.client_ca_pem {
        let path = data.join("client-ca.crt");
        fs::write(&path, pem).map_err(io_err("writing the client CA"))?;
        conf.push_str(&format!("ssl_ca_file = '{}'\n", path.display()));
        if opts.cert_users.is_empty() {
            hostssl_options = " clientcert=verify-ca";
        }
    }
    for line in &opts.extra_conf {
        conf.push_str(line);
        conf.push('\n');
    }
    append(&data.join("postgresql.conf"), &conf)?;
    let trusted: String = opts
        .extra_hba
        .iter()
        .map(|l| format!("{l}\n"))
        .chain(
            opts.trust_users
                .iter()
                .map(|u| format!("hostssl all {u} 127.0.0.1/32 trust\n")),
        )
        .chain(
            opts.cert_users
                .iter()
                .map(|u| format!("hostssl all {u} 127.0.0.1/32 cert\n")),
        )
        .collect();
    fs::write(
        data.join("pg_hba.conf"),
        format!(
            "{trusted}local all all scram-sha-256\n\
             hostssl all all 127.0.0.1/32 scram-sha-256{hostssl_options}\n\
             hostssl all all ::1/128 scram-sha-256{hostssl_options}\n\
             hostnossl all all all reject\n"
        ),
    )
    .map_err(io_err("writing pg_hba.conf"))
}

impl LocalPg {
    /// Creates and starts a server. Blocks until it accepts connections.
    pub fn start(opts: LocalPgOptions) -> Result<LocalPg, LocalPgError> {
        let bin = bin_dir()?;
        let user = unprivileged_user()?;
        let dir = tempfile::Builder::new()
            .prefix("pgbastion-pg-")
            .tempdir()
            .map_err(io_err("creating a temporary directory"))?;
        let root = dir.path().to_owned();
        let data = root.join("data");
        let socket_dir = root.join("sock");
        fs::create_dir(&socket_dir).map_err(io_err("creating the socket directory"))?;
        let password = Alphanumeric.sample_string(&mut rand::thread_rng(), 24);
        let pwfile = root.join("pwfile");
        certs::write_private(&pwfile, password.as_bytes())
            .map_err(io_err("writing the password file"))?;

        let ca = Ca::new("pgbastion local test CA")?;
        let ca_cert = ca
            .write_cert(&root, "ca")
            .map_err(io_err("writing the CA certificate"))?;
        let names: Vec<&str> = opts.server_names.iter().map(String::as_str).collect();
        let server = ca.server_cert(&names)?;
        if let Some((uid, gid)) = user {
            chown_tree(&root, uid, gid)?;
        }

        let mut initdb = as_user(&bin.join("initdb"), user, &root);
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        run(initdb, "initdb")?;

        let (cert_path, key_path) = server
            .write(&data, "server")
            .map_err(io_err("writing the server certificate"))?;
        let port = free_port()?;
        let conf = format!(
            "\n# pgbastion local server\nlisten_addresses = '127.0.0.1'\nport = {port}\n\
             unix_socket_directories = '{}'\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n\
             password_encryption = 'scram-sha-256'\nfsync = off\nlogging_collector = off\n",
            socket_dir.display(),
            cert_path.display(),
            key_path.display()
        );
        configure(&data, conf, &opts)?;
        if let Some((uid, gid)) = user {
            chown_tree(&data, uid, gid)?;
        }

        let log_file = root.join("postgres.log");
        fs::File::create(&log_file).map_err(io_err("creating the server log"))?;
        let child = spawn_postgres(&root, &log_file)?;
        let mut pg = LocalPg {
            child,
            port,
            user: "postgres".into(),
            password,
            ca_cert,
            socket_dir,
            log_file,
            dir,
        };
        pg.wait_ready(&data)?;
        Ok(pg)
    }

    /// Waits until postmaster.pid says "ready" (PostgreSQL 10+ writes the
    /// server state on its 8th line), or the server exits.
    fn wait_ready(&mut self, data: &Path) -> Result<(), LocalPgError> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(LocalPgError::Exited {
                    status: status.to_string(),
                    log: self.log(),
                });
            }
            if let Ok(pid_file) = fs::read_to_string(data.join("postmaster.pid")) {
                if pid_file.lines().nth(7).map(str::trim) == Some("ready") {
                    return Ok(());
                }
            }
            if start.elapsed() > START_TIMEOUT {
                return Err(LocalPgError::NotReady {
                    timeout: START_TIMEOUT,
                    log: self.log(),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// The temporary directory holding everything of this server.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs SQL as the superuser over the server's Unix socket (with the
    /// `psql` beside the server binaries), stopping at the first error.
    pub fn run_sql(&self, sql: &str) -> Result<(), LocalPgError> {
        let mut psql = Command::new(bin_dir()?.join("psql"));
        psql.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket_dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                &self.user,
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .env("PGPASSWORD", &self.password)
            .stdin(Stdio::null());
        run(psql, "psql")
    }

    /// A libpq connection string for a direct, fully verified connection.
    pub fn direct_conninfo(&self, dbname: &str) -> String {
        format!(
            "host=localhost port={} user={} dbname={dbname} sslmode=verify-full sslrootcert={}",
            self.port,
            self.user,
            self.ca_cert.display()
        )
    }

    /// Stops the server (fast shutdown: sessions are ended with 57P01) and
    /// starts it again on the same port and data; blocks until it accepts
    /// connections. For fault drills (`bench/run.sh --faults`).
    pub fn restart(&mut self) -> Result<(), LocalPgError> {
        self.stop();
        self.child = spawn_postgres(self.dir.path(), &self.log_file)?;
        let data = self.dir.path().join("data");
        self.wait_ready(&data)
    }

    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SIGINT: PostgreSQL's "fast" shutdown. The server runs as another
        // user, so use kill(1) rather than Child::kill (SIGKILL would leave
        // its backends to notice the postmaster's death on their own).
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LocalPg {
    fn drop(&mut self) {
        self.stop();
    }
}

fn append(path: &Path, text: &str) -> Result<(), LocalPgError> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io_err(format!("opening {}", path.display())))?;
    f.write_all(text.as_bytes())
        .map_err(io_err(format!("writing {}", path.display())))
}
