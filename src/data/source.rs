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

/// Who speaks a message, in the chat template's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool's result (`role = "tool"`), answering the assistant's `tool_calls`.
    Tool,
}

impl Role {
    /// The role name the chat templates test for.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One message as the chat template receives it: `role` (one of [`Role`]'s names) and
/// `content` always, and every other key of the row's own message as given (`reasoning_content`,
/// `tool_calls`, `name`, ...): templates test for keys (`'tool_calls' in message`), so absent keys
/// stay absent.
pub type Message = Map<String, Value>;

/// One training row, whatever its file shape: the messages in order (a system prompt, if any,
/// first) and the row's `tools` (function definitions) for templates that render them.
/// Invariant (checked when reading): at least one assistant message, none of them empty (no
/// content, reasoning or tool calls).
#[derive(Debug, Clone)]
pub struct Conversation {
    pub messages: Vec<Message>,
    pub tools: Option<Value>,
    /// Where the row was read (`FILE:LINE`, `FILE:element N`, `FILE:row N`), for messages about
    /// it; empty for rows made in code. Not part of equality.
    pub place: String,
}

impl PartialEq for Conversation {
    fn eq(&self, other: &Self) -> bool {
        self.messages == other.messages && self.tools == other.tools
    }
}

impl Eq for Conversation {}

impl Conversation {
    /// A plain conversation: an optional system prompt, then `(role, content)` turns.
    pub fn new(system: Option<&str>, turns: &[(Role, &str)]) -> Self {
        let mut messages: Vec<Message> = system.map(|s| message(Role::System, s)).into_iter().collect();
        messages.extend(turns.iter().map(|(role, text)| message(*role, text)));
        Conversation { messages, tools: None, place: String::new() }
    }

    /// The system prompt, if the first message is one.
    pub fn system(&self) -> Option<&str> {
        self.messages.first().filter(|m| role_of(m) == Some(Role::System)).and_then(|m| m.get("content")?.as_str())
    }

    /// Make `text` the system prompt when there is none.
    pub fn set_default_system(&mut self, text: &str) {
        if self.system().is_none() {
            self.messages.insert(0, message(Role::System, text));
        }
    }

    /// Each message's role, in order.
    pub fn roles(&self) -> impl Iterator<Item = Option<Role>> + '_ {
        self.messages.iter().map(role_of)
    }
}

/// `{"role": role, "content": text}`.
pub fn message(role: Role, text: &str) -> Message {
    let mut m = Map::new();
    m.insert("role".into(), Value::String(role.as_str().into()));
    m.insert("content".into(), Value::String(text.into()));
    m
}

/// A message's role, `None` if it is none of [`Role`]'s names.
pub fn role_of(m: &Message) -> Option<Role> {
    match m.get("role")?.as_str()? {
        "system" => Some(Role::System),
        "user" => Some(Role::User),
        "assistant" => Some(Role::Assistant),
        "tool" => Some(Role::Tool),
        _ => None,
    }
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
            Ok(mut row) => {
                row.place = format!("{}:{place}", path.display());
                rows.push(row)
            }
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
    let system = optional_str(obj, "system")?;
    let mut messages = if let Some(messages) = obj.get("messages") {
        dialogue(messages, "messages", "role", "content")?
    } else if let Some(conversations) = obj.get("conversations") {
        dialogue(conversations, "conversations", "from", "value")?
    } else if obj.contains_key("instruction") || obj.contains_key("output") {
        let instruction = required_str(obj, "instruction")?;
        let output = required_str(obj, "output")?;
        let user = match optional_str(obj, "input")? {
            // ms-swift's alpaca preprocessor joins instruction and input with a newline.
            Some(input) if !input.is_empty() => format!("{instruction}\n{input}"),
            _ => instruction.to_string(),
        };
        vec![message(Role::User, &user), message(Role::Assistant, output)]
    } else {
        return Err("row has none of the keys `messages`, `conversations`, `instruction`/`output`".into());
    };
    if let Some(system) = system {
        if messages.first().and_then(role_of) == Some(Role::System) {
            return Err("row has both a `system` key and a system message; keep one".into());
        }
        messages.insert(0, message(Role::System, system));
    }
    let assistants: Vec<&Message> = messages.iter().filter(|m| role_of(m) == Some(Role::Assistant)).collect();
    if assistants.is_empty() {
        return Err("row has no assistant turn".into());
    }
    let filled = |m: &Message, key: &str| match m.get(key) {
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Null) | None => false,
        Some(_) => true,
    };
    if assistants.iter().any(|m| !filled(m, "content") && !filled(m, "reasoning_content") && !filled(m, "tool_calls")) {
        return Err("row has an assistant turn with empty content".into());
    }
    let tools = match obj.get("tools") {
        None | Some(Value::Null) => None,
        // Datasets often store the tool list as a JSON string (ms-swift reads both).
        Some(Value::String(s)) => Some(serde_json::from_str(s).map_err(|e| format!("`tools` is a string but not JSON: {e}"))?),
        Some(v @ Value::Array(_)) => Some(v.clone()),
        Some(other) => return Err(format!("`tools` is {}, not an array of function definitions", kind(other))),
    };
    Ok(Conversation { messages, tools, place: String::new() })
}

