//! `decide` without servers: the shipped `usr` and `note` templates, with
//! fake adapters behind the NamasteCore trait that answer from a script.
//! Each case is one delivery and the `Action` it must lead to.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use serde_json::{json, Value};

use super::*;
use crate::broker::shared::{Limits, Shared, TemplateScope};
use crate::broker::topology::Names;
use crate::namaste::{AdapterError, Adapters, Health, Lifecycle, NamasteCore, Session};
use crate::registry::Template;

/// Answers calls from a script; an `Unreachable` answer marks it down, as
/// the real adapters do.
#[derive(Default)]
struct FakeDb {
    health: Health,
    script: Mutex<VecDeque<Result<Outcome, AdapterError>>>,
    calls: AtomicUsize,
    no_transactions: Option<String>,
    /// Set: a durable inbox (id → record) that outlives any one `Shared`,
    /// as the real one outlives a node.
    inbox: Option<Mutex<std::collections::HashMap<String, String>>>,
    /// The inbox's COMMIT fails with this (retryable) error.
    commit_fails: bool,
}

impl FakeDb {
    fn answers(answers: Vec<Result<Outcome, AdapterError>>) -> Arc<FakeDb> {
        Arc::new(FakeDb {
            script: Mutex::new(answers.into()),
            ..Default::default()
        })
    }

    fn with_inbox(answers: Vec<Result<Outcome, AdapterError>>) -> Arc<FakeDb> {
        Arc::new(FakeDb {
            script: Mutex::new(answers.into()),
            inbox: Some(Mutex::default()),
            ..Default::default()
        })
    }

    fn records(&self) -> usize {
        self.inbox.as_ref().map_or(0, |i| i.lock().unwrap().len())
    }

    fn next(&self) -> Result<Outcome, AdapterError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let r = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| Ok(row(json!({"id": 1}))));
        if matches!(r, Err(AdapterError::Unreachable(_))) {
            self.health.mark_down();
        }
        r
    }
}

fn row(v: Value) -> Outcome {
    Outcome {
        rows: vec![v.as_object().unwrap().clone()],
        affected: 1,
    }
}

#[async_trait]
impl NamasteCore for FakeDb {
    async fn call(&self, _: &Op, _: &[Param]) -> Result<Outcome, AdapterError> {
        self.next()
    }
    fn atomic_support(&self) -> Result<(), String> {
        self.no_transactions.clone().map_or(Ok(()), Err)
    }
    async fn call_atomic(
        &self,
        calls: &[(&Op, &[Param])],
    ) -> Result<Vec<Outcome>, (usize, AdapterError)> {
        calls
            .iter()
            .enumerate()
            .map(|(i, _)| self.next().map_err(|e| (i, e)))
            .collect()
    }
    fn inbox(&self) -> bool {
        self.inbox.is_some()
    }
    async fn call_once(
        &self,
        key: &crate::namaste::InboxKey,
        calls: &[(&Op, &[Param])],
        record: &mut crate::namaste::Recorder<'_>,
    ) -> Result<crate::namaste::Once, AdapterError> {
        use crate::namaste::Once;
        let inbox = self.inbox.as_ref().expect("an inbox");
        if let Some(r) = inbox.lock().unwrap().get(&key.id) {
            return Ok(Once::Repeat(r.clone()));
        }
        let result = self.call_atomic(calls).await;
        let Some(stored) = record(&result) else {
            return Ok(Once::Ran(result));
        };
        if self.commit_fails {
            return Err(AdapterError::Transient("COMMIT failed".into()));
        }
        inbox.lock().unwrap().insert(key.id.clone(), stored);
        Ok(Once::Ran(result))
    }
    fn session(&self) -> Box<dyn Session + '_> {
        Box::new(FakeSession(self))
    }
}

struct FakeSession<'a>(&'a FakeDb);

#[async_trait]
impl Session for FakeSession<'_> {
    async fn call(&mut self, _: &Op, _: &[Param]) -> Result<Outcome, AdapterError> {
        self.0.next()
    }
}

#[async_trait]
impl Lifecycle for FakeDb {
    async fn open(&self, _: bool) -> Result<(), AdapterError> {
        Ok(())
    }
    async fn ping(&self) -> Result<(), AdapterError> {
        Ok(())
    }
    async fn missing_objects(&self, _: &[&Template]) -> Result<Vec<String>, AdapterError> {
        Ok(Vec::new())
    }
    fn health(&self) -> &Health {
        &self.health
    }
    async fn close(&self) {}
}

