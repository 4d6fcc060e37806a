//! The template registry: every REC template of the node, loaded and
//! validated at IPL into an immutable snapshot that dispatchers share through
//! an `Arc`. Resolving a request (template → op → broker check → access
//! check → typed params) happens here; executing it does not.

pub mod mongo;
pub mod template;
pub mod values;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use crate::config::{Access, Config};
pub use mongo::{Index, MongoOp};
pub use template::{FieldSpec, FieldType, Returns, Store, TemplateFile};
pub use values::Param;

/// Why a request could not be turned into an executable call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    #[error("no template named {0:?}")]
    UnknownTemplate(String),
    #[error("template {template:?} has no op {op:?} (it has: {known})")]
    UnknownOperation {
        template: String,
        op: String,
        known: String,
    },
    #[error("{qualified} is a {access} op; broker {broker} serves only {serves}")]
    WrongBroker {
        qualified: String,
        access: &'static str,
        broker: String,
        serves: String,
    },
    #[error("template {template:?} is served by {served_by}, not by broker {broker}")]
    TemplateElsewhere {
        template: String,
        broker: String,
        served_by: String,
    },
    #[error("caller {user} may not use template {template:?}")]
    Forbidden { template: String, user: String },
    #[error("{0}")]
    Validation(String),
    #[error("atomic batch: {0}")]
    AtomicBatch(String),
}

/// One op of a template, compiled for dispatch.
#[derive(Debug, Clone)]
pub struct Op {
    /// `template.op`, for messages and logs.
    pub qualified: String,
    /// Param names with their field specs, in call order.
    pub params: Vec<(String, FieldSpec)>,
    /// Parallel to `params`: must the client send it?
    pub required: Vec<bool>,
    /// Parallel to `params`: the value used when the client leaves it out.
    pub defaults: Vec<Option<Param>>,
    pub returns: Returns,
    pub access: Access,
    /// What runs, in the terms of the template's store.
    pub target: Target,
}

/// What an op runs, compiled once at load, per store.
#[derive(Debug, Clone)]
pub enum Target {
    /// MariaDB: a DBA-owned stored procedure.
    Procedure {
        name: String,
        /// `CALL proc(?, ?, …)`, built once so no request formats SQL;
        /// shared, so handing it to sqlx per request copies nothing.
        call_sql: sqlx::SqlStr,
    },
    /// MongoDB: an action on a collection with template-written documents.
    Mongo(Box<MongoOp>),
}

impl Op {
    /// The procedure's `CALL` statement, for MariaDB ops.
    pub fn call_sql(&self) -> Option<&sqlx::SqlStr> {
        match &self.target {
            Target::Procedure { call_sql, .. } => Some(call_sql),
            Target::Mongo(_) => None,
        }
    }

