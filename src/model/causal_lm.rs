//! The decoder-only language model every registered family builds: embedding, a stack of
//! pre-norm blocks (attention, then a dense or sparse MLP), a final norm and the LM head.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use crate::backend::TrainBackend;
use burn::tensor::{Int, Tensor, TensorData};
use kernels_cubecl as ops;

use super::hf_names::{self, burn_paths};
use super::layers::{Attention, Linear, Loader, Mlp, RmsNorm, SequenceContext, SparseMoe};
use super::spec::{ArchSpec, MlpSpec};
use super::weights::InitKind;
use crate::backend::profile;
use crate::error::Result;
use crate::parallel::tensor::GradPlacement;
use crate::parallel::{Layout, Partition};

/// Tokens whose label is this value do not count in the loss (transformers' convention).
pub const IGNORE_INDEX: i64 = -100;

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    /// Exactly one of `mlp` (dense) and `moe` (sparse) is present; both live under the
    /// checkpoint path `mlp`.
    pub mlp: Option<Mlp<B>>,
    pub moe: Option<SparseMoe<B>>,
}

impl<B: TrainBackend> DecoderLayer<B> {
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>, ctx: &SequenceContext<B>) -> Tensor<B, 3> {
        let device = x.device();
        let normed = profile::span::<B, _>("norm", &device, || self.input_layernorm.forward(x.clone()));
        let attended = profile::span::<B, _>("attention", &device, || self.self_attn.forward(normed, ctx));
        let (h, normed) = profile::span::<B, _>("norm", &device, || self.post_attention_layernorm.forward_residual(x, attended));
        h + profile::span::<B, _>("mlp", &device, || self.feed_forward(normed, ctx))
    }

    /// The dense or sparse MLP of the normed input.
    ///
    /// # Shapes
    /// - `normed`: `[batch, seq, hidden]` → `[batch, seq, hidden]`
    pub(super) fn feed_forward(&self, normed: Tensor<B, 3>, ctx: &SequenceContext<B>) -> Tensor<B, 3> {
        match (&self.mlp, &self.moe) {
            (Some(mlp), _) => mlp.forward(normed, ctx.tensor_parallel.as_ref()),
            (None, Some(moe)) => {
                let [b, s, d] = normed.dims();
                moe.forward(normed.reshape([b * s, d]), ctx.expert_parallel.as_ref(), ctx.router_balance.as_ref(), ctx.routing_memo.as_ref()).reshape([b, s, d])
            }
            (None, None) => normed.zeros_like(),
        }
    }
}

#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    /// `[vocab, hidden]`.
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// Absent when the head is tied to the embedding.
    pub lm_head: Option<Linear<B>>,
    /// `[head_dim / 2]`, f32 on the device.
    pub rope_inv_freq: Tensor<B, 1>,
    /// Under a vocab-parallel layout (tensor parallelism over a vocabulary it divides), the
    /// first token id of this rank's block: `embed_tokens` holds those rows and the head those
    /// columns (Megatron's vocab-parallel embedding and head).
    #[module(skip)]
    pub vocab_start: Option<usize>,
}

