//! The architecture a family compiles a config into: plain data, one entry per layer.
//!
//! Everything the generic decoder needs to build itself lives here, so a new family only maps
//! its config onto an [`ArchSpec`] (and names its weights) without writing model maths.

use serde::Serialize;

use crate::error::{Error, Result};

/// A decoder-only transformer with pre-norm blocks (Llama/Qwen shape).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArchSpec {
    pub family: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// Rotary inverse frequencies, `head_dim / 2` of them (the family applies any scaling).
    pub rope_inv_freq: Vec<f64>,
    pub max_position_embeddings: usize,
    /// Bias on the q/k/v projections (Qwen2).
    pub qkv_bias: bool,
    /// RMSNorm on each query and key head before rotary (Qwen3).
    pub qk_norm: bool,
    pub tie_word_embeddings: bool,
    /// Standard deviation of random initialisation (`initializer_range`).
    pub init_std: f64,
    /// Weight of the routers' load-balancing loss where a run trains the routers
    /// (`router_aux_loss_coef`; transformers' default 0.001). Unused by dense models.
    pub router_aux_loss_coef: f64,
    pub layers: Vec<LayerSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerSpec {
    pub mlp: MlpSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MlpSpec {
    /// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
    Dense { intermediate_size: usize },
    /// Sparse mixture of SwiGLU experts behind a linear router: softmax over experts, top-k,
    /// optionally renormalised over the chosen k. With `shared_expert_intermediate_size`
    /// (Qwen2-MoE) a SwiGLU shared expert of that width sees every token, scaled by
    /// `sigmoid(shared_expert_gate(x))`, and is added to the routed experts' sum.
    Moe {
        num_experts: usize,
        top_k: usize,
        intermediate_size: usize,
        norm_topk_prob: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        shared_expert_intermediate_size: Option<usize>,
    },
}

impl MlpSpec {
    /// Parameters of the shared expert and its gate (none without one), in u128 like
    /// [`ArchSpec::parameter_count`].
    pub fn shared_expert_params(&self, hidden: usize) -> u128 {
        match *self {
            MlpSpec::Moe { shared_expert_intermediate_size: Some(n), .. } => (3 * n as u128 + 1) * hidden as u128,
            _ => 0,
        }
    }
}

/// Rotary inverse frequencies `1 / theta^(2i / dim)`, as transformers' default rope computes them.
pub fn default_inv_freq(theta: f64, head_dim: usize) -> Vec<f64> {
    (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64)).collect()
}

/// The largest size of one dimension a config may give (16,777,216): every GEMM dimension fits
/// cuBLAS's 32-bit sizes with room, and products of two stay far from overflow. Real models
/// stay below a million (vocabularies) and 200k (widths).
pub const MAX_DIM: usize = 1 << 24;
/// The most layers and the most experts a config may give; and the most expert modules
/// (layers x experts) over the model (Qwen3-235B-A22B has 12,032).
pub const MAX_LAYERS: usize = 4096;
pub const MAX_EXPERTS: usize = 4096;
pub const MAX_EXPERT_MODULES: usize = 1 << 18;
/// The most parameters a config may describe: 100 T, 200 TB of bf16 weights.
pub const MAX_PARAMS: u128 = 100_000_000_000_000;

