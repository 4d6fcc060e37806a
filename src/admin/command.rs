//! `beds admin status|reload|pause|resume|prefetch|drain|shutdown`: sends
//! one command to the admin plane as the config's AMQP user (RabbitMQ
//! verifies the `user_id`; the admin node checks its role) and prints the
//! answer of every node, naming the ones that did not answer.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use futures::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::BasicProperties;
use lapin::Confirmation;
use serde_json::Value;

use super::{topology, Command, PlaneAnswer, Verb};
use crate::cmdline::{load_quiet, parse_duration};
use crate::config::Config;
use crate::ipl::{EX_UNAVAILABLE, EX_USAGE};

#[derive(Debug, Args)]
pub struct AdminArgs {
    #[command(subcommand)]
    pub command: AdminCommand,
    /// Only this node (by `node.name`); default: every known node.
    #[arg(long, global = true)]
    pub node: Option<String>,
    /// Print the admin plane's answer as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// How long to wait for the admin node's answer.
    #[arg(long, global = true, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Role, uptime, brokers, in flight, handled, errors, templates and
    /// databases of each node.
    Status,
    /// Reload the templates on every node (or one); a set that fails on a
    /// node is refused there and reported.
    Reload,
    /// Stop consuming a broker (all brokers without one); in-flight
    /// requests finish.
    Pause { broker: Option<String> },
    /// Consume again (and end a drain).
    Resume { broker: Option<String> },
    /// Change the prefetch (requests in flight per dispatcher).
    Prefetch {
        value: u16,
        #[arg(long)]
        broker: Option<String>,
    },
    /// Stop consuming everywhere, finish in-flight work, stay up.
    Drain,
    /// Drain, then exit.
    Shutdown,
}

impl AdminArgs {
    fn to_command(&self) -> Command {
        let (command, broker, prefetch) = match &self.command {
            AdminCommand::Status => (Verb::Status, None, None),
            AdminCommand::Reload => (Verb::Reload, None, None),
            AdminCommand::Pause { broker } => (Verb::Pause, broker.clone(), None),
            AdminCommand::Resume { broker } => (Verb::Resume, broker.clone(), None),
            AdminCommand::Prefetch { value, broker } => {
                (Verb::Prefetch, broker.clone(), Some(*value))
            }
            AdminCommand::Drain => (Verb::Drain, None, None),
            AdminCommand::Shutdown => (Verb::Shutdown, None, None),
        };
        Command {
            command,
            node: self.node.clone(),
            broker,
            prefetch,
        }
    }
}

