//! A route: one upstream (the dialer) and how sessions log in to it
//! (passthrough, or scram mode with its verifier sources), and its
//! server connection pools when it has `pool_mode`. Built from one
//! `[[upstream]]` section at start and on every reload; a session keeps
//! the route it was routed to when it was accepted. This is where state
//! that belongs to an upstream and outlives sessions hangs (scram mode's
//! secrets file entries and mock-salt key, the pools).
//!
//! A templated upstream (`{endpoint}` in its address, server_name or
//! database) is a route no session uses as is: `for_endpoint` makes (and
//! keeps) the route of each endpoint, sharing the template's secrets,
//! mock key and pools.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::auth::source::ScramAuth;
use crate::config::UpstreamConfig;
use crate::pool::Pools;
use crate::routing::{Endpoint, RouteError};
use crate::sync::MutexExt;
use crate::upstream::Upstream;

/// Endpoint routes a templated upstream keeps. Past this, routes no
/// session uses are dropped to make room (and when every one is in use, a
/// session gets a route of its own that is not kept).
const MAX_ENDPOINT_ROUTES: usize = 10_000;

/// A template's routes, by endpoint.
type EndpointRoutes = Mutex<HashMap<Endpoint, Arc<Route>>>;

use super::ServerError;

/// How sessions routed here log in to the server.
pub(crate) enum RouteAuth {
    /// The client authenticates to the server end to end.
    Passthrough,
    /// pgbastion terminates SCRAM with verifiers from these sources.
    Scram(Arc<ScramAuth>),
}

pub(crate) struct Route {
    pub upstream: Arc<Upstream>,
    pub auth: RouteAuth,
    /// The upstream's server connection pools (`pool_mode`); None: a
    /// server connection per session. An endpoint's route shares its
    /// template's (its pools are keyed by endpoint too).
    pub pools: Option<Arc<Pools>>,
    /// A templated upstream's routes per endpoint (None: not a template).
    endpoints: Option<Arc<EndpointRoutes>>,
}

impl Route {
    /// Builds the dialer (CA bundle, client certificate) and reads the
    /// scram sources (secrets file, auth password file, mock key): a
    /// mistake in any of them is the error.
    pub fn new(config: &UpstreamConfig) -> Result<Route, ServerError> {
        let upstream = Upstream::new(config.clone()).map_err(|source| ServerError::Upstream {
            name: config.name.clone(),
            source,
        })?;
        let auth = match &config.scram {
            None => RouteAuth::Passthrough,
            Some(scram) => RouteAuth::Scram(Arc::new(ScramAuth::new(scram).map_err(|source| {
                ServerError::Auth {
                    name: config.name.clone(),
                    source,
                }
            })?)),
        };
        let pools = config
            .pool
            .as_ref()
            .map(|pool| Pools::new(&config.name, pool.clone()));
        Ok(Route {
            upstream: Arc::new(upstream),
            auth,
            pools,
            endpoints: config.is_templated().then(Arc::default),
        })
    }

    /// The route a session with `endpoint` uses: this one, or for a
    /// templated upstream the endpoint's own (made on first use). Err: a
    /// template and no endpoint to fill it with (`sent` describes what the
    /// client sent, for the message).
    pub fn for_endpoint(
        self: &Arc<Self>,
        endpoint: Option<&Endpoint>,
        sent: impl FnOnce() -> String,
    ) -> Result<Arc<Route>, RouteError> {
        let Some(made) = &self.endpoints else {
            return Ok(self.clone());
        };
        let Some(endpoint) = endpoint else {
            return Err(RouteError::EndpointRequired {
                upstream: self.name().to_owned(),
                sent: sent(),
            });
        };
        let mut made = made.locked();
        if let Some(route) = made.get(endpoint) {
            return Ok(route.clone());
        }
        let route = Arc::new(self.made_for(endpoint)?);
        if made.len() >= MAX_ENDPOINT_ROUTES {
            made.retain(|_, r| Arc::strong_count(r) > 1);
        }
        if made.len() < MAX_ENDPOINT_ROUTES {
            made.insert(endpoint.clone(), route.clone());
        }
        Ok(route)
    }

    /// The endpoint's route: the template filled in, its dialer's
    /// connector, secrets, mock key and pools shared.
    fn made_for(&self, endpoint: &Endpoint) -> Result<Route, RouteError> {
        let upstream =
            self.upstream
                .for_endpoint(endpoint)
                .map_err(|e| {
                    // The template's host names are the operator's
                    // business, not a stranger's: the log has them.
                    tracing::warn!(upstream = self.name(), %endpoint, "filling the upstream's template failed: {e}");
                    RouteError::BadEndpoint {
                        from: "the TLS server name or options",
                        reason: format!("{:?} does not make a valid server name", endpoint.as_str()),
                    }
                })?;
        Ok(Route {
            upstream: Arc::new(upstream),
            auth: match &self.auth {
                RouteAuth::Passthrough => RouteAuth::Passthrough,
                RouteAuth::Scram(scram) => RouteAuth::Scram(Arc::new(scram.for_endpoint())),
            },
            pools: self.pools.clone(),
            endpoints: None,
        })
    }

