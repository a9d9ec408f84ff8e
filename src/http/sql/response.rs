//! The JSON a `POST /sql` answers with, in Neon's shape: per query
//! `{"fields","command","rowCount","rows","rowAsArray"}`, a batch as
//! `{"results":[...]}`, and an error as `{"message","code","detail",...}`
//! with every field of the server's ErrorResponse. The body is built as
//! text with a running size, so a response over the limit is refused
//! before it is all in memory. Pure, no I/O.

use thiserror::Error;

use super::json::{self, JsonError};
use crate::protocol::message::MessageError;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ResponseError {
    /// The handler answers 507, as Neon's proxy does.
    #[error("response is too large (max is {0} bytes)")]
    TooLarge(usize),
    #[error("{0}")]
    Json(#[from] JsonError),
}

/// A column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub table_oid: u32,
    pub column_id: i16,
    pub type_oid: u32,
    pub type_size: i16,
    pub type_modifier: i32,
}

/// What one statement returned: its columns, its rows (text values, `None`
/// for NULL) and its CommandComplete tag (`None` for an empty query).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryResult {
    pub fields: Vec<Field>,
    pub rows: Vec<Vec<Option<String>>>,
    pub command_tag: Option<String>,
}

/// Splits a command tag as Neon's proxy does: the first word is the
/// command; the row count is the next word (the third for INSERT, after
/// the OID), `None` when it is absent or not a number ("CREATE TABLE").
pub fn command_and_count(tag: Option<&str>) -> (&str, Option<i64>) {
    let mut words = tag.unwrap_or_default().split(' ');
    let command = words.next().unwrap_or_default();
    let count = if command == "INSERT" {
        words.nth(1)
    } else {
        words.next()
    };
    (command, count.and_then(|c| c.parse().ok()))
}

/// Builds the success body: one query's object, or a batch's
/// `{"results":[...]}`.
#[derive(Debug)]
pub struct ResponseBuilder {
    out: String,
    raw_text_output: bool,
    default_array_mode: bool,
    max_bytes: usize,
    batch: bool,
    results: usize,
}

impl ResponseBuilder {
    /// `raw_text_output` and `default_array_mode` come from the request's
    /// `Options`; `batch` from its payload.
    pub fn new(
        raw_text_output: bool,
        default_array_mode: bool,
        batch: bool,
        max_bytes: usize,
    ) -> ResponseBuilder {
        ResponseBuilder {
            out: String::from(if batch { "{\"results\":[" } else { "" }),
            raw_text_output,
            default_array_mode,
            max_bytes,
            batch,
            results: 0,
        }
    }

