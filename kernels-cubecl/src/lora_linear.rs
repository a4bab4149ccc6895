//! A linear layer with a LoRA adapter as one operation: `y = x w + s (dropout(x) A) B`, as peft
//! computes it, in four GEMMs forward and at most six backward, with no tensor of the layer's
//! output width in f32.
//!
//! Precision (A and B are f32, `x` and `w` in the storage dtype): the adapter's input is `x` in
//! f32 (times the dropout mask), `t = s (h A)` is an f32 GEMM, and the rank-r product `t B` is
//! added into the base GEMM's output by a GEMM with f32 accumulation over the base output
//! (`t` and `B` in the storage dtype, one rounding of the sum). peft rounds `x w` and `s h A B`
//! to the storage dtype separately and rounds their sum again; on f32 storage (CPU) both are the
//! same f32 maths. Backward, with `dy` in the storage dtype and `g = s (dy B^T)` in f32:
//! `dB = t^T dy`, `dA = h^T g` (f32, from `x` in f32), `dx = dy w^T + (g A^T) * mask` (the
//! adapter's term accumulated into the base GEMM's output when there is no dropout mask).

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
    /// Dropout on the adapter's input as a mask of `[m, in]` f32 values, 0 (dropped) or
    /// `1 / keep`; `None` without dropout (evaluation, or a dropout of 0).
    pub dropout_mask: Option<Tensor<B, 2>>,
}

/// `(x w + t B, t)` with `t = s (h A)` in f32 and `h` the adapter's input: the forward of
/// [`LinearBackend::lora_linear`], on any backend.
pub fn lora_forward<B: LinearBackend>(x: Tensor<B, 2>, w: Tensor<B, 2>, lora: &LoraFactors<B>) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let dtype = x.dtype();
    let y = B::gemm(x.clone(), false, w, false, dtype, None);
    let h = adapter_input(x, lora.dropout_mask.clone());
    let t = B::gemm(h, false, to_dtype(lora.a.clone(), DType::F32), false, DType::F32, None) * lora.scale;
    let y = B::gemm(to_dtype(t.clone(), dtype), false, to_dtype(lora.b.clone(), dtype), false, dtype, Some(y));
    (y, t)
}

/// `x` in f32, times the dropout mask when there is one.
fn adapter_input<B: Backend>(x: Tensor<B, 2>, mask: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
    let h = to_dtype(x, DType::F32);
    match mask {
        Some(m) => h * m,
        None => h,
    }
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
            .then(|| B::gemm(dy.clone(), false, to_dtype(b, dtype), true, DType::F32, None) * s.scale);
        if let Some(node) = node_b {
            let db = B::gemm(to_dtype(t, dtype), true, dy.clone(), false, b_dtype, None);
            grads.register::<B>(node.id, primitive(db));
        }
        if let (Some(node), Some(g)) = (node_a, &g) {
            let h = adapter_input(x.clone(), mask.clone());
            let da = B::gemm(h, true, g.clone(), false, a_dtype, None);
            grads.register::<B>(node.id, primitive(da));
        }
        if let Some(node) = node_w {
            let w_dtype = w.dtype();
            let dw = B::gemm(x.clone(), true, dy.clone(), false, w_dtype, None);
            grads.register::<B>(node.id, primitive(dw));
        }
        if let (Some(node), Some(g)) = (node_x, g) {
            let x_dtype = x.dtype();
            let dx = B::gemm(dy, false, w, true, x_dtype, None);
            let dx = match mask {
                None => B::gemm(to_dtype(g, x_dtype), false, to_dtype(a, x_dtype), true, x_dtype, Some(dx)),
                Some(m) => dx + to_dtype(B::gemm(g, false, to_dtype(a, DType::F32), true, DType::F32, None) * m, x_dtype),
            };
            grads.register::<B>(node.id, primitive(dx));
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
    let (x, w, a, b) = (primitive(x), primitive(w), primitive(lora.a), primitive(lora.b));
    let mask = lora.dropout_mask.map(|m| m.inner());
    let inner = |x: &FloatTensor<B>, w: &FloatTensor<B>, a: &FloatTensor<B>, b: &FloatTensor<B>| {
        let factors = LoraFactors { a: float(a.clone()), b: float(b.clone()), scale: lora.scale, dropout_mask: mask.clone() };
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
                scale: lora.scale,
            };
            prep.finish(state, primitive(y))
        }
        OpsKind::UnTracked(prep) => prep.finish(primitive(inner(&x.primitive, &w.primitive, &a.primitive, &b.primitive).0)),
    };
    float(y)
}
