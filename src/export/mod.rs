//! `trainer export RUN_DIR --to hf|peft|native --out DIR`: a run's checkpoint turned into what
//! inference stacks load, as ms-swift's `swift export --merge_lora / --to_hf` does.
//!
//! - `hf`: the base weights with every adapter merged (`W + s B A`, in f32, stored in the
//!   chosen dtype), under the base checkpoint's own tensor names and layouts, in shards of at
//!   most `--max-shard-size` with `model.safetensors.index.json`, plus `config.json`,
//!   `generation_config.json` and the tokenizer files.
//! - `peft`: the adapter as `adapter_model.safetensors` + `adapter_config.json` for
//!   `PeftModel.from_pretrained` ([`adapters`] explains the MoE layouts).
//! - `native`: the merged model as `trainer run` reads a base model (trainer's base layout *is*
//!   the Hugging Face one), f32 by default so a further stage does not start from rounded
//!   weights, with `trainer_export.json` recording where it came from.
//!
//! The output is built in `DIR.partial-<pid>` and renamed into place when complete; tensors
//! stream through one at a time (host memory: one shard being filled plus one tensor). Base
//! weights are checked against the fingerprints the run saved (`base_weights.json`) before
//! anything is written.

pub mod adapters;
pub mod precision;
pub mod shards;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::tensors::{base_tensors, BaseTensor};
use crate::model::weights::{Checkpoint, RandomInit, TensorPrint, TensorRequest, WeightSource};
use crate::model::{self, hub::Fetch, ModelPlan, Registry};
use crate::recipe::{self, DType, Init, Recipe, Tuning};
use crate::run::checkpoint as ckpt;
use crate::run::{saved_fingerprints, BaseWeights, BASE_WEIGHTS};
use adapters::{AdapterSet, PeftLayout};
pub use precision::PrecisionReport;

/// What `--to` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// Merged Hugging Face model folder.
    Hf,
    /// Unmerged peft adapter folder.
    Peft,
    /// Merged model for a further `trainer run` stage.
    Native,
}

/// How `--to peft` lays out adapters of MoE experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PeftExperts {
    /// transformers >= 5 (experts fused into 3-D parameters): peft `target_parameters`.
    Fused,
    /// transformers 4.x (one module per expert): one adapter per expert module.
    PerExpert,
}

#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// A run folder (its latest checkpoint) or one `checkpoint-N` folder.
    pub run: PathBuf,
    pub to: Target,
    pub out: PathBuf,
    /// Stored dtype; default: the recipe's `model.dtype` for `hf`, f32 for `peft` and `native`.
    pub dtype: Option<DType>,
    pub max_shard_bytes: u64,
    /// Replace a non-empty `out`.
    pub overwrite: bool,
    /// MoE expert layout for `--to peft`; default `fused` (transformers >= 5).
    pub peft_experts: PeftExperts,
    /// Run the precision check with this threshold on the label mean |diff|.
    pub test_precision: Option<f64>,
    /// Device of the precision check; default the recipe's.
    pub device: Option<recipe::Device>,
    /// Also write the precision sample and both logits here (safetensors).
    pub precision_logits: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ExportReport {
    pub out: PathBuf,
    pub checkpoint: PathBuf,
    pub dtype: DType,
    /// Weight files written, in order.
    pub files: Vec<String>,
    pub tensors: usize,
    /// Base weights an adapter was merged into.
    pub merged: usize,
    /// Notes for the user (what was not checked and why, files not found to copy).
    pub notes: Vec<String>,
    pub precision: Option<PrecisionReport>,
}

/// The checkpoint a run folder (or a checkpoint folder) exports from.
pub fn find_checkpoint(run: &Path) -> Result<PathBuf> {
    if !run.is_dir() {
        return Err(Error::file(run, "no such folder; `trainer export` takes a run folder (runs/<name>-<time>) or a checkpoint-N folder in it"));
    }
    if run.join(ckpt::RECIPE).is_file() && (run.join(ckpt::ADAPTER_WEIGHTS).is_file() || run.join(ckpt::MODEL_WEIGHTS).is_file()) {
        return Ok(run.to_path_buf());
    }
    ckpt::latest(run)?.ok_or_else(|| {
        Error::file(
            run,
            "no complete checkpoint-N folder here (a run stopped before its first save has nothing to export; \
             partial checkpoint-N.tmp folders are never exported)",
        )
    })
}

