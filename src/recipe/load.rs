//! Reading a recipe: the `extends` chain, `--set` overrides, strict deserialisation, and
//! locating every error at the file, line and column (or the override) its value came from.
//!
//! Each file is parsed twice from the same text: with toml_edit, which keeps the byte span of
//! every key (recorded per dotted path in [`Origins`]), and with toml into a plain table. The
//! tables are deep-merged base first, overrides laid on top, and the result deserialised with
//! serde_path_to_error, whose path of the failing key is looked up in the origins.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

use super::keys;
use super::schema::Recipe;
use super::validate;
use super::RecipeError;

/// A recipe as loaded, with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedRecipe {
    /// Merged, overridden, validated; `extends` is None and `train.global_batch_size` is set.
    pub recipe: Recipe,
    /// The file given to [`load`].
    pub source: PathBuf,
    /// Every file read, the base of the `extends` chain first, `source` last; bases are named
    /// as `extends` resolves them (relative to the folder of the file naming them).
    pub files: Vec<PathBuf>,
}

impl LoadedRecipe {
    /// The fully resolved recipe as TOML: every key with its value, defaults filled in,
    /// `extends` removed (keys without a value, such as an unset `train.max_steps`, are left
    /// out). Loading this text gives the same [`Recipe`].
    pub fn to_toml(&self) -> String {
        let mut r = self.recipe.clone();
        r.extends = None;
        toml::to_string_pretty(&r).unwrap_or_else(|e| format!("# cannot print the resolved recipe: {e}\n"))
    }
}

/// Read `path` and the chain of files it `extends`, apply `overrides` (`KEY=VALUE`, later ones
/// win), deserialise strictly into [`Recipe`] and check every range and cross-field rule.
/// Errors name the file, line and column (or the `--set` argument) of the offending value.
pub fn load(path: &Path, overrides: &[String]) -> Result<LoadedRecipe, RecipeError> {
    let mut origins = Origins::new(path);
    let mut chain = Vec::new();
    let mut merged = read_chain(path, &mut chain, &mut origins)?;
    let files = chain.into_iter().rev().map(|(given, _)| given).collect();
    merged.remove("extends");
    for arg in overrides {
        apply_override(&mut merged, arg, &mut origins)?;
    }
    let recipe: Recipe = serde_path_to_error::deserialize(Value::Table(merged)).map_err(|e| {
        let key = e.path().to_string();
        let message = e.into_inner().message().to_string();
        RecipeError(describe(&key, &message, &origins))
    })?;
    let recipe = validate::check(recipe).map_err(|p| {
        RecipeError(format!("{}: key `{}`: {}", origins.locate(&p.key), p.key, p.message))
    })?;
    Ok(LoadedRecipe { recipe, source: path.to_path_buf(), files })
}

/// Where a key's value was written.
#[derive(Debug, Clone)]
enum Origin {
    File { path: PathBuf, line: usize, col: usize },
    Override(String),
}

/// The origin of every dotted key path (`optimizer.lr`, `data.datasets[2]`) of the merged
/// recipe; a key never written (a default) is blamed on its nearest written table, else on
/// the recipe file itself.
#[derive(Debug)]
struct Origins {
    fallback: PathBuf,
    map: HashMap<String, Origin>,
}

impl Origins {
    fn new(fallback: &Path) -> Self {
        Origins { fallback: fallback.to_path_buf(), map: HashMap::new() }
    }

    /// `FILE:LINE:COL` or `--set KEY=VALUE` for `key`.
    fn locate(&self, key: &str) -> String {
        let mut k = key;
        loop {
            match self.map.get(k) {
                Some(Origin::File { path, line, col }) => return format!("{}:{line}:{col}", path.display()),
                Some(Origin::Override(arg)) => return format!("--set {arg}"),
                None => match k.rfind(['.', '[']) {
                    Some(i) => k = &k[..i],
                    None => return self.fallback.display().to_string(),
                },
            }
        }
    }

    /// `key` was written again (a later file or an override): it and, unless it is a table
    /// that merges, everything under it now come from `origin`.
    fn set(&mut self, key: String, origin: Origin, replaces_children: bool) {
        if replaces_children {
            let (dot, bracket) = (format!("{key}."), format!("{key}["));
            self.map.retain(|k, _| !k.starts_with(&dot) && !k.starts_with(&bracket));
        }
        self.map.insert(key, origin);
    }

    /// Record every key of a parsed file under `prefix`.
    fn record(&mut self, table: &dyn toml_edit::TableLike, prefix: &str, file: &Path, text: &str) {
        for (k, item) in table.iter() {
            let full = if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
            let span = table.key(k).and_then(|key| key.span()).or_else(|| item.span());
            let sub_table = item.as_table_like();
            if let Some(span) = span {
                let (line, col) = line_col(text, span.start);
                self.set(full.clone(), Origin::File { path: file.to_path_buf(), line, col }, sub_table.is_none());
            }
            if let Some(t) = sub_table {
                self.record(t, &full, file, text);
            } else if let Some(array) = item.as_array() {
                for (i, v) in array.iter().enumerate() {
                    if let Some(span) = v.span() {
                        let (line, col) = line_col(text, span.start);
                        self.set(format!("{full}[{i}]"), Origin::File { path: file.to_path_buf(), line, col }, true);
                    }
                }
            }
        }
    }
}

