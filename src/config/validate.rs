//! `RawConfig::validate`: the order in which the sections are converted
//! and checked against each other. Each section's own conversion and
//! checks live in its module; this file only wires them: upstreams first
//! (listeners and credentials name them), then listeners, `[tls]`,
//! limits, timeouts, audit, identities, rules, credentials, the policy,
//! `[forward]` and `[cluster]`.

use std::collections::HashSet;

use super::error::ConfigError;
use super::raw::RawConfig;
use super::{credentials, listeners, routes, rules, Config, UpstreamConfig};

impl RawConfig {
    pub(super) fn validate(self) -> Result<Config, ConfigError> {
        let mut upstreams = self
            .upstreams
            .into_iter()
            .enumerate()
            .map(|(i, u)| u.validate(i))
            .collect::<Result<Vec<UpstreamConfig>, _>>()?;
        if upstreams.is_empty() {
            return Err(ConfigError::Missing {
                section: "upstream",
            });
        }
        check_unique(upstreams.iter().map(|u| u.name.as_str()), "upstream")?;
        if self.listeners.is_empty() {
            return Err(ConfigError::Missing {
                section: "listener",
            });
        }
        let listeners = self
            .listeners
            .into_iter()
            .enumerate()
            .map(|(i, l)| l.validate(i, &upstreams, !self.routes.is_empty()))
            .collect::<Result<Vec<_>, _>>()?;
        check_unique(listeners.iter().map(|l| l.name.as_str()), "listener")?;
        let routes = self
            .routes
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.validate(i, &upstreams))
            .collect::<Result<Vec<_>, _>>()?;
        check_unique(routes.iter().map(|r| r.name.as_str()), "route")?;
        let routes = routes::table(routes, &listeners)?;
        let tls = self.tls.map(|t| t.into_config()).transpose()?;
        listeners::check_client_tls(&listeners, tls.as_ref())?;
        self.limits.check()?;
        if let Some(admin) = &self.admin {
            admin.check()?;
        }
        self.timeouts.check()?;
        let audit = self.audit.validate()?;
        listeners::check_identities(&listeners, tls.as_ref())?;
        let tailscale = self.tailscale.map(|t| t.into_config());
        rules::check_references(&self.rules, &listeners, &upstreams, tailscale.as_ref())?;
        let credentials = credentials::validate(self.credentials, &upstreams)?;
        rules::check_trusting(&self.rules, &listeners, &credentials)?;
        let policy = rules::policy(self.rules)?;
        let forward = self.forward.validate()?;
        let cluster = self.cluster.map(|c| c.validate()).transpose()?;
        let mock_key = self.auth.mock_key(cluster.as_ref());
        for scram in upstreams.iter_mut().filter_map(|u| u.scram.as_mut()) {
            scram.mock_key = mock_key.clone();
        }
        Ok(Config {
            tls,
            listeners,
            upstreams,
            routes: std::sync::Arc::new(routes),
            limits: self.limits,
            timeouts: self.timeouts,
            audit,
            policy,
            tailscale,
            application_name: forward.application_name,
            forward_settings: forward.settings,
            credentials,
            admin: self.admin,
            reload: self.reload,
            cluster,
        })
    }
}

/// Names of entries of one array of tables (`what`) are unique.
fn check_unique<'a>(
    names: impl Iterator<Item = &'a str>,
    what: &'static str,
) -> Result<(), ConfigError> {
    let mut seen = HashSet::new();
    for n in names {
        if !seen.insert(n) {
            return Err(ConfigError::DuplicateName {
                section: what,
                name: n.to_owned(),
            });
        }
    }
    Ok(())
}
