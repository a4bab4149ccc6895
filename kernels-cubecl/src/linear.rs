//! The model's GEMMs as backend operations: a linear layer's `x @ w`, the batched and grouped
//! GEMMs of a MoE block's experts ([`crate::grouped`]), and the LoRA linear layer
//! ([`crate::lora_linear`]).
//!
//! [`LinearBackend::gemm`] and [`LinearBackend::gemm_batched`] are the primitives; their
//! defaults are Burn's matmul (every backend, NdArray in CI). CubeCL backends take them from
//! their runtime (`cube/gemm.rs`): cuBLAS on CUDA, CubeCL's matmul elsewhere. `Autodiff<B>`
//! turns the inner backend's primitives into one autodiff op per layer GEMM, with the backward
//! written as two more GEMMs of the same primitives, so a backend that brings a GEMM brings it
//! forward and backward. Which GEMM runs is the backend's declaration, not a run-time test.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArrayTensor, QuantElement, SharedArray};
use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorMetadata};

use crate::layer_ops::{float, primitive, to_dtype};
use crate::lora_linear::{lora_forward, LoraFactors};

/// Backends that run the model's GEMMs. Every method has a plain-Burn default.
pub trait LinearBackend: Backend {
    /// `op(a) @ op(b)` of 2-D tensors (`op` transposes when its flag is set), accumulated in f32
    /// and returned in dtype `out`, plus `acc` when given (`[m, n]` in dtype `out`, one rounding
    /// of the sum; an implementation may write the sum into `acc`'s memory). The operands share
    /// one dtype and may be views.
    ///
    /// # Shapes
    /// - `op(a)`: `[m, k]`, `op(b)`: `[k, n]` → `[m, n]`
    fn gemm(a: Tensor<Self, 2>, ta: bool, b: Tensor<Self, 2>, tb: bool, out: DType, acc: Option<Tensor<Self, 2>>) -> Tensor<Self, 2> {
        Self::gemm_scaled(a, ta, b, tb, 1.0, out, acc)
    }

    /// [`gemm`](Self::gemm) of `alpha op(a) @ op(b)` (+ `acc`): the scale applied to the f32
    /// accumulation before the one rounding to `out`, as cuBLAS's alpha (no pass of its own).
    fn gemm_scaled(a: Tensor<Self, 2>, ta: bool, b: Tensor<Self, 2>, tb: bool, alpha: f64, out: DType, acc: Option<Tensor<Self, 2>>) -> Tensor<Self, 2> {
        reference_gemm_scaled(a, ta, b, tb, alpha, out, acc)
    }

    /// `a @ b` for each matrix of a batch, in the operands' dtype; either operand may be a view
    /// (the transposed view of its last two dims included).
    ///
    /// # Shapes
    /// - `a`: `[..., m, k]`, `b`: `[..., k, n]` (same leading dims) → `[..., m, n]`
    fn gemm_batched<const D: usize>(a: Tensor<Self, D>, b: Tensor<Self, D>) -> Tensor<Self, D> {
        a.matmul(b)
    }

    /// A linear layer's `x @ w` in `x`'s dtype; on autodiff backends its gradient flows to both.
    ///
    /// # Shapes
    /// - `x`: `[..., in]`, `w`: `[in, out]` → `[..., out]`
    fn linear_matmul<const D: usize>(x: Tensor<Self, D>, w: Tensor<Self, 2>) -> Tensor<Self, D> {
        let dtype = x.dtype();
        let n = w.dims()[1];
        over_rows(x, n, |x| Self::gemm(x, false, w, false, dtype, None))
    }

    /// `x[e] @ w[e]` for each matrix of a batch (the experts of a MoE block); on autodiff
    /// backends its gradient flows to both.
    ///
    /// # Shapes
    /// - `x`: `[batch, m, k]`, `w`: `[batch, k, n]` → `[batch, m, n]`
    fn batched_matmul(x: Tensor<Self, 3>, w: Tensor<Self, 3>) -> Tensor<Self, 3> {
        Self::gemm_batched(x, w)
    }

