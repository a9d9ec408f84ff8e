//! `[[route]]`, upstream templates and the listener's optional upstream:
//! what is accepted, and each refusal with the key it names and the words
//! an operator reads.

use crate::config::{Config, ConfigError};
use crate::routing::ServerNameMatch;

/// Two upstreams (one a template) and a listener with no upstream.
const ROUTED: &str = r#"
    [tls]
    cert = "proxy.crt"
    key = "proxy.key"

    [[listener]]
    name = "main"
    listen = "127.0.0.1:6432"

    [[upstream]]
    name = "orders"
    address = "orders.internal:5432"
    ca_file = "ca.pem"

    [[upstream]]
    name = "tenants"
    address = "{endpoint}.tenants.internal:5432"
    database = "db_{endpoint}"
    ca_file = "ca.pem"
"#;

fn with(extra: &str) -> Result<Config, ConfigError> {
    Config::from_toml(&format!("{ROUTED}\n{extra}"))
}

/// The refusal's key path and message.
fn refused(extra: &str) -> (String, String) {
    match with(extra) {
        Err(e) => (
            e.path().map(ToString::to_string).unwrap_or_default(),
            e.to_string(),
        ),
        Ok(_) => panic!("accepted:\n{extra}"),
    }
}

const TWO_ROUTES: &str = r#"
    [[route]]
    name = "orders"
    server_name = "Orders.DB.test"
    upstream = "orders"

    [[route]]
    name = "tenants"
    server_name = "*.tenants.test"
    upstream = "tenants"
"#;

#[test]
fn routes_are_read_in_order_and_a_listener_may_have_no_upstream() {
    let c = with(TWO_ROUTES).unwrap();
    let routes = c.routes.routes();
    assert_eq!(routes.len(), 2);
    assert_eq!(
        routes[0].server_name,
        Some(ServerNameMatch::Exact("orders.db.test".into()))
    );
    assert_eq!(
        routes[1].server_name,
        Some(ServerNameMatch::Wildcard("tenants.test".into()))
    );
    assert_eq!((routes[0].upstream, routes[1].upstream), (0, 1));
    assert_eq!(c.listeners[0].upstream, None);
    let t = &c.upstreams[1];
    assert!(t.is_templated() && !c.upstreams[0].is_templated());
    let t1 = t.for_endpoint(&crate::routing::Endpoint::parse("t1").unwrap());
    assert_eq!(
        (
            t1.host.as_str(),
            t1.server_name.as_str(),
            t1.database.as_deref()
        ),
        ("t1.tenants.internal", "t1.tenants.internal", Some("db_t1"))
    );
    assert!(!t1.is_templated());
}

