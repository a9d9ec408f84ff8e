//! `ConfigError`: why a configuration was refused, and `KeyPath`, the
//! place in the file (section, entry and key) a refusal is about.
//!
//! Paths are written the way operators see the file: `cluster.redis`,
//! `listener "public".listen`, `forward.settings."app.who"`; entries of
//! `[[...]]` arrays are named by their `name` (or the default name they
//! get), credentials by their position and user.

use std::fmt;
use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value (or a combination of values) at `path` is not accepted.
    #[error("{path}: {reason}")]
    Invalid { path: KeyPath, reason: String },
    /// A section the configuration cannot do without.
    #[error("at least one [[{section}]] is required")]
    Missing { section: &'static str },
    /// Two entries of an array of tables share a name.
    #[error("two {section}s are named {name:?}: names must be unique")]
    DuplicateName { section: &'static str, name: String },
    /// Two `[[credential]]` sections for the same user and upstream.
    #[error("two credentials for user {user:?} on upstream {upstream:?}")]
    DuplicateCredential { user: String, upstream: String },
    /// A refusal from `policy::Policy::new`, which names the rule itself.
    #[error("{0}")]
    Policy(String),
    /// A command-line flag of `pgbastion run` is missing or incomplete.
    #[error("{flag} {reason}")]
    Flag {
        flag: &'static str,
        reason: &'static str,
    },
}

impl ConfigError {
    /// Where in the configuration the problem is, when it is in one place.
    pub fn path(&self) -> Option<&KeyPath> {
        match self {
            ConfigError::Invalid { path, .. } => Some(path),
            _ => None,
        }
    }
}

/// A section of the configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Section {
    /// `[tls]`, pgbastion's certificate for clients.
    Tls,
    /// A `[[listener]]`, by name.
    Listener(String),
    /// An `[[upstream]]`, by name.
    Upstream(String),
    /// A `[[route]]`, by name.
    Route(String),
    /// A `[[credential]]`: its position (from 1) and user.
    Credential {
        number: usize,
        user: String,
    },
    /// A `[[rule]]`, by name (empty when unnamed: rules get their default
    /// names only once the policy is built).
    Rule(String),
    Limits,
    Timeouts,
    Audit,
    Admin,
    Forward,
    Cluster,
}

impl Section {
    /// The path of one key of this section.
    pub(crate) fn key(&self, key: impl Into<String>) -> KeyPath {
        KeyPath {
            section: self.clone(),
            key: Some(key.into()),
        }
    }

    /// The path of the section as a whole (for rules across its keys).
    pub(crate) fn whole(&self) -> KeyPath {
        KeyPath {
            section: self.clone(),
            key: None,
        }
    }
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Section::Tls => f.write_str("tls"),
            Section::Listener(name) => write!(f, "listener {name:?}"),
            Section::Upstream(name) => write!(f, "upstream {name:?}"),
            Section::Route(name) => write!(f, "route {name:?}"),
            Section::Credential { number, user } => {
                write!(f, "credential {number} (user {user:?})")
            }
            Section::Rule(name) => write!(f, "rule {name:?}"),
            Section::Limits => f.write_str("limits"),
            Section::Timeouts => f.write_str("timeouts"),
            Section::Audit => f.write_str("audit"),
            Section::Admin => f.write_str("admin"),
            Section::Forward => f.write_str("forward"),
            Section::Cluster => f.write_str("cluster"),
        }
    }
}

/// A place in the configuration: a section and, when one key is at fault,
/// that key (`None`: a rule across the section's keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPath {
    pub section: Section,
    pub key: Option<String>,
}

impl KeyPath {
    /// The refusal of what is at this path.
    pub(crate) fn invalid(self, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{}.{key}", self.section),
            None => write!(f, "{}", self.section),
        }
    }
}
