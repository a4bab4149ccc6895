//! The Qwen ChatML chat template, rendered into pieces that say which text is trained on.
//!
//! The text is byte-for-byte what Qwen2.5-Instruct's Jinja `chat_template` renders through
//! transformers' `apply_chat_template(..., add_generation_prompt=False)` for conversations
//! without tools (checked against `tests/fixtures/chat_template/rendered.json`):
//!
//! ```text
//! <|im_start|>system\n{system}<|im_end|>\n
//! <|im_start|>user\n{user}<|im_end|>\n
//! <|im_start|>assistant\n{assistant}<|im_end|>\n      (repeated per turn)
//! ```
//!
//! Trained (labelled) pieces, as ms-swift's default loss: every assistant turn's content and its
//! closing `<|im_end|>`. Not trained: the system and user turns, every `<|im_start|>`, the role
//! headers (`assistant\n`) and the `\n` after each `<|im_end|>`.

use super::source::{Conversation, Role};
use crate::error::{Error, Result};

/// The two ChatML control tokens; each must be a single id in the tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special {
    ImStart,
    ImEnd,
}

impl Special {
    pub fn as_str(self) -> &'static str {
        match self {
            Special::ImStart => "<|im_start|>",
            Special::ImEnd => "<|im_end|>",
        }
    }
}

/// One piece of a rendered conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// A control token, trained when `train`.
    Special { token: Special, train: bool },
    /// Ordinary text, trained when `train`.
    Text { text: String, train: bool },
}

/// Qwen2.5-Instruct's default system prompt (its template inserts it when a conversation has
/// no system turn).
pub const QWEN2_5_DEFAULT_SYSTEM: &str = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
/// Qwen2-Instruct's (and Qwen1.5-Chat's) default system prompt.
pub const QWEN2_DEFAULT_SYSTEM: &str = "You are a helpful assistant.";

/// A ChatML template and the system prompt it inserts when neither the row nor `data.system`
/// gives one (`None`: no system turn then).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    pub default_system: Option<String>,
}

impl ChatTemplate {
    /// The template named by `data.template`: `qwen2_5` (the default when unset; default system
    /// [`QWEN2_5_DEFAULT_SYSTEM`]), `qwen2` (default system [`QWEN2_DEFAULT_SYSTEM`]) or `chatml`
    /// (no default system). Qwen3's template (`<think>` blocks) is not implemented.
    pub fn from_name(name: Option<&str>) -> Result<Self> {
        let default_system = match name.unwrap_or("qwen2_5") {
            "qwen2_5" => Some(QWEN2_5_DEFAULT_SYSTEM),
            "qwen2" | "qwen" => Some(QWEN2_DEFAULT_SYSTEM),
            "chatml" => None,
            other => {
                return Err(Error::data(format!(
                    "data.template: `{other}` is not a template of this build; expected qwen2_5, qwen2 or chatml"
                )))
            }
        };
        Ok(ChatTemplate { default_system: default_system.map(str::to_string) })
    }

    /// The pieces of `conv`. System prompt: the row's own, else `fallback_system`
    /// (`data.system`), else the template default.
    pub fn render(&self, conv: &Conversation, fallback_system: Option<&str>) -> Vec<Piece> {
        let system = conv.system.as_deref().or(fallback_system).or(self.default_system.as_deref());
        let mut pieces = Vec::with_capacity(4 * conv.turns.len() + 4);
        if let Some(system) = system {
            push_turn(&mut pieces, "system", system, false);
        }
        for (role, text) in &conv.turns {
            push_turn(&mut pieces, role.as_str(), text, *role == Role::Assistant);
        }
        pieces
    }
}

/// `<|im_start|>{role}\n{text}<|im_end|>\n`; `train` labels the text and the `<|im_end|>`.
fn push_turn(pieces: &mut Vec<Piece>, role: &str, text: &str, train: bool) {
    pieces.push(Piece::Special { token: Special::ImStart, train: false });
    pieces.push(Piece::Text { text: format!("{role}\n"), train: false });
    pieces.push(Piece::Text { text: text.to_string(), train });
    pieces.push(Piece::Special { token: Special::ImEnd, train });
    pieces.push(Piece::Text { text: "\n".into(), train: false });
}

/// The rendered text, control tokens written out (what the Jinja template produces).
pub fn to_text(pieces: &[Piece]) -> String {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Special { token, .. } => token.as_str(),
            Piece::Text { text, .. } => text.as_str(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::source::parse_row;

    #[derive(serde::Deserialize)]
    struct Case {
        template: String,
        messages: serde_json::Value,
        rendered: String,
    }

    /// Rendered by the real Jinja templates (tests/fixtures/chat_template/make_chat_fixture.py).
    #[test]
    fn matches_the_jinja_templates_byte_for_byte() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/chat_template/rendered.json");
        let cases: Vec<Case> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(cases.len() >= 8);
        for case in cases {
            let conv = parse_row(&serde_json::json!({ "messages": case.messages })).unwrap();
            let template = ChatTemplate::from_name(Some(&case.template)).unwrap();
            assert_eq!(to_text(&template.render(&conv, None)), case.rendered, "{}", case.messages);
        }
    }

    #[test]
    fn trains_assistant_content_and_its_im_end_only() {
        let conv = Conversation {
            system: None,
            turns: vec![(Role::User, "hi".into()), (Role::Assistant, "yo".into()), (Role::User, "q".into()), (Role::Assistant, "a".into())],
        };
        let pieces = ChatTemplate::from_name(None).unwrap().render(&conv, Some("S"));
        let trained: Vec<&str> = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Special { token, train: true } => Some(token.as_str()),
                Piece::Text { text, train: true } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(trained, ["yo", "<|im_end|>", "a", "<|im_end|>"]);
        assert!(to_text(&pieces).starts_with("<|im_start|>system\nS<|im_end|>\n"));
        assert!(ChatTemplate::from_name(Some("llama3")).is_err());
        assert_eq!(ChatTemplate::from_name(Some("chatml")).unwrap().render(&conv, None).len(), 20);
    }
}
