//! Chat templates against transformers: every case of `tests/fixtures/chat_template/rendered.json`
//! (made by `make_chat_fixture.py` with transformers' `apply_chat_template`) rendered by trainer
//! from a model folder holding the template in its `tokenizer_config.json`, as a downloaded
//! model has it: the text and the token ids must be transformers' exactly, and the trained text
//! exactly each assistant reply through its end-of-turn token (written out below per case, not
//! derived from trainer's own rendering).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use trainer::data::source::parse_row;
use trainer::data::template::{ChatTemplate, Options, Origin};
use trainer::data::{Encoder, IGNORE};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/chat_template");

#[derive(serde::Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    template: String,
    kwargs: serde_json::Map<String, Value>,
    messages: Value,
    tools: Option<Value>,
    rendered: String,
    input_ids: Vec<u32>,
}

/// A model folder with the fixture tokenizer and `template` in its tokenizer_config.json, with
/// the special tokens the fixture script gave transformers.
fn model_folder(dir: &Path, template: &str) -> PathBuf {
    let source = std::fs::read_to_string(format!("{FIXTURES}/templates/{template}.jinja")).unwrap();
    let config = if template.starts_with("llama") {
        json!({"chat_template": source, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|endoftext|>"})
    } else {
        json!({"chat_template": source, "bos_token": null, "eos_token": {"content": "<|im_end|>", "special": true}, "pad_token": "<|endoftext|>"})
    };
    let folder = dir.join(template);
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(format!("{FIXTURES}/tokenizer.json"), folder.join("tokenizer.json")).unwrap();
    std::fs::write(folder.join("tokenizer_config.json"), config.to_string()).unwrap();
    folder.join("tokenizer.json")
}

/// The trained text of each case, by hand from the rendered text: (template, enable_thinking,
/// first message's content, the assistant replies as trained).
fn expected(template: &str, thinking: Option<bool>, first_user: &str) -> Option<Vec<&'static str>> {
    let qwen3 = template == "qwen3";
    let think = qwen3 && thinking != Some(false);
    Some(match (template, first_user) {
        (_, "What is 2 + 3?") if template.starts_with("llama") => vec!["5<|eot_id|>"],
        (_, "What is 2 + 3?") if think => vec!["<think>\n\n</think>\n\n5<|im_end|>"],
        (_, "What is 2 + 3?") => vec!["5<|im_end|>"],
        (_, "Hi!") if template.starts_with("llama") => vec!["Hello. How can I help?<|eot_id|>", "7<|eot_id|>", "11<|eot_id|>"],
        (_, "Hi!") if think => vec!["Hello. How can I help?<|im_end|>", "7\n<|im_end|>", "<think>\n\n</think>\n\n 11 <|im_end|>"],
        (_, "Hi!") => vec!["Hello. How can I help?<|im_end|>", "7\n<|im_end|>", " 11 <|im_end|>"],
        ("qwen3", "Is 9 prime?") if think => vec!["<think>\n9 = 3 * 3.\n</think>\n\nNo.<|im_end|>"],
        // The prompt ends in an empty think block; the reply's own block parts from it after `<think>\n`.
        ("qwen3", "Is 9 prime?") => vec!["9 = 3 * 3.\n</think>\n\nNo.<|im_end|>"],
        ("qwen3", "Think first.") if think => vec!["4<|im_end|>", "<think>\n4 * 3 = 12\n</think>\n\n12<|im_end|>"],
        ("qwen3", "Think first.") => vec!["4<|im_end|>", "4 * 3 = 12\n</think>\n\n12<|im_end|>"],
        ("qwen3", "Weather in Paris?") => vec![
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>",
            "<think>\n\n</think>\n\nClear, 21 °C.<|im_end|>",
        ],
        ("qwen2_5", "Weather in Paris?") => vec![
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>",
            "Clear, 21 °C.<|im_end|>",
        ],
        ("llama3_1", "Weather in Paris?") => {
            vec!["{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}<|eot_id|>", "Clear, 21 °C.<|eot_id|>"]
        }
        _ => return None,
    })
}

#[test]
fn renders_tokenises_and_labels_as_transformers() {
    let fixture: Fixture = serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURES}/rendered.json")).unwrap()).unwrap();
    assert!(fixture.cases.len() >= 30);
    let dir = tempfile::tempdir().unwrap();
    let encoder = Encoder::from_file(&PathBuf::from(format!("{FIXTURES}/tokenizer.json"))).unwrap();
    let mut checked_by_hand = 0;
    for (i, case) in fixture.cases.iter().enumerate() {
        let tokenizer = model_folder(dir.path(), &case.template);
        let options = Options { kwargs: case.kwargs.clone(), ..Options::default() };
        let template = ChatTemplate::for_data(&options, &tokenizer).unwrap();
        assert!(matches!(template.origin(), Origin::Model(p) if p.ends_with("tokenizer_config.json")));
        let mut row = json!({ "messages": case.messages });
        if let Some(tools) = &case.tools {
            row["tools"] = tools.clone();
        }
        let conv = parse_row(&row).unwrap();
        let label = format!("case {i} ({}, {:?})", case.template, case.kwargs);
        let rendered = template.render(&conv).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(rendered.text, case.rendered, "{label}: text");
        let sample = encoder.encode(&rendered).unwrap();
        assert_eq!(sample.input_ids, case.input_ids, "{label}: token ids");
        // Labels: exactly the tokens of the trained text, each trained range whole tokens.
        let trained: Vec<u32> = sample.labels.iter().filter(|&&l| l != IGNORE).map(|&l| l as u32).collect();
        let want_text: String = rendered.trained_text().concat();
        assert_eq!(encoder.tokenizer().decode(&trained, false).unwrap(), want_text, "{label}: labels");
        for (l, id) in sample.labels.iter().zip(&sample.input_ids) {
            assert!(*l == IGNORE || *l == i64::from(*id), "{label}: a label differs from its id");
        }
        let first = conv.messages.iter().find(|m| m["role"] == "user" || m["role"] == "system").unwrap()["content"].as_str().unwrap();
        let first = if first == "You answer tersely." || first.is_empty() || first.starts_with("你是") { "" } else { first };
        let thinking = case.kwargs.get("enable_thinking").and_then(Value::as_bool);
        if let Some(want) = expected(&case.template, thinking, first) {
            assert_eq!(rendered.trained_text(), want, "{label}: trained text");
            checked_by_hand += 1;
        } else {
            // Every other case: one trained range per assistant message, each ending in the
            // end-of-turn token.
            let replies = conv.messages.iter().filter(|m| m["role"] == "assistant").count();
            assert_eq!(rendered.trained.len(), replies, "{label}: ranges");
            let eot = if case.template.starts_with("llama") { "<|eot_id|>" } else { "<|im_end|>" };
            assert!(rendered.trained_text().iter().all(|t| t.ends_with(eot)), "{label}: {:?}", rendered.trained_text());
        }
    }
    assert!(checked_by_hand >= 12, "{checked_by_hand} cases checked by hand");
}

