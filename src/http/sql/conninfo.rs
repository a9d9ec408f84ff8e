//! The `Neon-Connection-String` header: a `postgres://` URL naming who logs
//! in (user, password), where (the host, which picks the server or endpoint
//! the way a TLS server name does) and to what (the database, `options`,
//! `application_name`). Pure parsing, no I/O; the crate has no URL parser,
//! and this grammar is small enough to own.

use thiserror::Error;

/// What went wrong, in words a client author can act on. The password never
/// appears in a message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConnInfoError {
    #[error("the connection string must start with postgres:// or postgresql://")]
    BadScheme,
    #[error("the connection string has no user name (postgres://USER:PASSWORD@HOST/DATABASE)")]
    MissingUser,
    #[error("the connection string has no password (postgres://USER:PASSWORD@HOST/DATABASE)")]
    MissingPassword,
    #[error("the connection string has no host name")]
    MissingHost,
    #[error("the host in the connection string is not a valid host name or [IPv6] address")]
    BadHost,
    #[error("the port in the connection string is not a number")]
    BadPort,
    #[error("the {0} in the connection string has a bad %-escape")]
    BadEscape(&'static str),
    #[error("the {0} in the connection string is not valid UTF-8 once %-decoded")]
    NotUtf8(&'static str),
    #[error("the {0} in the connection string contains a NUL byte")]
    Nul(&'static str),
}

/// A parsed connection string. `Debug` leaves the password out.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub user: String,
    password: Vec<u8>,
    /// Lower-cased; without brackets for an IPv6 address.
    pub host: String,
    /// The URL path, or the user when the path is empty (as Postgres does).
    pub database: String,
    pub options: Option<String>,
    pub application_name: Option<String>,
}

impl std::fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnInfo")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("host", &self.host)
            .field("database", &self.database)
            .field("options", &self.options)
            .field("application_name", &self.application_name)
            .finish()
    }
}

impl ConnInfo {
    /// The percent-decoded password, as bytes (Postgres passwords need not
    /// be UTF-8).
    pub fn password(&self) -> &[u8] {
        &self.password
    }

    /// The StartupMessage parameters for `client::connect`.
    pub fn startup_params(&self) -> super::client::StartupParams {
        super::client::StartupParams {
            user: self.user.clone(),
            database: self.database.clone(),
            options: self.options.clone(),
            application_name: self.application_name.clone(),
        }
    }
}

/// Parses `postgres[ql]://user:password@host[:port][/database][?query][#..]`.
pub fn parse(url: &str) -> Result<ConnInfo, ConnInfoError> {
    let rest = url
        .strip_prefix("postgresql://")
        .or_else(|| url.strip_prefix("postgres://"))
        .ok_or(ConnInfoError::BadScheme)?;
    let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    // The last '@' ends the user info, as URL parsers do: a password may
    // hold an unescaped '@'.
    let (userinfo, hostport) = authority
        .rsplit_once('@')
        .ok_or(ConnInfoError::MissingUser)?;
    let (user, password) = match userinfo.split_once(':') {
        Some((u, p)) => (u, Some(p)),
        None => (userinfo, None),
    };
    let user = text(user, "user name")?;
    if user.is_empty() {
        return Err(ConnInfoError::MissingUser);
    }
    let password = match password {
        Some(p) if !p.is_empty() => decode(p, false).ok_or(ConnInfoError::BadEscape("password"))?,
        _ => return Err(ConnInfoError::MissingPassword),
    };
    if password.contains(&0) {
        return Err(ConnInfoError::Nul("password"));
    }
    let host = parse_host(hostport)?;
    // Only the first path segment names the database, as in Neon's proxy.
    let database = text(path.split('/').next().unwrap_or_default(), "database")?;
    let database = if database.is_empty() {
        user.clone()
    } else {
        database
    };
    let mut info = ConnInfo {
        user,
        password,
        host,
        database,
        options: None,
        application_name: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match form_text(key, "query parameter")?.as_str() {
            "options" => info.options = Some(form_text(value, "options")?),
            "application_name" => {
                info.application_name = Some(form_text(value, "application_name")?)
            }
            // sslmode, channel_binding, connect_timeout ...: about the
            // client's own transport, which HTTPS already settled.
            _ => {}
        }
    }
    Ok(info)
}

/// `host[:port]` or `[v6][:port]`; the port must be a number but is not
/// used (the listener's port is the one that was reached).
fn parse_host(hostport: &str) -> Result<String, ConnInfoError> {
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (addr, after) = v6.split_once(']').ok_or(ConnInfoError::BadHost)?;
        if addr.is_empty()
            || !addr
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        {
            return Err(ConnInfoError::BadHost);
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(ConnInfoError::BadHost)?),
        };
        (addr, port)
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err(ConnInfoError::MissingHost);
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':'))
    {
        return Err(ConnInfoError::BadHost);
    }
    if let Some(port) = port {
        if !port.is_empty() && port.parse::<u16>().is_err() {
            return Err(ConnInfoError::BadPort);
        }
    }
    Ok(host.to_ascii_lowercase())
}

/// Percent-decodes a URL component into UTF-8 text without NUL bytes (the
/// StartupMessage is NUL-separated).
fn text(raw: &str, what: &'static str) -> Result<String, ConnInfoError> {
    let bytes = decode(raw, false).ok_or(ConnInfoError::BadEscape(what))?;
    checked_text(bytes, what)
}

