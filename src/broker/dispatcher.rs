//! One dispatcher: a task consuming `<prefix>.<broker>` on its own channel.
//! Every delivery runs as its own task (at most `prefetch` at once):
//!
//! envelope check → parse → dedup → resolve template/op → broker and access
//! checks → validate values → NamasteCore call → reply (confirmed) → ack.
//!
//! A request is acknowledged only after everything it causes (reply, retry
//! or parking) has been confirmed by RabbitMQ; if any of that fails, the
//! delivery is returned to the queue instead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;

use futures::{FutureExt, StreamExt};
use hmac::{Hmac, Mac};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::protocol::basic::AMQPProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::dedup::{Claim, Dedup};
use super::payload::{self, BrokerPayload, Request};
use super::reply::{Encoded, Reply};
use super::topology::Names;
use super::{publish_confirmed, AmqpLink, Backoff, PublishError};
use crate::config::Access;
use crate::error::{clip, ErrorCode, Failure, MAX_MESSAGE_BYTES};
use crate::namaste::{Adapters, Outcome};
use crate::registry::{values, Op, Param, Registry, RequestError, Store};
use crate::shutdown::Shutdown;

/// Retry attempt number a message carries (0 or absent on first delivery).
pub const ATTEMPT_HEADER: &str = "x-beds-attempt";
/// Results of the batch entries already executed, carried through retries
/// so a retried batch never applies an entry twice.
pub const BATCH_DONE_HEADER: &str = "x-beds-batch-done";
/// Caller identity of a retried request (RabbitMQ does not let BEDS
/// republish another user's `user_id`), with its signature.
pub const USER_HEADER: &str = "x-beds-user-id";
pub const USER_SIG_HEADER: &str = "x-beds-user-sig";
/// Headers a parked (DLQ) message carries to say why it is there.
pub const ERROR_CODE_HEADER: &str = "x-beds-error-code";
pub const ERROR_MESSAGE_HEADER: &str = "x-beds-error-message";
pub const EVENT_ID_HEADER: &str = "x-beds-event-id";
/// On a parked batch: the original indices of the entries it kept.
pub const BATCH_ENTRIES_HEADER: &str = "x-beds-batch-entries";

/// Redeliveries whose outcome could not be published before a request is
/// quarantined instead of tried again.
const MAX_STRIKES: u8 = 2;

/// Wait before returning a request whose outcome could not be published.
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

/// Largest batch-progress header carried through a retry; beyond it the
/// batch is answered at once instead (headers must fit one AMQP frame).
const MAX_BATCH_DONE_BYTES: usize = 32 * 1024;
/// Client headers larger than this are not copied onto retried or parked
/// copies (ours must still fit one frame next to them).
const MAX_COPIED_HEADERS_BYTES: usize = 32 * 1024;

/// What every dispatcher of the node shares, read-only.
pub struct Shared {
    /// The immutable template snapshot.
    pub registry: Arc<Registry>,
    /// NamasteCore adapters by database name; their health pauses us.
    pub adapters: Adapters,
    /// Write dedup memory by `message_id`.
    pub dedup: Arc<Dedup>,
    pub names: Names,
    /// Number of retry tiers (queues `.retry.1` … `.retry.N`).
    pub retry_tiers: usize,
    pub max_payload: usize,
    pub max_batch: usize,
    pub prefetch: u16,
    /// How long a pause or shutdown waits for in-flight requests.
    pub drain: Duration,
    /// HMAC key for the identity carried through retries.
    pub retry_key: Vec<u8>,
    /// Node name, for consumer tags.
    pub node: String,
    /// Poison-message guard: attempts whose outcome was never published.
    pub strikes: Strikes,
}

/// One broker this node serves.
#[derive(Debug, Clone)]
pub struct BrokerSpec {
    pub name: String,
    pub serves: Vec<Access>,
    pub queue: String,
}

pub struct Dispatcher {
    pub shared: Arc<Shared>,
    pub broker: Arc<BrokerSpec>,
    pub link: Arc<AmqpLink>,
    /// Instance number within this broker's pool, for logs and tags.
    pub id: usize,
    pub shutdown: Shutdown,
    /// Dropped when this dispatcher ends: the node waits for all of them.
    pub _done: mpsc::Sender<()>,
}

