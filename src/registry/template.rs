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
    #[serde(default)]
    pub description: Option<String>,
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
    /// MongoDB ops (reserved; the MongoDB adapter is not built yet).
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub filter: Option<toml::Value>,
    #[serde(default)]
    pub update: Option<toml::Value>,
    #[serde(default)]
    pub pipeline: Option<toml::Value>,
}

fn default_returns() -> Returns {
    Returns::Many
}
