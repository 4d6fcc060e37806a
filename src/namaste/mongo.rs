//! The MongoDB NamasteCore adapter, on the official `mongodb` driver. A
//! template's op is a compiled [`MongoOp`]: its filter, document, update,
//! sort and pipeline shapes are filled with the request's typed values as
//! BSON, run, and the documents come back as JSON rows (CONTRACT §4).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{self, doc, Bson, Document};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{
    ClientOptions, Credential, ReadPreference as DriverReadPreference, ReturnDocument,
    SelectionCriteria, WriteConcern as DriverWriteConcern,
};
use mongodb::{ClientSession, Collection};
use serde_json::{Map, Number, Value};

use super::{
    probe, shape, AdapterError, Health, InboxKey, Lifecycle, NamasteCore, Once, Outcome, Recorder,
    Row, Session,
};
use crate::config::{Access, MongoDbConfig, ReadPreference, WriteConcern};
use crate::registry::mongo::{render, Absent, Action, Shape};
use crate::registry::{Index, MongoOp, Op, Param, Template};

/// What the server said about itself at `open`.
#[derive(Debug, Clone)]
struct Deployment {
    /// The write concern writes use (`auto` resolved).
    write_concern: DriverWriteConcern,
    /// Why multi-document transactions cannot run here, if they cannot.
    no_transactions: Option<String>,
}

pub struct MongoDb {
    /// The `[databases]` entry name, for logs.
    name: String,
    client: mongodb::Client,
    db: mongodb::Database,
    /// Where read ops go (config `read_preference`).
    reads: SelectionCriteria,
    /// Reads go to the primary only, so a read that finds no server means
    /// the database is down (with another preference it may only mean no
    /// secondary is up, which the primary's probe cannot tell).
    reads_primary: bool,
    /// Config `write_concern` before `auto` is resolved.
    write_concern: WriteConcern,
    /// Learned at `open` from the server's `hello`.
    deployment: OnceLock<Deployment>,
    /// Bound on each operation (the driver's own server selection and
    /// connect timeouts use it too).
    timeout: Duration,
    /// Down while the server does not answer: requests for it wait.
    health: Arc<Health>,
    /// Set by `close`, so a running probe stops.
    closed: Arc<AtomicBool>,
    /// Writes with a `message_id` are recorded in [`INBOX`].
    inbox: bool,
    /// Connections checked out of the driver's pools now (all members),
    /// counted from its CMAP events: the driver has no pool gauge.
    in_use: Arc<AtomicI64>,
    /// `max_connections`: the limit of each member's pool.
    max_connections: u32,
}

/// The durable inbox collection (`utilities/mongo/inbox.json`).
const INBOX: &str = "beds_inbox";

impl MongoDb {
    /// Builds the client; nothing connects until the first operation.
    pub async fn new(name: &str, cfg: &MongoDbConfig) -> Result<MongoDb, AdapterError> {
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let in_use = Arc::new(AtomicI64::new(0));
        let client = client(name, cfg, "beds", Some(in_use.clone())).await?;
        let reads = SelectionCriteria::ReadPreference(match cfg.read_preference {
            ReadPreference::Primary => DriverReadPreference::Primary,
            ReadPreference::PrimaryPreferred => {
                DriverReadPreference::PrimaryPreferred { options: None }
            }
            ReadPreference::Secondary => DriverReadPreference::Secondary { options: None },
            ReadPreference::SecondaryPreferred => {
                DriverReadPreference::SecondaryPreferred { options: None }
            }
            ReadPreference::Nearest => DriverReadPreference::Nearest { options: None },
        });
        Ok(MongoDb {
            reads_primary: cfg.read_preference == ReadPreference::Primary,
            name: name.to_string(),
            db: client.database(&cfg.name),
            client,
            reads,
            write_concern: cfg.write_concern,
            deployment: OnceLock::new(),
            timeout,
            health: Arc::new(Health::default()),
            closed: Arc::new(AtomicBool::new(false)),
            inbox: cfg.inbox,
            in_use,
            max_connections: cfg.max_connections,
        })
    }

    fn collection(&self, op: &MongoOp) -> Collection<Document> {
        self.db.collection(&op.collection)
    }

    fn write_concern(&self) -> DriverWriteConcern {
        match self.deployment.get() {
            Some(d) => d.write_concern.clone(),
            None => resolve_write_concern(self.write_concern, false, self.timeout),
        }
    }

    /// Marks the database down and, on that transition, starts the probe
    /// that marks it up again.
    fn note_unreachable(&self, err: &AdapterError) {
        if !matches!(err, AdapterError::Unreachable(_)) || !self.health.mark_down() {
            return;
        }
        tracing::warn!(database = %self.name, error = %err, "database down: its requests wait until it answers");
        let closed = self.closed.clone();
        let db = self.db.clone();
        let limit = self.timeout;
        probe(
            self.health.clone(),
            self.name.clone(),
            "mongodb",
            move || !closed.load(Ordering::Relaxed),
            move || {
                let db = db.clone();
                async move { ping(&db, limit).await }
            },
        );
    }

