//! The REC template file format (CONTRACT §4) as typed structs.
//!
//! Every struct rejects unknown keys so that an operator's typo is an IPL
//! error, not a silently ignored setting.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::Access;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateFile {
    /// Unique name clients put in `template`; 2-32 chars `[a-z][a-z0-9_]*`.
    pub name: String,
    /// Template family; only `rec` exists today.
    pub kind: String,
    #[serde(default)]
    pub description: Option<String>,
    pub store: Store,
    /// A key of the node config's `[databases]`.
    pub database: String,
    /// AMQP user ids allowed to call this template; `*` (the default) is all.
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    /// MongoDB templates only: the collection the ops work on.
    #[serde(default)]
    pub collection: Option<String>,
    /// MongoDB templates only: the indexes the DBA's script creates. BEDS
    /// checks they exist (IPL, `beds check --online`); it never creates them.
    #[serde(default)]
    pub indexes: Vec<IndexSpec>,
    /// The typed values a client may send.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldSpec>,
    pub ops: BTreeMap<String, OpSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Store {
    Mariadb,
    Mongodb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    Int,
    Float,
    Bool,
    String,
    Datetime,
    Json,
    /// MongoDB ObjectId: 24 lowercase hex characters on the wire.
    #[serde(rename = "object_id")]
    ObjectId,
}

impl FieldType {
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::Int => "integer",
            FieldType::Float => "float",
            FieldType::Bool => "bool",
            FieldType::String => "string",
            FieldType::Datetime => "datetime",
            FieldType::Json => "json",
            FieldType::ObjectId => "object_id (24 lowercase hex characters)",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    #[serde(rename = "type")]
    pub ty: FieldType,
    /// Marks the domain's key column (documentation and tooling; the
    /// procedure decides what a key means).
    #[serde(default)]
    pub key: bool,
    /// Strings: most characters (Unicode scalar values) accepted.
    #[serde(default)]
    pub max_len: Option<usize>,
    /// Numbers: smallest and largest value accepted.
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    /// Json fields: the value must be an array whose elements have this
    /// type (with this field's `max_len`, `min` and `max` applied to each).
    #[serde(default)]
    pub items: Option<FieldType>,
    #[serde(default)]
    pub description: Option<String>,
}

/// An index a MongoDB template relies on, as the DBA script creates it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexSpec {
    /// Key fields in order; `-name` is descending (`["user_id", "-created"]`).
    pub keys: Vec<String>,
    #[serde(default)]
    pub unique: bool,
    /// A TTL index: MongoDB removes a document this many seconds after
    /// the date in its (single) key field.
    pub expire_after_secs: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Returns {
    One,
    Many,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpSpec {
    /// MariaDB: the DBA-owned stored procedure to CALL.
    #[serde(default)]
    pub procedure: Option<String>,
    /// Fields passed to the procedure, in call order.
    #[serde(default)]
    pub params: Vec<String>,
    /// Params that must be present; default all of them.
    #[serde(default)]
    pub required: Option<Vec<String>>,
    #[serde(default = "default_returns")]
    pub returns: Returns,
    pub access: Access,
    #[serde(default)]
    pub description: Option<String>,
    /// Values used for params the request leaves out (`{ limit = 100 }`).
    #[serde(default)]
    pub defaults: BTreeMap<String, toml::Value>,
    /// MongoDB: what the op does (`find_one`, `find`, `insert_one`,
    /// `update_one`, `find_one_and_update`, `delete_one`, `aggregate`).
    #[serde(default)]
    pub action: Option<String>,
    /// MongoDB: the query selecting documents.
    #[serde(default)]
    pub filter: Option<toml::Value>,
    /// MongoDB `insert_one`: the document stored.
    #[serde(default)]
    pub document: Option<toml::Value>,
    /// MongoDB `update_one` / `find_one_and_update`: the update operators.
    #[serde(default)]
    pub update: Option<toml::Value>,
    /// MongoDB `find` / `find_one` / `find_one_and_update`: result order.
    #[serde(default)]
    pub sort: Option<toml::Value>,
    /// MongoDB: which fields rows carry.
    #[serde(default)]
    pub projection: Option<toml::Value>,
    /// MongoDB `find`: most documents returned, a number or `"$param:<field>"`.
    #[serde(default)]
    pub limit: Option<toml::Value>,
    /// MongoDB `find`: documents skipped first.
    #[serde(default)]
    pub skip: Option<toml::Value>,
    /// MongoDB `aggregate`: the stages.
    #[serde(default)]
    pub pipeline: Option<toml::Value>,
}

fn default_returns() -> Returns {
    Returns::Many
}
