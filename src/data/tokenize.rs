//! A rendered conversation to token ids and labels with a Hugging Face `tokenizer.json`.
//!
//! The whole rendered text is encoded at once, without added special tokens, as transformers'
//! `apply_chat_template(..., tokenize=True)` encodes it, so the ids are the ones transformers
//! gives. A token is trained when it starts inside a trained range of the text; a token that
//! starts inside one and ends outside it (the ranges are not on token boundaries) is an error
//! naming the text, since its label would train on prompt text or leave out part of a reply.

use std::path::Path;

use tokenizers::Tokenizer;

use super::template::Rendered;
use crate::error::{Error, Result};
use crate::recipe::Truncation;

/// Label of a token that is not trained on (PyTorch's cross-entropy `ignore_index`).
pub const IGNORE: i64 = -100;

/// One tokenised row. `labels[i]` is `input_ids[i]` where trained, else [`IGNORE`]; labels are
/// not shifted (the loss predicts `labels[i + 1]` from position `i`, as Hugging Face does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Sample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
}

/// A tokenizer and the pad id of the batches.
pub struct Encoder {
    tokenizer: Tokenizer,
    pad_id: u32,
}

impl Encoder {
    /// Load `tokenizer.json`. The pad id is the file's padding id, else `<|endoftext|>`
    /// (Qwen's pad token), else the end-of-text token of Llama 3 (`<|end_of_text|>`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(path).map_err(|e| Error::file(path, format!("is not a tokenizer.json: {e}")))?;
        let pad_id = match tokenizer.get_padding() {
            Some(p) => p.pad_id,
            None => ["<|endoftext|>", "<|end_of_text|>"].iter().find_map(|t| tokenizer.token_to_id(t)).ok_or_else(|| {
                Error::file(path, "has no padding id and no `<|endoftext|>` or `<|end_of_text|>` token to pad batches with")
            })?,
        };
        Ok(Encoder { tokenizer, pad_id })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The largest id the tokenizer can produce, added tokens included.
    pub fn max_id(&self) -> u32 {
        self.tokenizer.get_vocab(true).values().copied().max().unwrap_or(0)
    }

    /// Token ids and labels of a rendered conversation.
    pub fn encode(&self, rendered: &Rendered) -> Result<Sample> {
        let encoding = self
            .tokenizer
            .encode(rendered.text.as_str(), false)
            .map_err(|e| Error::data(format!("tokenizer failed on {:?}: {e}", rendered.text)))?;
        let ids = encoding.get_ids();
        let mut labels = Vec::with_capacity(ids.len());
        let mut ranges = rendered.trained.iter().peekable();
        for (&id, &(start, end)) in ids.iter().zip(encoding.get_offsets()) {
            while ranges.peek().is_some_and(|r| r.end <= start) {
                ranges.next();
            }
            let range = ranges.peek().filter(|r| r.start <= start);
            if let Some(r) = range.filter(|r| end > r.end) {
                return Err(Error::data(format!(
                    "a token ({:?}) runs past the end of the trained text {:?}; the reply and what follows it merge into \
                     one token in this tokenizer",
                    &rendered.text[start..end],
                    &rendered.text[(*r).clone()]
                )));
            }
            labels.push(if range.is_some() { i64::from(id) } else { IGNORE });
        }
        Ok(Sample { input_ids: ids.to_vec(), labels })
    }
}

/// `train.truncation` for a row longer than `max_length`: `delete` drops it, `left` keeps the
/// last `max_length` tokens, `right` the first. A cut row with no trained token left is dropped
/// too (it would contribute nothing to the loss). `None`: dropped.
pub fn fit(sample: Sample, max_length: usize, truncation: Truncation) -> Option<Sample> {
    let len = sample.len();
    if len <= max_length {
        return Some(sample);
    }
    let range = match truncation {
        Truncation::Delete => return None,
        Truncation::Left => len - max_length..len,
        Truncation::Right => 0..max_length,
    };
    let cut = Sample { input_ids: sample.input_ids[range.clone()].to_vec(), labels: sample.labels[range].to_vec() };
    cut.labels.iter().any(|&l| l != IGNORE).then_some(cut)
}

