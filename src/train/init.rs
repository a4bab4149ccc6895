//! `trainer init`: a complete, commented recipe for a model and its data, as the seed recipes in
//! `recipes/` are written, with the parallel layout and batch sizes chosen for this machine from
//! the memory estimate `trainer check` prints. The recipe is loaded and checked before it is
//! written, and an existing file is never overwritten.

use std::path::{Path, PathBuf};

use crate::recipe::{load, RecomputeGranularity, RecomputeSection, Tuning};
use crate::error::{Error, Result};
use crate::model::summary::{ModelSummary, RunShape};
use crate::model::{self, hub::Fetch, spec::MlpSpec, ModelPlan, Registry};

/// What `trainer init` was asked for.
#[derive(Debug, Clone)]
pub struct InitRequest {
    /// A local model folder or a Hugging Face hub id.
    pub model: String,
    /// Data sources in ms-swift syntax: local files or hub ids, each optionally `#N`.
    pub data: Vec<String>,
    pub tuning: Tuning,
    /// GPUs to lay the job out on; 0 trains on the CPU.
    pub gpus: usize,
    /// Bytes one GPU (or, without GPUs, the host) holds; `None` when unknown.
    pub memory: Option<u64>,
    pub out: PathBuf,
}

/// The layout and batch chosen for the job.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub data: usize,
    pub tensor: usize,
    pub expert: usize,
    /// Full fine-tuning over several data-parallel ranks deals the optimizer's state over them.
    pub distributed_optimizer: bool,
    pub micro_batch: usize,
    pub global_batch: usize,
    pub recompute: bool,
    pub max_length: usize,
    /// The estimate for this choice and what a rank holds, GiB.
    pub estimate_gib: f64,
    pub capacity_gib: Option<f64>,
}

/// Share of a device's memory the estimate may fill: the estimate leaves out the allocator's
/// slack and the kernels' workspaces.
const HEADROOM: f64 = 0.8;
/// The global batch ms-swift's examples use; micro batches add up to it by accumulation.
const GLOBAL_BATCH: usize = 16;

/// Writes the recipe for `req` to `req.out` (never over an existing file) and returns what was
/// chosen.
pub fn init(req: &InitRequest, registry: &Registry) -> Result<Choice> {
    for source in &req.data {
        check_source(source)?;
    }
    let section = crate::recipe::ModelSection { path: Some(req.model.clone()), ..Default::default() };
    let plan = model::plan(&section, registry, Fetch::Config)?;
    let choice = choose(&plan, req)?;
    let text = render(req, &plan, &choice);
    write_new(&req.out, &text, |tmp| {
        // Exactly what `trainer check` does with the model (the data may live on a hub).
        let loaded = load(tmp, &[])?;
        super::preflight::model(&loaded, &plan, false)?;
        super::preflight::settings(&loaded.recipe)
    })?;
    Ok(choice)
}

/// A local data file must exist; hub ids (`owner/name`, no file extension) are left to `run`.
fn check_source(source: &str) -> Result<()> {
    let path = source.split_once('#').map_or(source, |(p, _)| p);
    let looks_local = Path::new(path).exists()
        || [".jsonl", ".json", ".csv", ".parquet", ".txt"].iter().any(|ext| path.ends_with(ext))
        || path.starts_with('.')
        || path.starts_with('/');
    match looks_local && !Path::new(path).is_file() {
        true => Err(Error::file(path, "no such data file (--data takes local files, or hub ids such as AI-ModelScope/alpaca-gpt4-data-en#500)")),
        false => Ok(()),
    }
}

