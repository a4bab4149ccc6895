//! What Llama-shaped families (Qwen2, Qwen3, Qwen3-MoE, Llama) read alike from a config.

use super::hf_config::HfConfig;
use super::spec::{default_inv_freq, ArchSpec, LayerSpec, MlpSpec};
use crate::error::Result;

/// The rope type a config asks for (`rope_scaling.rope_type`, older `rope_scaling.type`, or
/// transformers v5's `rope_parameters.rope_type`), `None` for the default.
pub fn rope_type(cfg: &HfConfig) -> Result<Option<String>> {
    let t: Option<String> = cfg.opt("rope_scaling.rope_type")?.or(cfg.opt("rope_scaling.type")?);
    let t = t.or(cfg.opt("rope_parameters.rope_type")?);
    Ok(t.filter(|t| t != "default"))
}

/// Unscaled rotary frequencies from `rope_theta`; any scaling is refused with a sentence.
pub fn default_rope(cfg: &HfConfig, head_dim: usize) -> Result<Vec<f64>> {
    if let Some(t) = rope_type(cfg)? {
        return Err(cfg.unsupported("rope_scaling", &format!("rope type \"{t}\" is not supported; only the default rotary embedding is")));
    }
    Ok(default_inv_freq(cfg.get_or("rope_theta", 10000.0)?, head_dim))
}

/// The fields shared by every Llama-shaped family, read from a config. `qkv_bias`, `qk_norm`
/// and the rotary frequencies are the family's choice; `head_dim` defaults to `hidden_size / num_attention_heads`.
pub fn read_llama_like(
    cfg: &HfConfig,
    family: &str,
    qkv_bias: bool,
    qk_norm: bool,
    rope: impl Fn(&HfConfig, usize) -> Result<Vec<f64>>,
    mlp: impl Fn(usize) -> Result<MlpSpec>,
) -> Result<ArchSpec> {
    let hidden: usize = cfg.get("hidden_size")?;
    let heads: usize = cfg.get("num_attention_heads")?;
    let kv: usize = cfg.get_or("num_key_value_heads", heads)?;
    let head_dim: usize = match cfg.opt("head_dim")? {
        Some(d) => d,
        None => hidden / heads.max(1),
    };
    // Bounded before the rotary table of head_dim / 2 frequencies is made.
    if head_dim == 0 || head_dim > super::spec::MAX_DIM {
        let why = if cfg.opt::<usize>("head_dim")?.is_some() { "" } else { " (hidden_size / num_attention_heads)" };
        return Err(crate::error::Error::model(format!("{}: `head_dim` is {head_dim}{why}; expected an even number from 2 to {}", cfg.source, super::spec::MAX_DIM)));
    }
    let act: String = cfg.get_or("hidden_act", "silu".to_string())?;
    if act != "silu" {
        return Err(cfg.unsupported("hidden_act", &format!("\"{act}\" is not supported; trainer's MLP is SwiGLU (\"silu\")")));
    }
    if cfg.get_or("use_sliding_window", false)? {
        return Err(cfg.unsupported("use_sliding_window", "sliding-window attention is not supported; set it to false"));
    }
    let layers: usize = cfg.get("num_hidden_layers")?;
    // Checked here, before a layer list of that length is made; the rest in ArchSpec::check.
    if layers == 0 || layers > super::spec::MAX_LAYERS {
        return Err(crate::error::Error::model(format!(
            "{}: `num_hidden_layers` is {layers}; expected 1 to {}",
            cfg.source,
            super::spec::MAX_LAYERS
        )));
    }
    Ok(ArchSpec {
        family: family.to_string(),
        vocab_size: cfg.get("vocab_size")?,
        hidden_size: hidden,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        rms_norm_eps: cfg.get_or("rms_norm_eps", 1e-6)?,
        rope_inv_freq: rope(cfg, head_dim)?,
        max_position_embeddings: cfg.get_or("max_position_embeddings", 32768)?,
        qkv_bias,
        qk_norm,
        tie_word_embeddings: cfg.get_or("tie_word_embeddings", false)?,
        init_std: cfg.get_or("initializer_range", 0.02)?,
        router_aux_loss_coef: cfg.get_or("router_aux_loss_coef", 0.001)?,
        layers: (0..layers).map(|i| Ok(LayerSpec { mlp: mlp(i)? })).collect::<Result<_>>()?,
    })
}