impl Dispatcher {
    pub async fn run(mut self) {
        let tracker = TaskTracker::new();
        let mut backoff = Backoff::default();
        while !self.shutdown.is_shutdown() {
            if !self.shared.adapters.all_up() {
                tracing::info!(broker = %self.broker.name, id = self.id, "paused while a database is down");
                tokio::select! {
                    _ = self.shutdown.recv() => break,
                    _ = self.shared.adapters.wait_all_up() => {}
                }
                tracing::info!(broker = %self.broker.name, id = self.id, "resumed");
            }
            // Opening may hang on a partitioned network: shutdown wins.
            let opened = tokio::select! {
                _ = self.shutdown.recv() => break,
                r = open(&self.link, &self.shared, &self.broker, self.id) => r,
            };
            let served = match opened {
                Ok((ch, tag, consumer)) => self.consume(&tracker, ch, tag, consumer).await,
                Err(e) => Err(e),
            };
            match served {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(broker = %self.broker.name, id = self.id, error = %e, ?wait, "consumer lost; reconnecting");
                    tokio::select! {
                        _ = self.shutdown.recv() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        tracing::debug!(broker = %self.broker.name, id = self.id, "dispatcher stopped");
    }

    /// Consumes until shutdown, a database outage, or a channel error; then
    /// lets in-flight requests finish and closes the channel, which returns
    /// any delivery not yet started to the queue.
    async fn consume(
        &mut self,
        tracker: &TaskTracker,
        ch: Channel,
        tag: String,
        mut consumer: lapin::Consumer,
    ) -> Result<(), lapin::Error> {
        let down = any_down(&self.shared.adapters);
        tokio::pin!(down);
        let result = loop {
            tokio::select! {
                biased;
                _ = self.shutdown.recv() => break Ok(()),
                _ = &mut down => break Ok(()),
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let (shared, broker, ch) = (self.shared.clone(), self.broker.clone(), ch.clone());
                        tracker.spawn(handle(shared, broker, ch, delivery));
                    }
                    Some(Err(e)) => break Err(e),
                    None => break Err(lapin::Error::InvalidChannelState(lapin::ChannelState::Closed)),
                },
            }
        };
        let _ = ch.basic_cancel(&tag, BasicCancelOptions::default()).await;
        tracker.close();
        if tokio::time::timeout(self.shared.drain, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(broker = %self.broker.name, id = self.id, unfinished = tracker.len(),
                "drain timeout: unfinished requests go back to the queue");
        }
        tracker.reopen();
        let _ = ch.close(200, "dispatcher stopping").await;
        result
    }
}

/// A channel with prefetch and publisher confirms, consuming the broker's
/// queue.
async fn open(
    link: &AmqpLink,
    shared: &Shared,
    broker: &BrokerSpec,
    id: usize,
) -> Result<(Channel, String, lapin::Consumer), lapin::Error> {
    let ch = link.channel().await?;
    ch.basic_qos(shared.prefetch, BasicQosOptions::default())
        .await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let tag = format!(
        "{}.{}.{}.{}",
        shared.node,
        broker.name,
        id,
        uuid::Uuid::new_v4().simple()
    );
    let consumer = ch
        .basic_consume(
            &broker.queue,
            &tag,
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((ch, tag, consumer))
}

/// Resolves when any database goes down (never, when there are none).
async fn any_down(adapters: &Adapters) {
    let waits: Vec<_> = adapters
        .iter()
        .map(|(_, a)| {
            let mut rx = a.health().subscribe();
            Box::pin(async move {
                if rx.wait_for(|up| !*up).await.is_err() {
                    futures::future::pending::<()>().await;
                }
            })
        })
        .collect();
    if waits.is_empty() {
        futures::future::pending::<()>().await;
    }
    futures::future::select_all(waits).await;
}

/// What finishing a delivery requires, decided before anything is sent.
enum Action {
    /// Reply (when there is a `reply_to`); park the message first when
    /// `park` holds the reason.
    Answer {
        reply: Arc<Encoded>,
        park: Option<Failure>,
        /// Batches: the entries the parked copy keeps (those a replay
        /// should run), so a replay never re-runs finished entries.
        parked_entries: Option<Vec<usize>>,
    },
    /// Republish to retry tier `tier` (1-based).
    Retry {
        tier: usize,
        failure: Failure,
        batch_done: Option<String>,
    },
}

/// What the dispatcher knows about a delivery beyond its body.
struct Meta {
    /// RabbitMQ-verified `user_id`, or the signed identity of a retry.
    user: Option<String>,
    reply_to: Option<String>,
    attempt: usize,
    batch_done: Vec<Reply>,
}

async fn handle(shared: Arc<Shared>, broker: Arc<BrokerSpec>, ch: Channel, delivery: Delivery) {
    let event_id = uuid::Uuid::now_v7().to_string();
    let span = tracing::info_span!("request", event_id = %event_id, broker = %broker.name);
    async move {
        let started = Instant::now();
        let print = fingerprint(&delivery);
        let strikes = shared.strikes.begin(print);
        let outcome = if delivery.redelivered && strikes > MAX_STRIKES {
            // Publishing this request's outcome never completed, twice: the
            // connection closed under it (RabbitMQ rejected something in it).
            // Repeating it would stop the node again; park a bare copy.
            quarantine(&shared, &broker, &ch, &delivery, &event_id).await
        } else {
            // A bug must not strand a delivery unacknowledged (it would hold
            // a prefetch slot forever): a panic becomes an INTERNAL answer.
            let action = AssertUnwindSafe(decide(&shared, &broker, &delivery, &event_id, started))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    tracing::error!("request handling panicked");
                    let f = Failure::new(ErrorCode::Internal, "internal error while handling the request");
                    answer(Reply::error(event_id.clone(), &f), Some(f), None)
                });
            finish(&shared, &broker, &ch, &delivery, &event_id, action).await
        };
        match outcome {
            Ok(()) => match delivery.ack(BasicAckOptions::default()).await {
                Ok(()) => shared.strikes.clear(print),
                Err(e) => tracing::warn!(error = %e, "ack failed; RabbitMQ will redeliver"),
            },
            Err(e) => {
                // Pause first: an immediate requeue of a message whose
                // outcome cannot be published would spin.
                tracing::warn!(error = %e, "could not publish the outcome; returning the request to the queue");
                tokio::time::sleep(REQUEUE_PAUSE).await;
                let _ = delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
            }
        }
    }
    .instrument(span)
    .await
}

