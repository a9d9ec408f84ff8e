//! The route table: `[[route]]` entries in file order, first match wins,
//! looked up by hash instead of a scan so ten thousand routes cost what
//! one does. Each route is filed under the one key it cannot match
//! without (its exact server name, its wildcard's suffix, its endpoint,
//! its database, or none); a lookup gathers the few routes filed under
//! the keys the connection has and checks them in file order.

use std::collections::HashMap;

use super::name::{split_first_label, Endpoint, ServerNameMatch};
use super::{Query, RouteError, Routed};

/// One `[[route]]`, validated: every condition set must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub name: String,
    /// Only for sessions on these listeners (None: every listener).
    pub listeners: Option<Vec<String>>,
    pub server_name: Option<ServerNameMatch>,
    pub endpoint: Option<Endpoint>,
    /// The database the client asked for.
    pub database: Option<String>,
    /// Index into the configuration's upstreams.
    pub upstream: usize,
}

/// The key a route is filed under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Exact(String),
    Suffix(String),
    Endpoint(Endpoint),
    Database(String),
    Any,
}

impl RouteSpec {
    fn key(&self) -> Key {
        match (&self.server_name, &self.endpoint, &self.database) {
            (Some(ServerNameMatch::Exact(n)), _, _) => Key::Exact(n.clone()),
            (Some(ServerNameMatch::Wildcard(s)), _, _) => Key::Suffix(s.clone()),
            (None, Some(e), _) => Key::Endpoint(e.clone()),
            (None, None, Some(d)) => Key::Database(d.clone()),
            (None, None, None) => Key::Any,
        }
    }
}

/// The routes and their index.
#[derive(Debug, Default)]
pub struct Table {
    routes: Vec<RouteSpec>,
    /// Route numbers (ascending) per key.
    index: HashMap<Key, Vec<usize>>,
    /// Every wildcard route, ascending: the routes a connection that
    /// names its endpoint only in `options` may match.
    wildcards: Vec<usize>,
}

/// What a connection brings to the lookup, resolved: its endpoint and
/// where that came from.
struct Facts<'q> {
    query: &'q Query<'q>,
    /// The suffix the server name's endpoint label was found under.
    sni_suffix: Option<&'q str>,
    endpoint: Option<Endpoint>,
}

