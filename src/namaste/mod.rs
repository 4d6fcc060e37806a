//! NamasteCore: the one interface every database adapter implements. The
//! dispatcher hands it a compiled op and validated params; it never sees SQL
//! or a driver type.

pub mod mariadb;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::registry::{Op, Param, Returns};

/// A row as the client sees it: column name → JSON value.
pub type Row = Map<String, Value>;

/// What one executed op produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub rows: Vec<Row>,
    /// Rows a write reported as changed.
    pub affected: u64,
}

/// Adapter failures, in database terms. `crate::error` maps them to
/// contract codes.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdapterError {
    /// No connection could be had or it broke: the database is down.
    #[error("database unreachable: {0}")]
    Unreachable(String),
    /// The database is up but refused for now (deadlock, lock wait,
    /// serialization failure): the same request may succeed later.
    #[error("database busy: {0}")]
    Transient(String),
    /// Duplicate key or other constraint violation.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A `returns = "one"` op found no row.
    #[error("no row found")]
    NotFound,
    /// The connection broke after a write was sent (or during COMMIT): it
    /// may or may not have been applied, so it must not be retried blindly.
    #[error("the database connection was lost while the write ran; it may or may not have been applied ({0})")]
    Indeterminate(String),
    /// The procedure itself signalled an error (SQLSTATE 45000): its message
    /// is the DBA's, meant for the caller.
    #[error("{0}")]
    Rejected(String),
    #[error("database error: {0}")]
    Internal(String),
}

/// The unified CRUD interface of a database behind BEDS.
#[async_trait]
pub trait NamasteCore: Send + Sync {
    /// Runs one op. Read ops may go to a replica.
    async fn call(&self, op: &Op, params: &[Param]) -> Result<Outcome, AdapterError>;

    /// Runs ops in order on one transaction, all or nothing. On failure,
    /// returns the index of the op that failed.
    async fn call_atomic(
        &self,
        calls: &[(&Op, &[Param])],
    ) -> Result<Vec<Outcome>, (usize, AdapterError)>;

    /// Checks the database answers (IPL and recovery probes).
    async fn ping(&self) -> Result<(), AdapterError>;

    /// IPL check: which of these procedures (name, parameter count) do not
    /// exist as written. Each entry of the result is a readable problem.
    async fn missing_procedures(
        &self,
        procs: &[(String, usize)],
    ) -> Result<Vec<String>, AdapterError>;

    /// Up/down state of this database, for dispatchers to pause on.
    fn health(&self) -> &Health;

    /// A session for the entries of a non-atomic batch: ops run one after
    /// another, each on its own (no transaction), and the adapter may keep
    /// one connection for all of them instead of taking one per op.
    fn session(&self) -> Box<dyn Session + '_>;
}

/// Calls that run in order on what one [`NamasteCore::session`] holds.
#[async_trait]
pub trait Session: Send {
    /// Same contract as [`NamasteCore::call`].
    async fn call(&mut self, op: &Op, params: &[Param]) -> Result<Outcome, AdapterError>;
}

/// Applies an op's `returns` to what the database produced.
pub fn shape(op: &Op, mut out: Outcome) -> Result<Outcome, AdapterError> {
    match op.returns {
        Returns::Many => {}
        Returns::None => out.rows.clear(),
        Returns::One => {
            if out.rows.is_empty() {
                return Err(AdapterError::NotFound);
            }
            out.rows.truncate(1);
        }
    }
    Ok(out)
}

/// Whether a database answers. An adapter marks itself down when it cannot
/// reach its database and up again once a probe succeeds; dispatchers stop
/// taking deliveries while any database is down, so an outage does not turn
/// into a flood of retries and DLQ entries.
#[derive(Debug)]
pub struct Health {
    up: watch::Sender<bool>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            up: watch::Sender::new(true),
        }
    }
}

impl Health {
    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.up.subscribe()
    }

    /// Returns true when this call took the state from up to down (so the
    /// caller should start the recovery probe).
    pub fn mark_down(&self) -> bool {
        self.up.send_if_modified(|up| std::mem::replace(up, false))
    }

    pub fn mark_up(&self) {
        self.up.send_if_modified(|up| !std::mem::replace(up, true));
    }
}

/// The adapters of a node, by database entry name.
#[derive(Clone, Default)]
pub struct Adapters {
    by_name: HashMap<String, Arc<dyn NamasteCore>>,
}

impl Adapters {
    pub fn insert(&mut self, name: String, adapter: Arc<dyn NamasteCore>) {
        self.by_name.insert(name, adapter);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn NamasteCore>> {
        self.by_name.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Arc<dyn NamasteCore>)> {
        self.by_name.iter()
    }

    pub fn all_up(&self) -> bool {
        self.by_name.values().all(|a| a.health().is_up())
    }

    /// Resolves once every database is up.
    pub async fn wait_all_up(&self) {
        for a in self.by_name.values() {
            let mut rx = a.health().subscribe();
            // An Err means the adapter was dropped: nothing left to wait for.
            let _ = rx.wait_for(|up| *up).await;
        }
    }
}