    fn inbox_coll(&self) -> Collection<Document> {
        self.db.collection(INBOX)
    }

    /// The stored record of `key` (`None` while its execution has not
    /// recorded an answer) and when it was claimed.
    async fn stored(
        &self,
        key: &InboxKey,
    ) -> Result<(Option<String>, bson::DateTime), AdapterError> {
        let primary = SelectionCriteria::ReadPreference(DriverReadPreference::Primary);
        let found = bounded(
            self.timeout,
            self.inbox_coll()
                .find_one(doc! { "_id": &key.id })
                .selection_criteria(primary),
        )
        .await?;
        let Some(d) = found else {
            return Err(AdapterError::Transient(format!(
                "inbox record {} vanished while claimed",
                key.id
            )));
        };
        let at = d
            .get_datetime("created_at")
            .copied()
            .unwrap_or_else(|_| bson::DateTime::now());
        Ok((d.get_str("record").ok().map(str::to_string), at))
    }

    /// [`NamasteCore::call_once`] where the server has transactions: claim,
    /// calls and record commit together.
    async fn once_in_transaction(
        &self,
        key: &InboxKey,
        calls: &[(&Op, &[Param])],
        record: &mut Recorder<'_>,
    ) -> Result<Once, AdapterError> {
        let limit = self.timeout;
        // Nothing of a transaction that did not commit was applied.
        let lost = |e: AdapterError| {
            let e = e.uncommitted();
            self.note_unreachable(&e);
            e
        };
        let mut session = bounded(limit, self.client.start_session())
            .await
            .map_err(lost)?;
        bounded(
            limit,
            session
                .start_transaction()
                .write_concern(self.write_concern()),
        )
        .await
        .map_err(lost)?;
        let claim = doc! {
            "_id": &key.id,
            "message_id": &key.message_id,
            "created_at": bson::DateTime::now(),
        };
        let claimed = bounded(
            limit,
            self.inbox_coll().insert_one(claim).session(&mut session),
        )
        .await;
        match claimed {
            Ok(_) => {}
            Err(AdapterError::Conflict(_)) => {
                let _ = tokio::time::timeout(limit, session.abort_transaction()).await;
                return match self.stored(key).await? {
                    (Some(r), _) => Ok(Once::Repeat(r)),
                    (None, _) => Err(AdapterError::Transient(format!(
                        "inbox record {} has no answer yet",
                        key.id
                    ))),
                };
            }
            // A concurrent claim of the same id (WriteConflict) is transient.
            Err(e) => return Err(lost(e)),
        }
        let mut outs = Vec::with_capacity(calls.len());
        let mut failed = None;
        for (i, (op, params)) in calls.iter().enumerate() {
            match self.run(op, params, Some(&mut session)).await {
                Ok(o) => outs.push(o),
                Err(e) => {
                    failed = Some((i, lost(e)));
                    break;
                }
            }
        }
        let result = match failed {
            None => Ok(outs),
            Some(f) => Err(f),
        };
        let Some(stored) = record(&result) else {
            let _ = tokio::time::timeout(limit, session.abort_transaction()).await;
            return Ok(Once::Ran(result));
        };
        if result.is_err() {
            // No savepoints here: undo everything, then record the answer on
            // its own (one document, atomic by itself).
            let _ = tokio::time::timeout(limit, session.abort_transaction()).await;
            let doc = doc! {
                "_id": &key.id,
                "message_id": &key.message_id,
                "created_at": bson::DateTime::now(),
                "record": stored,
            };
            return match bounded(limit, self.inbox_coll().insert_one(doc)).await {
                Ok(_) => Ok(Once::Ran(result)),
                // Another delivery finished it meanwhile: its answer wins.
                Err(AdapterError::Conflict(_)) => match self.stored(key).await? {
                    (Some(r), _) => Ok(Once::Repeat(r)),
                    (None, _) => Err(AdapterError::Transient(
                        "inbox record without answer".into(),
                    )),
                },
                Err(e) => Err(lost(e)),
            };
        }
        bounded(
            limit,
            self.inbox_coll()
                .update_one(
                    doc! { "_id": &key.id },
                    doc! { "$set": { "record": stored } },
                )
                .session(&mut session),
        )
        .await
        .map_err(lost)?;
        match tokio::time::timeout(limit.saturating_mul(2), session.commit_transaction()).await {
            Ok(Ok(())) => Ok(Once::Ran(result)),
            // Committed or not, the next delivery's claim will tell.
            Ok(Err(e)) => Err(lost(classify(e, false))),
            Err(_) => Err(AdapterError::Transient(format!(
                "COMMIT not answered within {limit:?}"
            ))),
        }
    }

