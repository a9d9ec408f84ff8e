//! Looking verifiers up on the database server itself: pgbastion logs in
//! as a dedicated role (`auth_user`) over the same verify-full TLS as every
//! session, and runs `auth_query` with the user name as its one parameter.
//!
//! A few lookup connections are kept open and reused, so a login costs one
//! round trip rather than a TLS handshake and a SCRAM exchange of its own;
//! a reused connection that turns out dead is replaced once.

use crate::sync::MutexExt;
use crate::tls::ClientTlsStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::Semaphore;

use crate::auth::login::{self, LoginError};
use crate::auth::scram::Credential;
use crate::auth::wire::{self, WireError};
use crate::config::Timeouts;
use crate::protocol::message::{self, tag, ErrorFields};
use crate::protocol::startup::{ProtocolVersion, StartupMessage};
use crate::upstream::{Upstream, UpstreamError};

/// The lookup function `auth_query` calls by default, for the role
/// `pgbastion_auth` (run as a superuser in `auth_database`). SECURITY
/// DEFINER lets that role read one user's verifier without reading
/// pg_authid; `search_path` is pinned so nobody can slip in their own
/// operators; roles that may not log in return no row, and an expired
/// password (VALID UNTIL in the past) returns NULL, like PostgreSQL's own
/// check. docs/authentication.md shows this text, and the demo and tests install it.
pub const LOOKUP_FUNCTION_SQL: &str = r#"CREATE SCHEMA IF NOT EXISTS pgbastion;
REVOKE ALL ON SCHEMA pgbastion FROM PUBLIC;
CREATE OR REPLACE FUNCTION pgbastion.lookup(p_user text, OUT usename name, OUT passwd text)
RETURNS SETOF record
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT rolname,
         CASE WHEN rolvaliduntil IS NULL OR rolvaliduntil > now() THEN rolpassword END
  FROM pg_catalog.pg_authid
  WHERE rolname = p_user AND rolcanlogin
$$;
REVOKE ALL ON FUNCTION pgbastion.lookup(text) FROM PUBLIC;
GRANT USAGE ON SCHEMA pgbastion TO pgbastion_auth;
GRANT EXECUTE ON FUNCTION pgbastion.lookup(text) TO pgbastion_auth;
"#;

