//! `beds bench`: a load generator built on [`crate::client`], measuring a
//! BEDS node and, in the same run, the references that bound it (see
//! [`reference`]): every number it prints can be read as a ratio.
//!
//! One run: connect → find (or create) keys to read → warm up → measure
//! (workers each keep one request in flight; /proc samples of the node) →
//! report.

pub mod direct;
pub mod reference;
pub mod report;
pub mod target;
pub mod workload;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use rand::SeedableRng;
use serde_json::Value;

use crate::client::Client;
use crate::cmdline::{load_quiet, parse_duration};
use crate::config::{Access, Config};
use crate::ipl::{EX_UNAVAILABLE, EX_USAGE};
use crate::registry::{Registry, Template};
use direct::Direct;
use report::{ProcSample, Report, Tally};
use target::Target;
use workload::{Job, MixOp, Workload};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Template to load.
    #[arg(long, default_value = "usr")]
    pub template: String,
    /// Ops and their weights, e.g. read=90,create=10.
    #[arg(long, default_value = "read")]
    pub mix: String,
    /// Requests kept in flight.
    #[arg(long, short = 'c', default_value_t = 16)]
    pub concurrency: usize,
    /// How long to measure (default 10s unless --count is given).
    #[arg(long, value_parser = parse_duration, conflicts_with = "count")]
    pub duration: Option<Duration>,
    /// Measure this many requests instead of a duration.
    #[arg(long)]
    pub count: Option<u64>,
    /// Load before measuring (connections, pools and caches warm up).
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub warmup: Duration,
    /// Operations per message (the batch form of CONTRACT §2).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Send requests with delivery mode 2 (persisted by RabbitMQ).
    #[arg(long)]
    pub persistent: bool,
    /// Publish requests without waiting for RabbitMQ's confirm (the reply
    /// still proves each arrived): shows what the client's confirms cost.
    #[arg(long)]
    pub no_confirm: bool,
    /// Measure a reference instead of BEDS.
    #[arg(long, value_enum)]
    pub reference: Option<Reference>,
    /// Measure BEDS and every reference, one after the other, and print
    /// the ratios.
    #[arg(long, conflicts_with = "reference")]
    pub compare: bool,
    /// Give every request its own `message_id`, so writes go through the
    /// durable inbox.
    #[arg(long, conflicts_with = "reference")]
    pub message_ids: bool,
    /// Measure BEDS without and with message ids, one after the other
    /// (rounds interleave them): what the durable inbox costs.
    #[arg(long, conflicts_with_all = ["reference", "compare", "message_ids"])]
    pub compare_inbox: bool,
    /// Start two nodes of the bench's own on this config, one with the
    /// event log and one without (`events.database = ""`), and measure
    /// them one after the other (rounds interleave them): what the event
    /// log costs.
    #[arg(long, conflicts_with_all = ["reference", "compare", "compare_inbox"])]
    pub compare_log: bool,
    /// Run every mode this many times, interleaved, and report each mode's
    /// median run (a shared machine is noisy).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// AMQP connections the load is spread over.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Keys to read from: existing ones are listed, missing ones created.
    #[arg(long, default_value_t = 1000)]
    pub seed: usize,
    /// The BEDS node's pid, for its CPU and memory (default: the one `beds`
    /// node process running here, if there is exactly one).
    #[arg(long)]
    pub node_pid: Option<u32>,
    /// A request without a reply by then counts as TIMEOUT.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub timeout: Duration,
    /// Print one JSON line instead of the human report.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Reference {
    /// Echo consumer (its own process): RabbitMQ round trips, no database.
    Broker,
    /// The same procedures called straight through a sqlx pool: no RabbitMQ.
    Database,
    /// The thinnest correct pipeline (its own process): lapin → sqlx CALL →
    /// confirmed reply → ack.
    Pipeline,
}