#[test]
fn ignore_empty_think_leaves_the_empty_block_out_of_the_loss() {
    let options = Options { ignore_empty_think: true, ..Options::default() };
    let template = ChatTemplate::builtin("qwen3", &options).unwrap();
    let conv = parse_row(&json!({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]})).unwrap();
    let rendered = template.render(&conv).unwrap();
    assert!(rendered.text.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\nA<|im_end|>\n"), "{:?}", rendered.text);
    assert_eq!(rendered.trained_text(), ["A<|im_end|>"]);
    let reasoned = parse_row(&json!({"messages": [{"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A", "reasoning_content": "R"}]})).unwrap();
    assert_eq!(template.render(&reasoned).unwrap().trained_text(), ["<think>\nR\n</think>\n\nA<|im_end|>"]);
}

#[test]
fn template_errors_name_the_template_and_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = model_folder(dir.path(), "llama3_1");
    let template = ChatTemplate::for_data(&Options::default(), &tokenizer).unwrap();
    // Llama 3.1's template refuses two tool calls in one message with raise_exception.
    let calls = json!([{"type": "function", "function": {"name": "a", "arguments": {}}}, {"type": "function", "function": {"name": "b", "arguments": {}}}]);
    let conv = parse_row(&json!({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "", "tool_calls": calls}]})).unwrap();
    let err = template.render(&conv).unwrap_err();
    assert!(err.contains("tokenizer_config.json") && err.contains("only supports single tool-calls"), "{err}");

    let bad = dir.path().join("bad.jinja");
    std::fs::write(&bad, "{% for m in messages %}{{ m.content }").unwrap();
    let options = Options { template: Some(bad.to_str().unwrap().to_string()), ..Options::default() };
    let err = ChatTemplate::for_data(&options, &tokenizer).unwrap_err().to_string();
    assert!(err.contains("bad.jinja") && err.contains("does not compile"), "{err}");
    let options = Options { template: Some("vicuna".into()), ..Options::default() };
    let err = ChatTemplate::for_data(&options, &tokenizer).unwrap_err().to_string();
    assert!(err.contains("`vicuna` is neither a built-in template (qwen2_5, qwen2, qwen3, chatml, llama3_1)"), "{err}");
}

#[test]
fn a_folder_without_a_template_falls_back_to_qwen2_5_and_a_jinja_file_wins() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = dir.path().join("tokenizer.json");
    std::fs::copy(format!("{FIXTURES}/tokenizer.json"), &tokenizer).unwrap();
    let template = ChatTemplate::for_data(&Options::default(), &tokenizer).unwrap();
    assert_eq!(template.origin(), &Origin::Builtin { name: "qwen2_5".into(), implied: true });
    std::fs::write(dir.path().join("chat_template.jinja"), "{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}").unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"eos_token": "<|im_end|>", "chat_template": "ignored"}"#).unwrap();
    let template = ChatTemplate::for_data(&Options::default(), &tokenizer).unwrap();
    assert!(matches!(template.origin(), Origin::Model(p) if p.ends_with("chat_template.jinja")));
    let conv = parse_row(&json!({"instruction": "Q", "output": "A"})).unwrap();
    // This template has no generation prompt: the reply starts where the history ends.
    let rendered = template.render(&conv).unwrap();
    assert_eq!(rendered.text, "[user]Q<|im_end|>[assistant]A<|im_end|>");
    assert_eq!(rendered.trained_text(), ["[assistant]A<|im_end|>"]);
}
