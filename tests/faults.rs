//! Behaviour under faults: retry tiers, the dead-letter queue, drain on
//! shutdown, database outages, SIGTERM.

mod common;

use std::time::Duration;

use beds::client::CallOptions;
use common::{consume_n, eventually, Opts, Proxy, TestEnv};
use lapin::message::BasicGetMessage;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::json;

fn header(props: &lapin::protocol::basic::AMQPProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::LongLongInt(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn key() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failure_succeeds_on_a_later_tier() {
    let env = TestEnv::start(Opts::default()).await;
    let k = key();
    let r = env
        .call(
            "wBroker",
            json!({"template": "tst", "op": "flaky", "data": {"key": k, "fail_times": 2}}),
        )
        .await;
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(
        r.data.unwrap()[0]["attempts"],
        3,
        "failed twice, succeeded on tier 2"
    );
    assert_eq!(env.queue_len(&env.dlq("wBroker")).await, 0);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_exhausted_park_in_dlq_and_answer_unavailable() {
    let env = TestEnv::start(Opts {
        retry_tiers_ms: vec![100, 100],
        ..Default::default()
    })
    .await;
    let k = key();
    let r = env
        .call(
            "wBroker",
            json!({"template": "tst", "op": "busy", "data": {"key": k}}),
        )
        .await;
    assert_eq!(r.code(), Some("UNAVAILABLE"), "{r:?}");
    assert!(r.error.as_ref().unwrap().retryable);
    let runs = env.sql(&format!("SELECT n FROM tst_counter WHERE k = '{k}'"));
    assert_eq!(runs.trim(), "3", "first attempt plus one per tier");
    let parked = env.drain_queue(&env.dlq("wBroker")).await;
    assert_eq!(parked.len(), 1, "the request is in the DLQ");
    let p = &parked[0].delivery;
    assert_eq!(
        header(&p.properties, "x-beds-error-code").as_deref(),
        Some("UNAVAILABLE")
    );
    assert!(
        String::from_utf8_lossy(&p.data).contains(&k),
        "original body kept"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fire_and_forget_failures_are_parked_not_dropped() {
    let env = TestEnv::start(Opts::default()).await;
    let json_props = BasicProperties::default().with_content_type("application/json".into());
    env.client()
        .send("rBroker", b"{not json", json_props.clone())
        .await
        .unwrap();
    env.client()
        .send(
            "rBroker",
            br#"{"template":"usr","op":"read","data":{"id":"x"}}"#,
            json_props.clone(),
        )
        .await
        .unwrap();
    // A good fire-and-forget request is executed and not parked.
    let k = key();
    let body =
        json!({"template": "tst", "op": "flaky", "data": {"key": k, "fail_times": 0}}).to_string();
    env.client()
        .send("wBroker", body.as_bytes(), json_props)
        .await
        .unwrap();
    let dlq = env.dlq("rBroker");
    eventually(10, "two parked messages", || async {
        env.queue_len(&dlq).await == 2
    })
    .await;
    let parked = env.drain_queue(&dlq).await;
    // Deliveries run concurrently: either may be parked first.
    let mut codes: Vec<_> = parked
        .iter()
        .map(|m| header(&m.delivery.properties, "x-beds-error-code").unwrap())
        .collect();
    codes.sort();
    assert_eq!(codes, ["BAD_PAYLOAD", "VALIDATION"]);
    eventually(10, "fire-and-forget write executed", || async {
        env.sql(&format!("SELECT COUNT(*) FROM tst_counter WHERE k = '{k}'"))
            .trim()
            == "1"
    })
    .await;
    assert_eq!(env.queue_len(&env.dlq("wBroker")).await, 0);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_requests_in_flight_loses_none() {
    let mut env = TestEnv::start(Opts {
        prefetch: 4,
        ..Default::default()
    })
    .await;
    // Replies go to a queue of the test's own so they survive the restart.
    let replies = common::reply_queue(&env.prefix).await;
    let n = 12;
    let k = key();
    for i in 0..n {
        let body = json!({"template": "tst", "op": "sleep", "data": {"ms": 300, "key": format!("{k}-{i}")}}).to_string();
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_reply_to(replies.clone().into())
            .with_correlation_id(format!("c{i}").into());
        env.client()
            .send("wBroker", body.as_bytes(), props)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    env.stop_node().await; // in flight: the first 4
    let done_before = env.sql(&format!(
        "SELECT COUNT(*) FROM tst_counter WHERE k LIKE '{k}-%'"
    ));
    let done_before: usize = done_before.trim().parse().unwrap();
    assert!(
        done_before >= 1 && done_before < n,
        "some were in flight, some waiting: {done_before}"
    );
    env.start_node().await;
    let got = consume_n(&replies, n, 30).await;
    assert_eq!(got.len(), n, "every request answered exactly once");
    let runs = env.sql(&format!(
        "SELECT SUM(n), MAX(n), COUNT(*) FROM tst_counter WHERE k LIKE '{k}-%'"
    ));
    assert_eq!(
        runs.trim(),
        format!("{n}\t1\t{n}"),
        "each executed exactly once"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cut_by_the_drain_timeout_go_back_without_strikes() {
    let mut env = TestEnv::start(Opts {
        drain_timeout_ms: 300,
        ..Default::default()
    })
    .await;
    let replies = common::reply_queue(&env.prefix).await;
    let k = key();
    let body =
        json!({"template": "tst", "op": "sleep", "data": {"ms": 6000, "key": k}}).to_string();
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_reply_to(replies.clone().into())
        .with_correlation_id("slow".into());
    env.client()
        .send("wBroker", body.as_bytes(), props)
        .await
        .unwrap();
    // Three stops in the middle of it: each cuts it at the drain timeout
    // (not when it would have ended) and returns it to the queue untouched.
    // Two strikes would quarantine it; a stop is not its fault.
    for round in 0..3 {
        let q = env.queue("wBroker");
        common::eventually(10, "the request is taken", || async {
            env.queue_len(&q).await == 0
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t0 = std::time::Instant::now();
        env.stop_node().await;
        // Drain timeout 0.3 s, plus at most 2 s for closing the pool whose
        // connection is still in the cut-off query.
        assert!(
            t0.elapsed() < Duration::from_millis(4000),
            "round {round}: the stop ended at the drain timeout, not with the request ({:?})",
            t0.elapsed()
        );
        assert_eq!(
            env.queue_len(&q).await,
            1,
            "round {round}: back in the queue"
        );
        env.start_node().await;
    }
    let got = consume_n(&replies, 1, 30).await;
    assert_eq!(got.len(), 1, "answered in the end");
    let reply: serde_json::Value = serde_json::from_slice(&got[0].data).unwrap();
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(
        env.queue_len(&env.dlq("wBroker")).await,
        0,
        "never quarantined"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_holds_requests_instead_of_flooding_the_dlq() {
    let proxy = Proxy::start(3306).await;
    let env = TestEnv::start(Opts {
        db_port: proxy.port,
        retry_tiers_ms: vec![100, 100],
        acquire_timeout_ms: 300,
        ..Default::default()
    })
    .await;
    let ok = env
        .call("rBroker", json!({"template": "usr", "op": "list"}))
        .await;
    assert!(ok.is_ok());

    proxy.set_down(true).await;
    // The first request to hit the outage takes the database down; it goes
    // to a retry tier; the rest wait in the hold queue until it is back.
    let opts = CallOptions {
        timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let client = env.client();
    let payloads: Vec<_> = (0..10)
        .map(|i| json!({"template": "usr", "op": "create", "data": {"name": "N", "email": format!("n{i}@outage.example")}}))
        .collect();
    let calls =
        futures::future::join_all(payloads.iter().map(|p| client.call("wBroker", p, &opts)));
    let restore = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            env.queue_len(&env.dlq("wBroker")).await,
            0,
            "nothing parked during the outage"
        );
        proxy.set_down(false).await;
    };
    let (replies, ()) = tokio::join!(calls, restore);
    for r in replies {
        let r = r.expect("reply after the outage");
        assert!(
            r.is_ok(),
            "every request succeeds once the database is back: {r:?}"
        );
    }
    assert_eq!(env.sql("SELECT COUNT(*) FROM usr").trim(), "10");
    assert_eq!(env.queue_len(&env.dlq("wBroker")).await, 0);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_outage_holds_its_requests_while_mariadb_flows() {
    let proxy = Proxy::start(common::mongo_port()).await;
    let env = TestEnv::start(Opts {
        mongo_port: proxy.port,
        retry_tiers_ms: vec![100, 100],
        ..Default::default()
    })
    .await;
    let first =
        json!({"template": "note", "op": "create", "data": {"user_id": 1, "title": "before"}});
    assert!(env.call("wBroker", first).await.is_ok());
    proxy.set_down(true).await;
    // Let the driver see the outage (its monitor's connection dropped), so
    // no write is sent on a connection that is already dead.
    tokio::time::sleep(Duration::from_secs(1)).await;
    common::notes_wait_out_an_outage(&env, 1, proxy.set_down(false)).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_held_midway_reports_its_finished_entries_when_it_expires() {
    let proxy = Proxy::start(common::mongo_port()).await;
    let env = TestEnv::start(Opts {
        mongo_port: proxy.port,
        ..Default::default()
    })
    .await;
    assert!(env
        .call(
            "wBroker",
            json!({"template": "note", "op": "create", "data": {"user_id": 8, "title": "warm"}})
        )
        .await
        .is_ok());
    // MongoDB goes away; nothing has noticed yet. The batch's MariaDB entry
    // runs, its MongoDB entry finds the database gone, and the rest of the
    // batch is held with the first entry's result. Its deadline passes
    // while it waits.
    proxy.set_down(true).await;
    let opts = CallOptions {
        timeout: Duration::from_secs(30),
        deadline_ms: Some(chrono::Utc::now().timestamp_millis() + 5_000),
        ..Default::default()
    };
    let batch = json!({"batch": [
        {"template": "usr", "op": "create", "data": {"name": "B", "email": "b@held.example"}},
        {"template": "note", "op": "create", "data": {"user_id": 8, "title": "late"}},
    ]});
    let r = env
        .client()
        .call("wBroker", &batch, &opts)
        .await
        .expect("answered when its deadline passed");
    let results = r.results.clone().expect("a batch reply, entry by entry");
    assert!(
        results[0].is_ok(),
        "the entry that ran is reported as run: {r:?}"
    );
    assert_eq!(
        results[1].error.as_ref().map(|e| e.code.as_str()),
        Some("EXPIRED"),
        "{r:?}"
    );
    assert_eq!(
        env.sql("SELECT COUNT(*) FROM usr WHERE email = 'b@held.example'")
            .trim(),
        "1"
    );
    proxy.set_down(false).await;
    assert_eq!(
        env.queue_len(&env.dlq("wBroker")).await,
        0,
        "nothing parked"
    );
    env.finish().await;
}

fn signal(child: &tokio::process::Child, sig: &str) {
    std::process::Command::new("kill")
        .args([sig, &child.id().unwrap().to_string()])
        .status()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let (mut child, _debris, prefix, _log) = common::spawn_node("sig", &[]).await;
    let client = beds::client::Client::connect(common::AMQP_URL, &prefix)
        .await
        .unwrap();
    // A request in flight when SIGTERM arrives is finished, not dropped.
    let slow = json!({"template": "tst", "op": "sleep", "data": {"ms": 700, "key": key()}});
    let opts = CallOptions::default();
    let call = client.call("wBroker", &slow, &opts);
    let term = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        signal(&child, "-TERM");
    };
    let (reply, ()) = tokio::join!(call, term);
    assert!(reply.expect("answered during the drain").is_ok());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_cuts_the_drain_short() {
    let (mut child, _debris, prefix, _log) = common::spawn_node("sig2", &[]).await;
    let client = beds::client::Client::connect(common::AMQP_URL, &prefix)
        .await
        .unwrap();
    let slow = json!({"template": "tst", "op": "sleep", "data": {"ms": 5000, "key": key()}});
    let body = slow.to_string();
    let props = BasicProperties::default().with_content_type("application/json".into());
    client
        .send("wBroker", body.as_bytes(), props)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&child, "-TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal(&child, "-INT");
    let status = tokio::time::timeout(Duration::from_secs(3), child.wait())
        .await
        .expect("exits well before the 5 s request would finish")
        .unwrap();
    assert_eq!(status.code(), Some(1));
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_work_end_to_end() {
    let env = TestEnv::start(Opts {
        queue_type: "quorum",
        ..Default::default()
    })
    .await;
    let k = key();
    let r = env
        .call(
            "wBroker",
            json!({"template": "tst", "op": "flaky", "data": {"key": k, "fail_times": 1}}),
        )
        .await;
    assert!(r.is_ok(), "retry tiers work on quorum queues: {r:?}");
    // The declared arguments, as RabbitMQ holds them. rabbitmqctl needs the
    // node's Erlang cookie, which the test setup (root, local RabbitMQ) has;
    // without it this fails instead of passing unchecked.
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "name", "type", "arguments"])
        .output()
        .expect("rabbitmqctl must be installed to check the queue arguments");
    assert!(
        out.status.success(),
        "rabbitmqctl list_queues failed (run the tests as a user with RabbitMQ's Erlang cookie): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{}\t", env.queue("wBroker"))))
        .unwrap_or_default()
        .to_string();
    assert!(line.contains("quorum"), "{line}");
    assert!(line.contains("x-delivery-limit"), "{line}");
    assert!(
        line.contains(&env.dlq("wBroker")),
        "over the limit goes to the DLQ: {line}"
    );
    env.finish().await;
}

/// Sends a parked message back to `broker` (what an operator's shovel
/// does), with its reply going to a queue of the test's own; returns the
/// reply.
async fn replay(env: &TestEnv, broker: &str, parked: &BasicGetMessage) -> serde_json::Value {
    let replies = common::reply_queue(&env.prefix).await;
    let props = parked
        .delivery
        .properties
        .clone()
        .with_reply_to(replies.clone().into());
    env.client()
        .send(broker, &parked.delivery.data, props)
        .await
        .unwrap();
    let got = consume_n(&replies, 1, 15).await;
    assert_eq!(got.len(), 1, "the replay is answered");
    serde_json::from_slice(&got[0].data).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_parked_write_runs_again_with_fresh_tiers() {
    let env = TestEnv::start(Opts {
        retry_tiers_ms: vec![100, 100],
        ..Default::default()
    })
    .await;
    let k = key();
    // Fails 4 times: 3 attempts, parked; the replay fails once more, then
    // succeeds on its first retry tier.
    let q = json!({"template": "tst", "op": "flaky", "data": {"key": k, "fail_times": 4}});
    let opts = CallOptions {
        message_id: Some(format!("m-{k}")),
        ..Default::default()
    };
    let r = env.call_opts("wBroker", q, opts).await;
    assert_eq!(r.code(), Some("UNAVAILABLE"));
    let parked = env.drain_queue(&env.dlq("wBroker")).await;
    assert_eq!(parked.len(), 1);
    let reply = replay(&env, "wBroker", &parked[0]).await;
    assert_eq!(
        reply["status"], "ok",
        "the replay executed, not answered from dedup: {reply}"
    );
    assert_eq!(reply["data"][0]["attempts"], 5);
    assert_eq!(env.queue_len(&env.dlq("wBroker")).await, 0);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_batch_replay_resumes_where_it_stopped() {
    let env = TestEnv::start(Opts {
        retry_tiers_ms: vec![100],
        ..Default::default()
    })
    .await;
    let (k, e) = (key(), format!("{}@batch.example", key()));
    let r = env
        .call(
            "wBroker",
            json!({"batch": [
                {"template": "usr", "op": "create", "data": {"name": "P", "email": e}},
                {"template": "tst", "op": "flaky", "data": {"key": k, "fail_times": 2}},
            ]}),
        )
        .await;
    let res = r.results.unwrap();
    assert!(res[0].is_ok());
    assert_eq!(res[1].code(), Some("UNAVAILABLE"));
    let parked = env.drain_queue(&env.dlq("wBroker")).await;
    assert_eq!(
        parked.len(),
        1,
        "a batch that ran out of tiers is parked even with a reply_to"
    );
    let reply = replay(&env, "wBroker", &parked[0]).await;
    assert_eq!(reply["results"][0]["status"], "ok", "{reply}");
    assert_eq!(
        reply["results"].as_array().unwrap().len(),
        1,
        "only the kept entry ran: {reply}"
    );
    assert_eq!(
        env.sql("SELECT COUNT(*) FROM usr").trim(),
        "1",
        "the finished entry did not run again"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_cut_off_mid_flight_is_parked_never_retried() {
    let proxy = Proxy::start(3306).await;
    let env = TestEnv::start(Opts {
        db_port: proxy.port,
        retry_tiers_ms: vec![100, 100],
        ..Default::default()
    })
    .await;
    let k = key();
    let call = env.call(
        "wBroker",
        json!({"template": "tst", "op": "sleep", "data": {"ms": 1500, "key": k}}),
    );
    let cut = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        proxy.set_down(true).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        proxy.set_down(false).await;
    };
    let (r, ()) = tokio::join!(call, cut);
    assert_eq!(r.code(), Some("INTERNAL"), "{r:?}");
    assert!(
        r.error.as_ref().unwrap().message.contains("may or may not"),
        "{r:?}"
    );
    let parked = env.drain_queue(&env.dlq("wBroker")).await;
    assert_eq!(parked.len(), 1, "an unknown outcome is parked for a person");
    // However long we wait, it never runs a second time.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = env.sql(&format!(
        "SELECT COALESCE(MAX(n), 0) FROM tst_counter WHERE k = '{k}'"
    ));
    assert!(n.trim() == "0" || n.trim() == "1", "ran {n} times");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parking_into_a_deleted_dlq_keeps_the_message() {
    let env = TestEnv::start(Opts::default()).await;
    let conn = common::amqp().await;
    let ch = conn.create_channel().await.unwrap();
    let dlq = env.dlq("rBroker");
    ch.queue_delete(dlq.as_str().into(), Default::default())
        .await
        .unwrap();
    let json_props = BasicProperties::default().with_content_type("application/json".into());
    env.client()
        .send("rBroker", b"{broken", json_props)
        .await
        .unwrap();
    // It cannot be parked, so it is not acknowledged either.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(dlq.as_str().into(), durable, FieldTable::default())
        .await
        .unwrap();
    eventually(10, "parked once the DLQ is back", || async {
        env.queue_len(&dlq).await == 1
    })
    .await;
    let _ = conn.close(200, "".into()).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_client_input_still_parks_within_one_frame() {
    let env = TestEnv::start(Opts::default()).await;
    // A 60 KB field name is echoed in the error message; parking copies
    // the message and adds that message as a header.
    let body = format!(
        r#"{{"template":"usr","op":"read","data":{{"{}":1}}}}"#,
        "k".repeat(60_000)
    );
    let mut headers = FieldTable::default();
    headers.insert(
        "x-client".into(),
        AMQPValue::LongString("v".repeat(60_000).into()),
    );
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(headers);
    env.client()
        .send("rBroker", body.as_bytes(), props)
        .await
        .unwrap();
    let dlq = env.dlq("rBroker");
    eventually(10, "parked", || async { env.queue_len(&dlq).await == 1 }).await;
    let parked = env.drain_queue(&dlq).await;
    let msg = header(&parked[0].delivery.properties, "x-beds-error-message").unwrap();
    assert!(
        msg.len() <= 1024,
        "error message bounded: {} bytes",
        msg.len()
    );
    assert_eq!(
        header(&parked[0].delivery.properties, "x-beds-error-code").as_deref(),
        Some("VALIDATION")
    );
    assert_eq!(parked[0].delivery.data.len(), body.len(), "body kept whole");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_skip_a_down_replica_without_pausing_the_node() {
    let replica = Proxy::start(3306).await;
    let env = TestEnv::start(Opts {
        replica_port: Some(replica.port),
        ..Default::default()
    })
    .await;
    let read = json!({"template": "usr", "op": "list"});
    assert!(env.call("rBroker", read.clone()).await.is_ok());
    assert!(
        replica.accepted.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "reads use the replica"
    );

    replica.set_down(true).await;
    // The first read finds the replica down and falls back to the primary.
    assert!(env.call("rBroker", read.clone()).await.is_ok());
    let before = replica.accepted.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..20 {
        assert!(env.call("rBroker", read.clone()).await.is_ok());
    }
    let tried = replica.accepted.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(
        tried < 10,
        "a down replica is skipped, not tried per read ({tried} attempts)"
    );
    // Writes never noticed: the primary is fine, nothing paused or parked.
    let w = json!({"template": "usr", "op": "create", "data": {"name": "R", "email": format!("{}@replica.example", key())}});
    assert!(env.call("wBroker", w).await.is_ok());
    assert_eq!(env.queue_len(&env.dlq("rBroker")).await, 0);

    replica.set_down(false).await;
    let back = replica.accepted.load(std::sync::atomic::Ordering::SeqCst);
    eventually(15, "reads return to the replica", || async {
        env.call("rBroker", read.clone()).await.is_ok()
            && replica.accepted.load(std::sync::atomic::Ordering::SeqCst) > back
    })
    .await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_parked_batch_keeps_its_verified_caller() {
    let env = TestEnv::start(Opts {
        retry_tiers_ms: vec![100],
        ..Default::default()
    })
    .await;
    let k = key();
    // Only user "guest" may use template gst; the batch fails twice (every
    // tier), is parked with a rewritten body, and is replayed.
    let batch = json!({"batch": [
        {"template": "gst", "op": "read", "data": {"id": 1}},
        {"template": "gst", "op": "flaky", "data": {"key": k, "fail_times": 2}},
    ]});
    let opts = CallOptions {
        user_id: Some("guest".into()),
        ..Default::default()
    };
    let r = env.call_opts("wBroker", batch, opts).await;
    let res = r.results.unwrap();
    assert_eq!(res[0].code(), Some("WRONG_BROKER"), "a read on wBroker");
    assert_eq!(res[1].code(), Some("UNAVAILABLE"));
    let parked = env.drain_queue(&env.dlq("wBroker")).await;
    assert_eq!(parked.len(), 1);
    assert!(
        parked[0].delivery.properties.user_id().is_none(),
        "identity travels signed, not as user_id"
    );
    let reply = replay(&env, "wBroker", &parked[0]).await;
    assert_eq!(
        reply["results"][0]["status"], "ok",
        "still guest after the rewrite: {reply}"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_leaves_no_dead_connection_in_use() {
    // The retry tier is longer than the call timeout: a request that hit a
    // dead pooled connection and had to be retried would not be answered.
    let proxy = Proxy::start(3306).await;
    let env = TestEnv::start(Opts {
        db_port: proxy.port,
        retry_tiers_ms: vec![60_000],
        ..Default::default()
    })
    .await;
    let opts = CallOptions {
        timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let client = env.client();
    let list = json!({"template": "usr", "op": "list"});
    // Several pooled connections, then all of them killed: a restart.
    let warm =
        futures::future::join_all((0..8).map(|_| client.call("rBroker", &list, &opts))).await;
    assert!(warm.iter().all(|r| r.as_ref().is_ok_and(|r| r.is_ok())));
    proxy.set_down(true).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.set_down(false).await;
    tokio::time::sleep(Duration::from_millis(400)).await;

    let create = |i: usize| json!({"template": "usr", "op": "create", "data": {"name": "R", "email": format!("r{i}@restart.example")}});
    let atomic = json!({"atomic": true, "batch": [create(100), create(101)]});
    let batch = json!({"batch": [create(200), create(201)]});
    // First alone: a transaction starts on whatever the pool hands out.
    let a = client.call("wBroker", &atomic, &opts).await;
    let creates: Vec<_> = (0..4).map(create).collect();
    let (reads, writes, b) = tokio::join!(
        futures::future::join_all((0..8).map(|_| client.call("rBroker", &list, &opts))),
        futures::future::join_all(creates.iter().map(|p| client.call("wBroker", p, &opts))),
        client.call("wBroker", &batch, &opts),
    );
    for r in [a, b].into_iter().chain(reads).chain(writes) {
        let r = r.expect("answered without a retry");
        assert!(r.is_ok(), "{r:?}");
    }
    assert_eq!(env.sql("SELECT COUNT(*) FROM usr").trim(), "8");
    assert_eq!(
        env.queue_len(&env.dlq("wBroker")).await,
        0,
        "nothing parked"
    );
    env.finish().await;
}