impl Table {
    pub fn new(routes: Vec<RouteSpec>) -> Table {
        let mut index: HashMap<Key, Vec<usize>> = HashMap::new();
        let mut wildcards = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            let key = r.key();
            if matches!(key, Key::Suffix(_)) {
                wildcards.push(i);
            }
            index.entry(key).or_default().push(i);
        }
        Table {
            routes,
            index,
            wildcards,
        }
    }

    pub fn routes(&self) -> &[RouteSpec] {
        &self.routes
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The first route the connection matches (None in `Routed::route`:
    /// no route did, and the listener's own upstream applies), with the
    /// session's endpoint.
    pub fn lookup(&self, query: &Query<'_>) -> Result<Routed, RouteError> {
        // Without routes (most configurations) no key is built: the
        // endpoint can only be the one `options` named.
        if self.routes.is_empty() {
            return Ok(Routed {
                route: None,
                endpoint: query.options_endpoint.cloned(),
            });
        }
        let facts = self.facts(query)?;
        let mut candidates: Vec<usize> = Vec::new();
        let mut add = |key: Key| {
            if let Some(list) = self.index.get(&key) {
                candidates.extend(list);
            }
        };
        if let Some(sni) = query.sni {
            add(Key::Exact(sni.to_owned()));
        }
        if let Some(suffix) = facts.sni_suffix {
            add(Key::Suffix(suffix.to_owned()));
        }
        if let Some(e) = &facts.endpoint {
            add(Key::Endpoint(e.clone()));
        }
        add(Key::Database(query.database.to_owned()));
        add(Key::Any);
        if facts.sni_suffix.is_none() && query.options_endpoint.is_some() {
            candidates.extend(&self.wildcards);
        }
        candidates.sort_unstable();
        let route = candidates
            .into_iter()
            .find(|&i| self.matches(&self.routes[i], &facts));
        Ok(Routed {
            route,
            endpoint: facts.endpoint,
        })
    }

    /// The endpoint, from the server name (its first label, when the rest
    /// is a routed wildcard's suffix) or from `options`; both must agree.
    fn facts<'q>(&self, query: &'q Query<'q>) -> Result<Facts<'q>, RouteError> {
        let under = query
            .sni
            .and_then(split_first_label)
            .filter(|(_, suffix)| self.index.contains_key(&Key::Suffix((*suffix).to_owned())));
        let from_sni = match under {
            Some((label, _)) => {
                Some(
                    Endpoint::parse(label).map_err(|reason| RouteError::BadEndpoint {
                        from: "the TLS server name",
                        reason,
                    })?,
                )
            }
            None => None,
        };
        let endpoint = match (from_sni, query.options_endpoint) {
            (Some(a), Some(b)) if &a != b => {
                return Err(RouteError::EndpointConflict {
                    server_name: query.sni.unwrap_or_default().to_owned(),
                    from_sni: a,
                    from_options: b.clone(),
                })
            }
            (Some(a), _) => Some(a),
            (None, b) => b.cloned(),
        };
        Ok(Facts {
            query,
            sni_suffix: under.map(|(_, suffix)| suffix),
            endpoint,
        })
    }

    fn matches(&self, r: &RouteSpec, f: &Facts<'_>) -> bool {
        let q = f.query;
        r.listeners
            .as_ref()
            .is_none_or(|ls| ls.iter().any(|l| l == q.listener))
            && match &r.server_name {
                None => true,
                Some(ServerNameMatch::Exact(n)) => q.sni == Some(n.as_str()),
                // Under this suffix by name, or (no name under any routed
                // suffix) by the endpoint the client put in `options`.
                Some(ServerNameMatch::Wildcard(s)) => match f.sni_suffix {
                    Some(under) => under == s,
                    None => q.options_endpoint.is_some(),
                },
            }
            && r.endpoint
                .as_ref()
                .is_none_or(|e| f.endpoint.as_ref() == Some(e))
            && r.database.as_ref().is_none_or(|d| d == q.database)
    }

    /// The first route no connection can reach, because an earlier one
    /// takes every connection it would match: (that route, the earlier
    /// one). Checked against the earlier routes filed under the keys the
    /// route implies, so ten thousand routes check in linear time.
    pub fn unreachable(&self) -> Option<(usize, usize)> {
        for (b, route) in self.routes.iter().enumerate() {
            let endpoint = self.endpoint_of(route);
            let mut keys = vec![Key::Any];
            match &route.server_name {
                Some(ServerNameMatch::Exact(n)) => {
                    keys.push(Key::Exact(n.clone()));
                    if let Some((_, suffix)) = split_first_label(n) {
                        keys.push(Key::Suffix(suffix.to_owned()));
                    }
                }
                Some(ServerNameMatch::Wildcard(s)) => keys.push(Key::Suffix(s.clone())),
                None => {}
            }
            keys.extend(endpoint.clone().map(Key::Endpoint));
            keys.extend(route.database.clone().map(Key::Database));
            let earlier = keys
                .iter()
                .filter_map(|k| self.index.get(k))
                .flat_map(|list| list.iter().copied().take_while(|&a| a < b))
                .filter(|&a| covers(&self.routes[a], route, endpoint.as_ref()))
                .min();
            if let Some(a) = earlier {
                return Some((b, a));
            }
        }
        None
    }

    /// The endpoint every connection a route matches has: its own
    /// `endpoint`, or the first label of an exact name under a routed
    /// wildcard (a connection with that name always carries it).
    fn endpoint_of(&self, route: &RouteSpec) -> Option<Endpoint> {
        if route.endpoint.is_some() {
            return route.endpoint.clone();
        }
        let Some(ServerNameMatch::Exact(n)) = &route.server_name else {
            return None;
        };
        let (label, suffix) = split_first_label(n)?;
        if !self.index.contains_key(&Key::Suffix(suffix.to_owned())) {
            return None;
        }
        Endpoint::parse(label).ok()
    }
}

/// Whether every connection `b` (whose connections all have
/// `b_endpoint`, when known) matches is one `a` matches too. Best effort:
/// a route hidden only by several earlier ones together is not found.
fn covers(a: &RouteSpec, b: &RouteSpec, b_endpoint: Option<&Endpoint>) -> bool {
    let listeners = match (&a.listeners, &b.listeners) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(la), Some(lb)) => lb.iter().all(|l| la.contains(l)),
    };
    let server_name = match (&a.server_name, &b.server_name) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(sa), Some(ServerNameMatch::Exact(n))) => sa.covers(n),
        (Some(sa), Some(sb)) => sa == sb,
    };
    listeners
        && server_name
        && (a.endpoint.is_none() || a.endpoint.as_ref() == b_endpoint)
        && (a.database.is_none() || a.database == b.database)
}

#[cfg(test)]
mod tests;
