//! NamasteCore: the one interface every database adapter implements. The
//! dispatcher hands it a compiled op and validated params; it never sees SQL
//! or a driver type.
//!
//! An adapter has two sides: [`NamasteCore`] runs requests (dispatchers
//! use it), [`Lifecycle`] opens, checks, watches and closes the store (IPL,
//! `beds check --online` and shutdown use it). [`build`] is the one place
//! that turns a `[databases.*]` entry into an adapter: adding a store is a
//! new file here plus one arm there.

pub mod mariadb;
pub mod mongo;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::config::DatabaseConfig;
use crate::registry::{Op, Param, Returns, Template};

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
    /// The request cannot run on this store as asked (a param a filter
    /// needs is missing; a transaction the server cannot run).
    #[error("{0}")]
    Invalid(String),
    /// The procedure itself signalled an error (SQLSTATE 45000): its message
    /// is the DBA's, meant for the caller.
    #[error("{0}")]
    Rejected(String),
    #[error("database error: {0}")]
    Internal(String),
}

/// The durable inbox record of a write with a `message_id`
/// (wiki/14-delivery-guarantees.md).
#[derive(Debug, Clone)]
pub struct InboxKey {
    /// SHA-256 (hex) of caller, `message_id` and the body's SHA-256: a
    /// repeat of the same request has the same id.
    pub id: String,
    /// The client's id, stored for operators.
    pub message_id: String,
}

/// What [`NamasteCore::call_once`] found.
#[derive(Debug)]
pub enum Once {
    /// First execution: what the calls did (as `call_atomic` reports it).
    /// The record the caller built for it was committed with the writes.
    Ran(Result<Vec<Outcome>, (usize, AdapterError)>),
    /// Executed before: the record stored then. Nothing ran.
    Repeat(String),
}

/// Builds what the inbox stores for an execution's result; `None`: store
/// nothing and roll the writes back (the request will run again).
pub type Recorder<'a> =
    dyn FnMut(&Result<Vec<Outcome>, (usize, AdapterError)>) -> Option<String> + Send + 'a;

impl AdapterError {
    /// This failure inside a transaction that never committed: nothing of
    /// it was applied, so a write whose outcome looked unknown was simply
    /// cut off, and may run again.
    pub fn uncommitted(self) -> AdapterError {
        match self {
            AdapterError::Indeterminate(m) => AdapterError::Unreachable(m),
            other => other,
        }
    }
}

/// Builds the adapter for one `[databases.*]` entry. Nothing connects yet:
/// [`Lifecycle::open`] does, so IPL can report each step.
pub async fn build(name: &str, cfg: &DatabaseConfig) -> Result<Arc<dyn Adapter>, AdapterError> {
    Ok(match cfg {
        DatabaseConfig::Mariadb(c) => Arc::new(mariadb::MariaDb::new(name, c)),
        DatabaseConfig::Mongodb(c) => Arc::new(mongo::MongoDb::new(name, c).await?),
    })
}

/// Both sides of an adapter; what a node holds.
pub trait Adapter: NamasteCore + Lifecycle {}

impl<T: NamasteCore + Lifecycle> Adapter for T {}

/// The store side of an adapter: what IPL, checks and shutdown need.
#[async_trait]
pub trait Lifecycle: Send + Sync {
    /// Connects and checks what must answer. `tolerate_optional` (dev):
    /// an optional part that does not answer (a read replica) is set aside
    /// with a warning instead of failing.
    async fn open(&self, tolerate_optional: bool) -> Result<(), AdapterError>;

    /// Checks the database answers (recovery probes).
    async fn ping(&self) -> Result<(), AdapterError>;

    /// IPL check: what these templates rely on (procedures and their arity;
    /// collections and their indexes) that the database lacks. Each entry
    /// is a readable problem; empty means all there.
    async fn missing_objects(&self, templates: &[&Template]) -> Result<Vec<String>, AdapterError>;

    /// Things these templates do that weaken BEDS's guarantees without
    /// stopping it (a procedure that commits on its own); for `beds check`
    /// and the IPL log.
    async fn warnings(&self, _templates: &[&Template]) -> Vec<String> {
        Vec::new()
    }

    /// Up/down state of this database: requests for it wait while it is
    /// down.
    fn health(&self) -> &Health;