/// The shipped config and templates, with `primary` (usr) and `docs`
/// (note) served by the given fakes.
fn shared(primary: Arc<FakeDb>, docs: Arc<FakeDb>) -> Arc<Shared> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = crate::config::shipped_for_tests();
    let registry = Registry::load_dir(&root.join("templates"), &config).unwrap();
    let mut adapters = Adapters::default();
    adapters.insert("primary".into(), primary);
    adapters.insert("docs".into(), docs);
    Arc::new(Shared {
        registry: Arc::new(arc_swap::ArcSwap::from_pointee(registry)),
        metrics: Arc::new(crate::service::metrics::Metrics::new("test", "appServer")),
        adapters,
        dedup: crate::broker::dedup::Dedup::new(Duration::from_secs(60), 100),
        names: Names { prefix: "t".into() },
        limits: Limits {
            retry_tiers: 2,
            max_payload: 64 * 1024,
            max_batch: 10,
            drain: Duration::from_secs(1),
        },
        retry_key: b"0123456789abcdef".to_vec(),
        node: "t".into(),
        strikes: Default::default(),
        events: crate::logger::EventLog::off(),
    })
}

fn broker(name: &str, serves: Access) -> BrokerSpec {
    BrokerSpec {
        name: name.into(),
        serves: vec![serves],
        scope: Default::default(),
        queue: format!("t.{name}"),
        gate: None,
    }
}

/// What `decide` reads of a delivery: its properties and body.
struct Delivery {
    properties: BasicProperties,
    data: Vec<u8>,
}

fn delivery(body: Value, headers: Vec<(&str, AMQPValue)>, message_id: Option<&str>) -> Delivery {
    let mut table = FieldTable::default();
    for (k, v) in headers {
        table.insert(k.into(), v);
    }
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_reply_to("amq.rabbitmq.reply-to".into())
        .with_correlation_id("c".into())
        .with_headers(table);
    if let Some(m) = message_id {
        props = props.with_message_id(m.into());
    }
    Delivery {
        properties: props,
        data: serde_json::to_vec(&body).unwrap(),
    }
}

async fn decide_on(shared: &Arc<Shared>, b: &BrokerSpec, d: &Delivery) -> Action {
    decide(
        shared,
        b,
        &d.properties,
        &d.data,
        "e",
        Instant::now(),
        &mut Trail::default(),
    )
    .await
}

/// The reply body of an answer, and whether it is parked.
fn answered(a: &Action) -> (Value, bool) {
    match a {
        Action::Answer { reply, park, .. } => {
            (serde_json::from_slice(&reply.body).unwrap(), park.is_some())
        }
        Action::Retry { tier, .. } => panic!("expected an answer, got retry tier {tier}"),
        Action::Hold { database, .. } => panic!("expected an answer, got a hold for {database}"),
    }
}

fn usr_create() -> Value {
    json!({"template": "usr", "op": "create", "data": {"name": "A", "email": "a@x"}})
}

fn note_create() -> Value {
    json!({"template": "note", "op": "create", "data": {"user_id": 1, "title": "t"}})
}

