//! IPL (initial program load): the ordered, logged, timed steps that take a
//! node from a config to consuming its queues, and the drain that takes it
//! back down.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rand::RngCore;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::admin::agent::Agent;
use crate::admin::plane::Plane;
use crate::broker::control::Controls;
use crate::broker::dedup::Dedup;
use crate::broker::dispatcher::Dispatcher;
use crate::broker::shared::{BrokerSpec, Limits, Shared, TemplateScope};
use crate::broker::topology::{self, Names, TopologySpec};
use crate::broker::AmqpLink;
use crate::config::DatabaseConfig;
use crate::config::{Config, ConfigError, Env};
use crate::logger::{self, EventLog, Writer};
use crate::namaste::{self, Adapters};
use crate::registry::{Registry, Template};
use crate::service::health::{Probe, Readiness};
use crate::service::http::{self, Endpoints};
use crate::service::metrics::Metrics;
use crate::service::reload::Reloader;
use crate::supervisor::Supervisor;

/// Exit codes (sysexits.h), so init systems and scripts can tell a bad
/// config from a missing service.
pub const EX_USAGE: u8 = 64;
pub const EX_UNAVAILABLE: u8 = 69;
pub const EX_SOFTWARE: u8 = 70;

/// Why a node could not start. Each names the step and the config key.
#[derive(Debug, thiserror::Error)]
pub enum IplError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("templates: {} problem(s):\n  - {}", .0.len(), .0.join("\n  - "))]
    Templates(Vec<String>),
    #[error("{service} at {addr} is unreachable (config: {key}): {reason}")]
    Unreachable {
        service: String,
        addr: String,
        key: String,
        reason: String,
    },
    #[error("RabbitMQ at {addr} refused the connection (config: amqp.user, amqp.pass, amqp.vhost): {reason}")]
    AmqpAuth { addr: String, reason: String },
    #[error("declaring the queue topology failed (config: amqp.prefix, amqp.queue_type, dispatch.retry_tiers_ms): {0}")]
    Topology(String),
    #[error("database {name}: {reason} (config: databases.{name})")]
    Database { name: String, reason: String },
    #[error("event log: {0} (config: events)")]
    Events(String),
    #[error("cannot listen on {addr} (config: http.listen): {reason}")]
    Listen { addr: String, reason: String },
}

impl IplError {
    pub fn exit_code(&self) -> u8 {
        match self {
            IplError::Config(_)
            | IplError::Templates(_)
            | IplError::Topology(_)
            | IplError::Events(_) => EX_USAGE,
            // A port another process holds may free up: let systemd retry.
            IplError::Unreachable { .. }
            | IplError::AmqpAuth { .. }
            | IplError::Database { .. }
            | IplError::Listen { .. } => EX_UNAVAILABLE,
        }
    }
}

const STEPS: usize = 9;

/// Logs one IPL step with its number and duration (also readiness's phase
/// and systemd's status line while it runs).
async fn step<T, F>(
    (events, readiness): (&EventLog, &Readiness),
    n: usize,
    name: &str,
    f: F,
) -> Result<T, IplError>
where
    F: Future<Output = Result<T, IplError>>,
{
    readiness.phase(&format!("IPL {n}/{STEPS} {name}"));
    let t = Instant::now();
    let r = f.await;
    let ms = t.elapsed().as_millis();
    match &r {
        Ok(_) => {
            tracing::info!("IPL {n}/{STEPS} {name}: ok ({ms} ms)");
            events.lifecycle("ok", "ipl", format!("IPL {n}/{STEPS} {name}: ok ({ms} ms)"));
        }
        Err(e) => {
            tracing::error!("IPL {n}/{STEPS} {name}: FAILED after {ms} ms: {e}");
            events.lifecycle(
                "error",
                "ipl",
                format!("IPL {n}/{STEPS} {name}: FAILED after {ms} ms: {e}"),
            );
        }
    }
    r
}

