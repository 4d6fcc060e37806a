//! Deciding what one delivery needs: envelope and payload checks, dedup,
//! template resolution, execution through NamasteCore (singles and
//! batches), and the retry-or-park decision. Nothing here publishes; the
//! result is an `Action` that `outcome::finish` carries out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::protocol::basic::AMQPProperties;
use lapin::types::AMQPValue;

pub(crate) use super::action::Action;
use super::dedup::{Claim, DedupGuard};
use super::headers::{signed_user, ATTEMPT_HEADER, BATCH_DONE_HEADER};
use super::inbox;
use super::payload::{self, BrokerPayload, Request};
use super::reply::{Encoded, Outline, Reply};
use super::shared::{BrokerSpec, Shared};
use crate::config::Access;
use crate::error::{clip, ErrorCode, Failure, MAX_MESSAGE_BYTES};
use crate::namaste::{Adapter, AdapterError, InboxKey, Once, Outcome, Session};
use crate::registry::{values, Op, Param, Registry, RequestError};

/// Largest batch-progress header carried through a retry; beyond it the
/// batch is answered at once instead (headers must fit one AMQP frame).
pub(crate) const MAX_BATCH_DONE_BYTES: usize = 32 * 1024;

/// What the dispatcher knows about a delivery beyond its body.
pub(crate) struct Meta {
    /// RabbitMQ-verified `user_id`, or the signed identity of a retry.
    user: Option<String>,
    reply_to: Option<String>,
    attempt: usize,
    batch_done: Vec<Reply>,
}

/// What the event log needs to know of a delivery beyond its answer,
/// filled in by [`decide`] as it learns it.
#[derive(Debug, Default)]
pub(crate) struct Trail {
    pub template: Option<String>,
    pub op: Option<String>,
    pub context: Option<String>,
    pub parent: Option<String>,
    /// The verified or signed caller.
    pub user: Option<String>,
    /// 1 for the first delivery, higher after retry tiers.
    pub attempt: u32,
    /// A batch's entries: (template, op) each (none for one that did not
    /// parse).
    pub entries: Vec<(Option<String>, Option<String>)>,
}

/// Decides what one delivery needs: envelope and body checks, the dedup
/// claim of a write, the deadline, then [`run`], and what dedup remembers.
/// `trail` collects what the event log will say about it.
pub(crate) async fn decide(
    shared: &Arc<Shared>,
    broker: &BrokerSpec,
    props: &AMQPProperties,
    body: &[u8],
    event_id: &str,
    started: Instant,
    trail: &mut Trail,
) -> Action {
    let meta = read_meta(shared, props, body);
    trail.user.clone_from(&meta.user);
    trail.attempt = meta.attempt as u32 + 1;
    let fail = |f: Failure| answer_failure(&meta, event_id, f);

    let deadline = match payload::check_envelope(props, body.len(), shared.limits.max_payload) {
        Ok(d) => d,
        Err(e) => return fail(Failure::from(&e)),
    };
    let req = match payload::parse(body, shared.limits.max_batch) {
        Ok(r) => r,
        Err(e) => return fail(Failure::from(&e)),
    };
    trail.parent = req.parent_event_id().map(str::to_string);
    trail.context = Some(req.context().to_string());
    match &req {
        Request::Single(p) => {
            trail.template = Some(p.template.clone());
            trail.op = Some(p.op.clone());
        }
        Request::Batch { entries, .. } => {
            trail.entries = entries
                .iter()
                .map(|e| match e {
                    Ok(p) => (Some(p.template.clone()), Some(p.op.clone())),
                    Err(_) => (None, None),
                })
                .collect();
        }
    }
    // One template set for the whole request: a reload swaps the set, and
    // a request in flight finishes on the one it started with.
    let registry = shared.registry.load_full();
    let guard = match claim_once(shared, &registry, props, body, &meta, &req).await {
        Ok(g) => g,
        Err(cached) => return cached,
    };
    // Judged after dedup (a finished duplicate is answered even when late)
    // and after any wait for a concurrent duplicate. Not remembered: a
    // client may resend the same request with a new deadline.
    if let Err(e) = payload::check_deadline(deadline) {
        let f = Failure::from(&e);
        return match &req {
            // Entries that ran on an earlier attempt are reported as they
            // ran, not as "never executed".
            Request::Batch { entries, .. } if !meta.batch_done.is_empty() => {
                let mut results = meta.batch_done.clone();
                results.truncate(entries.len());
                for j in results.len()..entries.len() {
                    results.push(Reply::error(format!("{event_id}.{j}"), &f));
                }
                match meta.reply_to {
                    Some(_) => answer(batch_reply(event_id, started, results), None, None),
                    None => park_batch(&meta, event_id, started, results, f, Vec::new()),
                }
            }
            _ => fail(f),
        };
    }
    let job = Job {
        shared,
        registry: &registry,
        broker,
        meta: &meta,
        event_id,
        started,
        deadline,
        inbox: guard.as_ref().map(|(_, k)| k),
    };
    let action = run(job, req).await;
    if let Some((g, _)) = guard {
        if let Some(kept) = inbox::kept(&action) {
            g.complete(kept);
        }
    }
    action
}

