//! The sparse mixture of experts of Qwen3-MoE and Qwen2-MoE: router, top-k, the experts, the
//! shared expert, and under expert parallelism the all-to-all token dispatcher that carries
//! routed tokens to the rank holding their expert and back.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use super::expert_layout::{first_rows, runs, Chunk, ExpertGemm, ExpertLayout, ExpertRouting};
use super::experts::StackedExperts;
use super::layers::{Linear, Loader, Mlp};
use super::router_balance::RouterBalance;
use super::routing_memo::{Routed, RoutingMemo};
use super::routing::RowRoute;
use super::spec::MlpSpec;
use crate::backend::profile::span;
use crate::backend::TrainBackend;
use crate::error::Result;
use crate::lora::ExpertAdapters;
use crate::parallel::regions::GroupComm;
use crate::parallel::{Partition, ProcessGroup};

/// A sparse mixture of SwiGLU experts (Qwen3-MoE): a linear router, softmax over all experts,
/// top-k, optional renormalisation over the chosen k, and the weighted sum of the chosen
/// experts' outputs; Qwen2-MoE adds a shared expert every token goes through. Under expert
/// parallelism a rank holds the contiguous block of experts its expert-parallel rank owns and
/// adds up only their contributions (the shared expert, like the router, is whole on every rank).
#[derive(Module, Debug)]
pub struct SparseMoe<B: Backend> {
    pub gate: Linear<B>,
    pub experts: Vec<Mlp<B>>,
    /// Qwen2-MoE's shared expert and its one-output gate: `sigmoid(shared_expert_gate(x)) *
    /// shared_expert(x)` is added to the routed sum. Both or neither.
    pub shared_expert: Option<Mlp<B>>,
    pub shared_expert_gate: Option<Linear<B>>,
    /// The experts' frozen weights as loaded, `[experts, in, out]` a projection (the experts'
    /// weights are views of them); `None` once they no longer back the experts' weights
    /// ([`CausalLm::without_unbacked_joins`](super::CausalLm::without_unbacked_joins)).
    pub stacked: Option<StackedExperts<B>>,
    /// The experts' LoRA adapters, stacked a projection at a time.
    pub expert_lora: ExpertAdapters<B>,
    /// Global index of `experts[0]`.
    pub first_expert: usize,
    pub num_experts: usize,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    /// Grouped GEMMs or padded runs ([`ExpertGemm`]).
    #[module(skip)]
    pub gemm: ExpertGemm,
    /// Slots laid out on the device or the host ([`ExpertRouting`]).
    #[module(skip)]
    pub routing: ExpertRouting,
}

impl<B: TrainBackend> SparseMoe<B> {
    pub fn load(ld: &mut Loader<'_, B>, path: &str, hidden: usize, spec: &MlpSpec, ep: ProcessGroup) -> Result<Self> {
        let MlpSpec::Moe { num_experts, top_k, intermediate_size, norm_topk_prob, shared_expert_intermediate_size } = *spec else {
            return Err(crate::error::Error::Internal("SparseMoe built from a dense spec".into()));
        };
        let gate = Linear::load(ld, &super::hf_names::router(path), hidden, num_experts, false, Partition::Replicated)?;
        let owned = ep.block(num_experts);
        let gemm = ExpertGemm::from_env().map_err(crate::error::Error::Unsupported)?;
        let routing = ExpertRouting::from_env().map_err(crate::error::Error::Unsupported)?;
        let (experts, stacked) = StackedExperts::load(ld, path, owned.clone(), hidden, intermediate_size)?;
        // Replicated like the router: the block runs outside the tensor-parallel region.
        let (shared_expert, shared_expert_gate) = match shared_expert_intermediate_size {
            Some(n) => (
                Some(Mlp::load(ld, &super::hf_names::shared_expert(path), hidden, n, ProcessGroup::SINGLE)?),
                Some(Linear::load(ld, &super::hf_names::shared_expert_gate(path), hidden, 1, false, Partition::Replicated)?),
            ),
            None => (None, None),
        };
        let expert_lora = ExpertAdapters::none();
        Ok(SparseMoe { gate, experts, shared_expert, shared_expert_gate, stacked: Some(stacked), expert_lora, first_expert: owned.start, num_experts, top_k, norm_topk_prob, gemm, routing })
    }

