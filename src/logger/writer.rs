//! The writer task: takes events from the memory queue, fills in lineage,
//! and inserts them in unordered batches; while MongoDB does not answer, or
//! while older events still wait in the spool, new ones go to the spool too
//! (so they reach the collection in order), and the spool is replayed
//! oldest first as soon as inserts succeed again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::error::ErrorKind;
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;

use super::spool::Spool;
use super::{derived_traceparent, Event, EventLog};
use crate::config::{Config, DatabaseConfig};
use crate::supervisor::{Backoff, Supervisor};

/// How many event → root pairs the writer remembers for lineage.
const ROOTS_KEPT: usize = 200_000;

/// Spool files replayed per flush, so new events are not held up long.
const REPLAY_PER_TICK: usize = 20;

/// The running writer; [`Writer::stop`] flushes (or spools) what it holds.
pub struct Writer {
    /// Runs the writer task (restarted if it dies) apart from the node's
    /// dispatchers, so it can outlive them and log their last events.
    supervisor: Supervisor,
    /// The log's collection (`None`: the log is off).
    coll: Option<Collection<Document>>,
}

impl Writer {
    /// A writer that does nothing (the event log is off).
    fn none() -> Writer {
        Writer {
            supervisor: Supervisor::new(),
            coll: None,
        }
    }

    pub fn collection(&self) -> Option<&Collection<Document>> {
        self.coll.as_ref()
    }

    /// Writes what is queued (to MongoDB, or to the spool if it does not
    /// answer within its timeout) and ends the task.
    pub async fn stop(self) {
        self.supervisor.shutdown().await;
        // Its own client: shut down, not dropped, before the runtime ends.
        if let Some(c) = self.coll {
            let limit = Duration::from_secs(2);
            let _ = tokio::time::timeout(limit, c.client().clone().shutdown()).await;
        }
    }
}

/// What the writer task needs; shared by its restarts.
struct Ctx {
    coll: Collection<Document>,
    rx: Mutex<mpsc::Receiver<Event>>,
    spool: Mutex<Spool>,
    batch: usize,
    flush: Duration,
    /// Bound on one insert.
    timeout: Duration,
    /// Event id → root event id, for children whose parent is recent.
    roots: Mutex<HashMap<String, String>>,
    /// Announces a full spool in the log itself.
    log: EventLog,
    /// While MongoDB does not answer: when to try it again, and the
    /// backoff. Until then batches go straight to the spool, so an outage
    /// costs no insert timeout per batch and events do not pile up in
    /// memory (where a `kill -9` would lose them).
    retry: Mutex<(Option<tokio::time::Instant>, Backoff)>,
}

/// The event log's collection, from config: `None` when the log is off.
pub async fn open_collection(config: &Config) -> Result<Option<Collection<Document>>, String> {
    let ev = &config.events;
    let Some(db) = config.event_database() else {
        return Ok(None);
    };
    let Some(DatabaseConfig::Mongodb(cfg)) = config.databases.get(db) else {
        return Err(format!("events.database {db} is not a mongodb entry"));
    };
    let client = crate::namaste::mongo::client(db, cfg, "beds event log", None)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Some(client.database(&cfg.name).collection(&ev.collection)))
}

/// Starts the writer for `config` (or a log that is off). Events emitted
/// before MongoDB answers wait in the queue or the spool.
pub async fn start(config: &Config) -> Result<(EventLog, Writer), String> {
    let Some(coll) = open_collection(config).await? else {
        return Ok((EventLog::off(), Writer::none()));
    };
    let ev = &config.events;
    let dir = ev.spool_dir.join(&config.node.name);
    let spool = Spool::open(&dir, ev.spool_max_bytes)
        .map_err(|e| format!("events.spool_dir {}: {e}", dir.display()))?;
    if !spool.is_empty() {
        tracing::info!(bytes = spool.bytes(), dir = %dir.display(), "event spool from an earlier run: writing it first");
    }
    let (tx, rx) = mpsc::channel(ev.queue);
    let log = EventLog::new(tx, &config.node.name, &config.node.role);
    log.spooled(spool.bytes(), 0);
    let timeout = match config
        .event_database()
        .and_then(|d| config.databases.get(d))
    {
        Some(DatabaseConfig::Mongodb(c)) => Duration::from_millis(c.timeout_ms),
        _ => Duration::from_secs(5),
    };
    let ctx = Arc::new(Ctx {
        coll: coll.clone(),
        rx: Mutex::new(rx),
        spool: Mutex::new(spool),
        batch: ev.batch,
        flush: Duration::from_millis(ev.flush_ms),
        timeout,
        roots: Mutex::new(HashMap::new()),
        log: log.clone(),
        retry: Mutex::new((None, Backoff::default())),
    });
    let supervisor = Supervisor::new();
    let stop = supervisor.token();
    supervisor.spawn("event log writer".into(), move || {
        run(ctx.clone(), stop.clone())
    });
    Ok((
        log,
        Writer {
            supervisor,
            coll: Some(coll),
        },
    ))
}

