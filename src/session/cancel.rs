//! The short path of a connection whose first packet is a CancelRequest:
//! honoured only with a key pgbastion issued to a live session (here, or
//! with `[cluster]` on another instance of the fleet), forwarded to that
//! session's server with the real key. Like PostgreSQL, the client is told
//! nothing either way.

use tokio::io::AsyncWriteExt;
use tracing::info;

use super::negotiate::{ClientConn, ERROR_WRITE_TIMEOUT};
use super::Session;
use crate::audit::{CancelOutcome, ClientTransport, Event};
use crate::config::CancelPlaintext;
use crate::protocol::startup::CancelKey;

/// What became of a CancelRequest, for the log and the audit.
struct CancelDelivery {
    target_id: Option<String>,
    /// The instance the session runs on, when it is another one.
    instance: Option<String>,
    outcome: CancelOutcome,
    detail: Option<String>,
}

impl CancelDelivery {
    fn refused(outcome: CancelOutcome) -> Self {
        CancelDelivery {
            target_id: None,
            instance: None,
            outcome,
            detail: None,
        }
    }

    fn sent(
        session_id: String,
        instance: Option<String>,
        sent: Result<(), crate::upstream::UpstreamError>,
    ) -> Self {
        let (outcome, detail) = match (sent, instance.is_some()) {
            (Ok(()), false) => (CancelOutcome::Forwarded, None),
            (Ok(()), true) => (CancelOutcome::ForwardedRemote, None),
            (Err(e), _) => (CancelOutcome::UpstreamFailed, Some(e.to_string())),
        };
        CancelDelivery {
            target_id: Some(session_id),
            instance,
            outcome,
            detail,
        }
    }
}

impl Session {
    /// Handles a CancelRequest: honoured only with a key pgbastion issued to
    /// a live session, forwarded to that session's server with the real key.
    /// Like PostgreSQL, the client is told nothing either way, and its
    /// connection is closed once the request has been dealt with.
    pub(super) async fn cancel(self, mut conn: ClientConn, req: CancelKey) {
        let client_ip = crate::auth::throttle::address_key(
            self.peer.map(|p| p.ip()),
            self.settings.limits.ipv6_prefix,
        );
        let delivery = if !self.shared.cancels.allow(client_ip) {
            CancelDelivery::refused(CancelOutcome::RateLimited)
        } else if self.facts.client_tls == Some(ClientTransport::Plaintext)
            && self.listener.cancel_plaintext == CancelPlaintext::Deny
        {
            CancelDelivery::refused(CancelOutcome::PlaintextRefused)
        } else {
            match self.shared.cancels.lookup(&req) {
                Some(target) => match now_serving(&target) {
                    Some((addr, real)) => {
                        let upstream = target.upstream.clone();
                        let sent = upstream
                            .cancel(
                                addr,
                                &real,
                                self.settings.timeouts.cancel,
                                self.outbound_proxy_header(&upstream, None).as_deref(),
                            )
                            .await;
                        CancelDelivery::sent(target.session_id, None, sent)
                    }
                    None => {
                        let mut d = CancelDelivery::refused(CancelOutcome::NothingRunning);
                        d.target_id = Some(target.session_id);
                        d
                    }
                },
                None => match &self.shared.cluster {
                    None => CancelDelivery::refused(CancelOutcome::Unmatched),
                    Some(fleet) => self.remote_cancel(fleet, &req).await,
                },
            }
        };
        // Only now is the client's connection closed, cleanly (TLS
        // close_notify, then FIN): libpq takes that close as the sign its
        // cancel was delivered, as PostgreSQL closes once it has acted, and
        // over TLS a close without close_notify reads as an error.
        let _ = tokio::time::timeout(ERROR_WRITE_TIMEOUT, conn.io.shutdown()).await;
        drop(conn);
        let CancelDelivery {
            target_id,
            instance,
            outcome,
            detail,
        } = delivery;
        let target_id = target_id.as_deref().unwrap_or("unmatched");
        // A forwarded cancel is always logged and audited; the rest
        // (unknown keys, rate limits) is what a stranger can flood.
        let forwarded = outcome.is_forwarded();
        if forwarded || self.shared.warn_limit.allow(outcome.as_str()) {
            info!(
                target = target_id,
                session_instance = instance.as_deref(),
                outcome = outcome.as_str(),
                "cancel request"
            );
        }
        let event = Event::Cancel {
            facts: &self.facts,
            target_session_id: target_id,
            session_instance: instance.as_deref(),
            outcome,
            detail,
        };
        if forwarded || self.shared.audit_limit.allow(outcome.as_str()) {
            self.shared.record(&event);
        } else {
            self.shared.metrics.observe(&event);
        }
    }

    /// A cancel for a session of another instance of the fleet: looked up
    /// in Redis and forwarded from here, to the server and address the
    /// session uses, with the server's real key.
    async fn remote_cancel(
        &self,
        fleet: &crate::cluster::Cluster,
        req: &CancelKey,
    ) -> CancelDelivery {
        let found = match fleet.find_cancel(req).await {
            Err(crate::cluster::Unavailable) => {
                return CancelDelivery::refused(CancelOutcome::ClusterUnavailable)
            }
            // Our own instance's mapping for a session that has ended (the
            // local registry no longer has it): nothing to cancel.
            Ok(Some(remote)) if remote.instance != fleet.instance() => remote,
            Ok(_) => return CancelDelivery::refused(CancelOutcome::Unmatched),
        };
        let Some(upstream) = self
            .shared
            .upstreams()
            .into_iter()
            .find(|u| u.config.name == found.upstream)
        else {
            return CancelDelivery {
                target_id: Some(found.session_id),
                detail: Some(format!(
                    "upstream {:?} of instance {:?} is not configured here: every instance needs the same upstreams",
                    found.upstream, found.instance
                )),
                instance: Some(found.instance),
                outcome: CancelOutcome::UpstreamFailed,
            };
        };
        let sent = upstream
            .cancel(
                found.addr,
                &found.real_key(),
                self.settings.timeouts.cancel,
                self.outbound_proxy_header(&upstream, None).as_deref(),
            )
            .await;
        CancelDelivery::sent(found.session_id, Some(found.instance), sent)
    }
}

/// Where a matched cancel goes: the session's server, or for a pooled
/// session the connection serving it at this moment (None between its
/// transactions: nothing is cancelled).
fn now_serving(target: &crate::cancel::CancelTarget) -> Option<(std::net::SocketAddr, CancelKey)> {
    use crate::sync::MutexExt;
    match &target.serving {
        None => Some((target.addr, target.real.clone())),
        Some(serving) => serving.locked().clone(),
    }
}
