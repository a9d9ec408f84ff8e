//! The two names a route matches on, as validated types: an `Endpoint`
//! (a tenant's id, one DNS label) and a `ServerNameMatch` (a TLS server
//! name, exact or `*.` one label deep). Parsing is pure and total: every
//! string a client or a configuration can send either becomes one of
//! these or is refused with a reason a person can act on.

use std::fmt;

/// The longest DNS label (RFC 1035).
const MAX_LABEL: usize = 63;

/// An endpoint id: a lowercase DNS label (`[a-z0-9-]{1,63}`, no `-` at
/// either end), so it can be put in a host name (`{endpoint}.internal`)
/// without any lookup ever seeing something else.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint(String);

impl Endpoint {
    /// Refuses anything but a lowercase DNS label. Upper case is refused,
    /// not folded: an id is an id, and `T1` and `t1` must not be two
    /// spellings of one tenant in the audit log.
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        if s.is_empty() || s.len() > MAX_LABEL {
            return Err(format!(
                "{:?} is not an endpoint id: it must be 1 to {MAX_LABEL} characters",
                truncated(s)
            ));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(format!(
                "{:?} is not an endpoint id: {c:?} is not allowed (only a-z, 0-9 and -)",
                truncated(s)
            ));
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err(format!(
                "{s:?} is not an endpoint id: it cannot start or end with '-'"
            ));
        }
        Ok(Endpoint(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// An endpoint for checking what a template makes (never dialed).
    pub fn sample() -> Endpoint {
        Endpoint("endpoint".to_owned())
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// At most 80 characters of what a client sent, for messages: a client
/// must not make pgbastion echo kilobytes back into its logs.
pub fn truncated(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

/// A route's `server_name`: one exact name, or every name one label
/// under a suffix (`*.tenants.example.com`), whose label is the endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerNameMatch {
    Exact(String),
    /// The suffix after `*.` (`tenants.example.com`).
    Wildcard(String),
}

impl ServerNameMatch {
    /// Lowercases (DNS names are case-insensitive) and checks that the
    /// name is a DNS name, with `*` only as the whole first label.
    pub fn parse(s: &str) -> Result<ServerNameMatch, String> {
        let lower = s.to_ascii_lowercase();
        let (wild, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        if name.contains('*') {
            return Err(format!(
                "{s:?}: a wildcard must be the whole first label (\"*.tenants.example.com\")"
            ));
        }
        check_dns_name(name).map_err(|why| format!("{s:?} is not a DNS name: {why}"))?;
        if wild && !name.contains('.') {
            return Err(format!(
                "{s:?} is too broad: a wildcard needs at least two labels after \"*.\""
            ));
        }
        Ok(if wild {
            ServerNameMatch::Wildcard(name.to_owned())
        } else {
            ServerNameMatch::Exact(name.to_owned())
        })
    }

    /// Whether `name` (an exact server name) is one this matches.
    pub fn covers(&self, name: &str) -> bool {
        match self {
            ServerNameMatch::Exact(n) => n == name,
            ServerNameMatch::Wildcard(suffix) => {
                split_first_label(name).is_some_and(|(_, rest)| rest == suffix)
            }
        }
    }
}

impl fmt::Display for ServerNameMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerNameMatch::Exact(n) => f.write_str(n),
            ServerNameMatch::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

/// `a.b.c` -> (`a`, `b.c`); None for a single label.
pub fn split_first_label(name: &str) -> Option<(&str, &str)> {
    name.split_once('.')
        .filter(|(l, rest)| !l.is_empty() && !rest.is_empty())
}

/// Whether `name` is a lowercase DNS name (see `check_dns_name`).
pub fn is_dns_name(name: &str) -> bool {
    check_dns_name(name).is_ok()
}

/// Labels of letters, digits and hyphens (not at either end), 1 to 63
/// characters each, 253 in all.
fn check_dns_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 253 {
        return Err("it must be 1 to 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > MAX_LABEL {
            return Err("each label must be 1 to 63 characters");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label cannot start or end with '-'");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err("only letters, digits, '-' and '.' are allowed");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_lowercase_dns_labels() {
        for ok in ["t1", "a", "tenant-42", &"x".repeat(63)] {
            assert_eq!(Endpoint::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "T1",
            "t_1",
            "t.1",
            "t 1",
            "é",
            &"x".repeat(64),
            "a\0b",
            "-a",
            "a-",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad:?} accepted");
        }
        let long = "Y".repeat(500);
        let msg = Endpoint::parse(&long).unwrap_err();
        assert!(msg.len() < 200, "a long id is echoed whole: {msg}");
    }

    #[test]
    fn server_names_parse_exact_and_one_label_wildcards() {
        assert_eq!(
            ServerNameMatch::parse("Orders.DB.example.com").unwrap(),
            ServerNameMatch::Exact("orders.db.example.com".into())
        );
        assert_eq!(
            ServerNameMatch::parse("*.tenants.example.com").unwrap(),
            ServerNameMatch::Wildcard("tenants.example.com".into())
        );
        for bad in [
            "", "*", "*.com", "a.*.com", "*a.b.com", "a..b", "-a.b", "a_b.c", "*.*.b.c", "a b",
        ] {
            assert!(ServerNameMatch::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_wildcard_covers_exactly_one_label() {
        let w = ServerNameMatch::parse("*.t.example.com").unwrap();
        assert!(w.covers("a.t.example.com"));
        assert!(!w.covers("a.b.t.example.com"));
        assert!(!w.covers("t.example.com"));
        assert!(!w.covers(".t.example.com"));
        let e = ServerNameMatch::parse("a.t.example.com").unwrap();
        assert!(e.covers("a.t.example.com") && !e.covers("b.t.example.com"));
    }
}
