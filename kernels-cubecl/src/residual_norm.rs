//! The residual add before a decoder layer's second RMSNorm fused with the norm: `h = x + delta`
//! (the residual stream, kept in `x`'s dtype) and `rms_norm(h)` from one pass over the rows,
//! instead of an add that writes `h` and a norm that reads it back. The backward needs nothing of
//! its own: the add hands its gradient to both inputs, the norm is RMSNorm's.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::layer_ops::{float, primitive, rms_norm_parts, FusedLayerBackend, NormBackward, NormState};

/// [`FusedLayerBackend::add_rms_norm_forward`] in plain Burn: the add, then
/// [`rms_norm_parts`] of its result.
pub fn add_rms_norm_parts<B: Backend>(x: Tensor<B, 2>, delta: Tensor<B, 2>, weight: Tensor<B, 1>, eps: f64) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 1>) {
    let h = x + delta;
    let (normed, rstd) = rms_norm_parts(h.clone(), weight, eps);
    (h, normed, rstd)
}

/// `(x + delta, rms_norm(x + delta))` over the last dimension, [`crate::reference::rms_norm`]'s
/// maths, as one op forward where `B` has the kernel; gradients flow to `x`, `delta` and
/// `weight` from both outputs.
///
/// # Shapes
/// - `x`, `delta`: `[..., n]`, `weight`: `[n]` → `[..., n]` each
pub fn fused_add_rms_norm<B: FusedLayerBackend, const D: usize>(x: Tensor<B, D>, delta: Tensor<B, D>, weight: Tensor<B, 1>, eps: f64) -> (Tensor<B, D>, Tensor<B, D>) {
    let dims = x.dims();
    assert_eq!(dims, delta.dims(), "add_rms_norm: the residual and what is added to it differ in shape");
    let n = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let (h, normed) = B::add_rms_norm(x.reshape([rows, n]), delta.reshape([rows, n]), weight, eps);
    (h.reshape(dims), normed.reshape(dims))
}

/// The add's backward: its gradient to both inputs.
#[derive(Debug)]
struct ResidualAddBackward;

impl<B: Backend> Backward<B, 2> for ResidualAddBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_delta] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        match (node_x, node_delta) {
            (Some(x), Some(delta)) => {
                grads.register::<B>(x.id, grad.clone());
                grads.register::<B>(delta.id, grad);
            }
            (Some(node), None) | (None, Some(node)) => grads.register::<B>(node.id, grad),
            (None, None) => {}
        }
    }
}

/// [`FusedLayerBackend::add_rms_norm`] on `Autodiff<B>`: the inner backend's one pass, then two
/// autodiff ops over its outputs (the add, whose output `h` the norm's op takes as its input, so
/// the norm's gradient reaches `x` and `delta` through the add's).
pub(crate) fn tracked_add_rms_norm<B: FusedLayerBackend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 2>,
    delta: Tensor<Autodiff<B, C>, 2>,
    weight: Tensor<Autodiff<B, C>, 1>,
    eps: f64,
) -> (Tensor<Autodiff<B, C>, 2>, Tensor<Autodiff<B, C>, 2>) {
    let (x, delta, weight) = (primitive(x), primitive(delta), primitive(weight));
    let (h, normed, rstd) = B::add_rms_norm_forward(float(x.primitive), float(delta.primitive), float(weight.primitive.clone()), eps);
    let add = <ResidualAddBackward as Backward<B, 2>>::prepare::<C>(ResidualAddBackward, [x.node, delta.node]);
    let h = add.compute_bound().stateless(primitive(h));
    let normed = match NormBackward.prepare::<C>([h.node.clone(), weight.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let state = NormState { x: h.primitive.clone(), weight: weight.primitive, rstd: primitive(rstd) };
            prep.finish(state, primitive(normed))
        }
        OpsKind::UnTracked(prep) => prep.finish(primitive(normed)),
    };
    (float(h), float(normed))
}
