//! Every pooled server connection open now, one row each, for a
//! per-connection `SHOW SERVERS` (PgBouncer's: where it connects, its
//! server process, what it is doing since when). The pool tells it
//! through `opened`, `state` and `closed` as connections open, are lent,
//! come back and close; it sits beside the pool rather than in it so the
//! pool's hot path stays a push and a pop (one short lock here per
//! change).
//!
//! Rows are keyed by `ServerConn::id`, unique within the process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use super::PoolKey;
use crate::sync::MutexExt;

/// What a server connection is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Lent to a client (or being opened, cleaned or checked for one).
    Active,
    /// In the pool, free.
    Idle,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Idle => "idle",
        }
    }
}

/// One open server connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServerRow {
    pub id: u64,
    pub upstream: String,
    pub database: String,
    pub user: String,
    /// The server's address as dialed.
    pub addr: SocketAddr,
    /// The server's backend process id (from its BackendKeyData).
    pub pid: u32,
    pub state: State,
    pub connected: SystemTime,
    /// When it entered `state`.
    pub since: SystemTime,
}

/// One connection's entry: what does not change, and its state, which
/// only the connection's holder changes (a lock of its own, never taken
/// by another connection: lending and giving back touch nothing shared).
#[derive(Debug)]
pub(crate) struct Row {
    fixed: ServerRow,
    live: Mutex<(State, SystemTime)>,
}

impl Row {
    /// The connection was lent (`Active`) or came back (`Idle`).
    pub fn set(&self, state: State) {
        let mut live = self.live.locked();
        if live.0 != state {
            *live = (state, SystemTime::now());
        }
    }

    fn snapshot(&self) -> ServerRow {
        let (state, since) = *self.live.locked();
        ServerRow {
            state,
            since,
            ..self.fixed.clone()
        }
    }
}

/// The rows; one per process (`global`), or one of its own in tests.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    rows: Mutex<HashMap<u64, Arc<Row>>>,
}

impl Registry {
    /// A connection opened (for a client that is about to use it: active).
    pub fn opened(
        &self,
        id: u64,
        upstream: &str,
        pool: &PoolKey,
        addr: SocketAddr,
        pid: u32,
    ) -> Arc<Row> {
        let now = SystemTime::now();
        let row = Arc::new(Row {
            fixed: ServerRow {
                id,
                upstream: upstream.to_owned(),
                database: pool.database.clone(),
                user: pool.user.clone(),
                addr,
                pid,
                state: State::Active,
                connected: now,
                since: now,
            },
            live: Mutex::new((State::Active, now)),
        });
        self.rows.locked().insert(id, row.clone());
        row
    }

    pub fn closed(&self, id: u64) {
        self.rows.locked().remove(&id);
    }

    /// Every row, by upstream, database, user, then id.
    pub fn list(&self) -> Vec<ServerRow> {
        let rows: Vec<Arc<Row>> = self.rows.locked().values().cloned().collect();
        let mut rows: Vec<ServerRow> = rows.iter().map(|r| r.snapshot()).collect();
        rows.sort_by(|a, b| {
            (&a.upstream, &a.database, &a.user, a.id).cmp(&(
                &b.upstream,
                &b.database,
                &b.user,
                b.id,
            ))
        });
        rows
    }
}

/// The process's registry.
pub(crate) fn global() -> &'static Registry {
    static GLOBAL: OnceLock<Registry> = OnceLock::new();
    GLOBAL.get_or_init(Registry::default)
}

/// A connection's row in the process's registry, for as long as the
/// connection exists, however it ends (dropped with it).
#[derive(Debug)]
pub(crate) struct Listed(Arc<Row>);

impl Listed {
    /// Lists a connection that has logged in.
    pub fn new(id: u64, upstream: &str, pool: &PoolKey, addr: SocketAddr, pid: u32) -> Listed {
        Listed(global().opened(id, upstream, pool, addr, pid))
    }

    pub fn set(&self, state: State) {
        self.0.set(state);
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        global().closed(self.0.fixed.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(database: &str, user: &str) -> PoolKey {
        PoolKey {
            endpoint: None,
            database: database.into(),
            user: user.into(),
        }
    }

    #[test]
    fn a_connection_from_open_to_close() {
        let r = Registry::default();
        let addr: SocketAddr = "192.0.2.7:5432".parse().unwrap();
        let _ = r.opened(2, "pg", &key("db", "app"), addr, 4242);
        let _ = r.opened(1, "pg", &key("db", "app"), addr, 4243);
        let _ = r.opened(3, "other", &key("db", "app"), addr, 4244);
        let rows = r.list();
        assert_eq!(
            rows.iter().map(|r| r.id).collect::<Vec<_>>(),
            [3, 1, 2],
            "by upstream, then id"
        );
        assert_eq!(
            (rows[1].state, rows[1].pid, rows[1].addr),
            (State::Active, 4243, addr)
        );
        let one = r.list().into_iter().find(|x| x.id == 1).unwrap();
        assert_eq!(one.state, State::Active);
        r.rows.locked()[&1].set(State::Idle);
        assert_eq!(r.list()[1].state.as_str(), "idle");
        assert!(r.list()[1].since >= r.list()[1].connected);
        r.closed(1);
        r.closed(1);
        assert_eq!(r.list().len(), 2);
    }

    /// A listed connection is in the process's registry until it is
    /// dropped (ids far from any a test's pool would get).
    #[test]
    fn a_listed_connection_leaves_the_registry_when_dropped() {
        let id = u64::MAX - 7;
        let addr: SocketAddr = "[::1]:5432".parse().unwrap();
        let listed = Listed::new(id, "pg", &key("db", "app"), addr, 1);
        listed.set(State::Idle);
        let row = global().list().into_iter().find(|r| r.id == id);
        assert_eq!(row.map(|r| r.state), Some(State::Idle));
        drop(listed);
        assert!(!global().list().iter().any(|r| r.id == id));
    }
}
