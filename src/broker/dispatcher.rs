//! One dispatcher: a task consuming `<prefix>.<broker>` (or one of its hold
//! queues, `<prefix>.<broker>.hold.<database>`, only while that database
//! answers) on its own channel, draining on shutdown. Every delivery
//! runs as its own task (at most `prefetch` at once) in `handle`:
//!
//! 1. `request::decide`: envelope check → parse → dedup → template, op,
//!    broker and access checks → validate values → NamasteCore call → an
//!    `Action` (answer, retry or park);
//! 2. `outcome::finish`: publish it, each message with a publisher confirm;
//! 3. ack. If step 2 fails, the delivery goes back to its queue instead.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::Channel;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::action::Action;
use super::control::Control;
use super::headers::traceparent;
use super::outcome::{finish, quarantine};
use super::reply::{Outline, Reply};
use super::request::{answer, decide, Trail};
use super::shared::{BrokerSpec, Shared};
use super::{AmqpLink, PublishError};
use crate::error::{ErrorCode, Failure};
use crate::logger::Event;
use crate::namaste::Health;
use crate::supervisor::Backoff;

/// Failed attempts (outcome not published, or ack failed) after which a
/// redelivered request is quarantined instead of tried again.
const MAX_STRIKES: u8 = 2;

/// Wait before returning a request whose outcome could not be published.
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

/// Cheap to clone: the supervisor makes a fresh one from it when a
/// dispatcher task dies.
#[derive(Clone)]
pub struct Dispatcher {
    pub shared: Arc<Shared>,
    pub broker: Arc<BrokerSpec>,
    pub link: Arc<AmqpLink>,
    /// Instance number within this broker's pool, for logs and tags.
    pub id: usize,
    /// The node's stop signal: stop consuming and drain.
    pub stop: CancellationToken,
    /// Pause and prefetch from admin commands (`pause`, `drain`,
    /// `prefetch`): a change ends the consumer once in-flight requests
    /// are done, and the next one follows it.
    pub control: watch::Receiver<Control>,
}

impl Dispatcher {
    pub async fn run(mut self) {
        let tracker = TaskTracker::new();
        let mut backoff = Backoff::default();
        while !self.stop.is_cancelled() {
            if let Some(health) = gate_health(&self.shared, &self.broker) {
                if !health.is_up() {
                    tracing::info!(queue = %self.broker.queue, "held requests wait until their database answers");
                    let mut rx = health.subscribe();
                    tokio::select! {
                        _ = self.stop.cancelled() => break,
                        _ = rx.wait_for(|up| *up) => {}
                    }
                    tracing::info!(queue = %self.broker.queue, "database answers: running held requests");
                }
            }
            let control = *self.control.borrow_and_update();
            if control.paused {
                tracing::info!(broker = %self.broker.name, queue = %self.broker.queue, "paused by an admin command");
                tokio::select! {
                    _ = self.stop.cancelled() => break,
                    r = self.control.wait_for(|c| !c.paused) => if r.is_err() { break },
                }
                tracing::info!(broker = %self.broker.name, queue = %self.broker.queue, "resumed");
                continue;
            }
            // Opening may hang on a partitioned network: shutdown wins.
            let opened = tokio::select! {
                _ = self.stop.cancelled() => break,
                r = open(&self.link, &self.shared, &self.broker, self.id, control.prefetch) => r,
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
                        _ = self.stop.cancelled() => break,
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
        let down = gate_down(&self.shared, &self.broker);
        tokio::pin!(down);
        // Cancelled when the drain timeout ends: requests still running then
        // stop where they are, unacknowledged, and go back to the queue.
        let cut = CancellationToken::new();
        // Set when the database went down or an admin command changed the
        // control: in-flight requests then finish on this channel.
        let mut gate_closed = false;
        let mut control = self.control.clone();
        let result = loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break Ok(()),
                _ = &mut down => {
                    gate_closed = true;
                    break Ok(());
                }
                _ = control.changed() => {
                    gate_closed = true;
                    break Ok(());
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let (shared, broker, ch) = (self.shared.clone(), self.broker.clone(), ch.clone());
                        let cut = cut.clone();
                        tracker.spawn(async move {
                            tokio::select! {
                                biased;
                                _ = cut.cancelled() => {}
                                _ = handle(shared, broker, ch, delivery, &cut) => {}
                            }
                        });
                    }
                    Some(Err(e)) => break Err(e),
                    None => break Err(lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "consumer ended").into()),
                },
            }
        };
        let _ = ch
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
        tracker.close();
        if gate_closed {
            // The database went down (or a pause): requests already started
            // end on their own (adapter calls are bounded) and are held or
            // answered.
            // Closing the channel under them would run them again. Only a
            // stop cuts this wait short, down to the drain timeout.
            tokio::select! {
                _ = tracker.wait() => {}
                _ = self.stop.cancelled() => {}
            }
        }
        if tokio::time::timeout(self.shared.limits.drain, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(broker = %self.broker.name, id = self.id, unfinished = tracker.len(),
                "drain timeout: unfinished requests stop and go back to the queue");
            cut.cancel();
            tracker.wait().await;
        }
        tracker.reopen();
        let _ = ch.close(200, "dispatcher stopping".into()).await;
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
    prefetch: u16,
) -> Result<(Channel, String, lapin::Consumer), lapin::Error> {
    let ch = link.channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
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
            broker.queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((ch, tag, consumer))
}

