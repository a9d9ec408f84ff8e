//! The console's view of the server: `ConsoleBackend` implemented over
//! the shared state, with `RELOAD` going through the same path as SIGHUP.
//! Its own file so that the state below it imports neither the console's
//! reload path nor anything above.

use std::sync::Arc;

use super::reload::ReloadHandle;
use super::state::Shared;
use crate::admin::console::{ClusterState, ConsoleBackend, Link, ListenerRow, UpstreamRow};

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
                upstream: l.route.name().to_owned(),
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
        ReloadHandle::from_shared(self).reload_all()
    }

    fn audit(&self, event: &crate::audit::Event<'_>) {
        self.audit.emit(event);
    }
}