/// A running node.
pub struct Node {
    /// Runs, restarts and stops every long-lived task of the node.
    supervisor: Supervisor,
    /// The event log, for the node's own lifecycle events.
    events: EventLog,
    /// Writes the event log; stopped last, so the drain's events get out.
    writer: Writer,
    link: Arc<AmqpLink>,
    adapters: Adapters,
    /// The template set; a reload swaps it.
    pub registry: Arc<ArcSwap<Registry>>,
    /// Readiness, metrics, reload: what the HTTP port and signals reach.
    pub service: Arc<Endpoints>,
    /// Where the HTTP port listens (`None`: `http.listen = ""`).
    pub http_addr: Option<std::net::SocketAddr>,
    /// Stops the HTTP port, after the drain (it answers "draining" until then).
    http_stop: CancellationToken,
    /// Cancelled by an admin `shutdown`: the binary then stops the node as
    /// on SIGTERM.
    pub shutdown: CancellationToken,
}

/// Everything the services step found, so `beds check --online` can report
/// all of it at once.
async fn reachability(config: &Config) -> Vec<(bool, IplError)> {
    let t = Duration::from_millis(config.amqp.connect_timeout_ms);
    let mut targets = vec![(
        "RabbitMQ".to_string(),
        format!("{}:{}", config.amqp.host, config.amqp.port),
        "amqp.host, amqp.port".to_string(),
        false,
    )];
    for (name, db) in &config.databases {
        match db {
            DatabaseConfig::Mariadb(db) => {
                targets.push((
                    format!("MariaDB {name}"),
                    format!("{}:{}", db.host, db.port),
                    format!("databases.{name}.host, databases.{name}.port"),
                    false,
                ));
                if let Some(r) = &db.replica {
                    targets.push((
                        format!("MariaDB {name} replica"),
                        format!("{}:{}", r.host, r.port),
                        format!("databases.{name}.replica"),
                        true,
                    ));
                }
            }
            // A replica set answers when any of its seeds does; the driver
            // finds the rest. mongodb+srv seeds come from DNS: the open step
            // checks those.
            DatabaseConfig::Mongodb(db) => {
                let seeds = mongo_seeds(&db.uri);
                if !seeds.is_empty() {
                    targets.push((
                        format!("MongoDB {name}"),
                        seeds.join(","),
                        format!("databases.{name}.uri"),
                        false,
                    ));
                }
            }
        }
    }
    let mut out = Vec::new();
    for (service, addr, key, optional) in targets {
        let mut reason = String::new();
        for one in addr.split(',') {
            match tokio::time::timeout(t, TcpStream::connect(one)).await {
                Ok(Ok(_)) => {
                    reason.clear();
                    break;
                }
                Ok(Err(e)) => reason = e.to_string(),
                Err(_) => reason = format!("no answer within {t:?}"),
            }
        }
        if reason.is_empty() {
            continue;
        }
        out.push((
            optional,
            IplError::Unreachable {
                service,
                addr,
                key,
                reason,
            },
        ));
    }
    out
}