/// What one run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Beds,
    /// BEDS with a fresh `message_id` on every request.
    BedsInbox,
    /// A node the bench starts itself, with or without the event log.
    Node {
        log: bool,
    },
    Ref(Reference),
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Beds => "beds",
            Mode::BedsInbox => "beds+ids",
            Mode::Node { log: true } => "beds+log",
            Mode::Node { log: false } => "beds-log",
            Mode::Ref(Reference::Broker) => "broker",
            Mode::Ref(Reference::Database) => "database",
            Mode::Ref(Reference::Pipeline) => "pipeline",
        }
    }
}

/// A bench failure before measuring: printed, then the exit code.
struct Fail(u8, String);

pub async fn run(dir: &std::path::Path, args: BenchArgs) -> ExitCode {
    let config = match load_quiet(dir) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match bench(dir, &config, &args).await {
        Ok(reports) => {
            if args.json {
                let line = if reports.len() == 1 {
                    serde_json::to_string(&reports[0])
                } else {
                    serde_json::to_string(&serde_json::json!({ "runs": reports }))
                };
                println!("{}", line.unwrap_or_default());
            } else if reports.len() > 1 {
                report::print_comparison(&reports);
            }
            let failed: u64 = reports.iter().map(|r| r.ops - r.ok_ops).sum();
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                // Rates count successes only, but a run with failures is not
                // a measurement of the path it meant to measure.
                eprintln!("beds bench: {failed} operation(s) failed (see errors)");
                ExitCode::from(1)
            }
        }
        Err(Fail(code, msg)) => {
            eprintln!("beds bench: {msg}");
            ExitCode::from(code)
        }
    }
}