    pub fn mongo(&self) -> Option<&MongoOp> {
        match &self.target {
            Target::Mongo(m) => Some(m),
            Target::Procedure { .. } => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Template {
    pub name: String,
    pub store: Store,
    /// Key of the node config's `[databases]`.
    pub database: String,
    /// `None` = everyone; otherwise the AMQP user ids allowed.
    pub allow: Option<Vec<String>>,
    pub ops: BTreeMap<String, Op>,
    /// MongoDB: the collection and the indexes the DBA script creates,
    /// checked at IPL.
    pub collection: Option<String>,
    pub indexes: Vec<Index>,
}

impl Template {
    pub fn op(&self, name: &str) -> Result<&Op, RequestError> {
        self.ops
            .get(name)
            .ok_or_else(|| RequestError::UnknownOperation {
                template: self.name.clone(),
                op: name.to_string(),
                known: self.ops.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }

    /// CONTRACT §2: `user_id` is RabbitMQ-verified, so it is the identity the
    /// template's `allow` list is checked against.
    pub fn check_allowed(&self, user: Option<&str>) -> Result<(), RequestError> {
        let Some(allow) = &self.allow else {
            return Ok(());
        };
        if allow.iter().any(|a| a == "*" || Some(a.as_str()) == user) {
            return Ok(());
        }
        Err(RequestError::Forbidden {
            template: self.name.clone(),
            user: match user {
                Some(u) => format!("{u:?}"),
                None => "without user_id".into(),
            },
        })
    }
}

/// The immutable snapshot of all templates.
#[derive(Debug, Default)]
pub struct Registry {
    templates: HashMap<String, Arc<Template>>,
    /// Names of the folder's templates that this node's brokers do not
    /// serve (another role's): asked for here, they are `WRONG_BROKER`,
    /// not `UNKNOWN_TEMPLATE`.
    elsewhere: std::collections::HashSet<String>,
    /// Short hash of the loaded files' names and contents: nodes serving
    /// the same set report the same version (admin `status`, heartbeats).
    version: String,
}

impl Registry {
    pub fn get(&self, name: &str) -> Result<&Arc<Template>, RequestError> {
        self.templates
            .get(name)
            .ok_or_else(|| RequestError::UnknownTemplate(name.to_string()))
    }

    /// The template set version (12 hex digits of a SHA-256).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether `name` is a template of the folder served by another
    /// node's brokers.
    pub fn is_elsewhere(&self, name: &str) -> bool {
        self.elsewhere.contains(name)
    }

    pub fn len(&self) -> usize {
        self.templates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.templates.is_empty()
    }

    pub fn templates(&self) -> impl Iterator<Item = &Arc<Template>> {
        self.templates.values()
    }

    /// Loads every `*.toml` in `dir`. Returns every problem found, each
    /// naming its file, or the registry when there are none.
    pub fn load_dir(dir: &Path, config: &Config) -> Result<Registry, Vec<String>> {
        let mut problems = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                return Err(vec![format!(
                    "node.templates = {}: cannot read folder: {e}",
                    dir.display()
                )])
            }
        };
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        let mut reg = Registry::default();
        let mut origin: HashMap<String, String> = HashMap::new();
        let mut hash = <sha2::Sha256 as sha2::Digest>::new();
        for path in paths {
            let file = path.display().to_string();
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    problems.push(format!("{file}: cannot read: {e}"));
                    continue;
                }
            };
            // A template none of this node's brokers serves is another
            // role's: not loaded, so its database need not be reachable.
            if let Some(name) = template_name(&text) {
                if !config.node_serves_template(&name) {
                    tracing::debug!(template = %name, file = %file, "not served by this node's brokers; skipped");
                    reg.elsewhere.insert(name);
                    continue;
                }
            }
            match compile(&text, config) {
                Ok(t) => {
                    if let Some(first) = origin.get(&t.name) {
                        problems.push(format!(
                            "{file}: template name {:?} is already used by {first}",
                            t.name
                        ));
                        continue;
                    }
                    origin.insert(t.name.clone(), file);
                    sha2::Digest::update(&mut hash, t.name.as_bytes());
                    sha2::Digest::update(&mut hash, [0]);
                    sha2::Digest::update(&mut hash, text.as_bytes());
                    sha2::Digest::update(&mut hash, [0]);
                    reg.templates.insert(t.name.clone(), Arc::new(t));
                }
                Err(errs) => problems.extend(errs.into_iter().map(|e| format!("{file}: {e}"))),
            }
        }
        if problems.is_empty() {
            reg.version = sha2::Digest::finalize(hash)[..6]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            Ok(reg)
        } else {
            Err(problems)
        }
    }
}

/// The databases named by the templates in `dir` that this node's brokers
/// serve: the ones a node opens. Files that do not parse are skipped here;
/// loading them reports why.
pub fn databases_used(dir: &Path, config: &Config) -> std::collections::BTreeSet<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        name: String,
        database: String,
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Default::default();
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|t| toml::from_str::<Named>(&t).ok())
        .filter(|n| config.node_serves_template(&n.name))
        .map(|n| n.database)
        .collect()
}

/// The `name` of a template file, when it parses that far.
fn template_name(text: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        name: String,
    }
    toml::from_str::<Named>(text).ok().map(|n| n.name)
}

