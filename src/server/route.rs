//! A route: one upstream (the dialer) and how sessions log in to it
//! (passthrough, or scram mode with its verifier sources), and its
//! server connection pools when it has `pool_mode`. Built from one
//! `[[upstream]]` section at start and on every reload; a session keeps
//! the route its listener named when it was accepted. This is where state
//! that belongs to an upstream and outlives sessions hangs (scram mode's
//! secrets file entries and mock-salt key today; a pool next).

use std::sync::Arc;

use crate::auth::source::ScramAuth;
use crate::config::UpstreamConfig;
use crate::pool::Pools;
use crate::upstream::Upstream;

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
    /// server connection per session.
    pub pools: Option<Arc<Pools>>,
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
        })
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
                && a.client_identity == b.client_identity
        });
        if let (Some(old), Some(_)) = (same_pools, &self.pools) {
            if old.pools.is_some() {
                self.pools = old.pools.clone();
            }
        }
        self
    }
}
