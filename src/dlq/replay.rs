//! `beds dlq replay`: what a replayed copy looks like, and what the node
//! answered to it.

use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use serde_json::{json, Value};

use super::parked::{header_int, uuid_v7_ms, REPLAYED_FROM_HEADER, REPLAYED_HEADER};
use crate::broker::headers::{
    sign, ATTEMPT_HEADER, BATCH_DONE_HEADER, BATCH_ENTRIES_HEADER, ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER, EVENT_ID_HEADER, NODE_HEADER, USER_HEADER, USER_SIG_HEADER,
};
use crate::broker::reply::Reply;

/// Headers that describe the parking, not the request: a replayed copy
/// starts without them (the node sets them anew if it parks it again).
const PARKING_HEADERS: [&str; 8] = [
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    EVENT_ID_HEADER,
    NODE_HEADER,
    BATCH_ENTRIES_HEADER,
    BATCH_DONE_HEADER,
    "x-delivery-count",
    "x-acquired-count",
];

/// Who the replayed request runs as.
pub struct Identity<'a> {
    /// The user of the CLI's own connection: a `user_id` equal to it can
    /// stay (RabbitMQ checks the property against the connection).
    pub conn_user: &'a str,
    /// `dispatch.retry_key`: signs another caller's identity the way the
    /// node does for its retried copies.
    pub retry_key: Option<&'a [u8]>,
}

/// The properties of a replayed copy, and a note when the caller identity
/// could not be kept. The body is republished unchanged, so the node's
/// signature in `x-beds-user-id`/`-sig` still verifies, and the inbox key
/// (caller, `message_id`, body hash) is the one of the first run.
pub fn replay_props(
    orig: &BasicProperties,
    body: &[u8],
    who: &Identity,
    reply: Option<(&str, &str)>,
) -> (BasicProperties, Option<String>) {
    let mut headers = FieldTable::default();
    if let Some(h) = orig.headers() {
        for (k, v) in h.inner() {
            if !PARKING_HEADERS.contains(&k.as_str()) {
                headers.insert(k.clone(), v.clone());
            }
        }
    }
    // The retry tiers start over.
    headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongLongInt(0));
    let replayed = header_int(orig, REPLAYED_HEADER).unwrap_or(0) + 1;
    headers.insert(REPLAYED_HEADER.into(), AMQPValue::LongLongInt(replayed));
    if let Some(AMQPValue::LongString(e)) = orig
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(EVENT_ID_HEADER))
    {
        headers.insert(
            REPLAYED_FROM_HEADER.into(),
            AMQPValue::LongString(e.clone()),
        );
    }

    let mut note = None;
    let mut user_id = None;
    // A parked copy never has user_id (the node moved it to the signed
    // header); a copy RabbitMQ dead-lettered itself keeps the client's.
    if let Some(u) = orig.user_id() {
        if u.as_str() == who.conn_user {
            user_id = Some(u.clone());
        } else if let Some(key) = who.retry_key {
            headers.insert(USER_HEADER.into(), text(u.as_str()));
            headers.insert(USER_SIG_HEADER.into(), text(&sign(key, u.as_str(), body)));
        } else {
            note = Some(format!(
                "caller {:?} dropped: RabbitMQ refuses another user's user_id and dispatch.retry_key is not set to sign it",
                u.as_str()
            ));
        }
    }

    let mut p = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(orig.delivery_mode().unwrap_or(2));
    if let Some(u) = user_id {
        p = p.with_user_id(u);
    }
    if let Some(v) = orig.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = orig.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = orig.message_id() {
        p = p.with_message_id(v.clone());
    }
    if let Some(v) = orig.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = orig.app_id() {
        p = p.with_app_id(v.clone());
    }
    if let Some(v) = orig.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = orig.priority() {
        p = p.with_priority(*v);
    }
    if let Some((reply_to, cid)) = reply {
        p = p
            .with_reply_to(reply_to.into())
            .with_correlation_id(cid.into());
    }
    (p, note)
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.to_string()))
}

/// What became of one DLQ message in a replay.
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    /// Not selected by the filters: left in the DLQ.
    Skipped,
    /// Selected, but over `--limit`: left in the DLQ.
    OverLimit,
    /// `--dry-run`: would be republished.
    WouldReplay,
    /// Publishing failed: left in the DLQ.
    PublishFailed(String),
    /// Republished (confirmed) and removed from the DLQ; the answer, if
    /// one was awaited.
    Replayed(Answer),
}

