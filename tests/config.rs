//! Configuration layering and validation, template validation, and the
//! `beds check` command an operator runs before a restart.

mod common;

use std::path::Path;
use std::process::Command;

use beds::config::{Config, ConfigError, Env};
use beds::ipl::{IplError, Node};
use beds::registry::compile;
use common::Opts;

/// A temporary config folder, removed when dropped.
struct TmpDir(std::path::PathBuf);

impl std::ops::Deref for TmpDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tmp(tag: &str) -> TmpDir {
    let d = std::env::temp_dir().join(common::unique(tag));
    std::fs::create_dir_all(&d).unwrap();
    TmpDir(d)
}

const BASE: &str = r#"
[node]
role = "appServer"
[amqp]
user = "beds"
[dispatch]
prefetch = 10
[roles.appServer]
brokers = ["rBroker"]
[brokers.rBroker]
instances = 2
serves = ["read"]
[databases.primary]
kind = "mariadb"
user = "beds"
name = "beds"
"#;

fn load(dir: &Path, env: Env) -> Result<Config, ConfigError> {
    Config::load(dir, env)
}

#[test]
fn env_file_and_variables_layer_over_the_base() {
    let d = tmp("layer");
    std::fs::write(d.join("beds.toml"), BASE).unwrap();
    std::fs::write(
        d.join("env_qa.toml"),
        "[amqp]\npass = \"from-file\"\n[brokers.rBroker]\ninstances = 5\n[databases.primary]\npass = \"db\"\n[dispatch]\nretry_key = \"0123456789abcdef\"\n",
    )
    .unwrap();
    std::env::set_var("BEDS__DISPATCH__MAX_BATCH", "7");
    let c = load(&d, Env::Qa).unwrap();
    std::env::remove_var("BEDS__DISPATCH__MAX_BATCH");
    assert_eq!(
        c.amqp.pass.as_deref(),
        Some("from-file"),
        "env file sets secrets"
    );
    assert_eq!(
        c.brokers["rBroker"].instances, 5,
        "env file overrides the base"
    );
    assert_eq!(
        c.brokers["rBroker"].serves.len(),
        1,
        "untouched keys inherited"
    );
    assert_eq!(c.dispatch.prefetch, 10, "base value kept");
    assert_eq!(
        c.dispatch.max_batch, 7,
        "environment variables override files"
    );
    assert_eq!(
        c.dispatch.retry_tiers_ms,
        [1000, 5000, 30000],
        "named defaults"
    );
    assert_eq!(c.env, Env::Qa);
    // Another environment does not see qa's file.
    let e = load(&d, Env::Prod).unwrap_err().to_string();
    assert!(e.contains("amqp.pass is not set"), "{e}");
    assert!(
        e.contains("dispatch.retry_key must be set"),
        "outside dev: {e}"
    );
}

#[test]
fn unknown_keys_are_rejected() {
    let d = tmp("unknown");
    std::fs::write(
        d.join("beds.toml"),
        BASE.replace("prefetch = 10", "prefech = 10"),
    )
    .unwrap();
    let e = load(&d, Env::Dev).unwrap_err().to_string();
    assert!(e.contains("prefech"), "the typo is named: {e}");
}

