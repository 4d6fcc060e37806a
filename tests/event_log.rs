//! The event log (CONTRACT §7) against the real servers: what each request
//! leaves in `msLogs`, lineage, batches and fire-and-forget, a stop with
//! events still in memory, and `beds logs`.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use beds::client::CallOptions;
use common::{Opts, TestEnv};
use lapin::BasicProperties;
use mongodb::bson::{doc, Document};
use serde_json::json;

/// The event log's documents by `_id`, waiting until every id in `ids` is
/// there (panics after 20 s naming the missing ones).
async fn events(db: &str, ids: &[String]) -> HashMap<String, Document> {
    let coll = common::mongo()
        .await
        .database(db)
        .collection::<Document>("msLogs");
    let t0 = std::time::Instant::now();
    loop {
        let mut found = HashMap::new();
        let mut c = coll.find(doc! {"_id": {"$in": ids}}).await.unwrap();
        while c.advance().await.unwrap() {
            let d = c.deserialize_current().unwrap();
            found.insert(d.get_str("_id").unwrap().to_string(), d);
        }
        if found.len() == ids.len() {
            return found;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let missing: Vec<_> = ids.iter().filter(|i| !found.contains_key(*i)).collect();
            panic!("events never logged: {missing:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn count(db: &str, filter: Document) -> u64 {
    common::mongo()
        .await
        .database(db)
        .collection::<Document>("msLogs")
        .count_documents(filter)
        .await
        .unwrap()
}

fn s<'a>(d: &'a Document, k: &str) -> Option<&'a str> {
    d.get_str(k).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_and_error_code_is_logged_with_its_fields() {
    let env = TestEnv::start(Opts::default()).await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let email = format!("{}@log.test", env.db);
    let create = json!({"template": "usr", "op": "create", "data": {"name": "L", "email": email}});
    // (broker, payload, options, expected code)
    let cases: Vec<(&str, serde_json::Value, CallOptions, Option<&str>)> = vec![
        (
            "wBroker",
            create.clone(),
            CallOptions {
                message_id: Some("log-1".into()),
                ..Default::default()
            },
            None,
        ),
        (
            "wBroker",
            create.clone(),
            CallOptions::default(),
            Some("CONFLICT"),
        ),
        (
            "rBroker",
            json!({"template": "nope", "op": "read", "data": {}}),
            CallOptions::default(),
            Some("UNKNOWN_TEMPLATE"),
        ),
        (
            "rBroker",
            json!({"template": "usr", "op": "nope", "data": {}}),
            CallOptions::default(),
            Some("UNKNOWN_OPERATION"),
        ),
        (
            "wBroker",
            json!({"template": "usr", "op": "read", "data": {"id": 1}}),
            CallOptions::default(),
            Some("WRONG_BROKER"),
        ),
        (
            "wBroker",
            json!({"template": "usr", "op": "create", "data": {"name": "x"}}),
            CallOptions::default(),
            Some("VALIDATION"),
        ),
        (
            "rBroker",
            json!({"template": "sec", "op": "read", "data": {"id": 1}}),
            CallOptions::default(),
            Some("FORBIDDEN"),
        ),
        (
            "rBroker",
            json!({"template": "usr", "op": "read", "data": {"id": 987654321}}),
            CallOptions::default(),
            Some("NOT_FOUND"),
        ),
        (
            "wBroker",
            json!({"template": "tst", "op": "busy", "data": {"key": env.db}}),
            CallOptions::default(),
            Some("UNAVAILABLE"),
        ),
        (
            "mBroker",
            json!({"template": "tst", "op": "reject", "data": {}}),
            CallOptions::default(),
            Some("INTERNAL"),
        ),
        (
            "rBroker",
            json!({"template": "usr", "op": "read", "data": {"id": 1}}),
            CallOptions {
                deadline_ms: Some(1),
                ..Default::default()
            },
            Some("EXPIRED"),
        ),
    ];
    let mut ids = Vec::new();
    for (broker, payload, opts, code) in &cases {
        let r = env.call_opts(broker, payload.clone(), opts.clone()).await;
        assert_eq!(r.code(), *code, "{payload}: {r:?}");
        ids.push(r.event_id);
    }
    // A traceparent, and a body that is not JSON (BAD_PAYLOAD).
    let mut props = env.client().properties(&CallOptions::default());
    let mut h = lapin::types::FieldTable::default();
    h.insert(
        "traceparent".into(),
        lapin::types::AMQPValue::LongString(tp.into()),
    );
    props = props.with_headers(h);
    let d = env
        .client()
        .call_raw(
            "rBroker",
            br#"{"template": "usr", "op": "read", "data": {"id": 987654321}}"#,
            props,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let traced: beds::broker::reply::Reply = serde_json::from_slice(&d.data).unwrap();
    // The caller's trace rides along through the retry tiers.
    let tp2 = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut h = lapin::types::FieldTable::default();
    h.insert(
        "traceparent".into(),
        lapin::types::AMQPValue::LongString(tp2.into()),
    );
    let busy = format!(
        r#"{{"template": "tst", "op": "busy", "data": {{"key": "{}-2"}}}}"#,
        env.db
    );
    let props2 = env
        .client()
        .properties(&CallOptions::default())
        .with_headers(h);
    env.client()
        .call_raw("wBroker", busy.as_bytes(), props2, Duration::from_secs(10))
        .await
        .unwrap();
    common::eventually(
        20,
        "three attempts with the caller's traceparent",
        || async { count(&env.db, doc! {"op": "busy", "traceparent": tp2}).await == 3 },
    )
    .await;
    let json_props = BasicProperties::default().with_content_type("application/json".into());
    let d = env
        .client()
        .call_raw("rBroker", b"{broken", json_props, Duration::from_secs(10))
        .await
        .unwrap();
    let bad: beds::broker::reply::Reply = serde_json::from_slice(&d.data).unwrap();
    assert_eq!(bad.code(), Some("BAD_PAYLOAD"));
    ids.push(traced.event_id.clone());
    ids.push(bad.event_id.clone());

    let got = events(&env.db, &ids).await;
    for ((broker, payload, opts, code), id) in cases.iter().zip(&ids) {
        let e = &got[id];
        assert_eq!(s(e, "event_id"), Some(id.as_str()));
        assert_eq!(
            s(e, "root_event_id"),
            Some(id.as_str()),
            "no parent: its own root"
        );
        assert_eq!(s(e, "kind"), Some("request"));
        assert_eq!(s(e, "broker"), Some(*broker));
        assert_eq!(s(e, "node"), Some(env.prefix.as_str()));
        assert_eq!(s(e, "role"), Some("appServer"));
        assert_eq!(s(e, "template"), payload["template"].as_str());
        assert_eq!(s(e, "op"), payload["op"].as_str());
        assert_eq!(s(e, "context"), Some("default"));
        assert_eq!(
            s(e, "status"),
            Some(if code.is_some() { "error" } else { "ok" })
        );
        assert_eq!(s(e, "code"), *code, "{payload}");
        assert_eq!(s(e, "message_id"), opts.message_id.as_deref());
        assert!(e.get_datetime("ts").is_ok());
        assert!(e.get_i64("elapsed_us").unwrap() > 0);
        assert!(
            s(e, "traceparent").is_some_and(|t| t.len() == 55),
            "derived: {e}"
        );
        assert_eq!(
            e.get_i64("attempt").unwrap(),
            if *code == Some("UNAVAILABLE") { 3 } else { 1 }
        );
    }
    // Two retried attempts of each tst.busy before its final one.
    let retried = count(
        &env.db,
        doc! {"template": "tst", "op": "busy", "outcome": "retry"},
    )
    .await;
    assert_eq!(retried, 4, "one event per attempt, two requests");
    assert_eq!(s(&got[&ids[8]], "outcome"), Some("parked"));
    let t = &got[&traced.event_id];
    assert_eq!(s(t, "traceparent"), Some(tp), "the caller's trace is kept");
    assert_eq!(
        s(&got[&bad.event_id], "template"),
        None,
        "unparseable: no template"
    );
    // Field values never reach the log.
    assert_eq!(count(&env.db, doc! {"data": {"$exists": true}}).await, 0);
    let lifecycle = count(
        &env.db,
        doc! {"kind": "lifecycle", "message": {"$regex": "^IPL 9/9 ready"}},
    )
    .await;
    assert_eq!(lifecycle, 1, "IPL steps are logged");
    // The indexes BEDS made at IPL, the TTL at the default 30 days.
    let mut idx = common::mongo()
        .await
        .database(&env.db)
        .collection::<Document>("msLogs")
        .list_indexes()
        .await
        .unwrap();
    let mut names = Vec::new();
    while idx.advance().await.unwrap() {
        let m = idx.deserialize_current().unwrap();
        let o = m.options.unwrap();
        if o.name.as_deref() == Some("ts_ttl") {
            assert_eq!(o.expire_after, Some(Duration::from_secs(30 * 86_400)));
        }
        names.push(o.name.unwrap());
    }
    for n in [
        "root_ts",
        "template_op_ts",
        "status_code_ts",
        "node_ts",
        "message_id",
        "ts_ttl",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} in {names:?}");
    }
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_batches_and_fire_and_forget_are_logged() {
    let env = TestEnv::start(Opts::default()).await;
    let read = |id| json!({"template": "usr", "op": "read", "data": {"id": id}});
    let a = env.call("rBroker", read(987654321)).await;
    let with_parent = |p: &str| CallOptions {
        parent_event_id: Some(p.to_string()),
        ..Default::default()
    };
    let b = env
        .call_opts("rBroker", read(987654322), with_parent(&a.event_id))
        .await;
    let c = env
        .call_opts("rBroker", read(987654323), with_parent(&b.event_id))
        .await;
    let batch =
        json!({"batch": [read(987654321), {"template": "usr", "op": "nope"}, read(987654324)]});
    let r = env
        .call_opts("rBroker", batch, with_parent(&c.event_id))
        .await;
    let entries: Vec<String> = (0..3).map(|j| format!("{}.{j}", r.event_id)).collect();
    // Fire and forget: no reply_to, still logged.
    let email = format!("ff@{}", env.db);
    let body = json!({"template": "usr", "op": "create", "data": {"name": "F", "email": email}})
        .to_string();
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id("ff-1".into());
    env.client()
        .send("wBroker", body.as_bytes(), props)
        .await
        .unwrap();

    let mut ids = vec![
        a.event_id.clone(),
        b.event_id.clone(),
        c.event_id.clone(),
        r.event_id.clone(),
    ];
    ids.extend(entries.clone());
    let got = events(&env.db, &ids).await;
    for id in &ids {
        assert_eq!(
            s(&got[id], "root_event_id"),
            Some(a.event_id.as_str()),
            "{id} in a's chain"
        );
    }
    assert_eq!(
        s(&got[&b.event_id], "parent_event_id"),
        Some(a.event_id.as_str())
    );
    assert_eq!(
        s(&got[&c.event_id], "parent_event_id"),
        Some(b.event_id.as_str())
    );
    let trace = |id: &str| s(&got[id], "traceparent").unwrap()[3..35].to_string();
    assert!(
        ids.iter().all(|i| trace(i) == trace(&a.event_id)),
        "one trace id for the chain"
    );
    for (j, id) in entries.iter().enumerate() {
        let e = &got[id];
        assert_eq!(s(e, "parent_event_id"), Some(r.event_id.as_str()));
        assert_eq!(e.get_i64("entry").unwrap(), j as i64);
    }
    assert_eq!(s(&got[&entries[1]], "code"), Some("UNKNOWN_OPERATION"));
    assert_eq!(s(&got[&entries[0]], "code"), Some("NOT_FOUND"));
    common::eventually(20, "the fire-and-forget create is logged", || async {
        count(
            &env.db,
            doc! {"message_id": "ff-1", "status": "ok", "op": "create"},
        )
        .await
            == 1
    })
    .await;

    // The chain from any member: one query on the root, the tree in memory.
    let coll = common::mongo()
        .await
        .database(&env.db)
        .collection::<Document>("msLogs");
    for member in [&a.event_id, &c.event_id, &entries[2]] {
        let chain = beds::logger::query::chain(&coll, member)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(chain.events.len(), 7, "from {member}");
        assert_eq!(chain.render().len(), 7);
    }

    // beds logs, as an operator runs it.
    let cfg = env.dir.join("config");
    let (code, out) = logs(&cfg, &["chain", &b.event_id]);
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 7, "{out}");
    assert!(lines[0].contains(&a.event_id) && !lines[0].starts_with('>'));
    assert!(
        lines[1].starts_with(">   ") && lines[1].contains(&b.event_id),
        "{out}"
    );
    assert!(
        lines[2].starts_with("!     ") && lines[2].contains(&c.event_id),
        "NOT_FOUND marked: {out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&entries[1]) && l.contains("error/UNKNOWN_OPERATION")),
        "{out}"
    );
    let (code, out) = logs(&cfg, &["chain", &c.event_id, "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["root"], json!(a.event_id));
    assert_eq!(v["events"].as_array().unwrap().len(), 7);
    let (code, out) = logs(&cfg, &["show", &c.event_id]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["parent_event_id"], json!(b.event_id));
    assert_eq!(v["code"], json!("NOT_FOUND"));
    let (code, out) = logs(&cfg, &["tail", "--op", "create", "--json"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.lines().any(|l| l.contains("ff-1")), "{out}");
    let (code, out) = logs(
        &cfg,
        &[
            "tail",
            "--status",
            "error",
            "--code",
            "UNKNOWN_OPERATION",
            "--since",
            "10m",
        ],
    );
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.contains(&entries[1]) && out.contains("usr.nope error/UNKNOWN_OPERATION"),
        "{out}"
    );
    let (code, out) = logs(&cfg, &["show", "no-such-event"]);
    assert_eq!(code, 1);
    assert!(out.contains("no event no-such-event"), "{out}");
    let (code, out) = logs(&cfg, &["tail", "--status", "maybe"]);
    assert_eq!(code, 64, "{out}");
    // MongoDB not there: 69 and where it looked.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_beds"))
        .arg("--config-dir")
        .arg(&cfg)
        .args(["logs", "tail"])
        .env("BEDS_ENV", "dev")
        .env(
            "BEDS__DATABASES__DOCS__URI",
            "mongodb://127.0.0.1:1/?directConnection=true",
        )
        .env("BEDS__DATABASES__DOCS__TIMEOUT_MS", "500")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains("MongoDB does not answer") && err.contains("databases.docs"),
        "{err}"
    );
    env.finish().await;
}

/// Runs `beds logs ARGS` on the test's config; (exit code, stdout + stderr).
fn logs(cfg: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_beds"))
        .arg("--config-dir")
        .arg(cfg)
        .arg("logs")
        .args(args)
        .env("BEDS_ENV", "dev")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_events_in_memory_loses_none() {
    // A long flush interval: the events are still in memory at SIGTERM.
    let (mut child, debris, prefix, _log) =
        common::spawn_node("ev", &[("BEDS__EVENTS__FLUSH_MS", Some("30000"))]).await;
    let client = beds::client::Client::connect("amqp://guest:guest@127.0.0.1:5672/%2f", &prefix)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..300 {
        let q = json!({"template": "usr", "op": "read", "data": {"id": 900000 + i}});
        let r = client
            .call("rBroker", &q, &CallOptions::default())
            .await
            .unwrap();
        ids.push(r.event_id);
    }
    assert_eq!(
        count(&prefix, doc! {"kind": "request"}).await,
        0,
        "all still in memory"
    );
    let pid = child.id().unwrap() as i32;
    // SAFETY: a plain kill(2) of our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let got = events(&prefix, &ids).await;
    assert_eq!(got.len(), 300);
    assert_eq!(
        count(&prefix, doc! {"kind": "request"}).await,
        300,
        "each once"
    );
    assert_eq!(
        count(&prefix, doc! {"kind": "lifecycle", "op": "stop"}).await,
        1
    );
    drop(debris);
}
