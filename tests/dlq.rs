//! `beds dlq` against real RabbitMQ, MariaDB and a node: writes are parked
//! by an outage of one procedure (`tst_gated` fails retryably while
//! `tst_gate` holds a row, so they run out of retry tiers), then listed,
//! shown, replayed and purged with the real binary.

mod common;

use std::path::Path;
use std::time::Duration;

use beds::client::CallOptions;
use common::{eventually, Opts, TestEnv};
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::{json, Value};

/// Runs `beds dlq <args>` on the config in `dir`: (exit code, stdout,
/// stderr).
async fn dlq(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_beds"))
        .arg("--config-dir")
        .arg(dir.join("config"))
        .arg("dlq")
        .args(args)
        .env("BEDS_ENV", "dev")
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `beds dlq <args> --json`, which must succeed; its output parsed.
async fn dlq_json(dir: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, out, err) = dlq(dir, &all).await;
    assert_eq!(code, 0, "beds dlq {args:?}: {out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn gate(env: &TestEnv, closed: bool) {
    env.sql(if closed {
        "INSERT IGNORE INTO tst_gate VALUES (1)"
    } else {
        "DELETE FROM tst_gate"
    });
}

/// Rows `tst_gated` wrote for `key`.
fn applied(env: &TestEnv, key: &str) -> String {
    env.sql(&format!(
        "SELECT COUNT(*) FROM tst_applied WHERE k = '{key}'"
    ))
    .trim()
    .to_string()
}

/// A write that runs out of tiers while the gate is closed: answered
/// UNAVAILABLE and parked. Returns its key (also in its message id).
async fn park_write(env: &TestEnv, tag: &str) -> String {
    let key = format!("{tag}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let opts = CallOptions {
        message_id: Some(format!("m-{key}")),
        ..Default::default()
    };
    let r = env
        .call_opts(
            "wBroker",
            json!({"template": "tst", "op": "gated", "data": {"key": key}}),
            opts,
        )
        .await;
    assert_eq!(r.code(), Some("UNAVAILABLE"), "{r:?}");
    key
}

/// A fire-and-forget request with this body: parked whatever fails.
async fn park_raw(env: &TestEnv, body: &[u8]) {
    let props = BasicProperties::default().with_content_type("application/json".into());
    env.client().send("wBroker", body, props).await.unwrap();
}

/// Every message now in `queue` (properties and body), left in place.
async fn snapshot(queue: &str) -> Vec<(BasicProperties, Vec<u8>)> {
    let conn = common::amqp().await;
    let ch = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
    {
        out.push((m.delivery.properties.clone(), m.delivery.data.clone()));
    }
    // Closing returns them all, in order (a classic queue).
    let _ = conn.close(200, "".into()).await;
    out
}

/// Publishes messages into `queue` as they are (what a careless operator's
/// shovel does: the same request parked twice).
async fn put_back(queue: &str, msgs: &[(BasicProperties, Vec<u8>)]) {
    let conn = common::amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    for (p, body) in msgs {
        ch.basic_publish("".into(), queue.into(), Default::default(), body, p.clone())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let _ = conn.close(200, "".into()).await;
}

fn ids(list: &Value) -> Vec<String> {
    list["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message_id"].as_str().unwrap_or("-").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_show_and_group_leave_the_dlq_untouched() {
    let env = TestEnv::start(Opts::default()).await;
    let dlq_name = env.dlq("wBroker");
    gate(&env, true);
    let mut keys = Vec::new();
    for i in 0..3 {
        keys.push(park_write(&env, &format!("l{i}")).await);
    }
    park_raw(&env, br#"{"template":"tst","op":"gated","data":{}}"#).await;
    park_raw(&env, b"this is { not JSON").await;
    eventually(10, "five parked", || async {
        env.queue_len(&dlq_name).await == 5
    })
    .await;
    let dir = env.dir.clone();

    let (code, out, err) = dlq(&dir, &["list", "wBroker"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("5 message(s)"), "{out}");
    for k in &keys {
        assert!(out.contains(&format!("m-{k}")), "{k} listed: {out}");
    }
    assert!(
        out.contains("tst.gated") && out.contains("(not JSON)"),
        "{out}"
    );
    assert!(
        out.contains("UNAVAILABLE") && out.contains("BAD_PAYLOAD"),
        "{out}"
    );
    assert_eq!(env.queue_len(&dlq_name).await, 5, "list removed nothing");

    // Order and content survive any number of reads.
    let first = dlq_json(&dir, &["list", "wBroker"]).await;
    let second = dlq_json(&dir, &["list", "wBroker"]).await;
    assert_eq!(ids(&first), ids(&second));
    let expect: Vec<String> = keys.iter().map(|k| format!("m-{k}")).collect();
    assert_eq!(ids(&first)[..3], expect[..], "oldest first");
    let m0 = &first["messages"][0];
    assert_eq!(m0["code"], "UNAVAILABLE");
    assert_eq!(
        m0["node"],
        env.prefix.as_str(),
        "x-beds-node names the node"
    );
    assert_eq!(m0["ops"], json!(["tst.gated"]));
    assert!(m0["parked_at_ms"].as_i64().unwrap() > 0, "{m0}");
    assert!(
        m0["error"].as_str().unwrap().contains("gave up after"),
        "{m0}"
    );

    let groups = dlq_json(&dir, &["list", "wBroker", "--group-by", "code"]).await;
    assert_eq!(
        groups["groups"],
        json!({"UNAVAILABLE": 3, "VALIDATION": 1, "BAD_PAYLOAD": 1}),
        "{groups}"
    );
    let (code, out, _) = dlq(&dir, &["list", "wBroker", "--group-by", "node"]).await;
    assert_eq!(code, 0);
    assert!(out.contains(&env.prefix) && out.contains('5'), "{out}");
    let some = dlq_json(&dir, &["list", "wBroker", "--filter", "code=UNAVAILABLE"]).await;
    assert_eq!(ids(&some), expect);

    // One message in full; a body that is not JSON is shown as text.
    let (code, out, err) = dlq(&dir, &["show", "wBroker", "1"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("x-beds-error-code: UNAVAILABLE"), "{out}");
    assert!(
        out.contains(&format!("\"key\": \"{}\"", keys[0])),
        "pretty body: {out}"
    );
    // The two fire-and-forget requests may be parked in either order.
    let junk = first["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["body_problem"].is_string())
        .expect("the junk is listed")["n"]
        .to_string();
    let shown = dlq_json(&dir, &["show", "wBroker", &junk]).await;
    assert_eq!(shown["body"]["text"], "this is { not JSON", "{shown}");
    assert!(shown["body"]["problem"]
        .as_str()
        .unwrap()
        .contains("not JSON"));
    let (code, _, err) = dlq(&dir, &["show", "wBroker", "6"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("no message 6"), "{err}");

    assert_eq!(env.queue_len(&dlq_name).await, 5, "nothing removed");
    assert_eq!(
        ids(&dlq_json(&dir, &["list", "wBroker"]).await),
        ids(&first)
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_applies_each_parked_write_exactly_once() {
    let mut env = TestEnv::start(Opts::default()).await;
    let dlq_name = env.dlq("wBroker");
    let dir = env.dir.clone();
    gate(&env, true);
    let mut keys = Vec::new();
    for i in 0..3 {
        keys.push(park_write(&env, &format!("r{i}")).await);
    }
    park_raw(&env, b"not JSON").await;
    eventually(10, "four parked", || async {
        env.queue_len(&dlq_name).await == 4
    })
    .await;
    for k in &keys {
        assert_eq!(applied(&env, k), "0");
    }
    let parked = snapshot(&dlq_name).await;
    assert_eq!(parked.len(), 4);

    // A dry run changes nothing.
    let dry = dlq_json(
        &dir,
        &["replay", "wBroker", "--filter", "op=gated", "--dry-run"],
    )
    .await;
    assert_eq!(dry["would_replay"], 3, "{dry}");
    assert_eq!(dry["replayed"], 0);
    assert_eq!(dry["messages"][3]["status"], "skipped");
    assert_eq!(env.queue_len(&dlq_name).await, 4);
    gate(&env, false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for k in &keys {
        assert_eq!(applied(&env, k), "0", "a dry run applies nothing");
    }

    // The oldest two, with the answers.
    let (code, out, err) = dlq(
        &dir,
        &[
            "replay",
            "wBroker",
            "--filter",
            "code=UNAVAILABLE",
            "--limit",
            "2",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches("replayed → ok: applied").count(), 2, "{out}");
    assert!(out.contains("kept (over --limit)"), "{out}");
    assert!(out.contains("kept (not selected)"), "{out}");
    assert_eq!(applied(&env, &keys[0]), "1");
    assert_eq!(applied(&env, &keys[1]), "1");
    assert_eq!(applied(&env, &keys[2]), "0");
    let left = dlq_json(&dir, &["list", "wBroker"]).await;
    assert_eq!(
        ids(&left),
        vec![format!("m-{}", keys[2]), "-".to_string()],
        "the rest stay, in order"
    );

    // The rest, fire and forget: nothing left parked.
    let (code, out, err) = dlq(
        &dir,
        &["replay", "wBroker", "--filter", "op=gated", "--no-wait"],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("answer not awaited"), "{out}");
    eventually(10, "the third applied", || async {
        applied(&env, &keys[2]) == "1"
    })
    .await;
    assert_eq!(env.queue_len(&dlq_name).await, 1, "only the junk is left");

    // The same three parked again (copies put back), replayed against a
    // restarted node: its dedup memory is gone, the inbox answers them.
    env.stop_node().await;
    env.start_node().await;
    put_back(
        &dlq_name,
        &parked
            .iter()
            .filter(|(p, _)| p.message_id().is_some())
            .cloned()
            .collect::<Vec<_>>(),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let again = dlq_json(&dir, &["replay", "wBroker", "--filter", "template=tst"]).await;
    assert_eq!(again["replayed"], 3, "{again}");
    for m in again["messages"].as_array().unwrap() {
        if m["message_id"].is_string() {
            assert_eq!(m["answer"]["status"], "repeat", "{m}");
        } else {
            assert_eq!(m["status"], "skipped", "{m}");
        }
    }
    for k in &keys {
        assert_eq!(applied(&env, k), "1", "{k} applied exactly once");
    }
    assert_eq!(
        env.sql("SELECT COUNT(*) FROM tst_applied").trim(),
        "3",
        "nothing else ran"
    );
    assert_eq!(env.queue_len(&dlq_name).await, 1);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_fails_again_is_parked_again_and_reported() {
    let env = TestEnv::start(Opts {
        retry_tiers_ms: vec![100],
        ..Default::default()
    })
    .await;
    let dlq_name = env.dlq("wBroker");
    gate(&env, true);
    let key = park_write(&env, "again").await;
    let (code, out, _) = dlq(&env.dir, &["replay", "wBroker"]).await;
    assert_eq!(code, 1, "an error answer is not a success: {out}");
    assert!(out.contains("error UNAVAILABLE"), "{out}");
    eventually(10, "parked again", || async {
        env.queue_len(&dlq_name).await == 1
    })
    .await;
    let list = dlq_json(&env.dir, &["list", "wBroker"]).await;
    assert_eq!(
        list["messages"][0]["replayed"], 1,
        "the marker survives: {list}"
    );
    assert_eq!(list["messages"][0]["message_id"], format!("m-{key}"));
    gate(&env, false);
    let (code, out, _) = dlq(&env.dir, &["replay", "wBroker"]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(applied(&env, &key), "1");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_needs_yes_and_removes_only_matching_messages() {
    let env = TestEnv::start(Opts::default()).await;
    let dlq_name = env.dlq("wBroker");
    let dir = env.dir.clone();
    gate(&env, true);
    let a = park_write(&env, "pa").await;
    park_raw(&env, br#"{"template":"tst","op":"gated","data":{}}"#).await;
    let b = park_write(&env, "pb").await;
    eventually(10, "three parked", || async {
        env.queue_len(&dlq_name).await == 3
    })
    .await;

    let (code, _, err) = dlq(&dir, &["purge", "wBroker", "--filter", "code=VALIDATION"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(env.queue_len(&dlq_name).await, 3, "nothing removed");

    let (code, out, err) = dlq(
        &dir,
        &["purge", "wBroker", "--filter", "code=VALIDATION", "--yes"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("purged 1 of 3"), "{out}");
    let left = dlq_json(&dir, &["list", "wBroker"]).await;
    assert_eq!(ids(&left), vec![format!("m-{a}"), format!("m-{b}")]);

    let (code, out, _) = dlq(&dir, &["purge", "wBroker", "--yes"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("purged 2 of 2"), "{out}");
    assert_eq!(env.queue_len(&dlq_name).await, 0);
    env.finish().await;
}

/// Found on RabbitMQ 3.10: every `basic.nack` with requeue from a quorum
/// queue counts a delivery, and past its delivery limit the message is
/// dropped (RabbitMQ 4.0 to 4.2 set that limit to 20 by default). A DLQ read
/// by get-and-requeue would empty itself after enough reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_requeue_counts_deliveries_and_drops_past_the_limit() {
    let q = common::unique("qq_probe");
    let conn = common::amqp().await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-delivery-limit".into(),
        lapin::types::AMQPValue::LongLongInt(2),
    );
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    put_back(&q, &[(BasicProperties::default(), b"m".to_vec())]).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let Some(m) = ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
        else {
            break;
        };
        let count = m
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count").cloned());
        seen.push(format!("{count:?}"));
        m.delivery
            .acker
            .nack(lapin::options::BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await
            .unwrap();
    }
    let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    let _ = conn.close(200, "".into()).await;
    assert_eq!(
        seen.len(),
        3,
        "read 3 times (deliveries 0, 1, 2), then gone: {seen:?}"
    );
}

/// Sets a RabbitMQ policy for the test and clears it when dropped.
struct Policy(String);

impl Policy {
    fn set(name: &str, pattern: &str, definition: &str) -> Policy {
        let out = std::process::Command::new("rabbitmqctl")
            .args(["set_policy", "--apply-to", "queues", "--priority", "100"])
            .args([name, pattern, definition])
            .output()
            .expect("rabbitmqctl must be installed");
        assert!(
            out.status.success(),
            "rabbitmqctl set_policy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Policy(name.to_string())
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["clear_policy", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_dlq_survives_any_number_of_reads() {
    let env = TestEnv::start(Opts {
        queue_type: "quorum",
        ..Default::default()
    })
    .await;
    let dlq_name = env.dlq("wBroker");
    let dir = env.dir.clone();
    gate(&env, true);
    let keys = [park_write(&env, "q0").await, park_write(&env, "q1").await];
    eventually(10, "two parked", || async {
        env.queue_len(&dlq_name).await == 2
    })
    .await;
    // RabbitMQ 4's default limit of 20, made small: two returns would drop.
    let _policy = Policy::set(
        &format!("{}-limit", env.prefix),
        &format!("^{}$", regex_escape(&dlq_name)),
        r#"{"delivery-limit": 1}"#,
    );
    let expect: Vec<String> = keys.iter().map(|k| format!("m-{k}")).collect();
    for _ in 0..4 {
        let list = dlq_json(&dir, &["list", "wBroker"]).await;
        assert_eq!(ids(&list), expect, "{list}");
        for m in list["messages"].as_array().unwrap() {
            assert!(
                m["delivery_count"].is_null() || m["delivery_count"] == 0,
                "read as a fresh copy every time: {m}"
            );
        }
    }
    let (code, _, _) = dlq(&dir, &["show", "wBroker", "2"]).await;
    assert_eq!(code, 0);
    let dry = dlq_json(&dir, &["replay", "wBroker", "--dry-run"]).await;
    assert_eq!(dry["would_replay"], 2);
    assert_eq!(env.queue_len(&dlq_name).await, 2, "nothing lost");

    gate(&env, false);
    let done = dlq_json(&dir, &["replay", "wBroker"]).await;
    assert_eq!(done["replayed"], 2, "{done}");
    for k in &keys {
        assert_eq!(applied(&env, k), "1");
    }
    assert_eq!(env.queue_len(&dlq_name).await, 0);
    env.finish().await;
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                vec![c]
            } else {
                vec!['\\', c]
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_64_and_an_unreachable_rabbitmq_69() {
    let debris = common::Debris::new("dlq_usage");
    common::write_config(
        &debris.dir,
        &debris.prefix,
        &debris.prefix,
        &Opts::default(),
    );
    let dir = debris.dir.clone();
    let (code, _, err) = dlq(&dir, &["list", "nosuchBroker"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("unknown broker \"nosuchBroker\"") && err.contains("wBroker"),
        "{err}"
    );
    let (code, _, err) = dlq(&dir, &["list", "wBroker", "--filter", "colour"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("expected key=value"), "{err}");
    let (code, _, err) = dlq(&dir, &["replay", "wBroker", "--filter", "size=3"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("unknown key"), "{err}");
    let (code, _, err) = dlq(&dir, &["purge", "wBroker"]).await;
    assert_eq!(code, 64, "{err}");
    // No node ran with this prefix: its DLQ does not exist.
    let (code, _, err) = dlq(&dir, &["list", "wBroker"]).await;
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("does not exist"), "{err}");

    let cfg = dir.join("config/beds.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replacen("[amqp]\n", "[amqp]\nport = 1\n", 1)).unwrap();
    let (code, _, err) = dlq(&dir, &["list", "wBroker"]).await;
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("cannot connect to RabbitMQ"), "{err}");
}

/// A parked copy carries its caller as the node's signed header, not as
/// `user_id` (RabbitMQ would refuse that from the CLI's user); replayed
/// with the body unchanged, the signature still verifies and the request
/// runs as its caller: template `gst` allows only `guest`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_write_keeps_its_verified_caller() {
    let env = TestEnv::start(Opts::default()).await;
    let key = uuid::Uuid::new_v4().simple().to_string();
    let opts = CallOptions {
        user_id: Some("guest".into()),
        message_id: Some(format!("m-{key}")),
        ..Default::default()
    };
    // Three attempts (first + two tiers) fail, the fourth succeeds.
    let r = env
        .call_opts(
            "wBroker",
            json!({"template": "gst", "op": "flaky", "data": {"key": key, "fail_times": 3}}),
            opts,
        )
        .await;
    assert_eq!(r.code(), Some("UNAVAILABLE"), "{r:?}");
    let shown = dlq_json(&env.dir, &["show", "wBroker", "1"]).await;
    assert!(shown["properties"]["user_id"].is_null(), "{shown}");
    assert_eq!(shown["headers"]["x-beds-user-id"], "guest", "{shown}");
    let done = dlq_json(&env.dir, &["replay", "wBroker"]).await;
    assert_eq!(
        done["messages"][0]["answer"]["status"], "ok",
        "not FORBIDDEN: {done}"
    );
    assert_eq!(
        env.sql(&format!("SELECT n FROM tst_counter WHERE k = '{key}'"))
            .trim(),
        "4"
    );
    env.finish().await;
}
