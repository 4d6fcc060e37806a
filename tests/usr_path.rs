//! The usr domain through the real brokers and database, and every error
//! code that a single bad request can produce.

mod common;

use beds::client::CallOptions;
use common::{Opts, TestEnv};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::{json, Value};
use std::time::Duration;

fn email(tag: &str) -> String {
    format!("{tag}.{}@example.org", uuid::Uuid::new_v4().simple())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usr_crud_through_the_brokers() {
    let env = TestEnv::start(Opts::default()).await;
    let ada = email("ada");
    let r = env
        .call(
            "wBroker",
            json!({"template": "usr", "op": "create", "data": {"name": "Ada", "email": ada}}),
        )
        .await;
    assert!(r.is_ok(), "{r:?}");
    let row = &r.data.as_ref().unwrap()[0];
    let id = row["id"].as_i64().expect("id is an integer");
    assert_eq!(row["name"], "Ada");
    assert_eq!(row["email"], Value::from(ada.clone()));
    assert_eq!(
        row.keys().collect::<Vec<_>>(),
        ["id", "name", "email"],
        "columns in procedure order"
    );
    assert!(r.elapsed_us.is_some());

    let r = env
        .call(
            "rBroker",
            json!({"template": "usr", "op": "read", "data": {"id": id}}),
        )
        .await;
    assert_eq!(r.data.unwrap()[0]["name"], "Ada");

    let r = env
        .call(
            "wBroker",
            json!({"template": "usr", "op": "update", "data": {"id": id, "name": "Ada L."}}),
        )
        .await;
    assert_eq!(r.data.as_ref().unwrap()[0]["name"], "Ada L.");
    assert_eq!(
        r.data.unwrap()[0]["email"],
        Value::from(ada),
        "unchanged column kept"
    );

    let grace = email("grace");
    env.call(
        "wBroker",
        json!({"template": "usr", "op": "create", "data": {"name": "Grace", "email": grace}}),
    )
    .await;
    let r = env
        .call(
            "rBroker",
            json!({"template": "usr", "op": "list", "data": {"limit": 10}}),
        )
        .await;
    let ids: Vec<i64> = r
        .data
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids[0] < ids[1], "ordered by id");
    let r = env
        .call(
            "rBroker",
            json!({"template": "usr", "op": "list", "data": {"limit": 1, "offset": 1}}),
        )
        .await;
    assert_eq!(r.data.unwrap()[0]["id"].as_i64().unwrap(), ids[1]);

    let r = env
        .call(
            "wBroker",
            json!({"template": "usr", "op": "delete", "data": {"id": id}}),
        )
        .await;
    assert!(r.is_ok());
    assert_eq!(r.affected, Some(1));
    assert_eq!(r.data, Some(vec![]));
    let r = env
        .call(
            "rBroker",
            json!({"template": "usr", "op": "read", "data": {"id": id}}),
        )
        .await;
    assert_eq!(r.code(), Some("NOT_FOUND"));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_carries_correlation_id_and_event_id_header() {
    let env = TestEnv::start(Opts::default()).await;
    let body = json!({"template": "usr", "op": "list"}).to_string();
    let d = env
        .client()
        .call_raw(
            "rBroker",
            body.as_bytes(),
            BasicProperties::default().with_content_type("application/json".into()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let reply: Value = serde_json::from_slice(&d.data).unwrap();
    let header = d
        .properties
        .headers()
        .as_ref()
        .unwrap()
        .inner()
        .get("x-beds-event-id")
        .cloned();
    match header {
        Some(AMQPValue::LongString(s)) => {
            assert_eq!(s.to_string(), reply["event_id"].as_str().unwrap())
        }
        other => panic!("x-beds-event-id missing: {other:?}"),
    }
    assert_eq!(
        d.properties.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert!(d.properties.correlation_id().is_some());
    env.finish().await;
}

async fn raw(env: &TestEnv, broker: &str, body: &[u8], props: BasicProperties) -> Value {
    let d = env
        .client()
        .call_raw(broker, body, props, Duration::from_secs(10))
        .await
        .unwrap();
    serde_json::from_slice(&d.data).unwrap()
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<none>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_are_answered_bad_payload() {
    let env = TestEnv::start(Opts::default()).await;
    let json_props = || BasicProperties::default().with_content_type("application/json".into());
    let cases: Vec<(&str, Vec<u8>, BasicProperties)> = vec![
        ("not JSON", b"{nope".to_vec(), json_props()),
        ("not an object", b"[1,2]".to_vec(), json_props()),
        (
            "unknown key",
            br#"{"template":"usr","op":"list","dta":{}}"#.to_vec(),
            json_props(),
        ),
        (
            "unknown batch key",
            br#"{"batch":[{"template":"usr","op":"list"}],"atomik":true}"#.to_vec(),
            json_props(),
        ),
        ("empty batch", br#"{"batch":[]}"#.to_vec(), json_props()),
        (
            "too large",
            format!(
                r#"{{"template":"usr","op":"list","context":"{}"}}"#,
                "x".repeat(70_000)
            )
            .into_bytes(),
            json_props(),
        ),
        (
            "wrong content type",
            br#"{"template":"usr","op":"list"}"#.to_vec(),
            BasicProperties::default().with_content_type("text/plain".into()),
        ),
        (
            "no content type",
            br#"{"template":"usr","op":"list"}"#.to_vec(),
            BasicProperties::default(),
        ),
        (
            "deadline not an integer",
            br#"{"template":"usr","op":"list"}"#.to_vec(),
            json_props().with_headers({
                let mut h = FieldTable::default();
                h.insert(
                    "x-beds-deadline".into(),
                    AMQPValue::LongString("soon".into()),
                );
                h
            }),
        ),
    ];
    for (what, body, props) in cases {
        let r = raw(&env, "rBroker", &body, props).await;
        assert_eq!(r["status"], "error", "{what}: {r}");
        assert_eq!(code(&r), "BAD_PAYLOAD", "{what}: {r}");
        assert_eq!(r["error"]["retryable"], false, "{what}");
        assert!(!r["error"]["message"].as_str().unwrap().is_empty());
    }
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_have_their_contract_codes() {
    let env = TestEnv::start(Opts::default()).await;
    let used = email("dup");
    let r = env
        .call(
            "wBroker",
            json!({"template": "usr", "op": "create", "data": {"name": "A", "email": used}}),
        )
        .await;
    assert!(r.is_ok());
    let cases = vec![
        (
            "rBroker",
            json!({"template": "nope", "op": "read"}),
            "UNKNOWN_TEMPLATE",
        ),
        (
            "rBroker",
            json!({"template": "usr", "op": "frobnicate"}),
            "UNKNOWN_OPERATION",
        ),
        (
            "rBroker",
            json!({"template": "usr", "op": "create", "data": {"name": "A", "email": "a@b"}}),
            "WRONG_BROKER",
        ),
        (
            "wBroker",
            json!({"template": "usr", "op": "read", "data": {"id": 1}}),
            "WRONG_BROKER",
        ),
        (
            "rBroker",
            json!({"template": "usr", "op": "read"}),
            "VALIDATION",
        ),
        (
            "rBroker",
            json!({"template": "usr", "op": "read", "data": {"id": "42"}}),
            "VALIDATION",
        ),
        (
            "rBroker",
            json!({"template": "usr", "op": "read", "data": {"id": 1.5}}),
            "VALIDATION",
        ),
        (
            "rBroker",
            json!({"template": "usr", "op": "read", "data": {"id": 1, "extra": 2}}),
            "VALIDATION",
        ),
        (
            "rBroker",
            json!({"template": "usr", "op": "read", "data": [1]}),
            "VALIDATION",
        ),
        (
            "rBroker",
            json!({"template": "usr", "op": "list", "data": {"limit": 5000}}),
            "VALIDATION",
        ),
        (
            "wBroker",
            json!({"template": "usr", "op": "create", "data": {"name": "x".repeat(65), "email": "l@x"}}),
            "VALIDATION",
        ),
        (
            "wBroker",
            json!({"template": "usr", "op": "create", "data": {"name": "B", "email": used}}),
            "CONFLICT",
        ),
        (
            "rBroker",
            json!({"template": "usr", "op": "read", "data": {"id": 1_i64 << 62}}),
            "NOT_FOUND",
        ),
        (
            "wBroker",
            json!({"template": "usr", "op": "update", "data": {"id": 1_i64 << 62, "name": "x"}}),
            "NOT_FOUND",
        ),
        (
            "rBroker",
            json!({"template": "sec", "op": "read", "data": {"id": 1}}),
            "FORBIDDEN",
        ),
        (
            "mBroker",
            json!({"template": "tst", "op": "reject"}),
            "INTERNAL",
        ),
    ];
    for (broker, payload, want) in cases {
        let r = env.call(broker, payload.clone()).await;
        assert_eq!(r.code(), Some(want), "{payload} -> {r:?}");
        let e = r.error.unwrap();
        assert!(!e.retryable);
        assert!(!e.message.is_empty());
    }
    // A name of exactly max_len is fine.
    let r = env
        .call("wBroker", json!({"template": "usr", "op": "create", "data": {"name": "x".repeat(64), "email": email("max")}}))
        .await;
    assert!(r.is_ok(), "{r:?}");
    // The procedure's own message reaches the caller.
    let r = env
        .call("mBroker", json!({"template": "tst", "op": "reject"}))
        .await;
    assert!(r.error.unwrap().message.contains("not today"));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_checks_the_verified_user_id() {
    let env = TestEnv::start(Opts::default()).await;
    let as_guest = CallOptions {
        user_id: Some("guest".into()),
        ..Default::default()
    };
    let q = json!({"template": "sec", "op": "read", "data": {"id": 1}});
    let r = env.call_opts("rBroker", q.clone(), as_guest.clone()).await;
    assert_eq!(r.code(), Some("FORBIDDEN"), "guest is not alice");
    let q = json!({"template": "gst", "op": "read", "data": {"id": 1}});
    let r = env.call_opts("rBroker", q.clone(), as_guest).await;
    assert!(r.is_ok(), "guest is allowed: {r:?}");
    let r = env.call("rBroker", q).await;
    assert_eq!(r.code(), Some("FORBIDDEN"), "no user_id, no access");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_requests_are_never_executed() {
    let env = TestEnv::start(Opts::default()).await;
    let e = email("late");
    let past = chrono::Utc::now().timestamp_millis() - 1_000;
    let r = env
        .call_opts(
            "wBroker",
            json!({"template": "usr", "op": "create", "data": {"name": "Late", "email": e}}),
            CallOptions {
                deadline_ms: Some(past),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(r.code(), Some("EXPIRED"));
    assert_eq!(
        env.sql("SELECT COUNT(*) FROM usr").trim(),
        "0",
        "not executed"
    );
    let future = chrono::Utc::now().timestamp_millis() + 60_000;
    let r = env
        .call_opts(
            "wBroker",
            json!({"template": "usr", "op": "create", "data": {"name": "Late", "email": e}}),
            CallOptions {
                deadline_ms: Some(future),
                ..Default::default()
            },
        )
        .await;
    assert!(r.is_ok(), "{r:?}");
    // An AMQP timestamp counts seconds.
    let ts = |secs: i64| {
        let mut h = FieldTable::default();
        h.insert("x-beds-deadline".into(), AMQPValue::Timestamp(secs as u64));
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(h)
    };
    let now = chrono::Utc::now().timestamp();
    let body = br#"{"template":"usr","op":"list"}"#;
    assert_eq!(
        code(&raw(&env, "rBroker", body, ts(now - 10)).await),
        "EXPIRED"
    );
    assert_eq!(
        raw(&env, "rBroker", body, ts(now + 60)).await["status"],
        "ok"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_message_id_write_is_applied_once() {
    let env = TestEnv::start(Opts::default()).await;
    let key = uuid::Uuid::new_v4().simple().to_string();
    let opts = CallOptions {
        message_id: Some(format!("m-{key}")),
        ..Default::default()
    };
    // tst.flaky with fail_times 0 counts its executions.
    let q = json!({"template": "tst", "op": "flaky", "data": {"key": key, "fail_times": 0}});
    let a = env.call_opts("wBroker", q.clone(), opts.clone()).await;
    let b = env.call_opts("wBroker", q.clone(), opts.clone()).await;
    assert!(a.is_ok() && b.is_ok());
    assert_eq!(a, b, "the duplicate is answered from the first execution");
    // Concurrent duplicates too.
    let opts2 = CallOptions {
        message_id: Some(format!("n-{key}")),
        ..Default::default()
    };
    let (c, d) = tokio::join!(
        env.call_opts("wBroker", q.clone(), opts2.clone()),
        env.call_opts("wBroker", q.clone(), opts2.clone())
    );
    assert_eq!(c, d);
    let n = env.sql(&format!("SELECT n FROM tst_counter WHERE k = '{key}'"));
    assert_eq!(n.trim(), "2", "two distinct message ids, two executions");
    // Reads are not deduplicated: they change nothing.
    let q = json!({"template": "tst", "op": "count", "data": {"key": key}});
    let r = env.call_opts("rBroker", q, opts).await;
    assert_eq!(r.data.unwrap()[0]["n"], 2);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_types_are_faithful() {
    let env = TestEnv::start(Opts::default()).await;
    let r = env
        .call("rBroker", json!({"template": "tst", "op": "types"}))
        .await;
    let row = &r.data.unwrap()[0];
    assert_eq!(row["price"], "12.50", "DECIMAL keeps its scale");
    assert_eq!(
        row["big"], "123456789012345678901234567890.123456789",
        "DECIMAL keeps every digit"
    );
    assert_eq!(row["at"], "2026-01-31T12:34:56.789Z");
    assert_eq!(row["day"], "2026-01-31");
    assert_eq!(row["nothing"], Value::Null);
    assert_eq!(row["big_int"].as_i64(), Some(9007199254740993));
    assert_eq!(row["max_u64"].as_u64(), Some(u64::MAX));
    assert_eq!(row["dbl"].as_f64(), Some(1.5));
    assert_eq!(row["txt"], "h\u{e9}llo");

    let r = env
        .call(
            "rBroker",
            json!({"template": "tst", "op": "echo", "data": {
                "i": -7, "f": 2.25, "b": true, "s": "s\u{fc}\u{df}", "dt": "2026-03-01T10:00:00+02:00", "j": {"a": [1, 2]}
            }}),
        )
        .await;
    let row = &r.data.unwrap()[0];
    assert_eq!(row["i"], -7);
    assert_eq!(row["f"], 2.25);
    assert_eq!(row["b"], true);
    assert_eq!(row["s"], "s\u{fc}\u{df}");
    assert_eq!(
        row["dt"], "2026-03-01T08:00:00Z",
        "datetimes are normalised to UTC"
    );
    assert_eq!(
        serde_json::from_str::<Value>(row["j"].as_str().unwrap()).unwrap(),
        json!({"a": [1, 2]})
    );
    let r = env
        .call(
            "rBroker",
            json!({"template": "tst", "op": "echo", "data": {}}),
        )
        .await;
    assert!(
        r.data.unwrap()[0].values().all(Value::is_null),
        "absent optional params are NULL"
    );
    let r = env
        .call(
            "rBroker",
            json!({"template": "tst", "op": "echo", "data": {"dt": "yesterday"}}),
        )
        .await;
    assert_eq!(r.code(), Some("VALIDATION"));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beds_call_sends_one_request_and_prints_the_reply() {
    let env = TestEnv::start(Opts::default()).await;
    let beds = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_beds"))
            .args([
                "--config-dir",
                env.dir.join("config").to_str().unwrap(),
                "call",
            ])
            .args(args)
            .env("BEDS_ENV", "dev")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let e = email("cli");
    let (code, out, err) = beds(&["usr", "create", "name=Cli", &format!("email={e}")]);
    assert_eq!(code, Some(0), "{out}{err}");
    let reply: Value = serde_json::from_str(&out).unwrap();
    let id = reply["data"][0]["id"].as_i64().unwrap();
    // `id=` is converted to an integer by the template's field type, and the
    // read goes to rBroker because `read` is a read op.
    let (code, out, _) = beds(&["usr", "read", &format!("id={id}")]);
    assert_eq!(code, Some(0));
    assert!(out.contains(&e));
    let (code, out, _) = beds(&["usr", "read", "--json", "{\"id\": 999999999}"]);
    assert_eq!(code, Some(1), "error replies exit 1");
    assert!(out.contains("NOT_FOUND"));
    let (code, _, err) = beds(&["usr", "read", "id"]);
    assert_eq!(code, Some(64), "{err}");
    let (code, _, err) = beds(&[
        "usr",
        "read",
        "id=1",
        "--broker",
        "noSuchBroker",
        "--timeout",
        "300ms",
    ]);
    assert_eq!(code, Some(75), "no reply in time: {err}");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_as_a_user_that_may_only_execute_procedures() {
    let prefix = common::unique("x");
    common::create_db(&prefix);
    let (user, pass) = (
        format!("{prefix}_u"),
        uuid::Uuid::new_v4().simple().to_string(),
    );
    common::sql(
        None,
        &format!(
            "CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY '{pass}';\n\
             CREATE USER '{user}'@'localhost' IDENTIFIED BY '{pass}';\n\
             GRANT EXECUTE ON `{prefix}`.* TO '{user}'@'127.0.0.1';\n\
             GRANT EXECUTE ON `{prefix}`.* TO '{user}'@'localhost';"
        ),
    );
    let env = TestEnv::start_on(
        prefix.clone(),
        Opts {
            db_login: Some((user.clone(), pass.clone())),
            ..Default::default()
        },
    )
    .await;
    // IPL found every procedure as that user; CRUD works through them.
    let r = env
        .call("wBroker", json!({"template": "usr", "op": "create", "data": {"name": "Least", "email": email("lp")}}))
        .await;
    assert!(r.is_ok(), "{r:?}");
    // ...while the table itself is out of reach.
    let out = std::process::Command::new("mariadb")
        .args([
            "-h127.0.0.1",
            &format!("-u{user}"),
            &prefix,
            "-e",
            "SELECT * FROM usr",
        ])
        .env("MYSQL_PWD", &pass)
        .output()
        .unwrap();
    assert!(!out.status.success(), "direct SELECT must be denied");
    env.finish().await;
    common::sql(
        None,
        &format!("DROP USER '{user}'@'127.0.0.1'; DROP USER '{user}'@'localhost';"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_message_id_with_another_body_is_a_new_request() {
    let env = TestEnv::start(Opts::default()).await;
    let opts = CallOptions {
        message_id: Some("1".into()),
        ..Default::default()
    };
    let (a, b) = (email("a"), email("b"));
    let ra = env
        .call_opts(
            "wBroker",
            json!({"template": "usr", "op": "create", "data": {"name": "A", "email": a}}),
            opts.clone(),
        )
        .await;
    let rb = env
        .call_opts(
            "wBroker",
            json!({"template": "usr", "op": "create", "data": {"name": "B", "email": b}}),
            opts,
        )
        .await;
    assert!(ra.is_ok() && rb.is_ok());
    assert_ne!(
        ra.data.unwrap()[0]["id"],
        rb.data.unwrap()[0]["id"],
        "B got its own row, not A's"
    );
    assert_eq!(env.sql("SELECT COUNT(*) FROM usr").trim(), "2");
    env.finish().await;
}
