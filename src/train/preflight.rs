//! Everything a recipe can be checked for before a job starts, in one place: `trainer check`
//! reports it (and dry-runs the data), `trainer run` refuses on it before it creates its run
//! folder, `trainer bench` before it builds the model. Each failure is one sentence naming the
//! key and what would be valid (exit code 2).

use std::path::{Path, PathBuf};

use crate::data::{self, Encoder, Prepared};
use crate::error::{Error, Result};
use crate::lora::LoraTargets;
use crate::model::summary::{self, ModelSummary};
use crate::model::{self, ModelPlan};
use crate::recipe::{LoadedRecipe, Recipe, Tuning};

/// What passed, with what the caller may print.
pub struct ModelCheck {
    pub summary: ModelSummary,
    /// Things checked only in part (memory against a GPU this machine does not have).
    pub notes: Vec<String>,
}

/// The model side of a job: parallel layout, adapters, recompute, length, memory. With
/// `here` false (`trainer check`), a job on `device = "auto"` may be meant for another machine
/// than this GPU-less one: its memory against this machine is a note, not a refusal.
pub fn model(loaded: &LoadedRecipe, plan: &ModelPlan, here: bool) -> Result<ModelCheck> {
    let r = &loaded.recipe;
    model::check_layout(&plan.spec, &r.parallel)?;
    let max_pos = plan.spec.max_position_embeddings;
    if r.train.max_length > max_pos {
        return Err(Error::model(format!(
            "train.max_length = {} is more than the model's max_position_embeddings = {max_pos} ({}); lower \
             train.max_length, or raise max_position_embeddings under [model.config] if the model was trained that long",
            r.train.max_length, plan.config.source
        )));
    }
    super::recompute::groups(&r.train.recompute, plan.spec.layers.len())?;
    router_aux_loss_coef(r, &plan.spec)?;
    if r.train.tuning == Tuning::Lora {
        lora_targets(r, plan)?;
    }
    let summary = summary::ModelSummary::new(&plan.spec, &summary::RunShape::of(r)?)?;
    let refuse = here || r.device != crate::recipe::Device::Auto || crate::backend::cuda_available();
    let notes = summary::check_fits(&summary, r.device, refuse)?.into_iter().collect();
    Ok(ModelCheck { summary, notes })
}

/// The weight of the routers' load-balancing loss this run trains with: `train.router_aux_loss_coef`
/// where set, else the config's where the routers are trained (full tuning; LoRA never adapts a
/// router), else 0. A weight above 0 on a model without routers is refused.
pub fn router_aux_loss_coef(r: &Recipe, spec: &model::ArchSpec) -> Result<f64> {
    let routed = spec.layers.iter().any(|l| matches!(l.mlp, model::MlpSpec::Moe { .. }));
    match r.train.router_aux_loss_coef {
        Some(c) if c > 0.0 && !routed => Err(Error::model(format!(
            "train.router_aux_loss_coef = {c}, but {} has no mixture-of-experts layer (no router to balance); \
             remove train.router_aux_loss_coef",
            spec.family
        ))),
        Some(c) => Ok(c),
        None if routed && r.train.tuning == Tuning::Full => Ok(spec.router_aux_loss_coef),
        None => Ok(0.0),
    }
}

/// Every LoRA target must adapt something (peft refuses a target it finds nowhere), and the
/// rank must fit the layers it adapts.
fn lora_targets(r: &Recipe, plan: &ModelPlan) -> Result<()> {
    let linears = summary::linears(&plan.spec);
    for (i, t) in r.lora.targets.iter().enumerate() {
        let one = LoraTargets::parse(std::slice::from_ref(t))?;
        if !linears.iter().any(|l| one.matches(&l.path)) {
            let mut leaves: Vec<&str> = linears.iter().map(|l| l.path.rsplit('.').next().unwrap_or(&l.path)).collect();
            leaves.sort();
            leaves.dedup();
            return Err(Error::model(format!(
                "lora.targets[{i}] = \"{t}\" matches no linear layer of this {} model; its linear layers are {}, or use \
                 \"all-linear\" or \"re:<regex over module paths>\"",
                plan.spec.family,
                leaves.join(", ")
            )));
        }
    }
    let targets = LoraTargets::parse(&r.lora.targets)?;
    if let Some(small) = linears.iter().filter(|l| targets.matches(&l.path)).min_by_key(|l| l.inp.min(l.out)) {
        let dim = small.inp.min(small.out);
        if r.lora.rank > dim {
            return Err(Error::model(format!(
                "lora.rank = {} is larger than {} ({} x {}), the smallest layer it adapts; expected a rank of at most {dim} \
                 (8 to 64 is usual)",
                r.lora.rank, small.path, small.inp, small.out
            )));
        }
    }
    Ok(())
}

