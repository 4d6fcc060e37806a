//! The MariaDB NamasteCore adapter: `CALL proc(?, …)` with bound, typed
//! params through sqlx pools; rows become JSON objects by column name.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use serde_json::{Number, Value};
use sqlx::mysql::{
    MySqlConnectOptions, MySqlDatabaseError, MySqlPool, MySqlPoolOptions, MySqlRow, MySqlSslMode,
};
use sqlx::pool::PoolConnection;
use sqlx::{Column, Connection, Either, Executor, MySql, Row, TypeInfo, ValueRef};

use super::{
    probe, shape, AdapterError, Health, InboxKey, Lifecycle, NamasteCore, Once, Outcome, Recorder,
    Session,
};
use crate::config::{Access, MariaDbConfig, TlsConfig};
use crate::registry::{Op, Param, Target, Template};

/// The statement in a procedure body that ends or starts a transaction
/// (COMMIT, ROLLBACK other than to a savepoint, START TRANSACTION, or DDL,
/// which commits implicitly), if any. Words inside quotes and comments are
/// skipped; good enough to warn, not a parser.
fn ends_transaction(body: &str) -> Option<&'static str> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        if let Some(q) = quote {
            if c == '\\' && q != '`' {
                chars.next();
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '"' | '`' => quote = Some(c),
            '-' if chars.peek() == Some(&'-') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                let mut last = ' ';
                for c in chars.by_ref() {
                    if last == '*' && c == '/' {
                        break;
                    }
                    last = c;
                }
            }
            c if c.is_ascii_alphanumeric() || c == '_' => {
                word.push(c.to_ascii_uppercase());
                continue;
            }
            _ => {}
        }
        if !word.is_empty() {
            words.push(std::mem::take(&mut word));
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let next = |i: usize| words.get(i + 1).map(String::as_str);
    for (i, w) in words.iter().enumerate() {
        match (w.as_str(), next(i)) {
            ("COMMIT", _) => return Some("COMMIT"),
            ("ROLLBACK", Some("TO")) => {}
            ("ROLLBACK", _) => return Some("ROLLBACK"),
            ("START", Some("TRANSACTION")) => return Some("START TRANSACTION"),
            ("BEGIN", Some("WORK")) => return Some("BEGIN WORK"),
            ("CREATE" | "DROP", Some("TEMPORARY")) => {}
            ("CREATE" | "ALTER" | "DROP" | "RENAME", Some(_)) => {
                return Some("DDL (an implicit COMMIT)")
            }
            ("TRUNCATE", _) => return Some("TRUNCATE (an implicit COMMIT)"),
            ("LOCK", Some("TABLES" | "TABLE")) => return Some("LOCK TABLES (an implicit COMMIT)"),
            ("GRANT" | "REVOKE", _) => return Some("GRANT/REVOKE (an implicit COMMIT)"),
            ("SET", Some("AUTOCOMMIT")) => return Some("SET autocommit"),
            _ => {}
        }
    }
    None
}

/// The inbox procedures (`utilities/sql/inbox.sql`) and their arity.
const INBOX_PROCEDURES: [(&str, usize); 3] = [
    ("beds_inbox_claim", 2),
    ("beds_inbox_finish", 3),
    ("beds_inbox_purge", 2),
];

/// A pooled connection idle this long is pinged before use: under load none
/// are, after an outage or a quiet spell all of them.
const IDLE_CHECK: Duration = Duration::from_millis(250);

pub struct MariaDb {
    /// The `[databases]` entry name, for logs.
    name: String,
    /// Schema name, for the IPL procedure check.
    schema: String,
    /// Writes and meta ops, and reads when there is no replica.
    primary: MySqlPool,
    /// Writes with a `message_id` go through the `beds_inbox` procedures
    /// (`utilities/sql/inbox.sql`).
    inbox: bool,
    /// Read ops, when configured; falls back to the primary when it is down.
    replica: Option<MySqlPool>,
    /// Pauses the node's dispatchers while the primary is down.
    health: Arc<Health>,
    /// The replica's own state: while it is down, reads skip it. Never
    /// pauses anything (the primary can serve reads).
    replica_health: Arc<Health>,
}

