//! Routing's inputs are whatever a client sends: the TLS server name, the
//! startup `options` and the database. Nothing may panic, an endpoint is
//! always a DNS label, taking `endpoint=` out of `options` leaves none
//! behind, and a lookup names a route that exists.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pgbastion::routing::{options, Endpoint, Query, RouteSpec, ServerNameMatch, Table};

fn table() -> Table {
    let spec = |sni: Option<&str>, endpoint: Option<&str>, database: Option<&str>| RouteSpec {
        name: String::new(),
        listeners: None,
        server_name: sni.map(|s| ServerNameMatch::parse(s).unwrap()),
        endpoint: endpoint.map(|e| Endpoint::parse(e).unwrap()),
        database: database.map(str::to_owned),
        upstream: 0,
    };
    Table::new(vec![
        spec(Some("a.t.test"), None, None),
        spec(None, Some("e1"), None),
        spec(Some("*.t.test"), None, Some("d")),
        spec(Some("*.t.test"), None, None),
        spec(None, None, Some("d")),
    ])
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.splitn(3, '\n');
    let (sni, opts, db) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let Ok(split) = options::take_endpoint(opts) else {
        return;
    };
    assert_eq!(options::take_endpoint(&split.rest).ok().and_then(|s| s.endpoint), None);
    let endpoint = split.endpoint.as_deref().and_then(|e| Endpoint::parse(e).ok());
    let sni = sni.to_ascii_lowercase();
    let t = table();
    let query = Query {
        listener: "main",
        sni: (!sni.is_empty()).then_some(sni.as_str()),
        options_endpoint: endpoint.as_ref(),
        database: db,
    };
    if let Ok(routed) = t.lookup(&query) {
        assert!(routed.route.is_none_or(|i| i < t.routes().len()));
        if let Some(e) = routed.endpoint {
            assert!(e
                .as_str()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        }
    }
});