impl Node {
    /// Runs IPL steps 3-9 (config and logging are steps 1-2, done by the
    /// caller) and returns once every dispatcher is consuming.
    /// `dir` is the config folder, which a reload reads again.
    pub async fn start(config: &Config, dir: &Path) -> Result<Node, IplError> {
        let config = &config.with_databases(&crate::registry::databases_used(
            &config.node.templates,
            config,
        ));
        let service = Arc::new(Endpoints {
            readiness: Readiness::new(),
            metrics: Arc::new(Metrics::new(&config.node.name, &config.node.role)),
            probe: Default::default(),
            reloader: Default::default(),
            controls: Controls::new(
                config.node_brokers().iter().map(|(n, _)| n.as_str()),
                config.dispatch.prefetch,
            ),
        });
        // Before anything connects: a taken port fails at once, and
        // /healthz and /readyz answer during IPL.
        let http_stop = CancellationToken::new();
        let mut http_addr = None;
        if !config.http.listen.is_empty() {
            let listener = http::bind(&config.http.listen)
                .await
                .map_err(|e| IplError::Listen {
                    addr: config.http.listen.clone(),
                    reason: e.to_string(),
                })?;
            http_addr = listener.local_addr().ok();
            if let Some(a) = http_addr {
                tracing::info!("http: /healthz /readyz /metrics and POST /reload on http://{a}");
            }
            tokio::spawn(http::serve(listener, service.clone(), http_stop.clone()));
        }
        // First, so every IPL step is in the log (it waits in memory or in
        // the spool until MongoDB answers).
        let (events, writer) = match logger::start(config).await {
            Ok(w) => w,
            Err(e) => {
                http_stop.cancel();
                return Err(IplError::Events(e));
            }
        };
        events.lifecycle("ok", "ipl", "IPL 1/9 load config: ok");
        events.lifecycle("ok", "ipl", "IPL 2/9 logging: ok");
        match Node::ipl(config, &events, &writer, &service).await {
            Ok((supervisor, link, adapters, registry)) => {
                let node = Node {
                    supervisor,
                    events,
                    writer,
                    link,
                    adapters,
                    registry,
                    service,
                    http_addr,
                    http_stop,
                    shutdown: CancellationToken::new(),
                };
                node.serve(config, dir).await;
                Ok(node)
            }
            Err(e) => {
                writer.stop().await;
                http_stop.cancel();
                Err(e)
            }
        }
    }

    /// After IPL: the probe, reload, and readiness on.
    async fn serve(&self, config: &Config, dir: &Path) {
        let s = &self.service;
        let probe = Arc::new(Probe {
            readiness: s.readiness.clone(),
            metrics: s.metrics.clone(),
            link: self.link.clone(),
            adapters: self.adapters.clone(),
            registry: self.registry.clone(),
            supervisor: self.supervisor.clone(),
            events: self.events.clone(),
            interval: Duration::from_millis(config.http.probe_interval_ms),
            stop: self.supervisor.token(),
        });
        s.metrics.templates_loaded(self.registry.load().len());
        // Ready means "answers now": the first round runs before serving
        // is declared (and before READY=1).
        probe.round(probe.interval).await;
        s.readiness.set_serving(true);
        s.metrics.set_ready(s.readiness.is_ready());
        let p = probe.clone();
        self.supervisor
            .spawn("readiness probe".into(), move || p.clone().run());
        let _ = s.probe.set(probe);
        let _ = s.reloader.set(Arc::new(Reloader {
            dir: dir.to_path_buf(),
            config: config.clone(),
            registry: self.registry.clone(),
            adapters: self.adapters.clone(),
            events: self.events.clone(),
            metrics: s.metrics.clone(),
            readiness: s.readiness.clone(),
            running: Default::default(),
        }));
        s.readiness.phase(&self.ready_line(config));
        self.admin_plane(config).await;
    }

    /// Every node's admin agent; the admin role's plane too.
    async fn admin_plane(&self, config: &Config) {
        let agent = Arc::new(Agent::new(
            config,
            self.link.clone(),
            self.service.clone(),
            self.registry.clone(),
            self.shutdown.clone(),
            self.supervisor.token(),
        ));
        let a = agent.clone();
        self.supervisor
            .spawn("admin commands".into(), move || a.clone().run_commands());
        self.supervisor
            .spawn("admin heartbeat".into(), move || agent.clone().run_beacon());
        if !config.roles.get(&config.node.role).is_some_and(|r| r.admin) {
            return;
        }
        let plane = Arc::new(Plane::new(
            config,
            self.link.clone(),
            self.events.clone(),
            self.writer.collection(),
            self.supervisor.token(),
            self.shutdown.clone(),
        ));
        if let Err(e) = plane.ensure_indexes().await {
            tracing::warn!(error = %e, "admin plane: the counters' or node records' TTL index could not be made; retried at the next start");
        }
        let p = plane.clone();
        self.supervisor
            .spawn("admin plane commands".into(), move || {
                p.clone().run_commands()
            });
        let p = plane.clone();
        self.supervisor
            .spawn("admin plane membership".into(), move || {
                p.clone().run_membership()
            });
        let p = plane.clone();
        self.supervisor
            .spawn("admin plane node records".into(), move || {
                p.clone().run_roster()
            });
        self.supervisor
            .spawn("admin plane counters".into(), move || {
                plane.clone().run_graphs()
            });
    }