impl MariaDb {
    /// Builds the pools lazily: nothing connects until the first use, so IPL
    /// can report reachability per step.
    pub fn new(name: &str, cfg: &MariaDbConfig) -> MariaDb {
        let pool_opts = |max: u32| {
            MySqlPoolOptions::new()
                .max_connections(max)
                .acquire_timeout(Duration::from_millis(cfg.acquire_timeout_ms))
                // sqlx already pings every connection when it is released.
                // Pinging again when one is taken would cost a round trip
                // per request; only connections that sat idle (and may have
                // died with a server restart) are checked. Writes check
                // theirs anyway (`acquire_live`).
                .test_before_acquire(false)
                .before_acquire(|conn, meta| {
                    Box::pin(async move {
                        if meta.idle_for >= IDLE_CHECK {
                            conn.ping().await?;
                        }
                        Ok(true)
                    })
                })
        };
        let primary_opts = connect_options(cfg);
        let replica = cfg.replica.as_ref().map(|r| {
            let opts = with_tls(
                with_password(
                    MySqlConnectOptions::new()
                        .host(&r.host)
                        .port(r.port)
                        .username(r.user.as_deref().unwrap_or(&cfg.user))
                        .database(r.name.as_deref().unwrap_or(&cfg.name)),
                    r.pass.as_deref().or(cfg.pass.as_deref()),
                ),
                &cfg.tls,
            );
            pool_opts(r.max_connections.unwrap_or(cfg.max_connections)).connect_lazy_with(opts)
        });
        MariaDb {
            name: name.to_string(),
            schema: cfg.name.clone(),
            primary: pool_opts(cfg.max_connections).connect_lazy_with(primary_opts),
            inbox: cfg.inbox,
            replica,
            health: Arc::new(Health::default()),
            replica_health: Arc::new(Health::default()),
        }
    }

    /// Checks the replica answers, if there is one.
    async fn ping_replica(&self) -> Option<Result<(), AdapterError>> {
        let replica = self.replica.as_ref()?;
        Some(
            replica
                .execute("SELECT 1")
                .await
                .map(|_| ())
                .map_err(classify),
        )
    }

    /// Marks `health` down and, on that transition, starts the probe that
    /// marks it up again once `pool` answers.
    fn start_probe(&self, pool: &MySqlPool, health: &Arc<Health>, role: &'static str) -> bool {
        if !health.mark_down() {
            return false;
        }
        let (alive, ping) = (pool.clone(), pool.clone());
        probe(
            health.clone(),
            self.name.clone(),
            role,
            move || !alive.is_closed(),
            move || {
                let pool = ping.clone();
                async move { pool.execute("SELECT 1").await.map(|_| ()).map_err(classify) }
            },
        );
        true
    }

    /// Marks the database down and, on the transition, starts one probe that
    /// marks it up again when it answers (jittered exponential backoff).
    fn note_unreachable(&self, err: &AdapterError) {
        if matches!(err, AdapterError::Unreachable(_))
            && self.start_probe(&self.primary, &self.health, "primary")
        {
            tracing::warn!(database = %self.name, error = %err, "database down: its requests wait until it answers");
        }
    }
}

/// A connection that just answered a ping: one that died while idle (server
/// restart, network cut) is replaced here, before a write is sent on it.
/// The ping is bounded like the acquire, so a silent network is an outage,
/// not a hang.
async fn acquire_live(pool: &MySqlPool) -> Result<PoolConnection<MySql>, AdapterError> {
    let limit = pool.options().get_acquire_timeout();
    let mut last = AdapterError::Unreachable("no live database connection".into());
    for _ in 0..=pool.options().get_max_connections() {
        let mut conn = pool.acquire().await.map_err(|e| classify_in(pool, e))?;
        match tokio::time::timeout(limit, conn.ping()).await {
            Ok(Ok(())) => return Ok(conn),
            Ok(Err(e)) => last = classify(e),
            Err(_) => {
                last = AdapterError::Unreachable(format!("no answer to a ping within {limit:?}"))
            }
        }
        drop(conn.detach());
    }
    Err(last)
}

