//! Checkpoints in a run folder, written so that a kill at any moment leaves every existing
//! `checkpoint-N` whole: each is assembled in `checkpoint-N.tmp` (files flushed to disk), then
//! renamed into place. A complete checkpoint is never rewritten: a resumed run only adds later
//! steps, and a run branched from an earlier step gets a folder of its own ([`super`]).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::backend::TrainBackend;
use burn::tensor::{DType, TensorData};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const MODEL_WEIGHTS: &str = "model.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const TRAINER_STATE: &str = "trainer_state.json";
pub use super::RECIPE;

/// Where training stood when a checkpoint was written: enough to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    pub total_steps: usize,
    /// Micro batches consumed (the data position: the next step starts at this index of the
    /// epoch-by-epoch batch order, which `seed` fixes).
    pub micro_batches_consumed: usize,
    pub seed: u64,
    /// Trained (label) tokens seen.
    pub tokens_seen: u64,
    /// Loss of the last step.
    pub loss: f64,
    /// AdamW step count of each parameter (module path); empty without optimizer state.
    pub optimizer_steps: BTreeMap<String, u64>,
    /// Whether `optimizer.safetensors` was written.
    pub has_optimizer: bool,
    /// Dropout and data order are drawn from streams keyed by (seed, step, micro batch), so the
    /// seed and the step are the whole random state.
    pub rng: String,
}

/// One tensor for a safetensors file: name, shape and its data (f32, f16 or bf16).
pub struct NamedTensor {
    pub name: String,
    pub data: TensorData,
}

/// Host copy of a tensor, transposing a `[in, out]` matrix to Hugging Face's `[out, in]` when
/// asked.
pub fn host_tensor<B: TrainBackend, const D: usize>(t: burn::tensor::Tensor<B, D>, transpose: bool) -> TensorData {
    let t = if transpose && D == 2 { t.swap_dims(0, 1) } else { t };
    t.into_data()
}

fn st_dtype(d: DType) -> Result<Dtype> {
    Ok(match d {
        DType::F32 => Dtype::F32,
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        other => return Err(Error::Internal(format!("cannot write a {other:?} tensor to safetensors"))),
    })
}

/// Write `tensors` to `path` as safetensors (with `metadata`), flushed to disk.
pub fn write_safetensors(path: &Path, tensors: &[NamedTensor], metadata: BTreeMap<String, String>) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for t in tensors {
        let view = safetensors::tensor::TensorView::new(st_dtype(t.data.dtype)?, t.data.shape.to_vec(), t.data.as_bytes())
            .map_err(|e| Error::Internal(format!("tensor `{}`: {e}", t.name)))?;
        views.push((t.name.clone(), view));
    }
    let meta: std::collections::HashMap<String, String> = metadata.into_iter().collect();
    let bytes = safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| Error::Internal(format!("serialising {}: {e}", path.display())))?;
    write_synced(path, &bytes)
}

/// Write `bytes` to `path` and flush them to disk.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).map_err(|e| Error::file(path, format!("cannot create: {e}")))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| Error::file(path, format!("cannot write: {e}")))
}

/// Every tensor of a safetensors file as f32, by name, with its shape.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, (Vec<usize>, Vec<f32>)>> {
    let bytes = fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = crate::model::weights::to_f32(view.dtype(), view.data(), &name, path)?;
        out.insert(name, (view.shape().to_vec(), data));
    }
    Ok(out)
}

/// The folder a checkpoint of `step` gets inside `run_dir`.
pub fn checkpoint_dir(run_dir: &Path, step: usize) -> PathBuf {
    run_dir.join(format!("checkpoint-{step}"))
}

