//! pgbastion: a security proxy for the PostgreSQL wire protocol.
//!
//! Map of the crate. Dependencies point down (no module imports one that
//! imports it back: `scripts/import_cycles.py` checks), in the order a
//! connection meets them:
//! - `cli`: the subcommands behind `main.rs` (run, check-config, audit
//!   verify, scram-secret, demo) and how an error is printed.
//! - `server`: binding, the accept loops, what sessions share (`state`),
//!   the `Route` from a listener to an upstream and how sessions log in to
//!   it, loading and reloading configuration files, draining.
//! - `session`: one connection as stages (negotiate, admit, login plan,
//!   connect, authenticate, finish), each returning what the next takes;
//!   `session::cancel` for CancelRequests.
//! - `protocol`: the wire format, pure parsing and building (startup
//!   packets, messages, PROXY headers) and the one incremental framer.
//! - `auth`: passthrough observation, SCRAM on both legs, identity login,
//!   verifier and credential sources, the failed-login throttle.
//! - `tls`: the client-facing acceptor and the `ServerCerts` it serves
//!   (one per TLS server name, `tls::sni`), the verify-full upstream
//!   connector, channel binding.
//! - `routing`: which upstream a connection goes to (server name,
//!   `options=endpoint=`, database), pure: names, options, the route table.
//! - `upstream`: dialing an upstream and verifying it (a pure dialer).
//! - `relay`: the framed copy after authentication, and teardown.
//! - `cancel`: pgbastion's own cancel keys and their forwarding.
//! - `identity`, `policy`: who the client is (certificate, tailnet), and
//!   the rules that decide what it may do.
//! - `audit`: the audit log (events as types in `audit::event`, the hash
//!   chain, the writer threads, the query audit and its SQL lexer).
//! - `admin`: the HTTP listener (health probes, Prometheus metrics), the
//!   console (`SHOW SESSIONS`, `KILL`, `RELOAD`) and the live sessions.
//! - `cluster`: a fleet of instances sharing cancels and limits via Redis.
//! - `limits`: token buckets, keyed and pending slots, the warn limiter,
//!   the open-files limit.
//! - `config`: the one configuration model, one file per section.
//! - `net`, `crypto`, `secret_file`, `stream`, `sync`: shared helpers
//!   (socket options, HMAC/SHA-256, the one reader of secret files, boxed
//!   streams, poison-tolerant locks).
//! - `dev`: a throwaway local PostgreSQL and a private CA, for `pgbastion
//!   demo` and the tests.
//!
//! Modules are public only where the binary, the integration tests, the
//! fuzz targets or the benchmark need them.

#![forbid(unsafe_code)]

pub(crate) mod admin;
pub mod audit;
pub mod auth;
pub(crate) mod cancel;
pub mod cli;
pub mod cluster;
pub mod config;
pub(crate) mod crypto;
pub mod dev;
pub mod http;
pub mod identity;
pub mod limits;
pub(crate) mod net;
pub(crate) mod policy;
pub mod pool;
pub mod protocol;
pub(crate) mod relay;
pub mod routing;
pub(crate) mod secret_file;
pub mod server;
pub(crate) mod session;
pub(crate) mod stream;
pub(crate) mod sync;
pub mod tls;
pub(crate) mod upstream;
