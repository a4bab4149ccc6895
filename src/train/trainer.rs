//! One optimizer step over a global batch, and evaluation.
//!
//! The loss of a step is normalised per token over the whole global batch, as Megatron does
//! with `--calculate_per_token_loss` and transformers with `num_items_in_batch`: each micro
//! batch contributes `sum(nll) / tokens(global batch)`, so a micro batch of long answers
//! weighs more than one of short answers, and accumulation does not change the result.
//!
//! Under data parallelism each rank runs its share of the global batch's micro batches: the
//! trained tokens are counted over every rank first (the normaliser is the global batch's), and
//! the summed gradients and loss are all-reduced in one bucket before the norm, the clipping and
//! the update, which every rank then computes from the same values (the same update everywhere).
//! With the distributed optimizer ([`super::distributed_optimizer`]) the gradients are
//! reduce-scattered instead: each rank updates the parameters it owns and gathers the others'.

use std::ops::Range;

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use crate::backend::TrainBackend;
use burn::tensor::{Int, Tensor, TensorData};

use super::distributed_optimizer::DistributedOptimizer;
use super::optimizer::{collect_grads, AdamW, Grads, Moments};
use super::recompute;
use super::schedule::LrSchedule;
use crate::backend::profile::span;
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::model::{CausalLm, RouterBalance, RoutingMemo, SequenceContext};
use crate::parallel::regions::{Collective, GroupComm};
use crate::parallel::tensor::{GradPlacement, TensorParallel};

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// The device allocator after the step (CUDA only).
    pub memory: Option<crate::backend::DeviceMemory>,
    /// Mean per-token loss over the global batch.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Trained (label) tokens in the global batch.
    pub tokens: usize,
    /// All tokens, padding included, that went through the model.
    pub positions: usize,
}

pub struct Trainer<B: TrainBackend> {
    /// `None` only while an update is being applied.
    model: Option<CausalLm<Autodiff<B>>>,
    pub optimizer: AdamW<B>,
    pub schedule: LrSchedule,
    /// Global-norm clipping threshold; 0 = off.
    pub clip: f64,
    /// Root of the per-step dropout streams.
    pub seed: u64,
    /// Layer groups recomputed in backward instead of kept.
    pub recompute: Vec<Range<usize>>,
    /// The loss from hidden states and the LM head through the fused kernel (no logits
    /// resident); `train.fused_cross_entropy`.
    pub fused_cross_entropy: bool,
    /// Weight of the routers' load-balancing loss (`train.router_aux_loss_coef` as
    /// [`preflight::router_aux_loss_coef`](super::preflight::router_aux_loss_coef) resolves it);
    /// 0 = none.
    pub router_aux_loss_coef: f64,
    pub device: B::Device,
    /// The data-parallel group's communicator; `None` on one rank.
    pub data_parallel: Option<GroupComm<B::Wire>>,
    /// The tensor-parallel group (the model's layers split over it) and where each trained
    /// parameter's gradient lives across it; `None` on one rank
    /// ([`set_tensor_parallel`](Self::set_tensor_parallel)).
    tensor_parallel: Option<(TensorParallel<B::Wire>, GradPlacement)>,
    /// The group the MoE layers' experts are split over, and the group holding copies of this
    /// rank's experts (their gradients summed over it instead of the data-parallel group);
    /// `None` when the experts are not split ([`set_expert_parallel`](Self::set_expert_parallel)).
    expert_parallel: Option<(GroupComm<B::Wire>, GroupComm<B::Wire>)>,
    /// `(first, stride)`: this rank's `k`-th micro batch of a step is micro batch
    /// `first + k stride` of the global batch, whose index seeds its dropout stream (so the masks
    /// are one rank's whatever the layout). `(0, 1)` on one rank.
    pub micro_batch_place: (usize, usize),
    /// Each trained parameter's optimizer state on one data-parallel rank; `None`: on every
    /// rank ([`set_distributed_optimizer`](Self::set_distributed_optimizer)).
    distributed_optimizer: Option<DistributedOptimizer<B::Wire>>,
}