/// A write with a `message_id` runs once: `Ok(Some)` when this delivery is
/// the one to run it (with its inbox key), `Err` with the first execution's
/// answer for a duplicate this process remembers (waiting for a concurrent
/// one to finish first). The durable inbox behind it catches the repeats
/// this process does not know (another node's, or before a restart).
async fn claim_once(
    shared: &Shared,
    registry: &Registry,
    props: &AMQPProperties,
    body: &[u8],
    meta: &Meta,
    req: &Request,
) -> Result<Option<(DedupGuard, InboxKey)>, Action> {
    let Some(mid) = props.message_id().as_ref() else {
        return Ok(None);
    };
    if !is_write(registry, req) {
        return Ok(None);
    }
    let (key, inbox_key) = inbox::keys(meta.user.as_deref(), mid.as_str(), body);
    loop {
        match shared.dedup.claim(key.clone()) {
            Claim::Fresh(g) => return Ok(Some((g, inbox_key))),
            Claim::Cached(reply) => {
                shared.metrics.repeat("memory");
                tracing::info!(message_id = %mid, "duplicate write answered from its first execution");
                return Err(repeat(reply));
            }
            Claim::Busy(mut rx) => {
                let _ = tokio::time::timeout(Duration::from_secs(30), rx.changed()).await;
            }
        }
    }
}

/// A repeat's answer: the first execution's reply, parked as it was.
fn repeat(reply: Arc<Encoded>) -> Action {
    Action::Answer {
        park: reply.park_again.clone(),
        parked_entries: reply.parked_entries.clone(),
        reply,
    }
}

/// A repeat answered from the durable inbox.
fn repeat_stored(record: &str, event_id: &str) -> Action {
    match inbox::answer_from(record) {
        Ok(reply) => {
            tracing::info!("duplicate write answered from the durable inbox");
            repeat(reply)
        }
        Err(e) => {
            let f = Failure {
                park: true,
                ..Failure::new(ErrorCode::Internal, e)
            };
            answer(Reply::error(event_id.to_string(), &f), Some(f), None)
        }
    }
}

/// One delivery being decided: what every step of [`run`] needs.
#[derive(Clone, Copy)]
pub(crate) struct Job<'a> {
    pub shared: &'a Shared,
    /// The template set this request started with.
    pub registry: &'a Registry,
    pub broker: &'a BrokerSpec,
    pub meta: &'a Meta,
    /// This execution's event id (replies and logs carry it).
    pub event_id: &'a str,
    /// When the delivery arrived, for `elapsed_us`.
    pub started: Instant,
    /// The client's `x-beds-deadline`, for held copies' TTL.
    pub deadline: Option<i64>,
    /// Set for a write with a `message_id`: run it once, durably.
    pub inbox: Option<&'a InboxKey>,
}

