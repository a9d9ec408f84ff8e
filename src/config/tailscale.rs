//! `[tailscale]`: where tailscaled's LocalAPI is, which peer capability
//! carries pgbastion's grants, and how long a WhoIs may take. Owns
//! `TailscaleConfig` and its defaults.

use std::path::PathBuf;
use std::time::Duration;

use super::raw::RawTailscale;

/// Where tailscaled's LocalAPI is, and which peer capability carries
/// pgbastion's grants.
#[derive(Debug, Clone)]
pub struct TailscaleConfig {
    pub socket: PathBuf,
    pub capability: Option<String>,
    pub timeout: Duration,
}

impl RawTailscale {
    /// Nothing to refuse: unset keys get tailscaled's usual socket and 2s.
    pub(super) fn into_config(self) -> TailscaleConfig {
        TailscaleConfig {
            socket: self
                .socket
                .unwrap_or_else(|| PathBuf::from("/var/run/tailscale/tailscaled.sock")),
            capability: self.capability,
            timeout: self.timeout.unwrap_or(Duration::from_secs(2)),
        }
    }
}
