//! Plain-Burn reference implementations: the definition every fused kernel is checked against.

use burn::tensor::activation::{log_softmax, silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, FloatDType, Int, Tensor, TensorData};

fn to_f32<B: Backend, const D: usize>(x: Tensor<B, D>) -> (Tensor<B, D>, DType) {
    let dtype = x.dtype();
    if dtype == DType::F32 {
        (x, dtype)
    } else {
        (x.cast(FloatDType::F32), dtype)
    }
}

fn from_f32<B: Backend, const D: usize>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if dtype == DType::F32 {
        x
    } else {
        x.cast(dtype)
    }
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`, statistics in f32.
///
/// # Shapes
/// - `x`: `[..., n]`, `weight`: `[n]` → `[..., n]`
pub fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let (x, dtype) = to_f32(x);
    let var = x.clone().powi_scalar(2).mean_dim(D - 1);
    let normed = x * (var + eps).sqrt().recip();
    let normed = from_f32(normed, dtype);
    normed * weight.unsqueeze::<D>()
}

/// Rotary tables for the given positions, as transformers builds them: `freqs = pos * inv_freq`
/// in f32, `emb = cat(freqs, freqs)`, returning `(cos(emb), sin(emb))`.
///
/// # Shapes
/// - `positions`: `[batch, seq]`, `inv_freq`: `[head_dim / 2]` → two `[batch, 1, seq, head_dim]`
pub fn rope_cos_sin<B: Backend>(
    positions: Tensor<B, 2, Int>,
    inv_freq: Tensor<B, 1>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [b, s] = positions.dims();
    let half = inv_freq.dims()[0];
    let pos = positions.float().cast(FloatDType::F32).reshape([b, s, 1]);
    let inv = inv_freq.cast(FloatDType::F32).reshape([1, 1, half]);
    let freqs = pos * inv;
    let emb = Tensor::cat(vec![freqs.clone(), freqs], 2).reshape([b, 1, s, 2 * half]);
    (emb.clone().cos(), emb.sin())
}

/// Rotary position embedding in the "rotate half" layout of transformers' Llama/Qwen:
/// `x * cos + rotate_half(x) * sin`, with `rotate_half([x1, x2]) = [-x2, x1]`.
///
/// # Shapes
/// - `x`: `[batch, heads, seq, head_dim]`, `cos`/`sin`: `[batch, 1, seq, head_dim]`
pub fn rotary<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
    let dtype = x.dtype();
    let [b, h, s, d] = x.dims();
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.clone().narrow(3, d / 2, d / 2);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let cos = from_f32(cos, dtype).expand([b, h, s, d]);
    let sin = from_f32(sin, dtype).expand([b, h, s, d]);
    x * cos + rotated * sin
}

/// SwiGLU: `silu(gate) * up`.
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    silu(gate) * up
}

/// Grouped-query attention, `softmax(q k^T * scale + mask) v`, softmax in f32.
///
/// Query head `h` reads key/value head `h / (q_heads / kv_heads)`, as transformers'
/// `repeat_kv` arranges it. `blocked` (from [`attention_mask`]) is `true` where a query may not
/// read a key.
///
/// # Shapes
/// - `q`: `[batch, q_heads, seq, head_dim]`, `k`/`v`: `[batch, kv_heads, seq, head_dim]`,
///   `blocked`: `[batch, 1, seq, seq]` → `[batch, q_heads, seq, head_dim]`
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f64,
    blocked: Tensor<B, 4, Bool>,
) -> Tensor<B, 4> {
    let [b, hq, s, d] = q.dims();
    let hkv = k.dims()[1];
    let groups = hq / hkv;
    let repeat = |t: Tensor<B, 4>| -> Tensor<B, 4> {
        if groups == 1 {
            return t;
        }
        t.unsqueeze_dim::<5>(2).expand([b, hkv, groups, s, d]).reshape([b, hq, s, d])
    };
    let (k, v) = (repeat(k), repeat(v));
    let scores = q.matmul(k.swap_dims(2, 3)) * scale;
    let (scores, dtype) = to_f32(scores);
    let probs = softmax(scores.mask_fill(blocked.expand([b, hq, s, s]), f32::NEG_INFINITY), 3);
    from_f32(probs, dtype).matmul(v)
}

/// Causal attention over `[batch, seq]` tokens without packing or padding.
pub fn causal_attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, scale: f64) -> Tensor<B, 4> {
    let [b, _, s, _] = q.dims();
    let blocked = attention_mask::<B>(None, b, s, &q.device());
    attention(q, k, v, scale, blocked)
}

/// Which keys each query may not read: the future (causal), and with `segments` (`[batch,
/// seq]`, rows of a packed or padded sequence numbered 1, 2, .., padding 0) every key of another
/// segment. Padding attends only to earlier padding, so no row of the softmax is empty and no
/// real token ever reads padding.
///
/// # Shapes
/// → `[batch, 1, seq, seq]`, `true` = blocked
pub fn attention_mask<B: Backend>(
    segments: Option<Tensor<B, 2, Int>>,
    batch: usize,
    seq: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let causal = causal_mask::<B>(seq, device).reshape([1, 1, seq, seq]).expand([batch, 1, seq, seq]);
    match segments {
        None => causal,
        Some(seg) => {
            let q = seg.clone().reshape([batch, 1, seq, 1]).expand([batch, 1, seq, seq]);
            let k = seg.reshape([batch, 1, 1, seq]).expand([batch, 1, seq, seq]);
            causal.bool_or(q.not_equal(k))
        }
    }
}

/// `true` above the diagonal: the future positions a query may not attend to.
fn causal_mask<B: Backend>(s: usize, device: &B::Device) -> Tensor<B, 2, Bool> {
    let mut m = vec![false; s * s];
    for i in 0..s {
        for j in i + 1..s {
            m[i * s + j] = true;
        }
    }
    Tensor::from_data(TensorData::new(m, [s, s]), device)
}

/// Summed token cross-entropy and the number of tokens it covers.
pub struct CrossEntropy<B: Backend> {
    /// Sum over counted tokens of `-log p(target)`, in f32. Shape `[1]`.
    pub sum: Tensor<B, 1>,
    /// Number of targets not equal to the ignore index.
    pub tokens: usize,
}

/// Cross-entropy of `logits` against `targets`, skipping `ignore_index`, in f32.
///
/// Returns the sum, not the mean, so that a caller can normalise per token over a whole global
/// batch (several micro batches, several ranks).
///
/// # Shapes
/// - `logits`: `[n, vocab]`, `targets`: `[n]`
pub fn cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    ignore_index: i64,
) -> CrossEntropy<B> {
    let [n, _] = logits.dims();
    let (logits, _) = to_f32(logits);
    let keep = targets.clone().not_equal_elem(ignore_index);
    let tokens = keep.clone().int().sum().into_scalar_i64() as usize;
    let safe_targets = targets.mask_fill(keep.clone().bool_not(), 0).reshape([n, 1]);
    let logp = log_softmax(logits, 1).gather(1, safe_targets).reshape([n]);
    let nll = logp.neg() * keep.float().cast(FloatDType::F32);
    CrossEntropy { sum: nll.sum(), tokens }
}

