//! Test harness: every `TestEnv` gets its own AMQP prefix and MariaDB
//! database on the real servers, runs a real BEDS node in-process, and
//! removes its queues, exchange and database when it ends (also on panic).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use beds::broker::reply::Reply;
use beds::client::{CallOptions, Client};
use beds::config::{Config, Env, LoggingConfig};
use beds::ipl::Node;
use futures::StreamExt;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const BROKERS: [&str; 3] = ["rBroker", "wBroker", "mBroker"];
/// Every data broker of the shipped config: cleanup removes all their queues.
pub const ALL_BROKERS: [&str; 7] = [
    "rBroker", "wBroker", "mBroker", "whBroker", "cBroker", "uBroker", "sBroker",
];

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn mysql_user() -> String {
    std::env::var("BEDS_TEST_MYSQL_USER").unwrap_or_else(|_| "root".into())
}

pub fn mysql_pass() -> String {
    std::env::var("BEDS_TEST_MYSQL_PASS").unwrap_or_default()
}

/// Runs SQL through the `mariadb` client as the test admin; returns stdout.
pub fn sql(db: Option<&str>, input: &str) -> String {
    let mut cmd = Command::new("mariadb");
    cmd.args(["-h127.0.0.1", "-N", "-B", &format!("-u{}", mysql_user())])
        .env("MYSQL_PWD", mysql_pass());
    if let Some(db) = db {
        cmd.arg(db);
    }
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the mariadb client must be installed (utilities/dev setup)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "SQL failed: {}\n{input}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn unique(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "bt_{tag}_{}_{}_{:04x}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        rand::random::<u16>()
    )
}

/// Knobs a test may turn; the defaults keep tests fast.
#[derive(Clone)]
pub struct Opts {
    pub retry_tiers_ms: Vec<u64>,
    pub prefetch: u16,
    pub instances: usize,
    pub drain_timeout_ms: u64,
    pub max_payload_bytes: usize,
    /// Point the node at this port instead of MariaDB's (an outage proxy).
    pub db_port: u16,
    pub acquire_timeout_ms: u64,
    pub queue_type: &'static str,
    /// Run the node as this MariaDB (user, password) instead of the admin.
    pub db_login: Option<(String, String)>,
    /// Configure a read replica on this port (the same server, via a proxy).
    pub replica_port: Option<u16>,
    /// Point the node's MongoDB entry at this port (an outage proxy).
    pub mongo_port: u16,
    /// `events.spool_max_bytes`.
    pub spool_max_bytes: u64,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            retry_tiers_ms: vec![200, 400],
            prefetch: 8,
            instances: 1,
            drain_timeout_ms: 10_000,
            max_payload_bytes: 64 * 1024,
            db_port: 3306,
            acquire_timeout_ms: 1_000,
            queue_type: "classic",
            db_login: None,
            replica_port: None,
            mongo_port: mongo_port(),
            spool_max_bytes: 256 * 1024 * 1024,
        }
    }
}

pub struct TestEnv {
    pub prefix: String,
    pub db: String,
    pub dir: PathBuf,
    pub config: Config,
    pub opts: Opts,
    node: Option<Node>,
    client: Option<Client>,
    cleaned: bool,
}