/// A read on `pool`. A pooled connection may have died moments ago (a
/// server restart): the read then runs once more, on a connection that has
/// just answered a ping, before the error counts.
async fn read(pool: &MySqlPool, op: &Op, params: &[Param]) -> Result<Outcome, AdapterError> {
    let mut conn = pool.acquire().await.map_err(|e| classify_in(pool, e))?;
    match run(&mut *conn, pool, op, params).await {
        Err(AdapterError::Unreachable(_)) => {
            drop(conn.detach());
            read_again(pool, op, params).await?.0
        }
        other => other,
    }
}

/// The second try of a read whose connection turned out dead: on a
/// connection that has just answered a ping, returned for reuse unless it
/// died too.
async fn read_again(
    pool: &MySqlPool,
    op: &Op,
    params: &[Param],
) -> Result<(Result<Outcome, AdapterError>, Option<PoolConnection<MySql>>), AdapterError> {
    let mut conn = acquire_live(pool).await?;
    let out = run(&mut *conn, pool, op, params).await;
    if matches!(out, Err(AdapterError::Unreachable(_))) {
        drop(conn.detach());
        return Ok((out, None));
    }
    Ok((out, Some(conn)))
}

#[async_trait]
impl NamasteCore for MariaDb {
    async fn call(&self, op: &Op, params: &[Param]) -> Result<Outcome, AdapterError> {
        if op.access == Access::Read {
            // While the replica is down, reads go straight to the primary
            // (no waiting on the replica's pool) until its probe succeeds.
            if let Some(replica) = self
                .replica
                .as_ref()
                .filter(|_| self.replica_health.is_up())
            {
                match read(replica, op, params).await {
                    Err(AdapterError::Unreachable(e)) => {
                        if self.start_probe(replica, &self.replica_health, "replica") {
                            tracing::warn!(database = %self.name, error = %e, "replica unreachable: reading from the primary until it answers");
                        }
                    }
                    other => return other.and_then(|o| shape(op, o)),
                }
            }
            return read(&self.primary, op, params)
                .await
                .inspect_err(|e| self.note_unreachable(e))
                .and_then(|o| shape(op, o));
        }
        // The connection is taken and checked first: failing to get a live
        // one means nothing was sent, so the request is safe to retry. The
        // check costs a round trip, so only writes (whose failure after
        // sending leaves the outcome unknown) pay it.
        let mut conn = acquire_live(&self.primary)
            .await
            .inspect_err(|e| self.note_unreachable(e))?;
        match run(&mut *conn, &self.primary, op, params).await {
            Err(AdapterError::Unreachable(m)) => {
                drop(conn.detach());
                self.note_unreachable(&AdapterError::Unreachable(m.clone()));
                // A write may have committed.
                Err(AdapterError::Indeterminate(m))
            }
            other => other.and_then(|o| shape(op, o)),
        }
    }

    fn atomic_support(&self) -> Result<(), String> {
        Ok(())
    }

    async fn call_atomic(
        &self,
        calls: &[(&Op, &[Param])],
    ) -> Result<Vec<Outcome>, (usize, AdapterError)> {
        let fail = |i: usize, e: AdapterError| {
            self.note_unreachable(&e);
            (i, e)
        };
        let mut tx = self
            .primary
            .begin()
            .await
            .map_err(|e| fail(0, classify_in(&self.primary, e)))?;
        let mut outs = Vec::with_capacity(calls.len());
        for (i, (op, params)) in calls.iter().enumerate() {
            let out = run(&mut *tx, &self.primary, op, params)
                .await
                .and_then(|o| shape(op, o))
                .map_err(|e| fail(i, e))?;
            outs.push(out);
        }
        // Dropping `tx` on any error above rolls back (and a lost connection
        // rolls back on the server), so those are safe to retry; a failed
        // COMMIT leaves the outcome unknown.
        tx.commit().await.map_err(|e| {
            let e = match classify(e) {
                AdapterError::Unreachable(m) => {
                    self.note_unreachable(&AdapterError::Unreachable(m.clone()));
                    AdapterError::Indeterminate(m)
                }
                other => other,
            };
            (calls.len().saturating_sub(1), e)
        })?;
        Ok(outs)
    }

    fn inbox(&self) -> bool {
        self.inbox
    }

