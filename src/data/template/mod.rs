//! Chat templates: the model's own Jinja `chat_template`, rendered as transformers'
//! `apply_chat_template(messages, tools=..., add_generation_prompt=False, **kwargs)` renders it
//! ([`jinja`]), and the byte ranges of the rendered text that are trained on.
//!
//! Which template applies ([`ChatTemplate::for_data`]): `data.template` when set, as a built-in
//! name ([`BUILTIN`]) or a `.jinja` file; else the model folder's own (`chat_template.jinja`
//! beside `tokenizer.json`, else `chat_template` in `tokenizer_config.json`); else the built-in
//! `qwen2_5` (random-init models, the tiny default).
//!
//! Trained text, as ms-swift's default loss: each assistant turn as the model would produce it,
//! through its end-of-turn token, and nothing else. Found from the template itself, not from a
//! hand-written layout ([`spans`]): the turn starts where the rendered text leaves the rendering
//! of the conversation before it with `add_generation_prompt = true` (the prompt the model
//! answers at inference), and ends after the first end-of-turn token from there.

pub mod jinja;
pub mod spans;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::source::Conversation;
use crate::error::{Error, Result};

/// The built-in templates: each a model's own `chat_template` text (provenance in
/// `tests/fixtures/chat_template/templates/README.md`), except `chatml`, plain ChatML without a
/// default system prompt. Each with the special tokens of its model's tokenizer.
pub const BUILTIN: [(&str, &str, SpecialTokens<'static>); 5] = [
    ("qwen2_5", include_str!("builtin/qwen2_5.jinja"), QWEN),
    ("qwen2", include_str!("builtin/qwen2.jinja"), QWEN),
    ("qwen3", include_str!("builtin/qwen3.jinja"), QWEN),
    ("chatml", include_str!("builtin/chatml.jinja"), QWEN),
    ("llama3_1", include_str!("builtin/llama3_1.jinja"), LLAMA3),
];

/// Whether `data.template` names something this build can use, without reading the model
/// folder: a built-in or an existing file (unset: the model's own, checked with the data).
pub fn check_name(name: Option<&str>) -> Result<()> {
    match name {
        None => Ok(()),
        Some(n) if BUILTIN.iter().any(|(b, _, _)| *b == n) => Ok(()),
        Some(n) if Path::new(n).is_file() => Ok(()),
        Some(n) if n.ends_with(".jinja") => Err(Error::file(n, "data.template: no such file")),
        Some(n) => Err(not_a_template(n)),
    }
}

fn not_a_template(name: &str) -> Error {
    Error::data(format!(
        "data.template: `{name}` is neither a built-in template ({}) nor a .jinja file",
        BUILTIN.iter().map(|(b, _, _)| *b).collect::<Vec<_>>().join(", ")
    ))
}

/// Special tokens a template prints (`bos_token`, ...), as in a `tokenizer_config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens<'a> {
    pub bos: Option<&'a str>,
    pub eos: Option<&'a str>,
    pub pad: Option<&'a str>,
    pub unk: Option<&'a str>,
}

const QWEN: SpecialTokens<'static> = SpecialTokens { bos: None, eos: Some("<|im_end|>"), pad: Some("<|endoftext|>"), unk: None };
const LLAMA3: SpecialTokens<'static> =
    SpecialTokens { bos: Some("<|begin_of_text|>"), eos: Some("<|eot_id|>"), pad: None, unk: None };

/// End-of-turn tokens of the common chat formats; a trained turn ends after the first of these
/// (or the tokenizer's `eos_token`) from its start.
const END_OF_TURN: [&str; 6] = ["<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "</s>"];

/// Where a template came from, as `trainer check` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A built-in, by name; `implied` when no recipe key named it (the model has none).
    Builtin { name: String, implied: bool },
    /// The model folder's (a `chat_template.jinja` or a `tokenizer_config.json`).
    Model(PathBuf),
    /// A file named by `data.template`.
    File(PathBuf),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Builtin { name, implied: false } => write!(f, "built-in `{name}` (data.template)"),
            Origin::Builtin { name, implied: true } => {
                write!(f, "built-in `{name}` (the model folder has no chat template; set data.template to choose)")
            }
            Origin::Model(path) => write!(f, "the model's own, from {}", path.display()),
            Origin::File(path) => write!(f, "{} (data.template)", path.display()),
        }
    }
}

