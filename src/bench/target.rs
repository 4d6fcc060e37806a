//! Where `beds bench` sends its jobs: over AMQP through [`crate::client`]
//! (to a BEDS node, or to the in-process echo and pipeline references), or
//! straight to MariaDB through a sqlx pool (the database reference).

use std::time::Duration;

use lapin::BasicProperties;
use serde::Deserialize;
use serde_json::Value;
use sqlx::mysql::MySqlRow;
use sqlx::{Column, Row, TypeInfo, ValueRef};

use super::direct::Direct;
use super::workload::{Job, Workload};
use lapin::types::{AMQPValue, FieldTable};

use crate::broker::payload::DEADLINE_HEADER;
use crate::client::{CallOptions, Client, ClientError};
use crate::config::Access;

/// The bench's own code for a request it could not send (the connection
/// is gone).
pub const CLIENT: &str = "CLIENT";

/// What one job came back with.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Operations that succeeded.
    pub ok: u32,
    /// Error code of each operation that failed (`TIMEOUT` and `CLIENT` are
    /// the bench's own: no reply in time, or the request could not be sent).
    pub failed: Vec<String>,
    /// The rows of the reply, only when asked for (seeding keys).
    pub rows: Vec<Value>,
}

impl Outcome {
    fn all_failed(ops: usize, code: &str) -> Outcome {
        Outcome {
            ok: 0,
            failed: vec![code.to_string(); ops],
            rows: Vec::new(),
        }
    }
}

/// Which routing key a request goes to.
pub enum Routing {
    /// BEDS: the broker serving the op's access kind, indexed read, write,
    /// meta (`None`: no broker serves it).
    ByAccess(Vec<Option<String>>),
    /// A reference: its one queue (on the default exchange).
    Queue(String),
}

impl Routing {
    fn route(&self, access: Access) -> Option<&str> {
        match self {
            Routing::ByAccess(r) => {
                let i = match access {
                    Access::Read => 0,
                    Access::Write => 1,
                    Access::Meta => 2,
                };
                r.get(i).and_then(|b| b.as_deref())
            }
            Routing::Queue(q) => Some(q),
        }
    }
}

pub enum Target {
    /// Requests over RabbitMQ.
    Amqp {
        /// Round-robin over `--connections` clients.
        clients: Vec<Client>,
        routing: Routing,
        /// Content type, persistence: the same for every request.
        props: Box<BasicProperties>,
        timeout: Duration,
        /// Every request gets its own `message_id` (writes use the inbox).
        message_ids: bool,
    },
    /// Straight to the database (a procedure `CALL`, or the MongoDB
    /// driver's own call): no RabbitMQ, no BEDS.
    Database { db: Direct },
}

impl Target {
    pub fn amqp(
        clients: Vec<Client>,
        routing: Routing,
        persistent: bool,
        timeout: Duration,
        message_ids: bool,
    ) -> Target {
        let opts = CallOptions {
            persistent,
            ..Default::default()
        };
        let props = Box::new(clients[0].properties(&opts));
        Target::Amqp {
            clients,
            routing,
            props,
            timeout,
            message_ids,
        }
    }

    pub async fn close(self) {
        match self {
            Target::Amqp { clients, .. } => {
                for c in clients {
                    c.close().await;
                }
            }
            Target::Database { db } => db.close().await,
        }
    }

    /// Runs one job. `n` picks the client; `want_rows` keeps reply rows.
    pub async fn run(&self, wl: &Workload, job: &Job, n: usize, want_rows: bool) -> Outcome {
        match self {
            Target::Amqp {
                clients,
                routing,
                props,
                timeout,
                message_ids,
            } => {
                let Some(route) = routing.route(wl.mix[job.op].op.access) else {
                    return Outcome::all_failed(job.entries.len(), "NO_BROKER");
                };
                let client = &clients[n % clients.len()];
                let body = wl.body(job);
                // A request the bench has given up on must not run later.
                let deadline = chrono::Utc::now().timestamp_millis()
                    + i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX / 2);
                let mut headers = FieldTable::default();
                headers.insert(DEADLINE_HEADER.into(), AMQPValue::LongLongInt(deadline));
                let mut props = (**props).clone().with_headers(headers);
                if *message_ids {
                    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
                    props = props.with_message_id(id.to_string().into());
                }
                match client.call_raw(route, &body, props, *timeout).await {
                    Ok(d) => parse_reply(&d.data, job.entries.len(), want_rows),
                    Err(ClientError::Timeout(_)) => {
                        Outcome::all_failed(job.entries.len(), "TIMEOUT")
                    }
                    Err(_) => Outcome::all_failed(job.entries.len(), CLIENT),
                }
            }
            Target::Database { db } => call_direct(db, wl, job, want_rows).await,
        }
    }
}

/// The parts of a reply the bench counts (CONTRACT §3).
#[derive(Deserialize)]
struct WireReply {
    status: String,
    #[serde(default)]
    error: Option<WireError>,
    #[serde(default)]
    results: Option<Vec<WireReply>>,
}

