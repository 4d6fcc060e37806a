//! Validation of a request's `data` against a template op's typed fields.
//! The output, [`Param`]s in call order, is all an adapter ever sees of a
//! client's input.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value};

use super::template::{FieldSpec, FieldType};
use super::Op;

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
    /// Serialized JSON text.
    Json(String),
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
    let mut out = Vec::with_capacity(op.params.len());
    for (i, (name, spec)) in op.params.iter().enumerate() {
        match data.get(name) {
            None | Some(Value::Null) => {
                if op.required[i] {
                    return Err(format!("data.{name}: required"));
                }
                out.push(Param::Null);
            }
            Some(v) => out.push(check(name, spec, v)?),
        }
    }
    Ok(out)
}

fn check(name: &str, spec: &FieldSpec, v: &Value) -> Result<Param, String> {
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
        FieldType::Json => Param::Json(v.to_string()),
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
    use super::cmp_int;
    use std::cmp::Ordering::*;

    #[test]
    fn integer_bounds_are_exact_beyond_f64_precision() {
        let big = 9_007_199_254_740_993_i64; // 2^53 + 1: not an f64
        assert_eq!(cmp_int(big, 9_007_199_254_740_992.0), Greater);
        assert_eq!(cmp_int(i64::MAX, 9.3e18), Less);
        assert_eq!(cmp_int(i64::MIN, -9.3e18), Greater);
        assert_eq!(cmp_int(5, 5.0), Equal);
    }
}
