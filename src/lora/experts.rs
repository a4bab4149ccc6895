//! LoRA on a mixture-of-experts layer's experts, stacked: one A `[experts, in, r]` and one B
//! `[experts, r, out]` a projection (peft's `target_parameters` adapts transformers 5's fused
//! experts the same way). Two parameters a projection instead of two an expert: the optimizer,
//! clipping and data-parallel reduction see 6 tensors a MoE layer, not 768, and the experts'
//! batched GEMMs read the factors in place instead of stacking 128 adapters on every call.
//!
//! Checkpoints still hold peft's per-expert tensors ([`crate::train::names::expert_adapter_name`]):
//! the stack is split on the way out and filled on the way in (`train::checkpoints`).

use std::ops::Range;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use super::adapter::{dropout_active, dropout_mask, LoraAdapter, LoraConfig};
use crate::backend::TrainBackend;
use kernels_cubecl::layer_ops::to_dtype;

/// The projections of a SwiGLU expert, in the order the stacks are kept.
pub const EXPERT_PROJECTIONS: [&str; 3] = crate::model::hf_names::MLP_PROJECTIONS;

/// The adapters of one projection of a MoE layer's local experts, stacked. An expert the
/// targets do not adapt holds zeros in both factors: its term is zero, and so are its
/// gradients, so AdamW leaves it at zero (zero moments, zero decay) and it stays unadapted.
#[derive(Module, Debug)]
pub struct ExpertAdapter<B: Backend> {
    /// `[local experts, in, rank]`: each expert's peft `lora_A.weight` (`[rank, in]`) transposed.
    pub lora_a: Param<Tensor<B, 3>>,
    /// `[local experts, rank, out]`: each expert's peft `lora_B.weight` (`[out, rank]`) transposed.
    pub lora_b: Param<Tensor<B, 3>>,
    pub scale: f64,
    pub dropout: f64,
    /// Which of the layer's experts (all of them, global indices, whatever this rank holds)
    /// the targets adapt: the ones a checkpoint holds.
    #[module(skip)]
    pub adapted: Vec<bool>,
}

/// A MoE layer's expert adapters, a projection each (`None`: not adapted).
#[derive(Module, Debug)]
pub struct ExpertAdapters<B: Backend> {
    pub gate_proj: Option<ExpertAdapter<B>>,
    pub up_proj: Option<ExpertAdapter<B>>,
    pub down_proj: Option<ExpertAdapter<B>>,
}

impl<B: Backend> ExpertAdapters<B> {
    pub fn none() -> Self {
        ExpertAdapters { gate_proj: None, up_proj: None, down_proj: None }
    }

    /// The adapter of `projection` (one of [`EXPERT_PROJECTIONS`]).
    pub fn get(&self, projection: &str) -> Option<&ExpertAdapter<B>> {
        match projection {
            "gate_proj" => self.gate_proj.as_ref(),
            "up_proj" => self.up_proj.as_ref(),
            "down_proj" => self.down_proj.as_ref(),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, projection: &str) -> Option<&mut Option<ExpertAdapter<B>>> {
        match projection {
            "gate_proj" => Some(&mut self.gate_proj),
            "up_proj" => Some(&mut self.up_proj),
            "down_proj" => Some(&mut self.down_proj),
            _ => None,
        }
    }
}

impl<B: TrainBackend> ExpertAdapter<B> {
    /// Fresh adapters for the local experts `local` (global indices) of a layer with
    /// `num_experts`, `paths[g]` being expert `g`'s module path and `adapted[g]` whether the
    /// targets adapt it: each adapted expert's A drawn from its own path's stream, as
    /// [`LoraAdapter::init`] draws it (so stacking changes no value), B zero.
    pub fn init(cfg: &LoraConfig, paths: &[String], adapted: Vec<bool>, local: Range<usize>, inp: usize, out: usize, device: &B::Device) -> Self {
        let rank = cfg.rank;
        let mut a = vec![0.0f32; local.len() * inp * rank];
        for (block, g) in a.chunks_mut(inp * rank).zip(local.clone()) {
            if adapted[g] {
                block.copy_from_slice(&LoraAdapter::<B>::init_a(cfg, &paths[g], inp));
            }
        }
        let f32_tensor = |data: Vec<f32>, shape: [usize; 3]| Tensor::<B, 3>::from_data(TensorData::new(data, shape), (device, DType::F32));
        ExpertAdapter {
            lora_a: Param::from_tensor(f32_tensor(a, [local.len(), inp, rank])),
            lora_b: Param::from_tensor(f32_tensor(vec![0.0; local.len() * rank * out], [local.len(), rank, out])),
            scale: cfg.scale,
            dropout: cfg.dropout,
            adapted,
        }
    }

