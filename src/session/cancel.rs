//! The short path of a connection whose first packet is a CancelRequest:
//! honoured only with a key pgbastion issued to a live session (here, or
//! with `[cluster]` on another instance of the fleet), forwarded to that
//! session's server with the real key. Like PostgreSQL, the client is told
//! nothing either way. A pooled session of another instance is only
//! reachable through that instance: the cancel is relayed to it, and the
//! cancels relayed to this instance are forwarded here
//! (`Shared::serve_relayed_cancels`) as local ones are.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;
use tracing::info;

use super::negotiate::{ClientConn, ERROR_WRITE_TIMEOUT};
use super::Session;
use crate::audit::{CancelOutcome, ClientTransport, Event};
use crate::cancel::CancelTarget;
use crate::cluster::keys::{RelayedCancel, RemoteCancel};
use crate::cluster::{Cluster, Unavailable};
use crate::config::CancelPlaintext;
use crate::protocol::startup::CancelKey;
use crate::routing::Endpoint;
use crate::server::Shared;
use crate::sync::MutexExt;
use crate::upstream::{Upstream, UpstreamError};

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

    /// A matched cancel: `sent` is None when a pooled session held no
    /// server connection (nothing was running).
    fn matched(
        session_id: String,
        instance: Option<String>,
        sent: Option<Result<(), UpstreamError>>,
    ) -> Self {
        let (outcome, detail) = match (sent, instance.is_some()) {
            (None, _) => (CancelOutcome::NothingRunning, None),
            (Some(Ok(())), false) => (CancelOutcome::Forwarded, None),
            (Some(Ok(())), true) => (CancelOutcome::ForwardedRemote, None),
            (Some(Err(e)), _) => (CancelOutcome::UpstreamFailed, Some(e.to_string())),
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
                Some(target) => {
                    let sent = forward(&target, self.settings.timeouts.cancel, |u| {
                        self.outbound_proxy_header(u, None)
                    })
                    .await;
                    CancelDelivery::matched(target.session_id, None, sent)
                }
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
    async fn remote_cancel(&self, fleet: &Cluster, req: &CancelKey) -> CancelDelivery {
        let found = match fleet.find_cancel(req).await {
            Err(Unavailable) => return CancelDelivery::refused(CancelOutcome::ClusterUnavailable),
            // Our own instance's mapping for a session that has ended (the
            // local registry no longer has it): nothing to cancel.
            Ok(Some(remote)) if remote.instance != fleet.instance() => remote,
            Ok(_) => return CancelDelivery::refused(CancelOutcome::Unmatched),
        };
        let upstream = match self.remote_upstream(&found) {
            Ok(upstream) => upstream,
            Err(detail) => {
                return CancelDelivery {
                    target_id: Some(found.session_id),
                    detail: Some(detail),
                    instance: Some(found.instance),
                    outcome: CancelOutcome::UpstreamFailed,
                }
            }
        };
        if found.pooled {
            return self.relay_to_owner(fleet, req, found, &upstream).await;
        }
        let sent = upstream
            .cancel(
                found.addr,
                &found.real_key(),
                self.settings.timeouts.cancel,
                self.outbound_proxy_header(&upstream, None).as_deref(),
            )
            .await;
        CancelDelivery::matched(found.session_id, Some(found.instance), Some(sent))
    }

    /// The upstream another instance's session uses, by name (every
    /// instance has the same upstreams) and, for a templated one, filled
    /// in for the session's endpoint. Err: why it cannot be found here.
    fn remote_upstream(&self, found: &RemoteCancel) -> Result<Arc<Upstream>, String> {
        let route = self
            .shared
            .routes()
            .into_iter()
            .find(|r| r.name() == found.upstream)
            .ok_or_else(|| {
                format!(
                    "upstream {:?} of instance {:?} is not configured here: every instance needs the same upstreams",
                    found.upstream, found.instance
                )
            })?;
        let endpoint = match &found.endpoint {
            Some(e) => Some(Endpoint::parse(e)?),
            None => None,
        };
        let route = route
            .for_endpoint(endpoint.as_ref(), || "a cancel request".to_owned())
            .map_err(|e| e.to_string())?;
        Ok(route.upstream.clone())
    }

    /// A cancel for a pooled session of another instance: only that
    /// instance knows which server connection serves the session now, so
    /// the cancel is relayed to it (with the PROXY header this instance
    /// would have sent, since only it knows the client's address).
    async fn relay_to_owner(
        &self,
        fleet: &Cluster,
        req: &CancelKey,
        found: RemoteCancel,
        upstream: &Upstream,
    ) -> CancelDelivery {
        let header = self.outbound_proxy_header(upstream, None);
        let relayed = fleet
            .relay_cancel(&found.instance, req, &self.facts.session_id, header)
            .await;
        let (outcome, detail) = match relayed {
            Ok(n) if n > 0 => (CancelOutcome::RelayedToInstance, None),
            Ok(_) => (
                CancelOutcome::ClusterUnavailable,
                Some("the instance is not subscribed to relayed cancels (starting, or its Redis subscription broke)".to_owned()),
            ),
            Err(Unavailable) => (CancelOutcome::ClusterUnavailable, None),
        };
        CancelDelivery {
            target_id: Some(found.session_id),
            instance: Some(found.instance),
            outcome,
            detail,
        }
    }
}

impl Shared {
    /// With `[cluster]`: forwards the cancels other instances relay to this
    /// one's pooled sessions, until the returned task is aborted.
    pub(crate) fn serve_relayed_cancels(self: &Arc<Self>) -> Option<JoinHandle<()>> {
        let mut relayed = self.cluster.as_ref()?.relayed_cancels();
        let shared = Arc::downgrade(self);
        Some(tokio::spawn(async move {
            while let Some(r) = relayed.recv().await {
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                // One at a time would let one unreachable server hold up
                // the rest.
                tokio::spawn(forward_relayed(shared, r));
            }
        }))
    }
}

/// A relayed cancel, forwarded once, exactly as a local cancel would be:
/// the sending instance already applied its rate limit and audits it.
async fn forward_relayed(shared: Arc<Shared>, relayed: RelayedCancel) {
    let delivery = match shared.cancels.lookup(&relayed.key()) {
        None => CancelDelivery::refused(CancelOutcome::Unmatched),
        Some(target) => {
            let header = relayed.proxy_header.clone();
            let limit = shared.settings().timeouts.cancel;
            let sent = forward(&target, limit, |_| header).await;
            CancelDelivery::matched(target.session_id, None, sent)
        }
    };
    let outcome = delivery.outcome;
    if outcome.is_forwarded() || shared.warn_limit.allow("relayed_cancel") {
        info!(
            target = delivery.target_id.as_deref().unwrap_or("unmatched"),
            from_instance = relayed.from,
            request_session = relayed.request_session,
            outcome = outcome.as_str(),
            detail = delivery.detail,
            "relayed cancel request"
        );
    }
}

/// Sends a matched cancel where it must go now, with the server's real key
/// (and the PROXY header `proxy_header` makes for the upstream). None when
/// a pooled session holds no server connection: nothing is cancelled.
async fn forward(
    target: &CancelTarget,
    limit: Duration,
    proxy_header: impl FnOnce(&Upstream) -> Option<Vec<u8>>,
) -> Option<Result<(), UpstreamError>> {
    let (addr, real) = now_serving(target)?;
    let header = proxy_header(&target.upstream);
    Some(
        target
            .upstream
            .cancel(addr, &real, limit, header.as_deref())
            .await,
    )
}

/// Where a matched cancel goes: the session's server, or for a pooled
/// session the connection serving it at this moment (None between its
/// transactions: nothing is cancelled).
fn now_serving(target: &CancelTarget) -> Option<(SocketAddr, CancelKey)> {
    match &target.serving {
        None => Some((target.addr, target.real.clone())),
        Some(serving) => serving.locked().clone(),
    }
}
