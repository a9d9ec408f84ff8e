//! The operations sections: `[admin]`, the HTTP listener for metrics and
//! health, and `[reload]`, reloading when watched files change. Both are
//! read as written; `[admin]` is checked for limits that would serve no
//! one.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::error::{ConfigError, Section};

/// Reloading without a signal: when a file the configuration names (or
/// the configuration itself) changes, as when Kubernetes swaps a mounted
/// Secret, pgbastion reloads once the files have been still for `debounce`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    pub watch: bool,
    #[serde(with = "humantime_serde")]
    pub debounce: Duration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch: false,
            debounce: Duration::from_secs(2),
        }
    }
}

/// The admin HTTP listener: `/metrics`, `/livez`, `/readyz`, `/startupz`.
/// Off unless configured; bind it to loopback or a management network.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// At shutdown, how long `/readyz` says 503 before the listeners close,
    /// so a load balancer (or Kubernetes) stops sending new clients first.
    #[serde(default, with = "humantime_serde")]
    pub unready_grace: Duration,
    /// Connections served at once; more are closed as soon as they are
    /// accepted, so strangers cannot hold memory and file descriptors.
    #[serde(default = "default_admin_connections")]
    pub max_connections: usize,
    /// How long one connection may take to send its request and read the
    /// answer.
    #[serde(default = "default_admin_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
}

fn default_admin_connections() -> usize {
    256
}

fn default_admin_timeout() -> Duration {
    Duration::from_secs(5)
}

impl AdminConfig {
    /// The listener on `listen` with every other key at its default (the
    /// `--admin-listen` flag).
    pub(super) fn on(listen: SocketAddr) -> AdminConfig {
        AdminConfig {
            listen,
            unready_grace: Duration::ZERO,
            max_connections: default_admin_connections(),
            request_timeout: default_admin_timeout(),
        }
    }

    /// Refuses limits under which no request could be served.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        if self.max_connections == 0 {
            return Err(Section::Admin
                .key("max_connections")
                .invalid("must be greater than zero"));
        }
        if self.request_timeout.is_zero() {
            return Err(Section::Admin
                .key("request_timeout")
                .invalid("must be greater than zero"));
        }
        Ok(())
    }
}
