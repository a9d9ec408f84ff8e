//! Named prepared statements across pooled server connections (the scheme
//! PgBouncer 1.21 brought in): a client's statement names are its own; on
//! the server every statement is prepared under a name pgbastion derives
//! from its text and parameter types, so clients that prepare the same
//! query share it, and a name is never reused for other text. Each server
//! connection keeps at most `max_prepared_statements`, least recently used
//! closed first; a statement missing on the connection a transaction lands
//! on is prepared again, unseen by the client.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// A client's prepared statements, and the bytes they take, are bounded
/// (an application that prepares without ever closing is told, 54000,
/// rather than growing without end).
pub(crate) const MAX_CLIENT_STATEMENTS: usize = 10_000;
pub(crate) const MAX_CLIENT_STATEMENT_BYTES: usize = 64 * 1024 * 1024;

/// One statement as the client prepared it.
#[derive(Debug, Clone)]
pub(crate) struct ClientStatement {
    /// The name it has on every server connection.
    pub server_name: Arc<str>,
    /// The Parse body after the name (query, parameter types), to prepare
    /// it again where it is missing.
    pub parse_rest: Arc<[u8]>,
}

/// A client's named statements, by the client's names.
#[derive(Debug, Default)]
pub(crate) struct ClientStatements {
    map: HashMap<Vec<u8>, ClientStatement>,
    bytes: usize,
}

/// Why a client's Parse cannot be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AddError {
    /// The name is taken (PostgreSQL: 42P05).
    Exists,
    /// Past `MAX_CLIENT_STATEMENTS` or `MAX_CLIENT_STATEMENT_BYTES`.
    TooMany,
}

impl ClientStatements {
    pub fn get(&self, name: &[u8]) -> Option<&ClientStatement> {
        self.map.get(name)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Keeps a statement the client prepares under `name`.
    pub fn add(&mut self, name: &[u8], parse_rest: &[u8]) -> Result<ClientStatement, AddError> {
        if self.map.contains_key(name) {
            return Err(AddError::Exists);
        }
        let cost = name.len() + parse_rest.len();
        if self.map.len() >= MAX_CLIENT_STATEMENTS || self.bytes + cost > MAX_CLIENT_STATEMENT_BYTES
        {
            return Err(AddError::TooMany);
        }
        let statement = ClientStatement {
            server_name: server_name(parse_rest),
            parse_rest: parse_rest.into(),
        };
        self.bytes += cost;
        self.map.insert(name.to_vec(), statement.clone());
        Ok(statement)
    }

    /// Forgets `name` (Close, or a Parse the server refused or skipped).
    pub fn remove(&mut self, name: &[u8]) -> Option<ClientStatement> {
        let removed = self.map.remove(name)?;
        self.bytes -= name.len() + removed.parse_rest.len();
        Some(removed)
    }

    /// Forgets every statement (`DEALLOCATE ALL`, `DISCARD ALL`).
    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }
}

/// The server-side name of a statement: the same text and parameter
/// types give the same name on every connection of every pool.
pub(crate) fn server_name(parse_rest: &[u8]) -> Arc<str> {
    let digest = Sha256::digest(parse_rest);
    format!("pgbastion_{}", hex::encode(&digest[..12])).into()
}

/// The statements one server connection has under pgbastion's names,
/// least recently used first out.
#[derive(Debug)]
pub(crate) struct ServerStatements {
    cap: usize,
    tick: u64,
    used: HashMap<Arc<str>, u64>,
}

impl ServerStatements {
    pub fn new(cap: usize) -> Self {
        ServerStatements {
            cap: cap.max(1),
            tick: 0,
            used: HashMap::new(),
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.used.len()
    }

    /// Whether the connection has it (and marks it used).
    pub fn touch(&mut self, name: &Arc<str>) -> bool {
        self.tick += 1;
        match self.used.get_mut(name) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records a statement being prepared; returns the one to close to
    /// stay within the bound.
    pub fn insert(&mut self, name: Arc<str>) -> Option<Arc<str>> {
        self.tick += 1;
        self.used.insert(name.clone(), self.tick);
        if self.used.len() <= self.cap {
            return None;
        }
        let oldest = self
            .used
            .iter()
            .filter(|(n, _)| **n != name)
            .min_by_key(|(_, t)| **t)
            .map(|(n, _)| n.clone())?;
        self.used.remove(&oldest);
        Some(oldest)
    }

    pub fn remove(&mut self, name: &str) {
        self.used.remove(name);
    }

    pub fn clear(&mut self) {
        self.used.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_text_and_types_share_one_server_name() {
        let a = server_name(b"select $1\0\0\x01\0\0\0\x17");
        assert_eq!(a, server_name(b"select $1\0\0\x01\0\0\0\x17"));
        assert_ne!(a, server_name(b"select $1\0\0\x01\0\0\0\x19"));
        assert!(a.starts_with("pgbastion_") && a.len() == 10 + 24);
    }

    #[test]
    fn a_client_name_is_taken_until_closed() {
        let mut c = ClientStatements::default();
        let s = c.add(b"s1", b"select 1\0\0\0").unwrap();
        assert_eq!(
            c.add(b"s1", b"select 2\0\0\0").unwrap_err(),
            AddError::Exists
        );
        assert_eq!(c.get(b"s1").unwrap().server_name, s.server_name);
        assert!(c.remove(b"s1").is_some());
        assert!(c.add(b"s1", b"select 2\0\0\0").is_ok());
        assert_eq!(c.len(), 1);
        c.clear();
        assert!(c.get(b"s1").is_none());
    }

    #[test]
    fn a_client_cannot_prepare_without_bound() {
        let mut c = ClientStatements::default();
        for i in 0..MAX_CLIENT_STATEMENTS {
            c.add(format!("s{i}").as_bytes(), b"select 1\0\0\0")
                .unwrap();
        }
        assert_eq!(
            c.add(b"one more", b"x\0\0\0").unwrap_err(),
            AddError::TooMany
        );
    }

    #[test]
    fn the_least_recently_used_statement_is_closed_first() {
        let mut s = ServerStatements::new(2);
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        assert_eq!(s.insert(a.clone()), None);
        assert_eq!(s.insert(b.clone()), None);
        assert!(s.touch(&a));
        assert_eq!(s.insert(c.clone()), Some(b.clone()));
        assert!(!s.touch(&b));
        assert!(s.touch(&c) && s.touch(&a));
        assert_eq!(s.len(), 2);
    }
}
