//! SQL over HTTP (`POST /sql`), Neon's wire contract, as the serverless
//! driver `@neondatabase/serverless` speaks it. Each request runs as one
//! short session: the handler opens an in-memory duplex, runs pgbastion's
//! normal session flow on one end, and drives the other end with this
//! module's frontend client.
//!
//! The parts, each pure except `client`:
//! - `conninfo`: the `Neon-Connection-String` header (user, password,
//!   host for routing, database, `options`, `application_name`);
//! - `request`: the `Neon-*` option headers, and the query and batch
//!   types the body becomes;
//! - `body`: the JSON body, read straight into those types, with JSON
//!   parameters turned into Postgres text;
//! - `json`: Postgres text values to JSON by type OID (when raw text
//!   output is off);
//! - `response`: results and errors as Neon's JSON, with a size limit;
//! - `client`: a minimal Postgres frontend (login, extended-protocol
//!   queries, simple queries for BEGIN/COMMIT/ROLLBACK);
//! - `handler`: `POST /sql` itself, which ties them to a session.
//!
//! Usage, for a handler:
//! ```text
//! let info = conninfo::parse(conn_string_header)?;          // 400 on error
//! let options = request::Options::from_headers(&headers)?;  // 400
//! let payload = body::parse_body(&body)?;                   // 400
//! let mut client = client::connect(io, &info.startup_params(), info.password(), limits).await?;
//! let mut out = ResponseBuilder::new(options.raw_text_output, options.array_mode,
//!                                    matches!(payload, Payload::Batch(_)), max_response_bytes);
//! // Single: out.push(&client.query(&q.text, &q.params).await?, q.array_mode)?;
//! // Batch:  client.simple(&options.begin_statement()), each query as above,
//! //         client.simple("COMMIT") (ROLLBACK on an error); echo
//! //         options.batch_response_headers().
//! // ClientError::Server(e) -> 400 with e.to_json();
//! // ResponseTooLarge -> 507 with response::error_json(..);
//! let body = out.finish();
//! client.terminate().await?;
//! ```

pub mod body;
pub mod client;
pub mod conninfo;
pub(crate) mod handler;
pub mod json;
pub mod request;
pub mod response;

pub use client::{connect, Client, ClientError, Limits, StartupParams, TransactionStatus};
pub use conninfo::{ConnInfo, ConnInfoError};
pub use request::{IsolationLevel, Options, Payload, Query, RequestError};
pub use response::{error_json, QueryResult, ResponseBuilder, ResponseError, ServerError};