/// The health of the database a hold-queue dispatcher waits for.
fn gate_health<'s>(shared: &'s Shared, broker: &BrokerSpec) -> Option<&'s Health> {
    let db = broker.gate.as_deref()?;
    Some(shared.adapters.get(db)?.health())
}

/// Resolves when the gate's database goes down (never for work queues: a
/// request for a database that is down is moved to its hold queue).
async fn gate_down(shared: &Shared, broker: &BrokerSpec) {
    let Some(health) = gate_health(shared, broker) else {
        return futures::future::pending().await;
    };
    let mut rx = health.subscribe();
    if rx.wait_for(|up| !*up).await.is_err() {
        futures::future::pending::<()>().await;
    }
}

/// One delivery: decide, publish, ack. `cut` is set when BEDS itself is
/// closing this channel: a publish or ack that fails then is no strike.
async fn handle(
    shared: Arc<Shared>,
    broker: Arc<BrokerSpec>,
    ch: Channel,
    delivery: Delivery,
    cut: &CancellationToken,
) {
    let event_id = event_id();
    let span = tracing::info_span!("request", event_id = %event_id, broker = %broker.name,
        traceparent = tracing::field::Empty);
    if let Some(tp) = traceparent(&delivery.properties) {
        span.record("traceparent", tp);
    }
    async move {
        let started = Instant::now();
        let received = crate::logger::now_ms();
        // Only a redelivery can have failed attempts behind it: first
        // deliveries skip the hashing and the lock.
        let print = delivery.redelivered.then(|| fingerprint(&delivery));
        let strikes = print.map_or(0, |p| shared.strikes.get(p));
        let mut trail = Trail::default();
        let _counted = shared.metrics.in_flight(&broker.name);
        // Sent when this future ends, also when the drain timeout cuts it.
        let mut pending = Pending::new(&shared, || {
            Report::new(&broker, &delivery, &event_id, received, started, &Trail::default())
                .event("error", None, Some("cut by the drain timeout before it was decided; it runs again"), Some("cut"))
        });
        let outcome = if strikes >= MAX_STRIKES {
            // Publishing this request's outcome never completed, twice: the
            // connection closed under it (RabbitMQ rejected something in it).
            // Repeating it would stop the node again; park a bare copy.
            let done = quarantine(&shared, &broker, &ch, &delivery, &event_id).await;
            let e = Report::new(&broker, &delivery, &event_id, received, started, &trail)
                .event("error", Some("INTERNAL"), Some("quarantined: publishing its outcome failed repeatedly"), Some("quarantined"));
            pending.set(vec![e]);
            done
        } else {
            // A bug must not strand a delivery unacknowledged (it would hold
            // a prefetch slot forever): a panic becomes an INTERNAL answer.
            let action = AssertUnwindSafe(decide(&shared, &broker, &delivery.properties, &delivery.data, &event_id, started, &mut trail))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    tracing::error!("request handling panicked");
                    let f = Failure::new(ErrorCode::Internal, "internal error while handling the request");
                    answer(Reply::error(event_id.clone(), &f), Some(f), None)
                });
            pending.set(Report::new(&broker, &delivery, &event_id, received, started, &trail).events(&action));
            finish(&shared, &broker, &ch, &delivery, &event_id, action).await
        };
        // A failed publish or ack is a strike: the connection may have been
        // closed because of something in this request. Not when BEDS closed
        // it, nor when the connection was lost (a restart, a network cut).
        let strike = |e: &dyn std::fmt::Display, lost: bool| {
            if cut.is_cancelled() || lost {
                tracing::debug!(error = %e, "no strike: the channel was closed, not refused");
            } else {
                shared.strikes.add(print.unwrap_or_else(|| fingerprint(&delivery)));
            }
        };
        let outcome_failed = outcome.is_err();
        match outcome {
            Ok(()) => match delivery.ack(BasicAckOptions::default()).await {
                Ok(true) => {
                    if let Some(p) = print {
                        shared.strikes.clear(p);
                    }
                }
                // The channel died before the ack: RabbitMQ redelivers. Not
                // this request's fault, so no strike.
                Ok(false) => tracing::warn!("channel gone before the ack; RabbitMQ will redeliver"),
                Err(e) => {
                    strike(&e, connection_lost(&e));
                    tracing::warn!(error = %e, "ack failed; RabbitMQ will redeliver");
                }
            },
            Err(e) => {
                let lost = matches!(&e, PublishError::Amqp(a) if connection_lost(a));
                strike(&e, lost);
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
        pending.done(outcome_failed.then_some("requeued"));
    }
    .instrument(span)
    .await
}