/// Parses and validates one template file.
pub fn compile(text: &str, config: &Config) -> Result<Template, Vec<String>> {
    let file: TemplateFile = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
    let mut p = Vec::new();
    if !is_template_name(&file.name) {
        p.push(format!(
            "name {:?}: must be 2-32 chars, [a-z] then [a-z0-9_]",
            file.name
        ));
    }
    if file.kind != "rec" {
        p.push(format!("kind {:?}: only \"rec\" is supported", file.kind));
    }
    match (file.store, &file.collection) {
        (Store::Mariadb, Some(_)) => {
            p.push("collection is a MongoDB key, not valid with store = \"mariadb\"".into())
        }
        (Store::Mariadb, None) if !file.indexes.is_empty() => {
            p.push("indexes is a MongoDB key, not valid with store = \"mariadb\"".into())
        }
        (Store::Mongodb, None) => p.push("collection is required for store = \"mongodb\"".into()),
        (Store::Mongodb, Some(c)) if !is_collection_name(c) => p.push(format!(
            "collection {c:?}: 1-120 characters, no '$', no NUL, not starting with \"system.\""
        )),
        _ => {}
    }
    let indexes: Vec<Index> = file
        .indexes
        .iter()
        .filter_map(|i| mongo::compile_index(i).map_err(|e| p.push(e)).ok())
        .collect();
    match config.databases.get(&file.database) {
        Some(db) if db.kind() != store_kind(file.store) => p.push(format!(
            "database {:?} is a {} database; store = \"{}\" needs a {} one",
            file.database,
            db.kind(),
            store_kind(file.store),
            store_kind(file.store)
        )),
        Some(_) => {}
        None => p.push(format!(
            "database {:?} is not a [databases] entry of the node config, or not one this node opened at start (a node opens the databases its templates use; restart it to open another) (open: {})",
            file.database,
            config
                .databases
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
    if let Some(allow) = &file.allow {
        if allow.is_empty() {
            p.push("allow = []: nobody could call this template; omit it or use [\"*\"]".into());
        }
    }
    for (name, f) in &file.fields {
        if !is_identifier(name) {
            p.push(format!("fields.{name}: not a valid field name"));
        }
        if f.max_len.is_some() && f.ty != FieldType::String && f.ty != FieldType::Json {
            p.push(format!("fields.{name}: max_len applies only to strings"));
        }
        if f.min.is_some_and(f64::is_nan) || f.max.is_some_and(f64::is_nan) {
            p.push(format!("fields.{name}: min/max must be numbers"));
        }
        let element = f.items.unwrap_or(f.ty);
        if f.items.is_some() && f.ty != FieldType::Json {
            p.push(format!("fields.{name}: items applies only to json fields"));
        }
        if f.items == Some(FieldType::Json) {
            p.push(format!(
                "fields.{name}: items = \"json\" says nothing; omit it"
            ));
        }
        if f.ty == FieldType::ObjectId && file.store != Store::Mongodb {
            p.push(format!("fields.{name}: object_id is a MongoDB type"));
        }
        if f.max_len.is_some() && element != FieldType::String && f.ty == FieldType::Json {
            p.push(format!("fields.{name}: max_len applies only to strings"));
        }
        if (f.min.is_some() || f.max.is_some())
            && !matches!(element, FieldType::Int | FieldType::Float)
        {
            p.push(format!(
                "fields.{name}: min/max apply only to int and float"
            ));
        }
    }
    if file.ops.is_empty() {
        p.push("no [ops.*] defined".into());
    }
    let mut ops = BTreeMap::new();
    for (op_name, spec) in &file.ops {
        let at = format!("ops.{op_name}");
        let uses_mongo_keys = spec.action.is_some()
            || spec.filter.is_some()
            || spec.document.is_some()
            || spec.update.is_some()
            || spec.sort.is_some()
            || spec.projection.is_some()
            || spec.limit.is_some()
            || spec.skip.is_some()
            || spec.pipeline.is_some();
        match file.store {
            Store::Mariadb if uses_mongo_keys => p.push(format!(
                "{at}: action/filter/document/update/sort/projection/limit/skip/pipeline are MongoDB keys, not valid with store = \"mariadb\""
            )),
            Store::Mongodb if spec.procedure.is_some() => p.push(format!(
                "{at}.procedure: a MariaDB key, not valid with store = \"mongodb\""
            )),
            _ => {}
        }
        let mut params = Vec::new();
        for name in &spec.params {
            match file.fields.get(name) {
                Some(f) if !params.iter().any(|(n, _): &(String, FieldSpec)| n == name) => {
                    params.push((name.clone(), f.clone()))
                }
                Some(_) => p.push(format!("{at}.params: {name:?} listed twice")),
                None => p.push(format!("{at}.params: {name:?} is not in [fields]")),
            }
        }
        let required: Vec<bool> = match &spec.required {
            None => vec![true; params.len()],
            Some(req) => {
                for r in req {
                    if !spec.params.contains(r) {
                        p.push(format!("{at}.required: {r:?} is not one of its params"));
                    }
                }
                params.iter().map(|(n, _)| req.contains(n)).collect()
            }
        };
        let mut defaults = vec![None; params.len()];
        for (name, value) in &spec.defaults {
            let Some(i) = params.iter().position(|(n, _)| n == name) else {
                p.push(format!("{at}.defaults: {name:?} is not one of its params"));
                continue;
            };
            if required[i] {
                p.push(format!(
                    "{at}.defaults: {name:?} is required, so its default would never apply"
                ));
            }
            let json = serde_json::to_value(value).unwrap_or(serde_json::Value::Null);
            match values::check(name, &params[i].1, &json, file.store) {
                Ok(v) => defaults[i] = Some(v),
                Err(e) => p.push(format!("{at}.defaults: {e}")),
            }
        }
        let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
        let target = match (file.store, &spec.procedure, &file.collection) {
            (Store::Mariadb, Some(proc_name), _) if is_identifier(proc_name) => {
                let placeholders = vec!["?"; params.len()].join(", ");
                Target::Procedure {
                    // Safe: the name and arity come from a validated template, never a request.
                    call_sql: sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(
                        std::sync::Arc::<str>::from(format!("CALL {proc_name}({placeholders})")),
                    )),
                    name: proc_name.clone(),
                }
            }
            (Store::Mariadb, Some(proc_name), _) => {
                p.push(format!(
                    "{at}.procedure {proc_name:?}: must be a plain identifier [A-Za-z_][A-Za-z0-9_]*"
                ));
                continue;
            }
            (Store::Mariadb, None, _) => {
                p.push(format!(
                    "{at}: procedure is required for store = \"mariadb\""
                ));
                continue;
            }
            (Store::Mongodb, _, collection) => {
                let collection = collection.as_deref().unwrap_or_default();
                match mongo::compile(spec, collection, &names, &at, &mut p) {
                    Some(m) => Target::Mongo(Box::new(m)),
                    None => continue,
                }
            }
        };
        ops.insert(
            op_name.clone(),
            Op {
                qualified: format!("{}.{op_name}", file.name),
                params,
                required,
                defaults,
                returns: spec.returns,
                access: spec.access,
                target,
            },
        );
        if !is_identifier(op_name) {
            p.push(format!("{at}: not a valid op name"));
        }
    }
    if !p.is_empty() {
        return Err(p);
    }
    let allow = match file.allow {
        Some(a) if a.iter().any(|x| x == "*") => None,
        other => other,
    };
    Ok(Template {
        name: file.name,
        store: file.store,
        database: file.database,
        allow,
        ops,
        collection: file.collection,
        indexes,
    })
}

fn store_kind(store: Store) -> &'static str {
    match store {
        Store::Mariadb => "mariadb",
        Store::Mongodb => "mongodb",
    }
}

/// MongoDB's rules for collection names, kept strict.
fn is_collection_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 120 && !s.contains(['$', '\0']) && !s.starts_with("system.")
}

pub fn is_template_name(s: &str) -> bool {
    let b = s.as_bytes();
    (2..=32).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

fn is_identifier(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_template_name("usr"));
        assert!(is_template_name("a1_b"));
        assert!(!is_template_name("u"));
        assert!(!is_template_name("Usr"));
        assert!(!is_template_name("1usr"));
        assert!(!is_template_name(&"a".repeat(33)));
        assert!(is_identifier("usr_read"));
        assert!(!is_identifier("usr_read; DROP TABLE usr"));
        assert!(!is_identifier("db.proc"));
    }
}
