//! Several real `beds` processes of different roles on one prefix: the
//! shipped `config/beds.toml` with a test overlay (its own queue prefix,
//! databases and spool), every role's sample domain loaded. Removed with
//! its [`Debris`] when dropped.

use std::path::Path;
use std::sync::Arc;

use super::{create_db, mongo_script, mysql_pass, mysql_user, on_own_runtime, root, sql, Debris};

/// A test installation: databases made, config written.
pub struct Cluster {
    pub debris: Debris,
}

/// One node process and its log.
pub struct NodeProc {
    pub name: String,
    pub child: tokio::process::Child,
    pub log: Arc<std::sync::Mutex<String>>,
}

impl Cluster {
    /// Databases `<prefix>` (usr, account, inbox; MongoDB note, session,
    /// inbox) and `<prefix>_wh` (warehouse, inbox), and the config.
    pub fn new(tag: &str) -> Cluster {
        let debris = Debris::new(tag);
        let db = debris.prefix.clone();
        create_db(&db);
        let read = |f: &str| std::fs::read_to_string(root().join(f)).unwrap();
        sql(Some(&db), &read("utilities/sql/account.sql"));
        let wh = format!("{db}_wh");
        sql(
            None,
            &format!("CREATE DATABASE `{wh}` CHARACTER SET utf8mb4"),
        );
        sql(
            Some(&wh),
            &format!(
                "{}\n{}",
                read("utilities/sql/warehouse.sql"),
                read("utilities/sql/inbox.sql")
            ),
        );
        let mdb = db.clone();
        on_own_runtime(async move {
            mongo_script(&mdb, &root().join("utilities/mongo/session.json")).await;
        });
        // A templates folder of its own, so a test may change it and reload.
        let t = debris.dir.join("templates");
        std::fs::create_dir_all(&t).unwrap();
        for folder in ["templates", "tests/fixtures/templates"] {
            for f in std::fs::read_dir(root().join(folder)).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, t.join(f.file_name().unwrap())).unwrap();
            }
        }
        write(&debris.dir, &debris.prefix, "");
        Cluster { debris }
    }

    /// Adds TOML to the overlay (before any node starts).
    pub fn overlay(&self, extra: &str) {
        write(&self.debris.dir, &self.debris.prefix, extra);
    }

    pub fn prefix(&self) -> &str {
        &self.debris.prefix
    }

    pub fn config_dir(&self) -> std::path::PathBuf {
        self.debris.dir.join("config")
    }

    pub fn templates_dir(&self) -> std::path::PathBuf {
        self.debris.dir.join("templates")
    }

    /// Runs `beds admin ARGS --json` on this installation: exit code and
    /// the admin plane's answer (`Null` when stdout is not JSON).
    pub async fn admin(&self, args: &[&str]) -> (i32, serde_json::Value, String) {
        self.admin_as(None, args).await
    }

    /// [`Cluster::admin`] as another RabbitMQ user.
    pub async fn admin_as(
        &self,
        login: Option<&RabbitUser>,
        args: &[&str],
    ) -> (i32, serde_json::Value, String) {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_beds"));
        cmd.args(["--config-dir", self.config_dir().to_str().unwrap(), "admin"])
            .args(args)
            .arg("--json")
            .env("BEDS_ENV", "dev");
        if let Some(u) = login {
            cmd.env("BEDS__AMQP__USER", &u.name)
                .env("BEDS__AMQP__PASS", &u.pass);
        }
        let out = cmd.output().await.unwrap();
        let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (
            out.status.code().unwrap_or(-1),
            v,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts a node of `role` named `name` and waits until it is ready.
    pub async fn node(&self, role: &str, name: &str, env: &[(&str, &str)]) -> NodeProc {
        let mut all: Vec<(&str, Option<&str>)> = vec![
            ("BEDS__NODE__ROLE", Some(role)),
            ("BEDS__NODE__NAME", Some(name)),
        ];
        all.extend(env.iter().map(|(k, v)| (*k, Some(*v))));
        let (child, log) = super::spawn_beds(&self.debris.dir, &all).await;
        NodeProc {
            name: name.to_string(),
            child,
            log,
        }
    }
}

fn write(dir: &Path, prefix: &str, extra: &str) {
    let config = dir.join("config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::copy(root().join("config/beds.toml"), config.join("beds.toml")).unwrap();
    let (user, pass) = (mysql_user(), mysql_pass());
    let overlay = format!(
        r#"
[node]
templates = "{templates}"

[amqp]
user = "guest"
pass = "guest"
prefix = "{prefix}"

[dispatch]
retry_tiers_ms = [200, 400]
prefetch = 8

[logging]
level = "warn"

[http]
listen = "127.0.0.1:0"
probe_interval_ms = 300

[events]
spool_dir = "{spool}"

[databases.primary]
user = "{user}"
pass = "{pass}"
name = "{prefix}"

[databases.warehouse]
kind = "mariadb"
host = "127.0.0.1"
port = 3306
user = "{user}"
pass = "{pass}"
name = "{prefix}_wh"
max_connections = 4

[databases.docs]
uri = "mongodb://127.0.0.1:{mongo}/?directConnection=true"
name = "{prefix}"
timeout_ms = 5000
{extra}
"#,
        templates = dir.join("templates").display(),
        spool = dir.join("spool").display(),
        mongo = super::mongo_port(),
    );
    std::fs::write(config.join("env_dev.toml"), overlay).unwrap();
}

/// A RabbitMQ user of the test's own (through `rabbitmqctl`, which the
/// machine running RabbitMQ has), with full rights on `/`; deleted when
/// dropped.
pub struct RabbitUser {
    pub name: String,
    pub pass: String,
}

impl RabbitUser {
    pub fn create(tag: &str) -> RabbitUser {
        let u = RabbitUser {
            name: super::unique(tag),
            pass: format!("pw{}", rand::random::<u64>()),
        };
        ctl(&["add_user", &u.name, &u.pass]);
        ctl(&["set_permissions", "-p", "/", &u.name, ".*", ".*", ".*"]);
        u
    }

    pub fn url(&self) -> String {
        format!("amqp://{}:{}@127.0.0.1:5672/%2f", self.name, self.pass)
    }
}

impl Drop for RabbitUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

fn ctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl: this test needs a second RabbitMQ user and makes one with it");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