impl ArchSpec {
    /// Internal consistency a family's config must satisfy before anything is built: every
    /// size positive and within [`MAX_DIM`], head dims even, norms' epsilon and rotary
    /// frequencies positive and finite, the init spread non-negative. Errors name the config
    /// key and what would be valid.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::model(format!("{} config: {m}", self.family)));
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("num_attention_heads x head_dim", self.num_heads.saturating_mul(self.head_dim)),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (key, v) in sizes {
            if v == 0 || v > MAX_DIM {
                return bad(format!("`{key}` is {v}; expected 1 to {MAX_DIM}"));
            }
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return bad(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim % 2 != 0 || self.rope_inv_freq.len() != self.head_dim / 2 {
            return bad(format!("`head_dim` is {}; rotary embeddings need an even head_dim, 2 or more", self.head_dim));
        }
        if self.layers.is_empty() || self.layers.len() > MAX_LAYERS {
            return bad(format!("`num_hidden_layers` is {}; expected 1 to {MAX_LAYERS}", self.layers.len()));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!("`rms_norm_eps` is {}; expected a small positive number such as 1e-6", self.rms_norm_eps));
        }
        if let Some(f) = self.rope_inv_freq.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
            return bad(format!("`rope_theta` gives a rotary frequency of {f}; expected a positive, finite rope_theta such as 10000"));
        }
        if !(self.init_std.is_finite() && self.init_std >= 0.0) {
            return bad(format!("`initializer_range` is {}; expected a standard deviation >= 0, such as 0.02", self.init_std));
        }
        for (i, l) in self.layers.iter().enumerate() {
            match l.mlp {
                MlpSpec::Dense { intermediate_size } if intermediate_size == 0 || intermediate_size > MAX_DIM => {
                    return bad(format!("layer {i}: `intermediate_size` is {intermediate_size}; expected 1 to {MAX_DIM}"));
                }
                MlpSpec::Moe { num_experts, top_k, intermediate_size, shared_expert_intermediate_size, .. } => {
                    if let Some(n) = shared_expert_intermediate_size.filter(|&n| n == 0 || n > MAX_DIM) {
                        return bad(format!("layer {i}: `shared_expert_intermediate_size` is {n}; expected 1 to {MAX_DIM}"));
                    }
                    if num_experts == 0 || num_experts > MAX_EXPERTS {
                        return bad(format!("layer {i}: `num_experts` is {num_experts}; expected 1 to {MAX_EXPERTS}"));
                    }
                    if intermediate_size == 0 || intermediate_size > MAX_DIM {
                        return bad(format!("layer {i}: `moe_intermediate_size` is {intermediate_size}; expected 1 to {MAX_DIM}"));
                    }
                    if top_k == 0 || top_k > num_experts {
                        return bad(format!(
                            "layer {i}: num_experts_per_tok ({top_k}) must be between 1 and num_experts ({num_experts})"
                        ));
                    }
                }
                MlpSpec::Dense { .. } => {}
            }
        }
        let experts: usize = self.layers.iter().map(|l| if let MlpSpec::Moe { num_experts, .. } = l.mlp { num_experts } else { 0 }).sum();
        if experts > MAX_EXPERT_MODULES {
            return bad(format!("{experts} experts over {} layers; expected at most {MAX_EXPERT_MODULES} in all", self.layers.len()));
        }
        let params = self.parameter_count();
        if params > MAX_PARAMS {
            return bad(format!(
                "these sizes describe {params} parameters ({:.1e}); expected a model of at most {MAX_PARAMS:.1e} (check hidden_size, \
                 intermediate_size, vocab_size and num_hidden_layers)",
                params as f64
            ));
        }
        Ok(())
    }

    /// Parameters of the whole model (embeddings, every linear, norms), in u128 so that no
    /// config can overflow it.
    pub fn parameter_count(&self) -> u128 {
        let (h, v, d) = (self.hidden_size as u128, self.vocab_size as u128, self.head_dim as u128);
        let attn = h * d * (self.num_heads as u128 * 2 + self.num_kv_heads as u128 * 2) + 2 * h;
        let mlp: u128 = self
            .layers
            .iter()
            .map(|l| match l.mlp {
                MlpSpec::Dense { intermediate_size } => 3 * h * intermediate_size as u128,
                MlpSpec::Moe { num_experts, intermediate_size, .. } => {
                    num_experts as u128 * (3 * h * intermediate_size as u128 + h) + l.mlp.shared_expert_params(self.hidden_size)
                }
            })
            .sum();
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + head + attn * self.layers.len() as u128 + mlp + h
    }

    pub fn num_moe_layers(&self) -> usize {
        self.layers.iter().filter(|l| matches!(l.mlp, MlpSpec::Moe { .. })).count()
    }
}