    /// The routed experts' weighted sum ([`forward_routed`](Self::forward_routed)) plus the
    /// shared expert's gated output where the layer has one.
    ///
    /// # Shapes
    /// - `x`: `[tokens, hidden]` → `[tokens, hidden]`
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        ep: Option<&GroupComm<B::Wire>>,
        balance: Option<&RouterBalance<B>>,
        memo: Option<&RoutingMemo<B>>,
    ) -> Tensor<B, 2> {
        let routed = self.forward_routed(x.clone(), ep, balance, memo);
        match (&self.shared_expert, &self.shared_expert_gate) {
            (Some(mlp), Some(gate)) => {
                let device = x.device();
                let shared = span::<B, _>("shared_expert", &device, || mlp.forward(x.clone(), None));
                routed + shared * burn::tensor::activation::sigmoid(gate.forward(x))
            }
            _ => routed,
        }
    }

    /// The routed experts' weighted sum. Under expert parallelism (`ep`: the group the experts
    /// are split over, each rank holding its block) the routed tokens travel to their experts'
    /// ranks and back ([`forward_expert_parallel`](Self::forward_expert_parallel)). The router's
    /// choices and probabilities go to `balance` where given (the load-balancing loss). With
    /// `memo`, a layer whose routing its first pass recorded routes as that pass did
    /// ([`RoutingMemo`]), and the first pass of a recomputed layer records it.
    ///
    /// # Shapes
    /// - `x`: `[tokens, hidden]` → `[tokens, hidden]`
    fn forward_routed(
        &self,
        x: Tensor<B, 2>,
        ep: Option<&GroupComm<B::Wire>>,
        balance: Option<&RouterBalance<B>>,
        memo: Option<&RoutingMemo<B>>,
    ) -> Tensor<B, 2> {
        let [t, _] = x.dims();
        let (device, dtype) = (x.device(), x.dtype());
        let ep = ep.filter(|g| g.group().size > 1);
        let on_device = ep.is_none() && self.gemm == ExpertGemm::Grouped && self.experts.len() == self.num_experts && t > 0 && self.routing == ExpertRouting::Device;
        let replayed = memo.filter(|_| on_device).and_then(|m| m.replay(self.gate.weight.id));
        let logits = self.gate.forward(x.clone());
        let probs = burn::tensor::activation::softmax(logits.cast(burn::tensor::FloatDType::F32), 1);
        let chosen = match &replayed {
            Some(r) => r.chosen.clone(),
            None => B::top_k_indices(probs.clone(), self.top_k),
        };
        let mut weights = probs.clone().gather(1, chosen.clone());
        if self.norm_topk_prob {
            weights = weights.clone() / weights.sum_dim(1);
        }
        let weights = weights.cast(dtype).reshape([t * self.top_k]);
        if on_device {
            if let Some(balance) = balance {
                balance.record_with(probs, self.top_k, || crate::backend::timed_read(|| host_ints(chosen.clone())).into());
            }
            let routed = match replayed {
                Some(r) => r,
                None => self.route_on_device(chosen, memo),
            };
            return self.forward_laid_out_on_device(x, &routed, weights);
        }
        // Routing is data-dependent: read the choices on the host to lay out each expert's tokens.
        let chosen = crate::backend::timed_read(|| host_ints(chosen));
        if let Some(balance) = balance {
            balance.record(probs, &chosen, self.top_k);
        }
        if let Some(ep) = ep {
            return self.forward_expert_parallel(x, weights, &chosen, ep);
        }
        let Some(layout) = ExpertLayout::new(&chosen, self.top_k, self.first_expert, self.experts.len(), self.gemm) else {
            return x.zeros_like();
        };
        let dispatch = RowRoute::new(layout.row_token, layout.slot_row.clone(), self.top_k, layout.slot_local, dtype, &device);
        let xs = B::route_rows(x, &dispatch);
        let ys = self.run_experts(xs, &layout.chunks);
        let combine = RowRoute::new(layout.slot_row, layout.row_slot, 1, Some(layout.row_real), dtype, &device);
        // Slots of experts held elsewhere weigh nothing here.
        let weights = match dispatch.keep {
            Some(local) => weights * local,
            None => weights,
        };
        combine_slots(B::route_rows(ys, &combine), weights, self.top_k)
    }

    /// The slots of `chosen` laid out expert after expert on the device
    /// ([`kernels_cubecl::ExpertRoutingBackend::expert_rows`]); only the experts' row counts,
    /// which the grouped GEMMs take on the host, are read back. Recorded in `memo` where it
    /// records (the first pass of a recomputed layer).
    fn route_on_device(&self, chosen: Tensor<B, 2, Int>, memo: Option<&RoutingMemo<B>>) -> Routed<B> {
        let rows = B::expert_rows(chosen.clone(), self.num_experts);
        let counts = crate::backend::timed_read(|| host_ints(rows.counts.clone())).into_iter().map(|c| c as usize).collect();
        let routed = Routed { chosen, rows, counts };
        if let Some(memo) = memo {
            memo.record(self.gate.weight.id, &routed);
        }
        routed
    }

    /// Every expert held here, grouped GEMMs over the slots `routed` lays out. The outputs come
    /// back to their tokens weighted and summed in one pass
    /// ([`kernels_cubecl::ExpertRoutingBackend::combine_rows`]).
    fn forward_laid_out_on_device(&self, x: Tensor<B, 2>, routed: &Routed<B>, weights: Tensor<B, 1>) -> Tensor<B, 2> {
        let rows = &routed.rows;
        let dispatch = RowRoute { forward: rows.row_token.clone(), backward: rows.slot_row.clone(), group: self.top_k, keep: None };
        let ys = self.run_grouped(B::route_rows(x, &dispatch), &routed.counts);
        B::combine_rows(ys, weights, rows, self.top_k)
    }

    /// The stacked weights while they back the experts' own ([`StackedExperts::backing`]).
    fn backing(&self) -> Option<[Tensor<B, 3>; 3]> {
        self.stacked.as_ref().and_then(|s| s.backing(&self.experts))
    }

    /// The local experts on `xs` (`[rows, hidden]`, laid out in `runs`): grouped, one grouped
    /// GEMM a projection over all experts' stacked weights (a run is an expert); padded, each
    /// run one batched GEMM a projection over its experts' stacked weights. The stacked
    /// adapters' terms likewise.
    fn run_experts(&self, xs: Tensor<B, 2>, runs: &[Chunk]) -> Tensor<B, 2> {
        let [_, hidden] = xs.dims();
        let device = xs.device();
        if self.gemm == ExpertGemm::Grouped {
            let mut counts = vec![0; self.experts.len()];
            for run in runs {
                counts[run.first] = run.capacity;
            }
            return self.run_grouped(xs, &counts);
        }
        let backing = self.backing();
        span::<B, _>("experts", &device, || {
            let outputs = runs.iter().map(|run| {
                let xs = match runs.len() {
                    1 => xs.clone(),
                    _ => xs.clone().narrow(0, run.offset, run.rows()),
                };
                let stacked = backing.clone().map(|ws| ws.map(|w| w.narrow(0, run.first, run.len)));
                let experts = &self.experts[run.first..run.first + run.len];
                let adapters = (&self.expert_lora, run.first..run.first + run.len);
                Mlp::forward_stacked(experts, stacked, adapters, xs.reshape([run.len, run.capacity, hidden])).reshape([run.rows(), hidden])
            });
            Tensor::cat(outputs.collect(), 0)
        })
    }

    /// The local experts on `xs` laid out expert after expert (`counts[e]` rows of expert `e`):
    /// one grouped GEMM a projection.
    fn run_grouped(&self, xs: Tensor<B, 2>, counts: &[usize]) -> Tensor<B, 2> {
        let (device, backing) = (xs.device(), self.backing());
        span::<B, _>("experts", &device, || super::experts::forward_grouped(&self.experts, backing, &self.expert_lora, xs, counts))
    }

    /// [`forward`](Self::forward) with the experts split over `ep` (Megatron's all-to-all token
    /// dispatcher): this rank's routed slots, ordered by their experts' ranks, are traded for the
    /// slots the other ranks route to this rank's experts (counts first, per rank and expert),
    /// the local experts run on what arrived, the outputs travel back by the reverse all-to-all,
    /// and each token adds its slots' outputs weighted by the router. Every rank of `ep` calls
    /// this at once, whatever it routed.
    fn forward_expert_parallel(&self, x: Tensor<B, 2>, weights: Tensor<B, 1>, chosen: &[i64], ep: &GroupComm<B::Wire>) -> Tensor<B, 2> {
        let [_, hidden] = x.dims();
        let (device, dtype) = (x.device(), x.dtype());
        let (local, ranks) = (self.experts.len(), ep.group().size);
        let plan = DispatchPlan::new(chosen, local, ranks);
        let received = match ep.communicator().all_to_all_count_blocks(&plan.send_blocks, local) {
            Ok(r) => r,
            Err(e) => {
                ep.latch(e);
                return x.zeros_like();
            }
        };
        let arrivals = Arrivals::new(&received, local, ranks, self.gemm);
        let k = self.top_k as i64;
        let send = RowRoute::new(plan.order.iter().map(|s| s / k).collect(), plan.position.clone(), self.top_k, None, dtype, &device);
        let send_rows = B::route_rows(x.clone(), &send);
        let latch = |r: std::result::Result<Tensor<B, 2>, crate::parallel::comm::CommError>, rows: usize| {
            r.unwrap_or_else(|e| {
                ep.latch(e);
                Tensor::zeros([rows, hidden], (&device, dtype))
            })
        };
        let arrived = latch(B::all_to_all_rows(send_rows, &plan.send_counts, &arrivals.recv_counts, ep), arrivals.rows);
        let outputs = match arrivals.rows {
            0 => arrived,
            _ => {
                let into_layout = RowRoute::new(arrivals.grouped.clone(), arrivals.back.clone(), 1, None, dtype, &device);
                let ys = self.run_experts(B::route_rows(arrived, &into_layout), &arrivals.runs);
                let out_of_layout = RowRoute::new(arrivals.back.clone(), arrivals.grouped.clone(), 1, Some(arrivals.real.clone()), dtype, &device);
                B::route_rows(ys, &out_of_layout)
            }
        };
        let returned = latch(B::all_to_all_rows(outputs, &arrivals.recv_counts, &plan.send_counts, ep), plan.order.len());
        let to_slots = RowRoute::new(plan.position, plan.order, 1, None, dtype, &device);
        combine_slots(B::route_rows(returned, &to_slots), weights, self.top_k)
    }
}

