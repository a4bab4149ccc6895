//! The learning-rate schedule, as Megatron (and so ms-swift's `megatron sft`) computes it:
//! linear warmup from 0 to `lr` over the warmup steps, then decay to `min_lr` by the last step
//! (cosine, linear or none).

use crate::recipe::{Decay, OptimizerSection, ScheduleSection};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub decay: Decay,
}

impl LrSchedule {
    /// The schedule for a run of `total_steps` optimizer steps. A warmup fraction rounds to whole
    /// steps as Megatron's `lr_warmup_fraction * lr_decay_iters` does.
    pub fn new(opt: &OptimizerSection, sched: &ScheduleSection, total_steps: usize) -> Self {
        let warmup_steps = match (sched.warmup_steps, sched.warmup_fraction) {
            (Some(s), _) => s,
            (None, Some(f)) => (f * total_steps as f64) as usize,
            (None, None) => 0,
        };
        LrSchedule { lr: opt.lr, min_lr: opt.min_lr, warmup_steps: warmup_steps.min(total_steps), total_steps, decay: sched.decay }
    }

    /// Learning rate for optimizer step `step` (counting from 1, as Megatron's iteration does
    /// after its first increment).
    pub fn at(&self, step: usize) -> f64 {
        if self.warmup_steps > 0 && step <= self.warmup_steps {
            return self.lr * step as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps);
        if span == 0 || step >= self.total_steps {
            return match self.decay {
                Decay::Constant => self.lr,
                _ => self.min_lr,
            };
        }
        let ratio = (step - self.warmup_steps) as f64 / span as f64;
        let coeff = match self.decay {
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos()),
            Decay::Linear => 1.0 - ratio,
            Decay::Constant => 1.0,
        };
        self.min_lr + coeff * (self.lr - self.min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(decay: Decay, warmup_fraction: Option<f64>, total: usize) -> LrSchedule {
        let opt = OptimizerSection { lr: 1e-4, min_lr: 1e-5, ..Default::default() };
        let sched = ScheduleSection { warmup_fraction, warmup_steps: None, decay };
        LrSchedule::new(&opt, &sched, total)
    }

    #[test]
    fn seed_recipe_schedule_warms_up_then_follows_a_cosine_to_min_lr() {
        // --lr 1e-4 --min_lr 1e-5 --lr_warmup_fraction 0.05 over 100 steps: 5 warmup steps.
        let s = schedule(Decay::Cosine, Some(0.05), 100);
        assert_eq!(s.warmup_steps, 5);
        assert!((s.at(1) - 2e-5).abs() < 1e-15);
        assert!((s.at(5) - 1e-4).abs() < 1e-15);
        // Half way through the decay the cosine is at its midpoint.
        assert!((s.at(5 + 95 / 2) - (1e-5 + 0.5 * 9e-5 * (1.0 + (std::f64::consts::PI * 47.0 / 95.0).cos()))).abs() < 1e-15);
        assert!((s.at(100) - 1e-5).abs() < 1e-15);
        let lrs: Vec<f64> = (6..=100).map(|t| s.at(t)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]));
    }

    #[test]
    fn linear_and_constant_decay() {
        let s = schedule(Decay::Linear, None, 10);
        assert!((s.at(5) - (1e-5 + 0.5 * 9e-5)).abs() < 1e-15);
        let c = schedule(Decay::Constant, Some(0.2), 10);
        assert_eq!((c.at(1), c.at(7), c.at(10)), (0.5e-4, 1e-4, 1e-4));
    }
}
