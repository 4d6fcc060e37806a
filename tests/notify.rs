//! sd_notify as systemd sees it: the real binary with `NOTIFY_SOCKET`
//! pointing at a datagram socket of the test's own. IPL status lines, then
//! READY; watchdog pings at least twice per `WATCHDOG_USEC`; SIGHUP gives
//! RELOADING with its MONOTONIC_USEC, then READY again; SIGTERM gives
//! STOPPING and exit 0; and neither a clean run nor a failed IPL prints a
//! spurious ERROR line.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UnixDatagram;

/// One datagram as received: when, and its newline-separated assignments.
#[derive(Debug, Clone)]
struct Msg {
    at: Instant,
    lines: Vec<String>,
}

impl Msg {
    fn has(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l == line)
    }

    /// The value of `KEY=` in this datagram.
    fn get(&self, key: &str) -> Option<&str> {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }
}

type Inbox = Arc<Mutex<Vec<Msg>>>;

/// Binds a notify socket at `path` and collects every datagram sent to it.
fn listen(path: &Path) -> (Inbox, tokio::task::JoinHandle<()>) {
    let sock = UnixDatagram::bind(path).expect("notify socket binds");
    let inbox: Inbox = Arc::default();
    let sink = inbox.clone();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = sock.recv(&mut buf).await {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let lines = text
                .split('\n')
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            sink.lock().unwrap().push(Msg {
                at: Instant::now(),
                lines,
            });
        }
    });
    (inbox, task)
}

fn snapshot(inbox: &Inbox) -> Vec<Msg> {
    inbox.lock().unwrap().clone()
}

/// Waits until a datagram after index `from` satisfies `f`; its index.
async fn wait_for(
    inbox: &Inbox,
    from: usize,
    secs: u64,
    what: &str,
    f: impl Fn(&Msg) -> bool,
) -> usize {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(i) = snapshot(inbox).iter().skip(from).position(&f) {
            return from + i;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}; received: {:#?}",
            snapshot(inbox)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// CLOCK_MONOTONIC in microseconds (what MONOTONIC_USEC is measured on).
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

fn signal(child: &tokio::process::Child, sig: libc::c_int) {
    let pid = child.id().expect("the node still runs") as i32;
    // SAFETY: a plain kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

/// The `n` of a `STATUS=IPL n/9 ...` line.
fn ipl_step(m: &Msg) -> Option<u32> {
    let s = m.get("STATUS")?.strip_prefix("IPL ")?;
    s.split('/').next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_sees_ipl_ready_watchdog_reload_and_stop() {
    let scratch = common::Debris::prepared("ntf");
    let path = scratch.dir.join("notify.sock");
    let (inbox, collector) = listen(&path);

    let (mut child, log) = common::spawn_beds(
        &scratch.dir,
        &[
            ("NOTIFY_SOCKET", Some(path.to_str().unwrap())),
            ("WATCHDOG_USEC", Some("1000000")),
            ("WATCHDOG_PID", None),
            // Probing every 5 s on its own: twice a second can only come
            // from WATCHDOG_USEC.
            ("BEDS__HTTP__PROBE_INTERVAL_MS", Some("5000")),
        ],
    )
    .await;

    // IPL: status lines 3..9 in order, READY only after IPL 9/9.
    let ready = wait_for(&inbox, 0, 15, "READY=1", |m| m.has("READY=1")).await;
    let before = &snapshot(&inbox)[..ready];
    let steps: Vec<u32> = before.iter().filter_map(ipl_step).collect();
    assert!(
        !steps.is_empty(),
        "STATUS=IPL lines before READY=1: {before:#?}"
    );
    assert!(
        steps.windows(2).all(|w| w[0] <= w[1]),
        "IPL steps in order: {steps:?}"
    );
    assert_eq!(steps.last(), Some(&9), "IPL 9/9 before READY: {steps:?}");
    for n in 3..=9 {
        assert!(steps.contains(&n), "STATUS=IPL {n}/9 sent: {steps:?}");
    }
    let r = &snapshot(&inbox)[ready];
    assert!(
        r.get("STATUS").is_some_and(|s| s.starts_with("serving: ")),
        "READY carries the serving status: {r:?}"
    );

    // Watchdog: every ping is a completed probe round, and pings come at
    // least twice per WATCHDOG_USEC (1 s), so no gap reaches 1 s.
    let ready_at = r.at;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pings: Vec<Instant> = snapshot(&inbox)
        .iter()
        .filter(|m| m.has("WATCHDOG=1") && m.at >= ready_at)
        .map(|m| m.at)
        .collect();
    assert!(
        pings.len() >= 4,
        "WATCHDOG=1 at least twice a second: {} in 3 s",
        pings.len()
    );
    let gaps: Vec<Duration> = std::iter::once(ready_at)
        .chain(pings.iter().copied())
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1] - w[0])
        .collect();
    let widest = gaps.iter().max().copied().unwrap_or_default();
    assert!(
        widest < Duration::from_millis(1000),
        "a watchdog gap of {widest:?} would have systemd kill the node: {gaps:?}"
    );

    // SIGHUP: RELOADING=1 with MONOTONIC_USEC (now, on our clock) in the
    // same datagram, then READY=1 again.
    let from = snapshot(&inbox).len();
    let t0 = monotonic_usec();
    signal(&child, libc::SIGHUP);
    let reloading = wait_for(&inbox, from, 15, "RELOADING=1", |m| m.has("RELOADING=1")).await;
    let t1 = monotonic_usec();
    let m = &snapshot(&inbox)[reloading];
    let usec: u64 = m
        .get("MONOTONIC_USEC")
        .unwrap_or_else(|| panic!("MONOTONIC_USEC in the RELOADING datagram: {m:?}"))
        .parse()
        .expect("MONOTONIC_USEC is a number");
    assert!(
        (t0..=t1).contains(&usec),
        "MONOTONIC_USEC={usec} is the time of the reload ({t0}..={t1})"
    );
    assert_eq!(m.get("STATUS"), Some("reloading templates"), "{m:?}");
    let reready = wait_for(&inbox, reloading + 1, 15, "READY=1 after the reload", |m| {
        m.has("READY=1")
    })
    .await;
    let m = &snapshot(&inbox)[reready];
    assert!(
        m.get("STATUS").is_some_and(|s| s.starts_with("serving: ")),
        "{m:?}"
    );
    assert!(
        snapshot(&inbox)[from..reloading]
            .iter()
            .all(|m| !m.has("READY=1")),
        "no READY=1 between SIGHUP and RELOADING=1"
    );

    // SIGTERM: STOPPING=1 with the drain status, then exit 0.
    let from = snapshot(&inbox).len();
    signal(&child, libc::SIGTERM);
    let stopping = wait_for(&inbox, from, 15, "STOPPING=1", |m| m.has("STOPPING=1")).await;
    let m = &snapshot(&inbox)[stopping];
    assert!(
        m.get("STATUS").is_some_and(|s| s.starts_with("draining")),
        "{m:?}"
    );
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the node exits after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0), "clean exit");
    let after = snapshot(&inbox);
    assert!(
        after[stopping..].iter().all(|m| !m.has("READY=1")),
        "no READY=1 after STOPPING=1: {after:#?}"
    );

    // The whole log is in once the reader has hit end of file.
    common::eventually(10, "the node's stderr fully read", || {
        let n = Arc::strong_count(&log);
        async move { n == 1 }
    })
    .await;
    let log = log.lock().unwrap().clone();
    assert!(log.contains("stopped"), "the drain finished:\n{log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(
        errors.is_empty(),
        "no ERROR in a clean run: {errors:#?}\n{log}"
    );
    collector.abort();
}

