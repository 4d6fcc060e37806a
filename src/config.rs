//! Node configuration: layered TOML (`beds.toml`, then `env_{BEDS_ENV}.toml`,
//! then `BEDS__…` environment variables), deserialized into typed structs that
//! reject unknown keys, then cross-checked.
//!
//! Loading never stops at the first cross-check problem: `beds check` shows an
//! operator every problem at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Deployment environments BEDS knows. In `prod` every IPL failure is fatal;
/// in `dev` a missing optional service is only a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Env {
    Dev,
    Qa,
    Prod,
}

impl Env {
    pub fn parse(s: &str) -> Result<Env, ConfigError> {
        match s {
            "dev" => Ok(Env::Dev),
            "qa" => Ok(Env::Qa),
            "prod" => Ok(Env::Prod),
            other => Err(ConfigError::BadEnv(other.to_string())),
        }
    }

    /// `BEDS_ENV`, default `dev`.
    pub fn from_env() -> Result<Env, ConfigError> {
        Env::parse(&std::env::var("BEDS_ENV").unwrap_or_else(|_| "dev".into()))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Env::Dev => "dev",
            Env::Qa => "qa",
            Env::Prod => "prod",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("BEDS_ENV must be dev, qa or prod, got {0:?}")]
    BadEnv(String),
    #[error("config file {0} not found")]
    Missing(PathBuf),
    #[error("{0}")]
    Parse(String),
    #[error("config has {} problem(s):\n  - {}", .0.len(), .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// The whole node configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Which role this node plays and where its templates live.
    pub node: NodeConfig,
    /// The RabbitMQ connection and topology naming.
    pub amqp: AmqpConfig,
    /// Per-request behaviour shared by every dispatcher.
    #[serde(default)]
    pub dispatch: DispatchConfig,
    /// Role name → the brokers a node of that role runs.
    pub roles: BTreeMap<String, RoleConfig>,
    /// Broker name → how many dispatchers and which access kinds it serves.
    pub brokers: BTreeMap<String, BrokerConfig>,
    /// Database entry name (what templates put in `database`) → connection.
    #[serde(default, deserialize_with = "de_databases")]
    pub databases: BTreeMap<String, DatabaseConfig>,
    #[serde(default)]
    pub logging: LoggingConfig,
    /// The event log in MongoDB (CONTRACT §7).
    #[serde(default)]
    pub events: EventsConfig,
    /// Health, readiness, metrics and reload over HTTP, apart from the
    /// message path.
    #[serde(default)]
    pub http: HttpConfig,
    /// The admin plane: who may run which command, heartbeats, counters.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Which environment was loaded; set by the loader, not by a file.
    #[serde(skip, default = "default_env")]
    pub env: Env,
}

fn default_env() -> Env {
    Env::Dev
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// One of the keys of `[roles]`, e.g. `appServer`.
    pub role: String,
    /// This node's name in logs and event ids; several nodes may share a role.
    #[serde(default = "default_node_name")]
    pub name: String,
    /// Folder of REC template files (`*.toml`); a relative path is taken
    /// from the config folder, so a unit file started anywhere finds it.
    #[serde(default = "default_templates")]
    pub templates: PathBuf,
}

fn default_node_name() -> String {
    "beds".into()
}
fn default_templates() -> PathBuf {
    "templates".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Classic,
    Quorum,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_amqp_port")]
    pub port: u16,
    pub user: String,
    /// Secret: set it in `env_{BEDS_ENV}.toml` or `BEDS__AMQP__PASS`.
    #[serde(default)]
    pub pass: Option<String>,
    #[serde(default = "default_vhost")]
    pub vhost: String,
    /// Prefix of every exchange and queue name (`beds` → `beds.rBroker`), so
    /// several installations (or test runs) can share one RabbitMQ.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    #[serde(default = "default_queue_type")]
    pub queue_type: QueueType,
    /// Quorum queues only: deliveries of one message before RabbitMQ
    /// dead-letters it to the DLQ (guards against poison messages that crash
    /// a node; without it RabbitMQ 4 would default to 20 and drop).
    #[serde(default = "default_delivery_limit")]
    pub delivery_limit: u32,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u16,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// `amqps`: encrypt the connection and check RabbitMQ's certificate.
    #[serde(default)]
    pub tls: TlsConfig,
}

/// TLS to a service (`[amqp.tls]`, `[databases.<name>.tls]`). Relative
/// paths are taken from the config folder.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Encrypt the connection; off by default (loopback in dev).
    #[serde(default)]
    pub enabled: bool,
    /// PEM file of the CA(s) that signed the server's certificate; unset:
    /// the system's trusted roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for a server that wants one (mutual TLS).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`: a secret, so in prod it must not be
    /// readable by group or others.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

impl TlsConfig {
    fn problems(&self, key: &str, p: &mut Vec<String>) {
        if !self.enabled {
            if self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some() {
                p.push(format!(
                    "{key}: files are set but enabled = false (set enabled = true to use TLS)"
                ));
            }
            return;
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            p.push(format!(
                "{key}: cert_file and key_file go together (mutual TLS needs both)"
            ));
        }
        for (name, f) in [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ] {
            if let Some(f) = f {
                if !f.is_file() {
                    p.push(format!("{key}.{name} = {}: no such file", f.display()));
                }
            }
        }
    }

    fn resolve(&mut self, dir: &Path) {
        for f in [&mut self.ca_file, &mut self.cert_file, &mut self.key_file]
            .into_iter()
            .flatten()
        {
            *f = dir.join(&f);
        }
    }
}

