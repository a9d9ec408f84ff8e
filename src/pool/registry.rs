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
use std::sync::{Mutex, OnceLock};
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

/// The rows; one per process (`global`), or one of its own in tests.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    rows: Mutex<HashMap<u64, ServerRow>>,
}

impl Registry {
    /// A connection opened (for a client that is about to use it: active).
    pub fn opened(&self, id: u64, upstream: &str, pool: &PoolKey, addr: SocketAddr, pid: u32) {
        let now = SystemTime::now();
        self.rows.locked().insert(
            id,
            ServerRow {
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
        );
    }

    /// A connection was lent (`Active`) or came back (`Idle`); unknown ids
    /// are ignored.
    pub fn state(&self, id: u64, state: State) {
        if let Some(row) = self.rows.locked().get_mut(&id) {
            if row.state != state {
                row.state = state;
                row.since = SystemTime::now();
            }
        }
    }

    pub fn closed(&self, id: u64) {
        self.rows.locked().remove(&id);
    }

    /// Every row, by upstream, database, user, then id.
    pub fn list(&self) -> Vec<ServerRow> {
        let mut rows: Vec<ServerRow> = self.rows.locked().values().cloned().collect();
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

/// `global().opened(..)`: call where a connection has logged in.
pub(crate) fn opened(id: u64, upstream: &str, pool: &PoolKey, addr: SocketAddr, pid: u32) {
    global().opened(id, upstream, pool, addr, pid);
}

/// `global().state(..)`: call where a connection is lent or given back.
pub(crate) fn state(id: u64, state: State) {
    global().state(id, state);
}

/// `global().closed(..)`: call wherever a connection is dropped.
pub(crate) fn closed(id: u64) {
    global().closed(id);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(database: &str, user: &str) -> PoolKey {
        PoolKey {
            database: database.into(),
            user: user.into(),
        }
    }

    #[test]
    fn a_connection_from_open_to_close() {
        let r = Registry::default();
        let addr: SocketAddr = "192.0.2.7:5432".parse().unwrap();
        r.opened(2, "pg", &key("db", "app"), addr, 4242);
        r.opened(1, "pg", &key("db", "app"), addr, 4243);
        r.opened(3, "other", &key("db", "app"), addr, 4244);
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
        r.state(1, State::Idle);
        r.state(99, State::Idle);
        assert_eq!(r.list()[1].state.as_str(), "idle");
        assert!(r.list()[1].since >= r.list()[1].connected);
        r.closed(1);
        r.closed(1);
        assert_eq!(r.list().len(), 2);
    }

    /// The process's registry through the free functions the pool calls
    /// (ids far from any a test's pool would get).
    #[test]
    fn the_hooks_reach_the_global_registry() {
        let id = u64::MAX - 7;
        let addr: SocketAddr = "[::1]:5432".parse().unwrap();
        opened(id, "pg", &key("db", "app"), addr, 1);
        state(id, State::Idle);
        let row = global().list().into_iter().find(|r| r.id == id);
        assert_eq!(row.map(|r| r.state), Some(State::Idle));
        closed(id);
        assert!(!global().list().iter().any(|r| r.id == id));
    }
}
