//! `trainer runs`: every run folder under a directory with its state, read from what the run
//! wrote (its lock, metrics and checkpoints), touching nothing.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::checkpoint as ckpt;
use super::{is_run, lock};
use crate::error::{Error, Result};

/// Where a run stands.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RunState {
    /// A live `trainer` process holds the run's lock.
    Running { pid: u32 },
    /// Its newest checkpoint is its last planned step.
    Finished,
    /// Stopped before its last step (interrupted, killed or failed) at `step`: its newest
    /// checkpoint's (`None` without one).
    Stopped { step: Option<usize> },
}

/// One run folder, as `trainer runs` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub name: String,
    pub path: PathBuf,
    #[serde(flatten)]
    pub state: RunState,
    /// Optimizer steps logged in `metrics.jsonl`.
    pub steps_done: usize,
    /// Steps the run plans (from its newest checkpoint; `None` before one).
    pub steps_planned: Option<usize>,
    pub last_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub latest_checkpoint: Option<PathBuf>,
    pub bytes: u64,
}

/// The runs under `dir` (or `dir` itself when it is a run), by name.
pub fn list(dir: &Path) -> Result<Vec<RunSummary>> {
    if !dir.is_dir() {
        return Err(Error::file(dir, "is not a folder; expected a folder of runs (checkpoint.output_dir, `runs` by default) or a run folder"));
    }
    if is_run(dir) {
        return Ok(vec![summary(dir)?]);
    }
    let entries = fs::read_dir(dir).map_err(|e| Error::file(dir, format!("cannot list: {e}")))?;
    let mut runs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.is_dir() && is_run(p)).collect();
    runs.sort();
    runs.iter().map(|r| summary(r)).collect()
}

fn summary(run: &Path) -> Result<RunSummary> {
    let (mut steps_done, mut last_loss, mut eval_loss) = (0, None, None);
    if let Ok(text) = fs::read_to_string(run.join("metrics.jsonl")) {
        for row in text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
            if let (Some(step), Some(loss)) = (row.get("step").and_then(|s| s.as_u64()), row.get("loss").and_then(|l| l.as_f64())) {
                steps_done = steps_done.max(step as usize);
                last_loss = Some(loss);
            }
            if let Some(l) = row.get("eval_loss").and_then(|l| l.as_f64()) {
                eval_loss = Some(l);
            }
        }
    }
    let latest = ckpt::latest(run)?;
    let saved = latest.as_ref().and_then(|c| ckpt::read_state(c).ok());
    let state = match (holder(run), &saved) {
        (Some(pid), _) => RunState::Running { pid },
        (None, Some(s)) if s.step >= s.total_steps => RunState::Finished,
        (None, s) => RunState::Stopped { step: s.as_ref().map(|s| s.step) },
    };
    Ok(RunSummary {
        name: run.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        path: run.to_path_buf(),
        steps_planned: saved.map(|s| s.total_steps),
        state,
        steps_done,
        last_loss,
        eval_loss,
        latest_checkpoint: latest,
        bytes: size(run),
    })
}

/// The process that holds the run's lock now, if any: the lock file names its last holder's
/// PID, and the kernel's table of held locks (`/proc/locks`) says whether that process holds a
/// lock on that file. Reading it never takes the lock, so a run starting now is not turned away.
#[cfg(unix)]
fn holder(run: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let file = run.join(lock::LOCK);
    let pid: u32 = fs::read_to_string(&file).ok()?.trim().parse().ok()?;
    let inode = fs::metadata(&file).ok()?.ino();
    let locks = fs::read_to_string("/proc/locks").ok()?;
    // `1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF`
    let held = locks.lines().any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() >= 6 && f[1] == "FLOCK" && f[4].parse() == Ok(pid) && f[5].rsplit(':').next().and_then(|i| i.parse::<u64>().ok()) == Some(inode)
    });
    held.then_some(pid)
}

#[cfg(not(unix))]
fn holder(_: &Path) -> Option<u32> {
    None
}

