//! `pgbastion check-config`: loads a config file and everything it names
//! (`server::check`) without binding or connecting, and describes what it
//! would run.

use std::path::Path;

use anyhow::{Context, Result};

use crate::config::{Config, PoolConfig, UpstreamConfig};

/// Validates `path`; on success prints a summary of listeners, upstreams,
/// rules and the cluster on standard output.
pub fn check_config(path: &Path) -> Result<()> {
    let config = Config::from_file(path)?;
    crate::server::check(&config).with_context(|| format!("{} is not usable", path.display()))?;
    println!("{}: OK", path.display());
    for warning in config.warnings() {
        println!("  warning: {warning}");
    }
    for l in &config.listeners {
        let to = match l.upstream {
            Some(u) => format!("upstream {:?}", config.upstreams[u].name),
            None => "routes only".to_owned(),
        };
        match &l.protocol {
            crate::config::ListenerProtocol::Postgres => println!(
                "  listener {:?} on {} (client TLS: {:?}) -> {to}",
                l.name, l.bind, l.client_tls
            ),
            crate::config::ListenerProtocol::Https(h) => println!(
                "  listener {:?} on {} (https: WebSocket and POST /sql; {} WebSockets, {} requests at once) -> {to}",
                l.name, l.bind, h.max_websockets, h.max_requests
            ),
        }
    }
    describe_routes(&config);
    for u in &config.upstreams {
        describe_upstream(u);
    }
    match config.policy.len() {
        0 => println!("  no [[rule]]: every client that passes TLS is admitted"),
        n => println!("  {n} policy rule(s); requests no rule matches are denied"),
    }
    if let Some(c) = &config.cluster {
        // The URL holds no password (config refuses one).
        println!(
            "  cluster: instance {:?} sharing cancels and limits through {} (Redis is not contacted here)",
            c.instance, c.redis
        );
    }
    Ok(())
}

/// The `[[route]]`s in the order they are tried.
fn describe_routes(config: &Config) {
    let routes = config.routes.routes();
    if routes.len() > 20 {
        println!(
            "  {} routes (first match wins, in file order)",
            routes.len()
        );
        return;
    }
    for r in routes {
        let mut when = Vec::new();
        if let Some(n) = &r.server_name {
            when.push(format!("server name {n}"));
        }
        if let Some(e) = &r.endpoint {
            when.push(format!("endpoint {e}"));
        }
        if let Some(d) = &r.database {
            when.push(format!("database {d:?}"));
        }
        if let Some(ls) = &r.listeners {
            when.push(format!("on listeners {ls:?}"));
        }
        let when = match when.is_empty() {
            true => "every connection".to_owned(),
            false => when.join(", "),
        };
        println!(
            "  route {:?}: {when} -> upstream {:?}",
            r.name, config.upstreams[r.upstream].name
        );
    }
}

/// An upstream's address, verified name, pool, and where its logins'
/// SCRAM verifiers come from.
fn describe_upstream(u: &UpstreamConfig) {
    println!(
        "  upstream {:?} at {}:{} verified as {:?}",
        u.name, u.host, u.port, u.server_name
    );
    if let Some(d) = &u.database {
        println!("    asks the server for database {d:?}");
    }
    if u.is_templated() {
        println!("    a template: {{endpoint}} is each session's endpoint");
    }
    if let Some(p) = &u.pool {
        describe_pool(p);
    }
    let Some(s) = &u.scram else {
        println!("    auth: passthrough (clients must set channel_binding=disable)");
        return;
    };
    println!("    auth: scram (pgbastion terminates SCRAM, channel-bound on both legs)");
    if let Some(f) = &s.secrets_file {
        println!("    verifiers from secrets_file {}", f.display());
    }
    if let Some(q) = &s.auth_query {
        println!(
            "    verifiers from auth_query as {:?} in database {:?}: {}",
            q.user, q.database, q.query
        );
    }
    if let Some(k) = &s.mock_key {
        println!("    unknown users' mock salts derived from {k}");
    }
    if s.secrets_file.is_some() && s.auth_query.is_some() {
        println!("    auth_query also runs for users in secrets_file (equal timing; its answer is not used for them)");
    }
}

/// A pooled upstream's mode and bounds (unpooled upstreams print nothing:
/// one server connection per client session, as without pgbastion).
fn describe_pool(p: &PoolConfig) {
    let total = match p.max_server_connections {
        Some(n) => format!("at most {n} server connections in all"),
        None => "no bound across pools".to_owned(),
    };
    println!(
        "    pool: {} mode, {} server connections per (database, user) ({} kept open), {total}",
        p.mode.as_str(),
        p.size,
        p.min_size
    );
    println!(
        "    pool: idle connections closed after {}, every connection after {}; clients wait {} for one; {} prepared statements kept per connection",
        humantime::format_duration(p.server_idle_timeout),
        humantime::format_duration(p.server_lifetime),
        humantime::format_duration(p.query_wait_timeout),
        p.max_prepared_statements
    );
}