/// Writes a complete node config for a test into `dir/config`.
pub fn write_config(dir: &Path, prefix: &str, db: &str, o: &Opts) {
    std::fs::create_dir_all(dir.join("config")).unwrap();
    let brokers: String = BROKERS
        .iter()
        .zip(["read", "write", "meta"])
        .map(|(b, s)| {
            format!(
                "[brokers.{b}]\ninstances = {}\nserves = [\"{s}\"]\n",
                o.instances
            )
        })
        .collect();
    let text = format!(
        r#"
[node]
role = "appServer"
name = "{prefix}"
templates = "{templates}"

[amqp]
user = "guest"
pass = "guest"
prefix = "{prefix}"
queue_type = "{queue_type}"

[dispatch]
prefetch = {prefetch}
retry_tiers_ms = {tiers:?}
drain_timeout_ms = {drain}
max_payload_bytes = {max_payload}

[logging]
level = "warn"

# Any free port: tests run side by side (a spawned node logs which).
[http]
listen = "127.0.0.1:0"
probe_interval_ms = 300

[events]
spool_dir = "{spool}"
spool_max_bytes = {spool_max}

[roles.appServer]
brokers = ["rBroker", "wBroker", "mBroker"]

{brokers}
[databases.primary]
kind = "mariadb"
host = "127.0.0.1"
port = {port}
user = "{user}"
pass = "{pass}"
name = "{db}"
max_connections = 8
acquire_timeout_ms = {acquire}

[databases.docs]
kind = "mongodb"
uri = "mongodb://127.0.0.1:{mongo_port}/?directConnection=true"
name = "{db}"
max_connections = 8
timeout_ms = 2000
"#,
        mongo_port = o.mongo_port,
        spool = dir.join("spool").display(),
        spool_max = o.spool_max_bytes,
        templates = dir.join("templates").display(),
        prefetch = o.prefetch,
        tiers = o.retry_tiers_ms,
        drain = o.drain_timeout_ms,
        max_payload = o.max_payload_bytes,
        port = o.db_port,
        user = o
            .db_login
            .as_ref()
            .map(|l| l.0.clone())
            .unwrap_or_else(mysql_user),
        pass = o
            .db_login
            .as_ref()
            .map(|l| l.1.clone())
            .unwrap_or_else(mysql_pass),
        acquire = o.acquire_timeout_ms,
        queue_type = o.queue_type,
    );
    let text = match o.replica_port {
        Some(port) => {
            format!("{text}\n[databases.primary.replica]\nhost = \"127.0.0.1\"\nport = {port}\n")
        }
        None => text,
    };
    std::fs::write(dir.join("config/beds.toml"), text).unwrap();
    let t = dir.join("templates");
    std::fs::create_dir_all(&t).unwrap();
    std::fs::copy(root().join("templates/usr.toml"), t.join("usr.toml")).unwrap();
    std::fs::copy(root().join("templates/note.toml"), t.join("note.toml")).unwrap();
    for f in std::fs::read_dir(root().join("tests/fixtures/templates")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, t.join(f.file_name().unwrap())).unwrap();
    }
}

/// Creates a database holding the usr schema and the test procedures.
pub fn create_db(db: &str) {
    sql(
        None,
        &format!("CREATE DATABASE `{db}` CHARACTER SET utf8mb4"),
    );
    // No test owns the database yet: a setup failing halfway (MongoDB not
    // answering, say) removes it before the panic goes on.
    if let Err(e) = std::panic::catch_unwind(|| fill_db(db)) {
        let _ = std::panic::catch_unwind(|| sql(None, &format!("DROP DATABASE IF EXISTS `{db}`")));
        std::panic::resume_unwind(e);
    }
}

fn fill_db(db: &str) {
    let read = |f: &str| std::fs::read_to_string(root().join(f)).unwrap();
    let (schema, inbox) = (
        read("utilities/sql/usr.sql"),
        read("utilities/sql/inbox.sql"),
    );
    let tst = read("tests/fixtures/tst.sql");
    sql(Some(db), &format!("{schema}\n{inbox}\n{tst}"));
    let db = db.to_string();
    on_own_runtime(async move {
        for script in ["utilities/mongo/note.json", "utilities/mongo/inbox.json"] {
            mongo_script(&db, &root().join(script)).await;
        }
    });
}

