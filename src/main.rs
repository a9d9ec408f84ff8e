//! The `pgbastion` command: its flags, and dispatch to the subcommands'
//! bodies in `pgbastion::cli` (`run`, `demo`, `check-config`, `audit
//! verify`, `scram-secret`). A failed command prints one clean error
//! (`cli::report`) and exits 1.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use pgbastion::cli::report::{self, Backtraces};
use pgbastion::cli::run::{ConfigSource, SessionThreads};
use pgbastion::cli::{self, LogFormat};
use pgbastion::config::{AuditOnFailure, AuthMode, ClientTlsMode, Flags, PoolMode};

#[derive(Parser)]
#[command(
    name = "pgbastion",
    version,
    about = "A security proxy for PostgreSQL: TLS enforced toward clients, verify-full TLS toward the database, every session audited.",
    long_about = "pgbastion sits between PostgreSQL clients and a PostgreSQL server. Clients reach it over TLS \
                  (or a listener you allow plaintext on); it reaches the server only over TLS with full \
                  certificate verification, and writes a JSON audit line for every session. With \
                  `--auth scram` (or auth = \"scram\" per upstream) it terminates SCRAM itself, channel-bound on \
                  both legs, so clients connect with their default settings.\n\n\
                  Signals: SIGHUP reopens the audit file, re-reads secrets files, certificates, keys and CA bundles (rotation), and the rules and credentials of --config; SIGTERM/SIGINT drain and stop.\n\n\
                  Every `run` flag can also come from the environment (for containers): PGBASTION_CONFIG, PGBASTION_LISTEN \
                  (comma-separated), PGBASTION_TLS_CERT, PGBASTION_UPSTREAM, ... (the flag's name in capitals, `-` as `_`).\n\n\
                  Logs go to stderr (level from RUST_LOG, default info); audit events go where `audit.log` says \
                  (stdout by default)."
)]
struct Cli {
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// When a command fails, also print the stack backtrace of its error
    /// (RUST_LIB_BACKTRACE=1 does the same; RUST_BACKTRACE alone does not).
    #[arg(long, global = true)]
    backtrace: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy, from a config file or from flags (one upstream).
    Run(Box<RunArgs>),
    /// Start a throwaway local PostgreSQL with TLS and pgbastion in front
    /// of it, and print how to connect. Ctrl-C stops and removes both.
    Demo(DemoArgs),
    /// Validate a config file (including every certificate, key and CA
    /// bundle it names) and explain what is wrong.
    CheckConfig {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Turn a role's password (read from standard input) into a
    /// `scram_secret` file for identity login, printed on standard output:
    /// the SCRAM verifier to set on the server (`ALTER ROLE ... PASSWORD
    /// '<first line>'`) and the ClientKey pgbastion logs in with. After
    /// this, nobody needs the password: write the output to a file with
    /// mode 0600 and forget the password.
    ScramSecret {
        /// PBKDF2 iterations (PostgreSQL's default is 4096).
        #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(4096..))]
        iterations: u32,
    },
    /// Work with audit log files.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check that audit files are one unbroken hash chain: every line's
    /// `seq` follows the line before and its `prev` is the line before's
    /// digest. Give rotated files oldest first (audit.jsonl.2
    /// audit.jsonl.1 audit.jsonl). Reports the first line that was
    /// changed, removed or inserted, and exits 1; exits 0 when the chain
    /// holds. Files with no line, and a chain that starts after seq 1
    /// without saying it continues a rotated file, fail too.
    Verify {
        /// Audit files, oldest first.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Accept a chain that starts after seq 1 without saying it
        /// continues a rotated file (its first lines were removed, or the
        /// older files were not given).
        #[arg(long)]
        allow_partial: bool,
        /// The `audit.chain_key_file` the lines were chained with (HMAC);
        /// without it, SHA-256.
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

#[derive(Args)]
struct RunArgs {
    /// TOML config file (see examples/pgbastion.toml). Excludes the flags below.
    #[arg(long, short, conflicts_with_all = ["listen", "unix_dir", "upstream"], env = "PGBASTION_CONFIG")]
    config: Option<PathBuf>,
    /// TCP address to listen on, IP:PORT (repeatable), e.g. 127.0.0.1:6432 or [::]:6432.
    #[arg(long, env = "PGBASTION_LISTEN", value_delimiter = ',')]
    listen: Vec<String>,
    /// Also listen on a Unix socket DIR/.s.PGSQL.PORT (psql -h DIR -p PORT).
    #[arg(long, env = "PGBASTION_UNIX_DIR")]
    unix_dir: Option<PathBuf>,
    /// Port number in the Unix socket's name (default 5432).
    #[arg(long, requires = "unix_dir", env = "PGBASTION_PORT")]
    port: Option<u16>,
    /// pgbastion's certificate chain for clients (PEM).
    #[arg(long, env = "PGBASTION_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "PGBASTION_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Whether TCP listeners insist on client TLS.
    #[arg(long, value_enum, env = "PGBASTION_CLIENT_TLS")]
    client_tls: Option<ClientTlsArg>,
    /// The database server, HOST:PORT.
    #[arg(long, env = "PGBASTION_UPSTREAM")]
    upstream: Option<String>,
    /// CA bundle (PEM) that the database server's certificate must chain to.
    #[arg(long, env = "PGBASTION_UPSTREAM_CA")]
    upstream_ca: Option<PathBuf>,
    /// Directory of CA certificates (PEM) to trust for the database server.
    #[arg(long, env = "PGBASTION_UPSTREAM_CA_DIR")]
    upstream_ca_dir: Option<PathBuf>,
    /// Also trust the operating system's root certificates.
    #[arg(long, env = "PGBASTION_UPSTREAM_SYSTEM_ROOTS")]
    upstream_system_roots: bool,
    /// Name (DNS or IP) the database certificate must be valid for; default: the upstream host.
    #[arg(long, env = "PGBASTION_UPSTREAM_SERVER_NAME")]
    upstream_server_name: Option<String>,
    /// Client certificate (PEM) for mutual TLS with the database server.
    #[arg(
        long,
        requires = "upstream_client_key",
        env = "PGBASTION_UPSTREAM_CLIENT_CERT"
    )]
    upstream_client_cert: Option<PathBuf>,
    /// Key of --upstream-client-cert.
    #[arg(
        long,
        requires = "upstream_client_cert",
        env = "PGBASTION_UPSTREAM_CLIENT_KEY"
    )]
    upstream_client_key: Option<PathBuf>,
    /// Use direct TLS (PostgreSQL 17+) instead of SSLRequest toward the server.
    #[arg(long, env = "PGBASTION_UPSTREAM_DIRECT_TLS")]
    upstream_direct_tls: bool,
    /// Audit log: a file to append JSON lines to, or - for stdout (default).
    #[arg(long, env = "PGBASTION_AUDIT_LOG")]
    audit_log: Option<String>,
    /// Serve /metrics, /livez, /readyz and /startupz over HTTP on IP:PORT (e.g. 127.0.0.1:9930).
    #[arg(long, env = "PGBASTION_ADMIN_LISTEN")]
    admin_listen: Option<std::net::SocketAddr>,
    /// While audit events cannot be written: `continue` (default; dropped events are counted
    /// and reported) or `refuse` (no new session is admitted until they can be written again).
    #[arg(long, value_enum, env = "PGBASTION_AUDIT_ON_FAILURE")]
    audit_on_failure: Option<AuditOnFailureArg>,
    /// Maximum concurrent sessions (default 1000).
    #[arg(long, env = "PGBASTION_MAX_SESSIONS")]
    max_sessions: Option<usize>,
    /// Who authenticates clients: `passthrough` (default: the client logs in to the server
    /// through pgbastion; SCRAM channel binding cannot work) or `scram` (pgbastion terminates
    /// SCRAM on both legs, channel-bound, so clients need no special settings; needs
    /// --secrets-file and/or --auth-user with --auth-password-file).
    #[arg(long, value_enum, env = "PGBASTION_AUTH")]
    auth: Option<AuthArg>,
    /// scram: a PgBouncer-format userlist of SCRAM verifiers ("user" "SCRAM-SHA-256$..."),
    /// re-read on SIGHUP.
    #[arg(long, env = "PGBASTION_SECRETS_FILE")]
    secrets_file: Option<PathBuf>,
    /// scram: a role pgbastion logs in as to look verifiers up with auth_query
    /// (default query: SELECT usename, passwd FROM pgbastion.lookup($1); see docs/authentication.md).
    #[arg(long, requires = "auth_password_file", env = "PGBASTION_AUTH_USER")]
    auth_user: Option<String>,
    /// The file holding --auth-user's password.
    #[arg(long, requires = "auth_user", env = "PGBASTION_AUTH_PASSWORD_FILE")]
    auth_password_file: Option<PathBuf>,
    /// Share server connections between clients: `transaction` (a server connection per
    /// transaction, given back at its end) or `session` (one per client session, cleaned when
    /// given back). Needs --auth scram: pgbastion logs in to the server on its own. Default: no
    /// pooling, one server connection per client session. The other pool flags need this one.
    #[arg(long, value_enum, env = "PGBASTION_POOL_MODE")]
    pool_mode: Option<PoolModeArg>,
    /// Server connections per (database, user) pool, in use or idle (default 20; 1 to 10000).
    #[arg(long, env = "PGBASTION_POOL_SIZE")]
    pool_size: Option<usize>,
    /// Connections each pool keeps open even when idle (default 0; at most --pool-size).
    #[arg(long, env = "PGBASTION_MIN_POOL_SIZE")]
    min_pool_size: Option<usize>,
    /// Server connections of all pools together (default: no bound beyond each pool's
    /// --pool-size).
    #[arg(long, env = "PGBASTION_MAX_SERVER_CONNECTIONS")]
    max_server_connections: Option<usize>,
    /// How long a client waits for a free server connection, e.g. 30s (default 120s).
    #[arg(long, value_parser = humantime::parse_duration, env = "PGBASTION_QUERY_WAIT_TIMEOUT")]
    query_wait_timeout: Option<std::time::Duration>,
    /// An idle server connection is closed after this long, e.g. 5m (default 10m).
    #[arg(long, value_parser = humantime::parse_duration, env = "PGBASTION_SERVER_IDLE_TIMEOUT")]
    server_idle_timeout: Option<std::time::Duration>,
    /// A server connection is closed (once idle) after this long, e.g. 30m (default 1h).
    #[arg(long, value_parser = humantime::parse_duration, env = "PGBASTION_SERVER_LIFETIME")]
    server_lifetime: Option<std::time::Duration>,
    /// Named prepared statements kept per server connection, least recently used dropped
    /// first (default 200; 1 to 10000).
    #[arg(long, env = "PGBASTION_MAX_PREPARED_STATEMENTS")]
    max_prepared_statements: Option<usize>,
    /// Where sessions run. `shared`: one runtime with a worker thread per core, sessions moving
    /// between workers as they wake. `per-core`: a single-threaded runtime per core, each session
    /// staying on the thread it was given when accepted, so its wake-ups never cross threads
    /// (measured: docs/performance.md, "The relay's cost"). Either works with a config file or
    /// flags; a reload cannot change it.
    #[arg(long, value_enum, default_value = "shared", env = "PGBASTION_RUNTIME")]
    runtime: RuntimeArg,
    /// With --runtime per-core: how many session threads (default: one per core, 1 to 1024).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024), env = "PGBASTION_SESSION_THREADS")]
    session_threads: Option<u16>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RuntimeArg {
    Shared,
    PerCore,
}