/// Runs a parsed request: a single op, a batch, or a hold when its
/// database is down.
async fn run(job: Job<'_>, req: Request) -> Action {
    let Job {
        shared,
        registry,
        meta,
        deadline,
        ..
    } = job;
    let hold = |database: &str, batch_done: Option<String>| Action::Hold {
        database: database.to_string(),
        batch_done,
        expires_in_ms: hold_ttl(deadline),
    };
    // A batch waits whole when a database an unfinished entry needs is down.
    let batch_down = match &req {
        Request::Batch { entries, .. } => first_down(registry, shared, unfinished(meta, entries)),
        Request::Single(_) => None,
    };
    match req {
        Request::Single(p) => single(job, &p).await,
        Request::Batch { .. } if batch_down.is_some() => {
            let db = batch_down.unwrap_or_default();
            let done = (!meta.batch_done.is_empty())
                .then(|| serde_json::to_string(&meta.batch_done).unwrap_or_default());
            hold(&db, done)
        }
        Request::Batch {
            entries,
            atomic: true,
            ..
        } => atomic_batch(job, entries).await,
        Request::Batch { entries, .. } => batch(job, entries).await,
    }
}

/// One op: held while its database is down; with an inbox key, run once
/// through the durable inbox.
async fn single(job: Job<'_>, p: &BrokerPayload) -> Action {
    let Job {
        shared,
        registry,
        broker,
        meta,
        event_id,
        started,
        deadline,
        inbox,
    } = job;
    let hold = |database: &str| Action::Hold {
        database: database.to_string(),
        batch_done: None,
        expires_in_ms: hold_ttl(deadline),
    };
    let (db, op, params) = match resolve(registry, broker, meta.user.as_deref(), p) {
        Ok(r) => r,
        Err(f) => return answer_failure(meta, event_id, f),
    };
    let adapter = match adapter(shared, db) {
        Ok(a) => a,
        Err(f) => return answer_failure(meta, event_id, f),
    };
    if !adapter.health().is_up() {
        return hold(db);
    }
    // What a result means for this request.
    let decide_on = |r: Ran<'_>| match r {
        Ok(outs) => answer(
            Reply::ok(event_id.to_string(), outs[0].clone(), micros(started)),
            None,
            None,
        ),
        Err((_, e)) => {
            let f = Failure::from(e);
            if f.retryable && !adapter.health().is_up() {
                hold(db)
            } else if f.retryable {
                retry_or_give_up(shared, meta, event_id, f)
            } else {
                answer_failure(meta, event_id, f)
            }
        }
    };
    match inbox.filter(|_| adapter.inbox()) {
        None => match adapter.call(op, &params).await {
            Ok(out) => decide_on(Ok(std::slice::from_ref(&out))),
            Err(e) => decide_on(Err((0, &e))),
        },
        Some(key) => {
            let calls = [(op, params.as_slice())];
            run_once(shared, adapter, key, &calls, event_id, decide_on).await
        }
    }
}

