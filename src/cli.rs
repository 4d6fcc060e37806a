//! The command line: `beds run` (default), `beds check`, `beds call`,
//! `beds bench`, `beds logs`, `beds dlq`, `beds reload`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serde_json::{Map, Value};

use crate::client::{CallOptions, Client};
use crate::cmdline::{load_config, load_quiet, parse_duration};
use crate::ipl::{self, Node, EX_SOFTWARE, EX_UNAVAILABLE, EX_USAGE};
use crate::registry::{FieldType, Registry};

/// `beds call` could not get a reply in time (sysexits EX_TEMPFAIL).
const EX_TEMPFAIL: u8 = 75;

#[derive(Debug, Parser)]
#[command(
    name = "beds",
    version,
    about = "BEDS: the AMQP door between applications and their databases"
)]
pub struct Cli {
    /// Folder holding beds.toml and env_<BEDS_ENV>.toml.
    #[arg(long, env = "BEDS_CONFIG_DIR", default_value = "config", global = true)]
    pub config_dir: PathBuf,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node in the foreground until SIGTERM/SIGINT (the default).
    Run,
    /// Validate config and templates without starting; exit 0 or 64.
    Check {
        /// Also check that services answer and procedures exist.
        #[arg(long)]
        online: bool,
    },
    /// Send one request and print the reply.
    Call(CallArgs),
    /// Load a node (or a reference) and report throughput, latency, cost.
    Bench(crate::bench::BenchArgs),
    /// Read the event log: tail, chain, show.
    Logs(crate::logger::command::LogsArgs),
    /// Dead letters: list, show, replay, purge a broker's DLQ.
    Dlq(crate::dlq::DlqArgs),
    /// Operate every node over the admin plane: status, reload, pause,
    /// resume, prefetch, drain, shutdown.
    Admin(crate::admin::command::AdminArgs),
    /// Reload the running node's templates (and logging level) through
    /// its HTTP port; prints what was refused, if anything.
    Reload {
        /// The node's `host:port`; default: `http.listen` of the config.
        #[arg(long)]
        node: Option<String>,
    },
    /// A `beds bench` reference server (started by the bench itself).
    #[command(hide = true)]
    BenchServe(crate::bench::reference::ServeArgs),
}

#[derive(Debug, Args)]
pub struct CallArgs {
    /// Template name, e.g. usr.
    pub template: String,
    /// Operation name, e.g. read.
    pub op: String,
    /// field=value pairs, converted by the template's field types.
    pub fields: Vec<String>,
    /// The whole `data` object as JSON (merged under field=value pairs).
    #[arg(long)]
    pub json: Option<String>,
    /// How long to wait for the reply, e.g. 5s, 500ms.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Broker to send to; default: the one serving the op's access kind.
    #[arg(long)]
    pub broker: Option<String>,
    /// message_id, for write dedup.
    #[arg(long)]
    pub message_id: Option<String>,
    /// The event that caused this request (an earlier reply's event_id):
    /// the event log chains them.
    #[arg(long)]
    pub parent: Option<String>,
}

pub fn run(cli: Cli) -> ExitCode {
    // Worker threads keep the deep default stack of main.rs: dropping a
    // delivery frees its header tables recursively on them.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("beds: cannot start the runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    rt.block_on(async move {
        let code = match cli.command.unwrap_or(Command::Run) {
            Command::Run => run_node(&cli.config_dir).await,
            Command::Check { online } => check(&cli.config_dir, online).await,
            Command::Call(args) => call(&cli.config_dir, args).await,
            Command::Bench(args) => crate::bench::run(&cli.config_dir, args).await,
            Command::Logs(args) => crate::logger::command::run(&cli.config_dir, args).await,
            Command::Dlq(args) => crate::dlq::run(&cli.config_dir, args).await,
            Command::Admin(args) => crate::admin::command::run(&cli.config_dir, args).await,
            Command::Reload { node } => reload(&cli.config_dir, node).await,
            Command::BenchServe(args) => {
                let config = match load_quiet(&cli.config_dir) {
                    Ok(c) => c,
                    Err(code) => return code,
                };
                match crate::bench::reference::serve(&config, args).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("beds bench-serve: {e}");
                        ExitCode::from(EX_UNAVAILABLE)
                    }
                }
            }
        };
        // A failed IPL drops its AMQP link open: its close must finish
        // while the runtime still runs.
        crate::broker::closing_links(Duration::from_secs(5)).await;
        code
    })
}