#[test]
fn every_cross_check_problem_is_listed() {
    let d = tmp("cross");
    let text = BASE
        .replace(
            "brokers = [\"rBroker\"]",
            "brokers = [\"rBroker\", \"zBroker\"]",
        )
        .replace("instances = 2", "instances = 0")
        .replace("prefetch = 10", "prefetch = 0\ninbox_retention_ms = 1000");
    std::fs::write(d.join("beds.toml"), text).unwrap();
    let e = load(&d, Env::Dev).unwrap_err();
    let ConfigError::Invalid(problems) = e else {
        panic!("expected problems, got {e}")
    };
    let all = problems.join("\n");
    for needle in [
        "zBroker",
        "instances must be at least 1",
        "prefetch",
        "amqp.pass",
        "databases.primary.pass",
        "dispatch.inbox_retention_ms must be between",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert!(problems.len() >= 5);
}

#[test]
fn missing_base_file_and_bad_env_are_clear() {
    let d = tmp("missing");
    assert!(matches!(load(&d, Env::Dev), Err(ConfigError::Missing(_))));
    assert!(Env::parse("staging")
        .unwrap_err()
        .to_string()
        .contains("dev, qa or prod"));
}

fn test_config() -> Config {
    let d = tmp("tpl");
    std::fs::write(d.join("beds.toml"), format!("{BASE}\n")).unwrap();
    std::fs::write(
        d.join("env_dev.toml"),
        "[amqp]\npass='x'\n[databases.primary]\npass='y'\n",
    )
    .unwrap();
    load(&d, Env::Dev).unwrap()
}

#[test]
fn shipped_usr_template_is_valid() {
    let c = test_config();
    let text = std::fs::read_to_string(common::root().join("templates/usr.toml")).unwrap();
    let t = compile(&text, &c).unwrap();
    assert_eq!(t.ops.len(), 5);
    assert_eq!(
        t.ops["read"].call_sql().map(|s| s.as_str()),
        Some("CALL usr_read(?)")
    );
}

#[test]
fn template_problems_are_all_reported() {
    let c = test_config();
    let bad = r#"
name = "Bad-Name"
kind = "rel"
store = "mariadb"
database = "nowhere"
allow = []
[fields]
id = { type = "int", max_len = 3 }
[ops.read]
procedure = "usr_read; DROP TABLE usr"
params = ["id"]
access = "read"
[ops.list]
procedure = "usr_list"
params = ["limit"]
required = ["offset"]
access = "read"
"#;
    let problems = compile(bad, &c).unwrap_err().join("\n");
    for needle in [
        "name \"Bad-Name\"",
        "kind \"rel\"",
        "database \"nowhere\"",
        "allow = []",
        "max_len applies only to strings",
        "must be a plain identifier",
        "\"limit\" is not in [fields]",
        "\"offset\" is not one of its params",
    ] {
        assert!(
            problems.contains(needle),
            "missing {needle:?} in:\n{problems}"
        );
    }
    let e = compile("name = \"x1\"\nkind = \"rec\"\nstore = \"mariadb\"\ndatabase = \"primary\"\n[ops.a]\nprocedure = \"p\"\naccess = \"read\"\ntypo = 1\n", &c)
        .unwrap_err()
        .join("\n");
    assert!(e.contains("typo"), "{e}");
    let e = compile("name = \"x1\"\nkind = \"rec\"\nstore = \"mariadb\"\ndatabase = \"primary\"\n[fields]\na = { type = \"decimal\" }\n[ops.a]\nprocedure = \"p\"\naccess = \"read\"\n", &c)
        .unwrap_err()
        .join("\n");
    assert!(e.contains("decimal"), "{e}");
}

fn beds(args: &[&str], dir: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_beds"))
        .args(["--config-dir", dir.to_str().unwrap()])
        .args(args)
        .env("BEDS_ENV", "dev")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beds_check_exit_codes_and_problem_lists() {
    let scratch = common::Debris::new("chk");
    let (prefix, dir) = (scratch.prefix.clone(), scratch.dir.clone());
    common::write_config(&dir, &prefix, &prefix, &Opts::default());
    let cfg = dir.join("config");

    let (code, out) = beds(&["check"], &cfg);
    assert_eq!(code, 0, "{out}");

    // The database does not exist yet: --online names it.
    let (code, out) = beds(&["check", "--online"], &cfg);
    assert_eq!(code, 64, "{out}");

    // A database without the test procedures: every missing one is listed.
    common::sql(None, &format!("CREATE DATABASE `{prefix}`"));
    let schema = std::fs::read_to_string(common::root().join("utilities/sql/usr.sql")).unwrap();
    common::sql(Some(&prefix), &schema);
    let (code, out) = beds(&["check", "--online"], &cfg);
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("tst_flaky") && out.contains("tst_types"),
        "{out}"
    );
    assert!(!out.contains("usr_read"), "existing procedures pass: {out}");

    let tst = std::fs::read_to_string(common::root().join("tests/fixtures/tst.sql")).unwrap();
    common::sql(Some(&prefix), &tst);
    // Writes need the durable inbox's procedures.
    let (code, out) = beds(&["check", "--online"], &cfg);
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("procedure beds_inbox_claim of the durable inbox does not exist")
            && out.contains("utilities/sql/inbox.sql"),
        "{out}"
    );
    let inbox = std::fs::read_to_string(common::root().join("utilities/sql/inbox.sql")).unwrap();
    common::sql(Some(&prefix), &inbox);
    let (code, out) = beds(&["check", "--online"], &cfg);
    assert!(!out.contains("beds_inbox_"), "{out}");
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("collection notes does not exist"),
        "MongoDB collections are checked: {out}"
    );

    // The collection with only one of its two indexes: the other is named.
    let db = prefix.clone();
    common::on_own_runtime(async move {
        let cmd = mongodb::bson::doc! {"createIndexes": "notes", "indexes": [
            {"name": "user_created", "key": {"user_id": 1, "created": -1}}
        ]};
        common::mongo()
            .await
            .database(&db)
            .run_command(cmd)
            .await
            .unwrap();
    });
    let (code, out) = beds(&["check", "--online"], &cfg);
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("lacks the index {user_id: 1, title: 1} unique"),
        "{out}"
    );
    assert!(!out.contains("created: -1"), "existing indexes pass: {out}");

    let (db, script) = (
        prefix.clone(),
        common::root().join("utilities/mongo/note.json"),
    );
    common::on_own_runtime(async move { common::mongo_script(&db, &script).await });
    let (code, out) = beds(&["check", "--online"], &cfg);
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("collection beds_inbox (the durable inbox")
            && out.contains("utilities/mongo/inbox.json"),
        "{out}"
    );
    let (db, script) = (
        prefix.clone(),
        common::root().join("utilities/mongo/inbox.json"),
    );
    common::on_own_runtime(async move { common::mongo_script(&db, &script).await });
    let (code, out) = beds(&["check", "--online"], &cfg);
    assert_eq!(code, 0, "{out}");
    // A warning, not a failure: a write procedure that commits on its own.
    assert!(
        out.contains("warning: procedure") && out.contains("tst_commits runs COMMIT itself"),
        "{out}"
    );
    assert!(!out.contains("tst_half runs"), "{out}");

    // A broken template and a config typo: both reported, exit 64.
    std::fs::write(dir.join("templates/zzz.toml"), "name = \"zzz\"\n").unwrap();
    let (code, out) = beds(&["check"], &cfg);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("zzz.toml"), "{out}");
    let text = std::fs::read_to_string(cfg.join("beds.toml")).unwrap();
    std::fs::write(cfg.join("beds.toml"), text.replace("prefetch", "prefetchh")).unwrap();
    let (code, out) = beds(&["run"], &cfg);
    assert_eq!(
        code, 64,
        "a bad config exits 64 before anything starts: {out}"
    );
    assert!(out.contains("prefetchh"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_replica_is_a_warning_in_dev_and_fatal_in_prod() {
    let scratch = common::Debris::prepared("rep");
    let dir = scratch.dir.clone();
    let cfg = dir.join("config");
    let text = std::fs::read_to_string(cfg.join("beds.toml")).unwrap();
    // Port 9 (discard) is closed on loopback.
    std::fs::write(
        cfg.join("beds.toml"),
        format!("{text}\n[databases.primary.replica]\nhost = \"127.0.0.1\"\nport = 9\n"),
    )
    .unwrap();
    let mut config = Config::load(&cfg, Env::Dev).unwrap();
    let node = Node::start(&config, &cfg)
        .await
        .expect("dev starts without the replica");
    node.stop().await;
    config.env = Env::Prod;
    match Node::start(&config, &cfg).await {
        Err(e @ IplError::Unreachable { .. }) => {
            assert!(e.to_string().contains("databases.primary.replica"), "{e}");
            assert_eq!(e.exit_code(), 69);
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("prod must not start without its replica"),
    }
}
