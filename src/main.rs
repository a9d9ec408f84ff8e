//! The `pgbastion` command: `run`, `demo` and `check-config`.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use pgbastion::audit::sink::{Sink, SinkTarget};
use pgbastion::config::{AuditOnFailure, AuthMode, ClientTlsMode, Config, Flags};
use pgbastion::server::{self, Server};

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
    /// (default query: SELECT usename, passwd FROM pgbastion.lookup($1); see the README).
    #[arg(long, requires = "auth_password_file", env = "PGBASTION_AUTH_USER")]
    auth_user: Option<String>,
    /// The file holding --auth-user's password.
    #[arg(long, requires = "auth_user", env = "PGBASTION_AUTH_PASSWORD_FILE")]
    auth_password_file: Option<PathBuf>,
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

/// Log lines waiting for stderr before new ones are dropped.
const LOG_QUEUE_LINES: usize = 10_000;

/// Logs go to stderr through a writer thread (`sink`), so a stalled reader
/// of stderr never blocks a session; lines beyond the queue are dropped.
fn init_logging(format: LogFormat) -> Result<Sink> {
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

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let log = init_logging(cli.log_format)?;
    let result = match cli.command {
        Command::Run(args) => run(*args).await,
        Command::Demo(args) => demo(args).await,
        Command::CheckConfig { config } => check_config(config),
        Command::ScramSecret { iterations } => scram_secret(iterations),
        Command::Audit(AuditCommand::Verify {
            files,
            key,
            allow_partial,
        }) => audit_verify(&files, key.as_deref(), allow_partial),
    };
    // The last log lines (why pgbastion stopped) must not be lost.
    log.drain(std::time::Duration::from_secs(2));
    result
}

fn load_run_config(args: RunArgs) -> Result<Config> {
    if let Some(path) = args.config {
        return Ok(Config::from_file(&path)?);
    }
    let flags = Flags {
        listen: args.listen,
        unix_dir: args.unix_dir,
        port: args.port,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        upstream: args.upstream,
        upstream_ca: args.upstream_ca,
        upstream_ca_dir: args.upstream_ca_dir,
        upstream_system_roots: args.upstream_system_roots,
        upstream_server_name: args.upstream_server_name,
        upstream_client_cert: args.upstream_client_cert,
        upstream_client_key: args.upstream_client_key,
        upstream_direct_tls: args.upstream_direct_tls,
        client_tls: args.client_tls.map(|c| match c {
            ClientTlsArg::Require => ClientTlsMode::Require,
            ClientTlsArg::Allow => ClientTlsMode::Allow,
        }),
        audit_log: args.audit_log,
        admin_listen: args.admin_listen,
        audit_on_failure: args.audit_on_failure.map(|a| match a {
            AuditOnFailureArg::Continue => AuditOnFailure::Continue,
            AuditOnFailureArg::Refuse => AuditOnFailure::Refuse,
        }),
        max_sessions: args.max_sessions,
        auth: args.auth.map(|a| match a {
            AuthArg::Passthrough => AuthMode::Passthrough,
            AuthArg::Scram => AuthMode::Scram,
        }),
        secrets_file: args.secrets_file,
        auth_user: args.auth_user,
        auth_password_file: args.auth_password_file,
    };
    if flags.listen.is_empty() && flags.unix_dir.is_none() {
        anyhow::bail!(
            "nothing to listen on: give --listen IP:PORT and/or --unix-dir DIR (or --config FILE)"
        );
    }
    Ok(Config::from_flags(flags)?)
}