/// Build a checkpoint in a temporary folder with `fill`, then move it to `checkpoint-{step}`.
/// A complete checkpoint of that step is never replaced (the caller never asks for one); a
/// failed `fill` (a full disk, say) leaves no `.tmp` folder behind.
pub fn write_atomically(run_dir: &Path, step: usize, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let dir = checkpoint_dir(run_dir, step);
    if dir.exists() {
        return Err(Error::Internal(format!("{} exists: a complete checkpoint is never rewritten", dir.display())));
    }
    let tmp = run_dir.join(format!("checkpoint-{step}.tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::file(&tmp, format!("cannot remove a stale partial checkpoint: {e}")))?;
    }
    let filled = fs::create_dir_all(&tmp)
        .map_err(|e| Error::file(&tmp, format!("cannot create: {e}")))
        .and_then(|_| fill(&tmp))
        .and_then(|_| fs::rename(&tmp, &dir).map_err(|e| Error::file(&dir, format!("cannot move the checkpoint into place: {e}"))));
    if let Err(e) = filled {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // Make the rename itself durable.
    if let Ok(d) = fs::File::open(run_dir) {
        let _ = d.sync_all();
    }
    Ok(dir)
}

/// The complete checkpoints of `run_dir` by step, oldest first (partial `.tmp` folders and
/// anything else are left out).
pub fn complete(run_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let entries = fs::read_dir(run_dir).map_err(|e| Error::file(run_dir, format!("cannot list the run folder: {e}")))?;
    let mut found: Vec<(usize, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            e.path().is_dir().then(|| (n, e.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Remove the oldest complete checkpoints of `run_dir` until `keep` remain
/// (`checkpoint.save_total_limit`, as transformers' `save_total_limit`). Each goes by a rename
/// first, so a kill mid-removal never leaves a half checkpoint under a checkpoint's name.
pub fn prune(run_dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let all = complete(run_dir)?;
    let mut removed = Vec::new();
    for (step, dir) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        let doomed = run_dir.join(format!("checkpoint-{step}.removing"));
        fs::rename(dir, &doomed).map_err(|e| Error::file(dir, format!("cannot remove an old checkpoint (save_total_limit): {e}")))?;
        fs::remove_dir_all(&doomed).map_err(|e| Error::file(&doomed, format!("cannot remove: {e}")))?;
        removed.push(dir.clone());
    }
    Ok(removed)
}

/// What a process killed while writing left in `run_dir`: partial `checkpoint-N.tmp` folders
/// and checkpoints half removed by [`prune`]. Removed; call with the run's lock held.
pub fn clear_leftovers(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = fs::read_dir(run_dir).map_err(|e| Error::file(run_dir, format!("cannot list the run folder: {e}")))?;
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let partial = name.strip_prefix("checkpoint-").is_some_and(|rest| {
            [".tmp", ".removing"].iter().any(|sfx| rest.strip_suffix(sfx).is_some_and(|n| n.parse::<usize>().is_ok()))
        });
        if partial && e.path().is_dir() {
            fs::remove_dir_all(e.path()).map_err(|err| Error::file(e.path(), format!("cannot remove a partial checkpoint: {err}")))?;
            removed.push(e.path());
        }
    }
    Ok(removed)
}

/// The newest complete `checkpoint-N` in `run_dir` (partial `.tmp` folders are ignored).
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(complete(run_dir)?.pop().map(|(_, p)| p))
}

/// A checkpoint's `trainer_state.json`.
pub fn read_state(checkpoint: &Path) -> Result<TrainerState> {
    let path = checkpoint.join(TRAINER_STATE);
    let text = fs::read_to_string(&path).map_err(|e| Error::file(&path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| Error::file(&path, format!("not a trainer state: {e}")))
}

/// What `checkpoint.resume` / `--resume` points at.
#[derive(Debug, Clone, PartialEq)]
pub enum ResumeFrom {
    /// A trainer checkpoint folder (with `trainer_state.json`).
    Checkpoint { dir: PathBuf, state: TrainerState },
    /// Weights only: a peft adapter folder, or a checkpoint read `finetune`-style.
    Weights { dir: PathBuf },
}

/// Resolve a resume target: a run folder (its latest checkpoint), a checkpoint folder, or a
/// folder holding an adapter or model weights.
pub fn resolve_resume(path: &Path, finetune: bool) -> Result<ResumeFrom> {
    if !path.is_dir() {
        return Err(Error::file(path, "no such folder; checkpoint.resume / --resume takes a run folder, a checkpoint-N folder in it, or a peft adapter folder"));
    }
    let dir = if path.join(TRAINER_STATE).is_file() || path.join(ADAPTER_WEIGHTS).is_file() || path.join(MODEL_WEIGHTS).is_file() {
        path.to_path_buf()
    } else {
        match latest(path)? {
            Some(d) => d,
            None => {
                return Err(Error::file(
                    path,
                    format!("nothing to resume from: no checkpoint-N folder, no {TRAINER_STATE}, no {ADAPTER_WEIGHTS} or {MODEL_WEIGHTS}"),
                ))
            }
        }
    };
    let state_path = dir.join(TRAINER_STATE);
    if finetune || !state_path.is_file() {
        return Ok(ResumeFrom::Weights { dir });
    }
    let state = read_state(&dir)?;
    if !state.has_optimizer {
        return Err(Error::file(
            &dir,
            "this checkpoint has no optimizer state (saved with checkpoint.save_optimizer = false), so the run cannot \
             continue exactly; set train.finetune = true to start a new run from its weights",
        ));
    }
    Ok(ResumeFrom::Checkpoint { dir, state })
}

/// peft's `adapter_config.json` for the adapters of a run.
pub fn adapter_config(
    lora: &crate::recipe::LoraSection,
    base_model: Option<&str>,
    adapted_paths: &[String],
) -> serde_json::Value {
    // peft matches a list of names against module-path suffixes and a string as a full-match
    // regex: names when the recipe used names, else the exact set of adapted paths.
    let by_name = lora.targets.iter().all(|t| !t.starts_with("re:"));
    let target_modules = if by_name {
        let mut leaves: Vec<String> =
            adapted_paths.iter().map(|p| p.rsplit('.').next().unwrap_or(p).to_string()).collect();
        leaves.sort();
        leaves.dedup();
        serde_json::json!(leaves)
    } else {
        let alternatives: Vec<String> = adapted_paths.iter().map(|p| regex::escape(p)).collect();
        serde_json::json!(format!("({})", alternatives.join("|")))
    };
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "use_rslora": lora.rslora,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": false,
        "revision": null,
    })
}

/// Check that an adapter folder's `adapter_config.json` (when present) was made with the rank,
/// alpha and scaling the recipe asks for: loading factors trained at another scale would
/// silently change the model.
pub fn check_adapter_config(dir: &Path, lora: &crate::recipe::LoraSection) -> Result<()> {
    let path = dir.join(ADAPTER_CONFIG);
    if !path.is_file() {
        return Ok(());
    }
    let text = fs::read_to_string(&path).map_err(|e| Error::file(&path, format!("cannot read: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::file(&path, format!("not valid JSON: {e}")))?;
    let r = v.get("r").and_then(|x| x.as_u64());
    let alpha = v.get("lora_alpha").and_then(|x| x.as_f64());
    let rslora = v.get("use_rslora").and_then(|x| x.as_bool()).unwrap_or(false);
    if r != Some(lora.rank as u64) || alpha.is_none_or(|a| (a - lora.alpha).abs() > 1e-9) || rslora != lora.rslora {
        // The file's own values, as written there (a string where a number belongs shows as such).
        let shown = |k: &str| v.get(k).map_or("(missing)".to_string(), |x| x.to_string());
        return Err(Error::file(
            &path,
            format!(
                "adapter made with \"r\": {}, \"lora_alpha\": {}, \"use_rslora\": {}; the recipe has lora.rank = {}, \
                 lora.alpha = {}, lora.rslora = {}: make them equal (\"r\" and \"lora_alpha\" are numbers)",
                shown("r"),
                shown("lora_alpha"),
                shown("use_rslora"),
                lora.rank, lora.alpha, lora.rslora
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_leaves_no_partial_checkpoint() {
        let run = tempfile::tempdir().unwrap();
        let failed = write_atomically(run.path(), 3, |tmp| {
            write_synced(&tmp.join("a"), b"x")?;
            Err(Error::Internal("killed".into()))
        });
        assert!(failed.is_err());
        assert_eq!(latest(run.path()).unwrap(), None, "a partial checkpoint is never the latest");
        assert!(!run.path().join("checkpoint-3.tmp").exists(), "a failed write leaves no partial folder");
        let dir = write_atomically(run.path(), 3, |tmp| write_synced(&tmp.join("a"), b"y")).unwrap();
        write_atomically(run.path(), 12, |tmp| write_synced(&tmp.join("a"), b"z")).unwrap();
        assert_eq!(fs::read(dir.join("a")).unwrap(), b"y");
        assert_eq!(latest(run.path()).unwrap(), Some(checkpoint_dir(run.path(), 12)));
        assert!(write_atomically(run.path(), 3, |tmp| write_synced(&tmp.join("a"), b"w")).is_err(), "never rewritten");
        assert_eq!(fs::read(dir.join("a")).unwrap(), b"y");
    }

    #[test]
    fn prune_keeps_the_newest_and_leftovers_are_cleared() {
        let run = tempfile::tempdir().unwrap();
        for step in [5, 10, 15, 20] {
            write_atomically(run.path(), step, |tmp| write_synced(&tmp.join("a"), b"x")).unwrap();
        }
        fs::create_dir(run.path().join("checkpoint-25.tmp")).unwrap();
        fs::create_dir(run.path().join("checkpoint-3.removing")).unwrap();
        fs::create_dir(run.path().join("checkpoint-notes")).unwrap();
        let removed = prune(run.path(), 2).unwrap();
        assert_eq!(removed, vec![checkpoint_dir(run.path(), 5), checkpoint_dir(run.path(), 10)]);
        let steps: Vec<usize> = complete(run.path()).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![15, 20]);
        let cleared = clear_leftovers(run.path()).unwrap();
        assert_eq!(cleared.len(), 2);
        assert!(run.path().join("checkpoint-notes").is_dir(), "only trainer's own partial folders go");
    }

    #[test]
    fn resume_targets() {
        let run = tempfile::tempdir().unwrap();
        assert!(resolve_resume(&run.path().join("nope"), false).unwrap_err().to_string().contains("no such folder"));
        assert!(resolve_resume(run.path(), false).unwrap_err().to_string().contains("nothing to resume from"));
        let adapter = run.path().join("adapter");
        fs::create_dir(&adapter).unwrap();
        write_synced(&adapter.join(ADAPTER_WEIGHTS), b"").unwrap();
        assert_eq!(resolve_resume(&adapter, false).unwrap(), ResumeFrom::Weights { dir: adapter.clone() });
    }

    #[test]
    fn adapter_config_lists_names_or_an_exact_regex() {
        let lora = crate::recipe::LoraSection::default();
        let paths = vec!["model.layers.0.self_attn.q_proj".to_string(), "model.layers.1.self_attn.q_proj".into(), "model.layers.0.mlp.down_proj".into()];
        let c = adapter_config(&lora, None, &paths);
        assert_eq!(c["target_modules"], serde_json::json!(["down_proj", "q_proj"]));
        assert_eq!((c["r"].as_u64(), c["lora_alpha"].as_f64()), (Some(8), Some(32.0)));
        let re = crate::recipe::LoraSection { targets: vec!["re:.*q_proj".into()], ..lora };
        let c = adapter_config(&re, None, &paths[..1]);
        assert_eq!(c["target_modules"], serde_json::json!("(model\\.layers\\.0\\.self_attn\\.q_proj)"));
    }
}