/// The data side without reading the rows: the tokenizer (present, its ids within the model's
/// vocabulary), the chat template, every dataset file, and the run's output folder.
pub fn data(r: &Recipe, plan: &ModelPlan) -> Result<PathBuf> {
    let tok = tokenizer(r, plan)?;
    let encoder = Encoder::from_file(&tok)?;
    let (max_id, vocab) = (encoder.max_id() as usize, plan.spec.vocab_size);
    if max_id >= vocab {
        return Err(Error::model(format!(
            "{}: the tokenizer has ids up to {max_id}, but the model's vocab_size is {vocab} ({}); use the model's own \
             tokenizer, or set vocab_size to {} or more under [model.config]",
            tok.display(),
            plan.config.source,
            max_id + 1
        )));
    }
    if r.data.datasets.is_empty() {
        return Err(Error::data("data.datasets is empty; name at least one .jsonl, .json or .parquet file"));
    }
    for spec in r.data.specs().map_err(Error::Data)? {
        data::source::resolve(&spec.source)?;
    }
    Ok(tok)
}

/// What needs no file read: the chat template is one this build has, and
/// `checkpoint.output_dir` is a folder or does not exist yet.
pub fn settings(r: &Recipe) -> Result<()> {
    data::template::check_name(r.data.template.as_deref())?;
    let dir = Path::new(&r.checkpoint.output_dir);
    if dir.exists() && !dir.is_dir() {
        return Err(Error::file(dir, "checkpoint.output_dir is a file; expected a folder (or a path to create)"));
    }
    Ok(())
}

/// The tokenizer a recipe's data is tokenised with: `model.tokenizer`, else the model
/// folder's `tokenizer.json`.
pub fn tokenizer(r: &Recipe, plan: &ModelPlan) -> Result<PathBuf> {
    match &r.model.tokenizer {
        Some(p) => {
            let p = PathBuf::from(p);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::file(p, "model.tokenizer: no such file; point it at a tokenizer.json"))
            }
        }
        None => data::tokenizer_path(plan.dir.as_deref(), r),
    }
}

/// `trainer check`'s data dry run: the rows as a run would train on them, described, then the
/// first `n` rows of the data (in file order, before any mixing) as the model sees them, as
/// ms-swift logs `[INPUT]` and `[LABELS]` at start: the rendered text with the trained ranges
/// between `⟦` and `⟧`, the token ids, and the labels decoded with runs of untrained positions
/// as `[-100 * N]`. Also those rows as JSON (`trainer check --json`).
pub fn dry_run(r: &Recipe, tokenizer: &Path, n: usize) -> Result<(String, serde_json::Value)> {
    let template = data::ChatTemplate::for_data(&r.data.template_options(), tokenizer)?;
    let p = data::prepare_with(r, tokenizer, &data::Cache::Off)?;
    let mut text = format!("chat template     {}\n{}", template.origin(), describe(&p, r));
    let encoder = data::Encoder::from_file(tokenizer)?;
    let mut rows = Vec::new();
    for spec in r.data.specs().map_err(Error::Data)? {
        if rows.len() >= n {
            break;
        }
        for path in data::source::resolve(&spec.source)? {
            let loaded = data::source::load_file(&path, r.data.skip_bad_rows)?;
            rows.extend(loaded.rows.into_iter().take(n - rows.len()));
            if rows.len() >= n {
                break;
            }
        }
    }
    let mut json_rows = Vec::new();
    for row in rows.iter_mut() {
        data::cognition::fill(row, &r.model.model_name, &r.model.model_author)?;
        let rendered = data::render(row, r.data.system.as_deref(), &template)?;
        let sample = encoder.encode(&rendered).map_err(|e| Error::Data(format!("{}: {e}", row.place)))?;
        let labels = decoded_labels(&encoder, &sample.labels)?;
        text.push_str(&format!(
            "\n\n# {} as trained (⟦ ⟧: the trained text; {} tokens, {} trained)\n[INPUT] {}\n[INPUT_IDS] {:?}\n[LABELS] {}\n[LABELS_IDS] {:?}",
            row.place,
            sample.len(),
            sample.labels.iter().filter(|&&l| l != data::IGNORE).count(),
            marked(&rendered),
            sample.input_ids,
            labels,
            sample.labels
        ));
        json_rows.push(serde_json::json!({
            "place": row.place,
            "text": rendered.text,
            "trained": rendered.trained.iter().map(|r| [r.start, r.end]).collect::<Vec<_>>(),
            "input_ids": sample.input_ids,
            "labels": sample.labels,
        }));
    }
    let json = serde_json::json!({ "chat_template": template.origin().to_string(), "rows": json_rows });
    Ok((text, json))
}

