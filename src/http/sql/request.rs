//! A `POST /sql` request's contents: the `Neon-*` option headers, and what
//! the JSON body (`body`) turns into: one query or a batch, parameters as
//! Postgres text. Pure parsing, no I/O.

use http::HeaderMap;
use thiserror::Error;

/// Postgres's limit on the parameters of one statement (a u16 count).
pub const MAX_PARAMS: usize = 65_535;
/// How deep arrays may nest inside a parameter (Postgres allows 6
/// dimensions; the bound only keeps the recursion small).
pub const MAX_PARAM_DEPTH: usize = 32;
/// At most this many queries in one batch.
pub const MAX_BATCH_QUERIES: usize = 1_000;
/// At most this many parameters in one request, over all its queries: what
/// a parameter costs beyond its text (its `String`) stays a few MiB.
pub const MAX_REQUEST_PARAMS: usize = 100_000;

pub const RAW_TEXT_OUTPUT: &str = "neon-raw-text-output";
pub const ARRAY_MODE: &str = "neon-array-mode";
pub const ISOLATION_LEVEL: &str = "neon-batch-isolation-level";
pub const READ_ONLY: &str = "neon-batch-read-only";
pub const DEFERRABLE: &str = "neon-batch-deferrable";

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RequestError {
    #[error("header {0} must be \"true\" or \"false\"")]
    BadBool(&'static str),
    #[error("invalid isolation level: header {ISOLATION_LEVEL} must be one of Serializable, RepeatableRead, ReadCommitted, ReadUncommitted")]
    BadIsolationLevel,
    #[error("could not read the request body: {0}")]
    Json(String),
    #[error("the request body must be a JSON object with \"query\" (one query) or \"queries\" (a batch)")]
    BadShape,
    #[error("{0}")]
    BadQuery(String),
    #[error("query {index}: has more than the {MAX_PARAMS} parameters Postgres allows")]
    TooManyParams { index: usize },
    #[error("the request has more than {} parameters in all", MAX_REQUEST_PARAMS)]
    TooManyRequestParams,
    #[error("a batch may hold at most {} queries", MAX_BATCH_QUERIES)]
    TooManyQueries,
    #[error("query {index}: parameter {param} nests arrays deeper than {MAX_PARAM_DEPTH} levels")]
    TooDeep { index: usize, param: usize },
    #[error("query {0}: the query text contains a NUL character")]
    NulInQuery(usize),
}

/// A batch's transaction isolation level, as the header names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsolationLevel {
    Serializable,
    RepeatableRead,
    ReadCommitted,
    ReadUncommitted,
}

impl IsolationLevel {
    /// The header spelling, echoed in a batch's response.
    pub fn header_value(self) -> &'static str {
        match self {
            IsolationLevel::Serializable => "Serializable",
            IsolationLevel::RepeatableRead => "RepeatableRead",
            IsolationLevel::ReadCommitted => "ReadCommitted",
            IsolationLevel::ReadUncommitted => "ReadUncommitted",
        }
    }

    fn sql(self) -> &'static str {
        match self {
            IsolationLevel::Serializable => "SERIALIZABLE",
            IsolationLevel::RepeatableRead => "REPEATABLE READ",
            IsolationLevel::ReadCommitted => "READ COMMITTED",
            IsolationLevel::ReadUncommitted => "READ UNCOMMITTED",
        }
    }
}

/// The request's option headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Values as Postgres's text, not converted to JSON types.
    pub raw_text_output: bool,
    /// Rows as arrays rather than objects, unless a query says otherwise.
    pub array_mode: bool,
    pub isolation_level: Option<IsolationLevel>,
    pub read_only: bool,
    pub deferrable: bool,
}

impl Options {
    /// Reads the `Neon-*` headers. A boolean must be exactly `true` or
    /// `false` (what the driver sends): Neon's proxy reads anything else as
    /// false, which would turn a mistyped `Neon-Batch-Read-Only` into a
    /// writable transaction without a word.
    pub fn from_headers(headers: &HeaderMap) -> Result<Options, RequestError> {
        Options::from_lookup(|name| headers.get(name).map(|v| v.as_bytes()))
    }

