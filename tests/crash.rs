//! Faults with real processes under load: a node killed with -9, two nodes
//! on the same queues with one killed, RabbitMQ restarted, MariaDB
//! restarted. Each scenario streams `usr` creates with message ids (each its
//! own email) at a fixed rate from publishers that republish until RabbitMQ
//! confirms, and then checks: every request applied exactly once, every
//! request answered (all answers to one request identical, none an error),
//! nothing parked. The scenarios stop servers the rest of the suite uses, so
//! they run one at a time (and `cargo test` runs test binaries one after
//! another).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{json, Value};

use common::Debris;

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// One scenario at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Replies by request number: every body received for it.
type Replies = Arc<Mutex<HashMap<usize, Vec<Value>>>>;

/// A stream of `n` creates at `rate` per second to `prefix`'s wBroker, with
/// replies to the durable queue `reply_queue`. Returns once every request is
/// confirmed by RabbitMQ; each is republished (same message id) until it is.
async fn publish(
    prefix: &str,
    reply_queue: &str,
    n: usize,
    rate: u64,
    republished: Arc<Mutex<usize>>,
) {
    let publishers = 4;
    let per = Duration::from_micros(1_000_000 * publishers as u64 / rate);
    let tasks = (0..publishers).map(|k| {
        let (prefix, reply_queue, republished) = (
            prefix.to_string(),
            reply_queue.to_string(),
            republished.clone(),
        );
        async move {
            let mut channel = None;
            let mut tick = tokio::time::interval(per);
            for i in (k..n).step_by(publishers) {
                tick.tick().await;
                let body = json!({"template": "usr", "op": "create",
                    "data": {"name": "Crash", "email": format!("{i}@{prefix}")}})
                .to_string();
                let props = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_message_id(format!("m-{i}").into())
                    .with_correlation_id(i.to_string().into())
                    .with_reply_to(reply_queue.clone().into());
                let mut tries = 0;
                loop {
                    if channel.is_none() {
                        channel = open_confirming().await;
                    }
                    if let Some(ch) = &channel {
                        let sent = ch
                            .basic_publish(
                                prefix.as_str().into(),
                                "wBroker".into(),
                                BasicPublishOptions::default(),
                                body.as_bytes(),
                                props.clone(),
                            )
                            .await;
                        let confirmed = match sent {
                            Ok(c) => matches!(c.await, Ok(lapin::Confirmation::Ack(None))),
                            Err(_) => false,
                        };
                        if confirmed {
                            break;
                        }
                        channel = None;
                    }
                    tries += 1;
                    *republished.lock().unwrap() += 1;
                    assert!(tries < 600, "request {i} never confirmed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    futures::future::join_all(tasks).await;
}

/// A channel with publisher confirms on a new connection (None while
/// RabbitMQ is away).
async fn open_confirming() -> Option<lapin::Channel> {
    let conn = tokio::time::timeout(
        Duration::from_secs(2),
        Connection::connect(AMQP_URL, ConnectionProperties::default()),
    )
    .await
    .ok()?
    .ok()?;
    let ch = conn.create_channel().await.ok()?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .ok()?;
    // The connection lives as long as its channel is used.
    std::mem::forget(conn);
    Some(ch)
}

/// Declares the durable reply queue and collects from it until `done`,
/// reconnecting whenever RabbitMQ goes away.
fn collect(reply_queue: String, replies: Replies, done: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        while !done.is_cancelled() {
            let Some(ch) = open_confirming().await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let durable = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            if ch
                .queue_declare(reply_queue.as_str().into(), durable, FieldTable::default())
                .await
                .is_err()
            {
                continue;
            }
            let Ok(mut c) = ch
                .basic_consume(
                    reply_queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
            else {
                continue;
            };
            loop {
                tokio::select! {
                    _ = done.cancelled() => return,
                    d = c.next() => match d {
                        Some(Ok(d)) => {
                            let cid: usize = d.properties.correlation_id().as_ref()
                                .and_then(|c| c.as_str().parse().ok()).unwrap_or(usize::MAX);
                            let body: Value = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
                            replies.lock().unwrap().entry(cid).or_default().push(body);
                        }
                        _ => break,
                    }
                }
            }
        }
    });
}

/// What a scenario ended with, for the report (read through `Debug`).
#[derive(Debug)]
#[allow(dead_code)]
struct Counts {
    requests: usize,
    applied_once: usize,
    answered: usize,
    duplicate_answers: usize,
    republished: usize,
    parked: u32,
}

/// Runs `n` creates at `rate`/s against the node(s) on `debris`, calls
/// `fault` once the stream runs, waits for every answer, and checks.
async fn under_load<F, Fut>(debris: &Debris, n: usize, rate: u64, fault: F) -> Counts
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let prefix = debris.prefix.clone();
    let reply_queue = format!("{prefix}.test-replies");
    let replies: Replies = Arc::default();
    let done = tokio_util::sync::CancellationToken::new();
    collect(reply_queue.clone(), replies.clone(), done.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let republished = Arc::new(Mutex::new(0));
    let stream = publish(&prefix, &reply_queue, n, rate, republished.clone());
    let ((), ()) = tokio::join!(stream, fault());
    let t0 = Instant::now();
    while replies.lock().unwrap().len() < n && t0.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Late duplicates have a moment to show up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    done.cancel();
    let replies = replies.lock().unwrap().clone();
    let missing: Vec<usize> = (0..n).filter(|i| !replies.contains_key(i)).collect();
    assert!(
        missing.is_empty(),
        "{} requests never answered, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    for (i, bodies) in &replies {
        assert!(
            bodies.iter().all(|b| b == &bodies[0]),
            "request {i} got different answers: {bodies:?}"
        );
        assert_eq!(bodies[0]["status"], "ok", "request {i}: {}", bodies[0]);
    }
    let counts = common::sql(
        Some(&prefix),
        &format!("SELECT COUNT(*), COUNT(DISTINCT email) FROM usr WHERE email LIKE '%@{prefix}'"),
    );
    let counts: Vec<usize> = counts
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .collect();
    assert_eq!(counts, vec![n, n], "each request applied exactly once");
    let parked = queue_len(&format!("{prefix}.wBroker.dlq")).await;
    assert_eq!(parked, 0, "nothing parked");
    let r = Counts {
        requests: n,
        applied_once: counts[0],
        answered: replies.len(),
        duplicate_answers: replies.values().map(|b| b.len() - 1).sum(),
        republished: *republished.lock().unwrap(),
        parked,
    };
    eprintln!("crash scenario counts: {r:?}");
    r
}

async fn queue_len(queue: &str) -> u32 {
    let conn = common::amqp().await;
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "".into()).await;
    q.message_count()
}

async fn kill9(child: &mut tokio::process::Child) {
    let pid = child.id().expect("running") as i32;
    // SAFETY: a plain kill(2) of our own child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = child.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_under_load_loses_and_repeats_nothing() {
    let _one = SERIAL.lock().await;
    let debris = Debris::prepared("k9");
    let (mut node, _log) = common::spawn_beds(&debris.dir, &[]).await;
    let restarted = Arc::new(Mutex::new(None));
    let keep = restarted.clone();
    let dir = debris.dir.clone();
    let c = under_load(&debris, 3000, 600, || async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        kill9(&mut node).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        *keep.lock().unwrap() = Some(common::spawn_beds(&dir, &[]).await);
    })
    .await;
    assert_eq!(c.applied_once, 3000);
    drop(restarted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_on_one_queue_with_one_killed_lose_and_repeat_nothing() {
    let _one = SERIAL.lock().await;
    let debris = Debris::prepared("k2");
    let (mut a, _la) = common::spawn_beds(&debris.dir, &[]).await;
    let (_b, _lb) = common::spawn_beds(&debris.dir, &[]).await;
    let c = under_load(&debris, 3000, 600, || async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        kill9(&mut a).await;
    })
    .await;
    assert_eq!(c.applied_once, 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rabbitmq_restart_under_load_loses_no_reply() {
    let _one = SERIAL.lock().await;
    let debris = Debris::prepared("rr");
    let (_node, log) = common::spawn_beds(&debris.dir, &[]).await;
    let prefix = debris.prefix.clone();
    let c = under_load(&debris, 2000, 200, || async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        rabbitmqctl("stop_app");
        tokio::time::sleep(Duration::from_secs(5)).await;
        rabbitmqctl("start_app");
        // A client on direct reply-to that reconnects at once: its first
        // requests (the ones the issue saw lost) are answered.
        let client = loop {
            match beds::client::Client::connect(AMQP_URL, &prefix).await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        for i in 0..20 {
            let q = json!({"template": "usr", "op": "create",
                "data": {"name": "After", "email": format!("after{i}@{prefix}.x")}});
            let opts = beds::client::CallOptions {
                timeout: Duration::from_secs(30),
                message_id: Some(format!("a-{i}")),
                ..Default::default()
            };
            let r = client.call("wBroker", &q, &opts).await;
            assert!(
                r.as_ref().is_ok_and(|r| r.is_ok()),
                "request {i} after the restart: {r:?}"
            );
        }
    })
    .await;
    assert!(
        c.republished > 0,
        "the restart happened under the stream: {c:?}"
    );
    assert!(
        log.lock().unwrap().contains("reconnecting"),
        "the node reconnected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mariadb_restart_under_load_loses_and_repeats_nothing() {
    let _one = SERIAL.lock().await;
    let debris = Debris::prepared("mr");
    let (_node, log) = common::spawn_beds(&debris.dir, &[]).await;
    let _restore = MariaDbBack;
    let c = under_load(&debris, 2000, 200, || async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let out = std::process::Command::new("mariadb-admin")
            .args([
                "-h127.0.0.1",
                &format!("-u{}", common::mysql_user()),
                "shutdown",
            ])
            .env("MYSQL_PWD", common::mysql_pass())
            .output()
            .expect("mariadb-admin must be installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        start_mariadb();
    })
    .await;
    assert_eq!(c.applied_once, 2000);
    assert!(
        log.lock().unwrap().contains("database down"),
        "the node saw the outage"
    );
}

fn rabbitmqctl(cmd: &str) {
    let out = std::process::Command::new("rabbitmqctl")
        .arg(cmd)
        .output()
        .expect("rabbitmqctl must be installed to restart RabbitMQ");
    assert!(
        out.status.success(),
        "rabbitmqctl {cmd} failed (run the tests as a user with RabbitMQ's Erlang cookie): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts MariaDB as `utilities/dev setup` does, and waits for its port.
fn start_mariadb() {
    if std::net::TcpStream::connect("127.0.0.1:3306").is_ok() {
        return;
    }
    let _ = std::fs::create_dir_all("/run/mysqld");
    let _ = std::process::Command::new("chown")
        .args(["mysql:mysql", "/run/mysqld"])
        .status();
    let started = std::process::Command::new("start-stop-daemon")
        .args([
            "--start",
            "--oknodo",
            "--background",
            "--exec",
            "/usr/sbin/mariadbd",
            "--",
            "--user=mysql",
            "--bind-address=127.0.0.1",
        ])
        .status()
        .expect("start-stop-daemon starts MariaDB");
    assert!(started.success());
    let t0 = Instant::now();
    while std::net::TcpStream::connect("127.0.0.1:3306").is_err() {
        assert!(t0.elapsed() < Duration::from_secs(60), "MariaDB came back");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Brings MariaDB back even when the scenario failed half way.
struct MariaDbBack;

impl Drop for MariaDbBack {
    fn drop(&mut self) {
        start_mariadb();
    }
}
