//! The durable inbox against the real servers: a write with a `message_id`
//! is applied once and its repeats get the first execution's reply, across
//! a node restart, across two nodes, on MariaDB and on MongoDB.

mod common;

use std::time::Duration;

use beds::client::CallOptions;
use beds::ipl::Node;
use common::{Opts, TestEnv};
use serde_json::json;

fn with_id(id: &str) -> CallOptions {
    CallOptions {
        message_id: Some(id.to_string()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_after_a_restart_is_answered_from_the_inbox() {
    let mut env = TestEnv::start(Opts::default()).await;
    let key = uuid::Uuid::new_v4().simple().to_string();
    let email = format!("{key}@inbox.test");
    let create = json!({"template": "usr", "op": "create", "data": {"name": "In", "email": email}});
    let note = json!({"template": "note", "op": "create", "data": {"user_id": 7, "title": key}});
    let first = env
        .call_opts("wBroker", create.clone(), with_id("u-1"))
        .await;
    let first_note = env.call_opts("wBroker", note.clone(), with_id("n-1")).await;
    assert!(
        first.is_ok() && first_note.is_ok(),
        "{first:?} {first_note:?}"
    );

    // A new process: nothing in memory, only the databases remember.
    env.stop_node().await;
    env.start_node().await;
    let again = env
        .call_opts("wBroker", create.clone(), with_id("u-1"))
        .await;
    let again_note = env.call_opts("wBroker", note.clone(), with_id("n-1")).await;
    assert_eq!(
        again, first,
        "the first reply, event id included (not CONFLICT)"
    );
    assert_eq!(again_note, first_note);

    let rows = env.sql(&format!("SELECT COUNT(*) FROM usr WHERE email = '{email}'"));
    assert_eq!(rows.trim(), "1");
    let stored = env.sql("SELECT message_id FROM beds_inbox ORDER BY message_id");
    assert_eq!(stored.trim(), "u-1", "MariaDB holds the usr record");
    let db = env.db.clone();
    let (notes, records) = common::mongo_count(&db, key).await;
    assert_eq!(
        (notes, records),
        (1, 1),
        "one note, one MongoDB inbox record"
    );

    // Another request that reuses the id is not a repeat.
    let other = json!({"template": "usr", "op": "create", "data": {"name": "In", "email": format!("o{email}")}});
    let r = env.call_opts("wBroker", other, with_id("u-1")).await;
    assert!(r.is_ok() && r.event_id != first.event_id, "{r:?}");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_is_recorded_without_its_writes() {
    let mut env = TestEnv::start(Opts::default()).await;
    let half = json!({"template": "tst", "op": "half", "data": {"key": "k1"}});
    let first = env.call_opts("wBroker", half.clone(), with_id("h-1")).await;
    assert_eq!(first.code(), Some("INTERNAL"), "{first:?}");
    assert!(format!("{first:?}").contains("refused after writing"));
    // The procedure's row went with the refusal; the answer was kept.
    assert_eq!(env.sql("SELECT COUNT(*) FROM tst_rows").trim(), "0");
    env.stop_node().await;
    env.start_node().await;
    let again = env.call_opts("wBroker", half, with_id("h-1")).await;
    assert_eq!(again, first);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_repeats_on_two_nodes_run_once() {
    let env = TestEnv::start(Opts::default()).await;
    let second = Node::start(&env.config, &env.dir.join("config"))
        .await
        .expect("second node starts");
    // tst.sleep holds the first execution open while the others arrive.
    let key = uuid::Uuid::new_v4().simple().to_string();
    let slow = json!({"template": "tst", "op": "sleep", "data": {"ms": 300, "key": key}});
    let calls = (0..12).map(|_| env.call_opts("wBroker", slow.clone(), with_id("s-1")));
    let replies = futures::future::join_all(calls).await;
    assert!(replies[0].is_ok(), "{:?}", replies[0]);
    assert!(
        replies.iter().all(|r| *r == replies[0]),
        "every repeat has the first reply: {replies:?}"
    );
    let count = json!({"template": "tst", "op": "count", "data": {"key": key}});
    let n = env.call("rBroker", count).await;
    assert_eq!(n.data.unwrap()[0]["n"], 1, "executed once over two nodes");
    second.stop().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_past_retention_are_purged() {
    let env = TestEnv::start(Opts::default()).await;
    for i in 0..3 {
        let q = json!({"template": "usr", "op": "create", "data": {"name": "P", "email": format!("p{i}-{}@x", env.db)}});
        assert!(env
            .call_opts("wBroker", q, with_id(&format!("p-{i}")))
            .await
            .is_ok());
    }
    let note = json!({"template": "note", "op": "create", "data": {"user_id": 1, "title": "p"}});
    assert!(env.call_opts("wBroker", note, with_id("p-n")).await.is_ok());
    let adapters = [("primary", 3), ("docs", 1)];
    for (name, expected) in adapters {
        let cfg = &env.config.databases[name];
        let a = beds::namaste::build(name, cfg).await.unwrap();
        a.open(false).await.unwrap();
        // Younger than an hour: kept.
        assert_eq!(
            a.purge_inbox(Duration::from_secs(3600), 1000)
                .await
                .unwrap(),
            0
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let mut gone = 0;
        // In steps of at most 2.
        loop {
            let n = a.purge_inbox(Duration::from_secs(1), 2).await.unwrap();
            assert!(n <= 2 || name == "docs", "{n}");
            gone += n;
            if n < 2 {
                break;
            }
        }
        assert_eq!(gone, expected, "{name}");
        a.close().await;
    }
    env.finish().await;
}
