//! The layers of a Llama/Qwen-shaped decoder, written once for every family and backend.
//!
//! Each layer is built from a [`Loader`] with its Hugging Face path, so the module tree follows
//! the checkpoint's key paths and loading needs no mapping table. Linear layers take a
//! [`Partition`] and load only the slice they own; the MoE block can own a subset of experts.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use crate::backend::TrainBackend;
use burn::tensor::{Bool, Int, Tensor};
use kernels_cubecl as ops;

use super::hf_names;
use super::router_balance::RouterBalance;
use super::routing_memo::RoutingMemo;
use super::spec::ArchSpec;
use super::weights::InitKind;
use crate::backend::profile::span;
use crate::error::Result;
use crate::lora::{ExpertAdapter, ExpertAdapters};
use std::ops::Range;
pub use super::linear::{JoinedWeight, Linear, Loader};
pub use super::moe::SparseMoe;
use crate::parallel::regions::GroupComm;
use crate::parallel::tensor::TensorParallel;
use crate::parallel::{Partition, ProcessGroup};

#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: TrainBackend> RmsNorm<B> {
    pub fn load(ld: &mut Loader<'_, B>, path: &str, len: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm { weight: ld.vector(&hf_names::weight(path), len, InitKind::Ones)?, eps })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        ops::fused_rms_norm(x, self.weight.val(), self.eps)
    }

    /// The residual add before the norm and the norm, in one pass: `(x + delta, norm(x + delta))`.
    pub fn forward_residual<const D: usize>(&self, x: Tensor<B, D>, delta: Tensor<B, D>) -> (Tensor<B, D>, Tensor<B, D>) {
        ops::fused_add_rms_norm(x, delta, self.weight.val(), self.eps)
    }
}