    /// What `systemctl status` shows while the node serves.
    pub fn ready_line(&self, config: &Config) -> String {
        ready_line(config, self.registry.load().len())
    }

    /// Reloads the template set (SIGHUP) in a task of its own.
    pub fn reload_in_background(&self) {
        if let Some(r) = self.service.reloader.get() {
            let r = r.clone();
            tokio::spawn(async move { r.reload().await });
        }
    }

    /// IPL steps 3-9.
    async fn ipl(
        config: &Config,
        events: &EventLog,
        writer: &Writer,
        service: &Endpoints,
    ) -> Result<(Supervisor, Arc<AmqpLink>, Adapters, Arc<ArcSwap<Registry>>), IplError> {
        let steps = (events, &*service.readiness);
        step(steps, 3, "service reachability", async {
            for (optional, err) in reachability(config).await {
                if optional && config.env == Env::Dev {
                    tracing::warn!("{err}; continuing without it (dev)");
                } else {
                    return Err(err);
                }
            }
            Ok(())
        })
        .await?;

        let amqp_addr = format!("{}:{}", config.amqp.host, config.amqp.port);
        let link = step(steps, 4, "AMQP connect and authenticate", async {
            AmqpLink::connect(
                config.amqp.uri(),
                format!("beds {} ({})", config.node.name, config.node.role),
                Duration::from_millis(config.amqp.connect_timeout_ms),
                config.amqp.tls.clone(),
            )
            .await
            .map(Arc::new)
            .map_err(|e| IplError::AmqpAuth {
                addr: amqp_addr.clone(),
                reason: e.to_string(),
            })
        })
        .await?;

        let names = Names {
            prefix: config.amqp.prefix.clone(),
        };
        let brokers = config.node_brokers();
        step(steps, 5, "declare queue topology", async {
            let ch = link
                .channel()
                .await
                .map_err(|e| IplError::Topology(e.to_string()))?;
            let broker_names: Vec<String> = brokers.iter().map(|(n, _)| n.clone()).collect();
            let databases: Vec<String> = config.databases.keys().cloned().collect();
            topology::declare(
                &ch,
                &TopologySpec {
                    names: &names,
                    brokers: &broker_names,
                    databases: &databases,
                    retry_tiers_ms: &config.dispatch.retry_tiers_ms,
                    queue_type: config.amqp.queue_type,
                    delivery_limit: config.amqp.delivery_limit,
                },
            )
            .await
            .map_err(IplError::Topology)?;
            let _ = ch.close(200, "topology declared".into()).await;
            Ok(())
        })
        .await?;

        // A failed IPL closes what it opened: a driver client merely
        // dropped leaves its background tasks to a runtime that is ending
        // (the MongoDB driver then panics in one of them).
        let mut adapters = Adapters::default();
        let opened = step(steps, 6, "open databases", async {
            for (name, db) in &config.databases {
                let fail = |e: namaste::AdapterError| IplError::Database {
                    name: name.clone(),
                    reason: e.to_string(),
                };
                let adapter = namaste::build(name, db).await.map_err(fail)?;
                adapters.insert(name.clone(), adapter.clone());
                adapter.open(config.env == Env::Dev).await.map_err(fail)?;
            }
            // BEDS owns the event log's collection: its indexes are made here.
            if let Some(coll) = writer.collection() {
                // Bounded: a MongoDB that accepts connections but does not
                // answer must fail IPL, not hang it. Building up to six
                // indexes is slower than one command (a loaded server took
                // over 8 s in CI), hence the 30 s floor.
                let limit = match config
                    .event_database()
                    .and_then(|d| config.databases.get(d))
                {
                    Some(DatabaseConfig::Mongodb(c)) => {
                        (Duration::from_millis(c.timeout_ms) * 4).max(Duration::from_secs(30))
                    }
                    _ => Duration::from_secs(30),
                };
                let made = tokio::time::timeout(
                    limit,
                    logger::ensure_indexes(coll, config.events.retention_days),
                )
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")));
                made.map_err(|reason| IplError::Database {
                    name: config.event_database().unwrap_or_default().to_string(),
                    reason: format!(
                        "event log indexes on {}: {reason}",
                        config.events.collection
                    ),
                })?;
            }
            Ok(())
        })
        .await;
        if let Err(e) = opened {
            adapters.close().await;
            return Err(e);
        }

        let registry = step(
            steps,
            7,
            "load templates and check their database objects",
            async {
                let reg = Registry::load_dir(&config.node.templates, config)
                    .map_err(IplError::Templates)?;
                let (problems, errors) = check_objects(&reg, &adapters).await;
                if let Some(e) = errors.into_iter().next() {
                    return Err(e);
                }
                if !problems.is_empty() {
                    return Err(IplError::Templates(problems));
                }
                for w in weak_spots(&reg, &adapters).await {
                    tracing::warn!("{w}");
                }
                tracing::info!(templates = reg.len(), "template registry loaded");
                Ok(Arc::new(ArcSwap::from_pointee(reg)))
            },
        )
        .await;
        let registry = match registry {
            Ok(r) => r,
            Err(e) => {
                adapters.close().await;
                return Err(e);
            }
        };

        let supervisor = Supervisor::new();
        let retry_key = match &config.dispatch.retry_key {
            Some(k) => k.as_bytes().to_vec(),
            // Only in dev (config requires the key elsewhere): retried
            // identities then verify only in this process.
            None => {
                let mut k = vec![0u8; 32];
                rand::thread_rng().fill_bytes(&mut k);
                k
            }
        };
        let shared = Arc::new(Shared {
            registry: registry.clone(),
            adapters: adapters.clone(),
            dedup: Dedup::new(
                Duration::from_millis(config.dispatch.dedup_window_ms),
                config.dispatch.dedup_max_entries,
            ),
            names: names.clone(),
            limits: Limits {
                retry_tiers: config.dispatch.retry_tiers_ms.len(),
                max_payload: config.dispatch.max_payload_bytes,
                max_batch: config.dispatch.max_batch,
                drain: Duration::from_millis(config.dispatch.drain_timeout_ms),
            },
            retry_key,
            node: config.node.name.clone(),
            strikes: Default::default(),
            events: events.clone(),
            metrics: service.metrics.clone(),
        });
        step(steps, 8, "spawn dispatcher pools", async {
            let spawn = |spec: &Arc<BrokerSpec>, id: usize| {
                let d = Dispatcher {
                    shared: shared.clone(),
                    broker: spec.clone(),
                    link: link.clone(),
                    id,
                    stop: supervisor.token(),
                    control: service
                        .controls
                        .watch(&spec.name)
                        .expect("a control per broker of the node"),
                };
                supervisor.spawn(format!("dispatcher {} #{id}", spec.queue), move || {
                    d.clone().run()
                });
            };
            for (name, b) in &brokers {
                let spec = Arc::new(BrokerSpec {
                    name: name.clone(),
                    serves: b.serves.clone(),
                    scope: TemplateScope::of(config, name),
                    queue: names.work(name),
                    gate: None,
                });
                for id in 0..b.instances {
                    spawn(&spec, id);
                }
                // One consumer per hold queue, running while its database
                // answers (requests held during an outage flow back).
                for db in adapters.names() {
                    let held = Arc::new(BrokerSpec {
                        queue: names.hold(name, db),
                        gate: Some(db.clone()),
                        ..(*spec).clone()
                    });
                    spawn(&held, 0);
                }
                tracing::info!(broker = %name, instances = b.instances, queue = %spec.queue, "dispatcher pool started");
            }
            Ok(())
        })
        .await?;
        // Inbox records past retention go in the background.
        let (purged, retention) = (
            adapters.clone(),
            Duration::from_millis(config.dispatch.inbox_retention_ms),
        );
        let stop = supervisor.token();
        supervisor.spawn("inbox purge".into(), move || {
            crate::broker::inbox::purge(purged.clone(), retention, stop.clone())
        });

        step(steps, 9, "ready", async { Ok(()) }).await?;
        tracing::info!(node = %config.node.name, role = %config.node.role, env = config.env.as_str(), "BEDS node ready");
        Ok((supervisor, link, adapters, registry))
    }