/// Cross-entropy of the LM head's logits `h @ w` against `targets`, skipping `ignore_index`:
/// [`cross_entropy`] of the full `[n, vocab]` logits. The definition that
/// [`crate::fused_linear_cross_entropy`] (which never holds all logits at once) is checked against.
///
/// # Shapes
/// - `h`: `[n, hidden]`, `w`: `[hidden, vocab]` (stored `[in, out]`), `targets`: `[n]`
pub fn linear_cross_entropy<B: Backend>(
    h: Tensor<B, 2>,
    w: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    ignore_index: i64,
) -> CrossEntropy<B> {
    cross_entropy(h.matmul(w), targets, ignore_index)
}

trait ScalarI64 {
    fn into_scalar_i64(self) -> i64;
}

impl<B: Backend> ScalarI64 for Tensor<B, 1, Int> {
    fn into_scalar_i64(self) -> i64 {
        let data = self.into_data().convert::<i64>();
        data.as_slice::<i64>().map(|s| s[0]).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    fn t<const D: usize>(v: Vec<f32>, shape: [usize; D]) -> Tensor<B, D> {
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    fn vec<const D: usize>(x: Tensor<B, D>) -> Vec<f32> {
        x.into_data().convert::<f32>().to_vec().unwrap()
    }

    #[test]
    fn rms_norm_matches_hand_computation() {
        let y = vec(rms_norm(t(vec![3.0, 4.0], [1, 2]), t(vec![1.0, 2.0], [2]), 0.0));
        let r = (12.5f32).sqrt();
        assert!((y[0] - 3.0 / r).abs() < 1e-6 && (y[1] - 8.0 / r).abs() < 1e-6, "{y:?}");
    }

    #[test]
    fn rotary_at_position_zero_is_identity_and_rotates_pairs() {
        let x = t((0..8).map(|i| i as f32 + 1.0).collect(), [1, 1, 2, 4]);
        let pos = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![0i64, 1], [1, 2]), &Default::default());
        let (cos, sin) = rope_cos_sin(pos, t(vec![1.0, 0.5], [2]));
        let y = vec(rotary(x, cos, sin));
        assert_eq!(&y[..4], &[1.0, 2.0, 3.0, 4.0]);
        // position 1: pair (x0, x2) rotated by 1 rad, pair (x1, x3) by 0.5 rad.
        let (c1, s1, c5, s5) = (1f32.cos(), 1f32.sin(), 0.5f32.cos(), 0.5f32.sin());
        let want = [5.0 * c1 - 7.0 * s1, 6.0 * c5 - 8.0 * s5, 7.0 * c1 + 5.0 * s1, 8.0 * c5 + 6.0 * s5];
        for (a, b) in y[4..].iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{y:?} vs {want:?}");
        }
    }

    #[test]
    fn attention_is_causal_and_groups_kv_heads() {
        // One kv head shared by two query heads; the first position can only see itself.
        let q = t(vec![1.0; 2 * 3 * 2], [1, 2, 3, 2]);
        let k = t(vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [1, 1, 3, 2]);
        let v = t(vec![1.0, 10.0, 2.0, 20.0, 3.0, 30.0], [1, 1, 3, 2]);
        let y = vec(causal_attention(q, k, v, 1.0));
        assert_eq!(&y[..2], &[1.0, 10.0]);
        assert_eq!(&y[..6], &y[6..]);
        let (w0, w1) = (0.3f32.exp(), 0.7f32.exp());
        assert!((y[2] - (w0 * 1.0 + w1 * 2.0) / (w0 + w1)).abs() < 1e-5);
    }

    #[test]
    fn segments_keep_packed_rows_apart_and_padding_out() {
        let seg = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 1, 2, 2, 0], [1, 5]), &Default::default());
        let m: Vec<bool> = attention_mask::<B>(Some(seg), 1, 5, &Default::default()).into_data().to_vec().unwrap();
        let allowed = |q: usize| (0..5).filter(|&k| !m[q * 5 + k]).collect::<Vec<_>>();
        assert_eq!(allowed(1), [0, 1]);
        assert_eq!(allowed(2), [2]);
        assert_eq!(allowed(3), [2, 3]);
        assert_eq!(allowed(4), [4], "padding reads only padding");
        // A packed sequence computes each row as if it were alone.
        let q = t((0..10).map(|i| (i as f32 * 0.37).sin()).collect(), [1, 1, 5, 2]);
        let k = t((0..10).map(|i| (i as f32 * 0.71).cos()).collect(), [1, 1, 5, 2]);
        let v = t((0..10).map(|i| i as f32).collect(), [1, 1, 5, 2]);
        let seg = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 1, 2, 2, 0], [1, 5]), &Default::default());
        let packed = vec(attention(q.clone(), k.clone(), v.clone(), 0.5, attention_mask::<B>(Some(seg), 1, 5, &Default::default())));
        let second = vec(causal_attention(q.narrow(2, 2, 2), k.narrow(2, 2, 2), v.narrow(2, 2, 2), 0.5));
        for (a, b) in packed[4..8].iter().zip(&second) {
            assert!((a - b).abs() < 1e-6, "{packed:?} vs {second:?}");
        }
    }

    #[test]
    fn cross_entropy_skips_ignored_targets() {
        let logits = t(vec![0.0, 0.0, 1.0, 0.0, 5.0, 5.0], [3, 2]);
        let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![0i64, -100, 1], [3]), &Default::default());
        let ce = cross_entropy(logits, targets, -100);
        assert_eq!(ce.tokens, 2);
        let want = 2.0f32.ln() * 2.0;
        assert!((vec(ce.sum)[0] - want).abs() < 1e-6);
    }
}