/// The base weights must be the ones the run trained on.
fn check_base_unchanged(saved: &BaseWeights, table: &Path, now: &BTreeMap<String, TensorPrint>, base: &Path) -> Result<()> {
    let mut problems = Vec::new();
    for (name, was) in &saved.tensors {
        match now.get(name) {
            None => problems.push(format!("`{name}` is gone")),
            Some(is) if is.shape != was.shape || is.dtype != was.dtype => {
                problems.push(format!("`{name}` was {} {:?}, is {} {:?}", was.dtype, was.shape, is.dtype, is.shape))
            }
            Some(is) if is.sha256 != was.sha256 => problems.push(format!("`{name}` has different values")),
            _ => {}
        }
    }
    for name in now.keys().filter(|n| !saved.tensors.contains_key(*n)) {
        problems.push(format!("`{name}` is new"));
    }
    if problems.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = problems.iter().take(3).map(String::as_str).collect();
    Err(Error::file(
        base,
        format!(
            "the base weights changed since training ({} of {} tensors differ from {}: {}{}); an adapter only fits the \
             weights it was trained on: point model.path in the run's recipe.toml at the original weights",
            problems.len(),
            saved.tensors.len(),
            table.display(),
            shown.join("; "),
            if problems.len() > 3 { "; ..." } else { "" }
        ),
    ))
}

