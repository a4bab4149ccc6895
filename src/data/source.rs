//! Reading one `data.datasets` source: a local `.jsonl` (one row a line), `.json` (an array of
//! rows) or `.parquet` (see [`super::parquet`]) file, each row in one of ms-swift's three
//! shapes, detected per row and normalised to a [`Conversation`].
//!
//! A hub dataset id (`org/name`) is fetched by [`super::hub`] and read as its local files. CSV
//! and other formats are not read by this build: the error says which are.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// What a bad row message ends with: the shapes a row may have.
pub const EXPECTED_SHAPES: &str = "expected an alpaca row {\"instruction\", \"input\"?, \"output\", \"system\"?}, a \
     messages row {\"messages\": [{\"role\", \"content\"}]} or a sharegpt row {\"conversations\": [{\"from\", \"value\"}]}";

/// Who speaks a turn. The system prompt is not a turn: it lives in [`Conversation::system`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

impl Role {
    /// The ChatML role name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One training row, whatever its file shape: an optional system prompt and the turns in order.
/// Invariant (checked when reading): at least one assistant turn, none of them empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub system: Option<String>,
    pub turns: Vec<(Role, String)>,
}

/// The rows of one source and how many bad rows were skipped (always 0 unless `skip_bad_rows`).
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub rows: Vec<Conversation>,
    pub skipped: usize,
}

/// The files behind a `data.datasets` source (without its `#N`): the local file itself; for a
/// hub dataset id (`org/name`, not a local path) the training files fetched into the hub cache
/// (see [`super::hub`]); else an error naming the missing file.
pub fn resolve(source: &str) -> Result<Vec<PathBuf>> {
    let path = Path::new(source);
    if path.exists() {
        Ok(vec![path.to_path_buf()])
    } else if super::hub::looks_like_dataset_id(source) {
        super::hub::Hub::from_env().fetch(source)
    } else {
        Err(Error::file(source, "no such file (data.datasets names local .jsonl, .json or .parquet files, or hub datasets `org/name`)"))
    }
}

/// Read `source` (a `data.datasets` entry without its `#N`): every file [`resolve`] finds,
/// read with [`load_file`], rows concatenated in file order.
pub fn load(source: &str, skip_bad_rows: bool) -> Result<Loaded> {
    let mut all = Loaded { rows: Vec::new(), skipped: 0 };
    for path in resolve(source)? {
        let loaded = load_file(&path, skip_bad_rows)?;
        all.rows.extend(loaded.rows);
        all.skipped += loaded.skipped;
    }
    Ok(all)
}

/// Read one local file (relative to the working directory). A bad row is an error
/// `FILE:LINE: what; expected ...` (for `.json` arrays `FILE:element N:`, 0-based), or skipped
/// and counted when `skip_bad_rows`.
pub fn load_file(path: &Path, skip_bad_rows: bool) -> Result<Loaded> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    // Each entry: where the row is (for messages) and the parsed value or the parse error.
    let entries: Vec<(String, std::result::Result<Value, String>)> = match ext.as_str() {
        "jsonl" => read_text(path)?
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| (format!("{}", i + 1), serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))))
            .collect(),
        "json" => match serde_json::from_str::<Value>(&read_text(path)?) {
            Ok(Value::Array(items)) => {
                items.into_iter().enumerate().map(|(i, v)| (format!("element {i}"), Ok(v))).collect()
            }
            Ok(_) => return Err(Error::file(path, "is not a JSON array of rows; a .json source is `[row, row, ...]`")),
            Err(e) => return Err(Error::file(path, format!("is not JSON: {e}"))),
        },
        "parquet" => super::parquet::rows(path)?,
        _ => {
            return Err(Error::file(
                path,
                format!(
                    "`.{ext}` files are not read by this build (CSV and others are not supported); \
                     expected a .jsonl file (one row a line), a .json file (an array of rows) or a .parquet file"
                ),
            ))
        }
    };
    let mut rows = Vec::with_capacity(entries.len());
    let mut skipped = 0;
    for (place, entry) in entries {
        match entry.and_then(|v| parse_row(&v)) {
            Ok(row) => rows.push(row),
            Err(_) if skip_bad_rows => skipped += 1,
            Err(what) => return Err(Error::Data(format!("{}:{place}: {what}; {EXPECTED_SHAPES}", path.display()))),
        }
    }
    Ok(Loaded { rows, skipped })
}