    /// The body's size so far.
    pub fn len(&self) -> usize {
        self.out.len()
    }

    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// Adds one statement's result; `array_mode` is the query's own
    /// `arrayMode` (the header's when `None`). Fails as soon as the body
    /// passes `max_bytes`.
    pub fn push(
        &mut self,
        result: &QueryResult,
        array_mode: Option<bool>,
    ) -> Result<(), ResponseError> {
        let array_mode = array_mode.unwrap_or(self.default_array_mode);
        if self.results > 0 {
            self.out.push(',');
        }
        self.results += 1;
        self.out.push_str("{\"fields\":[");
        for (i, f) in result.fields.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.out.push_str("{\"name\":");
            json::write_string(&mut self.out, &f.name);
            self.out.push_str(&format!(
                ",\"dataTypeID\":{},\"tableID\":{},\"columnID\":{},\"dataTypeSize\":{},\"dataTypeModifier\":{},\"format\":\"text\"}}",
                f.type_oid, f.table_oid, f.column_id, f.type_size, f.type_modifier
            ));
        }
        self.out.push_str("],\"rows\":[");
        for (i, row) in result.rows.iter().enumerate() {
            self.check()?;
            if i > 0 {
                self.out.push(',');
            }
            self.row(&result.fields, row, array_mode)?;
        }
        let (command, count) = command_and_count(result.command_tag.as_deref());
        self.out.push_str("],\"command\":");
        json::write_string(&mut self.out, command);
        match count {
            Some(n) => self.out.push_str(&format!(",\"rowCount\":{n}")),
            None => self.out.push_str(",\"rowCount\":null"),
        }
        self.out
            .push_str(&format!(",\"rowAsArray\":{array_mode}}}"));
        self.check()
    }

    /// One row: an array, or an object keyed by column name. Duplicate
    /// names are written twice, as Neon's proxy does (a JSON parser then
    /// keeps the last).
    fn row(
        &mut self,
        fields: &[Field],
        row: &[Option<String>],
        array_mode: bool,
    ) -> Result<(), ResponseError> {
        self.out.push(if array_mode { '[' } else { '{' });
        for (i, value) in row.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            let field = fields.get(i);
            if !array_mode {
                json::write_string(&mut self.out, field.map_or("", |f| f.name.as_str()));
                self.out.push(':');
            }
            match value {
                None => self.out.push_str("null"),
                Some(text) if self.raw_text_output => json::write_string(&mut self.out, text),
                Some(text) => {
                    json::write_value(&mut self.out, text, field.map_or(0, |f| f.type_oid))?
                }
            }
        }
        self.out.push(if array_mode { ']' } else { '}' });
        Ok(())
    }

    fn check(&self) -> Result<(), ResponseError> {
        if self.out.len() > self.max_bytes {
            return Err(ResponseError::TooLarge(self.max_bytes));
        }
        Ok(())
    }

    /// The finished body.
    pub fn finish(mut self) -> String {
        if self.batch {
            self.out.push_str("]}");
        }
        self.out
    }
}

/// Every field of a server's ErrorResponse, by its protocol letter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerError {
    /// 'S' (localized); 'V' when 'S' is absent.
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    pub position: Option<String>,
    pub internal_position: Option<String>,
    pub internal_query: Option<String>,
    pub where_: Option<String>,
    pub schema: Option<String>,
    pub table: Option<String>,
    pub column: Option<String>,
    pub data_type: Option<String>,
    pub constraint: Option<String>,
    pub file: Option<String>,
    pub line: Option<String>,
    pub routine: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} ({})", self.severity, self.message, self.code)
    }
}

impl ServerError {
    /// Parses an ErrorResponse body (after the type byte and length).
    pub fn parse(body: &[u8]) -> Result<ServerError, MessageError> {
        let bad = MessageError::Malformed("ErrorResponse");
        let mut e = ServerError::default();
        let mut rest = body;
        loop {
            let (&t, after) = rest.split_first().ok_or(bad.clone())?;
            if t == 0 {
                return Ok(e);
            }
            let nul = after.iter().position(|&b| b == 0).ok_or(bad.clone())?;
            let value = String::from_utf8_lossy(&after[..nul]).into_owned();
            rest = &after[nul + 1..];
            let slot = match t {
                b'S' => {
                    e.severity = value;
                    continue;
                }
                b'V' => {
                    if e.severity.is_empty() {
                        e.severity = value;
                    }
                    continue;
                }
                b'C' => {
                    e.code = value;
                    continue;
                }
                b'M' => {
                    e.message = value;
                    continue;
                }
                b'D' => &mut e.detail,
                b'H' => &mut e.hint,
                b'P' => &mut e.position,
                b'p' => &mut e.internal_position,
                b'q' => &mut e.internal_query,
                b'W' => &mut e.where_,
                b's' => &mut e.schema,
                b't' => &mut e.table,
                b'c' => &mut e.column,
                b'd' => &mut e.data_type,
                b'n' => &mut e.constraint,
                b'F' => &mut e.file,
                b'L' => &mut e.line,
                b'R' => &mut e.routine,
                _ => continue,
            };
            *slot = Some(value);
        }
    }