#[derive(Deserialize)]
struct WireError {
    code: String,
}

fn parse_reply(body: &[u8], ops: usize, want_rows: bool) -> Outcome {
    let Ok(r) = serde_json::from_slice::<WireReply>(body) else {
        return Outcome::all_failed(ops, "BAD_REPLY");
    };
    let mut out = Outcome::default();
    let code = |r: &WireReply| {
        r.error
            .as_ref()
            .map(|e| e.code.clone())
            .unwrap_or_else(|| "BAD_REPLY".into())
    };
    match &r.results {
        Some(results) => {
            for e in results {
                if e.status == "ok" {
                    out.ok += 1;
                } else {
                    out.failed.push(code(e));
                }
            }
        }
        None if r.status == "ok" => out.ok = ops as u32,
        None => out.failed = vec![code(&r); ops],
    }
    if want_rows {
        if let Ok(v) = serde_json::from_slice::<Value>(body) {
            let mut rows = Vec::new();
            match v.get("results").and_then(Value::as_array) {
                Some(rs) => rs
                    .iter()
                    .filter_map(|e| e.get("data").and_then(Value::as_array))
                    .for_each(|d| rows.extend(d.iter().cloned())),
                None => {
                    if let Some(d) = v.get("data").and_then(Value::as_array) {
                        rows.extend(d.iter().cloned())
                    }
                }
            }
            out.rows = rows;
        }
    }
    out
}

/// The database reference: each entry of the job run on its own (MariaDB:
/// one `CALL` each on one pooled connection), no transaction.
async fn call_direct(db: &Direct, wl: &Workload, job: &Job, want_rows: bool) -> Outcome {
    let op = &wl.mix[job.op].op;
    let entries: Vec<&serde_json::Map<String, Value>> = job.entries.iter().collect();
    let mut out = Outcome::default();
    for r in db.run(op, &entries).await {
        match r {
            Ok(rows) => {
                out.ok += 1;
                if want_rows {
                    out.rows.extend(rows);
                }
            }
            Err(code) => out.failed.push(code),
        }
    }
    out
}

/// One `CALL` with JSON values bound by their JSON type: the thinnest way to
/// run a procedure (shared by the database and pipeline references).
pub async fn call(
    conn: &mut sqlx::MySqlConnection,
    sql: &sqlx::SqlStr,
    args: &[&Value],
) -> Result<Vec<MySqlRow>, String> {
    let mut q = sqlx::query(sql.clone());
    for a in args {
        q = match a {
            Value::Null => q.bind(None::<String>),
            Value::Bool(b) => q.bind(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => q.bind(i),
                None => q.bind(n.as_f64().unwrap_or(0.0)),
            },
            Value::String(s) => q.bind(s.as_str()),
            other => q.bind(other.to_string()),
        };
    }
    q.fetch_all(&mut *conn).await.map_err(|e| match e {
        sqlx::Error::Database(d) if d.code().is_some_and(|c| c.starts_with("23")) => {
            "CONFLICT".to_string()
        }
        sqlx::Error::Database(_) => "INTERNAL".to_string(),
        _ => "UNAVAILABLE".to_string(),
    })
}

/// A row as JSON, the thin way: integers stay numbers, NULL is null,
/// everything else is text.
pub fn row_json(row: &MySqlRow) -> Value {
    let mut obj = serde_json::Map::with_capacity(row.columns().len());
    for (i, col) in row.columns().iter().enumerate() {
        let v = match row.try_get_raw(i) {
            Ok(raw) if raw.is_null() => Value::Null,
            _ if col.type_info().name().ends_with("INT") => row
                .try_get_unchecked::<i64, _>(i)
                .map(Value::from)
                .unwrap_or(Value::Null),
            _ => row
                .try_get_unchecked::<String, _>(i)
                .map(Value::String)
                .unwrap_or(Value::Null),
        };
        obj.insert(col.name().to_string(), v);
    }
    Value::Object(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_counted_per_operation() {
        let ok = parse_reply(br#"{"status":"ok","data":[{"id":1}]}"#, 1, true);
        assert_eq!((ok.ok, ok.failed.len(), ok.rows.len()), (1, 0, 1));
        let err = parse_reply(
            br#"{"status":"error","error":{"code":"NOT_FOUND","message":"x"}}"#,
            1,
            false,
        );
        assert_eq!(err.failed, vec!["NOT_FOUND"]);
        let batch = parse_reply(
            br#"{"status":"ok","results":[{"status":"ok","data":[]},{"status":"error","error":{"code":"CONFLICT"}}]}"#,
            2,
            false,
        );
        assert_eq!(
            (batch.ok, batch.failed.clone()),
            (1, vec!["CONFLICT".to_string()])
        );
        assert_eq!(parse_reply(b"nope", 3, false).failed.len(), 3);
    }
}