/// A delivery's events, counted in the metrics and sent to the log when
/// dropped: at the end of `handle`, or when the drain timeout cuts it (the
/// events are then marked `cut`, or, if it was not decided yet, one `cut`
/// event stands in).
struct Pending<'a, F: Fn() -> Event> {
    shared: &'a Shared,
    events: Vec<Event>,
    /// Makes the stand-in event; only called when needed.
    stand_in: F,
    finished: bool,
}

impl<'a, F: Fn() -> Event> Pending<'a, F> {
    fn new(shared: &'a Shared, stand_in: F) -> Self {
        Pending {
            shared,
            events: Vec::new(),
            stand_in,
            finished: false,
        }
    }

    fn set(&mut self, events: Vec<Event>) {
        self.events = events;
    }

    /// `handle` got to its end; `outcome` overrides the first event's.
    fn done(&mut self, outcome: Option<&str>) {
        if let (Some(o), Some(top)) = (outcome, self.events.first_mut()) {
            top.outcome = Some(o.to_string());
        }
        self.finished = true;
    }
}

impl<F: Fn() -> Event> Drop for Pending<'_, F> {
    fn drop(&mut self) {
        if !self.finished {
            match self.events.first_mut() {
                Some(top) => top.outcome = Some("cut".into()),
                None => self.events.push((self.stand_in)()),
            }
        }
        let shared = self.shared;
        shared
            .metrics
            .observe(&self.events, &shared.registry.load());
        if shared.events.is_on() {
            for e in self.events.drain(..) {
                shared.events.emit(e);
            }
        }
    }
}

/// The event log's view of one delivery: what every event of it shares.
struct Report<'a> {
    broker: &'a BrokerSpec,
    delivery: &'a Delivery,
    event_id: &'a str,
    received: i64,
    started: Instant,
    trail: &'a Trail,
}

