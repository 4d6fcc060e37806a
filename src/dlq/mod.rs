//! `beds dlq`: inspect, replay and purge a broker's dead-letter queue
//! (`<prefix>.<broker>.dlq`), with the node's config for the connection and
//! the prefix. Safety rules (wiki/17): nothing is removed from the DLQ
//! before its replay is confirmed by RabbitMQ; reading never loses or
//! reorders a message ([`scan`]); purge needs `--yes`.

pub mod filter;
pub mod parked;
pub mod replay;
pub mod scan;

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use serde_json::{json, Value};

use crate::broker::publish_confirmed;
use crate::client::{connect_amqp, DIRECT_REPLY_TO};
use crate::cmdline::{load_quiet, parse_duration};
use crate::config::{Config, QueueType};
use crate::ipl::{EX_UNAVAILABLE, EX_USAGE};
use filter::{Filter, GroupBy};
use replay::{Answer, Fate, Identity};
use scan::{Scan, ScanError};

#[derive(Debug, Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Most messages one command reads from the DLQ (each is held in memory,
    /// unacked, until the command ends).
    #[arg(long, global = true, default_value_t = 10_000)]
    pub scan: usize,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List the parked messages, oldest first; nothing is removed.
    List {
        /// Broker name (a key of `[brokers]`), e.g. wBroker.
        broker: String,
        /// Count per group instead of one line per message.
        #[arg(long, value_enum)]
        group_by: Option<GroupBy>,
        /// key=value (code, template, op, message_id, node, event_id; `*`
        /// matches any text); repeat to combine.
        #[arg(long = "filter")]
        filters: Vec<String>,
    },
    /// Show one message in full: properties, headers, body.
    Show {
        /// Broker name (a key of `[brokers]`), e.g. wBroker.
        broker: String,
        /// Its position, as `list` numbers it (1 = oldest).
        n: usize,
    },
    /// Republish parked messages to the broker's work queue; each leaves the
    /// DLQ only once RabbitMQ confirmed its copy.
    Replay {
        /// Broker name (a key of `[brokers]`), e.g. wBroker.
        broker: String,
        /// key=value, as for `list`.
        #[arg(long = "filter")]
        filters: Vec<String>,
        /// Show what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Replay at most this many (the oldest selected).
        #[arg(long)]
        limit: Option<usize>,
        /// How long to wait for the node's answers (the report says what
        /// each replay did).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        wait: Duration,
        /// Publish without a reply address: any failure parks the copy
        /// again (as a fire-and-forget request), but the report cannot say
        /// how it went.
        #[arg(long, conflicts_with = "wait")]
        no_wait: bool,
    },
    /// Remove parked messages for good.
    Purge {
        /// Broker name (a key of `[brokers]`), e.g. wBroker.
        broker: String,
        /// key=value, as for `list`; none: every message.
        #[arg(long = "filter")]
        filters: Vec<String>,
        /// Confirm the removal (without it nothing happens, exit 64).
        #[arg(long)]
        yes: bool,
    },
}

/// A failed command: its exit code and what to print.
struct Fail(u8, String);

type Outcome = Result<ExitCode, Fail>;

pub async fn run(dir: &std::path::Path, args: DlqArgs) -> ExitCode {
    let config = match load_quiet(dir) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match dispatch(&config, args).await {
        Ok(code) => code,
        Err(Fail(code, msg)) => {
            eprintln!("beds dlq: {msg}");
            ExitCode::from(code)
        }
    }
}