/// Causal self-attention with grouped-query heads, rotary positions, optional q/k bias and
/// optional per-head q/k RMSNorm. Under tensor parallelism the heads are split: q/k/v are
/// column-parallel, o is row-parallel.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    /// q's, k's and v's frozen weights side by side (their `weight`s are views of it), for the
    /// packed projection; `None` where the layers were built apart.
    pub qkv_weight: Option<JoinedWeight<B>>,
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    /// Heads held by this rank.
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: TrainBackend> Attention<B> {
    pub fn load(ld: &mut Loader<'_, B>, path: &str, spec: &ArchSpec, tp: ProcessGroup) -> Result<Self> {
        let (h, d) = (spec.hidden_size, spec.head_dim);
        let col = Partition::Column(tp);
        let [q, k, v, o] = hf_names::ATTENTION_PROJECTIONS.map(|name| hf_names::child(path, name));
        let parts = [(q.as_str(), spec.num_heads * d), (k.as_str(), spec.num_kv_heads * d), (v.as_str(), spec.num_kv_heads * d)];
        let ([q_proj, k_proj, v_proj], qkv_weight) = Linear::load_joined(ld, parts, h, spec.qkv_bias, col)?;
        let o_proj = Linear::load(ld, &o, spec.num_heads * d, h, false, Partition::Row(tp))?;
        let (q_norm, k_norm) = if spec.qk_norm {
            let [q_norm, k_norm] = hf_names::QK_NORMS.map(|name| hf_names::child(path, name));
            (Some(RmsNorm::load(ld, &q_norm, d, spec.rms_norm_eps)?), Some(RmsNorm::load(ld, &k_norm, d, spec.rms_norm_eps)?))
        } else {
            (None, None)
        };
        Ok(Attention {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            qkv_weight: Some(qkv_weight),
            q_norm,
            k_norm,
            num_heads: spec.num_heads / tp.size,
            num_kv_heads: spec.num_kv_heads / tp.size,
            head_dim: d,
        })
    }

    /// Under tensor parallelism the block is entered before q/k/v (this rank's heads, the whole
    /// sequence) and left after o ([`TensorParallel`]).
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → `[batch, seq, hidden]` (`seq`: this rank's sequence shard
    ///   under sequence parallelism)
    pub fn forward(&self, x: Tensor<B, 3>, ctx: &SequenceContext<B>) -> Tensor<B, 3> {
        let tp = ctx.tensor_parallel.as_ref();
        let x = match tp {
            Some(tp) => tp.enter(x),
            None => x,
        };
        let [b, s, _] = x.dims();
        let device = x.device();
        // Qwen3's per-head q/k norms sit between the projection and the rotary embedding.
        let packed = if self.q_norm.is_none() && self.k_norm.is_none() { self.forward_packed(x.clone(), ctx) } else { None };
        let y = packed.unwrap_or_else(|| self.forward_apart(x, ctx));
        let y = y.swap_dims(1, 2).reshape([b, s, self.num_heads * self.head_dim]);
        span::<B, _>("o_proj", &device, || self.o_proj.forward_row_parallel(y, tp))
    }

    /// The attention core's output `[batch, heads, seq, head_dim]` with q, k and v projected,
    /// normed and rotated each on its own.
    fn forward_apart(&self, x: Tensor<B, 3>, ctx: &SequenceContext<B>) -> Tensor<B, 4> {
        let device = x.device();
        let (q, k, v) = self.project(x, ctx);
        let scale = (self.head_dim as f64).powf(-0.5);
        // Blockwise with its own backward: never the [seq, seq] scores of all heads at once
        // (ctx.blocked is causal by construction).
        span::<B, _>("core", &device, || ops::memory_efficient_attention(q, k, v, scale, ctx.blocked.clone(), ops::AttentionOptions::CAUSAL))
    }

    /// q, k and v projected, normed (Qwen3's per-head norms) and q and k rotated.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → q `[batch, heads, seq, head_dim]`, k and v
    ///   `[batch, kv_heads, seq, head_dim]`
    pub(super) fn project(&self, x: Tensor<B, 3>, ctx: &SequenceContext<B>) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [b, s, _] = x.dims();
        let device = x.device();
        let heads = |t: Tensor<B, 3>, n: usize| t.reshape([b, s, n, self.head_dim]);
        let (q, k, v) = span::<B, _>("qkv_proj", &device, || {
            let q = heads(self.q_proj.forward(x.clone()), self.num_heads);
            let k = heads(self.k_proj.forward(x.clone()), self.num_kv_heads);
            (q, k, heads(self.v_proj.forward(x), self.num_kv_heads).swap_dims(1, 2))
        });
        let (q, k) = span::<B, _>("rope", &device, || {
            let (q, k) = match (&self.q_norm, &self.k_norm) {
                (Some(qn), Some(kn)) => (qn.forward(q), kn.forward(k)),
                _ => (q, k),
            };
            (ops::fused_rotary(q.swap_dims(1, 2), ctx.cos.clone(), ctx.sin.clone()), ops::fused_rotary(k.swap_dims(1, 2), ctx.cos.clone(), ctx.sin.clone()))
        });
        (q, k, v)
    }

    /// [`forward_apart`](Self::forward_apart) with q, k and v as one GEMM and one packed tensor
    /// up to the attention ([`ops::qkv`]): one `dx` GEMM in backward instead of three and their
    /// sum. `None` (nothing computed) when the three adapters cannot act as one.
    fn forward_packed(&self, x: Tensor<B, 3>, ctx: &SequenceContext<B>) -> Option<Tensor<B, 4>> {
        let [b, s, _] = x.dims();
        let device = x.device();
        let projections = [&self.q_proj, &self.k_proj, &self.v_proj];
        if !Linear::joinable(&projections, &device) {
            return None;
        }
        let projected = span::<B, _>("qkv_proj", &device, || Linear::forward_joined(&projections, self.qkv_weight.as_ref(), x));
        let layout = ops::QkvLayout { batch: b, seq: s, q_heads: self.num_heads, kv_heads: self.num_kv_heads, head_dim: self.head_dim };
        let packed = span::<B, _>("rope", &device, || ops::qkv_rotary(projected, ctx.cos.clone(), ctx.sin.clone(), layout));
        let scale = (self.head_dim as f64).powf(-0.5);
        Some(span::<B, _>("core", &device, || ops::qkv_attention(packed, layout, scale, ctx.blocked.clone(), ops::AttentionOptions::CAUSAL)))
    }
}

