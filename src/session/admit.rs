//! Stage 2, admission: who the client is (by the listener's identity
//! source), where it is routed (`route`), whether the policy lets it go
//! there, the admin console branch, and the place under its rule's
//! `max_sessions`. Decided before any upstream is used. Also the
//! StartupMessage as the server will see it.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::error::LimitScope;
use super::negotiate::{ClientConn, ERROR_WRITE_TIMEOUT};
use super::{unless_shutdown, Exit, Session, SessionError};
use crate::admin::console;
use crate::audit::Event;
use crate::config::ListenerIdentity;
use crate::identity::{cert, Identity, IdentityError, IdentitySource};
use crate::limits::pending::PendingPermit;
use crate::policy::{AuditQueries, Decision, Login, Request};
use crate::protocol::startup::StartupMessage;
use crate::relay;
use crate::server::route::Route;
use crate::server::router::Destination;

/// What admission decided.
pub(super) enum Admission {
    /// The client asked for the admin console (database `pgbastion`).
    Console {
        /// The deciding rule marks administrators.
        admin: bool,
        identity: String,
    },
    Session(Admitted),
}

/// A session the policy admits, with what its rule says.
pub(super) struct Admitted {
    /// The StartupMessage as it goes upstream (`forwarded_startup`).
    pub startup: StartupMessage,
    pub route: Arc<Route>,
    pub login: Login,
    pub audit_queries: AuditQueries,
    /// The place under the rule's `max_sessions`, held for the session.
    _identity_slot: Option<IdentitySlot>,
}

/// A session's place under its rule's `max_sessions`, given back when
/// dropped.
struct IdentitySlot {
    _local: crate::limits::keyed_slots::KeyedPermit<String>,
    _fleet: Option<crate::cluster::FleetSlot>,
}

impl Session {
    /// Stage 2: identity, routing and policy, then the console branch and
    /// the rule's per-identity limit.
    pub(super) async fn admit(
        &mut self,
        peer_cert: Option<&[u8]>,
        startup: StartupMessage,
    ) -> Result<Admission, Exit> {
        if !self.shared.audit.accepting() {
            return Err(Exit::refused(SessionError::AuditUnavailable));
        }
        let identity = self.identify(peer_cert).await.map_err(Exit::refused)?;
        let requested = startup.database().to_owned();
        // The console is pgbastion's own: it is routed nowhere.
        let (startup, destination) = if requested == console::DATABASE {
            (startup, None)
        } else {
            let routed = self.route(startup)?;
            (routed.startup, Some(routed.destination))
        };
        let decision = self.decide(&identity, &requested, &startup, destination.as_ref());
        self.facts.rule = decision.rule.clone();
        let identity_text = identity.to_string();
        self.facts.identity = Some(identity);
        if !decision.allowed {
            return Err(Exit::refused(SessionError::PolicyDenied {
                identity: identity_text,
                database: requested,
                user: startup.user().to_owned(),
                rule: decision
                    .rule
                    .map_or_else(|| "no rule matched".to_owned(), |r| format!("rule \"{r}\"")),
            }));
        }
        let Some(destination) = destination else {
            return Ok(Admission::Console {
                admin: decision.admin,
                identity: identity_text,
            });
        };
        let startup = self.forwarded_startup(startup);
        let identity_slot = match decision.max_sessions {
            None => None,
            Some(limit) => match self.identity_slot(&identity_text, limit).await {
                Ok(slot) => Some(slot),
                Err(scope) => {
                    return Err(Exit::refused(SessionError::IdentityLimit {
                        identity: identity_text,
                        limit,
                        rule: decision.rule.clone().unwrap_or_default(),
                        scope,
                    }))
                }
            },
        };
        Ok(Admission::Session(Admitted {
            startup,
            route: destination.route,
            login: decision.login,
            audit_queries: decision.audit_queries,
            _identity_slot: identity_slot,
        }))
    }

    /// The policy's decision for this identity going to `destination`
    /// (None: the console), judged on the database asked for and the one
    /// forwarded.
    fn decide(
        &self,
        identity: &Identity,
        requested: &str,
        startup: &StartupMessage,
        destination: Option<&Destination>,
    ) -> Decision {
        let upstream = match destination {
            Some(d) => d.route.name(),
            None => self.listener.route.as_ref().map_or("", |r| r.name()),
        };
        self.shared.policy().decide(&Request {
            identity,
            client_ip: self.peer.map(|p| p.ip()),
            listener: &self.listener.name,
            upstream,
            endpoint: destination
                .and_then(|d| d.endpoint.as_ref())
                .map(|e| e.as_str()),
            database: requested,
            forwarded_database: Some(startup.database()).filter(|db| *db != requested),
            user: startup.user(),
            proxy: self.facts.proxy.as_ref().map(|p| &p.tlvs),
        })
    }