impl<B: TrainBackend> CausalLm<B> {
    /// Build the model for `spec`, taking every weight from the loader, sharded by `layout`.
    pub fn load(ld: &mut Loader<'_, B>, spec: &ArchSpec, layout: Layout) -> Result<Self> {
        spec.check()?;
        let h = spec.hidden_size;
        let tp = layout.tensor;
        let vocab_block = (tp.size > 1 && spec.vocab_size.is_multiple_of(tp.size)).then(|| tp.block(spec.vocab_size));
        let embed = ld.host_tensor_rows(&hf_names::weight(hf_names::EMBED_TOKENS), &[spec.vocab_size, h], vocab_block.clone(), InitKind::Normal)?;
        let embed_tokens = Param::from_tensor(embed);
        let mut layers = Vec::with_capacity(spec.layers.len());
        for (i, l) in spec.layers.iter().enumerate() {
            let block = hf_names::mlp(i);
            let (mlp, moe) = match &l.mlp {
                MlpSpec::Dense { intermediate_size } => (Some(Mlp::load(ld, &block, h, *intermediate_size, layout.tensor)?), None),
                moe @ MlpSpec::Moe { .. } => (None, Some(SparseMoe::load(ld, &block, h, moe, layout.expert)?)),
            };
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::load(ld, &hf_names::input_layernorm(i), h, spec.rms_norm_eps)?,
                self_attn: Attention::load(ld, &hf_names::self_attn(i), spec, layout.tensor)?,
                post_attention_layernorm: RmsNorm::load(ld, &hf_names::post_attention_layernorm(i), h, spec.rms_norm_eps)?,
                mlp,
                moe,
            });
        }
        let norm = RmsNorm::load(ld, hf_names::FINAL_NORM, h, spec.rms_norm_eps)?;
        let lm_head = if spec.tie_word_embeddings {
            None
        } else {
            let partition = if vocab_block.is_some() { Partition::Column(tp) } else { Partition::Replicated };
            Some(Linear::load(ld, hf_names::LM_HEAD, h, spec.vocab_size, false, partition)?)
        };
        let inv: Vec<f32> = spec.rope_inv_freq.iter().map(|&f| f as f32).collect();
        let n = inv.len();
        let rope_inv_freq = Tensor::from_data(TensorData::new(inv, [n]), &ld.device);
        Ok(CausalLm { embed_tokens, layers, norm, lm_head, rope_inv_freq, vocab_start: vocab_block.map(|b| b.start) })
    }

    /// The model without the weights joined or stacked at load time (q/k/v's and gate/up's
    /// [`JoinedWeight`](super::layers::JoinedWeight), the experts'
    /// [`StackedExperts`](super::experts::StackedExperts)) that no longer back their layers'
    /// weights: weights that train (full tuning) or that a checkpoint replaced. Call it on the
    /// autodiff model before training, as [`Trainer::new`](crate::train::Trainer::new) does:
    /// the optimizer's steps keep a trained weight's parameter id, and on the inner backend
    /// (`valid()`: evaluation, the forward of recomputed layers) no weight says it trains, so
    /// a load-time copy kept beside it would pass there for the weight it was loaded as. Also
    /// frees the copies, which full tuning never reads.
    pub fn without_unbacked_joins(mut self) -> Self {
        for layer in &mut self.layers {
            let a = &mut layer.self_attn;
            if a.qkv_weight.as_ref().is_some_and(|j| j.backing(&[&a.q_proj, &a.k_proj, &a.v_proj]).is_none()) {
                a.qkv_weight = None;
            }
            let shared = layer.moe.as_mut().and_then(|m| m.shared_expert.as_mut());
            for mlp in layer.mlp.iter_mut().chain(shared) {
                if mlp.gate_up_weight.as_ref().is_some_and(|j| j.backing(&[&mlp.gate_proj, &mlp.up_proj]).is_none()) {
                    mlp.gate_up_weight = None;
                }
            }
            if let Some(moe) = layer.moe.as_mut() {
                if moe.stacked.as_ref().is_some_and(|s| s.backing(&moe.experts).is_none()) {
                    moe.stacked = None;
                }
            }
        }
        self
    }

    /// Final hidden states after the last norm.
    ///
    /// # Shapes
    /// - `input_ids`, `positions`: `[batch, seq]` → `[batch, seq, hidden]`
    pub fn hidden(&self, input_ids: Tensor<B, 2, Int>, positions: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.hidden_segmented(input_ids, positions, None)
    }

    /// Final hidden states of packed or padded rows: `segments` (`[batch, seq]`, rows numbered
    /// 1, 2, .. inside each sequence, padding 0) keeps attention inside each row.
    pub fn hidden_segmented(
        &self,
        input_ids: Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
        segments: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        let ctx = self.context(positions, segments);
        let mut x = ctx.into_layers(self.embed(input_ids));
        for layer in &self.layers {
            x = layer.forward(x, &ctx);
        }
        ctx.out_of_layers(self.norm.forward(x))
    }

    /// Token embeddings. `[batch, seq]` → `[batch, seq, hidden]`.
    pub fn embed(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        burn::tensor::module::embedding(self.embed_tokens.val(), input_ids)
    }

    /// The token embeddings as the first layer takes them ([`SequenceContext::into_layers`]).
    /// Under a vocab-parallel layout each rank looks up the ids in its block of the table (zero
    /// rows for the others) and the ranks' rows are summed as they leave the tensor-parallel
    /// region (reduce-scattered to the sequence shards under sequence parallelism).
    ///
    /// # Shapes
    /// - `input_ids`: `[batch, seq]` → `[batch, seq or seq / tp, hidden]`
    pub fn embed_for_layers(&self, input_ids: Tensor<B, 2, Int>, ctx: &SequenceContext<B>) -> Tensor<B, 3> {
        let (Some(start), Some(tp)) = (self.vocab_start, &ctx.tensor_parallel) else {
            return ctx.into_layers(self.embed(input_ids));
        };
        let [rows, _] = self.embed_tokens.val().dims();
        let (index, here) = crate::parallel::vocab::in_vocab_block(input_ids, start, rows);
        let found = burn::tensor::module::embedding(self.embed_tokens.val(), index);
        let dtype = found.dtype();
        tp.leave(found * here.float().cast(dtype).unsqueeze_dim(2))
    }

    /// The summed next-token loss of the last layer's normed output `normed` as it leaves the
    /// layers ([`next_token_loss`](Self::next_token_loss) after
    /// [`SequenceContext::out_of_layers`]). Under a vocab-parallel layout the head's columns are
    /// split: `normed` enters the tensor-parallel region (gathered from the sequence shards under
    /// sequence parallelism) and the loss comes from the vocab-parallel head and loss, chunked,
    /// without any rank forming the full-vocabulary logits
    /// ([`crate::parallel::vocab::vocab_parallel_linear_cross_entropy`]).
    pub fn head_loss(&self, normed: Tensor<B, 3>, labels: Tensor<B, 2, Int>, fused: bool, ctx: &SequenceContext<B>) -> Tensor<B, 1> {
        let (Some(start), Some(tp)) = (self.vocab_start, &ctx.tensor_parallel) else {
            return self.next_token_loss(ctx.out_of_layers(normed), labels, fused).sum;
        };
        let (w, trained) = match &self.lm_head {
            None => (self.embed_tokens.val().transpose(), self.embed_tokens.val().is_require_grad()),
            Some(head) => (head.weight.val(), head.weight.val().is_require_grad()),
        };
        let (h, target) = next_token_rows(tp.enter(normed), labels);
        crate::parallel::vocab::vocab_parallel_linear_cross_entropy(h, w, trained, target, start, IGNORE_INDEX, &tp.comm, None)
    }

    /// The rotary tables and attention mask every layer of a forward pass shares.
    pub fn context(&self, positions: Tensor<B, 2, Int>, segments: Option<Tensor<B, 2, Int>>) -> SequenceContext<B> {
        SequenceContext::new(positions, segments, self.rope_inv_freq.clone())
    }

    /// Logits over the vocabulary.
    ///
    /// # Shapes
    /// - `hidden`: `[batch, seq, hidden]` → `[batch, seq, vocab]`
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => hidden.matmul(self.embed_tokens.val().transpose().unsqueeze()),
        }
    }

    /// Next-token cross-entropy of the final (normed) hidden states, as [`causal_lm_loss`]
    /// computes it from logits. With `fused`, and a head without LoRA or bias, the loss comes
    /// from the hidden states and the head's weight through the fused kernel
    /// (`kernels_cubecl::fused_linear_cross_entropy`), chunked so the `[tokens, vocab]` logits
    /// are never resident; otherwise through the logits.
    ///
    /// # Shapes
    /// - `hidden`: `[batch, seq, hidden]`, `labels`: `[batch, seq]`
    pub fn next_token_loss(&self, hidden: Tensor<B, 3>, labels: Tensor<B, 2, Int>, fused: bool) -> ops::CrossEntropy<B> {
        let head = match &self.lm_head {
            None => Some(self.embed_tokens.val().transpose()),
            Some(head) if head.lora.is_none() && head.bias.is_none() => Some(head.weight.val()),
            Some(_) => None,
        };
        let (Some(w), true) = (head, fused) else {
            return causal_lm_loss(self.logits(hidden), labels);
        };
        let (h, target) = next_token_rows(hidden, labels);
        ops::fused_linear_cross_entropy(h, w, target, ops::LinearCrossEntropyOptions { ignore_index: IGNORE_INDEX, chunk_tokens: None })
    }

    /// Every linear layer with its Hugging Face module path ([`hf_names`], experts under their
    /// global index), in checkpoint order: what LoRA targets match against.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear<B>)> {
        let mut out: Vec<(String, &mut Linear<B>)> = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let a = &mut layer.self_attn;
            let p = hf_names::self_attn(i);
            for (name, l) in hf_names::ATTENTION_PROJECTIONS.into_iter().zip([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]) {
                out.push((hf_names::child(&p, name), l));
            }
            let p = hf_names::mlp(i);
            let (mlps, shared_gate): (Vec<(String, &mut Mlp<B>)>, _) = match (&mut layer.mlp, &mut layer.moe) {
                (Some(mlp), _) => (vec![(p.clone(), mlp)], None),
                (None, Some(moe)) => {
                    out.push((hf_names::router(&p), &mut moe.gate));
                    let first = moe.first_expert;
                    let experts = moe.experts.iter_mut().enumerate().map(|(e, m)| (hf_names::expert(&p, first + e), m));
                    let shared = moe.shared_expert.as_mut().map(|m| (hf_names::shared_expert(&p), m));
                    (experts.chain(shared).collect(), moe.shared_expert_gate.as_mut().map(|g| (hf_names::shared_expert_gate(&p), g)))
                }
                (None, None) => (vec![], None),
            };
            for (p, m) in mlps {
                for (name, l) in hf_names::MLP_PROJECTIONS.into_iter().zip([&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]) {
                    out.push((hf_names::child(&p, name), l));
                }
            }
            out.extend(shared_gate);
        }
        if let Some(head) = &mut self.lm_head {
            out.push((hf_names::LM_HEAD.to_string(), head));
        }
        out
    }

    /// Every linear layer with its Burn module path (`layers.3.moe.experts.7.up_proj`,
    /// `lm_head`): the paths gradients and optimizer state are keyed by.
    pub fn linears(&self) -> Vec<(String, &Linear<B>)> {
        let mut out: Vec<(String, &Linear<B>)> = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let a = &layer.self_attn;
            let p = burn_paths::self_attn(i);
            for (name, l) in hf_names::ATTENTION_PROJECTIONS.into_iter().zip([&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]) {
                out.push((hf_names::child(&p, name), l));
            }
            let mlps: Vec<(String, &Mlp<B>)> = match (&layer.mlp, &layer.moe) {
                (Some(mlp), _) => vec![(burn_paths::mlp(i), mlp)],
                (None, Some(moe)) => {
                    out.push((burn_paths::router(i), &moe.gate));
                    let experts = moe.experts.iter().enumerate().map(|(e, m)| (burn_paths::expert(i, e), m));
                    experts.chain(moe.shared_expert.as_ref().map(|m| (burn_paths::shared_expert(i), m))).collect()
                }
                (None, None) => vec![],
            };
            for (p, m) in mlps {
                for (name, l) in hf_names::MLP_PROJECTIONS.into_iter().zip([&m.gate_proj, &m.up_proj, &m.down_proj]) {
                    out.push((hf_names::child(&p, name), l));
                }
            }
            if let Some(gate) = layer.moe.as_ref().and_then(|m| m.shared_expert_gate.as_ref()) {
                out.push((burn_paths::shared_expert_gate(i), gate));
            }
        }
        if let Some(head) = &self.lm_head {
            out.push((hf_names::LM_HEAD.to_string(), head));
        }
        out
    }

    /// Where each parameter's gradient lives when the layers are split over a tensor-parallel
    /// group (see [`GradPlacement`]): the linear layers' slices as they were loaded, per-head
    /// norms (which see this rank's heads), and under sequence parallelism what runs on the
    /// sequence shard (the layers and the final norm).
    pub fn tensor_parallel_placement(&self, sequence_parallel: bool) -> GradPlacement {
        let mut p = GradPlacement { sequence_parallel, sequence_sharded: vec!["layers".into(), "norm".into()], ..Default::default() };
        if self.vocab_start.is_some() {
            p.sharded.insert("embed_tokens".into(), 0);
        }
        for (path, linear) in self.linears() {
            p.add_linear(&path, linear.partition);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let attn = &layer.self_attn;
            for (name, norm) in hf_names::QK_NORMS.into_iter().zip([&attn.q_norm, &attn.k_norm]) {
                if norm.is_some() && matches!(attn.o_proj.partition, Partition::Row(g) if g.size > 1) {
                    p.partial.insert(hf_names::weight(&hf_names::child(&burn_paths::self_attn(i), name)));
                }
            }
        }
        p
    }

    /// Logits for a batch of sequences starting at position 0.
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let positions = positions_like(&input_ids);
        self.logits(self.hidden(input_ids, positions))
    }
}