/// What the node answered to a replayed copy.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// `--no-wait`: nobody listens for the answer.
    NotAwaited,
    /// Nothing within `--wait` (the request may sit in a retry tier or wait
    /// for its database; the event log has it when it finishes).
    None,
    /// An answer whose event is older than the replay: a repeat, answered
    /// from the inbox or the dedup memory without running again.
    Repeat {
        event_id: String,
    },
    Ok,
    /// An error reply (for a batch: the first failed entry's code).
    Error {
        code: String,
        message: String,
    },
    /// A batch with this many entries ok out of the total.
    Batch {
        ok: usize,
        total: usize,
    },
    /// The answer is not a BEDS reply.
    Unreadable(String),
}

impl Answer {
    /// Reads a reply to a copy published at `sent_ms` (Unix ms). A reply
    /// whose event id (UUIDv7) is older than that (by more than the
    /// clock-skew allowance) comes from the first run.
    pub fn read(body: &[u8], sent_ms: i64) -> Answer {
        const SKEW_MS: i64 = 500;
        let reply: Reply = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return Answer::Unreadable(e.to_string()),
        };
        if uuid_v7_ms(&reply.event_id).is_some_and(|t| t < sent_ms - SKEW_MS) {
            return Answer::Repeat {
                event_id: reply.event_id,
            };
        }
        if let Some(results) = &reply.results {
            let ok = results.iter().filter(|r| r.is_ok()).count();
            if ok < results.len() || reply.error.is_none() {
                return Answer::Batch {
                    ok,
                    total: results.len(),
                };
            }
        }
        match &reply.error {
            None => Answer::Ok,
            Some(e) => Answer::Error {
                code: e.code.clone(),
                message: e.message.clone(),
            },
        }
    }

    /// The replay went well.
    pub fn good(&self) -> bool {
        match self {
            Answer::Ok | Answer::Repeat { .. } | Answer::NotAwaited => true,
            Answer::Batch { ok, total } => ok == total,
            _ => false,
        }
    }
}

impl Fate {
    /// The report's wording.
    pub fn describe(&self) -> String {
        match self {
            Fate::Skipped => "kept (not selected)".into(),
            Fate::OverLimit => "kept (over --limit)".into(),
            Fate::WouldReplay => "would be replayed (dry run)".into(),
            Fate::PublishFailed(e) => format!("kept: publish failed: {e}"),
            Fate::Replayed(a) => {
                let what = match a {
                    Answer::NotAwaited => "answer not awaited (--no-wait)".to_string(),
                    Answer::None => "no answer yet (see `beds logs` or the DLQ later)".into(),
                    Answer::Repeat { event_id } => {
                        format!("ok: repeat, answered from the first run ({event_id}), not applied again")
                    }
                    Answer::Ok => "ok: applied".into(),
                    Answer::Error { code, message } => format!("error {code}: {message}"),
                    Answer::Batch { ok, total } => format!("batch: {ok} of {total} entries ok"),
                    Answer::Unreadable(e) => format!("unreadable answer: {e}"),
                };
                format!("replayed → {what}")
            }
        }
    }

