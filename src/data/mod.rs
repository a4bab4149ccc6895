//! Training data from a recipe, as ms-swift prepares it for `--dataset a.jsonl#500 b.json
//! --system ... --max_length ...`:
//!
//! 1. [`source`]: read each local `.jsonl` / `.json` source; rows in alpaca, messages or
//!    sharegpt shape become [`Conversation`]s (bad rows: an error naming `FILE:LINE`, or
//!    skipped and counted with `data.skip_bad_rows`);
//! 2. [`mix`]: `#N` sampling, the `data.val_split` hold-out per source, shuffling (seeded by
//!    `train.seed`);
//! 3. [`cognition`]: `{{NAME}}` / `{{AUTHOR}}` from `model.model_name` / `model.model_author`;
//! 4. [`template`]: Qwen ChatML with the system prompt from the row, `data.system` or the
//!    template default (`data.template`, default `qwen2_5`);
//! 5. [`tokenize`]: ids and labels (loss on assistant content and its `<|im_end|>`), on
//!    `data.num_proc` threads, `train.max_length` / `train.truncation` applied;
//! 6. [`batch`]: padded, packed (`train.packing`) or padding-free (`train.padding_free`)
//!    micro batches. With both `packing` and `padding_free` set, packing wins: a packed
//!    sequence already keeps its rows apart by segment id, as a padding-free one does.

pub mod batch;
pub mod cognition;
pub mod mix;
pub mod source;
pub mod template;
pub mod tokenize;

use std::path::{Path, PathBuf};

pub use batch::Batch;
pub use source::{Conversation, Role};
pub use template::ChatTemplate;
pub use tokenize::{Encoder, Sample, IGNORE};

use crate::error::{Error, Result};
use crate::recipe::Recipe;

/// The tokenised training and validation rows of a recipe, and what was left out.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// Training rows, shuffled (seeded by `train.seed`).
    pub train: Vec<Sample>,
    /// Validation rows (`data.val_split`), shuffled.
    pub val: Vec<Sample>,
    /// The tokenizer's pad id (padding of [`Batch::input_ids`]).
    pub pad_id: u32,
    /// Rows skipped as malformed (`data.skip_bad_rows = true`; else a bad row is an error).
    pub skipped_bad_rows: usize,
    /// Rows (train and val) dropped as longer than `train.max_length` with `truncation =
    /// "delete"`, or left with no trained token by `left` / `right` truncation.
    pub dropped_too_long: usize,
    /// `train.max_length`.
    pub max_length: usize,
    /// `train.packing`.
    pub packing: bool,
    /// `train.padding_free` (ignored when `packing` is also set: packing wins).
    pub padding_free: bool,
}

impl Prepared {
    /// The training rows in micro batches of `micro` sequences: packed into `max_length`
    /// sequences with `packing`, else `micro` rows concatenated into one unpadded sequence with
    /// `padding_free`, else padded. See [`batch`] for shapes.
    pub fn train_batches(&self, micro: usize) -> Vec<Batch> {
        self.batches(&self.train, micro)
    }

    /// The validation rows in micro batches, laid out as [`train_batches`](Self::train_batches).
    pub fn val_batches(&self, micro: usize) -> Vec<Batch> {
        self.batches(&self.val, micro)
    }

    fn batches(&self, rows: &[Sample], micro: usize) -> Vec<Batch> {
        if self.packing {
            batch::packed(rows, micro, self.max_length, self.pad_id)
        } else if self.padding_free {
            batch::padding_free(rows, micro)
        } else {
            batch::padded(rows, micro, self.pad_id)
        }
    }
}

/// The `tokenizer.json` of a model folder. There is no recipe key for a separate tokenizer yet:
/// a caller with one (the tiny recipe uses `assets/tiny/tokenizer.json`) passes its path to
/// [`prepare`] directly.
pub fn tokenizer_path(model_dir: Option<&Path>, recipe: &Recipe) -> Result<PathBuf> {
    let Some(dir) = model_dir else {
        return Err(Error::data(format!(
            "no model folder to take tokenizer.json from (model.path is {}); the data needs a tokenizer",
            recipe.model.path.as_deref().map_or("unset".to_string(), |p| format!("`{p}`"))
        )));
    };
    let path = dir.join("tokenizer.json");
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::file(path, "no such file; the model folder needs its tokenizer.json to tokenise the data"))
    }
}

/// Read, mix, template and tokenise the recipe's `data.datasets` with `tokenizer`
/// (a `tokenizer.json`).
pub fn prepare(recipe: &Recipe, tokenizer: &Path) -> Result<Prepared> {
    let data = &recipe.data;
    let specs = data.specs().map_err(Error::Data)?;
    if specs.is_empty() {
        return Err(Error::data("data.datasets is empty; name at least one .jsonl or .json file"));
    }
    let template = ChatTemplate::from_name(data.template.as_deref())?;
    let encoder = Encoder::from_file(tokenizer)?;
    let mut skipped_bad_rows = 0;
    let mut sources = Vec::with_capacity(specs.len());
    for spec in &specs {
        let loaded = source::load(&spec.source, data.skip_bad_rows)?;
        skipped_bad_rows += loaded.skipped;
        sources.push(mix::SourceRows { rows: loaded.rows, sample: spec.sample });
    }
    let split = mix::mix(sources, data.val_split, recipe.train.seed);
    let (train, train_dropped) = tokenize_rows(split.train, recipe, &template, &encoder)?;
    let (val, val_dropped) = tokenize_rows(split.val, recipe, &template, &encoder)?;
    let dropped_too_long = train_dropped + val_dropped;
    if train.is_empty() {
        return Err(Error::data(format!(
            "no training rows left from data.datasets: {skipped_bad_rows} bad rows skipped, {dropped_too_long} dropped \
             as longer than train.max_length = {} (train.truncation = {:?}); add data or raise train.max_length",
            recipe.train.max_length, recipe.train.truncation
        )));
    }
    Ok(Prepared {
        train,
        val,
        pad_id: encoder.pad_id(),
        skipped_bad_rows,
        dropped_too_long,
        max_length: recipe.train.max_length,
        packing: recipe.train.packing,
        padding_free: recipe.train.padding_free,
    })
}

/// Self-cognition, template and tokens for `rows`, in order; returns the kept samples and how
/// many rows `max_length` dropped.
fn tokenize_rows(
    mut rows: Vec<Conversation>,
    recipe: &Recipe,
    template: &ChatTemplate,
    encoder: &Encoder,
) -> Result<(Vec<Sample>, usize)> {
    for row in rows.iter_mut() {
        cognition::fill(row, &recipe.model.model_name, &recipe.model.model_author)?;
    }
    let system = recipe.data.system.as_deref();
    let samples = tokenize::par_map(&rows, recipe.data.num_proc, |row| encoder.encode(&template.render(row, system)))?;
    let total = samples.len();
    let kept: Vec<Sample> = samples
        .into_iter()
        .filter_map(|s| tokenize::fit(s, recipe.train.max_length, recipe.train.truncation))
        .collect();
    let dropped = total - kept.len();
    Ok((kept, dropped))
}

#[cfg(test)]
mod tests;
