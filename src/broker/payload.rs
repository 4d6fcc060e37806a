//! The request side of the wire contract (CONTRACT §2): AMQP properties and
//! the BrokerPayload body, checked in the order that costs least first
//! (content type, size, deadline, then JSON).

use lapin::protocol::basic::AMQPProperties;
use lapin::types::AMQPValue;
use serde::Deserialize;
use serde_json::Value;

/// Header carrying the client's deadline, Unix epoch milliseconds.
pub const DEADLINE_HEADER: &str = "x-beds-deadline";

#[derive(Debug, Clone, thiserror::Error)]
pub enum PayloadError {
    #[error("content_type must be application/json, got {0}")]
    ContentType(String),
    #[error("body is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("header x-beds-deadline must be an integer (Unix epoch milliseconds)")]
    BadDeadline,
    #[error("deadline passed {late_ms} ms before the request could run")]
    Expired { late_ms: i64 },
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    #[error("body must be a JSON object")]
    NotObject,
    #[error("{0}")]
    Shape(String),
}

/// One operation request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerPayload {
    pub template: String,
    pub op: String,
    #[serde(default)]
    pub data: Option<Value>,
    #[serde(default)]
    pub parent_event_id: Option<String>,
    #[serde(default)]
    pub context: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchPayload {
    batch: Vec<Value>,
    #[serde(default)]
    atomic: bool,
    #[serde(default)]
    parent_event_id: Option<String>,
    #[serde(default)]
    context: Option<String>,
}

/// A parsed request body.
#[derive(Debug)]
pub enum Request {
    Single(BrokerPayload),
    /// Entries are parsed one by one so a malformed entry fails on its own.
    Batch {
        entries: Vec<Result<BrokerPayload, PayloadError>>,
        atomic: bool,
        parent_event_id: Option<String>,
        context: Option<String>,
    },
}

impl Request {
    pub fn parent_event_id(&self) -> Option<&str> {
        match self {
            Request::Single(p) => p.parent_event_id.as_deref(),
            Request::Batch {
                parent_event_id, ..
            } => parent_event_id.as_deref(),
        }
    }

    pub fn context(&self) -> &str {
        let c = match self {
            Request::Single(p) => p.context.as_deref(),
            Request::Batch { context, .. } => context.as_deref(),
        };
        c.unwrap_or("default")
    }
}

/// Checks the properties that must hold before the body is even parsed;
/// returns the request's deadline (judged later: a duplicate of a finished
/// write is answered from its first execution even after the deadline).
pub fn check_envelope(
    props: &AMQPProperties,
    body_len: usize,
    limit: usize,
) -> Result<Option<i64>, PayloadError> {
    let ct = props.content_type().as_ref().map(|s| s.as_str());
    let json = ct.is_some_and(|ct| {
        let base = ct.split(';').next().unwrap_or("").trim();
        base.eq_ignore_ascii_case("application/json")
    });
    if !json {
        return Err(PayloadError::ContentType(match ct {
            Some(ct) => format!("{ct:?}"),
            None => "none".into(),
        }));
    }
    if body_len > limit {
        return Err(PayloadError::TooLarge {
            size: body_len,
            limit,
        });
    }
    deadline(props)
}

/// EXPIRED when `deadline` (Unix epoch ms) has passed.
pub fn check_deadline(deadline: Option<i64>) -> Result<(), PayloadError> {
    let Some(deadline) = deadline else {
        return Ok(());
    };
    let now_ms = chrono::Utc::now().timestamp_millis();
    if now_ms > deadline {
        return Err(PayloadError::Expired {
            late_ms: now_ms.saturating_sub(deadline),
        });
    }
    Ok(())
}

/// The `x-beds-deadline` header, if any.
pub fn deadline(props: &AMQPProperties) -> Result<Option<i64>, PayloadError> {
    let Some(v) = header(props, DEADLINE_HEADER) else {
        return Ok(None);
    };
    match v {
        // AMQP timestamps count seconds; the contract's integer counts ms.
        AMQPValue::Timestamp(secs) => i64::try_from(*secs)
            .ok()
            .and_then(|s| s.checked_mul(1000))
            .map(Some)
            .ok_or(PayloadError::BadDeadline),
        _ => amqp_int(v).map(Some).ok_or(PayloadError::BadDeadline),
    }
}

pub fn header<'a>(props: &'a AMQPProperties, name: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref()?.inner().get(name)
}

/// Any AMQP integer encoding, as clients in different languages pick
/// different widths.
pub fn amqp_int(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(i) => *i as i64,
        AMQPValue::ShortShortUInt(i) => *i as i64,
        AMQPValue::ShortInt(i) => *i as i64,
        AMQPValue::ShortUInt(i) => *i as i64,
        AMQPValue::LongInt(i) => *i as i64,
        AMQPValue::LongUInt(i) => *i as i64,
        AMQPValue::LongLongInt(i) => *i,
        _ => return None,
    })
}