    /// Short status for `--json`.
    pub fn to_json(&self) -> Value {
        let (status, answer) = match self {
            Fate::Skipped => ("skipped", Value::Null),
            Fate::OverLimit => ("over_limit", Value::Null),
            Fate::WouldReplay => ("would_replay", Value::Null),
            Fate::PublishFailed(e) => ("publish_failed", json!({ "error": e })),
            Fate::Replayed(a) => (
                "replayed",
                match a {
                    Answer::NotAwaited => json!({"status": "not_awaited"}),
                    Answer::None => json!({"status": "none"}),
                    Answer::Repeat { event_id } => {
                        json!({"status": "repeat", "event_id": event_id})
                    }
                    Answer::Ok => json!({"status": "ok"}),
                    Answer::Error { code, message } => {
                        json!({"status": "error", "code": code, "message": message})
                    }
                    Answer::Batch { ok, total } => {
                        json!({"status": "batch", "ok": ok, "total": total})
                    }
                    Answer::Unreadable(e) => json!({"status": "unreadable", "error": e}),
                },
            ),
        };
        json!({ "status": status, "answer": answer })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::ShortString;

    fn parked() -> BasicProperties {
        let mut h = FieldTable::default();
        h.insert(ERROR_CODE_HEADER.into(), text("UNAVAILABLE"));
        h.insert(EVENT_ID_HEADER.into(), text("e-1"));
        h.insert(NODE_HEADER.into(), text("n1"));
        h.insert(ATTEMPT_HEADER.into(), AMQPValue::LongLongInt(0));
        h.insert(USER_HEADER.into(), text("app"));
        h.insert(USER_SIG_HEADER.into(), text("abcd"));
        h.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        h.insert("traceparent".into(), text("00-x"));
        BasicProperties::default()
            .with_headers(h)
            .with_message_id("m-1".into())
            .with_content_type("application/json".into())
            .with_correlation_id("old".into())
            .with_reply_to("gone".into())
            .with_delivery_mode(2)
    }

    fn get<'a>(p: &'a BasicProperties, k: &str) -> Option<&'a AMQPValue> {
        p.headers().as_ref()?.inner().get(k)
    }

    #[test]
    fn a_replayed_copy_keeps_the_request_and_drops_the_parking() {
        let who = Identity {
            conn_user: "guest",
            retry_key: None,
        };
        let (p, note) = replay_props(&parked(), b"{}", &who, Some(("amq.x", "cid-1")));
        assert_eq!(note, None);
        assert_eq!(p.message_id(), &Some(ShortString::from("m-1")));
        assert_eq!(p.correlation_id(), &Some(ShortString::from("cid-1")));
        assert_eq!(p.reply_to(), &Some(ShortString::from("amq.x")));
        assert_eq!(p.delivery_mode(), &Some(2));
        for gone in [
            ERROR_CODE_HEADER,
            EVENT_ID_HEADER,
            NODE_HEADER,
            "x-delivery-count",
        ] {
            assert!(get(&p, gone).is_none(), "{gone}");
        }
        assert_eq!(get(&p, ATTEMPT_HEADER), Some(&AMQPValue::LongLongInt(0)));
        assert_eq!(get(&p, REPLAYED_HEADER), Some(&AMQPValue::LongLongInt(1)));
        assert_eq!(get(&p, REPLAYED_FROM_HEADER), Some(&text("e-1")));
        assert_eq!(
            get(&p, USER_HEADER),
            Some(&text("app")),
            "signed identity kept"
        );
        assert_eq!(get(&p, USER_SIG_HEADER), Some(&text("abcd")));
        assert_eq!(get(&p, "traceparent"), Some(&text("00-x")));
        // Replayed again: the count goes on.
        let (p2, _) = replay_props(&p, b"{}", &who, None);
        assert_eq!(get(&p2, REPLAYED_HEADER), Some(&AMQPValue::LongLongInt(2)));
        assert_eq!(p2.reply_to(), &None, "--no-wait: fire and forget");
    }

    #[test]
    fn a_foreign_user_id_is_signed_or_dropped() {
        let orig = BasicProperties::default().with_user_id("app".into());
        let unsigned = Identity {
            conn_user: "guest",
            retry_key: None,
        };
        let (p, note) = replay_props(&orig, b"{}", &unsigned, None);
        assert_eq!(p.user_id(), &None);
        assert!(note.unwrap().contains("retry_key"));
        let signing = Identity {
            conn_user: "guest",
            retry_key: Some(b"0123456789abcdef"),
        };
        let (p, note) = replay_props(&orig, b"{}", &signing, None);
        assert_eq!(note, None);
        assert_eq!(p.user_id(), &None);
        assert_eq!(get(&p, USER_HEADER), Some(&text("app")));
        assert_eq!(
            get(&p, USER_SIG_HEADER),
            Some(&text(&sign(b"0123456789abcdef", "app", b"{}")))
        );
        let own = BasicProperties::default().with_user_id("guest".into());
        let (p, _) = replay_props(&own, b"{}", &unsigned, None);
        assert_eq!(p.user_id(), &Some(ShortString::from("guest")));
    }

    #[test]
    fn answers_are_read() {
        let now = 1_800_000_000_000;
        let fresh = uuid::Builder::from_unix_timestamp_millis(now as u64 + 5, &[0; 10])
            .into_uuid()
            .to_string();
        let old = uuid::Builder::from_unix_timestamp_millis(now as u64 - 60_000, &[0; 10])
            .into_uuid()
            .to_string();
        let ok = format!(r#"{{"status":"ok","event_id":"{fresh}","data":[]}}"#);
        assert_eq!(Answer::read(ok.as_bytes(), now), Answer::Ok);
        let repeat = format!(r#"{{"status":"ok","event_id":"{old}","data":[]}}"#);
        assert_eq!(
            Answer::read(repeat.as_bytes(), now),
            Answer::Repeat { event_id: old }
        );
        let err = format!(
            r#"{{"status":"error","event_id":"{fresh}","error":{{"code":"UNAVAILABLE","message":"m","retryable":true}}}}"#
        );
        assert!(!Answer::read(err.as_bytes(), now).good());
        let batch = format!(
            r#"{{"status":"ok","event_id":"{fresh}","results":[{{"status":"ok","event_id":"{fresh}"}},{{"status":"error","event_id":"{fresh}","error":{{"code":"X","message":"m","retryable":false}}}}]}}"#
        );
        assert_eq!(
            Answer::read(batch.as_bytes(), now),
            Answer::Batch { ok: 1, total: 2 }
        );
        assert!(matches!(Answer::read(b"nope", now), Answer::Unreadable(_)));
        assert!(Answer::NotAwaited.good());
        assert!(!Answer::None.good());
    }
}
