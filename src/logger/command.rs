//! `beds logs`: the event log from the command line, read straight from
//! MongoDB (it works while every BEDS node is down).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use mongodb::bson::Document;
use mongodb::Collection;

use super::query::{self, Filter};
use crate::cmdline::{load_quiet, parse_duration};
use crate::ipl::{EX_UNAVAILABLE, EX_USAGE};

#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(subcommand)]
    pub command: LogsCommand,
}

#[derive(Debug, Subcommand)]
pub enum LogsCommand {
    /// Recent events, newest last, one line each.
    Tail(TailArgs),
    /// The whole chain of an event (ancestors and descendants) as a tree.
    Chain {
        event_id: String,
        /// One JSON object: the root, the asked event and every event.
        #[arg(long)]
        json: bool,
    },
    /// One event, every field.
    Show { event_id: String },
}

#[derive(Debug, Args)]
pub struct TailArgs {
    #[arg(long)]
    pub template: Option<String>,
    #[arg(long)]
    pub op: Option<String>,
    /// ok or error.
    #[arg(long)]
    pub status: Option<String>,
    /// An error code, e.g. CONFLICT.
    #[arg(long)]
    pub code: Option<String>,
    #[arg(long)]
    pub node: Option<String>,
    /// Only events newer than this, e.g. 10m, 2h.
    #[arg(long, value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// How many events (the newest).
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
    /// Keep printing new events until interrupted.
    #[arg(long)]
    pub follow: bool,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(dir: &std::path::Path, args: LogsArgs) -> ExitCode {
    let config = match load_quiet(dir) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let coll = match super::open_collection(&config).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            eprintln!("beds logs: the event log is off (events.database = \"\" or no MongoDB entry named docs)");
            return ExitCode::from(EX_USAGE);
        }
        Err(e) => {
            eprintln!("beds logs: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let where_ = format!(
        "{}.{} (config: databases.{}, events.collection)",
        coll.namespace().db,
        coll.name(),
        config.event_database().unwrap_or_default()
    );
    let unreachable = |e: mongodb::error::Error| {
        eprintln!("beds logs: MongoDB does not answer for {where_}: {e}");
        ExitCode::from(EX_UNAVAILABLE)
    };
    // Every query is bounded: a server that accepts connections but does
    // not answer is reported, not waited on.
    let limit = match config
        .event_database()
        .and_then(|d| config.databases.get(d))
    {
        Some(crate::config::DatabaseConfig::Mongodb(c)) => Duration::from_millis(c.timeout_ms) * 4,
        _ => Duration::from_secs(20),
    };
    let late = || -> mongodb::error::Error {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {limit:?}"),
        )
        .into()
    };
    match args.command {
        LogsCommand::Tail(t) => tail(&coll, t, limit).await.unwrap_or_else(unreachable),
        LogsCommand::Show { event_id } => {
            match tokio::time::timeout(limit, query::show(&coll, &event_id))
                .await
                .unwrap_or_else(|_| Err(late()))
            {
                Ok(Some(d)) => {
                    let v = mongodb::bson::Bson::Document(d).into_relaxed_extjson();
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Ok(None) => unknown(&event_id),
                Err(e) => unreachable(e),
            }
        }
        LogsCommand::Chain { event_id, json } => {
            match tokio::time::timeout(limit, query::chain(&coll, &event_id))
                .await
                .unwrap_or_else(|_| Err(late()))
            {
                Ok(Some(c)) if json => {
                    let v =
                        serde_json::json!({"asked": c.asked, "root": c.root, "events": c.events});
                    println!("{v}");
                    ExitCode::SUCCESS
                }
                Ok(Some(c)) => {
                    for l in c.render() {
                        println!("{l}");
                    }
                    ExitCode::SUCCESS
                }
                Ok(None) => unknown(&event_id),
                Err(e) => unreachable(e),
            }
        }
    }
}

fn unknown(id: &str) -> ExitCode {
    eprintln!(
        "beds logs: no event {id} in the log (wrong id, or older than events.retention_days)"
    );
    ExitCode::from(1)
}

async fn tail(
    coll: &Collection<Document>,
    t: TailArgs,
    limit: Duration,
) -> Result<ExitCode, mongodb::error::Error> {
    let bounded = |f: &Filter, n: i64| {
        let f = f.clone();
        async move {
            tokio::time::timeout(limit, query::tail(coll, &f, n))
                .await
                .unwrap_or_else(|_| {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {limit:?}"),
                    )
                    .into())
                })
        }
    };
    if t.status
        .as_deref()
        .is_some_and(|s| s != "ok" && s != "error")
    {
        eprintln!("beds logs: --status is ok or error");
        return Ok(ExitCode::from(EX_USAGE));
    }
    if !(1..=100_000).contains(&t.limit) {
        eprintln!("beds logs: --limit is 1 to 100000");
        return Ok(ExitCode::from(EX_USAGE));
    }
    let mut f = Filter {
        template: t.template,
        op: t.op,
        status: t.status,
        code: t.code,
        node: t.node,
        since_ms: t
            .since
            .map(|d| super::now_ms() - d.as_millis().min(i64::MAX as u128) as i64),
        after: None,
    };
    let print = |e: &super::Event| {
        if t.json {
            println!("{}", serde_json::to_string(e).unwrap_or_default());
        } else {
            println!("{}", query::line(e));
        }
    };
    let events = bounded(&f, t.limit).await?;
    events.iter().for_each(print);
    if !t.follow {
        return Ok(ExitCode::SUCCESS);
    }
    let mut last = events.last().map(|e| (e.ts_ms, e.event_id.clone()));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        f.after = last
            .clone()
            .or(Some((f.since_ms.unwrap_or(0), String::new())));
        let new = bounded(&f, 10_000).await?;
        new.iter().for_each(print);
        if let Some(e) = new.last() {
            last = Some((e.ts_ms, e.event_id.clone()));
        }
    }
}