    /// Whether this is a template, filled in per endpoint.
    pub fn is_templated(&self) -> bool {
        self.endpoints.is_some()
    }

    /// The upstream's configured name.
    pub fn name(&self) -> &str {
        &self.upstream.config.name
    }

    /// scram mode's verifier sources (None: passthrough).
    pub fn scram(&self) -> Option<&Arc<ScramAuth>> {
        match &self.auth {
            RouteAuth::Passthrough => None,
            RouteAuth::Scram(scram) => Some(scram),
        }
    }

    /// This fresh route, sharing its predecessor's scram state (the
    /// secrets file's entries, the mock-verifier key) when the upstream's
    /// name and scram settings did not change, so a reload does not give
    /// unknown users new mock salts.
    pub fn keeping_state_of(mut self, old: &[Arc<Route>]) -> Route {
        let same = old.iter().find(|o| {
            o.name() == self.name() && o.upstream.config.scram == self.upstream.config.scram
        });
        if let (Some(old), RouteAuth::Scram(_)) = (same, &self.auth) {
            if let RouteAuth::Scram(kept) = &old.auth {
                self.auth = RouteAuth::Scram(kept.clone());
            }
        }
        // The pools (and their open connections) stay when nothing they
        // depend on changed: where they connect, as whom, how many.
        let same_pools = old.iter().find(|o| {
            let (a, b) = (&o.upstream.config, &self.upstream.config);
            o.name() == self.name()
                && a.pool == b.pool
                && a.scram == b.scram
                && (&a.host, a.port, &a.server_name) == (&b.host, b.port, &b.server_name)
                && a.database == b.database
                && a.client_identity == b.client_identity
        });
        if let (Some(old), Some(_)) = (same_pools, &self.pools) {
            if old.pools.is_some() {
                self.pools = old.pools.clone();
            }
        }
        // A template's endpoint routes are made afresh (cheaply, on first
        // use): they hold the connector, which a reload may have re-read.
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// A templated upstream's route (its CA file written to `dir`).
    fn template(dir: &std::path::Path) -> Arc<Route> {
        let ca = crate::dev::certs::Ca::new("route test CA").unwrap();
        let ca_file = ca.write_cert(dir, "ca").unwrap();
        let config = Config::from_toml(&format!(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\nclient_tls = \"allow\"\n\
             [[upstream]]\nname = \"tenants\"\naddress = \"{{endpoint}}.internal:5432\"\n\
             database = \"db_{{endpoint}}\"\nca_file = \"{}\"\n",
            ca_file.display()
        ))
        .unwrap();
        Arc::new(Route::new(&config.upstreams[0]).unwrap())
    }

    fn ep(s: &str) -> Endpoint {
        Endpoint::parse(s).unwrap()
    }

    #[test]
    fn a_template_is_filled_per_endpoint_and_each_route_kept() {
        let dir = tempfile::tempdir().unwrap();
        let t = template(dir.path());
        let err = t.for_endpoint(None, || "what was sent".into()).err();
        assert!(
            matches!(err, Some(RouteError::EndpointRequired { ref sent, .. }) if sent == "what was sent"),
            "{err:?}"
        );
        let t1 = t.for_endpoint(Some(&ep("t1")), String::new).unwrap();
        let c = &t1.upstream.config;
        assert_eq!(
            (
                c.host.as_str(),
                c.server_name.as_str(),
                c.database.as_deref()
            ),
            ("t1.internal", "t1.internal", Some("db_t1"))
        );
        assert_eq!(c.name, "tenants", "metrics and cancels name the template");
        let again = t.for_endpoint(Some(&ep("t1")), String::new).unwrap();
        assert!(Arc::ptr_eq(&t1, &again), "made once, then kept");
        let t2 = t.for_endpoint(Some(&ep("t2")), String::new).unwrap();
        assert_eq!(t2.upstream.config.host, "t2.internal");
        // An endpoint's route is no template: it serves itself.
        let same = t1.for_endpoint(None, String::new).unwrap();
        assert!(Arc::ptr_eq(&t1, &same));
    }

    #[test]
    fn endpoint_routes_are_bounded_and_those_in_use_stay() {
        let dir = tempfile::tempdir().unwrap();
        let t = template(dir.path());
        let held = t.for_endpoint(Some(&ep("held")), String::new).unwrap();
        for i in 0..MAX_ENDPOINT_ROUTES + 10 {
            t.for_endpoint(Some(&ep(&format!("e{i}"))), String::new)
                .unwrap();
        }
        let made = t.endpoints.as_ref().unwrap().locked();
        assert!(made.len() <= MAX_ENDPOINT_ROUTES, "{}", made.len());
        assert!(
            made.get(&ep("held")).is_some_and(|r| Arc::ptr_eq(r, &held)),
            "a route a session holds is never dropped"
        );
    }
}
