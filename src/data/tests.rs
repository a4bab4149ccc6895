//! `prepare` end to end on the embedded tiny data and tokenizer (assets/tiny).

use super::*;
use crate::recipe::Truncation;

const TINY_DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/tiny/train.jsonl");

fn tokenizer() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/tiny/tokenizer.json"))
}

/// The tiny data (351 rows, 12 with self-cognition placeholders) with names set.
fn recipe() -> Recipe {
    let mut r = Recipe::default();
    r.data.datasets = vec![TINY_DATA.to_string()];
    r.model.model_name = vec!["小通".into(), "Tiny".into()];
    r.model.model_author = vec!["测试组".into(), "the trainer tests".into()];
    r
}

/// `prepare` without the cache (tests that exercise the cache call `prepare_with` themselves).
fn prepare(r: &Recipe) -> Result<Prepared> {
    prepare_with(r, &tokenizer(), &Cache::Off)
}

fn decode(sample: &Sample) -> String {
    let enc = Encoder::from_file(&tokenizer()).unwrap();
    enc.tokenizer().decode(&sample.input_ids, false).unwrap()
}

#[test]
fn tiny_data_splits_and_is_deterministic() {
    let mut r = recipe();
    r.data.val_split = 0.1;
    let a = prepare(&r).unwrap();
    // round(351 * 0.1) = 35 held out.
    assert_eq!((a.train.len(), a.val.len()), (316, 35));
    assert_eq!((a.skipped_bad_rows, a.dropped_too_long), (0, 0));
    assert_eq!(a.pad_id, 0, "<|endoftext|> is the first special token");
    assert_eq!(prepare(&r).unwrap(), a, "same seed, same data");
    r.data.num_proc = 2;
    assert_eq!(prepare(&r).unwrap(), a, "thread count changes nothing");
    r.train.seed = 43;
    assert_ne!(prepare(&r).unwrap().train, a.train);
}

