//! Continuing a run: with which recipe, and in which folder.
//!
//! A run continues with the recipe it was trained with (the checkpoint's `recipe.toml`), so
//! `trainer run --resume RUN` needs no recipe argument; one given must resolve to the same
//! recipe. Only the keys in [`CHANGEABLE`] may differ (how long to train, when to save and
//! evaluate, what to log); the change is printed and recorded. A checkpoint older than the
//! run's latest continues in a new run folder that records where it branched from, so no
//! checkpoint is ever rewritten.

use std::path::{Path, PathBuf};

use super::checkpoint::{self as ckpt, ResumeFrom};
use crate::error::{Error, Result};
use crate::recipe::{self, LoadedRecipe, Recipe, RecipeError};

/// Keys (or tables, ending in `.`) a resumed run may change: they decide how long it trains,
/// when it saves and evaluates and what it logs, not what a step computes.
pub const CHANGEABLE: &[&str] = &[
    "train.max_steps",
    "train.max_epochs",
    "train.eval_interval",
    "checkpoint.save_interval",
    "checkpoint.save_total_limit",
    "logging.",
    "data.num_workers",
    "data.num_proc",
];

/// Keys that say how the run was started or where it continues, not what it computes:
/// neither compared nor recorded as changes.
const IGNORED: &[&str] = &["checkpoint.resume", "train.finetune", "checkpoint.output_dir"];

/// One key whose value differs between the run's recipe and the one it continues with.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub key: String,
    pub was: String,
    pub now: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} -> {}", self.key, self.was, self.now)
    }
}

/// The recipe `trainer run --resume RESUME` continues with: the checkpoint's own
/// `recipe.toml` with `overrides` applied. A recipe file named too must resolve, with the same
/// overrides, to that same recipe. A folder without trainer state (a peft adapter) is started
/// from, not continued: it needs `given`.
pub fn recipe_for(resume: &Path, given: Option<&Path>, overrides: &[String]) -> Result<LoadedRecipe> {
    let dir = match ckpt::resolve_resume(resume, false)? {
        ResumeFrom::Checkpoint { dir, .. } => dir,
        ResumeFrom::Weights { dir } => {
            return match given {
                Some(file) => Ok(recipe::load(file, overrides)?),
                None => Err(Error::file(
                    dir,
                    "holds weights but no trainer state, so there is no run to continue; name a recipe to start from these \
                     weights: trainer run RECIPE --resume ...",
                )),
            }
        }
    };
    let saved = dir.join(super::RECIPE);
    let continued = match (saved.is_file(), given) {
        (true, _) => recipe::load(&saved, overrides)?,
        // A checkpoint from before checkpoints recorded their recipe.
        (false, Some(file)) => return Ok(recipe::load(file, overrides)?),
        (false, None) => {
            return Err(Error::file(&saved, "no such file: the checkpoint does not record its recipe; name the recipe: trainer run RECIPE --resume ..."))
        }
    };
    if let Some(file) = given {
        let named = recipe::load(file, overrides)?;
        let differ = differences(&continued.recipe, &named.recipe);
        if let Some(d) = differ.first() {
            let others: Vec<&str> = differ[1..].iter().map(|c| c.key.as_str()).collect();
            return Err(Error::Recipe(RecipeError(format!(
                "{}: key `{}`: is {} here but {} in the recipe {} was trained with{}; a resumed run continues with its own \
                 recipe: drop the RECIPE argument (and change what may change with --set)",
                file.display(),
                d.key,
                d.now,
                d.was,
                dir.display(),
                if others.is_empty() { String::new() } else { format!(" (these differ too: {})", others.join(", ")) }
            ))));
        }
    }
    Ok(continued)
}

/// Every key whose value differs from `a` to `b`, the [`IGNORED`] ones aside, sorted by key.
fn differences(a: &Recipe, b: &Recipe) -> Vec<Change> {
    let (a, b) = (flatten(a), flatten(b));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(not set)".into());
    keys.into_iter()
        .filter(|key| a.get(*key) != b.get(*key) && !IGNORED.iter().any(|i| *key == i || key.starts_with(&format!("{i}."))))
        .map(|key| Change { key: key.clone(), was: show(a.get(key)), now: show(b.get(key)) })
        .collect()
}

