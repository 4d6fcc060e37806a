//! The node list outside the admin node's memory: the admin node records
//! each member's last heartbeat in MongoDB (`admin.node_collection`,
//! `msNodes`, next to the event log), so the observer can show the nodes,
//! and which went silent, while every BEDS process is down.
//!
//! Writing never holds up the membership: heartbeats land in a map (latest
//! per node) that a task of its own writes out, so a slow or absent MongoDB
//! costs at most one pending record per node.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use mongodb::bson::{doc, DateTime, Document};
use mongodb::Collection;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Heartbeat;
use crate::logger::ttl_index;

/// How long one record's write may take before it waits for the next.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Roster {
    coll: Collection<Document>,
    /// Stored with each record, so the observer marks a node missing by the
    /// same rule as `beds admin status` without reading BEDS's config.
    missing_after_ms: u64,
    /// Heard and not yet written: (heartbeat, when the admin node heard it).
    pending: Mutex<BTreeMap<String, (Heartbeat, i64)>>,
    wake: Notify,
    /// Set while writes fail, so a MongoDB outage warns once, not per beat.
    failing: AtomicBool,
}

impl Roster {
    pub fn new(coll: Collection<Document>, missing_after_ms: u64) -> Roster {
        Roster {
            coll,
            missing_after_ms,
            pending: Mutex::default(),
            wake: Notify::new(),
            failing: AtomicBool::new(false),
        }
    }

    /// A TTL on `last_seen`: a node gone for good leaves the list after the
    /// counters' retention.
    pub async fn ensure_indexes(&self, retention: Duration) -> Result<(), String> {
        self.coll
            .create_index(ttl_index("last_seen_ttl", doc! {"last_seen": 1}, retention))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Queues `hb`, heard at `seen_ms` (the admin node's clock: a node's
    /// own clock may be off).
    pub fn heard(&self, hb: &Heartbeat, seen_ms: i64) {
        self.pending
            .lock()
            .unwrap()
            .insert(hb.node.clone(), (hb.clone(), seen_ms));
        self.wake.notify_one();
    }

    /// Upserts one member's record, bounded by [`WRITE_TIMEOUT`].
    async fn write(&self, hb: &Heartbeat, seen_ms: i64) -> Result<(), String> {
        let record = record_doc(hb, seen_ms, self.missing_after_ms);
        let write = self
            .coll
            .replace_one(doc! {"_id": &hb.node}, record)
            .upsert(true);
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {WRITE_TIMEOUT:?}")),
        }
    }

    /// Records `hb` now: the admin node's own goodbye at its stop, which
    /// its membership (stopping too) would not hear.
    pub async fn record_now(&self, hb: &Heartbeat, seen_ms: i64) {
        if let Err(e) = self.write(hb, seen_ms).await {
            tracing::warn!(error = %e, "admin plane: the admin node's own stop not recorded");
        }
    }

    /// Writes what was heard until `stop`.
    pub async fn run(&self, stop: &CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.wake.notified() => {}
            }
            let batch = std::mem::take(&mut *self.pending.lock().unwrap());
            for (node, (hb, seen_ms)) in batch {
                match self.write(&hb, seen_ms).await {
                    Ok(()) => {
                        if self.failing.swap(false, Ordering::Relaxed) {
                            tracing::info!("admin plane: node records are written again");
                        }
                    }
                    Err(e) => {
                        if !self.failing.swap(true, Ordering::Relaxed) {
                            tracing::warn!(error = %e, "admin plane: node records not written; the next heartbeats retry");
                        }
                        // Keep it unless a newer heartbeat replaced it.
                        self.pending
                            .lock()
                            .unwrap()
                            .entry(node)
                            .or_insert((hb, seen_ms));
                    }
                }
            }
        }
    }
}

/// One member as `msNodes` stores it (`_id` = node name).
pub fn record_doc(hb: &Heartbeat, seen_ms: i64, missing_after_ms: u64) -> Document {
    doc! {
        "_id": &hb.node,
        "node": &hb.node,
        "role": &hb.role,
        "brokers": &hb.brokers,
        "version": &hb.version,
        "templates": &hb.templates,
        "started": DateTime::from_millis(hb.started_ms),
        "last_seen": DateTime::from_millis(seen_ms),
        "alive": hb.alive,
        "missing_after_ms": missing_after_ms as i64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_holds_what_the_observer_lists() {
        let hb = Heartbeat {
            node: "seg-1".into(),
            role: "segundo".into(),
            brokers: vec!["whBroker".into(), "cBroker".into()],
            version: "0.1.0".into(),
            templates: "v7".into(),
            started_ms: 1_000,
            ts_ms: 5_000,
            alive: false,
        };
        let d = record_doc(&hb, 6_000, 15_000);
        assert_eq!(d.get_str("_id").unwrap(), "seg-1");
        assert_eq!(d.get_str("role").unwrap(), "segundo");
        assert_eq!(d.get_array("brokers").unwrap().len(), 2);
        assert_eq!(d.get_str("templates").unwrap(), "v7");
        // The admin node's clock, not the heartbeat's.
        assert_eq!(
            d.get_datetime("last_seen").unwrap().timestamp_millis(),
            6_000
        );
        assert_eq!(d.get_datetime("started").unwrap().timestamp_millis(), 1_000);
        assert!(!d.get_bool("alive").unwrap());
        assert_eq!(d.get_i64("missing_after_ms").unwrap(), 15_000);
    }
}