/// Attempts per request whose outcome was not published and acknowledged:
/// counted before publishing, cleared after the ack, so an attempt cut off
/// by a closed connection still counts.
#[derive(Default)]
pub struct Strikes {
    counts: std::sync::Mutex<HashMap<[u8; 32], u8>>,
}

impl Strikes {
    /// Counts this attempt; returns how many attempts (this one included)
    /// have not completed.
    fn begin(&self, print: [u8; 32]) -> u8 {
        let mut counts = self.counts.lock().unwrap();
        if counts.len() > 10_000 {
            counts.clear(); // memory bound; worst case a poison loop resumes
        }
        let n = counts.entry(print).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    fn clear(&self, print: [u8; 32]) {
        self.counts.lock().unwrap().remove(&print);
    }
}

/// Identifies a request across redeliveries.
fn fingerprint(d: &Delivery) -> [u8; 32] {
    let p = &d.properties;
    let mut h = Sha256::new();
    h.update(&d.data);
    for part in [p.reply_to(), p.correlation_id(), p.message_id()] {
        h.update([0]);
        h.update(part.as_ref().map(|s| s.as_str()).unwrap_or("").as_bytes());
    }
    h.finalize().into()
}

/// Parks a bare copy of a request whose outcome could not be published:
/// the body, the reply address as a header, and why; nothing else of the
/// original (whatever RabbitMQ rejected is not repeated). No reply is sent.
async fn quarantine(
    shared: &Shared,
    broker: &BrokerSpec,
    ch: &Channel,
    delivery: &Delivery,
    event_id: &str,
) -> Result<(), PublishError> {
    let msg = "publishing this request's outcome failed repeatedly (the connection was closed under it); parked without executing again or replying";
    tracing::error!(error = msg, "request quarantined in the dead-letter queue");
    let mut headers = FieldTable::default();
    headers.insert(ERROR_CODE_HEADER.into(), text(ErrorCode::Internal.as_str()));
    headers.insert(ERROR_MESSAGE_HEADER.into(), text(msg));
    headers.insert(EVENT_ID_HEADER.into(), text(event_id));
    let reply_to = delivery
        .properties
        .reply_to()
        .as_ref()
        .map(|r| r.to_string());
    headers.insert(
        "x-beds-reply-to".into(),
        text(&reply_to.unwrap_or_default()),
    );
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    let dlq = shared.names.dlq(&broker.name);
    publish_confirmed(ch, "", &dlq, &delivery.data, props, true).await
}

async fn decide(
    shared: &Arc<Shared>,
    broker: &BrokerSpec,
    delivery: &Delivery,
    event_id: &str,
    started: Instant,
) -> Action {
    let props = &delivery.properties;
    let body = delivery.data.as_slice();
    let meta = read_meta(shared, props, body);
    let fail = |f: Failure| answer_failure(&meta, event_id, f);

    let deadline = match payload::check_envelope(props, body.len(), shared.max_payload) {
        Ok(d) => d,
        Err(e) => return fail(Failure::from(&e)),
    };
    let req = match payload::parse(body, shared.max_batch) {
        Ok(r) => r,
        Err(e) => return fail(Failure::from(&e)),
    };
    tracing::debug!(
        parent_event_id = req.parent_event_id(),
        context = req.context(),
        "request"
    );

    // A write with a message_id is executed once per dedup window.
    let mut guard = None;
    if let Some(mid) = props.message_id().as_ref() {
        if is_write(&shared.registry, &req) {
            // The body is part of the key: another request that happens to
            // reuse an id is not mistaken for a duplicate.
            let key = format!(
                "{}\u{0}{}\u{0}{}",
                meta.user.as_deref().unwrap_or(""),
                mid,
                hex::encode(Sha256::digest(body))
            );
            loop {
                match shared.dedup.claim(key.clone()) {
                    Claim::Fresh(g) => {
                        guard = Some(g);
                        break;
                    }
                    Claim::Cached(reply) => {
                        tracing::info!(message_id = %mid, "duplicate write answered from its first execution");
                        return Action::Answer {
                            park: reply.park_again.clone(),
                            parked_entries: reply.parked_entries.clone(),
                            reply,
                        };
                    }
                    Claim::Busy(mut rx) => {
                        let _ = tokio::time::timeout(Duration::from_secs(30), rx.changed()).await;
                    }
                }
            }
        }
    }

    // Judged after dedup (a finished duplicate is answered even when late)
    // and after any wait for a concurrent duplicate. Not remembered: a
    // client may resend the same request with a new deadline.
    if let Err(e) = payload::check_deadline(deadline) {
        drop(guard);
        return fail(Failure::from(&e));
    }

    let action = match req {
        Request::Single(p) => match execute(shared, broker, meta.user.as_deref(), &p).await {
            Ok(out) => {
                tracing::debug!(template = %p.template, op = %p.op, "ok");
                answer(
                    Reply::ok(event_id.to_string(), out, micros(started)),
                    None,
                    None,
                )
            }
            Err(f) if f.retryable => retry_or_give_up(shared, &meta, event_id, f),
            Err(f) => fail(f),
        },
        Request::Batch {
            entries, atomic, ..
        } => {
            if atomic {
                atomic_batch(shared, broker, &meta, event_id, started, entries).await
            } else {
                batch(shared, broker, &meta, event_id, started, entries, deadline).await
            }
        }
    };
    // Remember the answer for duplicates, and how it was parked, so a
    // duplicate is answered and parked the same way, never run again. Not
    // when it was parked after its retries ran out: a replay runs again.
    if let (
        Some(g),
        Action::Answer {
            reply,
            park,
            parked_entries,
        },
    ) = (guard, &action)
    {
        match park {
            None => g.complete(reply.clone()),
            Some(f) if f.retryable => {}
            Some(f) => g.complete(Arc::new(Encoded {
                park_again: Some(f.clone()),
                parked_entries: parked_entries.clone(),
                ..(**reply).clone()
            })),
        }
    }
    action
}

/// Resolves, checks and executes one payload.
async fn execute(
    shared: &Shared,
    broker: &BrokerSpec,
    user: Option<&str>,
    p: &BrokerPayload,
) -> Result<Outcome, Failure> {
    let (template_db, op, params) = resolve(shared, broker, user, p)?;
    let adapter = shared.adapters.get(template_db).ok_or_else(|| {
        Failure::new(
            ErrorCode::Internal,
            format!("no adapter for database {template_db}"),
        )
    })?;
    adapter
        .call(op, &params)
        .await
        .map_err(|e| Failure::from(&e))
}

/// Template → op → broker check → access check → typed params.
fn resolve<'r>(
    shared: &'r Shared,
    broker: &BrokerSpec,
    user: Option<&str>,
    p: &BrokerPayload,
) -> Result<(&'r str, &'r Op, Vec<Param>), Failure> {
    let f = |e: RequestError| Failure::from(&e);
    let t = shared.registry.get(&p.template).map_err(f)?;
    let op = t.op(&p.op).map_err(f)?;
    if !broker.serves.contains(&op.access) {
        return Err(f(RequestError::WrongBroker {
            qualified: op.qualified.clone(),
            access: op.access.as_str(),
            broker: broker.name.clone(),
            serves: broker
                .serves
                .iter()
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }));
    }
    t.check_allowed(user).map_err(f)?;
    let params =
        values::validate(op, p.data.as_ref()).map_err(|m| f(RequestError::Validation(m)))?;
    Ok((t.database.as_str(), op, params))
}