async fn run_node(dir: &std::path::Path) -> ExitCode {
    let t = Instant::now();
    let config = match load_config(dir) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::logging::init(&config.logging);
    tracing::info!(
        "IPL 1/9 load config: ok ({} ms; {}/beds.toml + env_{}.toml, role {})",
        t.elapsed().as_millis(),
        dir.display(),
        config.env.as_str(),
        config.node.role
    );
    tracing::info!(
        "IPL 2/9 logging: ok (level {}, journald {})",
        config.logging.level,
        config.logging.journald
    );
    // Listening before IPL: a signal during startup is not lost.
    let mut signals = match ipl::Signals::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("beds: cannot listen for signals: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    let node = match Node::start(&config, dir).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("beds: IPL failed: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    crate::service::notify::ready(&node.ready_line(&config));
    // SIGHUP reloads the templates (in its own task, so a stop signal is
    // seen meanwhile); the first SIGTERM/SIGINT, or an admin `shutdown`,
    // drains.
    loop {
        tokio::select! {
            sig = signals.recv() => {
                if sig != ipl::Sig::Reload {
                    break;
                }
                node.reload_in_background();
            }
            _ = node.shutdown.cancelled() => break,
        }
    }
    let second_stop = async {
        while signals.recv().await == ipl::Sig::Reload {
            tracing::warn!("SIGHUP ignored: the node is draining");
        }
    };
    tokio::select! {
        _ = node.stop() => ExitCode::SUCCESS,
        _ = second_stop => {
            // Unacknowledged requests return to their queues: nothing is lost.
            tracing::warn!("second signal: exiting without finishing the drain");
            ExitCode::from(1)
        }
    }
}

async fn check(dir: &std::path::Path, online: bool) -> ExitCode {
    let config = match load_quiet(dir) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let ipl::Checked { problems, warnings } = ipl::check(&config, online).await;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    if problems.is_empty() {
        println!(
            "ok: config and templates valid{} (env {}, role {})",
            if online {
                ", services answer, procedures exist"
            } else {
                ""
            },
            config.env.as_str(),
            config.node.role
        );
        ExitCode::SUCCESS
    } else {
        eprintln!("{} problem(s):", problems.len());
        for p in &problems {
            eprintln!("  - {p}");
        }
        ExitCode::from(EX_USAGE)
    }
}

async fn call(dir: &std::path::Path, args: CallArgs) -> ExitCode {
    let config = match load_quiet(dir) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // The local templates tell the op's access kind and field types; a
    // template unknown here is still sent, so the node's answer is shown.
    let registry = Registry::load_dir(&config.node.templates, &config).ok();
    let template = registry.as_ref().and_then(|r| r.get(&args.template).ok());
    let op = template.and_then(|t| t.op(&args.op).ok());

    let mut data = match &args.json {
        None => Map::new(),
        Some(j) => match serde_json::from_str::<Value>(j) {
            Ok(Value::Object(m)) => m,
            _ => {
                eprintln!("beds call: --json must be a JSON object");
                return ExitCode::from(EX_USAGE);
            }
        },
    };
    for kv in &args.fields {
        let Some((k, v)) = kv.split_once('=') else {
            eprintln!("beds call: expected field=value, got {kv:?}");
            return ExitCode::from(EX_USAGE);
        };
        let ty = template.and_then(|t| {
            t.ops
                .values()
                .flat_map(|o| o.params.iter())
                .find(|(n, _)| n == k)
                .map(|(_, f)| f.ty)
        });
        data.insert(k.to_string(), typed_value(v, ty));
    }

    let broker = match (&args.broker, op) {
        (Some(b), _) => b.clone(),
        (None, Some(op)) => match config.broker_for(&args.template, op.access) {
            Some(b) => b,
            None => {
                eprintln!(
                    "beds call: no broker serves {} ops of template {}; pass --broker",
                    op.access.as_str(),
                    args.template
                );
                return ExitCode::from(EX_USAGE);
            }
        },
        (None, None) => {
            eprintln!(
                "beds call: {}.{} is not in the local templates, so its broker is unknown; pass --broker",
                args.template, args.op
            );
            return ExitCode::from(EX_USAGE);
        }
    };

    let tls = match crate::broker::tls_config(&config.amqp.tls) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("beds call: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let client = match Client::connect_tls(&config.amqp.uri(), &config.amqp.prefix, true, tls).await
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("beds call: {e}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    let payload = serde_json::json!({ "template": args.template, "op": args.op, "data": data });
    let opts = CallOptions {
        timeout: args.timeout,
        message_id: args.message_id.clone(),
        parent_event_id: args.parent.clone(),
        ..Default::default()
    };
    let result = client.call(&broker, &payload, &opts).await;
    client.close().await;
    match result {
        Ok(reply) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&reply).unwrap_or_default()
            );
            if reply.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("beds call: {e} (broker {broker})");
            ExitCode::from(EX_TEMPFAIL)
        }
    }
}

