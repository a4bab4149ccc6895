//! Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2 attention (q/k/v bias, no q/k norms),
//! and on sparse layers Qwen3-MoE's routed experts (the same sparse-layer rule;
//! `norm_topk_prob` off by default) plus a shared SwiGLU expert of
//! `shared_expert_intermediate_size` that every token goes through, scaled by
//! `sigmoid(shared_expert_gate(x))`.

use super::family::ModelFamily;
use super::hf_config::HfConfig;
use super::llama_like::{default_rope, read_llama_like};
use super::qwen3_moe::QwenMoeKeys;
use super::spec::{ArchSpec, MlpSpec};
use crate::error::Result;

pub struct Qwen2Moe;

impl ModelFamily for Qwen2Moe {
    fn name(&self) -> &'static str {
        "qwen2_moe"
    }
    fn description(&self) -> &'static str {
        "Qwen1.5 / Qwen2 mixture of experts (q/k/v bias, router softmax, top-k, sigmoid-gated shared expert)"
    }
    fn hf_architecture(&self) -> Option<&'static str> {
        Some("Qwen2MoeForCausalLM")
    }
    fn model_types(&self) -> &'static [&'static str] {
        &["qwen2_moe"]
    }
    fn arch(&self, cfg: &HfConfig) -> Result<ArchSpec> {
        let moe = QwenMoeKeys::read(cfg)?;
        // transformers 4 always has the bias; 5 writes `qkv_bias` (true by default).
        let bias = cfg.get_or("qkv_bias", true)?;
        read_llama_like(cfg, self.name(), bias, false, default_rope, |i| {
            let mut mlp = moe.layer(cfg, i)?;
            if let MlpSpec::Moe { shared_expert_intermediate_size, .. } = &mut mlp {
                // Required: transformers would silently fall back to Qwen1.5-MoE's 5632.
                *shared_expert_intermediate_size = Some(cfg.get("shared_expert_intermediate_size")?);
            }
            Ok(mlp)
        })
    }
}