/// Labels that count in the loss after the one-token shift.
pub fn trained_tokens(b: &Batch) -> usize {
    (0..b.batch_size)
        .map(|r| b.labels[r * b.seq_len..(r + 1) * b.seq_len].iter().skip(1).filter(|&&l| l != crate::model::IGNORE_INDEX).count())
        .sum()
}

/// The seed of the random stream of micro batch `micro` of step `step`: dropout masks depend on
/// nothing else, so a resumed run draws what an uninterrupted one draws.
pub fn stream_seed(seed: u64, step: usize, micro: usize) -> u64 {
    let mut h = seed ^ 0x9e37_79b9_7f4a_7c15;
    for v in [step as u64, micro as u64] {
        h = (h ^ v).wrapping_mul(0x100_0000_01b3).rotate_left(29);
    }
    h
}

struct BatchTensors<B: Backend> {
    ids: Tensor<B, 2, Int>,
    positions: Tensor<B, 2, Int>,
    segments: Tensor<B, 2, Int>,
    labels: Tensor<B, 2, Int>,
}

fn upload<B: TrainBackend>(b: &Batch, device: &B::Device) -> BatchTensors<B> {
    let shape = [b.batch_size, b.seq_len];
    let int = |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, shape), device);
    BatchTensors {
        ids: int(b.input_ids.iter().map(|&x| x as i64).collect()),
        positions: int(b.position_ids.iter().map(|&x| x as i64).collect()),
        segments: int(b.segment_ids.iter().map(|&x| x as i64).collect()),
        labels: int(b.labels.clone()),
    }
}

/// Summed next-token loss of a batch through `model` (any backend), laying the layers out as
/// `recompute` says, split over `tp` when given.
fn batch_loss<B: TrainBackend>(
    model: &CausalLm<B>,
    t: BatchTensors<B>,
    layers: &dyn Fn(Tensor<B, 3>, &crate::model::SequenceContext<B>) -> Tensor<B, 3>,
    fused: bool,
    (tp, ep): (Option<TensorParallel<B::Wire>>, Option<GroupComm<B::Wire>>),
    balance: Option<RouterBalance<B>>,
) -> Tensor<B, 1> {
    let ctx = model.context(t.positions, Some(t.segments)).with_tensor_parallel(tp).with_expert_parallel(ep).with_router_balance(balance);
    let x = layers(model.embed_for_layers(t.ids, &ctx), &ctx);
    model.head_loss(model.norm.forward(x), t.labels, fused, &ctx)
}

impl<B: TrainBackend> Trainer<B> {
    /// `model`'s load-time joined and stacked weights that do not back the weights it trains
    /// are dropped first ([`CausalLm::without_unbacked_joins`]): the evaluation and the
    /// recomputed layers' forward run on the inner backend, where they would pass for them.
    pub fn new(model: CausalLm<Autodiff<B>>, optimizer: AdamW<B>, schedule: LrSchedule, clip: f64, seed: u64, recompute: Vec<Range<usize>>, device: B::Device) -> Self {
        Trainer {
            model: Some(model.without_unbacked_joins()),
            optimizer,
            schedule,
            clip,
            seed,
            recompute,
            fused_cross_entropy: true,
            router_aux_loss_coef: 0.0,
            device,
            data_parallel: None,
            tensor_parallel: None,
            expert_parallel: None,
            micro_batch_place: (0, 1),
            distributed_optimizer: None,
        }
    }

