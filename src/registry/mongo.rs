//! MongoDB ops as a template writes them (CONTRACT §4), compiled once at
//! load into [`MongoOp`]: BSON shapes with holes where `"$param:<field>"`
//! stood. At run time the holes are filled with the validated, typed values
//! (never by parsing text), so a client can only ever supply a value.

use mongodb::bson::{self, Bson, Document};

use super::template::{IndexSpec, OpSpec, Returns};
use super::values::Param;
use crate::config::Access;

/// What a MongoDB op does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    FindOne,
    Find,
    InsertOne,
    UpdateOne,
    FindOneAndUpdate,
    DeleteOne,
    Aggregate,
}

impl Action {
    pub const ALL: [(&'static str, Action); 7] = [
        ("find_one", Action::FindOne),
        ("find", Action::Find),
        ("insert_one", Action::InsertOne),
        ("update_one", Action::UpdateOne),
        ("find_one_and_update", Action::FindOneAndUpdate),
        ("delete_one", Action::DeleteOne),
        ("aggregate", Action::Aggregate),
    ];

    fn parse(s: &str) -> Option<Action> {
        Action::ALL.iter().find(|(n, _)| *n == s).map(|(_, a)| *a)
    }

    /// Which template keys the action uses, required first.
    fn keys(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            Action::FindOne => (&["filter"], &["sort", "projection"]),
            Action::Find => (&["filter"], &["sort", "projection", "limit", "skip"]),
            Action::InsertOne => (&["document"], &[]),
            Action::UpdateOne => (&["filter", "update"], &[]),
            Action::FindOneAndUpdate => (&["filter", "update"], &["sort", "projection"]),
            Action::DeleteOne => (&["filter"], &[]),
            Action::Aggregate => (&["pipeline"], &[]),
        }
    }
}

/// A template-written BSON value with holes.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    Lit(Bson),
    /// The op's param at this index. `literal` wraps it in `$literal`
    /// because it sits where MongoDB would read a string as an expression
    /// (a `"$field"` path): aggregation stages and `$expr`.
    Param {
        index: usize,
        literal: bool,
    },
    /// The time the request runs, as a BSON date.
    Now,
    Doc(Vec<(String, Shape)>),
    Arr(Vec<Shape>),
}

/// One compiled MongoDB op.
#[derive(Debug, Clone)]
pub struct MongoOp {
    pub collection: String,
    pub action: Action,
    pub filter: Option<Shape>,
    pub document: Option<Shape>,
    pub update: Option<Shape>,
    pub sort: Option<Shape>,
    pub projection: Option<Shape>,
    pub limit: Option<Shape>,
    pub skip: Option<Shape>,
    pub pipeline: Option<Shape>,
}

/// An index as MongoDB lists it: key document in order, and uniqueness.
#[derive(Debug, Clone, PartialEq)]
pub struct Index {
    pub keys: Vec<(String, i32)>,
    pub unique: bool,
    /// TTL in seconds, for a TTL index.
    pub expire_after_secs: Option<u64>,
}

impl Index {
    pub fn describe(&self) -> String {
        let keys: Vec<String> = self.keys.iter().map(|(k, d)| format!("{k}: {d}")).collect();
        format!(
            "{{{}}}{}{}",
            keys.join(", "),
            if self.unique { " unique" } else { "" },
            self.expire_after_secs
                .map(|s| format!(" expireAfterSeconds {s}"))
                .unwrap_or_default()
        )
    }
}

pub fn compile_index(spec: &IndexSpec) -> Result<Index, String> {
    if spec.keys.is_empty() {
        return Err("indexes: keys is empty".into());
    }
    let keys = spec
        .keys
        .iter()
        .map(|k| match k.strip_prefix('-') {
            Some(k) if !k.is_empty() => Ok((k.to_string(), -1)),
            None if !k.is_empty() => Ok((k.clone(), 1)),
            _ => Err(format!("indexes: key {k:?} is empty")),
        })
        .collect::<Result<_, _>>()?;
    if spec.expire_after_secs.is_some() && spec.keys.len() != 1 {
        return Err("indexes: a TTL index (expire_after_secs) has exactly one key".into());
    }
    Ok(Index {
        keys,
        unique: spec.unique,
        expire_after_secs: spec.expire_after_secs,
    })
}

