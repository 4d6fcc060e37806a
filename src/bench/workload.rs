//! What `beds bench` sends: requests for one template, ops picked by the
//! `--mix` weights, field values generated from the template's field types,
//! key fields drawn from keys that exist in the database.

use rand::Rng;
use serde_json::{Map, Value};

use crate::registry::{FieldSpec, FieldType, Op, Returns, Template};

/// One op of the mix.
#[derive(Debug, Clone)]
pub struct MixOp {
    /// Op name within the template.
    pub name: String,
    /// The compiled op: param order, field types, access kind.
    pub op: Op,
    /// Relative weight from `--mix`.
    pub weight: u32,
}

/// Parses `read=90,create=10` (or a bare `read`) against the template.
pub fn parse_mix(spec: &str, template: &Template) -> Result<Vec<MixOp>, String> {
    let mut mix = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = match part.split_once('=') {
            Some((n, w)) => (
                n.trim(),
                w.trim()
                    .parse::<u32>()
                    .map_err(|_| format!("--mix: weight of {n:?} must be a whole number"))?,
            ),
            None => (part, 1),
        };
        let op = template.ops.get(name).ok_or_else(|| {
            let known: Vec<&str> = template.ops.keys().map(String::as_str).collect();
            format!(
                "--mix: template {} has no op {name:?} (it has {})",
                template.name,
                known.join(", ")
            )
        })?;
        if mix.iter().any(|m: &MixOp| m.name == name) {
            return Err(format!("--mix: op {name:?} is named twice"));
        }
        mix.push(MixOp {
            name: name.to_string(),
            op: op.clone(),
            weight,
        });
    }
    let total: u64 = mix.iter().map(|m| m.weight as u64).sum();
    if total == 0 || total > u32::MAX as u64 {
        return Err("--mix: the weights must add up to 1 .. 4294967295".into());
    }
    Ok(mix)
}

/// The requests of one bench run.
#[derive(Debug, Clone)]
pub struct Workload {
    pub template: String,
    pub mix: Vec<MixOp>,
    /// Operations per message: 1 sends plain BrokerPayloads, more sends the
    /// batch form (CONTRACT §2), all entries of one message the same op so
    /// the message has one access kind (and so one broker).
    pub batch: usize,
    /// The template's key field, if any: its values come from `keys`.
    pub key_field: Option<String>,
    /// Keys that exist, so reads find rows.
    pub keys: Vec<Value>,
    /// Sum of the mix weights.
    total_weight: u32,
}

/// One message to send: `entries.len()` operations of `mix[op]`.
#[derive(Debug)]
pub struct Job {
    pub op: usize,
    pub entries: Vec<Map<String, Value>>,
}

impl Workload {
    pub fn new(template: &Template, mix: Vec<MixOp>, batch: usize) -> Workload {
        let key_field = template_key(template);
        let total_weight = mix.iter().map(|m| m.weight).sum();
        Workload {
            template: template.name.clone(),
            mix,
            batch: batch.max(1),
            key_field,
            keys: Vec::new(),
            total_weight,
        }
    }

    /// Does any op of the mix take the key field (and so need existing keys)?
    pub fn needs_keys(&self) -> bool {
        let Some(k) = &self.key_field else {
            return false;
        };
        self.mix
            .iter()
            .any(|m| m.weight > 0 && m.op.params.iter().any(|(n, _)| n == k))
    }

