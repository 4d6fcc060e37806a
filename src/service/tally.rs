//! What admin `status` and the admin counters report per broker: requests
//! handled and errors by code since start, and, per counter window, the
//! request and error counts and latency percentiles. Fed from the same
//! events as the metrics and the event log ([`super::metrics::Metrics::observe`]).

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Latencies kept per window and broker; past this, reservoir sampling
/// keeps the percentiles honest at a bounded cost.
const SAMPLES: usize = 4096;

#[derive(Default)]
pub struct Tally {
    brokers: Mutex<BTreeMap<String, BrokerTally>>,
}

#[derive(Default)]
struct BrokerTally {
    handled: u64,
    errors: BTreeMap<String, u64>,
    window: Window,
}

#[derive(Default)]
struct Window {
    requests: u64,
    errors: u64,
    latencies_us: Vec<u64>,
    /// Kept apart: past `SAMPLES` the reservoir may not hold the slowest.
    max_us: u64,
}

/// Since start, per broker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub handled: u64,
    /// Error code → count (successes are not here).
    pub errors: BTreeMap<String, u64>,
}

/// One broker's counter window (what `adminGraphBroker` carries).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowStats {
    pub broker: String,
    pub requests: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Tally {
    /// One handled delivery: its broker, error code (`None` for ok) and
    /// time from receipt to reply.
    pub fn record(&self, broker: &str, error: Option<&str>, elapsed_us: u64) {
        let mut all = self.brokers.lock().unwrap();
        let b = match all.get_mut(broker) {
            Some(b) => b,
            None => all.entry(broker.to_string()).or_default(),
        };
        b.handled += 1;
        b.window.requests += 1;
        if let Some(code) = error {
            *b.errors.entry(code.to_string()).or_default() += 1;
            b.window.errors += 1;
        }
        let w = &mut b.window;
        w.max_us = w.max_us.max(elapsed_us);
        if w.latencies_us.len() < SAMPLES {
            w.latencies_us.push(elapsed_us);
        } else {
            let i = rand::Rng::gen_range(&mut rand::thread_rng(), 0..w.requests) as usize;
            if i < SAMPLES {
                w.latencies_us[i] = elapsed_us;
            }
        }
    }

    pub fn totals(&self) -> BTreeMap<String, Totals> {
        self.brokers
            .lock()
            .unwrap()
            .iter()
            .map(|(n, b)| {
                (
                    n.clone(),
                    Totals {
                        handled: b.handled,
                        errors: b.errors.clone(),
                    },
                )
            })
            .collect()
    }

    /// The window since the last call, per broker that saw requests; the
    /// next window starts empty.
    pub fn take_window(&self) -> Vec<WindowStats> {
        let mut all = self.brokers.lock().unwrap();
        all.iter_mut()
            .filter(|(_, b)| b.window.requests > 0)
            .map(|(n, b)| {
                let mut w = std::mem::take(&mut b.window);
                w.latencies_us.sort_unstable();
                let at = |q: f64| {
                    let i = ((w.latencies_us.len() as f64 - 1.0) * q).round() as usize;
                    w.latencies_us.get(i).copied().unwrap_or(0)
                };
                WindowStats {
                    broker: n.clone(),
                    requests: w.requests,
                    errors: w.errors,
                    p50_us: at(0.50),
                    p95_us: at(0.95),
                    p99_us: at(0.99),
                    max_us: w.max_us,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_and_windows_count_what_was_recorded() {
        let t = Tally::default();
        for us in 1..=100 {
            t.record("rBroker", None, us);
        }
        t.record("wBroker", Some("CONFLICT"), 7);
        t.record("wBroker", Some("CONFLICT"), 9);
        let totals = t.totals();
        assert_eq!(totals["rBroker"].handled, 100);
        assert_eq!(totals["wBroker"].errors["CONFLICT"], 2);
        let w = t.take_window();
        assert_eq!(w.len(), 2);
        assert_eq!(
            (w[0].requests, w[0].p50_us, w[0].p99_us, w[0].max_us),
            (100, 51, 99, 100)
        );
        assert_eq!((w[1].requests, w[1].errors), (2, 2));
        // Past the reservoir, the slowest request still counts as the max.
        for _ in 0..(2 * SAMPLES) {
            t.record("mBroker", None, 1);
        }
        t.record("mBroker", None, 999_999);
        let w = t.take_window();
        assert_eq!(
            (w[0].requests, w[0].max_us),
            (2 * SAMPLES as u64 + 1, 999_999)
        );
        // A new window starts empty; totals stay.
        assert!(t.take_window().is_empty());
        assert_eq!(t.totals()["rBroker"].handled, 100);
    }
}
