//! The table against its rules, and the indexed lookup against a plain
//! scan in file order (the definition of "first match wins") for any mix
//! of routes and connections.

use proptest::prelude::*;

use super::*;

fn route(name: &str) -> RouteSpec {
    RouteSpec {
        name: name.into(),
        listeners: None,
        server_name: None,
        endpoint: None,
        database: None,
        upstream: 0,
    }
}

fn sni(r: RouteSpec, s: &str) -> RouteSpec {
    RouteSpec {
        server_name: Some(ServerNameMatch::parse(s).unwrap()),
        ..r
    }
}

fn ep(s: &str) -> Endpoint {
    Endpoint::parse(s).unwrap()
}

fn q<'a>(sni: Option<&'a str>, options: Option<&'a Endpoint>, db: &'a str) -> Query<'a> {
    Query {
        listener: "main",
        sni,
        options_endpoint: options,
        database: db,
    }
}

fn lookup(t: &Table, query: &Query<'_>) -> (Option<String>, Option<String>) {
    let r = t.lookup(query).unwrap();
    (
        r.route.map(|i| t.routes()[i].name.clone()),
        r.endpoint.map(|e| e.as_str().to_owned()),
    )
}

fn tenants() -> Table {
    Table::new(vec![
        sni(route("orders"), "orders.db.test"),
        RouteSpec {
            database: Some("analytics".into()),
            ..route("analytics")
        },
        sni(route("tenants"), "*.tenants.test"),
        RouteSpec {
            endpoint: Some(ep("legacy")),
            ..route("legacy")
        },
    ])
}

#[test]
fn exact_names_wildcards_endpoints_and_databases_route() {
    let t = tenants();
    let some = |s| Some(String::from(s));
    assert_eq!(
        lookup(&t, &q(Some("orders.db.test"), None, "x")),
        (some("orders"), None)
    );
    assert_eq!(
        lookup(&t, &q(None, None, "analytics")),
        (some("analytics"), None)
    );
    assert_eq!(
        lookup(&t, &q(Some("t1.tenants.test"), None, "x")),
        (some("tenants"), some("t1"))
    );
    // No server name: the endpoint in options reaches the wildcard route.
    let t1 = ep("t1");
    assert_eq!(
        lookup(&t, &q(None, Some(&t1), "x")),
        (some("tenants"), some("t1"))
    );
    // Nothing routed: the listener's own upstream applies.
    assert_eq!(lookup(&t, &q(Some("other.test"), None, "x")), (None, None));
    assert_eq!(lookup(&t, &q(None, None, "x")), (None, None));
    // Two labels under the suffix are not one tenant.
    assert_eq!(
        lookup(&t, &q(Some("a.b.tenants.test"), None, "x")),
        (None, None)
    );
}

#[test]
fn the_first_route_in_file_order_wins_across_keys() {
    let t = tenants();
    // "analytics" (route 1) comes before the wildcard (route 2).
    assert_eq!(
        lookup(&t, &q(Some("t1.tenants.test"), None, "analytics"))
            .0
            .as_deref(),
        Some("analytics")
    );
    // "orders" (route 0) comes before "analytics".
    assert_eq!(
        lookup(&t, &q(Some("orders.db.test"), None, "analytics"))
            .0
            .as_deref(),
        Some("orders")
    );
    // The wildcard (route 2) takes endpoint "legacy" by name before the
    // endpoint route (route 3) could.
    let legacy = ep("legacy");
    assert_eq!(
        lookup(&t, &q(None, Some(&legacy), "x")).0.as_deref(),
        Some("tenants")
    );
}

#[test]
fn a_server_name_and_options_that_disagree_are_refused() {
    let t = tenants();
    let t2 = ep("t2");
    match t.lookup(&q(Some("t1.tenants.test"), Some(&t2), "x")) {
        Err(RouteError::EndpointConflict {
            from_sni,
            from_options,
            ..
        }) => assert_eq!((from_sni.as_str(), from_options.as_str()), ("t1", "t2")),
        other => panic!("{other:?}"),
    }
    // Agreeing is fine.
    let t1 = ep("t1");
    assert!(t
        .lookup(&q(Some("t1.tenants.test"), Some(&t1), "x"))
        .is_ok());
    // A server name outside every routed suffix names no endpoint, so the
    // options' endpoint stands alone.
    assert_eq!(
        lookup(&t, &q(Some("proxy.test"), Some(&t2), "x"))
            .1
            .as_deref(),
        Some("t2")
    );
}

#[test]
fn a_label_that_is_no_endpoint_is_refused() {
    let t = tenants();
    let long = format!("{}.tenants.test", "a".repeat(64));
    assert!(matches!(
        t.lookup(&q(Some(&long), None, "x")),
        Err(RouteError::BadEndpoint { .. })
    ));
}

#[test]
fn listeners_limit_a_route() {
    let t = Table::new(vec![
        RouteSpec {
            listeners: Some(vec!["other".into()]),
            ..route("other-only")
        },
        route("everyone"),
    ]);
    assert_eq!(
        lookup(&t, &q(None, None, "x")).0.as_deref(),
        Some("everyone")
    );
    let mut on_other = q(None, None, "x");
    on_other.listener = "other";
    assert_eq!(lookup(&t, &on_other).0.as_deref(), Some("other-only"));
}

