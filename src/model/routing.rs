//! Moving rows between tokens and the layout their experts run on (a mixture of experts'
//! dispatch and combine), both ways as gathers. Burn's `select` is a gather, but its backward
//! is `select_assign`, which on CubeCL loops over every selected row in one thread per column:
//! ~2 s a step for 8 layers of Qwen3-30B-A3B. Routing knows the inverse map of every gather it
//! makes, so the backward is a gather too.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};
use kernels_cubecl::ExpertRoutingBackend;

/// A gather of rows and the gather that is its adjoint: the output's row `i` is the source's
/// row `forward[i]`; the gradient of the source's row `j` is the sum over `q < group` of the
/// output gradient's rows `backward[j * group + q]`, each weighted by `keep` (1 or 0, in the
/// rows' dtype) where given. Correct where every output row that reads source row `j` with a
/// gradient that is not zero is among those.
#[derive(Debug, Clone)]
pub struct RowRoute<B: Backend> {
    /// `[m]`.
    pub forward: Tensor<B, 1, Int>,
    /// `[n * group]`.
    pub backward: Tensor<B, 1, Int>,
    pub group: usize,
    /// `[n * group]`.
    pub keep: Option<Tensor<B, 1>>,
}

impl<B: Backend> RowRoute<B> {
    /// From host indices (`keep`: `true` for the backward rows that count; `None`: all do), in
    /// `dtype` on `device`.
    pub fn new(forward: Vec<i64>, backward: Vec<i64>, group: usize, keep: Option<Vec<bool>>, dtype: burn::tensor::DType, device: &B::Device) -> Self {
        let ints = |v: Vec<i64>| {
            let n = v.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(v, [n]), device)
        };
        let keep = keep.map(|k| {
            let n = k.len();
            let values: Vec<f32> = k.into_iter().map(|b| if b { 1.0 } else { 0.0 }).collect();
            Tensor::<B, 1>::from_data(TensorData::new(values, [n]), device).cast(dtype)
        });
        RowRoute { forward: ints(forward), backward: ints(backward), group, keep }
    }
}

/// Backends that route rows ([`RowRoute`]): a row gather forward, and on `Autodiff<B>` the
/// backward gather; and that pick each row's top `k` (the router's choice).
pub trait RowRoutingBackend: ExpertRoutingBackend {
    /// The columns of each row's `k` largest values, in any order.
    ///
    /// # Shapes
    /// - `x`: `[rows, n]` → `[rows, k]`
    fn top_k_indices(x: Tensor<Self, 2>, k: usize) -> Tensor<Self, 2, Int> {
        x.topk_with_indices(k, 1).1
    }

    /// # Shapes
    /// - `src`: `[n, h]` → `[m, h]`
    fn route_rows(src: Tensor<Self, 2>, route: &RowRoute<Self>) -> Tensor<Self, 2> {
        Self::gather_rows(src, route.forward.clone())
    }
}

/// The gradient of a routed source (`n` rows) from its output's gradient `grad`.
fn route_back<B: ExpertRoutingBackend>(grad: Tensor<B, 2>, backward: Tensor<B, 1, Int>, group: usize, keep: Option<Tensor<B, 1>>, n: usize) -> Tensor<B, 2> {
    let [_, h] = grad.dims();
    let mut g = B::gather_rows(grad, backward);
    if let Some(keep) = keep {
        g = g * keep.unsqueeze_dim(1);
    }
    match group {
        1 => g,
        k => g.reshape([n, k, h]).sum_dim(1).reshape([n, h]),
    }
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> RowRoutingBackend for NdArray<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
}

#[cfg(feature = "cuda")]
impl<F: burn_cubecl::FloatElement, I: burn_cubecl::IntElement, BT: burn_cubecl::BoolElement> RowRoutingBackend
    for burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, F, I, BT>
{
    /// A reduction on the device: Burn's `topk_with_indices` sorts every row on the host.
    fn top_k_indices(x: Tensor<Self, 2>, k: usize) -> Tensor<Self, 2, Int> {
        match k < x.dims()[1] {
            true => x.argtopk(k, 1),
            false => x.topk_with_indices(k, 1).1,
        }
    }
}

/// What the backward keeps: the inverse gather (inner backend) and the source's row count.
#[derive(Debug, Clone)]
struct RouteState<B: Backend> {
    backward: Tensor<B, 1, Int>,
    group: usize,
    keep: Option<Tensor<B, 1>>,
    rows: usize,
}

