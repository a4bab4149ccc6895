//! `trainer bench-loss`: the LM-head cross-entropy alone (forward and backward to `dh` and
//! `dW`), fused (`kernels_cubecl::fused_linear_cross_entropy`) or through materialised logits,
//! timed after a warm-up, with the device allocator's memory beyond the inputs. Set beside
//! PyTorch's `F.cross_entropy(h @ W^T)` by `benches/ce_torch.py` in the same device call.

use std::time::Instant;

use burn::backend::Autodiff;
use crate::backend::TrainBackend;
use burn::tensor::{Distribution, Int, Tensor};
use serde::Serialize;

use crate::backend::{self, gib, BackendJob};
use crate::error::{Error, Result};
use crate::model::IGNORE_INDEX;

#[derive(Debug, Clone, Copy)]
pub struct LossBench {
    pub tokens: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub warmup: usize,
    pub steps: usize,
    /// The fused kernel; `false` computes the logits and `kernels_cubecl::cross_entropy`.
    pub fused: bool,
    /// The fused kernel's tokens per chunk; `None` takes its default
    /// ([`kernels_cubecl::LinearCrossEntropyOptions::chunk_tokens_for`]).
    pub chunk_tokens: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LossBenchReport {
    pub fused: bool,
    /// The fused kernel's tokens per chunk (absent unfused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_tokens: Option<usize>,
    pub tokens: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub dtype: String,
    /// Seconds of forward + backward (device synchronised at each end), after the warm-up.
    pub step_seconds: Vec<f64>,
    pub s_per_step: f64,
    pub loss: f64,
    /// Device memory live before the first step: `h`, `W` and the labels.
    pub inputs_gib: Option<f64>,
    /// The allocator's pool at its largest after a step, minus the inputs: what the loss and
    /// its gradients took on top of them (`dh` and `dW` included).
    pub peak_extra_gib: Option<f64>,
}

impl BackendJob for LossBench {
    type Output = LossBenchReport;

    fn run<B: TrainBackend>(self, device: B::Device) -> Result<LossBenchReport> {
        let sync = |d: &B::Device| B::sync(d).map_err(|e| Error::Internal(format!("device sync failed: {e:?}")));
        // The same inputs for the fused and the unfused run: their losses must agree.
        B::seed(&device, 0);
        let h = Tensor::<Autodiff<B>, 2>::random([self.tokens, self.hidden], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let w = (Tensor::<Autodiff<B>, 2>::random([self.hidden, self.vocab], Distribution::Normal(0.0, 1.0), &device) * 0.02)
            .detach()
            .require_grad();
        let labels = Tensor::<Autodiff<B>, 1, Int>::random([self.tokens], Distribution::Uniform(0.0, self.vocab as f64), &device);
        let dtype = format!("{:?}", h.dtype()).to_lowercase();
        sync(&device)?;
        B::memory_cleanup(&device);
        let before = backend::device_memory::<B>(&device);
        let mut step_seconds = Vec::new();
        let mut peak: Option<u64> = None;
        let mut loss = f64::NAN;
        for step in 1..=self.warmup + self.steps {
            sync(&device)?;
            let t = Instant::now();
            let ce = if self.fused {
                let options = kernels_cubecl::LinearCrossEntropyOptions { ignore_index: IGNORE_INDEX, chunk_tokens: self.chunk_tokens };
                kernels_cubecl::fused_linear_cross_entropy(h.clone(), w.clone(), labels.clone(), options)
            } else {
                kernels_cubecl::cross_entropy(<Autodiff<B> as kernels_cubecl::LinearBackend>::linear_matmul(h.clone(), w.clone()), labels.clone(), IGNORE_INDEX)
            };
            let mean = ce.sum / ce.tokens.max(1) as f64;
            let grads = mean.clone().backward();
            let (dh, dw) = (h.grad(&grads), w.grad(&grads));
            sync(&device)?;
            let secs = t.elapsed().as_secs_f64();
            if dh.is_none() || dw.is_none() {
                return Err(Error::Internal("bench-loss: a gradient is missing".into()));
            }
            loss = f64::from(super::trainer::scalar_f32(mean.inner()));
            if let Some(m) = backend::device_memory::<B>(&device) {
                peak = Some(peak.map_or(m.reserved, |p| p.max(m.reserved)));
            }
            eprintln!("bench-loss step {step}: {secs:.4} s, loss {loss:.4}{}", if step <= self.warmup { " (warm-up)" } else { "" });
            if step > self.warmup {
                step_seconds.push(secs);
            }
        }
        let options = kernels_cubecl::LinearCrossEntropyOptions { ignore_index: IGNORE_INDEX, chunk_tokens: self.chunk_tokens };
        Ok(LossBenchReport {
            fused: self.fused,
            chunk_tokens: self.fused.then(|| options.chunk_tokens_for(self.tokens, self.hidden, self.vocab)),
            tokens: self.tokens,
            hidden: self.hidden,
            vocab: self.vocab,
            dtype,
            s_per_step: step_seconds.iter().sum::<f64>() / step_seconds.len().max(1) as f64,
            step_seconds,
            loss,
            inputs_gib: before.map(|m| gib(m.in_use)),
            peak_extra_gib: match (peak, before) {
                (Some(p), Some(b)) => Some(gib(p.saturating_sub(b.in_use))),
                _ => None,
            },
        })
    }
}