#[tokio::test]
async fn a_request_for_a_database_that_is_down_is_held_without_running() {
    let docs = FakeDb::answers(vec![]);
    docs.health.mark_down();
    let s = shared(FakeDb::answers(vec![]), docs.clone());
    let a = decide_on(
        &s,
        &broker("wBroker", Access::Write),
        &delivery(note_create(), vec![], None),
    )
    .await;
    assert!(matches!(&a, Action::Hold { database, batch_done: None, .. } if database == "docs"));
    assert_eq!(docs.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn unreachable_holds_transient_retries_unknown_outcome_parks() {
    let w = broker("wBroker", Access::Write);
    let d = delivery(usr_create(), vec![], None);
    // The call finds the database gone: the request waits for it.
    let s = shared(
        FakeDb::answers(vec![Err(AdapterError::Unreachable("gone".into()))]),
        FakeDb::answers(vec![]),
    );
    assert!(
        matches!(decide_on(&s, &w, &d).await, Action::Hold { database, .. } if database == "primary")
    );
    // Busy, not down: the retry tiers.
    let s = shared(
        FakeDb::answers(vec![Err(AdapterError::Transient("deadlock".into()))]),
        FakeDb::answers(vec![]),
    );
    assert!(matches!(
        decide_on(&s, &w, &d).await,
        Action::Retry { tier: 1, .. }
    ));
    // Busy on the last tier: UNAVAILABLE, parked.
    let last = delivery(
        usr_create(),
        vec![("x-beds-attempt", AMQPValue::LongLongInt(2))],
        None,
    );
    let s = shared(
        FakeDb::answers(vec![Err(AdapterError::Transient("deadlock".into()))]),
        FakeDb::answers(vec![]),
    );
    let (reply, parked) = answered(&decide_on(&s, &w, &last).await);
    assert_eq!(
        (reply["error"]["code"].as_str(), parked),
        (Some("UNAVAILABLE"), true)
    );
    // Unknown outcome: INTERNAL, parked, never retried.
    let s = shared(
        FakeDb::answers(vec![Err(AdapterError::Indeterminate("lost".into()))]),
        FakeDb::answers(vec![]),
    );
    let (reply, parked) = answered(&decide_on(&s, &w, &d).await);
    assert_eq!(
        (reply["error"]["code"].as_str(), parked),
        (Some("INTERNAL"), true)
    );
}

#[tokio::test]
async fn request_errors_never_reach_the_adapter() {
    let primary = FakeDb::answers(vec![]);
    let s = shared(primary.clone(), FakeDb::answers(vec![]));
    let cases = [
        ("rBroker", Access::Read, usr_create(), "WRONG_BROKER"),
        (
            "wBroker",
            Access::Write,
            json!({"template": "usr", "op": "create", "data": {"name": 1}}),
            "VALIDATION",
        ),
        (
            "wBroker",
            Access::Write,
            json!({"template": "nope", "op": "x"}),
            "UNKNOWN_TEMPLATE",
        ),
        (
            "rBroker",
            Access::Read,
            json!({"template": "note", "op": "read", "data": {"id": {"$ne": null}}}),
            "VALIDATION",
        ),
    ];
    for (name, access, body, code) in cases {
        let (reply, parked) = answered(
            &decide_on(
                &s,
                &broker(name, access),
                &delivery(body.clone(), vec![], None),
            )
            .await,
        );
        assert_eq!(
            (reply["error"]["code"].as_str(), parked),
            (Some(code), false),
            "{body}"
        );
    }
    assert_eq!(primary.calls.load(Ordering::SeqCst), 0);
    // A template named by another broker (segundo's whBroker, say), or a
    // broker serving only other templates: WRONG_BROKER naming who serves it.
    let claims: std::collections::BTreeMap<String, Vec<String>> =
        [("usr".to_string(), vec!["uBroker".to_string()])].into();
    let open = broker("wBroker", Access::Write);
    let claimed = BrokerSpec {
        scope: TemplateScope {
            only: None,
            claims: Arc::new(claims.clone()),
            open: Arc::new(vec!["wBroker".into()]),
        },
        ..open.clone()
    };
    let only_note = BrokerSpec {
        scope: TemplateScope {
            only: Some(["note".to_string()].into()),
            claims: Arc::new(Default::default()),
            open: Arc::new(vec!["wBroker".into()]),
        },
        ..open
    };
    for (b, served_by) in [(&claimed, "uBroker"), (&only_note, "wBroker")] {
        let (reply, parked) =
            answered(&decide_on(&s, b, &delivery(usr_create(), vec![], None)).await);
        assert_eq!(
            (reply["error"]["code"].as_str(), parked),
            (Some("WRONG_BROKER"), false)
        );
        let msg = reply["error"]["message"].as_str().unwrap();
        assert!(msg.contains(&format!("served by {served_by}")), "{msg}");
    }
    assert_eq!(primary.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_repeated_message_id_is_answered_from_the_first_execution() {
    let primary = FakeDb::answers(vec![Ok(row(json!({"id": 7})))]);
    let s = shared(primary.clone(), FakeDb::answers(vec![]));
    let w = broker("wBroker", Access::Write);
    let d = delivery(usr_create(), vec![], Some("m-1"));
    let (first, _) = answered(&decide_on(&s, &w, &d).await);
    let (again, _) = answered(&decide_on(&s, &w, &d).await);
    assert_eq!(first, again);
    assert_eq!(primary.calls.load(Ordering::SeqCst), 1, "run once");
}

#[tokio::test]
async fn a_batch_is_held_with_its_progress_and_expires_entry_by_entry() {
    let docs = FakeDb::answers(vec![Err(AdapterError::Unreachable("gone".into()))]);
    let s = shared(FakeDb::answers(vec![]), docs.clone());
    let w = broker("wBroker", Access::Write);
    let batch = json!({"batch": [usr_create(), note_create()]});
    // The note entry finds MongoDB gone: held with the usr entry's result.
    let Action::Hold {
        database,
        batch_done: Some(done),
        ..
    } = decide_on(&s, &w, &delivery(batch.clone(), vec![], None)).await
    else {
        panic!("expected a hold with progress");
    };
    assert_eq!(database, "docs");
    // Back after its deadline: the entry that ran is reported as run.
    let late = delivery(
        batch,
        vec![
            (
                "x-beds-batch-done",
                AMQPValue::LongString(LongString::from(done)),
            ),
            ("x-beds-deadline", AMQPValue::LongLongInt(1)),
        ],
        None,
    );
    let (reply, parked) = answered(&decide_on(&s, &w, &late).await);
    assert!(!parked);
    assert_eq!(reply["results"][0]["status"], "ok", "{reply}");
    assert_eq!(reply["results"][1]["error"]["code"], "EXPIRED", "{reply}");
}

#[tokio::test]
async fn atomic_batches_need_one_database_that_has_transactions() {
    let docs = Arc::new(FakeDb {
        no_transactions: Some("standalone".into()),
        ..Default::default()
    });
    let s = shared(FakeDb::answers(vec![]), docs.clone());
    let w = broker("wBroker", Access::Write);
    for batch in [
        json!({"atomic": true, "batch": [note_create(), note_create()]}),
        json!({"atomic": true, "batch": [usr_create(), note_create()]}),
    ] {
        let (reply, _) = answered(&decide_on(&s, &w, &delivery(batch.clone(), vec![], None)).await);
        assert_eq!(reply["error"]["code"], "VALIDATION", "{batch}: {reply}");
    }
    assert_eq!(docs.calls.load(Ordering::SeqCst), 0);
}

// The durable inbox: a second `Shared` stands for another node (or this one
// after a restart): it shares the database, not the in-process memory.

#[tokio::test]
async fn a_repeat_on_another_node_is_answered_from_the_inbox() {
    let primary = FakeDb::with_inbox(vec![Ok(row(json!({"id": 7})))]);
    let (a, b) = (
        shared(primary.clone(), FakeDb::answers(vec![])),
        shared(primary.clone(), FakeDb::answers(vec![])),
    );
    let w = broker("wBroker", Access::Write);
    let d = delivery(usr_create(), vec![], Some("m-1"));
    let (first, _) = answered(&decide_on(&a, &w, &d).await);
    let (again, parked) = answered(&decide_on(&b, &w, &d).await);
    assert_eq!(
        first, again,
        "the first execution's reply, event id included"
    );
    assert!(!parked);
    assert_eq!(primary.calls.load(Ordering::SeqCst), 1, "run once");
    assert_eq!(primary.records(), 1);
    // Reads and writes without a message_id never touch the inbox.
    let read = json!({"template": "usr", "op": "read", "data": {"id": 7}});
    decide_on(
        &a,
        &broker("rBroker", Access::Read),
        &delivery(read, vec![], Some("m-2")),
    )
    .await;
    decide_on(&a, &w, &delivery(usr_create(), vec![], None)).await;
    assert_eq!(primary.records(), 1);
}

#[tokio::test]
async fn a_retryable_failure_is_not_recorded_and_runs_again() {
    let primary = FakeDb::with_inbox(vec![Err(AdapterError::Transient("deadlock".into()))]);
    let (a, b) = (
        shared(primary.clone(), FakeDb::answers(vec![])),
        shared(primary.clone(), FakeDb::answers(vec![])),
    );
    let w = broker("wBroker", Access::Write);
    let d = delivery(usr_create(), vec![], Some("m-1"));
    assert!(matches!(
        decide_on(&a, &w, &d).await,
        Action::Retry { tier: 1, .. }
    ));
    assert_eq!(
        primary.records(),
        0,
        "nothing recorded: the writes rolled back"
    );
    let (reply, _) = answered(&decide_on(&b, &w, &d).await);
    assert_eq!(reply["status"], "ok");
    assert_eq!(primary.calls.load(Ordering::SeqCst), 2);
    assert_eq!(primary.records(), 1);
}

#[tokio::test]
async fn a_rejected_write_is_recorded_and_its_repeat_gets_the_same_error() {
    let primary = FakeDb::with_inbox(vec![Err(AdapterError::Conflict("duplicate".into()))]);
    let (a, b) = (
        shared(primary.clone(), FakeDb::answers(vec![])),
        shared(primary.clone(), FakeDb::answers(vec![])),
    );
    let w = broker("wBroker", Access::Write);
    let d = delivery(usr_create(), vec![], Some("m-1"));
    let (first, _) = answered(&decide_on(&a, &w, &d).await);
    let (again, _) = answered(&decide_on(&b, &w, &d).await);
    assert_eq!(first["error"]["code"], "CONFLICT");
    assert_eq!(first, again);
    assert_eq!(primary.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_parked_fire_and_forget_write_is_parked_again_on_repeat() {
    let primary = FakeDb::with_inbox(vec![Err(AdapterError::Rejected("no".into()))]);
    let (a, b) = (
        shared(primary.clone(), FakeDb::answers(vec![])),
        shared(primary.clone(), FakeDb::answers(vec![])),
    );
    let w = broker("wBroker", Access::Write);
    // No reply_to: nobody would see the error, so it is parked.
    let d = Delivery {
        properties: BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id("m-1".into()),
        data: serde_json::to_vec(&usr_create()).unwrap(),
    };
    let (_, parked) = answered(&decide_on(&a, &w, &d).await);
    let (_, parked_again) = answered(&decide_on(&b, &w, &d).await);
    assert!(
        parked && parked_again,
        "parked the first time and on repeat"
    );
    assert_eq!(primary.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_failed_inbox_commit_is_retried_not_answered() {
    let primary = Arc::new(FakeDb {
        inbox: Some(Mutex::default()),
        commit_fails: true,
        ..Default::default()
    });
    let s = shared(primary.clone(), FakeDb::answers(vec![]));
    let w = broker("wBroker", Access::Write);
    let d = delivery(usr_create(), vec![], Some("m-1"));
    assert!(matches!(
        decide_on(&s, &w, &d).await,
        Action::Retry { tier: 1, .. }
    ));
    assert_eq!(primary.records(), 0);
}

#[tokio::test]
async fn an_unreadable_inbox_record_is_parked_as_internal() {
    let primary = FakeDb::with_inbox(vec![]);
    let s = shared(primary.clone(), FakeDb::answers(vec![]));
    let w = broker("wBroker", Access::Write);
    let d = delivery(usr_create(), vec![], Some("m-1"));
    let (_, key) = crate::broker::inbox::keys(None, "m-1", &d.data);
    primary
        .inbox
        .as_ref()
        .unwrap()
        .lock()
        .unwrap()
        .insert(key.id, "not json".into());
    let (reply, parked) = answered(&decide_on(&s, &w, &d).await);
    assert_eq!(reply["error"]["code"], "INTERNAL");
    assert!(parked);
    assert_eq!(primary.calls.load(Ordering::SeqCst), 0, "nothing ran");
}

#[tokio::test]
async fn an_atomic_batch_runs_once_through_the_inbox() {
    let primary = FakeDb::with_inbox(vec![]);
    let (a, b) = (
        shared(primary.clone(), FakeDb::answers(vec![])),
        shared(primary.clone(), FakeDb::answers(vec![])),
    );
    let w = broker("wBroker", Access::Write);
    let batch = json!({"batch": [usr_create(), usr_create()], "atomic": true});
    let d = delivery(batch, vec![], Some("m-1"));
    let (first, _) = answered(&decide_on(&a, &w, &d).await);
    let (again, _) = answered(&decide_on(&b, &w, &d).await);
    assert_eq!(first["status"], "ok");
    assert_eq!(first, again);
    assert_eq!(primary.calls.load(Ordering::SeqCst), 2, "two entries, once");
}