/// Stage operators whose arguments MongoDB reads as a query or a number,
/// not as expressions: params there are plain values.
const QUERY_STAGES: [&str; 3] = ["$match", "$limit", "$skip"];

/// Server-side JavaScript: refused in templates, so no value can ever reach
/// an interpreter.
const JAVASCRIPT: [&str; 3] = ["$where", "$function", "$accumulator"];

/// Compiles the MongoDB part of one op. `params` are the op's param names
/// in order; every problem is pushed to `p` prefixed with `at`.
pub fn compile(
    spec: &OpSpec,
    collection: &str,
    params: &[String],
    at: &str,
    p: &mut Vec<String>,
) -> Option<MongoOp> {
    let Some(name) = &spec.action else {
        p.push(format!(
            "{at}: action is required for store = \"mongodb\" (one of: {})",
            Action::ALL.map(|(n, _)| n).join(", ")
        ));
        return None;
    };
    let Some(action) = Action::parse(name) else {
        p.push(format!(
            "{at}.action {name:?}: expected one of {}",
            Action::ALL.map(|(n, _)| n).join(", ")
        ));
        return None;
    };
    let given: [(&str, &Option<toml::Value>); 8] = [
        ("filter", &spec.filter),
        ("document", &spec.document),
        ("update", &spec.update),
        ("sort", &spec.sort),
        ("projection", &spec.projection),
        ("limit", &spec.limit),
        ("skip", &spec.skip),
        ("pipeline", &spec.pipeline),
    ];
    let (required, optional) = action.keys();
    let mut shapes: [Option<Shape>; 8] = Default::default();
    let before = p.len();
    for (i, (key, value)) in given.iter().enumerate() {
        let allowed = required.contains(key) || optional.contains(key);
        match value {
            None if required.contains(key) => p.push(format!("{at}: action {name} needs {key}")),
            None => {}
            Some(_) if !allowed => p.push(format!("{at}.{key}: not used by action {name}")),
            Some(v) => {
                let cx = Cx {
                    params,
                    at: format!("{at}.{key}"),
                    // MongoDB 4.4+ reads projection values as expressions.
                    expr: *key == "projection",
                };
                let shape = match *key {
                    "pipeline" => compile_pipeline(v, &cx, p),
                    _ => compile_value(v, &cx, p),
                };
                let fits = match (*key, &shape) {
                    ("limit" | "skip", Shape::Lit(Bson::Int64(n))) => *n >= 0,
                    ("limit" | "skip", Shape::Param { .. }) => true,
                    ("limit" | "skip", _) => false,
                    ("pipeline", Shape::Arr(_)) => true,
                    ("pipeline", _) => false,
                    (_, Shape::Doc(_)) => true,
                    _ => false,
                };
                if !fits {
                    p.push(format!(
                        "{at}.{key}: expected {}",
                        match *key {
                            "limit" | "skip" => "a non-negative integer or \"$param:<field>\"",
                            "pipeline" => "an array of stages",
                            _ => "a table",
                        }
                    ));
                }
                shapes[i] = Some(shape);
            }
        }
    }
    let writes = matches!(
        action,
        Action::InsertOne | Action::UpdateOne | Action::FindOneAndUpdate | Action::DeleteOne
    ) || pipeline_writes(spec.pipeline.as_ref());
    if writes && spec.access != Access::Write {
        p.push(format!(
            "{at}: action {name} writes, so access must be \"write\" (it decides dedup, retries and the broker)"
        ));
    }
    if !writes && spec.access == Access::Write {
        p.push(format!(
            "{at}: action {name} only reads; use access = \"read\""
        ));
    }
    if matches!(action, Action::UpdateOne | Action::DeleteOne) && spec.returns == Returns::One {
        p.push(format!(
            "{at}: action {name} returns no document, so returns = \"one\" would always answer NOT_FOUND (use find_one_and_update, or returns = \"none\")"
        ));
    }
    if p.len() > before {
        return None;
    }
    let [filter, document, update, sort, projection, limit, skip, pipeline] = shapes;
    Some(MongoOp {
        collection: collection.to_string(),
        action,
        filter,
        document,
        update,
        sort,
        projection,
        limit,
        skip,
        pipeline,
    })
}

