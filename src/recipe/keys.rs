//! What the schema's keys are, found by asking serde itself (so the lists cannot drift from
//! the structs), and the messages built from them: "did you mean", "belongs in", and serde's
//! type errors reworded as "...; expected ...".

use serde::Deserialize;
use toml::{Table, Value};

use super::schema::Recipe;

/// A key no table of the schema has; serde names it in its "expected" list when rejecting it.
const PROBE: &str = "\u{1}probe";

/// The keys of the table at `path` (`[]` is the top level, `["train", "recompute"]` is
/// `[train.recompute]`), or None when `path` is not a table of the schema (a value, or a
/// free-form table such as `model.config`).
pub(super) fn keys_of(path: &[&str]) -> Option<Vec<String>> {
    let mut value = Table::new();
    value.insert(PROBE.into(), Value::Integer(0));
    for part in path.iter().rev() {
        let mut outer = Table::new();
        outer.insert((*part).to_string(), Value::Table(value));
        value = outer;
    }
    let message = Recipe::deserialize(Value::Table(value)).err()?.message().to_string();
    let rest = message.strip_prefix(&format!("unknown field `{PROBE}`"))?;
    Some(backticked(rest))
}

/// Every key of the schema as a dotted path, tables included, in schema order.
pub(super) fn all_keys() -> Vec<String> {
    fn walk(path: &mut Vec<String>, out: &mut Vec<String>) {
        let parts: Vec<&str> = path.iter().map(String::as_str).collect();
        for key in keys_of(&parts).unwrap_or_default() {
            path.push(key);
            out.push(path.join("."));
            walk(path, out);
            path.pop();
        }
    }
    let mut out = Vec::new();
    walk(&mut Vec::new(), &mut out);
    out
}

/// The strings between backticks in serde's "expected one of `a`, `b`" tail.
fn backticked(s: &str) -> Vec<String> {
    s.split('`').skip(1).step_by(2).map(String::from).collect()
}

/// How close two key names must be (Jaro-Winkler) to be suggested.
const CLOSE: f64 = 0.8;

fn closest<'a>(name: &str, candidates: impl Iterator<Item = (&'a str, &'a str)>) -> Option<&'a str> {
    candidates
        .map(|(short, full)| (strsim::jaro_winkler(name, short), full))
        .filter(|(score, _)| *score >= CLOSE)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, full)| full)
}

/// The message for `field`, unknown in the table at dotted path `table` ("" for the top
/// level): which table, a suggestion when one is close, and the table's valid keys.
pub(super) fn unknown_key(table: &str, field: &str) -> String {
    let parts: Vec<&str> = if table.is_empty() { vec![] } else { table.split('.').collect() };
    let valid = keys_of(&parts).unwrap_or_default();
    let full = if table.is_empty() { field.to_string() } else { format!("{table}.{field}") };
    let place = if table.is_empty() { "at the top level".to_string() } else { format!("in [{table}]") };
    let mut msg = format!("unknown key `{full}` {place}");

    let everywhere = all_keys();
    let split = |k: &str| -> (String, String) {
        match k.rsplit_once('.') {
            Some((t, f)) => (t.to_string(), f.to_string()),
            None => (String::new(), k.to_string()),
        }
    };
    let elsewhere: Vec<String> = everywhere
        .iter()
        .map(|k| split(k))
        .filter(|(t, f)| f == field && *t != table)
        .map(|(t, _)| if t.is_empty() { "the top level".to_string() } else { format!("[{t}]") })
        .collect();
    if !elsewhere.is_empty() {
        msg.push_str(&format!("; `{field}` belongs in {}", elsewhere.join(" or ")));
    } else if let Some(s) = closest(field, valid.iter().map(|k| (k.as_str(), k.as_str()))) {
        msg.push_str(&format!("; did you mean `{s}`?"));
    } else {
        let leaves: Vec<(&str, &str)> = everywhere
            .iter()
            .map(|k| (k.rsplit('.').next().unwrap_or(k), k.as_str()))
            .collect();
        if let Some(s) = closest(field, leaves.into_iter()) {
            msg.push_str(&format!("; did you mean `{s}`?"));
        }
    }
    if !valid.is_empty() {
        msg.push_str(&format!(" (valid keys: {})", valid.join(", ")));
    }
    msg
}

/// serde's "invalid type: string \"x\", expected usize" as "invalid type: string \"x\";
/// expected a whole number >= 0", naming what a TOML writer would type.
pub(super) fn reword(message: &str) -> String {
    let Some((what, expected)) = message.split_once(", expected ") else {
        return message.to_string();
    };
    let what = match what.strip_prefix("unknown variant ") {
        Some(v) => format!("unknown value {v}"),
        None => what.to_string(),
    };
    let expected = match expected {
        "usize" | "u64" | "u32" | "u16" | "u8" => "a whole number >= 0".to_string(),
        "f64" | "f32" => "a number".to_string(),
        "a boolean" => "true or false".to_string(),
        "a sequence" => "an array".to_string(),
        "a map" => "a table".to_string(),
        e if e.starts_with("struct ") => "a table".to_string(),
        e => e.to_string(),
    };
    format!("{what}; expected {expected}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_serde() {
        let top = keys_of(&[]).unwrap();
        assert!(top.iter().any(|k| k == "optimizer") && top.iter().any(|k| k == "extends"), "{top:?}");
        assert!(keys_of(&["optimizer"]).unwrap().iter().any(|k| k == "lr"));
        assert_eq!(keys_of(&["train", "recompute"]).unwrap(), ["granularity", "method", "num_layers"]);
        assert_eq!(keys_of(&["optimizer", "lr"]), None);
        assert_eq!(keys_of(&["model", "config"]), None);
        assert_eq!(keys_of(&["device"]), None);
        let all = all_keys();
        assert!(all.iter().any(|k| k == "train.recompute.num_layers"));
        assert!(all.iter().any(|k| k == "parallel.sequence_parallel"));
    }

    #[test]
    fn suggestions() {
        let m = unknown_key("optimizer", "weight_decy");
        assert!(m.contains("did you mean `weight_decay`?") && m.contains("(valid keys: name, lr, "), "{m}");
        let m = unknown_key("train", "lr");
        assert!(m.contains("`lr` belongs in [optimizer]"), "{m}");
        let m = unknown_key("train", "seed_");
        assert!(m.contains("did you mean `seed`?"), "{m}");
        let m = unknown_key("train", "lrr");
        assert!(m.contains("did you mean `optimizer.lr`?"), "{m}");
        let m = unknown_key("", "modle");
        assert!(m.starts_with("unknown key `modle` at the top level; did you mean `model`?"), "{m}");
        let m = unknown_key("data", "zzzzzz");
        assert!(!m.contains("did you mean") && m.contains("valid keys: datasets"), "{m}");
        let m = unknown_key("parallel", "seed");
        assert!(m.contains("`seed` belongs in [model] or [train]"), "{m}");
    }

    #[test]
    fn serde_messages_say_what_is_expected() {
        assert_eq!(reword("invalid type: string \"a\", expected usize"), "invalid type: string \"a\"; expected a whole number >= 0");
        assert_eq!(reword("invalid type: string \"a\", expected f64"), "invalid type: string \"a\"; expected a number");
        assert_eq!(
            reword("unknown variant `gpu`, expected one of `auto`, `cpu`, `cuda`"),
            "unknown value `gpu`; expected one of `auto`, `cpu`, `cuda`"
        );
        assert_eq!(reword("invalid type: integer `1`, expected struct TrainSection"), "invalid type: integer `1`; expected a table");
        assert_eq!(reword("something else"), "something else");
    }
}
