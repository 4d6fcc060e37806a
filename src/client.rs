//! A small BEDS client for Rust applications (and `beds call`): publishes a
//! BrokerPayload per CONTRACT §2 and waits, with a timeout on every call, for
//! the reply on RabbitMQ's direct reply-to.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::oneshot;

use crate::broker::payload::DEADLINE_HEADER;
use crate::broker::publish_confirmed;
use crate::broker::reply::Reply;

/// RabbitMQ's direct reply-to pseudo-queue.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to RabbitMQ: {0}")]
    Connect(String),
    #[error("cannot publish the request: {0}")]
    Publish(String),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("reply is not a BEDS reply: {0}")]
    BadReply(String),
}

/// Per-call options. `Default` gives a 5 s timeout and nothing else.
#[derive(Debug, Clone)]
pub struct CallOptions {
    /// How long to wait for the reply.
    pub timeout: Duration,
    /// Dedup key for writes (CONTRACT §2).
    pub message_id: Option<String>,
    /// `x-beds-deadline`: BEDS will not execute the request after this
    /// Unix epoch millisecond.
    pub deadline_ms: Option<i64>,
    /// Must equal the connection's user; RabbitMQ verifies it.
    pub user_id: Option<String>,
    /// Delivery mode 2: the request survives a RabbitMQ restart.
    pub persistent: bool,
    /// The event that caused this request (the `event_id` of an earlier
    /// reply): sent as the payload's `parent_event_id`, so the event log
    /// ties the two into one chain.
    pub parent_event_id: Option<String>,
}

impl Default for CallOptions {
    fn default() -> Self {
        CallOptions {
            timeout: Duration::from_secs(5),
            message_id: None,
            deadline_ms: None,
            user_id: None,
            persistent: false,
            parent_event_id: None,
        }
    }
}

