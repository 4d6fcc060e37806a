//! Validation of a request's `data` against a template op's typed fields.
//! The output, [`Param`]s in call order, is all an adapter ever sees of a
//! client's input.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value};

use super::template::{FieldSpec, FieldType, Store};
use super::{Op, Target};

/// One validated, typed procedure argument.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    /// Normalised to UTC; the database session runs in UTC too.
    DateTime(NaiveDateTime),
    /// A JSON value (MariaDB gets its text; MongoDB the same structure as
    /// BSON).
    Json(Value),
    /// A MongoDB ObjectId (24 hex characters on the wire).
    ObjectId([u8; 12]),
}

/// Checks `data` (the request's `data`, absent = empty object) against the
/// op and returns its params in call order. The error names the field.
pub fn validate(op: &Op, data: Option<&Value>) -> Result<Vec<Param>, String> {
    let empty = Map::new();
    let data = match data {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(m)) => m,
        Some(other) => return Err(format!("data: expected object, got {}", kind(other))),
    };
    for key in data.keys() {
        if !op.params.iter().any(|(name, _)| name == key) {
            return Err(if op.params.is_empty() {
                format!(
                    "data.{key}: unknown field ({} takes no fields)",
                    op.qualified
                )
            } else {
                format!(
                    "data.{key}: unknown field (expected one of: {})",
                    op.params
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            });
        }
    }
    let store = match op.target {
        Target::Procedure { .. } => Store::Mariadb,
        Target::Mongo(_) => Store::Mongodb,
    };
    let mut out = Vec::with_capacity(op.params.len());
    for (i, (name, spec)) in op.params.iter().enumerate() {
        match data.get(name) {
            None | Some(Value::Null) => {
                if op.required[i] {
                    return Err(format!("data.{name}: required"));
                }
                out.push(op.defaults[i].clone().unwrap_or(Param::Null));
            }
            Some(v) => out.push(check(name, spec, v, store)?),
        }
    }
    Ok(out)
}

/// Checks one value against its field (also used for template defaults).
pub fn check(name: &str, spec: &FieldSpec, v: &Value, store: Store) -> Result<Param, String> {
    if spec.ty == FieldType::Json {
        if store == Store::Mongodb {
            if let Some(path) = operator_key(v, &format!("data.{name}")) {
                return Err(format!(
                    "{path}: object keys may not start with '$' or contain '.' or NUL (a value is only ever a value)"
                ));
            }
        }
        if let Some(item) = spec.items {
            let Value::Array(items) = v else {
                return Err(format!(
                    "data.{name}: expected an array of {}, got {}",
                    item.as_str(),
                    kind(v)
                ));
            };
            let elem = FieldSpec {
                ty: item,
                items: None,
                ..spec.clone()
            };
            for (i, x) in items.iter().enumerate() {
                check(&format!("{name}[{i}]"), &elem, x, store)?;
            }
        }
        return Ok(Param::Json(v.clone()));
    }
    scalar(name, spec, v)
}

/// The path of the first object key that MongoDB would read as an operator
/// or a nested path.
fn operator_key(v: &Value, at: &str) -> Option<String> {
    match v {
        Value::Object(m) => m.iter().find_map(|(k, x)| {
            if k.starts_with('$') || k.contains(['.', '\0']) {
                Some(format!("{at}.{k}"))
            } else {
                operator_key(x, &format!("{at}.{k}"))
            }
        }),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, x)| operator_key(x, &format!("{at}[{i}]"))),
        _ => None,
    }
}