    /// [`NamasteCore::call_once`] without transactions: the claim is
    /// written first, the calls run, then the record. A node that dies
    /// between the calls and the record leaves a claim without an answer:
    /// its repeats are parked as unknown, never run again (wiki/14).
    async fn once_in_order(
        &self,
        key: &InboxKey,
        calls: &[(&Op, &[Param])],
        record: &mut Recorder<'_>,
    ) -> Result<Once, AdapterError> {
        let limit = self.timeout;
        let claim = doc! {
            "_id": &key.id,
            "message_id": &key.message_id,
            "created_at": bson::DateTime::now(),
        };
        match bounded(limit, self.inbox_coll().insert_one(claim)).await {
            Ok(_) => {}
            Err(AdapterError::Conflict(_)) => {
                let (stored, at) = self.stored(key).await?;
                let age = bson::DateTime::now().timestamp_millis() - at.timestamp_millis();
                return match stored {
                    Some(r) => Ok(Once::Repeat(r)),
                    // Longer than any execution may take: it never finished.
                    None if age > limit.saturating_mul(4).as_millis() as i64 => {
                        Err(AdapterError::Indeterminate(format!(
                            "an earlier delivery of this message_id started {} s ago and recorded no answer",
                            age / 1000
                        )))
                    }
                    None => Err(AdapterError::Transient(
                        "an earlier delivery of this message_id is still running".into(),
                    )),
                };
            }
            Err(e) => {
                self.note_unreachable(&e);
                return Err(e);
            }
        }
        let mut outs = Vec::with_capacity(calls.len());
        let mut failed = None;
        for (i, (op, params)) in calls.iter().enumerate() {
            match self.run(op, params, None).await {
                Ok(o) => outs.push(o),
                Err(e) => {
                    self.note_unreachable(&e);
                    failed = Some((i, e));
                    break;
                }
            }
        }
        let result = match failed {
            None => Ok(outs),
            Some(f) => Err(f),
        };
        match record(&result) {
            Some(stored) => {
                let set = doc! { "$set": { "record": stored } };
                bounded(
                    limit,
                    self.inbox_coll().update_one(doc! { "_id": &key.id }, set),
                )
                .await?;
            }
            // The request runs again: release the claim.
            None => {
                let _ = bounded(limit, self.inbox_coll().delete_one(doc! { "_id": &key.id })).await;
            }
        }
        Ok(Once::Ran(result))
    }

    /// One op, on `session` when given (a transaction). Bounded by the
    /// timeout: past it a read counts as unreachable, a write as unknown.
    async fn run(
        &self,
        op: &Op,
        params: &[Param],
        session: Option<&mut ClientSession>,
    ) -> Result<Outcome, AdapterError> {
        let Some(m) = op.mongo() else {
            return Err(AdapterError::Internal(format!(
                "{} is not a MongoDB op",
                op.qualified
            )));
        };
        let write = op.access != Access::Read;
        let limit = self.timeout.saturating_mul(2);
        let out =
            match tokio::time::timeout(limit, self.run_unbounded(op, m, params, session)).await {
                Ok(r) => r,
                Err(_) if write => Err(AdapterError::Indeterminate(format!(
                    "no answer within {limit:?}"
                ))),
                // A slow read (the server cuts it at `timeout` itself) or a
                // busy pool: try again later, the database is not down.
                Err(_) => Err(AdapterError::Transient(format!(
                    "no answer within {limit:?}"
                ))),
            };
        let out = match out {
            Err(AdapterError::Unreachable(m)) if !write && !self.reads_primary => Err(
                AdapterError::Transient(format!("no server for this read preference: {m}")),
            ),
            other => other,
        };
        out.and_then(|o| shape(op, o))
    }

