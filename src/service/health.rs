//! Readiness (`/readyz`) and the proof of life the systemd watchdog wants.
//! A probe task asks RabbitMQ and every database the serving templates use
//! whether they answer, every `http.probe_interval_ms`; each round that
//! completes is a watchdog ping, so a node whose runtime is stuck stops
//! pinging and systemd restarts it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use super::notify;
use crate::broker::AmqpLink;
use crate::logger::EventLog;
use crate::namaste::Adapters;
use crate::registry::Registry;
use crate::supervisor::Supervisor;

/// What `/readyz` answers from.
#[derive(Default)]
pub struct Readiness {
    /// IPL finished and no drain started.
    serving: AtomicBool,
    /// Where the node is: an IPL step, `serving`, `draining`.
    phase: Mutex<String>,
    /// What does not answer now, with why.
    down: Mutex<BTreeMap<String, String>>,
    /// Supervised tasks waiting to be restarted.
    restarting: Mutex<Vec<String>>,
}

impl Readiness {
    pub fn new() -> Arc<Readiness> {
        let r = Readiness::default();
        *r.phase.lock().unwrap() = "starting".into();
        Arc::new(r)
    }

    /// Where the node is now (also its systemd status line).
    pub fn phase(&self, phase: &str) {
        *self.phase.lock().unwrap() = phase.to_string();
        notify::status(phase);
    }

    pub fn set_serving(&self, on: bool) {
        self.serving.store(on, Ordering::Relaxed);
    }

    /// IPL finished and no drain started.
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    /// Ready: serving, and everything it needs answers.
    pub fn is_ready(&self) -> bool {
        self.serving.load(Ordering::Relaxed) && self.down.lock().unwrap().is_empty()
    }

    /// The `/readyz` body.
    pub fn report(&self) -> serde_json::Value {
        json!({
            "ready": self.is_ready(),
            "phase": *self.phase.lock().unwrap(),
            "down": *self.down.lock().unwrap(),
            "restarting": *self.restarting.lock().unwrap(),
        })
    }

    fn set_down(&self, what: String, why: Option<String>) {
        let mut down = self.down.lock().unwrap();
        match why {
            Some(w) => down.insert(what, w),
            None => down.remove(&what),
        };
    }
}

/// What the probe looks at.
pub struct Probe {
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
    pub link: Arc<AmqpLink>,
    pub adapters: Adapters,
    pub registry: Arc<ArcSwap<Registry>>,
    pub supervisor: Supervisor,
    pub events: EventLog,
    pub interval: Duration,
    pub stop: CancellationToken,
}

impl Probe {
    /// Probes until the node stops. The watchdog is pinged at least twice
    /// per `WatchdogSec`, by each round that finished: the round's checks
    /// run at once, each bounded by half the period, so a database that
    /// does not answer delays a ping by at most that.
    pub async fn run(self: Arc<Self>) {
        let every = match notify::watchdog_interval() {
            Some(w) => self.interval.min(w / 2),
            None => self.interval,
        };
        loop {
            self.round(every / 2).await;
            notify::watchdog();
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// One look at everything, the checks side by side, each bounded by
    /// `limit`.
    pub async fn round(&self, limit: Duration) {
        let r = &self.readiness;
        let used: BTreeSet<String> = self
            .registry
            .load()
            .templates()
            .map(|t| t.database.clone())
            .collect();
        let amqp = async {
            tokio::time::timeout(limit, self.link.is_connected())
                .await
                .unwrap_or(false)
        };
        let databases =
            futures::future::join_all(self.adapters.iter().map(|(name, adapter)| async move {
                // A pool with every connection lent out is busy serving, not
                // down: a ping would only queue behind the requests.
                if adapter.pool().is_some_and(|(in_use, max)| in_use >= max) {
                    return (name, None);
                }
                let answer = match tokio::time::timeout(limit, adapter.ping()).await {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some(format!("no answer within {limit:?}")),
                };
                (name, answer)
            }));
        let (amqp, databases) = tokio::join!(amqp, databases);
        self.metrics.set_amqp_up(amqp);
        r.set_down(
            "RabbitMQ".into(),
            (!amqp).then(|| "the connection is closed (dispatchers are reconnecting)".into()),
        );
        for (name, answer) in databases {
            self.metrics.set_database_up(name, answer.is_none());
            // Only databases the templates use decide readiness.
            let why = answer.filter(|_| used.contains(name));
            r.set_down(format!("database {name}"), why);
        }
        self.local();
    }

    /// What can be read without asking anyone (every scrape does it):
    /// pools, restarting tasks, the event log's queue and spool.
    pub fn local(&self) {
        for (name, adapter) in self.adapters.iter() {
            if let Some((in_use, max)) = adapter.pool() {
                self.metrics.set_pool(name, in_use, max);
            }
        }
        let restarting = self.supervisor.degraded();
        self.metrics.set_degraded(restarting.len());
        *self.readiness.restarting.lock().unwrap() = restarting;
        let (spool, spool_dropped) = self.events.spool();
        self.metrics.set_event_log(
            self.events.queued(),
            spool,
            [self.events.dropped(), spool_dropped],
        );
        self.metrics.set_ready(self.readiness.is_ready());
    }
}
