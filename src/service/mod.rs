//! Running BEDS as a service: what operators and init systems see of a node
//! beside its queues. [`http`] serves `/healthz`, `/readyz`, `/metrics` and
//! `POST /reload` on its own port; [`health`] keeps readiness (and proves
//! liveness to the systemd watchdog); [`metrics`] counts what the
//! dispatchers do; [`reload`] swaps the template set; [`notify`] speaks
//! sd_notify.

pub mod health;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod reload;
pub mod tally;