    /// Deal the trained parameters' optimizer state over the data-parallel group (and the
    /// experts' over the group holding copies of this rank's experts), keeping this rank's part
    /// of what the optimizer holds: call after the groups are set. Nothing to deal on one rank.
    pub fn set_distributed_optimizer(&mut self) {
        let Some(dp) = self.data_parallel.clone() else { return };
        let expert_data = self.expert_parallel.as_ref().map(|(_, d)| d.clone());
        if dp.group().size == 1 && expert_data.as_ref().is_none_or(|d| d.group().size == 1) {
            return;
        }
        let zero = DistributedOptimizer::new::<Autodiff<B>, _>(self.model(), dp, expert_data, is_expert);
        self.optimizer.state.retain(|path, _| zero.owns(path));
        self.distributed_optimizer = Some(zero);
    }

    /// The elements of optimizer state each data-parallel rank owns, by rank, under the
    /// distributed optimizer.
    pub fn optimizer_shares(&self) -> Option<Vec<usize>> {
        self.distributed_optimizer.as_ref().map(|z| z.dense_load())
    }

    /// The optimizer's whole state for a checkpoint when it is dealt over the ranks (every rank
    /// of the data-parallel group calls this at once; those that do not write drop it), `None`
    /// when this rank holds it whole already.
    pub fn gather_optimizer_state(&self) -> Result<Option<std::collections::BTreeMap<String, Moments<B>>>> {
        match &self.distributed_optimizer {
            Some(zero) => Ok(Some(zero.gather_state(&self.optimizer.state, &self.device)?)),
            None => Ok(None),
        }
    }

    /// Split the model's layers over `tp` (the model was built with this rank's slices of the
    /// tensor-parallel group). A group of one is no split.
    pub fn set_tensor_parallel(&mut self, tp: TensorParallel<B::Wire>) {
        if tp.size() > 1 {
            let placement = self.model().tensor_parallel_placement(tp.sequence_parallel);
            self.tensor_parallel = Some((tp, placement));
        }
    }

    /// Split the MoE layers' experts over `ep` (the model was built with this rank's block of
    /// them); `expert_data` holds the other copies of the same experts (a group of one when the
    /// expert groups cover the data-parallel ranks). A group of one is no split.
    pub fn set_expert_parallel(&mut self, ep: GroupComm<B::Wire>, expert_data: GroupComm<B::Wire>) {
        if ep.group().size > 1 {
            self.expert_parallel = Some((ep, expert_data));
        }
    }

    /// The expert-parallel group, if the experts are split.
    pub fn expert_parallel(&self) -> Option<&GroupComm<B::Wire>> {
        self.expert_parallel.as_ref().map(|(ep, _)| ep)
    }

    /// The groups a forward pass splits the layers over.
    fn split(&self) -> (Option<TensorParallel<B::Wire>>, Option<GroupComm<B::Wire>>) {
        (self.tensor_parallel().cloned(), self.expert_parallel().cloned())
    }

    /// The tensor-parallel group, if the layers are split.
    pub fn tensor_parallel(&self) -> Option<&TensorParallel<B::Wire>> {
        self.tensor_parallel.as_ref().map(|(tp, _)| tp)
    }

    /// Where the trained parameters' gradients live across the tensor-parallel group (which are
    /// this rank's slice of a checkpoint tensor); `None` on one rank.
    pub fn grad_placement(&self) -> Option<&GradPlacement> {
        self.tensor_parallel.as_ref().map(|(_, p)| p)
    }

