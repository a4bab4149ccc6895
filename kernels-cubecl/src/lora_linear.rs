//! A linear layer with a LoRA adapter as one operation: `y = x w + s (dropout(x) A) B`, as peft
//! computes it, in four GEMMs forward and at most six backward, with no tensor of the layer's
//! output width in f32 and, on bf16 storage, no f32 copy of the layer's input.
//!
//! Precision (A and B are f32, `x` and `w` in the storage dtype): the adapter's input `h` is `x`
//! times the dropout mask's 0 or 1 (exact in any dtype; `1 / keep` goes into the scale).
//! `t = s (h A)` accumulates in f32 from `h` as stored, the scale applied to the accumulation
//! (the GEMM's alpha, no pass of its own): on bf16 with A rounded to bf16, as torch's autocast
//! computes peft's adapter, and `t` written in bf16 (the dtype `t B` and `dB` read it in, which
//! bounds what a finer A could give); other dtypes take `h` to f32 and A as it is, `t` in f32.
//! The rank-r product `t B` (`t` and `B` in the storage dtype) is rounded to the storage dtype
//! and the base GEMM accumulates `x w` onto it in f32, one rounding of the sum. peft rounds `x w`
//! and `s h A B` to the storage dtype separately and rounds their sum again; on f32 storage (CPU)
//! both are the same f32 maths. Backward, with `dy` in the storage dtype and `g = s (dy B^T)` in
//! f32 (the scale again the GEMM's alpha): `dB = t^T dy`,
//! `dA = h^T g` (f32; on bf16, `h` as stored and `g` as the sum of two bf16 tensors, `g` to about
//! 2^-17 relative, in one GEMM), `dx = dy w^T + (g A^T) * mask` (the adapter's term rounded to
//! the storage dtype, the base GEMM accumulating onto it).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor};

use crate::layer_ops::{float, primitive, to_dtype};
use crate::linear::LinearBackend;

/// A LoRA adapter's factors and settings for [`LinearBackend::lora_linear`].
#[derive(Debug, Clone)]
pub struct LoraFactors<B: Backend> {
    /// `[in, r]`, f32.
    pub a: Tensor<B, 2>,
    /// `[r, out]`, f32.
    pub b: Tensor<B, 2>,
    /// `alpha / r` (or rslora's `alpha / sqrt(r)`).
    pub scale: f64,
    /// Dropout on the adapter's input; `None` without dropout (evaluation, or a dropout of 0).
    pub dropout: Option<DropoutMask<B>>,
}

/// Which inputs of a LoRA adapter dropout keeps, and with what probability.
#[derive(Debug, Clone)]
pub struct DropoutMask<B: Backend> {
    /// `[m, in]`: 1 where the input is kept, 0 where dropped, in the input's dtype.
    pub kept: Tensor<B, 2>,
    /// The probability of keeping an input: kept inputs are scaled by `1 / keep`.
    pub keep: f64,
}

impl<B: Backend> LoraFactors<B> {
    /// The scale of the rank-r product with dropout's `1 / keep` folded in.
    fn scale_with_dropout(&self) -> f64 {
        self.scale / self.dropout.as_ref().map_or(1.0, |d| d.keep)
    }
}

/// `(x w + t B, t)` with `t = s (h A)` (bf16 on bf16 storage, else f32) and `h` the adapter's
/// input: the forward of [`LinearBackend::lora_linear`], on any backend.
pub fn lora_forward<B: LinearBackend>(x: Tensor<B, 2>, w: Tensor<B, 2>, lora: &LoraFactors<B>) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let dtype = x.dtype();
    let h = adapter_input(x.clone(), lora.dropout.as_ref().map(|d| d.kept.clone()));
    let (a, scale) = (lora.a.clone(), lora.scale_with_dropout());
    let t = match dtype {
        DType::BF16 => B::gemm_scaled(h, false, to_dtype(a, dtype), false, scale, dtype, None),
        _ => B::gemm_scaled(to_dtype(h, DType::F32), false, to_dtype(a, DType::F32), false, scale, DType::F32, None),
    };
    // The adapter's term first, the base GEMM accumulating onto it: the output is written twice
    // and read once, not written twice and read twice.
    let tb = B::gemm(to_dtype(t.clone(), dtype), false, to_dtype(lora.b.clone(), dtype), false, dtype, None);
    (B::gemm(x, false, w, false, dtype, Some(tb)), t)
}

/// `x` times the dropout mask's 0s and 1s when there is one, in `x`'s dtype (exact).
fn adapter_input<B: Backend>(x: Tensor<B, 2>, kept: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
    match kept {
        Some(m) => x * m,
        None => x,
    }
}