/// The smallest tensor-parallel size (dense layers) or expert-parallel size (MoE layers) whose
/// estimate fits a rank, then the largest micro batch that fits, recomputing only when the
/// activations do not fit otherwise.
pub fn choose(plan: &ModelPlan, req: &InitRequest) -> Result<Choice> {
    let spec = &plan.spec;
    let gpus = req.gpus.max(1);
    let moe = spec.layers.iter().any(|l| matches!(l.mlp, MlpSpec::Moe { .. }));
    let max_length = spec.max_position_embeddings.min(2048);
    let capacity = req.memory.map(|b| b as f64 / (1u64 << 30) as f64);
    let fits = |gib: f64| capacity.is_none_or(|c| gib <= c * HEADROOM);
    let splits: Vec<usize> = (0..).map(|k| 1usize << k).take_while(|&n| n <= gpus).filter(|n| gpus % n == 0).collect();
    let base = RunShape {
        data: 1,
        tensor: 1,
        expert: 1,
        context: 1,
        sequence_parallel: false,
        micro_batch: 1,
        seq_len: max_length,
        lora: match req.tuning {
            Tuning::Lora => Some((8, crate::lora::LoraTargets::parse(&["all-linear".to_string()])?)),
            Tuning::Full => None,
        },
        weight_bytes: if req.gpus > 0 { 2 } else { 4 },
        recompute: RecomputeSection::default(),
        fused_cross_entropy: true,
        distributed_optimizer: false,
    };
    let mut tried = Vec::new();
    // First the smallest split that runs micro batches of 4 or more (splitting further costs
    // communication; smaller micro batches waste the GPU), then any that runs at all.
    for least_micro_batch in [4, 1] {
        for &split in &splits {
            let (tensor, expert) = match moe {
                true => (1, split),
                false => (split, 1),
            };
            let data = gpus / tensor;
            let distributed_optimizer = req.tuning == Tuning::Full && data > 1;
            let layout = crate::recipe::ParallelSection { data, tensor, expert, distributed_optimizer, ..Default::default() };
            if model::check_layout(spec, &layout).is_err() {
                continue;
            }
            for micro_batch in [16, 8, 4, 2, 1].into_iter().filter(|&m| m >= least_micro_batch) {
                for recompute in [false, true] {
                    let gib = estimate(plan, &base, &layout, micro_batch, recompute)?;
                    tried.push(gib);
                    if fits(gib) {
                        let global_batch = (micro_batch * data).max(GLOBAL_BATCH).next_multiple_of(micro_batch * data);
                        return Ok(Choice { data, tensor, expert, distributed_optimizer, micro_batch, global_batch, recompute, max_length, estimate_gib: gib, capacity_gib: capacity });
                    }
                }
            }
        }
    }
    let least = tried.iter().cloned().fold(f64::INFINITY, f64::min);
    Err(Error::Unsupported(format!(
        "{} does not fit {} with any layout tried (tensor or expert parallel up to {gpus}, micro batch down to 1 with \
         recompute): the least estimate is {least:.1} GiB a rank against {:.1} GiB ({:.0}% of {:.1} GiB); {}",
        req.model,
        if req.gpus == 0 { "this machine's memory".to_string() } else { format!("{} GPU(s)", req.gpus) },
        capacity.unwrap_or(0.0) * HEADROOM,
        HEADROOM * 100.0,
        capacity.unwrap_or(0.0),
        if req.tuning == Tuning::Full { "LoRA (--lora) needs far less" } else { "more GPUs (--gpus) would split it further" }
    )))
}

/// The memory estimate of `base` laid out as `p`, with `micro_batch` and `recompute`.
fn estimate(plan: &ModelPlan, base: &RunShape, p: &crate::recipe::ParallelSection, micro_batch: usize, recompute: bool) -> Result<f64> {
    let shape = RunShape {
        data: p.data,
        tensor: p.tensor,
        expert: p.expert,
        sequence_parallel: p.tensor > 1,
        distributed_optimizer: p.distributed_optimizer,
        micro_batch,
        // init writes whole-layer recompute or none.
        recompute: match recompute {
            true => RecomputeSection { granularity: RecomputeGranularity::Full, ..Default::default() },
            false => RecomputeSection::default(),
        },
        ..base.clone()
    };
    Ok(ModelSummary::new(&plan.spec, &shape)?.memory.total)
}

/// The built-in chat template for a model folder without one of its own (`None`: the model's
/// own is used, or the model is on a hub and brings its own).
fn template_for(model: &str, family: &str) -> Option<&'static str> {
    let dir = Path::new(model);
    if !dir.is_dir() || dir.join("chat_template.jinja").is_file() {
        return None;
    }
    let config = std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap_or_default();
    if config.contains("\"chat_template\"") {
        return None;
    }
    Some(match family {
        f if f.starts_with("qwen3") => "qwen3",
        // Qwen1.5-MoE and Qwen2-MoE chat in Qwen2's ChatML (no Qwen2.5 system prompt).
        "qwen2_moe" => "qwen2",
        f if f.starts_with("llama") => "llama3_1",
        _ => "qwen2_5",
    })
}