    async fn call_once(
        &self,
        key: &InboxKey,
        calls: &[(&Op, &[Param])],
        record: &mut Recorder<'_>,
    ) -> Result<Once, AdapterError> {
        // Until COMMIT nothing is applied: a connection lost on the way
        // rolls the transaction back on the server, so every failure before
        // it is retryable, and after a failed COMMIT the next delivery's
        // claim finds out whether it happened.
        let lost = |e: AdapterError| {
            let e = e.uncommitted();
            self.note_unreachable(&e);
            e
        };
        // No ping first: a dead connection fails the claim, which is safe
        // to run again.
        let conn = self
            .primary
            .acquire()
            .await
            .map_err(|e| lost(classify_in(&self.primary, e)))?;
        let mut tx = InTransaction(Some(conn));
        // The claim opens the transaction (one round trip, no BEGIN).
        let found = sqlx::query("CALL beds_inbox_claim(?, ?)")
            .bind(&key.id)
            .bind(&key.message_id)
            .fetch_all(tx.conn())
            .await
            .map_err(|e| lost(classify_in(&self.primary, e)))?;
        if let Some(row) = found.first() {
            // The procedure ended its transaction.
            tx.ended();
            let stored: Option<String> = row.try_get(0).map_err(classify)?;
            return stored.map(Once::Repeat).ok_or_else(|| {
                AdapterError::Internal(format!("inbox record {} has no answer", key.id))
            });
        }
        let mut outs = Vec::with_capacity(calls.len());
        let mut failed = None;
        for (i, (op, params)) in calls.iter().enumerate() {
            let out = run(tx.conn(), &self.primary, op, params).await;
            match out.and_then(|o| shape(op, o)) {
                Ok(o) => outs.push(o),
                Err(e) => {
                    failed = Some((i, lost(e)));
                    break;
                }
            }
        }
        let result = match failed {
            None => Ok(outs),
            Some(f) => Err(f),
        };
        let Some(stored) = record(&result) else {
            // Nothing to remember: undo, the request runs again.
            let rolled_back = tx.conn().execute("ROLLBACK").await;
            if rolled_back.is_ok() {
                tx.ended();
            }
            return Ok(Once::Ran(result));
        };
        sqlx::query("CALL beds_inbox_finish(?, ?, ?)")
            .bind(&key.id)
            .bind(stored)
            .bind(result.is_ok())
            .execute(tx.conn())
            .await
            .map_err(|e| lost(classify(e)))?;
        tx.ended();
        Ok(Once::Ran(result))
    }

    async fn purge_inbox(&self, age: Duration, limit: u32) -> Result<u64, AdapterError> {
        let purged: i64 = sqlx::query_scalar("CALL beds_inbox_purge(?, ?)")
            .bind(age.as_secs() as i64)
            .bind(limit)
            .fetch_one(&self.primary)
            .await
            .map_err(classify)?;
        Ok(purged.max(0) as u64)
    }

    fn session(&self) -> Box<dyn Session + '_> {
        Box::new(MariaSession {
            db: self,
            conn: None,
        })
    }
}

#[async_trait]
impl Lifecycle for MariaDb {
    async fn open(&self, tolerate_optional: bool) -> Result<(), AdapterError> {
        self.ping().await?;
        match self.ping_replica().await {
            Some(Err(e)) if tolerate_optional => {
                tracing::warn!(database = %self.name, error = %e, "replica unreachable; reads use the primary until it answers");
                self.start_probe(
                    self.replica.as_ref().expect("a replica answered the ping"),
                    &self.replica_health,
                    "replica",
                );
                Ok(())
            }
            Some(Err(e)) => Err(AdapterError::Unreachable(format!("replica: {e}"))),
            _ => Ok(()),
        }
    }

    async fn ping(&self) -> Result<(), AdapterError> {
        self.primary
            .execute("SELECT 1")
            .await
            .map(|_| ())
            .map_err(classify)
    }

