//! Carrying out an `Action`: the reply, retry
//! copies and parked (DLQ) copies, each published with a confirm; the
//! headers BEDS adds to them and the signed caller identity they carry.

use hmac::{Hmac, Mac};
use lapin::message::Delivery;
use lapin::protocol::basic::AMQPProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel};
use sha2::Sha256;

use super::dispatcher::{BrokerSpec, Shared};
use super::payload;
use super::request::Action;
use super::{publish_confirmed, PublishError};
use crate::error::ErrorCode;

/// Retry attempt number a message carries (0 or absent on first delivery).
pub const ATTEMPT_HEADER: &str = "x-beds-attempt";

/// Results of the batch entries already executed, carried through retries
/// so a retried batch never applies an entry twice.
pub const BATCH_DONE_HEADER: &str = "x-beds-batch-done";

/// Caller identity of a retried request (RabbitMQ does not let BEDS
/// republish another user's `user_id`), with its signature.
pub const USER_HEADER: &str = "x-beds-user-id";

pub const USER_SIG_HEADER: &str = "x-beds-user-sig";

/// Headers a parked (DLQ) message carries to say why it is there.
pub const ERROR_CODE_HEADER: &str = "x-beds-error-code";

pub const ERROR_MESSAGE_HEADER: &str = "x-beds-error-message";

pub const EVENT_ID_HEADER: &str = "x-beds-event-id";

/// On a parked batch: the original indices of the entries it kept.
pub const BATCH_ENTRIES_HEADER: &str = "x-beds-batch-entries";

/// Client headers larger than this are not copied onto retried or parked
/// copies (ours must still fit one frame next to them).
pub(crate) const MAX_COPIED_HEADERS_BYTES: usize = 32 * 1024;

/// Parks a bare copy of a request whose outcome could not be published:
/// the body, the reply address as a header, and why; nothing else of the
/// original (whatever RabbitMQ rejected is not repeated). No reply is sent.
pub(crate) async fn quarantine(
    shared: &Shared,
    broker: &BrokerSpec,
    ch: &Channel,
    delivery: &Delivery,
    event_id: &str,
) -> Result<(), PublishError> {
    let msg = "publishing this request's outcome failed repeatedly (the connection was closed under it); parked without executing again or replying";
    tracing::error!(error = msg, "request quarantined in the dead-letter queue");
    let mut headers = FieldTable::default();
    headers.insert(ERROR_CODE_HEADER.into(), text(ErrorCode::Internal.as_str()));
    headers.insert(ERROR_MESSAGE_HEADER.into(), text(msg));
    headers.insert(EVENT_ID_HEADER.into(), text(event_id));
    let reply_to = delivery
        .properties
        .reply_to()
        .as_ref()
        .map(|r| r.to_string());
    headers.insert(
        "x-beds-reply-to".into(),
        text(&reply_to.unwrap_or_default()),
    );
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    let dlq = shared.names.dlq(&broker.name);
    publish_confirmed(ch, "", &dlq, &delivery.data, props, true).await
}

/// Publishes what the action requires, each with a publisher confirm.
pub(crate) async fn finish(
    shared: &Shared,
    broker: &BrokerSpec,
    ch: &Channel,
    delivery: &Delivery,
    event_id: &str,
    action: Action,
) -> Result<(), PublishError> {
    let props = &delivery.properties;
    match action {
        Action::Hold {
            database,
            batch_done,
            expires_in_ms,
        } => {
            let extra = batch_done
                .as_deref()
                .map(|done| (BATCH_DONE_HEADER, text(done)))
                .into_iter()
                .collect();
            let mut p = republish_props(shared, props, &delivery.data, &delivery.data, extra);
            if let Some(ms) = expires_in_ms {
                p = p.with_expiration(ms.to_string().into());
            }
            tracing::info!(database = %database, "database down: request held until it answers");
            let queue = shared.names.hold(&broker.name, &database);
            publish_confirmed(ch, "", &queue, &delivery.data, p, true).await
        }
        Action::Retry {
            tier,
            failure,
            batch_done,
        } => {
            let mut extra = vec![
                (ATTEMPT_HEADER, AMQPValue::LongLongInt(tier as i64)),
                (ERROR_CODE_HEADER, text(failure.code.as_str())),
                (ERROR_MESSAGE_HEADER, text(&failure.message)),
            ];
            if let Some(done) = &batch_done {
                extra.push((BATCH_DONE_HEADER, text(done)));
            }
            let p = republish_props(shared, props, &delivery.data, &delivery.data, extra);
            let queue = shared.names.retry(&broker.name, tier);
            publish_confirmed(ch, "", &queue, &delivery.data, p, true).await
        }
        Action::Answer {
            reply,
            park,
            parked_entries,
        } => {
            if let Some(f) = park {
                tracing::warn!(code = %f.code, error = %f.message, "request parked in the dead-letter queue");
                // A replayed copy gets the full retry tiers again.
                let mut extra = vec![
                    (ATTEMPT_HEADER, AMQPValue::LongLongInt(0)),
                    (ERROR_CODE_HEADER, text(f.code.as_str())),
                    (ERROR_MESSAGE_HEADER, text(&f.message)),
                    (EVENT_ID_HEADER, text(event_id)),
                ];
                let mut body = std::borrow::Cow::Borrowed(delivery.data.as_slice());
                if let Some(keep) = &parked_entries {
                    body = std::borrow::Cow::Owned(batch_subset(&delivery.data, keep));
                    let list = keep
                        .iter()
                        .map(|k| k.to_string())
                        .collect::<Vec<_>>()
                        .join(",");
                    extra.push((BATCH_ENTRIES_HEADER, text(&list)));
                }
                let p = republish_props(shared, props, &delivery.data, &body, extra);
                let dlq = shared.names.dlq(&broker.name);
                publish_confirmed(ch, "", &dlq, &body, p, true).await?;
            }
            if let Some(reply_to) = props.reply_to().as_ref() {
                let mut headers = FieldTable::default();
                headers.insert(EVENT_ID_HEADER.into(), text(&reply.event_id));
                let mut p = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_headers(headers);
                if let Some(cid) = props.correlation_id() {
                    p = p.with_correlation_id(cid.clone());
                }
                // Not mandatory: a client that went away has no queue left,
                // and that must not hold the request.
                publish_confirmed(ch, "", reply_to.as_str(), &reply.body, p, false).await?;
            }
            Ok(())
        }
    }
}

