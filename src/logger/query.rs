//! Reading the event log: what `beds logs` (and later the admin tools) ask
//! of the collection. Works while every BEDS node is down.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::Collection;

use super::Event;

/// Filters of `beds logs tail`.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub template: Option<String>,
    pub op: Option<String>,
    pub status: Option<String>,
    pub code: Option<String>,
    pub node: Option<String>,
    /// Only events at or after this Unix ms.
    pub since_ms: Option<i64>,
    /// Only events after this one (for `--follow`): (ts, event id).
    pub after: Option<(i64, String)>,
}

impl Filter {
    fn to_document(&self) -> Document {
        let mut d = Document::new();
        for (k, v) in [
            ("template", &self.template),
            ("op", &self.op),
            ("status", &self.status),
            ("code", &self.code),
            ("node", &self.node),
        ] {
            if let Some(v) = v {
                d.insert(k, v.as_str());
            }
        }
        let mut ts = Document::new();
        if let Some(s) = self.since_ms {
            ts.insert("$gte", mongodb::bson::DateTime::from_millis(s));
        }
        if let Some((t, _)) = &self.after {
            ts.insert("$gte", mongodb::bson::DateTime::from_millis(*t));
        }
        if !ts.is_empty() {
            d.insert("ts", ts);
        }
        d
    }
}

/// The newest `limit` events matching `f`, returned oldest first.
pub async fn tail(
    coll: &Collection<Document>,
    f: &Filter,
    limit: i64,
) -> mongodb::error::Result<Vec<Event>> {
    let docs: Vec<Document> = coll
        .find(f.to_document())
        .sort(doc! {"ts": -1, "_id": -1})
        .limit(limit)
        .await?
        .try_collect()
        .await?;
    let mut out: Vec<Event> = docs.iter().map(Event::from_document).collect();
    if let Some((t, id)) = &f.after {
        out.retain(|e| (e.ts_ms, &e.event_id) > (*t, id));
    }
    out.reverse();
    Ok(out)
}

pub async fn show(
    coll: &Collection<Document>,
    id: &str,
) -> mongodb::error::Result<Option<Document>> {
    coll.find_one(doc! {"_id": id}).await
}

/// The whole chain `id` belongs to: one indexed query on its root, then
/// the tree in memory. `None` when `id` is unknown.
pub async fn chain(coll: &Collection<Document>, id: &str) -> mongodb::error::Result<Option<Chain>> {
    let Some(me) = coll.find_one(doc! {"_id": id}).await? else {
        return Ok(None);
    };
    let me = Event::from_document(&me);
    let root = me
        .root_event_id
        .clone()
        .unwrap_or_else(|| me.event_id.clone());
    let docs: Vec<Document> = coll
        .find(doc! {"root_event_id": &root})
        .sort(doc! {"ts": 1, "_id": 1})
        .await?
        .try_collect()
        .await?;
    let mut events: Vec<Event> = docs.iter().map(Event::from_document).collect();
    if !events.iter().any(|e| e.event_id == me.event_id) {
        events.push(me);
    }
    Ok(Some(Chain {
        asked: id.to_string(),
        root,
        events,
    }))
}

/// A chain of events and how they hang together.
#[derive(Debug)]
pub struct Chain {
    /// The event the chain was asked for.
    pub asked: String,
    pub root: String,
    /// Every event with this root, oldest first.
    pub events: Vec<Event>,
}

impl Chain {
    /// Children of each event id, in time order. Events whose parent is
    /// not in the chain hang under the root line.
    pub fn children(&self) -> BTreeMap<Option<&str>, Vec<&Event>> {
        let ids: Vec<&str> = self.events.iter().map(|e| e.event_id.as_str()).collect();
        let mut by: BTreeMap<Option<&str>, Vec<&Event>> = BTreeMap::new();
        for e in &self.events {
            let parent = e
                .parent_event_id
                .as_deref()
                .filter(|p| ids.contains(p) && *p != e.event_id);
            by.entry(parent).or_default().push(e);
        }
        by
    }

    /// The tree as indented lines: status, timing, errors marked with `!`,
    /// the asked-for event with `>`.
    pub fn render(&self) -> Vec<String> {
        let by = self.children();
        let mut out = Vec::new();
        fn walk<'a>(
            c: &Chain,
            by: &BTreeMap<Option<&'a str>, Vec<&'a Event>>,
            at: Option<&'a str>,
            depth: usize,
            out: &mut Vec<String>,
            seen: &mut Vec<&'a str>,
        ) {
            for e in by.get(&at).map(Vec::as_slice).unwrap_or_default() {
                if seen.contains(&e.event_id.as_str()) {
                    continue;
                }
                seen.push(&e.event_id);
                let mark = if e.event_id == c.asked {
                    ">"
                } else if e.status == "error" {
                    "!"
                } else {
                    " "
                };
                out.push(format!("{mark} {}{}", "  ".repeat(depth), line(e)));
                walk(c, by, Some(&e.event_id), depth + 1, out, seen);
            }
        }
        walk(self, &by, None, 0, &mut out, &mut Vec::new());
        out
    }
}

/// One event on one line: time, node, broker, template.op, status/code,
/// elapsed, event id.
pub fn line(e: &Event) -> String {
    let ts = chrono::DateTime::from_timestamp_millis(e.ts_ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
        .unwrap_or_default();
    let what = match (&e.template, &e.op) {
        (Some(t), Some(o)) => format!("{t}.{o}"),
        (None, Some(o)) => o.clone(),
        _ => "-".into(),
    };
    let status = match &e.code {
        Some(c) => format!("{}/{c}", e.status),
        None => e.status.clone(),
    };
    let extra = match (&e.outcome, e.kind.as_str()) {
        (Some(o), _) => format!(" ({o})"),
        (None, "lifecycle") => format!(" {}", e.message.as_deref().unwrap_or("")),
        _ => String::new(),
    };
    format!(
        "{ts} {} {} {what} {status} {:.1}ms {}{extra}",
        e.node,
        e.broker.as_deref().unwrap_or(&e.kind),
        e.elapsed_us as f64 / 1000.0,
        e.event_id
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str, parent: Option<&str>, status: &str) -> Event {
        Event {
            event_id: id.into(),
            parent_event_id: parent.map(str::to_string),
            status: status.into(),
            kind: "request".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_chain_renders_as_a_tree_with_errors_and_the_asked_event_marked() {
        let c = Chain {
            asked: "b".into(),
            root: "a".into(),
            events: vec![
                ev("a", None, "ok"),
                ev("b", Some("a"), "ok"),
                ev("c", Some("b"), "error"),
                ev("d", Some("a"), "ok"),
            ],
        };
        let lines = c.render();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("  ") && lines[0].contains(" a"));
        assert!(lines[1].starts_with(">   ") && lines[1].contains(" b"));
        assert!(lines[2].starts_with("!     ") && lines[2].contains(" c"));
        assert!(lines[3].starts_with("    ") && lines[3].contains(" d"));
    }
}