/// Run an export.
pub fn export(req: &ExportRequest, registry: &Registry) -> Result<ExportReport> {
    let dir = find_checkpoint(&req.run)?;
    // Never into, over or above the run, a checkpoint or another run: checked first.
    crate::run::guard_output(&req.out, &req.run)?;
    let loaded = recipe::load(&dir.join(ckpt::RECIPE), &[])?;
    let r = &loaded.recipe;
    let fetch = if r.model.init == Init::Pretrained { Fetch::All } else { Fetch::Config };
    let plan = model::plan(&r.model, registry, fetch)?;
    if r.train.tuning == Tuning::Full && req.to == Target::Peft {
        return Err(Error::Unsupported(format!(
            "{}: a full fine-tuning run has no adapter; export it with --to hf or --to native",
            dir.display()
        )));
    }
    if req.test_precision.is_some() && req.to == Target::Peft {
        return Err(Error::Unsupported(
            "--test-precision compares the trained model with the merged export; use it with --to hf or --to native \
             (the peft adapter holds the trained tensors themselves)"
                .into(),
        ));
    }
    let dtype = req.dtype.unwrap_or(match req.to {
        Target::Hf => r.model.dtype,
        Target::Peft | Target::Native => DType::F32,
    });
    let table = base_tensors(&plan.spec);
    let mut notes = Vec::new();

    // Everything that can be wrong with the input is found before the output folder exists.
    let adapters = match r.train.tuning {
        Tuning::Lora => {
            let file = dir.join(ckpt::ADAPTER_WEIGHTS);
            if !file.is_file() {
                return Err(Error::file(&file, "no such file: the run trained LoRA adapters (train.tuning = \"lora\"), so its checkpoint must hold them"));
            }
            ckpt::check_adapter_config(&dir, &r.lora)?;
            let set = AdapterSet::from_tensors(&file, ckpt::read_safetensors(&file)?, r.lora.rank, r.lora.scale())?;
            let base_name = match &plan.dir {
                Some(d) => format!("the base model in {}", d.display()),
                None => "the base architecture of the recipe's [model.config]".to_string(),
            };
            set.check_against(&table, &file, &base_name)?;
            Some(set)
        }
        Tuning::Full => None,
    };
    if r.model.init == Init::Pretrained {
        let base = plan.dir.clone().ok_or_else(|| Error::Internal("pretrained plan without a folder".into()))?;
        match saved_fingerprints(&dir)? {
            Some((file, saved)) => {
                let now = Checkpoint::open(&base)?.fingerprints()?;
                check_base_unchanged(&saved, &file, &now, &base)?;
            }
            None => notes.push(format!(
                "the run has no {BASE_WEIGHTS} (it predates base-weight fingerprints): not checked that {} is the base it trained on",
                base.display()
            )),
        }
    }

    let out = &req.out;
    prepare_out(out, req.overwrite)?;
    let tmp = partial_path(out)?;
    fs::create_dir_all(&tmp).map_err(|e| Error::file(&tmp, format!("cannot create the output folder: {e}")))?;
    let filled = (|| -> Result<(Vec<String>, usize, usize)> {
        match req.to {
            Target::Peft => {
                let set = adapters.as_ref().ok_or_else(|| Error::Internal("peft export without adapters".into()))?;
                write_peft(&tmp, set, r, &plan, dtype, req.peft_experts)
            }
            Target::Hf | Target::Native => {
                let (files, tensors, merged) = write_merged(&tmp, &dir, r, &plan, &table, adapters.as_ref(), dtype, req.max_shard_bytes)?;
                write_config(&tmp, &plan, dtype)?;
                notes.extend(copy_tokenizer(&tmp, r, &plan)?);
                if req.to == Target::Native {
                    let record = serde_json::json!({
                        "exported_by": format!("trainer {}", env!("CARGO_PKG_VERSION")),
                        "checkpoint": dir.display().to_string(),
                        "base": r.model.path,
                        "tuning": r.train.tuning,
                        "merged_adapters": merged,
                        "dtype": dtype,
                    });
                    ckpt::write_synced(&tmp.join("trainer_export.json"), pretty(&record).as_bytes())?;
                    ckpt::write_synced(&tmp.join("trained_with.toml"), loaded.to_toml().as_bytes())?;
                }
                Ok((files, tensors, merged))
            }
        }
    })();
    let (files, tensors, merged) = match filled {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if let Err(e) = move_into_place(&tmp, out) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let precision = match req.test_precision {
        Some(threshold) => Some(precision::check(
            r,
            &plan,
            &dir,
            out,
            registry,
            threshold,
            req.device.unwrap_or(r.device),
            req.precision_logits.as_deref(),
        )?),
        None => None,
    };
    Ok(ExportReport { out: out.clone(), checkpoint: dir, dtype, files, tensors, merged, notes, precision })
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// The base weights merged with the run's trained tensors, streamed into shards.
#[allow(clippy::too_many_arguments)]
fn write_merged(
    tmp: &Path,
    dir: &Path,
    r: &Recipe,
    plan: &ModelPlan,
    table: &[BaseTensor],
    adapters: Option<&AdapterSet>,
    dtype: DType,
    max_shard_bytes: u64,
) -> Result<(Vec<String>, usize, usize)> {
    let mut pretrained = match (r.model.init, &plan.dir) {
        (Init::Pretrained, Some(d)) => Some(Checkpoint::open(d)?),
        _ => None,
    };
    let mut random = RandomInit { seed: r.model.seed, std: plan.spec.init_std };
    // Full tuning: every trained tensor comes from the checkpoint instead of the base.
    let mut full = match r.train.tuning {
        Tuning::Full => {
            let file = dir.join(ckpt::MODEL_WEIGHTS);
            if !file.is_file() {
                return Err(Error::file(&file, "no such file: the run trained every weight (train.tuning = \"full\"), so its checkpoint must hold them"));
            }
            Some(Checkpoint::open(dir)?)
        }
        Tuning::Lora => None,
    };
    let mut writer = shards::ShardWriter::new(tmp, max_shard_bytes, dtype);
    let (mut count, mut merged) = (0, 0);
    for t in table {
        let name = plan.family.checkpoint_name(&t.path);
        let from_full = full.as_ref().is_some_and(|f| f.contains(&t.path));
        let req = TensorRequest { name: if from_full { &t.path } else { &name }, shape: &t.shape, slice: None, init: t.init };
        let mut host = match full.as_mut() {
            Some(f) if from_full => f.tensor(req)?,
            _ => match pretrained.as_mut() {
                Some(ck) => ck.tensor(req)?,
                None => random.tensor(req)?,
            },
        };
        if let (Some(set), Some(module)) = (adapters, t.linear_module()) {
            if let Some(factors) = set.modules.get(module) {
                adapters::merge_into(&mut host.data, factors, set.scale);
                merged += 1;
            }
        }
        writer.push(&name, &t.shape, &host.data)?;
        count += 1;
    }
    // Tensors of the base outside the architecture's table that a model may carry (a tied head
    // saved anyway, old rotary buffers) are copied as they are, so the names stay the base's.
    if let Some(ck) = pretrained.as_mut() {
        let known: std::collections::BTreeSet<String> = table.iter().map(|t| plan.family.checkpoint_name(&t.path)).collect();
        let extra: Vec<String> = ck.names().filter(|n| !known.contains(*n)).map(String::from).collect();
        for name in extra {
            let host = ck.read_as_stored(&name)?;
            writer.push(&name, &host.shape, &host.data)?;
            count += 1;
        }
    }
    if let Some(set) = adapters {
        if merged != set.modules.len() {
            return Err(Error::Internal(format!("merged {merged} of {} adapters", set.modules.len())));
        }
    }
    Ok((writer.finish()?, count, merged))
}

/// `config.json` of the base with the exported dtype (and `architectures` when it had none);
/// `generation_config.json` copied from the base, else derived from the config as
/// transformers does.
fn write_config(tmp: &Path, plan: &ModelPlan, dtype: DType) -> Result<()> {
    let mut cfg = plan.config.values.clone();
    let name = match dtype {
        DType::Bf16 => "bfloat16",
        DType::F16 => "float16",
        DType::F32 => "float32",
    };
    let key = if cfg.contains_key("dtype") { "dtype" } else { "torch_dtype" };
    cfg.insert(key.into(), name.into());
    if !cfg.contains_key("architectures") {
        if let Some(arch) = plan.family.hf_architecture() {
            cfg.insert("architectures".into(), serde_json::json!([arch]));
        }
    }
    ckpt::write_synced(&tmp.join("config.json"), pretty(&serde_json::Value::Object(cfg.clone())).as_bytes())?;
    let base_gen = plan.dir.as_ref().map(|d| d.join("generation_config.json")).filter(|p| p.is_file());
    match base_gen {
        Some(p) => copy_file(&p, &tmp.join("generation_config.json")),
        None => {
            let mut g = serde_json::Map::new();
            g.insert("_from_model_config".into(), true.into());
            for k in ["bos_token_id", "eos_token_id", "pad_token_id"] {
                if let Some(v) = cfg.get(k) {
                    g.insert(k.into(), v.clone());
                }
            }
            ckpt::write_synced(&tmp.join("generation_config.json"), pretty(&serde_json::Value::Object(g)).as_bytes())
        }
    }
}

/// The tokenizer files Hugging Face folders carry.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
];

fn copy_tokenizer(tmp: &Path, r: &Recipe, plan: &ModelPlan) -> Result<Vec<String>> {
    let mut copied = 0;
    if let Some(d) = &plan.dir {
        for f in TOKENIZER_FILES {
            let p = d.join(f);
            if p.is_file() {
                copy_file(&p, &tmp.join(f))?;
                copied += 1;
            }
        }
    }
    if let Some(t) = &r.model.tokenizer {
        let p = PathBuf::from(t);
        if !p.is_file() {
            return Err(Error::file(p, "model.tokenizer of the run: no such file"));
        }
        copy_file(&p, &tmp.join("tokenizer.json"))?;
        copied += 1;
    }
    Ok(if copied == 0 { vec!["no tokenizer files found next to the base weights: none copied".to_string()] } else { vec![] })
}

fn copy_file(from: &Path, to: &Path) -> Result<()> {
    let bytes = fs::read(from).map_err(|e| Error::file(from, format!("cannot read: {e}")))?;
    ckpt::write_synced(to, &bytes)
}

fn write_peft(tmp: &Path, set: &AdapterSet, r: &Recipe, plan: &ModelPlan, dtype: DType, experts: PeftExperts) -> Result<(Vec<String>, usize, usize)> {
    let has_expert_adapters = set.modules.keys().any(|m| crate::model::hf_names::is_expert(m));
    let layout: PeftLayout = if has_expert_adapters && experts == PeftExperts::Fused {
        adapters::fused_experts(set, &plan.spec, r.lora.alpha, r.lora.rslora)
    } else {
        adapters::per_module(set, r.lora.alpha)
    };
    let lora = recipe::LoraSection { rank: layout.rank, alpha: layout.alpha, ..r.lora.clone() };
    let mut cfg = ckpt::adapter_config(&lora, r.model.path.as_deref(), &layout.module_paths);
    if !layout.target_parameters.is_empty() {
        // peft's ParamWrapper refuses dropout; it only acts in training anyway.
        cfg["lora_dropout"] = 0.0.into();
        cfg["target_parameters"] = serde_json::json!(layout.target_parameters);
        if layout.module_paths.is_empty() {
            cfg["target_modules"] = serde_json::Value::Null;
        }
    }
    let encoded: Vec<shards::Encoded> =
        layout.tensors.iter().map(|(name, shape, values)| (name.clone(), shape.clone(), shards::encode(values, dtype))).collect();
    shards::write_encoded(&tmp.join(ckpt::ADAPTER_WEIGHTS), &encoded, dtype)?;
    ckpt::write_synced(&tmp.join(ckpt::ADAPTER_CONFIG), pretty(&cfg).as_bytes())?;
    Ok((vec![ckpt::ADAPTER_WEIGHTS.to_string()], layout.tensors.len(), 0))
}

/// Refuse an output folder that holds anything unless `overwrite`; clear stale partial folders
/// of earlier exports that were killed.
fn prepare_out(out: &Path, overwrite: bool) -> Result<()> {
    if out.exists() {
        if !out.is_dir() {
            return Err(Error::file(out, "exists and is not a folder; --out takes a folder to create"));
        }
        let non_empty = fs::read_dir(out).map_err(|e| Error::file(out, format!("cannot list: {e}")))?.next().is_some();
        if non_empty && !overwrite {
            return Err(Error::file(out, "is not empty; choose another --out, empty it, or pass --overwrite to replace it"));
        }
    }
    let parent = parent_of(out);
    fs::create_dir_all(&parent).map_err(|e| Error::file(&parent, format!("cannot create the folder --out goes in: {e}")))?;
    let stem = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Ok(entries) = fs::read_dir(&parent) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix(&format!("{stem}.partial-")).and_then(|p| p.parse::<u32>().ok()) else { continue };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(())
}

fn parent_of(out: &Path) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn partial_path(out: &Path) -> Result<PathBuf> {
    let name = out.file_name().ok_or_else(|| Error::file(out, "--out needs a folder name"))?;
    Ok(parent_of(out).join(format!("{}.partial-{}", name.to_string_lossy(), std::process::id())))
}

/// Rename the finished folder to `out`, replacing an existing (empty, or `--overwrite`n) one
/// only once the new one is complete.
fn move_into_place(tmp: &Path, out: &Path) -> Result<()> {
    let old = out.with_file_name(format!("{}.replaced-{}", out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), std::process::id()));
    let had_old = out.exists();
    if had_old {
        fs::rename(out, &old).map_err(|e| Error::file(out, format!("cannot move the existing folder aside: {e}")))?;
    }
    if let Err(e) = fs::rename(tmp, out) {
        if had_old {
            let _ = fs::rename(&old, out);
        }
        return Err(Error::file(out, format!("cannot move the export into place: {e}")));
    }
    if had_old {
        let _ = fs::remove_dir_all(&old);
    }
    if let Ok(d) = fs::File::open(parent_of(out)) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn print(sha: &str) -> TensorPrint {
        TensorPrint { dtype: "BF16".into(), shape: vec![2, 2], sha256: sha.into() }
    }

    #[test]
    fn changed_base_weights_are_named() {
        let saved = BaseWeights { source: "b".into(), tensors: BTreeMap::from([("a".to_string(), print("1")), ("b".to_string(), print("2"))]) };
        let same = saved.tensors.clone();
        check_base_unchanged(&saved, Path::new("t"), &same, Path::new("base")).unwrap();
        let mut changed = same.clone();
        changed.get_mut("b").unwrap().sha256 = "3".into();
        let e = check_base_unchanged(&saved, Path::new("t"), &changed, Path::new("base")).unwrap_err().to_string();
        assert!(e.contains("changed since training") && e.contains("`b` has different values"), "{e}");
        let mut reshaped = same;
        reshaped.get_mut("a").unwrap().shape = vec![4];
        reshaped.insert("c".into(), print("4"));
        let e = check_base_unchanged(&saved, Path::new("t"), &reshaped, Path::new("base")).unwrap_err().to_string();
        assert!(e.contains("`a` was BF16 [2, 2], is BF16 [4]") && e.contains("`c` is new"), "{e}");
    }

    #[test]
    fn output_folder_rules() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("out");
        prepare_out(&out, false).unwrap();
        fs::create_dir(&out).unwrap();
        prepare_out(&out, false).unwrap();
        fs::write(out.join("x"), b"1").unwrap();
        assert!(prepare_out(&out, false).unwrap_err().to_string().contains("not empty"));
        prepare_out(&out, true).unwrap();
        let tmp = partial_path(&out).unwrap();
        fs::create_dir(&tmp).unwrap();
        fs::write(tmp.join("y"), b"2").unwrap();
        move_into_place(&tmp, &out).unwrap();
        assert!(out.join("y").exists() && !out.join("x").exists() && !tmp.exists());
        // A stale partial folder of a dead process is cleared.
        let stale = root.path().join("out.partial-4000000000");
        fs::create_dir(&stale).unwrap();
        prepare_out(&out, true).unwrap();
        assert!(!stale.exists());
        let file = root.path().join("f");
        fs::write(&file, b"").unwrap();
        assert!(prepare_out(&file.join("sub"), false).is_err());
    }
}
