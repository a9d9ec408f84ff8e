//! `pgbastion demo`: a throwaway PostgreSQL with TLS and SCRAM, a private CA
//! for pgbastion's own certificate, a "people" CA with one client
//! certificate for identity login, and pgbastion configured in front of it
//! all. [`Demo::start`] builds everything in one temporary directory and
//! binds pgbastion (the caller runs it); [`Demo::instructions`] is the text telling a person how
//! to connect. Dropping the `Demo` stops PostgreSQL and removes the
//! directory.

use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError};
use crate::dev::certs::{write_private, Ca, CertError};
use crate::dev::localpg::{free_port, LocalPg, LocalPgError, LocalPgOptions};
use crate::server::{Server, ServerError};

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the local PostgreSQL: {0}")]
    LocalPg(#[from] LocalPgError),
    #[error("creating a demo certificate: {0}")]
    Cert(#[from] CertError),
    #[error("writing the demo's files: {0}")]
    Io(#[from] std::io::Error),
    #[error("the demo's configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("starting pgbastion: {0}")]
    Server(#[from] ServerError),
}

/// A running demo's local PostgreSQL and files (stopped and removed on
/// drop).
pub struct Demo {
    pg: LocalPg,
    files: DemoFiles,
}

/// What the demo wrote next to the local PostgreSQL.
struct DemoFiles {
    dir: PathBuf,
    /// pgbastion's port, TCP on 127.0.0.1 and the Unix socket's name.
    port: u16,
    /// The identity-login (client certificate) listener's port.
    mtls_port: u16,
    /// The CA clients verify pgbastion's certificate against.
    proxy_ca: PathBuf,
    /// The person's client certificate and key, from the "people" CA.
    you_cert: PathBuf,
    you_key: PathBuf,
}

/// The files the pgbastion configuration names.
struct ProxyFiles {
    cert: PathBuf,
    key: PathBuf,
    auth_password_file: PathBuf,
    people_ca: PathBuf,
    app_password_file: PathBuf,
}

impl Demo {
    /// Starts PostgreSQL, writes the certificates and secrets, and binds
    /// pgbastion on `port` (another free port when it is taken; 0 = any).
    pub async fn start(port: u16) -> Result<(Demo, Server), DemoError> {
        let pg = LocalPg::start(LocalPgOptions::default())?;
        let dir = pg.dir().to_owned();
        let ca = Ca::new("pgbastion demo CA")?;
        let proxy_ca = ca.write_cert(&dir, "pgbastion-ca")?;
        let (cert, key) = ca
            .server_cert(&["localhost", "127.0.0.1"])?
            .write(&dir, "pgbastion")?;
        let auth_password_file = create_auth_role(&pg, &dir)?;
        let port = pick_port(port)?;
        let app_password_file = create_app_role(&pg, &dir)?;
        let people = Ca::new("pgbastion demo people CA")?;
        let people_ca = people.write_cert(&dir, "people-ca")?;
        let (you_cert, you_key) = {
            let mut p = rcgen::CertificateParams::default();
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "you@example.com");
            people.issue(p)?.write(&dir, "you")?
        };
        let files = DemoFiles {
            dir,
            port,
            mtls_port: free_port()?,
            proxy_ca,
            you_cert,
            you_key,
        };
        let proxy = ProxyFiles {
            cert,
            key,
            auth_password_file,
            people_ca,
            app_password_file,
        };
        let toml = config_toml(&files, &proxy, &pg);
        let server = Server::bind(Config::from_toml(&toml)?).await?;
        Ok((Demo { pg, files }, server))
    }

    /// Where everything lives; removed when the `Demo` is dropped.
    pub fn dir(&self) -> &Path {
        &self.files.dir
    }

    /// How to connect: one psql line per way in, and what to try.
    pub fn instructions(&self) -> String {
        let f = &self.files;
        format!(
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
            port = f.port,
            mtls_port = f.mtls_port,
            you_cert = f.you_cert.display(),
            you_key = f.you_key.display(),
            dir = f.dir.display(),
            password = self.pg.password,
            proxy_ca = f.proxy_ca.display(),
            direct = self.pg.direct_conninfo("postgres"),
        )
    }
}

/// scram mode with verifiers looked up on the server: the role and the
/// lookup function of docs/authentication.md. Returns the role's password file.
fn create_auth_role(pg: &LocalPg, dir: &Path) -> Result<PathBuf, DemoError> {
    let auth_password = format!("{:032x}", rand::random::<u128>());
    pg.run_sql(&format!(
        "CREATE ROLE pgbastion_auth LOGIN PASSWORD '{auth_password}';\n{}",
        crate::auth::auth_query::LOOKUP_FUNCTION_SQL
    ))?;
    let path = dir.join("pgbastion-auth-password");
    write_private(&path, auth_password.as_bytes())?;
    Ok(path)
}

/// Identity login: a person with a client certificate from the demo's
/// "people" CA is logged in as demo_app with no password; pgbastion holds
/// demo_app's password in a 0600 file, whose path this returns.
fn create_app_role(pg: &LocalPg, dir: &Path) -> Result<PathBuf, DemoError> {
    let app_password = format!("{:032x}", rand::random::<u128>());
    pg.run_sql(&format!(
        "CREATE ROLE demo_app LOGIN PASSWORD '{app_password}';"
    ))?;
    let path = dir.join("demo_app.password");
    write_private(&path, app_password.as_bytes())?;
    Ok(path)
}

/// `wanted` when it is free on 127.0.0.1, else any free port (0 asks for
/// any). One port number serves both listeners, so the Unix socket is
/// .s.PGSQL.<port> like the TCP port.
fn pick_port(wanted: u16) -> Result<u16, DemoError> {
    if wanted != 0 && std::net::TcpListener::bind(("127.0.0.1", wanted)).is_ok() {
        return Ok(wanted);
    }
    if wanted != 0 {
        eprintln!("port {wanted} is in use; picking a free one");
    }
    Ok(free_port()?)
}

/// pgbastion's configuration: TCP and Unix listeners for password logins,
/// an mTLS listener for identity login, SCRAM terminated with verifiers
/// from auth_query.
fn config_toml(f: &DemoFiles, p: &ProxyFiles, pg: &LocalPg) -> String {
    format!(
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
        cert = p.cert.display(),
        key = p.key.display(),
        dir = f.dir.display(),
        port = f.port,
        mtls_port = f.mtls_port,
        pg_port = pg.port,
        ca = pg.ca_cert.display(),
        auth_password_file = p.auth_password_file.display(),
        people_ca = p.people_ca.display(),
        app_password_file = p.app_password_file.display(),
    )
}
