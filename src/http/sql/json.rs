//! Postgres text values as JSON, by type OID, when raw text output is off
//! (as Neon's proxy does it): booleans, int2/int4 and finite floats as JSON
//! booleans and numbers, json/jsonb as they are, arrays of those as JSON
//! arrays (parsed from Postgres's `{...}` text), everything else a string.
//! int8 and numeric stay strings: a JSON number would lose digits in
//! JavaScript.
//!
//! Values are written as JSON text into the response being built rather
//! than through `serde_json::Value`, so json/jsonb keep their key order,
//! duplicate keys and exact numbers. Pure, no I/O; malformed text is a
//! typed error, never a panic.

use thiserror::Error;

/// How deep `{...}` may nest in an array value (Postgres allows 6).
const MAX_ARRAY_DEPTH: usize = 32;

const BOOL: u32 = 16;
const INT2: u32 = 21;
const INT4: u32 = 23;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const JSON: u32 = 114;
const JSONB: u32 = 3802;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum JsonError {
    #[error("could not parse postgres response: {0:?} is not an integer")]
    Int(String),
    #[error("could not parse postgres response: {0:?} is not a number")]
    Float(String),
    #[error("could not parse postgres response: a json value is not valid JSON: {0}")]
    Json(String),
    #[error("could not parse postgres response: unbalanced array")]
    UnbalancedArray,
    #[error("could not parse postgres response: unbalanced quoted string in an array")]
    UnbalancedString,
    #[error("could not parse postgres response: arrays nest too deep")]
    TooDeep,
}

/// The element type of the built-in array types (the array OIDs of
/// `pg_type`). int2vector and oidvector are left out: their text is
/// space-separated, not `{...}`, so they stay strings.
fn array_element(oid: u32) -> Option<u32> {
    const ARRAYS: &[(u32, u32)] = &[
        (143, 142),
        (199, 114),
        (271, 5069),
        (629, 628),
        (651, 650),
        (719, 718),
        (775, 774),
        (791, 790),
        (1000, 16),
        (1001, 17),
        (1002, 18),
        (1003, 19),
        (1005, 21),
        (1006, 22),
        (1007, 23),
        (1008, 24),
        (1009, 25),
        (1010, 27),
        (1011, 28),
        (1012, 29),
        (1013, 30),
        (1014, 1042),
        (1015, 1043),
        (1016, 20),
        (1017, 600),
        (1018, 601),
        (1019, 602),
        (1020, 603),
        (1021, 700),
        (1022, 701),
        (1027, 604),
        (1028, 26),
        (1034, 1033),
        (1040, 829),
        (1041, 869),
        (1115, 1114),
        (1182, 1082),
        (1183, 1083),
        (1185, 1184),
        (1187, 1186),
        (1231, 1700),
        (1263, 2275),
        (1270, 1266),
        (1561, 1560),
        (1563, 1562),
        (2201, 1790),
        (2207, 2202),
        (2208, 2203),
        (2209, 2204),
        (2210, 2205),
        (2211, 2206),
        (2949, 2970),
        (2951, 2950),
        (3221, 3220),
        (3643, 3614),
        (3644, 3642),
        (3645, 3615),
        (3735, 3734),
        (3770, 3769),
        (3807, 3802),
        (3905, 3904),
        (3907, 3906),
        (3909, 3908),
        (3911, 3910),
        (3913, 3912),
        (3927, 3926),
        (4073, 4072),
        (4090, 4089),
        (4097, 4096),
        (4192, 4191),
        (5039, 5038),
        (6150, 4451),
        (6151, 4532),
        (6152, 4533),
        (6153, 4534),
        (6155, 4535),
        (6157, 4536),
    ];
    ARRAYS
        .binary_search_by_key(&oid, |&(array, _)| array)
        .ok()
        .map(|i| ARRAYS[i].1)
}

/// Appends the JSON for one non-NULL value of type `type_oid`. On an error
/// `out` may hold part of the value: the caller drops the response.
pub fn write_value(out: &mut String, text: &str, type_oid: u32) -> Result<(), JsonError> {
    match array_element(type_oid) {
        Some(element) => write_array(out, text, element),
        None => write_scalar(out, text, type_oid),
    }
}

/// The same value as a `serde_json::Value` (for tests and callers that
/// want one; json objects lose their key order).
pub fn to_value(text: &str, type_oid: u32) -> Result<serde_json::Value, JsonError> {
    let mut out = String::new();
    write_value(&mut out, text, type_oid)?;
    serde_json::from_str(&out).map_err(|e| JsonError::Json(e.to_string()))
}

/// Whether `text` is one JSON value, by syntax alone. Skipping a value is
/// not recursive in serde_json, so any depth Postgres stores passes, and
/// numbers are not converted, so `1e999` (which Postgres's `json` type
/// keeps as written) passes too: it is valid JSON, only too large for an
/// f64, and is sent exactly as the server gave it.
pub fn validate(text: &str) -> Result<(), JsonError> {
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(|_| ())
        .map_err(|e| JsonError::Json(e.to_string()))
}