async fn bench(
    dir: &std::path::Path,
    config: &Config,
    args: &BenchArgs,
) -> Result<Vec<Report>, Fail> {
    let usage = |m: String| Fail(EX_USAGE, m);
    if !(1..=10_000).contains(&args.concurrency) {
        return Err(usage("--concurrency must be 1 to 10000".into()));
    }
    if args.batch == 0 || args.batch > config.dispatch.max_batch {
        return Err(usage(format!(
            "--batch must be 1 to {} (dispatch.max_batch)",
            config.dispatch.max_batch
        )));
    }
    if args.connections == 0 || args.connections > args.concurrency {
        return Err(usage("--connections must be 1 to --concurrency".into()));
    }
    if args.count == Some(0) {
        return Err(usage("--count must be at least 1".into()));
    }
    let day = Duration::from_secs(86_400);
    if args.duration.is_some_and(|d| d.is_zero() || d > day)
        || args.warmup > day
        || args.timeout.is_zero()
        || args.timeout > day
    {
        return Err(usage(
            "--duration and --timeout must be above 0, and they and --warmup at most 24 h".into(),
        ));
    }
    if !(1..=1_000_000).contains(&args.seed) {
        return Err(usage("--seed must be 1 to 1000000".into()));
    }
    let registry = Registry::load_dir(&config.node.templates, config)
        .map_err(|e| usage(format!("templates: {}", e.join("; "))))?;
    let registry = Arc::new(registry);
    let template = registry
        .get(&args.template)
        .map_err(|e| usage(e.to_string()))?
        .clone();
    let mix = workload::parse_mix(&args.mix, &template).map_err(usage)?;
    let mut wl = Workload::new(&template, mix, args.batch);

    let modes: Vec<Mode> = if args.compare {
        vec![
            Mode::Beds,
            Mode::Ref(Reference::Pipeline),
            Mode::Ref(Reference::Broker),
            Mode::Ref(Reference::Database),
        ]
    } else if args.compare_log {
        vec![Mode::Node { log: true }, Mode::Node { log: false }]
    } else if args.compare_inbox {
        vec![Mode::Beds, Mode::BedsInbox]
    } else if args.message_ids {
        vec![Mode::BedsInbox]
    } else {
        vec![args.reference.map_or(Mode::Beds, Mode::Ref)]
    };
    if args.rounds == 0 || args.rounds > 100 {
        return Err(usage("--rounds must be 1 to 100".into()));
    }
    let per_round = modes.len();
    let modes: Vec<Mode> = modes
        .iter()
        .copied()
        .cycle()
        .take(per_round * args.rounds)
        .collect();
    let needs_db = modes
        .iter()
        .any(|m| matches!(m, Mode::Ref(Reference::Database | Reference::Pipeline)));
    if needs_db && !config.databases.contains_key(&template.database) {
        return Err(usage(format!(
            "the database and pipeline references need template {}'s database {}",
            template.name, template.database
        )));
    }

    let mut reports = Vec::new();
    let mut seeded = false;
    for mode in modes {
        // The database reference gets one connection per request in flight:
        // that is its definition. The pipeline gets what BEDS gets.
        let db = match mode {
            Mode::Ref(Reference::Database) => Some(
                Direct::open(config, &template, Some(args.concurrency as u32))
                    .await
                    .map_err(|e| Fail(EX_UNAVAILABLE, e))?,
            ),
            _ => None,
        };
        // Seeding lists (a read) and creates (a write).
        let mut accesses: Vec<Access> = wl.mix.iter().map(|m| m.op.access).collect();
        if wl.needs_keys() {
            accesses.extend([Access::Read, Access::Write]);
        }
        let mut run = Run::start(dir, config, args, mode, db, (&wl.template, &accesses)).await?;
        let mut seed_requests = 0;
        if !seeded && wl.needs_keys() {
            seed_requests = if mode == Mode::Ref(Reference::Broker) {
                // The echo reads nothing: any ids will do.
                wl.keys = (1..=args.seed.max(1) as i64).map(Value::from).collect();
                0
            } else {
                gather_keys(&run.target, &mut wl, &template, args).await?
            };
            seeded = true;
        }
        let wl_arc = Arc::new(wl.clone());
        let report = run.measure(args, &wl_arc, seed_requests).await;
        run.stop().await;
        if !args.json {
            report.print_human();
        }
        reports.push(report);
    }
    if args.rounds == 1 {
        return Ok(reports);
    }
    // Each mode's median run by requests per second.
    let mut medians = Vec::new();
    for i in 0..per_round {
        let mut runs: Vec<Report> = reports.iter().skip(i).step_by(per_round).cloned().collect();
        runs.sort_by(|a, b| a.requests_per_s.total_cmp(&b.requests_per_s));
        medians.push(runs.swap_remove(runs.len() / 2));
    }
    if !args.json {
        println!("\nmedian of {} rounds:", args.rounds);
        for r in &medians {
            r.print_human();
        }
    }
    Ok(medians)
}

/// One mode's target and, for references, the consumer serving it.
struct Run {
    mode: Mode,
    target: Arc<Target>,
    /// The reference process (`beds bench-serve`) of broker and pipeline,
    /// or the node the bench started itself.
    server: Option<tokio::process::Child>,
    /// The own node's exchange and queues, removed after its run.
    own_topology: Option<(String, Vec<String>, std::path::PathBuf)>,
}