/// Opens an AMQP connection the way `beds call` does (10 s limit, TLS as
/// configured); `beds dlq` shares it.
pub async fn connect_amqp(
    uri: &str,
    tls: lapin::tcp::OwnedTLSConfig,
) -> Result<Connection, ClientError> {
    let props = crate::broker::tokio_properties();
    let connect = async {
        Connection::connect_with_config(uri, props, tls, lapin::runtime::default_runtime()?).await
    };
    tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .map_err(|_| ClientError::Connect("timed out".into()))?
        .map_err(|e| ClientError::Connect(e.to_string()))
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Delivery>>>>;

pub struct Client {
    /// Kept so the connection lives as long as the client.
    conn: Connection,
    channel: Channel,
    /// The request exchange (`amqp.prefix`).
    exchange: String,
    /// Correlation id → the caller waiting for that reply.
    pending: Pending,
}

impl Client {
    /// Connects and starts listening on direct reply-to. `prefix` is the
    /// installation's exchange name (`beds` by default). Every publish waits
    /// for RabbitMQ's confirm.
    pub async fn connect(uri: &str, prefix: &str) -> Result<Client, ClientError> {
        Client::connect_with(uri, prefix, true).await
    }

    /// [`Client::connect`], choosing whether publishes wait for RabbitMQ's
    /// confirm. Without, a request lost on the way in is only noticed by
    /// its missing reply (the call times out); `beds bench --no-confirm`
    /// uses it to show what the confirms cost.
    pub async fn connect_with(
        uri: &str,
        prefix: &str,
        confirms: bool,
    ) -> Result<Client, ClientError> {
        Client::connect_tls(uri, prefix, confirms, Default::default()).await
    }

    /// [`Client::connect_with`] over `amqps` with a private CA or a client
    /// certificate (`crate::broker::tls_config`).
    pub async fn connect_tls(
        uri: &str,
        prefix: &str,
        confirms: bool,
        tls: lapin::tcp::OwnedTLSConfig,
    ) -> Result<Client, ClientError> {
        let conn = connect_amqp(uri, tls).await?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        if confirms {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| ClientError::Connect(e.to_string()))?;
        }
        let mut replies = channel
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let pending: Pending = Arc::default();
        let waiting = pending.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = replies.next().await {
                let Some(cid) = d
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(|c| c.to_string())
                else {
                    continue;
                };
                if let Some(tx) = waiting.lock().unwrap().remove(&cid) {
                    let _ = tx.send(d);
                }
            }
        });
        Ok(Client {
            conn,
            channel,
            exchange: prefix.to_string(),
            pending,
        })
    }

    /// Sends one request (a BrokerPayload or a batch) to `broker` and parses
    /// the reply.
    pub async fn call(
        &self,
        broker: &str,
        payload: &serde_json::Value,
        opts: &CallOptions,
    ) -> Result<Reply, ClientError> {
        let with_parent;
        let payload = match (&opts.parent_event_id, payload) {
            (Some(p), serde_json::Value::Object(o)) if !o.contains_key("parent_event_id") => {
                let mut o = o.clone();
                o.insert("parent_event_id".into(), p.clone().into());
                with_parent = serde_json::Value::Object(o);
                &with_parent
            }
            _ => payload,
        };
        let body = serde_json::to_vec(payload).map_err(|e| ClientError::Publish(e.to_string()))?;
        let d = self
            .call_raw(broker, &body, self.properties(opts), opts.timeout)
            .await?;
        serde_json::from_slice(&d.data).map_err(|e| ClientError::BadReply(e.to_string()))
    }

    /// The properties `call` would send, for callers that want to adjust
    /// them before `call_raw`.
    pub fn properties(&self, opts: &CallOptions) -> BasicProperties {
        let mut p = BasicProperties::default().with_content_type("application/json".into());
        if let Some(m) = &opts.message_id {
            p = p.with_message_id(m.clone().into());
        }
        if let Some(u) = &opts.user_id {
            p = p.with_user_id(u.clone().into());
        }
        if opts.persistent {
            p = p.with_delivery_mode(2);
        }
        if let Some(d) = opts.deadline_ms {
            let mut h = FieldTable::default();
            h.insert(DEADLINE_HEADER.into(), AMQPValue::LongLongInt(d));
            p = p.with_headers(h);
        }
        p
    }

    /// Sends any body with any properties (`reply_to` and `correlation_id`
    /// are set here) and returns the raw reply delivery.
    pub async fn call_raw(
        &self,
        broker: &str,
        body: &[u8],
        props: BasicProperties,
        timeout: Duration,
    ) -> Result<Delivery, ClientError> {
        // From the thread's CSPRNG: no getrandom syscall per call.
        let cid = uuid::Builder::from_random_bytes(rand::random())
            .into_uuid()
            .to_string();
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(cid.clone(), tx);
        let props = props
            .with_reply_to(DIRECT_REPLY_TO.into())
            .with_correlation_id(cid.clone().into());
        let sent = tokio::time::timeout(
            timeout,
            publish_confirmed(&self.channel, &self.exchange, broker, body, props, false),
        )
        .await;
        let outcome = match sent {
            Err(_) => Err(ClientError::Timeout(timeout)),
            Ok(Err(e)) => Err(ClientError::Publish(e.to_string())),
            Ok(Ok(())) => match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(d)) => return Ok(d),
                Ok(Err(_)) => Err(ClientError::BadReply("reply listener stopped".into())),
                Err(_) => Err(ClientError::Timeout(timeout)),
            },
        };
        self.pending.lock().unwrap().remove(&cid);
        outcome
    }

    /// Publishes without waiting for a reply (fire-and-forget).
    pub async fn send(
        &self,
        broker: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), ClientError> {
        publish_confirmed(&self.channel, &self.exchange, broker, body, props, false)
            .await
            .map_err(|e| ClientError::Publish(e.to_string()))
    }

    /// Closes the channel and the connection, each bounded: a close-ok
    /// that never comes must not hang a caller that is done.
    pub async fn close(self) {
        let bound = Duration::from_secs(5);
        let _ = tokio::time::timeout(bound, self.channel.close(200, "bye".into())).await;
        let _ = tokio::time::timeout(bound, self.conn.close(200, "bye".into())).await;
    }
}
