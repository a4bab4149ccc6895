//! Self-cognition rows: `{{NAME}}` and `{{AUTHOR}}` filled from `model.model_name` /
//! `model.model_author` (ms-swift `--model_name` / `--model_author`). Each key is
//! `[Chinese, English]` or one value for both: rows with CJK characters get the first value,
//! other rows the second (or the only one).

use super::source::Conversation;
use crate::error::{Error, Result};

const NAME: &str = "{{NAME}}";
const AUTHOR: &str = "{{AUTHOR}}";
/// The message keys whose text may hold a placeholder.
const TEXT_KEYS: [&str; 2] = ["content", "reasoning_content"];

/// Fill the placeholders of `conv` in place. A placeholder with its recipe key empty is an error
/// naming the key.
pub fn fill(conv: &mut Conversation, names: &[String], authors: &[String]) -> Result<()> {
    let texts = || conv.messages.iter().flat_map(|m| TEXT_KEYS.iter().filter_map(|k| m.get(*k)?.as_str()));
    let has = |needle: &str| texts().any(|t| t.contains(needle));
    let (need_name, need_author) = (has(NAME), has(AUTHOR));
    if !need_name && !need_author {
        return Ok(());
    }
    let cjk = texts().any(|t| t.chars().any(is_cjk));
    let name = if need_name { Some(pick(names, cjk, "model.model_name", NAME)?) } else { None };
    let author = if need_author { Some(pick(authors, cjk, "model.model_author", AUTHOR)?) } else { None };
    let replace = |text: &mut String| {
        if let Some(name) = name {
            *text = text.replace(NAME, name);
        }
        if let Some(author) = author {
            *text = text.replace(AUTHOR, author);
        }
    };
    for m in conv.messages.iter_mut() {
        for key in TEXT_KEYS {
            if let Some(serde_json::Value::String(text)) = m.get_mut(key) {
                replace(text);
            }
        }
    }
    Ok(())
}

fn pick<'a>(values: &'a [String], cjk: bool, key: &str, placeholder: &str) -> Result<&'a str> {
    match values {
        [] => Err(Error::data(format!(
            "a training row contains {placeholder} but {key} is empty; set {key} = [\"中文名\", \"English name\"] \
             (or one value for both) in the recipe"
        ))),
        [only] => Ok(only),
        [zh, en, ..] => Ok(if cjk { zh } else { en }),
    }
}

/// Han ideographs (with extension A and compatibility), kana and Hangul syllables.
fn is_cjk(c: char) -> bool {
    matches!(c as u32, 0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xAC00..=0xD7AF | 0xF900..=0xFAFF | 0x20000..=0x2A6DF)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::source::Role;

    fn conv(user: &str, assistant: &str) -> Conversation {
        Conversation::new(None, &[(Role::User, user), (Role::Assistant, assistant)])
    }

    #[test]
    fn chinese_rows_get_the_first_value_others_the_second() {
        let names = vec!["小通".to_string(), "Tong".to_string()];
        let authors = vec!["某实验室".to_string(), "Some Lab".to_string()];
        let mut en = conv("Who are you?", "I am {{NAME}}, made by {{AUTHOR}}.");
        fill(&mut en, &names, &authors).unwrap();
        assert_eq!(en.messages[1]["content"], "I am Tong, made by Some Lab.");
        let mut zh = conv("你是谁？", "我是{{NAME}}，由{{AUTHOR}}开发。");
        fill(&mut zh, &names, &authors).unwrap();
        assert_eq!(zh.messages[1]["content"], "我是小通，由某实验室开发。");
        let mut one = conv("Who?", "{{NAME}}");
        fill(&mut one, &["Solo".to_string()], &[]).unwrap();
        assert_eq!(one.messages[1]["content"], "Solo");
    }

    #[test]
    fn a_placeholder_without_its_key_names_the_key() {
        let mut row = conv("Who made you?", "{{AUTHOR}}");
        let err = fill(&mut row, &["N".to_string()], &[]).unwrap_err().to_string();
        assert!(err.contains("model.model_author"), "{err}");
        let mut plain = conv("2+2?", "4");
        assert!(fill(&mut plain, &[], &[]).is_ok());
    }
}