/// Whether a pipeline writes (`$out`, `$merge`).
fn pipeline_writes(pipeline: Option<&toml::Value>) -> bool {
    let Some(toml::Value::Array(stages)) = pipeline else {
        return false;
    };
    stages.iter().any(|s| {
        s.as_table()
            .is_some_and(|t| t.contains_key("$out") || t.contains_key("$merge"))
    })
}

/// Compile context: where we are, and whether strings there are expressions.
struct Cx<'a> {
    params: &'a [String],
    at: String,
    expr: bool,
}

impl Cx<'_> {
    fn child(&self, key: &str, expr: bool) -> Cx<'_> {
        Cx {
            params: self.params,
            at: format!("{}.{key}", self.at),
            expr: self.expr || expr,
        }
    }
}

fn compile_pipeline(v: &toml::Value, cx: &Cx, p: &mut Vec<String>) -> Shape {
    let toml::Value::Array(stages) = v else {
        return Shape::Lit(Bson::Null);
    };
    let mut out = Vec::with_capacity(stages.len());
    for (i, stage) in stages.iter().enumerate() {
        let at = cx.child(&i.to_string(), false);
        match stage {
            toml::Value::Table(t) if t.len() == 1 => {
                let (op, arg) = t.iter().next().expect("one key");
                let expr = !QUERY_STAGES.contains(&op.as_str());
                let arg = compile_value(arg, &at.child(op, expr), p);
                out.push(Shape::Doc(vec![(op.clone(), arg)]));
            }
            _ => p.push(format!(
                "{}: a stage is a table with exactly one operator key",
                at.at
            )),
        }
    }
    Shape::Arr(out)
}

fn compile_value(v: &toml::Value, cx: &Cx, p: &mut Vec<String>) -> Shape {
    match v {
        toml::Value::String(s) if s == "$now" => Shape::Now,
        toml::Value::String(s) => match s.strip_prefix("$param:") {
            Some(field) => match cx.params.iter().position(|n| n == field) {
                Some(index) => Shape::Param {
                    index,
                    literal: cx.expr,
                },
                None => {
                    p.push(format!(
                        "{}: {s:?} names no param of this op (params: {})",
                        cx.at,
                        cx.params.join(", ")
                    ));
                    Shape::Lit(Bson::Null)
                }
            },
            None => Shape::Lit(Bson::String(s.clone())),
        },
        toml::Value::Integer(i) => Shape::Lit(Bson::Int64(*i)),
        toml::Value::Float(f) => Shape::Lit(Bson::Double(*f)),
        toml::Value::Boolean(b) => Shape::Lit(Bson::Boolean(*b)),
        toml::Value::Datetime(d) => match chrono::DateTime::parse_from_rfc3339(&d.to_string()) {
            Ok(t) => Shape::Lit(Bson::DateTime(bson::DateTime::from_millis(
                t.timestamp_millis(),
            ))),
            Err(_) => {
                p.push(format!("{}: dates need a time and an offset", cx.at));
                Shape::Lit(Bson::Null)
            }
        },
        toml::Value::Array(a) => Shape::Arr(
            a.iter()
                .enumerate()
                .map(|(i, v)| compile_value(v, &cx.child(&i.to_string(), false), p))
                .collect(),
        ),
        toml::Value::Table(t) => Shape::Doc(
            t.iter()
                .map(|(k, v)| {
                    if JAVASCRIPT.contains(&k.as_str()) {
                        p.push(format!(
                            "{}.{k}: server-side JavaScript is not allowed in templates",
                            cx.at
                        ));
                    }
                    (k.clone(), compile_value(v, &cx.child(k, k == "$expr"), p))
                })
                .collect(),
        ),
    }
}

/// What to do with a param the request left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Absent {
    /// Leave its key out (documents and updates: the field stays as it is).
    Omit,
    /// An error naming the field (filters, pipelines, sorts, limits).
    Refuse,
}