    /// The primary pool's connections in use and its size limit, where the
    /// driver tells (metrics).
    fn pool(&self) -> Option<(u32, u32)> {
        None
    }

    async fn close(&self);
}

/// The request side: the unified CRUD interface of a database behind BEDS.
#[async_trait]
pub trait NamasteCore: Send + Sync {
    /// Runs one op. Read ops may go to a replica or secondary.
    async fn call(&self, op: &Op, params: &[Param]) -> Result<Outcome, AdapterError>;

    /// Whether [`NamasteCore::call_atomic`] can run here; the error says why
    /// not, for the client.
    fn atomic_support(&self) -> Result<(), String>;

    /// Runs ops in order on one transaction, all or nothing. On failure,
    /// returns the index of the op that failed.
    async fn call_atomic(
        &self,
        calls: &[(&Op, &[Param])],
    ) -> Result<Vec<Outcome>, (usize, AdapterError)>;

    /// Whether writes here go through the durable inbox (config `inbox`).
    fn inbox(&self) -> bool {
        false
    }

    /// Runs `calls` once per `key`, all or nothing: in one transaction, the
    /// claim of `key`, the calls, and the record `record` builds for their
    /// result commit together. A failed call's writes are undone and only
    /// the record kept. A key claimed before returns its record without
    /// running anything; a concurrent claim waits for the first or fails
    /// retryably. An `Err` means nothing was committed (so nothing
    /// recorded): the request may run again.
    async fn call_once(
        &self,
        _key: &InboxKey,
        _calls: &[(&Op, &[Param])],
        _record: &mut Recorder<'_>,
    ) -> Result<Once, AdapterError> {
        Err(AdapterError::Internal("this database has no inbox".into()))
    }

    /// Removes inbox records older than `age`, at most `limit` at a time;
    /// returns how many went.
    async fn purge_inbox(
        &self,
        _age: std::time::Duration,
        _limit: u32,
    ) -> Result<u64, AdapterError> {
        Ok(0)
    }

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
/// reach its database and up again once a probe succeeds. While it is down,
/// requests for it wait in its hold queues (other stores' requests flow),
/// so an outage does not turn into a flood of retries and DLQ entries.
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

/// How long closing one adapter may take at shutdown.
const CLOSE_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The adapters of a node, by database entry name.
#[derive(Clone, Default)]
pub struct Adapters {
    by_name: HashMap<String, Arc<dyn Adapter>>,
}

impl Adapters {
    pub fn insert(&mut self, name: String, adapter: Arc<dyn Adapter>) {
        self.by_name.insert(name, adapter);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Adapter>> {
        self.by_name.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Arc<dyn Adapter>)> {
        self.by_name.iter()
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.by_name.keys()
    }

    /// Closes every adapter, each bounded: a pool waits for connections
    /// still checked out, and one stuck in a query cut off by the drain
    /// must not hold the node's exit (the server ends it when the
    /// connection goes).
    pub async fn close(&self) {
        for (name, a) in &self.by_name {
            if tokio::time::timeout(CLOSE_LIMIT, a.close()).await.is_err() {
                tracing::warn!(database = %name, "close not finished within {CLOSE_LIMIT:?}; leaving its connections to the server");
            }
        }
    }
}

/// Polls `ping` (jittered exponential backoff, 100 ms to 5 s) until it
/// answers, then marks `health` up. `alive` ends the probe early (the
/// adapter was closed).
pub fn probe<F, Fut>(
    health: Arc<Health>,
    name: String,
    role: &'static str,
    alive: impl Fn() -> bool + Send + 'static,
    ping: F,
) where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), AdapterError>> + Send,
{
    use rand::Rng;
    tokio::spawn(async move {
        let mut delay = std::time::Duration::from_millis(100);
        loop {
            let jitter = rand::thread_rng().gen_range(0.5..1.5);
            tokio::time::sleep(delay.mul_f64(jitter)).await;
            if !alive() {
                return;
            }
            match ping().await {
                Ok(()) => {
                    tracing::info!(database = %name, role, "database answers again");
                    health.mark_up();
                    return;
                }
                Err(e) => tracing::debug!(database = %name, role, error = %e, "probe failed"),
            }
            delay = (delay * 2).min(std::time::Duration::from_secs(5));
        }
    });
}