#[derive(Clone, Copy, ValueEnum)]
enum PoolModeArg {
    Session,
    Transaction,
}

#[derive(Clone, Copy, ValueEnum)]
enum AuditOnFailureArg {
    Continue,
    Refuse,
}

#[derive(Clone, Copy, ValueEnum)]
enum AuthArg {
    Passthrough,
    Scram,
}

#[derive(Clone, Copy, ValueEnum)]
enum ClientTlsArg {
    Require,
    Allow,
}

#[derive(Args)]
struct DemoArgs {
    /// Port for pgbastion's TCP listener on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 6432)]
    port: u16,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.backtrace {
        // Before the runtime starts any thread.
        report::enable_backtraces();
    }
    let backtraces = Backtraces::from_flag(cli.backtrace);
    let log = match cli::init_logging(cli.log_format) {
        Ok(log) => log,
        Err(e) => return fail(&e, backtraces),
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if matches!(&cli.command, Command::Run(a) if a.runtime == RuntimeArg::PerCore) {
        // Sessions have threads of their own; what stays here (accept
        // loops, admin, reloads, Redis) needs one.
        builder.worker_threads(1);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(&e.into(), backtraces),
    };
    let result = runtime.block_on(dispatch(cli.command));
    // The last log lines (why pgbastion stopped) must not be lost.
    log.drain(std::time::Duration::from_secs(2));
    match result {
        Ok(code) => code,
        Err(e) => fail(&e, backtraces),
    }
}

fn fail(err: &anyhow::Error, backtraces: Backtraces) -> ExitCode {
    eprint!("{}", report::render(err, backtraces));
    ExitCode::FAILURE
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(args) => {
            let threads = args.session_threads()?;
            cli::run::run(args.source(), threads).await?
        }
        Command::Demo(args) => cli::demo(args.port).await?,
        Command::CheckConfig { config } => cli::check_config::check_config(&config)?,
        Command::ScramSecret { iterations } => cli::scram_secret(iterations)?,
        Command::Audit(AuditCommand::Verify {
            files,
            key,
            allow_partial,
        }) => return cli::audit_verify::audit_verify(&files, key.as_deref(), allow_partial),
    }
    Ok(ExitCode::SUCCESS)
}

