//! The event log (CONTRACT §7): one document per request in MongoDB, tied to
//! the events that caused it. Dispatchers hand events to an [`EventLog`]
//! without waiting; a writer task inserts them in batches and, while
//! MongoDB does not answer, keeps them in an on-disk spool and writes them
//! when it is back (wiki/15-event-log.md).

pub mod command;
pub mod query;
mod spool;
mod writer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mongodb::bson::{doc, Bson, DateTime, Document};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use writer::{ensure_indexes, named, open_collection, start, ttl_index, Writer};

/// One event, as the writer stores it (and the spool keeps it, as JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: String,
    pub parent_event_id: Option<String>,
    /// Filled by the writer when the request had a parent (the parent's
    /// root); the own id otherwise.
    pub root_event_id: Option<String>,
    /// `request`, `lifecycle` or `admin`.
    pub kind: String,
    /// When the request was received, Unix ms.
    pub ts_ms: i64,
    pub node: String,
    pub role: String,
    pub broker: Option<String>,
    pub template: Option<String>,
    pub op: Option<String>,
    pub context: Option<String>,
    /// `ok` or `error`.
    pub status: String,
    pub code: Option<String>,
    pub message: Option<String>,
    pub elapsed_us: u64,
    /// 1 for the first delivery, higher after retry tiers.
    pub attempt: u32,
    pub message_id: Option<String>,
    pub user_id: Option<String>,
    pub traceparent: Option<String>,
    /// What became of the request beyond its answer: `retry`, `held`,
    /// `parked`, `quarantined`, or none.
    pub outcome: Option<String>,
    /// A batch entry's index in its batch.
    pub entry: Option<u32>,
}

impl Event {
    /// The document in the collection; `_id` is the event id, so writing a
    /// spooled event twice cannot make two documents.
    pub fn to_document(&self) -> Document {
        let opt = |v: &Option<String>| v.as_ref().map_or(Bson::Null, |s| Bson::String(s.clone()));
        let mut d = doc! {
            "_id": &self.event_id,
            "event_id": &self.event_id,
            "parent_event_id": opt(&self.parent_event_id),
            "root_event_id": self.root_event_id.clone().unwrap_or_else(|| self.event_id.clone()),
            "kind": &self.kind,
            "ts": DateTime::from_millis(self.ts_ms),
            "node": &self.node,
            "role": &self.role,
            "broker": opt(&self.broker),
            "template": opt(&self.template),
            "op": opt(&self.op),
            "context": opt(&self.context),
            "status": &self.status,
            "code": opt(&self.code),
            "message": opt(&self.message),
            "elapsed_us": self.elapsed_us as i64,
            "attempt": self.attempt as i64,
            "message_id": opt(&self.message_id),
            "user_id": opt(&self.user_id),
            "traceparent": opt(&self.traceparent),
        };
        if let Some(o) = &self.outcome {
            d.insert("outcome", o.as_str());
        }
        if let Some(e) = self.entry {
            d.insert("entry", e as i64);
        }
        d
    }

    /// An event read back from the collection.
    pub fn from_document(d: &Document) -> Event {
        let s = |k: &str| d.get_str(k).ok().map(str::to_string);
        let n = |k: &str| match d.get(k) {
            Some(Bson::Int64(i)) => *i,
            Some(Bson::Int32(i)) => *i as i64,
            _ => 0,
        };
        Event {
            event_id: s("event_id").unwrap_or_default(),
            parent_event_id: s("parent_event_id"),
            root_event_id: s("root_event_id"),
            kind: s("kind").unwrap_or_default(),
            ts_ms: d
                .get_datetime("ts")
                .map(|t| t.timestamp_millis())
                .unwrap_or(0),
            node: s("node").unwrap_or_default(),
            role: s("role").unwrap_or_default(),
            broker: s("broker"),
            template: s("template"),
            op: s("op"),
            context: s("context"),
            status: s("status").unwrap_or_default(),
            code: s("code"),
            message: s("message"),
            elapsed_us: n("elapsed_us").max(0) as u64,
            attempt: n("attempt").max(0) as u32,
            message_id: s("message_id"),
            user_id: s("user_id"),
            traceparent: s("traceparent"),
            outcome: s("outcome"),
            entry: d.get("entry").map(|_| n("entry").max(0) as u32),
        }
    }
}

