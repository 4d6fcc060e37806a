//! The admin node's side of the admin plane: authorizes `beds admin`
//! commands, fans them out to the nodes and collects their answers, keeps
//! the membership from heartbeats, and stores counter windows in MongoDB.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use mongodb::bson::{doc, Document};
use mongodb::Collection;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::channel::{consume, forever, next, open};
use super::roster::Roster;
use super::topology::{self, OUT, SYSLOG};
use super::{Command, Counters, Heartbeat, NodeAnswer, PlaneAnswer, Verb, DEADLINE_HEADER};
use crate::broker::AmqpLink;
use crate::config::{AdminConfig, Config};
use crate::logger::{named, new_id, now_ms, ttl_index, Event, EventLog};

/// Who called, carried to the nodes for their logs.
pub const CALLER_HEADER: &str = "x-beds-admin-caller";

/// How long answers to a broadcast are still taken once every awaited node
/// answered.
const ANSWER_GRACE: Duration = Duration::from_millis(250);

/// A node the admin node has heard of.
#[derive(Debug, Clone)]
pub struct Member {
    pub heartbeat: Heartbeat,
    pub seen: Instant,
}

pub struct Plane {
    pub node: String,
    pub role: String,
    pub prefix: String,
    pub amqp_user: String,
    pub admin: AdminConfig,
    /// Added to the answer wait of `drain` (which waits for in-flight work).
    pub drain: Duration,
    pub link: Arc<AmqpLink>,
    pub events: EventLog,
    /// Where counter windows go (`None`: no event-log database).
    pub graphs: Option<Collection<Document>>,
    /// Where each member's last heartbeat is recorded (same database).
    pub roster: Option<Roster>,
    pub members: Mutex<BTreeMap<String, Member>>,
    pub stop: CancellationToken,
    /// This node's own shutdown: a `shutdown` that includes the admin node
    /// stops it only after the caller has its answer.
    pub shutdown: CancellationToken,
}

impl Plane {
    pub fn new(
        config: &Config,
        link: Arc<AmqpLink>,
        events: EventLog,
        log: Option<&Collection<Document>>,
        stop: CancellationToken,
        shutdown: CancellationToken,
    ) -> Plane {
        let sibling = |name: &str| {
            log.map(|c| {
                c.client()
                    .database(&c.namespace().db)
                    .collection::<Document>(name)
            })
        };
        let graphs = sibling(&config.admin.graph_collection);
        let roster = sibling(&config.admin.node_collection)
            .map(|c| Roster::new(c, config.admin.missing_after_ms));
        Plane {
            node: config.node.name.clone(),
            role: config.node.role.clone(),
            prefix: config.amqp.prefix.clone(),
            amqp_user: config.amqp.user.clone(),
            admin: config.admin.clone(),
            drain: Duration::from_millis(config.dispatch.drain_timeout_ms),
            link,
            events,
            graphs,
            roster,
            members: Mutex::default(),
            stop,
            shutdown,
        }
    }

