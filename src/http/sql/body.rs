//! The JSON body of `POST /sql`: one query (`{"query", "params",
//! "arrayMode"}`) or a batch (`{"queries": [...]}`), read straight from the
//! bytes into `Payload` with each parameter turned into the Postgres text
//! the extended protocol sends. Pure, no I/O.
//!
//! Why not `serde_json::Value` first: a `Value` costs 32 bytes and more per
//! JSON element, so a 10 MiB body of `[[],[],...]` grew to some 60 times its
//! size before a single check ran. Here nothing is built but the result:
//! strings once, array parameters written directly as Postgres array
//! literals, object parameters re-written compactly as JSON text. What
//! remains per parameter (a `String` and its allocation) is bounded by
//! `MAX_REQUEST_PARAMS` per request, and a batch by `MAX_BATCH_QUERIES`.
//!
//! The conversion follows Neon's proxy (null is NULL, strings as they are,
//! numbers and booleans as their JSON text, arrays as Postgres array
//! literals, objects as JSON text), so the same request means the same on
//! both. Two deliberate differences: array elements are quoted the way
//! Postgres's array input wants (Neon escapes them as JSON, which Postgres
//! reads differently for control characters), and an object keeps the
//! client's key order and duplicates (it reaches Postgres as written, only
//! without insignificant whitespace).

use std::cell::{Cell, RefCell};
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::request::{
    Payload, Query, RequestError, MAX_BATCH_QUERIES, MAX_PARAMS, MAX_PARAM_DEPTH,
    MAX_REQUEST_PARAMS,
};

/// Parses the JSON body. As in Neon's proxy, an object with `query` is one
/// query (even if it also has `queries`), and unknown keys are ignored; a
/// key given twice is refused (which one would count is a guess).
pub fn parse_body(body: &[u8]) -> Result<Payload, RequestError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        // Not an object: say whether it is JSON at all, without keeping it.
        return match serde_json::from_slice::<IgnoredAny>(body) {
            Ok(_) => Err(RequestError::BadShape),
            Err(e) => Err(RequestError::Json(e.to_string())),
        };
    }
    let ctx = Ctx {
        params_left: Cell::new(MAX_REQUEST_PARAMS),
        failure: RefCell::new(None),
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = BodySeed(&ctx)
        .deserialize(&mut de)
        .and_then(|fields| de.end().map(|()| fields));
    // A check of ours that failed inside the parser says it best.
    if let Some(failure) = ctx.failure.into_inner() {
        return Err(failure);
    }
    let Body { single, queries } = parsed.map_err(|e| RequestError::Json(e.to_string()))?;
    match (single.text.is_some(), queries) {
        (true, _) => single.finish(0).map(Payload::Single),
        (false, Some(queries)) => Ok(Payload::Batch(queries)),
        (false, None) => Err(RequestError::BadShape),
    }
}

/// What the parse shares across its nested parts: the parameter budget,
/// and the typed reason it stopped, if it was one of ours.
struct Ctx {
    params_left: Cell<usize>,
    failure: RefCell<Option<RequestError>>,
}

impl Ctx {
    /// Records `failure` and returns the error that stops the parser.
    fn fail<E: de::Error>(&self, failure: RequestError) -> E {
        let message = failure.to_string();
        self.failure.borrow_mut().get_or_insert(failure);
        E::custom(message)
    }

    fn take_param<E: de::Error>(&self) -> Result<(), E> {
        let left = self
            .params_left
            .get()
            .checked_sub(1)
            .ok_or_else(|| self.fail(RequestError::TooManyRequestParams))?;
        self.params_left.set(left);
        Ok(())
    }
}

/// The top-level object: a single query's fields and/or a batch.
struct Body {
    single: Fields,
    queries: Option<Vec<Query>>,
}

/// One query's fields as read, before the checks that need all of them.
#[derive(Default)]
struct Fields {
    text: Option<String>,
    params: Option<Vec<Option<String>>>,
    array_mode: Option<bool>,
}