/// Fills the holes of `shape`. `Ok(None)`: the value is absent and its key
/// is to be left out. `Err(i)`: param `i` is absent where it is refused.
pub fn render(
    shape: &Shape,
    params: &[Param],
    now: bson::DateTime,
    absent: Absent,
) -> Result<Option<Bson>, usize> {
    Ok(Some(match shape {
        Shape::Lit(b) => b.clone(),
        Shape::Now => Bson::DateTime(now),
        Shape::Param { index, literal } => {
            let value = match params.get(*index) {
                Some(Param::Null) | None => {
                    return match absent {
                        Absent::Omit => Ok(None),
                        Absent::Refuse => Err(*index),
                    }
                }
                Some(p) => to_bson(p),
            };
            if *literal {
                Bson::Document(bson::doc! { "$literal": value })
            } else {
                value
            }
        }
        Shape::Arr(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                if let Some(b) = render(item, params, now, absent)? {
                    out.push(b);
                }
            }
            Bson::Array(out)
        }
        Shape::Doc(entries) => {
            let mut out = Document::new();
            for (k, v) in entries {
                if let Some(b) = render(v, params, now, absent)? {
                    out.insert(k.clone(), b);
                }
            }
            // A sub-document all of whose values were left out is left out
            // too (`{a = {b = "$param:b"}}` must not write `a: {}`).
            if out.is_empty() && !entries.is_empty() && absent == Absent::Omit {
                return Ok(None);
            }
            Bson::Document(out)
        }
    }))
}

/// A validated param as BSON. Json values map key for key (their keys were
/// checked: none starts with `$` or holds a `.`).
pub fn to_bson(p: &Param) -> Bson {
    match p {
        Param::Null => Bson::Null,
        Param::Int(i) => Bson::Int64(*i),
        Param::Float(f) => Bson::Double(*f),
        Param::Bool(b) => Bson::Boolean(*b),
        Param::Str(s) => Bson::String(s.clone()),
        Param::DateTime(dt) => {
            Bson::DateTime(bson::DateTime::from_millis(dt.and_utc().timestamp_millis()))
        }
        Param::Json(v) => json_to_bson(v),
        Param::ObjectId(bytes) => Bson::ObjectId(bson::oid::ObjectId::from_bytes(*bytes)),
    }
}

