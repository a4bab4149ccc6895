//! Training data from a recipe, as ms-swift prepares it for `--dataset a.jsonl#500 b.json
//! --system ... --max_length ...`:
//!
//! 1. [`source`]: read each `.jsonl` / `.json` / `.parquet` ([`parquet`]) source, local or
//!    from a hub dataset `org/name` ([`hub`]); rows in alpaca, messages or sharegpt shape
//!    become [`Conversation`]s (bad rows: an error naming `FILE:LINE` or `FILE:row N`, or
//!    skipped and counted with `data.skip_bad_rows`);
//! 2. [`mix`]: `#N` sampling, the `data.val_split` hold-out per source, shuffling (seeded by
//!    `train.seed`);
//! 3. [`cognition`]: `{{NAME}}` / `{{AUTHOR}}` from `model.model_name` / `model.model_author`;
//! 4. [`template`]: the model's own Jinja chat template (or `data.template`: a built-in or a
//!    file), rendered as transformers renders it, the system prompt from the row or
//!    `data.system` (else the template's default), and the trained ranges (each assistant
//!    reply through its end-of-turn token);
//! 5. [`tokenize`]: ids and labels, on `data.num_proc` threads, `train.max_length` /
//!    `train.truncation` applied;
//! 6. [`batch`]: padded, packed (`train.packing`) or padding-free (`train.padding_free`)
//!    micro batches. With both `packing` and `padding_free` set, packing wins: a packed
//!    sequence already keeps its rows apart by segment id, as a padding-free one does.
//!
//! Steps 1 to 5 are cached on disk ([`cache`]): a rerun on the same files, tokenizer and
//! recipe reads the tokenised rows back ([`Prepared::cache_hit`]).

pub mod batch;
pub mod cache;
pub mod cognition;
pub mod hub;
pub mod mix;
pub mod parquet;
pub mod source;
pub mod template;
pub mod tokenize;

use std::path::{Path, PathBuf};

pub use batch::Batch;
pub use cache::Cache;
pub use source::{Conversation, Role};
pub use template::{ChatTemplate, Rendered};
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
    /// Whether the rows were read from the token cache rather than tokenised now.
    pub cache_hit: bool,
    /// Things the caller should log: a cache file ignored as corrupt, one that could not be
    /// written. Empty when all went well.
    pub notes: Vec<String>,
    /// Per `data.datasets` entry, what it gave; empty when the rows came from the cache.
    pub sources: Vec<SourceStats>,
}