fn scalar(name: &str, spec: &FieldSpec, v: &Value) -> Result<Param, String> {
    let wrong = || {
        format!(
            "data.{name}: expected {}, got {}",
            spec.ty.as_str(),
            kind(v)
        )
    };
    let param = match spec.ty {
        FieldType::Int => Param::Int(v.as_i64().ok_or_else(|| {
            if v.is_u64() {
                format!("data.{name}: integer out of range")
            } else {
                wrong()
            }
        })?),
        FieldType::Float => {
            let f = v.as_f64().ok_or_else(wrong)?;
            Param::Float(f)
        }
        FieldType::Bool => Param::Bool(v.as_bool().ok_or_else(wrong)?),
        FieldType::String => {
            let s = v.as_str().ok_or_else(wrong)?;
            if let Some(max) = spec.max_len {
                let n = s.chars().count();
                if n > max {
                    return Err(format!(
                        "data.{name}: too long ({n} characters, at most {max})"
                    ));
                }
            }
            Param::Str(s.to_owned())
        }
        FieldType::Datetime => {
            let s = v.as_str().ok_or_else(wrong)?;
            let dt = DateTime::parse_from_rfc3339(s).map_err(|_| {
                format!("data.{name}: expected RFC 3339 datetime (e.g. 2026-01-31T12:00:00Z), got {s:?}")
            })?;
            Param::DateTime(dt.with_timezone(&Utc).naive_utc())
        }
        FieldType::ObjectId => {
            let s = v.as_str().ok_or_else(wrong)?;
            let mut bytes = [0u8; 12];
            let lower_hex = s.len() == 24
                && s.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
            if !lower_hex || hex::decode_to_slice(s, &mut bytes).is_err() {
                return Err(format!(
                    "data.{name}: expected an object_id (24 lowercase hex characters), got {:?}",
                    crate::error::clip(s.to_string(), 64)
                ));
            }
            Param::ObjectId(bytes)
        }
        FieldType::Json => Param::Json(v.clone()),
    };
    let (below, above) = match &param {
        Param::Int(i) => (
            spec.min.is_some_and(|m| cmp_int(*i, m.ceil()).is_lt()),
            spec.max.is_some_and(|m| cmp_int(*i, m.floor()).is_gt()),
        ),
        Param::Float(f) => (
            spec.min.is_some_and(|m| *f < m),
            spec.max.is_some_and(|m| *f > m),
        ),
        _ => (false, false),
    };
    if below {
        return Err(format!(
            "data.{name}: must be at least {}",
            spec.min.unwrap_or_default()
        ));
    }
    if above {
        return Err(format!(
            "data.{name}: must be at most {}",
            spec.max.unwrap_or_default()
        ));
    }
    Ok(param)
}

/// Compares an integer with a whole-number bound exactly (no rounding of
/// integers beyond 2^53 through f64).
fn cmp_int(i: i64, whole: f64) -> std::cmp::Ordering {
    const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
    if whole >= TWO_POW_63 {
        std::cmp::Ordering::Less
    } else if whole < -TWO_POW_63 {
        std::cmp::Ordering::Greater
    } else {
        i.cmp(&(whole as i64))
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering::*;

    fn field(ty: FieldType, items: Option<FieldType>) -> FieldSpec {
        FieldSpec {
            ty,
            key: false,
            max_len: Some(5),
            min: None,
            max: None,
            items,
            description: None,
        }
    }

    #[test]
    fn object_ids_are_24_lowercase_hex() {
        let f = field(FieldType::ObjectId, None);
        let ok = serde_json::json!("0123456789abcdef01234567");
        assert!(matches!(
            check("id", &f, &ok, Store::Mongodb),
            Ok(Param::ObjectId(_))
        ));
        for bad in [
            serde_json::json!("0123456789ABCDEF01234567"),
            serde_json::json!("0123456789abcdef0123456"),
            serde_json::json!("xyz"),
            serde_json::json!({"$ne": null}),
            serde_json::json!(12),
        ] {
            assert!(check("id", &f, &bad, Store::Mongodb).is_err(), "{bad}");
        }
    }

    #[test]
    fn json_values_with_operator_keys_are_refused_on_mongodb() {
        let f = field(FieldType::Json, None);
        for bad in [
            serde_json::json!({"$gt": 1}),
            serde_json::json!([{"a": {"b.c": 1}}]),
            serde_json::json!({"a": [{"$where": "1"}]}),
        ] {
            let e = check("tags", &f, &bad, Store::Mongodb).unwrap_err();
            assert!(e.contains("may not start with '$'"), "{e}");
            // MariaDB stores JSON as text: nothing there reads keys.
            assert!(check("tags", &f, &bad, Store::Mariadb).is_ok());
        }
        // Strings that look like operators are plain values.
        assert!(check("tags", &f, &serde_json::json!(["$gt"]), Store::Mongodb).is_ok());
    }

    #[test]
    fn json_items_are_checked_one_by_one() {
        let f = field(FieldType::Json, Some(FieldType::String));
        assert!(check("tags", &f, &serde_json::json!(["a", "b"]), Store::Mongodb).is_ok());
        let e = check("tags", &f, &serde_json::json!(["a", 1]), Store::Mongodb).unwrap_err();
        assert!(e.contains("data.tags[1]: expected string"), "{e}");
        let e = check("tags", &f, &serde_json::json!(["toolong"]), Store::Mongodb).unwrap_err();
        assert!(e.contains("too long"), "{e}");
        let e = check("tags", &f, &serde_json::json!("a"), Store::Mongodb).unwrap_err();
        assert!(e.contains("expected an array of string"), "{e}");
    }

    #[test]
    fn integer_bounds_are_exact_beyond_f64_precision() {
        let big = 9_007_199_254_740_993_i64; // 2^53 + 1: not an f64
        assert_eq!(cmp_int(big, 9_007_199_254_740_992.0), Greater);
        assert_eq!(cmp_int(i64::MAX, 9.3e18), Less);
        assert_eq!(cmp_int(i64::MIN, -9.3e18), Greater);
        assert_eq!(cmp_int(5, 5.0), Equal);
    }
}