pub async fn run(dir: &std::path::Path, args: AdminArgs) -> ExitCode {
    let config = match load_quiet(dir) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let cmd = args.to_command();
    if let Some(p) = cmd.problem() {
        eprintln!("beds admin: {p}");
        return ExitCode::from(EX_USAGE);
    }
    match send(&config, &cmd, args.timeout).await {
        Ok(answer) => {
            let text = if args.json {
                serde_json::to_string_pretty(&answer).unwrap_or_default() + "\n"
            } else {
                render(&answer)
            };
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
            if answer.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("beds admin: {e}");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}

/// Publishes `cmd` to `adminBrokerIn` and waits for the admin node.
pub async fn send(
    config: &Config,
    cmd: &Command,
    timeout: Duration,
) -> Result<PlaneAnswer, String> {
    let tls = crate::broker::tls_config(&config.amqp.tls).map_err(|e| e.to_string())?;
    let conn = crate::client::connect_amqp(&config.amqp.uri(), tls)
        .await
        .map_err(|e| e.to_string())?;
    let result = async {
        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        let (reply, mut answers) = topology::reply_queue(&ch)
            .await
            .map_err(|e| e.to_string())?;
        let id = uuid::Uuid::new_v4().to_string();
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_reply_to(reply.as_str().into())
            .with_correlation_id(id.as_str().into())
            .with_user_id(config.amqp.user.as_str().into())
            // Never run late: RabbitMQ drops it once this caller gave up.
            .with_expiration(timeout.as_millis().to_string().as_str().into());
        let body = serde_json::to_vec(cmd).map_err(|e| e.to_string())?;
        let confirm = ch
            .basic_publish(
                config.amqp.prefix.as_str().into(),
                topology::IN.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                props,
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        if let Confirmation::Ack(Some(_)) = confirm {
            return Err(format!(
                "no queue {} to take the command: no node has run on prefix {} yet",
                topology::in_queue(&config.amqp.prefix),
                config.amqp.prefix
            ));
        }
        let answer = tokio::time::timeout(timeout, async {
            while let Some(Ok(d)) = answers.next().await {
                if d.properties.correlation_id().as_ref().map(|c| c.as_str()) == Some(id.as_str()) {
                    return serde_json::from_slice::<PlaneAnswer>(&d.data)
                        .map_err(|e| format!("the admin node's answer does not parse: {e}"));
                }
            }
            Err("the connection closed before the answer".to_string())
        })
        .await
        .map_err(|_| {
            format!(
                "no answer within {timeout:?}: is a node of the admin role running on prefix {}?",
                config.amqp.prefix
            )
        })?;
        answer
    }
    .await;
    let _ = conn.close(200, "done".into()).await;
    result
}

/// A readable answer: a line per node, the missing named.
pub fn render(a: &PlaneAnswer) -> String {
    let mut out = String::new();
    if let Some(e) = &a.error {
        out.push_str(&format!("{}: refused: {e}\n", a.command));
        if a.nodes.is_empty() {
            return out;
        }
    }
    out.push_str(&format!(
        "{}: {}/{} nodes answered",
        a.command, a.answered, a.asked
    ));
    if !a.missing.is_empty() {
        out.push_str(&format!("; MISSING: {}", a.missing.join(", ")));
    }
    out.push('\n');
    for n in &a.nodes {
        if !n.ok {
            out.push_str(&format!(
                "  {:<20} {:<10} FAILED: {}\n",
                n.node,
                n.role,
                n.error.as_deref().unwrap_or("?")
            ));
            continue;
        }
        if a.command == "status" {
            out.push_str(&status_lines(&n.node, &n.role, &n.result));
        } else {
            out.push_str(&format!(
                "  {:<20} {:<10} ok {}\n",
                n.node,
                n.role,
                compact(&n.result)
            ));
        }
    }
    for m in &a.missing {
        out.push_str(&format!("  {m:<20} {:<10} MISSING: no answer\n", "?"));
    }
    out
}

fn compact(v: &Value) -> String {
    match v {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| format!("{k}={}", compact(v)))
            .collect::<Vec<_>>()
            .join(" "),
        Value::Array(a) => a.iter().map(compact).collect::<Vec<_>>().join(","),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn status_lines(node: &str, role: &str, s: &Value) -> String {
    let mut out = format!(
        "  {node:<20} {role:<10} {} up {}s  templates {} ({})  in flight {}  handled {}  errors {}\n",
        s["state"].as_str().unwrap_or("?"),
        s["uptime_s"],
        s["templates"]["version"].as_str().unwrap_or("?"),
        s["templates"]["count"],
        s["in_flight"],
        s["handled"],
        match compact(&s["errors"]) {
            e if e.is_empty() => "none".to_string(),
            e => e.replace('=', ":"),
        },
    );
    for b in s["brokers"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "      {:<12} x{} prefetch {:<5} {:<7} in flight {:<4} handled {}\n",
            b["name"].as_str().unwrap_or("?"),
            b["instances"],
            b["prefetch"],
            if b["paused"].as_bool() == Some(true) {
                "PAUSED"
            } else {
                "running"
            },
            b["in_flight"],
            b["handled"],
        ));
    }
    let dbs: Vec<String> = s["databases"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(d, st)| format!("{d} {}", st.as_str().unwrap_or("?")))
        .collect();
    if !dbs.is_empty() {
        out.push_str(&format!("      databases: {}\n", dbs.join(", ")));
    }
    out
}