    /// Tasks that died and wait to be restarted (empty: the node is whole).
    pub fn degraded(&self) -> Vec<String> {
        self.supervisor.degraded()
    }

    /// Stops consuming, lets in-flight requests finish (each dispatcher waits
    /// at most the drain timeout), then closes pools and the connection.
    pub async fn stop(self) {
        let readiness = &self.service.readiness;
        readiness.set_serving(false);
        // A reload under way finishes first (it is bounded); later ones
        // are refused, the node no longer serving.
        let _no_reload = match self.service.reloader.get() {
            Some(r) => Some(r.running.lock().await),
            None => None,
        };
        self.service.metrics.set_ready(false);
        readiness.phase("draining: no new requests, finishing in-flight ones");
        crate::service::notify::stopping("draining: no new requests, finishing in-flight ones");
        tracing::info!("draining: no new requests, finishing in-flight ones");
        self.events.lifecycle(
            "ok",
            "drain",
            "draining: no new requests, finishing in-flight ones",
        );
        self.supervisor.shutdown().await;
        self.adapters.close().await;
        // Bounded: an unresponsive RabbitMQ must not hold the exit.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.link.close()).await;
        self.events.lifecycle("ok", "stop", "stopped");
        // Last: the dispatchers' final events are queued by now.
        self.writer.stop().await;
        self.http_stop.cancel();
        tracing::info!("stopped");
    }
}

