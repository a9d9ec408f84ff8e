//! `[limits]` and `[timeouts]`: how many sessions and logins in progress
//! pgbastion admits, how fast it forgets failed logins and cancels, and the
//! deadline of each phase before the relay. Owns both types, their
//! defaults and the checks that refuse zeros where zero would lock
//! everyone out or never time out.

use std::time::Duration;

use serde::Deserialize;

use super::error::{ConfigError, Section};

/// Resource limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Authenticated sessions; one more gets SQLSTATE 53300. Logins in
    /// progress are bounded by the pending limits instead, so strangers
    /// cannot take the places of sessions.
    pub max_sessions: usize,
    /// Connections not yet authenticated (negotiating TLS and startup, or
    /// authenticating), per listener; past this, new connections are
    /// closed at once so a flood of idle sockets or stalled logins cannot
    /// starve real clients (nor other listeners).
    pub max_pending: usize,
    /// The same, per client address across listeners, so one address
    /// cannot take every slot (behind a PROXY-protocol balancer, the
    /// address its header states, once read).
    pub max_pending_per_address: usize,
    /// Cancel requests per second allowed from one client address.
    pub cancel_rate: f64,
    /// How many cancel requests one address may send in a burst.
    pub cancel_burst: f64,
    /// scram mode: failed logins one client address may have per
    /// `failed_login_window` before its logins are refused for a while.
    pub failed_logins_per_address: u32,
    /// scram mode: the same per user name, across addresses (higher, so
    /// that a guessing run cannot lock a real user out cheaply).
    pub failed_logins_per_user: u32,
    /// The window over which those failures are counted: the budget
    /// refills at `n / window`.
    #[serde(with = "humantime_serde")]
    pub failed_login_window: Duration,
    /// IPv6 clients are throttled (failed logins, cancel rate) per network
    /// of this prefix length, since one host usually holds a whole /64.
    pub ipv6_prefix: u8,
    /// scram mode: a spent `failed_logins_per_user` refuses the user from
    /// every address. Off (default): from an address with no recent
    /// failure, a correct proof still passes, so strangers cannot keep a
    /// user locked out.
    pub failed_logins_per_user_strict: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 1000,
            max_pending: 256,
            max_pending_per_address: 64,
            cancel_rate: 5.0,
            cancel_burst: 20.0,
            failed_logins_per_address: 10,
            failed_logins_per_user: 30,
            failed_login_window: Duration::from_secs(60),
            ipv6_prefix: 64,
            failed_logins_per_user_strict: false,
        }
    }
}

impl Limits {
    /// Refuses a zero that would admit no one, or an IPv6 prefix that is
    /// no network.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        for (key, n) in [
            ("max_sessions", self.max_sessions),
            ("max_pending", self.max_pending),
            ("max_pending_per_address", self.max_pending_per_address),
        ] {
            if n == 0 {
                return Err(Section::Limits.key(key).invalid("must be at least 1"));
            }
        }
        for (key, zero) in [
            (
                "failed_logins_per_address",
                self.failed_logins_per_address == 0,
            ),
            ("failed_logins_per_user", self.failed_logins_per_user == 0),
            ("failed_login_window", self.failed_login_window.is_zero()),
        ] {
            if zero {
                return Err(Section::Limits
                    .key(key)
                    .invalid("must be greater than zero"));
            }
        }
        if !(1..=128).contains(&self.ipv6_prefix) {
            return Err(Section::Limits
                .key("ipv6_prefix")
                .invalid("must be between 1 and 128 (64: one host's network)"));
        }
        Ok(())
    }
}

/// Deadlines for each phase that happens before the relay. After the relay
/// starts, a session may be idle for as long as client and server like.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// From accept to a complete StartupMessage, TLS handshake included.
    #[serde(with = "humantime_serde")]
    pub client_startup: Duration,
    /// TCP connect to one upstream address.
    #[serde(with = "humantime_serde")]
    pub upstream_connect: Duration,
    /// SSL negotiation and TLS handshake with the upstream.
    #[serde(with = "humantime_serde")]
    pub upstream_tls: Duration,
    /// From the StartupMessage sent upstream to ReadyForQuery (covers the
    /// client typing a password into psql's prompt, hence generous).
    #[serde(with = "humantime_serde")]
    pub authentication: Duration,
    /// Reading an inbound PROXY protocol header.
    #[serde(with = "humantime_serde")]
    pub proxy_header: Duration,
    /// Forwarding one cancel request: connect, TLS, send.
    #[serde(with = "humantime_serde")]
    pub cancel: Duration,
    /// After a client closes its sending side: how long the server's reply
    /// to what it sent last is still relayed before the session ends.
    #[serde(with = "humantime_serde")]
    pub half_close: Duration,
    /// After SIGTERM/SIGINT: how long sessions busy in a transaction may
    /// finish it (idle ones end at once).
    #[serde(with = "humantime_serde")]
    pub shutdown_drain: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            client_startup: Duration::from_secs(10),
            upstream_connect: Duration::from_secs(5),
            upstream_tls: Duration::from_secs(10),
            authentication: Duration::from_secs(60),
            proxy_header: Duration::from_secs(3),
            cancel: Duration::from_secs(5),
            half_close: Duration::from_secs(10),
            shutdown_drain: Duration::from_secs(30),
        }
    }
}

impl Timeouts {
    /// Refuses a zero deadline, which would fail every session
    /// (`shutdown_drain` may be zero: sessions then end at once).
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        for (key, d) in [
            ("client_startup", self.client_startup),
            ("upstream_connect", self.upstream_connect),
            ("upstream_tls", self.upstream_tls),
            ("authentication", self.authentication),
            ("cancel", self.cancel),
            ("proxy_header", self.proxy_header),
            ("half_close", self.half_close),
        ] {
            if d.is_zero() {
                return Err(Section::Timeouts
                    .key(key)
                    .invalid("must be greater than zero"));
            }
        }
        Ok(())
    }
}
