//! Prometheus metrics (`GET /metrics`), from `prometheus-client`. Request
//! counters are fed by the same events the event log gets, so the two
//! never disagree; gauges (pools, database up, the log's queue and spool)
//! are read fresh at each scrape.

use std::sync::atomic::{AtomicI64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry as Prom;

use crate::error::ErrorCode;
use crate::logger::Event;
use crate::registry::Registry;

/// Latency buckets, seconds: sub-millisecond reads up to requests that
/// waited on a slow database.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Template and op labels of a request that named no known template or op:
/// client strings must not become label values (unbounded series).
const UNKNOWN: &str = "(unknown)";
/// The template label of a batch (its entries are counted one by one).
const BATCH: &str = "(batch)";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    broker: String,
    template: String,
    op: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BrokerLabels {
    broker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    broker: String,
    tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    broker: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DatabaseLabels {
    database: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    node: String,
    role: String,
}

type Histograms = Family<BrokerLabels, Histogram, fn() -> Histogram>;

/// Every metric of a node. One per process, shared by reference.
pub struct Metrics {
    prom: Prom,
    requests: Family<RequestLabels, Counter>,
    entries: Family<RequestLabels, Counter>,
    latency: Histograms,
    in_flight: Family<BrokerLabels, Gauge>,
    retries: Family<TierLabels, Counter>,
    outcomes: Family<OutcomeLabels, Counter>,
    repeats: Family<SourceLabels, Counter>,
    database_up: Family<DatabaseLabels, Gauge>,
    pool_in_use: Family<DatabaseLabels, Gauge>,
    pool_max: Family<DatabaseLabels, Gauge>,
    amqp_up: Gauge,
    ready: Gauge,
    degraded_tasks: Gauge,
    log_queue: Gauge,
    log_spool_bytes: Gauge,
    log_dropped: Family<ReasonLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    templates: Gauge,
    /// Unix seconds of the last successful template load (IPL or reload).
    templates_loaded_at: Gauge,
    /// What the log's drop counters said at the last scrape (they are
    /// cumulative elsewhere; Prometheus counters only go up).
    seen_dropped: [AtomicI64; 2],
    /// Per-broker totals and counter windows for admin `status` and the
    /// admin counters (Prometheus families cannot be read back).
    pub tally: super::tally::Tally,
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

impl Metrics {
    pub fn new(node: &str, role: &str) -> Metrics {
        let mut prom = Prom::with_prefix("beds");
        let m = Metrics {
            requests: Family::default(),
            entries: Family::default(),
            latency: Family::new_with_constructor(histogram as fn() -> Histogram),
            in_flight: Family::default(),
            retries: Family::default(),
            outcomes: Family::default(),
            repeats: Family::default(),
            database_up: Family::default(),
            pool_in_use: Family::default(),
            pool_max: Family::default(),
            amqp_up: Gauge::default(),
            ready: Gauge::default(),
            degraded_tasks: Gauge::default(),
            log_queue: Gauge::default(),
            log_spool_bytes: Gauge::default(),
            log_dropped: Family::default(),
            reloads: Family::default(),
            templates: Gauge::default(),
            templates_loaded_at: Gauge::default(),
            seen_dropped: Default::default(),
            tally: Default::default(),
            prom: Prom::default(),
        };
        prom.register(
            "requests",
            "Requests handled, by broker, template, op and answer code (OK or the contract's error code)",
            m.requests.clone(),
        );
        prom.register(
            "batch_entries",
            "Batch entries answered, by broker, template, op and code",
            m.entries.clone(),
        );
        prom.register(
            "request_duration_seconds",
            "Time from delivery to decided answer, per broker",
            m.latency.clone(),
        );
        prom.register(
            "requests_in_flight",
            "Requests being handled now",
            m.in_flight.clone(),
        );
        prom.register(
            "retries",
            "Requests sent to a retry tier, by broker and tier",
            m.retries.clone(),
        );
        prom.register(
            "request_outcomes",
            "What became of requests beyond their answer: parked, quarantined, held, cut, requeued",
            m.outcomes.clone(),
        );
        prom.register(
            "repeats",
            "Repeated writes answered from their first execution, by source (memory or inbox)",
            m.repeats.clone(),
        );
        prom.register(
            "database_up",
            "1 while the database answers (probed every http.probe_interval_ms)",
            m.database_up.clone(),
        );
        prom.register(
            "database_connections_in_use",
            "Pool connections lent out now (MongoDB: over all members, from the driver's pool events)",
            m.pool_in_use.clone(),
        );
        prom.register(
            "database_connections_max",
            "Pool size limit (max_connections; MongoDB: per member)",
            m.pool_max.clone(),
        );
        prom.register(
            "amqp_up",
            "1 while the RabbitMQ connection is open",
            m.amqp_up.clone(),
        );
        prom.register("ready", "1 while /readyz answers 200", m.ready.clone());
        prom.register(
            "tasks_restarting",
            "Supervised tasks that died and wait to be restarted",
            m.degraded_tasks.clone(),
        );
        prom.register(
            "event_log_queue_depth",
            "Events waiting in memory for the log writer",
            m.log_queue.clone(),
        );
        prom.register(
            "event_log_spool_bytes",
            "Bytes of events spooled on disk while MongoDB does not answer",
            m.log_spool_bytes.clone(),
        );
        prom.register(
            "event_log_dropped",
            "Events lost: queue_full (the writer could not keep up) or spool_full (oldest spooled events dropped)",
            m.log_dropped.clone(),
        );
        prom.register(
            "template_reloads",
            "Template reloads, by result (ok or refused)",
            m.reloads.clone(),
        );
        prom.register(
            "templates",
            "Templates in the serving set",
            m.templates.clone(),
        );
        prom.register(
            "templates_loaded_timestamp_seconds",
            "When the serving template set was loaded",
            m.templates_loaded_at.clone(),
        );
        prom.register(
            "build",
            "Version, node and role of this process",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
                node: node.to_string(),
                role: role.to_string(),
            }),
        );
        Metrics { prom, ..m }
    }

    /// The Prometheus text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.prom);
        out
    }

    /// Counts a request as it starts; the guard counts it out.
    pub fn in_flight(&self, broker: &str) -> InFlight {
        let g = self
            .in_flight
            .get_or_create(&BrokerLabels {
                broker: broker.to_string(),
            })
            .clone();
        g.inc();
        InFlight(g)
    }

    /// Counts a delivery's events (its own first, then a batch's entries),
    /// the same ones the event log gets.
    pub fn observe(&self, events: &[Event], templates: &Registry) {
        let Some(top) = events.first() else { return };
        let broker = top.broker.clone().unwrap_or_default();
        // A batch names no template itself; its entries do.
        let (template, op) = if top.template.is_none() && events.len() > 1 {
            (BATCH.to_string(), BATCH.to_string())
        } else {
            known(templates, top)
        };
        self.requests
            .get_or_create(&RequestLabels {
                broker: broker.clone(),
                template,
                op,
                code: code(top),
            })
            .inc();
        self.latency
            .get_or_create(&BrokerLabels {
                broker: broker.clone(),
            })
            .observe(top.elapsed_us as f64 / 1e6);
        let failed = (top.status != "ok").then(|| code(top));
        self.tally
            .record(&broker, failed.as_deref(), top.elapsed_us);
        match top.outcome.as_deref() {
            Some("retry") => {
                self.retries
                    .get_or_create(&TierLabels {
                        broker: broker.clone(),
                        // A retried delivery goes to the tier numbered
                        // after its attempt.
                        tier: top.attempt.to_string(),
                    })
                    .inc();
            }
            Some(o @ ("parked" | "quarantined" | "held" | "cut" | "requeued")) => {
                self.outcomes
                    .get_or_create(&OutcomeLabels {
                        broker: broker.clone(),
                        outcome: o.to_string(),
                    })
                    .inc();
            }
            _ => {}
        }
        for e in &events[1..] {
            let (template, op) = known(templates, e);
            self.entries
                .get_or_create(&RequestLabels {
                    broker: broker.clone(),
                    template,
                    op,
                    code: code(e),
                })
                .inc();
        }
    }

    /// Requests running now on `broker`.
    pub fn in_flight_now(&self, broker: &str) -> i64 {
        self.in_flight
            .get_or_create(&BrokerLabels {
                broker: broker.to_string(),
            })
            .get()
    }

    /// A repeated write answered without running (`memory` or `inbox`).
    pub fn repeat(&self, source: &str) {
        self.repeats
            .get_or_create(&SourceLabels {
                source: source.to_string(),
            })
            .inc();
    }

    pub fn reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "refused" }.to_string(),
            })
            .inc();
    }

    /// A template set went into service.
    pub fn templates_loaded(&self, count: usize) {
        self.templates.set(count as i64);
        self.templates_loaded_at.set(crate::logger::now_ms() / 1000);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.set(ready as i64);
    }

    pub fn set_amqp_up(&self, up: bool) {
        self.amqp_up.set(up as i64);
    }

    pub fn set_database_up(&self, name: &str, up: bool) {
        let l = DatabaseLabels {
            database: name.to_string(),
        };
        self.database_up.get_or_create(&l).set(up as i64);
    }

    pub fn set_pool(&self, name: &str, in_use: u32, max: u32) {
        let l = DatabaseLabels {
            database: name.to_string(),
        };
        self.pool_in_use.get_or_create(&l).set(in_use as i64);
        self.pool_max.get_or_create(&l).set(max as i64);
    }

    pub fn set_degraded(&self, tasks: usize) {
        self.degraded_tasks.set(tasks as i64);
    }

    /// The event log's state: events queued, spooled bytes, and its
    /// cumulative drop counts (queue full, spool full).
    pub fn set_event_log(&self, queued: usize, spool_bytes: u64, dropped: [u64; 2]) {
        self.log_queue.set(queued as i64);
        self.log_spool_bytes.set(spool_bytes as i64);
        for (i, reason) in ["queue_full", "spool_full"].into_iter().enumerate() {
            let now = dropped[i] as i64;
            let before = self.seen_dropped[i].swap(now, Ordering::Relaxed);
            let c = self.log_dropped.get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            });
            if now > before {
                c.inc_by((now - before) as u64);
            }
        }
    }
}

