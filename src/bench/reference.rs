//! The yardsticks `beds bench --reference` measures BEDS against. They run
//! as a separate process (`beds bench-serve`, started by the bench), like a
//! BEDS node, so latency and CPU per request compare like for like:
//!
//! - `broker`: an echo consumer answering every request with a fixed `ok`
//!   reply: the RabbitMQ round trip with no database.
//! - `pipeline`: the thinnest correct Rust data path: lapin consumer →
//!   sqlx `CALL` (MariaDB) or the driver's own call (MongoDB) → reply
//!   published with a publisher confirm → ack. What is
//!   left out is everything BEDS adds: validation, dedup, deadlines,
//!   retries, typed values, access rules, events.

use std::sync::Arc;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::direct::Direct;
use crate::config::{Config, QueueType};
use crate::registry::Registry;

/// `beds bench-serve`: what the bench passes to its reference process.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// `broker` (echo) or `pipeline`.
    #[arg(long)]
    pub kind: String,
    /// The private queue to declare and consume.
    #[arg(long)]
    pub queue: String,
    #[arg(long)]
    pub prefetch: u16,
    /// Template whose database the pipeline connects to.
    #[arg(long, default_value = "usr")]
    pub template: String,
    /// Database connections of the pipeline (default: what BEDS gets).
    #[arg(long)]
    pub pool: Option<u32>,
}

/// Runs a reference until SIGTERM/SIGINT or stdin closes (the bench died).
/// Prints `ready` on stdout once it consumes.
pub async fn serve(config: &Config, args: ServeArgs) -> Result<(), String> {
    // An empty name would make RabbitMQ invent one the bench cannot reach.
    if args.queue.is_empty() || args.queue.len() > 255 {
        return Err("--queue must be 1 to 255 bytes".into());
    }
    let kind = match args.kind.as_str() {
        "broker" => Kind::Echo,
        "pipeline" => {
            let registry = Registry::load_dir(&config.node.templates, config)
                .map_err(|e| format!("templates: {}", e.join("; ")))?;
            let t = registry.get(&args.template).map_err(|e| e.to_string())?;
            Kind::Pipeline {
                db: Direct::open(config, t, args.pool).await?,
                registry: Arc::new(registry),
            }
        }
        other => return Err(format!("unknown reference {other:?}")),
    };
    let server = start(
        &config.amqp.uri(),
        args.queue,
        config.amqp.queue_type,
        args.prefetch,
        kind,
    )
    .await
    .map_err(|e| e.to_string())?;
    println!("ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    let stdin_closed = async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        let mut stdin = tokio::io::stdin();
        while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = stdin_closed => {}
    }
    server.stop().await;
    Ok(())
}

/// A reference consumer, running until `stop`.
pub struct Server {
    conn: Connection,
    channel: Channel,
    /// The queue it consumes (deleted on stop).
    pub queue: String,
    task: JoinHandle<()>,
}

impl Server {
    pub async fn stop(self) {
        self.task.abort();
        let _ = self
            .channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = self.channel.close(200, "bench done".into()).await;
        let _ = self.conn.close(200, "bench done".into()).await;
    }
}

/// What the server does with each request.
#[derive(Clone)]
pub enum Kind {
    Echo,
    Pipeline { db: Direct, registry: Arc<Registry> },
}

/// Declares a private queue like the BEDS work queues (durable, the same
/// queue type; it expires if the bench dies) and starts consuming it.
pub async fn start(
    uri: &str,
    queue: String,
    queue_type: QueueType,
    prefetch: u16,
    kind: Kind,
) -> Result<Server, lapin::Error> {
    let props =
        crate::broker::tokio_properties().with_connection_name("beds bench reference".into());
    let conn = Connection::connect(uri, props).await?;
    let channel = conn.create_channel().await?;
    let mut args = FieldTable::default();
    // Gone a minute after its consumer, even if the bench was killed.
    args.insert("x-expires".into(), AMQPValue::LongLongInt(60_000));
    if queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    if matches!(kind, Kind::Pipeline { .. }) {
        // Correct means nothing is acked before its reply is confirmed.
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
    }
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let ch = channel.clone();
    let task = tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let (ch, kind) = (ch.clone(), kind.clone());
            tokio::spawn(async move {
                let reply = match &kind {
                    Kind::Echo => {
                        br#"{"status":"ok","event_id":"","data":[],"affected":0}"#.to_vec()
                    }
                    Kind::Pipeline { db, registry } => pipeline(db, registry, &d.data).await,
                };
                if let (Some(to), Some(cid)) =
                    (d.properties.reply_to(), d.properties.correlation_id())
                {
                    let props = BasicProperties::default()
                        .with_content_type("application/json".into())
                        .with_correlation_id(cid.clone());
                    let sent = match ch
                        .basic_publish(
                            "".into(),
                            to.clone(),
                            BasicPublishOptions::default(),
                            &reply,
                            props,
                        )
                        .await
                    {
                        // A nack is not a confirm.
                        Ok(confirm) => matches!(
                            confirm.await,
                            Ok(Confirmation::Ack(None) | Confirmation::NotRequested)
                        ),
                        Err(_) => false,
                    };
                    if !sent {
                        return; // unacked: redelivered when the channel closes
                    }
                }
                let _ = d.ack(BasicAckOptions::default()).await;
            });
        }
    });
    Ok(Server {
        conn,
        channel,
        queue,
        task,
    })
}

/// Runs a BrokerPayload or a batch: look up the op, run `data` straight on
/// the database (a `CALL`, or the MongoDB driver's call), rows to JSON. No
/// validation and no retries.
async fn pipeline(db: &Direct, registry: &Registry, body: &[u8]) -> Vec<u8> {
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return error("BAD_PAYLOAD");
    };
    let entries = match req.get("batch").and_then(Value::as_array) {
        Some(b) => b.iter().collect(),
        None => vec![&req],
    };
    let empty = serde_json::Map::new();
    let mut replies = Vec::with_capacity(entries.len());
    for e in &entries {
        let op = registry
            .get(e["template"].as_str().unwrap_or(""))
            .ok()
            .and_then(|t| t.op(e["op"].as_str().unwrap_or("")).ok());
        let Some(op) = op else {
            replies.push(json!({"status": "error", "error": {"code": "UNKNOWN_OPERATION"}}));
            continue;
        };
        let data = e["data"].as_object().unwrap_or(&empty);
        let r = db.run(op, &[data]).await.pop();
        replies.push(match r {
            Some(Ok(data)) => json!({"status": "ok", "data": data, "affected": 0}),
            Some(Err(code)) => json!({"status": "error", "error": {"code": code}}),
            None => json!({"status": "error", "error": {"code": "INTERNAL"}}),
        });
    }
    let reply = if req.get("batch").is_some() {
        json!({"status": "ok", "results": replies})
    } else {
        replies.pop().unwrap_or(Value::Null)
    };
    serde_json::to_vec(&reply).unwrap_or_default()
}

fn error(code: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"status": "error", "error": {"code": code}})).unwrap_or_default()
}