    /// `x_g @ w[g]` for consecutive groups of `x`'s rows, `counts[g]` rows in group `g` (a
    /// mixture of experts' slots laid out expert after expert), in the operands' dtype: no group
    /// is padded to another's size ([`crate::grouped`]). `w` may be a view (the transposed view
    /// of its last two dims included).
    ///
    /// # Shapes
    /// - `x`: `[sum(counts), k]`, `w`: `[counts.len(), k, n]` → `[sum(counts), n]`
    fn gemm_grouped(x: Tensor<Self, 2>, w: Tensor<Self, 3>, counts: &[usize]) -> Tensor<Self, 2> {
        crate::grouped::reference_gemm_grouped(x, w, counts)
    }

    /// `x_g^T @ y_g` for each group of rows (as in [`gemm_grouped`](Self::gemm_grouped)), zero
    /// for a group without rows, in the operands' dtype: a grouped GEMM's weight gradient.
    ///
    /// # Shapes
    /// - `x`: `[sum(counts), k]`, `y`: `[sum(counts), n]` → `[counts.len(), k, n]`
    fn gemm_grouped_outer(x: Tensor<Self, 2>, y: Tensor<Self, 2>, counts: &[usize]) -> Tensor<Self, 3> {
        crate::grouped::reference_gemm_grouped_outer(x, y, counts)
    }

    /// [`gemm_grouped`](Self::gemm_grouped); on autodiff backends its gradient flows to both.
    fn grouped_matmul(x: Tensor<Self, 2>, w: Tensor<Self, 3>, counts: &[usize]) -> Tensor<Self, 2> {
        Self::gemm_grouped(x, w, counts)
    }

    /// A linear layer with a LoRA adapter, `x w + s (dropout(x) A) B`, as one operation: see
    /// [`crate::lora_linear`] for the maths, the precision and the backward.
    ///
    /// # Shapes
    /// - `x`: `[m, in]`, `w`: `[in, out]`, `a`: `[in, r]`, `b`: `[r, out]` → `[m, out]`
    fn lora_linear(x: Tensor<Self, 2>, w: Tensor<Self, 2>, lora: LoraFactors<Self>) -> Tensor<Self, 2> {
        lora_forward(x, w, &lora).0
    }
}

/// The definition of [`LinearBackend::gemm`] in Burn's ops: the operands cast to f32 (exact for
/// bf16 / f16), multiplied, added to `acc` in f32, cast to `out`.
pub fn reference_gemm<B: Backend>(a: Tensor<B, 2>, ta: bool, b: Tensor<B, 2>, tb: bool, out: DType, acc: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
    reference_gemm_scaled(a, ta, b, tb, 1.0, out, acc)
}

/// The definition of [`LinearBackend::gemm_scaled`]: [`reference_gemm`] with the product
/// times `alpha` in f32 before `acc` is added.
pub fn reference_gemm_scaled<B: Backend>(a: Tensor<B, 2>, ta: bool, b: Tensor<B, 2>, tb: bool, alpha: f64, out: DType, acc: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
    let op = |t: Tensor<B, 2>, transpose: bool| to_dtype(if transpose { t.transpose() } else { t }, DType::F32);
    let y = op(a, ta).matmul(op(b, tb));
    let y = if alpha == 1.0 { y } else { y * alpha };
    let y = match acc {
        Some(acc) => to_dtype(acc, DType::F32) + y,
        None => y,
    };
    to_dtype(y, out)
}

/// `f` over `x` flattened to rows `[m, in]`, its `[m, n]` result given `x`'s leading dims back.
pub fn over_rows<B: Backend, const D: usize>(x: Tensor<B, D>, n: usize, f: impl FnOnce(Tensor<B, 2>) -> Tensor<B, 2>) -> Tensor<B, D> {
    let dims = x.dims();
    let k = dims[D - 1];
    let m = dims[..D - 1].iter().product::<usize>();
    let y = f(x.reshape([m, k]));
    let mut out = dims;
    out[D - 1] = n;
    y.reshape(out)
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> LinearBackend for NdArray<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
}

/// The layer GEMMs as autodiff ops over the inner backend's primitives; `gemm` and
/// `gemm_batched` themselves keep their defaults (Burn's differentiable matmul), since the
/// kernels that call them run on the inner backend.
impl<B: LinearBackend, C: CheckpointStrategy> LinearBackend for Autodiff<B, C> {
    fn linear_matmul<const D: usize>(x: Tensor<Self, D>, w: Tensor<Self, 2>) -> Tensor<Self, D> {
        let n = w.dims()[1];
        over_rows(x, n, |x| tracked_gemm::<B, C, 2>(x, w, false))
    }

