//! The trained ranges of a rendered conversation, found by rendering its prefixes.
//!
//! For the assistant message at index `k`, the prompt is the rendering of `messages[..k]` with
//! `add_generation_prompt = true`: what the model is given at inference before it writes that
//! reply. The reply starts where the full rendering leaves that prompt (all of it, for the
//! templates of the Qwen and Llama families; where a template renders the prompt differently
//! from the history, e.g. Qwen3 with `enable_thinking = false` before a reply with reasoning,
//! at the first byte that differs) and ends after the first end-of-turn token from there
//! (`<|im_end|>`, `<|eot_id|>`, ... or the tokenizer's `eos_token`); text after it (the newline
//! ChatML writes) is not trained. Earlier turns stay as the full rendering has them: Qwen3's
//! template drops the reasoning of turns before the last user message, and so does the text
//! trained on.

use std::ops::Range;

use super::{ChatTemplate, RowValues};
use crate::data::source::{role_of, Conversation, Role};

/// Qwen3's empty reasoning block, left out of the loss with `data.ignore_empty_think`.
const EMPTY_THINK: &str = "<think>\n\n</think>\n\n";

/// The trained byte ranges of `full` (the rendering of all of `conv`).
pub(crate) fn trained(template: &ChatTemplate, conv: &Conversation, row: &RowValues, full: &str) -> Result<Vec<Range<usize>>, String> {
    let mut ranges: Vec<Range<usize>> = Vec::new();
    for (k, m) in conv.messages.iter().enumerate() {
        if role_of(m) != Some(Role::Assistant) {
            continue;
        }
        if k == 0 {
            return Err("the first message is an assistant turn; a reply needs a user message before it".into());
        }
        let prompt = template.render_prefix(row, k, true).map_err(|e| format!("rendering messages[..{k}] as a prompt: {e}"))?;
        let mut start = common_prefix(&prompt, full);
        let floor = ranges.last().map_or(0, |r| r.end);
        if start < floor {
            return Err(format!(
                "message {k}: the prompt before this assistant turn does not continue the text rendered before it; \
                 the template renders earlier turns differently once a reply follows"
            ));
        }
        let end = template
            .end_of_turn()
            .iter()
            .filter_map(|t| full[start..].find(t.as_str()).map(|at| start + at + t.len()))
            .min()
            .ok_or_else(|| {
                format!(
                    "message {k}: no end-of-turn token after the assistant turn (looked for {}); the template or the \
                     tokenizer_config.json's eos_token must close each reply",
                    template.end_of_turn().join(", ")
                )
            })?;
        if template.ignore_empty_think() && full[start..end].starts_with(EMPTY_THINK) {
            start += EMPTY_THINK.len();
        }
        if start < end {
            ranges.push(start..end);
        }
    }
    if ranges.is_empty() {
        return Err("no assistant text is left to train on after rendering".into());
    }
    Ok(ranges)
}

/// The length in bytes of the longest common prefix of `a` and `b`, on a character boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    let mut n = 0;
    for ((i, ca), cb) in a.char_indices().zip(b.chars()) {
        if ca != cb {
            return i;
        }
        n = i + ca.len_utf8();
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_stops_on_a_character_boundary() {
        assert_eq!(common_prefix("abc", "abd"), 2);
        assert_eq!(common_prefix("ab", "abc"), 2);
        assert_eq!(common_prefix("é1", "é2"), 2);
        assert_eq!(common_prefix("", "x"), 0);
    }
}
