//! utilities/systemd: the install script lays out what beds@NODE expects and
//! never overwrites an operator's edits; the unit passes systemd-analyze.
//! No servers needed.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/utilities/systemd/beds@.service"
);
const INSTALL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/utilities/systemd/install");
const BEDS: &str = env!("CARGO_BIN_EXE_beds");

/// A temporary folder, removed when dropped (also when an assert fails).
struct TmpDir(PathBuf);

impl TmpDir {
    fn new(tag: &str) -> TmpDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let d =
            std::env::temp_dir().join(format!("beds_systemd_{tag}_{}_{nanos}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        TmpDir(d)
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn install(root: &Path, nodes: &[&str]) -> Output {
    let out = Command::new("bash")
        .arg(INSTALL)
        .arg("--root")
        .arg(root)
        .args(["--binary", BEDS])
        .args(nodes)
        .output()
        .expect("bash runs");
    eprintln!(
        "install {nodes:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The permission bits in octal, as `ls` and chmod spell them.
fn mode(p: &Path) -> String {
    let m = std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode();
    format!("{:o}", m & 0o7777)
}

/// Every path under `dir` with its mode, size and mtime: a rerun that
/// rewrites a file, even with the same bytes, shows up here.
fn snapshot(dir: &Path, into: &mut BTreeMap<PathBuf, (u32, u64, i64, i64)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let m = std::fs::symlink_metadata(&p).unwrap();
        into.insert(
            p.clone(),
            (m.mode() & 0o7777, m.len(), m.mtime(), m.mtime_nsec()),
        );
        if m.is_dir() {
            snapshot(&p, into);
        }
    }
}

#[test]
fn install_lays_out_nodes_and_keeps_operator_edits() {
    let tmp = TmpDir::new("install");
    let root = tmp.0.join("root");

    let out = install(&root, &["nodeA", "nodeB"]);
    assert!(out.status.success(), "install failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Under --root the host's users are not touched, only described.
    assert!(stdout.contains("would run"), "no user step reported");
    assert!(
        !stdout.contains("ran        systemctl"),
        "systemctl ran under --root"
    );

    let bin = root.join("usr/local/bin/beds");
    assert_eq!(mode(&bin), "755");
    assert_eq!(std::fs::read(&bin).unwrap(), std::fs::read(BEDS).unwrap());
    let unit = root.join("etc/systemd/system/beds@.service");
    assert_eq!(mode(&unit), "644");
    assert_eq!(
        std::fs::read_to_string(&unit).unwrap(),
        std::fs::read_to_string(UNIT).unwrap()
    );

    for node in ["nodeA", "nodeB"] {
        let dir = root.join("etc/beds").join(node);
        assert_eq!(mode(&dir), "750", "{node} folder");
        // Secrets: BEDS_ENV=prod refuses a group- or world-readable file.
        assert_eq!(
            mode(&dir.join("env_prod.toml")),
            "600",
            "{node} env_prod.toml"
        );
        for t in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/templates")).unwrap() {
            let name = t.unwrap().file_name();
            assert!(
                dir.join("templates").join(&name).is_file(),
                "{node}: {name:?}"
            );
        }
        let toml: toml::Table = std::fs::read_to_string(dir.join("beds.toml"))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            toml["node"]["name"].as_str(),
            Some(node),
            "{node} [node] name"
        );
        // Relative to the config folder: the copy, not the repo's ../templates.
        assert_eq!(toml["node"]["templates"].as_str(), Some("templates"));
        // Only [node] changes: the database names stay as shipped.
        assert_eq!(toml["databases"]["primary"]["name"].as_str(), Some("beds"));

        // The folder as installed is what the unit's `check` sees in prod,
        // spool redirected as the unit does.
        let check = Command::new(BEDS)
            .arg("--config-dir")
            .arg(&dir)
            .arg("check")
            .env_clear()
            .env("BEDS_ENV", "prod")
            .env(
                "BEDS__EVENTS__SPOOL_DIR",
                tmp.0.join("state").join(node).join("spool"),
            )
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "beds check on the installed {node}: {}\n{}{}",
            check.status,
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }

    // An operator edits config, secrets and a template; a rerun keeps them
    // and touches nothing else.
    let a = root.join("etc/beds/nodeA");
    let edits = [
        (
            a.join("beds.toml"),
            "[node]\nrole = \"admin\"\nname = \"edited\"\n",
        ),
        (
            a.join("env_prod.toml"),
            "[amqp]\npass = \"operator-secret\"\n",
        ),
        (a.join("templates/usr.toml"), "# operator's template\n"),
    ];
    for (p, text) in &edits {
        std::fs::write(p, text).unwrap();
    }
    std::fs::remove_file(a.join("templates/note.toml")).unwrap();
    let mut before = BTreeMap::new();
    snapshot(&root, &mut before);

    let out = install(&root, &["nodeA", "nodeB"]);
    assert!(out.status.success(), "rerun failed");
    let mut after = BTreeMap::new();
    snapshot(&root, &mut after);
    assert_eq!(before, after, "a rerun changed the tree");
    for (p, text) in &edits {
        assert_eq!(
            &std::fs::read_to_string(p).unwrap(),
            text,
            "{}",
            p.display()
        );
    }
    // A template the operator removed stays removed.
    assert!(!a.join("templates/note.toml").exists());

    // A node name is a path component: it must not climb out of /etc/beds.
    let out = install(&root, &["../evil"]);
    assert!(!out.status.success(), "install accepted ../evil");
    assert!(!root.join("etc/evil").exists());
}

/// The unit's lines, `Key=value`, without comments.
fn directives(unit: &str) -> Vec<(&str, &str)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .map(|l| l.split_once('=').expect("Key=value"))
        .collect()
}

fn get<'a>(d: &[(&str, &'a str)], key: &str) -> Vec<&'a str> {
    d.iter()
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .collect()
}