    async fn run_unbounded(
        &self,
        op: &Op,
        m: &MongoOp,
        params: &[Param],
        session: Option<&mut ClientSession>,
    ) -> Result<Outcome, AdapterError> {
        let now = bson::DateTime::now();
        let fill = |s: &Option<Shape>, absent: Absent| -> Result<Option<Bson>, AdapterError> {
            match s {
                None => Ok(None),
                Some(s) => render(s, params, now, absent).map_err(|i| {
                    let field = op.params.get(i).map_or("?", |(n, _)| n.as_str());
                    AdapterError::Invalid(format!("data.{field}: required by {}", op.qualified))
                }),
            }
        };
        let doc_of = |b: Option<Bson>| match b {
            Some(Bson::Document(d)) => d,
            _ => Document::new(),
        };
        let write = op.access != Access::Read;
        // A network error or no server found: the database may be gone
        // (a server answering with an error, even an unknown-outcome one, is
        // not down).
        let classify = |e: mongodb::error::Error| {
            let lost = matches!(
                *e.kind,
                ErrorKind::Io(_)
                    | ErrorKind::ConnectionPoolCleared { .. }
                    | ErrorKind::ServerSelection { .. }
            );
            let err = classify(e, write);
            if lost && (write || self.reads_primary) {
                self.note_unreachable(&AdapterError::Unreachable(err.to_string()));
            }
            err
        };
        let coll = self.collection(m);
        // Inside a transaction reads must go to the primary (the driver
        // refuses any other preference there).
        let reads = (op.access == Access::Read && session.is_none()).then(|| self.reads.clone());
        // The server gives up on a read at `timeout` (code 50, transient),
        // so an abandoned query does not keep running.
        let max_time = Some(self.timeout);
        // Inside a transaction the transaction's write concern applies.
        let wc = (write && session.is_none()).then(|| self.write_concern());
        // The session is taken by whichever builder runs; each arm runs one.
        macro_rules! exec {
            ($action:expr) => {
                match session {
                    Some(s) => $action.session(s).await,
                    None => $action.await,
                }
            };
        }
        // Cursors (find, aggregate): every document, read on the session
        // when there is one.
        macro_rules! collect {
            ($action:expr) => {
                match session {
                    Some(s) => {
                        let mut cursor = $action.session(&mut *s).await.map_err(classify)?;
                        let docs: Vec<Document> =
                            cursor.stream(s).try_collect().await.map_err(classify)?;
                        docs
                    }
                    None => {
                        let cursor = $action.await.map_err(classify)?;
                        let docs: Vec<Document> = cursor.try_collect().await.map_err(classify)?;
                        docs
                    }
                }
            };
        }
        let filter = doc_of(fill(&m.filter, Absent::Refuse)?);
        let sort = fill(&m.sort, Absent::Refuse)?.and_then(as_doc);
        let projection = fill(&m.projection, Absent::Refuse)?.and_then(as_doc);
        let mut out = Outcome::default();
        match m.action {
            Action::FindOne => {
                let found = exec!(coll
                    .find_one(filter)
                    .optional(sort, |a, s| a.sort(s))
                    .optional(projection, |a, p| a.projection(p))
                    .optional(reads, |a, r| a.selection_criteria(r))
                    .optional(max_time, |a, t| a.max_time(t)))
                .map_err(classify)?;
                out.rows.extend(found.map(row));
            }
            Action::Find => {
                let limit = fill(&m.limit, Absent::Refuse)?.and_then(as_i64);
                let skip = fill(&m.skip, Absent::Refuse)?
                    .and_then(as_i64)
                    .map(|s| s.max(0) as u64);
                let find = coll
                    .find(filter)
                    .optional(sort, |a, s| a.sort(s))
                    .optional(projection, |a, p| a.projection(p))
                    .optional(limit, |a, l| a.limit(l))
                    .optional(skip, |a, s| a.skip(s))
                    .optional(reads, |a, r| a.selection_criteria(r))
                    .optional(max_time, |a, t| a.max_time(t));
                out.rows = collect!(find).into_iter().map(row).collect();
            }
            Action::Aggregate => {
                let stages: Vec<Document> = match fill(&m.pipeline, Absent::Refuse)? {
                    Some(Bson::Array(a)) => a.into_iter().filter_map(as_doc).collect(),
                    _ => Vec::new(),
                };
                let agg = coll
                    .aggregate(stages)
                    .optional(reads, |a, r| a.selection_criteria(r))
                    .optional(max_time, |a, t| a.max_time(t));
                out.rows = collect!(agg).into_iter().map(row).collect();
            }
            Action::InsertOne => {
                let mut document = doc_of(fill(&m.document, Absent::Omit)?);
                if !document.contains_key("_id") {
                    // Ours, so the stored document can be returned as is.
                    let mut with_id = doc! { "_id": bson::oid::ObjectId::new() };
                    with_id.extend(document);
                    document = with_id;
                }
                let insert = coll
                    .insert_one(&document)
                    .optional(wc, |a, w| a.write_concern(w));
                exec!(insert).map_err(classify)?;
                out.affected = 1;
                out.rows.push(row(document));
            }
            Action::UpdateOne => {
                match update_doc(fill(&m.update, Absent::Omit)?) {
                    Some(update) => {
                        let r = exec!(coll
                            .update_one(filter, update)
                            .optional(wc, |a, w| a.write_concern(w)))
                        .map_err(classify)?;
                        out.affected = r.modified_count;
                    }
                    // Nothing to change: report whether it exists.
                    None => {
                        let found = exec!(coll.find_one(filter)).map_err(classify)?;
                        out.rows.extend(found.map(row));
                    }
                }
            }
            Action::FindOneAndUpdate => match update_doc(fill(&m.update, Absent::Omit)?) {
                Some(update) => {
                    let found = exec!(coll
                        .find_one_and_update(filter, update)
                        .return_document(ReturnDocument::After)
                        .optional(wc, |a, w| a.write_concern(w))
                        .optional(sort, |a, s| a.sort(s))
                        .optional(projection, |a, p| a.projection(p)))
                    .map_err(classify)?;
                    out.affected = u64::from(found.is_some());
                    out.rows.extend(found.map(row));
                }
                None => {
                    let found = exec!(coll
                        .find_one(filter)
                        .optional(sort, |a, s| a.sort(s))
                        .optional(projection, |a, p| a.projection(p)))
                    .map_err(classify)?;
                    out.rows.extend(found.map(row));
                }
            },
            Action::DeleteOne => {
                let r = exec!(coll
                    .delete_one(filter)
                    .optional(wc, |a, w| a.write_concern(w)))
                .map_err(classify)?;
                out.affected = r.deleted_count;
            }
        }
        Ok(out)
    }
}