#[test]
fn routes_an_earlier_one_hides_are_found() {
    let hidden = |routes: Vec<RouteSpec>| Table::new(routes).unreachable();
    // An exact name under an earlier wildcard.
    assert_eq!(
        hidden(vec![
            sni(route("w"), "*.t.test"),
            sni(route("a"), "a.t.test")
        ]),
        Some((1, 0))
    );
    // The same wildcard twice; a catch-all before anything.
    assert_eq!(
        hidden(vec![
            sni(route("w"), "*.t.test"),
            sni(route("w2"), "*.t.test")
        ]),
        Some((1, 0))
    );
    assert_eq!(
        hidden(vec![route("all"), sni(route("a"), "a.test")]),
        Some((1, 0))
    );
    // An exact name under a routed wildcard always carries its label as
    // the endpoint, so an earlier route for that endpoint takes it.
    assert_eq!(
        hidden(vec![
            RouteSpec {
                endpoint: Some(ep("x")),
                ..route("x")
            },
            sni(route("name"), "x.t.test"),
            sni(route("w"), "*.t.test"),
        ]),
        Some((1, 0))
    );
    // Narrower first is fine; a listener-limited route hides nothing
    // for other listeners.
    assert_eq!(
        hidden(vec![
            sni(route("a"), "a.t.test"),
            sni(route("w"), "*.t.test")
        ]),
        None
    );
    assert_eq!(
        hidden(vec![
            RouteSpec {
                listeners: Some(vec!["x".into()]),
                ..route("x-only")
            },
            route("all")
        ]),
        None
    );
    // A wildcard limited to a database hides only that database.
    let by_db = RouteSpec {
        database: Some("d".into()),
        ..sni(route("w"), "*.t.test")
    };
    assert_eq!(
        hidden(vec![by_db.clone(), sni(route("a"), "a.t.test")]),
        None
    );
    let same_db = RouteSpec {
        database: Some("d".into()),
        ..sni(route("a"), "a.t.test")
    };
    assert_eq!(hidden(vec![by_db, same_db]), Some((1, 0)));
}

#[test]
fn ten_thousand_routes_find_their_own() {
    let routes: Vec<RouteSpec> = (0..10_000)
        .map(|i| sni(route(&format!("r{i}")), &format!("db{i}.example.test")))
        .collect();
    let t = Table::new(routes);
    assert_eq!(t.unreachable(), None);
    for i in [0, 1, 4_999, 9_999] {
        let name = format!("db{i}.example.test");
        assert_eq!(
            lookup(&t, &q(Some(&name), None, "x")).0,
            Some(format!("r{i}"))
        );
    }
}

/// A plain scan in file order: what `lookup` must agree with.
fn scan(t: &Table, query: &Query<'_>) -> Result<Routed, RouteError> {
    let facts = t.facts(query)?;
    Ok(Routed {
        route: (0..t.routes().len()).find(|&i| t.matches(&t.routes()[i], &facts)),
        endpoint: facts.endpoint,
    })
}

fn any_route() -> impl Strategy<Value = RouteSpec> {
    let names = prop::option::of(prop::sample::select(vec![
        "a.t.test", "b.t.test", "*.t.test", "*.u.test", "a.u.test", "x.test",
    ]));
    let endpoints = prop::option::of(prop::sample::select(vec!["a", "b", "c"]));
    let dbs = prop::option::of(prop::sample::select(vec!["d1", "d2"]));
    let listeners = prop::option::of(prop::sample::select(vec!["main", "other"]));
    (names, endpoints, dbs, listeners).prop_map(|(n, e, d, l)| RouteSpec {
        name: String::new(),
        listeners: l.map(|l| vec![l.to_owned()]),
        server_name: n.map(|n| ServerNameMatch::parse(n).unwrap()),
        endpoint: e.map(ep),
        database: d.map(str::to_owned),
        upstream: 0,
    })
}

proptest! {
    #[test]
    fn the_index_agrees_with_a_scan_in_file_order(
        routes in prop::collection::vec(any_route(), 0..12),
        sni in prop::option::of(prop::sample::select(vec![
            "a.t.test", "b.t.test", "c.t.test", "a.u.test", "x.test", "t.test", "a.b.t.test",
        ])),
        options in prop::option::of(prop::sample::select(vec!["a", "b", "c"])),
        db in prop::sample::select(vec!["d1", "d2", "d3"]),
        listener in prop::sample::select(vec!["main", "other"]),
    ) {
        let t = Table::new(routes);
        let options = options.map(ep);
        let query = Query { listener, sni, options_endpoint: options.as_ref(), database: db };
        prop_assert_eq!(t.lookup(&query), scan(&t, &query));
        // A route reported unreachable is never the one a lookup picks.
        if let (Some((hidden, _)), Ok(r)) = (t.unreachable(), t.lookup(&query)) {
            prop_assert_ne!(r.route, Some(hidden));
        }
    }
}
