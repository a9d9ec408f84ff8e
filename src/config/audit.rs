//! `[audit]`: where audit events go, what happens while they cannot be
//! written, the key that chains them, and whether the query audit redacts
//! constants. Owns `AuditConfig` (the section, one field of `Config`) and
//! the conversion from `RawAudit`.

use std::path::PathBuf;

use serde::Deserialize;

use super::error::{ConfigError, Section};
use super::raw::RawAudit;

/// Where audit events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    Stdout,
    File(PathBuf),
    /// No audit log (`log = "off"`): for benchmarks, or where another
    /// layer audits; never the default.
    Off,
}

/// What pgbastion does while audit events cannot be written (the reader of
/// stdout stalls, the disk is full, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditOnFailure {
    /// Sessions go on; dropped events are counted and reported in the log.
    #[default]
    Continue,
    /// No unaudited session: new sessions are refused (SQLSTATE 08004)
    /// while events cannot be written, and admitted again once they can.
    Refuse,
}

/// The `[audit]` section, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    pub target: AuditTarget,
    pub on_failure: AuditOnFailure,
    /// The key each audit line's `prev` is an HMAC with (None: SHA-256).
    pub chain_key: Option<PathBuf>,
    /// Query audit: statements with their constants replaced (true), or
    /// as sent.
    pub redact: bool,
}

impl RawAudit {
    pub(super) fn validate(self) -> Result<AuditConfig, ConfigError> {
        let target = match self.log.as_deref() {
            None | Some("-") => AuditTarget::Stdout,
            Some("off") => AuditTarget::Off,
            Some("") => {
                return Err(Section::Audit
                    .key("log")
                    .invalid("must be a file path or \"-\" for stdout"))
            }
            Some(p) => AuditTarget::File(PathBuf::from(p)),
        };
        Ok(AuditConfig {
            target,
            on_failure: self.on_failure,
            chain_key: self.chain_key_file,
            redact: self.redact.unwrap_or(true),
        })
    }
}
