//! The admin plane with several real `beds` processes of different roles
//! on one RabbitMQ: `beds admin` (the binary) against an admin node, two
//! appServer nodes and a segundo node.

mod common;

use std::time::Duration;

use beds::client::{CallOptions, Client};
use common::cluster::{Cluster, RabbitUser};
use serde_json::{json, Value};

/// Fast heartbeats and counters, so the test does not wait long.
const FAST: &str = "\n[admin]\nheartbeat_ms = 300\nmissing_after_ms = 1500\ngraph_interval_ms = 500\nanswer_timeout_ms = 3000\n";

/// Waits until `status` hears from `n` nodes.
async fn all_known(c: &Cluster, login: Option<&RabbitUser>, n: u64) -> Value {
    let mut last = Value::Null;
    for _ in 0..100 {
        let (_, v, _) = c.admin_as(login, &["status"]).await;
        if v["answered"] == n && v["asked"] == n {
            return v;
        }
        last = v;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("status never heard {n} nodes; last: {last}");
}

fn node<'a>(answer: &'a Value, name: &str) -> &'a Value {
    answer["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == name)
        .unwrap_or_else(|| panic!("{name} not in {answer}"))
}

fn opts(secs: u64) -> CallOptions {
    CallOptions {
        timeout: Duration::from_secs(secs),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_pause_resume_prefetch_reload_drain_shutdown_over_the_admin_plane() {
    let c = Cluster::new("admin");
    c.overlay(&format!("{FAST}admins = [\"guest\"]\n"));
    let adm = c.node("admin", "adm", &[]).await;
    let app1 = c.node("appServer", "app-1", &[]).await;
    let app2 = c.node("appServer", "app-2", &[]).await;
    let seg = c.node("segundo", "seg", &[]).await;
    let client = Client::connect(common::AMQP_URL, c.prefix()).await.unwrap();

    // status: every node, its role and brokers, healthy databases.
    let s = all_known(&c, None, 4).await;
    assert_eq!(s["ok"], true, "{s}");
    assert_eq!(node(&s, "seg")["role"], "segundo");
    let app = &node(&s, "app-1")["result"];
    let brokers: Vec<&str> = app["brokers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(brokers, ["rBroker", "wBroker", "mBroker"]);
    assert_eq!(app["databases"]["primary"], "up");
    assert_eq!(node(&s, "adm")["result"]["brokers"], json!([]));

    // pause rBroker everywhere: reads wait in the queue; resume answers them.
    let (code, p, _) = c.admin(&["pause", "rBroker"]).await;
    assert_eq!(code, 0, "{p}");
    assert_eq!(node(&p, "app-2")["result"]["brokers"], json!(["rBroker"]));
    assert_eq!(node(&p, "seg")["result"]["brokers"], json!([]));
    let read = json!({"template": "usr", "op": "list", "data": {"limit": 1}});
    let waiting = client.call("rBroker", &read, &opts(2)).await;
    assert!(waiting.is_err(), "a paused broker answered: {waiting:?}");
    let s = c.admin(&["status"]).await.1;
    assert_eq!(node(&s, "app-1")["result"]["brokers"][0]["paused"], true);
    let writes = client
        .call("wBroker", &json!({"template": "usr", "op": "create", "data": {"name": "W", "email": "w@example.org"}}), &opts(10))
        .await
        .unwrap();
    assert!(writes.is_ok(), "wBroker kept serving: {writes:?}");
    let (code, _, _) = c.admin(&["resume", "rBroker"]).await;
    assert_eq!(code, 0);
    assert!(client
        .call("rBroker", &read, &opts(10))
        .await
        .unwrap()
        .is_ok());

    // A broker no node runs is an error, not silence.
    let (code, v, _) = c.admin(&["pause", "xBroker"]).await;
    assert_eq!(
        (code, v["error"].as_str().unwrap_or("").contains("xBroker")),
        (1, true),
        "{v}"
    );

    // prefetch on one node.
    let (code, v, _) = c
        .admin(&["prefetch", "3", "--broker", "wBroker", "--node", "app-1"])
        .await;
    assert_eq!(code, 0, "{v}");
    let s = c.admin(&["status"]).await.1;
    assert_eq!(node(&s, "app-1")["result"]["brokers"][1]["prefetch"], 3);
    assert_eq!(node(&s, "app-2")["result"]["brokers"][1]["prefetch"], 8);
    // The dispatchers really consume at the new prefetch: at 1 per node,
    // four slow writes run two at a time, one on each node.
    let (code, v, _) = c.admin(&["prefetch", "1", "--broker", "wBroker"]).await;
    assert_eq!(code, 0, "{v}");
    let slow: Vec<_> = (0..4)
        .map(|i| {
            let body = json!({"template": "tst", "op": "sleep", "data": {"ms": 1500, "key": format!("p{i}")}});
            let client = &client;
            async move { client.call("wBroker", &body, &opts(30)).await }
        })
        .collect();
    let (replies, during) = tokio::join!(futures::future::join_all(slow), async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        c.admin(&["status"]).await.1
    });
    assert!(
        replies.iter().all(|r| r.as_ref().is_ok_and(|r| r.is_ok())),
        "{replies:?}"
    );
    for n in ["app-1", "app-2"] {
        assert_eq!(
            node(&during, n)["result"]["brokers"][1]["in_flight"],
            1,
            "{during}"
        );
    }
    let (code, _, _) = c.admin(&["prefetch", "8", "--broker", "wBroker"]).await;
    assert_eq!(code, 0);

    // reload: a new template serves on every appServer node; a broken set
    // is refused there and the old one keeps serving.
    let usr2 = std::fs::read_to_string(c.templates_dir().join("usr.toml"))
        .unwrap()
        .replace("name = \"usr\"", "name = \"usr2\"");
    std::fs::write(c.templates_dir().join("usr2.toml"), usr2).unwrap();
    let before = node(&s, "app-1")["result"]["templates"]["version"].clone();
    let (code, r, _) = c.admin(&["reload"]).await;
    assert_eq!(code, 0, "{r}");
    let s = c.admin(&["status"]).await.1;
    let v1 = node(&s, "app-1")["result"]["templates"].clone();
    assert_ne!(v1["version"], before);
    assert_eq!(
        v1,
        node(&s, "app-2")["result"]["templates"],
        "both appServer nodes serve the same set"
    );
    for _ in 0..4 {
        let r = client
            .call(
                "rBroker",
                &json!({"template": "usr2", "op": "list", "data": {}}),
                &opts(10),
            )
            .await
            .unwrap();
        assert!(r.is_ok(), "usr2 after reload: {r:?}");
    }
    std::fs::write(
        c.templates_dir().join("broken.toml"),
        "name = \"broken\"\nkind = \"rec\"\nstore = \"mariadb\"\ndatabase = \"primary\"\n[fields]\nid = { type = \"int\" }\n[ops.read]\nprocedure = \"no_such_proc\"\nparams = [\"id\"]\nreturns = \"one\"\naccess = \"read\"\n",
    )
    .unwrap();
    let (code, r, _) = c.admin(&["reload"]).await;
    assert_eq!(code, 1, "{r}");
    for n in ["app-1", "app-2"] {
        let a = node(&r, n);
        assert_eq!(a["ok"], false);
        assert!(a["error"].as_str().unwrap().contains("no_such_proc"), "{a}");
    }
    assert_eq!(
        node(&r, "seg")["ok"],
        true,
        "segundo does not serve the broken template"
    );
    let s = c.admin(&["status"]).await.1;
    assert_eq!(
        node(&s, "app-2")["result"]["templates"],
        v1,
        "the old set keeps serving"
    );
    std::fs::remove_file(c.templates_dir().join("broken.toml")).unwrap();

    // drain app-1 with requests in flight: they finish, then it takes
    // nothing until resume.
    let sleeps: Vec<_> = (0..6)
        .map(|i| {
            let body = json!({"template": "tst", "op": "sleep", "data": {"ms": 800, "key": format!("d{i}")}});
            let client = &client;
            async move { client.call("wBroker", &body, &opts(30)).await }
        })
        .collect();
    let (replies, drained) = tokio::join!(futures::future::join_all(sleeps), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.admin(&["drain", "--node", "app-1"]).await
    });
    assert_eq!(drained.0, 0, "{}", drained.1);
    assert_eq!(node(&drained.1, "app-1")["result"]["drained"], true);
    assert!(
        replies.iter().all(|r| r.as_ref().is_ok_and(|r| r.is_ok())),
        "{replies:?}"
    );
    let s = c.admin(&["status"]).await.1;
    assert_eq!(node(&s, "app-1")["result"]["state"], "drained");
    // Drained, app-1 takes nothing: app-2 answers everything meanwhile.
    let handled = |s: &Value, n: &str| node(s, n)["result"]["handled"].as_u64().unwrap();
    let (h1, h2) = (handled(&s, "app-1"), handled(&s, "app-2"));
    for i in 0..4 {
        let body = json!({"template": "usr", "op": "create", "data": {"name": "D", "email": format!("d{i}@example.org")}});
        assert!(client
            .call("wBroker", &body, &opts(10))
            .await
            .unwrap()
            .is_ok());
    }
    let s = c.admin(&["status"]).await.1;
    assert_eq!(
        (handled(&s, "app-1"), handled(&s, "app-2")),
        (h1, h2 + 4),
        "{s}"
    );
    let (code, _, _) = c.admin(&["resume", "--node", "app-1"]).await;
    assert_eq!(code, 0);

    // shutdown app-1 while requests run: they are answered, it exits 0.
    let sleeps: Vec<_> = (0..4)
        .map(|i| {
            let body = json!({"template": "tst", "op": "sleep", "data": {"ms": 600, "key": format!("s{i}")}});
            let client = &client;
            async move { client.call("wBroker", &body, &opts(30)).await }
        })
        .collect();
    let (replies, shut) = tokio::join!(futures::future::join_all(sleeps), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.admin(&["shutdown", "--node", "app-1"]).await
    });
    assert_eq!(shut.0, 0, "{}", shut.1);
    assert!(
        replies.iter().all(|r| r.as_ref().is_ok_and(|r| r.is_ok())),
        "{replies:?}"
    );
    let mut app1 = app1;
    let exit = tokio::time::timeout(Duration::from_secs(20), app1.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    let counted = common::sql(
        Some(c.prefix()),
        "SELECT COUNT(*), SUM(n) FROM tst_counter WHERE k LIKE 'd%' OR k LIKE 's%'",
    );
    assert_eq!(
        counted.lines().last().unwrap().trim(),
        "10\t10",
        "each in-flight request applied once"
    );

    // A node that stopped cleanly leaves; a killed one is missing.
    let mut app2 = app2;
    app2.child.kill().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, s, _) = c.admin(&["status"]).await;
    assert_eq!(code, 1, "{s}");
    assert_eq!(
        (s["asked"].clone(), s["answered"].clone()),
        (json!(3), json!(2)),
        "{s}"
    );
    assert_eq!(s["missing"], json!(["app-2"]));

    // Every command is an admin event with its user; counters are stored
    // with a TTL.
    let db = common::mongo().await.database(c.prefix());
    let pauses = mongodb::bson::doc! {"kind": "admin", "op": "pause"};
    let logs = db.collection::<mongodb::bson::Document>("msLogs");
    common::eventually(10, "both pauses logged", || {
        let (logs, pauses) = (logs.clone(), pauses.clone());
        async move { logs.count_documents(pauses).await.unwrap() == 2 }
    })
    .await;
    let events: Vec<mongodb::bson::Document> =
        futures::TryStreamExt::try_collect(logs.find(pauses).await.unwrap())
            .await
            .unwrap();
    assert!(events.iter().all(|e| e.get_str("user_id") == Ok("guest")));
    let graphs = db.collection::<mongodb::bson::Document>("msGraphs");
    common::eventually(10, "app-2's counters stored", || {
        let graphs = graphs.clone();
        async move {
            graphs
                .count_documents(mongodb::bson::doc! {"node": "app-2", "brokers.broker": "rBroker"})
                .await
                .unwrap()
                >= 1
        }
    })
    .await;
    let ttl: Vec<mongodb::IndexModel> =
        futures::TryStreamExt::try_collect(graphs.list_indexes().await.unwrap())
            .await
            .unwrap();
    assert!(ttl
        .iter()
        .any(|i| i.options.as_ref().and_then(|o| o.expire_after)
            == Some(Duration::from_secs(14 * 86_400))));

    // The node records the observer lists: the stopped node says so, the
    // killed one's last heartbeat is older than its missing_after_ms, the
    // live ones are fresh; all with their role and template set.
    let records = db.collection::<mongodb::bson::Document>("msNodes");
    let now = mongodb::bson::DateTime::now().timestamp_millis();
    let record = |name: &'static str| {
        let records = records.clone();
        async move {
            records
                .find_one(mongodb::bson::doc! {"_id": name})
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("no msNodes record for {name}"))
        }
    };
    let age =
        |d: &mongodb::bson::Document| now - d.get_datetime("last_seen").unwrap().timestamp_millis();
    let (r_app1, r_app2, r_seg, r_adm) = (
        record("app-1").await,
        record("app-2").await,
        record("seg").await,
        record("adm").await,
    );
    assert_eq!(r_app1.get_bool("alive"), Ok(false), "{r_app1}");
    assert_eq!(r_app2.get_bool("alive"), Ok(true), "{r_app2}");
    assert_eq!(r_app2.get_i64("missing_after_ms"), Ok(1500), "{r_app2}");
    assert!(
        age(&r_app2) > 1500,
        "app-2 is missing by its record: {r_app2}"
    );
    for r in [&r_seg, &r_adm] {
        assert_eq!(r.get_bool("alive"), Ok(true), "{r}");
        assert!(age(r) < 1500, "a live node's record is fresh: {r}");
    }
    assert_eq!(r_seg.get_str("role"), Ok("segundo"));
    assert!(r_seg
        .get_array("brokers")
        .unwrap()
        .contains(&mongodb::bson::Bson::String("whBroker".into())));
    assert_eq!(
        r_seg.get_str("templates").ok(),
        node(&s, "seg")["result"]["templates"]["version"].as_str(),
        "{r_seg} vs {s}"
    );
    client.close().await;

    // shutdown of all: every live node, the admin node last (after its
    // answer); the killed one named missing.
    let (code, v, _) = c.admin(&["shutdown"]).await;
    assert_eq!(code, 1, "{v}");
    assert_eq!(
        (v["answered"].clone(), v["missing"].clone()),
        (json!(2), json!(["app-2"])),
        "{v}"
    );
    assert!(
        node(&v, "adm")["ok"] == true && node(&v, "seg")["ok"] == true,
        "{v}"
    );
    for mut n in [adm, seg] {
        let exit = tokio::time::timeout(Duration::from_secs(20), n.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(exit.code(), Some(0), "{} exits 0 after shutdown", n.name);
    }
    // The admin node recorded its own clean stop, and seg's.
    for name in ["adm", "seg"] {
        let r = record(name).await;
        assert_eq!(r.get_bool("alive"), Ok(false), "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_may_look_but_not_pause_nor_go_around_the_plane() {
    // An operator's own RabbitMQ account, apart from the nodes' (guest).
    let viewer = RabbitUser::create("view");
    let c = Cluster::new("viewer");
    c.overlay(&format!("{FAST}viewers = [\"{}\"]\n", viewer.name));
    let _adm = c.node("admin", "adm", &[]).await;
    let _app = c.node("appServer", "app", &[]).await;
    all_known(&c, Some(&viewer), 2).await;
    let (code, s, _) = c.admin_as(Some(&viewer), &["status"]).await;
    assert_eq!((code, s["answered"].clone()), (0, json!(2)), "{s}");
    let (code, v, _) = c.admin_as(Some(&viewer), &["pause", "rBroker"]).await;
    assert_eq!(code, 1);
    let why = v["error"].as_str().unwrap();
    let expected = format!(
        "user {} (role viewer) may not run pause: it needs role operator",
        viewer.name
    );
    assert!(why.contains(&expected), "{why}");
    assert_eq!(v["asked"], 0, "nothing was forwarded");

    let conn = lapin::Connection::connect(&viewer.url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let reply = ch
        .queue_declare(
            "".into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let mut answers = ch
        .basic_consume(
            reply.name().as_str().into(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let as_viewer = || {
        lapin::BasicProperties::default()
            .with_reply_to(reply.name().clone())
            .with_user_id(viewer.name.as_str().into())
    };

    // Hostile bodies on adminBrokerIn: each answered "not a command".
    let huge = format!(r#"{{"command":"status","node":"{}"}}"#, "x".repeat(100_000));
    let bodies: [&[u8]; 4] = [
        b"\xff\xfe",
        br#"{"command":"explode"}"#,
        br#"{"command":"status","command":"shutdown"}"#,
        huge.as_bytes(),
    ];
    for body in bodies {
        ch.basic_publish(
            c.prefix().into(),
            "adminBrokerIn".into(),
            Default::default(),
            body,
            as_viewer(),
        )
        .await
        .unwrap();
        let d = tokio::time::timeout(
            Duration::from_secs(10),
            futures::StreamExt::next(&mut answers),
        )
        .await
        .expect("an answer to a hostile body")
        .unwrap()
        .unwrap();
        let a: Value = serde_json::from_slice(&d.data).unwrap();
        assert_eq!(a["ok"], false, "{a}");
        assert!(
            a["error"].as_str().unwrap().starts_with("not a command"),
            "{a}"
        );
    }

    // Around the plane: a pause straight to the nodes' key is ignored (no
    // answer, nothing paused), and a forged heartbeat adds no member.
    ch.basic_publish(
        c.prefix().into(),
        "adminBrokerOut".into(),
        Default::default(),
        br#"{"command":"pause"}"#,
        as_viewer(),
    )
    .await
    .unwrap();
    let ghost = json!({"node": "ghost", "role": "appServer", "brokers": [], "version": "0", "templates": "x", "started_ms": 0, "ts_ms": 0, "alive": true});
    ch.basic_publish(
        c.prefix().into(),
        "adminSyslogBroker".into(),
        Default::default(),
        ghost.to_string().as_bytes(),
        as_viewer(),
    )
    .await
    .unwrap();
    let none = tokio::time::timeout(
        Duration::from_secs(2),
        futures::StreamExt::next(&mut answers),
    )
    .await;
    assert!(
        none.is_err(),
        "a node answered a command from a viewer: {none:?}"
    );
    let (code, s, _) = c.admin_as(Some(&viewer), &["status"]).await;
    assert_eq!((code, s["asked"].clone()), (0, json!(2)), "{s}");
    assert_eq!(node(&s, "app")["result"]["brokers"][0]["paused"], false);
    let _ = conn.close(200, "".into()).await;

    // The refusal is an admin event with the viewer's name.
    let db = common::mongo().await.database(c.prefix());
    let who = viewer.name.clone();
    common::eventually(10, "the refused pause logged", || {
        let (db, who) = (db.clone(), who.clone());
        async move {
            db.collection::<mongodb::bson::Document>("msLogs")
                .count_documents(mongodb::bson::doc! {"kind": "admin", "op": "pause", "status": "error", "code": "REFUSED", "user_id": who})
                .await
                .unwrap()
                == 1
        }
    })
    .await;
}
