//! What one DLQ message says about itself: read from its headers and body,
//! never from anything else, so it works on copies parked by any BEDS
//! version and on those RabbitMQ dead-lettered itself (quorum queues).

use lapin::protocol::basic::AMQPProperties;
use lapin::types::AMQPValue;
use serde_json::{json, Map, Value};

use crate::broker::headers::{
    ATTEMPT_HEADER, ERROR_CODE_HEADER, ERROR_MESSAGE_HEADER, EVENT_ID_HEADER, NODE_HEADER,
};
use crate::broker::payload::amqp_int;

/// How often a message was replayed (`beds dlq replay` adds one each time;
/// the node copies the header onto a copy it parks again).
pub const REPLAYED_HEADER: &str = "x-beds-replayed";

/// The event id of the parking a replay came from.
pub const REPLAYED_FROM_HEADER: &str = "x-beds-replayed-from";

/// Quorum queues count returns of a message here (RabbitMQ's header).
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// The summary of one parked message.
#[derive(Debug, Clone, PartialEq)]
pub struct Parked {
    /// 1-based position in the DLQ when it was read.
    pub n: usize,
    pub message_id: Option<String>,
    /// `template.op` of the request, or of each entry of a batch; empty when
    /// the body is not a BrokerPayload.
    pub ops: Vec<String>,
    /// The body holds a `batch`.
    pub batch: bool,
    /// Why the body could not be read as JSON, if it could not.
    pub body_problem: Option<String>,
    /// `x-beds-error-code`, or `rabbitmq:<reason>` for a copy RabbitMQ
    /// dead-lettered itself (`x-first-death-reason`).
    pub code: Option<String>,
    /// `x-beds-error-message`.
    pub error: Option<String>,
    /// `x-beds-node`: the node that parked it (BEDS newer than this header
    /// only).
    pub node: Option<String>,
    /// `x-beds-event-id`: the event that parked it.
    pub event_id: Option<String>,
    /// When it was parked, Unix ms: the time in its UUIDv7 event id.
    pub parked_at_ms: Option<i64>,
    /// `x-beds-attempt` (0 on parked copies: a replay gets every tier).
    pub attempt: Option<i64>,
    /// `x-beds-replayed`: earlier replays of this message.
    pub replayed: i64,
    /// `x-delivery-count`: returns counted by a quorum queue.
    pub delivery_count: Option<i64>,
    /// Body size in bytes.
    pub size: usize,
}

impl Parked {
    /// Reads message `n` (1-based).
    pub fn read(n: usize, props: &AMQPProperties, body: &[u8]) -> Parked {
        let (ops, batch, body_problem) = match serde_json::from_slice::<Value>(body) {
            Ok(v) => {
                let (ops, batch) = ops_of(&v);
                (ops, batch, None)
            }
            Err(e) => (Vec::new(), false, Some(format!("not JSON: {e}"))),
        };
        let event_id = header_text(props, EVENT_ID_HEADER);
        // BEDS parks with an event id; a copy without one was put here by
        // RabbitMQ (quorum work queue: delivery limit or expiry), and any
        // error code on it is left from an earlier retry.
        let rabbitmq = latest_death(props).map(|r| format!("rabbitmq:{r}"));
        let code = match (&event_id, rabbitmq) {
            (None, Some(r)) => Some(r),
            _ => header_text(props, ERROR_CODE_HEADER),
        };
        Parked {
            n,
            message_id: props.message_id().as_ref().map(|m| m.to_string()),
            ops,
            batch,
            body_problem,
            code,
            error: header_text(props, ERROR_MESSAGE_HEADER),
            node: header_text(props, NODE_HEADER),
            parked_at_ms: event_id.as_deref().and_then(uuid_v7_ms),
            event_id,
            attempt: header_int(props, ATTEMPT_HEADER),
            replayed: header_int(props, REPLAYED_HEADER).unwrap_or(0),
            delivery_count: header_int(props, DELIVERY_COUNT_HEADER),
            size: body.len(),
        }
    }

    /// The templates of the request, distinct, joined by `+` (a batch may
    /// touch several).
    pub fn templates(&self) -> String {
        let mut t: Vec<&str> = self
            .ops
            .iter()
            .map(|o| o.split_once('.').map_or(o.as_str(), |(t, _)| t))
            .collect();
        t.sort_unstable();
        t.dedup();
        if t.is_empty() {
            "-".into()
        } else {
            t.join("+")
        }
    }

    /// `template.op`, or `batch[k]: a.b, c.d` for a batch.
    pub fn what(&self) -> String {
        if self.body_problem.is_some() {
            return "(not JSON)".into();
        }
        match (self.batch, self.ops.as_slice()) {
            (true, ops) => format!("batch[{}]: {}", ops.len(), ops.join(", ")),
            (false, []) => "(no template)".into(),
            (false, ops) => ops.join(", "),
        }
    }

    /// Machine output for `--json`.
    pub fn to_json(&self, now_ms: i64) -> Value {
        json!({
            "n": self.n,
            "message_id": self.message_id,
            "ops": self.ops,
            "batch": self.batch,
            "body_problem": self.body_problem,
            "code": self.code,
            "error": self.error,
            "node": self.node,
            "event_id": self.event_id,
            "parked_at_ms": self.parked_at_ms,
            "age_s": self.parked_at_ms.map(|t| (now_ms - t).max(0) / 1000),
            "attempt": self.attempt,
            "replayed": self.replayed,
            "delivery_count": self.delivery_count,
            "size": self.size,
        })
    }
}

