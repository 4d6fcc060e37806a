//! The references' own way to a database, per store, with nothing of BEDS
//! around it: for MariaDB the procedure `CALL`ed through a bare sqlx pool,
//! for MongoDB the driver's own call (`find_one`, `insert_one`, …) with the
//! template's documents. No validation, no retries, no health, no timeouts.

use futures::TryStreamExt;
use mongodb::bson::{self, doc, Bson, Document};
use serde_json::{Map, Value};
use sqlx::mysql::MySqlPool;

use super::target;
use crate::config::{Config, DatabaseConfig, MariaDbConfig};
use crate::registry::mongo::{render, Absent, Action};
use crate::registry::{values, Op, Param, Store, Template};

/// A pool for the references: the thinnest path, no ping before each use.
pub fn thin_pool(db: &MariaDbConfig, size: u32) -> MySqlPool {
    sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(std::time::Duration::from_millis(db.acquire_timeout_ms))
        .test_before_acquire(false)
        .connect_lazy_with(crate::namaste::mariadb::connect_options(db))
}

/// A template's database, reached directly.
#[derive(Clone)]
pub enum Direct {
    Maria(MySqlPool),
    Mongo(mongodb::Database),
}

impl Direct {
    /// The template's database with `size` connections (`None`: what BEDS
    /// gets from its config).
    pub async fn open(
        config: &Config,
        template: &Template,
        size: Option<u32>,
    ) -> Result<Direct, String> {
        match config.databases.get(&template.database) {
            Some(DatabaseConfig::Mariadb(c)) => Ok(Direct::Maria(thin_pool(
                c,
                size.unwrap_or(c.max_connections),
            ))),
            Some(DatabaseConfig::Mongodb(c)) => {
                let mut opts = mongodb::options::ClientOptions::parse(&c.uri)
                    .await
                    .map_err(|e| e.to_string())?;
                opts.max_pool_size = Some(size.unwrap_or(c.max_connections));
                if let Some(user) = &c.user {
                    opts.credential = Some(
                        mongodb::options::Credential::builder()
                            .username(user.clone())
                            .password(c.pass.clone())
                            .source(c.auth_source.clone())
                            .build(),
                    );
                }
                let client = mongodb::Client::with_options(opts).map_err(|e| e.to_string())?;
                Ok(Direct::Mongo(client.database(&c.name)))
            }
            None => Err(format!(
                "template {}: no database {}",
                template.name, template.database
            )),
        }
    }

    pub async fn close(&self) {
        match self {
            Direct::Maria(pool) => pool.close().await,
            Direct::Mongo(db) => db.client().clone().shutdown().await,
        }
    }

    /// Runs each entry as `op`, in order (MariaDB: on one connection), and
    /// returns each entry's rows or error code.
    pub async fn run(
        &self,
        op: &Op,
        entries: &[&Map<String, Value>],
    ) -> Vec<Result<Vec<Value>, String>> {
        match self {
            Direct::Maria(pool) => {
                let Ok(mut conn) = pool.acquire().await else {
                    return vec![Err("UNAVAILABLE".into()); entries.len()];
                };
                let mut out = Vec::with_capacity(entries.len());
                for data in entries {
                    let args: Vec<&Value> = op
                        .params
                        .iter()
                        .map(|(n, _)| data.get(n).unwrap_or(&Value::Null))
                        .collect();
                    let Some(sql) = op.call_sql() else {
                        out.push(Err(format!("{} is not a MariaDB op", op.qualified)));
                        continue;
                    };
                    out.push(
                        target::call(&mut conn, sql, &args)
                            .await
                            .map(|rows| rows.iter().map(target::row_json).collect()),
                    );
                }
                out
            }
            Direct::Mongo(db) => {
                let mut out = Vec::with_capacity(entries.len());
                for data in entries {
                    out.push(mongo(db, op, data).await);
                }
                out
            }
        }
    }
}

/// One MongoDB op through the driver: the template's shapes filled with the
/// values as sent (converted by their field's type, not checked).
async fn mongo(
    db: &mongodb::Database,
    op: &Op,
    data: &Map<String, Value>,
) -> Result<Vec<Value>, String> {
    let m = op.mongo().ok_or("INTERNAL")?;
    let params: Vec<Param> = op
        .params
        .iter()
        .enumerate()
        .map(|(i, (name, spec))| match data.get(name) {
            Some(v) if !v.is_null() => {
                values::check(name, spec, v, Store::Mongodb).unwrap_or(Param::Null)
            }
            _ => op.defaults[i].clone().unwrap_or(Param::Null),
        })
        .collect();
    let now = bson::DateTime::now();
    let doc = |s: &Option<crate::registry::mongo::Shape>, absent| match s
        .as_ref()
        .and_then(|s| render(s, &params, now, absent).ok().flatten())
    {
        Some(Bson::Document(d)) => Some(d),
        _ => None,
    };
    let coll = db.collection::<Document>(&m.collection);
    let code = |e: mongodb::error::Error| {
        if e.to_string().contains("E11000") {
            "CONFLICT".to_string()
        } else {
            "INTERNAL".to_string()
        }
    };
    let filter = doc(&m.filter, Absent::Refuse).unwrap_or_default();
    let rows: Vec<Document> = match m.action {
        Action::FindOne => coll
            .find_one(filter)
            .await
            .map_err(code)?
            .into_iter()
            .collect(),
        Action::InsertOne => {
            let mut d = doc! { "_id": bson::oid::ObjectId::new() };
            d.extend(doc(&m.document, Absent::Omit).unwrap_or_default());
            coll.insert_one(&d).await.map_err(code)?;
            vec![d]
        }
        Action::Find => {
            let mut find = coll.find(filter);
            if let Some(s) = doc(&m.sort, Absent::Refuse) {
                find = find.sort(s);
            }
            if let Some(Ok(Some(Bson::Int64(l)))) = m
                .limit
                .as_ref()
                .map(|s| render(s, &params, now, Absent::Refuse))
            {
                find = find.limit(l);
            }
            find.await
                .map_err(code)?
                .try_collect()
                .await
                .map_err(code)?
        }
        Action::Aggregate => {
            let stages: Vec<Document> = match m
                .pipeline
                .as_ref()
                .and_then(|s| render(s, &params, now, Absent::Refuse).ok().flatten())
            {
                Some(Bson::Array(a)) => a
                    .into_iter()
                    .filter_map(|b| b.as_document().cloned())
                    .collect(),
                _ => Vec::new(),
            };
            coll.aggregate(stages)
                .await
                .map_err(code)?
                .try_collect()
                .await
                .map_err(code)?
        }
        _ => return Err("UNSUPPORTED_BY_REFERENCE".into()),
    };
    Ok(rows
        .into_iter()
        .map(|d| Value::Object(crate::namaste::mongo::row(d)))
        .collect())
}
