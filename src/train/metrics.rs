//! What a run reports while it trains: a progress line on a terminal (loss, lr, grad norm,
//! tokens/s, ETA), plain log lines otherwise, and one JSON object per logged step or evaluation
//! in the run folder's metrics file.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use super::trainer::StepStats;
use crate::error::{Error, Result};

pub struct Metrics {
    path: PathBuf,
    file: File,
    bar: bool,
    interval: usize,
    started: Instant,
    /// Steps done when this process started (a resumed run), for the rate and ETA.
    first_step: usize,
    total_steps: usize,
    positions: usize,
    smoothed: LossAverage,
    tensorboard: Option<super::tensorboard::EventWriter>,
    device: Option<crate::backend::device_monitor::DeviceMonitor>,
}

/// The training loss smoothed as TensorBoard's slider does: an exponential moving average with
/// weight [`LossAverage::BETA`] on the past, debiased (the first step's is its raw loss), over
/// this process's steps.
#[derive(Debug, Default, Clone, Copy)]
struct LossAverage {
    sum: f64,
    weight: f64,
}

impl LossAverage {
    const BETA: f64 = 0.9;

    fn add(&mut self, loss: f64) -> f64 {
        self.sum = Self::BETA * self.sum + (1.0 - Self::BETA) * loss;
        self.weight = Self::BETA * self.weight + (1.0 - Self::BETA);
        self.sum / self.weight
    }
}

impl Metrics {
    /// Open `path` for appending, first dropping lines of steps after `keep_through` (left by
    /// a run that went on past the checkpoint it is resumed from).
    /// With `tensorboard`, TensorBoard event files go beside it too ([`super::tensorboard`]).
    pub fn open(path: &Path, keep_through: usize, total_steps: usize, interval: usize, progress_bar: bool, tensorboard: bool) -> Result<Self> {
        if path.exists() && keep_through > 0 {
            let f = File::open(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
            let kept: Vec<String> = BufReader::new(f)
                .lines()
                .map_while(|l| l.ok())
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                        .is_some_and(|s| s as usize <= keep_through)
                })
                .collect();
            let mut text = kept.join("\n");
            if !text.is_empty() {
                text.push('\n');
            }
            std::fs::write(path, text).map_err(|e| Error::file(path, format!("cannot rewrite: {e}")))?;
        } else if path.exists() {
            std::fs::remove_file(path).map_err(|e| Error::file(path, format!("cannot replace: {e}")))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::file(path, format!("cannot open the metrics file: {e}")))?;
        Ok(Metrics {
            path: path.to_path_buf(),
            file,
            bar: progress_bar && std::io::stderr().is_terminal(),
            interval: interval.max(1),
            started: Instant::now(),
            first_step: keep_through,
            total_steps,
            positions: 0,
            smoothed: LossAverage::default(),
            tensorboard: match tensorboard {
                true => Some(super::tensorboard::EventWriter::create(path.parent().unwrap_or(Path::new(".")))?),
                false => None,
            },
            device: None,
        })
    }

    /// Record the GPU's own counters too ([`crate::backend::device_monitor`]): at each logged
    /// step, the busy share since the last one and the most device memory used in it.
    pub fn watch_device(&mut self, monitor: Option<crate::backend::device_monitor::DeviceMonitor>) {
        self.device = monitor;
    }

    fn write(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(|e| Error::file(&self.path, format!("cannot write: {e}")))
    }

    /// Record step `step`; `epoch` is fractional (steps / steps per epoch).
    pub fn step(&mut self, step: usize, epoch: f64, s: &StepStats) -> Result<()> {
        self.positions += s.positions;
        let smoothed = self.smoothed.add(s.loss);
        let elapsed = self.started.elapsed().as_secs_f64();
        let done = step - self.first_step;
        let per_step = elapsed / done.max(1) as f64;
        let tokens_per_s = self.positions as f64 / elapsed.max(1e-9);
        let eta = per_step * (self.total_steps - step) as f64;
        let last = step == self.total_steps;
        if step % self.interval == 0 || last {
            let mut record = json!({
                "step": step, "epoch": (epoch * 1e4).round() / 1e4, "loss": s.loss, "loss_smoothed": smoothed, "lr": s.lr,
                "grad_norm": s.grad_norm, "tokens": s.tokens, "tokens_per_s": tokens_per_s.round(),
                "s_per_step": per_step, "elapsed_s": elapsed,
            });
            let mut line = format!(
                "step {step}/{} loss {:.4} (smoothed {:.4}) lr {:.3e} grad_norm {:.3} {:.0} tok/s eta {}",
                self.total_steps, s.loss, smoothed, s.lr, s.grad_norm, tokens_per_s, clock(eta)
            );
            if let Some(m) = s.memory {
                record["mem_reserved_gib"] = json!(gib(m.reserved));
                record["mem_in_use_gib"] = json!(gib(m.in_use));
                line.push_str(&format!(" mem {:.1} GiB", gib(m.reserved)));
            }
            let load = self.device.as_ref().and_then(|d| d.take());
            if let Some(l) = load {
                record["gpu_busy"] = json!((l.busy * 1e3).round() / 1e3);
                record["gpu_mem_used_gib"] = json!(gib(l.used_peak));
                line.push_str(&format!(" gpu {:.0}%", 100.0 * l.busy));
            }
            if let Some(tb) = self.tensorboard.as_mut() {
                let mut values = vec![
                    ("train/loss", s.loss),
                    ("train/loss_smoothed", smoothed),
                    ("train/learning_rate", s.lr),
                    ("train/grad_norm", s.grad_norm),
                    ("train/epoch", epoch),
                    ("train/tokens_per_s", tokens_per_s),
                ];
                if let Some(m) = s.memory {
                    values.extend([("train/mem_reserved_gib", gib(m.reserved)), ("train/mem_in_use_gib", gib(m.in_use))]);
                }
                if let Some(l) = load {
                    values.extend([("train/gpu_busy", l.busy), ("train/gpu_mem_used_gib", gib(l.used_peak))]);
                }
                tb.scalars(step as u64, &values)?;
            }
            self.write(record)?;
            if self.bar {
                eprint!("\r\x1b[2K{line}");
                if last {
                    eprintln!();
                }
            } else {
                println!("{line}");
            }
        }
        Ok(())
    }

    pub fn eval(&mut self, step: usize, loss: f64, tokens: usize) -> Result<()> {
        self.write(json!({ "step": step, "eval_loss": loss, "eval_tokens": tokens }))?;
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.scalars(step as u64, &[("eval/loss", loss)])?;
        }
        if self.bar {
            eprint!("\r\x1b[2K");
        }
        println!("eval at step {step}: loss {loss:.4} over {tokens} tokens");
        Ok(())
    }

    /// Redraw the run's charts (`plots/` beside the metrics file, [`crate::run::plots`]). A chart
    /// that cannot be written is reported, not fatal: the training goes on.
    pub fn draw_charts(&mut self) {
        self.file.flush().ok();
        let run_dir = self.path.parent().unwrap_or(Path::new(".")).to_path_buf();
        if let Err(e) = crate::run::plots::plot_run(&run_dir, &self.path) {
            self.note(&format!("warning: charts not drawn: {e}"));
        }
    }

    /// A line that must not be overwritten by the progress bar.
    pub fn note(&mut self, text: &str) {
        if self.bar {
            eprint!("\r\x1b[2K");
        }
        println!("{text}");
    }
}

