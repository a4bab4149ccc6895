//! Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3 attention, and on sparse layers a router
//! over `num_experts` SwiGLU experts, softmax then top-`num_experts_per_tok`, renormalised when
//! `norm_topk_prob`. A layer is sparse unless listed in `mlp_only_layers`, and only every
//! `decoder_sparse_step`-th layer is (transformers' rule: `(i + 1) % step == 0`).

use super::family::ModelFamily;
use super::hf_config::HfConfig;
use super::llama_like::{default_rope, read_llama_like};
use super::spec::{ArchSpec, MlpSpec};
use crate::error::Result;

pub struct Qwen3Moe;

impl ModelFamily for Qwen3Moe {
    fn name(&self) -> &'static str {
        "qwen3_moe"
    }
    fn description(&self) -> &'static str {
        "Qwen3 mixture of experts (router softmax, top-k, norm_topk_prob, per-layer sparse/dense)"
    }
    fn hf_architecture(&self) -> Option<&'static str> {
        Some("Qwen3MoeForCausalLM")
    }
    fn model_types(&self) -> &'static [&'static str] {
        &["qwen3_moe"]
    }
    fn arch(&self, cfg: &HfConfig) -> Result<ArchSpec> {
        let moe = QwenMoeKeys::read(cfg)?;
        let bias = cfg.get_or("attention_bias", false)?;
        read_llama_like(cfg, self.name(), bias, true, default_rope, |i| moe.layer(cfg, i))
    }
}

/// The mixture-of-experts keys the Qwen MoE families (Qwen2-MoE, Qwen3-MoE) read alike, and
/// transformers' rule for which layers are sparse.
pub(super) struct QwenMoeKeys {
    experts: usize,
    top_k: usize,
    moe_inter: usize,
    norm: bool,
    step: usize,
    mlp_only: Vec<usize>,
    dense_inter: Option<usize>,
}

impl QwenMoeKeys {
    pub(super) fn read(cfg: &HfConfig) -> Result<Self> {
        Ok(QwenMoeKeys {
            experts: cfg.get("num_experts")?,
            top_k: cfg.get("num_experts_per_tok")?,
            moe_inter: cfg.get("moe_intermediate_size")?,
            norm: cfg.get_or("norm_topk_prob", false)?,
            step: cfg.get_or("decoder_sparse_step", 1)?,
            mlp_only: cfg.get_or("mlp_only_layers", Vec::new())?,
            dense_inter: cfg.opt("intermediate_size")?,
        })
    }

    /// Layer `i`'s MLP: the routed experts (no shared expert) or the dense MLP.
    pub(super) fn layer(&self, cfg: &HfConfig, i: usize) -> Result<MlpSpec> {
        let sparse = !self.mlp_only.contains(&i) && self.experts > 0 && self.step > 0 && (i + 1).is_multiple_of(self.step);
        Ok(if sparse {
            MlpSpec::Moe {
                num_experts: self.experts,
                top_k: self.top_k,
                intermediate_size: self.moe_inter,
                norm_topk_prob: self.norm,
                shared_expert_intermediate_size: None,
            }
        } else {
            MlpSpec::Dense { intermediate_size: self.dense_inter.ok_or_else(|| {
                crate::error::Error::model(format!(
                    "{}: layer {i} is dense (mlp_only_layers / decoder_sparse_step) but `intermediate_size` is missing",
                    cfg.source
                ))
            })? }
        })
    }
}