    /// `s * (dropout(x[e]) A_e) B_e` for the local experts `experts` (`x[e]` for expert
    /// `experts.start + e`), as two batched GEMMs over the stacked factors in `x`'s dtype.
    ///
    /// # Shapes
    /// - `x`: `[experts, tokens, in]` → `[experts, tokens, out]`
    pub fn forward(&self, x: Tensor<B, 3>, experts: Range<usize>) -> Tensor<B, 3> {
        self.term(x, self.factors(experts), B::batched_matmul)
    }

    /// [`forward`](Self::forward) of two adapters that read the same input (an expert's gate
    /// and up projections) with one product with both As side by side (`[experts, in, r1 +
    /// r2]`): the rows are read once, not twice, forward and backward. Apart when either draws
    /// dropout (each its own mask, as peft draws them).
    pub fn forward_pair(first: &Self, second: &Self, x: Tensor<B, 3>, experts: Range<usize>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        Self::pair(first, second, x, [first.factors(experts.clone()), second.factors(experts)], B::batched_matmul)
    }

    /// [`forward`](Self::forward) on rows laid out expert after expert (`counts[e]` rows of
    /// local expert `e`, every local expert counted): two grouped GEMMs over the stacked
    /// factors, no expert padded to another's rows.
    ///
    /// # Shapes
    /// - `x`: `[sum(counts), in]` → `[sum(counts), out]`
    pub fn forward_grouped(&self, x: Tensor<B, 2>, counts: &[usize]) -> Tensor<B, 2> {
        self.term(x, [self.lora_a.val(), self.lora_b.val()], |h, w| B::grouped_matmul(h, w, counts))
    }

    /// [`forward_pair`](Self::forward_pair) on rows laid out expert after expert, as
    /// [`forward_grouped`](Self::forward_grouped).
    pub fn forward_grouped_pair(first: &Self, second: &Self, x: Tensor<B, 2>, counts: &[usize]) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let factors = [[first.lora_a.val(), first.lora_b.val()], [second.lora_a.val(), second.lora_b.val()]];
        Self::pair(first, second, x, factors, |h, w| B::grouped_matmul(h, w, counts))
    }

    /// `s * (dropout(x) A) B` in `x`'s dtype (the factors cast to it; GEMMs accumulate in f32),
    /// `product` multiplying each expert's rows by its factor (batched over padded runs, or
    /// grouped). In bf16 on a GPU, as unsloth runs its LoRA products: an f32 copy of the
    /// experts' `[slots, in]` rows and f32 GEMMs without tensor cores cost more than the
    /// experts' own bf16 GEMMs (session 25's ncu).
    fn term<const D: usize>(&self, x: Tensor<B, D>, [a, b]: [Tensor<B, 3>; 2], product: impl Fn(Tensor<B, D>, Tensor<B, 3>) -> Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let (h, scale) = match dropout_mask::<B, D>(self.dropout, x.shape(), &x.device(), dtype) {
            Some((kept, keep)) => (x * kept, self.scale / keep),
            None => (x, self.scale),
        };
        // The scale applied to the rank-r product, not the [.., out] one: one pass over `rank`
        // columns instead of `out` (forward and backward).
        product(product(h, to_dtype(a, dtype)) * scale, to_dtype(b, dtype))
    }

    /// The terms of `first` and `second` on the same `x` ([`forward_pair`](Self::forward_pair)),
    /// each with its `[A, B]` of `factors`.
    fn pair<const D: usize>(
        first: &Self,
        second: &Self,
        x: Tensor<B, D>,
        [[a1, b1], [a2, b2]]: [[Tensor<B, 3>; 2]; 2],
        product: impl Fn(Tensor<B, D>, Tensor<B, 3>) -> Tensor<B, D>,
    ) -> (Tensor<B, D>, Tensor<B, D>) {
        if dropout_active::<B>(first.dropout, &x.device()) || dropout_active::<B>(second.dropout, &x.device()) {
            return (first.term(x.clone(), [a1, b1], &product), second.term(x, [a2, b2], &product));
        }
        let (r1, r2) = (a1.dims()[2], a2.dims()[2]);
        let dtype = x.dtype();
        let h = product(x, to_dtype(Tensor::cat(vec![a1, a2], 2), dtype));
        let y1 = product(h.clone().narrow(D - 1, 0, r1) * first.scale, to_dtype(b1, dtype));
        let y2 = product(h.narrow(D - 1, r1, r2) * second.scale, to_dtype(b2, dtype));
        (y1, y2)
    }

    /// A and B of the local experts `experts`.
    fn factors(&self, experts: Range<usize>) -> [Tensor<B, 3>; 2] {
        let (a, b) = (self.lora_a.val(), self.lora_b.val());
        match experts.len() == a.dims()[0] {
            true => [a, b],
            false => [a.narrow(0, experts.start, experts.len()), b.narrow(0, experts.start, experts.len())],
        }
    }

