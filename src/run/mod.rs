//! The run folder: its layout, its lock, the recipe it saved, its checkpoints and the base
//! weights it trained on. `train` writes it and `export` reads it, both through here.
//!
//! ```text
//! runs/<recipe>-<date>-<time>/
//!   recipe.toml                 the resolved recipe (rewritten when a resume changes an allowed key)
//!   metrics.jsonl               one JSON line per logged step and per evaluation
//!   .lock                       held by the process training in the folder; names its PID
//!   base_weights.json           SHA-256 of every base tensor (pretrained bases; export checks it)
//!   branched_from.json          where a run resumed from an earlier checkpoint of another run came from
//!   checkpoint-20/
//!     adapter_model.safetensors peft tensor names, f32      (LoRA)
//!     adapter_config.json       peft's LoraConfig           (LoRA)
//!     model.safetensors         transformers names          (full tuning)
//!     config.json               the model config            (full tuning)
//!     recipe.toml               the record export and resume read
//!     trainer_state.json        step, data position, seeds, per-parameter optimizer steps
//!     optimizer.safetensors     AdamW moments by module path (unless save_optimizer = false)
//!     base_weights.json         a copy of the run's
//! ```

pub mod checkpoint;
pub mod listing;
pub mod lock;
pub mod plots;
pub mod resume;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::weights::{Checkpoint, TensorPrint};
use crate::model::ModelPlan;
use crate::recipe::{Init, Recipe};

pub use lock::RunLock;

pub const RECIPE: &str = "recipe.toml";
/// The file a run records its base weights' fingerprints in (run folder and each checkpoint).
pub const BASE_WEIGHTS: &str = "base_weights.json";
pub const BRANCHED_FROM: &str = "branched_from.json";

/// Whether `dir` is a run folder: its recipe beside checkpoints, metrics or a lock.
pub fn is_run(dir: &Path) -> bool {
    dir.join(RECIPE).is_file()
        && (dir.join(lock::LOCK).exists()
            || dir.join("metrics.jsonl").exists()
            || fs::read_dir(dir).is_ok_and(|mut es| es.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("checkpoint-")))))
}

/// Whether `dir` is a checkpoint folder (complete or partial).
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join(checkpoint::TRAINER_STATE).is_file()
        || (dir.join(RECIPE).is_file() && dir.file_name().is_some_and(|n| n.to_string_lossy().starts_with("checkpoint-")))
}

/// `runs/<recipe name>-<UTC date>-<time>` (or `<name>` given), made unique, created.
pub fn new_run_dir(output_dir: &Path, name: &str) -> Result<PathBuf> {
    let base = output_dir.join(name);
    let mut dir = base.clone();
    let mut n = 1;
    while dir.exists() {
        n += 1;
        dir = PathBuf::from(format!("{}-{n}", base.display()));
    }
    fs::create_dir_all(&dir).map_err(|e| Error::file(&dir, format!("cannot create the run folder: {e}")))?;
    Ok(dir)
}

/// `YYYYMMDD-HHMMSS` in UTC.
pub fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem / 60 % 60, rem % 60)
}

/// Write `bytes` to `path` through a temporary file renamed over it: a reader sees the old
/// file or the new one, never a part.
pub fn write_replacing(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_file_name(format!(".{}.tmp-{}", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(), std::process::id()));
    checkpoint::write_synced(&tmp, bytes)?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::file(path, format!("cannot replace: {e}"))
    })
}

/// `path` made absolute without touching the file system (`..` folded), for comparing folders
/// that may not exist yet.
fn absolute(path: &Path) -> PathBuf {
    let joined = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(path) };
    // Resolve what exists (symlinks included), then fold the rest.
    let mut existing = joined.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name().map(|n| n.to_os_string()), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut out = existing.canonicalize().unwrap_or(existing);
    for part in rest.into_iter().rev() {
        if part == ".." {
            out.pop();
        } else if part != "." {
            out.push(part);
        }
    }
    out
}

