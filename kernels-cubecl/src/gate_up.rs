//! SwiGLU of a gate and up projection computed as one GEMM: `silu(g) * u` read from the packed
//! `[..., 2c]` output (`g` its first `c` columns, `u` the last `c`), and a backward that hands
//! back one packed gradient `[d g | d u]`. Taking the halves with `narrow` instead would cost,
//! under autodiff, a zero-filled tensor of the packed width per half and their sum; the packed
//! gradient feeds the projection's single `dx` GEMM as it is.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::Tensor;

use crate::layer_ops::{float, primitive, swiglu_grad, swiglu_value, FusedLayerBackend};

/// The gate and up halves of a packed `[a, b, 2c]` tensor, as views.
pub fn halves<B: Backend>(packed: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let c = packed.dims()[2] / 2;
    (packed.clone().narrow(2, 0, c), packed.narrow(2, c, c))
}

/// [`FusedLayerBackend::swiglu_packed_forward`] in plain Burn.
pub fn swiglu_packed_value<B: Backend>(packed: Tensor<B, 3>) -> Tensor<B, 3> {
    let (gate, up) = halves(packed);
    swiglu_value(gate, up)
}

/// [`FusedLayerBackend::swiglu_packed_backward`] in plain Burn: [`swiglu_grad`] of the halves,
/// side by side.
pub fn swiglu_packed_grad<B: Backend>(packed: Tensor<B, 3>, grad: Tensor<B, 3>) -> Tensor<B, 3> {
    let (gate, up) = halves(packed);
    let (d_gate, d_up) = swiglu_grad(gate, up, grad, [true, true]);
    Tensor::cat([d_gate, d_up].into_iter().flatten().collect(), 2)
}

/// `silu(g) * u` of a gate/up projection's packed output, [`crate::reference::swiglu`]'s maths
/// in f32, as one op forward and one backward where `B` has the kernels.
///
/// # Shapes
/// - `packed`: `[..., 2c]` → `[..., c]`
pub fn fused_swiglu_packed<B: FusedLayerBackend, const D: usize>(packed: Tensor<B, D>) -> Tensor<B, D> {
    let dims = packed.dims();
    let last = dims[D - 1];
    assert!(last % 2 == 0, "swiglu_packed: the packed gate/up width {last} is odd");
    let rows = dims[..D - 1].iter().product::<usize>();
    let mut out = dims;
    out[D - 1] = last / 2;
    B::swiglu_packed(packed.reshape([1, rows, last])).reshape(out)
}

#[derive(Debug, Clone)]
struct PackedState<B: Backend> {
    packed: FloatTensor<B>,
}

#[derive(Debug)]
struct SwigluPackedBackward;

impl<B: FusedLayerBackend> Backward<B, 1> for SwigluPackedBackward {
    type State = PackedState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = float::<B, 3>(grads.consume::<B>(&ops.node));
        if let Some(node) = node {
            grads.register::<B>(node.id, primitive(B::swiglu_packed_backward(float(ops.state.packed), grad)));
        }
    }
}

/// [`FusedLayerBackend::swiglu_packed`] on `Autodiff<B>`: the inner backend's forward and
/// backward as one op, keeping only the packed input for backward.
pub(crate) fn tracked_swiglu_packed<B: FusedLayerBackend, C: CheckpointStrategy>(packed: Tensor<Autodiff<B, C>, 3>) -> Tensor<Autodiff<B, C>, 3> {
    let x = primitive(packed);
    match SwigluPackedBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let y = B::swiglu_packed_forward(float(x.primitive.clone()));
            float(prep.finish(PackedState { packed: x.primitive }, primitive(y)))
        }
        OpsKind::UnTracked(prep) => float(prep.finish(primitive(B::swiglu_packed(float(x.primitive))))),
    }
}
