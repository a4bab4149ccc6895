//! The decoder's element-wise chains as single operations with their own backward: RMSNorm,
//! SwiGLU and rotary embedding.
//!
//! [`FusedLayerBackend`] holds each operation's forward and backward as provided methods in
//! plain Burn (NdArray uses them all; the backward is written out, not left to autodiff, and
//! tested against autodiff of [`crate::reference`]); CubeCL backends replace SwiGLU's and the
//! rotary embedding's by one kernel each way (RMSNorm's row kernel is not right on CUDA yet, see
//! `cube/layer_ops.rs`); `Autodiff<B>` turns the inner backend's forward and backward into one autodiff op,
//! so a step keeps only the op's inputs (and RMSNorm's per-row `1/rms`) for backward instead of
//! every intermediate of the chain.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArrayTensor, QuantElement, SharedArray};
use burn::backend::NdArray;
use burn::tensor::activation::sigmoid;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, FloatDType, Tensor, TensorPrimitive};

use crate::qkv::{qkv_rotary_grad, qkv_rotary_value, QkvLayout};

pub(crate) fn to_f32<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if x.dtype() == DType::F32 {
        x
    } else {
        x.cast(FloatDType::F32)
    }
}

/// `x` in `dtype` (a cast only where it differs).
pub fn to_dtype<B: Backend, const D: usize>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if x.dtype() == dtype {
        x
    } else {
        x.cast(dtype)
    }
}

/// Which gradients of RMSNorm's inputs a backward computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormWanted {
    pub x: bool,
    pub weight: bool,
}