/// Refuse an output folder that would write into, over or above the run `source` (a run
/// folder or one of its checkpoints), or over any checkpoint or any folder holding a run,
/// whatever `--overwrite` says: such a folder is never replaced.
pub fn guard_output(out: &Path, source: &Path) -> Result<()> {
    let (o, s) = (absolute(out), absolute(source));
    // The run the source belongs to: the checkpoint's parent when the source is a checkpoint.
    let run = match s.parent() {
        Some(parent) if is_checkpoint(&s) && is_run(parent) => parent.to_path_buf(),
        _ => s.clone(),
    };
    let refuse = |why: String| Err(Error::file(out, format!("{why}; an export never writes there, whatever --overwrite says: choose a folder outside any run")));
    if o == run || o == s {
        return refuse(format!("is the run being exported ({})", run.display()));
    }
    if run.starts_with(&o) {
        return refuse(format!("holds the run being exported ({})", run.display()));
    }
    if o.starts_with(&run) {
        return refuse(format!("is inside the run being exported ({})", run.display()));
    }
    if o.is_dir() {
        if is_checkpoint(&o) {
            return refuse("is a checkpoint folder".into());
        }
        if let Some(r) = run_within(&o, 3) {
            return refuse(if r == o { "is a run folder".into() } else { format!("holds a run folder ({})", r.display()) });
        }
    }
    Ok(())
}

/// A run folder at `dir` or up to `depth` levels below it.
fn run_within(dir: &Path, depth: usize) -> Option<PathBuf> {
    if is_run(dir) || is_checkpoint(dir) {
        return Some(dir.to_path_buf());
    }
    if depth == 0 {
        return None;
    }
    let entries = fs::read_dir(dir).ok()?;
    entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).find_map(|e| run_within(&e.path(), depth - 1))
}

/// The fingerprints of a run's base weights.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BaseWeights {
    /// `model.path` as the run resolved it.
    pub source: String,
    pub tensors: BTreeMap<String, TensorPrint>,
}

/// Fingerprints of the base weights `plan` reads, for a run to save.
pub fn base_fingerprints(r: &Recipe, plan: &ModelPlan) -> Result<Option<BaseWeights>> {
    match (r.model.init, &plan.dir) {
        (Init::Pretrained, Some(dir)) => {
            let tensors = Checkpoint::open(dir)?.fingerprints()?;
            Ok(Some(BaseWeights { source: dir.display().to_string(), tensors }))
        }
        _ => Ok(None),
    }
}

/// The saved fingerprints of the checkpoint at `dir` (its own copy, else its run folder's).
pub fn saved_fingerprints(dir: &Path) -> Result<Option<(PathBuf, BaseWeights)>> {
    for candidate in [Some(dir.join(BASE_WEIGHTS)), dir.parent().map(|p| p.join(BASE_WEIGHTS))].into_iter().flatten() {
        if candidate.is_file() {
            let text = fs::read_to_string(&candidate).map_err(|e| Error::file(&candidate, format!("cannot read: {e}")))?;
            let w: BaseWeights = serde_json::from_str(&text).map_err(|e| Error::file(&candidate, format!("not a base-weights table: {e}")))?;
            return Ok(Some((candidate, w)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamp_is_a_date_and_time() {
        let s = utc_stamp();
        assert_eq!(s.len(), 15, "{s}");
        assert!(s.starts_with("20"), "{s}");
        assert_eq!(&s[8..9], "-");
    }

    #[test]
    fn outputs_into_over_or_above_a_run_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let runs = root.path().join("runs");
        let run = runs.join("a");
        let sibling = runs.join("b");
        for r in [&run, &sibling] {
            fs::create_dir_all(r.join("checkpoint-3")).unwrap();
            fs::write(r.join(RECIPE), "").unwrap();
            fs::write(r.join("checkpoint-3").join(RECIPE), "").unwrap();
        }
        let ck = run.join("checkpoint-3");
        for (out, why) in [
            (run.clone(), "is the run"),
            (ck.clone(), "the run being exported"),
            (runs.clone(), "holds the run being exported"),
            (root.path().to_path_buf(), "holds the run being exported"),
            (run.join("export"), "inside the run"),
            (ck.join("x"), "inside the run"),
            (run.join("checkpoint-3"), "the run being exported"),
            (run.join("..").join("a"), "is the run"),
            (sibling.clone(), "is a run folder"),
            (sibling.join("checkpoint-3"), "is a checkpoint folder"),
        ] {
            for source in [&run, &ck] {
                let e = guard_output(&out, source).unwrap_err().to_string();
                assert!(e.contains(why), "{out:?} from {source:?}: {e}");
            }
        }
        let holder = root.path().join("elsewhere");
        fs::create_dir_all(holder.join("deep").join("nested")).unwrap();
        fs::create_dir_all(holder.join("deep").join("run")).unwrap();
        fs::write(holder.join("deep").join("run").join(RECIPE), "").unwrap();
        fs::write(holder.join("deep").join("run").join("metrics.jsonl"), "").unwrap();
        assert!(guard_output(&holder, &run).unwrap_err().to_string().contains("holds a run folder"));
        guard_output(&root.path().join("exports").join("hf"), &run).unwrap();
        guard_output(&holder.join("deep").join("nested"), &ck).unwrap();
    }
}
