//! The throwaway parts behind `pgbastion demo` and the tests: a private CA
//! with its certificates, and a local PostgreSQL server started on the spot.
//! Nothing here is used by a production `pgbastion run`.

pub mod certs;
pub mod localpg;