    /// The counters' and node records' TTL indexes (the admin node owns
    /// the collections, as BEDS owns the event log's).
    pub async fn ensure_indexes(&self) -> Result<(), String> {
        let ttl = Duration::from_secs(u64::from(self.admin.graph_retention_days) * 86_400);
        if let Some(r) = &self.roster {
            r.ensure_indexes(ttl).await?;
        }
        let Some(c) = &self.graphs else { return Ok(()) };
        let models = vec![
            ttl_index("ts_ttl", doc! {"ts": 1}, ttl),
            named("node_ts", doc! {"node": 1, "ts": -1}),
        ];
        c.create_indexes(models)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Keeps the membership from every heartbeat.
    pub async fn run_membership(self: Arc<Self>) {
        forever("heartbeat queue", &self.stop, || self.membership()).await
    }

    async fn membership(&self) -> Result<(), lapin::Error> {
        let Some(ch) = open(&self.link, &self.stop).await? else {
            return Ok(());
        };
        topology::declare_shared(&ch, &self.prefix).await?;
        let q = topology::private(
            &ch,
            &self.prefix,
            &format!("{SYSLOG}.{}", self.node),
            &[SYSLOG.to_string()],
        )
        .await?;
        let mut c = consume(&ch, &q, true).await?;
        loop {
            let Some(d) = next(&self.stop, &mut c).await? else {
                return Ok(());
            };
            if !self.sent_by_node(&d.properties) {
                continue;
            }
            match serde_json::from_slice::<Heartbeat>(&d.data) {
                Ok(hb) => self.heard(hb),
                Err(e) => {
                    tracing::warn!(error = %e, "admin plane: a heartbeat that does not parse; ignored")
                }
            }
        }
    }

    /// Heartbeats and counters count only from the nodes' accounts
    /// (`admin.nodes`): anyone may publish to the exchange, and a forged
    /// member would make every command wait for it.
    fn sent_by_node(&self, props: &BasicProperties) -> bool {
        let user = props.user_id().as_ref().map(|u| u.to_string());
        let ok = user
            .as_deref()
            .is_some_and(|u| self.admin.is_node_user(u, &self.amqp_user));
        if !ok {
            tracing::warn!(
                user = user.as_deref().unwrap_or("(none)"),
                "admin plane: a heartbeat or counters not from a node's account; ignored"
            );
        }
        ok
    }

    /// Writes the members' records to MongoDB as heartbeats come in.
    pub async fn run_roster(self: Arc<Self>) {
        let Some(r) = &self.roster else {
            // No event-log database: nothing to record (returning would
            // count as a task death).
            self.stop.cancelled().await;
            return;
        };
        r.run(&self.stop).await;
        // Stopping: say so for this node too, or the observer would show the
        // admin node as missing after a clean stop.
        let own = self.members.lock().unwrap().get(&self.node).cloned();
        if let Some(mut m) = own {
            m.heartbeat.alive = false;
            r.record_now(&m.heartbeat, now_ms()).await;
        }
    }

    pub fn heard(&self, hb: Heartbeat) {
        if let Some(r) = &self.roster {
            r.heard(&hb, now_ms());
        }
        let mut m = self.members.lock().unwrap();
        if hb.alive {
            if !m.contains_key(&hb.node) {
                tracing::info!(node = %hb.node, role = %hb.role, "admin plane: node joined");
            }
            m.insert(
                hb.node.clone(),
                Member {
                    heartbeat: hb,
                    seen: Instant::now(),
                },
            );
        } else if m.remove(&hb.node).is_some() {
            tracing::info!(node = %hb.node, "admin plane: node left");
        }
    }

    /// Stores each counter window once (the queue is shared by admin nodes).
    pub async fn run_graphs(self: Arc<Self>) {
        forever("counter queue", &self.stop, || self.graphs()).await
    }

    async fn graphs(&self) -> Result<(), lapin::Error> {
        let Some(ch) = open(&self.link, &self.stop).await? else {
            return Ok(());
        };
        ch.basic_qos(64, BasicQosOptions::default()).await?;
        topology::declare_shared(&ch, &self.prefix).await?;
        let mut c = consume(&ch, &topology::graph_queue(&self.prefix), false).await?;
        loop {
            let Some(d) = next(&self.stop, &mut c).await? else {
                return Ok(());
            };
            let from_node = self.sent_by_node(&d.properties);
            let parsed = if from_node {
                serde_json::from_slice::<Counters>(&d.data).map_err(|e| e.to_string())
            } else {
                Err("not sent by a node's account".to_string())
            };
            let stored = match (parsed, &self.graphs) {
                (Err(e), _) => {
                    tracing::warn!(error = %e, "admin plane: counters that do not parse; dropped");
                    true
                }
                (Ok(_), None) => true,
                (Ok(c), Some(coll)) => match tokio::time::timeout(
                    Duration::from_secs(10),
                    coll.insert_one(counters_doc(&c)),
                )
                .await
                {
                    Ok(Ok(_)) => true,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "admin plane: counters not stored; kept in the queue");
                        false
                    }
                    Err(_) => {
                        tracing::warn!(
                            "admin plane: counters not stored within 10 s; kept in the queue"
                        );
                        false
                    }
                },
            };
            if stored {
                d.ack(BasicAckOptions::default()).await?;
            } else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                d.nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await?;
            }
        }
    }

    /// Answers `beds admin` commands.
    pub async fn run_commands(self: Arc<Self>) {
        let me = self.clone();
        forever("command queue", &self.stop, || me.clone().commands()).await
    }

    async fn commands(self: Arc<Self>) -> Result<(), lapin::Error> {
        let Some(ch) = open(&self.link, &self.stop).await? else {
            return Ok(());
        };
        ch.basic_qos(8, BasicQosOptions::default()).await?;
        topology::declare_shared(&ch, &self.prefix).await?;
        let mut c = consume(&ch, &topology::in_queue(&self.prefix), false).await?;
        let running = TaskTracker::new();
        let result = loop {
            let d = match next(&self.stop, &mut c).await {
                Ok(Some(d)) => d,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            // Side by side: a drain waiting on one node does not hold up a
            // status.
            let (me, ch) = (self.clone(), ch.clone());
            running.spawn(async move {
                let started = Instant::now();
                let caller = d.properties.user_id().as_ref().map(|u| u.to_string());
                let Some(user) = caller.as_deref() else {
                    // Nobody to hold to account, and a reply address of
                    // the sender's choosing: not answered.
                    tracing::warn!("admin plane: a command without user_id; ignored");
                    let _ = d.ack(BasicAckOptions::default()).await;
                    return;
                };
                let (answer, cmd) = me.handle(user, d.redelivered, &d.data).await;
                me.log(&answer, cmd.as_ref(), caller.as_deref(), started);
                topology::reply(&ch, &d.properties, &answer).await;
                let _ = d.ack(BasicAckOptions::default()).await;
                if answer
                    .nodes
                    .iter()
                    .any(|n| n.node == me.node && n.ok && n.result["stopping"] == true)
                {
                    tracing::warn!("admin: shutdown requested; draining and exiting");
                    me.shutdown.cancel();
                }
            });
        };
        running.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), running.wait()).await;
        result
    }

    /// Checks, forwards, collects.
    pub async fn handle(
        &self,
        user: &str,
        redelivered: bool,
        body: &[u8],
    ) -> (PlaneAnswer, Option<Command>) {
        let cmd = match admit(&self.admin, user, redelivered, body) {
            Ok(c) => c,
            Err((verb, why, cmd)) => return (refused(&verb, why), cmd),
        };
        let verb = cmd.command.as_str();
        let (known, live) = self.known();
        let (asked, awaited) = targets(&cmd, &known, &live);
        if asked.is_empty() {
            let why = format!(
                "no node is known yet: nodes announce themselves every {} ms on {SYSLOG}",
                self.admin.heartbeat_ms
            );
            return (refused(verb, why), Some(cmd));
        }
        let mut wait = Duration::from_millis(self.admin.answer_timeout_ms);
        if cmd.command == Verb::Drain {
            wait += self.drain;
        }
        // A shutdown that includes this node: the others are told one by
        // one (a broadcast would reach this node's own agent, which would
        // stop it before the caller has the answer), and this node stops
        // after answering.
        let stop_here = cmd.command == Verb::Shutdown && asked.contains(&self.node);
        let keys: Vec<String> = match (&cmd.node, stop_here) {
            (_, true) => awaited
                .iter()
                .filter(|n| **n != self.node)
                .map(|n| topology::node_key(n))
                .collect(),
            (Some(n), false) => vec![topology::node_key(n)],
            (None, false) => vec![OUT.to_string()],
        };
        match self.forward(&cmd, user, &keys, &awaited, wait).await {
            Ok(mut nodes) => {
                if stop_here {
                    nodes.push(NodeAnswer {
                        node: self.node.clone(),
                        role: self.role.clone(),
                        ok: true,
                        error: None,
                        result: serde_json::json!({ "stopping": true }),
                    });
                }
                (summarize(&cmd, &known, &asked, nodes), Some(cmd))
            }
            Err(e) => {
                let why = format!("forwarding to the nodes failed: {e}");
                (refused(verb, why), Some(cmd))
            }
        }
    }

    /// The members, and those of them heard within `missing_after_ms`;
    /// members silent for 40 times that are forgotten.
    fn known(&self) -> (Vec<String>, BTreeSet<String>) {
        let missing_after = Duration::from_millis(self.admin.missing_after_ms);
        let mut m = self.members.lock().unwrap();
        m.retain(|name, member| {
            let keep = member.seen.elapsed() < missing_after * 40;
            if !keep {
                tracing::info!(node = %name, "admin plane: node silent for long; forgotten");
            }
            keep
        });
        let live = m
            .iter()
            .filter(|(_, member)| member.seen.elapsed() < missing_after)
            .map(|(n, _)| n.clone())
            .collect();
        (m.keys().cloned().collect(), live)
    }

    /// Publishes `cmd` and gathers answers until every `awaited` node
    /// answered (then a short grace, for nodes not yet known) or `wait`
    /// ends.
    async fn forward(
        &self,
        cmd: &Command,
        caller: &str,
        keys: &[String],
        awaited: &BTreeSet<String>,
        wait: Duration,
    ) -> Result<Vec<NodeAnswer>, lapin::Error> {
        let awaited: BTreeSet<String> = awaited
            .iter()
            .filter(|n| **n != self.node || cmd.command != Verb::Shutdown)
            .cloned()
            .collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let Some(ch) = open(&self.link, &self.stop).await? else {
            return Ok(Vec::new());
        };
        let got = self.collect(&ch, cmd, caller, keys, &awaited, wait).await;
        // Closing the channel also removes the reply queue (auto-delete),
        // on every path.
        let _ = ch.close(200, "answers collected".into()).await;
        got
    }

    async fn collect(
        &self,
        ch: &Channel,
        cmd: &Command,
        caller: &str,
        keys: &[String],
        awaited: &BTreeSet<String>,
        wait: Duration,
    ) -> Result<Vec<NodeAnswer>, lapin::Error> {
        let (reply, mut answers) = topology::reply_queue(ch).await?;
        let id = new_id();
        let mut headers = FieldTable::default();
        headers.insert(CALLER_HEADER.into(), AMQPValue::LongString(caller.into()));
        // Past this a node does not run it: nobody waits for its answer.
        let deadline = now_ms() + wait.as_millis() as i64;
        headers.insert(DEADLINE_HEADER.into(), AMQPValue::LongLongInt(deadline));
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_reply_to(reply.as_str().into())
            .with_correlation_id(id.as_str().into())
            .with_user_id(self.amqp_user.as_str().into())
            .with_expiration(wait.as_millis().to_string().as_str().into())
            .with_headers(headers);
        let body = serde_json::to_vec(cmd).unwrap_or_default();
        for key in keys {
            ch.basic_publish(
                self.prefix.as_str().into(),
                key.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                props.clone(),
            )
            .await?;
        }
        let mut got: BTreeMap<String, NodeAnswer> = BTreeMap::new();
        let end = tokio::time::Instant::now() + wait;
        let mut until = end;
        loop {
            let d = tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                d = answers.next() => match d { Some(Ok(d)) => d, _ => break },
            };
            if d.properties.correlation_id().as_ref().map(|c| c.as_str()) != Some(id.as_str()) {
                continue;
            }
            if let Ok(a) = serde_json::from_slice::<NodeAnswer>(&d.data) {
                got.insert(a.node.clone(), a);
            }
            if until == end && awaited.iter().all(|n| got.contains_key(n)) {
                // A node that joined a moment ago (not yet known) answers
                // a broadcast too: a short grace keeps its answer.
                until = (tokio::time::Instant::now() + ANSWER_GRACE).min(end);
            }
        }
        Ok(got.into_values().collect())
    }

    /// The `admin` event: who ran what, and how it went.
    fn log(&self, a: &PlaneAnswer, cmd: Option<&Command>, caller: Option<&str>, started: Instant) {
        let target = cmd.map(|c| {
            let mut t = c.node.clone().unwrap_or_else(|| "all nodes".into());
            if let Some(b) = &c.broker {
                t = format!("{b} on {t}");
            }
            t
        });
        let message = match &a.error {
            Some(e) => e.clone(),
            None => format!(
                "{} {}: {}/{} nodes answered{}{}",
                a.command,
                target.unwrap_or_default(),
                a.answered,
                a.asked,
                if a.missing.is_empty() {
                    String::new()
                } else {
                    format!("; missing: {}", a.missing.join(", "))
                },
                a.nodes
                    .iter()
                    .filter(|n| !n.ok)
                    .map(|n| format!("; {} failed: {}", n.node, n.error.as_deref().unwrap_or("?")))
                    .collect::<String>(),
            ),
        };
        tracing::info!(user = caller.unwrap_or("-"), ok = a.ok, "admin: {message}");
        self.events.emit(Event {
            event_id: new_id(),
            kind: "admin".into(),
            ts_ms: now_ms(),
            broker: Some(topology::IN.into()),
            op: Some(a.command.clone()),
            status: if a.ok { "ok" } else { "error" }.into(),
            code: (!a.ok).then(|| {
                if a.asked == 0 {
                    "REFUSED"
                } else {
                    "INCOMPLETE"
                }
                .to_string()
            }),
            message: Some(message),
            elapsed_us: started.elapsed().as_micros() as u64,
            attempt: 1,
            user_id: caller.map(str::to_string),
            ..Default::default()
        });
    }
}