    async fn missing_objects(&self, templates: &[&Template]) -> Result<Vec<String>, AdapterError> {
        let procs: Vec<(&str, usize)> = templates
            .iter()
            .flat_map(|t| t.ops.values())
            .filter_map(|op| match &op.target {
                Target::Procedure { name, .. } => Some((name.as_str(), op.params.len())),
                Target::Mongo(_) => None,
            })
            .collect();
        let mut procs = procs;
        let writes = templates
            .iter()
            .flat_map(|t| t.ops.values())
            .any(|op| op.access != Access::Read);
        if self.inbox && writes {
            procs.extend(INBOX_PROCEDURES);
        }
        self.missing_procedures(&procs).await
    }

    async fn warnings(&self, templates: &[&Template]) -> Vec<String> {
        let writes: Vec<&str> = templates
            .iter()
            .flat_map(|t| t.ops.values())
            .filter(|op| op.access != Access::Read)
            .filter_map(|op| match &op.target {
                Target::Procedure { name, .. } => Some(name.as_str()),
                Target::Mongo(_) => None,
            })
            .collect();
        if writes.is_empty() {
            return Vec::new();
        }
        let rows: Vec<(String, Option<String>)> = match sqlx::query_as(
            "SELECT ROUTINE_NAME, ROUTINE_DEFINITION FROM information_schema.ROUTINES \
              WHERE ROUTINE_SCHEMA = ? AND ROUTINE_TYPE = 'PROCEDURE'",
        )
        .bind(&self.schema)
        .fetch_all(&self.primary)
        .await
        {
            Ok(r) => r,
            Err(e) => {
                return vec![format!(
                    "{}: could not read procedure definitions: {e}",
                    self.name
                )]
            }
        };
        let mut out = Vec::new();
        let mut unreadable = Vec::new();
        for name in writes {
            match rows.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
                Some((_, Some(def))) => {
                    if let Some(what) = ends_transaction(def) {
                        out.push(format!(
                            "procedure {}.{name} runs {what} itself: its writes commit apart from BEDS's transaction, so the inbox cannot make its repeats exactly once (wiki/14)",
                            self.schema
                        ));
                    }
                }
                Some((_, None)) => unreadable.push(name),
                None => {}
            }
        }
        if !unreadable.is_empty() {
            out.push(format!(
                "{}: this login cannot read the definitions of {} to check that they do not commit on their own (the DBA can: see wiki/14)",
                self.name,
                unreadable.join(", ")
            ));
        }
        out
    }

    fn health(&self) -> &Health {
        &self.health
    }

    fn pool(&self) -> Option<(u32, u32)> {
        let p = &self.primary;
        let in_use = p.size().saturating_sub(p.num_idle() as u32);
        Some((in_use, p.options().get_max_connections()))
    }

    async fn close(&self) {
        self.primary.close().await;
        if let Some(r) = &self.replica {
            r.close().await;
        }
    }
}

impl MariaDb {
    /// Which of these procedures (name, parameter count) do not exist as
    /// written.
    async fn missing_procedures(
        &self,
        procs: &[(&str, usize)],
    ) -> Result<Vec<String>, AdapterError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT r.ROUTINE_NAME, \
                    (SELECT COUNT(*) FROM information_schema.PARAMETERS p \
                      WHERE p.SPECIFIC_SCHEMA = r.ROUTINE_SCHEMA AND p.SPECIFIC_NAME = r.ROUTINE_NAME \
                        AND p.ROUTINE_TYPE = 'PROCEDURE' AND p.ORDINAL_POSITION > 0) \
               FROM information_schema.ROUTINES r \
              WHERE r.ROUTINE_SCHEMA = ? AND r.ROUTINE_TYPE = 'PROCEDURE'",
        )
        .bind(&self.schema)
        .fetch_all(&self.primary)
        .await
        .map_err(classify)?;
        let mut missing = Vec::new();
        for (name, argc) in procs {
            match rows.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
                None if name.starts_with("beds_inbox_") => missing.push(format!(
                    "procedure {name} of the durable inbox does not exist in {}.{} (load utilities/sql/inbox.sql, or set databases.{}.inbox = false)",
                    self.name, self.schema, self.name
                )),
                None => missing.push(format!(
                    "procedure {name} does not exist in {}.{} (or the BEDS user may not EXECUTE it)",
                    self.name, self.schema
                )),
                Some((_, n)) if *n as usize != *argc => missing.push(format!(
                    "procedure {}.{name} takes {n} parameter(s) but the template passes {argc}",
                    self.schema
                )),
                Some(_) => {}
            }
        }
        Ok(missing)
    }
}