/// `OK`, or the event's error code. Only the contract's codes become
/// label values: a batch entry's code may come from a client-made
/// progress header, and must not mint series.
fn code(e: &Event) -> String {
    match (e.code.as_deref(), e.status.as_str()) {
        (Some(c), _) if ErrorCode::parse(c).is_some() => c.to_string(),
        (Some(_), _) => "(other)".to_string(),
        (None, "ok") => "OK".to_string(),
        (None, _) => "ERROR".to_string(),
    }
}

/// The event's template and op when the serving set knows them.
fn known(templates: &Registry, e: &Event) -> (String, String) {
    let Some(t) = e.template.as_deref().and_then(|t| templates.get(t).ok()) else {
        return (UNKNOWN.to_string(), UNKNOWN.to_string());
    };
    let op = match e.op.as_deref() {
        Some(op) if t.op(op).is_ok() => op.to_string(),
        _ => UNKNOWN.to_string(),
    };
    (t.name.clone(), op)
}

/// Keeps a request counted in `requests_in_flight` until dropped.
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_contract_codes_become_labels() {
        let e = |code: Option<&str>, status: &str| Event {
            code: code.map(str::to_string),
            status: status.to_string(),
            ..Default::default()
        };
        assert_eq!(code(&e(Some("NOT_FOUND"), "error")), "NOT_FOUND");
        assert_eq!(code(&e(None, "ok")), "OK");
        // A batch entry's code can come from a client's progress header.
        assert_eq!(code(&e(Some("<x>"), "error")), "(other)");
        let m = Metrics::new("n", "r");
        let batch = vec![
            Event {
                broker: Some("rBroker".into()),
                status: "ok".into(),
                ..Default::default()
            },
            e(Some(&"A".repeat(10_000)), "error"),
        ];
        m.observe(&batch, &Registry::default());
        let text = m.encode();
        assert!(!text.contains("AAAA"), "{text}");
        assert!(text.contains(r#"beds_batch_entries_total{broker="rBroker",template="(unknown)",op="(unknown)",code="(other)"} 1"#), "{text}");
        assert!(text.contains(r#"template="(batch)""#), "{text}");
    }
}