#[test]
fn without_routes_several_upstreams_still_need_a_listener_upstream() {
    let (path, msg) = refused("");
    assert_eq!(path, r#"listener "main".upstream"#);
    assert!(msg.contains("[[route]]"), "{msg}");
}

#[test]
fn a_route_must_name_what_exists() {
    let (path, msg) = refused("[[route]]\nname = \"r\"\ndatabase = \"x\"\nupstream = \"nope\"");
    assert_eq!(path, r#"route "r".upstream"#);
    assert!(msg.contains("\"orders\", \"tenants\""), "{msg}");
    let (path, msg) = refused(
        "[[route]]\nname = \"r\"\ndatabase = \"x\"\nupstream = \"orders\"\nlisteners = [\"nope\"]",
    );
    assert_eq!(path, r#"route "r".listeners"#);
    assert!(msg.contains("no listener named \"nope\""), "{msg}");
    for (key, value, says) in [
        ("server_name", "\"a.*.test\"", "whole first label"),
        ("server_name", "\"*.test\"", "too broad"),
        ("server_name", "\"a_b.test\"", "not a DNS name"),
        ("endpoint", "\"T1\"", "only a-z, 0-9 and -"),
        ("database", "\"\"", "must not be empty"),
        ("listeners", "[]", "applies nowhere"),
    ] {
        let (path, msg) = refused(&format!(
            "[[route]]\nname = \"r\"\n{key} = {value}\nupstream = \"orders\""
        ));
        assert_eq!(path, format!("route \"r\".{key}"));
        assert!(msg.contains(says), "{key}: {msg}");
    }
    let e = with("[[route]]\nupstream = \"orders\"\nservr_name = \"x\"").unwrap_err();
    assert!(e.to_string().contains("servr_name"), "{e}");
}

#[test]
fn a_route_an_earlier_one_hides_is_refused_naming_both() {
    let (path, msg) = refused(&format!(
        "{TWO_ROUTES}\n[[route]]\nname = \"t1\"\nserver_name = \"t1.tenants.test\"\nupstream = \"orders\""
    ));
    assert_eq!(path, r#"route "t1""#);
    assert!(msg.contains("route \"tenants\" comes first"), "{msg}");
    let (_, msg) = refused(
        "[[route]]\nname = \"all\"\nupstream = \"orders\"\n[[route]]\nname = \"db\"\ndatabase = \"x\"\nupstream = \"tenants\"",
    );
    assert!(msg.contains("route \"all\" comes first"), "{msg}");
    let (_, msg) = refused(
        "[[route]]\nname = \"a\"\nupstream = \"orders\"\n[[route]]\nname = \"a\"\ndatabase = \"x\"\nupstream = \"tenants\"",
    );
    assert!(msg.contains("two routes are named \"a\""), "{msg}");
}

#[test]
fn a_listener_no_route_applies_to_needs_an_upstream() {
    let (path, msg) = refused(
        "[[listener]]\nname = \"other\"\nlisten = \"127.0.0.1:6433\"\n\
         [[route]]\nlisteners = [\"other\"]\ndatabase = \"x\"\nupstream = \"orders\"",
    );
    assert_eq!(path, r#"listener "main".upstream"#);
    assert!(msg.contains("no route applies"), "{msg}");
}

#[test]
fn endpoint_templates_only_where_they_are_filled_in() {
    let upstream = |keys: &str| {
        Config::from_toml(&format!(
            "[[listener]]\nlisten = \"127.0.0.1:1\"\nclient_tls = \"allow\"\n\
             [[upstream]]\nname = \"u\"\nca_file = \"ca.pem\"\n{keys}"
        ))
    };
    assert!(upstream(
        "address = \"{endpoint}.internal:5432\"\nserver_name = \"{endpoint}.db.test\""
    )
    .is_ok());
    for (keys, key, says) in [
        ("address = \"{endpiont}.internal:5432\"", "address", "only placeholder"),
        ("address = \"db:5432\"\ndatabase = \"{tenant}\"", "database", "only placeholder"),
        (
            "address = \"db:5432\"\nauth = \"scram\"\nsecrets_file = \"s\"\nauth_user = \"{endpoint}\"\nauth_password_file = \"p\"",
            "auth_user",
            "does not take {endpoint}",
        ),
        ("address = \"db:{endpoint}\"", "address", "is not HOST:PORT"),
        ("address = \"{endpoint}:5432\"", "address", "whole label"),
        ("address = \"db-{endpoint}.internal:5432\"", "address", "whole label"),
        ("address = \"{endpoint}.{endpoint}:5432\"", "address", "whole label"),
        ("address = \"db:5432\"\nserver_name = \"{endpoint} x.test\"", "server_name", "neither a DNS name"),
        ("address = \"db:5432\"\ndatabase = \"\"", "database", "must not be empty"),
    ] {
        let e = upstream(keys).unwrap_err();
        assert_eq!(
            e.path().map(ToString::to_string).as_deref(),
            Some(format!("upstream \"u\".{key}").as_str()),
            "{keys}: {e}"
        );
        assert!(e.to_string().contains(says), "{keys}: {e}");
    }
}

#[test]
fn rules_may_name_endpoints() {
    let c = with(&format!(
        "{TWO_ROUTES}\n[[rule]]\nname = \"t1\"\nendpoints = [\"t1\", \"t2*\"]\nupstreams = [\"tenants\"]"
    ))
    .unwrap();
    assert_eq!(
        c.policy.rules()[0].endpoints.as_deref(),
        Some(&["t1".to_owned(), "t2*".to_owned()][..])
    );
}
