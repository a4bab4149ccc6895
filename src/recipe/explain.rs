//! `trainer help recipe [KEY]`: every recipe key with its documentation, read from the schema's
//! own doc comments (`schema.rs`, embedded at build time), so the help and the code cannot
//! drift apart: each key's unit, default and the ms-swift / Megatron flag it replaces.

use crate::error::{Error, Result};

const SCHEMA: &str = include_str!("schema.rs");

/// One documented item of the schema: a field of a section struct, or a value of an enum.
#[derive(Debug, Clone, PartialEq)]
struct Item {
    name: String,
    /// The Rust type as written (fields), empty for enum values.
    ty: String,
    doc: String,
}

/// A struct or enum of the schema with its doc comment and items.
#[derive(Debug, Clone)]
struct Block {
    name: String,
    doc: String,
    is_enum: bool,
    items: Vec<Item>,
}

/// The structs and enums of the schema, as written.
fn blocks() -> Vec<Block> {
    let mut out = Vec::new();
    let mut doc: Vec<&str> = Vec::new();
    let mut current: Option<Block> = None;
    for line in SCHEMA.lines() {
        let t = line.trim();
        if t == "#[cfg(test)]" {
            break;
        }
        if let Some(d) = t.strip_prefix("///") {
            doc.push(d.strip_prefix(' ').unwrap_or(d));
            continue;
        }
        if t.starts_with("#[") || t.starts_with("//") {
            continue;
        }
        let text = doc.join("\n");
        doc.clear();
        if line.starts_with('}') {
            out.extend(current.take());
            continue;
        }
        for (prefix, is_enum) in [("pub struct ", false), ("pub enum ", true)] {
            if let Some(rest) = line.strip_prefix(prefix) {
                let name = rest.split([' ', '{', '<']).next().unwrap_or("").to_string();
                current = rest.trim_end().ends_with('{').then(|| Block { name, doc: text.clone(), is_enum, items: vec![] });
            }
        }
        let Some(block) = current.as_mut() else { continue };
        if block.is_enum {
            // `Variant,` (unit variants are the values a recipe writes, snake_case).
            if let Some(v) = t.strip_suffix(',').filter(|v| v.chars().all(|c| c.is_ascii_alphanumeric())) {
                block.items.push(Item { name: snake_case(v), ty: String::new(), doc: text });
            }
        } else if let Some((name, ty)) = t.strip_prefix("pub ").and_then(|f| f.split_once(": ")) {
            block.items.push(Item { name: name.to_string(), ty: ty.trim_end_matches(',').to_string(), doc: text });
        }
    }
    out
}

fn snake_case(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Every key's dotted path with its field and the block of its type when that is a struct
/// (a section) or an enum (its values), depth first from `Recipe`.
fn keys(blocks: &[Block]) -> Vec<(String, Item, Option<&Block>)> {
    fn walk<'b>(blocks: &'b [Block], block: &Block, prefix: &str, out: &mut Vec<(String, Item, Option<&'b Block>)>) {
        for item in &block.items {
            let path = if prefix.is_empty() { item.name.clone() } else { format!("{prefix}.{}", item.name) };
            let inner = item.ty.trim_start_matches("Option<").trim_start_matches("Vec<").trim_end_matches('>');
            let target = blocks.iter().find(|b| b.name == inner);
            out.push((path.clone(), item.clone(), target));
            if let Some(section) = target.filter(|b| !b.is_enum) {
                walk(blocks, section, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    if let Some(recipe) = blocks.iter().find(|b| b.name == "Recipe") {
        walk(blocks, recipe, "", &mut out);
    }
    out
}

/// The help text: every key (no `key`), or one key or section and what is under it.
pub fn explain(key: Option<&str>) -> Result<String> {
    let blocks = blocks();
    let all = keys(&blocks);
    let mut out = String::new();
    let show = |out: &mut String, path: &str, item: &Item, target: Option<&Block>, full: bool| {
        let ty = match target {
            Some(b) if !b.is_enum => "section".to_string(),
            Some(b) => b.items.iter().map(|v| format!("\"{}\"", v.name)).collect::<Vec<_>>().join(" | "),
            None => item.ty.clone(),
        };
        out.push_str(&format!("{path}  ({ty})\n"));
        let doc = match (item.doc.is_empty(), target) {
            (true, Some(b)) => b.doc.as_str(),
            _ => item.doc.as_str(),
        };
        let doc = if full { doc.to_string() } else { doc.split("\n\n").next().unwrap_or("").to_string() };
        for line in doc.lines() {
            out.push_str(&format!("    {line}\n"));
        }
        if let (true, Some(b)) = (full, target.filter(|b| b.is_enum)) {
            for v in &b.items {
                out.push_str(&format!("    \"{}\": {}\n", v.name, v.doc.replace('\n', " ")));
            }
        }
    };
    match key {
        None => {
            out.push_str("Recipe keys (TOML; `--set KEY=VALUE` overrides one). `trainer help recipe KEY` shows one in full.\n\n");
            for (path, item, target) in &all {
                show(&mut out, path, item, *target, false);
            }
        }
        Some(k) => {
            let matched: Vec<_> = all.iter().filter(|(p, _, _)| p == k || p.starts_with(&format!("{k}."))).collect();
            if matched.is_empty() {
                let mut near: Vec<(f64, &String)> = all.iter().map(|(p, _, _)| (strsim::jaro_winkler(p, k), p)).collect();
                near.sort_by(|a, b| b.0.total_cmp(&a.0));
                let near: Vec<&str> = near.iter().take(3).map(|(_, p)| p.as_str()).collect();
                return Err(Error::Unsupported(format!("`{k}` is not a recipe key; did you mean {}? `trainer help recipe` lists them all", near.join(", "))));
            }
            for (path, item, target) in matched {
                show(&mut out, path, item, *target, true);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_recipe_key_is_listed_with_its_documentation() {
        let text = explain(None).unwrap();
        // Keys the recipes use, each with a line of documentation.
        for key in ["device", "model.path", "lora.rank", "train.recompute.granularity", "optimizer.lr", "data.datasets", "logging.tensorboard", "parallel.expert"] {
            let at = text.find(&format!("\n{key}  (")).unwrap_or_else(|| panic!("{key} missing"));
            let next = text[at + 1..].lines().nth(1).unwrap_or("");
            assert!(next.starts_with("    ") && next.len() > 8, "{key} has no documentation: {next:?}");
        }
        let blocks = blocks();
        let listed = keys(&blocks);
        for field in blocks.iter().filter(|b| b.name.ends_with("Section")).flat_map(|b| &b.items) {
            assert!(!field.doc.is_empty() || listed.iter().any(|(_, i, t)| i == field && t.is_some()), "`{}` has no doc comment", field.name);
        }
        // A section shows its keys; an enum key its values.
        let lora = explain(Some("lora")).unwrap();
        assert!(lora.contains("lora.alpha  (") && lora.contains("lora.targets  ("), "{lora}");
        let device = explain(Some("device")).unwrap();
        assert!(device.contains("\"auto\" | \"cpu\" | \"cuda\"") && device.contains("\"cuda\": NVIDIA GPUs"), "{device}");
        let e = explain(Some("optimizer.learning_rate")).unwrap_err().to_string();
        assert!(e.contains("not a recipe key") && e.contains("optimizer.lr"), "{e}");
    }
}