fn is_write(registry: &Registry, req: &Request) -> bool {
    let write = |p: &BrokerPayload| {
        registry
            .get(&p.template)
            .ok()
            .and_then(|t| t.op(&p.op).ok())
            .is_some_and(|op| op.access == Access::Write)
    };
    match req {
        Request::Single(p) => write(p),
        Request::Batch { entries, .. } => entries.iter().flatten().any(write),
    }
}

async fn batch(
    shared: &Shared,
    broker: &BrokerSpec,
    meta: &Meta,
    event_id: &str,
    started: Instant,
    entries: Vec<Result<BrokerPayload, payload::PayloadError>>,
    deadline: Option<i64>,
) -> Action {
    // Entries finished on an earlier attempt are not run again.
    let mut results: Vec<Reply> = meta.batch_done.clone();
    results.truncate(entries.len());
    // Entries whose outcome is unknown (or that ran out of tiers) are kept
    // by the parked copy, for a person or a replay.
    let mut must_park: Vec<usize> = Vec::new();
    let mut first_park: Option<Failure> = None;
    for (i, entry) in entries.iter().enumerate().skip(results.len()) {
        let entry_id = format!("{event_id}.{i}");
        let t0 = Instant::now();
        let r = match (entry, payload::check_deadline(deadline)) {
            (_, Err(late)) => Err(Failure::from(&late)),
            (Err(e), _) => Err(Failure::from(e)),
            (Ok(p), _) => execute(shared, broker, meta.user.as_deref(), p).await,
        };
        match r {
            Ok(out) => results.push(Reply::ok(entry_id, out, micros(t0))),
            Err(f) if f.retryable => {
                let done = serde_json::to_string(&results).unwrap_or_default();
                // A batch already holding an unknown outcome goes to a person
                // now rather than through the tiers.
                if meta.attempt < shared.retry_tiers
                    && done.len() <= MAX_BATCH_DONE_BYTES
                    && first_park.is_none()
                {
                    return Action::Retry {
                        tier: meta.attempt + 1,
                        failure: f,
                        batch_done: Some(done),
                    };
                }
                // Out of tiers: this and every later entry is answered
                // unavailable, and they are what the parked copy keeps.
                let f = gave_up(meta, f);
                for j in i..entries.len() {
                    results.push(Reply::error(format!("{event_id}.{j}"), &f));
                }
                must_park.extend(i..entries.len());
                // An unknown outcome outranks running out of tiers: it is
                // what a person must look at, and what dedup must remember.
                let reason = first_park.unwrap_or(f);
                return park_batch(meta, event_id, started, results, reason, must_park);
            }
            Err(f) => {
                if f.park {
                    must_park.push(i);
                    first_park.get_or_insert_with(|| f.clone());
                }
                results.push(Reply::error(entry_id, &f));
            }
        }
    }
    // Entries whose outcome is unknown go to a person.
    if let Some(f) = first_park {
        return park_batch(meta, event_id, started, results, f, must_park);
    }
    // Without a reply_to nobody would see a failed entry: park them.
    let first_failed = results.iter().find_map(|r| r.error.clone());
    match (&meta.reply_to, first_failed) {
        (None, Some(e)) => {
            let code = ErrorCode::parse(&e.code).unwrap_or(ErrorCode::Internal);
            park_batch(
                meta,
                event_id,
                started,
                results,
                Failure::new(code, e.message),
                Vec::new(),
            )
        }
        _ => answer(batch_reply(event_id, started, results), None, None),
    }
}

