//! Rendered pieces to token ids and labels with a Hugging Face `tokenizer.json`.
//!
//! Each piece is encoded on its own and the ids concatenated, the way ms-swift encodes its
//! template's context pieces: a piece's tokens then carry exactly that piece's label, with no
//! offset bookkeeping. Control tokens are looked up by name (`<|im_start|>`, `<|im_end|>` must
//! each be one id). Text pieces are encoded without added special tokens.

use std::path::Path;

use tokenizers::Tokenizer;

use super::template::{Piece, Special};
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

/// A tokenizer with the ids the template and the batches need.
pub struct Encoder {
    tokenizer: Tokenizer,
    im_start: u32,
    im_end: u32,
    pad_id: u32,
}

impl Encoder {
    /// Load `tokenizer.json`. The pad id is the file's padding id, else `<|endoftext|>`
    /// (Qwen's pad token).
    pub fn from_file(path: &Path) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(path).map_err(|e| Error::file(path, format!("is not a tokenizer.json: {e}")))?;
        let id = |token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                Error::file(path, format!("has no `{token}` token; the Qwen chat template needs it as one id"))
            })
        };
        let (im_start, im_end) = (id(Special::ImStart.as_str())?, id(Special::ImEnd.as_str())?);
        let pad_id = match tokenizer.get_padding() {
            Some(p) => p.pad_id,
            None => id("<|endoftext|>")?,
        };
        Ok(Encoder { tokenizer, im_start, im_end, pad_id })
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
    pub fn encode(&self, pieces: &[Piece]) -> Result<Sample> {
        let mut sample = Sample { input_ids: Vec::new(), labels: Vec::new() };
        for piece in pieces {
            let (ids, train) = match piece {
                Piece::Special { token: Special::ImStart, train } => (vec![self.im_start], *train),
                Piece::Special { token: Special::ImEnd, train } => (vec![self.im_end], *train),
                Piece::Text { text, .. } if text.is_empty() => continue,
                Piece::Text { text, train } => {
                    let encoding = self
                        .tokenizer
                        .encode(text.as_str(), false)
                        .map_err(|e| Error::data(format!("tokenizer failed on {text:?}: {e}")))?;
                    (encoding.get_ids().to_vec(), *train)
                }
            };
            sample.labels.extend(ids.iter().map(|&id| if train { i64::from(id) } else { IGNORE }));
            sample.input_ids.extend(ids);
        }
        Ok(sample)
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
    use crate::data::template::{to_text, ChatTemplate};

    pub(crate) fn tiny() -> Encoder {
        Encoder::from_file(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/tiny/tokenizer.json"))).unwrap()
    }

    fn conv(user: &str, assistant: &str) -> Conversation {
        Conversation { system: Some("S".into()), turns: vec![(Role::User, user.into()), (Role::Assistant, assistant.into())] }
    }

    #[test]
    fn control_tokens_are_single_ids_and_labels_cover_the_answer() {
        let enc = tiny();
        let pieces = ChatTemplate::from_name(None).unwrap().render(&conv("What is 2 + 3?", "5 apples"), None);
        let s = enc.encode(&pieces).unwrap();
        let vocab = enc.tokenizer();
        let (start, end) = (vocab.token_to_id("<|im_start|>").unwrap(), vocab.token_to_id("<|im_end|>").unwrap());
        // One <|im_start|> and one <|im_end|> per turn (system, user, assistant).
        assert_eq!(s.input_ids.iter().filter(|&&i| i == start).count(), 3);
        assert_eq!(s.input_ids.iter().filter(|&&i| i == end).count(), 3);
        // The ids decode back to exactly the rendered text (byte-level BPE is lossless).
        assert_eq!(vocab.decode(&s.input_ids, false).unwrap(), to_text(&pieces));
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
        let template = ChatTemplate::from_name(None).unwrap();
        let rows: Vec<Conversation> = (0..37).map(|i| conv(&format!("{i} + {i}?"), &format!("{}", 2 * i))).collect();
        let run = |threads| par_map(&rows, threads, |c| enc.encode(&template.render(c, None))).unwrap();
        let one = run(1);
        assert_eq!(one.len(), 37);
        assert_eq!(run(3), one);
        assert_eq!(run(8), one);
        assert_ne!(one[0], one[1]);
        let err = par_map(&[1, 2, 3, 4], 2, |&x| if x >= 3 { Err(Error::data(format!("bad {x}"))) } else { Ok(x) });
        assert_eq!(err.unwrap_err().to_string(), "bad 3");
    }
}