impl Run {
    async fn start(
        dir: &std::path::Path,
        config: &Config,
        args: &BenchArgs,
        mode: Mode,
        db: Option<Direct>,
        (template, accesses): (&str, &[Access]),
    ) -> Result<Run, Fail> {
        let unavailable = |m: String| Fail(EX_UNAVAILABLE, m);
        let uri = config.amqp.uri();
        let connect = |exchange: String| {
            let uri = uri.clone();
            async move {
                let mut clients = Vec::with_capacity(args.connections);
                for _ in 0..args.connections {
                    clients.push(
                        Client::connect_with(&uri, &exchange, !args.no_confirm)
                            .await
                            .map_err(|e| unavailable(e.to_string()))?,
                    );
                }
                Ok::<_, Fail>(clients)
            }
        };
        let queue = |kind: &str| {
            format!(
                "{}.bench.{kind}.{}",
                config.amqp.prefix,
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            )
        };
        // Never the bound: the client's concurrency is.
        let prefetch = args.concurrency.min(u16::MAX as usize) as u16;
        let mut own_topology = None;
        let (target, server) = match mode {
            Mode::Beds | Mode::BedsInbox => {
                let mut routes = Vec::new();
                let mut used = Vec::new();
                for access in [Access::Read, Access::Write, Access::Meta] {
                    let broker = config.broker_for(template, access);
                    if accesses.contains(&access) {
                        match &broker {
                            Some(b) => used.push(b.clone()),
                            None => {
                                return Err(Fail(
                                    EX_USAGE,
                                    format!("no broker serves {} ops", access.as_str()),
                                ))
                            }
                        }
                    }
                    routes.push(broker);
                }
                preflight(config, &used).await?;
                let clients = connect(config.amqp.prefix.clone()).await?;
                let routing = target::Routing::ByAccess(routes);
                let ids = mode == Mode::BedsInbox;
                (
                    Target::amqp(clients, routing, args.persistent, args.timeout, ids),
                    None,
                )
            }
            Mode::Node { log } => {
                let (child, prefix) = own_node(dir, config, log).await?;
                let spool = config.events.spool_dir.join(&prefix);
                own_topology = Some((uri.clone(), own_queues(config, &prefix), spool));
                let routes = [Access::Read, Access::Write, Access::Meta]
                    .iter()
                    .map(|a| config.broker_for(template, *a))
                    .collect();
                let clients = connect(prefix).await?;
                let ids = args.message_ids;
                (
                    Target::amqp(
                        clients,
                        target::Routing::ByAccess(routes),
                        args.persistent,
                        args.timeout,
                        ids,
                    ),
                    Some(child),
                )
            }
            Mode::Ref(Reference::Database) => (
                Target::Database {
                    db: db.ok_or_else(|| unavailable("no database".into()))?,
                },
                None,
            ),
            Mode::Ref(_) => {
                let q = queue(mode.name());
                let mut cmd = tokio::process::Command::new(
                    std::env::current_exe().map_err(|e| unavailable(e.to_string()))?,
                );
                cmd.arg("--config-dir")
                    .arg(dir)
                    .args(["bench-serve", "--kind", mode.name(), "--queue", &q])
                    .args(["--prefetch", &prefetch.to_string()])
                    .args(["--template", &args.template])
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .kill_on_drop(true);
                let mut child = cmd.spawn().map_err(|e| {
                    unavailable(format!("cannot start the {} reference: {e}", mode.name()))
                })?;
                let stdout = child.stdout.take();
                let ready = tokio::time::timeout(Duration::from_secs(30), async move {
                    use tokio::io::AsyncBufReadExt;
                    let mut lines = tokio::io::BufReader::new(stdout?).lines();
                    while let Ok(Some(l)) = lines.next_line().await {
                        if l == "ready" {
                            return Some(());
                        }
                    }
                    None
                })
                .await;
                if !matches!(ready, Ok(Some(()))) {
                    return Err(unavailable(format!(
                        "the {} reference did not start (see its error above)",
                        mode.name()
                    )));
                }
                let clients = connect(String::new()).await?;
                let routing = target::Routing::Queue(q);
                (
                    Target::amqp(clients, routing, args.persistent, args.timeout, false),
                    Some(child),
                )
            }
        };
        Ok(Run {
            mode,
            target: Arc::new(target),
            server,
            own_topology,
        })
    }