/// Lookup connections kept per upstream.
const MAX_LOOKUP_CONNECTIONS: usize = 4;
/// The largest message accepted from the server on a lookup connection.
const MAX_LOOKUP_MESSAGE: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum AuthQueryError {
    #[error("cannot connect for auth_query: {0}")]
    Connect(#[from] UpstreamError),
    #[error("auth_user cannot log in: {0}")]
    Login(#[from] LoginError),
    #[error("auth_query failed on the server: {} ({})", .0.message, .0.code)]
    Query(ErrorFields),
    #[error("auth_query must return one row of (user name, password); it returned {0}")]
    Shape(String),
    #[error("auth_query connection failed: {0}")]
    Wire(#[from] WireError),
    #[error("auth_query did not answer within {0:?}")]
    Timeout(Duration),
}

/// How to log in and what to run.
pub struct AuthQuery {
    user: String,
    password: String,
    database: String,
    query: String,
    idle: Mutex<Vec<LookupConn>>,
    /// Lookups at once, and (`kept`) idle connections: shared by a
    /// templated upstream's per-endpoint copies (`fresh`), so strangers
    /// naming a thousand endpoints still hold at most this many
    /// connections to the servers, not that many per endpoint.
    slots: Arc<Semaphore>,
    kept: Arc<AtomicUsize>,
}

impl std::fmt::Debug for AuthQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthQuery")
            .field("user", &self.user)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

/// A dropped lookup (an endpoint's route evicted, a reload) gives its
/// idle connections' share of the budget back.
impl Drop for AuthQuery {
    fn drop(&mut self) {
        let n = self.idle.locked().len();
        self.kept.fetch_sub(n, Ordering::AcqRel);
    }
}

struct LookupConn {
    stream: ClientTlsStream<tokio::net::TcpStream>,
    buf: Vec<u8>,
}

impl AuthQuery {
    pub fn new(user: String, password: String, database: String, query: String) -> AuthQuery {
        AuthQuery {
            user,
            password,
            database,
            query,
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(MAX_LOOKUP_CONNECTIONS)),
            kept: Arc::default(),
        }
    }

    /// The same lookup with no connection yet (for another server of the
    /// same templated upstream), sharing this one's bounds.
    pub fn fresh(&self) -> AuthQuery {
        AuthQuery {
            user: self.user.clone(),
            password: self.password.clone(),
            database: self.database.clone(),
            query: self.query.clone(),
            idle: Mutex::new(Vec::new()),
            slots: self.slots.clone(),
            kept: self.kept.clone(),
        }
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// The stored password of `user`: `None` if the query returned no row
    /// (no such role, or one that may not log in), `Some(None)` for NULL.
    pub async fn lookup(
        &self,
        upstream: &Upstream,
        timeouts: &Timeouts,
        user: &str,
    ) -> Result<Option<Option<String>>, AuthQueryError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| AuthQueryError::Shape("no slot (shutting down)".into()))?;
        let reused = self.take_idle();
        let was_reused = reused.is_some();
        let mut conn = match reused {
            Some(c) => c,
            None => self.connect(upstream, timeouts).await?,
        };
        let result = match conn.query(&self.query, user).await {
            // A pooled connection the server has closed since (restart,
            // idle timeout): one fresh try.
            Err(AuthQueryError::Wire(_)) if was_reused => {
                conn = self.connect(upstream, timeouts).await?;
                conn.query(&self.query, user).await
            }
            other => other,
        };
        if result.is_ok() {
            self.keep(conn);
        }
        result
    }

    /// Keeps a connection for the next lookup, unless the shared budget of
    /// idle connections is spent (it is then closed).
    fn keep(&self, conn: LookupConn) {
        if self.kept.fetch_add(1, Ordering::AcqRel) < MAX_LOOKUP_CONNECTIONS {
            self.idle.locked().push(conn);
        } else {
            self.kept.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn take_idle(&self) -> Option<LookupConn> {
        let conn = self.idle.locked().pop();
        if conn.is_some() {
            self.kept.fetch_sub(1, Ordering::AcqRel);
        }
        conn
    }

    async fn connect(
        &self,
        upstream: &Upstream,
        t: &Timeouts,
    ) -> Result<LookupConn, AuthQueryError> {
        let header = upstream.local_proxy_header();
        let mut up = upstream
            .connect(t.upstream_connect, t.upstream_tls, header.as_deref())
            .await?;
        let binding = up
            .server_certificate()
            .and_then(crate::tls::channel_binding::tls_server_end_point);
        let startup = StartupMessage::new(
            ProtocolVersion { major: 3, minor: 0 },
            vec![
                ("user".into(), self.user.clone()),
                ("database".into(), self.database.clone()),
                ("application_name".into(), "pgbastion auth_query".into()),
            ],
        );
        let mut buf = Vec::new();
        let work = async {
            wire::send(&mut up.stream, startup.as_bytes()).await?;
            let first = login::first_request(&mut up.stream, &mut buf, |_| {}).await?;
            login::complete(
                &mut up.stream,
                &mut buf,
                &self.user,
                first,
                binding,
                &Credential::Password(self.password.as_bytes()),
            )
            .await?;
            // ParameterStatus, BackendKeyData, notices: until ReadyForQuery.
            loop {
                let (t, body) =
                    wire::read_message(&mut up.stream, &mut buf, MAX_LOOKUP_MESSAGE).await?;
                match t {
                    tag::READY_FOR_QUERY => return Ok(()),
                    tag::ERROR_RESPONSE => {
                        return Err(AuthQueryError::Query(
                            ErrorFields::parse(&body).unwrap_or_default(),
                        ))
                    }
                    _ => {}
                }
            }
        };
        let limit = t.authentication;
        tokio::time::timeout(limit, work)
            .await
            .unwrap_or(Err(AuthQueryError::Timeout(limit)))?;
        Ok(LookupConn {
            stream: up.stream,
            buf,
        })
    }
}

impl LookupConn {
    async fn query(
        &mut self,
        sql: &str,
        user: &str,
    ) -> Result<Option<Option<String>>, AuthQueryError> {
        wire::send(&mut self.stream, &message::extended_query(sql, &[user])).await?;
        let mut rows: Vec<Vec<Option<String>>> = Vec::new();
        let mut error = None;
        loop {
            let (t, body) =
                wire::read_message(&mut self.stream, &mut self.buf, MAX_LOOKUP_MESSAGE).await?;
            match t {
                tag::DATA_ROW => {
                    let cols = message::parse_data_row(&body).map_err(WireError::from)?;
                    rows.push(
                        cols.into_iter()
                            .map(|c| c.map(|v| String::from_utf8_lossy(v).into_owned()))
                            .collect(),
                    );
                }
                tag::ERROR_RESPONSE => {
                    error = Some(ErrorFields::parse(&body).unwrap_or_default());
                }
                tag::READY_FOR_QUERY => break,
                _ => {}
            }
        }
        if let Some(e) = error {
            return Err(AuthQueryError::Query(e));
        }
        match rows.as_mut_slice() {
            [] => Ok(None),
            [row] if row.len() >= 2 => Ok(Some(row.swap_remove(1))),
            [row] => Err(AuthQueryError::Shape(format!("{} column(s)", row.len()))),
            more => Err(AuthQueryError::Shape(format!("{} rows", more.len()))),
        }
    }
}