/// Parses a body already known to be within the size limit.
pub fn parse(body: &[u8], max_batch: usize) -> Result<Request, PayloadError> {
    let value = serde_json::from_slice::<Strict>(body)
        .map_err(|e| PayloadError::NotJson(e.to_string()))?
        .0;
    let Value::Object(obj) = &value else {
        return Err(PayloadError::NotObject);
    };
    if obj.contains_key("batch") {
        let b = BatchPayload::deserialize(value).map_err(|e| PayloadError::Shape(e.to_string()))?;
        if b.batch.is_empty() || b.batch.len() > max_batch {
            return Err(PayloadError::Shape(format!(
                "batch must hold 1 to {max_batch} entries, got {}",
                b.batch.len()
            )));
        }
        check_meta(b.parent_event_id.as_deref(), b.context.as_deref())?;
        let entries = b
            .batch
            .into_iter()
            .enumerate()
            .map(|(i, v)| entry(v).map_err(|e| PayloadError::Shape(format!("batch[{i}]: {e}"))))
            .collect();
        Ok(Request::Batch {
            entries,
            atomic: b.atomic,
            parent_event_id: b.parent_event_id,
            context: b.context,
        })
    } else {
        entry(value).map(Request::Single)
    }
}

/// A JSON value parsed like `serde_json::Value`, except that a key repeated
/// in one object is an error (CONTRACT §2): parsers disagree on which copy
/// wins, so BEDS must not act on a reading a proxy or logger did not see.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format!(
                    "duplicate key {:?}",
                    crate::error::clip(key, 64)
                )));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

fn entry(v: Value) -> Result<BrokerPayload, PayloadError> {
    if !v.is_object() {
        return Err(PayloadError::NotObject);
    }
    let p = BrokerPayload::deserialize(v).map_err(|e| PayloadError::Shape(e.to_string()))?;
    check_meta(p.parent_event_id.as_deref(), p.context.as_deref())?;
    Ok(p)
}

fn check_meta(parent: Option<&str>, context: Option<&str>) -> Result<(), PayloadError> {
    if parent.is_some_and(|p| p.len() > 128) {
        return Err(PayloadError::Shape(
            "parent_event_id: at most 128 bytes".into(),
        ));
    }
    if context.is_some_and(|c| c.is_empty() || c.len() > 64) {
        return Err(PayloadError::Shape("context: 1 to 64 bytes".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_keys_at_every_level() {
        let e = parse(br#"{"template":"usr","op":"read","dta":{}}"#, 10).unwrap_err();
        assert!(e.to_string().contains("unknown field `dta`"), "{e}");
        let e = parse(br#"{"batch":[],"atomik":true}"#, 10).unwrap_err();
        assert!(e.to_string().contains("atomik"), "{e}");
        match parse(br#"{"batch":[{"template":"usr","op":"read","x":1}]}"#, 10).unwrap() {
            Request::Batch { entries, .. } => assert!(entries[0].is_err()),
            _ => panic!("expected batch"),
        }
    }

    #[test]
    fn rejects_duplicate_keys_at_any_depth() {
        for body in [
            r#"{"template":"usr","template":"x","op":"read"}"#,
            r#"{"template":"usr","op":"read","data":{"id":1,"id":2}}"#,
            r#"{"template":"usr","op":"read","data":{"j":[{"a":1,"\u0061":2}]}}"#,
            r#"{"batch":[{"template":"usr","op":"read","op":"list"}]}"#,
        ] {
            let r = parse(body.as_bytes(), 10);
            let e = match r {
                Err(e) => e.to_string(),
                Ok(Request::Batch { entries, .. }) => match &entries[0] {
                    Err(e) => e.to_string(),
                    Ok(_) => String::new(),
                },
                Ok(_) => String::new(),
            };
            assert!(e.contains("duplicate key"), "{body}: {e}");
        }
        // The same key in two objects is fine.
        assert!(parse(
            br#"{"batch":[{"template":"a","op":"b"},{"template":"a","op":"b"}]}"#,
            10
        )
        .is_ok());
    }

    #[test]
    fn rejects_non_objects_and_bad_json() {
        assert!(matches!(parse(b"[1]", 10), Err(PayloadError::NotObject)));
        assert!(matches!(parse(b"{", 10), Err(PayloadError::NotJson(_))));
        assert!(matches!(
            parse(br#"{"batch":[]}"#, 10),
            Err(PayloadError::Shape(_))
        ));
    }
}