    /// `s * A_e B_e` of local expert `e`: what merging adds to its base weight (`[in, out]`).
    pub fn delta(&self, e: usize) -> Tensor<B, 2> {
        let ([_, inp, rank], [_, _, out]) = (self.lora_a.val().dims(), self.lora_b.val().dims());
        let a = self.lora_a.val().narrow(0, e, 1).reshape([inp, rank]);
        a.matmul(self.lora_b.val().narrow(0, e, 1).reshape([rank, out])) * self.scale
    }
}

/// `(layer, projection, factor)` of the Burn path of a stacked expert factor
/// (`layers.3.moe.expert_lora.up_proj.lora_a` → `(3, "up_proj", "lora_a")`).
pub fn stacked_factor(path: &str) -> Option<(usize, &str, &str)> {
    let (layer, projection, factor) = crate::model::hf_names::burn_paths::expert_lora_of(path)?;
    (EXPERT_PROJECTIONS.contains(&projection) && matches!(factor, "lora_a" | "lora_b")).then_some((layer, projection, factor))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Ad = burn::backend::Autodiff<crate::backend::Cpu>;

    #[test]
    fn stacked_paths_name_layer_projection_and_factor() {
        assert_eq!(stacked_factor("layers.3.moe.expert_lora.up_proj.lora_a"), Some((3, "up_proj", "lora_a")));
        assert_eq!(stacked_factor("layers.12.moe.expert_lora.down_proj.lora_b"), Some((12, "down_proj", "lora_b")));
        assert_eq!(stacked_factor("layers.3.moe.experts.5.up_proj.lora.lora_a"), None);
        assert_eq!(stacked_factor("layers.3.moe.expert_lora.q_proj.lora_a"), None);
    }

    /// The stacked adapter of experts 2..5 (expert 3 not adapted) computes, expert by expert,
    /// what the experts' own adapters compute; the unadapted expert's term and gradients are
    /// zero.
    #[test]
    fn stacked_adapter_is_each_experts_adapter() {
        let device = Default::default();
        let cfg = LoraConfig { rank: 2, scale: 1.5, dropout: 0.0, seed: 4 };
        let (inp, out, tokens) = (6, 5, 3);
        let paths: Vec<String> = (0..6).map(|g| format!("model.layers.0.mlp.experts.{g}.up_proj")).collect();
        let adapted = vec![true, true, true, false, true, true];
        let mut stacked = ExpertAdapter::<Ad>::init(&cfg, &paths, adapted, 2..5, inp, out, &device);
        let b = Tensor::<Ad, 3>::random([3, 2, out], burn::tensor::Distribution::Normal(0.0, 1.0), &device);
        stacked.lora_b = Param::from_tensor(b * Tensor::from_data(TensorData::new(vec![1.0f32, 0.0, 1.0], [3, 1, 1]), &device));
        let x = Tensor::<Ad, 3>::random([2, tokens, inp], burn::tensor::Distribution::Normal(0.0, 1.0), &device);
        // Experts 3 and 4 (local 1..3).
        let y = stacked.forward(x.clone(), 1..3);
        let grads = y.clone().sum().backward();
        let ga = stacked.lora_a.val().grad(&grads).unwrap();
        for (k, g) in [(0, 3), (1, 4)] {
            let own = LoraAdapter::<Ad>::init(&cfg, &paths[g], inp, out, &device);
            let a = stacked.lora_a.val().narrow(0, k + 1, 1).reshape([inp, 2]);
            let want_a = if g == 3 { own.lora_a.val().zeros_like() } else { own.lora_a.val() };
            assert_eq!(a.into_data().to_vec::<f32>().unwrap(), want_a.into_data().to_vec::<f32>().unwrap(), "expert {g}'s A");
            let xk = x.clone().narrow(0, k, 1).reshape([tokens, inp]);
            let want = xk.matmul(stacked.delta(k + 1));
            let got = y.clone().narrow(0, k, 1).reshape([tokens, out]);
            let err = (got - want).abs().max().into_scalar();
            assert!(err < 1e-5, "expert {g}: {err}");
        }
        // Paired with another adapter on the same input: each term as on its own.
        let mut other = ExpertAdapter::<Ad>::init(&LoraConfig { rank: 3, scale: 0.5, ..cfg }, &paths, vec![true; 6], 2..5, inp, 4, &device);
        other.lora_b = Param::from_tensor(Tensor::random([3, 3, 4], burn::tensor::Distribution::Normal(0.0, 1.0), &device));
        let (p1, p2) = ExpertAdapter::forward_pair(&stacked, &other, x.clone(), 1..3);
        for (got, want) in [(p1, y.clone()), (p2, other.forward(x.clone(), 1..3))] {
            let err = (got - want.clone()).abs().max().into_scalar() / want.abs().max().into_scalar();
            assert!(err < 1e-5, "paired term differs by {err}");
        }
        let g3 = ga.clone().narrow(0, 1, 1).abs().sum().into_scalar();
        assert_eq!(g3, 0.0, "the unadapted expert's A gets no gradient");
        assert_eq!(ga.narrow(0, 0, 1).abs().sum().into_scalar(), 0.0, "an expert outside the run gets none");
    }
}