/// A pooled connection inside a transaction the inbox procedures opened
/// (sqlx does not know of it). Dropped before [`InTransaction::ended`] (an
/// error on the way, or the request cut off by the drain), the connection is
/// closed instead of returned: the server rolls the transaction back, and
/// no later request runs inside it.
struct InTransaction(Option<PoolConnection<MySql>>);

impl InTransaction {
    fn conn(&mut self) -> &mut sqlx::MySqlConnection {
        self.0.as_mut().expect("used before it ended")
    }

    /// The transaction is over: the connection may go back to the pool.
    fn ended(&mut self) {
        self.0.take();
    }
}

impl Drop for InTransaction {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            c.close_on_drop();
        }
    }
}

/// A batch's primary connection, taken at its first op and kept until the
/// batch ends: no pool round trip per op, and a write after an op that just
/// succeeded on it needs no ping.
struct MariaSession<'a> {
    db: &'a MariaDb,
    conn: Option<PoolConnection<MySql>>,
}

#[async_trait]
impl Session for MariaSession<'_> {
    async fn call(&mut self, op: &Op, params: &[Param]) -> Result<Outcome, AdapterError> {
        let db = self.db;
        // Reads with a replica keep its routing and fallback. The held
        // primary connection goes back first: holding it while waiting for
        // another could starve the pool.
        if op.access == Access::Read && db.replica.is_some() {
            self.conn = None;
            return db.call(op, params).await;
        }
        let mut conn = match self.conn.take() {
            Some(c) => Ok(c),
            None if op.access == Access::Read => db
                .primary
                .acquire()
                .await
                .map_err(|e| classify_in(&db.primary, e)),
            None => acquire_live(&db.primary).await,
        }
        .inspect_err(|e| db.note_unreachable(e))?;
        match run(&mut *conn, &db.primary, op, params).await {
            Err(AdapterError::Unreachable(m)) => {
                drop(conn.detach());
                if op.access == Access::Read {
                    // As outside a batch: once more on a live connection.
                    let (out, conn) = read_again(&db.primary, op, params)
                        .await
                        .inspect_err(|e| db.note_unreachable(e))?;
                    self.conn = conn;
                    return out
                        .inspect_err(|e| db.note_unreachable(e))
                        .and_then(|o| shape(op, o));
                }
                db.note_unreachable(&AdapterError::Unreachable(m.clone()));
                Err(AdapterError::Indeterminate(m))
            }
            other => {
                self.conn = Some(conn);
                other.and_then(|o| shape(op, o))
            }
        }
    }
}

/// How to reach the primary of `cfg` (also used by `beds bench`'s
/// database references).
pub fn connect_options(cfg: &MariaDbConfig) -> MySqlConnectOptions {
    with_tls(
        with_password(
            MySqlConnectOptions::new()
                .host(&cfg.host)
                .port(cfg.port)
                .username(&cfg.user)
                .database(&cfg.name),
            cfg.pass.as_deref(),
        ),
        &cfg.tls,
    )
}

/// With TLS on, the server must present a certificate for its host name
/// signed by `ca_file` (or a public root): never a silent plaintext
/// fallback. Off, no TLS at all (sqlx would otherwise try it opportunistically).
fn with_tls(opts: MySqlConnectOptions, tls: &TlsConfig) -> MySqlConnectOptions {
    if !tls.enabled {
        return opts.ssl_mode(MySqlSslMode::Disabled);
    }
    let mut opts = opts.ssl_mode(MySqlSslMode::VerifyIdentity);
    if let Some(ca) = &tls.ca_file {
        opts = opts.ssl_ca(ca);
    }
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        opts = opts.ssl_client_cert(cert).ssl_client_key(key);
    }
    opts
}

/// An empty password means "no password" (sqlx would send an empty one).
fn with_password(opts: MySqlConnectOptions, pass: Option<&str>) -> MySqlConnectOptions {
    match pass {
        Some(p) if !p.is_empty() => opts.password(p),
        _ => opts,
    }
}