/// The admin plane (`[admin]`; wiki/18-admin-plane.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// AMQP users (the `user_id` RabbitMQ verifies) who may run `status`.
    #[serde(default)]
    pub viewers: Vec<String>,
    /// Also `reload`, `pause`, `resume` and `drain`.
    #[serde(default)]
    pub operators: Vec<String>,
    /// Every command, `prefetch` and `shutdown` too.
    #[serde(default)]
    pub admins: Vec<String>,
    /// AMQP users the nodes run as: heartbeats, counters and forwarded
    /// commands are taken only from them. Unset: this node's `amqp.user`.
    #[serde(default)]
    pub nodes: Option<Vec<String>>,
    /// How often each node announces itself on `adminSyslogBroker`.
    #[serde(default = "default_admin_heartbeat")]
    pub heartbeat_ms: u64,
    /// A node silent this long is listed as missing.
    #[serde(default = "default_missing_after")]
    pub missing_after_ms: u64,
    /// How often each node sends its counters on `adminGraphBroker`.
    #[serde(default = "default_graph_interval")]
    pub graph_interval_ms: u64,
    /// The admin node's MongoDB collection of counters (in the event log's
    /// database) and how long they are kept (a TTL index).
    #[serde(default = "default_graph_collection")]
    pub graph_collection: String,
    #[serde(default = "default_graph_retention")]
    pub graph_retention_days: u32,
    /// The admin node's record of every member's last heartbeat (same
    /// database), for the observer's node list; kept as long as counters.
    #[serde(default = "default_node_collection")]
    pub node_collection: String,
    /// How long the admin node waits for the nodes' answers.
    #[serde(default = "default_answer_timeout")]
    pub answer_timeout_ms: u64,
}

fn default_admin_heartbeat() -> u64 {
    5_000
}
fn default_missing_after() -> u64 {
    15_000
}
fn default_graph_interval() -> u64 {
    10_000
}
fn default_graph_collection() -> String {
    "msGraphs".into()
}
fn default_node_collection() -> String {
    "msNodes".into()
}
fn default_graph_retention() -> u32 {
    14
}
fn default_answer_timeout() -> u64 {
    5_000
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            viewers: Vec::new(),
            operators: Vec::new(),
            admins: Vec::new(),
            nodes: None,
            heartbeat_ms: default_admin_heartbeat(),
            missing_after_ms: default_missing_after(),
            graph_interval_ms: default_graph_interval(),
            graph_collection: default_graph_collection(),
            graph_retention_days: default_graph_retention(),
            node_collection: default_node_collection(),
            answer_timeout_ms: default_answer_timeout(),
        }
    }
}

/// A MongoDB collection name BEDS may own: no `$`, NUL or `system.` prefix.
fn is_collection_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['$', '\0']) && !name.starts_with("system.")
}

/// What an operator may do on the admin plane, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AdminRole {
    Viewer,
    Operator,
    Admin,
}

impl AdminRole {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminRole::Viewer => "viewer",
            AdminRole::Operator => "operator",
            AdminRole::Admin => "admin",
        }
    }
}

impl AdminConfig {
    /// Whether `user` is one of the nodes' accounts (`own`: this node's
    /// `amqp.user`, the default list).
    pub fn is_node_user(&self, user: &str, own: &str) -> bool {
        match &self.nodes {
            Some(list) => list.iter().any(|u| u == user),
            None => user == own,
        }
    }

    /// The highest role `user` holds, if any.
    pub fn role_of(&self, user: &str) -> Option<AdminRole> {
        let has = |l: &[String]| l.iter().any(|u| u == user);
        if has(&self.admins) {
            Some(AdminRole::Admin)
        } else if has(&self.operators) {
            Some(AdminRole::Operator)
        } else if has(&self.viewers) {
            Some(AdminRole::Viewer)
        } else {
            None
        }
    }
}

/// The node's own HTTP listener (`/healthz`, `/readyz`, `/metrics`,
/// `POST /reload`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// `host:port`; `""` turns the listener off. Loopback by default: open
    /// it wider only for a Prometheus on another machine.
    #[serde(default = "default_http_listen")]
    pub listen: String,
    /// How often readiness asks RabbitMQ and each database whether they
    /// answer (also the pace of the systemd watchdog's proof of life).
    #[serde(default = "default_probe_interval")]
    pub probe_interval_ms: u64,
}

fn default_http_listen() -> String {
    "127.0.0.1:9464".into()
}
fn default_probe_interval() -> u64 {
    5_000
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_http_listen(),
            probe_interval_ms: default_probe_interval(),
        }
    }
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_amqp_port() -> u16 {
    5672
}
fn default_vhost() -> String {
    "/".into()
}
fn default_prefix() -> String {
    "beds".into()
}
fn default_queue_type() -> QueueType {
    QueueType::Classic
}
fn default_delivery_limit() -> u32 {
    20
}
fn default_heartbeat() -> u16 {
    30
}
fn default_connect_timeout() -> u64 {
    5_000
}

impl AmqpConfig {
    /// The AMQP URI, with the password percent-encoded. Contains a secret:
    /// never log it.
    pub fn uri(&self) -> String {
        let vhost = if self.vhost == "/" {
            "%2f".to_string()
        } else {
            pct(&self.vhost)
        };
        format!(
            "{}://{}:{}@{}:{}/{}?heartbeat={}",
            if self.tls.enabled { "amqps" } else { "amqp" },
            pct(&self.user),
            pct(self.pass.as_deref().unwrap_or("")),
            self.host,
            self.port,
            vhost,
            self.heartbeat_secs
        )
    }
}

fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The event log (CONTRACT §7): one document per request, written by each
/// node to MongoDB off the request path, spooled to disk while MongoDB does
/// not answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// The `[databases.*]` entry (kind `mongodb`) the log goes to; `""`
    /// turns the event log off. Unset: `docs` when that is a MongoDB entry,
    /// else off.
    #[serde(default)]
    pub database: Option<String>,
    #[serde(default = "default_events_collection")]
    pub collection: String,
    /// Events older than this are removed by MongoDB (a TTL index on `ts`).
    #[serde(default = "default_events_retention_days")]
    pub retention_days: u32,
    /// Events held in memory for the writer; when full, new events are
    /// dropped and counted (requests never wait for the log).
    #[serde(default = "default_events_queue")]
    pub queue: usize,
    /// Most events in one insert.
    #[serde(default = "default_events_batch")]
    pub batch: usize,
    /// Longest an event waits in memory before its batch is written.
    #[serde(default = "default_events_flush_ms")]
    pub flush_ms: u64,
    /// Where events wait while MongoDB does not answer (a folder per node
    /// name is made inside).
    #[serde(default = "default_events_spool_dir")]
    pub spool_dir: PathBuf,
    /// Bound on the spool; past it the oldest spooled events are dropped,
    /// loudly.
    #[serde(default = "default_events_spool_max")]
    pub spool_max_bytes: u64,
}

