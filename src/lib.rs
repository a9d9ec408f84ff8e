//! pgbastion: a security proxy for the PostgreSQL wire protocol.
//!
//! Map of the crate, in the order a connection meets it:
//! - `server`: listeners, accept loop, limits, shutdown.
//! - `session`: one connection's state machine, from accept to audit end.
//! - `protocol`: the wire format, pure parsing and building.
//! - `auth`: passthrough observation, or SCRAM termination on both legs.
//! - `tls`: the client-facing acceptor and the verify-full upstream connector.
//! - `upstream`: dialing an upstream and negotiating TLS with it.
//! - `relay`: the byte copy after authentication, and teardown.
//! - `cancel`: pgbastion's own cancel keys and their forwarding.
//! - `audit`: the JSON-lines audit log; `sink`: the writer threads behind
//!   it and the text log, so a stalled reader never blocks a session.
//! - `ratelimit`: keyed token buckets (cancel requests, failed logins);
//!   `keyed_slots`: concurrent slots per address or identity;
//!   `warn_limit`: log and audit lines caused by strangers, summarised.
//! - `admin`: what operators use: the HTTP listener with the health probes
//!   and `admin::metrics` (Prometheus), and `admin::console` (`SHOW
//!   SESSIONS`, `KILL`, `RELOAD` on database `pgbastion`) over
//!   `admin::live`, the sessions relaying now.
//! - `watch`: reloading when a configuration file changes.
//! - `config`: the one configuration model; `fd_limit`: the open-files
//!   limit raised to what the limits need.
//! - `localpg`, `devcerts`: a throwaway local PostgreSQL and a private CA,
//!   for `pgbastion demo` and the tests.

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod auth;
pub mod cancel;
pub mod cli;
pub mod cluster;
pub mod config;
pub(crate) mod crypto;
pub mod dev;
pub mod identity;
pub mod limits;
pub(crate) mod net;
pub mod policy;
pub mod protocol;
pub mod relay;
pub(crate) mod secret_file;
pub mod server;
pub mod session;
pub mod stream;
pub mod sync;
pub mod tls;
pub mod upstream;