/// As `text`, for a query string value, where '+' is a space.
fn form_text(raw: &str, what: &'static str) -> Result<String, ConnInfoError> {
    let bytes = decode(raw, true).ok_or(ConnInfoError::BadEscape(what))?;
    checked_text(bytes, what)
}

fn checked_text(bytes: Vec<u8>, what: &'static str) -> Result<String, ConnInfoError> {
    if bytes.contains(&0) {
        return Err(ConnInfoError::Nul(what));
    }
    String::from_utf8(bytes).map_err(|_| ConnInfoError::NotUtf8(what))
}

/// Percent-decoding; `None` on a '%' not followed by two hex digits.
fn decode(raw: &str, plus_is_space: bool) -> Option<Vec<u8>> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(url: &str) -> ConnInfo {
        parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    #[test]
    fn full_url() {
        let c = ok("postgresql://alice:s3cr%40t@EP-1.example.com:5432/my%20db?sslmode=require&options=endpoint%3Dep-1&application_name=app+x");
        assert_eq!(c.user, "alice");
        assert_eq!(c.password(), b"s3cr@t");
        assert_eq!(c.host, "ep-1.example.com");
        assert_eq!(c.database, "my db");
        assert_eq!(c.options.as_deref(), Some("endpoint=ep-1"));
        assert_eq!(c.application_name.as_deref(), Some("app x"));
    }

    #[test]
    fn defaults_and_variants() {
        let c = ok("postgres://bob:pw@host");
        assert_eq!(c.database, "bob");
        assert_eq!(c.options, None);
        assert_eq!(ok("postgres://bob:pw@host/").database, "bob");
        assert_eq!(ok("postgres://bob:pw@host/db/extra").database, "db");
        assert_eq!(ok("postgres://bob:pw@host/db#frag").database, "db");
        assert_eq!(ok("postgres://bob:p@ss@host/db").password(), b"p@ss");
        assert_eq!(ok("postgres://bob:p:ss@host/db").password(), b"p:ss");
        assert_eq!(ok("postgres://b%C3%B6b:pw@h/d").user, "böb");
        assert_eq!(ok("postgres://bob:%FF@h/d").password(), &[0xff]);
        assert_eq!(ok("postgres://bob:pw@h:/d").host, "h");
    }

    #[test]
    fn ipv6_host() {
        assert_eq!(ok("postgres://u:p@[::1]:5432/db").host, "::1");
        assert_eq!(ok("postgres://u:p@[FE80::1]/db").host, "fe80::1");
        assert_eq!(parse("postgres://u:p@[::1/db"), Err(ConnInfoError::BadHost));
        assert_eq!(
            parse("postgres://u:p@[::1]x/db"),
            Err(ConnInfoError::BadHost)
        );
        assert_eq!(parse("postgres://u:p@[]/db"), Err(ConnInfoError::BadHost));
    }

    #[test]
    fn errors() {
        let cases = [
            ("mysql://u:p@h/d", ConnInfoError::BadScheme),
            ("http://u:p@h/d", ConnInfoError::BadScheme),
            ("postgres:/u:p@h/d", ConnInfoError::BadScheme),
            ("postgres://h/d", ConnInfoError::MissingUser),
            ("postgres://:p@h/d", ConnInfoError::MissingUser),
            ("postgres://u@h/d", ConnInfoError::MissingPassword),
            ("postgres://u:@h/d", ConnInfoError::MissingPassword),
            ("postgres://u:p@/d", ConnInfoError::MissingHost),
            ("postgres://u:p@:5432/d", ConnInfoError::MissingHost),
            ("postgres://u:p@h:port/d", ConnInfoError::BadPort),
            ("postgres://u:p@h:99999/d", ConnInfoError::BadPort),
            ("postgres://u:p@h%41/d", ConnInfoError::BadHost),
            ("postgres://u:p@a,b/d", ConnInfoError::BadHost),
            ("postgres://u:p%4@h/d", ConnInfoError::BadEscape("password")),
            (
                "postgres://u%zz:p@h/d",
                ConnInfoError::BadEscape("user name"),
            ),
            ("postgres://u:p@h/%FF", ConnInfoError::NotUtf8("database")),
            ("postgres://u:p@h/d%00", ConnInfoError::Nul("database")),
            ("postgres://u:p%00@h/d", ConnInfoError::Nul("password")),
            (
                "postgres://u:p@h/d?options=%00",
                ConnInfoError::Nul("options"),
            ),
        ];
        for (url, want) in cases {
            assert_eq!(parse(url), Err(want), "{url}");
        }
    }

    #[test]
    fn password_never_shown() {
        let c = ok("postgres://u:hunter2@h/d");
        assert!(!format!("{c:?}").contains("hunter2"));
        let e = parse("postgres://u:hunter2%@h/d").unwrap_err();
        assert!(!e.to_string().contains("hunter2"));
        assert!(!format!("{e:?}").contains("hunter2"));
    }

    #[test]
    fn ignored_query_parameters() {
        let c = ok("postgres://u:p@h/d?sslmode=verify-full&channel_binding=require&&x");
        assert_eq!(c.options, None);
        assert_eq!(c.application_name, None);
    }
}