/// One counter window as stored: a BSON date for the TTL index.
fn counters_doc(c: &Counters) -> Document {
    let brokers: Vec<Document> = c
        .brokers
        .iter()
        .map(|b| {
            doc! {
                "broker": &b.broker,
                "requests": b.requests as i64,
                "errors": b.errors as i64,
                "p50_us": b.p50_us as i64,
                "p95_us": b.p95_us as i64,
                "p99_us": b.p99_us as i64,
                "max_us": b.max_us as i64,
            }
        })
        .collect();
    doc! {
        "node": &c.node,
        "role": &c.role,
        "ts": mongodb::bson::DateTime::from_millis(c.ts_ms),
        "window_ms": c.window_ms as i64,
        "in_flight": c.in_flight,
        "brokers": brokers,
    }
}

/// A refusal: nothing was forwarded.
fn refused(command: &str, why: String) -> PlaneAnswer {
    PlaneAnswer {
        ok: false,
        command: command.to_string(),
        error: Some(why),
        asked: 0,
        answered: 0,
        missing: Vec::new(),
        nodes: Vec::new(),
    }
}

/// The command, if `user` may run it now; else the verb, why not, and the
/// command when it parsed.
type Refusal = (String, String, Option<Command>);

fn admit(
    admin: &AdminConfig,
    user: &str,
    redelivered: bool,
    body: &[u8],
) -> Result<Command, Refusal> {
    let cmd = Command::parse(body).map_err(|e| ("?".to_string(), e, None))?;
    let verb = cmd.command.as_str().to_string();
    if let Some(p) = cmd.problem() {
        return Err((verb, p, Some(cmd)));
    }
    // An admin node stopped while this command was under way: it may have
    // run on some nodes. At most once: it is not run again.
    if redelivered {
        let why = "redelivered after an admin node stopped while running it; not run again (it may have reached some nodes): check with status and send it again if still wanted";
        return Err((verb, why.into(), Some(cmd)));
    }
    let role = admin.role_of(user);
    if role.is_none_or(|r| r < cmd.command.needs()) {
        let has = role.map_or("no admin role".to_string(), |r| {
            format!("role {}", r.as_str())
        });
        let why = format!(
            "user {user} ({has}) may not run {verb}: it needs role {} (config [admin])",
            cmd.command.needs().as_str()
        );
        return Err((verb, why, Some(cmd)));
    }
    Ok(cmd)
}

