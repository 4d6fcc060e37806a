//! Declares the exchange and queues of CONTRACT §1, idempotently. Names are
//! built here and nowhere else.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::config::QueueType;

/// Queue and exchange names for one installation prefix.
#[derive(Debug, Clone)]
pub struct Names {
    pub prefix: String,
}

impl Names {
    /// The request exchange.
    pub fn exchange(&self) -> &str {
        &self.prefix
    }
    pub fn work(&self, broker: &str) -> String {
        format!("{}.{broker}", self.prefix)
    }
    pub fn retry(&self, broker: &str, tier: usize) -> String {
        format!("{}.{broker}.retry.{tier}", self.prefix)
    }
    pub fn dlq(&self, broker: &str) -> String {
        format!("{}.{broker}.dlq", self.prefix)
    }
    /// Where this broker's requests for `database` wait while it is down.
    pub fn hold(&self, broker: &str, database: &str) -> String {
        format!("{}.{broker}.hold.{database}", self.prefix)
    }
}

pub struct TopologySpec<'a> {
    pub names: &'a Names,
    pub brokers: &'a [String],
    /// Database entry names: each broker gets a hold queue per database.
    pub databases: &'a [String],
    pub retry_tiers_ms: &'a [u64],
    pub queue_type: QueueType,
    pub delivery_limit: u32,
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.to_string()))
}

/// Declares everything; the first failure is returned with the object's
/// name. RabbitMQ closes the channel on a failed declare, so callers should
/// not reuse it after an error.
pub async fn declare(ch: &Channel, spec: &TopologySpec<'_>) -> Result<(), String> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let ex = spec.names.exchange();
    ch.exchange_declare(
        ex.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| format!("exchange {ex}: {e}"))?;

    let typed = |t: &mut FieldTable| {
        // Only quorum is stated explicitly: an existing classic queue
        // declared without the argument must stay equivalent.
        if spec.queue_type == QueueType::Quorum {
            t.insert("x-queue-type".into(), text("quorum"));
        }
    };
    for broker in spec.brokers {
        let dlq = spec.names.dlq(broker);
        let mut args = FieldTable::default();
        typed(&mut args);
        declare_queue(ch, &dlq, durable, args).await?;

        let work = spec.names.work(broker);
        let mut args = FieldTable::default();
        typed(&mut args);
        if spec.queue_type == QueueType::Quorum {
            // A message redelivered this often (a node crashing on it) is
            // parked, never dropped.
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(spec.delivery_limit as i64),
            );
            args.insert("x-dead-letter-exchange".into(), text(""));
            args.insert("x-dead-letter-routing-key".into(), text(&dlq));
            // At-least-once dead-lettering (the default may lose messages on
            // the way to the DLQ); RabbitMQ requires reject-publish with it.
            args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
            args.insert("x-overflow".into(), text("reject-publish"));
        }
        declare_queue(ch, &work, durable, args).await?;
        ch.queue_bind(
            work.as_str().into(),
            ex.into(),
            broker.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("binding {work} to {ex}: {e}"))?;

        for (i, ttl) in spec.retry_tiers_ms.iter().enumerate() {
            let name = spec.names.retry(broker, i + 1);
            let mut args = FieldTable::default();
            typed(&mut args);
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(*ttl as i64));
            args.insert("x-dead-letter-exchange".into(), text(ex));
            args.insert("x-dead-letter-routing-key".into(), text(broker));
            declare_queue(ch, &name, durable, args).await?;
        }

        // Requests wait here while their database is down; a held copy
        // whose deadline passes (its per-message TTL) goes back to the work
        // queue, where it is answered EXPIRED.
        for db in spec.databases {
            let name = spec.names.hold(broker, db);
            let mut args = FieldTable::default();
            typed(&mut args);
            args.insert("x-dead-letter-exchange".into(), text(ex));
            args.insert("x-dead-letter-routing-key".into(), text(broker));
            if spec.queue_type == QueueType::Quorum {
                // As the work queue: an expired held copy is never dropped
                // on its way back.
                args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
                args.insert("x-overflow".into(), text("reject-publish"));
            }
            declare_queue(ch, &name, durable, args).await?;
        }
    }
    Ok(())
}

async fn declare_queue(
    ch: &Channel,
    name: &str,
    opts: QueueDeclareOptions,
    args: FieldTable,
) -> Result<(), String> {
    ch.queue_declare(name.into(), opts, args).await.map(|_| ()).map_err(|e| {
        let hint = if e.to_string().contains("PRECONDITION_FAILED") {
            " (it exists with other arguments: queue type, TTL or limits changed in config; drain and delete it, or restore the old setting)"
        } else {
            ""
        };
        format!("queue {name}: {e}{hint}")
    })
}

pub fn short(s: &str) -> ShortString {
    ShortString::from(s.to_string())
}