async fn run(args: RunArgs) -> Result<()> {
    let config_path = args.config.clone();
    let config = load_run_config(args)?;
    check_open_files(&config);
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let initial = config.clone();
    let server = Server::bind(config).await?;
    for (name, addr) in server.local_addrs() {
        tracing::info!(listener = %name, address = %addr, "bound");
    }
    let handle = server.reload_handle();
    handle.set_source(config_path.clone(), initial.clone());
    if initial.reload.watch {
        let debounce = initial.reload.debounce;
        tokio::spawn(pgbastion::server::watch(
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
    let needed = pgbastion::limits::fd::needed(
        config.limits.max_sessions,
        config.limits.max_pending,
        config.listeners.len(),
    );
    match pgbastion::limits::fd::raise() {
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

/// Runs the server until SIGTERM/SIGINT, then drains; a second signal ends
/// every remaining session at once (each still told and audited).
async fn serve(server: Server) {
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
async fn reload_on_sighup(handle: server::ReloadHandle) {
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

fn scram_secret(iterations: u32) -> Result<()> {
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
        pgbastion::auth::credentials::scram_secret_for(password.as_bytes(), iterations)
    );
    Ok(())
}

fn audit_verify(
    files: &[PathBuf],
    key: Option<&std::path::Path>,
    allow_partial: bool,
) -> Result<()> {
    use pgbastion::audit::chain::{verify, Digest, Start};
    let digest = match key {
        Some(path) => Digest::from_key(Some(&server::read_chain_key(path)?)),
        None => Digest::Sha256,
    };
    let mut contents = Vec::new();
    for f in files {
        let text = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        contents.push((f.display().to_string(), text));
    }
    let v = match verify(&contents, &digest) {
        Ok(v) => v,
        Err(broken) => {
            eprintln!("BROKEN: {broken}");
            std::process::exit(1);
        }
    };
    for cut in &v.cut {
        println!(
            "NOTE: {}:{}: a line cut by a crash ({} bytes); the restart after it recorded audit.resumed and the chain goes on from the line before",
            cut.file, cut.line, cut.bytes
        );
    }
    let first = v.first_seq.map_or_else(|| "-".into(), |s| s.to_string());
    match v.start {
        Start::First => {}
        Start::Continued => println!(
            "NOTE: the chain starts at seq {first}, continuing a rotated file: give the older files first to check the link"
        ),
        Start::Headless => {
            let said = format!(
                "the chain starts at seq {first}, not 1, and its first line does not say it continues a rotated file: lines before it were removed, or older files were not given"
            );
            if !allow_partial {
                eprintln!("PARTIAL: {said} (--allow-partial accepts this)");
                std::process::exit(1);
            }
            println!("NOTE: {said}");
        }
    }
    println!(
        "OK: {} lines in {} file(s), seq {} to {}, chained with {}",
        v.lines,
        files.len(),
        first,
        v.last_seq.map_or_else(|| "-".into(), |s| s.to_string()),
        if key.is_some() {
            "HMAC-SHA-256 (key)"
        } else {
            "SHA-256"
        }
    );
    Ok(())
}

fn check_config(path: PathBuf) -> Result<()> {
    let config = Config::from_file(&path)?;
    server::check(&config).with_context(|| format!("{} is not usable", path.display()))?;
    println!("{}: OK", path.display());
    for warning in config.warnings() {
        println!("  warning: {warning}");
    }
    for l in &config.listeners {
        println!(
            "  listener {:?} on {} (client TLS: {:?}) -> upstream {:?}",
            l.name, l.bind, l.client_tls, config.upstreams[l.upstream].name
        );
    }
    for u in &config.upstreams {
        println!(
            "  upstream {:?} at {}:{} verified as {:?}",
            u.name, u.host, u.port, u.server_name
        );
        match &u.scram {
            None => println!("    auth: passthrough (clients must set channel_binding=disable)"),
            Some(s) => {
                println!(
                    "    auth: scram (pgbastion terminates SCRAM, channel-bound on both legs)"
                );
                if let Some(f) = &s.secrets_file {
                    println!("    verifiers from secrets_file {}", f.display());
                }
                if let Some(q) = &s.auth_query {
                    println!(
                        "    verifiers from auth_query as {:?} in database {:?}: {}",
                        q.user, q.database, q.query
                    );
                }
                if let Some(k) = &s.mock_key {
                    println!("    unknown users' mock salts derived from {k}");
                }
                if s.secrets_file.is_some() && s.auth_query.is_some() {
                    println!("    auth_query also runs for users in secrets_file (equal timing; its answer is not used for them)");
                }
            }
        }
    }
    match config.policy.len() {
        0 => println!("  no [[rule]]: every client that passes TLS is admitted"),
        n => println!("  {n} policy rule(s); requests no rule matches are denied"),
    }
    if let Some(c) = &config.cluster {
        // The URL holds no password (config refuses one).
        println!(
            "  cluster: instance {:?} sharing cancels and limits through {} (Redis is not contacted here)",
            c.instance, c.redis
        );
    }
    Ok(())
}

async fn demo(args: DemoArgs) -> Result<()> {
    use pgbastion::dev::certs::Ca;
    use pgbastion::dev::localpg::{LocalPg, LocalPgOptions};

    eprintln!("starting a throwaway PostgreSQL (initdb, TLS, SCRAM)...");
    let pg = LocalPg::start(LocalPgOptions::default())?;
    let dir = pg.dir().to_owned();
    let ca = Ca::new("pgbastion demo CA")?;
    let proxy_ca = ca.write_cert(&dir, "pgbastion-ca")?;
    let (cert, key) = ca
        .server_cert(&["localhost", "127.0.0.1"])?
        .write(&dir, "pgbastion")?;
    // One port number serves both listeners, so the Unix socket is
    // .s.PGSQL.<port> like the TCP port.
    // scram mode with verifiers looked up on the server: the role and the
    // lookup function of the README.
    let auth_password = format!("{:032x}", rand::random::<u128>());
    pg.run_sql(&format!(
        "CREATE ROLE pgbastion_auth LOGIN PASSWORD '{auth_password}';\n{}",
        pgbastion::auth::auth_query::LOOKUP_FUNCTION_SQL
    ))?;
    let auth_password_file = dir.join("pgbastion-auth-password");
    pgbastion::dev::certs::write_private(&auth_password_file, auth_password.as_bytes())?;
    let port = if args.port != 0 && std::net::TcpListener::bind(("127.0.0.1", args.port)).is_ok() {
        args.port
    } else {
        if args.port != 0 {
            eprintln!("port {} is in use; picking a free one", args.port);
        }
        pgbastion::dev::localpg::free_port()?
    };
    // Identity login: a person with a client certificate from the demo's
    // "people" CA is logged in as demo_app with no password; pgbastion
    // holds demo_app's password in a 0600 file.
    let app_password = format!("{:032x}", rand::random::<u128>());
    pg.run_sql(&format!(
        "CREATE ROLE demo_app LOGIN PASSWORD '{app_password}';"
    ))?;
    let app_password_file = dir.join("demo_app.password");
    pgbastion::dev::certs::write_private(&app_password_file, app_password.as_bytes())?;
    let people = Ca::new("pgbastion demo people CA")?;
    let people_ca = people.write_cert(&dir, "people-ca")?;
    let (you_cert, you_key) = {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "you@example.com");
        people.issue(p)?.write(&dir, "you")?
    };
    let mtls_port = pgbastion::dev::localpg::free_port()?;
    let toml = format!(
        r#"
        [tls]
        cert = "{cert}"
        key = "{key}"
        [[listener]]
        name = "tcp"
        listen = "127.0.0.1:{port}"
        [[listener]]
        name = "unix"
        unix_dir = "{dir}"
        port = {port}
        [[listener]]
        name = "mtls"
        listen = "127.0.0.1:{mtls_port}"
        identity = "client_cert"
        client_ca = "{people_ca}"
        [[upstream]]
        name = "local"
        address = "localhost:{pg_port}"
        ca_file = "{ca}"
        auth = "scram"
        auth_user = "pgbastion_auth"
        auth_password_file = "{auth_password_file}"
        [[rule]]
        name = "people-by-certificate"
        listeners = ["mtls"]
        users = ["demo_app"]
        login = "identity"
        [[rule]]
        name = "everyone-with-a-password"
        listeners = ["tcp", "unix"]
        [[credential]]
        user = "demo_app"
        password_file = "{app_password_file}"
        [timeouts]
        shutdown_drain = "2s"
        [auth]
        mock_key_file = "{dir}/mock_key"
        "#,
        cert = cert.display(),
        key = key.display(),
        dir = dir.display(),
        port = port,
        pg_port = pg.port,
        ca = pg.ca_cert.display(),
        auth_password_file = auth_password_file.display(),
        people_ca = people_ca.display(),
        app_password_file = app_password_file.display(),
    );
    let server = Server::bind(Config::from_toml(&toml)?).await?;
    println!(
        r#"
pgbastion demo is running. Everything lives in {dir} and is removed on Ctrl-C.

  export PGPASSWORD='{password}'

Through pgbastion (TLS verified against pgbastion's CA; pgbastion verifies the server,
and terminates SCRAM: both legs channel-bound, no client setting needed):
  psql "host=localhost port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert={proxy_ca}"

With libpq's defaults only (encrypted, channel-bound to pgbastion's certificate):
  psql "host=localhost port={port} user=postgres dbname=postgres"

Through pgbastion's Unix socket (plaintext is allowed on the local socket):
  psql "host={dir} port={port} user=postgres dbname=postgres"

With no password at all: your client certificate is who you are, and pgbastion
logs you in as demo_app with the credential it holds (identity login):
  psql "host=localhost port={mtls_port} user=demo_app dbname=postgres sslmode=verify-full sslrootcert={proxy_ca} sslcert={you_cert} sslkey={you_key}"

Directly to PostgreSQL, for comparison:
  psql "{direct}"

Try a wrong password (28P01, and after 10 failures a minute your address is
throttled), or sslmode=disable to see pgbastion refuse plaintext on TCP.
Audit events follow on stdout: "auth" shows mode "scram" and each leg's
mechanism and channel binding; identity logins show mode "identity", the
credential kind, and the person ("identity") next to the role.
"#,
        you_cert = you_cert.display(),
        you_key = you_key.display(),
        dir = dir.display(),
        password = pg.password,
        proxy_ca = proxy_ca.display(),
        direct = pg.direct_conninfo("postgres"),
    );
    serve(server).await;
    drop(pg);
    eprintln!(
        "demo stopped; PostgreSQL stopped and {} removed",
        dir.display()
    );
    Ok(())
}