    /// The error body Neon's proxy sends for a database error (HTTP 400).
    /// Like Neon's, an internal position shows only without a position.
    pub fn to_json(&self) -> String {
        let (internal_position, internal_query) = if self.position.is_some() {
            (None, None)
        } else {
            (
                self.internal_position.as_ref(),
                self.internal_query.as_ref(),
            )
        };
        let fields: [(&str, Option<&str>); 17] = [
            ("message", Some(self.message.as_str())),
            ("code", Some(self.code.as_str())),
            ("detail", self.detail.as_deref()),
            ("hint", self.hint.as_deref()),
            ("position", self.position.as_deref()),
            ("internalPosition", internal_position.map(String::as_str)),
            ("internalQuery", internal_query.map(String::as_str)),
            ("severity", Some(self.severity.as_str())),
            ("where", self.where_.as_deref()),
            ("table", self.table.as_deref()),
            ("column", self.column.as_deref()),
            ("schema", self.schema.as_deref()),
            ("dataType", self.data_type.as_deref()),
            ("constraint", self.constraint.as_deref()),
            ("file", self.file.as_deref()),
            ("line", self.line.as_deref()),
            ("routine", self.routine.as_deref()),
        ];
        object(&fields)
    }
}

/// The error body for an error of pgbastion's own (a bad request, a refused
/// login, a response too large): the message, the SQLSTATE if there is one
/// (Neon's proxy sends "" when there is none), the other fields null.
pub fn error_json(message: &str, code: Option<&str>) -> String {
    ServerError {
        message: message.to_owned(),
        code: code.unwrap_or_default().to_owned(),
        ..ServerError::default()
    }
    .to_json()
}