/// The status line of a serving node.
pub(crate) fn ready_line(config: &Config, templates: usize) -> String {
    let brokers: Vec<String> = config
        .node_brokers()
        .iter()
        .map(|(n, b)| format!("{n}x{}", b.instances))
        .collect();
    format!(
        "serving: {} ({templates} templates, role {}, node {})",
        brokers.join(" "),
        config.node.role,
        config.node.name
    )
}

/// What each database's templates rely on exists there (procedures with
/// their arity; collections with their indexes). Every database is asked,
/// so `beds check` can list every problem: the second list holds the
/// databases that could not be asked.
pub(crate) async fn check_objects(
    reg: &Registry,
    adapters: &Adapters,
) -> (Vec<String>, Vec<IplError>) {
    let mut by_db: BTreeMap<&str, Vec<&Template>> = BTreeMap::new();
    for t in reg.templates() {
        by_db.entry(t.database.as_str()).or_default().push(t);
    }
    let (mut problems, mut errors) = (Vec::new(), Vec::new());
    for (db, templates) in by_db {
        let Some(adapter) = adapters.get(db) else {
            continue;
        };
        match adapter.missing_objects(&templates).await {
            Ok(missing) => problems.extend(missing),
            Err(e) => errors.push(IplError::Database {
                name: db.to_string(),
                reason: e.to_string(),
            }),
        }
    }
    problems.sort();
    problems.dedup();
    (problems, errors)
}