    /// `read=90,create=10`, for reports.
    pub fn mix_label(&self) -> String {
        self.mix
            .iter()
            .map(|m| format!("{}={}", m.name, m.weight))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn job(&self, rng: &mut impl Rng) -> Job {
        let mut pick = rng.gen_range(0..self.total_weight);
        let mut op = 0;
        for (i, m) in self.mix.iter().enumerate() {
            if pick < m.weight {
                op = i;
                break;
            }
            pick -= m.weight;
        }
        let entries = (0..self.batch)
            .map(|_| self.data(&self.mix[op].op, rng))
            .collect();
        Job { op, entries }
    }

    /// Values for every param of `op` (optional ones too, so updates change
    /// something).
    pub fn data(&self, op: &Op, rng: &mut impl Rng) -> Map<String, Value> {
        let mut data = Map::with_capacity(op.params.len());
        for (name, spec) in &op.params {
            let v = if self.key_field.as_deref() == Some(name) && !self.keys.is_empty() {
                self.keys[rng.gen_range(0..self.keys.len())].clone()
            } else {
                generate(spec, rng)
            };
            data.insert(name.clone(), v);
        }
        data
    }

    /// The BrokerPayload (or batch) of `job`.
    pub fn body(&self, job: &Job) -> Vec<u8> {
        let op = &self.mix[job.op].name;
        let entry = |data: &Map<String, Value>| serde_json::json!({ "template": self.template, "op": op, "data": data });
        let v = if self.batch == 1 {
            entry(&job.entries[0])
        } else {
            Value::Object(Map::from_iter([(
                "batch".to_string(),
                Value::Array(job.entries.iter().map(entry).collect()),
            )]))
        };
        serde_json::to_vec(&v).unwrap_or_default()
    }
}

/// A value of the field's type within its bounds. Strings are random hex,
/// so fields with unique constraints (emails) do not collide.
fn generate(spec: &FieldSpec, rng: &mut impl Rng) -> Value {
    if let (FieldType::Json, Some(item)) = (spec.ty, spec.items) {
        let one = FieldSpec {
            ty: item,
            items: None,
            ..spec.clone()
        };
        return Value::Array(vec![generate(&one, rng)]);
    }
    let (ty, min, max, max_len) = (spec.ty, spec.min, spec.max, spec.max_len);
    let lo = min.unwrap_or(1.0);
    let hi = max.unwrap_or(lo + 1_000_000.0).max(lo);
    match ty {
        FieldType::Int => {
            let (a, b) = (lo.ceil() as i64, hi.floor() as i64);
            Value::from(if a < b { rng.gen_range(a..=b) } else { a })
        }
        FieldType::Float => serde_json::Number::from_f64(rng.gen_range(lo..=hi))
            .map(Value::Number)
            .unwrap_or(Value::Null),
        FieldType::Bool => Value::Bool(rng.gen()),
        FieldType::String => {
            let mut s = format!("b{:016x}", rng.gen::<u64>());
            s.truncate(max_len.unwrap_or(17).max(1));
            Value::String(s)
        }
        FieldType::Datetime => Value::String(chrono::Utc::now().to_rfc3339()),
        FieldType::Json => serde_json::json!({ "bench": rng.gen::<u32>() }),
        FieldType::ObjectId => Value::String(format!("{:024x}", rng.gen::<u128>() >> 32)),
    }
}

/// The template's key field (`key = true`), if it has exactly one.
fn template_key(template: &Template) -> Option<String> {
    let mut keys: Vec<&String> = template
        .ops
        .values()
        .flat_map(|o| o.params.iter())
        .filter(|(_, f)| f.key)
        .map(|(n, _)| n)
        .collect();
    keys.sort();
    keys.dedup();
    (keys.len() == 1).then(|| keys[0].clone())
}

/// The op that lists existing records: a read returning many rows that takes
/// no key and needs no params (`usr.list`). Int params with a `max` are set
/// to it (the largest page).
pub fn list_op(template: &Template, key: &str) -> Option<(String, Op, Map<String, Value>)> {
    template.ops.iter().find_map(|(name, op)| {
        let fits = op.access == crate::config::Access::Read
            && op.returns == Returns::Many
            && op.required.iter().all(|r| !r)
            && op.params.iter().all(|(n, _)| n != key);
        fits.then(|| {
            let data = op
                .params
                .iter()
                .filter(|(_, f)| f.ty == FieldType::Int && f.max.is_some())
                .map(|(n, f)| (n.clone(), Value::from(f.max.unwrap_or(0.0) as i64)))
                .collect();
            (name.clone(), op.clone(), data)
        })
    })
}

/// The op that creates a record: a write returning one row, not taking the
/// key (the database assigns it). `create` wins when several fit.
pub fn create_op(template: &Template, key: &str) -> Option<(String, Op)> {
    let fits = |op: &Op| {
        op.access == crate::config::Access::Write
            && op.returns == Returns::One
            && op.params.iter().all(|(n, _)| n != key)
    };
    template
        .ops
        .get("create")
        .filter(|op| fits(op))
        .map(|op| ("create".to_string(), op.clone()))
        .or_else(|| {
            template
                .ops
                .iter()
                .find(|(_, op)| fits(op))
                .map(|(n, op)| (n.clone(), op.clone()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::compile;

    /// The shipped config and `usr` template; placeholder secrets, since a
    /// fresh checkout has no env_dev.toml.
    /// The shipped `usr` template.
    fn usr() -> Template {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(root.join("templates/usr.toml")).unwrap();
        compile(&text, &crate::config::shipped_for_tests()).unwrap()
    }

    #[test]
    fn mix_parses_and_rejects_unknown_ops() {
        let t = usr();
        let mix = parse_mix("read=90, create=10", &t).unwrap();
        assert_eq!(mix.len(), 2);
        assert_eq!((mix[0].name.as_str(), mix[0].weight), ("read", 90));
        assert!(parse_mix("reed=1", &t)
            .unwrap_err()
            .contains("no op \"reed\""));
        assert!(parse_mix("read=0", &t).is_err());
        assert!(parse_mix("read=x", &t).is_err());
        assert!(parse_mix("read=4294967295,create=1", &t).is_err());
    }

    #[test]
    fn jobs_follow_the_template() {
        let t = usr();
        let mut w = Workload::new(&t, parse_mix("read", &t).unwrap(), 3);
        assert_eq!(w.key_field.as_deref(), Some("id"));
        assert!(w.needs_keys());
        w.keys = vec![Value::from(7)];
        let job = w.job(&mut rand::thread_rng());
        assert_eq!(job.entries.len(), 3);
        assert_eq!(job.entries[0]["id"], Value::from(7));
        let body: Value = serde_json::from_slice(&w.body(&job)).unwrap();
        assert_eq!(body["batch"][2]["op"], "read");
        let c = Workload::new(&t, parse_mix("create", &t).unwrap(), 1);
        assert!(!c.needs_keys());
        let job = c.job(&mut rand::thread_rng());
        assert!(job.entries[0]["email"].as_str().unwrap().len() <= 128);
        assert_eq!(list_op(&t, "id").unwrap().0, "list");
        assert_eq!(create_op(&t, "id").unwrap().0, "create");
    }
}
