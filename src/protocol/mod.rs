//! The Postgres wire format, as pure functions over byte slices.
//!
//! Nothing here does I/O or decides policy: the session feeds bytes in and
//! gets typed values (or typed errors) out, which is what makes these parsers
//! easy to test exhaustively. `startup` owns the untagged packets a client
//! sends first; `message` owns the tagged messages exchanged afterwards;
//! `proxy` owns the PROXY protocol header a load balancer may put first;
//! `framer` follows message boundaries in a stream read in chunks.

pub mod framer;
pub mod message;
pub mod proxy;
pub mod startup;