    /// `b` as the layers take it: under sequence parallelism padded (masked positions) to a
    /// length the tensor-parallel group splits evenly.
    fn sequence_layout<'b>(&self, b: &'b Batch) -> std::borrow::Cow<'b, Batch> {
        match self.tensor_parallel() {
            Some(tp) if tp.sequence_parallel => std::borrow::Cow::Owned(b.padded_to_multiple(tp.size(), 0)),
            _ => std::borrow::Cow::Borrowed(b),
        }
    }

    /// The first collective of the tensor- or expert-parallel group that failed inside a
    /// forward or backward since the last check.
    fn check_collectives(&self) -> Result<()> {
        if let Some((tp, _)) = &self.tensor_parallel {
            tp.comm.check()?;
        }
        if let Some((ep, _)) = &self.expert_parallel {
            ep.check()?;
        }
        Ok(())
    }

    pub fn model(&self) -> &CausalLm<Autodiff<B>> {
        self.model.as_ref().expect("the model is only absent inside `step`")
    }

    pub fn into_model(self) -> CausalLm<Autodiff<B>> {
        self.model.expect("the model is only absent inside `step`")
    }

    /// Optimizer step `step` (counting from 1) over the micro batches of one global batch. The
    /// loss, the norm and the clipping stay on the device; both values are read once, after the
    /// update is queued.
    pub fn step(&mut self, step: usize, micro_batches: &[Batch]) -> Result<StepStats> {
        let (loss_sum, tokens, mut grads, updated) = self.device_gradients(step, micro_batches)?;
        let norm = span::<B, _>("optimizer", &self.device, || self.global_norm(&grads))?;
        if let (Some(norm), true) = (&norm, self.clip > 0.0) {
            grads.clip_by_norm(norm, self.clip);
        }
        let lr = self.schedule.at(step);
        let model = self.model.take().ok_or_else(|| Error::Internal("trainer model missing".into()))?;
        let model = span::<B, _>("optimizer", &self.device, || self.optimizer.step(model, grads, lr));
        let model = match (&self.distributed_optimizer, updated) {
            (Some(zero), Some(updated)) => span::<B, _>("data_parallel", &self.device, || zero.all_gather::<B, _>(model, &updated, &self.device))?,
            _ => model,
        };
        self.model = Some(model);
        let norm = norm.unwrap_or_else(|| Tensor::<B, 1>::zeros([1], (&self.device, burn::tensor::DType::F32)));
        let [loss_sum, grad_norm] = read_f32(Tensor::cat(vec![loss_sum, norm], 0));
        let positions = micro_batches.iter().map(|b| b.batch_size * b.seq_len).sum();
        let memory = crate::backend::device_memory::<B>(&self.device);
        Ok(StepStats { loss: f64::from(loss_sum) / tokens as f64, lr, grad_norm: f64::from(grad_norm), tokens, positions, memory })
    }

    /// The global L2 norm of the gradients: under tensor parallelism the sharded ones' squares
    /// summed over the group first, so every rank has the one-device norm.
    /// Under expert parallelism each rank's experts' squares are summed over the expert group
    /// likewise.
    /// Under the distributed optimizer each rank holds its own parameters' gradients: their
    /// squares are summed over the data-parallel group (the experts' over the group holding
    /// copies of this rank's experts) first.
    fn global_norm(&self, grads: &Grads<B>) -> Result<Option<Tensor<B, 1>>> {
        let zero = self.distributed_optimizer.is_some();
        if self.tensor_parallel.is_none() && self.expert_parallel.is_none() && !zero {
            return Ok(grads.global_norm());
        }
        if grads.by_path.is_empty() && !zero {
            return Ok(None);
        }
        let tp_sharded = |p: &str| self.tensor_parallel.as_ref().is_some_and(|(_, placement)| placement.is_sharded(p));
        // Three classes, each one sum: this rank's tensor-parallel slices, its experts, the rest.
        let [sharded, experts, whole] = grads.sums_of_squares_by(&self.device, |p| match (tp_sharded(p), self.expert_parallel.is_some() && is_expert(p)) {
            (true, _) => 0,
            (false, true) => 1,
            (false, false) => 2,
        });
        let (sharded, experts, whole) = match (zero, &self.data_parallel) {
            (true, Some(dp)) => {
                let dense = B::collective(Tensor::cat(vec![sharded, whole], 0), Collective::AllReduce, dp)?;
                let experts = match &self.expert_parallel {
                    Some((_, expert_data)) => B::collective(experts, Collective::AllReduce, expert_data)?,
                    None => experts,
                };
                (dense.clone().narrow(0, 0, 1), experts, dense.narrow(0, 1, 1))
            }
            _ => (sharded, experts, whole),
        };
        let sharded = match &self.tensor_parallel {
            Some((tp, _)) => B::collective(sharded, Collective::AllReduce, &tp.comm)?,
            None => sharded,
        };
        let experts = match &self.expert_parallel {
            Some((ep, _)) => B::collective(experts, Collective::AllReduce, ep)?,
            None => experts,
        };
        Ok(Some((sharded + experts + whole).sqrt()))
    }

    /// The global batch's per-token loss and the summed gradients of every trainable
    /// parameter, by module path (before clipping).
    pub fn gradients(&self, step: usize, micro_batches: &[Batch]) -> Result<(f64, Grads<B>)> {
        let (loss_sum, tokens, grads, _) = self.device_gradients(step, micro_batches)?;
        Ok((f64::from(scalar_f32(loss_sum)) / tokens as f64, grads))
    }

    /// The global batch's summed loss (one f32 element, on the device), its trained tokens and
    /// the summed gradients (`micro_batches` are this rank's share of it); under the
    /// distributed optimizer only the owned parameters' gradients, with every gradient's path
    /// and size.
    #[allow(clippy::type_complexity)]
    fn device_gradients(&self, step: usize, micro_batches: &[Batch]) -> Result<(Tensor<B, 1>, usize, Grads<B>, Option<Vec<(String, usize)>>)> {
        let local: usize = micro_batches.iter().map(trained_tokens).sum();
        let tokens = match &self.data_parallel {
            Some(dp) => dp.communicator().all_to_all_counts(&vec![local; dp.group().size])?.iter().sum(),
            None => local,
        };
        if tokens == 0 {
            return Err(Error::data(format!("step {step}: its {} micro batches have no trained token", micro_batches.len())));
        }
        let model = self.model();
        let mut grads = Grads::<B>::default();
        let mut loss_sum: Option<Tensor<B, 1>> = None;
        for (k, b) in micro_batches.iter().enumerate() {
            let seed = stream_seed(self.seed, step, self.micro_batch_place.0 + k * self.micro_batch_place.1);
            let laid = self.sequence_layout(b);
            let t = upload(&laid, &self.device);
            let balance = self.router_balance(&laid);
            // The micro batch's load-balancing loss weighs `coef x its trained tokens`: the
            // step divides every sum by the global batch's trained tokens.
            let aux_weight = self.router_aux_loss_coef * trained_tokens(b) as f64;
            let sum = if self.recompute.is_empty() {
                let layers = |x: Tensor<Autodiff<B>, 3>, ctx: &SequenceContext<Autodiff<B>>| {
                    recompute::run_layers(&model.layers, 0, x, ctx, seed)
                };
                let split = self.split();
                let sum = span::<B, _>("forward", &self.device, || batch_loss(model, t, &layers, self.fused_cross_entropy, split, balance.clone()));
                let sum = match &balance {
                    Some(bal) => RouterBalance::plus_loss(sum, bal.take(), bal.weights(&self.device).as_ref(), aux_weight),
                    None => sum,
                };
                let value = sum.clone().inner();
                let g = span::<B, _>("backward", &self.device, || (sum / tokens as f64).backward());
                collect_grads(model, &g, &[], &mut grads);
                value
            } else {
                self.segmented(model, t, seed, 1.0 / tokens as f64, balance, aux_weight, &mut grads)?
            };
            self.check_collectives()?;
            let sum = sum.cast(burn::tensor::FloatDType::F32);
            loss_sum = Some(match loss_sum {
                Some(total) => total + sum,
                None => sum,
            });
        }
        let loss_sum = loss_sum.ok_or_else(|| Error::Internal("a step without micro batches".into()))?;
        if let Some((tp, placement)) = &self.tensor_parallel {
            grads = span::<B, _>("tensor_parallel", &self.device, || reduce_partial_grads(tp, placement, grads))?;
        }
        let Some(dp) = &self.data_parallel else { return Ok((loss_sum, tokens, grads, None)) };
        if let Some(zero) = &self.distributed_optimizer {
            return span::<B, _>("data_parallel", &self.device, || {
                let (loss_sum, grads, updated) = zero.reduce_scatter(grads, loss_sum)?;
                Ok((loss_sum, tokens, grads, Some(updated)))
            });
        }
        span::<B, _>("data_parallel", &self.device, || match &self.expert_parallel {
            // The experts' gradients are summed over the copies of this rank's experts; the
            // rest over the data-parallel replicas.
            Some((_, expert_data)) => {
                let (experts, dense) = grads.split_off(is_expert);
                let (loss_sum, dense) = all_reduce_bucket(dp, Some(loss_sum), dense)?;
                let (_, experts) = all_reduce_bucket(expert_data, None, experts)?;
                Ok((loss_sum.unwrap_or_else(|| unreachable!("the loss went in")), tokens, dense.merged(experts), None))
            }
            None => {
                let (loss_sum, grads) = all_reduce_bucket(dp, Some(loss_sum), grads)?;
                Ok((loss_sum.unwrap_or_else(|| unreachable!("the loss went in")), tokens, grads, None))
            }
        })
    }

    /// One micro batch's summed loss, its gradients (scaled by `scale`) added to `grads`, with
    /// the recompute groups replayed in backward; see [`recompute`] for the segment scheme.
    /// `balance`: where the MoE layers record their routers, `aux_weight` the weight of the micro
    /// batch's load-balancing loss; each layer's term joins the backward of its segment.
    fn segmented(
        &self,
        model: &CausalLm<Autodiff<B>>,
        t: BatchTensors<Autodiff<B>>,
        seed: u64,
        scale: f64,
        balance: Option<RouterBalance<Autodiff<B>>>,
        aux_weight: f64,
        grads: &mut Grads<B>,
    ) -> Result<Tensor<B, 1>> {
        let missing = || Error::Internal("a segment's input received no gradient".into());
        let (tp, ep) = self.split();
        // The recomputed MoE layers' first forward keeps its routing for their replay.
        let (memo, recording) = RoutingMemo::pair();
        let ctx = model
            .context(t.positions, Some(t.segments))
            .with_tensor_parallel(tp)
            .with_expert_parallel(ep)
            .with_router_balance(balance.clone())
            .with_routing_memo(Some(memo));
        let n = model.layers.len();
        let mut segments: Vec<(Range<usize>, bool)> = Vec::new();
        let mut i = 0;
        while i < n {
            match self.recompute.iter().find(|g| g.start == i) {
                Some(g) => segments.push((g.clone(), true)),
                None => {
                    let end = self.recompute.iter().map(|g| g.start).filter(|&s| s > i).min().unwrap_or(n);
                    segments.push((i..end, false));
                }
            }
            i = segments.last().map_or(n, |s| s.0.end);
        }
        // Forward: kept segments record their graph from a fresh leaf; recomputed ones only
        // their input.
        enum Saved<B: Backend> {
            Kept { input: Tensor<Autodiff<B>, 3>, output: Tensor<Autodiff<B>, 3>, routers: Vec<Tensor<Autodiff<B>, 1>> },
            Recomputed { input: Tensor<B, 3> },
        }
        let inner_ctx = ctx.inner().with_routing_memo(Some(recording));
        let embedded = model.embed_for_layers(t.ids, &ctx);
        let mut prev = embedded.clone().inner();
        let mut saved = Vec::with_capacity(segments.len());
        // The routers' summed probabilities of the layers recomputed later, for the loss value.
        let mut recomputed_routers: Vec<Tensor<B, 1>> = Vec::new();
        for (r, recomputed) in &segments {
            if *recomputed {
                // On the inner backend: no graph at all (see `lora::training_forward`).
                let plain: Vec<_> = model.layers[r.clone()].iter().map(|l| l.valid()).collect();
                let y = span::<B, _>("forward", &self.device, || {
                    crate::lora::training_forward(|| recompute::run_layers(&plain, r.start, prev.clone(), &inner_ctx, seed))
                });
                recomputed_routers.extend(inner_ctx.take_routers());
                saved.push(Saved::Recomputed { input: prev });
                prev = y;
            } else {
                let input = Tensor::from_inner(prev).require_grad();
                let output = span::<B, _>("forward", &self.device, || recompute::run_layers(&model.layers[r.clone()], r.start, input.clone(), &ctx, seed));
                prev = output.clone().inner();
                saved.push(Saved::Kept { input, output, routers: ctx.take_routers() });
            }
        }
        let h = Tensor::<Autodiff<B>, 3>::from_inner(prev).require_grad();
        let (value, g) = span::<B, _>("head", &self.device, || {
            let sum = model.head_loss(model.norm.forward(h.clone()), t.labels, self.fused_cross_entropy, &ctx);
            (sum.clone().inner(), (sum * scale).backward())
        });
        collect_grads(model, &g, &[], grads);
        // Every router is counted now: the load-balancing loss's weights, its value.
        let g_aux = balance.as_ref().and_then(|b| b.weights(&self.device));
        let kept = saved.iter().flat_map(|s| match s {
            Saved::Kept { routers, .. } => routers.iter().map(|t| t.clone().inner()).collect(),
            Saved::Recomputed { .. } => vec![],
        });
        let all: Vec<Tensor<B, 1>> = kept.chain(recomputed_routers).collect();
        let value = RouterBalance::plus_loss(value, all, g_aux.clone().map(|g| g.inner()).as_ref(), aux_weight);
        // A segment's routers' term in what its backward differentiates.
        let with_routers = |surrogate, routers| RouterBalance::plus_loss(surrogate, routers, g_aux.as_ref(), aux_weight * scale);
        let mut grad_out = h.grad(&g).ok_or_else(missing)?;
        // Backward, segment by segment from the head down.
        for ((r, _), s) in segments.iter().zip(saved).rev() {
            let (input, output, fresh, routers) = match s {
                Saved::Kept { input, output, routers } => (input, output, None, routers),
                Saved::Recomputed { input } => {
                    let input = Tensor::<Autodiff<B>, 3>::from_inner(input).require_grad();
                    let fresh: Vec<_> = model.layers[r.clone()].iter().map(|l| recompute::fresh_leaves(l.clone())).collect();
                    let output = span::<B, _>("recompute", &self.device, || recompute::run_layers(&fresh, r.start, input.clone(), &ctx, seed));
                    (input, output, Some(fresh), ctx.take_routers())
                }
            };
            let g = span::<B, _>("backward", &self.device, || with_routers((output * Tensor::from_inner(grad_out)).sum(), routers).backward());
            match fresh {
                None => collect_grads(model, &g, &[], grads),
                Some(layers) => {
                    for (j, l) in layers.iter().enumerate() {
                        collect_grads(l, &g, &["layers", &(r.start + j).to_string()], grads);
                    }
                }
            }
            grad_out = input.grad(&g).ok_or_else(missing)?;
        }
        if !embedded.clone().into_primitive().tensor().node.requirement.is_none() {
            let g = (embedded * Tensor::from_inner(grad_out)).sum().backward();
            collect_grads(model, &g, &[], grads);
        }
        Ok(value)
    }

    /// A record of the MoE layers' routers for `b`'s forward (its padding left out) when this
    /// run trains with the load-balancing loss.
    /// (On a model without routers nothing is recorded, so there is no loss.)
    fn router_balance(&self, b: &Batch) -> Option<RouterBalance<Autodiff<B>>> {
        (self.router_aux_loss_coef > 0.0).then(|| RouterBalance::new(Some(b.segment_ids.iter().map(|&s| s != 0).collect()), &self.device))
    }

    /// Mean per-token loss over `batches` without gradients; `(loss, tokens)`. Every rank of the
    /// tensor-parallel group evaluates the same batches at once.
    pub fn evaluate(&self, batches: &[Batch]) -> Result<(f64, usize)> {
        let model = self.model().valid();
        let mut sum = 0.0f64;
        let mut tokens = 0;
        for b in batches {
            let n = trained_tokens(b);
            if n == 0 {
                continue;
            }
            let layers = |mut x: Tensor<B, 3>, ctx: &crate::model::SequenceContext<B>| {
                for l in &model.layers {
                    x = l.forward(x, ctx);
                }
                x
            };
            let s = scalar_f32(batch_loss(&model, upload(&self.sequence_layout(b), &self.device), &layers, self.fused_cross_entropy, self.split(), None));
            sum += s as f64;
            tokens += n;
        }
        self.check_collectives()?;
        Ok((if tokens > 0 { sum / tokens as f64 } else { f64::NAN }, tokens))
    }
}

