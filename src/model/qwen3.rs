//! Qwen3 dense models: GQA attention without bias, RMSNorm on every query and key head before
//! rotary, an explicit `head_dim`, SwiGLU MLP.

use super::family::ModelFamily;
use super::hf_config::HfConfig;
use super::llama_like::{default_rope, read_llama_like};
use super::spec::{ArchSpec, MlpSpec};
use crate::error::Result;

pub struct Qwen3;

impl ModelFamily for Qwen3 {
    fn name(&self) -> &'static str {
        "qwen3"
    }
    fn description(&self) -> &'static str {
        "Qwen3 dense (GQA, per-head q/k RMSNorm, no bias)"
    }
    fn hf_architecture(&self) -> Option<&'static str> {
        Some("Qwen3ForCausalLM")
    }
    fn model_types(&self) -> &'static [&'static str] {
        &["qwen3"]
    }
    fn arch(&self, cfg: &HfConfig) -> Result<ArchSpec> {
        let inter: usize = cfg.get("intermediate_size")?;
        let bias = cfg.get_or("attention_bias", false)?;
        read_llama_like(cfg, self.name(), bias, true, default_rope, |_| Ok(MlpSpec::Dense { intermediate_size: inter }))
    }
}
