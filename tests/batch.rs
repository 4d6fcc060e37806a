//! Batches (CONTRACT §2): one message, many operations, one reply.

mod common;

use common::{Opts, TestEnv};
use serde_json::json;

fn email() -> String {
    format!("b.{}@example.org", uuid::Uuid::new_v4().simple())
}

fn create(email: &str) -> serde_json::Value {
    json!({"template": "usr", "op": "create", "data": {"name": "B", "email": email}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_succeed_or_fail_on_their_own() {
    let env = TestEnv::start(Opts::default()).await;
    let (a, b) = (email(), email());
    let r = env
        .call(
            "wBroker",
            json!({"batch": [
                create(&a),
                create(&a),
                {"template": "usr", "op": "read", "data": {"id": 1}},
                {"template": "usr", "op": "create", "data": {"name": "B"}},
                {"template": "usr", "op": "create", "data": {"name": "B", "email": b}, "oops": 1},
                create(&b),
            ]}),
        )
        .await;
    assert!(r.is_ok(), "{r:?}");
    let res = r.results.unwrap();
    let codes: Vec<_> = res.iter().map(|r| r.code().unwrap_or("ok")).collect();
    assert_eq!(
        codes,
        [
            "ok",
            "CONFLICT",
            "WRONG_BROKER",
            "VALIDATION",
            "BAD_PAYLOAD",
            "ok"
        ]
    );
    assert_eq!(r.affected, Some(2));
    // Each entry has its own event id, derived from the batch's.
    assert!(res.iter().all(|e| e.event_id.starts_with(&r.event_id)));
    assert_eq!(env.sql("SELECT COUNT(*) FROM usr").trim(), "2");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomic_batch_is_all_or_nothing() {
    let env = TestEnv::start(Opts::default()).await;
    let taken = email();
    assert!(env.call("wBroker", create(&taken)).await.is_ok());
    let (a, b) = (email(), email());
    let r = env
        .call(
            "wBroker",
            json!({"atomic": true, "batch": [create(&a), create(&b), create(&taken)]}),
        )
        .await;
    assert_eq!(r.code(), Some("CONFLICT"), "{r:?}");
    let res = r.results.unwrap();
    assert_eq!(res.len(), 3);
    assert!(res.iter().all(|e| !e.is_ok()));
    assert_eq!(
        env.sql("SELECT COUNT(*) FROM usr").trim(),
        "1",
        "nothing applied"
    );

    // A validation failure stops the batch before anything runs.
    let r = env
        .call(
            "wBroker",
            json!({"atomic": true, "batch": [create(&a), {"template": "usr", "op": "create", "data": {"name": 5}}]}),
        )
        .await;
    assert_eq!(r.code(), Some("VALIDATION"));
    assert_eq!(env.sql("SELECT COUNT(*) FROM usr").trim(), "1");

    let r = env
        .call(
            "wBroker",
            json!({"atomic": true, "batch": [create(&a), create(&b)]}),
        )
        .await;
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(r.results.unwrap().len(), 2);
    assert_eq!(env.sql("SELECT COUNT(*) FROM usr").trim(), "3");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_batch_never_applies_an_entry_twice() {
    let env = TestEnv::start(Opts::default()).await;
    let a = email();
    let k = uuid::Uuid::new_v4().simple().to_string();
    // Entry 1 fails once with a retryable error: the batch goes through a
    // retry tier, and entry 0 must not run again.
    let r = env
        .call(
            "wBroker",
            json!({"batch": [
                create(&a),
                {"template": "tst", "op": "flaky", "data": {"key": k, "fail_times": 1}},
            ]}),
        )
        .await;
    let res = r.results.unwrap();
    assert!(
        res[0].is_ok(),
        "first entry answered from its first execution: {:?}",
        res[0]
    );
    assert!(res[1].is_ok(), "{:?}", res[1]);
    assert_eq!(res[1].data.as_ref().unwrap()[0]["attempts"], 2);
    assert_eq!(env.sql("SELECT COUNT(*) FROM usr").trim(), "1");

    // Atomic: the whole transaction is retried (it was rolled back).
    let (b, k2) = (email(), uuid::Uuid::new_v4().simple().to_string());
    let r = env
        .call(
            "wBroker",
            json!({"atomic": true, "batch": [
                create(&b),
                {"template": "tst", "op": "flaky", "data": {"key": k2, "fail_times": 1}},
            ]}),
        )
        .await;
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(env.sql("SELECT COUNT(*) FROM usr").trim(), "2");
    env.finish().await;
}