    async fn stop(self) {
        if let Some(mut child) = self.server {
            if let Some(pid) = child.id() {
                // SAFETY: signals our own child process.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        if let Ok(t) = Arc::try_unwrap(self.target) {
            t.close().await;
        }
        if let Some((uri, names, spool)) = self.own_topology {
            remove_topology(&uri, &names).await;
            // Empty once the node wrote its events: only then removed.
            let _ = std::fs::remove_dir(spool);
        }
    }

    /// Warm-up, then the measured run with /proc samples around it.
    async fn measure(
        &mut self,
        args: &BenchArgs,
        wl: &Arc<Workload>,
        seed_requests: u64,
    ) -> Report {
        let name = self.mode.name();
        let mut warmup_requests = 0;
        if !args.warmup.is_zero() {
            let until = Arc::new(Until::Time(Instant::now() + args.warmup));
            let t = drive(&self.target, wl, args.concurrency, until, None).await;
            warmup_requests = t.requests;
        }
        // The process serving the requests: the BEDS node or the reference.
        let node_pid = match (&self.server, self.mode) {
            (Some(child), _) => child.id(),
            (None, Mode::Beds | Mode::BedsInbox) => args.node_pid.or_else(report::find_node),
            _ => None,
        };
        let duration = args.duration.unwrap_or(Duration::from_secs(10));
        let until = Arc::new(match args.count {
            Some(n) => Until::Count(AtomicU64::new(0), n),
            None => Until::Time(Instant::now() + duration),
        });
        let progress = Progress::start(name, args, &until);
        let sampler = node_pid.map(|pid| {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            (stop, tokio::spawn(sample_rss(pid, stopped)))
        });
        let node_before = node_pid.and_then(report::sample);
        let me_before = report::sample(std::process::id());
        let machine_before = report::machine();
        let started = Instant::now();

        let tally = drive(
            &self.target,
            wl,
            args.concurrency,
            until,
            Some(progress.done.clone()),
        )
        .await;

        let elapsed = started.elapsed().as_secs_f64().max(1e-9);
        let node_after = node_pid.and_then(report::sample);
        let me_after = report::sample(std::process::id());
        let machine_after = report::machine();
        progress.finish();
        let rss = match sampler {
            Some((stop, task)) => {
                let _ = stop.send(());
                task.await.unwrap_or_default()
            }
            None => Vec::new(),
        };

        let per = |a: Option<ProcSample>, b: Option<ProcSample>, n: u64| match (a, b) {
            (Some(a), Some(b)) if n > 0 => (b.cpu_s - a.cpu_s) * 1e6 / n as f64,
            _ => 0.0,
        };
        let server = match (node_pid, node_before, node_after) {
            (Some(pid), Some(a), Some(b)) => {
                let mut rss = rss;
                rss.push(b.rss_kib);
                let start = rss.first().copied().unwrap_or(a.rss_kib).max(1);
                let (min, max) = (
                    rss.iter().copied().min().unwrap_or(start),
                    rss.iter().copied().max().unwrap_or(start),
                );
                let cpu = b.cpu_s - a.cpu_s;
                let us_req = per(Some(a), Some(b), tally.requests);
                Some(report::ServerCost {
                    pid,
                    cpu_us_per_request: us_req,
                    cpu_us_per_op: per(Some(a), Some(b), tally.ops),
                    cores_busy: cpu / elapsed,
                    cores_for_40k_rps: us_req * 40_000.0 / 1e6,
                    rss_kib_start: start,
                    rss_kib_end: b.rss_kib,
                    rss_kib_min: min,
                    rss_kib_max: max,
                    rss_spread_pct: 100.0 * (max - min) as f64 / start as f64,
                })
            }
            _ => None,
        };
        let machine_cpu_busy_pct = match (machine_before, machine_after) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                100.0 * (b1 - b0) as f64 / (t1 - t0) as f64
            }
            _ => 0.0,
        };
        Report {
            mode: name.to_string(),
            template: wl.template.clone(),
            mix: wl.mix_label(),
            concurrency: args.concurrency,
            batch: wl.batch,
            persistent: args.persistent,
            no_confirm: args.no_confirm,
            connections: match self.mode {
                Mode::Ref(Reference::Database) => 0,
                _ => args.connections,
            },
            seed_requests,
            warmup_requests,
            requests: tally.requests,
            ok_requests: tally.ok_requests,
            ops: tally.ops,
            ok_ops: tally.ok_ops,
            elapsed_s: elapsed,
            requests_per_s: tally.ok_requests as f64 / elapsed,
            ops_per_s: tally.ok_ops as f64 / elapsed,
            latency_us: report::latency(&tally.hist),
            errors: tally.errors,
            server,
            bench_cpu_us_per_request: per(me_before, me_after, tally.requests),
            machine_cpu_busy_pct,
        }
    }
}