/// A template whose procedure does not exist: IPL fails at step 7, after
/// the AMQP connection is up.
const BROKEN: &str = r#"
name = "ntfbroken"
kind = "rec"
store = "mariadb"
database = "primary"
allow = ["*"]

[fields]
id = { type = "int", key = true, min = 1 }

[ops.read]
procedure = "ntf_no_such_proc"
params = ["id"]
returns = "one"
access = "read"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_ipl_prints_its_one_error_and_nothing_spurious() {
    let scratch = common::Debris::prepared("ntf");
    std::fs::write(scratch.dir.join("templates/ntfbroken.toml"), BROKEN).unwrap();
    let path = scratch.dir.join("notify.sock");
    let (inbox, collector) = listen(&path);

    // The AMQP connection is torn down as the process ends: repeat to give
    // a race there a chance to show.
    for run in 0..5 {
        let from = snapshot(&inbox).len();
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_beds"))
            .arg("--config-dir")
            .arg(scratch.dir.join("config"))
            .arg("run")
            .env("BEDS_ENV", "dev")
            .env("RUST_LOG", "info")
            .env("NOTIFY_SOCKET", &path)
            .env_remove("WATCHDOG_USEC")
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(60), out)
            .await
            .expect("a failed IPL exits")
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "run {run}: exit 64:\n{err}");

        let errors: Vec<&str> = err.lines().filter(|l| l.contains("ERROR")).collect();
        assert_eq!(errors.len(), 1, "run {run}: one ERROR line:\n{err}");
        assert!(
            errors[0].contains("IPL 7/9 load templates and check their database objects: FAILED"),
            "run {run}: {}",
            errors[0]
        );
        let failed: Vec<&str> = err.lines().filter(|l| l.contains("FAILED")).collect();
        assert_eq!(failed.len(), 1, "run {run}: one FAILED line:\n{err}");
        let summary: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("beds: IPL failed: templates"))
            .collect();
        assert_eq!(summary.len(), 1, "run {run}: one summary line:\n{err}");
        assert_eq!(
            err.matches("procedure ntf_no_such_proc does not exist")
                .count(),
            2,
            "run {run}: the problem named in the ERROR and in the summary:\n{err}"
        );
        for bad in ["Tokio 1.x context", "panicked"] {
            assert!(
                !err.lines().any(|l| l.contains(bad)),
                "run {run}: nothing mentions {bad:?}:\n{err}"
            );
        }

        // systemd saw the IPL get to step 7 and never READY.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let got = &snapshot(&inbox)[from..];
        assert!(
            got.iter().all(|m| !m.has("READY=1")),
            "run {run}: no READY=1: {got:#?}"
        );
        assert_eq!(
            got.iter().filter_map(ipl_step).max(),
            Some(7),
            "run {run}: the last IPL status is step 7: {got:#?}"
        );
    }
    collector.abort();
}