/// An integer tensor's values on the host, in order.
fn host_ints<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().to_vec().unwrap_or_default()
}

/// Each token's output: its `top_k` slots' rows (`[tokens * top_k, hidden]`, slot order)
/// weighted by the router's `weights` (`[tokens * top_k]`) and added up.
fn combine_slots<B: Backend>(rows: Tensor<B, 2>, weights: Tensor<B, 1>, top_k: usize) -> Tensor<B, 2> {
    let [slots, hidden] = rows.dims();
    let t = slots / top_k;
    (rows * weights.reshape([slots, 1])).reshape([t, top_k, hidden]).sum_dim(1).reshape([t, hidden])
}

/// Where this rank's routed slots go under expert parallelism: every slot (`token * top_k + k`)
/// to the rank holding its expert (experts in blocks of `local` per rank), in the order of
/// their experts (so by rank, then by expert within a rank).
#[derive(Debug, PartialEq)]
struct DispatchPlan {
    /// The slots in send order.
    order: Vec<i64>,
    /// `[slots]`: each slot's place in `order`.
    position: Vec<i64>,
    /// Slots for each rank.
    send_counts: Vec<usize>,
    /// `[ranks * local]`: slots for each rank's each local expert.
    send_blocks: Vec<usize>,
}

impl DispatchPlan {
    fn new(chosen: &[i64], local: usize, ranks: usize) -> Self {
        let mut order: Vec<i64> = (0..chosen.len() as i64).collect();
        // Stable: slots of one expert stay in token order.
        order.sort_by_key(|&s| chosen[s as usize]);
        let mut send_blocks = vec![0; ranks * local];
        for &e in chosen {
            send_blocks[e as usize] += 1;
        }
        let send_counts = send_blocks.chunks(local).map(|b| b.iter().sum()).collect();
        let mut position = vec![0i64; order.len()];
        for (i, &slot) in order.iter().enumerate() {
            position[slot as usize] = i as i64;
        }
        DispatchPlan { order, position, send_counts, send_blocks }
    }
}

