//! Who is connecting, established before the database sees a byte.
//!
//! Each listener names one source: the verified client certificate
//! (`cert`), the tailnet peer as the local tailscaled reports it
//! (`tailscale`), or just the source address (`network`). Every source
//! yields the same `Identity`, so policy rules and the audit log treat them
//! alike.

pub mod cert;
pub mod tailscale;

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Where an identity came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// The client's address only.
    #[default]
    Network,
    /// A client certificate verified against the listener's client CA.
    ClientCert,
    /// The tailnet peer, from tailscaled's LocalAPI WhoIs.
    Tailscale,
}

/// Who the client is, as far as pgbastion could establish.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Identity {
    pub source: IdentitySource,
    /// The name rules match with `names`: the certificate name chosen by
    /// `cert_identity`, the tailnet login name (for tagged nodes, their tags
    /// joined with ","), or the client address for `network`.
    pub name: String,
    /// The tailnet node name (without the trailing dot).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The tailnet node's tags.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Every name in the client certificate (SAN URIs, DNS names, emails,
    /// subject CN), for rules and the audit log.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cert_names: Vec<String>,
    /// The values of the configured peer capability (Tailscale grants), for
    /// rules with `from_grants = true`. Not audited: they are policy input.
    #[serde(skip)]
    pub grants: Vec<serde_json::Value>,
}

impl Identity {
    /// The identity of a client known only by its address.
    pub fn network(addr: Option<IpAddr>) -> Identity {
        Identity {
            source: IdentitySource::Network,
            name: addr.map_or_else(|| "unix".to_owned(), |a| a.to_string()),
            node: None,
            tags: Vec::new(),
            cert_names: Vec::new(),
            grants: Vec::new(),
        }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = match self.source {
            IdentitySource::Network => "address",
            IdentitySource::ClientCert => "certificate",
            IdentitySource::Tailscale if !self.tags.is_empty() => "tailnet tags",
            IdentitySource::Tailscale => "tailnet user",
        };
        write!(f, "{source} {:?}", self.name)?;
        if let Some(node) = &self.node {
            write!(f, " on node {node:?}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("the client certificate cannot be read: {0}")]
    BadCertificate(String),
    #[error("the client certificate carries none of the names configured in cert_identity")]
    NoCertificateName,
    #[error("tailscaled's LocalAPI at {socket} is unreachable: {reason}")]
    LocalApiUnreachable { socket: String, reason: String },
    #[error("tailscaled's LocalAPI did not answer within {0:?}")]
    LocalApiTimeout(std::time::Duration),
    #[error("tailscaled does not know the peer {0} (not a tailnet address?)")]
    UnknownPeer(String),
    #[error("tailscaled's LocalAPI answered {status}: {body}")]
    LocalApiStatus { status: u16, body: String },
    #[error("tailscaled's WhoIs answer is not usable: {0}")]
    BadWhoIs(String),
    #[error("a tailscale identity needs a TCP client, not a Unix socket")]
    NotTcp,
}
