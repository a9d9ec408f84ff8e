//! SQL over HTTP's inputs are a client's: the `Neon-Connection-String`
//! header, the `Neon-*` option headers and the JSON body. The input is
//! lines: the connection string, five header values (an empty line is an
//! absent header), then the body. Nothing may panic, and every value the
//! text-to-JSON conversion accepts comes out as valid JSON.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pgbastion::http::sql::body::parse_body;
use pgbastion::http::sql::response::Field;
use pgbastion::http::sql::{conninfo, json, request, QueryResult, ResponseBuilder};

/// bool, int2, int4, int8, text, float4, float8, numeric, json, jsonb,
/// and arrays of them.
const OIDS: &[u32] = &[
    16, 21, 23, 20, 25, 700, 701, 1700, 114, 3802, 1000, 1005, 1007, 1016, 1009, 1021, 1022, 1231,
    199, 3807,
];

/// Converts `text`; when that succeeds, what was written must be valid
/// JSON (by syntax: a number beyond f64 is valid and passed verbatim).
fn check(text: &str, oid: u32) {
    let mut out = String::new();
    if json::write_value(&mut out, text, oid).is_ok() {
        if let Err(e) = json::validate(&out) {
            panic!("{e}: {out}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(7, '\n');
    let mut next = || lines.next().unwrap_or("");
    let conn = next();
    if let Ok(info) = conninfo::parse(conn) {
        let _ = format!("{info:?}");
        let _ = info.startup_params();
    }
    let values: Vec<&str> = (0..5).map(|_| next()).collect();
    let names = [
        request::RAW_TEXT_OUTPUT,
        request::ARRAY_MODE,
        request::ISOLATION_LEVEL,
        request::READ_ONLY,
        request::DEFERRABLE,
    ];
    let options = request::Options::from_lookup(|name| {
        let i = names.iter().position(|n| *n == name)?;
        Some(values[i].as_bytes()).filter(|v| !v.is_empty())
    });
    let options = match options {
        Ok(o) => {
            let _ = o.begin_statement();
            o
        }
        Err(_) => request::Options::default(),
    };
    let body = next();
    for &oid in OIDS {
        check(body, oid);
    }
    let Ok(payload) = parse_body(body.as_bytes()) else {
        return;
    };
    let (queries, batch) = match payload {
        request::Payload::Single(q) => (vec![q], false),
        request::Payload::Batch(qs) => (qs, true),
    };
    let mut response =
        ResponseBuilder::new(options.raw_text_output, options.array_mode, batch, 1 << 20);
    for q in &queries {
        let fields: Vec<Field> = OIDS
            .iter()
            .map(|&oid| Field {
                name: q.text.chars().take(8).collect(),
                table_oid: 0,
                column_id: 0,
                type_oid: oid,
                type_size: -1,
                type_modifier: -1,
            })
            .collect();
        let mut rows = Vec::new();
        for p in q.params.iter().take(16) {
            if let Some(p) = p {
                check(p, 1009);
                check(p, 3807);
            }
            rows.push(vec![p.clone(); OIDS.len()]);
        }
        let result = QueryResult {
            fields,
            rows,
            command_tag: Some(q.text.clone()),
        };
        let _ = response.push(&result, q.array_mode);
    }
    let _ = response.finish();
});
