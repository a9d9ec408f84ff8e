//! Placeholder with the API (the real module comes from the h-classify branch).
use crate::audit::event::PinReason;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Set { name: String, statement: String },
    Reset { name: String },
    ResetAll,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    pub changes: Vec<Change>,
    pub pin: Option<PinReason>,
    pub forbidden: Option<String>,
    pub statements: usize,
}

pub fn classify(_sql: &str, _protected: &[String]) -> Effects {
    Effects::default()
}