/// The rows a rank receives (from each rank in rank order, each rank's rows by local expert),
/// laid out for its experts in runs ([`Chunk`]) with every expert's rows in arrival order and
/// padding (row 0, its output dropped) to its run's busiest expert.
#[derive(Debug, PartialEq)]
struct Arrivals {
    /// Rows from each rank.
    recv_counts: Vec<usize>,
    rows: usize,
    runs: Vec<Chunk>,
    /// `[places]`: the arrived row each place of the layout reads.
    grouped: Vec<i64>,
    /// `[rows]`: each arrived row's place in the layout.
    back: Vec<i64>,
    /// `[places]`: places that hold an arrived row.
    real: Vec<bool>,
}

impl Arrivals {
    /// From `received[j * local + e]`: rows rank `j` sends for local expert `e`.
    fn new(received: &[usize], local: usize, ranks: usize, gemm: ExpertGemm) -> Self {
        let recv_counts: Vec<usize> = received.chunks(local).map(|b| b.iter().sum()).collect();
        let rows = recv_counts.iter().sum();
        let per_expert: Vec<usize> = (0..local).map(|e| (0..ranks).map(|j| received[j * local + e]).sum()).collect();
        let runs = runs(&per_expert, gemm);
        let places = runs.iter().map(Chunk::rows).sum();
        let first_rows = first_rows(&runs, local);
        let (mut grouped, mut back, mut real) = (vec![0i64; places], vec![0i64; rows], vec![false; places]);
        let mut filled = vec![0; local];
        let mut row = 0;
        for j in 0..ranks {
            for e in 0..local {
                for _ in 0..received[j * local + e] {
                    let place = first_rows[e].expect("an expert with rows is in a run") + filled[e];
                    grouped[place] = row as i64;
                    back[row] = place as i64;
                    real[place] = true;
                    filled[e] += 1;
                    row += 1;
                }
            }
        }
        Arrivals { recv_counts, rows, runs, grouped, back, real }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Ad = burn::backend::Autodiff<crate::backend::Cpu>;

    /// A MoE layer of 16 experts over 8 features, top 2, whose router sends every token to
    /// expert 0 first (the padded layout runs it alone).
    fn hot_moe() -> SparseMoe<Ad> {
        use burn::tensor::TensorData;
        let (hidden, experts, top_k) = (8, 16, 2);
        let spec = MlpSpec::Moe { num_experts: experts, top_k, intermediate_size: 4, norm_topk_prob: true, shared_expert_intermediate_size: None };
        let mut source = crate::model::weights::RandomInit { seed: 3, std: 0.5 };
        let naming = |p: &str| p.to_string();
        let mut ld = Loader::<Ad> { source: &mut source, device: Default::default(), naming: &naming };
        let mut moe = SparseMoe::load(&mut ld, "mlp", hidden, &spec, ProcessGroup::SINGLE).unwrap();
        let mut bias = vec![0f32; hidden * experts];
        for row in 0..hidden {
            bias[row * experts] = 10.0;
        }
        let hot = Tensor::<Ad, 2>::from_data(TensorData::new(bias, [hidden, experts]), &Default::default());
        moe.gate.weight = burn::module::Param::from_tensor((moe.gate.weight.val() + hot).detach());
        moe.no_grad()
    }

    fn close(a: Tensor<crate::backend::Cpu, 2>, b: Tensor<crate::backend::Cpu, 2>, what: &str) {
        let scale = b.clone().abs().max().into_scalar();
        let err = (a - b).abs().max().into_scalar() / scale;
        assert!(err < 1e-5, "{what}: {err:e} of the largest value");
    }

    /// Padded in several runs (expert 0 alone) and grouped (slots laid out on the host and on
    /// the device), the layer's output and input gradient equal each expert applied to every
    /// token, weighted by the router.
    #[test]
    fn chunked_and_grouped_experts_equal_every_expert_on_every_token() {
        use burn::tensor::Distribution;
        let (hidden, experts, top_k, tokens) = (8, 16, 2, 2048);
        let mut moe = hot_moe();
        let device = Default::default();
        let x = Tensor::<Ad, 2>::random([tokens, hidden], Distribution::Uniform(0.5, 1.0), &device).require_grad();
        let r = Tensor::<Ad, 2>::random([tokens, hidden], Distribution::Normal(0.0, 1.0), &device);
        let probs = burn::tensor::activation::softmax(moe.gate.forward(x.clone()), 1);
        let (weights, chosen) = probs.topk_with_indices(top_k, 1);
        let choices: Vec<i64> = chosen.clone().into_data().convert::<i64>().to_vec().unwrap();
        let layout = ExpertLayout::new(&choices, top_k, 0, experts, ExpertGemm::Padded).unwrap();
        assert!(layout.chunks.len() > 1 && layout.chunks[0].len == 1, "the padded layout really is chunked: {:?}", layout.chunks);
        let x2 = x.clone().detach().require_grad();
        let weights = weights.clone() / weights.sum_dim(1);
        let mut want = Tensor::<Ad, 2>::zeros([tokens, hidden], &device);
        for e in 0..experts {
            let picked = chosen.clone().equal_elem(e as i64).float();
            let w = (weights.clone() * picked).sum_dim(1);
            want = want + moe.experts[e].forward(x2.clone(), None) * w;
        }
        let grads = (want.clone() * r.clone()).sum().backward();
        let dx_want = x2.grad(&grads).unwrap();
        for (gemm, routing) in [(ExpertGemm::Padded, ExpertRouting::Host), (ExpertGemm::Grouped, ExpertRouting::Host), (ExpertGemm::Grouped, ExpertRouting::Device)] {
            (moe.gemm, moe.routing) = (gemm, routing);
            let x = x.clone().detach().require_grad();
            let got = moe.forward(x.clone(), None, None, None);
            let grads = (got.clone() * r.clone()).sum().backward();
            close(got.inner(), want.clone().inner(), &format!("{gemm:?} {routing:?} output"));
            close(x.grad(&grads).unwrap(), dx_want.clone(), &format!("{gemm:?} {routing:?} input gradient"));
        }
    }

    /// A recomputed layer's replay routes every token to the experts its first pass chose (here
    /// after the router changed, so routing afresh would differ), weights them by its own
    /// router, and takes the recorded routing once.
    #[test]
    fn a_replay_routes_as_its_recorded_first_pass() {
        use burn::tensor::{Distribution, TensorData};
        let (hidden, experts, top_k, tokens) = (8, 16, 2, 256);
        let mut moe = hot_moe();
        (moe.gemm, moe.routing) = (ExpertGemm::Grouped, ExpertRouting::Device);
        let device = Default::default();
        let x = Tensor::<Ad, 2>::random([tokens, hidden], Distribution::Uniform(0.5, 1.0), &device);
        let (replay, record) = RoutingMemo::<Ad>::pair();
        burn::module::AutodiffModule::valid(&moe).forward(x.clone().inner(), None, None, Some(&record));
        let recorded = burn::tensor::activation::softmax(moe.gate.forward(x.clone()), 1).topk_with_indices(top_k, 1).1;
        // The router now sends every token to expert 1 first.
        let mut bias = vec![0f32; hidden * experts];
        for row in 0..hidden {
            bias[row * experts + 1] = 20.0;
        }
        let hot = Tensor::<Ad, 2>::from_data(TensorData::new(bias, [hidden, experts]), &device);
        let id = moe.gate.weight.id;
        moe.gate.weight = burn::module::Param::initialized(id, moe.gate.weight.val() + hot);
        let got = moe.forward(x.clone(), None, None, Some(&replay));
        assert!(replay.replay(id).is_none(), "the routing is taken once");
        let probs = burn::tensor::activation::softmax(moe.gate.forward(x.clone()), 1);
        let weights = probs.gather(1, recorded.clone());
        let weights = weights.clone() / weights.sum_dim(1);
        let mut want = Tensor::<Ad, 2>::zeros([tokens, hidden], &device);
        for e in 0..experts {
            let picked = recorded.clone().equal_elem(e as i64).float();
            want = want + moe.experts[e].forward(x.clone(), None) * (weights.clone() * picked).sum_dim(1);
        }
        close(got.clone().inner(), want.inner(), "replayed output");
        let afresh = moe.forward(x, None, None, None);
        let moved = (afresh - got).abs().max().into_scalar();
        assert!(moved > 1e-3, "routing afresh would have differed: {moved:e}");
    }

    /// With adapters on every projection of every expert but one (B not zero, as after some
    /// training), the grouped layout (slots laid out on the host and on the device) gives the
    /// padded one's output and gradients of the input and of every stacked factor.
    #[test]
    fn grouped_adapters_equal_padded_adapters() {
        use burn::tensor::Distribution;
        use crate::lora::{ExpertAdapter, LoraConfig};
        let (hidden, experts, tokens) = (8, 16, 300);
        let mut moe = hot_moe();
        let device = Default::default();
        let cfg = LoraConfig { rank: 2, scale: 1.5, dropout: 0.0, seed: 4 };
        let mut adapted = vec![true; experts];
        adapted[5] = false;
        for (p, (inp, out)) in crate::lora::EXPERT_PROJECTIONS.iter().zip([(hidden, 4), (hidden, 4), (4, hidden)]) {
            let paths: Vec<String> = (0..experts).map(|e| format!("mlp.experts.{e}.{p}")).collect();
            let mut a = ExpertAdapter::<Ad>::init(&cfg, &paths, adapted.clone(), 0..experts, inp, out, &device);
            let keep: Vec<f32> = adapted.iter().map(|&on| if on { 1.0 } else { 0.0 }).collect();
            let keep = Tensor::<Ad, 3>::from_data(burn::tensor::TensorData::new(keep, [experts, 1, 1]), &device);
            a.lora_b = burn::module::Param::from_tensor(Tensor::random([experts, 2, out], Distribution::Normal(0.0, 1.0), &device) * keep);
            *moe.expert_lora.get_mut(p).unwrap() = Some(a);
        }
        let x = Tensor::<Ad, 2>::random([tokens, hidden], Distribution::Uniform(0.5, 1.0), &device);
        let r = Tensor::<Ad, 2>::random([tokens, hidden], Distribution::Normal(0.0, 1.0), &device);
        let outcome = |gemm: ExpertGemm, routing: ExpertRouting| {
            let mut moe = moe.clone();
            (moe.gemm, moe.routing) = (gemm, routing);
            let x = x.clone().require_grad();
            let y = moe.forward(x.clone(), None, None, None);
            let grads = (y.clone() * r.clone()).sum().backward();
            let mut all = vec![("output".to_string(), y.inner()), ("input gradient".to_string(), x.grad(&grads).unwrap())];
            for p in crate::lora::EXPERT_PROJECTIONS {
                let a = moe.expert_lora.get(p).unwrap();
                for (name, factor) in [("A", a.lora_a.val()), ("B", a.lora_b.val())] {
                    let [e, i, o] = factor.dims();
                    all.push((format!("{p} {name} gradient"), factor.grad(&grads).unwrap().reshape([e * i, o])));
                }
            }
            all
        };
        let padded = outcome(ExpertGemm::Padded, ExpertRouting::Host);
        for routing in [ExpertRouting::Host, ExpertRouting::Device] {
            for ((what, got), (_, want)) in outcome(ExpertGemm::Grouped, routing).into_iter().zip(padded.clone()) {
                close(got, want, &format!("{routing:?}: {what}"));
            }
        }
    }

    #[test]
    fn dispatch_orders_slots_by_expert_and_counts_them_per_rank_and_expert() {
        // 3 tokens, top 2, 4 experts over 2 ranks (2 each).
        let chosen = [3, 0, 1, 3, 2, 0];
        let p = DispatchPlan::new(&chosen, 2, 2);
        assert_eq!(p.order, [1, 5, 2, 4, 0, 3]);
        assert_eq!(p.position, [4, 0, 2, 5, 3, 1]);
        assert_eq!(p.send_blocks, [2, 1, 1, 2]);
        assert_eq!(p.send_counts, [3, 3]);
    }

    #[test]
    fn arrivals_group_rows_by_expert_across_ranks() {
        // From rank 0: 1 row for expert 0, 2 for expert 1; from rank 1: 2 for expert 0, none
        // for expert 1.
        let a = Arrivals::new(&[1, 2, 2, 0], 2, 2, ExpertGemm::Padded);
        assert_eq!((a.recv_counts.clone(), a.rows), (vec![3, 2], 5));
        assert_eq!(a.runs, vec![Chunk { first: 0, len: 2, capacity: 8, offset: 0 }]);
        // Arrival order: r0e0, r0e1, r0e1, r1e0, r1e0.
        assert_eq!(a.back, [0, 8, 9, 1, 2]);
        assert_eq!(a.grouped[..3], [0, 3, 4]);
        assert_eq!(a.grouped[8..10], [1, 2]);
        for (row, &place) in a.back.iter().enumerate() {
            assert_eq!(a.grouped[place as usize], row as i64);
            assert!(a.real[place as usize]);
        }
        assert_eq!(a.real.iter().filter(|&&r| r).count(), 5);
        assert_eq!(Arrivals::new(&[0, 0, 0, 0], 2, 2, ExpertGemm::Padded).rows, 0);
        // A hot local expert (0 of 64) runs alone; every arrived row still has its own place.
        let mut received = vec![2usize; 2 * 64];
        received[0] = 300;
        received[64] = 200;
        let a = Arrivals::new(&received, 64, 2, ExpertGemm::Padded);
        assert!(a.runs.len() > 1 && a.runs[0] == Chunk { first: 0, len: 1, capacity: 504, offset: 0 }, "{:?}", a.runs);
        for (row, &place) in a.back.iter().enumerate() {
            assert_eq!(a.grouped[place as usize], row as i64);
        }
        assert_eq!(a.real.iter().filter(|&&r| r).count(), a.rows);
    }
}