/// The MongoDB-compatible server the tests use (`BEDS_TEST_MONGO_PORT`,
/// default 27017; `utilities/dev test` starts one when none answers).
pub fn mongo_port() -> u16 {
    std::env::var("BEDS_TEST_MONGO_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(27017)
}

/// A driver client for the test's own checks and setup.
pub async fn mongo() -> mongodb::Client {
    mongo_at(mongo_port()).await
}

/// A driver client for the server on `port`.
pub async fn mongo_at(port: u16) -> mongodb::Client {
    mongodb::Client::with_uri_str(format!(
        "mongodb://127.0.0.1:{port}/?directConnection=true&serverSelectionTimeoutMS=5000"
    ))
    .await
    .unwrap()
}

/// Runs a DBA command script (`utilities/mongo/*.json`) on database `db`.
pub async fn mongo_script(db: &str, script: &Path) {
    mongo_script_at(mongo_port(), db, script).await
}

/// [`mongo_script`] on the server at `port`.
pub async fn mongo_script_at(port: u16, db: &str, script: &Path) {
    let text = std::fs::read_to_string(script).unwrap();
    let commands: Vec<serde_json::Map<String, Value>> = serde_json::from_str(&text).unwrap();
    let client = mongo_at(port).await;
    for c in commands {
        let cmd = mongodb::bson::to_document(&c).unwrap();
        if let Err(e) = client.database(db).run_command(cmd.clone()).await {
            assert!(
                e.to_string().contains("NamespaceExists") || e.to_string().contains("already exists"),
                "MongoDB script {} failed on {cmd}: {e} (is a MongoDB-compatible server on port {port}? utilities/dev setup starts one)",
                script.display(),
            );
        }
    }
}

/// Runs a future to completion on a fresh runtime in its own thread (for
/// sync setup and drops inside async tests).
pub fn on_own_runtime<F>(f: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let r = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
    .join();
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}

impl TestEnv {
    pub async fn start(opts: Opts) -> TestEnv {
        let prefix = unique("q");
        create_db(&prefix);
        TestEnv::start_on(prefix, opts).await
    }

    /// Starts a node on an existing database named like the prefix.
    pub async fn start_on(prefix: String, opts: Opts) -> TestEnv {
        // lapin logs the tests' own helper connections closing as errors.
        beds::logging::init(&LoggingConfig {
            level: "warn,lapin=off".into(),
            journald: false,
        });
        let db = prefix.clone();
        let dir = std::env::temp_dir().join(&prefix);
        write_config(&dir, &prefix, &db, &opts);
        let config = Config::load(&dir.join("config"), Env::Dev).expect("test config loads");
        let mut env = TestEnv {
            prefix,
            db,
            dir,
            config,
            opts,
            node: None,
            client: None,
            cleaned: false,
        };
        env.start_node().await;
        env.client = Some(
            Client::connect(AMQP_URL, &env.prefix)
                .await
                .expect("client connects"),
        );
        env
    }

    pub async fn start_node(&mut self) {
        assert!(self.node.is_none());
        let dir = self.dir.join("config");
        self.node = Some(Node::start(&self.config, &dir).await.expect("node starts"));
    }

    /// The running node (its HTTP address, readiness, metrics).
    pub fn node(&self) -> &Node {
        self.node.as_ref().expect("the node runs")
    }

    pub async fn stop_node(&mut self) {
        if let Some(n) = self.node.take() {
            n.stop().await;
        }
    }

    pub fn client(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    pub async fn call(&self, broker: &str, payload: Value) -> Reply {
        self.call_opts(broker, payload, CallOptions::default())
            .await
    }

    pub async fn call_opts(&self, broker: &str, payload: Value, mut opts: CallOptions) -> Reply {
        opts.timeout = opts.timeout.max(Duration::from_secs(15));
        self.client()
            .call(broker, &payload, &opts)
            .await
            .unwrap_or_else(|e| panic!("call to {broker} failed: {e}\npayload: {payload}"))
    }

    pub fn sql(&self, input: &str) -> String {
        sql(Some(&self.db), input)
    }

    pub fn queue(&self, broker: &str) -> String {
        format!("{}.{broker}", self.prefix)
    }

    pub fn dlq(&self, broker: &str) -> String {
        format!("{}.{broker}.dlq", self.prefix)
    }

    /// Takes (and acks) every message now in `queue`.
    pub async fn drain_queue(&self, queue: &str) -> Vec<BasicGetMessage> {
        let conn = amqp().await;
        let ch = conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            out.push(m);
        }
        close_quietly(&conn).await;
        out
    }

    /// Messages ready in `queue`.
    pub async fn queue_len(&self, queue: &str) -> u32 {
        let conn = amqp().await;
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
        close_quietly(&conn).await;
        q.message_count()
    }

    /// Stops the node and removes everything the test created.
    pub async fn finish(mut self) {
        self.stop_node().await;
        if let Some(c) = self.client.take() {
            c.close().await;
        }
        cleanup(&self.prefix, &self.db, self.opts.retry_tiers_ms.len()).await;
        let _ = std::fs::remove_dir_all(&self.dir);
        self.cleaned = true;
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if !self.cleaned {
            // A failed test still removes its queues and database.
            drop(Debris {
                prefix: self.prefix.clone(),
                dir: self.dir.clone(),
                tiers: self.opts.retry_tiers_ms.len(),
            });
        }
    }
}

/// Removes a test's queues, exchange, database (all named `prefix`) and
/// folder when dropped, whether the test passed or panicked.
pub struct Debris {
    pub prefix: String,
    pub dir: PathBuf,
    pub tiers: usize,
}

impl Debris {
    /// A fresh prefix (also the database name) and config folder for a test
    /// that runs the binary itself, removed when dropped.
    pub fn new(tag: &str) -> Debris {
        let prefix = unique(tag);
        let dir = std::env::temp_dir().join(&prefix);
        Debris {
            prefix,
            dir,
            tiers: 2,
        }
    }
}

impl Debris {
    /// [`Debris::new`] with its database made and a default node config
    /// written: ready for a node run as a process.
    pub fn prepared(tag: &str) -> Debris {
        let debris = Debris::new(tag);
        create_db(&debris.prefix);
        write_config(
            &debris.dir,
            &debris.prefix,
            &debris.prefix,
            &Opts::default(),
        );
        debris
    }
}

impl Drop for Debris {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let (prefix, tiers) = (self.prefix.clone(), self.tiers);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(cleanup(&prefix, &prefix, tiers));
        })
        .join();
    }
}