    /// As `from_headers`, from any lookup by lower-case header name (the
    /// fuzz target uses it).
    pub fn from_lookup<'a>(
        get: impl Fn(&str) -> Option<&'a [u8]>,
    ) -> Result<Options, RequestError> {
        let flag = |name: &'static str| match get(name) {
            None | Some(b"false") => Ok(false),
            Some(b"true") => Ok(true),
            Some(_) => Err(RequestError::BadBool(name)),
        };
        let isolation_level = match get(ISOLATION_LEVEL) {
            None => None,
            Some(b"Serializable") => Some(IsolationLevel::Serializable),
            Some(b"RepeatableRead") => Some(IsolationLevel::RepeatableRead),
            Some(b"ReadCommitted") => Some(IsolationLevel::ReadCommitted),
            Some(b"ReadUncommitted") => Some(IsolationLevel::ReadUncommitted),
            Some(_) => return Err(RequestError::BadIsolationLevel),
        };
        Ok(Options {
            raw_text_output: flag(RAW_TEXT_OUTPUT)?,
            array_mode: flag(ARRAY_MODE)?,
            isolation_level,
            read_only: flag(READ_ONLY)?,
            deferrable: flag(DEFERRABLE)?,
        })
    }

    /// The statement that opens a batch's transaction.
    pub fn begin_statement(&self) -> String {
        let mut parts = Vec::new();
        if let Some(level) = self.isolation_level {
            parts.push(format!("ISOLATION LEVEL {}", level.sql()));
        }
        if self.read_only {
            parts.push("READ ONLY".to_owned());
        }
        if self.deferrable {
            parts.push("DEFERRABLE".to_owned());
        }
        if parts.is_empty() {
            "BEGIN".to_owned()
        } else {
            format!("BEGIN {}", parts.join(", "))
        }
    }

    /// The headers a batch's response echoes (as Neon's proxy does).
    pub fn batch_response_headers(&self) -> Vec<(&'static str, &'static str)> {
        let mut out = Vec::new();
        if self.read_only {
            out.push(("Neon-Batch-Read-Only", "true"));
        }
        if self.deferrable {
            out.push(("Neon-Batch-Deferrable", "true"));
        }
        if let Some(level) = self.isolation_level {
            out.push(("Neon-Batch-Isolation-Level", level.header_value()));
        }
        out
    }
}

/// One statement and its parameters as Postgres text (`None`: NULL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub text: String,
    pub params: Vec<Option<String>>,
    /// The query's own `arrayMode`, over the header's.
    pub array_mode: Option<bool>,
}

/// The body: one query, or a batch run in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Single(Query),
    Batch(Vec<Query>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn header_defaults_and_values() {
        assert_eq!(
            Options::from_headers(&HeaderMap::new()),
            Ok(Options::default())
        );
        let o = Options::from_headers(&headers(&[
            ("Neon-Raw-Text-Output", "true"),
            ("Neon-Array-Mode", "true"),
            ("Neon-Batch-Isolation-Level", "Serializable"),
            ("Neon-Batch-Read-Only", "true"),
            ("Neon-Batch-Deferrable", "false"),
        ]))
        .unwrap();
        assert!(o.raw_text_output && o.array_mode && o.read_only && !o.deferrable);
        assert_eq!(o.isolation_level, Some(IsolationLevel::Serializable));
        for (v, level) in [
            ("Serializable", IsolationLevel::Serializable),
            ("RepeatableRead", IsolationLevel::RepeatableRead),
            ("ReadCommitted", IsolationLevel::ReadCommitted),
            ("ReadUncommitted", IsolationLevel::ReadUncommitted),
        ] {
            let o = Options::from_headers(&headers(&[("Neon-Batch-Isolation-Level", v)]));
            assert_eq!(o.map(|o| o.isolation_level), Ok(Some(level)));
            assert_eq!(level.header_value(), v);
        }
    }

    #[test]
    fn bad_headers() {
        for name in [
            "Neon-Raw-Text-Output",
            "Neon-Array-Mode",
            "Neon-Batch-Read-Only",
            "Neon-Batch-Deferrable",
        ] {
            for v in ["TRUE", "1", "", "yes", "true "] {
                let e = Options::from_headers(&headers(&[(name, v)])).unwrap_err();
                assert!(matches!(e, RequestError::BadBool(_)), "{name}: {v:?}");
            }
        }
        for v in [
            "serializable",
            "SERIALIZABLE",
            "Snapshot",
            "",
            "read committed",
        ] {
            assert_eq!(
                Options::from_headers(&headers(&[("Neon-Batch-Isolation-Level", v)])),
                Err(RequestError::BadIsolationLevel),
                "{v:?}"
            );
        }
    }

    #[test]
    fn begin_statement_and_echo() {
        assert_eq!(Options::default().begin_statement(), "BEGIN");
        let o = Options {
            isolation_level: Some(IsolationLevel::RepeatableRead),
            read_only: true,
            deferrable: true,
            ..Options::default()
        };
        assert_eq!(
            o.begin_statement(),
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY, DEFERRABLE"
        );
        assert_eq!(o.batch_response_headers().len(), 3);
        assert!(Options::default().batch_response_headers().is_empty());
    }
}