/// Every rank's gradients (and `loss_sum`, when given) summed over `group`, as one collective
/// over one flat f32 bucket (the gradients in path order, the same on every rank of one model,
/// then the loss).
fn all_reduce_bucket<B: TrainBackend>(group: &GroupComm<B::Wire>, loss_sum: Option<Tensor<B, 1>>, grads: Grads<B>) -> Result<(Option<Tensor<B, 1>>, Grads<B>)> {
    let Grads { by_path, scale } = grads;
    let sizes: Vec<(String, usize)> = by_path.iter().map(|(p, g)| (p.clone(), g.dims()[0])).collect();
    let mut parts: Vec<Tensor<B, 1>> = by_path.into_values().collect();
    let with_loss = loss_sum.is_some();
    parts.extend(loss_sum);
    if parts.is_empty() {
        return Ok((None, Grads { by_path: Default::default(), scale }));
    }
    let summed = B::collective(Tensor::cat(parts, 0), Collective::AllReduce, group)?;
    let mut offset = 0;
    let mut by_path = std::collections::BTreeMap::new();
    for (path, n) in sizes {
        by_path.insert(path, summed.clone().narrow(0, offset, n));
        offset += n;
    }
    Ok((with_loss.then(|| summed.narrow(0, offset, 1)), Grads { by_path, scale }))
}

