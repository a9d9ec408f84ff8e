//! The console's view of the server: `ConsoleBackend` implemented over
//! the shared state, with `RELOAD` going through the same path as SIGHUP.
//! Its own file so that the state below it imports neither the console's
//! reload path nor anything above.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::reload::ReloadHandle;
use super::state::Shared;
use crate::admin::console::{
    ClusterState, ConsoleBackend, Link, ListenerRow, PoolRow, UpstreamRow,
};
use crate::pool::Pools;

/// The named upstreams' pools.
fn named(shared: &Shared, names: &[String]) -> Vec<Arc<Pools>> {
    shared
        .pooled()
        .into_iter()
        .filter(|p| names.contains(&p.name))
        .collect()
}

/// One upstream's pools as SHOW POOLS reads them.
fn pool_rows(pools: &Pools) -> Vec<PoolRow> {
    let paused = pools.is_paused();
    pools
        .all()
        .iter()
        .map(|pool| {
            let st = &pool.stats;
            PoolRow {
                // A templated upstream's pools are per endpoint.
                upstream: match &pool.key.endpoint {
                    Some(e) => format!("{}:{e}", pools.name),
                    None => pools.name.clone(),
                },
                database: pool.key.database.clone(),
                user: pool.key.user.clone(),
                mode: pool.config.mode,
                size: pool.config.size,
                paused,
                clients: st.clients.load(Relaxed),
                clients_active: st.active.load(Relaxed),
                clients_waiting: st.waiting.load(Relaxed),
                servers_open: pool.open(),
                servers_idle: pool.idle_count(),
                max_wait: pool.max_wait(),
            }
        })
        .collect()
}

/// The console reads the shared state and reloads through it.
impl ConsoleBackend for Arc<Shared> {
    fn sessions(&self) -> Vec<crate::admin::live::SessionInfo> {
        self.live.list()
    }

    fn upstreams(&self) -> Vec<UpstreamRow> {
        Shared::upstreams(self)
            .iter()
            .map(|u| UpstreamRow {
                name: u.config.name.clone(),
                address: u.target(),
                server_name: u.config.server_name.clone(),
                auth: u.config.auth_mode(),
            })
            .collect()
    }

    fn listeners(&self) -> Vec<ListenerRow> {
        Shared::listeners(self)
            .iter()
            .map(|l| ListenerRow {
                name: l.name.clone(),
                identity: l.identity.clone(),
                client_tls: l.client_tls,
                upstream: match &l.route {
                    Some(route) => route.name().to_owned(),
                    None => "(routes only)".to_owned(),
                },
            })
            .collect()
    }

    fn audit_counts(&self) -> (u64, u64) {
        self.audit.counts()
    }

    fn cluster(&self) -> ClusterState {
        let Some(fleet) = &self.cluster else {
            return ClusterState::Off;
        };
        let (cancel_mappings, identity_slots) = fleet.held_counts();
        ClusterState::On {
            link: if fleet.is_up() { Link::Up } else { Link::Down },
            instance: fleet.instance().to_owned(),
            cancel_mappings,
            identity_slots,
        }
    }

    fn certificate_expiries(&self) -> Vec<(String, i64)> {
        self.metrics.certificate_expiries()
    }

    fn kill(&self, id: &str) -> bool {
        self.live.kill(id)
    }

    fn reload(&self) -> Result<String, String> {
        // The accept loops and pools a reload starts belong to the
        // process, not to the core of the console session that asked.
        self.process
            .enter(|| ReloadHandle::from_shared(self).reload_all())
    }

    fn pooled_upstreams(&self) -> Vec<String> {
        self.pooled().iter().map(|p| p.name.clone()).collect()
    }

    fn pools(&self) -> Vec<PoolRow> {
        self.pooled().iter().flat_map(|p| pool_rows(p)).collect()
    }

    fn pause(&self, upstreams: &[String]) {
        named(self, upstreams).iter().for_each(|p| p.pause());
    }

    fn resume(&self, upstreams: &[String]) {
        named(self, upstreams).iter().for_each(|p| p.resume());
    }

    fn reconnect(&self, upstreams: &[String]) {
        named(self, upstreams).iter().for_each(|p| p.reconnect());
    }

    fn servers(&self) -> Vec<crate::pool::registry::ServerRow> {
        crate::pool::registry::global().list()
    }

    fn server_connections(&self, upstreams: &[String]) -> usize {
        named(self, upstreams)
            .iter()
            .map(|p| p.open_connections())
            .sum()
    }

    fn audit(&self, event: &crate::audit::Event<'_>) {
        self.audit.emit(event);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use super::*;
    use crate::admin::metrics::PoolSample;
    use crate::config::PoolConfig;
    use crate::pool::PoolKey;

    fn key(database: &str, user: &str) -> PoolKey {
        PoolKey {
            endpoint: None,
            database: database.into(),
            user: user.into(),
        }
    }

    /// The counters of every pool of an upstream, as rows and summed.
    #[test]
    fn the_pools_as_rows_and_as_a_sample() {
        let pools = Pools::new("pg", PoolConfig::default());
        let b = pools.pool(key("db", "b"));
        let a = pools.pool(key("db", "a"));
        for (pool, n) in [(&a, 1), (&b, 10)] {
            let st = &pool.stats;
            st.clients.store(4 * n, Relaxed);
            st.active.store(2 * n, Relaxed);
            st.waiting.store(n, Relaxed);
            st.open.store(3 * n, Relaxed);
            st.checkouts.store(5 * n as u64, Relaxed);
            st.resets.store(n as u64, Relaxed);
            st.opened.store(7 * n as u64, Relaxed);
            st.closed.store(4 * n as u64, Relaxed);
        }
        pools.pause();
        let rows = pool_rows(&pools);
        assert_eq!(
            rows.iter().map(|r| r.user.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let r = &rows[1];
        assert_eq!(
            (
                r.upstream.as_str(),
                r.database.as_str(),
                r.mode,
                r.size,
                r.paused
            ),
            ("pg", "db", crate::config::PoolMode::Transaction, 20, true)
        );
        assert_eq!(
            (
                r.clients,
                r.clients_active,
                r.clients_waiting,
                r.servers_open,
                r.servers_idle
            ),
            (40, 20, 10, 30, 0)
        );
        assert_eq!(
            super::super::state::pool_sample(&pools),
            PoolSample {
                upstream: "pg".into(),
                servers_active: 33,
                servers_idle: 0,
                clients_active: 22,
                clients_waiting: 11,
                checkouts: 55,
                resets: 11,
                opened: 77,
                closed: 44,
            }
        );
        pools.resume();
        assert!(!pool_rows(&pools)[0].paused);
    }

    /// A templated upstream's pools are per endpoint: SHOW POOLS names the
    /// endpoint, the metrics sample stays under the upstream's name.
    #[test]
    fn a_templates_pools_show_their_endpoint_and_count_under_its_name() {
        let pools = Pools::new("tenants", PoolConfig::default());
        for (e, n) in [("t1", 1), ("t2", 2)] {
            let pool = pools.pool(PoolKey {
                endpoint: Some(crate::routing::Endpoint::parse(e).unwrap()),
                ..key(e, "app")
            });
            pool.stats.active.store(n, Relaxed);
        }
        let rows = pool_rows(&pools);
        assert_eq!(
            rows.iter().map(|r| r.upstream.as_str()).collect::<Vec<_>>(),
            ["tenants:t1", "tenants:t2"]
        );
        let sample = super::super::state::pool_sample(&pools);
        assert_eq!(
            (sample.upstream.as_str(), sample.clients_active),
            ("tenants", 3)
        );
    }
}