/// Creates the collection's indexes (idempotent): by root (chains), by time
/// (TTL: `retention_days`), and for the observer's filters. `_id` is the
/// event id. A changed retention updates the TTL index in place.
/// An index with a name (BEDS names every index it makes, so it can find
/// them again).
pub fn named(name: &str, keys: Document) -> IndexModel {
    IndexModel::builder()
        .keys(keys)
        .options(IndexOptions::builder().name(name.to_string()).build())
        .build()
}

/// A named TTL index: documents go `ttl` after the date in `keys`' field.
pub fn ttl_index(name: &str, keys: Document, ttl: Duration) -> IndexModel {
    IndexModel::builder()
        .keys(keys)
        .options(
            IndexOptions::builder()
                .name(name.to_string())
                .expire_after(ttl)
                .build(),
        )
        .build()
}

pub async fn ensure_indexes(
    coll: &Collection<Document>,
    retention_days: u32,
) -> Result<(), String> {
    let ttl = Duration::from_secs(u64::from(retention_days) * 86_400);
    // What is there already (none when the collection does not exist yet):
    // only missing indexes are created, so a restart sends no index build
    // to a collection that may hold millions of events.
    let have: Vec<IndexModel> = match coll.list_indexes().await {
        Ok(c) => c.try_collect().await.map_err(|e| e.to_string())?,
        Err(e) if matches!(*e.kind, ErrorKind::Command(ref c) if c.code == 26) => Vec::new(),
        Err(e) => return Err(e.to_string()),
    };
    let existing = |name: &str| {
        have.iter()
            .find(|m| m.options.as_ref().and_then(|o| o.name.as_deref()) == Some(name))
    };
    let models: Vec<IndexModel> = vec![
        named("root_ts", doc! {"root_event_id": 1, "ts": 1}),
        named("template_op_ts", doc! {"template": 1, "op": 1, "ts": -1}),
        named("status_code_ts", doc! {"status": 1, "code": 1, "ts": -1}),
        named("node_ts", doc! {"node": 1, "ts": -1}),
        named("message_id", doc! {"message_id": 1}),
    ]
    .into_iter()
    .filter(|m| {
        existing(
            m.options
                .as_ref()
                .and_then(|o| o.name.as_deref())
                .unwrap_or(""),
        )
        .is_none()
    })
    .collect();
    if !models.is_empty() {
        coll.create_indexes(models)
            .await
            .map_err(|e| e.to_string())?;
    }
    match existing("ts_ttl").map(|m| m.options.as_ref().and_then(|o| o.expire_after)) {
        Some(Some(current)) if current == ttl => Ok(()),
        // The retention changed: change the TTL in place.
        Some(_) => {
            let cmd = doc! {"collMod": coll.name(), "index": {"name": "ts_ttl", "expireAfterSeconds": ttl.as_secs() as i64}};
            coll.client()
                .database(&coll.namespace().db)
                .run_command(cmd)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        None => coll
            .create_index(ttl_index("ts_ttl", doc! {"ts": 1}, ttl))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    }
}

async fn run(ctx: Arc<Ctx>, stop: CancellationToken) {
    let mut rx = ctx.rx.lock().await;
    loop {
        let mut batch = Vec::new();
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            e = rx.recv() => match e {
                Some(e) => { batch.push(e); false }
                None => true,
            },
            // Idle: a chance to replay the spool.
            _ = tokio::time::sleep(ctx.flush) => false,
        };
        if stopping {
            while let Ok(e) = rx.try_recv() {
                batch.push(e);
            }
            write(&ctx, batch).await;
            return;
        }
        let until = tokio::time::Instant::now() + ctx.flush;
        while !batch.is_empty() && batch.len() < ctx.batch {
            tokio::select! {
                e = rx.recv() => match e {
                    Some(e) => batch.push(e),
                    None => break,
                },
                _ = tokio::time::sleep_until(until) => break,
                _ = stop.cancelled() => break,
            }
        }
        write(&ctx, batch).await;
    }
}

