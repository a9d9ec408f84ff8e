//! Authentication: how a session's client gets logged in to the database.
//!
//! Two modes, chosen per upstream (`auth` in `[[upstream]]`):
//! - `passthrough` (default): the client authenticates to the server end to
//!   end; pgbastion watches (`passthrough`). SCRAM channel binding cannot
//!   survive that, so a client choosing it is told why.
//! - `scram`: pgbastion terminates SCRAM (`terminate`): the SCRAM server to
//!   the client with the user's verifier (`source`: a secrets file in
//!   PgBouncer's format, `secrets`, or an `auth_query` on the server), and
//!   the SCRAM client to the server with the ClientKey the client's proof
//!   reveals (`login`). Both legs channel-bound (`tls::channel_binding`); no
//!   password ever known to pgbastion; failed logins throttled (`throttle`).
//!
//! Either way, a rule may say `login = "identity"`: a client known by its
//! certificate or tailnet identity is asked for nothing, and pgbastion logs
//! in to the server itself with a credential it holds (`credentials`;
//! RDS IAM tokens from `rds_iam`, AWS credentials via `aws_sts`).
//!
//! `scram` holds the SCRAM messages themselves (`scram::server` and
//! `scram::client`, the two roles), pure and exhaustively tested; `wire`
//! reads and writes whole messages for the I/O steps. Dialing the server is
//! not auth's: `upstream` connects and verifies, and hands back the
//! certificate channel binding is computed from; which upstream a session
//! goes to and in which mode it logs in is the server's `Route`. Every
//! secret file here is read by `secret_file` (mode 0600, one newline rule).

pub mod auth_query;
pub mod aws_sts;
pub mod credentials;
pub mod derive;
pub mod identity_login;
pub mod login;
pub mod mock_key;
pub mod passthrough;
pub mod proven_keys;
pub mod rds_iam;
pub mod scram;
pub mod secrets;
pub mod source;
pub mod terminate;
pub mod throttle;
pub mod wire;