/// Closes a test's AMQP connection, bounded: lapin's close can wait
/// forever for a close-ok the server never sends (seen once in CI: a test
/// hung in its cleanup with its connection already gone on the server).
pub async fn close_quietly(conn: &Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, "".into())).await;
}

pub async fn amqp() -> Connection {
    Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap()
}

pub async fn cleanup(prefix: &str, db: &str, tiers: usize) {
    // Bounded as a whole, so a stuck broker call cannot keep the databases
    // below from being dropped.
    let amqp_part = async {
        if let Ok(conn) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await {
            if let Ok(ch) = conn.create_channel().await {
                for b in ALL_BROKERS {
                    let mut names = vec![
                        format!("{prefix}.{b}"),
                        format!("{prefix}.{b}.dlq"),
                        format!("{prefix}.{b}.hold.primary"),
                        format!("{prefix}.{b}.hold.docs"),
                        format!("{prefix}.{b}.hold.warehouse"),
                    ];
                    names.extend((1..=tiers).map(|n| format!("{prefix}.{b}.retry.{n}")));
                    for q in names {
                        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
                    }
                }
                for q in ["test-replies", "adminBrokerIn", "adminGraphBroker"] {
                    let _ = ch
                        .queue_delete(format!("{prefix}.{q}").into(), Default::default())
                        .await;
                }
                let _ = ch.exchange_delete(prefix.into(), Default::default()).await;
            }
            close_quietly(&conn).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), amqp_part).await;
    let _ = std::panic::catch_unwind(|| sql(None, &format!("DROP DATABASE IF EXISTS `{db}`")));
    let _ = std::panic::catch_unwind(|| sql(None, &format!("DROP DATABASE IF EXISTS `{db}_wh`")));
    if let Ok(client) = tokio::time::timeout(Duration::from_secs(5), mongo()).await {
        let _ = tokio::time::timeout(Duration::from_secs(5), client.database(db).drop()).await;
    }
}