/// Properties for a retried or parked copy: everything of the original but
/// `user_id` (moved to a signed header) and `expiration` (the retry tier's
/// TTL governs; the client's deadline header still applies).
pub(crate) fn republish_props(
    shared: &Shared,
    props: &AMQPProperties,
    original: &[u8],
    body: &[u8],
    extra: Vec<(&str, AMQPValue)>,
) -> BasicProperties {
    let mut headers = match props.headers() {
        // Progress belongs to one attempt: a copy carries only what `extra`
        // says.
        Some(h) if table_size(h) <= MAX_COPIED_HEADERS_BYTES => {
            let mut kept = FieldTable::default();
            for (k, v) in h.inner() {
                let ours = [
                    BATCH_DONE_HEADER,
                    BATCH_ENTRIES_HEADER,
                    USER_HEADER,
                    USER_SIG_HEADER,
                ];
                if !ours.contains(&k.as_str()) {
                    kept.insert(k.clone(), v.clone());
                }
            }
            kept
        }
        Some(h) => {
            // Ours must fit in the same frame: keep only the deadline.
            tracing::warn!(
                "client headers too large to copy onto the retried/parked message; dropped"
            );
            let mut kept = FieldTable::default();
            if let Some(d) = h.inner().get(payload::DEADLINE_HEADER) {
                kept.insert(payload::DEADLINE_HEADER.into(), d.clone());
            }
            kept
        }
        None => FieldTable::default(),
    };
    for (k, v) in extra {
        headers.insert(k.into(), v);
    }
    let user = props
        .user_id()
        .as_ref()
        .map(|u| u.to_string())
        .or_else(|| signed_user(shared, props, original));
    if let Some(user) = user {
        headers.insert(USER_HEADER.into(), text(&user));
        headers.insert(
            USER_SIG_HEADER.into(),
            text(&sign(&shared.retry_key, &user, body)),
        );
    }
    let mut p = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2);
    if let Some(v) = props.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = props.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = props.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = props.reply_to() {
        p = p.with_reply_to(v.clone());
    }
    if let Some(v) = props.message_id() {
        p = p.with_message_id(v.clone());
    }
    if let Some(v) = props.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = props.app_id() {
        p = p.with_app_id(v.clone());
    }
    if let Some(v) = props.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = props.priority() {
        p = p.with_priority(*v);
    }
    p
}

/// The batch body restricted to the entries `keep` (original indices), for
/// a parked copy; the original body if it cannot be rebuilt.
pub(crate) fn batch_subset(body: &[u8], keep: &[usize]) -> Vec<u8> {
    let Ok(serde_json::Value::Object(mut obj)) = serde_json::from_slice(body) else {
        return body.to_vec();
    };
    let Some(serde_json::Value::Array(entries)) = obj.remove("batch") else {
        return body.to_vec();
    };
    let kept: Vec<_> = entries
        .into_iter()
        .enumerate()
        .filter(|(i, _)| keep.contains(i))
        .map(|(_, e)| e)
        .collect();
    obj.insert("batch".into(), serde_json::Value::Array(kept));
    serde_json::to_vec(&obj).unwrap_or_else(|_| body.to_vec())
}

/// Encoded size of a header table, roughly (AMQP field-table encoding).
pub(crate) fn table_size(t: &FieldTable) -> usize {
    4 + t
        .inner()
        .iter()
        .map(|(k, v)| 1 + k.as_str().len() + value_size(v))
        .sum::<usize>()
}

pub(crate) fn value_size(v: &AMQPValue) -> usize {
    1 + match v {
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::FieldTable(t) => table_size(t),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(value_size).sum::<usize>(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        _ => 8,
    }
}

/// The identity a retried message carries, if its signature is ours.
pub(crate) fn signed_user(shared: &Shared, props: &AMQPProperties, body: &[u8]) -> Option<String> {
    let user = match payload::header(props, USER_HEADER)? {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok()?,
        _ => return None,
    };
    let sig = match payload::header(props, USER_SIG_HEADER)? {
        AMQPValue::LongString(s) => hex::decode(s.as_bytes()).ok()?,
        _ => return None,
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(&shared.retry_key).ok()?;
    mac.update(user.as_bytes());
    mac.update(&[0]);
    mac.update(body);
    match mac.verify_slice(&sig) {
        Ok(()) => Some(user),
        Err(_) => {
            tracing::warn!("ignoring a caller identity header with a bad signature");
            None
        }
    }
}

pub(crate) fn sign(key: &[u8], user: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(user.as_bytes());
    mac.update(&[0]);
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

pub(crate) fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.to_string()))
}
