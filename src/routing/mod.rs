//! Routing one listener to many databases (issue 22): which upstream a
//! connection goes to, decided from what it says before any server is
//! involved — the TLS server name (exact, or a wildcard whose first
//! label is the tenant's endpoint), `options=endpoint=<id>` for clients
//! that send no server name, and the database it asks for.
//!
//! Pure and I/O-free, so every rule is unit-tested here:
//! - `name`: `Endpoint` and `ServerNameMatch`, the validated names;
//! - `options`: taking `endpoint=` out of the startup `options`;
//! - `table`: the `[[route]]` table, its hash lookup, and the check for
//!   routes an earlier one hides.
//!
//! What a route leads to (an upstream, a templated one resolved for the
//! endpoint) is `server::route`'s business; the session's stage that asks
//! is `session::route`.

pub mod name;
pub mod options;
pub mod table;

pub use name::{Endpoint, ServerNameMatch};
pub use table::{RouteSpec, Table};

/// What a connection says that routing looks at.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub listener: &'a str,
    /// The TLS server name the client sent, lowercased (None: no TLS, or
    /// a client that sends none, such as libpq given an IP address).
    pub sni: Option<&'a str>,
    /// The endpoint named in `options`, validated.
    pub options_endpoint: Option<&'a Endpoint>,
    /// The database the client asked for.
    pub database: &'a str,
}

/// The lookup's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// The route's number in the table (None: no route matched).
    pub route: Option<usize>,
    /// The session's endpoint, from the server name or `options`.
    pub endpoint: Option<Endpoint>,
}

/// Why a connection cannot be routed. Each says what the client sent and
/// how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("the endpoint in {from} is not valid: {reason}")]
    BadEndpoint { from: &'static str, reason: String },
    #[error(
        "the TLS server name {server_name:?} names endpoint \"{from_sni}\" but options name endpoint \"{from_options}\""
    )]
    EndpointConflict {
        server_name: String,
        from_sni: Endpoint,
        from_options: Endpoint,
    },
    #[error("options name two endpoints, {0:?} and {1:?}")]
    TwoEndpoints(String, String),
    #[error("no route for {sent} and listener {listener:?} has no upstream of its own")]
    NoRoute { sent: String, listener: String },
    #[error(
        "upstream {upstream:?} serves one database per endpoint, and {sent} names no endpoint"
    )]
    EndpointRequired { upstream: String, sent: String },
}

impl Query<'_> {
    /// What the client sent, for messages: "server name \"x\", database
    /// \"y\"", or "no TLS server name, database \"y\"".
    pub fn described(&self) -> String {
        let sni = match self.sni {
            Some(s) => format!("server name {:?}", name::truncated(s)),
            None => "no TLS server name".to_owned(),
        };
        let endpoint = match self.options_endpoint {
            Some(e) => format!(", endpoint {:?} in options", e.as_str()),
            None => String::new(),
        };
        format!(
            "{sni}{endpoint}, database {:?}",
            name::truncated(self.database)
        )
    }
}