/// The file as UTF-8 text, a leading byte-order mark dropped (editors on Windows write one);
/// bytes that are not UTF-8 (a Latin-1 or UTF-16 export) are an error naming the line.
fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    if bytes.starts_with(&[0xff, 0xfe]) || bytes.starts_with(&[0xfe, 0xff]) {
        return Err(Error::file(path, "is UTF-16 text; save it as UTF-8 (one JSON row a line for .jsonl)"));
    }
    let body = bytes.strip_prefix(&[0xef, 0xbb, 0xbf]).unwrap_or(&bytes);
    match std::str::from_utf8(body) {
        Ok(text) => Ok(text.to_string()),
        Err(e) => {
            let line = body[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
            Err(Error::Data(format!(
                "{}:{line}: byte {:#04x} is not UTF-8 (a Latin-1 or Windows-1252 file?); convert the file to UTF-8, e.g. \
                 `iconv -f latin1 -t utf-8`",
                path.display(),
                body[e.valid_up_to()]
            )))
        }
    }
}

/// One row to a conversation, or what is wrong with it (without the place or expected shapes).
pub fn parse_row(value: &Value) -> std::result::Result<Conversation, String> {
    let obj = value.as_object().ok_or_else(|| format!("row is {}, not an object", kind(value)))?;
    let mut system = optional_str(obj, "system")?.map(str::to_string);
    let turns = if let Some(messages) = obj.get("messages") {
        dialogue(messages, "messages", "role", "content", &mut system)?
    } else if let Some(conversations) = obj.get("conversations") {
        dialogue(conversations, "conversations", "from", "value", &mut system)?
    } else if obj.contains_key("instruction") || obj.contains_key("output") {
        let instruction = required_str(obj, "instruction")?;
        let output = required_str(obj, "output")?;
        let user = match optional_str(obj, "input")? {
            // ms-swift's alpaca preprocessor joins instruction and input with a newline.
            Some(input) if !input.is_empty() => format!("{instruction}\n{input}"),
            _ => instruction.to_string(),
        };
        vec![(Role::User, user), (Role::Assistant, output.to_string())]
    } else {
        return Err("row has none of the keys `messages`, `conversations`, `instruction`/`output`".into());
    };
    if !turns.iter().any(|(role, _)| *role == Role::Assistant) {
        return Err("row has no assistant turn".into());
    }
    if turns.iter().any(|(role, text)| *role == Role::Assistant && text.is_empty()) {
        return Err("row has an assistant turn with empty content".into());
    }
    Ok(Conversation { system, turns })
}

/// A `messages` / `conversations` list. A system message is only accepted first (the chat
/// template has no place for one mid-dialogue in training data).
fn dialogue(
    list: &Value,
    key: &str,
    role_key: &str,
    text_key: &str,
    system: &mut Option<String>,
) -> std::result::Result<Vec<(Role, String)>, String> {
    let items = list.as_array().ok_or_else(|| format!("`{key}` is {}, not an array", kind(list)))?;
    let mut turns = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let obj = item.as_object().ok_or_else(|| format!("`{key}[{i}]` is {}, not an object", kind(item)))?;
        let role = required_str(obj, role_key).map_err(|e| format!("`{key}[{i}]`: {e}"))?;
        let text = required_str(obj, text_key).map_err(|e| format!("`{key}[{i}]`: {e}"))?;
        let role = match role {
            "system" if i == 0 => {
                *system = Some(text.to_string());
                continue;
            }
            "system" => return Err(format!("`{key}[{i}]` is a system turn; only the first turn may be system")),
            "user" | "human" => Role::User,
            "assistant" | "gpt" => Role::Assistant,
            other => {
                return Err(format!(
                    "`{key}[{i}].{role_key}` is `{other}`; expected system, user/human or assistant/gpt"
                ))
            }
        };
        turns.push((role, text.to_string()));
    }
    Ok(turns)
}