fn default_events_collection() -> String {
    "msLogs".into()
}
fn default_events_retention_days() -> u32 {
    30
}
fn default_events_queue() -> usize {
    50_000
}
fn default_events_batch() -> usize {
    500
}
fn default_events_flush_ms() -> u64 {
    200
}
fn default_events_spool_dir() -> PathBuf {
    "spool".into()
}
fn default_events_spool_max() -> u64 {
    256 * 1024 * 1024
}

impl Config {
    /// The database entry the event log goes to, if the log is on.
    pub fn event_database(&self) -> Option<&str> {
        match self.events.database.as_deref() {
            Some("") => None,
            Some(db) => Some(db),
            None => match self.databases.get("docs") {
                Some(DatabaseConfig::Mongodb(_)) => Some("docs"),
                _ => None,
            },
        }
    }
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            database: None,
            collection: default_events_collection(),
            retention_days: default_events_retention_days(),
            queue: default_events_queue(),
            batch: default_events_batch(),
            flush_ms: default_events_flush_ms(),
            spool_dir: default_events_spool_dir(),
            spool_max_bytes: default_events_spool_max(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatchConfig {
    /// Unacknowledged deliveries RabbitMQ hands one dispatcher; also the
    /// bound on requests that dispatcher works on at once.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// TTL of each retry tier, in order (`beds.<broker>.retry.1`, …).
    #[serde(default = "default_retry_tiers")]
    pub retry_tiers_ms: Vec<u64>,
    /// Largest request body accepted; checked before parsing.
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
    /// Most entries one batch may hold.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// How long SIGTERM waits for in-flight requests before closing anyway
    /// (unfinished ones go back to the queue, nothing is lost).
    #[serde(default = "default_drain")]
    pub drain_timeout_ms: u64,
    /// How long a write's `message_id` is remembered so a redelivery is
    /// answered from the first execution instead of applied again.
    #[serde(default = "default_dedup_window")]
    pub dedup_window_ms: u64,
    /// Cap on remembered `message_id`s (memory bound).
    #[serde(default = "default_dedup_max")]
    pub dedup_max_entries: usize,
    /// How long the durable inbox keeps a write's record (CONTRACT §2:
    /// 24 h by default); older ones are purged in the background.
    #[serde(default = "default_inbox_retention")]
    pub inbox_retention_ms: u64,
    /// Secret used to sign the caller identity a retried request carries
    /// (RabbitMQ forbids republishing another user's `user_id`). Nodes of one
    /// installation should share it; unset, each process makes its own.
    #[serde(default)]
    pub retry_key: Option<String>,
}

fn default_prefetch() -> u16 {
    32
}
fn default_retry_tiers() -> Vec<u64> {
    vec![1_000, 5_000, 30_000]
}
fn default_max_payload() -> usize {
    1024 * 1024
}
fn default_max_batch() -> usize {
    1_000
}
fn default_drain() -> u64 {
    10_000
}
fn default_dedup_window() -> u64 {
    300_000
}
fn default_dedup_max() -> usize {
    100_000
}
fn default_inbox_retention() -> u64 {
    86_400_000
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            prefetch: default_prefetch(),
            retry_tiers_ms: default_retry_tiers(),
            max_payload_bytes: default_max_payload(),
            max_batch: default_max_batch(),
            drain_timeout_ms: default_drain(),
            dedup_window_ms: default_dedup_window(),
            dedup_max_entries: default_dedup_max(),
            inbox_retention_ms: default_inbox_retention(),
            retry_key: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    /// The brokers whose work queues a node of this role consumes.
    #[serde(default)]
    pub brokers: Vec<String>,
    /// The role that keeps the admin plane: membership, counters and the
    /// fan-out of commands (every node answers commands, whatever its role).
    #[serde(default)]
    pub admin: bool,
}

/// The access kinds of CONTRACT §4; a broker serves one or more of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Read,
    Write,
    Meta,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Meta => "meta",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Dispatcher tasks consuming this broker's queue on this node.
    #[serde(default = "default_instances")]
    pub instances: usize,
    /// Access kinds of the ops this broker executes; anything else is
    /// answered `WRONG_BROKER`.
    pub serves: Vec<Access>,
    /// The templates this broker serves (segundo's and tercero's brokers
    /// name theirs). Unset: every template that no broker names, so the
    /// appServer brokers need no edit when a template is added.
    pub templates: Option<Vec<String>>,
}

impl BrokerConfig {
    /// Whether this broker serves `template`, given the templates some
    /// broker of the installation names (`claimed`).
    pub fn serves_template(&self, template: &str, claimed: &BTreeSet<String>) -> bool {
        match &self.templates {
            Some(list) => list.iter().any(|t| t == template),
            None => !claimed.contains(template),
        }
    }
}

fn default_instances() -> usize {
    1
}

/// One `[databases.<name>]` entry. `kind` picks the store, and with it which
/// keys the entry may hold; [`crate::namaste::build`] turns it into an
/// adapter. Deserialized by [`de_databases`], so each kind keeps
/// `deny_unknown_fields` and environment overrides still parse numbers.
#[derive(Debug, Clone)]
pub enum DatabaseConfig {
    Mariadb(MariaDbConfig),
    Mongodb(MongoDbConfig),
}

impl DatabaseConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            DatabaseConfig::Mariadb(_) => "mariadb",
            DatabaseConfig::Mongodb(_) => "mongodb",
        }
    }

    pub fn as_mariadb(&self) -> Option<&MariaDbConfig> {
        match self {
            DatabaseConfig::Mariadb(c) => Some(c),
            _ => None,
        }
    }

    pub fn as_mongodb(&self) -> Option<&MongoDbConfig> {
        match self {
            DatabaseConfig::Mongodb(c) => Some(c),
            _ => None,
        }
    }

    /// Whether the secret is set (an empty one counts: no password).
    fn has_pass(&self) -> bool {
        match self {
            DatabaseConfig::Mariadb(c) => c.pass.is_some(),
            DatabaseConfig::Mongodb(c) => c.user.is_none() || c.pass.is_some(),
        }
    }
}

