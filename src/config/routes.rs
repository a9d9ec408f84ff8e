//! `[[route]]`: which upstream a connection goes to, by the TLS server
//! name it sent, the endpoint in its `options`, or the database it asked
//! for (`crate::routing` holds the types and the matching). Owns the
//! conversion from `RawRoute` and the checks against the rest of the
//! configuration: upstreams and listeners that exist, routes no
//! connection could reach, listeners that could route nowhere.

use super::error::{ConfigError, Section};
use super::raw::RawRoute;
use super::{ListenerConfig, UpstreamConfig};
use crate::routing::{Endpoint, RouteSpec, ServerNameMatch, Table};

impl RawRoute {
    /// The route at `index` (0-based; unnamed routes are `route<index>`).
    pub(super) fn validate(
        self,
        index: usize,
        upstreams: &[UpstreamConfig],
    ) -> Result<RouteSpec, ConfigError> {
        let name = self.name.unwrap_or_else(|| format!("route{index}"));
        let at = Section::Route(name.clone());
        let upstream = upstreams
            .iter()
            .position(|u| u.name == self.upstream)
            .ok_or_else(|| {
                at.key("upstream").invalid(format!(
                    "no upstream named {:?} (upstreams: {})",
                    self.upstream,
                    names(upstreams.iter().map(|u| u.name.as_str()))
                ))
            })?;
        let server_name = self
            .server_name
            .map(|s| ServerNameMatch::parse(&s).map_err(|e| at.key("server_name").invalid(e)))
            .transpose()?;
        let endpoint = self
            .endpoint
            .map(|e| Endpoint::parse(&e).map_err(|e| at.key("endpoint").invalid(e)))
            .transpose()?;
        if self.database.as_deref() == Some("") {
            return Err(at.key("database").invalid("must not be empty"));
        }
        if self.listeners.as_ref().is_some_and(Vec::is_empty) {
            return Err(at.key("listeners").invalid(
                "is empty, so the route applies nowhere; leave it out for every listener",
            ));
        }
        Ok(RouteSpec {
            name,
            listeners: self.listeners,
            server_name,
            endpoint,
            database: self.database,
            upstream,
        })
    }
}

/// The routes as a table, after the checks that need all of them and the
/// listeners: every listener a route names exists, no route is hidden by
/// an earlier one, and every listener has somewhere to send a client
/// (its own upstream, or a route that applies to it).
pub(super) fn table(
    routes: Vec<RouteSpec>,
    listeners: &[ListenerConfig],
) -> Result<Table, ConfigError> {
    for r in &routes {
        for l in r.listeners.iter().flatten() {
            if !listeners.iter().any(|x| &x.name == l) {
                return Err(Section::Route(r.name.clone())
                    .key("listeners")
                    .invalid(format!(
                        "no listener named {l:?} (listeners: {})",
                        names(listeners.iter().map(|l| l.name.as_str()))
                    )));
            }
        }
    }
    let table = Table::new(routes);
    if let Some((hidden, by)) = table.unreachable() {
        let (hidden, by) = (&table.routes()[hidden], &table.routes()[by]);
        return Err(Section::Route(hidden.name.clone()).whole().invalid(format!(
            "no connection can reach this route: route {:?} comes first in the file and \
             matches every connection this one does; move this route above it",
            by.name
        )));
    }
    for l in listeners.iter().filter(|l| l.upstream.is_none()) {
        let applies = table
            .routes()
            .iter()
            .any(|r| r.listeners.as_ref().is_none_or(|ls| ls.contains(&l.name)));
        if !applies {
            return Err(Section::Listener(l.name.clone()).key("upstream").invalid(
                "no route applies to this listener and it has no upstream of its own: \
                 set upstream = \"NAME\", or add it to a route's listeners",
            ));
        }
    }
    Ok(table)
}

fn names<'a>(all: impl Iterator<Item = &'a str>) -> String {
    all.map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests;