    fn batched_matmul(x: Tensor<Self, 3>, w: Tensor<Self, 3>) -> Tensor<Self, 3> {
        tracked_gemm::<B, C, 3>(x, w, true)
    }

    fn lora_linear(x: Tensor<Self, 2>, w: Tensor<Self, 2>, lora: LoraFactors<Self>) -> Tensor<Self, 2> {
        crate::lora_linear::tracked::<B, C>(x, w, lora)
    }

    fn grouped_matmul(x: Tensor<Self, 2>, w: Tensor<Self, 3>, counts: &[usize]) -> Tensor<Self, 2> {
        crate::grouped::tracked::<B, C>(x, w, counts)
    }
}

/// `x @ w` as one autodiff op: 2-D operands, or 3-D ones multiplied per batch entry.
fn tracked_gemm<B: LinearBackend, C: CheckpointStrategy, const D: usize>(x: Tensor<Autodiff<B, C>, D>, w: Tensor<Autodiff<B, C>, D>, batched: bool) -> Tensor<Autodiff<B, C>, D> {
    let forward = |x: FloatTensor<B>, w: FloatTensor<B>| -> FloatTensor<B> {
        if batched {
            primitive(B::gemm_batched(float::<B, 3>(x), float(w)))
        } else {
            let dtype = x.dtype();
            primitive(B::gemm(float(x), false, float(w), false, dtype, None))
        }
    };
    float(tracked_product::<B, C, _>(GemmBackward { batched }, primitive(x), primitive(w), forward))
}

/// What the backward of a product `y = f(x, w)` keeps: x if w is tracked, w if x is tracked.
pub(crate) type ProductState<B> = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

/// `forward(x, w)` as one autodiff op whose backward `op` takes `(x, w)` as its state, each kept
/// only for the other's gradient: dX needs W, dW needs X, and a parent that is not tracked asks
/// for neither.
pub(crate) fn tracked_product<B: Backend, C: CheckpointStrategy, Op>(
    op: Op,
    x: FloatTensor<Autodiff<B, C>>,
    w: FloatTensor<Autodiff<B, C>>,
    forward: impl FnOnce(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>>
where
    Op: Backward<B, 2, State = ProductState<B>>,
{
    match op.prepare::<C>([x.node.clone(), w.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let keep_w = x.is_tracked().then(|| w.primitive.clone());
            let keep_x = w.is_tracked().then(|| x.primitive.clone());
            let y = forward(x.primitive, w.primitive);
            prep.finish((keep_x, keep_w), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive, w.primitive)),
    }
}

/// The backward of a [`tracked_product`]: `dx(dY, W)` registered for x and `dw(X, dY)` for w,
/// each where that parent is tracked.
pub(crate) fn product_backward<B: Backend>(
    ops: Ops<ProductState<B>, 2>,
    grads: &mut Gradients,
    dx: impl FnOnce(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
    dw: impl FnOnce(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
) {
    let [node_x, node_w] = ops.parents;
    let dy = grads.consume::<B>(&ops.node);
    let (x, w) = ops.state;
    if let (Some(node), Some(w)) = (node_x, w) {
        grads.register::<B>(node.id, dx(dy.clone(), w));
    }
    if let (Some(node), Some(x)) = (node_w, x) {
        grads.register::<B>(node.id, dw(x, dy));
    }
}

#[derive(Debug)]
struct GemmBackward {
    batched: bool,
}

impl<B: LinearBackend> Backward<B, 2> for GemmBackward {
    type State = ProductState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let batched = self.batched;
        product_backward::<B>(
            ops,
            grads,
            // dX = dY W^T
            |dy, w| match batched {
                true => primitive(B::gemm_batched(float::<B, 3>(dy), float::<B, 3>(w).swap_dims(1, 2))),
                false => {
                    let dy = float::<B, 2>(dy);
                    let dtype = dy.dtype();
                    primitive(B::gemm(dy, false, float(w), true, dtype, None))
                }
            },
            // dW = X^T dY
            |x, dy| match batched {
                true => primitive(B::gemm_batched(float::<B, 3>(x).swap_dims(1, 2), float::<B, 3>(dy))),
                false => {
                    let x = float::<B, 2>(x);
                    let dtype = x.dtype();
                    primitive(B::gemm(x, true, float(dy), false, dtype, None))
                }
            },
        );
    }
}