/// Applies a setter only when there is a value (the driver's builders take
/// values, not options).
trait Optional: Sized {
    fn optional<V>(self, v: Option<V>, set: impl FnOnce(Self, V) -> Self) -> Self {
        match v {
            Some(v) => set(self, v),
            None => self,
        }
    }
}

impl<T> Optional for T {}

fn as_doc(b: Bson) -> Option<Document> {
    match b {
        Bson::Document(d) => Some(d),
        _ => None,
    }
}

fn as_i64(b: Bson) -> Option<i64> {
    match b {
        Bson::Int64(i) => Some(i),
        Bson::Int32(i) => Some(i as i64),
        _ => None,
    }
}

/// An update with the operators whose every field was left out removed;
/// `None` when nothing is left to change.
fn update_doc(b: Option<Bson>) -> Option<Document> {
    let d: Document = as_doc(b?)?
        .into_iter()
        .filter(|(_, v)| !matches!(v, Bson::Document(inner) if inner.is_empty()))
        .collect();
    (!d.is_empty()).then_some(d)
}

/// A driver client for the `[databases.<name>]` entry `cfg` (also the event
/// log writer's and `beds logs`'s); nothing connects until the first
/// operation. `app` is the name the server sees.
pub async fn client(
    name: &str,
    cfg: &MongoDbConfig,
    app: &str,
    in_use: Option<Arc<AtomicI64>>,
) -> Result<mongodb::Client, AdapterError> {
    let timeout = Duration::from_millis(cfg.timeout_ms);
    // Async only for mongodb+srv URIs (a DNS lookup).
    let mut opts = ClientOptions::parse(&cfg.uri)
        .await
        .map_err(|e| AdapterError::Internal(format!("databases.{name}.uri: {e}")))?;
    opts.app_name = Some(app.into());
    opts.max_pool_size = Some(cfg.max_connections);
    opts.server_selection_timeout = Some(timeout);
    opts.connect_timeout = Some(timeout);
    // One attempt per write: a driver retry on another member could
    // return that member's "not primary" for a write the first one
    // applied, and BEDS would run it again. Every write error then
    // describes the one attempt, so an unknown outcome is reported as
    // unknown.
    opts.retry_writes = Some(false);
    if let Some(n) = in_use {
        opts.cmap_event_handler = Some(mongodb::event::EventHandler::callback(
            move |e: mongodb::event::cmap::CmapEvent| {
                use mongodb::event::cmap::CmapEvent as E;
                match e {
                    E::ConnectionCheckedOut(_) => n.fetch_add(1, Ordering::Relaxed),
                    E::ConnectionCheckedIn(_) => n.fetch_sub(1, Ordering::Relaxed),
                    _ => 0,
                };
            },
        ));
    }
    if cfg.tls.enabled {
        // The driver reads certificate and key from one PEM file (config
        // requires key_file = cert_file); the CA unset means public roots.
        opts.tls = Some(mongodb::options::Tls::Enabled(
            mongodb::options::TlsOptions::builder()
                .ca_file_path(cfg.tls.ca_file.clone())
                .cert_key_file_path(cfg.tls.cert_file.clone())
                .build(),
        ));
    }
    if let Some(user) = &cfg.user {
        opts.credential = Some(
            Credential::builder()
                .username(user.clone())
                .password(cfg.pass.clone().filter(|p| !p.is_empty()))
                .source(cfg.auth_source.clone())
                .build(),
        );
    }
    mongodb::Client::with_options(opts)
        .map_err(|e| AdapterError::Internal(format!("databases.{name}: {e}")))
}

async fn ping(db: &mongodb::Database, limit: Duration) -> Result<(), AdapterError> {
    bounded(limit, db.run_command(doc! { "ping": 1 }))
        .await
        .map(|_| ())
}

/// A driver call that is not an op (ping, hello, listings, transaction
/// steps) with the same bound: past it, the server counts as unreachable.
async fn bounded<T>(
    limit: Duration,
    f: impl std::future::IntoFuture<Output = mongodb::error::Result<T>>,
) -> Result<T, AdapterError> {
    match tokio::time::timeout(limit, f.into_future()).await {
        Ok(r) => r.map_err(|e| classify(e, false)),
        Err(_) => Err(AdapterError::Unreachable(format!(
            "no answer within {limit:?}"
        ))),
    }
}