/// `[[0, 1, .., seq-1]; batch]` on the ids' device.
pub fn positions_like<B: TrainBackend>(input_ids: &Tensor<B, 2, Int>) -> Tensor<B, 2, Int> {
    let [b, s] = input_ids.dims();
    Tensor::<B, 1, Int>::arange(0..s as i64, &input_ids.device()).unsqueeze::<2>().expand([b, s])
}

/// Next-token cross-entropy as transformers' `ForCausalLM` computes it: position `t` predicts
/// label `t + 1`; labels equal to [`IGNORE_INDEX`] do not count. Returns the summed loss and the
/// number of counted tokens (divide for the mean).
///
/// # Shapes
/// - `logits`: `[batch, seq, vocab]`, `labels`: `[batch, seq]`
pub fn causal_lm_loss<B: TrainBackend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> ops::CrossEntropy<B> {
    let (pred, target) = next_token_rows(logits, labels);
    ops::cross_entropy(pred, target, IGNORE_INDEX)
}

/// Each position but the last with the label it predicts (the next position's), as rows.
///
/// # Shapes
/// - `x`: `[batch, seq, features]`, `labels`: `[batch, seq]` → `[batch (seq - 1), features]`,
///   `[batch (seq - 1)]`
fn next_token_rows<B: TrainBackend>(x: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> (Tensor<B, 2>, Tensor<B, 1, Int>) {
    let [b, s, f] = x.dims();
    (x.narrow(1, 0, s - 1).reshape([b * (s - 1), f]), labels.narrow(1, 1, s - 1).reshape([b * (s - 1)]))
}
