//! MongoDB as a server that can stop: tests that start a MongoDB-compatible
//! server of their own (SecantusDB from the repository's `.venv`, which
//! `utilities/dev setup` installs), so they can restart it or run it
//! without a replica set, without disturbing the server other tests share.

mod common;

use std::time::Duration;

use common::{Opts, TestEnv};
use serde_json::json;

/// A server process of the test's own, on a free port, with its data in a
/// temp folder (kept across `restart`, removed on drop).
struct OwnServer {
    port: u16,
    dir: std::path::PathBuf,
    args: Vec<&'static str>,
    child: Option<std::process::Child>,
    /// One such server at a time: four Python servers building indexes at
    /// once on a 2-core CI machine made nodes miss their IPL timeouts.
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

/// Whose turn it is to run a server of its own.
fn turns() -> std::sync::Arc<tokio::sync::Mutex<()>> {
    static TURN: std::sync::OnceLock<std::sync::Arc<tokio::sync::Mutex<()>>> =
        std::sync::OnceLock::new();
    TURN.get_or_init(Default::default).clone()
}

impl OwnServer {
    async fn start(args: &[&'static str]) -> OwnServer {
        let turn = turns().lock_owned().await;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(common::unique("mongo"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = OwnServer {
            port,
            dir,
            args: args.to_vec(),
            child: None,
            _turn: turn,
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let bin = std::env::var("BEDS_TEST_SECANTUS")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| common::root().join(".venv/bin/secantusd-py"));
        assert!(
            bin.is_file(),
            "{} not found: these tests need a MongoDB-compatible server they can stop \
             (run utilities/dev setup, or set BEDS_TEST_SECANTUS)",
            bin.display()
        );
        let child = std::process::Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--storage-path")
            .arg(&self.dir)
            .args(["--log-level", "WARNING"])
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        for _ in 0..240 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("the test's own MongoDB-compatible server did not listen within 60 s");
    }

    /// Stops the server the way an operator does (SIGTERM), and waits; one
    /// that has not exited after 10 s (SecantusDB's shutdown hung once
    /// under load) is killed.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let t0 = std::time::Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if t0.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A node whose `docs` database is on `server`, with the note script
/// applied there.
async fn node_on(server: &OwnServer, opts: Opts) -> TestEnv {
    let prefix = common::unique("q");
    common::create_db(&prefix);
    for script in ["utilities/mongo/note.json", "utilities/mongo/inbox.json"] {
        common::mongo_script_at(server.port, &prefix, &common::root().join(script)).await;
    }
    TestEnv::start_on(
        prefix,
        Opts {
            mongo_port: server.port,
            ..opts
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_stopped_and_restarted_while_requests_flow() {
    let mut server = OwnServer::start(&[]).await;
    let env = node_on(
        &server,
        Opts {
            retry_tiers_ms: vec![100, 100],
            ..Default::default()
        },
    )
    .await;
    let first =
        json!({"template": "note", "op": "create", "data": {"user_id": 3, "title": "before"}});
    assert!(env.call("wBroker", first).await.is_ok());
    server.stop();
    common::notes_wait_out_an_outage(&env, 3, server.spawn()).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_transactions_refuses_atomic_batches_with_validation() {
    // Standalone: no replica set, so no multi-document transactions. BEDS
    // reads that from the server's `hello`, not from its name.
    let server = OwnServer::start(&["--standalone"]).await;
    let env = node_on(&server, Opts::default()).await;
    let create =
        |t: &str| json!({"template": "note", "op": "create", "data": {"user_id": 4, "title": t}});
    let r = env
        .call(
            "wBroker",
            json!({"atomic": true, "batch": [create("a"), create("b")]}),
        )
        .await;
    let e = r.error.clone().expect("refused");
    assert_eq!(e.code, "VALIDATION", "{r:?}");
    assert!(
        e.message.contains("cannot run transactions"),
        "{}",
        e.message
    );
    let by_user = json!({"template": "note", "op": "by_user", "data": {"user_id": 4}});
    let r = env.call("rBroker", by_user.clone()).await;
    assert_eq!(r.data.map(|d| d.len()), Some(0), "nothing applied");
    // Everything else works: single writes (acknowledged write concern) and
    // ordered, non-atomic batches.
    let r = env
        .call("wBroker", json!({"batch": [create("a"), create("b")]}))
        .await;
    assert!(r.is_ok(), "{r:?}");
    let r = env.call("rBroker", by_user.clone()).await;
    assert_eq!(r.data.map(|d| d.len()), Some(2));
    // The inbox without transactions: claim, write, record, in that order;
    // a repeat still gets the first answer and writes nothing.
    let once = beds::client::CallOptions {
        message_id: Some("st-1".into()),
        ..Default::default()
    };
    let first = env.call_opts("wBroker", create("c"), once.clone()).await;
    let again = env.call_opts("wBroker", create("c"), once).await;
    assert!(first.is_ok(), "{first:?}");
    assert_eq!(again, first);
    let r = env.call("rBroker", by_user).await;
    assert_eq!(r.data.map(|d| d.len()), Some(3));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_log_waits_out_a_mongodb_outage_and_writes_each_event_once() {
    let mut server = OwnServer::start(&[]).await;
    let env = node_on(&server, Opts::default()).await;
    let coll = common::mongo_at(server.port)
        .await
        .database(&env.db)
        .collection::<mongodb::bson::Document>("msLogs");
    server.stop();
    // 2,000 usr reads (MariaDB) while the log's MongoDB is away: every one
    // is answered at once.
    let read = |i: i64| json!({"template": "usr", "op": "read", "data": {"id": 800000 + i}});
    let mut ids = Vec::new();
    for chunk in 0..40 {
        let calls = (0..50).map(|i| env.call("rBroker", read(chunk * 50 + i)));
        for r in futures::future::join_all(calls).await {
            assert_eq!(
                r.code(),
                Some("NOT_FOUND"),
                "answered during the outage: {r:?}"
            );
            ids.push(r.event_id);
        }
    }
    let spool = env.dir.join("spool").join(&env.prefix);
    common::eventually(30, "events are spooled while MongoDB is away", || async {
        std::fs::read_dir(&spool).is_ok_and(|d| d.count() > 0)
    })
    .await;
    server.spawn().await;
    common::eventually(60, "every event reaches the collection", || async {
        coll.count_documents(mongodb::bson::doc! {"_id": {"$in": &ids}})
            .await
            .is_ok_and(|n| n == 2000)
    })
    .await;
    let requests = coll
        .count_documents(mongodb::bson::doc! {"kind": "request"})
        .await
        .unwrap();
    assert_eq!(requests, 2000, "each event exactly once");
    common::eventually(30, "the spool is emptied", || async {
        std::fs::read_dir(&spool).is_ok_and(|d| d.count() == 0)
    })
    .await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_drops_the_oldest_events_and_says_so() {
    let mut server = OwnServer::start(&[]).await;
    let env = node_on(
        &server,
        Opts {
            spool_max_bytes: 1024 * 1024,
            ..Default::default()
        },
    )
    .await;
    server.stop();
    // About 6,000 events of some 300 bytes: more than the 1 MiB spool.
    let read = |i: i64| json!({"template": "usr", "op": "read", "data": {"id": 700000 + i}});
    for chunk in 0..120 {
        let calls = (0..50).map(|i| env.call("rBroker", read(chunk * 50 + i)));
        for r in futures::future::join_all(calls).await {
            assert_eq!(
                r.code(),
                Some("NOT_FOUND"),
                "requests never wait for the log"
            );
        }
    }
    let spool = env.dir.join("spool").join(&env.prefix);
    let size = || -> u64 {
        std::fs::read_dir(&spool)
            .map(|d| {
                d.flatten()
                    .filter_map(|f| f.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    common::eventually(30, "the spool reaches its bound", || async {
        size() > 900 * 1024
    })
    .await;
    // The last batches reach the spool within a flush or two.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // One batch file may go over while the oldest are removed.
    assert!(size() <= 1024 * 1024 + 600 * 500, "bounded: {}", size());
    server.spawn().await;
    let coll = common::mongo_at(server.port)
        .await
        .database(&env.db)
        .collection::<mongodb::bson::Document>("msLogs");
    common::eventually(60, "a spool_full lifecycle event", || async {
        coll.count_documents(mongodb::bson::doc! {"kind": "lifecycle", "op": "spool_full"})
            .await
            .is_ok_and(|n| n >= 1)
    })
    .await;
    let kept = coll
        .count_documents(mongodb::bson::doc! {"kind": "request"})
        .await
        .unwrap();
    assert!(
        kept > 0 && kept < 6000,
        "the oldest dropped, the rest written: {kept}"
    );
    env.finish().await;
}
