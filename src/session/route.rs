//! Stage 2a, routing: which upstream the session goes to, from the TLS
//! server name, `options=endpoint=<id>` and the database asked for
//! (`server::router`), and the StartupMessage as that upstream must see
//! it — `endpoint=` taken out of `options` (the server would refuse it),
//! the upstream's `database` in place of the client's. Decided before the
//! policy, which judges the destination; nothing reaches a server here.

use super::{Exit, Session, SessionError};
use crate::audit::{ClientTransport, RouteFacts};
use crate::protocol::startup::StartupMessage;
use crate::routing::name::truncated;
use crate::routing::{options, Endpoint, Query, RouteError};
use crate::server::router::Destination;

/// A routed session: where it goes and what it will ask the server for.
pub(super) struct Routed {
    pub destination: Destination,
    pub startup: StartupMessage,
}

impl Session {
    /// Routes the session and records where it went in its facts (so the
    /// audit's start, end and refusal events carry the route).
    pub(super) fn route(&mut self, startup: StartupMessage) -> Result<Routed, Exit> {
        let (options_endpoint, startup) = take_endpoint(startup).map_err(route_refused)?;
        let sni = self.server_name();
        let query = Query {
            listener: &self.listener.name,
            sni: sni.as_deref(),
            options_endpoint: options_endpoint.as_ref(),
            database: startup.database(),
        };
        let destination = self
            .listener
            .router
            .route(&query, self.listener.route.as_ref())
            .map_err(route_refused)?;
        let config = &destination.route.upstream.config;
        let startup = match &config.database {
            Some(database) => startup.with_param("database", database),
            None => startup,
        };
        self.facts.route = Some(RouteFacts {
            name: destination.entry.clone(),
            server_name: sni,
            endpoint: destination.endpoint.as_ref().map(|e| e.as_str().to_owned()),
            upstream: config.name.clone(),
            database: startup.database().to_owned(),
        });
        Ok(Routed {
            destination,
            startup,
        })
    }

    /// The TLS server name the client sent, lowercased (DNS names are
    /// case-insensitive).
    fn server_name(&self) -> Option<String> {
        if let Some(name) = &self.routing_name {
            return Some(name.to_ascii_lowercase());
        }
        match &self.facts.client_tls {
            Some(ClientTransport::Tls(info)) => info.sni.as_ref().map(|s| s.to_ascii_lowercase()),
            _ => None,
        }
    }
}

fn route_refused(e: RouteError) -> Exit {
    Exit::refused(SessionError::Route(e))
}

/// The endpoint named in `options`, validated, and the StartupMessage
/// without it (without `options` at all when nothing else was in it).
fn take_endpoint(
    startup: StartupMessage,
) -> Result<(Option<Endpoint>, StartupMessage), RouteError> {
    let Some(sent) = startup.param("options") else {
        return Ok((None, startup));
    };
    let split = options::take_endpoint(sent)
        .map_err(|(a, b)| RouteError::TwoEndpoints(truncated(&a), truncated(&b)))?;
    let Some(id) = split.endpoint else {
        return Ok((None, startup));
    };
    let endpoint = Endpoint::parse(&id).map_err(|reason| RouteError::BadEndpoint {
        from: "options",
        reason,
    })?;
    let startup = match split.rest.is_empty() {
        true => startup.without_param("options"),
        false => startup.with_param("options", &split.rest),
    };
    Ok((Some(endpoint), startup))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::startup::ProtocolVersion;

    fn startup(options: Option<&str>) -> StartupMessage {
        let mut params = vec![("user".to_owned(), "u".to_owned())];
        if let Some(o) = options {
            params.push(("options".into(), o.into()));
        }
        StartupMessage::new(ProtocolVersion { major: 3, minor: 0 }, params)
    }

    #[test]
    fn the_endpoint_leaves_options_and_options_leave_when_empty() {
        let (e, s) = take_endpoint(startup(Some("endpoint=t1"))).unwrap();
        assert_eq!(e.unwrap().as_str(), "t1");
        assert_eq!(s.param("options"), None);
        assert!(!String::from_utf8_lossy(s.as_bytes()).contains("endpoint"));
        let (e, s) = take_endpoint(startup(Some("endpoint=t1 -c geqo=off"))).unwrap();
        assert_eq!(e.unwrap().as_str(), "t1");
        assert_eq!(s.param("options"), Some("-c geqo=off"));
        let (e, s) = take_endpoint(startup(Some("-c geqo=off"))).unwrap();
        assert_eq!((e, s.param("options")), (None, Some("-c geqo=off")));
        let (e, s) = take_endpoint(startup(None)).unwrap();
        assert_eq!((e, s.param("options")), (None, None));
    }

    #[test]
    fn an_endpoint_that_is_no_dns_label_is_refused_before_any_lookup() {
        for bad in [
            "endpoint=T1",
            "endpoint=a.b",
            "endpoint=",
            "endpoint=a endpoint=b",
        ] {
            assert!(take_endpoint(startup(Some(bad))).is_err(), "{bad:?}");
        }
    }
}