/// The changes from `saved` (the run's recipe) to `now`, or an error naming the first key that
/// a resumed run may not change.
pub fn changes(saved: &Recipe, now: &Recipe, checkpoint: &Path) -> Result<Vec<Change>> {
    let all = differences(saved, now);
    for change in &all {
        let key = &change.key;
        let allowed = CHANGEABLE.iter().any(|c| if c.ends_with('.') { key.starts_with(c) } else { key == c });
        if !allowed {
            let keep: Vec<&str> = CHANGEABLE.iter().map(|c| c.trim_end_matches('.')).collect();
            return Err(Error::Recipe(RecipeError(format!(
                "key `{}`: is {} but {} was trained with {}; a resumed run continues exactly, so only {} may change \
                 (put it back, or start a new run to change it)",
                change.key,
                change.now,
                checkpoint.display(),
                change.was,
                keep.join(", ")
            ))));
        }
    }
    Ok(all)
}

/// Every value of `r` by dotted key, as TOML text.
fn flatten(r: &Recipe) -> std::collections::BTreeMap<String, String> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    walk(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    if let Ok(v) = toml::Value::try_from(r) {
        walk("", &v, &mut out);
    }
    out
}

/// Where a run resumed from `checkpoint` (at `step`) writes: its own run folder when that is
/// the run's newest checkpoint, else a new folder beside the run (the branch), so the run's
/// later checkpoints stay as they are.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    Continue { run_dir: PathBuf },
    Branch { from_run: PathBuf, later: Vec<usize> },
}

pub fn placement(checkpoint: &Path, step: usize) -> Result<Placement> {
    let run = checkpoint.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let later: Vec<usize> = if super::is_run(&run) {
        ckpt::complete(&run)?.into_iter().map(|(s, _)| s).filter(|&s| s > step).collect()
    } else {
        // A checkpoint copied out of its run: continue in a run folder of its own.
        return Ok(Placement::Branch { from_run: run, later: Vec::new() });
    };
    Ok(if later.is_empty() { Placement::Continue { run_dir: run } } else { Placement::Branch { from_run: run, later } })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_schedule_keeping_keys_may_change() {
        let saved = Recipe::default();
        let mut more = saved.clone();
        more.train.max_steps = Some(2000);
        more.checkpoint.save_interval = Some(50);
        more.logging.interval = 7;
        let c = changes(&saved, &more, Path::new("ck")).unwrap();
        let keys: Vec<&str> = c.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["checkpoint.save_interval", "logging.interval", "train.max_steps"]);
        assert_eq!(c[2].to_string(), "train.max_steps: (not set) -> 2000");
        for change in [
            |r: &mut Recipe| r.optimizer.lr = 2e-4,
            |r: &mut Recipe| r.lora.rank = 16,
            |r: &mut Recipe| r.train.seed = 7,
            |r: &mut Recipe| r.data.datasets = vec!["x".into()],
            |r: &mut Recipe| r.schedule.warmup_steps = Some(3),
            |r: &mut Recipe| r.model.path = Some("other".into()),
        ] {
            let mut r = saved.clone();
            change(&mut r);
            let e = changes(&saved, &r, Path::new("runs/a/checkpoint-3")).unwrap_err().to_string();
            assert!(e.contains("a resumed run continues exactly") && e.contains("runs/a/checkpoint-3"), "{e}");
        }
        let mut started = saved.clone();
        started.checkpoint.resume = Some("runs/a".into());
        assert!(changes(&saved, &started, Path::new("ck")).unwrap().is_empty());
    }

    #[test]
    fn an_older_checkpoint_branches() {
        let root = tempfile::tempdir().unwrap();
        let run = root.path().join("a");
        for step in [100, 200] {
            std::fs::create_dir_all(ckpt::checkpoint_dir(&run, step)).unwrap();
        }
        std::fs::write(run.join(super::super::RECIPE), "").unwrap();
        assert_eq!(placement(&ckpt::checkpoint_dir(&run, 200), 200).unwrap(), Placement::Continue { run_dir: run.clone() });
        assert_eq!(placement(&ckpt::checkpoint_dir(&run, 100), 100).unwrap(), Placement::Branch { from_run: run.clone(), later: vec![200] });
    }
}
