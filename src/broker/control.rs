//! Run-time control of a node's consumers, set by admin commands: pause or
//! resume a broker, change its prefetch, drain the whole node. Each broker
//! has a `watch` channel its dispatchers (work and hold queues) follow:
//! a change ends the current consumer after its in-flight requests finish,
//! and the dispatcher opens a new one as the control now says.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

/// What a broker's dispatchers should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    /// Paused by `pause`, or by `drain` (which pauses every broker).
    pub paused: bool,
    /// Deliveries in flight per dispatcher (`basic.qos`).
    pub prefetch: u16,
}

/// The controls of every broker this node runs; cheap to clone.
#[derive(Clone, Default)]
pub struct Controls {
    by_broker: Arc<BTreeMap<String, watch::Sender<Control>>>,
}

impl Controls {
    /// One control per broker, running at `prefetch`.
    pub fn new<'a>(brokers: impl IntoIterator<Item = &'a str>, prefetch: u16) -> Controls {
        Controls {
            by_broker: Arc::new(
                brokers
                    .into_iter()
                    .map(|b| {
                        let (tx, _) = watch::channel(Control {
                            paused: false,
                            prefetch,
                        });
                        (b.to_string(), tx)
                    })
                    .collect(),
            ),
        }
    }

    /// What a dispatcher of `broker` follows.
    pub fn watch(&self, broker: &str) -> Option<watch::Receiver<Control>> {
        self.by_broker.get(broker).map(|tx| tx.subscribe())
    }

    pub fn get(&self, broker: &str) -> Option<Control> {
        self.by_broker.get(broker).map(|tx| *tx.borrow())
    }

    pub fn brokers(&self) -> impl Iterator<Item = (&String, Control)> {
        self.by_broker.iter().map(|(n, tx)| (n, *tx.borrow()))
    }

    /// Changes `broker` (or every broker, for `None`); an unknown name is
    /// an error naming the known ones.
    pub fn set(
        &self,
        broker: Option<&str>,
        change: impl Fn(&mut Control),
    ) -> Result<Vec<String>, String> {
        let targets: Vec<(&String, &watch::Sender<Control>)> = match broker {
            None => self.by_broker.iter().collect(),
            Some(b) => match self.by_broker.get_key_value(b) {
                Some(t) => vec![t],
                None => {
                    return Err(format!(
                        "this node runs no broker {b:?} (it runs: {})",
                        self.by_broker
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
            },
        };
        for (_, tx) in &targets {
            tx.send_if_modified(|c| {
                let before = *c;
                change(c);
                *c != before
            });
        }
        Ok(targets.into_iter().map(|(n, _)| n.clone()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_changes_one_or_all_and_names_unknown_brokers() {
        let c = Controls::new(["rBroker", "wBroker"], 64);
        let mut rx = c.watch("wBroker").unwrap();
        assert_eq!(
            c.set(Some("rBroker"), |c| c.paused = true).unwrap(),
            ["rBroker"]
        );
        assert!(c.get("rBroker").unwrap().paused);
        assert!(!rx.has_changed().unwrap());
        c.set(None, |c| c.prefetch = 8).unwrap();
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().prefetch, 8);
        let e = c.set(Some("xBroker"), |_| {}).unwrap_err();
        assert!(e.contains("rBroker, wBroker"), "{e}");
    }
}
