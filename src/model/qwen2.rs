//! Qwen2 / Qwen2.5 dense models: GQA attention with bias on q/k/v, SwiGLU MLP, RMSNorm,
//! rotary positions; tied embeddings in the small sizes.

use super::family::ModelFamily;
use super::hf_config::HfConfig;
use super::llama_like::{default_rope, read_llama_like};
use super::spec::{ArchSpec, MlpSpec};
use crate::error::Result;

pub struct Qwen2;

impl ModelFamily for Qwen2 {
    fn name(&self) -> &'static str {
        "qwen2"
    }
    fn description(&self) -> &'static str {
        "Qwen2 / Qwen2.5 dense (GQA, q/k/v bias, SwiGLU)"
    }
    fn hf_architecture(&self) -> Option<&'static str> {
        Some("Qwen2ForCausalLM")
    }
    fn model_types(&self) -> &'static [&'static str] {
        &["qwen2"]
    }
    fn arch(&self, cfg: &HfConfig) -> Result<ArchSpec> {
        let inter: usize = cfg.get("intermediate_size")?;
        read_llama_like(cfg, self.name(), true, false, default_rope, |_| Ok(MlpSpec::Dense { intermediate_size: inter }))
    }
}
