//! `trainer bench-attention`: the attention core alone, forward (output and log-sum-exp) and
//! backward (dq, dk, dv from the saved forward), on random inputs of the run's dtype, causal or
//! packed (each row four segments), timed after a warm-up with the device synchronised around
//! each pass. `benches/attention.sh` sets it beside torch's `scaled_dot_product_attention` in the
//! same device call.

use std::time::Instant;

use burn::tensor::{Distribution, Int, Tensor, TensorData};
use kernels_cubecl::{attention_mask, AttentionKernel, AttentionOptions, AttentionWanted};
use serde::Serialize;

use crate::backend::{self, gib, BackendJob, TrainBackend};
use crate::error::{Error, Result};

/// What is timed: the inputs' shapes and the mask.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub head_dim: usize,
    /// Each row four segments (40%, 30%, 20%, 10% of it), attending within their own; else
    /// one causal sequence a row.
    pub packed: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct AttentionBench {
    pub shape: AttentionShape,
    pub kernel: AttentionKernel,
    pub warmup: usize,
    pub steps: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttentionBenchReport {
    #[serde(flatten)]
    pub shape: AttentionShape,
    pub dtype: String,
    /// The path that ran (`attention_kernel` of the backend for these inputs).
    pub kernel: String,
    pub forward_ms: f64,
    pub backward_ms: f64,
    /// Multiply-adds of the readable (query, key) pairs, x2: `4 d` a pair forward (two
    /// products), 2.5x that backward (five), as FlashAttention's benchmarks count them.
    pub forward_tflops: f64,
    pub backward_tflops: f64,
    /// Tokens (`batch x seq`) through forward and backward a second.
    pub tokens_per_s: f64,
    /// The device allocator's pool at its largest after a pass, inputs included; `None` on a
    /// backend without device pools.
    pub peak_gib: Option<f64>,
}

impl AttentionShape {
    /// Segment lengths of one row: four when packed (the last takes the remainder), one
    /// otherwise.
    fn segments(&self) -> Vec<usize> {
        if !self.packed {
            return vec![self.seq];
        }
        let cut = |f: f64| ((self.seq as f64) * f).round() as usize;
        let (a, b, c) = (cut(0.4), cut(0.3), cut(0.2));
        vec![a, b, c, self.seq.saturating_sub(a + b + c)].into_iter().filter(|&n| n > 0).collect()
    }

    /// The shapes, or what is wrong with them.
    pub fn check(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Unsupported(format!("bench-attention: {what}")));
        if [self.batch, self.heads, self.kv_heads, self.seq, self.head_dim].contains(&0) {
            return bad("--batch, --heads, --kv-heads, --seq and --head-dim must be at least 1".into());
        }
        if self.heads % self.kv_heads != 0 {
            return bad(format!("--heads {} is not a multiple of --kv-heads {}; expected e.g. --kv-heads {}", self.heads, self.kv_heads, self.heads));
        }
        Ok(())
    }
}

/// Median of `xs` (not empty).
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

impl BackendJob for AttentionBench {
    type Output = AttentionBenchReport;

    fn run<B: TrainBackend>(self, device: B::Device) -> Result<AttentionBenchReport> {
        let shape = self.shape;
        shape.check()?;
        let sync = |d: &B::Device| B::sync(d).map_err(|e| Error::Internal(format!("device sync failed: {e:?}")));
        let (b, hq, hkv, s, d) = (shape.batch, shape.heads, shape.kv_heads, shape.seq, shape.head_dim);
        B::seed(&device, 0);
        let random = |shape: [usize; 4]| Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let (q, k, v, dout) = (random([b, hq, s, d]), random([b, hkv, s, d]), random([b, hkv, s, d]), random([b, hq, s, d]));
        let lengths = shape.segments();
        let ids: Vec<i64> = (0..b).flat_map(|_| lengths.iter().enumerate().flat_map(|(i, &n)| std::iter::repeat_n(i as i64 + 1, n))).collect();
        let segments = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, s]), &device);
        let mask = attention_mask::<B>(shape.packed.then_some(segments), b, s, &device);
        let options = AttentionOptions { block_q: None, causal: true, kernel: self.kernel };
        let kernel = format!("{:?}", B::attention_kernel(&q, &k, &v, options));
        let scale = (d as f64).powf(-0.5);
        let wanted = AttentionWanted { q: true, k: true, v: true };
        let (mut forward, mut backward) = (Vec::new(), Vec::new());
        let mut peak: Option<u64> = None;
        for step in 0..self.warmup + self.steps.max(1) {
            sync(&device)?;
            let t = Instant::now();
            let saved = B::blockwise_attention_forward(q.clone(), k.clone(), v.clone(), scale, mask.clone(), options);
            sync(&device)?;
            let f = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let grads = B::blockwise_attention_backward(q.clone(), k.clone(), v.clone(), scale, mask.clone(), saved, dout.clone(), options, wanted);
            sync(&device)?;
            let bw = t.elapsed().as_secs_f64();
            if grads.q.is_none() || grads.k.is_none() || grads.v.is_none() {
                return Err(Error::Internal("bench-attention: a gradient is missing".into()));
            }
            if let Some(m) = backend::device_memory::<B>(&device) {
                peak = Some(peak.map_or(m.reserved, |p| p.max(m.reserved)));
            }
            if step >= self.warmup {
                forward.push(f);
                backward.push(bw);
            }
        }
        let pairs: usize = lengths.iter().map(|&n| n * (n + 1) / 2).sum();
        let flops = 4.0 * (d * pairs * b * hq) as f64;
        let (fwd, bwd) = (median(forward), median(backward));
        Ok(AttentionBenchReport {
            shape,
            dtype: format!("{:?}", q.dtype()).to_lowercase(),
            kernel,
            forward_ms: fwd * 1e3,
            backward_ms: bwd * 1e3,
            forward_tflops: flops / fwd / 1e12,
            backward_tflops: 2.5 * flops / bwd / 1e12,
            tokens_per_s: (b * s) as f64 / (fwd + bwd),
            peak_gib: peak.map(gib),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(packed: bool) -> AttentionShape {
        AttentionShape { batch: 1, heads: 4, kv_heads: 2, seq: 40, head_dim: 8, packed }
    }

    fn bench(packed: bool) -> AttentionBench {
        AttentionBench { shape: shape(packed), kernel: AttentionKernel::Auto, warmup: 0, steps: 1 }
    }

    #[test]
    fn runs_on_the_cpu_and_counts_the_readable_pairs() {
        let r = bench(true).run::<crate::backend::Cpu>(Default::default()).unwrap();
        assert_eq!((r.kernel.as_str(), r.shape.packed, r.shape.seq), ("Blockwise", true, 40));
        assert!(r.forward_ms > 0.0 && r.backward_ms > 0.0 && r.forward_tflops > 0.0);
        assert_eq!(shape(true).segments(), vec![16, 12, 8, 4]);
        assert_eq!(shape(false).segments(), vec![40]);
        let err = AttentionShape { kv_heads: 3, ..shape(false) }.check().unwrap_err().to_string();
        assert!(err.contains("--heads 4 is not a multiple of --kv-heads 3"), "{err}");
    }
}