/// Reads each entry's `kind`, then the rest as that kind's struct, through
/// the config crate's own deserializer (which turns `"3307"` from an
/// environment variable into a port; serde's tagged enums would not).
fn de_databases<'de, D>(d: D) -> Result<BTreeMap<String, DatabaseConfig>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::Error;
    let raw = BTreeMap::<String, config::Value>::deserialize(d)?;
    let mut out = BTreeMap::new();
    for (name, value) in raw {
        let mut table = value
            .into_table()
            .map_err(|e| D::Error::custom(format!("databases.{name}: {e}")))?;
        let kind = table
            .remove("kind")
            .map(|k| k.into_string())
            .transpose()
            .map_err(|e| D::Error::custom(format!("databases.{name}.kind: {e}")))?;
        let rest = config::Value::new(None, config::ValueKind::Table(table));
        let wrap = |e: config::ConfigError| D::Error::custom(format!("databases.{name}: {e}"));
        let cfg = match kind.as_deref() {
            Some("mariadb") => DatabaseConfig::Mariadb(rest.try_deserialize().map_err(wrap)?),
            Some("mongodb") => DatabaseConfig::Mongodb(rest.try_deserialize().map_err(wrap)?),
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "databases.{name}.kind = {other:?}: expected \"mariadb\" or \"mongodb\""
                )))
            }
            None => {
                return Err(D::Error::custom(format!(
                    "databases.{name}.kind is missing: \"mariadb\" or \"mongodb\""
                )))
            }
        };
        out.insert(name, cfg);
    }
    Ok(out)
}

/// A MariaDB database: a primary pool, and optionally a read replica.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MariaDbConfig {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_db_port")]
    pub port: u16,
    pub user: String,
    /// Secret: set it in `env_{BEDS_ENV}.toml` or `BEDS__DATABASES__<NAME>__PASS`.
    #[serde(default)]
    pub pass: Option<String>,
    /// Schema (database) name on the server.
    pub name: String,
    #[serde(default = "default_max_conn")]
    pub max_connections: u32,
    /// How long a request waits for a free connection before it counts as
    /// the database being unavailable.
    #[serde(default = "default_acquire_timeout")]
    pub acquire_timeout_ms: u64,
    /// Optional read replica: `read` ops go there when it is configured.
    #[serde(default)]
    pub replica: Option<ReplicaConfig>,
    /// Writes with a `message_id` are recorded in the durable inbox
    /// (`utilities/sql/inbox.sql`, installed by the DBA) in their own
    /// transaction, so a repeat on any node is answered, not applied again.
    #[serde(default = "default_true")]
    pub inbox: bool,
    /// TLS to the primary and the replica; with it on, the server's
    /// certificate and host name are verified.
    #[serde(default)]
    pub tls: TlsConfig,
}

fn default_true() -> bool {
    true
}

/// Where reads of a MongoDB database may go (MongoDB's read preference
/// modes). Writes always go to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ReadPreference {
    #[serde(rename = "primary")]
    Primary,
    #[serde(rename = "primaryPreferred")]
    PrimaryPreferred,
    #[serde(rename = "secondary")]
    Secondary,
    #[serde(rename = "secondaryPreferred")]
    SecondaryPreferred,
    #[serde(rename = "nearest")]
    Nearest,
}

/// How many members must have a write before MongoDB confirms it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteConcern {
    /// `majority` when the deployment is a replica set, `acknowledged`
    /// (w: 1) on a standalone server, decided at IPL from its `hello`.
    Auto,
    Majority,
    Acknowledged,
}

/// A MongoDB database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoDbConfig {
    /// Hosts and options without credentials, e.g.
    /// `mongodb://db1:27017,db2:27017/?replicaSet=rs0`.
    #[serde(default = "default_mongo_uri")]
    pub uri: String,
    /// Database name on the server.
    pub name: String,
    /// Optional login (SCRAM); `None` connects without authentication.
    #[serde(default)]
    pub user: Option<String>,
    /// Secret: set it in `env_{BEDS_ENV}.toml` or `BEDS__DATABASES__<NAME>__PASS`.
    #[serde(default)]
    pub pass: Option<String>,
    /// Database that holds the user (MongoDB's `authSource`).
    #[serde(default = "default_auth_source")]
    pub auth_source: String,
    #[serde(default = "default_max_conn")]
    pub max_connections: u32,
    /// Where `read` ops go.
    #[serde(default = "default_read_preference")]
    pub read_preference: ReadPreference,
    #[serde(default = "default_write_concern")]
    pub write_concern: WriteConcern,
    /// Bound on finding a server and on each operation: past it, a read is
    /// retried later and a write whose outcome is unknown is parked.
    #[serde(default = "default_mongo_timeout")]
    pub timeout_ms: u64,
    /// Writes with a `message_id` are recorded in the `beds_inbox`
    /// collection (in their transaction where the server has them).
    #[serde(default = "default_true")]
    pub inbox: bool,
    /// TLS to every member (the driver's `tls` options, set from here so
    /// relative paths work and the URI stays free of file names).
    #[serde(default)]
    pub tls: TlsConfig,
}

fn default_mongo_uri() -> String {
    "mongodb://127.0.0.1:27017".into()
}
fn default_auth_source() -> String {
    "admin".into()
}
fn default_read_preference() -> ReadPreference {
    ReadPreference::Primary
}
fn default_write_concern() -> WriteConcern {
    WriteConcern::Auto
}
fn default_mongo_timeout() -> u64 {
    5_000
}

