//! Every node's side of the admin plane, on its own channel and tasks:
//! executes the commands the admin node forwards (`status`, `reload`,
//! `pause`, `resume`, `prefetch`, `drain`, `shutdown`) and sends heartbeats
//! and counter windows.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::channel::{forever, next, open};
use super::topology::{self, GRAPH, OUT, SYSLOG};
use super::{Command, Counters, Heartbeat, NodeAnswer, Verb};
use crate::broker::AmqpLink;
use crate::config::{AdminConfig, Config};
use crate::logger::now_ms;
use crate::registry::Registry;
use crate::service::http::Endpoints;

/// What a node's agent reaches.
pub struct Agent {
    pub node: String,
    pub role: String,
    pub prefix: String,
    /// The brokers this node runs, with their dispatcher counts.
    pub brokers: Vec<(String, usize)>,
    /// The databases this node opened (for `status`).
    pub databases: Vec<String>,
    /// The node's own AMQP user: commands the admin plane forwards come
    /// from it or from a user with the command's role.
    pub amqp_user: String,
    pub admin: AdminConfig,
    pub link: Arc<AmqpLink>,
    pub service: Arc<Endpoints>,
    pub registry: Arc<ArcSwap<Registry>>,
    pub started_ms: i64,
    /// How long `drain` waits for in-flight requests.
    pub drain: Duration,
    /// Set by `drain`, cleared by `resume`: shown in `status`.
    pub draining: AtomicBool,
    /// Cancelled by `shutdown`: the binary then stops as on SIGTERM.
    pub shutdown: CancellationToken,
    /// The node's stop signal.
    pub stop: CancellationToken,
}

impl Agent {
    pub fn new(
        config: &Config,
        link: Arc<AmqpLink>,
        service: Arc<Endpoints>,
        registry: Arc<ArcSwap<Registry>>,
        shutdown: CancellationToken,
        stop: CancellationToken,
    ) -> Agent {
        Agent {
            node: config.node.name.clone(),
            role: config.node.role.clone(),
            prefix: config.amqp.prefix.clone(),
            brokers: config
                .node_brokers()
                .into_iter()
                .map(|(n, b)| (n, b.instances))
                .collect(),
            databases: config.databases.keys().cloned().collect(),
            amqp_user: config.amqp.user.clone(),
            admin: config.admin.clone(),
            link,
            service,
            registry,
            started_ms: now_ms(),
            drain: Duration::from_millis(config.dispatch.drain_timeout_ms),
            draining: AtomicBool::new(false),
            shutdown,
            stop,
        }
    }

    /// Consumes this node's admin queue until stop, reconnecting with
    /// backoff.
    pub async fn run_commands(self: Arc<Self>) {
        forever("command queue", &self.stop, || self.serve_commands()).await
    }

    async fn serve_commands(self: &Arc<Self>) -> Result<(), lapin::Error> {
        let Some(ch) = open(&self.link, &self.stop).await? else {
            return Ok(());
        };
        ch.basic_qos(8, BasicQosOptions::default()).await?;
        topology::declare_shared(&ch, &self.prefix).await?;
        let keys = [OUT.to_string(), topology::node_key(&self.node)];
        let queue =
            topology::private(&ch, &self.prefix, &format!("{OUT}.{}", self.node), &keys).await?;
        let mut consumer = ch
            .basic_consume(
                queue.as_str().into(),
                format!("{}.admin", self.node).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // Each command in its own task: a drain or a reload under way does
        // not hold up a status.
        let running = TaskTracker::new();
        let result = loop {
            let delivery = match next(&self.stop, &mut consumer).await {
                Ok(Some(d)) => d,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            let (me, ch) = (self.clone(), ch.clone());
            running.spawn(async move { me.one(&ch, delivery).await });
        };
        running.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), running.wait()).await;
        let _ = ch.close(200, "node stopping".into()).await;
        result
    }

    /// Runs one forwarded command and answers it; a sender without the
    /// right gets no answer (the reply address is the sender's choice).
    async fn one(&self, ch: &Channel, delivery: lapin::message::Delivery) {
        let Some(answer) = self.answer(&delivery.properties, &delivery.data).await else {
            let _ = delivery.ack(BasicAckOptions::default()).await;
            return;
        };
        let then_stop =
            answer.ok && Command::parse(&delivery.data).is_ok_and(|c| c.command == Verb::Shutdown);
        topology::reply(ch, &delivery.properties, &answer).await;
        let _ = delivery.ack(BasicAckOptions::default()).await;
        if then_stop {
            tracing::warn!("admin: shutdown requested; draining and exiting");
            self.shutdown.cancel();
        }
    }

