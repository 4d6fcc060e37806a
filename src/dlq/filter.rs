//! `--filter key=value` and `--group-by`: which parked messages a command
//! acts on, and how `list` counts them. Pure, so tested without servers.

use std::collections::BTreeMap;

use super::parked::Parked;

/// The keys `--filter` knows.
pub const KEYS: [&str; 6] = ["code", "template", "op", "message_id", "node", "event_id"];

/// One `key=value` condition. A value may hold `*` (any text); an empty
/// value matches messages without that field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub key: String,
    pub value: String,
}

impl Filter {
    pub fn parse(s: &str) -> Result<Filter, String> {
        let Some((k, v)) = s.split_once('=') else {
            return Err(format!(
                "bad filter {s:?}: expected key=value with key one of {}",
                KEYS.join(", ")
            ));
        };
        let key = k.trim();
        if !KEYS.contains(&key) {
            return Err(format!(
                "bad filter {s:?}: unknown key {key:?} (known: {})",
                KEYS.join(", ")
            ));
        }
        Ok(Filter {
            key: key.to_string(),
            value: v.trim().to_string(),
        })
    }

    /// Whether `m` passes. For a batch, `template` and `op` match when any
    /// entry does. `op` matches `op` alone or `template.op`.
    pub fn matches(&self, m: &Parked) -> bool {
        let one = |field: &Option<String>| match field {
            None => self.value.is_empty(),
            Some(f) => glob(&self.value, f),
        };
        match self.key.as_str() {
            "code" => one(&m.code),
            "message_id" => one(&m.message_id),
            "node" => one(&m.node),
            "event_id" => one(&m.event_id),
            "template" | "op" if m.ops.is_empty() => self.value.is_empty(),
            "template" => m.ops.iter().any(|o| {
                let t = o.split_once('.').map_or(o.as_str(), |(t, _)| t);
                glob(&self.value, t)
            }),
            "op" => m.ops.iter().any(|o| {
                let op = o.split_once('.').map_or(o.as_str(), |(_, op)| op);
                glob(&self.value, o) || glob(&self.value, op)
            }),
            _ => false,
        }
    }
}

/// Every filter passes (none given: everything passes).
pub fn selected(filters: &[Filter], m: &Parked) -> bool {
    filters.iter().all(|f| f.matches(m))
}

/// `*` matches any text, everything else itself; case-sensitive.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    text.ends_with(last)
}

/// What `list --group-by` counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupBy {
    /// The error code (`x-beds-error-code`).
    Code,
    /// The template(s) of the request.
    Template,
    /// `template.op` (a batch: every entry's).
    Op,
    /// The node that parked it (`x-beds-node`).
    Node,
}

impl GroupBy {
    fn key(self, m: &Parked) -> String {
        let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        match self {
            GroupBy::Code => or_dash(&m.code),
            GroupBy::Template => m.templates(),
            GroupBy::Op => m.what(),
            GroupBy::Node => or_dash(&m.node),
        }
    }
}

/// Counts per group, largest first, ties by name.
pub fn group(by: GroupBy, messages: &[Parked]) -> Vec<(String, usize)> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for m in messages {
        *counts.entry(by.key(m)).or_default() += 1;
    }
    let mut out: Vec<(String, usize)> = counts.into_iter().collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parked(code: Option<&str>, ops: &[&str], node: Option<&str>, mid: Option<&str>) -> Parked {
        Parked {
            n: 1,
            message_id: mid.map(String::from),
            ops: ops.iter().map(|s| s.to_string()).collect(),
            batch: ops.len() > 1,
            body_problem: None,
            code: code.map(String::from),
            error: None,
            node: node.map(String::from),
            event_id: None,
            parked_at_ms: None,
            attempt: None,
            replayed: 0,
            delivery_count: None,
            size: 10,
        }
    }

    #[test]
    fn parses_filters_and_refuses_bad_ones() {
        assert_eq!(
            Filter::parse("code=UNAVAILABLE").unwrap(),
            Filter {
                key: "code".into(),
                value: "UNAVAILABLE".into()
            }
        );
        assert_eq!(Filter::parse("message_id=").unwrap().value, "");
        assert_eq!(Filter::parse("op=a=b").unwrap().value, "a=b");
        let e = Filter::parse("code").unwrap_err();
        assert!(e.contains("expected key=value"), "{e}");
        let e = Filter::parse("colour=red").unwrap_err();
        assert!(e.contains("unknown key \"colour\""), "{e}");
        assert!(e.contains("message_id"), "lists the known keys: {e}");
    }

    #[test]
    fn filters_match_fields_ops_and_globs() {
        let m = parked(
            Some("UNAVAILABLE"),
            &["usr.create", "tst.flaky"],
            Some("n1"),
            Some("order-17"),
        );
        let f = |s: &str| Filter::parse(s).unwrap().matches(&m);
        assert!(f("code=UNAVAILABLE"));
        assert!(!f("code=INTERNAL"));
        assert!(f("template=tst"), "any entry of a batch");
        assert!(f("op=create"));
        assert!(f("op=usr.create"));
        assert!(!f("op=tst.create"));
        assert!(f("message_id=order-*"));
        assert!(!f("message_id="), "empty matches only a missing id");
        assert!(f("node=n*"));
        assert!(f("event_id="), "no event id");
        let none = parked(None, &[], None, None);
        assert!(Filter::parse("message_id=").unwrap().matches(&none));
        assert!(Filter::parse("template=").unwrap().matches(&none));
        assert!(!Filter::parse("template=*").unwrap().matches(&none));
        let all = [
            Filter::parse("code=UNAVAILABLE").unwrap(),
            Filter::parse("template=usr").unwrap(),
        ];
        assert!(selected(&all, &m));
        assert!(!selected(&all, &none));
        assert!(selected(&[], &none), "no filter selects everything");
    }

    #[test]
    fn globs() {
        assert!(glob("a*c", "abc"));
        assert!(glob("a*c", "ac"));
        assert!(!glob("a*c", "a"));
        assert!(glob("*", ""));
        assert!(glob("*b*", "abc"));
        assert!(!glob("*x*", "abc"));
        assert!(glob("a*b*c", "aXbYc"));
        assert!(!glob("a*b*c", "aXcYb"));
        assert!(!glob("abc", "abcd"));
    }

    #[test]
    fn groups_count_largest_first() {
        let ms = [
            parked(Some("UNAVAILABLE"), &["usr.create"], Some("n1"), None),
            parked(Some("INTERNAL"), &["usr.create"], Some("n2"), None),
            parked(
                Some("UNAVAILABLE"),
                &["tst.flaky", "usr.create"],
                None,
                None,
            ),
        ];
        assert_eq!(
            group(GroupBy::Code, &ms),
            vec![("UNAVAILABLE".into(), 2), ("INTERNAL".into(), 1)]
        );
        assert_eq!(
            group(GroupBy::Template, &ms),
            vec![("usr".into(), 2), ("tst+usr".into(), 1)]
        );
        assert_eq!(
            group(GroupBy::Node, &ms),
            vec![("-".into(), 1), ("n1".into(), 1), ("n2".into(), 1)]
        );
        assert_eq!(group(GroupBy::Op, &ms)[0], ("usr.create".into(), 2));
    }
}