/// Replays the spool while inserts succeed, then writes `batch`, to
/// MongoDB if the spool is empty and MongoDB answers, to the spool
/// otherwise.
async fn write(ctx: &Ctx, mut batch: Vec<Event>) {
    let mut spool = ctx.spool.lock().await;
    let mut retry = ctx.retry.lock().await;
    let now = tokio::time::Instant::now();
    let waiting = retry.0.is_some_and(|at| now < at);
    let failed = |retry: &mut (Option<tokio::time::Instant>, Backoff)| {
        retry.0 = Some(tokio::time::Instant::now() + retry.1.next_delay());
    };
    if !waiting {
        for _ in 0..REPLAY_PER_TICK {
            let Some((n, events)) = blocking(|| spool.oldest()) else {
                break;
            };
            if insert(ctx, &events).await.is_err() {
                failed(&mut retry);
                break;
            }
            *retry = (None, Backoff::default());
            spool.remove(n);
            ctx.log.spooled(spool.bytes(), 0);
            if spool.is_empty() {
                tracing::info!("event spool written to MongoDB");
            }
        }
    }
    if batch.is_empty() {
        return;
    }
    // No parent look-ups while MongoDB is away: each would wait its timeout.
    let answering = retry.0.is_none();
    lineage(ctx, &mut batch, answering).await;
    if spool.is_empty() && retry.0.is_none_or(|at| tokio::time::Instant::now() >= at) {
        match insert(ctx, &batch).await {
            Ok(()) => {
                *retry = (None, Backoff::default());
                return;
            }
            Err(e) => {
                failed(&mut retry);
                tracing::warn!(error = %e, events = batch.len(), "event log: MongoDB does not take events; spooling them");
            }
        }
    }
    let pushed = blocking(|| spool.push(&batch));
    ctx.log
        .spooled(spool.bytes(), *pushed.as_ref().unwrap_or(&0));
    match pushed {
        Ok(0) => {}
        Ok(dropped) => {
            tracing::error!(
                dropped,
                bytes = spool.bytes(),
                "event spool full: the oldest spooled events were dropped"
            );
            ctx.log.lifecycle(
                "error",
                "spool_full",
                format!("event spool full: {dropped} oldest events dropped"),
            );
        }
        Err(e) => {
            tracing::error!(error = %e, events = batch.len(), "event spool not writable: events lost")
        }
    }
}

/// One unordered insert; events already there (a spool replayed twice)
/// count as written.
async fn insert(ctx: &Ctx, events: &[Event]) -> Result<(), String> {
    let coll = ctx.coll.clone_with_type::<super::Stored<'_>>();
    let docs = events.iter().map(Event::stored);
    let sent = tokio::time::timeout(ctx.timeout, coll.insert_many(docs).ordered(false)).await;
    match sent {
        Err(_) => Err(format!("no answer within {:?}", ctx.timeout)),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => match e.kind.as_ref() {
            ErrorKind::InsertMany(m)
                if m.write_concern_error.is_none()
                    && m.write_errors
                        .as_ref()
                        .is_some_and(|w| w.iter().all(|w| w.code == 11000)) =>
            {
                Ok(())
            }
            _ => Err(e.to_string()),
        },
    }
}

/// Fills in each event's root (its own id, or its parent's root) and a
/// derived `traceparent` where the request had none. Parents are looked up
/// in what this writer saw, then in the collection (one query per batch);
/// a parent found nowhere (another node has not written it yet) stands in
/// for the root.
async fn lineage(ctx: &Ctx, batch: &mut [Event], look_up: bool) {
    let mut roots = ctx.roots.lock().await;
    if roots.len() > ROOTS_KEPT {
        roots.clear();
    }
    let unknown: Vec<&str> = batch
        .iter()
        .filter_map(|e| e.parent_event_id.as_deref())
        .filter(|p| !roots.contains_key(*p) && !batch.iter().any(|e| e.event_id == *p))
        .collect();
    if look_up && !unknown.is_empty() {
        let found = tokio::time::timeout(ctx.timeout, async {
            ctx.coll
                .find(doc! {"_id": {"$in": &unknown}})
                .projection(doc! {"root_event_id": 1})
                .await?
                .try_collect::<Vec<Document>>()
                .await
        })
        .await;
        if let Ok(Ok(docs)) = found {
            for d in docs {
                if let (Ok(id), Ok(root)) = (d.get_str("_id"), d.get_str("root_event_id")) {
                    roots.insert(id.to_string(), root.to_string());
                }
            }
        }
    }
    for e in batch.iter_mut() {
        let root = match &e.parent_event_id {
            None => e.event_id.clone(),
            Some(p) => roots.get(p).cloned().unwrap_or_else(|| p.clone()),
        };
        roots.insert(e.event_id.clone(), root.clone());
        if e.traceparent.is_none() {
            e.traceparent = derived_traceparent(&root, &e.event_id);
        }
        e.root_event_id = Some(root);
    }
}

/// Runs disk work (the spool: write, fsync, rename, read) without stalling
/// the runtime thread the dispatchers share, where the runtime allows it.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