/// What one `data.datasets` entry gave: rows read (bad rows skipped), after its `#N`, and how
/// many went to training and validation (before `train.max_length` drops).
#[derive(Debug, Clone, PartialEq)]
pub struct SourceStats {
    pub source: String,
    pub read: usize,
    pub train: usize,
    pub val: usize,
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
/// (a `tokenizer.json`), through the token cache that [`Cache::from_env`] names.
pub fn prepare(recipe: &Recipe, tokenizer: &Path) -> Result<Prepared> {
    prepare_with(recipe, tokenizer, &Cache::from_env(recipe))
}

/// [`prepare`] with the cache given: [`Cache::Off`] neither reads nor writes one.
pub fn prepare_with(recipe: &Recipe, tokenizer: &Path, cache: &Cache) -> Result<Prepared> {
    let data = &recipe.data;
    let specs = data.specs().map_err(Error::Data)?;
    if specs.is_empty() {
        return Err(Error::data("data.datasets is empty; name at least one .jsonl, .json or .parquet file"));
    }
    let template = ChatTemplate::for_data(&data.template_options(), tokenizer)?;
    let files: Vec<Vec<PathBuf>> = specs.iter().map(|spec| source::resolve(&spec.source)).collect::<Result<_>>()?;
    let mut notes = Vec::new();
    let cache_file = match cache {
        Cache::Off => None,
        Cache::Dir(dir) => {
            let mut key = cache::Key::new(recipe);
            key.file(tokenizer).map_err(|e| Error::file(tokenizer, e))?;
            key.text(template.source());
            for path in files.iter().flatten() {
                key.file(path).map_err(|e| Error::file(path, e))?;
            }
            Some(dir.join(key.file_name()))
        }
    };
    if let Some(path) = &cache_file {
        match cache::read(path) {
            Ok(Some(cached)) => return Ok(Prepared::new(cached, recipe, true, notes, Vec::new())),
            Ok(None) => {}
            Err(why) => notes.push(format!("{}: token cache file ignored ({why}); rebuilt", path.display())),
        }
    }
    let encoder = Encoder::from_file(tokenizer)?;
    let mut skipped_bad_rows = 0;
    let mut sources = Vec::with_capacity(specs.len());
    let mut read = Vec::with_capacity(specs.len());
    for (spec, paths) in specs.iter().zip(&files) {
        let mut rows = Vec::new();
        for path in paths {
            let loaded = source::load_file(path, data.skip_bad_rows)?;
            skipped_bad_rows += loaded.skipped;
            rows.extend(loaded.rows);
        }
        read.push(rows.len());
        sources.push(mix::SourceRows { rows, sample: spec.sample });
    }
    let split = mix::mix(sources, data.val_split, recipe.train.seed);
    let stats: Vec<SourceStats> = specs
        .iter()
        .zip(&read)
        .zip(&split.per_source)
        .map(|((spec, &read), &(train, val))| SourceStats { source: spec.source.clone(), read, train, val })
        .collect();
    if split.train.is_empty() {
        let described: Vec<String> = stats.iter().map(|s| format!("{}: {} rows read, {} to validation", s.source, s.read, s.val)).collect();
        let cause = if stats.iter().all(|s| s.read == 0) {
            "the files hold no rows".to_string()
        } else {
            format!("data.val_split = {} takes every row for validation", data.val_split)
        };
        return Err(Error::data(format!(
            "no training rows: {cause} ({}{}); add rows or lower data.val_split",
            described.join("; "),
            if skipped_bad_rows > 0 { format!("; {skipped_bad_rows} bad rows skipped") } else { String::new() }
        )));
    }
    let (train, train_dropped) = tokenize_rows(split.train, recipe, &template, &encoder)?;
    let (val, val_dropped) = tokenize_rows(split.val, recipe, &template, &encoder)?;
    let dropped_too_long = train_dropped + val_dropped;
    if train.is_empty() {
        let how = match recipe.train.truncation {
            crate::recipe::Truncation::Delete => "dropped as longer than",
            _ => "left with no trained token by truncation to",
        };
        return Err(Error::data(format!(
            "no training rows left from {}: all {train_dropped} dropped: {how} train.max_length = {} \
             (train.truncation = \"{}\"); raise train.max_length or set train.truncation = \"left\"",
            specs.iter().map(|s| s.source.as_str()).collect::<Vec<_>>().join(", "),
            recipe.train.max_length,
            recipe.train.truncation.as_str()
        )));
    }
    let cached = cache::Cached { train, val, pad_id: encoder.pad_id(), skipped_bad_rows, dropped_too_long };
    if let Some(path) = &cache_file {
        if let Err(e) = cache::write(path, &cached) {
            notes.push(format!("{}: token cache not written ({e}); the next run tokenises again", path.display()));
        }
    }
    Ok(Prepared::new(cached, recipe, false, notes, stats))
}

impl Prepared {
    fn new(c: cache::Cached, recipe: &Recipe, cache_hit: bool, notes: Vec<String>, sources: Vec<SourceStats>) -> Prepared {
        Prepared {
            train: c.train,
            val: c.val,
            pad_id: c.pad_id,
            skipped_bad_rows: c.skipped_bad_rows,
            dropped_too_long: c.dropped_too_long,
            max_length: recipe.train.max_length,
            packing: recipe.train.packing,
            padding_free: recipe.train.padding_free,
            cache_hit,
            notes,
            sources,
        }
    }
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
    let samples = tokenize::par_map(&rows, recipe.data.num_proc, |row| sample(row, recipe.data.system.as_deref(), template, encoder))?;
    let total = samples.len();
    let kept: Vec<Sample> = samples
        .into_iter()
        .filter_map(|s| tokenize::fit(s, recipe.train.max_length, recipe.train.truncation))
        .collect();
    let dropped = total - kept.len();
    Ok((kept, dropped))
}

/// One row's token ids and labels: `system` (`data.system`) as its system prompt when it has
/// none, rendered by `template`. An error names the row.
pub fn sample(row: &Conversation, system: Option<&str>, template: &ChatTemplate, encoder: &Encoder) -> Result<Sample> {
    let rendered = render(row, system, template)?;
    encoder.encode(&rendered).map_err(|e| Error::Data(format!("{}: {e}", row.place)))
}

/// `row` rendered by `template`, `system` its system prompt when it has none.
pub fn render(row: &Conversation, system: Option<&str>, template: &ChatTemplate) -> Result<Rendered> {
    let filled;
    let row = match system {
        Some(system) if row.system().is_none() => {
            filled = {
                let mut r = row.clone();
                r.set_default_system(system);
                r
            };
            &filled
        }
        _ => row,
    };
    template.render(row).map_err(|e| Error::Data(if row.place.is_empty() { e } else { format!("{}: {e}", row.place) }))
}

#[cfg(test)]
mod tests;