/// The write concern writes use; `w_timeout` so a majority that cannot be
/// reached answers (an unknown outcome) instead of waiting forever.
fn resolve_write_concern(
    wc: WriteConcern,
    replica_set: bool,
    timeout: Duration,
) -> DriverWriteConcern {
    let mut w = match wc {
        WriteConcern::Majority => DriverWriteConcern::majority(),
        WriteConcern::Acknowledged => DriverWriteConcern::nodes(1),
        WriteConcern::Auto if replica_set => DriverWriteConcern::majority(),
        WriteConcern::Auto => DriverWriteConcern::nodes(1),
    };
    w.w_timeout = Some(timeout);
    w
}

#[async_trait]
impl NamasteCore for MongoDb {
    async fn call(&self, op: &Op, params: &[Param]) -> Result<Outcome, AdapterError> {
        self.run(op, params, None).await
    }

    fn atomic_support(&self) -> Result<(), String> {
        match self.deployment.get().map(|d| &d.no_transactions) {
            Some(None) => Ok(()),
            Some(Some(why)) => Err(why.clone()),
            None => Err(format!("database {} has not been opened", self.name)),
        }
    }

    async fn call_atomic(
        &self,
        calls: &[(&Op, &[Param])],
    ) -> Result<Vec<Outcome>, (usize, AdapterError)> {
        if let Err(why) = self.atomic_support() {
            return Err((0, AdapterError::Invalid(why)));
        }
        let limit = self.timeout;
        let mut session = bounded(limit, self.client.start_session())
            .await
            .inspect_err(|e| self.note_unreachable(e))
            .map_err(|e| (0, e))?;
        bounded(
            limit,
            session
                .start_transaction()
                .write_concern(self.write_concern()),
        )
        .await
        .map_err(|e| (0, e))?;
        let mut outs = Vec::with_capacity(calls.len());
        for (i, (op, params)) in calls.iter().enumerate() {
            match self.run(op, params, Some(&mut session)).await {
                Ok(o) => outs.push(o),
                Err(e) => {
                    // Unfinished, the server aborts it itself.
                    let _ = tokio::time::timeout(limit, session.abort_transaction()).await;
                    // Nothing of an aborted transaction was applied.
                    return Err((i, e.uncommitted()));
                }
            }
        }
        let last = calls.len().saturating_sub(1);
        match tokio::time::timeout(limit.saturating_mul(2), session.commit_transaction()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.contains_label("UnknownTransactionCommitResult") => {
                return Err((last, AdapterError::Indeterminate(e.to_string())))
            }
            Ok(Err(e)) => return Err((last, classify(e, true))),
            Err(_) => {
                return Err((
                    last,
                    AdapterError::Indeterminate(format!("COMMIT not answered within {limit:?}")),
                ))
            }
        }
        Ok(outs)
    }

    fn inbox(&self) -> bool {
        self.inbox
    }

    async fn call_once(
        &self,
        key: &InboxKey,
        calls: &[(&Op, &[Param])],
        record: &mut Recorder<'_>,
    ) -> Result<Once, AdapterError> {
        if self.atomic_support().is_ok() {
            self.once_in_transaction(key, calls, record).await
        } else {
            self.once_in_order(key, calls, record).await
        }
    }

    async fn purge_inbox(&self, age: Duration, _limit: u32) -> Result<u64, AdapterError> {
        let before = bson::DateTime::from_millis(
            bson::DateTime::now().timestamp_millis() - age.as_millis() as i64,
        );
        let r = bounded(
            self.timeout,
            self.inbox_coll()
                .delete_many(doc! { "created_at": { "$lt": before } }),
        )
        .await?;
        Ok(r.deleted_count)
    }

    fn session(&self) -> Box<dyn Session + '_> {
        // The driver pools connections per server itself; entries run one
        // by one, each with its own retry and timeout.
        Box::new(MongoSession { db: self })
    }
}

struct MongoSession<'a> {
    db: &'a MongoDb,
}

#[async_trait]
impl Session for MongoSession<'_> {
    async fn call(&mut self, op: &Op, params: &[Param]) -> Result<Outcome, AdapterError> {
        self.db.call(op, params).await
    }
}

