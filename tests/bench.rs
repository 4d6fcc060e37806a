//! `beds bench` reports what it did: its counts match what RabbitMQ routed
//! and what the database holds afterwards. No timing is asserted.

mod common;

use common::*;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::Value;

/// Runs `beds bench` (its arguments split on whitespace) against the config
/// in `dir` and returns the exit code, the JSON line and stderr.
async fn bench(dir: &std::path::Path, args: &str) -> (Option<i32>, Value, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_beds"))
        .arg("--config-dir")
        .arg(dir.join("config"))
        .arg("bench")
        .args(args.split_whitespace())
        .env("BEDS_ENV", "dev")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let json = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    (out.status.code(), json, stderr)
}

/// A queue that gets a copy of every request routed to the node's brokers.
async fn tap(conn: &lapin::Connection, prefix: &str) -> (lapin::Channel, String) {
    let ch = conn.create_channel().await.unwrap();
    let q = format!("{prefix}.tap");
    let opts = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    ch.queue_declare(q.as_str().into(), opts, FieldTable::default())
        .await
        .unwrap();
    for rk in BROKERS {
        ch.queue_bind(
            q.as_str().into(),
            prefix.into(),
            (*rk).into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    (ch, q)
}

/// Takes every message from the tap and counts the requests as clients sent
/// them: copies coming back from a retry tier (`x-beds-attempt`) are not new
/// requests.
async fn tapped(ch: &lapin::Channel, q: &str) -> u64 {
    let mut n = 0;
    while let Some(m) = ch
        .basic_get(q.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let retried = m
            .properties
            .headers()
            .as_ref()
            .is_some_and(|h| h.inner().contains_key("x-beds-attempt"));
        if !retried {
            n += 1;
        }
    }
    n
}

/// Rows in the `usr` table of database `db`.
fn usr_rows(db: &str) -> u64 {
    sql(Some(db), "SELECT COUNT(*) FROM usr")
        .trim()
        .parse()
        .unwrap()
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("report has no {k}: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_counts_match_what_the_broker_routed_and_the_database_holds() {
    let (mut node, debris, prefix, _log) = spawn_node("bench", &[]).await;
    let conn = amqp().await;
    let (ch, q) = tap(&conn, &prefix).await;
    let pid = node.id().unwrap().to_string();

    // An empty table: the bench lists keys, creates 40, then mixes reads
    // and creates.
    let (code, r, err) = bench(
        &debris.dir,
        &format!("--mix read=70,create=30 --count 300 --concurrency 8 --seed 40 --warmup 0s --json --node-pid {pid}"),
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(n(&r, "requests"), 300, "{r}");
    assert_eq!(n(&r, "ops"), 300);
    assert_eq!(n(&r, "ok_ops"), 300, "no errors expected: {r}");
    assert_eq!(r["errors"], serde_json::json!({}));
    assert_eq!(n(&r, "seed_requests"), 41, "one list + 40 creates");
    assert_eq!(r["mode"], "beds");
    assert_eq!(r["mix"], "read=70,create=30");
    // What RabbitMQ routed to the node is what the bench says it sent.
    assert_eq!(tapped(&ch, &q).await, 41 + 300);
    // Creates added rows, reads none (the bench does not count per op, so
    // the exact check is the creates-only batch run below).
    let rows: u64 = usr_rows(&prefix);
    let creates = rows - 40;
    assert!(creates > 0 && creates < 300, "creates {creates}");
    assert_eq!(r["server"]["pid"].as_u64(), Some(pid.parse().unwrap()));
    assert!(r["server"]["cpu_us_per_request"].as_f64().unwrap() > 0.0);
    assert!(r["server"]["rss_kib_end"].as_u64().unwrap() > 0);
    let lat = &r["latency_us"];
    assert!(n(lat, "p50") <= n(lat, "p99") && n(lat, "p99") <= n(lat, "max"));

    // Batches: 12 messages of 25 creates are 300 operations and 300 rows;
    // the warm-up is counted apart, and the keys exist now (one list).
    let (code, r, err) = bench(
        &debris.dir,
        &format!("--mix create --batch 25 --count 12 --concurrency 4 --warmup 0s --json --node-pid {pid}"),
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        (n(&r, "requests"), n(&r, "ops"), n(&r, "ok_ops")),
        (12, 300, 300),
        "{r}"
    );
    assert_eq!(n(&r, "seed_requests"), 0, "creates need no keys");
    assert_eq!(tapped(&ch, &q).await, 12);
    let after: u64 = usr_rows(&prefix);
    assert_eq!(after, rows + 300);

    // A warm-up is reported as such and routed like the rest.
    let (code, r, err) = bench(
        &debris.dir,
        &format!("--count 50 --warmup 1s --seed 10 --json --node-pid {pid}"),
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let warm = n(&r, "warmup_requests");
    assert!(warm > 0);
    assert_eq!(
        n(&r, "seed_requests"),
        1,
        "enough keys exist: only the list"
    );
    assert_eq!(tapped(&ch, &q).await, 1 + warm + 50);

    let _ = conn.close(200, "".into()).await;
    let _ = node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_report_their_own_counts() {
    let (mut node, debris, prefix, _log) = spawn_node("benchref", &[]).await;
    for (reference, batch) in [
        ("pipeline", "1"),
        ("pipeline", "5"),
        ("broker", "1"),
        ("database", "5"),
    ] {
        let (code, r, err) = bench(
            &debris.dir,
            &format!(
                "--reference {reference} --batch {batch} --count 40 --warmup 0s --seed 20 --concurrency 4 --json"
            ),
        )
        .await;
        assert_eq!(code, Some(0), "{reference}: {err}");
        let b: u64 = batch.parse().unwrap();
        assert_eq!(r["mode"], reference);
        assert_eq!(
            (n(&r, "requests"), n(&r, "ok_ops")),
            (40, 40 * b),
            "{reference}: {r}"
        );
        // The reference's own process is measured, except the database's,
        // which the bench process runs itself.
        assert_eq!(r["server"].is_null(), reference == "database", "{r}");
    }
    // The database reference creates through the procedure: the rows exist.
    let before: u64 = usr_rows(&prefix);
    let (code, r, err) = bench(
        &debris.dir,
        "--reference database --mix create --count 30 --warmup 0s -c 4 --json",
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(n(&r, "ok_ops"), 30);
    let after: u64 = usr_rows(&prefix);
    assert_eq!(after, before + 30);
    let _ = node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_refuses_what_it_cannot_measure() {
    let debris = Debris::prepared("benchbad");
    // No node consumes this prefix: say so instead of timing out.
    let (code, _, err) = bench(&debris.dir, "--count 5 --json").await;
    assert_eq!(code, Some(69), "{err}");
    assert!(err.contains("no BEDS node"), "{err}");
    for (args, needle) in [
        ("--mix reed=1", "no op \"reed\""),
        ("--template nope", "nope"),
        ("--batch 0", "--batch"),
        ("--concurrency 0", "--concurrency"),
        ("--seed 0", "--seed"),
        ("--duration 0s", "--duration"),
        ("--mix read=4294967295,create=1", "add up"),
    ] {
        let (code, _, err) = bench(&debris.dir, args).await;
        assert_eq!(code, Some(64), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// Notes in the `notes` collection of MongoDB database `db`.
async fn note_docs(db: &str) -> u64 {
    mongo()
        .await
        .database(db)
        .collection::<mongodb::bson::Document>("notes")
        .count_documents(mongodb::bson::doc! {})
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_on_mongodb_note_and_its_references() {
    let (mut node, debris, prefix, _log) = spawn_node("benchnote", &[]).await;
    let conn = amqp().await;
    let (ch, q) = tap(&conn, &prefix).await;
    // `note` has no op that lists without a key: the bench creates its
    // 20 keys, then reads them.
    let (code, r, err) = bench(
        &debris.dir,
        "--template note --mix read=80,create=20 --count 200 -c 4 --seed 20 --warmup 0s --json",
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!((n(&r, "requests"), n(&r, "ok_ops")), (200, 200), "{r}");
    assert_eq!(n(&r, "seed_requests"), 20, "20 creates, no list");
    assert_eq!(tapped(&ch, &q).await, 220);
    let docs = note_docs(&prefix).await;
    assert!(docs > 20 && docs < 220, "seeds plus the creates: {docs}");

    // The MongoDB forms of the references: the driver's own calls, straight
    // (database) and behind the thinnest lapin pipeline.
    for (reference, batch) in [("database", "1"), ("pipeline", "1"), ("pipeline", "5")] {
        let (code, r, err) = bench(
            &debris.dir,
            &format!("--template note --reference {reference} --batch {batch} --count 40 --warmup 0s --seed 20 -c 4 --json"),
        )
        .await;
        assert_eq!(code, Some(0), "{reference}: {err}");
        let b: u64 = batch.parse().unwrap();
        assert_eq!(
            (n(&r, "requests"), n(&r, "ok_ops")),
            (40, 40 * b),
            "{reference}: {r}"
        );
    }
    // The database reference's creates reach the collection.
    let before = note_docs(&prefix).await;
    let (code, r, err) = bench(
        &debris.dir,
        "--template note --reference database --mix create --count 30 --warmup 0s -c 4 --json",
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(n(&r, "ok_ops"), 30);
    assert_eq!(note_docs(&prefix).await, before + 30);
    let _ = conn.close(200, "".into()).await;
    let _ = node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_log_runs_its_own_nodes_with_and_without_the_event_log() {
    let debris = Debris::prepared("benchlog");
    let (code, r, err) = bench(
        &debris.dir,
        "--compare-log --mix create --count 30 --warmup 0s -c 4 --json",
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let runs = r["runs"].as_array().expect("two runs");
    let modes: Vec<&str> = runs.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["beds+log", "beds-log"]);
    for run in runs {
        assert_eq!(n(run, "ok_ops"), 30, "{run}");
        assert!(run["server"].is_object(), "the own node is measured: {run}");
    }
    // Only the node with the log wrote events: 30 creates (and no more).
    let logged = mongo()
        .await
        .database(&debris.prefix)
        .collection::<mongodb::bson::Document>("msLogs")
        .count_documents(mongodb::bson::doc! {"kind": "request", "op": "create"})
        .await
        .unwrap();
    assert_eq!(logged, 30);
    // The own nodes' queues are gone (their prefix is <prefix>b<8 hex>).
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "name"])
        .output()
        .expect("rabbitmqctl must be installed to list the queues");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let own = format!("{}b", debris.prefix);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.lines().any(|l| l.starts_with(&own)), "{text}");
}