/// Backends that run the decoder's fused element-wise operations. Every method defaults to the
/// plain-Burn definition of the same name in this module ([`rms_norm_parts`], ...).
pub trait FusedLayerBackend: Backend {
    /// RMSNorm of each row, `round(x / rms(x)) * weight` with the statistics in f32 (transformers'
    /// order of rounding), and each row's `1 / rms` in f32.
    ///
    /// # Shapes
    /// - `x`: `[rows, n]`, `weight`: `[n]` → `[rows, n]` in `x`'s dtype, `[rows]` f32
    fn rms_norm_forward(x: Tensor<Self, 2>, weight: Tensor<Self, 1>, eps: f64) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
        rms_norm_parts(x, weight, eps)
    }

    /// RMSNorm's backward from the forward's `1 / rms` (`rstd`): `dx` in `x`'s dtype and
    /// `dweight` in `weight`'s, when wanted.
    fn rms_norm_backward(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 1>,
        rstd: Tensor<Self, 1>,
        grad: Tensor<Self, 2>,
        wanted: NormWanted,
    ) -> (Option<Tensor<Self, 2>>, Option<Tensor<Self, 1>>) {
        rms_norm_grad(x, weight, rstd, grad, wanted)
    }

    /// [`FusedLayerBackend::rms_norm_forward`]'s output; on autodiff backends its gradient
    /// flows to `x` and `weight`.
    fn rms_norm(x: Tensor<Self, 2>, weight: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        Self::rms_norm_forward(x, weight, eps).0
    }

    /// The residual add and RMSNorm of its result ([`crate::residual_norm`]): `h = x + delta` in
    /// `x`'s dtype, then [`FusedLayerBackend::rms_norm_forward`] of `h`: `(h, normed, rstd)`.
    ///
    /// # Shapes
    /// - `x`, `delta`: `[rows, n]`, `weight`: `[n]` → `[rows, n]`, `[rows, n]`, `[rows]` f32
    fn add_rms_norm_forward(x: Tensor<Self, 2>, delta: Tensor<Self, 2>, weight: Tensor<Self, 1>, eps: f64) -> (Tensor<Self, 2>, Tensor<Self, 2>, Tensor<Self, 1>) {
        crate::residual_norm::add_rms_norm_parts(x, delta, weight, eps)
    }

    /// [`FusedLayerBackend::add_rms_norm_forward`]'s `(h, normed)`; on autodiff backends the
    /// gradients of both flow to `x`, `delta` and `weight` (RMSNorm's backward, no op of its
    /// own for the add).
    fn add_rms_norm(x: Tensor<Self, 2>, delta: Tensor<Self, 2>, weight: Tensor<Self, 1>, eps: f64) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        let (h, normed, _) = Self::add_rms_norm_forward(x, delta, weight, eps);
        (h, normed)
    }

    /// `silu(gate) * up` in f32, returned in `gate`'s dtype, contiguous. `gate` and `up` may be
    /// views (e.g. the halves of one fused projection).
    ///
    /// # Shapes
    /// - `gate`, `up`: `[a, b, c]` → `[a, b, c]`
    fn swiglu_forward(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        swiglu_value(gate, up)
    }

    /// SwiGLU's backward: `(d gate, d up)` in the inputs' dtypes, when wanted.
    fn swiglu_backward(
        gate: Tensor<Self, 3>,
        up: Tensor<Self, 3>,
        grad: Tensor<Self, 3>,
        wanted: [bool; 2],
    ) -> (Option<Tensor<Self, 3>>, Option<Tensor<Self, 3>>) {
        swiglu_grad(gate, up, grad, wanted)
    }

    /// [`FusedLayerBackend::swiglu_forward`]; on autodiff backends its gradient flows to `gate`
    /// and `up`.
    fn swiglu(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        Self::swiglu_forward(gate, up)
    }

    /// SwiGLU of a gate/up projection's packed output ([`crate::gate_up`]): `silu(g) * u` with
    /// `g` the first half of the last dimension and `u` the second, as
    /// [`FusedLayerBackend::swiglu_forward`] computes it, contiguous.
    ///
    /// # Shapes
    /// - `packed`: `[a, b, 2c]` → `[a, b, c]`
    fn swiglu_packed_forward(packed: Tensor<Self, 3>) -> Tensor<Self, 3> {
        let (gate, up) = crate::gate_up::halves(packed);
        Self::swiglu_forward(gate, up)
    }

    /// Its backward: `[d g | d u]` `[a, b, 2c]` in `packed`'s dtype.
    fn swiglu_packed_backward(packed: Tensor<Self, 3>, grad: Tensor<Self, 3>) -> Tensor<Self, 3> {
        crate::gate_up::swiglu_packed_grad(packed, grad)
    }

    /// [`FusedLayerBackend::swiglu_packed_forward`]; on autodiff backends one op whose
    /// gradient flows to `packed` as one tensor.
    fn swiglu_packed(packed: Tensor<Self, 3>) -> Tensor<Self, 3> {
        Self::swiglu_packed_forward(packed)
    }

    /// Rotary embedding in the "rotate half" layout, [`crate::reference::rotary`]'s maths in f32,
    /// returned in `x`'s dtype, contiguous (`x` may be a view, e.g. heads swapped with positions).
    ///
    /// # Shapes
    /// - `x`: `[batch, heads, seq, head_dim]`, `cos`/`sin`: `[batch or 1, 1, seq, head_dim]` f32
    fn rotary_forward(x: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        rotary_value(x, cos, sin)
    }

    /// The rotary embedding's backward, `dx` in `grad`'s dtype.
    fn rotary_backward(grad: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        rotary_grad(grad, cos, sin)
    }

    /// [`FusedLayerBackend::rotary_forward`]; on autodiff backends its gradient flows to `x`
    /// (the tables are constants).
    fn rotary(x: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        Self::rotary_forward(x, cos, sin)
    }

    /// The rotary embedding of q and k from one projection's output, packed with v head-major
    /// ([`crate::qkv`]), in the projection's dtype.
    ///
    /// # Shapes
    /// - `projected`: `[batch, seq, heads * head_dim]` (token-major, as the GEMM writes it) →
    ///   `[layout.len()]`
    fn qkv_rotary_forward(projected: Tensor<Self, 3>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>, layout: QkvLayout) -> Tensor<Self, 1> {
        qkv_rotary_value(projected, cos, sin, layout)
    }

    /// [`FusedLayerBackend::qkv_rotary_forward`]'s backward: the packed gradient back in the
    /// projection's token-major layout, `[batch, seq, heads * head_dim]`.
    fn qkv_rotary_backward(grad: Tensor<Self, 1>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>, layout: QkvLayout) -> Tensor<Self, 3> {
        qkv_rotary_grad(grad, cos, sin, layout)
    }

    /// [`FusedLayerBackend::qkv_rotary_forward`]; on autodiff backends its gradient flows to
    /// `projected`.
    fn qkv_rotary(projected: Tensor<Self, 3>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>, layout: QkvLayout) -> Tensor<Self, 1> {
        Self::qkv_rotary_forward(projected, cos, sin, layout)
    }
}

/// [`FusedLayerBackend::rms_norm_forward`] in plain Burn.
pub fn rms_norm_parts<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 1>, eps: f64) -> (Tensor<B, 2>, Tensor<B, 1>) {
    let [rows, n] = x.dims();
    let dtype = x.dtype();
    let x = to_f32(x);
    let rstd = (x.clone().powi_scalar(2).mean_dim(1) + eps).sqrt().recip();
    let normed = to_dtype(x * rstd.clone(), dtype);
    (normed * to_dtype(weight, dtype).reshape([1, n]), rstd.reshape([rows]))
}