#[async_trait]
impl Lifecycle for MongoDb {
    async fn open(&self, _tolerate_optional: bool) -> Result<(), AdapterError> {
        let hello = bounded(self.timeout, self.db.run_command(doc! { "hello": 1 })).await?;
        let replica_set = hello.contains_key("setName");
        let mongos = hello.get_str("msg").is_ok_and(|m| m == "isdbgrid");
        let wire = hello
            .get("maxWireVersion")
            .and_then(|v| v.as_i32().or(v.as_i64().map(|i| i as i32)))
            .unwrap_or(0);
        let sessions = hello.contains_key("logicalSessionTimeoutMinutes");
        // Transactions: replica sets from MongoDB 4.0 (wire 7), sharded
        // clusters from 4.2 (wire 8); both need sessions.
        let no_transactions = if !sessions {
            Some("the server does not support sessions".to_string())
        } else if replica_set && wire >= 7 || mongos && wire >= 8 {
            None
        } else if replica_set || mongos {
            Some(format!(
                "the server is too old for transactions (wire version {wire})"
            ))
        } else {
            Some(
                "transactions need a replica set or a sharded cluster; this server is standalone"
                    .to_string(),
            )
        };
        let d = Deployment {
            write_concern: resolve_write_concern(
                self.write_concern,
                replica_set || mongos,
                self.timeout,
            ),
            no_transactions,
        };
        tracing::info!(database = %self.name, replica_set, mongos, wire,
            write_concern = ?d.write_concern.w, transactions = d.no_transactions.is_none(), "MongoDB deployment");
        let _ = self.deployment.set(d);
        Ok(())
    }

    async fn ping(&self) -> Result<(), AdapterError> {
        ping(&self.db, self.timeout).await
    }