/// Appends `s` as a JSON string.
pub fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_scalar(out: &mut String, text: &str, type_oid: u32) -> Result<(), JsonError> {
    match type_oid {
        BOOL => out.push_str(if text == "t" { "true" } else { "false" }),
        INT2 | INT4 => {
            let n: i32 = text.parse().map_err(|_| JsonError::Int(text.to_owned()))?;
            out.push_str(&n.to_string());
        }
        FLOAT4 | FLOAT8 => {
            let f: f64 = text
                .parse()
                .map_err(|_| JsonError::Float(text.to_owned()))?;
            match serde_json::Number::from_f64(f) {
                Some(n) => out.push_str(&n.to_string()),
                // NaN and the infinities: strings, as JSON has no such numbers.
                None => write_string(out, text),
            }
        }
        JSON | JSONB => {
            validate(text)?;
            out.push_str(text.trim());
        }
        _ => write_string(out, text),
    }
    Ok(())
}

/// An array value: optional bounds decoration (`[1:2]={...}`, dropped as
/// JSON cannot say it), then `{...}` with nothing after it.
fn write_array(out: &mut String, text: &str, element: u32) -> Result<(), JsonError> {
    let mut rest = text;
    if rest.starts_with('[') {
        rest = rest.split_once('=').ok_or(JsonError::UnbalancedArray)?.1;
    }
    let rest = array(out, rest.trim_start(), element, 0)?;
    if !rest.is_empty() {
        return Err(JsonError::UnbalancedArray);
    }
    Ok(())
}

/// One `{...}` (nested ones by recursion); returns what follows it, with
/// leading whitespace skipped. The delimiter is ',' for every built-in
/// type but box (';'), which Neon's proxy also reads with ','.
fn array<'a>(
    out: &mut String,
    text: &'a str,
    element: u32,
    depth: usize,
) -> Result<&'a str, JsonError> {
    if depth >= MAX_ARRAY_DEPTH {
        return Err(JsonError::TooDeep);
    }
    let mut rest = text.strip_prefix('{').ok_or(JsonError::UnbalancedArray)?;
    out.push('[');
    if let Some(after) = rest.trim_start().strip_prefix('}') {
        out.push(']');
        return Ok(after.trim_start());
    }
    let mut first = true;
    loop {
        if !first {
            out.push(',');
        }
        first = false;
        rest = item(out, rest.trim_start(), element, depth)?;
        match rest.strip_prefix(',') {
            Some(next) => rest = next,
            None => break,
        }
    }
    let after = rest.strip_prefix('}').ok_or(JsonError::UnbalancedArray)?;
    out.push(']');
    Ok(after.trim_start())
}

/// One element: a nested array, a quoted string, or bare text up to the
/// next ',' or '}' (`NULL` bare is null; quoted it is the string).
fn item<'a>(
    out: &mut String,
    text: &'a str,
    element: u32,
    depth: usize,
) -> Result<&'a str, JsonError> {
    if text.starts_with('{') {
        return array(out, text, element, depth + 1);
    }
    if let Some(quoted) = text.strip_prefix('"') {
        let (value, rest) = unquote(quoted)?;
        write_scalar(out, &value, element)?;
        return Ok(rest.trim_start());
    }
    let end = text.find([',', '}']).ok_or(JsonError::UnbalancedArray)?;
    let (value, rest) = text.split_at(end);
    match value.trim_end() {
        "NULL" => out.push_str("null"),
        value => write_scalar(out, value, element)?,
    }
    Ok(rest)
}