/// One `CALL`: binds params, collects every result set's rows and the
/// affected-row count. `pool` is where `exec` gets its connection, for
/// telling a busy pool from a dead database.
async fn run<'e, E>(
    exec: E,
    pool: &MySqlPool,
    op: &Op,
    params: &[Param],
) -> Result<Outcome, AdapterError>
where
    E: Executor<'e, Database = MySql>,
{
    let Some(call_sql) = op.call_sql() else {
        return Err(AdapterError::Internal(format!(
            "{} is not a MariaDB op",
            op.qualified
        )));
    };
    let mut q = sqlx::query(call_sql.clone());
    for p in params {
        q = match p {
            Param::Null => q.bind(None::<String>),
            Param::Int(i) => q.bind(*i),
            Param::Float(f) => q.bind(*f),
            Param::Bool(b) => q.bind(*b),
            Param::Str(s) => q.bind(s.as_str()),
            Param::DateTime(dt) => q.bind(*dt),
            Param::Json(v) => q.bind(v.to_string()),
            Param::ObjectId(b) => q.bind(hex::encode(b)),
        };
    }
    let mut out = Outcome::default();
    let mut stream = exec.fetch_many(q);
    while let Some(item) = stream.try_next().await.map_err(|e| classify_in(pool, e))? {
        match item {
            Either::Left(done) => out.affected += done.rows_affected(),
            Either::Right(row) => out.rows.push(row_to_json(&row)?),
        }
    }
    Ok(out)
}

/// Converts a row by column type: integers stay integers, DECIMAL keeps every
/// digit (as a string), DATETIME/TIMESTAMP become RFC 3339 UTC, NULL is null.
fn row_to_json(row: &MySqlRow) -> Result<super::Row, AdapterError> {
    let mut obj = super::Row::with_capacity(row.columns().len());
    for (i, col) in row.columns().iter().enumerate() {
        let raw = row
            .try_get_raw(i)
            .map_err(|e| AdapterError::Internal(e.to_string()))?;
        let v = if raw.is_null() {
            Value::Null
        } else {
            decode(row, i, col.type_info().name())
                .map_err(|e| AdapterError::Internal(format!("column {}: {e}", col.name())))?
        };
        obj.insert(col.name().to_string(), v);
    }
    Ok(obj)
}

fn decode(row: &MySqlRow, i: usize, ty: &str) -> Result<Value, sqlx::Error> {
    Ok(match ty {
        "BOOLEAN" => Value::Bool(row.try_get_unchecked::<i64, _>(i)? != 0),
        "TINYINT" | "SMALLINT" | "MEDIUMINT" | "INT" | "BIGINT" | "YEAR" => {
            Value::from(row.try_get_unchecked::<i64, _>(i)?)
        }
        t if t.ends_with("UNSIGNED") || t == "BIT" => {
            Value::from(row.try_get_unchecked::<u64, _>(i)?)
        }
        "FLOAT" => float(row.try_get_unchecked::<f32, _>(i)? as f64),
        "DOUBLE" => float(row.try_get_unchecked::<f64, _>(i)?),
        // Lossless: DECIMAL travels as text in both protocols.
        "DECIMAL" => Value::String(row.try_get_unchecked::<&str, _>(i)?.to_string()),
        "DATETIME" | "TIMESTAMP" => {
            match row.try_get_unchecked::<chrono::NaiveDateTime, _>(i) {
                Ok(dt) => Value::String(
                    dt.and_utc()
                        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                ),
                // MariaDB's zero date has no RFC 3339 form.
                Err(_) => Value::Null,
            }
        }
        "DATE" => match row.try_get_unchecked::<chrono::NaiveDate, _>(i) {
            Ok(d) => Value::String(d.to_string()),
            Err(_) => Value::Null,
        },
        "TIME" => Value::String(
            row.try_get_unchecked::<sqlx::mysql::types::MySqlTime, _>(i)?
                .to_string(),
        ),
        "BINARY" | "VARBINARY" | "TINYBLOB" | "BLOB" | "MEDIUMBLOB" | "LONGBLOB" | "GEOMETRY" => {
            let bytes = row.try_get_unchecked::<&[u8], _>(i)?;
            match std::str::from_utf8(bytes) {
                Ok(s) => Value::String(s.to_string()),
                Err(_) => Value::String(format!("0x{}", hex::encode(bytes))),
            }
        }
        _ => Value::String(row.try_get_unchecked::<&str, _>(i)?.to_string()),
    })
}

