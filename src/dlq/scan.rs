//! Reading a DLQ without losing anything. AMQP 0-9-1 has no "peek": every
//! message is taken with `basic.get` (no auto-ack) and held unacked until
//! the command is done; then each is either removed (acked: replayed or
//! purged) or given back.
//!
//! Giving back differs by queue type (wiki/17):
//! - **classic**: `basic.nack` with requeue. RabbitMQ puts each message back
//!   at its old position; nothing about it changes.
//! - **quorum**: every return counts as a delivery (`x-delivery-count`;
//!   measured on RabbitMQ 3.10, and so up to 4.2), and a quorum queue drops
//!   a message past its delivery limit (RabbitMQ 4.0 defaults it to 20; the
//!   DLQ has no dead-letter target). Browsing twenty times would empty the
//!   DLQ. So each kept message is *refreshed* instead: a copy is published
//!   to the DLQ's tail with a confirm, and only then is the original acked.
//!   The copy has no delivery count; the order is kept (the kept messages are
//!   requeued in their old order, behind anything parked meanwhile). If the
//!   command dies between the two, the DLQ holds the message twice, never
//!   zero times.

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};

use super::parked::{Parked, DELIVERY_COUNT_HEADER};
use crate::broker::publish_confirmed;

/// One message taken from the DLQ and not yet settled.
pub struct Held {
    pub delivery: lapin::message::Delivery,
    pub summary: Parked,
    /// Acked (replayed or purged): gone from the DLQ.
    pub removed: bool,
}

/// The messages of one DLQ, held unacked.
pub struct Scan {
    ch: Channel,
    pub queue: String,
    /// Messages in the queue when the scan began.
    pub total: usize,
    pub held: Vec<Held>,
    /// Give messages back by republishing (quorum), not by requeueing.
    refresh: bool,
    /// The connection's own user: a copy may keep a `user_id` only if it is
    /// this one (RabbitMQ refuses any other).
    user: String,
}

/// Why a scan could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("queue {0} does not exist (has a node of this installation run with this broker?)")]
    NoQueue(String),
    #[error("{0}")]
    Amqp(String),
}

impl Scan {
    /// Takes up to `max` messages (those in the queue now, not those parked
    /// while it runs). `quorum`: the DLQ is a quorum queue.
    pub async fn take(
        ch: &Channel,
        queue: &str,
        max: usize,
        quorum: bool,
        user: &str,
    ) -> Result<Scan, ScanError> {
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                if e.to_string().contains("NOT_FOUND") {
                    ScanError::NoQueue(queue.to_string())
                } else {
                    ScanError::Amqp(format!("queue {queue}: {e}"))
                }
            })?;
        let total = q.message_count() as usize;
        let mut held = Vec::new();
        while held.len() < total.min(max) {
            let got = ch
                .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(|e| ScanError::Amqp(format!("reading {queue}: {e}")))?;
            let Some(m) = got else { break };
            let summary = Parked::read(held.len() + 1, &m.delivery.properties, &m.delivery.data);
            held.push(Held {
                delivery: m.delivery,
                summary,
                removed: false,
            });
        }
        // A quorum DLQ the config calls classic still shows itself by the
        // header only quorum queues set.
        let refresh = quorum || held.iter().any(|h| h.summary.delivery_count.is_some());
        Ok(Scan {
            ch: ch.clone(),
            queue: queue.to_string(),
            total,
            held,
            refresh,
            user: user.to_string(),
        })
    }

    /// Removes message `i` (index into `held`) from the DLQ for good.
    pub async fn remove(&mut self, i: usize) -> Result<(), lapin::Error> {
        let h = &mut self.held[i];
        h.delivery.acker.ack(BasicAckOptions::default()).await?;
        h.removed = true;
        Ok(())
    }

    /// Gives every message not removed back to the DLQ, in order. Returns
    /// warnings (messages that had to be requeued on a quorum queue).
    pub async fn give_back(self) -> Result<Vec<String>, String> {
        let mut warnings = Vec::new();
        for h in self.held.iter().filter(|h| !h.removed) {
            let d = &h.delivery;
            let foreign_user = d
                .properties
                .user_id()
                .as_ref()
                .is_some_and(|u| u.as_str() != self.user);
            if self.refresh && !foreign_user {
                let props = without_delivery_count(d.properties.clone());
                publish_confirmed(&self.ch, "", &self.queue, &d.data, props, true)
                    .await
                    .map_err(|e| {
                        format!(
                            "refreshing message {} in {}: {e}; it and those after it return with one more delivery counted",
                            h.summary.n, self.queue
                        )
                    })?;
                d.acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| format!("acking the refreshed message {}: {e}", h.summary.n))?;
            } else {
                if self.refresh {
                    // RabbitMQ would refuse a copy with another user's
                    // user_id: return the original itself.
                    warnings.push(format!(
                        "message {} carries user_id {:?}: requeued, not refreshed (its quorum delivery count rose by one)",
                        h.summary.n,
                        d.properties.user_id().as_ref().map(|u| u.to_string()).unwrap_or_default()
                    ));
                }
                d.acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await
                    .map_err(|e| format!("returning message {}: {e}", h.summary.n))?;
            }
        }
        Ok(warnings)
    }
}

/// The properties for a refreshed copy: as they were, without RabbitMQ's
/// own delivery count.
fn without_delivery_count(p: BasicProperties) -> BasicProperties {
    match p.headers().clone() {
        Some(h) if h.inner().contains_key(DELIVERY_COUNT_HEADER) => {
            let mut t = FieldTable::default();
            for (k, v) in h.inner() {
                if k.as_str() != DELIVERY_COUNT_HEADER && k.as_str() != "x-acquired-count" {
                    t.insert(k.clone(), v.clone());
                }
            }
            p.with_headers(t)
        }
        _ => p,
    }
}
