//! Every long-lived task of a node (dispatchers, the inbox purge, later the
//! log writer) runs under the [`Supervisor`]: one cancellation token tells
//! them all to stop, one task tracker waits for all of them, and a task that
//! ends on its own (a panic, a bug) is logged, restarted after a jittered
//! backoff, and counted as degrading the node meanwhile.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A task that ran this long before it died is restarted quickly again:
/// it was not crash-looping.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

#[derive(Clone, Default)]
pub struct Supervisor {
    /// Cancelled once, when the node stops: every task watches it.
    stop: CancellationToken,
    /// Every supervised task, so the node can wait for all of them.
    tasks: TaskTracker,
    /// Tasks waiting to be restarted, by name, with how often they died.
    down: Arc<Mutex<BTreeMap<String, u32>>>,
}

impl Supervisor {
    pub fn new() -> Supervisor {
        Supervisor::default()
    }

    /// The token a task watches to know the node is stopping.
    pub fn token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Runs `make()` as a task named `name` until the node stops; if the
    /// task ends (or panics) before that, makes and runs it again.
    pub fn spawn<F, Fut>(&self, name: String, mut make: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (stop, down) = (self.stop.clone(), self.down.clone());
        self.tasks.spawn(async move {
            let mut backoff = Backoff::default();
            let mut deaths = 0u32;
            loop {
                let started = Instant::now();
                // Its own task, so a panic ends only it and is reported here.
                let ended = tokio::spawn(make()).await;
                if stop.is_cancelled() {
                    return;
                }
                deaths += 1;
                match ended {
                    Err(e) if e.is_panic() => {
                        tracing::error!(task = %name, deaths, "task panicked; restarting it")
                    }
                    _ => tracing::error!(task = %name, deaths, "task ended on its own; restarting it"),
                }
                if started.elapsed() >= HEALTHY_RUN {
                    backoff.reset();
                }
                down.lock().unwrap().insert(name.clone(), deaths);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
                down.lock().unwrap().remove(&name);
            }
        });
    }

    /// Tasks waiting to be restarted (empty: the node is whole).
    pub fn degraded(&self) -> Vec<String> {
        self.down.lock().unwrap().keys().cloned().collect()
    }

    /// Stops every task and waits until all have ended.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Jittered exponential backoff for restart and reconnect loops: 100 ms
/// doubling to 10 s, each wait between half and one and a half of the
/// nominal value, so many tasks that failed together do not retry together.
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(100),
        }
    }
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next.mul_f64(rand::thread_rng().gen_range(0.5..1.5));
        self.next = (self.next * 2).min(Duration::from_secs(10));
        d
    }

    pub fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_task_that_panics_is_restarted_until_shutdown() {
        let s = Supervisor::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let stop = s.token();
        s.spawn("flaky".into(), move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            let stop = stop.clone();
            async move {
                if n < 2 {
                    panic!("boom {n}");
                }
                stop.cancelled().await;
            }
        });
        let t0 = Instant::now();
        while runs.load(Ordering::SeqCst) < 3 {
            assert!(t0.elapsed() < Duration::from_secs(5), "restarted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(s.degraded().is_empty(), "whole again once it runs");
        s.shutdown().await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "not restarted after shutdown"
        );
    }

    #[tokio::test]
    async fn a_dead_task_degrades_the_node_while_it_waits() {
        let s = Supervisor::new();
        s.spawn("quits".into(), || async {});
        let t0 = Instant::now();
        while s.degraded().is_empty() {
            assert!(t0.elapsed() < Duration::from_secs(5));
            tokio::task::yield_now().await;
        }
        assert_eq!(s.degraded(), vec!["quits".to_string()]);
        s.shutdown().await;
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(150));
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_secs(15));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(150));
    }
}
