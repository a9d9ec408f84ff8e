//! `ConsoleBackend`: what the console reads and does, as the server
//! provides it (implemented by the server's shared state). The console
//! knows this trait and the plain rows below, never the server or the
//! session, so `admin::console` sits below both (no import circle).

use crate::admin::live::SessionInfo;
use crate::audit::Event;
use std::time::Duration;

use crate::config::{AuthMode, ClientTlsMode, ListenerIdentity, PoolMode};

/// One `[[upstream]]` as configured now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UpstreamRow {
    pub name: String,
    /// `host:port` as dialed.
    pub address: String,
    pub server_name: String,
    pub auth: AuthMode,
}

/// One listener accepting now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListenerRow {
    pub name: String,
    pub identity: ListenerIdentity,
    pub client_tls: ClientTlsMode,
    /// The name of the upstream its sessions go to.
    pub upstream: String,
}

/// Whether Redis answers the fleet's instance now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Link {
    Up,
    Down,
}

/// The fleet (`[cluster]`) as this instance sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClusterState {
    Off,
    On {
        link: Link,
        instance: String,
        /// Cancel keys and identity slots this instance holds in Redis.
        cancel_mappings: usize,
        identity_slots: usize,
    },
}

/// One pool (a database and user of a pooled upstream) as its counters
/// read now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PoolRow {
    pub upstream: String,
    pub database: String,
    pub user: String,
    pub mode: PoolMode,
    /// `pool_size`: server connections this pool may hold.
    pub size: usize,
    /// The upstream is paused (PAUSE).
    pub paused: bool,
    /// Sessions attached, holding a server connection, waiting for one.
    pub clients: usize,
    pub clients_active: usize,
    pub clients_waiting: usize,
    /// Server connections open (in use or idle) and idle.
    pub servers_open: usize,
    pub servers_idle: usize,
    /// The longest wait for a server connection in progress.
    pub max_wait: Duration,
}

/// What a RELOAD did, or why it was refused (then nothing changed).
pub(crate) type ReloadResult = Result<String, String>;

pub(crate) trait ConsoleBackend {
    /// The sessions relaying now, oldest first.
    fn sessions(&self) -> Vec<SessionInfo>;
    fn upstreams(&self) -> Vec<UpstreamRow>;
    fn listeners(&self) -> Vec<ListenerRow>;
    /// Audit events written and dropped so far.
    fn audit_counts(&self) -> (u64, u64);
    fn cluster(&self) -> ClusterState;
    /// Every certificate pgbastion uses and when it expires (Unix time),
    /// as the metrics report them.
    fn certificate_expiries(&self) -> Vec<(String, i64)>;
    /// Ends the session with this id; false if there is none.
    fn kill(&self, id: &str) -> bool;
    /// Everything SIGHUP does.
    fn reload(&self) -> ReloadResult;
    /// The names of the upstreams with `pool_mode`, as configured now.
    fn pooled_upstreams(&self) -> Vec<String>;
    /// Every pool of every pooled upstream, by upstream then key.
    fn pools(&self) -> Vec<PoolRow>;
    /// PAUSE, RESUME, RECONNECT on these pooled upstreams (names from
    /// `pooled_upstreams`); they return at once.
    fn pause(&self, upstreams: &[String]);
    fn resume(&self, upstreams: &[String]);
    fn reconnect(&self, upstreams: &[String]);
    /// Server connections open in these upstreams' pools (PAUSE waits for
    /// none).
    fn server_connections(&self, upstreams: &[String]) -> usize;
    /// Every pooled server connection open now (`SHOW SERVERS`).
    fn servers(&self) -> Vec<crate::pool::registry::ServerRow>;
    /// Writes an event to the audit log.
    fn audit(&self, event: &Event<'_>);
}