/// `template.op` of a BrokerPayload or of each entry of a batch.
fn ops_of(v: &Value) -> (Vec<String>, bool) {
    let one = |e: &Value| -> Option<String> {
        let t = e.get("template")?.as_str()?;
        let o = e.get("op").and_then(Value::as_str).unwrap_or("?");
        Some(format!("{t}.{o}"))
    };
    match v.get("batch").and_then(Value::as_array) {
        Some(entries) => (
            entries
                .iter()
                .map(|e| one(e).unwrap_or_else(|| "?".into()))
                .collect(),
            true,
        ),
        None => (one(v).into_iter().collect(), false),
    }
}

/// The Unix ms time inside a UUIDv7 (BEDS event ids are v7).
pub fn uuid_v7_ms(id: &str) -> Option<i64> {
    let u = uuid::Uuid::parse_str(id).ok()?;
    let (secs, nanos) = u.get_timestamp()?.to_unix();
    Some(secs as i64 * 1000 + nanos as i64 / 1_000_000)
}

/// The reason of RabbitMQ's latest dead-lettering (`x-death` lists the
/// latest first).
fn latest_death(props: &AMQPProperties) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = props.headers().as_ref()?.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(latest) = deaths.as_slice().first()? else {
        return None;
    };
    match latest.inner().get("reason")? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

pub fn header_text(props: &AMQPProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

pub fn header_int(props: &AMQPProperties, name: &str) -> Option<i64> {
    amqp_int(props.headers().as_ref()?.inner().get(name)?)
}

/// An AMQP value as JSON, for `show` and `--json`.
pub fn amqp_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::ShortString(s) => Value::String(s.to_string()),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => Value::Object(table_json(t)),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_json).collect()),
        AMQPValue::ByteArray(b) => Value::String(hex::encode(b.as_slice())),
        AMQPValue::Void => Value::Null,
        other => amqp_int(other).map_or_else(|| Value::String(format!("{other:?}")), Value::from),
    }
}

pub fn table_json(t: &lapin::types::FieldTable) -> Map<String, Value> {
    t.inner()
        .iter()
        .map(|(k, v)| (k.to_string(), amqp_json(v)))
        .collect()
}

/// A message's properties as JSON (headers apart), for `show`.
pub fn properties_json(p: &AMQPProperties) -> Map<String, Value> {
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.into(), v);
        }
    };
    let s = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|v| Value::from(v.as_str()));
    put("content_type", s(p.content_type()));
    put("content_encoding", s(p.content_encoding()));
    put("message_id", s(p.message_id()));
    put("correlation_id", s(p.correlation_id()));
    put("reply_to", s(p.reply_to()));
    put("user_id", s(p.user_id()));
    put("app_id", s(p.app_id()));
    put("type", s(p.kind()));
    put("expiration", s(p.expiration()));
    put("delivery_mode", p.delivery_mode().map(Value::from));
    put("priority", p.priority().map(Value::from));
    put("timestamp", p.timestamp().map(Value::from));
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldTable, LongString};
    use lapin::BasicProperties;

    fn props(headers: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut t = FieldTable::default();
        for (k, v) in headers {
            t.insert((*k).into(), v.clone());
        }
        BasicProperties::default()
            .with_message_id("m-1".into())
            .with_headers(t)
    }

    fn text(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s.to_string()))
    }

    #[test]
    fn reads_a_parked_write() {
        let id = "0190b3a4-5c6d-7e8f-9a0b-1c2d3e4f5a6b";
        let p = props(&[
            (ERROR_CODE_HEADER, text("UNAVAILABLE")),
            (EVENT_ID_HEADER, text(id)),
            (NODE_HEADER, text("n1")),
            (REPLAYED_HEADER, AMQPValue::LongInt(2)),
        ]);
        let body = br#"{"template":"usr","op":"create","data":{}}"#;
        let m = Parked::read(3, &p, body);
        assert_eq!(m.n, 3);
        assert_eq!(m.message_id.as_deref(), Some("m-1"));
        assert_eq!(m.what(), "usr.create");
        assert_eq!(m.templates(), "usr");
        assert_eq!(m.code.as_deref(), Some("UNAVAILABLE"));
        assert_eq!(m.node.as_deref(), Some("n1"));
        assert_eq!(m.replayed, 2);
        assert_eq!(m.parked_at_ms, Some(0x0190b3a45c6d));
    }

    #[test]
    fn reads_batches_junk_and_rabbitmq_dead_letters() {
        let death = |reason: &str| {
            let mut t = lapin::types::FieldTable::default();
            t.insert("reason".into(), text(reason));
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(t)].into())
        };
        // Retried once (an error code), then dead-lettered by RabbitMQ.
        let p = props(&[
            ("x-death", death("delivery_limit")),
            (ERROR_CODE_HEADER, text("UNAVAILABLE")),
        ]);
        let body = br#"{"batch":[{"template":"usr","op":"create"},{"template":"tst","op":"flaky"},{"nope":1}]}"#;
        let m = Parked::read(1, &p, body);
        assert_eq!(m.what(), "batch[3]: usr.create, tst.flaky, ?");
        assert_eq!(m.templates(), "?+tst+usr");
        assert_eq!(m.code.as_deref(), Some("rabbitmq:delivery_limit"));
        // Parked by BEDS after a retry tier expired: BEDS's code.
        let p = props(&[
            ("x-death", death("expired")),
            (ERROR_CODE_HEADER, text("UNAVAILABLE")),
            (EVENT_ID_HEADER, text("e")),
        ]);
        assert_eq!(
            Parked::read(1, &p, b"{}").code.as_deref(),
            Some("UNAVAILABLE")
        );
        let junk = Parked::read(2, &props(&[]), b"\xff not json");
        assert_eq!(junk.what(), "(not JSON)");
        assert!(junk.body_problem.is_some());
        assert_eq!(junk.templates(), "-");
        assert_eq!(junk.code, None);
        assert_eq!(junk.parked_at_ms, None);
    }
}
