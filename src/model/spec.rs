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
    /// optionally renormalised over the chosen k.
    Moe { num_experts: usize, top_k: usize, intermediate_size: usize, norm_topk_prob: bool },
}

/// Rotary inverse frequencies `1 / theta^(2i / dim)`, as transformers' default rope computes them.
pub fn default_inv_freq(theta: f64, head_dim: usize) -> Vec<f64> {
    (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64)).collect()
}

impl ArchSpec {
    /// Internal consistency a family's config must satisfy before anything is built.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::model(format!("{} config: {m}", self.family)));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_heads % self.num_kv_heads != 0 {
            return bad(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim % 2 != 0 || self.rope_inv_freq.len() != self.head_dim / 2 {
            return bad(format!("head_dim ({}) must be even for rotary embeddings", self.head_dim));
        }
        if self.layers.is_empty() || self.vocab_size == 0 || self.hidden_size == 0 {
            return bad("num_hidden_layers, vocab_size and hidden_size must be positive".into());
        }
        for (i, l) in self.layers.iter().enumerate() {
            if let MlpSpec::Moe { num_experts, top_k, .. } = l.mlp {
                if top_k == 0 || top_k > num_experts {
                    return bad(format!(
                        "layer {i}: num_experts_per_tok ({top_k}) must be between 1 and num_experts ({num_experts})"
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn num_moe_layers(&self) -> usize {
        self.layers.iter().filter(|l| matches!(l.mlp, MlpSpec::Moe { .. })).count()
    }
}