fn float(f: f64) -> Value {
    Number::from_f64(f)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// Like [`classify`], but a pool timeout while every connection is busy is
/// load, not an outage: retry it later without pausing the node.
fn classify_in(pool: &MySqlPool, e: sqlx::Error) -> AdapterError {
    let max = pool.options().get_max_connections();
    if matches!(e, sqlx::Error::PoolTimedOut) && pool.num_idle() == 0 && pool.size() >= max {
        return AdapterError::Transient(format!(
            "all {max} database connections stayed busy (raise databases.*.max_connections or lower dispatch.prefetch)"
        ));
    }
    classify(e)
}

/// Sorts a driver error into what the dispatcher must do about it.
pub fn classify(e: sqlx::Error) -> AdapterError {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => AdapterError::Unreachable(e.to_string()),
        sqlx::Error::Database(db) => {
            let number = db
                .try_downcast_ref::<MySqlDatabaseError>()
                .map(|m| m.number())
                .unwrap_or(0);
            let state = db.code().map(|c| c.to_string()).unwrap_or_default();
            let msg = db.message().to_string();
            match (number, state.as_str()) {
                (1062 | 1022 | 1586 | 1451 | 1452 | 1216 | 1217 | 4025, _) => {
                    AdapterError::Conflict(msg)
                }
                (_, s) if s.starts_with("23") => AdapterError::Conflict(msg),
                // Deadlock, lock wait, serialization failure; too many
                // connections; read-only during a failover; statement timeout.
                (1213 | 1205 | 1040 | 1290 | 1836 | 1969, _) | (_, "40001") => {
                    AdapterError::Transient(msg)
                }
                (1053 | 1927 | 2002 | 2003 | 2006 | 2013 | 4031, _) => {
                    AdapterError::Unreachable(msg)
                }
                (_, s) if s.starts_with("08") => AdapterError::Unreachable(msg),
                (_, "45000") => AdapterError::Rejected(msg),
                _ => AdapterError::Internal(format!("{number} ({state}): {msg}")),
            }
        }
        other => AdapterError::Internal(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn procedures_that_commit_on_their_own_are_found() {
        let f = ends_transaction;
        assert_eq!(
            f("BEGIN INSERT INTO t VALUES (1); COMMIT; END"),
            Some("COMMIT")
        );
        assert_eq!(
            f("BEGIN start  transaction; END"),
            Some("START TRANSACTION")
        );
        assert_eq!(
            f("BEGIN TRUNCATE t; END"),
            Some("TRUNCATE (an implicit COMMIT)")
        );
        assert_eq!(f("BEGIN ROLLBACK; END"), Some("ROLLBACK"));
        assert!(f("BEGIN CREATE TEMPORARY TABLE x (i INT); END").is_none());
        assert!(f("BEGIN ROLLBACK TO SAVEPOINT a; END").is_none());
        assert!(f("BEGIN SELECT 'commit' AS c; -- commit\n END").is_none());
        assert!(f("BEGIN INSERT INTO usr (committed) VALUES (1); END").is_none());
        assert!(f("BEGIN DROP TEMPORARY TABLE IF EXISTS x; END").is_none());
        assert_eq!(
            f("BEGIN CREATE UNIQUE INDEX i ON t (a); END"),
            Some("DDL (an implicit COMMIT)")
        );
        assert_eq!(f("BEGIN SELECT 'it\\'s'; COMMIT; END"), Some("COMMIT"));
        assert!(f("BEGIN /* COMMIT */ SELECT 1; END").is_none());
        assert_eq!(
            f("BEGIN LOCK TABLES t WRITE; END"),
            Some("LOCK TABLES (an implicit COMMIT)")
        );
        assert_eq!(f("BEGIN SET autocommit = 1; END"), Some("SET autocommit"));
    }
}