/// 1-based line and column (in characters) of byte `offset` of `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut line_start = 0;
    let mut line = 1;
    for (i, c) in text.char_indices().take_while(|(i, _)| *i < offset) {
        if c == '\n' {
            line += 1;
            line_start = i + 1;
        }
    }
    let col = text.get(line_start..offset.min(text.len())).map_or(0, |s| s.chars().count()) + 1;
    (line, col)
}

/// Read `path` and the files it extends, deep-merged (base first), recording where each key
/// was written. `chain` gets each file read, as named and canonical (to find cycles), `path`
/// first.
fn read_chain(path: &Path, chain: &mut Vec<(PathBuf, PathBuf)>, origins: &mut Origins) -> Result<Table, RecipeError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| RecipeError(format!("{}: cannot read the recipe: {e}", path.display())))?;
    let doc = toml_edit::ImDocument::parse(text.as_str()).map_err(|e| {
        let (line, col) = e.span().map_or((1, 1), |s| line_col(&text, s.start));
        RecipeError(format!("{}:{line}:{col}: {}", path.display(), parse_message(e.message())))
    })?;
    let table: Table = toml::from_str(&text).map_err(|e| {
        let (line, col) = e.span().map_or((1, 1), |s| line_col(&text, s.start));
        RecipeError(format!("{}:{line}:{col}: {}", path.display(), parse_message(e.message())))
    })?;
    chain.push((path.to_path_buf(), canonical(path)));
    let extends_at = || {
        let (line, col) = doc
            .as_table()
            .key("extends")
            .and_then(|k| k.span())
            .map_or((1, 1), |s| line_col(&text, s.start));
        format!("{}:{line}:{col}: key `extends`", path.display())
    };
    let mut merged = match table.get("extends") {
        None => Table::new(),
        Some(Value::String(base)) => {
            let base_path = path.parent().unwrap_or(Path::new("")).join(base);
            if !base_path.is_file() {
                let reason = match std::fs::metadata(&base_path) {
                    Err(e) => e.to_string(),
                    Ok(_) => "not a file".to_string(),
                };
                return Err(RecipeError(format!(
                    "{}: cannot read the base recipe {}: {reason}; expected a path relative to the folder of {}",
                    extends_at(),
                    base_path.display(),
                    path.display()
                )));
            }
            let base_canonical = canonical(&base_path);
            if chain.iter().any(|(_, c)| *c == base_canonical) {
                let names: Vec<String> =
                    chain.iter().map(|(given, _)| given).chain([&base_path]).map(|p| p.display().to_string()).collect();
                return Err(RecipeError(format!(
                    "{}: `extends` makes a cycle: {}; expected a chain that ends in a recipe without `extends`",
                    extends_at(),
                    names.join(" -> ")
                )));
            }
            read_chain(&base_path, chain, origins)?
        }
        Some(other) => {
            return Err(RecipeError(format!(
                "{}: invalid type: {}; expected a string (the path of a base recipe)",
                extends_at(),
                other.type_str()
            )))
        }
    };
    // This file's keys are recorded after its base's, so they win.
    origins.record(doc.as_table(), "", path, &text);
    deep_merge(&mut merged, table);
    Ok(merged)
}

fn canonical(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

/// A TOML parser's message on one line, saying what the largest integer is when one was too big.
fn parse_message(message: &str) -> String {
    let m = one_line(message);
    if m.contains("number too large") {
        format!("{m}: the largest integer a recipe can hold is {}", i64::MAX)
    } else {
        m
    }
}

fn one_line(message: &str) -> String {
    message.trim().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}

/// `over` laid onto `base`: tables merge key by key, anything else (arrays included) replaces.
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

/// Apply `KEY=VALUE`: KEY is a dotted key path, VALUE a TOML value or else a bare string.
fn apply_override(merged: &mut Table, arg: &str, origins: &mut Origins) -> Result<(), RecipeError> {
    let bad = |why: String| RecipeError(format!("--set {arg}: {why}"));
    let Some((key, raw)) = arg.split_once('=') else {
        return Err(bad(
            "expected KEY=VALUE, e.g. --set optimizer.lr=2e-4 or --set 'data.datasets=[\"a#100\"]'".to_string(),
        ));
    };
    let parts: Vec<String> = toml_edit::Key::parse(key.trim())
        .map_err(|_| bad(format!("`{key}` is not a key path; expected KEY=VALUE with a KEY like `optimizer.lr`")))?
        .iter()
        .map(|k| k.get().to_string())
        .collect();
    let Some((last, tables)) = parts.split_last() else {
        return Err(bad("the key is empty; expected KEY=VALUE with a KEY like `optimizer.lr`".to_string()));
    };
    if parts.len() == 1 && last == "extends" {
        return Err(bad("`extends` can only be written in a recipe file; expected another key".to_string()));
    }
    let digits = raw.trim().trim_start_matches(['+', '-']);
    if !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit() || c == '_') && raw.trim().parse::<i64>().is_err() {
        return Err(bad(format!("{} is too large for an integer; the largest a recipe can hold is {}", raw.trim(), i64::MAX)));
    }
    let value = parse_value(raw);
    let mut table = merged;
    for (i, part) in tables.iter().enumerate() {
        if !table.contains_key(part) {
            // A table this override creates: errors inside it are the override's.
            origins.set(parts[..=i].join("."), Origin::Override(arg.to_string()), false);
        }
        let entry = table.entry(part.clone()).or_insert_with(|| Value::Table(Table::new()));
        table = match entry {
            Value::Table(t) => t,
            other => {
                return Err(bad(format!(
                    "`{}` is a {}, not a table, so it has no key `{}`",
                    parts[..=i].join("."),
                    other.type_str(),
                    parts[i + 1]
                )))
            }
        };
    }
    table.insert(last.clone(), value);
    origins.set(parts.join("."), Origin::Override(arg.to_string()), true);
    Ok(())
}

