//! A BEDS client in Rust with `beds::client::Client`, and a demo of the wire
//! protocol (wiki/12-client-guide.md).
//!
//! ```text
//! BEDS_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2F BEDS_PREFIX=beds \
//!     cargo run --example rust_client
//! ```
//!
//! Set `BEDS_EXAMPLES_NOTE=1` when the node also serves the MongoDB `note`
//! domain. Exits 0 when every step got the expected answer, 1 otherwise.

use std::process::ExitCode;
use std::time::Duration;

use beds::broker::reply::Reply;
use beds::client::{CallOptions, Client};
use serde_json::{json, Value};

const READ: &str = "rBroker";
const WRITE: &str = "wBroker";

type Res<T> = Result<T, String>;

#[tokio::main]
async fn main() -> ExitCode {
    let url = std::env::var("BEDS_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2F".into());
    let prefix = std::env::var("BEDS_PREFIX").unwrap_or_else(|_| "beds".into());
    let client = match Client::connect(&url, &prefix).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("FAILED: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = run(&client, &url).await;
    client.close().await;
    match outcome {
        Ok(()) => {
            println!("rust example: all steps ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Per-call options: a 10 s reply timeout and an `x-beds-deadline` at the
/// same moment, so BEDS never runs a request this client stopped waiting for.
fn opts(message_id: Option<String>) -> CallOptions {
    let timeout = Duration::from_secs(10);
    CallOptions {
        timeout,
        message_id,
        deadline_ms: Some(chrono::Utc::now().timestamp_millis() + timeout.as_millis() as i64),
        ..CallOptions::default()
    }
}

fn req(template: &str, op: &str, data: Value) -> Value {
    json!({ "template": template, "op": op, "data": data })
}

/// The call, expecting `status: "ok"`.
async fn ok(c: &Client, broker: &str, payload: &Value, o: &CallOptions) -> Res<Reply> {
    let r = c
        .call(broker, payload, o)
        .await
        .map_err(|e| e.to_string())?;
    match &r.error {
        None if r.is_ok() => Ok(r),
        Some(e) => Err(format!("{broker} {payload}: {}: {}", e.code, e.message)),
        None => Err(format!("{broker} {payload}: not ok: {r:?}")),
    }
}

fn expect(cond: bool, what: &str, r: &Reply) -> Res<()> {
    if cond {
        Ok(())
    } else {
        Err(format!(
            "{what}: {}",
            serde_json::to_string(r).unwrap_or_default()
        ))
    }
}

fn rows(r: &Reply) -> &[serde_json::Map<String, Value>] {
    r.data.as_deref().unwrap_or(&[])
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

async fn run(c: &Client, url: &str) -> Res<()> {
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let email = format!("example-rs-{tag}@example.org");
    // RabbitMQ checks that user_id equals the connection's login.
    let login = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .map(|(cred, _)| cred.split(':').next().unwrap_or("").to_string());

    // 1. usr create: a write, so wBroker, with a message_id (dedup key).
    let create = req(
        "usr",
        "create",
        json!({ "name": format!("Ada {tag}"), "email": email }),
    );
    let mut create_opts = opts(Some(new_id()));
    create_opts.user_id = login.filter(|l| !l.is_empty() && !l.contains('%'));
    let r = ok(c, WRITE, &create, &create_opts).await?;
    expect(
        rows(&r).len() == 1 && rows(&r)[0]["email"] == json!(email),
        "create row",
        &r,
    )?;
    let user = rows(&r)[0].clone();
    let id = user["id"].as_i64().ok_or("id is not an integer")?;
    println!(
        "usr create     -> ok, id={id} affected={} elapsed_us={}",
        r.affected.unwrap_or(0),
        r.elapsed_us.unwrap_or(0)
    );

    // 1b. The same request again (same message_id, same body), as a client
    // does after a lost reply: answered with the first execution's reply.
    // (The deadline is refreshed; headers are not part of the dedup key.)
    let again_opts = CallOptions {
        deadline_ms: opts(None).deadline_ms,
        ..create_opts.clone()
    };
    let again = ok(c, WRITE, &create, &again_opts).await?;
    expect(
        again.event_id == r.event_id && again.data == r.data,
        "repeat with the same message_id gets the first reply",
        &again,
    )?;
    println!(
        "usr create (repeat, same message_id) -> first reply, event_id={}",
        again.event_id
    );

    // 2. usr read: a read, so rBroker.
    let r = ok(
        c,
        READ,
        &req("usr", "read", json!({ "id": id })),
        &opts(None),
    )
    .await?;
    expect(
        rows(&r) == [user.clone()],
        "read returns the created row",
        &r,
    )?;
    println!("usr read       -> ok, {}", Value::Object(user.clone()));

    // 3. Same email again (a new request, so a new message_id): CONFLICT.
    let dup = req(
        "usr",
        "create",
        json!({ "name": format!("Eve {tag}"), "email": email }),
    );
    let r = c
        .call(WRITE, &dup, &opts(Some(new_id())))
        .await
        .map_err(|e| e.to_string())?;
    let e = r.error.as_ref().ok_or("duplicate email was accepted")?;
    expect(
        e.code == "CONFLICT" && !e.retryable,
        "duplicate email is CONFLICT",
        &r,
    )?;
    println!(
        "usr create dup -> error {} (retryable={}): {}",
        e.code, e.retryable, e.message
    );

    // 4. note (MongoDB), only when the node serves it.
    if std::env::var("BEDS_EXAMPLES_NOTE").as_deref() == Ok("1") {
        let title = format!("Hello {tag}");
        let data = json!({ "user_id": id, "title": title, "body": "First note.", "tags": ["example", "rust"] });
        let r = ok(
            c,
            WRITE,
            &req("note", "create", data),
            &opts(Some(new_id())),
        )
        .await?;
        let note = rows(&r).first().cloned().unwrap_or_default();
        let note_id = note["id"].as_str().unwrap_or("").to_string();
        expect(
            note_id.len() == 24
                && note_id
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "note id is 24 lowercase hex",
            &r,
        )?;
        expect(
            note["title"] == json!(title) && note["tags"] == json!(["example", "rust"]),
            "note row",
            &r,
        )?;
        println!(
            "note create    -> ok, id={note_id} created={}",
            note["created"].as_str().unwrap_or("?")
        );
        let read = req("note", "read", json!({ "id": note_id }));
        let r = ok(c, READ, &read, &opts(None)).await?;
        let got = rows(&r).first().cloned().unwrap_or_default();
        expect(
            got["title"] == json!(title) && got["user_id"] == json!(id),
            "note read",
            &r,
        )?;
        println!("note read      -> ok, {}", Value::Object(got));
        let del = req("note", "delete", json!({ "id": note_id }));
        let r = ok(c, WRITE, &del, &opts(Some(new_id()))).await?;
        expect(r.affected == Some(1), "note delete affected 1", &r)?;
        println!("note delete    -> ok, affected=1");
    } else {
        println!("note steps: skipped (BEDS_EXAMPLES_NOTE unset)");
    }

    // 5. A batch of two reads: one reply, one result per entry, in order.
    // Each entry succeeds or fails on its own (not atomic).
    let missing: i64 = 1 << 62;
    let batch = json!({ "batch": [
        req("usr", "read", json!({ "id": id })),
        req("usr", "read", json!({ "id": missing })),
    ]});
    let r = ok(c, READ, &batch, &opts(None)).await?;
    let res = r.results.as_deref().unwrap_or(&[]);
    expect(
        res.len() == 2 && res[0].is_ok() && rows(&res[0]) == [user.clone()],
        "batch entry 0 ok",
        &r,
    )?;
    expect(
        res[1].code() == Some("NOT_FOUND"),
        "batch entry 1 NOT_FOUND",
        &r,
    )?;
    println!(
        "batch of 2 reads -> ok: [0] ok id={id}, [1] {}",
        res[1].code().unwrap_or("?")
    );

    // 6. Clean up.
    let del = req("usr", "delete", json!({ "id": id }));
    let r = ok(c, WRITE, &del, &opts(Some(new_id()))).await?;
    expect(r.affected == Some(1), "usr delete affected 1", &r)?;
    println!("usr delete     -> ok, affected=1");
    Ok(())
}