/// What calls produced, as [`run_once`]'s decisions see it.
type Ran<'a> = Result<&'a [Outcome], (usize, &'a AdapterError)>;

/// Runs `calls` once through the durable inbox: the answer `decide_on`
/// gives their result is recorded and committed with them; a repeat is
/// answered from its record; a failure of the inbox itself is decided like
/// a failure of the first call (nothing was committed).
async fn run_once(
    shared: &Shared,
    adapter: &Arc<dyn Adapter>,
    key: &InboxKey,
    calls: &[(&Op, &[Param])],
    event_id: &str,
    decide_on: impl Fn(Ran<'_>) -> Action + Send + Sync,
) -> Action {
    let mut decided = None;
    let ran = adapter
        .call_once(key, calls, &mut |r| {
            let a = decide_on(r.as_ref().map(Vec::as_slice).map_err(|(i, e)| (*i, e)));
            let stored = inbox::record(&a);
            decided = Some(a);
            stored
        })
        .await;
    match (ran, decided) {
        (Ok(Once::Ran(_)), Some(a)) => a,
        (Ok(Once::Repeat(record)), _) => {
            shared.metrics.repeat("inbox");
            repeat_stored(&record, event_id)
        }
        // Nothing was committed: the request must be able to run again (a
        // final answer here could differ from what another node gives it).
        (Err(e), _) => {
            let e = match e {
                e @ (AdapterError::Unreachable(_)
                | AdapterError::Transient(_)
                | AdapterError::Indeterminate(_)) => e,
                other => AdapterError::Transient(format!("durable inbox: {other}")),
            };
            decide_on(Err((0, &e)))
        }
        (Ok(Once::Ran(_)), None) => {
            let e = AdapterError::Internal("the inbox ran no decision".into());
            decide_on(Err((0, &e)))
        }
    }
}

/// The per-message TTL of a held copy: the time left to its deadline, at
/// least 1 ms and at most what RabbitMQ accepts (2^32 - 1 ms; beyond that it
/// would refuse the publish and close the channel).
fn hold_ttl(deadline: Option<i64>) -> Option<i64> {
    let left = deadline?.saturating_sub(chrono::Utc::now().timestamp_millis());
    Some(left.clamp(1, u32::MAX as i64))
}

/// The entries a batch still has to run (those before are done on an
/// earlier attempt).
fn unfinished<'e>(
    meta: &Meta,
    entries: &'e [Result<BrokerPayload, payload::PayloadError>],
) -> &'e [Result<BrokerPayload, payload::PayloadError>] {
    &entries[meta.batch_done.len().min(entries.len())..]
}

/// The database of the first entry whose database is down.
fn first_down(
    registry: &Registry,
    shared: &Shared,
    entries: &[Result<BrokerPayload, payload::PayloadError>],
) -> Option<String> {
    entries.iter().flatten().find_map(|p| {
        let db = &registry.get(&p.template).ok()?.database;
        let up = shared.adapters.get(db)?.health().is_up();
        (!up).then(|| db.clone())
    })
}

fn adapter<'s>(shared: &'s Shared, db: &str) -> Result<&'s Arc<dyn Adapter>, Failure> {
    shared
        .adapters
        .get(db)
        .ok_or_else(|| Failure::new(ErrorCode::Internal, format!("no adapter for database {db}")))
}

/// One op for a batch entry, on the batch's session for its database.
/// One session at a time: an entry on another database ends the current one
/// first, so a batch never holds one pool's connection while it waits for
/// another's.
async fn execute_in<'s>(
    shared: &'s Shared,
    registry: &'s Registry,
    broker: &BrokerSpec,
    user: Option<&str>,
    p: &BrokerPayload,
    session: &mut Option<(&'s str, Box<dyn Session + 's>)>,
) -> Result<Outcome, Failure> {
    let (template_db, op, params) = resolve(registry, broker, user, p)?;
    if session.as_ref().is_none_or(|(db, _)| *db != template_db) {
        *session = None;
        *session = Some((template_db, adapter(shared, template_db)?.session()));
    }
    let (_, s) = session
        .as_mut()
        .ok_or_else(|| Failure::new(ErrorCode::Internal, "no database session"))?;
    s.call(op, &params).await.map_err(|e| Failure::from(&e))
}