/// [`FusedLayerBackend::rms_norm_backward`] in plain Burn: with `xr = x / rms` and
/// `g = dy * weight`, `dx = (g - xr mean(g xr)) / rms` and `dweight = sum over rows of dy xr`.
pub fn rms_norm_grad<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 1>,
    rstd: Tensor<B, 1>,
    grad: Tensor<B, 2>,
    wanted: NormWanted,
) -> (Option<Tensor<B, 2>>, Option<Tensor<B, 1>>) {
    let [rows, n] = x.dims();
    let (x_dtype, w_dtype) = (x.dtype(), weight.dtype());
    let rstd = to_f32(rstd).reshape([rows, 1]);
    let normed = to_f32(x) * rstd.clone();
    let grad = to_f32(grad);
    let grad_w = wanted.weight.then(|| to_dtype((grad.clone() * normed.clone()).sum_dim(0).reshape([n]), w_dtype));
    let grad_x = wanted.x.then(|| {
        let g = grad * to_f32(weight).reshape([1, n]);
        let dot = (g.clone() * normed.clone()).mean_dim(1);
        to_dtype((g - normed * dot) * rstd, x_dtype)
    });
    (grad_x, grad_w)
}

/// [`FusedLayerBackend::swiglu_forward`] in plain Burn.
pub fn swiglu_value<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
    let dtype = gate.dtype();
    let g = to_f32(gate);
    to_dtype(g.clone() * sigmoid(g) * to_f32(up), dtype)
}

/// [`FusedLayerBackend::swiglu_backward`] in plain Burn: with `s = sigmoid(g)`,
/// `d up = dy g s` and `d gate = dy up s (1 + g (1 - s))`.
pub fn swiglu_grad<B: Backend>(
    gate: Tensor<B, 3>,
    up: Tensor<B, 3>,
    grad: Tensor<B, 3>,
    wanted: [bool; 2],
) -> (Option<Tensor<B, 3>>, Option<Tensor<B, 3>>) {
    let (g_dtype, u_dtype) = (gate.dtype(), up.dtype());
    let g = to_f32(gate);
    let grad = to_f32(grad);
    let s = sigmoid(g.clone());
    let grad_up = wanted[1].then(|| to_dtype(grad.clone() * g.clone() * s.clone(), u_dtype));
    let grad_gate = wanted[0].then(|| {
        let d_silu = s.clone() * (g * (s.neg() + 1.0) + 1.0);
        to_dtype(grad * to_f32(up) * d_silu, g_dtype)
    });
    (grad_gate, grad_up)
}

/// [`FusedLayerBackend::rotary_forward`] in plain Burn.
pub fn rotary_value<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
    let dtype = x.dtype();
    let [b, h, s, d] = x.dims();
    let x = to_f32(x);
    let half = d / 2;
    let rotated = Tensor::cat(vec![x.clone().narrow(3, half, half).neg(), x.clone().narrow(3, 0, half)], 3);
    let (cos, sin) = (to_f32(cos).expand([b, h, s, d]), to_f32(sin).expand([b, h, s, d]));
    to_dtype(x * cos + rotated * sin, dtype)
}

/// [`FusedLayerBackend::rotary_backward`] in plain Burn: with `x = [x1, x2]`,
/// `dx1 = dy1 cos1 + dy2 sin2` and `dx2 = dy2 cos2 - dy1 sin1`.
pub fn rotary_grad<B: Backend>(grad: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
    let dtype = grad.dtype();
    let [b, h, s, d] = grad.dims();
    let half = d / 2;
    let dy = to_f32(grad);
    let (cos, sin) = (to_f32(cos).expand([b, h, s, d]), to_f32(sin).expand([b, h, s, d]));
    let halves = |t: Tensor<B, 4>| (t.clone().narrow(3, 0, half), t.narrow(3, half, half));
    let ((dy1, dy2), (c1, c2), (s1, s2)) = (halves(dy), halves(cos), halves(sin));
    let dx1 = dy1.clone() * c1 + dy2.clone() * s2;
    let dx2 = dy2 * c2 - dy1 * s1;
    to_dtype(Tensor::cat(vec![dx1, dx2], 3), dtype)
}

