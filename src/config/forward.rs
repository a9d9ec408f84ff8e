//! `[forward]`: what pgbastion puts in the StartupMessage it sends
//! upstream (an `application_name` template and custom settings), the
//! placeholders those templates may use, and the checks on setting names
//! and templates.

use super::error::{ConfigError, KeyPath, Section};
use super::raw::RawForward;

/// The placeholders `[forward] application_name` and `[forward] settings`
/// may use.
pub const FORWARD_PLACEHOLDERS: &[&str] = &[
    "{application_name}",
    "{identity}",
    "{node}",
    "{source}",
    "{session_id}",
    "{client_addr}",
];

/// `[forward]`, validated (`Config` keeps the two as its own fields).
pub(super) struct Forward {
    /// Template for the application_name sent upstream; None: unchanged.
    pub(super) application_name: Option<String>,
    /// (name, template), sorted by name.
    pub(super) settings: Vec<(String, String)>,
}

impl RawForward {
    pub(super) fn validate(self) -> Result<Forward, ConfigError> {
        if let Some(template) = &self.application_name {
            check_template(Section::Forward.key("application_name"), template)?;
        }
        for (name, template) in &self.settings {
            let at = Section::Forward.key(format!("settings.{name:?}"));
            check_setting_name(&at, name)?;
            check_template(at, template)?;
        }
        Ok(Forward {
            application_name: self.application_name,
            settings: self.settings.into_iter().collect(),
        })
    }
}

/// Refuses a template with a placeholder pgbastion does not know.
fn check_template(at: KeyPath, template: &str) -> Result<(), ConfigError> {
    let mut rest = template.to_owned();
    for p in FORWARD_PLACEHOLDERS {
        rest = rest.replace(p, "");
    }
    if rest.contains('{') || rest.contains('}') {
        return Err(at.invalid(format!(
            "{template:?} has an unknown placeholder; use {}",
            FORWARD_PLACEHOLDERS.join(", ")
        )));
    }
    Ok(())
}

/// A custom setting's name as PostgreSQL accepts one in a StartupMessage:
/// `prefix.name`, letters, digits and underscores. The dot keeps it clear
/// of the protocol's own keys (user, database, options, replication).
fn check_setting_name(at: &KeyPath, name: &str) -> Result<(), ConfigError> {
    let ok = name.len() < 64
        && name.contains('.')
        && !name.starts_with('.')
        && !name.ends_with('.')
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(at.clone().invalid(
            "a custom setting name is prefix.name (letters, digits, underscores, under 64 characters), e.g. \"pgbastion.identity\"",
        ))
    }
}