#[test]
fn unit_restart_stop_and_state_settings_fit_the_node() {
    let text = std::fs::read_to_string(UNIT).unwrap();
    let d = directives(&text);

    // Bad config exits 64 from `run`; the ExecStartPre check must not fail
    // the start itself, or RestartPreventExitStatus (main process only)
    // never applies and a bad config restarts forever.
    assert_eq!(get(&d, "RestartPreventExitStatus"), ["64"]);
    assert_eq!(get(&d, "Restart"), ["on-failure"]);
    assert_eq!(
        get(&d, "ExecStartPre"),
        ["-/usr/local/bin/beds --config-dir /etc/beds/%i check"]
    );
    assert_eq!(
        get(&d, "ExecStart"),
        ["/usr/local/bin/beds --config-dir /etc/beds/%i run"]
    );

    // SIGKILL must not cut the drain short.
    let stop = get(&d, "TimeoutStopSec");
    let secs: u64 = stop[0].trim_end_matches('s').parse().unwrap();
    let drain_ms = beds::config::DispatchConfig::default().drain_timeout_ms;
    assert!(
        secs * 1000 >= drain_ms + 10_000,
        "TimeoutStopSec={} leaves under 10 s over the {drain_ms} ms drain",
        stop[0]
    );

    // The spool is the one writable place under ProtectSystem=strict.
    assert_eq!(get(&d, "ProtectSystem"), ["strict"]);
    assert_eq!(get(&d, "StateDirectory"), ["beds/%i"]);
    assert!(
        get(&d, "Environment").contains(&"BEDS__EVENTS__SPOOL_DIR=%S/beds/%i/spool"),
        "spool not in the StateDirectory"
    );
    assert!(get(&d, "Environment").contains(&"BEDS_ENV=prod"));
    assert_eq!(get(&d, "CapabilityBoundingSet"), [""]);

    // The older-systemd fallback the comment documents is the one
    // systemd_analyze_verify tests on systemd < 253.
    assert_eq!(get(&d, "Type"), ["notify-reload"]);
    assert!(text.contains("#   Type=notify\n#   ExecReload=/bin/kill -HUP $MAINPID\n"));
}

#[test]
fn systemd_analyze_verify() {
    let version = match Command::new("systemd-analyze").arg("--version").output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(_) => {
            eprintln!(
                "\n!!!!! SKIPPED: systemd-analyze not found; beds@.service NOT verified !!!!!\n"
            );
            return;
        }
    };
    // "systemd 252 (252.38-1~deb12u1)"
    let major: u32 = version
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("systemd-analyze --version: {version:?}"));

    let tmp = TmpDir::new("verify");
    // verify checks that ExecStart exists and is executable.
    let mut unit = std::fs::read_to_string(UNIT)
        .unwrap()
        .replace("/usr/local/bin/beds", BEDS);
    if major < 253 {
        // Type=notify-reload is 253+: check the fallback the unit documents.
        eprintln!("NOTE: systemd {major} < 253: verifying the Type=notify + ExecReload fallback");
        unit = unit.replace(
            "\nType=notify-reload\n",
            "\nType=notify\nExecReload=/bin/kill -HUP $MAINPID\n",
        );
        assert!(
            unit.contains("\nType=notify\n"),
            "Type=notify-reload line not found"
        );
    }
    let path = tmp.0.join("beds@test.service");
    std::fs::write(&path, unit).unwrap();

    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("systemd-analyze verify ({}):\n{text}", out.status);
    // Other units on the machine may complain; this one must not.
    assert!(
        !text.contains("beds@"),
        "systemd-analyze verify on beds@.service:\n{text}"
    );
}