/// Every broker queue the run will publish to exists and has a consumer:
/// otherwise requests would only pile up, and the bench says so instead.
async fn preflight(config: &Config, brokers: &[String]) -> Result<(), Fail> {
    let conn = lapin::Connection::connect(&config.amqp.uri(), crate::broker::tokio_properties())
        .await
        .map_err(|e| Fail(EX_UNAVAILABLE, format!("cannot connect to RabbitMQ: {e}")))?;
    let mut problem = None;
    for broker in brokers {
        let queue = format!("{}.{broker}", config.amqp.prefix);
        let Ok(ch) = conn.create_channel().await else {
            continue;
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        match ch
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
        {
            Ok(q) if q.consumer_count() == 0 => {
                problem = Some(format!(
                    "no BEDS node consumes {queue} (start one: utilities/dev run)"
                ))
            }
            Ok(_) => {}
            Err(_) => {
                problem = Some(format!(
                    "queue {queue} does not exist: no BEDS node with prefix {:?} has started here",
                    config.amqp.prefix
                ))
            }
        }
        let _ = ch.close(200, "ok".into()).await;
    }
    let _ = conn.close(200, "ok".into()).await;
    problem.map_or(Ok(()), |p| Err(Fail(EX_UNAVAILABLE, p)))
}

/// Finds existing keys with the template's list op; creates the rest with
/// its create op. Returns the requests it took.
async fn gather_keys(
    target: &Arc<Target>,
    wl: &mut Workload,
    template: &Template,
    args: &BenchArgs,
) -> Result<u64, Fail> {
    let key = wl.key_field.clone().unwrap_or_default();
    let fail = |m: String| Fail(EX_UNAVAILABLE, m);
    let mut requests = 0;
    let mut keys: Vec<Value> = Vec::new();
    if let Some((name, op, data)) = workload::list_op(template, &key) {
        let lw = Workload::new(
            template,
            vec![MixOp {
                name,
                op,
                weight: 1,
            }],
            1,
        );
        let out = target
            .run(
                &lw,
                &Job {
                    op: 0,
                    entries: vec![data],
                },
                0,
                true,
            )
            .await;
        requests += 1;
        if let Some(code) = out.failed.first() {
            return Err(fail(format!(
                "listing {} keys failed: {code}",
                template.name
            )));
        }
        keys.extend(
            out.rows
                .iter()
                .filter_map(|r| r.get(&key).filter(|k| !k.is_null()))
                .cloned(),
        );
    }
    keys.truncate(args.seed);
    if keys.len() < args.seed {
        if let Some((name, op)) = workload::create_op(template, &key) {
            let cw = Arc::new(Workload::new(
                template,
                vec![MixOp {
                    name: name.clone(),
                    op,
                    weight: 1,
                }],
                1,
            ));
            let missing = args.seed - keys.len();
            let mut tasks = tokio::task::JoinSet::new();
            let workers = args.concurrency.min(missing);
            for w in 0..workers {
                let (t, cw) = (target.clone(), cw.clone());
                let n = missing / workers + usize::from(w < missing % workers);
                tasks.spawn(async move {
                    let mut rng = rand::rngs::StdRng::from_entropy();
                    let mut found = Vec::new();
                    for _ in 0..n {
                        let job = cw.job(&mut rng);
                        let out = t.run(&cw, &job, w, true).await;
                        if let Some(code) = out.failed.first() {
                            return Err(code.clone());
                        }
                        found.extend(out.rows);
                    }
                    Ok(found)
                });
            }
            while let Some(r) = tasks.join_next().await {
                match r {
                    Ok(Ok(rows)) => keys.extend(
                        rows.iter()
                            .filter_map(|r| r.get(&key).filter(|k| !k.is_null()))
                            .cloned(),
                    ),
                    Ok(Err(code)) => {
                        return Err(fail(format!(
                            "creating {} records to read failed: {code}",
                            template.name
                        )))
                    }
                    Err(e) => return Err(fail(e.to_string())),
                }
            }
            requests += missing as u64;
            tracing::debug!(created = missing, op = %name, "seeded keys");
        }
    }
    if keys.is_empty() {
        return Err(fail(format!(
            "{}.{key}: no existing keys to read and no create op to make some",
            template.name
        )));
    }
    wl.keys = keys;
    Ok(requests)
}

/// When a run ends.
enum Until {
    /// After this many requests (the counter claims them).
    Count(AtomicU64, u64),
    /// No request starts after this instant.
    Time(Instant),
}

impl Until {
    fn claim(&self) -> bool {
        match self {
            Until::Count(claimed, n) => claimed.fetch_add(1, Ordering::Relaxed) < *n,
            Until::Time(t) => Instant::now() < *t,
        }
    }
}

/// `concurrency` workers, each with one request in flight until `until`.
async fn drive(
    target: &Arc<Target>,
    wl: &Arc<Workload>,
    concurrency: usize,
    until: Arc<Until>,
    done: Option<Arc<AtomicU64>>,
) -> Tally {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        let (target, wl, until, done) = (target.clone(), wl.clone(), until.clone(), done.clone());
        tasks.spawn(async move {
            let mut rng = rand::rngs::StdRng::from_entropy();
            let mut t = Tally::default();
            while until.claim() {
                let job = wl.job(&mut rng);
                let started = Instant::now();
                let out = target.run(&wl, &job, w, false).await;
                let us = started.elapsed().as_micros().max(1) as u64;
                t.requests += 1;
                t.ops += job.entries.len() as u64;
                t.ok_ops += out.ok as u64;
                if out.failed.is_empty() {
                    // Latency of answered requests only: a fast failure
                    // would flatter the percentiles.
                    t.hist.saturating_record(us);
                    t.ok_requests += 1;
                }
                let lost = out.failed.iter().any(|c| c == target::CLIENT);
                for code in out.failed {
                    *t.errors.entry(code).or_default() += 1;
                }
                if let Some(d) = &done {
                    d.fetch_add(1, Ordering::Relaxed);
                }
                if lost {
                    break; // the connection is gone: this worker cannot send
                }
            }
            t
        });
    }
    let mut total = Tally::default();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(t) => total.merge(t),
            // A bug in the bench: say so rather than report a short count.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {}
        }
    }
    total
}