impl RunArgs {
    /// Where sessions run; a thread count without per-core is a mistake
    /// worth saying, not ignoring.
    fn session_threads(&self) -> anyhow::Result<SessionThreads> {
        Ok(match self.runtime {
            RuntimeArg::Shared if self.session_threads.is_some() => {
                anyhow::bail!("--session-threads needs --runtime per-core (the shared runtime sizes itself: TOKIO_WORKER_THREADS)")
            }
            RuntimeArg::Shared => SessionThreads::Shared,
            RuntimeArg::PerCore => SessionThreads::PerCore(self.session_threads.map_or_else(
                || std::thread::available_parallelism().map_or(1, |n| n.get()),
                usize::from,
            )),
        })
    }

    /// A config file, or the flags as one.
    fn source(self) -> ConfigSource {
        if let Some(path) = self.config {
            return ConfigSource::File(path);
        }
        ConfigSource::Flags(Box::new(Flags {
            listen: self.listen,
            unix_dir: self.unix_dir,
            port: self.port,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            upstream: self.upstream,
            upstream_ca: self.upstream_ca,
            upstream_ca_dir: self.upstream_ca_dir,
            upstream_system_roots: self.upstream_system_roots,
            upstream_server_name: self.upstream_server_name,
            upstream_client_cert: self.upstream_client_cert,
            upstream_client_key: self.upstream_client_key,
            upstream_direct_tls: self.upstream_direct_tls,
            client_tls: self.client_tls.map(|c| match c {
                ClientTlsArg::Require => ClientTlsMode::Require,
                ClientTlsArg::Allow => ClientTlsMode::Allow,
            }),
            audit_log: self.audit_log,
            admin_listen: self.admin_listen,
            audit_on_failure: self.audit_on_failure.map(|a| match a {
                AuditOnFailureArg::Continue => AuditOnFailure::Continue,
                AuditOnFailureArg::Refuse => AuditOnFailure::Refuse,
            }),
            max_sessions: self.max_sessions,
            auth: self.auth.map(|a| match a {
                AuthArg::Passthrough => AuthMode::Passthrough,
                AuthArg::Scram => AuthMode::Scram,
            }),
            secrets_file: self.secrets_file,
            auth_user: self.auth_user,
            auth_password_file: self.auth_password_file,
            pool_mode: self.pool_mode.map(|m| match m {
                PoolModeArg::Session => PoolMode::Session,
                PoolModeArg::Transaction => PoolMode::Transaction,
            }),
            pool_size: self.pool_size,
            min_pool_size: self.min_pool_size,
            max_server_connections: self.max_server_connections,
            server_idle_timeout: self.server_idle_timeout,
            server_lifetime: self.server_lifetime,
            query_wait_timeout: self.query_wait_timeout,
            max_prepared_statements: self.max_prepared_statements,
        }))
    }
}
