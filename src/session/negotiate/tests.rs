//! Unit tests of the negotiation over `tokio::io::duplex`.