fn default_db_port() -> u16 {
    3306
}
fn default_max_conn() -> u32 {
    16
}
fn default_acquire_timeout() -> u64 {
    3_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    pub host: String,
    #[serde(default = "default_db_port")]
    pub port: u16,
    /// Defaults to the primary's user, password and schema.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub pass: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub max_connections: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    /// `tracing` filter, e.g. `info` or `beds=debug,sqlx=warn`;
    /// `RUST_LOG` overrides it.
    #[serde(default = "default_level")]
    pub level: String,
    /// Also send events to the systemd journal.
    #[serde(default)]
    pub journald: bool,
}

fn default_level() -> String {
    "info".into()
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: default_level(),
            journald: false,
        }
    }
}

impl Config {
    /// Loads `dir/beds.toml`, layers `dir/env_{env}.toml` (optional) and
    /// `BEDS__SECTION__KEY` environment variables on top, then cross-checks.
    pub fn load(dir: &Path, env: Env) -> Result<Config, ConfigError> {
        let base = dir.join("beds.toml");
        if !base.is_file() {
            return Err(ConfigError::Missing(base));
        }
        let overlay = dir.join(format!("env_{}.toml", env.as_str()));
        let built = config::Config::builder()
            .add_source(config::File::from(base.as_path()).required(true))
            .add_source(config::File::from(overlay.as_path()).required(false))
            // Environment keys arrive lowercased, which suits secrets such as
            // BEDS__AMQP__PASS; mixed-case keys (broker names) belong in files.
            .add_source(
                config::Environment::with_prefix("BEDS")
                    .prefix_separator("__")
                    .separator("__"),
            )
            .build()
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        let mut cfg: Config = built
            .try_deserialize()
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.env = env;
        cfg.resolve_paths(dir);
        let mut problems = cfg.problems();
        if env == Env::Prod {
            problems.extend(secret_file_problems(&cfg, &base, &overlay));
        }
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Relative paths (templates, spool, TLS files) are taken from the
    /// config folder, not from wherever the process was started.
    fn resolve_paths(&mut self, dir: &Path) {
        // `join` keeps an absolute path as it is.
        self.node.templates = dir.join(&self.node.templates);
        self.events.spool_dir = dir.join(&self.events.spool_dir);
        self.amqp.tls.resolve(dir);
        for db in self.databases.values_mut() {
            match db {
                DatabaseConfig::Mariadb(c) => c.tls.resolve(dir),
                DatabaseConfig::Mongodb(c) => c.tls.resolve(dir),
            }
        }
    }

    /// Cross-checks serde cannot express. Returns every problem found.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        match self.roles.get(&self.node.role) {
            None => p.push(format!(
                "node.role = {:?} is not a key of [roles] (known: {})",
                self.node.role,
                self.roles.keys().cloned().collect::<Vec<_>>().join(", ")
            )),
            Some(role) => {
                if role.brokers.is_empty() && !role.admin {
                    p.push(format!(
                        "roles.{}.brokers is empty (only an admin = true role may serve no broker)",
                        self.node.role
                    ));
                }
                for b in &role.brokers {
                    if !self.brokers.contains_key(b) {
                        p.push(format!(
                            "roles.{}.brokers names {b:?}, which has no [brokers.{b}] entry",
                            self.node.role
                        ));
                    }
                }
            }
        }
        let a = &self.admin;
        for (key, v, lo, hi) in [
            ("heartbeat_ms", a.heartbeat_ms, 100, 600_000),
            ("missing_after_ms", a.missing_after_ms, 300, 3_600_000),
            ("graph_interval_ms", a.graph_interval_ms, 100, 3_600_000),
            ("answer_timeout_ms", a.answer_timeout_ms, 100, 600_000),
        ] {
            if !(lo..=hi).contains(&v) {
                p.push(format!("admin.{key} = {v}: must be {lo}..={hi}"));
            }
        }
        if a.missing_after_ms < a.heartbeat_ms * 2 {
            p.push(format!(
                "admin.missing_after_ms = {} must be at least twice admin.heartbeat_ms ({}), or live nodes show as missing",
                a.missing_after_ms, a.heartbeat_ms
            ));
        }
        if a.graph_retention_days == 0 {
            p.push("admin.graph_retention_days must be at least 1".into());
        }
        for (key, name) in [
            ("graph_collection", &a.graph_collection),
            ("node_collection", &a.node_collection),
        ] {
            if !is_collection_name(name) {
                p.push(format!(
                    "admin.{key} = {name:?} must be a plain collection name"
                ));
            }
        }
        if a.graph_collection == a.node_collection {
            p.push("admin.graph_collection and admin.node_collection must differ".into());
        }
        if !is_amqp_name(&self.node.name) {
            p.push(format!(
                "node.name = {:?}: may hold only letters, digits, '_' and '-' (it names the node's admin queue)",
                self.node.name
            ));
        }
        for (name, b) in &self.brokers {
            if !is_amqp_name(name) {
                p.push(format!(
                    "brokers.{name}: name may hold only letters, digits, '_' and '-'"
                ));
            }
            if b.instances == 0 {
                p.push(format!("brokers.{name}.instances must be at least 1"));
            }
            for t in b.templates.iter().flatten() {
                if !crate::registry::is_template_name(t) {
                    p.push(format!(
                        "brokers.{name}.templates names {t:?}, which is not a template name (2-32 chars, [a-z] then [a-z0-9_])"
                    ));
                }
            }
            if b.templates.as_ref().is_some_and(|t| t.is_empty()) {
                p.push(format!(
                    "brokers.{name}.templates is empty: list the templates it serves, or leave it out to serve every template no broker names"
                ));
            }
            if b.instances > 256 {
                p.push(format!("brokers.{name}.instances must be at most 256"));
            }
            if b.serves.is_empty() {
                p.push(format!(
                    "brokers.{name}.serves is empty (use read, write, meta)"
                ));
            }
        }
        if !is_amqp_name(&self.amqp.prefix) {
            p.push("amqp.prefix may hold only letters, digits, '_' and '-'".into());
        }
        if self.amqp.pass.is_none() {
            p.push(
                "amqp.pass is not set: put it in config/env_<BEDS_ENV>.toml or BEDS__AMQP__PASS"
                    .into(),
            );
        }
        self.amqp.tls.problems("amqp.tls", &mut p);
        if !self.http.listen.is_empty() && self.http.listen.parse::<std::net::SocketAddr>().is_err()
        {
            p.push(format!(
                "http.listen = {:?} must be ip:port (e.g. 127.0.0.1:9464), or \"\" for no listener",
                self.http.listen
            ));
        }
        if !(100..=600_000).contains(&self.http.probe_interval_ms) {
            p.push("http.probe_interval_ms must be between 100 and 600000".into());
        }
        if self.amqp.queue_type == QueueType::Quorum && self.amqp.delivery_limit == 0 {
            p.push("amqp.delivery_limit must be at least 1 with quorum queues".into());
        }
        let d = &self.dispatch;
        if self.env != Env::Dev
            && d.retry_key
                .as_deref()
                .is_none_or(|k| k.chars().count() < 16)
        {
            p.push(format!(
                "dispatch.retry_key must be set (16+ characters, the same on every node) in {}: \
                 it signs the caller identity a retried request carries",
                self.env.as_str()
            ));
        }
        if d.prefetch == 0 {
            p.push("dispatch.prefetch must be at least 1".into());
        }
        if d.retry_tiers_ms.len() > 10 {
            p.push("dispatch.retry_tiers_ms may hold at most 10 tiers".into());
        }
        if d.retry_tiers_ms.contains(&0) {
            p.push("dispatch.retry_tiers_ms: every tier must be > 0 ms".into());
        }
        if d.max_payload_bytes == 0 || d.max_payload_bytes > 128 * 1024 * 1024 {
            p.push("dispatch.max_payload_bytes must be between 1 and 134217728".into());
        }
        if d.max_batch == 0 {
            p.push("dispatch.max_batch must be at least 1".into());
        }
        let ev = &self.events;
        if let Some(db) = ev.database.as_deref().filter(|d| !d.is_empty()) {
            match self.databases.get(db) {
                Some(DatabaseConfig::Mongodb(_)) => {}
                Some(_) => p.push(format!(
                    "events.database = \"{db}\" must name a [databases.*] entry of kind mongodb"
                )),
                None => p.push(format!(
                    "events.database = \"{db}\" names no [databases.*] entry (set it to a mongodb entry, or to \"\" to turn the event log off)"
                )),
            }
        }
        if self.event_database().is_some() {
            if !is_collection_name(&ev.collection) {
                p.push("events.collection must be a plain collection name".into());
            }
            if ev.retention_days == 0 || ev.retention_days > 3660 {
                p.push("events.retention_days must be between 1 and 3660".into());
            }
            if ev.queue == 0 || ev.batch == 0 || ev.batch > 100_000 {
                p.push(
                    "events.queue must be at least 1 and events.batch between 1 and 100000".into(),
                );
            }
            if ev.flush_ms == 0 || ev.flush_ms > 60_000 {
                p.push("events.flush_ms must be between 1 and 60000".into());
            }
            if ev.spool_max_bytes < 1024 * 1024 {
                p.push("events.spool_max_bytes must be at least 1048576 (1 MiB)".into());
            }
        }
        // CONTRACT §2 promises the dedup for the configured retention: below
        // a minute the purge would race requests still being retried.
        if !(60_000..=366 * 86_400_000).contains(&d.inbox_retention_ms) {
            p.push("dispatch.inbox_retention_ms must be between 60000 (1 min) and 31622400000 (366 days)".into());
        }
        for (name, db) in &self.databases {
            if !is_amqp_name(name) {
                // Database names are part of hold queue names.
                p.push(format!(
                    "databases.{name}: name may hold only letters, digits, '_' and '-'"
                ));
            }
            if !db.has_pass() {
                p.push(format!(
                    "databases.{name}.pass is not set: put it in config/env_<BEDS_ENV>.toml or BEDS__DATABASES__{}__PASS",
                    name.to_uppercase()
                ));
            }
            let (max_connections, schema) = match db {
                DatabaseConfig::Mariadb(c) => {
                    c.tls.problems(&format!("databases.{name}.tls"), &mut p);
                    (c.max_connections, &c.name)
                }
                DatabaseConfig::Mongodb(c) => {
                    c.tls.problems(&format!("databases.{name}.tls"), &mut p);
                    if c.tls.cert_file != c.tls.key_file {
                        p.push(format!(
                            "databases.{name}.tls: MongoDB reads the client certificate and its key from one PEM file: set cert_file and key_file to that same file"
                        ));
                    }
                    if c.uri.contains("tlsCAFile") || c.uri.contains("tlsCertificateKeyFile") {
                        p.push(format!(
                            "databases.{name}.uri names TLS files: use [databases.{name}.tls] ca_file, cert_file, key_file"
                        ));
                    }
                    if !c.uri.starts_with("mongodb://") && !c.uri.starts_with("mongodb+srv://") {
                        p.push(format!(
                            "databases.{name}.uri must start with mongodb:// or mongodb+srv://"
                        ));
                    }
                    if c.uri.split("://").nth(1).is_some_and(|rest| {
                        rest.split(['/', '?']).next().unwrap_or("").contains('@')
                    }) {
                        p.push(format!(
                            "databases.{name}.uri holds credentials: use databases.{name}.user and .pass (a secret)"
                        ));
                    }
                    if !(1..=3_600_000).contains(&c.timeout_ms) {
                        p.push(format!(
                            "databases.{name}.timeout_ms must be between 1 and 3600000"
                        ));
                    }
                    (c.max_connections, &c.name)
                }
            };
            if max_connections == 0 {
                p.push(format!(
                    "databases.{name}.max_connections must be at least 1"
                ));
            }
            if schema.is_empty() {
                p.push(format!("databases.{name}.name is empty"));
            }
        }
        p
    }

    /// The broker serving `template`'s ops of kind `access`, preferring
    /// the node's own role (where `beds call` and `beds bench` send an op).
    pub fn broker_for(&self, template: &str, access: Access) -> Option<String> {
        let claimed = self.claimed_templates();
        let fits =
            |b: &BrokerConfig| b.serves.contains(&access) && b.serves_template(template, &claimed);
        let own = self.node_brokers();
        own.iter()
            .find(|(_, b)| fits(b))
            .map(|(n, _)| n.clone())
            .or_else(|| {
                self.brokers
                    .iter()
                    .find(|(_, b)| fits(b))
                    .map(|(n, _)| n.clone())
            })
    }

    /// This config with only the databases in `used` and the event log's:
    /// a node opens, probes and keeps hold queues for those alone, so an
    /// appServer node need not reach segundo's warehouse.
    pub fn with_databases(&self, used: &BTreeSet<String>) -> Config {
        let mut c = self.clone();
        let events = self.event_database().map(str::to_string);
        c.databases
            .retain(|name, _| used.contains(name) || events.as_deref() == Some(name));
        c
    }

    /// Templates that some broker names in its `templates` list: only the
    /// brokers naming them serve them.
    pub fn claimed_templates(&self) -> BTreeSet<String> {
        self.brokers
            .values()
            .filter_map(|b| b.templates.as_ref())
            .flatten()
            .cloned()
            .collect()
    }

    /// Whether one of this node's brokers serves `template`; a node loads
    /// and checks only those (an appServer node need not reach segundo's
    /// warehouse database).
    pub fn node_serves_template(&self, template: &str) -> bool {
        let claimed = self.claimed_templates();
        self.node_brokers()
            .iter()
            .any(|(_, b)| b.serves_template(template, &claimed))
    }

    /// The brokers this node runs, from its role.
    pub fn node_brokers(&self) -> Vec<(String, BrokerConfig)> {
        self.roles
            .get(&self.node.role)
            .map(|r| {
                r.brokers
                    .iter()
                    .filter_map(|b| self.brokers.get(b).map(|c| (b.clone(), c.clone())))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Names that go into exchange and queue names unquoted.
/// In prod, where the secrets may live: the overlay and key files readable
/// only by their owner, and none in the checked-in `beds.toml`.
fn secret_file_problems(cfg: &Config, base: &Path, overlay: &Path) -> Vec<String> {
    let mut p = Vec::new();
    if let Ok(text) = std::fs::read_to_string(base) {
        if let Ok(v) = text.parse::<toml::Table>() {
            for key in secrets_in(&v) {
                p.push(format!(
                    "{} holds {key}, a secret: move it to {} (mode 0600) or to an environment variable (BEDS__…)",
                    base.display(),
                    overlay.display()
                ));
            }
        }
    }
    let mut files = vec![overlay.to_path_buf()];
    let tls = std::iter::once(&cfg.amqp.tls).chain(cfg.databases.values().map(|d| match d {
        DatabaseConfig::Mariadb(c) => &c.tls,
        DatabaseConfig::Mongodb(c) => &c.tls,
    }));
    files.extend(tls.filter_map(|t| t.key_file.clone()));
    for f in files {
        if let Some(mode) = loose_mode(&f) {
            p.push(format!(
                "{} holds secrets but is readable by group or others (mode {mode:o}): run `chmod 600 {}` (owned by the user BEDS runs as)",
                f.display(),
                f.display()
            ));
        }
    }
    p
}

/// The dotted keys of `v` that hold secrets.
fn secrets_in(v: &toml::Table) -> Vec<String> {
    let mut out = Vec::new();
    let has = |t: Option<&toml::Value>, k: &str| t.and_then(|t| t.get(k)).is_some();
    if has(v.get("amqp"), "pass") {
        out.push("amqp.pass".to_string());
    }
    if has(v.get("dispatch"), "retry_key") {
        out.push("dispatch.retry_key".to_string());
    }
    if let Some(dbs) = v.get("databases").and_then(|d| d.as_table()) {
        for (name, db) in dbs {
            if db.get("pass").is_some() {
                out.push(format!("databases.{name}.pass"));
            }
            if has(db.get("replica"), "pass") {
                out.push(format!("databases.{name}.replica.pass"));
            }
        }
    }
    out
}

/// The permission bits of `f` when group or others may read it.
#[cfg(unix)]
fn loose_mode(f: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(f).ok()?.permissions().mode() & 0o777;
    (mode & 0o044 != 0).then_some(mode)
}
#[cfg(not(unix))]
fn loose_mode(_: &Path) -> Option<u32> {
    None
}

pub fn is_amqp_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The shipped `config/beds.toml` with placeholder secrets (a fresh
/// checkout has no env_dev.toml), for unit tests that need real templates.
#[cfg(test)]
pub(crate) fn shipped_for_tests() -> Config {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!(
        "beds-config-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(root.join("config/beds.toml"), dir.join("beds.toml")).unwrap();
    std::fs::write(
        dir.join("env_dev.toml"),
        "[amqp]\npass = \"x\"\n[databases.primary]\npass = \"x\"\n",
    )
    .unwrap();
    let config = Config::load(&dir, Env::Dev);
    let _ = std::fs::remove_dir_all(&dir);
    config.unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_percent_encodes_secrets() {
        let a = AmqpConfig {
            host: "127.0.0.1".into(),
            port: 5672,
            user: "u@x".into(),
            pass: Some("p/w:d".into()),
            vhost: "/".into(),
            prefix: "beds".into(),
            queue_type: QueueType::Classic,
            delivery_limit: 20,
            heartbeat_secs: 30,
            connect_timeout_ms: 1000,
            tls: TlsConfig::default(),
        };
        assert_eq!(
            a.uri(),
            "amqp://u%40x:p%2Fw%3Ad@127.0.0.1:5672/%2f?heartbeat=30"
        );
        let tls = AmqpConfig {
            tls: TlsConfig {
                enabled: true,
                ..Default::default()
            },
            ..a
        };
        assert!(tls.uri().starts_with("amqps://"));
    }

    /// A config folder with the shipped beds.toml (its secrets removed)
    /// and `overlay` as env_prod.toml and env_dev.toml.
    fn folder(name: &str, base_extra: &str, overlay: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("beds-cfg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let base =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/beds.toml"))
                .unwrap();
        std::fs::write(dir.join("beds.toml"), format!("{base}\n{base_extra}")).unwrap();
        std::fs::write(dir.join("env_prod.toml"), overlay).unwrap();
        std::fs::write(dir.join("env_dev.toml"), overlay).unwrap();
        dir
    }

    const PROD_SECRETS: &str = "[amqp]\npass = \"x\"\n[dispatch]\nretry_key = \"0123456789abcdef0\"\n[databases.primary]\npass = \"x\"\n";

    #[cfg(unix)]
    fn chmod(f: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn prod_refuses_secrets_readable_by_others_and_in_the_base_file() {
        let dir = folder("loose", "", PROD_SECRETS);
        let overlay = dir.join("env_prod.toml");
        chmod(&overlay, 0o644);
        let err = Config::load(&dir, Env::Prod).unwrap_err().to_string();
        assert!(
            err.contains(
                "env_prod.toml holds secrets but is readable by group or others (mode 644)"
            ),
            "{err}"
        );
        assert!(err.contains("chmod 600"), "{err}");
        // Dev does not care; prod with 0600 starts.
        chmod(&dir.join("env_dev.toml"), 0o644);
        assert!(Config::load(&dir, Env::Dev).is_ok());
        chmod(&overlay, 0o600);
        let cfg = Config::load(&dir, Env::Prod).unwrap();
        // Relative paths are the config folder's, not the working dir's.
        assert_eq!(cfg.node.templates, dir.join("../templates"));
        assert_eq!(cfg.events.spool_dir, dir.join("spool"));
        std::fs::remove_dir_all(&dir).unwrap();

        let dir = folder("inbase", "", PROD_SECRETS);
        let base = std::fs::read_to_string(dir.join("beds.toml")).unwrap();
        let base = base.replacen("[databases.docs]", "[databases.docs]\npass = \"y\"", 1);
        std::fs::write(dir.join("beds.toml"), base).unwrap();
        chmod(&dir.join("env_prod.toml"), 0o600);
        let err = Config::load(&dir, Env::Prod).unwrap_err().to_string();
        assert!(
            err.contains("beds.toml holds databases.docs.pass, a secret"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tls_and_http_settings_are_checked() {
        let dir = folder(
            "tls",
            "",
            "[http]\nlisten = \"nowhere\"\n[amqp]\npass = \"x\"\n[amqp.tls]\nenabled = true\nca_file = \"ca.pem\"\ncert_file = \"c.pem\"\n[databases.primary]\npass = \"x\"\n[databases.primary.tls]\nca_file = \"ca.pem\"\n",
        );
        let err = Config::load(&dir, Env::Dev).unwrap_err().to_string();
        for want in [
            "http.listen = \"nowhere\" must be ip:port",
            "amqp.tls: cert_file and key_file go together",
            "amqp.tls.ca_file = ",
            "ca.pem: no such file",
            "databases.primary.tls: files are set but enabled = false",
        ] {
            assert!(err.contains(want), "missing {want:?} in {err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn env_names() {
        assert_eq!(Env::parse("prod").unwrap(), Env::Prod);
        assert!(Env::parse("production").is_err());
    }

    #[test]
    fn named_templates_go_to_their_brokers_and_the_rest_to_the_open_ones() {
        let mut c = shipped_for_tests();
        assert_eq!(
            c.claimed_templates().into_iter().collect::<Vec<_>>(),
            ["account", "session", "wh_cool", "wh_sales"]
        );
        assert_eq!(
            c.broker_for("usr", Access::Read).as_deref(),
            Some("rBroker")
        );
        assert_eq!(
            c.broker_for("wh_sales", Access::Write).as_deref(),
            Some("whBroker")
        );
        assert_eq!(
            c.broker_for("wh_cool", Access::Read).as_deref(),
            Some("cBroker")
        );
        assert_eq!(c.broker_for("session", Access::Meta), None);
        // appServer serves what no broker names; segundo only its own.
        assert!(c.node_serves_template("usr") && c.node_serves_template("new_one"));
        assert!(!c.node_serves_template("wh_sales"));
        c.node.role = "segundo".into();
        assert!(c.node_serves_template("wh_sales") && c.node_serves_template("wh_cool"));
        assert!(!c.node_serves_template("usr") && !c.node_serves_template("session"));
        // A role of one's own may mix any brokers.
        c.roles.insert(
            "allInOne".into(),
            RoleConfig {
                brokers: vec!["rBroker".into(), "whBroker".into()],
                admin: false,
            },
        );
        c.node.role = "allInOne".into();
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        assert!(c.node_serves_template("usr") && c.node_serves_template("wh_sales"));
        assert!(!c.node_serves_template("wh_cool") && !c.node_serves_template("account"));
        // The admin role serves no broker, and only it may.
        c.node.role = "admin".into();
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        c.roles.get_mut("admin").unwrap().admin = false;
        assert!(c
            .problems()
            .iter()
            .any(|p| p.contains("roles.admin.brokers is empty")));
        c.brokers.get_mut("whBroker").unwrap().templates = Some(vec!["Bad-Name".into()]);
        assert!(c
            .problems()
            .iter()
            .any(|p| p.contains("brokers.whBroker.templates names \"Bad-Name\"")));
    }

    #[test]
    fn the_admin_collections_must_be_plain_and_apart() {
        let mut c = shipped_for_tests();
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        c.admin.node_collection = "system.nodes".into();
        c.admin.graph_collection = "$g".into();
        let p = c.problems().join("\n");
        assert!(
            p.contains("admin.node_collection = \"system.nodes\""),
            "{p}"
        );
        assert!(p.contains("admin.graph_collection = \"$g\""), "{p}");
        c.admin.node_collection = "msGraphs".into();
        c.admin.graph_collection = "msGraphs".into();
        assert!(c.problems().iter().any(|p| p.contains("must differ")));
    }

    #[test]
    fn a_node_keeps_only_the_databases_its_templates_and_event_log_use() {
        let c = shipped_for_tests();
        let used: BTreeSet<String> = ["primary".to_string()].into();
        let narrowed = c.with_databases(&used);
        assert_eq!(
            narrowed.databases.keys().cloned().collect::<Vec<_>>(),
            ["docs", "primary"]
        );
    }
}