/// A TCP proxy in front of MariaDB that a test can take down (dropping every
/// connection and refusing new ones) and bring back: a database outage
/// without touching the shared server.
pub struct Proxy {
    pub port: u16,
    /// Connections accepted so far (also while down).
    pub accepted: Arc<AtomicUsize>,
    down: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    pub async fn start(target_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (d, c, a) = (down.clone(), conns.clone(), accepted.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                a.fetch_add(1, Ordering::SeqCst);
                if d.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(("127.0.0.1", target_port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                c.lock().await.push(task.abort_handle());
            }
        });
        Proxy {
            port,
            accepted,
            down,
            conns,
        }
    }

    pub async fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            for h in self.conns.lock().await.drain(..) {
                h.abort();
            }
        }
    }
}

/// Declares `<prefix>.test-replies`, a reply queue of the test's own that
/// outlives client connections (removed by `cleanup`).
pub async fn reply_queue(prefix: &str) -> String {
    let conn = amqp().await;
    let ch = conn.create_channel().await.unwrap();
    let q = format!("{prefix}.test-replies");
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    close_quietly(&conn).await;
    q
}

/// Waits until `f` holds, polling; panics with `what` after `secs`.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < end {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Collects replies from a raw consumer (for requests sent with `send`).
pub async fn consume_n(queue: &str, n: usize, secs: u64) -> Vec<lapin::message::Delivery> {
    let conn = amqp().await;
    let ch = conn.create_channel().await.unwrap();
    let mut c = ch
        .basic_consume(
            queue.into(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(secs), async {
        while out.len() < n {
            match c.next().await {
                Some(Ok(d)) => out.push(d),
                _ => break,
            }
        }
    })
    .await;
    close_quietly(&conn).await;
    out
}

/// Runs the `beds` binary on a fresh prefix and database until it is ready,
/// with extra environment variables (`None` removes one). The node's log is
/// collected in the returned string buffer.
pub async fn spawn_node(
    tag: &str,
    env: &[(&str, Option<&str>)],
) -> (
    tokio::process::Child,
    Debris,
    String,
    Arc<std::sync::Mutex<String>>,
) {
    let debris = Debris::new(tag);
    let (prefix, dir) = (debris.prefix.clone(), debris.dir.clone());
    create_db(&prefix);
    write_config(&dir, &prefix, &prefix, &Opts::default());
    let (child, log) = spawn_beds(&dir, env).await;
    (child, debris, prefix, log)
}

/// The MongoDB outage both outage tests share, once MongoDB is away: ten
/// `note` creates for `user` (the first with a deadline 100 days away, whose
/// held TTL must be capped at what RabbitMQ accepts) and a read are sent;
/// meanwhile `usr` creates succeed, the `note` requests wait in their hold
/// queues and nothing is parked; then `restore` brings MongoDB back, every
/// request is answered, and the user has each note once, after the one
/// created before the outage.
pub async fn notes_wait_out_an_outage(
    env: &TestEnv,
    user: i64,
    restore: impl std::future::Future<Output = ()>,
) {
    let note = |i: usize| serde_json::json!({"template": "note", "op": "create", "data": {"user_id": user, "title": format!("o{i}")}});
    let opts = CallOptions {
        timeout: Duration::from_secs(90),
        ..Default::default()
    };
    let far = CallOptions {
        deadline_ms: Some(chrono::Utc::now().timestamp_millis() + 100 * 86_400_000),
        ..opts.clone()
    };
    let client = env.client();
    let writes: Vec<_> = (1..=10).map(note).collect();
    let read = serde_json::json!({"template": "note", "op": "by_user", "data": {"user_id": user}});
    let held = futures::future::join_all(
        writes
            .iter()
            .enumerate()
            .map(|(i, p)| client.call("wBroker", p, if i == 0 { &far } else { &opts }))
            .chain(std::iter::once(client.call("rBroker", &read, &opts))),
    );
    let meanwhile = async {
        tokio::time::sleep(Duration::from_secs(4)).await;
        for i in 0..3 {
            let r = env
                .call(
                    "wBroker",
                    serde_json::json!({"template": "usr", "op": "create", "data": {"name": "O", "email": format!("o{i}@outage.example")}}),
                )
                .await;
            assert!(r.is_ok(), "MariaDB unaffected while MongoDB is away: {r:?}");
        }
        let waiting = env
            .queue_len(&format!("{}.wBroker.hold.docs", env.prefix))
            .await
            + env
                .queue_len(&format!("{}.rBroker.hold.docs", env.prefix))
                .await;
        assert!(waiting >= 1, "note requests wait in their hold queues");
        for b in ["rBroker", "wBroker"] {
            assert_eq!(env.queue_len(&env.dlq(b)).await, 0, "nothing parked");
        }
        restore.await;
    };
    let (replies, ()) = tokio::join!(held, meanwhile);
    for r in replies {
        let r = r.expect("every request answered once MongoDB is back");
        assert!(r.is_ok(), "{r:?}");
    }
    let r = env.call("rBroker", read).await;
    assert_eq!(
        r.data.map(|d| d.len()),
        Some(11),
        "the note from before kept, each held note stored once"
    );
    for b in ["rBroker", "wBroker"] {
        assert_eq!(env.queue_len(&env.dlq(b)).await, 0, "nothing parked");
    }
}

/// Notes titled `title` and MongoDB inbox records in database `db`.
pub async fn mongo_count(db: &str, title: String) -> (u64, u64) {
    let d = mongo().await.database(db);
    let notes = d
        .collection::<mongodb::bson::Document>("notes")
        .count_documents(mongodb::bson::doc! {"title": title})
        .await
        .unwrap();
    let records = d
        .collection::<mongodb::bson::Document>("beds_inbox")
        .count_documents(mongodb::bson::doc! {})
        .await
        .unwrap();
    (notes, records)
}

/// Runs the `beds` binary on the config in `dir` (as [`write_config`]
/// writes it) until it is ready; its log is collected in the returned
/// buffer. Several may run on one config: nodes sharing their queues.
pub async fn spawn_beds(
    dir: &Path,
    env: &[(&str, Option<&str>)],
) -> (tokio::process::Child, Arc<std::sync::Mutex<String>>) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_beds"));
    cmd.args(["--config-dir", dir.join("config").to_str().unwrap(), "run"])
        .env("BEDS_ENV", "dev")
        .env("RUST_LOG", "info")
        .kill_on_drop(true)
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let mut child = cmd.spawn().unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.contains("BEDS node ready") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(ready, Ok(true), "node became ready");
    // Keep reading (the node must never block on a full pipe).
    let log = Arc::new(std::sync::Mutex::new(String::new()));
    let sink = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            sink.lock().unwrap().push_str(&(l + "\n"));
        }
    });
    (child, log)
}

pub mod cluster;
pub mod tls_proxy;

/// Sends `raw` to a node's HTTP port and reads the answer to its end:
/// (status, body). The status is 0 when the answer had no status line.
pub async fn http_raw(addr: std::net::SocketAddr, raw: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may answer (and close) before reading all of a huge head.
    let _ = s.write_all(raw).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// `GET path` on a node's HTTP port.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: beds\r\nConnection: close\r\n\r\n");
    http_raw(addr, req.as_bytes()).await
}

/// The value of the metric line starting with `series` (name and labels
/// exactly as exposed), if present.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