/// RMSNorm over the last dimension, [`crate::reference::rms_norm`]'s maths, as one op forward
/// and one backward where `B` has the kernels.
///
/// # Shapes
/// - `x`: `[..., n]`, `weight`: `[n]` → `[..., n]`
pub fn fused_rms_norm<B: FusedLayerBackend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, D> {
    let dims = x.dims();
    let n = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    B::rms_norm(x.reshape([rows, n]), weight, eps).reshape(dims)
}

/// `silu(gate) * up`, [`crate::reference::swiglu`]'s maths in f32, as one op forward and one
/// backward where `B` has the kernels.
pub fn fused_swiglu<B: FusedLayerBackend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    let dims = gate.dims();
    // [leading, second to last, last]: a 3-D tensor keeps its shape.
    let last = if D > 0 { dims[D - 1] } else { 1 };
    let mid = if D > 1 { dims[D - 2] } else { 1 };
    let lead = dims.iter().product::<usize>() / (last * mid).max(1);
    let three = |t: Tensor<B, D>| -> Tensor<B, 3> { t.reshape([lead, mid, last]) };
    B::swiglu(three(gate), three(up)).reshape(dims)
}

/// Rotary embedding, [`crate::reference::rotary`]'s maths in f32, as one op forward and one
/// backward where `B` has the kernels.
///
/// # Shapes
/// - `x`: `[batch, heads, seq, head_dim]` (any strides), `cos`/`sin`: `[batch, 1, seq, head_dim]`
pub fn fused_rotary<B: FusedLayerBackend>(x: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
    B::rotary(x, cos, sin)
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> FusedLayerBackend for NdArray<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
}

pub(crate) fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

pub(crate) fn primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// What RMSNorm's backward keeps: its input, weight and per-row `1 / rms`.
#[derive(Debug, Clone)]
pub(crate) struct NormState<B: Backend> {
    pub(crate) x: FloatTensor<B>,
    pub(crate) weight: FloatTensor<B>,
    pub(crate) rstd: FloatTensor<B>,
}

#[derive(Debug)]
pub(crate) struct NormBackward;

impl<B: FusedLayerBackend> Backward<B, 2> for NormBackward {
    type State = NormState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let grad = float::<B, 2>(grads.consume::<B>(&ops.node));
        let s = ops.state;
        let wanted = NormWanted { x: node_x.is_some(), weight: node_w.is_some() };
        let (gx, gw) = B::rms_norm_backward(float(s.x), float(s.weight), float(s.rstd), grad, wanted);
        if let (Some(node), Some(g)) = (node_x, gx) {
            grads.register::<B>(node.id, primitive(g));
        }
        if let (Some(node), Some(g)) = (node_w, gw) {
            grads.register::<B>(node.id, primitive(g));
        }
    }
}

#[derive(Debug, Clone)]
struct SwigluState<B: Backend> {
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
}

#[derive(Debug)]
struct SwigluBackward;

impl<B: FusedLayerBackend> Backward<B, 2> for SwigluBackward {
    type State = SwigluState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_g, node_u] = ops.parents;
        let grad = float::<B, 3>(grads.consume::<B>(&ops.node));
        let s = ops.state;
        let (gg, gu) = B::swiglu_backward(float(s.gate), float(s.up), grad, [node_g.is_some(), node_u.is_some()]);
        if let (Some(node), Some(g)) = (node_g, gg) {
            grads.register::<B>(node.id, primitive(g));
        }
        if let (Some(node), Some(g)) = (node_u, gu) {
            grads.register::<B>(node.id, primitive(g));
        }
    }
}

#[derive(Debug, Clone)]
struct RotaryState<B: Backend> {
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
}

#[derive(Debug)]
struct RotaryBackward;

impl<B: FusedLayerBackend> Backward<B, 1> for RotaryBackward {
    type State = RotaryState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = float::<B, 4>(grads.consume::<B>(&ops.node));
        if let Some(node) = node_x {
            let s = ops.state;
            grads.register::<B>(node.id, primitive(B::rotary_backward(grad, float(s.cos), float(s.sin))));
        }
    }
}

/// The inner backend's forward and backward as one autodiff op each; the `_forward` and
/// `_backward` methods are the inner backend's, on untracked values.
impl<B: FusedLayerBackend, C: CheckpointStrategy> FusedLayerBackend for Autodiff<B, C> {
    fn qkv_rotary(projected: Tensor<Self, 3>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>, layout: QkvLayout) -> Tensor<Self, 1> {
        crate::qkv::tracked_rotary::<B, C>(projected, cos, sin, layout)
    }

