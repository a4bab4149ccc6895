//! Reading a recipe: the `extends` chain, `--set` overrides, strict deserialisation, and
//! locating every error at the file, line and column (or override) a value came from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::{Table, Value};

use super::schema::Recipe;
use super::validate::validate;
use super::RecipeError;

/// A recipe as loaded, with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedRecipe {
    pub recipe: Recipe,
    /// The file given on the command line.
    pub source: PathBuf,
    /// Every file read, the base of the chain first.
    pub files: Vec<PathBuf>,
}

impl LoadedRecipe {
    /// The fully resolved recipe: every key with its value, defaults filled in, `extends`
    /// removed. Loading this text gives the same [`Recipe`].
    pub fn to_toml(&self) -> String {
        let mut r = self.recipe.clone();
        r.extends = None;
        toml::to_string_pretty(&r).unwrap_or_else(|e| format!("# cannot print the recipe: {e}\n"))
    }
}

/// Where a key's value was written.
#[derive(Debug, Clone)]
enum Origin {
    File { path: PathBuf, line: usize, col: usize },
    Override(String),
}

impl Origin {
    fn prefix(&self) -> String {
        match self {
            Origin::File { path, line, col } => format!("{}:{line}:{col}", path.display()),
            Origin::Override(arg) => format!("--set {arg}"),
        }
    }
}

/// Read `path` (and its `extends` chain), apply `overrides` (`KEY=VALUE`), and check it all.
pub fn load(path: &Path, overrides: &[String]) -> Result<LoadedRecipe, RecipeError> {
    let mut origins: HashMap<String, Origin> = HashMap::new();
    let mut files = Vec::new();
    let mut merged = read_chain(path, &mut files, &mut origins)?;
    files.reverse();
    merged.remove("extends");
    for arg in overrides {
        apply_override(&mut merged, arg, &mut origins)?;
    }
    let locate = |key: &str| -> String {
        let mut k = key.split('[').next().unwrap_or(key).to_string();
        loop {
            if let Some(o) = origins.get(&k) {
                return o.prefix();
            }
            match k.rfind('.') {
                Some(i) => k.truncate(i),
                None => return path.display().to_string(),
            }
        }
    };
    let recipe: Recipe = serde_path_to_error::deserialize(Value::Table(merged)).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner().message().to_string();
        RecipeError(describe(&key, &inner, &locate))
    })?;
    let recipe = validate(recipe).map_err(|(key, msg)| RecipeError(format!("{}: key `{key}`: {msg}", locate(&key))))?;
    Ok(LoadedRecipe { recipe, source: path.to_path_buf(), files })
}