/// `2e-4`, `true`, `["a", "b"]`, `"x"` as TOML; anything else (`Be brief.`) as a string.
fn parse_value(raw: &str) -> Value {
    let parsed = toml::from_str::<Table>(&format!("v = {raw}"))
        .ok()
        .filter(|t| t.len() == 1)
        .and_then(|mut t| t.remove("v"));
    parsed.unwrap_or_else(|| Value::String(raw.to_string()))
}

/// serde's message about the key at `path`, located and reworded.
fn describe(path: &str, message: &str, origins: &Origins) -> String {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let field = rest.split('`').next().unwrap_or("");
        // serde_path_to_error's path ends with the unknown key itself.
        let table = match path.rsplit_once('.') {
            Some((t, _)) => t,
            None => "",
        };
        let full = if table.is_empty() { field.to_string() } else { format!("{table}.{field}") };
        return format!("{}: {}", origins.locate(&full), keys::unknown_key(table, field));
    }
    let what = if path.is_empty() || path == "." { "recipe".to_string() } else { format!("key `{path}`") };
    let mut reworded = keys::reword(message);
    if validate::must_be_positive(path) {
        reworded = reworded.replace("a whole number >= 0", "a whole number, 1 or more");
    }
    format!("{}: {what}: {reworded}", origins.locate(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_count_from_one_in_characters() {
        assert_eq!(line_col("a = 1\nbb = 2\n", 0), (1, 1));
        assert_eq!(line_col("a = 1\nbb = 2\n", 6), (2, 1));
        assert_eq!(line_col("a = 1\nbb = 2\n", 9), (2, 4));
        assert_eq!(line_col("é = 1\nx", 4), (1, 4));
    }

    #[test]
    fn merge_replaces_arrays_and_merges_tables() {
        let mut a: Table = toml::from_str("[x]\np = 1\nq = [1, 2]\n[x.y]\nz = 1\n").unwrap();
        let b: Table = toml::from_str("[x]\nq = [3]\nr = 2\n[x.y]\nw = 2\n").unwrap();
        deep_merge(&mut a, b);
        let expected: Table = toml::from_str("[x]\np = 1\nq = [3]\nr = 2\n[x.y]\nz = 1\nw = 2\n").unwrap();
        assert_eq!(a, expected);
    }

    #[test]
    fn override_values_are_toml_or_strings() {
        assert_eq!(parse_value("2e-4"), Value::Float(2e-4));
        assert_eq!(parse_value("true"), Value::Boolean(true));
        assert_eq!(parse_value("[\"a#5\", \"b\"]"), Value::Array(vec!["a#5".into(), "b".into()]));
        assert_eq!(parse_value("\"x y\""), Value::String("x y".into()));
        assert_eq!(parse_value("You are brief."), Value::String("You are brief.".into()));
        assert_eq!(parse_value("1\nz = 2"), Value::String("1\nz = 2".into()));
    }

    #[test]
    fn origins_follow_dotted_keys_arrays_and_replacement() {
        let text = "[train]\nrecompute.method = \"block\"\n[data]\ndatasets = [\n  \"a\",\n  \"b\",\n]\n";
        let doc = toml_edit::ImDocument::parse(text).unwrap();
        let mut o = Origins::new(Path::new("r.toml"));
        o.record(doc.as_table(), "", Path::new("r.toml"), text);
        assert_eq!(o.locate("train.recompute.method"), "r.toml:2:11");
        assert_eq!(o.locate("data.datasets[1]"), "r.toml:6:3");
        assert_eq!(o.locate("data.system"), "r.toml:3:2");
        assert_eq!(o.locate("optimizer.lr"), "r.toml");
        o.set("data.datasets".into(), Origin::Override("data.datasets=[]".into()), true);
        assert_eq!(o.locate("data.datasets[1]"), "--set data.datasets=[]");
    }
}