fn required_str<'a>(obj: &'a Map<String, Value>, key: &str) -> std::result::Result<&'a str, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("`{key}` is {}, not a string", kind(other))),
        None => Err(format!("`{key}` is missing")),
    }
}

fn optional_str<'a>(obj: &'a Map<String, Value>, key: &str) -> std::result::Result<Option<&'a str>, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Null) | None => Ok(None),
        Some(other) => Err(format!("`{key}` is {}, not a string", kind(other))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }

    #[test]
    fn three_shapes_normalise_to_the_same_conversation() {
        let want = Conversation {
            system: Some("S".into()),
            turns: vec![(Role::User, "Q\nI".into()), (Role::Assistant, "A".into())],
        };
        let alpaca = json!({"system": "S", "instruction": "Q", "input": "I", "output": "A"});
        let messages = json!({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q\nI"},
            {"role": "assistant", "content": "A"}]});
        let sharegpt = json!({"system": "S", "conversations": [{"from": "human", "value": "Q\nI"},
            {"from": "gpt", "value": "A"}]});
        assert_eq!(parse_row(&alpaca).unwrap(), want);
        assert_eq!(parse_row(&messages).unwrap(), want);
        assert_eq!(parse_row(&sharegpt).unwrap(), want);
        let no_input = parse_row(&json!({"instruction": "Q", "input": "", "output": "A"})).unwrap();
        assert_eq!(no_input.turns[0].1, "Q");
        assert_eq!(no_input.system, None);
    }

    #[test]
    fn bad_rows_say_what_is_wrong() {
        let cases = [
            (json!([1]), "not an object"),
            (json!({"instruction": "Q"}), "`output` is missing"),
            (json!({"instruction": 3, "output": "A"}), "`instruction` is a number"),
            (json!({"messages": [{"role": "user", "content": "Q"}]}), "no assistant turn"),
            (json!({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": ""}]}), "empty content"),
            (json!({"messages": [{"role": "bot", "content": "Q"}]}), "`messages[0].role` is `bot`"),
            (json!({"text": "x"}), "none of the keys"),
        ];
        for (row, want) in cases {
            let err = parse_row(&row).unwrap_err();
            assert!(err.contains(want), "{row}: {err}");
        }
    }

    #[test]
    fn jsonl_errors_name_the_line_and_skipping_counts() {
        let dir = tempfile::tempdir().unwrap();
        let good = r#"{"instruction": "Q", "output": "A"}"#;
        let path = write(&dir, "a.jsonl", &format!("{good}\n\n{good}\n{{\"instruction\": \"Q\"}}\nnot json\n"));
        let err = load(&path, false).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{path}:4: `output` is missing; expected an alpaca row")), "{err}");
        let loaded = load(&path, true).unwrap();
        assert_eq!((loaded.rows.len(), loaded.skipped), (2, 2));
    }

    #[test]
    fn json_arrays_name_the_element() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "a.json", r#"[{"instruction": "Q", "output": "A"}, {"messages": 5}]"#);
        let err = load(&path, false).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{path}:element 1: `messages` is a number")), "{err}");
        let not_array = write(&dir, "b.json", r#"{"instruction": "Q", "output": "A"}"#);
        assert!(load(&not_array, false).unwrap_err().to_string().contains("not a JSON array"));
    }

    #[test]
    fn missing_files_and_other_formats_are_refused_with_advice() {
        let err = load("missing/data.jsonl", false).unwrap_err().to_string();
        assert!(err.contains("no such file"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let csv = write(&dir, "a.csv", "instruction,output\nQ,A\n");
        let err = load(&csv, false).unwrap_err().to_string();
        assert!(err.contains("`.csv` files are not read") && err.contains(".parquet file"), "{err}");
    }
}
