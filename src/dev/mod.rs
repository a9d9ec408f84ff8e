//! The throwaway parts behind `pgbastion demo` and the tests: a private CA
//! with its certificates (`certs`), a local PostgreSQL server started on the
//! spot (`localpg`), and the demo that puts pgbastion in front of one
//! (`demo`). Nothing here is used by a production `pgbastion run`.

pub mod certs;
pub mod demo;
pub mod localpg;