/// Answers a batch and parks the entries in `keep` (plus, when nobody gets
/// the answer, every failed entry) for a person or a replay.
fn park_batch(
    meta: &Meta,
    event_id: &str,
    started: Instant,
    results: Vec<Reply>,
    reason: Failure,
    mut keep: Vec<usize>,
) -> Action {
    if meta.reply_to.is_none() {
        keep.extend((0..results.len()).filter(|&k| !results[k].is_ok()));
    }
    keep.sort_unstable();
    keep.dedup();
    answer(
        batch_reply(event_id, started, results),
        Some(reason),
        Some(keep),
    )
}

async fn atomic_batch(
    shared: &Shared,
    broker: &BrokerSpec,
    meta: &Meta,
    event_id: &str,
    started: Instant,
    entries: Vec<Result<BrokerPayload, payload::PayloadError>>,
) -> Action {
    // Everything is resolved and validated before anything runs.
    let mut calls = Vec::with_capacity(entries.len());
    let mut database = None;
    for (i, entry) in entries.iter().enumerate() {
        let resolved = match entry {
            Err(e) => Err(Failure::from(e)),
            Ok(p) => resolve(shared, broker, meta.user.as_deref(), p),
        };
        let (db, op, params) = match resolved {
            Ok(r) => r,
            Err(f) => return atomic_failed(meta, event_id, entries.len(), i, f),
        };
        let store = shared
            .registry
            .get(&entries[i].as_ref().unwrap().template)
            .map(|t| t.store);
        if store.ok() != Some(Store::Mariadb) || database.is_some_and(|d| d != db) {
            let f = Failure::from(&RequestError::AtomicBatch(
                "every entry must use the same MariaDB database".into(),
            ));
            return atomic_failed(meta, event_id, entries.len(), i, f);
        }
        database = Some(db);
        calls.push((op, params));
    }
    let Some(adapter) = database.and_then(|d| shared.adapters.get(d)) else {
        let f = Failure::new(ErrorCode::Internal, "no adapter for the batch's database");
        return atomic_failed(meta, event_id, entries.len(), 0, f);
    };
    let refs: Vec<(&Op, &[Param])> = calls.iter().map(|(op, p)| (*op, p.as_slice())).collect();
    match adapter.call_atomic(&refs).await {
        Ok(outs) => {
            let results = outs
                .into_iter()
                .enumerate()
                .map(|(i, o)| Reply::ok(format!("{event_id}.{i}"), o, 0))
                .collect();
            answer(batch_reply(event_id, started, results), None, None)
        }
        Err((i, e)) => {
            let f = Failure::from(&e);
            if f.retryable && meta.attempt < shared.retry_tiers {
                return retry_or_give_up(shared, meta, event_id, f);
            }
            let f = if f.retryable { gave_up(meta, f) } else { f };
            atomic_failed(meta, event_id, entries.len(), i, f)
        }
    }
}