/// The nodes asked (every known one, or the one named) and those waited
/// for: the asked nodes still sending heartbeats, and a node named on
/// purpose. Silent ones are asked too, and named missing unless they
/// answer in time.
fn targets(
    cmd: &Command,
    known: &[String],
    live: &BTreeSet<String>,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let asked: BTreeSet<String> = match &cmd.node {
        Some(n) => [n.clone()].into(),
        None => known.iter().cloned().collect(),
    };
    let awaited = asked
        .iter()
        .filter(|n| cmd.node.is_some() || live.contains(*n))
        .cloned()
        .collect();
    (asked, awaited)
}

/// The answer to the caller from the nodes' answers: who was asked, who
/// answered, who is missing, and what went wrong overall.
fn summarize(
    cmd: &Command,
    known: &[String],
    asked: &BTreeSet<String>,
    nodes: Vec<NodeAnswer>,
) -> PlaneAnswer {
    let answered: BTreeSet<&String> = nodes.iter().map(|a| &a.node).collect();
    let missing: Vec<String> = asked
        .iter()
        .filter(|n| !answered.contains(n))
        .cloned()
        .collect();
    let untouched = nodes
        .iter()
        .all(|a| a.result["brokers"].as_array().is_some_and(|b| b.is_empty()));
    let error = match (&cmd.node, &cmd.broker) {
        (Some(n), _) if !missing.is_empty() && !known.contains(n) => Some(format!(
            "no node named {n} is known (known: {})",
            known.join(", ")
        )),
        (None, Some(b)) if !nodes.is_empty() && untouched => {
            Some(format!("no node that answered runs broker {b}"))
        }
        _ => None,
    };
    // A node that joined a moment ago answers a broadcast too.
    let late = answered.iter().filter(|n| !asked.contains(**n)).count();
    PlaneAnswer {
        ok: missing.is_empty() && error.is_none() && nodes.iter().all(|a| a.ok),
        command: cmd.command.as_str().to_string(),
        error,
        asked: asked.len() + late,
        answered: nodes.len(),
        missing,
        nodes,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn admin() -> AdminConfig {
        AdminConfig {
            viewers: vec!["vera".into()],
            operators: vec!["otto".into()],
            admins: vec!["ada".into()],
            ..Default::default()
        }
    }

    fn why(r: Result<Command, Refusal>) -> String {
        r.unwrap_err().1
    }

    #[test]
    fn admit_checks_the_body_then_redelivery_then_the_role() {
        let a = admin();
        assert!(why(admit(&a, "ada", false, b"{")).starts_with("not a command"));
        assert!(why(admit(&a, "ada", false, br#"{"command":"prefetch"}"#)).contains("1 to 65535"));
        assert!(why(admit(&a, "ada", true, br#"{"command":"status"}"#)).starts_with("redelivered"));
        let pause = br#"{"command":"pause","broker":"rBroker"}"#;
        assert_eq!(
            why(admit(&a, "vera", false, pause)),
            "user vera (role viewer) may not run pause: it needs role operator (config [admin])"
        );
        assert!(why(admit(&a, "mallory", false, br#"{"command":"status"}"#))
            .contains("(no admin role)"));
        assert!(why(admit(&a, "otto", false, br#"{"command":"shutdown"}"#))
            .contains("needs role admin"));
        assert_eq!(
            admit(&a, "otto", false, pause).unwrap().broker.as_deref(),
            Some("rBroker")
        );
        assert!(admit(&a, "vera", false, br#"{"command":"status"}"#).is_ok());
        assert!(admit(
            &a,
            "ada",
            false,
            br#"{"command":"shutdown","node":"app-1"}"#
        )
        .is_ok());
    }

    fn cmd(node: Option<&str>, broker: Option<&str>) -> Command {
        Command {
            command: if broker.is_some() {
                Verb::Pause
            } else {
                Verb::Status
            },
            node: node.map(str::to_string),
            broker: broker.map(str::to_string),
            prefetch: None,
        }
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_broadcast_waits_only_for_live_nodes_a_named_node_always() {
        let known = names(&["a", "b", "dead"]);
        let live: BTreeSet<String> = names(&["a", "b"]).into_iter().collect();
        let (asked, awaited) = targets(&cmd(None, None), &known, &live);
        assert_eq!((asked.len(), awaited.len()), (3, 2));
        let (asked, awaited) = targets(&cmd(Some("dead"), None), &known, &live);
        assert_eq!(
            (asked, awaited.clone()),
            (awaited, names(&["dead"]).into_iter().collect())
        );
    }

    fn answer(node: &str, ok: bool, result: serde_json::Value) -> NodeAnswer {
        NodeAnswer {
            node: node.into(),
            role: "appServer".into(),
            ok,
            error: None,
            result,
        }
    }

    #[test]
    fn the_summary_names_missing_unknown_and_useless_targets() {
        let known = names(&["a", "b", "dead"]);
        let all: BTreeSet<String> = known.iter().cloned().collect();
        // A silent node is named, and the whole is not ok.
        let s = summarize(
            &cmd(None, None),
            &known,
            &all,
            vec![answer("a", true, json!({})), answer("b", true, json!({}))],
        );
        assert_eq!(
            (s.ok, s.asked, s.answered, s.missing.clone()),
            (false, 3, 2, names(&["dead"]))
        );
        // A late joiner counts as asked and answered.
        let two: BTreeSet<String> = names(&["a", "b"]).into_iter().collect();
        let s = summarize(
            &cmd(None, None),
            &known,
            &two,
            vec![
                answer("a", true, json!({})),
                answer("b", true, json!({})),
                answer("new", true, json!({})),
            ],
        );
        assert_eq!((s.ok, s.asked, s.answered), (true, 3, 3));
        // A node nobody knows, named on purpose.
        let ghost: BTreeSet<String> = names(&["ghost"]).into_iter().collect();
        let s = summarize(&cmd(Some("ghost"), None), &known, &ghost, vec![]);
        assert_eq!(
            s.error.as_deref(),
            Some("no node named ghost is known (known: a, b, dead)")
        );
        // A broker no node runs.
        let s = summarize(
            &cmd(None, Some("xBroker")),
            &known,
            &two,
            vec![
                answer("a", true, json!({"brokers": []})),
                answer("b", true, json!({"brokers": []})),
            ],
        );
        assert_eq!(
            (s.ok, s.error.as_deref()),
            (false, Some("no node that answered runs broker xBroker"))
        );
        // One node failing fails the whole.
        let s = summarize(
            &cmd(None, Some("rBroker")),
            &known,
            &two,
            vec![
                answer("a", true, json!({"brokers": ["rBroker"]})),
                answer("b", false, json!(null)),
            ],
        );
        assert!(!s.ok && s.error.is_none());
    }
}