/// An event as the collection stores it, serialized straight to BSON by
/// the driver (no `Document` built per event): the same fields as
/// [`Event::to_document`], which a test keeps equal.
#[derive(Serialize)]
pub struct Stored<'a> {
    #[serde(rename = "_id")]
    id: &'a str,
    event_id: &'a str,
    parent_event_id: Option<&'a str>,
    root_event_id: &'a str,
    kind: &'a str,
    ts: DateTime,
    node: &'a str,
    role: &'a str,
    broker: Option<&'a str>,
    template: Option<&'a str>,
    op: Option<&'a str>,
    context: Option<&'a str>,
    status: &'a str,
    code: Option<&'a str>,
    message: Option<&'a str>,
    elapsed_us: i64,
    attempt: i64,
    message_id: Option<&'a str>,
    user_id: Option<&'a str>,
    traceparent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    entry: Option<i64>,
}

impl Event {
    pub fn stored(&self) -> Stored<'_> {
        Stored {
            id: &self.event_id,
            event_id: &self.event_id,
            parent_event_id: self.parent_event_id.as_deref(),
            root_event_id: self.root_event_id.as_deref().unwrap_or(&self.event_id),
            kind: &self.kind,
            ts: DateTime::from_millis(self.ts_ms),
            node: &self.node,
            role: &self.role,
            broker: self.broker.as_deref(),
            template: self.template.as_deref(),
            op: self.op.as_deref(),
            context: self.context.as_deref(),
            status: &self.status,
            code: self.code.as_deref(),
            message: self.message.as_deref(),
            elapsed_us: self.elapsed_us as i64,
            attempt: self.attempt as i64,
            message_id: self.message_id.as_deref(),
            user_id: self.user_id.as_deref(),
            traceparent: self.traceparent.as_deref(),
            outcome: self.outcome.as_deref(),
            entry: self.entry.map(i64::from),
        }
    }
}

/// The dispatchers' side of the log: hands events to the writer without
/// ever waiting. Cheap to clone.
#[derive(Clone)]
pub struct EventLog {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    tx: mpsc::Sender<Event>,
    /// Events refused because the memory queue was full.
    dropped: AtomicU64,
    /// Bytes in the on-disk spool, as the writer last saw them.
    spool_bytes: AtomicU64,
    /// Spooled events dropped because the spool was full.
    spool_dropped: AtomicU64,
    node: String,
    role: String,
}

impl EventLog {
    /// A log that drops everything (`events.database = ""`, and tests of
    /// code that logs).
    pub fn off() -> EventLog {
        EventLog { inner: None }
    }

    fn new(tx: mpsc::Sender<Event>, node: &str, role: &str) -> EventLog {
        EventLog {
            inner: Some(Arc::new(Inner {
                tx,
                dropped: AtomicU64::new(0),
                spool_bytes: AtomicU64::new(0),
                spool_dropped: AtomicU64::new(0),
                node: node.to_string(),
                role: role.to_string(),
            })),
        }
    }

    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// Queues `e` (node and role filled in). Never waits: with the queue
    /// full the event is dropped and counted.
    pub fn emit(&self, mut e: Event) {
        let Some(inner) = &self.inner else { return };
        e.node.clone_from(&inner.node);
        e.role.clone_from(&inner.role);
        if inner.tx.try_send(e).is_err() {
            let n = inner.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::error!(
                    dropped = n,
                    "event log queue full: events dropped (the writer cannot keep up)"
                );
            }
        }
    }

    /// A node lifecycle event (IPL steps, ready, drain, stop).
    pub fn lifecycle(&self, status: &str, op: &str, message: impl Into<String>) {
        self.emit(Event {
            event_id: new_id(),
            kind: "lifecycle".into(),
            ts_ms: now_ms(),
            op: Some(op.to_string()),
            status: status.to_string(),
            message: Some(message.into()),
            attempt: 1,
            ..Default::default()
        });
    }

    /// Events dropped because the memory queue was full.
    pub fn dropped(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.dropped.load(Ordering::Relaxed))
    }

    /// Events waiting in memory for the writer.
    pub fn queued(&self) -> usize {
        self.inner
            .as_ref()
            .map_or(0, |i| i.tx.max_capacity() - i.tx.capacity())
    }

    /// Bytes spooled on disk, and spooled events dropped for lack of room.
    pub fn spool(&self) -> (u64, u64) {
        self.inner.as_ref().map_or((0, 0), |i| {
            (
                i.spool_bytes.load(Ordering::Relaxed),
                i.spool_dropped.load(Ordering::Relaxed),
            )
        })
    }

    /// The writer's report on its spool.
    fn spooled(&self, bytes: u64, dropped: u64) {
        if let Some(i) = &self.inner {
            i.spool_bytes.store(bytes, Ordering::Relaxed);
            i.spool_dropped.fetch_add(dropped, Ordering::Relaxed);
        }
    }
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A UUIDv7 event id (time-ordered), random bits from the thread's CSPRNG.
pub fn new_id() -> String {
    uuid::Builder::from_unix_timestamp_millis(now_ms() as u64, &rand::random())
        .into_uuid()
        .to_string()
}

