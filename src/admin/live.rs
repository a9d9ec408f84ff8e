//! The sessions relaying right now, for the admin console (`SHOW
//! SESSIONS`, `KILL`): each registers when its relay starts and is gone
//! when its guard drops. KILL flips the session's own watch channel, which
//! its relay selects on.

use crate::sync::MutexExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::watch;

/// What the console shows of one session.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub id: String,
    pub identity: String,
    pub client: String,
    pub user: String,
    pub database: String,
    pub upstream: String,
    pub client_tls: bool,
    pub upstream_tls: bool,
    pub since: SystemTime,
    /// Bytes and transaction state, as the relay last saw them.
    pub progress: Arc<crate::relay::Progress>,
}

struct Entry {
    info: SessionInfo,
    kill: watch::Sender<bool>,
}

/// The registry, shared by every session.
#[derive(Default)]
pub struct LiveSessions {
    entries: Arc<Mutex<HashMap<String, Entry>>>,
}

/// A registered session; dropping it unregisters.
pub struct LiveGuard {
    id: String,
    entries: Arc<Mutex<HashMap<String, Entry>>>,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.entries.locked().remove(&self.id);
    }
}

impl LiveSessions {
    /// Registers a relaying session; returns its guard and the receiver
    /// its relay watches for KILL.
    pub fn register(&self, info: SessionInfo) -> (LiveGuard, watch::Receiver<bool>) {
        let (kill, rx) = watch::channel(false);
        let id = info.id.clone();
        self.entries
            .locked()
            .insert(id.clone(), Entry { info, kill });
        (
            LiveGuard {
                id,
                entries: self.entries.clone(),
            },
            rx,
        )
    }

    /// Every live session, oldest first.
    pub fn list(&self) -> Vec<SessionInfo> {
        let mut v: Vec<SessionInfo> = self
            .entries
            .locked()
            .values()
            .map(|e| e.info.clone())
            .collect();
        v.sort_by_key(|i| i.since);
        v
    }

    /// Ends session `id`; false if there is no such session.
    pub fn kill(&self, id: &str) -> bool {
        match self.entries.locked().get(id) {
            Some(e) => {
                e.kill.send_replace(true);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> SessionInfo {
        SessionInfo {
            id: id.into(),
            identity: "x".into(),
            client: "127.0.0.1".into(),
            user: "u".into(),
            database: "d".into(),
            upstream: "pg".into(),
            client_tls: true,
            upstream_tls: true,
            since: SystemTime::now(),
            progress: Arc::default(),
        }
    }

    #[test]
    fn register_list_kill_and_unregister() {
        let live = LiveSessions::default();
        let (guard, mut rx) = live.register(info("a"));
        let (_g2, _) = live.register(info("b"));
        assert_eq!(live.list().len(), 2);
        assert!(live.kill("a"));
        assert!(*rx.borrow_and_update());
        assert!(!live.kill("nope"));
        drop(guard);
        assert_eq!(live.list().len(), 1);
        assert!(!live.kill("a"));
    }
}