/// The node's resident size once a second until `stop`: the memory-flat
/// check reads min, max and drift from these.
async fn sample_rss(pid: u32, mut stop: tokio::sync::oneshot::Receiver<()>) -> Vec<u64> {
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = &mut stop => return samples,
            _ = tick.tick() => {
                if let Some(s) = report::sample(pid) {
                    samples.push(s.rss_kib);
                }
            }
        }
    }
}

/// Progress on stderr: a bar on a terminal, a plain line per interval
/// otherwise.
struct Progress {
    done: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(name: &'static str, args: &BenchArgs, until: &Arc<Until>) -> Progress {
        let done = Arc::new(AtomicU64::new(0));
        let tty = std::io::stderr().is_terminal();
        let (len, by_count) = match until.as_ref() {
            Until::Count(_, n) => (*n, true),
            Until::Time(t) => (
                t.saturating_duration_since(Instant::now()).as_millis() as u64,
                false,
            ),
        };
        let every = if tty || len <= 30_000 || by_count {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(10)
        };
        let d = done.clone();
        let concurrency = args.concurrency;
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let bar = tty.then(|| {
                let b = indicatif::ProgressBar::new(len);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{prefix:>8} [{bar:30}] {percent:>3}% {msg}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                b.set_prefix(name);
                b
            });
            let mut tick = tokio::time::interval(if tty {
                Duration::from_millis(200)
            } else {
                every
            });
            tick.tick().await;
            loop {
                tick.tick().await;
                let n = d.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64();
                let rate = (n as f64 / secs).round() as u64;
                match &bar {
                    Some(b) => {
                        b.set_position(if by_count {
                            n
                        } else {
                            started.elapsed().as_millis() as u64
                        });
                        b.set_message(format!(
                            "{} requests, {} req/s",
                            report::thousands(n),
                            report::thousands(rate)
                        ));
                    }
                    None => eprintln!(
                        "[bench {name}] {secs:.0} s: {} requests, {} req/s, {concurrency} in flight",
                        report::thousands(n),
                        report::thousands(rate)
                    ),
                }
            }
        });
        Progress { done, task }
    }

    fn finish(self) {
        self.task.abort();
        if std::io::stderr().is_terminal() {
            // The bar's last frame stays otherwise.
            eprint!("\r\x1b[2K");
        }
    }
}