/// Template → op → broker check → access check → typed params.
pub(crate) fn resolve<'r>(
    registry: &'r Registry,
    broker: &BrokerSpec,
    user: Option<&str>,
    p: &BrokerPayload,
) -> Result<(&'r str, &'r Op, Vec<Param>), Failure> {
    let f = |e: RequestError| Failure::from(&e);
    let elsewhere = || {
        f(RequestError::TemplateElsewhere {
            template: p.template.clone(),
            broker: broker.name.clone(),
            served_by: broker.scope.served_by(&p.template),
        })
    };
    // Another role's template is looked for only once the name is not
    // found: the served path pays no extra lookup.
    let t = match registry.get(&p.template) {
        Ok(t) => t,
        Err(_) if registry.is_elsewhere(&p.template) => return Err(elsewhere()),
        Err(e) => return Err(f(e)),
    };
    if !broker.scope.serves(&p.template) {
        return Err(elsewhere());
    }
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

pub(crate) fn is_write(registry: &Registry, req: &Request) -> bool {
    let write = |p: &BrokerPayload| {
        registry
            .get(&p.template)
            .ok()
            .and_then(|t| t.op(&p.op).ok())
            // Meta ops change things too (CONTRACT §2 dedups every
            // operation that is not a read).
            .is_some_and(|op| op.access != Access::Read)
    };
    match req {
        Request::Single(p) => write(p),
        Request::Batch { entries, .. } => entries.iter().flatten().any(write),
    }
}

pub(crate) async fn batch(
    job: Job<'_>,
    entries: Vec<Result<BrokerPayload, payload::PayloadError>>,
) -> Action {
    let Job {
        shared,
        registry,
        broker,
        meta,
        event_id,
        started,
        deadline,
        ..
    } = job;
    // Entries finished on an earlier attempt are not run again.
    let mut results: Vec<Reply> = meta.batch_done.clone();
    results.truncate(entries.len());
    // Entries whose outcome is unknown (or that ran out of tiers) are kept
    // by the parked copy, for a person or a replay.
    let mut must_park: Vec<usize> = Vec::new();
    let mut first_park: Option<Failure> = None;
    // Entries run on a session: a connection per batch, not per entry.
    let mut session = None;
    for (i, entry) in entries.iter().enumerate().skip(results.len()) {
        let entry_id = format!("{event_id}.{i}");
        let t0 = Instant::now();
        let r = match (entry, payload::check_deadline(deadline)) {
            (_, Err(late)) => Err(Failure::from(&late)),
            (Err(e), _) => Err(Failure::from(e)),
            (Ok(p), _) => {
                execute_in(
                    shared,
                    registry,
                    broker,
                    meta.user.as_deref(),
                    p,
                    &mut session,
                )
                .await
            }
        };
        match r {
            Ok(out) => results.push(Reply::ok(entry_id, out, micros(t0))),
            Err(f) if f.retryable => {
                let done = serde_json::to_string(&results).unwrap_or_default();
                let down = first_down(registry, shared, &entries[i..=i]);
                if let (Some(db), None, true) =
                    (down, &first_park, done.len() <= MAX_BATCH_DONE_BYTES)
                {
                    // Its database went down under it: the rest waits for it.
                    return Action::Hold {
                        database: db,
                        batch_done: Some(done),
                        expires_in_ms: hold_ttl(deadline),
                    };
                }
                // A batch already holding an unknown outcome goes to a person
                // now rather than through the tiers.
                if meta.attempt < shared.limits.retry_tiers
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
pub(crate) fn park_batch(
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

pub(crate) async fn atomic_batch(
    job: Job<'_>,
    entries: Vec<Result<BrokerPayload, payload::PayloadError>>,
) -> Action {
    let Job {
        shared,
        registry,
        broker,
        meta,
        event_id,
        started,
        deadline,
        inbox,
    } = job;
    // Everything is resolved and validated before anything runs.
    let mut calls = Vec::with_capacity(entries.len());
    let mut database = None;
    for (i, entry) in entries.iter().enumerate() {
        let resolved = match entry {
            Err(e) => Err(Failure::from(e)),
            Ok(p) => resolve(registry, broker, meta.user.as_deref(), p),
        };
        let (db, op, params) = match resolved {
            Ok(r) => r,
            Err(f) => return atomic_failed(meta, event_id, entries.len(), i, f),
        };
        if database.is_some_and(|d| d != db) {
            let f = Failure::from(&RequestError::AtomicBatch(
                "every entry must use the same database".into(),
            ));
            return atomic_failed(meta, event_id, entries.len(), i, f);
        }
        if let Err(why) = adapter(shared, db).and_then(|a| {
            a.atomic_support().map_err(|why| {
                Failure::from(&RequestError::AtomicBatch(format!(
                    "database {db} cannot run transactions: {why}"
                )))
            })
        }) {
            return atomic_failed(meta, event_id, entries.len(), i, why);
        }
        database = Some(db);
        calls.push((op, params));
    }
    let Some(adapter) = database.and_then(|d| shared.adapters.get(d)) else {
        let f = Failure::new(ErrorCode::Internal, "no adapter for the batch's database");
        return atomic_failed(meta, event_id, entries.len(), 0, f);
    };
    let refs: Vec<(&Op, &[Param])> = calls.iter().map(|(op, p)| (*op, p.as_slice())).collect();
    let decide_on = |r: Ran<'_>| match r {
        Ok(outs) => {
            let results = outs
                .iter()
                .enumerate()
                .map(|(i, o)| Reply::ok(format!("{event_id}.{i}"), o.clone(), 0))
                .collect();
            answer(batch_reply(event_id, started, results), None, None)
        }
        Err((i, e)) => {
            let f = Failure::from(e);
            if f.retryable && !adapter.health().is_up() {
                // The database went down under it: nothing was applied; wait.
                return Action::Hold {
                    database: database.unwrap_or_default().to_string(),
                    batch_done: None,
                    expires_in_ms: hold_ttl(deadline),
                };
            }
            if f.retryable && meta.attempt < shared.limits.retry_tiers {
                return retry_or_give_up(shared, meta, event_id, f);
            }
            let f = if f.retryable { gave_up(meta, f) } else { f };
            atomic_failed(meta, event_id, entries.len(), i, f)
        }
    };
    match inbox.filter(|_| adapter.inbox()) {
        None => match adapter.call_atomic(&refs).await {
            Ok(outs) => decide_on(Ok(&outs)),
            Err((i, e)) => decide_on(Err((i, &e))),
        },
        Some(key) => run_once(shared, adapter, key, &refs, event_id, decide_on).await,
    }
}

/// All-or-nothing failure: entry `i` failed, so none was applied.
pub(crate) fn atomic_failed(meta: &Meta, event_id: &str, n: usize, i: usize, f: Failure) -> Action {
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

pub(crate) fn batch_reply(event_id: &str, started: Instant, results: Vec<Reply>) -> Reply {
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

pub(crate) fn retry_or_give_up(shared: &Shared, meta: &Meta, event_id: &str, f: Failure) -> Action {
    if meta.attempt < shared.limits.retry_tiers {
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

pub(crate) fn gave_up(meta: &Meta, f: Failure) -> Failure {
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
pub(crate) fn answer_failure(meta: &Meta, event_id: &str, f: Failure) -> Action {
    tracing::debug!(code = %f.code, error = %f.message, "request failed");
    let reply = Reply::error(event_id.to_string(), &f);
    let park = (meta.reply_to.is_none() || f.park).then_some(f);
    answer(reply, park, None)
}

pub(crate) fn answer(
    reply: Reply,
    park: Option<Failure>,
    parked_entries: Option<Vec<usize>>,
) -> Action {
    let body = serde_json::to_vec(&reply).unwrap_or_else(|e| {
        format!(r#"{{"status":"error","event_id":"{}","error":{{"code":"INTERNAL","message":"reply not serializable: {e}","retryable":false}}}}"#, reply.event_id).into_bytes()
    });
    let outline = Outline::of(&reply);
    Action::Answer {
        reply: Arc::new(Encoded {
            event_id: reply.event_id,
            body,
            park_again: None,
            parked_entries: None,
            outline,
        }),
        park,
        parked_entries,
    }
}

pub(crate) fn read_meta(shared: &Shared, props: &AMQPProperties, body: &[u8]) -> Meta {
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

pub(crate) fn micros(since: Instant) -> u64 {
    since.elapsed().as_micros().min(u64::MAX as u128) as u64
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