    async fn missing_objects(&self, templates: &[&Template]) -> Result<Vec<String>, AdapterError> {
        let present = bounded(self.timeout, self.db.list_collection_names()).await?;
        let mut problems = Vec::new();
        let writes = templates
            .iter()
            .flat_map(|t| t.ops.values())
            .any(|op| op.access != Access::Read);
        if self.inbox && writes && !present.iter().any(|c| c == INBOX) {
            problems.push(format!(
                "collection {INBOX} (the durable inbox of writes with a message_id) does not exist in {}.{} (run utilities/mongo/inbox.json, or set databases.{}.inbox = false)",
                self.name,
                self.db.name(),
                self.name
            ));
        }
        for t in templates {
            let Some(coll) = &t.collection else { continue };
            if !present.contains(coll) {
                problems.push(format!(
                    "template {}: collection {coll} does not exist in {}.{} (run the DBA script that creates it and its indexes)",
                    t.name,
                    self.name,
                    self.db.name()
                ));
                continue;
            }
            let models: Vec<mongodb::IndexModel> = bounded(self.timeout, async {
                self.db
                    .collection::<Document>(coll)
                    .list_indexes()
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
            let have: Vec<Index> = models
                .iter()
                .map(|m| Index {
                    keys: m
                        .keys
                        .iter()
                        .map(|(k, v)| (k.clone(), direction(v)))
                        .collect(),
                    unique: m.options.as_ref().and_then(|o| o.unique).unwrap_or(false),
                    expire_after_secs: m
                        .options
                        .as_ref()
                        .and_then(|o| o.expire_after)
                        .map(|d| d.as_secs()),
                })
                .collect();
            for want in &t.indexes {
                let found = have.iter().any(|h| {
                    h.keys == want.keys
                        && (h.unique || !want.unique)
                        && (want.expire_after_secs.is_none()
                            || h.expire_after_secs == want.expire_after_secs)
                });
                if !found {
                    problems.push(format!(
                        "template {}: collection {coll} lacks the index {} (the DBA script creates it)",
                        t.name,
                        want.describe()
                    ));
                }
            }
        }
        Ok(problems)
    }

    fn health(&self) -> &Health {
        &self.health
    }

    fn pool(&self) -> Option<(u32, u32)> {
        let n = self.in_use.load(Ordering::Relaxed).max(0) as u32;
        Some((n, self.max_connections))
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.client.clone().shutdown().await;
    }
}

/// An index key's direction as 1 / -1 (servers may answer 1, 1.0 or 1_i64);
/// other kinds ("text", "2dsphere") as 0, which no template key matches.
fn direction(v: &Bson) -> i32 {
    match v {
        Bson::Int32(i) => i.signum(),
        Bson::Int64(i) => i.signum() as i32,
        Bson::Double(f) if *f > 0.0 => 1,
        Bson::Double(f) if *f < 0.0 => -1,
        _ => 0,
    }
}

/// A document as a row: `_id` first, as `id`.
pub(crate) fn row(mut d: Document) -> Row {
    let mut r = Map::with_capacity(d.len());
    if let Some(id) = d.remove("_id") {
        r.insert("id".into(), to_json(id));
    }
    for (k, v) in d {
        r.insert(k, to_json(v));
    }
    r
}

/// CONTRACT §4: ObjectId as its hex string, dates as RFC 3339 UTC,
/// Decimal128 as a string, integers as numbers.
fn to_json(b: Bson) -> Value {
    match b {
        Bson::Null | Bson::Undefined => Value::Null,
        Bson::Boolean(b) => Value::Bool(b),
        Bson::Int32(i) => Value::from(i),
        Bson::Int64(i) => Value::from(i),
        Bson::Double(f) => Number::from_f64(f).map_or(Value::Null, Value::Number),
        Bson::String(s) | Bson::Symbol(s) | Bson::JavaScriptCode(s) => Value::String(s),
        Bson::ObjectId(o) => Value::String(o.to_hex()),
        Bson::DateTime(d) => match chrono::DateTime::from_timestamp_millis(d.timestamp_millis()) {
            Some(t) => Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
            None => Value::Null,
        },
        Bson::Decimal128(d) => Value::String(d.to_string()),
        Bson::Array(a) => Value::Array(a.into_iter().map(to_json).collect()),
        Bson::Document(d) => Value::Object(d.into_iter().map(|(k, v)| (k, to_json(v))).collect()),
        Bson::Binary(b) => Value::String(hex::encode(b.bytes)),
        Bson::Timestamp(t) => Value::from((u64::from(t.time) << 32) | u64::from(t.increment)),
        other => Value::String(other.to_string()),
    }
}

/// Sorts a driver error into what the dispatcher must do about it. `write`:
/// the operation may change data, so a connection lost after sending it
/// leaves its outcome unknown.
fn classify(e: mongodb::error::Error, write: bool) -> AdapterError {
    if e.contains_label("TransientTransactionError") {
        return AdapterError::Transient(e.to_string());
    }
    let lost = |m: String| {
        if write {
            AdapterError::Indeterminate(m)
        } else {
            AdapterError::Unreachable(m)
        }
    };
    match e.kind.as_ref() {
        // No server was found: nothing was sent.
        ErrorKind::ServerSelection { .. } | ErrorKind::DnsResolve { .. } => {
            AdapterError::Unreachable(e.to_string())
        }
        // Returned when a connection is checked out: nothing was sent.
        ErrorKind::ConnectionPoolCleared { .. } => AdapterError::Unreachable(e.to_string()),
        ErrorKind::Io(_) => lost(e.to_string()),
        ErrorKind::Write(WriteFailure::WriteError(we)) => code_error(we.code, &we.message, write),
        // Applied on the primary, not confirmed by enough members.
        ErrorKind::Write(WriteFailure::WriteConcernError(wce)) => {
            AdapterError::Indeterminate(format!("write concern not satisfied: {}", wce.message))
        }
        ErrorKind::Command(ce) => code_error(ce.code, &ce.message, write),
        ErrorKind::Authentication { message, .. } => {
            AdapterError::Internal(format!("authentication failed: {message}"))
        }
        _ => AdapterError::Internal(e.to_string()),
    }
}

fn code_error(code: i32, message: &str, write: bool) -> AdapterError {
    let m = message.to_string();
    match code {
        11000 | 11001 | 12582 => AdapterError::Conflict(m),
        // WriteConflict, LockTimeout, ExceededTimeLimit, MaxTimeMSExpired.
        112 | 24 | 262 | 50 => AdapterError::Transient(m),
        // Not primary / node recovering / shutting down: the command was
        // refused before it ran.
        10107 | 13435 | 13436 | 11600 | 11602 | 91 | 189 | 10058 => AdapterError::Unreachable(m),
        // HostUnreachable, HostNotFound, NetworkTimeout, SocketException.
        6 | 7 | 89 | 9001 if write => AdapterError::Indeterminate(m),
        6 | 7 | 89 | 9001 => AdapterError::Unreachable(m),
        _ => AdapterError::Internal(format!("{code}: {m}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_become_rows_with_id_first() {
        let oid = bson::oid::ObjectId::parse_str("0123456789abcdef01234567").unwrap();
        let d = doc! {
            "title": "t",
            "_id": oid,
            "created": bson::DateTime::from_millis(1_700_000_000_123),
            "big": 9_007_199_254_740_993_i64,
            "tags": ["a"],
        };
        let r = row(d);
        let keys: Vec<&str> = r.keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, ["id", "title", "created", "big", "tags"]);
        assert_eq!(r["id"], "0123456789abcdef01234567");
        assert_eq!(r["created"], "2023-11-14T22:13:20.123Z");
        assert_eq!(r["big"], serde_json::json!(9_007_199_254_740_993_i64));
    }

    #[test]
    fn empty_updates_are_nothing_to_change() {
        assert_eq!(update_doc(Some(Bson::Document(doc! {"$set": {}}))), None);
        assert_eq!(
            update_doc(Some(Bson::Document(doc! {"$set": {"a": 1}, "$unset": {}}))),
            Some(doc! {"$set": {"a": 1}})
        );
    }

    #[test]
    fn duplicate_keys_are_conflicts_and_not_primary_is_unreachable() {
        assert!(matches!(
            code_error(11000, "E11000", true),
            AdapterError::Conflict(_)
        ));
        assert!(matches!(
            code_error(10107, "not primary", true),
            AdapterError::Unreachable(_)
        ));
        assert!(matches!(
            code_error(9001, "socket", true),
            AdapterError::Indeterminate(_)
        ));
    }
}