impl Fields {
    /// Reads the value of `key` if it is one of a query's; false if not.
    fn read<'de, A: MapAccess<'de>>(
        &mut self,
        key: &str,
        map: &mut A,
        ctx: &Ctx,
        index: usize,
    ) -> Result<bool, A::Error> {
        let duplicate = || de::Error::custom(format_args!("query {index}: {key:?} given twice"));
        let given = match key {
            "query" => self.text.is_some(),
            "params" => self.params.is_some(),
            "arrayMode" => self.array_mode.is_some(),
            _ => return Ok(false),
        };
        if given {
            return Err(duplicate());
        }
        match key {
            "query" => self.text = Some(map.next_value()?),
            "params" => self.params = Some(map.next_value_seed(ParamsSeed { ctx, index })?),
            _ => self.array_mode = map.next_value()?,
        }
        Ok(true)
    }

    fn finish(self, index: usize) -> Result<Query, RequestError> {
        let text = self.text.ok_or_else(|| {
            RequestError::BadQuery(format!("query {index}: \"query\" is missing"))
        })?;
        if text.contains('\0') {
            return Err(RequestError::NulInQuery(index));
        }
        Ok(Query {
            text,
            params: self.params.unwrap_or_default(),
            array_mode: self.array_mode,
        })
    }
}

struct BodySeed<'c>(&'c Ctx);

impl<'de> DeserializeSeed<'de> for BodySeed<'_> {
    type Value = Body;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Body, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for BodySeed<'_> {
    type Value = Body;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object with \"query\" (one query) or \"queries\" (a batch)")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Body, A::Error> {
        let mut single = Fields::default();
        let mut queries = None;
        while let Some(key) = map.next_key::<String>()? {
            if single.read(&key, &mut map, self.0, 0)? {
                continue;
            }
            if key != "queries" {
                map.next_value::<IgnoredAny>()?;
            } else if queries.is_some() {
                return Err(de::Error::custom("\"queries\" given twice"));
            } else {
                queries = Some(map.next_value_seed(QueriesSeed(self.0))?);
            }
        }
        Ok(Body { single, queries })
    }
}

/// `queries`: an array of query objects, at most `MAX_BATCH_QUERIES`.
struct QueriesSeed<'c>(&'c Ctx);

impl<'de> DeserializeSeed<'de> for QueriesSeed<'_> {
    type Value = Vec<Query>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<Query>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for QueriesSeed<'_> {
    type Value = Vec<Query>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("\"queries\" to be an array")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Query>, A::Error> {
        let mut out = Vec::new();
        loop {
            let index = out.len();
            let Some(fields) = seq.next_element_seed(QuerySeed { ctx: self.0, index })? else {
                return Ok(out);
            };
            if index == MAX_BATCH_QUERIES {
                return Err(self.0.fail(RequestError::TooManyQueries));
            }
            out.push(fields.finish(index).map_err(|e| self.0.fail(e))?);
        }
    }
}

/// One entry of `queries`.
struct QuerySeed<'c> {
    ctx: &'c Ctx,
    index: usize,
}

impl<'de> DeserializeSeed<'de> for QuerySeed<'_> {
    type Value = Fields;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Fields, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for QuerySeed<'_> {
    type Value = Fields;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "query {}: an object with \"query\"", self.index)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let mut fields = Fields::default();
        while let Some(key) = map.next_key::<String>()? {
            if !fields.read(&key, &mut map, self.ctx, self.index)? {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(fields)
    }
}

/// `params`: null or an array of at most `MAX_PARAMS` values.
struct ParamsSeed<'c> {
    ctx: &'c Ctx,
    index: usize,
}

impl<'de> DeserializeSeed<'de> for ParamsSeed<'_> {
    type Value = Vec<Option<String>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ParamsSeed<'_> {
    type Value = Vec<Option<String>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "query {}: \"params\" to be an array", self.index)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        loop {
            let param = out.len();
            if param == MAX_PARAMS {
                // One more is one too many; none more is fine.
                return match seq.next_element::<IgnoredAny>()? {
                    None => Ok(out),
                    Some(_) => Err(self
                        .ctx
                        .fail(RequestError::TooManyParams { index: self.index })),
                };
            }
            let seed = ParamSeed {
                ctx: self.ctx,
                index: self.index,
                param,
            };
            match seq.next_element_seed(seed)? {
                Some(text) => out.push(text),
                None => return Ok(out),
            }
        }
    }
}

/// One parameter, as Postgres text (`None`: NULL).
struct ParamSeed<'c> {
    ctx: &'c Ctx,
    index: usize,
    param: usize,
}