async fn dispatch(config: &Config, args: DlqArgs) -> Outcome {
    let (json, max) = (args.json, args.scan.max(1));
    match args.command {
        DlqCommand::List {
            broker,
            group_by,
            filters,
        } => {
            let filters = parse_filters(&filters)?;
            let link = Link::open(config, &broker).await?;
            let scan = link.scan(max).await?;
            let msgs: Vec<_> = scan
                .held
                .iter()
                .map(|h| h.summary.clone())
                .filter(|m| filter::selected(&filters, m))
                .collect();
            let total = scan.total;
            let warnings = link.give_back(scan).await?;
            print_list(&link.queue, total, &msgs, group_by, json, max);
            warn_all(&warnings);
            link.close().await;
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Show { broker, n } => {
            let link = Link::open(config, &broker).await?;
            let scan = link.scan(n.max(1)).await?;
            let shown = n
                .checked_sub(1)
                .and_then(|i| scan.held.get(i))
                .map(|h| show_json(&link.queue, scan.total, h));
            let total = scan.total;
            let warnings = link.give_back(scan).await?;
            warn_all(&warnings);
            link.close().await;
            match shown {
                None => Err(Fail(
                    EX_USAGE,
                    format!("no message {n} in {} (it holds {total})", link.queue),
                )),
                Some(v) => {
                    print_show(&v, json);
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        DlqCommand::Replay {
            broker,
            filters,
            dry_run,
            limit,
            wait,
            no_wait,
        } => {
            let filters = parse_filters(&filters)?;
            let link = Link::open(config, &broker).await?;
            let how = ReplayHow {
                filters,
                dry_run,
                limit,
                wait: (!no_wait).then_some(wait),
            };
            let code = replay_cmd(config, &link, &broker, how, json, max).await;
            link.close().await;
            code
        }
        DlqCommand::Purge {
            broker,
            filters,
            yes,
        } => {
            let filters = parse_filters(&filters)?;
            if !yes {
                return Err(Fail(
                    EX_USAGE,
                    "purge removes messages for good: add --yes (`beds dlq list` shows what --filter selects)".into(),
                ));
            }
            let link = Link::open(config, &broker).await?;
            let mut scan = link.scan(max).await?;
            let mut removed = Vec::new();
            let mut failed = None;
            for i in 0..scan.held.len() {
                if filter::selected(&filters, &scan.held[i].summary) {
                    if let Err(e) = scan.remove(i).await {
                        failed = Some(e.to_string());
                        break;
                    }
                    removed.push(scan.held[i].summary.n);
                }
            }
            let total = scan.total;
            let warnings = link.give_back(scan).await?;
            warn_all(&warnings);
            link.close().await;
            if json {
                println!(
                    "{}",
                    json!({"queue": link.queue, "total": total, "purged": removed.len(), "positions": removed, "kept": total - removed.len()})
                );
            } else {
                println!(
                    "purged {} of {total} message(s) from {}",
                    removed.len(),
                    link.queue
                );
            }
            match failed {
                Some(e) => Err(Fail(EX_UNAVAILABLE, format!("purge stopped: {e}"))),
                None => Ok(ExitCode::SUCCESS),
            }
        }
    }
}

fn parse_filters(raw: &[String]) -> Result<Vec<Filter>, Fail> {
    raw.iter()
        .map(|f| Filter::parse(f).map_err(|e| Fail(EX_USAGE, e)))
        .collect()
}

fn warn_all(warnings: &[String]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

/// The connection to one broker's DLQ: a channel in confirm mode.
struct Link {
    conn: lapin::Connection,
    ch: Channel,
    queue: String,
    quorum: bool,
    user: String,
}

impl Link {
    async fn open(config: &Config, broker: &str) -> Result<Link, Fail> {
        if !config.brokers.contains_key(broker) {
            return Err(Fail(
                EX_USAGE,
                format!(
                    "unknown broker {broker:?} (this config has: {})",
                    config
                        .brokers
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let tls = crate::broker::tls_config(&config.amqp.tls)
            .map_err(|e| Fail(EX_USAGE, e.to_string()))?;
        let conn = connect_amqp(&config.amqp.uri(), tls)
            .await
            .map_err(|e| Fail(EX_UNAVAILABLE, e.to_string()))?;
        let unavailable = |e: lapin::Error| Fail(EX_UNAVAILABLE, format!("RabbitMQ: {e}"));
        let ch = conn.create_channel().await.map_err(unavailable)?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(unavailable)?;
        let names = crate::broker::topology::Names {
            prefix: config.amqp.prefix.clone(),
        };
        Ok(Link {
            conn,
            ch,
            queue: names.dlq(broker),
            quorum: config.amqp.queue_type == QueueType::Quorum,
            user: config.amqp.user.clone(),
        })
    }

    async fn scan(&self, max: usize) -> Result<Scan, Fail> {
        Scan::take(&self.ch, &self.queue, max, self.quorum, &self.user)
            .await
            .map_err(|e| match e {
                ScanError::NoQueue(_) => Fail(EX_UNAVAILABLE, e.to_string()),
                ScanError::Amqp(m) => Fail(EX_UNAVAILABLE, m),
            })
    }

    async fn give_back(&self, scan: Scan) -> Result<Vec<String>, Fail> {
        scan.give_back().await.map_err(|e| {
            Fail(
                EX_UNAVAILABLE,
                format!("{e} (unsettled messages return to the DLQ when the connection closes)"),
            )
        })
    }

    async fn close(&self) {
        let _ = self.ch.close(200, "bye".into()).await;
        let _ = self.conn.close(200, "bye".into()).await;
    }
}

struct ReplayHow {
    filters: Vec<Filter>,
    dry_run: bool,
    limit: Option<usize>,
    /// How long to wait for answers; `None`: publish without `reply_to`.
    wait: Option<Duration>,
}

async fn replay_cmd(
    config: &Config,
    link: &Link,
    broker: &str,
    how: ReplayHow,
    json: bool,
    max: usize,
) -> Outcome {
    // Direct reply-to needs its consumer before the first publish.
    let mut replies = match (how.wait, how.dry_run) {
        (Some(_), false) => Some(
            link.ch
                .basic_consume(
                    DIRECT_REPLY_TO.into(),
                    "".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| Fail(EX_UNAVAILABLE, format!("RabbitMQ: {e}")))?,
        ),
        _ => None,
    };
    let who = Identity {
        conn_user: &config.amqp.user,
        retry_key: config.dispatch.retry_key.as_deref().map(str::as_bytes),
    };
    let mut scan = link.scan(max).await?;
    let mut fates: Vec<Fate> = Vec::with_capacity(scan.held.len());
    let mut notes: Vec<(usize, String)> = Vec::new();
    // Correlation id → (index into fates, publish time).
    let mut awaited: HashMap<String, (usize, i64)> = HashMap::new();
    let mut chosen = 0;
    for i in 0..scan.held.len() {
        let h = &scan.held[i];
        if !filter::selected(&how.filters, &h.summary) {
            fates.push(Fate::Skipped);
            continue;
        }
        if how.limit.is_some_and(|l| chosen >= l) {
            fates.push(Fate::OverLimit);
            continue;
        }
        chosen += 1;
        if how.dry_run {
            fates.push(Fate::WouldReplay);
            continue;
        }
        let cid = uuid::Uuid::new_v4().to_string();
        let reply = replies.as_ref().map(|_| (DIRECT_REPLY_TO, cid.as_str()));
        let (props, note) =
            replay::replay_props(&h.delivery.properties, &h.delivery.data, &who, reply);
        if let Some(n) = note {
            notes.push((h.summary.n, n));
        }
        let sent_ms = chrono::Utc::now().timestamp_millis();
        // Mandatory: a work queue that does not exist is an error, not a
        // confirmed loss.
        let published = publish_confirmed(
            &link.ch,
            &config.amqp.prefix,
            broker,
            &h.delivery.data,
            props,
            true,
        )
        .await;
        match published {
            Err(e) => fates.push(Fate::PublishFailed(e.to_string())),
            Ok(()) => match scan.remove(i).await {
                Ok(()) => {
                    if replies.is_some() {
                        awaited.insert(cid, (fates.len(), sent_ms));
                    }
                    let answer = if replies.is_some() {
                        Answer::None
                    } else {
                        Answer::NotAwaited
                    };
                    fates.push(Fate::Replayed(answer));
                }
                Err(e) => {
                    // The copy is on its way and the original stays: the
                    // DLQ holds it once more than it should, never less.
                    fates.push(Fate::PublishFailed(format!(
                        "republished, but removing it from the DLQ failed ({e}); it is still there"
                    )));
                }
            },
        }
        if matches!(fates.last(), Some(Fate::PublishFailed(_))) && !link.ch.status().connected() {
            // A refused publish can close the channel; the rest stay.
            for _ in i + 1..scan.held.len() {
                fates.push(Fate::PublishFailed(
                    "not attempted: the channel closed; still in the DLQ".into(),
                ));
            }
            break;
        }
    }
    let summaries: Vec<_> = scan.held.iter().map(|h| h.summary.clone()).collect();
    let total = scan.total;
    let warnings = if link.ch.status().connected() {
        link.give_back(scan).await?
    } else {
        vec!["the channel closed: unsettled messages returned to the DLQ".into()]
    };

    if let (Some(consumer), Some(wait)) = (replies.as_mut(), how.wait) {
        let deadline = tokio::time::Instant::now() + wait;
        while !awaited.is_empty() {
            let next = tokio::time::timeout_at(deadline, consumer.next()).await;
            let Ok(Some(Ok(d))) = next else { break };
            let cid = d
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string());
            if let Some((i, sent)) = cid.and_then(|c| awaited.remove(&c)) {
                fates[i] = Fate::Replayed(Answer::read(&d.data, sent));
            }
        }
    }

    print_replay(
        &link.queue,
        total,
        &summaries,
        &fates,
        &notes,
        json,
        how.dry_run,
    );
    warn_all(&warnings);
    let good = fates.iter().all(|f| match f {
        Fate::PublishFailed(_) => false,
        Fate::Replayed(a) => a.good(),
        _ => true,
    });
    Ok(if good {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `3s`, `5m`, `2h`, `4d`.
fn age(now_ms: i64, at_ms: Option<i64>) -> String {
    let Some(at) = at_ms else { return "-".into() };
    let s = (now_ms - at).max(0) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Prints rows as aligned columns; the last column is not padded.
fn table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = width[c]));
            }
        }
        println!("{}", line.trim_end());
    }
}

/// Cuts long cells (message ids can be anything) for the table.
fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

fn or_dash(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".into())
}

fn print_list(
    queue: &str,
    total: usize,
    msgs: &[parked::Parked],
    group_by: Option<GroupBy>,
    json: bool,
    max: usize,
) {
    let now = chrono::Utc::now().timestamp_millis();
    let unread = total.saturating_sub(max);
    match (group_by, json) {
        (Some(by), true) => {
            let groups: serde_json::Map<String, Value> = filter::group(by, msgs)
                .into_iter()
                .map(|(k, n)| (k, Value::from(n)))
                .collect();
            println!(
                "{}",
                json!({"queue": queue, "total": total, "unread": unread, "groups": groups})
            );
        }
        (None, true) => {
            let list: Vec<Value> = msgs.iter().map(|m| m.to_json(now)).collect();
            println!(
                "{}",
                json!({"queue": queue, "total": total, "unread": unread, "messages": list})
            );
        }
        (Some(by), false) => {
            let mut rows = vec![vec![format!("{by:?}").to_uppercase(), "COUNT".into()]];
            rows.extend(
                filter::group(by, msgs)
                    .into_iter()
                    .map(|(k, n)| vec![k, n.to_string()]),
            );
            println!("{queue}: {total} message(s), {} selected", msgs.len());
            table(&rows);
        }
        (None, false) => {
            println!("{queue}: {total} message(s), {} selected", msgs.len());
            if msgs.is_empty() {
                return;
            }
            let mut rows = vec![[
                "#",
                "AGE",
                "MESSAGE_ID",
                "REQUEST",
                "CODE",
                "NODE",
                "REPLAYED",
                "ERROR",
            ]
            .map(String::from)
            .to_vec()];
            for m in msgs {
                rows.push(vec![
                    m.n.to_string(),
                    age(now, m.parked_at_ms),
                    clip(&or_dash(&m.message_id), 40),
                    clip(&m.what(), 40),
                    or_dash(&m.code),
                    or_dash(&m.node),
                    m.replayed.to_string(),
                    clip(
                        &or_dash(&m.error.clone().or_else(|| m.body_problem.clone())),
                        80,
                    ),
                ]);
            }
            table(&rows);
        }
    }
    if unread > 0 {
        eprintln!("note: only the first {max} of {total} messages were read (--scan)");
    }
}

fn show_json(queue: &str, total: usize, h: &scan::Held) -> Value {
    let p = &h.delivery.properties;
    let headers = p
        .headers()
        .as_ref()
        .map(parked::table_json)
        .unwrap_or_default();
    let body = match serde_json::from_slice::<Value>(&h.delivery.data) {
        Ok(v) => json!({"json": v}),
        Err(e) => json!({
            "text": String::from_utf8_lossy(&h.delivery.data),
            "problem": format!("not JSON: {e}"),
        }),
    };
    json!({
        "queue": queue,
        "n": h.summary.n,
        "total": total,
        "summary": h.summary.to_json(chrono::Utc::now().timestamp_millis()),
        "properties": parked::properties_json(p),
        "headers": headers,
        "body": body,
    })
}

fn print_show(v: &Value, json: bool) {
    if json {
        println!("{v}");
        return;
    }
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    println!(
        "message {} of {} in {}",
        v["n"],
        v["total"],
        v["queue"].as_str().unwrap_or("")
    );
    for section in ["properties", "headers"] {
        println!("{section}:");
        if let Some(m) = v[section].as_object() {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            for k in keys {
                let val = match &m[k] {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                println!("  {k}: {val}");
            }
        }
    }
    match v["body"].get("json") {
        Some(body) => println!("body (JSON):\n{}", pretty(body)),
        None => println!(
            "body ({}):\n{}",
            v["body"]["problem"].as_str().unwrap_or(""),
            v["body"]["text"].as_str().unwrap_or("")
        ),
    }
}

fn print_replay(
    queue: &str,
    total: usize,
    msgs: &[parked::Parked],
    fates: &[Fate],
    notes: &[(usize, String)],
    json: bool,
    dry_run: bool,
) {
    let count = |f: fn(&Fate) -> bool| fates.iter().filter(|x| f(x)).count();
    let replayed = count(|f| matches!(f, Fate::Replayed(_)));
    let failed = count(|f| matches!(f, Fate::PublishFailed(_)));
    let would = count(|f| matches!(f, Fate::WouldReplay));
    if json {
        let list: Vec<Value> = msgs
            .iter()
            .zip(fates)
            .map(|(m, f)| {
                let mut v = f.to_json();
                v["n"] = json!(m.n);
                v["message_id"] = json!(m.message_id);
                v["request"] = json!(m.what());
                v["note"] = json!(notes.iter().find(|(n, _)| *n == m.n).map(|(_, t)| t));
                v
            })
            .collect();
        println!(
            "{}",
            json!({"queue": queue, "total": total, "dry_run": dry_run, "replayed": replayed,
                   "would_replay": would, "publish_failed": failed, "messages": list})
        );
        return;
    }
    let mut rows = vec![["#", "MESSAGE_ID", "REQUEST", "WHAT HAPPENED"]
        .map(String::from)
        .to_vec()];
    for (m, f) in msgs.iter().zip(fates) {
        let mut what = f.describe();
        if let Some((_, n)) = notes.iter().find(|(n, _)| *n == m.n) {
            what.push_str(&format!(" ({n})"));
        }
        rows.push(vec![
            m.n.to_string(),
            clip(&or_dash(&m.message_id), 40),
            clip(&m.what(), 40),
            what,
        ]);
    }
    if dry_run {
        println!(
            "{queue}: {total} message(s); dry run: {would} would be replayed, nothing changed"
        );
    } else {
        println!(
            "{queue}: {total} message(s); {replayed} replayed, {failed} kept after a failed publish, {} kept",
            fates.len() - replayed
        );
    }
    if !msgs.is_empty() {
        table(&rows);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_clips() {
        assert_eq!(age(10_000, Some(4_000)), "6s");
        assert_eq!(age(0, None), "-");
        assert_eq!(age(3 * 3_600_000, Some(0)), "3h");
        assert_eq!(age(5 * 86_400_000, Some(0)), "5d");
        assert_eq!(age(0, Some(10_000)), "0s", "a clock ahead is not negative");
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("abc", 4), "abc");
    }
}