/// All-or-nothing failure: entry `i` failed, so none was applied.
fn atomic_failed(meta: &Meta, event_id: &str, n: usize, i: usize, f: Failure) -> Action {
    let results: Vec<Reply> = (0..n)
        .map(|j| {
            let id = format!("{event_id}.{j}");
            if j == i {
                Reply::error(id, &f)
            } else {
                let mut other = f.clone();
                other.message = if f.park && !f.retryable {
                    "outcome unknown: the atomic batch's COMMIT did not complete".into()
                } else {
                    format!("not applied: atomic batch entry {i} failed")
                };
                Reply::error(id, &other)
            }
        })
        .collect();
    let mut top = f.clone();
    top.message = clip(
        format!("atomic batch entry {i}: {}", f.message),
        MAX_MESSAGE_BYTES,
    );
    let mut reply = Reply::error(event_id.to_string(), &top);
    reply.results = Some(results);
    let park = (meta.reply_to.is_none() || f.park).then_some(top);
    answer(reply, park, None)
}

fn batch_reply(event_id: &str, started: Instant, results: Vec<Reply>) -> Reply {
    let affected = results.iter().filter_map(|r| r.affected).sum();
    let mut r = Reply::ok(
        event_id.to_string(),
        Outcome {
            rows: Vec::new(),
            affected,
        },
        micros(started),
    );
    r.results = Some(results);
    r
}

fn retry_or_give_up(shared: &Shared, meta: &Meta, event_id: &str, f: Failure) -> Action {
    if meta.attempt < shared.retry_tiers {
        tracing::info!(attempt = meta.attempt + 1, error = %f.message, "retryable failure: to retry tier");
        return Action::Retry {
            tier: meta.attempt + 1,
            failure: f,
            batch_done: None,
        };
    }
    let f = gave_up(meta, f);
    let reply = Reply::error(event_id.to_string(), &f);
    answer(reply, Some(f), None)
}

fn gave_up(meta: &Meta, f: Failure) -> Failure {
    Failure {
        code: ErrorCode::Unavailable,
        message: clip(
            format!(
                "{} (gave up after {} attempt(s); the request is parked in the dead-letter queue)",
                f.message,
                meta.attempt + 1
            ),
            MAX_MESSAGE_BYTES,
        ),
        retryable: true,
        park: true,
    }
}