/// A `messages` / `conversations` list: each item's role (`role_key`, sharegpt's `human` /
/// `gpt` / `function_call` / `observation` named as the templates name them) and text
/// (`text_key`, renamed `content`); its other keys kept as they are. A system message is only
/// accepted first.
fn dialogue(list: &Value, key: &str, role_key: &str, text_key: &str) -> std::result::Result<Vec<Message>, String> {
    let items = list.as_array().ok_or_else(|| format!("`{key}` is {}, not an array", kind(list)))?;
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let obj = item.as_object().ok_or_else(|| format!("`{key}[{i}]` is {}, not an object", kind(item)))?;
        let role = required_str(obj, role_key).map_err(|e| format!("`{key}[{i}]`: {e}"))?;
        let role = match role {
            "system" if i == 0 => Role::System,
            "system" => return Err(format!("`{key}[{i}]` is a system turn; only the first turn may be system")),
            "user" | "human" => Role::User,
            "assistant" | "gpt" | "function_call" => Role::Assistant,
            "tool" | "observation" | "function" | "tool_response" => Role::Tool,
            other => {
                return Err(format!(
                    "`{key}[{i}].{role_key}` is `{other}`; expected system, user/human, assistant/gpt or tool/observation"
                ))
            }
        };
        let mut m = Map::new();
        m.insert("role".into(), Value::String(role.as_str().into()));
        match obj.get(text_key) {
            Some(Value::String(s)) => {
                m.insert("content".into(), Value::String(s.clone()));
            }
            // An assistant message that only calls tools may carry no content (OpenAI's shape).
            Some(Value::Null) | None if role == Role::Assistant && obj.contains_key("tool_calls") => {
                m.insert("content".into(), Value::String(String::new()));
            }
            Some(other) if role == Role::Tool => {
                // A tool result given as JSON: the templates print it as text.
                m.insert("content".into(), Value::String(other.to_string()));
            }
            Some(other) => return Err(format!("`{key}[{i}]`: `{text_key}` is {}, not a string", kind(other))),
            None => return Err(format!("`{key}[{i}]`: `{text_key}` is missing")),
        }
        for (k, v) in obj {
            if ![role_key, text_key, "role", "content"].contains(&k.as_str()) {
                m.insert(k.clone(), v.clone());
            }
        }
        if let Some(calls) = m.get_mut("tool_calls") {
            normalise_tool_calls(calls).map_err(|e| format!("`{key}[{i}].tool_calls`: {e}"))?;
        }
        messages.push(m);
    }
    Ok(messages)
}

/// Tool calls as the templates read them: a list of `{"type": "function", "function": {"name",
/// "arguments"}}`, arguments an object (a JSON string is parsed, as transformers' users do
/// before `apply_chat_template`; one that is not JSON stays a string, which the Qwen templates
/// print as is).
fn normalise_tool_calls(calls: &mut Value) -> std::result::Result<(), String> {
    if let Value::String(s) = calls {
        *calls = serde_json::from_str(s).map_err(|e| format!("a string but not JSON: {e}"))?;
    }
    let list = calls.as_array_mut().ok_or("not a list of calls")?;
    for call in list {
        if !call.is_object() {
            return Err("a call is not an object".into());
        }
        let function = if call.get("function").is_some() { &mut call["function"] } else { call };
        if let Some(function) = function.as_object_mut() {
            if let Some(Value::String(args)) = function.get("arguments") {
                if let Ok(parsed @ Value::Object(_)) = serde_json::from_str::<Value>(args) {
                    function.insert("arguments".into(), parsed);
                }
            }
        }
    }
    Ok(())
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
        let want = Conversation::new(Some("S"), &[(Role::User, "Q\nI"), (Role::Assistant, "A")]);
        let alpaca = json!({"system": "S", "instruction": "Q", "input": "I", "output": "A"});
        let messages = json!({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q\nI"},
            {"role": "assistant", "content": "A"}]});
        let sharegpt = json!({"system": "S", "conversations": [{"from": "human", "value": "Q\nI"},
            {"from": "gpt", "value": "A"}]});
        assert_eq!(parse_row(&alpaca).unwrap(), want);
        assert_eq!(parse_row(&messages).unwrap(), want);
        assert_eq!(parse_row(&sharegpt).unwrap(), want);
        let no_input = parse_row(&json!({"instruction": "Q", "input": "", "output": "A"})).unwrap();
        assert_eq!(no_input.messages[0]["content"], "Q");
        assert_eq!(no_input.system(), None);
    }

    #[test]
    fn messages_keep_their_own_keys_and_tool_calls_are_normalised() {
        let row = json!({"tools": "[{\"type\": \"function\", \"function\": {\"name\": \"f\"}}]", "messages": [
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
            {"role": "tool", "content": {"y": 2}},
            {"role": "assistant", "content": "A", "reasoning_content": "R"}]});
        let conv = parse_row(&row).unwrap();
        assert_eq!(conv.tools, Some(json!([{"type": "function", "function": {"name": "f"}}])));
        assert_eq!(conv.messages[1]["content"], "");
        assert_eq!(conv.messages[1]["tool_calls"][0]["function"]["arguments"], json!({"x": 1}));
        assert_eq!(conv.messages[2]["content"], "{\"y\":2}");
        assert_eq!(conv.messages[3]["reasoning_content"], "R");
        assert!(!conv.messages[0].contains_key("tool_calls"), "absent keys stay absent");
        let sharegpt = json!({"conversations": [{"from": "human", "value": "Q"}, {"from": "function_call", "value": "c"},
            {"from": "observation", "value": "o"}, {"from": "gpt", "value": "A"}]});
        let roles: Vec<_> = parse_row(&sharegpt).unwrap().roles().map(|r| r.unwrap().as_str()).collect();
        assert_eq!(roles, ["user", "assistant", "tool", "assistant"]);
        let twice = json!({"system": "S", "messages": [{"role": "system", "content": "T"}, {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"}]});
        assert!(parse_row(&twice).unwrap_err().contains("both a `system` key"));
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
            (json!({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "tools": 3}), "`tools` is a number"),
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