/// `h:mm:ss`.
fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumed_metrics_drop_steps_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let stats = StepStats { loss: 1.0, lr: 0.1, grad_norm: 0.5, tokens: 3, positions: 8, memory: None };
        let mut m = Metrics::open(&path, 0, 4, 1, false, false).unwrap();
        for s in 1..=3 {
            m.step(s, 0.0, &stats).unwrap();
        }
        m.eval(2, 0.7, 10).unwrap();
        drop(m);
        let mut m = Metrics::open(&path, 2, 4, 1, false, false).unwrap();
        m.step(3, 0.0, &stats).unwrap();
        let steps: Vec<u64> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2, 2, 3]);
        assert_eq!(clock(3725.0), "1:02:05");
    }

    #[test]
    fn smoothed_loss_starts_at_the_first_loss_and_follows_slowly() {
        let mut avg = LossAverage::default();
        assert!((avg.add(4.0) - 4.0).abs() < 1e-12, "debiased: the first step is its own loss");
        let second = avg.add(2.0);
        // (0.9 * 0.1 * 4 + 0.1 * 2) / (1 - 0.81)
        assert!((second - (0.36 + 0.2) / 0.19).abs() < 1e-12, "{second}");
        let mut last = second;
        for _ in 0..200 {
            last = avg.add(2.0);
        }
        assert!((last - 2.0).abs() < 1e-6, "{last}");
    }
}

fn gib(bytes: u64) -> f64 {
    (bytes as f64 / (1u64 << 30) as f64 * 100.0).round() / 100.0
}
