//! The admin plane: one control surface over every node, over AMQP.
//!
//! - `beds admin …` ([`command`]) publishes a [`Command`] to
//!   `<prefix>.adminBrokerIn`, with the caller's AMQP `user_id` (which
//!   RabbitMQ verifies) and a reply address.
//! - The admin node ([`plane`], role with `admin = true`) checks the
//!   caller's role, forwards the command on `adminBrokerOut` (to every
//!   known node, or one), collects the answers, names the nodes that did
//!   not answer, replies, and logs an `admin` event. It also keeps the
//!   membership from the heartbeats on `adminSyslogBroker` and stores the
//!   counters from `adminGraphBroker` in MongoDB, and records each member's
//!   last heartbeat there too ([`roster`]) for the observer.
//! - Every node, of any role, runs an [`agent`] on its own channel and
//!   task (so a node whose dispatchers are saturated still answers): it
//!   executes forwarded commands and sends heartbeats and counters.

pub mod agent;
pub mod channel;
pub mod command;
pub mod plane;
pub mod roster;
pub mod topology;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::AdminRole;

/// What an operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verb {
    Status,
    Reload,
    Pause,
    Resume,
    Prefetch,
    Drain,
    Shutdown,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Status => "status",
            Verb::Reload => "reload",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::Prefetch => "prefetch",
            Verb::Drain => "drain",
            Verb::Shutdown => "shutdown",
        }
    }

    /// The least role that may run it: a viewer looks, an operator also
    /// pauses, resumes, drains and reloads, an admin does everything.
    pub fn needs(self) -> AdminRole {
        match self {
            Verb::Status => AdminRole::Viewer,
            Verb::Reload | Verb::Pause | Verb::Resume | Verb::Drain => AdminRole::Operator,
            Verb::Prefetch | Verb::Shutdown => AdminRole::Admin,
        }
    }
}

/// A command as `beds admin` sends it, and as the admin node forwards it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    pub command: Verb,
    /// One node by name; every known node when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `pause`, `resume`, `prefetch`: one broker; all of the node's when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    /// `prefetch`: the new value (1..=65535).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<u16>,
}

/// Header of a forwarded command: Unix milliseconds after which the admin
/// node no longer waits for the answer, so a node must not run it.
pub const DEADLINE_HEADER: &str = "x-beds-admin-deadline";

/// Largest command body accepted; a real one is under 200 bytes.
pub const MAX_COMMAND_BYTES: usize = 16 * 1024;

impl Command {
    /// Parses a command body, bounded in size before parsing.
    pub fn parse(body: &[u8]) -> Result<Command, String> {
        if body.len() > MAX_COMMAND_BYTES {
            return Err(format!(
                "not a command: {} bytes, more than the {MAX_COMMAND_BYTES} a command may have",
                body.len()
            ));
        }
        serde_json::from_slice(body).map_err(|e| format!("not a command: {e}"))
    }

    /// What is wrong with it before anything runs.
    pub fn problem(&self) -> Option<String> {
        match (self.command, self.prefetch) {
            (Verb::Prefetch, None | Some(0)) => Some("prefetch needs a value of 1 to 65535".into()),
            (Verb::Prefetch, _) => None,
            (_, Some(_)) => Some(format!("{} takes no prefetch", self.command.as_str())),
            _ => None,
        }
        .or_else(|| {
            (self.broker.is_some()
                && !matches!(self.command, Verb::Pause | Verb::Resume | Verb::Prefetch))
            .then(|| format!("{} takes no broker", self.command.as_str()))
        })
        .or_else(|| {
            let bad = |n: &Option<String>| {
                n.as_deref()
                    .is_some_and(|n| !crate::config::is_amqp_name(n))
            };
            (bad(&self.node) || bad(&self.broker)).then(|| {
                "node and broker names hold only letters, digits, '_' and '-' (at most 64)"
                    .to_string()
            })
        })
    }
}

/// One node's answer to a forwarded command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeAnswer {
    pub node: String,
    pub role: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the command returned (a status, a reload's outcome, …).
    #[serde(default)]
    pub result: Value,
}

/// The admin plane's answer to `beds admin`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlaneAnswer {
    /// False when the command was refused (role, malformed) or any node
    /// failed it or did not answer.
    pub ok: bool,
    pub command: String,
    /// Why the admin node refused the command (nothing was forwarded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The nodes the command went to (every known node, or the one named).
    pub asked: usize,
    pub answered: usize,
    /// Asked but silent: a killed or stuck node is news, not an empty list.
    pub missing: Vec<String>,
    pub nodes: Vec<NodeAnswer>,
}

/// What every node announces on `adminSyslogBroker`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node: String,
    pub role: String,
    pub brokers: Vec<String>,
    /// The binary's version.
    pub version: String,
    /// The template set version serving now.
    pub templates: String,
    pub started_ms: i64,
    pub ts_ms: i64,
    /// False when the node is stopping: it leaves the membership instead
    /// of turning up as missing.
    pub alive: bool,
}

/// What every node sends on `adminGraphBroker` each counter window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub node: String,
    pub role: String,
    pub ts_ms: i64,
    /// The window's length.
    pub window_ms: u64,
    pub in_flight: i64,
    pub brokers: Vec<crate::service::tally::WindowStats>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_strictly_and_say_what_is_wrong() {
        let c: Command =
            serde_json::from_str(r#"{"command":"prefetch","broker":"rBroker","prefetch":8}"#)
                .unwrap();
        assert_eq!(c.problem(), None);
        assert!(serde_json::from_str::<Command>(r#"{"command":"status","nodes":"x"}"#).is_err());
        assert!(serde_json::from_str::<Command>(r#"{"command":"explode"}"#).is_err());
        let huge = format!(
            r#"{{"command":"status","node":"{}"}}"#,
            "x".repeat(MAX_COMMAND_BYTES)
        );
        assert!(Command::parse(huge.as_bytes())
            .unwrap_err()
            .contains("16384"));
        assert!(Command::parse(b"\xff")
            .unwrap_err()
            .starts_with("not a command"));
        let no_value: Command = serde_json::from_str(r#"{"command":"prefetch"}"#).unwrap();
        assert!(no_value.problem().unwrap().contains("1 to 65535"));
        let stray: Command =
            serde_json::from_str(r#"{"command":"drain","broker":"rBroker"}"#).unwrap();
        assert!(stray.problem().unwrap().contains("drain takes no broker"));
        assert_eq!(Verb::Status.needs(), AdminRole::Viewer);
        assert_eq!(Verb::Pause.needs(), AdminRole::Operator);
        assert_eq!(Verb::Shutdown.needs(), AdminRole::Admin);
    }
}
