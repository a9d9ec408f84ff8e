//! Everything that bounds what one client, one address or one identity can
//! take: token buckets (cancel requests, failed logins), concurrent slots per
//! key, pending slots for connections not yet authenticated (and the limits
//! a reload may change), the summarising limiter for lines strangers cause,
//! and the process's open-files limit.

pub mod buckets;
pub mod fd;
pub mod keyed_slots;
pub(crate) mod pending;
pub mod warn;
