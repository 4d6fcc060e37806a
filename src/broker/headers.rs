//! The AMQP headers BEDS reads and writes beyond the client's own, and the
//! helpers around them: the properties of a retried, held or parked copy,
//! and the signed caller identity such a copy carries (RabbitMQ will not let
//! BEDS republish another user's `user_id`).

use hmac::{Hmac, Mac};
use lapin::protocol::basic::AMQPProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use sha2::Sha256;

use super::payload;
use super::shared::Shared;

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

/// On a parked copy: the name of the node that parked it (`beds dlq list
/// --group-by node`).
pub const NODE_HEADER: &str = "x-beds-node";

/// W3C Trace Context (CONTRACT §2), passed on to the reply.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// On a parked batch: the original indices of the entries it kept.
pub const BATCH_ENTRIES_HEADER: &str = "x-beds-batch-entries";

/// Client headers larger than this are not copied onto retried or parked
/// copies (ours must still fit one frame next to them).
pub(crate) const MAX_COPIED_HEADERS_BYTES: usize = 32 * 1024;

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
            // Ours must fit in the same frame: keep only the deadline and
            // the trace context.
            tracing::warn!(
                "client headers too large to copy onto the retried/parked message; dropped"
            );
            let mut kept = FieldTable::default();
            if let Some(d) = h.inner().get(payload::DEADLINE_HEADER) {
                kept.insert(payload::DEADLINE_HEADER.into(), d.clone());
            }
            if let Some(tp) = traceparent(props) {
                kept.insert(TRACEPARENT_HEADER.into(), text(tp));
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

/// The caller's W3C `traceparent` header (CONTRACT §2), when it is a
/// well-formed one: kept on the request's span, copied onto retried, held
/// and parked copies with the other headers, and onto the reply, so BEDS's
/// records join the caller's trace.
pub(crate) fn traceparent(props: &AMQPProperties) -> Option<&str> {
    let tp = match payload::header(props, TRACEPARENT_HEADER)? {
        lapin::types::AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?,
        lapin::types::AMQPValue::ShortString(s) => s.as_str(),
        _ => return None,
    };
    // version-traceid-parentid-flags: 2-32-16-2 lowercase hex.
    let parts: Vec<&str> = tp.split('-').collect();
    let ok = parts.len() >= 4
        && [2, 32, 16, 2].iter().zip(&parts).all(|(n, p)| {
            p.len() == *n
                && p.bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        });
    ok.then_some(tp)
}