/// The rendered text with each trained range between `⟦` and `⟧`.
fn marked(rendered: &data::Rendered) -> String {
    let mut out = String::with_capacity(rendered.text.len() + 8 * rendered.trained.len());
    let mut at = 0;
    for range in &rendered.trained {
        out.push_str(&rendered.text[at..range.start]);
        out.push('⟦');
        out.push_str(&rendered.text[range.clone()]);
        out.push('⟧');
        at = range.end;
    }
    out.push_str(&rendered.text[at..]);
    out
}

/// Labels as ms-swift prints them: trained ids decoded, untrained runs as `[-100 * N]`.
fn decoded_labels(encoder: &data::Encoder, labels: &[i64]) -> Result<String> {
    let mut out = String::new();
    let mut i = 0;
    while i < labels.len() {
        let j = labels[i..].iter().position(|&l| (l == data::IGNORE) != (labels[i] == data::IGNORE)).map_or(labels.len(), |k| i + k);
        if labels[i] == data::IGNORE {
            out.push_str(&format!("[-100 * {}]", j - i));
        } else {
            let ids: Vec<u32> = labels[i..j].iter().map(|&l| l as u32).collect();
            out.push_str(&encoder.tokenizer().decode(&ids, false).map_err(|e| Error::data(format!("tokenizer: {e}")))?);
        }
        i = j;
    }
    Ok(out)
}

fn describe(p: &Prepared, r: &Recipe) -> String {
    let mut out = String::from("source                                   rows read    train      val\n");
    for s in &p.sources {
        out.push_str(&format!("{:<40} {:>9} {:>8} {:>8}\n", s.source, s.read, s.train, s.val));
    }
    out.push_str(&format!(
        "kept              {} training rows, {} validation rows; {} bad rows skipped (data.skip_bad_rows); {} dropped as \
         longer than train.max_length = {} (train.truncation = \"{}\")\n",
        p.train.len(),
        p.val.len(),
        p.skipped_bad_rows,
        p.dropped_too_long,
        r.train.max_length,
        r.train.truncation.as_str()
    ));
    let mut lens: Vec<usize> = p.train.iter().map(|s| s.len()).collect();
    lens.sort_unstable();
    let at = |q: f64| lens.get(((lens.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0);
    out.push_str(&format!(
        "tokens per row    p50 {}, p90 {}, p99 {}, max {}\n",
        at(0.5),
        at(0.9),
        at(0.99),
        lens.last().copied().unwrap_or(0)
    ));
    let trained: usize = p.train.iter().map(|s| s.labels.iter().skip(1).filter(|&&l| l != data::IGNORE).count()).sum();
    let micro = r.train.micro_batch_size;
    let batches = p.train_batches(micro).len();
    let steps = batches / r.gradient_accumulation_steps();
    out.push_str(&format!("per epoch         {trained} trained tokens, {batches} micro batches of {micro}, {steps} optimizer steps"));
    out
}