#[derive(Debug)]
struct RouteBackward;

impl<B: ExpertRoutingBackend> Backward<B, 1> for RouteBackward {
    type State = RouteState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let Some(node) = node else { return };
        let RouteState { backward, group, keep, rows } = ops.state;
        grads.register::<B>(node.id, route_back(grad, backward, group, keep, rows).into_primitive().tensor());
    }
}

impl<B: RowRoutingBackend, C: CheckpointStrategy> RowRoutingBackend for Autodiff<B, C> {
    /// The choice has no gradient: made on the inner tensors.
    fn top_k_indices(x: Tensor<Self, 2>, k: usize) -> Tensor<Self, 2, Int> {
        Tensor::from_primitive(B::top_k_indices(x.inner(), k).into_primitive())
    }

    fn route_rows(src: Tensor<Self, 2>, route: &RowRoute<Self>) -> Tensor<Self, 2> {
        let rows = src.dims()[0];
        let src = src.into_primitive().tensor();
        let inner = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(src.primitive.clone()));
        let int = |t: &Tensor<Self, 1, Int>| Tensor::<B, 1, Int>::from_primitive(t.clone().into_primitive());
        let inner_route = RowRoute { forward: int(&route.forward), backward: int(&route.backward), group: route.group, keep: route.keep.clone().map(|k| k.inner()) };
        let y = B::route_rows(inner, &inner_route).into_primitive().tensor();
        let state = RouteState { backward: inner_route.backward, group: route.group, keep: inner_route.keep, rows };
        let out = match RouteBackward.prepare::<C>([src.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(state, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type Ad = Autodiff<crate::backend::Cpu>;

    /// The routed gather's gradient equals Burn's own (`select`, whose backward scatters), for
    /// a dispatch (tokens read by `k` rows each, padding rows reading token 0 with no
    /// gradient) and a combine (rows read once, padding rows unread).
    #[test]
    fn routed_gradients_equal_the_scatter() {
        let device = Default::default();
        // 3 tokens, top 2: slots 0..6; rows: 4 real places and 2 padding.
        let slot_row = vec![0i64, 4, 1, 2, 5, 3]; // slot -> row (rows 6, 7 padding)
        let row_slot = vec![0i64, 2, 3, 5, 1, 4, 0, 0];
        let real = vec![true, true, true, true, true, true, false, false];
        let row_token: Vec<i64> = row_slot.iter().zip(&real).map(|(&s, &r)| if r { s / 2 } else { 0 }).collect();
        let x = Tensor::<Ad, 2>::random([3, 5], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let upstream = Tensor::<Ad, 2>::random([8, 5], Distribution::Normal(0.0, 1.0), &device);
        let pad_free = upstream.clone() * Tensor::<Ad, 1>::from_floats([1., 1., 1., 1., 1., 1., 0., 0.], &device).unsqueeze_dim(1);
        let dispatch = RowRoute::<Ad>::new(row_token.clone(), slot_row.clone(), 2, None, burn::tensor::DType::F32, &device);
        let routed = (Ad::route_rows(x.clone(), &dispatch) * pad_free.clone()).sum().backward();
        let tokens = Tensor::<Ad, 1, Int>::from_data(TensorData::new(row_token, [8]), &device);
        let plain = (x.clone().select(0, tokens) * pad_free).sum().backward();
        let grad = |g: &<Ad as burn::tensor::backend::AutodiffBackend>::Gradients| x.grad(g).unwrap().into_data().to_vec::<f32>().unwrap();
        assert_eq!(grad(&routed), grad(&plain));

        let ys = Tensor::<Ad, 2>::random([8, 5], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let up = Tensor::<Ad, 2>::random([6, 5], Distribution::Normal(0.0, 1.0), &device);
        let combine = RowRoute::<Ad>::new(slot_row.clone(), row_slot, 1, Some(real), burn::tensor::DType::F32, &device);
        let routed = (Ad::route_rows(ys.clone(), &combine) * up.clone()).sum().backward();
        let rows = Tensor::<Ad, 1, Int>::from_data(TensorData::new(slot_row, [6]), &device);
        let plain = (ys.clone().select(0, rows) * up).sum().backward();
        let grad = |g: &<Ad as burn::tensor::backend::AutodiffBackend>::Gradients| ys.grad(g).unwrap().into_data().to_vec::<f32>().unwrap();
        assert_eq!(grad(&routed), grad(&plain));
    }
}