    fn rms_norm_forward(x: Tensor<Self, 2>, weight: Tensor<Self, 1>, eps: f64) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
        let (y, rstd) = B::rms_norm_forward(x.inner(), weight.inner(), eps);
        (Tensor::from_inner(y), Tensor::from_inner(rstd))
    }

    fn rms_norm_backward(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 1>,
        rstd: Tensor<Self, 1>,
        grad: Tensor<Self, 2>,
        wanted: NormWanted,
    ) -> (Option<Tensor<Self, 2>>, Option<Tensor<Self, 1>>) {
        let (gx, gw) = B::rms_norm_backward(x.inner(), weight.inner(), rstd.inner(), grad.inner(), wanted);
        (gx.map(Tensor::from_inner), gw.map(Tensor::from_inner))
    }

    fn rms_norm(x: Tensor<Self, 2>, weight: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        let (x, weight) = (primitive(x), primitive(weight));
        match NormBackward.prepare::<C>([x.node.clone(), weight.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (y, rstd) = B::rms_norm_forward(float(x.primitive.clone()), float(weight.primitive.clone()), eps);
                let state = NormState { x: x.primitive, weight: weight.primitive, rstd: primitive(rstd) };
                float(prep.finish(state, primitive(y)))
            }
            OpsKind::UnTracked(prep) => {
                float(prep.finish(primitive(B::rms_norm(float(x.primitive), float(weight.primitive), eps))))
            }
        }
    }

    fn add_rms_norm_forward(x: Tensor<Self, 2>, delta: Tensor<Self, 2>, weight: Tensor<Self, 1>, eps: f64) -> (Tensor<Self, 2>, Tensor<Self, 2>, Tensor<Self, 1>) {
        let (h, normed, rstd) = B::add_rms_norm_forward(x.inner(), delta.inner(), weight.inner(), eps);
        (Tensor::from_inner(h), Tensor::from_inner(normed), Tensor::from_inner(rstd))
    }

    fn add_rms_norm(x: Tensor<Self, 2>, delta: Tensor<Self, 2>, weight: Tensor<Self, 1>, eps: f64) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        crate::residual_norm::tracked_add_rms_norm::<B, C>(x, delta, weight, eps)
    }

    fn swiglu_forward(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        Tensor::from_inner(B::swiglu_forward(gate.inner(), up.inner()))
    }

    fn swiglu_backward(
        gate: Tensor<Self, 3>,
        up: Tensor<Self, 3>,
        grad: Tensor<Self, 3>,
        wanted: [bool; 2],
    ) -> (Option<Tensor<Self, 3>>, Option<Tensor<Self, 3>>) {
        let (gg, gu) = B::swiglu_backward(gate.inner(), up.inner(), grad.inner(), wanted);
        (gg.map(Tensor::from_inner), gu.map(Tensor::from_inner))
    }

    fn swiglu(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        let (gate, up) = (primitive(gate), primitive(up));
        match SwigluBackward.prepare::<C>([gate.node.clone(), up.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = B::swiglu_forward(float(gate.primitive.clone()), float(up.primitive.clone()));
                float(prep.finish(SwigluState { gate: gate.primitive, up: up.primitive }, primitive(y)))
            }
            OpsKind::UnTracked(prep) => float(prep.finish(primitive(B::swiglu(float(gate.primitive), float(up.primitive))))),
        }
    }

    fn swiglu_packed_forward(packed: Tensor<Self, 3>) -> Tensor<Self, 3> {
        Tensor::from_inner(B::swiglu_packed_forward(packed.inner()))
    }

    fn swiglu_packed_backward(packed: Tensor<Self, 3>, grad: Tensor<Self, 3>) -> Tensor<Self, 3> {
        Tensor::from_inner(B::swiglu_packed_backward(packed.inner(), grad.inner()))
    }

    fn swiglu_packed(packed: Tensor<Self, 3>) -> Tensor<Self, 3> {
        crate::gate_up::tracked_swiglu_packed::<B, C>(packed)
    }

    fn rotary_forward(x: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        Tensor::from_inner(B::rotary_forward(x.inner(), cos.inner(), sin.inner()))
    }

    fn rotary_backward(grad: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        Tensor::from_inner(B::rotary_backward(grad.inner(), cos.inner(), sin.inner()))
    }

    fn rotary(x: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        let (cos, sin) = (primitive(cos.inner()), primitive(sin.inner()));
        let x = primitive(x);
        match RotaryBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = B::rotary_forward(float(x.primitive), float(cos.clone()), float(sin.clone()));
                float(prep.finish(RotaryState { cos, sin }, primitive(y)))
            }
            OpsKind::UnTracked(prep) => float(prep.finish(primitive(B::rotary(float(x.primitive), float(cos), float(sin))))),
        }
    }
}