impl<'de> DeserializeSeed<'de> for ParamSeed<'_> {
    type Value = Option<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.ctx.take_param()?;
        let mut out = String::new();
        let written = d.deserialize_any(Param {
            out: &mut out,
            at: &self,
        })?;
        Ok(written.then_some(out))
    }
}

impl ParamSeed<'_> {
    /// Fails the body: this parameter's arrays nest too deep.
    fn too_deep<E: de::Error>(&self) -> E {
        self.ctx.fail(RequestError::TooDeep {
            index: self.index,
            param: self.param,
        })
    }
}

/// A visitor's booleans and numbers: their JSON text appended to the
/// visitor's `$field` (a `&mut String`), and `$done` its value.
macro_rules! json_scalars {
    ($field:tt => $done:expr) => {
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            json_text(self.$field, v).map(|()| $done)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            json_text(self.$field, v).map(|()| $done)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            json_text(self.$field, v).map(|()| $done)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            json_text(self.$field, v).map(|()| $done)
        }
    };
}

/// A top-level parameter: scalars as their text, arrays as a literal.
/// The value is false for NULL, true when text was written.
struct Param<'o, 'c> {
    out: &'o mut String,
    at: &'o ParamSeed<'c>,
}

impl<'de> Visitor<'de> for Param<'_, '_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    json_scalars!(out => true);
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        self.out.push_str(v);
        Ok(true)
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<bool, E> {
        *self.out = v;
        Ok(true)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<bool, A::Error> {
        let element = Element {
            out: self.out,
            depth: 0,
            at: self.at,
        };
        element.visit_seq(seq)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<bool, A::Error> {
        Compact(self.out).visit_map(map).map(|()| true)
    }
}

/// A value's JSON text, as serde_json writes it (for a number, what
/// Neon's proxy sends).
fn json_text<E: de::Error>(out: &mut String, v: impl serde::Serialize) -> Result<(), E> {
    out.push_str(&serde_json::to_string(&v).map_err(E::custom)?);
    Ok(())
}

/// An element of a Postgres array literal, `depth` arrays in. The value
/// is always true (text was written: NULL is spelled out).
struct Element<'o, 'c> {
    out: &'o mut String,
    depth: usize,
    at: &'o ParamSeed<'c>,
}

impl<'de> DeserializeSeed<'de> for Element<'_, '_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Element<'_, '_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        self.out.push_str("NULL");
        Ok(true)
    }
    json_scalars!(out => true);
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        quote_element(v, self.out);
        Ok(true)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        if self.depth >= MAX_PARAM_DEPTH {
            return Err(self.at.too_deep());
        }
        self.out.push('{');
        let mut first = true;
        loop {
            let mark = self.out.len();
            if !first {
                self.out.push(',');
            }
            let element = Element {
                out: &mut *self.out,
                depth: self.depth + 1,
                at: self.at,
            };
            if seq.next_element_seed(element)?.is_none() {
                self.out.truncate(mark);
                break;
            }
            first = false;
        }
        self.out.push('}');
        Ok(true)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<bool, A::Error> {
        let mut object = String::new();
        Compact(&mut object).visit_map(map)?;
        quote_element(&object, self.out);
        Ok(true)
    }
}

/// A double-quoted array element: only '"' and '\' need a backslash.
fn quote_element(s: &str, out: &mut String) {
    out.reserve(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Any JSON value, re-written as compact JSON text.
struct Compact<'o>(&'o mut String);

impl<'de> DeserializeSeed<'de> for Compact<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Compact<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.push_str("null");
        Ok(())
    }
    json_scalars!(0 => ());
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        json_text(self.0, v)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.0.push('[');
        let mut first = true;
        loop {
            let mark = self.0.len();
            if !first {
                self.0.push(',');
            }
            if seq.next_element_seed(Compact(&mut *self.0))?.is_none() {
                self.0.truncate(mark);
                break;
            }
            first = false;
        }
        self.0.push(']');
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.0.push('{');
        let mut first = true;
        while let Some(key) = map.next_key::<String>()? {
            if !first {
                self.0.push(',');
            }
            first = false;
            json_text(self.0, &key)?;
            self.0.push(':');
            map.next_value_seed(Compact(&mut *self.0))?;
        }
        self.0.push('}');
        Ok(())
    }
}

#[cfg(test)]
#[path = "body_tests.rs"]
mod tests;