/// The W3C trace id an event without a `traceparent` gets: its root's
/// UUID digits (32 hex, as the format wants), so every event of a chain
/// shares one trace; the span id is the event's own last 16 digits.
pub fn derived_traceparent(root: &str, event_id: &str) -> Option<String> {
    let hex = |s: &str| -> Option<String> {
        let h: String = s.chars().filter(|c| *c != '-').collect();
        (h.len() >= 32 && h.chars().all(|c| c.is_ascii_hexdigit())).then(|| h.to_ascii_lowercase())
    };
    let trace = hex(root)?;
    let base = event_id.split('.').next().unwrap_or(event_id);
    let span = hex(base)?;
    // A batch entry ("<id>.<j>") gets a span of its own.
    let mut span = span[16..32].to_string();
    if let Some(j) = event_id
        .split('.')
        .nth(1)
        .and_then(|j| j.parse::<u64>().ok())
    {
        let v = u64::from_str_radix(&span, 16).unwrap_or(0) ^ (j + 1);
        span = format!("{v:016x}");
    }
    Some(format!("00-{}-{span}-01", &trace[..32]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_round_trip_and_ids_are_the_key() {
        let e = Event {
            event_id: "e1".into(),
            parent_event_id: Some("p".into()),
            root_event_id: Some("r".into()),
            kind: "request".into(),
            ts_ms: 1_700_000_000_123,
            status: "error".into(),
            code: Some("CONFLICT".into()),
            attempt: 2,
            entry: Some(3),
            ..Default::default()
        };
        let d = e.to_document();
        assert_eq!(d.get_str("_id").unwrap(), "e1");
        assert_eq!(
            d.get_datetime("ts").unwrap().timestamp_millis(),
            1_700_000_000_123
        );
        assert_eq!(Event::from_document(&d), e);
        // What the writer sends is the same document.
        assert_eq!(mongodb::bson::to_document(&e.stored()).unwrap(), d);
        // Without a parent the root is the event itself.
        let solo = Event {
            event_id: "s".into(),
            ..Default::default()
        }
        .to_document();
        assert_eq!(solo.get_str("root_event_id").unwrap(), "s");
    }

    #[test]
    fn a_chain_shares_a_trace_id_derived_from_its_root() {
        let root = "01a22d1b-7f83-7047-9924-e02c1b1fe39d";
        let a = derived_traceparent(root, root).unwrap();
        let b = derived_traceparent(root, "01a22d1b-8000-7047-9924-000000000001").unwrap();
        let c = derived_traceparent(root, &format!("{root}.2")).unwrap();
        assert_eq!(&a[3..35], "01a22d1b7f8370479924e02c1b1fe39d");
        assert_eq!(a[3..35], b[3..35]);
        assert_ne!(a[36..52], b[36..52]);
        assert_ne!(a[36..52], c[36..52]);
        assert_eq!(a.len(), 55);
        assert!(derived_traceparent("not-a-uuid", root).is_none());
    }
}