/// A compiled chat template with what it renders with.
pub struct ChatTemplate {
    origin: Origin,
    source: String,
    env: minijinja::Environment<'static>,
    /// The variables every rendering gets: the special tokens and `data.template_kwargs`.
    base: BTreeMap<String, minijinja::Value>,
    end_of_turn: Vec<String>,
    ignore_empty_think: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("origin", &self.origin).field("variables", &self.base.keys()).finish()
    }
}

/// A rendered conversation: its text and the byte ranges trained on (in order, disjoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub trained: Vec<Range<usize>>,
}

impl Rendered {
    /// The trained pieces of the text.
    pub fn trained_text(&self) -> Vec<&str> {
        self.trained.iter().map(|r| &self.text[r.clone()]).collect()
    }
}

/// What the template is rendered with besides the conversation (from the recipe's `data`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options {
    /// `data.template`.
    pub template: Option<String>,
    /// `data.template_kwargs`: extra variables, as `apply_chat_template(**kwargs)` passes them
    /// (`enable_thinking`, `date_string`, ...).
    pub kwargs: Map<String, Value>,
    /// `data.ignore_empty_think`: leave an empty `<think>\n\n</think>\n\n` block out of the loss
    /// (ms-swift's `--loss_scale ignore_empty_think`).
    pub ignore_empty_think: bool,
}

impl ChatTemplate {
    /// The template for data tokenised with `tokenizer` (a `tokenizer.json`; its folder is the
    /// model's), as the module doc says.
    pub fn for_data(options: &Options, tokenizer: &Path) -> Result<Self> {
        let dir = tokenizer.parent().unwrap_or(Path::new("."));
        let config = read_tokenizer_config(&dir.join("tokenizer_config.json"))?;
        let (origin, source, builtin_specials) = match options.template.as_deref() {
            Some(name) => match BUILTIN.iter().find(|(n, _, _)| *n == name) {
                Some((n, text, specials)) => (Origin::Builtin { name: n.to_string(), implied: false }, text.to_string(), Some(*specials)),
                None if name.ends_with(".jinja") || Path::new(name).is_file() => {
                    let text = std::fs::read_to_string(name).map_err(|e| Error::file(name, format!("data.template: {e}")))?;
                    (Origin::File(PathBuf::from(name)), text, None)
                }
                None => return Err(not_a_template(name)),
            },
            None => match model_template(dir, config.as_ref())? {
                Some((path, text)) => (Origin::Model(path), text, None),
                None => (Origin::Builtin { name: "qwen2_5".into(), implied: true }, BUILTIN[0].1.to_string(), Some(QWEN)),
            },
        };
        // The tokenizer's own special tokens when it has a config, else the built-in's.
        let specials = match (&config, builtin_specials) {
            (Some(config), _) => specials_of(config),
            (None, Some(s)) => specials_map(s),
            (None, None) => Map::new(),
        };
        Self::new(origin, source, specials, options)
    }

    /// A built-in by name, with its model's special tokens.
    pub fn builtin(name: &str, options: &Options) -> Result<Self> {
        let (n, text, specials) = BUILTIN
            .iter()
            .find(|(n, _, _)| *n == name)
            .ok_or_else(|| Error::data(format!("`{name}` is not a built-in template")))?;
        Self::new(Origin::Builtin { name: n.to_string(), implied: false }, text.to_string(), specials_map(*specials), options)
    }

