//! A mixture-of-experts layer's frozen expert weights stacked `[experts, in, out]` from load
//! time, one tensor a projection, so that the experts' batched GEMMs read them in place: the
//! stack taken on every call (and kept for the backward) was ~1.2 GB a layer of Qwen3-30B-A3B.

use burn::module::{Module, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::hf_names;
use super::linear::{still_views, view_ids, Linear, Loader};
use super::layers::Mlp;
use crate::backend::profile::span;
use crate::backend::TrainBackend;
use crate::error::Result;
use crate::lora::{ExpertAdapter, ExpertAdapters};
use kernels_cubecl as ops;
use crate::parallel::Partition;

/// The experts' gate, up and down weights, each `[experts, in, out]` as
/// [`load`](Self::load) uploads them: every expert's `weight` is a view of its block. Plain
/// tensors, not parameters, so that the weights count once (and no mapper or optimizer sees
/// them); the views' parameter ids tell whether the experts still hold them.
#[derive(Module, Debug)]
pub struct StackedExperts<B: Backend> {
    /// `[experts, hidden, intermediate]`.
    pub gate: Tensor<B, 3>,
    /// `[experts, hidden, intermediate]`.
    pub up: Tensor<B, 3>,
    /// `[experts, intermediate, hidden]`.
    pub down: Tensor<B, 3>,
    /// Each expert's gate, up and down weight (and bias) parameter ids, expert by expert.
    #[module(skip)]
    pub views: Vec<(ParamId, Option<ParamId>)>,
}

impl<B: TrainBackend> StackedExperts<B> {
    /// `{path}.experts.{e}` for the global experts `experts`, uploaded as three stacks; the
    /// experts (bias-free SwiGLU MLPs, whole on this rank) hold views of them.
    pub fn load(ld: &mut Loader<'_, B>, path: &str, experts: std::ops::Range<usize>, hidden: usize, inter: usize) -> Result<(Vec<Mlp<B>>, Self)> {
        let n = experts.len();
        let mut stack = |projection: &str, inp: usize, out: usize| -> Result<Tensor<B, 3>> {
            let paths: Vec<String> = experts.clone().map(|e| hf_names::child(&hf_names::expert(path, e), projection)).collect();
            ld.stacked_transposed(&paths, inp, out)
        };
        let [gate_proj, up_proj, down_proj] = hf_names::MLP_PROJECTIONS;
        let (gate, up, down) = (stack(gate_proj, hidden, inter)?, stack(up_proj, hidden, inter)?, stack(down_proj, inter, hidden)?);
        let view = |stack: &Tensor<B, 3>, e: usize| {
            let [_, inp, out] = stack.dims();
            Linear { weight: Param::from_tensor(stack.clone().narrow(0, e, 1).reshape([inp, out])), bias: None, lora: None, partition: Partition::Replicated }
        };
        let mlps: Vec<Mlp<B>> =
            (0..n).map(|e| Mlp { gate_proj: view(&gate, e), up_proj: view(&up, e), down_proj: view(&down, e), gate_up_weight: None }).collect();
        let views = mlps.iter().flat_map(projections).map(view_ids).collect();
        Ok((mlps, StackedExperts { gate, up, down, views }))
    }

    /// The stacks when they still back `experts`' weights: the same parameters (a weight
    /// replaced, e.g. by merging an adapter into it, is a new parameter) and frozen (trained
    /// ones move away from the load-time values).
    pub fn backing(&self, experts: &[Mlp<B>]) -> Option<[Tensor<B, 3>; 3]> {
        still_views(&self.views, experts.iter().flat_map(projections)).then(|| [self.gate.clone(), self.up.clone(), self.down.clone()])
    }
}

/// Every local expert's SwiGLU MLP (bias-free, as [`StackedExperts::load`] builds them) on its
/// own rows, laid out expert after expert (`counts[e]` rows of `experts[e]`): each projection
/// one grouped GEMM over the experts' stacked weights
/// (`stacked`, when they still back the experts; else stacked on the call) plus the stacked
/// adapters' term, no expert padded to the busiest one's rows.
///
/// # Shapes
/// - `x`: `[sum(counts), hidden]` → `[sum(counts), hidden]`
pub fn forward_grouped<B: TrainBackend>(experts: &[Mlp<B>], stacked: Option<[Tensor<B, 3>; 3]>, adapters: &ExpertAdapters<B>, x: Tensor<B, 2>, counts: &[usize]) -> Tensor<B, 2> {
    let device = x.device();
    let [gate_w, up_w, down_w] = stacked.unwrap_or_else(|| {
        [0, 1, 2].map(|p| Tensor::stack(experts.iter().map(|m| projections(m)[p].weight.val()).collect(), 0))
    });
    let adapted = |y: Tensor<B, 2>, adapter: Option<&ExpertAdapter<B>>, x: Tensor<B, 2>| match adapter {
        Some(a) => y + span::<B, _>("lora", &device, || a.forward_grouped(x, counts)),
        None => y,
    };
    let gate = B::grouped_matmul(x.clone(), gate_w, counts);
    let up = B::grouped_matmul(x.clone(), up_w, counts);
    let (gate, up) = match (adapters.gate_proj.as_ref(), adapters.up_proj.as_ref()) {
        (Some(g), Some(u)) => {
            let (dg, du) = span::<B, _>("lora", &device, || ExpertAdapter::forward_grouped_pair(g, u, x, counts));
            (gate + dg, up + du)
        }
        (g, u) => (adapted(gate, g, x.clone()), adapted(up, u, x)),
    };
    let h = ops::fused_swiglu(gate, up);
    adapted(B::grouped_matmul(h.clone(), down_w, counts), adapters.down_proj.as_ref(), h)
}

/// An expert's gate, up and down projections, in the order of [`StackedExperts::views`].
fn projections<B: Backend>(m: &Mlp<B>) -> [&Linear<B>; 3] {
    [&m.gate_proj, &m.up_proj, &m.down_proj]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::RandomInit;

    type Ad = burn::backend::Autodiff<crate::backend::Cpu>;

    /// Experts loaded stacked hold what they hold loaded one by one, and the stacks are their
    /// weights one after another; only frozen, unreplaced views are backed.
    #[test]
    fn stacked_load_is_the_experts_loaded_one_by_one() {
        let values = |t: Tensor<Ad, 2>| t.into_data().to_vec::<f32>().unwrap();
        let mut source = RandomInit { seed: 9, std: 0.02 };
        let naming = |p: &str| p.to_string();
        let mut ld = Loader::<Ad> { source: &mut source, device: Default::default(), naming: &naming };
        let apart: Vec<Mlp<Ad>> = (2..5).map(|e| Mlp::load(&mut ld, &format!("mlp.experts.{e}"), 6, 4, crate::parallel::ProcessGroup::SINGLE).unwrap()).collect();
        let (stacked, weights) = StackedExperts::load(&mut ld, "mlp", 2..5, 6, 4).unwrap();
        assert_eq!(weights.gate.dims(), [3, 6, 4]);
        assert_eq!(weights.down.dims(), [3, 4, 6]);
        for (e, (a, s)) in apart.iter().zip(&stacked).enumerate() {
            for (la, ls, stack) in [(&a.gate_proj, &s.gate_proj, &weights.gate), (&a.up_proj, &s.up_proj, &weights.up), (&a.down_proj, &s.down_proj, &weights.down)] {
                assert_eq!(values(ls.weight.val()), values(la.weight.val()), "expert {e}");
                let [_, i, o] = stack.dims();
                assert_eq!(values(stack.clone().narrow(0, e, 1).reshape([i, o])), values(la.weight.val()));
            }
        }
        assert!(weights.backing(&stacked).is_none(), "weights that train are not backed");
        let frozen: Vec<Mlp<Ad>> = stacked.iter().map(|m| m.clone().no_grad()).collect();
        assert!(weights.backing(&frozen).is_some(), "frozen views are backed");
        assert!(weights.backing(&frozen[..2]).is_none(), "a subset is not");
        let mut replaced = frozen.clone();
        replaced[1].up_proj.weight = Param::from_tensor(replaced[1].up_proj.weight.val() * 2.0).set_require_grad(false);
        assert!(weights.backing(&replaced).is_none(), "a replaced weight is not");
    }

    /// Experts larger than a random chunk (rows crossing chunks) stack as their transposed
    /// weights.
    #[test]
    fn stacks_of_experts_larger_than_a_chunk_hold_their_transposed_weights() {
        let (inp, out) = (1000, 1100);
        let mut source = RandomInit { seed: 5, std: 0.02 };
        let naming = |p: &str| p.to_string();
        let mut ld = Loader::<crate::backend::Cpu> { source: &mut source, device: Default::default(), naming: &naming };
        let paths: Vec<String> = (0..2).map(|e| format!("experts.{e}.up_proj")).collect();
        let stack: Vec<f32> = ld.stacked_transposed(&paths, inp, out).unwrap().into_data().to_vec().unwrap();
        let names: Vec<String> = paths.iter().map(|p| format!("{p}.weight")).collect();
        let shape = [out, inp];
        let reqs: Vec<_> = names.iter().map(|name| crate::model::weights::TensorRequest { name, shape: &shape, slice: None, init: crate::model::weights::InitKind::Normal }).collect();
        use crate::model::weights::WeightSource;
        let stored = RandomInit { seed: 5, std: 0.02 }.tensors(&reqs).unwrap();
        for (e, w) in stored.iter().enumerate() {
            for o in 0..out {
                for i in 0..inp {
                    assert_eq!(stack[e * inp * out + i * out + o], w.data[o * inp + i], "expert {e} ({o}, {i})");
                }
            }
        }
    }
}
