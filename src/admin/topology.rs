//! The admin plane's queues on the request exchange `<prefix>` (topic):
//!
//! | routing key | queue | who consumes |
//! |---|---|---|
//! | `adminBrokerIn` | `<prefix>.adminBrokerIn` (durable, 60 s TTL: a stale command never runs late) | admin nodes |
//! | `adminBrokerOut`, `adminBrokerOut.<node>` | `<prefix>.adminBrokerOut.<node>.<id>` (exclusive) | every node |
//! | `adminSyslogBroker` | `<prefix>.adminSyslogBroker.<node>.<id>` (exclusive) | each admin node sees every heartbeat |
//! | `adminGraphBroker` | `<prefix>.adminGraphBroker` (durable, bounded) | admin nodes, each window stored once |

use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;

pub const IN: &str = "adminBrokerIn";
pub const OUT: &str = "adminBrokerOut";
pub const SYSLOG: &str = "adminSyslogBroker";
pub const GRAPH: &str = "adminGraphBroker";

/// A command waiting longer than this for an admin node is dropped by
/// RabbitMQ: `beds admin` has given up on it long before.
const COMMAND_TTL_MS: i64 = 60_000;
/// Counter windows kept while no admin node consumes them.
const GRAPH_BACKLOG: i64 = 100_000;

pub fn in_queue(prefix: &str) -> String {
    format!("{prefix}.{IN}")
}

pub fn graph_queue(prefix: &str) -> String {
    format!("{prefix}.{GRAPH}")
}

/// The routing key that reaches one node's agent.
pub fn node_key(node: &str) -> String {
    format!("{OUT}.{node}")
}

/// Declares the durable admin queues (idempotent; every node does it, so
/// the first heartbeat or command already has somewhere to go).
pub async fn declare_shared(ch: &Channel, prefix: &str) -> Result<(), lapin::Error> {
    let mut args = FieldTable::default();
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(COMMAND_TTL_MS),
    );
    durable(ch, prefix, &in_queue(prefix), IN, args).await?;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(GRAPH_BACKLOG));
    durable(ch, prefix, &graph_queue(prefix), GRAPH, args).await
}

async fn durable(
    ch: &Channel,
    prefix: &str,
    queue: &str,
    key: &str,
    args: FieldTable,
) -> Result<(), lapin::Error> {
    let opts = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), opts, args).await?;
    ch.queue_bind(
        queue.into(),
        prefix.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// An exclusive queue of this connection, bound to `keys`; gone with it.
pub async fn private(
    ch: &Channel,
    prefix: &str,
    name: &str,
    keys: &[String],
) -> Result<String, lapin::Error> {
    let queue = format!(
        "{prefix}.{name}.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let opts = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    ch.queue_declare(queue.as_str().into(), opts, FieldTable::default())
        .await?;
    for k in keys {
        ch.queue_bind(
            queue.as_str().into(),
            prefix.into(),
            k.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(queue)
}

/// A reply queue of the caller's own (server-named, exclusive, gone with
/// its channel) and a consumer on it: where answers come back.
pub async fn reply_queue(ch: &Channel) -> Result<(String, lapin::Consumer), lapin::Error> {
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let name = q.name().to_string();
    let consumer = ch
        .basic_consume(
            name.as_str().into(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((name, consumer))
}

/// Publishes `answer` as JSON to the `reply_to` of `request`, with its
/// correlation id. Without a confirm: whoever waits names the silence.
pub async fn reply<T: serde::Serialize>(
    ch: &Channel,
    request: &lapin::BasicProperties,
    answer: &T,
) {
    let (Some(reply_to), Ok(body)) = (request.reply_to(), serde_json::to_vec(answer)) else {
        return;
    };
    let mut props = lapin::BasicProperties::default().with_content_type("application/json".into());
    if let Some(id) = request.correlation_id() {
        props = props.with_correlation_id(id.clone());
    }
    let _ = ch
        .basic_publish(
            "".into(),
            reply_to.as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            &body,
            props,
        )
        .await;
}