impl<'a> Report<'a> {
    fn new(
        broker: &'a BrokerSpec,
        delivery: &'a Delivery,
        event_id: &'a str,
        received: i64,
        started: Instant,
        trail: &'a Trail,
    ) -> Report<'a> {
        Report {
            broker,
            delivery,
            event_id,
            received,
            started,
            trail,
        }
    }

    /// The delivery's own event.
    fn event(
        &self,
        status: &str,
        code: Option<&str>,
        message: Option<&str>,
        outcome: Option<&str>,
    ) -> Event {
        let props = &self.delivery.properties;
        let s = |v: Option<&str>| v.map(str::to_string);
        Event {
            event_id: self.event_id.to_string(),
            parent_event_id: self.trail.parent.clone(),
            kind: "request".into(),
            ts_ms: self.received,
            broker: Some(self.broker.name.clone()),
            template: self.trail.template.clone(),
            op: self.trail.op.clone(),
            context: self.trail.context.clone(),
            status: status.to_string(),
            code: s(code),
            message: s(message),
            elapsed_us: self.started.elapsed().as_micros().min(u64::MAX as u128) as u64,
            attempt: self.trail.attempt.max(1),
            message_id: props.message_id().as_ref().map(|m| m.to_string()),
            user_id: self.trail.user.clone(),
            traceparent: traceparent(props).map(str::to_string),
            outcome: s(outcome),
            ..Default::default()
        }
    }

    /// The events an action makes: the delivery's own, and one per entry
    /// of a batch that was answered.
    fn events(&self, action: &Action) -> Vec<Event> {
        match action {
            Action::Answer { reply, park, .. } => {
                let o = &reply.outline;
                let status = if o.ok { "ok" } else { "error" };
                let parked = park.as_ref().map(|_| "parked");
                let mut out =
                    vec![self.event(status, o.code.as_deref(), o.message.as_deref(), parked)];
                out.extend(o.entries.iter().enumerate().map(|(j, e)| self.entry(j, e)));
                out
            }
            Action::Retry { failure, tier, .. } => vec![self.event(
                "error",
                Some(failure.code.as_str()),
                Some(&format!("{} (to retry tier {tier})", failure.message)),
                Some("retry"),
            )],
            Action::Hold { database, .. } => vec![self.event(
                "error",
                Some(ErrorCode::Unavailable.as_str()),
                Some(&format!(
                    "database {database} is down: held until it answers"
                )),
                Some("held"),
            )],
        }
    }

    fn entry(&self, j: usize, o: &Outline) -> Event {
        let (template, op) = self.trail.entries.get(j).cloned().unwrap_or_default();
        Event {
            event_id: format!("{}.{j}", self.event_id),
            parent_event_id: Some(self.event_id.to_string()),
            template,
            op,
            entry: Some(j as u32),
            ..self.event(
                if o.ok { "ok" } else { "error" },
                o.code.as_deref(),
                o.message.as_deref(),
                None,
            )
        }
    }
}

/// The connection itself failed (RabbitMQ restarted, the network cut):
/// nothing a request can have caused.
fn connection_lost(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        lapin::ErrorKind::IOError(_)
            | lapin::ErrorKind::MissingHeartbeatError
            // A publish started after the channel or connection was gone.
            | lapin::ErrorKind::InvalidChannelState(..)
            | lapin::ErrorKind::InvalidConnectionState(_)
    ) || matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if p.get_id() == 320)
}

/// A UUIDv7 (time-ordered) event id. Its random part comes from the
/// thread's CSPRNG rather than a getrandom syscall per request.
fn event_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    uuid::Builder::from_unix_timestamp_millis(ms, &rand::random())
        .into_uuid()
        .to_string()
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

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::AMQPError;

    #[test]
    fn only_a_refusal_is_a_strike_not_a_lost_connection() {
        let refused = |code| -> lapin::Error {
            lapin::ErrorKind::ProtocolError(AMQPError::from_id(code, "x".into()).unwrap()).into()
        };
        let io: lapin::Error = std::io::Error::from(std::io::ErrorKind::ConnectionReset).into();
        // RabbitMQ stopping (320) or the network failing: nothing the
        // request did.
        assert!(connection_lost(&io));
        assert!(connection_lost(&refused(320)));
        assert!(connection_lost(
            &lapin::ErrorKind::MissingHeartbeatError.into()
        ));
        // RabbitMQ refusing what was published (a hostile reply address
        // closes the connection with 541; a bad header with 406 or 505).
        assert!(!connection_lost(&refused(541)));
        assert!(!connection_lost(&refused(406)));
        assert!(!connection_lost(&refused(505)));
    }
}