    /// Establishes who the client is, by the listener's identity source.
    async fn identify(&self, peer_cert: Option<&[u8]>) -> Result<Identity, IdentityError> {
        let ip = self.peer.map(|p| p.ip());
        match &self.listener.identity {
            ListenerIdentity::Network => Ok(Identity::network(ip)),
            ListenerIdentity::ClientCert { order, .. } => match peer_cert {
                Some(der) => {
                    let (name, cert_names) = cert::names(der, order)?;
                    Ok(Identity {
                        source: IdentitySource::ClientCert,
                        name,
                        cert_names,
                        ..Identity::network(ip)
                    })
                }
                // `optional` and no certificate: known by address only.
                None => Ok(Identity::network(ip)),
            },
            ListenerIdentity::Tailscale => {
                let peer = self.peer.ok_or(IdentityError::NotTcp)?;
                let whois = self.settings.whois.as_ref().ok_or_else(|| {
                    IdentityError::LocalApiUnreachable {
                        socket: "(none configured)".into(),
                        reason: "no [tailscale] section in the configuration".into(),
                    }
                })?;
                whois.whois(peer).await
            }
        }
    }

    /// Whether the client is known as a person or service (a certificate
    /// or tailnet identity), not only by its address: what identity login
    /// and the admin console require (check-config keeps such rules off
    /// address-only listeners; this holds even if it did not).
    pub(super) fn is_person(&self) -> bool {
        self.facts
            .identity
            .as_ref()
            .is_some_and(|i| i.source != IdentitySource::Network)
    }

    /// One of the `limit` sessions a rule allows `identity`: on this
    /// instance and, with `[cluster]`, across the fleet (when Redis cannot
    /// be asked, this instance's count alone decides). Err: where the
    /// limit is reached.
    async fn identity_slot(
        &self,
        identity: &str,
        limit: usize,
    ) -> Result<IdentitySlot, LimitScope> {
        let local = self
            .shared
            .identity_sessions
            .try_acquire(identity.to_owned(), limit)
            .ok_or(LimitScope::Instance)?;
        let fleet = match &self.shared.cluster {
            None => None,
            Some(fleet) => {
                match fleet
                    .hold_identity(identity, limit, &self.facts.session_id)
                    .await
                {
                    Ok(crate::cluster::Admission::Held(slot)) => Some(slot),
                    Ok(crate::cluster::Admission::Full(_)) => return Err(LimitScope::Fleet),
                    Err(crate::cluster::Unavailable) => {
                        if self.shared.warn_limit.allow("cluster_limits_local") {
                            warn!(identity, "Redis is unavailable: max_sessions is counted on this instance only");
                        }
                        None
                    }
                }
            }
        };
        Ok(IdentitySlot {
            _local: local,
            _fleet: fleet,
        })
    }

    /// The StartupMessage as it goes upstream: unchanged, unless an
    /// application_name template adds the identity (for visibility in
    /// pg_stat_activity and server logs; the client can change it later, so
    /// it is not a security boundary).
    fn forwarded_startup(&self, startup: StartupMessage) -> StartupMessage {
        let Some(identity) = &self.facts.identity else {
            return startup;
        };
        let source = match identity.source {
            IdentitySource::Network => "network",
            IdentitySource::ClientCert => "client_cert",
            IdentitySource::Tailscale => "tailscale",
        };
        let client_addr = self
            .peer
            .map_or_else(|| "local".to_owned(), |p| p.ip().to_string());
        let expand = |template: &str, startup: &StartupMessage| {
            template
                .replace(
                    "{application_name}",
                    startup.application_name().unwrap_or(""),
                )
                .replace("{identity}", &identity.name)
                .replace("{node}", identity.node.as_deref().unwrap_or(""))
                .replace("{source}", source)
                .replace("{session_id}", &self.facts.session_id)
                .replace("{client_addr}", &client_addr)
                // A NUL would end the value early in the StartupMessage.
                .replace('\0', "")
        };
        let mut startup = startup;
        if let Some(template) = &self.settings.application_name {
            let value = expand(template, &startup);
            startup = startup.with_param("application_name", &value);
        }
        // Replaces what the client sent under the same names: the server
        // sees pgbastion's values, never the client's.
        for (name, template) in &self.settings.forward_settings {
            let value = expand(template, &startup);
            startup = startup.with_param(name, &value);
        }
        startup
    }

    /// The admin console (database `pgbastion`), for identities a rule
    /// marks `admin = true`; a person, never just an address.
    pub(super) async fn console(
        self,
        mut conn: ClientConn,
        admin: bool,
        identity: String,
        pending: Option<PendingPermit>,
    ) {
        if !admin || !self.is_person() {
            let err = SessionError::NotAdmin { identity };
            return self.reject(&mut conn, err, None).await;
        }
        drop(pending);
        let shared = self.shared.clone();
        let record = |what: &str| {
            shared.audit.emit(&Event::Console {
                facts: &self.facts,
                command: what,
                result: "ok".into(),
            })
        };
        record("(console session start)");
        info!("admin console session started");
        let served = unless_shutdown(
            &shared,
            console::serve(&mut *conn.io, &mut conn.buf, &self.shared, &self.facts),
        )
        .await;
        let end = match served {
            Some(end) => end,
            None => {
                let _ = tokio::time::timeout(
                    ERROR_WRITE_TIMEOUT,
                    conn.io.write_all(&relay::shutdown_error()),
                )
                .await;
                "shutdown"
            }
        };
        record(&format!("(console session end: {end})"));
        let _ = conn.io.shutdown().await;
    }
}