#[test]
fn self_cognition_and_system_prompts_reach_the_text() {
    let mut r = recipe();
    r.data.datasets = vec![format!("{TINY_DATA}#2000")];
    let texts: Vec<String> = prepare(&r).unwrap().train.iter().map(decode).collect();
    assert_eq!(texts.len(), 2000);
    assert!(texts.iter().any(|t| t.contains("I am Tiny, an assistant trained by the trainer tests.")));
    assert!(texts.iter().any(|t| t.contains("我是小通，由测试组训练的助手。")));
    assert!(!texts.iter().any(|t| t.contains("{{")));
    // Qwen2.5's template writes its default system prompt when a row has none.
    assert!(texts[0].starts_with("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"));
    r.data.system = Some("Be brief.".into());
    let first = decode(&prepare(&r).unwrap().train[0]);
    assert!(first.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"), "{first}");
    r.model.model_name.clear();
    let err = prepare(&r).unwrap_err().to_string();
    assert!(err.contains("model.model_name"), "{err}");
}

#[test]
fn max_length_drops_or_cuts_rows() {
    let mut r = recipe();
    let mut lengths: Vec<usize> = prepare(&r).unwrap().train.iter().map(Sample::len).collect();
    lengths.sort_unstable();
    let (shortest, median) = (lengths[0], lengths[lengths.len() / 2]);
    assert!(shortest < median, "{lengths:?}");
    r.train.max_length = median;
    let deleted = prepare(&r).unwrap();
    let longer = lengths.iter().filter(|&&n| n > median).count();
    assert_eq!(deleted.dropped_too_long, longer);
    assert_eq!(deleted.train.len() + longer, 351);
    assert!(deleted.train.iter().all(|s| s.len() <= median));
    r.train.truncation = Truncation::Left;
    let left = prepare(&r).unwrap();
    assert_eq!(left.train.len(), 351, "left cuts keep the answer");
    assert_eq!(left.train.iter().filter(|s| s.len() == median).count(), 351 - lengths.iter().filter(|&&n| n < median).count());
    r.train.truncation = Truncation::Delete;
    r.train.max_length = shortest - 1;
    let err = prepare(&r).unwrap_err().to_string();
    assert!(err.contains("no training rows left") && err.contains("351 dropped"), "{err}");
}

#[test]
fn batches_follow_packing() {
    let mut r = recipe();
    r.train.max_length = 128;
    let padded = prepare(&r).unwrap();
    let batches = padded.train_batches(4);
    assert_eq!(batches.len(), 351usize.div_ceil(4));
    let b = &batches[0];
    assert_eq!(b.seq_len, padded.train[..4].iter().map(Sample::len).max().unwrap());
    assert_eq!(b.input_ids.len(), 4 * b.seq_len);
    r.train.packing = true;
    r.train.max_length = 512;
    let packed = prepare(&r).unwrap();
    let batches = packed.train_batches(2);
    assert!(batches.iter().all(|b| b.seq_len == 512 && b.labels.len() == b.batch_size * 512));
    let tokens: usize = packed.train.iter().map(Sample::len).sum();
    let packed_tokens: usize = batches.iter().map(|b| b.segment_ids.iter().filter(|&&s| s != 0).count()).sum();
    assert_eq!(packed_tokens, tokens);
    assert!(batches.len() * 2 < 351 / 2, "several rows per sequence");
    r.train.padding_free = true;
    assert_eq!(prepare(&r).unwrap().train_batches(2), batches, "packing wins over padding_free");
    r.train.packing = false;
    let free = prepare(&r).unwrap();
    let batches = free.train_batches(4);
    assert_eq!(batches.len(), 351usize.div_ceil(4));
    let b = &batches[0];
    assert_eq!(b.batch_size, 1);
    assert_eq!(b.seq_len, free.train[..4].iter().map(Sample::len).sum::<usize>());
    assert_eq!(*b.segment_ids.last().unwrap(), 4);
    assert!(batches.iter().all(|b| !b.segment_ids.contains(&0)), "no padding");
}

#[test]
fn bad_sources_and_tokenizer_paths_are_errors() {
    let mut r = recipe();
    r.data.datasets.clear();
    assert!(prepare(&r).unwrap_err().to_string().contains("data.datasets is empty"));
    // No network here: a hub dataset that is not in the hub cache is an error with advice.
    r.data.datasets = vec!["trainer-tests/no-such-dataset#500".into()];
    let err = prepare(&r).unwrap_err().to_string();
    assert!(err.contains("`trainer-tests/no-such-dataset` is not a local file") && err.contains("point data.datasets"), "{err}");
    r.data.datasets = vec![TINY_DATA.to_string()];
    let err = prepare_with(&r, Path::new("/nonexistent/tokenizer.json"), &Cache::Off).unwrap_err().to_string();
    assert!(err.starts_with("/nonexistent/tokenizer.json:"), "{err}");
    assert!(tokenizer_path(None, &r).is_err());
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/tiny"));
    assert_eq!(tokenizer_path(Some(dir), &r).unwrap(), tokenizer());
}

#[test]
fn the_token_cache_is_hit_on_a_rerun_and_missed_on_a_change() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::Dir(dir.path().join("tokens"));
    let data = dir.path().join("data.jsonl");
    std::fs::copy(TINY_DATA, &data).unwrap();
    let mut r = recipe();
    r.data.datasets = vec![data.to_str().unwrap().to_string()];
    r.data.val_split = 0.1;
    let first = prepare_with(&r, &tokenizer(), &cache).unwrap();
    assert!(!first.cache_hit && first.notes.is_empty(), "{:?}", first.notes);
    assert_eq!(Prepared { cache_hit: false, notes: vec![], ..first.clone() }, prepare(&r).unwrap(), "caching changes nothing");
    let second = prepare_with(&r, &tokenizer(), &cache).unwrap();
    assert!(second.cache_hit);
    assert!(second.sources.is_empty(), "per-source counts are not cached");
    assert_eq!(Prepared { cache_hit: false, sources: first.sources.clone(), ..second.clone() }, first, "the cached rows are the rows");
    // Batch layout is not cached: it comes from the recipe of this call.
    r.train.padding_free = true;
    let free = prepare_with(&r, &tokenizer(), &cache).unwrap();
    assert!(free.cache_hit && free.padding_free);

    r.train.max_length = 300;
    let shorter = prepare_with(&r, &tokenizer(), &cache).unwrap();
    assert!(!shorter.cache_hit, "max_length changes the key");
    assert!(prepare_with(&r, &tokenizer(), &cache).unwrap().cache_hit);
    r.train.max_length = first.max_length;

    // The source's bytes are part of the key.
    let mut text = std::fs::read_to_string(&data).unwrap();
    text.push_str("{\"instruction\": \"Q\", \"output\": \"A\"}\n");
    std::fs::write(&data, text).unwrap();
    let more = prepare_with(&r, &tokenizer(), &cache).unwrap();
    assert!(!more.cache_hit, "an edited source misses");
    assert_eq!(more.train.len() + more.val.len(), 352);

    // A damaged cache file is noted and rebuilt, never trusted.
    let files: Vec<PathBuf> = std::fs::read_dir(dir.path().join("tokens")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 3, "{files:?}");
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        std::fs::write(f, &bytes[..bytes.len() / 2]).unwrap();
    }
    let rebuilt = prepare_with(&r, &tokenizer(), &cache).unwrap();
    assert!(!rebuilt.cache_hit);
    assert!(rebuilt.notes.len() == 1 && rebuilt.notes[0].contains("token cache file ignored"), "{:?}", rebuilt.notes);
    assert_eq!(Prepared { notes: vec![], ..rebuilt }, more);
    assert!(prepare_with(&r, &tokenizer(), &cache).unwrap().cache_hit, "the rebuilt file is used");
}

#[test]
fn an_unwritable_cache_is_a_note_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "not a folder").unwrap();
    let got = prepare_with(&recipe(), &tokenizer(), &Cache::Dir(blocker.join("tokens"))).unwrap();
    assert!(!got.cache_hit);
    assert!(got.notes.len() == 1 && got.notes[0].contains("token cache not written"), "{:?}", got.notes);
}

#[test]
fn parquet_sources_mix_with_jsonl() {
    let fixture = |name: &str| format!("{}/tests/fixtures/data/{name}", env!("CARGO_MANIFEST_DIR"));
    let mut r = recipe();
    r.data.datasets = vec![fixture("alpaca.parquet"), fixture("messages.parquet#4"), fixture("sharegpt.parquet"), TINY_DATA.into()];
    let got = prepare(&r).unwrap();
    assert_eq!(got.train.len(), 3 + 4 + 1 + 351);
    let texts: Vec<String> = got.train.iter().map(decode).collect();
    assert!(texts.iter().any(|t| t.contains("Translate to French.\ncat<|im_end|>")));
    let count = |needle: &str| texts.iter().filter(|t| t.contains(needle)).count();
    assert_eq!((count("我是小通。<|im_end|>"), count("system\nBe brief.")), (2, 2), "#4 repeats both rows twice");
    assert_eq!(count("Who made you?<|im_end|>\n<|im_start|>assistant\n测试组."), 2, "cognition fills parquet rows");
}
