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
        let (route, entry) = match routed.route {
            Some(i) => {
                let spec = &self.table.routes()[i];
                (&self.routes[spec.upstream], Some(spec.name.clone()))
            }
            None => match fallback {
                Some(route) => (route, None),
                None => {
                    return Err(RouteError::NoRoute {
                        sent: query.described(),
                        listener: query.listener.to_owned(),
                    })
                }
            },
        };
        let route = route.for_endpoint(routed.endpoint.as_ref(), || query.described())?;
        Ok(Destination {
            route,
            entry,
            endpoint: routed.endpoint,
        })
    }
}