    fn new(origin: Origin, source: String, specials: Map<String, Value>, options: &Options) -> Result<Self> {
        let env = jinja::environment(source.clone())
            .map_err(|e| Error::data(format!("chat template {origin}: does not compile: {}", describe(&e))))?;
        let mut end_of_turn: Vec<String> = END_OF_TURN.iter().map(|s| s.to_string()).collect();
        if let Some(Value::String(eos)) = specials.get("eos_token") {
            if !end_of_turn.contains(eos) {
                end_of_turn.push(eos.clone());
            }
        }
        let mut base: BTreeMap<String, minijinja::Value> =
            specials.iter().chain(&options.kwargs).map(|(k, v)| (k.clone(), minijinja::Value::from_serialize(v))).collect();
        base.insert("documents".into(), minijinja::Value::from(()));
        Ok(ChatTemplate {
            origin,
            source,
            env,
            base,
            end_of_turn,
            ignore_empty_think: options.ignore_empty_think,
        })
    }

    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The template text (part of the token cache's key).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The text of the first `upto` messages of `row` (with its tools), as transformers renders it.
    pub(crate) fn render_prefix(&self, row: &RowValues, upto: usize, add_generation_prompt: bool) -> std::result::Result<String, String> {
        let mut ctx = self.base.clone();
        ctx.insert("messages".into(), minijinja::Value::from(row.messages[..upto].to_vec()));
        ctx.insert("tools".into(), row.tools.clone());
        ctx.insert("add_generation_prompt".into(), minijinja::Value::from(add_generation_prompt));
        let template = self.env.get_template("chat").map_err(|e| describe(&e))?;
        template.render(minijinja::Value::from(ctx)).map_err(|e| describe(&e))
    }

    /// The rendered conversation and its trained ranges (see the module doc), or what went
    /// wrong, in words that name the template.
    pub fn render(&self, conv: &Conversation) -> std::result::Result<Rendered, String> {
        let row = RowValues::new(conv);
        let full = self.render_prefix(&row, conv.messages.len(), false).map_err(|e| format!("chat template {}: {e}", self.origin))?;
        let trained = spans::trained(self, conv, &row, &full).map_err(|e| format!("chat template {}: {e}", self.origin))?;
        Ok(Rendered { text: full, trained })
    }

    /// `conv` followed by the assistant's opening (`add_generation_prompt`): a prompt to answer.
    pub fn render_prompt(&self, conv: &Conversation) -> std::result::Result<String, String> {
        let row = RowValues::new(conv);
        self.render_prefix(&row, conv.messages.len(), true).map_err(|e| format!("chat template {}: {e}", self.origin))
    }

    /// The tokens that end a turn (the template's and the tokenizer's end of text).
    pub(crate) fn end_of_turn(&self) -> &[String] {
        &self.end_of_turn
    }

    pub(crate) fn ignore_empty_think(&self) -> bool {
        self.ignore_empty_think
    }
}

/// A row's messages and tools as template values, made once for all its prefix renderings.
pub(crate) struct RowValues {
    messages: Vec<minijinja::Value>,
    tools: minijinja::Value,
}

impl RowValues {
    fn new(conv: &Conversation) -> Self {
        RowValues {
            messages: conv.messages.iter().map(minijinja::Value::from_serialize).collect(),
            tools: conv.tools.as_ref().map_or(minijinja::Value::from(()), minijinja::Value::from_serialize),
        }
    }
}

/// A MiniJinja error with its place in the template.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    if let Some(line) = e.line() {
        if !s.contains("line") {
            s.push_str(&format!(" (template line {line})"));
        }
    }
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    s
}

/// `tokenizer_config.json` as JSON, if the file exists.
fn read_tokenizer_config(path: &Path) -> Result<Option<Map<String, Value>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(Error::file(path, "is not a JSON object")),
        Err(e) => Err(Error::file(path, format!("is not JSON: {e}"))),
    }
}

/// The model folder's template: `chat_template.jinja`, else `tokenizer_config.json`'s
/// `chat_template` (a string, or a list of `{name, template}` of which `default` is used).
fn model_template(dir: &Path, config: Option<&Map<String, Value>>) -> Result<Option<(PathBuf, String)>> {
    let file = dir.join("chat_template.jinja");
    if file.is_file() {
        let text = std::fs::read_to_string(&file).map_err(|e| Error::file(&file, e))?;
        return Ok(Some((file, text)));
    }
    let path = dir.join("tokenizer_config.json");
    match config.and_then(|c| c.get("chat_template")) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some((path, text.clone()))),
        Some(Value::Array(named)) => {
            let default = named.iter().find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
            match default.and_then(|t| t.get("template")).and_then(Value::as_str) {
                Some(text) => Ok(Some((path, text.to_string()))),
                None => Err(Error::file(path, "chat_template is a list of named templates without one named `default`")),
            }
        }
        Some(_) => Err(Error::file(path, "chat_template is neither a string nor a list of {name, template}")),
    }
}

/// `bos_token`, `eos_token`, `pad_token`, `unk_token` of a tokenizer config, each a string or
/// an added-token object `{"content": ...}`; unset or null ones left out (as transformers leaves
/// them out of the template's variables).
fn specials_of(config: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
        let value = match config.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        if let Some(v) = value {
            out.insert(key.into(), Value::String(v));
        }
    }
    out
}

fn specials_map(s: SpecialTokens) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, v) in [("bos_token", s.bos), ("eos_token", s.eos), ("pad_token", s.pad), ("unk_token", s.unk)] {
        if let Some(v) = v {
            out.insert(key.into(), Value::String(v.into()));
        }
    }
    out
}