/// A TOML string literal.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// `key = value` with its comment aligned, as the seed recipes are laid out.
fn entry(t: &mut String, setting: &str, comment: &str) {
    match comment.is_empty() {
        true => t.push_str(setting),
        false => t.push_str(&format!("{setting:<45} # {comment}")),
    }
    t.push('\n');
}

fn render(req: &InitRequest, plan: &ModelPlan, c: &Choice) -> String {
    let name = req.model.trim_end_matches('/').rsplit('/').next().unwrap_or("model");
    let world = c.data * c.tensor;
    let lora = req.tuning == Tuning::Lora;
    let mut t = String::new();
    let machine = match req.gpus {
        0 => "this machine's CPU".to_string(),
        n => format!("{n} GPU(s) of {}", c.capacity_gib.map_or("unknown memory".to_string(), |g| format!("{g:.0} GiB"))),
    };
    t.push_str(&format!("# {} SFT of {name}, written by `trainer init` for {machine}.\n", if lora { "LoRA" } else { "Full" }));
    t.push_str(&format!(
        "# Layout and batch sizes from the memory estimate: {:.1} GiB a rank{}.\n",
        c.estimate_gib,
        c.capacity_gib.map_or(String::new(), |g| format!(" of {g:.0} GiB ({:.0}% kept free)", (1.0 - HEADROOM) * 100.0))
    ));
    t.push_str("# Keys left out take their defaults: `trainer help recipe KEY` documents each.\n");
    t.push_str("#   trainer check THIS.toml\n");
    t.push_str(&match world {
        1 => "#   trainer run   THIS.toml\n".to_string(),
        n => format!("#   trainer run   THIS.toml --nproc-per-node {n}\n"),
    });
    entry(&mut t, &format!("device = {}", quoted(if req.gpus == 0 { "cpu" } else { "cuda" })), "");
    t.push('\n');
    entry(&mut t, "[model]", "--model");
    entry(&mut t, &format!("path = {}", quoted(&req.model)), &format!("family {}", plan.spec.family));
    entry(&mut t, "dtype = \"bf16\"", "--torch_dtype bfloat16");
    t.push('\n');
    entry(&mut t, "[parallel]", &format!("{world} rank(s)"));
    entry(&mut t, &format!("data = {}", c.data), "data-parallel replicas");
    entry(&mut t, &format!("tensor = {}", c.tensor), "--tensor_model_parallel_size");
    entry(&mut t, &format!("expert = {}", c.expert), "--expert_model_parallel_size");
    entry(&mut t, &format!("sequence_parallel = {}", c.tensor > 1), "--sequence_parallel");
    if c.distributed_optimizer {
        entry(&mut t, "distributed_optimizer = true", "--use_distributed_optimizer");
    }
    t.push('\n');
    if lora {
        entry(&mut t, "[lora]", "--lora_rank 8 --lora_alpha 32 --target_modules all-linear");
        entry(&mut t, "rank = 8", "");
        entry(&mut t, "alpha = 32", "");
        entry(&mut t, "targets = [\"all-linear\"]", "");
        t.push('\n');
    }
    entry(&mut t, "[train]", "");
    entry(&mut t, &format!("tuning = {}", quoted(if lora { "lora" } else { "full" })), "--train_type");
    entry(&mut t, &format!("micro_batch_size = {}", c.micro_batch), "--micro_batch_size");
    let accumulation = c.global_batch / (c.micro_batch * c.data);
    entry(&mut t, &format!("global_batch_size = {}", c.global_batch), &format!("--global_batch_size ({accumulation} micro batch(es) a replica a step)"));
    entry(&mut t, "max_epochs = 1", "--max_epochs");
    entry(&mut t, &format!("max_length = {}", c.max_length), "--max_length");
    entry(&mut t, "fused_cross_entropy = true", "--cross_entropy_loss_fusion true");
    t.push('\n');
    entry(&mut t, "[train.recompute]", if c.recompute { "--recompute_granularity full" } else { "none: the activations fit" });
    entry(&mut t, &format!("granularity = {}", quoted(if c.recompute { "full" } else { "none" })), "");
    t.push('\n');
    entry(&mut t, "[optimizer]", "");
    entry(&mut t, &format!("lr = {}", if lora { "1e-4" } else { "1e-5" }), "--lr");
    t.push('\n');
    entry(&mut t, "[schedule]", "");
    entry(&mut t, "warmup_fraction = 0.05", "--lr_warmup_fraction");
    t.push('\n');
    entry(&mut t, "[data]", "--dataset");
    entry(&mut t, &format!("datasets = [{}]", req.data.iter().map(|d| quoted(d)).collect::<Vec<_>>().join(", ")), "");
    entry(&mut t, "val_split = 0.0", "--split_dataset_ratio");
    match template_for(&req.model, &plan.spec.family) {
        Some(name) => entry(&mut t, &format!("template = {}", quoted(name)), "--template (the model folder brings none)"),
        None => t.push_str("# template: the model's own (chat_template.jinja or tokenizer_config.json)\n"),
    }
    t.push('\n');
    entry(&mut t, "[checkpoint]", "");
    entry(&mut t, &format!("output_dir = {}", quoted(&format!("output/{name}"))), "--save");
    entry(&mut t, "save_interval = 100", "--save_interval");
    t
}