/// Starts `beds run` on this config with a prefix and node name of its own
/// (and without the event log unless `log`), and waits until it is ready.
async fn own_node(
    dir: &std::path::Path,
    config: &Config,
    log: bool,
) -> Result<(tokio::process::Child, String), Fail> {
    let unavailable = |m: String| Fail(EX_UNAVAILABLE, m);
    let prefix = format!(
        "{}b{}",
        config.amqp.prefix,
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut cmd = tokio::process::Command::new(
        std::env::current_exe().map_err(|e| unavailable(e.to_string()))?,
    );
    cmd.arg("--config-dir")
        .arg(dir)
        .arg("run")
        .env("BEDS__AMQP__PREFIX", &prefix)
        .env("BEDS__NODE__NAME", &prefix)
        // Beside the node under test: any free port for its HTTP listener.
        .env("BEDS__HTTP__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if !log {
        cmd.env("BEDS__EVENTS__DATABASE", "");
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| unavailable(format!("cannot start a node: {e}")))?;
    let stderr = child.stderr.take();
    let ready = tokio::time::timeout(Duration::from_secs(60), async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stderr?).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            if l.contains("BEDS node ready") {
                // Keep reading: the node must never block on a full pipe.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                return Some(());
            }
            if l.contains("IPL failed") || l.contains("FAILED") {
                eprintln!("beds bench: own node: {l}");
            }
        }
        None
    })
    .await;
    if !matches!(ready, Ok(Some(()))) {
        return Err(unavailable(
            "the bench's own node did not become ready".into(),
        ));
    }
    Ok((child, prefix))
}

/// Every queue a node on `prefix` declares, and its exchange (last).
fn own_queues(config: &Config, prefix: &str) -> Vec<String> {
    let names = crate::broker::topology::Names {
        prefix: prefix.to_string(),
    };
    let mut out = Vec::new();
    for (b, _) in config.node_brokers() {
        out.push(names.work(&b));
        out.push(names.dlq(&b));
        for n in 1..=config.dispatch.retry_tiers_ms.len() {
            out.push(names.retry(&b, n));
        }
        for db in config.databases.keys() {
            out.push(names.hold(&b, db));
        }
    }
    out.push(crate::admin::topology::in_queue(prefix));
    out.push(crate::admin::topology::graph_queue(prefix));
    out.push(names.exchange().to_string());
    out
}

async fn remove_topology(uri: &str, names: &[String]) {
    let Ok(conn) = lapin::Connection::connect(uri, crate::broker::tokio_properties()).await else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        let (exchange, queues) = names.split_last().expect("the exchange is last");
        for q in queues {
            let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
        }
        let _ = ch
            .exchange_delete(exchange.as_str().into(), Default::default())
            .await;
    }
    let _ = conn.close(200, "bench done".into()).await;
}