/// What every layer of one forward pass shares: the rotary tables of the tokens' positions, the
/// attention mask of their rows (causal, and per segment when rows are packed or padded), both
/// over the whole sequence, and the tensor-parallel group when the layout has one.
#[derive(Debug, Clone)]
pub struct SequenceContext<B: TrainBackend> {
    /// `[batch, 1, seq, head_dim]`.
    pub cos: Tensor<B, 4>,
    pub sin: Tensor<B, 4>,
    /// `[batch, 1, seq, seq]`, `true` where a query may not read a key.
    pub blocked: Tensor<B, 4, Bool>,
    /// `None` on one rank (or a tensor-parallel size of 1).
    pub tensor_parallel: Option<TensorParallel<B::Wire>>,
    /// The group MoE layers' experts are split over; `None` when they are not.
    pub expert_parallel: Option<GroupComm<B::Wire>>,
    /// Where MoE layers record their routers for the load-balancing loss; `None` when the pass
    /// has none.
    pub router_balance: Option<RouterBalance<B>>,
    /// Where recomputed MoE layers keep their routing for the replay (one side of
    /// [`RoutingMemo::pair`]); `None` when the pass recomputes nothing.
    pub routing_memo: Option<RoutingMemo<B>>,
}

impl<B: TrainBackend> SequenceContext<B> {
    /// # Shapes
    /// - `positions`, `segments`: `[batch, seq]`; `inv_freq`: `[head_dim / 2]`
    pub fn new(positions: Tensor<B, 2, Int>, segments: Option<Tensor<B, 2, Int>>, inv_freq: Tensor<B, 1>) -> Self {
        let [b, s] = positions.dims();
        let device = positions.device();
        let (cos, sin) = ops::rope_cos_sin(positions, inv_freq);
        SequenceContext { cos, sin, blocked: ops::attention_mask(segments, b, s, &device), tensor_parallel: None, expert_parallel: None, router_balance: None, routing_memo: None }
    }

    /// The same context with the layers split over `tp` (`None` or a group of one: not split).
    pub fn with_tensor_parallel(mut self, tp: Option<TensorParallel<B::Wire>>) -> Self {
        self.tensor_parallel = tp.filter(|tp| tp.size() > 1);
        self
    }

    /// The same context with MoE layers' experts split over `ep` (`None` or a group of one: not
    /// split).
    pub fn with_expert_parallel(mut self, ep: Option<GroupComm<B::Wire>>) -> Self {
        self.expert_parallel = ep.filter(|g| g.group().size > 1);
        self
    }

    /// The same context with MoE layers recording their routers in `balance`.
    pub fn with_router_balance(mut self, balance: Option<RouterBalance<B>>) -> Self {
        self.router_balance = balance;
        self
    }

    /// The same context with MoE layers keeping (or replaying) their routing in `memo`.
    pub fn with_routing_memo(mut self, memo: Option<RoutingMemo<B>>) -> Self {
        self.routing_memo = memo;
        self
    }

    /// The routers' summed probabilities the MoE layers recorded since the last call
    /// ([`RouterBalance::take`]); none without a record.
    pub fn take_routers(&self) -> Vec<Tensor<B, 1>> {
        self.router_balance.as_ref().map(RouterBalance::take).unwrap_or_default()
    }

    /// The embeddings' output as the first layer takes it: this rank's sequence shard under
    /// sequence parallelism.
    pub fn into_layers(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.tensor_parallel {
            Some(tp) => tp.scatter_sequence(x),
            None => x,
        }
    }

    /// The last layer's (normed) output as the head takes it: the whole sequence.
    pub fn out_of_layers(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.tensor_parallel {
            Some(tp) => tp.gather_sequence(x),
            None => x,
        }
    }