/// Converts a command-line value by the field's type; unknown fields are
/// sent as JSON if they parse, else as strings.
fn typed_value(v: &str, ty: Option<FieldType>) -> Value {
    let as_json = || serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.into()));
    match ty {
        Some(FieldType::String) | Some(FieldType::Datetime) | Some(FieldType::ObjectId) => {
            Value::String(v.into())
        }
        Some(FieldType::Int) => v
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(v.into())),
        Some(FieldType::Float) => v
            .parse::<f64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(v.into())),
        Some(FieldType::Bool) | Some(FieldType::Json) | None => as_json(),
    }
}

/// Where this machine reaches a node listening on `listen`: a node on
/// every address (`0.0.0.0`, `[::]`) is asked through loopback, since
/// reload is accepted from loopback only. (A node on one LAN address
/// answers 403: send it SIGHUP instead.)
fn local(listen: &str) -> String {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() && a.is_ipv6() => format!("[::1]:{}", a.port()),
        Ok(a) if a.ip().is_unspecified() => format!("127.0.0.1:{}", a.port()),
        _ => listen.to_string(),
    }
}

/// `beds reload`: `POST /reload` on the node's HTTP port (loopback only),
/// which answers once the new set serves or was refused.
async fn reload(dir: &std::path::Path, node: Option<String>) -> ExitCode {
    let addr = match node {
        Some(a) => a,
        None => match load_quiet(dir) {
            Ok(c) if !c.http.listen.is_empty() => local(&c.http.listen),
            Ok(_) => {
                eprintln!("beds reload: http.listen is \"\" in this config: send the node SIGHUP instead (systemctl reload beds@NODE)");
                return ExitCode::from(EX_USAGE);
            }
            Err(code) => return code,
        },
    };
    match crate::service::http::post_reload(&addr, Duration::from_secs(60)).await {
        Ok((status, body)) => {
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::String(body.clone()));
            match (status, v.get("ok").and_then(Value::as_bool)) {
                (200, Some(true)) => {
                    println!(
                        "reloaded: {} templates serving; {}",
                        v["templates"],
                        v["logging"].as_str().unwrap_or("")
                    );
                    ExitCode::SUCCESS
                }
                (_, Some(false)) => {
                    eprintln!(
                        "reload refused; the previous {} templates keep serving:",
                        v["templates"]
                    );
                    for p in v["problems"].as_array().into_iter().flatten() {
                        eprintln!("  - {}", p.as_str().unwrap_or_default());
                    }
                    ExitCode::from(1)
                }
                _ => {
                    eprintln!("beds reload: {addr} answered {status}: {}", body.trim());
                    ExitCode::from(EX_UNAVAILABLE)
                }
            }
        }
        Err(e) => {
            eprintln!("beds reload: no node answers on {addr}: {e}");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("5h").is_err());
    }

    #[test]
    fn values_follow_field_types() {
        assert_eq!(typed_value("42", Some(FieldType::Int)), Value::from(42));
        assert_eq!(
            typed_value("42", Some(FieldType::String)),
            Value::from("42")
        );
        assert_eq!(typed_value("true", None), Value::from(true));
        assert_eq!(typed_value("Ada", None), Value::from("Ada"));
    }
}