/// A final failure: answered, and parked when nobody would see the answer.
fn answer_failure(meta: &Meta, event_id: &str, f: Failure) -> Action {
    tracing::debug!(code = %f.code, error = %f.message, "request failed");
    let reply = Reply::error(event_id.to_string(), &f);
    let park = (meta.reply_to.is_none() || f.park).then_some(f);
    answer(reply, park, None)
}

fn answer(reply: Reply, park: Option<Failure>, parked_entries: Option<Vec<usize>>) -> Action {
    let body = serde_json::to_vec(&reply).unwrap_or_else(|e| {
        format!(r#"{{"status":"error","event_id":"{}","error":{{"code":"INTERNAL","message":"reply not serializable: {e}","retryable":false}}}}"#, reply.event_id).into_bytes()
    });
    Action::Answer {
        reply: Arc::new(Encoded {
            event_id: reply.event_id,
            body,
            park_again: None,
            parked_entries: None,
        }),
        park,
        parked_entries,
    }
}

/// Publishes what the action requires, each with a publisher confirm.
async fn finish(
    shared: &Shared,
    broker: &BrokerSpec,
    ch: &Channel,
    delivery: &Delivery,
    event_id: &str,
    action: Action,
) -> Result<(), PublishError> {
    let props = &delivery.properties;
    match action {
        Action::Retry {
            tier,
            failure,
            batch_done,
        } => {
            let mut extra = vec![
                (ATTEMPT_HEADER, AMQPValue::LongLongInt(tier as i64)),
                (ERROR_CODE_HEADER, text(failure.code.as_str())),
                (ERROR_MESSAGE_HEADER, text(&failure.message)),
            ];
            if let Some(done) = &batch_done {
                extra.push((BATCH_DONE_HEADER, text(done)));
            }
            let p = republish_props(shared, props, &delivery.data, &delivery.data, extra);
            let queue = shared.names.retry(&broker.name, tier);
            publish_confirmed(ch, "", &queue, &delivery.data, p, true).await
        }
        Action::Answer {
            reply,
            park,
            parked_entries,
        } => {
            if let Some(f) = park {
                tracing::warn!(code = %f.code, error = %f.message, "request parked in the dead-letter queue");
                // A replayed copy gets the full retry tiers again.
                let mut extra = vec![
                    (ATTEMPT_HEADER, AMQPValue::LongLongInt(0)),
                    (ERROR_CODE_HEADER, text(f.code.as_str())),
                    (ERROR_MESSAGE_HEADER, text(&f.message)),
                    (EVENT_ID_HEADER, text(event_id)),
                ];
                let mut body = std::borrow::Cow::Borrowed(delivery.data.as_slice());
                if let Some(keep) = &parked_entries {
                    body = std::borrow::Cow::Owned(batch_subset(&delivery.data, keep));
                    let list = keep
                        .iter()
                        .map(|k| k.to_string())
                        .collect::<Vec<_>>()
                        .join(",");
                    extra.push((BATCH_ENTRIES_HEADER, text(&list)));
                }
                let p = republish_props(shared, props, &delivery.data, &body, extra);
                let dlq = shared.names.dlq(&broker.name);
                publish_confirmed(ch, "", &dlq, &body, p, true).await?;
            }
            if let Some(reply_to) = props.reply_to().as_ref() {
                let mut headers = FieldTable::default();
                headers.insert(EVENT_ID_HEADER.into(), text(&reply.event_id));
                let mut p = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_headers(headers);
                if let Some(cid) = props.correlation_id() {
                    p = p.with_correlation_id(cid.clone());
                }
                // Not mandatory: a client that went away has no queue left,
                // and that must not hold the request.
                publish_confirmed(ch, "", reply_to.as_str(), &reply.body, p, false).await?;
            }
            Ok(())
        }
    }
}

/// Properties for a retried or parked copy: everything of the original but
/// `user_id` (moved to a signed header) and `expiration` (the retry tier's
/// TTL governs; the client's deadline header still applies).
fn republish_props(
    shared: &Shared,
    props: &AMQPProperties,
    original: &[u8],
    body: &[u8],
    extra: Vec<(&str, AMQPValue)>,
) -> BasicProperties {
    let mut headers = match props.headers() {
        // Progress belongs to one attempt: a copy carries only what `extra`
        // says.
        Some(h) if table_size(h) <= MAX_COPIED_HEADERS_BYTES => {
            let mut kept = FieldTable::default();
            for (k, v) in h.inner() {
                let ours = [
                    BATCH_DONE_HEADER,
                    BATCH_ENTRIES_HEADER,
                    USER_HEADER,
                    USER_SIG_HEADER,
                ];
                if !ours.contains(&k.as_str()) {
                    kept.insert(k.clone(), v.clone());
                }
            }
            kept
        }
        Some(h) => {
            // Ours must fit in the same frame: keep only the deadline.
            tracing::warn!(
                "client headers too large to copy onto the retried/parked message; dropped"
            );
            let mut kept = FieldTable::default();
            if let Some(d) = h.inner().get(payload::DEADLINE_HEADER) {
                kept.insert(payload::DEADLINE_HEADER.into(), d.clone());
            }
            kept
        }
        None => FieldTable::default(),
    };
    for (k, v) in extra {
        headers.insert(k.into(), v);
    }
    let user = props
        .user_id()
        .as_ref()
        .map(|u| u.to_string())
        .or_else(|| signed_user(shared, props, original));
    if let Some(user) = user {
        headers.insert(USER_HEADER.into(), text(&user));
        headers.insert(
            USER_SIG_HEADER.into(),
            text(&sign(&shared.retry_key, &user, body)),
        );
    }
    let mut p = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2);
    if let Some(v) = props.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = props.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = props.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = props.reply_to() {
        p = p.with_reply_to(v.clone());
    }
    if let Some(v) = props.message_id() {
        p = p.with_message_id(v.clone());
    }
    if let Some(v) = props.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = props.app_id() {
        p = p.with_app_id(v.clone());
    }
    if let Some(v) = props.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = props.priority() {
        p = p.with_priority(*v);
    }
    p
}