/// `text` written to `path` through a file beside it that `accept` checks first, then linked
/// into place: an existing file is never overwritten, a half-written one never appears.
fn write_new(path: &Path, text: &str, accept: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if path.exists() {
        return Err(Error::file(path, "already exists: trainer init never overwrites a file (choose another --out)"));
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("recipe.toml"), std::process::id()));
    std::fs::write(&tmp, text).map_err(|e| Error::file(&tmp, e))?;
    let placed = accept(&tmp).and_then(|()| {
        std::fs::hard_link(&tmp, path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::file(path, "already exists: trainer init never overwrites a file (choose another --out)"),
            _ => Error::file(path, e),
        })
    });
    let _ = std::fs::remove_file(&tmp);
    placed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(model: &str, tuning: Tuning, gpus: usize, memory_gib: u64, out: PathBuf) -> InitRequest {
        InitRequest { model: model.into(), data: vec!["AI-ModelScope/alpaca-gpt4-data-en#500".into()], tuning, gpus, memory: Some(memory_gib << 30), out }
    }

    fn plan_of(model: &str) -> ModelPlan {
        let section = crate::recipe::ModelSection { path: Some(model.into()), ..Default::default() };
        model::plan(&section, &Registry::builtin(), Fetch::Config).unwrap()
    }

    /// Qwen2.5-7B LoRA fits one 80 GB GPU at full micro batch with recompute; on 8 GPUs of 24 GiB
    /// it needs tensor parallelism; Qwen3-30B-A3B splits its experts instead; a model that fits
    /// nowhere is refused with the least estimate.
    #[test]
    fn layouts_follow_the_estimate() {
        let dense = plan_of("tests/data/qwen2.5-7b-instruct");
        let c = choose(&dense, &request("d", Tuning::Lora, 1, 80, "x".into())).unwrap();
        assert_eq!((c.data, c.tensor, c.expert), (1, 1, 1));
        assert!(c.estimate_gib <= 80.0 * HEADROOM && c.micro_batch >= 1);
        let c = choose(&dense, &request("d", Tuning::Lora, 8, 16, "x".into())).unwrap();
        assert!(c.tensor > 1 && c.data * c.tensor == 8, "{c:?}");
        let moe = plan_of("tests/data/qwen3-30b-a3b");
        let c = choose(&moe, &request("m", Tuning::Lora, 8, 24, "x".into())).unwrap();
        assert!(c.expert > 1 && c.tensor == 1 && c.data == 8, "{c:?}");
        assert_eq!(c.global_batch % (c.micro_batch * c.data), 0);
        let err = choose(&moe, &request("m", Tuning::Full, 1, 24, "x".into())).unwrap_err().to_string();
        assert!(err.contains("does not fit") && err.contains("GiB"), "{err}");
    }

    #[test]
    fn an_existing_file_is_never_overwritten_nor_a_rejected_one_written() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.toml");
        std::fs::write(&out, "keep").unwrap();
        let err = write_new(&out, "new", |_| Ok(())).unwrap_err().to_string();
        assert!(err.contains("never overwrites"), "{err}");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "keep");
        let other = dir.path().join("s.toml");
        assert!(write_new(&other, "bad", |_| Err(Error::data("no"))).is_err());
        assert!(!other.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
    }

    #[test]
    fn missing_local_data_is_refused_and_hub_ids_pass() {
        assert!(check_source("AI-ModelScope/alpaca-gpt4-data-en#500").is_ok());
        assert!(check_source("swift/self-cognition").is_ok());
        let err = check_source("data/missing.jsonl#100").unwrap_err().to_string();
        assert!(err.contains("data/missing.jsonl") && err.contains("no such data file"), "{err}");
    }
}
