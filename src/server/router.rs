//! Where a session goes: the `[[route]]` table (`crate::routing`) joined
//! to the routes it leads to, and the listener's own upstream when no
//! entry matches. Built once per configuration and shared by its
//! listeners, so a reload's sessions use the new table and open sessions
//! keep the one they were routed with.

use std::sync::Arc;

use super::route::Route;
use crate::routing::{Endpoint, Query, RouteError, Table};

/// The table and, per upstream (by index), its route.
pub(crate) struct Router {
    table: Arc<Table>,
    routes: Vec<Arc<Route>>,
}

/// Where routing sent a session.
pub(crate) struct Destination {
    /// The route to use: for a templated upstream, the endpoint's own.
    pub route: Arc<Route>,
    /// The `[[route]]` that matched (None: the listener's upstream).
    pub entry: Option<String>,
    /// The session's endpoint, when it chose where the session went (see
    /// `route`); None otherwise, whatever the client sent.
    pub endpoint: Option<Endpoint>,
}

impl Router {
    pub fn new(table: Arc<Table>, routes: Vec<Arc<Route>>) -> Router {
        Router { table, routes }
    }

    /// The first matching `[[route]]`, else `fallback` (the listener's
    /// upstream), resolved for the session's endpoint.
    pub fn route(
        &self,
        query: &Query<'_>,
        fallback: Option<&Arc<Route>>,
    ) -> Result<Destination, RouteError> {
        let routed = self.table.lookup(query)?;
        let (route, entry, by_endpoint) = match routed.route {
            Some(i) => {
                let spec = &self.table.routes()[i];
                let route = &self.routes[spec.upstream];
                (route, Some(spec.name.clone()), spec.endpoint.is_some())
            }
            None => match fallback {
                Some(route) => (route, None, false),
                None => {
                    return Err(RouteError::NoRoute {
                        sent: query.described(),
                        listener: query.listener.to_owned(),
                    })
                }
            },
        };
        // The endpoint is the session's only where it chose the server (a
        // template filled with it, or a route picked by it): elsewhere a
        // client could name any endpoint in `options` and have rules with
        // `endpoints = [...]` judge a destination it does not lead to.
        let endpoint = routed
            .endpoint
            .filter(|_| by_endpoint || route.is_templated());
        let route = route.for_endpoint(endpoint.as_ref(), || query.described())?;
        Ok(Destination {
            route,
            entry,
            endpoint,
        })
    }
}