/// Whether the parameter at `path` belongs to the experts of a MoE layer (one expert's, or
/// the layer's stacked expert adapters).
fn is_expert(path: &str) -> bool {
    path.contains(".moe.experts.") || crate::lora::stacked_factor(path).is_some()
}

/// The gradients that are partial sums on each rank of the tensor-parallel group (a factor
/// every rank holds whole but that saw only its slice of the work: [`GradPlacement`]) summed
/// over the group, as one collective over one flat bucket.
fn reduce_partial_grads<B: TrainBackend>(tp: &TensorParallel<B::Wire>, placement: &GradPlacement, grads: Grads<B>) -> Result<Grads<B>> {
    let (partial, rest) = grads.split_off(|p| placement.is_partial(p));
    let (_, partial) = all_reduce_bucket(&tp.comm, None, partial)?;
    Ok(rest.merged(partial))
}

/// The value of a one-element tensor as f32, read in the tensor's own dtype: `into_scalar`
/// would convert through the backend's float type (bf16 on a bf16 device) and round an f32 loss
/// sum to 3 significant digits.
pub(crate) fn scalar_f32<B: TrainBackend>(t: Tensor<B, 1>) -> f32 {
    let [v] = read_f32(t);
    v
}

/// The `N` values of a tensor as f32, in one read of the device (counted in
/// [`crate::backend::host_syncs`]); NaN where it holds fewer.
fn read_f32<B: TrainBackend, const N: usize>(t: Tensor<B, 1>) -> [f32; N] {
    crate::backend::count_host_syncs(1);
    let data = t.into_data().convert::<f32>();
    let values = data.as_slice::<f32>().unwrap_or(&[]);
    std::array::from_fn(|i| values.get(i).copied().unwrap_or(f32::NAN))
}
