//! The open-files limit. Every session holds two sockets (client and
//! server) and every unauthenticated connection one, so the common default
//! soft limit of 1024 would cap pgbastion near 500 sessions, far below
//! `limits.max_sessions`. Like Go's runtime and most servers, pgbastion
//! raises its soft limit to the hard limit at startup, and says so when
//! even that is too low for its configured limits.

use rustix::process::{getrlimit, setrlimit, Resource};

/// The open-files limit before and after `raise`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    pub before: Option<u64>,
    pub now: Option<u64>,
}

/// Raises the soft open-files limit to the hard limit (None: unlimited).
pub fn raise() -> std::io::Result<OpenFiles> {
    let mut limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        setrlimit(Resource::Nofile, limit)?;
    }
    Ok(OpenFiles {
        before,
        now: getrlimit(Resource::Nofile).current,
    })
}

/// The files pgbastion may need at its configured limits: two per session,
/// one per unauthenticated connection on each listener, and a margin for
/// listeners, logs, lookup connections and the runtime.
pub fn needed(max_sessions: usize, max_pending: usize, listeners: usize) -> u64 {
    (2 * max_sessions + max_pending * listeners + 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_ends_at_the_hard_limit() {
        let files = raise().unwrap();
        assert_eq!(files.now, getrlimit(Resource::Nofile).maximum);
        // None is unlimited.
        assert!(files.now.is_none() || files.now >= files.before);
    }

    #[test]
    fn the_default_limits_need_more_than_1024_files() {
        assert!(needed(1000, 256, 1) > 1024);
    }
}