/// The batch body restricted to the entries `keep` (original indices), for
/// a parked copy; the original body if it cannot be rebuilt.
fn batch_subset(body: &[u8], keep: &[usize]) -> Vec<u8> {
    let Ok(serde_json::Value::Object(mut obj)) = serde_json::from_slice(body) else {
        return body.to_vec();
    };
    let Some(serde_json::Value::Array(entries)) = obj.remove("batch") else {
        return body.to_vec();
    };
    let kept: Vec<_> = entries
        .into_iter()
        .enumerate()
        .filter(|(i, _)| keep.contains(i))
        .map(|(_, e)| e)
        .collect();
    obj.insert("batch".into(), serde_json::Value::Array(kept));
    serde_json::to_vec(&obj).unwrap_or_else(|_| body.to_vec())
}

/// Encoded size of a header table, roughly (AMQP field-table encoding).
fn table_size(t: &FieldTable) -> usize {
    4 + t
        .inner()
        .iter()
        .map(|(k, v)| 1 + k.as_str().len() + value_size(v))
        .sum::<usize>()
}

fn value_size(v: &AMQPValue) -> usize {
    1 + match v {
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::FieldTable(t) => table_size(t),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(value_size).sum::<usize>(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        _ => 8,
    }
}

fn read_meta(shared: &Shared, props: &AMQPProperties, body: &[u8]) -> Meta {
    let user = match props.user_id() {
        Some(u) => Some(u.to_string()),
        None => signed_user(shared, props, body),
    };
    let attempt = payload::header(props, ATTEMPT_HEADER)
        .and_then(payload::amqp_int)
        .map(|a| a.clamp(0, 64) as usize)
        .unwrap_or(0);
    let batch_done = match payload::header(props, BATCH_DONE_HEADER) {
        Some(AMQPValue::LongString(s)) => serde_json::from_slice(s.as_bytes()).unwrap_or_default(),
        _ => Vec::new(),
    };
    Meta {
        user,
        reply_to: props.reply_to().as_ref().map(|r| r.to_string()),
        attempt,
        batch_done,
    }
}

/// The identity a retried message carries, if its signature is ours.
fn signed_user(shared: &Shared, props: &AMQPProperties, body: &[u8]) -> Option<String> {
    let user = match payload::header(props, USER_HEADER)? {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok()?,
        _ => return None,
    };
    let sig = match payload::header(props, USER_SIG_HEADER)? {
        AMQPValue::LongString(s) => hex::decode(s.as_bytes()).ok()?,
        _ => return None,
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(&shared.retry_key).ok()?;
    mac.update(user.as_bytes());
    mac.update(&[0]);
    mac.update(body);
    match mac.verify_slice(&sig) {
        Ok(()) => Some(user),
        Err(_) => {
            tracing::warn!("ignoring a caller identity header with a bad signature");
            None
        }
    }
}

fn sign(key: &[u8], user: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(user.as_bytes());
    mac.update(&[0]);
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.to_string()))
}

fn micros(since: Instant) -> u64 {
    since.elapsed().as_micros().min(u64::MAX as u128) as u64
}