fn object(fields: &[(&str, Option<&str>)]) -> String {
    let mut out = String::from("{");
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        json::write_string(&mut out, key);
        out.push(':');
        match value {
            Some(v) => json::write_string(&mut out, v),
            None => out.push_str("null"),
        }
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn field(name: &str, type_oid: u32) -> Field {
        Field {
            name: name.into(),
            table_oid: 0,
            column_id: 0,
            type_oid,
            type_size: -1,
            type_modifier: -1,
        }
    }

    fn sample() -> QueryResult {
        QueryResult {
            fields: vec![field("a", 23), field("b", 25)],
            rows: vec![
                vec![Some("1".into()), Some("x".into())],
                vec![None, Some("y\"".into())],
            ],
            command_tag: Some("SELECT 2".into()),
        }
    }

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn command_tags() {
        assert_eq!(command_and_count(Some("SELECT 2")), ("SELECT", Some(2)));
        assert_eq!(command_and_count(Some("INSERT 0 3")), ("INSERT", Some(3)));
        assert_eq!(command_and_count(Some("UPDATE 0")), ("UPDATE", Some(0)));
        assert_eq!(command_and_count(Some("CREATE TABLE")), ("CREATE", None));
        assert_eq!(command_and_count(Some("BEGIN")), ("BEGIN", None));
        assert_eq!(command_and_count(None), ("", None));
    }

    #[test]
    fn single_object_mode() {
        let mut b = ResponseBuilder::new(false, false, false, 1 << 20);
        b.push(&sample(), None).unwrap();
        assert_eq!(
            parse(&b.finish()),
            json!({
                "fields": [
                    {"name":"a","dataTypeID":23,"tableID":0,"columnID":0,"dataTypeSize":-1,"dataTypeModifier":-1,"format":"text"},
                    {"name":"b","dataTypeID":25,"tableID":0,"columnID":0,"dataTypeSize":-1,"dataTypeModifier":-1,"format":"text"}
                ],
                "rows": [{"a":1,"b":"x"},{"a":null,"b":"y\""}],
                "command": "SELECT",
                "rowCount": 2,
                "rowAsArray": false
            })
        );
    }

    #[test]
    fn raw_array_mode_and_per_query_override() {
        let mut b = ResponseBuilder::new(true, true, false, 1 << 20);
        b.push(&sample(), None).unwrap();
        let v = parse(&b.finish());
        assert_eq!(v["rows"], json!([["1", "x"], [null, "y\""]]));
        assert_eq!(v["rowAsArray"], json!(true));
        let mut b = ResponseBuilder::new(true, true, false, 1 << 20);
        b.push(&sample(), Some(false)).unwrap();
        assert_eq!(parse(&b.finish())["rows"][0], json!({"a":"1","b":"x"}));
    }

    #[test]
    fn duplicate_names_written_twice() {
        let r = QueryResult {
            fields: vec![field("x", 25), field("x", 25)],
            rows: vec![vec![Some("1".into()), Some("2".into())]],
            command_tag: Some("SELECT 1".into()),
        };
        let mut b = ResponseBuilder::new(true, false, false, 1 << 20);
        b.push(&r, None).unwrap();
        let body = b.finish();
        assert!(body.contains(r#""rows":[{"x":"1","x":"2"}]"#), "{body}");
        assert_eq!(parse(&body)["rows"][0], json!({"x":"2"}));
    }

    #[test]
    fn batch_and_empty_query() {
        let mut b = ResponseBuilder::new(false, false, true, 1 << 20);
        b.push(&sample(), None).unwrap();
        b.push(&QueryResult::default(), Some(true)).unwrap();
        let v = parse(&b.finish());
        assert_eq!(v["results"].as_array().map(Vec::len), Some(2));
        assert_eq!(
            v["results"][1],
            json!({"fields":[],"rows":[],"command":"","rowCount":null,"rowAsArray":true})
        );
        let b = ResponseBuilder::new(false, false, true, 1 << 20);
        assert_eq!(parse(&b.finish()), json!({"results": []}));
    }

    #[test]
    fn size_limit_and_conversion_error() {
        let mut b = ResponseBuilder::new(false, false, false, 100);
        assert!(b.is_empty());
        let mut big = sample();
        big.rows = vec![vec![Some("1".into()), Some("z".repeat(200))]; 3];
        assert_eq!(b.push(&big, None), Err(ResponseError::TooLarge(100)));
        let mut b = ResponseBuilder::new(false, false, false, 1 << 20);
        let mut bad = sample();
        bad.rows[0][0] = Some("one".into());
        assert!(matches!(b.push(&bad, None), Err(ResponseError::Json(_))));
    }

    fn error_body(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (t, v) in fields {
            body.push(*t);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        body
    }

    #[test]
    fn server_error_all_fields() {
        let body = error_body(&[
            (b'S', "ERREUR"),
            (b'V', "ERROR"),
            (b'C', "23505"),
            (b'M', "duplicate key"),
            (b'D', "Key (id)=(1) exists."),
            (b'H', "hint"),
            (b'P', "8"),
            (b'W', "where"),
            (b's', "public"),
            (b't', "t"),
            (b'c', "id"),
            (b'd', "int4"),
            (b'n', "t_pkey"),
            (b'F', "nbtinsert.c"),
            (b'L', "666"),
            (b'R', "_bt_check_unique"),
            (b'Z', "unknown field"),
        ]);
        let e = ServerError::parse(&body).unwrap();
        assert_eq!(
            parse(&e.to_json()),
            json!({
                "message": "duplicate key", "code": "23505", "detail": "Key (id)=(1) exists.",
                "hint": "hint", "position": "8", "internalPosition": null, "internalQuery": null,
                "severity": "ERREUR", "where": "where", "table": "t", "column": "id",
                "schema": "public", "dataType": "int4", "constraint": "t_pkey",
                "file": "nbtinsert.c", "line": "666", "routine": "_bt_check_unique"
            })
        );
        let e = ServerError::parse(&error_body(&[
            (b'V', "ERROR"),
            (b'p', "3"),
            (b'q', "SELECT x"),
        ]))
        .unwrap();
        let v = parse(&e.to_json());
        assert_eq!(v["severity"], json!("ERROR"));
        assert_eq!(v["internalPosition"], json!("3"));
        assert_eq!(v["internalQuery"], json!("SELECT x"));
        assert!(ServerError::parse(b"Mno terminator").is_err());
        assert!(ServerError::parse(b"").is_err());
    }

    #[test]
    fn own_errors() {
        let v = parse(&error_json("Query cancelled", Some("08P01")));
        assert_eq!(v["message"], json!("Query cancelled"));
        assert_eq!(v["code"], json!("08P01"));
        assert_eq!(v["detail"], Value::Null);
        assert_eq!(parse(&error_json("bad \"x\"", None))["code"], json!(""));
    }
}