fn size(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => size(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// The table `trainer runs` prints: one line a run.
pub fn table(runs: &[RunSummary]) -> String {
    let mut out = format!("{:<44} {:<22} {:>11} {:>8} {:>8} {:<16} {:>9}\n", "RUN", "STATE", "STEPS", "LOSS", "EVAL", "CHECKPOINT", "SIZE");
    for r in runs {
        let state = match &r.state {
            RunState::Running { pid } => format!("running (pid {pid})"),
            RunState::Finished => "finished".into(),
            RunState::Stopped { step: Some(s) } => format!("stopped at step {s}"),
            RunState::Stopped { step: None } => "stopped, no checkpoint".into(),
        };
        let steps = format!("{}/{}", r.steps_done, r.steps_planned.map_or("?".into(), |n| n.to_string()));
        let loss = |l: Option<f64>| l.map_or("-".into(), |l| format!("{l:.4}"));
        let checkpoint = r.latest_checkpoint.as_ref().and_then(|c| c.file_name()).map_or("-".into(), |n| n.to_string_lossy().into_owned());
        out += &format!(
            "{:<44} {:<22} {:>11} {:>8} {:>8} {:<16} {:>9}\n",
            r.name,
            state,
            steps,
            loss(r.last_loss),
            loss(r.eval_loss),
            checkpoint,
            human_bytes(r.bytes)
        );
    }
    out
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut v, mut u) = (n as f64, 0);
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_folder(root: &Path, name: &str, losses: &[f64], checkpoint: Option<(usize, usize)>) -> PathBuf {
        let run = root.join(name);
        fs::create_dir_all(&run).unwrap();
        fs::write(run.join(super::super::RECIPE), "").unwrap();
        let mut metrics: String = losses.iter().enumerate().map(|(i, l)| format!("{{\"step\":{},\"loss\":{l}}}\n", i + 1)).collect();
        metrics += "{\"step\":2,\"eval_loss\":2.5,\"eval_tokens\":10}\n";
        fs::write(run.join("metrics.jsonl"), metrics).unwrap();
        if let Some((step, total)) = checkpoint {
            let c = run.join(format!("checkpoint-{step}"));
            fs::create_dir_all(&c).unwrap();
            let state = ckpt::TrainerState {
                step,
                total_steps: total,
                micro_batches_consumed: step,
                seed: 1,
                tokens_seen: 0,
                loss: 0.0,
                optimizer_steps: Default::default(),
                has_optimizer: false,
                rng: String::new(),
            };
            fs::write(c.join(ckpt::TRAINER_STATE), serde_json::to_string(&state).unwrap()).unwrap();
        }
        run
    }

    #[test]
    fn running_finished_and_stopped_runs_are_told_apart() {
        let root = tempfile::tempdir().unwrap();
        run_folder(root.path(), "a-finished", &[3.0, 2.0], Some((2, 2)));
        let stopped = run_folder(root.path(), "b-stopped", &[3.0, 2.0, 1.5], Some((2, 8)));
        run_folder(root.path(), "c-early", &[3.0], None);
        // A lock file naming a process that holds no lock on it: stopped.
        fs::write(stopped.join(lock::LOCK), std::process::id().to_string()).unwrap();
        fs::create_dir_all(root.path().join("not-a-run")).unwrap();
        let runs = list(root.path()).unwrap();
        let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a-finished", "b-stopped", "c-early"]);
        assert_eq!(runs[0].state, RunState::Finished);
        assert_eq!((runs[0].steps_done, runs[0].steps_planned, runs[0].eval_loss), (2, Some(2), Some(2.5)));
        assert_eq!(runs[1].state, RunState::Stopped { step: Some(2) });
        assert_eq!((runs[1].steps_done, runs[1].steps_planned, runs[1].last_loss), (3, Some(8), Some(1.5)));
        assert_eq!(runs[2].state, RunState::Stopped { step: None });
        assert_eq!(runs[2].latest_checkpoint, None);
        let t = table(&runs);
        assert!(t.contains("stopped at step 2") && t.contains("3/8") && t.contains("1/?") && t.contains("checkpoint-2"), "{t}");
        // Locked by this process: running, with its PID.
        let held = lock::RunLock::acquire(&stopped).unwrap();
        assert_eq!(list(&stopped).unwrap()[0].state, RunState::Running { pid: std::process::id() });
        drop(held);
        assert_eq!(list(&stopped).unwrap()[0].state, RunState::Stopped { step: Some(2) });
        // A run folder itself lists as one run; a missing folder is refused with a sentence.
        assert_eq!(list(&stopped).unwrap().len(), 1);
        let e = list(&root.path().join("nowhere")).unwrap_err().to_string();
        assert!(e.contains("expected a folder of runs"), "{e}");
    }
}
