use super::*;
use serde_json::{json, Value};

/// One parameter through the whole parser.
fn p(v: Value) -> Option<String> {
    let body = json!({"query": "x", "params": [v]}).to_string();
    match parse_body(body.as_bytes()) {
        Ok(Payload::Single(mut q)) => q.params.remove(0),
        other => panic!("{other:?}"),
    }
}

fn p_raw(param: &str) -> Result<Option<String>, RequestError> {
    let body = format!(r#"{{"query":"x","params":[{param}]}}"#);
    match parse_body(body.as_bytes())? {
        Payload::Single(mut q) => Ok(q.params.remove(0)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn params_to_text() {
    assert_eq!(p(json!(null)), None);
    assert_eq!(p(json!(true)), Some("true".into()));
    assert_eq!(p(json!(42)), Some("42".into()));
    assert_eq!(p(json!(-1.5)), Some("-1.5".into()));
    assert_eq!(p(json!(u64::MAX)), Some(u64::MAX.to_string()));
    assert_eq!(p(json!("a\"b\\c")), Some("a\"b\\c".into()));
    assert_eq!(p(json!({"a": [1, "x"]})), Some(r#"{"a":[1,"x"]}"#.into()));
    assert_eq!(p(json!([])), Some("{}".into()));
    assert_eq!(
        p(json!([true, false, null, "NULL", 42, "foo", "bar\"-\\"])),
        Some(r#"{true,false,NULL,"NULL",42,"foo","bar\"-\\"}"#.into())
    );
    assert_eq!(
        p(json!([[true, false], [null, 42], ["foo", "bar\"-\\"]])),
        Some(r#"{{true,false},{NULL,42},{"foo","bar\"-\\"}}"#.into())
    );
    assert_eq!(
        p(json!([{"foo": 1}, {"bar": 2}])),
        Some(r#"{"{\"foo\":1}","{\"bar\":2}"}"#.into())
    );
    assert_eq!(
        p(json!(["a,b", "{x}", " ", "", "line\nbreak"])),
        Some("{\"a,b\",\"{x}\",\" \",\"\",\"line\nbreak\"}".into())
    );
    assert_eq!(p(json!([[], [[]]])), Some("{{},{{}}}".into()));
}

/// Objects reach Postgres as the client wrote them, minus whitespace:
/// key order and duplicates kept, strings re-escaped as JSON.
#[test]
fn objects_are_compacted_not_reordered() {
    assert_eq!(
        p_raw(r#"{ "b" : 1 , "a" : [ 1.5 , null , {"z": true} ], "b": "x\u0001\n" }"#),
        Ok(Some(
            r#"{"b":1,"a":[1.5,null,{"z":true}],"b":"x\u0001\n"}"#.into()
        ))
    );
    assert_eq!(p_raw("{}"), Ok(Some("{}".into())));
    assert_eq!(p_raw("[{}]"), Ok(Some(r#"{"{}"}"#.into())));
    // A string with escapes comes out unescaped, as the value it is.
    assert_eq!(p_raw(r#""\u00e9\t""#), Ok(Some("é\t".into())));
}

#[test]
fn param_depth_bound() {
    let mut v = json!(1);
    for _ in 0..MAX_PARAM_DEPTH {
        v = json!([v]);
    }
    assert!(p_raw(&v.to_string()).is_ok());
    let deeper = json!([v]).to_string();
    assert_eq!(
        p_raw(&deeper),
        Err(RequestError::TooDeep { index: 0, param: 0 })
    );
    // Past serde_json's own recursion limit: an error, not a stack overflow.
    let very = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(p_raw(&very).is_err());
    let objects = format!("{}{}", "{\"a\":".repeat(100_000), "}".repeat(100_000));
    assert!(p_raw(&objects).is_err());
}

#[test]
fn bodies() {
    let single = parse_body(br#"{"query":"SELECT $1","params":["x",null],"arrayMode":true}"#);
    assert_eq!(
        single,
        Ok(Payload::Single(Query {
            text: "SELECT $1".into(),
            params: vec![Some("x".into()), None],
            array_mode: Some(true),
        }))
    );
    let Ok(Payload::Single(q)) =
        parse_body(br#" {"query":"SELECT 1","extra":{"a":[1]},"params":null} "#)
    else {
        panic!("single");
    };
    assert!(q.params.is_empty() && q.array_mode.is_none());
    let batch = parse_body(
        br#"{"queries":[{"query":"SELECT 1"},{"query":"SELECT $1","params":[1],"arrayMode":false,"x":1}]}"#,
    );
    let Ok(Payload::Batch(qs)) = batch else {
        panic!("batch");
    };
    assert_eq!(qs.len(), 2);
    assert_eq!(qs[1].params, vec![Some("1".to_owned())]);
    assert_eq!(qs[1].array_mode, Some(false));
    assert_eq!(parse_body(br#"{"queries":[]}"#), Ok(Payload::Batch(vec![])));
    // `query` wins over `queries`.
    let both = parse_body(br#"{"queries":[{"query":"B"}],"query":"A"}"#);
    assert!(matches!(both, Ok(Payload::Single(q)) if q.text == "A"));
}

#[test]
fn bad_bodies() {
    let cases: &[&[u8]] = &[
        b"",
        b"not json",
        b"{",
        br#"{"query":"x"} trailing"#,
        br#"{"query":1}"#,
        br#"{"query":"x","params":"y"}"#,
        br#"{"query":"x","params":{}}"#,
        br#"{"query":"x","arrayMode":"yes"}"#,
        br#"{"queries":{}}"#,
        br#"{"queries":[1]}"#,
        br#"{"queries":[{"params":[]}]}"#,
        br#"{"query":"x","query":"y"}"#,
        br#"{"query":"x","params":[],"params":[]}"#,
        br#"{"queries":[],"queries":[]}"#,
        br#"{"queries":[{"query":"x","arrayMode":true,"arrayMode":true}]}"#,
        br#"{"query":"x","params":[1,]}"#,
        b"{\"query\":\"x\",\"params\":[\"\xff\"]}",
    ];
    for body in cases {
        let e = parse_body(body).unwrap_err();
        assert!(
            matches!(e, RequestError::Json(_) | RequestError::BadQuery(_)),
            "{}: {e:?}",
            String::from_utf8_lossy(body)
        );
    }
    for body in [&b"[]"[..], b"{}", b"1", b"\"x\"", b" null "] {
        assert_eq!(parse_body(body), Err(RequestError::BadShape));
    }
    assert_eq!(
        parse_body(b"{\"query\":\"SELECT 1\\u0000\"}"),
        Err(RequestError::NulInQuery(0))
    );
    assert_eq!(
        parse_body(b"{\"queries\":[{\"query\":\"1\"},{\"query\":\"\\u0000\"}]}"),
        Err(RequestError::NulInQuery(1))
    );
}

#[test]
fn parameter_and_batch_bounds() {
    let many = format!(r#"{{"query":"x","params":[{}0]}}"#, "0,".repeat(MAX_PARAMS));
    assert_eq!(
        parse_body(many.as_bytes()),
        Err(RequestError::TooManyParams { index: 0 })
    );
    let ok = format!(
        r#"{{"query":"x","params":[{}0]}}"#,
        "0,".repeat(MAX_PARAMS - 1)
    );
    assert!(parse_body(ok.as_bytes()).is_ok());
    // Over the whole request, across a batch.
    let per_query = 50_000;
    let query = format!(
        r#"{{"query":"x","params":[{}0]}}"#,
        "0,".repeat(per_query - 1)
    );
    let fits = vec![query.as_str(); MAX_REQUEST_PARAMS / per_query].join(",");
    assert!(parse_body(format!(r#"{{"queries":[{fits}]}}"#).as_bytes()).is_ok());
    let over = format!(r#"{{"queries":[{fits},{{"query":"x","params":[1]}}]}}"#);
    assert_eq!(
        parse_body(over.as_bytes()),
        Err(RequestError::TooManyRequestParams)
    );
    let queries = vec![r#"{"query":"x"}"#; MAX_BATCH_QUERIES].join(",");
    assert!(parse_body(format!(r#"{{"queries":[{queries}]}}"#).as_bytes()).is_ok());
    let over = format!(r#"{{"queries":[{queries},{{"query":"x"}}]}}"#);
    assert_eq!(
        parse_body(over.as_bytes()),
        Err(RequestError::TooManyQueries)
    );
}