/// Read `path` and the files it extends, deep-merged (base first), recording where each key
/// was written.
fn read_chain(path: &Path, seen: &mut Vec<PathBuf>, origins: &mut HashMap<String, Origin>) -> Result<Table, RecipeError> {
    let canon = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if seen.contains(&canon) {
        let chain: Vec<String> = seen.iter().map(|p| p.display().to_string()).collect();
        return Err(RecipeError(format!(
            "{}: `extends` makes a cycle: {} -> {}",
            path.display(),
            chain.join(" -> "),
            canon.display()
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| RecipeError(format!("{}: cannot read the recipe: {e}", path.display())))?;
    let doc = toml_edit::ImDocument::parse(text.as_str()).map_err(|e| {
        let (line, col) = e.span().map(|s| line_col(&text, s.start)).unwrap_or((1, 1));
        RecipeError(format!("{}:{line}:{col}: invalid TOML: {}", path.display(), e.message().trim()))
    })?;
    let table: Table = toml::from_str(&text)
        .map_err(|e| RecipeError(format!("{}: invalid TOML: {}", path.display(), e.message())))?;
    seen.push(canon);
    let mut merged = match table.get("extends") {
        Some(Value::String(base)) => {
            let base_path = path.parent().unwrap_or(Path::new(".")).join(base);
            read_chain(&base_path, seen, origins).map_err(|e| {
                if base_path.exists() {
                    e
                } else {
                    let (line, col) = key_pos(&doc, &text, "extends");
                    RecipeError(format!("{}:{line}:{col}: key `extends`: {}", path.display(), e.0))
                }
            })?
        }
        Some(other) => {
            let (line, col) = key_pos(&doc, &text, "extends");
            return Err(RecipeError(format!(
                "{}:{line}:{col}: key `extends`: expected a path string, found {}",
                path.display(),
                other.type_str()
            )));
        }
        None => Table::new(),
    };
    // Record this file's keys after its base's, so they win.
    record_origins(doc.as_table(), "", path, &text, origins);
    deep_merge(&mut merged, table);
    Ok(merged)
}

fn key_pos(doc: &toml_edit::ImDocument<&str>, text: &str, key: &str) -> (usize, usize) {
    doc.as_table().key(key).and_then(|k| k.span()).map(|s| line_col(text, s.start)).unwrap_or((1, 1))
}

fn record_origins(table: &dyn toml_edit::TableLike, prefix: &str, path: &Path, text: &str, origins: &mut HashMap<String, Origin>) {
    for (k, item) in table.iter() {
        let full = if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
        let pos = table
            .key(k)
            .and_then(|key| key.span())
            .or_else(|| item.span())
            .map(|s| line_col(text, s.start));
        if let Some((line, col)) = pos {
            origins.insert(full.clone(), Origin::File { path: path.to_path_buf(), line, col });
        }
        if let Some(t) = item.as_table_like() {
            record_origins(t, &full, path, text, origins);
        }
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, col)
}

/// `over` laid onto `base`: tables merge key by key, anything else replaces.
fn deep_merge(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => deep_merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Apply `KEY=VALUE`: VALUE is read as a TOML value, or taken as a bare string.
fn apply_override(merged: &mut Table, arg: &str, origins: &mut HashMap<String, Origin>) -> Result<(), RecipeError> {
    let Some((key, raw)) = arg.split_once('=') else {
        return Err(RecipeError(format!(
            "--set {arg}: expected KEY=VALUE, e.g. --set optimizer.lr=2e-4 or --set data.datasets='[\"a#100\"]'"
        )));
    };
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|p| p.is_empty()) {
        return Err(RecipeError(format!("--set {arg}: `{key}` is not a key path; expected e.g. `optimizer.lr`")));
    }
    let value = toml::from_str::<Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(raw.to_string()));
    let parts: Vec<&str> = key.split('.').collect();
    let mut table = merged;
    for (i, p) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = table.entry(p.to_string()).or_insert_with(|| Value::Table(Table::new()));
        table = match entry {
            Value::Table(t) => t,
            _ => {
                return Err(RecipeError(format!(
                    "--set {arg}: `{}` is a value, not a table, so `{key}` does not exist",
                    parts[..=i].join(".")
                )))
            }
        };
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    // The override now owns this key and everything under it.
    origins.retain(|k, _| !(k == key || k.starts_with(&format!("{key}."))));
    origins.insert(key.to_string(), Origin::Override(arg.to_string()));
    Ok(())
}

/// Turn serde's message about `key` into one naming the location and what would be valid.
fn describe(key: &str, inner: &str, locate: &dyn Fn(&str) -> String) -> String {
    if let Some(rest) = inner.strip_prefix("unknown field `") {
        let field = rest.split('`').next().unwrap_or("");
        // The path names the unknown key itself; its table is the path without the last part.
        let parent = match key.rsplit_once('.') {
            Some((p, _)) => p,
            None => "",
        };
        let full = if parent.is_empty() { field.to_string() } else { format!("{parent}.{field}") };
        let expected = expected_list(rest);
        let section = if parent.is_empty() { "the top level".to_string() } else { format!("[{parent}]") };
        let mut msg = format!("{}: unknown key `{full}` in {section}", locate(&full));
        if let Some(elsewhere) = section_of(field).filter(|s| *s != format!("[{parent}]")) {
            msg.push_str(&format!("; `{field}` belongs in {elsewhere}"));
        } else if let Some(s) = suggest(field, &expected) {
            msg.push_str(&format!("; did you mean `{s}`?"));
        }
        if !expected.is_empty() {
            msg.push_str(&format!(" (valid keys: {})", expected.join(", ")));
        }
        return msg;
    }
    let what = if key.is_empty() || key == "." { "recipe".to_string() } else { format!("key `{key}`") };
    format!("{}: {what}: {inner}", locate(key))
}

/// Field names from serde's "…, expected one of `a`, `b`" / "expected `a`" tail.
fn expected_list(msg: &str) -> Vec<String> {
    let Some(i) = msg.find("expected") else { return vec![] };
    msg[i..].split('`').skip(1).step_by(2).map(String::from).collect()
}

fn suggest(field: &str, candidates: &[String]) -> Option<String> {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(field, c), c))
        .filter(|(s, _)| *s >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.clone())
}

/// The valid keys of a table of the schema, found by asking serde with a probe key.
fn keys_of(section: Option<&str>) -> Vec<String> {
    let mut probe = Table::new();
    probe.insert("\u{1}probe".into(), Value::Integer(0));
    let value = match section {
        None => probe,
        Some(s) => {
            let mut t = Table::new();
            t.insert(s.into(), Value::Table(probe));
            t
        }
    };
    match Recipe::deserialize(Value::Table(value)) {
        Err(e) => expected_list(&e.to_string()),
        Ok(_) => vec![],
    }
}

/// The section (e.g. `[optimizer]`) whose key is exactly `field`, if any.
fn section_of(field: &str) -> Option<String> {
    keys_of(None)
        .into_iter()
        .filter(|s| !["extends", "device"].contains(&s.as_str()))
        .find(|s| keys_of(Some(s)).iter().any(|k| k == field))
        .map(|s| format!("[{s}]"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_count_from_one() {
        assert_eq!(line_col("a = 1\nbb = 2\n", 6), (2, 1));
        assert_eq!(line_col("a = 1\nbb = 2\n", 9), (2, 4));
    }

    #[test]
    fn schema_keys_come_from_serde() {
        let top = keys_of(None);
        assert!(top.contains(&"optimizer".to_string()) && top.contains(&"model".to_string()), "{top:?}");
        assert!(keys_of(Some("optimizer")).contains(&"lr".to_string()));
        assert_eq!(section_of("lr").as_deref(), Some("[optimizer]"));
        assert_eq!(section_of("nothing_like_it"), None);
    }

    #[test]
    fn merge_replaces_arrays_and_merges_tables() {
        let mut a: Table = toml::from_str("[x]\np = 1\nq = [1, 2]\n").unwrap();
        let b: Table = toml::from_str("[x]\nq = [3]\nr = 2\n").unwrap();
        deep_merge(&mut a, b);
        assert_eq!(a["x"]["p"].as_integer(), Some(1));
        assert_eq!(a["x"]["q"].as_array().map(|v| v.len()), Some(1));
        assert_eq!(a["x"]["r"].as_integer(), Some(2));
    }
}
