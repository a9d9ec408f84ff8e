//! pgbastion's integration tests, one binary (rustls's `tests/api.rs`
//! pattern): every module below starts real PostgreSQL servers, real clients
//! and the real `pgbastion` binary, and `common` (the harness: servers,
//! certificates, the proxy process, clients) is compiled once for all.
//!
//! Run one area with a filter, e.g. `cargo nextest run --test it scram::`.

mod admin;
mod audit_chain;
mod cancel;
mod cli;
mod cluster;
mod common;
mod console;
mod forward;
mod https;
mod identity;
mod identity_login;
mod pool;
mod pool_pgbench;
mod proxy;
mod proxy_protocol;
mod query_audit;
mod reliability;
mod reload;
mod rogue;
mod routing;
mod runtime;
mod scram;
mod secret_files;
mod serverless;
mod sni;
mod tls_files;
mod upstream_options;