/// Reads a quoted element after its opening '"': the text with backslash
/// escapes undone, and what follows the closing '"'.
fn unquote(text: &str) -> Result<(String, &str), JsonError> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &text[i + 1..])),
            '\\' => {
                let (_, escaped) = chars.next().ok_or(JsonError::UnbalancedString)?;
                value.push(escaped);
            }
            c => value.push(c),
        }
    }
    Err(JsonError::UnbalancedString)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn v(text: &str, oid: u32) -> Value {
        to_value(text, oid).unwrap_or_else(|e| panic!("{text:?} ({oid}): {e}"))
    }

    #[test]
    fn scalars() {
        assert_eq!(v("foo", 25), json!("foo"));
        assert_eq!(v("t", BOOL), json!(true));
        assert_eq!(v("f", BOOL), json!(false));
        assert_eq!(v("42", INT2), json!(42));
        assert_eq!(v("-2147483648", INT4), json!(-2147483648i64));
        assert_eq!(v("42", 20), json!("42"));
        assert_eq!(v("1.50", 1700), json!("1.50"));
        assert_eq!(v("42.42", FLOAT8), json!(42.42));
        assert_eq!(v("1e300", FLOAT8), json!(1e300));
        assert_eq!(v("42.42", FLOAT4), json!(42.42));
        for s in ["NaN", "Infinity", "-Infinity"] {
            assert_eq!(v(s, FLOAT4), json!(s));
            assert_eq!(v(s, FLOAT8), json!(s));
        }
        assert_eq!(v("2024-01-01", 1082), json!("2024-01-01"));
        assert_eq!(v("a\"b\\c\n\u{1}", 25), json!("a\"b\\c\n\u{1}"));
        assert_eq!(v("1 2 3", 22), json!("1 2 3"));
        assert_eq!(v("{1,2}", 999_999), json!("{1,2}"));
    }

    #[test]
    fn json_kept_as_written() {
        // Deeper than serde_json's recursion limit: checked without
        // recursion, and passed through.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let mut out = String::new();
        write_value(&mut out, &deep, JSON).unwrap();
        assert_eq!(out, deep);
        let mut out = String::new();
        write_value(&mut out, r#"{"b":1, "a":[null,3,"x"], "b":2}"#, JSONB).unwrap();
        assert_eq!(out, r#"{"b":1, "a":[null,3,"x"], "b":2}"#);
        assert_eq!(
            v("123456789012345678901234567890", JSON),
            json!(1.2345678901234568e29)
        );
        let mut out = String::new();
        write_value(&mut out, "123456789012345678901234567890", JSON).unwrap();
        assert_eq!(out, "123456789012345678901234567890");
    }

    #[test]
    fn scalar_errors() {
        assert!(matches!(to_value("x", INT4), Err(JsonError::Int(_))));
        assert!(matches!(
            to_value("99999999999", INT4),
            Err(JsonError::Int(_))
        ));
        assert!(matches!(to_value("", FLOAT8), Err(JsonError::Float(_))));
        assert!(matches!(to_value("{", JSONB), Err(JsonError::Json(_))));
        assert!(matches!(to_value("1 2", JSON), Err(JsonError::Json(_))));
    }

    /// A fuzz finding: `json` keeps numbers as written, so one beyond f64
    /// is passed on verbatim (valid JSON) rather than refused or rounded.
    #[test]
    fn json_numbers_beyond_f64_pass_verbatim() {
        for text in ["55e55555555555555555", "[1e999, -1e999]", " 1E400 "] {
            let mut out = String::new();
            write_value(&mut out, text, JSON).unwrap();
            assert_eq!(out, text.trim());
            assert_eq!(validate(&out), Ok(()));
        }
        assert!(validate("1e").is_err());
    }

    #[test]
    fn arrays() {
        assert_eq!(v("{}", 1009), json!([]));
        assert_eq!(v("{}", 1007), json!([]));
        assert_eq!(v("{1,2,3}", 1007), json!([1, 2, 3]));
        assert_eq!(v("{1,2,3}", 1016), json!(["1", "2", "3"]));
        assert_eq!(v("{t,f,NULL}", 1000), json!([true, false, null]));
        assert_eq!(
            v("{1.5,NaN,-Infinity}", 1022),
            json!([1.5, "NaN", "-Infinity"])
        );
        assert_eq!(
            v(r#"{"aa\"\\\,a",cha,"bbbb"}"#, 1009),
            json!(["aa\"\\,a", "cha", "bbbb"])
        );
        assert_eq!(v(r#"{"NULL",NULL,""}"#, 1009), json!(["NULL", null, ""]));
        assert_eq!(
            v(r#"{{"1",2,3},{4,NULL,6}}"#, 1009),
            json!([["1", "2", "3"], ["4", null, "6"]])
        );
        assert_eq!(v("{{{{a}}}}", 1009), json!([[[["a"]]]]));
        assert_eq!(
            v("[1:1][-2:-1]={{1,2},{3,4}}", 1005),
            json!([[1, 2], [3, 4]])
        );
        assert_eq!(v("  { a , b }  ", 1009), json!(["a", "b"]));
        assert_eq!(v(r#"{"{}"}"#, 3807), json!([{}]));
        assert_eq!(
            v(r#"{"{\"foo\": 1}", "{\"bar\": [2]}"}"#, 3807),
            json!([{"foo": 1}, {"bar": [2]}])
        );
        assert_eq!(v(r#"{{"{\"a\":1}"}}"#, 199), json!([[{"a": 1}]]));
        assert_eq!(v(r#"{"x\"y"}"#, 1009), json!(["x\"y"]));
    }

    #[test]
    fn malformed_arrays() {
        let cases = [
            ("", JsonError::UnbalancedArray),
            ("1,2", JsonError::UnbalancedArray),
            ("{1,2", JsonError::UnbalancedArray),
            ("{1,2}}", JsonError::UnbalancedArray),
            ("{1,2} x", JsonError::UnbalancedArray),
            ("[1:2]{1,2}", JsonError::UnbalancedArray),
            ("{\"abc", JsonError::UnbalancedString),
            ("{\"abc\\", JsonError::UnbalancedString),
            ("{\"a\"b}", JsonError::UnbalancedArray),
            ("{{1},2", JsonError::UnbalancedArray),
        ];
        for (text, want) in cases {
            assert_eq!(to_value(text, 1009), Err(want), "{text:?}");
        }
        assert!(matches!(to_value("{x}", 1007), Err(JsonError::Int(_))));
        assert!(matches!(to_value("{\"{\"}", 3807), Err(JsonError::Json(_))));
        let deep = format!("{}1{}", "{".repeat(40), "}".repeat(40));
        assert_eq!(to_value(&deep, 1007), Err(JsonError::TooDeep));
    }
}
