//! What the dispatchers of a node share: the services (templates,
//! adapters, dedup memory, queue names, the retry key), the limits from
//! `[dispatch]`, the broker each dispatcher serves, and the poison-message
//! strikes. Read-only after IPL, except the dedup memory and the strikes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use super::dedup::Dedup;
use super::topology::Names;
use crate::config::{Access, Config};
use crate::namaste::Adapters;
use crate::registry::Registry;

/// What every dispatcher of the node shares, read-only.
pub struct Shared {
    /// The template set, swapped whole by a reload (SIGHUP, `beds
    /// reload`); each request loads it once and finishes on that set.
    pub registry: Arc<arc_swap::ArcSwap<Registry>>,
    /// NamasteCore adapters by database name; a hold queue's consumer
    /// follows its database's health.
    pub adapters: Adapters,
    /// Write dedup memory by `message_id`.
    pub dedup: Arc<Dedup>,
    pub names: Names,
    /// The limits every request is held to.
    pub limits: Limits,
    /// HMAC key for the identity carried through retries.
    pub retry_key: Vec<u8>,
    /// Node name, for consumer tags.
    pub node: String,
    /// Poison-message guard: attempts whose outcome was never published.
    pub strikes: Strikes,
    /// Where every handled request is logged (CONTRACT §7); never waits.
    pub events: crate::logger::EventLog,
    /// Prometheus counters, fed from the same events.
    pub metrics: Arc<crate::service::metrics::Metrics>,
}

/// Numbers from `[dispatch]` that bound each request.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Number of retry tiers (queues `.retry.1` … `.retry.N`).
    pub retry_tiers: usize,
    /// Largest body accepted, checked before parsing.
    pub max_payload: usize,
    /// Most entries one batch may hold.
    pub max_batch: usize,
    /// How long a shutdown waits for in-flight requests.
    pub drain: Duration,
}

/// One broker this node serves.
#[derive(Debug, Clone)]
pub struct BrokerSpec {
    pub name: String,
    pub serves: Vec<Access>,
    /// The templates it serves (`brokers.<name>.templates`); others are
    /// answered `WRONG_BROKER` naming the brokers that do serve them.
    pub scope: TemplateScope,
    /// The queue consumed: the broker's work queue or one of its hold queues.
    pub queue: String,
    /// Hold queues: the database whose requests wait there. Consuming
    /// pauses while it is down.
    pub gate: Option<String>,
}

/// Failed attempts per request: its outcome could not be published, or its
/// ack failed (typically because the connection closed under it). Cleared
/// when a later attempt completes.
#[derive(Default)]
pub struct Strikes {
    counts: std::sync::Mutex<HashMap<[u8; 32], u8>>,
}

impl Strikes {
    pub(crate) fn get(&self, print: [u8; 32]) -> u8 {
        self.counts
            .lock()
            .unwrap()
            .get(&print)
            .copied()
            .unwrap_or(0)
    }

    pub(crate) fn add(&self, print: [u8; 32]) {
        let mut counts = self.counts.lock().unwrap();
        if counts.len() > 10_000 {
            counts.clear(); // memory bound; worst case a poison loop resumes
        }
        let n = counts.entry(print).or_insert(0);
        *n = n.saturating_add(1);
    }

    pub(crate) fn clear(&self, print: [u8; 32]) {
        self.counts.lock().unwrap().remove(&print);
    }
}

/// Which templates one broker serves, and who serves the rest: segundo's
/// and tercero's brokers name their templates in config, the others serve
/// every template no broker names.
#[derive(Debug, Clone, Default)]
pub struct TemplateScope {
    /// `Some`: only these; `None`: every template no broker names.
    pub only: Option<BTreeSet<String>>,
    /// Installation-wide: template → the brokers naming it.
    pub claims: Arc<BTreeMap<String, Vec<String>>>,
    /// Installation-wide: the brokers naming no templates.
    pub open: Arc<Vec<String>>,
}

impl TemplateScope {
    /// The scope of `broker` under `config`.
    pub fn of(config: &Config, broker: &str) -> TemplateScope {
        let mut claims: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut open = Vec::new();
        for (name, b) in &config.brokers {
            match &b.templates {
                Some(list) => {
                    for t in list {
                        claims.entry(t.clone()).or_default().push(name.clone());
                    }
                }
                None => open.push(name.clone()),
            }
        }
        TemplateScope {
            only: config
                .brokers
                .get(broker)
                .and_then(|b| b.templates.as_ref())
                .map(|l| l.iter().cloned().collect()),
            claims: Arc::new(claims),
            open: Arc::new(open),
        }
    }

    pub fn serves(&self, template: &str) -> bool {
        match &self.only {
            Some(only) => only.contains(template),
            None => !self.claims.contains_key(template),
        }
    }

    /// The brokers serving `template`, for the error message.
    pub fn served_by(&self, template: &str) -> String {
        self.claims.get(template).unwrap_or(&self.open).join(", ")
    }
}
