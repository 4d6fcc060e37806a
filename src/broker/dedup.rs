//! Write deduplication by `message_id` (CONTRACT §2): a redelivered write is
//! answered from its first execution instead of being applied again.
//!
//! The memory is per node process. RabbitMQ redelivers to any consumer, so a
//! request first run on another node, or before a restart, is not
//! recognised; see wiki/06-queue-topology.md.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::reply::Encoded;

pub struct Dedup {
    window: Duration,
    max_entries: usize,
    slots: Mutex<HashMap<String, Slot>>,
}

enum Slot {
    /// Being executed now; the receiver changes (or closes) when it ends.
    Running(watch::Receiver<()>),
    /// Finished: the reply body that was sent.
    Done { at: Instant, reply: Arc<Encoded> },
}

pub enum Claim {
    /// First time seen: execute, then `complete` the guard.
    Fresh(DedupGuard),
    /// Already executed within the window: send this body again.
    Cached(Arc<Encoded>),
    /// Another delivery of the same id is executing: wait, then claim again.
    Busy(watch::Receiver<()>),
}

impl Dedup {
    pub fn new(window: Duration, max_entries: usize) -> Arc<Dedup> {
        Arc::new(Dedup {
            window,
            max_entries,
            slots: Mutex::new(HashMap::new()),
        })
    }

    pub fn claim(self: &Arc<Self>, key: String) -> Claim {
        let mut slots = self.slots.lock().unwrap();
        match slots.get(&key) {
            Some(Slot::Done { at, reply }) if at.elapsed() < self.window => {
                return Claim::Cached(reply.clone())
            }
            Some(Slot::Running(rx)) => return Claim::Busy(rx.clone()),
            _ => {}
        }
        if slots.len() >= self.max_entries {
            let window = self.window;
            slots.retain(|_, s| match s {
                Slot::Done { at, .. } => at.elapsed() < window,
                Slot::Running(_) => true,
            });
            if slots.len() >= self.max_entries {
                tracing::warn!(
                    entries = slots.len(),
                    "dedup memory full within its window: forgetting finished requests early"
                );
                slots.retain(|_, s| matches!(s, Slot::Running(_)));
            }
        }
        let (tx, rx) = watch::channel(());
        slots.insert(key.clone(), Slot::Running(rx));
        Claim::Fresh(DedupGuard {
            dedup: self.clone(),
            key,
            tx: Some(tx),
        })
    }
}

/// Held while a claimed request executes. Dropped without `complete` (the
/// request is being retried, or failed before a final answer), the id is
/// forgotten so the next delivery executes it.
pub struct DedupGuard {
    dedup: Arc<Dedup>,
    key: String,
    tx: Option<watch::Sender<()>>,
}

impl DedupGuard {
    pub fn complete(mut self, reply: Arc<Encoded>) {
        let mut slots = self.dedup.slots.lock().unwrap();
        slots.insert(
            std::mem::take(&mut self.key),
            Slot::Done {
                at: Instant::now(),
                reply,
            },
        );
        drop(slots);
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for DedupGuard {
    fn drop(&mut self) {
        if self.tx.is_some() {
            self.dedup.slots.lock().unwrap().remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_is_cached_and_abandoned_claims_are_forgotten() {
        let d = Dedup::new(Duration::from_secs(60), 10);
        let Claim::Fresh(g) = d.claim("a".into()) else {
            panic!()
        };
        assert!(matches!(d.claim("a".into()), Claim::Busy(_)));
        let r = Arc::new(Encoded {
            event_id: "e".into(),
            body: b"r".to_vec(),
            park_again: None,
            parked_entries: None,
            outline: Default::default(),
        });
        g.complete(r.clone());
        assert!(matches!(d.claim("a".into()), Claim::Cached(c) if c == r));

        let Claim::Fresh(g) = d.claim("b".into()) else {
            panic!()
        };
        drop(g);
        assert!(matches!(d.claim("b".into()), Claim::Fresh(_)));
    }
}