    /// Checks who sent the command and whether it is still awaited, and
    /// runs it. `None`: not answered at all.
    async fn answer(&self, props: &BasicProperties, body: &[u8]) -> Option<NodeAnswer> {
        let mut a = NodeAnswer {
            node: self.node.clone(),
            role: self.role.clone(),
            ok: false,
            error: None,
            result: Value::Null,
        };
        // RabbitMQ verified user_id: a node account (the admin node), or a
        // user holding the command's role.
        let sender = props.user_id().as_ref().map(|u| u.to_string());
        let Some(sender) = sender else {
            tracing::warn!("admin: a command without user_id on this node's admin queue; ignored");
            return None;
        };
        let node_user = self.admin.is_node_user(&sender, &self.amqp_user);
        let cmd = match Command::parse(body) {
            Ok(c) => c,
            Err(e) if node_user => {
                a.error = Some(e);
                return Some(a);
            }
            Err(_) => return None,
        };
        if !node_user
            && self
                .admin
                .role_of(&sender)
                .is_none_or(|r| r < cmd.command.needs())
        {
            tracing::warn!(sender = %sender, "admin: {} refused: the sender may not run it; not answered", cmd.command.as_str());
            return None;
        }
        // The admin node stopped waiting (this node was busy, or the
        // message sat in its queue): running it now would surprise.
        let deadline = props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(super::DEADLINE_HEADER).cloned())
            .and_then(|v| match v {
                lapin::types::AMQPValue::LongLongInt(n) => Some(n),
                _ => None,
            });
        if deadline.is_some_and(|d| now_ms() > d) {
            let why = format!(
                "{} arrived after the admin node stopped waiting; not run",
                cmd.command.as_str()
            );
            tracing::warn!("admin: {why}");
            a.error = Some(why);
            return Some(a);
        }
        let caller = props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(super::plane::CALLER_HEADER).cloned())
            .and_then(|v| match v {
                lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
                _ => None,
            })
            .unwrap_or_else(|| sender.clone());
        tracing::info!(caller = %caller, "admin: running {}", cmd.command.as_str());
        match self.execute(&cmd).await {
            Ok(v) => {
                a.ok = true;
                a.result = v;
            }
            Err(e) => a.error = Some(e),
        }
        Some(a)
    }

    pub async fn execute(&self, cmd: &Command) -> Result<Value, String> {
        if let Some(p) = cmd.problem() {
            return Err(p);
        }
        let controls = &self.service.controls;
        match cmd.command {
            Verb::Status => Ok(self.status()),
            Verb::Reload => {
                let Some(r) = self.service.reloader.get() else {
                    return Err("the node is not serving yet".into());
                };
                let r = r.reload().await;
                let out = json!({
                    "templates": r.templates,
                    "version": self.registry.load().version(),
                    "problems": r.problems,
                });
                if r.ok {
                    Ok(out)
                } else {
                    Err(format!(
                        "the new template set was refused; the old one ({}) keeps serving: {}",
                        self.registry.load().version(),
                        r.problems.join("; ")
                    ))
                }
            }
            Verb::Pause | Verb::Resume | Verb::Prefetch => {
                // Sent to every node, a broker this node does not run is
                // nothing to do here; sent to this node, it is a mistake.
                if let Some(b) = &cmd.broker {
                    if controls.get(b).is_none() && cmd.node.is_none() {
                        return Ok(json!({ "brokers": [] }));
                    }
                }
                let (pause, n) = (cmd.command == Verb::Pause, cmd.prefetch.unwrap_or(1));
                let changed = controls.set(cmd.broker.as_deref(), |c| match cmd.command {
                    Verb::Prefetch => c.prefetch = n,
                    _ => c.paused = pause,
                })?;
                if cmd.command == Verb::Resume && cmd.broker.is_none() {
                    self.draining.store(false, Ordering::Relaxed);
                }
                tracing::info!(brokers = ?changed, "admin: {}", cmd.command.as_str());
                Ok(match cmd.command {
                    Verb::Prefetch => json!({ "brokers": changed, "prefetch": n }),
                    _ => json!({ "brokers": changed }),
                })
            }
            Verb::Drain | Verb::Shutdown => {
                // Shutdown drains in the binary's own stop; this answers
                // first, then the node stops.
                if cmd.command == Verb::Shutdown {
                    return Ok(json!({ "stopping": true, "in_flight": self.in_flight() }));
                }
                self.draining.store(true, Ordering::Relaxed);
                controls.set(None, |c| c.paused = true)?;
                let end = tokio::time::Instant::now() + self.drain;
                while self.in_flight() > 0 && tokio::time::Instant::now() < end {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let left = self.in_flight();
                tracing::info!(
                    in_flight = left,
                    "admin: drained; consuming nothing until resume"
                );
                Ok(json!({ "drained": left == 0, "in_flight": left }))
            }
        }
    }

    fn in_flight(&self) -> i64 {
        self.brokers
            .iter()
            .map(|(b, _)| self.service.metrics.in_flight_now(b))
            .sum()
    }

    /// The `status` of this node.
    pub fn status(&self) -> Value {
        let totals = self.service.metrics.tally.totals();
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        let mut handled = 0;
        let brokers: Vec<Value> = self
            .brokers
            .iter()
            .map(|(name, instances)| {
                let c = self.service.controls.get(name);
                let t = totals.get(name).cloned().unwrap_or_default();
                handled += t.handled;
                for (code, n) in &t.errors {
                    *errors.entry(code.clone()).or_default() += n;
                }
                json!({
                    "name": name,
                    "instances": instances,
                    "prefetch": c.map(|c| c.prefetch),
                    "paused": c.is_some_and(|c| c.paused),
                    "in_flight": self.service.metrics.in_flight_now(name),
                    "handled": t.handled,
                    "errors": t.errors,
                })
            })
            .collect();
        let ready = self.service.readiness.report();
        let down = ready["down"].as_object().cloned().unwrap_or_default();
        let databases: BTreeMap<&String, String> = self
            .databases
            .iter()
            .map(|d| {
                let state = match down.get(&format!("database {d}")) {
                    Some(why) => format!("down: {}", why.as_str().unwrap_or("?")),
                    None => "up".to_string(),
                };
                (d, state)
            })
            .collect();
        let registry = self.registry.load();
        let state = if self.draining.load(Ordering::Relaxed) {
            "drained"
        } else if !self.service.readiness.is_serving() {
            "stopping"
        } else {
            "serving"
        };
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "state": state,
            "ready": ready["ready"],
            "uptime_s": (now_ms() - self.started_ms) / 1000,
            "templates": { "version": registry.version(), "count": registry.len() },
            "in_flight": self.in_flight(),
            "handled": handled,
            "errors": errors,
            "brokers": brokers,
            "databases": databases,
        })
    }

    /// Heartbeats every `admin.heartbeat_ms` and counter windows every
    /// `admin.graph_interval_ms`; a last heartbeat saying the node leaves.
    pub async fn run_beacon(self: Arc<Self>) {
        let mut beat = tokio::time::interval(Duration::from_millis(self.admin.heartbeat_ms));
        let window = Duration::from_millis(self.admin.graph_interval_ms);
        let mut graph = tokio::time::interval_at(tokio::time::Instant::now() + window, window);
        // After a stall, one tick, not a burst of them.
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        graph.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut window_start = tokio::time::Instant::now();
        let mut ch: Option<Channel> = None;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => {
                    if let Some(c) = &ch {
                        let _ = tokio::time::timeout(Duration::from_secs(1), self.send(c, SYSLOG, &self.heartbeat(false))).await;
                        let _ = c.close(200, "node stopping".into()).await;
                    }
                    return;
                }
                _ = beat.tick() => {
                    let hb = self.heartbeat(true);
                    self.send_on(&mut ch, SYSLOG, &hb).await;
                }
                _ = graph.tick() => {
                    let now = tokio::time::Instant::now();
                    let c = Counters {
                        node: self.node.clone(),
                        role: self.role.clone(),
                        ts_ms: now_ms(),
                        window_ms: (now - window_start).as_millis() as u64,
                        in_flight: self.in_flight(),
                        brokers: self.service.metrics.tally.take_window(),
                    };
                    window_start = now;
                    self.send_on(&mut ch, GRAPH, &c).await;
                }
            }
        }
    }

    fn heartbeat(&self, alive: bool) -> Heartbeat {
        Heartbeat {
            node: self.node.clone(),
            role: self.role.clone(),
            brokers: self.brokers.iter().map(|(b, _)| b.clone()).collect(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            templates: self.registry.load().version().to_string(),
            started_ms: self.started_ms,
            ts_ms: now_ms(),
            alive,
        }
    }

    /// Publishes on a channel opened on demand; a failure drops the
    /// channel (the next tick opens another) and is only logged: a
    /// heartbeat lost is a heartbeat late.
    async fn send_on<T: serde::Serialize>(&self, ch: &mut Option<Channel>, key: &str, body: &T) {
        if ch.as_ref().is_none_or(|c| !c.status().connected()) {
            *ch = match open(&self.link, &self.stop).await {
                Ok(Some(c)) => Some(c),
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "admin: no channel for {key}");
                    return;
                }
            };
        }
        if let Some(c) = ch.as_ref() {
            if let Err(e) = self.send(c, key, body).await {
                tracing::debug!(error = %e, "admin: {key} not sent");
                *ch = None;
            }
        }
    }

    async fn send<T: serde::Serialize>(
        &self,
        ch: &Channel,
        key: &str,
        body: &T,
    ) -> Result<(), lapin::Error> {
        let body = serde_json::to_vec(body).unwrap_or_default();
        ch.basic_publish(
            self.prefix.as_str().into(),
            key.into(),
            BasicPublishOptions::default(),
            &body,
            // RabbitMQ verifies it: the admin node takes heartbeats and
            // counters only from the nodes' accounts.
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_user_id(self.amqp_user.as_str().into()),
        )
        .await
        .map(|_| ())
    }
}