    /// The context on the inner backend (no graph), for the forward of recomputed layers.
    pub fn inner(&self) -> SequenceContext<B::InnerBackend>
    where
        B: burn::tensor::backend::AutodiffBackend,
        B::InnerBackend: TrainBackend<Wire = B::Wire>,
    {
        SequenceContext {
            cos: self.cos.clone().inner(),
            sin: self.sin.clone().inner(),
            blocked: self.blocked.clone().inner(),
            tensor_parallel: self.tensor_parallel.clone(),
            expert_parallel: self.expert_parallel.clone(),
            router_balance: self.router_balance.as_ref().map(RouterBalance::inner),
            // The recording side comes from the same pair as this context's (the caller's).
            routing_memo: None,
        }
    }
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`. gate/up column-parallel, down row-parallel.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
    /// gate's and up's frozen weights side by side (their `weight`s are views of it), for the
    /// packed projection; `None` where the layers were built apart.
    pub gate_up_weight: Option<JoinedWeight<B>>,
}

impl<B: TrainBackend> Mlp<B> {
    pub fn load(ld: &mut Loader<'_, B>, path: &str, hidden: usize, inter: usize, tp: ProcessGroup) -> Result<Self> {
        let [gate, up, down] = hf_names::MLP_PROJECTIONS.map(|name| hf_names::child(path, name));
        let ([gate_proj, up_proj], gate_up_weight) = Linear::load_joined(ld, [(gate.as_str(), inter), (up.as_str(), inter)], hidden, false, Partition::Column(tp))?;
        Ok(Mlp {
            gate_proj,
            up_proj,
            down_proj: Linear::load(ld, &down, inter, hidden, false, Partition::Row(tp))?,
            gate_up_weight: Some(gate_up_weight),
        })
    }

    /// Gate and up as one GEMM over their weights side by side when their adapters can act as
    /// one ([`Linear::forward_joined`]), SwiGLU reading the packed output (one gradient back,
    /// so one `dx` GEMM); else the two projections apart. Under tensor parallelism the block is
    /// entered before gate/up and left after down ([`TensorParallel`]).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>, tp: Option<&TensorParallel<B::Wire>>) -> Tensor<B, D> {
        let x = match tp {
            Some(tp) => tp.enter(x),
            None => x,
        };
        let device = x.device();
        let projections = [&self.gate_proj, &self.up_proj];
        let h = if Linear::joinable(&projections, &device) {
            let packed = span::<B, _>("gate_up_proj", &device, || Linear::forward_joined(&projections, self.gate_up_weight.as_ref(), x));
            span::<B, _>("swiglu", &device, || ops::fused_swiglu_packed(packed))
        } else {
            self.forward_apart(x)
        };
        span::<B, _>("down_proj", &device, || self.down_proj.forward_row_parallel(h, tp))
    }

    /// SwiGLU's input projections each on its own: `silu(gate(x)) * up(x)`.
    fn forward_apart<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let device = x.device();
        let (gate, up) = span::<B, _>("gate_up_proj", &device, || (self.gate_proj.forward(x.clone()), self.up_proj.forward(x)));
        span::<B, _>("swiglu", &device, || ops::fused_swiglu(gate, up))
    }

    /// Every expert's SwiGLU MLP at once: `x[e]` through `experts[e]`, each projection one
    /// batched GEMM over the experts' stacked weights (`stacked`: gate, up and down as loaded,
    /// when they still back the experts; else stacked on the call) plus the stacked adapters'
    /// term (`adapters`: the layer's, and which of its local experts `experts` are).
    ///
    /// # Shapes
    /// - `x`: `[experts, tokens, hidden]` → `[experts, tokens, hidden]`
    pub fn forward_stacked(experts: &[Mlp<B>], stacked: Option<[Tensor<B, 3>; 3]>, adapters: (&ExpertAdapters<B>, Range<usize>), x: Tensor<B, 3>) -> Tensor<B, 3> {
        let device = x.device();
        let projection = |f: fn(&Mlp<B>) -> &Linear<B>| experts.iter().map(f).collect::<Vec<_>>();
        let [gate_w, up_w, down_w] = stacked.map_or([None, None, None], |ws| ws.map(Some));
        let (adapters, range) = adapters;
        let adapted = |y: Tensor<B, 3>, adapter: Option<&ExpertAdapter<B>>, x: Tensor<B, 3>| match adapter {
            Some(a) => y + span::<B, _>("lora", &device, || a.forward(x, range.clone())),
            None => y,
        };
        let (gate, up) = (Linear::forward_stacked(&projection(|m| &m.gate_proj), gate_w, x.clone()), Linear::forward_stacked(&projection(|m| &m.up_proj), up_w, x.clone()));
        let (gate, up) = match (adapters.gate_proj.as_ref(), adapters.up_proj.as_ref()) {
            (Some(g), Some(u)) => {
                let (dg, du) = span::<B, _>("lora", &device, || ExpertAdapter::forward_pair(g, u, x, range.clone()));
                (gate + dg, up + du)
            }
            (g, u) => (adapted(gate, g, x.clone()), adapted(up, u, x)),
        };
        let h = ops::fused_swiglu(gate, up);
        adapted(Linear::forward_stacked(&projection(|m| &m.down_proj), down_w, h.clone()), adapters.down_proj.as_ref(), h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    use crate::lora::LoraAdapter;

    type Ad = burn::backend::Autodiff<crate::backend::Cpu>;

    fn random<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<Ad, D> {
        let n = shape.iter().product::<usize>();
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let values: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    fn linear(inp: usize, out: usize, bias: bool, adapter_rank: Option<usize>, seed: u64) -> Linear<Ad> {
        let lora = adapter_rank.map(|r| LoraAdapter {
            lora_a: Param::from_tensor(random([inp, r], seed + 1)),
            lora_b: Param::from_tensor(random([r, out], seed + 2)),
            scale: 2.0,
            dropout: 0.0,
        });
        let bias = bias.then(|| Param::from_tensor(random([out], seed + 3)));
        Linear { weight: Param::from_tensor(random([inp, out], seed)), bias, lora, partition: Partition::Replicated }
    }

    fn close(label: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{label}");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let err = got.iter().zip(want).fold(0f32, |m, (g, w)| m.max((g - w).abs())) / scale;
        assert!(err < 1e-5, "{label}: packed differs from apart by {err:.2e} of the largest value");
    }

    fn grad_values<const D: usize>(t: Tensor<Ad, D>, grads: &<Ad as burn::tensor::backend::AutodiffBackend>::Gradients) -> Vec<f32> {
        t.grad(grads).expect("a gradient").into_data().to_vec::<f32>().unwrap()
    }

    /// `linears` with frozen weights that are views of one joined tensor, as
    /// [`Linear::load_joined`] leaves them, and that tensor.
    fn frozen_and_joined<const N: usize>(linears: [Linear<Ad>; N]) -> ([Linear<Ad>; N], JoinedWeight<Ad>) {
        let joined = Tensor::cat(linears.iter().map(|l| l.weight.val()).collect(), 1).set_require_grad(false);
        let bias = linears.iter().map(|l| l.bias.as_ref().map(|b| b.val())).collect::<Option<Vec<_>>>().map(|b| Tensor::cat(b, 0).set_require_grad(false));
        let (views, joined) = JoinedWeight::split(joined, bias, linears.each_ref().map(|l| l.dims().1), Partition::Replicated);
        let mut adapters = linears.map(|l| l.lora).into_iter();
        (views.map(|view| Linear { lora: adapters.next().flatten(), ..view.no_grad() }), joined)
    }

    /// Gate and up as one GEMM and SwiGLU of the packed output give what the projections give
    /// apart: the output and the gradients of the input and of every adapter (gate and up of
    /// different ranks), with the weights concatenated on the call and with the joined weight
    /// kept from load time.
    #[test]
    fn packed_mlp_equals_the_projections_apart() {
        let (hidden, inter, b, s) = (10, 14, 2, 3);
        let gate_up = || [linear(hidden, inter, false, Some(3), 70), linear(hidden, inter, false, Some(2), 80)];
        let [gate_proj, up_proj] = gate_up();
        let concatenated = Mlp { gate_proj, up_proj, down_proj: linear(inter, hidden, false, Some(3), 90), gate_up_weight: None };
        let ([gate_proj, up_proj], joined) = frozen_and_joined(gate_up());
        let kept = Mlp { gate_proj, up_proj, down_proj: linear(inter, hidden, false, Some(3), 90), gate_up_weight: Some(joined) };
        for mlp in [concatenated, kept] {
            packed_mlp_case(&mlp, b, s, hidden);
        }
    }

    fn packed_mlp_case(mlp: &Mlp<Ad>, b: usize, s: usize, hidden: usize) {
        let upstream = random([b, s, hidden], 100);
        let outcome = |packed: bool| {
            let x = random([b, s, hidden], 110).require_grad();
            let y = if packed { mlp.forward(x.clone(), None) } else { mlp.down_proj.forward(mlp.forward_apart(x.clone())) };
            let grads = (y.clone() * upstream.clone()).sum().backward();
            let adapter = |l: &Linear<Ad>| l.lora.as_ref().map(|a| [grad_values(a.lora_a.val(), &grads), grad_values(a.lora_b.val(), &grads)]).expect("an adapter");
            (y.into_data().to_vec::<f32>().unwrap(), grad_values(x, &grads), [adapter(&mlp.gate_proj), adapter(&mlp.up_proj), adapter(&mlp.down_proj)])
        };
        let joins = Linear::joinable(&[&mlp.gate_proj, &mlp.up_proj], &Default::default());
        assert!(joins, "adapters without dropout join, so forward takes the packed path");
        let (want, got) = (outcome(false), outcome(true));
        close("output", &got.0, &want.0);
        close("dx", &got.1, &want.1);
        for (i, name) in ["gate", "up", "down"].iter().enumerate() {
            close(&format!("{name} dA"), &got.2[i][0], &want.2[i][0]);
            close(&format!("{name} dB"), &got.2[i][1], &want.2[i][1]);
        }
    }

    /// q, k and v as one GEMM, one adapter and one packed tensor give what the three layers give
    /// apart: the output and the gradients of the input, the adapters (an adapter on q and v,
    /// of different ranks, none on k) and the biases.
    #[test]
    fn packed_attention_equals_the_projections_apart() {
        let (hidden, heads, kv_heads, d, b, s) = (24, 4, 2, 6, 2, 5);
        let attn = Attention {
            q_proj: linear(hidden, heads * d, true, Some(3), 10),
            k_proj: linear(hidden, kv_heads * d, true, None, 20),
            v_proj: linear(hidden, kv_heads * d, true, Some(2), 30),
            o_proj: linear(heads * d, hidden, false, Some(3), 40),
            qkv_weight: None,
            q_norm: None,
            k_norm: None,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: d,
        };
        let positions = Tensor::<Ad, 1, Int>::arange(0..s as i64, &Default::default()).reshape([1, s]).expand([b, s]);
        let inv_freq = Tensor::from_data(TensorData::new((0..d / 2).map(|i| 1.0 / 100f32.powf(2.0 * i as f32 / d as f32)).collect::<Vec<_>>(), [d / 2]), &Default::default());
        let ctx = SequenceContext::new(positions, None, inv_freq);
        let upstream = random([b, s, hidden], 50);
        let outcome = |packed: bool| {
            let x = random([b, s, hidden], 60).require_grad();
            let y = if packed { attn.forward_packed(x.clone(), &ctx).expect("adapters without dropout join") } else { attn.forward_apart(x.clone(), &ctx) };
            let y = attn.o_proj.forward(y.swap_dims(1, 2).reshape([b, s, heads * d]));
            let grads = (y.clone() * upstream.clone()).sum().backward();
            let grad = |t: Tensor<Ad, 2>| t.grad(&grads).expect("a gradient").into_data().to_vec::<f32>().unwrap();
            let grad1 = |t: Tensor<Ad, 1>| t.grad(&grads).expect("a gradient").into_data().to_vec::<f32>().unwrap();
            let lora = |l: &Linear<Ad>| l.lora.as_ref().map(|a| [grad(a.lora_a.val()), grad(a.lora_b.val())]);
            let bias = |l: &Linear<Ad>| grad1(l.bias.as_ref().expect("bias").val());
            (
                y.into_data().to_vec::<f32>().unwrap(),
                x.grad(&grads).expect("dx").into_data().to_vec::<f32>().unwrap(),
                [lora(&attn.q_proj), lora(&attn.k_proj), lora(&attn.v_proj)],
                [bias(&attn.q_proj), bias(&attn.k_proj), bias(&attn.v_proj)],
            )
        };
        let (want, got) = (outcome(false), outcome(true));
        close("output", &got.0, &want.0);
        close("dx", &got.1, &want.1);
        for (i, name) in ["q", "k", "v"].iter().enumerate() {
            assert_eq!(got.2[i].is_some(), want.2[i].is_some(), "{name}: adapter");
            if let (Some(g), Some(w)) = (&got.2[i], &want.2[i]) {
                close(&format!("{name} dA"), &g[0], &w[0]);
                close(&format!("{name} dB"), &g[1], &w[1]);
            }
            close(&format!("{name} d bias"), &got.3[i], &want.3[i]);
        }
        // The same layers frozen, their weights and biases views of joined tensors kept from
        // load time: the packed path reads those.
        let ([q_proj, k_proj, v_proj], joined) = frozen_and_joined([attn.q_proj.clone(), attn.k_proj.clone(), attn.v_proj.clone()]);
        let kept = Attention { q_proj, k_proj, v_proj, qkv_weight: Some(joined), ..attn.clone() };
        assert!(kept.qkv_weight.as_ref().and_then(|j| j.backing(&[&kept.q_proj, &kept.k_proj, &kept.v_proj])).is_some());
        let x = random([b, s, hidden], 60).require_grad();
        let y = kept.forward_packed(x.clone(), &ctx).expect("adapters without dropout join");
        let y = kept.o_proj.forward(y.swap_dims(1, 2).reshape([b, s, heads * d]));
        let grads = (y.clone() * upstream.clone()).sum().backward();
        close("kept output", &y.into_data().to_vec::<f32>().unwrap(), &want.0);
        close("kept dx", &x.grad(&grads).expect("dx").into_data().to_vec::<f32>().unwrap(), &want.1);
    }
}
