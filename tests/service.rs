//! Running as a service: the HTTP port's metrics match what was sent,
//! readiness follows the databases, hostile HTTP is answered cleanly, and
//! a template reload swaps the set whole or not at all.

mod common;

use std::time::Duration;

use beds::client::CallOptions;
use common::{eventually, http_get, http_raw, metric, Opts, Proxy, TestEnv};
use serde_json::json;

fn email(tag: &str) -> String {
    format!("{tag}-{}@example.org", uuid::Uuid::new_v4().simple())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_mix_and_bad_http_is_answered_cleanly() {
    let env = TestEnv::start(Opts::default()).await;
    let addr = env.node().http_addr.expect("the node listens");
    let echo = |i: serde_json::Value| json!({"template": "tst", "op": "echo", "data": {"i": i}});
    for _ in 0..4 {
        assert!(env.call("rBroker", echo(json!(1))).await.is_ok());
    }
    for _ in 0..3 {
        let r = env
            .call(
                "rBroker",
                json!({"template": "usr", "op": "read", "data": {"id": 999_999_999}}),
            )
            .await;
        assert_eq!(r.code(), Some("NOT_FOUND"));
    }
    for _ in 0..2 {
        assert_eq!(
            env.call("rBroker", echo(json!("x"))).await.code(),
            Some("VALIDATION")
        );
    }
    // A client-made name must not become a label value.
    let r = env
        .call("rBroker", json!({"template": "zz<script>", "op": "read"}))
        .await;
    assert_eq!(r.code(), Some("UNKNOWN_TEMPLATE"));
    let create =
        json!({"template": "usr", "op": "create", "data": {"name": "M", "email": email("m")}});
    assert_eq!(
        env.call("rBroker", create.clone()).await.code(),
        Some("WRONG_BROKER")
    );
    // The same write twice: the second is answered from memory.
    let once = || CallOptions {
        message_id: Some(format!("metrics-{}", env.prefix)),
        ..Default::default()
    };
    assert!(env
        .call_opts("wBroker", create.clone(), once())
        .await
        .is_ok());
    assert!(env.call_opts("wBroker", create, once()).await.is_ok());

    let want = [
        (
            r#"beds_requests_total{broker="rBroker",template="tst",op="echo",code="OK"}"#,
            4.0,
        ),
        (
            r#"beds_requests_total{broker="rBroker",template="usr",op="read",code="NOT_FOUND"}"#,
            3.0,
        ),
        (
            r#"beds_requests_total{broker="rBroker",template="tst",op="echo",code="VALIDATION"}"#,
            2.0,
        ),
        (
            r#"beds_requests_total{broker="rBroker",template="(unknown)",op="(unknown)",code="UNKNOWN_TEMPLATE"}"#,
            1.0,
        ),
        (
            r#"beds_requests_total{broker="rBroker",template="usr",op="create",code="WRONG_BROKER"}"#,
            1.0,
        ),
        (
            r#"beds_requests_total{broker="wBroker",template="usr",op="create",code="OK"}"#,
            2.0,
        ),
        (
            r#"beds_request_duration_seconds_count{broker="rBroker"}"#,
            11.0,
        ),
        (
            r#"beds_request_duration_seconds_count{broker="wBroker"}"#,
            2.0,
        ),
        (r#"beds_repeats_total{source="memory"}"#, 1.0),
        (r#"beds_requests_in_flight{broker="rBroker"}"#, 0.0),
        (r#"beds_database_up{database="primary"}"#, 1.0),
        ("beds_amqp_up", 1.0),
        ("beds_ready", 1.0),
        ("beds_event_log_queue_depth", 0.0),
        // Counted from the MongoDB driver's pool events: all checked in.
        (r#"beds_database_connections_in_use{database="docs"}"#, 0.0),
    ];
    // Counted when each request's work ends, just after its reply left.
    eventually(10, "the metrics match what was sent", || async {
        let (status, text) = http_get(addr, "/metrics").await;
        status == 200 && want.iter().all(|(s, v)| metric(&text, s) == Some(*v))
    })
    .await;
    let (_, text) = http_get(addr, "/metrics").await;
    for (s, v) in want {
        assert_eq!(metric(&text, s), Some(v), "{s} in\n{text}");
    }
    assert!(!text.contains("<script>"));
    assert!(text.contains("beds_build_info{"), "{text}");
    assert!(text.contains("beds_event_log_spool_bytes "), "{text}");
    assert!(
        text.contains(r#"beds_database_connections_max{database="primary"} 8"#),
        "{text}"
    );
    assert!(
        text.contains(r#"beds_database_connections_max{database="docs"} 8"#),
        "{text}"
    );

    // Bad requests get clean 4xx answers.
    assert_eq!(http_get(addr, "/nope").await.0, 404);
    let (status, _) = http_raw(
        addr,
        b"DELETE /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405);
    assert_eq!(
        http_get(addr, "/reload").await.0,
        405,
        "reload is POST only"
    );
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    assert_eq!(http_raw(addr, huge.as_bytes()).await.0, 431);
    assert_eq!(
        http_raw(addr, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
            .await
            .0,
        400
    );
    // A client that opens connections and sends nothing holds no slot
    // forever, and the node keeps answering meanwhile.
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    drop(idle);
    assert!(
        env.call("rBroker", echo(json!(2))).await.is_ok(),
        "the node still serves"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_database() {
    let proxy = Proxy::start(3306).await;
    let env = TestEnv::start(Opts {
        db_port: proxy.port,
        ..Default::default()
    })
    .await;
    let addr = env.node().http_addr.unwrap();
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], true);
    proxy.set_down(true).await;
    eventually(10, "readyz says the database is down", || async {
        let (status, body) = http_get(addr, "/readyz").await;
        status == 503 && body.contains("database primary")
    })
    .await;
    let (_, text) = http_get(addr, "/metrics").await;
    assert_eq!(
        metric(&text, r#"beds_database_up{database="primary"}"#),
        Some(0.0)
    );
    assert_eq!(metric(&text, "beds_ready"), Some(0.0));
    // Liveness is not readiness: the process still runs its loops.
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    proxy.set_down(false).await;
    eventually(10, "readyz is back", || async {
        http_get(addr, "/readyz").await.0 == 200
    })
    .await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_the_set_whole_or_keeps_the_old_one() {
    let env = TestEnv::start(Opts::default()).await;
    let addr = env.node().http_addr.unwrap();
    let templates = env.dir.join("templates");
    let post = || {
        http_raw(
            addr,
            b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
    };
    let echo = json!({"template": "tst", "op": "echo", "data": {"i": 1}});

    // A set with a broken template is refused whole: the old set serves.
    std::fs::write(
        templates.join("bad.toml"),
        "name = \"bad\"\nkind = \"rec\"\nstore = \"mariadb\"\ndatabase = \"primary\"\n[fields]\nk = { type = \"int\" }\n[ops.get]\nprocedure = \"bad_missing_proc\"\nparams = [\"k\"]\nreturns = \"one\"\naccess = \"read\"\n",
    )
    .unwrap();
    std::fs::remove_file(templates.join("gst.toml")).unwrap();
    let (status, body) = post().await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("bad_missing_proc"), "{body}");
    assert!(env.call("rBroker", echo.clone()).await.is_ok());
    let (_, text) = http_get(addr, "/metrics").await;
    assert_eq!(
        metric(&text, r#"beds_template_reloads_total{result="refused"}"#),
        Some(1.0)
    );

    // A request in flight finishes on the set it started with.
    std::fs::remove_file(templates.join("bad.toml")).unwrap();
    let slow = json!({"template": "tst", "op": "sleep", "data": {"ms": 1500, "key": "reload"}});
    let in_flight = env.call("wBroker", slow);
    let swap = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        std::fs::remove_file(templates.join("tst.toml")).unwrap();
        post().await
    };
    let (slow_reply, (status, body)) = tokio::join!(in_flight, swap);
    assert_eq!(status, 200, "{body}");
    assert!(slow_reply.is_ok(), "{slow_reply:?}");
    let r = env.call("rBroker", echo).await;
    assert_eq!(r.code(), Some("UNKNOWN_TEMPLATE"), "tst left the set");
    let (_, text) = http_get(addr, "/metrics").await;
    assert_eq!(
        metric(&text, r#"beds_template_reloads_total{result="ok"}"#),
        Some(1.0)
    );
    // Both reloads are lifecycle events in the event log, the refusal
    // naming what was wrong.
    let log = common::mongo()
        .await
        .database(&env.db)
        .collection::<mongodb::bson::Document>("msLogs");
    let reloads = || async {
        let q = mongodb::bson::doc! {"kind": "lifecycle", "op": "reload"};
        let found: Vec<_> = futures::TryStreamExt::try_collect(log.find(q).await.unwrap())
            .await
            .unwrap();
        found
    };
    eventually(10, "two reload events", || async {
        reloads().await.len() == 2
    })
    .await;
    let events = reloads().await;
    let refused = events
        .iter()
        .find(|e| e.get_str("status") == Ok("error"))
        .expect("the refusal is logged");
    assert!(
        refused
            .get_str("message")
            .unwrap()
            .contains("bad_missing_proc"),
        "{refused}"
    );
    assert!(events.iter().any(|e| e.get_str("status") == Ok("ok")));
    env.finish().await;
}
