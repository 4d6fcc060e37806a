//! Carrying out an `Action`: the reply, and retried, held and parked (DLQ)
//! copies, each published with a confirm.

use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};

use super::action::Action;
use super::headers::{
    republish_props, text, traceparent, ATTEMPT_HEADER, BATCH_DONE_HEADER, BATCH_ENTRIES_HEADER,
    ERROR_CODE_HEADER, ERROR_MESSAGE_HEADER, EVENT_ID_HEADER, NODE_HEADER, TRACEPARENT_HEADER,
};
use super::shared::{BrokerSpec, Shared};
use super::{publish_confirmed, PublishError};
use crate::error::ErrorCode;

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
    headers.insert(NODE_HEADER.into(), text(&shared.node));
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
                    (NODE_HEADER, text(&shared.node)),
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
                if let Some(tp) = traceparent(props) {
                    headers.insert(TRACEPARENT_HEADER.into(), text(tp));
                }
                let mut p = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_headers(headers);
                if let Some(cid) = props.correlation_id() {
                    p = p.with_correlation_id(cid.clone());
                }
                // A persistent request gets a persistent reply: one waiting
                // in a durable reply queue then survives a RabbitMQ restart.
                if props.delivery_mode() == &Some(2) {
                    p = p.with_delivery_mode(2);
                }
                // Not mandatory: a client that went away has no queue left,
                // and that must not hold the request.
                publish_confirmed(ch, "", reply_to.as_str(), &reply.body, p, false).await?;
            }
            Ok(())
        }
    }
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