/// `op(p) @ f` in f32, for `p` in the storage dtype and an f32 factor `f` of a few columns (the
/// adapter's gradient `g`). On bf16, `f = hi + lo` with both bf16 (`f` to about 2^-17
/// relative) and `op(p) [hi | lo]` is one GEMM with f32 accumulation, its halves summed: `p` is
/// read once as stored. Other dtypes: `p` in f32 (f16's exponent range would flush `lo`).
fn times_f32<B: LinearBackend>(p: Tensor<B, 2>, tp: bool, f: Tensor<B, 2>) -> Tensor<B, 2> {
    let dtype = p.dtype();
    let f = to_dtype(f, DType::F32);
    if dtype != DType::BF16 {
        return B::gemm(to_dtype(p, DType::F32), tp, f, false, DType::F32, None);
    }
    let cols = f.dims()[1];
    let hi = to_dtype(f.clone(), dtype);
    let lo = to_dtype(f - to_dtype(hi.clone(), DType::F32), dtype);
    let both = B::gemm(p, tp, Tensor::cat(vec![hi, lo], 1), false, DType::F32, None);
    both.clone().narrow(1, 0, cols) + both.narrow(1, cols, cols)
}

/// What the backward reads: the op's inputs (the mask's values, not a node) and `t`.
#[derive(Debug, Clone)]
struct LoraState<B: Backend> {
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    t: FloatTensor<B>,
    mask: Option<FloatTensor<B>>,
    scale: f64,
}

#[derive(Debug)]
struct LoraBackward;

impl<B: LinearBackend> Backward<B, 4> for LoraBackward {
    type State = LoraState<B>;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w, node_a, node_b] = ops.parents;
        let dy = float::<B, 2>(grads.consume::<B>(&ops.node));
        let s = ops.state;
        let dtype = dy.dtype();
        let (x, w, a, b, t) = (float::<B, 2>(s.x), float::<B, 2>(s.w), float::<B, 2>(s.a), float::<B, 2>(s.b), float::<B, 2>(s.t));
        let mask = s.mask.map(float::<B, 2>);
        let (a_dtype, b_dtype) = (a.dtype(), b.dtype());
        let g = (node_x.is_some() || node_a.is_some())
            .then(|| B::gemm_scaled(dy.clone(), false, to_dtype(b, dtype), true, s.scale, DType::F32, None));
        if let Some(node) = node_b {
            let db = B::gemm(to_dtype(t, dtype), true, dy.clone(), false, b_dtype, None);
            grads.register::<B>(node.id, primitive(db));
        }
        if let (Some(node), Some(g)) = (node_a, &g) {
            let h = adapter_input(x.clone(), mask.clone());
            let da = to_dtype(times_f32(h, true, g.clone()), a_dtype);
            grads.register::<B>(node.id, primitive(da));
        }
        if let Some(node) = node_w {
            let w_dtype = w.dtype();
            let dw = B::gemm(x.clone(), true, dy.clone(), false, w_dtype, None);
            grads.register::<B>(node.id, primitive(dw));
        }
        if let (Some(node), Some(g)) = (node_x, g) {
            let x_dtype = x.dtype();
            // The adapter's term first, as in the forward, the base GEMM accumulating onto it.
            let term = B::gemm(to_dtype(g, x_dtype), false, to_dtype(a, x_dtype), true, x_dtype, None);
            let term = match mask {
                Some(m) => term * m,
                None => term,
            };
            grads.register::<B>(node.id, primitive(B::gemm(dy, false, w, true, x_dtype, Some(term))));
        }
    }
}

/// [`LinearBackend::lora_linear`] on `Autodiff<B>`: the inner backend's forward as one op with
/// [`LoraBackward`].
pub(crate) fn tracked<B: LinearBackend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 2>,
    w: Tensor<Autodiff<B, C>, 2>,
    lora: LoraFactors<Autodiff<B, C>>,
) -> Tensor<Autodiff<B, C>, 2> {
    let scale = lora.scale_with_dropout();
    let (x, w, a, b) = (primitive(x), primitive(w), primitive(lora.a), primitive(lora.b));
    let keep = lora.dropout.as_ref().map(|d| d.keep);
    let mask = lora.dropout.map(|d| d.kept.inner());
    let inner = |x: &FloatTensor<B>, w: &FloatTensor<B>, a: &FloatTensor<B>, b: &FloatTensor<B>| {
        let dropout = mask.clone().zip(keep).map(|(kept, keep)| DropoutMask { kept, keep });
        let factors = LoraFactors { a: float(a.clone()), b: float(b.clone()), scale: lora.scale, dropout };
        lora_forward(float(x.clone()), float(w.clone()), &factors)
    };
    let nodes = [x.node.clone(), w.node.clone(), a.node.clone(), b.node.clone()];
    let y = match LoraBackward.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (y, t) = inner(&x.primitive, &w.primitive, &a.primitive, &b.primitive);
            let state = LoraState {
                x: x.primitive,
                w: w.primitive,
                a: a.primitive,
                b: b.primitive,
                t: primitive(t),
                mask: mask.clone().map(primitive),
                scale,
            };
            prep.finish(state, primitive(y))
        }
        OpsKind::UnTracked(prep) => prep.finish(primitive(inner(&x.primitive, &w.primitive, &a.primitive, &b.primitive).0)),
    };
    float(y)
}