/// `host:port` seeds of a `mongodb://` URI (none for `mongodb+srv://`).
fn mongo_seeds(uri: &str) -> Vec<String> {
    let Some(rest) = uri.strip_prefix("mongodb://") else {
        return Vec::new();
    };
    let hosts = rest.split(['/', '?']).next().unwrap_or("");
    let hosts = hosts.rsplit('@').next().unwrap_or(hosts);
    hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| {
            if h.starts_with('[') {
                if h.contains("]:") {
                    h.to_string()
                } else {
                    format!("{h}:27017")
                }
            } else if h.contains(':') {
                h.to_string()
            } else {
                format!("{h}:27017")
            }
        })
        .collect()
}

/// `beds check`: every problem with config and templates, and with
/// `online`, with services and procedures too. Empty means fine.
pub async fn check(config: &Config, online: bool) -> Checked {
    let config = &config.with_databases(&crate::registry::databases_used(
        &config.node.templates,
        config,
    ));
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let registry = match Registry::load_dir(&config.node.templates, config) {
        Ok(r) => Some(r),
        Err(p) => {
            problems.extend(p);
            None
        }
    };
    if !online {
        return Checked { problems, warnings };
    }
    let unreachable = reachability(config).await;
    let amqp_down = unreachable
        .iter()
        .any(|(_, e)| matches!(e, IplError::Unreachable { service, .. } if service == "RabbitMQ"));
    problems.extend(unreachable.iter().map(|(_, e)| e.to_string()));
    if !amqp_down {
        match AmqpLink::connect(
            config.amqp.uri(),
            "beds check".into(),
            Duration::from_millis(config.amqp.connect_timeout_ms),
            config.amqp.tls.clone(),
        )
        .await
        {
            Ok(link) => link.close().await,
            Err(e) => problems.push(format!(
                "RabbitMQ refused the connection (amqp.user, amqp.pass, amqp.vhost): {e}"
            )),
        }
    }
    if let Some(reg) = registry {
        let mut adapters = Adapters::default();
        for (name, db) in &config.databases {
            match namaste::build(name, db).await {
                Ok(a) => adapters.insert(name.clone(), a),
                Err(e) => problems.push(format!("database {name}: {e}")),
            }
        }
        let (missing, errors) = check_objects(&reg, &adapters).await;
        problems.extend(missing);
        problems.extend(errors.iter().map(|e| e.to_string()));
        if problems.is_empty() {
            warnings = weak_spots(&reg, &adapters).await;
        }
        adapters.close().await;
    }
    Checked { problems, warnings }
}

/// What `beds check` found: problems stop a node, warnings do not.
pub struct Checked {
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
}

/// Each database's [`crate::namaste::Lifecycle::warnings`] about the
/// templates that use it.
async fn weak_spots(reg: &Registry, adapters: &Adapters) -> Vec<String> {
    let mut by_db: BTreeMap<&str, Vec<&Template>> = BTreeMap::new();
    for t in reg.templates() {
        by_db.entry(t.database.as_str()).or_default().push(t);
    }
    let mut out = Vec::new();
    for (db, templates) in by_db {
        if let Some(a) = adapters.get(db) {
            out.extend(a.warnings(&templates).await);
        }
    }
    out
}

/// SIGTERM, SIGINT and SIGHUP listeners, made once so every delivered
/// signal is seen exactly once (the first stop signal starts the drain, a
/// second cuts it short; SIGHUP reloads).
pub struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

/// What a signal asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Sig {
    Stop,
    Reload,
}

impl Signals {
    pub fn new() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
                hup: signal(SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// Resolves on the next SIGTERM, SIGINT or SIGHUP.
    pub async fn recv(&mut self) -> Sig {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => { tracing::info!("SIGTERM received"); Sig::Stop }
            _ = self.int.recv() => { tracing::info!("SIGINT received"); Sig::Stop }
            _ = self.hup.recv() => { tracing::info!("SIGHUP received: reloading templates"); Sig::Reload }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Sig::Stop
        }
    }
}
