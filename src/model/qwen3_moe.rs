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
        let experts: usize = cfg.get("num_experts")?;
        let top_k: usize = cfg.get("num_experts_per_tok")?;
        let moe_inter: usize = cfg.get("moe_intermediate_size")?;
        let norm: bool = cfg.get_or("norm_topk_prob", false)?;
        let step: usize = cfg.get_or("decoder_sparse_step", 1)?;
        let mlp_only: Vec<usize> = cfg.get_or("mlp_only_layers", Vec::new())?;
        let dense_inter: Option<usize> = cfg.opt("intermediate_size")?;
        let bias = cfg.get_or("attention_bias", false)?;
        read_llama_like(cfg, self.name(), bias, true, default_rope, |i| {
            let sparse = !mlp_only.contains(&i) && experts > 0 && step > 0 && (i + 1) % step == 0;
            Ok(if sparse {
                MlpSpec::Moe { num_experts: experts, top_k, intermediate_size: moe_inter, norm_topk_prob: norm }
            } else {
                MlpSpec::Dense { intermediate_size: dense_inter.ok_or_else(|| {
                    crate::error::Error::model(format!(
                        "{}: layer {i} is dense (mlp_only_layers / decoder_sparse_step) but `intermediate_size` is missing",
                        cfg.source
                    ))
                })? }
            })
        })
    }
}