/// `f` over `items` on up to `threads` threads, results in input order whatever the thread
/// count (each thread takes one contiguous chunk). The first error (in input order) wins.
pub fn par_map<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> Result<R> + Sync) -> Result<Vec<R>> {
    let threads = threads.clamp(1, items.len().max(1));
    if threads == 1 {
        return items.iter().map(&f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    let parts: Vec<Result<Vec<R>>> = std::thread::scope(|scope| {
        let handles: Vec<_> =
            items.chunks(chunk).map(|part| scope.spawn(move || part.iter().map(f).collect())).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::Internal("a tokenisation thread panicked".into()))))
            .collect()
    });
    let mut out = Vec::with_capacity(items.len());
    for part in parts {
        out.extend(part?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::source::{Conversation, Role};
    use crate::data::template::{ChatTemplate, Options};

    pub(crate) fn tiny() -> Encoder {
        Encoder::from_file(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/tiny/tokenizer.json"))).unwrap()
    }

    fn conv(user: &str, assistant: &str) -> Conversation {
        Conversation::new(Some("S"), &[(Role::User, user), (Role::Assistant, assistant)])
    }

    #[test]
    fn control_tokens_are_single_ids_and_labels_cover_the_answer() {
        let enc = tiny();
        let rendered = ChatTemplate::builtin("qwen2_5", &Options::default()).unwrap().render(&conv("What is 2 + 3?", "5 apples")).unwrap();
        let s = enc.encode(&rendered).unwrap();
        let vocab = enc.tokenizer();
        let (start, end) = (vocab.token_to_id("<|im_start|>").unwrap(), vocab.token_to_id("<|im_end|>").unwrap());
        // One <|im_start|> and one <|im_end|> per turn (system, user, assistant).
        assert_eq!(s.input_ids.iter().filter(|&&i| i == start).count(), 3);
        assert_eq!(s.input_ids.iter().filter(|&&i| i == end).count(), 3);
        // The ids decode back to exactly the rendered text (byte-level BPE is lossless).
        assert_eq!(vocab.decode(&s.input_ids, false).unwrap(), rendered.text);
        // Trained tokens decode to the answer plus its <|im_end|>, and sit at the end but one (`\n`).
        let trained: Vec<u32> = s.labels.iter().filter(|&&l| l != IGNORE).map(|&l| l as u32).collect();
        assert_eq!(vocab.decode(&trained, false).unwrap(), "5 apples<|im_end|>");
        assert_eq!(*s.labels.last().unwrap(), IGNORE);
        assert_eq!(s.labels[s.len() - 2], i64::from(end));
        assert!(s.labels[..s.len() - trained.len() - 1].iter().all(|&l| l == IGNORE));
    }

    #[test]
    fn qwen_pre_tokenizer_regex_works_with_fancy_regex() {
        // The Qwen split pattern has `(?i:...)` and a look-ahead `\s+(?!\S)`; the `regex` crate
        // would reject the latter. CJK text must round-trip through byte-level BPE too.
        let enc = tiny();
        for text in ["I'll say  hello\n\n  world 12345", "法国的首都是巴黎。", "a\r\n\tb"] {
            let ids = enc.tokenizer().encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(enc.tokenizer().decode(&ids, false).unwrap(), text);
        }
    }

    #[test]
    fn truncation_delete_left_right() {
        let s = Sample { input_ids: vec![1, 2, 3, 4, 5], labels: vec![IGNORE, IGNORE, 3, 4, IGNORE] };
        assert_eq!(fit(s.clone(), 5, Truncation::Delete), Some(s.clone()));
        assert_eq!(fit(s.clone(), 4, Truncation::Delete), None);
        assert_eq!(fit(s.clone(), 3, Truncation::Left).unwrap().input_ids, [3, 4, 5]);
        assert_eq!(fit(s.clone(), 3, Truncation::Right).unwrap().labels, [IGNORE, IGNORE, 3]);
        // Right-cut before any trained token: nothing to learn, dropped.
        assert_eq!(fit(s, 2, Truncation::Right), None);
    }

    #[test]
    fn parallel_results_do_not_depend_on_thread_count() {
        let enc = tiny();
        let template = ChatTemplate::builtin("qwen2_5", &Options::default()).unwrap();
        let rows: Vec<Conversation> = (0..37).map(|i| conv(&format!("{i} + {i}?"), &format!("{}", 2 * i))).collect();
        let run = |threads| par_map(&rows, threads, |c| enc.encode(&template.render(c).map_err(Error::Data)?)).unwrap();
        let one = run(1);
        assert_eq!(one.len(), 37);
        assert_eq!(run(3), one);
        assert_eq!(run(8), one);
        assert_ne!(one[0], one[1]);
        let err = par_map(&[1, 2, 3, 4], 2, |&x| if x >= 3 { Err(Error::data(format!("bad {x}"))) } else { Ok(x) });
        assert_eq!(err.unwrap_err().to_string(), "bad 3");
    }
}
