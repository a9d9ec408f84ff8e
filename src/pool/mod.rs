//! Server connection pooling (issue 21): sessions of a pooled upstream
//! borrow server connections per transaction (or per session) instead of
//! owning one, and every borrowed connection is switched to the client it
//! now serves: its settings, its prepared statements, its identity.

pub mod classify;