fn json_to_bson(v: &serde_json::Value) -> Bson {
    use serde_json::Value;
    match v {
        Value::Null => Bson::Null,
        Value::Bool(b) => Bson::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Bson::Int64(i),
            None => Bson::Double(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Bson::String(s.clone()),
        Value::Array(a) => Bson::Array(a.iter().map(json_to_bson).collect()),
        Value::Object(o) => Bson::Document(
            o.iter()
                .map(|(k, v)| (k.clone(), json_to_bson(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(toml_text: &str, params: &[&str]) -> (Shape, Vec<String>) {
        let v: toml::Value = toml::from_str(toml_text).unwrap();
        let names: Vec<String> = params.iter().map(|s| s.to_string()).collect();
        let mut p = Vec::new();
        let cx = Cx {
            params: &names,
            at: "t".into(),
            expr: false,
        };
        let s = match v.get("pipeline") {
            Some(pl) => compile_pipeline(pl, &cx, &mut p),
            None => compile_value(&v, &cx, &mut p),
        };
        (s, p)
    }

    fn now() -> bson::DateTime {
        bson::DateTime::from_millis(0)
    }

    #[test]
    fn a_string_that_looks_like_an_operator_stays_a_string() {
        let (s, p) = shape(r#"title = "$param:t""#, &["t"]);
        assert!(p.is_empty(), "{p:?}");
        let doc = render(
            &s,
            &[Param::Str("{\"$gt\": \"\"}".into())],
            now(),
            Absent::Refuse,
        )
        .unwrap()
        .unwrap();
        assert_eq!(doc, Bson::Document(bson::doc! {"title": "{\"$gt\": \"\"}"}));
    }

    #[test]
    fn params_in_expression_stages_are_literals() {
        let (s, p) = shape(
            r#"pipeline = [{ "$match" = { u = "$param:u" } }, { "$set" = { x = "$param:u" } }]"#,
            &["u"],
        );
        assert!(p.is_empty(), "{p:?}");
        let b = render(&s, &[Param::Str("$title".into())], now(), Absent::Refuse)
            .unwrap()
            .unwrap();
        assert_eq!(
            b,
            Bson::Array(vec![
                Bson::Document(bson::doc! {"$match": {"u": "$title"}}),
                Bson::Document(bson::doc! {"$set": {"x": {"$literal": "$title"}}}),
            ])
        );
    }

    #[test]
    fn absent_params_are_omitted_or_refused() {
        let (s, _) = shape(
            r#"[x]
"$set" = { a = "$param:a", b = "$param:b" }"#,
            &["a", "b"],
        );
        let Shape::Doc(top) = s else { panic!() };
        let params = [Param::Int(1), Param::Null];
        let set = render(&top[0].1, &params, now(), Absent::Omit)
            .unwrap()
            .unwrap();
        assert_eq!(set, Bson::Document(bson::doc! {"$set": {"a": 1_i64}}));
        assert_eq!(render(&top[0].1, &params, now(), Absent::Refuse), Err(1));
    }

    fn op_problems(text: &str) -> Vec<String> {
        let spec: OpSpec = toml::from_str(text).unwrap();
        let mut p = Vec::new();
        compile(&spec, "c", &spec.params.clone(), "ops.x", &mut p);
        p
    }

    #[test]
    fn actions_must_match_their_access_and_returns() {
        let p = op_problems(
            r#"action = "insert_one"
access = "read"
document = { a = 1 }"#,
        );
        assert!(p.iter().any(|e| e.contains("must be \"write\"")), "{p:?}");
        let p = op_problems(
            r#"action = "aggregate"
access = "read"
pipeline = [{ "$merge" = "other" }]"#,
        );
        assert!(p.iter().any(|e| e.contains("must be \"write\"")), "{p:?}");
        let p = op_problems(
            r#"action = "find"
access = "write"
filter = {}"#,
        );
        assert!(p.iter().any(|e| e.contains("only reads")), "{p:?}");
        let p = op_problems(
            r#"action = "delete_one"
access = "write"
returns = "one"
filter = {}"#,
        );
        assert!(p.iter().any(|e| e.contains("NOT_FOUND")), "{p:?}");
        assert!(op_problems(
            r#"action = "delete_one"
access = "write"
returns = "none"
filter = {}"#
        )
        .is_empty());
    }

    #[test]
    fn projection_params_are_literals_and_emptied_documents_are_left_out() {
        let (s, _) = shape(r#"x = "$param:p""#, &["p"]);
        let Shape::Doc(top) = &s else { panic!() };
        assert_eq!(
            top[0].1,
            Shape::Param {
                index: 0,
                literal: false
            }
        );
        let spec: OpSpec = toml::from_str(
            r#"action = "find"
access = "read"
params = ["p"]
filter = {}
projection = { x = "$param:p" }"#,
        )
        .unwrap();
        let mut p = Vec::new();
        let m = compile(&spec, "c", &["p".to_string()], "ops.x", &mut p).unwrap();
        let Some(Shape::Doc(proj)) = &m.projection else {
            panic!()
        };
        assert_eq!(
            proj[0].1,
            Shape::Param {
                index: 0,
                literal: true
            }
        );

        let (s, _) = shape(
            r#"[u]
"$set" = { a = { b = "$param:b" }, c = 1 }"#,
            &["b"],
        );
        let Shape::Doc(top) = s else { panic!() };
        let set = render(&top[0].1, &[Param::Null], now(), Absent::Omit)
            .unwrap()
            .unwrap();
        assert_eq!(set, Bson::Document(bson::doc! {"$set": {"c": 1_i64}}));
    }

    #[test]
    fn javascript_and_unknown_params_are_template_errors() {
        let (_, p) = shape(r#""$where" = "$param:x""#, &["x"]);
        assert!(p.iter().any(|e| e.contains("JavaScript")), "{p:?}");
        let (_, p) = shape(r#"a = "$param:nope""#, &["x"]);
        assert!(p.iter().any(|e| e.contains("names no param")), "{p:?}");
    }
}
